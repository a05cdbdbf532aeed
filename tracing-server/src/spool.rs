//! The spool: each tracer's events appended to a local file before any token that covers them
//! leaves the process, so a message never waits for the tracing server and a SIGKILL still
//! loses nothing another process has heard of (a `write(2)` is in the kernel's page cache once
//! it returns; the process dying does not undo it).
//!
//! ```text
//!  record ─▶ pending (memory) ──write_out, before a token leaves──▶ <dir>/<identity>.<gen>.spool
//!                                                                     │
//!   shipper: ships from memory as before; once the tracing server     │ read by
//!   stored every event of a closed file, the file is removed          ├─▶ the restarted tracer
//!                                                                     │   (ships what the server
//!                                                                     │    lacks, then continues)
//!                                                                     └─▶ the tracing server's
//!                                                                         scan (a process that
//!                                                                         never comes back)
//! ```
//!
//! File format (a change is detected by the header, never misread): `KVTSPOOL`, format u32 LE,
//! a random u64 naming this file (a name comes back for a new file when a tracer that removed
//! its files starts again; a reader that remembers where it stopped tells them apart by it),
//! then records `[len u32 LE][crc32 u32 LE][own u64 LE][TraceEvent protobuf, len - 8 bytes]`,
//! the crc covering `own` and the event. `own` is the event's own clock entry, so a reader can
//! skip what it already has without decoding. A record cut short (the process was killed
//! mid-write) ends the readable part of a file; readers stop there.
//!
//! Rules: the events of one identity are in clock order across its files (ordered by `gen`,
//! which grows across incarnations); a file is removed only once every event in it is stored
//! by the tracing server; everything here is bounded by [`SPOOL_FILE_BYTES_MAX`] per file and
//! by how far the shipper lags.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// First bytes of every spool file.
pub const SPOOL_MAGIC: &[u8; 8] = b"KVTSPOOL";
/// The record layout described in the module docs.
pub const SPOOL_FORMAT: u32 = 1;
/// Magic, format, the file's random id.
pub const HEADER_BYTES: usize = SPOOL_MAGIC.len() + 4 + 8;
const RECORD_HEAD_BYTES: usize = 4 + 4 + 8;
/// A spool file is closed, and a new one started, once it holds this much; closed files are
/// removed as soon as the tracing server has stored them.
pub const SPOOL_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Encoded events held in memory before they are written even if no token leaves (bounds the
/// memory, and what a SIGKILL can lose of events nobody else has seen).
pub const SPOOL_PENDING_BYTES_MAX: usize = 64 * 1024;
/// Largest record a reader accepts (an event is a few hundred bytes; a bigger length is damage).
const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// `<identity>.<gen>.spool`, with `gen` zero-padded so names sort in order.
pub fn file_name(identity: &str, gen: u64) -> String {
    format!("{identity}.{gen:012}.spool")
}

/// The identity and generation of a spool file's name; `None` for any other file.
pub fn parse_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".spool")?;
    let (identity, gen) = stem.rsplit_once('.')?;
    if identity.is_empty() || gen.len() != 12 {
        return None;
    }
    Some((identity.to_string(), gen.parse().ok()?))
}

