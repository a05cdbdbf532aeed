//! History types: what each client asked, when, and what it was told.
//!
//! The object under test is a map of registers. `Put { key, value }` replaces the key's value
//! and answers the key's new *version*, the number of puts applied to that key since it was
//! last created, this one included (1 for the first put). `Get { key }` answers absent or the
//! value with its version. `Delete { key }` removes the key and answers whether it existed;
//! the key is then absent at version 0, and a later put creates it again at version 1.
//! `Txn` atomically evaluates its compares (on a key's version, 0 when absent, or its value;
//! a value compare on an absent key is false) and runs the `success` ops in order if all hold,
//! else the `failure` ops; each op sees the effects of the earlier ones, and the output has
//! one result per op of the branch taken. `Scan { start, end }` answers every present key in
//! [start, end) (an empty `end`: no upper bound) with its value and version, in key order.
//! Versions make a put applied twice visible even when both applies wrote the same value. A
//! history source that does not know versions leaves them `None`; they are not compared then.
//!
//! Invariants a well-formed history keeps (the checker reports a malformed history as
//! inconclusive, naming the operation): the output variant matches the input variant, a txn
//! answers one result of the matching kind per op of the branch it says it took, and a
//! completed operation does not return before it was called. Operations of one client do not
//! overlap, but the checker does not rely on it. A scan answering a key outside its range or
//! out of order is well formed but wrong: a violation.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes of a key or value shown in messages; longer ones are cut so one line stays readable.
const SHOWN_BYTES_MAX: usize = 32;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    /// Removes the key; answers whether it existed. A later put creates it again at version 1.
    Delete {
        key: Vec<u8>,
    },
    /// Atomically: if every compare holds, the `success` ops in order, else the `failure` ops.
    Txn {
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    },
    /// Every present key in [start, end) with its value and version, in key order.
    /// An empty `end` means no upper bound.
    Scan {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// One condition of a [`Input::Txn`]: the key's actual `target` kind `op` the given one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Compare {
    pub key: Vec<u8>,
    pub target: CompareTarget,
    pub op: CompareOp,
}

/// What a [`Compare`] looks at, with the operand it is compared against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's version (0 = the key is absent).
    Version(u64),
    /// The key's value, compared as bytes (lexicographic for Less/Greater). A value compare
    /// on an absent key is false whatever the op (as in etcd).
    Value(Vec<u8>),
}

/// `actual <op> given`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// One operation of a transaction branch; it sees the effects of the earlier ones.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
    Get { key: Vec<u8> },
}

/// The output of one [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnOpOutput {
    Put { version: Option<u64> },
    Delete { existed: bool },
    Get(Option<ReadValue>),
}

impl Compare {
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: u64) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::Version(version),
            op,
        }
    }

    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::Value(value.into()),
            op,
        }
    }
}

impl TxnOpOutput {
    pub fn put_version(version: u64) -> Self {
        TxnOpOutput::Put {
            version: Some(version),
        }
    }

    pub fn deleted(existed: bool) -> Self {
        TxnOpOutput::Delete { existed }
    }

    pub fn absent() -> Self {
        TxnOpOutput::Get(None)
    }

    pub fn found(value: impl Into<Vec<u8>>, version: u64) -> Self {
        TxnOpOutput::Get(Some(ReadValue {
            value: value.into(),
            version: Some(version),
        }))
    }
}

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Get { key: key.into() }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete { key: key.into() }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
        }
    }

    /// Whether it may change the store.
    pub fn writes(&self) -> bool {
        !matches!(self, TxnOp::Get { .. })
    }
}

