//! Puts and gets to one server carried several per call: what queues while earlier calls are
//! in flight goes in the next `Kv.PutBatch` / `Kv.GetBatch`.
//!
//! ```text
//!   attempt ─(request, channel, reply)─▶ lane of (kind, server address) (bounded queue)
//!     lane: take one, then whatever else queued (≤ PUT_BATCH_MAX, ≤ the message size)
//!           ─▶ at most CALLS_IN_FLIGHT calls at once: 1 request: Kv.Put / Kv.Get;
//!              more: Kv.PutBatch / Kv.GetBatch
//!           ─▶ each answer to its own attempt (a failed call fails every request it carried)
//! ```
//!
//! Nothing waits for a batch to fill: a put goes out at once (after one yield to the
//! scheduler, so requests queued by tasks woken together go together) when fewer than
//! [`CALLS_IN_FLIGHT`] calls are in flight, so one put at a time costs what it did, and under
//! load each call carries what arrived during the previous ones, or during [`HOLD`] at most:
//! every queued put is sent within it (calls in flight stay bounded by the puts in flight). Every put keeps its own
//! attempt: its session, seq and trace token, its retries and its failover are the router's,
//! as before; only the transport is shared (a put sent in a batch does not carry its own
//! OpenTelemetry context to the server; one sent alone does). An attempt given up on (the
//! router moved to another leader) just drops its reply. With tracing on, the lane flushes the
//! tracer once before each call (one spool write for all the requests it carries), so a
//! request's trace token leaves after the events it covers are safe, and the callers do not
//! flush one by one (each did, with a yield, and traced calls carried half as many puts).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use kvraft_common::limits::PUT_BATCH_MAX;
use kvraft_proto as pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::client::kv_client;
use kvraft_proto::kv_client::KvClient;
use kvraft_tracing::Tracer;
use tonic::transport::Channel;

/// Calls to one server in flight at once before a put waits for one to end...
pub const CALLS_IN_FLIGHT: usize = 4;
/// ...and how long it waits at most, gathering the puts that queue meanwhile. A bound is
/// needed for liveness: a call's answer may wait for puts queued behind it (the server
/// applies a session's puts in seq order, so a batch holding seq 10 is answered only once
/// seq 9 is applied), and with no bound at 256 puts in flight every call waited for puts that
/// waited for a call.
const HOLD: std::time::Duration = std::time::Duration::from_millis(1);
/// Puts queued for one server (kvslib holds at most `PUTS_IN_FLIGHT_MAX` puts in all).
const LANE_QUEUE: usize = crate::client::PUTS_IN_FLIGHT_MAX;

/// A request kind that a lane carries: its single call and its batch call.
pub(crate) trait Kind: Send + 'static {
    type Req: Message + Send + 'static;
    type Resp: Send + 'static;
    fn one(
        client: KvClient<Channel>,
        req: tonic::Request<Self::Req>,
    ) -> impl Future<Output = Result<Self::Resp, tonic::Status>> + Send;
    fn many(
        client: KvClient<Channel>,
        reqs: Vec<Self::Req>,
    ) -> impl Future<Output = Result<Vec<Self::Resp>, tonic::Status>> + Send;
}

pub(crate) struct Puts;
pub(crate) struct Gets;

impl Kind for Puts {
    type Req = pb::PutRequest;
    type Resp = pb::PutResponse;
    async fn one(
        mut client: KvClient<Channel>,
        req: tonic::Request<pb::PutRequest>,
    ) -> Result<pb::PutResponse, tonic::Status> {
        client.put(req).await.map(tonic::Response::into_inner)
    }
    async fn many(
        mut client: KvClient<Channel>,
        puts: Vec<pb::PutRequest>,
    ) -> Result<Vec<pb::PutResponse>, tonic::Status> {
        let resp = client.put_batch(pb::PutBatchRequest { puts }).await?;
        Ok(resp.into_inner().results)
    }
}

impl Kind for Gets {
    type Req = pb::GetRequest;
    type Resp = pb::GetResponse;
    async fn one(
        mut client: KvClient<Channel>,
        req: tonic::Request<pb::GetRequest>,
    ) -> Result<pb::GetResponse, tonic::Status> {
        client.get(req).await.map(tonic::Response::into_inner)
    }
    async fn many(
        mut client: KvClient<Channel>,
        gets: Vec<pb::GetRequest>,
    ) -> Result<Vec<pb::GetResponse>, tonic::Status> {
        let resp = client.get_batch(pb::GetBatchRequest { gets }).await?;
        Ok(resp.into_inner().results)
    }
}

