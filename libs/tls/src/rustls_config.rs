//! rustls configurations for code that terminates or originates TLS itself (the proxies).

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use crate::pem::{parse_certs, parse_private_key, parse_roots, read_file};
use crate::{TlsConfig, TlsError, crypto_provider};

/// Builds a rustls server configuration from `cfg`.
///
/// `cert` and `key` are required. With `ca` set, every client must present a certificate
/// signed by that CA (mutual TLS; the handshake fails otherwise); without it, clients are not
/// asked for one. No ALPN protocols are set: a caller that needs some clones the config
/// (`let mut c = (*cfg).clone(); c.alpn_protocols = ...`).
pub fn rustls_server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let Some((cert_path, key_path)) = cfg.identity()? else {
        return Err(TlsError::Config(
            "a TLS server needs `cert` and `key` (its own certificate and private key)".into(),
        ));
    };
    let certs = parse_certs(cert_path, &read_file(cert_path)?)?;
    let key = parse_private_key(key_path, &read_file(key_path)?)?;

    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(format!("aws-lc-rs provider: {e}")))?;
    let builder = match &cfg.ca {
        Some(ca) => {
            let roots = parse_roots(ca, &read_file(ca)?)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Invalid {
                    path: ca.clone(),
                    reason: format!("cannot verify client certificates with this CA: {e}"),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // `with_single_cert` also checks that the key is the certificate's key.
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Identity {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// Builds a rustls client configuration from `cfg`.
///
/// `ca` is required: it is the only trust anchor (services talk to peers of their own
/// deployment, never to the public web, so system roots would only widen who can impersonate
/// a peer). With `cert` and `key` set the client presents them when the server asks (mutual
/// TLS). The server name to verify is given per connection (`tokio_rustls::TlsConnector::
/// connect(server_name, ..)`), not here.
pub fn rustls_client_config(cfg: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let identity = cfg.identity()?;
    let Some(ca) = &cfg.ca else {
        return Err(TlsError::Config(
            "a TLS client needs `ca` (the CA that signs the servers it connects to)".into(),
        ));
    };
    let roots = parse_roots(ca, &read_file(ca)?)?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(format!("aws-lc-rs provider: {e}")))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_path, key_path)) => {
            let certs = parse_certs(cert_path, &read_file(cert_path)?)?;
            let key = parse_private_key(key_path, &read_file(key_path)?)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Identity {
                    cert: cert_path.to_path_buf(),
                    key: key_path.to_path_buf(),
                    reason: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
