//! Durable state of one server: the replicated log, the hard state (term and accepted leader)
//! and the data directory's identity and lock.
//!
//! The runtime owns a [`LogStore`] and appends to it without waiting for the disk; a
//! [`Syncer`] handle, run on a blocking thread, makes everything issued before the call durable.
//! Entries are acknowledged only after that sync returns (DESIGN.md rule 5).
//!
//! On-disk layout of a data directory:
//!
//! ```text
//! <dir>/LOCK        empty; held with an exclusive lock while a server process uses <dir>
//! <dir>/meta        "server_id=<n>\nuuid=<uuid>\n", written once on first start
//! <dir>/hard_state  "term=<n>\nleader=<n>\ncrc32=<hex>\n", replaced atomically by rename
//! <dir>/wal/seg-<first index, 20 digits>.log
//!                   log segments: a header, then records back to back, indices consecutive
//!                   within and across segments (see `log_file.rs`)
//! <dir>/state.redb  the state machine (see `crate::engine`), not written by this module
//!
//! segment header (24 bytes):
//! +------------+-----------+----------------+--------------------+
//! | "KVRFTLOG" | format u32| first index u64| crc32 of bytes 0-19|
//! +------------+-----------+----------------+--------------------+
//!
//! one log record:
//! +----------------+----------------+---------------------------------+
//! | payload_len    | crc32(payload) | payload = prost-encoded         |
//! | u32 LE         | u32 LE         | kvraft_proto::LogEntry          |
//! +----------------+----------------+---------------------------------+
//!  0                4                8                      8 + payload_len
//! ```
//!
//! Invariants: the log holds consecutive indices; every record is checksummed; on open, a torn
//! record at the tail of the last segment (an interrupted write) is cut off, while a bad record with
//! valid data after it is corruption and refuses to open, naming the file and byte offset
//! (DESIGN.md rule 9). Hard state and meta are replaced by write-temp, fsync, rename, fsync-dir,
//! so a crash leaves either the old or the new file, never a mix.

mod hard_state;
mod log_file;
mod meta;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvraft_common::DirError;

pub use hard_state::{HardState, HardStateFile};
pub use log_file::{log_disk_bytes, FileLogStore, Recovery};
pub use meta::ServerMeta;

/// Everything that can go wrong in the storage layer. Each variant names the file concerned;
/// any of them takes the server out of the cluster rather than letting it limp on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt log file {path} at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("data directory {path} belongs to server {found}, not server {expected}")]
    WrongServer {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("data directory {path} is locked: another server process is using it")]
    Locked { path: PathBuf },
    #[error("invalid state file {path}: {reason}")]
    InvalidState { path: PathBuf, reason: String },
}

impl StorageError {
    /// ENOSPC on `path`: what a full disk answers (fault hooks and simulated disks use it).
    pub fn disk_full(path: &str) -> StorageError {
        StorageError::Io {
            path: path.into(),
            source: std::io::Error::from_raw_os_error(28),
        }
    }
}

impl From<DirError> for StorageError {
    fn from(e: DirError) -> StorageError {
        StorageError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// What the runtime needs from a log.
///
/// # Correctness rules
///
/// - Appends go to the OS without fsync; they are durable only once a [`Syncer::sync`] call
///   that started after them has returned. Never acknowledge an entry before that.
/// - A truncation is durable no later than the next sync (the file store makes it durable
///   before `truncate_from` returns, so old and new bytes never mix after a crash).
/// - Indices are consecutive from the first one kept (1, until a compaction or a reset); an
///   append that does not continue the log is a bug and panics.
pub trait LogStore: Send + 'static {
    /// Appends entries whose indices continue the log exactly:
    /// `entries[0].index == last_index() + 1` and each next index one higher.
    fn append(&mut self, entries: &[kvraft_proto::LogEntry]) -> Result<(), StorageError>;
    /// Removes every entry with index >= `index` (no-op if beyond the end). `index` >= 1.
    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError>;
    /// Index of the last entry (the one before the first index when the log is empty).
    fn last_index(&self) -> u64;
    /// Entries at or below `index` are held durably elsewhere (the state machine) and may be
    /// deleted; a store deletes whole files, so it may keep some. Returns how many files went.
    fn compact_to(&mut self, index: u64) -> Result<usize, StorageError>;
    /// Durably discards every entry; the log continues at `next` (after an installed
    /// snapshot). A crash part-way leaves a contiguous log or an empty one.
    fn reset_to(&mut self, next: u64) -> Result<(), StorageError>;
    /// A handle that makes every append/truncate issued BEFORE the call to `sync()` durable.
    /// Called from another thread (tokio `spawn_blocking`) while the owner keeps appending.
    fn syncer(&self) -> Arc<dyn Syncer>;
}

/// Makes earlier log writes durable; see [`LogStore::syncer`].
pub trait Syncer: Send + Sync {
    fn sync(&self) -> Result<(), StorageError>;
}

/// Builds a `map_err` closure that attaches `path` to an I/O error.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Durably replaces `path` with `contents` (see `kvraft_common::replace_file_durable`).
fn replace_file_durable(tmp: &Path, path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    kvraft_common::replace_file_durable(path, tmp, contents).map_err(|e| StorageError::Io {
        path: e.path,
        source: e.source,
    })
}
