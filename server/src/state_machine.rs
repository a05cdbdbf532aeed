//! The key-value state machine with exactly-once client sessions (DESIGN.md rule 7).
//!
//! ```text
//!   committed LogEntry --apply--> StateMachine --> Vec<Outcome>  (answers for waiting clients)
//! ```
//!
//! Everything here is replicated state: every replica applies the same entries in the same
//! order and reaches the same map, the same sessions and the same outcomes. Nothing reads a
//! clock; session expiry uses the leader's timestamp carried in each entry.
//!
//! Sessions. A session is opened by a `RegisterSession` entry; its id is that entry's index,
//! unique forever. Each put carries `(session_id, seq, ack_seq)`:
//! - puts of one session apply in `seq` order: a put above the next expected seq waits in
//!   `pending` until the seqs before it apply or are abandoned (at most the session window:
//!   see the last rule);
//! - `ack_seq` says the client is done with every seq below it: those results are dropped, and
//!   seqs below it that never arrived are skipped (a late copy is answered `Stale`, which says
//!   only that the server no longer knows: the seq may or may not have applied);
//! - a put whose seq already applied returns the recorded result and changes nothing;
//! - every put keeps `ack_seq <= seq < ack_seq + SESSION_WINDOW_MAX` (checked by the leader
//!   before it appends, and again here, so an entry breaking it changes nothing).
//!
//! Invariants: `next_seq` and `acked` of a session only grow; a `(session, seq)` changes the map
//! at most once; the result of every applied seq at or above `acked` is kept (never evicted),
//! so a retry of a request the client still waits for always gets its original answer; a
//! session holds at most [`SESSION_WINDOW_MAX`] results and pending puts; the session table
//! holds at most `sessions_max` sessions. No step is linear in a number a client chose: work per
//! entry is bounded by the session window and the sessions it expires.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::engine::{
    Applied, Engine, EngineError, MemEngine, SnapshotMeta, SnapshotSink, SnapshotSource, WriteBatch,
};

use kvraft_common::limits::{self, SESSION_WINDOW_MAX};
use kvraft_proto::log_entry::Payload;
use kvraft_proto::{LogEntry, PutCommand};
use prost::bytes::Bytes;

pub use crate::engine::Versioned;

/// Most keys and sessions changed and not yet written to the engine: past it the batch is
/// written at once (otherwise the runtime writes it with each durable commit), which bounds
/// the overlay's memory and the set of changed sessions.
pub const OVERLAY_KEYS_MAX: usize = 65_536;
/// Most key and value bytes in the overlay, for the same reason.
pub const OVERLAY_BYTES_MAX: usize = 32 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub version: u64,
    /// Index of the log entry whose application changed the map.
    pub index: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutError {
    SessionExpired,
    /// The seq is below the session's `ack_seq`: its result is gone, so whether it applied is
    /// unknown.
    Stale,
    /// The put breaks the session rules (`ack_seq <= seq < ack_seq + window`); nothing changed.
    Invalid,
}

/// What applying an entry resolved, for the leader to answer its waiting clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    SessionRegistered {
        index: u64,
    },
    Put {
        session_id: u64,
        seq: u64,
        result: Result<PutResult, PutError>,
        /// The request had applied before; this is the recorded result.
        duplicate: bool,
    },
}

#[derive(Clone, Debug)]
struct Session {
    next_seq: u64,
    /// The highest `ack_seq` applied: the client is done with every seq below it.
    acked: u64,
    last_active_ms: u64,
    /// Results of applied seqs in `[acked, next_seq)`, all of them (at most the window).
    results: BTreeMap<u64, PutResult>,
    /// seq -> (key, value, index of the entry that carried it)
    pending: BTreeMap<u64, (Bytes, Bytes, u64)>,
}

