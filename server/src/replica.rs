//! The replica core: every decision a server makes, with no IO, no clock and no tokio.
//!
//! ```text
//!   Event (coord heartbeat / prepare, AppendEntries and acks, client requests,
//!          Persisted, Tick{now_ms})
//!        │
//!        ▼
//!   Replica::step ──▶ Vec<Command> (save hard state, append / truncate log, send, reply)
//! ```
//!
//! The runtime executes commands in the order given. The ordering rules it relies on:
//! - `SaveHardState` is durable before any later command runs (a Prepare is acknowledged only
//!   after the new term is fsynced, DESIGN.md rule 5);
//! - log writes (`AppendLog`, `TruncateLog`) reach the OS in order and become durable by a
//!   group fsync whose completion comes back as `Event::Persisted { write_id }`, where write
//!   ids count the log-write commands from 1. The core acknowledges entries (to a leader, or
//!   itself for commit) only up to `durable_index`, so nothing is acknowledged before it is
//!   fsynced.
//!
//! Terms come only from the coord (`Prepare`, and heartbeats naming the leader of a term); a
//! server never makes up a term. A server accepts one leader per term and refuses any other.
//!
//! Determinism: the core keeps its maps ordered (BTreeMap), so the same events give the same
//! commands in the same order, which a seeded simulation relies on to replay a run.
//!
//! Invariants checked with assertions: committed entries are never truncated; the commit index
//! never decreases; entries apply in order exactly once.
//!
//! By role, in child modules: `replica_leader.rs` (leadership, follower progress, commit
//! quorums, catching-up peers), `replica_clients.rs` (sessions, puts, ReadIndex reads),
//! `replica_follower.rs` (AppendEntries checks, log matching, merging, acknowledgements),
//! `replica_durability.rs` (which prefix of the log is fsynced), `replica_snapshot.rs`
//! (snapshot transfer, both sides); the in-memory log with its compacted base is
//! `replica_log.rs`. This file holds the types, recovery, the step loop, terms, commit and
//! apply, compaction and the timer.

use std::collections::{BTreeMap, VecDeque};

use kvraft_common::{limits, LogIndex, NodeId, Term};
use kvraft_proto::log_entry::Payload;
use kvraft_proto::{
    AppendEntriesRequest, AppendEntriesResponse, LogEntry, Noop, PutCommand, RegisterSession,
    ServerReport, TxnCommand,
};
use prost::bytes::Bytes;
use prost::Message;

use crate::replica_log::{LogBase, ReplicaLog};

#[path = "replica_clients.rs"]
mod clients;
#[path = "replica_durability.rs"]
mod durability;
#[path = "replica_follower.rs"]
mod follower;
#[path = "replica_leader.rs"]
mod leader;
#[path = "replica_snapshot.rs"]
mod snapshot;

use crate::state_machine::{Outcome, PutError, RangePage, StateMachine, Versioned, WriteResult};
use crate::storage::HardState;
use durability::Durability;

/// Most entries in one AppendEntries message.
pub const BATCH_ENTRIES_MAX: usize = 512;
/// Byte budget of one AppendEntries message (at least one entry is always sent); the gRPC
/// message limit is derived from it and the largest value.
pub use kvraft_common::limits::BATCH_BYTES_MAX;
/// Most entries sent to one follower and not yet acknowledged: bounds the memory a slow
/// follower can pin in the leader's send queue.
pub const INFLIGHT_ENTRIES_MAX: u64 = 4096;
/// A probe unanswered for this many heartbeat periods is sent again.
pub const PROBE_RETRY_HEARTBEATS: u64 = 4;
/// A leader that has not heard from a majority (itself included) for this many heartbeat
/// periods reports itself to the coord as not leading. The coord can still reach it, so it
/// would never be failed; this way a leader cut from its peers is replaced (the coord's
/// designated-leader check) instead of leaving the cluster without a working leader.
pub const QUORUM_LOSS_HEARTBEATS: u64 = 6;

