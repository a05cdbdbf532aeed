//! OpenTelemetry spans of a real cluster (DESIGN section 5, next to the vector-clock trace of
//! t80): an OTLP/gRPC collector runs inside the test, the coord, three servers and one `client`
//! binary run export to it (`OTEL_EXPORTER_OTLP_ENDPOINT`), and one put must come back as one
//! distributed trace:
//!
//! ```text
//!  kvraft-client-otel1  kvslib.put (root) ── kv.Put (one per attempt)
//!  kvraft-server-L      └─ kv.put             (parent: a kv.Put attempt)
//!  kvraft-server-F      └─ replicate.append   (parent: the leader's kv.put; F != L, >= 1)
//! ```
//!
//! All on the trace id of the client's `kvslib.put`. On failure the spans received are printed.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::transport::server::TcpIncoming;

use crate::harness::{stdout, Cluster, WAIT};

const CLIENT_SERVICE: &str = "kvraft-client-otel1";
const SERVER_SERVICE_PREFIX: &str = "kvraft-server-";

/// One span as the collector received it; ids in lowercase hex, `parent` empty for a root.
#[derive(Clone, Debug)]
struct SpanRec {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

impl fmt::Display for SpanRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<22} {:<18} trace={} span={} parent={}",
            self.service,
            self.name,
            self.trace,
            self.id,
            if self.parent.is_empty() {
                "-"
            } else {
                &self.parent
            }
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The in-test OTLP trace collector: keeps every span of every export.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanRec>>>,
}

impl Collector {
    fn snapshot(&self) -> Vec<SpanRec> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "(no service.name)".into());
            for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                received.push(SpanRec {
                    service: service.clone(),
                    name: span.name,
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves `collector` on an ephemeral loopback port; returns the port and the server task.
async fn start_collector(collector: Collector) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let port = listener.local_addr().expect("collector addr").port();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .expect("collector serves");
    });
    (port, task)
}

/// What [`check_put_trace`] found: the leader's and the followers' service names.
#[derive(Debug)]
struct PutTrace {
    trace: String,
    leader: String,
    followers: Vec<String>,
}

/// Checks the span contract of the client's one put (see the module doc); `Err` says what is
/// missing so far (the exporters may not have sent everything yet).
fn check_put_trace(spans: &[SpanRec]) -> Result<PutTrace, String> {
    let puts: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.service == CLIENT_SERVICE && s.name == "kvslib.put")
        .collect();
    let put = match puts.as_slice() {
        [] => return Err(format!("no kvslib.put span of {CLIENT_SERVICE}")),
        [put] => *put,
        _ => return Err(format!("{} kvslib.put spans, expected 1", puts.len())),
    };
    if !put.parent.is_empty() {
        return Err(format!("kvslib.put is not a root span: {put}"));
    }
    let trace = &put.trace;
    let attempts: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.service == CLIENT_SERVICE && s.name == "kv.Put")
        .collect();
    if attempts.is_empty() {
        return Err(format!("no kv.Put attempt span of {CLIENT_SERVICE}"));
    }
    for a in &attempts {
        if a.parent != put.id || &a.trace != trace {
            return Err(format!("kv.Put attempt not a child of kvslib.put: {a}"));
        }
    }
    // A server's kv.put on the trace, child of an attempt. An attempt may have reached a server
    // that was not (or no longer) the leader: the leader is the one whose kv.put the followers'
    // replicate.append spans hang off.
    let server_puts: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.service.starts_with(SERVER_SERVICE_PREFIX) && s.name == "kv.put")
        .filter(|s| &s.trace == trace && attempts.iter().any(|a| a.id == s.parent))
        .collect();
    if server_puts.is_empty() {
        return Err("no server kv.put span that is a child of a kv.Put attempt".into());
    }
    for sp in &server_puts {
        let mut followers: Vec<String> = spans
            .iter()
            .filter(|s| s.name == "replicate.append" && s.parent == sp.id)
            .filter(|s| s.service.starts_with(SERVER_SERVICE_PREFIX))
            .filter(|s| s.service != sp.service)
            .map(|s| s.service.clone())
            .collect();
        followers.sort();
        followers.dedup();
        if followers.is_empty() {
            continue;
        }
        // Every replicate.append under this kv.put is on the trace.
        if let Some(bad) = spans
            .iter()
            .find(|s| s.name == "replicate.append" && s.parent == sp.id && &s.trace != trace)
        {
            return Err(format!("replicate.append on another trace: {bad}"));
        }
        return Ok(PutTrace {
            trace: trace.clone(),
            leader: sp.service.clone(),
            followers,
        });
    }
    Err(format!(
        "no follower replicate.append span (other service, parent = a server kv.put) under any \
         of the kv.put spans {:?}",
        server_puts.iter().map(|s| &s.id).collect::<Vec<_>>()
    ))
}

fn dump(spans: &[SpanRec]) -> String {
    let mut lines: Vec<String> = spans.iter().map(|s| s.to_string()).collect();
    lines.sort();
    format!("{} spans received:\n  {}", spans.len(), lines.join("\n  "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_put_is_one_distributed_otel_trace() {
    let collector = Collector::default();
    let (port, server) = start_collector(collector.clone()).await;

    let mut cluster = Cluster::new(3);
    cluster.set_env(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        &format!("http://127.0.0.1:{port}"),
    );
    // Batches leave every 200 ms instead of every 5 s: the test waits less.
    cluster.set_env("OTEL_BSP_SCHEDULE_DELAY", "200");
    cluster.start_all();
    let leader = cluster.wait_leader(|_| true).await;

    tracing::info!("--- one put through the client binary, exporting spans");
    stdout(&cluster.client("otel1", &["put", "k1", "v1"]));

    tracing::info!("--- the collector receives the put's trace: client -> leader -> followers");
    let deadline = Instant::now() + WAIT;
    let found = loop {
        let spans = collector.snapshot();
        match check_put_trace(&spans) {
            Ok(found) => break found,
            Err(missing) => assert!(
                Instant::now() < deadline,
                "no complete put trace within {WAIT:?}: {missing}\n{}",
                dump(&spans)
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tracing::info!(
        trace = %found.trace,
        leader = %found.leader,
        followers = ?found.followers,
        coord_leader = leader.leader_id,
        "{}",
        dump(&collector.snapshot())
    );
    assert!(!found.followers.contains(&found.leader));
    server.abort();
}
