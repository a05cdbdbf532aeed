//! The entry points: partition a history into components, search each, shrink and explain a
//! failure.
//!
//! ```text
//!  &[Operation] ─► union-find over keys ─► one key of puts/gets: KeyHistory ─► search
//!                                       └► any other component: general::Component ─► search
//!                                                first failing component ─► shrink ─► explain
//! ```
//!
//! Components: a txn joins the keys it names, a scan every key of the history in its range
//! and every key it returned; failed operations and unknown ones that write nothing are left
//! out first. A component of one key with only puts and gets keeps every refinement of
//! `model`/`search`/`shrink`/`local`; any other (deletes, txns, scans, several keys) goes to
//! the exact search of `general`, without them.
//!
//! A long key history first gets a linear look for local anomalies (`local`), since
//! refuting a long history exhaustively can take minutes. Keys are checked in byte order so a
//! report is deterministic (components by their smallest key). A violation on any key wins
//! over an inconclusive key (it is a definite answer); otherwise an inconclusive key makes the
//! whole answer inconclusive. The search budget is shared by all keys; shrinking and explaining
//! a violation get their own, at most [`SHRINK_BUDGET_MAX`].

use crate::general::{self, Component};
use crate::history::{in_range, Input, OpResult, Operation, Output, Shown};
use crate::local::local_violation;
use crate::model::KeyHistory;
use crate::search::{search, DeadEnd, Outcome};
use crate::shrink::shrink;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// Search budget of [`check`]: far above what a history of tens of thousands of operations with
/// modest concurrency needs, but a bound, so a pathological history cannot hang a test suite.
pub const CHECK_BUDGET_DEFAULT: Duration = Duration::from_secs(60);

/// Key histories at least this long get the local look first (see `local`): shorter ones are
/// searched exhaustively in milliseconds anyway.
const LOCAL_LOOK_MIN_OPS: usize = 256;

/// Operations of the longest consistent order quoted in an explanation (the last ones: the
/// failure is at its end).
const EXPLAINED_ORDER_MAX: usize = 6;

/// Longest search budget: a day is beyond any useful check, and `Instant + Duration::MAX`
/// would overflow.
pub const BUDGET_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Time spent shrinking a failing key's history: enough for hundreds of operations; a bigger
/// history is reported with what remains at the deadline.
pub const SHRINK_BUDGET_MAX: Duration = Duration::from_secs(2);

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    Violation(Violation),
    /// The budget ran out, or the history is malformed; `reason` says which and where.
    Inconclusive {
        reason: String,
    },
}

/// A key whose history has no linearization, with a small piece of it that has none either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The first key of the failing component (its only key unless multi-key operations
    /// joined several).
    pub key: Vec<u8>,
    /// Every key of the failing component, sorted.
    pub keys: Vec<Vec<u8>>,
    /// The piece, in call order.
    pub ops: Vec<Operation>,
    /// One line: how far an order of the piece gets and which operation it cannot place.
    pub explanation: String,
}

/// Checks `history` with the default budget ([`CHECK_BUDGET_DEFAULT`]).
pub fn check(history: &[Operation]) -> CheckResult {
    check_with_budget(history, CHECK_BUDGET_DEFAULT)
}

/// Checks `history`, answering [`CheckResult::Inconclusive`] if the search of all keys takes
/// longer than `budget` (at most [`BUDGET_MAX`]). A violation found in time is then shrunk and
/// explained in at most twice [`SHRINK_BUDGET_MAX`] more.
pub fn check_with_budget(history: &[Operation], budget: Duration) -> CheckResult {
    let deadline = Instant::now() + budget.min(BUDGET_MAX);
    for (source, op) in history.iter().enumerate() {
        if let Some(problem) = op.malformed() {
            let reason = format!("malformed history: operation {source} ({op}): {problem}");
            return CheckResult::Inconclusive { reason };
        }
    }
    let mut inconclusive = None;
    for component in partition(history) {
        let found = if component.simple {
            check_key(history, &component, deadline)
        } else {
            check_general(history, &component, deadline)
        };
        match found {
            Ok(()) => {}
            Err(Found::Violation(violation)) => return CheckResult::Violation(violation),
            Err(Found::Exhausted(reason)) => {
                inconclusive.get_or_insert_with(|| format!("{}: {reason}", component.name()));
            }
        }
    }
    match inconclusive {
        Some(reason) => CheckResult::Inconclusive { reason },
        None => CheckResult::Linearizable,
    }
}

enum Found {
    Violation(Violation),
    Exhausted(String),
}

/// A single key of puts and gets: local look, search, shrink with the put/get refinements.
fn check_key(history: &[Operation], component: &Part, deadline: Instant) -> Result<(), Found> {
    let key = &component.keys[0];
    let key_history = KeyHistory::build(history, &component.ops).map_err(Found::Exhausted)?;
    if key_history.ops.len() >= LOCAL_LOOK_MIN_OPS {
        if let Some(piece) = local_violation(&key_history, deadline) {
            return Err(Found::Violation(report(key, history, &piece, None)));
        }
    }
    match search(&key_history, deadline, true) {
        Outcome::Linearizable => Ok(()),
        Outcome::Violation(dead_end) => Err(Found::Violation(report(
            key,
            history,
            &key_history,
            dead_end,
        ))),
        Outcome::Exhausted(reason) => Err(Found::Exhausted(reason)),
    }
}

