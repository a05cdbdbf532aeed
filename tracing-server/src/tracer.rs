//! The tracer a process links: records actions stamped with its vector clock and ships them,
//! in batches, to the tracing server.
//!
//! ```text
//!  record_action / generate_token / receive_token        shipper thread (own tokio runtime)
//!        │  (tick clock, push event)                            │
//!        ▼                                                      ▼
//!   bounded queue (EVENTS_BUFFERED_MAX) ── batch ≤ BATCH_EVENTS_MAX ──▶ Tracing.ShipEncoded
//!        ▲ full: the recorder waits (backpressure)              │ retried until stored
//!        └──────────────── space ◀──────────────────────────────┘ shipped watermark ──▶ flush()
//! ```
//!
//! Invariants:
//! - Every event is shipped, in recording order, exactly once as far as the log is concerned
//!   (the server drops a resent event it already stored). Nothing is ever dropped: a full queue
//!   blocks the recording thread until the shipper makes room.
//! - Clock updates and queueing happen under one lock, so queue order is clock order.
//! - A token must only leave the process once the events it covers are safe from a SIGKILL
//!   ([`Tracer::flush`]): written to the process's spool file (see [`crate::spool`]), or, with
//!   no spool, stored by the tracing server. A process killed with SIGKILL then loses only
//!   events no other process has seen: its next incarnation ships what the spool holds and
//!   the server lacks, then resumes its clock after it, and the tracing server reads the spool
//!   of a process that never comes back. No counter anyone refers to is ever reused.
//! - The shipper runs on its own OS thread, so a recorder blocked on a full queue never stalls
//!   the shipping it waits for, whatever runtime the caller uses.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvraft_proto::tracing_client::TracingClient;
use kvraft_proto::{EncodedEventBatch, ResumeRequest};
use prost::bytes::{Bytes, BytesMut};
use tokio::sync::{oneshot, watch, Notify};

use crate::action::{Action, GenerateTokenTrace, ReceiveTokenTrace};
use crate::spool::{self, SpoolWriter};
use crate::vclock::VClock;

/// Events recorded but not yet handed to the shipper. At ~200 bytes an event this bounds the
/// memory to a few MiB; a recorder finding it full waits (events are never dropped).
pub const EVENTS_BUFFERED_MAX: usize = 16 * 1024;
/// Most events in one `Ship` call: bounds the message size (~1 MiB) and the work repeated when
/// an answer is lost.
pub const BATCH_EVENTS_MAX: usize = 4096;
/// With a spool, shipping is off every message's path: the shipper lets events gather this
/// long before it ships a batch smaller than [`SHIP_EAGER_EVENTS`], so a busy process sends
/// about fifty batches a second instead of one per event (each costs both ends a round of
/// syscalls, wakeups and framing; the tracing server one more thread hop and two file writes).
/// 20 ms against 5 ms, traced puts at 64 in flight: tracing server 18–20 against 23–30 µs of
/// CPU per put. Only the logs' freshness depends on it: tokens wait for the spool, not this.
pub const SHIP_LINGER_MS: u64 = 20;
/// A batch at least this large ships at once.
pub const SHIP_EAGER_EVENTS: usize = 1024;
/// How long a starting tracer keeps trying to reach the tracing server for its clock.
pub const RESUME_DEADLINE_MS: u64 = 10_000;
/// Retry pacing when the tracing server cannot be reached.
const RETRY_INITIAL_MS: u64 = 20;
const RETRY_MAX_MS: u64 = 1_000;
/// How long `close` waits for the last events to be shipped: a process stopping while the
/// tracing server is gone must still stop (the events it loses were seen by nobody else).
pub const CLOSE_FLUSH_MS: u64 = 3_000;
/// Largest gRPC message to the tracing server.
const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("tracing.server_addr {addr:?} is not usable: {message}")]
    BadAddress { addr: String, message: String },
    #[error(
        "cannot reach the tracing server at {addr} within {RESUME_DEADLINE_MS} ms to resume the \
         clock of {identity} (start tracing-server first, or set tracing.enabled = false): {message}"
    )]
    Unreachable {
        addr: String,
        identity: String,
        message: String,
    },
    #[error("cannot start the trace shipping thread: {0}")]
    Thread(std::io::Error),
}