type Answer<K> = Result<<K as Kind>::Resp, tonic::Status>;

struct Queued<K: Kind> {
    /// With its metadata (the OpenTelemetry context), which only a request sent alone keeps.
    request: tonic::Request<K::Req>,
    channel: Channel,
    reply: oneshot::Sender<Answer<K>>,
}

/// The lanes of one client for one kind, one per server address (at most the cluster's
/// servers).
pub(crate) struct Batcher<K: Kind> {
    lanes: Mutex<HashMap<String, mpsc::Sender<Queued<K>>>>,
    /// The gRPC message limit: a call carries at most this many bytes of requests.
    limit: usize,
    /// The client's tracer (tracing on): a lane flushes it once before each call, so the trace
    /// tokens of every request the call carries leave after the events they cover are safe
    /// (see `kvraft_tracing::tracer`), and the callers do not each flush.
    tracer: Option<Tracer>,
}

impl<K: Kind> Batcher<K> {
    pub(crate) fn new(limit: usize, tracer: Option<Tracer>) -> Arc<Batcher<K>> {
        Arc::new(Batcher {
            lanes: Mutex::new(HashMap::new()),
            limit,
            tracer,
        })
    }

    /// Sends `request` to `addr` over `channel`, alone or with others queued for it.
    pub(crate) async fn call(
        &self,
        channel: Channel,
        addr: &str,
        request: tonic::Request<K::Req>,
    ) -> Result<tonic::Response<K::Resp>, tonic::Status> {
        let lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let lane = lanes.get(addr).filter(|l| !l.is_closed()).cloned();
            lane.unwrap_or_else(|| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                tokio::spawn(run_lane::<K>(rx, self.limit, self.tracer.clone()));
                lanes.insert(addr.to_string(), tx.clone());
                tx
            })
        };
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            request,
            channel,
            reply,
        };
        let gone = || tonic::Status::unavailable("the request lane stopped");
        lane.send(queued).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map(tonic::Response::new)
    }
}

/// Sends what queues for one server, batching what arrives while calls are in flight; ends
/// when the client is dropped (every sender gone).
async fn run_lane<K: Kind>(
    mut rx: mpsc::Receiver<Queued<K>>,
    limit: usize,
    tracer: Option<Tracer>,
) {
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    // A budget well under the message limit: the encoding adds a few bytes per put.
    let budget = limit.saturating_sub(64 * 1024).max(1);
    let mut carried: Option<Queued<K>> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let permit = match tokio::time::timeout(HOLD, calls.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) => return,
            // Every call is slow: this one goes anyway, with what queued meanwhile.
            Err(_) => None,
        };
        // Let the tasks woken with this request run first: the callers of a batch that was
        // just answered are woken together and each queues its next request at once, so after
        // one turn of the scheduler they go in one call instead of the first alone (a yield,
        // not a timer: with nothing else to run it costs nothing).
        tokio::task::yield_now().await;
        let mut bytes = first.request.get_ref().encoded_len();
        let mut batch = vec![first];
        while batch.len() < PUT_BATCH_MAX {
            let Ok(next) = rx.try_recv() else { break };
            let len = next.request.get_ref().encoded_len();
            if bytes + len > budget {
                carried = Some(next);
                break;
            }
            bytes += len;
            batch.push(next);
        }
        let tracer = tracer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(t) = &tracer {
                t.flush_now().await;
            }
            send::<K>(batch, limit).await;
        });
    }
}

/// One call carrying `batch`; every request gets its own answer.
async fn send<K: Kind>(mut batch: Vec<Queued<K>>, limit: usize) {
    // An attempt given up on while it queued (the router moved on) is not sent.
    batch.retain(|q| !q.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    if batch.len() == 1 {
        let q = batch.pop().expect("invariant: one request");
        let answer = K::one(kv_client(q.channel, limit), q.request).await;
        let _ = q.reply.send(answer);
        return;
    }
    let channel = batch[0].channel.clone();
    let mut replies = Vec::with_capacity(batch.len());
    let mut requests = Vec::with_capacity(batch.len());
    for q in batch {
        requests.push(q.request.into_inner());
        replies.push(q.reply);
    }
    let asked = requests.len();
    let status = match K::many(kv_client(channel, limit), requests).await {
        Ok(results) if results.len() == asked => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
            return;
        }
        Ok(results) => tonic::Status::internal(format!(
            "a batch of {asked} requests was answered with {} results",
            results.len()
        )),
        Err(status) => status,
    };
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}
