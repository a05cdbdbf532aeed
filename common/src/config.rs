//! The cluster configuration file (TOML), shared by every binary.
//!
//! ```toml
//! [coord]
//! server_api_addr = "127.0.0.1:23002"
//! client_api_addr = "127.0.0.1:23009"
//! data_dir = "data/coord"
//!
//! [[servers]]
//! id = 1
//! addr = "127.0.0.1:21001"
//! data_dir = "data/server1"
//! ```
//!
//! Relative `data_dir` paths are relative to the working directory of the process. Unknown keys
//! are rejected (a misspelt key would otherwise silently fall back to a default).
//! [`ClusterConfig::load`] parses and validates; every error names the file, the key and what is
//! wrong with it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::NodeId;

/// Most servers a cluster may have. Replication fans out to every follower from one leader
/// task; nine (F = 4) is plenty for a store that keeps the whole state in memory.
pub const SERVERS_MAX: usize = 9;

/// Default heartbeat period: short enough that a leader failure is noticed within a few hundred
/// milliseconds, long enough that heartbeats cost nothing measurable on loopback.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 50;
/// Default failure timeout: six missed heartbeats, which rides out a scheduler hiccup or a
/// slow fsync on a busy machine without false failovers.
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub coord: CoordConfig,
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub server: ServerOptions,
    #[serde(default)]
    pub client: ClientOptions,
    #[serde(default)]
    pub tracing: TracingOptions,
}

/// How many servers the coord waits for before it designates the first leader.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WaitFor {
    /// Every configured server, as the original project did.
    #[default]
    All,
    /// A majority of the configured servers.
    Majority,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordConfig {
    /// Where servers join and where the coord's heartbeats come from.
    pub server_api_addr: String,
    /// Where clients ask for (and watch) the current leader.
    pub client_api_addr: String,
    /// Holds the highest term the coord has issued (fsynced before the term is used).
    pub data_dir: PathBuf,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    #[serde(default)]
    pub wait_for: WaitFor,
    /// Where the coord serves Prometheus metrics (`GET /metrics`); off when unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub id: u32,
    pub addr: String,
    pub data_dir: PathBuf,
    /// Where this server serves Prometheus metrics (`GET /metrics`); off when unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

/// Default of `[server] state_sync_ms`.
pub const STATE_SYNC_MS_DEFAULT: u64 = 1_000;
/// Bounds of `[server] state_sync_ms`: at most a minute of log is replayed after a crash.
pub const STATE_SYNC_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=60_000;

/// Defaults and bounds of `[server] log_tail_entries`, `log_tail_bytes` and
/// `snapshot_chunk_bytes`.
pub const LOG_TAIL_ENTRIES_DEFAULT: u64 = 10_000;
pub const LOG_TAIL_ENTRIES_MAX: u64 = 10_000_000;
pub const LOG_TAIL_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
pub const LOG_TAIL_BYTES_MAX: u64 = 16 * 1024 * 1024 * 1024;
pub const SNAPSHOT_CHUNK_BYTES_DEFAULT: u64 = 1024 * 1024;
/// Bounds of `[server] max_value_bytes` (default `limits::VALUE_BYTES_MAX`).
pub const MAX_VALUE_BYTES_RANGE: std::ops::RangeInclusive<u64> =
    1024..=crate::limits::VALUE_BYTES_CEILING as u64;
/// Default and bounds of `[server] log_segment_bytes`.
pub const LOG_SEGMENT_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;
pub const LOG_SEGMENT_BYTES_RANGE: std::ops::RangeInclusive<u64> = 64 * 1024..=1024 * 1024 * 1024;
pub const SNAPSHOT_CHUNK_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=8 * 1024 * 1024;

/// Defaults and bounds of `[server] watch_history_revisions` and `watch_history_bytes`.
pub const WATCH_HISTORY_REVISIONS_DEFAULT: u64 = 20_000;
pub const WATCH_HISTORY_REVISIONS_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;
pub const WATCH_HISTORY_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;
pub const WATCH_HISTORY_BYTES_RANGE: std::ops::RangeInclusive<u64> =
    64 * 1024..=16 * 1024 * 1024 * 1024;

/// Settings every server shares.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerOptions {
    /// A client session with no request for this long (in log-entry time) is expired.
    pub session_ttl_ms: u64,
    /// Most live client sessions; registering one more expires the least recently used.
    pub sessions_max: usize,
    /// Period of the leader's empty AppendEntries (commit index propagation, liveness).
    pub replication_heartbeat_ms: u64,
    /// How often the state machine's changes are written to its engine and made durable
    /// (ms). Shorter: less log replayed after a crash; longer: fewer engine writes, which
    /// cost throughput (docs/storage.md has the figures).
    pub state_sync_ms: u64,
    /// Log entries kept below the state machine's durable position, for followers that lag
    /// a little: at most this many and about this many bytes (encoded entries), in memory and
    /// on disk. A follower further behind is sent a snapshot instead.
    pub log_tail_entries: u64,
    pub log_tail_bytes: u64,
    /// Size of one chunk of a snapshot sent to a follower (one chunk in flight per follower).
    pub snapshot_chunk_bytes: u64,
    /// Pace of a snapshot transfer to one follower (bytes per second; 0: as fast as the
    /// follower takes chunks). A rebuild at full speed competes with clients for the leader's
    /// CPU and disk; a pace leaves them room. At least one chunk per second when set.
    pub snapshot_bytes_per_sec: u64,
    /// Size at which a log segment file is closed and the next begins; compaction deletes
    /// whole segments, so the log on disk is at least one segment.
    pub log_segment_bytes: u64,
    /// Longest value a put may carry; every process derives its gRPC message limit from it
    /// (`ServerOptions::grpc_message_bytes`), clients refuse longer values before sending.
    pub max_value_bytes: u64,
    /// Changes kept in memory for watches (a watch may start, or resume after a failover,
    /// from any revision they cover): at most this many revisions and about this many bytes.
    pub watch_history_revisions: u64,
    pub watch_history_bytes: u64,
    /// Serve `Admin.SetFaults` and accept the `server` fault flags. Off by default: anyone who
    /// can reach a server's address could otherwise partition or crash it (a remote kill
    /// switch). The `server --allow-fault-injection` flag turns it on for one process.
    pub allow_fault_injection: bool,
}

