//! [`Watch`]: every change of a key range from a revision on, delivered in revision order,
//! exactly once, through failovers.
//!
//! ```text
//!   Client::watch(start, end, from) ─▶ router: open Kv.Watch on the leader ─▶ header
//!   next(): events of one revision at a time ─▶ caller
//!   stream breaks / server canceled the watch (slow reader, snapshot) ─▶ open again on the
//!     leader from `next_revision` (the first revision not yet delivered) ─▶ no gap, no repeat
//!   ERROR_COMPACTED (the leader no longer holds that revision) ─▶ the other servers in turn
//!     (each keeps its own recent history) ─▶ Error::Rejected if none holds it
//! ```
//!
//! Every server applies the same entries and keeps the same recent changes, so resuming on
//! another server from the first undelivered revision gives exactly the changes missed.

use std::collections::VecDeque;

use kvraft_proto as pb;
use prost::bytes::Bytes;
use std::time::Duration;
use tokio::time::Instant;

/// Bounds of the wait before reopening a watch whose stream ended without delivering.
const REOPEN_BACKOFF_INITIAL_MS: u64 = 20;
const REOPEN_BACKOFF_MAX_MS: u64 = 250;

use crate::backoff::Backoff;
use crate::failure::Failure;
use crate::{Client, Error, Versioned};

/// What happened to a watched key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of a watched key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: Vec<u8>,
    /// A put: the new value and counters. A delete: empty, with `mod_revision` the delete's
    /// revision.
    pub value: Versioned,
    /// The revision of the change (the log index of the entry that made it).
    pub revision: u64,
}

/// An open watch (see the module docs). Dropping it ends the stream on the server.
pub struct Watch {
    client: Client,
    start: Bytes,
    end: Bytes,
    /// The first revision not yet delivered; 0 until the first header says where "now" is.
    next_revision: u64,
    stream: Option<tonic::Streaming<pb::WatchResponse>>,
    ready: VecDeque<WatchEvent>,
    /// Waits between reopenings of a stream that ended before delivering anything (a server
    /// stopping, say), so a watch does not spin; reset by a delivered event.
    backoff: Backoff,
    delivered_since_open: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("next_revision", &self.next_revision)
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(crate) fn new(client: Client, start: Vec<u8>, end: Vec<u8>, from_revision: u64) -> Watch {
        Watch {
            client,
            start: start.into(),
            end: end.into(),
            next_revision: from_revision,
            stream: None,
            ready: VecDeque::new(),
            backoff: Backoff::new(
                Duration::from_millis(REOPEN_BACKOFF_INITIAL_MS),
                Duration::from_millis(REOPEN_BACKOFF_MAX_MS),
            ),
            delivered_since_open: false,
        }
    }

    /// The first revision not yet delivered (0 before the watch is set up from "now").
    pub fn next_revision(&self) -> u64 {
        self.next_revision
    }

    /// Sets the watch up (it is set up by the first [`Watch::next`] otherwise): after this,
    /// every change with a revision at or above [`Watch::next_revision`] is delivered.
    pub async fn start(&mut self) -> Result<(), Error> {
        if self.stream.is_none() {
            self.open().await?;
        }
        Ok(())
    }

