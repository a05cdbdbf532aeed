//! [`SimNode`]: one simulated server process: its replica core while it runs, its disk, and
//! its incarnation (bumped on every crash, so messages and fsyncs of a previous life are
//! recognised and dropped).

use kvraft_common::NodeId;
use kvraft_server::replica::{Replica, ReplicaConfig};

use crate::disk::Disk;

/// A replica's limits in the simulation: sessions never expire and are never evicted, so a
/// `SessionExpired` answer for a registered session is a bug.
pub const SESSION_TTL_MS: u64 = u64::MAX / 4;
pub const SESSIONS_MAX: usize = 1_000_000;

pub struct SimNode {
    pub id: u32,
    /// `None` while crashed.
    pub replica: Option<Replica>,
    pub disk: Disk,
    pub incarnation: u64,
    servers: Vec<NodeId>,
    heartbeat_ms: u64,
}

impl SimNode {
    pub fn new(id: u32, servers: Vec<NodeId>, heartbeat_ms: u64) -> SimNode {
        let mut node = SimNode {
            id,
            replica: None,
            disk: Disk::default(),
            incarnation: 0,
            servers,
            heartbeat_ms,
        };
        node.start();
        node
    }

    pub fn is_up(&self) -> bool {
        self.replica.is_some()
    }

    /// Starts a replica from what the disk holds (recovery).
    pub fn start(&mut self) {
        let cfg = ReplicaConfig {
            id: NodeId(self.id),
            servers: self.servers.clone(),
            uuid: format!("node{}-life{}", self.id, self.incarnation),
            session_ttl_ms: SESSION_TTL_MS,
            sessions_max: SESSIONS_MAX,
            heartbeat_ms: self.heartbeat_ms,
        };
        let (hard, entries) = self.disk.crash(0);
        self.replica = Some(Replica::new(cfg, hard, entries));
    }

    /// Crashes the process: the replica is gone, the disk keeps its durable part plus
    /// `extra_unsynced` entries of the unsynced tail.
    pub fn crash(&mut self, extra_unsynced: usize) {
        self.replica = None;
        self.incarnation += 1;
        let (hard, entries) = self.disk.crash(extra_unsynced);
        self.disk = Disk::recovered(hard, entries);
    }
}
