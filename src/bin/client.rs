//! `client <CLIENT_ID> [--config FILE] [SUBCOMMAND]`: a thin command-line shell over kvslib.
//!
//! Without a subcommand it runs the original project's scripted workload (20 puts, each
//! followed by a get). Subcommands: `put`, `get`, `leader`, `run` (a batch of writes or reads
//! with a JSON record per request, for test harnesses) and `shell` (an interactive prompt).
//! Results go to stdout; logs (RUST_LOG, default `warn`) and errors go to stderr, so stdout
//! stays clean text or JSON.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvraft::launch;
use kvraft_common::limits::{check_key_value, check_key_value_within};
use kvslib::{Client, ClusterConfig, Error, LeaderInfo};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Operations of the scripted workload (the original's `for i in 0..20`).
const SCRIPT_OPS: usize = 20;
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

const SHELL_HELP: &str = "\
commands:
  put <key> <value>   store value (the rest of the line) under key
  get <key>           print the value under key, or (not found)
  leader              print the current leader as JSON
  help                print this help
  quit                leave (so does end of input)";

/// Client of a kvraft cluster: put, get, ask for the leader, run a scripted or batch
/// workload, or open an interactive shell.
#[derive(Parser, Debug)]
#[command(name = "client", version)]
#[command(
    after_help = "Without a subcommand, runs the scripted workload: for i in 0..20, \
    Put(k<i>, val<i>) then Get(k<i>), one result line each; exits non-zero if any failed.\n\
    Logs go to stderr; set RUST_LOG (default: warn), e.g. RUST_LOG=kvslib=debug."
)]
struct Cli {
    /// This client's id: names it in output and logs. Each run that writes registers a fresh
    /// session (`get`, `leader` and `status` register none), so two runs of one id never
    /// mistake each other's requests for retries.
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
        /// Value (up to 1 MiB).
        value: String,
    },
    /// Print the value under KEY, or "(not found)" (exit status 0 either way).
    Get {
        /// Key (1 to 1024 bytes).
        key: String,
    },
    /// Ask the coord for the current leader; prints
    /// {"Leader-UUID": "<uuid>", "Leader-Id": <id>, "Term": <term>}.
    Leader {
        /// Also write the JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every server's state (role, term, commit and applied index, lag behind the leader, memory,
    /// log size, whether it catches up after a lost disk) and the coord's leader view. Registers
    /// no session.
    /// Every server's state machine digest (applied index and term, a hash of all keys, values
    /// and sessions): servers at the same applied index must agree. Reads each server's whole
    /// state; registers no session.
    Digest,
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: StatusFormat,
    },
    /// Issue COUNT writes or reads and print a JSON record of each (see --help).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Interactive prompt reading put/get/leader/help/quit lines from stdin.
    #[command(after_help = SHELL_HELP)]
    Shell,
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
            finish(client.clone(), script(&client).await).await
        }
        Some(Command::Put { key, value }) => {
            // Refuse bad input before touching the network.
            let max = config.server.max_value();
            check_key_value_within(key.as_bytes(), Some(value.as_bytes()), max)
                .map_err(anyhow::Error::msg)?;
            let client = connect(&config, id).await?;
            finish(client.clone(), put_once(&client, key, value).await).await
        }
        Some(Command::Get { key }) => {
            check_key_value(key.as_bytes(), None).map_err(anyhow::Error::msg)?;
            // A read needs no session: nothing is appended to the log.
            let client = Client::connect_without_session(&config, id)
                .await
                .with_context(|| format!("cannot connect to the cluster as client {id:?}"))?;
            finish(client.clone(), get_once(&client, &key).await).await
        }
        Some(Command::Run(args)) => {
            let client = connect(&config, id).await?;
            finish(client.clone(), run_batch(&client, &args).await).await
        }
        Some(Command::Shell) => {
            let client = connect(&config, id).await?;
            finish(client.clone(), shell(&client).await).await
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
                .map(|row| status_json(row, leader_commit))
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
                "{:>3}  {:<21} {:<8} {:<12} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8} {:>8} {:>8}",
                "ID",
                "ADDRESS",
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
                say(status_line(row, leader_commit))?;
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

fn status_line(row: &kvraft::cluster_status::ServerRow, leader_commit: Option<u64>) -> String {
    let Some(status) = &row.status else {
        return format!("{:>3}  {:<21} {:<8} {:<12}", row.id, row.addr, "-", "down");
    };
    let report = status.report.clone().unwrap_or_default();
    let lag = leader_commit.map_or("-".to_string(), |c| {
        c.saturating_sub(status.last_applied).to_string()
    });
    let uuid: String = report.uuid.chars().take(8).collect();
    format!(
        "{:>3}  {:<21} {:<8} {:<12} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8.1} {:>8.1} {:>8.1}",
        row.id,
        row.addr,
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
/// command's result on.
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

async fn put_once(client: &Client, key: String, value: String) -> anyhow::Result<bool> {
    let out = client.put(key, value).await?;
    say(format!("ok (version {}, index {})", out.version, out.index))?;
    Ok(true)
}

async fn get_once(client: &Client, key: &str) -> anyhow::Result<bool> {
    let value = client.get(key).await?;
    say(describe_get(&Ok(value)))?;
    Ok(true)
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
        assert!(parse_shell_line("delete k1").is_err());
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
