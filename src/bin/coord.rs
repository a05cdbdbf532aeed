//! `coord`: the kvraft coordinator process. Parses flags and hands over to
//! `kvraft::launch::coord` until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kvraft::launch;

/// The kvraft coordinator.
///
/// Heartbeats every server in the cluster config, detects failed servers, and is the only
/// process that starts a new term (epoch) and designates its leader; clients ask it (or
/// watch it) for the current leader. The highest term it has issued is kept in
/// `<coord.data_dir>/coord_term`, fsynced before use, so a restarted coord never issues a term
/// twice; after a restart it re-learns the running leader from the servers' reports.
///
/// Listens on `coord.server_api_addr` (servers join there) and `coord.client_api_addr`
/// (clients look up the leader). Logging follows RUST_LOG (default `info`). Stops cleanly on
/// Ctrl-C or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "coord", version)]
struct Args {
    /// Cluster config file (TOML): coord addresses, data_dir, timing, and the servers.
    #[arg(long, value_name = "FILE", default_value = "config/cluster.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = launch::init_logging("coord", "info");
    let result = launch::coord(&args.config).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("coord: error: {}", launch::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
