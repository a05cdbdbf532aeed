//! The register model of one key of puts and gets, and such a key's history prepared for the
//! search (other components go to `general`).
//!
//! Preparation drops what carries no information: `Failed` operations (they did not take
//! effect) and `Unknown` gets (nothing was observed). An `Unknown` put stays, as an *optional*
//! operation with no return: it may be linearized at any point after its call, or never (which
//! is the same as "at the very end", since nothing observes it then). Values are interned into
//! small ids so a model state is a `Copy` pair (value id, version) that hashes cheaply in the
//! search's cache.
//!
//! Unknown puts whose value no get read: without versions they are dropped (never applying
//! them explains the history as well as anything else); with versions they stay, share one
//! value id ([`UNREAD`]) and are ranked in call order, since any two are interchangeable (the
//! search applies them only just before a put, see `search`). A put without a version whose
//! value is unique takes the version a get saw with it.
//!
//! Invariants: `step` is a pure function of (state, operation); a state's version counts the
//! puts applied to it. When no operation of the key carries a version, versions are not
//! tracked at all (always 0), so states that differ only in an unobservable version count merge
//! in the cache.

use crate::history::{Input, OpResult, Operation, Output, Shown};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// Index into [`KeyHistory::values`], or [`UNREAD`].
pub(crate) type ValueId = u32;

/// The value of every unknown put that no get read: no get can tell them apart, so sharing
/// one id lets the cache merge states that differ only in which of them was applied last.
pub(crate) const UNREAD: ValueId = ValueId::MAX;

/// The state of one register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Register {
    pub value: Option<ValueId>,
    pub version: u64,
}

impl Register {
    pub const ABSENT: Register = Register {
        value: None,
        version: 0,
    };
}

