//! The runtime: one tokio task owns the [`Replica`] core and executes the commands it returns.
//!
//! ```text
//!  gRPC handlers ─┐                       ┌─▶ log file (write) ──▶ group fsync (blocking
//!  peer links ────┼─▶ Input (bounded) ──▶ core task ─▶ hard state (fsync, inline)     thread)
//!  fsync done ────┘                       ├─▶ peer links (AppendEntries streams)        │
//!                                         └─▶ replies (oneshot) ◀── Persisted ◀──────────┘
//! ```
//!
//! Ordering rules (see `replica` module docs): a hard-state save is durable before any later
//! command runs; log writes are made durable by one fsync at a time, covering every write
//! issued before it started (group commit: all writes that arrive while an fsync runs share the
//! next one); the core learns of it through `Event::Persisted`.
//!
//! A full disk is survived: entries that cannot be written wait in a backlog (never fsynced,
//! so never acknowledged), the server refuses new client writes with a clear error and tells
//! the coord it does not lead (so a healthy server takes over), and retries the backlog until
//! space returns. Any other storage error, and any fsync error, is fatal: the server stops
//! rather than limp on without durability.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kvraft_common::config::ClusterConfig;
use kvraft_common::{LogIndex, NodeId, Term};
use kvraft_proto::replication_client::ReplicationClient;
use kvraft_proto::{AppendEntriesRequest, AppendEntriesResponse, PutCommand, TxnCommand};
use kvraft_tracing::action::ServerStart;
use kvraft_tracing::Tracer;
use prost::bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::engine::{EngineError, RedbEngine, SnapshotSource};
use crate::executor::{Executor, Io, Storage};
use crate::faults::Faults;
use crate::log_writer::{DiskFull, LogDisk};
use crate::metrics::ServerMetrics;
use crate::otel_spans::OtelSpans;
use crate::replica::{
    Command, Event, RangeQuery, Replica, ReplicaConfig, Reply, ReplyTo, StreamId,
};
use crate::service;
use crate::state_machine::{Change, StateMachine};
use crate::storage::{
    FileLogStore, HardState, HardStateFile, LogStore, ServerMeta, StorageError, Syncer,
};
use crate::trace_events::TraceEvents;
use crate::watch::WatchHub;

/// Capacity of the core's input queue. Handlers wait when it is full (backpressure).
pub const INPUT_QUEUE_MAX: usize = 16 * 1024;
/// Most inputs handled before the core flushes (sends, fsync): bounds reply latency under load.
pub const INPUT_BATCH_MAX: usize = 1024;
/// Capacity of each peer's outgoing queue; past it messages are dropped and the leader's
/// probe/heartbeat logic resends.
pub const PEER_QUEUE_MAX: usize = 1024;
/// Distinct foreign cluster ids whose messages are logged (each once); more are refused
/// without a log line, so a flood of made-up ids neither grows memory nor the log.
const FOREIGN_CLUSTERS_LOGGED_MAX: usize = 16;
/// At most one line per this period for refused peer messages, with the count of those not
/// logged: a peer (or anyone who opens a replication stream) sending garbage must not grow the
/// log without bound.
const REFUSALS_LOGGED_EVERY_MS: u64 = 1_000;
/// The state machine's file in the data directory.
pub const STATE_FILE: &str = "state.redb";
/// A snapshot being received from the leader (renamed over the state file once complete).
pub const SNAPSHOT_RECEIVE_FILE: &str = "state.redb.snapshot";
/// An engine write (one `state_sync_ms` of changes, on the core task) at least this long is
/// logged at debug level.
const ENGINE_WRITE_SLOW_MS: u64 = 10;
/// The time one engine write should hold the core task (see `Core::adapt_engine_writes`).
const ENGINE_WRITE_TARGET_MS: u64 = 25;
/// Engine writes are never split below this many keys (each write has a fixed cost too).
const ENGINE_WRITE_KEYS_MIN: usize = 1_024;
/// A write of fewer keys says too little about the cost per key to resize the next ones.
const ENGINE_WRITE_SAMPLE_KEYS_MIN: usize = 256;
/// Pause before reconnecting a broken peer stream.
const PEER_RECONNECT_MS: u64 = 50;

/// A request that expects a reply from the core.
#[derive(Debug)]
pub(crate) enum Call {
    /// `cluster_id` is the coord's ("" if it has none yet); `catching_up` its list of servers
    /// catching up after losing their storage (`None`: not told, keep the last list).
    CoordHeartbeat {
        term: u64,
        leader: NodeId,
        cluster_id: String,
        catching_up: Option<Vec<(NodeId, String)>>,
    },
    Prepare {
        term: u64,
        cluster_id: String,
    },
    Register {
        client_id: String,
    },
    /// A put, the id of the vector-clock trace it continues (tracing on) and the W3C context
    /// of its OpenTelemetry span (empty unless spans are exported).
    Put(PutCommand, Option<u64>, HashMap<String, String>),
    Get(Bytes),
    Txn(TxnCommand),
    Range(RangeQuery),
    Status,
}

