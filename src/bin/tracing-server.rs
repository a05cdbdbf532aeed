//! `tracing-server`: collects the vector-clock trace events of every process of the cluster
//! and writes the JSON-lines log and the ShiViz log. Parses flags and hands over to
//! `kvraft::launch::tracing_server`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kvraft::launch;

/// The kvraft tracing server.
///
/// Listens on `tracing.server_addr` of the cluster config; every process with
/// `tracing.enabled = true` ships its trace events here. Writes `tracing.output_file` (JSON
/// lines: TracerIdentity, TraceID, Tag, Body, VectorClock) and `tracing.shiviz_output_file`
/// (open it at https://distributedclocks.github.io/shiviz/), relative to the working
/// directory. A restart continues both logs (and tells restarted processes where their clocks
/// left off) unless --fresh is given. Start it before the other processes. Logging follows
/// RUST_LOG (default `info`). Stops cleanly, logs flushed, on Ctrl-C or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "tracing-server", version)]
struct Args {
    /// Cluster config file (TOML) with the [tracing] section.
    #[arg(long, value_name = "FILE", default_value = "config/cluster.toml")]
    config: PathBuf,
    /// Start both logs empty instead of continuing them.
    #[arg(long)]
    fresh: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = launch::init_logging("tracing-server", "info");
    let result = launch::tracing_server(&args.config, args.fresh).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tracing-server: error: {}", launch::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
