//! `bench`: load generator against a running cluster. Prints one line of figures (throughput,
//! latency percentiles, errors); asserts nothing about speed, since machines differ.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kvraft::launch;
use kvraft_common::ClusterConfig;

/// Drives a running kvraft cluster with concurrent puts and gets through kvslib and prints
/// throughput and latency figures.
#[derive(Parser, Debug)]
#[command(name = "bench", version, about)]
struct Args {
    /// Cluster config file.
    #[arg(long, value_name = "FILE", default_value = "config/cluster.toml")]
    config: PathBuf,
    /// Total operations.
    #[arg(long, default_value_t = 20_000)]
    ops: usize,
    /// Concurrent callers sharing one client (pipelined requests).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Size of each value in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Fraction of operations that are gets (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    read_fraction: f64,
    /// Distinct keys written and read.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
}

#[derive(Default)]
struct Samples {
    puts: Vec<Duration>,
    gets: Vec<Duration>,
    errors: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let telemetry = launch::init_logging("bench", "warn");
    let args = Args::parse();
    let result = run(args).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {}", launch::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency > 0 && args.keys > 0,
        "--concurrency and --keys must be above 0"
    );
    let config = ClusterConfig::load(&args.config)?;
    let client = kvslib::Client::connect(&config, "bench").await?;
    let value = Arc::new(vec![b'x'; args.value_bytes]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|t| {
            let (client, value) = (client.clone(), value.clone());
            let share = args.ops / args.concurrency + usize::from(t < args.ops % args.concurrency);
            let (keys, reads) = (args.keys, args.read_fraction);
            tokio::spawn(async move { worker(client, value, t, share, keys, reads).await })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        let s = task.await?;
        all.puts.extend(s.puts);
        all.gets.extend(s.gets);
        all.errors += s.errors;
    }
    let elapsed = started.elapsed();
    client.close().await;
    let done = all.puts.len() + all.gets.len();
    println!(
        "bench: ops {done}, errors {}, concurrency {}, value_bytes {}, elapsed {:.2} s, \
         throughput {:.0} ops/s, put p50 {} p99 {}, get p50 {} p99 {}",
        all.errors,
        args.concurrency,
        args.value_bytes,
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        percentile(&mut all.puts, 0.50),
        percentile(&mut all.puts, 0.99),
        percentile(&mut all.gets, 0.50),
        percentile(&mut all.gets, 0.99),
    );
    anyhow::ensure!(all.errors == 0, "{} operations failed", all.errors);
    Ok(())
}

async fn worker(
    client: kvslib::Client,
    value: Arc<Vec<u8>>,
    task: usize,
    ops: usize,
    keys: usize,
    read_fraction: f64,
) -> Samples {
    let mut s = Samples::default();
    // A cheap deterministic spread of reads among writes and of keys among tasks.
    let reads_per_1000 = (read_fraction.clamp(0.0, 1.0) * 1000.0) as usize;
    for i in 0..ops {
        let key = format!("bench{}", (task * 7919 + i * 104_729) % keys);
        let t = Instant::now();
        if (i * 617 + task) % 1000 < reads_per_1000 {
            match client.get(key).await {
                Ok(_) => s.gets.push(t.elapsed()),
                Err(_) => s.errors += 1,
            }
        } else {
            match client.put(key, value.as_slice()).await {
                Ok(_) => s.puts.push(t.elapsed()),
                Err(_) => s.errors += 1,
            }
        }
    }
    s
}

fn percentile(samples: &mut [Duration], p: f64) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * p).round() as usize;
    format!("{:.2} ms", samples[i].as_secs_f64() * 1000.0)
}
