//! The search for a linearization of one key's history.
//!
//! Wing & Gong (1993): lay out the call and return events in time order in a doubly linked
//! list and walk it from the head. At a call, try to *linearize* that operation now: if the
//! model accepts its output from the current state, push it on a stack, unlink its call and
//! return, and restart from the head. At a return, the operation it ends was not linearized
//! before it returned, so the current prefix is a dead end: pop the last linearized operation,
//! relink it, and try the call after it. The history is linearizable when every completed
//! operation is linearized, and not linearizable when a dead end has nothing left to pop.
//!
//! ```text
//!  head ─ call A ─ call B ─ ret A ─ call C ─ ret B ─ ret C ─ tail
//!          try A ✓ → lift A, restart; try B ✗ → skip; ret B → backtrack ...
//! ```
//!
//! Lowe (2017) memoization, as in Porcupine: a configuration is the set of linearized
//! operations (a bitset) and the model state; whatever was found from a configuration does not
//! depend on the path that reached it, so a configuration already in the cache is not explored
//! again. Unknown puts have no return event: the search may linearize them or walk past them.
//!
//! Ties: at equal times calls sort before returns, so operations whose times touch are
//! treated as concurrent (a clock cannot order them; this never rejects a valid history).
//!
//! Invariants: the stack holds the linearized operations in order and the state is the model
//! applied to them; a node is in the list exactly when its operation is not on the stack; the
//! search stops at the deadline or when the cache reaches [`CACHE_BYTES_MAX`].

use crate::model::{KeyHistory, Register};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::Instant;

/// Memory the cache may use before the search gives up: a key whose history needs more is
/// reported inconclusive instead of taking the machine down.
pub(crate) const CACHE_BYTES_MAX: usize = 512 << 20;

/// Steps between two looks at the clock: reading it every step would dominate small searches.
const STEPS_PER_CLOCK_CHECK: u64 = 1 << 10;

/// Estimated bytes of a cache entry besides its bitset words (hash slot, box, state).
const CACHE_ENTRY_OVERHEAD_BYTES: usize = 48;

pub(crate) enum Outcome {
    Linearizable,
    /// No linearization exists; with `explain`, the deepest dead end the search met.
    Violation(Option<DeadEnd>),
    /// The budget ran out first.
    Exhausted(String),
}

/// The longest order consistent with real time and the model that the search built, and the
/// operation whose return it could not get past.
pub(crate) struct DeadEnd {
    /// Positions in [`KeyHistory::ops`], in linearization order.
    pub order: Vec<usize>,
    pub state: Register,
    /// The completed operation that could not be linearized before its return.
    pub blocked: usize,
}

/// Searches `history` until `deadline`; with `explain`, remembers the deepest dead end.
pub(crate) fn search(history: &KeyHistory, deadline: Instant, explain: bool) -> Outcome {
    Search::new(history, deadline, explain).run()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Head,
    Call(usize),
    Return(usize),
    Tail,
}

/// The event list: node 0 is the head, the last node the tail; links are node indices.
struct EventList {
    kind: Vec<Node>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// Node of each operation's call and (if it has one) return.
    call_node: Vec<usize>,
    return_node: Vec<Option<usize>>,
}

impl EventList {
    fn new(history: &KeyHistory) -> EventList {
        let kind = sorted_events(history);
        let count = kind.len();
        let mut list = EventList {
            prev: (0..count).map(|i| i.saturating_sub(1)).collect(),
            next: (0..count).map(|i| (i + 1).min(count - 1)).collect(),
            call_node: vec![0; history.ops.len()],
            return_node: vec![None; history.ops.len()],
            kind,
        };
        for (node, kind) in list.kind.iter().enumerate() {
            match *kind {
                Node::Call(op) => list.call_node[op] = node,
                Node::Return(op) => list.return_node[op] = Some(node),
                Node::Head | Node::Tail => {}
            }
        }
        list
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    /// Reinserts a node between the neighbours it had when unlinked (LIFO order only).
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if let Some(node) = self.return_node[op] {
            self.unlink(node);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(node) = self.return_node[op] {
            self.relink(node);
        }
        self.relink(self.call_node[op]);
    }
}

/// Head, the events by (time, calls before returns, operation), tail.
fn sorted_events(history: &KeyHistory) -> Vec<Node> {
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * history.ops.len());
    for (op, key_op) in history.ops.iter().enumerate() {
        events.push((key_op.call_ns, 0, op));
        if let Some(return_ns) = key_op.return_ns {
            events.push((return_ns, 1, op));
        }
    }
    events.sort_unstable();
    let events = events.into_iter().map(|(_, kind, op)| {
        if kind == 0 {
            Node::Call(op)
        } else {
            Node::Return(op)
        }
    });
    std::iter::once(Node::Head)
        .chain(events)
        .chain(std::iter::once(Node::Tail))
        .collect()
}