/// Most attempts of one put that may wait for it at once; more are refused as unavailable
/// (each holds a reply slot until the put applies).
pub const PUT_ATTEMPTS_WAITING_MAX: usize = 16;

/// Opaque handle the runtime uses to route a reply to the waiting gRPC call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplyTo(pub u64);

impl ReplyTo {
    /// The handle after this one (the runtime and the simulation number requests from 1).
    pub fn next(self) -> ReplyTo {
        ReplyTo(self.0 + 1)
    }
}
/// A client request's identity (DESIGN rule 7): its session and its sequence number in it.
/// Attempts of one request share it; the state machine applies it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub session: u64,
    pub seq: u64,
}

/// Opaque handle of an incoming replication stream (a leader talking to this follower).
pub type StreamId = u64;

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub id: NodeId,
    /// Every configured server, this one included.
    pub servers: Vec<NodeId>,
    pub uuid: String,
    pub session_ttl_ms: u64,
    pub sessions_max: usize,
    /// Most unacknowledged requests per session (`seq < ack_seq + window`); at most, and in
    /// production equal to, [`limits::SESSION_WINDOW_MAX`], which kvslib keeps to. Smaller
    /// only in the simulation, so its clients reach the window.
    pub session_window: u64,
    /// Period of the leader's empty AppendEntries.
    pub heartbeat_ms: u64,
    /// Entries kept below the state machine's durable position, in memory and in the log
    /// files, for followers that lag a little (one further behind gets a snapshot): at most
    /// this many, and at most about `log_tail_bytes`.
    pub log_tail_entries: u64,
    pub log_tail_bytes: usize,
    /// Size of one snapshot chunk (one in flight per follower).
    pub snapshot_chunk_bytes: usize,
    /// Pace of a snapshot transfer to one follower, in bytes per second (0: as fast as the
    /// follower acknowledges chunks), so a rebuild leaves the leader's CPU and disk to clients.
    pub snapshot_bytes_per_sec: u64,
    /// Longest value a put may carry (`[server] max_value_bytes`).
    pub max_value_bytes: usize,
}

#[derive(Debug)]
pub enum Event {
    Tick {
        now_ms: u64,
    },
    /// The coord's view: `leader` designated for `term` (0 = none known), and the servers
    /// that lost their storage and catch up before they count again (DESIGN rule 10), each
    /// with the storage identity it came back with.
    CoordHeartbeat {
        term: Term,
        leader: NodeId,
        catching_up: Option<Vec<(NodeId, String)>>,
        reply: ReplyTo,
    },
    Prepare {
        term: Term,
        reply: ReplyTo,
    },
    AppendEntries {
        stream: StreamId,
        req: AppendEntriesRequest,
    },
    AppendEntriesResponse {
        resp: AppendEntriesResponse,
    },
    /// The stream to `peer` broke: messages may have been lost.
    PeerDisconnected {
        peer: NodeId,
    },
    RegisterSession {
        client_id: String,
        reply: ReplyTo,
    },
    Put {
        cmd: PutCommand,
        reply: ReplyTo,
    },
    Txn {
        cmd: TxnCommand,
        reply: ReplyTo,
    },
    Get {
        key: Bytes,
        reply: ReplyTo,
    },
    Range {
        query: RangeQuery,
        reply: ReplyTo,
    },
    /// Every log write with id <= write_id is durable.
    Persisted {
        write_id: u64,
    },
    /// The state machine is durable up to this applied index (a restart no longer needs the
    /// log at or below it).
    StateDurable {
        applied: LogIndex,
    },
    Status {
        reply: ReplyTo,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    NotLeader {
        leader: NodeId,
        term: Term,
    },
    SessionExpired,
    Stale,
    /// The request breaks a rule of the protocol, whatever the server's state; the message
    /// names the field. Definite: the same request is refused everywhere, always.
    Invalid(String),
    /// This server cannot take the request now (the message says why); another server or a
    /// later attempt may. Never a verdict on whether an earlier attempt applied.
    Unavailable(String),
    /// A read at a revision this server no longer holds (the message names the oldest it
    /// does).
    Compacted(String),
}

/// A linearizable read of keys `[start, end)` (an empty `end`: no upper bound).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeQuery {
    pub start: Bytes,
    pub end: Bytes,
    /// Most keys (at most [`limits::RANGE_LIMIT_MAX`]).
    pub limit: u64,
    pub keys_only: bool,
    /// Read as of this revision; 0 = the latest (see [`crate::past`] for how far back).
    pub revision: u64,
}

