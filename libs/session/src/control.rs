//! How a proxy process reaches the control plane: the authz client, the audit recorder and
//! the [`Gateway`] over them, built from the settings every proxy's configuration repeats
//! (`authz_url`, `approvals_url`, `audit_url`, `control_tls`, `service_token_file`,
//! `spool_path`). One place, so that every proxy authenticates and records the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentgate_authz::client::AuthzClient;
use agentgate_identity::{FixedToken, TokenFile, TokenSource};
use agentgate_proto::common::v1::Protocol;
use agentgate_recorder::{Recorder, RecorderConfig};
use agentgate_tls::TlsConfig;

use crate::{Gateway, GatewayConfig};

/// Where the control plane is, as a proxy's configuration names it.
pub struct ControlPlane<'a> {
    /// The proxy's name (`pg_proxy.name`): recorded with every session, names its spool.
    pub proxy: &'a str,
    /// The protocol the proxy speaks.
    pub protocol: Protocol,
    /// authz's gRPC address.
    pub authz_url: &'a str,
    /// approvals' gRPC address.
    pub approvals_url: &'a str,
    /// The audit store's gRPC address.
    pub audit_url: &'a str,
    /// TLS (CA and client certificate) toward authz, approvals and the audit store.
    pub tls: &'a TlsConfig,
    /// The durable audit spool; `DATA_DIR/<proxy>-spool.db` when unset.
    pub spool_path: Option<&'a Path>,
    /// Shortest time between two fdatasyncs of the spool under load
    /// ([`agentgate_recorder::RecorderConfig::sync_interval`]).
    pub spool_sync_interval: std::time::Duration,
    /// The table the settings come from (`pg_proxy`), for error messages.
    pub table: &'a str,
}

/// The credentials a proxy presents: to authz and approvals, and to the audit store.
pub struct ServiceCredentials {
    /// For authz and approvals (kind service, any audience).
    pub service: Arc<dyn TokenSource>,
    /// For the audit store; may be the same source.
    pub recorder: Arc<dyn TokenSource>,
}

impl ServiceCredentials {
    /// The proxy's `service_token_file`, read again on every call and connection (authz's
    /// `service_tokens` renews it in a shared data directory), or else the
    /// `AGENTGATE_SERVICE_TOKEN` environment variable (a fixed token).
    pub fn from_file_or_env(
        file: Option<&Path>,
        table: &str,
    ) -> Result<ServiceCredentials, ControlPlaneError> {
        let source: Arc<dyn TokenSource> = match file {
            Some(path) => {
                let file = TokenFile::new(path);
                // Readable now, or the proxy would start only to refuse every agent.
                file.token().map_err(|reason| {
                    ControlPlaneError::setting(table, "service_token_file", reason)
                })?;
                Arc::new(file)
            }
            None => match std::env::var("AGENTGATE_SERVICE_TOKEN") {
                Ok(token) if !token.trim().is_empty() => Arc::new(FixedToken::new(token)),
                _ => {
                    return Err(ControlPlaneError::setting(
                        table,
                        "service_token_file",
                        "no service token: set it, or AGENTGATE_SERVICE_TOKEN",
                    ));
                }
            },
        };
        Ok(ServiceCredentials {
            service: source.clone(),
            recorder: source,
        })
    }
}

/// What is wrong with a proxy's control-plane settings; all are fixed in configuration.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A setting is refused.
    #[error("{setting}: {reason}")]
    Setting {
        /// Which, as the configuration names it (`pg_proxy.control_tls`).
        setting: String,
        /// What is wrong.
        reason: String,
    },
    /// The gateway refused its configuration.
    #[error(transparent)]
    Gateway(#[from] crate::GatewayError),
}

impl ControlPlaneError {
    fn setting(table: &str, key: &str, reason: impl std::fmt::Display) -> ControlPlaneError {
        ControlPlaneError::Setting {
            setting: format!("{table}.{key}"),
            reason: reason.to_string(),
        }
    }
}

/// Opens the proxy's recorder and starts its [`Gateway`]; `adjust` may change the gateway
/// configuration (the masking hash key, timeouts) before it starts.
pub async fn connect(
    plane: ControlPlane<'_>,
    credentials: ServiceCredentials,
    data_dir: &Path,
    adjust: impl FnOnce(&mut GatewayConfig),
) -> Result<Gateway, ControlPlaneError> {
    let tls = |server: &str| {
        agentgate_tls::grpc_client_tls(plane.tls, server)
            .map_err(|e| ControlPlaneError::setting(plane.table, "control_tls", e))
    };
    let authz_tls = tls("authz")?;
    let approvals_tls = tls("approvals")?;
    let audit_tls = tls("audit-store")?;
    let authz =
        AuthzClient::with_token_source(plane.authz_url, credentials.service.clone(), authz_tls)
            .map_err(|e| ControlPlaneError::setting(plane.table, "authz_url", e))?;
    let spool: PathBuf = plane
        .spool_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join(format!("{}-spool.db", plane.proxy)));
    let mut recorder_config =
        RecorderConfig::new(plane.audit_url, spool).with_token_source(credentials.recorder);
    recorder_config.tls = audit_tls;
    recorder_config.sync_interval = plane.spool_sync_interval;
    let recorder = Recorder::open(recorder_config).await.map_err(|e| {
        ControlPlaneError::setting(plane.table, "spool_path (the audit recorder)", e)
    })?;
    let mut config = GatewayConfig::new(plane.proxy, plane.protocol, plane.approvals_url, "")
        .with_token_source(credentials.service);
    config.approvals_tls = approvals_tls;
    adjust(&mut config);
    Ok(Gateway::start(authz, recorder, config)?)
}
