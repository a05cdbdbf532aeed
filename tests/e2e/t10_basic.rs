//! Basic operations through the `client` binary and through kvslib.

use serde_json::Value;

use crate::harness::{stdout, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_and_missing_key_through_binary_and_library() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    tracing::info!("--- client binary: put, get, missing key");
    stdout(&cluster.client("1", &["put", "alpha", "one"]));
    assert_eq!(
        stdout(&cluster.client("2", &["get", "alpha"])).trim(),
        "one"
    );
    assert_eq!(
        stdout(&cluster.client("2", &["get", "nope"])).trim(),
        "(not found)"
    );

    tracing::info!("--- kvslib: the binary's write is visible, versions count puts");
    let client = kvslib::Client::connect(&cluster.config, "lib")
        .await
        .unwrap();
    assert_eq!(client.get("alpha").await.unwrap(), Some(b"one".to_vec()));
    assert_eq!(client.get("missing").await.unwrap(), None);
    let first = client.put("beta", "x").await.unwrap();
    let second = client.put("beta", "y").await.unwrap();
    assert_eq!((first.version, second.version), (1, 2));
    assert!(second.index > first.index);
    let v = client.get_versioned("beta").await.unwrap().unwrap();
    assert_eq!((v.value, v.version), (b"y".to_vec(), 2));

    tracing::info!("--- leader command matches the coord's view");
    let text = stdout(&cluster.client("1", &["leader"]));
    let expected = format!(
        "{{\"Leader-UUID\": \"{}\", \"Leader-Id\": {}, \"Term\": {}}}",
        leader.leader_uuid, leader.leader_id, leader.term
    );
    assert_eq!(text.trim(), expected);
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["Leader-Id"], leader.leader_id);
    assert_eq!(json["Leader-UUID"], leader.leader_uuid.as_str());
    assert_eq!(json["Term"], leader.term);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_workload_runs_twenty_puts_and_gets() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    let text = stdout(&cluster.client("1", &[]));
    for i in 0..20 {
        assert!(text.contains(&format!("Put(k{i}, val{i})")), "{text}");
        assert!(text.contains(&format!("Get(k{i}) -> val{i}")), "{text}");
    }
    let client = kvslib::Client::connect(&cluster.config, "check")
        .await
        .unwrap();
    for i in 0..20 {
        let v = client.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, Some(format!("val{i}").into_bytes()));
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_writes_request_records() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    let out_file = cluster.dir.path().join("write.json");
    let out = cluster.client(
        "1",
        &[
            "run",
            "--op",
            "write",
            "--key-prefix",
            "key",
            "--value-prefix",
            "value",
            "--count",
            "7",
            "--multi-key",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    stdout(&out);
    let json: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    let records = json["write"].as_array().expect("a write array");
    assert_eq!(records.len(), 7);
    for r in records {
        assert_eq!(r["Response"]["Status"], 0, "{r}");
        assert_eq!(r["Response"]["Validate"], true, "{r}");
        assert!(r["Req_resolved_time"].as_u64().is_some(), "{r}");
        let ts = r["Request"]["Request_timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'), "RFC 3339 UTC: {ts}");
    }
    let out = cluster.client(
        "2",
        &[
            "run",
            "--op",
            "read",
            "--key-prefix",
            "key",
            "--value-prefix",
            "value",
            "--count",
            "7",
            "--multi-key",
            "--sequential",
        ],
    );
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let records = json["read"].as_array().expect("a read array");
    assert_eq!(records.len(), 7);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["Request"]["Key"], format!("key{i}"));
        assert_eq!(r["Response"]["Response"], format!("value{i}"));
        assert_eq!(r["Response"]["Validate"], true, "{r}");
    }
    // A read expecting another value does not validate, and the exit status says so.
    let out = cluster.client(
        "3",
        &[
            "run",
            "--op",
            "read",
            "--key-prefix",
            "key",
            "--value-prefix",
            "other",
        ],
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["read"][0]["Response"]["Validate"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_prints_figures() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args([
            "--ops",
            "300",
            "--concurrency",
            "8",
            "--read-fraction",
            "0.5",
            "--connections",
            "2",
            "--warmup-secs",
            "1",
            "--json",
        ])
        .arg(cluster.dir.path().join("bench.json"))
        .output()
        .expect("run bench");
    let text = stdout(&out);
    assert!(text.contains("bench: ops 300, errors 0"), "{text}");
    assert!(text.contains("ops/s") && text.contains("get p50"), "{text}");
    assert!(text.contains("p99.9") && text.contains("max"), "{text}");
    let json = std::fs::read_to_string(cluster.dir.path().join("bench.json")).unwrap();
    let json: Value = serde_json::from_str(&json).expect("bench JSON");
    // The warm-up's operations are not among the 300 measured.
    assert_eq!(json["ops"], 300);
    assert_eq!(
        (json["connections"].as_u64(), json["warmup_s"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(json["throughput_ops_s"].as_f64().unwrap() > 0.0, "{json}");
    let puts = json["put_ms"]["count"].as_u64().unwrap();
    let gets = json["get_ms"]["count"].as_u64().unwrap();
    assert_eq!(puts + gets, 300, "{json}");
    assert!(json["put_ms"]["p99.9"].as_f64().unwrap() <= json["put_ms"]["max"].as_f64().unwrap());
    assert_eq!(json["system"], "kvraft");

    // The etcd backend names an endpoint it cannot reach (nothing listens on port 1).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--etcd", "127.0.0.1:1", "--ops", "1"])
        .output()
        .expect("run bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot connect to etcd at 127.0.0.1:1"),
        "{err}"
    );

    tracing::info!("--- soak mode: every server's memory and disk use, from Admin.Status");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args([
            "--secs",
            "2",
            "--report-every-secs",
            "1",
            "--concurrency",
            "4",
        ])
        .output()
        .expect("run bench");
    let text = stdout(&out);
    let soak: Vec<&str> = text.lines().filter(|l| l.starts_with("soak: ")).collect();
    assert!(soak.len() >= 2, "{text}");
    let last = soak.last().unwrap();
    for id in cluster.ids() {
        assert!(last.contains(&format!("s{id} rss ")), "{last}");
    }
    assert!(
        last.contains(" log ") && last.contains(" state ") && last.contains(" snapshot "),
        "{last}"
    );
    assert!(!last.contains("rss 0 MB"), "{last}");
}

/// `bench --failover`: starts the config's cluster itself (the demo binary's roles), kills
/// the leader in each trial, reports the gap and the time to the first acknowledged write, and
/// stops what it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_failover_mode_reports_each_trial() {
    let cluster = Cluster::new(3);
    let json_path = cluster.dir.path().join("failover.json");
    let json_arg = json_path.display().to_string();
    let text = bench_failover(
        &cluster,
        &["--failover", "2", "--json", &json_arg],
        "bench-logs",
    )
    .await;
    assert!(text.contains("failover trial 2: killed server"), "{text}");
    assert!(
        text.contains("failover: trials 2, longest gap median"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let gaps = json["longest_gap_ms"].as_array().unwrap();
    let firsts = json["kill_to_first_ack_ms"].as_array().unwrap();
    assert_eq!((gaps.len(), firsts.len()), (2, 2), "{json}");
    for (gap, first) in gaps.iter().zip(firsts) {
        assert!(
            gap.as_f64().unwrap() >= first.as_f64().unwrap() - 1.0,
            "{json}"
        );
    }

    tracing::info!("--- --hang: the leader is stopped (SIGSTOP), not killed, then continued");
    let text = bench_failover(&cluster, &["--failover", "1", "--hang"], "bench-logs-hang").await;
    assert!(text.contains("failover trial 1: hung server"), "{text}");
}

/// Runs `bench` with `args` on the cluster's config (logs under `log_dir` in its directory),
/// checks it succeeded and that what it started is gone (the servers' ports can be bound
/// again), and returns its output.
async fn bench_failover(cluster: &Cluster, args: &[&str], log_dir: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args(args)
        .arg("--log-dir")
        .arg(cluster.dir.path().join(log_dir))
        .output()
        .expect("run bench");
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in &cluster.config.servers {
        Cluster::wait_for("the failover cluster's ports to be free", || {
            let addr = s.addr.clone();
            async move { std::net::TcpListener::bind(addr).is_ok() }
        })
        .await;
    }
    text
}

/// `client status`: one row per server and the coord's view, as a table or JSON; it registers
/// no session (the log does not grow), and a stopped server shows as down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_server_without_writing() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    // The coord names the leader before its no-op commits: wait for that write first.
    Cluster::wait_for("the leader's no-op to apply", || async {
        cluster
            .status(leader)
            .await
            .is_some_and(|s| s.last_applied >= 1)
    })
    .await;
    let before = cluster.status(leader).await.unwrap().last_applied;
    let out = cluster.client("ops", &["status"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("leader {leader}")), "{text}");
    assert!(
        text.contains("LOG MB") && text.contains("STATE MB"),
        "{text}"
    );
    let rows: Vec<&str> = text.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(
        rows.iter().filter(|r| r.contains(" leader ")).count(),
        1,
        "{text}"
    );
    let out = cluster.client("ops", &["status", "-o", "json"]);
    let json: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(json["coord"]["leader_id"], leader);
    let servers = json["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3);
    assert!(
        servers
            .iter()
            .all(|s| s["up"] == true && s["lag"].is_u64() && s["state_bytes"].as_u64() > Some(0)),
        "{json}"
    );
    assert!(servers.iter().all(|s| s["coord_sees"] == "up"), "{json}");
    assert!(text.contains("COORD SEES"), "{text}");
    assert_eq!(
        cluster.status(leader).await.unwrap().last_applied,
        before,
        "nothing written"
    );
    let out = cluster.client("ops", &["get", "absent"]);
    assert_eq!(stdout(&out).trim(), "(not found)");
    let after = cluster.status(leader).await.unwrap().last_applied;
    assert_eq!(after, before, "a get registers no session either");

    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    cluster.kill_server(follower);
    let out = cluster.client("ops", &["status", "-o", "json"]);
    assert!(
        !out.status.success(),
        "a down server makes the exit status non-zero"
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    let down: Vec<&Value> = json["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["up"] == false)
        .collect();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0]["id"], follower);
    // The coord's own view follows once its failure timeout has passed.
    Cluster::wait_for("the coord sees the stopped follower down", || {
        let out = cluster.client("ops", &["status", "-o", "json"]);
        async move {
            let json: Value = serde_json::from_slice(&out.stdout).expect("json");
            json["servers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"] == follower && s["coord_sees"] == "down")
        }
    })
    .await;
}
