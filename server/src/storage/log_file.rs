//! The file-backed log: one append-only file `<dir>/log` of checksummed records (format in the
//! [`super`] module doc), with an in-memory table of record offsets.
//!
//! ```text
//!  append(entries) --pwrite at end_offset--> OS page cache --Syncer::sync (fdatasync)--> disk
//!  truncate_from(i) --set_len(offsets[i-1]) + fdatasync--> disk
//!  open(dir) --read all, check every record--> (store, entries, Recovery)
//! ```
//!
//! Invariants: `offsets[i]` is the byte offset of the record holding index `i + 1`, and
//! `end_offset` is the file length as the OS sees it. On open, a bad record is a torn tail (cut
//! off, with a warning) only when no valid record follows it anywhere in the file; otherwise it
//! is corruption and the open fails naming the file and offset (DESIGN.md rule 9). A record
//! whose checksum is valid but whose index does not continue the log is always corruption.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvraft_common::{create_dir_durable, sync_dir};
use kvraft_proto::LogEntry;
use prost::Message;

use super::{io_err, LogStore, StorageError, Syncer};

/// Name of the log file inside the data directory.
const LOG_FILE_NAME: &str = "log";

/// Bytes the log of data directory `dir` takes on disk now (0 if it cannot be read).
pub fn log_disk_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE_NAME)).map_or(0, |m| m.len())
}

/// Bytes of a record header: payload length and payload checksum, both u32 LE.
const HEADER_BYTES: usize = 8;

/// Largest payload accepted. One entry carries at most one key and value (about 1 MiB), so a
/// length far above that is a damaged length field, not data.
const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Most payload bytes recovery checksums while looking for a valid record after a bad one.
/// Bounds the time of that search; beyond it the bad record is reported as corruption, since
/// a torn tail cannot be proven.
const TAIL_SEARCH_HASH_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// What [`FileLogStore::open`] found and repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Entries read back from the file.
    pub entries: usize,
    /// Bytes of a torn record cut from the end of the file (0 after a clean shutdown).
    pub truncated_tail_bytes: u64,
}

/// A [`LogStore`] in a single file; see the module doc.
pub struct FileLogStore {
    /// Path of the log file, for error messages.
    path: PathBuf,
    file: File,
    /// `offsets[i]` is where the record of index `i + 1` starts, so a truncation is one
    /// `set_len` and needs no re-reading.
    offsets: Vec<u64>,
    /// Length of the file: the next record is written here.
    end_offset: u64,
    /// Shared with the sync thread; owns its own file descriptor of the same file.
    syncer: Arc<FileSyncer>,
}

impl FileLogStore {
    /// Opens (or creates) `<dir>/log`, reads and checks every record, cuts a torn tail and
    /// returns the store positioned after the last valid record, with the entries read.
    pub fn open(dir: &Path) -> Result<(FileLogStore, Vec<LogEntry>, Recovery), StorageError> {
        create_dir_durable(dir)?;
        let path = dir.join(LOG_FILE_NAME);
        let file = open_or_create(dir, &path)?;
        let bytes = read_all(&file, &path)?;
        let scan = scan_records(&bytes).map_err(|bad| StorageError::Corrupt {
            path: path.clone(),
            offset: bad.offset as u64,
            reason: bad.reason,
        })?;
        let truncated_tail_bytes = (bytes.len() - scan.valid_len) as u64;
        if truncated_tail_bytes > 0 {
            cut_torn_tail(&file, &path, scan.valid_len as u64, truncated_tail_bytes)?;
        }
        let recovery = Recovery {
            entries: scan.entries.len(),
            truncated_tail_bytes,
        };
        let syncer = Arc::new(FileSyncer {
            path: path.clone(),
            file: file.try_clone().map_err(io_err(&path))?,
        });
        let store = FileLogStore {
            path,
            file,
            offsets: scan.offsets,
            end_offset: scan.valid_len as u64,
            syncer,
        };
        Ok((store, scan.entries, recovery))
    }
}

