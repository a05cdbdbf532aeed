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
//! Invariant: an answer other than success or `NotLeader`/`TooManyPending` is impossible here
//! (sessions never expire in the simulation and the client never abandons a seq it still
//! retries), so `SessionExpired` or `Stale` for a live operation is reported as a violation.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::Rng;

use kvraft_server::replica::{ClientError, Reply};

use crate::history::{Input, OpResult, Operation, Output};

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
}

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
        seq: u64,
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
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

#[derive(Debug)]
pub struct Client {
    pub id: u32,
    servers: Vec<u32>,
    keys: Vec<String>,
    timing: ClientTiming,
    slots: Vec<Option<Op>>,
    session: Option<u64>,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
    /// Believed (term, leader); leader 0 = unknown.
    leader: (u64, u32),
    probe: usize,
    next_attempt: u64,
    attempts: BTreeMap<u64, usize>,
    values: u64,
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
            leader: (0, 0),
            probe: id as usize,
            next_attempt: 1,
            attempts: BTreeMap::new(),
            values: 0,
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
        self.issuing = true;
        self.new_op(0, now_ms, now_ns, rng, true);
        self.issuing = false;
    }

    fn start(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        if self.slots[slot].is_some() || !self.issuing {
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
        self.new_op(slot, now_ms, now_ns, rng, false);
    }

    fn new_op(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng, is_final: bool) {
        let key = self.keys[rng.random_range(0..self.keys.len())].clone();
        let kind = if is_final || rng.random_bool(0.6) {
            self.values += 1;
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.insert(seq);
            OpKind::Put {
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

    fn ack_seq(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next_seq)
    }

    fn attempt(&mut self, slot: usize, now_ms: u64, now_ns: u64, rng: &mut StdRng) {
        let ack_seq = self.ack_seq();
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
            OpKind::Put { seq, key, value } => Request::Put {
                session_id: self
                    .session
                    .expect("invariant: puts start after registration"),
                seq: *seq,
                ack_seq,
                key: key.clone(),
                value: value.clone(),
            },
            OpKind::Get { key } => Request::Get { key: key.clone() },
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
                self.session = Some(session);
                self.slots[0] = None;
                for s in 0..self.slots.len() {
                    self.start(s, now_ms, now_ns, rng);
                }
                return;
            }
            Reply::Put { result: Ok(r), .. } => {
                return self.finish(
                    slot,
                    OpResult::Ok(Output::Put(r.version)),
                    now_ns,
                    rng,
                    now_ms,
                );
            }
            Reply::Get(Ok(read)) => {
                let read = read.map(|(v, n)| (String::from_utf8_lossy(&v).into_owned(), n));
                return self.finish(slot, OpResult::Ok(Output::Get(read)), now_ns, rng, now_ms);
            }
            Reply::Registered(Err(e)) | Reply::Put { result: Err(e), .. } | Reply::Get(Err(e)) => e,
            other => {
                self.violations
                    .push(format!("client {}: unexpected reply {other:?}", self.id));
                return;
            }
        };
        let delay = match error {
            ClientError::NotLeader { leader, term } => {
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
            ClientError::TooManyPending => rng.random_range(BACKOFF_MS),
            ClientError::SessionExpired | ClientError::Stale => {
                let op = self.slots[slot].as_ref().expect("invariant: checked above");
                self.violations.push(format!(
                    "client {}: {error:?} for a live operation {:?} (sessions never expire in \
                     the simulation)",
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
            OpKind::Put { seq, key, value } => {
                self.in_flight.remove(&seq);
                Input::Put { key, value }
            }
            OpKind::Get { key } => Input::Get { key },
        };
        if op.is_final {
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
        if self.issuing {
            self.out.push(ClientAction::Timer {
                at_ms: now_ms + rng.random_range(THINK_MS),
                timer: ClientTimer::Start(slot),
            });
        }
    }
}
