//! kvslib: the client library of kvraft.
//!
//! ```text
//!   app --put/get--> Client --(session, seq, ack_seq)--> leader server (Kv service)
//!                      ^  \--- NOT_LEADER hints, transport errors: retry elsewhere
//!                      +---- coord CoordClient.WatchLeader (background task)
//! ```
//!
//! A [`Client`] finds the leader through the coord's leader watch and through `NOT_LEADER`
//! hints from servers, sends each put or get to it, and retries on failure (another server, a
//! new leader) until the operation's deadline, `client.op_timeout_ms`. Puts are exactly once:
//! every attempt of one put carries the same `(session_id, seq)`, so the server applies it at
//! most once and answers retries with the original result; `ack_seq` lets the server forget
//! finished requests and stop waiting for abandoned ones. Gets are linearizable (served by the
//! leader after it confirms its leadership).
//!
//! Failures are [`Error`]s; [`Error::is_definite`] tells whether an operation certainly did not
//! take effect, which matters to a linearizability checker: a [`Error::Timeout`] may hide an
//! applied put.
//!
//! ```no_run
//! # async fn demo(config: &kvraft_common::ClusterConfig) -> Result<(), kvslib::Error> {
//! let client = kvslib::Client::connect(config, "client1").await?;
//! let outcome = client.put("k1", "v1").await?;
//! assert_eq!(client.get("k1").await?, Some(b"v1".to_vec()));
//! println!("version {}", outcome.version);
//! client.close().await;
//! # Ok(()) }
//! ```

mod backoff;
mod batch;
mod client;
mod error;
mod failure;
mod key_watch;
mod kv_call;
mod leader;
mod outcome;
mod router;
mod seq_tracker;
mod session;
mod txn;
mod watcher;

pub use client::{query_leader, Client, GETS_IN_FLIGHT_MAX, PUTS_IN_FLIGHT_MAX};
pub use error::Error;
pub use key_watch::{EventKind, Watch, WatchEvent};
pub use kvraft_common::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
pub use kvraft_common::ClusterConfig;
pub use leader::LeaderInfo;
pub use outcome::{KeyValue, PutOutcome, RangePage, Versioned};
pub use txn::{CasOutcome, CmpOp, Compare, Target, Txn, TxnOp, TxnOpOutcome, TxnOutcome};
