//! Settings of the approvals service (the `[approvals]` table of the deployment's TOML file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentgate_tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// How the approvals service listens, stores, decides who reviews, and whom it notifies.
///
/// Callers that are not service principals cannot choose reviewers or how many approvals a
/// request needs: the `default_*` values here apply to them, so an agent cannot pick its own
/// reviewers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `postgres://…` (several instances may share it); when unset, an embedded SQLite file
    /// `approvals.db` in the data directory (one instance).
    pub database_url: Option<String>,
    /// How long a request stays pending when its creator does not say.
    #[serde(with = "humantime_serde")]
    pub default_pending_ttl: Duration,
    /// The longest pending time a creator may ask for.
    #[serde(with = "humantime_serde")]
    pub max_pending_ttl: Duration,
    /// Who reviews requests whose creator may not (or did not) name reviewer groups.
    pub default_reviewer_groups: Vec<String>,
    /// How many approvals such requests need.
    pub default_approvals_required: u32,
    /// Refuse requests (and cancellations) without a reason.
    pub require_reason: bool,
    /// Groups that may read every request (auditors, on-call leads) without reviewing.
    pub viewer_groups: Vec<String>,
    /// The audience a caller's token must be for (a token without audience is for any).
    pub audience: String,
    /// How often the expiry sweeper looks for pending requests past their time, at most.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Where to announce new requests and decisions.
    pub webhooks: Vec<WebhookConfig>,
    /// Server certificate; with `ca` set, clients must present certificates (mutual TLS).
    pub tls: TlsConfig,
    /// Which tokens the standalone binary trusts (`agentgate up` passes authz's verifier).
    pub auth: AuthConfig,
    /// Where every state change is recorded.
    pub audit: AuditConfig,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7405)),
            database_url: None,
            default_pending_ttl: Duration::from_secs(3600),
            max_pending_ttl: Duration::from_secs(24 * 3600),
            default_reviewer_groups: vec!["approvers".into()],
            default_approvals_required: 1,
            require_reason: true,
            viewer_groups: Vec::new(),
            audience: "approvals".into(),
            sweep_interval: Duration::from_secs(1),
            webhooks: Vec::new(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

impl ApprovalsConfig {
    /// The database URL in force: the configured one, or SQLite in `data_dir`.
    pub fn database_url(&self, data_dir: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("approvals.db").display()))
    }

    /// The audit spool path in force.
    pub fn spool_path(&self, data_dir: &Path) -> PathBuf {
        self.audit
            .spool_path
            .clone()
            .unwrap_or_else(|| data_dir.join("approvals-spool.db"))
    }

    /// Checks what serde cannot: values that would make the service useless or unsafe.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_reviewer_groups.is_empty() {
            return Err(
                "approvals.default_reviewer_groups is empty: nobody could review requests made \
                 by agents or people"
                    .into(),
            );
        }
        if self.default_approvals_required == 0
            || self.default_approvals_required > crate::limits::MAX_APPROVALS_REQUIRED
        {
            return Err(format!(
                "approvals.default_approvals_required must be 1..={}",
                crate::limits::MAX_APPROVALS_REQUIRED
            ));
        }
        if self.default_pending_ttl.is_zero() || self.default_pending_ttl > self.max_pending_ttl {
            return Err(
                "approvals.default_pending_ttl must be positive and at most max_pending_ttl".into(),
            );
        }
        if self.sweep_interval.is_zero() {
            return Err("approvals.sweep_interval must be positive".into());
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let uri: http::Uri = w
                .url
                .parse()
                .map_err(|e| format!("approvals.webhooks[{i}].url {:?}: {e}", w.url))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "approvals.webhooks[{i}].url {:?} is not an http:// or https:// URL",
                    w.url
                ));
            }
            if w.max_attempts == 0 {
                return Err(format!(
                    "approvals.webhooks[{i}].max_attempts must be at least 1"
                ));
            }
        }
        Ok(())
    }
}

/// The two webhook payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// CloudEvents 1.0, structured mode (`application/cloudevents+json`).
    Cloudevents,
    /// A Slack incoming-webhook message (`{"text": …, "blocks": …}`).
    Slack,
}

/// One receiver of notifications on create and on decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL to POST to.
    pub url: String,
    pub format: WebhookFormat,
    /// HMAC-SHA256 key for `X-Agentgate-Signature`, as `env:NAME` or `file:PATH` (never the
    /// secret itself, so config files can be shared). Unset: requests are not signed.
    #[serde(default)]
    pub secret: Option<String>,
    /// CA (PEM) that signs the receiver's certificate, for private receivers; by default the
    /// system's roots are trusted.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How long one attempt may take.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before a notification is given up (and logged).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry; doubled after each failure ...
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// ... up to this.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

impl WebhookConfig {
    /// A webhook with default timeout and retry settings.
    pub fn new(url: impl Into<String>, format: WebhookFormat) -> Self {
        WebhookConfig {
            url: url.into(),
            format,
            secret: None,
            ca: None,
            timeout: default_webhook_timeout(),
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// Tokens the standalone `agentgate-approvals` binary accepts: agentgate's own, signed by
/// authz with one of these Ed25519 keys (shared with the audit store's `[audit_store.auth]`).
pub use agentgate_identity::AuthConfig;

/// The audit store this service records state changes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit store's gRPC URL.
    pub endpoint: String,
    /// The local spool; default `approvals-spool.db` in the data directory.
    pub spool_path: Option<PathBuf>,
    /// Client TLS towards the store (`ca`, and `cert` + `key` for mutual TLS).
    pub tls: TlsConfig,
    /// A file holding the service token the recorder presents to the store (kind service),
    /// read again on every connection so a renewed token is picked up — e.g. the file authz
    /// keeps for `authz.recorder_tokens = ["approvals"]`, `DATA_DIR/approvals.recorder.token`.
    /// `agentgate up` hands approvals a token from authz instead.
    pub token_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            endpoint: "http://127.0.0.1:7403".into(),
            spool_path: None,
            tls: TlsConfig::default(),
            token_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(ApprovalsConfig::default().validate(), Ok(()));
        let c = ApprovalsConfig {
            default_reviewer_groups: vec![],
            ..Default::default()
        };
        assert!(
            c.validate()
                .err()
                .unwrap_or_default()
                .contains("default_reviewer_groups")
        );
        let c = ApprovalsConfig {
            webhooks: vec![WebhookConfig::new("ftp://x", WebhookFormat::Slack)],
            ..Default::default()
        };
        assert!(
            c.validate()
                .err()
                .unwrap_or_default()
                .contains("webhooks[0]")
        );
    }

    #[test]
    fn webhook_table_parses_with_defaults() {
        let w: WebhookConfig = serde_json::from_value(serde_json::json!({
            "url": "https://hooks.example.com/x", "format": "cloudevents", "secret": "env:HOOK",
            "initial_backoff": "50ms"
        }))
        .expect("parses");
        assert_eq!(w.format, WebhookFormat::Cloudevents);
        assert_eq!(w.initial_backoff, Duration::from_millis(50));
        assert_eq!(w.max_attempts, 10);
    }
}
