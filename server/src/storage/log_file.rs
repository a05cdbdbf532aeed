//! The file-backed log: a directory `<dir>/wal` of segment files, each a header followed by
//! checksummed records (format in the [`super`] module doc), with an in-memory table of record
//! offsets per segment.
//!
//! ```text
//!  append(entries) --pwrite at the end of the last segment--> page cache --Syncer::sync--> disk
//!      (zeros written ahead of the end, PREALLOCATE_BYTES at a time; a segment past
//!       SEGMENT_BYTES_TARGET is cut to its records, fsynced and closed; the next starts a file)
//!  truncate_from(i) --delete later segments, set_len in the one holding i, fdatasync--> disk
//!  remove_segments_below(i) --delete the leading segments that hold only entries below i
//!  open(dir) --read every segment, check every header and record--> (store, entries, Recovery)
//! ```
//!
//! Invariants: segments hold consecutive indices, each starting where the previous ended, and
//! a segment's file name and header both give its first index; only the last segment may be
//! empty, and only it may end in a torn record (a segment is fsynced before the next one is
//! created). On open a bad record is a torn tail (cut off, with a warning) only at the end of
//! the last segment and only when no valid record follows it; otherwise it is corruption and
//! the open fails naming the file and offset (DESIGN.md rule 9). A header with another magic
//! number or format version is refused with an error naming the file, never misread.
//!
//! Preallocation: the last segment is kept up to [`PREALLOCATE_BYTES`] longer than its records,
//! the space written with zeros, so that most appends overwrite blocks the file already has.
//! An fdatasync after such a write flushes the data alone; after a write that grows the file
//! it must also write the inode (the file's size), a second disk write. Measured on a 2-core
//! VM (ext4), 2 KB appends each followed by fdatasync: 330-417 us and 130-166 us of CPU per
//! fsync growing the file, 217-291 us and 83-106 us writing into zeros. On open, zeros after
//! the last record are that space (cut, without a warning); anything else there is a torn
//! tail as before. A segment is cut to its records before it is closed, so a closed segment
//! never ends in zeros.
//!
//! A data directory written before segments existed has a single file `<dir>/log` (records from
//! index 1, no header). It is converted on open: its valid records are copied into a first
//! segment, made durable, and only then is `<dir>/log` removed, so a crash at any point leaves
//! either the old file (converted again on the next open) or the segment.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use kvraft_common::{create_dir_durable, sync_dir};
use kvraft_proto::LogEntry;
use prost::Message;

use super::{io_err, LogStore, StorageError, Syncer};

/// The segment directory inside the data directory.
const WAL_DIR: &str = "wal";
/// The single log file of data directories written before segments (converted on open).
const LEGACY_LOG_FILE: &str = "log";
/// First bytes of every segment file.
const SEGMENT_MAGIC: [u8; 8] = *b"KVRFTLOG";
/// The segment layout this server writes and reads; another number is refused.
pub const SEGMENT_FORMAT: u32 = 1;
/// Segment header: magic (8) | format u32 LE | first index u64 LE | crc32 of those 20 bytes.
const SEGMENT_HEADER_BYTES: usize = 24;
/// A segment that has reached this size is closed before the next append; the unit in which
/// the log is deleted once the state machine holds it.
pub const SEGMENT_BYTES_TARGET: u64 = 16 * 1024 * 1024;
/// How far ahead of its records the last segment is written with zeros (see the module doc):
/// the most disk the log holds beyond its records.
pub const PREALLOCATE_BYTES: u64 = 256 * 1024;
/// Zeros written per call while preallocating.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Bytes the log of data directory `dir` takes on disk now (0 if it cannot be read).
pub fn log_disk_bytes(dir: &Path) -> u64 {
    let segments = std::fs::read_dir(dir.join(WAL_DIR)).map_or(0, |entries| {
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    });
    let legacy = std::fs::metadata(dir.join(LEGACY_LOG_FILE)).map_or(0, |m| m.len());
    segments + legacy
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
    /// Entries read back from the segments.
    pub entries: usize,
    /// Bytes of a torn record cut from the end of the last segment (0 after a clean shutdown).
    pub truncated_tail_bytes: u64,
    /// Segment files read.
    pub segments: usize,
    /// The directory held a pre-segment `log` file, now converted.
    pub converted_legacy_log: bool,
}

