//! An in-memory [`LogStore`] for tests and the deterministic simulation, modelled on a disk
//! with a page cache: appends and truncations change the "written" log at once, and only
//! [`Syncer::sync`] copies it to the "durable" log. [`MemLogStore::crash`] returns what a crash
//! would leave, so a test can restart a server with exactly its durable entries.
//!
//! ```text
//!  append / truncate_from --> written --sync()--> durable --crash()--> entries after restart
//! ```
//!
//! Invariant: both logs hold consecutive indices from 1. Clones share the same state, so a
//! test can keep a handle after moving the store into the runtime.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvraft_proto::LogEntry;

use super::{LogStore, StorageError, Syncer};

/// The two copies of the log shared by the store, its clones and its syncers.
#[derive(Debug, Default)]
struct MemState {
    /// What the OS has accepted: every append and truncation so far.
    written: Vec<LogEntry>,
    /// What survived the last sync: all a crash leaves.
    durable: Vec<LogEntry>,
}

/// See the module doc.
#[derive(Clone, Debug, Default)]
pub struct MemLogStore {
    state: Arc<Mutex<MemState>>,
}

impl MemLogStore {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A log that starts with `entries` already durable, as after a restart.
    pub fn with_entries(entries: Vec<LogEntry>) -> Self {
        assert_consecutive_from(1, &entries);
        let state = MemState {
            written: entries.clone(),
            durable: entries,
        };
        MemLogStore {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// The entries a crash would leave: those made durable by the last sync.
    pub fn crash(&self) -> Vec<LogEntry> {
        lock(&self.state).durable.clone()
    }

    /// Every entry written so far, synced or not.
    pub fn written(&self) -> Vec<LogEntry> {
        lock(&self.state).written.clone()
    }
}

impl LogStore for MemLogStore {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
        let mut state = lock(&self.state);
        assert_consecutive_from(state.written.len() as u64 + 1, entries);
        state.written.extend_from_slice(entries);
        Ok(())
    }

    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
        assert!(index >= 1, "truncate_from({index}): log indices start at 1");
        let keep = usize::try_from(index - 1).unwrap_or(usize::MAX);
        lock(&self.state).written.truncate(keep);
        Ok(())
    }

    fn last_index(&self) -> u64 {
        lock(&self.state).written.len() as u64
    }

    fn syncer(&self) -> Arc<dyn Syncer> {
        Arc::new(MemSyncer {
            state: self.state.clone(),
        })
    }
}

/// Copies the written log to the durable one.
struct MemSyncer {
    state: Arc<Mutex<MemState>>,
}

impl Syncer for MemSyncer {
    fn sync(&self) -> Result<(), StorageError> {
        let mut state = lock(&self.state);
        state.durable = state.written.clone();
        Ok(())
    }
}

/// Locks the state; a panic elsewhere while holding the lock cannot leave it half-updated
/// (every update is one Vec operation), so a poisoned lock is still usable.
fn lock(state: &Mutex<MemState>) -> MutexGuard<'_, MemState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Panics unless `entries` hold indices `first`, `first + 1`, ...
fn assert_consecutive_from(first: u64, entries: &[LogEntry]) {
    for (i, entry) in entries.iter().enumerate() {
        let expected = first + i as u64;
        assert_eq!(
            entry.index, expected,
            "entry {i} of the batch has index {}, expected {expected}",
            entry.index
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry {
            term,
            index,
            time_ms: 0,
            payload: None,
        }
    }

    fn indices_terms(entries: &[LogEntry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn crash_drops_unsynced_entries() {
        let mut store = MemLogStore::new();
        store.append(&[entry(1, 1), entry(2, 1)]).expect("append");
        store.syncer().sync().expect("sync");
        store.append(&[entry(3, 1)]).expect("append");
        assert_eq!(store.last_index(), 3);
        assert_eq!(indices_terms(&store.crash()), vec![(1, 1), (2, 1)]);
        assert_eq!(store.written().len(), 3);
    }

    #[test]
    fn truncation_is_durable_only_after_sync() {
        let mut store = MemLogStore::new();
        let handle = store.clone();
        store
            .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
            .expect("append");
        store.syncer().sync().expect("sync");
        store.truncate_from(2).expect("truncate");
        store.append(&[entry(2, 2)]).expect("append");
        assert_eq!(indices_terms(&handle.crash()), vec![(1, 1), (2, 1), (3, 1)]);
        store.syncer().sync().expect("sync");
        assert_eq!(indices_terms(&handle.crash()), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn restart_from_crash_continues_the_durable_log() {
        let mut store = MemLogStore::new();
        store.append(&[entry(1, 1), entry(2, 1)]).expect("append");
        store.syncer().sync().expect("sync");
        store.append(&[entry(3, 1)]).expect("append");
        let mut restarted = MemLogStore::with_entries(store.crash());
        assert_eq!(restarted.last_index(), 2);
        restarted.append(&[entry(3, 2)]).expect("append");
        assert_eq!(
            indices_terms(&restarted.written()),
            vec![(1, 1), (2, 1), (3, 2)]
        );
        restarted
            .truncate_from(7)
            .expect("truncate beyond the end is a no-op");
        assert_eq!(restarted.last_index(), 3);
    }

    #[test]
    #[should_panic(expected = "has index 3, expected 2")]
    fn append_that_skips_an_index_panics() {
        let mut store = MemLogStore::new();
        store.append(&[entry(1, 1)]).expect("append");
        let _ = store.append(&[entry(3, 1)]);
    }
}
