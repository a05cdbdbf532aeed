//! The on-disk [`Engine`]: one redb file, `<data_dir>/state.redb` (choice and figures in
//! `docs/storage.md`).
//!
//! ```text
//!   table kv        key bytes -> version u64 | create_revision u64 | mod_revision u64 | value
//!   table sessions  session id -> encoded session (see state_machine.rs)
//!   table meta      "format" -> 2, "applied_index" -> u64, "applied_term" -> u64,
//!                   "applied_time_ms" -> u64, "from_snapshot" -> 0 | 1
//! ```
//!
//! Each [`WriteBatch`] is one write transaction committed with `Durability::None`: atomic and
//! visible at once, durable at the next sync ([`Engine::syncer`]), an empty transaction committed with
//! `Durability::Immediate` and quick repair (so a reopen after a crash does not walk the whole
//! file). A clean close makes every commit durable. A file of another format is refused with
//! an error naming it, never misread.
//!
//! Snapshots: a source holds a read transaction (a consistent view that does not block
//! writes) and reads a range of a table per chunk. A sink writes the chunks into a second file,
//! `<state file>.snapshot`, and the install makes it durable, then renames it over the state
//! file: the rename is the commit point. An open removes a leftover `.snapshot` file (an
//! interrupted receive or install), so after a crash the engine holds its old content or the
//! whole snapshot.

use std::any::Any;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

use super::snapshot::{decode_chunk, ChunkBuilder, Cursor, Record};
use super::{
    decode_header, decode_value, encode_value, Engine, EngineError, EngineSyncer, Recovered,
    SnapshotMeta, SnapshotSink, SnapshotSource, Versioned, WriteBatch,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout above. A file with another number is refused.
pub const STATE_FORMAT: u64 = 2;
/// Memory redb may use to cache pages of the file (its bound on the engine's memory).
pub const ENGINE_CACHE_BYTES: usize = 64 * 1024 * 1024;

pub struct RedbEngine {
    /// The state file; `None` only after an install could not reopen it (every call then
    /// fails, and the server stops).
    db: Option<Arc<Database>>,
    path: PathBuf,
    /// A read view of the latest commit, opened on the first read after a write.
    reader: Mutex<Option<ReadOnlyTable<&'static [u8], &'static [u8]>>>,
    /// Number of the latest `begin_install`, shared with the sinks: only the sink of the latest
    /// may be installed, and only it removes the `.snapshot` file when dropped unfinished.
    install_generation: Arc<Mutex<u64>>,
}

impl RedbEngine {
    /// Opens (or creates) the engine file at `path`, removing a leftover `<path>.snapshot`
    /// (a receive or install interrupted before its rename).
    pub fn open(path: &Path) -> Result<RedbEngine, EngineError> {
        remove_if_exists(&snapshot_path(path)).map_err(|e| {
            fail(
                path,
                "cannot remove the interrupted snapshot",
                &format_args!("{}: {e}", snapshot_path(path).display()),
            )
        })?;
        let db = open_db(path)?;
        Ok(RedbEngine {
            db: Some(Arc::new(db)),
            path: path.to_path_buf(),
            reader: Mutex::new(None),
            install_generation: Arc::default(),
        })
    }

    fn err(&self, what: &str, e: &dyn std::fmt::Display) -> EngineError {
        fail(&self.path, what, e)
    }

    fn db(&self) -> Result<&Arc<Database>, EngineError> {
        self.db
            .as_ref()
            .ok_or_else(|| self.err("closed", &"an install could not reopen it"))
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut guard = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            let txn = self
                .db()?
                .begin_read()
                .map_err(|e| self.err("begin read", &e))?;
            *guard = Some(txn.open_table(KV).map_err(|e| self.err("kv", &e))?);
        }
        f(guard.as_ref().expect("just opened"))
    }
}

/// Opens or creates the state file at `path`, checks its format and creates the tables.
fn open_db(path: &Path) -> Result<Database, EngineError> {
    let err = |what: &str, e: &dyn std::fmt::Display| fail(path, what, e);
    let db = Database::builder()
        .set_cache_size(ENGINE_CACHE_BYTES)
        .create(path)
        .map_err(|e| err("cannot open", &e))?;
    let txn = db.begin_write().map_err(|e| err("begin", &e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| err("meta", &e))?;
        let format = meta
            .get("format")
            .map_err(|e| err("meta", &e))?
            .map(|g| g.value());
        match format {
            Some(STATE_FORMAT) => {}
            Some(other) => {
                return Err(err(
                    "unsupported format",
                    &format!("found {other}, this server reads {STATE_FORMAT}"),
                ))
            }
            None => {
                meta.insert("format", STATE_FORMAT)
                    .map_err(|e| err("meta", &e))?;
            }
        }
        txn.open_table(KV).map_err(|e| err("kv", &e))?;
        txn.open_table(SESSIONS).map_err(|e| err("sessions", &e))?;
    }
    txn.commit().map_err(|e| err("commit", &e))?;
    Ok(db)
}

