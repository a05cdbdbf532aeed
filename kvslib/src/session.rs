//! The client's session with the cluster: its id, the seq bookkeeping of its puts, and
//! renewal when the server reports it expired.
//!
//! ```text
//!   Sessions.current --> Arc<Session{id, SeqTracker}> <-- held by every put of that session
//!        | SESSION_EXPIRED on session S
//!        v
//!   renew(S): one caller registers a new session under `renew_lock`; the others find
//!   `current.id != S` afterwards and reuse it
//! ```
//!
//! Invariants: a put keeps the `Arc<Session>` it started with for all its attempts, so a
//! renewal never gives a put a second identity (its seq belongs to exactly one session); a
//! put's seq is finished exactly once, by [`SeqGuard`]'s drop, also when the caller's future is
//! cancelled; a seq is assigned only within the session window (`SESSION_WINDOW_MAX` above the
//! ack watermark), waiting for older puts to finish if need be. A client connected without a
//! session starts with an unregistered stand-in, marked expired, so its first put registers
//! one. Registration retries may leak a session whose answer was lost; the server expires it
//! by TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvraft_common::limits::SESSION_WINDOW_MAX;
use kvraft_proto as pb;
use pb::kv_client::KvClient;
use tokio::time::Instant;
use tracing::debug;

use crate::failure::Failure;
use crate::kv_call::kv_call;
use crate::router::Router;
use crate::seq_tracker::SeqTracker;
use crate::{Error, PUTS_IN_FLIGHT_MAX};

pub(crate) struct Session {
    pub(crate) id: u64,
    seqs: Mutex<SeqTracker>,
    /// Woken whenever a put of this session finishes: a put waiting for the window retries.
    finished: tokio::sync::Notify,
    /// Set when a server said the session is unknown; the next operation renews it first.
    expired: AtomicBool,
}

/// A put's seq, finished (answered or abandoned) when dropped.
pub(crate) struct SeqGuard {
    session: Arc<Session>,
    pub(crate) seq: u64,
}

pub(crate) struct Sessions {
    client_id: String,
    current: Mutex<Arc<Session>>,
    /// Serializes renewals so concurrent callers that saw the same expiry register only once.
    renew_lock: tokio::sync::Mutex<()>,
}

impl Session {
    fn new(id: u64) -> Arc<Session> {
        assert!(id != 0, "invariant: session ids start at 1");
        Session::with_id(id, false)
    }

    fn with_id(id: u64, expired: bool) -> Arc<Session> {
        Arc::new(Session {
            id,
            seqs: Mutex::new(SeqTracker::new()),
            finished: tokio::sync::Notify::new(),
            expired: AtomicBool::new(expired),
        })
    }

    /// The stand-in of a client that has not registered a session yet: marked expired, so the
    /// first put registers one (through `Sessions::usable`), as after an expiry.
    fn unregistered() -> Arc<Session> {
        Session::with_id(0, true)
    }