impl Call {
    fn into_event(self, reply: ReplyTo) -> Event {
        match self {
            Call::CoordHeartbeat {
                term,
                leader,
                catching_up,
                ..
            } => Event::CoordHeartbeat {
                term: Term(term),
                leader,
                catching_up,
                reply,
            },
            Call::Prepare { term, .. } => Event::Prepare {
                term: Term(term),
                reply,
            },
            Call::Register { client_id } => Event::RegisterSession { client_id, reply },
            Call::Put(cmd, ..) => Event::Put { cmd, reply },
            Call::Get(key) => Event::Get { key, reply },
            Call::Txn(cmd) => Event::Txn { cmd, reply },
            Call::Range(query) => Event::Range { query, reply },
            Call::Status => Event::Status { reply },
        }
    }
}

pub(crate) type ResponseSender = mpsc::Sender<Result<AppendEntriesResponse, tonic::Status>>;

pub(crate) enum Input {
    Call(Call, oneshot::Sender<Result<Reply, tonic::Status>>),
    /// A consistent view of the state machine, for `Admin.Digest`.
    View(oneshot::Sender<Result<Box<dyn SnapshotSource>, EngineError>>),
    StreamOpened(StreamId, ResponseSender),
    AppendEntries(StreamId, AppendEntriesRequest),
    StreamClosed(StreamId),
    AppendResponse(AppendEntriesResponse),
    PeerDisconnected(NodeId),
    Synced(u64, Result<(), StorageError>),
    /// The state machine is durable up to this applied index.
    StateSynced(LogIndex, Result<(), EngineError>),
}

/// Cloneable handle the gRPC services use to reach the core.
#[derive(Clone)]
pub(crate) struct CoreHandle {
    pub tx: mpsc::Sender<Input>,
    /// Longest value a put may carry, and the gRPC message limit derived from it.
    pub max_value_bytes: usize,
    pub grpc_message_bytes: usize,
    /// One `Admin.Digest` at a time: each reads the whole state and holds a read view (which
    /// pins the state file's pages) while it does.
    pub digests: Arc<tokio::sync::Semaphore>,
    pub faults: Arc<Faults>,
    /// `Admin.SetFaults` is served: the server was started with fault injection allowed
    /// (flag or config). Otherwise the RPC would be a remote kill switch for anyone.
    pub fault_injection_allowed: bool,
    pub id: NodeId,
    /// The data directory, for the sizes `Admin.Status` reports.
    pub data_dir: std::path::PathBuf,
    pub next_stream: Arc<AtomicU64>,
    /// Milliseconds since the Unix epoch of the last coord heartbeat answered.
    pub last_coord_contact_ms: Arc<AtomicU64>,
    /// The log cannot be written (disk full): client writes are refused.
    pub disk_full: Arc<AtomicBool>,
    /// Trace events; `None` when tracing is off.
    pub tracer: Option<Tracer>,
    /// The changes applied, for watches.
    pub watch: Arc<WatchHub>,
    pub metrics: Arc<ServerMetrics>,
}

impl CoreHandle {
    /// Sends a call to the core and waits for its reply; `None` if the core is gone or
    /// refused the call.
    pub async fn call(&self, call: Call) -> Option<Reply> {
        self.call_or_refusal(call).await.ok()
    }

