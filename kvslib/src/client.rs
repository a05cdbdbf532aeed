//! [`Client`]: the public handle. Checks input, bounds concurrency, assigns put identities
//! and hands each operation to the router's retry loop.
//!
//! ```text
//!   put(k, v) -- check limits -- permit (<= PUTS_IN_FLIGHT_MAX) -- session + seq guard
//!             -- router.call("Put", deadline, attempt{session, seq, ack_seq now, k, v})
//!             -- drop guard (seq finished) -- SESSION_EXPIRED? renew the session
//! ```
//!
//! Invariants: nothing is sent for input that breaks a limit; every operation ends by its
//! deadline (`client.op_timeout_ms`); all attempts of one put carry the same `(session, seq)`
//! and a freshly computed `ack_seq`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvraft_common::limits::{
    check_key_value, check_key_value_within, check_range, check_txn, prefix_end,
};
use kvraft_common::ClusterConfig;
use kvraft_proto as pb;
use kvraft_tracing::action::{
    self as act, KvslibStart, KvslibStop, LeaderReq, LeaderResRecvd, PutResultRecvd,
};
use kvraft_tracing::Trace;
use pb::coord_client_client::CoordClientClient;
use pb::kv_client::KvClient;
use prost::bytes::Bytes;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, Instrument as _};

use crate::backoff::Backoff;
use crate::batch::{Batcher, Gets, Puts};
use crate::failure::Failure;
use crate::key_watch::Watch;
use crate::kv_call::{kv_answer, kv_call};
use crate::router::Router;
use crate::session::{self, Session, Sessions};
use crate::txn::{self, CasOutcome, CmpOp, Compare, Txn, TxnOp, TxnOpOutcome, TxnOutcome};
use crate::watcher::Watcher;
use crate::{Error, KeyValue, LeaderInfo, PutOutcome, RangePage, Versioned};

/// Most puts one client has in flight at once. The server holds up to 1024 waiting puts per
/// session (a put waits there for the seqs before it); staying well below that keeps a burst
/// from hitting `TOO_MANY_PENDING`, and bounds the seq bookkeeping here.
pub const PUTS_IN_FLIGHT_MAX: usize = 256;
/// Most gets one client has in flight at once: bounds the memory of queued requests and
/// answers (values up to 1 MiB each) when a caller fans out without limit.
pub const GETS_IN_FLIGHT_MAX: usize = 1024;
/// Most transactions one [`Client::delete_range`] sends (each deletes up to
/// `DELETE_KEYS_PER_ENTRY_MAX` keys): ten million keys.
const DELETE_RANGE_ROUNDS_MAX: usize = 1_000;
/// Cap of the first (jittered) wait before asking an unreachable coord again
/// (`query_leader`).
const COORD_RETRY_INITIAL_MS: u64 = 50;
/// Largest cap of the wait between coord queries: a restarting coord is found within half a
/// second.
const COORD_RETRY_MAX_MS: u64 = 500;
/// Bytes of a key shown in debug logs; keys may be up to 1 KiB of arbitrary bytes.
const KEY_PREVIEW_BYTES: usize = 64;

