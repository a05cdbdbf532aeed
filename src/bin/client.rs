//! `client <CLIENT_ID> [--config FILE] [SUBCOMMAND]`: a thin command-line shell over kvslib.
//!
//! Without a subcommand it runs the original project's scripted workload (20 puts, each
//! followed by a get). Subcommands: `put`, `get`, `delete`, `cas`, `txn`, `scan`, `leader`,
//! `status`, `digest`, `run` (a batch of writes or reads with a JSON record per request, for
//! test harnesses) and `shell` (an interactive prompt).
//! Results go to stdout; logs (RUST_LOG, default `warn`) and errors go to stderr, so stdout
//! stays clean text or JSON.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvraft::launch;
use kvraft::txn_text;
use kvraft_common::limits::{self, check_key_value, check_key_value_within};
use kvslib::{CasOutcome, Client, ClusterConfig, Error, LeaderInfo};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Operations of the scripted workload (the original's `for i in 0..20`).
const SCRIPT_OPS: usize = 20;
/// Most keys the shell's `scan` lists.
const SHELL_SCAN_MAX: u64 = 100;
/// Most requests of one `run`: every record is kept in memory until the JSON is written.
const RUN_COUNT_MAX: usize = 100_000;

/// `run` status: the request succeeded.
const STATUS_OK: i32 = 0;
/// `run` status: timeout or unavailable; a write may or may not have taken effect.
const STATUS_INDETERMINATE: i32 = 1;
/// `run` status: the key or value broke a size limit; nothing was sent.
const STATUS_INVALID_INPUT: i32 = 2;
/// `run` status: the session expired; a write may or may not have taken effect.
const STATUS_SESSION_EXPIRED: i32 = 3;
/// `run` status: any other error (refused by the server; not applied).
const STATUS_OTHER: i32 = 4;

const RUN_HELP: &str = "\
Output: {\"write\": [...]} or {\"read\": [...]}, one record per request:
  {\"Request\": {\"Operation\", \"Key\", \"Value\", \"Request_timestamp\"},
   \"Response\": {\"Status\", \"Response\", \"Validate\", \"Response_timestamp\"},
   \"Req_resolved_time\": <nanoseconds from request to response>}
Timestamps are RFC 3339 UTC with nanoseconds. \"Value\" is the value written, or for a read
the value expected. \"Response\" is the value written (write), the value read or null when
not found (read), or the error message when Status is not 0. \"Validate\" is true for an
acknowledged write, and for a read whose value equals the expected one.

Status codes:
  0  success
  1  timeout, unavailable or stale (indeterminate: a write may or may not have taken effect)
  2  invalid input (key or value too large, empty key; nothing was sent)
  3  session expired (indeterminate for a write)
  4  other error (refused by the server; not applied)
Exit status is 0 only if every request has Status 0.";

const TXN_HELP: &str = "\
Transaction form (stdin), one clause per line; blank lines and # comments are skipped:
  if <key> version|create|mod|value =|!=|<|> <number or value>     (all must hold)
  then put <key> <value> | del <key> | del-prefix <prefix> | get <key>
  else put <key> <value> | del <key> | del-prefix <prefix> | get <key>
Words are separated by spaces; \"double quotes\" hold spaces and the escapes \\\" \\\\ \\n
\\t \\xHH. version 0 means the key is absent; create and mod are revisions (log indices).
At most 128 compares and 128 operations. Example, taking a lock:
  printf 'if lock version = 0\\nthen put lock me\\nelse get lock\\n' | client c1 txn";

const SHELL_HELP: &str = "\
commands:
  put <key> <value>   store value (the rest of the line) under key
  get <key>           print the value under key, or (not found)
  delete <key>        delete key
  cas <key> <version> <value>   store value only if key's version is <version> (0: absent)
  scan <prefix>       list the keys that start with prefix (at most 100)
  leader              print the current leader as JSON
  help                print this help
  quit                leave (so does end of input)";

/// Client of a kvraft cluster: put, get, delete, compare-and-swap, transactions, scans and
/// watches; ask for the leader or the cluster's status; run a scripted or batch workload, or
/// open an interactive shell.
#[derive(Parser, Debug)]
#[command(name = "client", version)]
#[command(
    after_help = "Without a subcommand, runs the scripted workload: for i in 0..20, \
    Put(k<i>, val<i>) then Get(k<i>), one result line each; exits non-zero if any failed.\n\
    Logs go to stderr; set RUST_LOG (default: warn), e.g. RUST_LOG=kvslib=debug."
)]
struct Cli {
    /// This client's id: names it in output and logs. Each run that writes registers a fresh
    /// session (`get`, `scan`, `watch`, `leader`, `status` and `digest` register none), so two
    /// runs of one id never mistake each other's requests for retries.
    client_id: String,
    /// Cluster config file (TOML): coord and server addresses, client timeouts.
    #[arg(long, default_value = "config/cluster.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Store VALUE under KEY; prints "ok (version N, index I)".
    Put {
        /// Key (1 to 1024 bytes).
        key: String,
        /// Value (up to the cluster's max_value_bytes, 1 MiB by default); `-` reads it from
        /// stdin, as bytes (binary data works).
        value: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Print the value under KEY, or "(not found)" (exit status 0 either way).
    Get {
        /// Key (1 to 1024 bytes).
        key: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Delete KEY; prints "deleted" or "(not found)". With --prefix, every key that starts
    /// with KEY; prints "deleted N keys" (in transactions of up to 10,000 keys each: atomic
    /// per transaction, not as a whole).
    Delete {
        key: String,
        #[arg(long)]
        prefix: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Compare-and-swap: store VALUE under KEY only if the key's version is EXPECTED_VERSION
    /// (0: only if the key is absent). Prints "ok (version N, index I)", or "failed: current
    /// version V" with exit status 1 when the version differed.
    Cas {
        key: String,
        expected_version: u64,
        /// The value; `-` reads it from stdin.
        value: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Run a transaction read from stdin (the form is below); prints whether the compares
    /// held and each result. Exit status 1 when the compares failed.
    #[command(after_help = TXN_HELP)]
    Txn {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// List keys in [START, END) in key order (no END: to the last key), or with --prefix
    /// those that start with START: "key<TAB>value" per line (JSON: one object per line).
    /// Linearizable; read in pages, every page at the revision of the first (or --rev), so
    /// the listing is the range as it was at one revision, however many pages it takes.
    Scan {
        start: String,
        end: Option<String>,
        #[arg(long, conflicts_with = "end")]
        prefix: bool,
        /// List the range as it was at this revision (0: now). A server keeps the changes of
        /// its last watch_history_revisions revisions; an older one is refused, naming the
        /// oldest it holds.
        #[arg(long = "rev", default_value_t = 0)]
        revision: u64,
        /// Most keys to list (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Keys only, without values.
        #[arg(long)]
        keys_only: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Print every change of KEY (with --prefix, of every key that starts with KEY) as it
    /// happens, one line each: "PUT <key> <value> (revision R, version V)" or "DELETE <key>
    /// (revision R)"; until Ctrl-C or --count events. Follows the leader through failovers
    /// without missing or repeating a change; fails if the revision to resume from is no
    /// longer held. Registers no session.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (0: changes after now).
        #[arg(long, default_value_t = 0)]
        from_rev: u64,
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: DataFormat,
    },
    /// Ask the coord for the current leader; prints
    /// {"Leader-UUID": "<uuid>", "Leader-Id": <id>, "Term": <term>}.
    Leader {
        /// Also write the JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every server's state machine digest (applied index and term, a hash of all keys, values
    /// and sessions): servers at the same applied index must agree. Reads each server's whole
    /// state; registers no session.
    Digest,
    /// Every server's state (whether the coord sees it up, role, term, commit and applied index,
    /// lag behind the leader, memory, log size, whether it catches up after a lost disk) and the
    /// coord's leader view. Registers no session.
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: StatusFormat,
    },
    /// Issue COUNT writes or reads and print a JSON record of each (see --help).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Interactive prompt reading put/get/delete/cas/scan/leader/help/quit lines from stdin.
    #[command(after_help = SHELL_HELP)]
    Shell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DataFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StatusFormat {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Write (put) or read (get).
    #[arg(long, value_enum)]
    op: Op,
    /// Keys are <KEY_PREFIX><i> with --multi-key, else <KEY_PREFIX>0 for every request.
    #[arg(long)]
    key_prefix: String,
    /// Values (written, or expected by a read) are <VALUE_PREFIX><i>, or <VALUE_PREFIX>0.
    #[arg(long, default_value = "val")]
    value_prefix: String,
    /// Number of requests (at most 100000).
    #[arg(long, default_value_t = 5)]
    count: usize,
    /// Request i uses key <KEY_PREFIX><i> and value <VALUE_PREFIX><i>.
    #[arg(long)]
    multi_key: bool,
    /// Issue the requests one after another instead of all at once.
    #[arg(long)]
    sequential: bool,
    /// Write the JSON to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = launch::init_logging(&format!("client-{}", cli.client_id), "warn");
    let result = run(cli).await;
    telemetry.shutdown().await;
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` when it ran but some operation failed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    // The config error's message already names the file and the cause.
    let config = ClusterConfig::load(&cli.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = cli.client_id.as_str();
    match cli.command {
        Some(Command::Leader { out }) => {
            let leader = kvslib::query_leader(&config, id).await?;
            print_leader(&leader, out.as_deref())?;
            Ok(true)
        }
        Some(Command::Status { output }) => print_status(&config, id, output).await,
        Some(Command::Digest) => print_digests(&config).await,
        None => {
            let client = connect(&config, id).await?;
            let result = script(&client).await;
            finish(client, result).await
        }
        Some(Command::Put { key, value, output }) => {
            let value = value_arg(value)?;
            // Refuse bad input before touching the network.
            let max = config.server.max_value();
            check_key_value_within(key.as_bytes(), Some(&value), max)
                .map_err(anyhow::Error::msg)?;
            let client = connect(&config, id).await?;
            let result = put_once(&client, key, value, output).await;
            finish(client, result).await
        }
        Some(Command::Get { key, output }) => {
            check_key_value(key.as_bytes(), None).map_err(anyhow::Error::msg)?;
            let client = connect_lazily(&config, id).await?;
            let result = get_once(&client, &key, output).await;
            finish(client, result).await
        }
        Some(Command::Delete {
            key,
            prefix,
            output,
        }) => {
            let client = connect_lazily(&config, id).await?;
            let result = delete_once(&client, key, prefix, output).await;
            finish(client, result).await
        }
        Some(Command::Cas {
            key,
            expected_version,
            value,
            output,
        }) => {
            let value = value_arg(value)?;
            let max = config.server.max_value();
            check_key_value_within(key.as_bytes(), Some(&value), max)
                .map_err(anyhow::Error::msg)?;
            let client = connect_lazily(&config, id).await?;
            let result = cas_once(&client, key, expected_version, value, output).await;
            finish(client, result).await
        }
        Some(Command::Txn { output }) => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the transaction from stdin")?;
            let txn = kvraft::txn_text::parse_txn(&text).map_err(anyhow::Error::msg)?;
            let client = connect_lazily(&config, id).await?;
            let result = txn_once(&client, txn, output).await;
            finish(client, result).await
        }
        Some(Command::Scan {
            start,
            end,
            prefix,
            revision,
            limit,
            keys_only,
            output,
        }) => {
            let end = match (prefix, end) {
                (true, _) => limits::prefix_end(start.as_bytes()),
                (false, Some(end)) => end.into_bytes(),
                (false, None) => Vec::new(),
            };
            limits::check_range(start.as_bytes(), &end).map_err(anyhow::Error::msg)?;
            let client = connect_lazily(&config, id).await?;
            let scan = Scan {
                start: start.into_bytes(),
                end,
                revision,
                limit,
                keys_only,
            };
            let result = scan_all(&client, scan, output).await;
            finish(client, result).await
        }
        Some(Command::Watch {
            key,
            prefix,
            from_rev,
            count,
            output,
        }) => {
            let end = if prefix {
                limits::prefix_end(key.as_bytes())
            } else {
                check_key_value(key.as_bytes(), None).map_err(anyhow::Error::msg)?;
                let mut end = key.clone().into_bytes();
                end.push(0);
                end
            };
            let client = connect_lazily(&config, id).await?;
            let watch = client.watch(key.into_bytes(), end, from_rev)?;
            let result = watch_events(watch, count, output).await;
            finish(client, result).await
        }
        Some(Command::Run(args)) => {
            let client = connect(&config, id).await?;
            let result = run_batch(&client, &args).await;
            finish(client, result).await
        }
        Some(Command::Shell) => {
            let client = connect(&config, id).await?;
            let result = shell(&client).await;
            finish(client, result).await
        }
    }
}

/// `status`: one row per server and the coord's view; `Ok(false)` if a server is down or no
/// leader is designated.
async fn print_status(
    config: &ClusterConfig,
    client_id: &str,
    format: StatusFormat,
) -> anyhow::Result<bool> {
    use kvraft::cluster_status;
    let coord = cluster_status::coord_view(config, client_id).await;
    let rows = cluster_status::servers(config).await;
    let members = cluster_status::coord_members(config).await;
    let seen = |id: u32| -> &'static str {
        match members
            .as_ref()
            .and_then(|m| m.servers.iter().find(|s| s.server_id == id))
        {
            None => "-",
            Some(s) if !s.alive => "down",
            Some(s) if !s.voter => "catching-up",
            Some(_) => "up",
        }
    };
    let leader_commit = rows
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter_map(|s| s.report.as_ref())
        .filter(|r| coord.as_ref().is_some_and(|c| c.leader_id == r.server_id))
        .map(|r| r.commit_index)
        .next();
    let all_up = rows.iter().all(|r| r.status.is_some());
    let healthy = all_up && coord.as_ref().is_some_and(|c| c.leader_id != 0);
    match format {
        StatusFormat::Json => {
            let servers: Vec<serde_json::Value> = rows
                .iter()
                .map(|row| {
                    let mut json = status_json(row, leader_commit);
                    json["coord_sees"] = json!(seen(row.id));
                    json
                })
                .collect();
            let coord = coord.as_ref().map_or(
                serde_json::Value::Null,
                |c| json!({"term": c.term, "leader_id": c.leader_id, "leader_uuid": c.leader_uuid}),
            );
            say(json!({"coord": coord, "servers": servers}))?;
        }
        StatusFormat::Table => {
            match &coord {
                Some(c) if c.leader_id != 0 => {
                    say(format!("coord: term {}, leader {}", c.term, c.leader_id))?
                }
                Some(c) => say(format!("coord: term {}, no leader designated", c.term))?,
                None => say("coord: not answering")?,
            }
            say(format!(
                "{:>3}  {:<21} {:<11} {:<8} {:<12} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8} {:>8} {:>8}",
                "ID",
                "ADDRESS",
                "COORD SEES",
                "UUID",
                "ROLE",
                "TERM",
                "COMMIT",
                "APPLIED",
                "LAG",
                "LOG BASE",
                "RSS MB",
                "LOG MB",
                "STATE MB"
            ))?;
            for row in &rows {
                say(status_line(row, leader_commit, seen(row.id)))?;
            }
        }
    }
    Ok(healthy)
}

/// A server's role as the table and the JSON show it.
fn role_of(report: &kvraft_proto::ServerReport) -> &'static str {
    if report.catching_up {
        "catching-up"
    } else if report.role == kvraft_proto::Role::Leader as i32 {
        "leader"
    } else {
        "follower"
    }
}

fn status_line(
    row: &kvraft::cluster_status::ServerRow,
    leader_commit: Option<u64>,
    coord_sees: &str,
) -> String {
    let Some(status) = &row.status else {
        return format!(
            "{:>3}  {:<21} {:<11} {:<8} {:<12}",
            row.id, row.addr, coord_sees, "-", "down"
        );
    };
    let report = status.report.clone().unwrap_or_default();
    let lag = leader_commit.map_or("-".to_string(), |c| {
        c.saturating_sub(status.last_applied).to_string()
    });
    let uuid: String = report.uuid.chars().take(8).collect();
    format!(
        "{:>3}  {:<21} {:<11} {:<8} {:<12} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8.1} {:>8.1} {:>8.1}",
        row.id,
        row.addr,
        coord_sees,
        uuid,
        role_of(&report),
        report.term,
        report.commit_index,
        status.last_applied,
        lag,
        status.log_base_index,
        kvraft::cluster_status::mib(status.rss_bytes),
        kvraft::cluster_status::mib(status.log_bytes),
        kvraft::cluster_status::mib(status.state_bytes)
    )
}

/// One line per server: applied index and term, digest, bytes hashed; exit status non-zero if
/// a server did not answer or two servers at the same applied index disagree.
async fn print_digests(config: &ClusterConfig) -> anyhow::Result<bool> {
    let mut seen: std::collections::BTreeMap<(u64, u64), u64> = Default::default();
    let mut ok = true;
    for server in &config.servers {
        match kvraft::cluster_status::server_digest(&server.addr).await {
            Ok(d) => {
                let agrees = *seen
                    .entry((d.applied_index, d.applied_term))
                    .or_insert(d.digest)
                    == d.digest;
                ok &= agrees;
                println!(
                    "server {}: applied {} term {} digest {:016x} bytes {}{}",
                    server.id,
                    d.applied_index,
                    d.applied_term,
                    d.digest,
                    d.bytes,
                    if agrees {
                        ""
                    } else {
                        " DIFFERS from another server at the same index"
                    }
                );
            }
            Err(e) => {
                ok = false;
                println!("server {}: no digest: {e}", server.id);
            }
        }
    }
    Ok(ok)
}

fn status_json(
    row: &kvraft::cluster_status::ServerRow,
    leader_commit: Option<u64>,
) -> serde_json::Value {
    let Some(status) = &row.status else {
        return json!({"id": row.id, "addr": row.addr, "up": false});
    };
    let report = status.report.clone().unwrap_or_default();
    json!({
        "id": row.id,
        "addr": row.addr,
        "up": true,
        "uuid": report.uuid,
        "role": role_of(&report),
        "term": report.term,
        "leader_id": report.leader_id,
        "commit_index": report.commit_index,
        "applied_index": status.last_applied,
        "lag": leader_commit.map(|c| c.saturating_sub(status.last_applied)),
        "catching_up": report.catching_up,
        "rss_bytes": status.rss_bytes,
        "log_bytes": status.log_bytes,
        "snapshot_bytes": status.snapshot_bytes,
        "state_bytes": status.state_bytes,
        "log_base_index": status.log_base_index,
        "log_entries_held": status.log_entries_held,
        "log_bytes_held": status.log_bytes_held,
        "snapshots_sent": status.snapshots_sent,
        "snapshots_installed": status.snapshots_installed,
    })
}

/// Closes the client (which ships its last trace events when tracing is on) and passes the
/// command's result on. It takes the last handle, so the tracer stops and removes its spool.
async fn finish<T>(client: Client, result: T) -> T {
    client.close().await;
    result
}

/// Prints one line to stdout; an error (such as a closed pipe) ends the command cleanly
/// instead of panicking as `println!` would.
fn say(line: impl std::fmt::Display) -> anyhow::Result<()> {
    write_stdout(&format!("{line}\n"))
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// A client that registers a session only with its first write: a read appends nothing to
/// the log, a single write one request fewer than [`connect`].
async fn connect_lazily(config: &ClusterConfig, client_id: &str) -> anyhow::Result<Client> {
    Client::connect_without_session(config, client_id)
        .await
        .with_context(|| format!("cannot connect to the cluster as client {client_id:?}"))
}

/// A value argument: `-` reads stdin as bytes.
fn value_arg(value: String) -> anyhow::Result<Vec<u8>> {
    if value != "-" {
        return Ok(value.into_bytes());
    }
    let mut bytes = Vec::new();
    // One byte past the largest value any config allows: enough to refuse a longer one
    // without reading all of it.
    let cap = limits::VALUE_BYTES_CEILING as u64 + 1;
    std::io::Read::read_to_end(&mut std::io::Read::take(std::io::stdin(), cap), &mut bytes)
        .context("cannot read the value from stdin")?;
    Ok(bytes)
}

async fn connect(config: &ClusterConfig, client_id: &str) -> anyhow::Result<Client> {
    Client::connect(config, client_id)
        .await
        .with_context(|| format!("cannot connect to the cluster as client {client_id:?}"))
}

/// The scripted workload; returns whether every operation succeeded.
async fn script(client: &Client) -> anyhow::Result<bool> {
    let mut all_ok = true;
    for i in 0..SCRIPT_OPS {
        let (key, value) = (format!("k{i}"), format!("val{i}"));
        let put = client.put(key.as_str(), value.as_str()).await;
        all_ok &= put.is_ok();
        say(format!("Put({key}, {value}) -> {}", describe_put(&put)))?;
        let get = client.get(key.as_str()).await;
        all_ok &= get.is_ok();
        say(format!("Get({key}) -> {}", describe_get(&get)))?;
    }
    Ok(all_ok)
}

fn describe_put(result: &Result<kvslib::PutOutcome, Error>) -> String {
    match result {
        Ok(out) => format!("ok (version {}, index {})", out.version, out.index),
        Err(error) => format!("error: {error}"),
    }
}

fn describe_get(result: &Result<Option<Vec<u8>>, Error>) -> String {
    match result {
        Ok(Some(value)) => String::from_utf8_lossy(value).into_owned(),
        Ok(None) => "(not found)".to_string(),
        Err(error) => format!("error: {error}"),
    }
}

async fn put_once(
    client: &Client,
    key: String,
    value: Vec<u8>,
    output: DataFormat,
) -> anyhow::Result<bool> {
    let out = client.put(key.as_bytes(), value).await?;
    match output {
        DataFormat::Text => say(format!("ok (version {}, index {})", out.version, out.index))?,
        DataFormat::Json => {
            say(json!({"key": key, "version": out.version, "revision": out.index}))?
        }
    }
    Ok(true)
}

async fn get_once(client: &Client, key: &str, output: DataFormat) -> anyhow::Result<bool> {
    let value = client.get_versioned(key).await?;
    match output {
        DataFormat::Text => say(describe_get(&Ok(value.map(|v| v.value))))?,
        DataFormat::Json => say(match &value {
            Some(v) => json!({"found": true, "kv": txn_text::versioned_json(key.as_bytes(), v)}),
            None => json!({"found": false, "key": key}),
        })?,
    }
    Ok(true)
}

async fn delete_once(
    client: &Client,
    key: String,
    prefix: bool,
    output: DataFormat,
) -> anyhow::Result<bool> {
    if prefix {
        let deleted = client.delete_prefix(key.as_bytes()).await?;
        match output {
            DataFormat::Text => say(format!("deleted {deleted} keys"))?,
            DataFormat::Json => say(json!({"prefix": key, "deleted": deleted}))?,
        }
        return Ok(true);
    }
    check_key_value(key.as_bytes(), None).map_err(anyhow::Error::msg)?;
    let existed = client.delete(key.as_bytes()).await?;
    match output {
        DataFormat::Text => say(if existed { "deleted" } else { "(not found)" })?,
        DataFormat::Json => say(json!({"key": key, "deleted": u64::from(existed)}))?,
    }
    Ok(true)
}

async fn cas_once(
    client: &Client,
    key: String,
    expected: u64,
    value: Vec<u8>,
    output: DataFormat,
) -> anyhow::Result<bool> {
    match client.cas(key.as_bytes(), expected, value).await? {
        CasOutcome::Swapped(out) => {
            match output {
                DataFormat::Text => {
                    say(format!("ok (version {}, index {})", out.version, out.index))?
                }
                DataFormat::Json => say(json!({"swapped": true, "key": key,
                    "version": out.version, "revision": out.index}))?,
            }
            Ok(true)
        }
        CasOutcome::Failed { current } => {
            let version = current.as_ref().map_or(0, |v| v.version);
            match output {
                DataFormat::Text => say(format!("failed: current version {version}"))?,
                DataFormat::Json => say(json!({"swapped": false, "key": key,
                    "current": current.as_ref()
                        .map(|v| txn_text::versioned_json(key.as_bytes(), v))}))?,
            }
            Ok(false)
        }
    }
}

async fn txn_once(client: &Client, txn: kvslib::Txn, output: DataFormat) -> anyhow::Result<bool> {
    let out = client.txn(txn.clone()).await?;
    match output {
        DataFormat::Text => {
            for line in txn_text::describe_txn(&txn, &out) {
                say(line)?;
            }
        }
        DataFormat::Json => say(txn_text::txn_json(&txn, &out))?,
    }
    Ok(out.succeeded)
}

/// Prints the events of `watch` until Ctrl-C or `count` events (0: no limit).
async fn watch_events(
    mut watch: kvslib::Watch,
    count: u64,
    output: DataFormat,
) -> anyhow::Result<bool> {
    watch.start().await?;
    let mut printed = 0u64;
    while count == 0 || printed < count {
        let event = tokio::select! {
            event = watch.next() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(true),
        };
        let kind = match event.kind {
            kvslib::EventKind::Put => "PUT",
            kvslib::EventKind::Delete => "DELETE",
        };
        match (output, event.kind) {
            (DataFormat::Text, kvslib::EventKind::Put) => say(format!(
                "PUT {} {} (revision {}, version {})",
                txn_text::show(&event.key),
                txn_text::show(&event.value.value),
                event.revision,
                event.value.version
            ))?,
            (DataFormat::Text, kvslib::EventKind::Delete) => say(format!(
                "DELETE {} (revision {})",
                txn_text::show(&event.key),
                event.revision
            ))?,
            (DataFormat::Json, _) => {
                let mut json = txn_text::versioned_json(&event.key, &event.value);
                json["type"] = json!(kind);
                json["revision"] = json!(event.revision);
                say(json)?
            }
        }
        printed += 1;
    }
    Ok(true)
}

/// What `scan` lists.
struct Scan {
    start: Vec<u8>,
    end: Vec<u8>,
    /// 0: now.
    revision: u64,
    /// 0: all.
    limit: u64,
    keys_only: bool,
}

/// Lists a range page by page, printing as it goes: the first page at `scan.revision` (0:
/// a linearizable read of now), the others at the revision the first was read at.
async fn scan_all(client: &Client, scan: Scan, output: DataFormat) -> anyhow::Result<bool> {
    let mut start = scan.start;
    let mut revision = scan.revision;
    let mut listed = 0u64;
    loop {
        let left = match scan.limit {
            0 => 0,
            n => n - listed,
        };
        let page = client
            .range_at(
                start.clone(),
                scan.end.clone(),
                left,
                scan.keys_only,
                revision,
            )
            .await?;
        revision = page.revision;
        for kv in &page.kvs {
            match (output, scan.keys_only) {
                (DataFormat::Text, true) => say(txn_text::show(&kv.key))?,
                (DataFormat::Text, false) => say(format!(
                    "{}\t{}",
                    txn_text::show(&kv.key),
                    txn_text::show(&kv.value.value)
                ))?,
                (DataFormat::Json, _) => say(txn_text::versioned_json(&kv.key, &kv.value))?,
            }
        }
        listed += page.kvs.len() as u64;
        if !page.more || (scan.limit != 0 && listed >= scan.limit) {
            return Ok(true);
        }
        start = page.next_key;
    }
}

fn leader_json(leader: &LeaderInfo) -> Value {
    json!({
        "Leader-UUID": leader.leader_uuid,
        "Leader-Id": leader.leader_id,
        "Term": leader.term,
    })
}

/// The leader object on one line in the documented spacing:
/// `{"Leader-UUID": "<uuid>", "Leader-Id": <id>, "Term": <term>}`.
fn leader_text(leader: &LeaderInfo) -> String {
    let json = leader_json(leader);
    let fields: Vec<String> = json
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{}: {v}", Value::from(k.as_str())))
                .collect()
        })
        .unwrap_or_default();
    format!("{{{}}}", fields.join(", "))
}

fn print_leader(leader: &LeaderInfo, out: Option<&Path>) -> anyhow::Result<()> {
    let text = leader_text(leader);
    say(&text)?;
    if let Some(path) = out {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The `run` subcommand; returns whether every request had status 0.
async fn run_batch(client: &Client, args: &RunArgs) -> anyhow::Result<bool> {
    if args.count > RUN_COUNT_MAX {
        bail!(
            "--count {} is above the limit of {RUN_COUNT_MAX}",
            args.count
        );
    }
    let requests = (0..args.count).map(|i| request_for(args, i));
    let records: Vec<Value> = if args.sequential {
        let mut records = Vec::with_capacity(args.count);
        for (key, value) in requests {
            records.push(timed_request(client, args.op, key, value).await);
        }
        records
    } else {
        let pending = requests.map(|(key, value)| timed_request(client, args.op, key, value));
        futures_util::future::join_all(pending).await
    };
    let all_ok = records
        .iter()
        .all(|r| r["Response"]["Status"] == json!(STATUS_OK));
    let text = serde_json::to_string_pretty(&json!({ args.op.name(): records }))?;
    match &args.out {
        Some(path) => std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => say(&text)?,
    }
    Ok(all_ok)
}

/// Key and value of request `i` of a batch.
fn request_for(args: &RunArgs, i: usize) -> (String, String) {
    let n = if args.multi_key { i } else { 0 };
    (
        format!("{}{n}", args.key_prefix),
        format!("{}{n}", args.value_prefix),
    )
}

/// Issues one request and returns its JSON record.
async fn timed_request(client: &Client, op: Op, key: String, value: String) -> Value {
    let requested_at = SystemTime::now();
    let started = Instant::now();
    let result = match op {
        Op::Write => client
            .put(key.as_str(), value.as_str())
            .await
            .map(|_| Some(value.clone())),
        Op::Read => client
            .get(key.as_str())
            .await
            .map(|v| v.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())),
    };
    // Both timestamps derive from one monotonic measurement, so they agree with the duration.
    let elapsed = started.elapsed();
    let (status, response, validate) = match result {
        Ok(read) => {
            let valid = op == Op::Write || read.as_deref() == Some(value.as_str());
            (STATUS_OK, read, valid)
        }
        Err(error) => (status_of(&error), Some(error.to_string()), false),
    };
    json!({
        "Request": {
            "Operation": op.name(),
            "Key": key,
            "Value": value,
            "Request_timestamp": rfc3339(requested_at),
        },
        "Response": {
            "Status": status,
            "Response": response,
            "Validate": validate,
            "Response_timestamp": rfc3339(requested_at + elapsed),
        },
        "Req_resolved_time": nanos(elapsed),
    })
}

fn status_of(error: &Error) -> i32 {
    match error {
        // A stale refusal says the server no longer knows whether the put applied.
        Error::Timeout { .. } | Error::Unavailable(_) | Error::Stale => STATUS_INDETERMINATE,
        Error::InvalidInput(_) => STATUS_INVALID_INPUT,
        Error::SessionExpired => STATUS_SESSION_EXPIRED,
        Error::Rejected(_) => STATUS_OTHER,
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One parsed line of the interactive shell.
#[derive(Debug, PartialEq, Eq)]
enum ShellLine {
    Put(String, String),
    Get(String),
    Delete(String),
    Cas(String, u64, String),
    Scan(String),
    Leader,
    Help,
    Quit,
    Empty,
}

fn parse_shell_line(line: &str) -> Result<ShellLine, String> {
    let line = line.trim();
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim_start();
    match (word, rest) {
        ("", _) => Ok(ShellLine::Empty),
        ("put", rest) => match rest.split_once(char::is_whitespace) {
            Some((key, value)) => Ok(ShellLine::Put(key.to_string(), value.trim().to_string())),
            None => Err("usage: put <key> <value>".to_string()),
        },
        ("get", key) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            Ok(ShellLine::Get(key.to_string()))
        }
        ("get", _) => Err("usage: get <key>".to_string()),
        ("delete", key) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            Ok(ShellLine::Delete(key.to_string()))
        }
        ("delete", _) => Err("usage: delete <key>".to_string()),
        ("scan", prefix) if !prefix.contains(char::is_whitespace) => {
            Ok(ShellLine::Scan(prefix.to_string()))
        }
        ("scan", _) => Err("usage: scan <prefix>".to_string()),
        ("cas", rest) => {
            let usage = || "usage: cas <key> <version> <value>".to_string();
            let (key, rest) = rest.split_once(char::is_whitespace).ok_or_else(usage)?;
            let (version, value) = rest
                .trim_start()
                .split_once(char::is_whitespace)
                .ok_or_else(usage)?;
            let version = version.parse().map_err(|_| usage())?;
            Ok(ShellLine::Cas(
                key.to_string(),
                version,
                value.trim().to_string(),
            ))
        }
        ("leader", "") => Ok(ShellLine::Leader),
        ("help", _) => Ok(ShellLine::Help),
        ("quit" | "exit", "") => Ok(ShellLine::Quit),
        _ => Err(format!("unknown command {line:?}")),
    }
}

/// The interactive shell; runs until `quit` or end of input. Returns whether every operation
/// succeeded, though a failed one does not end the shell.
async fn shell(client: &Client) -> anyhow::Result<bool> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut all_ok = true;
    loop {
        write_stdout("kvraft> ")?;
        let Some(line) = lines.next_line().await.context("cannot read stdin")? else {
            say("")?;
            return Ok(all_ok);
        };
        let reply = match parse_shell_line(&line) {
            Ok(ShellLine::Quit) => return Ok(all_ok),
            Ok(ShellLine::Empty) => continue,
            Ok(ShellLine::Help) => SHELL_HELP.to_string(),
            Ok(command) => {
                let (ok, text) = shell_op(client, command).await;
                all_ok &= ok;
                text
            }
            Err(message) => format!("{message}\n{SHELL_HELP}"),
        };
        say(reply)?;
    }
}

/// Runs one shell operation; returns whether it succeeded and the text to print.
async fn shell_op(client: &Client, command: ShellLine) -> (bool, String) {
    match command {
        ShellLine::Put(key, value) => {
            let result = client.put(key, value).await;
            (result.is_ok(), describe_put(&result))
        }
        ShellLine::Get(key) => {
            let result = client.get(key).await;
            (result.is_ok(), describe_get(&result))
        }
        ShellLine::Delete(key) => match client.delete(key).await {
            Ok(true) => (true, "deleted".to_string()),
            Ok(false) => (true, "(not found)".to_string()),
            Err(error) => (false, format!("error: {error}")),
        },
        ShellLine::Cas(key, version, value) => match client.cas(key, version, value).await {
            Ok(CasOutcome::Swapped(out)) => (true, describe_put(&Ok(out))),
            Ok(CasOutcome::Failed { current }) => (
                true,
                format!(
                    "failed: current version {}",
                    current.map_or(0, |v| v.version)
                ),
            ),
            Err(error) => (false, format!("error: {error}")),
        },
        ShellLine::Scan(prefix) => match client.range_prefix(prefix, SHELL_SCAN_MAX, false).await {
            Ok(page) => {
                let mut lines: Vec<String> = page
                    .kvs
                    .iter()
                    .map(|kv| {
                        format!(
                            "{}\t{}",
                            txn_text::show(&kv.key),
                            txn_text::show(&kv.value.value)
                        )
                    })
                    .collect();
                if page.more {
                    lines.push(format!("(more than {SHELL_SCAN_MAX} keys)"));
                }
                if lines.is_empty() {
                    lines.push("(no keys)".to_string());
                }
                (true, lines.join("\n"))
            }
            Err(error) => (false, format!("error: {error}")),
        },
        ShellLine::Leader => match client.leader().await {
            Ok(leader) => (true, leader_json(&leader).to_string()),
            Err(error) => (false, format!("error: {error}")),
        },
        ShellLine::Help | ShellLine::Quit | ShellLine::Empty => (true, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_lines_parse() {
        assert_eq!(
            parse_shell_line("put k1 hello world"),
            Ok(ShellLine::Put("k1".into(), "hello world".into()))
        );
        assert_eq!(
            parse_shell_line("  get k1 "),
            Ok(ShellLine::Get("k1".into()))
        );
        assert_eq!(parse_shell_line("leader"), Ok(ShellLine::Leader));
        assert_eq!(parse_shell_line(""), Ok(ShellLine::Empty));
        assert_eq!(parse_shell_line("quit"), Ok(ShellLine::Quit));
        assert!(parse_shell_line("put k1").is_err());
        assert!(parse_shell_line("get").is_err());
        assert!(parse_shell_line("get a b").is_err());
        assert_eq!(
            parse_shell_line("delete k1"),
            Ok(ShellLine::Delete("k1".into()))
        );
        assert_eq!(
            parse_shell_line("cas k 3 new value"),
            Ok(ShellLine::Cas("k".into(), 3, "new value".into()))
        );
        assert!(parse_shell_line("cas k x v").is_err());
        assert_eq!(
            parse_shell_line("scan p/"),
            Ok(ShellLine::Scan("p/".into()))
        );
        assert!(parse_shell_line("frob k1").is_err());
    }

    #[test]
    fn batch_keys_follow_multi_key() {
        let mut args = RunArgs {
            op: Op::Write,
            key_prefix: "k".into(),
            value_prefix: "v".into(),
            count: 3,
            multi_key: false,
            sequential: false,
            out: None,
        };
        assert_eq!(request_for(&args, 2), ("k0".into(), "v0".into()));
        args.multi_key = true;
        assert_eq!(request_for(&args, 2), ("k2".into(), "v2".into()));
    }

    #[test]
    fn statuses_match_the_documented_codes() {
        let timeout = Error::Timeout {
            op: "Put",
            last_error: String::new(),
        };
        assert_eq!(status_of(&timeout), 1);
        assert_eq!(status_of(&Error::InvalidInput(String::new())), 2);
        assert_eq!(status_of(&Error::SessionExpired), 3);
        assert_eq!(status_of(&Error::Stale), 1);
        assert_eq!(status_of(&Error::Rejected(String::new())), 4);
    }

    #[test]
    fn cli_parses_run_flags() {
        let cli = Cli::try_parse_from([
            "client",
            "c1",
            "run",
            "--op",
            "read",
            "--key-prefix",
            "k",
            "--multi-key",
        ])
        .expect("valid command line");
        let Some(Command::Run(args)) = cli.command else {
            panic!("not run: {cli:?}")
        };
        assert_eq!((args.op, args.count, args.multi_key), (Op::Read, 5, true));
        assert_eq!(cli.config, PathBuf::from("config/cluster.toml"));
    }
}