    /// Like [`CoreHandle::call`], with the reason a call was refused (a coord message for
    /// another cluster) or `UNAVAILABLE` when the core is gone.
    pub async fn call_or_refusal(&self, call: Call) -> Result<Reply, tonic::Status> {
        let gone = || tonic::Status::unavailable("server is shutting down");
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Call(call, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on the monotonic clock since this process first asked. The replica core's
/// time: heartbeats, timeouts and the log time it stamps on entries never follow a wall-clock
/// jump.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Runs server `id` of `config` on an already bound listener until `shutdown` completes or a
/// storage error stops it. `faults` is the injected fault state; `Admin.SetFaults` may change
/// it only if `fault_injection_allowed`.
pub async fn run(
    config: ClusterConfig,
    id: u32,
    listener: TcpListener,
    faults: Arc<Faults>,
    fault_injection_allowed: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = config.server(id).map_err(anyhow::Error::msg)?.clone();
    let dir = &me.data_dir;
    let meta = ServerMeta::open_or_create(dir, id)?;
    let (store, entries, recovery) = FileLogStore::open_with(dir, config.server.log_segment_bytes)?;
    let (hard_file, hard) = HardStateFile::open(dir)?;
    // Whatever recovery read may sit only in the page cache after a process crash: make it
    // durable before reporting it as our log position.
    store.syncer().sync()?;
    let tracer = kvraft_tracing::tracer_for(&config.tracing, &format!("server{id}")).await?;
    if let Some(t) = &tracer {
        t.create_trace().record_action(&ServerStart {
            server_id: id,
            term: hard.term.0,
            last_log_index: entries.last().map_or(0, |e| e.index),
        });
    }
    tracing::info!(
        server = id,
        uuid = %meta.uuid,
        entries = recovery.entries,
        torn_tail_bytes = recovery.truncated_tail_bytes,
        segments = recovery.segments,
        converted = recovery.converted_legacy_log,
        term = hard.term.0,
        "ServerStart: recovered {}",
        dir.display()
    );
    let rcfg = ReplicaConfig {
        id: NodeId(id),
        servers: config.server_ids(),
        uuid: meta.uuid.clone(),
        session_ttl_ms: config.server.session_ttl_ms,
        sessions_max: config.server.sessions_max,
        session_window: kvraft_common::limits::SESSION_WINDOW_MAX,
        heartbeat_ms: config.server.replication_heartbeat_ms,
        log_tail_entries: config.server.log_tail_entries,
        log_tail_bytes: usize::try_from(config.server.log_tail_bytes).unwrap_or(usize::MAX),
        snapshot_chunk_bytes: config.server.snapshot_chunk_bytes as usize,
        snapshot_bytes_per_sec: config.server.snapshot_bytes_per_sec,
        max_value_bytes: config.server.max_value(),
    };
    let state_path = dir.join(STATE_FILE);
    let engine = tokio::task::block_in_place(|| RedbEngine::open(&state_path))?;
    let mut sm = StateMachine::open(
        Box::new(engine),
        config.server.session_ttl_ms,
        config.server.sessions_max,
    )?;
    // Reads at a past revision keep as much history as watches do.
    sm.set_past_bounds(
        usize::try_from(config.server.watch_history_revisions).unwrap_or(usize::MAX),
        usize::try_from(config.server.watch_history_bytes).unwrap_or(usize::MAX),
    );
    tracing::info!(
        server = id,
        applied = sm.last_applied(),
        "state machine opened at {}",
        state_path.display()
    );
    let mut storage = DiskStorage {
        store,
        hard_file,
        faults: faults.clone(),
    };
    let first = storage.store.first_index();
    let (first, entries) =
        crate::log_writer::finish_interrupted_install(&sm, first, entries, &mut storage)?;
    let replica = Replica::recovered(rcfg, hard, first, entries, sm).map_err(|e| {
        anyhow::anyhow!(
            "data directory {}: {e}; the state file and the log do not belong together \
             (start the server with an empty directory to rebuild it from the cluster)",
            dir.display()
        )
    })?;
    let mut replica = replica;
    replica.record_changes(true);
    let watch = Arc::new(WatchHub::new(
        replica.last_applied().0,
        usize::try_from(config.server.watch_history_revisions).unwrap_or(usize::MAX),
        usize::try_from(config.server.watch_history_bytes).unwrap_or(usize::MAX),
    ));
    let metrics = ServerMetrics::new();
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let handle = CoreHandle {
        tx: tx.clone(),
        max_value_bytes: config.server.max_value(),
        grpc_message_bytes: config.server.grpc_message_bytes(),
        digests: Arc::new(tokio::sync::Semaphore::new(1)),
        faults: faults.clone(),
        fault_injection_allowed,
        id: NodeId(id),
        data_dir: dir.to_path_buf(),
        next_stream: Arc::new(AtomicU64::new(1)),
        last_coord_contact_ms: Arc::new(AtomicU64::new(0)),
        disk_full: Arc::new(AtomicBool::new(false)),
        tracer: tracer.clone(),
        watch: watch.clone(),
        metrics: metrics.clone(),
    };
    let peers = spawn_peer_links(&config, NodeId(id), tx.clone(), faults.clone(), &tracer)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc = tokio::spawn(service::serve(listener, handle.clone(), stop_rx.clone()));
    let _metrics_server = match &me.metrics_addr {
        Some(addr) => Some(service::start_metrics(addr, handle.clone()).await?),
        None => None,
    };
    tokio::spawn(service::join_coord(config.clone(), handle.clone(), stop_rx));
    let core = Core {
        exec: Executor::new(replica),
        io: ServerIo {
            storage,
            replies: HashMap::new(),
            peers,
            streams: HashMap::new(),
            faults,
            tx,
            disk_full: handle.disk_full.clone(),
            trace: tracer.clone().map(|t| TraceEvents::new(t, id)),
            otel: kvraft_telemetry::enabled().then(OtelSpans::default),
            meta,
            watch,
            metrics,
            appended_since_sync: 0,
            leader_seen: NodeId::NONE,
            refusals_logged_ms: 0,
            refusals_unlogged: 0,
        },
        next_reply: ReplyTo(1),
        heartbeat_ms: config.server.replication_heartbeat_ms,
        state_synced_ms: monotonic_ms(),
        state_sync_ms: config.server.state_sync_ms,
        state_sync_in_flight: false,
        foreign_clusters: Default::default(),
    };
    // The core runs as a task of the runtime, not on the thread that started it: a handler
    // that feeds it and the core then share a worker thread, with no cross-thread wake-up.
    let result = match tokio::spawn(core.run(rx, shutdown)).await {
        Ok(result) => result,
        Err(e) => Err(anyhow::anyhow!("the core task failed: {e}")),
    };
    let _ = stop_tx.send(true);
    let _ = grpc.await;
    if let Some(t) = &tracer {
        t.close().await;
    }
    result
}

/// The core task: the shared [`Executor`] (the replica core and its log writer) over this
/// server's files, peer links and gRPC replies.
struct Core {
    exec: Executor,
    io: ServerIo,
    next_reply: ReplyTo,
    heartbeat_ms: u64,
    /// When the state machine was last written for a durable commit, and how often it is
    /// (`[server] state_sync_ms`, default 1 s). Entries applied in between wait in memory
    /// (bounded by `state_machine::OVERLAY_KEYS_MAX` and `OVERLAY_BYTES_MAX`, past which they
    /// are written early, not durably) and go to the engine in one transaction; a crash replays
    /// them from the log. Fewer, larger writes cost the B-tree far less: with 10 ms between
    /// writes, a 3-server bench at 64 in flight wrote 5.5 times the bytes of the log and ran at
    /// 0.74 times the throughput; at 1 s, 1.3 times and 0.95 times.
    state_synced_ms: u64,
    state_sync_ms: u64,
    state_sync_in_flight: bool,
    /// Foreign cluster ids already logged (once each, however often they come; bounded by
    /// [`FOREIGN_CLUSTERS_LOGGED_MAX`]).
    foreign_clusters: std::collections::BTreeSet<String>,
}

/// What the executor runs against in a real server: the data directory's files, the peer
/// links, the waiting gRPC calls, and the side outputs (watches, metrics, trace events).
struct ServerIo {
    storage: DiskStorage,
    replies: HashMap<ReplyTo, oneshot::Sender<Result<Reply, tonic::Status>>>,
    peers: HashMap<NodeId, mpsc::Sender<AppendEntriesRequest>>,
    streams: HashMap<StreamId, ResponseSender>,
    faults: Arc<Faults>,
    tx: mpsc::Sender<Input>,
    /// Set while the log's backlog is not empty; the client services refuse writes meanwhile.
    disk_full: Arc<AtomicBool>,
    /// Trace events; `None` when tracing is off.
    trace: Option<TraceEvents>,
    /// OpenTelemetry spans of replication; `None` unless spans are exported.
    otel: Option<OtelSpans>,
    /// Holds the data-directory lock for the life of the server.
    meta: ServerMeta,
    /// Where applied changes go for watches.
    watch: Arc<WatchHub>,
    metrics: Arc<ServerMetrics>,
    /// Entries appended since the last fsync started (its batch size, for the metrics).
    appended_since_sync: u64,
    /// The leader this server knew after the last batch (leader changes, for the metrics).
    leader_seen: NodeId,
    /// When a refused peer message was last logged, and how many were refused since without a
    /// line (see [`REFUSALS_LOGGED_EVERY_MS`]).
    refusals_logged_ms: u64,
    refusals_unlogged: u64,
}

impl Core {
    fn replica(&self) -> &Replica {
        self.exec.replica()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        // The tick drives heartbeats and probe retries: a fraction of the heartbeat period.
        let tick_ms = (self.heartbeat_ms / 4).clamp(1, 10);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    self.exec.step(Event::Tick { now_ms: monotonic_ms() });
                }
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input)?;
                    for _ in 1..INPUT_BATCH_MAX {
                        let Ok(input) = rx.try_recv() else { break };
                        self.handle(input)?;
                    }
                }
            }
            self.exec
                .execute(&mut self.io)
                .context("stopping the server")?;
            self.sync_state_if_due(false)?;
        }
        self.sync_state_if_due(true)?;
        tracing::info!(server = %self.replica().id(), "server stopping");
        Ok(())
    }

    /// Coord messages must carry this directory's cluster id (the first coord contact
    /// records it). Another id is refused with an error naming the directory and both ids,
    /// and the server keeps running: anyone can send these RPCs until they are authenticated,
    /// so a mismatch must not stop the server. A heartbeat without an id (a coord that lost
    /// its directory asks before it has re-adopted the id) is answered as a status probe: it
    /// neither designates a leader nor moves the term. Only failing to record the id is fatal.
    fn check_cluster(&mut self, call: &mut Call) -> anyhow::Result<Result<(), tonic::Status>> {
        let (Call::CoordHeartbeat { cluster_id, .. } | Call::Prepare { cluster_id, .. }) = &*call
        else {
            return Ok(Ok(()));
        };
        let cluster_id = cluster_id.clone();
        let recorded = self.io.meta.cluster_id().map(str::to_string);
        if cluster_id.is_empty() {
            match (call, recorded) {
                (_, None) => {}
                (
                    Call::CoordHeartbeat {
                        term,
                        leader,
                        catching_up,
                        ..
                    },
                    Some(_),
                ) => {
                    (*term, *leader, *catching_up) = (0, NodeId::NONE, None);
                }
                (_, Some(ours)) => {
                    let msg = format!(
                        "Prepare without a cluster id refused: data directory {} belongs to \
                         cluster {ours}",
                        self.io.meta.dir().display()
                    );
                    return Ok(Err(tonic::Status::failed_precondition(msg)));
                }
            }
            return Ok(Ok(()));
        }
        let ours = tokio::task::block_in_place(|| self.io.meta.check_cluster_id(&cluster_id))
            .context("cannot record the cluster id; stopping the server")?;
        if ours {
            return Ok(Ok(()));
        }
        let ours = recorded.unwrap_or_default();
        let msg = format!(
            "data directory {} belongs to cluster {ours}, but this message comes from a coord \
             of cluster {cluster_id}; use the directory with its own cluster, or a fresh one",
            self.io.meta.dir().display()
        );
        if self.foreign_clusters.len() < FOREIGN_CLUSTERS_LOGGED_MAX
            && self.foreign_clusters.insert(cluster_id)
        {
            tracing::error!(server = %self.replica().id(), "{msg}");
        }
        Ok(Err(tonic::Status::failed_precondition(msg)))
    }

    fn handle(&mut self, input: Input) -> anyhow::Result<()> {
        let event = match input {
            Input::View(reply) => {
                let view = tokio::task::block_in_place(|| self.exec.replica_mut().state_view());
                self.check_engine()?;
                let _ = reply.send(view);
                return Ok(());
            }
            Input::Call(mut call, reply) => {
                if let Err(refused) = self.check_cluster(&mut call)? {
                    let _ = reply.send(Err(refused));
                    return Ok(());
                }
                if let (Call::Put(cmd, Some(trace_id), _), Some(t)) = (&call, &mut self.io.trace) {
                    t.put_received(cmd.session_id, cmd.seq, *trace_id);
                }
                if let (Call::Put(cmd, _, context), Some(o)) = (&mut call, &mut self.io.otel) {
                    o.put_received(cmd.session_id, cmd.seq, std::mem::take(context));
                }
                let to = self.next_reply;
                self.next_reply = self.next_reply.next();
                self.io.replies.insert(to, reply);
                call.into_event(to)
            }
            Input::StreamOpened(id, sender) => {
                self.io.streams.insert(id, sender);
                return Ok(());
            }
            Input::StreamClosed(id) => {
                self.io.streams.remove(&id);
                if let Some(t) = &mut self.io.trace {
                    t.stream_closed(id);
                }
                if let Some(o) = &mut self.io.otel {
                    o.stream_closed(id);
                }
                return Ok(());
            }
            Input::AppendEntries(stream, req) => {
                tracing::trace!(
                    prev = req.prev_log_index,
                    n = req.entries.len(),
                    "AppendEntriesRequestRecvd"
                );
                if let Some(t) = &mut self.io.trace {
                    t.append_received(stream, &req);
                }
                if let Some(o) = &mut self.io.otel {
                    o.append_received(stream, &req);
                }
                Event::AppendEntries { stream, req }
            }
            Input::AppendResponse(resp) => {
                tracing::trace!(
                    from = resp.follower_id,
                    m = resp.match_index,
                    ok = resp.success,
                    "AppendEntriesResponseRecvd"
                );
                if let Some(t) = &mut self.io.trace {
                    t.response_received(&resp);
                }
                Event::AppendEntriesResponse { resp }
            }
            Input::PeerDisconnected(peer) => Event::PeerDisconnected { peer },
            Input::StateSynced(applied, result) => {
                result.context("cannot make the state machine durable; stopping the server")?;
                tracing::trace!(%applied, "state machine durable");
                self.state_sync_in_flight = false;
                Event::StateDurable { applied }
            }
            Input::Synced(write_id, result) => {
                result.context("fsync of the log failed; stopping the server")?;
                tracing::trace!(write_id, "log fsynced");
                self.exec.log_synced(write_id);
                return Ok(());
            }
        };
        self.exec.step(event);
        Ok(())
    }

    /// Writes what the state machine applied to its engine and makes it durable, every
    /// `state_sync_ms`: the write here, the durable commit (an fsync) on a blocking
    /// thread, so the core goes on serving meanwhile. Until it completes the log holds what
    /// was applied, and a restart replays that much. With `now` (shutdown) both happen here.
    fn sync_state_if_due(&mut self, now: bool) -> anyhow::Result<()> {
        let at = monotonic_ms();
        if now {
            tokio::task::block_in_place(|| self.exec.replica_mut().sync_state())
                .context("cannot make the state machine durable; stopping the server")?;
            return Ok(());
        }
        if self.state_sync_in_flight || at < self.state_synced_ms + self.state_sync_ms {
            return Ok(());
        }
        self.state_synced_ms = at;
        let started = std::time::Instant::now();
        let keys = tokio::task::block_in_place(|| self.exec.replica_mut().write_state());
        let took = started.elapsed();
        if took.as_millis() as u64 >= ENGINE_WRITE_SLOW_MS {
            tracing::debug!(server = %self.replica().id(), took_ms = took.as_millis() as u64, keys, "engine write");
        }
        self.adapt_engine_writes(keys, took);
        self.check_engine()?;
        self.state_sync_in_flight = true;
        let applied = self.replica().last_applied();
        // Fetched each time: an installed snapshot replaces the engine's file.
        let (syncer, tx) = (self.replica().state_machine().syncer(), self.io.tx.clone());
        tokio::task::spawn_blocking(move || {
            let result = syncer.sync();
            let _ = tx.blocking_send(Input::StateSynced(applied, result));
        });
        Ok(())
    }

    /// Sizes the engine writes so that one holds the core task for about
    /// [`ENGINE_WRITE_TARGET_MS`]: from the cost per key of the last write, the overlay is
    /// written early (not durably) once it holds that many keys. A write's cost grows with the
    /// keys it changes (a B-tree copies every leaf it touches): at 1,000,000 keys one second of
    /// changes took 140–335 ms in one write, long enough for the coord to fail the server; split,
    /// each write is short and the total about the same.
    fn adapt_engine_writes(&mut self, keys: usize, took: Duration) {
        if keys < ENGINE_WRITE_SAMPLE_KEYS_MIN {
            return;
        }
        let micros_per_key = (took.as_micros() as f64 / keys as f64).max(0.01);
        let fits = (ENGINE_WRITE_TARGET_MS as f64 * 1000.0 / micros_per_key) as usize;
        self.exec
            .replica_mut()
            .set_state_write_keys(fits.max(ENGINE_WRITE_KEYS_MIN));
    }

    /// Stops the server once the state machine's engine has failed.
    fn check_engine(&self) -> anyhow::Result<()> {
        match self.replica().failure() {
            Some(failure) => {
                anyhow::bail!("the state machine's engine failed: {failure}; stopping the server")
            }
            None => Ok(()),
        }
    }
}

