//! kvslib against in-process fake servers and a fake coord on loopback: leader discovery by
//! hints and by the coord's watch, put identities (seq, ack_seq), session renewal, back-off on
//! TOO_MANY_PENDING, and the deadline on a dead cluster. The fakes implement only the server
//! contract kvslib relies on (docs in proto/proto/kvraft.proto), not replication.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvraft_proto as pb;
use kvslib::{Client, ClusterConfig, Error};
use pb::{ErrorCode, KvError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The state all fake servers share: who leads, sessions, applied puts.
#[derive(Default)]
struct Cluster {
    leader_id: u32,
    term: u64,
    sessions_registered: u64,
    expired: HashSet<u64>,
    /// How many more puts to refuse with TOO_MANY_PENDING.
    busy_left: u32,
    /// How many more puts the leader answers "not the leader, leader unknown" (it has not heard
    /// of its designation yet).
    unaware_left: u32,
    /// Every put attempt any server received, with the receiving server's id.
    attempts: Vec<(u32, pb::PutRequest)>,
    /// (session, seq) -> (version, index): the exactly-once table.
    applied: HashMap<(u64, u64), (u64, u64)>,
    store: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    last_index: u64,
    /// Servers whose watch history no longer holds the revisions asked for.
    compacted: HashSet<u32>,
    /// Servers that answered a watch request.
    watched: Vec<u32>,
    /// Servers that take puts and never answer (a hung process: the connection stays open).
    hung: HashSet<u32>,
    /// `Kv.Put` and `Kv.PutBatch` calls received.
    put_calls: u64,
    /// The client's trace spool (tracing on): every put must arrive with a token whose events
    /// are already written there.
    spool: Option<std::path::PathBuf>,
    /// Traced puts that arrived before the events their token covers were in the spool.
    unspooled: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

struct FakeKv {
    id: u32,
    cluster: Shared,
}

fn kv_error(code: ErrorCode, c: &Cluster) -> Option<KvError> {
    Some(KvError {
        code: code as i32,
        message: format!("{code:?}"),
        leader_id: c.leader_id,
        term: c.term,
    })
}

impl FakeKv {
    /// One put, as `Kv.Put` or as one request of `Kv.PutBatch`.
    async fn put_one(&self, r: pb::PutRequest) -> Result<Response<pb::PutResponse>, Status> {
        let hung = {
            let mut c = self.cluster.lock().unwrap();
            if let Some(dir) = c.spool.clone() {
                if let Err(e) = kvraft_tracing::spool::covers(&dir, &r.trace_token) {
                    c.unspooled.push(e);
                }
            }
            c.attempts.push((self.id, r.clone()));
            c.hung.contains(&self.id)
        };
        if hung {
            std::future::pending::<()>().await;
        }
        let mut c = self.cluster.lock().unwrap();
        if let Some(error) = self.not_leader(&c) {
            return Ok(Response::new(pb::PutResponse {
                error,
                ..Default::default()
            }));
        }
        if c.unaware_left > 0 {
            c.unaware_left -= 1;
            let mut error = kv_error(ErrorCode::ErrorNotLeader, &c);
            if let Some(e) = &mut error {
                e.leader_id = 0;
            }
            return Ok(Response::new(pb::PutResponse {
                error,
                ..Default::default()
            }));
        }
        Ok(Response::new(self.apply_put(&mut c, &r)))
    }

    /// NOT_LEADER with the cluster's hint unless this server leads.
    fn not_leader(&self, c: &Cluster) -> Option<Option<KvError>> {
        (c.leader_id != self.id).then(|| kv_error(ErrorCode::ErrorNotLeader, c))
    }

    fn apply_put(&self, c: &mut Cluster, r: &pb::PutRequest) -> pb::PutResponse {
        let reply = |error, (version, index)| pb::PutResponse {
            error,
            version,
            index,
            trace_token: Default::default(),
        };
        if c.expired.contains(&r.session_id) {
            return reply(kv_error(ErrorCode::ErrorSessionExpired, c), (0, 0));
        }
        if let Some(&done) = c.applied.get(&(r.session_id, r.seq)) {
            return reply(None, done);
        }
        if c.busy_left > 0 {
            c.busy_left -= 1;
            return reply(kv_error(ErrorCode::ErrorTooManyPending, c), (0, 0));
        }
        c.last_index += 1;
        let entry = c.store.entry(r.key.to_vec()).or_default();
        *entry = (r.value.to_vec(), entry.1 + 1);
        let done = (entry.1, c.last_index);
        c.applied.insert((r.session_id, r.seq), done);
        reply(None, done)
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for FakeKv {
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>,
    >;

    /// A server holding the revision sends a header at revision 10, then a put of `w/1` at
    /// revision 11, then nothing; one that does not answers ERROR_COMPACTED.
    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut c = self.cluster.lock().unwrap();
        c.watched.push(self.id);
        let first = r.into_inner().start_revision;
        let responses = if c.compacted.contains(&self.id) {
            let mut error = kv_error(ErrorCode::ErrorCompacted, &c);
            if let Some(e) = error.as_mut() {
                e.message = format!("revision {first} is compacted on server {}", self.id);
            }
            vec![pb::WatchResponse {
                error,
                ..Default::default()
            }]
        } else {
            let kv = pb::KeyValue {
                key: "w/1".into(),
                value: "one".into(),
                version: 1,
                create_revision: 11,
                mod_revision: 11,
            };
            vec![
                pb::WatchResponse {
                    created: true,
                    revision: 10,
                    ..Default::default()
                },
                pb::WatchResponse {
                    revision: 11,
                    events: vec![pb::WatchEvent {
                        kind: pb::watch_event::Kind::Put as i32,
                        kv: Some(kv),
                    }],
                    ..Default::default()
                },
            ]
        };
        let stream =
            tokio_stream::iter(responses.into_iter().map(Ok)).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_session(
        &self,
        _: Request<pb::RegisterSessionRequest>,
    ) -> Result<Response<pb::RegisterSessionResponse>, Status> {
        let mut c = self.cluster.lock().unwrap();
        let mut response = pb::RegisterSessionResponse::default();
        match self.not_leader(&c) {
            Some(error) => response.error = error,
            None => {
                c.sessions_registered += 1;
                response.session_id = 100 + c.sessions_registered;
            }
        }
        Ok(Response::new(response))
    }

    async fn put(&self, r: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.cluster.lock().unwrap().put_calls += 1;
        self.put_one(r.into_inner()).await
    }

    async fn put_batch(
        &self,
        r: Request<pb::PutBatchRequest>,
    ) -> Result<Response<pb::PutBatchResponse>, Status> {
        self.cluster.lock().unwrap().put_calls += 1;
        let mut results = Vec::new();
        for put in r.into_inner().puts {
            results.push(self.put_one(put).await?.into_inner());
        }
        Ok(Response::new(pb::PutBatchResponse { results }))
    }

    async fn get_batch(
        &self,
        r: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let mut results = Vec::new();
        for get in r.into_inner().gets {
            results.push(self.get(Request::new(get)).await?.into_inner());
        }
        Ok(Response::new(pb::GetBatchResponse { results }))
    }

    async fn txn(&self, _: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        Err(Status::unimplemented(
            "the fake cluster serves puts and gets",
        ))
    }

    async fn range(
        &self,
        _: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        Err(Status::unimplemented(
            "the fake cluster serves puts and gets",
        ))
    }

    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let c = self.cluster.lock().unwrap();
        let mut response = pb::GetResponse::default();
        if let Some(error) = self.not_leader(&c) {
            response.error = error;
        } else if let Some((value, version)) = c.store.get(r.get_ref().key.as_ref()) {
            response.found = true;
            response.value = value.clone().into();
            response.version = *version;
        }
        Ok(Response::new(response))
    }
}

struct FakeCoord {
    leader: watch::Receiver<pb::LeaderInfo>,
    /// When set, GetLeader fails as if the coord were down (streams stay open).
    down: Arc<Mutex<bool>>,
}

type InfoStream = Pin<Box<dyn Stream<Item = Result<pb::LeaderInfo, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coord_client_server::CoordClient for FakeCoord {
    async fn members(
        &self,
        _: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        Err(Status::unimplemented(
            "the fake coord serves the leader only",
        ))
    }

    async fn get_leader(
        &self,
        _: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::LeaderInfo>, Status> {
        if *self.down.lock().unwrap() {
            return Err(Status::unavailable("coord down"));
        }
        Ok(Response::new(self.leader.borrow().clone()))
    }

    type WatchLeaderStream = InfoStream;

    async fn watch_leader(
        &self,
        _: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<InfoStream>, Status> {
        let stream = WatchStream::new(self.leader.clone()).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A loopback port nothing listens on (bound, then released).
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn serve_kv(id: u32, cluster: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let service = pb::kv_server::KvServer::new(FakeKv { id, cluster });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn serve_coord(coord: FakeCoord) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let service = pb::coord_client_server::CoordClientServer::new(coord);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn config(coord_addr: &str, servers: &[String], op_timeout_ms: u64) -> ClusterConfig {
    let mut text = format!(
        "[coord]\nserver_api_addr = \"{}\"\nclient_api_addr = \"{coord_addr}\"\n\
         data_dir = \"coord\"\n[client]\nop_timeout_ms = {op_timeout_ms}\n\
         attempt_timeout_ms = 300\n",
        "127.0.0.1:1"
    );
    for (i, addr) in servers.iter().enumerate() {
        let id = i + 1;
        text += &format!("[[servers]]\nid = {id}\naddr = \"{addr}\"\ndata_dir = \"s{id}\"\n");
    }
    ClusterConfig::parse(&text, Path::new("test.toml")).expect("valid test config")
}

/// A tracing server that stores nothing (see `kvraft_tracing::server::serve_silent`).
async fn serve_silent_tracing() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    kvraft_tracing::server::serve_silent(listener);
    addr
}

/// Three fake servers led by server 2 in term 1, and no coord.
async fn three_servers() -> (Shared, Vec<String>) {
    let cluster: Shared = Arc::new(Mutex::new(Cluster {
        leader_id: 2,
        term: 1,
        ..Default::default()
    }));
    let mut addrs = Vec::new();
    for id in 1..=3 {
        addrs.push(serve_kv(id, Arc::clone(&cluster)).await);
    }
    (cluster, addrs)
}

/// What the fake coord publishes: `leader_id` leads `term` at `addr`.
fn leader_info(term: u64, leader_id: u32, addr: &str) -> pb::LeaderInfo {
    pb::LeaderInfo {
        term,
        leader_id,
        leader_uuid: format!("uuid-{leader_id}"),
        leader_addr: addr.to_string(),
        trace_token: Default::default(),
    }
}

fn attempts(cluster: &Shared) -> Vec<(u32, pb::PutRequest)> {
    cluster.lock().unwrap().attempts.clone()
}

#[tokio::test]
async fn hints_lead_to_the_leader_without_a_coord() {
    let (cluster, addrs) = three_servers().await;
    let cfg = config(&closed_port().await, &addrs, 5_000);
    let client = Client::connect(&cfg, "c1")
        .await
        .expect("connect via hints");
    assert_eq!(client.session_id(), 101);

    let out = client.put("k1", "v1").await.expect("put");
    assert_eq!((out.version, out.index), (1, 1));
    assert_eq!(client.get("k1").await.unwrap(), Some(b"v1".to_vec()));
    assert_eq!(client.get("nope").await.unwrap(), None);
    let puts = attempts(&cluster);
    assert_eq!(
        puts.len(),
        1,
        "the hint was learned at connect: put went straight to 2"
    );
    assert_eq!(puts[0].0, 2);

    // The coord is down: leader() falls back to what the hints taught.
    let leader = client.leader().await.expect("cached view");
    assert_eq!((leader.term, leader.leader_id), (1, 2));
    assert_eq!(leader.leader_addr, addrs[1]);
    client.close().await;
}

#[tokio::test]
async fn seqs_follow_issue_order_and_ack_seq_trails_the_oldest_in_flight() {
    let (cluster, addrs) = three_servers().await;
    let client = Client::connect(&config(&closed_port().await, &addrs, 5_000), "c1")
        .await
        .unwrap();
    client.put("a", "1").await.unwrap();
    client.put("a", "2").await.unwrap();
    let puts = attempts(&cluster);
    let ids: Vec<(u64, u64)> = puts.iter().map(|(_, r)| (r.seq, r.ack_seq)).collect();
    assert_eq!(ids, vec![(1, 1), (2, 2)], "sequential: ack = own seq");

    let many: Vec<_> = (0..20)
        .map(|i| {
            let c = client.clone();
            async move { c.put(format!("k{i}"), "v").await }
        })
        .collect();
    for result in spawn_all(many).await {
        result.expect("concurrent put");
    }
    let puts = attempts(&cluster);
    let mut seqs: Vec<u64> = puts[2..].iter().map(|(_, r)| r.seq).collect();
    for (_, r) in &puts[2..] {
        assert!(
            r.ack_seq >= 3 && r.ack_seq <= r.seq,
            "ack {} seq {}",
            r.ack_seq,
            r.seq
        );
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (3..23).collect::<Vec<u64>>(),
        "every seq once, no gaps"
    );
}

/// Runs every future as its own task; results in input order.
async fn spawn_all<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn expired_session_fails_the_op_and_is_renewed_once() {
    let (cluster, addrs) = three_servers().await;
    let client = Client::connect(&config(&closed_port().await, &addrs, 5_000), "c1")
        .await
        .unwrap();
    client.put("k", "before").await.unwrap();
    cluster.lock().unwrap().expired.insert(101);

    let concurrent: Vec<_> = (0..5)
        .map(|_| {
            let c = client.clone();
            async move { c.put("k", "during").await }
        })
        .collect();
    for result in spawn_all(concurrent).await {
        assert_eq!(result, Err(Error::SessionExpired));
    }
    assert_eq!(
        cluster.lock().unwrap().sessions_registered,
        2,
        "renewed once"
    );
    assert_eq!(client.session_id(), 102);

    client.put("k", "after").await.expect("new session works");
    let last = attempts(&cluster).pop().unwrap().1;
    assert_eq!((last.session_id, last.seq, last.ack_seq), (102, 1, 1));
}

#[tokio::test]
async fn too_many_pending_is_retried_with_the_same_identity() {
    let (cluster, addrs) = three_servers().await;
    let client = Client::connect(&config(&closed_port().await, &addrs, 5_000), "c1")
        .await
        .unwrap();
    cluster.lock().unwrap().busy_left = 2;
    let out = client.put("k", "v").await.expect("put after back-off");
    assert_eq!(out.version, 1);
    let ids: Vec<(u64, u64, u64)> = attempts(&cluster)
        .iter()
        .map(|(_, r)| (r.session_id, r.seq, r.ack_seq))
        .collect();
    assert_eq!(ids, vec![(101, 1, 1); 3]);
}

#[tokio::test]
async fn a_dead_cluster_fails_by_the_deadline_without_claiming_definite_failure() {
    let addrs = vec![
        closed_port().await,
        closed_port().await,
        closed_port().await,
    ];
    let cfg = config(&closed_port().await, &addrs, 700);
    let started = Instant::now();
    let result = Client::connect(&cfg, "c1").await;
    let took = started.elapsed();
    let Err(error) = result else {
        panic!("connect to a dead cluster succeeded")
    };
    assert!(
        matches!(
            error,
            Error::Timeout {
                op: "RegisterSession",
                ..
            }
        ),
        "{error}"
    );
    assert!(!error.is_definite());
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_millis(2_000),
        "took {took:?}"
    );
}

#[tokio::test]
async fn the_coord_watch_moves_the_client_to_a_new_leader() {
    let (cluster, addrs) = three_servers().await;
    let (tx, rx) = watch::channel(leader_info(1, 2, &addrs[1]));
    let down = Arc::new(Mutex::new(false));
    let coord_addr = serve_coord(FakeCoord {
        leader: rx,
        down: Arc::clone(&down),
    })
    .await;
    let client = Client::connect(&config(&coord_addr, &addrs, 5_000), "c1")
        .await
        .unwrap();
    assert_eq!(client.leader().await.unwrap().leader_uuid, "uuid-2");
    let cfg = config(&coord_addr, &addrs, 5_000);
    let asked = kvslib::query_leader(&cfg, "c2")
        .await
        .expect("coord answers");
    assert_eq!((asked.term, asked.leader_id), (1, 2));

    // Failover to server 3 in term 2, announced only by the coord; the coord then goes down.
    cluster.lock().unwrap().leader_id = 3;
    cluster.lock().unwrap().term = 2;
    tx.send(leader_info(2, 3, &addrs[2])).unwrap();
    *down.lock().unwrap() = true;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let view = client
            .leader()
            .await
            .expect("cached view while the coord is down");
        if view.leader_uuid == "uuid-3" {
            assert_eq!(view.term, 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watch update never arrived: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.put("k", "v").await.unwrap();
    assert_eq!(attempts(&cluster).last().unwrap().0, 3);
    client.close().await;
}

#[tokio::test]
async fn query_leader_gives_up_on_a_dead_coord_by_the_deadline() {
    let cfg = config(&closed_port().await, &[closed_port().await], 600);
    let started = Instant::now();
    let result = kvslib::query_leader(&cfg, "c1").await;
    assert!(
        matches!(
            result,
            Err(Error::Timeout {
                op: "GetLeader",
                ..
            })
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1_500));
}

/// After a failover the coord tells clients and the new leader at the same moment; a client
/// that asks first hears "not the leader, leader unknown" in the new term. It asks the same
/// server again shortly instead of backing off and probing the others.
#[tokio::test]
async fn a_new_leader_not_yet_told_is_asked_again_not_probed_around() {
    let (cluster, addrs) = three_servers().await;
    let (tx, rx) = watch::channel(leader_info(1, 2, &addrs[1]));
    let down = Arc::new(Mutex::new(false));
    let coord_addr = serve_coord(FakeCoord { leader: rx, down }).await;
    let client = Client::connect(&config(&coord_addr, &addrs, 5_000), "c1")
        .await
        .unwrap();
    client.put("k", "before").await.unwrap();
    {
        let mut c = cluster.lock().unwrap();
        c.leader_id = 3;
        c.term = 2;
        c.unaware_left = 3;
        c.attempts.clear();
    }
    tx.send(leader_info(2, 3, &addrs[2])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while client.leader().await.unwrap().leader_id != 3 {
        assert!(Instant::now() < deadline, "watch update never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.put("k", "after").await.unwrap();
    let servers: Vec<u32> = attempts(&cluster).iter().map(|(id, _)| *id).collect();
    assert_eq!(servers, vec![3, 3, 3, 3], "only the new leader is asked");
    client.close().await;
}

/// A client connected without a session reads without registering one (nothing appended to
/// the log); its first put registers it, once.
#[tokio::test]
async fn a_reader_registers_no_session_until_it_puts() {
    let (cluster, addrs) = three_servers().await;
    let coord = closed_port().await;
    let client = Client::connect_without_session(&config(&coord, &addrs, 5_000), "r1")
        .await
        .unwrap();
    assert_eq!(client.session_id(), 0);
    assert_eq!(client.get("k").await.unwrap(), None);
    assert_eq!(cluster.lock().unwrap().sessions_registered, 0);
    client.put("k", "v").await.unwrap();
    client.put("k", "w").await.unwrap();
    assert_eq!(cluster.lock().unwrap().sessions_registered, 1);
    assert_ne!(client.session_id(), 0);
    let seqs: Vec<u64> = attempts(&cluster)
        .iter()
        .filter(|(id, _)| *id == 2)
        .map(|(_, r)| r.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    client.close().await;
}

/// A watch whose revision the leader no longer holds (it restarted, so its history is short)
/// is opened on another server that still holds it; when none does, it fails naming each.
#[tokio::test]
async fn a_watch_the_leader_cannot_resume_is_served_by_another_server() {
    let (cluster, addrs) = three_servers().await;
    cluster.lock().unwrap().compacted = [2, 1].into_iter().collect();
    let client =
        Client::connect_without_session(&config(&closed_port().await, &addrs, 3_000), "c1")
            .await
            .unwrap();
    let mut watch = client.watch("w/", "w0", 5).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event")
        .unwrap();
    assert_eq!((event.key.as_slice(), event.revision), (&b"w/1"[..], 11));
    let mut watched = cluster.lock().unwrap().watched.clone();
    assert_eq!(
        watched.last(),
        Some(&3),
        "served by the one that holds it: {watched:?}"
    );
    watched.sort_unstable();
    assert_eq!(watched, [1, 2, 3], "each asked once");

    cluster.lock().unwrap().compacted = [1, 2, 3].into_iter().collect();
    let mut watch = client.watch("w/", "w0", 5).unwrap();
    match watch.next().await {
        Err(Error::Rejected(m)) => {
            for id in 1..=3 {
                assert!(m.contains(&format!("compacted on server {id}")), "{m}");
            }
        }
        other => panic!("{other:?}"),
    }
}

/// A leader that hangs (its connection stays open, so only a timeout would end the attempt):
/// once the coord names a new leader, the put in flight is sent there at once, with the same
/// identity, instead of waiting out the attempt timeout (8 s here).
#[tokio::test]
async fn a_put_waiting_on_a_hung_leader_moves_to_the_new_one_at_once() {
    let (cluster, addrs) = three_servers().await;
    let (tx, rx) = watch::channel(leader_info(1, 2, &addrs[1]));
    let coord_addr = serve_coord(FakeCoord {
        leader: rx,
        down: Arc::new(Mutex::new(false)),
    })
    .await;
    let mut cfg = config(&coord_addr, &addrs, 20_000);
    cfg.client.attempt_timeout_ms = 8_000;
    let client = Client::connect(&cfg, "c1").await.unwrap();
    cluster.lock().unwrap().hung.insert(2);
    let put = tokio::spawn({
        let client = client.clone();
        async move { client.put("k", "v").await }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !attempts(&cluster).iter().any(|(id, _)| *id == 2) {
        assert!(Instant::now() < deadline, "the put never reached server 2");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    {
        let mut c = cluster.lock().unwrap();
        (c.leader_id, c.term) = (3, 2);
    }
    tx.send(leader_info(2, 3, &addrs[2])).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(4), put)
        .await
        .expect("answered well before the 8 s attempt timeout")
        .unwrap()
        .unwrap();
    assert_eq!(out.version, 1);
    let tried: Vec<(u32, u64, u64)> = attempts(&cluster)
        .iter()
        .map(|(id, r)| (*id, r.session_id, r.seq))
        .collect();
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert_eq!((tried[0].0, tried[1].0), (2, 3), "{tried:?}");
    assert_eq!(
        (tried[0].1, tried[0].2),
        (tried[1].1, tried[1].2),
        "the same request identity"
    );
}

/// Callers answered together queue their next puts together, and those go in one call: the
/// lane lets the woken callers run before it takes what queued (16 callers each making 32 puts
/// in a row, at most 4 calls in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_queued_by_callers_answered_together_share_a_call() {
    let (cluster, addrs) = three_servers().await;
    let client = Client::connect(&config(&closed_port().await, &addrs, 5_000), "c1")
        .await
        .unwrap();
    client.put("warm", "up").await.unwrap();
    let before = cluster.lock().unwrap().put_calls;
    let callers: Vec<_> = (0..16)
        .map(|i| {
            let c = client.clone();
            async move {
                for j in 0..32 {
                    c.put(format!("k{i}-{j}"), "v").await?;
                }
                Ok::<(), Error>(())
            }
        })
        .collect();
    for result in spawn_all(callers).await {
        result.expect("puts");
    }
    let calls = cluster.lock().unwrap().put_calls - before;
    assert_eq!(attempts(&cluster).len(), 1 + 16 * 32, "each put sent once");
    assert!(calls <= 16 * 32 / 4, "{calls} calls carried 512 puts");
}

/// Traced puts sent together by a lane (one call for many callers) leave only once the events
/// their tokens cover are in the client's spool: the lane flushes the tracer before each call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traced_puts_leave_after_their_events_are_spooled() {
    let spool = tempfile::tempdir().unwrap();
    let (cluster, addrs) = three_servers().await;
    cluster.lock().unwrap().spool = Some(spool.path().to_path_buf());
    let mut config = config(&closed_port().await, &addrs, 5_000);
    config.tracing.enabled = true;
    config.tracing.server_addr = serve_silent_tracing().await;
    config.tracing.spool_dir = spool.path().to_path_buf();
    let client = Client::connect(&config, "c1").await.unwrap();
    let before = cluster.lock().unwrap().put_calls;
    let callers: Vec<_> = (0..16)
        .map(|i| {
            let c = client.clone();
            async move {
                for j in 0..8 {
                    c.put(format!("k{i}-{j}"), "v").await?;
                }
                Ok::<(), Error>(())
            }
        })
        .collect();
    for result in spawn_all(callers).await {
        result.expect("puts");
    }
    let c = cluster.lock().unwrap();
    assert_eq!(c.attempts.len(), 16 * 8, "each put sent once");
    assert!(
        c.attempts.iter().all(|(_, p)| !p.trace_token.is_empty()),
        "every put carries a token"
    );
    assert!(
        c.put_calls - before < 16 * 8,
        "some calls carried several puts"
    );
    assert!(
        c.unspooled.is_empty(),
        "{} puts left too early, first: {:?}",
        c.unspooled.len(),
        &c.unspooled[..c.unspooled.len().min(3)]
    );
}
