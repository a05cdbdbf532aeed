//! Coord crash and restart under a write load: the leader keeps serving while the coord is
//! down; the restarted coord re-learns the leader without a new term, and any later term is
//! higher than every earlier one (DESIGN rule 1, section 4).

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_while_coord_is_down_and_terms_never_repeat() {
    let mut cluster = Cluster::start(3);
    let first = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "coordless")
        .await
        .unwrap();
    for i in 0..10 {
        client.put(format!("c{i}"), "up").await.unwrap();
    }

    tracing::info!("--- kill -9 the coord; the leader keeps serving writes and reads");
    cluster.kill_coord();
    for i in 10..60 {
        client.put(format!("c{i}"), "coord-down").await.unwrap();
    }
    assert_eq!(
        client.get("c59").await.unwrap(),
        Some(b"coord-down".to_vec())
    );

    tracing::info!("--- restart the coord: it adopts the live leader, no new term");
    cluster.start_coord();
    let relearned = cluster.wait_leader(|_| true).await;
    assert_eq!(
        (relearned.leader_id, relearned.term),
        (first.leader_id, first.term)
    );

    tracing::info!("--- a later failover issues a term above every earlier one");
    cluster.kill_server(first.leader_id);
    let next = cluster
        .wait_leader(|l| l.leader_id != first.leader_id)
        .await;
    assert!(next.term > first.term);
    for i in 60..70 {
        client.put(format!("c{i}"), "after").await.unwrap();
    }
    for i in 0..70 {
        assert!(client.get(format!("c{i}")).await.unwrap().is_some(), "c{i}");
    }
    client.close().await;
}
