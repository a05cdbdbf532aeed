//! `bench`: load generator against a running cluster. Prints one line of figures (throughput,
//! latency percentiles, errors); asserts nothing about speed, since machines differ. With
//! `--secs` it soaks: runs for that long and prints, every `--report-every-secs` and at the end,
//! each server's resident memory, log size on disk and snapshot size (from `Admin.Status`), so
//! growth with history shows at a glance. `--warmup-secs` runs the load unmeasured first;
//! `--connections` spreads the callers over several clients (each its own gRPC channel and
//! session). A progress bar is drawn on stderr when it is a terminal. `--etcd ENDPOINTS` runs
//! the same workload against an etcd cluster instead (etcd's v3 gRPC KV API: puts, and
//! linearizable ranges for gets), for `bench/compare-etcd.sh`.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
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
    /// Concurrent callers in all, spread over the connections (pipelined requests).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Clients (each its own gRPC channel and session) the callers are spread over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Run the load this long before measuring; nothing done meanwhile counts in the figures
    /// (nor against `--ops`).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    warmup_secs: u64,
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
    /// Failover mode: start the config's cluster (coord and servers, run by the `demo` binary
    /// beside this one, on the config's data directories), then TRIALS times run a sequential
    /// writer, SIGKILL the leader's process, and report the longest gap between acknowledged
    /// writes and the time from the kill to the first write acknowledged after it.
    #[arg(long, value_name = "TRIALS")]
    failover: Option<usize>,
    /// With --failover: stop the leader with SIGSTOP (a hung process: its connections stay
    /// open, so only the coord's failure timeout finds it) instead of killing it, and let it
    /// go on (SIGCONT) once writes resumed.
    #[arg(long, requires = "failover")]
    hang: bool,
    /// Drive an etcd cluster at these client endpoints (`host:port`, comma-separated; the
    /// connections are spread over them) instead of kvraft: same workload, keys and values.
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Open this many watches (one key each, keys the load never writes) on the leader before
    /// the load, and keep them open while it runs: what idle watchers cost the write path.
    #[arg(long, value_name = "N", default_value_t = 0)]
    watchers: usize,
    /// Where the failover mode's processes write their logs.
    #[arg(long, value_name = "DIR", default_value = "data/bench-logs")]
    log_dir: PathBuf,
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

    fn failed(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

fn kvslib_error_kind(error: &kvslib::Error) -> &'static str {
    match error {
        kvslib::Error::InvalidInput(_) => "invalid_input",
        kvslib::Error::Timeout { .. } => "timeout",
        kvslib::Error::SessionExpired => "session_expired",
        kvslib::Error::Rejected(_) => "rejected",
        kvslib::Error::Stale => "stale",
        kvslib::Error::Unavailable(_) => "unavailable",
    }
}

/// What the workers drive: a kvraft cluster through kvslib, or etcd through its KV API.
#[derive(Clone)]
enum Store {
    Kvraft(kvslib::Client),
    Etcd(kvraft_proto::etcd::kv_client::KvClient<tonic::transport::Channel>),
}

impl Store {
    async fn put(&self, key: String, value: &[u8]) -> Result<(), &'static str> {
        match self {
            Store::Kvraft(c) => c
                .put(key, value)
                .await
                .map(drop)
                .map_err(|e| kvslib_error_kind(&e)),
            Store::Etcd(c) => {
                let req = kvraft_proto::etcd::PutRequest {
                    key: key.into_bytes(),
                    value: value.to_vec(),
                    ..Default::default()
                };
                c.clone().put(req).await.map(drop).map_err(|_| "etcd")
            }
        }
    }

    async fn get(&self, key: String) -> Result<(), &'static str> {
        match self {
            Store::Kvraft(c) => c
                .get(key)
                .await
                .map(drop)
                .map_err(|e| kvslib_error_kind(&e)),
            Store::Etcd(c) => {
                // serializable = false: a linearizable read, as kvraft's.
                let req = kvraft_proto::etcd::RangeRequest {
                    key: key.into_bytes(),
                    ..Default::default()
                };
                c.clone().range(req).await.map(drop).map_err(|_| "etcd")
            }
        }
    }

    async fn close(self) {
        if let Store::Kvraft(c) = self {
            c.close().await;
        }
    }
}

