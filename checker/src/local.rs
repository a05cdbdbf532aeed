//! A quick look for local anomalies before the exhaustive search of a long key history.
//!
//! Proving that a long history has no linearization can take the search through every
//! configuration of the whole key (minutes for thousands of concurrent puts without versions),
//! while the usual anomalies are visible in three operations. For each completed get G, try
//! the piece made of G, every put of the value it read (none for "absent"), and the put of
//! another value that returned last before G was called:
//!
//! ```text
//!  put X ├──┤   put Y ├──┤   get ├──┤ -> X      stale read: fails as three operations
//! ```
//!
//! Pieces are checked comparing values only. A piece is the value units of X and Y without
//! some of their gets, which the shrinking rules (see `shrink`) show is safe: if a piece has
//! no linearization, neither has the history. Each piece is a search of a handful of
//! operations, so the whole look is linear in the key's length.
//!
//! Invariant: a returned piece was found non-linearizable by a completed search.

use crate::model::{KeyHistory, Step, ValueId};
use crate::search::{search, Outcome};
use std::collections::HashMap;
use std::time::Instant;

/// A small piece of `history` that is not linearizable, if one of the pieces tried is.
pub(crate) fn local_violation(history: &KeyHistory, deadline: Instant) -> Option<KeyHistory> {
    let values_only = KeyHistory {
        tracks_versions: false,
        ..history.clone()
    };
    let writers = writers(history);
    let puts = completed_puts_by_return(history);
    for (get, key_op) in history.ops.iter().enumerate() {
        let Step::Get { read } = key_op.step else {
            continue;
        };
        if key_op.return_ns.is_none() || Instant::now() >= deadline {
            continue;
        }
        let value = read.map(|(value, _)| value);
        let mut piece: Vec<usize> = value
            .and_then(|value| writers.get(&value))
            .cloned()
            .unwrap_or_default();
        piece.push(get);
        piece.extend(last_other_put(history, &puts, key_op.call_ns, value));
        piece.sort_unstable();
        let piece = values_only.subset(&piece);
        if matches!(search(&piece, deadline, false), Outcome::Violation(_)) {
            return Some(piece);
        }
    }
    None
}

/// The puts of each value.
fn writers(history: &KeyHistory) -> HashMap<ValueId, Vec<usize>> {
    let mut writers: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (op, key_op) in history.ops.iter().enumerate() {
        if let Step::Put { value, .. } = key_op.step {
            writers.entry(value).or_default().push(op);
        }
    }
    writers
}

/// (return time, op) of the completed puts, by return time.
fn completed_puts_by_return(history: &KeyHistory) -> Vec<(u64, usize)> {
    let mut puts: Vec<(u64, usize)> = (0..history.ops.len())
        .filter(|&op| matches!(history.ops[op].step, Step::Put { .. }))
        .filter_map(|op| history.ops[op].return_ns.map(|return_ns| (return_ns, op)))
        .collect();
    puts.sort_unstable();
    puts
}

/// The completed put of a value other than `value` that returned last before `call_ns`.
fn last_other_put(
    history: &KeyHistory,
    puts: &[(u64, usize)],
    call_ns: u64,
    value: Option<ValueId>,
) -> Option<usize> {
    let before = puts.partition_point(|&(return_ns, _)| return_ns < call_ns);
    let other = |&&(_, op): &&(u64, usize)| match history.ops[op].step {
        Step::Put { value: written, .. } => Some(written) != value,
        Step::Get { .. } => false,
    };
    puts[..before].iter().rev().find(other).map(|&(_, op)| op)
}
