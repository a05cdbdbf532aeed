//! `demo`: a whole local cluster in one terminal. Starts the coord and every server of the
//! config as child processes (of this same executable, so `cargo run --bin demo` is all it
//! takes), runs the scripted workload with a leader crash (SIGKILL) halfway through, restarts
//! the killed server, and keeps the cluster running until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kvraft::launch;
use kvraft::procs::Procs;
use kvraft_common::ClusterConfig;

/// Deadline for the cluster to designate a leader at start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Operation of the workload at which the leader is killed.
const CRASH_AT: usize = 10;
const WORKLOAD_OPS: usize = 20;

/// Runs a local kvraft cluster (coord + every server of the config) in one terminal, shows a
/// leader failover under the scripted workload, then keeps the cluster up for you to use with
/// `client` until Ctrl-C.
#[derive(Parser, Debug)]
#[command(name = "demo", version, about, long_about)]
struct Args {
    /// Cluster config file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "config/cluster.toml",
        global = true
    )]
    config: PathBuf,
    /// Delete the config's data directories first (start from an empty store).
    #[arg(long)]
    fresh: bool,
    /// Stop the cluster after the workload instead of waiting for Ctrl-C.
    #[arg(long)]
    exit: bool,
    /// Where the processes' logs go.
    #[arg(long, value_name = "DIR", default_value = "data/demo-logs")]
    log_dir: PathBuf,
    #[command(subcommand)]
    role: Option<Role>,
}

/// Internal: the roles the demo starts its child processes in.
#[derive(Subcommand, Debug)]
enum Role {
    #[command(hide = true)]
    Coord,
    #[command(hide = true)]
    Server { id: u32 },
    #[command(hide = true)]
    TracingServer {
        #[arg(long)]
        fresh: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let process = match &args.role {
        Some(Role::Coord) => "coord".to_string(),
        Some(Role::Server { id }) => format!("server-{id}"),
        Some(Role::TracingServer { .. }) => "tracing-server".to_string(),
        None => "demo".to_string(),
    };
    let telemetry = launch::init_logging(&process, "info");
    let result = match args.role {
        Some(Role::Coord) => launch::coord(&args.config).await,
        Some(Role::Server { id }) => {
            launch::server(id, &args.config, launch::ServerFaults::default()).await
        }
        Some(Role::TracingServer { fresh }) => launch::tracing_server(&args.config, fresh).await,
        None => demo(&args).await,
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: error: {}", launch::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: &Args) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&args.config)?;
    if args.fresh {
        wipe_data(&config)?;
    }
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("cannot create {}", args.log_dir.display()))?;
    let mut procs = Procs::new(
        std::env::current_exe().context("cannot find this executable")?,
        args.config.clone(),
        args.log_dir.clone(),
    );
    println!(
        "starting coord and {} servers from {} (logs in {})",
        config.servers.len(),
        args.config.display(),
        args.log_dir.display()
    );
    if config.tracing.enabled {
        let mut role = vec!["tracing-server".to_string()];
        if args.fresh {
            role.push("--fresh".into());
        }
        procs.start("tracing-server", &role)?;
        println!(
            "tracing on: tracing server on {}, ShiViz log {}",
            config.tracing.server_addr,
            config.tracing.shiviz_output_file.display()
        );
    }
    procs.start_cluster(&config)?;
    let leader = procs.wait_for_leader(&config, START_TIMEOUT).await?;
    println!(
        "leader: server {} (UUID {}), term {}",
        leader.leader_id, leader.leader_uuid, leader.term
    );
    let client = kvslib::Client::connect(&config, "demo").await?;
    let failed = workload(&client, &mut procs, leader.leader_id).await;
    let after = client.leader().await?;
    println!(
        "leader now: server {} (UUID {}), term {}",
        after.leader_id, after.leader_uuid, after.term
    );
    procs.start_server(leader.leader_id)?;
    println!(
        "restarted server {}: it rejoins as a follower and catches up",
        leader.leader_id
    );
    client.close().await;
    if failed > 0 {
        bail!("{failed} operations of the workload failed");
    }
    if !args.exit {
        serve_until_ctrl_c(&args.config, &mut procs).await?;
    }
    procs.stop();
    Ok(())
}

/// The scripted workload, killing the leader at op [`CRASH_AT`]. Returns how many ops failed.
async fn workload(client: &kvslib::Client, procs: &mut Procs, leader: u32) -> usize {
    let mut failed = 0;
    for i in 0..WORKLOAD_OPS {
        if i == CRASH_AT {
            println!("--- killing the leader, server {leader}, with SIGKILL");
            procs.kill_server(leader);
        }
        let (key, value) = (format!("k{i}"), format!("val{i}"));
        let started = Instant::now();
        match client.put(key.clone(), value.clone()).await {
            Ok(o) => println!(
                "Put({key}, {value}) -> ok (version {}, index {}) in {} ms",
                o.version,
                o.index,
                started.elapsed().as_millis()
            ),
            Err(e) => {
                failed += 1;
                println!("Put({key}, {value}) -> error: {e}");
            }
        }
        match client.get(key.clone()).await {
            Ok(Some(v)) => println!("Get({key}) -> {}", String::from_utf8_lossy(&v)),
            Ok(None) => {
                failed += 1;
                println!("Get({key}) -> (not found)");
            }
            Err(e) => {
                failed += 1;
                println!("Get({key}) -> error: {e}");
            }
        }
    }
    failed
}

async fn serve_until_ctrl_c(config: &Path, procs: &mut Procs) -> anyhow::Result<()> {
    let c = config.display();
    println!("\nthe cluster keeps running. In another terminal:");
    println!("  cargo run --release --bin client -- 1 --config {c} shell");
    println!("  cargo run --release --bin client -- 2 --config {c} get k3");
    println!("Ctrl-C stops it.");
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let stop = launch::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = check.tick() => {
                if let Err(e) = procs.check_alive() {
                    eprintln!("warning: {e}");
                }
            }
        }
    }
}

fn wipe_data(config: &ClusterConfig) -> anyhow::Result<()> {
    let dirs =
        std::iter::once(&config.coord.data_dir).chain(config.servers.iter().map(|s| &s.data_dir));
    for dir in dirs {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    Ok(())
}
