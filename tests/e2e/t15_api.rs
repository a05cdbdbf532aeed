//! Deletes, compare-and-swap, transactions and range reads, through the `client` binary and
//! kvslib, including a leader kill in the middle of concurrent compare-and-swap increments.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvslib::{CasOutcome, CmpOp, Compare, Txn, TxnOp, TxnOpOutcome};
use serde_json::Value;

use crate::harness::{stdout, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cas_txn_and_scan_through_the_binary() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    for (k, v) in [
        ("app/a", "1"),
        ("app/b", "2"),
        ("app/c", "3"),
        ("other", "x"),
    ] {
        stdout(&cluster.client("w", &["put", k, v]));
    }

    tracing::info!("--- scan by prefix, by range, keys only, JSON, with a limit");
    let text = stdout(&cluster.client("r", &["scan", "app/", "--prefix"]));
    assert_eq!(text, "app/a\t1\napp/b\t2\napp/c\t3\n");
    let text = stdout(&cluster.client("r", &["scan", "app/b", "other"]));
    assert_eq!(text, "app/b\t2\napp/c\t3\n");
    let text = stdout(&cluster.client("r", &["scan", "a", "--keys-only", "--limit", "2"]));
    assert_eq!(text, "app/a\napp/b\n");
    let text = stdout(&cluster.client("r", &["scan", "other", "-o", "json"]));
    let row: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        (row["key"].as_str(), row["version"].as_u64()),
        (Some("other"), Some(1))
    );
    assert!(row["mod_revision"].as_u64().unwrap() >= row["create_revision"].as_u64().unwrap());

    tracing::info!("--- compare-and-swap: right version swaps, wrong one fails with exit 1");
    let out = cluster.client("w", &["cas", "app/a", "1", "10"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok (version 2"));
    let out = cluster.client("w", &["cas", "app/a", "1", "11"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "failed: current version 2"
    );
    let out = cluster.client("w", &["cas", "fresh", "0", "new"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&cluster.client("r", &["get", "fresh"])).trim(),
        "new"
    );

    tracing::info!("--- a transaction from stdin: a lock taken once, then refused");
    let lock = b"if lock version = 0\nthen put lock \"owner 1\"\nelse get lock\n";
    let out = cluster.client_with_stdin("w", &["txn"], lock);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("succeeded (revision "), "{text}");
    assert!(text.contains("put lock: version 1"), "{text}");
    let out = cluster.client_with_stdin("w", &["txn", "-o", "json"], lock);
    assert!(!out.status.success(), "a held lock is refused");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["succeeded"], false);
    assert_eq!(json["results"][0]["kv"]["value"], "owner 1");
    let bad = cluster.client_with_stdin("w", &["txn"], b"if lock size = 1\nthen get lock\n");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1"),
        "{bad:?}"
    );

    tracing::info!("--- delete one key, then a prefix");
    assert_eq!(
        stdout(&cluster.client("w", &["delete", "other"])).trim(),
        "deleted"
    );
    assert_eq!(
        stdout(&cluster.client("w", &["delete", "other"])).trim(),
        "(not found)"
    );
    assert_eq!(
        stdout(&cluster.client("w", &["delete", "app/", "--prefix"])).trim(),
        "deleted 3 keys"
    );
    assert_eq!(
        stdout(&cluster.client("r", &["scan", "app/", "--prefix"])),
        ""
    );
    assert_eq!(
        stdout(&cluster.client("r", &["get", "app/a"])).trim(),
        "(not found)"
    );

    tracing::info!("--- binary values from stdin");
    let out = cluster.client_with_stdin("w", &["put", "bin", "-"], &[0, 159, 255, 10]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&cluster.client("r", &["get", "bin", "-o", "json"]));
    let json: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(json["kv"]["value"]["hex"], "009fff0a");
}

