//! Logs, traces and metrics for every sluice binary.
//!
//! `tracing` events go to stderr, filtered by `RUST_LOG` (default: the level
//! the binary names); stdout stays free for JSON events. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, `tracing` spans (level INFO and above)
//! and the OpenTelemetry metrics of the process are also exported over
//! OTLP/gRPC, with `service.name` = the binary (or `OTEL_SERVICE_NAME`); the
//! SDK's own variables apply (`OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_RESOURCE_ATTRIBUTES`, ...). Without
//! the variable nothing is exported and the metric instruments are no-ops.
//!
//! Each process's resource also carries `service.instance.id` (host, pid and a
//! random suffix, unless `OTEL_RESOURCE_ATTRIBUTES` sets one), so two actors
//! are two series. A failed export is logged once per process and signal
//! (traces, metrics), with the endpoint; later failures are not.
//!
//! When exporting, W3C trace context (`traceparent`) goes with every sluice RPC
//! ([`inject`], called by `sluice_proto::auth::request`) and every served call
//! gets a SERVER span named `package.Service/Method` (`rpc.system`,
//! `rpc.service`, `rpc.method`) whose parent is the caller's span
//! ([`set_parent`], called by `sluice_proto::serve`), so one trace follows a
//! call across processes.
//!
//! The SDK's batch span processor and periodic metric reader export from
//! threads of their own, while the tonic exporter needs a Tokio reactor: the
//! exporters here run each export on a small runtime owned by [`Telemetry`].

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporters alive; dropping it flushes what is buffered.
#[must_use = "telemetry stops (and unexported spans are lost) when this is dropped"]
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// True when spans and metrics are exported.
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Runs an exporter's futures on the telemetry runtime, and logs its first failure.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    handle: tokio::runtime::Handle,
    /// "traces" or "metrics", for the log line.
    signal: &'static str,
    endpoint: String,
    failed: std::sync::atomic::AtomicBool,
}

impl<E> OnRuntime<E> {
    fn new(inner: E, handle: tokio::runtime::Handle, signal: &'static str, endpoint: &str) -> Self {
        OnRuntime { inner, handle, signal, endpoint: endpoint.to_string(), failed: Default::default() }
    }

    fn noted(&self, r: OTelSdkResult) -> OTelSdkResult {
        if let Err(e) = &r {
            if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "OTLP export of {} failed; later failures are not logged", self.signal);
            }
        }
        r
    }
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread (no runtime there).
        std::future::ready(self.noted(self.handle.block_on(self.inner.export(batch))))
    }
    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

impl<E: PushMetricExporter> PushMetricExporter for OnRuntime<E> {
    fn export(&self, metrics: &ResourceMetrics) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.noted(self.handle.block_on(self.inner.export(metrics))))
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// This process's `service.instance.id`: host, pid and a random suffix.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{}-{}-{:08x}", if host.is_empty() { "host" } else { &host }, std::process::id(), rand::random::<u32>())
}

fn otlp(service: &str, endpoint: &str) -> Result<Telemetry, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-telemetry")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let handle = runtime.handle().clone();
    // The tonic channels are created inside the runtime (their workers live there).
    let _guard = runtime.enter();
    let spans = opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(|e| e.to_string())?;
    let metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic().build().map_err(|e| e.to_string())?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |s| s.is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    let env = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    if !env.contains("service.instance.id=") {
        resource = resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id()));
    }
    // The role, from the binary, unless the environment says (`sluice dev` adds rank and job too).
    if !env.contains("sluice.role=") {
        let role = match service.strip_prefix("sluice-") {
            Some("reward-server") => "reward",
            Some(role) => role,
            None => "cli",
        };
        resource = resource.with_attribute(opentelemetry::KeyValue::new("sluice.role", role.to_string()));
    }
    let resource = resource.build();
    let tracer = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(OnRuntime::new(spans, handle.clone(), "traces", endpoint))
        .build();
    let meter = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_periodic_exporter(OnRuntime::new(metrics, handle, "metrics", endpoint))
        .build();
    drop(_guard);
    Ok(Telemetry { tracer: Some(tracer), meter: Some(meter), runtime: Some(runtime) })
}

/// Installs logging (and OTLP export when configured) for the binary `service`.
pub fn init(service: &str, default_level: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    if endpoint.is_empty() {
        tracing_subscriber::registry().with(fmt).init();
        return Telemetry::default();
    }
    match otlp(service, &endpoint) {
        Ok(t) => {
            let tracer = t.tracer.as_ref().expect("built").tracer(service.to_string());
            let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(LevelFilter::INFO);
            tracing_subscriber::registry().with(fmt).with(otel).init();
            opentelemetry::global::set_meter_provider(t.meter.clone().expect("built"));
            opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
            tracing::info!(%endpoint, service, "exporting traces and metrics over OTLP");
            t
        }
        Err(e) => {
            tracing_subscriber::registry().with(fmt).init();
            tracing::warn!(%endpoint, error = %e, "OpenTelemetry export disabled");
            Telemetry::default()
        }
    }
}

/// Writes the current span's trace context into `carrier` (nothing when not
/// exporting: the global propagator is then a no-op).
pub fn inject(carrier: &mut dyn opentelemetry::propagation::Injector) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, carrier));
}

/// Makes the trace context found in `carrier` (if any) the parent of `span`.
pub fn set_parent(span: &tracing::Span, carrier: &dyn opentelemetry::propagation::Extractor) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    let _ = span.set_parent(cx);
}

/// The current span's W3C `traceparent` (None when not exporting).
pub fn traceparent() -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    inject(&mut carrier);
    carrier.remove("traceparent")
}

/// Links `span` to the span a W3C `traceparent` names (ignored when malformed).
pub fn link(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The meter every sluice instrument comes from (a no-op without export).
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("sluice")
}
