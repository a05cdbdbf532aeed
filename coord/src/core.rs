//! The coordinator's decisions as a pure state machine: no IO, no async, no clock.
//!
//! ```text
//!   runtime ──Event──▶ CoordCore::step ──Vec<Command>──▶ runtime
//!   (ticks with now_ms,    (memory only)      (persist the term, send heartbeats and
//!    joins, RPC answers)                        prepares, publish the leader)
//! ```
//!
//! Phases: `Joining` (wait for `coord.wait_for` servers) → `Relearning` (after a coord restart,
//! look for a running leader of the persisted term for one failure timeout) → `EpochChange`
//! (Prepare a new term on a majority, pick the most up-to-date responder) ⇄ `Stable` (a leader
//! is designated; failure detection and leader confirmation may start a new epoch change).
//!
//! Invariants (checked after every step):
//! - Commands are executed in order and `PersistTerm(t)` is durable before any later command
//!   runs (the runtime's duty), and the core emits `PersistTerm(t)` before the first command
//!   that carries `t`, so no term is ever sent before it is durable (DESIGN rule 1).
//! - `highest_term` never decreases, and no command carries a term above it.
//! - A leader is picked only from ok answers to `Prepare(T)` for the current epoch's `T`, by
//!   servers alive at that moment, numbering at least a majority of ALL configured servers
//!   (DESIGN rule 2); it is the responder with the greatest `(last_log_term, last_log_index)`.
//! - In `Stable` the view's term equals `highest_term` and the view has a leader; in
//!   `EpochChange` the view's term is the epoch's term and the view has no leader.
//!
//! Storage identities (DESIGN rule 10): the core keeps, for every server, the identity (uuid)
//! of the data directory it last reported and whether that storage is a voter, and emits
//! `PersistMembers` (durable before any later command) whenever that changes. A server that
//! comes back with another identity, or with a directory never in a cluster while the cluster
//! has terms, may have lost entries it acknowledged: it is a catching-up member. Its Prepare
//! answers are not counted, it is never designated, and heartbeats tell the leader not to count
//! it, until the leader of the current term reports it holds everything the leader had when it
//! learned of it. Then the core makes it a voter again.
//! - Only answers from voters (prepared with the recorded voter identity) count towards the
//!   majority that completes an epoch change, and only a voter is designated.
//!
//! Time enters only as `now_ms` arguments (any monotonic origin); the core keeps the largest
//! value seen, so an RPC answer stamped slightly before an already-processed tick is harmless.

use std::collections::BTreeMap;

use kvraft_common::config::{ClusterConfig, WaitFor};
use kvraft_common::{LogIndex, NodeId, Term};
use tracing::{debug, error, info, warn};

#[cfg(test)]
mod tests;

/// What the core needs to know of the cluster config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// Every configured server. Quorums are majorities of this list, never of the live ones.
    pub servers: Vec<NodeId>,
    /// Period of heartbeats and of Prepare resends.
    pub heartbeat_interval_ms: u64,
    /// A server that has not answered for this long is failed.
    pub failure_timeout_ms: u64,
    /// How many servers must join before the first leader of a new cluster is designated.
    pub wait_for: WaitFor,
}

impl CoreConfig {
    pub fn from_cluster(config: &ClusterConfig) -> CoreConfig {
        CoreConfig {
            servers: config.server_ids(),
            heartbeat_interval_ms: config.coord.heartbeat_interval_ms,
            failure_timeout_ms: config.coord.failure_timeout_ms,
            wait_for: config.coord.wait_for,
        }
    }

    /// Answers needed for a majority of all configured servers.
    pub fn majority(&self) -> usize {
        self.servers.len() / 2 + 1
    }

    /// Checks the fields against each other (the cluster config validates the same things with
    /// file-level messages; this guards configs built in code).
    pub fn validate(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("no servers configured".into());
        }
        if self.servers.iter().any(|id| id.is_none()) {
            return Err("server id 0 is reserved for \"no server\"".into());
        }
        let mut ids = self.servers.clone();
        ids.sort();
        ids.dedup();
        if ids.len() != self.servers.len() {
            return Err("a server id is used twice".into());
        }
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat_interval_ms must be above 0".into());
        }
        if self.failure_timeout_ms <= self.heartbeat_interval_ms {
            return Err("failure_timeout_ms must be above heartbeat_interval_ms".into());
        }
        Ok(())
    }
}

