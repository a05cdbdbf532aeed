//! The tracing server: stores the event batches every tracer ships in two logs, and tells a
//! restarted tracer where its clock left off.
//!
//! ```text
//!  tracers ──Ship(batch)──▶ LogFiles ──▶ output_file        {"TracerIdentity":..,"TraceID":..,
//!          ◀──ack (after both logs are written and flushed)   "Tag":..,"Body":{..},"VectorClock":{..}}
//!                                 └──▶ shiviz_output_file   <identity> <clock JSON>
//!  tracer start ──Resume──▶ last stored clock of the identity   <trace id> <Tag> <body JSON>
//! ```
//!
//! Invariants:
//! - A batch is acknowledged only once written to both files and flushed to the OS, so a crash
//!   of this process loses no acknowledged event; the tracer resends an unacknowledged batch.
//! - Per identity, stored events have own counters 1, 2, 3, ... in file order: an event whose
//!   counter is not above the last stored one is a resend and is skipped.
//! - Events of a process that was killed before shipping them are read from its spool file
//!   (`tracing.spool_dir`, see [`crate::spool`]) at start, every [`SPOOL_SCAN_MS`] (skipping
//!   identities that shipped within [`SPOOL_LIVE_MS`]) and at shutdown, and stored the same
//!   way (a resend of what is stored is skipped). So an event a token names is in the logs
//!   within [`SPOOL_LIVE_MS`] + [`SPOOL_SCAN_MS`] of the kill, or, if this server was killed
//!   in that window too, once it starts again. `--fresh` removes old spool files with
//!   the logs.
//! - The JSON-lines log is the source of truth. On start (unless `fresh`) it is read back, a
//!   torn last line (crash mid-write) is cut, and the ShiViz log is rewritten from it; both are
//!   then appended to. So a restart of the tracing server continues the same logs.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use kvraft_proto::tracing_server::{Tracing, TracingServer};
use kvraft_proto::{
    EncodedEventBatch, EventBatch, EventBatchAck, ResumeRequest, ResumeResponse, TraceEvent,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::vclock::VClock;
use crate::wire::EventView;

/// The first line of every ShiViz log: how ShiViz splits it into events.
pub const SHIVIZ_REGEX: &str = r"(?<host>\S*) (?<clock>{.*})\n(?<event>.*)";
/// How long shutdown waits for connected tracers to hang up. Batches already answered are
/// stored; a batch cut off is resent by its tracer to the next instance.
const SHUTDOWN_DRAIN_MS: u64 = 2_000;
/// Largest batch accepted (the tracer sends at most ~1 MiB).
const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How often the spool directory is read for events no tracer shipped. It bounds how long
/// the log may name an event of a killed process that it does not hold yet (a process's last
/// events before a SIGKILL may be spooled, and seen by others, but not shipped); a scan reads
/// only what the files gained since the last one.
pub const SPOOL_SCAN_MS: u64 = 100;
/// A scan skips the files of an identity that shipped a batch this recently: its tracer is
/// alive and ships what it spools (a batch every `SHIP_LINGER_MS`, 20 ms, plus the round trip
/// of the one before, while it has events; one slower than this is only read twice). Once it
/// stops shipping (killed), the next scan reads its files from where the last one left off.
pub const SPOOL_LIVE_MS: u64 = 200;

/// One line of the JSON-lines log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JsonEvent {
    #[serde(rename = "TracerIdentity")]
    pub identity: String,
    #[serde(rename = "TraceID")]
    pub trace_id: u64,
    #[serde(rename = "Tag")]
    pub tag: String,
    #[serde(rename = "Body")]
    pub body: serde_json::Value,
    #[serde(rename = "VectorClock")]
    pub clock: VClock,
}

/// Where the logs go.
#[derive(Debug, Clone)]
pub struct OutputPaths {
    pub json: PathBuf,
    pub shiviz: PathBuf,
}

/// Both log files and the last clock stored per identity.
pub struct LogFiles {
    paths: OutputPaths,
    json: BufWriter<File>,
    shiviz: BufWriter<File>,
    last: HashMap<String, VClock>,
    stored: u64,
    /// When each identity last shipped a batch; a periodic scan drops the entries older than
    /// [`SPOOL_LIVE_MS`], so it holds only the identities that shipped within it, however
    /// many identities ever shipped.
    shipped_at: HashMap<String, std::time::Instant>,
}

