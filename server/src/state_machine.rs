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
//! Transactions (deletes and conditional writes are transactions) share the session's seq
//! space and rules with puts: a `TxnCommand` applies once, in seq order, and its recorded
//! result (branch taken, per-op results, the values its gets read up to the entry's read
//! budget) answers every retry. It runs its compares and then one branch, each op seeing the
//! ones before it, all at the revision of the entry that applies it; a range delete stops
//! after [`DELETE_KEYS_PER_ENTRY_MAX`] keys in all and says so (`more`).
//!
//! Revisions. The store's revision is the index of the last applied entry; each key keeps
//! `create_revision` (the entry that created it since it was last absent), `mod_revision`
//! (the entry that last changed it) and `version` (puts since it was created; a delete ends
//! it, and a later put starts again at 1). Each put and delete also records the key's value
//! before it (see [`crate::past`]), so a range read can be served as of a recent revision.
//!
//! Invariants: `next_seq` and `acked` of a session only grow; a `(session, seq)` changes the map
//! at most once; the result of every applied seq at or above `acked` is kept (never evicted),
//! so a retry of a request the client still waits for always gets its original answer; a
//! session holds at most [`SESSION_WINDOW_MAX`] results and pending puts; the session table
//! holds at most `sessions_max` sessions. No step is linear in a number a client chose: work per
//! entry is bounded by the session window and the sessions it expires.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use crate::engine::{
    Applied, Engine, EngineError, MemEngine, SnapshotMeta, SnapshotSink, SnapshotSource, WriteBatch,
};

use crate::past::{PastError, PastValues};
use kvraft_common::config::{WATCH_HISTORY_BYTES_DEFAULT, WATCH_HISTORY_REVISIONS_DEFAULT};
use kvraft_common::limits::{self, DELETE_KEYS_PER_ENTRY_MAX, SESSION_WINDOW_MAX};
use kvraft_proto::log_entry::Payload;
use kvraft_proto::{txn_op, Compare, CompareOp, CompareTarget, LogEntry, TxnCommand};
use prost::bytes::Bytes;
use prost::Message;

pub use crate::engine::Versioned;

/// Most keys and sessions changed and not yet written to the engine: past it the batch is
/// written at once (otherwise the runtime writes it with each durable commit), which bounds
/// the overlay's memory and the set of changed sessions.
pub const OVERLAY_KEYS_MAX: usize = 65_536;
/// Most key and value bytes in the overlay, for the same reason.
pub const OVERLAY_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Keys the engine is asked for at a time while a range is walked.
const RANGE_PAGE_KEYS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub version: u64,
    /// Index of the log entry whose application changed the map.
    pub index: u64,
}

/// What an applied transaction did: which branch ran, its revision (the index of the entry
/// whose application ran it) and one result per operation of that branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: u64,
    pub results: Vec<TxnOpResult>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOpResult {
    /// The key's version after the put.
    Put { version: u64 },
    /// Keys deleted; `more`: keys of the range are left (the transaction's delete budget,
    /// [`DELETE_KEYS_PER_ENTRY_MAX`], was spent).
    Delete { deleted: u64, more: bool },
    /// The key as this point of the transaction saw it; `value_omitted`: the read budget was
    /// spent, `kv` has the counters and an empty value.
    Get {
        kv: Option<Versioned>,
        value_omitted: bool,
    },
}

/// The recorded result of a session's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    Put(PutResult),
    Txn(Arc<TxnResult>),
}

impl WriteResult {
    /// Index of the entry whose application produced it.
    pub fn index(&self) -> u64 {
        match self {
            WriteResult::Put(p) => p.index,
            WriteResult::Txn(t) => t.revision,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutError {
    SessionExpired,
    /// The seq is below the session's `ack_seq`: its result is gone, so whether it applied is
    /// unknown.
    Stale,
    /// The request breaks the session rules (`ack_seq <= seq < ack_seq + window`) or the
    /// transaction limits; nothing changed.
    Invalid,
}

/// What applying an entry resolved, for the leader to answer its waiting clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    SessionRegistered {
        index: u64,
    },
    /// A put or a transaction of a session.
    Write {
        session_id: u64,
        seq: u64,
        result: Result<WriteResult, PutError>,
        /// The request had applied before; this is the recorded result.
        duplicate: bool,
    },
}

/// What a session's request changes when its turn comes.
#[derive(Clone, Debug, PartialEq)]
enum Request {
    Put { key: Bytes, value: Bytes },
    Txn(Arc<TxnCommand>),
}

#[derive(Clone, Debug)]
struct Session {
    next_seq: u64,
    /// The highest `ack_seq` applied: the client is done with every seq below it.
    acked: u64,
    last_active_ms: u64,
    /// Results of applied seqs in `[acked, next_seq)`, all of them (at most the window).
    results: BTreeMap<u64, WriteResult>,
    /// seq -> (request, index of the entry that carried it)
    pending: BTreeMap<u64, (Request, u64)>,
}

/// A page of a range read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangePage {
    pub kvs: Vec<(Bytes, Versioned)>,
    /// Keys of the range are left, from `next_key` on.
    pub more: bool,
    pub next_key: Bytes,
}

pub struct StateMachine {
    /// The keys and values, the sessions and the applied position as of the last batch
    /// written (see [`StateMachine::finish_batch`]).
    engine: Box<dyn Engine>,
    /// Keys changed by entries applied since the last batch was written, in key order (range
    /// reads merge it with the engine); `None`: deleted.
    overlay: BTreeMap<Bytes, Option<Versioned>>,
    /// Keys the overlay adds to the engine's count (created minus deleted).
    overlay_key_delta: i64,
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
    /// See [`StateMachine::record_changes`].
    recording: bool,
    changes: Vec<Change>,
    /// The values keys had before their recent changes, for reads at a past revision.
    past: PastValues,
}

