//! Inputs a user can get wrong get a clear error naming what is wrong: config files, server
//! ids, ports in use, oversized keys and values, a corrupt data directory (DESIGN rule 9).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, WAIT};

/// Runs a binary that is expected to exit by itself; kills it (and fails) after [`WAIT`].
fn run_to_exit(exe: &str, args: &[&str]) -> Output {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{exe} {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr_of(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure exit status");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn server_id_not_in_config_is_named() {
    let cluster = Cluster::new(3);
    let config = cluster.config_path.to_str().unwrap();
    let out = run_to_exit(env!("CARGO_BIN_EXE_server"), &["9", "--config", config]);
    let err = stderr_of(&out);
    assert!(err.contains("server id 9 is not in the config"), "{err}");
    assert!(err.contains("1, 2, 3"), "{err}");
}

#[test]
fn port_in_use_names_the_address_and_key() {
    let cluster = Cluster::new(1);
    let addr = cluster.addr(1);
    let _holder = std::net::TcpListener::bind(&addr).expect("hold the port");
    let config = cluster.config_path.to_str().unwrap();
    let out = run_to_exit(env!("CARGO_BIN_EXE_server"), &["1", "--config", config]);
    let err = stderr_of(&out);
    assert!(
        err.contains(&addr) && err.contains("servers[0].addr"),
        "{err}"
    );
}

#[test]
fn invalid_config_files_name_file_key_and_problem() {
    let cluster = Cluster::new(3);
    let text = std::fs::read_to_string(&cluster.config_path).unwrap();
    let cases = [
        (
            text.replace("failure_timeout_ms = 400", "failure_timeout_ms = 50"),
            "coord.failure_timeout_ms",
        ),
        (text.replace("id = 3", "id = 2"), "servers[2].id"),
        (text.replace("[coord]", "[coord]\nbogus = 1"), "bogus"),
        (
            text.clone() + "\n[[servers]]\nid = 4\naddr = \"127.0.0.1:1\"\ndata_dir = \"x\"\n",
            "odd number",
        ),
    ];
    for (i, (bad, expected)) in cases.iter().enumerate() {
        let path = cluster.dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, bad).unwrap();
        let p = path.to_str().unwrap();
        for (exe, args) in [
            (env!("CARGO_BIN_EXE_server"), vec!["1", "--config", p]),
            (env!("CARGO_BIN_EXE_coord"), vec!["--config", p]),
            (
                env!("CARGO_BIN_EXE_client"),
                vec!["1", "--config", p, "get", "k"],
            ),
        ] {
            let err = stderr_of(&run_to_exit(exe, &args));
            assert!(err.contains(p) && err.contains(expected), "{exe}: {err}");
        }
    }
    let missing = cluster.dir.path().join("missing.toml");
    let p = missing.to_str().unwrap();
    let err = stderr_of(&run_to_exit(env!("CARGO_BIN_EXE_coord"), &["--config", p]));
    assert!(err.contains(p), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_empty_keys_are_refused_before_sending() {
    // No cluster runs: the checks happen before any network traffic.
    let cluster = Cluster::new(1);
    let out = cluster.client("1", &["put", "", "v"]);
    let err = stderr_of(&out);
    assert!(err.contains("key is empty"), "{err}");
    let big_key = "k".repeat(kvslib::KEY_BYTES_MAX + 1);
    let err = stderr_of(&cluster.client("1", &["put", &big_key, "v"]));
    assert!(err.contains("key is") && err.contains("limit"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_record_refuses_start_and_torn_tail_is_truncated() {
    let mut cluster = Cluster::start(1);
    cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "disk")
        .await
        .unwrap();
    for i in 0..20 {
        client.put(format!("d{i}"), "x".repeat(100)).await.unwrap();
    }
    client.close().await;
    cluster.kill_server(1);
    let log = cluster.config.servers[0]
        .data_dir
        .join("wal")
        .join("seg-00000000000000000001.log");
    let good = std::fs::read(&log).unwrap();

    tracing::info!("--- a torn final record is cut off and the server starts");
    let mut torn = good.clone();
    torn.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
    std::fs::write(&log, &torn).unwrap();
    cluster.start_server(1);
    let client = kvslib::Client::connect(&cluster.config, "disk2")
        .await
        .unwrap();
    assert_eq!(
        client.get("d19").await.unwrap(),
        Some("x".repeat(100).into_bytes())
    );
    client.close().await;
    cluster.kill_server(1);

    tracing::info!(
        "--- a flipped byte in a middle record refuses to start, naming file and offset"
    );
    let mut bad = std::fs::read(&log).unwrap();
    // The segment goes on with preallocated zeros after its records (damage there is a torn
    // tail): the middle of what precedes them is inside a record.
    let records_end = bad.iter().rposition(|&b| b != 0).unwrap() + 1;
    let middle = records_end / 2;
    bad[middle] ^= 0xff;
    std::fs::write(&log, &bad).unwrap();
    let config = cluster.config_path.to_str().unwrap();
    let out = run_to_exit(env!("CARGO_BIN_EXE_server"), &["1", "--config", config]);
    let err = stderr_of(&out);
    assert!(
        err.contains("corrupt log file") && err.contains(log.to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("byte offset"), "{err}");
}

/// Garbage bytes on every gRPC port (server and both coord ports) are rejected without harm:
/// the processes keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_grpc_ports_does_not_harm_the_cluster() {
    use std::io::Write;
    let cluster = Cluster::start(3);
    cluster.wait_leader(|_| true).await;
    let mut addrs: Vec<String> = cluster.ids().iter().map(|&id| cluster.addr(id)).collect();
    addrs.push(cluster.config.coord.server_api_addr.clone());
    addrs.push(cluster.config.coord.client_api_addr.clone());
    let mut junk = Vec::new();
    for i in 0..4096u32 {
        junk.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    for addr in &addrs {
        for chunk in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &junk[..],
            &[0u8; 64][..],
        ] {
            let mut conn = std::net::TcpStream::connect(addr).expect("connect");
            let _ = conn.write_all(chunk);
        }
    }
    let client = kvslib::Client::connect(&cluster.config, "after-junk")
        .await
        .unwrap();
    client.put("still", "serving").await.unwrap();
    assert_eq!(
        client.get("still").await.unwrap(),
        Some(b"serving".to_vec())
    );
    client.close().await;
}

/// A data directory written by another server id is refused, naming the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_of_another_server_is_refused() {
    let mut cluster = Cluster::start(1);
    cluster.wait_leader(|_| true).await;
    cluster.kill_server(1);
    let dir = cluster.config.servers[0].data_dir.clone();
    // Point a three-server config's server 2 at server 1's directory.
    let text = std::fs::read_to_string(&cluster.config_path).unwrap();
    let ports = crate::harness::free_ports(2);
    let extra = format!(
        "\n[[servers]]\nid = 2\naddr = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\
         \n[[servers]]\nid = 3\naddr = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
        ports[0],
        dir.display(),
        ports[1],
        cluster.dir.path().join("s3").display()
    );
    let renamed = text.replace(
        &format!("data_dir = \"{}\"", dir.display()),
        &format!("data_dir = \"{}\"", cluster.dir.path().join("s1").display()),
    );
    let path = cluster.dir.path().join("swapped.toml");
    std::fs::write(&path, renamed + &extra).unwrap();
    let p = path.to_str().unwrap();
    let err = stderr_of(&run_to_exit(
        env!("CARGO_BIN_EXE_server"),
        &["2", "--config", p],
    ));
    assert!(err.contains("belongs to server 1, not server 2"), "{err}");
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
}

/// A data directory from another cluster (same server id) is refused: the server stops at its
/// first coord contact, naming the directory and both cluster ids; the coord counts it as down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_of_another_cluster_is_refused() {
    let mut a = Cluster::start(1);
    a.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&a.config, "a").await.unwrap();
    client.put("from", "cluster a").await.unwrap();
    client.close().await;
    a.kill_server(1);
    let mut b = Cluster::start(1);
    b.wait_leader(|_| true).await;
    b.kill_server(1);
    let from = a.config.servers[0].data_dir.clone();
    let to = b.config.servers[0].data_dir.clone();
    std::fs::remove_dir_all(&to).unwrap();
    copy_dir(&from, &to);
    b.start_server(1);
    let log_path = b.dir.path().join("server1.log");
    Cluster::wait_for("the server to refuse the foreign cluster's coord", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { log.contains("belongs to cluster") }
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains(to.to_str().unwrap()), "{log}");
    // Refused, not stopped: a message anyone can send must not be a remote kill switch. The
    // coord counts it as down, so cluster b has no leader, and the data of cluster a is intact.
    assert!(b.server_exited(1).is_none(), "the server keeps running");
    assert!(b.status(1).await.is_some(), "Status still answers");
    Cluster::wait_for("the coord to count the refusing server as failed", || {
        let b = &b;
        async move { b.leader_info().await.is_some_and(|l| l.leader_id == 0) }
    })
    .await;
}

/// Copies a data directory (its files and the log's segment directory).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
