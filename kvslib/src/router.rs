//! Where each attempt goes, and the retry loop every operation runs.
//!
//! ```text
//!            +---------------- coord WatchLeader (watcher.rs) ---+
//!            v                                                   |
//!   watch<LeaderInfo> <-- NOT_LEADER hints (term >= known) --+   |
//!            |                                               |   |
//!   call(op) -+-> leader known? --yes--> attempt on leader --+---+--> Ok / fatal error
//!                      | no / it failed                      |
//!                      +--> wait for a leader change, else probe the servers round-robin
//! ```
//!
//! Invariants: every loop is bounded by the operation's deadline and every attempt by
//! `attempt_timeout_ms` (never beyond the deadline); waits between attempts grow with a capped
//! backoff; the leader view only moves forward (see `leader.rs`). One lazily connected channel
//! per server address is shared by all requests, so concurrent calls are pipelined over HTTP/2.

use kvraft_tracing::Tracer;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kvraft_common::ClusterConfig;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use crate::backoff::Backoff;
use crate::failure::Failure;
use crate::{Error, LeaderInfo};

/// Cap of the first wait after a failed attempt (each wait is drawn below its cap, see
/// `backoff.rs`): about one round trip plus scheduling on a busy host, so a transient error
/// costs little.
const RETRY_BACKOFF_INITIAL_MS: u64 = 20;
/// Largest cap of the wait between attempts: below the coord's default failure timeout
/// (300 ms), so a client notices a new leader about as soon as it exists, without hammering a
/// dead cluster.
const RETRY_BACKOFF_MAX_MS: u64 = 250;
/// How one attempt ended.
enum Attempted<T> {
    Done(Result<T, Failure>),
    /// The leader view moved to another server while the attempt waited.
    LeaderMoved(String),
}

/// Most cached channels. Addresses come from the config (at most 9 servers) and from the
/// coord; the cap only guards against a misbehaving coord handing out endless addresses.
const CHANNELS_MAX: usize = 64;
/// HTTP/2 keepalive ping period on idle connections: a silently dead peer (power loss,
/// partition) is noticed within interval + timeout instead of never for a long-lived stream.
const KEEPALIVE_INTERVAL_MS: u64 = 2_000;
/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT_MS: u64 = 2_000;

pub(crate) struct Router {
    /// `(server id, IP:port)` from the config; hints name servers by id.
    servers: Vec<(u32, String)>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The current leader view, updated by the watcher task and by hints.
    leader: watch::Sender<LeaderInfo>,
    /// Round-robin position for probing when no leader is known.
    next_probe: AtomicUsize,
    attempt_timeout: Duration,
    /// Trace events (DESIGN section 5); `None` when tracing is off.
    tracer: Option<Tracer>,
}

/// Per-operation retry state.
struct RetryState {
    /// True after a failure with no leader change: try the servers in turn.
    probing: bool,
    backoff: Backoff,
    /// Why the last attempt failed, for the timeout error.
    last_error: String,
    /// The address the last attempt went to; the next probe skips it.
    last_addr: Option<String>,
    /// Short waits spent on a designated leader that has not heard of its designation yet
    /// (at most [`DESIGNATION_WAITS_MAX`] per operation).
    designation_waits: u32,
}

/// The coord publishes a new leader to clients and tells the leader in the same moment, so a
/// client can ask the new leader before it knows: it answers "not the leader, leader unknown" in
/// the view's term. The client asks it again after this pause rather than back off and probe
/// the other servers (which cost hundreds of ms after a failover), at most
/// [`DESIGNATION_WAITS_MAX`] times.
const DESIGNATION_WAIT_MS: u64 = 3;
const DESIGNATION_WAITS_MAX: u32 = 30;

impl Router {
    pub(crate) fn new(config: &ClusterConfig) -> Router {
        assert!(!config.servers.is_empty(), "invariant: config validated");
        Router {
            servers: config
                .servers
                .iter()
                .map(|s| (s.id, s.addr.clone()))
                .collect(),
            channels: Mutex::new(HashMap::new()),
            leader: watch::Sender::new(LeaderInfo::default()),
            next_probe: AtomicUsize::new(0),
            attempt_timeout: Duration::from_millis(config.client.attempt_timeout_ms),
            tracer: None,
        }
    }