/// Any other component: the exact general search, shrinking only operations that change
/// nothing.
fn check_general(history: &[Operation], component: &Part, deadline: Instant) -> Result<(), Found> {
    let prepared = Component::build(history, &component.ops, component.keys.clone());
    match general::search(&prepared, deadline, false) {
        general::Outcome::Linearizable => return Ok(()),
        general::Outcome::Exhausted(reason) => return Err(Found::Exhausted(reason)),
        general::Outcome::Violation(_) => {}
    }
    let shrink_deadline = Instant::now() + SHRINK_BUDGET_MAX;
    let piece = general::shrink(&prepared, shrink_deadline);
    let explanation = match general::search(&piece, shrink_deadline + SHRINK_BUDGET_MAX, true) {
        general::Outcome::Violation(Some(dead_end)) => general::explain(&piece, history, &dead_end),
        _ => format!(
            "no order of these {} operations is consistent with real time and their outputs",
            piece.len()
        ),
    };
    let mut ops: Vec<Operation> = piece
        .sources()
        .into_iter()
        .map(|source| history[source].clone())
        .collect();
    ops.sort_by_key(|op| (op.call_ns, op.return_ns));
    Err(Found::Violation(Violation {
        key: component.keys.first().cloned().unwrap_or_default(),
        keys: component.keys.clone(),
        ops,
        explanation,
    }))
}

/// A component of the history: keys linked by multi-key operations, and their operations.
struct Part {
    /// Sorted.
    keys: Vec<Vec<u8>>,
    /// Indices into the history, in history order; failed ops and unknown reads left out.
    ops: Vec<usize>,
    /// One key, only puts and gets: the put/get refinements apply.
    simple: bool,
}

impl Part {
    fn name(&self) -> String {
        match self.keys.as_slice() {
            [key] => format!("key {}", Shown(key)),
            [] => "an operation naming no key".to_string(),
            keys => {
                let shown: Vec<String> = keys.iter().map(|k| Shown(k).to_string()).collect();
                format!("keys [{}]", shown.join(", "))
            }
        }
    }
}

/// Whether an operation can inform the check: failed ones did not take effect, and an
/// unknown one that writes nothing observed nothing.
fn kept(op: &Operation) -> bool {
    match op.result {
        OpResult::Ok(_) => true,
        OpResult::Failed => false,
        OpResult::Unknown => op.input.writes(),
    }
}

/// The components, by smallest key: union-find over the keys of the kept operations, a txn
/// joining the keys it names, a scan every key of the history in its range and every key it
/// returned. An operation naming no key (a txn with no compares or ops, a scan of a range no
/// kept operation names that returned nothing) is a component of no keys, after the others.
fn partition(history: &[Operation]) -> Vec<Part> {
    let mut all_keys: BTreeSet<&[u8]> = BTreeSet::new();
    for op in history.iter().filter(|op| kept(op)) {
        all_keys.extend(op.keys());
        if let OpResult::Ok(Output::Scan(entries)) = &op.result {
            all_keys.extend(entries.iter().map(|(key, _)| key.as_slice()));
        }
    }
    let all_keys: Vec<&[u8]> = all_keys.into_iter().collect();
    let index = |key: &[u8]| {
        all_keys
            .binary_search(&key)
            .expect("invariant: every key was collected")
    };
    let mut parent: Vec<usize> = (0..all_keys.len()).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut op_key = vec![None; history.len()];
    // Txns naming no key and scans of ranges nothing was written to: each is its own
    // component of no keys (a txn with no compares must still report success).
    let mut keyless = Vec::new();
    for (source, op) in history.iter().enumerate() {
        if !kept(op) {
            continue;
        }
        let mut keys: Vec<usize> = op.keys().into_iter().map(index).collect();
        if let Some((start, end)) = op.input.range() {
            keys.extend((0..all_keys.len()).filter(|&k| in_range(all_keys[k], start, end)));
        }
        if let OpResult::Ok(Output::Scan(entries)) = &op.result {
            keys.extend(entries.iter().map(|(key, _)| index(key)));
        }
        let Some(&first) = keys.first() else {
            keyless.push(Part {
                keys: Vec::new(),
                ops: vec![source],
                simple: false,
            });
            continue;
        };
        for &other in &keys[1..] {
            let (a, b) = (find(&mut parent, first), find(&mut parent, other));
            parent[a.max(b)] = a.min(b);
        }
        op_key[source] = Some(first);
    }
    let mut parts: BTreeMap<usize, Part> = BTreeMap::new();
    for (k, key) in all_keys.iter().enumerate() {
        let root = find(&mut parent, k);
        let part = parts.entry(root).or_insert_with(|| Part {
            keys: Vec::new(),
            ops: Vec::new(),
            simple: true,
        });
        part.keys.push(key.to_vec());
    }
    for (source, op) in history.iter().enumerate() {
        let Some(key) = op_key[source] else {
            continue;
        };
        let part = parts
            .get_mut(&find(&mut parent, key))
            .expect("invariant: every key has a part");
        part.ops.push(source);
        part.simple &= matches!(op.input, Input::Put { .. } | Input::Get { .. });
    }
    parts
        .into_values()
        .filter(|part| !part.ops.is_empty())
        .map(|mut part| {
            part.simple &= part.keys.len() == 1;
            part
        })
        .chain(keyless)
        .collect()
}

