//! pg-proxy: agents use Postgres through agentgate with the clients they already have.
//!
//! An agent connects with psql, pgbench, a driver (libpq, psycopg, JDBC) as to any Postgres:
//! the startup `user` is the role it wants (`read`, `admin`...), `database` the connection
//! name from the catalog, and its agentgate token is the password. The proxy has authz open a
//! session (no grant, no session), logs in to the real database itself with the connection's
//! credential (the agent never sees it), and relays the frontend/backend protocol:
//! every statement is classified with the PostgreSQL grammar, decided by the session's
//! policy (allow, deny, or hold for approval), result cells are masked by their source
//! column, and every statement is recorded. The session ends when the grant expires or is
//! revoked, within a second, with a FATAL error that says why.
//!
//! Layout: [`conn`] is one connection's life, [`relay`] the two directions of a live session,
//! [`upstream`] the login to the database, [`catalog`] where result columns come from.
//! See docs/pg-proxy.md.

pub mod catalog;
pub mod conn;
pub mod ops;
pub mod relay;
pub mod stream;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate_session::Gateway;
use agentgate_sql_classify::Classifier;
use agentgate_tls::TlsConfig;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::conn::CancelKeys;
use crate::upstream::UpstreamTarget;

/// Settings of pg-proxy (the `[pg_proxy]` table of the deployment's TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgProxyConfig {
    /// Whether `agentgate up` runs pg-proxy (the standalone binary always does).
    pub enabled: bool,
    /// Where agents connect.
    pub listen: SocketAddr,
    /// This instance's name, recorded with every session.
    pub name: String,
    /// Certificate and key for agents' TLS (answering SSLRequest). Without them SSLRequest
    /// is declined and only loopback clients may log in (if allowed below).
    pub tls: TlsConfig,
    /// Without `tls`: a directory where pg-proxy creates, once, a private CA (`ca.pem`) and a
    /// certificate for itself (`pg-proxy.pem`), and answers SSLRequest with it. Agents then
    /// get encryption with `sslmode=require`, and verification with
    /// `sslmode=verify-ca sslrootcert=DIR/ca.pem`. Meant for single-host deployments
    /// (docker-compose), where agents arrive through a port mapping rather than from
    /// loopback; in production give `tls` a certificate from your own CA.
    pub generated_tls_dir: Option<PathBuf>,
    /// Let clients on loopback send their token without TLS (a local agent, tests).
    pub allow_cleartext_on_loopback: bool,
    /// Largest message accepted from an agent.
    pub max_message_bytes: usize,
    /// How long a new connection may take to start up and send its token.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// authz's gRPC address.
    pub authz_url: String,
    /// approvals' gRPC address.
    pub approvals_url: String,
    /// TLS for authz and approvals (CA, and this proxy's client certificate).
    pub control_tls: TlsConfig,
    /// File holding this proxy's service token (for authz, approvals and the audit store).
    pub service_token_file: Option<PathBuf>,
    /// The audit store's gRPC address.
    pub audit_url: String,
    /// The durable local spool of audit events.
    pub spool_path: Option<PathBuf>,
    /// Shortest time between two fdatasyncs of the spool while events keep coming: longer
    /// costs less CPU and fewer disk flushes under load, and lets a crash take up to that
    /// much of the events recorded last.
    #[serde(with = "humantime_serde")]
    pub spool_sync_interval: Duration,
}

impl Default for PgProxyConfig {
    fn default() -> Self {
        PgProxyConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            name: "pg-proxy".into(),
            tls: TlsConfig::default(),
            generated_tls_dir: None,
            allow_cleartext_on_loopback: true,
            max_message_bytes: agentgate_pgwire::DEFAULT_MAX_MESSAGE_LEN,
            startup_timeout: Duration::from_secs(30),
            authz_url: "http://127.0.0.1:7404".into(),
            approvals_url: "http://127.0.0.1:7405".into(),
            control_tls: TlsConfig::default(),
            service_token_file: None,
            audit_url: "http://127.0.0.1:7403".into(),
            spool_path: None,
            spool_sync_interval: agentgate_recorder::DEFAULT_SYNC_INTERVAL,
        }
    }
}

/// What every connection of one proxy shares.
pub struct Shared {
    config: PgProxyConfig,
    gateway: Gateway,
    classifier: Arc<Classifier>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancels: CancelKeys,
    catalogs: Mutex<HashMap<(String, String), Arc<Catalog>>>,
}

impl Shared {
    /// The column-origin cache of a connection, per upstream user (what one user sees of
    /// the catalog is what its sessions can select).
    fn catalog(&self, connection: &str, target: &UpstreamTarget) -> Arc<Catalog> {
        let mut map = self.catalogs.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((connection.to_owned(), target.user.clone()))
            .or_insert_with(|| Arc::new(Catalog::new(target.clone())))
            .clone()
    }
}

