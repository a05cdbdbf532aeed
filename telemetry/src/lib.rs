//! Diagnostics of every kvraft process (DESIGN section 5, next to the vector-clock trace):
//! console logs filtered by `RUST_LOG`, and OpenTelemetry spans exported over OTLP/gRPC when
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! ```text
//!  client  kvslib.put ── kv.Put attempt ──(gRPC metadata: traceparent)──▶
//!  leader  kv.put ──(AppendEntriesRequest.trace_context: traceparent)──▶
//!  follower replicate.append
//! ```
//!
//! When the variable is not set, no span of this crate's helpers is created at all
//! ([`span_if_enabled`] returns `Span::none()`), nothing is injected into requests, and no
//! exporter runs: the cost is one relaxed atomic load per operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::level_filters::LevelFilter;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The standard variable naming the OTLP collector (`http://host:4317` for gRPC).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// True once [`init`] installed an exporter: spans are worth creating and propagating.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `make()` when spans are exported, else a disabled span (nothing recorded, nothing sent).
pub fn span_if_enabled(make: impl FnOnce() -> Span) -> Span {
    if enabled() {
        make()
    } else {
        Span::none()
    }
}

/// Flushes the exporter at shutdown; see [`Telemetry::shutdown`].
#[must_use = "call shutdown() before the process exits, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (waits for the collector at
    /// most the exporter's timeout). A no-op without an exporter.
    pub async fn shutdown(mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        // The provider blocks its caller until the export task (on the runtime) is done.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            eprintln!("OpenTelemetry: exporting the last spans failed: {e}");
        }
    }
}

/// Installs the process's logging: stderr lines filtered by `RUST_LOG` (else `default_filter`)
/// and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans of the kvraft crates exported as
/// service `service` (unless `OTEL_SERVICE_NAME` names another). Must run inside the tokio
/// runtime: the exporter is a task on it. A second call keeps the first setup.
pub fn init(service: &str, instance: &str, default_filter: &str) -> Telemetry {
    let fmt_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(fmt_filter);
    let endpoint = std::env::var(ENDPOINT_VAR).unwrap_or_default();
    let provider = if endpoint.trim().is_empty() {
        None
    } else {
        match provider(service, instance) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("OpenTelemetry: {ENDPOINT_VAR}={endpoint}: {e}; spans not exported");
                None
            }
        }
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("kvraft"))
            .with_threads(false)
            .with_filter(otel_filter())
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(endpoint, service, "exporting OpenTelemetry spans");
        Telemetry { provider }
    } else {
        Telemetry { provider: None }
    }
}

fn provider(service: &str, instance: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    // The tokio batch processor exports from a task on this runtime (tonic needs one).
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.namespace", "kvraft"))
        .with_attribute(KeyValue::new("service.instance.id", instance.to_string()));
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |s| s.is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// Spans and events of the kvraft crates only: the gRPC stack's own spans (including those of
/// the exporter's calls to the collector) stay out.
fn otel_filter() -> Targets {
    Targets::new()
        .with_target("kvraft", LevelFilter::INFO)
        .with_target("kvslib", LevelFilter::INFO)
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`; empty when it is not exported.
pub fn context_of(span: &Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    if enabled() && !span.is_disabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    }
    headers
}

/// Puts the trace context of `span` into gRPC request metadata.
pub fn inject_metadata(span: &Span, metadata: &mut MetadataMap) {
    for (key, value) in context_of(span) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            metadata.insert(k, v);
        }
    }
}

/// Makes the remote caller named in gRPC `metadata` the parent of `span` (no-op without one).
pub fn set_parent_from_metadata(span: &Span, metadata: &MetadataMap) {
    if span.is_disabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(cx);
}

/// Makes the context carried in a message field the parent of `span` (no-op if empty).
pub fn set_parent_from_map(span: &Span, context: &HashMap<String, String>) {
    if span.is_disabled() || context.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(context);
    let _ = span.set_parent(cx);
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_spans_carry_no_context() {
        let span = span_if_enabled(|| tracing::info_span!("never"));
        assert!(span.is_disabled());
        assert!(context_of(&span).is_empty());
        let mut md = MetadataMap::new();
        inject_metadata(&span, &mut md);
        assert!(md.is_empty());
    }

    #[test]
    fn metadata_extractor_reads_a_traceparent() {
        let mut md = MetadataMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        md.insert("traceparent", parent.parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&MetadataExtractor(&md));
        use opentelemetry::trace::TraceContextExt;
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
    }
}