/// A key as a read found it, and the store's revision then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub value: Option<Versioned>,
    pub revision: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Report(ServerReport),
    Prepare {
        ok: bool,
        term: Term,
        last_log_term: Term,
        last_log_index: LogIndex,
        /// This server's storage identity (the coord counts only voters' answers, rule 10).
        uuid: String,
    },
    Registered(Result<u64, ClientError>),
    /// The answer to a put or a transaction.
    Write {
        result: Result<WriteResult, ClientError>,
        duplicate: bool,
    },
    Get(Result<ReadResult, ClientError>),
    Range(Result<(RangePage, u64), ClientError>),
    Status {
        report: ServerReport,
        last_applied: LogIndex,
        log: LogStatus,
        /// As leader: each follower's match index (empty otherwise).
        followers: Vec<(NodeId, LogIndex)>,
        /// Client sessions held.
        sessions: u64,
    },
}

/// The in-memory log and snapshot figures `Admin.Status` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStatus {
    pub base_index: u64,
    pub entries_held: u64,
    pub bytes_held: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Make the hard state durable before running any later command.
    SaveHardState(HardState),
    /// Write entries at the end of the log (no fsync: see `Event::Persisted`).
    AppendLog(Vec<LogEntry>),
    /// Remove every entry with index >= the given one.
    TruncateLog(LogIndex),
    /// Entries at or below this index are no longer needed (the state machine holds them
    /// durably, and the kept tail is below): the store may delete them.
    CompactLog(LogIndex),
    /// Discard the whole log durably before any later command runs; it continues at the
    /// given index (after an installed snapshot).
    ResetLog(LogIndex),
    SendAppend {
        to: NodeId,
        req: AppendEntriesRequest,
    },
    SendAppendResponse {
        stream: StreamId,
        resp: AppendEntriesResponse,
    },
    Reply {
        to: ReplyTo,
        reply: Reply,
    },
    /// Informational: this server became leader / follower (for logs and traces).
    RoleChanged {
        leader: bool,
        term: Term,
    },
    /// Informational: a snapshot transfer to `to` started (`done` false) or completed, with
    /// the bytes sent; for the log.
    SnapshotSending {
        to: NodeId,
        index: LogIndex,
        bytes: u64,
        done: bool,
    },
    /// Informational: this follower installed a snapshot of the leader's state machine.
    SnapshotInstalled {
        index: LogIndex,
        term: Term,
    },
    /// Informational: a peer message was refused as invalid (DESIGN rule 11); for the log.
    Refused {
        from: NodeId,
        reason: String,
    },
}

#[derive(Debug)]
struct Peer {
    next_index: LogIndex,
    match_index: LogIndex,
    /// Highest ReadIndex round the peer has confirmed in this term.
    acked_round: u64,
    /// After a rejection or a broken stream: one message at a time until the logs match.
    probing: bool,
    probe_outstanding: bool,
    last_sent_ms: u64,
    /// Last time the peer answered in this term (any answer confirms it follows us).
    last_ack_ms: u64,
    /// The snapshot transfer in flight, while the peer needs entries this leader compacted.
    snapshot: Option<snapshot::Outgoing>,
}

#[derive(Debug)]
enum ReadQuery {
    Get(Bytes),
    Range(RangeQuery),
}