/// Where a server's report came from. A `Coord.Join` can come from anyone (the RPC is not
/// authenticated yet): it marks the server alive and may record a server seen for the first
/// time, but it never changes a storage record, raises the term or gets a leader adopted.
/// Those come only from answers to the coord's own heartbeats, sent to the configured address
/// (the next one is at most a heartbeat away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Join,
    HeartbeatAnswer,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Join => "Join",
            Via::HeartbeatAnswer => "heartbeat answer",
        }
    }
}

/// A server's role as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unknown,
    Follower,
    Leader,
}

/// The position of a server's last log entry. Ordered by term first, then index: a longer log
/// of an older term is less up to date than a shorter log of a newer term (DESIGN rule 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub term: Term,
    pub index: LogIndex,
}

/// What a server says about itself in a Join or a heartbeat answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerReport {
    pub id: NodeId,
    /// Differs on every server process start; a change means the server restarted.
    pub uuid: String,
    pub term: Term,
    pub role: Role,
    pub leader: NodeId,
    pub last_log: LogPosition,
    pub commit_index: LogIndex,
    /// The data directory has never been in a cluster (it reports no cluster id): new.
    pub new_storage: bool,
    /// From a leader: catching-up servers that now hold its log as of when it learned of them,
    /// with the storage identity each was listed with.
    pub caught_up: Vec<(NodeId, String)>,
}

/// What the coord durably knows of one server's storage (DESIGN rule 10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The storage identity last reported (the uuid made with the data directory).
    pub uuid: String,
    /// This storage counts in epoch changes and commits. False while it catches up.
    pub voter: bool,
}

/// Every server's storage record, by id; persisted whole on every change.
pub type Members = BTreeMap<NodeId, Member>;

/// The coordinator's view of the cluster that clients and servers are told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    pub term: Term,
    /// `NodeId::NONE` while no leader is designated (startup, epoch change).
    pub leader: NodeId,
    /// The uuid the leader last reported, so a client can tell a restarted leader apart.
    pub leader_uuid: String,
}

/// Everything that can happen to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passes; drives heartbeats, failure detection, Prepare resends and deadlines.
    Tick { now_ms: u64 },
    /// A server called `Coord.Join`.
    Joined {
        id: NodeId,
        report: ServerReport,
        now_ms: u64,
    },
    /// A server answered a heartbeat; `now_ms` is when the answer arrived.
    HeartbeatOk {
        id: NodeId,
        report: ServerReport,
        now_ms: u64,
    },
    /// A heartbeat failed (error status, timeout, no connection).
    HeartbeatFailed { id: NodeId },
    /// The server's address refused the connection: no process listens there, it crashed or
    /// stopped. Unlike a silence (a hang, a partition), that needs no timeout: the server is
    /// failed at once (DESIGN section 4).
    ServerGone { id: NodeId },
    /// A server durably adopted `term` and reports its log position.
    PrepareOk {
        id: NodeId,
        term: Term,
        last_log_term: Term,
        last_log_index: LogIndex,
        /// The answering server's storage identity; counted only if it is a voter's.
        uuid: String,
    },
    /// A server refused `Prepare` because it holds the higher `term`.
    PrepareRejected { id: NodeId, term: Term },
}

/// What the runtime must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Make `term` the durable highest term (fsync) before executing any later command.
    PersistTerm(Term),
    /// Make the storage records durable (fsync) before executing any later command.
    PersistMembers(Members),
    SendHeartbeat {
        to: NodeId,
        term: Term,
        leader_id: NodeId,
        /// Catching-up servers and their storage identities, for the leader (rule 10).
        catching_up: Vec<(NodeId, String)>,
    },
    SendPrepare {
        to: NodeId,
        term: Term,
    },
    /// Tell clients (GetLeader, WatchLeader) the new view.
    PublishLeader(LeaderView),
}

/// How long (in failure timeouts) a leader replaced for not leading is passed over when a
/// quorum without it is available.
pub const PASS_OVER_FAILURE_TIMEOUTS: u64 = 10;

