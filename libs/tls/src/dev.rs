//! A development CA: everything `agentgate dev certs` needs to turn on mutual TLS between the
//! services of one machine without an external PKI.
//!
//! Layout of the directory (all PEM):
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `ca.pem` | the CA certificate, the `ca` of every service | 0644 |
//! | `ca-key.pem` | the CA private key | 0600 |
//! | `<service>.pem` | the service certificate (server *and* client auth) | 0644 |
//! | `<service>-key.pem` | the service private key | 0600 |
//!
//! Regenerating keeps an existing CA (`ca.pem` + `ca-key.pem`) and signs new service
//! certificates with it, so certificates issued earlier (and copies of `ca.pem` handed to
//! clients) stay valid. Delete both CA files to start a new CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::pem::{parse_certs, parse_private_key, read_file};
use crate::{TlsConfig, TlsError, crypto_provider};

/// How long a new development CA is valid: long, so regenerating service certificates never
/// forces every client to fetch a new `ca.pem`.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a development service certificate is valid; rerun the generator to renew.
const SERVICE_VALIDITY: Duration = Duration::days(365);
/// Backdating of `not_before`, so a peer whose clock is slightly behind accepts a fresh cert.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// The files [`generate_dev_certs`] wrote (or kept), so the caller can print them or put them
/// into a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    /// The directory everything is in.
    pub dir: PathBuf,
    /// `dir/ca.pem`: the `ca` of every service's [`TlsConfig`].
    pub ca_cert: PathBuf,
    /// `dir/ca-key.pem`: keep it private; it signs every service certificate.
    pub ca_key: PathBuf,
    /// `true` when this call created the CA, `false` when it reused an existing one.
    pub ca_created: bool,
    /// One entry per requested service, in the order given.
    pub services: Vec<ServiceCert>,
}

/// The certificate and key of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCert {
    /// The service name (also a DNS SAN of the certificate).
    pub name: String,
    /// `dir/<name>.pem`.
    pub cert: PathBuf,
    /// `dir/<name>-key.pem`.
    pub key: PathBuf,
}

impl DevCerts {
    /// The generated files of `service`, if it was part of the call.
    pub fn service(&self, service: &str) -> Option<&ServiceCert> {
        self.services.iter().find(|s| s.name == service)
    }

    /// A ready [`TlsConfig`] for `service` (its cert and key, the dev CA as `ca`): mutual TLS as
    /// a server, a verifying client with a client certificate as a client.
    pub fn tls_config(&self, service: &str) -> Option<TlsConfig> {
        self.service(service).map(|s| TlsConfig {
            cert: Some(s.cert.clone()),
            key: Some(s.key.clone()),
            ca: Some(self.ca_cert.clone()),
        })
    }
}

/// Writes a development CA and one certificate per service into `dir` (created if missing,
/// mode 0700).
///
/// Each service certificate is valid for server and client authentication (one certificate per
/// service serves its gRPC API and calls the others) with the SANs `<name>`, `localhost`,
/// `127.0.0.1` and `::1`, so it verifies both by service name (docker-compose, Kubernetes
/// service names) and on loopback. Private keys are ECDSA P-256, written with mode 0600.
///
/// An existing CA in `dir` is reused (see the module docs); a half CA (one of the two files
/// missing) is an error rather than silently replaced, since replacing it would invalidate
/// every certificate handed out before. Service names must be non-empty, made of ASCII
/// letters, digits, `-` and `.`, and not `ca`.
pub fn generate_dev_certs(dir: &Path, services: &[&str]) -> Result<DevCerts, TlsError> {
    for name in services {
        check_service_name(name)?;
    }
    create_private_dir(dir)?;

    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    let now = OffsetDateTime::now_utc();
    let (issuer, ca_created) = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => (load_ca(&ca_cert, &ca_key)?, false),
        (false, false) => (create_ca(&ca_cert, &ca_key, now)?, true),
        (true, false) | (false, true) => {
            let (present, missing) = if ca_cert.exists() {
                (&ca_cert, &ca_key)
            } else {
                (&ca_key, &ca_cert)
            };
            return Err(TlsError::Config(format!(
                "{} exists but {} does not: restore the missing file, or delete {} to create a \
                 new CA (which invalidates every certificate it signed)",
                present.display(),
                missing.display(),
                present.display()
            )));
        }
    };

    let mut written = Vec::with_capacity(services.len());
    for name in services {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        let (cert_pem, key_pem) = service_cert(name, &issuer, now)?;
        write_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
        written.push(ServiceCert {
            name: (*name).to_owned(),
            cert: cert_path,
            key: key_path,
        });
    }

    Ok(DevCerts {
        dir: dir.to_path_buf(),
        ca_cert,
        ca_key,
        ca_created,
        services: written,
    })
}