    pub(crate) fn with_tracer(mut self, tracer: Option<Tracer>) -> Router {
        self.tracer = tracer;
        self
    }

    pub(crate) fn tracer(&self) -> Option<&Tracer> {
        self.tracer.as_ref()
    }

    /// Every configured server's address.
    pub(crate) fn server_addrs(&self) -> Vec<String> {
        self.servers.iter().map(|(_, addr)| addr.clone()).collect()
    }

    pub(crate) fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    pub(crate) fn leader_view(&self) -> LeaderInfo {
        self.leader.borrow().clone()
    }

    /// Replaces the leader view if `candidate` supersedes it; returns whether it did.
    pub(crate) fn offer(&self, candidate: LeaderInfo, source: &str) -> bool {
        let changed = self.leader.send_if_modified(|current| {
            if !current.is_superseded_by(&candidate) {
                return false;
            }
            *current = candidate.clone();
            true
        });
        if changed {
            debug!(source, term = candidate.term, leader_id = candidate.leader_id,
                leader_addr = %candidate.leader_addr, "leader view changed");
        }
        changed
    }

    /// The lazily connected channel to `addr`, shared by every request to it.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad server address {addr:?}: {e}"))?
            .connect_timeout(self.attempt_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        if channels.len() < CHANNELS_MAX {
            channels.insert(addr.to_string(), channel.clone());
        }
        Ok(channel)
    }