impl LogFiles {
    /// Opens the logs: truncated when `fresh`, else recovered and continued.
    pub fn open(paths: OutputPaths, fresh: bool) -> anyhow::Result<LogFiles> {
        let events = if fresh {
            Vec::new()
        } else {
            recover_json(&paths.json)?
        };
        let mut last = HashMap::new();
        for e in &events {
            last.insert(e.identity.clone(), e.clock.clone());
        }
        // Rewrite the ShiViz log from the JSON log: it may have been cut mid-event.
        let shiviz_file = File::create(&paths.shiviz)
            .with_context(|| format!("cannot create {}", paths.shiviz.display()))?;
        let mut shiviz = BufWriter::new(shiviz_file);
        writeln!(shiviz, "{SHIVIZ_REGEX}\n")
            .and_then(|_| events.iter().try_for_each(|e| write_shiviz(&mut shiviz, e)))
            .and_then(|_| shiviz.flush())
            .with_context(|| format!("cannot write {}", paths.shiviz.display()))?;
        let json_file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&paths.json)
            .with_context(|| format!("cannot open {}", paths.json.display()))?;
        if fresh {
            json_file
                .set_len(0)
                .with_context(|| format!("cannot truncate {}", paths.json.display()))?;
        }
        tracing::info!(
            events = events.len(),
            identities = last.len(),
            "trace logs {} and {} {}",
            paths.json.display(),
            paths.shiviz.display(),
            if fresh || events.is_empty() {
                "started"
            } else {
                "continued"
            }
        );
        Ok(LogFiles {
            paths,
            json: BufWriter::new(json_file),
            shiviz,
            last,
            stored: events.len() as u64,
            shipped_at: HashMap::new(),
        })
    }

    /// `identity` has just shipped a batch: its tracer is alive and ships what it spools.
    pub fn note_shipped(&mut self, identity: &str) {
        let now = std::time::Instant::now();
        match self.shipped_at.get_mut(identity) {
            Some(at) => *at = now,
            None => {
                self.shipped_at.insert(identity.to_string(), now);
            }
        }
    }

    /// Whether `identity` shipped a batch within `within`.
    pub fn shipped_within(&self, identity: &str, within: Duration) -> bool {
        self.shipped_at
            .get(identity)
            .is_some_and(|at| at.elapsed() < within)
    }

    /// Forgets the identities that have not shipped within `within`.
    fn forget_shipped_before(&mut self, within: Duration) {
        self.shipped_at.retain(|_, at| at.elapsed() < within);
    }

    /// The clock of `identity`'s last stored event.
    pub fn last_clock(&self, identity: &str) -> VClock {
        self.last.get(identity).cloned().unwrap_or_default()
    }

    /// Events stored so far (recovered ones included).
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Writes a batch of `identity`'s events and flushes both files to the OS.
    ///
    /// Each batch's lines are built as bytes in two buffers and written with one `write_all`
    /// per file: no formatting machinery per field (`writeln!` through the buffered files took
    /// a fifth of the tracing server's CPU).
    pub fn store(&mut self, identity: &str, events: &[EventView<'_>]) -> anyhow::Result<()> {
        let mut ident_json = String::new();
        crate::wire::json_string(&mut ident_json, identity);
        let mut last_own = self.last.get(identity).map_or(0, |c| c.get(identity));
        let mut last_stored = None;
        let (mut clock_json, mut tag_json) = (String::new(), String::new());
        let (mut json, mut shiviz) = (Vec::new(), Vec::new());
        for event in events {
            let own = event.counter(identity);
            if own <= last_own {
                continue; // a resend of a batch whose answer was lost
            }
            if own != last_own + 1 {
                tracing::warn!(
                    identity,
                    own,
                    last_own,
                    "events {}..{own} of {identity} are missing (was this log started afresh \
                     while {identity} kept running?); ShiViz will reject the log",
                    last_own + 1
                );
            }
            // Written as text, not through a JSON value: the body is kept as the tracer wrote
            // it when it is one line of JSON (what tracers send), and each clock is printed
            // once for both logs, straight from the wire form.
            clock_json.clear();
            crate::wire::clock_json(&mut clock_json, &event.clock);
            let raw_ok = !event.body.contains(['\n', '\r'])
                && serde_json::from_str::<serde::de::IgnoredAny>(event.body).is_ok();
            let body = if raw_ok {
                std::borrow::Cow::Borrowed(event.body)
            } else {
                std::borrow::Cow::Owned(
                    serde_json::to_string(event.body).context("cannot encode an event body")?,
                )
            };
            tag_json.clear();
            crate::wire::json_string(&mut tag_json, event.tag);
            let trace_id = crate::wire::decimal(event.trace_id);
            for part in [
                "{\"TracerIdentity\":",
                &ident_json,
                ",\"TraceID\":",
                trace_id.as_str(),
                ",\"Tag\":",
                &tag_json,
                ",\"Body\":",
                &body,
                ",\"VectorClock\":",
                &clock_json,
                "}\n",
            ] {
                json.extend_from_slice(part.as_bytes());
            }
            shiviz_event(
                &mut shiviz,
                identity,
                &clock_json,
                trace_id.as_str(),
                event.tag,
                &body,
            );
            last_own = own;
            last_stored = Some(event);
            self.stored += 1;
        }
        self.json
            .write_all(&json)
            .with_context(|| format!("cannot write {}", self.paths.json.display()))?;
        self.shiviz
            .write_all(&shiviz)
            .with_context(|| format!("cannot write {}", self.paths.shiviz.display()))?;
        if let Some(event) = last_stored {
            self.last
                .insert(identity.to_string(), VClock::from_wire(&event.clock));
        }
        self.flush()
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.json
            .flush()
            .with_context(|| format!("cannot write {}", self.paths.json.display()))?;
        self.shiviz
            .flush()
            .with_context(|| format!("cannot write {}", self.paths.shiviz.display()))
    }

    /// Flushes and fsyncs both files (at shutdown).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.json.get_ref().sync_all()?;
        self.shiviz.get_ref().sync_all()?;
        Ok(())
    }
}

