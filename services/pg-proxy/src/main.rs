//! pg-proxy as its own process, for docker-compose and Kubernetes.
//!
//! `agentgate-pg-proxy [--config FILE]`; every value can also be set by environment variable
//! (`AGENTGATE_PG_PROXY__LISTEN`, ...). See docs/pg-proxy.md.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    telemetry: agentgate_telemetry::TelemetryConfig,
    pg_proxy: agentgate_pg_proxy::PgProxyConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("agentgate-pg-proxy: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let config: FileConfig =
        agentgate_config::load_service("agentgate-pg-proxy", std::env::args().skip(1))?;
    let _telemetry = agentgate_telemetry::init("pg-proxy", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agentgate_config::DEFAULT_DATA_DIR));
    let gateway = agentgate_pg_proxy::gateway_from_config(&config.pg_proxy, &data_dir).await?;
    let mut running = agentgate_pg_proxy::start(&config.pg_proxy, gateway).await?;
    tokio::select! {
        _ = running.wait() => Ok(()),
        _ = agentgate_telemetry::shutdown_signal() => {
            running.shutdown().await;
            Ok(())
        }
    }
}
