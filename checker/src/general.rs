//! The exact search of a component that is not a single key of puts and gets: a group of keys
//! joined by multi-key txns and scans, or one key with deletes or txns.
//!
//! The object is the registers of the component's keys (values interned, so a state is a short
//! vector of (value id, version) pairs). Every operation is a step of that model: a put bumps
//! the key's version, a delete resets it to absent at version 0, a txn evaluates its compares
//! and runs one branch in order (each op seeing the earlier ones), a scan lists the present
//! keys of its range in key order. Versions are always tracked here (compares read them);
//! an output without a version just does not compare it.
//!
//! The search is Wing & Gong's depth-first search over sets of linearized operations: an
//! operation may go next when it was called no later than the earliest return among the
//! completed operations still pending; unknown writes have no return and may go any time after
//! their call, or never. Lowe's memoization caches (set of linearized operations as a 128-bit
//! Zobrist fingerprint, state) pairs already explored. None of the put/get shortcuts of
//! `model`/`search` apply here (no unread-put ranking, no version inference, no
//! renumbering): each is unsound once deletes reset versions or txns read several keys.
//!
//! Shrinking removes only operations that change nothing in any linearization (gets, scans,
//! txns whose branch taken has no put or delete): a linearization of the whole minus such an
//! operation is one of the rest, so a failing piece proves the whole fails.
//!
//! Invariant: `Violation` only after a completed exhaustive search (up to fingerprint
//! collisions, as in `search`).

use crate::history::{
    in_range, CompareOp, CompareTarget, Input, OpResult, Operation, Output, ReadValue, Shown,
    TxnOp, TxnOpOutput,
};
use crate::search::mix;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::Instant;

/// Memory the cache may use before the search gives up (as in `search`).
const CACHE_BYTES_MAX: usize = 512 << 20;

const STEPS_PER_CLOCK_CHECK: u64 = 1 << 10;

/// Operations of the longest consistent order quoted in an explanation.
const EXPLAINED_ORDER_MAX: usize = 6;

type ValueId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Register {
    value: Option<ValueId>,
    version: u64,
}

const ABSENT: Register = Register {
    value: None,
    version: 0,
};

/// A txn branch's op, keys as indices into the component's keys.
#[derive(Clone, Debug)]
enum BranchOp {
    Put { key: usize, value: ValueId },
    Delete { key: usize },
    Get { key: usize },
}

#[derive(Clone, Debug)]
struct Cmp {
    key: usize,
    target: CompareTarget,
    op: CompareOp,
}

#[derive(Clone, Debug)]
enum Kind {
    Put {
        key: usize,
        value: ValueId,
    },
    Get {
        key: usize,
    },
    Delete {
        key: usize,
    },
    Txn {
        compares: Vec<Cmp>,
        success: Vec<BranchOp>,
        failure: Vec<BranchOp>,
    },
    /// The component's keys in the range, in key order.
    Scan {
        keys: Vec<usize>,
    },
}

type Read = Option<(ValueId, Option<u64>)>;

#[derive(Clone, Debug)]
enum BranchOut {
    Put(Option<u64>),
    Delete(bool),
    Get(Read),
}

/// The output an operation must explain.
#[derive(Clone, Debug)]
enum Out {
    Put(Option<u64>),
    Get(Read),
    Delete(bool),
    Txn {
        succeeded: bool,
        results: Vec<BranchOut>,
    },
    /// (key index, value, version); a key outside the component or out of order never matches.
    Scan(Vec<(Option<usize>, ValueId, Option<u64>)>),
}

#[derive(Clone, Debug)]
struct GeneralOp {
    kind: Kind,
    /// `None`: an unknown write, which may take effect any time after its call, or never.
    out: Option<Out>,
    call_ns: u64,
    return_ns: Option<u64>,
    source: usize,
}

/// A component prepared for the search.
#[derive(Clone, Debug)]
pub(crate) struct Component {
    pub keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
    /// Sorted by call time.
    ops: Vec<GeneralOp>,
}

pub(crate) enum Outcome {
    Linearizable,
    Violation(Option<DeadEnd>),
    Exhausted(String),
}

pub(crate) struct DeadEnd {
    depth: usize,
    tail: Vec<usize>,
    state: Vec<Register>,
    blocked: usize,
}

