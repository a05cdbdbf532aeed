//! The tracer against a real tracing server on loopback: tokens merge clocks, a restarted
//! tracer continues its clock, a restarted tracing server continues its logs, and the ShiViz
//! log passes the checker throughout.

use std::path::Path;
use std::time::Duration;

use kvraft_tracing::action::{KvslibStart, PutRecvd};
use kvraft_tracing::server::{self, OutputPaths};
use kvraft_tracing::{shiviz, Tracer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    addr: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_server(dir: &Path, fresh: bool, addr: Option<&str>) -> Running {
    let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let paths = output_paths(dir);
    let (stop, stopped) = oneshot::channel::<()>();
    let spool = dir.join("spool");
    let task = tokio::spawn(server::run(paths, spool, fresh, listener, async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

async fn stop_server(r: Running) {
    let _ = r.stop.send(());
    r.task.await.unwrap().unwrap();
}

fn put(seq: u64) -> PutRecvd {
    PutRecvd {
        client_id: "client1".into(),
        session_id: 1,
        seq,
        key: "k".into(),
        value: "v".into(),
    }
}

/// The two logs in `dir`, started empty, and a scan of the spool directory `dir/spool`.
fn fresh_logs_and_scan(
    dir: &Path,
) -> (
    std::sync::Mutex<server::LogFiles>,
    server::SpoolScan,
    std::path::PathBuf,
) {
    let spool = dir.join("spool");
    let files = server::LogFiles::open(output_paths(dir), true).unwrap();
    let scan = server::SpoolScan::new(spool.clone(), true);
    (std::sync::Mutex::new(files), scan, spool)
}

fn output_paths(dir: &Path) -> OutputPaths {
    OutputPaths {
        json: dir.join("trace_output.log"),
        shiviz: dir.join("shiviz_output.log"),
    }
}

/// The own counters of `host`'s events, in log order.
fn owns(events: &[shiviz::Event], host: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.host == host)
        .map(|e| e.own())
        .collect()
}

fn read_log(dir: &Path) -> Vec<shiviz::Event> {
    let text = std::fs::read_to_string(dir.join("shiviz_output.log")).unwrap();
    let events = shiviz::parse(&text).unwrap();
    shiviz::check(&events).unwrap_or_else(|e| panic!("{e}\n{text}"));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_round_trip_merges_and_restarts_continue() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path(), true, None).await;

    // --- a token from client1 to server1 and back merges both ways, one trace id throughout
    let client = Tracer::connect("client1", &srv.addr).await.unwrap();
    let server = Tracer::connect("server1", &srv.addr).await.unwrap();
    let trace = client.create_trace();
    trace.record_action(&KvslibStart {
        client_id: "client1".into(),
    });
    let token = trace.generate_token();
    client.flush().await;
    let at_server = server.receive_token(&token);
    assert_eq!(at_server.id(), trace.id());
    at_server.record_action(&put(1));
    let back = at_server.generate_token();
    server.flush().await;
    let again = client.receive_token(&back);
    assert_eq!(again.id(), trace.id());
    assert_eq!(client.clock().get("client1"), 3);
    assert_eq!(client.clock().get("server1"), 3);
    assert_eq!(server.clock().get("client1"), 2);
    client.close().await;
    server.close().await;
    let events = read_log(dir.path());
    assert_eq!(events.len(), 6);
    let sent = events
        .iter()
        .find(|e| e.tag == "GenerateTokenTrace" && e.host == "client1");
    let recvd = events.iter().find(|e| e.tag == "PutRecvd").unwrap();
    assert!(sent.unwrap().happens_before(recvd));
    assert!(events.iter().all(|e| e.trace_id == trace.id()));

    // --- a restarted tracer continues its clock (and keeps what it had merged)
    let client = Tracer::connect("client1", &srv.addr).await.unwrap();
    assert_eq!(client.clock().get("client1"), 3);
    assert_eq!(client.clock().get("server1"), 3);
    client.create_trace().record_action(&KvslibStart {
        client_id: "client1".into(),
    });
    client.flush().await;
    assert_eq!(client.clock().get("client1"), 4);

    // --- a restarted tracing server continues its logs; a tracer shipping meanwhile waits
    let addr = srv.addr.clone();
    stop_server(srv).await;
    let t = client.create_trace();
    t.record_action(&put(2));
    let flushed = tokio::spawn({
        let client = client.clone();
        async move { client.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !flushed.is_finished(),
        "nothing can be shipped while the server is down"
    );
    let srv = start_server(dir.path(), false, Some(&addr)).await;
    tokio::time::timeout(Duration::from_secs(10), flushed)
        .await
        .expect("the shipper resends once the server is back")
        .unwrap();
    client.close().await;
    let events = read_log(dir.path());
    assert_eq!(events.len(), 8);
    assert_eq!(events.last().unwrap().own(), 5);
    stop_server(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_are_all_shipped_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path(), true, None).await;
    let tracer = Tracer::connect("server2", &srv.addr).await.unwrap();
    // More than the buffer holds: recorders wait for the shipper rather than drop events.
    let n = kvraft_tracing::tracer::EVENTS_BUFFERED_MAX as u64 + 1000;
    let recorder = {
        let tracer = tracer.clone();
        tokio::task::spawn_blocking(move || {
            let trace = tracer.create_trace();
            for seq in 1..=n {
                trace.record_action(&put(seq));
            }
        })
    };
    recorder.await.unwrap();
    tracer.close().await;
    let events = read_log(dir.path());
    assert_eq!(events.len() as u64, n);
    stop_server(srv).await;
}

/// What a process killed right after spooling events `1..=n` leaves behind.
fn leave_spool(dir: &Path, identity: &str, gen: u64, n: u64) {
    leave_spool_from(dir, identity, gen, 1..=n);
}

/// [`leave_spool`] of the events with own counters `owns`.
fn leave_spool_from(dir: &Path, identity: &str, gen: u64, owns: std::ops::RangeInclusive<u64>) {
    let mut w = kvraft_tracing::spool::SpoolWriter::create(dir, identity, gen).unwrap();
    for own in owns {
        let event = kvraft_proto::TraceEvent {
            trace_id: 7,
            tag: "Spooled".into(),
            body: format!("{{\"N\":{own}}}"),
            clock: [(identity.to_string(), own)].into_iter().collect(),
        };
        w.push(own, own, &prost::Message::encode_to_vec(&event));
    }
    w.write_out().unwrap();
}

/// A process killed after spooling events (tokens for them may have reached others) and never
/// shipping them: its next start ships them first and continues after them; one that never
/// comes back has them read from its spool by the tracing server. Either way the log is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_left_in_a_spool_by_a_killed_process_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // An older run's leftovers: a fresh start removes them with the logs.
    leave_spool(&spool, "server9", 1, 5);
    let srv = start_server(dir.path(), true, None).await;
    wait_until("the fresh start to clear the spool", || {
        kvraft_tracing::spool::list(&spool, None)
            .unwrap()
            .is_empty()
    })
    .await;

    leave_spool(&spool, "server3", 1, 3);
    leave_spool(&spool, "client9", 1, 2);
    let restarted = Tracer::connect_spooled("server3", &srv.addr, Some(&spool))
        .await
        .unwrap();
    assert_eq!(
        restarted.clock().get("server3"),
        3,
        "continues after its spool"
    );
    restarted.create_trace().record_action(&put(1));
    restarted.flush().await;
    let files_of = |identity| kvraft_tracing::spool::list(&spool, Some(identity)).unwrap();
    assert_eq!(
        files_of("server3").len(),
        1,
        "the last run's file is gone once shipped again; this run has its own"
    );
    restarted.close().await;
    assert!(
        files_of("server3").is_empty(),
        "a clean stop with everything stored leaves no spool"
    );
    stop_server(srv).await;

    let events = read_log(dir.path());
    let own = |host: &str| owns(&events, host);
    assert_eq!(own("server3"), [1, 2, 3, 4]);
    assert_eq!(
        own("client9"),
        [1, 2],
        "read from the spool of a process that never returned"
    );
    assert!(
        own("server9").is_empty(),
        "a fresh log takes nothing of an older run"
    );
}

/// A spool file name can come back for a new file (a tracer that stopped cleanly removed its
/// files and the next start numbers them from 1 again): the scan reads the new file from its
/// start, not from where it stopped in the old one.
#[test]
fn a_spool_name_reused_for_a_new_file_is_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let (files, mut scan, spool) = fresh_logs_and_scan(dir.path());
    leave_spool_from(&spool, "client5", 1, 1..=6);
    assert_eq!(scan.scan(&files, None).unwrap(), 6);
    std::fs::remove_file(spool.join(kvraft_tracing::spool::file_name("client5", 1))).unwrap();
    // The next run: same name, its events after the stored ones, in a shorter file.
    leave_spool_from(&spool, "client5", 1, 7..=8);
    assert_eq!(
        scan.scan(&files, None).unwrap(),
        2,
        "the new file's events are stored"
    );
    drop(files);
    let own: Vec<u64> = read_log(dir.path()).iter().map(|e| e.own()).collect();
    assert_eq!(own, (1..=8).collect::<Vec<_>>());
}

/// DESIGN rule 11 for the tracing server: a `ShipEncoded` batch holding bytes that are no
/// `TraceEvent` is refused as INVALID_ARGUMENT, naming the event, and stores nothing; the
/// server goes on storing what tracers send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_encoded_batch_is_refused_and_stores_nothing() {
    use kvraft_proto::tracing_client::TracingClient;
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path(), true, None).await;
    let mut client = TracingClient::connect(format!("http://{}", srv.addr))
        .await
        .unwrap();
    let batch = kvraft_proto::EncodedEventBatch {
        identity: "server6".into(),
        events: vec![vec![0xff, 0xff, 0xff].into()],
    };
    let status = client.ship_encoded(batch).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("events[0]"), "{status:?}");
    let tracer = Tracer::connect("server6", &srv.addr).await.unwrap();
    tracer.create_trace().record_action(&put(1));
    tracer.close().await;
    stop_server(srv).await;
    let events = read_log(dir.path());
    assert_eq!(events.iter().map(|e| e.own()).collect::<Vec<_>>(), [1]);
}

