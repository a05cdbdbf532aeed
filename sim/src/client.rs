//! [`Client`]: a simulated kvslib client, a pure state machine driven by the world.
//!
//! ```text
//!   Start(slot) ─▶ new op (put with a fresh seq, or get) ─▶ attempt ─▶ Send{node, attempt}
//!                                                              │  + Timer(Attempt) ─┐
//!   reply(attempt): Ok ─▶ record, Start(slot) after think time                      │
//!                   NotLeader{hint} ─▶ follow the hint, retry (same session, seq)   │
//!   Timer(Attempt) still current ─▶ forget that leader, retry on the next server ◀──┘
//!   deadline passed before an attempt ─▶ give up: result Unknown, seq finished
//! ```
//!
//! As kvslib does: one session registered through the leader; every put keeps its
//! `(session, seq)` across retries and sends a fresh `ack_seq` (the smallest seq still in flight,
//! else the next seq); a put given up on is finished from the client's view (its seq no longer
//! holds `ack_seq` back). Each slot is one sequential process of the history; a client runs up
//! to `client_slots_max` of them at once, so several of its seqs can be in flight.
//!
//! As kvslib, a client keeps at most the session window of puts unacknowledged
//! (`seq < ack_seq + window`): a slot whose put would leave it waits. When sessions can expire
//! or be evicted (some seeds), a `SessionExpired` put ends with an unknown result and the client
//! registers a new session; the final put is retried under the new session.
//!
//! Violations reported: `Stale` for a live operation (the client never abandons a seq it still
//! retries, and results at or above `ack_seq` are never evicted); `SessionExpired` in a run
//! where sessions neither expire nor are evicted; and, where they only expire, a session that
//! expired sooner than the TTL after its last applied request was issued: log time may lag real
//! time (it stops between leaders) but never runs ahead of it, whatever the servers' clocks.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::Rng;

use kvraft_checker as lc;
use kvraft_proto::{txn_op, CompareOp, CompareTarget, TxnCommand};
use kvraft_server::replica::{ClientError, Reply};
use kvraft_server::state_machine::{TxnOpResult, WriteResult};
use prost::bytes::Bytes;

use crate::history::{Input, OpResult, Operation, Output};
use crate::node::{SessionLimits, SESSIONS_UNBOUNDED, SESSION_TTL_NEVER_MS};

