//! authz: the central decision point. It verifies credentials into principals, holds the
//! connection catalog, the Cedar policy and the grants, hands each proxy session the policy it
//! enforces locally, and streams grant expiry and revocation so proxies end live sessions.
//!
//! See docs/authz.md. The crate is a library with a thin `main`, so `agentgate up` runs it
//! in-process.

mod access;
pub mod client;
pub mod config;
mod core;
mod oidc;
mod service;
pub mod service_tokens;
pub mod ssh;
mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::{Authenticator, TokenError, TokenIssuer, TokenRequest};
use agentgate_proto::authz::v1::authz_server::AuthzServer;
use agentgate_proto::common::v1::{Principal, PrincipalKind};
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{AuthzConfig, ConnectionConfig, OidcIssuerConfig, SshKeyConfig, UpstreamConfig};
pub use core::Core;
pub use service_tokens::{ServiceTokens, recorder_token_path, service_token_path};

/// The file authz writes its token-verification public key to (SPKI PEM), for services that
/// verify tokens themselves, such as a standalone approvals (`approvals.auth.public_keys`).
pub const PUBLIC_KEY_FILE: &str = "authz-public-key.pem";

/// The file `agentgate up` writes the first admin credential to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How long shutdown waits for calls in progress (grant watchers never end by themselves).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A running authz.
pub struct RunningAuthz {
    pub addr: SocketAddr,
    pub core: Arc<Core>,
    /// Where the bootstrap admin token is.
    pub admin_token_path: PathBuf,
    recorder_token_ttl: Duration,
    service_token_ttl: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Renews the `recorder_tokens` and `service_tokens` files.
    token_files: Option<JoinHandle<()>>,
}

impl RunningAuthz {
    /// An authenticator other services in this process use: it checks signature, validity
    /// and revocation, and records each verification.
    pub fn authenticator(&self) -> Arc<dyn Authenticator> {
        Arc::new(CoreAuthenticator(self.core.clone()))
    }

    /// Signs one service token for another agentgate service in this process (tests,
    /// benchmarks); a long-running service takes [`RunningAuthz::service_token_source`].
    pub fn service_token(&self, service: &str, ttl: Duration) -> anyhow::Result<String> {
        let (token, _) = self.core.issuer.issue(&TokenRequest {
            subject: format!("service:{service}"),
            kind: PrincipalKind::Service,
            groups: Vec::new(),
            audience: Vec::new(),
            ttl,
        })?;
        Ok(token)
    }

    /// A renewing service token for another agentgate service in this process (a proxy in
    /// `agentgate up`): subject `service:<service>`, accepted by authz, approvals and the
    /// audit store, signed anew at half its lifetime (`authz.service_token_ttl`).
    pub fn service_token_source(&self, service: &str) -> Arc<dyn agentgate_identity::TokenSource> {
        Arc::new(ServiceTokens::service(
            self.core.issuer.clone(),
            service,
            self.service_token_ttl,
        ))
    }

    /// A renewing recorder token for another agentgate service in this process (subject
    /// `service:<service>`, audience `audit-store`), for its `RecorderConfig`.
    pub fn recorder_token_source(&self, service: &str) -> Arc<dyn agentgate_identity::TokenSource> {
        Arc::new(ServiceTokens::recorder(
            self.core.issuer.clone(),
            service,
            self.recorder_token_ttl,
        ))
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.token_files.take() {
            t.abort();
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(joined) => joined.context("authz task")??,
            Err(_) => self.task.abort(),
        }
        Ok(())
    }

    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("authz task")??;
        Ok(())
    }
}

struct CoreAuthenticator(Arc<Core>);

#[tonic::async_trait]
impl Authenticator for CoreAuthenticator {
    async fn authenticate(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Principal, TokenError> {
        self.0
            .verify_token(token, audience, "", "bearer")
            .await
            .map(|(p, _)| p)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }
}

/// Opens storage, keys and policy, writes the bootstrap admin token, binds and serves.
pub async fn start(config: &AuthzConfig, data_dir: &Path) -> anyhow::Result<RunningAuthz> {
    let url = config.database_url(data_dir);
    let store = store::Store::connect(&url)
        .await
        .with_context(|| format!("authz database {}", redact(&url)))?;
    let key = agentgate_audit_chain::SigningKeyFile::load_or_generate(
        &config.signing_key_path(data_dir),
    )?;
    let issuer = Arc::new(TokenIssuer::new(&key, config.issuer.clone())?);
    // The public half, for services that verify agentgate tokens on their own (approvals).
    let public_pem = {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        key.verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("authz public key: {e}"))?
    };
    let public_path = data_dir.join(PUBLIC_KEY_FILE);
    std::fs::write(&public_path, public_pem)
        .with_context(|| format!("writing {}", public_path.display()))?;

