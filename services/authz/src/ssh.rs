//! SSH credentials: agentgate's SSH user CA (it signs short-lived certificates for agents
//! that hold a valid token, and verifies them when ssh-proxy presents one) and public keys
//! registered to principals in the configuration.
//!
//! ssh-proxy proves that the agent holds the private key (the SSH signature of the session);
//! authz decides who the key or certificate is:
//!
//! - a **certificate** is valid when agentgate's CA signed it, it is a user certificate, the
//!   current time is inside its validity window, it names its key id among its principals,
//!   it carries no critical option, and the token it was signed for is not revoked. The
//!   principal comes from the certificate (key id = subject, extensions `groups@agentgate`,
//!   `kind@agentgate`, `token-id@agentgate`); it expires with the certificate.
//! - a **registered key** is valid when its SHA-256 fingerprint is in `authz.ssh_keys`; the
//!   principal is the configured one, and its credential expiry is
//!   `ssh_key_session_ttl` from now (a session on a key ends then).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_proto::common::v1::{Principal, PrincipalKind};
use anyhow::Context as _;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{Fingerprint, LineEnding};
use russh::keys::{Certificate, HashAlg, PrivateKey, PublicKey};

use crate::config::{AuthzConfig, SshKeyConfig};

/// The issuer recorded in principals that an SSH certificate vouched for.
pub const CERT_ISSUER: &str = "agentgate-ssh-ca";
/// Extension carrying the principal's groups (comma-separated).
pub const EXT_GROUPS: &str = "groups@agentgate";
/// Extension carrying the principal kind (agent, human, service).
pub const EXT_KIND: &str = "kind@agentgate";
/// Extension carrying the id of the token the certificate was signed for.
pub const EXT_TOKEN_ID: &str = "token-id@agentgate";
/// Clock skew allowed before a certificate's start.
const BACKDATE: Duration = Duration::from_secs(30);

/// The SSH CA and the registered keys.
pub struct SshIdentities {
    ca: PrivateKey,
    ca_fingerprint: Fingerprint,
    keys: HashMap<String, SshKeyConfig>,
    key_session_ttl: Duration,
    max_cert_ttl: Duration,
}

/// A verified SSH credential.
#[derive(Debug, Clone)]
pub struct SshPrincipal {
    pub principal: Principal,
    /// When the credential stops being valid, µs since the epoch.
    pub expires_at_us: i64,
    /// "ssh_certificate" or "ssh_public_key", for the audit record.
    pub kind: &'static str,
}

fn kind_name(kind: i32) -> &'static str {
    match PrincipalKind::try_from(kind).unwrap_or_default() {
        PrincipalKind::Human => "human",
        PrincipalKind::Service => "service",
        _ => "agent",
    }
}

