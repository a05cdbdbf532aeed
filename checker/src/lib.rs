//! A linearizability checker for histories of a key-value store.
//!
//! A test records what every client asked and was told, with invocation and completion times
//! ([`HistoryRecorder`] does it from concurrent tasks), and [`check`] decides whether some
//! total order of the operations (1) respects real time, an operation that completed before
//! another was invoked comes first, and (2) explains every output from a map of registers
//! (see [`history`] for the model and its versions).
//!
//! ```text
//!  history ──partition by key──► per-key ops ──search (DFS + memo)──► Linearizable
//!                                                  │ no order exists
//!                                                  ▼
//!                                   shrink (drop ops while still failing) ──► Violation
//! ```
//!
//! Linearizability is local (Herlihy & Wing 1990): a history is linearizable if and only if
//! its restriction to each key is, so each key is searched on its own. The search is the
//! depth-first search of Wing & Gong, "Testing and verifying concurrent objects" (JPDC 1993),
//! with the memoization of Lowe, "Testing for linearizability" (CCPE 2017), as implemented by
//! Porcupine: a cache of (set of linearized operations, model state) pairs already explored.
//! With modest concurrency per key the search is close to linear in the number of operations.
//!
//! Invariants: the checker never accepts a history for which no linearization exists, and a
//! [`Violation`] always holds a piece of the history that is itself not linearizable. When the
//! time or memory budget runs out it answers [`CheckResult::Inconclusive`], never a guess.

mod check;
pub mod history;
mod model;
mod recorder;
mod search;
mod shrink;

pub use check::{
    check, check_with_budget, summarize, CheckResult, Violation, CHECK_BUDGET_DEFAULT,
    SHRINK_BUDGET_MAX,
};
pub use history::{Input, OpResult, Operation, Output, ReadValue};
pub use recorder::{HistoryRecorder, OpId};
