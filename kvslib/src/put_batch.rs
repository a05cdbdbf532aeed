//! Puts to one server carried several per call: what queues while earlier calls are in flight
//! goes in the next `Kv.PutBatch`.
//!
//! ```text
//!   put attempt ─(request, channel, reply)─▶ lane of the server's address (bounded queue)
//!     lane: take one, then whatever else queued (≤ PUT_BATCH_MAX, ≤ the message size)
//!           ─▶ at most CALLS_IN_FLIGHT calls at once: 1 put: Kv.Put; more: Kv.PutBatch
//!           ─▶ each answer to its own attempt (a failed call fails every put it carried)
//! ```
//!
//! Nothing waits for a batch to fill: a put goes out at once when fewer than
//! [`CALLS_IN_FLIGHT`] calls are in flight, so one put at a time costs what it did, and under
//! load each call carries what arrived during the previous ones, or during [`HOLD`] at most:
//! every queued put is sent within it (calls in flight stay bounded by the puts in flight). Every put keeps its own
//! attempt: its session, seq and trace token, its retries and its failover are the router's,
//! as before; only the transport is shared (a put sent in a batch does not carry its own
//! OpenTelemetry context to the server; one sent alone does). An attempt given up on (the
//! router moved to another leader) just drops its reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvraft_common::limits::PUT_BATCH_MAX;
use kvraft_proto as pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::client::kv_client;

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

type Answer = Result<pb::PutResponse, tonic::Status>;

struct Queued {
    /// With its metadata (the OpenTelemetry context), which only a put sent alone keeps.
    request: tonic::Request<pb::PutRequest>,
    channel: tonic::transport::Channel,
    reply: oneshot::Sender<Answer>,
}

/// The lanes of one client, one per server address (at most the cluster's servers).
pub(crate) struct PutBatcher {
    lanes: Mutex<HashMap<String, mpsc::Sender<Queued>>>,
    /// The gRPC message limit: a call carries at most this many bytes of puts.
    limit: usize,
}

impl PutBatcher {
    pub(crate) fn new(limit: usize) -> Arc<PutBatcher> {
        Arc::new(PutBatcher {
            lanes: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// Sends `request` to `addr` over `channel`, alone or with others queued for it.
    pub(crate) async fn put(
        &self,
        channel: tonic::transport::Channel,
        addr: &str,
        request: tonic::Request<pb::PutRequest>,
    ) -> Result<tonic::Response<pb::PutResponse>, tonic::Status> {
        let lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let lane = lanes.get(addr).filter(|l| !l.is_closed()).cloned();
            lane.unwrap_or_else(|| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                tokio::spawn(run_lane(rx, self.limit));
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
        let gone = || tonic::Status::unavailable("the put lane stopped");
        lane.send(queued).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map(tonic::Response::new)
    }
}

/// Sends what queues for one server, batching what arrives while calls are in flight; ends
/// when the client is dropped (every sender gone).
async fn run_lane(mut rx: mpsc::Receiver<Queued>, limit: usize) {
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    // A budget well under the message limit: the encoding adds a few bytes per put.
    let budget = limit.saturating_sub(64 * 1024).max(1);
    let mut carried: Option<Queued> = None;
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
        tokio::spawn(async move {
            let _permit = permit;
            send(batch, limit).await;
        });
    }
}

/// One call carrying `batch`; every put gets its own answer.
async fn send(mut batch: Vec<Queued>, limit: usize) {
    if batch.len() == 1 {
        let q = batch.pop().expect("invariant: one put");
        let answer = kv_client(q.channel, limit)
            .put(q.request)
            .await
            .map(tonic::Response::into_inner);
        let _ = q.reply.send(answer);
        return;
    }
    let channel = batch[0].channel.clone();
    let mut replies = Vec::with_capacity(batch.len());
    let mut puts = Vec::with_capacity(batch.len());
    for q in batch {
        puts.push(q.request.into_inner());
        replies.push(q.reply);
    }
    let asked = puts.len();
    match kv_client(channel, limit)
        .put_batch(pb::PutBatchRequest { puts })
        .await
    {
        Ok(resp) => {
            let results = resp.into_inner().results;
            if results.len() != asked {
                let status = tonic::Status::internal(format!(
                    "a PutBatch of {asked} puts was answered with {} results",
                    results.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
