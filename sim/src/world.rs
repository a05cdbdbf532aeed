//! [`World`]: the whole simulated cluster and its event loop.
//!
//! ```text
//!   queue: BTreeMap<(time_ms, seq), Item>        one StdRng from the seed decides everything
//!     │ pop the earliest item, now = its time
//!     ▼
//!   Tick ──▶ Replica::step(Tick) on every live node, CoordCore::step(Tick)
//!   Deliver(msg) ──▶ the receiving core's step; what it returns is executed:
//!        Replica: by the server's own `Executor`, over `NodeIo`: SaveHardState, log commands
//!                 → disk; SendAppend / SendAppendResponse / Reply → Network::plan → Deliver
//!        Coord:   PersistTerm → durable term   SendHeartbeat/SendPrepare → RPC + timeout item
//!                 PublishLeader → a view message to every client
//!   Fsync ──▶ Disk::complete_sync ──▶ Replica::step(Persisted { write_id })
//!   Fault ──▶ partition / crash a node / lose a node's whole disk / crash the coord (each
//!             heals later)
//!   Client timers ──▶ Client (attempt timeouts, retries, next operation)
//!     │
//!     └─▶ after every step: Invariants on the node touched; the first violation ends the run
//! ```
//!
//! Phases: faults for `fault_ms`; then everything heals (partitions removed, crashed processes
//! restarted, no random message faults) and clients keep working for `quiet_ms`; then clients
//! stop issuing, and once all are idle one final put must succeed and a leader must be known.
//!
//! Wiring mirrors the runtimes: a coord RPC that gets no answer within two heartbeat periods
//! is `HeartbeatFailed` (a Prepare is silently resent by the core); a lost replication message
//! breaks its stream, the leader hears `PeerDisconnected`, and later messages of the broken
//! stream are lost; each replica batch is `step` then `flush`, then a group fsync starts if
//! writes wait for one.

use std::collections::BTreeMap;

use kvraft_common::config::WaitFor;
use kvraft_common::{LogIndex, NodeId, Term};
use kvraft_coord::core::{self as coord, CoordCore, CoreConfig, LogPosition};
use kvraft_proto::{AppendEntriesRequest, AppendEntriesResponse, PutCommand};
use kvraft_server::executor::{Executor, Io, Storage};
use kvraft_server::log_writer::DiskFull;
use kvraft_server::replica::{Command, Event, RangeQuery, Replica, Reply, ReplyTo, StreamId};
use kvraft_server::state_machine::Change;
use prost::bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::client::{
    Client, ClientAction, ClientTimer, ClientTiming, Request, SCAN_END, SCAN_START, TXN_KEYS,
};
use crate::config::SimConfig;
use crate::history::History;
use crate::invariants::Invariants;
use crate::network::{chance, Endpoint, Network};
use crate::node::{SessionLimits, SimNode, SESSIONS_UNBOUNDED, SESSION_TTL_NEVER_MS};
use crate::watcher::Watcher;
use crate::{FaultCounts, SimStats};

/// A coord RPC answered later than this many heartbeat periods counts as failed (the coord
/// runtime's `RPC_TIMEOUT_HEARTBEATS`).
const RPC_TIMEOUT_HEARTBEATS: u64 = 2;
/// Normal fsync latency (ms), and the occasional slow one.
const FSYNC_MS: std::ops::RangeInclusive<u64> = 1..=8;
const FSYNC_SLOW_MS: std::ops::RangeInclusive<u64> = 20..=120;
const FSYNC_SLOW_PERMILLE: u32 = 50;
/// Chance per tick and node that what the state machine applied is written to its engine (‰).
const STATE_WRITE_PERMILLE: u32 = 300;
/// Chance per tick and node that the state machine is made durable (‰).
const STATE_SYNC_PERMILLE: u32 = 100;
/// Log entries kept below the durable state machine position, per run.
const LOG_TAIL_ENTRIES: std::ops::RangeInclusive<u64> = 0..=40;
/// How long a partition lasts, and how long a crashed process stays down (ms).
const PARTITION_MS: std::ops::RangeInclusive<u64> = 100..=1_500;
const DOWN_MS: std::ops::RangeInclusive<u64> = 50..=1_500;
/// Delay before the leader's peer link reports a broken stream (ms).
const DISCONNECT_NOTICE_MS: std::ops::RangeInclusive<u64> = 1..=20;
/// Share of node faults aimed at the current leader: failovers are where the bugs live.
const LEADER_VICTIM_SHARE: f64 = 0.5;
/// Share of randomly dropped replication messages that break their stream (‰); the rest are
/// lost silently, which the leader must survive through probes and heartbeats.
const DROP_BREAKS_STREAM_PERMILLE: u32 = 500;
/// Share of node crashes that also lose the node's whole disk (‰), when no other server is
/// catching up: losing a majority's disks would leave no voter majority, by design.
const DISK_LOSS_PERMILLE: u32 = 250;
/// Per-node clock offsets go up to this (ms): ten hours of skew between servers.
const CLOCK_OFFSET_MAX_MS: u64 = 36_000_000;
/// Short session TTLs, in the seeds where sessions expire (ms of idleness).
const SESSION_TTL_SHORT_MS: std::ops::RangeInclusive<u64> = 300..=1_200;

#[derive(Clone, Debug)]
enum Msg {
    Heartbeat {
        rpc: u64,
        term: u64,
        leader: u32,
        catching_up: Vec<(NodeId, String)>,
    },
    Prepare {
        rpc: u64,
        term: u64,
    },
    HeartbeatReply {
        rpc: u64,
        report: kvraft_proto::ServerReport,
    },
    PrepareReply {
        rpc: u64,
        ok: bool,
        term: u64,
        last_log_term: u64,
        last_log_index: u64,
        uuid: String,
    },
    Append {
        leader: u32,
        follower: u32,
        generation: u64,
        req: AppendEntriesRequest,
    },
    AppendResp {
        leader: u32,
        follower: u32,
        generation: u64,
        resp: AppendEntriesResponse,
    },
    Request {
        client: u32,
        attempt: u64,
        request: Request,
    },
    Response {
        attempt: u64,
        reply: Reply,
    },
    View {
        term: u64,
        leader: u32,
    },
}

