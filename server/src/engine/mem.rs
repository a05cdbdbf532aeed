//! An in-memory [`Engine`] with an engine's crash behaviour: writes change the "live" state at
//! once, a sync ([`Engine::syncer`]) copies it to the "durable" state, and [`MemEngine::crash`] drops
//! whatever was not synced. Clones share the state, so a test or the simulation keeps a handle
//! after moving one into a replica, and restarts a replica on the same "disk".
//!
//! A snapshot source is a copy of the live state taken by [`Engine::snapshot`]; a sink gathers
//! a state, which [`Engine::install`] makes both the live and the durable state at once (as the
//! redb engine's rename is durable at once).

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;

use super::snapshot::{decode_chunk, ChunkBuilder, Cursor, Record};
use super::{
    decode_value, encode_value, Applied, Engine, EngineError, EngineSyncer, Recovered,
    SnapshotMeta, SnapshotSink, SnapshotSource, Versioned, WriteBatch,
};

#[derive(Clone, Debug, Default)]
struct State {
    kv: BTreeMap<Bytes, Versioned>,
    sessions: BTreeMap<u64, Vec<u8>>,
    applied: Applied,
    /// Installed from a snapshot, no write since.
    from_snapshot: bool,
}

#[derive(Debug, Default)]
struct Shared {
    live: State,
    durable: State,
    /// Number of the latest `begin_install`: only its sink may be installed.
    install_generation: u64,
}

/// See the module doc.
#[derive(Clone, Debug, Default)]
pub struct MemEngine {
    shared: Arc<Mutex<Shared>>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A crash: everything written since the last sync is gone.
    pub fn crash(&self) {
        let mut s = lock(&self.shared);
        s.live = s.durable.clone();
    }

    /// The applied index a crash now would leave.
    pub fn durable_applied(&self) -> u64 {
        lock(&self.shared).durable.applied.index
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine for MemEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Versioned>, EngineError> {
        Ok(lock(&self.shared).live.kv.get(key).cloned())
    }

    fn counters(&self, key: &[u8]) -> Result<Option<(u64, u64)>, EngineError> {
        let s = lock(&self.shared);
        Ok(s.live.kv.get(key).map(|v| (v.version, v.create_revision)))
    }

    fn key_count(&self) -> Result<u64, EngineError> {
        Ok(lock(&self.shared).live.kv.len() as u64)
    }

    fn range(
        &self,
        start: std::ops::Bound<&[u8]>,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Versioned)>, EngineError> {
        let s = lock(&self.shared);
        let end = super::end_bound(end);
        Ok(s.live
            .kv
            .range::<[u8], _>((start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&mut self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut s = lock(&self.shared);
        for (k, v) in batch.puts {
            s.live.kv.insert(k, v);
        }
        for k in batch.deletes {
            s.live.kv.remove(&k);
        }
        for (id, session) in batch.sessions {
            match session {
                Some(bytes) => s.live.sessions.insert(id, bytes),
                None => s.live.sessions.remove(&id),
            };
        }
        s.live.applied = batch.applied;
        s.live.from_snapshot = false;
        Ok(())
    }

    fn syncer(&self) -> Arc<dyn EngineSyncer> {
        Arc::new(self.clone())
    }

    fn recovered(&self) -> Result<Recovered, EngineError> {
        let s = lock(&self.shared);
        Ok(Recovered {
            applied_index: s.live.applied.index,
            applied_term: s.live.applied.term,
            applied_time_ms: s.live.applied.time_ms,
            from_snapshot: s.live.from_snapshot,
            sessions: s
                .live
                .sessions
                .iter()
                .map(|(&k, v)| (k, v.clone()))
                .collect(),
        })
    }

    fn snapshot(&self) -> Result<Box<dyn SnapshotSource>, EngineError> {
        let state = lock(&self.shared).live.clone();
        Ok(Box::new(MemSource {
            state,
            cursor: Cursor::default(),
        }))
    }

    fn begin_install(&self, meta: SnapshotMeta) -> Result<Box<dyn SnapshotSink>, EngineError> {
        let mut s = lock(&self.shared);
        s.install_generation += 1;
        Ok(Box::new(MemSink {
            engine: self.shared.clone(),
            generation: s.install_generation,
            meta,
            state: State::default(),
            cursor: Cursor::default(),
        }))
    }

    fn install(&mut self, sink: Box<dyn SnapshotSink>) -> Result<(), EngineError> {
        let refuse = |why: &str| EngineError(format!("memory engine: install: {why}"));
        let sink = sink
            .into_any()
            .downcast::<MemSink>()
            .map_err(|_| refuse("the sink is not one of a memory engine"))?;
        if !Arc::ptr_eq(&sink.engine, &self.shared) {
            return Err(refuse("the sink was begun by another engine"));
        }
        let mut s = lock(&self.shared);
        if sink.generation != s.install_generation {
            return Err(refuse("the sink was superseded by a later begin_install"));
        }
        s.install_generation += 1;
        let mut state = sink.state;
        state.applied = sink.meta.into();
        state.from_snapshot = true;
        s.live = state.clone();
        s.durable = state;
        Ok(())
    }
}

/// A copy of the live state, read out as chunks.
struct MemSource {
    state: State,
    cursor: Cursor,
}

impl SnapshotSource for MemSource {
    fn meta(&self) -> SnapshotMeta {
        self.state.applied.into()
    }

    fn next_chunk(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>, EngineError> {
        let mut chunk = ChunkBuilder::new(max_bytes);
        if let Cursor::Sessions(after) = self.cursor {
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            for (&id, session) in self.state.sessions.range((lower, Bound::Unbounded)) {
                if !chunk.add_session(&mut self.cursor, id, session) {
                    return Ok(chunk.finish());
                }
            }
            self.cursor = Cursor::Kv(None);
        }
        if let Cursor::Kv(after) = &self.cursor {
            let after = after.clone();
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            for (key, v) in self.state.kv.range::<[u8], _>((lower, Bound::Unbounded)) {
                if !chunk.add_kv(&mut self.cursor, key, &encode_value(v)) {
                    return Ok(chunk.finish());
                }
            }
            self.cursor = Cursor::Done;
        }
        Ok(chunk.finish())
    }
}

/// Gathers a received snapshot's state.
struct MemSink {
    engine: Arc<Mutex<Shared>>,
    generation: u64,
    meta: SnapshotMeta,
    state: State,
    cursor: Cursor,
}

impl SnapshotSink for MemSink {
    fn meta(&self) -> SnapshotMeta {
        self.meta
    }

    fn write_chunk(&mut self, data: &[u8]) -> Result<(), EngineError> {
        let (records, cursor) = decode_chunk(data, &self.cursor)?;
        for record in records {
            match record {
                Record::Session { id, session } => {
                    self.state.sessions.insert(id, session.to_vec());
                }
                Record::Kv { key, value } => {
                    let v = decode_value(value)?;
                    self.state.kv.insert(Bytes::copy_from_slice(key), v);
                }
            }
        }
        self.cursor = cursor;
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl EngineSyncer for MemEngine {
    fn sync(&self) -> Result<(), EngineError> {
        let mut s = lock(&self.shared);
        s.durable = s.live.clone();
        Ok(())
    }
}
