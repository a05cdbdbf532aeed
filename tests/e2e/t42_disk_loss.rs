//! Disk loss (DESIGN rule 10): a server whose data directory was wiped comes back with an empty
//! log and a new storage identity. It may have acknowledged entries it no longer holds, so it
//! must not vote or count for commit until it has caught up; otherwise it and a stale server
//! form a majority that elects the stale one and rolls back an acknowledged write.
//!
//! ```text
//!   put x=before   on L A B
//!   kill B; put x=ACKED   on L A          (a majority: acknowledged)
//!   wipe A, restart it (cut off from L)   A: empty, catching up
//!   kill L; start B                       B: x=before
//! ```
//!
//! Reads may then fail (no majority of voters) or return ACKED, never `before` nor "not found".
//! The wiped server is started partitioned from the leader, so it is certainly still catching
//! up when the leader dies (otherwise it usually catches up within milliseconds and the test
//! would only see the easy case); the partition is healed once the old leader is back.

use std::time::{Duration, Instant};

use kvraft_proto::FaultRequest;

use crate::harness::{Cluster, WAIT};

const KEY: &str = "x";
const BEFORE: &str = "before";
const ACKED: &str = "ACKED";
/// How long the reads after the leader's death keep going: long enough for several epoch
/// changes to be tried (failure timeout 400 ms), short enough to keep the test quick.
const READ_WINDOW: Duration = Duration::from_secs(5);
/// The kvslib deadline per operation of those reads: a few attempts, then a clear timeout.
const READ_OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than any test phase: the wiped server's partition from the leader ends when the test
/// heals it, not on its own.
const PARTITION_MS: u64 = 120_000;

/// Who is who, learned from the coord once the first leader is designated.
struct Roles {
    leader: u32,
    leader_term: u64,
    /// The other servers, by id.
    followers: Vec<u32>,
}

async fn roles(cluster: &Cluster) -> Roles {
    let info = cluster.wait_leader(|_| true).await;
    let followers = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != info.leader_id)
        .collect();
    Roles {
        leader: info.leader_id,
        leader_term: info.term,
        followers,
    }
}

async fn put(client: &kvslib::Client, value: &str) {
    client
        .put(KEY, value)
        .await
        .unwrap_or_else(|e| panic!("put {KEY}={value}: {e}"));
}

/// Kills `id`, deletes its data directory and starts it again partitioned from `leader`; waits
/// until the coord has recorded the new storage and the server knows it is catching up.
async fn wipe_and_restart(cluster: &mut Cluster, id: u32, leader: u32) {
    cluster.kill_server(id);
    cluster.wipe_data_dir(id);
    let cut_off = vec![
        "--partition-peers".to_string(),
        leader.to_string(),
        "--partition-peers-ms".to_string(),
        PARTITION_MS.to_string(),
    ];
    cluster.server_flags.insert(id, cut_off);
    cluster.start_server(id);
    cluster.server_flags.remove(&id);
    let noticed = format!("server {id} came back with other storage (");
    Cluster::wait_for(&format!("the coord to log: {noticed}"), || {
        let found = cluster.log_text("coord").contains(&noticed);
        async move { found }
    })
    .await;
    Cluster::wait_for(&format!("server {id}'s Status to say catching_up"), || {
        let c = &*cluster;
        async move { catching_up(c, id).await == Some(true) }
    })
    .await;
}

async fn catching_up(cluster: &Cluster, id: u32) -> Option<bool> {
    let report = cluster.status(id).await?.report?;
    Some(report.catching_up)
}