impl Input {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Input::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Input::Get { key: key.into() }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Input::Delete { key: key.into() }
    }

    pub fn txn(compares: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Self {
        Input::Txn {
            compares,
            success,
            failure,
        }
    }

    /// A scan of [start, end); an empty `end` means no upper bound.
    pub fn scan(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Input::Scan {
            start: start.into(),
            end: end.into(),
        }
    }

    /// The keys the operation names, in order of appearance, without repeats: one for a put,
    /// get or delete, those of every compare and op of a txn, none for a scan (see
    /// [`Input::range`]).
    pub fn keys(&self) -> Vec<&[u8]> {
        let named: Vec<&[u8]> = match self {
            Input::Put { key, .. } | Input::Get { key } | Input::Delete { key } => vec![key],
            Input::Txn {
                compares,
                success,
                failure,
            } => compares
                .iter()
                .map(|c| c.key.as_slice())
                .chain(success.iter().chain(failure).map(TxnOp::key))
                .collect(),
            Input::Scan { .. } => Vec::new(),
        };
        let mut keys: Vec<&[u8]> = Vec::with_capacity(named.len());
        for key in named {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// The range [start, end) of a scan (an empty `end`: no upper bound); `None` otherwise.
    pub fn range(&self) -> Option<(&[u8], &[u8])> {
        match self {
            Input::Scan { start, end } => Some((start, end)),
            _ => None,
        }
    }

    /// Whether it may change the store: a put, a delete, a txn with a put or delete in a
    /// branch.
    pub fn writes(&self) -> bool {
        match self {
            Input::Put { .. } | Input::Delete { .. } => true,
            Input::Get { .. } | Input::Scan { .. } => false,
            Input::Txn {
                success, failure, ..
            } => success.iter().chain(failure).any(TxnOp::writes),
        }
    }
}

/// Whether `key` lies in the scan range [start, end) (an empty `end`: no upper bound).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// A value a get observed, with its version when the source knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReadValue {
    pub value: Vec<u8>,
    /// Puts applied to the key when it was read; `None` if the source does not know.
    pub version: Option<u64>,
}

/// What a client was told by an operation that completed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Output {
    /// `version`: puts applied to the key so far, this one included; `None` if unknown.
    Put {
        version: Option<u64>,
    },
    /// `None`: the key was absent.
    Get(Option<ReadValue>),
    Delete {
        existed: bool,
    },
    /// `results`: one per op of the branch taken, in order.
    Txn {
        succeeded: bool,
        results: Vec<TxnOpOutput>,
    },
    Scan(Vec<(Vec<u8>, ReadValue)>),
}

impl Output {
    pub fn put_version(version: u64) -> Self {
        Output::Put {
            version: Some(version),
        }
    }

    pub fn put_unversioned() -> Self {
        Output::Put { version: None }
    }

    pub fn absent() -> Self {
        Output::Get(None)
    }

    pub fn found(value: impl Into<Vec<u8>>, version: u64) -> Self {
        Output::Get(Some(ReadValue {
            value: value.into(),
            version: Some(version),
        }))
    }

    pub fn deleted(existed: bool) -> Self {
        Output::Delete { existed }
    }

    pub fn txn(succeeded: bool, results: Vec<TxnOpOutput>) -> Self {
        Output::Txn { succeeded, results }
    }

    /// A scan's entries, each (key, value, version).
    pub fn scan<K: Into<Vec<u8>>, V: Into<Vec<u8>>>(
        entries: impl IntoIterator<Item = (K, V, u64)>,
    ) -> Self {
        Output::Scan(
            entries
                .into_iter()
                .map(|(key, value, version)| {
                    let read = ReadValue {
                        value: value.into(),
                        version: Some(version),
                    };
                    (key.into(), read)
                })
                .collect(),
        )
    }