impl LogStore for FileLogStore {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        assert_continues(self.last_index(), entries);
        let (buf, starts) = encode_records(entries, self.end_offset);
        if let Err(source) = self.file.write_all_at(&buf, self.end_offset) {
            // Best effort: drop a partial write so it cannot sit between records if the
            // caller retries. The error below takes the server out either way.
            let _ = self.file.set_len(self.end_offset);
            return Err(io_err(&self.path)(source));
        }
        self.offsets.extend(starts);
        self.end_offset += buf.len() as u64;
        Ok(())
    }

    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
        assert!(index >= 1, "truncate_from({index}): log indices start at 1");
        if index > self.last_index() {
            return Ok(());
        }
        let keep = (index - 1) as usize;
        let offset = self.offsets[keep];
        self.file.set_len(offset).map_err(io_err(&self.path))?;
        self.offsets.truncate(keep);
        self.end_offset = offset;
        // Durable now, before new records overwrite the same bytes: otherwise a crash could
        // leave new records followed by old ones, which recovery must call corruption.
        self.file.sync_data().map_err(io_err(&self.path))
    }

    fn last_index(&self) -> u64 {
        self.offsets.len() as u64
    }

    fn syncer(&self) -> Arc<dyn Syncer> {
        self.syncer.clone()
    }
}

/// Makes the log file durable from another thread; fdatasync on its own descriptor covers
/// every write and `set_len` made through any descriptor of the file before the call.
struct FileSyncer {
    path: PathBuf,
    file: File,
}

impl Syncer for FileSyncer {
    fn sync(&self) -> Result<(), StorageError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Panics unless `entries` continue a log whose last index is `last_index`, one by one.
fn assert_continues(last_index: u64, entries: &[LogEntry]) {
    for (i, entry) in entries.iter().enumerate() {
        let expected = last_index + 1 + i as u64;
        assert_eq!(
            entry.index, expected,
            "append: entry {i} of the batch has index {}, expected {expected} (log ends at {last_index})",
            entry.index
        );
    }
}

/// Encodes entries as records into one buffer; also returns each record's file offset,
/// given that the buffer will be written at `base_offset`.
fn encode_records(entries: &[LogEntry], base_offset: u64) -> (Vec<u8>, Vec<u64>) {
    let mut buf = Vec::new();
    let mut starts = Vec::with_capacity(entries.len());
    for entry in entries {
        let payload = entry.encode_to_vec();
        assert!(
            !payload.is_empty() && payload.len() <= RECORD_PAYLOAD_BYTES_MAX,
            "entry {} encodes to {} bytes, outside 1..={RECORD_PAYLOAD_BYTES_MAX}",
            entry.index,
            payload.len()
        );
        starts.push(base_offset + buf.len() as u64);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
    }
    (buf, starts)
}

/// Opens the log file for reading and writing, creating it (and making its directory entry
/// durable) on first start.
fn open_or_create(dir: &Path, path: &Path) -> Result<File, StorageError> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err(path))?;
            sync_dir(dir)?;
            Ok(file)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

fn read_all(mut file: &File, path: &Path) -> Result<Vec<u8>, StorageError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(bytes)
}

/// Cuts the file to `valid_len` and makes that durable before anything is appended after it.
fn cut_torn_tail(
    file: &File,
    path: &Path,
    valid_len: u64,
    tail_bytes: u64,
) -> Result<(), StorageError> {
    tracing::warn!(
        path = %path.display(),
        offset = valid_len,
        tail_bytes,
        "log ends in a torn record (interrupted write); truncating {tail_bytes} bytes"
    );
    file.set_len(valid_len).map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))
}

/// The valid prefix of a log file.
#[derive(Debug, Default)]
struct Scan {
    entries: Vec<LogEntry>,
    offsets: Vec<u64>,
    /// Bytes covered by valid records; anything after is a torn tail.
    valid_len: usize,
}

/// A bad record that is not a torn tail.
#[derive(Debug)]
struct BadRecord {
    offset: usize,
    reason: String,
}

/// Reads records from the start; stops at a torn tail, fails at corruption.
fn scan_records(bytes: &[u8]) -> Result<Scan, BadRecord> {
    let mut scan = Scan::default();
    while scan.valid_len < bytes.len() {
        let offset = scan.valid_len;
        let expected = scan.entries.len() as u64 + 1;
        match read_record(&bytes[offset..], expected) {
            Ok((entry, record_len)) => {
                scan.offsets.push(offset as u64);
                scan.entries.push(entry);
                scan.valid_len += record_len;
            }
            Err(problem) => return classify(bytes, offset, expected, problem).map(|()| scan),
        }
    }
    Ok(scan)
}

