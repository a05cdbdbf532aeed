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
