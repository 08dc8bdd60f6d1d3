//! The audit store as its own process, for docker-compose and Kubernetes.
//!
//! `agentgate-audit-store [--config FILE]`; every value can also be set by environment
//! variable (`AGENTGATE_AUDIT_STORE__DATABASE_URL`, ...). Callers' tokens are verified with
//! authz's public keys, named in `[audit_store.auth]`. See docs/operations.md.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    telemetry: agentgate_telemetry::TelemetryConfig,
    audit_store: agentgate_audit_store::AuditStoreConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("agentgate-audit-store: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let config: FileConfig =
        agentgate_config::load_service("agentgate-audit-store", std::env::args().skip(1))?;
    let _telemetry = agentgate_telemetry::init("audit-store", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agentgate_config::DEFAULT_DATA_DIR));
    let authenticator = agentgate_audit_store::authenticator_from_config(&config.audit_store.auth)?;
    let metrics = agentgate_telemetry::Metrics::new("audit-store");
    let mut running = agentgate_audit_store::start(
        &config.audit_store,
        &data_dir,
        authenticator,
        Some(&metrics),
    )
    .await?;
    if let Some(addr) = config.telemetry.metrics_address {
        agentgate_telemetry::serve_metrics(addr, metrics, agentgate_telemetry::shutdown_signal())
            .await
            .with_context(|| format!("metrics endpoint {addr}"))?;
    }
    tokio::select! {
        r = running.wait() => r,
        _ = agentgate_telemetry::shutdown_signal() => running.shutdown().await,
    }
}