pub struct StateMachine {
    /// The keys and values, the sessions and the applied position as of the last batch
    /// written (see [`StateMachine::finish_batch`]).
    engine: Box<dyn Engine>,
    /// Keys changed by entries applied since the last batch was written.
    overlay: HashMap<Bytes, Versioned>,
    /// How many of them the engine does not hold yet.
    overlay_created: u64,
    /// Key and value bytes put into the overlay (replaced ones included: an upper bound).
    overlay_bytes: usize,
    /// Sessions changed or removed since the last batch was written.
    dirty: BTreeSet<u64>,
    /// The first engine failure; once set nothing more is applied (the server stops).
    failure: Option<String>,
    sessions: HashMap<u64, Session>,
    /// (last_active_ms, session_id), for expiry and eviction in time order.
    by_activity: BTreeSet<(u64, u64)>,
    session_ttl_ms: u64,
    sessions_max: usize,
    /// Most unacknowledged requests per session (see `limits::check_put_seq`).
    window: u64,
    last_applied: u64,
    /// Term of the entry at `last_applied`.
    applied_term: u64,
    /// Log time of the entry at `last_applied`.
    applied_time_ms: u64,
    /// `last_applied` when the last batch was written.
    written_applied: u64,
    /// See [`StateMachine::from_snapshot`].
    from_snapshot: bool,
    /// See [`StateMachine::set_write_keys_max`].
    write_keys_max: usize,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("last_applied", &self.last_applied)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl StateMachine {
    /// An empty state machine in memory (tests, the simulation's reference replay).
    pub fn new(session_ttl_ms: u64, sessions_max: usize) -> Self {
        Self::open(Box::new(MemEngine::new()), session_ttl_ms, sessions_max)
            .expect("invariant: an empty memory engine opens")
    }

    /// The state machine `engine` holds: its applied position and sessions.
    pub fn open(
        engine: Box<dyn Engine>,
        session_ttl_ms: u64,
        sessions_max: usize,
    ) -> Result<Self, EngineError> {
        assert!(sessions_max > 0, "invariant: sessions_max > 0");
        let recovered = engine.recovered()?;
        let mut sessions = HashMap::new();
        let mut by_activity = BTreeSet::new();
        for (id, bytes) in recovered.sessions {
            let session = decode_session(&bytes)
                .map_err(|e| EngineError(format!("session {id} in the state file: {e}")))?;
            by_activity.insert((session.last_active_ms, id));
            sessions.insert(id, session);
        }
        Ok(StateMachine {
            engine,
            overlay: HashMap::new(),
            overlay_created: 0,
            overlay_bytes: 0,
            dirty: BTreeSet::new(),
            failure: None,
            sessions,
            by_activity,
            session_ttl_ms,
            sessions_max,
            window: SESSION_WINDOW_MAX,
            last_applied: recovered.applied_index,
            applied_term: recovered.applied_term,
            applied_time_ms: recovered.applied_time_ms,
            from_snapshot: recovered.from_snapshot,
            write_keys_max: OVERLAY_KEYS_MAX,
            written_applied: recovered.applied_index,
        })
    }

    /// Term of the last applied entry (0 when nothing is applied).
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// Log time of the last applied entry.
    pub fn applied_time_ms(&self) -> u64 {
        self.applied_time_ms
    }

    /// The first engine failure, if any: the server must stop (nothing more applies).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Writes what was applied since the last batch as one atomic engine write: the changed
    /// keys, the changed sessions and the applied position together. Called before each durable
    /// commit (and when the overlay is full): one engine write covers many commits, and until
    /// then reads are served from the overlay.
    /// Returns how many keys and sessions it wrote.
    pub fn finish_batch(&mut self) -> usize {
        if self.failure.is_some() || self.written_applied == self.last_applied {
            return 0;
        }
        let written = self.overlay.len() + self.dirty.len();
        let sessions = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|id| (id, self.sessions.get(&id).map(encode_session)))
            .collect();
        let batch = WriteBatch {
            puts: std::mem::take(&mut self.overlay).into_iter().collect(),
            sessions,
            applied: Applied {
                index: self.last_applied,
                term: self.applied_term,
                time_ms: self.applied_time_ms,
            },
        };
        match self.engine.write(batch) {
            Ok(()) => {
                self.written_applied = self.last_applied;
                self.overlay_created = 0;
                self.overlay_bytes = 0;
            }
            Err(e) => self.failure = Some(e.to_string()),
        }
        written
    }

    /// Keys and sessions changed past which the overlay is written at once (not durably), at
    /// most [`OVERLAY_KEYS_MAX`]: the runtime lowers it when one engine write of that many
    /// would hold the core too long (each write's cost grows with the keys it changes).
    pub fn set_write_keys_max(&mut self, keys: usize) {
        self.write_keys_max = keys.clamp(1, OVERLAY_KEYS_MAX);
    }

    /// Writes the open batch and makes everything written durable; returns the applied index
    /// that is now durable.
    pub fn sync(&mut self) -> Result<u64, EngineError> {
        self.finish_batch();
        if let Some(f) = &self.failure {
            return Err(EngineError(f.clone()));
        }
        self.engine.syncer().sync()?;
        Ok(self.written_applied)
    }

    /// Records an engine failure (the first one stays): nothing more applies, the server stops.
    pub fn record_failure(&mut self, e: EngineError) {
        self.failure.get_or_insert(e.to_string());
    }

    /// A handle that makes the engine's writes durable on any thread (fetch it again after an
    /// install: the engine's content is then another file).
    pub fn syncer(&self) -> std::sync::Arc<dyn crate::engine::EngineSyncer> {
        self.engine.syncer()
    }

    /// Whether the engine's content was installed from a snapshot and nothing was written
    /// since: the local log may then end before it, or hold other entries there, and is reset
    /// after it on restart (the install's last step, redone).
    pub fn from_snapshot(&self) -> bool {
        self.from_snapshot
    }

    /// A consistent view of everything applied, to stream to a follower (what was applied
    /// since the last batch is written first). A failure is recorded.
    pub fn snapshot(&mut self) -> Result<Box<dyn SnapshotSource>, EngineError> {
        self.finish_batch();
        if let Some(f) = &self.failure {
            return Err(EngineError(f.clone()));
        }
        self.engine
            .snapshot()
            .inspect_err(|e| self.record_failure(EngineError(e.to_string())))
    }

