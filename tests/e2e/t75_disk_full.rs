//! Disk full (storage fault hook): a leader that cannot write its log refuses writes with a
//! clear error and stops claiming leadership, the coord replaces it, nothing acknowledged is
//! lost, and once space returns the server writes its backlog and catches up.

use std::time::Duration;

use kvraft_proto::{ErrorCode, FaultRequest};

use crate::harness::{Cluster, RawPut};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_on_the_leader_hands_over_and_recovers() {
    let cluster = Cluster::start(3);
    let old = cluster.wait_leader(|_| true).await;
    let l = old.leader_id;
    let client = kvslib::Client::connect(&cluster.config, "disk")
        .await
        .unwrap();
    for i in 0..10 {
        client.put(format!("f{i}"), "before").await.unwrap();
    }

    tracing::info!("--- leader {l}'s disk fills up");
    let full = FaultRequest {
        disk_full: true,
        ..FaultRequest::default()
    };
    cluster.set_faults(l, full).await;
    // The next write makes the leader hit the full disk; it may still commit through the
    // followers' disks, which is safe (a majority fsynced it).
    client.put("trigger", "x").await.unwrap();
    let put = RawPut {
        session_id: client.session_id(),
        // Valid (within the session window) but far ahead: if it were appended it would wait
        // for earlier seqs instead of disturbing the client's session.
        seq: 1_000,
        ack_seq: 1,
        key: "raw",
        value: "raw",
    };
    if let Ok(resp) = cluster.raw_put(l, put, Duration::from_secs(3)).await {
        let err = resp.error.expect("a full-disk leader refuses writes");
        assert!(
            err.code == ErrorCode::ErrorNotLeader as i32
                || (err.code == ErrorCode::ErrorUnavailable as i32
                    && err.message.contains("disk full")),
            "{err:?}"
        );
    }
    let new = cluster
        .wait_leader(|info| info.leader_id != l && info.term > old.term)
        .await;
    tracing::info!("--- server {} took over; writes continue", new.leader_id);
    for i in 10..30 {
        client.put(format!("f{i}"), "during").await.unwrap();
    }
    let log = std::fs::read_to_string(cluster.dir.path().join(format!("server{l}.log"))).unwrap();
    assert!(log.contains("disk full"), "the server log says why");

    tracing::info!("--- space returns: server {l} writes its backlog and catches up");
    cluster.set_faults(l, FaultRequest::default()).await;
    let target = cluster
        .status(new.leader_id)
        .await
        .unwrap()
        .report
        .unwrap()
        .commit_index;
    Cluster::wait_for("the recovered server to catch up", || {
        let c = &cluster;
        async move { c.status(l).await.is_some_and(|s| s.last_applied >= target) }
    })
    .await;
    for i in 0..30 {
        let expected = if i < 10 { "before" } else { "during" };
        let got = client.get(format!("f{i}")).await.unwrap();
        assert_eq!(got.as_deref(), Some(expected.as_bytes()), "f{i}");
    }
    client.close().await;
}

/// DESIGN rule 5 with full disks: entries that could not be written are never counted as
/// durable. With the leader's and one follower's disks full, only one server of three can
/// persist, so a put must not be acknowledged; once space returns it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_entries_are_never_acknowledged() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let client = kvslib::Client::connect(&cluster.config, "rule5")
        .await
        .unwrap();
    client.put("warm", "up").await.unwrap();
    // A session of its own for the raw request: the client's next seq belongs to the client.
    let raw_client = kvslib::Client::connect(&cluster.config, "rule5-raw")
        .await
        .unwrap();
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    tracing::info!("--- disks of leader {leader} and follower {follower} fill up");
    for id in [leader, follower] {
        let full = FaultRequest {
            disk_full: true,
            ..FaultRequest::default()
        };
        cluster.set_faults(id, full).await;
    }
    let put = RawPut {
        session_id: raw_client.session_id(),
        seq: 1,
        ack_seq: 1,
        key: "k",
        value: "must-wait",
    };
    match cluster.raw_put(leader, put, Duration::from_secs(2)).await {
        Ok(resp) => {
            assert!(
                resp.error.is_some(),
                "acknowledged with only one durable copy: {resp:?}"
            );
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}"),
    }
    tracing::info!("--- space returns; the cluster commits again");
    for id in [leader, follower] {
        cluster.set_faults(id, FaultRequest::default()).await;
    }
    client.put("after", "space").await.unwrap();
    assert_eq!(client.get("after").await.unwrap(), Some(b"space".to_vec()));
    client.close().await;
    raw_client.close().await;
}
