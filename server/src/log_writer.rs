//! The log-writing part of executing the replica core's commands, one implementation for the
//! tokio runtime and the deterministic simulation (which brings its own [`LogDisk`]):
//!
//! ```text
//!   AppendLog ──▶ batch ─(next other command, or the end)─▶ LogDisk::append ─▶ written_ok
//!                   │                                          │ disk full
//!                   └────────────── backlog ◀───────────────────┘ (retried by flush)
//!   TruncateLog ─▶ backlog first, then the disk;  CompactLog, ResetLog ─▶ the disk
//!   sync_target ─▶ one group fsync at a time, covering every write that reached the OS
//! ```
//!
//! Rules: write ids count `AppendLog` commands from 1, as the core does; only writes whose
//! entries reached the OS (`written_ok`) may be covered by an fsync and reported as
//! `Event::Persisted`, so nothing in the backlog is ever acknowledged. Commands that are not
//! log writes go back to the caller in order, after every log write before them.

use kvraft_proto::LogEntry;

use crate::replica::Command;
use crate::storage::StorageError;

/// What the writer needs of a log: a [`crate::storage::LogStore`] without its syncer (the
/// caller runs fsyncs).
pub trait LogDisk {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError>;
    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError>;
    fn compact_to(&mut self, index: u64) -> Result<usize, StorageError>;
    fn reset_to(&mut self, next: u64) -> Result<(), StorageError>;
}

/// At start: if the state file holds a snapshot installed by the last run whose log reset did
/// not happen (the process stopped between the two), the reset is done now and the log is
/// empty after the snapshot. Returns the log's first index and its entries, as the replica is
/// to recover them.
pub fn finish_interrupted_install(
    sm: &crate::state_machine::StateMachine,
    log_start: u64,
    entries: Vec<LogEntry>,
    disk: &mut dyn LogDisk,
) -> Result<(u64, Vec<LogEntry>), StorageError> {
    if !sm.from_snapshot() || crate::replica::Replica::log_fits(sm, log_start, &entries).is_ok() {
        return Ok((log_start, entries));
    }
    let next = sm.last_applied() + 1;
    disk.reset_to(next)?;
    tracing::info!(next, "log reset after the snapshot installed last run");
    Ok((next, Vec::new()))
}

/// ENOSPC or EDQUOT: space may come back, so the write is retried rather than fatal.
pub fn is_disk_full(e: &StorageError) -> bool {
    match e {
        StorageError::Io { source, .. } => matches!(source.raw_os_error(), Some(28) | Some(122)),
        _ => false,
    }
}

/// A change of the disk-full state, for the caller to log and publish.
#[derive(Debug)]
pub enum DiskFull {
    /// Entries could not be written: they wait in the backlog.
    Full(StorageError),
    /// The backlog was written.
    Writable,
}

#[derive(Debug, Default)]
pub struct LogWriter {
    /// `AppendLog` commands executed.
    written: u64,
    /// `AppendLog` commands whose entries reached the OS.
    written_ok: u64,
    /// Entries not written yet, in order: this batch's, and after a full disk all since.
    backlog: Vec<LogEntry>,
    full: bool,
    change: Option<DiskFull>,
    sync_requested: u64,
    sync_in_flight: bool,
}

impl LogWriter {
    /// Executes `cmd` if it is a log command and returns `None`; otherwise writes what waits
    /// and hands `cmd` back for the caller to execute. A storage error other than a full disk
    /// is fatal to the server.
    pub fn execute(
        &mut self,
        cmd: Command,
        disk: &mut dyn LogDisk,
    ) -> Result<Option<Command>, StorageError> {
        match cmd {
            Command::AppendLog(entries) => {
                self.written += 1;
                self.backlog.extend(entries);
                return Ok(None);
            }
            Command::TruncateLog(from) => {
                // The backlog first, then the disk.
                self.backlog.retain(|e| e.index < from.0);
                disk.truncate_from(from.0)?;
            }
            Command::CompactLog(upto) => {
                self.flush(disk)?;
                disk.compact_to(upto.0)?;
            }
            Command::ResetLog(next) => {
                self.backlog.clear();
                disk.reset_to(next.0)?;
            }
            other => {
                self.flush(disk)?;
                return Ok(Some(other));
            }
        }
        self.flush(disk)?;
        Ok(None)
    }

    /// Writes the backlog if the disk takes it; a full disk leaves it for a later call.
    pub fn flush(&mut self, disk: &mut dyn LogDisk) -> Result<(), StorageError> {
        if self.backlog.is_empty() {
            self.written_ok = self.written;
            return self.set_full(None);
        }
        match disk.append(&self.backlog) {
            Ok(()) => {
                self.backlog.clear();
                self.written_ok = self.written;
                self.set_full(None)
            }
            Err(e) if is_disk_full(&e) => self.set_full(Some(e)),
            Err(e) => Err(e),
        }
    }

