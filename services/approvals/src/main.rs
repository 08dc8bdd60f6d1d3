//! The approvals service as its own process, for docker-compose and Kubernetes.
//!
//! `agentgate-approvals [--config FILE]`; every value can also be set by environment
//! variable (`AGENTGATE_APPROVALS__DATABASE_URL`, ...). Tokens are verified with the public
//! keys named in `[approvals.auth]`; state changes are recorded to the audit store with the
//! service token in `approvals.audit.token_file`. See docs/approvals.md.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    telemetry: agentgate_telemetry::TelemetryConfig,
    approvals: agentgate_approvals::ApprovalsConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("agentgate-approvals: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let config: FileConfig =
        agentgate_config::load_service("agentgate-approvals", std::env::args().skip(1))?;
    let _telemetry = agentgate_telemetry::init("approvals", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agentgate_config::DEFAULT_DATA_DIR));
    let authenticator = agentgate_approvals::authenticator_from_config(&config.approvals.auth)?;
    let metrics = agentgate_telemetry::Metrics::new("approvals");
    let mut running = agentgate_approvals::start(
        &config.approvals,
        &data_dir,
        authenticator,
        None,
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