/// With a spool, a token waits for a local write only: flushing does not wait for the tracing
/// server, even while it is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_spool_a_flush_does_not_wait_for_the_tracing_server() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let srv = start_server(dir.path(), true, None).await;
    let tracer = Tracer::connect_spooled("server4", &srv.addr, Some(&spool))
        .await
        .unwrap();
    let addr = srv.addr.clone();
    stop_server(srv).await;
    tracer.create_trace().record_action(&put(1));
    tokio::time::timeout(Duration::from_secs(5), tracer.flush())
        .await
        .expect("a spooled flush returns without the server");
    let srv = start_server(dir.path(), false, Some(&addr)).await;
    tracer.close().await;
    stop_server(srv).await;
    let events = read_log(dir.path());
    assert_eq!(events.iter().filter(|e| e.host == "server4").count(), 1);
}

/// Polls `ready` every 20 ms for up to 10 s.
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn checker_rejects_what_shiviz_rejects() {
    let header = format!("{}\n\n", server::SHIVIZ_REGEX);
    let ok = format!("{header}a {{\"a\":1}}\n1 X {{}}\nb {{\"a\":1,\"b\":1}}\n1 Y {{}}\n");
    shiviz::check(&shiviz::parse(&ok).unwrap()).unwrap();
    let gap = format!("{header}a {{\"a\":2}}\n1 X {{}}\n");
    assert!(shiviz::check(&shiviz::parse(&gap).unwrap())
        .unwrap_err()
        .contains("expected 1"));
    let dangling = format!("{header}b {{\"a\":1,\"b\":1}}\n1 Y {{}}\n");
    assert!(shiviz::check(&shiviz::parse(&dangling).unwrap())
        .unwrap_err()
        .contains("no events"));
    let lost = format!("{header}a {{\"a\":1}}\n1 X {{}}\nb {{\"a\":2,\"b\":1}}\n1 Y {{}}\n");
    assert!(shiviz::check(&shiviz::parse(&lost).unwrap())
        .unwrap_err()
        .contains("only 1"));
    assert!(shiviz::parse("nope\n\n").is_err());
}