#[derive(Debug)]
struct PendingRead {
    query: ReadQuery,
    reply: ReplyTo,
    round: u64,
    /// Commit index when the read arrived (set once the no-op has committed).
    read_index: Option<LogIndex>,
}

#[derive(Debug)]
struct Leader {
    peers: BTreeMap<NodeId, Peer>,
    noop_index: LogIndex,
    /// Latest ReadIndex round sent to followers.
    read_round: u64,
    /// Reads wait for a round to be sent.
    round_wanted: bool,
    reads: VecDeque<PendingRead>,
    /// Attempts waiting for `(session, seq)`, and the highest `ack_seq` appended for it.
    put_waiters: BTreeMap<RequestId, PutWaiters>,
    register_waiters: BTreeMap<LogIndex, ReplyTo>,
    /// Log time (what entries are stamped with, for session expiry) is the time of the last
    /// entry when this leadership began plus the leader's own clock since then: it never goes
    /// back, and a wall-clock jump or skew on any one server moves it not at all.
    log_time_base_ms: u64,
    now_base_ms: u64,
    /// Catching-up peers (DESIGN rule 10): the storage identity each came back with and the
    /// index it must hold (matched in this term) before it counts again.
    catch_up_targets: BTreeMap<NodeId, (String, LogIndex)>,
    /// Last snapshot transfer id used in this term.
    next_transfer: u64,
}

/// The attempts of one put waiting for it to apply (at most [`PUT_ATTEMPTS_WAITING_MAX`]).
#[derive(Debug)]
struct PutWaiters {
    replies: Vec<ReplyTo>,
    /// Highest `ack_seq` among the copies appended: a retry with a higher one is appended
    /// again, since its `ack_seq` may release the first copy from waiting for seqs the client
    /// has given up on.
    ack_seq: u64,
}

pub struct Replica {
    cfg: ReplicaConfig,
    majority: usize,
    hard: HardState,
    /// The entries after the compacted base.
    log: ReplicaLog,
    commit_index: LogIndex,
    sm: StateMachine,
    durability: Durability,
    /// The follower's log equals the current leader's up to here (reset on a new term).
    verified_index: LogIndex,
    /// Stream (and last ReadIndex round) of the current leader, acknowledged again whenever
    /// more of the log becomes durable.
    ack_stream: Option<(StreamId, u64)>,
    /// The snapshot this follower is receiving.
    incoming: Option<snapshot::Incoming>,
    /// Snapshots sent and installed (the other fields unused).
    snapshot_counts: LogStatus,
    leader: Option<Leader>,
    /// The coord's list of servers catching up after losing their storage (rule 10), with the
    /// storage identity each came back with.
    catching_up: BTreeMap<NodeId, String>,
    /// The last term this process answered `Prepare` for (in memory: a restarted process has
    /// answered none). Only the process whose answer the coord chose may lead that term.
    prepared_term: Term,
    /// This server's own clock, in ms from any origin; only ever moves forward.
    now_ms: u64,
    out: Vec<Command>,
}

impl Replica {
    /// A replica with an empty state machine in memory over `entries` (tests).
    pub fn new(cfg: ReplicaConfig, hard: HardState, entries: Vec<LogEntry>) -> Self {
        let sm = StateMachine::new(cfg.session_ttl_ms, cfg.sessions_max);
        Self::recovered(cfg, hard, 1, entries, sm).expect("invariant: an empty state fits any log")
    }