/// Settings of the client library.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientOptions {
    /// Deadline of one put or get, retries and failovers included.
    pub op_timeout_ms: u64,
    /// Deadline of one attempt against one server.
    pub attempt_timeout_ms: u64,
}

/// Vector-clock trace events (DESIGN section 5): where every process ships them and where the
/// tracing server writes them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingOptions {
    /// Off by default: tracing records and ships events for every traced RPC, which costs
    /// CPU and latency.
    pub enabled: bool,
    /// Where the tracing server listens and every tracer ships its events.
    pub server_addr: String,
    /// JSON-lines log written by the tracing server (one object per event).
    pub output_file: PathBuf,
    /// ShiViz log written by the tracing server.
    pub shiviz_output_file: PathBuf,
    /// Where every process writes its trace events (one file per identity) before a message
    /// carrying a token leaves, and where the tracing server reads those of a process that
    /// died before shipping them. Processes and the tracing server share it (same machine).
    pub spool_dir: PathBuf,
}

impl Default for TracingOptions {
    fn default() -> Self {
        TracingOptions {
            enabled: false,
            server_addr: "127.0.0.1:23010".to_string(),
            output_file: PathBuf::from("trace_output.log"),
            shiviz_output_file: PathBuf::from("shiviz_output.log"),
            spool_dir: PathBuf::from("trace-spool"),
        }
    }
}

impl ServerOptions {
    /// Longest value a put may carry (`max_value_bytes`).
    pub fn max_value(&self) -> usize {
        usize::try_from(self.max_value_bytes).unwrap_or(usize::MAX)
    }

    /// The gRPC message limit of every process of this cluster, from the largest value and
    /// snapshot chunk it must carry (`limits::grpc_message_bytes`).
    pub fn grpc_message_bytes(&self) -> usize {
        let chunk = usize::try_from(self.snapshot_chunk_bytes).unwrap_or(usize::MAX);
        crate::limits::grpc_message_bytes(self.max_value(), chunk)
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            session_ttl_ms: 60 * 60 * 1000,
            sessions_max: 10_000,
            replication_heartbeat_ms: 50,
            state_sync_ms: STATE_SYNC_MS_DEFAULT,
            log_tail_entries: LOG_TAIL_ENTRIES_DEFAULT,
            log_tail_bytes: LOG_TAIL_BYTES_DEFAULT,
            snapshot_chunk_bytes: SNAPSHOT_CHUNK_BYTES_DEFAULT,
            snapshot_bytes_per_sec: 0,
            log_segment_bytes: LOG_SEGMENT_BYTES_DEFAULT,
            max_value_bytes: crate::limits::VALUE_BYTES_MAX as u64,
            watch_history_revisions: WATCH_HISTORY_REVISIONS_DEFAULT,
            watch_history_bytes: WATCH_HISTORY_BYTES_DEFAULT,
            allow_fault_injection: false,
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            op_timeout_ms: 15_000,
            attempt_timeout_ms: 2_000,
        }
    }
}

fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_failure_timeout_ms() -> u64 {
    DEFAULT_FAILURE_TIMEOUT_MS
}

impl ClusterConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<ClusterConfig, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks the fields against each other. The error is `(key, what is wrong)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let n = self.servers.len();
        if n == 0 || n > SERVERS_MAX || n.is_multiple_of(2) {
            return Err((
                "servers".into(),
                format!(
                    "{n} servers configured; need an odd number from 1 to {SERVERS_MAX} \
                     (2F+1 servers survive F failures)"
                ),
            ));
        }
        let c = &self.coord;
        if c.heartbeat_interval_ms == 0 {
            return Err((
                "coord.heartbeat_interval_ms".into(),
                "must be above 0".into(),
            ));
        }
        if c.failure_timeout_ms <= c.heartbeat_interval_ms {
            return Err((
                "coord.failure_timeout_ms".into(),
                format!(
                    "{} ms is not above coord.heartbeat_interval_ms ({} ms)",
                    c.failure_timeout_ms, c.heartbeat_interval_ms
                ),
            ));
        }
        let mut addrs: HashSet<SocketAddr> = HashSet::new();
        let mut check_addr = |key: String, value: &str| -> Result<(), (String, String)> {
            let addr: SocketAddr = value
                .parse()
                .map_err(|_| (key.clone(), format!("{value:?} is not an IP:port address")))?;
            if addr.port() == 0 {
                return Err((key, format!("{value:?} has port 0; give a fixed port")));
            }
            if !addrs.insert(addr) {
                return Err((key, format!("address {value} is used twice")));
            }
            Ok(())
        };
        check_addr("coord.server_api_addr".into(), &c.server_api_addr)?;
        check_addr("coord.client_api_addr".into(), &c.client_api_addr)?;
        if let Some(addr) = &c.metrics_addr {
            check_addr("coord.metrics_addr".into(), addr)?;
        }
        let mut ids = HashSet::new();
        let mut dirs = HashSet::new();
        dirs.insert(c.data_dir.clone());
        for (i, s) in self.servers.iter().enumerate() {
            let key = format!("servers[{i}]");
            if s.id == 0 {
                return Err((format!("{key}.id"), "server ids start at 1".into()));
            }
            if !ids.insert(s.id) {
                return Err((
                    format!("{key}.id"),
                    format!("server id {} is used twice", s.id),
                ));
            }
            check_addr(format!("{key}.addr"), &s.addr)?;
            if let Some(addr) = &s.metrics_addr {
                check_addr(format!("{key}.metrics_addr"), addr)?;
            }
            if !dirs.insert(s.data_dir.clone()) {
                return Err((
                    format!("{key}.data_dir"),
                    format!("data_dir {} is used twice", s.data_dir.display()),
                ));
            }
        }
        let o = &self.server;
        if o.session_ttl_ms == 0 || o.sessions_max == 0 || o.replication_heartbeat_ms == 0 {
            return Err((
                "server".into(),
                "session_ttl_ms, sessions_max and replication_heartbeat_ms must be above 0".into(),
            ));
        }
        if !STATE_SYNC_MS_RANGE.contains(&o.state_sync_ms) {
            return Err((
                "server.state_sync_ms".into(),
                format!(
                    "{} is outside {}..={} ms",
                    o.state_sync_ms,
                    STATE_SYNC_MS_RANGE.start(),
                    STATE_SYNC_MS_RANGE.end()
                ),
            ));
        }
        if o.snapshot_bytes_per_sec != 0 && o.snapshot_bytes_per_sec < o.snapshot_chunk_bytes {
            return Err((
                "server.snapshot_bytes_per_sec".into(),
                format!(
                    "{} is below one chunk ({} bytes) per second; use 0 for no pace",
                    o.snapshot_bytes_per_sec, o.snapshot_chunk_bytes
                ),
            ));
        }
        let bounded = [
            (
                "log_tail_entries",
                o.log_tail_entries,
                0..=LOG_TAIL_ENTRIES_MAX,
            ),
            ("log_tail_bytes", o.log_tail_bytes, 0..=LOG_TAIL_BYTES_MAX),
            (
                "snapshot_chunk_bytes",
                o.snapshot_chunk_bytes,
                SNAPSHOT_CHUNK_BYTES_RANGE,
            ),
            (
                "log_segment_bytes",
                o.log_segment_bytes,
                LOG_SEGMENT_BYTES_RANGE,
            ),
            ("max_value_bytes", o.max_value_bytes, MAX_VALUE_BYTES_RANGE),
            (
                "watch_history_revisions",
                o.watch_history_revisions,
                WATCH_HISTORY_REVISIONS_RANGE,
            ),
            (
                "watch_history_bytes",
                o.watch_history_bytes,
                WATCH_HISTORY_BYTES_RANGE,
            ),
        ];
        for (name, value, range) in bounded {
            if !range.contains(&value) {
                return Err((
                    format!("server.{name}"),
                    format!("{value} is outside {}..={}", range.start(), range.end()),
                ));
            }
        }
        let t = &self.tracing;
        if t.enabled {
            check_addr("tracing.server_addr".into(), &t.server_addr)?;
        } else if t.server_addr.parse::<SocketAddr>().is_err() {
            return Err((
                "tracing.server_addr".into(),
                format!("{:?} is not an IP:port address", t.server_addr),
            ));
        }
        if t.spool_dir.as_os_str().is_empty() {
            return Err((
                "tracing.spool_dir".into(),
                "must be a directory path (processes write their trace events there)".into(),
            ));
        }
        if t.output_file == t.shiviz_output_file || t.output_file.as_os_str().is_empty() {
            return Err((
                "tracing.shiviz_output_file".into(),
                "output_file and shiviz_output_file must be distinct, non-empty paths".into(),
            ));
        }
        let cl = &self.client;
        if cl.attempt_timeout_ms == 0 || cl.op_timeout_ms < cl.attempt_timeout_ms {
            return Err((
                "client.op_timeout_ms".into(),
                "op_timeout_ms must be at least attempt_timeout_ms, which must be above 0".into(),
            ));
        }
        Ok(())
    }

    /// The server with this id, or an error naming the ids the config does have.
    pub fn server(&self, id: u32) -> Result<&ServerConfig, String> {
        self.servers.iter().find(|s| s.id == id).ok_or_else(|| {
            let known: Vec<String> = self.servers.iter().map(|s| s.id.to_string()).collect();
            format!(
                "server id {id} is not in the config (configured ids: {})",
                known.join(", ")
            )
        })
    }

    pub fn server_ids(&self) -> Vec<NodeId> {
        self.servers.iter().map(|s| NodeId(s.id)).collect()
    }

    /// Votes needed for a majority of all configured servers (never of the live ones only).
    pub fn majority(&self) -> usize {
        self.servers.len() / 2 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        r#"
[coord]
server_api_addr = "127.0.0.1:23002"
client_api_addr = "127.0.0.1:23009"
data_dir = "data/coord"

[[servers]]
id = 1
addr = "127.0.0.1:21001"
data_dir = "data/server1"
"#
        .to_string()
    }

    fn err(text: &str) -> String {
        ClusterConfig::parse(text, Path::new("test.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_file_parses_with_defaults() {
        let c = ClusterConfig::parse(&base(), Path::new("t.toml")).unwrap();
        assert_eq!(c.coord.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS);
        assert_eq!(c.coord.failure_timeout_ms, DEFAULT_FAILURE_TIMEOUT_MS);
        assert_eq!(c.majority(), 1);
        assert!(!c.server.allow_fault_injection);
    }

    #[test]
    fn fault_injection_is_allowed_by_the_server_section() {
        let text = base() + "[server]\nallow_fault_injection = true\n";
        let c = ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        assert!(c.server.allow_fault_injection);
    }

    #[test]
    fn state_sync_period_defaults_to_a_second_and_is_bounded() {
        let c = ClusterConfig::parse(&base(), Path::new("t.toml")).unwrap();
        assert_eq!(c.server.state_sync_ms, STATE_SYNC_MS_DEFAULT);
        for bad in [0, 9, 60_001] {
            let e = err(&(base() + &format!("[server]\nstate_sync_ms = {bad}\n")));
            assert!(
                e.contains("server.state_sync_ms") && e.contains("outside"),
                "{e}"
            );
        }
        let c = ClusterConfig::parse(
            &(base() + "[server]\nstate_sync_ms = 250\n"),
            Path::new("t.toml"),
        );
        assert_eq!(c.unwrap().server.state_sync_ms, 250);
        let e = err(&(base() + "[server]\nsnapshot_bytes_per_sec = 1000\n"));
        assert!(
            e.contains("server.snapshot_bytes_per_sec") && e.contains("below one chunk"),
            "{e}"
        );
        let paced = base() + "[server]\nsnapshot_bytes_per_sec = 33554432\n";
        let paced = ClusterConfig::parse(&paced, Path::new("t.toml")).unwrap();
        assert_eq!(paced.server.snapshot_bytes_per_sec, 32 << 20);
        for bad in [
            "log_tail_entries = 10000001",
            "log_tail_bytes = 17179869185",
            "snapshot_chunk_bytes = 100",
            "snapshot_chunk_bytes = 8388609",
            "log_segment_bytes = 1000",
            "max_value_bytes = 16777217",
        ] {
            let e = err(&(base() + &format!("[server]\n{bad}\n")));
            let name = bad.split(' ').next().unwrap();
            assert!(
                e.contains(&format!("server.{name}")) && e.contains("outside"),
                "{e}"
            );
        }
    }

    #[test]
    fn even_server_count_is_refused() {
        let text = base()
            + r#"
[[servers]]
id = 2
addr = "127.0.0.1:21002"
data_dir = "data/server2"
"#;
        let e = err(&text);
        assert!(
            e.contains("test.toml") && e.contains("servers") && e.contains("odd"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ids_and_addresses_are_refused() {
        let dup_id = base()
            + "[[servers]]\nid = 1\naddr = \"127.0.0.1:21002\"\ndata_dir = \"d2\"\n[[servers]]\nid = 3\naddr = \"127.0.0.1:21003\"\ndata_dir = \"d3\"\n";
        let e = err(&dup_id);
        assert!(
            e.contains("servers[1].id") && e.contains("used twice"),
            "{e}"
        );
        let dup_addr = base()
            + "[[servers]]\nid = 2\naddr = \"127.0.0.1:21001\"\ndata_dir = \"d2\"\n[[servers]]\nid = 3\naddr = \"127.0.0.1:21003\"\ndata_dir = \"d3\"\n";
        let e = err(&dup_addr);
        assert!(
            e.contains("servers[1].addr") && e.contains("used twice"),
            "{e}"
        );
    }

    #[test]
    fn failure_timeout_must_exceed_heartbeat() {
        let text = base().replace(
            "data_dir = \"data/coord\"",
            "data_dir = \"data/coord\"\nheartbeat_interval_ms = 100\nfailure_timeout_ms = 100",
        );
        let e = err(&text);
        assert!(e.contains("coord.failure_timeout_ms"), "{e}");
    }

    #[test]
    fn unknown_key_and_bad_address_are_named() {
        let e = err(&base().replace(
            "data_dir = \"data/coord\"",
            "data_dir = \"x\"\nheartbeat_ms = 5",
        ));
        assert!(e.contains("heartbeat_ms"), "{e}");
        let e = err(&base().replace("127.0.0.1:21001", "localhost"));
        assert!(
            e.contains("servers[0].addr") && e.contains("localhost"),
            "{e}"
        );
    }

    #[test]
    fn tracing_defaults_and_address_checks() {
        let c = ClusterConfig::parse(&base(), Path::new("t.toml")).unwrap();
        assert!(!c.tracing.enabled);
        assert_eq!(c.tracing.output_file, PathBuf::from("trace_output.log"));
        assert_eq!(
            c.tracing.shiviz_output_file,
            PathBuf::from("shiviz_output.log")
        );
        let e = err(&(base() + "[tracing]\nenabled = true\nserver_addr = \"127.0.0.1:23009\"\n"));
        assert!(
            e.contains("tracing.server_addr") && e.contains("used twice"),
            "{e}"
        );
        let e = err(&(base() + "[tracing]\nserver_addr = \"nowhere\"\n"));
        assert!(e.contains("tracing.server_addr"), "{e}");
        assert_eq!(c.tracing.spool_dir, PathBuf::from("trace-spool"));
        let e = err(&(base() + "[tracing]\nspool_dir = \"\"\n"));
        assert!(e.contains("tracing.spool_dir"), "{e}");
        let ok = base() + "[tracing]\nenabled = true\nserver_addr = \"127.0.0.1:23010\"\n";
        assert!(
            ClusterConfig::parse(&ok, Path::new("t.toml"))
                .unwrap()
                .tracing
                .enabled
        );
    }

    #[test]
    fn unknown_server_id_lists_known_ones() {
        let c = ClusterConfig::parse(&base(), Path::new("t.toml")).unwrap();
        let e = c.server(7).unwrap_err();
        assert!(e.contains("7") && e.contains("configured ids: 1"), "{e}");
    }
}