#[derive(Debug)]
enum Item {
    Deliver {
        from: Endpoint,
        to: Endpoint,
        from_life: u64,
        to_life: u64,
        msg: Box<Msg>,
    },
    Fsync {
        node: u32,
        life: u64,
    },
    Tick,
    RpcTimeout {
        rpc: u64,
    },
    /// A heartbeat reached a crashed node's address: the connection is refused.
    Refused {
        rpc: u64,
    },
    Disconnected {
        leader: u32,
        life: u64,
        peer: u32,
    },
    Client {
        client: u32,
        timer: ClientTimer,
    },
    Fault,
    Heal {
        partition: u64,
    },
    /// A full disk has space again.
    DiskSpace {
        node: u32,
    },
    RestartNode {
        node: u32,
    },
    RestartCoord,
    EndFaults,
    EndQuiet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Faults,
    Quiet,
    Drain,
    Final,
}

/// Where a replica's `Reply { to }` goes.
#[derive(Clone, Copy, Debug)]
enum Route {
    Coord { rpc: u64 },
    Client { client: u32, attempt: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Rpc {
    to: u32,
    heartbeat: bool,
}

pub struct World {
    cfg: SimConfig,
    rng: StdRng,
    now_ms: u64,
    /// Rank of the current step within `now_ms`, for unique nanosecond timestamps.
    rank: u64,
    queue: BTreeMap<(u64, u64), Item>,
    next_item: u64,
    pub step: u64,
    phase: Phase,
    nodes: Vec<SimNode>,
    coord: Option<CoordCore>,
    coord_config: CoreConfig,
    coord_life: u64,
    /// The coord's durable highest term (its term file).
    coord_term: u64,
    /// The coord's durable storage records (its members file).
    coord_members: coord::Members,
    rpcs: BTreeMap<u64, Rpc>,
    next_rpc: u64,
    replies: BTreeMap<(u32, ReplyTo), Route>,
    next_reply: ReplyTo,
    network: Network,
    clients: Vec<Client>,
    /// Watch clients, checked against the replay at the end (`Invariants::check_watches`).
    pub watchers: Vec<Watcher>,
    pub history: History,
    pub inv: Invariants,
    faults: FaultCounts,
    /// Time by which the final put must have succeeded.
    deadline_ms: u64,
}

impl World {
    pub fn new(seed: u64, cfg: &SimConfig) -> Result<World, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = cfg
            .servers
            .unwrap_or(if rng.random_bool(0.5) { 3 } else { 5 });
        let c = cfg.clients.unwrap_or(rng.random_range(2..=4));
        let ids: Vec<NodeId> = (1..=n as u32).map(NodeId).collect();
        let limits = session_limits(&mut rng, cfg, c);
        let nodes: Vec<SimNode> = ids
            .iter()
            .map(|id| {
                let offset = if rng.random_bool(0.5) {
                    rng.random_range(0..=CLOCK_OFFSET_MAX_MS)
                } else {
                    0
                };
                SimNode::new(
                    id.0,
                    ids.clone(),
                    cfg.replication_heartbeat_ms,
                    limits,
                    offset,
                )
            })
            .collect();
        let coord_config = CoreConfig {
            servers: ids.clone(),
            heartbeat_interval_ms: cfg.coord_heartbeat_ms,
            failure_timeout_ms: cfg.coord_failure_timeout_ms,
            wait_for: WaitFor::All,
        };
        let keys: Vec<String> = (0..cfg.keys).map(|k| format!("k{k}")).collect();
        let timing = ClientTiming {
            op_timeout_ms: cfg.op_timeout_ms,
            attempt_timeout_ms: cfg.attempt_timeout_ms,
        };
        let servers: Vec<u32> = ids.iter().map(|id| id.0).collect();
        let clients = (1..=c as u32)
            .map(|id| {
                let slots = rng.random_range(1..=cfg.client_slots_max);
                Client::new(id, servers.clone(), keys.clone(), timing, slots, limits)
            })
            .collect();
        let deadline_ms = cfg.fault_ms + cfg.quiet_ms + 2 * cfg.op_timeout_ms + 100;
        let mut world = World {
            cfg: cfg.clone(),
            rng,
            now_ms: 0,
            rank: 0,
            queue: BTreeMap::new(),
            next_item: 0,
            step: 0,
            phase: Phase::Faults,
            nodes,
            coord: Some(CoordCore::new(coord_config.clone(), Term(0), 0)),
            coord_config,
            coord_life: 0,
            coord_term: 0,
            coord_members: coord::Members::new(),
            rpcs: BTreeMap::new(),
            next_rpc: 1,
            replies: BTreeMap::new(),
            next_reply: ReplyTo(1),
            network: Network::new(cfg),
            clients,
            watchers: Vec::new(),
            history: History::default(),
            inv: Invariants::new(
                keys.iter()
                    .cloned()
                    .chain(TXN_KEYS.iter().map(|k| k.to_string()))
                    .collect(),
                limits,
            ),
            faults: FaultCounts::default(),
            deadline_ms,
        };
        for id in 1..=n as u32 {
            world.inv.restart(id, 1, &[])?;
        }
        world.schedule(0, Item::Tick);
        world.schedule(cfg.fault_ms, Item::EndFaults);
        world.schedule(cfg.fault_ms + cfg.quiet_ms, Item::EndQuiet);
        if cfg.faults {
            let at = world.next_fault_delay();
            world.schedule(at, Item::Fault);
        }
        for i in 0..world.clients.len() {
            world.clients[i].boot(0, &mut world.rng);
            world.client_actions(i);
        }
        // Two watchers: the transaction keys from when it opens, every key from revision 1.
        let open_at = world.rng.random_range(0..=cfg.fault_ms / 2);
        world
            .watchers
            .push(Watcher::new(1, (SCAN_START, SCAN_END), 0, open_at));
        let open_at = world.rng.random_range(0..=cfg.fault_ms);
        world.watchers.push(Watcher::new(2, ("", ""), 1, open_at));
        Ok(world)
    }

    pub fn servers(&self) -> usize {
        self.nodes.len()
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn faults(&self) -> FaultCounts {
        let mut f = self.faults;
        f.dropped = self.network.faults.dropped;
        f.duplicated = self.network.faults.duplicated;
        f.reordered = self.network.faults.reordered;
        f
    }

    /// Runs until the final put succeeds; `Err` describes the first violation.
    pub fn run(&mut self) -> Result<(), String> {
        while let Some(((at, _), item)) = self.queue.pop_first() {
            if at > self.deadline_ms {
                return Err(format!(
                    "liveness: no successful final put by {} ms after healing everything \
                     (phase {:?}, leader {:?})",
                    self.deadline_ms - self.cfg.fault_ms,
                    self.phase,
                    self.leader()
                ));
            }
            if at != self.now_ms {
                self.rank = 0;
            }
            self.now_ms = at;
            self.rank += 1;
            self.step += 1;
            if self.cfg.verbose {
                println!(
                    "{:>6} ms #{:<7} {}",
                    self.now_ms,
                    self.step,
                    describe(&item)
                );
            }
            self.handle(item)?;
            self.poll_watchers()?;
            for c in &mut self.clients {
                if let Some(v) = c.violations.pop() {
                    return Err(v);
                }
                self.history.ops.append(&mut c.done);
                self.history.past_reads.append(&mut c.past_reads);
            }
            if self.phase == Phase::Drain && self.clients.iter().all(Client::idle) {
                self.phase = Phase::Final;
                let now_ns = self.now_ns();
                self.clients[0].start_final(self.now_ms, now_ns, &mut self.rng);
                self.client_actions(0);
            }
            if self.phase == Phase::Final {
                if let Some(ok) = self.clients[0].final_ok {
                    if !ok {
                        return Err("liveness: the final put after healing did not succeed".into());
                    }
                    return self.finish();
                }
            }
        }
        Err("simulator: event queue ran dry".into())
    }

    /// End of run: a leader is known, and the coord agrees.
    fn finish(&mut self) -> Result<(), String> {
        let Some(leader) = self.leader() else {
            return Err("liveness: no leader at the end".into());
        };
        if let Some(coord) = &self.coord {
            let view = coord.view();
            if view.leader != NodeId(leader) {
                return Err(format!(
                    "at the end the coord names leader {} of term {} but node {leader} leads",
                    view.leader, view.term
                ));
            }
        }
        Ok(()) // the history is checked by the caller (`run_seed`)
    }

    /// The live node that leads the highest term, if any.
    fn leader(&self) -> Option<u32> {
        self.nodes
            .iter()
            .filter_map(SimNode::replica)
            .filter(|r| r.is_leader())
            .max_by_key(|r| r.term().0)
            .map(|r| r.id().0)
    }

    pub fn stats(&self, acked_checked: u64) -> SimStats {
        let mut stats = SimStats {
            seeds: 1,
            steps: self.step,
            sim_ms: self.now_ms,
            faults: self.faults(),
            acked_writes_checked: acked_checked,
            committed_entries: self.inv.committed_len(),
            ..SimStats::default()
        };
        for op in &self.history.ops {
            use crate::history::{Input, OpResult};
            match (&op.input, &op.result) {
                (Input::Put { .. }, OpResult::Ok(_)) => stats.puts_ok += 1,
                (Input::Get { .. }, OpResult::Ok(_)) => stats.gets_ok += 1,
                (Input::Checker(kvraft_checker::Input::Scan { .. }), OpResult::Ok(_)) => {
                    stats.scans_ok += 1
                }
                (Input::Checker(_), OpResult::Ok(_)) => stats.txns_ok += 1,
                _ => stats.ops_unknown += 1,
            }
        }
        stats
    }

    fn now_ns(&self) -> u64 {
        self.now_ms * 1_000_000 + self.rank
    }

    fn schedule(&mut self, at_ms: u64, item: Item) {
        self.next_item += 1;
        self.queue.insert((at_ms, self.next_item), item);
    }

    fn next_fault_delay(&mut self) -> u64 {
        let every = self.cfg.fault_every_ms.max(2);
        self.now_ms + self.rng.random_range(every / 2..=every * 3 / 2)
    }

    fn life(&self, e: Endpoint) -> Option<u64> {
        match e {
            Endpoint::Coord => self.coord.as_ref().map(|_| self.coord_life),
            Endpoint::Node(id) => {
                let node = &self.nodes[id as usize - 1];
                node.is_up().then_some(node.incarnation)
            }
            Endpoint::Client(_) => Some(0),
        }
    }

    // ------------------------------------------------------------------ items

    fn handle(&mut self, item: Item) -> Result<(), String> {
        match item {
            Item::Tick => {
                let now_ms = self.now_ms;
                for id in 1..=self.nodes.len() as u32 {
                    let clock_ms = now_ms + self.nodes[id as usize - 1].clock_offset_ms;
                    self.step_node(id, Event::Tick { now_ms: clock_ms })?;
                    // The runtime makes the state machine durable on a timer; here at random
                    // moments, so crashes fall at every distance from the last one.
                    if chance(&mut self.rng, STATE_WRITE_PERMILLE) {
                        if let Some(exec) = self.nodes[id as usize - 1].exec.as_mut() {
                            exec.replica_mut().write_state();
                        }
                    }
                    if chance(&mut self.rng, STATE_SYNC_PERMILLE) {
                        if let Some(exec) = self.nodes[id as usize - 1].exec.as_mut() {
                            let applied = exec
                                .replica_mut()
                                .sync_state()
                                .map_err(|e| format!("node {id}: state sync failed: {e}"))?;
                            self.step_node(id, Event::StateDurable { applied })?;
                        }
                    }
                }
                self.step_coord(coord::Event::Tick { now_ms });
                self.schedule(now_ms + self.cfg.tick_ms, Item::Tick);
            }
            Item::Deliver {
                from,
                to,
                from_life,
                to_life,
                msg,
            } => {
                let alive = self.life(from) == Some(from_life) && self.life(to) == Some(to_life);
                if !alive || !self.network.reachable(from, to) {
                    self.lost(&msg);
                    return Ok(());
                }
                self.deliver(to, *msg)?;
            }
            Item::Fsync { node, life } => {
                let n = &mut self.nodes[node as usize - 1];
                if n.is_up() && n.incarnation == life {
                    let write_id = n.disk.complete_sync();
                    self.run_node(node, |exec| exec.log_synced(write_id))?;
                }
            }
            Item::Refused { rpc } => {
                if let Some(r) = self.rpcs.remove(&rpc) {
                    let id = NodeId(r.to);
                    self.step_coord(coord::Event::ServerGone { id });
                }
            }
            Item::RpcTimeout { rpc } => {
                if let Some(r) = self.rpcs.remove(&rpc) {
                    if r.heartbeat {
                        let id = NodeId(r.to);
                        self.step_coord(coord::Event::HeartbeatFailed { id });
                    }
                }
            }
            Item::Disconnected { leader, life, peer } => {
                if self.life(Endpoint::Node(leader)) == Some(life) {
                    let peer = NodeId(peer);
                    self.step_node(leader, Event::PeerDisconnected { peer })?;
                }
            }
            Item::Client { client, timer } => {
                let (now_ms, now_ns) = (self.now_ms, self.now_ns());
                let i = client as usize - 1;
                self.clients[i].on_timer(timer, now_ms, now_ns, &mut self.rng);
                self.client_actions(i);
            }
            Item::Fault => {
                if self.phase == Phase::Faults {
                    self.inject_fault()?;
                    let at = self.next_fault_delay();
                    self.schedule(at, Item::Fault);
                }
            }
            Item::Heal { partition } => self.network.heal(partition),
            Item::DiskSpace { node } => self.nodes[node as usize - 1].disk.full = false,
            Item::RestartNode { node } => self.restart_node(node)?,
            Item::RestartCoord => self.restart_coord(),
            Item::EndFaults => {
                self.phase = Phase::Quiet;
                self.network.heal_all();
                for node in &mut self.nodes {
                    node.disk.full = false;
                }
                for id in 1..=self.nodes.len() as u32 {
                    self.restart_node(id)?;
                }
                self.restart_coord();
            }
            Item::EndQuiet => {
                self.phase = Phase::Drain;
                for c in &mut self.clients {
                    c.issuing = false;
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, to: Endpoint, msg: Msg) -> Result<(), String> {
        match (to, msg) {
            (
                Endpoint::Node(id),
                Msg::Heartbeat {
                    rpc,
                    term,
                    leader,
                    catching_up,
                },
            ) => {
                let reply = self.route(id, Route::Coord { rpc });
                let leader = NodeId(leader);
                self.step_node(
                    id,
                    Event::CoordHeartbeat {
                        term: Term(term),
                        leader,
                        catching_up: Some(catching_up),
                        reply,
                    },
                )
            }
            (Endpoint::Node(id), Msg::Prepare { rpc, term }) => {
                let reply = self.route(id, Route::Coord { rpc });
                self.step_node(
                    id,
                    Event::Prepare {
                        term: Term(term),
                        reply,
                    },
                )
            }
            (
                Endpoint::Node(id),
                Msg::Append {
                    leader,
                    generation,
                    req,
                    ..
                },
            ) => {
                if self.network.stream(leader, id) != generation {
                    return Ok(()); // the stream broke: later messages on it are lost too
                }
                let stream = (u64::from(leader) << 32) | generation;
                self.step_node(id, Event::AppendEntries { stream, req })
            }
            (
                Endpoint::Node(id),
                Msg::AppendResp {
                    follower,
                    generation,
                    resp,
                    ..
                },
            ) => {
                if self.network.stream(id, follower) != generation {
                    return Ok(());
                }
                self.step_node(id, Event::AppendEntriesResponse { resp })
            }
            (
                Endpoint::Node(id),
                Msg::Request {
                    client,
                    attempt,
                    request,
                },
            ) => {
                let reply = self.route(id, Route::Client { client, attempt });
                let event = match request {
                    Request::Register { client_id } => Event::RegisterSession { client_id, reply },
                    Request::Put {
                        session_id,
                        seq,
                        ack_seq,
                        key,
                        value,
                    } => Event::Put {
                        cmd: PutCommand {
                            session_id,
                            seq,
                            ack_seq,
                            key: Bytes::from(key),
                            value: Bytes::from(value),
                        },
                        reply,
                    },
                    Request::Get { key } => Event::Get {
                        key: Bytes::from(key),
                        reply,
                    },
                    Request::Txn { cmd } => Event::Txn { cmd, reply },
                    Request::Range {
                        start,
                        end,
                        revision,
                    } => Event::Range {
                        query: RangeQuery {
                            start: Bytes::from(start),
                            end: Bytes::from(end),
                            limit: 0,
                            keys_only: false,
                            revision,
                        },
                        reply,
                    },
                };
                self.step_node(id, event)
            }
            (Endpoint::Coord, Msg::HeartbeatReply { rpc, report }) => {
                if let Some(r) = self.rpcs.remove(&rpc) {
                    let event = coord::Event::HeartbeatOk {
                        id: NodeId(r.to),
                        report: report_from_proto(report),
                        now_ms: self.now_ms,
                    };
                    self.step_coord(event);
                }
                Ok(())
            }
            (
                Endpoint::Coord,
                Msg::PrepareReply {
                    rpc,
                    ok,
                    term,
                    last_log_term,
                    last_log_index,
                    uuid,
                },
            ) => {
                if let Some(r) = self.rpcs.remove(&rpc) {
                    let id = NodeId(r.to);
                    let event = if ok {
                        coord::Event::PrepareOk {
                            id,
                            term: Term(term),
                            last_log_term: Term(last_log_term),
                            last_log_index: LogIndex(last_log_index),
                            uuid,
                        }
                    } else {
                        coord::Event::PrepareRejected {
                            id,
                            term: Term(term),
                        }
                    };
                    self.step_coord(event);
                }
                Ok(())
            }
            (Endpoint::Client(c), Msg::Response { attempt, reply }) => {
                let (now_ms, now_ns) = (self.now_ms, self.now_ns());
                let i = c as usize - 1;
                self.clients[i].on_reply(attempt, reply, now_ms, now_ns, &mut self.rng);
                self.client_actions(i);
                Ok(())
            }
            (Endpoint::Client(c), Msg::View { term, leader }) => {
                self.clients[c as usize - 1].on_view(term, leader);
                Ok(())
            }
            (to, msg) => Err(format!("simulator wiring: {msg:?} delivered to {to:?}")),
        }
    }

    fn route(&mut self, node: u32, route: Route) -> ReplyTo {
        let reply = self.next_reply;
        self.next_reply = self.next_reply.next();
        self.replies.insert((node, reply), route);
        reply
    }

    /// A message was lost: a replication message breaks its stream.
    fn lost(&mut self, msg: &Msg) {
        let (leader, follower, generation) = match *msg {
            Msg::Append {
                leader,
                follower,
                generation,
                ..
            }
            | Msg::AppendResp {
                leader,
                follower,
                generation,
                ..
            } => (leader, follower, generation),
            _ => return,
        };
        if self.network.break_stream(leader, follower, generation) {
            if let Some(life) = self.life(Endpoint::Node(leader)) {
                let at = self.now_ms + self.rng.random_range(DISCONNECT_NOTICE_MS);
                self.schedule(
                    at,
                    Item::Disconnected {
                        leader,
                        life,
                        peer: follower,
                    },
                );
            }
        }
    }

    fn send(&mut self, from: Endpoint, to: Endpoint, msg: Msg) {
        let random = self.phase == Phase::Faults;
        let delays = self.network.plan(&mut self.rng, from, to, random);
        if delays.is_empty() {
            let partitioned = !self.network.reachable(from, to);
            if partitioned || chance(&mut self.rng, DROP_BREAKS_STREAM_PERMILLE) {
                self.lost(&msg);
            }
            return;
        }
        let (Some(from_life), Some(to_life)) = (self.life(from), self.life(to)) else {
            self.lost(&msg);
            return;
        };
        for d in delays {
            let item = Item::Deliver {
                from,
                to,
                from_life,
                to_life,
                msg: Box::new(msg.clone()),
            };
            self.schedule(self.now_ms + d, item);
        }
    }

    // ------------------------------------------------------------------ replicas

    fn step_node(&mut self, id: u32, event: Event) -> Result<(), String> {
        self.run_node(id, |exec| exec.step(event))
    }

    /// Feeds a node's executor (`feed`), then executes the batch through the simulated disk
    /// and network, as the runtime does through its files and sockets.
    fn run_node(&mut self, id: u32, feed: impl FnOnce(&mut Executor)) -> Result<(), String> {
        let i = id as usize - 1;
        let Some(mut exec) = self.nodes[i].exec.take() else {
            return Ok(());
        };
        feed(&mut exec);
        let mut io = NodeIo {
            world: self,
            id,
            failure: None,
            published: None,
        };
        let executed = exec.execute(&mut io);
        let (failure, published) = (io.failure, io.published);
        let node = &mut self.nodes[i];
        node.exec = Some(exec);
        executed.map_err(|e| format!("node {id}: {e}"))?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        let node = &self.nodes[i];
        let exec = node.exec.as_ref().expect("invariant: put back above");
        let replica = exec.replica();
        // What the state machine holds durably counts as durable log (an installed snapshot).
        let durable = node.disk.durable_index().max(node.engine.durable_applied());
        if node.disk.last_index() + exec.log_pending() as u64 != replica.last_index().0
            || durable < replica.durable_index().0
            || node.disk.first() > replica.log_base().index + 1
        {
            return Err(format!(
                "simulator wiring: node {id}'s disk (entries {}..={}, durable to {}) disagrees \
                 with its replica (base {}, last {}, durable to {})",
                node.disk.first(),
                node.disk.last_index(),
                node.disk.durable_index(),
                replica.log_base().index,
                replica.last_index().0,
                replica.durable_index().0
            ));
        }
        self.inv.after_step(id, replica)?;
        let (installed, changes) = published.expect("invariant: every execution publishes");
        // As the runtime: an install resets the watch history before the changes after it.
        if let Some(index) = installed {
            node.hub.reset(index.0);
        }
        node.hub.publish(changes.clone(), replica.last_applied().0);
        self.inv
            .check_changes(id, replica, changes, installed.is_some())
    }

    /// Runs every watcher against the nodes up now.
    fn poll_watchers(&mut self) -> Result<(), String> {
        let up: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| n.is_up())
            .map(|n| (n.id, n.incarnation, n.hub.clone()))
            .collect();
        for w in &mut self.watchers {
            w.poll(self.now_ms, &up, &mut self.rng);
            if let Some(v) = w.violations.pop() {
                return Err(v);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ coord

    fn step_coord(&mut self, event: coord::Event) {
        let Some(core) = self.coord.as_mut() else {
            return;
        };
        let cmds = core.step(event);
        for cmd in cmds {
            match cmd {
                coord::Command::PersistTerm(t) => self.coord_term = t.0,
                coord::Command::PersistMembers(m) => self.coord_members = m,
                coord::Command::SendHeartbeat {
                    to,
                    term,
                    leader_id,
                    catching_up,
                } => {
                    let rpc = self.new_rpc(to.0, true);
                    let (coord, node) = (Endpoint::Coord, Endpoint::Node(to.0));
                    if !self.nodes[to.0 as usize - 1].is_up() && self.network.reachable(coord, node)
                    {
                        // Nothing listens at a crashed node's address: refused at once.
                        let at = self.now_ms + self.rng.random_range(1..=3);
                        self.schedule(at, Item::Refused { rpc });
                        continue;
                    }
                    let msg = Msg::Heartbeat {
                        rpc,
                        term: term.0,
                        leader: leader_id.0,
                        catching_up,
                    };
                    self.send(coord, node, msg);
                }
                coord::Command::SendPrepare { to, term } => {
                    let rpc = self.new_rpc(to.0, false);
                    let msg = Msg::Prepare { rpc, term: term.0 };
                    self.send(Endpoint::Coord, Endpoint::Node(to.0), msg);
                }
                coord::Command::PublishLeader(view) => {
                    for c in 1..=self.clients.len() as u32 {
                        let msg = Msg::View {
                            term: view.term.0,
                            leader: view.leader.0,
                        };
                        self.send(Endpoint::Coord, Endpoint::Client(c), msg);
                    }
                }
            }
        }
    }

    fn new_rpc(&mut self, to: u32, heartbeat: bool) -> u64 {
        let rpc = self.next_rpc;
        self.next_rpc += 1;
        self.rpcs.insert(rpc, Rpc { to, heartbeat });
        let at = self.now_ms + RPC_TIMEOUT_HEARTBEATS * self.cfg.coord_heartbeat_ms;
        self.schedule(at, Item::RpcTimeout { rpc });
        rpc
    }

    // ------------------------------------------------------------------ clients

    fn client_actions(&mut self, i: usize) {
        let actions = std::mem::take(&mut self.clients[i].out);
        let client = self.clients[i].id;
        for action in actions {
            match action {
                ClientAction::Send {
                    node,
                    attempt,
                    request,
                } => {
                    let msg = Msg::Request {
                        client,
                        attempt,
                        request,
                    };
                    self.send(Endpoint::Client(client), Endpoint::Node(node), msg);
                }
                ClientAction::Timer { at_ms, timer } => {
                    self.schedule(at_ms, Item::Client { client, timer });
                }
            }
        }
    }

    // ------------------------------------------------------------------ faults

    fn inject_fault(&mut self) -> Result<(), String> {
        let n = self.nodes.len() as u32;
        let kind = self.rng.random_range(0..7);
        match kind {
            0 => {
                // One node cut from everyone (servers, coord, clients), both ways.
                let node = self.victim();
                let mut pairs = Vec::new();
                let mut others: Vec<Endpoint> =
                    (1..=n).filter(|&o| o != node).map(Endpoint::Node).collect();
                others.push(Endpoint::Coord);
                others.extend((1..=self.clients.len() as u32).map(Endpoint::Client));
                for o in others {
                    pairs.push((Endpoint::Node(node), o));
                    pairs.push((o, Endpoint::Node(node)));
                }
                self.partition(pairs);
                self.faults.isolations += 1;
            }
            1 => {
                // A node and the coord cannot talk; the data path is intact.
                let node = Endpoint::Node(self.victim());
                self.partition(vec![(node, Endpoint::Coord), (Endpoint::Coord, node)]);
                self.faults.coord_partitions += 1;
            }
            2 => {
                // A split of the servers; the coord sits on one side.
                let size = self.rng.random_range(1..n.max(2));
                let mut side: Vec<u32> = (1..=n).collect();
                for k in (1..side.len()).rev() {
                    let j = self.rng.random_range(0..=k);
                    side.swap(k, j);
                }
                let (a, b) = side.split_at(size as usize);
                let coord_with_a = self.rng.random_bool(0.5);
                let mut pairs = Vec::new();
                for &x in a {
                    for &y in b {
                        pairs.push((Endpoint::Node(x), Endpoint::Node(y)));
                        pairs.push((Endpoint::Node(y), Endpoint::Node(x)));
                    }
                }
                for &x in if coord_with_a { b } else { a } {
                    pairs.push((Endpoint::Node(x), Endpoint::Coord));
                    pairs.push((Endpoint::Coord, Endpoint::Node(x)));
                }
                self.partition(pairs);
                self.faults.splits += 1;
            }
            3 => {
                // One direction of one link drops everything.
                let x = self.victim();
                let to = if self.rng.random_bool(0.7) && n > 1 {
                    let mut y = self.rng.random_range(1..n);
                    if y >= x {
                        y += 1;
                    }
                    Endpoint::Node(y)
                } else {
                    Endpoint::Coord
                };
                let pair = if self.rng.random_bool(0.5) {
                    (Endpoint::Node(x), to)
                } else {
                    (to, Endpoint::Node(x))
                };
                self.partition(vec![pair]);
                self.faults.one_way += 1;
            }
            4 => {
                let node = self.victim();
                if self.nodes[node as usize - 1].is_up() {
                    if self.may_lose_a_disk() && chance(&mut self.rng, DISK_LOSS_PERMILLE) {
                        self.lose_disk(node);
                    } else {
                        self.crash_node(node);
                    }
                    let at = self.now_ms + self.rng.random_range(DOWN_MS);
                    self.schedule(at, Item::RestartNode { node });
                }
            }
            6 => {
                // A full disk: log appends fail with ENOSPC for a while.
                let node = self.victim();
                self.nodes[node as usize - 1].disk.full = true;
                let at = self.now_ms + self.rng.random_range(PARTITION_MS);
                self.schedule(at, Item::DiskSpace { node });
                self.faults.disks_full += 1;
            }
            _ => {
                if self.coord.is_some() {
                    self.coord = None;
                    self.coord_life += 1;
                    self.rpcs.clear();
                    self.faults.coord_crashes += 1;
                    let at = self.now_ms + self.rng.random_range(DOWN_MS);
                    self.schedule(at, Item::RestartCoord);
                }
            }
        }
        Ok(())
    }

    /// The node a fault hits: half the time the leader (if any), to force failovers.
    fn victim(&mut self) -> u32 {
        let leader = self.leader();
        match leader {
            Some(l) if self.rng.random_bool(LEADER_VICTIM_SHARE) => l,
            _ => self.rng.random_range(1..=self.nodes.len() as u32),
        }
    }

    fn partition(&mut self, pairs: Vec<(Endpoint, Endpoint)>) {
        let id = self.network.partition(pairs);
        let at = self.now_ms + self.rng.random_range(PARTITION_MS);
        self.schedule(at, Item::Heal { partition: id });
    }

    fn crash_node(&mut self, id: u32) {
        let node = &mut self.nodes[id as usize - 1];
        let unsynced = node.disk.unsynced();
        let extra = if unsynced > 0 && chance(&mut self.rng, self.cfg.torn_tail_permille) {
            self.faults.torn_tails += 1;
            self.rng.random_range(0..=unsynced)
        } else {
            0
        };
        node.crash(extra);
        self.replies.retain(|(n, _), _| *n != id);
        self.faults.crashes += 1;
    }

    /// A disk may be lost while every node is up and the coord records every node's current
    /// storage as a voter (none lost and not yet caught up): then a majority of servers with
    /// their data always remains, so the cluster can recover. Losing more at once may cost
    /// availability for good (no voter majority), which is the design, not a bug for the
    /// simulation to report.
    fn may_lose_a_disk(&self) -> bool {
        self.nodes.iter().all(|n| {
            let member = self.coord_members.get(&NodeId(n.id));
            n.is_up() && member.is_some_and(|m| m.voter && m.uuid == n.storage_id())
        })
    }

    /// DESIGN rule 10's fault: the node crashes and comes back with an empty disk and a new
    /// storage identity; every entry it acknowledged is gone.
    fn lose_disk(&mut self, id: u32) {
        self.nodes[id as usize - 1].lose_disk();
        self.replies.retain(|(n, _), _| *n != id);
        self.faults.disk_losses += 1;
    }

    fn restart_node(&mut self, id: u32) -> Result<(), String> {
        let node = &mut self.nodes[id as usize - 1];
        if node.is_up() {
            return Ok(());
        }
        node.start();
        let entries = node.disk.log().to_vec();
        let first = node.disk.first();
        self.inv.restart(id, first, &entries)
    }

    fn restart_coord(&mut self) {
        if self.coord.is_none() {
            let core = CoordCore::recovered(
                self.coord_config.clone(),
                Term(self.coord_term),
                self.coord_members.clone(),
                self.now_ms,
            );
            self.coord = Some(core);
        }
    }
}

/// One node's view of the world while its executor runs a batch: the node's disk, the
/// simulated network and the reply routes. The first violation it sees is kept in `failure`.
struct NodeIo<'w> {
    world: &'w mut World,
    id: u32,
    failure: Option<String>,
    /// What the batch applied (checked once the step is done), and whether it installed a
    /// snapshot.
    published: Option<(Option<LogIndex>, Vec<Change>)>,
}

impl NodeIo<'_> {
    fn check(&mut self, result: Result<(), String>) {
        if let (Err(e), None) = (result, &self.failure) {
            self.failure = Some(e);
        }
    }
}

impl Io for NodeIo<'_> {
    fn storage(&mut self) -> &mut dyn Storage {
        &mut self.world.nodes[self.id as usize - 1].disk
    }

    fn inspect(&mut self, replica: &Replica, cmds: &mut Vec<Command>) {
        canonical_order(cmds);
        if self.world.cfg.verbose {
            trace_node(self.id, replica, cmds);
        }
        let id = self.id;
        for cmd in cmds.iter() {
            let result = match cmd {
                Command::AppendLog(entries) => self.world.inv.on_append(id, entries),
                Command::TruncateLog(from) => {
                    self.world.inv.on_truncate(id, from.0);
                    Ok(())
                }
                Command::CompactLog(_) => {
                    self.world.faults.compactions += 1;
                    Ok(())
                }
                Command::ResetLog(next) => self.world.inv.on_reset(id, next.0),
                _ => Ok(()),
            };
            self.check(result);
        }
    }

    fn publish(&mut self, _replica: &Replica, installed: Option<LogIndex>, changes: Vec<Change>) {
        self.published = Some((installed, changes));
    }

    fn start_log_sync(&mut self, write_id: u64) {
        let world = &mut *self.world;
        let node = &mut world.nodes[self.id as usize - 1];
        node.disk.start_sync(write_id);
        let life = node.incarnation;
        let ms = if chance(&mut world.rng, FSYNC_SLOW_PERMILLE) {
            world.rng.random_range(FSYNC_SLOW_MS)
        } else {
            world.rng.random_range(FSYNC_MS)
        };
        world.schedule(
            world.now_ms + ms,
            Item::Fsync {
                node: self.id,
                life,
            },
        );
    }

    fn send_append(&mut self, to: NodeId, req: AppendEntriesRequest) {
        let generation = self.world.network.stream(self.id, to.0);
        let msg = Msg::Append {
            leader: self.id,
            follower: to.0,
            generation,
            req,
        };
        (self.world).send(Endpoint::Node(self.id), Endpoint::Node(to.0), msg);
    }

    fn send_append_response(&mut self, stream: StreamId, resp: AppendEntriesResponse) {
        let leader = (stream >> 32) as u32;
        let generation = stream & 0xffff_ffff;
        let msg = Msg::AppendResp {
            leader,
            follower: self.id,
            generation,
            resp,
        };
        (self.world).send(Endpoint::Node(self.id), Endpoint::Node(leader), msg);
    }

    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        let id = self.id;
        let msg = match self.world.replies.remove(&(id, to)) {
            Some(Route::Coord { rpc }) => match reply {
                Reply::Report(report) => Msg::HeartbeatReply { rpc, report },
                Reply::Prepare {
                    ok,
                    term,
                    last_log_term,
                    last_log_index,
                    uuid,
                } => Msg::PrepareReply {
                    rpc,
                    ok,
                    term: term.0,
                    last_log_term: last_log_term.0,
                    last_log_index: last_log_index.0,
                    uuid,
                },
                other => return self.check(Err(format!("coord RPC answered with {other:?}"))),
            },
            Some(Route::Client { client, attempt }) => {
                let msg = Msg::Response { attempt, reply };
                (self.world).send(Endpoint::Node(id), Endpoint::Client(client), msg);
                return;
            }
            None => {
                return self.check(Err(format!(
                    "node {id} answered unknown reply handle {}",
                    to.0
                )))
            }
        };
        (self.world).send(Endpoint::Node(id), Endpoint::Coord, msg);
    }

    fn notice(&mut self, replica: &Replica, cmd: Command) {
        let id = self.id;
        match cmd {
            Command::Refused { from, reason } => self.check(Err(format!(
                "node {id} refused a message of node {from}, which only correct nodes send \
                 here: {reason}"
            ))),
            Command::SnapshotInstalled { .. } => self.world.faults.snapshots_installed += 1,
            Command::RoleChanged { leader: true, term } => {
                self.world.faults.leaders_elected += 1;
                let result = self.world.inv.on_leader(id, term.0, replica);
                self.check(result);
            }
            _ => {}
        }
    }

    fn disk_full_changed(&mut self, _change: DiskFull) {
        self.world.faults.disk_full_changes += 1;
    }
}

/// The session limits of a run, from the seed: with faults, a third of the runs never expire
/// or evict, a third expire idle sessions after a short TTL (clients idle longer now and then),
/// a third have a session table barely larger than the clients (registrations evict).
fn session_limits(rng: &mut StdRng, cfg: &SimConfig, clients: usize) -> SessionLimits {
    let window = rng.random_range(2..=cfg.session_window_max.max(2));
    // Expiry and eviction are part of the fault mix: a run without faults keeps sessions.
    let mode = if cfg.faults {
        rng.random_range(0..3)
    } else {
        0
    };
    let (ttl_ms, sessions_max) = match mode {
        0 => (SESSION_TTL_NEVER_MS, SESSIONS_UNBOUNDED),
        1 => (rng.random_range(SESSION_TTL_SHORT_MS), SESSIONS_UNBOUNDED),
        _ => (SESSION_TTL_NEVER_MS, clients + 1),
    };
    SessionLimits {
        ttl_ms,
        sessions_max,
        window,
        // Short tails, so compaction runs often and lagging or restarted nodes need snapshots.
        log_tail_entries: rng.random_range(LOG_TAIL_ENTRIES),
        // Half the runs pace snapshot transfers: a 256-byte chunk every 10 to 100 ms.
        snapshot_bytes_per_sec: if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(2_560..=25_600)
        },
        // Half the runs keep a short history, so some reads at a past revision are refused.
        past_revisions: if rng.random_bool(0.5) {
            20_000
        } else {
            rng.random_range(5..=60)
        },
    }
}

/// The `-v` trace of a node step: its state and what it did besides sending.
fn trace_node(id: u32, r: &kvraft_server::replica::Replica, cmds: &[Command]) {
    let mut did = Vec::new();
    for c in cmds {
        match c {
            Command::SaveHardState(hs) => did.push(format!("save(t{} l{})", hs.term, hs.leader)),
            Command::AppendLog(es) => did.push(format!(
                "append({}..={} t{})",
                es[0].index,
                es[es.len() - 1].index,
                es[0].term
            )),
            Command::TruncateLog(i) => did.push(format!("truncate({i}..)")),
            Command::RoleChanged { leader, term } => {
                did.push(format!("role(leader={leader} t{term})"))
            }
            Command::Reply { reply, .. } => did.push(format!("reply({reply:?})")),
            _ => {}
        }
    }
    println!(
        "         node {id}: t{} leader={} hint={} last={} durable={} commit={} applied={} {}",
        r.term().0,
        r.is_leader(),
        r.leader_hint(),
        r.last_index().0,
        r.durable_index().0,
        r.commit_index().0,
        r.last_applied().0,
        did.join(" ")
    );
}

/// Sorts each run of consecutive sends and replies by destination (stable, so messages to one
/// destination keep their order). The replica iterates `HashMap`s (peers, waiting clients)
/// when it emits them, so their order differs from process to process; messages to different
/// destinations commute, and sorting makes the run independent of the hasher's seed.
fn canonical_order(cmds: &mut [Command]) {
    fn key(c: &Command) -> Option<(u8, u64)> {
        match c {
            Command::SendAppend { to, .. } => Some((0, u64::from(to.0))),
            Command::SendAppendResponse { stream, .. } => Some((1, *stream)),
            Command::Reply { to, .. } => Some((2, to.0)),
            _ => None,
        }
    }
    let mut i = 0;
    while i < cmds.len() {
        if key(&cmds[i]).is_none() {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < cmds.len() && key(&cmds[j]).is_some() {
            j += 1;
        }
        cmds[i..j].sort_by_key(|c| key(c).expect("invariant: a send or reply"));
        i = j;
    }
}

/// The coord's view of a server report (`kvraft_coord::convert` is private to the coord).
fn report_from_proto(report: kvraft_proto::ServerReport) -> coord::ServerReport {
    let role = match kvraft_proto::Role::try_from(report.role) {
        Ok(kvraft_proto::Role::Leader) => coord::Role::Leader,
        Ok(kvraft_proto::Role::Follower) => coord::Role::Follower,
        _ => coord::Role::Unknown,
    };
    coord::ServerReport {
        id: NodeId(report.server_id),
        uuid: report.uuid,
        term: Term(report.term),
        role,
        leader: NodeId(report.leader_id),
        last_log: LogPosition {
            term: Term(report.last_log_term),
            index: LogIndex(report.last_log_index),
        },
        commit_index: LogIndex(report.commit_index),
        // Every simulated disk joins before the first term, so the coord always has a record
        // and detects a lost disk by its new identity; the never-joined case is unit-tested.
        new_storage: false,
        caught_up: report
            .caught_up
            .into_iter()
            .map(|m| (NodeId(m.server_id), m.uuid))
            .collect(),
    }
}

fn describe(item: &Item) -> String {
    match item {
        Item::Deliver { from, to, msg, .. } => {
            let what = match msg.as_ref() {
                Msg::Append { req, .. } => format!(
                    "AppendEntries t{} prev {}/{} n={} commit {} round {}",
                    req.term,
                    req.prev_log_term,
                    req.prev_log_index,
                    req.entries.len(),
                    req.leader_commit,
                    req.read_round
                ),
                Msg::AppendResp { resp, .. } => format!(
                    "AppendResp t{} ok={} match {} conflict {} round {}",
                    resp.term, resp.success, resp.match_index, resp.conflict_index, resp.read_round
                ),
                Msg::HeartbeatReply { report, .. } => format!(
                    "HeartbeatReply t{} role {} leader {} last {}/{} commit {}",
                    report.term,
                    report.role,
                    report.leader_id,
                    report.last_log_term,
                    report.last_log_index,
                    report.commit_index
                ),
                other => format!("{other:?}"),
            };
            format!("{from:?} -> {to:?}: {what}")
        }
        other => format!("{other:?}"),
    }
}
