//! approvals: the life of a human approval, for just-in-time access requests (created by
//! authz) and for high-risk operations a proxy holds until someone decides.
//!
//! A request goes `pending → approved | denied | expired | cancelled` and nowhere else. The
//! rules — no self-approval, one reviewer counts once, a single deny denies, an expired
//! request cannot be approved, a decision is final — are in [`model`] and are applied under
//! the request's row lock, so they hold with several instances on one Postgres. Pending
//! requests expire on time through a sweeper that runs safely on every instance. Watchers on
//! any instance hear of a decision within milliseconds (Postgres `LISTEN/NOTIFY`, see
//! [`hub`]). Every change is an audit event; webhooks announce creations and decisions.
//! See docs/approvals.md.
//!
//! The crate is a library with a thin `main`, so `agentgate up` runs it in-process:
//!
//! ```no_run
//! # async fn demo(authz: std::sync::Arc<dyn agentgate_identity::Authenticator>) -> anyhow::Result<()> {
//! let mut config = agentgate_approvals::ApprovalsConfig::default();
//! config.audit.token_file = Some("/var/lib/agentgate/approvals.recorder.token".into());
//! let running = agentgate_approvals::start(&config, "/var/lib/agentgate".as_ref(), authz, None, None).await?;
//! println!("approvals on {}", running.addr);
//! running.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod audit;
pub mod config;
pub mod hub;
pub mod limits;
pub mod model;
mod service;
pub mod store;
pub mod webhook;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::Authenticator;
use agentgate_proto::approvals::v1::approvals_server::ApprovalsServer;
use agentgate_recorder::TokenSource;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{ApprovalsConfig, AuditConfig, AuthConfig, WebhookConfig, WebhookFormat};
pub use service::{ApprovalsService, ServiceMetrics};
pub use store::Store;

/// Largest gRPC message accepted or sent (a request with a 64 KiB statement fits easily;
/// a List of 1000 such does too).
const MAX_MESSAGE_BYTES: usize = 128 << 20;

/// How long shutdown waits for calls in progress (Watch streams never end by themselves).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A running approvals service. Dropping it does not stop it; call
/// [`RunningApprovals::shutdown`].
pub struct RunningApprovals {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The store, for tests and tools that read what is stored without the service's rules.
    pub store: Store,
    service: ApprovalsService,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningApprovals {
    /// "postgres" or "sqlite".
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// This instance's audit session id (every event it records carries it).
    pub fn audit_session_id(&self) -> &str {
        self.service.inner.audit.session_id()
    }

    /// Waits until the audit store has acknowledged every event recorded so far.
    pub async fn flush_audit(&self, timeout: Duration) -> anyhow::Result<()> {
        Ok(self.service.inner.audit.flush(timeout).await?)
    }

    /// Stops accepting, lets calls in progress finish for at most `SHUTDOWN_GRACE`, and
    /// stops the sweeper, the change listener and the webhook workers. Every change that was
    /// acknowledged is committed already.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in &self.background {
            t.abort();
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(joined) => joined.context("approvals task")??,
            Err(_) => self.task.abort(),
        }
        Ok(())
    }

    /// Waits until the server ends by itself (an error) or is shut down.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("approvals task")??;
        Ok(())
    }
}

