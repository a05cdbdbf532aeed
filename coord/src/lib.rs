//! The kvraft coordinator: heartbeats every server, detects failures, and is the only process
//! that starts a new term (epoch) and designates its leader; it tells clients who leads.
//!
//! ```text
//!   servers ──Join──▶ [server API] ─┐                   ┌─▶ Heartbeat / Prepare ──▶ servers
//!                                   ├─▶ runtime ─ core ─┤
//!   clients ◀─GetLeader/WatchLeader─┘   (one task)      └─▶ coord_term file (fsync)
//! ```
//!
//! - [`core`]: the decisions, a pure state machine ([`CoordCore`]: events in, commands out).
//! - [`term_file`]: the highest issued term, persisted before it is used (DESIGN rule 1).
//! - `runtime`: executes commands (disk, RPCs, leader publication) and feeds results back.
//! - `service`: the `Coord` (join) and `CoordClient` (leader lookup) gRPC services.
//!
//! [`run`] wires them together on listeners the caller has bound, so tests use port 0.

pub mod cluster_id;
pub mod core;
pub mod members_file;
pub mod term_file;

mod convert;
mod metrics;
mod runtime;
mod service;

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use kvraft_common::ClusterConfig;
use kvraft_proto::coord_client_server::CoordClientServer;
use kvraft_proto::coord_server::CoordServer;
use kvraft_tracing::action::CoordStart;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tonic::transport::Server;
use tracing::{info, warn};

pub use crate::core::{Command, CoordCore, CoreConfig, Event, LeaderView, Role, ServerReport};
pub use crate::members_file::{MembersFile, MembersFileError};
pub use crate::term_file::{TermFile, TermFileError};

/// How long shutdown waits for in-flight requests and streams before abandoning them.
const SHUTDOWN_DRAIN_MS: u64 = 5_000;

