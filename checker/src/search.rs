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
//! operations (a 128-bit fingerprint of it, see [`Config`]) and the model state; whatever was found from a configuration does not
//! depend on the path that reached it, so a configuration already in the cache is not explored
//! again. Unknown puts have no return event: the search may linearize them or walk past them.
//!
//! Unknown puts whose value no get read ("unread", see the model) are not walked at all. Such
//! a put can only matter through the version it adds, and no get can follow it directly (it
//! would read its value), so in any linearization it can be moved to just before the next put,
//! and any two are interchangeable once called. The search therefore applies them only in a
//! block right before a put, in call order: exactly as many as the put's version needs, or,
//! when the put's version is unknown, each possible count in turn (just-in-time linearization
//! in the spirit of Lowe 2017). Without this, every pending unread put is a branch at every
//! step, and histories with timeouts on a hot key grow quadratically or worse.
//!
//! Ties: at equal times calls sort before returns, so operations whose times touch are
//! treated as concurrent (a clock cannot order them; this never rejects a valid history).
//!
//! Invariants: the stack holds the linearized operations in order (each with the unread puts
//! applied just before it; those applied are always the lowest ranks) and the state is the
//! model applied to them; a node is in the list exactly when its operation (never an unread
//! put) is not on the stack; the search stops at the deadline or when the cache reaches
//! [`CACHE_BYTES_MAX`].

use crate::model::{KeyHistory, KeyOp, Register, Step, UNREAD};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::time::Instant;

/// Memory the cache may use before the search gives up: a key whose history needs more is
/// reported inconclusive instead of taking the machine down.
pub(crate) const CACHE_BYTES_MAX: usize = 512 << 20;

/// Steps between two looks at the clock: reading it every step would dominate small searches.
const STEPS_PER_CLOCK_CHECK: u64 = 1 << 10;

/// Estimated bytes of a cache entry besides the configuration (hash table slack and control).
const CACHE_ENTRY_OVERHEAD_BYTES: usize = 16;

pub(crate) enum Outcome {
    Linearizable,
    /// No linearization exists; with `explain`, the deepest dead end the search met.
    Violation(Option<DeadEnd>),
    /// The budget ran out first.
    Exhausted(String),
}

/// Operations kept of a dead end's order: its end is where the failure is (and copying a whole
/// 20 000-operation stack at each new depth would be quadratic).
pub(crate) const DEAD_END_TAIL_MAX: usize = 64;

/// The longest order consistent with real time and the model that the search built, and the
/// operation whose return it could not get past.
pub(crate) struct DeadEnd {
    /// Length of the order.
    pub depth: usize,
    /// Its last [`DEAD_END_TAIL_MAX`] operations (positions in [`KeyHistory::ops`]), in order.
    pub tail: Vec<usize>,
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
    /// Node of each operation's call and (if it has one) return; unread unknown puts have no
    /// nodes (their entry is the head, never lifted).
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
        if key_op.unread_rank.is_some() {
            continue; // not walked: the search applies them right before a put (see Search)
        }
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

/// A configuration of the search: the set of linearized operations and the model state after
/// them. The set is kept as a 128-bit Zobrist fingerprint, the XOR of two pseudo-random words
/// per member, updated in O(1) per step, instead of a bitset: an entry costs 32 bytes whatever
/// the history's length (a bitset of a 20 000-operation key costs 2.5 KB, and a failing search
/// stores one per configuration). This is hash compaction (Wolper & Leroy 1993): two distinct
/// sets share a fingerprint with probability 2^-128, so over even 10^7 cached configurations
/// the chance that the search skips one it never explored is below 10^-24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    low: u64,
    high: u64,
    state: Register,
}

impl Config {
    const EMPTY: Config = Config {
        low: 0,
        high: 0,
        state: Register::ABSENT,
    };

