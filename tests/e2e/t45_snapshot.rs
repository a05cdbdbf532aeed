//! Log compaction and snapshot catch-up: servers keep only a short tail of the log below what
//! their state machine made durable, so a follower that was away longer, or lost its data
//! directory, is brought back by a snapshot of the leader's state machine, streamed in chunks
//! while clients keep writing. Afterwards every replica holds the same state (`Admin.Digest`)
//! and every acknowledged write reads back.
//!
//! ```text
//!   write round 0 ─▶ kill F ─▶ write rounds 1..3 (leader compacts past F) ─▶ start F
//!   writer keeps writing ─▶ F installs a snapshot ─▶ writer stops ─▶ digests agree, reads
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvraft_proto::FaultRequest;

use crate::harness::Cluster;

/// A tail of 20 entries, the state machine durable every 50 ms, 4 KiB chunks: compaction
/// passes a stopped follower within a second and a snapshot takes many chunks.
const OPTIONS: &str = "log_tail_entries = 20\nstate_sync_ms = 50\nsnapshot_chunk_bytes = 4096";
const KEYS: u32 = 200;

fn value(round: u32, key: u32, bytes: usize) -> String {
    let mut v = format!("r{round}-k{key}-");
    while v.len() < bytes {
        v.push('x');
    }
    v
}