/// A handle on the cluster. Cheap to clone (an `Arc` inside); every clone shares the session,
/// the connections and the leader watch, and may be used from many tasks at once.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client_id: String,
    coord_addr: String,
    pub(crate) op_timeout: Duration,
    /// Longest value a put may carry, and the gRPC message limit derived from it (the
    /// cluster's `[server] max_value_bytes`).
    max_value_bytes: usize,
    pub(crate) grpc_message_bytes: usize,
    pub(crate) router: Arc<Router>,
    sessions: Sessions,
    put_permits: Semaphore,
    get_permits: Semaphore,
    /// Carry the puts and gets to each server, several per call under load.
    put_batcher: Arc<Batcher<Puts>>,
    get_batcher: Arc<Batcher<Gets>>,
    /// The leader watch task; `None` after `close`. Dropping it (with the last handle) stops it.
    watcher: Mutex<Option<Watcher>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.inner.client_id)
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts the leader watch and registers a fresh session through the leader, within
    /// `client.op_timeout_ms`.
    pub async fn connect(config: &ClusterConfig, client_id: &str) -> Result<Client, Error> {
        Client::start(config, client_id, true).await
    }

    /// Like [`Client::connect`], without registering a session: gets need none, so a client
    /// that only reads appends nothing to the log. The first put registers one.
    pub async fn connect_without_session(
        config: &ClusterConfig,
        client_id: &str,
    ) -> Result<Client, Error> {
        Client::start(config, client_id, false).await
    }

    async fn start(
        config: &ClusterConfig,
        client_id: &str,
        register: bool,
    ) -> Result<Client, Error> {
        if client_id.is_empty() {
            return Err(Error::InvalidInput("client id is empty".to_string()));
        }
        kvraft_common::limits::check_client_id(client_id).map_err(Error::InvalidInput)?;
        config
            .validate()
            .map_err(|(key, message)| Error::InvalidInput(format!("config: {key}: {message}")))?;
        debug!(action = "KvslibStart", client_id);
        let tracer = kvraft_tracing::tracer_for(&config.tracing, &trace_identity(client_id))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if let Some(t) = &tracer {
            t.create_trace().record_action(&KvslibStart {
                client_id: client_id.to_string(),
            });
        }
        let router = Arc::new(Router::new(config).with_tracer(tracer));
        let coord_addr = config.coord.client_api_addr.clone();
        let watcher = Watcher::spawn(Arc::clone(&router), coord_addr, client_id.to_string());
        let deadline = Instant::now() + Duration::from_millis(config.client.op_timeout_ms);
        let session_id = if register {
            // On error the watcher is dropped here, which stops it.
            let id = session::register(&router, client_id, deadline).await?;
            debug!(client_id, session_id = id, "session registered");
            Some(id)
        } else {
            None
        };
        Ok(Client::assemble(
            config,
            client_id,
            router,
            Some(watcher),
            session_id,
        ))
    }

    fn assemble(
        config: &ClusterConfig,
        client_id: &str,
        router: Arc<Router>,
        watcher: Option<Watcher>,
        session_id: Option<u64>,
    ) -> Client {
        let tracer = router.tracer().cloned();
        Client {
            inner: Arc::new(Inner {
                client_id: client_id.to_string(),
                coord_addr: config.coord.client_api_addr.clone(),
                op_timeout: Duration::from_millis(config.client.op_timeout_ms),
                max_value_bytes: config.server.max_value(),
                grpc_message_bytes: config.server.grpc_message_bytes(),
                router,
                sessions: Sessions::new(client_id, session_id),
                put_permits: Semaphore::new(PUTS_IN_FLIGHT_MAX),
                get_permits: Semaphore::new(GETS_IN_FLIGHT_MAX),
                put_batcher: Batcher::new(config.server.grpc_message_bytes(), tracer.clone()),
                get_batcher: Batcher::new(config.server.grpc_message_bytes(), tracer),
                watcher: Mutex::new(watcher),
            }),
        }
    }

    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The current session id (it changes when an expired session is renewed); 0 for a client
    /// connected without a session that has not put anything yet.
    pub fn session_id(&self) -> u64 {
        self.inner.sessions.current_id()
    }

    /// Stores `value` under `key`, exactly once even across retries and failovers.
    ///
    /// On [`Error::Timeout`] the put may or may not have been applied.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<PutOutcome, Error> {
        let (key, value) = (key.into(), value.into());
        let span = kvraft_telemetry::span_if_enabled(|| {
            tracing::info_span!("kvslib.put", client_id = %self.inner.client_id,
                key_bytes = key.len(), value_bytes = value.len(), seq = tracing::field::Empty)
        });
        self.put_in_span(key, value).instrument(span).await
    }

    async fn put_in_span(&self, key: Vec<u8>, value: Vec<u8>) -> Result<PutOutcome, Error> {
        check_key_value_within(&key, Some(&value), self.inner.max_value_bytes)
            .map_err(Error::InvalidInput)?;
        let deadline = self.deadline();
        let _permit = acquire(&self.inner.put_permits, "Put", deadline).await?;
        let inner = &self.inner;
        let session = inner.sessions.usable(&inner.router, deadline).await?;
        let guard = session.begin_put(deadline).await?;
        tracing::Span::current().record("seq", guard.seq);
        debug!(action = "Put", client_id = %inner.client_id, session_id = session.id,
            seq = guard.seq, key = %preview(&key), value_bytes = value.len());
        let trace = inner.router.tracer().map(|t| {
            let trace = t.create_trace();
            trace.record_action(&act::Put {
                client_id: inner.client_id.clone(),
                op_id: guard.seq,
                key: act::text(&key),
                value: act::text(&value),
            });
            trace
        });
        let trace_key = trace.as_ref().map(|_| act::text(&key));
        let result = self
            .send_put(
                &session,
                guard.seq,
                key.into(),
                value.into(),
                deadline,
                trace.as_ref(),
            )
            .await;
        // The seq is finished (answered or abandoned) before the caller sees the result.
        let seq = guard.seq;
        drop(guard);
        debug!(action = "PutResultRecvd", client_id = %inner.client_id,
            session_id = session.id, seq, result = ?result);
        if let (Some(trace), Some(key)) = (&trace, trace_key) {
            trace.record_action(&PutResultRecvd {
                client_id: inner.client_id.clone(),
                op_id: seq,
                key,
                ok: result.is_ok(),
                result: match &result {
                    Ok(out) => format!("version {}, index {}", out.version, out.index),
                    Err(e) => e.to_string(),
                },
            });
        }
        if result == Err(Error::SessionExpired) {
            self.renew_session(&session, deadline).await;
        }
        result
    }

    async fn send_put(
        &self,
        session: &Session,
        seq: u64,
        key: Bytes,
        value: Bytes,
        deadline: Instant,
        trace: Option<&Trace>,
    ) -> Result<PutOutcome, Error> {
        let client_id = &self.inner.client_id;
        let span = tracing::Span::current();
        let batcher = &self.inner.put_batcher;
        self.inner
            .router
            .call("Put", deadline, |channel, addr| {
                let request = pb::PutRequest {
                    client_id: client_id.clone(),
                    session_id: session.id,
                    seq,
                    // Recomputed on every attempt: other puts may have finished meanwhile.
                    ack_seq: session.ack_seq(),
                    key: key.clone(),
                    value: value.clone(),
                    trace_token: kvraft_tracing::token(trace, "PutRequest"),
                };
                let span = || tracing::info_span!(parent: &span, "kv.Put", server = %addr);
                let request = attempt_request(span, request);
                put_attempt(batcher.clone(), channel, addr, request, trace.cloned())
            })
            .await
    }

    /// Registers a new session after `stale` expired; failures are left to the next put.
    async fn renew_session(&self, stale: &Session, deadline: Instant) {
        let inner = &self.inner;
        if let Err(error) = inner.sessions.renew(&inner.router, stale, deadline).await {
            debug!(client_id = %inner.client_id, %error, "session renewal failed; next put retries it");
        }
    }

    /// The value stored under `key`, or `None` if there is none (linearizable).
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.get_versioned(key).await?.map(|v| v.value))
    }

    /// Like [`Client::get`], with the value's version (how many puts to the key were applied).
    pub async fn get_versioned(&self, key: impl AsRef<[u8]>) -> Result<Option<Versioned>, Error> {
        let key = key.as_ref();
        let span = kvraft_telemetry::span_if_enabled(|| {
            tracing::info_span!("kvslib.get", client_id = %self.inner.client_id,
                key_bytes = key.len())
        });
        self.get_in_span(key).instrument(span).await
    }

    async fn get_in_span(&self, key: &[u8]) -> Result<Option<Versioned>, Error> {
        check_key_value(key, None).map_err(Error::InvalidInput)?;
        let deadline = self.deadline();
        let _permit = acquire(&self.inner.get_permits, "Get", deadline).await?;
        let client_id = &self.inner.client_id;
        debug!(action = "Get", client_id = %client_id, key = %preview(key));
        let trace = self.inner.router.tracer().map(|t| {
            let trace = t.create_trace();
            trace.record_action(&act::Get {
                client_id: client_id.clone(),
                key: act::text(key),
            });
            trace
        });
        let key = Bytes::copy_from_slice(key);
        let batcher = &self.inner.get_batcher;
        let span = tracing::Span::current();
        let result = self
            .inner
            .router
            .call("Get", deadline, |channel, addr| {
                let request = pb::GetRequest {
                    client_id: client_id.clone(),
                    key: key.clone(),
                    trace_token: kvraft_tracing::token(trace.as_ref(), "GetRequest"),
                };
                let span = || tracing::info_span!(parent: &span, "kv.Get", server = %addr);
                let request = attempt_request(span, request);
                get_attempt(batcher.clone(), channel, addr, request, trace.clone())
            })
            .await;
        if let Some(trace) = &trace {
            trace.record_action(&act::GetResultRecvd {
                client_id: client_id.clone(),
                key: act::text(&key),
                ok: result.is_ok(),
                result: match &result {
                    Ok(Some(v)) => act::text(&v.value),
                    Ok(None) => "(not found)".to_string(),
                    Err(e) => e.to_string(),
                },
            });
        }
        debug!(action = "GetResultRecvd", client_id = %client_id, key = %preview(&key),
            found = matches!(result, Ok(Some(_))), error = ?result.as_ref().err());
        result
    }

    /// Runs `txn` atomically, exactly once even across retries and failovers.
    ///
    /// On [`Error::Timeout`] it may or may not have been applied.
    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, Error> {
        let span = kvraft_telemetry::span_if_enabled(|| {
            tracing::info_span!("kvslib.txn", client_id = %self.inner.client_id,
                compares = txn.compares.len(), ops = txn.success.len() + txn.failure.len(),
                seq = tracing::field::Empty)
        });
        self.txn_in_span(txn).instrument(span).await
    }

    async fn txn_in_span(&self, txn: Txn) -> Result<TxnOutcome, Error> {
        let compare: Vec<pb::Compare> = txn.compares.iter().map(txn::compare_to_pb).collect();
        let success: Vec<pb::TxnOp> = txn.success.iter().map(txn::op_to_pb).collect();
        let failure: Vec<pb::TxnOp> = txn.failure.iter().map(txn::op_to_pb).collect();
        check_txn(&compare, &success, &failure, self.inner.max_value_bytes)
            .map_err(Error::InvalidInput)?;
        let deadline = self.deadline();
        let _permit = acquire(&self.inner.put_permits, "Txn", deadline).await?;
        let inner = &self.inner;
        let session = inner.sessions.usable(&inner.router, deadline).await?;
        let guard = session.begin_put(deadline).await?;
        tracing::Span::current().record("seq", guard.seq);
        debug!(action = "Txn", client_id = %inner.client_id, session_id = session.id,
            seq = guard.seq, compares = compare.len());
        let client_id = &inner.client_id;
        let limit = inner.grpc_message_bytes;
        let span = tracing::Span::current();
        let seq = guard.seq;
        let trace = inner.router.tracer().map(|t| {
            let trace = t.create_trace();
            trace.record_action(&act::Txn {
                client_id: client_id.clone(),
                op_id: seq,
                compares: compare.len() as u64,
                ops: (success.len() + failure.len()) as u64,
            });
            trace
        });
        let result = inner
            .router
            .call("Txn", deadline, |channel, addr| {
                let request = pb::TxnRequest {
                    client_id: client_id.clone(),
                    session_id: session.id,
                    seq,
                    // Recomputed on every attempt: other requests may have finished meanwhile.
                    ack_seq: session.ack_seq(),
                    compare: compare.clone(),
                    success: success.clone(),
                    failure: failure.clone(),
                    trace_token: kvraft_tracing::token(trace.as_ref(), "TxnRequest"),
                };
                let span = || tracing::info_span!(parent: &span, "kv.Txn", server = %addr);
                let request = attempt_request(span, request);
                txn_attempt(channel, addr, request, trace.clone(), limit)
            })
            .await;
        // The seq is finished (answered or abandoned) before the caller sees the result.
        drop(guard);
        if let Some(trace) = &trace {
            trace.record_action(&act::TxnResultRecvd {
                client_id: client_id.clone(),
                op_id: seq,
                ok: result.is_ok(),
                result: match &result {
                    Ok(out) => format!("succeeded {}, revision {}", out.succeeded, out.revision),
                    Err(e) => e.to_string(),
                },
            });
        }
        debug!(action = "TxnResultRecvd", client_id = %inner.client_id,
            session_id = session.id, seq, result = ?result);
        if result == Err(Error::SessionExpired) {
            self.renew_session(&session, deadline).await;
        }
        result
    }

    /// Deletes `key`; whether it existed (exactly once, like a put).
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<bool, Error> {
        let out = self.txn(Txn::new().then(TxnOp::delete(key))).await?;
        match out.results.first() {
            Some(TxnOpOutcome::Delete { deleted, .. }) => Ok(*deleted > 0),
            other => Err(Error::Unavailable(format!(
                "the server answered a delete with {other:?}"
            ))),
        }
    }

    /// Deletes every key in `[start, end)` (an empty `end`: no upper bound) and returns how
    /// many were deleted. Each transaction deletes at most
    /// [`DELETE_KEYS_PER_ENTRY_MAX`](kvraft_common::limits::DELETE_KEYS_PER_ENTRY_MAX) keys,
    /// so a larger range is deleted by several, one after another: atomic per transaction,
    /// not as a whole (a key put into the range meanwhile may be deleted too, or not).
    pub async fn delete_range(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> Result<u64, Error> {
        let (start, end) = (start.into(), end.into());
        check_range(&start, &end).map_err(Error::InvalidInput)?;
        let mut total = 0u64;
        // Each round deletes DELETE_KEYS_PER_ENTRY_MAX keys or ends the range; the rounds are
        // bounded so a range that others keep filling cannot hold this call forever.
        for _ in 0..DELETE_RANGE_ROUNDS_MAX {
            let op = TxnOp::DeleteRange {
                start: start.clone(),
                end: end.clone(),
            };
            let out = self.txn(Txn::new().then(op)).await?;
            match out.results.first() {
                Some(TxnOpOutcome::Delete { deleted, more }) => {
                    total += deleted;
                    if !more {
                        return Ok(total);
                    }
                }
                other => {
                    return Err(Error::Unavailable(format!(
                        "the server answered a range delete with {other:?}"
                    )))
                }
            }
        }
        Err(Error::Unavailable(format!(
            "{total} keys deleted in {DELETE_RANGE_ROUNDS_MAX} transactions and the range still              holds more"
        )))
    }

    /// Deletes every key that starts with `prefix` (see [`Client::delete_range`]).
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<u64, Error> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        self.delete_range(prefix, end).await
    }

    /// Writes `value` under `key` only if the key's version is `expected_version` (0: only if
    /// it is absent), exactly once.
    pub async fn cas(
        &self,
        key: impl Into<Vec<u8>>,
        expected_version: u64,
        value: impl Into<Vec<u8>>,
    ) -> Result<CasOutcome, Error> {
        let key = key.into();
        let txn = Txn::new()
            .when(Compare::version(
                key.clone(),
                CmpOp::Equal,
                expected_version,
            ))
            .then(TxnOp::put(key.clone(), value))
            .otherwise(TxnOp::get(key));
        let out = self.txn(txn).await?;
        match (out.succeeded, out.results.first()) {
            (true, Some(TxnOpOutcome::Put { version })) => Ok(CasOutcome::Swapped(PutOutcome {
                version: *version,
                index: out.revision,
            })),
            (false, Some(TxnOpOutcome::Get { value, .. })) => Ok(CasOutcome::Failed {
                current: value.clone(),
            }),
            other => Err(Error::Unavailable(format!(
                "the server answered a compare-and-swap with {other:?}"
            ))),
        }
    }

    /// Keys in `[start, end)` (an empty `end`: no upper bound) in key order, linearizable:
    /// at most `limit` (0: [`RANGE_LIMIT_MAX`](kvraft_common::limits::RANGE_LIMIT_MAX)), and
    /// fewer when their values pass the cluster's `max_value_bytes`. Continue from
    /// `next_key` while `more`.
    pub async fn range(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        limit: u64,
        keys_only: bool,
    ) -> Result<RangePage, Error> {
        self.range_at(start, end, limit, keys_only, 0).await
    }

    /// As [`Client::range`], as of `revision` (0: the latest): the keys and values the range
    /// held then. Pass a page's `revision` to read the next page at the same revision (a
    /// consistent listing however many pages it takes). A server keeps the changes of its
    /// last `[server] watch_history_revisions` revisions: an older revision is refused with
    /// [`Error::Rejected`] ("compacted", naming the oldest it holds), and so is a revision not
    /// yet applied ("invalid argument", naming the latest).
    pub async fn range_at(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        limit: u64,
        keys_only: bool,
        revision: u64,
    ) -> Result<RangePage, Error> {
        let (start, end) = (start.into(), end.into());
        check_range(&start, &end).map_err(Error::InvalidInput)?;
        let deadline = self.deadline();
        let _permit = acquire(&self.inner.get_permits, "Range", deadline).await?;
        let client_id = &self.inner.client_id;
        let limit_bytes = self.inner.grpc_message_bytes;
        let trace = self.inner.router.tracer().map(|t| {
            let trace = t.create_trace();
            trace.record_action(&act::Range {
                client_id: client_id.clone(),
                start: act::text(&start),
                end: act::text(&end),
                limit,
            });
            trace
        });
        let (start, end) = (Bytes::from(start), Bytes::from(end));
        let result = self
            .inner
            .router
            .call("Range", deadline, |channel, addr| {
                let request = pb::RangeRequest {
                    client_id: client_id.clone(),
                    start: start.clone(),
                    end: end.clone(),
                    prefix: false,
                    limit,
                    keys_only,
                    revision,
                    trace_token: kvraft_tracing::token(trace.as_ref(), "RangeRequest"),
                };
                let request = attempt_request(|| tracing::info_span!("kv.Range"), request);
                range_attempt(channel, addr, request, trace.clone(), limit_bytes)
            })
            .await;
        if let Some(trace) = &trace {
            trace.record_action(&act::RangeResultRecvd {
                client_id: client_id.clone(),
                ok: result.is_ok(),
                result: match &result {
                    Ok(page) => format!("{} keys, more {}", page.kvs.len(), page.more),
                    Err(e) => e.to_string(),
                },
            });
        }
        result
    }

    /// Every key that starts with `prefix`, page by page (see [`Client::range`]).
    pub async fn range_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
        limit: u64,
        keys_only: bool,
    ) -> Result<RangePage, Error> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        self.range(prefix, end, limit, keys_only).await
    }

    /// Watches every change of the keys in `[start, end)` (an empty `end`: no upper bound)
    /// from revision `from_revision` on (0: changes after now), in revision order, exactly
    /// once through failovers (see [`Watch`]).
    pub fn watch(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        from_revision: u64,
    ) -> Result<Watch, Error> {
        let (start, end) = (start.into(), end.into());
        check_range(&start, &end).map_err(Error::InvalidInput)?;
        Ok(Watch::new(self.clone(), start, end, from_revision))
    }

    /// Watches every key that starts with `prefix` (see [`Client::watch`]).
    pub fn watch_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
        from_revision: u64,
    ) -> Result<Watch, Error> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        self.watch(prefix, end, from_revision)
    }

    /// Who leads now, asked of the coord. When the coord cannot be reached, the cached view
    /// (from the leader watch and server hints) is returned instead; an error only when
    /// nothing is known at all.
    pub async fn leader(&self) -> Result<LeaderInfo, Error> {
        let inner = &self.inner;
        debug!(action = "LeaderReq", client_id = %inner.client_id);
        match self.ask_coord().await {
            Ok(info) => {
                debug!(action = "LeaderResRecvd", client_id = %inner.client_id,
                    term = info.term, leader_id = info.leader_id, leader_uuid = %info.leader_uuid);
                inner.router.offer(info.clone(), "coord");
                Ok(info)
            }
            Err(message) => {
                let cached = inner.router.leader_view();
                debug!(client_id = %inner.client_id, %message, ?cached, "coord unreachable; using cached leader");
                if cached.term == 0 && !cached.has_leader() {
                    return Err(Error::Unavailable(format!(
                        "{message}; no leader known from earlier"
                    )));
                }
                Ok(cached)
            }
        }
    }

    async fn ask_coord(&self) -> Result<LeaderInfo, String> {
        let inner = &self.inner;
        ask_coord(&inner.router, &inner.coord_addr, &inner.client_id).await
    }

    /// Stops the background leader watch (for every clone of this handle). Other clones keep
    /// working, following server hints only. With tracing on, records `KvslibStop` and waits
    /// until every trace event is shipped; the last handle also stops the tracer, which then
    /// removes its spool file.
    pub async fn close(self) {
        let watcher = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(watcher) = watcher {
            watcher.stop().await;
        }
        debug!(action = "KvslibStop", client_id = %self.inner.client_id);
        if let Some(t) = self.inner.router.tracer() {
            t.create_trace().record_action(&KvslibStop {
                client_id: self.inner.client_id.clone(),
            });
            // Bounded: closing must not hang while the tracing server is gone. Other clones
            // keep the tracer running.
            if Arc::strong_count(&self.inner) == 1 {
                t.close().await;
            } else {
                let _ = t
                    .flush_for(Duration::from_millis(
                        kvraft_tracing::tracer::CLOSE_FLUSH_MS,
                    ))
                    .await;
            }
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.op_timeout
    }
}

