//! Fault injection is off unless a server is started with it allowed (DESIGN section 6): on a
//! production server `Admin.SetFaults` would be a remote kill switch. Without the flag or the
//! config key the RPC is refused with `PERMISSION_DENIED` saying how to enable it, the startup
//! fault flags stop the server with an error naming the flag, and `Admin.Status` stays open.

use std::io::Write as _;
use std::time::{Duration, Instant};

use kvraft_proto::FaultRequest;

use crate::harness::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_faults_is_refused_unless_fault_injection_is_allowed() {
    let mut cluster = Cluster::new(3).without_fault_injection();
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await;

    tracing::info!(
        "--- SetFaults on every server: PERMISSION_DENIED, naming the server and the fix"
    );
    for id in cluster.ids() {
        let cut = FaultRequest {
            partition_coord_ms: 60_000,
            ..FaultRequest::default()
        };
        let status = cluster
            .try_set_faults(id, cut)
            .await
            .expect_err("SetFaults must be refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!("fault injection is disabled on server {id}"))
                && message.contains("--allow-fault-injection")
                && message.contains("allow_fault_injection = true"),
            "{message}"
        );
    }

    tracing::info!("--- Status still answers, and the refused fault did not cut the leader off");
    for id in cluster.ids() {
        let status = cluster.status(id).await.expect("Status answers");
        assert!(status.report.is_some());
    }
    let client = kvslib::Client::connect(&cluster.config, "gate")
        .await
        .unwrap();
    client.put("k", "v").await.expect("put");
    let same = cluster.wait_leader(|_| true).await;
    assert_eq!(same.leader_id, leader.leader_id);

    tracing::info!("--- a startup fault flag without --allow-fault-injection stops the server");
    let id = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader.leader_id)
        .expect("a follower");
    cluster.kill_server(id);
    cluster
        .server_flags
        .insert(id, vec!["--crash-after-commit".into(), "5".into()]);
    cluster.start_server(id);
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = cluster.server_exited(id) {
            break exit;
        }
        assert!(Instant::now() < deadline, "server {id} kept running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exit.success(), "{exit}");
    let log = cluster.log_text(&format!("server{id}"));
    assert!(
        log.contains("--crash-after-commit")
            && log.contains(&format!("fault injection is disabled on server {id}")),
        "{log}"
    );

    tracing::info!("--- [server] allow_fault_injection = true in the config allows it");
    cluster.server_flags.remove(&id);
    std::fs::File::options()
        .append(true)
        .open(&cluster.config_path)
        .and_then(|mut f| f.write_all(b"\n[server]\nallow_fault_injection = true\n"))
        .expect("append to config");
    cluster.start_server(id);
    Cluster::wait_for("the restarted server to answer Status", || {
        let status = cluster.status(id);
        async move { status.await.is_some() }
    })
    .await;
    cluster
        .try_set_faults(id, FaultRequest::default())
        .await
        .expect("SetFaults allowed by the config");
}
