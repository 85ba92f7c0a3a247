//! Logs and traces, set up in one place.
//!
//! Logs: human-readable by default, JSON lines with
//! `SWITCHBOARD_LOG_FORMAT=json` (each line inside a span carries the
//! OpenTelemetry `trace_id` and `span_id`), filtered with `RUST_LOG`.
//!
//! Traces: OpenTelemetry over OTLP, configured only by the standard
//! variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER[_ARG]`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`). Without an endpoint nothing is
//! installed and spans cost what a `tracing` span costs. Spans are exported
//! in batches from a background thread: a collector that is down never
//! slows a webhook. [`Telemetry::shutdown`] flushes them.
//!
//! Runs outlive the request that caused them (they may execute in another
//! process, or after a restart), so their trace context is stored with the
//! run ([`traceparent`]) and continued by the worker ([`set_parent`]). The
//! `run` and `step` spans, which can begin in one process and end in
//! another, are emitted once finished with ids derived from the run
//! ([`emit_span`]), so every attempt, whichever process made it, hangs
//! under the same run and step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::{Resource, error::OTelSdkResult};
use sha2::{Digest, Sha256};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::prelude::*;

/// What to flush and shut down before the process exits.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes buffered spans (bounded by the exporter's timeout) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.force_flush() {
                eprintln!("switchboard: could not flush traces: {e}");
            }
            let _ = provider.shutdown();
        }
    }
}

static TRACING: AtomicBool = AtomicBool::new(false);
static PROCESSOR: OnceLock<Arc<BatchSpanProcessor>> = OnceLock::new();
static DISPATCH: OnceLock<tracing::dispatcher::WeakDispatch> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Installs the global subscriber and, when an OTLP endpoint is set, the
/// exporter. Call once, inside the Tokio runtime, first thing in `main`.
pub fn init() -> anyhow::Result<Telemetry> {
    let provider = tracer_provider()?;
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,poem=warn"))
        // sqlx logs an unrecognised URL parameter with its value (`sslpassword=…`
        // included): `store::connect` names them instead, without values.
        .add_directive(
            "sqlx_postgres::options::parse=error"
                .parse()
                .expect("a valid directive"),
        );
    let json =
        std::env::var("SWITCHBOARD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let logs = if json {
        let mut layer = json_subscriber::JsonLayer::stderr();
        layer
            .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
            .with_level("level")
            .with_target("target")
            .with_flattened_event()
            .with_current_span("span");
        layer.add_multiple_dynamic_fields(|_event, ctx, writer| {
            let (Some(span), Some(dispatch)) = (
                ctx.lookup_current(),
                DISPATCH.get().and_then(|d| d.upgrade()),
            ) else {
                return;
            };
            if let Some(cx) = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch) {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    let _ = writer.write_field("trace_id", sc.trace_id().to_string());
                    let _ = writer.write_field("span_id", sc.span_id().to_string());
                }
            }
        });
        layer.boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    // One global filter for logs and spans. (Per-layer filters were tried and,
    // with sqlx's PostgreSQL driver, left spans of background tasks without
    // their OpenTelemetry context.) Switchboard's spans are at INFO.
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("switchboard")));
    tracing_subscriber::registry()
        .with(log_filter)
        .with(otel)
        .with(logs)
        .init();
    tracing::dispatcher::get_default(|d| {
        let _ = DISPATCH.set(d.downgrade());
    });
    if let Some(p) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(p.clone());
        TRACING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}

