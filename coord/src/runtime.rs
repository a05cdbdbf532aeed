//! Runs the coordinator core: the only place the coordinator touches the disk, the network and
//! the clock.
//!
//! ```text
//!   Coord.Join handler ──Input::Join──────┐
//!   heartbeat / prepare RPC tasks ─Event──┼─▶ bounded mpsc ─▶ core task ─▶ CoordCore::step
//!   interval timer ─────────────Tick──────┘                     │
//!            ┌─────────────────────────────────────────────────┘ commands, in order
//!            ▼
//!   PersistTerm        fsync on a blocking thread, awaited before the next command
//!   PersistMembers     likewise (the servers' storage records, DESIGN rule 10)
//!   SendHeartbeat      a spawned RPC task with a timeout; its answer comes back as an Input
//!   SendPrepare        likewise
//!   PublishLeader      the watch channel read by GetLeader / WatchLeader
//! ```
//!
//! Invariants:
//! - One task owns the core; everything else reaches it over the bounded input channel.
//! - `PersistTerm(t)` completes (fsync included) before any later command of the same batch
//!   runs, so no message carries a term that is not durable (DESIGN rule 1). A persistence
//!   failure is fatal: the coord stops rather than issue a term it could not record.
//! - Every RPC has a timeout, so RPCs in flight are bounded (about `RPC_TIMEOUT_HEARTBEATS + 1`
//!   heartbeats and prepares per server); `RPCS_IN_FLIGHT_MAX` is the backstop.
//! - Shutdown is checked first in every loop turn; on exit the RPC tasks are aborted and the
//!   leader watch sender is dropped, which ends every WatchLeader stream.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kvraft_common::{ClusterConfig, LogIndex, NodeId, Term};
use kvraft_proto as proto;
use kvraft_proto::server_control_client::ServerControlClient;
use kvraft_tracing::action::{
    AllServersJoined, LeaderReconfigDone, NewClusterView, NewTerm, ServerFail, ServerJoined,
};
use kvraft_tracing::{Trace, Tracer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, warn};

use crate::cluster_id::ClusterIdentity;
use crate::convert;
use crate::core::{Command, CoordCore, Event, LeaderView, ServerReport};
use crate::members_file::MembersFile;
use crate::term_file::TermFile;

/// Inputs waiting for the core task. RPC tasks and join handlers wait when it is full, which
/// slows them down instead of growing memory; the core task never sends to itself.
pub(crate) const INPUTS_MAX: usize = 1024;
/// An RPC may take this many heartbeat intervals: long enough for a busy server's fsync in
/// Prepare, short enough that a hung server counts as a missed heartbeat well within the
/// failure timeout.
const RPC_TIMEOUT_HEARTBEATS: u32 = 2;
/// Timer ticks per heartbeat interval: failure detection and resends are this precise.
const TICKS_PER_HEARTBEAT: u64 = 5;
/// Backstop on RPC tasks in flight (timeouts already bound them to a few per server).
const RPCS_IN_FLIGHT_MAX: usize = 1024;

/// What the core task receives.
pub(crate) enum Input {
    /// An RPC result from a spawned task.
    Event(Event),
    /// A heartbeat answer, with the cluster id the server reported (checked before the core
    /// sees the report).
    Reported { cluster_id: String, event: Event },
    /// A server joined; `reply` gets the view after the join was processed.
    Join {
        report: ServerReport,
        reply: oneshot::Sender<LeaderView>,
        /// The trace the joining server's token continues (tracing on).
        trace: Option<Trace>,
    },
}