/// One segment file.
struct Segment {
    first: u64,
    path: PathBuf,
    file: File,
    /// `offsets[i]` is where the record of index `first + i` starts.
    offsets: Vec<u64>,
    /// End of the records: the next record is written here.
    end: u64,
    /// Length of the file: `end` and zeros after it (only in the last segment).
    allocated: u64,
}

impl Segment {
    fn last_index(&self) -> u64 {
        self.first + self.offsets.len() as u64 - 1
    }
}

/// A [`LogStore`] in segment files; see the module doc.
pub struct FileLogStore {
    wal: PathBuf,
    /// Never empty; the last one takes appends.
    segments: Vec<Segment>,
    segment_bytes: u64,
    /// Shared with the sync thread; holds its own descriptor of the last segment.
    syncer: Arc<FileSyncer>,
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// The first index a segment file name gives, or `None` for any other name.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn segment_header(first: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    h[12..20].copy_from_slice(&first.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment's header against its name's first index.
fn check_segment_header(bytes: &[u8], path: &Path, first: u64) -> Result<(), StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason,
    };
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(corrupt(format!(
            "segment header needs {SEGMENT_HEADER_BYTES} bytes, the file has {}",
            bytes.len()
        )));
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return Err(corrupt(
            "not a kvraft log segment (wrong magic number)".to_string(),
        ));
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[..20]) {
        return Err(corrupt("segment header checksum mismatch".to_string()));
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format != SEGMENT_FORMAT {
        return Err(StorageError::InvalidState {
            path: path.to_path_buf(),
            reason: format!(
                "log segment format {format}; this server reads format {SEGMENT_FORMAT} \
                 (written by another version of kvraft)"
            ),
        });
    }
    let stored = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if stored != first {
        return Err(corrupt(format!(
            "header says first index {stored}, the file name says {first}"
        )));
    }
    Ok(())
}

/// Creates segment `first` durably (header written and fsynced, directory entry fsynced),
/// holding `records` (already encoded, starting at index `first`) after the header.
fn create_segment(wal: &Path, first: u64, records: &[u8]) -> Result<File, StorageError> {
    let path = wal.join(segment_name(first));
    let tmp = wal.join(format!("{}.tmp", segment_name(first)));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mut contents = segment_header(first).to_vec();
    contents.extend_from_slice(records);
    file.write_all_at(&contents, 0).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(wal)?;
    Ok(file)
}

impl FileLogStore {
    /// Opens (or creates) the log of data directory `dir`, reads and checks every segment,
    /// cuts a torn tail and returns the store positioned after the last valid record, with the
    /// entries read.
    pub fn open(dir: &Path) -> Result<(FileLogStore, Vec<LogEntry>, Recovery), StorageError> {
        Self::open_with(dir, SEGMENT_BYTES_TARGET)
    }

    /// As [`FileLogStore::open`], closing segments at `segment_bytes` (`[server]
    /// log_segment_bytes`; tests use small ones).
    pub fn open_with(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(FileLogStore, Vec<LogEntry>, Recovery), StorageError> {
        create_dir_durable(dir)?;
        let wal = dir.join(WAL_DIR);
        create_dir_durable(&wal)?;
        let mut recovery = Recovery {
            entries: 0,
            truncated_tail_bytes: 0,
            segments: 0,
            converted_legacy_log: false,
        };
        let legacy = dir.join(LEGACY_LOG_FILE);
        if legacy.exists() {
            recovery.truncated_tail_bytes = convert_legacy_log(dir, &legacy, &wal)?;
            recovery.converted_legacy_log = true;
        }
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(&wal).map_err(io_err(&wal))? {
            let item = item.map_err(io_err(&wal))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // An interrupted segment creation: never part of the log.
                let path = item.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            } else if let Some(first) = parse_segment_name(&name) {
                firsts.push(first);
            } else {
                tracing::warn!(path = %item.path().display(), "not a log segment; ignored");
            }
        }
        firsts.sort_unstable();
        if firsts.is_empty() {
            create_segment(&wal, 1, &[])?;
            firsts.push(1);
        }
        let mut segments: Vec<Segment> = Vec::with_capacity(firsts.len());
        let mut entries = Vec::new();
        for (i, &first) in firsts.iter().enumerate() {
            let path = wal.join(segment_name(first));
            if let Some(prev) = segments.last() {
                if prev.last_index() + 1 != first {
                    return Err(StorageError::Corrupt {
                        path,
                        offset: 0,
                        reason: format!(
                            "segment starts at index {first}, but the previous one ends at {}",
                            prev.last_index()
                        ),
                    });
                }
            }
            let last = i + 1 == firsts.len();
            let (segment, read, tail) = open_segment(path, first, last)?;
            recovery.truncated_tail_bytes += tail;
            entries.extend(read);
            segments.push(segment);
        }
        recovery.entries = entries.len();
        recovery.segments = segments.len();
        let current = segments.last().expect("invariant: at least one segment");
        let file = current.file.try_clone().map_err(io_err(&current.path))?;
        let syncer = Arc::new(FileSyncer::new(&current.path, file));
        let store = FileLogStore {
            wal,
            segments,
            segment_bytes: segment_bytes.max(1),
            syncer,
        };
        Ok((store, entries, recovery))
    }

