//! gRPC services of a server, all on its one address: `ServerControl` (from the coord),
//! `Replication` (from the leader), `Kv` (from clients) and `Admin` (status, and fault
//! injection when the server was started with it allowed; else `PERMISSION_DENIED`).
//! Each handler turns a request into a [`Call`] for the core task and the core's [`Reply`]
//! back into a response; no decision is made here beyond input validation and the coord
//! partition fault.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvraft_common::config::ClusterConfig;
use kvraft_common::fnv::{fnv1a, FNV_OFFSET};
use kvraft_common::{limits, LogIndex, NodeId};
use kvraft_proto::admin_server::{Admin, AdminServer};
use kvraft_proto::coord_client::CoordClient;
use kvraft_proto::kv_server::{Kv, KvServer};
use kvraft_proto::replication_server::{Replication, ReplicationServer};
use kvraft_proto::server_control_server::{ServerControl, ServerControlServer};
use kvraft_proto::*;
use kvraft_tracing::action::{
    self as act, DuplicateRequestResolved, GetRecvd, GetResult, PutCommitted, PutRecvd,
    ServerFailRecvd, ServerJoined, ServerJoining,
};
use kvraft_tracing::Trace;
use prost::bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::faults::FaultSpec;
use crate::replica::{ClientError, RangeQuery, Reply};
use crate::runtime::{now_ms, Call, CoreHandle, Input, PEER_QUEUE_MAX};
use crate::state_machine::{TxnOpResult, Versioned, WriteResult};
use crate::watch as watches;

/// How often the `grpc.health.v1` status is brought up to date.
const HEALTH_REFRESH_MS: u64 = 100;

/// Serves every service on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    handle: CoreHandle,
    mut stop: watch::Receiver<bool>,
) {
    let grpc_message_bytes = handle.grpc_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(health, handle.clone(), stop.clone()));
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(ServerControlServer::new(handle.clone()))
        .add_service(
            ReplicationServer::new(handle.clone())
                .max_decoding_message_size(grpc_message_bytes)
                .max_encoding_message_size(grpc_message_bytes),
        )
        .add_service(
            KvServer::new(handle.clone())
                .max_decoding_message_size(grpc_message_bytes)
                .max_encoding_message_size(grpc_message_bytes),
        )
        .add_service(AdminServer::new(handle))
        .serve_with_incoming_shutdown(kvraft_common::net::nodelay_incoming(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!("gRPC server failed: {e}");
    }
}

/// Keeps `grpc.health.v1` (overall, "", and `kvraft.Kv`) at SERVING while this server can do
/// its job: it has heard from the coord (it joined) and its log is writable (not out of disk).
/// NOT_SERVING otherwise, so probes and orchestrators see a server that cannot take part.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    handle: CoreHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let joined = handle.last_coord_contact_ms.load(Ordering::Relaxed) > 0;
        let writable = !handle.disk_full.load(Ordering::Relaxed);
        let status = if joined && writable {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health.set_service_status("kvraft.Kv", status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(HEALTH_REFRESH_MS)) => {}
        }
    }
}

/// Announces this server to the coord at start, and again whenever the coord has not been
/// heard from for a while (coord restart, healed partition).
pub(crate) async fn join_coord(
    config: ClusterConfig,
    handle: CoreHandle,
    mut stop: watch::Receiver<bool>,
) {
    let silence_ms = config.coord.failure_timeout_ms * 2;
    let endpoint = match tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        config.coord.server_api_addr
    )) {
        Ok(e) => e.connect_timeout(Duration::from_millis(500)),
        Err(e) => return tracing::error!("coord.server_api_addr is not usable: {e}"),
    };
    let mut client = CoordClient::new(endpoint.connect_lazy());
    // Until one Join is answered, it is sent even while heartbeats arrive: the coord may have
    // found this server by heartbeat first (a Join sent before the coord listened fails), and
    // the Join is what announces the server, in the log and in the trace (`ServerJoined`).
    let mut joined = false;
    loop {
        let last = handle.last_coord_contact_ms.load(Ordering::Relaxed);
        let silent = now_ms().saturating_sub(last) > silence_ms;
        if (silent || !joined) && !handle.faults.coord_partitioned() {
            joined |= try_join(&handle, &mut client, silence_ms).await;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(config.coord.failure_timeout_ms)) => {}
        }
    }
}

/// One Join; whether the coord answered it.
async fn try_join(
    handle: &CoreHandle,
    client: &mut CoordClient<tonic::transport::Channel>,
    timeout_ms: u64,
) -> bool {
    let Some(Reply::Status { report, .. }) = handle.call(Call::Status).await else {
        return false;
    };
    let trace = handle.tracer.as_ref().map(|t| {
        let trace = t.create_trace();
        trace.record_action(&ServerJoining {
            server_id: handle.id.0,
        });
        trace
    });
    let trace_token = handle.token_out(trace.as_ref(), "JoinRequest").await;
    let mut req = Request::new(JoinRequest {
        report: Some(report),
        trace_token,
    });
    req.set_timeout(Duration::from_millis(timeout_ms));
    match client.join(req).await {
        Ok(resp) => {
            let resp = resp.into_inner();
            tracing::info!(term = resp.term, leader = resp.leader_id, "ServerJoined");
            if let Some(t) = &handle.tracer {
                t.receive_token(&resp.trace_token)
                    .record_action(&ServerJoined {
                        server_id: handle.id.0,
                        term: resp.term,
                        leader_id: resp.leader_id,
                    });
            }
            handle
                .last_coord_contact_ms
                .store(now_ms(), Ordering::Relaxed);
            let view = Call::CoordHeartbeat {
                term: resp.term,
                leader: NodeId(resp.leader_id),
                cluster_id: resp.cluster_id,
                catching_up: None,
            };
            let _ = handle.call(view).await;
            true
        }
        Err(e) => {
            tracing::debug!("ServerJoining: coord not reachable: {}", e.message());
            false
        }
    }
}