/// Scans at a past revision: the range as it was then, whatever changed since; a revision not
/// applied yet, or one the server's history no longer holds, is refused with a message naming
/// the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_read_the_range_as_it_was_at_a_past_revision() {
    let mut cluster = Cluster::with_server_options(3, "watch_history_revisions = 8");
    cluster.start_all();
    cluster.wait_leader(|_| true).await;
    for (k, v) in [("app/a", "1"), ("app/b", "2")] {
        stdout(&cluster.client("w", &["put", k, v]));
    }
    let text = stdout(&cluster.client("r", &["get", "app/b", "-o", "json"]));
    let json: Value = serde_json::from_str(text.trim()).unwrap();
    let then = json["kv"]["mod_revision"].as_u64().unwrap().to_string();
    stdout(&cluster.client("w", &["put", "app/a", "changed"]));
    stdout(&cluster.client("w", &["delete", "app/b"]));
    stdout(&cluster.client("w", &["put", "app/c", "3"]));

    let now = stdout(&cluster.client("r", &["scan", "app/", "--prefix"]));
    assert_eq!(now, "app/a\tchanged\napp/c\t3\n");
    let past = stdout(&cluster.client("r", &["scan", "app/", "--prefix", "--rev", &then]));
    assert_eq!(past, "app/a\t1\napp/b\t2\n", "as at revision {then}");
    let text = stdout(&cluster.client(
        "r",
        &["scan", "app/", "--prefix", "--rev", &then, "-o", "json"],
    ));
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["version"], 1, "the counters as they were: {text}");
    assert_eq!(rows[1]["mod_revision"].as_u64().unwrap().to_string(), then);

    let future = cluster.client("r", &["scan", "app/", "--rev", "1000000"]);
    assert!(!future.status.success());
    let err = String::from_utf8_lossy(&future.stderr);
    assert!(err.contains("revision 1000000 is in the future"), "{err}");

    // More revisions than the history keeps (each run that writes registers a session too).
    for i in 0..6 {
        stdout(&cluster.client("w", &["put", "other", &i.to_string()]));
    }
    let old = cluster.client("r", &["scan", "app/", "--prefix", "--rev", &then]);
    assert!(!old.status.success());
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(
        err.contains(&format!("revision {then} is compacted")) && err.contains("from "),
        "{err}"
    );
}

/// One client with 256 puts in flight (kvslib carries several per call): every put is
/// answered, each applied once, in the time a few hundred puts take. A first version of the
/// batching waited for a free call before sending what queued, and hung here: calls waited for
/// earlier seqs that were queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_puts_in_flight_from_one_client_all_complete() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "many")
        .await
        .unwrap();
    // 256 tasks putting one after another, as an application's workers do: their puts reach
    // kvslib's queue in any order of seq.
    let workers = (0..256).map(|w| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut indexes = Vec::new();
            for i in 0..32 {
                let out = client.put(format!("many/{w}"), format!("v{i}")).await;
                indexes.push(out.expect("put").index);
            }
            indexes
        })
    });
    let all = futures_util::future::join_all(workers);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("8,192 puts at 256 in flight did not complete in 60 s");
    let mut indexes: Vec<u64> = results.into_iter().flat_map(|r| r.unwrap()).collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(
        indexes.len(),
        8_192,
        "each put applied once, at its own index"
    );
    client.close().await;
}

/// Several clients increment one counter by compare-and-swap (read the version, write
/// value + 1 if the version is unchanged) while the leader is killed and restarted. Every
/// write is a swap from the value it read, so the value always equals the version minus one,
/// and no acknowledged increment is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_increments_survive_a_leader_kill() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let config = cluster.client_config(Duration::from_secs(10));
    let setup = kvslib::Client::connect(&config, "setup").await.unwrap();
    setup.put("counter", "0").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapped = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..3 {
        let client = kvslib::Client::connect(&config, &format!("inc{w}"))
            .await
            .unwrap();
        let (stop, swapped, unknown) = (stop.clone(), swapped.clone(), unknown.clone());
        tasks.push(tokio::spawn(async move {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 10_000 {
                rounds += 1;
                let Ok(Some(current)) = client.get_versioned("counter").await else {
                    continue;
                };
                let n: u64 = String::from_utf8(current.value).unwrap().parse().unwrap();
                match client
                    .cas("counter", current.version, (n + 1).to_string())
                    .await
                {
                    Ok(CasOutcome::Swapped(out)) => {
                        assert_eq!(out.version, current.version + 1);
                        swapped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(CasOutcome::Failed { current: now }) => {
                        let now = now.expect("the counter is never deleted");
                        assert!(now.version > current.version, "a failed swap saw no change");
                    }
                    Err(_) => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            client.close().await;
        }));
    }
    let swaps = |n| {
        let swapped = swapped.clone();
        async move {
            Cluster::wait_for(&format!("{n} swaps"), || {
                let done = swapped.load(Ordering::Relaxed);
                async move { done >= n }
            })
            .await
        }
    };
    swaps(20).await;
    tracing::info!("--- SIGKILL the leader {} mid-increments", leader.leader_id);
    cluster.kill_server(leader.leader_id);
    let before = swapped.load(Ordering::Relaxed);
    swaps(before + 20).await;
    cluster.start_server(leader.leader_id);
    swaps(before + 40).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let v = setup.get_versioned("counter").await.unwrap().unwrap();
    let value: u64 = String::from_utf8(v.value).unwrap().parse().unwrap();
    assert_eq!(
        value + 1,
        v.version,
        "every write was a swap from the value read"
    );
    let (ok, maybe) = (
        swapped.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed),
    );
    assert!(
        value >= ok && value <= ok + maybe,
        "counter {value}: {ok} acknowledged swaps, {maybe} unknown"
    );

    tracing::info!("--- a multi-key transaction and a range read agree after the failover");
    let txn = Txn::new()
        .when(Compare::version("counter", CmpOp::Equal, v.version))
        .then(TxnOp::put("acct/a", "50"))
        .then(TxnOp::put("acct/b", "50"))
        .then(TxnOp::get("counter"));
    let out = setup.txn(txn).await.unwrap();
    assert!(out.succeeded);
    assert!(matches!(
        out.results[2],
        TxnOpOutcome::Get { value: Some(_), .. }
    ));
    let page = setup.range_prefix("acct/", 0, false).await.unwrap();
    let keys: Vec<_> = page.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"acct/a".to_vec(), b"acct/b".to_vec()]);
    assert!(page
        .kvs
        .iter()
        .all(|kv| kv.value.mod_revision == out.revision));
    assert!(page.revision >= out.revision);
    setup.close().await;
    cluster.wait_same_digest().await;
}

