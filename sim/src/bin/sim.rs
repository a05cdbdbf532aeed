//! `sim`: runs seeds of the deterministic simulation and prints one line of figures.
//!
//! ```text
//! cargo run --release -p kvraft-sim -- --seeds 1000 --start 0   # many seeds
//! cargo run --release -p kvraft-sim -- --seed 42 -v             # replay one, with a trace
//! ```
//!
//! Options that change the config (`--fault-every-ms`, `--slots`, ...) change what a seed
//! does: replay a failure with the same options it was found with.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kvraft_sim::{run_seed, SimConfig, SimStats};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of kvraft's replica and coord cores under faults")]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run only this seed (overrides --seeds/--start).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every simulated event.
    #[arg(short, long)]
    verbose: bool,
    /// Keep running after a failing seed (counts violations instead of stopping).
    #[arg(long)]
    keep_going: bool,
    /// Servers (3 or 5); default: chosen per seed.
    #[arg(long)]
    servers: Option<usize>,
    /// Run without injected faults.
    #[arg(long)]
    no_faults: bool,
    /// Mean time between injected faults (ms).
    #[arg(long)]
    fault_every_ms: Option<u64>,
    /// Length of the fault phase (ms).
    #[arg(long)]
    fault_ms: Option<u64>,
    /// Most operations in flight per client.
    #[arg(long)]
    slots: Option<usize>,
    /// Per-mille probabilities of message drop, duplication and reordering.
    #[arg(long)]
    drop_permille: Option<u32>,
    #[arg(long)]
    dup_permille: Option<u32>,
    #[arg(long)]
    reorder_permille: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let d = SimConfig::default();
    let cfg = SimConfig {
        verbose: args.verbose,
        servers: args.servers,
        faults: !args.no_faults,
        fault_every_ms: args.fault_every_ms.unwrap_or(d.fault_every_ms),
        fault_ms: args.fault_ms.unwrap_or(d.fault_ms),
        client_slots_max: args.slots.unwrap_or(d.client_slots_max),
        drop_permille: args.drop_permille.unwrap_or(d.drop_permille),
        dup_permille: args.dup_permille.unwrap_or(d.dup_permille),
        reorder_permille: args.reorder_permille.unwrap_or(d.reorder_permille),
        ..d
    };
    if let Err(e) = cfg.validate() {
        eprintln!("invalid options: {e}");
        return ExitCode::FAILURE;
    }
    let (start, count) = match args.seed {
        Some(s) => (s, 1),
        None => (args.start, args.seeds),
    };
    let began = Instant::now();
    let mut total = SimStats::default();
    let mut failed = false;
    for seed in start..start + count {
        match run_seed(seed, &cfg) {
            Ok(stats) => total.add(&stats),
            Err(failure) => {
                eprintln!("{failure}");
                failed = true;
                total.violations += 1;
                total.seeds += 1;
                if !args.keep_going {
                    break;
                }
            }
        }
    }
    println!("{total} wall_ms={}", began.elapsed().as_millis());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
