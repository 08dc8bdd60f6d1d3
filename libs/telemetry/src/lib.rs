//! Observability for every agentgate service: logs, traces and metrics set up the same way.
//!
//! - [`init`] installs the process-wide `tracing` subscriber: human-readable or JSON logs on
//!   stderr, an `EnvFilter`, and an OpenTelemetry layer that exports spans over OTLP/gRPC when
//!   an endpoint is configured. It also sets the W3C TraceContext propagator.
//! - [`TraceContextInterceptor`] / [`inject_context`] (client side) and [`server_span`]
//!   (server side, for `tonic::transport::Server::builder().trace_fn(..)`) carry the trace
//!   across gRPC calls in the `traceparent` header, so one agent operation shows up as one trace
//!   through proxy, authz, approvals and audit-store.
//! - [`Metrics`] is the per-service Prometheus registry and [`serve_metrics`] serves it on
//!   `GET /metrics`.
//!
//! Why this shape: each service is a library with a thin `main`, and `agentgate up` runs them
//! all in one process. Global state (the subscriber, the propagator) is therefore installed
//! once per process, the first [`init`] wins and later calls are no-ops; metrics, which are
//! per service, are plain values each service owns.
//!
//! ```no_run
//! # async fn example() -> Result<(), agentgate_telemetry::TelemetryError> {
//! use agentgate_telemetry::{Metrics, TelemetryConfig, init, serve_metrics};
//!
//! let config = TelemetryConfig::default();
//! let _guard = init("authz", &config)?; // keep it alive: dropping it flushes spans
//! let metrics = Metrics::new("authz");
//! if let Some(addr) = config.metrics_address {
//!     let server = serve_metrics(addr, metrics.clone(), std::future::pending()).await?;
//!     tracing::info!(address = %server.local_addr(), "metrics endpoint up");
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod metrics;
mod propagation;

use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;

pub use metrics::{METRICS_CONTENT_TYPE, Metrics, MetricsServer, serve_metrics};
pub use propagation::{
    TraceContextInterceptor, extract_context, inject_context, inject_http_headers, inject_metadata,
    server_span,
};

/// The filter used when neither `RUST_LOG` nor [`TelemetryConfig::log_filter`] is set.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event: for a terminal and `agentgate up`.
    #[default]
    Text,
    /// One JSON object per line (event fields flattened, with the current span): for log
    /// shippers in a deployment.
    Json,
}

