//! Reads at a past revision: the value each key had before each recent change.
//!
//! ```text
//!   apply: put/delete of k at revision r ──(r, k, value before r)──▶ PastValues
//!            order: changes in revision order (evicted oldest first, a revision at a time)
//!            by_key: k ─▶ its changes held, oldest first
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
//! A key changed several times in one revision is recorded once (the value before the
//! revision). A read's work is bounded by the keys of its range that the history holds plus
//! its page: at most the history's bound, whatever the revision asked.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

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
    /// Every record, in revision order: (revision, key, bytes counted).
    order: VecDeque<(u64, Bytes, usize)>,
    /// Per key, its records oldest first: (revision, value before that revision).
    by_key: BTreeMap<Bytes, VecDeque<(u64, Option<Versioned>)>>,
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
            by_key: BTreeMap::new(),
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
        let records = self.by_key.entry(key.clone()).or_default();
        if records.back().is_some_and(|(r, _)| *r == revision) {
            return; // already changed in this revision: its value before is recorded
        }
        let size = key.len() + before.as_ref().map_or(0, |v| v.value.len()) + RECORD_OVERHEAD_BYTES;
        records.push_back((revision, before));
        if self.order.back().is_none_or(|(r, _, _)| *r != revision) {
            self.revisions += 1;
        }
        self.order.push_back((revision, key.clone(), size));
        self.bytes += size;
        while self.revisions > self.revisions_max || self.bytes > self.bytes_max {
            self.evict_oldest_revision();
        }
    }

    fn evict_oldest_revision(&mut self) {
        let Some(&(revision, _, _)) = self.order.front() else {
            return;
        };
        while self.order.front().is_some_and(|(r, _, _)| *r == revision) {
            let (_, key, size) = self.order.pop_front().expect("invariant: front exists");
            self.bytes -= size;
            let records = self
                .by_key
                .get_mut(&key)
                .expect("invariant: every record in order is in by_key");
            let popped = records.pop_front();
            debug_assert_eq!(popped.map(|(r, _)| r), Some(revision));
            if records.is_empty() {
                self.by_key.remove(&key);
            }
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
        start: &'a [u8],
        upper: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a Bytes, &'a Option<Versioned>)> + 'a {
        self.by_key
            .range::<[u8], _>((Bound::Included(start), upper))
            .filter_map(move |(key, records)| {
                let first_after = records.partition_point(|(r, _)| *r <= revision);
                records.get(first_after).map(|(_, before)| (key, before))
            })
    }

    /// Revisions and bytes held (for tests and status).
    pub fn held(&self) -> (usize, usize) {
        (self.revisions, self.bytes)
    }
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
        p.record(13, &k, v("b", 13)); // changed again in 13: not recorded twice
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
        assert_eq!(p.by_key[&b"k"[..]].len(), 4);
    }
}