/// What a client asks a server.
#[derive(Clone, Debug)]
pub enum Request {
    Register {
        client_id: String,
    },
    Put {
        session_id: u64,
        seq: u64,
        ack_seq: u64,
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    /// A transaction; its session fields are set per attempt.
    Txn {
        cmd: TxnCommand,
    },
    Range {
        start: String,
        end: String,
        /// 0: the latest.
        revision: u64,
    },
}

/// The keys transactions, deletes and scans work on (puts and gets use the others): a small
/// group, so multi-key operations keep the checker's components small.
pub const TXN_KEYS: [&str; 3] = ["t0", "t1", "t2"];
/// A scan of every key in [`TXN_KEYS`].
pub const SCAN_START: &str = "t";
pub const SCAN_END: &str = "u";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTimer {
    /// Attempt `id` has had no answer for the attempt timeout.
    Attempt(u64),
    /// Slot may start its next operation.
    Start(usize),
    /// Slot retries its operation.
    Retry(usize),
}

/// What the world must do for a client.
#[derive(Clone, Debug)]
pub enum ClientAction {
    Send {
        node: u32,
        attempt: u64,
        request: Request,
    },
    Timer {
        at_ms: u64,
        timer: ClientTimer,
    },
}

#[derive(Clone, Debug)]
enum OpKind {
    Register,
    Put {
        session: u64,
        seq: u64,
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    /// `input` is the checker's form of the same transaction.
    Txn {
        session: u64,
        seq: u64,
        cmd: TxnCommand,
        input: lc::Input,
    },
    Range,
    /// A scan of the same keys as of a past revision (checked against the replay of the
    /// committed log, not in the linearizable history: it reads the past).
    PastRange {
        revision: u64,
    },
}

/// A key as a scan read it: (key, value, version).
pub type ScannedKey = (String, String, u64);

/// A scan read at a past revision: what the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastRead {
    pub client: u32,
    pub revision: u64,
    /// Ok(the revision the page says, (key, value, version)) or the refusal.
    pub result: Result<(u64, Vec<ScannedKey>), ClientError>,
}

#[derive(Clone, Debug)]
struct Op {
    kind: OpKind,
    call_ns: u64,
    deadline_ms: u64,
    /// The attempt waiting for an answer.
    attempt: Option<u64>,
    target: u32,
    is_final: bool,
}

/// Client-side timing, from the config.
#[derive(Clone, Copy, Debug)]
pub struct ClientTiming {
    pub op_timeout_ms: u64,
    pub attempt_timeout_ms: u64,
}

/// Pause after a refusal without a usable hint (ms): kvslib backs off from 20 ms.
const BACKOFF_MS: std::ops::RangeInclusive<u64> = 20..=60;
/// Pause between two operations of a slot (ms).
const THINK_MS: std::ops::RangeInclusive<u64> = 0..=40;
/// Where sessions expire, a pause is now and then this long instead (ms), so some do.
const IDLE_MS: std::ops::RangeInclusive<u64> = 200..=2_000;
const IDLE_PERMILLE: u32 = 30;
/// A slot whose put would leave the session window tries again after this long (ms).
const WINDOW_WAIT_MS: std::ops::RangeInclusive<u64> = 5..=20;

#[derive(Debug)]
pub struct Client {
    pub id: u32,
    servers: Vec<u32>,
    keys: Vec<String>,
    timing: ClientTiming,
    slots: Vec<Option<Op>>,
    session: Option<u64>,
    next_seq: u64,
    /// (session, seq) of every put in flight, old sessions' included.
    in_flight: BTreeSet<(u64, u64)>,
    limits: SessionLimits,
    /// Call time (ms) of the latest request the current session applied (registration or put).
    session_active_ms: u64,
    /// The final put met an expired session: it runs again once a new session exists.
    final_pending: bool,
    /// Believed (term, leader); leader 0 = unknown.
    leader: (u64, u32),
    probe: usize,
    next_attempt: u64,
    attempts: BTreeMap<u64, usize>,
    values: u64,
    /// The last version this client saw of each transaction key (what its compare-and-swaps
    /// expect).
    seen: BTreeMap<String, u64>,
    /// The highest revision an answer named (a past scan reads at or below it).
    revision_seen: u64,
    /// Past scans answered, for the world to check.
    pub past_reads: Vec<PastRead>,
    /// New operations are started only while this is set.
    pub issuing: bool,
    pub out: Vec<ClientAction>,
    pub done: Vec<Operation>,
    pub violations: Vec<String>,
    /// Result of the final put: `Some(true)` once it succeeded.
    pub final_ok: Option<bool>,
}

impl Client {
    pub fn new(
        id: u32,
        servers: Vec<u32>,
        keys: Vec<String>,
        timing: ClientTiming,
        slots: usize,
        limits: SessionLimits,
    ) -> Client {
        Client {
            id,
            servers,
            keys,
            timing,
            slots: vec![None; slots],
            session: None,
            next_seq: 1,
            in_flight: BTreeSet::new(),
            limits,
            session_active_ms: 0,
            final_pending: false,
            leader: (0, 0),
            probe: id as usize,
            next_attempt: 1,
            attempts: BTreeMap::new(),
            values: 0,
            seen: BTreeMap::new(),
            revision_seen: 0,
            past_reads: Vec::new(),
            issuing: true,
            out: Vec::new(),
            done: Vec::new(),
            violations: Vec::new(),
            final_ok: None,
        }
    }

    /// Schedules every slot's first start.
    pub fn boot(&mut self, now_ms: u64, rng: &mut StdRng) {
        for slot in 0..self.slots.len() {
            let at_ms = now_ms + rng.random_range(THINK_MS);
            self.out.push(ClientAction::Timer {
                at_ms,
                timer: ClientTimer::Start(slot),
            });
        }
    }

