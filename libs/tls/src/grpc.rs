//! tonic (gRPC) TLS configurations.
//!
//! tonic takes PEM bytes and parses them only when the server starts serving or the channel
//! connects, so a wrong path would surface as a vague transport error. These functions build
//! the equivalent rustls configuration first, purely to validate every file (and the key/cert
//! pair) with this crate's error messages, then hand tonic the same bytes.

use rustls::pki_types::ServerName;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::pem::read_file;
use crate::{TlsConfig, TlsError, rustls_client_config, rustls_server_config};

/// The tonic server TLS configuration for `cfg`, or `None` when `cfg` is entirely empty
/// (plaintext).
///
/// `cert` + `key` are the server identity; `ca`, if set, makes client certificates required
/// (tonic's `client_auth_optional` stays `false`). A `ca` without an identity is an error rather
/// than plaintext: the operator clearly meant TLS.
pub fn grpc_server_tls(cfg: &TlsConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    if cfg.is_empty() {
        return Ok(None);
    }
    let Some((cert_path, key_path)) = cfg.identity()? else {
        return Err(TlsError::Config(
            "`ca` is set but `cert` and `key` are not: a gRPC server needs its own certificate \
             and key to serve TLS"
                .into(),
        ));
    };
    rustls_server_config(cfg)?;

    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read_file(cert_path)?,
        read_file(key_path)?,
    ));
    if let Some(ca) = &cfg.ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_file(ca)?));
    }
    Ok(Some(tls))
}

/// The tonic client TLS configuration for calling `server_name`, or `None` when `cfg` is
/// entirely empty (plaintext).
///
/// `ca` is required and is the only trust anchor; `server_name` is the name the server's
/// certificate must carry (with development certificates: the service name, `localhost`, or
/// `127.0.0.1`), independent of the address dialled. With `cert` + `key` set, the client
/// presents them as its identity (mutual TLS).
pub fn grpc_client_tls(
    cfg: &TlsConfig,
    server_name: &str,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    if cfg.is_empty() {
        return Ok(None);
    }
    ServerName::try_from(server_name).map_err(|e| {
        TlsError::Config(format!(
            "server name {server_name:?} is neither a DNS name nor an IP address: {e}"
        ))
    })?;
    rustls_client_config(cfg)?;

    let mut tls = ClientTlsConfig::new().domain_name(server_name);
    if let Some(ca) = &cfg.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read_file(ca)?));
    }
    if let Some((cert_path, key_path)) = cfg.identity()? {
        tls = tls.identity(Identity::from_pem(
            read_file(cert_path)?,
            read_file(key_path)?,
        ));
    }
    Ok(Some(tls))
}
