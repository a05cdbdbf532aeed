//! Types and configuration shared by every kvraft process.
//!
//! - [`NodeId`], [`Term`], [`LogIndex`]: newtypes so a term is never passed where an index is
//!   expected.
//! - [`config`]: the cluster TOML file, with validation that names the file, key and problem.
//! - [`durable_dir`]: creating data directories so that they survive a crash.
//! - [`limits`]: key and value size limits enforced by the client library and the servers.

pub mod config;
pub mod durable_dir;
pub mod fnv;
pub mod limits;
pub mod metrics_http;
pub mod net;
mod types;

pub use config::{ClusterConfig, ConfigError, CoordConfig, ServerConfig};
pub use durable_dir::{
    create_dir_durable, read_small_text, replace_file_durable, seal, sync_dir, unseal, DirError,
    ReadSmallError, ReplaceError,
};
pub use types::{LogIndex, NodeId, Term};