/// A watch of a prefix sees every acknowledged write to it exactly once, in revision order,
/// while the leader is killed and restarted under it; scans at past revisions hold what was
/// written by then; a second watch from a past revision replays the same changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_watch_follows_writes_through_a_leader_kill() {
    use kvslib::EventKind;
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let config = cluster.client_config(Duration::from_secs(10));
    let writer = kvslib::Client::connect(&config, "writer").await.unwrap();
    let reader = kvslib::Client::connect_without_session(&config, "watcher")
        .await
        .unwrap();
    let mut watch = reader.watch_prefix("cfg/", 0).unwrap();
    watch.start().await.unwrap();
    let first = watch.next_revision();
    let events = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let collector = {
        let events = events.clone();
        tokio::spawn(async move {
            loop {
                match watch.next().await {
                    Ok(e) => events.lock().await.push(e),
                    Err(e) => panic!("the watch ended: {e}"),
                }
            }
        })
    };
    use kvraft_checker::watch::{check_watch, Event, Write, WriteOutcome};
    let mut writes: Vec<Write> = Vec::new();
    for round in 0..3 {
        for i in 0..15 {
            let key = format!("cfg/{}", i % 4);
            if i % 5 == 4 {
                let delete = Txn::new().then(TxnOp::delete(key.clone()));
                let outcome = match writer.txn(delete).await {
                    Ok(out) => WriteOutcome::Acked {
                        revision: out.revision,
                        existed: matches!(out.results[0], TxnOpOutcome::Delete { deleted: 1, .. }),
                    },
                    Err(_) => WriteOutcome::Unknown,
                };
                writes.push(Write {
                    key: key.into_bytes(),
                    value: None,
                    outcome,
                });
                continue;
            }
            writer.put(format!("other/{i}"), "x").await.ok();
            let value = format!("r{round}.{i}");
            let outcome = match writer.put(key.clone(), value.clone()).await {
                Ok(out) => WriteOutcome::Acked {
                    revision: out.index,
                    existed: true,
                },
                Err(_) => WriteOutcome::Unknown,
            };
            writes.push(Write {
                key: key.into_bytes(),
                value: Some(value.into_bytes()),
                outcome,
            });
        }
        if round == 0 {
            tracing::info!("--- SIGKILL the leader {}", leader.leader_id);
            cluster.kill_server(leader.leader_id);
        }
        if round == 1 {
            cluster.start_server(leader.leader_id);
        }
    }
    let last = writes
        .iter()
        .filter_map(|w| match w.outcome {
            WriteOutcome::Acked { revision, .. } => Some(revision),
            WriteOutcome::Unknown => None,
        })
        .max()
        .unwrap();
    Cluster::wait_for("the watch reaches the last acknowledged write", || {
        let events = events.clone();
        async move {
            events
                .lock()
                .await
                .last()
                .is_some_and(|e| e.revision >= last)
        }
    })
    .await;
    collector.abort();
    let events = events.lock().await.clone();
    let checked: Vec<Event> = events
        .iter()
        .map(|e| Event {
            revision: e.revision,
            key: e.key.clone(),
            value: (e.kind == EventKind::Put).then(|| e.value.value.clone()),
        })
        .collect();
    let prefix = (&b"cfg/"[..], &b"cfg0"[..]);
    if let Err(e) = check_watch(&writes, &checked, prefix, first, last) {
        panic!("the watch through a leader kill: {e}");
    }
    assert!(
        events.iter().any(|e| e.kind == EventKind::Delete),
        "deletes of existing keys are watched"
    );
    assert!(events.iter().all(|e| e.value.mod_revision == e.revision));

    tracing::info!("--- scans at past revisions across the kill hold what was written by then");
    use kvraft_checker::watch::{check_scan_at, ScannedKey};
    let mut read_at = 0;
    for revision in (first.saturating_sub(1).max(1)..=last).step_by(3) {
        let page = match reader.range_at("cfg/", "cfg0", 0, false, revision).await {
            Ok(page) => page,
            // A leader that restarted holds only what it applied since.
            Err(kvslib::Error::Rejected(e)) if e.contains("compacted") => continue,
            Err(e) => panic!("scan at revision {revision}: {e}"),
        };
        assert_eq!(page.revision, revision);
        let kvs: Vec<ScannedKey> = page
            .kvs
            .iter()
            .map(|kv| ScannedKey {
                key: kv.key.clone(),
                value: kv.value.value.clone(),
                mod_revision: kv.value.mod_revision,
            })
            .collect();
        if let Err(e) = check_scan_at(&writes, prefix, revision, &kvs) {
            panic!("scan at revision {revision}: {e}");
        }
        read_at += 1;
    }
    assert!(read_at > 0, "no past revision was readable");

    tracing::info!("--- a watch from the first revision replays the same changes");
    let mut again = reader.watch_prefix("cfg/", first).unwrap();
    for expected in &events {
        let e = again.next().await.unwrap();
        assert_eq!(&e, expected);
    }
    writer.close().await;
    reader.close().await;
}