    fn set_full(&mut self, error: Option<StorageError>) -> Result<(), StorageError> {
        let full = error.is_some();
        if full != self.full {
            self.full = full;
            self.change = Some(match error {
                Some(e) => DiskFull::Full(e),
                None => DiskFull::Writable,
            });
        }
        Ok(())
    }

    /// Entries not written yet (they continue the log on disk).
    pub fn pending(&self) -> usize {
        self.backlog.len()
    }

    /// Whether entries wait for disk space.
    pub fn disk_full(&self) -> bool {
        self.full
    }

    /// A server that cannot store entries does not claim to lead in its report to the coord,
    /// so the coord replaces it (the replica core does not know the disk is full).
    pub fn adjust_report(&self, reply: &mut crate::replica::Reply) {
        if let (crate::replica::Reply::Report(report), true) = (reply, self.full) {
            report.role = kvraft_proto::Role::Follower as i32;
        }
    }

    /// The last change of the disk-full state, once.
    pub fn take_change(&mut self) -> Option<DiskFull> {
        self.change.take()
    }

    /// The write id a group fsync should cover if one should start now (none in flight, and
    /// writes that reached the OS wait for one); the caller runs it and reports
    /// `Event::Persisted { write_id }`, then [`LogWriter::synced`].
    pub fn sync_target(&mut self) -> Option<u64> {
        if self.sync_in_flight || self.sync_requested >= self.written_ok {
            return None;
        }
        self.sync_in_flight = true;
        self.sync_requested = self.written_ok;
        Some(self.written_ok)
    }

    /// The fsync started by the last [`LogWriter::sync_target`] completed.
    pub fn synced(&mut self) {
        self.sync_in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Disk {
        entries: Vec<LogEntry>,
        full: bool,
    }

    impl LogDisk for Disk {
        fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
            if self.full {
                return Err(StorageError::disk_full("disk"));
            }
            self.entries.extend_from_slice(entries);
            Ok(())
        }
        fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
            self.entries.retain(|e| e.index < index);
            Ok(())
        }
        fn compact_to(&mut self, _: u64) -> Result<usize, StorageError> {
            Ok(0)
        }
        fn reset_to(&mut self, _: u64) -> Result<(), StorageError> {
            self.entries.clear();
            Ok(())
        }
    }

    fn append(index: u64) -> Command {
        Command::AppendLog(vec![LogEntry {
            term: 1,
            index,
            time_ms: 0,
            payload: None,
        }])
    }

    #[test]
    fn a_full_disk_keeps_entries_unsynced_until_space_returns() {
        let mut w = LogWriter::default();
        let mut disk = Disk::default();
        assert!(w.execute(append(1), &mut disk).unwrap().is_none());
        w.flush(&mut disk).unwrap();
        assert_eq!(w.sync_target(), Some(1));
        assert_eq!(w.sync_target(), None, "one fsync at a time");
        disk.full = true;
        w.execute(append(2), &mut disk).unwrap();
        w.flush(&mut disk).unwrap();
        assert!(w.disk_full());
        assert!(matches!(w.take_change(), Some(DiskFull::Full(_))));
        w.synced();
        assert_eq!(w.sync_target(), None, "nothing written waits for an fsync");
        // A truncation reaches the backlog first.
        w.execute(append(3), &mut disk).unwrap();
        w.execute(Command::TruncateLog(kvraft_common::LogIndex(3)), &mut disk)
            .unwrap();
        disk.full = false;
        w.flush(&mut disk).unwrap();
        assert!(!w.disk_full());
        assert!(matches!(w.take_change(), Some(DiskFull::Writable)));
        let indices: Vec<u64> = disk.entries.iter().map(|e| e.index).collect();
        assert_eq!(indices, vec![1, 2]);
        assert_eq!(
            w.sync_target(),
            Some(3),
            "every write id so far reached the OS"
        );
    }

    #[test]
    fn other_commands_come_back_after_the_writes_before_them() {
        let mut w = LogWriter::default();
        let mut disk = Disk::default();
        w.execute(append(1), &mut disk).unwrap();
        let back = w
            .execute(
                Command::RoleChanged {
                    leader: true,
                    term: kvraft_common::Term(1),
                },
                &mut disk,
            )
            .unwrap();
        assert!(back.is_some());
        assert_eq!(
            disk.entries.len(),
            1,
            "written before the command came back"
        );
    }
}