    fn seqs(&self) -> MutexGuard<'_, SeqTracker> {
        self.seqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Assigns the next seq of this session, in issue order, once it fits the session window
    /// (an older put still unanswered holds it back); a timeout if it does not by `deadline`.
    pub(crate) async fn begin_put(self: &Arc<Self>, deadline: Instant) -> Result<SeqGuard, Error> {
        loop {
            // Registered before checking, so a put finishing in between still wakes us.
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            {
                let mut seqs = self.seqs();
                if seqs.fits_window(SESSION_WINDOW_MAX) {
                    let seq = seqs.assign();
                    assert!(
                        seqs.in_flight() <= PUTS_IN_FLIGHT_MAX,
                        "invariant: the put permits bound the seqs in flight"
                    );
                    return Ok(SeqGuard {
                        session: Arc::clone(self),
                        seq,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return Err(Error::Timeout {
                    op: "Put",
                    last_error: format!(
                        "not sent: an older put of the session is still unanswered and the \
                         session window ({SESSION_WINDOW_MAX} puts) is full"
                    ),
                });
            }
        }
    }

    /// The `ack_seq` to send now; changes as other puts of the session finish.
    pub(crate) fn ack_seq(&self) -> u64 {
        self.seqs().ack_seq()
    }
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        self.session.seqs().finish(self.seq);
        self.session.finished.notify_waiters();
    }
}

impl Sessions {
    /// The sessions of `client_id`, starting with `session_id` (`None`: the first put
    /// registers one).
    pub(crate) fn new(client_id: &str, session_id: Option<u64>) -> Sessions {
        let first = session_id.map_or_else(Session::unregistered, Session::new);
        Sessions {
            client_id: client_id.to_string(),
            current: Mutex::new(first),
            renew_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn current(&self) -> Arc<Session> {
        Arc::clone(&self.current.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn current_id(&self) -> u64 {
        self.current().id
    }

    /// The session for a new put, renewed first if a server reported it expired.
    pub(crate) async fn usable(
        &self,
        router: &Router,
        deadline: Instant,
    ) -> Result<Arc<Session>, Error> {
        let session = self.current();
        if !session.expired.load(Ordering::Acquire) {
            return Ok(session);
        }
        self.renew(router, &session, deadline).await?;
        Ok(self.current())
    }

    /// Replaces `stale` by a newly registered session, unless another caller already did.
    pub(crate) async fn renew(
        &self,
        router: &Router,
        stale: &Session,
        deadline: Instant,
    ) -> Result<(), Error> {
        stale.expired.store(true, Ordering::Release);
        let lock = tokio::time::timeout_at(deadline, self.renew_lock.lock()).await;
        let _guard = lock.map_err(|_| Error::Timeout {
            op: "RegisterSession",
            last_error: "waiting for another caller's session renewal".to_string(),
        })?;
        if self.current_id() != stale.id {
            return Ok(());
        }
        let id = register(router, &self.client_id, deadline).await?;
        debug!(client_id = %self.client_id, old = stale.id, new = id, "session renewed");
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Session::new(id);
        Ok(())
    }
}

/// Registers a fresh session through the leader; returns its id.
pub(crate) async fn register(
    router: &Router,
    client_id: &str,
    deadline: Instant,
) -> Result<u64, Error> {
    router
        .call("RegisterSession", deadline, |channel, addr| {
            let trace = router.tracer().map(|t| t.create_trace());
            let request = pb::RegisterSessionRequest {
                client_id: client_id.to_string(),
                trace_token: kvraft_tracing::token(trace.as_ref(), "RegisterSessionRequest"),
            };
            async move {
                let call = || async move { KvClient::new(channel).register_session(request).await };
                let response = kv_call(&addr, trace.as_ref(), call).await?;
                if response.session_id == 0 {
                    return Err(Failure::Retry(format!(
                        "server {addr}: answered RegisterSession with session id 0"
                    )));
                }
                Ok(response.session_id)
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(5)
    }

    #[tokio::test]
    async fn dropped_guards_release_their_seq_in_any_order() {
        let session = Session::new(7);
        let a = session.begin_put(later()).await.unwrap();
        let b = session.begin_put(later()).await.unwrap();
        let c = session.begin_put(later()).await.unwrap();
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        drop(b);
        assert_eq!(session.ack_seq(), 1);
        drop(a);
        assert_eq!(session.ack_seq(), 3);
        drop(c);
        assert_eq!(session.ack_seq(), 4);
    }

    #[tokio::test]
    async fn a_new_session_starts_its_seqs_at_one() {
        let sessions = Sessions::new("c1", Some(5));
        let old = sessions.current();
        let _g = old.begin_put(later()).await.unwrap();
        *sessions.current.lock().unwrap() = Session::new(9);
        let fresh = sessions.current();
        assert_eq!(fresh.id, 9);
        assert_eq!(fresh.begin_put(later()).await.unwrap().seq, 1);
        assert_eq!(old.ack_seq(), 1, "the old session's put is still in flight");
    }

    /// One put left unanswered while the session's later puts go through: once the window is
    /// full the next put waits for it (the server keeps every result at or above ack_seq, so
    /// a retry of the old one still gets its answer), and goes on as soon as it finishes.
    #[tokio::test]
    async fn a_full_window_waits_for_the_oldest_put() {
        let session = Session::new(3);
        let oldest = session.begin_put(later()).await.unwrap();
        for _ in 1..SESSION_WINDOW_MAX {
            drop(session.begin_put(later()).await.unwrap());
        }
        let soon = Instant::now() + std::time::Duration::from_millis(50);
        let waited = session.begin_put(soon).await;
        assert!(
            matches!(waited, Err(Error::Timeout { .. })),
            "{:?}",
            waited.err()
        );
        let waiter = {
            let session = Arc::clone(&session);
            tokio::spawn(async move { session.begin_put(later()).await.map(|g| g.seq) })
        };
        tokio::task::yield_now().await;
        drop(oldest);
        let seq = waiter.await.unwrap().unwrap();
        assert_eq!(seq, SESSION_WINDOW_MAX + 1);
    }
}
