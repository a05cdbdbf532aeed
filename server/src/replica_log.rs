//! The part of the log a replica keeps in memory: the entries after a base, where the base is
//! the last entry the state machine has made durable minus a kept tail (or the position of an
//! installed snapshot). Entries at or below the base are gone from memory; the base's own term
//! and log time are kept, so log matching (`prev_log_index == base`) and the leader's log
//! clock still work there.
//!
//! ```text
//!   index:  1 .. base | base+1 .............................. last
//!           compacted | entries (VecDeque; entries[0] has index base+1)
//! ```

use std::collections::VecDeque;

use kvraft_proto::LogEntry;
use prost::Message;

/// The position just below the first entry kept: its index, term and log time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBase {
    pub index: u64,
    pub term: u64,
    pub time_ms: u64,
}

#[derive(Debug, Default)]
pub struct ReplicaLog {
    base: LogBase,
    entries: VecDeque<LogEntry>,
    /// Encoded bytes of `entries`: what the in-memory log costs.
    bytes: usize,
}

impl ReplicaLog {
    /// A log holding `entries`, which must continue `base` densely.
    pub fn new(base: LogBase, entries: Vec<LogEntry>) -> Self {
        let mut log = ReplicaLog {
            base,
            ..ReplicaLog::default()
        };
        log.extend(entries);
        log
    }

    pub fn base(&self) -> LogBase {
        self.base
    }

    pub fn last_index(&self) -> u64 {
        self.base.index + self.entries.len() as u64
    }

    /// Entries held in memory, and their encoded size.
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Log time of the last entry (the base's when none is held).
    pub fn last_time_ms(&self) -> u64 {
        self.entries.back().map_or(self.base.time_ms, |e| e.time_ms)
    }

    /// The entry at `index`, if held (not compacted, not beyond the end).
    pub fn get(&self, index: u64) -> Option<&LogEntry> {
        let offset = index.checked_sub(self.base.index + 1)?;
        self.entries.get(usize::try_from(offset).ok()?)
    }

    /// The term at `index`: known from the base up to the last entry (0 at index 0), `None`
    /// below the base (compacted) and beyond the end.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base.index {
            return Some(self.base.term);
        }
        self.get(index).map(|e| e.term)
    }

    pub fn push(&mut self, entry: LogEntry) {
        assert_eq!(
            entry.index,
            self.last_index() + 1,
            "invariant: the log grows densely"
        );
        self.bytes += entry.encoded_len();
        self.entries.push_back(entry);
    }

    pub fn extend(&mut self, entries: impl IntoIterator<Item = LogEntry>) {
        for e in entries {
            self.push(e);
        }
    }

    /// Removes every entry with index >= `from` (which must be above the base).
    pub fn truncate_from(&mut self, from: u64) {
        assert!(
            from > self.base.index,
            "invariant: truncation above the base"
        );
        let keep = (from - self.base.index - 1) as usize;
        while self.entries.len() > keep {
            let e = self
                .entries
                .pop_back()
                .expect("invariant: longer than keep");
            self.bytes -= e.encoded_len();
        }
    }

    /// Copies of the entries `from..=to` (all held).
    pub fn slice(&self, from: u64, to: u64) -> Vec<LogEntry> {
        if to < from {
            return Vec::new();
        }
        let start = (from - self.base.index - 1) as usize;
        let end = (to - self.base.index) as usize;
        self.entries.range(start..end).cloned().collect()
    }

    /// Drops every entry at or below `index` (held, or the base itself), which becomes the base.
    pub fn compact_to(&mut self, index: u64) {
        if index <= self.base.index {
            return;
        }
        assert!(
            index <= self.last_index(),
            "invariant: compaction within the log"
        );
        while self.base.index < index {
            let e = self.entries.pop_front().expect("invariant: within the log");
            self.bytes -= e.encoded_len();
            self.base = LogBase {
                index: e.index,
                term: e.term,
                time_ms: e.time_ms,
            };
        }
    }

    /// Drops every entry: the log continues after `base` (an installed snapshot).
    pub fn reset(&mut self, base: LogBase) {
        self.entries.clear();
        self.bytes = 0;
        self.base = base;
    }

    /// The index at which to compact so that at most `keep_entries` entries and about
    /// `keep_bytes` bytes at or below `upto` stay held (upto itself never moves below the base).
    pub fn compaction_point(&self, upto: u64, keep_entries: u64, keep_bytes: usize) -> u64 {
        let upto = upto.min(self.last_index());
        let mut point = upto.saturating_sub(keep_entries).max(self.base.index);
        let mut held = 0usize;
        let mut i = upto;
        while i > point {
            held += self.get(i).map_or(0, |e| e.encoded_len());
            if held > keep_bytes {
                point = i;
                break;
            }
            i -= 1;
        }
        point
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry {
            term,
            index,
            time_ms: index * 10,
            payload: None,
        }
    }

    #[test]
    fn compaction_keeps_the_base_term_and_time() {
        let mut log = ReplicaLog::new(LogBase::default(), (1..=10).map(|i| entry(i, 1)).collect());
        assert_eq!(log.term_at(0), Some(0));
        log.compact_to(6);
        assert_eq!(log.base().index, 6);
        assert_eq!(log.term_at(6), Some(1));
        assert_eq!(log.term_at(5), None, "compacted");
        assert_eq!(log.get(6), None);
        assert_eq!(log.get(7).map(|e| e.index), Some(7));
        assert_eq!(log.slice(7, 9).len(), 3);
        assert_eq!(log.last_index(), 10);
        log.truncate_from(8);
        assert_eq!(log.last_index(), 7);
        log.compact_to(7);
        assert_eq!((log.held(), log.bytes(), log.last_time_ms()), (0, 0, 70));
        log.reset(LogBase {
            index: 100,
            term: 3,
            time_ms: 5,
        });
        assert_eq!(log.last_index(), 100);
        assert_eq!(log.term_at(100), Some(3));
        log.push(entry(101, 3));
        assert_eq!(log.term_at(101), Some(3));
    }

    #[test]
    fn the_compaction_point_keeps_a_tail_bounded_in_entries_and_bytes() {
        let log = ReplicaLog::new(LogBase::default(), (1..=100).map(|i| entry(i, 1)).collect());
        assert_eq!(log.compaction_point(90, 10, usize::MAX), 80);
        assert_eq!(log.compaction_point(5, 10, usize::MAX), 0);
        let one = entry(90, 1).encoded_len();
        assert_eq!(log.compaction_point(90, 50, 3 * one), 87);
        assert_eq!(log.compaction_point(500, 0, 0), 100, "clamped to the log");
    }
}