/// Decides whether the bad record at `offset` is a torn tail (`Ok`) or corruption.
fn classify(bytes: &[u8], offset: usize, expected: u64, problem: Problem) -> Result<(), BadRecord> {
    let reason = match problem {
        // A record with a valid checksum was written whole: a wrong index is never a torn write.
        Problem::Index { .. } => problem.to_string(),
        _ => match valid_record_after(bytes, offset + 1, expected) {
            None => return Ok(()),
            Some(found) => format!("{problem}, but {found} follows, so it is not a torn tail"),
        },
    };
    Err(BadRecord { offset, reason })
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("record header needs {HEADER_BYTES} bytes, only {available} left in the file")]
    ShortHeader { available: usize },
    #[error("payload length {len} is above the limit of {RECORD_PAYLOAD_BYTES_MAX} bytes")]
    TooLong { len: usize },
    #[error("payload length is 0 (no log entry encodes to 0 bytes)")]
    Empty,
    #[error("payload of {len} bytes runs past the end of the file ({available} bytes left)")]
    ShortPayload { len: usize, available: usize },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode as a log entry: {0}")]
    Decode(String),
    #[error("entry has index {found}, expected {expected} (indices must be consecutive from 1)")]
    Index { found: u64, expected: u64 },
}

/// Reads the record at the start of `rest`, which must hold entry `expected`; returns the
/// entry and the record's length in bytes.
fn read_record(rest: &[u8], expected: u64) -> Result<(LogEntry, usize), Problem> {
    let (len, stored) = read_header(rest)?;
    let entry = read_payload(&rest[HEADER_BYTES..HEADER_BYTES + len], stored)?;
    if entry.index != expected {
        return Err(Problem::Index {
            found: entry.index,
            expected,
        });
    }
    Ok((entry, HEADER_BYTES + len))
}

/// Reads a header and checks that its payload fits in `rest`; returns (payload length, crc).
fn read_header(rest: &[u8]) -> Result<(usize, u32), Problem> {
    let Some((header, after)) = rest.split_first_chunk::<HEADER_BYTES>() else {
        return Err(Problem::ShortHeader {
            available: rest.len(),
        });
    };
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let stored = u32::from_le_bytes([c0, c1, c2, c3]);
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(Problem::TooLong { len });
    }
    if len == 0 {
        return Err(Problem::Empty);
    }
    if len > after.len() {
        return Err(Problem::ShortPayload {
            len,
            available: after.len(),
        });
    }
    Ok((len, stored))
}

fn read_payload(payload: &[u8], stored: u32) -> Result<LogEntry, Problem> {
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(Problem::Checksum { stored, computed });
    }
    LogEntry::decode(payload).map_err(|e| Problem::Decode(e.to_string()))
}