    /// Index of the first entry the log holds (or would hold next, when empty).
    pub fn first_index(&self) -> u64 {
        self.segments[0].first
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Deletes the leading segments that hold only entries below `index` (never the last
    /// segment); returns how many. The caller must hold those entries elsewhere durably (the
    /// state machine) before calling. Oldest first, so a crash leaves a contiguous log.
    pub fn remove_segments_below(&mut self, index: u64) -> Result<usize, StorageError> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first <= index {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.wal)?;
        }
        Ok(removed)
    }

    /// Closes the last segment (fsynced) and starts a new one at the next index.
    fn roll(&mut self) -> Result<(), StorageError> {
        let last = self
            .segments
            .last_mut()
            .expect("invariant: at least one segment");
        // A closed segment ends at its last record: zeros there would read as a torn record
        // in a closed segment, which recovery calls corruption.
        if last.allocated > last.end {
            last.file.set_len(last.end).map_err(io_err(&last.path))?;
            last.allocated = last.end;
        }
        last.file.sync_data().map_err(io_err(&last.path))?;
        let first = self.last_index() + 1;
        let file = create_segment(&self.wal, first, &[])?;
        let path = self.wal.join(segment_name(first));
        self.syncer
            .replace(&path, file.try_clone().map_err(io_err(&path))?);
        self.segments.push(Segment {
            first,
            path,
            file,
            offsets: Vec::new(),
            end: SEGMENT_HEADER_BYTES as u64,
            allocated: SEGMENT_HEADER_BYTES as u64,
        });
        Ok(())
    }
}

/// Opens segment `first` at `path` and reads it: the segment, its entries and the bytes of a
/// torn tail cut off (only the `last` segment may have one).
fn open_segment(
    path: PathBuf,
    first: u64,
    last: bool,
) -> Result<(Segment, Vec<LogEntry>, u64), StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let bytes = read_all(&file, &path)?;
    check_segment_header(&bytes, &path, first)?;
    let body = &bytes[SEGMENT_HEADER_BYTES..];
    let scan = scan_records(body, first, last, SEGMENT_HEADER_BYTES).map_err(|bad| {
        StorageError::Corrupt {
            path: path.clone(),
            offset: bad.offset as u64,
            reason: bad.reason,
        }
    })?;
    if !last && scan.entries.is_empty() {
        return Err(StorageError::Corrupt {
            path,
            offset: SEGMENT_HEADER_BYTES as u64,
            reason: "an empty segment before the last one".to_string(),
        });
    }
    let end = (SEGMENT_HEADER_BYTES + scan.valid_len) as u64;
    let tail = &bytes[SEGMENT_HEADER_BYTES + scan.valid_len..];
    // Zeros are the preallocated space (see the module doc), not a torn record.
    let torn = if tail.iter().all(|&b| b == 0) {
        0
    } else {
        tail.len() as u64
    };
    if !tail.is_empty() {
        cut_tail(&file, &path, end, torn)?;
    }
    let segment = Segment {
        first,
        path,
        file,
        offsets: scan.offsets,
        end,
        allocated: end,
    };
    Ok((segment, scan.entries, torn))
}

