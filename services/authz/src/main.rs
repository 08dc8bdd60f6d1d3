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
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Some(PathBuf::from(path)),
        (None, _) => None,
        _ => anyhow::bail!("usage: agentgate-authz [--config FILE]"),
    };
    let config: FileConfig =
        agentgate_config::load(config_path.as_deref(), "AGENTGATE", &["data_dir"])?;
    let _telemetry = agentgate_telemetry::init("authz", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/agentgate"));
    let mut running = agentgate_authz::start(&config.authz, &data_dir).await?;
    tokio::select! {
        r = running.wait() => r,
        r = tokio::signal::ctrl_c() => { r?; running.shutdown().await }
    }
}