impl Component {
    /// Prepares the operations `indices` of `history` (well formed, none failed, no unknown
    /// read-only ones), over `keys` (sorted; every key they name or a scan of them returns).
    pub fn build(history: &[Operation], indices: &[usize], keys: Vec<Vec<u8>>) -> Component {
        let mut builder = Builder {
            key_ids: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i))
                .collect(),
            keys,
            ids: HashMap::new(),
            values: Vec::new(),
        };
        let mut ops: Vec<GeneralOp> = indices
            .iter()
            .map(|&index| builder.op(index, &history[index]))
            .collect();
        ops.sort_by_key(|op| (op.call_ns, op.source));
        Component {
            keys: builder.keys,
            values: builder.values,
            ops,
        }
    }

    fn subset(&self, keep: &[bool]) -> Component {
        Component {
            keys: self.keys.clone(),
            values: self.values.clone(),
            ops: (self.ops.iter().zip(keep))
                .filter(|(_, &k)| k)
                .map(|(op, _)| op.clone())
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn sources(&self) -> Vec<usize> {
        self.ops.iter().map(|op| op.source).collect()
    }

    /// Applies `op` to `state` if its output is possible from there; whether it is.
    fn step(&self, state: &mut [Register], op: &GeneralOp) -> bool {
        match (&op.kind, &op.out) {
            (&Kind::Put { key, value }, out) => {
                let version = state[key].version + 1;
                state[key] = Register {
                    value: Some(value),
                    version,
                };
                match out {
                    Some(Out::Put(expected)) => version_ok(*expected, version),
                    _ => out.is_none(),
                }
            }
            (&Kind::Get { key }, Some(Out::Get(read))) => read_ok(state[key], read),
            (&Kind::Delete { key }, out) => {
                let existed = state[key].value.is_some();
                state[key] = ABSENT;
                match out {
                    Some(Out::Delete(expected)) => *expected == existed,
                    _ => out.is_none(),
                }
            }
            (
                Kind::Txn {
                    compares,
                    success,
                    failure,
                },
                out,
            ) => {
                let holds = compares.iter().all(|c| self.compare(state[c.key], c));
                let branch = if holds { success } else { failure };
                match out {
                    None => {
                        branch.iter().for_each(|op| {
                            apply_branch_op(state, op);
                        });
                        true
                    }
                    Some(Out::Txn { succeeded, results }) => {
                        *succeeded == holds
                            && branch.len() == results.len()
                            && branch.iter().zip(results).all(|(op, expected)| {
                                branch_out_ok(&apply_branch_op(state, op), expected)
                            })
                    }
                    Some(_) => false,
                }
            }
            (Kind::Scan { keys }, Some(Out::Scan(entries))) => {
                let mut present = keys.iter().filter(|&&k| state[k].value.is_some());
                let all_match = entries.iter().all(|&(key, value, version)| {
                    present.next().is_some_and(|&k| {
                        key == Some(k) && read_ok(state[k], &Some((value, version)))
                    })
                });
                all_match && present.next().is_none()
            }
            (Kind::Get { .. } | Kind::Scan { .. }, _) => false,
        }
    }

    fn compare(&self, register: Register, compare: &Cmp) -> bool {
        let ordering = match &compare.target {
            CompareTarget::Version(v) => register.version.cmp(v),
            CompareTarget::Value(v) => match register.value {
                None => return false,
                Some(id) => self.values[id as usize].as_slice().cmp(v.as_slice()),
            },
        };
        match compare.op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Less => ordering.is_lt(),
            CompareOp::Greater => ordering.is_gt(),
        }
    }

    fn show<'a>(&'a self, state: &'a [Register]) -> impl fmt::Display + 'a {
        ShowState {
            component: self,
            state,
        }
    }
}

fn version_ok(expected: Option<u64>, model: u64) -> bool {
    expected.is_none_or(|v| v == model)
}

fn read_ok(register: Register, read: &Read) -> bool {
    match read {
        None => register.value.is_none(),
        Some((value, version)) => {
            register.value == Some(*value) && version_ok(*version, register.version)
        }
    }
}

/// Applies a branch op; what it would answer (as a model output).
fn apply_branch_op(state: &mut [Register], op: &BranchOp) -> ModelOut {
    match *op {
        BranchOp::Put { key, value } => {
            let version = state[key].version + 1;
            state[key] = Register {
                value: Some(value),
                version,
            };
            ModelOut::Put(version)
        }
        BranchOp::Delete { key } => {
            let existed = state[key].value.is_some();
            state[key] = ABSENT;
            ModelOut::Delete(existed)
        }
        BranchOp::Get { key } => ModelOut::Get(state[key]),
    }
}

enum ModelOut {
    Put(u64),
    Delete(bool),
    Get(Register),
}

fn branch_out_ok(model: &ModelOut, expected: &BranchOut) -> bool {
    match (model, expected) {
        (ModelOut::Put(v), BranchOut::Put(expected)) => version_ok(*expected, *v),
        (ModelOut::Delete(existed), BranchOut::Delete(expected)) => existed == expected,
        (ModelOut::Get(register), BranchOut::Get(read)) => read_ok(*register, read),
        _ => false,
    }
}

