//! Snapshot transfer between engines: a [`SnapshotSource`] reads an engine's whole content out
//! of one consistent view as chunks, a [`SnapshotSink`] (on another server) checks and stores
//! them, and [`Engine::install`](super::Engine::install) then makes them the engine's content.
//! The replication core carries the chunks, with its own checksum and sequence numbers.
//!
//! The chunk format is the same for every engine (a redb source feeds a memory sink and the
//! other way round), numbered [`SNAPSHOT_FORMAT`]:
//!
//! ```text
//!   chunk  = record*                      whole records only
//!   record = tag u8 | key_len u32 LE | key | val_len u32 LE | val
//!   tag 1  session: key = session id u64 LE (8 bytes), val = the encoded session as stored
//!   tag 2  kv:      key = the key bytes,  val = the stored value (`encode_value`, >= 24 bytes)
//! ```
//!
//! Sessions come first in id order, then the keys in byte order, each once. A sink refuses a
//! record out of that order too, so a chunk delivered twice or out of turn is an error rather
//! than silently stored.
//!
//! Format 2: session records may hold transaction results and held transactions (format 1
//! held put results only).

use std::any::Any;

use kvraft_common::limits;

use super::{Applied, EngineError};

/// The chunk format above; the core sends it along with the snapshot's meta.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// The position a snapshot stands for: the last applied entry's index, term and log time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub time_ms: u64,
}

impl From<Applied> for SnapshotMeta {
    fn from(a: Applied) -> Self {
        SnapshotMeta {
            index: a.index,
            term: a.term,
            time_ms: a.time_ms,
        }
    }
}

impl From<SnapshotMeta> for Applied {
    fn from(m: SnapshotMeta) -> Self {
        Applied {
            index: m.index,
            term: m.term,
            time_ms: m.time_ms,
        }
    }
}

/// A consistent read view of an engine's latest write, read out as chunks.
pub trait SnapshotSource: Send {
    fn meta(&self) -> SnapshotMeta;
    /// The next chunk: whole records, about `max_bytes` (at least one record even if it is
    /// larger), or `None` once everything was returned.
    fn next_chunk(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>, EngineError>;
}

/// Receives the chunks of one snapshot, in order.
pub trait SnapshotSink: Send {
    fn meta(&self) -> SnapshotMeta;
    /// Checks and stores one chunk. A chunk that is not well-formed is an error naming what is
    /// wrong (record number, tag, lengths); never a panic, whatever the bytes. A refused chunk
    /// stores nothing and leaves the sink as it was.
    fn write_chunk(&mut self, data: &[u8]) -> Result<(), EngineError>;
    /// The sink as `Any`, for the engine that began it to take its own type back in
    /// [`Engine::install`](super::Engine::install).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

pub(crate) const TAG_SESSION: u8 = 1;
pub(crate) const TAG_KV: u8 = 2;
/// Longest encoded session a sink accepts.
pub(crate) const SESSION_BYTES_MAX: usize = 1024 * 1024;
/// Longest stored kv value a sink accepts: the longest value any config allows and its 24-byte
/// header.
pub(crate) const KV_VALUE_BYTES_MAX: usize = limits::VALUE_BYTES_CEILING + 24;
/// Tag and the two lengths.
const RECORD_OVERHEAD: usize = 9;

/// How far a source has read, or a sink has stored: the last record of each kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// Still in the sessions; the last one returned, if any.
    Sessions(Option<u64>),
    /// In the keys (every session done); the last one returned, if any.
    Kv(Option<Vec<u8>>),
    /// Everything returned.
    Done,
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::Sessions(None)
    }
}

/// Builds one chunk of whole records, up to `max_bytes` (or one record, however large).
pub(crate) struct ChunkBuilder {
    buf: Vec<u8>,
    max_bytes: usize,
}

impl ChunkBuilder {
    pub(crate) fn new(max_bytes: usize) -> Self {
        ChunkBuilder {
            buf: Vec::new(),
            max_bytes,
        }
    }

    /// Whether a record with these lengths goes in this chunk: it fits, or the chunk is empty.
    pub(crate) fn fits(&self, key_len: usize, val_len: usize) -> bool {
        self.buf.is_empty()
            || self.buf.len() + RECORD_OVERHEAD + key_len + val_len <= self.max_bytes
    }