/// One process's tracer. Cheap to clone; all clones share the clock and the queue.
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

struct Inner {
    identity: String,
    state: Mutex<State>,
    /// Recorders wait here while the queue is full.
    space: Condvar,
    /// The shipper waits here while the queue is empty (a tokio `Notify`, so its runtime keeps
    /// serving the connection meanwhile).
    work: Notify,
    /// Sequence number of the last event the tracing server has stored.
    shipped: watch::Sender<u64>,
}

struct State {
    clock: VClock,
    /// Encoded `TraceEvent`s back to back, in recording order: each is encoded once, for the
    /// spool and the wire, into this one buffer. An event costs no allocation of its own, and
    /// a shipped batch is one allocation freed by the shipper (one per event, each freed on
    /// the shipper's thread, made the recording threads wait on the allocator's locks).
    queue: BytesMut,
    /// The length of each event in `queue`, in order: how many are queued.
    queued: VecDeque<u32>,
    /// Where events are written before a token covering them leaves; `None` without a spool
    /// directory, or after a spool write failed (tokens then wait for the tracing server).
    spool: Option<SpoolWriter>,
    /// Events recorded so far by this incarnation (the sequence number of the last one).
    recorded: u64,
    /// Set by `close`: the shipper drains the queue and exits.
    closed: bool,
}

/// A trace: a random id naming one causal story (a client operation, an epoch change), and
/// the tracer that records its events.
#[derive(Clone, Debug)]
pub struct Trace {
    id: u64,
    tracer: Tracer,
}

impl Tracer {
    /// Starts a tracer named `identity` (`coord`, `server1`, `client1`): asks the tracing
    /// server at `addr` where this identity's clock left off (a restarted process continues
    /// it) and starts the shipper.
    pub async fn connect(identity: &str, addr: &str) -> Result<Tracer, TracerError> {
        Self::connect_spooled(identity, addr, None).await
    }

    /// [`Tracer::connect`] with a spool in `spool_dir`: tokens then wait only for a local
    /// write, not for the tracing server. At start, events an earlier incarnation spooled and
    /// the server lacks are shipped first.
    pub async fn connect_spooled(
        identity: &str,
        addr: &str,
        spool_dir: Option<&std::path::Path>,
    ) -> Result<Tracer, TracerError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| TracerError::BadAddress {
                addr: addr.to_string(),
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true);
        let (shipped, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            identity: identity.to_string(),
            state: Mutex::new(State {
                clock: VClock::new(),
                queue: BytesMut::new(),
                queued: VecDeque::new(),
                spool: None,
                recorded: 0,
                closed: false,
            }),
            space: Condvar::new(),
            work: Notify::new(),
            shipped,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let shipper = Arc::clone(&inner);
        let addr_owned = addr.to_string();
        let spool_dir = spool_dir.map(std::path::Path::to_path_buf);
        std::thread::Builder::new()
            .name(format!("trace-shipper-{identity}"))
            .spawn(move || shipper.run_shipper(endpoint, addr_owned, spool_dir, ready_tx))
            .map_err(TracerError::Thread)?;
        let resumed = ready_rx.await.unwrap_or_else(|_| {
            Err(TracerError::Unreachable {
                addr: addr.to_string(),
                identity: identity.to_string(),
                message: "the shipping thread stopped".into(),
            })
        })?;
        tracing::debug!(identity, clock = %resumed.to_json(), "tracer resumed its clock");
        inner.lock().clock.merge(&resumed);
        Ok(Tracer { inner })
    }

    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// A new trace with a random 64-bit id.
    pub fn create_trace(&self) -> Trace {
        self.trace(rand::random::<u64>())
    }

    /// Continues trace `id` (which may have been created by another process).
    pub fn trace(&self, id: u64) -> Trace {
        Trace {
            id,
            tracer: self.clone(),
        }
    }

