//! Loading PEM files into rustls types, with errors that name the file.
//!
//! PEM parsing is rustls-pki-types' own (`PemObject`), the maintained successor of
//! rustls-pemfile, reached through the `rustls::pki_types` re-export.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// Reads a whole file, mapping the I/O error to one that names the path.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(error) => TlsError::Read {
            path: path.to_path_buf(),
            error,
        },
        other => TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not valid PEM: {other}"),
        },
    }
}

/// Parses every certificate of PEM `bytes` that were read from `path`.
pub(crate) fn parse_certs(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Parses the first private key of PEM `bytes` that were read from `path`.
pub(crate) fn parse_private_key(
    path: &Path,
    bytes: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => pem_error(path, other),
    })
}

/// Builds a root store from PEM `bytes` read from `path`; every certificate must be usable
/// as a trust anchor, so a typo'd or wrong CA file fails here rather than at the first
/// handshake.
pub(crate) fn parse_roots(path: &Path, bytes: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(path, bytes)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Loads a certificate chain (PEM, leaf first) from `path`.
///
/// Public so that code building its own rustls configuration (say, a proxy that needs ALPN or
/// SNI-based selection) gets the same loading and the same error messages.
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = path.as_ref();
    parse_certs(path, &read_file(path)?)
}

/// Loads the first private key (PEM: PKCS#8, PKCS#1 or SEC1) from `path`.
pub fn load_private_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = path.as_ref();
    parse_private_key(path, &read_file(path)?)
}

/// Loads the CA certificate(s) (PEM) at `path` into a rustls root store.
pub fn load_roots(path: impl AsRef<Path>) -> Result<RootCertStore, TlsError> {
    let path = path.as_ref();
    parse_roots(path, &read_file(path)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_path_and_the_cause() {
        let err = load_certs("/nonexistent/agentgate/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("reading /nonexistent/agentgate/ca.pem: No such file"),
            "{err}"
        );
    }

    #[test]
    fn empty_files_say_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "just text\n").unwrap();
        let err = load_certs(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "no certificate in {} (expected a PEM \"BEGIN CERTIFICATE\" block)",
                path.display()
            )
        );
        let err = load_private_key(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("no private key in {}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn corrupt_pem_is_reported_as_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certs(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not valid PEM", path.display())),
            "{err}"
        );
    }
}
