//! The audit store: the one central, append-only, hash-chained record of everything the
//! gateway saw and decided.
//!
//! Proxies and control-plane services stream events to it over gRPC (through the
//! `agentgate-recorder` lib). Every event is chained — its hash covers the previous one —
//! and the chain head is signed with Ed25519 every N events or T seconds, so an auditor can
//! verify offline that nothing was altered, inserted or removed. See docs/architecture.md.
//!
//! Every call needs a bearer token: recorders ingest with a service token, auditors and
//! admins read, admins prune (see [`access`]).
//!
//! The crate is a library with a thin `main`, so `agentgate up` can run it in-process:
//!
//! ```no_run
//! # async fn demo(authz: std::sync::Arc<dyn agentgate_identity::Authenticator>) -> anyhow::Result<()> {
//! let config = agentgate_audit_store::AuditStoreConfig::default();
//! let running = agentgate_audit_store::start(&config, "/var/lib/agentgate".as_ref(), authz, None).await?;
//! println!("audit store on {}", running.addr);
//! running.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod access;
pub mod config;
mod evidence;
pub mod metrics;
mod service;
pub mod store;
mod writer;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use agentgate_audit_chain::{SigningKeyFile, VerifyingKey};
use agentgate_identity::{AuthConfig, Authenticator};
use agentgate_proto::audit::v1::audit_store_server::AuditStoreServer;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::AuditStoreConfig;
pub use evidence::{WalkError, prune, verify};
pub use metrics::StoreMetrics;
pub use service::{AuditStoreService, validate};
pub use store::Store;

/// Largest gRPC message accepted: a full batch of large events.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long shutdown waits for calls in progress.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A running audit store. Dropping it does not stop it; call [`RunningAuditStore::shutdown`].
pub struct RunningAuditStore {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The key that verifies its checkpoints and bundles.
    pub public_key: VerifyingKey,
    pub store: Store,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningAuditStore {
    /// Stops accepting and lets calls in progress finish, for at most `SHUTDOWN_GRACE`
    /// (a recorder's Ingest stream never ends by itself); then the server is dropped.
    /// Every acknowledged batch is committed already, so nothing acknowledged is lost.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(joined) => joined.context("audit store task")??,
            Err(_) => self.task.abort(),
        }
        Ok(())
    }

    /// Waits until the server ends by itself (an error) or is shut down.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("audit store task")??;
        Ok(())
    }
}

/// Opens the database, loads or creates the signing key, binds the listener and serves.
/// `authenticator` turns each caller's bearer token into a principal: authz's in
/// `agentgate up` (it also knows revocations), or [`authenticator_from_config`] for the
/// standalone binary. Every error names what failed and where (database URL, key path,
/// listen address).
pub async fn start(
    config: &AuditStoreConfig,
    data_dir: &Path,
    authenticator: Arc<dyn Authenticator>,
    metrics: Option<&agentgate_telemetry::Metrics>,
) -> anyhow::Result<RunningAuditStore> {
    let url = config.database_url(data_dir);
    let store = Store::connect(&url)
        .await
        .with_context(|| format!("audit store database {}", redact_url(&url)))?;
    let key_path = config.signing_key_path(data_dir);
    let key = Arc::new(SigningKeyFile::load_or_generate(&key_path)?);
    let public_key = key.verifying_key();
    // A lost key file must not be silently replaced: the chain would stop verifying.
    if let Some(last) = store.checkpoints().await?.last()
        && last.key_id != agentgate_audit_chain::key_id(&public_key)
    {
        anyhow::bail!(
            "signing key {} (key {}) did not sign this store's checkpoints (key {}): restore the original key file or point audit_store.signing_key at it",
            key_path.display(),
            agentgate_audit_chain::key_id(&public_key),
            last.key_id
        );
    }

    let store_metrics = StoreMetrics::default();
    if let Some(m) = metrics {
        store_metrics.register(&mut m.registry());
    }
    let writer = writer::Writer::spawn(
        store.clone(),
        key,
        config.checkpoint_every,
        config.checkpoint_interval,
        store_metrics.clone(),
    );
    let service = AuditStoreService {
        store: store.clone(),
        writer,
        public_key: Arc::new(public_key),
        max_batch_events: config.max_batch_events,
        metrics: store_metrics,
        auth: authenticator,
    };
    if let Some(retention) = config.retention {
        tokio::spawn(retention_loop(store.clone(), retention));
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("audit store: cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut builder =
        tonic::transport::Server::builder().trace_fn(agentgate_telemetry::server_span);
    if let Some(tls) = agentgate_tls::grpc_server_tls(&config.tls)? {
        builder = builder.tls_config(tls).context("audit store TLS")?;
    }
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = builder
        .add_service(
            AuditStoreServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        // Nagle off: a gRPC answer is several small writes; with Nagle each call waits ~40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = shutdown_rx.await;
            },
        );
    let task = tokio::spawn(server);
    tracing::info!(%addr, backend = store.backend(), key_id = %agentgate_audit_chain::key_id(&public_key), "audit store listening");
    Ok(RunningAuditStore {
        addr,
        public_key,
        store,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// A token verifier trusting authz's public keys from `auth` (PEM `PUBLIC KEY` files), for
/// the standalone binary. `agentgate up` passes authz's own authenticator instead, which also
/// knows revocations.
pub fn authenticator_from_config(auth: &AuthConfig) -> anyhow::Result<Arc<dyn Authenticator>> {
    Ok(Arc::new(auth.verifier("audit_store.auth")?))
}

/// Prunes what is older than `retention`, every tenth of it (at most hourly).
async fn retention_loop(store: Store, retention: std::time::Duration) {
    let period = (retention / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let before = store::now_us() - retention.as_micros() as i64;
        match evidence::prune(&store, before).await {
            Ok((0, _)) => {}
            Ok((removed, anchored_at)) => {
                tracing::info!(removed, anchored_at, "retention pruned events")
            }
            Err(e) => tracing::error!(error = %e, "retention prune failed"),
        }
    }
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Microseconds since the Unix epoch of a protobuf timestamp.
pub fn timestamp_us(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn us_timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }

    #[test]
    fn timestamps_round_trip() {
        for us in [0, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(timestamp_us(&us_timestamp(us)), us);
        }
    }
}
