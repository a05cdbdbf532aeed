//! kvraft server: a durable replicated log and the key-value state machine it feeds.
//!
//! ```text
//!  gRPC services ──Input──▶ runtime (one task) ──Event──▶ Replica (pure core)
//!        ▲                     │  ▲                            │
//!        └──── replies ────────┘  └──────── Command ◀──────────┘
//!                              │ executes: log writes + group fsync, hard-state saves,
//!                              ▼ AppendEntries streams to peers, client replies
//! ```
//!
//! - [`replica`]: the decisions (replication, commit, epoch handling, reads), no IO.
//! - [`state_machine`]: the key-value map and exactly-once sessions.
//! - [`past`]: the values keys had before their recent changes, for reads at a past revision.
//! - [`engine`]: where the state machine keeps them (redb on disk, or memory in tests).
//! - [`storage`]: the checksummed log file, the hard state, the data-directory identity.
//! - [`executor`]: executes the core's commands over an `Io` (storage, network, replies); the
//!   runtime and the simulation both run it.
//! - [`runtime`], [`service`]: tokio/tonic glue: the `Io` of a real server, the gRPC services.

pub mod engine;
pub mod executor;
pub mod faults;
pub mod log_writer;
pub mod metrics;
mod otel_spans;
pub mod past;
pub mod replica;
pub mod replica_log;
pub mod runtime;
pub mod service;
pub mod state_machine;
pub mod storage;
mod trace_events;
pub mod watch;

#[cfg(test)]
mod replica_tests;

pub use runtime::run;