    fn flip(&mut self, op: usize) {
        let op = op as u64;
        self.low ^= mix(2 * op);
        self.high ^= mix(2 * op + 1);
    }
}

impl Hash for Config {
    fn hash<H: Hasher>(&self, hasher: &mut H) {
        let value = self.state.value.map_or(0, |id| u64::from(id) + 1);
        hasher.write_u64(self.low ^ mix(mix(value) ^ self.state.version));
    }
}

/// SplitMix64's finalizer: a fixed pseudo-random word per input, for Zobrist hashing.
pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One linearization step: `op`, preceded by `unread` unread unknown puts (the next ranks).
struct Frame {
    op: usize,
    unread: usize,
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
    /// Unread unknown puts by rank (call order); those of rank < `unread_applied` are applied.
    unread_by_rank: Vec<usize>,
    unread_applied: usize,
    /// After backtracking a step with `n` unread puts, the same op is retried with at least
    /// `n + 1`; 0 otherwise.
    unread_min: usize,
    steps: u64,
    deadline: Instant,
    deepest: Option<DeadEnd>,
    explain: bool,
}

impl<'a> Search<'a> {
    fn new(history: &'a KeyHistory, deadline: Instant, explain: bool) -> Search<'a> {
        let required = |op: &&KeyOp| op.return_ns.is_some();
        Search {
            history,
            list: EventList::new(history),
            stack: Vec::new(),
            state: Register::ABSENT,
            probe: Config::EMPTY,
            cache: HashSet::new(),
            required_left: history.ops.iter().filter(required).count(),
            unread_by_rank: unread_by_rank(history),
            unread_applied: 0,
            unread_min: 0,
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
                Node::Call(op) => self
                    .try_linearize(op, cursor)
                    .unwrap_or(self.list.next[cursor]),
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

    /// Linearizes `op` now (after as few unread puts as its output allows) if the model
    /// accepts it and the configuration is new; returns where to continue (the list's head).
    fn try_linearize(&mut self, op: usize, cursor: usize) -> Option<usize> {
        let unread_min = std::mem::take(&mut self.unread_min);
        for unread in self.unread_choices(op, cursor, unread_min) {
            let Some(next) = self.history.step(self.after_unread(self.state, unread), op) else {
                continue;
            };
            if self.enter(op, unread, next) {
                return Some(self.list.first());
            }
        }
        None
    }

    /// How many unread puts may go right before `op` at `cursor`: only before a put (nothing
    /// else can use them: a get cannot read their value), exactly as many as its version
    /// needs, or any number available if its version is unknown.
    fn unread_choices(&self, op: usize, cursor: usize, unread_min: usize) -> Range<usize> {
        const NONE: Range<usize> = 0..0;
        let Step::Put { version, .. } = self.history.ops[op].step else {
            return if unread_min == 0 { 0..1 } else { NONE };
        };
        if !self.history.tracks_versions {
            return if unread_min == 0 { 0..1 } else { NONE };
        }
        let available = self.unread_available(cursor);
        match version {
            None => unread_min..available + 1,
            Some(version) => {
                let needed = version.checked_sub(self.state.version + 1);
                match needed.and_then(|needed| usize::try_from(needed).ok()) {
                    Some(n) if n >= unread_min && n <= available => n..n + 1,
                    _ => NONE,
                }
            }
        }
    }

    /// Unapplied unread puts called no later than the first pending return after `cursor`
    /// (calls sort before returns at equal times), so they can take effect now.
    fn unread_available(&self, cursor: usize) -> usize {
        let mut node = cursor;
        let limit_ns = loop {
            match self.list.kind[node] {
                Node::Return(op) => break self.history.ops[op].return_ns.unwrap_or(u64::MAX),
                Node::Tail => break u64::MAX,
                Node::Head | Node::Call(_) => node = self.list.next[node],
            }
        };
        let pending = &self.unread_by_rank[self.unread_applied..];
        pending
            .iter()
            .take_while(|&&op| self.history.ops[op].call_ns <= limit_ns)
            .count()
    }

    /// The state after `unread` unread puts: their value is one no get reads.
    fn after_unread(&self, state: Register, unread: usize) -> Register {
        match unread {
            0 => state,
            n => Register {
                value: Some(UNREAD),
                version: state.version + n as u64,
            },
        }
    }

    /// Pushes the step if its configuration is new; whether it did.
    fn enter(&mut self, op: usize, unread: usize, next: Register) -> bool {
        self.flip_step(op, unread, self.unread_applied);
        self.probe.state = next;
        if self.cache.contains(&self.probe) {
            self.flip_step(op, unread, self.unread_applied);
            return false;
        }
        self.cache.insert(self.probe);
        self.stack.push(Frame {
            op,
            unread,
            before: self.state,
        });
        self.state = next;
        self.list.lift(op);
        self.required_left -= usize::from(self.history.ops[op].return_ns.is_some());
        self.unread_applied += unread;
        true
    }

    fn flip_step(&mut self, op: usize, unread: usize, first_rank: usize) {
        self.probe.flip(op);
        for &unread_op in &self.unread_by_rank[first_rank..first_rank + unread] {
            self.probe.flip(unread_op);
        }
    }

    /// Undoes the last step after `blocked`'s return was reached; returns where to continue:
    /// the undone op again (with more unread puts before it), or `None` if nothing is left.
    fn backtrack(&mut self, blocked: usize) -> Option<usize> {
        if self.explain {
            self.note_dead_end(blocked);
        }
        let Frame { op, unread, before } = self.stack.pop()?;
        self.unread_applied -= unread;
        self.flip_step(op, unread, self.unread_applied);
        self.state = before;
        self.list.unlift(op);
        self.required_left += usize::from(self.history.ops[op].return_ns.is_some());
        self.unread_min = unread + 1;
        Some(self.list.call_node[op])
    }

    fn note_dead_end(&mut self, blocked: usize) {
        let deepest = self.deepest.as_ref().map(|dead_end| dead_end.depth);
        if deepest.is_none_or(|depth| self.stack.len() > depth) {
            let skipped = self.stack.len().saturating_sub(DEAD_END_TAIL_MAX);
            let tail = self.stack[skipped..].iter().map(|frame| frame.op).collect();
            let (depth, state) = (self.stack.len(), self.state);
            self.deepest = Some(DeadEnd {
                depth,
                tail,
                state,
                blocked,
            });
        }
    }

    fn over_budget(&mut self) -> Option<String> {
        self.steps += 1;
        if !self.steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) {
            return None;
        }
        let entry_bytes = std::mem::size_of::<Config>() + CACHE_ENTRY_OVERHEAD_BYTES;
        if self.cache.len().saturating_mul(entry_bytes) > CACHE_BYTES_MAX {
            let mib = CACHE_BYTES_MAX >> 20;
            return Some(format!(
                "search cache reached {mib} MiB after {} steps",
                self.steps
            ));
        }
        let timed_out = Instant::now() >= self.deadline;
        timed_out.then(|| format!("time budget exhausted after {} steps", self.steps))
    }

    fn replay(&self) -> Register {
        self.stack.iter().fold(Register::ABSENT, |state, frame| {
            let state = self.after_unread(state, frame.unread);
            self.history
                .step(state, frame.op)
                .expect("invariant: stacked ops were accepted")
        })
    }
}

/// Unread unknown puts ordered by rank.
fn unread_by_rank(history: &KeyHistory) -> Vec<usize> {
    let mut ranked: Vec<(usize, usize)> = history
        .ops
        .iter()
        .enumerate()
        .filter_map(|(op, key_op)| key_op.unread_rank.map(|rank| (rank, op)))
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, op)| op).collect()
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
        assert_eq!((dead_end.depth, dead_end.tail), (1, vec![0]));
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
