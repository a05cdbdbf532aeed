//! The standard gRPC health service (`grpc.health.v1`) on every server and on both coord
//! addresses, so `grpc_health_probe` and orchestrators work unchanged: a server is SERVING
//! once it has joined and while its log is writable; the coord while a leader is designated.

use std::time::Duration;

use kvraft_proto::FaultRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::{init_logging, Cluster};

async fn health(addr: &str, service: &str) -> Option<ServingStatus> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    let mut client = HealthClient::new(endpoint.connect().await.ok()?);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    req.set_timeout(Duration::from_secs(2));
    let status = client.check(req).await.ok()?.into_inner().status;
    ServingStatus::try_from(status).ok()
}

async fn wait_health(addr: &str, service: &str, want: ServingStatus) {
    let what = format!("{addr} {service:?} to report {want:?}");
    Cluster::wait_for(&what, || async {
        health(addr, service).await == Some(want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_joining_disk_space_and_leadership() {
    init_logging();
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let coord_addrs = [
        cluster.config.coord.client_api_addr.clone(),
        cluster.config.coord.server_api_addr.clone(),
    ];

    tracing::info!("--- every server and the coord report SERVING");
    for id in cluster.ids() {
        wait_health(&cluster.addr(id), "", ServingStatus::Serving).await;
        wait_health(&cluster.addr(id), "kvraft.Kv", ServingStatus::Serving).await;
    }
    for addr in &coord_addrs {
        wait_health(addr, "", ServingStatus::Serving).await;
    }

    tracing::info!("--- a follower whose disk is full is NOT_SERVING until space returns");
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let full = FaultRequest {
        disk_full: true,
        ..FaultRequest::default()
    };
    cluster.set_faults(follower, full).await;
    let client = kvslib::Client::connect(&cluster.config, "health")
        .await
        .unwrap();
    client.put("k", "v").await.unwrap();
    wait_health(&cluster.addr(follower), "", ServingStatus::NotServing).await;
    cluster.set_faults(follower, FaultRequest::default()).await;
    client.put("k", "w").await.unwrap();
    wait_health(&cluster.addr(follower), "", ServingStatus::Serving).await;
    client.close().await;

    tracing::info!("--- without a majority there is no leader: the coord is NOT_SERVING");
    cluster.kill_server(leader);
    cluster.kill_server(follower);
    for addr in &coord_addrs {
        wait_health(addr, "", ServingStatus::NotServing).await;
    }
    cluster.start_server(leader);
    cluster.start_server(follower);
    for addr in &coord_addrs {
        wait_health(addr, "", ServingStatus::Serving).await;
    }
}