/// Who leads now, asked of the coord without registering a session (so it works while the
/// cluster cannot serve). Retries an unreachable coord until `client.op_timeout_ms` passes.
pub async fn query_leader(config: &ClusterConfig, client_id: &str) -> Result<LeaderInfo, Error> {
    config
        .validate()
        .map_err(|(key, message)| Error::InvalidInput(format!("config: {key}: {message}")))?;
    let router = Router::new(config);
    let coord_addr = &config.coord.client_api_addr;
    let deadline = Instant::now() + Duration::from_millis(config.client.op_timeout_ms);
    let mut backoff = Backoff::new(
        Duration::from_millis(COORD_RETRY_INITIAL_MS),
        Duration::from_millis(COORD_RETRY_MAX_MS),
    );
    debug!(action = "LeaderReq", client_id);
    loop {
        let attempt = ask_coord(&router, coord_addr, client_id);
        let last_error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(info)) => {
                debug!(action = "LeaderResRecvd", client_id, term = info.term,
                    leader_id = info.leader_id, leader_uuid = %info.leader_uuid);
                return Ok(info);
            }
            Ok(Err(message)) => message,
            Err(_) => "the coord did not answer in time".to_string(),
        };
        let wake = Instant::now() + backoff.next_delay();
        if wake >= deadline {
            return Err(Error::Timeout {
                op: "GetLeader",
                last_error,
            });
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// One `GetLeader` call to the coord, bounded by the attempt timeout.
async fn ask_coord(router: &Router, addr: &str, client_id: &str) -> Result<LeaderInfo, String> {
    let channel = router.channel(addr)?;
    let trace = router.tracer().map(|t| {
        let trace = t.create_trace();
        trace.record_action(&LeaderReq {
            client_id: client_id.to_string(),
        });
        trace
    });
    let request = pb::GetLeaderRequest {
        client_id: client_id.to_string(),
        trace_token: kvraft_tracing::token(trace.as_ref(), "GetLeaderRequest"),
    };
    if let Some(t) = router.tracer() {
        t.flush().await;
    }
    let timeout = router.attempt_timeout();
    let mut coord = CoordClientClient::new(channel);
    let make_span = || tracing::info_span!("kvslib.leader", client_id, coord = addr);
    let Attempt { span, request } = attempt_request(make_span, request);
    let call = coord.get_leader(request).instrument(span);
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => {
            let response = response.into_inner();
            if let Some(t) = router.tracer() {
                t.receive_token(&response.trace_token)
                    .record_action(&LeaderResRecvd {
                        client_id: client_id.to_string(),
                        leader_id: response.leader_id,
                        term: response.term,
                    });
            }
            Ok(response.into())
        }
        Ok(Err(status)) => Err(format!("coord {addr}: {status}")),
        Err(_) => Err(format!(
            "coord {addr}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// One attempt of an operation, as a child span of the operation's span (when spans are
/// exported) whose W3C trace context rides in the request's gRPC metadata.
struct Attempt<T> {
    span: tracing::Span,
    request: tonic::Request<T>,
}

fn attempt_request<T>(make_span: impl FnOnce() -> tracing::Span, msg: T) -> Attempt<T> {
    let span = kvraft_telemetry::span_if_enabled(make_span);
    let mut request = tonic::Request::new(msg);
    kvraft_telemetry::inject_metadata(&span, request.metadata_mut());
    Attempt { span, request }
}

/// A Kv client whose messages may be as large as the cluster's largest value needs.
pub(crate) fn kv_client(
    channel: tonic::transport::Channel,
    limit: usize,
) -> KvClient<tonic::transport::Channel> {
    KvClient::new(channel)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

async fn put_attempt(
    batcher: Arc<Batcher<Puts>>,
    channel: tonic::transport::Channel,
    addr: String,
    attempt: Attempt<pb::PutRequest>,
    trace: Option<Trace>,
) -> Result<PutOutcome, Failure> {
    let Attempt { span, request } = attempt;
    let call = || {
        let addr = addr.clone();
        async move { batcher.call(channel, &addr, request).await }
    };
    let response = kv_answer(&addr, trace.as_ref(), call)
        .instrument(span)
        .await?;
    Ok(PutOutcome {
        version: response.version,
        index: response.index,
    })
}

async fn txn_attempt(
    channel: tonic::transport::Channel,
    addr: String,
    attempt: Attempt<pb::TxnRequest>,
    trace: Option<Trace>,
    limit: usize,
) -> Result<TxnOutcome, Failure> {
    let Attempt { span, request } = attempt;
    let call = || async move { kv_client(channel, limit).txn(request).await };
    let response = kv_call(&addr, trace.as_ref(), call)
        .instrument(span)
        .await?;
    txn::outcome_of(&response)
        .map_err(|e| Failure::Fatal(Error::Unavailable(format!("server {addr}: {e}"))))
}

async fn range_attempt(
    channel: tonic::transport::Channel,
    addr: String,
    attempt: Attempt<pb::RangeRequest>,
    trace: Option<Trace>,
    limit: usize,
) -> Result<RangePage, Failure> {
    let Attempt { span, request } = attempt;
    let call = || async move { kv_client(channel, limit).range(request).await };
    let response = kv_call(&addr, trace.as_ref(), call)
        .instrument(span)
        .await?;
    Ok(RangePage {
        kvs: response
            .kvs
            .iter()
            .map(|kv| KeyValue {
                key: kv.key.to_vec(),
                value: txn::versioned_of(kv),
            })
            .collect(),
        more: response.more,
        next_key: response.next_key.to_vec(),
        revision: response.revision,
    })
}

async fn get_attempt(
    batcher: Arc<Batcher<Gets>>,
    channel: tonic::transport::Channel,
    addr: String,
    attempt: Attempt<pb::GetRequest>,
    trace: Option<Trace>,
) -> Result<Option<Versioned>, Failure> {
    let Attempt { span, request } = attempt;
    let call = || {
        let addr = addr.clone();
        async move { batcher.call(channel, &addr, request).await }
    };
    let response = kv_answer(&addr, trace.as_ref(), call)
        .instrument(span)
        .await?;
    Ok(response.found.then(|| Versioned {
        value: response.value.to_vec(),
        version: response.version,
        create_revision: response.create_revision,
        mod_revision: response.mod_revision,
    }))
}

/// A concurrency permit, waited for no longer than the operation's deadline.
async fn acquire<'a>(
    permits: &'a Semaphore,
    op: &'static str,
    deadline: Instant,
) -> Result<SemaphorePermit<'a>, Error> {
    match tokio::time::timeout_at(deadline, permits.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_closed)) => Err(Error::Unavailable("client is shutting down".to_string())),
        Err(_) => Err(Error::Timeout {
            op,
            last_error: "too many operations of this client in flight".to_string(),
        }),
    }
}

/// The tracer identity of a client: `client<id>` (an id that already starts with `client` is
/// kept), without whitespace, which the ShiViz log cannot hold in a host name.
fn trace_identity(client_id: &str) -> String {
    let id: String = client_id
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    if id.starts_with("client") {
        id
    } else {
        format!("client{id}")
    }
}

/// A short, printable form of a key for logs.
fn preview(key: &[u8]) -> String {
    let shown = &key[..key.len().min(KEY_PREVIEW_BYTES)];
    let mut text = String::from_utf8_lossy(shown).into_owned();
    if key.len() > KEY_PREVIEW_BYTES {
        text.push_str(&format!("...({} bytes)", key.len()));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kvraft_common::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};

    use super::*;

    /// A client whose servers and coord are unreachable, with a deadline far beyond the
    /// test's patience: any network attempt would make the call hang, not fail fast.
    fn offline_config() -> ClusterConfig {
        let text = r#"
[coord]
server_api_addr = "127.0.0.1:9"
client_api_addr = "127.0.0.1:10"
data_dir = "coord"
[[servers]]
id = 1
addr = "127.0.0.1:11"
data_dir = "s1"
[client]
op_timeout_ms = 600000
attempt_timeout_ms = 600000
"#;
        ClusterConfig::parse(text, Path::new("test.toml")).expect("valid test config")
    }

    fn offline_client() -> Client {
        let config = offline_config();
        let router = Arc::new(Router::new(&config));
        Client::assemble(&config, "c1", router, None, Some(1))
    }

    async fn refused(call: impl std::future::Future<Output = Result<(), Error>>) -> String {
        let result = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("input checks must not wait for the network");
        match result {
            Err(Error::InvalidInput(message)) => message,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_or_empty_input_is_refused_before_any_network() {
        let c = offline_client();
        let put = |k: Vec<u8>, v: Vec<u8>| {
            let c = c.clone();
            async move { c.put(k, v).await.map(|_| ()) }
        };
        let m = refused(put(vec![], b"v".to_vec())).await;
        assert!(m.contains("key is empty"), "{m}");
        let m = refused(put(vec![b'k'; KEY_BYTES_MAX + 1], b"v".to_vec())).await;
        assert!(m.contains("key is 1025 bytes") && m.contains("1024"), "{m}");
        let m = refused(put(b"k".to_vec(), vec![0; VALUE_BYTES_MAX + 1])).await;
        assert!(
            m.contains("value is 1048577 bytes") && m.contains("1048576"),
            "{m}"
        );
        let m = refused(async { c.get("").await.map(|_| ()) }).await;
        assert!(m.contains("key is empty"), "{m}");
        let long_key = vec![b'k'; KEY_BYTES_MAX + 1];
        let m = refused(async { c.get_versioned(&long_key).await.map(|_| ()) }).await;
        assert!(m.contains("key is 1025 bytes"), "{m}");
        assert!(Error::InvalidInput(m).is_definite());
    }

    #[tokio::test]
    async fn an_oversized_client_id_is_refused_at_connect() {
        let config = offline_config();
        let long = "c".repeat(kvraft_common::limits::CLIENT_ID_BYTES_MAX + 1);
        let m = refused(async { Client::connect(&config, &long).await.map(|_| ()) }).await;
        assert!(m.starts_with("client_id is 257 bytes"), "{m}");
    }

    #[tokio::test]
    async fn input_at_the_limits_is_accepted_by_the_check() {
        let key = vec![b'k'; KEY_BYTES_MAX];
        let value = vec![0; VALUE_BYTES_MAX];
        assert_eq!(check_key_value(&key, Some(&value)), Ok(()));
    }

    #[test]
    fn key_preview_is_bounded() {
        assert_eq!(preview(b"k1"), "k1");
        let long = preview(&[b'x'; 1000]);
        assert!(long.len() < 100 && long.ends_with("(1000 bytes)"), "{long}");
    }
}
