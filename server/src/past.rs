//! Reads at a past revision: the value each key had before each recent change.
//!
//! ```text
//!   apply: put/delete of k at revision r ──(r, k, value before r)──▶ PastValues: the records
//!            in revision order (evicted oldest first, a revision at a time)
//!   read at R:  k's value at R = the value before k's first change after R, if it has one
//!                                (else its value now)
//! ```
//!
//! The state machine keeps only the latest state; with these undo records it can answer a
//! range read as of any revision `R` from `floor` up to the latest: every change after the
//! floor is held, so a key changed after `R` has a record giving its value at `R`, and a key
//! with no record after `R` has not changed since. `floor` starts at the applied index the
//! state machine opened or installed with (it knows nothing older) and moves up as whole
//! revisions are evicted.
//!
//! Bounds (the server's `[server] watch_history_revisions` and `watch_history_bytes`, shared
//! with the watch history, each held on its own): at most that many revisions, and about that
//! many bytes, counting each record's key, its previous value and [`RECORD_OVERHEAD_BYTES`].
//!
//! Costs (`timing` tests, release): a write pushes one record at the back and evicts from the
//! front, about 50 ns a record (a map by key, which reads could have walked by range, cost
//! 640 ns on the write path of every replica). A read at `R` walks the records after `R`
//! (found by binary search), keeps those of its range and sorts them by key: bounded by the
//! history's bound, whatever the revision asked (the oldest of 20,000 revisions over 10,000
//! keys: 2.7 ms; a 10,000-key page there 6.2 ms, against 1.9 ms at the latest revision); a
//! read at the latest revision walks none.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

use prost::bytes::Bytes;

use crate::engine::Versioned;

/// Memory a record takes besides its key and previous value (its two slots, the previous
/// value's counters, the per-key queue, the allocator's overhead), as counted against the
/// byte bound.
pub const RECORD_OVERHEAD_BYTES: usize = 200;

/// Why a read at a past revision cannot be served; the message names both revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PastError {
    /// Older than anything held: the oldest revision this server can read at is `oldest`.
    Compacted { revision: u64, oldest: u64 },
    /// Not applied yet: the store is at `latest`.
    Future { revision: u64, latest: u64 },
}

impl std::fmt::Display for PastError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PastError::Compacted { revision, oldest } => write!(
                f,
                "revision {revision} is compacted: this server reads at revisions from \
                 {oldest} on (it keeps the changes of its last watch_history_revisions \
                 revisions since it started)"
            ),
            PastError::Future { revision, latest } => write!(
                f,
                "revision {revision} is in the future: the store's latest revision is {latest}"
            ),
        }
    }
}

#[derive(Debug)]
pub struct PastValues {
    revisions_max: usize,
    bytes_max: usize,
    /// Every record, in revision order: (revision, key, value before the revision).
    order: VecDeque<(u64, Bytes, Option<Versioned>)>,
    /// Distinct revisions in `order`.
    revisions: usize,
    bytes: usize,
    /// Every change with a revision above it is held.
    floor: u64,
}

impl PastValues {
    /// An empty history for a state machine at `applied`.
    pub fn new(applied: u64, revisions_max: usize, bytes_max: usize) -> PastValues {
        PastValues {
            revisions_max: revisions_max.max(1),
            bytes_max,
            order: VecDeque::new(),
            revisions: 0,
            bytes: 0,
            floor: applied,
        }
    }

    /// The same bounds, nothing held, from `applied` on (after a snapshot is installed).
    pub fn emptied(&self, applied: u64) -> PastValues {
        PastValues::new(applied, self.revisions_max, self.bytes_max)
    }

    /// The oldest revision a read can ask for (revision 0 is the empty store, never asked:
    /// it means "the latest").
    pub fn oldest(&self) -> u64 {
        self.floor.max(1)
    }

