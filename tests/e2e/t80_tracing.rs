//! Vector-clock tracing on a real cluster (DESIGN section 5): a tracing-server process, three
//! servers, the coord and a kvslib client, with a leader SIGKILLed mid-run and restarted, and
//! at the end a follower SIGKILLed for good (its last events reach the log only through its
//! spool file, which the tracing server reads). The
//! ShiViz log is then read as ShiViz reads it and checked: every host's counter rises by one
//! per event from 1, every clock names only events that exist and are in its past, and one
//! put's events are causally ordered client -> leader -> followers -> leader -> client.
//! A second test checks, against a tracing server that stores nothing, that every answer a
//! server sends (a put alone, batches of puts and gets) leaves only once the events its token
//! covers are in the server's spool.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvraft_proto as pb;
use kvraft_proto::kv_client::KvClient;
use kvraft_tracing::shiviz::{self, Event};
use prost::bytes::Bytes;

use crate::harness::{free_ports, Cluster, WAIT};

/// The tracing-server process; SIGKILLed if the test fails before stopping it.
struct TracingServer(Option<Child>);

impl TracingServer {
    fn start(config: &std::path::Path, log: &std::path::Path) -> TracingServer {
        let out = std::fs::File::create(log).expect("tracing server log");
        let child = Command::new(env!("CARGO_BIN_EXE_tracing-server"))
            .args(["--config", &config.display().to_string(), "--fresh"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .expect("start tracing-server");
        TracingServer(Some(child))
    }

    /// SIGTERM, then wait: the server flushes and fsyncs its logs before exiting.
    fn stop(&mut self) {
        let mut child = self.0.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "tracing-server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TracingServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn find<'a>(events: &'a [Event], host: &str, tag: &str, trace: u64) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.tag == tag && e.trace_id == trace && (host.is_empty() || e.host == host))
        .collect()
}

/// The client's `Put` event of `key`.
fn put_of<'a>(events: &'a [Event], key: &str) -> &'a Event {
    events
        .iter()
        .find(|e| e.host == "client1" && e.tag == "Put" && e.body["Key"] == key)
        .unwrap_or_else(|| panic!("no Put of {key} in the log"))
}

/// Client Put -> leader PutRecvd -> followers' AppendEntriesRequestRecvd (a majority before
/// the commit) -> leader PutCommitted -> client PutResultRecvd, all on the put's trace id.
/// Returns the leader's host name.
fn check_put_story(events: &[Event], key: &str) -> String {
    let put = put_of(events, key);
    let t = put.trace_id;
    let recvd = find(events, "", "PutRecvd", t);
    let committed = find(events, "", "PutCommitted", t);
    assert_eq!(committed.len(), 1, "{key}: one PutCommitted");
    let committed = committed[0];
    let leader = committed.host.clone();
    let recvd = recvd
        .into_iter()
        .find(|e| e.host == leader)
        .unwrap_or_else(|| panic!("{key}: no PutRecvd on {leader}"));
    let result = find(events, "client1", "PutResultRecvd", t);
    assert_eq!(result.len(), 1, "{key}: one PutResultRecvd");
    assert!(put.happens_before(recvd), "{key}: Put -> PutRecvd");
    assert!(
        recvd.happens_before(committed),
        "{key}: PutRecvd -> PutCommitted"
    );
    assert!(
        committed.happens_before(result[0]),
        "{key}: PutCommitted -> PutResultRecvd"
    );
    let appends: Vec<&Event> = find(events, "", "AppendEntriesRequestRecvd", t)
        .into_iter()
        .filter(|e| e.host != leader)
        .collect();
    assert!(
        !appends.is_empty(),
        "{key}: no follower received the entry on the put's trace"
    );
    for a in &appends {
        assert!(
            recvd.happens_before(a),
            "{key}: PutRecvd -> {} AppendEntriesRequestRecvd",
            a.host
        );
    }
    // Majority of 3: the leader and at least one follower stored the entry before the commit.
    assert!(
        appends.iter().any(|a| a.happens_before(committed)),
        "{key}: no follower's AppendEntriesRequestRecvd happens-before PutCommitted"
    );
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shiviz_log_of_a_run_with_failover_is_valid_and_causal() {
    let port = free_ports(1)[0];
    let tmp = tempfile::tempdir().unwrap();
    let (json, shiviz_path, spool) = (
        tmp.path().join("trace_output.log"),
        tmp.path().join("shiviz_output.log"),
        tmp.path().join("trace-spool"),
    );
    let tracing_section = format!(
        "\n[tracing]\nenabled = true\nserver_addr = \"127.0.0.1:{port}\"\noutput_file = \"{}\"\n\
         shiviz_output_file = \"{}\"\nspool_dir = \"{}\"\n",
        json.display(),
        shiviz_path.display(),
        spool.display()
    );
    let mut cluster = Cluster::with_coord_options(3, &tracing_section);
    assert!(cluster.config.tracing.enabled);
    let mut tracer =
        TracingServer::start(&cluster.config_path, &tmp.path().join("tracing-server.log"));
    cluster.start_all();
    let first = cluster.wait_leader(|_| true).await;

    tracing::info!("--- puts and gets with tracing on");
    let client = kvslib::Client::connect(&cluster.config, "client1")
        .await
        .unwrap();
    for i in 0..5 {
        client.put(format!("k{i}"), format!("v{i}")).await.unwrap();
        assert_eq!(
            client.get(format!("k{i}")).await.unwrap(),
            Some(format!("v{i}").into_bytes())
        );
    }

    tracing::info!("--- a compare-and-swap, a scan and a watch are traced too");
    let cas = client.cas("w/1", 0, "one").await.unwrap();
    let kvslib::CasOutcome::Swapped(swapped) = cas else {
        panic!("{cas:?}");
    };
    let mut watch = client.watch_prefix("w/", swapped.index).unwrap();
    let event = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("the watch delivers the swap")
        .unwrap();
    assert_eq!(event.key, b"w/1");
    drop(watch);
    let page = client.range_prefix("k", 0, true).await.unwrap();
    assert_eq!(page.kvs.len(), 5);

    tracing::info!("--- kill -9 the leader (its unshipped events are lost), keep going");
    cluster.kill_server(first.leader_id);
    for i in 5..10 {
        client.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    let second = cluster
        .wait_leader(|l| l.leader_id != first.leader_id)
        .await;

    tracing::info!("--- restart the killed server: its tracer continues its clock");
    cluster.start_server(first.leader_id);
    for i in 10..15 {
        client.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    let id = first.leader_id;
    Cluster::wait_for("the restarted server to catch up", || async {
        cluster
            .status(id)
            .await
            .is_some_and(|s| s.last_applied > 15)
    })
    .await;

    tracing::info!(
        "--- kill -9 a follower for good while puts go on: its spool is all that is left"
    );
    let gone = (1..=3)
        .find(|&id| id != second.leader_id && id != first.leader_id)
        .unwrap_or(first.leader_id);
    cluster.kill_server(gone);
    for i in 15..18 {
        client.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    client.close().await;
    tracer.stop();
    assert!(
        kvraft_tracing::spool::list(&spool, Some("client1"))
            .unwrap()
            .is_empty(),
        "a client that stopped cleanly leaves no spool"
    );

    tracing::info!("--- the ShiViz log passes ShiViz's rules");
    let text = std::fs::read_to_string(&shiviz_path).unwrap();
    let events = shiviz::parse(&text).unwrap();
    shiviz::check(&events).unwrap_or_else(|e| panic!("ShiViz would reject the log: {e}"));
    let json_lines = std::fs::read_to_string(&json).unwrap().lines().count();
    assert_eq!(json_lines, events.len(), "both logs hold the same events");
    for host in ["coord", "client1", "server1", "server2", "server3"] {
        assert!(events.iter().any(|e| e.host == host), "no events of {host}");
    }
    let restarted = format!("server{}", first.leader_id);
    let starts = events
        .iter()
        .filter(|e| e.host == restarted && e.tag == "ServerStart")
        .count();
    assert_eq!(
        starts, 2,
        "{restarted} started twice in one continuous clock"
    );
    for tag in [
        "CoordStart",
        "AllServersJoined",
        "NewTerm",
        "LeaderReconfigDone",
        "ServerFail",
        "BecameLeader",
        "NoOpRequest",
        "GetRecvd",
        "GetResult",
        "KvslibStart",
        "KvslibStop",
        "LeaderNodeUpdateRecvd",
        "Txn",
        "TxnRecvd",
        "TxnResult",
        "TxnResultRecvd",
        "Range",
        "RangeRecvd",
        "RangeResult",
        "RangeResultRecvd",
        "Watch",
        "WatchRecvd",
    ] {
        assert!(events.iter().any(|e| e.tag == tag), "no {tag} event");
    }

    tracing::info!("--- one put is one causal story, before and after the failover");
    assert_eq!(
        check_put_story(&events, "k2"),
        format!("server{}", first.leader_id)
    );
    assert_eq!(
        check_put_story(&events, "k12"),
        format!("server{}", second.leader_id)
    );
}

/// A server's answers leave only once the events their trace tokens cover are in its spool:
/// a put alone, and batches of puts and of gets (flushed once for the whole batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answers_once_the_events_its_tokens_cover_are_spooled() {
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    // A tracing server that stores nothing: the servers' spools keep every event.
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    kvraft_tracing::server::serve_silent(listener);
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("trace-spool");
    let section = format!(
        "\n[tracing]\nenabled = true\nserver_addr = \"{addr}\"\nspool_dir = \"{}\"\n",
        spool.display()
    );
    let mut cluster = Cluster::with_coord_options(3, &section);
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await.leader_id;
    let client = kvslib::Client::connect(&cluster.config, "spooled")
        .await
        .unwrap();
    client.put("warm", "up").await.unwrap();
    let session = client.session_id();
    let mut kv = KvClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .unwrap();
    let put = |seq: u64| pb::PutRequest {
        client_id: "spooled".into(),
        session_id: session,
        seq,
        ack_seq: 2,
        key: Bytes::from(format!("k{seq}")),
        value: Bytes::from(format!("v{seq}")),
        trace_token: Bytes::new(),
    };
    let covered = |token: &[u8], what: &str| {
        kvraft_tracing::spool::covers(&spool, token).unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    let alone = kv.put(put(2)).await.unwrap().into_inner();
    assert!(alone.error.is_none(), "{alone:?}");
    covered(&alone.trace_token, "a put alone");
    let puts = (3..35).map(put).collect();
    let answers = kv
        .put_batch(pb::PutBatchRequest { puts })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(answers.len(), 32);
    for a in &answers {
        assert!(a.error.is_none(), "{a:?}");
        covered(&a.trace_token, "a batch of puts");
    }
    let gets = (3..35)
        .map(|seq| pb::GetRequest {
            client_id: "spooled".into(),
            key: Bytes::from(format!("k{seq}")),
            trace_token: Bytes::new(),
        })
        .collect();
    let answers = kv
        .get_batch(pb::GetBatchRequest { gets })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(answers.len(), 32);
    for a in &answers {
        assert!(a.found, "{a:?}");
        covered(&a.trace_token, "a batch of gets");
    }
}
