//! Shrinking a failing key history to a small piece that still fails, without inventing
//! failures the history does not have.
//!
//! Removing operations from a history can make it fail for a new reason: a get whose put was
//! removed now reads a value never written, and removing any put shifts the versions of later
//! ones. So removal works on *units* whose removal keeps a linearizable history linearizable:
//!
//! - if the history fails with values alone (versions ignored), a unit is a value: all puts
//!   writing it and all gets reading it (a linearization minus such a unit is still one, since
//!   nothing left read the removed value); gets reading "absent" are units of their own;
//! - otherwise the failure needs versions, and only gets are removed (puts set the versions).
//!
//! Hence a piece that fails proves the whole history fails. Units are removed by a simplified
//! delta debugging (Zeller & Hildebrandt 2002): chunks of units, halving the chunk size down to
//! single units, repeated until nothing more can go. Each trial is a full search bounded by
//! the shrink deadline; a trial that runs out of time counts as "not known to fail".
//!
//! Invariant: the returned piece was found non-linearizable by a completed search, or is the
//! input (which the caller found non-linearizable). At the deadline shrinking stops early.

use crate::model::{KeyHistory, Step};
use crate::search::{search, Outcome};
use std::collections::BTreeMap;
use std::time::Instant;

/// A piece of `history` that is still not linearizable. It compares values only (versions
/// off) when the values alone already conflict.
pub(crate) fn shrink(history: &KeyHistory, deadline: Instant) -> KeyHistory {
    let values_only = KeyHistory {
        tracks_versions: false,
        ..history.clone()
    };
    let (base, units, fixed) = if fails(&values_only, deadline) {
        (values_only, value_units(history), Vec::new())
    } else {
        get_units(history)
    };
    let units = remove_units(&base, units, &fixed, deadline);
    base.subset(&flatten(&units, &fixed))
}

/// One unit per value (its puts and reads) and one per read of "absent".
fn value_units(history: &KeyHistory) -> Vec<Vec<usize>> {
    let mut by_value: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut units = Vec::new();
    for (op, key_op) in history.ops.iter().enumerate() {
        match key_op.step {
            Step::Put { value, .. }
            | Step::Get {
                read: Some((value, _)),
            } => by_value.entry(value).or_default().push(op),
            Step::Get { read: None } => units.push(vec![op]),
        }
    }
    units.extend(by_value.into_values());
    units
}

/// With versions, the base history itself, one unit per get, and the puts kept fixed.
fn get_units(history: &KeyHistory) -> (KeyHistory, Vec<Vec<usize>>, Vec<usize>) {
    let is_put = |op: &usize| matches!(history.ops[*op].step, Step::Put { .. });
    let (puts, gets): (Vec<usize>, Vec<usize>) = (0..history.ops.len()).partition(is_put);
    (
        history.clone(),
        gets.into_iter().map(|op| vec![op]).collect(),
        puts,
    )
}

fn remove_units(
    base: &KeyHistory,
    mut units: Vec<Vec<usize>>,
    fixed: &[usize],
    deadline: Instant,
) -> Vec<Vec<usize>> {
    let mut chunk = (units.len() / 2).max(1);
    loop {
        let removed_any = remove_chunks(base, &mut units, fixed, chunk, deadline);
        if Instant::now() >= deadline || (chunk == 1 && !removed_any) {
            return units;
        }
        chunk = (chunk / 2).max(1);
    }
}

/// One pass over `units` removing chunks of `chunk` units; whether it removed any.
fn remove_chunks(
    base: &KeyHistory,
    units: &mut Vec<Vec<usize>>,
    fixed: &[usize],
    chunk: usize,
    deadline: Instant,
) -> bool {
    let mut removed_any = false;
    let mut start = 0;
    while start < units.len() && Instant::now() < deadline {
        let end = (start + chunk).min(units.len());
        let trial: Vec<Vec<usize>> = units[..start]
            .iter()
            .chain(&units[end..])
            .cloned()
            .collect();
        if fails(&base.subset(&flatten(&trial, fixed)), deadline) {
            *units = trial;
            removed_any = true;
        } else {
            start = end;
        }
    }
    removed_any
}

/// The operations of `units` and `fixed`, in their original order.
fn flatten(units: &[Vec<usize>], fixed: &[usize]) -> Vec<usize> {
    let mut ops: Vec<usize> = units.iter().flatten().chain(fixed).copied().collect();
    ops.sort_unstable();
    ops
}

fn fails(history: &KeyHistory, deadline: Instant) -> bool {
    matches!(search(history, deadline, false), Outcome::Violation(_))
}