/// The coordinator's liveness knowledge of one server.
#[derive(Debug, Default)]
struct Peer {
    /// Heard from (Join or answered heartbeat) since this coord started.
    joined: bool,
    /// Answered within the failure timeout; only alive servers count towards a quorum.
    alive: bool,
    /// When the last successful answer or Join arrived; the failure clock runs from here.
    last_ok_ms: u64,
    /// Consecutive failed heartbeats, for log lines only.
    misses: u32,
    /// The uuid last reported; a change means the server process restarted.
    uuid: String,
    /// Until then, this server is not designated again if other servers can form the quorum:
    /// it was replaced for not leading (typically cut from its peers but not from the coord),
    /// and its log, longest with the writes it could not commit, would win every election.
    passed_over_until_ms: u64,
}

#[derive(Debug)]
enum Phase {
    /// Waiting until enough servers have joined.
    Joining,
    /// Enough servers joined after a coord restart; until `until_ms` a server reporting itself
    /// leader of `highest_term` is adopted without a new term.
    Relearning {
        until_ms: u64,
    },
    EpochChange(Epoch),
    /// A leader is designated (or adopted).
    Stable {
        /// Since when the leader has been reporting that it does not lead the current term
        /// (DESIGN section 4: a leader that lost its designation is replaced).
        unconfirmed_since_ms: Option<u64>,
    },
}

#[derive(Debug)]
struct Epoch {
    term: Term,
    /// Ok answers to `Prepare(term)`: who holds `term` durably, with its log position and the
    /// storage identity that answered.
    prepared: BTreeMap<NodeId, (LogPosition, String)>,
    /// When servers that have not answered get `Prepare` again.
    resend_at_ms: u64,
    /// When the epoch change started: how long to wait for a quorum without passed-over servers.
    started_ms: u64,
}

/// The coordinator state machine. Feed it [`Event`]s with [`CoordCore::step`] and execute the
/// returned [`Command`]s in order.
#[derive(Debug)]
pub struct CoordCore {
    config: CoreConfig,
    peers: BTreeMap<NodeId, Peer>,
    /// The highest term issued or observed. Every change is followed by `PersistTerm`.
    highest_term: Term,
    view: LeaderView,
    phase: Phase,
    /// Storage records (rule 10); every change is followed by `PersistMembers`.
    members: Members,
    next_heartbeat_ms: u64,
    /// The largest time seen in any event.
    now_ms: u64,
}

impl CoordCore {
    /// A coordinator that has issued terms up to `highest_term` (0 for a new cluster), started
    /// at `now_ms`. Panics if `config` is invalid (a programmer error: run validates it).
    pub fn new(config: CoreConfig, highest_term: Term, now_ms: u64) -> CoordCore {
        CoordCore::recovered(config, highest_term, Members::new(), now_ms)
    }

    /// Like [`CoordCore::new`], with the storage records persisted by an earlier run.
    pub fn recovered(
        config: CoreConfig,
        highest_term: Term,
        members: Members,
        now_ms: u64,
    ) -> CoordCore {
        if let Err(e) = config.validate() {
            panic!("invariant: the core config is validated before use: {e}");
        }
        let peers = config
            .servers
            .iter()
            .map(|&id| (id, Peer::default()))
            .collect();
        let members = members
            .into_iter()
            .filter(|(id, _)| config.servers.contains(id))
            .collect();
        CoordCore {
            config,
            peers,
            highest_term,
            view: LeaderView {
                term: highest_term,
                leader: NodeId::NONE,
                leader_uuid: String::new(),
            },
            phase: Phase::Joining,
            members,
            next_heartbeat_ms: now_ms,
            now_ms,
        }
    }

    /// The storage records (rule 10).
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// Whether `id`'s storage, as identified by `uuid`, is a voter.
    fn is_voter(&self, id: NodeId, uuid: &str) -> bool {
        self.members
            .get(&id)
            .is_some_and(|m| m.voter && m.uuid == uuid)
    }

    /// Catching-up servers with their storage identities, for heartbeats.
    fn catching_up(&self) -> Vec<(NodeId, String)> {
        self.members
            .iter()
            .filter(|(_, m)| !m.voter)
            .map(|(&id, m)| (id, m.uuid.clone()))
            .collect()
    }