/// A configuration of the search: the set of linearized operations (one bit each) and the
/// model state after them. The hash of the set is kept incrementally (Zobrist hashing: the XOR
/// of a pseudo-random word per member), so probing the cache does not rehash the whole bitset.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Config {
    bits: Box<[u64]>,
    bits_hash: u64,
    state: Register,
}

impl Config {
    fn new(ops: usize) -> Config {
        let bits = vec![0; ops.div_ceil(64)].into_boxed_slice();
        Config {
            bits,
            bits_hash: 0,
            state: Register::ABSENT,
        }
    }

    fn flip(&mut self, op: usize) {
        self.bits[op / 64] ^= 1 << (op % 64);
        self.bits_hash ^= mix(op as u64);
    }
}

impl Hash for Config {
    fn hash<H: Hasher>(&self, hasher: &mut H) {
        let value = self.state.value.map_or(0, |id| u64::from(id) + 1);
        hasher.write_u64(self.bits_hash ^ mix(mix(value) ^ self.state.version));
    }
}

/// SplitMix64's finalizer: a fixed pseudo-random word per input, for Zobrist hashing.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Frame {
    op: usize,
    before: Register,
}

struct Search<'a> {
    history: &'a KeyHistory,
    list: EventList,
    stack: Vec<Frame>,
    state: Register,
    /// The linearized set, and the state of the configuration being probed.
    probe: Config,
    cache: HashSet<Config>,
    /// Completed operations not yet on the stack: the search succeeds when it reaches 0.
    required_left: usize,
    steps: u64,
    deadline: Instant,
    deepest: Option<DeadEnd>,
    explain: bool,
}

impl<'a> Search<'a> {
    fn new(history: &'a KeyHistory, deadline: Instant, explain: bool) -> Search<'a> {
        Search {
            history,
            list: EventList::new(history),
            stack: Vec::new(),
            state: Register::ABSENT,
            probe: Config::new(history.ops.len()),
            cache: HashSet::new(),
            required_left: history
                .ops
                .iter()
                .filter(|op| op.return_ns.is_some())
                .count(),
            steps: 0,
            deadline,
            deepest: None,
            explain,
        }
    }

    fn run(mut self) -> Outcome {
        let mut cursor = self.list.first();
        while self.required_left > 0 {
            if let Some(reason) = self.over_budget() {
                return Outcome::Exhausted(reason);
            }
            cursor = match self.list.kind[cursor] {
                Node::Call(op) => self.try_linearize(op).unwrap_or(self.list.next[cursor]),
                Node::Return(op) => match self.backtrack(op) {
                    Some(next) => next,
                    None => return Outcome::Violation(self.deepest.take()),
                },
                Node::Head | Node::Tail => {
                    unreachable!("invariant: a required op's return precedes the tail")
                }
            };
        }
        debug_assert_eq!(
            self.state,
            self.replay(),
            "state is the model applied to the stack"
        );
        Outcome::Linearizable
    }

    /// Linearizes `op` now if the model allows it and the result is a new configuration;
    /// returns where to continue (the head of the list).
    fn try_linearize(&mut self, op: usize) -> Option<usize> {
        let next = self.history.step(self.state, op)?;
        self.probe.flip(op);
        self.probe.state = next;
        if self.cache.contains(&self.probe) {
            self.probe.flip(op);
            return None;
        }
        self.cache.insert(self.probe.clone());
        self.stack.push(Frame {
            op,
            before: self.state,
        });
        self.state = next;
        self.list.lift(op);
        self.required_left -= usize::from(self.history.ops[op].return_ns.is_some());
        Some(self.list.first())
    }

    /// Undoes the last linearization after `blocked`'s return was reached; returns the node
    /// after the undone call, or `None` when nothing is left to undo.
    fn backtrack(&mut self, blocked: usize) -> Option<usize> {
        if self.explain {
            self.note_dead_end(blocked);
        }
        let Frame { op, before } = self.stack.pop()?;
        self.probe.flip(op);
        self.state = before;
        self.list.unlift(op);
        self.required_left += usize::from(self.history.ops[op].return_ns.is_some());
        Some(self.list.next[self.list.call_node[op]])
    }

    fn note_dead_end(&mut self, blocked: usize) {
        let depth = self
            .deepest
            .as_ref()
            .map_or(0, |dead_end| dead_end.order.len());
        if self.deepest.is_none() || self.stack.len() > depth {
            let order = self.stack.iter().map(|frame| frame.op).collect();
            self.deepest = Some(DeadEnd {
                order,
                state: self.state,
                blocked,
            });
        }
    }

    fn over_budget(&mut self) -> Option<String> {
        self.steps += 1;
        if !self.steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) {
            return None;
        }
        let entry_bytes = self.probe.bits.len() * 8 + CACHE_ENTRY_OVERHEAD_BYTES;
        if self.cache.len().saturating_mul(entry_bytes) > CACHE_BYTES_MAX {
            return Some(format!(
                "search cache reached {} MiB after {} steps",
                CACHE_BYTES_MAX >> 20,
                self.steps
            ));
        }
        let timed_out = Instant::now() >= self.deadline;
        timed_out.then(|| format!("time budget exhausted after {} steps", self.steps))
    }