/// Converts a pre-segment `<dir>/log` into segment 1; returns the torn-tail bytes dropped.
fn convert_legacy_log(dir: &Path, legacy: &Path, wal: &Path) -> Result<u64, StorageError> {
    let file = File::open(legacy).map_err(io_err(legacy))?;
    let bytes = read_all(&file, legacy)?;
    let scan = scan_records(&bytes, 1, true, 0).map_err(|bad| StorageError::Corrupt {
        path: legacy.to_path_buf(),
        offset: bad.offset as u64,
        reason: bad.reason,
    })?;
    // Whatever an earlier, interrupted conversion left is replaced.
    for item in std::fs::read_dir(wal).map_err(io_err(wal))? {
        let path = item.map_err(io_err(wal))?.path();
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    create_segment(wal, 1, &bytes[..scan.valid_len])?;
    std::fs::remove_file(legacy).map_err(io_err(legacy))?;
    sync_dir(dir)?;
    tracing::info!(
        path = %legacy.display(),
        entries = scan.entries.len(),
        "converted the log file into segment files under {}",
        wal.display()
    );
    Ok((bytes.len() - scan.valid_len) as u64)
}

impl LogStore for FileLogStore {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        assert_continues(self.last_index(), entries);
        let full = self
            .segments
            .last()
            .is_some_and(|s| !s.offsets.is_empty() && s.end >= self.segment_bytes);
        if full {
            self.roll()?;
        }
        let seg = self
            .segments
            .last_mut()
            .expect("invariant: at least one segment");
        let (buf, starts) = encode_records(entries, seg.end);
        if let Err(source) = seg.file.write_all_at(&buf, seg.end) {
            // Best effort: drop a partial write so it cannot sit between records if the
            // caller retries. The error below takes the server out either way.
            let _ = seg.file.set_len(seg.end);
            seg.allocated = seg.end;
            return Err(io_err(&seg.path)(source));
        }
        seg.offsets.extend(starts);
        seg.end += buf.len() as u64;
        seg.allocated = seg.allocated.max(seg.end);
        preallocate(seg);
        Ok(())
    }

    fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
        assert!(
            index >= self.first_index(),
            "truncate_from({index}): below the log's first index {}",
            self.first_index()
        );
        if index > self.last_index() {
            return Ok(());
        }
        // The newest segments first, so a crash leaves a contiguous log.
        let mut removed = false;
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.first > index) {
            let seg = self.segments.pop().expect("checked");
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            removed = true;
        }
        let seg = self
            .segments
            .last_mut()
            .expect("invariant: at least one segment");
        let keep = (index - seg.first) as usize;
        let offset = seg
            .offsets
            .get(keep)
            .copied()
            .expect("invariant: index is within the last segment");
        seg.file.set_len(offset).map_err(io_err(&seg.path))?;
        seg.offsets.truncate(keep);
        seg.end = offset;
        seg.allocated = offset;
        // Durable now, before new records overwrite the same bytes: otherwise a crash could
        // leave new records followed by old ones, which recovery must call corruption.
        seg.file.sync_data().map_err(io_err(&seg.path))?;
        if removed {
            let file = seg.file.try_clone().map_err(io_err(&seg.path))?;
            self.syncer.replace(&seg.path, file);
            sync_dir(&self.wal)?;
        }
        Ok(())
    }

    fn compact_to(&mut self, index: u64) -> Result<usize, StorageError> {
        self.remove_segments_below(index.saturating_add(1))
    }

    fn reset_to(&mut self, next: u64) -> Result<(), StorageError> {
        assert!(next >= 1, "invariant: log indices start at 1");
        // The old segments go first (newest first: a crash leaves a contiguous prefix, or
        // nothing), then the new empty one is created durably. Whoever resets holds the entries
        // below `next` elsewhere and redoes the reset after a crash.
        while let Some(seg) = self.segments.pop() {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        sync_dir(&self.wal)?;
        let file = create_segment(&self.wal, next, &[])?;
        let path = self.wal.join(segment_name(next));
        self.syncer
            .replace(&path, file.try_clone().map_err(io_err(&path))?);
        self.segments.push(Segment {
            first: next,
            path,
            file,
            offsets: Vec::new(),
            end: SEGMENT_HEADER_BYTES as u64,
            allocated: SEGMENT_HEADER_BYTES as u64,
        });
        Ok(())
    }

    fn last_index(&self) -> u64 {
        self.segments
            .last()
            .expect("invariant: at least one segment")
            .last_index()
    }

    fn syncer(&self) -> Arc<dyn Syncer> {
        self.syncer.clone()
    }
}