    let policy_path = config.policy_path(data_dir);
    if config.policy.is_none() && !policy_path.exists() {
        std::fs::write(&policy_path, DEFAULT_POLICY)
            .with_context(|| format!("writing {}", policy_path.display()))?;
    }
    let policy = Arc::new(
        agentgate_policy::PolicyStore::open(&policy_path)
            .map_err(|e| anyhow::anyhow!("policy: {e}"))?,
    );
    let mut oidc = Vec::new();
    for issuer_config in &config.oidc_issuers {
        oidc.push(oidc::OidcIssuer::new(issuer_config.clone())?);
    }
    for c in &config.connections {
        if core::protocol_of(c) == agentgate_proto::common::v1::Protocol::Unspecified {
            anyhow::bail!(
                "connection {}: protocol {:?} must be postgres, ssh, http or kubernetes",
                c.name,
                c.protocol
            );
        }
    }
    for name in &config.recorder_tokens {
        service_tokens::check_service_name("recorder_tokens", name).map_err(anyhow::Error::msg)?;
    }
    for name in &config.service_tokens {
        service_tokens::check_service_name("service_tokens", name).map_err(anyhow::Error::msg)?;
    }
    let recorder = match &config.audit_url {
        Some(url) => {
            // The store takes events from service principals only: authz signs its own.
            let tokens =
                ServiceTokens::recorder(issuer.clone(), "authz", config.recorder_token_ttl);
            let r = agentgate_recorder::Recorder::open(
                agentgate_recorder::RecorderConfig::new(
                    url.clone(),
                    data_dir.join("authz-spool.db"),
                )
                .with_token_source(Arc::new(tokens)),
            )
            .await?;
            Some(r.session(agentgate_recorder::SessionContext {
                principal: Some(Principal {
                    subject: "service:authz".into(),
                    kind: PrincipalKind::Service as i32,
                    ..Default::default()
                }),
                connection: "authz".into(),
                protocol: agentgate_proto::common::v1::Protocol::ControlPlane,
                ..Default::default()
            }))
        }
        None => None,
    };
    let core = Core::new(
        store,
        issuer.clone(),
        oidc,
        policy.clone(),
        config.connections.clone(),
        recorder,
        config.admin_group.clone(),
        config.max_token_ttl,
        config.exchange_token_ttl,
    )
    .await
    .map_err(|e| anyhow::anyhow!("authz: {e}"))?;

    // Policy reloads without restart; proxies hear of it.
    let _watcher = policy.spawn_watcher(config.policy_reload_interval);
    let mut versions = policy.subscribe();
    let weak = Arc::downgrade(&core);
    tokio::spawn(async move {
        while versions.changed().await.is_ok() {
            let version = versions.borrow().clone();
            match weak.upgrade() {
                Some(core) => core.policy_changed(&version),
                None => return,
            }
        }
    });

    let admin_token_path = data_dir.join(ADMIN_TOKEN_FILE);
    bootstrap_admin(&core, &admin_token_path, config.bootstrap_admin_ttl).await?;
    let recorder_files = config.recorder_tokens.iter().map(|name| {
        (
            ServiceTokens::recorder(issuer.clone(), name, config.recorder_token_ttl),
            recorder_token_path(data_dir, name),
        )
    });
    let service_files = config.service_tokens.iter().map(|name| {
        (
            ServiceTokens::service(issuer.clone(), name, config.service_token_ttl),
            service_token_path(data_dir, name),
        )
    });
    let token_files =
        service_tokens::keep_files_fresh(recorder_files.chain(service_files).collect())
            .context("authz.recorder_tokens / service_tokens: writing the token files")?;

    let access = Arc::new(access::AccessRequests::new(
        config.approvals_url.as_deref(),
    )?);
    access
        .resume(&core)
        .await
        .map_err(|e| anyhow::anyhow!("authz: {e}"))?;
    let ssh = Arc::new(ssh::SshIdentities::load(config, data_dir).context("authz: SSH CA")?);
    let service = service::AuthzService {
        core: core.clone(),
        access,
        ssh,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("authz: cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut builder =
        tonic::transport::Server::builder().trace_fn(agentgate_telemetry::server_span);
    if let Some(tls) = agentgate_tls::grpc_server_tls(&config.tls)? {
        builder = builder.tls_config(tls).context("authz TLS")?;
    }
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = builder
        .add_service(AuthzServer::new(service))
        // Nagle off: a gRPC answer is several small writes; with Nagle each call waits ~40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = shutdown_rx.await;
            },
        );
    let task = tokio::spawn(server);
    tracing::info!(%addr, key_id = core.issuer.key_id(), "authz listening");
    Ok(RunningAuthz {
        addr,
        core,
        admin_token_path,
        recorder_token_ttl: config.recorder_token_ttl,
        service_token_ttl: config.service_token_ttl,
        shutdown: Some(shutdown_tx),
        task,
        token_files,
    })
}

/// The policy written on first start when none is configured: it permits nothing. Edit it
/// (it reloads by itself) or point `authz.policy` at your own; see docs/policy.md.
const DEFAULT_POLICY: &str = "// agentgate policy (Cedar). Nothing is permitted until you add policies here.\n\
// See docs/policy.md and deploy/policy.example.cedar.\n";

/// Writes an admin token readable by its owner only, unless a valid one is there.
async fn bootstrap_admin(core: &Arc<Core>, path: &Path, ttl: Duration) -> anyhow::Result<()> {
    if let Ok(existing) = std::fs::read_to_string(path)
        && core
            .issuer
            .verifier()
            .verify(existing.trim(), None)
            .is_ok_and(|c| c.exp as i64 * 1_000_000 > now_us() + 600_000_000)
    {
        return Ok(());
    }
    let bootstrap = Principal {
        subject: "service:authz-bootstrap".into(),
        kind: PrincipalKind::Service as i32,
        ..Default::default()
    };
    let (token, _) = core
        .issue_token(
            &TokenRequest {
                subject: "human:admin".into(),
                kind: PrincipalKind::Human,
                groups: vec![core.admin_group.clone()],
                audience: Vec::new(),
                ttl,
            },
            &bootstrap,
        )
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap admin token: {e}"))?;
    write_private(path, token.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = url[s + 3..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

pub fn timestamp_us(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

pub fn us_timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}