impl ServerIo {
    /// Logs a refused peer message, at most once per [`REFUSALS_LOGGED_EVERY_MS`].
    fn log_refusal(&mut self, server: NodeId, from: NodeId, reason: &str) {
        let now = monotonic_ms();
        if self.refusals_logged_ms != 0 && now < self.refusals_logged_ms + REFUSALS_LOGGED_EVERY_MS
        {
            self.refusals_unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut self.refusals_unlogged);
        self.refusals_logged_ms = now.max(1);
        tracing::warn!(
            %server,
            peer = %from,
            "refused a peer message: {reason} ({unlogged} more refused since the last line)"
        );
    }

    /// The injected crash faults: `crash_after_commit` exits as leader once the index is
    /// committed, before any reply of this batch is sent; `crash_after_snapshot_install`
    /// exits after an install, before the log reset that follows it.
    fn check_crash_faults(&self, replica: &Replica, cmds: &[Command]) {
        let index = self.faults.crash_after_commit();
        if index > 0 && replica.is_leader() && replica.commit_index().0 >= index {
            tracing::warn!(
                index,
                commit = %replica.commit_index(),
                "fault injection: crashing after commit, before replying"
            );
            std::process::exit(86);
        }
        if self.faults.crash_after_snapshot_install()
            && cmds.iter().any(|c| matches!(c, Command::ResetLog(_)))
        {
            tracing::warn!(
                "fault injection: crashing after a snapshot install, before the log reset"
            );
            std::process::exit(87);
        }
    }
}