/// One operation as the model sees it: the input and the output it must explain.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step {
    /// `version`: the version it answered, if known (always `None` for unknown puts).
    Put {
        value: ValueId,
        version: Option<u64>,
    },
    /// `read`: `None` if it saw the key absent.
    Get {
        read: Option<(ValueId, Option<u64>)>,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct KeyOp {
    pub step: Step,
    pub call_ns: u64,
    /// `None`: an unknown put, which may take effect any time after its call, or never.
    pub return_ns: Option<u64>,
    /// Index of the operation in the history the caller checked.
    pub source: usize,
    /// For an unknown put whose value no get read (kept only when versions are compared):
    /// its rank in call order among those puts. They are interchangeable, so the search applies
    /// them in this order only.
    pub unread_rank: Option<usize>,
    /// Whether this put's version was inferred from a get (which must then be shown with it).
    pub version_inferred: bool,
}

/// The operations of one key, ready for the search.
#[derive(Clone, Debug)]
pub(crate) struct KeyHistory {
    pub ops: Vec<KeyOp>,
    /// Interned values, indexed by [`ValueId`], to describe states in explanations; shared by
    /// the pieces cut from this history (shrinking cuts thousands).
    pub values: Arc<Vec<Vec<u8>>>,
    /// Whether versions are compared: some operation carries one, and the caller did not turn
    /// them off (shrinking does, to compare values alone). If not, versions stay 0.
    pub tracks_versions: bool,
    /// Versions of the puts shrinking took out of this piece, sorted; the piece's versions are
    /// renumbered to close those gaps (see [`KeyHistory::renumbered`]). Empty otherwise.
    pub removed_versions: Vec<u64>,
}

impl KeyHistory {
    /// Prepares the operations `indices` of `history` (all of one key).
    pub fn build(history: &[Operation], indices: &[usize]) -> Result<KeyHistory, String> {
        let mut builder = Builder::default();
        for &index in indices {
            builder.add(index, &history[index])?;
        }
        Ok(builder.finish())
    }

    /// The same key restricted to the operations at positions `keep` of `self.ops` (unread
    /// unknown puts ranked again, so their ranks stay 0, 1, 2, ...).
    pub fn subset(&self, keep: &[usize]) -> KeyHistory {
        let mut ops: Vec<KeyOp> = keep.iter().map(|&i| self.ops[i].clone()).collect();
        let mut ranked: Vec<usize> = (0..ops.len())
            .filter(|&op| ops[op].unread_rank.is_some())
            .collect();
        ranked.sort_by_key(|&op| ops[op].unread_rank);
        for (rank, op) in ranked.into_iter().enumerate() {
            ops[op].unread_rank = Some(rank);
        }
        KeyHistory {
            ops,
            values: self.values.clone(),
            tracks_versions: self.tracks_versions,
            removed_versions: self.removed_versions.clone(),
        }
    }

    /// This piece after shrinking took out the puts of versions `removed` (sorted) with every
    /// get of their values: each version above a removed one drops by one per removed version
    /// below it. In any linearization a put of known version w is the w-th put applied, so
    /// deleting it and its readers and shifting what follows leaves a linearization: a
    /// linearizable history stays linearizable, and a failing piece proves a failing whole.
    pub fn renumbered(mut self, removed: Vec<u64>) -> KeyHistory {
        let shift = |v: &mut u64| *v -= removed.partition_point(|&r| r < *v) as u64;
        for op in &mut self.ops {
            match &mut op.step {
                Step::Put {
                    version: Some(v), ..
                }
                | Step::Get {
                    read: Some((_, Some(v))),
                } => shift(v),
                Step::Put { .. } | Step::Get { .. } => {}
            }
        }
        self.removed_versions = self.merge_removed(removed);
        self
    }

    /// The versions removed before (whole-history numbering) with `removed` (this piece's
    /// numbering) mapped back to the whole history's numbering.
    fn merge_removed(&self, removed: Vec<u64>) -> Vec<u64> {
        let before = &self.removed_versions;
        let original = |v: u64| before.iter().fold(v, |o, &r| o + u64::from(r <= o));
        let mut merged: Vec<u64> = before
            .iter()
            .copied()
            .chain(removed.into_iter().map(original))
            .collect();
        merged.sort_unstable();
        merged
    }

    /// The state after `op` is applied to `state`, if `op`'s output is possible from `state`.
    pub fn step(&self, state: Register, op: usize) -> Option<Register> {
        match self.ops[op].step {
            Step::Put { value, version } => {
                let next = self.next_version(state);
                let ok = self.version_matches(version, next);
                ok.then_some(Register {
                    value: Some(value),
                    version: next,
                })
            }
            Step::Get { read: None } => state.value.is_none().then_some(state),
            Step::Get {
                read: Some((value, version)),
            } => {
                let ok = state.value == Some(value) && self.version_matches(version, state.version);
                ok.then_some(state)
            }
        }
    }

    /// Whether an output version agrees with the model's (always, when versions are off).
    fn version_matches(&self, output: Option<u64>, model: u64) -> bool {
        !self.tracks_versions || output.is_none_or(|v| v == model)
    }

    fn next_version(&self, state: Register) -> u64 {
        if self.tracks_versions {
            state.version + 1
        } else {
            0
        }
    }

    /// `"v2" v3`, `absent`: a state for explanations.
    pub fn show(&self, state: Register) -> impl fmt::Display + '_ {
        ShowState {
            history: self,
            state,
        }
    }
}

struct ShowState<'a> {
    history: &'a KeyHistory,
    state: Register,
}

