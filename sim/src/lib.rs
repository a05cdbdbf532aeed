//! Deterministic simulation of kvraft's replication logic: the real pure cores (`Replica` of
//! `kvraft-server`, `CoordCore` of `kvraft-coord`) wired together by a simulated network, disk
//! and clock, with faults, all driven by one seeded RNG. The same seed replays exactly.
//!
//! ```text
//!            seed ──▶ StdRng ──────────────────────────────┐ every random choice
//!                                                          ▼
//!   ┌──────────── World: BTreeMap<(time_ms, seq), Item> event queue ───────────────┐
//!   │  Client x 2..4 ──Request──▶ Network ──▶ SimNode x 3|5 (Replica + Disk)       │
//!   │      ▲                        ▲   │           │  ▲ AppendEntries / acks      │
//!   │      └────── replies / views ─┘   └── Coord (CoordCore): heartbeats, prepare │
//!   │  faults: drop, duplicate, reorder, partitions, crash + restart (node, coord) │
//!   └──────────────────────── Invariants after every step ─────────────────────────┘
//!                                         │
//!                   History (client view) ─▶ linearizability check at the end
//! ```
//!
//! Modules: [`world`] (event loop and wiring), [`network`], [`disk`], [`node`], [`client`],
//! [`invariants`], [`history`], [`config`]. Entry point: [`run_seed`]; the `sim` binary and
//! `tests/sim.rs` run many seeds.
//!
//! A run fails with the seed, the step and a description on the first violated invariant, on a
//! panic inside a core (its own assertions), or when the cluster does not serve a final put
//! after every fault has healed.

pub mod client;
pub mod config;
pub mod disk;
pub mod history;
pub mod invariants;
pub mod network;
pub mod node;
pub mod watcher;
pub mod world;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvraft_checker::CheckResult;

pub use config::SimConfig;
pub use world::World;

/// Faults injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// One node cut from everyone.
    pub isolations: u64,
    /// A node cut from the coord only.
    pub coord_partitions: u64,
    /// The servers split in two groups.
    pub splits: u64,
    /// One direction of one link cut.
    pub one_way: u64,
    pub crashes: u64,
    /// Crashes that lost the whole disk (the node restarts empty, with a new storage identity).
    pub disk_losses: u64,
    /// Crashes that kept part of the unsynced log tail.
    pub torn_tails: u64,
    pub coord_crashes: u64,
    /// Not a fault: leaderships taken (`RoleChanged { leader: true }`), to show churn.
    pub leaders_elected: u64,
    /// Not a fault: log compactions (`CompactLog`) and snapshots installed.
    pub compactions: u64,
    pub snapshots_installed: u64,
    /// A node's disk full for a while (appends fail with ENOSPC), and how often a log writer
    /// went from writable to full or back.
    pub disks_full: u64,
    pub disk_full_changes: u64,
}

impl FaultCounts {
    fn add(&mut self, o: &FaultCounts) {
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.isolations += o.isolations;
        self.coord_partitions += o.coord_partitions;
        self.splits += o.splits;
        self.one_way += o.one_way;
        self.crashes += o.crashes;
        self.disk_losses += o.disk_losses;
        self.torn_tails += o.torn_tails;
        self.coord_crashes += o.coord_crashes;
        self.leaders_elected += o.leaders_elected;
        self.compactions += o.compactions;
        self.snapshots_installed += o.snapshots_installed;
        self.disks_full += o.disks_full;
        self.disk_full_changes += o.disk_full_changes;
    }
}

/// Figures of one or more runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub seeds: u64,
    pub steps: u64,
    /// Simulated time, summed over seeds.
    pub sim_ms: u64,
    pub puts_ok: u64,
    pub gets_ok: u64,
    /// Transactions (compare-and-swaps, deletes, multi-key writes) and scans that succeeded.
    pub txns_ok: u64,
    pub scans_ok: u64,
    /// Scans at a past revision that matched the committed log then, and those refused as
    /// compacted.
    pub past_scans_ok: u64,
    pub past_scans_compacted: u64,
    /// Changes watchers were given (each checked against the replay), the watches they
    /// opened again after losing their server or being canceled, and those no server could
    /// resume (the revision was compacted everywhere).
    pub watch_events: u64,
    pub watch_resumes: u64,
    pub watch_gaps: u64,
    /// Operations given up on (result unknown to the client).
    pub ops_unknown: u64,
    pub committed_entries: u64,
    /// Acknowledged puts found in the committed log with the version they were answered with.
    pub acked_writes_checked: u64,
    /// Histories `kvraft-checker` found linearizable, and those it could not decide in its
    /// time budget (the simulator's own exact check covers every history either way).
    pub checker_linearizable: u64,
    pub checker_inconclusive: u64,
    pub faults: FaultCounts,
    pub violations: u64,
}