impl Io for ServerIo {
    fn storage(&mut self) -> &mut dyn Storage {
        &mut self.storage
    }

    fn inspect(&mut self, replica: &Replica, cmds: &mut Vec<Command>) {
        self.check_crash_faults(replica, cmds);
        for cmd in cmds.iter() {
            if let Command::AppendLog(entries) = cmd {
                self.appended_since_sync += entries.len() as u64;
                if let Some(t) = &mut self.trace {
                    t.appended(entries, replica.is_leader());
                }
            }
        }
    }

    fn publish(&mut self, replica: &Replica, installed: Option<LogIndex>, changes: Vec<Change>) {
        // An install in this batch replaced the state: watches restart from it before the
        // changes applied after it are published.
        if let Some(index) = installed {
            self.watch.reset(index.0);
        }
        self.watch.publish(changes, replica.last_applied().0);
        if replica.leader_hint() != self.leader_seen {
            self.leader_seen = replica.leader_hint();
            self.metrics.leader_changes.inc();
        }
    }

    /// Group commit: one fsync at a time, on a blocking thread, covering every write that
    /// reached the OS before it starts.
    fn start_log_sync(&mut self, write_id: u64) {
        let syncer: Arc<dyn Syncer> = self.storage.store.syncer();
        let tx = self.tx.clone();
        self.metrics
            .fsync_entries
            .observe(std::mem::take(&mut self.appended_since_sync) as f64);
        let seconds = self.metrics.fsync_seconds.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = syncer.sync();
            seconds.observe(started.elapsed().as_secs_f64());
            let _ = tx.blocking_send(Input::Synced(write_id, result));
        });
    }

    fn send_append(&mut self, to: NodeId, mut req: AppendEntriesRequest) {
        self.metrics
            .entries_replicated
            .inc_by(req.entries.len() as u64);
        let bytes: usize = req.entries.iter().map(prost::Message::encoded_len).sum();
        self.metrics.bytes_replicated.inc_by(bytes as u64);
        if let Some(peer) = self.peers.get(&to) {
            if let Some(t) = &mut self.trace {
                t.sending_append(to.0, &mut req);
            }
            if let Some(o) = &self.otel {
                o.sending_append(&mut req);
            }
            if peer.try_send(req).is_err() {
                tracing::debug!(peer = %to, "peer queue full; message dropped");
            }
        }
    }

    fn send_append_response(&mut self, stream: StreamId, mut resp: AppendEntriesResponse) {
        if let Some(s) = self.streams.get(&stream) {
            if let Some(t) = &mut self.trace {
                t.sending_response(stream, &mut resp);
            }
            if let Some(o) = &mut self.otel {
                o.sending_response(stream, &resp);
            }
            let _ = s.try_send(Ok(resp));
        }
    }

    fn reply(&mut self, to: ReplyTo, mut reply: Reply) {
        if let Reply::Report(report) | Reply::Status { report, .. } = &mut reply {
            report.cluster_id = self.meta.cluster_id().unwrap_or_default().to_string();
        }
        if let Some(tx) = self.replies.remove(&to) {
            let _ = tx.send(Ok(reply));
        }
    }

    fn notice(&mut self, replica: &Replica, cmd: Command) {
        let server = replica.id();
        match cmd {
            Command::Refused { from, reason } => self.log_refusal(server, from, &reason),
            Command::SnapshotSending {
                to,
                index,
                bytes,
                done,
            } => {
                if done {
                    tracing::info!(%server, peer = %to, %index, bytes, "snapshot sent");
                } else {
                    tracing::info!(%server, peer = %to, %index, "sending a snapshot");
                }
            }
            Command::SnapshotInstalled { index, term } => {
                tracing::info!(%server, %index, %term, "snapshot installed");
            }
            Command::RoleChanged { leader, term } => {
                let tag = if leader {
                    "BecameLeader"
                } else {
                    "BecameFollower"
                };
                tracing::info!(%server, %term, "{tag}");
                if let Some(t) = &mut self.trace {
                    t.role_changed(leader, term.0);
                }
            }
            other => unreachable!("not an informational command: {other:?}"),
        }
    }

    fn disk_full_changed(&mut self, change: DiskFull) {
        match change {
            DiskFull::Full(e) => {
                self.disk_full.store(true, Ordering::Relaxed);
                tracing::error!(
                    "{e}: disk full; client writes refused, nothing unwritten is acknowledged, \
                     retrying until space returns"
                );
            }
            DiskFull::Writable => {
                self.disk_full.store(false, Ordering::Relaxed);
                tracing::warn!("log writable again; writes resume");
            }
        }
    }
}

