//! [`Disk`]: one server's storage as the runtime uses it, with what a crash keeps.
//!
//! ```text
//!   AppendLog ──▶ log (written, in the page cache) ──fsync──▶ durable prefix
//!   TruncateLog ─▶ set_len + sync_data: everything written so far is durable at once
//!   CompactLog ──▶ entries at or below the index dropped (durable in the state machine)
//!   ResetLog ────▶ every entry dropped, the log continues at the index; durable at once
//!   SaveHardState ─▶ durable at once (the runtime fsyncs it before the next command)
//!   crash ─▶ durable prefix + (maybe) a random part of the unsynced tail survives
//! ```
//!
//! The commands reach it through the server's own executor and [`LogWriter`] (batching, the
//! disk-full backlog, one group fsync at a time), the code the runtime runs; this is only the
//! disk. An fsync
//! started for write id W makes durable what was written when it started; its completion is
//! `Event::Persisted { write_id: W }`. Between two truncations the log only grows, so "durable"
//! is always a prefix of the written log; a truncation clamps the target of an fsync in flight
//! (it cannot vouch for entries written after the truncation). A full disk refuses appends
//! with ENOSPC until space returns.
//!
//! [`LogWriter`]: kvraft_server::log_writer::LogWriter

use kvraft_proto::LogEntry;
use kvraft_server::executor::Storage;
use kvraft_server::log_writer::LogDisk;
use kvraft_server::storage::{HardState, StorageError};

/// An fsync the simulator will complete later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncStart {
    /// What `Event::Persisted` reports when it completes.
    pub write_id: u64,
}

#[derive(Debug, Default)]
pub struct Disk {
    /// Saved with fsync before the next command ran.
    pub hard: HardState,
    /// Index of `log[0]` (of the next entry when the log is empty): 1 until a compaction or
    /// a reset.
    first: u64,
    /// Every entry written (the file as the OS sees it).
    log: Vec<LogEntry>,
    /// `log[..durable_len]` survives any crash.
    durable_len: usize,
    /// Write id and log length covered by the fsync in flight.
    in_flight: Option<(u64, usize)>,
    /// No space: appends fail with ENOSPC.
    pub full: bool,
}

impl Disk {
    /// A fresh disk holding `entries` durably (a restart, after recovery's own fsync).
    pub fn recovered(hard: HardState, first: u64, entries: Vec<LogEntry>) -> Disk {
        Disk {
            hard,
            first,
            durable_len: entries.len(),
            log: entries,
            ..Disk::default()
        }
    }

    /// Index of the first entry held (or of the next one when none is).
    pub fn first(&self) -> u64 {
        self.first.max(1)
    }

    /// Index of the last entry written.
    pub fn last_index(&self) -> u64 {
        self.first() + self.log.len() as u64 - 1
    }

    /// Index of the last durable entry.
    pub fn durable_index(&self) -> u64 {
        self.first() + self.durable_len as u64 - 1
    }

    /// `LogStore::compact_to`: entries at or below `index` may go (here exactly those).
    pub fn compact_to(&mut self, index: u64) {
        let drop = index.saturating_add(1).saturating_sub(self.first()) as usize;
        let drop = drop.min(self.durable_len);
        self.log.drain(..drop);
        self.durable_len -= drop;
        if let Some((_, len)) = self.in_flight.as_mut() {
            *len = len.saturating_sub(drop);
        }
        self.first = self.first() + drop as u64;
    }

    /// `LogStore::reset_to`: every entry dropped durably; the log continues at `next`.
    pub fn reset_to(&mut self, next: u64) {
        self.log.clear();
        self.durable_len = 0;
        self.first = next;
        if let Some((_, len)) = self.in_flight.as_mut() {
            *len = 0;
        }
    }

    pub fn log(&self) -> &[LogEntry] {
        &self.log
    }

    pub fn durable_len(&self) -> usize {
        self.durable_len
    }