    /// Merges the clock of a token another process generated, records the receipt, and
    /// returns the sender's trace to continue. An empty or unreadable token (the sender does
    /// not trace) starts a new trace instead.
    pub fn receive_token(&self, token: &[u8]) -> Trace {
        if token.is_empty() {
            return self.create_trace();
        }
        let token = match crate::wire::decode_token(token) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(identity = %self.inner.identity, "unreadable trace token: {e}");
                return self.create_trace();
            }
        };
        let trace = self.trace(token.trace_id);
        let action = ReceiveTokenTrace {
            from: token.identity.to_string(),
        };
        self.inner
            .record(trace.id, &action, Some(&token.clock), false);
        trace
    }

    /// Makes every event recorded so far (by any clone) safe from a SIGKILL: written to the
    /// spool (one local write), or without one, stored by the tracing server. Call it before a
    /// token leaves the process (see the module invariants).
    ///
    /// It first yields to the scheduler once: tasks woken together (the replies of one batch,
    /// the puts of one batch of callers) each record their events and call this, and after
    /// one turn the first to resume writes them all in one `write(2)`; the others find nothing
    /// left to write. Everything recorded before a call is written before it returns either
    /// way: what waits to be written is only cleared by a write that succeeded.
    pub async fn flush(&self) {
        tokio::task::yield_now().await;
        self.flush_now().await;
    }

    /// [`Tracer::flush`] without the yield: for a sender that gathers the messages of several
    /// tasks and flushes once before they leave together (kvslib's request lanes).
    pub async fn flush_now(&self) {
        if self.inner.write_spool() {
            return;
        }
        self.shipped().await;
    }

    /// Waits until every event recorded so far is stored by the tracing server.
    async fn shipped(&self) {
        let target = self.inner.lock().recorded;
        let mut rx = self.inner.shipped.subscribe();
        // The sender lives in `inner`, which `self` keeps alive: this only ends at the target.
        let _ = rx.wait_for(|&shipped| shipped >= target).await;
    }

    /// Waits until the tracing server has stored every event recorded so far, giving up after
    /// `timeout`; returns whether everything was stored.
    pub async fn flush_for(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.shipped()).await.is_ok()
    }

    /// Ships everything (for at most [`CLOSE_FLUSH_MS`]), then stops the shipper; with
    /// everything stored the spool files go. Events recorded afterwards are never sent.
    pub async fn close(&self) {
        self.inner.write_spool();
        let stored = self.flush_for(Duration::from_millis(CLOSE_FLUSH_MS)).await;
        let mut state = self.inner.lock();
        match (stored, state.spool.as_mut()) {
            (true, Some(spool)) => spool.remove_all(),
            (true, None) => {}
            (false, spooled) => tracing::warn!(
                identity = %self.inner.identity,
                "trace events not shipped within {CLOSE_FLUSH_MS} ms; {}",
                if spooled.is_some() {
                    "they stay in the spool for the tracing server or the next start"
                } else {
                    "they are lost"
                }
            ),
        }
        state.closed = true;
        drop(state);
        self.inner.work.notify_one();
    }

    /// The current clock (for tests and diagnostics).
    pub fn clock(&self) -> VClock {
        self.inner.lock().clock.clone()
    }
}

impl Trace {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// Records `action` in this trace: ticks the local clock by exactly one.
    pub fn record_action(&self, action: &impl Action) {
        self.tracer.inner.record(self.id, action, None, false);
    }

    /// Records a `GenerateTokenTrace` event and returns the token carrying its clock, for the
    /// `trace_token` field of an outgoing message. Flush the tracer before sending it.
    pub fn generate_token(&self) -> Bytes {
        self.generate_token_for("")
    }

