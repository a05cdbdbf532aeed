//! `bench`: load generator against a running cluster. Prints one line of figures (throughput,
//! latency percentiles, errors); asserts nothing about speed, since machines differ. With
//! `--secs` it soaks: runs for that long and prints, every `--report-every-secs` and at the end,
//! each server's resident memory, log size on disk and snapshot size (from `Admin.Status`), so
//! growth with history shows at a glance.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
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
    /// Soak: run for this many seconds instead of `--ops` operations.
    #[arg(long, value_name = "SECS")]
    secs: Option<u64>,
    /// While soaking, print throughput and every server's memory and disk use this often.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    report_every_secs: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// How much work each worker does: a share of `--ops`, or everything until a deadline.
#[derive(Clone, Copy)]
enum Budget {
    Ops(usize),
    Until(Instant),
}

/// Latencies in microseconds (1 µs to 10 min, 3 significant digits: bounded memory however
/// long the run) and failed operations by kind.
struct Samples {
    puts: Histogram<u64>,
    gets: Histogram<u64>,
    errors: BTreeMap<&'static str, u64>,
}

impl Samples {
    fn new() -> Samples {
        let histogram = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        Samples {
            puts: histogram(),
            gets: histogram(),
            errors: BTreeMap::new(),
        }
    }

    fn add(&mut self, other: &Samples) {
        self.puts.add(&other.puts).expect("same bounds");
        self.gets.add(&other.gets).expect("same bounds");
        for (kind, n) in &other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    fn record(histogram: &mut Histogram<u64>, took: Duration) {
        histogram.saturating_record(took.as_micros().clamp(1, 600_000_000) as u64);
    }

    fn failed(&mut self, error: &kvslib::Error) {
        let kind = match error {
            kvslib::Error::InvalidInput(_) => "invalid_input",
            kvslib::Error::Timeout { .. } => "timeout",
            kvslib::Error::SessionExpired => "session_expired",
            kvslib::Error::Rejected(_) => "rejected",
            kvslib::Error::Stale => "stale",
            kvslib::Error::Unavailable(_) => "unavailable",
        };
        *self.errors.entry(kind).or_default() += 1;
    }
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
    let done_ops = Arc::new(AtomicU64::new(0));
    let reporter = args.secs.map(|_| {
        let every = Duration::from_secs(args.report_every_secs.max(1));
        tokio::spawn(report_loop(
            config.clone(),
            done_ops.clone(),
            started,
            every,
        ))
    });
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|t| {
            let (client, value, done) = (client.clone(), value.clone(), done_ops.clone());
            let budget = match args.secs {
                Some(secs) => Budget::Until(started + Duration::from_secs(secs)),
                None => Budget::Ops(
                    args.ops / args.concurrency + usize::from(t < args.ops % args.concurrency),
                ),
            };
            let (keys, reads) = (args.keys, args.read_fraction);
            tokio::spawn(async move { worker(client, value, t, budget, keys, reads, done).await })
        })
        .collect();
    let mut all = Samples::new();
    for task in tasks {
        all.add(&task.await?);
    }
    let elapsed = started.elapsed();
    client.close().await;
    if let Some(reporter) = reporter {
        reporter.abort();
        let ops = done_ops.load(Ordering::Relaxed);
        println!("{}", soak_line(&config, ops, elapsed, None).await);
    }
    let done = all.puts.len() + all.gets.len();
    let errors: u64 = all.errors.values().sum();
    let throughput = done as f64 / elapsed.as_secs_f64();
    println!(
        "bench: ops {done}, errors {errors}, concurrency {}, value_bytes {}, elapsed {:.2} s, \
         throughput {throughput:.0} ops/s, put {}, get {}",
        args.concurrency,
        args.value_bytes,
        elapsed.as_secs_f64(),
        latency_text(&all.puts),
        latency_text(&all.gets),
    );
    if errors > 0 {
        println!("bench: errors by kind {:?}", all.errors);
    }
    if let Some(path) = &args.json {
        let result = serde_json::json!({
            "ops": done,
            "errors": all.errors,
            "concurrency": args.concurrency,
            "value_bytes": args.value_bytes,
            "keys": args.keys,
            "read_fraction": args.read_fraction,
            "elapsed_s": elapsed.as_secs_f64(),
            "throughput_ops_s": throughput,
            "put_ms": latency_json(&all.puts),
            "get_ms": latency_json(&all.gets),
        });
        std::fs::write(path, format!("{result:#}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    anyhow::ensure!(errors == 0, "{errors} operations failed");
    Ok(())
}

/// The percentiles reported, with their labels.
const PERCENTILES: [(&str, f64); 3] = [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)];

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn latency_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "p50 - p99 -".into();
    }
    let mut parts: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, q)| format!("{label} {:.2} ms", ms(h.value_at_percentile(*q))))
        .collect();
    parts.push(format!("max {:.2} ms", ms(h.max())));
    parts.join(" ")
}

fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let mut map = serde_json::Map::new();
    for (label, q) in PERCENTILES {
        map.insert(label.into(), ms(h.value_at_percentile(q)).into());
    }
    map.insert("max".into(), ms(h.max()).into());
    map.insert("count".into(), h.len().into());
    serde_json::Value::Object(map)
}

/// Every `every`, one line: elapsed time, operations so far, the interval's throughput and
/// each server's memory and disk use.
async fn report_loop(
    config: ClusterConfig,
    done: Arc<AtomicU64>,
    started: Instant,
    every: Duration,
) {
    let mut last = (0u64, started);
    loop {
        tokio::time::sleep(every).await;
        let ops = done.load(Ordering::Relaxed);
        let rate = (ops - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (ops, Instant::now());
        println!(
            "{}",
            soak_line(&config, ops, started.elapsed(), Some(rate)).await
        );
    }
}

async fn soak_line(
    config: &ClusterConfig,
    ops: u64,
    elapsed: Duration,
    rate: Option<f64>,
) -> String {
    let mut line = format!("soak: {:.0} s, ops {ops}", elapsed.as_secs_f64());
    if let Some(rate) = rate {
        line.push_str(&format!(", {rate:.0} ops/s"));
    }
    use kvraft::cluster_status::{mib, servers};
    for row in servers(config).await {
        line.push_str(&match row.status {
            Some(s) => format!(
                " | s{} rss {:.0} MB log {:.0} MB state {:.0} MB snapshot {:.0} MB",
                row.id,
                mib(s.rss_bytes),
                mib(s.log_bytes),
                mib(s.state_bytes),
                mib(s.snapshot_bytes)
            ),
            None => format!(" | s{} down", row.id),
        });
    }
    line
}

async fn worker(
    client: kvslib::Client,
    value: Arc<Vec<u8>>,
    task: usize,
    budget: Budget,
    keys: usize,
    read_fraction: f64,
    done: Arc<AtomicU64>,
) -> Samples {
    let mut s = Samples::new();
    // A cheap deterministic spread of reads among writes and of keys among tasks.
    let reads_per_1000 = (read_fraction.clamp(0.0, 1.0) * 1000.0) as usize;
    for i in 0.. {
        let more = match budget {
            Budget::Ops(n) => i < n,
            Budget::Until(deadline) => Instant::now() < deadline,
        };
        if !more {
            break;
        }
        done.fetch_add(1, Ordering::Relaxed);
        let key = format!("bench{}", (task * 7919 + i * 104_729) % keys);
        let t = Instant::now();
        if (i * 617 + task) % 1000 < reads_per_1000 {
            match client.get(key).await {
                Ok(_) => Samples::record(&mut s.gets, t.elapsed()),
                Err(e) => s.failed(&e),
            }
        } else {
            match client.put(key, value.as_slice()).await {
                Ok(_) => Samples::record(&mut s.puts, t.elapsed()),
                Err(e) => s.failed(&e),
            }
        }
    }
    s
}