struct ShowState<'a> {
    component: &'a Component,
    state: &'a [Register],
}

/// `{"a": "1" (version 2), "b": absent}`.
impl fmt::Display for ShowState<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, (key, register)) in self.component.keys.iter().zip(self.state).enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match register.value {
                None => write!(f, "{sep}{}: absent", Shown(key))?,
                Some(id) => write!(
                    f,
                    "{sep}{}: {} (version {})",
                    Shown(key),
                    Shown(&self.component.values[id as usize]),
                    register.version
                )?,
            }
        }
        write!(f, "}}")
    }
}

struct Builder {
    keys: Vec<Vec<u8>>,
    key_ids: HashMap<Vec<u8>, usize>,
    ids: HashMap<Vec<u8>, ValueId>,
    values: Vec<Vec<u8>>,
}

impl Builder {
    fn key(&self, key: &[u8]) -> usize {
        self.key_ids[key]
    }

    fn intern(&mut self, value: &[u8]) -> ValueId {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = ValueId::try_from(self.values.len())
            .expect("invariant: fewer than 2^32 values per component");
        self.ids.insert(value.to_vec(), id);
        self.values.push(value.to_vec());
        id
    }

    fn read(&mut self, read: &Option<ReadValue>) -> Read {
        read.as_ref()
            .map(|read| (self.intern(&read.value), read.version))
    }

    fn branch(&mut self, ops: &[TxnOp]) -> Vec<BranchOp> {
        ops.iter()
            .map(|op| match op {
                TxnOp::Put { key, value } => BranchOp::Put {
                    key: self.key(key),
                    value: self.intern(value),
                },
                TxnOp::Delete { key } => BranchOp::Delete { key: self.key(key) },
                TxnOp::Get { key } => BranchOp::Get { key: self.key(key) },
            })
            .collect()
    }

    fn op(&mut self, source: usize, op: &Operation) -> GeneralOp {
        let kind = match &op.input {
            Input::Put { key, value } => Kind::Put {
                key: self.key(key),
                value: self.intern(value),
            },
            Input::Get { key } => Kind::Get { key: self.key(key) },
            Input::Delete { key } => Kind::Delete { key: self.key(key) },
            Input::Txn {
                compares,
                success,
                failure,
            } => Kind::Txn {
                compares: compares
                    .iter()
                    .map(|c| Cmp {
                        key: self.key(&c.key),
                        target: c.target.clone(),
                        op: c.op,
                    })
                    .collect(),
                success: self.branch(success),
                failure: self.branch(failure),
            },
            Input::Scan { start, end } => Kind::Scan {
                keys: (0..self.keys.len())
                    .filter(|&k| in_range(&self.keys[k], start, end))
                    .collect(),
            },
        };
        let (out, return_ns) = match &op.result {
            OpResult::Ok(output) => (Some(self.out(output)), Some(op.return_ns)),
            OpResult::Unknown | OpResult::Failed => (None, None),
        };
        GeneralOp {
            kind,
            out,
            call_ns: op.call_ns,
            return_ns,
            source,
        }
    }

    fn out(&mut self, output: &Output) -> Out {
        match output {
            Output::Put { version } => Out::Put(*version),
            Output::Get(read) => Out::Get(self.read(read)),
            Output::Delete { existed } => Out::Delete(*existed),
            Output::Txn { succeeded, results } => Out::Txn {
                succeeded: *succeeded,
                results: results
                    .iter()
                    .map(|result| match result {
                        TxnOpOutput::Put { version } => BranchOut::Put(*version),
                        TxnOpOutput::Delete { existed } => BranchOut::Delete(*existed),
                        TxnOpOutput::Get(read) => BranchOut::Get(self.read(read)),
                    })
                    .collect(),
            },
            Output::Scan(entries) => Out::Scan(
                entries
                    .iter()
                    .map(|(key, read)| {
                        let key = self.key_ids.get(key.as_slice()).copied();
                        (key, self.intern(&read.value), read.version)
                    })
                    .collect(),
            ),
        }
    }
}

/// A node of the depth-first search: the op that led to it and the state before it.
struct Frame {
    op: usize,
    before: Vec<Register>,
}