    pub fn idle(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The coord published a view.
    pub fn on_view(&mut self, term: u64, leader: u32) {
        if term > self.leader.0 || (term == self.leader.0 && leader != 0) {
            self.leader = (term, leader);
        }
    }

    pub fn on_timer(&mut self, timer: ClientTimer, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        match timer {
            ClientTimer::Start(slot) => self.start(slot, now_ms, now_ns, rng),
            ClientTimer::Retry(slot) => self.attempt(slot, now_ms, now_ns, rng),
            ClientTimer::Attempt(id) => {
                let Some(slot) = self.attempts.remove(&id) else {
                    return;
                };
                let Some(op) = self.slots[slot].as_mut() else {
                    return;
                };
                op.attempt = None;
                if self.leader.1 == op.target {
                    self.leader.1 = 0;
                }
                self.attempt(slot, now_ms, now_ns, rng);
            }
        }
    }

    /// Starts the final put on slot 0 (every slot must be idle).
    pub fn start_final(&mut self, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        assert!(self.idle(), "invariant: the final put runs alone");
        self.final_pending = true;
        self.issuing = true;
        self.start(0, now_ms, now_ns, rng);
        self.issuing = false;
    }

    fn start(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        if self.slots[slot].is_some() || !(self.issuing || self.final_pending) {
            return;
        }
        if self.session.is_none() {
            if slot == 0 {
                self.slots[0] = Some(Op {
                    kind: OpKind::Register,
                    call_ns: now_ns,
                    deadline_ms: u64::MAX,
                    attempt: None,
                    target: 0,
                    is_final: false,
                });
                self.attempt(0, now_ms, now_ns, rng);
            }
            // Other slots are started once the session exists.
            return;
        }
        if self.final_pending {
            if slot == 0 {
                self.final_pending = false;
                self.new_op(0, now_ms, now_ns, rng, true, true);
            }
            return;
        }
        let kind = rng.random_range(0..100u32);
        let put = kind < 45;
        let txn = (45..70).contains(&kind);
        let range = (70..78).contains(&kind);
        let session = self.session.expect("invariant: checked above");
        if (put || txn) && self.next_seq >= self.ack_seq(session) + self.limits.window {
            // The session window is full (an older put is still unanswered): wait, as kvslib.
            let at_ms = now_ms + rng.random_range(WINDOW_WAIT_MS);
            self.out.push(ClientAction::Timer {
                at_ms,
                timer: ClientTimer::Start(slot),
            });
            return;
        }
        if txn {
            return self.new_txn(slot, now_ms, now_ns, rng);
        }
        if range {
            // Half the scans read the past, up to 30 revisions before the latest seen.
            let kind = if self.revision_seen > 0 && rng.random_bool(0.5) {
                let back = rng.random_range(0..=30u64);
                OpKind::PastRange {
                    revision: self.revision_seen.saturating_sub(back).max(1),
                }
            } else {
                OpKind::Range
            };
            self.slots[slot] = Some(Op {
                kind,
                call_ns: now_ns,
                deadline_ms: now_ms + self.timing.op_timeout_ms,
                attempt: None,
                target: 0,
                is_final: false,
            });
            return self.attempt(slot, now_ms, now_ns, rng);
        }
        self.new_op(slot, now_ms, now_ns, rng, put, false);
    }

    /// Starts a transaction on [`TXN_KEYS`]: a compare-and-swap from the version this client
    /// last saw, a conditional delete, a delete, or a write of two keys at once with a read.
    fn new_txn(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        let pick = |rng: &mut StdRng| TXN_KEYS[rng.random_range(0..TXN_KEYS.len())].to_string();
        let key = pick(rng);
        let expected = self.seen.get(&key).copied().unwrap_or(0);
        let mut value = || {
            self.values += 1;
            format!("c{}.{}", self.id, self.values)
        };
        let version_is = |key: &str, v: u64| lc::Compare {
            key: key.as_bytes().to_vec(),
            target: lc::CompareTarget::Version(v),
            op: lc::CompareOp::Equal,
        };
        let put = |key: &str, value: String| lc::TxnOp::Put {
            key: key.as_bytes().to_vec(),
            value: value.into_bytes(),
        };
        let get = |key: &str| lc::TxnOp::Get {
            key: key.as_bytes().to_vec(),
        };
        let delete = |key: &str| lc::TxnOp::Delete {
            key: key.as_bytes().to_vec(),
        };
        let (compares, success, failure) = match rng.random_range(0..10u32) {
            0..=4 => (
                vec![version_is(&key, expected)],
                vec![put(&key, value())],
                vec![get(&key)],
            ),
            5 => (vec![version_is(&key, expected)], vec![delete(&key)], vec![]),
            6 => (vec![], vec![delete(&key)], vec![]),
            _ => {
                let other = pick(rng);
                let (a, b) = (value(), value());
                (
                    vec![],
                    vec![put(&key, a), put(&other, b), get(&key), get(&other)],
                    vec![],
                )
            }
        };
        let session = self
            .session
            .expect("invariant: txns start after registration");
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert((session, seq));
        let cmd = txn_command(&compares, &success, &failure);
        let input = lc::Input::Txn {
            compares,
            success,
            failure,
        };
        self.slots[slot] = Some(Op {
            kind: OpKind::Txn {
                session,
                seq,
                cmd,
                input,
            },
            call_ns: now_ns,
            deadline_ms: now_ms + self.timing.op_timeout_ms,
            attempt: None,
            target: 0,
            is_final: false,
        });
        self.attempt(slot, now_ms, now_ns, rng);
    }

    /// Starts a put (`put`, always for the final one) or a get on `slot`.
    fn new_op(
        &mut self,
        slot: usize,
        now_ms: u64,
        now_ns: u64,
        rng: &mut StdRng,
        put: bool,
        is_final: bool,
    ) {
        let key = self.keys[rng.random_range(0..self.keys.len())].clone();
        let kind = if put || is_final {
            self.values += 1;
            let session = self
                .session
                .expect("invariant: puts start after registration");
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.insert((session, seq));
            OpKind::Put {
                session,
                seq,
                key,
                value: format!("c{}.{}", self.id, self.values),
            }
        } else {
            OpKind::Get { key }
        };
        self.slots[slot] = Some(Op {
            kind,
            call_ns: now_ns,
            deadline_ms: now_ms + self.timing.op_timeout_ms,
            attempt: None,
            target: 0,
            is_final,
        });
        self.attempt(slot, now_ms, now_ns, rng);
    }

    /// The smallest seq of `session` still in flight, else (the current session) the next seq.
    fn ack_seq(&self, session: u64) -> u64 {
        self.in_flight
            .range((session, 0)..=(session, u64::MAX))
            .next()
            .map_or(self.next_seq, |&(_, seq)| seq)
    }

    fn attempt(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        let ack_seq = match self.slots[slot].as_ref().map(|op| &op.kind) {
            Some(OpKind::Put { session, .. } | OpKind::Txn { session, .. }) => {
                self.ack_seq(*session)
            }
            _ => 0,
        };
        let Some(op) = self.slots[slot].as_mut() else {
            return;
        };
        if op.attempt.is_some() {
            return; // a duplicate retry timer
        }
        if now_ms >= op.deadline_ms {
            self.finish(slot, OpResult::Unknown, now_ns, rng, now_ms);
            return;
        }
        let target = if self.leader.1 != 0 {
            self.leader.1
        } else {
            self.probe += 1;
            self.servers[self.probe % self.servers.len()]
        };
        let id = self.next_attempt;
        self.next_attempt += 1;
        op.attempt = Some(id);
        op.target = target;
        let request = match &op.kind {
            OpKind::Register => Request::Register {
                client_id: format!("client{}", self.id),
            },
            OpKind::Put {
                session,
                seq,
                key,
                value,
            } => Request::Put {
                session_id: *session,
                seq: *seq,
                ack_seq,
                key: key.clone(),
                value: value.clone(),
            },
            OpKind::Get { key } => Request::Get { key: key.clone() },
            OpKind::Txn {
                session, seq, cmd, ..
            } => Request::Txn {
                cmd: TxnCommand {
                    session_id: *session,
                    seq: *seq,
                    ack_seq,
                    ..cmd.clone()
                },
            },
            OpKind::Range => Request::Range {
                start: SCAN_START.to_string(),
                end: SCAN_END.to_string(),
                revision: 0,
            },
            OpKind::PastRange { revision } => Request::Range {
                start: SCAN_START.to_string(),
                end: SCAN_END.to_string(),
                revision: *revision,
            },
        };
        self.attempts.insert(id, slot);
        self.out.push(ClientAction::Send {
            node: target,
            attempt: id,
            request,
        });
        let at_ms = now_ms + self.timing.attempt_timeout_ms;
        self.out.push(ClientAction::Timer {
            at_ms,
            timer: ClientTimer::Attempt(id),
        });
    }

    /// A server answered attempt `id`.
    pub fn on_reply(&mut self, id: u64, reply: Reply, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        let Some(slot) = self.attempts.remove(&id) else {
            return; // an answer to an attempt already timed out, or a duplicate
        };
        let Some(op) = self.slots[slot].as_mut() else {
            return;
        };
        op.attempt = None;
        let target = op.target;
        let error = match reply {
            Reply::Registered(Ok(session)) => {
                let op = self.slots[0]
                    .take()
                    .expect("invariant: registering on slot 0");
                self.session = Some(session);
                self.next_seq = 1;
                self.session_active_ms = op.call_ns / 1_000_000;
                for s in 0..self.slots.len() {
                    self.start(s, now_ms, now_ns, rng);
                }
                return;
            }
            Reply::Write {
                result: Ok(WriteResult::Txn(r)),
                ..
            } => {
                let op = self.slots[slot].as_ref().expect("invariant: checked above");
                if let OpKind::Txn { session, .. } = op.kind {
                    if Some(session) == self.session {
                        let call_ms = op.call_ns / 1_000_000;
                        self.session_active_ms = self.session_active_ms.max(call_ms);
                    }
                }
                self.revision_seen = self.revision_seen.max(r.revision);
                let output = self.txn_output(slot, &r.results, r.succeeded);
                return self.finish(slot, OpResult::Ok(output), now_ns, rng, now_ms);
            }
            Reply::Range(Ok((page, revision))) => {
                let op = self.slots[slot].as_ref().expect("invariant: checked above");
                if let OpKind::PastRange { revision: asked } = op.kind {
                    let kvs = page
                        .kvs
                        .iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(&v.value).into_owned(),
                                v.version,
                            )
                        })
                        .collect();
                    self.past_reads.push(PastRead {
                        client: self.id,
                        revision: asked,
                        result: Ok((revision, kvs)),
                    });
                    return self.finish(slot, OpResult::Unknown, now_ns, rng, now_ms);
                }
                self.revision_seen = self.revision_seen.max(revision);
                let mut kvs = Vec::with_capacity(page.kvs.len());
                for (key, v) in page.kvs {
                    let key = String::from_utf8_lossy(&key).into_owned();
                    self.seen.insert(key.clone(), v.version);
                    let read = lc::ReadValue {
                        value: v.value.to_vec(),
                        version: Some(v.version),
                    };
                    kvs.push((key.into_bytes(), read));
                }
                for key in TXN_KEYS {
                    if !kvs.iter().any(|(k, _)| k == key.as_bytes()) {
                        self.seen.insert(key.to_string(), 0);
                    }
                }
                let output = Output::Checker(lc::Output::Scan(kvs));
                return self.finish(slot, OpResult::Ok(output), now_ns, rng, now_ms);
            }
            Reply::Write {
                result: Ok(WriteResult::Put(r)),
                ..
            } => {
                let op = self.slots[slot].as_ref().expect("invariant: checked above");
                if let OpKind::Put { session, .. } = op.kind {
                    if Some(session) == self.session {
                        let call_ms = op.call_ns / 1_000_000;
                        self.session_active_ms = self.session_active_ms.max(call_ms);
                    }
                }
                self.revision_seen = self.revision_seen.max(r.index);
                return self.finish(
                    slot,
                    OpResult::Ok(Output::Put(r.version)),
                    now_ns,
                    rng,
                    now_ms,
                );
            }
            Reply::Get(Ok(read)) => {
                let read = read
                    .value
                    .map(|v| (String::from_utf8_lossy(&v.value).into_owned(), v.version));
                return self.finish(slot, OpResult::Ok(Output::Get(read)), now_ns, rng, now_ms);
            }
            Reply::Range(Err(e @ ClientError::Compacted(_)))
                if matches!(
                    self.slots[slot].as_ref().map(|o| &o.kind),
                    Some(OpKind::PastRange { .. })
                ) =>
            {
                let Some(Op {
                    kind: OpKind::PastRange { revision },
                    ..
                }) = self.slots[slot]
                else {
                    unreachable!("invariant: matched above");
                };
                self.past_reads.push(PastRead {
                    client: self.id,
                    revision,
                    result: Err(e),
                });
                return self.finish(slot, OpResult::Unknown, now_ns, rng, now_ms);
            }
            Reply::Registered(Err(e))
            | Reply::Write { result: Err(e), .. }
            | Reply::Get(Err(e))
            | Reply::Range(Err(e)) => e,
            other => {
                self.violations
                    .push(format!("client {}: unexpected reply {other:?}", self.id));
                return;
            }
        };
        let delay = match error {
            ClientError::NotLeader { leader, term } => {
                let term = term.0;
                if term > self.leader.0 || (term == self.leader.0 && self.leader.1 == 0) {
                    self.leader = (term, leader.0);
                }
                if self.leader.1 == target {
                    self.leader.1 = 0;
                }
                if self.leader.1 != 0 {
                    0
                } else {
                    rng.random_range(BACKOFF_MS)
                }
            }
            ClientError::Unavailable(_) | ClientError::Compacted(_) => rng.random_range(BACKOFF_MS),
            ClientError::SessionExpired => return self.session_expired(slot, now_ms, now_ns, rng),
            ClientError::Stale | ClientError::Invalid(_) => {
                let op = self.slots[slot].as_ref().expect("invariant: checked above");
                self.violations.push(format!(
                    "client {}: {error:?} for a live operation {:?} (a live seq is never \
                     abandoned nor its result evicted, and the client sends valid requests)",
                    self.id, op.kind
                ));
                return self.finish(slot, OpResult::Unknown, now_ns, rng, now_ms);
            }
        };
        self.out.push(ClientAction::Timer {
            at_ms: now_ms + delay,
            timer: ClientTimer::Retry(slot),
        });
    }

    /// A put's session is gone: its result is unknown (it may have applied before), and the
    /// client registers a new session. Checks that the expiry was possible at all.
    fn session_expired(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        let op = self.slots[slot].as_ref().expect("invariant: a running op");
        let (OpKind::Put { session, .. } | OpKind::Txn { session, .. }) = op.kind else {
            self.violations.push(format!(
                "client {}: SessionExpired for {:?}",
                self.id, op.kind
            ));
            return;
        };
        let (ttl_ms, evicts) = (
            self.limits.ttl_ms,
            self.limits.sessions_max != SESSIONS_UNBOUNDED,
        );
        if ttl_ms == SESSION_TTL_NEVER_MS && !evicts {
            self.violations.push(format!(
                "client {}: SessionExpired for {:?} in a run whose sessions never expire",
                self.id, op.kind
            ));
        } else if !evicts
            && Some(session) == self.session
            && now_ms < self.session_active_ms + ttl_ms
        {
            self.violations.push(format!(
                "client {}: session {session} expired at {now_ms} ms, though a request it applied \
                 was issued at {} ms and the ttl is {ttl_ms} ms (log time ran ahead of real time)",
                self.id, self.session_active_ms
            ));
        }
        if Some(session) == self.session {
            self.session = None;
        }
        if op.is_final {
            self.final_pending = true;
        }
        self.finish(slot, OpResult::Unknown, now_ns, rng, now_ms);
        if self.final_pending && self.idle() {
            self.start(0, now_ms, now_ns, rng);
        }
    }

    fn finish(
        &mut self,
        slot: usize,
        result: OpResult,
        now_ns: u64,
        rng: &mut StdRng,
        now_ms: u64,
    ) {
        let op = self.slots[slot]
            .take()
            .expect("invariant: finishing a running op");
        if let Some(a) = op.attempt {
            self.attempts.remove(&a);
        }
        let input = match op.kind {
            OpKind::Register => return,
            OpKind::Put {
                session,
                seq,
                key,
                value,
            } => {
                self.in_flight.remove(&(session, seq));
                Input::Put { key, value }
            }
            OpKind::Get { key } => Input::Get { key },
            OpKind::Txn {
                session,
                seq,
                input,
                ..
            } => {
                self.in_flight.remove(&(session, seq));
                Input::Checker(input)
            }
            OpKind::Range => Input::Checker(lc::Input::Scan {
                start: SCAN_START.as_bytes().to_vec(),
                end: SCAN_END.as_bytes().to_vec(),
            }),
            // Checked by the world against the replay, whatever became of it.
            OpKind::PastRange { .. } => {
                return self.start_after_think(slot, rng, now_ms);
            }
        };
        if op.is_final && !self.final_pending {
            self.final_ok = Some(matches!(result, OpResult::Ok(_)));
        }
        let return_ns = if result == OpResult::Unknown {
            u64::MAX
        } else {
            now_ns
        };
        self.done.push(Operation {
            client: self.id * 16 + slot as u32,
            input,
            call_ns: op.call_ns,
            result,
            return_ns,
        });
        self.start_after_think(slot, rng, now_ms);
    }

    /// Starts the slot's next operation after a pause, while issuing.
    fn start_after_think(&mut self, slot: usize, rng: &mut StdRng, now_ms: u64) {
        if self.issuing {
            let idle = self.limits.ttl_ms != SESSION_TTL_NEVER_MS
                && crate::network::chance(rng, IDLE_PERMILLE);
            let pause = if idle { IDLE_MS } else { THINK_MS };
            self.out.push(ClientAction::Timer {
                at_ms: now_ms + rng.random_range(pause),
                timer: ClientTimer::Start(slot),
            });
        }
    }
}