    pub fn found_unversioned(value: impl Into<Vec<u8>>) -> Self {
        Output::Get(Some(ReadValue {
            value: value.into(),
            version: None,
        }))
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpResult {
    /// It took effect exactly once, between its call and its return, and answered this.
    Ok(Output),
    /// It certainly did not take effect (refused before being applied).
    Failed,
    /// It may or may not have taken effect, at any time after its call (timed out, never
    /// returned). Its return time is ignored.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    /// The process that issued it: its operations never overlap.
    pub client: u64,
    pub input: Input,
    /// Invocation time, from a clock shared by every client of the history.
    pub call_ns: u64,
    pub result: OpResult,
    /// Completion time; ignored for [`OpResult::Unknown`] (treated as never).
    pub return_ns: u64,
}

impl Operation {
    pub fn new(client: u64, input: Input, call_ns: u64, result: OpResult, return_ns: u64) -> Self {
        Operation {
            client,
            input,
            call_ns,
            result,
            return_ns,
        }
    }

    /// The keys the operation names (see [`Input::keys`]).
    pub fn keys(&self) -> Vec<&[u8]> {
        self.input.keys()
    }

    /// Why this operation cannot be checked, if it is malformed.
    pub(crate) fn malformed(&self) -> Option<&'static str> {
        let OpResult::Ok(output) = &self.result else {
            return None;
        };
        match (&self.input, output) {
            (Input::Put { .. }, Output::Put { .. })
            | (Input::Get { .. }, Output::Get(_))
            | (Input::Delete { .. }, Output::Delete { .. })
            | (Input::Scan { .. }, Output::Scan(_)) => {}
            (Input::Put { .. }, Output::Get(_)) => return Some("a put answered with a get output"),
            (Input::Get { .. }, Output::Put { .. }) => {
                return Some("a get answered with a put output")
            }
            (
                Input::Txn {
                    success, failure, ..
                },
                Output::Txn { succeeded, results },
            ) => {
                let branch = if *succeeded { success } else { failure };
                if branch.len() != results.len() {
                    return Some("a txn answered a result count other than its branch's ops");
                }
                let fits = |(op, out): (&TxnOp, &TxnOpOutput)| {
                    matches!(
                        (op, out),
                        (TxnOp::Put { .. }, TxnOpOutput::Put { .. })
                            | (TxnOp::Delete { .. }, TxnOpOutput::Delete { .. })
                            | (TxnOp::Get { .. }, TxnOpOutput::Get(_))
                    )
                };
                if !branch.iter().zip(results).all(fits) {
                    return Some("a txn result does not match the kind of its branch's op");
                }
            }
            _ => return Some("the output does not match the kind of operation"),
        }
        if self.return_ns < self.call_ns {
            return Some("returned before it was called");
        }
        None
    }
}

/// Bytes shown quoted and escaped, cut after [`SHOWN_BYTES_MAX`].
pub(crate) struct Shown<'a>(pub &'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.len().min(SHOWN_BYTES_MAX);
        write!(f, "\"{}", self.0[..cut].escape_ascii())?;
        if cut < self.0.len() {
            write!(f, "...({} bytes)", self.0.len())?;
        }
        write!(f, "\"")
    }
}

fn fmt_version(f: &mut fmt::Formatter<'_>, version: Option<u64>) -> fmt::Result {
    match version {
        Some(version) => write!(f, " v{version}"),
        None => Ok(()),
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Put { key, value } => write!(f, "put({}, {})", Shown(key), Shown(value)),
            Input::Get { key } => write!(f, "get({})", Shown(key)),
            Input::Delete { key } => write!(f, "delete({})", Shown(key)),
            Input::Txn {
                compares,
                success,
                failure,
            } => {
                write!(f, "txn(if [")?;
                for (i, compare) in compares.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{compare}")?;
                }
                write!(f, "] then [")?;
                fmt_txn_ops(f, success)?;
                write!(f, "] else [")?;
                fmt_txn_ops(f, failure)?;
                write!(f, "])")
            }
            Input::Scan { start, end } if end.is_empty() => {
                write!(f, "scan({}, end)", Shown(start))
            }
            Input::Scan { start, end } => write!(f, "scan({}, {})", Shown(start), Shown(end)),
        }
    }
}

fn fmt_txn_ops(f: &mut fmt::Formatter<'_>, ops: &[TxnOp]) -> fmt::Result {
    for (i, op) in ops.iter().enumerate() {
        let sep = if i == 0 { "" } else { "; " };
        write!(f, "{sep}{op}")?;
    }
    Ok(())
}

impl fmt::Display for TxnOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnOp::Put { key, value } => write!(f, "put({}, {})", Shown(key), Shown(value)),
            TxnOp::Delete { key } => write!(f, "delete({})", Shown(key)),
            TxnOp::Get { key } => write!(f, "get({})", Shown(key)),
        }
    }
}

/// `version("k") == 3`, `value("k") < "x"`.
impl fmt::Display for Compare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            CompareOp::Equal => "==",
            CompareOp::NotEqual => "!=",
            CompareOp::Less => "<",
            CompareOp::Greater => ">",
        };
        match &self.target {
            CompareTarget::Version(v) => write!(f, "version({}) {op} {v}", Shown(&self.key)),
            CompareTarget::Value(v) => {
                write!(f, "value({}) {op} {}", Shown(&self.key), Shown(v))
            }
        }
    }
}