fn write_shiviz(out: &mut impl Write, e: &JsonEvent) -> std::io::Result<()> {
    let mut lines = Vec::new();
    let trace_id = crate::wire::decimal(e.trace_id);
    let (clock, body) = (e.clock.to_json(), e.body.to_string());
    shiviz_event(
        &mut lines,
        &e.identity,
        &clock,
        trace_id.as_str(),
        &e.tag,
        &body,
    );
    out.write_all(&lines)
}

/// Appends one event of the ShiViz log: `<identity> <clock JSON>`, then
/// `<trace id> <tag> <body JSON>` (the parsing regex is [`SHIVIZ_REGEX`]).
fn shiviz_event(
    out: &mut Vec<u8>,
    identity: &str,
    clock_json: &str,
    trace_id: &str,
    tag: &str,
    body: &str,
) {
    for part in [
        identity, " ", clock_json, "\n", trace_id, " ", tag, " ", body, "\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
}

/// Reads the JSON-lines log back, cutting a torn last line; an unreadable complete line is an
/// error naming the file and line.
fn recover_json(path: &Path) -> anyhow::Result<Vec<JsonEvent>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        tracing::warn!(
            "{}: cutting a torn last line of {} bytes (the tracing server crashed mid-write)",
            path.display(),
            text.len() - complete
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("cannot truncate {}", path.display()))?;
    }
    let text = std::str::from_utf8(&text[..complete])
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a trace event", path.display(), i + 1))
        })
        .collect()
}

/// Reads the spool files of every tracer (see [`crate::spool`]) from where it last stopped in
/// each, and stores the events the logs lack.
pub struct SpoolScan {
    dir: PathBuf,
    /// Each file's random id (from its header) and the bytes of it already read: a name can
    /// come back for a new file (a tracer that stopped cleanly removed its files, and its next
    /// start numbers them from 1 again), which is then read from its start.
    offsets: HashMap<PathBuf, (u64, u64)>,
}