/// Makes the last segment durable from another thread; fdatasync on its own descriptor covers
/// every write and `set_len` made through any descriptor of the file before the call. Earlier
/// segments were fsynced when they were closed.
struct FileSyncer {
    /// Shared, not duplicated per sync: taking it costs no system call.
    current: Mutex<(Arc<PathBuf>, Arc<File>)>,
}

impl FileSyncer {
    fn new(path: &Path, file: File) -> FileSyncer {
        FileSyncer {
            current: Mutex::new((Arc::new(path.to_path_buf()), Arc::new(file))),
        }
    }

    fn replace(&self, path: &Path, file: File) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            (Arc::new(path.to_path_buf()), Arc::new(file));
    }
}

impl Syncer for FileSyncer {
    fn sync(&self) -> Result<(), StorageError> {
        let (path, file) = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        file.sync_data().map_err(io_err(&path))
    }
}

/// Writes zeros up to [`PREALLOCATE_BYTES`] past the records once fewer than half of that
/// remain (so zeros are written once per half of it). Only a speed-up: a failure (a full disk)
/// leaves appends to grow the file as they would without it.
fn preallocate(seg: &mut Segment) {
    if seg.allocated >= seg.end + PREALLOCATE_BYTES / 2 {
        return;
    }
    let target = seg.end + PREALLOCATE_BYTES;
    let mut at = seg.allocated;
    while at < target {
        let n = (target - at).min(ZEROS.len() as u64) as usize;
        if let Err(e) = seg.file.write_all_at(&ZEROS[..n], at) {
            tracing::debug!(path = %seg.path.display(), "log preallocation stopped: {e}");
            // The file may hold part of this write: roll cuts it to the records.
            seg.allocated = target;
            return;
        }
        at += n as u64;
    }
    seg.allocated = target;
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

fn read_all(mut file: &File, path: &Path) -> Result<Vec<u8>, StorageError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(bytes)
}

