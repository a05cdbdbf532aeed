//! Where the state machine keeps its data: an ordered key-value engine that also holds the
//! session table and the position of the last applied log entry, all changed together.
//!
//! ```text
//!   StateMachine ──WriteBatch (puts, sessions, applied index+term+time)──▶ Engine::write  (atomic)
//!                                                       Engine::sync ──▶ durable (every earlier write)
//!   restart ──▶ Engine::recovered: applied index+term+time and sessions of the last durable write
//!   snapshot transfer (snapshot.rs):
//!     Engine::snapshot ──▶ SnapshotSource ──chunks──▶ SnapshotSink ◀── Engine::begin_install
//!                                                        └──▶ Engine::install (whole content, atomic)
//! ```
//!
//! Rules every engine keeps:
//! - a [`WriteBatch`] is applied whole or not at all: after a crash the engine holds exactly
//!   the state after some write, with the applied position of that same write;
//! - `write` need not be durable; `sync` makes every earlier write durable. The replicated log
//!   is the durable record of what `sync` has not covered: a restarted server replays it from
//!   the recovered applied index + 1 (the state machine applies only entries that are durable in
//!   the local log, so the log always holds them);
//! - reads (`get`) see every write so far, durable or not;
//! - `install` replaces the whole content by a received snapshot, durably and atomically: after
//!   a crash the engine holds its old content or the whole snapshot, never a mix.
//!
//! Two engines: [`RedbEngine`] on disk (the server), [`MemEngine`] in memory with the same
//! crash behaviour (tests and the deterministic simulation).

mod mem;
mod redb_engine;
mod snapshot;

use prost::bytes::Bytes;

pub use mem::MemEngine;
pub use redb_engine::RedbEngine;
pub use snapshot::{SnapshotMeta, SnapshotSink, SnapshotSource, SNAPSHOT_FORMAT};

/// One key's value and the counters kept with it. Revisions are log indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    /// Number of puts applied to this key; a duplicate apply would show up here.
    pub version: u64,
    /// Index of the entry that created the key (its version 1).
    pub create_revision: u64,
    /// Index of the entry that last changed the key.
    pub mod_revision: u64,
}

/// An atomic change of the engine: puts, session records written or removed, and the log
/// position this state corresponds to.
#[derive(Debug, Default)]
pub struct WriteBatch {
    pub puts: Vec<(Bytes, Versioned)>,
    /// Keys removed (none of them is also in `puts`).
    pub deletes: Vec<Bytes>,
    /// `(session id, Some(encoded session))` writes, `None` removes.
    pub sessions: Vec<(u64, Option<Vec<u8>>)>,
    /// The last entry applied.
    pub applied: Applied,
}

/// The position of the last applied log entry: its index, term and log time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub term: u64,
    pub time_ms: u64,
}

/// What an engine holds when it is opened: the last durable write's view.
#[derive(Debug, Default)]
pub struct Recovered {
    pub applied_index: u64,
    pub applied_term: u64,
    /// Log time of the last applied entry.
    pub applied_time_ms: u64,
    /// The content came from [`Engine::install`] and no `write` followed it: the applied
    /// position may then be ahead of the local log (which the snapshot replaces).
    pub from_snapshot: bool,
    /// Encoded sessions, by id.
    pub sessions: Vec<(u64, Vec<u8>)>,
}

/// An engine failure; the message names the file and the operation. The server stops on any
/// of them (a restart resumes from the last durable write and the log).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// Makes every write an engine has finished durable; callable from another thread while the
/// engine's owner goes on reading (a write of the owner waits for it).
pub trait EngineSyncer: Send + Sync {
    fn sync(&self) -> Result<(), EngineError>;
}

pub trait Engine: Send {
    /// The key's current value, seeing every write so far.
    fn get(&self, key: &[u8]) -> Result<Option<Versioned>, EngineError>;
    /// The key's `(version, create_revision)`, without reading its value out (applying a put
    /// needs only these).
    fn counters(&self, key: &[u8]) -> Result<Option<(u64, u64)>, EngineError>;
    /// Number of keys.
    fn key_count(&self) -> Result<u64, EngineError>;
    /// At most `limit` keys from `start` (included or not) up to `end` (excluded; empty: no
    /// upper bound), in key order, with their values, seeing every write so far.
    fn range(
        &self,
        start: std::ops::Bound<&[u8]>,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Versioned)>, EngineError>;
    /// Applies `batch` atomically; not necessarily durable.
    fn write(&mut self, batch: WriteBatch) -> Result<(), EngineError>;
    /// The applied position and the sessions, as of the latest write.
    fn recovered(&self) -> Result<Recovered, EngineError>;
    /// A handle that makes every earlier write durable, on any thread. An [`Engine::install`]
    /// replaces what it syncs: fetch it again after one.
    fn syncer(&self) -> std::sync::Arc<dyn EngineSyncer>;
    /// A consistent view of the state as of the latest write (durable or not), read out as
    /// chunks; later writes do not show in it.
    fn snapshot(&self) -> Result<Box<dyn SnapshotSource>, EngineError>;
    /// Starts receiving a snapshot standing for `meta`; an earlier unfinished one is discarded
    /// (its sink can no longer be installed).
    fn begin_install(&self, meta: SnapshotMeta) -> Result<Box<dyn SnapshotSink>, EngineError>;
    /// Makes the snapshot received by `sink` (one of this engine's latest `begin_install`)
    /// durable and then the engine's whole content, atomically, with the sink's meta as the
    /// applied position and `from_snapshot` set. Reads then see it; fetch the syncer again.
    fn install(&mut self, sink: Box<dyn SnapshotSink>) -> Result<(), EngineError>;
}

