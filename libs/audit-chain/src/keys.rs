//! The store's signing key: generated once, kept in a PKCS#8 PEM file readable by its owner.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{
    DecodePrivateKey, EncodePrivateKey, KeypairBytes, spki::der::pem::LineEnding,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Why the signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("signing key {path}: not an Ed25519 PKCS#8 PEM key ({reason})")]
    Format { path: PathBuf, reason: String },
}

/// A short, stable name for a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Loads and creates the signing key file.
pub struct SigningKeyFile;

impl SigningKeyFile {
    /// Loads the key at `path`, or generates one there (mode 0600) when the file is absent.
    pub fn load_or_generate(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |e: std::io::Error| KeyError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        match std::fs::read_to_string(path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::fill(&mut seed);
                let key = SigningKey::from_bytes(&seed);
                // PKCS#8 v1 (no public key inside): what OpenSSL 3.0 and most tools read.
                let v1 = KeypairBytes {
                    secret_key: key.to_bytes(),
                    public_key: None,
                };
                let pem = v1
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| KeyError::Format {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                write_private(path, pem.as_bytes()).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_reloaded_identically_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/audit.pem");
        let a = SigningKeyFile::load_or_generate(&path).expect("generate");
        let b = SigningKeyFile::load_or_generate(&path).expect("reload");
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn key_file_is_pkcs8_v1_for_common_tools() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        SigningKeyFile::load_or_generate(&path).expect("generate");
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-in"])
            .arg(&path)
            .args(["-noout", "-text"])
            .output();
        // Where openssl is installed, it must read the key.
        if let Ok(out) = out {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn garbage_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.pem");
        std::fs::write(&path, "nope").expect("write");
        let err = SigningKeyFile::load_or_generate(&path).expect_err("must fail");
        assert!(err.to_string().contains("bad.pem"), "{err}");
    }
}