/// Cuts the file to `valid_len` and makes that durable before anything is appended after it;
/// `torn_bytes` (0 for preallocated zeros) are reported as a torn record.
fn cut_tail(file: &File, path: &Path, valid_len: u64, torn_bytes: u64) -> Result<(), StorageError> {
    if torn_bytes > 0 {
        tracing::warn!(
            path = %path.display(),
            offset = valid_len,
            torn_bytes,
            "log ends in a torn record (interrupted write); truncating {torn_bytes} bytes"
        );
    }
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

/// Reads records from the start, the first holding index `first`; stops at a torn tail
/// (only where one may be: `tail_allowed`), fails at corruption. `base` is where `bytes` start
/// in the file: the record offsets returned and named in errors are file offsets.
fn scan_records(
    bytes: &[u8],
    first: u64,
    tail_allowed: bool,
    base: usize,
) -> Result<Scan, BadRecord> {
    let mut scan = Scan::default();
    while scan.valid_len < bytes.len() {
        let offset = scan.valid_len;
        let expected = first + scan.entries.len() as u64;
        match read_record(&bytes[offset..], expected) {
            Ok((entry, record_len)) => {
                scan.offsets.push((base + offset) as u64);
                scan.entries.push(entry);
                scan.valid_len += record_len;
            }
            Err(problem) if tail_allowed => {
                return classify(bytes, offset, expected, problem, base).map(|()| scan)
            }
            Err(problem) => {
                let reason = format!(
                    "{problem} in a segment that was closed whole, so it is not a torn tail"
                );
                let offset = base + offset;
                return Err(BadRecord { offset, reason });
            }
        }
    }
    Ok(scan)
}

/// Decides whether the bad record at `offset` is a torn tail (`Ok`) or corruption.
fn classify(
    bytes: &[u8],
    offset: usize,
    expected: u64,
    problem: Problem,
    base: usize,
) -> Result<(), BadRecord> {
    let reason = match problem {
        // A record with a valid checksum was written whole: a wrong index is never a torn write.
        Problem::Index { .. } => problem.to_string(),
        _ => match valid_record_after(bytes, offset + 1, expected, base) {
            None => return Ok(()),
            Some(found) => format!("{problem}, but {found} follows, so it is not a torn tail"),
        },
    };
    let offset = base + offset;
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
    #[error("entry has index {found}, expected {expected} (indices must be consecutive)")]
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
fn valid_record_after(bytes: &[u8], from: usize, min_index: u64, base: usize) -> Option<String> {
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
                    "a valid record of index {} at byte offset {}",
                    entry.index,
                    base + offset
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

    /// The first segment's file.
    fn seg1(dir: &Path) -> PathBuf {
        dir.join(WAL_DIR).join(segment_name(1))
    }

    /// Bytes of records in the first segment (after its header).
    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(seg1(dir)).expect("stat log").len() - SEGMENT_HEADER_BYTES as u64
    }

    fn recovered(entries: usize, cut: u64) -> Recovery {
        Recovery {
            entries,
            truncated_tail_bytes: cut,
            segments: 1,
            converted_legacy_log: false,
        }
    }

    /// Writes records 1..=n through the store and returns their length. The file goes on
    /// with the preallocated zeros.
    fn write_log(dir: &Path, n: u64) -> u64 {
        let (mut store, _, _) = open(dir);
        store.append(&entries(1, n, 1)).expect("append");
        store.syncer().sync().expect("sync");
        let records: usize = entries(1, n, 1).iter().map(|e| record(e).len()).sum();
        assert!(file_len(dir) >= records as u64 + PREALLOCATE_BYTES / 2);
        records as u64
    }

    /// Writes `bytes` at offset `at` of the records, over the preallocated zeros, as an
    /// interrupted write leaves them.
    fn write_raw(dir: &Path, at: u64, bytes: &[u8]) {
        let file = OpenOptions::new()
            .write(true)
            .open(seg1(dir))
            .expect("open");
        let at = SEGMENT_HEADER_BYTES as u64 + at;
        file.write_all_at(bytes, at).expect("write log");
    }

    /// Flips a bit of the byte at `offset` of the records (after the segment header).
    fn flip_byte(dir: &Path, offset: usize) {
        let mut all = std::fs::read(seg1(dir)).expect("read log");
        all[SEGMENT_HEADER_BYTES + offset] ^= 0x10;
        std::fs::write(seg1(dir), all).expect("write log");
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
        assert_eq!(recovery, recovered(0, 0));
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
        assert_eq!(recovery, recovered(3, 0));
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

    /// Writes two records, writes `tail` after them, reopens: only what follows the records
    /// must go (reported as torn unless it is all zeros), and the store must append after the
    /// kept records.
    fn assert_tail_is_cut(tail: &[u8]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let valid_len = write_log(dir.path(), 2);
        write_raw(dir.path(), valid_len, tail);
        let after = file_len(dir.path()) - valid_len;

        let (mut store, got, recovery) = open(dir.path());
        assert_eq!(got, entries(1, 2, 1));
        let torn = tail.iter().any(|&b| b != 0);
        assert_eq!(recovery, recovered(2, if torn { after } else { 0 }));
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
    fn preallocated_zeros_are_cut_and_not_reported_as_torn() {
        assert_tail_is_cut(&[0u8; 4096]);
        assert_tail_is_cut(&[]);
    }

    /// Appends past several preallocation steps: the file stays ahead of the records by at
    /// most PREALLOCATE_BYTES, every entry reads back, and a reopen cuts the zeros.
    #[test]
    fn appends_write_into_preallocated_zeros_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _, _) = open(dir.path());
        let big = |i: u64| LogEntry {
            time_ms: i,
            payload: Some(Payload::Put(PutCommand {
                session_id: 7,
                seq: i,
                ack_seq: 0,
                key: vec![b'k'; 16].into(),
                value: vec![7u8; 3000].into(),
            })),
            ..entry(i, 1)
        };
        let mut records = 0u64;
        let mut all = Vec::new();
        for i in 1..=400 {
            let e = big(i);
            records += record(&e).len() as u64;
            store.append(std::slice::from_ref(&e)).expect("append");
            all.push(e);
            let len = file_len(dir.path());
            assert!(
                len >= records && len <= records + PREALLOCATE_BYTES,
                "{len} {records}"
            );
        }
        assert!(records > 3 * PREALLOCATE_BYTES);
        store.syncer().sync().expect("sync");
        drop(store);
        let (_, got, recovery) = open(dir.path());
        assert_eq!(got, all);
        assert_eq!(recovery, recovered(400, 0));
        assert_eq!(file_len(dir.path()), records);
    }

    #[test]
    fn flipped_byte_in_first_of_three_records_is_corruption_at_offset_0() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 3);
        let len_before = file_len(dir.path());
        flip_byte(dir.path(), HEADER_BYTES + 2);

        let (offset, reason, message) = expect_corrupt(dir.path());
        assert_eq!(offset, SEGMENT_HEADER_BYTES as u64);
        assert!(reason.starts_with("checksum mismatch"), "{reason}");
        let rec1 = SEGMENT_HEADER_BYTES + record(&entry(1, 1)).len();
        assert!(
            reason.contains(&format!("index 2 at byte offset {rec1}")),
            "{reason}"
        );
        let path = seg1(dir.path());
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("at byte offset {SEGMENT_HEADER_BYTES}:")),
            "{message}"
        );
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
        assert_eq!(offset, SEGMENT_HEADER_BYTES as u64);
        assert!(reason.contains("runs past the end of the file"), "{reason}");
    }

    #[test]
    fn non_consecutive_index_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records = write_log(dir.path(), 2);
        write_raw(dir.path(), records, &record(&entry(4, 1)));

        let (offset, reason, _) = expect_corrupt(dir.path());
        let expected_offset =
            SEGMENT_HEADER_BYTES + record(&entry(1, 1)).len() + record(&entry(2, 1)).len();
        assert_eq!(offset, expected_offset as u64);
        assert_eq!(
            reason,
            "entry has index 4, expected 3 (indices must be consecutive)"
        );
    }

    #[test]
    fn first_entry_of_a_pre_segment_log_must_have_index_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LEGACY_LOG_FILE), record(&entry(2, 1))).expect("write");
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

    /// A log of entries 1..=n (term 1), appended one by one, whose segments close after
    /// `per_segment` records; returns the store and the segment size used.
    fn small_segments(dir: &Path, per_segment: u64, n: u64) -> (FileLogStore, u64) {
        let small = per_segment * record(&entry(1, 1)).len() as u64;
        let (mut store, _, _) = FileLogStore::open_with(dir, small).expect("open");
        for i in 1..=n {
            store.append(&[entry(i, 1)]).expect("append");
        }
        (store, small)
    }

    #[test]
    fn segments_roll_reopen_truncate_across_and_are_removed_below_an_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, small) = small_segments(dir.path(), 3, 20);
        store.syncer().sync().expect("sync");
        let count = store.segment_count();
        assert!(count >= 5, "{count} segments");
        drop(store);
        let (mut store, got, recovery) = FileLogStore::open_with(dir.path(), small).expect("open");
        assert_eq!(got, entries(1, 20, 1));
        assert_eq!(recovery.segments, count);

        // Truncation reaching back over several segments deletes them.
        store.truncate_from(8).expect("truncate");
        assert_eq!(store.last_index(), 7);
        assert!(store.segment_count() < count);
        store.append(&entries(8, 12, 2)).expect("append");
        store.syncer().sync().expect("sync");

        assert_eq!(store.remove_segments_below(1).expect("remove"), 0);
        let removed = store.remove_segments_below(10).expect("remove");
        assert!(removed >= 2, "{removed} removed");
        let first = store.first_index();
        assert!(first > 1 && first <= 10, "first index {first}");
        drop(store);
        let (store, got, _) = FileLogStore::open_with(dir.path(), small).expect("open");
        let mut want = entries(1, 7, 1);
        want.extend(entries(8, 12, 2));
        assert_eq!(got, want[(first - 1) as usize..].to_vec());
        assert_eq!((store.first_index(), store.last_index()), (first, 12));
        // The last segment is never removed, even when everything is below the index.
        let (mut store, _, _) = FileLogStore::open_with(dir.path(), small).expect("open");
        store.remove_segments_below(1_000).expect("remove");
        assert_eq!(store.segment_count(), 1);
        assert_eq!(store.last_index(), 12);
    }

    /// A crash in the middle of a compaction: segments go oldest first, one unlink each, so a
    /// crash leaves any number of the oldest segments removed and the rest whole. Every such
    /// state opens, holds a contiguous suffix of the log up to its end, and a later compaction
    /// finishes the job.
    #[test]
    fn a_crash_at_any_point_of_a_compaction_leaves_a_log_that_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, small) = small_segments(dir.path(), 3, 20);
        store.syncer().sync().expect("sync");
        drop(store);
        let wal = dir.path().join(WAL_DIR);
        let mut names: Vec<_> = std::fs::read_dir(&wal)
            .expect("read wal")
            .map(|e| e.expect("entry").path())
            .collect();
        names.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_name)
                .is_some()
        });
        names.sort_by_key(|p| {
            parse_segment_name(p.file_name().and_then(|n| n.to_str()).expect("name"))
        });
        let original: Vec<Vec<u8>> = names
            .iter()
            .map(|p| std::fs::read(p).expect("read"))
            .collect();
        // Removing all but the last would be a whole compaction; every prefix short of it is a
        // crash partway.
        for crashed_after in 0..names.len() - 1 {
            for (path, bytes) in names.iter().zip(&original) {
                std::fs::write(path, bytes).expect("restore");
            }
            for path in &names[..crashed_after] {
                std::fs::remove_file(path).expect("remove");
            }
            let (mut store, got, _) = FileLogStore::open_with(dir.path(), small)
                .unwrap_or_else(|e| panic!("after {crashed_after} removals: {e}"));
            let first = store.first_index();
            assert_eq!(got, entries(first, 20, 1), "after {crashed_after} removals");
            store.compact_to(15).expect("compaction redone");
            assert!(store.first_index() <= 16 && store.first_index() > first.min(13));
            drop(store);
            let (store, got, _) = FileLogStore::open_with(dir.path(), small).expect("reopen");
            assert_eq!(got.last().map(|e| e.index), Some(20));
            assert_eq!(got.first().map(|e| e.index), Some(store.first_index()));
        }
    }

    #[test]
    fn a_reset_log_continues_at_the_given_index_and_reopens_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, small) = small_segments(dir.path(), 3, 10);
        store.reset_to(500).expect("reset");
        assert_eq!((store.first_index(), store.last_index()), (500, 499));
        assert_eq!(store.segment_count(), 1);
        drop(store);
        let (mut store, got, _) = FileLogStore::open_with(dir.path(), small).expect("open");
        assert!(got.is_empty());
        assert_eq!((store.first_index(), store.last_index()), (500, 499));
        for e in entries(500, 507, 3) {
            store.append(&[e]).expect("append");
        }
        store.syncer().sync().expect("sync");
        // compact_to keeps what is above the index, in whole segments.
        let removed = store.compact_to(504).expect("compact");
        assert!(removed >= 1, "{removed}");
        drop(store);
        let (store, got, _) = FileLogStore::open_with(dir.path(), small).expect("open");
        assert_eq!(store.last_index(), 507);
        assert!(store.first_index() > 500 && store.first_index() <= 505);
        assert_eq!(got.last().map(|e| e.index), Some(507));
    }

    #[test]
    fn a_pre_segment_log_is_converted_keeping_its_valid_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut legacy: Vec<u8> = entries(1, 4, 1).iter().flat_map(record).collect();
        legacy.extend_from_slice(&record(&entry(5, 1))[..7]); // torn tail
        std::fs::write(dir.path().join(LEGACY_LOG_FILE), &legacy).expect("write");
        // What an interrupted earlier conversion left.
        std::fs::create_dir_all(dir.path().join(WAL_DIR)).expect("mkdir");
        std::fs::write(seg1(dir.path()), b"half").expect("write");
        let (mut store, got, recovery) = open(dir.path());
        assert_eq!(got, entries(1, 4, 1));
        assert!(recovery.converted_legacy_log);
        assert_eq!(recovery.truncated_tail_bytes, 7);
        assert!(!dir.path().join(LEGACY_LOG_FILE).exists());
        store.append(&[entry(5, 2)]).expect("append");
        drop(store);
        let (_, got, recovery) = open(dir.path());
        assert_eq!(got.len(), 5);
        assert!(!recovery.converted_legacy_log);
    }

    #[test]
    fn a_segment_of_another_format_or_magic_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 2);
        let mut bytes = std::fs::read(seg1(dir.path())).expect("read");
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..20]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(seg1(dir.path()), &bytes).expect("write");
        let err = FileLogStore::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("format 2") && err.contains("seg-"), "{err}");
        bytes[0] = b'X';
        std::fs::write(seg1(dir.path()), &bytes).expect("write");
        let err = FileLogStore::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn a_torn_record_in_a_closed_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, small) = small_segments(dir.path(), 2, 6);
        drop(store);
        let mut bytes = std::fs::read(seg1(dir.path())).expect("read");
        let len = bytes.len();
        bytes.truncate(len - 3);
        std::fs::write(seg1(dir.path()), &bytes).expect("write");
        let err = FileLogStore::open_with(dir.path(), small)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("closed whole"), "{err}");
    }
}
