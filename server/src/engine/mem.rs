//! An in-memory [`Engine`] with an engine's crash behaviour: writes change the "live" state at
//! once, a sync ([`Engine::syncer`]) copies it to the "durable" state, and [`MemEngine::crash`] drops
//! whatever was not synced. Clones share the state, so a test or the simulation keeps a handle
//! after moving one into a replica, and restarts a replica on the same "disk".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;

use super::{Engine, EngineError, EngineSyncer, Recovered, Versioned, WriteBatch};

#[derive(Clone, Debug, Default)]
struct State {
    kv: BTreeMap<Bytes, Versioned>,
    sessions: BTreeMap<u64, Vec<u8>>,
    applied: (u64, u64),
}

#[derive(Debug, Default)]
struct Shared {
    live: State,
    durable: State,
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
        lock(&self.shared).durable.applied.0
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

    fn write(&mut self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut s = lock(&self.shared);
        for (k, v) in batch.puts {
            s.live.kv.insert(k, v);
        }
        for (id, session) in batch.sessions {
            match session {
                Some(bytes) => s.live.sessions.insert(id, bytes),
                None => s.live.sessions.remove(&id),
            };
        }
        s.live.applied = batch.applied;
        Ok(())
    }

    fn syncer(&self) -> Arc<dyn EngineSyncer> {
        Arc::new(self.clone())
    }

    fn recovered(&self) -> Result<Recovered, EngineError> {
        let s = lock(&self.shared);
        Ok(Recovered {
            applied_index: s.live.applied.0,
            applied_term: s.live.applied.1,
            sessions: s
                .live
                .sessions
                .iter()
                .map(|(&k, v)| (k, v.clone()))
                .collect(),
        })
    }
}

impl EngineSyncer for MemEngine {
    fn sync(&self) -> Result<(), EngineError> {
        let mut s = lock(&self.shared);
        s.durable = s.live.clone();
        Ok(())
    }
}