/// The data directory's log and hard state, with the disk-full fault hook. Appends only reach
/// the page cache; truncation, compaction, a reset and a hard-state save fsync or remove
/// files, so those leave the worker thread to the other tasks meanwhile.
struct DiskStorage {
    store: FileLogStore,
    hard_file: HardStateFile,
    faults: Arc<Faults>,
}

impl LogDisk for DiskStorage {
    fn append(&mut self, entries: &[kvraft_proto::LogEntry]) -> Result<(), StorageError> {
        if self.faults.disk_full() {
            return Err(StorageError::disk_full("log (fault injection)"));
        }
        self.store.append(entries)
    }
    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
        tokio::task::block_in_place(|| self.store.truncate_from(index))
    }
    fn compact_to(&mut self, index: u64) -> Result<usize, StorageError> {
        let removed = tokio::task::block_in_place(|| self.store.compact_to(index))?;
        if removed > 0 {
            tracing::debug!(upto = index, removed, "log compacted");
        }
        Ok(removed)
    }
    fn reset_to(&mut self, next: u64) -> Result<(), StorageError> {
        tokio::task::block_in_place(|| self.store.reset_to(next))?;
        tracing::info!(next, "log reset after a snapshot");
        Ok(())
    }
}

impl Storage for DiskStorage {
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        tokio::task::block_in_place(|| self.hard_file.save(hs))
    }
}