    pub(crate) fn push(&mut self, tag: u8, key: &[u8], val: &[u8]) {
        self.buf.push(tag);
        self.buf.extend_from_slice(&len32(key.len()).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(&len32(val.len()).to_le_bytes());
        self.buf.extend_from_slice(val);
    }

    /// Adds a session record and moves `cursor` past it; false (nothing added) when the
    /// chunk is full.
    pub(crate) fn add_session(&mut self, cursor: &mut Cursor, id: u64, session: &[u8]) -> bool {
        if !self.fits(8, session.len()) {
            return false;
        }
        self.push(TAG_SESSION, &id.to_le_bytes(), session);
        *cursor = Cursor::Sessions(Some(id));
        true
    }

    /// Adds a key's record (`stored`: the value in its stored encoding) and moves `cursor`
    /// past it; false (nothing added) when the chunk is full.
    pub(crate) fn add_kv(&mut self, cursor: &mut Cursor, key: &[u8], stored: &[u8]) -> bool {
        if !self.fits(key.len(), stored.len()) {
            return false;
        }
        self.push(TAG_KV, key, stored);
        *cursor = Cursor::Kv(Some(key.to_vec()));
        true
    }

    /// The chunk, or `None` if no record went in.
    pub(crate) fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

/// A length as the format's u32. Stored keys, values and sessions are far below 4 GiB.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("invariant: a stored record is shorter than 4 GiB")
}

/// One record of a chunk, borrowed from it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    Session { id: u64, session: &'a [u8] },
    Kv { key: &'a [u8], value: &'a [u8] },
}

/// Checks one chunk that follows what `after` says was stored: well-formed records within the
/// limits, in order. Returns its records and where the sink stands after them.
pub(crate) fn decode_chunk<'a>(
    data: &'a [u8],
    after: &Cursor,
) -> Result<(Vec<Record<'a>>, Cursor), EngineError> {
    let (mut last_session, mut in_kv, mut last_key): (Option<u64>, bool, Option<&[u8]>) =
        match after {
            Cursor::Sessions(id) => (*id, false, None),
            Cursor::Kv(key) => (None, true, key.as_deref()),
            Cursor::Done => return Err(EngineError("snapshot chunk after the end".into())),
        };
    let mut records = Vec::new();
    let mut pos = 0;
    let mut n = 0usize;
    while pos < data.len() {
        n += 1;
        let bad = |what: String| {
            EngineError(format!(
                "snapshot chunk of {} bytes: record {n} at byte {pos}: {what}",
                data.len()
            ))
        };
        let rest = &data[pos..];
        let tag = rest[0];
        let (key_max, kind) = match tag {
            TAG_SESSION => (8, "session"),
            TAG_KV => (limits::KEY_BYTES_MAX, "kv"),
            other => return Err(bad(format!("unknown tag {other}"))),
        };
        let key_len = read_len(rest, 1).ok_or_else(|| {
            bad(format!(
                "tag {tag} ({kind}): truncated key length, {} bytes left",
                rest.len() - 1
            ))
        })?;
        if tag == TAG_SESSION && key_len != 8 {
            return Err(bad(format!(
                "tag {tag} (session): key of {key_len} bytes, a session id is 8"
            )));
        }
        if key_len > key_max {
            return Err(bad(format!(
                "tag {tag} ({kind}): key of {key_len} bytes, longer than the limit of {key_max}"
            )));
        }
        let key_end = 5 + key_len;
        if key_end > rest.len() {
            return Err(bad(format!(
                "tag {tag} ({kind}): key of {key_len} bytes runs past the chunk's end, {} bytes left",
                rest.len() - 5
            )));
        }
        let key = &rest[5..key_end];
        let val_len = read_len(rest, key_end).ok_or_else(|| {
            bad(format!(
                "tag {tag} ({kind}): key of {key_len} bytes, then a truncated value length, {} bytes left",
                rest.len() - key_end
            ))
        })?;
        let (val_min, val_max) = match tag {
            TAG_SESSION => (0, SESSION_BYTES_MAX),
            _ => (24, KV_VALUE_BYTES_MAX),
        };
        if val_len < val_min || val_len > val_max {
            return Err(bad(format!(
                "tag {tag} ({kind}): value of {val_len} bytes, outside {val_min}..={val_max}"
            )));
        }
        let val_start = key_end + 4;
        if val_len > rest.len() - val_start {
            return Err(bad(format!(
                "tag {tag} ({kind}): value of {val_len} bytes runs past the chunk's end, {} bytes left",
                rest.len() - val_start
            )));
        }
        let value = &rest[val_start..val_start + val_len];
        if tag == TAG_SESSION {
            let id = u64::from_le_bytes(key.try_into().expect("8 bytes, checked above"));
            if in_kv {
                return Err(bad(format!(
                    "session {id} after kv records (sessions come first)"
                )));
            }
            if let Some(prev) = last_session.filter(|&prev| id <= prev) {
                return Err(bad(format!(
                    "session {id} not after the previous session {prev} (ids come in order, each once)"
                )));
            }
            last_session = Some(id);
            records.push(Record::Session { id, session: value });
        } else {
            if last_key.is_some_and(|prev| key <= prev) {
                return Err(bad(format!(
                    "kv key of {key_len} bytes not after the previous key (keys come in order, each once)"
                )));
            }
            in_kv = true;
            last_key = Some(key);
            records.push(Record::Kv { key, value });
        }
        pos += val_start + val_len;
    }
    let cursor = if in_kv {
        Cursor::Kv(last_key.map(<[u8]>::to_vec))
    } else {
        Cursor::Sessions(last_session)
    };
    Ok((records, cursor))
}