/// Searches `component` until `deadline`; with `explain`, remembers the deepest dead end.
pub(crate) fn search(component: &Component, deadline: Instant, explain: bool) -> Outcome {
    let ops = &component.ops;
    let mut undone: BTreeSet<usize> = (0..ops.len()).collect();
    let mut pending: BTreeSet<(u64, usize)> = (0..ops.len())
        .filter_map(|i| ops[i].return_ns.map(|r| (r, i)))
        .collect();
    let mut state = vec![ABSENT; component.keys.len()];
    let mut stack: Vec<Frame> = Vec::new();
    let mut fingerprint = (0u64, 0u64);
    let mut cache: HashSet<(u64, u64, Box<[Register]>)> = HashSet::new();
    let mut deepest: Option<DeadEnd> = None;
    let mut cursor = 0;
    let mut steps = 0u64;
    let flip = |fingerprint: &mut (u64, u64), op: usize| {
        fingerprint.0 ^= mix(2 * op as u64);
        fingerprint.1 ^= mix(2 * op as u64 + 1);
    };
    let entry_bytes = 48 + component.keys.len() * std::mem::size_of::<Register>();
    while let Some(&(limit_ns, blocked)) = pending.first() {
        steps += 1;
        if steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) {
            if cache.len().saturating_mul(entry_bytes) > CACHE_BYTES_MAX {
                let mib = CACHE_BYTES_MAX >> 20;
                return Outcome::Exhausted(format!(
                    "search cache reached {mib} MiB after {steps} steps"
                ));
            }
            if Instant::now() >= deadline {
                return Outcome::Exhausted(format!("time budget exhausted after {steps} steps"));
            }
        }
        let mut entered = false;
        let candidates: Vec<usize> = undone
            .range(cursor..)
            .copied()
            .take_while(|&i| ops[i].call_ns <= limit_ns)
            .collect();
        for op in candidates {
            let mut next = state.clone();
            if !component.step(&mut next, &ops[op]) {
                continue;
            }
            flip(&mut fingerprint, op);
            let config = (
                fingerprint.0,
                fingerprint.1,
                next.clone().into_boxed_slice(),
            );
            if !cache.insert(config) {
                flip(&mut fingerprint, op);
                continue;
            }
            undone.remove(&op);
            if let Some(return_ns) = ops[op].return_ns {
                pending.remove(&(return_ns, op));
            }
            stack.push(Frame {
                op,
                before: std::mem::replace(&mut state, next),
            });
            entered = true;
            break;
        }
        if entered {
            cursor = 0;
            continue;
        }
        if explain && deepest.as_ref().is_none_or(|d| stack.len() > d.depth) {
            let from = stack.len().saturating_sub(EXPLAINED_ORDER_MAX);
            deepest = Some(DeadEnd {
                depth: stack.len(),
                tail: stack[from..].iter().map(|frame| frame.op).collect(),
                state: state.clone(),
                blocked,
            });
        }
        let Some(Frame { op, before }) = stack.pop() else {
            return Outcome::Violation(deepest);
        };
        flip(&mut fingerprint, op);
        state = before;
        undone.insert(op);
        if let Some(return_ns) = ops[op].return_ns {
            pending.insert((return_ns, op));
        }
        cursor = op + 1;
    }
    Outcome::Linearizable
}

/// Whether a completed op changes nothing in any linearization: it can go without making a
/// linearizable piece fail.
fn changes_nothing(op: &GeneralOp) -> bool {
    match (&op.kind, &op.out) {
        (Kind::Get { .. } | Kind::Scan { .. }, Some(_)) => true,
        (
            Kind::Txn {
                success, failure, ..
            },
            Some(Out::Txn { succeeded, .. }),
        ) => {
            let branch = if *succeeded { success } else { failure };
            branch.iter().all(|op| matches!(op, BranchOp::Get { .. }))
        }
        _ => false,
    }
}

/// A failing piece of `component`: operations that change nothing removed one at a time
/// while the rest still fails, until `deadline`.
pub(crate) fn shrink(component: &Component, deadline: Instant) -> Component {
    let mut keep = vec![true; component.ops.len()];
    for op in (0..component.ops.len()).rev() {
        if Instant::now() >= deadline {
            break;
        }
        if !changes_nothing(&component.ops[op]) {
            continue;
        }
        keep[op] = false;
        let trial = component.subset(&keep);
        if !matches!(search(&trial, deadline, false), Outcome::Violation(_)) {
            keep[op] = true;
        }
    }
    component.subset(&keep)
}

/// One line on why `piece` fails, from the search's dead end.
pub(crate) fn explain(piece: &Component, history: &[Operation], dead_end: &DeadEnd) -> String {
    let shown = |op: usize| history[piece.ops[op].source].to_string();
    let tail: Vec<String> = dead_end.tail.iter().map(|&op| shown(op)).collect();
    let order = match dead_end.depth - dead_end.tail.len() {
        0 => tail.join("; "),
        skipped => format!("{skipped} earlier operations; {}", tail.join("; ")),
    };
    format!(
        "no order of these {} operations respects real time and explains every output; the \
         longest consistent order found is [{order}], leaving the keys {}, and from there \"{}\" \
         cannot take effect before it returns",
        piece.ops.len(),
        piece.show(&dead_end.state),
        shown(dead_end.blocked),
    )
}