/// Opens `n` watches of one unwritten key each, on one client without a session; each is
/// read by a task of its own until aborted.
async fn open_watchers(
    config: &ClusterConfig,
    n: usize,
) -> anyhow::Result<(kvslib::Client, Vec<tokio::task::JoinHandle<()>>)> {
    let client = kvslib::Client::connect_without_session(config, "bench-watchers").await?;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("bench-watch/{i}").into_bytes();
        let mut end = key.clone();
        end.push(0);
        let mut watch = client.watch(key, end, 0)?;
        watch
            .start()
            .await
            .with_context(|| format!("cannot open watch {i} of {n}"))?;
        tasks.push(tokio::spawn(async move {
            // Nothing writes the key: this waits until aborted, unless the watch fails.
            let _ = watch.next().await;
        }));
    }
    Ok((client, tasks))
}

/// The stores the connections use: kvslib clients of the config's cluster, or one gRPC channel
/// per connection to the etcd endpoints in turn.
async fn connect(args: &Args, config: Option<&ClusterConfig>) -> anyhow::Result<Vec<Store>> {
    let mut stores = Vec::with_capacity(args.connections);
    for c in 0..args.connections {
        if let Some(config) = config {
            let client = kvslib::Client::connect(config, &format!("bench-{c}")).await?;
            stores.push(Store::Kvraft(client));
            continue;
        }
        let endpoint = &args.etcd[c % args.etcd.len()];
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
            .with_context(|| format!("--etcd: bad endpoint {endpoint}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
        stores.push(Store::Etcd(kvraft_proto::etcd::kv_client::KvClient::new(
            channel,
        )));
    }
    Ok(stores)
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
    if let Some(trials) = args.failover {
        return failover(&args, trials).await;
    }
    anyhow::ensure!(
        args.concurrency > 0 && args.keys > 0 && args.connections > 0,
        "--concurrency, --connections and --keys must be above 0"
    );
    // No kvraft config against etcd: there is no cluster of ours to ask for its status.
    let config = match args.etcd.is_empty() {
        true => Some(ClusterConfig::load(&args.config)?),
        false => None,
    };
    let clients = connect(&args, config.as_ref()).await?;
    let watchers = match (&config, args.watchers) {
        (Some(config), n) if n > 0 => Some(open_watchers(config, n).await?),
        (None, n) if n > 0 => anyhow::bail!("--watchers needs a kvraft cluster"),
        _ => None,
    };
    let value = Arc::new(vec![b'x'; args.value_bytes]);
    let warmup_end = Instant::now() + Duration::from_secs(args.warmup_secs);
    let started = warmup_end;
    let done_ops = Arc::new(AtomicU64::new(0));
    let reporter = args.secs.zip(config.clone()).map(|(_, config)| {
        let every = Duration::from_secs(args.report_every_secs.max(1));
        tokio::spawn(report_loop(
            config.clone(),
            done_ops.clone(),
            started,
            every,
        ))
    });
    let progress = progress_bar(&args);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|t| {
            let client = clients[t % clients.len()].clone();
            let (value, done) = (value.clone(), done_ops.clone());
            let budget = match args.secs {
                Some(secs) => Budget::Until(started + Duration::from_secs(secs)),
                None => Budget::Ops(
                    args.ops / args.concurrency + usize::from(t < args.ops % args.concurrency),
                ),
            };
            let load = Load {
                task: t,
                keys: args.keys,
                read_fraction: args.read_fraction,
                warmup_end,
            };
            tokio::spawn(async move { worker(client, value, load, budget, done).await })
        })
        .collect();
    let ticker = progress.clone().map(|bar| {
        let done = done_ops.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(done.load(Ordering::Relaxed));
            }
        })
    });
    let mut all = Samples::new();
    for task in tasks {
        all.add(&task.await?);
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed();
    for client in clients {
        client.close().await;
    }
    if let Some((client, tasks)) = watchers {
        for task in &tasks {
            anyhow::ensure!(!task.is_finished(), "a watcher ended during the run");
            task.abort();
        }
        client.close().await;
    }
    let system = if args.etcd.is_empty() {
        "kvraft"
    } else {
        "etcd"
    };
    if let (Some(reporter), Some(config)) = (reporter, &config) {
        reporter.abort();
        let ops = done_ops.load(Ordering::Relaxed);
        println!("{}", soak_line(config, ops, elapsed, None).await);
    }
    let done = all.puts.len() + all.gets.len();
    let errors: u64 = all.errors.values().sum();
    let throughput = done as f64 / elapsed.as_secs_f64();
    println!(
        "bench: ops {done}, errors {errors}, system {system}, concurrency {}, connections {}, \
         value_bytes {}, elapsed {:.2} s, throughput {throughput:.0} ops/s, put {}, get {}",
        args.concurrency,
        args.connections,
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
            "system": system,
            "ops": done,
            "errors": all.errors,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "warmup_s": args.warmup_secs,
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
                " | s{} rss {:.0} MB log {:.0} MB ({} held, base {}) state {:.0} MB snapshot {:.0} MB",
                row.id,
                mib(s.rss_bytes),
                mib(s.log_bytes),
                s.log_entries_held,
                s.log_base_index,
                mib(s.state_bytes),
                mib(s.snapshot_bytes)
            ),
            None => format!(" | s{} down", row.id),
        });
    }
    line
}