    /// Whether a log starting at `log_start` (the index of its first entry, or of the next one
    /// when it holds none) and holding `entries` fits the state machine `sm`: it must hold the
    /// last applied entry with the same term, or start right after it. The state machine
    /// applies only entries durable in the log and the log is compacted only below what the
    /// state machine made durable, so it always does, unless the files come from different
    /// servers or histories, or a snapshot was installed and the log not yet reset (see
    /// [`StateMachine::from_snapshot`]).
    pub fn log_fits(sm: &StateMachine, log_start: u64, entries: &[LogEntry]) -> Result<(), String> {
        let applied = sm.last_applied();
        let end = log_start + entries.len() as u64 - 1;
        if log_start > applied + 1 {
            return Err(format!(
                "the log starts at entry {log_start}, but the state file has applied only up to \
                 {applied}: the entries between are missing"
            ));
        }
        if applied == 0 || log_start == applied + 1 {
            return Ok(());
        }
        let term = entries.get((applied - log_start) as usize).map(|e| e.term);
        if term == Some(sm.applied_term()) {
            return Ok(());
        }
        Err(format!(
            "the state file has applied entry {applied} of term {}, but the log {}",
            sm.applied_term(),
            match term {
                None => format!("ends at {end}"),
                Some(t) => format!("holds term {t} there"),
            }
        ))
    }