/// The applied position and the `from_snapshot` flag of a read view.
fn read_meta(txn: &ReadTransaction, path: &Path) -> Result<(SnapshotMeta, bool), EngineError> {
    let meta = txn.open_table(META).map_err(|e| fail(path, "meta", &e))?;
    let word = |k: &str| -> Result<u64, EngineError> {
        Ok(meta
            .get(k)
            .map_err(|e| fail(path, "meta", &e))?
            .map_or(0, |g| g.value()))
    };
    let applied = SnapshotMeta {
        index: word("applied_index")?,
        term: word("applied_term")?,
        time_ms: word("applied_time_ms")?,
    };
    Ok((applied, word("from_snapshot")? != 0))
}

impl Engine for RedbEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Versioned>, EngineError> {
        self.with_reader(|table| {
            let found = table.get(key).map_err(|e| self.err("read", &e))?;
            match found {
                None => Ok(None),
                Some(g) => decode_value(g.value())
                    .map(Some)
                    .map_err(|e| self.err("bad value", &e)),
            }
        })
    }

    fn counters(&self, key: &[u8]) -> Result<Option<(u64, u64)>, EngineError> {
        self.with_reader(|table| {
            let found = table.get(key).map_err(|e| self.err("read", &e))?;
            match found {
                None => Ok(None),
                Some(g) => decode_header(g.value())
                    .map(|[version, create_revision, _]| Some((version, create_revision)))
                    .map_err(|e| self.err("bad value", &e)),
            }
        })
    }

    fn key_count(&self) -> Result<u64, EngineError> {
        self.with_reader(|table| table.len().map_err(|e| self.err("len", &e)))
    }

    fn range(
        &self,
        start: std::ops::Bound<&[u8]>,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Versioned)>, EngineError> {
        let end = super::end_bound(end);
        self.with_reader(|table| {
            let range = table
                .range::<&[u8]>((start, end))
                .map_err(|e| self.err("range", &e))?;
            let mut out = Vec::new();
            for item in range.take(limit) {
                let (k, v) = item.map_err(|e| self.err("range read", &e))?;
                let value = decode_value(v.value()).map_err(|e| self.err("bad value", &e))?;
                out.push((Bytes::copy_from_slice(k.value()), value));
            }
            Ok(out)
        })
    }

    fn write(&mut self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut txn = self
            .db()?
            .begin_write()
            .map_err(|e| self.err("begin", &e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.err("durability", &e))?;
        {
            let mut kv = txn.open_table(KV).map_err(|e| self.err("kv", &e))?;
            for (k, v) in &batch.puts {
                kv.insert(&k[..], &encode_value(v)[..])
                    .map_err(|e| self.err("write", &e))?;
            }
            for k in &batch.deletes {
                kv.remove(&k[..]).map_err(|e| self.err("delete", &e))?;
            }
            let mut sessions = txn
                .open_table(SESSIONS)
                .map_err(|e| self.err("sessions", &e))?;
            for (id, session) in &batch.sessions {
                match session {
                    Some(bytes) => sessions.insert(id, &bytes[..]).map(drop),
                    None => sessions.remove(id).map(drop),
                }
                .map_err(|e| self.err("write session", &e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err("meta", &e))?;
            for (k, v) in [
                ("applied_index", batch.applied.index),
                ("applied_term", batch.applied.term),
                ("applied_time_ms", batch.applied.time_ms),
                // Any write after an install ends its "content from a snapshot" state.
                ("from_snapshot", 0),
            ] {
                meta.insert(k, v).map_err(|e| self.err("meta", &e))?;
            }
        }
        txn.commit().map_err(|e| self.err("commit", &e))?;
        *self.reader.lock().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }

    fn syncer(&self) -> Arc<dyn EngineSyncer> {
        Arc::new(RedbSyncer {
            db: self.db.clone(),
            path: self.path.clone(),
        })
    }

    fn recovered(&self) -> Result<Recovered, EngineError> {
        let txn = self
            .db()?
            .begin_read()
            .map_err(|e| self.err("begin read", &e))?;
        let (applied, from_snapshot) = read_meta(&txn, &self.path)?;
        let table = txn
            .open_table(SESSIONS)
            .map_err(|e| self.err("sessions", &e))?;
        let mut sessions = Vec::new();
        for row in table.iter().map_err(|e| self.err("sessions", &e))? {
            let (k, v) = row.map_err(|e| self.err("sessions", &e))?;
            sessions.push((k.value(), v.value().to_vec()));
        }
        Ok(Recovered {
            applied_index: applied.index,
            applied_term: applied.term,
            applied_time_ms: applied.time_ms,
            from_snapshot,
            sessions,
        })
    }

    fn snapshot(&self) -> Result<Box<dyn SnapshotSource>, EngineError> {
        let db = self.db()?.clone();
        let txn = db
            .begin_read()
            .map_err(|e| self.err("begin snapshot read", &e))?;
        let (meta, _) = read_meta(&txn, &self.path)?;
        Ok(Box::new(RedbSource {
            txn,
            _db: db,
            path: self.path.clone(),
            meta,
            cursor: Cursor::default(),
        }))
    }

    fn begin_install(&self, meta: SnapshotMeta) -> Result<Box<dyn SnapshotSink>, EngineError> {
        let file = snapshot_path(&self.path);
        let mut generation = lock(&self.install_generation);
        // The earlier sink, if any, is no longer current: it can no longer be installed, and
        // leaves this one's file alone when dropped.
        *generation += 1;
        remove_if_exists(&file).map_err(|e| fail_snapshot(&file, "cannot remove", &e))?;
        let db = Database::builder()
            .set_cache_size(ENGINE_CACHE_BYTES)
            .create(&file)
            .map_err(|e| fail_snapshot(&file, "cannot create", &e))?;
        Ok(Box::new(RedbSink {
            db: Some(db),
            file,
            meta,
            cursor: Cursor::default(),
            generation: *generation,
            install_generation: self.install_generation.clone(),
        }))
    }

    fn install(&mut self, sink: Box<dyn SnapshotSink>) -> Result<(), EngineError> {
        let mut sink = sink
            .into_any()
            .downcast::<RedbSink>()
            .map_err(|_| self.err("install", &"the sink is not one of a redb engine"))?;
        if !Arc::ptr_eq(&sink.install_generation, &self.install_generation) {
            return Err(self.err("install", &"the sink was begun by another engine"));
        }
        let db = {
            let mut generation = lock(&self.install_generation);
            if *generation != sink.generation {
                return Err(self.err(
                    "install",
                    &"the sink was superseded by a later begin_install",
                ));
            }
            // No sink is current now: the file is this install's.
            *generation += 1;
            sink.db.take()
        };
        let db = db.ok_or_else(|| self.err("install", &"the sink's file is closed"))?;
        let file = sink.file.clone();
        if let Err(e) = finish_snapshot(db, &file, sink.meta) {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        // The rename is the commit point. The state file is closed around it; a syncer or a
        // snapshot source may still hold the old database, and goes on using the old,
        // unlinked file, harmlessly (callers fetch the syncer again).
        *self.reader.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.db = None;
        let committed = std::fs::rename(&file, &self.path)
            .map_err(|e| {
                self.err(
                    "install",
                    &format_args!("cannot rename {} over it: {e}", file.display()),
                )
            })
            .and_then(|()| {
                sync_dir(&self.path).map_err(|e| self.err("install: directory fsync", &e))
            });
        // The new content if the rename went through, else the old.
        match open_db(&self.path) {
            Ok(db) => {
                self.db = Some(Arc::new(db));
                committed
            }
            Err(e) => committed.and(Err(e)),
        }
    }
}

/// Makes a received snapshot's file whole and durable: the tables, the meta (format, applied
/// position, `from_snapshot`), an immediate commit, a close and an fsync.
fn finish_snapshot(db: Database, file: &Path, meta: SnapshotMeta) -> Result<(), EngineError> {
    let err = |what: &str, e: &dyn std::fmt::Display| fail_snapshot(file, what, e);
    let mut txn = db.begin_write().map_err(|e| err("begin", &e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err("durability", &e))?;
    {
        txn.open_table(KV).map_err(|e| err("kv", &e))?;
        txn.open_table(SESSIONS).map_err(|e| err("sessions", &e))?;
        let mut table = txn.open_table(META).map_err(|e| err("meta", &e))?;
        for (k, v) in [
            ("format", STATE_FORMAT),
            ("applied_index", meta.index),
            ("applied_term", meta.term),
            ("applied_time_ms", meta.time_ms),
            ("from_snapshot", 1),
        ] {
            table.insert(k, v).map_err(|e| err("meta", &e))?;
        }
    }
    txn.commit().map_err(|e| err("commit", &e))?;
    db.close().map_err(|e| err("close", &e))?;
    File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|e| err("fsync", &e))
}

/// `<path>.snapshot`: where a snapshot is received before it replaces the file at `path`.
fn snapshot_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".snapshot");
    PathBuf::from(name)
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename in the directory of `path` durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

fn lock(m: &Mutex<u64>) -> MutexGuard<'_, u64> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An empty transaction committed with `Durability::Immediate` (and quick repair): it makes
/// every earlier `Durability::None` commit durable.
fn durable_commit(db: &Database, path: &Path) -> Result<(), EngineError> {
    let err = |what: &str, e: &dyn std::fmt::Display| fail(path, what, e);
    let mut txn = db.begin_write().map_err(|e| err("begin", &e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err("durability", &e))?;
    txn.set_quick_repair(true);
    txn.commit().map_err(|e| err("durable commit", &e))
}

/// An engine error naming the state file and what failed.
fn fail(path: &Path, what: &str, e: &dyn std::fmt::Display) -> EngineError {
    EngineError(format!("state file {}: {what}: {e}", path.display()))
}

/// An engine error naming a snapshot file being received and what failed.
fn fail_snapshot(path: &Path, what: &str, e: &dyn std::fmt::Display) -> EngineError {
    EngineError(format!("snapshot file {}: {what}: {e}", path.display()))
}

struct RedbSyncer {
    /// `None` after an install could not reopen the state file.
    db: Option<Arc<Database>>,
    path: PathBuf,
}

impl EngineSyncer for RedbSyncer {
    fn sync(&self) -> Result<(), EngineError> {
        match &self.db {
            Some(db) => durable_commit(db, &self.path),
            None => Err(fail(
                &self.path,
                "closed",
                &"an install could not reopen it",
            )),
        }
    }
}

/// A read transaction of the state file, read out one table range per chunk.
struct RedbSource {
    // Declared before the database, so that it is dropped first: a read transaction of a
    // closed database can no longer read.
    txn: ReadTransaction,
    _db: Arc<Database>,
    path: PathBuf,
    meta: SnapshotMeta,
    cursor: Cursor,
}

impl SnapshotSource for RedbSource {
    fn meta(&self) -> SnapshotMeta {
        self.meta
    }

    fn next_chunk(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>, EngineError> {
        let err = |what: &str, e: &dyn std::fmt::Display| fail(&self.path, what, e);
        let mut chunk = ChunkBuilder::new(max_bytes);
        if let Cursor::Sessions(after) = self.cursor {
            let table = self
                .txn
                .open_table(SESSIONS)
                .map_err(|e| err("snapshot: sessions", &e))?;
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            let rows = table
                .range((lower, Bound::Unbounded))
                .map_err(|e| err("snapshot: sessions", &e))?;
            for row in rows {
                let (id, session) = row.map_err(|e| err("snapshot: sessions", &e))?;
                if !chunk.add_session(&mut self.cursor, id.value(), session.value()) {
                    return Ok(chunk.finish());
                }
            }
            self.cursor = Cursor::Kv(None);
        }
        if let Cursor::Kv(after) = &self.cursor {
            let after = after.clone();
            let table = self
                .txn
                .open_table(KV)
                .map_err(|e| err("snapshot: kv", &e))?;
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let rows = table
                .range::<&[u8]>((lower, Bound::Unbounded))
                .map_err(|e| err("snapshot: kv", &e))?;
            for row in rows {
                let (key, value) = row.map_err(|e| err("snapshot: kv", &e))?;
                if !chunk.add_kv(&mut self.cursor, key.value(), value.value()) {
                    return Ok(chunk.finish());
                }
            }
            self.cursor = Cursor::Done;
        }
        Ok(chunk.finish())
    }
}

/// Writes a received snapshot's chunks into `<state file>.snapshot`, one transaction each.
struct RedbSink {
    /// `None` once taken by the install.
    db: Option<Database>,
    file: PathBuf,
    meta: SnapshotMeta,
    cursor: Cursor,
    generation: u64,
    install_generation: Arc<Mutex<u64>>,
}

impl SnapshotSink for RedbSink {
    fn meta(&self) -> SnapshotMeta {
        self.meta
    }

    fn write_chunk(&mut self, data: &[u8]) -> Result<(), EngineError> {
        let (records, cursor) = decode_chunk(data, &self.cursor)?;
        let err = |what: &str, e: &dyn std::fmt::Display| fail_snapshot(&self.file, what, e);
        let db = self.db.as_ref().ok_or_else(|| err("write", &"closed"))?;
        let mut txn = db.begin_write().map_err(|e| err("begin", &e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| err("durability", &e))?;
        {
            let mut kv = txn.open_table(KV).map_err(|e| err("kv", &e))?;
            let mut sessions = txn.open_table(SESSIONS).map_err(|e| err("sessions", &e))?;
            for record in records {
                match record {
                    Record::Session { id, session } => sessions.insert(id, session).map(drop),
                    Record::Kv { key, value } => kv.insert(key, value).map(drop),
                }
                .map_err(|e| err("write", &e))?;
            }
        }
        txn.commit().map_err(|e| err("commit", &e))?;
        self.cursor = cursor;
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl Drop for RedbSink {
    /// An unfinished sink that is still the engine's latest removes its file.
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            let generation = lock(&self.install_generation);
            drop(db);
            if *generation == self.generation {
                let _ = std::fs::remove_file(&self.file);
            }
        }
    }
}
