//! Service tokens authz signs for agentgate's own services. authz holds the signing key, so
//! it signs these itself — for its own recorder, for services in the same process
//! (`agentgate up`), and as files for services beside it that share its data directory.
//!
//! Two kinds, both for subject `service:<name>`, kind SERVICE, short-lived and renewed at half
//! their lifetime:
//! - recorder tokens (`authz.recorder_tokens`, `<name>.recorder.token`): audience
//!   `audit-store` only, so a service that only records (approvals) holds nothing else;
//! - service tokens (`authz.service_tokens`, `<name>.service.token`): no audience, for a proxy
//!   that opens sessions at authz, files approval requests and records.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentgate_identity::{AUDIT_STORE_AUDIENCE, TokenError, TokenIssuer, TokenRequest};
use agentgate_proto::common::v1::PrincipalKind;

/// The file authz keeps a recorder token in for service `name` (see `authz.recorder_tokens`).
pub fn recorder_token_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.recorder.token"))
}

/// The file authz keeps a service token in for service `name` (see `authz.service_tokens`).
pub fn service_token_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.service.token"))
}

/// Checks a name of `authz.recorder_tokens` or `authz.service_tokens` (`table` names which,
/// for the message): it becomes part of a file name and a subject.
pub fn check_service_name(table: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "authz.{table}: {name:?} must be 1-64 of [a-z0-9_-] (it names a file and the subject service:<name>)"
        ))
    }
}

/// A renewing source of one service's token; also an [`agentgate_identity::TokenSource`].
pub struct ServiceTokens {
    issuer: Arc<TokenIssuer>,
    subject: String,
    /// Empty: any agentgate service accepts it.
    audience: Vec<String>,
    ttl: Duration,
    /// The token handed out now, and when to sign the next one.
    current: Mutex<Option<(String, SystemTime)>>,
}

impl ServiceTokens {
    /// Recorder tokens for `service:<service>` (audience `audit-store`) lasting `ttl` (at
    /// least one minute).
    pub fn recorder(issuer: Arc<TokenIssuer>, service: &str, ttl: Duration) -> ServiceTokens {
        ServiceTokens::with_audience(issuer, service, ttl, vec![AUDIT_STORE_AUDIENCE.to_owned()])
    }

    /// Service tokens for `service:<service>` that every agentgate service accepts, lasting
    /// `ttl` (at least one minute): for a proxy, which calls authz, approvals and the store.
    pub fn service(issuer: Arc<TokenIssuer>, service: &str, ttl: Duration) -> ServiceTokens {
        ServiceTokens::with_audience(issuer, service, ttl, Vec::new())
    }

    fn with_audience(
        issuer: Arc<TokenIssuer>,
        service: &str,
        ttl: Duration,
        audience: Vec<String>,
    ) -> ServiceTokens {
        ServiceTokens {
            issuer,
            subject: format!("service:{service}"),
            audience,
            ttl: ttl.max(Duration::from_secs(60)),
            current: Mutex::new(None),
        }
    }

    /// The current token, signed anew once half its lifetime has passed.
    pub fn current(&self) -> Result<String, TokenError> {
        let now = SystemTime::now();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, renew_at)) = current.as_ref()
            && now < *renew_at
        {
            return Ok(token.clone());
        }
        let (token, _) = self.issuer.issue(&TokenRequest {
            subject: self.subject.clone(),
            kind: PrincipalKind::Service,
            groups: Vec::new(),
            audience: self.audience.clone(),
            ttl: self.ttl,
        })?;
        *current = Some((token.clone(), now + self.ttl / 2));
        Ok(token)
    }

    /// How often a holder should refresh what it keeps of the token (half its lifetime).
    pub fn renew_every(&self) -> Duration {
        self.ttl / 2
    }
}

impl agentgate_identity::TokenSource for ServiceTokens {
    fn token(&self) -> Result<String, String> {
        self.current()
            .map_err(|e| format!("signing a token for {}: {e}", self.subject))
    }
}

/// Writes each service's token file now (so a bad data directory fails the start), then
/// keeps them fresh in the background.
pub(crate) fn keep_files_fresh(
    files: Vec<(ServiceTokens, PathBuf)>,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    if files.is_empty() {
        return Ok(None);
    }
    for (tokens, path) in &files {
        write(tokens, path)?;
    }
    let every = files
        .iter()
        .map(|(t, _)| t.renew_every())
        .min()
        .unwrap_or(Duration::from_secs(60));
    Ok(Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            for (tokens, path) in &files {
                if let Err(e) = write(tokens, path) {
                    tracing::error!(path = %path.display(), error = %e, "cannot renew a service token file; the service's calls fail and its events wait in its spool once the old token expires");
                }
            }
        }
    })))
}

fn write(tokens: &ServiceTokens, path: &Path) -> std::io::Result<()> {
    let token = tokens
        .current()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    crate::write_private(path, format!("{token}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Arc<TokenIssuer> {
        Arc::new(
            TokenIssuer::new(
                &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
                "agentgate",
            )
            .expect("issuer"),
        )
    }

    #[test]
    fn tokens_are_for_the_audit_store_only_and_reused_until_half_life() {
        let issuer = issuer();
        let tokens = ServiceTokens::recorder(issuer.clone(), "approvals", Duration::from_secs(600));
        let t = tokens.current().expect("token");
        assert_eq!(tokens.current().expect("token"), t, "reused");
        let claims = issuer
            .verifier()
            .verify(&t, Some(AUDIT_STORE_AUDIENCE))
            .expect("valid");
        assert_eq!(claims.sub, "service:approvals");
        assert_eq!(claims.kind, "service");
        assert!(issuer.verifier().verify(&t, Some("approvals")).is_err());
        // Past half its lifetime, a new one is signed.
        *tokens.current.lock().expect("lock") = Some((t.clone(), SystemTime::now()));
        assert_ne!(tokens.current().expect("token"), t);
    }

    #[test]
    fn service_tokens_open_every_service() {
        let issuer = issuer();
        let tokens = ServiceTokens::service(issuer.clone(), "pg-proxy", Duration::from_secs(600));
        let t = tokens.current().expect("token");
        for audience in [AUDIT_STORE_AUDIENCE, "approvals", "authz"] {
            let claims = issuer
                .verifier()
                .verify(&t, Some(audience))
                .expect("valid for every service");
            assert_eq!(claims.sub, "service:pg-proxy");
            assert_eq!(claims.kind, "service");
        }
    }

    #[test]
    fn service_names_are_checked() {
        assert!(check_service_name("recorder_tokens", "approvals").is_ok());
        assert!(check_service_name("service_tokens", "pg-proxy_2").is_ok());
        for bad in ["", "../x", "A", "a b", "a/b"] {
            let e = check_service_name("service_tokens", bad).expect_err(bad);
            assert!(e.starts_with("authz.service_tokens:"), "{e}");
        }
    }
}
