//! Telemetry: `tracing` spans and events, exported by OpenTelemetry to
//! Application Insights (`APPLICATIONINSIGHTS_CONNECTION_STRING`), to an OTLP
//! collector (`OTEL_EXPORTER_OTLP_ENDPOINT`, HTTP/JSON), or nowhere. Trace ids
//! exist either way: they are recorded with every provider exchange, and the
//! W3C trace context travels with every message, so one ticket is one trace.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter};

/// Where spans go, chosen by settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exporter {
    ApplicationInsights(String),
    Otlp,
    None,
}

impl Exporter {
    pub fn from_env() -> Exporter {
        let set = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(cs) = set("APPLICATIONINSIGHTS_CONNECTION_STRING") {
            Exporter::ApplicationInsights(cs)
        } else if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        {
            Exporter::Otlp
        } else {
            Exporter::None
        }
    }
}

static INSTALLED: OnceLock<Telemetry> = OnceLock::new();

/// Makes `telemetry` the process's own, for [`flush`].
pub fn install(telemetry: Telemetry) {
    let _ = INSTALLED.set(telemetry);
}

/// Flushes the installed telemetry, if any (see [`Telemetry::flush`]).
pub async fn flush() {
    if let Some(t) = INSTALLED.get() {
        t.flush().await;
    }
}

/// Flushes and stops the installed telemetry, if any.
pub fn shutdown() {
    if let Some(t) = INSTALLED.get() {
        let _ = t.provider.shutdown();
    }
}

pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

fn tracer_provider(exporter: &Exporter) -> anyhow::Result<SdkTracerProvider> {
    let builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name("ticketpay").build());
    Ok(match exporter {
        Exporter::ApplicationInsights(cs) => {
            // The exporter sends from its own thread with a blocking client, built off the runtime.
            let http = std::thread::spawn(reqwest::blocking::Client::new)
                .join()
                .expect("the client builds");
            let exporter =
                opentelemetry_application_insights::Exporter::new_from_connection_string(cs, http)
                    .map_err(|e| {
                        anyhow::anyhow!("setting APPLICATIONINSIGHTS_CONNECTION_STRING: {e}")
                    })?;
            builder.with_batch_exporter(exporter).build()
        }
        Exporter::Otlp => {
            use opentelemetry_otlp::{Protocol, WithExportConfig};
            let exporter = std::thread::spawn(|| {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpJson)
                    .build()
            })
            .join()
            .expect("the exporter builds")
            .map_err(|e| anyhow::anyhow!("setting OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
            builder.with_batch_exporter(exporter).build()
        }
        Exporter::None => builder.build(),
    })
}

impl Telemetry {
    /// Installs logging to stderr (filtered by `RUST_LOG`) and, for `ticketpay`'s
    /// own spans, OpenTelemetry with the chosen exporter.
    pub fn init(exporter: Exporter, default_filter: &str) -> anyhow::Result<Telemetry> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporting = exporter != Exporter::None;
        let provider = tracer_provider(&exporter)?;
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(
                EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| EnvFilter::new(default_filter)),
            );
        let spans = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ticketpay"))
            .with_filter(filter::Targets::new().with_target("ticketpay", tracing::Level::INFO));
        tracing_subscriber::registry()
            .with(logs)
            .with(spans)
            .try_init()?;
        Ok(Telemetry {
            provider,
            exporting,
        })
    }

    /// Sends every finished span now. Called before an invocation replies, so an
    /// instance that is scaled in right after loses nothing.
    pub async fn flush(&self) {
        if !self.exporting {
            return;
        }
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// The W3C trace context of `span`, as message application properties
/// (`traceparent`, and `Diagnostic-Id` for Azure's own tools).
pub fn context_properties(span: &tracing::Span) -> BTreeMap<String, String> {
    let mut props = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut props);
    if let Some(tp) = props.get("traceparent").cloned() {
        props.insert("Diagnostic-Id".into(), tp);
    }
    props.into_iter().collect()
}

/// Makes `span` a child of the context carried in a message's application properties.
pub fn continue_from(span: &tracing::Span, properties: &BTreeMap<String, String>) {
    let mut carrier: HashMap<String, String> = properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !carrier.contains_key("traceparent")
        && let Some(d) = properties.get("Diagnostic-Id")
    {
        carrier.insert("traceparent".into(), d.clone());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span`, as App Insights shows it (`operation_Id`).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Links `span` to another span (the batch upload, from each ticket's trace).
pub fn link(span: &tracing::Span, to: &tracing::Span) {
    let context = to.context();
    let target = context.span().span_context().clone();
    if target.is_valid() {
        span.add_link(target);
    }
}
