//! The on-disk [`Engine`]: one redb file, `<data_dir>/state.redb` (choice and figures in
//! `docs/storage.md`).
//!
//! ```text
//!   table kv        key bytes -> version u64 | create_revision u64 | mod_revision u64 | value
//!   table sessions  session id -> encoded session (see state_machine.rs)
//!   table meta      "format" -> 1, "applied_index" -> u64, "applied_term" -> u64
//! ```
//!
//! Each [`WriteBatch`] is one write transaction committed with `Durability::None`: atomic and
//! visible at once, durable at the next sync ([`Engine::syncer`]), an empty transaction committed with
//! `Durability::Immediate` and quick repair (so a reopen after a crash does not walk the whole
//! file). A clean close makes every commit durable. A file of another format is refused with
//! an error naming it, never misread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::{
    decode_header, decode_value, encode_value, Engine, EngineError, EngineSyncer, Recovered,
    Versioned, WriteBatch,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout above. A file with another number is refused.
pub const STATE_FORMAT: u64 = 1;
/// Memory redb may use to cache pages of the file (its bound on the engine's memory).
pub const ENGINE_CACHE_BYTES: usize = 64 * 1024 * 1024;

pub struct RedbEngine {
    db: Arc<Database>,
    path: PathBuf,
    /// A read view of the latest commit, opened on the first read after a write.
    reader: Mutex<Option<ReadOnlyTable<&'static [u8], &'static [u8]>>>,
}

impl RedbEngine {
    /// Opens (or creates) the engine file at `path`.
    pub fn open(path: &Path) -> Result<RedbEngine, EngineError> {
        let db = Database::builder()
            .set_cache_size(ENGINE_CACHE_BYTES)
            .create(path)
            .map_err(|e| fail(path, "cannot open", &e))?;
        let engine = RedbEngine {
            db: Arc::new(db),
            path: path.to_path_buf(),
            reader: Mutex::new(None),
        };
        let txn = engine
            .db
            .begin_write()
            .map_err(|e| engine.err("begin", &e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| engine.err("meta", &e))?;
            let format = meta
                .get("format")
                .map_err(|e| engine.err("meta", &e))?
                .map(|g| g.value());
            match format {
                Some(STATE_FORMAT) => {}
                Some(other) => {
                    return Err(engine.err(
                        "unsupported format",
                        &format!("found {other}, this server reads {STATE_FORMAT}"),
                    ))
                }
                None => {
                    meta.insert("format", STATE_FORMAT)
                        .map_err(|e| engine.err("meta", &e))?;
                }
            }
            txn.open_table(KV).map_err(|e| engine.err("kv", &e))?;
            txn.open_table(SESSIONS)
                .map_err(|e| engine.err("sessions", &e))?;
        }
        txn.commit().map_err(|e| engine.err("commit", &e))?;
        Ok(engine)
    }

    fn err(&self, what: &str, e: &dyn std::fmt::Display) -> EngineError {
        fail(&self.path, what, e)
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut guard = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            let txn = self
                .db
                .begin_read()
                .map_err(|e| self.err("begin read", &e))?;
            *guard = Some(txn.open_table(KV).map_err(|e| self.err("kv", &e))?);
        }
        f(guard.as_ref().expect("just opened"))
    }
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

    fn write(&mut self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err("begin", &e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.err("durability", &e))?;
        {
            let mut kv = txn.open_table(KV).map_err(|e| self.err("kv", &e))?;
            for (k, v) in &batch.puts {
                kv.insert(&k[..], &encode_value(v)[..])
                    .map_err(|e| self.err("write", &e))?;
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
            meta.insert("applied_index", batch.applied.0)
                .map_err(|e| self.err("meta", &e))?;
            meta.insert("applied_term", batch.applied.1)
                .map_err(|e| self.err("meta", &e))?;
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
            .db
            .begin_read()
            .map_err(|e| self.err("begin read", &e))?;
        let meta = txn.open_table(META).map_err(|e| self.err("meta", &e))?;
        let word = |k: &str| -> Result<u64, EngineError> {
            Ok(meta
                .get(k)
                .map_err(|e| self.err("meta", &e))?
                .map_or(0, |g| g.value()))
        };
        let (applied_index, applied_term) = (word("applied_index")?, word("applied_term")?);
        let table = txn
            .open_table(SESSIONS)
            .map_err(|e| self.err("sessions", &e))?;
        let mut sessions = Vec::new();
        for row in table.iter().map_err(|e| self.err("sessions", &e))? {
            let (k, v) = row.map_err(|e| self.err("sessions", &e))?;
            sessions.push((k.value(), v.value().to_vec()));
        }
        Ok(Recovered {
            applied_index,
            applied_term,
            sessions,
        })
    }
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

struct RedbSyncer {
    db: Arc<Database>,
    path: PathBuf,
}

impl EngineSyncer for RedbSyncer {
    fn sync(&self) -> Result<(), EngineError> {
        durable_commit(&self.db, &self.path)
    }
}