fn spawn_peer_links(
    config: &ClusterConfig,
    me: NodeId,
    tx: mpsc::Sender<Input>,
    faults: Arc<Faults>,
    tracer: &Option<Tracer>,
) -> anyhow::Result<HashMap<NodeId, mpsc::Sender<AppendEntriesRequest>>> {
    let mut peers = HashMap::new();
    for s in config.servers.iter().filter(|s| s.id != me.0) {
        let endpoint = Endpoint::from_shared(format!("http://{}", s.addr))
            .with_context(|| format!("servers id {}: bad addr {}", s.id, s.addr))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let (ptx, prx) = mpsc::channel(PEER_QUEUE_MAX);
        let link = PeerLink {
            peer: NodeId(s.id),
            channel,
            core: tx.clone(),
            faults: faults.clone(),
            tracer: tracer.clone(),
            grpc_message_bytes: config.server.grpc_message_bytes(),
        };
        tokio::spawn(link.run(prx));
        peers.insert(NodeId(s.id), ptx);
    }
    Ok(peers)
}

/// Carries AppendEntries to one follower over one ordered stream at a time, and its
/// acknowledgements back to the core.
struct PeerLink {
    peer: NodeId,
    channel: Channel,
    core: mpsc::Sender<Input>,
    faults: Arc<Faults>,
    tracer: Option<Tracer>,
    /// The gRPC message limit (`ServerOptions::grpc_message_bytes`).
    grpc_message_bytes: usize,
}

