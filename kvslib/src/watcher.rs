//! The background task that follows the coord's `WatchLeader` stream into the leader view.
//!
//! ```text
//!   loop: open WatchLeader --> for each LeaderInfo: router.offer(..) --> stream ends/fails
//!         `-- wait (jittered backoff, reset once the stream delivered something) --'
//! ```
//!
//! The coord may be down for a while; the cluster keeps serving and the retry loop keeps
//! working from server hints, so this task just keeps trying to reconnect. It runs until
//! [`Watcher::stop`] or until the [`Watcher`] is dropped (the last `Client` handle going away).

use kvraft_tracing::action::LeaderNodeUpdateRecvd;
use std::sync::Arc;
use std::time::Duration;

use kvraft_proto as pb;
use pb::coord_client_client::CoordClientClient;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::backoff::Backoff;
use crate::router::Router;

/// Cap of the first (jittered) wait before reconnecting to the coord: a restarting coord is
/// usually back quickly.
const WATCH_BACKOFF_INITIAL_MS: u64 = 50;
/// Largest cap of the wait between reconnects: a client learns of a returning coord within
/// 2 s, and a coord that is down for long gets on average one connection attempt per client
/// every second.
const WATCH_BACKOFF_MAX_MS: u64 = 2_000;

/// Owns the watch task; aborts it when dropped.
pub(crate) struct Watcher {
    task: Option<JoinHandle<()>>,
}

impl Watcher {
    pub(crate) fn spawn(router: Arc<Router>, coord_addr: String, client_id: String) -> Watcher {
        let task = tokio::spawn(run(router, coord_addr, client_id));
        Watcher { task: Some(task) }
    }

    /// Stops the task and waits until it has ended.
    pub(crate) async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // A JoinError here is the cancellation just requested (or a panic already logged).
            let _ = task.await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn run(router: Arc<Router>, coord_addr: String, client_id: String) {
    let mut backoff = Backoff::new(
        Duration::from_millis(WATCH_BACKOFF_INITIAL_MS),
        Duration::from_millis(WATCH_BACKOFF_MAX_MS),
    );
    loop {
        let reason = watch_once(&router, &coord_addr, &client_id, &mut backoff).await;
        let delay = backoff.next_delay();
        debug!(coord = %coord_addr, %reason, delay_ms = delay.as_millis() as u64,
            "leader watch ended; reconnecting");
        tokio::time::sleep(delay).await;
    }
}

/// Follows one `WatchLeader` stream until it ends; returns why it ended.
async fn watch_once(
    router: &Router,
    coord_addr: &str,
    client_id: &str,
    backoff: &mut Backoff,
) -> String {
    let channel = match router.channel(coord_addr) {
        Ok(channel) => channel,
        Err(message) => return message,
    };
    let trace = router.tracer().map(|t| t.create_trace());
    let request = pb::GetLeaderRequest {
        client_id: client_id.to_string(),
        trace_token: kvraft_tracing::token(trace.as_ref(), "WatchLeader"),
    };
    if let Some(t) = router.tracer() {
        t.flush().await;
    }
    let mut client = CoordClientClient::new(channel);
    let opened = tokio::time::timeout(router.attempt_timeout(), client.watch_leader(request));
    let mut stream = match opened.await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return format!("WatchLeader refused: {status}"),
        Err(_) => return "WatchLeader not answered in time".to_string(),
    };
    loop {
        match stream.message().await {
            Ok(Some(info)) => {
                backoff.reset();
                debug!(action = "LeaderNodeUpdateRecvd", term = info.term,
                    leader_id = info.leader_id, leader_uuid = %info.leader_uuid);
                if let Some(t) = router.tracer() {
                    t.receive_token(&info.trace_token)
                        .record_action(&LeaderNodeUpdateRecvd {
                            client_id: client_id.to_string(),
                            leader_id: info.leader_id,
                            term: info.term,
                        });
                }
                router.offer(info.into(), "coord");
            }
            Ok(None) => return "the coord closed the stream".to_string(),
            Err(status) => return format!("stream failed: {status}"),
        }
    }
}