/// The ShiViz log a restarted tracing server rewrites from the JSON log is byte for byte the
/// one it wrote as events came (both go through one writer of the event lines).
#[test]
fn a_reopened_log_rewrites_the_shiviz_file_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (files, mut scan, spool) = fresh_logs_and_scan(dir.path());
    leave_spool_from(&spool, "client7", 1, 1..=5);
    assert_eq!(scan.scan(&files, None).unwrap(), 5);
    drop(files);
    let written = std::fs::read_to_string(dir.path().join("shiviz_output.log")).unwrap();
    drop(server::LogFiles::open(output_paths(dir.path()), false).unwrap());
    let rewritten = std::fs::read_to_string(dir.path().join("shiviz_output.log")).unwrap();
    assert_eq!(rewritten, written);
    assert_eq!(read_log(dir.path()).len(), 5);
}

/// The periodic scan leaves the spool of an identity that ships (its tracer ships what it
/// spools) and reads it once the identity has not shipped for the given time: then all the
/// file's events the log lacks are stored, in order.
#[test]
fn a_scan_reads_the_spool_of_an_identity_only_once_it_stops_shipping() {
    let dir = tempfile::tempdir().unwrap();
    let (files, mut scan, spool) = fresh_logs_and_scan(dir.path());
    leave_spool_from(&spool, "server9", 1, 1..=4);
    files.lock().unwrap().note_shipped("server9");
    let live = Some(Duration::from_secs(3600));
    assert_eq!(scan.scan(&files, live).unwrap(), 0, "a shipping identity");
    assert!(files
        .lock()
        .unwrap()
        .shipped_within("server9", Duration::from_secs(3600)));
    assert!(!files
        .lock()
        .unwrap()
        .shipped_within("server8", Duration::from_secs(3600)));
    leave_spool_from(&spool, "server8", 1, 1..=2);
    assert_eq!(
        scan.scan(&files, live).unwrap(),
        2,
        "one that never shipped"
    );
    assert_eq!(
        scan.scan(&files, Some(Duration::ZERO)).unwrap(),
        4,
        "server9, once it has not shipped for the time given"
    );
    assert!(
        !files
            .lock()
            .unwrap()
            .shipped_within("server9", Duration::from_secs(3600)),
        "a scan forgets the identities that did not ship within its window"
    );
    drop(files);
    let events = read_log(dir.path());
    let own = |host: &str| owns(&events, host);
    assert_eq!(own("server9"), [1, 2, 3, 4]);
    assert_eq!(own("server8"), [1, 2]);
}