impl fmt::Display for ShowState<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state.value {
            None => write!(f, "absent")?,
            Some(UNREAD) => write!(f, "holding a value no get read")?,
            Some(id) => write!(f, "{}", Shown(&self.history.values[id as usize]))?,
        }
        if self.history.tracks_versions {
            write!(f, " (version {})", self.state.version)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Builder {
    ops: Vec<KeyOp>,
    ids: HashMap<Vec<u8>, ValueId>,
    values: Vec<Vec<u8>>,
    tracks_versions: bool,
}

impl Builder {
    fn add(&mut self, source: usize, op: &Operation) -> Result<(), String> {
        if let Some(problem) = op.malformed() {
            return Err(format!(
                "malformed history: operation {source} ({op}): {problem}"
            ));
        }
        let (step, return_ns) = match (&op.input, &op.result) {
            (Input::Delete { .. } | Input::Txn { .. } | Input::Scan { .. }, _) => {
                return Err(format!(
                    "operation {source} ({op}) is not a put or get: the general search checks it"
                ))
            }
            (_, OpResult::Failed) | (Input::Get { .. }, OpResult::Unknown) => return Ok(()),
            (Input::Put { value, .. }, OpResult::Unknown) => (self.put(value, None), None),
            (input, OpResult::Ok(output)) => (self.completed(input, output), Some(op.return_ns)),
        };
        self.ops.push(KeyOp {
            step,
            call_ns: op.call_ns,
            return_ns,
            source,
            unread_rank: None,
            version_inferred: false,
        });
        Ok(())
    }

    fn completed(&mut self, input: &Input, output: &Output) -> Step {
        match (input, output) {
            (Input::Put { value, .. }, Output::Put { version }) => self.put(value, *version),
            (_, Output::Get(None)) => Step::Get { read: None },
            (_, Output::Get(Some(read))) => {
                self.tracks_versions |= read.version.is_some();
                Step::Get {
                    read: Some((self.intern(&read.value), read.version)),
                }
            }
            _ => unreachable!("invariant: checked by malformed() and add()"),
        }
    }

    fn put(&mut self, value: &[u8], version: Option<u64>) -> Step {
        self.tracks_versions |= version.is_some();
        Step::Put {
            value: self.intern(value),
            version,
        }
    }

    fn intern(&mut self, value: &[u8]) -> ValueId {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = ValueId::try_from(self.values.len())
            .expect("invariant: fewer than 2^32 values per key");
        self.ids.insert(value.to_vec(), id);
        self.values.push(value.to_vec());
        id
    }

    fn finish(mut self) -> KeyHistory {
        let read = self.read_values();
        if self.tracks_versions {
            self.infer_put_versions();
            self.rank_unread_unknown_puts(&read);
        } else {
            self.drop_unread_unknown_puts(&read);
        }
        KeyHistory {
            ops: self.ops,
            values: Arc::new(self.values),
            tracks_versions: self.tracks_versions,
            removed_versions: Vec::new(),
        }
    }

    fn read_values(&self) -> HashSet<ValueId> {
        let read = |op: &KeyOp| match op.step {
            Step::Get {
                read: Some((value, _)),
            } => Some(value),
            _ => None,
        };
        self.ops.iter().filter_map(read).collect()
    }

    fn is_unread_unknown_put(op: &KeyOp, read: &HashSet<ValueId>) -> bool {
        let Step::Put { value, .. } = op.step else {
            return false;
        };
        op.return_ns.is_none() && !read.contains(&value)
    }

    /// A put without a version (unknown, or a source that does not report put versions) whose
    /// value no other put writes takes the version a get saw with that value: in any
    /// linearization that get reads the state this put left. Knowing it, the search places
    /// the put (and the unread puts before it) exactly instead of trying every count.
    fn infer_put_versions(&mut self) {
        let mut writers: HashMap<ValueId, usize> = HashMap::new();
        let mut seen: HashMap<ValueId, u64> = HashMap::new();
        for op in &self.ops {
            match op.step {
                Step::Put { value, .. } => *writers.entry(value).or_default() += 1,
                Step::Get {
                    read: Some((value, Some(version))),
                } => {
                    seen.entry(value).or_insert(version);
                }
                Step::Get { .. } => {}
            }
        }
        for op in &mut self.ops {
            if let Step::Put {
                value,
                version: version @ None,
            } = &mut op.step
            {
                if writers[value] == 1 {
                    *version = seen.get(value).copied();
                    op.version_inferred = version.is_some();
                }
            }
        }
    }

    /// Comparing values only, an unknown put whose value no get read changes nothing anyone
    /// saw: "never applied" explains the history as well as any other choice. Dropping it
    /// spares the search a branch per pending put (2^n subsets when the history fails).
    fn drop_unread_unknown_puts(&mut self, read: &HashSet<ValueId>) {
        self.ops.retain(|op| !Self::is_unread_unknown_put(op, read));
    }

    /// With versions such a put must stay (applied, it shifts later versions), but any two of
    /// them are interchangeable once both are called: give them one value ([`UNREAD`]) and a
    /// call-order rank, so the search applies the earliest pending one only. Any
    /// linearization maps to one of that shape: the i-th applied is replaced by the i-th
    /// called, which was called no later.
    fn rank_unread_unknown_puts(&mut self, read: &HashSet<ValueId>) {
        let mut unread: Vec<usize> = (0..self.ops.len())
            .filter(|&op| Self::is_unread_unknown_put(&self.ops[op], read))
            .collect();
        unread.sort_by_key(|&op| (self.ops[op].call_ns, op));
        for (rank, op) in unread.into_iter().enumerate() {
            let key_op = &mut self.ops[op];
            key_op.step = Step::Put {
                value: UNREAD,
                version: None,
            };
            key_op.unread_rank = Some(rank);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_history(ops: &[Operation]) -> KeyHistory {
        let indices: Vec<usize> = (0..ops.len()).collect();
        KeyHistory::build(ops, &indices).expect("well formed")
    }

    fn ok(client: u64, input: Input, output: Output) -> Operation {
        Operation::new(client, input, 0, OpResult::Ok(output), 1)
    }

    #[test]
    fn put_checks_the_next_version_and_get_the_current_one() {
        let h = key_history(&[
            ok(1, Input::put("k", "a"), Output::put_version(1)),
            ok(1, Input::get("k"), Output::found("a", 1)),
            ok(1, Input::get("k"), Output::absent()),
        ]);
        assert!(h.tracks_versions);
        let after_put = h.step(Register::ABSENT, 0).expect("first put is version 1");
        assert_eq!(
            after_put,
            Register {
                value: Some(0),
                version: 1
            }
        );
        assert_eq!(
            h.step(after_put, 0),
            None,
            "a second apply would be version 2"
        );
        assert_eq!(h.step(after_put, 1), Some(after_put));
        assert_eq!(h.step(Register::ABSENT, 1), None);
        assert_eq!(h.step(Register::ABSENT, 2), Some(Register::ABSENT));
        assert_eq!(h.step(after_put, 2), None);
    }

    #[test]
    fn without_versions_only_values_are_compared() {
        let h = key_history(&[
            ok(1, Input::put("k", "a"), Output::put_unversioned()),
            ok(1, Input::get("k"), Output::found_unversioned("a")),
        ]);
        assert!(!h.tracks_versions);
        let after_put = h
            .step(Register::ABSENT, 0)
            .expect("unversioned put always applies");
        assert_eq!(
            h.step(after_put, 0),
            Some(after_put),
            "states merge: version stays 0"
        );
        assert_eq!(h.step(after_put, 1), Some(after_put));
    }

    #[test]
    fn failed_ops_and_unknown_gets_are_dropped_unknown_puts_are_optional() {
        let h = key_history(&[
            Operation::new(1, Input::put("k", "a"), 0, OpResult::Failed, 1),
            Operation::new(2, Input::get("k"), 0, OpResult::Unknown, 0),
            Operation::new(3, Input::put("k", "b"), 5, OpResult::Unknown, 0),
            ok(4, Input::get("k"), Output::found_unversioned("b")),
        ]);
        assert_eq!(h.ops.len(), 2);
        assert_eq!(h.ops[0].source, 2);
        assert_eq!(h.ops[0].return_ns, None, "unknown put: no return");
    }

    #[test]
    fn unread_unknown_puts_are_dropped_without_versions_and_ranked_with() {
        let history = |get: Output| {
            key_history(&[
                Operation::new(1, Input::put("k", "a"), 0, OpResult::Unknown, 0),
                ok(2, Input::get("k"), get),
            ])
        };
        assert_eq!(history(Output::absent()).ops.len(), 1, "nothing read \"a\"");
        assert_eq!(history(Output::found_unversioned("a")).ops.len(), 2);
        let versioned = history(Output::found("b", 1));
        assert!(versioned.tracks_versions);
        assert_eq!(versioned.ops.len(), 2, "applied, it would shift versions");
        assert_eq!(versioned.ops[0].unread_rank, Some(0));
        assert!(matches!(
            versioned.ops[0].step,
            Step::Put { value: UNREAD, .. }
        ));
    }
}

#[cfg(test)]
mod subset_tests {
    use super::*;

    #[test]
    fn renumbering_twice_records_removed_versions_in_whole_history_numbering() {
        let put = |version| {
            Operation::new(
                1,
                Input::put("k", format!("v{version}")),
                0,
                OpResult::Ok(Output::put_version(version)),
                1,
            )
        };
        let ops: Vec<Operation> = (1..=5).map(put).collect();
        let h = KeyHistory::build(&ops, &[0, 1, 2, 3, 4]).expect("well formed");
        let once = h.subset(&[0, 1, 3, 4]).renumbered(vec![3]);
        let versions = |h: &KeyHistory| -> Vec<Option<u64>> {
            h.ops
                .iter()
                .map(|op| match op.step {
                    Step::Put { version, .. } => version,
                    Step::Get { .. } => None,
                })
                .collect()
        };
        assert_eq!(versions(&once), [Some(1), Some(2), Some(3), Some(4)]);
        // Removing the piece's version 3 (the whole history's version 4) next.
        let twice = once.subset(&[0, 1, 3]).renumbered(vec![3]);
        assert_eq!(versions(&twice), [Some(1), Some(2), Some(3)]);
        assert_eq!(twice.removed_versions, [3, 4]);
    }

    #[test]
    fn put_versions_are_inferred_from_reads_of_unique_values() {
        let ops = [
            Operation::new(1, Input::put("k", "a"), 0, OpResult::Unknown, 0),
            Operation::new(
                2,
                Input::put("k", "b"),
                0,
                OpResult::Ok(Output::put_unversioned()),
                5,
            ),
            Operation::new(
                3,
                Input::put("k", "b"),
                0,
                OpResult::Ok(Output::put_unversioned()),
                5,
            ),
            Operation::new(
                4,
                Input::get("k"),
                0,
                OpResult::Ok(Output::found("a", 4)),
                9,
            ),
            Operation::new(
                4,
                Input::get("k"),
                0,
                OpResult::Ok(Output::found("b", 2)),
                9,
            ),
        ];
        let h = KeyHistory::build(&ops, &[0, 1, 2, 3, 4]).expect("well formed");
        let versions: Vec<Option<u64>> = h.ops[..3]
            .iter()
            .map(|op| match op.step {
                Step::Put { version, .. } => version,
                Step::Get { .. } => unreachable!("puts first"),
            })
            .collect();
        assert_eq!(versions, [Some(4), None, None], "\"b\" has two writers");
    }

    #[test]
    fn subset_ranks_unread_unknown_puts_again() {
        let unknown = |client: u64, value: &str| {
            Operation::new(client, Input::put("k", value), client, OpResult::Unknown, 0)
        };
        let get = Operation::new(
            9,
            Input::get("k"),
            0,
            OpResult::Ok(Output::found("x", 3)),
            1,
        );
        let ops = [unknown(1, "a"), unknown(2, "b"), unknown(3, "c"), get];
        let h = KeyHistory::build(&ops, &[0, 1, 2, 3]).expect("well formed");
        let ranks: Vec<Option<usize>> = h.ops.iter().map(|op| op.unread_rank).collect();
        assert_eq!(ranks, [Some(0), Some(1), Some(2), None]);
        let piece = h.subset(&[0, 2, 3]);
        let ranks: Vec<Option<usize>> = piece.ops.iter().map(|op| op.unread_rank).collect();
        assert_eq!(ranks, [Some(0), Some(1), None]);
    }
}
