//! DESIGN rule 2 end to end: the leader and one follower are cut from the coord (5 servers).
//! The coord designates the most up-to-date server of the remaining majority; the old leader
//! can no longer commit; after healing, the old leader follows and the logs converge.

use std::time::Duration;

use kvraft_proto::{ErrorCode, FaultRequest};

use crate::harness::{Cluster, RawPut};

const LONG_MS: u64 = 600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_cut_from_coord_is_replaced_by_most_up_to_date_and_fenced() {
    let cluster = Cluster::start(5);
    let old = cluster.wait_leader(|_| true).await;
    let l = old.leader_id;
    let others: Vec<u32> = cluster.ids().into_iter().filter(|&id| id != l).collect();
    let (f, a, b, lagging) = (others[0], others[1], others[2], others[3]);
    let client = kvslib::Client::connect(&cluster.config, "part")
        .await
        .unwrap();
    for i in 0..10 {
        client.put(format!("p{i}"), "before").await.unwrap();
    }

    tracing::info!("--- server {lagging} stops hearing the leader: it falls behind");
    let cut_from_leader = FaultRequest {
        partition_peers: vec![l],
        partition_peers_ms: LONG_MS,
        ..FaultRequest::default()
    };
    cluster.set_faults(lagging, cut_from_leader).await;
    for i in 10..30 {
        client.put(format!("p{i}"), "behind").await.unwrap();
    }

    tracing::info!("--- cut leader {l} and follower {f} from the coord");
    let cut_from_coord = FaultRequest {
        partition_coord_ms: LONG_MS,
        ..FaultRequest::default()
    };
    cluster.set_faults(l, cut_from_coord.clone()).await;
    cluster.set_faults(f, cut_from_coord).await;
    let new = cluster.wait_leader(|info| info.term > old.term).await;
    assert!(
        new.leader_id == a || new.leader_id == b,
        "leader {} must be one of the up-to-date servers {a}, {b} (not {l}, {f} or lagging {lagging})",
        new.leader_id
    );

    tracing::info!(
        "--- the old leader cannot commit: a put sent straight to it is never acknowledged"
    );
    let fresh = kvslib::Client::connect(&cluster.config, "fresh")
        .await
        .unwrap();
    let put = RawPut {
        session_id: fresh.session_id(),
        seq: 1,
        ack_seq: 1,
        key: "fenced",
        value: "must-not-commit",
    };
    match cluster.raw_put(l, put, Duration::from_secs(3)).await {
        Ok(resp) => {
            let err = resp.error.expect("old leader must not acknowledge");
            assert_eq!(err.code, ErrorCode::ErrorNotLeader as i32, "{err:?}");
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded),
    }
    assert_eq!(fresh.get("fenced").await.unwrap(), None);
    for i in 30..40 {
        client.put(format!("p{i}"), "after").await.unwrap();
    }

    tracing::info!("--- heal: the old leader follows the new term, logs converge");
    for id in [l, f, lagging] {
        cluster.set_faults(id, FaultRequest::default()).await;
    }
    let target = cluster.status(new.leader_id).await.unwrap().report.unwrap();
    Cluster::wait_for("all servers to converge on the new leader's log", || {
        let c = &cluster;
        let ids = c.ids();
        let new_term = new.term;
        async move {
            for id in ids {
                let Some(s) = c.status(id).await else {
                    return false;
                };
                let r = s.report.unwrap();
                if r.term < new_term || s.last_applied < target.commit_index {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let old_report = cluster.status(l).await.unwrap().report.unwrap();
    assert_eq!(old_report.role, kvraft_proto::Role::Follower as i32);
    assert_eq!(old_report.leader_id, new.leader_id);
    for i in 0..40 {
        assert!(client.get(format!("p{i}")).await.unwrap().is_some(), "p{i}");
    }
    assert_eq!(client.get("fenced").await.unwrap(), None);
    client.close().await;
    fresh.close().await;
}

/// A leader cut from every peer but still answering the coord: it stops reporting itself
/// leader (it hears no majority), the coord replaces it with a server that can commit, and
/// writes continue; after healing it follows the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_cut_from_peers_only_is_replaced() {
    let cluster = Cluster::start(3);
    let old = cluster.wait_leader(|_| true).await;
    let l = old.leader_id;
    let client = kvslib::Client::connect(&cluster.config, "iso")
        .await
        .unwrap();
    client.put("before", "1").await.unwrap();
    let peers: Vec<u32> = cluster.ids().into_iter().filter(|&id| id != l).collect();
    tracing::info!("--- cut leader {l} from its peers {peers:?}, not from the coord");
    let cut = FaultRequest {
        partition_peers: peers,
        partition_peers_ms: LONG_MS,
        ..FaultRequest::default()
    };
    cluster.set_faults(l, cut).await;
    let new = cluster
        .wait_leader(|info| info.term > old.term && info.leader_id != l)
        .await;
    client.put("after", "2").await.unwrap();
    assert_eq!(client.get("before").await.unwrap(), Some(b"1".to_vec()));
    tracing::info!("--- heal: the old leader follows term {}", new.term);
    cluster.set_faults(l, FaultRequest::default()).await;
    Cluster::wait_for("the old leader to follow the new one", || {
        let c = &cluster;
        async move {
            c.status(l).await.is_some_and(|s| {
                let r = s.report.unwrap();
                r.term >= new.term && r.role == kvraft_proto::Role::Follower as i32
            })
        }
    })
    .await;
    client.close().await;
}