impl CoreHandle {
    /// Continues the sender's trace (tracing on).
    fn trace_in(&self, token: &[u8]) -> Option<Trace> {
        self.tracer.as_ref().map(|t| t.receive_token(token))
    }

    /// A token for an outgoing message, returned once the events it covers are shipped;
    /// empty when tracing is off.
    async fn token_out(&self, trace: Option<&Trace>, message: &str) -> Bytes {
        let Some(trace) = trace else {
            return Bytes::new();
        };
        let token = trace.generate_token_for(message);
        trace.tracer().flush().await;
        token
    }

    /// Makes the events behind answers' tokens made without a flush safe before the answers
    /// leave: once for a whole batch (`gathered`: its requests were handled together, so no
    /// yield is needed to gather them), or once for one answer (with the yield that lets
    /// answers of tasks woken together share one spool write).
    async fn flush_trace(&self, gathered: bool) {
        match (&self.tracer, gathered) {
            (Some(t), true) => t.flush_now().await,
            (Some(t), false) => t.flush().await,
            (None, _) => {}
        }
    }
}

/// Resident memory of this process, from `/proc/self/status` (0 elsewhere).
fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A copy of `bytes` in an allocation of its own. Decoded `bytes` fields are slices of the
/// whole receive buffer (8 KiB for a put, up to a whole AppendEntries batch): kept in the log
/// and the state machine as they are, each would pin its buffer for as long as the entry or
/// the value lives. That was the leader's memory growing by about 4.4 KB per put.
fn owned(bytes: &Bytes) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

/// Gives the keys and values of a batch's entries allocations of their own (see [`owned`]).
fn own_entries(req: &mut AppendEntriesRequest) {
    for entry in &mut req.entries {
        if let Some(kvraft_proto::log_entry::Payload::Put(put)) = &mut entry.payload {
            put.key = owned(&put.key);
            put.value = owned(&put.value);
        }
    }
}

/// Serves Prometheus scrapes of this server's metrics on `addr` (see `metrics.rs`) until the
/// returned server is dropped.
pub(crate) async fn start_metrics(
    addr: &str,
    handle: CoreHandle,
) -> anyhow::Result<kvraft_common::metrics_http::MetricsServer> {
    let who = format!("server {}", handle.id);
    let render = move || {
        let handle = handle.clone();
        async move {
            let mut sample = crate::metrics::Sample::default();
            if let Some((status, followers, sessions)) = handle.full_status().await {
                let report = status.report.unwrap_or_default();
                sample = crate::metrics::Sample {
                    term: report.term,
                    commit_index: report.commit_index,
                    applied_index: status.last_applied,
                    last_index: report.last_log_index,
                    is_leader: report.role == Role::Leader as i32,
                    log_bytes: status.log_bytes,
                    log_entries_held: status.log_entries_held,
                    state_bytes: status.state_bytes,
                    rss_bytes: status.rss_bytes,
                    followers: followers.iter().map(|(id, m)| (id.0, m.0)).collect(),
                    watches_open: (watches::WATCHES_MAX - handle.watch.watches.available_permits())
                        as u64,
                    sessions_open: sessions,
                    snapshots_sent: status.snapshots_sent,
                    snapshots_installed: status.snapshots_installed,
                };
            }
            handle.metrics.render(&sample)
        }
    };
    let server = kvraft_common::metrics_http::start(addr, &who, render)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!("{who}: serving metrics at http://{addr}/metrics");
    Ok(server)
}