/// The u32 LE length at `at`, if the bytes are there.
fn read_len(bytes: &[u8], at: usize) -> Option<usize> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(raw)).ok()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use prost::bytes::Bytes;

    use super::*;
    use crate::engine::{encode_value, Engine, MemEngine, RedbEngine, Versioned, WriteBatch};

    /// Chunks of at most this size, except one holding a single larger record.
    const SMALL_CHUNK: usize = 4096;

    fn value(len: usize, seed: u64) -> Versioned {
        Versioned {
            value: Bytes::from(
                (0..len)
                    .map(|i| (i as u64 * 31 + seed) as u8)
                    .collect::<Vec<_>>(),
            ),
            version: seed % 5 + 1,
            create_revision: seed + 1,
            mod_revision: seed + 7,
        }
    }

    fn key(i: usize) -> Bytes {
        Bytes::from(format!("key-{i:05}"))
    }

    const KEYS: usize = 400;
    const BIG_KEY: &[u8] = b"key-big";

    /// Several hundred keys of various sizes, one of the largest value allowed, sessions (one
    /// written then removed, one rewritten), and an applied position, over a few writes.
    fn fill(engine: &mut dyn Engine, seed: u64) {
        let applied = |index| Applied {
            index,
            term: 3 + seed,
            time_ms: 1_700_000 + index,
        };
        let mut puts: Vec<(Bytes, Versioned)> = (0..KEYS)
            .map(|i| (key(i), value((i * 37) % 900, i as u64 + seed)))
            .collect();
        puts.push((
            Bytes::from_static(BIG_KEY),
            value(limits::VALUE_BYTES_MAX, seed),
        ));
        puts.push((Bytes::new(), value(0, seed)));
        let sessions = (1..=6)
            .map(|id| {
                (
                    id * 1000 + seed,
                    Some(vec![id as u8; 10 + id as usize * 50]),
                )
            })
            .collect();
        engine
            .write(WriteBatch {
                puts,
                deletes: vec![],
                sessions,
                applied: applied(10),
            })
            .unwrap();
        engine
            .write(WriteBatch {
                puts: vec![(key(3), value(5, 99 + seed))],
                deletes: vec![Bytes::from_static(b"never-written")],
                sessions: vec![(2000 + seed, None), (3000 + seed, Some(vec![42; 7]))],
                applied: applied(11),
            })
            .unwrap();
    }

    /// All chunks of a fresh snapshot of `engine`, checked to be of the requested size.
    fn chunks(engine: &dyn Engine, max_bytes: usize) -> (SnapshotMeta, Vec<Vec<u8>>) {
        let mut source = engine.snapshot().unwrap();
        let meta = source.meta();
        let mut out = Vec::new();
        while let Some(chunk) = source.next_chunk(max_bytes).unwrap() {
            check_size(&chunk, max_bytes);
            out.push(chunk);
        }
        assert_eq!(source.next_chunk(max_bytes).unwrap(), None, "stays done");
        (meta, out)
    }

    fn check_size(chunk: &[u8], max_bytes: usize) {
        let records = decode_chunk(chunk, &Cursor::default()).unwrap().0.len();
        assert!(records > 0, "no empty chunk");
        assert!(
            chunk.len() <= max_bytes || records == 1,
            "a chunk of {} bytes and {records} records, above {max_bytes}",
            chunk.len()
        );
    }

    /// The whole content as one byte string, engine-neutral.
    fn dump(engine: &dyn Engine) -> Vec<u8> {
        chunks(engine, usize::MAX).1.concat()
    }

    /// Sends `from`'s content to `to` in small chunks; their sizes.
    fn transfer(from: &dyn Engine, to: &mut dyn Engine) -> Vec<usize> {
        let (meta, chunks) = chunks(from, SMALL_CHUNK);
        let mut sink = to.begin_install(meta).unwrap();
        assert_eq!(sink.meta(), meta);
        for chunk in &chunks {
            sink.write_chunk(chunk).unwrap();
        }
        to.install(sink).unwrap();
        chunks.iter().map(Vec::len).collect()
    }

    /// `a` and `b` hold the same keys, sessions and applied position.
    fn assert_same(a: &dyn Engine, b: &dyn Engine) {
        assert_eq!(dump(a), dump(b));
        let (ra, rb) = (a.recovered().unwrap(), b.recovered().unwrap());
        assert_eq!(ra.sessions, rb.sessions);
        assert_eq!(
            (ra.applied_index, ra.applied_term, ra.applied_time_ms),
            (rb.applied_index, rb.applied_term, rb.applied_time_ms)
        );
        assert_eq!(a.key_count().unwrap(), b.key_count().unwrap());
        for k in (0..KEYS)
            .map(key)
            .chain([Bytes::from_static(BIG_KEY), Bytes::new()])
        {
            assert_eq!(a.get(&k).unwrap(), b.get(&k).unwrap());
            assert!(a.get(&k).unwrap().is_some());
        }
        assert_eq!(b.get(b"absent").unwrap(), None);
    }

    /// A kind of engine under test, reopened as after a crash (memory) or a restart (redb).
    trait Disk {
        fn open(&self) -> Box<dyn Engine>;
        /// Drops `engine` and opens the same disk again; memory keeps only what was synced.
        fn reopen(&self, engine: Box<dyn Engine>) -> Box<dyn Engine>;
    }

    struct Mem(MemEngine);

    impl Disk for Mem {
        fn open(&self) -> Box<dyn Engine> {
            Box::new(self.0.clone())
        }
        fn reopen(&self, engine: Box<dyn Engine>) -> Box<dyn Engine> {
            drop(engine);
            self.0.crash();
            self.open()
        }
    }

    struct Redb(tempfile::TempDir);

    impl Redb {
        fn new() -> Self {
            Redb(tempfile::tempdir().unwrap())
        }
        fn path(&self) -> PathBuf {
            self.0.path().join("state.redb")
        }
    }

    impl Disk for Redb {
        fn open(&self) -> Box<dyn Engine> {
            Box::new(RedbEngine::open(&self.path()).unwrap())
        }
        fn reopen(&self, engine: Box<dyn Engine>) -> Box<dyn Engine> {
            drop(engine);
            self.open()
        }
    }

    fn round_trip(from: &dyn Disk, to: &dyn Disk) {
        let mut src = from.open();
        fill(&mut *src, 0);
        let mut dst = to.open();
        // The receiver's old content, all of which the snapshot replaces.
        fill(&mut *dst, 5);
        dst.write(WriteBatch {
            puts: vec![(Bytes::from_static(b"only-on-dst"), value(3, 1))],
            ..WriteBatch::default()
        })
        .unwrap();
        dst.syncer().sync().unwrap();

        let sizes = transfer(&*src, &mut *dst);
        assert!(sizes.len() > 20, "{} chunks", sizes.len());
        assert!(
            sizes.iter().any(|&n| n > limits::VALUE_BYTES_MAX),
            "the largest value goes alone in a chunk above the requested size"
        );
        assert_same(&*src, &*dst);
        assert_eq!(dst.get(b"only-on-dst").unwrap(), None);
        let rec = dst.recovered().unwrap();
        assert!(rec.from_snapshot);
        assert_eq!(
            (rec.applied_index, rec.applied_term, rec.applied_time_ms),
            (11, 3, 1_700_011)
        );

        // Durable at once, with the flag.
        let mut dst = to.reopen(dst);
        assert_same(&*src, &*dst);
        assert!(dst.recovered().unwrap().from_snapshot);

        // The first write clears the flag, and it stays cleared.
        let applied = Applied {
            index: 12,
            term: 3,
            time_ms: 1_700_012,
        };
        dst.write(WriteBatch {
            puts: vec![(key(1), value(9, 1234))],
            applied,
            ..WriteBatch::default()
        })
        .unwrap();
        assert!(!dst.recovered().unwrap().from_snapshot);
        dst.syncer().sync().unwrap();
        let dst = to.reopen(dst);
        let rec = dst.recovered().unwrap();
        assert!(!rec.from_snapshot);
        assert_eq!(rec.applied_index, 12);
        assert_eq!(dst.get(&key(1)).unwrap(), Some(value(9, 1234)));
        assert_eq!(dst.get(&key(2)).unwrap(), src.get(&key(2)).unwrap());
    }

    #[test]
    fn snapshot_redb_to_redb() {
        round_trip(&Redb::new(), &Redb::new());
    }

    #[test]
    fn snapshot_redb_to_mem() {
        round_trip(&Redb::new(), &Mem(MemEngine::new()));
    }

    #[test]
    fn snapshot_mem_to_redb() {
        round_trip(&Mem(MemEngine::new()), &Redb::new());
    }

    #[test]
    fn snapshot_mem_to_mem() {
        round_trip(&Mem(MemEngine::new()), &Mem(MemEngine::new()));
    }

    /// An install reaches what the syncer syncs: a write after it, synced by a syncer fetched
    /// again, survives a crash (memory) or a restart (redb); the syncer fetched before the
    /// install does not fail, and a snapshot taken before it still reads the old content.
    #[test]
    fn the_syncer_fetched_after_an_install_syncs_the_new_content() {
        for to in [
            &Redb::new() as &dyn Disk,
            &Mem(MemEngine::new()) as &dyn Disk,
        ] {
            let mut src = MemEngine::new();
            fill(&mut src, 0);
            let mut dst = to.open();
            fill(&mut *dst, 3);
            let old = dump(&*dst);
            let mut old_source = dst.snapshot().unwrap();
            let first = old_source.next_chunk(SMALL_CHUNK).unwrap().unwrap();
            let old_syncer = dst.syncer();
            transfer(&src, &mut *dst);
            let mut rest = first;
            while let Some(chunk) = old_source.next_chunk(SMALL_CHUNK).unwrap() {
                rest.extend_from_slice(&chunk);
            }
            assert_eq!(rest, old);
            dst.write(WriteBatch {
                puts: vec![(Bytes::from_static(b"after"), value(4, 4))],
                applied: Applied {
                    index: 12,
                    ..Applied::default()
                },
                ..WriteBatch::default()
            })
            .unwrap();
            old_syncer.sync().unwrap();
            dst.syncer().sync().unwrap();
            let dst = to.reopen(dst);
            assert_eq!(dst.get(b"after").unwrap(), Some(value(4, 4)));
            assert_eq!(dst.recovered().unwrap().applied_index, 12);
            assert_eq!(dst.get(&key(7)).unwrap(), src.get(&key(7)).unwrap());
        }
    }

    /// Writes after `snapshot()` (while its chunks are being read) do not show in them, and are
    /// not blocked by it.
    fn consistent_view(disk: &dyn Disk) {
        let mut engine = disk.open();
        fill(&mut *engine, 0);
        let before = dump(&*engine);
        let meta_before = SnapshotMeta::from(Applied {
            index: 11,
            term: 3,
            time_ms: 1_700_011,
        });
        let mut source = engine.snapshot().unwrap();
        assert_eq!(source.meta(), meta_before);
        let mut read = source.next_chunk(SMALL_CHUNK).unwrap().unwrap();
        let change = |engine: &mut dyn Engine, i: usize| {
            engine
                .write(WriteBatch {
                    puts: vec![
                        (key(i), value(11, 777)),
                        (Bytes::from(format!("new-{i}")), value(2, 1)),
                        (Bytes::from(format!("a-{i}")), value(2, 1)),
                    ],
                    deletes: vec![],
                    sessions: vec![(1000, None), (9999 + i as u64, Some(vec![1]))],
                    applied: Applied {
                        index: 20 + i as u64,
                        term: 4,
                        time_ms: 5,
                    },
                })
                .unwrap();
            engine.syncer().sync().unwrap();
        };
        change(&mut *engine, 0);
        let mut i = 1;
        while let Some(chunk) = source.next_chunk(SMALL_CHUNK).unwrap() {
            check_size(&chunk, SMALL_CHUNK);
            read.extend_from_slice(&chunk);
            change(&mut *engine, i % KEYS);
            i += 1;
        }
        assert_eq!(read, before);
        assert!(i > 20, "{i} chunks, a write after each");
        assert_eq!(source.meta(), meta_before);
        drop(source);
        assert_eq!(engine.recovered().unwrap().applied_term, 4);
        assert_ne!(dump(&*engine), before);
    }

    #[test]
    fn a_snapshot_is_a_consistent_view_redb() {
        consistent_view(&Redb::new());
    }

    #[test]
    fn a_snapshot_is_a_consistent_view_mem() {
        consistent_view(&Mem(MemEngine::new()));
    }

    fn snapshot_file(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".snapshot");
        PathBuf::from(p)
    }

    /// An install interrupted before its rename (the commit point) leaves a `.snapshot` file:
    /// the next open removes it and keeps the old content, whatever the file holds.
    #[test]
    fn redb_open_removes_an_interrupted_install_and_keeps_the_old_content() {
        let disk = Redb::new();
        let mut engine = disk.open();
        fill(&mut *engine, 0);
        let old = dump(&*engine);
        drop(engine);
        let leftover = snapshot_file(&disk.path());

        // A garbage file.
        std::fs::write(&leftover, b"not a redb file").unwrap();
        let engine = disk.open();
        assert!(!leftover.exists());
        assert_eq!(dump(&*engine), old);
        drop(engine);

        // A whole received snapshot, durable but not yet renamed: other content, meta written.
        let mut other = MemEngine::new();
        fill(&mut other, 9);
        {
            let staging = Redb::new();
            let mut e = staging.open();
            transfer(&other, &mut *e);
            drop(e);
            std::fs::copy(staging.path(), &leftover).unwrap();
        }
        let engine = disk.open();
        assert!(!leftover.exists());
        assert_eq!(dump(&*engine), old);
        assert!(!engine.recovered().unwrap().from_snapshot);

        // A sink begun and fed but never installed; the engine then dropped.
        let (meta, chunks) = chunks(&other, SMALL_CHUNK);
        let mut sink = engine.begin_install(meta).unwrap();
        for chunk in &chunks[..chunks.len() / 2] {
            sink.write_chunk(chunk).unwrap();
        }
        assert!(leftover.exists());
        drop(engine);
        drop(sink);
        assert!(!leftover.exists(), "an abandoned sink removes its file");
        let engine = disk.open();
        assert_eq!(dump(&*engine), old);
    }

    /// A new `begin_install` discards the earlier one: its sink can no longer be installed, and
    /// dropping it leaves the new one's file alone.
    #[test]
    fn begin_install_discards_the_earlier_sink() {
        for to in [
            &Redb::new() as &dyn Disk,
            &Mem(MemEngine::new()) as &dyn Disk,
        ] {
            let mut src = MemEngine::new();
            fill(&mut src, 0);
            let (meta, chunks) = chunks(&src, SMALL_CHUNK);
            let mut dst = to.open();
            let mut first = dst.begin_install(meta).unwrap();
            first.write_chunk(&chunks[0]).unwrap();
            let mut second = dst.begin_install(meta).unwrap();
            for chunk in &chunks {
                second.write_chunk(chunk).unwrap();
            }
            let err = dst.install(first).unwrap_err();
            assert!(err.0.contains("superseded"), "{err}");
            dst.install(second).unwrap();
            assert_same(&src, &*dst);
        }
    }

    struct Alien;

    impl SnapshotSink for Alien {
        fn meta(&self) -> SnapshotMeta {
            SnapshotMeta::default()
        }
        fn write_chunk(&mut self, _: &[u8]) -> Result<(), EngineError> {
            Ok(())
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
            self
        }
    }

    #[test]
    fn a_sink_of_another_engine_is_refused() {
        let disk = Redb::new();
        let mut redb = disk.open();
        fill(&mut *redb, 0);
        let mut mem = MemEngine::new();
        fill(&mut mem, 1);
        let (redb_before, mem_before) = (dump(&*redb), dump(&mem));
        let meta = SnapshotMeta::default();

        let e = redb.install(mem.begin_install(meta).unwrap()).unwrap_err();
        assert!(e.0.contains("not one of a redb engine"), "{e}");
        let e = mem.install(redb.begin_install(meta).unwrap()).unwrap_err();
        assert!(e.0.contains("not one of a memory engine"), "{e}");
        assert!(redb.install(Box::new(Alien)).is_err());
        assert!(mem.install(Box::new(Alien)).is_err());
        // Same type, another engine.
        let other_disk = Redb::new();
        let other = other_disk.open();
        let e = redb
            .install(other.begin_install(meta).unwrap())
            .unwrap_err();
        assert!(e.0.contains("another engine"), "{e}");
        let e = mem
            .install(MemEngine::new().begin_install(meta).unwrap())
            .unwrap_err();
        assert!(e.0.contains("another engine"), "{e}");

        assert_eq!(dump(&*redb), redb_before);
        assert_eq!(dump(&mem), mem_before);
        // Still usable.
        let redb = disk.reopen(redb);
        assert_eq!(dump(&*redb), redb_before);
    }

    /// A small valid chunk: two sessions and three keys.
    fn sample_chunk() -> (Vec<u8>, Vec<usize>) {
        let mut b = ChunkBuilder::new(usize::MAX);
        let mut ends = Vec::new();
        let mut push = |b: &mut ChunkBuilder, tag, key: &[u8], val: &[u8]| {
            b.push(tag, key, val);
            ends.push(b.buf.len());
        };
        push(&mut b, TAG_SESSION, &7u64.to_le_bytes(), b"sess-7");
        push(&mut b, TAG_SESSION, &9u64.to_le_bytes(), b"");
        push(&mut b, TAG_KV, b"", &encode_value(&value(0, 1)));
        push(&mut b, TAG_KV, b"a", &encode_value(&value(3, 2)));
        push(&mut b, TAG_KV, b"b", &encode_value(&value(1, 3)));
        (b.finish().unwrap(), ends)
    }

    fn record(tag: u8, key: &[u8], key_len: u32, val: &[u8], val_len: u32) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&val_len.to_le_bytes());
        out.extend_from_slice(val);
        out
    }

    /// Chunks that are not well-formed, each with a word its error must contain.
    fn malformed() -> Vec<(Vec<u8>, &'static str)> {
        let kv_val = encode_value(&value(4, 1));
        let session = |id: u64| record(TAG_SESSION, &id.to_le_bytes(), 8, b"s", 1);
        let kv = |k: &[u8]| record(TAG_KV, k, k.len() as u32, &kv_val, kv_val.len() as u32);
        let big_key = vec![b'k'; limits::KEY_BYTES_MAX + 1];
        vec![
            (vec![0], "unknown tag 0"),
            (vec![3, 0, 0, 0, 0, 0, 0, 0, 0], "unknown tag 3"),
            (vec![255; 40], "unknown tag 255"),
            ([kv(b"a"), vec![7]].concat(), "record 2"),
            (record(TAG_SESSION, &[1; 7], 7, b"s", 1), "8"),
            (record(TAG_SESSION, &[1; 9], 9, b"s", 1), "8"),
            (record(TAG_SESSION, &[1; 8], u32::MAX, b"s", 1), "8"),
            (record(TAG_KV, b"k", 1, &kv_val[..23], 23), "23 bytes"),
            (record(TAG_KV, b"k", 1, &[], 0), "0 bytes"),
            (record(TAG_KV, b"k", u32::MAX, &kv_val, 28), "limit"),
            (
                record(TAG_KV, &big_key, big_key.len() as u32, &kv_val, 28),
                "limit",
            ),
            (
                record(TAG_KV, b"k", 1000, &kv_val, 28),
                "past the chunk's end",
            ),
            (record(TAG_KV, b"k", 1, &kv_val, u32::MAX), "outside"),
            (
                record(TAG_KV, b"k", 1, &kv_val, (KV_VALUE_BYTES_MAX + 1) as u32),
                "outside",
            ),
            (record(TAG_KV, b"k", 1, &kv_val, 29), "past the chunk's end"),
            (
                record(
                    TAG_SESSION,
                    &[1; 8],
                    8,
                    b"s",
                    (SESSION_BYTES_MAX + 1) as u32,
                ),
                "outside",
            ),
            ([kv(b"a"), session(1)].concat(), "sessions come first"),
            ([session(2), session(2)].concat(), "each once"),
            ([session(2), session(1)].concat(), "in order"),
            ([kv(b"b"), kv(b"a")].concat(), "in order"),
            ([kv(b"a"), kv(b"a")].concat(), "each once"),
        ]
    }

    fn sinks(redb: &Redb) -> Vec<(Box<dyn Engine>, Box<dyn SnapshotSink>)> {
        let meta = SnapshotMeta::default();
        let mem: Box<dyn Engine> = Box::new(MemEngine::new());
        let redb = redb.open();
        let (mem_sink, redb_sink) = (
            mem.begin_install(meta).unwrap(),
            redb.begin_install(meta).unwrap(),
        );
        vec![(mem, mem_sink), (redb, redb_sink)]
    }

    #[test]
    fn a_malformed_chunk_is_an_error_not_a_panic() {
        let (chunk, ends) = sample_chunk();
        let disk = Redb::new();
        for (mut engine, mut sink) in sinks(&disk) {
            for cut in 1..chunk.len() {
                let r = sink.write_chunk(&chunk[..cut]);
                if ends.contains(&cut) {
                    // Whole records: fine, but then the same records again are out of order.
                    r.unwrap();
                    let again = sink.write_chunk(&chunk).unwrap_err();
                    assert!(again.0.contains("record 1 at byte 0"), "{again}");
                    sink = engine.begin_install(SnapshotMeta::default()).unwrap();
                } else {
                    let e = r.unwrap_err();
                    assert!(e.0.contains("record"), "cut at {cut}: {e}");
                }
            }
            for (bad, word) in malformed() {
                let e = sink.write_chunk(&bad).unwrap_err();
                assert!(e.0.contains(word), "{bad:?}: {e} (wanted {word:?})");
            }
            // None of the refused chunks stored anything: the whole chunk still goes in, and
            // makes exactly its records the content.
            sink.write_chunk(&chunk).unwrap();
            assert!(
                sink.write_chunk(&[]).is_ok(),
                "an empty chunk has no records"
            );
            engine.install(sink).unwrap();
            assert_eq!(dump(&*engine), chunk);
            let rec = engine.recovered().unwrap();
            assert_eq!(rec.sessions, vec![(7, b"sess-7".to_vec()), (9, vec![])]);
            assert_eq!(engine.key_count().unwrap(), 3);
            assert_eq!(engine.get(b"a").unwrap(), Some(value(3, 2)));
        }
    }

    /// Random bytes and random damage to a valid chunk: never a panic.
    #[test]
    fn random_chunks_do_not_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (chunk, _) = sample_chunk();
        let disk = Redb::new();
        for (_engine, mut sink) in sinks(&disk) {
            for round in 0..300 {
                let data: Vec<u8> = if round % 2 == 0 {
                    let len = (next() % 64) as usize;
                    (0..len).map(|_| (next() % 4) as u8).collect()
                } else {
                    let mut c = chunk.clone();
                    for _ in 0..=next() % 3 {
                        let at = (next() as usize) % c.len();
                        c[at] = next() as u8;
                    }
                    c
                };
                let _ = sink.write_chunk(&data);
            }
        }
    }
}