    /// Records that `key`, whose value was `before`, changes at `revision` (revisions come in
    /// order).
    pub fn record(&mut self, revision: u64, key: &Bytes, before: Option<Versioned>) {
        debug_assert!(
            revision > self.floor,
            "invariant: records come after the floor"
        );
        if self.order.back().is_none_or(|(r, _, _)| *r != revision) {
            self.revisions += 1;
        }
        self.bytes += record_size(key, &before);
        self.order.push_back((revision, key.clone(), before));
        while self.revisions > self.revisions_max || self.bytes > self.bytes_max {
            self.evict_oldest_revision();
        }
    }

    fn evict_oldest_revision(&mut self) {
        let Some(&(revision, _, _)) = self.order.front() else {
            return;
        };
        while self.order.front().is_some_and(|(r, _, _)| *r == revision) {
            let (_, key, before) = self.order.pop_front().expect("invariant: front exists");
            self.bytes -= record_size(&key, &before);
        }
        self.revisions -= 1;
        self.floor = revision;
    }

    /// Whether a read at `revision` can be served by a store at `latest`.
    pub fn check(&self, revision: u64, latest: u64) -> Result<(), PastError> {
        if revision > latest {
            return Err(PastError::Future { revision, latest });
        }
        if revision < self.oldest() {
            return Err(PastError::Compacted {
                revision,
                oldest: self.oldest(),
            });
        }
        Ok(())
    }

    /// The keys of `[start, upper)` changed after `revision`, in key order, each with its
    /// value at `revision` (`None`: absent then). The caller checked `revision`.
    pub fn changed_after<'a>(
        &'a self,
        revision: u64,
        start: &[u8],
        upper: Bound<&[u8]>,
    ) -> impl Iterator<Item = (&'a Bytes, &'a Option<Versioned>)> + 'a {
        let first = self.order.partition_point(|(r, _, _)| *r <= revision);
        let mut then: Vec<(&'a Bytes, usize)> = Vec::new();
        let range = (Bound::Included(start), upper);
        for (i, (_, key, _)) in self.order.range(first..).enumerate() {
            if RangeBounds::<[u8]>::contains(&range, &key[..]) {
                then.push((key, i));
            }
        }
        // By key, and for a key its first change after `revision`: it holds the value then.
        then.sort_unstable();
        then.dedup_by(|b, a| a.0 == b.0);
        then.into_iter()
            .map(move |(key, i)| (key, &self.order[first + i].2))
    }

    /// Revisions and bytes held.
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        (self.revisions, self.bytes)
    }
}

