//! Starting a coord or a server process: load the config, bind the configured addresses (a
//! port in use is an error naming the address and the config key), run until Ctrl-C / SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kvraft_common::ClusterConfig;
use kvraft_server::faults::{FaultSpec, Faults};
pub use kvraft_telemetry::Telemetry;
use tokio::net::TcpListener;

/// Logs to stderr, filtered by `RUST_LOG` or else `default`; with `OTEL_EXPORTER_OTLP_ENDPOINT`
/// set, also exports spans as service `kvraft-<process>` (`process`: `coord`, `server-3`, ...).
/// Call [`Telemetry::shutdown`] on the way out so the last spans leave.
pub fn init_logging(process: &str, default: &str) -> Telemetry {
    kvraft_telemetry::init(&format!("kvraft-{process}"), process, default)
}

/// The error and its causes on one line, skipping a cause its parent's message already quotes.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn bind(addr: &str, key: &str, config_path: &Path) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (set by {key} in {}); is another process using it?",
            config_path.display()
        )
    })
}

/// Runs the coord of the cluster described by `config_path`.
pub async fn coord(config_path: &Path) -> anyhow::Result<()> {
    let config = ClusterConfig::load(config_path)?;
    let c = &config.coord;
    let servers = bind(&c.server_api_addr, "coord.server_api_addr", config_path).await?;
    let clients = bind(&c.client_api_addr, "coord.client_api_addr", config_path).await?;
    kvraft_coord::run(config, servers, clients, shutdown_signal()).await
}

/// Fault injection asked for on a server's command line.
#[derive(Debug, Default)]
pub struct ServerFaults {
    /// `--allow-fault-injection`: serve `Admin.SetFaults` even if the config does not allow it.
    pub allow: bool,
    /// Faults injected `after` the start.
    pub spec: FaultSpec,
    pub after: Duration,
    /// The fault flags given (`--crash-after-commit`, ...), named when they are refused.
    pub flags: Vec<&'static str>,
}

/// Runs server `id`, with `faults.spec` injected `faults.after` after start. Fault injection
/// (the startup flags and `Admin.SetFaults`) is allowed by `faults.allow` or by
/// `[server] allow_fault_injection` in the config; without either, fault flags are an error.
pub async fn server(id: u32, config_path: &Path, faults: ServerFaults) -> anyhow::Result<()> {
    let config = ClusterConfig::load(config_path)?;
    let me = config
        .server(id)
        .map_err(|e| anyhow::anyhow!("{e} ({})", config_path.display()))?;
    let allowed = faults.allow || config.server.allow_fault_injection;
    if !allowed && !faults.flags.is_empty() {
        anyhow::bail!(
            "{} inject faults, and fault injection is disabled on server {id}: also pass \
             --allow-fault-injection, or set allow_fault_injection = true under [server] in {}",
            faults.flags.join(", "),
            config_path.display()
        );
    }
    let index = config.servers.iter().position(|s| s.id == id).unwrap_or(0);
    let listener = bind(&me.addr, &format!("servers[{index}].addr"), config_path).await?;
    let shared = Arc::new(Faults::default());
    let delayed = shared.clone();
    let ServerFaults { spec, after, .. } = faults;
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        delayed.set(&spec);
    });
    kvraft_server::run(config, id, listener, shared, allowed, shutdown_signal()).await
}

/// Runs the tracing server of the cluster described by `config_path`.
pub async fn tracing_server(config_path: &Path, fresh: bool) -> anyhow::Result<()> {
    let config = ClusterConfig::load(config_path)?;
    let t = &config.tracing;
    let listener = bind(&t.server_addr, "tracing.server_addr", config_path).await?;
    let paths = kvraft_tracing::server::OutputPaths {
        json: t.output_file.clone(),
        shiviz: t.shiviz_output_file.clone(),
    };
    let spool_dir = t.spool_dir.clone();
    kvraft_tracing::server::run(paths, spool_dir, fresh, listener, shutdown_signal()).await
}

/// Completes on Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
