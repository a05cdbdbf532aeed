//! `server <ID>`: one kvraft replica. Parses flags and hands over to `kvraft::launch::server`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kvraft::launch;
use kvraft_common::NodeId;
use kvraft_server::faults::FaultSpec;

/// A kvraft server: stores a durable replicated log and serves the key-value store when the
/// coord designates it leader.
///
/// Fault injection (for tests and demonstrations) is off unless --allow-fault-injection is
/// given or the config sets `[server] allow_fault_injection = true`. Then the --partition-*,
/// --crash-after-commit and --delay-ms flags set faults when the server starts (or
/// --faults-after-ms later), and tests change them at run time through the Admin.SetFaults
/// RPC. Logging follows RUST_LOG (default `info`). Stops cleanly on Ctrl-C or SIGTERM.
#[derive(Parser, Debug)]
#[command(name = "server", version, about, long_about)]
pub struct Args {
    /// Server id, as in a [[servers]] table of the config.
    id: u32,
    /// Cluster config file.
    #[arg(long, value_name = "FILE", default_value = "config/cluster.toml")]
    config: PathBuf,
    /// Allow fault injection: the fault flags below and the Admin.SetFaults RPC (which
    /// otherwise answers PERMISSION_DENIED). Never in production: anyone who reaches the
    /// server's address could partition or crash it.
    #[arg(long)]
    allow_fault_injection: bool,
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
    /// Make the peer partition one-way: drop only what this server sends to those peers.
    #[arg(long)]
    one_way: bool,
    /// As leader, exit right after committing this log index, before replying to the client.
    #[arg(long, value_name = "INDEX", default_value_t = 0)]
    crash_after_commit: u64,
    /// Delay every outgoing replication message by this many ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Exit right after installing a snapshot from the leader, before the log is reset.
    #[arg(long)]
    crash_after_snapshot_install: bool,
    /// Start the faults above this many ms after the server starts instead of at once.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    faults_after_ms: u64,
}

impl Args {
    /// The fault flags given, by name.
    fn fault_flags(&self) -> Vec<&'static str> {
        [
            ("--partition-coord-ms", self.partition_coord_ms != 0),
            ("--partition-peers", !self.partition_peers.is_empty()),
            ("--partition-peers-ms", self.partition_peers_ms != 0),
            ("--one-way", self.one_way),
            ("--crash-after-commit", self.crash_after_commit != 0),
            ("--delay-ms", self.delay_ms != 0),
            (
                "--crash-after-snapshot-install",
                self.crash_after_snapshot_install,
            ),
            ("--faults-after-ms", self.faults_after_ms != 0),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = launch::init_logging(&format!("server-{}", args.id), "info");
    let faults = launch::ServerFaults {
        allow: args.allow_fault_injection,
        spec: FaultSpec {
            partition_coord: Duration::from_millis(args.partition_coord_ms),
            partition_peers: args.partition_peers.iter().map(|&p| NodeId(p)).collect(),
            partition_peers_for: Duration::from_millis(args.partition_peers_ms),
            crash_after_commit: args.crash_after_commit,
            delay: Duration::from_millis(args.delay_ms),
            one_way: args.one_way,
            crash_after_snapshot_install: args.crash_after_snapshot_install,
            ..FaultSpec::default()
        },
        after: Duration::from_millis(args.faults_after_ms),
        flags: args.fault_flags(),
    };
    let result = launch::server(args.id, &args.config, faults).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("server {}: error: {}", args.id, launch::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