/// One read of `KEY` through a fresh kvslib client with a short deadline (session registration
/// included). A kvslib call that outlives its own deadline by far is a hang, reported as such.
async fn fresh_read(cluster: &Cluster, client_id: &str) -> Result<Option<String>, kvslib::Error> {
    let config = cluster.client_config(READ_OP_TIMEOUT);
    let read = async {
        let client = kvslib::Client::connect(&config, client_id).await?;
        let got = client.get(KEY).await;
        client.close().await;
        got
    };
    let hang_after = READ_OP_TIMEOUT * 4;
    let got = tokio::time::timeout(hang_after, read)
        .await
        .unwrap_or_else(|_| panic!("{client_id}: a read hung for {hang_after:?}"))?;
    Ok(got.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Checks a read's outcome: a value can only be ACKED; an error can only say the cluster is
/// unavailable or the deadline passed. Returns whether the read succeeded.
fn check_read(client_id: &str, got: &Result<Option<String>, kvslib::Error>) -> bool {
    match got {
        Ok(Some(v)) => {
            assert_eq!(
                v, ACKED,
                "{client_id}: an acknowledged write was rolled back"
            );
            true
        }
        Ok(None) => panic!("{client_id}: {KEY} not found: an acknowledged write was lost"),
        Err(kvslib::Error::Timeout { .. } | kvslib::Error::Unavailable(_)) => false,
        Err(e) => panic!("{client_id}: a read failed with neither a value nor unavailability: {e}"),
    }
}

/// After the old leader restarted: the cluster serves again, reads return ACKED, the wiped
/// server becomes a voter and every server applies the latest write.
async fn recovery_serves_acked(cluster: &Cluster, wiped: u32) {
    cluster.set_faults(wiped, FaultRequest::default()).await;
    let client = kvslib::Client::connect(&cluster.config, "after")
        .await
        .unwrap();
    let got = client.get(KEY).await.unwrap();
    assert_eq!(got.as_deref(), Some(ACKED.as_bytes()), "after recovery");
    client.put("y", "after").await.unwrap();
    let leader = cluster.wait_leader(|_| true).await;
    let target = cluster
        .status(leader.leader_id)
        .await
        .expect("leader status")
        .last_applied;
    client.close().await;

    Cluster::wait_for(
        &format!("server {wiped} to stop catching up"),
        || async move { catching_up(cluster, wiped).await == Some(false) },
    )
    .await;
    let promoted = format!("server {wiped} caught up (");
    let log = cluster.log_text("coord");
    assert!(
        log.lines()
            .any(|l| l.contains(&promoted) && l.contains("a voter again")),
        "the coord log says server {wiped} is a voter again"
    );
    for id in cluster.ids() {
        Cluster::wait_for(
            &format!("server {id} to apply index {target}"),
            || async move {
                let s = cluster.status(id).await;
                s.is_some_and(|s| s.last_applied >= target)
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_follower_never_rolls_back_an_acknowledged_write_3_servers() {
    let mut cluster = Cluster::start(3);
    let roles = roles(&cluster).await;
    let (l, a, b) = (roles.leader, roles.followers[0], roles.followers[1]);
    tracing::info!("--- leader {l}, followers {a} and {b}: {KEY}={BEFORE} on all three");
    let client = kvslib::Client::connect(&cluster.config, "writer")
        .await
        .unwrap();
    put(&client, BEFORE).await;

    tracing::info!("--- kill {b}; {KEY}={ACKED} is acknowledged by {l} and {a} alone");
    cluster.kill_server(b);
    put(&client, ACKED).await;
    client.close().await;

    tracing::info!("--- {a} loses its disk and comes back empty, cut off from {l}");
    wipe_and_restart(&mut cluster, a, l).await;

    tracing::info!(
        "--- kill {l}, start {b} (it has {BEFORE}): {a} must not vote, so no majority of voters"
    );
    cluster.kill_server(l);
    cluster.start_server(b);
    let end = Instant::now() + READ_WINDOW;
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let client_id = format!("reader{n}");
        let got = fresh_read(&cluster, &client_id).await;
        check_read(&client_id, &got);
        let info = cluster.leader_info().await.expect("the coord answers");
        tracing::info!(
            "{client_id}: {got:?}; the coord names leader {} of term {}",
            info.leader_id,
            info.term
        );
        assert!(
            info.leader_id == 0 || info.term <= roles.leader_term,
            "the coord designated {} in term {} with only {b} a voter: {info:?}",
            info.leader_id,
            info.term
        );
    }
    assert_eq!(
        catching_up(&cluster, a).await,
        Some(true),
        "{a} is still catching up: no leader could catch it up"
    );

    tracing::info!("--- restart {l} with its data: it leads, {a} catches up and votes again");
    cluster.start_server(l);
    recovery_serves_acked(&cluster, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_follower_never_rolls_back_an_acknowledged_write_5_servers() {
    let mut cluster = Cluster::start(5);
    let roles = roles(&cluster).await;
    let l = roles.leader;
    let [a, b, c, d] = roles.followers[..] else {
        panic!("four followers: {:?}", roles.followers);
    };
    tracing::info!("--- leader {l}, followers {a} {b} {c} {d}: {KEY}={BEFORE} on all five");
    let client = kvslib::Client::connect(&cluster.config, "writer")
        .await
        .unwrap();
    put(&client, BEFORE).await;

    tracing::info!("--- kill {c} and {d}; {KEY}={ACKED} is acknowledged by {l} {a} {b}");
    cluster.kill_server(c);
    cluster.kill_server(d);
    put(&client, ACKED).await;
    client.close().await;

    tracing::info!("--- {a} loses its disk and comes back empty, cut off from {l}");
    wipe_and_restart(&mut cluster, a, l).await;

    tracing::info!(
        "--- kill {l}, start {c} and {d}: voters {b} {c} {d} are a majority and {b} leads"
    );
    cluster.kill_server(l);
    cluster.start_server(c);
    cluster.start_server(d);
    let new = cluster
        .wait_leader(|info| info.term > roles.leader_term)
        .await;
    assert_eq!(
        new.leader_id, b,
        "{b} is the only live voter holding {ACKED}: {new:?}"
    );
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let client_id = format!("reader{n}");
        let got = fresh_read(&cluster, &client_id).await;
        tracing::info!("{client_id}: {got:?}");
        if check_read(&client_id, &got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read succeeded within {WAIT:?} though voters {b} {c} {d} are up: {got:?}"
        );
    }

    tracing::info!("--- restart {l} with its data: all five serve, {a} votes again");
    cluster.start_server(l);
    recovery_serves_acked(&cluster, a).await;
}
