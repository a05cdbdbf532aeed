//! [`SimConfig`]: the knobs of one simulated run. Every random choice a run makes comes from
//! the seed; the config only bounds the ranges and probabilities it draws from, so a seed
//! replays exactly only under the same config (the test and the binary both use the default).
//!
//! Times are simulated milliseconds; probabilities are per mille (‰) so the config stays in
//! integers.

/// Knobs of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Servers in the cluster; `None` picks 3 or 5 from the seed.
    pub servers: Option<usize>,
    /// Simulated clients; `None` picks 2..=4 from the seed.
    pub clients: Option<usize>,
    /// Most operations one client runs at once (its put seqs in flight), at least 1.
    pub client_slots_max: usize,
    /// Largest session window a run draws (2..=this): small, so clients fill it while an
    /// older put of theirs is stuck, and must wait as kvslib does.
    pub session_window_max: u64,
    /// Length of the phase with faults.
    pub fault_ms: u64,
    /// After the fault phase everything heals; the cluster then runs this long without faults
    /// before the final put, which must succeed (liveness after healing).
    pub quiet_ms: u64,
    /// Inject faults at all (off: a plain run, for sanity and for measuring).
    pub faults: bool,
    /// Mean time between two injected faults (partition, crash, coord crash).
    pub fault_every_ms: u64,
    /// A message is dropped with this probability (‰).
    pub drop_permille: u32,
    /// A message is delivered twice with this probability (‰).
    pub dup_permille: u32,
    /// A message is held back long enough to overtake later ones with this probability (‰).
    pub reorder_permille: u32,
    /// A crashed node keeps a random prefix of its written-but-unsynced log tail (what the
    /// page cache happened to flush) with this probability (‰); otherwise it loses all of it.
    pub torn_tail_permille: u32,
    /// Timer period of every replica and of the coord.
    pub tick_ms: u64,
    /// Coord heartbeat period.
    pub coord_heartbeat_ms: u64,
    /// Coord failure timeout.
    pub coord_failure_timeout_ms: u64,
    /// Leader's AppendEntries heartbeat period.
    pub replication_heartbeat_ms: u64,
    /// Deadline of one client operation, retries included (then its result is unknown).
    pub op_timeout_ms: u64,
    /// Deadline of one attempt against one server.
    pub attempt_timeout_ms: u64,
    /// Keys the clients use: few, so operations collide.
    pub keys: usize,
    /// Print every event (the `-v` trace of the binary).
    pub verbose: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            servers: None,
            clients: None,
            client_slots_max: 4,
            session_window_max: 6,
            fault_ms: 3_000,
            quiet_ms: 1_500,
            faults: true,
            fault_every_ms: 250,
            drop_permille: 20,
            dup_permille: 10,
            reorder_permille: 30,
            torn_tail_permille: 500,
            tick_ms: 10,
            coord_heartbeat_ms: 50,
            coord_failure_timeout_ms: 300,
            replication_heartbeat_ms: 50,
            op_timeout_ms: 1_500,
            attempt_timeout_ms: 200,
            keys: 3,
            verbose: false,
        }
    }
}

impl SimConfig {
    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = self.servers {
            if n == 0 || n > kvraft_common::config::SERVERS_MAX {
                return Err(format!("servers = {n}: must be 1..=9"));
            }
        }
        let window_max = kvraft_common::limits::SESSION_WINDOW_MAX;
        if !(2..=window_max).contains(&self.session_window_max) {
            return Err(format!("session_window_max must be 2..={window_max}"));
        }
        if self.clients == Some(0) || self.client_slots_max == 0 || self.keys == 0 {
            return Err("clients, client_slots_max and keys must be above 0".into());
        }
        if self.tick_ms == 0 || self.coord_heartbeat_ms == 0 || self.replication_heartbeat_ms == 0 {
            return Err("tick_ms and the heartbeat periods must be above 0".into());
        }
        if self.coord_failure_timeout_ms <= self.coord_heartbeat_ms {
            return Err("coord_failure_timeout_ms must be above coord_heartbeat_ms".into());
        }
        if self.attempt_timeout_ms == 0 || self.op_timeout_ms < self.attempt_timeout_ms {
            return Err("op_timeout_ms must be at least attempt_timeout_ms > 0".into());
        }
        let permille = [
            self.drop_permille,
            self.dup_permille,
            self.reorder_permille,
            self.torn_tail_permille,
        ];
        if permille.iter().any(|&p| p > 1000) {
            return Err("probabilities are per mille: at most 1000".into());
        }
        Ok(())
    }
}
