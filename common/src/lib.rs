//! Types and configuration shared by every kvraft process.
//!
//! - [`NodeId`], [`Term`], [`LogIndex`]: newtypes so a term is never passed where an index is
//!   expected.
//! - [`config`]: the cluster TOML file, with validation that names the file, key and problem.
//! - [`limits`]: key and value size limits enforced by the client library and the servers.

pub mod config;
pub mod limits;
pub mod net;
mod types;

pub use config::{ClusterConfig, ConfigError, CoordConfig, ServerConfig};
pub use types::{LogIndex, NodeId, Term};