/// The exporter named by the OTEL_* variables, or `None` without an endpoint.
fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    use opentelemetry_otlp::SpanExporter;
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".into());
    let mut exporter = match protocol.trim() {
        "grpc" => SpanExporter::builder().with_tonic().build(),
        "http/protobuf" | "" => SpanExporter::builder().with_http().build(),
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: set it to `grpc` or `http/protobuf` \
             (the default), or unset OTEL_EXPORTER_OTLP_ENDPOINT to turn tracing off"
        ),
    }
    .context("cannot set up the OTLP trace exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")?;
    let mut resource = Resource::builder();
    if !set("OTEL_SERVICE_NAME")
        && !std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="))
    {
        resource = resource.with_service_name("switchboard");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let processor = Arc::new(BatchSpanProcessor::builder(exporter).build());
    let _ = PROCESSOR.set(processor.clone());
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(SharedProcessor(processor))
            .build(),
    ))
}

/// Lets the provider and [`emit_span`] feed the same batch processor.
#[derive(Debug)]
struct SharedProcessor(Arc<BatchSpanProcessor>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx)
    }
    fn on_end(&self, span: SpanData) {
        self.0.on_end(span)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
}

/// The W3C `traceparent` of a span, if it belongs to a (valid) trace.
pub fn traceparent(span: &Span) -> Option<String> {
    if !tracing_enabled() {
        return None;
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then(|| format_traceparent(&sc))
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent` header value.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    use opentelemetry::propagation::TextMapPropagator;
    let carrier = HashMap::from([("traceparent".to_owned(), value.trim().to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the span a `traceparent` names (no-op when absent or invalid).
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        set_parent_context(span, &sc);
    }
}

/// Makes `span` a child of an already known span context.
pub fn set_parent_context(span: &Span, parent: &SpanContext) {
    if parent.is_valid() {
        let _ =
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
    }
}

/// A span id derived from a name, stable across processes: how the `run`
/// and `step` spans get ids before they are emitted.
pub fn derived_span_id(name: &str) -> SpanId {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    if bytes == [0; 8] {
        bytes[7] = 1;
    }
    SpanId::from_bytes(bytes)
}

/// A trace id derived from a name (used when a run has no stored trace context).
pub fn derived_trace_id(name: &str) -> TraceId {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    TraceId::from_bytes(bytes)
}

/// The context of a span that is emitted later with a derived id.
pub fn child_context(parent: &SpanContext, span_id: SpanId) -> SpanContext {
    SpanContext::new(
        parent.trace_id(),
        span_id,
        parent.trace_flags(),
        true,
        TraceState::default(),
    )
}

/// The context a run continues: its stored `traceparent`, or, for a run
/// without one, a sampled trace whose id is derived from the event.
pub fn run_parent(stored: Option<&str>, event_id: &str) -> SpanContext {
    stored.and_then(parse_traceparent).unwrap_or_else(|| {
        SpanContext::new(
            derived_trace_id(event_id),
            SpanId::INVALID,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )
    })
}

/// The `traceparent` to send on an outbound request made inside `span`: the
/// span's own context when traces are exported, else one whose trace id is
/// `fallback`'s (so the attempts of one event still share a trace id).
pub fn outbound_traceparent(span: &Span, fallback: &SpanContext) -> String {
    if let Some(tp) = traceparent(span) {
        return tp;
    }
    let span_id: [u8; 8] = rand::random();
    format!(
        "00-{}-{}-01",
        fallback.trace_id(),
        SpanId::from_bytes(span_id)
    )
}

/// A finished span, built by hand: `run` and `step`, whose ids are derived
/// so that spans from several processes can point at them.
pub struct EmittedSpan {
    pub name: String,
    pub context: SpanContext,
    pub parent: SpanId,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: Option<String>,
}

/// Sends a finished span to the exporter (if any, and if its trace is sampled).
pub fn emit_span(span: EmittedSpan) {
    let Some(processor) = PROCESSOR.get() else {
        return;
    };
    if !span.context.is_sampled() {
        return;
    }
    processor.on_end(SpanData {
        span_context: span.context,
        parent_span_id: span.parent,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: span.name.into(),
        start_time: span.start,
        end_time: span.end.max(span.start),
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(message) => Status::error(message),
            None => Status::Ok,
        },
        instrumentation_scope: InstrumentationScope::builder("switchboard")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    });
}