/// What one worker does, apart from its budget.
struct Load {
    task: usize,
    keys: usize,
    read_fraction: f64,
    /// Operations started before this are the warm-up: not recorded, not counted.
    warmup_end: Instant,
}

async fn worker(
    client: Store,
    value: Arc<Vec<u8>>,
    load: Load,
    budget: Budget,
    done: Arc<AtomicU64>,
) -> Samples {
    let mut s = Samples::new();
    // A cheap deterministic spread of reads among writes and of keys among tasks.
    let reads_per_1000 = (load.read_fraction.clamp(0.0, 1.0) * 1000.0) as usize;
    let task = load.task;
    let mut measured = 0usize;
    for i in 0.. {
        let warming = Instant::now() < load.warmup_end;
        let more = warming
            || match budget {
                Budget::Ops(n) => measured < n,
                Budget::Until(deadline) => Instant::now() < deadline,
            };
        if !more {
            break;
        }
        let key = format!("bench{}", (task * 7919 + i * 104_729) % load.keys);
        let t = Instant::now();
        let is_get = (i * 617 + task) % 1000 < reads_per_1000;
        let result = if is_get {
            client.get(key).await
        } else {
            client.put(key, value.as_slice()).await
        };
        if warming {
            continue;
        }
        match result {
            Ok(()) if is_get => Samples::record(&mut s.gets, t.elapsed()),
            Ok(()) => Samples::record(&mut s.puts, t.elapsed()),
            Err(kind) => s.failed(kind),
        }
        measured += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    s
}

/// A progress bar on stderr (operations, or seconds when soaking), only when stderr is a
/// terminal: piped or captured output stays plain lines.
fn progress_bar(args: &Args) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || args.secs.is_some() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(args.ops as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} ops ({per_sec}, eta {eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    Some(bar)
}

/// Deadline of each wait of the failover mode (a leader, writes resuming, a catch-up).
const FAILOVER_WAIT: Duration = Duration::from_secs(30);
/// Acknowledged writes before the kill, and after the first one that follows it.
const FAILOVER_WRITES_AROUND: usize = 200;

/// One failover trial's figures (ms).
struct Trial {
    /// The leader killed (or hung).
    killed: u32,
    longest_gap_ms: f64,
    kill_to_first_ack_ms: f64,
}

async fn failover(args: &Args, trials: usize) -> anyhow::Result<()> {
    anyhow::ensure!(trials > 0, "--failover needs at least 1 trial");
    let config = ClusterConfig::load(&args.config)?;
    let exe = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name("demo");
    anyhow::ensure!(
        exe.exists(),
        "bench --failover runs the cluster with the demo binary beside it, and {} does not \
         exist (build it: cargo build --release --bins)",
        exe.display()
    );
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("cannot create {}", args.log_dir.display()))?;
    let mut procs = kvraft::procs::Procs::new(exe, args.config.clone(), args.log_dir.clone());
    procs.start_cluster(&config)?;
    let client = kvslib::Client::connect(&config, "bench-failover").await?;
    let mut results = Vec::new();
    for trial in 1..=trials {
        let result = one_failover(&config, &client, &mut procs, args.hang).await;
        let t = result.with_context(|| format!("failover trial {trial}"))?;
        println!(
            "failover trial {trial}: {} server {}, longest gap {:.1} ms, kill to first ack \
             {:.1} ms",
            if args.hang { "hung" } else { "killed" },
            t.killed,
            t.longest_gap_ms,
            t.kill_to_first_ack_ms
        );
        results.push(t);
    }
    client.close().await;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let gaps: Vec<f64> = results.iter().map(|t| t.longest_gap_ms).collect();
    let firsts: Vec<f64> = results.iter().map(|t| t.kill_to_first_ack_ms).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "failover: trials {trials}, longest gap median {:.1} ms max {:.1} ms, kill to first ack \
         median {:.1} ms max {:.1} ms",
        median(gaps.clone()),
        max(&gaps),
        median(firsts.clone()),
        max(&firsts)
    );
    if let Some(path) = &args.json {
        let result = serde_json::json!({
            "trials": trials,
            "fault": if args.hang { "sigstop" } else { "sigkill" },
            "longest_gap_ms": gaps,
            "kill_to_first_ack_ms": firsts,
            "killed": results.iter().map(|t| t.killed).collect::<Vec<_>>(),
        });
        std::fs::write(path, format!("{result:#}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    drop(procs); // kills the cluster it started, by the children's handles
    Ok(())
}

/// One trial: writes until [`FAILOVER_WRITES_AROUND`] are acknowledged, kills the leader
/// (with `hang`, stops it), writes until as many more are acknowledged after that, restarts
/// (continues) the server and waits for it to catch up.
async fn one_failover(
    config: &ClusterConfig,
    client: &kvslib::Client,
    procs: &mut kvraft::procs::Procs,
    hang: bool,
) -> anyhow::Result<Trial> {
    let leader = procs
        .wait_for_leader(config, FAILOVER_WAIT)
        .await?
        .leader_id;
    let deadline = Instant::now() + FAILOVER_WAIT;
    let mut acks: Vec<Instant> = Vec::new();
    let mut killed_at = None;
    let mut i = 0u64;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "writes did not resume within {FAILOVER_WAIT:?}"
        );
        let key = format!("failover{}", i % 1000);
        i += 1;
        if client.put(key, b"v".as_slice()).await.is_ok() {
            acks.push(Instant::now());
        }
        match killed_at {
            None if acks.len() >= FAILOVER_WRITES_AROUND => {
                if hang {
                    procs.signal_server(leader, "STOP")?;
                } else {
                    procs.kill_server(leader);
                }
                killed_at = Some((Instant::now(), acks.len()));
            }
            Some((_, before)) if acks.len() >= before + FAILOVER_WRITES_AROUND => break,
            _ => {}
        }
    }
    let (kill, before) = killed_at.expect("set before the loop ends");
    let longest_gap = acks
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let first_after = acks[before] - kill;
    if hang {
        procs.signal_server(leader, "CONT")?;
    } else {
        procs.start_server(leader)?;
    }
    // Back to full strength before the next trial: the restarted server holds the commit.
    let target = client.put("failover-mark", b"v".as_slice()).await?.index;
    let addr = config
        .server(leader)
        .map_err(anyhow::Error::msg)?
        .addr
        .clone();
    loop {
        procs.check_alive()?;
        let status = kvraft::cluster_status::server_status(&addr).await;
        if status.is_some_and(|s| s.last_applied >= target) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline + FAILOVER_WAIT,
            "server {leader} did not catch up after its restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Trial {
        killed: leader,
        longest_gap_ms: longest_gap.as_secs_f64() * 1000.0,
        kill_to_first_ack_ms: first_after.as_secs_f64() * 1000.0,
    })
}