/// The spool files in `dir` (of `identity` only, if given), ordered by identity and generation.
/// A missing directory holds none.
pub fn list(dir: &Path, identity: Option<&str>) -> std::io::Result<Vec<(String, u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some((id, gen)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        if identity.is_none_or(|want| want == id) {
            files.push((id, gen, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Appends one record for an encoded `TraceEvent` (whose own clock entry is `own`) to `out`.
pub fn encode_record(out: &mut Vec<u8>, own: u64, event: &[u8]) {
    let len = 8 + event.len();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&own.to_le_bytes());
    out.extend_from_slice(event);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a `TraceEvent` straight from the tracer's clock, as prost would (the same bytes a
/// decoder reads), without building the message and its map first.
pub fn encode_event(
    out: &mut impl prost::bytes::BufMut,
    trace_id: u64,
    tag: &str,
    body: &str,
    clock: &std::collections::BTreeMap<String, u64>,
) {
    use crate::wire::{bytes_field, clock_field};
    use prost::encoding::{encode_key, encode_varint, WireType};
    if trace_id != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(trace_id, out);
    }
    if !tag.is_empty() {
        bytes_field(out, 2, tag.as_bytes());
    }
    if !body.is_empty() {
        bytes_field(out, 3, body.as_bytes());
    }
    clock_field(out, 4, clock);
}

/// What [`read_records`] found: the complete records, and where the readable part ends.
#[derive(Debug, Default)]
pub struct Records<'a> {
    /// `(own, event bytes)` in file order, borrowed from the bytes read (a reader skips most
    /// of them by `own` and copies none); decode with [`crate::wire::decode_event`] when needed.
    pub records: Vec<(u64, &'a [u8])>,
    /// Offset just past the last complete record: where the next read starts.
    pub end: usize,
}

/// Reads the records in `bytes`: a whole spool file (`header`: its header is checked first),
/// or the part after an earlier read's `end`. Stops at a record cut short or damaged (a process
/// killed mid-write); a wrong header is an error naming what was found.
pub fn read_records(bytes: &[u8], header: bool) -> Result<Records<'_>, String> {
    let mut at = 0;
    if header {
        if file_id(bytes)?.is_none() {
            return Ok(Records::default()); // the header is being written
        }
        at = HEADER_BYTES;
    }
    let mut records = Vec::new();
    while bytes.len() - at >= RECORD_HEAD_BYTES {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if !(8..=RECORD_BYTES_MAX).contains(&len) || bytes.len() - at - 8 < len {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        let own = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        records.push((own, &body[8..]));
        at += 8 + len;
    }
    Ok(Records { records, end: at })
}

/// The random id in a spool file's header (which starts `bytes`); `None` while the header is
/// not whole yet, an error naming what is wrong with another magic number or format.
pub fn file_id(bytes: &[u8]) -> Result<Option<u64>, String> {
    // Each part is checked as soon as it is there.
    if bytes.len() >= 8 && &bytes[..SPOOL_MAGIC.len()] != SPOOL_MAGIC {
        return Err("not a spool file (bad magic number)".into());
    }
    if bytes.len() >= 12 {
        let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if format != SPOOL_FORMAT {
            return Err(format!(
                "spool format {format}, this build reads format {SPOOL_FORMAT}"
            ));
        }
    }
    if bytes.len() < HEADER_BYTES {
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(
        bytes[12..20].try_into().expect("8 bytes"),
    )))
}

/// The events (encoded) of `identity`'s spool files in `dir` whose own clock entry is above
/// `after`, in order, and the highest generation found (0 if none). Files that cannot be read
/// are skipped with a warning: tracing never stops a process.
pub fn recover(dir: &Path, identity: &str, after: u64) -> (Vec<Vec<u8>>, u64) {
    let files = match list(dir, Some(identity)) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                identity,
                "cannot list the trace spool {}: {e}",
                dir.display()
            );
            return (Vec::new(), 0);
        }
    };
    let mut events = Vec::new();
    let mut last = after;
    let mut max_gen = 0;
    for (_, gen, path) in files {
        max_gen = max_gen.max(gen);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(identity, "skipping trace spool {}: {e}", path.display());
                continue;
            }
        };
        let records = match read_records(&bytes, true) {
            Ok(r) => r.records,
            Err(e) => {
                tracing::warn!(identity, "skipping trace spool {}: {e}", path.display());
                continue;
            }
        };
        for (own, event) in records {
            if own <= last {
                continue;
            }
            events.push(event.to_vec());
            last = own;
        }
    }
    (events, max_gen)
}

/// Checks that the spool files in `dir` hold the events trace `token` covers: its sender's own
/// counter in its clock is at most the last counter spooled for that sender. What a test of
/// a traced process asks of every token it sees while nothing is shipped (so nothing has left
/// the spool); the answer names the token and the spool's last counter when they disagree.
pub fn covers(dir: &Path, token: &[u8]) -> Result<(), String> {
    let token = crate::wire::decode_token(token).map_err(|e| format!("token: {e}"))?;
    let identity = token.identity;
    let own = crate::wire::counter(&token.clock, identity);
    if own == 0 {
        return Err(format!("a token of {identity:?} without its own counter"));
    }
    let (events, _) = recover(dir, identity, 0);
    let spooled = match events.last() {
        Some(e) => crate::wire::decode_event(e)?.counter(identity),
        None => 0,
    };
    if spooled < own {
        return Err(format!(
            "a token at {identity}:{own} left with the spool at {spooled}"
        ));
    }
    Ok(())
}