fn record_size(key: &Bytes, before: &Option<Versioned>) -> usize {
    key.len() + before.as_ref().map_or(0, |v| v.value.len()) + RECORD_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(value: &'static str, rev: u64) -> Option<Versioned> {
        Some(Versioned {
            value: Bytes::from_static(value.as_bytes()),
            version: 1,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    fn at(p: &PastValues, revision: u64) -> Vec<(String, Option<String>)> {
        p.changed_after(revision, b"", Bound::Unbounded)
            .map(|(k, b)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    b.as_ref()
                        .map(|b| String::from_utf8_lossy(&b.value).into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn the_first_change_after_a_revision_gives_the_value_then() {
        let mut p = PastValues::new(10, 100, 1 << 20);
        let k = Bytes::from_static(b"k");
        p.record(11, &k, None); // created at 11
        p.record(13, &k, v("a", 11)); // a -> b at 13
        p.record(13, &k, v("b", 13)); // changed again in 13: the first record wins
        p.record(15, &k, v("b", 13)); // deleted at 15
        assert_eq!(at(&p, 10), [("k".into(), None)]);
        assert_eq!(at(&p, 11), [("k".into(), Some("a".into()))]);
        assert_eq!(at(&p, 12), [("k".into(), Some("a".into()))]);
        assert_eq!(at(&p, 14), [("k".into(), Some("b".into()))]);
        assert!(at(&p, 15).is_empty(), "unchanged since 15: its value now");
        assert_eq!(p.held().0, 3);
        assert_eq!(p.check(10, 15), Ok(()));
        assert_eq!(
            p.check(16, 15),
            Err(PastError::Future {
                revision: 16,
                latest: 15
            })
        );
        assert!(PastError::Compacted {
            revision: 3,
            oldest: 10
        }
        .to_string()
        .contains("revision 3 is compacted"));
    }

    #[test]
    fn eviction_takes_whole_revisions_and_moves_the_floor() {
        let mut p = PastValues::new(0, 3, 1 << 20);
        for r in 1..=5u64 {
            for key in ["a", "b"] {
                p.record(r, &Bytes::from(key), v("x", r - 1));
            }
        }
        assert_eq!(p.held().0, 3);
        assert_eq!(p.oldest(), 2);
        assert!(matches!(
            p.check(1, 5),
            Err(PastError::Compacted { oldest: 2, .. })
        ));
        assert_eq!(at(&p, 2).len(), 2);
        let small = RECORD_OVERHEAD_BYTES * 4 + 8;
        let mut p = PastValues::new(0, 100, small);
        for r in 1..=10u64 {
            p.record(r, &Bytes::from_static(b"k"), None);
        }
        assert!(p.held().1 <= small, "the byte bound holds");
        assert_eq!(p.oldest(), 6);
        assert_eq!(p.order.len(), 4);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Prints what a record costs on the write path (run with `--ignored --nocapture`, release).
    #[test]
    #[ignore]
    fn record_cost() {
        let mut p = PastValues::new(0, 20_000, 16 << 20);
        let keys: Vec<Bytes> = (0..10_000)
            .map(|i| Bytes::from(format!("key-{i:08}")))
            .collect();
        let v = Some(Versioned {
            value: Bytes::from(vec![b'x'; 128]),
            version: 1,
            create_revision: 1,
            mod_revision: 1,
        });
        let mut x: u64 = 1;
        let t = std::time::Instant::now();
        for r in 1..=1_000_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            p.record(r, &keys[(x >> 33) as usize % keys.len()], v.clone());
        }
        println!("record: {:.0} ns each", t.elapsed().as_nanos() as f64 / 1e6);
        let t = std::time::Instant::now();
        let n = p
            .changed_after(1_000_000 - 20_000, b"", Bound::Unbounded)
            .count();
        println!(
            "a read at the oldest revision: {n} keys in {:?}",
            t.elapsed()
        );
    }
}

/// Prints what a 10,000-key page costs at the latest and at the oldest revision.
#[cfg(test)]
mod timing_range {
    use crate::state_machine::StateMachine;
    use kvraft_proto::log_entry::Payload;
    use kvraft_proto::{LogEntry, PutCommand, RegisterSession};
    use prost::bytes::Bytes;

    #[test]
    #[ignore]
    fn range_cost() {
        let mut sm = StateMachine::new(u64::MAX / 4, 4);
        let entry = |index, payload| LogEntry {
            term: 1,
            index,
            time_ms: 1,
            payload: Some(payload),
        };
        sm.apply(&entry(
            1,
            Payload::RegisterSession(RegisterSession::default()),
        ));
        for i in 0..30_000u64 {
            sm.apply(&entry(
                i + 2,
                Payload::Put(PutCommand {
                    session_id: 1,
                    seq: i + 1,
                    ack_seq: i + 1,
                    key: Bytes::from(format!("key-{:08}", i % 10_000)),
                    value: Bytes::from(vec![b'x'; 128]),
                }),
            ));
            if i % 100 == 0 {
                sm.finish_batch();
            }
        }
        sm.finish_batch();
        let t = std::time::Instant::now();
        let page = sm.range(b"", b"", 10_000, usize::MAX, false);
        println!("latest: {} keys in {:?}", page.kvs.len(), t.elapsed());
        let t = std::time::Instant::now();
        let page = sm
            .range_at(30_001 - 19_000, b"", b"", 10_000, usize::MAX, false)
            .unwrap();
        println!("past: {} keys in {:?}", page.kvs.len(), t.elapsed());
    }
}
