//! `init` in a process of its own: it installs process-wide state, so it is tested alone.

#![allow(clippy::unwrap_used)]

use agentgate_telemetry::{TelemetryConfig, TelemetryError, init};

#[test]
fn init_once_per_process() {
    let config = TelemetryConfig {
        // Nothing listens there: export fails quietly, the service does not.
        otlp_endpoint: Some("http://127.0.0.1:1".into()),
        ..Default::default()
    };

    // The gRPC exporter needs a runtime; outside one, a clear error and nothing installed.
    let err = init("test", &config).unwrap_err();
    assert!(matches!(err, TelemetryError::NoRuntime), "{err}");
    assert!(!tracing::dispatcher::has_been_set());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let guard = init("test", &config).unwrap();
        assert!(guard.is_active());
        assert!(tracing::dispatcher::has_been_set());

        // A second call (another service in the same process) changes nothing.
        let second = init("other", &TelemetryConfig::default()).unwrap();
        assert!(!second.is_active());

        tracing::info_span!("work").in_scope(|| tracing::info!("inside a span"));
        let started = std::time::Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "shutdown is bounded even when the collector is unreachable"
        );
    });
}
