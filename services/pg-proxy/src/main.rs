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
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Some(PathBuf::from(path)),
        (None, _) => None,
        _ => anyhow::bail!("usage: agentgate-pg-proxy [--config FILE]"),
    };
    let config: FileConfig =
        agentgate_config::load(config_path.as_deref(), "AGENTGATE", &["data_dir"])?;
    let _telemetry = agentgate_telemetry::init("pg-proxy", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/agentgate"));
    let gateway = agentgate_pg_proxy::gateway_from_config(&config.pg_proxy, &data_dir).await?;
    let mut running = agentgate_pg_proxy::start(&config.pg_proxy, gateway).await?;
    tokio::select! {
        _ = running.wait() => Ok(()),
        _ = shutdown_signal() => {
            running.shutdown().await;
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or_default(),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
