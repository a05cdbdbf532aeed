//! [`Watcher`]: a simulated watch client, run over the servers' real watch code.
//!
//! ```text
//!   node step ──changes──▶ node's WatchHub (as the runtime publishes them)
//!                              │ subscribe(next) ─▶ serve_watch (the server's own stream task,
//!                              │                    polled here with a no-op waker)
//!                              ▼                         │ bounded channel
//!   Watcher: header, one response per revision, canceled(resume) ◀┘
//!     node crashed / canceled ─▶ resume on a random up node from `next`
//!     every node refuses `next` as compacted ─▶ the segment ends; a new one starts from now
//! ```
//!
//! As kvslib's `Watch`: it asks for every change of its range from a revision, and after
//! losing its server resumes on another from the first revision it was not given. What it
//! was given is kept in segments (a segment ends only when no server holds the revision to
//! resume from), and each segment must equal, revision by revision, the changes the replay of
//! the committed log made to the range (`Invariants::check_watch_segments`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};

use kvraft_proto::{watch_event, WatchResponse};
use kvraft_server::watch::{WatchHub, STREAM_BUFFER};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::mpsc;

/// One change as a watch delivered it: (revision, key, new value and version; `None`:
/// deleted).
pub type Delivered = (u64, String, Option<(String, u64)>);

/// What one watch delivered without a gap: every change of the range with a revision in
/// `[from, through]`.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    pub from: u64,
    pub through: u64,
    pub events: Vec<Delivered>,
}

type Stream = Pin<Box<dyn Future<Output = ()>>>;

struct Open {
    node: u32,
    incarnation: u64,
    task: Option<Stream>,
    rx: mpsc::Receiver<Result<WatchResponse, tonic::Status>>,
}

/// Pause before a watcher (re)opens its watch.
const REOPEN_MS: std::ops::RangeInclusive<u64> = 5..=60;

pub struct Watcher {
    pub id: u32,
    start: String,
    end: String,
    open: Option<Open>,
    /// The first revision not yet given; 0: the current segment has not started (it starts
    /// from the revision after the next header).
    next: u64,
    /// The revision the first open asks for (0: now).
    first_from: u64,
    reopen_at_ms: u64,
    pub segments: Vec<Segment>,
    /// Watches opened, opens refused as compacted, and cancellations received.
    pub opened: u64,
    pub refused: u64,
    pub canceled: u64,
    pub violations: Vec<String>,
}

impl Watcher {
    pub fn new(id: u32, (start, end): (&str, &str), from: u64, open_at_ms: u64) -> Watcher {
        Watcher {
            id,
            start: start.to_string(),
            end: end.to_string(),
            open: None,
            next: 0,
            first_from: from,
            reopen_at_ms: open_at_ms,
            segments: Vec::new(),
            opened: 0,
            refused: 0,
            canceled: 0,
            violations: Vec::new(),
        }
    }

    /// Runs the watcher at `now_ms`: drops a stream whose node is gone, opens one if it is
    /// time, and takes what its stream task has for it. `nodes` lists each up node's
    /// (id, incarnation, hub).
    pub fn poll(&mut self, now_ms: u64, nodes: &[(u32, u64, Arc<WatchHub>)], rng: &mut StdRng) {
        if let Some(open) = &self.open {
            let alive = nodes
                .iter()
                .any(|(id, inc, _)| *id == open.node && *inc == open.incarnation);
            if !alive {
                self.close(now_ms, rng);
            }
        }
        if self.open.is_none() && now_ms >= self.reopen_at_ms && !nodes.is_empty() {
            self.reopen(now_ms, nodes, rng);
        }
        self.drain(now_ms, rng);
    }

    /// The watched keys, `[start, end)` (an empty end: no upper bound).
    pub fn range(&self) -> (&str, &str) {
        (&self.start, &self.end)
    }

    fn close(&mut self, now_ms: u64, rng: &mut StdRng) {
        self.open = None;
        self.reopen_at_ms = now_ms + rng.random_range(REOPEN_MS);
    }

