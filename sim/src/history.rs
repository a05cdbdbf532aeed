//! [`History`]: what the simulated clients saw (call and return times, results), checked for
//! linearizability against the order in which the cluster applied the writes.
//!
//! ```text
//!   clients ──record──▶ History ──check(applied)──▶ Ok(acknowledged writes checked) | Err
//!                                   ▲
//!   committed log replayed ─────────┘  applied: value -> (key, version)
//! ```
//!
//! Every put writes a value no other put writes, and the state machine numbers the puts of a
//! key (`version`), so the committed log fixes the order of the writes of every key. With the
//! write order known, linearizability of a key's history is decided exactly by one greedy pass:
//! walk the versions in order, put each write, then the reads of its value, at the earliest
//! instant inside its `[call, return]` interval that is after everything placed before; the
//! history is linearizable iff every operation fits (placing early never hurts a later one).
//! Keys are independent (linearizability is local). Puts whose result is unknown count from
//! their call until forever if they applied, and not at all otherwise.
//!
//! Invariants checked on the way: an acknowledged put is in the committed log with the version
//! it was answered with; a read returns a value some put wrote, with that put's version.

use std::collections::BTreeMap;

/// What an operation asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Put {
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    /// A transaction or a scan, on keys no put or get uses: checked by `kvraft-checker`
    /// only (the greedy pass below knows registers of puts with unique values).
    Checker(kvraft_checker::Input),
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The key's version after this put.
    Put(u64),
    /// The value and its version, `None` if the key was never written.
    Get(Option<(String, u64)>),
    /// The answer to an [`Input::Checker`].
    Checker(kvraft_checker::Output),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Ok(Output),
    /// Definitely did not take effect.
    Failed,
    /// May or may not have taken effect (the client gave up).
    Unknown,
}

/// One client operation as the client saw it. Times are simulated nanoseconds, unique per
/// event (ms * 1e6 + the event's rank within that ms), so real-time order is exact.
#[derive(Clone, Debug)]
pub struct Operation {
    /// A sequential process: one client slot.
    pub client: u32,
    pub input: Input,
    pub call_ns: u64,
    pub result: OpResult,
    /// `u64::MAX` for an unknown result.
    pub return_ns: u64,
}

#[derive(Debug, Default)]
pub struct History {
    pub ops: Vec<Operation>,
    /// Scans at a past revision, checked against the replay (`Invariants::check_past_reads`).
    pub past_reads: Vec<crate::client::PastRead>,
}

/// An operation's interval.
#[derive(Clone, Copy, Debug)]
struct Span {
    call: u64,
    ret: u64,
    op: usize,
}

#[derive(Default)]
struct Cluster {
    write: Option<Span>,
    reads: Vec<Span>,
}

impl History {
    pub fn record(&mut self, op: Operation) {
        self.ops.push(op);
    }

    /// The history in the form `kvraft-checker` takes.
    pub fn to_checker(&self) -> Vec<kvraft_checker::Operation> {
        use kvraft_checker as lc;
        self.ops
            .iter()
            .map(|op| {
                let input = match &op.input {
                    Input::Put { key, value } => lc::Input::put(key.as_str(), value.as_str()),
                    Input::Get { key } => lc::Input::get(key.as_str()),
                    Input::Checker(input) => input.clone(),
                };
                let result = match &op.result {
                    OpResult::Ok(Output::Put(v)) => lc::OpResult::Ok(lc::Output::put_version(*v)),
                    OpResult::Ok(Output::Checker(out)) => lc::OpResult::Ok(out.clone()),
                    OpResult::Ok(Output::Get(None)) => lc::OpResult::Ok(lc::Output::absent()),
                    OpResult::Ok(Output::Get(Some((value, v)))) => {
                        lc::OpResult::Ok(lc::Output::found(value.as_str(), *v))
                    }
                    OpResult::Failed => lc::OpResult::Failed,
                    OpResult::Unknown => lc::OpResult::Unknown,
                };
                lc::Operation::new(
                    u64::from(op.client),
                    input,
                    op.call_ns,
                    result,
                    op.return_ns,
                )
            })
            .collect()
    }

    /// Checks the history against `applied` (value -> (key, version) of every put the
    /// committed log applied). Returns the number of acknowledged puts checked.
    pub fn check(&self, applied: &BTreeMap<String, (String, u64)>) -> Result<u64, String> {
        let mut keys: BTreeMap<&str, BTreeMap<u64, Cluster>> = BTreeMap::new();
        let mut acked = 0;
        for (i, op) in self.ops.iter().enumerate() {
            let span = Span {
                call: op.call_ns,
                ret: op.return_ns,
                op: i,
            };
            match (&op.input, &op.result) {
                (Input::Put { key, value }, result) => {
                    let found = applied.get(value);
                    let version = match (result, found) {
                        (OpResult::Ok(Output::Put(v)), Some((k, applied_v)))
                            if k == key && applied_v == v =>
                        {
                            acked += 1;
                            *v
                        }
                        (OpResult::Ok(out), found) => {
                            return Err(format!(
                                "put {key}={value} was acknowledged with {out:?} but the \
                                 committed log applied it as {found:?}: {op:?}"
                            ));
                        }
                        (OpResult::Failed, Some(_)) => {
                            return Err(format!("put reported failed took effect: {op:?}"));
                        }
                        (OpResult::Unknown, Some((_, v))) => *v,
                        (OpResult::Failed | OpResult::Unknown, None) => continue,
                    };
                    let cluster = keys.entry(key).or_default().entry(version).or_default();
                    if cluster.write.is_some() {
                        return Err(format!("two puts applied as version {version} of {key}"));
                    }
                    cluster.write = Some(span);
                }
                (Input::Get { key }, OpResult::Ok(Output::Get(read))) => {
                    let version = match read {
                        None => 0,
                        Some((value, version)) => match applied.get(value) {
                            Some((k, v)) if k == key && v == version => *version,
                            other => {
                                return Err(format!(
                                    "get of {key} returned {value}@{version}, which the \
                                     committed log applied as {other:?}: {op:?}"
                                ));
                            }
                        },
                    };
                    let cluster = keys.entry(key).or_default().entry(version).or_default();
                    cluster.reads.push(span);
                }
                (Input::Get { .. }, OpResult::Ok(out)) => {
                    return Err(format!("get answered with a put's output {out:?}: {op:?}"));
                }
                (Input::Get { .. }, OpResult::Failed | OpResult::Unknown) => {}
                (Input::Checker(_), _) => {}
            }
        }
        for (key, clusters) in &keys {
            self.check_key(key, clusters)?;
        }
        Ok(acked)
    }

