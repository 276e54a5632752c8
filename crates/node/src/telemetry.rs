//! Logs (tracing, text or JSON lines) and, when `telemetry.otlp_endpoint` is set, OpenTelemetry
//! over OTLP/HTTP: a span per flag evaluation and evaluation counts, both with the feature-flag
//! semantic conventions (`feature_flag.key`, `feature_flag.result.variant`,
//! `feature_flag.result.reason`, `feature_flag.set.id`, `feature_flag.provider.name`).
//!
//! Evaluation counts are exported from the same lock-free counters `/metrics` shows (an observable
//! counter read at export time), so OTLP export adds nothing to the request path.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::TelemetryConfig;
use crate::snapshot::Snapshots;
use crate::NodeError;

/// The tracing target of evaluation spans; only the OTLP layer listens to it.
pub const EVALUATION_TARGET: &str = "bunting::evaluation";

fn resource(node: &str, region: &str) -> Resource {
    Resource::builder()
        .with_service_name("bunting")
        .with_attributes([
            KeyValue::new("service.instance.id", node.to_owned()),
            KeyValue::new("cloud.region", region.to_owned()),
        ])
        .build()
}

fn endpoint(base: &str, signal: &str) -> String {
    format!("{}/v1/{signal}", base.trim_end_matches('/'))
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct LoggingGuard {
    tracer: Option<SdkTracerProvider>,
}

impl Drop for LoggingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.tracer.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs to stderr, and evaluation spans to OTLP when configured.
pub fn init(config: &TelemetryConfig, node: &str, region: &str) -> Result<LoggingGuard, NodeError> {
    let filter = config
        .log_filter
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    // Evaluation spans are for OTLP only: never printed.
    let log_filter = EnvFilter::new(format!("{filter},{EVALUATION_TARGET}=off"));
    let fmt = if config.log_json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed()
    };
    let (otel, tracer) = match &config.otlp_endpoint {
        None => (None, None),
        Some(base) => {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint(base, "traces"))
                .build()
                .map_err(|e| NodeError::Config(format!("OTLP trace exporter: {e}")))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource(node, region))
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("bunting"))
                .with_filter(
                    Targets::new()
                        .with_target(EVALUATION_TARGET, tracing::Level::INFO)
                        .with_target("bunting_node", tracing::Level::INFO),
                );
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| NodeError::Config(format!("logging: {e}")))?;
    Ok(LoggingGuard { tracer })
}

/// Exports evaluation counts every `interval` to `{base}/v1/metrics`. Shut the provider down to
/// flush the last counts.
pub fn evaluation_metrics(
    base: &str,
    interval: Duration,
    snapshots: Arc<Snapshots>,
    node: &str,
    region: &str,
) -> Result<SdkMeterProvider, NodeError> {
    let exporter = MetricExporter::builder()
        .with_http()
        .with_endpoint(endpoint(base, "metrics"))
        .build()
        .map_err(|e| NodeError::Config(format!("OTLP metric exporter: {e}")))?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(node, region))
        .build();
    let _counter = provider
        .meter("bunting")
        .u64_observable_counter("feature_flag.evaluations")
        .with_description("Flag evaluations by flag, variant (or reason when none was served)")
        .with_callback(move |observer| {
            snapshots
                .counters()
                .for_each(|set, flag, variant, reason, n| {
                    let mut attributes = vec![
                        KeyValue::new("feature_flag.key", flag.to_owned()),
                        KeyValue::new("feature_flag.set.id", set.to_owned()),
                        KeyValue::new("feature_flag.provider.name", "bunting"),
                    ];
                    if !variant.is_empty() {
                        attributes.push(KeyValue::new(
                            "feature_flag.result.variant",
                            variant.to_owned(),
                        ));
                    }
                    if !reason.is_empty() {
                        attributes.push(KeyValue::new(
                            "feature_flag.result.reason",
                            reason.to_owned(),
                        ));
                    }
                    observer.observe(n, &attributes);
                });
        })
        .build();
    Ok(provider)
}