/// One tracer's spool: the file being appended to, what waits to be written, and the closed
/// files not yet known to be stored.
#[derive(Debug)]
pub struct SpoolWriter {
    dir: PathBuf,
    identity: String,
    gen: u64,
    path: PathBuf,
    file: File,
    bytes: u64,
    pending: Vec<u8>,
    /// Sequence number (this incarnation's count) of the last event in `pending`, or written.
    pending_last: u64,
    written_last: u64,
    /// Closed files and the sequence number of the last event each holds.
    closed: VecDeque<(PathBuf, u64)>,
}

impl SpoolWriter {
    /// Starts generation `gen` of `identity`'s spool in `dir` (created if missing).
    pub fn create(dir: &Path, identity: &str, gen: u64) -> std::io::Result<SpoolWriter> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(file_name(identity, gen));
        let (file, bytes) = Self::open_file(&path)?;
        Ok(SpoolWriter {
            dir: dir.to_path_buf(),
            identity: identity.to_string(),
            gen,
            path,
            file,
            bytes,
            pending: Vec::new(),
            pending_last: 0,
            written_last: 0,
            closed: VecDeque::new(),
        })
    }

    fn open_file(path: &Path) -> std::io::Result<(File, u64)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        let mut header = SPOOL_MAGIC.to_vec();
        header.extend_from_slice(&SPOOL_FORMAT.to_le_bytes());
        header.extend_from_slice(&rand::random::<u64>().to_le_bytes());
        file.write_all(&header)?;
        Ok((file, HEADER_BYTES as u64))
    }

    /// Adds encoded event number `seq` (own clock entry `own`) to what waits to be written.
    pub fn push(&mut self, seq: u64, own: u64, event: &[u8]) {
        encode_record(&mut self.pending, own, event);
        self.pending_last = seq;
    }

    /// Whether enough waits that it should be written now, token or not.
    pub fn pending_full(&self) -> bool {
        self.pending.len() >= SPOOL_PENDING_BYTES_MAX
    }

    /// The sequence number of the last event written to the file.
    pub fn written(&self) -> u64 {
        self.written_last
    }

    /// Writes what waits (one `write(2)` in the common case); starts a new file once this one
    /// is full.
    pub fn write_out(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending)?;
        self.bytes += self.pending.len() as u64;
        self.pending.clear();
        self.written_last = self.pending_last;
        if self.bytes >= SPOOL_FILE_BYTES_MAX {
            self.gen += 1;
            let path = self.dir.join(file_name(&self.identity, self.gen));
            let (file, bytes) = Self::open_file(&path)?;
            let old = std::mem::replace(&mut self.path, path);
            self.closed.push_back((old, self.written_last));
            self.file = file;
            self.bytes = bytes;
        }
        Ok(())
    }

    /// The tracing server has stored every event up to `shipped`: closed files wholly below it
    /// go.
    pub fn remove_stored(&mut self, shipped: u64) {
        while let Some((path, last)) = self.closed.front() {
            if *last > shipped {
                break;
            }
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!("cannot remove trace spool {}: {e}", path.display());
            }
            self.closed.pop_front();
        }
    }

    /// At a clean stop with everything stored: the current file goes too.
    pub fn remove_all(&mut self) {
        self.remove_stored(u64::MAX);
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!("cannot remove trace spool {}: {e}", self.path.display());
        }
    }

    /// Removes the files of earlier incarnations (after their events were shipped again).
    pub fn remove_older(&self) {
        let Ok(files) = list(&self.dir, Some(&self.identity)) else {
            return;
        };
        for (_, gen, path) in files {
            if gen < self.gen {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvraft_proto::TraceEvent;
    use prost::Message;

    /// A record's event as the generated message (what the hand-made encoding must match).
    fn decode(bytes: &[u8]) -> Result<TraceEvent, String> {
        TraceEvent::decode(bytes).map_err(|e| format!("unreadable event: {e}"))
    }

    fn event(own: u64) -> TraceEvent {
        TraceEvent {
            trace_id: own * 10,
            tag: format!("Tag{own}"),
            body: "{}".into(),
            clock: [("server1".to_string(), own)].into_iter().collect(),
        }
    }

    /// The hand-made encoding decodes to the same event as prost's.
    #[test]
    fn an_event_encoded_from_the_clock_decodes_as_prost_encodes_it() {
        let clock: std::collections::BTreeMap<String, u64> = [
            ("client1".to_string(), 300),
            ("coord".to_string(), 0),
            ("server2".to_string(), u64::MAX),
        ]
        .into_iter()
        .collect();
        for (trace_id, tag, body) in [(7, "PutRecvd", r#"{"Key":"k"}"#), (0, "", "")] {
            let mut out = Vec::new();
            encode_event(&mut out, trace_id, tag, body, &clock);
            let want = TraceEvent {
                trace_id,
                tag: tag.into(),
                body: body.into(),
                clock: clock.clone().into_iter().collect(),
            };
            assert_eq!(decode(&out).unwrap(), want);
        }
    }

    /// A writer of generation `gen` that spooled (and wrote out) the events `owns`.
    fn spooled(
        dir: &Path,
        identity: &str,
        gen: u64,
        owns: std::ops::RangeInclusive<u64>,
    ) -> SpoolWriter {
        let mut w = SpoolWriter::create(dir, identity, gen).unwrap();
        for own in owns {
            w.push(own, own, &event(own).encode_to_vec());
        }
        w.write_out().unwrap();
        w
    }

    #[test]
    fn names_round_trip_and_other_files_are_ignored() {
        assert_eq!(
            parse_name(&file_name("client7", 3)),
            Some(("client7".into(), 3))
        );
        assert_eq!(parse_name("client7.spool"), None);
        assert_eq!(parse_name("notes.txt"), None);
    }

    #[test]
    fn records_read_back_and_a_cut_tail_ends_the_readable_part() {
        let dir = tempfile::tempdir().unwrap();
        let w = spooled(dir.path(), "server1", 1, 1..=5);
        assert_eq!(w.written(), 5);
        let bytes = std::fs::read(dir.path().join(file_name("server1", 1))).unwrap();
        let all = read_records(&bytes, true).unwrap();
        assert_eq!(all.records.len(), 5);
        assert_eq!(all.end, bytes.len());
        assert_eq!(decode(all.records[2].1).unwrap(), event(3));
        // Reading on from where the last read ended finds nothing new.
        assert!(read_records(&bytes[all.end..], false)
            .unwrap()
            .records
            .is_empty());
        // Every cut (a process killed mid-write) gives a prefix, never garbage.
        for cut in 0..bytes.len() {
            let part = read_records(&bytes[..cut], true).unwrap();
            assert!(part.records.len() <= 5);
            for (i, (own, body)) in part.records.iter().enumerate() {
                assert_eq!(*own, i as u64 + 1);
                assert_eq!(decode(body).unwrap(), event(*own));
            }
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(read_records(&flipped, true).unwrap().records.len(), 4);
        let mut other = bytes.clone();
        other[8] = 9;
        assert!(read_records(&other, true).unwrap_err().contains("format 9"));
        assert!(read_records(b"SOMETHINGELSE", true)
            .unwrap_err()
            .contains("magic"));
    }

    #[test]
    fn recovery_returns_what_the_server_lacks_across_generations() {
        let dir = tempfile::tempdir().unwrap();
        spooled(dir.path(), "server1", 4, 1..=3);
        spooled(dir.path(), "server1", 5, 4..=6);
        SpoolWriter::create(dir.path(), "server2", 9)
            .unwrap()
            .write_out()
            .unwrap();
        let (events, gen) = recover(dir.path(), "server1", 2);
        assert_eq!(gen, 5);
        let decoded: Vec<_> = events.iter().map(|e| decode(e).unwrap()).collect();
        assert_eq!(decoded, (3..=6).map(event).collect::<Vec<_>>());
        let w3 = SpoolWriter::create(dir.path(), "server1", gen + 1).unwrap();
        w3.remove_older();
        let left = list(dir.path(), None).unwrap();
        let gens: Vec<_> = left.iter().map(|(id, g, _)| (id.as_str(), *g)).collect();
        assert_eq!(gens, [("server1", 6), ("server2", 9)]);
    }

    #[test]
    fn full_files_are_closed_and_removed_once_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path(), "client1", 1).unwrap();
        let big = TraceEvent {
            body: "x".repeat(64 * 1024),
            ..event(1)
        };
        let mut seq = 0;
        while w.closed.len() < 2 {
            seq += 1;
            w.push(seq, seq, &big.encode_to_vec());
            w.write_out().unwrap();
        }
        assert_eq!(list(dir.path(), None).unwrap().len(), 3);
        let first_last = w.closed[0].1;
        w.remove_stored(first_last - 1);
        assert_eq!(list(dir.path(), None).unwrap().len(), 3);
        w.remove_stored(first_last);
        assert_eq!(list(dir.path(), None).unwrap().len(), 2);
        w.remove_all();
        assert!(list(dir.path(), None).unwrap().is_empty());
    }
}