    /// The greedy pass over one key's versions (see the module docs).
    fn check_key(&self, key: &str, clusters: &BTreeMap<u64, Cluster>) -> Result<(), String> {
        // A point is (ns, epsilons): strictly after ns by that many infinitesimal steps.
        let mut cur: (u64, u64) = (0, 0);
        let top = clusters.keys().next_back().copied().unwrap_or(0);
        for version in 0..=top {
            let cluster = clusters.get(&version);
            let mut after_write = cur;
            if version > 0 {
                let Some(w) = cluster.and_then(|c| c.write) else {
                    return Err(format!(
                        "version {version} of {key} is read or followed by later writes, but \
                         no client put it"
                    ));
                };
                after_write =
                    place(cur, w).ok_or_else(|| self.explain(key, version, w, "put", cur))?;
            }
            let mut next = after_write;
            for &r in cluster.map(|c| c.reads.as_slice()).unwrap_or(&[]) {
                let p = place(after_write, r)
                    .ok_or_else(|| self.explain(key, version, r, "get", after_write))?;
                next = next.max(p);
            }
            cur = next;
        }
        Ok(())
    }

    fn explain(
        &self,
        key: &str,
        version: u64,
        span: Span,
        what: &str,
        after: (u64, u64),
    ) -> String {
        format!(
            "not linearizable: {what} of {key} at version {version} must come after ns {} but \
             returned at ns {}: {:?}",
            after.0, span.ret, self.ops[span.op]
        )
    }
}

/// The earliest point inside `span` after `after`, if any.
fn place(after: (u64, u64), span: Span) -> Option<(u64, u64)> {
    let p = if after.0 >= span.call {
        (after.0, after.1 + 1)
    } else {
        (span.call, 1)
    };
    (p.0 < span.ret).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: u32, key: &str, value: &str, call: u64, ret: u64, v: Option<u64>) -> Operation {
        Operation {
            client,
            input: Input::Put {
                key: key.into(),
                value: value.into(),
            },
            call_ns: call,
            result: v.map_or(OpResult::Unknown, |v| OpResult::Ok(Output::Put(v))),
            return_ns: if v.is_some() { ret } else { u64::MAX },
        }
    }

    fn get(client: u32, key: &str, call: u64, ret: u64, read: Option<(&str, u64)>) -> Operation {
        Operation {
            client,
            input: Input::Get { key: key.into() },
            call_ns: call,
            result: OpResult::Ok(Output::Get(read.map(|(v, n)| (v.to_string(), n)))),
            return_ns: ret,
        }
    }

    fn applied(list: &[(&str, &str, u64)]) -> BTreeMap<String, (String, u64)> {
        list.iter()
            .map(|(value, key, v)| (value.to_string(), (key.to_string(), *v)))
            .collect()
    }

    #[test]
    fn concurrent_ops_in_any_consistent_order_pass() {
        let mut h = History::default();
        h.record(put(1, "k", "a", 10, 40, Some(1)));
        h.record(put(2, "k", "b", 20, 30, Some(2)));
        h.record(get(3, "k", 15, 35, Some(("b", 2))));
        h.record(get(4, "k", 5, 12, None));
        let applied = applied(&[("a", "k", 1), ("b", "k", 2)]);
        assert_eq!(h.check(&applied), Ok(2));
    }

    #[test]
    fn stale_read_after_acknowledged_write_fails() {
        let mut h = History::default();
        h.record(put(1, "k", "a", 10, 20, Some(1)));
        h.record(get(2, "k", 30, 40, None));
        let err = h.check(&applied(&[("a", "k", 1)])).unwrap_err();
        assert!(err.contains("not linearizable"), "{err}");
    }

    #[test]
    fn reads_going_backwards_fail() {
        let mut h = History::default();
        h.record(put(1, "k", "a", 10, 100, None));
        h.record(get(2, "k", 20, 30, Some(("a", 1))));
        h.record(get(3, "k", 40, 50, None));
        assert!(h.check(&applied(&[("a", "k", 1)])).is_err());
    }

    #[test]
    fn lost_acknowledged_write_fails_and_unapplied_unknown_is_ignored() {
        let mut h = History::default();
        h.record(put(1, "k", "a", 10, 20, None));
        assert_eq!(h.check(&applied(&[])), Ok(0));
        h.record(put(1, "k", "b", 30, 40, Some(1)));
        let err = h.check(&applied(&[])).unwrap_err();
        assert!(err.contains("acknowledged"), "{err}");
    }
}