/// A running pg-proxy.
pub struct RunningPgProxy {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningPgProxy {
    /// Stops accepting; live sessions end with the process.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the accept loop ends.
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Binds the listener and serves agents through `gateway`.
pub async fn start(config: &PgProxyConfig, gateway: Gateway) -> anyhow::Result<RunningPgProxy> {
    let agent_tls = agent_tls(config)?;
    let tls = match agent_tls.identity().context("pg_proxy.tls")? {
        Some(_) => {
            let server = agentgate_tls::rustls_server_config(&TlsConfig {
                ca: None,
                ..agent_tls.clone()
            })
            .context("pg_proxy.tls")?;
            Some(tokio_rustls::TlsAcceptor::from(server))
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("pg-proxy: binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        gateway,
        classifier: Arc::new(Classifier::default()),
        tls,
        cancels: CancelKeys::default(),
        catalogs: Mutex::new(HashMap::new()),
    });
    let (tx, mut rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        tokio::spawn(conn::serve(shared.clone(), socket, peer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    });
    tracing::info!(%addr, "pg-proxy listening");
    Ok(RunningPgProxy {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// The certificate pg-proxy answers SSLRequest with: `tls`, or else the one it keeps in
/// `generated_tls_dir` (created on first start, reused after, so agents can pin its CA).
fn agent_tls(config: &PgProxyConfig) -> anyhow::Result<TlsConfig> {
    let dir = match (&config.generated_tls_dir, config.tls.enabled()) {
        (Some(dir), false) => dir,
        _ => return Ok(config.tls.clone()),
    };
    let cert = dir.join("pg-proxy.pem");
    let key = dir.join("pg-proxy-key.pem");
    if !(cert.exists() && key.exists()) {
        agentgate_tls::generate_dev_certs(dir, &["pg-proxy"])
            .with_context(|| format!("pg_proxy.generated_tls_dir {}", dir.display()))?;
        tracing::info!(ca = %dir.join("ca.pem").display(), "pg-proxy created its TLS certificate; agents verify it with this CA");
    }
    Ok(TlsConfig {
        cert: Some(cert),
        key: Some(key),
        ca: None,
    })
}

/// Everything pg-proxy needs from the control plane, built from its configuration: the
/// authz client, the recorder and the session gateway, with the service token from
/// `service_token_file` (read again on every call, so authz's `service_tokens` can renew it)
/// or the `AGENTGATE_SERVICE_TOKEN` environment variable.
pub async fn gateway_from_config(
    config: &PgProxyConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Gateway> {
    let credentials = agentgate_session::ServiceCredentials::from_file_or_env(
        config.service_token_file.as_deref(),
        "pg_proxy",
    )?;
    gateway(config, data_dir, credentials).await
}

/// The session gateway for `config` with `credentials` (`agentgate up` passes renewing
/// tokens authz signs itself).
pub async fn gateway(
    config: &PgProxyConfig,
    data_dir: &std::path::Path,
    credentials: agentgate_session::ServiceCredentials,
) -> anyhow::Result<Gateway> {
    let plane = agentgate_session::ControlPlane {
        proxy: &config.name,
        protocol: agentgate_proto::common::v1::Protocol::Postgres,
        authz_url: &config.authz_url,
        approvals_url: &config.approvals_url,
        audit_url: &config.audit_url,
        tls: &config.control_tls,
        spool_path: config.spool_path.as_deref(),
        spool_sync_interval: config.spool_sync_interval,
        table: "pg_proxy",
    };
    Ok(agentgate_session::connect(plane, credentials, data_dir, |_| {}).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_certificate_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("agentgate-pg-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = PgProxyConfig {
            generated_tls_dir: Some(dir.clone()),
            ..PgProxyConfig::default()
        };
        let first = agent_tls(&config).expect("generated");
        let cert = first.cert.clone().expect("cert");
        let pem = std::fs::read_to_string(&cert).expect("read");
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("ca");
        // A restart keeps both, so agents that pinned the CA still connect.
        let second = agent_tls(&config).expect("reused");
        assert_eq!(second.cert, first.cert);
        assert_eq!(std::fs::read_to_string(&cert).expect("read"), pem);
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).expect("ca"), ca);
        // A configured certificate wins over the generated one.
        let own = PgProxyConfig {
            tls: TlsConfig {
                cert: Some("/etc/own.pem".into()),
                key: Some("/etc/own-key.pem".into()),
                ca: None,
            },
            ..config
        };
        assert_eq!(
            agent_tls(&own).expect("configured").cert,
            Some(PathBuf::from("/etc/own.pem"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
