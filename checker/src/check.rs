//! The entry points: partition a history by key, search each key, shrink and explain a failure.
//!
//! ```text
//!  &[Operation] ─► BTreeMap<key, op indices> ─► per key: KeyHistory ─► search
//!                                                    first failing key ─► shrink ─► explain
//! ```
//!
//! A long key history first gets a linear look for local anomalies (`local`), since
//! refuting a long history exhaustively can take minutes. Keys are checked in byte order so a
//! report is deterministic. A violation on any key wins
//! over an inconclusive key (it is a definite answer); otherwise an inconclusive key makes the
//! whole answer inconclusive. The search budget is shared by all keys; shrinking and explaining
//! a violation get their own, at most [`SHRINK_BUDGET_MAX`].

use crate::history::{Operation, Shown};
use crate::local::local_violation;
use crate::model::KeyHistory;
use crate::search::{search, DeadEnd, Outcome};
use crate::shrink::shrink;
use std::collections::BTreeMap;
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
    pub key: Vec<u8>,
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
    let mut inconclusive = None;
    for (key, indices) in partition(history) {
        let key_history = match KeyHistory::build(history, &indices) {
            Ok(key_history) => key_history,
            Err(reason) => return CheckResult::Inconclusive { reason },
        };
        if key_history.ops.len() >= LOCAL_LOOK_MIN_OPS {
            if let Some(piece) = local_violation(&key_history, deadline) {
                return CheckResult::Violation(report(key, history, &piece, None));
            }
        }
        match search(&key_history, deadline, true) {
            Outcome::Linearizable => {}
            Outcome::Violation(dead_end) => {
                return CheckResult::Violation(report(key, history, &key_history, dead_end))
            }
            Outcome::Exhausted(reason) => {
                inconclusive.get_or_insert_with(|| format!("key {}: {reason}", Shown(key)));
            }
        }
    }
    match inconclusive {
        Some(reason) => CheckResult::Inconclusive { reason },
        None => CheckResult::Linearizable,
    }
}

/// Indices of each key's operations, keys in byte order.
fn partition(history: &[Operation]) -> BTreeMap<&[u8], Vec<usize>> {
    let mut keys: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        keys.entry(op.key()).or_default().push(index);
    }
    keys
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
            "NOT linearizable: key {} ({} operations in the smallest failing piece): {}",
            Shown(&violation.key),
            violation.ops.len(),
            violation.explanation
        ),
        CheckResult::Inconclusive { reason } => format!("inconclusive: {reason}"),
    }
}

/// The explanation, then one operation a line with its client, output and times.
impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linearizability violation on key {}: {}",
            Shown(&self.key),
            self.explanation
        )?;
        for op in &self.ops {
            writeln!(f, "  {op}")?;
        }
        Ok(())
    }
}