impl SpoolScan {
    /// A scan of `dir`; with `fresh`, the spool files of earlier runs are removed first (their
    /// events belong to the logs `--fresh` discards).
    pub fn new(dir: PathBuf, fresh: bool) -> SpoolScan {
        if fresh {
            for (_, _, path) in crate::spool::list(&dir, None).unwrap_or_default() {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!("cannot remove old trace spool {}: {e}", path.display());
                }
            }
        }
        SpoolScan {
            dir,
            offsets: HashMap::new(),
        }
    }

    /// One pass over the spool files; returns how many events it stored. A file that cannot
    /// be read is reported and skipped (it is tried again next pass). With `live`, the files
    /// of identities that shipped a batch within it are left for a later pass: their tracers
    /// ship what they spool, and reading it here too cost the tracing server a sixth of its
    /// CPU (it stored the events not yet shipped, then decoded them again when they came).
    pub fn scan(
        &mut self,
        files: &Mutex<LogFiles>,
        live: Option<Duration>,
    ) -> anyhow::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        let listed = crate::spool::list(&self.dir, None)
            .with_context(|| format!("cannot list the trace spool {}", self.dir.display()))?;
        self.offsets
            .retain(|path, _| listed.iter().any(|(_, _, p)| p == path));
        if let Some(within) = live {
            let mut files = files.lock().unwrap_or_else(|p| p.into_inner());
            files.forget_shipped_before(within);
        }
        let mut stored = 0;
        for (identity, _, path) in listed {
            if let Some(within) = live {
                let files = files.lock().unwrap_or_else(|p| p.into_inner());
                if files.shipped_within(&identity, within) {
                    continue;
                }
            }
            let mut header = [0u8; crate::spool::HEADER_BYTES];
            let mut bytes = Vec::new();
            let known = self.offsets.get(&path).copied();
            let read = File::open(&path).and_then(|mut f| {
                // A file whose header is not whole yet is read again next pass.
                if f.read_exact(&mut header).is_err() {
                    return Ok(None);
                }
                let id = crate::spool::file_id(&header)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
                    .unwrap_or(0);
                let offset = match known {
                    Some((known_id, offset)) if known_id == id => offset,
                    _ => 0,
                };
                f.seek(SeekFrom::Start(offset))?;
                f.read_to_end(&mut bytes)?;
                Ok(Some((id, offset)))
            });
            let (id, offset) = match read {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("cannot read trace spool {}: {e}", path.display());
                    }
                    continue;
                }
            };
            let records = match crate::spool::read_records(&bytes, offset == 0) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("skipping trace spool {}: {e}", path.display());
                    continue;
                }
            };
            self.offsets
                .insert(path.clone(), (id, offset + records.end as u64));
            let mut files = files.lock().unwrap_or_else(|p| p.into_inner());
            let have = files.last_clock(&identity).get(&identity);
            let mut events = Vec::new();
            for (own, body) in records.records {
                if own <= have {
                    continue;
                }
                match crate::wire::decode_event(body) {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::warn!("{}: {e}", path.display());
                        break;
                    }
                }
            }
            if !events.is_empty() {
                stored += events.len();
                files.store(&identity, &events)?;
            }
        }
        Ok(stored)
    }
}

/// The `Tracing` gRPC service.
#[derive(Clone)]
pub struct TracingService {
    files: Arc<Mutex<LogFiles>>,
}

impl TracingService {
    pub fn new(files: LogFiles) -> TracingService {
        TracingService {
            files: Arc::new(Mutex::new(files)),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, LogFiles> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Tracing for TracingService {
    async fn resume(
        &self,
        request: Request<ResumeRequest>,
    ) -> Result<Response<ResumeResponse>, Status> {
        let identity = request.into_inner().identity;
        let clock = self.files().last_clock(&identity);
        tracing::info!(identity, own = clock.get(&identity), "tracer (re)started");
        Ok(Response::new(ResumeResponse {
            clock: clock.to_proto(),
        }))
    }

    async fn ship(&self, request: Request<EventBatch>) -> Result<Response<EventBatchAck>, Status> {
        let batch = request.into_inner();
        self.store(batch.identity, Incoming::Messages(batch.events))
            .await
    }

    async fn ship_encoded(
        &self,
        request: Request<EncodedEventBatch>,
    ) -> Result<Response<EventBatchAck>, Status> {
        let batch = request.into_inner();
        self.store(batch.identity, Incoming::Encoded(batch.events))
            .await
    }
}

/// A batch of events as it came: generated messages (`Ship`) or their bytes (`ShipEncoded`).
enum Incoming {
    Messages(Vec<TraceEvent>),
    Encoded(Vec<prost::bytes::Bytes>),
}

impl TracingService {
    /// Stores `identity`'s events (written and flushed to both logs before it returns).
    async fn store(
        &self,
        identity: String,
        events: Incoming,
    ) -> Result<Response<EventBatchAck>, Status> {
        if identity.is_empty() || identity.contains(char::is_whitespace) {
            return Err(Status::invalid_argument(format!(
                "tracer identity {identity:?} must be non-empty without spaces"
            )));
        }
        let files = Arc::clone(&self.files);
        // Decoding and file writes take CPU and block: keep them off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let views: Vec<EventView<'_>> = match &events {
                Incoming::Messages(events) => events.iter().map(EventView::of_message).collect(),
                Incoming::Encoded(events) => {
                    let mut views = Vec::with_capacity(events.len());
                    for (i, bytes) in events.iter().enumerate() {
                        let view = crate::wire::decode_event(bytes).map_err(|e| {
                            Status::invalid_argument(format!(
                                "events[{i}] is not a TraceEvent: {e}"
                            ))
                        })?;
                        views.push(view);
                    }
                    views
                }
            };
            let mut files = files.lock().unwrap_or_else(|p| p.into_inner());
            files.store(&identity, &views).map_err(|e| {
                tracing::error!("{e:#}");
                Status::unavailable(format!("cannot store events: {e:#}"))
            })?;
            files.note_shipped(&identity);
            Ok::<(), Status>(())
        })
        .await
        .map_err(|e| Status::internal(format!("storing task failed: {e}")))?;
        result?;
        Ok(Response::new(EventBatchAck {}))
    }
}