    /// The next change. Waits for one as long as it takes; an error only when the watch
    /// cannot go on: the revision to resume from is compacted everywhere it was tried
    /// (`Rejected`), or no server took the watch within `client.op_timeout_ms` (`Timeout`).
    pub async fn next(&mut self) -> Result<WatchEvent, Error> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            if self.stream.is_none() {
                self.open().await?;
            }
            let stream = self.stream.as_mut().expect("invariant: just opened");
            match stream.message().await {
                Ok(Some(resp)) => self.take(resp),
                // The server went away or stopped serving: resume elsewhere.
                Ok(None) | Err(_) => {
                    self.stream = None;
                    if !self.delivered_since_open {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    fn take(&mut self, resp: pb::WatchResponse) {
        if resp.canceled {
            self.next_revision = self.next_revision.max(resp.resume_revision);
            self.stream = None;
            return;
        }
        if resp.revision < self.next_revision || resp.events.is_empty() {
            return; // already delivered (a server that replays from earlier), or a header
        }
        for event in resp.events {
            let kv = event.kv.unwrap_or_default();
            let kind = if event.kind == pb::watch_event::Kind::Delete as i32 {
                EventKind::Delete
            } else {
                EventKind::Put
            };
            self.ready.push_back(WatchEvent {
                kind,
                key: kv.key.to_vec(),
                value: crate::txn::versioned_of(&kv),
                revision: resp.revision,
            });
        }
        self.next_revision = resp.revision + 1;
        self.delivered_since_open = true;
        self.backoff.reset();
    }

    /// Opens the stream on the leader (as the router finds it) and reads its header. If the
    /// leader no longer holds the revision to resume from, the other servers are asked in
    /// turn: each keeps its own recent history (a server that restarted holds less of it than
    /// one that did not), and any of them delivers the same changes.
    async fn open(&mut self) -> Result<(), Error> {
        let inner = &self.client.inner;
        let deadline = Instant::now() + inner.op_timeout;
        let limit = inner.grpc_message_bytes;
        let (start, end, from) = (self.start.clone(), self.end.clone(), self.next_revision);
        let client_id = inner.client_id.clone();
        // One trace per (re)opening: the request's token reaches the server's WatchRecvd; the
        // events the stream delivers are not traced.
        let trace = inner.router.tracer().map(|t| {
            let trace = t.create_trace();
            trace.record_action(&kvraft_tracing::action::Watch {
                client_id: client_id.clone(),
                start: kvraft_tracing::action::text(&start),
                end: kvraft_tracing::action::text(&end),
                start_revision: from,
            });
            trace
        });
        let request = pb::WatchRequest {
            client_id,
            start,
            end,
            prefix: false,
            start_revision: from,
            trace_token: Bytes::new(),
        };
        let with_token = |request: &pb::WatchRequest| pb::WatchRequest {
            trace_token: kvraft_tracing::token(trace.as_ref(), "WatchRequest"),
            ..request.clone()
        };
        let opened = inner
            .router
            .call("Watch", deadline, |channel, addr| {
                open_at(channel, addr, with_token(&request), trace.clone(), limit)
            })
            .await?;
        let (stream, header) = match opened {
            Opened::Stream(opened) => *opened,
            Opened::Compacted { addr, message } => {
                let mut refusals = vec![message];
                let mut found = None;
                for other in inner.router.server_addrs() {
                    if other == addr || Instant::now() >= deadline {
                        continue;
                    }
                    let Ok(channel) = inner.router.channel(&other) else {
                        continue;
                    };
                    let attempt =
                        open_at(channel, other, with_token(&request), trace.clone(), limit);
                    match tokio::time::timeout(inner.router.attempt_timeout(), attempt).await {
                        Ok(Ok(Opened::Stream(opened))) => {
                            found = Some(*opened);
                            break;
                        }
                        Ok(Ok(Opened::Compacted { message, .. })) => refusals.push(message),
                        Ok(Err(_)) | Err(_) => {} // unreachable or slow: the next one
                    }
                }
                found.ok_or_else(|| Error::Rejected(refusals.join("; ")))?
            }
        };
        if self.next_revision == 0 {
            self.next_revision = header.revision + 1;
        }
        self.stream = Some(stream);
        self.delivered_since_open = false;
        Ok(())
    }
}

/// A watch opened on one server, or its refusal because it no longer holds the revision.
enum Opened {
    Stream(Box<(tonic::Streaming<pb::WatchResponse>, pb::WatchResponse)>),
    Compacted { addr: String, message: String },
}

/// Opens `request` on the server at `addr` and reads the stream's header.
async fn open_at(
    channel: tonic::transport::Channel,
    addr: String,
    request: pb::WatchRequest,
    trace: Option<kvraft_tracing::Trace>,
    limit: usize,
) -> Result<Opened, Failure> {
    if let Some(t) = &trace {
        t.tracer().flush().await;
    }
    let mut kv = crate::client::kv_client(channel, limit);
    let mut stream = kv
        .watch(request)
        .await
        .map_err(|s| Failure::from_status(&s, &addr))?
        .into_inner();
    let header = match stream.message().await {
        Ok(Some(first)) => first,
        Ok(None) => {
            let e = format!("server {addr}: the watch stream ended at once");
            return Err(Failure::Retry(e));
        }
        Err(status) => return Err(Failure::from_status(&status, &addr)),
    };
    if let Some(error) = &header.error {
        if error.code == pb::ErrorCode::ErrorCompacted as i32 {
            let message = format!("server {addr}: {}", error.message);
            return Ok(Opened::Compacted { addr, message });
        }
    }
    if let Some(failure) = Failure::from_kv_error(header.error.as_ref(), &addr) {
        return Err(failure);
    }
    Ok(Opened::Stream(Box::new((stream, header))))
}
