//! The audit store as a separate process for tests that crash it (SIGKILL), with the same
//! code `agentgate up` and `agentgate-audit-store` run.
//!
//! `run-audit-store DATA_DIR DATABASE_URL PORT CHECKPOINT_EVERY` prints `listening` when
//! it accepts connections, then serves until killed. It trusts the harness's test issuer.

use std::net::SocketAddr;
use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data_dir, url, port, every] = args.as_slice() else {
        anyhow::bail!("usage: run-audit-store DATA_DIR DATABASE_URL PORT CHECKPOINT_EVERY");
    };
    let config = agentgate_audit_store::AuditStoreConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port.parse()?)),
        database_url: Some(url.clone()),
        checkpoint_every: every.parse()?,
        ..Default::default()
    };
    let auth = std::sync::Arc::new(agentgate_integration_tests::test_token_issuer().verifier());
    let mut running =
        agentgate_audit_store::start(&config, &PathBuf::from(data_dir), auth, None).await?;
    println!("listening");
    running.wait().await
}