fn fmt_read(f: &mut fmt::Formatter<'_>, read: &Option<ReadValue>) -> fmt::Result {
    match read {
        None => write!(f, "absent"),
        Some(read) => {
            write!(f, "{}", Shown(&read.value))?;
            fmt_version(f, read.version)
        }
    }
}

impl fmt::Display for TxnOpOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnOpOutput::Put { version } => {
                write!(f, "ok")?;
                fmt_version(f, *version)
            }
            TxnOpOutput::Delete { existed } => write!(f, "existed {existed}"),
            TxnOpOutput::Get(read) => fmt_read(f, read),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Put { version } => {
                write!(f, "ok")?;
                fmt_version(f, *version)
            }
            Output::Get(read) => fmt_read(f, read),
            Output::Delete { existed } => write!(f, "existed {existed}"),
            Output::Txn { succeeded, results } => {
                write!(f, "{} [", if *succeeded { "then" } else { "else" })?;
                for (i, result) in results.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{result}")?;
                }
                write!(f, "]")
            }
            Output::Scan(entries) => {
                write!(f, "[")?;
                for (i, (key, read)) in entries.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{}: {}", Shown(key), Shown(&read.value))?;
                    fmt_version(f, read.version)?;
                }
                write!(f, "]")
            }
        }
    }
}

impl fmt::Display for OpResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpResult::Ok(output) => write!(f, "{output}"),
            OpResult::Failed => write!(f, "failed"),
            OpResult::Unknown => write!(f, "unknown"),
        }
    }
}

/// `client 3 put("k", "v") -> ok v2 [100, 250] ns`; unknown ops show `[100, -]`.
impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client {} {} -> {} [{}, ",
            self.client, self.input, self.result, self.call_ns
        )?;
        match self.result {
            OpResult::Unknown => write!(f, "-] ns"),
            _ => write!(f, "{}] ns", self.return_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_times_versions_and_escapes() {
        let op = Operation::new(
            3,
            Input::put("k", "v\n"),
            100,
            OpResult::Ok(Output::put_version(2)),
            250,
        );
        assert_eq!(
            op.to_string(),
            "client 3 put(\"k\", \"v\\n\") -> ok v2 [100, 250] ns"
        );
        let op = Operation::new(1, Input::get("k"), 7, OpResult::Unknown, 0);
        assert_eq!(op.to_string(), "client 1 get(\"k\") -> unknown [7, -] ns");
    }

    #[test]
    fn keys_ranges_and_writes_of_each_kind() {
        let txn = Input::txn(
            vec![Compare::version("b", CompareOp::Equal, 1)],
            vec![TxnOp::put("a", "1"), TxnOp::get("b")],
            vec![TxnOp::get("c")],
        );
        assert_eq!(txn.keys(), [b"b".as_slice(), b"a", b"c"]);
        assert!(txn.writes());
        let read_only = Input::txn(vec![], vec![TxnOp::get("a")], vec![TxnOp::get("a")]);
        assert_eq!(read_only.keys(), [b"a"]);
        assert!(!read_only.writes());
        let scan = Input::scan("a", "");
        assert!(scan.keys().is_empty());
        assert_eq!(scan.range(), Some((b"a".as_slice(), b"".as_slice())));
        assert!(in_range(b"zzz", b"a", b"") && !in_range(b"b", b"a", b"b"));
        assert!(Input::delete("k").writes() && !Input::get("k").writes());
    }

    #[test]
    fn long_values_are_cut() {
        let shown = Shown(&[b'x'; 40]).to_string();
        assert!(shown.ends_with("...(40 bytes)\""), "{shown}");
    }

    #[test]
    fn malformed_operations_are_named() {
        let op = Operation::new(
            1,
            Input::get("k"),
            5,
            OpResult::Ok(Output::put_version(1)),
            9,
        );
        assert_eq!(op.malformed(), Some("a get answered with a put output"));
        let op = Operation::new(1, Input::get("k"), 5, OpResult::Ok(Output::absent()), 4);
        assert_eq!(op.malformed(), Some("returned before it was called"));
        let op = Operation::new(1, Input::get("k"), 5, OpResult::Unknown, 0);
        assert_eq!(op.malformed(), None);
    }
}
