//! Fault injection: the test hooks the original project made by editing code, as runtime state
//! that the `server` flags set at start and the `Admin.SetFaults` RPC changes while running.
//!
//! - partition from the coord: heartbeats and prepares are answered with an error;
//! - partition from peers: replication to and from them is dropped (the stream is closed), or
//!   with `one_way` only what this server sends to them;
//! - crash after commit: the process exits as leader once the commit index reaches an index,
//!   before any reply for it is sent;
//! - delay: every outgoing replication message waits this long;
//! - disk full: log writes fail with ENOSPC until cleared (a storage fault hook);
//! - crash after a snapshot install: the process exits once the state file holds a received
//!   snapshot, before the log is reset (the restart must finish the install).
//!
//! Shared by the gRPC handlers and the runtime; the lock is never held across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvraft_common::NodeId;

#[derive(Debug, Default)]
struct State {
    coord_until: Option<Instant>,
    peers_until: HashMap<NodeId, Instant>,
    crash_after_commit: u64,
    delay: Duration,
    disk_full: bool,
    one_way: bool,
    crash_after_snapshot_install: bool,
}

#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

/// What to inject, as given by flags or the admin RPC. Zero durations heal.
#[derive(Clone, Debug, Default)]
pub struct FaultSpec {
    pub partition_coord: Duration,
    pub partition_peers: Vec<NodeId>,
    pub partition_peers_for: Duration,
    pub crash_after_commit: u64,
    pub delay: Duration,
    pub disk_full: bool,
    /// The peer partition drops only what this server sends.
    pub one_way: bool,
    pub crash_after_snapshot_install: bool,
}

impl Faults {
    pub fn new(spec: &FaultSpec) -> Self {
        let faults = Faults::default();
        faults.set(spec);
        faults
    }

    /// Replaces every fault with `spec` (windows start now).
    pub fn set(&self, spec: &FaultSpec) {
        let now = Instant::now();
        let mut s = self.lock();
        s.coord_until = (!spec.partition_coord.is_zero()).then(|| now + spec.partition_coord);
        s.peers_until = spec
            .partition_peers
            .iter()
            .filter(|_| !spec.partition_peers_for.is_zero())
            .map(|&p| (p, now + spec.partition_peers_for))
            .collect();
        s.crash_after_commit = spec.crash_after_commit;
        s.delay = spec.delay;
        s.disk_full = spec.disk_full;
        s.one_way = spec.one_way;
        s.crash_after_snapshot_install = spec.crash_after_snapshot_install;
    }

    pub fn crash_after_snapshot_install(&self) -> bool {
        self.lock().crash_after_snapshot_install
    }

    pub fn coord_partitioned(&self) -> bool {
        self.lock().coord_until.is_some_and(|t| Instant::now() < t)
    }

    /// Messages from this server to `peer` are dropped.
    pub fn drops_to(&self, peer: NodeId) -> bool {
        self.lock()
            .peers_until
            .get(&peer)
            .is_some_and(|&t| Instant::now() < t)
    }

    /// Messages from `peer` to this server are dropped.
    pub fn drops_from(&self, peer: NodeId) -> bool {
        self.drops_to(peer) && !self.lock().one_way
    }

    /// The index after whose commit a leader must exit, 0 for none.
    pub fn crash_after_commit(&self) -> u64 {
        self.lock().crash_after_commit
    }

    pub fn delay(&self) -> Duration {
        self.lock().delay
    }

    pub fn disk_full(&self) -> bool {
        self.lock().disk_full
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