/// A key changed by an applied entry, for watches: its new value (`None`: deleted) at
/// `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub revision: u64,
    pub key: Bytes,
    pub value: Option<Versioned>,
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
            overlay: BTreeMap::new(),
            overlay_key_delta: 0,
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
            recording: false,
            changes: Vec::new(),
            past: PastValues::new(
                recovered.applied_index,
                WATCH_HISTORY_REVISIONS_DEFAULT as usize,
                WATCH_HISTORY_BYTES_DEFAULT as usize,
            ),
        })
    }

    /// Bounds the history that reads at a past revision use (see [`crate::past`]): at most
    /// `revisions_max` revisions and about `bytes_max` bytes. What it held is dropped: call
    /// it before applying.
    pub fn set_past_bounds(&mut self, revisions_max: usize, bytes_max: usize) {
        self.past = PastValues::new(self.last_applied, revisions_max, bytes_max);
    }

    /// The oldest revision a range read can ask for.
    pub fn oldest_readable(&self) -> u64 {
        self.past.oldest()
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
        let mut puts = Vec::with_capacity(self.overlay.len());
        let mut deletes = Vec::new();
        for (key, value) in std::mem::take(&mut self.overlay) {
            match value {
                Some(v) => puts.push((key, v)),
                None => deletes.push(key),
            }
        }
        let batch = WriteBatch {
            puts,
            deletes,
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
                self.overlay_key_delta = 0;
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

    /// Keeps every change applied from now on (key, new value, revision) until
    /// [`Self::take_changes`], for watches. Off by default: the caller must take them.
    pub fn record_changes(&mut self, on: bool) {
        self.recording = on;
        if !on {
            self.changes = Vec::new();
        }
    }

    /// The changes recorded since the last call, in the order they were applied.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
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
                let recording = self.recording;
                let past = self.past.emptied(installed.last_applied);
                *self = installed;
                self.past = past;
                self.write_keys_max = write_keys_max;
                self.recording = recording;
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

    /// At most `limit` keys of `[start, end)` (an empty `end`: no upper bound) in key order,
    /// and fewer if more would take the keys and values past `bytes_max` (but at least one);
    /// values left empty if `keys_only`. An engine failure is recorded and reads as an empty
    /// page. Work is bounded by `limit` and the overlay's size, whatever the range.
    pub fn range(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        bytes_max: usize,
        keys_only: bool,
    ) -> RangePage {
        self.range_at(0, start, end, limit, bytes_max, keys_only)
            .expect("invariant: the latest revision is always readable")
    }

    /// As [`Self::range`], as of `revision` (0: the latest): the latest state with the keys
    /// changed since `revision` put back as they were then. An error if the history no longer
    /// holds `revision` or it is not applied yet. Work is bounded as for the latest, plus the
    /// keys of the range the history holds.
    pub fn range_at(
        &mut self,
        revision: u64,
        start: &[u8],
        end: &[u8],
        limit: usize,
        bytes_max: usize,
        keys_only: bool,
    ) -> Result<RangePage, PastError> {
        let latest = self.last_applied;
        let revision = if revision == 0 { latest } else { revision };
        if revision != latest {
            self.past.check(revision, latest)?;
        }
        let mut page = RangePage::default();
        let mut bytes = 0usize;
        // Adds a key to the page; false once the page is full (the key is the next one).
        let mut add = |key: Bytes, mut v: Versioned| {
            let size = key.len() + if keys_only { 0 } else { v.value.len() };
            if page.kvs.len() >= limit || (!page.kvs.is_empty() && bytes + size > bytes_max) {
                page.more = true;
                page.next_key = key;
                return false;
            }
            if keys_only {
                v.value = Bytes::new();
            }
            bytes += size;
            page.kvs.push((key, v));
            true
        };
        // The keys changed since `revision`, with their values then, merged into the walk of
        // the latest state by key (none when reading the latest).
        let mut then = self
            .past
            .changed_after(revision, start, crate::engine::end_bound(end))
            .peekable();
        let mut full = false;
        let walked = self.walk(start, end, |key, v| {
            // Keys absent now but present then come before this one.
            while let Some((k, before)) = then.next_if(|(k, _)| k[..] < key[..]) {
                if let Some(before) = before {
                    if !add(k.clone(), before.clone()) {
                        full = true;
                        return false;
                    }
                }
            }
            let v = match then.next_if(|(k, _)| k[..] == key[..]) {
                Some((_, None)) => return true, // created since
                Some((_, Some(before))) => before.clone(),
                None => v,
            };
            if !add(key, v) {
                full = true;
                return false;
            }
            true
        });
        if let Err(e) = walked {
            self.failure.get_or_insert(e.to_string());
            return Ok(RangePage::default());
        }
        if !full {
            for (k, before) in then {
                if let Some(before) = before {
                    if !add(k.clone(), before.clone()) {
                        break;
                    }
                }
            }
        }
        Ok(page)
    }

    /// Visits the keys of `[start, end)` (an empty `end`: no upper bound) in key order, the
    /// overlay over the engine, until `visit` answers false or the range ends.
    fn walk(
        &self,
        start: &[u8],
        end: &[u8],
        mut visit: impl FnMut(Bytes, Versioned) -> bool,
    ) -> Result<(), EngineError> {
        let upper = crate::engine::end_bound(end);
        let mut overlay = self
            .overlay
            .range::<[u8], _>((Bound::Included(start), upper))
            .peekable();
        let mut page = Vec::new().into_iter();
        let mut last_fetched: Option<Bytes> = None;
        let mut engine_exhausted = false;
        let mut engine_next: Option<(Bytes, Versioned)> = None;
        loop {
            if engine_next.is_none() {
                engine_next = page.next();
                if engine_next.is_none() && !engine_exhausted {
                    let from = match &last_fetched {
                        None => Bound::Included(start),
                        Some(k) => Bound::Excluded(&k[..]),
                    };
                    let fetched = self.engine.range(from, end, RANGE_PAGE_KEYS)?;
                    engine_exhausted = fetched.len() < RANGE_PAGE_KEYS;
                    last_fetched = fetched.last().map(|(k, _)| k.clone());
                    page = fetched.into_iter();
                    engine_next = page.next();
                }
            }
            let from_overlay = match (overlay.peek(), &engine_next) {
                (None, None) => return Ok(()),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((o, _)), Some((e, _))) => o[..] <= e[..],
            };
            let item = if from_overlay {
                let (key, value) = overlay.next().expect("invariant: peeked");
                if engine_next.as_ref().is_some_and(|(e, _)| e == key) {
                    engine_next = None; // the overlay's version of the key wins
                }
                value.as_ref().map(|v| (key.clone(), v.clone()))
            } else {
                engine_next.take()
            };
            if let Some((key, value)) = item {
                if !visit(key, value) {
                    return Ok(());
                }
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
            Some(v) => Ok(v.clone()),
            None => self.engine.get(key),
        }
    }

    /// The key's `(version, create_revision)`, with what was applied since the last batch.
    fn counters(&self, key: &[u8]) -> Result<Option<(u64, u64)>, EngineError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.as_ref().map(|v| (v.version, v.create_revision))),
            None => self.engine.counters(key),
        }
    }

    /// Number of keys.
    pub fn key_count(&self) -> Result<u64, EngineError> {
        let count = self.engine.key_count()? as i64 + self.overlay_key_delta;
        Ok(count.max(0) as u64)
    }

    /// Client sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn has_session(&self, session_id: u64) -> bool {
        self.sessions.contains_key(&session_id)
    }

    /// The recorded result of an applied `(session, seq)`, if still kept.
    pub fn cached_result(&self, session_id: u64, seq: u64) -> Option<WriteResult> {
        self.sessions.get(&session_id)?.results.get(&seq).cloned()
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
            Some(Payload::Put(put)) => {
                let valid =
                    limits::check_put_seq(put.session_id, put.seq, put.ack_seq, self.window);
                let request = Request::Put {
                    key: put.key.clone(),
                    value: put.value.clone(),
                };
                let ids = (put.session_id, put.seq, put.ack_seq);
                self.apply_request(ids, valid.is_ok(), request, entry, &mut out);
            }
            Some(Payload::Txn(txn)) => {
                // Shape checked with the largest value any config allows: the leader checked
                // its own limit before appending, and every replica must decide alike.
                let valid =
                    limits::check_put_seq(txn.session_id, txn.seq, txn.ack_seq, self.window)
                        .and_then(|()| {
                            limits::check_txn(
                                &txn.compare,
                                &txn.success,
                                &txn.failure,
                                limits::VALUE_BYTES_CEILING,
                            )
                        });
                let ids = (txn.session_id, txn.seq, txn.ack_seq);
                let request = Request::Txn(Arc::new(txn.clone()));
                self.apply_request(ids, valid.is_ok(), request, entry, &mut out);
            }
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

    /// Drops a session; requests still waiting in it are answered `SessionExpired`.
    fn remove_session(&mut self, id: u64, at: u64, out: &mut Vec<Outcome>) {
        self.by_activity.remove(&(at, id));
        self.dirty.insert(id);
        if let Some(session) = self.sessions.remove(&id) {
            for seq in session.pending.keys() {
                out.push(write_outcome(
                    id,
                    *seq,
                    Err(PutError::SessionExpired),
                    false,
                ));
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

    /// A put or a transaction of session `id` at `seq`, acknowledging below `ack_seq`.
    /// `valid`: it keeps the session rules and the transaction limits (else nothing changes).
    fn apply_request(
        &mut self,
        (id, seq, ack_seq): (u64, u64, u64),
        valid: bool,
        request: Request,
        entry: &LogEntry,
        out: &mut Vec<Outcome>,
    ) {
        if !self.sessions.contains_key(&id) {
            out.push(write_outcome(id, seq, Err(PutError::SessionExpired), false));
            return;
        }
        if !valid {
            // The leader validates before appending; an entry that got here anyway (an older
            // or misbehaving leader) changes nothing, the same on every replica.
            out.push(write_outcome(id, seq, Err(PutError::Invalid), false));
            return;
        }
        // Everything below changes only this session.
        self.dirty.insert(id);
        self.touch(id, entry.time_ms);
        self.advance_ack(id, ack_seq, out);
        let session = &self.sessions[&id];
        if seq < session.next_seq {
            // Below `acked` the result is gone; at or above it, it is always kept.
            let result = session.results.get(&seq).cloned().ok_or(PutError::Stale);
            let duplicate = result.is_ok();
            out.push(write_outcome(id, seq, result, duplicate));
            return;
        }
        if seq > session.next_seq {
            self.hold(id, seq, request, entry.index);
            return;
        }
        // An earlier copy of this very request may be held (it waited for seqs this copy's
        // ack_seq gave up): it is the same request, applied once, now.
        self.sessions
            .get_mut(&id)
            .expect("invariant: caller checked")
            .pending
            .remove(&seq);
        self.apply_in_order(id, seq, request, entry.index, out);
        self.drain_pending(id, out);
    }

    fn hold(&mut self, id: u64, seq: u64, request: Request, index: u64) {
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        if session.pending.contains_key(&seq) {
            return; // a retry appended twice: the first copy answers when it applies
        }
        // `apply_request` checked `seq < ack_seq + window` and `advance_ack` moved `next_seq`
        // to at least `ack_seq`: the window bounds what a session holds.
        debug_assert!(
            seq - session.next_seq < self.window,
            "invariant: held requests stay within the session window"
        );
        session.pending.insert(seq, (request, index));
    }

    /// Everything below `ack_seq` is finished for the client: apply what is held, skip what
    /// never came, forget results. Bounded by the requests held, not by how far `ack_seq`
    /// moves.
    fn advance_ack(&mut self, id: u64, ack_seq: u64, out: &mut Vec<Outcome>) {
        loop {
            let session = self
                .sessions
                .get_mut(&id)
                .expect("invariant: caller checked");
            if session.next_seq >= ack_seq {
                break;
            }
            // Held requests below `ack_seq` apply in seq order; the seqs between them never
            // came.
            let held = session.pending.first_key_value().map(|(&seq, _)| seq);
            match held {
                Some(seq) if seq < ack_seq => {
                    let (request, index) = session
                        .pending
                        .remove(&seq)
                        .expect("invariant: first key exists");
                    debug_assert!(
                        seq >= session.next_seq,
                        "invariant: held seqs are not behind"
                    );
                    if seq >= session.next_seq {
                        session.next_seq = seq;
                        self.apply_in_order(id, seq, request, index, out);
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
            let Some((request, index)) = session.pending.remove(&seq) else {
                break;
            };
            self.apply_in_order(id, seq, request, index, out);
        }
    }

    /// Applies the session's next request. Revisions follow the order in which the map
    /// changes: the index of the entry being applied (a held request changes the map when a
    /// later entry releases it); `index` (the entry that carried it) is what a put reports.
    fn apply_in_order(
        &mut self,
        id: u64,
        seq: u64,
        request: Request,
        index: u64,
        out: &mut Vec<Outcome>,
    ) {
        let result = match request {
            Request::Put { key, value } => self
                .put_key(key, value)
                .map(|version| WriteResult::Put(PutResult { version, index })),
            Request::Txn(cmd) => self.run_txn(&cmd).map(|r| WriteResult::Txn(Arc::new(r))),
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                // Nothing more applies; the server stops before any reply of this batch.
                self.failure.get_or_insert(e.to_string());
                return;
            }
        };
        let session = self
            .sessions
            .get_mut(&id)
            .expect("invariant: caller checked");
        assert_eq!(
            seq, session.next_seq,
            "invariant: a session applies in seq order"
        );
        session.next_seq += 1;
        session.results.insert(seq, result.clone());
        out.push(write_outcome(id, seq, Ok(result), false));
    }

    /// Writes `key` at the current revision; returns its new version.
    fn put_key(&mut self, key: Bytes, value: Bytes) -> Result<u64, EngineError> {
        // The previous value is kept for reads at a past revision.
        let previous = self.get(&key)?;
        let revision = self.last_applied;
        let version = previous.as_ref().map_or(0, |v| v.version) + 1;
        let create_revision = previous.as_ref().map_or(revision, |v| v.create_revision);
        if previous.is_none() {
            self.overlay_key_delta += 1;
        }
        self.past.record(revision, &key, previous);
        let versioned = Versioned {
            value,
            version,
            create_revision,
            mod_revision: revision,
        };
        self.overlay_bytes += key.len() + versioned.value.len();
        if self.recording {
            self.changes.push(Change {
                revision,
                key: key.clone(),
                value: Some(versioned.clone()),
            });
        }
        self.overlay.insert(key, Some(versioned));
        Ok(version)
    }

    /// Removes `key`; whether it existed.
    fn delete_key(&mut self, key: Bytes) -> Result<bool, EngineError> {
        let Some(previous) = self.get(&key)? else {
            return Ok(false);
        };
        self.past.record(self.last_applied, &key, Some(previous));
        self.overlay_key_delta -= 1;
        self.overlay_bytes += key.len();
        if self.recording {
            self.changes.push(Change {
                revision: self.last_applied,
                key: key.clone(),
                value: None,
            });
        }
        self.overlay.insert(key, None);
        Ok(true)
    }

    /// Whether `compare` holds now. A value compare on an absent key is false.
    fn holds(&self, compare: &Compare) -> Result<bool, EngineError> {
        let current = self.get(&compare.key)?;
        let op = CompareOp::try_from(compare.op).unwrap_or(CompareOp::Equal);
        let ordering = match CompareTarget::try_from(compare.target) {
            Ok(CompareTarget::Value) => match &current {
                None => return Ok(false),
                Some(v) => v.value[..].cmp(&compare.value[..]),
            },
            target => {
                let actual = current.as_ref().map_or(0, |v| match target {
                    Ok(CompareTarget::CreateRevision) => v.create_revision,
                    Ok(CompareTarget::ModRevision) => v.mod_revision,
                    _ => v.version,
                });
                actual.cmp(&compare.number)
            }
        };
        Ok(match op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Less => ordering.is_lt(),
            CompareOp::Greater => ordering.is_gt(),
        })
    }

    /// Runs a transaction (its shape already checked): the compares, then one branch, each op
    /// seeing the ones before it. Work is bounded by [`limits::TXN_OPS_MAX`] ops and
    /// [`DELETE_KEYS_PER_ENTRY_MAX`] deleted keys.
    fn run_txn(&mut self, cmd: &TxnCommand) -> Result<TxnResult, EngineError> {
        let mut succeeded = true;
        for compare in &cmd.compare {
            if !self.holds(compare)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &cmd.success
        } else {
            &cmd.failure
        };
        let mut read_budget = cmd.read_bytes_max;
        let mut delete_budget = DELETE_KEYS_PER_ENTRY_MAX;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let result = match &op.op {
                // The shape check refuses a missing op; nothing to do if one got here.
                None => continue,
                Some(txn_op::Op::Put(p)) => TxnOpResult::Put {
                    version: self.put_key(p.key.clone(), p.value.clone())?,
                },
                Some(txn_op::Op::Get(g)) => {
                    let mut kv = self.get(&g.key)?;
                    let mut value_omitted = false;
                    if let Some(v) = kv.as_mut() {
                        let len = v.value.len() as u64;
                        if len > read_budget {
                            v.value = Bytes::new();
                            value_omitted = true;
                        } else {
                            read_budget -= len;
                        }
                    }
                    TxnOpResult::Get { kv, value_omitted }
                }
                Some(txn_op::Op::Delete(d)) if d.range_end.is_empty() => {
                    if delete_budget == 0 {
                        let exists = self.counters(&d.key)?.is_some();
                        TxnOpResult::Delete {
                            deleted: 0,
                            more: exists,
                        }
                    } else {
                        let deleted = self.delete_key(d.key.clone())?;
                        delete_budget -= u64::from(deleted);
                        TxnOpResult::Delete {
                            deleted: u64::from(deleted),
                            more: false,
                        }
                    }
                }
                Some(txn_op::Op::Delete(d)) => {
                    let end = limits::delete_range_end(&d.range_end).unwrap_or_default();
                    let mut keys = Vec::new();
                    let mut more = false;
                    self.walk(&d.key, end, |key, _| {
                        if keys.len() as u64 >= delete_budget {
                            more = true;
                            return false;
                        }
                        keys.push(key);
                        true
                    })?;
                    let deleted = keys.len() as u64;
                    for key in keys {
                        self.delete_key(key)?;
                    }
                    delete_budget -= deleted;
                    TxnOpResult::Delete { deleted, more }
                }
            };
            results.push(result);
        }
        Ok(TxnResult {
            succeeded,
            revision: self.last_applied,
            results,
        })
    }
}

/// Format of a stored session (little-endian):
///
/// ```text
///   next_seq u64 | acked u64 | last_active_ms u64
///   results u32, each: seq u64 | kind u8
///     kind 0 (put): version u64 | index u64
///     kind 1 (txn): succeeded u8 | revision u64 | ops u32, each: kind u8
///       0 put: version u64;  1 delete: deleted u64 | more u8
///       2 get: found u8 [| version u64 | create u64 | mod u64 | omitted u8 | value bytes]
///   held u32, each: seq u64 | index u64 | kind u8
///     kind 0 (put): key bytes | value bytes;  kind 1 (txn): TxnCommand protobuf bytes
///   bytes = len u32 | the bytes
/// ```
fn encode_session(s: &Session) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(32 + s.results.len() * 25));
    w.u64(s.next_seq);
    w.u64(s.acked);
    w.u64(s.last_active_ms);
    w.u32(s.results.len() as u32);
    for (seq, r) in &s.results {
        w.u64(*seq);
        match r {
            WriteResult::Put(p) => {
                w.u8(0);
                w.u64(p.version);
                w.u64(p.index);
            }
            WriteResult::Txn(t) => {
                w.u8(1);
                w.u8(u8::from(t.succeeded));
                w.u64(t.revision);
                w.u32(t.results.len() as u32);
                for op in &t.results {
                    encode_op_result(&mut w, op);
                }
            }
        }
    }
    w.u32(s.pending.len() as u32);
    for (seq, (request, index)) in &s.pending {
        w.u64(*seq);
        w.u64(*index);
        match request {
            Request::Put { key, value } => {
                w.u8(0);
                w.bytes(key);
                w.bytes(value);
            }
            Request::Txn(cmd) => {
                w.u8(1);
                w.bytes(&cmd.encode_to_vec());
            }
        }
    }
    w.0
}

fn encode_op_result(w: &mut Writer, op: &TxnOpResult) {
    match op {
        TxnOpResult::Put { version } => {
            w.u8(0);
            w.u64(*version);
        }
        TxnOpResult::Delete { deleted, more } => {
            w.u8(1);
            w.u64(*deleted);
            w.u8(u8::from(*more));
        }
        TxnOpResult::Get { kv, value_omitted } => {
            w.u8(2);
            w.u8(u8::from(kv.is_some()));
            if let Some(v) = kv {
                w.u64(v.version);
                w.u64(v.create_revision);
                w.u64(v.mod_revision);
                w.u8(u8::from(*value_omitted));
                w.bytes(&v.value);
            }
        }
    }
}

fn decode_session(bytes: &[u8]) -> Result<Session, String> {
    let mut r = Reader { bytes, at: 0 };
    let (next_seq, acked, last_active_ms) = (r.u64()?, r.u64()?, r.u64()?);
    let mut results = BTreeMap::new();
    for _ in 0..r.u32()? {
        let seq = r.u64()?;
        let result = match r.u8()? {
            0 => WriteResult::Put(PutResult {
                version: r.u64()?,
                index: r.u64()?,
            }),
            1 => {
                let succeeded = r.flag()?;
                let revision = r.u64()?;
                let n = r.u32()?;
                // Each op result is at least 2 bytes: a count past what is left is damage.
                let mut ops = Vec::with_capacity((n as usize).min(r.left() / 2));
                for _ in 0..n {
                    ops.push(decode_op_result(&mut r)?);
                }
                WriteResult::Txn(Arc::new(TxnResult {
                    succeeded,
                    revision,
                    results: ops,
                }))
            }
            kind => return Err(format!("result of seq {seq} has unknown kind {kind}")),
        };
        results.insert(seq, result);
    }
    let mut pending = BTreeMap::new();
    for _ in 0..r.u32()? {
        let (seq, index) = (r.u64()?, r.u64()?);
        let request = match r.u8()? {
            0 => Request::Put {
                key: r.bytes()?,
                value: r.bytes()?,
            },
            1 => {
                let cmd = TxnCommand::decode(r.bytes()?)
                    .map_err(|e| format!("held transaction of seq {seq}: {e}"))?;
                Request::Txn(Arc::new(cmd))
            }
            kind => return Err(format!("held request of seq {seq} has unknown kind {kind}")),
        };
        pending.insert(seq, (request, index));
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

fn decode_op_result(r: &mut Reader) -> Result<TxnOpResult, String> {
    Ok(match r.u8()? {
        0 => TxnOpResult::Put { version: r.u64()? },
        1 => TxnOpResult::Delete {
            deleted: r.u64()?,
            more: r.flag()?,
        },
        2 => {
            if r.flag()? {
                let (version, create_revision, mod_revision) = (r.u64()?, r.u64()?, r.u64()?);
                let value_omitted = r.flag()?;
                let value = r.bytes()?;
                TxnOpResult::Get {
                    kv: Some(Versioned {
                        value,
                        version,
                        create_revision,
                        mod_revision,
                    }),
                    value_omitted,
                }
            } else {
                TxnOpResult::Get {
                    kv: None,
                    value_omitted: false,
                }
            }
        }
        kind => return Err(format!("transaction op result of unknown kind {kind}")),
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// Reads a stored session; every length is checked against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
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
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("flag byte {other} at offset {}", self.at - 1)),
        }
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

fn write_outcome(
    session_id: u64,
    seq: u64,
    result: Result<WriteResult, PutError>,
    duplicate: bool,
) -> Outcome {
    Outcome::Write {
        session_id,
        seq,
        result,
        duplicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvraft_proto::PutCommand;
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
                Outcome::Write {
                    seq,
                    result: Ok(WriteResult::Put(r)),
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
            Outcome::Write {
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
            Outcome::Write {
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
            Outcome::Write {
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
                    [Outcome::Write {
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
            [Outcome::Write {
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
            [Outcome::Write {
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

    // ------------------------------------------------------------ transactions and ranges

    fn cmp(key: &str, target: CompareTarget, op: CompareOp, number: u64, value: &str) -> Compare {
        Compare {
            key: Bytes::from(key.to_string()),
            target: target as i32,
            op: op as i32,
            number,
            value: Bytes::from(value.to_string()),
        }
    }

    fn op_put(k: &str, v: &str) -> kvraft_proto::TxnOp {
        kvraft_proto::TxnOp {
            op: Some(txn_op::Op::Put(kvraft_proto::TxnPut {
                key: Bytes::from(k.to_string()),
                value: Bytes::from(v.to_string()),
            })),
        }
    }

    fn op_get(k: &str) -> kvraft_proto::TxnOp {
        kvraft_proto::TxnOp {
            op: Some(txn_op::Op::Get(kvraft_proto::TxnGet {
                key: Bytes::from(k.to_string()),
            })),
        }
    }

    fn op_delete(k: &str, range_end: &[u8]) -> kvraft_proto::TxnOp {
        kvraft_proto::TxnOp {
            op: Some(txn_op::Op::Delete(kvraft_proto::TxnDelete {
                key: Bytes::from(k.to_string()),
                range_end: Bytes::copy_from_slice(range_end),
            })),
        }
    }

    impl Log {
        fn txn(
            &mut self,
            (s, seq, ack): (u64, u64, u64),
            compare: Vec<Compare>,
            success: Vec<kvraft_proto::TxnOp>,
            failure: Vec<kvraft_proto::TxnOp>,
        ) -> Option<(Arc<TxnResult>, bool)> {
            let cmd = TxnCommand {
                session_id: s,
                seq,
                ack_seq: ack,
                compare,
                success,
                failure,
                read_bytes_max: 1024,
            };
            let out = self.push(20, Payload::Txn(cmd));
            out.into_iter().find_map(|o| match o {
                Outcome::Write {
                    seq: got,
                    result: Ok(WriteResult::Txn(r)),
                    duplicate,
                    ..
                } if got == seq => Some((r, duplicate)),
                _ => None,
            })
        }
        fn keys(&mut self, start: &str, end: &str, limit: usize) -> (Vec<String>, bool, Bytes) {
            let page = self
                .sm
                .range(start.as_bytes(), end.as_bytes(), limit, usize::MAX, false);
            let keys = page
                .kvs
                .iter()
                .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
                .collect();
            (keys, page.more, page.next_key)
        }
    }

    /// A compare-and-swap: applies when the version matches, fails and reads when it does not,
    /// and a retry of the same seq gets the recorded result without applying again.
    #[test]
    fn a_compare_and_swap_applies_once_and_fails_on_a_stale_version() {
        use CompareOp::Equal;
        use CompareTarget::Version;
        let mut log = Log::new();
        let s = log.register(10);
        log.put(11, s, 1, 1, "k", "a");
        let swap = |expected| {
            (
                vec![cmp("k", Version, Equal, expected, "")],
                vec![op_put("k", "b")],
                vec![op_get("k")],
            )
        };
        let (c, ok, no) = swap(1);
        let (first, dup) = log
            .txn((s, 2, 2), c.clone(), ok.clone(), no.clone())
            .unwrap();
        assert!(first.succeeded && !dup);
        assert_eq!(first.results, vec![TxnOpResult::Put { version: 2 }]);
        assert_eq!(first.revision, log.index);
        let (again, dup) = log.txn((s, 2, 2), c, ok, no).unwrap();
        assert!(dup, "a retry answers from the session");
        assert_eq!(again, first);
        assert_eq!(log.value("k"), Some(("b".into(), 2)));
        let (c, ok, no) = swap(1);
        let (stale, _) = log.txn((s, 3, 3), c, ok, no).unwrap();
        assert!(!stale.succeeded);
        match &stale.results[..] {
            [TxnOpResult::Get {
                kv: Some(v),
                value_omitted: false,
            }] => assert_eq!((&v.value[..], v.version), (&b"b"[..], 2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(log.value("k"), Some(("b".into(), 2)));
        // Version 0 means absent.
        let (c, ok, no) = (
            vec![cmp("new", Version, Equal, 0, "")],
            vec![op_put("new", "x")],
            vec![],
        );
        assert!(log.txn((s, 4, 4), c, ok, no).unwrap().0.succeeded);
    }

    /// A delete ends a key's life: its version starts again at 1 and its create revision is
    /// the revision of the put that created it anew; the key count follows.
    #[test]
    fn a_delete_resets_version_and_create_revision() {
        let mut log = Log::new();
        let s = log.register(10);
        log.put(11, s, 1, 1, "k", "a");
        log.put(12, s, 2, 2, "k", "b");
        assert_eq!(log.sm.key_count().unwrap(), 1);
        let (r, _) = log
            .txn(
                (s, 3, 3),
                vec![],
                vec![op_delete("k", b""), op_get("k")],
                vec![],
            )
            .unwrap();
        assert_eq!(
            r.results,
            vec![
                TxnOpResult::Delete {
                    deleted: 1,
                    more: false
                },
                TxnOpResult::Get {
                    kv: None,
                    value_omitted: false
                }
            ]
        );
        assert_eq!(log.value("k"), None);
        assert_eq!(log.sm.key_count().unwrap(), 0);
        let (r, _) = log
            .txn((s, 4, 4), vec![], vec![op_delete("k", b"")], vec![])
            .unwrap();
        assert_eq!(
            r.results,
            vec![TxnOpResult::Delete {
                deleted: 0,
                more: false
            }]
        );
        log.put(13, s, 5, 5, "k", "c");
        let v = log.sm.get(b"k").unwrap().unwrap();
        assert_eq!(
            (v.version, v.create_revision, v.mod_revision),
            (1, log.index, log.index)
        );
        assert_eq!(log.sm.key_count().unwrap(), 1);
    }

    /// Compares on revisions and values; a value compare on an absent key is false whatever
    /// the op; a failed compare stops at once and runs the failure branch.
    #[test]
    fn compares_on_revisions_and_values() {
        use CompareOp::*;
        use CompareTarget::*;
        let mut log = Log::new();
        let s = log.register(10);
        log.put(11, s, 1, 1, "k", "m");
        let created = log.index;
        let mut seq = 1;
        let mut holds = |log: &mut Log, c: Compare| {
            seq += 1;
            let (r, _) = log
                .txn((s, seq, seq), vec![c], vec![op_get("k")], vec![])
                .unwrap();
            r.succeeded
        };
        assert!(holds(
            &mut log,
            cmp("k", CreateRevision, Equal, created, "")
        ));
        assert!(holds(
            &mut log,
            cmp("k", ModRevision, Less, created + 1, "")
        ));
        assert!(!holds(
            &mut log,
            cmp("k", ModRevision, Greater, created, "")
        ));
        assert!(holds(&mut log, cmp("k", Value, Equal, 0, "m")));
        assert!(holds(&mut log, cmp("k", Value, Greater, 0, "a")));
        assert!(holds(&mut log, cmp("k", Value, Less, 0, "z")));
        assert!(holds(&mut log, cmp("k", Value, NotEqual, 0, "n")));
        for op in [Equal, NotEqual, Less, Greater] {
            assert!(!holds(&mut log, cmp("absent", Value, op, 0, "")));
        }
        assert!(holds(&mut log, cmp("absent", ModRevision, Equal, 0, "")));
    }

    /// Gets in a transaction return values up to the entry's read budget; past it the key's
    /// counters come without the value, the same on every replica.
    #[test]
    fn transaction_reads_stop_at_the_read_budget() {
        let mut log = Log::new();
        let s = log.register(10);
        log.put(11, s, 1, 1, "a", &"x".repeat(600));
        log.put(12, s, 2, 2, "b", &"y".repeat(600));
        let (r, _) = log
            .txn(
                (s, 3, 3),
                vec![],
                vec![op_get("a"), op_get("b"), op_get("c")],
                vec![],
            )
            .unwrap();
        match &r.results[..] {
            [TxnOpResult::Get {
                kv: Some(a),
                value_omitted: false,
            }, TxnOpResult::Get {
                kv: Some(b),
                value_omitted: true,
            }, TxnOpResult::Get { kv: None, .. }] => {
                assert_eq!(a.value.len(), 600);
                assert!(b.value.is_empty());
                assert_eq!(b.version, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    /// An entry breaking the transaction limits (from a misbehaving leader) changes nothing.
    #[test]
    fn a_transaction_past_the_limits_changes_nothing() {
        let mut log = Log::new();
        let s = log.register(10);
        let ops: Vec<_> = (0..=limits::TXN_OPS_MAX)
            .map(|i| op_put(&format!("k{i}"), "v"))
            .collect();
        let cmd = TxnCommand {
            session_id: s,
            seq: 1,
            ack_seq: 1,
            success: ops,
            ..Default::default()
        };
        let out = log.push(20, Payload::Txn(cmd));
        assert!(matches!(
            &out[..],
            [Outcome::Write {
                result: Err(PutError::Invalid),
                ..
            }]
        ));
        assert_eq!(log.sm.key_count().unwrap(), 0);
        let empty_op = TxnCommand {
            session_id: s,
            seq: 1,
            ack_seq: 1,
            success: vec![kvraft_proto::TxnOp { op: None }],
            ..Default::default()
        };
        let out = log.push(21, Payload::Txn(empty_op));
        assert!(matches!(
            &out[..],
            [Outcome::Write {
                result: Err(PutError::Invalid),
                ..
            }]
        ));
    }

    /// Range reads merge what is written to the engine with what is not yet (deletes
    /// included), in key order, page by page.
    #[test]
    fn ranges_merge_the_overlay_over_the_engine() {
        let mut log = Log::new();
        let s = log.register(10);
        let mut seq = 0;
        for k in ["a", "b", "c", "d", "e", "f"] {
            seq += 1;
            log.put(11, s, seq, seq, k, "v");
        }
        log.sm.finish_batch();
        seq += 1;
        log.txn((s, seq, seq), vec![], vec![op_delete("c", b"")], vec![]);
        seq += 1;
        log.put(12, s, seq, seq, "bb", "v");
        seq += 1;
        log.put(12, s, seq, seq, "z", "v");
        let all = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            log.keys("a", "g", 100),
            (all(&["a", "b", "bb", "d", "e", "f"]), false, Bytes::new())
        );
        assert_eq!(
            log.keys("b", "", 3),
            (all(&["b", "bb", "d"]), true, Bytes::from("e"))
        );
        assert_eq!(log.keys("e", "", 100).0, all(&["e", "f", "z"]));
        assert!(log.keys("c", "d", 10).0.is_empty(), "c is deleted");
        // A byte budget stops a page early, but never before its first key.
        let page = log.sm.range(b"a", b"", 100, 3, false);
        assert_eq!(page.kvs.len(), 1);
        assert!(page.more);
        let page = log.sm.range(b"a", b"", 100, 1_000, true);
        assert!(page.kvs.iter().all(|(_, v)| v.value.is_empty()));
        // Range deletes see both too, and an open end (one zero byte) runs to the last key.
        seq += 1;
        let (r, _) = log
            .txn((s, seq, seq), vec![], vec![op_delete("b", b"e")], vec![])
            .unwrap();
        assert_eq!(
            r.results,
            vec![TxnOpResult::Delete {
                deleted: 3,
                more: false
            }]
        );
        seq += 1;
        let (r, _) = log
            .txn((s, seq, seq), vec![], vec![op_delete("e", &[0])], vec![])
            .unwrap();
        assert_eq!(
            r.results,
            vec![TxnOpResult::Delete {
                deleted: 3,
                more: false
            }]
        );
        assert_eq!(log.keys("", "", 100).0, all(&["a"]));
        assert_eq!(log.sm.key_count().unwrap(), 1);
    }

    /// One transaction deletes at most DELETE_KEYS_PER_ENTRY_MAX keys and says more remain.
    #[test]
    fn a_range_delete_is_bounded_per_transaction() {
        let mut sm = StateMachine::new(u64::MAX / 4, 3);
        let n = DELETE_KEYS_PER_ENTRY_MAX + 5;
        let mut index = 1;
        sm.apply(&payload_entry(
            index,
            Payload::RegisterSession(RegisterSession::default()),
        ));
        for i in 0..n {
            index += 1;
            let put = PutCommand {
                session_id: 1,
                seq: i + 1,
                ack_seq: i + 1,
                key: Bytes::from(format!("k{i:06}")),
                value: Bytes::new(),
            };
            sm.apply(&payload_entry(index, Payload::Put(put)));
        }
        let mut delete = |seq: u64, index: u64| {
            let cmd = TxnCommand {
                session_id: 1,
                seq,
                ack_seq: seq,
                success: vec![op_delete("k", b"l")],
                ..Default::default()
            };
            match &sm.apply(&payload_entry(index, Payload::Txn(cmd)))[..] {
                [Outcome::Write {
                    result: Ok(WriteResult::Txn(r)),
                    ..
                }] => r.results[0].clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            delete(n + 1, index + 1),
            TxnOpResult::Delete {
                deleted: DELETE_KEYS_PER_ENTRY_MAX,
                more: true
            }
        );
        assert_eq!(
            delete(n + 2, index + 2),
            TxnOpResult::Delete {
                deleted: 5,
                more: false
            }
        );
        assert_eq!(sm.key_count().unwrap(), 0);
    }

    /// Property: random puts, deletes, range deletes, compare-and-swaps and transactions,
    /// with batches written at random points and a restart now and then, give the same
    /// answers, revisions and ranges as a plain ordered map; and a range read at any past
    /// revision the history holds, page by page, gives what the map held then (one older is
    /// refused as compacted, naming the oldest held).
    #[test]
    fn transactions_match_a_reference_map() {
        use rand::{Rng, SeedableRng};
        type Model = BTreeMap<Vec<u8>, Versioned>;
        fn model_put(m: &mut Model, k: &[u8], v: &[u8], rev: u64) -> u64 {
            let (version, create) = m
                .get(k)
                .map_or((1, rev), |o| (o.version + 1, o.create_revision));
            m.insert(
                k.to_vec(),
                Versioned {
                    value: Bytes::copy_from_slice(v),
                    version,
                    create_revision: create,
                    mod_revision: rev,
                },
            );
            version
        }
        for seed in 0..60u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let engine = MemEngine::new();
            let mut sm = StateMachine::open(Box::new(engine.clone()), u64::MAX / 4, 4).unwrap();
            // Some seeds keep a short history, so eviction moves the oldest readable revision.
            let past_revisions = if seed % 2 == 0 { 1_000 } else { 7 };
            sm.set_past_bounds(past_revisions, 1 << 20);
            let mut model = Model::new();
            // The model after each revision.
            let mut models: BTreeMap<u64, Model> = BTreeMap::from([(1, Model::new())]);
            let mut index = 1;
            sm.apply(&payload_entry(
                1,
                Payload::RegisterSession(RegisterSession::default()),
            ));
            let key = |rng: &mut rand::rngs::StdRng| format!("k{}", rng.random_range(0..8));
            for seq in 1..=150u64 {
                index += 1;
                let rev = index;
                let k = key(&mut rng);
                let payload = match rng.random_range(0..4) {
                    0 => Payload::Put(PutCommand {
                        session_id: 1,
                        seq,
                        ack_seq: seq,
                        key: Bytes::from(k.clone()),
                        value: Bytes::from(format!("v{seq}")),
                    }),
                    _ => {
                        let expected = rng.random_range(0..3);
                        let compare = if rng.random_bool(0.5) {
                            vec![cmp(
                                &k,
                                CompareTarget::Version,
                                CompareOp::Equal,
                                expected,
                                "",
                            )]
                        } else {
                            vec![]
                        };
                        let ops = |rng: &mut rand::rngs::StdRng| {
                            (0..rng.random_range(0..4))
                                .map(|i| {
                                    let k = key(rng);
                                    match rng.random_range(0..4) {
                                        0 => op_get(&k),
                                        1 => op_delete(&k, b""),
                                        2 => op_delete(&k, format!("{k}5").as_bytes()),
                                        _ => op_put(&k, &format!("t{seq}.{i}")),
                                    }
                                })
                                .collect::<Vec<_>>()
                        };
                        let (success, failure) = (ops(&mut rng), ops(&mut rng));
                        if success.is_empty() && failure.is_empty() {
                            Payload::Txn(TxnCommand {
                                session_id: 1,
                                seq,
                                ack_seq: seq,
                                success: vec![op_get(&k)],
                                read_bytes_max: 1 << 20,
                                ..Default::default()
                            })
                        } else {
                            Payload::Txn(TxnCommand {
                                session_id: 1,
                                seq,
                                ack_seq: seq,
                                compare,
                                success,
                                failure,
                                read_bytes_max: 1 << 20,
                            })
                        }
                    }
                };
                // The reference answer.
                let want = match &payload {
                    Payload::Put(p) => WriteResult::Put(PutResult {
                        version: model_put(&mut model, &p.key, &p.value, rev),
                        index: rev,
                    }),
                    Payload::Txn(t) => {
                        let succeeded = t
                            .compare
                            .iter()
                            .all(|c| model.get(&c.key[..]).map_or(0, |v| v.version) == c.number);
                        let ops = if succeeded { &t.success } else { &t.failure };
                        let results = ops
                            .iter()
                            .map(|op| match op.op.as_ref().unwrap() {
                                txn_op::Op::Put(p) => TxnOpResult::Put {
                                    version: model_put(&mut model, &p.key, &p.value, rev),
                                },
                                txn_op::Op::Get(g) => TxnOpResult::Get {
                                    kv: model.get(&g.key[..]).cloned(),
                                    value_omitted: false,
                                },
                                txn_op::Op::Delete(d) if d.range_end.is_empty() => {
                                    TxnOpResult::Delete {
                                        deleted: u64::from(model.remove(&d.key[..]).is_some()),
                                        more: false,
                                    }
                                }
                                txn_op::Op::Delete(d) => {
                                    let doomed: Vec<_> = model
                                        .range(d.key.to_vec()..d.range_end.to_vec())
                                        .map(|(k, _)| k.clone())
                                        .collect();
                                    for k in &doomed {
                                        model.remove(k);
                                    }
                                    TxnOpResult::Delete {
                                        deleted: doomed.len() as u64,
                                        more: false,
                                    }
                                }
                            })
                            .collect();
                        WriteResult::Txn(Arc::new(TxnResult {
                            succeeded,
                            revision: rev,
                            results,
                        }))
                    }
                    _ => unreachable!(),
                };
                let out = sm.apply(&payload_entry(index, payload));
                match &out[..] {
                    [Outcome::Write {
                        result: Ok(got), ..
                    }] => assert_eq!(got, &want, "seed {seed} seq {seq}"),
                    other => panic!("seed {seed} seq {seq}: {other:?}"),
                }
                if rng.random_bool(0.2) {
                    sm.finish_batch();
                }
                if rng.random_bool(0.05) {
                    // A clean restart from what the engine holds (everything, once synced).
                    sm.sync().unwrap();
                    sm = StateMachine::open(Box::new(engine.clone()), u64::MAX / 4, 4).unwrap();
                    sm.set_past_bounds(past_revisions, 1 << 20);
                }
                models.insert(rev, model.clone());
                // A read at a random past revision, a random range, page by page.
                let at = rng.random_range(1..=rev);
                let (lo, hi) = (key(&mut rng), key(&mut rng));
                let (lo, hi) = if rng.random_bool(0.3) {
                    (String::new(), String::new())
                } else {
                    (lo.clone().min(hi.clone()), lo.max(hi) + "0")
                };
                let limit = rng.random_range(1..4);
                let mut got = Vec::new();
                let mut from = lo.clone().into_bytes();
                let result = loop {
                    match sm.range_at(at, &from, hi.as_bytes(), limit, usize::MAX, false) {
                        Err(e) => break Err(e),
                        Ok(page) => {
                            assert!(page.kvs.len() <= limit);
                            got.extend(page.kvs.iter().map(|(k, v)| (k.to_vec(), v.clone())));
                            if !page.more {
                                break Ok(());
                            }
                            from = page.next_key.to_vec();
                        }
                    }
                };
                if at < sm.oldest_readable() {
                    assert_eq!(
                        result,
                        Err(PastError::Compacted {
                            revision: at,
                            oldest: sm.oldest_readable()
                        }),
                        "seed {seed} seq {seq} at {at}"
                    );
                } else {
                    result.unwrap();
                    let want: Vec<_> = models[&at]
                        .iter()
                        .filter(|(k, _)| {
                            k[..] >= *lo.as_bytes() && (hi.is_empty() || k[..] < *hi.as_bytes())
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    assert_eq!(got, want, "seed {seed} seq {seq}: range at {at} of {rev}");
                }
                let page = sm.range(b"", b"", 100, usize::MAX, false);
                let got: Vec<_> = page
                    .kvs
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.clone()))
                    .collect();
                let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(got, want, "seed {seed} seq {seq}: ranges differ");
                assert_eq!(sm.key_count().unwrap(), model.len() as u64, "seed {seed}");
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
            results: BTreeMap::from([
                (
                    1,
                    WriteResult::Put(PutResult {
                        version: 1,
                        index: 2,
                    }),
                ),
                (
                    2,
                    WriteResult::Txn(Arc::new(TxnResult {
                        succeeded: true,
                        revision: 6,
                        results: vec![
                            TxnOpResult::Put { version: 2 },
                            TxnOpResult::Delete {
                                deleted: 3,
                                more: true,
                            },
                            TxnOpResult::Get {
                                kv: None,
                                value_omitted: false,
                            },
                            TxnOpResult::Get {
                                kv: Some(Versioned {
                                    value: Bytes::from_static(b"x"),
                                    version: 1,
                                    create_revision: 4,
                                    mod_revision: 5,
                                }),
                                value_omitted: true,
                            },
                        ],
                    })),
                ),
            ]),
            pending: BTreeMap::from([
                (
                    4,
                    (
                        Request::Put {
                            key: Bytes::from_static(b"k"),
                            value: Bytes::from_static(b"v"),
                        },
                        7,
                    ),
                ),
                (
                    5,
                    (
                        Request::Txn(Arc::new(TxnCommand {
                            session_id: 9,
                            seq: 5,
                            ack_seq: 1,
                            read_bytes_max: 10,
                            ..Default::default()
                        })),
                        8,
                    ),
                ),
            ]),
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