    /// Starts receiving a snapshot of the leader's state machine. A failure is recorded.
    pub fn begin_install(
        &mut self,
        meta: SnapshotMeta,
    ) -> Result<Box<dyn SnapshotSink>, EngineError> {
        self.engine
            .begin_install(meta)
            .inspect_err(|e| self.record_failure(EngineError(e.to_string())))
    }

    /// Replaces the whole state (keys, sessions, applied position) by a received snapshot,
    /// durably and atomically. A failure is recorded.
    pub fn install(&mut self, sink: Box<dyn SnapshotSink>) -> Result<(), EngineError> {
        let (ttl, max, window) = (self.session_ttl_ms, self.sessions_max, self.window);
        let write_keys_max = self.write_keys_max;
        let result = self.engine.install(sink).and_then(|()| {
            let engine = std::mem::replace(&mut self.engine, Box::new(MemEngine::new()));
            Ok(StateMachine::open(engine, ttl, max)?.with_session_window(window))
        });
        match result {
            Ok(installed) => {
                *self = installed;
                self.write_keys_max = write_keys_max;
                Ok(())
            }
            Err(e) => {
                self.record_failure(EngineError(e.to_string()));
                Err(e)
            }
        }
    }

    /// A key's value for a read; an engine failure is recorded (see [`Self::failure`]) and
    /// reads as absent.
    pub fn read(&mut self, key: &[u8]) -> Option<Versioned> {
        match self.get(key) {
            Ok(v) => v,
            Err(e) => {
                self.failure.get_or_insert(e.to_string());
                None
            }
        }
    }