    fn replay(&self) -> Register {
        self.stack.iter().fold(Register::ABSENT, |state, frame| {
            self.history
                .step(state, frame.op)
                .expect("invariant: stacked ops were accepted")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Input, OpResult, Operation, Output};
    use std::time::Duration;

    fn run(ops: &[Operation]) -> Outcome {
        let indices: Vec<usize> = (0..ops.len()).collect();
        let history = KeyHistory::build(ops, &indices).expect("well formed");
        search(&history, Instant::now() + Duration::from_secs(10), true)
    }

    fn op(input: Input, call_ns: u64, output: Output, return_ns: u64) -> Operation {
        Operation::new(1, input, call_ns, OpResult::Ok(output), return_ns)
    }

    #[test]
    fn events_sort_calls_before_returns_at_equal_times() {
        let ops = [
            op(Input::put("k", "a"), 0, Output::put_version(1), 5),
            op(Input::get("k"), 5, Output::absent(), 9),
        ];
        let history = KeyHistory::build(&ops, &[0, 1]).expect("well formed");
        let kinds = sorted_events(&history);
        let expected = [
            Node::Head,
            Node::Call(0),
            Node::Call(1),
            Node::Return(0),
            Node::Return(1),
            Node::Tail,
        ];
        assert_eq!(kinds, expected);
        assert!(
            matches!(run(&ops), Outcome::Linearizable),
            "touching ops are concurrent"
        );
    }

    #[test]
    fn lift_and_unlift_restore_the_list() {
        let ops = [
            op(Input::put("k", "a"), 0, Output::put_version(1), 5),
            op(Input::get("k"), 1, Output::absent(), 9),
        ];
        let history = KeyHistory::build(&ops, &[0, 1]).expect("well formed");
        let mut list = EventList::new(&history);
        let (prev, next) = (list.prev.clone(), list.next.clone());
        list.lift(0);
        assert_eq!(list.kind[list.first()], Node::Call(1));
        list.lift(1);
        assert_eq!(list.kind[list.first()], Node::Tail);
        list.unlift(1);
        list.unlift(0);
        assert_eq!((list.prev, list.next), (prev, next));
    }

    #[test]
    fn dead_end_names_the_blocked_operation() {
        let ops = [
            op(Input::put("k", "a"), 0, Output::put_version(1), 5),
            op(Input::get("k"), 10, Output::absent(), 15),
        ];
        let Outcome::Violation(Some(dead_end)) = run(&ops) else {
            panic!("stale read accepted")
        };
        assert_eq!(dead_end.order, vec![0]);
        assert_eq!(dead_end.blocked, 1);
        assert_eq!(
            dead_end.state,
            Register {
                value: Some(0),
                version: 1
            }
        );
    }
}
