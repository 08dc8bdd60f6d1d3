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
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Some(PathBuf::from(path)),
        (None, _) => None,
        _ => anyhow::bail!("usage: agentgate-audit-store [--config FILE]"),
    };
    let config: FileConfig =
        agentgate_config::load(config_path.as_deref(), "AGENTGATE", &["data_dir"])?;
    let _telemetry = agentgate_telemetry::init("audit-store", &config.telemetry)?;
    let data_dir = config
        .data_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/agentgate"));
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
        agentgate_telemetry::serve_metrics(addr, metrics, shutdown_signal())
            .await
            .with_context(|| format!("metrics endpoint {addr}"))?;
    }
    tokio::select! {
        r = running.wait() => r,
        _ = shutdown_signal() => running.shutdown().await,
    }
}

async fn shutdown_signal() {
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
