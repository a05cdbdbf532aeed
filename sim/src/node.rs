//! [`SimNode`]: one simulated server process: its replica core while it runs, its disk, and
//! its incarnation (bumped on every crash, so messages and fsyncs of a previous life are
//! recognised and dropped). Its storage identity (the uuid a real data directory is created
//! with) lasts as long as its disk: a crash keeps it, losing the disk makes a new one.

use kvraft_common::NodeId;
use kvraft_server::engine::MemEngine;
use kvraft_server::executor::Executor;
use kvraft_server::log_writer::finish_interrupted_install;
use kvraft_server::replica::{Replica, ReplicaConfig};
use kvraft_server::state_machine::StateMachine;
use kvraft_server::watch::WatchHub;
use std::sync::Arc;

use crate::disk::Disk;

/// The session limits of one run: in some seeds sessions never expire and are never evicted
/// (a `SessionExpired` answer is then a bug), in others they expire after a short idle time or
/// are evicted by a small session table (then clients renew them, as kvslib does).
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub ttl_ms: u64,
    pub sessions_max: usize,
    /// Most unacknowledged requests per session; small, so clients reach it.
    pub window: u64,
    /// Entries kept below the state machine's durable position (`[server] log_tail_entries`).
    pub log_tail_entries: u64,
    /// Pace of snapshot transfers (`[server] snapshot_bytes_per_sec`; 0: unpaced).
    pub snapshot_bytes_per_sec: u64,
    /// Revisions of history kept for reads at a past revision (`[server]
    /// watch_history_revisions`).
    pub past_revisions: usize,
}

/// Small snapshot chunks, so a transfer takes several (and some get lost or repeated).
const SNAPSHOT_CHUNK_BYTES: usize = 256;

/// TTL of a run whose sessions never expire.
pub const SESSION_TTL_NEVER_MS: u64 = u64::MAX / 4;
/// Session table of a run that never evicts.
pub const SESSIONS_UNBOUNDED: usize = 1_000_000;

pub struct SimNode {
    pub id: u32,
    /// The server's executor (its replica core and log writer: batching, disk-full backlog,
    /// group fsync); `None` while crashed, and while the world runs a step of it.
    pub exec: Option<Executor>,
    /// The process is up (its executor may be out for a step).
    running: bool,
    pub disk: Disk,
    /// The state machine's engine on this disk: a crash keeps what it last synced.
    pub engine: MemEngine,
    pub incarnation: u64,
    /// Bumped when the disk is lost; part of the storage identity.
    pub disk_generation: u64,
    /// This node's clock reads the simulated time plus this (clocks of servers disagree).
    pub clock_offset_ms: u64,
    servers: Vec<NodeId>,
    heartbeat_ms: u64,
    limits: SessionLimits,
    /// The watch history and registry of the running process (as the runtime's): a new one
    /// at each start, fed with what each step applied.
    pub hub: Arc<WatchHub>,
}

impl SimNode {
    pub fn new(
        id: u32,
        servers: Vec<NodeId>,
        heartbeat_ms: u64,
        limits: SessionLimits,
        clock_offset_ms: u64,
    ) -> SimNode {
        let mut node = SimNode {
            id,
            exec: None,
            running: false,
            disk: Disk::default(),
            engine: MemEngine::new(),
            incarnation: 0,
            disk_generation: 0,
            clock_offset_ms,
            servers,
            heartbeat_ms,
            limits,
            hub: Arc::new(WatchHub::new(0, 1, usize::MAX)),
        };
        node.start();
        node
    }

    pub fn is_up(&self) -> bool {
        self.running
    }

    /// The replica core, while the process is up and not being stepped.
    pub fn replica(&self) -> Option<&Replica> {
        self.exec.as_ref().map(Executor::replica)
    }

    /// Starts a replica from what the disk holds (recovery).
    pub fn start(&mut self) {
        let cfg = ReplicaConfig {
            id: NodeId(self.id),
            servers: self.servers.clone(),
            uuid: self.storage_id(),
            session_ttl_ms: self.limits.ttl_ms,
            sessions_max: self.limits.sessions_max,
            session_window: self.limits.window,
            heartbeat_ms: self.heartbeat_ms,
            log_tail_entries: self.limits.log_tail_entries,
            log_tail_bytes: usize::MAX,
            snapshot_chunk_bytes: SNAPSHOT_CHUNK_BYTES,
            snapshot_bytes_per_sec: self.limits.snapshot_bytes_per_sec,
            max_value_bytes: kvraft_common::limits::VALUE_BYTES_MAX,
        };
        let (hard, first, entries) = self.disk.crash(0);
        let mut sm = StateMachine::open(
            Box::new(self.engine.clone()),
            self.limits.ttl_ms,
            self.limits.sessions_max,
        )
        .expect("invariant: the memory engine never fails");
        sm.set_past_bounds(self.limits.past_revisions, usize::MAX);
        // As the runtime: an install whose log reset did not happen is finished.
        let (first, entries) = finish_interrupted_install(&sm, first, entries, &mut self.disk)
            .expect("invariant: the simulated disk resets");
        let mut replica = Replica::recovered(cfg, hard, first, entries, sm)
            .expect("invariant: the engine applies only entries durable in the log");
        // As the runtime, for watches (the world takes them after every step).
        replica.record_changes(true);
        self.hub = Arc::new(WatchHub::new(
            replica.last_applied().0,
            self.limits.past_revisions,
            usize::MAX,
        ));
        self.exec = Some(Executor::new(replica));
        self.running = true;
    }

    /// The identity of the current disk, as a data directory's uuid.
    pub fn storage_id(&self) -> String {
        format!("node{}-disk{}", self.id, self.disk_generation)
    }

    /// Crashes the process and loses its whole disk: it restarts empty, with a new storage
    /// identity (a wiped or replaced data directory).
    pub fn lose_disk(&mut self) {
        self.exec = None;
        self.running = false;
        self.incarnation += 1;
        self.disk_generation += 1;
        self.disk = Disk::default();
        self.engine = MemEngine::new();
    }

    /// Crashes the process: the replica is gone, the disk keeps its durable part plus
    /// `extra_unsynced` entries of the unsynced tail.
    pub fn crash(&mut self, extra_unsynced: usize) {
        self.exec = None;
        self.running = false;
        self.incarnation += 1;
        let (hard, first, entries) = self.disk.crash(extra_unsynced);
        self.disk = Disk::recovered(hard, first, entries);
        self.engine.crash();
    }
}