    /// Opens the watch on an up node from `next`, trying them all from a random one; if every
    /// one refuses `next` as compacted the segment ends and a new one starts from now.
    fn reopen(&mut self, now_ms: u64, nodes: &[(u32, u64, Arc<WatchHub>)], rng: &mut StdRng) {
        let from = match self.next {
            0 => std::mem::take(&mut self.first_from),
            n => n,
        };
        let first = rng.random_range(0..nodes.len());
        for i in 0..nodes.len() {
            let (id, incarnation, hub) = &nodes[(first + i) % nodes.len()];
            let range = (
                prost::bytes::Bytes::from(self.start.clone().into_bytes()),
                prost::bytes::Bytes::from(self.end.clone().into_bytes()),
            );
            match hub.subscribe(from, range.clone()) {
                Err(_) => self.refused += 1,
                Ok(sub) => {
                    self.opened += 1;
                    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
                    let task = kvraft_server::service::serve_watch(tx, range, hub.clone(), sub);
                    self.open = Some(Open {
                        node: *id,
                        incarnation: *incarnation,
                        task: Some(Box::pin(task)),
                        rx,
                    });
                    return;
                }
            }
        }
        // No server holds `from`: what was given so far is a segment of its own.
        self.end_segment();
        self.reopen_at_ms = now_ms + rng.random_range(REOPEN_MS);
    }

    fn end_segment(&mut self) {
        if self.next != 0 {
            if let Some(s) = self.segments.last_mut() {
                s.through = self.next - 1;
            }
        }
        self.next = 0;
    }

    /// Polls the stream task and takes its responses until it waits for new changes.
    fn drain(&mut self, now_ms: u64, rng: &mut StdRng) {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let Some(open) = self.open.as_mut() else {
                return;
            };
            let mut progressed = false;
            if let Some(task) = open.task.as_mut() {
                if task.as_mut().poll(&mut cx).is_ready() {
                    open.task = None;
                }
            }
            loop {
                let open = self.open.as_mut().expect("invariant: checked above");
                let resp = match open.rx.try_recv() {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(status)) => {
                        self.violations
                            .push(format!("watcher {}: the stream failed: {status}", self.id));
                        return;
                    }
                    Err(_) => break,
                };
                progressed = true;
                if !self.take(resp) {
                    self.close(now_ms, rng);
                    return;
                }
            }
            let open = self.open.as_ref().expect("invariant: still open");
            if open.task.is_none() && !progressed {
                // The task ended without a cancellation (it never does while the hub lives).
                self.close(now_ms, rng);
                return;
            }
            if !progressed {
                return;
            }
        }
    }

    /// Takes one response; false when the stream ended (canceled).
    fn take(&mut self, resp: WatchResponse) -> bool {
        if resp.created {
            if self.next == 0 {
                self.next = resp.revision + 1;
                self.segments.push(Segment {
                    from: self.next,
                    through: resp.revision,
                    events: Vec::new(),
                });
            } else if resp.revision + 1 != self.next {
                self.violations.push(format!(
                    "watcher {}: asked to resume from {} but the stream starts after {}",
                    self.id, self.next, resp.revision
                ));
            }
            return true;
        }
        if resp.canceled {
            self.canceled += 1;
            if resp.resume_revision < self.next {
                self.violations.push(format!(
                    "watcher {}: canceled with resume revision {} below {} (already given)",
                    self.id, resp.resume_revision, self.next
                ));
            }
            self.advance(resp.resume_revision.max(self.next));
            return false;
        }
        if resp.revision < self.next {
            self.violations.push(format!(
                "watcher {}: revision {} delivered again (next wanted {})",
                self.id, resp.revision, self.next
            ));
        }
        let segment = self.segments.last_mut().expect("invariant: a header came");
        for e in &resp.events {
            let kv = e.kv.clone().unwrap_or_default();
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let value = (e.kind == watch_event::Kind::Put as i32)
                .then(|| (String::from_utf8_lossy(&kv.value).into_owned(), kv.version));
            segment.events.push((resp.revision, key, value));
        }
        self.advance(resp.revision + 1);
        true
    }

    fn advance(&mut self, next: u64) {
        self.next = next;
        if let Some(s) = self.segments.last_mut() {
            s.through = next - 1;
        }
    }
}
