//! Watches: the changes a server applied, by revision, for the streams that watch key ranges.
//!
//! ```text
//!   core: apply ──Change (revision, key, value | deleted)──▶ WatchHub::publish
//!                                   history: the latest batches, bounded ──▶ replay from a revision
//!                                   broadcast (bounded) ──▶ one task per watch: filter its range
//!                                                               └─▶ bounded stream to the client
//! ```
//!
//! Every replica applies the same entries, so every server's history holds the same changes
//! for the same revisions: a client that loses its server resumes on another from the last
//! revision it was given, and gets every later change exactly once, provided that server still
//! holds it. What a server holds: every change with a revision above its `floor`, which starts
//! at the applied index it started with (a restarted server knows nothing older) and moves up
//! as old batches are evicted (`[server] watch_history_revisions`, default 20,000, and
//! `watch_history_bytes`, default 16 MiB, counting [`CHANGE_OVERHEAD_BYTES`] per change
//! besides its key and value) or a snapshot is installed (its changes are not known one by one). A watch from a revision at or below the
//! floor is refused as compacted, naming the floor.
//!
//! Bounds: the history; the broadcast ([`BROADCAST_BATCHES`] batches shared by all watchers; a
//! watcher that falls that far behind is canceled with the revision to resume from); each
//! stream's buffer ([`STREAM_BUFFER`] responses); the number of watches
//! ([`WATCHES_MAX`]); what one watch copies of the history at a time ([`REPLAY_CHUNK`]).
//! Subscribing to the broadcast before reading the history, and publishing to both under one
//! lock, makes replay and live changes meet without a gap; a watch skips what it was given.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;
use tokio::sync::broadcast;

use crate::state_machine::{Change, Versioned};

/// Memory a change takes in the history besides its key and value (the batch, its vector
/// slot, the value's header and counters, the allocator's overhead), as counted against the
/// byte bound.
pub const CHANGE_OVERHEAD_BYTES: usize = 160;
/// Batches the broadcast holds for its slowest watcher before that watcher is canceled.
pub const BROADCAST_BATCHES: usize = 4_096;
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

/// What a watcher receives live.
#[derive(Clone, Debug)]
pub enum Notice {
    Batch(Arc<Batch>),
    /// A snapshot replaced the state: changes up to `floor` are not known one by one.
    Reset {
        floor: u64,
    },
}

/// A started watch: the receiver of every batch published from now on, and the revision it
/// starts after (what the history holds from there is read with [`WatchHub::replay`]).
pub struct Subscription {
    pub live: broadcast::Receiver<Notice>,
    pub after: u64,
}

/// Batches a watch task copies out of the history at a time while it catches up: what one
/// watch holds of the history, however far back it starts (the rest stays shared, and is
/// evicted on time).
pub const REPLAY_CHUNK: usize = 64;

/// Why a watch cannot start.
#[derive(Debug, PartialEq, Eq)]
pub struct Compacted {
    pub floor: u64,
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
}

pub struct WatchHub {
    history: Mutex<History>,
    tx: broadcast::Sender<Notice>,
    /// Permits for open watches.
    pub watches: Arc<tokio::sync::Semaphore>,
}