/// Serves `Tracing` on `listener` until `shutdown` completes, reading the spool files in
/// `spool_dir` meanwhile, then reads them a last time and flushes and fsyncs the logs.
pub async fn run(
    paths: OutputPaths,
    spool_dir: PathBuf,
    fresh: bool,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let files = LogFiles::open(paths, fresh)?;
    let service = TracingService::new(files);
    let scan = Arc::new(Mutex::new(SpoolScan::new(spool_dir, fresh)));
    let scanning = tokio::spawn(scan_spools(Arc::clone(&scan), Arc::clone(&service.files)));
    let addr = listener.local_addr()?;
    tracing::info!("tracing server listening on {addr}");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            TracingServer::new(service.clone())
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(kvraft_common::net::nodelay_incoming(listener), async move {
            let _ = stop_rx.wait_for(|&s| s).await;
        });
    tokio::pin!(serve);
    tokio::pin!(shutdown);
    tokio::select! {
        result = &mut serve => result.with_context(|| format!("serving the tracing API on {addr}"))?,
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            let drain = Duration::from_millis(SHUTDOWN_DRAIN_MS);
            if tokio::time::timeout(drain, &mut serve).await.is_err() {
                tracing::warn!("tracers still connected after {SHUTDOWN_DRAIN_MS} ms; stopping anyway");
            }
        }
    }
    scanning.abort();
    let last_scan = {
        let mut scan = scan.lock().unwrap_or_else(|p| p.into_inner());
        scan.scan(&service.files, None)
    };
    match last_scan {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "stored trace events found only in spool files"),
        Err(e) => tracing::warn!("{e:#}"),
    }
    let mut files = service.files();
    files.sync()?;
    tracing::info!(
        events = files.stored(),
        "tracing server stopped; logs flushed"
    );
    Ok(())
}

/// Reads the spool files every [`SPOOL_SCAN_MS`], off the async workers.
async fn scan_spools(scan: Arc<Mutex<SpoolScan>>, files: Arc<Mutex<LogFiles>>) {
    let mut every = tokio::time::interval(Duration::from_millis(SPOOL_SCAN_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (scan, files) = (Arc::clone(&scan), Arc::clone(&files));
        let result = tokio::task::spawn_blocking(move || {
            let mut scan = scan.lock().unwrap_or_else(|p| p.into_inner());
            scan.scan(&files, Some(Duration::from_millis(SPOOL_LIVE_MS)))
        })
        .await;
        match result {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(events = n, "stored trace events found only in spool files")
            }
            Ok(Err(e)) => tracing::warn!("{e:#}"),
            Err(e) => tracing::warn!("spool scan task failed: {e}"),
        }
    }
}

/// A `Tracing` service that resumes every tracer at an empty clock and never answers a batch:
/// the tracers' spools then keep every event they record, for a test to check what the spool
/// holds when a token leaves (with [`crate::spool::covers`]). Serves on `listener` until the
/// runtime stops.
pub fn serve_silent(listener: TcpListener) {
    struct Silent;

    #[tonic::async_trait]
    impl Tracing for Silent {
        async fn resume(
            &self,
            _: Request<ResumeRequest>,
        ) -> Result<Response<ResumeResponse>, Status> {
            Ok(Response::new(ResumeResponse::default()))
        }

        async fn ship(&self, _: Request<EventBatch>) -> Result<Response<EventBatchAck>, Status> {
            std::future::pending().await
        }

        async fn ship_encoded(
            &self,
            _: Request<EncodedEventBatch>,
        ) -> Result<Response<EventBatchAck>, Status> {
            std::future::pending().await
        }
    }

    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TracingServer::new(Silent))
            .serve_with_incoming(kvraft_common::net::nodelay_incoming(listener)),
    );
}

/// Last clock per identity, from a JSON-lines log (for tests).
pub fn last_clocks(events: &[JsonEvent]) -> BTreeMap<String, VClock> {
    events
        .iter()
        .map(|e| (e.identity.clone(), e.clock.clone()))
        .collect()
}
