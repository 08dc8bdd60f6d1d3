//! TLS for agentgate: one place that turns a [`TlsConfig`] (three file paths) into the
//! rustls and tonic configurations every service needs, plus a development CA.
//!
//! Why a crate of its own: every service talks gRPC to the others over mutual TLS, and the
//! proxies terminate TLS themselves (pg-proxy's `SSLRequest`, http-proxy, k8s-proxy). Doing the
//! file loading, the error messages and the crypto backend choice once keeps them identical.
//!
//! Design choices:
//! - **One crypto backend, aws-lc-rs.** Every config built here names the aws-lc-rs provider
//!   explicitly ([`crypto_provider`]), so it never depends on which provider happens to be the
//!   process default; [`install_crypto_provider`] still installs it as the default for crates
//!   (tonic's server, sqlx, kube) that ask rustls for the process default.
//! - **Mutual TLS is decided by one field.** A server with `ca` set *requires* client
//!   certificates signed by that CA; without `ca` it accepts any client. A client always needs
//!   `ca` to verify the server (no system roots: services only talk to peers of the deployment).
//! - **Errors name the file and what is wrong with it**, because a TLS misconfiguration is
//!   otherwise reported as an opaque handshake failure far from its cause.
//! - **Files are checked eagerly.** tonic only parses PEM at connect/serve time; the
//!   `grpc_*_tls` functions load and validate everything first so a bad path fails at start-up.
//!
//! ```no_run
//! use agentgate_tls::{TlsConfig, grpc_server_tls, install_crypto_provider};
//!
//! install_crypto_provider();
//! let cfg = TlsConfig {
//!     cert: Some("/etc/agentgate/authz.pem".into()),
//!     key: Some("/etc/agentgate/authz-key.pem".into()),
//!     ca: Some("/etc/agentgate/ca.pem".into()),
//! };
//! let server_tls = grpc_server_tls(&cfg)?; // Some(..): mutual TLS, client certs required
//! # Ok::<(), agentgate_tls::TlsError>(())
//! ```

#![warn(missing_docs)]

mod dev;
mod error;
mod grpc;
mod pem;
mod rustls_config;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dev::{DevCerts, ServiceCert, generate_dev_certs};
pub use error::TlsError;
pub use grpc::{grpc_client_tls, grpc_server_tls};
pub use pem::{load_certs, load_private_key, load_roots};
pub use rustls_config::{rustls_client_config, rustls_server_config};

/// Re-exported so callers can name certificate and key types without depending on rustls
/// directly (and so they get the same version this crate uses).
pub use rustls;
/// Re-exported for the proxies: `tokio_rustls::TlsAcceptor::from(rustls_server_config(..)?)`.
pub use tokio_rustls;

/// The TLS settings of one service, as they appear in its TOML section (`[tls]`) or in
/// environment variables: three file paths, all optional.
///
/// - `cert` + `key`: this service's own identity (its certificate chain and private key, PEM).
///   A server needs both to serve TLS; a client with both presents them as its client
///   certificate.
/// - `ca`: the CA (PEM, one or more certificates) that signs the *peers*. On a server, setting
///   it makes client certificates **required** (mutual TLS). On a client, it is the CA used to
///   verify servers.
///
/// Everything `None` (the default) means plaintext, which is what a single-machine development
/// start uses unless `agentgate dev certs` was run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct TlsConfig {
    /// This service's certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) matching `cert`.
    pub key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) that sign the peers: required client certificates on a
    /// server, the trust anchor for servers on a client.
    pub ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether this service has its own identity (`cert` and `key` both set), i.e. whether a
    /// server built from it serves TLS at all.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }

    /// Whether any field is set; a client uses TLS as soon as it has a `ca` to verify servers,
    /// even without an identity of its own.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    /// The `(cert, key)` pair, `None` when neither is set, an error when only one is: half an
    /// identity is always a mistake and should not silently become "no TLS".
    pub fn identity(&self) -> Result<Option<(&Path, &Path)>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert.as_path(), key.as_path()))),
            (None, None) => Ok(None),
            (Some(cert), None) => Err(TlsError::Config(format!(
                "`cert` is set ({}) but `key` is not: set both or neither",
                cert.display()
            ))),
            (None, Some(key)) => Err(TlsError::Config(format!(
                "`key` is set ({}) but `cert` is not: set both or neither",
                key.display()
            ))),
        }
    }
}

/// The rustls crypto provider every configuration of this crate uses: aws-lc-rs.
///
/// Named explicitly (instead of relying on the process default) because two backends in one
/// process make rustls refuse to pick one at run time; see the workspace's dependency notes.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide default rustls provider, once.
///
/// Call it at the top of every `main` (and in tests that start tonic TLS servers): tonic's
/// server, sqlx and kube build their rustls configs from the process default. A second call,
/// or a provider installed earlier by someone else, is not an error and is left in place.
pub fn install_crypto_provider() {
    // `install_default` fails only when a provider is already installed; that is the
    // "second call" case this function promises to ignore.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_needs_cert_and_key() {
        let mut cfg = TlsConfig::default();
        assert!(!cfg.enabled());
        assert!(cfg.is_empty());
        cfg.cert = Some("c.pem".into());
        assert!(!cfg.enabled());
        assert!(cfg.identity().is_err());
        cfg.key = Some("k.pem".into());
        assert!(cfg.enabled());
        assert!(matches!(cfg.identity(), Ok(Some(_))));
    }

    #[test]
    fn half_identity_error_names_the_missing_field() {
        let cfg = TlsConfig {
            key: Some("/x/key.pem".into()),
            ..Default::default()
        };
        let err = cfg
            .identity()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("`key` is set (/x/key.pem) but `cert` is not"),
            "{err}"
        );
    }

    #[test]
    fn install_twice_is_fine() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