/// Shrinks the failing `key_history` and explains the piece that remains.
fn report(
    key: &[u8],
    history: &[Operation],
    key_history: &KeyHistory,
    hint: Option<DeadEnd>,
) -> Violation {
    let deadline = Instant::now() + SHRINK_BUDGET_MAX;
    let piece = shrink(key_history, hint.as_ref(), deadline);
    let explanation = match search(&piece, deadline + SHRINK_BUDGET_MAX, true) {
        Outcome::Violation(Some(dead_end)) => explain(&piece, history, &dead_end),
        _ => format!(
            "no order of these {} operations is consistent with real time and their outputs",
            piece.ops.len()
        ),
    };
    let mut ops: Vec<Operation> = piece
        .ops
        .iter()
        .map(|op| history[op.source].clone())
        .collect();
    ops.sort_by_key(|op| (op.call_ns, op.return_ns));
    Violation {
        key: key.to_vec(),
        keys: vec![key.to_vec()],
        ops,
        explanation,
    }
}

fn explain(piece: &KeyHistory, history: &[Operation], dead_end: &DeadEnd) -> String {
    let shown = |op: usize| history[piece.ops[op].source].to_string();
    let compared = if piece.tracks_versions {
        "output"
    } else {
        "value read"
    };
    format!(
        "no order of these {} operations respects real time and explains every {compared}; the \
         longest consistent order found is [{}], leaving the key {}, and from there \"{}\" cannot \
         take effect before it returns",
        piece.ops.len(),
        order_tail(dead_end, shown),
        piece.show(dead_end.state),
        shown(dead_end.blocked),
    ) + &removed_note(piece)
}

/// Says which puts shrinking left out, since the piece's versions are counted without them
/// (nothing when versions are not compared).
fn removed_note(piece: &KeyHistory) -> String {
    let removed: &[u64] = if piece.tracks_versions {
        &piece.removed_versions
    } else {
        &[]
    };
    let shown: Vec<String> = removed
        .iter()
        .take(EXPLAINED_ORDER_MAX)
        .map(u64::to_string)
        .collect();
    let more = if removed.len() > shown.len() {
        ", ..."
    } else {
        ""
    };
    match removed {
        [] => String::new(),
        _ => format!(
            "; versions here are counted without the {} left-out puts of versions {}{more} and \
             their reads",
            removed.len(),
            shown.join(", ")
        ),
    }
}

/// The last [`EXPLAINED_ORDER_MAX`] operations of the dead end's order, so the explanation
/// stays one readable line.
fn order_tail(dead_end: &DeadEnd, shown: impl Fn(usize) -> String) -> String {
    let from = dead_end.tail.len().saturating_sub(EXPLAINED_ORDER_MAX);
    let tail: Vec<String> = dead_end.tail[from..].iter().map(|&op| shown(op)).collect();
    match dead_end.depth - (dead_end.tail.len() - from) {
        0 => tail.join("; "),
        skipped => format!("{skipped} earlier operations; {}", tail.join("; ")),
    }
}

/// One line describing `result`.
pub fn summarize(result: &CheckResult) -> String {
    match result {
        CheckResult::Linearizable => "linearizable".to_string(),
        CheckResult::Violation(violation) => format!(
            "NOT linearizable: {} ({} operations in the smallest failing piece): {}",
            violation.keys_shown(),
            violation.ops.len(),
            violation.explanation
        ),
        CheckResult::Inconclusive { reason } => format!("inconclusive: {reason}"),
    }
}

impl Violation {
    /// `key "k"`, or `keys ["a", "b"]` for a multi-key component.
    fn keys_shown(&self) -> String {
        match self.keys.as_slice() {
            [] => "an operation naming no key".to_string(),
            [key] => format!("key {}", Shown(key)),
            keys => {
                let shown: Vec<String> = keys.iter().map(|k| Shown(k).to_string()).collect();
                format!("keys [{}]", shown.join(", "))
            }
        }
    }
}

/// The explanation, then one operation a line with its client, output and times.
impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linearizability violation on {}: {}",
            self.keys_shown(),
            self.explanation
        )?;
        for op in &self.ops {
            writeln!(f, "  {op}")?;
        }
        Ok(())
    }
}
