//! Shrinking a failing key history to a small piece that still fails, without inventing
//! failures the history does not have.
//!
//! Removing operations from a history can make it fail for a new reason: a get whose put was
//! removed now reads a value never written, and removing a put shifts the versions of later
//! ones. So removal works on *units* whose removal keeps a linearizable history linearizable:
//! a unit is a value, all puts writing it and all gets reading it (a linearization minus such
//! a unit is still one, since nothing left read the removed value); gets reading "absent" are
//! units of their own. When versions are compared, the versions above a removed put drop by
//! one ([`KeyHistory::renumbered`]: a put of known version w is the w-th applied in every
//! linearization), and a value with a put of unknown version is not removable (its gets are,
//! one by one). When the values alone already conflict, versions are ignored altogether.
//!
//! A long history is first narrowed with the search's dead end: the units of the operation it
//! could not place and of the last few it had placed often fail on their own.
//!
//! Once no unit can go, the remaining gets are tried one by one (removing a get is always
//! safe), so legitimate reads of the value a stale read saw go too.
//!
//! Hence a piece that fails proves the whole history fails. Units are removed by a simplified
//! delta debugging (Zeller & Hildebrandt 2002): chunks of units, halving the chunk size down to
//! single units, repeated until nothing more can go. Each trial is a full search bounded by
//! the shrink deadline; a trial that runs out of time counts as "not known to fail".
//!
//! Invariant: the returned piece was found non-linearizable by a completed search, or is the
//! input (which the caller found non-linearizable). At the deadline shrinking stops early.

use crate::model::{KeyHistory, Step};
use crate::search::{search, DeadEnd, Outcome};
use std::collections::BTreeMap;
use std::time::Instant;

/// A piece of `history` that is still not linearizable. It compares values only (versions
/// off) when the values alone already conflict.
pub(crate) fn shrink(
    history: &KeyHistory,
    hint: Option<&DeadEnd>,
    deadline: Instant,
) -> KeyHistory {
    let focused = hint.and_then(|dead_end| focus(history, dead_end, deadline));
    let current = focused.unwrap_or_else(|| history.clone());
    let values_only = KeyHistory {
        tracks_versions: false,
        ..current.clone()
    };
    let base = if fails(&values_only, deadline) {
        values_only
    } else {
        current
    };
    let (units, fixed) = units(&base);
    let units = remove_units(&base, units, &fixed, deadline);
    let (reads, fixed) = split_reads(&base, units, fixed);
    let reads = remove_units(&base, reads, &fixed, deadline);
    piece(&base, &reads, &fixed)
}

/// The piece made of the units of the blocked operation and of the last k operations of the
/// dead end's order, for the first k = 1, 2, 4, ... for which it fails. On a long history
/// this finds a small failing core with a few small searches, where even deciding whether
/// values alone conflict would take an exhaustive search of the whole key.
fn focus(history: &KeyHistory, dead_end: &DeadEnd, deadline: Instant) -> Option<KeyHistory> {
    let (units, fixed) = units(history);
    let mut unit_of = vec![None; history.ops.len()];
    for (index, unit) in units.iter().enumerate() {
        unit.iter().for_each(|&op| unit_of[op] = Some(index));
    }
    let mut k = 1;
    while k <= dead_end.tail.len() && Instant::now() < deadline {
        let ops = dead_end.tail[dead_end.tail.len() - k..]
            .iter()
            .chain([&dead_end.blocked]);
        let mut chosen: Vec<usize> = ops.filter_map(|&op| unit_of[op]).collect();
        chosen.sort_unstable();
        chosen.dedup();
        let candidate: Vec<Vec<usize>> = chosen
            .into_iter()
            .map(|index| units[index].clone())
            .collect();
        let candidate = piece(history, &candidate, &fixed);
        if fails(&candidate, deadline) {
            return Some(candidate);
        }
        k *= 2;
    }
    None
}

/// The surviving units' gets as units of their own (a get can always go alone: nothing
/// depends on it), their puts kept. Gets of a value whose put took its version from a get
/// stay too: without them the piece would not show why that version is required.
fn split_reads(
    base: &KeyHistory,
    units: Vec<Vec<usize>>,
    mut fixed: Vec<usize>,
) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut reads = Vec::new();
    for unit in units {
        let inferred = unit.iter().any(|&op| base.ops[op].version_inferred);
        for op in unit {
            match base.ops[op].step {
                Step::Get { .. } if !inferred => reads.push(vec![op]),
                _ => fixed.push(op),
            }
        }
    }
    (reads, fixed)
}

/// Removable units and the operations that stay: one unit per value (its puts and reads), one
/// per read of "absent". With versions, a value is removable only if all its puts have known
/// versions (to renumber); otherwise its puts stay and each of its reads is a unit.
fn units(base: &KeyHistory) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut by_value: BTreeMap<u32, (Vec<usize>, bool)> = BTreeMap::new();
    let mut units = Vec::new();
    for (op, key_op) in base.ops.iter().enumerate() {
        match key_op.step {
            Step::Put { value, version } => {
                let (group, removable) = by_value.entry(value).or_insert((Vec::new(), true));
                group.push(op);
                *removable &= version.is_some() || !base.tracks_versions;
            }
            Step::Get {
                read: Some((value, _)),
            } => by_value
                .entry(value)
                .or_insert((Vec::new(), true))
                .0
                .push(op),
            Step::Get { read: None } => units.push(vec![op]),
        }
    }
    let mut fixed = Vec::new();
    for (group, removable) in by_value.into_values() {
        if removable {
            units.push(group);
            continue;
        }
        let is_put = |op: &usize| matches!(base.ops[*op].step, Step::Put { .. });
        let (puts, gets): (Vec<usize>, Vec<usize>) = group.into_iter().partition(is_put);
        fixed.extend(puts);
        units.extend(gets.into_iter().map(|op| vec![op]));
    }
    (units, fixed)
}

/// The piece made of `units` and `fixed`, versions renumbered over the removed puts.
fn piece(base: &KeyHistory, units: &[Vec<usize>], fixed: &[usize]) -> KeyHistory {
    let keep = flatten(units, fixed);
    let mut kept = vec![false; base.ops.len()];
    keep.iter().for_each(|&op| kept[op] = true);
    let mut removed: Vec<u64> = (0..base.ops.len())
        .filter(|&op| !kept[op] && base.tracks_versions)
        .filter_map(|op| match base.ops[op].step {
            Step::Put { version, .. } => version,
            Step::Get { .. } => None,
        })
        .collect();
    removed.sort_unstable();
    base.subset(&keep).renumbered(removed)
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
        if fails(&piece(base, &trial, fixed), deadline) {
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
