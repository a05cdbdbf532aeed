//! Restarts: a follower crashes and catches up; then the whole cluster restarts from disk.
//! No acknowledged write may be lost (DESIGN rules 5 and 9).

use crate::harness::Cluster;

async fn write_range(client: &kvslib::Client, range: std::ops::Range<u32>) {
    for i in range {
        client
            .put(format!("r{i}"), format!("v{i}"))
            .await
            .unwrap_or_else(|e| panic!("put r{i}: {e}"));
    }
}

async fn read_range(client: &kvslib::Client, range: std::ops::Range<u32>) {
    for i in range {
        let got = client.get(format!("r{i}")).await.unwrap();
        assert_eq!(got, Some(format!("v{i}").into_bytes()), "key r{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_restart_catches_up_and_full_restart_keeps_everything() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "restart")
        .await
        .unwrap();
    write_range(&client, 0..50).await;

    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader.leader_id)
        .unwrap();
    tracing::info!("--- kill -9 follower {follower}; the other two keep committing");
    cluster.kill_server(follower);
    write_range(&client, 50..100).await;

    tracing::info!("--- restart it: it catches up from the leader's log");
    cluster.start_server(follower);
    let target = cluster
        .status(leader.leader_id)
        .await
        .expect("leader status")
        .report
        .unwrap()
        .commit_index;
    Cluster::wait_for("the restarted follower to catch up", || {
        let c = &cluster;
        async move {
            let s = c.status(follower).await;
            s.is_some_and(|s| s.last_applied >= target)
        }
    })
    .await;
    client.close().await;

    tracing::info!("--- kill -9 every process, restart all from disk");
    for id in cluster.ids() {
        cluster.kill_server(id);
    }
    cluster.kill_coord();
    cluster.start_all();
    let after = cluster.wait_leader(|_| true).await;
    assert!(after.term > leader.term, "terms are never reused");
    let client = kvslib::Client::connect(&cluster.config, "after")
        .await
        .unwrap();
    read_range(&client, 0..100).await;
    write_range(&client, 100..110).await;
    read_range(&client, 100..110).await;
    client.close().await;
}

/// A server killed under load restarts from its state file (the keys, the sessions and the
/// applied index written together), not from an empty state: started alone, with no leader to
/// tell it a commit index, it already holds what it applied before the kill. The log holds the
/// rest; once the cluster is back every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_from_its_state_file() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "state")
        .await
        .unwrap();
    // Keep writing for well over the state machine's durable-commit period
    // (`[server] state_sync_ms`, 1 s by default), so every server has made some of it durable.
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < std::time::Duration::from_millis(2_500) && n < 50_000 {
        write_range(&client, n..n + 10).await;
        n += 10;
    }
    client.close().await;

    tracing::info!("--- kill -9 every process; start one server alone");
    for id in cluster.ids() {
        cluster.kill_server(id);
    }
    cluster.kill_coord();
    let alone = leader.leader_id;
    cluster.start_server(alone);
    Cluster::wait_for("the lone server to answer Admin.Status", || {
        let c = &cluster;
        async move { c.status(alone).await.is_some() }
    })
    .await;
    let applied = cluster.status(alone).await.expect("status").last_applied;
    assert!(
        applied > 0,
        "server {alone} restarted with nothing applied: its state file was not used"
    );
    tracing::info!(
        applied,
        "--- restart the rest: everything acknowledged reads back"
    );
    cluster.start_coord();
    for id in cluster.ids().into_iter().filter(|&id| id != alone) {
        cluster.start_server(id);
    }
    cluster.wait_leader(|l| l.term > leader.term).await;
    let client = kvslib::Client::connect(&cluster.config, "after")
        .await
        .unwrap();
    read_range(&client, 0..n).await;
    client.close().await;
}