    /// A replica recovered from disk: `entries` are the log (durable), starting at
    /// `log_start` (see [`Replica::log_fits`], which they must pass), `hard` the hard state,
    /// `sm` the state machine as its engine holds it.
    pub fn recovered(
        cfg: ReplicaConfig,
        hard: HardState,
        log_start: u64,
        mut entries: Vec<LogEntry>,
        sm: StateMachine,
    ) -> Result<Self, String> {
        assert!(cfg.servers.contains(&cfg.id), "invariant: id is configured");
        assert!(log_start >= 1, "invariant: log indices start at 1");
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.index,
                log_start + i as u64,
                "invariant: recovered log is dense"
            );
        }
        let durable_index = log_start + entries.len() as u64 - 1;
        assert!(
            (1..=limits::SESSION_WINDOW_MAX).contains(&cfg.session_window),
            "invariant: 1 <= session_window <= SESSION_WINDOW_MAX"
        );
        Self::log_fits(&sm, log_start, &entries)?;
        let applied = sm.last_applied();
        // The base is an entry whose term is known: the state machine's position when the log
        // starts right after it, else the log's first entry (dropped from memory).
        let base = if log_start == 1 {
            LogBase::default()
        } else if log_start == applied + 1 {
            LogBase {
                index: applied,
                term: sm.applied_term(),
                time_ms: sm.applied_time_ms(),
            }
        } else {
            let first = entries.remove(0);
            LogBase {
                index: first.index,
                term: first.term,
                time_ms: first.time_ms,
            }
        };
        let sm = sm.with_session_window(cfg.session_window);
        Ok(Replica {
            majority: cfg.servers.len() / 2 + 1,
            cfg,
            hard,
            log: ReplicaLog::new(base, entries),
            // Only committed entries are ever applied.
            commit_index: LogIndex(applied),
            sm,
            durability: Durability::recovered(LogIndex(durable_index)),
            verified_index: LogIndex(0),
            ack_stream: None,
            incoming: None,
            snapshot_counts: LogStatus::default(),
            leader: None,
            catching_up: BTreeMap::new(),
            prepared_term: Term(0),
            now_ms: 0,
            out: Vec::new(),
        })
    }

    // ------------------------------------------------------------------ queries

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn term(&self) -> Term {
        self.hard.term
    }
    pub fn is_leader(&self) -> bool {
        self.leader.is_some()
    }
    pub fn leader_hint(&self) -> NodeId {
        self.hard.leader
    }
    pub fn commit_index(&self) -> LogIndex {
        self.commit_index
    }
    pub fn last_applied(&self) -> LogIndex {
        LogIndex(self.sm.last_applied())
    }
    pub fn last_index(&self) -> LogIndex {
        LogIndex(self.log.last_index())
    }
    pub fn durable_index(&self) -> LogIndex {
        self.durability.durable_index
    }
    pub fn entry(&self, index: u64) -> Option<&LogEntry> {
        self.log.get(index)
    }
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    /// See [`StateMachine::record_changes`].
    pub fn record_changes(&mut self, on: bool) {
        self.sm.record_changes(on);
    }

    /// See [`StateMachine::take_changes`].
    pub fn take_changes(&mut self) -> Vec<crate::state_machine::Change> {
        self.sm.take_changes()
    }

    /// The in-memory log's base: entries at or below it are compacted.
    pub fn log_base(&self) -> LogBase {
        self.log.base()
    }

    /// The term at `index`, 0 where it is not known (compacted, or beyond the end); callers
    /// that may ask below the base say what that means for them.
    fn term_at(&self, index: LogIndex) -> Term {
        Term(self.log.term_at(index.0).unwrap_or(0))
    }

    pub fn report(&self) -> ServerReport {
        let durable = self.durability.durable_index;
        ServerReport {
            server_id: self.cfg.id.0,
            uuid: self.cfg.uuid.clone(),
            term: self.hard.term.0,
            role: if self.leads_a_majority() {
                kvraft_proto::Role::Leader as i32
            } else {
                kvraft_proto::Role::Follower as i32
            },
            leader_id: self.hard.leader.0,
            last_log_term: self.term_at(durable).0,
            last_log_index: durable.0,
            commit_index: self.commit_index.0,
            // Filled in by the runtime, which owns the data directory's identity.
            cluster_id: String::new(),
            caught_up: self.caught_up(),
            catching_up: self.catching_up.contains_key(&self.cfg.id),
        }
    }

    // ------------------------------------------------------------------ step

    /// Feeds one event; returns the commands to execute, in order.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        match event {
            Event::Tick { now_ms } => self.on_tick(now_ms),
            Event::CoordHeartbeat {
                term,
                leader,
                catching_up,
                reply,
            } => self.on_coord_heartbeat(term, leader, catching_up, reply),
            Event::Prepare { term, reply } => self.on_prepare(term, reply),
            Event::AppendEntries { stream, req } => self.on_append_entries(stream, req),
            Event::AppendEntriesResponse { resp } => self.on_append_response(resp),
            Event::PeerDisconnected { peer } => self.on_peer_disconnected(peer),
            Event::RegisterSession { client_id, reply } => self.on_register(client_id, reply),
            Event::Put { cmd, reply } => self.on_put(cmd, reply),
            Event::Txn { cmd, reply } => self.on_txn(cmd, reply),
            Event::Get { key, reply } => self.on_read(ReadQuery::Get(key), reply),
            Event::Range { query, reply } => self.on_read(ReadQuery::Range(query), reply),
            Event::Persisted { write_id } => self.on_persisted(write_id),
            Event::StateDurable { applied } => self.compact(applied),
            Event::Status { reply } => {
                let followers = self.leader.as_ref().map_or(Vec::new(), |l| {
                    l.peers.iter().map(|(id, p)| (*id, p.match_index)).collect()
                });
                let status = Reply::Status {
                    followers,
                    sessions: self.sm.session_count() as u64,
                    report: self.report(),
                    last_applied: LogIndex(self.sm.last_applied()),
                    log: LogStatus {
                        base_index: self.log.base().index,
                        entries_held: self.log.held() as u64,
                        bytes_held: self.log.bytes() as u64,
                        ..self.snapshot_counts
                    },
                };
                self.reply(reply, status)
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Called after a batch of events: sends followers what they miss (one batched message
    /// for many appended entries), starts a ReadIndex round if reads wait, answers the reads
    /// that are ready.
    pub fn flush(&mut self) -> Vec<Command> {
        self.send_to_all(false);
        self.flush_reads();
        std::mem::take(&mut self.out)
    }

    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        self.out.push(Command::Reply { to, reply });
    }

    fn not_leader(&self) -> ClientError {
        ClientError::NotLeader {
            leader: self.hard.leader,
            term: self.hard.term,
        }
    }

    // ------------------------------------------------------------------ terms

    /// Durably moves to a newer term (DESIGN rule 1), dropping leadership of the old one.
    fn adopt_term(&mut self, term: Term, leader: NodeId) {
        assert!(term > self.hard.term, "invariant: terms only grow");
        self.hard = HardState { term, leader };
        self.out.push(Command::SaveHardState(self.hard));
        // Waiting clients are told about the new term (their retry hint).
        self.step_down();
        self.verified_index = LogIndex(0);
        self.ack_stream = None;
        self.incoming = None;
    }

    fn accept_leader(&mut self, leader: NodeId) {
        assert!(self.hard.leader.is_none(), "invariant: one leader per term");
        self.hard.leader = leader;
        self.out.push(Command::SaveHardState(self.hard));
    }

    fn step_down(&mut self) {
        let Some(leader) = self.leader.take() else {
            return;
        };
        let err = self.not_leader();
        for read in leader.reads {
            let reply = match read.query {
                ReadQuery::Get(_) => Reply::Get(Err(err.clone())),
                ReadQuery::Range(_) => Reply::Range(Err(err.clone())),
            };
            self.reply(read.reply, reply);
        }
        for (_, waiters) in leader.put_waiters {
            for w in waiters.replies {
                let reply = Reply::Write {
                    result: Err(err.clone()),
                    duplicate: false,
                };
                self.reply(w, reply);
            }
        }
        for (_, w) in leader.register_waiters {
            self.reply(w, Reply::Registered(Err(err.clone())));
        }
        self.out.push(Command::RoleChanged {
            leader: false,
            term: self.hard.term,
        });
    }

    fn on_coord_heartbeat(
        &mut self,
        term: Term,
        leader: NodeId,
        catching_up: Option<Vec<(NodeId, String)>>,
        reply: ReplyTo,
    ) {
        if let Some(list) = catching_up {
            self.update_catching_up(list);
        }
        if leader.is_none() && term > self.hard.term && self.blank() {
            // A new or wiped directory takes the coord's term as its floor before it follows
            // anyone (see `blank`).
            self.adopt_term(term, NodeId::NONE);
        }
        if !leader.is_none() {
            if term > self.hard.term && leader != self.cfg.id {
                self.adopt_term(term, leader);
            } else if term == self.hard.term && self.hard.leader.is_none() {
                if leader == self.cfg.id && self.prepared_term != term {
                    // Designated on a Prepare answer this process did not give: it restarted
                    // since, or its storage was replaced (rule 10) and the coord chose it for
                    // a log it no longer holds. It must not lead; the coord sees it report
                    // "follower" and starts a new term.
                } else {
                    self.accept_leader(leader);
                    // Leadership of a term starts only here, right after the designation is
                    // saved. A server that restarts with `leader == self` saved never leads
                    // that term again: it may have lost entries of the term that followers
                    // hold, and a second no-op at the same index would break log matching
                    // (rule 6). The coord sees it report "follower" and starts a new term.
                    if leader == self.cfg.id {
                        self.become_leader();
                    }
                }
            }
        }
        let report = self.report();
        self.reply(reply, Reply::Report(report));
    }

    /// Epoch change, phase one (DESIGN rule 2): fence first (adopt the term durably), then
    /// report the durable log position.
    fn on_prepare(&mut self, term: Term, reply: ReplyTo) {
        if term < self.hard.term {
            let reply_msg = Reply::Prepare {
                ok: false,
                term: self.hard.term,
                last_log_term: Term(0),
                last_log_index: LogIndex(0),
                uuid: self.cfg.uuid.clone(),
            };
            return self.reply(reply, reply_msg);
        }
        if term > self.hard.term {
            self.adopt_term(term, NodeId::NONE);
        }
        self.prepared_term = term;
        let durable = self.durability.durable_index;
        let reply_msg = Reply::Prepare {
            ok: true,
            term,
            last_log_term: self.term_at(durable),
            last_log_index: durable,
            uuid: self.cfg.uuid.clone(),
        };
        self.reply(reply, reply_msg);
    }

    // ------------------------------------------------------------------ commit and apply

    fn set_commit(&mut self, index: LogIndex) {
        assert!(
            index >= self.commit_index,
            "invariant: commit index never decreases"
        );
        assert!(
            index <= self.last_index(),
            "invariant: commit within the log"
        );
        if index == self.commit_index {
            return;
        }
        self.commit_index = index;
        self.apply_committed();
    }

    /// Applies committed entries that are durable in this server's log (so the log holds
    /// every entry the engine has applied: a restart replays what the engine had not made
    /// durable). They reach the engine with the next [`Replica::write_state`].
    fn apply_committed(&mut self) {
        let to = self.commit_index.min(self.durability.durable_index);
        while self.last_applied() < to && self.sm.failure().is_none() {
            let index = self.sm.last_applied() + 1;
            let entry = self
                .log
                .get(index)
                .expect("invariant: unapplied entries are held");
            let outcomes = self.sm.apply(entry);
            for outcome in outcomes {
                self.answer(outcome);
            }
        }
    }

    /// Writes what was applied since the last call to the engine, as one atomic batch (not
    /// durable: see [`Replica::sync_state`]); returns how many keys and sessions it wrote.
    pub fn write_state(&mut self) -> usize {
        self.sm.finish_batch()
    }

    /// See [`StateMachine::set_write_keys_max`].
    pub fn set_state_write_keys(&mut self, keys: usize) {
        self.sm.set_write_keys_max(keys);
    }

    /// Makes the state machine durable up to what it has applied; returns that index. The log
    /// below it is no longer needed for a restart.
    pub fn sync_state(&mut self) -> Result<LogIndex, crate::engine::EngineError> {
        self.sm.sync().map(LogIndex)
    }

    /// Log compaction: drops the entries at or below `applied` (durable in the state machine)
    /// but for the kept tail (`log_tail_entries`, `log_tail_bytes`), from memory and, by
    /// `CompactLog`, from the store. A follower that needs a dropped entry gets a snapshot.
    fn compact(&mut self, applied: LogIndex) {
        let applied = applied.min(self.last_applied()).0;
        let point =
            self.log
                .compaction_point(applied, self.cfg.log_tail_entries, self.cfg.log_tail_bytes);
        let point = match self.leader.as_ref().and_then(Self::transfers_floor) {
            Some(floor) => point.min(floor),
            None => point,
        };
        if point > self.log.base().index {
            self.log.compact_to(point);
            self.out.push(Command::CompactLog(LogIndex(point)));
        }
    }

    /// A consistent view of the whole state machine as applied now (for a digest).
    pub fn state_view(
        &mut self,
    ) -> Result<Box<dyn crate::engine::SnapshotSource>, crate::engine::EngineError> {
        self.sm.snapshot()
    }

    /// The state machine's engine failed: the server must stop, and nothing this step
    /// returned may be executed (its answers may rest on a write that did not happen).
    pub fn failure(&self) -> Option<&str> {
        self.sm.failure()
    }

    // ------------------------------------------------------------------ time

    fn on_tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(leader) = &self.leader else { return };
        let hb = self.cfg.heartbeat_ms;
        let due: Vec<NodeId> = leader
            .peers
            .iter()
            .filter(|(_, p)| self.now_ms >= p.last_sent_ms + hb)
            .map(|(&id, _)| id)
            .collect();
        let stuck: Vec<NodeId> = leader
            .peers
            .iter()
            .filter(|(_, p)| {
                p.probe_outstanding && self.now_ms >= p.last_sent_ms + hb * PROBE_RETRY_HEARTBEATS
            })
            .map(|(&id, _)| id)
            .collect();
        let leader = self.leader.as_mut().expect("invariant: checked above");
        for id in stuck {
            if let Some(p) = leader.peers.get_mut(&id) {
                p.probe_outstanding = false;
            }
        }
        for id in due {
            self.send_to(id, true);
        }
        for id in self.paced_snapshots_due() {
            self.send_snapshot(id);
        }
    }
}
