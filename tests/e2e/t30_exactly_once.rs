//! DESIGN rule 7 end to end: the leader commits a put and crashes before replying; kvslib
//! retries at the next leader with the same request identity and the put applies once.

use kvraft_proto::FaultRequest;

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_reply_applies_retry_once() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "once")
        .await
        .unwrap();
    assert_eq!(client.put("k", "first").await.unwrap().version, 1);

    let status = cluster
        .status(leader.leader_id)
        .await
        .expect("leader status");
    let last = status.report.unwrap().last_log_index;
    let fault = FaultRequest {
        crash_after_commit: last + 1,
        ..FaultRequest::default()
    };
    cluster.set_faults(leader.leader_id, fault).await;

    tracing::info!(
        "--- the put commits at index {}, the leader exits before replying",
        last + 1
    );
    let outcome = client
        .put("k", "second")
        .await
        .expect("retried put succeeds");
    let id = leader.leader_id;
    Cluster::wait_for("the leader to exit", || {
        let exited = cluster.server_exited(id).is_some();
        async move { exited }
    })
    .await;
    // Applied once: the key saw exactly two puts, and the answer is the original one (the
    // entry at last + 1), not a second application.
    assert_eq!(outcome.version, 2, "retry was applied again");
    assert_eq!(outcome.index, last + 1);
    let v = client.get_versioned("k").await.unwrap().unwrap();
    assert_eq!((v.value.as_slice(), v.version), (&b"second"[..], 2));
    let new = cluster.wait_leader(|l| l.leader_id != id).await;
    assert!(new.term > leader.term);
    client.close().await;
}
