//! Many seeds of the deterministic simulation (`KVRAFT_SIM_SEEDS` overrides the count; the
//! start seed is `KVRAFT_SIM_START`, default 0). Seeds are split over two threads; a failing
//! seed is printed with the command that replays it.

use std::time::Instant;

use kvraft_sim::{run_seed, SimConfig, SimStats};

/// Seeds run by default, sized to finish in well under two minutes on a 2-core machine: an
/// unoptimized build runs about ten times slower than an optimized one.
const DEFAULT_SEEDS: u64 = if cfg!(debug_assertions) { 400 } else { 4000 };
const THREADS: u64 = 2;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn many_seeds_hold_every_invariant() {
    let count = env_u64("KVRAFT_SIM_SEEDS", DEFAULT_SEEDS);
    let start = env_u64("KVRAFT_SIM_START", 0);
    let cfg = SimConfig::default();
    let began = Instant::now();
    let results: Vec<Result<SimStats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let mut total = SimStats::default();
                    let mut seed = start + t;
                    while seed < start + count {
                        total.add(&run_seed(seed, &cfg).map_err(|f| f.to_string())?);
                        seed += THREADS;
                    }
                    Ok(total)
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
    println!("{total} wall_ms={}", began.elapsed().as_millis());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(total.seeds, count);
    assert!(
        total.acked_writes_checked > 0,
        "the clients got writes through"
    );
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
