//! Settings of authz (the `[authz]` table of the deployment's TOML file), including the
//! connection catalog and the external token issuers it trusts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentgate_tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// How authz listens, stores, signs and decides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    pub listen: SocketAddr,
    /// `postgres://…`; unset: SQLite `authz.db` in the data directory.
    pub database_url: Option<String>,
    /// The `iss` of agentgate tokens.
    pub issuer: String,
    /// Ed25519 token signing key (PKCS#8 PEM), generated when absent;
    /// default `authz-signing-key.pem` in the data directory.
    pub signing_key: Option<PathBuf>,
    /// The Cedar policy file; unset: `policy.cedar` in the data directory, and when that
    /// does not exist either, nothing is permitted.
    pub policy: Option<PathBuf>,
    /// How often the policy file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub policy_reload_interval: Duration,
    /// Longest lifetime of a token `IssueToken` signs.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
    /// Longest lifetime of a token `ExchangeToken` signs.
    #[serde(with = "humantime_serde")]
    pub exchange_token_ttl: Duration,
    /// The group whose members may issue and revoke tokens and grants.
    pub admin_group: String,
    /// Lifetime of the bootstrap admin token written to the data directory.
    #[serde(with = "humantime_serde")]
    pub bootstrap_admin_ttl: Duration,
    /// The approvals service, for just-in-time access requests.
    pub approvals_url: Option<String>,
    /// The audit store authz records its decisions to (with a service token it signs itself).
    pub audit_url: Option<String>,
    /// Lifetime of the service tokens authz signs for audit recorders: its own, those of
    /// services in the same process (`agentgate up`), and the `recorder_tokens` files. Each
    /// is renewed at half its lifetime; the store ends a stream when its token expires.
    #[serde(with = "humantime_serde")]
    pub recorder_token_ttl: Duration,
    /// Services beside authz, sharing its data directory, that record to the audit store
    /// (e.g. a standalone approvals): for each name authz keeps a token for
    /// `service:<name>` (kind service, audience `audit-store`) in
    /// `DATA_DIR/<name>.recorder.token` (mode 0600), renewed at half its lifetime. Point the
    /// service's token file at it (`approvals.audit.token_file`).
    pub recorder_tokens: Vec<String>,
    /// Proxies beside authz, sharing its data directory (docker-compose): for each name
    /// authz keeps a token for `service:<name>` (kind service, accepted by authz, approvals
    /// and the audit store) in `DATA_DIR/<name>.service.token` (mode 0600), renewed at half
    /// its lifetime. Point the proxy's `service_token_file` at it.
    pub service_tokens: Vec<String>,
    /// Lifetime of the `service_tokens` files' tokens and of those authz signs for proxies in
    /// the same process. Short, since whoever reads the file holds a proxy's powers.
    #[serde(with = "humantime_serde")]
    pub service_token_ttl: Duration,
    pub tls: TlsConfig,
    /// The connection catalog.
    pub connections: Vec<ConnectionConfig>,
    /// External issuers whose workload tokens may be exchanged (OIDC / JWKS).
    pub oidc_issuers: Vec<OidcIssuerConfig>,
    /// agentgate's SSH user CA key (OpenSSH format), generated when absent; default
    /// `ssh-user-ca` in the data directory. ssh-proxy accepts the certificates it signs.
    pub ssh_ca_key: Option<PathBuf>,
    /// Longest lifetime of an SSH certificate (`agentgate ssh cert`); a certificate never
    /// outlives the token it was signed for either.
    #[serde(with = "humantime_serde")]
    pub max_ssh_cert_ttl: Duration,
    /// SSH public keys registered to principals (ssh-proxy logins without a token).
    pub ssh_keys: Vec<SshKeyConfig>,
    /// How long a session opened with a registered SSH key may last.
    #[serde(with = "humantime_serde")]
    pub ssh_key_session_ttl: Duration,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7404)),
            database_url: None,
            issuer: "agentgate".into(),
            signing_key: None,
            policy: None,
            policy_reload_interval: Duration::from_secs(2),
            max_token_ttl: Duration::from_secs(24 * 3600),
            exchange_token_ttl: Duration::from_secs(15 * 60),
            admin_group: "admin".into(),
            bootstrap_admin_ttl: Duration::from_secs(12 * 3600),
            approvals_url: None,
            audit_url: None,
            recorder_token_ttl: Duration::from_secs(15 * 60),
            recorder_tokens: Vec::new(),
            service_tokens: Vec::new(),
            service_token_ttl: Duration::from_secs(3600),
            tls: TlsConfig::default(),
            connections: Vec::new(),
            oidc_issuers: Vec::new(),
            ssh_ca_key: None,
            max_ssh_cert_ttl: Duration::from_secs(3600),
            ssh_keys: Vec::new(),
            ssh_key_session_ttl: Duration::from_secs(3600),
        }
    }
}

