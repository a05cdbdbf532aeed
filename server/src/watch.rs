//! Watches: the changes a server applied, by revision, for the streams that watch key ranges.
//!
//! ```text
//!   core: apply ──Change (revision, key, value | deleted)──▶ WatchHub::publish
//!     history: the latest batches, bounded ◀── every watch reads its batches here, by revision
//!     registry: single-key watches by key, range watches in a list
//!        └─ a batch's revision goes only to the watches whose range it touches
//!           (a bounded queue of revisions each; a full queue: "read the history from your
//!           cursor") ─▶ one task per watch ─▶ bounded stream to the client
//! ```
//!
//! Every replica applies the same entries, so every server's history holds the same changes
//! for the same revisions: a client that loses its server resumes on another from the last
//! revision it was given, and gets every later change exactly once, provided that server still
//! holds it. What a server holds: every change with a revision above its `floor`, which starts
//! at the applied index it started with (a restarted server knows nothing older) and moves up
//! as old batches are evicted (`[server] watch_history_revisions`, default 20,000, and
//! `watch_history_bytes`, default 16 MiB, counting [`CHANGE_OVERHEAD_BYTES`] per change
//! besides its key and value) or a snapshot is installed (its changes are not known one by
//! one). A watch from a revision at or below the floor is refused as compacted, naming the
//! floor; a watch whose next revision the history evicts (a slow reader) or a snapshot
//! replaces is canceled with the revision to resume from.
//!
//! Waking only the watches a batch touches keeps the write path's cost independent of the
//! number of idle watches: publishing a batch costs a lookup per changed key, a range check
//! per range watch, and one queue push per watch it touches. (A broadcast to every watch task
//! cost every task a wake-up per revision: with 10,000 idle watches the leader's put
//! throughput fell to 0.09x.)
//!
//! Bounds: the history; each watch's queue of revisions ([`WAKE_QUEUE`], 8 bytes each); each
//! stream's buffer ([`STREAM_BUFFER`] responses); the number of watches ([`WATCHES_MAX`]);
//! what one watch copies of the history at a time ([`REPLAY_CHUNK`]). Registering a watch and
//! publishing a batch happen under one lock, after and before the history is read and written:
//! a batch is either in the history when a watch first reads it, or reaches the watch's queue
//! (or both: a watch skips what it was given).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;
use tokio::sync::mpsc;

use crate::state_machine::{Change, Versioned};

/// Memory a change takes in the history besides its key and value (the batch, its vector
/// slot, the value's header and counters, the allocator's overhead), as counted against the
/// byte bound.
pub const CHANGE_OVERHEAD_BYTES: usize = 160;
/// Revisions queued per watch for its task; past it the watch reads the history from where it
/// is instead.
pub const WAKE_QUEUE: usize = 64;
/// Responses buffered per watch stream.
pub const STREAM_BUFFER: usize = 64;
/// Most watches a server serves at once.
pub const WATCHES_MAX: usize = 10_000;

/// The changes of one revision, in key order (a key at most once: its last change in the
/// revision).
#[derive(Debug)]
pub struct Batch {
    pub revision: u64,
    pub changes: Vec<(Bytes, Option<Versioned>)>,
    bytes: usize,
}

impl Batch {
    /// Whether a change of this batch is in `[start, end)` (an empty `end`: no upper bound).
    fn touches(&self, start: &[u8], end: &[u8]) -> bool {
        let at = self.changes.partition_point(|(k, _)| &k[..] < start);
        self.changes
            .get(at)
            .is_some_and(|(k, _)| end.is_empty() || &k[..] < end)
    }
}

/// What a watch task is told to do next.
#[derive(Debug)]
pub enum Wake {
    /// The next batch that touches the watch's range.
    Batch(Arc<Batch>),
    /// Revisions were not queued (the queue was full, or a snapshot replaced the state): read
    /// the history from the watch's cursor.
    CatchUp,
}

/// Why a watch cannot start or go on: the history holds only the revisions after `floor`.
#[derive(Debug, PartialEq, Eq)]
pub struct Compacted {
    pub floor: u64,
}