impl PeerLink {
    /// A message with a trace token leaves only once the events it covers are shipped.
    async fn flush_trace(&self, msg: &AppendEntriesRequest) {
        if let (Some(t), false) = (&self.tracer, msg.trace_token.is_empty()) {
            t.flush().await;
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<AppendEntriesRequest>) {
        while let Some(first) = rx.recv().await {
            if self.faults.drops_to(self.peer) {
                continue;
            }
            self.stream(first, &mut rx).await;
            if self
                .core
                .send(Input::PeerDisconnected(self.peer))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(PEER_RECONNECT_MS)).await;
        }
    }

    /// One stream's life: returns when it breaks or a partition fault cuts it.
    async fn stream(
        &self,
        first: AppendEntriesRequest,
        rx: &mut mpsc::Receiver<AppendEntriesRequest>,
    ) {
        let (out_tx, out_rx) = mpsc::channel(PEER_QUEUE_MAX);
        self.flush_trace(&first).await;
        if out_tx.send(first).await.is_err() {
            return;
        }
        let mut client = ReplicationClient::new(self.channel.clone())
            .max_decoding_message_size(self.grpc_message_bytes)
            .max_encoding_message_size(self.grpc_message_bytes);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(out_rx);
        let mut inbound = match client.replicate(outbound).await {
            Ok(resp) => resp.into_inner(),
            Err(e) => {
                tracing::debug!(peer = %self.peer, "replication stream failed: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    if self.faults.drops_to(self.peer) {
                        if self.faults.drops_from(self.peer) {
                            return; // both ways: the link is down
                        }
                        continue; // one way: this message is lost
                    }
                    let delay = self.faults.delay();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    self.flush_trace(&msg).await;
                    if out_tx.send(msg).await.is_err() {
                        return;
                    }
                }
                resp = inbound.message() => {
                    let Ok(Some(resp)) = resp else { return };
                    if self.faults.drops_from(self.peer) {
                        return;
                    }
                    if self.core.send(Input::AppendResponse(resp)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
