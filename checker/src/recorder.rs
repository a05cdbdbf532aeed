//! Recording a history from concurrent clients.
//!
//! Each client calls [`HistoryRecorder::invoke`] just before it sends an operation and
//! [`HistoryRecorder::complete`] just after it learns the outcome. Times come from one
//! monotonic clock (`Instant`) started with the recorder, so they are comparable across
//! threads and tasks. The recorder is a cheap `Clone` handle over a shared `Mutex`; the lock is
//! held only to read the clock and push or update one entry, never across an `.await`.
//!
//! ```
//! use kvraft_checker::{check, CheckResult, HistoryRecorder, Input, OpResult, Output};
//!
//! let recorder = HistoryRecorder::new();
//! let handle = recorder.clone(); // one per client task
//! let id = handle.invoke(7, Input::put("k", "v"));
//! // ... send the put, wait for the answer ...
//! handle.complete(id, OpResult::Ok(Output::put_version(1)));
//! assert_eq!(check(&recorder.history()), CheckResult::Linearizable);
//! ```
//!
//! Invariants: a call time is taken before the operation can take effect and a return time
//! after (both under the lock, so recorded order matches clock order); an operation never
//! completed appears as [`OpResult::Unknown`] in [`HistoryRecorder::history`].

use crate::history::{Input, OpResult, Operation};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Names an invoked operation, to complete it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(usize);

/// A thread-safe recorder of a history; clones share the same history.
#[derive(Clone, Debug)]
pub struct HistoryRecorder {
    inner: Arc<Mutex<Recording>>,
}

#[derive(Debug)]
struct Recording {
    /// Origin of every timestamp of this history.
    origin: Instant,
    ops: Vec<Operation>,
    /// Whether each op has been completed, to refuse completing it twice.
    completed: Vec<bool>,
}

impl Default for HistoryRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl HistoryRecorder {
    pub fn new() -> Self {
        let recording = Recording {
            origin: Instant::now(),
            ops: Vec::new(),
            completed: Vec::new(),
        };
        HistoryRecorder {
            inner: Arc::new(Mutex::new(recording)),
        }
    }

    /// Records that `client` is about to issue `input`.
    pub fn invoke(&self, client: u64, input: Input) -> OpId {
        let mut recording = self.lock();
        let call_ns = recording.now_ns();
        recording.ops.push(Operation::new(
            client,
            input,
            call_ns,
            OpResult::Unknown,
            call_ns,
        ));
        recording.completed.push(false);
        OpId(recording.ops.len() - 1)
    }

    /// Records how operation `id` ended. Completing with `Unknown` keeps it unknown (a timeout).
    ///
    /// # Panics
    ///
    /// If `id` was already completed or comes from another recorder: a bug in the test.
    pub fn complete(&self, id: OpId, result: OpResult) {
        let mut recording = self.lock();
        let return_ns = recording.now_ns();
        let fresh = recording.completed.get(id.0).is_some_and(|done| !done);
        if !fresh {
            drop(recording);
            panic!("operation {id:?} completed twice or unknown to this recorder");
        }
        recording.completed[id.0] = true;
        let op = &mut recording.ops[id.0];
        op.result = result;
        op.return_ns = return_ns;
    }

    /// The history so far, in invocation order.
    pub fn history(&self) -> Vec<Operation> {
        self.lock().ops.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        // A panic elsewhere while holding the lock leaves the recording consistent: every
        // update is a single push or field assignment.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Recording {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