    /// Runs `attempt` against the leader (or, failing that, other servers) until it succeeds,
    /// fails for good, or `deadline` passes. `attempt` gets a channel and the server address
    /// (for error messages) and is called afresh for every try, so it can recompute fields
    /// such as `ack_seq`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Channel, String) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut rx = self.leader.subscribe();
        let mut state = RetryState {
            probing: false,
            backoff: Backoff::new(
                Duration::from_millis(RETRY_BACKOFF_INITIAL_MS),
                Duration::from_millis(RETRY_BACKOFF_MAX_MS),
            ),
            last_error: "no attempt finished before the deadline".to_string(),
            last_addr: None,
            designation_waits: 0,
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op,
                    last_error: state.last_error,
                });
            }
            let addr = self.pick_target(&mut rx, &state);
            let result = match self
                .attempt_once(&addr, deadline - now, &mut attempt, &mut rx)
                .await
            {
                Attempted::Done(result) => result,
                Attempted::LeaderMoved(message) => {
                    // Abandoned for the new leader, at once and with the same request
                    // identity (a put that the old leader did apply is answered from the
                    // session table).
                    debug!(op, addr = %addr, "{message}");
                    state.last_error = message;
                    state.last_addr = Some(addr);
                    state.probing = false;
                    continue;
                }
            };
            let failure = match result {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(error)) => return Err(error),
                Err(failure) => failure,
            };
            debug!(op, addr = %addr, failure = ?failure, "attempt failed");
            state.last_addr = Some(addr.clone());
            self.after_failure(failure, &addr, &mut rx, &mut state, deadline)
                .await;
        }
    }

    /// One attempt against `addr`, bounded by the attempt timeout and the time left, and
    /// abandoned as soon as the leader view names another server: a leader that hangs (no
    /// connection reset) would otherwise hold each request for the whole attempt timeout
    /// after the coord has replaced it.
    async fn attempt_once<T, F, Fut>(
        &self,
        addr: &str,
        time_left: Duration,
        attempt: &mut F,
        rx: &mut watch::Receiver<LeaderInfo>,
    ) -> Attempted<T>
    where
        F: FnMut(Channel, String) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let channel = match self.channel(addr) {
            Ok(c) => c,
            Err(e) => return Attempted::Done(Err(Failure::Retry(e))),
        };
        let limit = time_left.min(self.attempt_timeout);
        let moved = async {
            loop {
                if rx.changed().await.is_err() {
                    return std::future::pending::<String>().await;
                }
                let view = rx.borrow().clone();
                if let Some(leader) = self.leader_addr(&view).filter(|a| a != addr) {
                    return format!(
                        "server {addr}: abandoned, the leader is now server {} at {leader} \
                         (term {})",
                        view.leader_id, view.term
                    );
                }
            }
        };
        tokio::select! {
            result = tokio::time::timeout(limit, attempt(channel, addr.to_string())) => {
                Attempted::Done(result.unwrap_or_else(|_| {
                    Err(Failure::Retry(format!(
                        "server {addr}: no answer within {} ms",
                        limit.as_millis()
                    )))
                }))
            }
            message = moved => Attempted::LeaderMoved(message),
        }
    }

    /// Decides how to continue after a retryable failure (never returns a `Fatal` one).
    async fn after_failure(
        &self,
        failure: Failure,
        addr: &str,
        rx: &mut watch::Receiver<LeaderInfo>,
        state: &mut RetryState,
        deadline: Instant,
    ) {
        match failure {
            Failure::NotLeader { leader_id, term } => {
                state.last_error = format!(
                    "server {addr}: not the leader (hint: leader {leader_id}, term {term})"
                );
                if self.follow_hint(leader_id, term, addr) {
                    // Go to the leader at once. No hot loop: a hint only agrees with the view
                    // after the view advanced, or after a probe, which follows a back-off wait.
                    state.probing = false;
                    return;
                }
                if self.designated_but_not_told(leader_id, term, addr)
                    && state.designation_waits < DESIGNATION_WAITS_MAX
                {
                    state.designation_waits += 1;
                    state.probing = false;
                    let wake = Instant::now() + Duration::from_millis(DESIGNATION_WAIT_MS);
                    tokio::time::sleep_until(wake.min(deadline)).await;
                    return;
                }
                self.wait_or_probe(rx, state, deadline).await;
            }
            Failure::Busy(message) => {
                // The leader is fine but holds too many of our puts: same server, later.
                state.last_error = message;
                let wake = (Instant::now() + state.backoff.next_delay()).min(deadline);
                tokio::time::sleep_until(wake).await;
            }
            Failure::Retry(message) => {
                state.last_error = message;
                self.wait_or_probe(rx, state, deadline).await;
            }
            Failure::Fatal(_) => unreachable!("invariant: fatal failures end the call"),
        }
    }

    /// Takes a `NOT_LEADER` hint if it supersedes the view. Returns whether the next attempt
    /// should go to the hinted leader at once: when the hint is the current view (new, or
    /// confirming a leader that we were probing around after a timeout) and names a server
    /// other than the one that sent it.
    fn follow_hint(&self, leader_id: u32, term: u64, asked: &str) -> bool {
        let addr = self.server_addr(leader_id);
        let hint = LeaderInfo::from_hint(leader_id, term, addr);
        self.offer(hint, "hint");
        let view = self.leader_view();
        let agrees = leader_id != 0 && view.leader_id == leader_id && view.term == term;
        agrees && addr.is_some_and(|a| a != asked)
    }

    /// Whether `asked` is the leader the view names for `term` and answered "leader unknown" in
    /// that same term: it has not yet received the coord's designation, which is on its way.
    fn designated_but_not_told(&self, leader_id: u32, term: u64, asked: &str) -> bool {
        let view = self.leader_view();
        leader_id == 0
            && view.term == term
            && view.leader_id != 0
            && self.server_addr(view.leader_id) == Some(asked)
    }

    /// Waits for a leader change for a short, growing time; if none comes, the next attempts
    /// probe the servers in turn (a server that is not the leader answers with a hint).
    async fn wait_or_probe(
        &self,
        rx: &mut watch::Receiver<LeaderInfo>,
        state: &mut RetryState,
        deadline: Instant,
    ) {
        let wake = (Instant::now() + state.backoff.next_delay()).min(deadline);
        tokio::select! {
            changed = rx.changed() => state.probing = changed.is_err(),
            _ = tokio::time::sleep_until(wake) => state.probing = true,
        }
    }

    /// The address of the next attempt: the leader unless probing or none is known.
    fn pick_target(&self, rx: &mut watch::Receiver<LeaderInfo>, state: &RetryState) -> String {
        let view = rx.borrow_and_update().clone();
        if !state.probing {
            if let Some(addr) = self.leader_addr(&view) {
                return addr;
            }
        }
        self.next_probe_addr(state.last_addr.as_deref())
    }

    /// The leader's address: the configured one for its id, else what the coord published.
    fn leader_addr(&self, view: &LeaderInfo) -> Option<String> {
        if !view.has_leader() {
            return None;
        }
        self.server_addr(view.leader_id)
            .map(str::to_string)
            .or_else(|| Some(view.leader_addr.clone()).filter(|a| !a.is_empty()))
    }

    fn server_addr(&self, id: u32) -> Option<&str> {
        self.servers
            .iter()
            .find(|(sid, _)| *sid == id)
            .map(|(_, addr)| addr.as_str())
    }

    /// The next server in round-robin order, skipping `avoid` when there is a choice.
    fn next_probe_addr(&self, avoid: Option<&str>) -> String {
        let n = self.servers.len();
        for _ in 0..n {
            let i = self.next_probe.fetch_add(1, Ordering::Relaxed) % n;
            let addr = &self.servers[i].1;
            if n == 1 || avoid != Some(addr.as_str()) {
                return addr.clone();
            }
        }
        self.servers[0].1.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn router() -> Router {
        let mut text = String::from(
            "[coord]\nserver_api_addr = \"127.0.0.1:9\"\nclient_api_addr = \"127.0.0.1:10\"\n\
             data_dir = \"coord\"\n",
        );
        for id in 1..=3 {
            text += &format!(
                "[[servers]]\nid = {id}\naddr = \"127.0.0.1:2100{id}\"\ndata_dir = \"s{id}\"\n"
            );
        }
        Router::new(&ClusterConfig::parse(&text, Path::new("t.toml")).expect("valid config"))
    }

    #[test]
    fn hints_move_the_view_forward_only() {
        let r = router();
        assert!(
            r.follow_hint(2, 5, "127.0.0.1:21001"),
            "new leader: go there"
        );
        assert_eq!(
            r.leader_addr(&r.leader_view()).as_deref(),
            Some("127.0.0.1:21002")
        );
        assert!(
            !r.follow_hint(3, 4, "127.0.0.1:21001"),
            "older term ignored"
        );
        assert!(
            !r.follow_hint(3, 5, "127.0.0.1:21001"),
            "other leader, same term ignored"
        );
        assert_eq!(r.leader_view().leader_id, 2);
        assert!(
            !r.follow_hint(0, 6, "127.0.0.1:21002"),
            "newer term, leader unknown"
        );
        assert!(!r.leader_view().has_leader());
        assert_eq!(r.leader_addr(&r.leader_view()), None);
    }

    #[test]
    fn a_hint_confirming_the_leader_ends_probing_unless_it_names_the_sender() {
        let r = router();
        r.follow_hint(2, 5, "127.0.0.1:21001");
        assert!(
            r.follow_hint(2, 5, "127.0.0.1:21003"),
            "a probe confirms leader 2"
        );
        assert!(
            !r.follow_hint(2, 5, "127.0.0.1:21002"),
            "leader 2 naming itself"
        );
    }

    #[test]
    fn the_coords_address_is_used_only_for_unconfigured_ids() {
        let r = router();
        let mut view = LeaderInfo::from_hint(2, 1, None);
        view.leader_addr = "10.0.0.2:7".into();
        assert_eq!(r.leader_addr(&view).as_deref(), Some("127.0.0.1:21002"));
        view.leader_id = 9;
        assert_eq!(r.leader_addr(&view).as_deref(), Some("10.0.0.2:7"));
    }

    #[test]
    fn probes_cycle_through_the_servers_skipping_the_one_that_just_failed() {
        let r = router();
        let probes: Vec<String> = (0..3).map(|_| r.next_probe_addr(None)).collect();
        let mut sorted = probes.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "{probes:?}");
        for _ in 0..6 {
            assert_ne!(
                r.next_probe_addr(Some("127.0.0.1:21002")),
                "127.0.0.1:21002"
            );
        }
    }
}