    pub fn append(&mut self, entries: &[LogEntry]) {
        assert!(
            !self.full,
            "invariant: appends to a full disk go through LogDisk"
        );
        for e in entries {
            assert_eq!(
                e.index,
                self.last_index() + 1,
                "invariant: appends continue the log densely"
            );
            self.log.push(e.clone());
        }
    }

    /// `FileLogStore::truncate_from`: `set_len` then `sync_data`, so every write issued before
    /// it is durable too.
    pub fn truncate(&mut self, from: u64) {
        let keep = from.max(self.first()) - self.first();
        let keep = keep as usize;
        self.log.truncate(keep);
        self.durable_len = self.log.len();
        if let Some((_, len)) = self.in_flight.as_mut() {
            *len = (*len).min(keep);
        }
    }

    /// Starts an fsync for write id `write_id` (the writer's `sync_target`): it covers what is
    /// written now.
    pub fn start_sync(&mut self, write_id: u64) -> SyncStart {
        assert!(self.in_flight.is_none(), "invariant: one fsync at a time");
        self.in_flight = Some((write_id, self.log.len()));
        SyncStart { write_id }
    }

    /// The fsync in flight completed; returns its write id.
    pub fn complete_sync(&mut self) -> u64 {
        let (write_id, len) = self
            .in_flight
            .take()
            .expect("invariant: a completion matches a started fsync");
        self.durable_len = self.durable_len.max(len.min(self.log.len()));
        write_id
    }

    /// What survives a crash: the durable prefix plus `extra` entries of the unsynced tail
    /// (clamped), as the hard state, the first index and the log a restarted server recovers.
    pub fn crash(&self, extra: usize) -> (HardState, u64, Vec<LogEntry>) {
        let keep = (self.durable_len + extra).min(self.log.len());
        (self.hard, self.first(), self.log[..keep].to_vec())
    }

    /// Entries written but not yet durable.
    pub fn unsynced(&self) -> usize {
        self.log.len() - self.durable_len
    }
}

impl LogDisk for Disk {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
        if self.full {
            return Err(StorageError::disk_full("simulated disk"));
        }
        Disk::append(self, entries);
        Ok(())
    }
    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
        self.truncate(index);
        Ok(())
    }
    fn compact_to(&mut self, index: u64) -> Result<usize, StorageError> {
        Disk::compact_to(self, index);
        Ok(0)
    }
    fn reset_to(&mut self, next: u64) -> Result<(), StorageError> {
        Disk::reset_to(self, next);
        Ok(())
    }
}

impl Storage for Disk {
    /// Durable at once; a save that would go back (an older term, or another leader in the
    /// same term) is a bug in the core, reported as a failure of the run.
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        let old = self.hard;
        let ok = hs.term > old.term
            || (hs.term == old.term && (old.leader.is_none() || old.leader == hs.leader));
        if !ok {
            return Err(StorageError::InvalidState {
                path: "simulated hard state".into(),
                reason: format!("saved {hs:?} over {old:?}"),
            });
        }
        self.hard = hs;
        Ok(())
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

    #[test]
    fn fsync_covers_writes_issued_before_it_started() {
        let mut disk = Disk::default();
        disk.append(&[entry(1, 1)]);
        let sync = disk.start_sync(1);
        assert_eq!(sync.write_id, 1);
        disk.append(&[entry(2, 1)]);
        assert_eq!(disk.complete_sync(), 1);
        assert_eq!(disk.durable_len(), 1);
        assert_eq!(disk.crash(0).2.len(), 1);
        assert_eq!(disk.start_sync(2), SyncStart { write_id: 2 });
    }

    #[test]
    fn truncation_is_durable_and_clamps_the_fsync_in_flight() {
        let mut disk = Disk::default();
        disk.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        disk.start_sync(1);
        disk.truncate(2);
        assert_eq!(disk.durable_len(), 1);
        disk.append(&[entry(2, 2), entry(3, 2)]);
        disk.complete_sync();
        assert_eq!(
            disk.durable_len(),
            1,
            "the old fsync vouches for nothing new"
        );
        assert_eq!(disk.crash(1).2.last().map(|e| e.term), Some(2));
    }
}