/// Every process serves Prometheus text on its metrics address: request counts and
/// latencies, fsync figures, indexes, the leader's per-follower lag, the coord's view; a
/// leader kill shows as leader changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_follow_a_failover() {
    use std::collections::BTreeMap;
    fn parse(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_string(), value.parse::<f64>().expect("a number"))
            })
            .collect()
    }
    let mut cluster = Cluster::with_metrics(3);
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "m").await.unwrap();
    for i in 0..20 {
        client.put(format!("k{i}"), "v").await.unwrap();
    }
    client.get("k1").await.unwrap();
    let mut watch = client.watch_prefix("k", 0).unwrap();
    watch.start().await.unwrap();
    let text = Cluster::scrape(&cluster.metrics_addr(leader.leader_id))
        .await
        .expect("the leader serves metrics");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let m = parse(&text);
    assert!(m["kvraft_requests_total{op=\"put\"}"] >= 20.0, "{text}");
    assert!(m["kvraft_request_duration_seconds_count{op=\"put\"}"] >= 20.0);
    assert!(m["kvraft_requests_total{op=\"get\"}"] >= 1.0);
    assert_eq!(m["kvraft_is_leader"], 1.0);
    assert!(m["kvraft_applied_index"] >= 21.0);
    assert!(m["kvraft_log_fsync_duration_seconds_count"] >= 1.0);
    assert!(m["kvraft_sessions_open"] >= 1.0);
    assert_eq!(m["kvraft_requests_total{op=\"watch\"}"], 1.0);
    assert_eq!(m["kvraft_watches_open"], 1.0);
    assert!(
        m["kvraft_entries_replicated_total"] >= 2.0 * 21.0,
        "to both followers"
    );
    assert!(m["kvraft_replicated_bytes_total"] > 0.0);
    let lags: Vec<_> = m
        .keys()
        .filter(|k| k.starts_with("kvraft_follower_lag_entries{"))
        .collect();
    assert_eq!(lags.len(), 2, "one lag per follower: {lags:?}");
    let coord = Cluster::scrape(cluster.config.coord.metrics_addr.as_ref().unwrap())
        .await
        .expect("the coord serves metrics");
    let c = parse(&coord);
    assert_eq!(c["kvraft_coord_leader_id"], f64::from(leader.leader_id));
    assert_eq!(c["kvraft_coord_servers_alive"], 3.0);
    assert!(c["kvraft_coord_heartbeats_sent_total"] > 0.0);
    assert!(c["kvraft_coord_epoch_changes_total"] >= 1.0);
    let changes_before = c["kvraft_coord_leader_changes_total"];

    tracing::info!("--- SIGKILL the leader: the coord counts a new leader");
    cluster.kill_server(leader.leader_id);
    let new = cluster
        .wait_leader(|l| l.leader_id != leader.leader_id)
        .await;
    client.put("after", "v").await.unwrap();
    let c = parse(
        &Cluster::scrape(cluster.config.coord.metrics_addr.as_ref().unwrap())
            .await
            .unwrap(),
    );
    assert!(c["kvraft_coord_leader_changes_total"] > changes_before);
    assert_eq!(c["kvraft_coord_leader_id"], f64::from(new.leader_id));
    let m = parse(
        &Cluster::scrape(&cluster.metrics_addr(new.leader_id))
            .await
            .unwrap(),
    );
    assert_eq!(m["kvraft_is_leader"], 1.0);
    assert!(m["kvraft_leader_changes_total"] >= 2.0);
    assert!(Cluster::scrape(&cluster.metrics_addr(leader.leader_id))
        .await
        .is_none());
    client.close().await;
}
