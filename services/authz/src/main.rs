//! authz as its own process, for docker-compose and Kubernetes:
//! `agentgate-authz [--config FILE]`; every value can also be set by environment variable
//! (`AGENTGATE_AUTHZ__DATABASE_URL`, ...). See docs/operations.md.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    telemetry: agentgate_telemetry::TelemetryConfig,
    authz: agentgate_authz::AuthzConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("agentgate-authz: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let config: FileConfig =
        agentgate_config::load_service("agentgate-authz", std::env::args().skip(1))?;
    let _telemetry = agentgate_telemetry::init("authz", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agentgate_config::DEFAULT_DATA_DIR));
    let mut running = agentgate_authz::start(&config.authz, &data_dir).await?;
    tokio::select! {
        r = running.wait() => r,
        _ = agentgate_telemetry::shutdown_signal() => running.shutdown().await,
    }
}
