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

use std::collections::{BTreeMap, VecDeque};

use kvraft_common::{limits, NodeId};
use kvraft_proto::log_entry::Payload;
use kvraft_proto::{
    AppendEntriesRequest, AppendEntriesResponse, LogEntry, Noop, PutCommand, RegisterSession,
    ServerReport,
};
use prost::bytes::Bytes;
use prost::Message;

use crate::replica_log::{LogBase, ReplicaLog};

#[path = "replica_snapshot.rs"]
mod snapshot;
use crate::state_machine::{Outcome, PutError, PutResult, StateMachine};
use crate::storage::HardState;

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
pub type ReplyTo = u64;
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
        term: u64,
        leader: NodeId,
        catching_up: Option<Vec<(NodeId, String)>>,
        reply: ReplyTo,
    },
    Prepare {
        term: u64,
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
    Get {
        key: Bytes,
        reply: ReplyTo,
    },
    /// Every log write with id <= write_id is durable.
    Persisted {
        write_id: u64,
    },
    /// The state machine is durable up to this applied index (a restart no longer needs the
    /// log at or below it).
    StateDurable {
        applied: u64,
    },
    Status {
        reply: ReplyTo,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    NotLeader {
        leader: NodeId,
        term: u64,
    },
    SessionExpired,
    Stale,
    /// The request breaks a rule of the protocol, whatever the server's state; the message
    /// names the field. Definite: the same request is refused everywhere, always.
    Invalid(String),
    /// This server cannot take the request now (the message says why); another server or a
    /// later attempt may. Never a verdict on whether an earlier attempt applied.
    Unavailable(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Report(ServerReport),
    Prepare {
        ok: bool,
        term: u64,
        last_log_term: u64,
        last_log_index: u64,
        /// This server's storage identity (the coord counts only voters' answers, rule 10).
        uuid: String,
    },
    Registered(Result<u64, ClientError>),
    Put {
        result: Result<PutResult, ClientError>,
        duplicate: bool,
    },
    Get(Result<Option<(Bytes, u64)>, ClientError>),
    Status {
        report: ServerReport,
        last_applied: u64,
        log: LogStatus,
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
    TruncateLog(u64),
    /// Entries at or below this index are no longer needed (the state machine holds them
    /// durably, and the kept tail is below): the store may delete them.
    CompactLog(u64),
    /// Discard the whole log durably before any later command runs; it continues at the
    /// given index (after an installed snapshot).
    ResetLog(u64),
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
        term: u64,
    },
    /// Informational: a snapshot transfer to `to` started (`done` false) or completed, with
    /// the bytes sent; for the log.
    SnapshotSending {
        to: NodeId,
        index: u64,
        bytes: u64,
        done: bool,
    },
    /// Informational: this follower installed a snapshot of the leader's state machine.
    SnapshotInstalled {
        index: u64,
        term: u64,
    },
    /// Informational: a peer message was refused as invalid (DESIGN rule 11); for the log.
    Refused {
        from: NodeId,
        reason: String,
    },
}

#[derive(Debug)]
struct Peer {
    next_index: u64,
    match_index: u64,
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
struct PendingRead {
    key: Bytes,
    reply: ReplyTo,
    round: u64,
    /// Commit index when the read arrived (set once the no-op has committed).
    read_index: Option<u64>,
}

#[derive(Debug)]
struct Leader {
    peers: BTreeMap<NodeId, Peer>,
    noop_index: u64,
    /// Latest ReadIndex round sent to followers.
    read_round: u64,
    /// Reads wait for a round to be sent.
    round_wanted: bool,
    reads: VecDeque<PendingRead>,
    /// Attempts waiting for `(session, seq)`, and the highest `ack_seq` appended for it.
    put_waiters: BTreeMap<(u64, u64), PutWaiters>,
    register_waiters: BTreeMap<u64, ReplyTo>,
    /// Log time (what entries are stamped with, for session expiry) is the time of the last
    /// entry when this leadership began plus the leader's own clock since then: it never goes
    /// back, and a wall-clock jump or skew on any one server moves it not at all.
    log_time_base_ms: u64,
    now_base_ms: u64,
    /// Catching-up peers (DESIGN rule 10): the storage identity each came back with and the
    /// index it must hold (matched in this term) before it counts again.
    catch_up_targets: BTreeMap<NodeId, (String, u64)>,
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

/// Tracks which prefix of the current log is fsynced. Each log write is remembered with the
/// last index the log had after it; a truncation clamps every remembered write, so a sync that
/// covers writes made before a truncation never vouches for entries written after it.
#[derive(Debug, Default)]
struct Durability {
    written: u64,
    pending: VecDeque<(u64, u64)>,
    durable_index: u64,
}

impl Durability {
    fn wrote(&mut self, last_index: u64) {
        self.written += 1;
        self.pending.push_back((self.written, last_index));
    }

    fn truncated(&mut self, from: u64) {
        let keep = from - 1;
        self.durable_index = self.durable_index.min(keep);
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(keep);
        }
    }

    /// The log was discarded for a snapshot of everything up to `index` (durable).
    fn reset(&mut self, index: u64) {
        self.durable_index = index;
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(index);
        }
    }

    fn persisted(&mut self, write_id: u64) {
        while let Some(&(id, last)) = self.pending.front() {
            if id > write_id {
                break;
            }
            self.pending.pop_front();
            self.durable_index = self.durable_index.max(last);
        }
    }
}

pub struct Replica {
    cfg: ReplicaConfig,
    majority: usize,
    hard: HardState,
    /// The entries after the compacted base.
    log: ReplicaLog,
    commit_index: u64,
    sm: StateMachine,
    durability: Durability,
    /// The follower's log equals the current leader's up to here (reset on a new term).
    verified_index: u64,
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
    prepared_term: u64,
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
            commit_index: applied,
            sm,
            durability: Durability {
                durable_index,
                ..Durability::default()
            },
            verified_index: 0,
            ack_stream: None,
            incoming: None,
            snapshot_counts: LogStatus::default(),
            leader: None,
            catching_up: BTreeMap::new(),
            prepared_term: 0,
            now_ms: 0,
            out: Vec::new(),
        })
    }

    // ------------------------------------------------------------------ queries

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn term(&self) -> u64 {
        self.hard.term
    }
    pub fn is_leader(&self) -> bool {
        self.leader.is_some()
    }
    pub fn leader_hint(&self) -> NodeId {
        NodeId(self.hard.leader)
    }
    pub fn commit_index(&self) -> u64 {
        self.commit_index
    }
    pub fn last_applied(&self) -> u64 {
        self.sm.last_applied()
    }
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }
    pub fn durable_index(&self) -> u64 {
        self.durability.durable_index
    }
    pub fn entry(&self, index: u64) -> Option<&LogEntry> {
        self.log.get(index)
    }
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    /// The in-memory log's base: entries at or below it are compacted.
    pub fn log_base(&self) -> LogBase {
        self.log.base()
    }

    /// The term at `index`, 0 where it is not known (compacted, or beyond the end); callers
    /// that may ask below the base say what that means for them.
    fn term_at(&self, index: u64) -> u64 {
        self.log.term_at(index).unwrap_or(0)
    }

    pub fn report(&self) -> ServerReport {
        let durable = self.durability.durable_index;
        ServerReport {
            server_id: self.cfg.id.0,
            uuid: self.cfg.uuid.clone(),
            term: self.hard.term,
            role: if self.leads_a_majority() {
                kvraft_proto::Role::Leader as i32
            } else {
                kvraft_proto::Role::Follower as i32
            },
            leader_id: self.hard.leader,
            last_log_term: self.term_at(durable),
            last_log_index: durable,
            commit_index: self.commit_index,
            // Filled in by the runtime, which owns the data directory's identity.
            cluster_id: String::new(),
            caught_up: self.caught_up(),
            catching_up: self.catching_up.contains_key(&self.cfg.id),
        }
    }

    /// As leader: the catching-up peers that hold their target index, matched in this term.
    fn caught_up(&self) -> Vec<kvraft_proto::StorageMember> {
        let Some(leader) = &self.leader else {
            return Vec::new();
        };
        leader
            .catch_up_targets
            .iter()
            .filter(|(id, (_, target))| {
                leader
                    .peers
                    .get(id)
                    .is_some_and(|p| p.match_index >= *target)
            })
            .map(|(id, (uuid, _))| kvraft_proto::StorageMember {
                server_id: id.0,
                uuid: uuid.clone(),
            })
            .collect()
    }

    /// Whether `peer`'s acknowledgements count towards commit and read quorums: not while it
    /// catches up after losing its storage (DESIGN rule 10), until it holds its target.
    fn counts(leader: &Leader, peer: NodeId) -> bool {
        match leader.catch_up_targets.get(&peer) {
            None => true,
            Some((_, target)) => leader
                .peers
                .get(&peer)
                .is_some_and(|p| p.match_index >= *target),
        }
    }

    /// The `majority`-th highest value among this leader's own and its counted peers' values,
    /// or `None` when fewer than a majority of all servers count. Quorums are always majorities
    /// of all configured servers (rule 3); a catching-up peer only makes them harder to reach.
    fn quorum_value(&self, own: u64, of_peer: impl Fn(&Peer) -> u64) -> Option<u64> {
        let leader = self.leader.as_ref()?;
        let mut values: Vec<u64> = leader
            .peers
            .iter()
            .filter(|(&id, _)| Self::counts(leader, id))
            .map(|(_, p)| of_peer(p))
            .collect();
        values.push(own);
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.get(self.majority - 1).copied()
    }

    /// Leader of its term and heard from a majority within [`QUORUM_LOSS_HEARTBEATS`].
    /// Catching-up peers count here: this only tells whether the leader is cut off from its
    /// peers, and one that could not commit while a wiped follower catches up must go on
    /// leading so that the follower can catch up at all.
    pub fn leads_a_majority(&self) -> bool {
        let Some(leader) = &self.leader else {
            return false;
        };
        let mut acks: Vec<u64> = leader.peers.values().map(|p| p.last_ack_ms).collect();
        acks.push(self.now_ms);
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let window = self.cfg.heartbeat_ms * QUORUM_LOSS_HEARTBEATS;
        self.now_ms <= acks[self.majority - 1].saturating_add(window)
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
            Event::Get { key, reply } => self.on_get(key, reply),
            Event::Persisted { write_id } => self.on_persisted(write_id),
            Event::StateDurable { applied } => self.compact(applied),
            Event::Status { reply } => {
                let status = Reply::Status {
                    report: self.report(),
                    last_applied: self.sm.last_applied(),
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
            leader: NodeId(self.hard.leader),
            term: self.hard.term,
        }
    }

    // ------------------------------------------------------------------ terms

    /// Durably moves to a newer term (DESIGN rule 1), dropping leadership of the old one.
    fn adopt_term(&mut self, term: u64, leader: NodeId) {
        assert!(term > self.hard.term, "invariant: terms only grow");
        self.hard = HardState {
            term,
            leader: leader.0,
        };
        self.out.push(Command::SaveHardState(self.hard));
        // Waiting clients are told about the new term (their retry hint).
        self.step_down();
        self.verified_index = 0;
        self.ack_stream = None;
        self.incoming = None;
    }

    fn accept_leader(&mut self, leader: NodeId) {
        assert_eq!(self.hard.leader, 0, "invariant: one leader per term");
        self.hard.leader = leader.0;
        self.out.push(Command::SaveHardState(self.hard));
    }

    fn step_down(&mut self) {
        let Some(leader) = self.leader.take() else {
            return;
        };
        let err = self.not_leader();
        for read in leader.reads {
            self.reply(read.reply, Reply::Get(Err(err.clone())));
        }
        for (_, waiters) in leader.put_waiters {
            for w in waiters.replies {
                let reply = Reply::Put {
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
        term: u64,
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
            } else if term == self.hard.term && self.hard.leader == 0 {
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

    /// Takes the coord's list of catching-up servers (rule 10). A leader sets each new one a
    /// target: its last index now, which covers every committed entry. A peer leaves the
    /// leader's list only once it has reached its target, so a stale or reordered heartbeat
    /// can never make a peer count before it holds what it may have lost.
    fn update_catching_up(&mut self, list: Vec<(NodeId, String)>) {
        let configured = |id: &NodeId| self.cfg.servers.contains(id);
        self.catching_up = list.into_iter().filter(|(id, _)| configured(id)).collect();
        let last = self.last_index();
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        for (&id, uuid) in &self.catching_up {
            if id == self.cfg.id {
                continue;
            }
            match leader.catch_up_targets.get(&id) {
                Some((known, _)) if known == uuid => {}
                _ => {
                    leader.catch_up_targets.insert(id, (uuid.clone(), last));
                    // What it acknowledged before it lost its storage no longer holds.
                    if let Some(peer) = leader.peers.get_mut(&id) {
                        peer.match_index = 0;
                        peer.next_index = peer.next_index.min(last + 1);
                        peer.probing = true;
                        peer.probe_outstanding = false;
                    }
                }
            }
        }
        let listed = &self.catching_up;
        let peers = &leader.peers;
        leader.catch_up_targets.retain(|id, (_, target)| {
            listed.contains_key(id) || peers.get(id).is_none_or(|p| p.match_index < *target)
        });
    }

    /// Epoch change, phase one (DESIGN rule 2): fence first (adopt the term durably), then
    /// report the durable log position.
    fn on_prepare(&mut self, term: u64, reply: ReplyTo) {
        if term < self.hard.term {
            let reply_msg = Reply::Prepare {
                ok: false,
                term: self.hard.term,
                last_log_term: 0,
                last_log_index: 0,
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

    /// DESIGN rule 4: a new leader appends a no-op of its term and serves nothing until it
    /// commits.
    fn become_leader(&mut self) {
        if self.leader.is_some() {
            return;
        }
        let next = self.last_index() + 1;
        let peers = self
            .cfg
            .servers
            .iter()
            .filter(|&&p| p != self.cfg.id)
            .map(|&p| {
                let peer = Peer {
                    next_index: next,
                    match_index: 0,
                    acked_round: 0,
                    probing: true,
                    probe_outstanding: false,
                    last_sent_ms: 0,
                    last_ack_ms: self.now_ms,
                    snapshot: None,
                };
                (p, peer)
            })
            .collect();
        self.leader = Some(Leader {
            peers,
            noop_index: next,
            read_round: 0,
            round_wanted: false,
            reads: VecDeque::new(),
            put_waiters: BTreeMap::new(),
            register_waiters: BTreeMap::new(),
            log_time_base_ms: self.log.last_time_ms(),
            now_base_ms: self.now_ms,
            catch_up_targets: BTreeMap::new(),
            next_transfer: 0,
        });
        self.out.push(Command::RoleChanged {
            leader: true,
            term: self.hard.term,
        });
        self.append_local(Payload::Noop(Noop {}));
        // Catching-up peers must reach at least the no-op: it follows every committed entry.
        let listed: Vec<(NodeId, String)> =
            std::mem::take(&mut self.catching_up).into_iter().collect();
        self.update_catching_up(listed);
        self.advance_commit();
    }

    // ------------------------------------------------------------------ leader: log

    fn append_local(&mut self, payload: Payload) -> u64 {
        let index = self.last_index() + 1;
        let leader = self
            .leader
            .as_ref()
            .expect("invariant: only a leader appends");
        let elapsed_ms = self.now_ms.saturating_sub(leader.now_base_ms);
        let previous_ms = self.log.last_time_ms();
        let entry = LogEntry {
            term: self.hard.term,
            index,
            time_ms: previous_ms.max(leader.log_time_base_ms.saturating_add(elapsed_ms)),
            payload: Some(payload),
        };
        self.log.push(entry.clone());
        self.durability.wrote(index);
        self.out.push(Command::AppendLog(vec![entry]));
        index
    }

    fn send_to_all(&mut self, heartbeat: bool) {
        let Some(leader) = &self.leader else { return };
        let peers: Vec<NodeId> = leader.peers.keys().copied().collect();
        for p in peers {
            self.send_to(p, heartbeat);
        }
    }

    /// Sends what `peer` is missing, within the in-flight window; with `heartbeat`, sends at
    /// least one (possibly empty) message.
    fn send_to(&mut self, peer_id: NodeId, heartbeat: bool) {
        let last = self.last_index();
        let now = self.now_ms;
        let leader = self.leader.as_mut().expect("invariant: only leaders send");
        let read_round = leader.read_round;
        let base = self.log.base();
        let peer = leader
            .peers
            .get_mut(&peer_id)
            .expect("invariant: known peer");
        if peer.snapshot.is_some() || peer.next_index <= base.index {
            // It needs entries this leader compacted: a snapshot, plus empty heartbeats at the
            // base (their answers confirm read rounds; their hints are ignored meanwhile).
            if heartbeat {
                peer.last_sent_ms = now;
                let req = self.append_request(base.index + 1, base.index, read_round);
                self.out.push(Command::SendAppend { to: peer_id, req });
            }
            return self.send_snapshot(peer_id);
        }
        let mut sends = Vec::new();
        if peer.probing {
            if !peer.probe_outstanding {
                let to = batch_end(&self.log, peer.next_index, last);
                sends.push((peer.next_index, to));
                peer.next_index = to + 1;
                peer.probe_outstanding = true;
            } else if heartbeat {
                sends.push((peer.next_index, peer.next_index - 1));
            }
        } else {
            while peer.next_index <= last
                && peer.next_index - 1 - peer.match_index < INFLIGHT_ENTRIES_MAX
            {
                let from = peer.next_index;
                let to = batch_end(&self.log, from, last);
                sends.push((from, to));
                peer.next_index = to + 1;
            }
            if sends.is_empty() && heartbeat {
                sends.push((peer.next_index, peer.next_index - 1));
            }
        }
        if sends.is_empty() {
            return;
        }
        peer.last_sent_ms = now;
        for (from, to) in sends {
            let req = self.append_request(from, to, read_round);
            self.out.push(Command::SendAppend { to: peer_id, req });
        }
    }

    fn append_request(&self, from: u64, to: u64, read_round: u64) -> AppendEntriesRequest {
        let prev = from - 1;
        let entries = if to >= from {
            self.log.slice(from, to)
        } else {
            Vec::new()
        };
        AppendEntriesRequest {
            term: self.hard.term,
            leader_id: self.cfg.id.0,
            prev_log_index: prev,
            prev_log_term: self.term_at(prev),
            entries,
            leader_commit: self.commit_index,
            read_round,
            snapshot: None,
            trace_context: Default::default(),
            trace_token: Bytes::new(),
        }
    }

    fn on_append_response(&mut self, resp: AppendEntriesResponse) {
        if resp.term > self.hard.term {
            // A newer term exists: step down at once (DESIGN rule 1). The coord names its
            // leader in its next heartbeat.
            self.adopt_term(resp.term, NodeId::NONE);
            return;
        }
        let term = self.hard.term;
        let last = self.last_index();
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if resp.term < term {
            return;
        }
        let Some(peer) = leader.peers.get_mut(&NodeId(resp.follower_id)) else {
            return;
        };
        if resp.match_index > last || resp.read_round > leader.read_round {
            // Claims entries or a round this leader never sent (rule 11): counting it could
            // commit what no majority holds.
            let reason = format!(
                "AppendEntries answer claims match_index {} / read_round {} beyond this leader's \
                 log end {last} / round {}",
                resp.match_index, resp.read_round, leader.read_round
            );
            let from = NodeId(resp.follower_id);
            self.out.push(Command::Refused { from, reason });
            return;
        }
        peer.acked_round = peer.acked_round.max(resp.read_round);
        peer.last_ack_ms = peer.last_ack_ms.max(self.now_ms);
        let base = self.log.base().index;
        if resp.success {
            peer.match_index = peer.match_index.max(resp.match_index);
            peer.next_index = peer.next_index.max(peer.match_index + 1);
            peer.probing = false;
            peer.probe_outstanding = false;
            if peer.match_index >= base {
                if let Some(out) = peer.snapshot.take() {
                    self.snapshot_counts.snapshots_sent += 1;
                    let (index, bytes) = (out.meta.index, out.bytes);
                    let to = NodeId(resp.follower_id);
                    let done = true;
                    self.out.push(Command::SnapshotSending {
                        to,
                        index,
                        bytes,
                        done,
                    });
                }
            }
        } else if resp.snapshot_transfer != 0 {
            let (from, transfer) = (NodeId(resp.follower_id), resp.snapshot_transfer);
            self.on_snapshot_ack(from, transfer, resp.snapshot_next_seq);
        } else if resp.conflict_index > 0 {
            let conflict = resp.conflict_index.min(last + 1);
            if conflict <= peer.match_index {
                // The follower holds less than it acknowledged: it lost its storage (rule 10).
                // Its old acknowledgements no longer count.
                peer.match_index = conflict - 1;
            }
            if peer.snapshot.is_none() {
                peer.next_index = conflict;
                peer.probing = true;
                peer.probe_outstanding = false;
            }
        }
        // A refusal without a hint (the follower follows another leader of this term) leaves
        // the probe outstanding: it is retried on the probe timer, not in a tight loop.
        self.advance_commit();
    }

    fn on_peer_disconnected(&mut self, peer_id: NodeId) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if let Some(peer) = leader.peers.get_mut(&peer_id) {
            if let Some(out) = peer.snapshot.as_mut() {
                out.resend_now();
            }
            peer.probing = true;
            peer.probe_outstanding = false;
            peer.next_index = peer.match_index + 1;
        }
    }

    /// DESIGN rule 3: an entry of the current term commits once fsynced on a majority of all
    /// configured servers (the leader counts itself only up to its own durable index).
    fn advance_commit(&mut self) {
        let Some(candidate) = self.quorum_value(self.durability.durable_index, |p| p.match_index)
        else {
            return;
        };
        if candidate > self.commit_index && self.term_at(candidate) == self.hard.term {
            self.set_commit(candidate);
        }
    }

    fn set_commit(&mut self, index: u64) {
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
        while self.sm.last_applied() < to && self.sm.failure().is_none() {
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
    /// durable: see [`Replica::sync_state`]).
    pub fn write_state(&mut self) {
        self.sm.finish_batch();
    }

    /// Makes the state machine durable up to what it has applied; returns that index. The log
    /// below it is no longer needed for a restart.
    pub fn sync_state(&mut self) -> Result<u64, crate::engine::EngineError> {
        self.sm.sync()
    }

    /// Log compaction: drops the entries at or below `applied` (durable in the state machine)
    /// but for the kept tail (`log_tail_entries`, `log_tail_bytes`), from memory and, by
    /// `CompactLog`, from the store. A follower that needs a dropped entry gets a snapshot.
    fn compact(&mut self, applied: u64) {
        let applied = applied.min(self.sm.last_applied());
        let point =
            self.log
                .compaction_point(applied, self.cfg.log_tail_entries, self.cfg.log_tail_bytes);
        let point = match self.leader.as_ref().and_then(Self::transfers_floor) {
            Some(floor) => point.min(floor),
            None => point,
        };
        if point > self.log.base().index {
            self.log.compact_to(point);
            self.out.push(Command::CompactLog(point));
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

    fn answer(&mut self, outcome: Outcome) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        match outcome {
            Outcome::SessionRegistered { index } => {
                if let Some(w) = leader.register_waiters.remove(&index) {
                    self.reply(w, Reply::Registered(Ok(index)));
                }
            }
            Outcome::Put {
                session_id,
                seq,
                result,
                duplicate,
            } => {
                let waiters = leader.put_waiters.remove(&(session_id, seq));
                let result = result.map_err(client_error);
                for w in waiters.into_iter().flat_map(|w| w.replies) {
                    let reply = Reply::Put {
                        result: result.clone(),
                        duplicate,
                    };
                    self.reply(w, reply);
                }
            }
        }
    }

    // ------------------------------------------------------------------ leader: clients

    fn serving(&self) -> bool {
        self.leader
            .as_ref()
            .is_some_and(|l| self.sm.last_applied() >= l.noop_index)
    }

    fn on_register(&mut self, client_id: String, reply: ReplyTo) {
        if let Err(e) = limits::check_client_id(&client_id) {
            return self.reply(reply, Reply::Registered(Err(ClientError::Invalid(e))));
        }
        if self.leader.is_none() {
            return self.reply(reply, Reply::Registered(Err(self.not_leader())));
        }
        let index = self.append_local(Payload::RegisterSession(RegisterSession { client_id }));
        let leader = self.leader.as_mut().expect("invariant: checked above");
        leader.register_waiters.insert(index, reply);
        self.advance_commit();
    }

    fn on_put(&mut self, cmd: PutCommand, reply: ReplyTo) {
        let refuse = |this: &mut Self, error: ClientError| {
            let reply_msg = Reply::Put {
                result: Err(error),
                duplicate: false,
            };
            this.reply(reply, reply_msg);
        };
        let valid = limits::check_put_seq(
            cmd.session_id,
            cmd.seq,
            cmd.ack_seq,
            self.cfg.session_window,
        )
        .and_then(|()| {
            limits::check_key_value_within(&cmd.key, Some(&cmd.value), self.cfg.max_value_bytes)
        });
        if let Err(e) = valid {
            return refuse(self, ClientError::Invalid(e));
        }
        if self.leader.is_none() {
            return refuse(self, self.not_leader());
        }
        if cmd.session_id > self.last_index() {
            // Session ids are indices of committed entries, and a current leader's log holds
            // every committed entry: this is no session, or this leader is deposed (the put
            // could not commit here anyway). Not definite: an earlier attempt of the same put
            // at the real leader may have applied.
            let e = format!(
                "session_id {} is above this server's last log index {}: not a session here \
                 (register a session first), or this server no longer leads",
                cmd.session_id,
                self.last_index()
            );
            return refuse(self, ClientError::Unavailable(e));
        }
        let key = (cmd.session_id, cmd.seq);
        if self.serving() {
            if let Some(result) = self.sm.cached_result(cmd.session_id, cmd.seq) {
                let reply_msg = Reply::Put {
                    result: Ok(result),
                    duplicate: true,
                };
                return self.reply(reply, reply_msg);
            }
            // A session id this leader has applied but does not hold expired (or never was
            // one): final in every later log too, so it is answered now, nothing appended.
            // A session id above the applied index is not refused: a leader deposed without
            // knowing it has not seen sessions registered under the newer leader, and a
            // SESSION_EXPIRED from that stale view would make kvslib drop a valid session.
            // That put goes to the log; applying it answers once committed.
            if cmd.session_id <= self.sm.last_applied() && !self.sm.has_session(cmd.session_id) {
                return refuse(self, ClientError::SessionExpired);
            }
        }
        let leader = self.leader.as_mut().expect("invariant: checked above");
        if let Some(waiters) = leader.put_waiters.get_mut(&key) {
            if waiters.replies.len() >= PUT_ATTEMPTS_WAITING_MAX {
                let e = format!(
                    "{PUT_ATTEMPTS_WAITING_MAX} attempts of (session {}, seq {}) already wait",
                    cmd.session_id, cmd.seq
                );
                return refuse(self, ClientError::Unavailable(e));
            }
            waiters.replies.push(reply);
            if cmd.ack_seq <= waiters.ack_seq {
                return; // the same request is already in the log, with as much acknowledged
            }
            waiters.ack_seq = cmd.ack_seq;
        } else {
            let waiters = PutWaiters {
                replies: vec![reply],
                ack_seq: cmd.ack_seq,
            };
            leader.put_waiters.insert(key, waiters);
        }
        self.append_local(Payload::Put(cmd));
        self.advance_commit();
    }

    /// DESIGN rule 8: ReadIndex. A read waits for the no-op to commit, records the commit
    /// index, waits for a majority to confirm this leader in a round started after it arrived,
    /// then for the state machine to reach the recorded index.
    fn on_get(&mut self, key: Bytes, reply: ReplyTo) {
        let read_index = self.serving().then_some(self.commit_index);
        let Some(leader) = self.leader.as_mut() else {
            return self.reply(reply, Reply::Get(Err(self.not_leader())));
        };
        leader.round_wanted = true;
        leader.reads.push_back(PendingRead {
            key,
            reply,
            round: leader.read_round + 1,
            read_index,
        });
    }

    /// Starts a ReadIndex round if reads wait for one, and answers every read it can.
    fn flush_reads(&mut self) {
        let serving = self.serving();
        let commit = self.commit_index;
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if serving {
            for read in leader.reads.iter_mut() {
                read.read_index.get_or_insert(commit);
            }
        }
        if leader.round_wanted {
            leader.round_wanted = false;
            leader.read_round += 1;
            self.send_to_all(true);
        }
        let confirmed = self.confirmed_round();
        let applied = self.sm.last_applied();
        let leader = self.leader.as_mut().expect("invariant: checked above");
        let mut ready = Vec::new();
        while let Some(read) = leader.reads.front() {
            let done = read.round <= confirmed && read.read_index.is_some_and(|i| i <= applied);
            if !done {
                break;
            }
            ready.push(leader.reads.pop_front().expect("invariant: front exists"));
        }
        for read in ready {
            let value = self.sm.read(&read.key).map(|v| (v.value, v.version));
            self.reply(read.reply, Reply::Get(Ok(value)));
        }
    }

    /// The highest round that a majority (this leader included) has confirmed.
    fn confirmed_round(&self) -> u64 {
        let Some(leader) = &self.leader else { return 0 };
        self.quorum_value(leader.read_round, |p| p.acked_round)
            .unwrap_or(0)
    }

    // ------------------------------------------------------------------ follower

    /// A server with no term and no log: a new data directory, or one that lost its storage
    /// (rule 10). It may have promised a newer term before it was wiped, so it follows no one
    /// until the coord has told it the current term: otherwise a deposed leader it can still
    /// reach could count its acknowledgements and overwrite committed entries.
    fn blank(&self) -> bool {
        self.hard.term == 0 && self.log.last_index() == 0
    }

    fn on_append_entries(&mut self, stream: StreamId, req: AppendEntriesRequest) {
        let leader = NodeId(req.leader_id);
        if self.blank() {
            return self.respond(stream, false, 0, 0);
        }
        if let Err(reason) = self.check_append(&req) {
            return self.refuse_append(stream, leader, reason);
        }
        if req.term > self.hard.term.saturating_add(1) {
            // Terms come from the coord (rule 1): a peer may move us one term on (the new
            // leader of the next term, whose designation we have not heard yet), no further, so
            // no message of a peer, genuine or forged, can push the term towards 2^64. The
            // coord's heartbeat brings the current term and leader within a heartbeat.
            return self.respond(stream, false, 0, 0);
        }
        if req.term < self.hard.term {
            // Its read round belongs to the older term: echoing it under ours would confirm a
            // round of our term's leader that this answer never saw (rule 8).
            return self.respond(stream, false, 0, 0);
        }
        if let Err(reason) = self.check_committed_prefix(&req) {
            return self.refuse_append(stream, leader, reason);
        }
        if req.term > self.hard.term {
            self.adopt_term(req.term, leader);
        } else if self.hard.leader == 0 {
            self.accept_leader(leader);
        } else if self.hard.leader != leader.0 {
            // One leader per term: refuse any other (DESIGN rule 2).
            return self.respond(stream, false, 0, 0);
        }
        if self.leader.is_some() {
            return; // a leader never receives its own term's AppendEntries from another
        }
        if let Some(chunk) = req.snapshot {
            return self.on_snapshot_chunk(stream, leader, req.term, req.read_round, chunk);
        }
        if let Some(conflict) = self.log_mismatch(req.prev_log_index, req.prev_log_term) {
            return self.respond(stream, false, conflict, req.read_round);
        }
        let end = req.prev_log_index + req.entries.len() as u64;
        self.merge_entries(req.entries);
        self.verified_index = self.verified_index.max(end);
        let commit = req.leader_commit.min(self.verified_index);
        if commit > self.commit_index {
            self.set_commit(commit);
        }
        // Acknowledge now (term accepted: confirms a ReadIndex round) and again from
        // on_persisted once the entries are fsynced (DESIGN rule 5).
        self.ack_stream = Some((stream, req.read_round));
        self.respond_success(stream, req.read_round);
    }

    /// Refuses an invalid AppendEntries (rule 11): answered without a hint, logged.
    fn refuse_append(&mut self, stream: StreamId, from: NodeId, reason: String) {
        self.out.push(Command::Refused { from, reason });
        self.respond(stream, false, 0, 0);
    }

    /// DESIGN rule 11: an AppendEntries is checked whole before anything of it is used. Its
    /// entries continue `prev_log_index` one index at a time, no entry has a term above the
    /// message's, terms never go down, and no entry contradicts what this server has committed
    /// (which a correct leader never sends: rule 6).
    fn check_append(&self, req: &AppendEntriesRequest) -> Result<(), String> {
        let leader = NodeId(req.leader_id);
        if leader == self.cfg.id || !self.cfg.servers.contains(&leader) {
            return Err(format!(
                "leader_id {} is not a configured peer",
                req.leader_id
            ));
        }
        if req.snapshot.is_some() && !req.entries.is_empty() {
            return Err(format!(
                "a snapshot chunk with {} entries (a chunk comes alone)",
                req.entries.len()
            ));
        }
        if req.prev_log_term > req.term {
            return Err(format!(
                "prev_log_term {} is above the message term {}",
                req.prev_log_term, req.term
            ));
        }
        let mut term = req.prev_log_term;
        for (i, e) in req.entries.iter().enumerate() {
            let want = req.prev_log_index.checked_add(i as u64 + 1);
            if Some(e.index) != want {
                return Err(format!(
                    "entries[{i}].index is {}, expected {} (entries must continue \
                     prev_log_index {})",
                    e.index,
                    want.map_or("none".to_string(), |w| w.to_string()),
                    req.prev_log_index
                ));
            }
            if e.term > req.term || e.term < term {
                return Err(format!(
                    "entries[{i}].term {} is outside [{term}, {}] (the previous entry's term and \
                     the message term)",
                    e.term, req.term
                ));
            }
            term = e.term;
        }
        Ok(())
    }

    /// For a message of our term or a newer one: no entry contradicts what this server has
    /// committed (a correct leader of such a term holds every committed entry, rule 6; an older
    /// leader's message is refused by its term before this).
    fn check_committed_prefix(&self, req: &AppendEntriesRequest) -> Result<(), String> {
        let base = self.log.base().index;
        for (i, e) in req.entries.iter().enumerate() {
            if e.index > self.commit_index {
                break;
            }
            // Below the base the terms are gone; those entries are committed and applied here,
            // and merging skips them.
            if e.index >= base && self.term_at(e.index) != e.term {
                return Err(format!(
                    "entries[{i}] (index {}, term {}) contradicts committed entry of term {}",
                    e.index,
                    e.term,
                    self.term_at(e.index)
                ));
            }
        }
        Ok(())
    }

    /// The fast-backup hint when our log does not hold `(prev_index, prev_term)`: the first
    /// index of the conflicting term (never at or below the commit index), or our end.
    fn log_mismatch(&self, prev_index: u64, prev_term: u64) -> Option<u64> {
        if prev_index > self.last_index() {
            return Some(self.last_index() + 1);
        }
        if prev_index < self.log.base().index {
            // Compacted here, so committed: every leader of this term or a newer one holds it.
            return None;
        }
        let ours = self.term_at(prev_index);
        if ours == prev_term {
            return None;
        }
        let mut first = prev_index;
        while first > self.commit_index + 1 && self.term_at(first - 1) == ours {
            first -= 1;
        }
        Some(first.max(self.commit_index + 1))
    }

    /// DESIGN rule 6: skip entries we already hold, truncate from the first conflict (never a
    /// committed entry), append the rest.
    fn merge_entries(&mut self, entries: Vec<LogEntry>) {
        let mut fresh = Vec::new();
        let base = self.log.base().index;
        for entry in entries {
            if entry.index <= base {
                continue; // compacted here: committed and applied
            }
            if !fresh.is_empty() || entry.index > self.last_index() {
                fresh.push(entry);
                continue;
            }
            if self.term_at(entry.index) == entry.term {
                continue;
            }
            assert!(
                entry.index > self.commit_index,
                "invariant: never truncate a committed entry (index {}, commit {})",
                entry.index,
                self.commit_index
            );
            self.log.truncate_from(entry.index);
            self.durability.truncated(entry.index);
            self.out.push(Command::TruncateLog(entry.index));
            fresh.push(entry);
        }
        if fresh.is_empty() {
            return;
        }
        self.log.extend(fresh.iter().cloned());
        self.durability.wrote(self.last_index());
        self.out.push(Command::AppendLog(fresh));
    }

    fn respond_success(&mut self, stream: StreamId, read_round: u64) {
        let mut resp = self.response(true, 0, read_round);
        resp.match_index = self.durability.durable_index.min(self.verified_index);
        self.out.push(Command::SendAppendResponse { stream, resp });
    }

    fn respond(&mut self, stream: StreamId, success: bool, conflict: u64, read_round: u64) {
        let resp = self.response(success, conflict, read_round);
        self.out.push(Command::SendAppendResponse { stream, resp });
    }

    fn response(&self, success: bool, conflict: u64, read_round: u64) -> AppendEntriesResponse {
        AppendEntriesResponse {
            term: self.hard.term,
            follower_id: self.cfg.id.0,
            success,
            match_index: 0,
            conflict_index: conflict,
            read_round,
            snapshot_transfer: 0,
            snapshot_next_seq: 0,
            trace_token: Bytes::new(),
        }
    }

    // ------------------------------------------------------------------ durability, time

    fn on_persisted(&mut self, write_id: u64) {
        let before = self.durability.durable_index;
        self.durability.persisted(write_id);
        if self.durability.durable_index == before {
            return;
        }
        self.apply_committed();
        if self.leader.is_some() {
            self.advance_commit();
        } else if let Some((stream, round)) = self.ack_stream {
            self.respond_success(stream, round);
        }
    }

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
    }
}

fn client_error(e: PutError) -> ClientError {
    match e {
        PutError::SessionExpired => ClientError::SessionExpired,
        PutError::Stale => ClientError::Stale,
        PutError::Invalid => ClientError::Invalid(
            "the put breaks its session window (ack_seq <= seq < ack_seq + window)".to_string(),
        ),
    }
}

/// Last index of a batch starting at `from`, within the entry and byte budgets.
fn batch_end(log: &ReplicaLog, from: u64, last: u64) -> u64 {
    let mut bytes = 0usize;
    let mut to = from;
    while to <= last && (to - from) < BATCH_ENTRIES_MAX as u64 {
        let len = log.get(to).map_or(0, |e| e.encoded_len());
        if to > from && bytes + len > BATCH_BYTES_MAX {
            break;
        }
        bytes += len;
        to += 1;
    }
    to - 1
}