    /// A smaller session window than [`SESSION_WINDOW_MAX`] (the simulation's clients reach it).
    pub fn with_session_window(mut self, window: u64) -> Self {
        assert!(
            (1..=SESSION_WINDOW_MAX).contains(&window),
            "invariant: 1 <= window <= SESSION_WINDOW_MAX"
        );
        self.window = window;
        self
    }

    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// A key's current value, with what was applied since the last batch.
    pub fn get(&self, key: &[u8]) -> Result<Option<Versioned>, EngineError> {
        match self.overlay.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None => self.engine.get(key),
        }
    }

    /// Number of keys.
    pub fn key_count(&self) -> Result<u64, EngineError> {
        Ok(self.engine.key_count()? + self.overlay_created)
    }

    pub fn has_session(&self, session_id: u64) -> bool {
        self.sessions.contains_key(&session_id)
    }

    /// The recorded result of an applied `(session, seq)`, if still kept.
    pub fn cached_result(&self, session_id: u64, seq: u64) -> Option<PutResult> {
        self.sessions.get(&session_id)?.results.get(&seq).copied()
    }

    /// Applies the next committed entry. Entries must come in index order, each exactly once.
    pub fn apply(&mut self, entry: &LogEntry) -> Vec<Outcome> {
        assert_eq!(
            entry.index,
            self.last_applied + 1,
            "invariant: entries apply in index order without gaps"
        );
        let mut out = Vec::new();
        if self.failure.is_some() {
            return out;
        }
        self.last_applied = entry.index;
        self.applied_term = entry.term;
        self.applied_time_ms = entry.time_ms;
        self.expire_sessions(entry.time_ms, &mut out);
        match &entry.payload {
            None | Some(Payload::Noop(_)) => {}
            Some(Payload::RegisterSession(_)) => {
                self.register(entry.index, entry.time_ms, &mut out);
            }
            Some(Payload::Put(put)) => self.apply_put(put, entry.index, entry.time_ms, &mut out),
        }
        if self.overlay.len() + self.dirty.len() >= self.write_keys_max
            || self.overlay_bytes >= OVERLAY_BYTES_MAX
        {
            self.finish_batch();
        }
        out
    }

    fn register(&mut self, index: u64, now_ms: u64, out: &mut Vec<Outcome>) {
        while self.sessions.len() >= self.sessions_max {
            let &(at, oldest) = self
                .by_activity
                .iter()
                .next()
                .expect("invariant: by_activity mirrors sessions");
            self.remove_session(oldest, at, out);
        }
        let session = Session {
            next_seq: 1,
            acked: 1,
            last_active_ms: now_ms,
            results: BTreeMap::new(),
            pending: BTreeMap::new(),
        };
        self.sessions.insert(index, session);
        self.dirty.insert(index);
        self.by_activity.insert((now_ms, index));
        out.push(Outcome::SessionRegistered { index });
    }

    fn expire_sessions(&mut self, now_ms: u64, out: &mut Vec<Outcome>) {
        while let Some(&(at, id)) = self.by_activity.iter().next() {
            if at.saturating_add(self.session_ttl_ms) >= now_ms {
                break;
            }
            self.remove_session(id, at, out);
        }
    }

    /// Drops a session; puts still waiting in it are answered `SessionExpired`.
    fn remove_session(&mut self, id: u64, at: u64, out: &mut Vec<Outcome>) {
        self.by_activity.remove(&(at, id));
        self.dirty.insert(id);
        if let Some(session) = self.sessions.remove(&id) {
            for seq in session.pending.keys() {
                out.push(put_outcome(id, *seq, Err(PutError::SessionExpired), false));
            }
        }
    }

    fn touch(&mut self, id: u64, now_ms: u64) {
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        // Entry times come from successive leaders' clocks: never move activity backwards.
        let at = session.last_active_ms.max(now_ms);
        self.by_activity.remove(&(session.last_active_ms, id));
        session.last_active_ms = at;
        self.by_activity.insert((at, id));
    }

    fn apply_put(&mut self, put: &PutCommand, index: u64, now_ms: u64, out: &mut Vec<Outcome>) {
        let id = put.session_id;
        if !self.sessions.contains_key(&id) {
            out.push(put_outcome(
                id,
                put.seq,
                Err(PutError::SessionExpired),
                false,
            ));
            return;
        }
        if limits::check_put_seq(id, put.seq, put.ack_seq, self.window).is_err() {
            // The leader validates before appending; an entry that got here anyway (an older
            // or misbehaving leader) changes nothing, the same on every replica.
            out.push(put_outcome(id, put.seq, Err(PutError::Invalid), false));
            return;
        }
        // Everything below changes only this session.
        self.dirty.insert(id);
        self.touch(id, now_ms);
        self.advance_ack(id, put.ack_seq, out);
        let session = &self.sessions[&id];
        if put.seq < session.next_seq {
            // Below `acked` the result is gone; at or above it, it is always kept.
            let result = session
                .results
                .get(&put.seq)
                .copied()
                .ok_or(PutError::Stale);
            out.push(put_outcome(id, put.seq, result, result.is_ok()));
            return;
        }
        if put.seq > session.next_seq {
            self.hold(id, put, index);
            return;
        }
        // An earlier copy of this very request may be held (it waited for seqs this copy's
        // ack_seq gave up): it is the same request, applied once, now.
        self.sessions
            .get_mut(&id)
            .expect("invariant: caller checked")
            .pending
            .remove(&put.seq);
        self.apply_in_order(id, put.seq, put.key.clone(), put.value.clone(), index, out);
        self.drain_pending(id, out);
    }

    fn hold(&mut self, id: u64, put: &PutCommand, index: u64) {
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        if session.pending.contains_key(&put.seq) {
            return; // a retry appended twice: the first copy answers when it applies
        }
        // `apply_put` checked `seq < ack_seq + window` and `advance_ack` moved `next_seq` to at
        // least `ack_seq`: the window bounds what a session holds.
        debug_assert!(
            put.seq - session.next_seq < self.window,
            "invariant: held puts stay within the session window"
        );
        let held = (put.key.clone(), put.value.clone(), index);
        session.pending.insert(put.seq, held);
    }

    /// Everything below `ack_seq` is finished for the client: apply what is held, skip what
    /// never came, forget results. Bounded by the puts held, not by how far `ack_seq` moves.
    fn advance_ack(&mut self, id: u64, ack_seq: u64, out: &mut Vec<Outcome>) {
        loop {
            let session = self
                .sessions
                .get_mut(&id)
                .expect("invariant: caller checked");
            if session.next_seq >= ack_seq {
                break;
            }
            // Held puts below `ack_seq` apply in seq order; the seqs between them never came.
            let held = session.pending.first_key_value().map(|(&seq, _)| seq);
            match held {
                Some(seq) if seq < ack_seq => {
                    let (key, value, index) = session
                        .pending
                        .remove(&seq)
                        .expect("invariant: first key exists");
                    debug_assert!(
                        seq >= session.next_seq,
                        "invariant: held seqs are not behind"
                    );
                    if seq >= session.next_seq {
                        session.next_seq = seq;
                        self.apply_in_order(id, seq, key, value, index, out);
                    }
                }
                _ => session.next_seq = ack_seq,
            }
        }
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        if ack_seq > session.acked {
            session.acked = ack_seq;
            session.results = session.results.split_off(&ack_seq);
        }
        debug_assert!(session.results.len() as u64 <= self.window);
    }

    fn drain_pending(&mut self, id: u64, out: &mut Vec<Outcome>) {
        loop {
            let session = self
                .sessions
                .get_mut(&id)
                .expect("invariant: caller checked");
            let seq = session.next_seq;
            let Some((key, value, index)) = session.pending.remove(&seq) else {
                break;
            };
            self.apply_in_order(id, seq, key, value, index, out);
        }
    }

    fn apply_in_order(
        &mut self,
        id: u64,
        seq: u64,
        key: Bytes,
        value: Bytes,
        index: u64,
        out: &mut Vec<Outcome>,
    ) {
        // Only the counters of the previous value are needed, not the value itself.
        let previous = match self.overlay.get(&key) {
            Some(v) => Ok(Some((v.version, v.create_revision))),
            None => self.engine.counters(&key),
        };
        let previous = match previous {
            Ok(v) => v,
            Err(e) => {
                // Nothing more applies; the server stops before any reply of this batch.
                self.failure.get_or_insert(e.to_string());
                return;
            }
        };
        // Revisions follow the order in which the map changes: the index of the entry being
        // applied (a held put changes the map when a later entry releases it).
        let revision = self.last_applied;
        let version = previous.map_or(0, |(version, _)| version) + 1;
        if previous.is_none() {
            self.overlay_created += 1;
        }
        let create_revision = previous.map_or(revision, |(_, created)| created);
        let versioned = Versioned {
            value,
            version,
            create_revision,
            mod_revision: revision,
        };
        self.overlay_bytes += key.len() + versioned.value.len();
        self.overlay.insert(key, versioned);
        let result = PutResult { version, index };
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        assert_eq!(
            seq, session.next_seq,
            "invariant: a session applies in seq order"
        );
        session.next_seq += 1;
        session.results.insert(seq, result);
        out.push(put_outcome(id, seq, Ok(result), false));
    }
}