/// The upper bound of a range that ends before `end`, or has none when `end` is empty.
pub fn end_bound(end: &[u8]) -> std::ops::Bound<&[u8]> {
    if end.is_empty() {
        std::ops::Bound::Unbounded
    } else {
        std::ops::Bound::Excluded(end)
    }
}

/// Format of a stored value: `version u64 | create_revision u64 | mod_revision u64 | value`,
/// little-endian. Versioned by the engine's format number, not per value.
pub(crate) fn encode_value(v: &Versioned) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + v.value.len());
    out.extend_from_slice(&v.version.to_le_bytes());
    out.extend_from_slice(&v.create_revision.to_le_bytes());
    out.extend_from_slice(&v.mod_revision.to_le_bytes());
    out.extend_from_slice(&v.value);
    out
}

pub(crate) fn decode_value(bytes: &[u8]) -> Result<Versioned, EngineError> {
    let [version, create_revision, mod_revision] = decode_header(bytes)?;
    Ok(Versioned {
        version,
        create_revision,
        mod_revision,
        value: Bytes::copy_from_slice(&bytes[24..]),
    })
}

/// The three counters at the head of a stored value.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<[u64; 3], EngineError> {
    if bytes.len() < 24 {
        return Err(EngineError(format!(
            "stored value of {} bytes is shorter than its 24-byte header",
            bytes.len()
        )));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok([word(0), word(1), word(2)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same behaviour from both engines: reads see unsynced writes, a batch is atomic, a
    /// reopen holds the last synced write (`synced_only`, after a crash) or the last write (a
    /// clean close makes it durable).
    fn exercise(
        mut engine: Box<dyn Engine>,
        reopen: impl Fn() -> Box<dyn Engine>,
        synced_only: bool,
    ) {
        let v = |s: &str, n: u64| Versioned {
            value: Bytes::copy_from_slice(s.as_bytes()),
            version: n,
            create_revision: 1,
            mod_revision: n,
        };
        assert_eq!(engine.recovered().unwrap().applied_index, 0);
        engine
            .write(WriteBatch {
                puts: vec![
                    (Bytes::from_static(b"a"), v("1", 1)),
                    (Bytes::from_static(b"c"), v("3", 1)),
                ],
                deletes: vec![],
                sessions: vec![(7, Some(vec![1, 2, 3]))],
                applied: Applied {
                    index: 1,
                    term: 1,
                    time_ms: 10,
                },
            })
            .unwrap();
        engine.syncer().sync().unwrap();
        engine
            .write(WriteBatch {
                puts: vec![(Bytes::from_static(b"a"), v("2", 2))],
                deletes: vec![Bytes::from_static(b"c")],
                sessions: vec![(7, None), (9, Some(vec![4]))],
                applied: Applied {
                    index: 2,
                    term: 1,
                    time_ms: 20,
                },
            })
            .unwrap();
        assert_eq!(
            engine.get(b"a").unwrap(),
            Some(v("2", 2)),
            "reads see unsynced writes"
        );
        let rec = engine.recovered().unwrap();
        assert_eq!((rec.applied_index, rec.applied_time_ms), (2, 20));
        assert!(!rec.from_snapshot);
        assert_eq!(engine.key_count().unwrap(), 1, "c is deleted");
        let all = engine.range(std::ops::Bound::Unbounded, b"", 10).unwrap();
        assert_eq!(all, vec![(Bytes::from_static(b"a"), v("2", 2))]);
        let after_a = engine
            .range(std::ops::Bound::Excluded(b"a"), b"", 10)
            .unwrap();
        assert!(after_a.is_empty());
        assert!(engine
            .range(std::ops::Bound::Included(b"a"), b"a", 10)
            .unwrap()
            .is_empty());
        assert_eq!(engine.counters(b"a").unwrap(), Some((2, 1)));
        assert_eq!(engine.counters(b"b").unwrap(), None);
        drop(engine);
        let engine = reopen();
        let rec = engine.recovered().unwrap();
        if synced_only {
            assert_eq!(
                (rec.applied_index, rec.applied_term, rec.applied_time_ms),
                (1, 1, 10)
            );
            assert_eq!(rec.sessions, vec![(7, vec![1, 2, 3])]);
            assert_eq!(engine.get(b"a").unwrap(), Some(v("1", 1)));
        } else {
            assert_eq!(
                (rec.applied_index, rec.applied_term, rec.applied_time_ms),
                (2, 1, 20)
            );
            assert_eq!(rec.sessions, vec![(9, vec![4])]);
            assert_eq!(engine.get(b"a").unwrap(), Some(v("2", 2)));
        }
        assert_eq!(engine.get(b"b").unwrap(), None);
        assert!(!rec.from_snapshot);
    }

    #[test]
    fn mem_engine_keeps_the_last_synced_write() {
        let engine = MemEngine::new();
        let handle = engine.clone();
        exercise(
            Box::new(engine),
            move || {
                handle.crash();
                Box::new(handle.clone())
            },
            true,
        );
    }

    #[test]
    fn redb_engine_keeps_the_last_synced_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let engine = RedbEngine::open(&path).unwrap();
        // Dropping the engine closes it cleanly, which makes the second batch durable too (a
        // crash between the two is covered by the end-to-end SIGKILL tests).
        exercise(
            Box::new(engine),
            || Box::new(RedbEngine::open(&path).unwrap()),
            false,
        );
    }

    #[test]
    fn a_short_stored_value_is_an_error_not_a_panic() {
        assert!(decode_value(&[0; 23]).is_err());
        assert!(decode_header(&[0; 23]).is_err());
        let v = Versioned {
            value: Bytes::from_static(b"xyz"),
            version: 3,
            create_revision: 2,
            mod_revision: 9,
        };
        assert_eq!(decode_value(&encode_value(&v)).unwrap(), v);
    }
}