/// Writes round `round` of every key from `writers` clients in parallel.
async fn write_round(cluster: &Cluster, round: u32, keys: u32, bytes: usize, writers: u32) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let config = cluster.config.clone();
        tasks.push(tokio::spawn(async move {
            let client = kvslib::Client::connect(&config, &format!("round{round}-w{w}"))
                .await
                .expect("connect");
            for key in (w..keys).step_by(writers as usize) {
                client
                    .put(format!("k{key}"), value(round, key, bytes))
                    .await
                    .unwrap_or_else(|e| panic!("put k{key} round {round}: {e}"));
            }
            client.close().await;
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

async fn read_round(cluster: &Cluster, round: u32, keys: u32, bytes: usize) {
    let client = kvslib::Client::connect(&cluster.config, "reader")
        .await
        .expect("connect");
    for key in 0..keys {
        let got = client.get(format!("k{key}")).await.expect("get");
        assert_eq!(
            got,
            Some(value(round, key, bytes).into_bytes()),
            "key k{key}"
        );
    }
    client.close().await;
}

/// Writes `w<i>` keys until `stop`; returns how many were acknowledged.
fn background_writer(cluster: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
    let config = cluster.config.clone();
    tokio::spawn(async move {
        let client = kvslib::Client::connect(&config, "during")
            .await
            .expect("connect");
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
            client
                .put(format!("w{n}"), format!("during-{n}"))
                .await
                .unwrap_or_else(|e| panic!("put w{n} during the transfer: {e}"));
            n += 1;
        }
        client.close().await;
        n
    })
}

async fn read_background(cluster: &Cluster, n: u32) {
    let client = kvslib::Client::connect(&cluster.config, "reader-w")
        .await
        .expect("connect");
    for i in 0..n {
        let got = client.get(format!("w{i}")).await.expect("get");
        assert_eq!(got, Some(format!("during-{i}").into_bytes()), "key w{i}");
    }
    client.close().await;
}

/// Waits until the leader has compacted past `index` (its log base is above it).
async fn wait_compacted_past(cluster: &Cluster, leader: u32, index: u64) {
    Cluster::wait_for(
        &format!("server {leader} to compact its log past {index}"),
        || async move {
            cluster
                .status(leader)
                .await
                .is_some_and(|s| s.log_base_index > index)
        },
    )
    .await;
}

async fn wait_installed(cluster: &Cluster, id: u32) {
    Cluster::wait_for(
        &format!("server {id} to install a snapshot"),
        || async move {
            cluster
                .status(id)
                .await
                .is_some_and(|s| s.snapshots_installed > 0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_away_past_the_kept_tail_rejoins_by_snapshot_while_clients_write() {
    let mut cluster = Cluster::with_server_options(3, OPTIONS);
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let away = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    write_round(&cluster, 0, KEYS, 300, 4).await;
    let applied = cluster.status(away).await.expect("status").last_applied;
    cluster.kill_server(away);
    for round in 1..=3 {
        write_round(&cluster, round, KEYS, 300, 4).await;
    }
    wait_compacted_past(&cluster, leader, applied + 20).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_writer(&cluster, stop.clone());
    cluster.start_server(away);
    wait_installed(&cluster, away).await;
    // The sender counts the transfer once the follower's last answer reaches it (and the
    // leadership may have moved meanwhile: any server may be the one that sent it).
    Cluster::wait_for("a server to report the snapshot sent", || {
        let c = &cluster;
        async move {
            let mut sent = 0;
            for id in c.ids() {
                sent += c.status(id).await.map_or(0, |s| s.snapshots_sent);
            }
            sent > 0
        }
    })
    .await;
    // Writes go on after the install: the follower continues from the log.
    let after = cluster.status(away).await.expect("status").last_applied;
    Cluster::wait_for("the follower to apply entries after its snapshot", || {
        let c = &cluster;
        async move {
            c.status(away)
                .await
                .is_some_and(|s| s.last_applied > after + 50)
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let n = writer.await.expect("writer");
    assert!(n > 0);

    let digest = cluster.wait_same_digest().await;
    assert!(digest.bytes > u64::from(KEYS) * 300, "{digest:?}");
    read_round(&cluster, 3, KEYS, 300).await;
    read_background(&cluster, n).await;
    // The rejoined follower's log holds only what followed its snapshot.
    let s = cluster.status(away).await.expect("status");
    assert!(s.log_base_index >= applied + 20, "{s:?}");
}

/// A wiped follower (DESIGN rule 10) comes back empty: the log it needs is compacted, so a
/// snapshot rebuilds it; a follower killed while receiving one, and one killed right after
/// installing it (before its log was reset), restart into a consistent state and catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_and_mid_install_killed_followers_are_rebuilt_by_snapshot() {
    // 2 KiB values over 1,500 keys: about 3 MB of state, hundreds of 4 KiB chunks, so the
    // transfer lasts long enough to be caught in the middle.
    const BIG_KEYS: u32 = 1_500;
    const BIG_VALUE: usize = 2_048;
    let mut cluster = Cluster::with_server_options(3, OPTIONS);
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    write_round(&cluster, 0, BIG_KEYS, BIG_VALUE, 4).await;
    let last = cluster.status(leader).await.expect("status").last_applied;
    wait_compacted_past(&cluster, leader, last / 2).await;

    tracing::info!("--- wipe the follower; kill it while the snapshot comes in");
    // Every replication message of the leader waits 3 ms: the transfer (one chunk in flight)
    // then lasts seconds, so the poll below sees it in progress.
    let slow = |delay_ms| FaultRequest {
        delay_ms,
        ..FaultRequest::default()
    };
    cluster.set_faults(leader, slow(3)).await;
    cluster.kill_server(follower);
    cluster.wipe_data_dir(follower);
    cluster.start_server(follower);
    Cluster::wait_for("the wiped follower to receive part of a snapshot", || {
        let c = &cluster;
        async move {
            c.status(follower)
                .await
                .is_some_and(|s| s.snapshot_bytes > 0)
        }
    })
    .await;
    cluster.kill_server(follower);
    cluster.set_faults(leader, slow(0)).await;

    tracing::info!("--- restart it to crash right after the install, before the log reset");
    cluster
        .server_flags
        .insert(follower, vec!["--crash-after-snapshot-install".to_string()]);
    cluster.start_server(follower);
    Cluster::wait_for("the follower to exit after installing", || {
        let exited = cluster.server_exited(follower);
        async move { exited.is_some() }
    })
    .await;
    cluster.server_flags.remove(&follower);

    tracing::info!("--- restart it for good: it finishes the install and catches up");
    cluster.start_server(follower);
    write_round(&cluster, 1, 100, 100, 2).await;
    let digest = cluster.wait_same_digest().await;
    assert!(
        digest.bytes > u64::from(BIG_KEYS - 100) * BIG_VALUE as u64,
        "{digest:?}"
    );
    let log = cluster.log_text(&format!("server{follower}"));
    assert!(
        log.contains("log reset after the snapshot installed last run"),
        "the restart did not finish the interrupted install"
    );
    // The follower counts again (rule 10): with the leader gone, it and the third server elect
    // a leader that serves every acknowledged write.
    let term = cluster.wait_leader(|_| true).await.term;
    cluster.kill_server(leader);
    cluster.wait_leader(|l| l.term > term).await;
    read_round(&cluster, 1, 100, 100).await;
}

/// Steady writes past many compactions: the log on disk and the entries held in memory stay
/// below bounds set by the kept tail and the segment size, not by the number of writes, and
/// every key reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_writes_keep_the_log_bounded_on_disk_and_in_memory() {
    const ROUNDS: u32 = 60;
    const ROUND_KEYS: u32 = 100;
    const VALUE: usize = 1_000;
    const SEGMENT: u64 = 64 * 1024;
    let mut cluster = Cluster::with_server_options(
        3,
        &format!("log_tail_entries = 100\nstate_sync_ms = 50\nlog_segment_bytes = {SEGMENT}"),
    );
    cluster.start_all();
    cluster.wait_leader(|_| true).await;
    let mut most_log_bytes = 0;
    let mut most_held = 0;
    for round in 0..ROUNDS {
        write_round(&cluster, round, ROUND_KEYS, VALUE, 4).await;
        for id in cluster.ids() {
            let s = cluster.status(id).await.expect("status");
            most_log_bytes = most_log_bytes.max(s.log_bytes);
            most_held = most_held.max(s.log_entries_held);
        }
    }
    let written = u64::from(ROUNDS * ROUND_KEYS);
    // 6,000 entries of over 1,000 bytes were written: more than 6 MB of log per server. What is
    // kept is the tail (100 entries), what was applied since the last durable commit (50 ms of
    // writes) and at most a few 64 KiB segments around them.
    assert!(
        most_log_bytes < 2 * 1024 * 1024,
        "a log of {most_log_bytes} bytes after {written} puts"
    );
    assert!(
        most_held < written / 3,
        "{most_held} entries held after {written} puts"
    );
    for id in cluster.ids() {
        let s = cluster.status(id).await.expect("status");
        assert!(s.log_base_index > written / 2, "server {id}: {s:?}");
    }
    read_round(&cluster, ROUNDS - 1, ROUND_KEYS, VALUE).await;
    cluster.wait_same_digest().await;
}

/// `[server] max_value_bytes` sets the longest value, and every gRPC limit follows from it:
/// values above the default 1 MiB go through puts, reads, replication and a snapshot (a chunk
/// then holds one record larger than the chunk size); longer ones are refused by kvslib and by
/// the server, with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_value_limit_holds_through_replication_and_snapshots() {
    const LIMIT: usize = 3 * 1024 * 1024;
    let mut cluster = Cluster::with_server_options(
        3,
        &format!("max_value_bytes = {LIMIT}\nlog_tail_entries = 2\nstate_sync_ms = 50"),
    );
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let client = kvslib::Client::connect(&cluster.config, "big")
        .await
        .expect("connect");
    let big = vec![b'v'; LIMIT];
    client
        .put("big", big.clone())
        .await
        .expect("a value at the limit");
    assert_eq!(client.get("big").await.expect("get"), Some(big.clone()));
    let err = client
        .put("big", vec![b'v'; LIMIT + 1])
        .await
        .expect_err("over the limit")
        .to_string();
    assert!(err.contains(&LIMIT.to_string()), "{err}");
    let too_long = "v".repeat(LIMIT + 1);
    let seq = 1_000;
    let raw = crate::harness::RawPut {
        session_id: client.session_id(),
        seq,
        ack_seq: seq,
        key: "big",
        value: &too_long,
    };
    let resp = cluster
        .raw_put(leader, raw, std::time::Duration::from_secs(5))
        .await
        .expect("answered");
    let refusal = resp.error.expect("refused").message;
    assert!(refusal.contains(&LIMIT.to_string()), "{refusal}");

    // A wiped follower gets the big value in a snapshot (the log holding it is compacted).
    for i in 0..20 {
        client.put(format!("small{i}"), "x").await.expect("put");
    }
    wait_compacted_past(&cluster, leader, 5).await;
    cluster.kill_server(follower);
    cluster.wipe_data_dir(follower);
    cluster.start_server(follower);
    wait_installed(&cluster, follower).await;
    client.close().await;
    cluster.wait_same_digest().await;
}