/// Format of a stored session (little-endian): `next_seq u64 | acked u64 | last_active_ms u64 |
/// results u32, each seq u64 version u64 index u64 | held u32, each seq u64 index u64 key_len
/// u32 key value_len u32 value`.
fn encode_session(s: &Session) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + s.results.len() * 24);
    for w in [s.next_seq, s.acked, s.last_active_ms] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&(s.results.len() as u32).to_le_bytes());
    for (seq, r) in &s.results {
        for w in [*seq, r.version, r.index] {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out.extend_from_slice(&(s.pending.len() as u32).to_le_bytes());
    for (seq, (key, value, index)) in &s.pending {
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        for b in [key, value] {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

fn decode_session(bytes: &[u8]) -> Result<Session, String> {
    let mut r = Reader { bytes, at: 0 };
    let (next_seq, acked, last_active_ms) = (r.u64()?, r.u64()?, r.u64()?);
    let mut results = BTreeMap::new();
    for _ in 0..r.u32()? {
        let (seq, version, index) = (r.u64()?, r.u64()?, r.u64()?);
        results.insert(seq, PutResult { version, index });
    }
    let mut pending = BTreeMap::new();
    for _ in 0..r.u32()? {
        let (seq, index) = (r.u64()?, r.u64()?);
        let key = r.bytes()?;
        let value = r.bytes()?;
        pending.insert(seq, (key, value, index));
    }
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the record", bytes.len() - r.at));
    }
    Ok(Session {
        next_seq,
        acked,
        last_active_ms,
        results,
        pending,
    })
}

/// Reads a stored session; every length is checked against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "truncated: {n} bytes wanted at offset {} of {}",
                self.at,
                self.bytes.len()
            )
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn bytes(&mut self) -> Result<Bytes, String> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

fn put_outcome(
    session_id: u64,
    seq: u64,
    result: Result<PutResult, PutError>,
    duplicate: bool,
) -> Outcome {
    Outcome::Put {
        session_id,
        seq,
        result,
        duplicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvraft_proto::RegisterSession;

    struct Log {
        sm: StateMachine,
        index: u64,
    }

    impl Log {
        fn new() -> Self {
            Log {
                sm: StateMachine::new(1_000, 3),
                index: 0,
            }
        }
        fn push(&mut self, time_ms: u64, payload: Payload) -> Vec<Outcome> {
            self.index += 1;
            let e = LogEntry {
                term: 1,
                index: self.index,
                time_ms,
                payload: Some(payload),
            };
            let out = self.sm.apply(&e);
            // Every other entry ends a batch, so batches of one and of two go through the engine.
            if self.index.is_multiple_of(2) {
                self.sm.finish_batch();
            }
            out
        }
        fn register(&mut self, time_ms: u64) -> u64 {
            let out = self.push(
                time_ms,
                Payload::RegisterSession(RegisterSession::default()),
            );
            assert!(out.contains(&Outcome::SessionRegistered { index: self.index }));
            self.index
        }
        fn put(&mut self, t: u64, s: u64, seq: u64, ack: u64, k: &str, v: &str) -> Vec<Outcome> {
            let cmd = PutCommand {
                session_id: s,
                seq,
                ack_seq: ack,
                key: Bytes::from(k.to_string()),
                value: Bytes::from(v.to_string()),
            };
            self.push(t, Payload::Put(cmd))
        }
        fn value(&self, k: &str) -> Option<(String, u64)> {
            let v = self.sm.get(k.as_bytes()).unwrap()?;
            Some((String::from_utf8(v.value.to_vec()).unwrap(), v.version))
        }
    }

    fn ok(out: &[Outcome]) -> Vec<(u64, u64, bool)> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Put {
                    seq,
                    result: Ok(r),
                    duplicate,
                    ..
                } => Some((*seq, r.version, *duplicate)),
                _ => None,
            })
            .collect()
    }

    /// Past `write_keys_max` changed keys and sessions the overlay goes to the engine at once,
    /// without a `finish_batch` call; every key still reads back.
    #[test]
    fn a_lowered_write_size_writes_the_overlay_early() {
        let engine = MemEngine::new();
        let mut sm = StateMachine::open(Box::new(engine.clone()), 1_000, 3).unwrap();
        sm.set_write_keys_max(3);
        let reg = LogEntry {
            term: 1,
            index: 1,
            time_ms: 1,
            payload: Some(Payload::RegisterSession(RegisterSession::default())),
        };
        sm.apply(&reg);
        for i in 2..=4u64 {
            let put = PutCommand {
                session_id: 1,
                seq: i - 1,
                ack_seq: i - 1,
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from_static(b"v"),
            };
            let e = LogEntry {
                term: 1,
                index: i,
                time_ms: i,
                payload: Some(Payload::Put(put)),
            };
            sm.apply(&e);
        }
        // Two keys and the session reached the bound at entry 3: written then.
        let written = engine.recovered().unwrap().applied_index;
        assert_eq!(written, 3, "the overlay was written when it held 3 changes");
        for i in 2..=4u64 {
            assert!(sm.get(format!("k{i}").as_bytes()).unwrap().is_some());
        }
        assert_eq!(sm.key_count().unwrap(), 3);
    }

    /// DESIGN rule 7: a retry of an applied request returns the original result and is not
    /// applied again.
    #[test]
    fn retried_put_applies_once_and_returns_original_result() {
        let mut log = Log::new();
        let s = log.register(10);
        assert_eq!(ok(&log.put(11, s, 1, 1, "k", "a")), vec![(1, 1, false)]);
        let retry = log.put(12, s, 1, 1, "k", "a");
        assert_eq!(ok(&retry), vec![(1, 1, true)]);
        assert_eq!(log.value("k"), Some(("a".into(), 1)));
    }

    /// DESIGN rule 7: requests of one client apply in the order the client issued them, even
    /// when the log holds them out of order.
    #[test]
    fn out_of_order_puts_wait_for_earlier_seq() {
        let mut log = Log::new();
        let s = log.register(10);
        assert!(log.put(11, s, 2, 1, "k", "second").is_empty());
        assert_eq!(log.value("k"), None);
        let out = log.put(12, s, 1, 1, "k", "first");
        assert_eq!(ok(&out), vec![(1, 1, false), (2, 2, false)]);
        assert_eq!(log.value("k"), Some(("second".into(), 2)));
    }

    #[test]
    fn abandoned_seq_is_skipped_and_late_copy_is_stale() {
        let mut log = Log::new();
        let s = log.register(10);
        // seq 1 never arrives; the client gave up on it (ack_seq 2) when it sent seq 2.
        assert_eq!(ok(&log.put(11, s, 2, 2, "k", "b")), vec![(2, 1, false)]);
        let late = log.put(12, s, 1, 1, "k", "a");
        assert!(matches!(
            late[0],
            Outcome::Put {
                seq: 1,
                result: Err(PutError::Stale),
                ..
            }
        ));
        assert_eq!(log.value("k"), Some(("b".into(), 1)));
    }

    #[test]
    fn ack_seq_releases_results_and_held_puts() {
        let mut log = Log::new();
        let s = log.register(10);
        log.put(11, s, 1, 1, "a", "1");
        assert!(log.sm.cached_result(s, 1).is_some());
        assert!(log.put(12, s, 3, 2, "c", "3").is_empty()); // waits for 2
                                                            // A later request says the client is done with everything below 4: seq 2 is skipped,
                                                            // seq 3 applies, seq 1's result is dropped.
        let out = log.put(13, s, 4, 4, "d", "4");
        assert_eq!(ok(&out), vec![(3, 1, false), (4, 1, false)]);
        assert!(log.sm.cached_result(s, 1).is_none());
    }

    #[test]
    fn unknown_session_and_expired_session_are_refused() {
        let mut log = Log::new();
        let out = log.put(5, 99, 1, 1, "k", "v");
        assert!(matches!(
            out[0],
            Outcome::Put {
                result: Err(PutError::SessionExpired),
                ..
            }
        ));
        let s = log.register(10);
        log.put(11, s, 1, 1, "k", "v");
        // ttl is 1000 ms: an entry at t = 2012 expires the session, deterministically.
        let other = log.register(2_012);
        assert!(!log.sm.has_session(s) && log.sm.has_session(other));
        let out = log.put(2_013, s, 1, 1, "k", "v");
        assert!(matches!(
            out[0],
            Outcome::Put {
                result: Err(PutError::SessionExpired),
                ..
            }
        ));
        assert_eq!(log.value("k"), Some(("v".into(), 1)));
    }

    #[test]
    fn session_table_is_bounded_by_evicting_least_recently_active() {
        let mut log = Log::new(); // sessions_max = 3
        let a = log.register(1);
        let b = log.register(2);
        let c = log.register(3);
        log.put(4, a, 1, 1, "k", "v"); // a is now the most recently active
        let d = log.register(5);
        assert!(log.sm.has_session(a) && !log.sm.has_session(b));
        assert!(log.sm.has_session(c) && log.sm.has_session(d));
    }

    #[test]
    fn put_outside_the_session_window_changes_nothing() {
        let mut log = Log::new();
        let s = log.register(1);
        for (seq, ack) in [(SESSION_WINDOW_MAX + 1, 1), (1, 2), (0, 0), (5, 0)] {
            let out = log.put(2, s, seq, ack, "k", "v");
            assert!(
                matches!(
                    out[..],
                    [Outcome::Put {
                        result: Err(PutError::Invalid),
                        ..
                    }]
                ),
                "seq {seq} ack {ack}: {out:?}"
            );
        }
        assert_eq!(log.value("k"), None);
        // The session is untouched: seq 1 still applies.
        assert_eq!(ok(&log.put(3, s, 1, 1, "k", "v")), vec![(1, 1, false)]);
    }

    /// The outage this guards against: one put with `ack_seq = 2^64 - 1` made every replica
    /// count up to it one step at a time. Skipping is now bounded by the puts held.
    #[test]
    fn an_extreme_ack_seq_is_applied_in_bounded_time() {
        let mut log = Log::new();
        let s = log.register(1);
        assert!(log.put(2, s, 5, 2, "held", "x").is_empty()); // waits for 2..=4
        let top = u64::MAX - 1;
        let out = log.put(3, s, top, top, "k", "v");
        assert_eq!(ok(&out), vec![(5, 1, false), (top, 1, false)]);
        assert_eq!(log.value("k"), Some(("v".into(), 1)));
        assert_eq!(log.sm.sessions[&s].next_seq, u64::MAX);
        let again = log.put(4, s, u64::MAX, u64::MAX, "k", "w");
        assert!(matches!(
            again[..],
            [Outcome::Put {
                result: Err(PutError::Invalid),
                ..
            }]
        ));
    }

    /// DESIGN rule 7 with the window: a result the client may still retry for (at or above its
    /// ack_seq) is never evicted, however many later puts the session applies.
    #[test]
    fn results_at_or_above_ack_seq_are_never_evicted() {
        let mut log = Log::new();
        let s = log.register(1);
        let first = ok(&log.put(2, s, 1, 1, "k0", "v"));
        assert_eq!(first, vec![(1, 1, false)]);
        for seq in 2..=SESSION_WINDOW_MAX {
            assert_eq!(ok(&log.put(3, s, seq, 1, &format!("k{seq}"), "v")).len(), 1);
        }
        // One more would leave the window: refused, and nothing is evicted for it.
        let beyond = log.put(4, s, SESSION_WINDOW_MAX + 1, 1, "x", "v");
        assert!(matches!(
            beyond[..],
            [Outcome::Put {
                result: Err(PutError::Invalid),
                ..
            }]
        ));
        let retry = log.put(5, s, 1, 1, "k0", "v");
        assert_eq!(ok(&retry), vec![(1, 1, true)], "{retry:?}");
        // Acknowledging moves the window: results below the new ack_seq go.
        log.put(6, s, SESSION_WINDOW_MAX + 1, 2, "x", "v");
        assert!(log.sm.cached_result(s, 1).is_none());
        assert!(log.sm.cached_result(s, 2).is_some());
    }

    /// A copy of a held put released by a retry with a higher ack_seq applies once, and the
    /// held copy never applies again (it used to stay held and apply a second time later).
    #[test]
    fn a_held_put_and_its_releasing_retry_apply_once() {
        let mut log = Log::new();
        let s = log.register(1);
        assert!(
            log.put(2, s, 3, 1, "k", "v").is_empty(),
            "waits for 1 and 2"
        );
        assert_eq!(ok(&log.put(3, s, 3, 3, "k", "v")), vec![(3, 1, false)]);
        let later = log.put(4, s, 10, 10, "j", "w");
        assert_eq!(ok(&later), vec![(10, 1, false)]);
        assert_eq!(log.value("k"), Some(("v".into(), 1)));
        assert!(log.sm.sessions[&s].pending.is_empty());
    }

    fn extreme(rng: &mut impl rand::Rng) -> u64 {
        const PICKS: [u64; 9] = [
            0,
            1,
            2,
            SESSION_WINDOW_MAX - 1,
            SESSION_WINDOW_MAX,
            SESSION_WINDOW_MAX + 1,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ];
        if rng.random_bool(0.5) {
            PICKS[rng.random_range(0..PICKS.len())]
        } else {
            rng.random_range(0..64)
        }
    }

    /// Property: any sequence of entries, whatever their fields, applies without panicking, in
    /// bounded time, and keeps every session within its bounds.
    #[test]
    fn arbitrary_entries_apply_within_bounds() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut sm = StateMachine::new(rng.random_range(0..50), rng.random_range(1..4));
            let mut sessions = vec![0u64, u64::MAX];
            for index in 1..=300u64 {
                let payload = match rng.random_range(0..10) {
                    0 => None,
                    1 => Some(Payload::Noop(kvraft_proto::Noop {})),
                    2 => Some(Payload::RegisterSession(RegisterSession::default())),
                    _ => {
                        let session_id = if rng.random_bool(0.8) {
                            sessions[rng.random_range(0..sessions.len())]
                        } else {
                            extreme(&mut rng)
                        };
                        let seq = if rng.random_bool(0.3) {
                            rng.random_range(1..8)
                        } else {
                            extreme(&mut rng)
                        };
                        let ack_seq = if rng.random_bool(0.5) {
                            seq.saturating_sub(rng.random_range(0..3))
                        } else {
                            extreme(&mut rng)
                        };
                        let key: Vec<u8> =
                            (0..rng.random_range(0..3)).map(|_| rng.random()).collect();
                        Some(Payload::Put(PutCommand {
                            session_id,
                            seq,
                            ack_seq,
                            key: Bytes::from(key),
                            value: Bytes::new(),
                        }))
                    }
                };
                if matches!(payload, Some(Payload::RegisterSession(_))) {
                    sessions.push(index);
                }
                let time_ms = extreme(&mut rng);
                let entry = LogEntry {
                    term: 1,
                    index,
                    time_ms,
                    payload,
                };
                sm.apply(&entry);
                for session in sm.sessions.values() {
                    assert!(
                        session.results.len() as u64 <= SESSION_WINDOW_MAX,
                        "seed {seed}"
                    );
                    assert!(
                        session.pending.len() as u64 <= SESSION_WINDOW_MAX,
                        "seed {seed}"
                    );
                    assert!(
                        session.pending.keys().all(|&seq| seq >= session.next_seq),
                        "seed {seed}: a held put is behind the session"
                    );
                }
                assert!(sm.sessions.len() <= sm.sessions_max, "seed {seed}");
            }
        }
    }

    /// A crash between a synced batch and later unsynced ones: the engine reopens at the synced
    /// applied index with that moment's sessions, and replaying the log from there gives the
    /// same answers and the same state as never crashing.
    #[test]
    fn a_crash_after_sync_resumes_from_the_synced_position() {
        let entries: Vec<LogEntry> = {
            let mut v = vec![payload_entry(
                1,
                Payload::RegisterSession(RegisterSession::default()),
            )];
            for (i, (seq, ack)) in [(1, 1), (3, 1), (2, 1), (4, 3), (5, 5), (4, 3)]
                .iter()
                .enumerate()
            {
                let cmd = PutCommand {
                    session_id: 1,
                    seq: *seq,
                    ack_seq: *ack,
                    key: Bytes::from(format!("k{}", i % 2)),
                    value: Bytes::from(format!("v{i}")),
                };
                v.push(payload_entry(i as u64 + 2, Payload::Put(cmd)));
            }
            v
        };
        let mut straight = StateMachine::new(1_000, 3);
        let want: Vec<Vec<Outcome>> = entries.iter().map(|e| straight.apply(e)).collect();
        for synced_at in 0..entries.len() {
            let engine = MemEngine::new();
            let mut sm = StateMachine::open(Box::new(engine.clone()), 1_000, 3).unwrap();
            for e in &entries[..synced_at] {
                sm.apply(e);
            }
            assert_eq!(sm.sync().unwrap(), synced_at as u64);
            for e in &entries[synced_at..] {
                sm.apply(e);
                sm.finish_batch();
            }
            drop(sm);
            engine.crash();
            let mut sm = StateMachine::open(Box::new(engine), 1_000, 3).unwrap();
            assert_eq!(sm.last_applied(), synced_at as u64);
            for (i, e) in entries.iter().enumerate().skip(synced_at) {
                assert_eq!(
                    sm.apply(e),
                    want[i],
                    "entry {} after a crash at {synced_at}",
                    i + 1
                );
            }
            for k in ["k0", "k1"] {
                assert_eq!(
                    sm.get(k.as_bytes()).unwrap(),
                    straight.get(k.as_bytes()).unwrap()
                );
            }
            assert_eq!(sm.key_count().unwrap(), 2);
        }
    }

    fn payload_entry(index: u64, payload: Payload) -> LogEntry {
        LogEntry {
            term: 1,
            index,
            time_ms: 10 * index,
            payload: Some(payload),
        }
    }

    #[test]
    fn a_damaged_session_record_is_an_error() {
        let mut session = Session {
            next_seq: 3,
            acked: 1,
            last_active_ms: 5,
            results: BTreeMap::from([(
                1,
                PutResult {
                    version: 1,
                    index: 2,
                },
            )]),
            pending: BTreeMap::from([(4, (Bytes::from_static(b"k"), Bytes::from_static(b"v"), 7))]),
        };
        let bytes = encode_session(&session);
        let back = decode_session(&bytes).unwrap();
        assert_eq!(
            (back.next_seq, back.results, back.pending),
            (3, session.results.clone(), session.pending.clone())
        );
        for cut in 0..bytes.len() {
            assert!(decode_session(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        session.acked = 2;
        let mut long = encode_session(&session);
        long.push(0);
        assert!(decode_session(&long).is_err());
    }
}