/// Opens the database, starts the change listener, the audit recorder, the webhook workers
/// and the expiry sweeper, binds the listener and serves. `authenticator` turns each caller's
/// bearer token into a principal: authz's in `agentgate up`, or [`authenticator_from_config`]
/// for the standalone binary. `audit_token` gives the service token the recorder presents
/// to the audit store (from authz in `agentgate up`); when `None`, `audit.token_file` is
/// read instead. Every error names what failed and where.
pub async fn start(
    config: &ApprovalsConfig,
    data_dir: &Path,
    authenticator: Arc<dyn Authenticator>,
    audit_token: Option<Arc<dyn TokenSource>>,
    metrics: Option<&agentgate_telemetry::Metrics>,
) -> anyhow::Result<RunningApprovals> {
    config.validate().map_err(anyhow::Error::msg)?;
    let url = config.database_url(data_dir);
    let store = Store::connect(&url)
        .await
        .with_context(|| format!("approvals database {}", redact_url(&url)))?;
    let hub = hub::Hub::new();
    let listener_task = hub::listen(store.clone(), hub.clone())
        .await
        .with_context(|| format!("approvals: LISTEN on {}", redact_url(&url)))?;

    let mut recorder_config = agentgate_recorder::RecorderConfig::new(
        &config.audit.endpoint,
        config.spool_path(data_dir),
    );
    if !config.audit.tls.is_empty() {
        let host = config
            .audit
            .endpoint
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default();
        recorder_config.tls = agentgate_tls::grpc_client_tls(&config.audit.tls, &host)
            .context("approvals: audit store TLS")?;
    }
    match (audit_token, &config.audit.token_file) {
        (Some(source), _) => recorder_config = recorder_config.with_token_source(source),
        (None, Some(path)) => recorder_config = recorder_config.with_token_file(path),
        (None, None) => tracing::warn!(
            "approvals.audit.token_file is not set: the audit store will refuse this service's events, which wait in the spool until a service token is configured"
        ),
    }
    let recorder = agentgate_recorder::Recorder::open(recorder_config)
        .await
        .context("approvals: audit recorder")?;

    let service_metrics = ServiceMetrics::default();
    let webhook_metrics = webhook::WebhookMetrics::default();
    if let Some(m) = metrics {
        register_metrics(m, &service_metrics, &webhook_metrics);
    }
    let notifier = webhook::Notifier::start(&config.webhooks, webhook_metrics)
        .context("approvals: webhooks")?;
    let inner = Arc::new(service::Inner {
        store: store.clone(),
        hub,
        audit: audit::AuditLog::new(recorder),
        notifier,
        auth: authenticator,
        audience: config.audience.clone(),
        policy: model::Policy::from_config(config),
        metrics: service_metrics,
    });
    let service = ApprovalsService {
        inner: inner.clone(),
    };
    let mut background = vec![tokio::spawn(service::sweeper(
        inner.clone(),
        config.sweep_interval,
    ))];
    background.extend(listener_task);

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("approvals: cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder()
        .trace_fn(agentgate_telemetry::server_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = agentgate_tls::grpc_server_tls(&config.tls)? {
        builder = builder.tls_config(tls).context("approvals TLS")?;
    }
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = builder
        .add_service(
            ApprovalsServer::new(service.clone())
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
    tracing::info!(%addr, backend = store.backend(), audit_session = %inner.audit.session_id(), "approvals listening");
    Ok(RunningApprovals {
        addr,
        store,
        service,
        shutdown: Some(shutdown_tx),
        task,
        background,
    })
}

fn register_metrics(
    m: &agentgate_telemetry::Metrics,
    s: &ServiceMetrics,
    w: &webhook::WebhookMetrics,
) {
    let mut registry = m.registry();
    let r = registry.sub_registry_with_prefix("approvals");
    r.register(
        "requests_created",
        "Approval requests created",
        s.created.clone(),
    );
    r.register("reviews", "Reviews counted", s.reviews.clone());
    r.register("approved", "Requests approved", s.approved.clone());
    r.register("denied", "Requests denied", s.denied.clone());
    r.register("expired", "Requests expired", s.expired.clone());
    r.register("cancelled", "Requests cancelled", s.cancelled.clone());
    r.register("refused", "Calls refused by the rules", s.refused.clone());
    r.register(
        "webhooks_delivered",
        "Webhook notifications delivered",
        w.delivered.clone(),
    );
    r.register(
        "webhook_failed_attempts",
        "Webhook attempts that failed (retried)",
        w.failed_attempts.clone(),
    );
    r.register(
        "webhooks_given_up",
        "Webhook notifications given up after max_attempts",
        w.given_up.clone(),
    );
    r.register(
        "webhooks_dropped",
        "Webhook notifications dropped because the queue was full",
        w.dropped.clone(),
    );
}

/// A token verifier trusting authz's public keys from `auth` (PEM `PUBLIC KEY` files), for
/// the standalone binary. `agentgate up` passes authz's own authenticator instead, which also
/// knows revocations.
pub fn authenticator_from_config(auth: &AuthConfig) -> anyhow::Result<Arc<dyn Authenticator>> {
    Ok(Arc::new(auth.verifier("approvals.auth")?))
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
