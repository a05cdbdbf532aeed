//! Vector-clock trace events (DESIGN.md section 5, the ShiViz pipeline).
//!
//! ```text
//!  coord / server<id> / client<id>                        tracing-server
//!  ┌────────────────────────────┐   Ship(batch)   ┌──────────────────────────────┐
//!  │ Tracer: identity + VClock  │ ──────────────▶ │ LogFiles: trace_output.log    │
//!  │  trace.record_action(a)    │ ◀── Resume ──── │           shiviz_output.log   │
//!  │  trace.generate_token() ───┼── trace_token ─▶ other process: receive_token() │
//!  └────────────────────────────┘                 └──────────────────────────────┘
//! ```
//!
//! - [`vclock`]: the vector clock.
//! - [`action`]: the typed actions every process records.
//! - [`tracer`]: the per-process tracer and its batched, never-dropping shipper.
//! - [`spool`]: the local file a tracer writes its events to before a token leaves.
//! - [`server`]: the tracing server (gRPC `Tracing` service and the two logs).
//! - [`shiviz`]: a checker that reads a ShiViz log as ShiViz does.
//!
//! Tracing off is `Option<Tracer>::None` at the call sites: no clock, no allocation, no thread.

pub mod action;
pub mod server;
pub mod shiviz;
pub mod spool;
pub mod tracer;
pub mod vclock;
pub mod wire;

pub use action::Action;
pub use tracer::{Trace, Tracer, TracerError};
pub use vclock::VClock;

use prost::bytes::Bytes;

/// The token for an outgoing message on `trace`, or empty bytes when tracing is off.
pub fn token(trace: Option<&Trace>, message: &str) -> Bytes {
    trace.map_or_else(Bytes::new, |t| t.generate_token_for(message))
}

/// Starts the tracer of `identity` when `options.enabled`, else `None`.
pub async fn tracer_for(
    options: &kvraft_common::config::TracingOptions,
    identity: &str,
) -> Result<Option<Tracer>, TracerError> {
    if !options.enabled {
        return Ok(None);
    }
    Tracer::connect_spooled(identity, &options.server_addr, Some(&options.spool_dir))
        .await
        .map(Some)
}
