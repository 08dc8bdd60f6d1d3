//! Settings of the audit store (the `[audit_store]` table of the deployment's TOML file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentgate_identity::AuthConfig;
use agentgate_tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// How the audit store listens, stores, signs and retains.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditStoreConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `postgres://…`; when unset, an embedded SQLite file in the data directory.
    pub database_url: Option<String>,
    /// Ed25519 signing key (PKCS#8 PEM); generated on first start when absent.
    /// Defaults to `audit-signing-key.pem` in the data directory.
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint after this many events ...
    pub checkpoint_every: u64,
    /// ... or after this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Keep events at least this long; unset keeps everything.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Largest batch one Ingest message may carry.
    pub max_batch_events: usize,
    /// Server certificate; with `ca` set, clients must present certificates (mutual TLS).
    pub tls: TlsConfig,
    /// Which tokens the standalone binary trusts: authz's public key files. `agentgate up`
    /// passes authz's own authenticator instead, which also knows revocations.
    pub auth: AuthConfig,
}

impl Default for AuditStoreConfig {
    fn default() -> Self {
        AuditStoreConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7403)),
            database_url: None,
            signing_key: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            retention: None,
            max_batch_events: 5000,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl AuditStoreConfig {
    /// The database URL in force: the configured one, or SQLite in `data_dir`.
    pub fn database_url(&self, data_dir: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("audit.db").display()))
    }

    /// The signing key path in force.
    pub fn signing_key_path(&self, data_dir: &Path) -> PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| data_dir.join("audit-signing-key.pem"))
    }
}