fn check_service_name(name: &str) -> Result<(), TlsError> {
    let invalid = |reason: &str| {
        Err(TlsError::Config(format!(
            "invalid service name {name:?} for a development certificate: {reason}"
        )))
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name == "ca" {
        return invalid("\"ca\" is the CA's own file name");
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) {
        return invalid("it must start and end with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return invalid("use ASCII letters, digits, '-' and '.' only");
    }
    Ok(())
}

fn generate_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TlsError {
    let what = what.into();
    move |error| TlsError::Generate { what, error }
}

fn create_ca(
    cert_path: &Path,
    key_path: &Path,
    now: OffsetDateTime,
) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let what = "the development CA";
    let key = KeyPair::generate().map_err(generate_error(what))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate_error(what))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A unique subject: verifiers find the issuer by name, so two development CAs with the same
    // name would make a foreign certificate fail as "bad signature" instead of "unknown issuer".
    let created = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp_nanos().to_string());
    params.distinguished_name.push(
        DnType::CommonName,
        format!("agentgate development CA {created}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "agentgate");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key).map_err(generate_error(what))?;
    // Key first: a crash between the two writes leaves a key without a certificate, which the
    // next run reports instead of silently creating a second CA.
    write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issuer::new(params, key))
}

fn load_ca(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let cert_bytes = read_file(cert_path)?;
    let key_bytes = read_file(key_path)?;
    let certs = parse_certs(cert_path, &cert_bytes)?;
    let key_der = parse_private_key(key_path, &key_bytes)?;

    // Refuse a CA key that does not belong to the CA certificate: everything signed with it
    // would fail verification with a confusing "unknown issuer" much later.
    rustls::sign::CertifiedKey::from_der(certs.clone(), key_der, &crypto_provider()).map_err(
        |e| TlsError::Identity {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason: e.to_string(),
        },
    )?;

    let key_pem = std::str::from_utf8(&key_bytes).map_err(|_| TlsError::Invalid {
        path: key_path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Invalid {
        path: key_path.to_path_buf(),
        reason: format!("not a usable CA key: {e}"),
    })?;
    let Some(ca_der) = certs.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    };
    Issuer::from_ca_cert_der(ca_der, key).map_err(|e| TlsError::Invalid {
        path: cert_path.to_path_buf(),
        reason: format!("not a usable CA certificate: {e}"),
    })
}

/// Returns `(certificate PEM, private key PEM)` for `name`, signed by `issuer`.
fn service_cert(
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    now: OffsetDateTime,
) -> Result<(String, String), TlsError> {
    let what = format!("the certificate of {name}");
    let key = KeyPair::generate().map_err(generate_error(what.clone()))?;
    let sans = vec![
        name.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = CertificateParams::new(sans).map_err(generate_error(what.clone()))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "agentgate");
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + SERVICE_VALIDITY;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(generate_error(what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|error| TlsError::Write {
        path: dir.to_path_buf(),
        error,
    })
}

/// Writes `contents` to `path` with `mode` through a temporary file and a rename, so a reader
/// never sees half a key and a key file is never world-readable, not even briefly.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;

    let write_error = |error| TlsError::Write {
        path: path.to_path_buf(),
        error,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_error)?;
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_error(error));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_files_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let certs = generate_dev_certs(&out, &["authz", "audit-store"]).unwrap();
        assert!(certs.ca_created);
        assert_eq!(certs.ca_cert, out.join("ca.pem"));
        assert_eq!(certs.ca_key, out.join("ca-key.pem"));
        let authz = certs.service("authz").unwrap();
        assert_eq!(authz.cert, out.join("authz.pem"));
        assert_eq!(authz.key, out.join("authz-key.pem"));
        for file in [
            "ca.pem",
            "ca-key.pem",
            "authz.pem",
            "authz-key.pem",
            "audit-store.pem",
        ] {
            assert!(out.join(file).is_file(), "{file}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&out.join("ca-key.pem")), 0o600);
            assert_eq!(mode(&out.join("authz-key.pem")), 0o600);
            assert_eq!(mode(&out.join("audit-store-key.pem")), 0o600);
            assert_eq!(mode(&out.join("authz.pem")), 0o644);
            assert_eq!(mode(&out), 0o700);
        }
        // No temporary files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn regenerating_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate_dev_certs(dir.path(), &["authz"]).unwrap();
        let ca_before = std::fs::read(&first.ca_cert).unwrap();
        let cert_before = std::fs::read(dir.path().join("authz.pem")).unwrap();
        let second = generate_dev_certs(dir.path(), &["authz", "approvals"]).unwrap();
        assert!(!second.ca_created);
        assert_eq!(std::fs::read(&second.ca_cert).unwrap(), ca_before);
        assert_ne!(
            std::fs::read(dir.path().join("authz.pem")).unwrap(),
            cert_before,
            "service certificates are reissued"
        );
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate_dev_certs(dir.path(), &[]).unwrap();
        std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        let err = generate_dev_certs(dir.path(), &["authz"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.pem exists but"), "{err}");
        assert!(err.contains("ca-key.pem does not"), "{err}");
    }

    #[test]
    fn a_foreign_ca_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_dev_certs(a.path(), &[]).unwrap();
        generate_dev_certs(b.path(), &[]).unwrap();
        std::fs::copy(b.path().join("ca-key.pem"), a.path().join("ca-key.pem")).unwrap();
        let err = generate_dev_certs(a.path(), &["authz"])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("certificate "), "{err}");
        assert!(err.contains("ca-key.pem"), "{err}");
    }

    #[test]
    fn bad_service_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "ca", "../etc", "a/b", "-x", "with space"] {
            let err = generate_dev_certs(dir.path(), &[name]).unwrap_err();
            assert!(
                err.to_string().contains("invalid service name"),
                "{name}: {err}"
            );
        }
    }
}
