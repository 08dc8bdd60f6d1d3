//! ssh-proxy as its own process, for docker-compose and Kubernetes.
//!
//! `agentgate-ssh-proxy [--config FILE]`; every value can also be set by environment variable
//! (`AGENTGATE_SSH_PROXY__LISTEN`, ...). See docs/ssh-proxy.md.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    telemetry: agentgate_telemetry::TelemetryConfig,
    ssh_proxy: agentgate_ssh_proxy::SshProxyConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("agentgate-ssh-proxy: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let config: FileConfig =
        agentgate_config::load_service("agentgate-ssh-proxy", std::env::args().skip(1))?;
    let _telemetry = agentgate_telemetry::init("ssh-proxy", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agentgate_config::DEFAULT_DATA_DIR));
    let gateway = agentgate_ssh_proxy::gateway_from_config(&config.ssh_proxy, &data_dir).await?;
    let mut running = agentgate_ssh_proxy::start(&config.ssh_proxy, gateway, &data_dir).await?;
    tokio::select! {
        _ = running.wait() => Ok(()),
        _ = agentgate_telemetry::shutdown_signal() => {
            running.shutdown().await;
            Ok(())
        }
    }
}