impl WatchHub {
    /// A hub for a server whose state machine starts at `applied`, keeping at most
    /// `revisions_max` revisions and about `bytes_max` bytes of changes.
    pub fn new(applied: u64, revisions_max: usize, bytes_max: usize) -> WatchHub {
        let (tx, _) = broadcast::channel(BROADCAST_BATCHES);
        WatchHub {
            history: Mutex::new(History {
                revisions_max: revisions_max.max(1),
                bytes_max,
                batches: VecDeque::new(),
                bytes: 0,
                floor: applied,
                applied,
            }),
            tx,
            watches: Arc::new(tokio::sync::Semaphore::new(WATCHES_MAX)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the changes applied since the last call (`changes`, in order) and the applied
    /// index now, and sends them to the watchers.
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
            // No receiver is not an error: nobody watches.
            let _ = self.tx.send(Notice::Batch(batch));
        }
    }

    /// A snapshot installed at `index` replaced the state: the history is gone, and open
    /// watches are canceled (they cannot be told what changed).
    pub fn reset(&self, index: u64) {
        let mut h = self.lock();
        h.batches.clear();
        h.bytes = 0;
        h.floor = h.floor.max(index);
        h.applied = h.applied.max(index);
        let _ = self.tx.send(Notice::Reset { floor: h.floor });
    }

    /// Starts a watch from revision `from` (0: the next revision).
    pub fn subscribe(&self, from: u64) -> Result<Subscription, Compacted> {
        let h = self.lock();
        let from = if from == 0 { h.applied + 1 } else { from };
        if from <= h.floor {
            return Err(Compacted { floor: h.floor });
        }
        Ok(Subscription {
            live: self.tx.subscribe(),
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

    /// The oldest revision a watch can start from.
    pub fn first_watchable(&self) -> u64 {
        self.lock().floor + 1
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

    #[test]
    fn replay_and_live_changes_meet_without_gap_or_overlap() {
        let hub = WatchHub::new(10, 1000, 1 << 20);
        hub.publish(vec![put(11, "a"), put(11, "b"), put(12, "a")], 12);
        let Subscription {
            live: mut rx,
            after,
        } = hub.subscribe(11).unwrap();
        let replay = replay_all(&hub, after + 1);
        assert_eq!(after, 10);
        assert_eq!(
            replay.iter().map(|b| b.revision).collect::<Vec<_>>(),
            [11, 12]
        );
        assert_eq!(replay[0].changes.len(), 2);
        hub.publish(vec![put(14, "c")], 14);
        match rx.try_recv().unwrap() {
            Notice::Batch(b) => assert_eq!(b.revision, 14),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "nothing twice");
        let after = hub.subscribe(0).unwrap().after;
        let replay = replay_all(&hub, after + 1);
        assert!(replay.is_empty());
        assert_eq!(
            after, 14,
            "a watch from now starts after the applied revision"
        );
        assert_eq!(hub.subscribe(10).err(), Some(Compacted { floor: 10 }));
    }

    #[test]
    fn the_history_is_bounded_and_moves_the_floor() {
        let hub = WatchHub::new(0, 300, 1 << 30);
        for r in 1..=305 {
            hub.publish(vec![put(r, "k")], r);
        }
        assert_eq!(hub.first_watchable(), 6);
        assert!(hub.subscribe(5).is_err());
        hub.subscribe(6).unwrap();
        let replay = replay_all(&hub, 6);
        assert_eq!(replay.len(), 300);
        let small = WatchHub::new(0, 1000, 10 * (CHANGE_OVERHEAD_BYTES + 2));
        for r in 1..=20 {
            small.publish(vec![put(r, "k")], r);
        }
        assert_eq!(small.first_watchable(), 11, "the byte bound evicts too");
    }

    #[test]
    fn a_reset_cancels_watchers_and_drops_what_it_covers() {
        let hub = WatchHub::new(0, 100_000, 1 << 30);
        hub.publish(vec![put(1, "k")], 1);
        let mut rx = hub.subscribe(1).unwrap().live;
        hub.reset(50);
        assert!(matches!(
            rx.try_recv().unwrap(),
            Notice::Reset { floor: 50 }
        ));
        hub.publish(vec![put(49, "old"), put(51, "new")], 51);
        hub.subscribe(51).unwrap();
        let replay = replay_all(&hub, 51);
        assert_eq!(replay.len(), 1);
        assert_eq!(hub.subscribe(50).err(), Some(Compacted { floor: 50 }));
    }

    /// A watcher that stops reading is canceled once the broadcast passes it, with the first
    /// revision it was not given, having been given every one before without a gap.
    #[tokio::test]
    async fn a_slow_watcher_is_canceled_with_the_revision_to_resume_from() {
        let hub = Arc::new(WatchHub::new(0, 100_000, 1 << 30));
        let sub = hub.subscribe(0).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(crate::service::serve_watch(
            tx,
            (Bytes::from_static(b"k"), Bytes::from_static(b"l")),
            hub.clone(),
            sub,
        ));
        for r in 1..=(BROADCAST_BATCHES as u64 + 100) {
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
                assert!(resp.cancel_reason.contains("behind"));
                break;
            }
            assert_eq!(resp.revision, next, "no gap");
            next += 1;
        }
        assert!(next <= BROADCAST_BATCHES as u64 + 100);
        task.await.unwrap();
        hub.subscribe(next).unwrap();
        let replay = replay_all(&hub, next);
        assert_eq!(replay[0].revision, next, "the history still holds the rest");
    }

    #[test]
    fn ranges_include_start_exclude_end() {
        assert!(in_range(b"b", b"b", b"c"));
        assert!(!in_range(b"c", b"b", b"c"));
        assert!(in_range(b"zzz", b"b", b""));
        assert!(!in_range(b"a", b"b", b""));
    }
}
