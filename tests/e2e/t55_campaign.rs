//! Fault campaign on real processes (issue: prove it). Concurrent kvslib clients record every
//! invocation and completion; a nemesis driven by a seed kills (SIGKILL) and restarts leaders,
//! followers and the coord, pauses processes (SIGSTOP/SIGCONT, the leader beyond the failure
//! timeout), cuts servers from the coord or the leader from its peers, drops one direction of
//! some links, splits the cluster into a minority and a majority, wipes a server's data
//! directory (it restarts empty and must catch up before it votes, DESIGN rule 10), and restarts
//! the whole cluster. At the end everything heals, every key is read back, and the
//! whole history must pass the linearizability checker.
//!
//! CI runs a bounded campaign per cluster size; a long one runs by hand:
//! `KVRAFT_CAMPAIGN_SECS=600 KVRAFT_SEED=42 cargo test --release --test e2e campaign -- --nocapture`

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvraft_checker::{check, summarize, CheckResult, HistoryRecorder, Input, OpResult, Output};
use kvraft_proto::FaultRequest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::Cluster;

const KEYS: usize = 6;
const CLIENTS: u64 = 4;
/// Campaign length when KVRAFT_CAMPAIGN_SECS is not set: a few seconds per cluster size keeps
/// CI well under its budget.
const DEFAULT_SECS: u64 = 12;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn seed() -> u64 {
    env_u64("KVRAFT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_3_servers() {
    campaign(3, seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_5_servers() {
    campaign(5, seed().wrapping_add(1)).await;
}

/// One client's loop: random puts (unique values) and gets on a few keys, and
/// compare-and-swaps, deletes and scans on others (see [`txn_step`]), each recorded.
async fn client_loop(
    client: kvslib::Client,
    recorder: HistoryRecorder,
    me: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ me);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("key{}", rng.random_range(0..KEYS));
        let other = rng.random_range(0..100u32);
        if other < 25 {
            n += 1;
            txn_step(&client, &recorder, me, n, &mut rng).await;
            continue;
        }
        if rng.random_bool(0.5) {
            n += 1;
            let value = format!("c{me}-{n}");
            let id = recorder.invoke(me, Input::put(key.clone(), value.clone()));
            let result = match client.put(key, value).await {
                Ok(o) => OpResult::Ok(Output::put_version(o.version)),
                Err(e) if e.is_definite() => OpResult::Failed,
                Err(_) => OpResult::Unknown,
            };
            recorder.complete(id, result);
        } else {
            let id = recorder.invoke(me, Input::get(key.clone()));
            let result = match client.get_versioned(key).await {
                Ok(Some(v)) => OpResult::Ok(Output::found(v.value, v.version)),
                Ok(None) => OpResult::Ok(Output::absent()),
                Err(e) if e.is_definite() => OpResult::Failed,
                Err(_) => OpResult::Unknown,
            };
            recorder.complete(id, result);
        }
    }
}

/// Keys of the compare-and-swaps, deletes and scans (the puts and gets use the others).
const TXN_KEYS: [&str; 3] = ["t0", "t1", "t2"];

/// One compare-and-swap (from the version a get just saw), delete or scan on [`TXN_KEYS`],
/// each recorded for the checker (the get too).
async fn txn_step(
    client: &kvslib::Client,
    recorder: &HistoryRecorder,
    me: u64,
    n: u64,
    rng: &mut StdRng,
) {
    use kvraft_checker::{Compare, CompareOp, TxnOp, TxnOpOutput};
    let key = TXN_KEYS[rng.random_range(0..TXN_KEYS.len())];
    let outcome = |r: Result<OpResult, kvslib::Error>| match r {
        Ok(r) => r,
        Err(e) if e.is_definite() => OpResult::Failed,
        Err(_) => OpResult::Unknown,
    };
    match rng.random_range(0..10u32) {
        0..=5 => {
            let id = recorder.invoke(me, Input::get(key));
            let seen = client.get_versioned(key).await;
            let version = seen
                .as_ref()
                .ok()
                .map(|v| v.as_ref().map_or(0, |v| v.version));
            recorder.complete(
                id,
                outcome(seen.map(|v| {
                    OpResult::Ok(v.map_or(Output::absent(), |v| Output::found(v.value, v.version)))
                })),
            );
            let Some(version) = version else { return };
            let value = format!("c{me}-t{n}");
            let input = Input::txn(
                vec![Compare::version(key, CompareOp::Equal, version)],
                vec![TxnOp::put(key, value.clone())],
                vec![TxnOp::get(key)],
            );
            let id = recorder.invoke(me, input);
            let result = client.cas(key, version, value).await.map(|c| {
                OpResult::Ok(match c {
                    kvslib::CasOutcome::Swapped(p) => {
                        Output::txn(true, vec![TxnOpOutput::put_version(p.version)])
                    }
                    kvslib::CasOutcome::Failed { current } => Output::txn(
                        false,
                        vec![current.map_or(TxnOpOutput::absent(), |v| {
                            TxnOpOutput::found(v.value, v.version)
                        })],
                    ),
                })
            });
            recorder.complete(id, outcome(result));
        }
        6..=7 => {
            let id = recorder.invoke(me, Input::delete(key));
            let result = client
                .delete(key)
                .await
                .map(|existed| OpResult::Ok(Output::deleted(existed)));
            recorder.complete(id, outcome(result));
        }
        _ => {
            let id = recorder.invoke(me, Input::scan("t", "u"));
            let result = client.range("t", "u", 0, false).await.map(|page| {
                OpResult::Ok(Output::scan(
                    page.kvs
                        .into_iter()
                        .map(|kv| (kv.key, kv.value.value, kv.value.version)),
                ))
            });
            recorder.complete(id, outcome(result));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillLeader,
    KillFollower,
    PauseLeader,
    PauseServer,
    CutLeaderFromCoord,
    IsolateLeaderFromPeers,
    OneWayDrop,
    SplitMinority,
    KillCoord,
    RestartAll,
    WipeServer,
}

const FAULTS: [Fault; 11] = [
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::PauseLeader,
    Fault::PauseServer,
    Fault::CutLeaderFromCoord,
    Fault::IsolateLeaderFromPeers,
    Fault::OneWayDrop,
    Fault::SplitMinority,
    Fault::KillCoord,
    Fault::RestartAll,
    Fault::WipeServer,
];

async fn campaign(n: usize, seed: u64) {
    let secs = env_u64("KVRAFT_CAMPAIGN_SECS").unwrap_or(DEFAULT_SECS);
    eprintln!("campaign: servers {n}, KVRAFT_SEED={seed}, KVRAFT_CAMPAIGN_SECS={secs}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(n);
    cluster.wait_leader(|_| true).await;
    let recorder = HistoryRecorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = kvslib::Client::connect(&cluster.config, &format!("camp{c}"))
            .await
            .unwrap();
        let (recorder, stop) = (recorder.clone(), stop.clone());
        tasks.push(tokio::spawn(client_loop(client, recorder, c, seed, stop)));
    }

    let mut schedule: Vec<(u128, Fault, Vec<u32>, u64)> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let fault = FAULTS[rng.random_range(0..FAULTS.len())];
        let hold_ms = rng.random_range(200..1500);
        let (fault, targets) = inject(&mut cluster, &mut rng, fault).await;
        schedule.push((
            started.elapsed().as_millis(),
            fault,
            targets.clone(),
            hold_ms,
        ));
        tracing::info!("--- {fault:?} on {targets:?} for {hold_ms} ms");
        // The fault lasts this long by design (the schedule, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        heal(&mut cluster, fault, &targets).await;
        let gap_ms = rng.random_range(100..800);
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
    }

    tracing::info!("--- healed; writes must make progress again");
    cluster.wait_leader(|_| true).await;
    let before = recorder.history().len();
    Cluster::wait_for("client operations to continue", || {
        let len = recorder.history().len();
        async move { len >= before + 40 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    tracing::info!("--- final reads of every key, then the checker");
    let reader = kvslib::Client::connect(&cluster.config, "final")
        .await
        .unwrap();
    for k in 0..KEYS {
        let key = format!("key{k}");
        let id = recorder.invoke(CLIENTS, Input::get(key.clone()));
        let v = reader.get_versioned(key).await.expect("final read");
        let out = match v {
            Some(v) => Output::found(v.value, v.version),
            None => Output::absent(),
        };
        recorder.complete(id, OpResult::Ok(out));
    }
    let id = recorder.invoke(CLIENTS, Input::scan("t", "u"));
    let page = reader.range("t", "u", 0, false).await.expect("final scan");
    let out = Output::scan(
        page.kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value.value, kv.value.version)),
    );
    recorder.complete(id, OpResult::Ok(out));
    reader.close().await;
    let history = recorder.history();
    let acked_txns = history
        .iter()
        .filter(|o| {
            matches!(o.input, Input::Txn { .. } | Input::Delete { .. })
                && matches!(o.result, OpResult::Ok(_))
        })
        .count();
    let acked_writes = history
        .iter()
        .filter(|o| matches!(o.input, Input::Put { .. }) && matches!(o.result, OpResult::Ok(_)))
        .count();
    let mut by_kind: BTreeMap<Fault, usize> = BTreeMap::new();
    for (_, f, _, _) in &schedule {
        *by_kind.entry(*f).or_default() += 1;
    }
    let result = check(&history);
    let violations = usize::from(matches!(result, CheckResult::Violation(_)));
    eprintln!(
        "campaign: seed {seed}, servers {n}, secs {secs}, operations {}, faults {by_kind:?}, \
         acknowledged writes checked {acked_writes}, compare-and-swaps and deletes {acked_txns}, \
         violations {violations}",
        history.len()
    );
    match result {
        CheckResult::Linearizable => {}
        other => panic!(
            "seed {seed}: {}\nfault schedule (ms, fault, targets, hold ms): {schedule:?}\n{}",
            summarize(&other),
            match &other {
                CheckResult::Violation(v) => v.to_string(),
                _ => String::new(),
            }
        ),
    }
}

/// Starts `fault` (or, when its precondition does not hold, a milder one); returns the fault
/// started and the servers it touched.
async fn inject(cluster: &mut Cluster, rng: &mut StdRng, fault: Fault) -> (Fault, Vec<u32>) {
    let targets = match fault {
        Fault::WipeServer if !all_up_and_voting(cluster).await => {
            // One lost disk at a time, with every other server up and a voter: losing more at
            // once may leave no majority with its data, which is unavailability by design.
            let targets = start(cluster, rng, Fault::KillFollower).await;
            return (Fault::KillFollower, targets);
        }
        _ => start(cluster, rng, fault).await,
    };
    (fault, targets)
}

async fn start(cluster: &mut Cluster, rng: &mut StdRng, fault: Fault) -> Vec<u32> {
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let ids = cluster.ids();
    let follower = *ids
        .iter()
        .filter(|&&i| i != leader)
        .nth(
            rng.random_range(0..ids.len() - 1)
                .min(ids.len().saturating_sub(2)),
        )
        .unwrap_or(&leader);
    let any = ids[rng.random_range(0..ids.len())];
    match fault {
        Fault::KillLeader => {
            cluster.kill_server(leader);
            vec![leader]
        }
        Fault::KillFollower => {
            cluster.kill_server(follower);
            vec![follower]
        }
        Fault::PauseLeader => {
            cluster.signal_server(leader, "STOP");
            vec![leader]
        }
        Fault::PauseServer => {
            cluster.signal_server(any, "STOP");
            vec![any]
        }
        Fault::CutLeaderFromCoord => {
            let cut = FaultRequest {
                partition_coord_ms: 60_000,
                ..FaultRequest::default()
            };
            cluster.set_faults(leader, cut).await;
            vec![leader]
        }
        Fault::IsolateLeaderFromPeers => {
            let cut = FaultRequest {
                partition_peers: ids.iter().copied().filter(|&i| i != leader).collect(),
                partition_peers_ms: 60_000,
                ..FaultRequest::default()
            };
            cluster.set_faults(leader, cut).await;
            vec![leader]
        }
        Fault::OneWayDrop => {
            // What `any` sends to some peers is lost; it still hears them.
            let peers: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|&i| i != any && rng.random_bool(0.6))
                .collect();
            let drop = FaultRequest {
                partition_peers: peers,
                partition_peers_ms: 60_000,
                one_way: true,
                ..FaultRequest::default()
            };
            cluster.set_faults(any, drop).await;
            vec![any]
        }
        Fault::SplitMinority => {
            let mut shuffled = ids.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.random_range(0..=i));
            }
            let minority: Vec<u32> = shuffled[..ids.len() / 2].to_vec();
            for &m in &minority {
                let others: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|i| !minority.contains(i))
                    .collect();
                let split = FaultRequest {
                    partition_coord_ms: 60_000,
                    partition_peers: others,
                    partition_peers_ms: 60_000,
                    ..FaultRequest::default()
                };
                cluster.set_faults(m, split).await;
            }
            minority
        }
        Fault::KillCoord => {
            cluster.kill_coord();
            Vec::new()
        }
        Fault::RestartAll => {
            for id in ids.clone() {
                cluster.kill_server(id);
            }
            ids
        }
        Fault::WipeServer => {
            cluster.kill_server(any);
            cluster.wipe_data_dir(any);
            vec![any]
        }
    }
}

/// Every server runs and none is catching up after a lost disk.
async fn all_up_and_voting(cluster: &Cluster) -> bool {
    for id in cluster.ids() {
        if !cluster.is_running(id) {
            return false;
        }
        let status = cluster.status(id).await;
        if status.is_none_or(|s| s.report.is_none_or(|r| r.catching_up)) {
            return false;
        }
    }
    true
}

async fn heal(cluster: &mut Cluster, fault: Fault, targets: &[u32]) {
    match fault {
        Fault::KillLeader | Fault::KillFollower | Fault::RestartAll | Fault::WipeServer => {
            for &id in targets {
                cluster.start_server(id);
            }
        }
        Fault::PauseLeader | Fault::PauseServer => {
            for &id in targets {
                cluster.signal_server(id, "CONT");
            }
        }
        Fault::CutLeaderFromCoord
        | Fault::IsolateLeaderFromPeers
        | Fault::OneWayDrop
        | Fault::SplitMinority => {
            for &id in targets {
                if cluster.is_running(id) {
                    cluster.set_faults(id, FaultRequest::default()).await;
                }
            }
        }
        Fault::KillCoord => cluster.start_coord(),
    }
}