/// Milliseconds since the runtime started; the core's only notion of time.
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn now_ms(self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A configured server, as the coord reaches it.
struct PeerClient {
    addr: String,
    /// Connects lazily and reconnects on demand, so a server that is down at startup or
    /// restarts later needs nothing special.
    client: ServerControlClient<Channel>,
}

pub(crate) struct Runtime {
    core: CoordCore,
    term_file: TermFile,
    members_file: MembersFile,
    peers: BTreeMap<NodeId, PeerClient>,
    inputs_tx: mpsc::Sender<Input>,
    inputs_rx: mpsc::Receiver<Input>,
    leader_tx: watch::Sender<proto::LeaderInfo>,
    rpcs: JoinSet<()>,
    clock: Clock,
    rpc_timeout: Duration,
    tick: Duration,
    /// Trace events; `None` when tracing is off (then nothing below is touched).
    tracer: Option<Tracer>,
    trace_state: TraceState,
    /// OpenTelemetry span of the epoch change in progress, from the term's persisting to the
    /// publication of its leader; its context rides on the Prepare calls. Disabled when spans
    /// are not exported.
    epoch_span: tracing::Span,
    /// The term `epoch_span` elects a leader for: only that term's view closes it.
    epoch_term: Term,
    cluster: Arc<ClusterIdentity>,
    /// Servers already warned about for reporting another cluster (one line each, not one per
    /// heartbeat).
    foreign: BTreeSet<NodeId>,
    metrics: Arc<crate::metrics::CoordMetrics>,
    /// The coord's view of every server, for `CoordClient.Members`.
    members_tx: watch::Sender<Vec<proto::MemberStatus>>,
    /// Every configured server.
    server_ids: Vec<NodeId>,
}

/// What the runtime remembers to turn the core's commands into trace actions.
#[derive(Default)]
struct TraceState {
    /// The trace of the current epoch change (from `NewTerm` to `LeaderReconfigDone`).
    epoch: Option<Trace>,
    /// Servers alive after the last step, to record `ServerFail` / `NewClusterView`.
    alive: BTreeSet<NodeId>,
    joined: BTreeSet<NodeId>,
    all_joined: bool,
    /// Last leader view recorded as `LeaderReconfigDone`.
    reconfigured: Option<(Term, NodeId)>,
}

impl Runtime {
    /// Builds the runtime; must be called inside a tokio runtime (lazy channels spawn tasks).
    pub(crate) fn new(
        config: &ClusterConfig,
        core: CoordCore,
        (term_file, members_file, cluster): (TermFile, MembersFile, Arc<ClusterIdentity>),
        inputs_tx: mpsc::Sender<Input>,
        inputs_rx: mpsc::Receiver<Input>,
        leader_tx: watch::Sender<proto::LeaderInfo>,
        tracer: Option<Tracer>,
    ) -> anyhow::Result<Runtime> {
        let interval_ms = config.coord.heartbeat_interval_ms;
        let rpc_timeout = Duration::from_millis(interval_ms) * RPC_TIMEOUT_HEARTBEATS;
        let tick = Duration::from_millis((interval_ms / TICKS_PER_HEARTBEAT).max(1));
        let mut peers = BTreeMap::new();
        for (i, server) in config.servers.iter().enumerate() {
            let endpoint = Endpoint::from_shared(format!("http://{}", server.addr))
                .with_context(|| format!("servers[{i}].addr {:?} is not usable", server.addr))?
                .connect_timeout(rpc_timeout)
                .timeout(rpc_timeout);
            let client = ServerControlClient::new(endpoint.connect_lazy());
            let addr = server.addr.clone();
            peers.insert(NodeId(server.id), PeerClient { addr, client });
        }
        Ok(Runtime {
            core,
            term_file,
            members_file,
            peers,
            inputs_tx,
            inputs_rx,
            leader_tx,
            rpcs: JoinSet::new(),
            clock: Clock {
                start: Instant::now(),
            },
            rpc_timeout,
            tick,
            tracer,
            trace_state: TraceState::default(),
            epoch_span: tracing::Span::none(),
            epoch_term: Term(0),
            cluster,
            foreign: BTreeSet::new(),
            metrics: crate::metrics::CoordMetrics::new(),
            members_tx: watch::channel(Vec::new()).0,
            server_ids: config.server_ids(),
        })
    }

    /// The core task's loop, until `stop` completes or a term cannot be persisted.
    pub(crate) async fn run(mut self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                () = &mut stop => break Ok(()),
                input = self.inputs_rx.recv() => {
                    let Some(input) = input else { break Ok(()) };
                    if let Err(e) = self.handle(input).await {
                        break Err(e);
                    }
                }
                _ = ticker.tick() => {
                    let now_ms = self.clock.now_ms();
                    if let Err(e) = self.apply(Event::Tick { now_ms }).await {
                        break Err(e);
                    }
                    while self.rpcs.try_join_next().is_some() {}
                }
            }
        };
        self.rpcs.abort_all();
        result
    }

    async fn handle(&mut self, input: Input) -> anyhow::Result<()> {
        match input {
            Input::Event(event) => self.apply(event).await,
            Input::Reported { cluster_id, event } => {
                let event = self.check_cluster(&cluster_id, event)?;
                self.apply(event).await
            }
            Input::Join {
                report,
                reply,
                trace,
            } => {
                let now_ms = self.clock.now_ms();
                let id = report.id;
                self.apply(Event::Joined { id, report, now_ms }).await?;
                if let Some(trace) = trace {
                    self.trace_joined(id, &trace);
                }
                // The joiner may have given up waiting; nothing to do then.
                let _ = reply.send(self.core.view().clone());
                Ok(())
            }
        }
    }

    /// A server of another cluster counts as not answering (it is not ours to heartbeat).
    fn check_cluster(&mut self, reported: &str, event: Event) -> anyhow::Result<Event> {
        let Event::HeartbeatOk { id, .. } = &event else {
            return Ok(event);
        };
        let id = *id;
        if self
            .cluster
            .accept(reported)
            .context("cannot store the cluster id")?
        {
            self.foreign.remove(&id);
            return Ok(event);
        }
        if self.foreign.insert(id) {
            error!(
                server = %id,
                "server {id} reports cluster {reported}, not this coord's cluster {}: its data \
                 directory belongs to another cluster; it is treated as down",
                self.cluster.current()
            );
        }
        Ok(Event::HeartbeatFailed { id })
    }

    /// Publishes the servers' status (alive, voter, storage identity) after every step.
    pub(crate) fn with_members(mut self, tx: watch::Sender<Vec<proto::MemberStatus>>) -> Self {
        self.members_tx = tx;
        self
    }

    /// Counts into `metrics` (the ones `/metrics` serves).
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::CoordMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    async fn apply(&mut self, event: Event) -> anyhow::Result<()> {
        let commands = self.core.step(event);
        let alive = (self.server_ids.iter())
            .filter(|&&id| self.core.is_alive(id))
            .count();
        self.metrics.servers_alive.set(alive as i64);
        let members: Vec<proto::MemberStatus> = (self.server_ids.iter())
            .map(|&id| {
                let record = self.core.members().get(&id);
                proto::MemberStatus {
                    server_id: id.0,
                    alive: self.core.is_alive(id),
                    voter: record.is_none_or(|m| m.voter),
                    uuid: record.map(|m| m.uuid.clone()).unwrap_or_default(),
                }
            })
            .collect();
        self.members_tx.send_if_modified(|current| {
            let changed = *current != members;
            if changed {
                *current = members;
            }
            changed
        });
        if self.tracer.is_some() {
            self.trace_alive_changes();
        }
        for command in commands {
            match command {
                Command::PersistTerm(term) => {
                    // A cluster has an identity before its first term.
                    let cluster = self.cluster.clone();
                    tokio::task::spawn_blocking(move || cluster.ensure())
                        .await
                        .context("cluster id task failed")?
                        .context("cannot store the cluster id")?;
                    self.persist(term).await?;
                    self.metrics.epoch_changes.inc();
                    self.epoch_term = term;
                    self.epoch_span = kvraft_telemetry::span_if_enabled(|| {
                        tracing::info_span!(
                            "coord.epoch_change",
                            term = term.0,
                            leader_id = tracing::field::Empty
                        )
                    });
                    if let Some(tracer) = &self.tracer {
                        let trace = tracer.create_trace();
                        trace.record_action(&NewTerm { term: term.0 });
                        self.trace_state.epoch = Some(trace);
                    }
                }
                Command::PersistMembers(members) => {
                    let file = self.members_file.clone();
                    tokio::task::spawn_blocking(move || file.store(&members))
                        .await
                        .context("the task persisting the storage records panicked")?
                        .context(
                            "cannot persist the servers' storage records; stopping the coord",
                        )?;
                }
                Command::SendHeartbeat {
                    to,
                    term,
                    leader_id,
                    catching_up,
                } => {
                    self.metrics.heartbeats_sent.inc();
                    self.send_heartbeat(to, term, leader_id, &catching_up)
                }
                Command::SendPrepare { to, term } => self.send_prepare(to, term),
                Command::PublishLeader(view) => self.publish(&view).await,
            }
        }
        Ok(())
    }

    /// Records `ServerFail` for servers the last step declared failed, and `NewClusterView`
    /// when the set of live servers changed.
    fn trace_alive_changes(&mut self) {
        let Some(tracer) = &self.tracer else { return };
        let alive: BTreeSet<NodeId> = (self.peers.keys())
            .copied()
            .filter(|&id| self.core.is_alive(id))
            .collect();
        if alive == self.trace_state.alive {
            return;
        }
        let trace = self
            .trace_state
            .epoch
            .clone()
            .unwrap_or_else(|| tracer.create_trace());
        for failed in self.trace_state.alive.difference(&alive) {
            trace.record_action(&ServerFail {
                server_id: failed.0,
            });
        }
        let server_ids = alive.iter().map(|id| id.0).collect();
        trace.record_action(&NewClusterView { server_ids });
        self.trace_state.alive = alive;
    }

    fn trace_joined(&mut self, id: NodeId, trace: &Trace) {
        let view = self.core.view();
        trace.record_action(&ServerJoined {
            server_id: id.0,
            term: view.term.0,
            leader_id: view.leader.0,
        });
        self.trace_state.joined.insert(id);
        if !self.trace_state.all_joined && self.trace_state.joined.len() == self.peers.len() {
            self.trace_state.all_joined = true;
            trace.record_action(&AllServersJoined {});
        }
    }

    /// Durably records `term` before anything else happens (DESIGN rule 1).
    async fn persist(&self, term: Term) -> anyhow::Result<()> {
        let file = self.term_file.clone();
        tokio::task::spawn_blocking(move || file.store(term))
            .await
            .context("the task persisting the coord term panicked")?
            .with_context(|| format!("cannot persist term {term}; stopping the coord"))
    }

    async fn publish(&mut self, view: &LeaderView) {
        self.metrics
            .term
            .set(i64::try_from(view.term.0).unwrap_or(i64::MAX));
        if self.metrics.leader_id.get() != i64::from(view.leader.0) && view.leader != NodeId::NONE {
            self.metrics.leader_changes.inc();
        }
        self.metrics.leader_id.set(i64::from(view.leader.0));
        let addr = self
            .peers
            .get(&view.leader)
            .map(|p| p.addr.as_str())
            .unwrap_or_default();
        let mut info = convert::leader_info(view, addr);
        if view.leader != NodeId::NONE && view.term == self.epoch_term {
            self.epoch_span.record("leader_id", view.leader.0);
            self.epoch_span = tracing::Span::none();
        }
        if let Some(tracer) = &self.tracer {
            let key = (view.term, view.leader);
            if view.leader != NodeId::NONE && self.trace_state.reconfigured != Some(key) {
                self.trace_state.reconfigured = Some(key);
                let trace =
                    (self.trace_state.epoch.take()).unwrap_or_else(|| tracer.create_trace());
                trace.record_action(&LeaderReconfigDone {
                    term: view.term.0,
                    leader_id: view.leader.0,
                });
                // Watchers receive this token with the new view (LeaderNodeUpdateRecvd).
                info.trace_token = trace.generate_token_for("LeaderInfo");
                tracer.flush().await;
            } else {
                info.trace_token = self.leader_tx.borrow().trace_token.clone();
            }
        }
        self.leader_tx.send_if_modified(|current| {
            let changed = *current != info;
            if changed {
                *current = info;
            }
            changed
        });
    }

    fn send_heartbeat(
        &mut self,
        to: NodeId,
        term: Term,
        leader: NodeId,
        catching_up: &[(NodeId, String)],
    ) {
        let Some(peer) = self.peers.get(&to) else {
            warn!(server = %to, "no address for server {to}; heartbeat not sent");
            return;
        };
        let mut client = peer.client.clone();
        let request = proto::HeartbeatRequest {
            term: term.0,
            leader_id: leader.0,
            cluster_id: self.cluster.current(),
            catching_up: convert::members_to_proto(catching_up),
            trace_token: Default::default(),
        };
        let (timeout, clock, inputs) = (self.rpc_timeout, self.clock, self.inputs_tx.clone());
        self.spawn_rpc(async move {
            let answer = tokio::time::timeout(timeout, client.heartbeat(request)).await;
            let mut cluster_id = String::new();
            let event = match answer {
                Ok(Ok(response)) => match response.into_inner().report {
                    Some(report) => {
                        cluster_id = report.cluster_id.clone();
                        Event::HeartbeatOk {
                            id: to,
                            report: convert::report_from_proto(report),
                            now_ms: clock.now_ms(),
                        }
                    }
                    None => {
                        debug!(server = %to, "heartbeat answer without a report");
                        Event::HeartbeatFailed { id: to }
                    }
                },
                Ok(Err(status)) if connection_refused(&status) => {
                    debug!(server = %to, "heartbeat refused: nothing listens at the address");
                    Event::ServerGone { id: to }
                }
                Ok(Err(status)) => {
                    debug!(server = %to, "heartbeat failed: {}", status.message());
                    Event::HeartbeatFailed { id: to }
                }
                Err(_) => {
                    debug!(server = %to, "heartbeat timed out after {timeout:?}");
                    Event::HeartbeatFailed { id: to }
                }
            };
            // A closed channel means the coord is stopping and no longer needs the answer.
            let _ = inputs.send(Input::Reported { cluster_id, event }).await;
        });
    }

    fn send_prepare(&mut self, to: NodeId, term: Term) {
        let Some(peer) = self.peers.get(&to) else {
            warn!(server = %to, "no address for server {to}; Prepare not sent");
            return;
        };
        let mut client = peer.client.clone();
        let trace = self.tracer.as_ref().map(|tracer| {
            (self.trace_state.epoch.clone()).unwrap_or_else(|| tracer.create_trace())
        });
        let mut request = tonic::Request::new(proto::PrepareRequest {
            term: term.0,
            cluster_id: self.cluster.current(),
            trace_token: kvraft_tracing::token(trace.as_ref(), "PrepareRequest"),
        });
        kvraft_telemetry::inject_metadata(&self.epoch_span, request.metadata_mut());
        let (timeout, inputs) = (self.rpc_timeout, self.inputs_tx.clone());
        let tracer = self.tracer.clone();
        self.spawn_rpc(async move {
            if let Some(t) = &tracer {
                t.flush().await;
            }
            let answer = tokio::time::timeout(timeout, client.prepare(request)).await;
            let event = match answer {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    if let Some(t) = &tracer {
                        t.receive_token(&response.trace_token);
                    }
                    if response.ok {
                        Event::PrepareOk {
                            id: to,
                            term: Term(response.term),
                            last_log_term: Term(response.last_log_term),
                            last_log_index: LogIndex(response.last_log_index),
                            uuid: response.uuid,
                        }
                    } else {
                        Event::PrepareRejected {
                            id: to,
                            term: Term(response.term),
                        }
                    }
                }
                // The core resends to servers that have not answered; nothing to report.
                Ok(Err(status)) => {
                    debug!(server = %to, "Prepare({term}) failed: {}", status.message());
                    return;
                }
                Err(_) => {
                    debug!(server = %to, "Prepare({term}) timed out after {timeout:?}");
                    return;
                }
            };
            let _ = inputs.send(Input::Event(event)).await;
        });
    }

    fn spawn_rpc(&mut self, rpc: impl Future<Output = ()> + Send + 'static) {
        while self.rpcs.try_join_next().is_some() {}
        if self.rpcs.len() >= RPCS_IN_FLIGHT_MAX {
            warn!(
                "{} RPCs in flight, the limit; dropping one (it counts as unanswered)",
                self.rpcs.len()
            );
            return;
        }
        self.rpcs.spawn(rpc);
    }
}

/// Whether an RPC failed because the connection was refused: no process listens at the
/// address (it crashed or stopped; a hang or a partition would time out instead). Found in the
/// error's source chain, where tonic keeps the connect error.
fn connection_refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat to an address nobody listens on is recognised as refused (the server is
    /// not running), not as a timeout.
    #[tokio::test]
    async fn a_refused_connection_is_told_apart() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("url");
        let mut client = ServerControlClient::new(endpoint.connect_lazy());
        let status = client
            .heartbeat(proto::HeartbeatRequest::default())
            .await
            .expect_err("nothing listens");
        assert!(connection_refused(&status), "{status:?}");
        assert!(!connection_refused(&tonic::Status::unavailable(
            "partitioned"
        )));
    }
}
