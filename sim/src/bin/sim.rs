//! `sim`: runs seeds of the deterministic simulation and prints one line of figures.
//!
//! ```text
//! cargo run --release -p kvraft-sim -- --seeds 1000 --start 0   # many seeds
//! cargo run --release -p kvraft-sim -- --seed 42 -v             # replay one, with a trace
//! ```

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = SimConfig {
        verbose: args.verbose,
        servers: args.servers,
        faults: !args.no_faults,
        ..SimConfig::default()
    };
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