    /// [`Trace::generate_token`], naming the message the token rides on.
    pub fn generate_token_for(&self, message: &str) -> Bytes {
        let action = GenerateTokenTrace {
            token_for: message.to_string(),
        };
        let token = self
            .tracer
            .inner
            .record(self.id, &action, None, true)
            .expect("invariant: asked for the token");
        Bytes::from(token)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state (each step is one push).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what waits for the spool; false if there is no spool (any more).
    fn write_spool(&self) -> bool {
        let mut state = self.lock();
        Self::write_spool_locked(&self.identity, &mut state)
    }

    fn write_spool_locked(identity: &str, state: &mut State) -> bool {
        let Some(spool) = state.spool.as_mut() else {
            return false;
        };
        match spool.write_out() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    identity,
                    "cannot write the trace spool ({e}); tokens now wait for the tracing server"
                );
                state.spool = None;
                false
            }
        }
    }

    /// Ticks the clock (after merging `merge`), queues the event and, with `want_token`,
    /// returns a token (in trace `trace_id`) carrying the new clock.
    fn record(
        &self,
        trace_id: u64,
        action: &impl Action,
        merge: Option<&[(&str, u64)]>,
        want_token: bool,
    ) -> Option<Vec<u8>> {
        let body =
            serde_json::to_string(action).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let tag = action.tag();
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!("{}", console_line(&self.identity, trace_id, tag, &body));
        }
        let token = {
            let mut state = self.lock();
            while state.queued.len() >= EVENTS_BUFFERED_MAX && !state.closed {
                state = self.space.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if let Some(theirs) = merge {
                state.clock.merge_wire(theirs);
            }
            let own = state.clock.tick(&self.identity);
            state.recorded += 1;
            let seq = state.recorded;
            let token = want_token
                .then(|| crate::wire::encode_token(&self.identity, trace_id, &state.clock.0));
            let State {
                clock,
                queue,
                queued,
                spool,
                ..
            } = &mut *state;
            let start = queue.len();
            spool::encode_event(queue, trace_id, tag, &body, &clock.0);
            let event = &queue[start..];
            queued.push_back(event.len() as u32);
            if let Some(spool) = spool.as_mut() {
                spool.push(seq, own, event);
                if spool.pending_full() {
                    Self::write_spool_locked(&self.identity, &mut state);
                }
            }
            token
        };
        self.work.notify_one();
        token
    }

    /// The shipper thread: resume the clock, report it, then ship batches until closed.
    fn run_shipper(
        self: Arc<Self>,
        endpoint: tonic::transport::Endpoint,
        addr: String,
        spool_dir: Option<std::path::PathBuf>,
        ready: oneshot::Sender<Result<VClock, TracerError>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(TracerError::Thread(e)));
                return;
            }
        };
        runtime.block_on(async move {
            let mut client = TracingClient::new(endpoint.connect_lazy())
                .max_encoding_message_size(MESSAGE_BYTES_MAX)
                .max_decoding_message_size(MESSAGE_BYTES_MAX);
            match self.resume(&mut client, &addr).await {
                Ok(mut clock) => {
                    if let Some(dir) = &spool_dir {
                        clock = self.recover_spool(&mut client, &addr, dir, clock).await;
                    }
                    if ready.send(Ok(clock)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
            while let Some((batch, last_seq)) = self.next_batch().await {
                self.ship(&mut client, batch, &addr).await;
                self.shipped.send_replace(last_seq);
                if let Some(spool) = self.lock().spool.as_mut() {
                    spool.remove_stored(last_seq);
                }
            }
        });
    }

    /// Ships what an earlier incarnation spooled and the server (whose last stored clock of
    /// this identity is `clock`) lacks, then starts this incarnation's spool after it; returns
    /// the clock to continue from. Without a usable spool directory the tracer runs without
    /// one (tokens wait for the server).
    async fn recover_spool(
        &self,
        client: &mut TracingClient<tonic::transport::Channel>,
        addr: &str,
        dir: &std::path::Path,
        mut clock: VClock,
    ) -> VClock {
        let (events, gen) = spool::recover(dir, &self.identity, clock.get(&self.identity));
        if !events.is_empty() {
            tracing::info!(
                identity = %self.identity,
                events = events.len(),
                "shipping trace events the last run spooled"
            );
            match events.last().map(|e| crate::wire::decode_event(e)) {
                Some(Ok(last)) => clock.merge_wire(&last.clock),
                Some(Err(e)) => tracing::warn!(identity = %self.identity, "{e}"),
                None => {}
            }
            let events: Vec<Bytes> = events.into_iter().map(Bytes::from).collect();
            for batch in events.chunks(BATCH_EVENTS_MAX) {
                self.ship(client, batch.to_vec(), addr).await;
            }
        }
        match SpoolWriter::create(dir, &self.identity, gen + 1) {
            Ok(spool) => {
                spool.remove_older();
                self.lock().spool = Some(spool);
            }
            Err(e) => tracing::warn!(
                identity = %self.identity,
                "cannot create a trace spool in {} ({e}); tokens wait for the tracing server",
                dir.display()
            ),
        }
        clock
    }

    async fn resume(
        &self,
        client: &mut TracingClient<tonic::transport::Channel>,
        addr: &str,
    ) -> Result<VClock, TracerError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(RESUME_DEADLINE_MS);
        let mut delay = RETRY_INITIAL_MS;
        loop {
            let request = ResumeRequest {
                identity: self.identity.clone(),
            };
            match client.resume(request).await {
                Ok(resp) => return Ok(VClock::from_proto(&resp.into_inner().clock)),
                Err(status) if tokio::time::Instant::now() >= deadline => {
                    return Err(TracerError::Unreachable {
                        addr: addr.to_string(),
                        identity: self.identity.clone(),
                        message: status.message().to_string(),
                    })
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    delay = (delay * 2).min(RETRY_MAX_MS);
                }
            }
        }
    }

    /// Takes the next batch off the queue, waiting for one; `None` once closed and drained.
    /// With a spool, a small batch waits [`SHIP_LINGER_MS`] for more.
    async fn next_batch(&self) -> Option<(Vec<Bytes>, u64)> {
        let mut lingered = false;
        let mut state = loop {
            let linger = {
                let state = self.lock();
                let small = state.queued.len() < SHIP_EAGER_EVENTS;
                let linger = !lingered && small && state.spool.is_some() && !state.closed;
                if !state.queued.is_empty() && !linger {
                    break state;
                }
                if state.queued.is_empty() && state.closed {
                    return None;
                }
                !state.queued.is_empty()
            };
            if linger {
                lingered = true;
                tokio::time::sleep(Duration::from_millis(SHIP_LINGER_MS)).await;
                continue;
            }
            // `notify_one` leaves a permit when nobody waits, so no wakeup is missed here.
            self.work.notified().await;
        };
        let n = state.queued.len().min(BATCH_EVENTS_MAX);
        let lens: Vec<u32> = state.queued.drain(..n).collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        let events = state.queue.split_to(total).freeze();
        let last_seq = state.recorded - state.queued.len() as u64;
        drop(state);
        self.space.notify_all();
        let mut batch = Vec::with_capacity(n);
        let mut at = 0;
        for len in lens {
            let end = at + len as usize;
            batch.push(events.slice(at..end));
            at = end;
        }
        Some((batch, last_seq))
    }

    /// Sends one batch until the tracing server has stored it (it ignores events it already
    /// has, so resending after a lost answer is harmless).
    async fn ship(
        &self,
        client: &mut TracingClient<tonic::transport::Channel>,
        events: Vec<Bytes>,
        addr: &str,
    ) {
        let batch = EncodedEventBatch {
            identity: self.identity.clone(),
            events,
        };
        let mut delay = RETRY_INITIAL_MS;
        let mut warned = false;
        loop {
            match client.ship_encoded(batch.clone()).await {
                Ok(_) => {
                    if warned {
                        tracing::info!(identity = %self.identity, "tracing server {addr} reachable again");
                    }
                    return;
                }
                Err(status) => {
                    if !warned {
                        tracing::warn!(
                            identity = %self.identity,
                            "cannot ship trace events to {addr} ({}); retrying, and RPCs that carry \
                             trace tokens wait meanwhile",
                            status.message()
                        );
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    delay = (delay * 2).min(RETRY_MAX_MS);
                }
            }
        }
    }
}

/// `[identity] TraceID=<id> <Tag> Field=value, ...`: the console form of an event.
pub fn console_line(identity: &str, trace_id: u64, tag: &str, body: &str) -> String {
    let mut line = format!("[{identity}] TraceID={trace_id} {tag}");
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(body) {
        for (i, (name, value)) in fields.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            let _ = match value {
                serde_json::Value::String(s) => write!(line, "{sep}{name}={s}"),
                other => write!(line, "{sep}{name}={other}"),
            };
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_line_lists_fields_in_order() {
        let line = console_line("server1", 7, "PutRecvd", r#"{"ClientId":"c1","Seq":3}"#);
        assert_eq!(line, "[server1] TraceID=7 PutRecvd ClientId=c1, Seq=3");
        assert_eq!(
            console_line("coord", 1, "AllServersJoined", "{}"),
            "[coord] TraceID=1 AllServersJoined"
        );
    }
}