impl SimStats {
    pub fn add(&mut self, o: &SimStats) {
        self.seeds += o.seeds;
        self.steps += o.steps;
        self.sim_ms += o.sim_ms;
        self.puts_ok += o.puts_ok;
        self.gets_ok += o.gets_ok;
        self.txns_ok += o.txns_ok;
        self.scans_ok += o.scans_ok;
        self.past_scans_ok += o.past_scans_ok;
        self.past_scans_compacted += o.past_scans_compacted;
        self.watch_events += o.watch_events;
        self.watch_resumes += o.watch_resumes;
        self.watch_gaps += o.watch_gaps;
        self.ops_unknown += o.ops_unknown;
        self.committed_entries += o.committed_entries;
        self.acked_writes_checked += o.acked_writes_checked;
        self.checker_linearizable += o.checker_linearizable;
        self.checker_inconclusive += o.checker_inconclusive;
        self.faults.add(&o.faults);
        self.violations += o.violations;
    }
}

impl fmt::Display for SimStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = &self.faults;
        write!(
            f,
            "seeds={} steps={} sim_s={} ops: puts_ok={} gets_ok={} txns_ok={} scans_ok={} \
             past_scans_ok={} past_scans_compacted={} watch_events={} watch_resumes={} \
             watch_gaps={} unknown={} committed={} \
             faults: dropped={} duplicated={} reordered={} isolations={} coord_partitions={} \
             splits={} one_way={} crashes={} disk_losses={} torn_tails={} coord_crashes={} \
             disks_full={} (full/writable changes {}) \
             (leaderships={} compactions={} snapshots_installed={}) \
             acked_writes_checked={} linearizable={} inconclusive={} violations={}",
            self.seeds,
            self.steps,
            self.sim_ms / 1000,
            self.puts_ok,
            self.gets_ok,
            self.txns_ok,
            self.scans_ok,
            self.past_scans_ok,
            self.past_scans_compacted,
            self.watch_events,
            self.watch_resumes,
            self.watch_gaps,
            self.ops_unknown,
            self.committed_entries,
            x.dropped,
            x.duplicated,
            x.reordered,
            x.isolations,
            x.coord_partitions,
            x.splits,
            x.one_way,
            x.crashes,
            x.disk_losses,
            x.torn_tails,
            x.coord_crashes,
            x.disks_full,
            x.disk_full_changes,
            x.leaders_elected,
            x.compactions,
            x.snapshots_installed,
            self.acked_writes_checked,
            self.checker_linearizable,
            self.checker_inconclusive,
            self.violations
        )
    }
}

/// A failed run: enough to reproduce and understand it.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub now_ms: u64,
    pub description: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {} ({} ms): {}\n  replay: cargo run --release -p kvraft-sim \
             -- --seed {} -v",
            self.seed, self.step, self.now_ms, self.description, self.seed
        )
    }
}

impl std::error::Error for SimFailure {}

/// Runs one seed to the end. Deterministic: the same seed and config give the same run.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<SimStats, SimFailure> {
    let fail = |step, now_ms, description| SimFailure {
        seed,
        step,
        now_ms,
        description,
    };
    cfg.validate()
        .map_err(|e| fail(0, 0, format!("bad config: {e}")))?;
    let mut world = match catch_unwind(AssertUnwindSafe(|| World::new(seed, cfg))) {
        Ok(Ok(world)) => world,
        Ok(Err(e)) => return Err(fail(0, 0, e)),
        Err(panic) => return Err(fail(0, 0, panic_message(&panic))),
    };
    let result = catch_unwind(AssertUnwindSafe(|| world.run()));
    let (step, now_ms) = (world.step, world.now_ms());
    let describe = |what: String| {
        format!(
            "{what} [{} servers, {} clients]",
            world.servers(),
            world.clients()
        )
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(fail(step, now_ms, describe(e))),
        Err(panic) => {
            let what = format!("panic: {}", panic_message(&panic));
            return Err(fail(step, now_ms, describe(what)));
        }
    }
    let acked = world
        .history
        .check(&world.inv.applied)
        .map_err(|e| fail(step, now_ms, describe(e)))?;
    let mut stats = world.stats(acked);
    let (past_ok, past_compacted) = world
        .inv
        .check_past_reads(&world.history.past_reads)
        .map_err(|e| fail(step, now_ms, describe(e)))?;
    stats.past_scans_ok = past_ok;
    stats.past_scans_compacted = past_compacted;
    stats.watch_events = world
        .inv
        .check_watches(&world.watchers)
        .map_err(|e| fail(step, now_ms, describe(e)))?;
    for w in &world.watchers {
        stats.watch_resumes += w.opened.saturating_sub(1);
        stats.watch_gaps += w.segments.len().saturating_sub(1) as u64;
    }
    match kvraft_checker::check(&world.history.to_checker()) {
        CheckResult::Linearizable => stats.checker_linearizable += 1,
        CheckResult::Violation(v) => {
            let what = format!("kvraft-checker: not linearizable: {v}");
            return Err(fail(step, now_ms, describe(what)));
        }
        // A time budget ran out: depends on the machine, so it is counted, not failed.
        CheckResult::Inconclusive { .. } => stats.checker_inconclusive += 1,
    }
    Ok(stats)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `count` seeds from `start`; stops at the first failure.
pub fn run_seeds(start: u64, count: u64, cfg: &SimConfig) -> Result<SimStats, SimFailure> {
    let mut total = SimStats::default();
    for seed in start..start + count {
        total.add(&run_seed(seed, cfg)?);
    }
    Ok(total)
}
