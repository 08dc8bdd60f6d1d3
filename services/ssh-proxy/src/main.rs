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
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Some(PathBuf::from(path)),
        (None, _) => None,
        _ => anyhow::bail!("usage: agentgate-ssh-proxy [--config FILE]"),
    };
    let config: FileConfig =
        agentgate_config::load(config_path.as_deref(), "AGENTGATE", &["data_dir"])?;
    let _telemetry = agentgate_telemetry::init("ssh-proxy", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/agentgate"));
    let gateway = agentgate_ssh_proxy::gateway_from_config(&config.ssh_proxy, &data_dir).await?;
    let mut running = agentgate_ssh_proxy::start(&config.ssh_proxy, gateway, &data_dir).await?;
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