impl Client {
    /// The checker's form of a transaction's answer, noting the versions it saw.
    fn txn_output(&mut self, slot: usize, results: &[TxnOpResult], succeeded: bool) -> Output {
        let op = self.slots[slot].as_ref().expect("invariant: a running op");
        let OpKind::Txn { input, .. } = &op.kind else {
            unreachable!("invariant: a transaction's answer comes to a transaction");
        };
        let lc::Input::Txn {
            success, failure, ..
        } = input
        else {
            unreachable!("invariant: a transaction op holds a transaction input");
        };
        let ops = if succeeded { success } else { failure };
        let mut outputs = Vec::with_capacity(results.len());
        let mut seen = Vec::new();
        for (op, result) in ops.iter().zip(results) {
            outputs.push(match result {
                TxnOpResult::Put { version } => {
                    if let lc::TxnOp::Put { key, .. } = op {
                        seen.push((key.clone(), *version));
                    }
                    lc::TxnOpOutput::Put {
                        version: Some(*version),
                    }
                }
                TxnOpResult::Delete { deleted, .. } => {
                    if let lc::TxnOp::Delete { key } = op {
                        seen.push((key.clone(), 0));
                    }
                    lc::TxnOpOutput::Delete {
                        existed: *deleted > 0,
                    }
                }
                TxnOpResult::Get { kv, .. } => {
                    if let lc::TxnOp::Get { key } = op {
                        seen.push((key.clone(), kv.as_ref().map_or(0, |v| v.version)));
                    }
                    lc::TxnOpOutput::Get(kv.as_ref().map(|v| lc::ReadValue {
                        value: v.value.to_vec(),
                        version: Some(v.version),
                    }))
                }
            });
        }
        for (key, version) in seen {
            self.seen
                .insert(String::from_utf8_lossy(&key).into_owned(), version);
        }
        Output::Checker(lc::Output::Txn {
            succeeded,
            results: outputs,
        })
    }
}