/// Streams one watch: the header, the batches the history holds, then those its queue names,
/// each filtered to the watched range; ends when the client goes, or cancels the watch when
/// the history no longer holds its next revision (it fell behind, or a snapshot replaced the
/// state), with the revision to resume from.
pub async fn serve_watch(
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    (start, end): (Bytes, Bytes),
    hub: Arc<watches::WatchHub>,
    sub: watches::Subscription,
) {
    let watches::Subscription { mut live, after } = sub;
    let header = WatchResponse {
        created: true,
        revision: after,
        ..Default::default()
    };
    if tx.send(Ok(header)).await.is_err() {
        return;
    }
    // Every revision below `next` has been delivered (or changed nothing watched).
    let mut next = after + 1;
    let send = |batch: &watches::Batch| {
        let events: Vec<kvraft_proto::WatchEvent> = batch
            .changes
            .iter()
            .filter(|(key, _)| watches::in_range(key, &start, &end))
            .map(|(key, value)| watch_event(key, value.as_ref(), batch.revision))
            .collect();
        (!events.is_empty()).then(|| WatchResponse {
            revision: batch.revision,
            events,
            ..Default::default()
        })
    };
    let gone = |next: u64, floor: u64| {
        canceled(
            next,
            format!(
                "this server no longer holds revision {next}: its history holds the changes \
                 after revision {floor} (a watch that falls behind, or a snapshot installed, \
                 moves it past)"
            ),
        )
    };
    // Reads what the history holds from `next` on, a chunk at a time (what is published
    // meanwhile is also queued, and skipped then); false if the watch ended.
    let catch_up = async |next: &mut u64| -> bool {
        loop {
            let chunk = match hub.replay(*next, watches::REPLAY_CHUNK) {
                Ok(chunk) => chunk,
                Err(c) => {
                    let _ = tx.send(Ok(gone(*next, c.floor))).await;
                    return false;
                }
            };
            let whole = chunk.len() == watches::REPLAY_CHUNK;
            for batch in chunk {
                if let Some(resp) = send(&batch) {
                    if tx.send(Ok(resp)).await.is_err() {
                        return false;
                    }
                }
                *next = batch.revision + 1;
            }
            if !whole {
                return true;
            }
        }
    };
    if !catch_up(&mut next).await {
        return;
    }
    loop {
        match live.wake(next).await {
            None => return,
            Some(Ok(watches::Wake::Batch(batch))) => {
                if let Some(resp) = send(&batch) {
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                next = batch.revision + 1;
            }
            Some(Ok(watches::Wake::CatchUp)) => {
                if !catch_up(&mut next).await {
                    return;
                }
            }
            Some(Err(c)) => {
                let _ = tx.send(Ok(gone(next, c.floor))).await;
                return;
            }
        }
    }
}

/// The last response of a watch the server stops: every revision below `resume` was given.
fn canceled(resume: u64, reason: String) -> WatchResponse {
    WatchResponse {
        canceled: true,
        resume_revision: resume,
        cancel_reason: reason,
        ..Default::default()
    }
}

fn watch_event(key: &Bytes, value: Option<&Versioned>, revision: u64) -> kvraft_proto::WatchEvent {
    use kvraft_proto::watch_event::Kind;
    match value {
        Some(v) => kvraft_proto::WatchEvent {
            kind: Kind::Put as i32,
            kv: Some(key_value(key.clone(), v.clone())),
        },
        None => kvraft_proto::WatchEvent {
            kind: Kind::Delete as i32,
            kv: Some(KeyValue {
                key: key.clone(),
                mod_revision: revision,
                ..Default::default()
            }),
        },
    }
}

/// A compare whose key and value have allocations of their own (see [`owned`]).
fn owned_compare(mut c: Compare) -> Compare {
    c.key = owned(&c.key);
    c.value = owned(&c.value);
    c
}

/// A transaction op whose bytes have allocations of their own (see [`owned`]).
fn owned_op(mut op: TxnOp) -> TxnOp {
    use kvraft_proto::txn_op::Op;
    match &mut op.op {
        Some(Op::Put(p)) => {
            p.key = owned(&p.key);
            p.value = owned(&p.value);
        }
        Some(Op::Delete(d)) => {
            d.key = owned(&d.key);
            d.range_end = owned(&d.range_end);
        }
        Some(Op::Get(g)) => g.key = owned(&g.key),
        None => {}
    }
    op
}

fn key_value(key: Bytes, v: Versioned) -> KeyValue {
    KeyValue {
        key,
        value: v.value,
        version: v.version,
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
    }
}

fn txn_op_result(r: &TxnOpResult) -> kvraft_proto::TxnOpResult {
    use kvraft_proto::txn_op_result::Result as R;
    let result = match r {
        TxnOpResult::Put { version } => R::Put(TxnPutResult { version: *version }),
        TxnOpResult::Delete { deleted, more } => R::Delete(TxnDeleteResult {
            deleted: *deleted,
            more: *more,
        }),
        TxnOpResult::Get { kv, value_omitted } => R::Get(TxnGetResult {
            found: kv.is_some(),
            kv: kv.clone().map(|v| key_value(Bytes::new(), v)),
            value_omitted: *value_omitted,
        }),
    };
    kvraft_proto::TxnOpResult {
        result: Some(result),
    }
}

/// The coord's catching-up list as the core takes it.
fn members(list: Vec<StorageMember>) -> Vec<(NodeId, String)> {
    list.into_iter()
        .map(|m| (NodeId(m.server_id), m.uuid))
        .collect()
}

fn unavailable() -> Status {
    Status::unavailable("server is shutting down")
}

/// The answer to `Admin.SetFaults` on a server started without fault injection allowed.
fn fault_injection_denied(id: NodeId) -> Status {
    Status::permission_denied(format!(
        "fault injection is disabled on server {id}; start it with --allow-fault-injection \
         or set allow_fault_injection = true under [server] in the config"
    ))
}

fn coord_partition_check(handle: &CoreHandle) -> Result<(), Status> {
    if handle.faults.coord_partitioned() {
        return Err(Status::unavailable(
            "partitioned from the coord (fault injection)",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl ServerControl for CoreHandle {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        coord_partition_check(self)?;
        let req = request.into_inner();
        // The coord's heartbeats are not traced (they would bury everything else); one that
        // carries a token anyway gets one back.
        let trace = match req.trace_token.is_empty() {
            true => None,
            false => self.trace_in(&req.trace_token),
        };
        let call = Call::CoordHeartbeat {
            term: req.term,
            leader: NodeId(req.leader_id),
            cluster_id: req.cluster_id,
            catching_up: Some(members(req.catching_up)),
        };
        let Reply::Report(report) = self.call_or_refusal(call).await? else {
            return Err(unavailable());
        };
        self.last_coord_contact_ms
            .store(now_ms(), Ordering::Relaxed);
        Ok(Response::new(HeartbeatResponse {
            report: Some(report),
            trace_token: self.token_out(trace.as_ref(), "HeartbeatResponse").await,
        }))
    }

    async fn prepare(
        &self,
        request: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        coord_partition_check(self)?;
        let span = kvraft_telemetry::span_if_enabled(|| {
            tracing::info_span!(
                "server.prepare",
                server = self.id.0,
                term = request.get_ref().term
            )
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        let request = request.into_inner();
        let term = request.term;
        let cluster_id = request.cluster_id;
        let trace = self.trace_in(&request.trace_token);
        if let Some(t) = &trace {
            t.record_action(&ServerFailRecvd {
                server_id: self.id.0,
                term,
            });
        }
        let Reply::Prepare {
            ok,
            term,
            last_log_term,
            last_log_index,
            uuid,
        } = self
            .call_or_refusal(Call::Prepare { term, cluster_id })
            .instrument(span)
            .await?
        else {
            return Err(unavailable());
        };
        Ok(Response::new(PrepareResponse {
            ok,
            term: term.0,
            last_log_term: last_log_term.0,
            last_log_index: last_log_index.0,
            uuid,
            trace_token: self.token_out(trace.as_ref(), "PrepareResponse").await,
        }))
    }
}

#[tonic::async_trait]
impl Replication for CoreHandle {
    type ReplicateStream =
        Pin<Box<dyn Stream<Item = Result<AppendEntriesResponse, Status>> + Send + 'static>>;

    async fn replicate(
        &self,
        request: Request<Streaming<AppendEntriesRequest>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, mut rx) = mpsc::channel::<Result<AppendEntriesResponse, Status>>(PEER_QUEUE_MAX);
        if let Some(tracer) = self.tracer.clone() {
            // An acknowledgement with a trace token leaves only once the events it covers are
            // shipped: forward through a task that waits for that.
            let (out_tx, out_rx) = mpsc::channel(PEER_QUEUE_MAX);
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if matches!(&msg, Ok(r) if !r.trace_token.is_empty()) {
                        tracer.flush().await;
                    }
                    if out_tx.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            rx = out_rx;
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Input::StreamOpened(stream, tx))
            .await
            .map_err(|_| unavailable())?;
        let handle = self.clone();
        // The stream's leader, for the one-way fault on our acknowledgements.
        let leader = Arc::new(AtomicU32::new(0));
        let (faults, stream_leader) = (self.faults.clone(), leader.clone());
        let outbound = ReceiverStream::new(rx)
            .filter(move |_| !faults.drops_to(NodeId(stream_leader.load(Ordering::Relaxed))));
        tokio::spawn(async move {
            while let Ok(Some(mut req)) = inbound.message().await {
                own_entries(&mut req);
                leader.store(req.leader_id, Ordering::Relaxed);
                if handle.faults.drops_from(NodeId(req.leader_id)) {
                    break;
                }
                if handle
                    .tx
                    .send(Input::AppendEntries(stream, req))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = handle.tx.send(Input::StreamClosed(stream)).await;
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

fn kv_error(e: ClientError) -> KvError {
    let (code, leader_id, term, message) = match e {
        ClientError::NotLeader { leader, term } => (
            ErrorCode::ErrorNotLeader,
            leader.0,
            term.0,
            "not the leader".to_string(),
        ),
        ClientError::SessionExpired => (
            ErrorCode::ErrorSessionExpired,
            0,
            0,
            "session expired or unknown".to_string(),
        ),
        ClientError::Stale => (
            ErrorCode::ErrorStaleRequest,
            0,
            0,
            "seq is below the session's ack_seq: its result is no longer kept, so whether it \
             applied is unknown"
                .to_string(),
        ),
        ClientError::Invalid(message) => (ErrorCode::ErrorInvalidArgument, 0, 0, message),
        ClientError::Unavailable(message) => (ErrorCode::ErrorUnavailable, 0, 0, message),
        ClientError::Compacted(message) => (ErrorCode::ErrorCompacted, 0, 0, message),
    };
    KvError {
        code: code as i32,
        message,
        leader_id,
        term,
    }
}

fn error_of(code: ErrorCode, message: String) -> Option<KvError> {
    Some(KvError {
        code: code as i32,
        message,
        leader_id: 0,
        term: 0,
    })
}

impl CoreHandle {
    /// What `Admin.Status` answers, with (as leader) each follower's match index and the
    /// sessions held, for the metrics; `None` if the core is gone.
    async fn full_status(&self) -> Option<(StatusResponse, Vec<(NodeId, LogIndex)>, u64)> {
        let Some(Reply::Status {
            report,
            last_applied,
            log,
            followers,
            sessions,
        }) = self.call(Call::Status).await
        else {
            return None;
        };
        let size = |name: &str| std::fs::metadata(self.data_dir.join(name)).map_or(0, |m| m.len());
        let status = StatusResponse {
            report: Some(report),
            last_applied: last_applied.0,
            rss_bytes: rss_bytes(),
            log_bytes: crate::storage::log_disk_bytes(&self.data_dir),
            snapshot_bytes: size(crate::runtime::SNAPSHOT_RECEIVE_FILE),
            state_bytes: size(crate::runtime::STATE_FILE),
            log_base_index: log.base_index,
            log_entries_held: log.entries_held,
            log_bytes_held: log.bytes_held,
            snapshots_sent: log.snapshots_sent,
            snapshots_installed: log.snapshots_installed,
        };
        Some((status, followers, sessions))
    }

    /// The requests of a batch call (`Kv.PutBatch`, `Kv.GetBatch`), each handled by `handle`
    /// as its own call, all at once, answered in order (a status error becomes that request's
    /// error); a batch of more than [`limits::PUT_BATCH_MAX`] is refused as a whole.
    async fn each_of<Req, Resp, Fut>(
        &self,
        op: &'static str,
        requests: Vec<Req>,
        handle: impl Fn(Req) -> Fut,
    ) -> Result<Vec<Resp>, Status>
    where
        Resp: ErrorField + Default,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        if requests.len() > limits::PUT_BATCH_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch carries at most {} requests, not {}",
                limits::PUT_BATCH_MAX,
                requests.len()
            )));
        }
        let handle = &handle;
        let answers = requests.into_iter().map(|req| async move {
            let started = std::time::Instant::now();
            let r = handle(req).await;
            match self.observe(op, started, r) {
                Ok(resp) => resp.into_inner(),
                Err(status) => {
                    let mut resp = Resp::default();
                    resp.set_error(error_of(
                        ErrorCode::ErrorUnavailable,
                        status.message().to_string(),
                    ));
                    resp
                }
            }
        });
        Ok(futures_util::future::join_all(answers).await)
    }

    /// Counts a client request of `op` answered after `started` and passes the answer on.
    fn observe<T: ErrorField>(
        &self,
        op: &'static str,
        started: std::time::Instant,
        r: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(resp) => resp.get_ref().error_field().map(|e| code_label(e.code)),
            Err(_) => Some("STATUS"),
        };
        self.metrics.request(op, started, code);
        r
    }

    async fn register_in_span(
        &self,
        request: Request<RegisterSessionRequest>,
    ) -> Result<Response<RegisterSessionResponse>, Status> {
        let request = request.into_inner();
        let trace = self.trace_in(&request.trace_token);
        let client_id = request.client_id;
        let mut resp = RegisterSessionResponse::default();
        if let Err(e) = limits::check_client_id(&client_id) {
            resp.error = error_of(ErrorCode::ErrorInvalidArgument, e);
            return Ok(Response::new(resp));
        }
        if let Some(e) = self.disk_full_error() {
            resp.error = Some(e);
            return Ok(Response::new(resp));
        }
        match self.call(Call::Register { client_id }).await {
            Some(Reply::Registered(Ok(id))) => resp.session_id = id,
            Some(Reply::Registered(Err(e))) => resp.error = Some(kv_error(e)),
            _ => resp.error = error_of(ErrorCode::ErrorUnavailable, "shutting down".into()),
        }
        resp.trace_token = self
            .token_out(trace.as_ref(), "RegisterSessionResponse")
            .await;
        Ok(Response::new(resp))
    }

    /// While the log cannot be written, writes are refused at once with the reason (the coord
    /// is told this server does not lead, so a healthy one takes over).
    fn disk_full_error(&self) -> Option<KvError> {
        if !self.disk_full.load(Ordering::Relaxed) {
            return None;
        }
        let msg = format!(
            "server {} cannot write its log (disk full); writes refused until space returns",
            self.id
        );
        error_of(ErrorCode::ErrorUnavailable, msg)
    }
}

#[tonic::async_trait]
impl Kv for CoreHandle {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<WatchResponse, Status>>(watches::STREAM_BUFFER);
        let refuse = |code: ErrorCode, message: String| {
            self.metrics
                .request("watch", started, Some(code_label(code as i32)));
            let first = WatchResponse {
                error: error_of(code, message),
                ..Default::default()
            };
            let stream: Self::WatchStream = Box::pin(tokio_stream::once(Ok(first)));
            Ok(Response::new(stream))
        };
        let end = match range_end(&req.client_id, &req.start, req.end, req.prefix) {
            Ok(end) => end,
            Err(e) => return refuse(ErrorCode::ErrorInvalidArgument, e),
        };
        let Ok(permit) = self.watch.watches.clone().try_acquire_owned() else {
            let e = format!(
                "server {} serves {} watches, its limit; try another server or later",
                self.id,
                watches::WATCHES_MAX
            );
            return refuse(ErrorCode::ErrorUnavailable, e);
        };
        let sub = match self
            .watch
            .subscribe(req.start_revision, (req.start.clone(), end.clone()))
        {
            Ok(s) => s,
            Err(c) => {
                let e = format!(
                    "revision {} is compacted: server {} holds the changes after revision {} \
                     (watch from {} or later, or read the current state and watch from its \
                     revision + 1)",
                    req.start_revision,
                    self.id,
                    c.floor,
                    c.floor + 1
                );
                return refuse(ErrorCode::ErrorCompacted, e);
            }
        };
        if let Some(t) = self.trace_in(&req.trace_token) {
            t.record_action(&act::WatchRecvd {
                client_id: req.client_id.clone(),
                start: act::text(&req.start),
                end: act::text(&end),
                start_revision: req.start_revision,
            });
        }
        let range = (req.start, end);
        let hub = self.watch.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_watch(tx, range, hub, sub).await;
        });
        self.metrics.request("watch", started, None);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn register_session(
        &self,
        request: Request<RegisterSessionRequest>,
    ) -> Result<Response<RegisterSessionResponse>, Status> {
        let started = std::time::Instant::now();
        let r = self.register_in_span(request).await;
        self.observe("register_session", started, r)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let span = kvraft_telemetry::span_if_enabled(|| {
            let r = request.get_ref();
            tracing::info_span!("kv.put", server = self.id.0, client_id = %r.client_id,
                session_id = r.session_id, seq = r.seq, index = tracing::field::Empty)
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        let context = kvraft_telemetry::context_of(&span);
        let started = std::time::Instant::now();
        let r = self
            .put_in_span(request.into_inner(), context)
            .instrument(span)
            .await;
        self.flush_trace(false).await;
        self.observe("put", started, r)
    }

    async fn put_batch(
        &self,
        request: Request<PutBatchRequest>,
    ) -> Result<Response<PutBatchResponse>, Status> {
        // They reach the core in order.
        let puts = request.into_inner().puts;
        let results = self
            .each_of("put", puts, |put| self.put_in_span(put, HashMap::new()))
            .await?;
        self.flush_trace(true).await;
        Ok(Response::new(PutBatchResponse { results }))
    }

    async fn get_batch(
        &self,
        request: Request<GetBatchRequest>,
    ) -> Result<Response<GetBatchResponse>, Status> {
        // The core answers them in one ReadIndex round.
        let gets = request.into_inner().gets;
        let results = self
            .each_of("get", gets, |get| self.get_in_span(get))
            .await?;
        self.flush_trace(true).await;
        Ok(Response::new(GetBatchResponse { results }))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let span = kvraft_telemetry::span_if_enabled(|| {
            let r = request.get_ref();
            tracing::info_span!("kv.txn", server = self.id.0, client_id = %r.client_id,
                session_id = r.session_id, seq = r.seq)
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        let started = std::time::Instant::now();
        let r = self
            .txn_in_span(request.into_inner())
            .instrument(span)
            .await;
        self.observe("txn", started, r)
    }

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let span = kvraft_telemetry::span_if_enabled(|| {
            let r = request.get_ref();
            tracing::info_span!("kv.range", server = self.id.0, client_id = %r.client_id)
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        let started = std::time::Instant::now();
        let r = self
            .range_in_span(request.into_inner())
            .instrument(span)
            .await;
        self.observe("range", started, r)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let span = kvraft_telemetry::span_if_enabled(|| {
            let r = request.get_ref();
            tracing::info_span!("kv.get", server = self.id.0, client_id = %r.client_id)
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        let started = std::time::Instant::now();
        let r = self
            .get_in_span(request.into_inner())
            .instrument(span)
            .await;
        self.flush_trace(false).await;
        self.observe("get", started, r)
    }
}

/// Checks the client id and session fields of a put or a transaction (the core checks them
/// again, and decides; here so nothing invalid is queued for it).
fn check_session_fields(
    client_id: &str,
    session_id: u64,
    seq: u64,
    ack_seq: u64,
) -> Result<(), String> {
    limits::check_client_id(client_id)
        .and_then(|()| limits::check_put_seq(session_id, seq, ack_seq, limits::SESSION_WINDOW_MAX))
}

/// The end of a range or watch request (a prefix's end when `prefix`), checked with the
/// client id; the error names what is wrong.
fn range_end(client_id: &str, start: &[u8], end: Bytes, prefix: bool) -> Result<Bytes, String> {
    let end = match (prefix, end.is_empty()) {
        (true, false) => return Err("a prefix range has no end (leave end empty)".into()),
        (true, true) => Bytes::from(limits::prefix_end(start)),
        (false, _) => end,
    };
    limits::check_client_id(client_id).and_then(|()| limits::check_range(start, &end))?;
    Ok(end)
}

/// The error field of a client response, for the request metrics.
trait ErrorField {
    fn error_field(&self) -> Option<&KvError>;
    fn set_error(&mut self, error: Option<KvError>);
}

macro_rules! error_field {
    ($($t:ty),*) => {$(
        impl ErrorField for $t {
            fn error_field(&self) -> Option<&KvError> {
                self.error.as_ref()
            }
            fn set_error(&mut self, error: Option<KvError>) {
                self.error = error;
            }
        }
    )*};
}

error_field!(
    RegisterSessionResponse,
    PutResponse,
    GetResponse,
    TxnResponse,
    RangeResponse,
    WatchResponse
);

/// The metrics label of an error code: its name without the `ERROR_` prefix.
fn code_label(code: i32) -> &'static str {
    ErrorCode::try_from(code).map_or("UNKNOWN", |c| {
        let name = c.as_str_name();
        name.strip_prefix("ERROR_").unwrap_or(name)
    })
}

impl CoreHandle {
    async fn put_in_span(
        &self,
        req: PutRequest,
        context: HashMap<String, String>,
    ) -> Result<Response<PutResponse>, Status> {
        let mut resp = PutResponse::default();
        // Checked again by the core, which decides; here so nothing invalid is queued for it.
        let valid = check_session_fields(&req.client_id, req.session_id, req.seq, req.ack_seq)
            .and_then(|()| {
                limits::check_key_value_within(&req.key, Some(&req.value), self.max_value_bytes)
            });
        if let Err(e) = valid {
            resp.error = error_of(ErrorCode::ErrorInvalidArgument, e);
            return Ok(Response::new(resp));
        }
        if let Some(e) = self.disk_full_error() {
            resp.error = Some(e);
            return Ok(Response::new(resp));
        }
        let trace = self.trace_in(&req.trace_token);
        let traced = trace.as_ref().map(|t| {
            let key = act::text(&req.key);
            t.record_action(&PutRecvd {
                client_id: req.client_id.clone(),
                session_id: req.session_id,
                seq: req.seq,
                key: key.clone(),
                value: act::text(&req.value),
            });
            (t, key)
        });
        let cmd = PutCommand {
            session_id: req.session_id,
            seq: req.seq,
            ack_seq: req.ack_seq,
            key: owned(&req.key),
            value: owned(&req.value),
        };
        let (session_id, seq) = (cmd.session_id, cmd.seq);
        match self
            .call(Call::Put(cmd, trace.as_ref().map(Trace::id), context))
            .await
        {
            Some(Reply::Write {
                result: Ok(WriteResult::Put(r)),
                duplicate,
            }) => {
                resp.version = r.version;
                resp.index = r.index;
                tracing::Span::current().record("index", r.index);
                if let Some((t, key)) = traced {
                    let client_id = req.client_id;
                    if duplicate {
                        t.record_action(&DuplicateRequestResolved {
                            client_id,
                            session_id,
                            seq,
                            index: r.index,
                        });
                    } else {
                        t.record_action(&PutCommitted {
                            client_id,
                            session_id,
                            seq,
                            key,
                            index: r.index,
                            version: r.version,
                        });
                    }
                }
            }
            Some(Reply::Write { result: Err(e), .. }) => resp.error = Some(kv_error(e)),
            _ => resp.error = error_of(ErrorCode::ErrorUnavailable, "shutting down".into()),
        }
        // Flushed by the caller (`put`, `put_batch`) before the answer leaves.
        resp.trace_token = kvraft_tracing::token(trace.as_ref(), "PutResponse");
        Ok(Response::new(resp))
    }

    async fn txn_in_span(&self, req: TxnRequest) -> Result<Response<TxnResponse>, Status> {
        let mut resp = TxnResponse::default();
        // Checked again by the core, which decides; here so nothing invalid is queued for it.
        let valid = check_session_fields(&req.client_id, req.session_id, req.seq, req.ack_seq)
            .and_then(|()| {
                limits::check_txn(
                    &req.compare,
                    &req.success,
                    &req.failure,
                    self.max_value_bytes,
                )
            });
        if let Err(e) = valid {
            resp.error = error_of(ErrorCode::ErrorInvalidArgument, e);
            return Ok(Response::new(resp));
        }
        if let Some(e) = self.disk_full_error() {
            resp.error = Some(e);
            return Ok(Response::new(resp));
        }
        let trace = self.trace_in(&req.trace_token);
        if let Some(t) = &trace {
            t.record_action(&act::TxnRecvd {
                client_id: req.client_id.clone(),
                session_id: req.session_id,
                seq: req.seq,
                compares: req.compare.len() as u64,
                ops: (req.success.len() + req.failure.len()) as u64,
            });
        }
        // Only when traced: an untraced request copies nothing for it.
        let traced = trace
            .as_ref()
            .map(|_| (req.client_id.clone(), req.session_id, req.seq));
        let cmd = TxnCommand {
            session_id: req.session_id,
            seq: req.seq,
            ack_seq: req.ack_seq,
            compare: req.compare.into_iter().map(owned_compare).collect(),
            success: req.success.into_iter().map(owned_op).collect(),
            failure: req.failure.into_iter().map(owned_op).collect(),
            read_bytes_max: 0, // the core sets it
        };
        match self.call(Call::Txn(cmd)).await {
            Some(Reply::Write {
                result: Ok(WriteResult::Txn(r)),
                ..
            }) => {
                resp.succeeded = r.succeeded;
                resp.revision = r.revision;
                resp.results = r.results.iter().map(txn_op_result).collect();
            }
            Some(Reply::Write { result: Err(e), .. }) => resp.error = Some(kv_error(e)),
            _ => resp.error = error_of(ErrorCode::ErrorUnavailable, "shutting down".into()),
        }
        if let (Some(t), Some((client_id, session_id, seq)), None) = (&trace, traced, &resp.error) {
            t.record_action(&act::TxnResult {
                client_id,
                session_id,
                seq,
                succeeded: resp.succeeded,
                revision: resp.revision,
            });
        }
        resp.trace_token = self.token_out(trace.as_ref(), "TxnResponse").await;
        Ok(Response::new(resp))
    }

    async fn range_in_span(&self, req: RangeRequest) -> Result<Response<RangeResponse>, Status> {
        let mut resp = RangeResponse::default();
        let end = match range_end(&req.client_id, &req.start, req.end, req.prefix) {
            Ok(end) => end,
            Err(e) => {
                resp.error = error_of(ErrorCode::ErrorInvalidArgument, e);
                return Ok(Response::new(resp));
            }
        };
        let trace = self.trace_in(&req.trace_token);
        if let Some(t) = &trace {
            t.record_action(&act::RangeRecvd {
                client_id: req.client_id.clone(),
                start: act::text(&req.start),
                end: act::text(&end),
                limit: req.limit,
            });
        }
        let traced_client = trace.as_ref().map(|_| req.client_id.clone());
        let query = RangeQuery {
            start: req.start,
            end,
            limit: req.limit,
            keys_only: req.keys_only,
            revision: req.revision,
        };
        match self.call(Call::Range(query)).await {
            Some(Reply::Range(Ok((page, revision)))) => {
                resp.revision = revision;
                resp.more = page.more;
                resp.next_key = page.next_key;
                resp.kvs = page.kvs.into_iter().map(|(k, v)| key_value(k, v)).collect();
            }
            Some(Reply::Range(Err(e))) => resp.error = Some(kv_error(e)),
            _ => resp.error = error_of(ErrorCode::ErrorUnavailable, "shutting down".into()),
        }
        if let (Some(t), Some(client_id), None) = (&trace, traced_client, &resp.error) {
            t.record_action(&act::RangeResult {
                client_id,
                keys: resp.kvs.len() as u64,
                more: resp.more,
                revision: resp.revision,
            });
        }
        resp.trace_token = self.token_out(trace.as_ref(), "RangeResponse").await;
        Ok(Response::new(resp))
    }

    async fn get_in_span(&self, req: GetRequest) -> Result<Response<GetResponse>, Status> {
        let mut resp = GetResponse::default();
        let valid = limits::check_client_id(&req.client_id)
            .and_then(|()| limits::check_key_value(&req.key, None));
        if let Err(e) = valid {
            resp.error = error_of(ErrorCode::ErrorInvalidArgument, e);
            return Ok(Response::new(resp));
        }
        let trace = self.trace_in(&req.trace_token);
        let key_text = trace.as_ref().map(|t| {
            let key = act::text(&req.key);
            t.record_action(&GetRecvd {
                client_id: req.client_id.clone(),
                key: key.clone(),
            });
            key
        });
        match self.call(Call::Get(req.key)).await {
            Some(Reply::Get(Ok(read))) => {
                resp.revision = read.revision;
                if let Some(v) = read.value {
                    resp.found = true;
                    resp.value = v.value;
                    resp.version = v.version;
                    resp.create_revision = v.create_revision;
                    resp.mod_revision = v.mod_revision;
                }
            }
            Some(Reply::Get(Err(e))) => resp.error = Some(kv_error(e)),
            _ => resp.error = error_of(ErrorCode::ErrorUnavailable, "shutting down".into()),
        }
        if let (Some(t), Some(key)) = (&trace, key_text) {
            if resp.error.is_none() {
                t.record_action(&GetResult {
                    client_id: req.client_id,
                    key,
                    found: resp.found,
                    value: act::text(&resp.value),
                });
            }
        }
        // Flushed by the caller (`get`, `get_batch`) before the answer leaves.
        resp.trace_token = kvraft_tracing::token(trace.as_ref(), "GetResponse");
        Ok(Response::new(resp))
    }
}

/// Chunk size the digest reads the state in (its value does not change the digest: records
/// are whole in every chunk and hashed in order).
const DIGEST_CHUNK_BYTES: usize = 1024 * 1024;

#[tonic::async_trait]
impl Admin for CoreHandle {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let (status, ..) = self.full_status().await.ok_or_else(unavailable)?;
        Ok(Response::new(status))
    }

    async fn digest(&self, _: Request<DigestRequest>) -> Result<Response<DigestResponse>, Status> {
        let Ok(_permit) = self.digests.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "a digest of this server's state is already being computed; ask again after it",
            ));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(crate::runtime::Input::View(tx)).await.is_err() {
            return Err(unavailable());
        }
        let mut view = rx
            .await
            .map_err(|_| unavailable())?
            .map_err(|e| Status::internal(e.to_string()))?;
        let digest = tokio::task::spawn_blocking(move || {
            let meta = view.meta();
            let mut resp = DigestResponse {
                applied_index: meta.index,
                applied_term: meta.term,
                digest: FNV_OFFSET,
                bytes: 0,
            };
            while let Some(chunk) = view.next_chunk(DIGEST_CHUNK_BYTES)? {
                resp.digest = fnv1a(resp.digest, &chunk);
                resp.bytes += chunk.len() as u64;
            }
            Ok::<_, crate::engine::EngineError>(resp)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(digest))
    }

    async fn set_faults(
        &self,
        request: Request<FaultRequest>,
    ) -> Result<Response<FaultResponse>, Status> {
        if !self.fault_injection_allowed {
            return Err(fault_injection_denied(self.id));
        }
        let req = request.into_inner();
        let spec = FaultSpec {
            partition_coord: Duration::from_millis(req.partition_coord_ms),
            partition_peers: req.partition_peers.iter().map(|&p| NodeId(p)).collect(),
            partition_peers_for: Duration::from_millis(req.partition_peers_ms),
            crash_after_commit: req.crash_after_commit,
            delay: Duration::from_millis(req.delay_ms),
            disk_full: req.disk_full,
            one_way: req.one_way,
            crash_after_snapshot_install: req.crash_after_snapshot_install,
        };
        tracing::warn!(server = %self.id, ?spec, "fault injection set");
        self.faults.set(&spec);
        Ok(Response::new(FaultResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn within(buffer: &Bytes, part: &Bytes) -> bool {
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        range.contains(&(part.as_ptr() as usize))
    }

    /// Decoded keys and values are slices of the receive buffer; owned copies let the buffer go
    /// (the leader's memory grew by the buffer size per put before).
    #[test]
    fn entries_are_copied_out_of_the_receive_buffer() {
        let put = PutCommand {
            session_id: 1,
            seq: 1,
            ack_seq: 1,
            key: Bytes::from("key"),
            value: Bytes::from(vec![7u8; 128]),
        };
        let req = AppendEntriesRequest {
            entries: vec![LogEntry {
                term: 1,
                index: 1,
                time_ms: 0,
                payload: Some(kvraft_proto::log_entry::Payload::Put(put)),
            }],
            ..Default::default()
        };
        let buffer = Bytes::from(req.encode_to_vec());
        let mut decoded = AppendEntriesRequest::decode(buffer.clone()).expect("decodes");
        let value = |r: &AppendEntriesRequest| match &r.entries[0].payload {
            Some(kvraft_proto::log_entry::Payload::Put(p)) => (p.key.clone(), p.value.clone()),
            _ => unreachable!(),
        };
        let (key, val) = value(&decoded);
        assert!(
            within(&buffer, &key) && within(&buffer, &val),
            "zero-copy decode"
        );
        own_entries(&mut decoded);
        let (key, val) = value(&decoded);
        assert!(!within(&buffer, &key) && !within(&buffer, &val));
        assert_eq!((&key[..], val.len()), (&b"key"[..], 128));
        assert!(!within(&buffer, &owned(&buffer.slice(0..4))));
    }
}