/// Runs the coordinator until `shutdown` completes (then stops cleanly and returns `Ok`) or a
/// fatal error occurs (an unreadable term file, a failed fsync, a server API that stops).
///
/// `server_listener` serves `Coord` (for servers, `coord.server_api_addr`), `client_listener`
/// serves `CoordClient` (for clients, `coord.client_api_addr`); the addresses in `config` are
/// not bound again, so the caller may bind anything, port 0 included.
pub async fn run(
    config: ClusterConfig,
    server_listener: TcpListener,
    client_listener: TcpListener,
    shutdown: impl Future,
) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|(key, message)| anyhow!("invalid cluster config: {key}: {message}"))?;
    let (term_file, highest_term) = TermFile::open(&config.coord.data_dir)?;
    let (members_file, members) = MembersFile::open(&config.coord.data_dir)?;
    let cluster = std::sync::Arc::new(cluster_id::ClusterIdentity::open(&config.coord.data_dir)?);
    let core_config = CoreConfig::from_cluster(&config);
    let core = CoordCore::recovered(core_config, highest_term, members, 0);
    let tracer = kvraft_tracing::tracer_for(&config.tracing, "coord").await?;
    if let Some(t) = &tracer {
        let servers = config.servers.len() as u32;
        t.create_trace().record_action(&CoordStart {
            num_servers: servers,
        });
    }
    let server_addr = listener_addr(&server_listener);
    let client_addr = listener_addr(&client_listener);
    info!(
        "coord starting: {} servers, majority {}, highest issued term {highest_term} (from {}), \
         server API on {server_addr}, client API on {client_addr}",
        config.servers.len(),
        config.majority(),
        term_file.path().display()
    );

    let (inputs_tx, inputs_rx) = mpsc::channel(runtime::INPUTS_MAX);
    let initial_view = convert::leader_info(core.view(), "");
    let (leader_tx, leader_rx) = watch::channel(initial_view);
    let runtime = runtime::Runtime::new(
        &config,
        core,
        (term_file, members_file, cluster.clone()),
        inputs_tx.clone(),
        inputs_rx,
        leader_tx,
        tracer.clone(),
    )?;
    let metrics = metrics::CoordMetrics::new();
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let runtime = runtime
        .with_metrics(metrics.clone())
        .with_members(members_tx);
    // Stopped with the coord (dropped at the end of this function).
    let _metrics_server = match &config.coord.metrics_addr {
        Some(addr) => {
            let render = move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            };
            let server = kvraft_common::metrics_http::start(addr, "coord", render);
            let server = server.await.map_err(|e| anyhow!(e))?;
            info!("serving metrics at http://{addr}/metrics");
            Some(server)
        }
        None => None,
    };
    let join_service =
        service::JoinService::new(inputs_tx, config.server_ids(), tracer.clone(), cluster);
    let health_rx = leader_rx.clone();
    let leader_service = service::LeaderService::new(leader_rx, tracer.clone(), members_rx);
    // grpc.health.v1 on both addresses: serving while a leader is designated.
    let (health, health_service) = tonic_health::server::health_reporter();

    // One stop signal for every task, raised by `shutdown` or by the first task to fail.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let stop = stopped(stop_rx.clone());
    tasks.spawn(async move { ("coordinator core", runtime.run(stop).await) });
    let stop = stopped(stop_rx.clone());
    tasks.spawn(async move { ("health", report_health(health, health_rx, stop).await) });
    let stop = stopped(stop_rx.clone());
    let server_health = health_service.clone();
    tasks.spawn(async move {
        let result = Server::builder()
            .add_service(server_health)
            .add_service(CoordServer::new(join_service))
            .serve_with_incoming_shutdown(
                kvraft_common::net::nodelay_incoming(server_listener),
                stop,
            )
            .await
            .with_context(|| format!("serving the server API on {server_addr}"));
        ("server API", result)
    });
    let stop = stopped(stop_rx);
    tasks.spawn(async move {
        let result = Server::builder()
            .add_service(health_service)
            .add_service(CoordClientServer::new(leader_service))
            .serve_with_incoming_shutdown(
                kvraft_common::net::nodelay_incoming(client_listener),
                stop,
            )
            .await
            .with_context(|| format!("serving the client API on {client_addr}"));
        ("client API", result)
    });

    let mut result = Ok(());
    tokio::select! {
        biased;
        _ = shutdown => info!("coord shutting down"),
        Some(joined) = tasks.join_next() => {
            record(&mut result, joined);
            if result.is_ok() {
                result = Err(anyhow!("a coord task stopped unexpectedly"));
            }
        }
    }
    // Nobody else holds the sender, so this cannot fail.
    let _ = stop_tx.send(true);
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
            record(&mut result, joined);
        }
    };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_DRAIN_MS), drain)
        .await
        .is_err()
    {
        warn!("coord tasks did not stop within {SHUTDOWN_DRAIN_MS} ms; abandoning them");
        tasks.abort_all();
    }
    if let Some(t) = &tracer {
        t.close().await;
    }
    info!("coord stopped");
    result
}

/// Completes once the stop flag is raised (or its sender is gone).
/// Keeps the coord's `grpc.health.v1` status (overall, "") at SERVING while the published view
/// names a leader, NOT_SERVING otherwise (startup, an epoch change in progress).
async fn report_health(
    health: tonic_health::server::HealthReporter,
    mut view: watch::Receiver<kvraft_proto::LeaderInfo>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    loop {
        let status = if view.borrow_and_update().leader_id != 0 {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        tokio::select! {
            biased;
            () = &mut stop => return Ok(()),
            changed = view.changed() => {
                if changed.is_err() {
                    // The runtime dropped the view: the coord is stopping.
                    (&mut stop).await;
                    return Ok(());
                }
            }
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stop| stop).await;
}

/// Keeps the first failure of a coord task in `result`.
fn record(
    result: &mut anyhow::Result<()>,
    joined: Result<(&'static str, anyhow::Result<()>), JoinError>,
) {
    let error = match joined {
        Ok((_, Ok(()))) => return,
        Ok((task, Err(e))) => e.context(format!("coord {task} failed")),
        Err(e) if e.is_cancelled() => return,
        Err(e) => anyhow!("a coord task panicked: {e}"),
    };
    if result.is_ok() {
        *result = Err(error);
    } else {
        warn!("further coord error: {error:#}");
    }
}

fn listener_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("<unknown address: {e}>"))
}