/// The telemetry section of a service configuration (`[telemetry]` in the TOML file).
///
/// Every field has a default, so an empty section (or none) means: text logs at `info`, no
/// trace export, no metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// Text for people, JSON for machines.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info,agentgate_pg_proxy=debug`; defaults to
    /// [`DEFAULT_LOG_FILTER`]. `RUST_LOG`, when set, wins, so a developer can turn up logging
    /// without editing the deployment's file.
    pub log_filter: Option<String>,
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`. `None` means spans are
    /// created (so trace context still propagates) but not exported.
    pub otlp_endpoint: Option<String>,
    /// Where [`serve_metrics`] listens, e.g. `127.0.0.1:9464`; `None` means no metrics endpoint.
    pub metrics_address: Option<SocketAddr>,
}

/// What can go wrong setting up telemetry. Messages say which setting to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The log filter directive does not parse.
    #[error("log filter from {origin} ({directive:?}): {reason}")]
    Filter {
        /// Where the directive came from: `RUST_LOG` or `telemetry.log_filter`.
        origin: &'static str,
        /// The directive as given.
        directive: String,
        /// What the parser said.
        reason: String,
    },
    /// The OTLP exporter could not be built (usually a malformed endpoint).
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What opentelemetry-otlp said.
        reason: String,
    },
    /// [`init`] with an OTLP endpoint was called outside a Tokio runtime; the gRPC exporter
    /// needs one to run its connection.
    #[error(
        "telemetry.otlp_endpoint is set but init() was called outside a Tokio runtime: call it \
         from within the runtime (e.g. at the top of an async main)"
    )]
    NoRuntime,
    /// The metrics endpoint could not listen on its address.
    #[error("metrics endpoint: listening on {addr}: {error}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// Encoding the metrics failed (a metric's own encoder returned an error).
    #[error("encoding metrics: {0}")]
    Encode(std::fmt::Error),
}

/// Keeps the tracer provider of [`init`] alive; dropping it flushes the spans still queued and
/// shuts the exporter down (bounded to a few seconds), so hold it until the end of `main`.
///
/// Dropping it inside a multi-threaded Tokio runtime is fine (the flush runs via
/// `block_in_place`); on a current-thread runtime drop it after the runtime's work is done, as
/// the exporter needs the runtime to make progress.
#[must_use = "dropping the guard shuts trace export down"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether this guard belongs to the call that installed the subscriber (`false` for the
    /// no-op guard of a later call).
    pub fn is_active(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans now (e.g. before a planned exit), without shutting down.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let shutdown = move || {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "shutting down the trace exporter");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(shutdown)
            }
            _ => shutdown(),
        }
    }
}

/// Installs the process-wide telemetry for `service_name` (the OpenTelemetry `service.name`).
///
/// - logs: `config.log_format` on stderr, filtered by `RUST_LOG` if set, else
///   `config.log_filter`, else [`DEFAULT_LOG_FILTER`]; `log` records of dependencies are
///   forwarded too;
/// - traces: an OpenTelemetry layer on every `tracing` span; with `config.otlp_endpoint` set,
///   spans go to an OTLP/gRPC exporter behind a batch processor (must then be called inside a
///   Tokio runtime). The exporter's own HTTP/2 stack is kept out of the traces it exports;
/// - the global text-map propagator is W3C TraceContext, as [`inject_context`] and
///   [`server_span`] expect.
///
/// If a global subscriber is already installed (a second call, a test harness, several
/// services in one process), this returns `Ok` with an inactive guard and changes nothing.
pub fn init(
    service_name: &str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if tracing::dispatcher::has_been_set() {
        return Ok(TelemetryGuard { provider: None });
    }

    let filter = env_filter(config)?;
    let provider = tracer_provider(service_name, config)?;
    let tracer = provider.tracer("agentgate");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(not_exporter_internals());

    let (text, json) = match config.log_format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel);

    // Before the subscriber exists, so opentelemetry's "provider set" notice is not logged.
    opentelemetry::global::set_tracer_provider(provider.clone());
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        // Lost a race with another initialisation: theirs stays, ours goes.
        let _ = provider.shutdown();
        return Ok(TelemetryGuard { provider: None });
    }
    // Forward `log` records (rustls, russh, ...) as tracing events, at no more than the
    // filter's most verbose level so disabled `log` calls stay cheap. Another logger already
    // installed is left alone.
    use tracing_log::AsLog as _;
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(LevelFilter::current().as_log())
        .init();

    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

fn env_filter(config: &TelemetryConfig) -> Result<EnvFilter, TelemetryError> {
    let (origin, directive) = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => ("RUST_LOG", value),
        _ => (
            "telemetry.log_filter",
            config
                .log_filter
                .clone()
                .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
        ),
    };
    EnvFilter::builder()
        .parse(&directive)
        .map_err(|e| TelemetryError::Filter {
            origin,
            directive: directive.clone(),
            reason: e.to_string(),
        })
}

fn tracer_provider(
    service_name: &str,
    config: &TelemetryConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        // tonic's lazily connecting channel spawns its worker on the current runtime.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TelemetryError::NoRuntime);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The OpenTelemetry layer must not see the spans and events of the stack that exports them
/// (h2, hyper, tonic, tower, opentelemetry itself): at debug level each export would produce
/// more spans to export.
fn not_exporter_internals() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

/// Resolves when the process is asked to stop: Ctrl-C, or SIGTERM as Docker, Kubernetes and
/// systemd send it. Every service binary stops gracefully on it.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or_default(),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_deserializes_with_defaults() {
        let cfg: TelemetryConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, TelemetryConfig::default());
        assert_eq!(cfg.log_format, LogFormat::Text);

        let cfg: TelemetryConfig = serde_json::from_str(
            r#"{"log_format":"json","otlp_endpoint":"http://127.0.0.1:4317","metrics_address":"127.0.0.1:9464"}"#,
        )
        .unwrap();
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(cfg.metrics_address, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(serde_json::from_str::<TelemetryConfig>(r#"{"log_format":"xml"}"#).is_err());
    }

    #[test]
    fn a_bad_filter_names_its_origin() {
        // Only meaningful when the environment does not override the setting.
        if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
            return;
        }
        let cfg = TelemetryConfig {
            log_filter: Some("info,=[".into()),
            ..Default::default()
        };
        let err = env_filter(&cfg).unwrap_err().to_string();
        assert!(
            err.starts_with("log filter from telemetry.log_filter"),
            "{err}"
        );
    }

    #[test]
    fn exporter_internals_are_kept_out_of_traces() {
        let targets = not_exporter_internals();
        assert!(!targets.would_enable("h2::proto", &tracing::Level::DEBUG));
        assert!(!targets.would_enable("opentelemetry_sdk::trace", &tracing::Level::INFO));
        assert!(targets.would_enable("agentgate_authz", &tracing::Level::DEBUG));
    }
}
