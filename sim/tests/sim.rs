//! Many seeds of the deterministic simulation, split over two threads. A failing seed is
//! printed with the command that replays it.
//!
//! `KVRAFT_SIM_SEEDS=n` runs exactly seeds `start..start+n` (`KVRAFT_SIM_START`, default 0).
//! Without it the test runs up to [`DEFAULT_SEEDS`] seeds in order but stops starting new ones
//! after [`BUDGET_S`] seconds (at least [`MIN_SEEDS`] always run): an unoptimized build is
//! about ten times slower than an optimized one, and CI time stays bounded either way. The
//! seeds run are always a prefix `start..start+k`, printed in the figures line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvraft_sim::{run_seed, SimConfig, SimStats};

/// Seeds run by default when the budget allows.
const DEFAULT_SEEDS: u64 = 5000;
/// Seeds run by default even on a slow machine.
const MIN_SEEDS: u64 = 200;
/// Wall-clock budget for starting new seeds by default.
const BUDGET_S: u64 = 75;
const THREADS: u64 = 2;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn many_seeds_hold_every_invariant() {
    let exact = env_u64("KVRAFT_SIM_SEEDS");
    let count = exact.unwrap_or(DEFAULT_SEEDS);
    let start = env_u64("KVRAFT_SIM_START").unwrap_or(0);
    let budget = exact.map_or(Duration::from_secs(BUDGET_S), |_| Duration::MAX);
    let cfg = SimConfig::default();
    let began = Instant::now();
    let next = AtomicU64::new(start);
    let results: Vec<Result<SimStats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (cfg, next) = (&cfg, &next);
                s.spawn(move || {
                    let mut total = SimStats::default();
                    loop {
                        let seed = next.fetch_add(1, Ordering::SeqCst);
                        let past_min = seed >= start + MIN_SEEDS;
                        if seed >= start + count || (past_min && began.elapsed() > budget) {
                            return Ok(total);
                        }
                        total.add(&run_seed(seed, cfg).map_err(|f| f.to_string())?);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    let mut total = SimStats::default();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(stats) => total.add(&stats),
            Err(e) => failures.push(e),
        }
    }
    println!(
        "seeds {start}..{}: {total} wall_ms={}",
        start + total.seeds,
        began.elapsed().as_millis()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total.seeds >= MIN_SEEDS.min(count));
    if exact.is_some() {
        assert_eq!(total.seeds, count);
    }
    assert!(
        total.acked_writes_checked > 0,
        "the clients got writes through"
    );
    assert_eq!(total.violations, 0);
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = SimConfig::default();
    let a = run_seed(7, &cfg).expect("seed 7 passes");
    let b = run_seed(7, &cfg).expect("seed 7 passes");
    assert_eq!(a, b);
}

#[test]
fn without_faults_every_operation_succeeds() {
    let cfg = SimConfig {
        faults: false,
        ..SimConfig::default()
    };
    for seed in 0..5 {
        let stats = run_seed(seed, &cfg).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(stats.ops_unknown, 0, "seed {seed}: {stats}");
        assert!(stats.puts_ok > 10, "seed {seed}: {stats}");
    }
}