/// The server's form of a transaction (session fields left for each attempt).
fn txn_command(
    compares: &[lc::Compare],
    success: &[lc::TxnOp],
    failure: &[lc::TxnOp],
) -> TxnCommand {
    let compare = compares
        .iter()
        .map(|c| {
            let (target, number, value) = match &c.target {
                lc::CompareTarget::Version(v) => (CompareTarget::Version, *v, Vec::new()),
                lc::CompareTarget::Value(v) => (CompareTarget::Value, 0, v.clone()),
            };
            let op = match c.op {
                lc::CompareOp::Equal => CompareOp::Equal,
                lc::CompareOp::NotEqual => CompareOp::NotEqual,
                lc::CompareOp::Less => CompareOp::Less,
                lc::CompareOp::Greater => CompareOp::Greater,
            };
            kvraft_proto::Compare {
                key: Bytes::from(c.key.clone()),
                target: target as i32,
                op: op as i32,
                number,
                value: Bytes::from(value),
            }
        })
        .collect();
    let ops = |ops: &[lc::TxnOp]| -> Vec<kvraft_proto::TxnOp> {
        ops.iter()
            .map(|op| {
                let op = match op {
                    lc::TxnOp::Put { key, value } => txn_op::Op::Put(kvraft_proto::TxnPut {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(value.clone()),
                    }),
                    lc::TxnOp::Delete { key } => txn_op::Op::Delete(kvraft_proto::TxnDelete {
                        key: Bytes::from(key.clone()),
                        range_end: Bytes::new(),
                    }),
                    lc::TxnOp::Get { key } => txn_op::Op::Get(kvraft_proto::TxnGet {
                        key: Bytes::from(key.clone()),
                    }),
                };
                kvraft_proto::TxnOp { op: Some(op) }
            })
            .collect()
    };
    TxnCommand {
        compare,
        success: ops(success),
        failure: ops(failure),
        ..Default::default()
    }
}
