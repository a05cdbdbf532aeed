//! A linearizability checker for histories of a key-value store.
//!
//! A test records what every client asked and was told, with invocation and completion times
//! ([`HistoryRecorder`] does it from concurrent tasks), and [`check`] decides whether some
//! total order of the operations (1) respects real time, an operation that completed before
//! another was invoked comes first, and (2) explains every output from a map of registers
//! with puts, gets, deletes, multi-key txns and range scans (see [`history`] for the model
//! and its versions).
//!
//! ```text
//!  history ─► components (union-find over keys) ─┬► one key, puts/gets: local look (long keys)
//!                                                │     ─► search (DFS + memo) ─► shrink units
//!                                                └► other: general search (DFS + memo)
//!                                                      ─► shrink (drop reads) ─► Violation
//!                                                    an order exists ─► Linearizable
//! ```
//!
//! Linearizability is local (Herlihy & Wing 1990): a history is linearizable if and only if
//! its restriction to each object is. An object here is a *component*: the keys joined by
//! operations that span several (a txn naming several keys; a scan, which joins every key of
//! the history in its range and every key it returned). Each component is searched on its
//! own, its state the registers of its keys; most components are a single key. The search
//! is the depth-first search of Wing & Gong, "Testing and verifying concurrent objects"
//! (JPDC 1993), with the memoization of Lowe, "Testing for linearizability" (CCPE 2017), as implemented by
//! Porcupine: a cache of (set of linearized operations, model state) pairs already explored.
//! With modest concurrency per key the search is close to linear in the number of operations.
//!
//! Refinements, only for a component of one key with only puts and gets (they rely on "a
//! put of version w is the w-th put applied", which deletes break, and on reads of one key):
//! a long key first gets a linear look for local anomalies (each get with the
//! puts of its value and the last other put before it), since refuting thousands of
//! operations exhaustively can take minutes. Configurations are cached as 128-bit
//! fingerprints (hash compaction), 32 bytes each whatever the key's length. Timeouts are kept
//! cheap: Unknown puts whose value no get read are dropped when
//! versions are not compared; with versions they are interchangeable and are applied only in a
//! block right before a put, as many as its version needs (just-in-time linearization, Lowe
//! 2017). A put without a version whose value is unique takes the version a get saw with it.
//! Shrinking removes value units with version renumbering. Other components (deletes, txns,
//! scans, several keys) get the plain exact search with the same fingerprinted cache, no
//! unknown write dropped or ranked, and shrinking that removes only operations that change
//! nothing (gets, scans, txns whose branch taken only reads). Unknown operations that write
//! nothing (get, scan, a txn with only gets in both branches) are dropped everywhere.
//!
//! ```
//! use kvraft_checker::{check, CheckResult, Input, OpResult, Operation, Output};
//!
//! let acked = OpResult::Ok(Output::put_version(1));
//! let history = [
//!     Operation::new(1, Input::put("k", "v1"), 0, acked, 10),
//!     // Called after the put was acknowledged, yet it misses it: a lost write.
//!     Operation::new(2, Input::get("k"), 20, OpResult::Ok(Output::absent()), 30),
//! ];
//! let CheckResult::Violation(violation) = check(&history) else { panic!("lost write accepted") };
//! assert_eq!(violation.ops.len(), 2);
//! println!("{violation}"); // the explanation, then each operation with its times
//! ```
//!
//! Invariants: the checker never accepts a history for which no linearization exists, and a
//! [`Violation`]'s piece (of one component, whose keys it names) is itself not linearizable
//! (versions counted without the puts the explanation says were left out), which proves the
//! whole history is not. A violation could be false only through a fingerprint collision (probability below 10^-24 for 10^7 cached
//! configurations). When the time or memory budget runs out it answers
//! [`CheckResult::Inconclusive`], never a guess.

mod check;
mod general;
pub mod history;
mod local;
mod model;
mod recorder;
mod search;
mod shrink;
pub mod watch;

pub use check::{
    check, check_with_budget, summarize, CheckResult, Violation, BUDGET_MAX, CHECK_BUDGET_DEFAULT,
    SHRINK_BUDGET_MAX,
};
pub use history::{
    Compare, CompareOp, CompareTarget, Input, OpResult, Operation, Output, ReadValue, TxnOp,
    TxnOpOutput,
};
pub use recorder::{HistoryRecorder, OpId};
