//! `server <ID>`: one kvraft replica. Parses flags, binds the configured address and runs
//! `kvraft_server::run` until Ctrl-C / SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvraft_common::{ClusterConfig, NodeId};
use kvraft_server::faults::{FaultSpec, Faults};

#[path = "../shutdown.rs"]
mod shutdown;

/// A kvraft server: stores a durable replicated log and serves the key-value store when the
/// coord designates it leader.
///
/// Fault injection (for tests and demonstrations): the --partition-*, --crash-after-commit and
/// --delay-ms flags set faults when the server starts (or --faults-after-ms later); tests change
/// them at run time through the Admin.SetFaults RPC.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Server id, as in a [[servers]] table of the config.
    id: u32,
    /// Cluster config file.
    #[arg(long, default_value = "config/cluster.toml")]
    config: PathBuf,
    /// Partition this server from the coord for this many ms: it ignores (answers with an
    /// error) the coord's heartbeats and prepares.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    partition_coord_ms: u64,
    /// Peers (comma-separated ids) to partition this server from: replication to and from them
    /// is dropped for --partition-peers-ms.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    partition_peers: Vec<u32>,
    /// How long the peer partition lasts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    partition_peers_ms: u64,
    /// As leader, exit right after committing this log index, before replying to the client.
    #[arg(long, value_name = "INDEX", default_value_t = 0)]
    crash_after_commit: u64,
    /// Delay every outgoing replication message by this many ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Start the faults above this many ms after the server starts instead of at once.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    faults_after_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let config = ClusterConfig::load(&args.config)?;
    let me = config
        .server(args.id)
        .map_err(|e| anyhow::anyhow!("{e} ({})", args.config.display()))?;
    let index = config
        .servers
        .iter()
        .position(|s| s.id == args.id)
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(&me.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (servers[{index}].addr of {}); is another process using it?",
                me.addr,
                args.config.display()
            )
        })?;
    let spec = FaultSpec {
        partition_coord: Duration::from_millis(args.partition_coord_ms),
        partition_peers: args.partition_peers.iter().map(|&p| NodeId(p)).collect(),
        partition_peers_for: Duration::from_millis(args.partition_peers_ms),
        crash_after_commit: args.crash_after_commit,
        delay: Duration::from_millis(args.delay_ms),
    };
    let faults = Arc::new(Faults::default());
    schedule_faults(faults.clone(), spec, args.faults_after_ms);
    kvraft_server::run(config, args.id, listener, faults, shutdown::signal()).await
}

fn schedule_faults(faults: Arc<Faults>, spec: FaultSpec, after_ms: u64) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        faults.set(&spec);
    });
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