/// Searches every byte position from `from` on for a record that passes all checks and holds
/// an index >= `min_index`; describes the first one found. `None` means nothing valid follows,
/// so the bad record before `from` is a torn tail.
fn valid_record_after(bytes: &[u8], from: usize, min_index: u64) -> Option<String> {
    let mut hashed = 0;
    for offset in from..bytes.len() {
        let rest = &bytes[offset..];
        let Ok((len, stored)) = read_header(rest) else {
            continue;
        };
        hashed += len;
        if hashed > TAIL_SEARCH_HASH_BYTES_MAX {
            return Some(format!(
                "more data than recovery searches ({TAIL_SEARCH_HASH_BYTES_MAX} bytes hashed)"
            ));
        }
        match read_payload(&rest[HEADER_BYTES..HEADER_BYTES + len], stored) {
            Ok(entry) if entry.index >= min_index => {
                return Some(format!(
                    "a valid record of index {} at byte offset {offset}",
                    entry.index
                ));
            }
            _ => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvraft_proto::log_entry::Payload;
    use kvraft_proto::PutCommand;

    fn entry(index: u64, term: u64) -> LogEntry {
        let put = PutCommand {
            session_id: 7,
            seq: index,
            ack_seq: 0,
            key: format!("key-{index}").into_bytes().into(),
            value: vec![index as u8; 20].into(),
        };
        LogEntry {
            term,
            index,
            time_ms: 1_700_000_000_000 + index,
            payload: Some(Payload::Put(put)),
        }
    }

    fn entries(first: u64, last: u64, term: u64) -> Vec<LogEntry> {
        (first..=last).map(|i| entry(i, term)).collect()
    }

    fn record(e: &LogEntry) -> Vec<u8> {
        encode_records(std::slice::from_ref(e), 0).0
    }

    fn open(dir: &Path) -> (FileLogStore, Vec<LogEntry>, Recovery) {
        FileLogStore::open(dir).expect("open log")
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(LOG_FILE_NAME))
            .expect("stat log")
            .len()
    }

    /// Writes records 1..=n through the store and returns the file length.
    fn write_log(dir: &Path, n: u64) -> u64 {
        let (mut store, _, _) = open(dir);
        store.append(&entries(1, n, 1)).expect("append");
        store.syncer().sync().expect("sync");
        file_len(dir)
    }

    fn append_raw(dir: &Path, bytes: &[u8]) {
        let mut all = std::fs::read(dir.join(LOG_FILE_NAME)).expect("read log");
        all.extend_from_slice(bytes);
        std::fs::write(dir.join(LOG_FILE_NAME), all).expect("write log");
    }

    fn flip_byte(dir: &Path, offset: usize) {
        let mut all = std::fs::read(dir.join(LOG_FILE_NAME)).expect("read log");
        all[offset] ^= 0x10;
        std::fs::write(dir.join(LOG_FILE_NAME), all).expect("write log");
    }

    fn expect_corrupt(dir: &Path) -> (u64, String, String) {
        match FileLogStore::open(dir) {
            Err(e @ StorageError::Corrupt { .. }) => {
                let StorageError::Corrupt {
                    offset, ref reason, ..
                } = e
                else {
                    unreachable!()
                };
                (offset, reason.clone(), e.to_string())
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok((_, entries, recovery)) => {
                panic!(
                    "expected Corrupt, opened with {} entries, {recovery:?}",
                    entries.len()
                )
            }
        }
    }

    #[test]
    fn empty_dir_opens_empty_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let (store, got, recovery) = open(&data);
        assert_eq!(store.last_index(), 0);
        assert!(got.is_empty());
        assert_eq!(
            recovery,
            Recovery {
                entries: 0,
                truncated_tail_bytes: 0
            }
        );
        assert_eq!(file_len(&data), 0);
    }

    #[test]
    fn append_then_reopen_returns_the_same_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        store.append(&entries(1, 2, 1)).expect("append");
        store.append(&entries(3, 3, 2)).expect("append");
        store.syncer().sync().expect("sync");
        assert_eq!(store.last_index(), 3);
        drop(store);

        let mut want = entries(1, 2, 1);
        want.push(entry(3, 2));
        let expected_len: usize = want.iter().map(|e| record(e).len()).sum();
        let (store, got, recovery) = open(dir.path());
        assert_eq!(got, want);
        assert_eq!(store.last_index(), 3);
        assert_eq!(
            recovery,
            Recovery {
                entries: 3,
                truncated_tail_bytes: 0
            }
        );
        assert_eq!(file_len(dir.path()), expected_len as u64);
    }

    #[test]
    fn truncate_then_append_then_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        store.append(&entries(1, 5, 1)).expect("append");
        store
            .truncate_from(9)
            .expect("truncate beyond the end is a no-op");
        assert_eq!(store.last_index(), 5);
        store.truncate_from(3).expect("truncate");
        assert_eq!(store.last_index(), 2);
        let len_after_truncate: usize = entries(1, 2, 1).iter().map(|e| record(e).len()).sum();
        assert_eq!(file_len(dir.path()), len_after_truncate as u64);
        store.append(&entries(3, 4, 2)).expect("append");
        store.syncer().sync().expect("sync");
        drop(store);

        let (store, got, _) = open(dir.path());
        let mut want = entries(1, 2, 1);
        want.extend(entries(3, 4, 2));
        assert_eq!(got, want);
        assert_eq!(store.last_index(), 4);
    }

    #[test]
    fn truncate_everything_then_append_from_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        store.append(&entries(1, 3, 1)).expect("append");
        store.truncate_from(1).expect("truncate");
        assert_eq!((store.last_index(), file_len(dir.path())), (0, 0));
        store.append(&entries(1, 1, 4)).expect("append");
        drop(store);
        let (_, got, _) = open(dir.path());
        assert_eq!(got, vec![entry(1, 4)]);
    }

    /// Writes two records, adds `tail` after them, reopens: only the tail must go, and the
    /// store must append after the kept records.
    fn assert_tail_is_cut(tail: &[u8]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let valid_len = write_log(dir.path(), 2);
        append_raw(dir.path(), tail);

        let (mut store, got, recovery) = open(dir.path());
        assert_eq!(got, entries(1, 2, 1));
        let cut = tail.len() as u64;
        assert_eq!(
            recovery,
            Recovery {
                entries: 2,
                truncated_tail_bytes: cut
            }
        );
        assert_eq!(file_len(dir.path()), valid_len);

        store
            .append(&entries(3, 3, 1))
            .expect("append after recovery");
        drop(store);
        let (_, got, recovery) = open(dir.path());
        assert_eq!(got, entries(1, 3, 1));
        assert_eq!(recovery.truncated_tail_bytes, 0);
    }

    #[test]
    fn torn_tail_half_a_header_is_cut() {
        assert_tail_is_cut(&record(&entry(3, 1))[..5]);
    }

    #[test]
    fn torn_tail_half_a_record_is_cut() {
        let rec = record(&entry(3, 1));
        assert_tail_is_cut(&rec[..rec.len() / 2]);
    }

    #[test]
    fn torn_tail_full_header_short_payload_is_cut() {
        assert_tail_is_cut(&record(&entry(3, 1))[..HEADER_BYTES + 3]);
    }

    #[test]
    fn torn_tail_last_record_with_flipped_payload_byte_is_cut() {
        let mut rec = record(&entry(3, 1));
        let last = rec.len() - 1;
        rec[last] ^= 0x01;
        assert_tail_is_cut(&rec);
    }

    #[test]
    fn torn_tail_of_zeros_is_cut() {
        assert_tail_is_cut(&[0u8; 4096]);
    }

    #[test]
    fn flipped_byte_in_first_of_three_records_is_corruption_at_offset_0() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len_before = write_log(dir.path(), 3);
        flip_byte(dir.path(), HEADER_BYTES + 2);

        let (offset, reason, message) = expect_corrupt(dir.path());
        assert_eq!(offset, 0);
        assert!(reason.starts_with("checksum mismatch"), "{reason}");
        let rec1 = record(&entry(1, 1)).len();
        assert!(
            reason.contains(&format!("index 2 at byte offset {rec1}")),
            "{reason}"
        );
        let path = dir.path().join(LOG_FILE_NAME);
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("at byte offset 0:"), "{message}");
        assert_eq!(
            file_len(dir.path()),
            len_before,
            "a corrupt log must not be modified"
        );
    }

    #[test]
    fn damaged_length_field_in_the_middle_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 3);
        // Bit 20 of the first length: the payload now "runs past the end of the file", as a
        // torn record would, but records 2 and 3 are intact after it.
        flip_byte(dir.path(), 2);

        let (offset, reason, _) = expect_corrupt(dir.path());
        assert_eq!(offset, 0);
        assert!(reason.contains("runs past the end of the file"), "{reason}");
    }

    #[test]
    fn non_consecutive_index_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 2);
        append_raw(dir.path(), &record(&entry(4, 1)));

        let (offset, reason, _) = expect_corrupt(dir.path());
        let expected_offset = record(&entry(1, 1)).len() + record(&entry(2, 1)).len();
        assert_eq!(offset, expected_offset as u64);
        assert_eq!(
            reason,
            "entry has index 4, expected 3 (indices must be consecutive from 1)"
        );
    }

    #[test]
    fn first_entry_must_have_index_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOG_FILE_NAME), record(&entry(2, 1))).expect("write");
        let (offset, reason, _) = expect_corrupt(dir.path());
        assert_eq!(offset, 0);
        assert!(reason.contains("index 2, expected 1"), "{reason}");
    }

    #[test]
    #[should_panic(expected = "has index 5, expected 3")]
    fn append_that_skips_an_index_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        store.append(&entries(1, 2, 1)).expect("append");
        let _ = store.append(&[entry(5, 1)]);
    }

    #[test]
    fn sync_from_another_thread_while_appending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        let syncer = store.syncer();
        let handle = std::thread::spawn(move || (0..20).try_for_each(|_| syncer.sync()));
        for i in 1..=50 {
            store.append(&[entry(i, 1)]).expect("append");
        }
        handle.join().expect("sync thread").expect("sync");
        store.syncer().sync().expect("sync");
        drop(store);
        assert_eq!(open(dir.path()).1, entries(1, 50, 1));
    }
}