/// A registered watch: its queue of revisions. Dropping it unregisters the watch.
pub struct Live {
    hub: Arc<WatchHub>,
    id: u64,
    rx: mpsc::Receiver<u64>,
    overflow: Arc<AtomicBool>,
}

impl Live {
    /// Waits for the next batch at or after revision `next` that touches the watch's range,
    /// or for a `CatchUp`; `Err` if the history no longer holds the batch (read the history
    /// to learn the floor), `Ok(None)` if the hub is gone.
    pub async fn wake(&mut self, next: u64) -> Option<Result<Wake, Compacted>> {
        loop {
            let revision = self.rx.recv().await?;
            if self.overflow.swap(false, Ordering::AcqRel) {
                return Some(Ok(Wake::CatchUp));
            }
            if revision < next {
                continue; // given already, from the history
            }
            return Some(self.hub.batch_at(revision).map(Wake::Batch));
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.hub.lock().unregister(self.id);
    }
}

/// A started watch: its queue, and the revision it starts after (what the history holds
/// from there is read with [`WatchHub::replay`]).
pub struct Subscription {
    pub live: Live,
    pub after: u64,
}

/// Batches a watch task copies out of the history at a time while it catches up: what one
/// watch holds of the history, however far back it starts (the rest stays shared, and is
/// evicted on time).
pub const REPLAY_CHUNK: usize = 64;

struct Registered {
    tx: mpsc::Sender<u64>,
    overflow: Arc<AtomicBool>,
    /// The key of a single-key watch (in `by_key`); `None`: a range watch (in `ranged`).
    key: Option<Bytes>,
}

struct History {
    revisions_max: usize,
    bytes_max: usize,
    batches: VecDeque<Arc<Batch>>,
    bytes: usize,
    /// Every change with a revision above it is held.
    floor: u64,
    /// The last revision applied (published or not: most change nothing watched).
    applied: u64,
    next_id: u64,
    watches: HashMap<u64, Registered>,
    /// Single-key watches by key.
    by_key: HashMap<Bytes, Vec<u64>>,
    /// Range and prefix watches: (id, start, end).
    ranged: Vec<(u64, Bytes, Bytes)>,
}

impl History {
    fn unregister(&mut self, id: u64) {
        let Some(w) = self.watches.remove(&id) else {
            return;
        };
        let Some(key) = w.key else {
            self.ranged.retain(|(i, _, _)| *i != id);
            return;
        };
        if let Some(ids) = self.by_key.get_mut(&key) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    /// Queues `revision` for watch `id`; a full queue makes it catch up from the history.
    fn wake(&self, id: u64, revision: u64) {
        let Some(w) = self.watches.get(&id) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = w.tx.try_send(revision) {
            // The queue is full, so the task will take from it and see the flag.
            w.overflow.store(true, Ordering::Release);
        }
    }
}

pub struct WatchHub {
    history: Mutex<History>,
    /// Permits for open watches.
    pub watches: Arc<tokio::sync::Semaphore>,
}

impl WatchHub {
    /// A hub for a server whose state machine starts at `applied`, keeping at most
    /// `revisions_max` revisions and about `bytes_max` bytes of changes.
    pub fn new(applied: u64, revisions_max: usize, bytes_max: usize) -> WatchHub {
        WatchHub {
            history: Mutex::new(History {
                revisions_max: revisions_max.max(1),
                bytes_max,
                batches: VecDeque::new(),
                bytes: 0,
                floor: applied,
                applied,
                next_id: 0,
                watches: HashMap::new(),
                by_key: HashMap::new(),
                ranged: Vec::new(),
            }),
            watches: Arc::new(tokio::sync::Semaphore::new(WATCHES_MAX)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the changes applied since the last call (`changes`, in order) and the applied
    /// index now, and tells the watches they touch.
    pub fn publish(&self, changes: Vec<Change>, applied: u64) {
        let mut h = self.lock();
        h.applied = h.applied.max(applied);
        let mut changes = changes.into_iter().peekable();
        while let Some(first) = changes.next() {
            let revision = first.revision;
            // In key order, the last change of a key winning.
            let mut by_key = std::collections::BTreeMap::new();
            by_key.insert(first.key, first.value);
            while let Some(next) = changes.next_if(|c| c.revision == revision) {
                by_key.insert(next.key, next.value);
            }
            if revision <= h.floor {
                continue; // covered by an installed snapshot
            }
            let batch: Vec<(Bytes, Option<Versioned>)> = by_key.into_iter().collect();
            let bytes = batch
                .iter()
                .map(|(k, v)| {
                    k.len() + v.as_ref().map_or(0, |v| v.value.len()) + CHANGE_OVERHEAD_BYTES
                })
                .sum();
            let batch = Arc::new(Batch {
                revision,
                changes: batch,
                bytes,
            });
            h.bytes += bytes;
            h.batches.push_back(batch.clone());
            while h.batches.len() > h.revisions_max || h.bytes > h.bytes_max {
                let old = h
                    .batches
                    .pop_front()
                    .expect("invariant: over a bound, not empty");
                h.bytes -= old.bytes;
                h.floor = old.revision;
            }
            for (key, _) in &batch.changes {
                for &id in h.by_key.get(key).map_or(&[][..], |ids| &ids[..]) {
                    h.wake(id, revision);
                }
            }
            for (id, start, end) in &h.ranged {
                if batch.touches(start, end) {
                    h.wake(*id, revision);
                }
            }
        }
    }

    /// A snapshot installed at `index` replaced the state: the history is gone, and open
    /// watches are told to read it (they are then canceled: they cannot be told what changed).
    pub fn reset(&self, index: u64) {
        let mut h = self.lock();
        h.batches.clear();
        h.bytes = 0;
        h.floor = h.floor.max(index);
        h.applied = h.applied.max(index);
        for w in h.watches.values() {
            w.overflow.store(true, Ordering::Release);
            let _ = w.tx.try_send(index);
        }
    }

    /// Starts a watch of `[start, end)` (an empty `end`: no upper bound) from revision `from`
    /// (0: the next revision).
    pub fn subscribe(
        self: &Arc<Self>,
        from: u64,
        (start, end): (Bytes, Bytes),
    ) -> Result<Subscription, Compacted> {
        let mut h = self.lock();
        let from = if from == 0 { h.applied + 1 } else { from };
        if from <= h.floor {
            return Err(Compacted { floor: h.floor });
        }
        let (tx, rx) = mpsc::channel(WAKE_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let id = h.next_id;
        h.next_id += 1;
        let single = end.len() == start.len() + 1 && end.starts_with(&start) && end.ends_with(&[0]);
        let registered = Registered {
            tx,
            overflow: overflow.clone(),
            key: single.then(|| start.clone()),
        };
        if single {
            h.by_key.entry(start).or_default().push(id);
        } else {
            h.ranged.push((id, start, end));
        }
        h.watches.insert(id, registered);
        Ok(Subscription {
            live: Live {
                hub: self.clone(),
                id,
                rx,
                overflow,
            },
            after: from - 1,
        })
    }

    /// At most `max` of the batches held from revision `from` on; an error if the history no
    /// longer holds `from` (evicted while a slow watch caught up).
    pub fn replay(&self, from: u64, max: usize) -> Result<Vec<Arc<Batch>>, Compacted> {
        let h = self.lock();
        if from <= h.floor {
            return Err(Compacted { floor: h.floor });
        }
        let at = h.batches.partition_point(|b| b.revision < from);
        Ok(h.batches.range(at..).take(max).cloned().collect())
    }

    /// The batch of `revision`, if the history still holds it.
    fn batch_at(&self, revision: u64) -> Result<Arc<Batch>, Compacted> {
        let h = self.lock();
        let at = h.batches.partition_point(|b| b.revision < revision);
        match h.batches.get(at) {
            Some(b) if b.revision == revision => Ok(b.clone()),
            _ => Err(Compacted { floor: h.floor }),
        }
    }

    /// The oldest revision a watch can start from.
    pub fn first_watchable(&self) -> u64 {
        self.lock().floor + 1
    }

    /// Watches registered now.
    #[cfg(test)]
    pub fn registered(&self) -> usize {
        self.lock().watches.len()
    }
}

/// Whether `key` is in `[start, end)` (an empty `end`: no upper bound).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: u64, key: &'static str) -> Change {
        Change {
            revision,
            key: Bytes::from_static(key.as_bytes()),
            value: Some(Versioned {
                value: Bytes::from_static(b"v"),
                version: 1,
                create_revision: revision,
                mod_revision: revision,
            }),
        }
    }

    /// Every batch the history holds from `from` on, chunk by chunk as a watch reads them.
    fn replay_all(hub: &WatchHub, from: u64) -> Vec<Arc<Batch>> {
        let mut out: Vec<Arc<Batch>> = Vec::new();
        loop {
            let next = out.last().map_or(from, |b| b.revision + 1);
            let chunk = hub.replay(next, REPLAY_CHUNK).unwrap();
            let done = chunk.len() < REPLAY_CHUNK;
            out.extend(chunk);
            if done {
                return out;
            }
        }
    }

    fn all() -> (Bytes, Bytes) {
        (Bytes::new(), Bytes::new())
    }

    fn key(k: &'static str) -> (Bytes, Bytes) {
        let mut end = k.as_bytes().to_vec();
        end.push(0);
        (Bytes::from_static(k.as_bytes()), Bytes::from(end))
    }

    /// The revisions a watch's queue holds now, without waiting.
    fn queued(live: &mut Live) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(r) = live.rx.try_recv() {
            out.push(r);
        }
        out
    }

    #[test]
    fn replay_and_live_changes_meet_without_gap_or_overlap() {
        let hub = Arc::new(WatchHub::new(10, 1000, 1 << 20));
        hub.publish(vec![put(11, "a"), put(11, "b"), put(12, "a")], 12);
        let Subscription { mut live, after } = hub.subscribe(11, all()).unwrap();
        let replay = replay_all(&hub, after + 1);
        assert_eq!(after, 10);
        assert_eq!(
            replay.iter().map(|b| b.revision).collect::<Vec<_>>(),
            [11, 12]
        );
        assert_eq!(replay[0].changes.len(), 2);
        hub.publish(vec![put(14, "c")], 14);
        assert_eq!(queued(&mut live), [14], "nothing twice");
        let after = hub.subscribe(0, all()).unwrap().after;
        let replay = replay_all(&hub, after + 1);
        assert!(replay.is_empty());
        assert_eq!(
            after, 14,
            "a watch from now starts after the applied revision"
        );
        assert_eq!(hub.subscribe(10, all()).err().map(|c| c.floor), Some(10));
    }

    /// A batch wakes only the watches whose key or range it touches; a dropped watch is
    /// unregistered.
    #[test]
    fn only_the_watches_a_batch_touches_are_woken() {
        let hub = Arc::new(WatchHub::new(0, 1000, 1 << 20));
        let mut on_a = hub.subscribe(0, key("a")).unwrap().live;
        let mut on_b = hub.subscribe(0, key("b")).unwrap().live;
        let range = (Bytes::from_static(b"b"), Bytes::from_static(b"d"));
        let mut b_to_d = hub.subscribe(0, range).unwrap().live;
        let mut open = hub
            .subscribe(0, (Bytes::from_static(b"x"), Bytes::new()))
            .unwrap()
            .live;
        hub.publish(vec![put(1, "a")], 1);
        hub.publish(vec![put(2, "c"), put(2, "z")], 2);
        hub.publish(vec![put(3, "ab"), put(3, "d")], 3);
        hub.publish(vec![put(4, "b")], 4);
        assert_eq!(queued(&mut on_a), [1]);
        assert_eq!(queued(&mut on_b), [4]);
        assert_eq!(queued(&mut b_to_d), [2, 4]);
        assert_eq!(queued(&mut open), [2]);
        assert_eq!(hub.registered(), 4);
        drop((on_a, on_b, b_to_d, open));
        assert_eq!(hub.registered(), 0);
        assert!(hub.lock().by_key.is_empty() && hub.lock().ranged.is_empty());
    }

    /// A full queue does not block the publisher: the watch is told to catch up from the
    /// history, and then gets every revision without a gap.
    #[tokio::test]
    async fn a_full_queue_makes_the_watch_catch_up() {
        let hub = Arc::new(WatchHub::new(0, 100_000, 1 << 30));
        let mut live = hub.subscribe(0, key("k")).unwrap().live;
        let n = WAKE_QUEUE as u64 + 10;
        for r in 1..=n {
            hub.publish(vec![put(r, "k")], r);
        }
        match live.wake(1).await {
            Some(Ok(Wake::CatchUp)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(replay_all(&hub, 1).len() as u64, n);
        // What stays queued is skipped once given.
        hub.publish(vec![put(n + 1, "k")], n + 1);
        match live.wake(n + 1).await {
            Some(Ok(Wake::Batch(b))) => assert_eq!(b.revision, n + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_history_is_bounded_and_moves_the_floor() {
        let hub = Arc::new(WatchHub::new(0, 300, 1 << 30));
        for r in 1..=305 {
            hub.publish(vec![put(r, "k")], r);
        }
        assert_eq!(hub.first_watchable(), 6);
        assert!(hub.subscribe(5, all()).is_err());
        hub.subscribe(6, all()).unwrap();
        let replay = replay_all(&hub, 6);
        assert_eq!(replay.len(), 300);
        let small = WatchHub::new(0, 1000, 10 * (CHANGE_OVERHEAD_BYTES + 2));
        for r in 1..=20 {
            small.publish(vec![put(r, "k")], r);
        }
        assert_eq!(small.first_watchable(), 11, "the byte bound evicts too");
    }

    #[tokio::test]
    async fn a_reset_cancels_watchers_and_drops_what_it_covers() {
        let hub = Arc::new(WatchHub::new(0, 100_000, 1 << 30));
        hub.publish(vec![put(1, "k")], 1);
        let mut live = hub.subscribe(1, all()).unwrap().live;
        hub.reset(50);
        assert!(matches!(live.wake(2).await, Some(Ok(Wake::CatchUp))));
        assert_eq!(
            hub.replay(2, REPLAY_CHUNK).err(),
            Some(Compacted { floor: 50 })
        );
        hub.publish(vec![put(49, "old"), put(51, "new")], 51);
        hub.subscribe(51, all()).unwrap();
        let replay = replay_all(&hub, 51);
        assert_eq!(replay.len(), 1);
        assert_eq!(
            hub.subscribe(50, all()).err(),
            Some(Compacted { floor: 50 })
        );
    }

    /// A watcher that stops reading is canceled once the history moves past it, with the
    /// first revision it was not given, having been given every one before without a gap.
    #[tokio::test]
    async fn a_slow_watcher_is_canceled_with_the_revision_to_resume_from() {
        let history = 200;
        let hub = Arc::new(WatchHub::new(0, history, 1 << 30));
        let sub = hub.subscribe(0, key("k")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(crate::service::serve_watch(tx, key("k"), hub.clone(), sub));
        let published = 3 * history as u64;
        for r in 1..=published {
            hub.publish(vec![put(r, "k")], r);
            tokio::task::yield_now().await;
        }
        let mut next = 1;
        let header = rx.recv().await.unwrap().unwrap();
        assert!(header.created);
        loop {
            let resp = rx.recv().await.unwrap().unwrap();
            if resp.canceled {
                assert_eq!(resp.resume_revision, next, "{}", resp.cancel_reason);
                assert!(resp.cancel_reason.contains("no longer holds"));
                break;
            }
            assert_eq!(resp.revision, next, "no gap");
            next += 1;
        }
        assert!(next <= published);
        task.await.unwrap();
        assert_eq!(hub.registered(), 0, "the ended watch is unregistered");
        assert!(hub.subscribe(next, all()).is_err(), "resumed elsewhere");
    }

    #[test]
    fn ranges_include_start_exclude_end() {
        assert!(in_range(b"b", b"b", b"c"));
        assert!(!in_range(b"c", b"b", b"c"));
        assert!(in_range(b"zzz", b"b", b""));
        assert!(!in_range(b"a", b"b", b""));
    }
}