fn kind_from(name: &str) -> PrincipalKind {
    match name {
        "human" => PrincipalKind::Human,
        "service" => PrincipalKind::Service,
        _ => PrincipalKind::Agent,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl SshIdentities {
    /// Loads the CA key (OpenSSH format; generated, mode 0600, when absent) and indexes the
    /// registered keys.
    pub fn load(config: &AuthzConfig, data_dir: &Path) -> anyhow::Result<SshIdentities> {
        let path = config.ssh_ca_key_path(data_dir);
        let ca = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("authz.ssh_ca_key {}", path.display()))?;
            PrivateKey::from_openssh(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("authz.ssh_ca_key {}: {e}", path.display()))?
        } else {
            let mut seed = [0u8; 32];
            rand::fill(&mut seed);
            let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            key.set_comment("agentgate ssh user ca");
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encoding the SSH CA key: {e}"))?;
            write_private(&path, text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            key
        };
        let public = ca
            .public_key()
            .to_openssh()
            .map_err(|e| anyhow::anyhow!("SSH CA public key: {e}"))?;
        let public_path = data_dir.join(SSH_CA_PUBLIC_FILE);
        std::fs::write(&public_path, format!("{public}\n"))
            .with_context(|| format!("writing {}", public_path.display()))?;
        let mut keys = HashMap::new();
        for k in &config.ssh_keys {
            let parsed = PublicKey::from_openssh(k.public_key.trim()).map_err(|e| {
                anyhow::anyhow!(
                    "authz.ssh_keys: the key of {} does not parse: {e}",
                    k.subject
                )
            })?;
            if k.subject.is_empty() {
                anyhow::bail!("authz.ssh_keys: every key needs a subject");
            }
            keys.insert(parsed.fingerprint(HashAlg::Sha256).to_string(), k.clone());
        }
        Ok(SshIdentities {
            ca_fingerprint: ca.public_key().fingerprint(HashAlg::Sha256),
            ca,
            keys,
            key_session_ttl: config.ssh_key_session_ttl,
            max_cert_ttl: config.max_ssh_cert_ttl,
        })
    }

    /// The CA's public key, OpenSSH format.
    pub fn ca_public_key(&self) -> String {
        self.ca.public_key().to_openssh().unwrap_or_default()
    }

    /// Signs `public_key` for `principal` for `ttl`, capped by the maximum and by
    /// `not_after_us` (the token's expiry). Returns the certificate and its expiry (µs).
    pub fn sign(
        &self,
        public_key: &str,
        principal: &Principal,
        ttl: Duration,
        not_after_us: i64,
    ) -> Result<(String, i64), String> {
        let key = PublicKey::from_openssh(public_key.trim())
            .map_err(|e| format!("the public key does not parse: {e}"))?;
        let now = unix_now();
        let ttl = if ttl.is_zero() {
            self.max_cert_ttl
        } else {
            ttl.min(self.max_cert_ttl)
        };
        let token_end = u64::try_from(not_after_us / 1_000_000).unwrap_or(0);
        let before = (now + ttl.as_secs()).min(token_end);
        if before <= now {
            return Err("the token expires now; a certificate would be born expired".into());
        }
        let mut nonce = [0u8; 32];
        rand::fill(&mut nonce);
        let mut serial = [0u8; 8];
        rand::fill(&mut serial);
        let mut b = Builder::new(
            nonce.to_vec(),
            key.key_data().clone(),
            now.saturating_sub(BACKDATE.as_secs()),
            before,
        )
        .map_err(|e| e.to_string())?;
        let groups = principal.groups.join(",");
        let fill = |b: &mut Builder| -> Result<(), russh::keys::ssh_key::Error> {
            b.serial(u64::from_be_bytes(serial))?
                .cert_type(CertType::User)?
                .key_id(principal.subject.clone())?
                .valid_principal(principal.subject.clone())?
                .extension("permit-pty", "")?
                .extension("permit-port-forwarding", "")?
                .extension("permit-agent-forwarding", "")?
                .extension(EXT_GROUPS, groups.clone())?
                .extension(EXT_KIND, kind_name(principal.kind))?
                .extension(EXT_TOKEN_ID, principal.token_id.clone())?
                .comment(format!("agentgate certificate for {}", principal.subject))?;
            Ok(())
        };
        fill(&mut b).map_err(|e| e.to_string())?;
        let cert = b.sign(&self.ca).map_err(|e| e.to_string())?;
        let text = cert.to_openssh().map_err(|e| e.to_string())?;
        Ok((text, before as i64 * 1_000_000))
    }

    /// Verifies a certificate (OpenSSH format) at `now` (Unix seconds); the caller checks the
    /// token id against revocations.
    pub fn verify_certificate(&self, text: &str, now: u64) -> Result<SshPrincipal, String> {
        let cert = Certificate::from_openssh(text.trim())
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if cert.validate_at(now, [&self.ca_fingerprint]).is_err() {
            return Err(
                if cert.verify_signature().is_ok()
                    && cert.signature_key().fingerprint(HashAlg::Sha256) == self.ca_fingerprint
                {
                    if now >= cert.valid_before() {
                        format!(
                            "the SSH certificate expired at {}; get a new one with `agentgate ssh cert`",
                            humantime::format_rfc3339_seconds(
                                UNIX_EPOCH + Duration::from_secs(cert.valid_before())
                            )
                        )
                    } else {
                        "the SSH certificate is not valid yet".into()
                    }
                } else {
                    "the SSH certificate is not signed by agentgate's SSH CA".into()
                },
            );
        }
        if cert.cert_type() != CertType::User {
            return Err("not a user certificate".into());
        }
        if !cert.critical_options().is_empty() {
            return Err(
                "the certificate carries critical options agentgate does not honour".into(),
            );
        }
        let subject = cert.key_id().to_owned();
        if subject.is_empty() || !cert.valid_principals().iter().any(|p| p == &subject) {
            return Err("the certificate does not name its subject as a principal".into());
        }
        let ext = cert.extensions();
        let groups = ext
            .get(EXT_GROUPS)
            .map(|g| {
                g.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let kind = kind_from(ext.get(EXT_KIND).map(String::as_str).unwrap_or("agent"));
        let token_id = ext.get(EXT_TOKEN_ID).cloned().unwrap_or_default();
        Ok(SshPrincipal {
            principal: Principal {
                subject,
                kind: kind as i32,
                groups,
                issuer: CERT_ISSUER.into(),
                token_id,
            },
            expires_at_us: i64::try_from(cert.valid_before()).unwrap_or(i64::MAX / 2) * 1_000_000,
            kind: "ssh_certificate",
        })
    }

    /// Looks a public key (OpenSSH format) up among the registered keys.
    pub fn verify_key(&self, text: &str, now_us: i64) -> Result<SshPrincipal, String> {
        let key = PublicKey::from_openssh(text.trim())
            .map_err(|e| format!("the public key does not parse: {e}"))?;
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let k = self
            .keys
            .get(&fingerprint)
            .ok_or_else(|| format!("the SSH key {fingerprint} is not registered to anyone"))?;
        Ok(SshPrincipal {
            principal: Principal {
                subject: k.subject.clone(),
                kind: kind_from(&k.kind) as i32,
                groups: k.groups.clone(),
                issuer: "agentgate-ssh-key".into(),
                token_id: format!("sshkey:{fingerprint}"),
            },
            expires_at_us: now_us + self.key_session_ttl.as_micros() as i64,
            kind: "ssh_public_key",
        })
    }
}

/// Where the CA's public key is published (for `@cert-authority` lines and tests).
pub const SSH_CA_PUBLIC_FILE: &str = "ssh-user-ca.pub";

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn identities(dir: &Path, keys: Vec<SshKeyConfig>) -> SshIdentities {
        let config = AuthzConfig {
            ssh_keys: keys,
            ..Default::default()
        };
        SshIdentities::load(&config, dir).unwrap()
    }

    fn agent_key() -> PrivateKey {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        PrivateKey::from(Ed25519Keypair::from_seed(&seed))
    }

    fn principal() -> Principal {
        Principal {
            subject: "agent:bot".into(),
            kind: PrincipalKind::Agent as i32,
            groups: vec!["agents".into(), "ops".into()],
            issuer: "agentgate".into(),
            token_id: "0190-token".into(),
        }
    }

    #[test]
    fn certificates_round_trip_and_carry_the_principal() {
        let dir = tempfile::tempdir().unwrap();
        let ids = identities(dir.path(), Vec::new());
        let key = agent_key();
        let public = key.public_key().to_openssh().unwrap();
        let far = (unix_now() as i64 + 3600) * 1_000_000;
        let (cert, exp) = ids
            .sign(&public, &principal(), Duration::from_secs(600), far)
            .unwrap();
        assert!(exp <= (unix_now() as i64 + 601) * 1_000_000);
        let p = ids.verify_certificate(&cert, unix_now()).unwrap();
        assert_eq!(p.principal.subject, "agent:bot");
        assert_eq!(p.principal.groups, vec!["agents", "ops"]);
        assert_eq!(p.principal.token_id, "0190-token");
        assert_eq!(p.principal.issuer, CERT_ISSUER);
        assert_eq!(p.expires_at_us, exp);
        // The CA key is stable across restarts (same file).
        let again = identities(dir.path(), Vec::new());
        assert!(again.verify_certificate(&cert, unix_now()).is_ok());
        assert_eq!(again.ca_public_key(), ids.ca_public_key());
    }

    #[test]
    fn expired_foreign_and_capped_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ids = identities(dir.path(), Vec::new());
        let key = agent_key();
        let public = key.public_key().to_openssh().unwrap();
        let far = (unix_now() as i64 + 3600) * 1_000_000;
        let (cert, _) = ids
            .sign(&public, &principal(), Duration::from_secs(60), far)
            .unwrap();
        let e = ids.verify_certificate(&cert, unix_now() + 61).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        // Another CA's certificate is refused.
        let other_dir = tempfile::tempdir().unwrap();
        let other = identities(other_dir.path(), Vec::new());
        let (foreign, _) = other
            .sign(&public, &principal(), Duration::from_secs(60), far)
            .unwrap();
        let e = ids.verify_certificate(&foreign, unix_now()).unwrap_err();
        assert!(e.contains("not signed by agentgate"), "{e}");
        // The token's expiry caps the certificate.
        let soon = (unix_now() as i64 + 5) * 1_000_000;
        let (_, exp) = ids
            .sign(&public, &principal(), Duration::from_secs(600), soon)
            .unwrap();
        assert!(exp <= soon);
        // An expired token gets nothing.
        assert!(
            ids.sign(&public, &principal(), Duration::from_secs(600), 0)
                .is_err()
        );
        assert!(ids.verify_certificate("garbage", unix_now()).is_err());
    }

    #[test]
    fn registered_keys_map_to_their_principal() {
        let dir = tempfile::tempdir().unwrap();
        let key = agent_key();
        let public = key.public_key().to_openssh().unwrap();
        let ids = identities(
            dir.path(),
            vec![SshKeyConfig {
                public_key: public.clone(),
                subject: "agent:keyed".into(),
                groups: vec!["agents".into()],
                kind: "agent".into(),
            }],
        );
        let p = ids.verify_key(&public, 1_000_000).unwrap();
        assert_eq!(p.principal.subject, "agent:keyed");
        assert_eq!(p.expires_at_us, 1_000_000 + 3600 * 1_000_000);
        let stranger = agent_key().public_key().to_openssh().unwrap();
        assert!(
            ids.verify_key(&stranger, 0)
                .unwrap_err()
                .contains("not registered")
        );
    }
}
