//! History types: what each client asked, when, and what it was told.
//!
//! The object under test is a map of registers. `Put { key, value }` replaces the key's value
//! and answers the key's new *version*, the number of puts applied to that key so far, this one
//! included (1 for the first put). `Get { key }` answers absent or the value with its version.
//! Versions make a put applied twice visible even when both applies wrote the same value. A
//! history source that does not know versions leaves them `None`; only values are compared then.
//!
//! Invariants a well-formed history keeps (the checker reports a malformed history as
//! inconclusive, naming the operation): the output variant matches the input variant, and a
//! completed operation does not return before it was called. Operations of one client do not
//! overlap, but the checker does not rely on it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes of a key or value shown in messages; longer ones are cut so one line stays readable.
const SHOWN_BYTES_MAX: usize = 32;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    Put { key: Vec<u8>, value: Vec<u8> },
    Get { key: Vec<u8> },
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

    pub fn key(&self) -> &[u8] {
        match self {
            Input::Put { key, .. } | Input::Get { key } => key,
        }
    }
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
    Put { version: Option<u64> },
    /// `None`: the key was absent.
    Get(Option<ReadValue>),
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

    pub fn key(&self) -> &[u8] {
        self.input.key()
    }

    /// Why this operation cannot be checked, if it is malformed.
    pub(crate) fn malformed(&self) -> Option<&'static str> {
        let OpResult::Ok(output) = &self.result else {
            return None;
        };
        match (&self.input, output) {
            (Input::Put { .. }, Output::Get(_)) => Some("a put answered with a get output"),
            (Input::Get { .. }, Output::Put { .. }) => Some("a get answered with a put output"),
            _ if self.return_ns < self.call_ns => Some("returned before it was called"),
            _ => None,
        }
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
            Output::Get(None) => write!(f, "absent"),
            Output::Get(Some(read)) => {
                write!(f, "{}", Shown(&read.value))?;
                fmt_version(f, read.version)
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