impl AuthzConfig {
    pub fn database_url(&self, data_dir: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("authz.db").display()))
    }

    pub fn signing_key_path(&self, data_dir: &Path) -> PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| data_dir.join("authz-signing-key.pem"))
    }

    pub fn ssh_ca_key_path(&self, data_dir: &Path) -> PathBuf {
        self.ssh_ca_key
            .clone()
            .unwrap_or_else(|| data_dir.join("ssh-user-ca"))
    }

    pub fn policy_path(&self, data_dir: &Path) -> PathBuf {
        self.policy
            .clone()
            .unwrap_or_else(|| data_dir.join("policy.cedar"))
    }
}

/// One entry of the connection catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    pub name: String,
    /// postgres | ssh | http | kubernetes
    pub protocol: String,
    /// host:port, or a URL for http and kubernetes.
    pub upstream: String,
    /// Roles and the upstream identity each maps to.
    pub roles: BTreeMap<String, UpstreamConfig>,
    /// Protocol-specific settings (database, TLS mode, known_hosts entry, ...).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// The upstream identity of a role. The secret is a reference, never the secret itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub user: String,
    /// `env:NAME` or `file:PATH`.
    #[serde(default)]
    pub secret: Option<String>,
}

/// An SSH public key registered to a principal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshKeyConfig {
    /// OpenSSH format: `ssh-ed25519 AAAA... comment`.
    pub public_key: String,
    /// The principal's subject, e.g. `agent:deploy-bot`.
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// agent | human | service
    #[serde(default = "default_kind")]
    pub kind: String,
}

/// An external token issuer and how its claims map to an agentgate principal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerConfig {
    /// The `iss` the tokens carry.
    pub issuer: String,
    /// Where the issuer publishes its keys (JWKS).
    pub jwks_url: String,
    /// The `aud` the tokens must carry.
    pub audience: String,
    /// Claim that names the workload; default `sub`.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Prefix of the agentgate subject, e.g. `workload:ci/` gives `workload:ci/<sub>`.
    #[serde(default)]
    pub subject_prefix: String,
    /// Claim holding a list of groups, if any.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Groups every exchanged token gets.
    #[serde(default)]
    pub groups: Vec<String>,
    /// agent | service
    #[serde(default = "default_kind")]
    pub kind: String,
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_kind() -> String {
    "agent".into()
}

/// Resolves `env:NAME` / `file:PATH` to the secret's bytes.
pub fn resolve_secret(reference: &str) -> Result<Vec<u8>, String> {
    if let Some(name) = reference.strip_prefix("env:") {
        std::env::var(name)
            .map(String::into_bytes)
            .map_err(|_| format!("environment variable {name} is not set"))
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read(path)
            .map(|mut b| {
                while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                    b.pop();
                }
                b
            })
            .map_err(|e| format!("{path}: {e}"))
    } else {
        Err(format!(
            "secret reference {reference:?} must be env:NAME or file:PATH"
        ))
    }
}
