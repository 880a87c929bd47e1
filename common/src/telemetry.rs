//! Logs and traces, set up once per process: the `--log-format` of every
//! server, and OpenTelemetry tracing exported over OTLP/gRPC when
//! `--otlp-endpoint` is set.
//!
//! Tracing is off by default and then costs nothing: no OpenTelemetry layer
//! is installed, [`enabled`] is one relaxed atomic load, and every helper
//! here (injecting or extracting W3C `traceparent`, the server span) checks
//! it first and does no other work.
//!
//! When on, the spans are those of `tracing` (the OpenTelemetry layer turns
//! them into OTLP spans, batched by the SDK's batch span processor), and the
//! trace context crosses processes as W3C `traceparent` / `tracestate` in
//! gRPC metadata: [`inject`] on the client side, [`ServerTraceLayer`] on
//! the servers.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::codegen::http;
use tracing::{Instrument, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces. Cheap: check it before any
/// propagation work.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (spans and their fields as a prefix).
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` when a
    /// traced span is current.
    Json,
}

/// The telemetry flags every server takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector to export traces to, e.g.
    /// http://127.0.0.1:4317 (Jaeger, an OpenTelemetry Collector). Tracing
    /// is off unless set. The service name is $OTEL_SERVICE_NAME or the
    /// server's own; sampling follows $OTEL_TRACES_SAMPLER and
    /// $OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Log line format on stderr.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A bad telemetry setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

/// The sampler `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` name
/// (unset: parentbased_always_on).
pub fn sampler(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, SettingsError> {
    let ratio = || -> Result<f64, SettingsError> {
        match arg.map(str::trim).filter(|a| !a.is_empty()) {
            None => Ok(1.0),
            Some(text) => text
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    SettingsError(format!(
                        "OTEL_TRACES_SAMPLER_ARG {text:?} is not a ratio between 0 and 1"
                    ))
                }),
        }
    };
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    Ok(match name.unwrap_or("parentbased_always_on") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => {
            return Err(SettingsError(format!(
                "OTEL_TRACES_SAMPLER {other:?} is not one of always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off, \
                 parentbased_traceidratio"
            )));
        }
    })
}

/// The service name: `$OTEL_SERVICE_NAME`, or `default`.
pub fn service_name(default: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans not yet
/// exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued and stops the exporter. Runs the
    /// blocking flush off the runtime's threads, so a single-threaded
    /// runtime keeps driving the exporter's connection meanwhile.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not flush the last spans"),
            Err(error) => tracing::warn!(%error, "could not flush the last spans"),
        }
    }
}

type Base = tracing_subscriber::Registry;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

/// Sets up logging to stderr (filtered by RUST_LOG, default `info`, sqlx
/// at `warn`) in `args.log_format`, and tracing when `args.otlp_endpoint`
/// is set, as service `$OTEL_SERVICE_NAME` or `default_service`. Call it
/// inside the Tokio runtime (the exporter's channel is made there).
pub fn init(args: &TelemetryArgs, default_service: &str) -> Result<Telemetry, SettingsError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut layers: Vec<BoxedLayer> = Vec::with_capacity(2);
    layers.push(match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .fmt_fields(tracing_subscriber::fmt::format::DefaultFields::new())
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    });
    let mut provider = None;
    if let Some(endpoint) = args.otlp_endpoint.as_deref().map(str::trim) {
        if endpoint.is_empty() {
            return Err(SettingsError("--otlp-endpoint must not be empty".into()));
        }
        let sampler = sampler(
            std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
            std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
        )?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| SettingsError(format!("--otlp-endpoint {endpoint:?}: {e}")))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name(default_service))
            .build();
        let sdk = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = sdk.tracer("saga");
        layers.push(
            tracing_opentelemetry::layer::<Base>()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                // Its own filter: RUST_LOG quietens the logs, not the
                // traces (the spans here are at INFO).
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
                .boxed(),
        );
        provider = Some(sdk);
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| SettingsError(format!("cannot set up logging: {e}")))?;
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Puts the current span's trace context into `metadata` as W3C
/// `traceparent` / `tracestate`; nothing when tracing is off.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// The trace context a request's headers carry (empty if none).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace context a stored `traceparent` string names.
pub fn context_of(traceparent: &str) -> Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The current span's context as a `traceparent` string, when tracing is on
/// and the span is traced.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id (32 hex digits) of a well-formed W3C `traceparent`
/// (`00-<trace id>-<span id>-<flags>`, lower-case hex, neither id all
/// zeros; a version after `00` may carry more fields, `ff` is invalid),
/// else None.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let well_formed = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    well_formed.then_some(trace)
}

/// The trace context a new unit of work (a saga) should continue, as a
/// `traceparent` to store with it: the current span's when tracing is on,
/// otherwise the caller's `traceparent` header as it came in (a header
/// lookup, no parsing beyond its shape), so the trace can be found later.
pub fn traceparent_to_store(headers: &tonic::metadata::MetadataMap) -> Option<String> {
    if enabled() {
        return current_traceparent();
    }
    let incoming = headers.get("traceparent")?.to_str().ok()?;
    trace_id_of(incoming).is_some().then(|| incoming.to_owned())
}

/// Makes `span`'s parent the context `traceparent` names (nothing when
/// tracing is off or the string is malformed), and records its trace id in
/// the span's `trace_id` field, if it has one.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(parent) = traceparent.filter(|t| trace_id_of(t).is_some()) {
        let _ = span.set_parent(context_of(parent));
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// A tower layer for gRPC servers: when tracing is on, each call runs in a
/// server span (named after its method) whose parent is the caller's
/// `traceparent`; when off, calls pass through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // Off, the inner future itself: no allocation, no span.
    type Future = futures_util::future::Either<
        S::Future,
        std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Health checks and reflection are not worth a trace.
        if !enabled() || request.uri().path().starts_with("/grpc.") {
            return futures_util::future::Either::Left(self.inner.call(request));
        }
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(extract(request.headers()));
        let future = self.inner.call(request);
        futures_util::future::Either::Right(Box::pin(
            async move {
                let response = future.await;
                if let Ok(response) = &response {
                    // Errors of unary calls come as headers (trailers-only
                    // responses); a reply without one is OK.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0);
                    tracing::Span::current().record("rpc.grpc.status_code", code);
                    if code != 0 {
                        tracing::Span::current().record("otel.status_code", "ERROR");
                    }
                }
                response
            }
            .instrument(span),
        ))
    }
}

/// JSON log lines: timestamp, level, target, the event's fields, the span
/// path, and `trace_id` / `span_id` of the current span when it is traced.
struct JsonLines;

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        let metadata = event.metadata();
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let mut spans = String::new();
            for span in scope.from_root() {
                if !spans.is_empty() {
                    spans.push(':');
                }
                spans.push_str(span.name());
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    spans.push('{');
                    spans.push_str(fields);
                    spans.push('}');
                }
            }
            line.insert("spans".into(), spans.into());
            if enabled() {
                let context = tracing::Span::current().context();
                let span = context.span();
                let span_context = span.span_context();
                if span_context.is_valid() {
                    line.insert(
                        "trace_id".into(),
                        span_context.trace_id().to_string().into(),
                    );
                    line.insert("span_id".into(), span_context.span_id().to_string().into());
                }
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_from_their_standard_names() {
        let parsed =
            |name: Option<&str>, arg: Option<&str>| sampler(name, arg).map(|s| format!("{s:?}"));
        assert!(parsed(None, None).unwrap().starts_with("ParentBased"));
        assert!(
            parsed(Some("always_on"), None)
                .unwrap()
                .contains("AlwaysOn")
        );
        assert!(
            parsed(Some("always_off"), None)
                .unwrap()
                .contains("AlwaysOff")
        );
        assert!(
            parsed(Some("traceidratio"), Some("0.25"))
                .unwrap()
                .contains("0.25")
        );
        let parent = parsed(Some("parentbased_traceidratio"), Some("0.5")).unwrap();
        assert!(parent.starts_with("ParentBased") && parent.contains("0.5"));
        assert!(parsed(Some("traceidratio"), Some("2")).is_err());
        assert!(parsed(Some("traceidratio"), Some("half")).is_err());
        assert!(parsed(Some("sometimes"), None).is_err());
    }

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(good), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
        assert_eq!(trace_id_of("00-4bf92f-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of("garbage"), None);
        assert_eq!(trace_id_of(""), None);
        // Upper-case hex, and extra fields on version 00, are not W3C.
        assert_eq!(
            trace_id_of("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of(&format!("{good}-extra")), None);
        // A later version may add fields.
        assert_eq!(
            trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn tracing_is_off_until_set_up() {
        assert!(!enabled());
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.is_empty());
        assert_eq!(current_traceparent(), None);
    }
}