    /// The current view: what `Join` answers and heartbeats carry.
    pub fn view(&self) -> &LeaderView {
        &self.view
    }

    /// The highest term issued or observed (durable once the emitted `PersistTerm` ran).
    pub fn highest_term(&self) -> Term {
        self.highest_term
    }

    pub fn is_alive(&self, id: NodeId) -> bool {
        self.peers.get(&id).is_some_and(|p| p.alive)
    }

    /// The term being prepared, while an epoch change is in progress.
    pub fn epoch_term(&self) -> Option<Term> {
        match &self.phase {
            Phase::EpochChange(e) => Some(e.term),
            _ => None,
        }
    }

    /// Processes one event and returns the commands to execute, in order.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        let durable_before = self.highest_term;
        match event {
            Event::Tick { now_ms } => self.on_tick(now_ms, &mut out),
            Event::Joined { id, report, now_ms } => {
                self.on_report(id, report, now_ms, Via::Join, &mut out)
            }
            Event::HeartbeatOk { id, report, now_ms } => {
                self.on_report(id, report, now_ms, Via::HeartbeatAnswer, &mut out)
            }
            Event::HeartbeatFailed { id } => self.on_heartbeat_failed(id),
            Event::ServerGone { id } => self.on_server_gone(id, &mut out),
            Event::PrepareOk {
                id,
                term,
                last_log_term,
                last_log_index,
                uuid,
            } => {
                let position = LogPosition {
                    term: last_log_term,
                    index: last_log_index,
                };
                self.on_prepare_ok(id, term, position, uuid);
            }
            Event::PrepareRejected { id, term } => self.on_prepare_rejected(id, term, &mut out),
        }
        self.advance(&mut out);
        self.check_invariants(durable_before, &out);
        out
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        self.observe_time(now_ms);
        self.detect_failures(out);
        if let Phase::Stable {
            unconfirmed_since_ms: Some(since_ms),
        } = self.phase
        {
            let waited_ms = self.now_ms.saturating_sub(since_ms);
            if waited_ms > self.config.failure_timeout_ms {
                let pass_over_ms = PASS_OVER_FAILURE_TIMEOUTS * self.config.failure_timeout_ms;
                if let Some(peer) = self.peers.get_mut(&self.view.leader) {
                    peer.passed_over_until_ms = self.now_ms + pass_over_ms;
                }
                let reason = format!(
                    "leader {} has not reported leading term {} for {waited_ms} ms",
                    self.view.leader, self.view.term
                );
                self.start_epoch_change(Term(0), &reason, out);
            }
        }
        self.resend_prepares(out);
        if self.now_ms >= self.next_heartbeat_ms {
            self.send_heartbeats(out);
            // Keep the cadence; after a stall, restart it from now rather than burst.
            self.next_heartbeat_ms += self.config.heartbeat_interval_ms;
            if self.next_heartbeat_ms <= self.now_ms {
                self.next_heartbeat_ms = self.now_ms + self.config.heartbeat_interval_ms;
            }
        }
    }

    /// A Join or an answered heartbeat: the server is alive and tells its state.
    fn on_report(
        &mut self,
        id: NodeId,
        report: ServerReport,
        now_ms: u64,
        via: Via,
        out: &mut Vec<Command>,
    ) {
        let trusted = via == Via::HeartbeatAnswer;
        let via = via.name();
        if report.id != id {
            warn!(
                server = %id,
                "{via} from the address of server {id} reports server id {}; check the \
                 config (treated as no answer)",
                report.id
            );
            return;
        }
        self.observe_time(now_ms);
        if !self.mark_alive(id, &report, now_ms, via) {
            return;
        }
        // See `Via` for what an untrusted Join may change.
        if trusted || !self.members.contains_key(&id) {
            self.track_storage(id, &report, out);
        }
        if !trusted {
            return;
        }
        if report.term > self.highest_term {
            warn!(
                server = %id,
                "server {id} reports term {}, above the highest term this coord has issued \
                 ({}): the coord's term file was lost or replaced; raising the term so none \
                 is reused",
                report.term, self.highest_term
            );
            match self.phase {
                Phase::Joining | Phase::Relearning { .. } => {
                    self.raise_highest_term(report.term, out)
                }
                Phase::EpochChange(_) | Phase::Stable { .. } => {
                    let reason = format!("server {id} holds the unknown term {}", report.term);
                    self.start_epoch_change(report.term, &reason, out);
                    return;
                }
            }
        }
        match &mut self.phase {
            Phase::Joining | Phase::Relearning { .. } => {
                if report.role == Role::Leader
                    && report.term == self.highest_term
                    && self.highest_term > Term(0)
                    && self.is_voter(id, &report.uuid)
                {
                    self.adopt_leader(id, out);
                }
            }
            Phase::Stable {
                unconfirmed_since_ms,
            } => {
                if id != self.view.leader {
                    return;
                }
                if report.role == Role::Leader && report.term == self.view.term {
                    *unconfirmed_since_ms = None;
                    self.promote_caught_up(id, &report.caught_up, out);
                } else if unconfirmed_since_ms.is_none() {
                    info!(
                        server = %id,
                        "leader {id} reports role {:?} in term {} instead of leading term {}",
                        report.role, report.term, self.view.term
                    );
                    *unconfirmed_since_ms = Some(self.now_ms);
                }
            }
            Phase::EpochChange(_) => {}
        }
    }

    /// Rule 10: records the storage identity `id` reports; a new one (or a never-joined
    /// directory in a cluster that has terms) makes it a catching-up member, durably.
    fn track_storage(&mut self, id: NodeId, report: &ServerReport, out: &mut Vec<Command>) {
        let member = match self.members.get(&id) {
            Some(m) if m.uuid == report.uuid => return,
            Some(m) => {
                warn!(
                    server = %id,
                    "server {id} came back with other storage (uuid {} -> {}): it may have lost \
                     entries it acknowledged, so it catches up before it votes or counts for \
                     commit again",
                    m.uuid, report.uuid
                );
                Member {
                    uuid: report.uuid.clone(),
                    voter: false,
                }
            }
            None if report.new_storage && self.highest_term > Term(0) => {
                warn!(
                    server = %id,
                    "server {id} joined with a new data directory (uuid {}) while the cluster \
                     has terms: it catches up before it votes or counts for commit",
                    report.uuid
                );
                Member {
                    uuid: report.uuid.clone(),
                    voter: false,
                }
            }
            None => Member {
                uuid: report.uuid.clone(),
                voter: true,
            },
        };
        self.members.insert(id, member);
        out.push(Command::PersistMembers(self.members.clone()));
        self.replace_if_leader(id, "came back with other storage", out);
    }

    /// A leader of the stable view that failed or lost its storage is replaced at once.
    fn replace_if_leader(&mut self, id: NodeId, why: &str, out: &mut Vec<Command>) {
        if id == self.view.leader && matches!(self.phase, Phase::Stable { .. }) {
            let reason = format!("leader {id} {why}");
            self.start_epoch_change(Term(0), &reason, out);
        }
    }

    /// Rule 10: catching-up servers that the current leader reports caught up become voters.
    fn promote_caught_up(
        &mut self,
        leader: NodeId,
        caught_up: &[(NodeId, String)],
        out: &mut Vec<Command>,
    ) {
        let mut changed = false;
        for (id, uuid) in caught_up {
            let Some(member) = self.members.get_mut(id) else {
                continue;
            };
            if member.voter || member.uuid != *uuid {
                continue;
            }
            member.voter = true;
            changed = true;
            info!(
                server = %id,
                "server {id} caught up (leader {leader} of term {} holds it matched): a voter \
                 again",
                self.view.term
            );
        }
        if changed {
            out.push(Command::PersistMembers(self.members.clone()));
        }
    }

    /// Records a successful contact; returns false for an unknown id.
    fn mark_alive(&mut self, id: NodeId, report: &ServerReport, now_ms: u64, via: &str) -> bool {
        let servers_n = self.config.servers.len();
        let Some(peer) = self.peers.get_mut(&id) else {
            warn!(server = %id, "{via} from server {id}, which is not in the config; ignored");
            return false;
        };
        peer.last_ok_ms = peer.last_ok_ms.max(now_ms);
        peer.misses = 0;
        if !peer.uuid.is_empty() && peer.uuid != report.uuid {
            info!(server = %id, "server {id} restarted (uuid {} -> {})", peer.uuid, report.uuid);
        }
        peer.uuid.clone_from(&report.uuid);
        if !peer.joined {
            peer.joined = true;
            peer.alive = true;
            info!(
                server = %id,
                "ServerJoined: server {id} (term {}, role {:?}, last log {}/{}) via {via}",
                report.term, report.role, report.last_log.term, report.last_log.index
            );
            let joined_n = self.peers.values().filter(|p| p.joined).count();
            if joined_n == servers_n {
                info!("AllServersJoined: all {servers_n} configured servers have joined");
            }
        } else if !peer.alive {
            peer.alive = true;
            info!(
                server = %id,
                "ServerJoined: server {id} is alive again (term {}, role {:?}) via {via}",
                report.term, report.role
            );
        }
        true
    }

    fn on_server_gone(&mut self, id: NodeId, out: &mut Vec<Command>) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.misses = peer.misses.saturating_add(1);
        if !peer.alive {
            return;
        }
        peer.alive = false;
        info!(server = %id, "ServerFail: server {id} refused the connection (not running)");
        self.replace_if_leader(id, "is not running", out);
    }

    fn on_heartbeat_failed(&mut self, id: NodeId) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.misses = peer.misses.saturating_add(1);
            debug!(server = %id, misses = peer.misses, "heartbeat to server {id} failed");
        }
    }

    fn on_prepare_ok(&mut self, id: NodeId, term: Term, position: LogPosition, uuid: String) {
        if !self.peers.contains_key(&id) {
            warn!(server = %id, "Prepare answer from unknown server {id}; ignored");
            return;
        }
        match &mut self.phase {
            Phase::EpochChange(epoch) if epoch.term == term => {
                debug!(server = %id, "server {id} prepared term {term} at {position:?}");
                epoch.prepared.insert(id, (position, uuid));
            }
            _ => debug!(
                server = %id,
                "ignoring server {id}'s Prepare answer for term {term}: not the current epoch"
            ),
        }
    }

    fn on_prepare_rejected(&mut self, id: NodeId, term: Term, out: &mut Vec<Command>) {
        if term <= self.highest_term {
            // An answer to an older Prepare; the current epoch already covers it.
            debug!(server = %id, "ignoring server {id}'s stale Prepare refusal (term {term})");
            return;
        }
        warn!(
            server = %id,
            "server {id} refused Prepare: it holds term {term}, above the highest term this \
             coord has issued ({}); the coord's term file was lost or replaced",
            self.highest_term
        );
        let reason = format!("server {id} holds the higher term {term}");
        self.start_epoch_change(term, &reason, out);
    }

    /// Phase transitions that depend only on the state, checked after every event.
    fn advance(&mut self, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Joining => {
                let joined_n = self.peers.values().filter(|p| p.joined).count();
                let needed_n = self.joins_needed();
                if joined_n < needed_n {
                    return;
                }
                info!(
                    "{joined_n} of {} servers joined ({needed_n} needed); startup wait over",
                    self.config.servers.len()
                );
                if self.highest_term == Term(0) {
                    self.start_epoch_change(Term(0), "new cluster", out);
                } else {
                    let until_ms = self.now_ms + self.config.failure_timeout_ms;
                    info!(
                        "waiting up to {} ms for a leader of term {} to report",
                        self.config.failure_timeout_ms, self.highest_term
                    );
                    self.phase = Phase::Relearning { until_ms };
                }
            }
            Phase::Relearning { until_ms } => {
                if self.now_ms >= until_ms {
                    let reason = format!(
                        "no server reported leading term {} after the coord restarted",
                        self.highest_term
                    );
                    self.start_epoch_change(Term(0), &reason, out);
                }
            }
            Phase::EpochChange(_) => self.try_complete_epoch(out),
            Phase::Stable { .. } => {}
        }
    }

    /// How many servers must have joined before leaving `Joining`. A new cluster waits for
    /// `wait_for`; a restarted coord (it has issued a term) joins a running cluster, which a
    /// dead server must not hold hostage, so a majority is enough there.
    fn joins_needed(&self) -> usize {
        if self.highest_term > Term(0) {
            return self.config.majority();
        }
        match self.config.wait_for {
            WaitFor::All => self.config.servers.len(),
            WaitFor::Majority => self.config.majority(),
        }
    }

    fn detect_failures(&mut self, out: &mut Vec<Command>) {
        let timeout_ms = self.config.failure_timeout_ms;
        let now_ms = self.now_ms;
        let mut leader_failed = false;
        for (&id, peer) in self.peers.iter_mut() {
            let silent_ms = now_ms.saturating_sub(peer.last_ok_ms);
            if peer.alive && silent_ms >= timeout_ms {
                peer.alive = false;
                info!(
                    server = %id,
                    "ServerFail: server {id} has not answered for {silent_ms} ms \
                     ({} heartbeats failed)",
                    peer.misses
                );
                leader_failed |= id == self.view.leader;
            }
        }
        if leader_failed {
            self.replace_if_leader(self.view.leader, "failed", out);
        }
    }

    /// Starts an epoch change with a term above both `highest_term` and `above` (DESIGN rule 2).
    fn start_epoch_change(&mut self, above: Term, reason: &str, out: &mut Vec<Command>) {
        if self.highest_term.max(above) == Term(u64::MAX) {
            // Only a forged message can have carried a term this high; no term is left to
            // issue without reusing one, so the cluster stays without a leader (rule 1).
            error!("cannot start an epoch change ({reason}): the term space is exhausted");
            return;
        }
        let term = self.highest_term.max(above).next();
        self.highest_term = term;
        out.push(Command::PersistTerm(term));
        info!(%term, "NewTerm: term {term} ({reason}); preparing it on all servers");
        self.view = LeaderView {
            term,
            leader: NodeId::NONE,
            leader_uuid: String::new(),
        };
        info!(%term, "NewClusterView: term {term}, no leader until a majority has prepared");
        out.push(Command::PublishLeader(self.view.clone()));
        for &to in &self.config.servers {
            out.push(Command::SendPrepare { to, term });
        }
        self.phase = Phase::EpochChange(Epoch {
            term,
            prepared: BTreeMap::new(),
            resend_at_ms: self.now_ms + self.config.heartbeat_interval_ms,
            started_ms: self.now_ms,
        });
    }

    fn resend_prepares(&mut self, out: &mut Vec<Command>) {
        let Phase::EpochChange(epoch) = &mut self.phase else {
            return;
        };
        if self.now_ms < epoch.resend_at_ms {
            return;
        }
        epoch.resend_at_ms = self.now_ms + self.config.heartbeat_interval_ms;
        for &to in &self.config.servers {
            if !epoch.prepared.contains_key(&to) {
                out.push(Command::SendPrepare {
                    to,
                    term: epoch.term,
                });
            }
        }
    }

    /// Designates a leader once a majority of all configured servers, alive now, prepared.
    fn try_complete_epoch(&mut self, out: &mut Vec<Command>) {
        let Phase::EpochChange(epoch) = &self.phase else {
            return;
        };
        // Only voters count (rule 10): a server catching up after losing its storage may lack
        // entries it acknowledged, and must neither make a quorum nor be chosen.
        let responders: Vec<(NodeId, LogPosition)> = epoch
            .prepared
            .iter()
            .filter(|(id, (_, uuid))| self.is_alive(**id) && self.is_voter(**id, uuid))
            .map(|(&id, (position, _))| (id, *position))
            .collect();
        if responders.len() < self.config.majority() {
            return;
        }
        let preferred: Vec<(NodeId, LogPosition)> = responders
            .iter()
            .copied()
            .filter(|(id, _)| self.peers[id].passed_over_until_ms <= self.now_ms)
            .collect();
        // Any majority of prepared servers is a safe quorum (DESIGN rule 2); prefer one without
        // passed-over servers, waiting a failure timeout for it before settling for any.
        let waited_ms = self.now_ms.saturating_sub(epoch.started_ms);
        let responders = if preferred.len() >= self.config.majority() {
            preferred
        } else if waited_ms < self.config.failure_timeout_ms {
            return;
        } else {
            responders
        };
        let term = epoch.term;
        // Greatest (last_log_term, last_log_index); among equals the lowest id.
        let (leader, position) = responders
            .iter()
            .copied()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .expect("invariant: a majority of a non-empty cluster is not empty");
        let ids: Vec<String> = responders.iter().map(|(id, _)| id.to_string()).collect();
        self.designate(leader, term, out);
        info!(
            %term,
            "LeaderReconfigDone: server {leader} leads term {term} (last log {}/{}; prepared \
             by servers {} of {})",
            position.term,
            position.index,
            ids.join(","),
            self.config.servers.len()
        );
    }

    /// After a coord restart: a running leader of the persisted term keeps its term.
    fn adopt_leader(&mut self, id: NodeId, out: &mut Vec<Command>) {
        let term = self.highest_term;
        self.designate(id, term, out);
        info!(
            %term,
            "LeaderReconfigDone: re-learned server {id} as leader of term {term} (no new term)"
        );
    }

    /// Makes `leader` the leader of `term` in the view and tells everyone at once.
    fn designate(&mut self, leader: NodeId, term: Term, out: &mut Vec<Command>) {
        let leader_uuid = self
            .peers
            .get(&leader)
            .map(|p| p.uuid.clone())
            .unwrap_or_default();
        self.view = LeaderView {
            term,
            leader,
            leader_uuid,
        };
        self.phase = Phase::Stable {
            unconfirmed_since_ms: None,
        };
        let alive: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(id, _)| id.to_string())
            .collect();
        info!(
            %term,
            "NewClusterView: term {term}, leader {leader}, alive servers {}",
            alive.join(",")
        );
        out.push(Command::PublishLeader(self.view.clone()));
        self.send_heartbeats(out);
        self.next_heartbeat_ms = self.now_ms + self.config.heartbeat_interval_ms;
    }

    fn send_heartbeats(&self, out: &mut Vec<Command>) {
        let catching_up = self.catching_up();
        for &to in &self.config.servers {
            out.push(Command::SendHeartbeat {
                to,
                term: self.view.term,
                leader_id: self.view.leader,
                catching_up: catching_up.clone(),
            });
        }
    }

    /// A server holds a term above the persisted one (the term file was lost): make that term
    /// the durable floor, so no later term repeats one a server has seen.
    fn raise_highest_term(&mut self, term: Term, out: &mut Vec<Command>) {
        self.highest_term = term;
        out.push(Command::PersistTerm(term));
        self.view.term = term;
        out.push(Command::PublishLeader(self.view.clone()));
    }

    fn observe_time(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn check_invariants(&self, durable_before: Term, out: &[Command]) {
        assert!(
            self.view.term <= self.highest_term,
            "view term above highest"
        );
        match &self.phase {
            Phase::Stable { .. } => {
                assert_eq!(self.view.term, self.highest_term, "stable view is current");
                assert!(!self.view.leader.is_none(), "stable view has a leader");
            }
            Phase::EpochChange(epoch) => {
                assert_eq!(epoch.term, self.highest_term, "epoch term is the highest");
                assert_eq!(self.view.term, epoch.term, "view follows the epoch");
                assert!(
                    self.view.leader.is_none(),
                    "no leader during an epoch change"
                );
            }
            Phase::Joining | Phase::Relearning { .. } => {
                assert!(self.view.leader.is_none(), "no leader before one is chosen");
            }
        }
        if let Phase::Stable { .. } = &self.phase {
            let leader = self.members.get(&self.view.leader);
            assert!(
                leader.is_none_or(|m| m.voter),
                "the designated leader is a voter"
            );
        }
        // Persist before use: a term appears in a message only after its PersistTerm ran.
        let mut durable = durable_before;
        for command in out {
            match command {
                Command::PersistMembers(_) => {}
                Command::PersistTerm(t) => {
                    assert!(*t > durable, "persisted terms only rise");
                    durable = *t;
                }
                Command::SendPrepare { term, .. }
                | Command::SendHeartbeat { term, .. }
                | Command::PublishLeader(LeaderView { term, .. }) => {
                    assert!(*term <= durable, "term {term} used before it was persisted");
                }
            }
        }
        assert_eq!(durable, self.highest_term, "the highest term is persisted");
    }
}
