//! External workload identities: tokens of configured OIDC issuers, verified against the
//! issuer's published keys (JWKS), which are cached and fetched again when a token names a
//! key id the cache does not know (at most once per `REFRESH_FLOOR`, so a stream of forged
//! key ids cannot turn authz into a traffic generator).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentgate_identity::{TokenError, kind_from_str};
use agentgate_proto::common::v1::Principal;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::OidcIssuerConfig;

/// Fewest seconds between two JWKS fetches of one issuer.
const REFRESH_FLOOR: Duration = Duration::from_secs(2);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
}

/// One trusted external issuer.
pub struct OidcIssuer {
    config: OidcIssuerConfig,
    keys: Mutex<Keys>,
    refresh: tokio::sync::Mutex<()>,
    client: HttpsClient,
}

impl OidcIssuer {
    pub fn new(config: OidcIssuerConfig) -> anyhow::Result<OidcIssuer> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(OidcIssuer {
            config,
            keys: Mutex::new(Keys {
                by_kid: HashMap::new(),
                fetched_at: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Verifies an external token and maps its claims to a principal; also returns its
    /// expiry (µs since the epoch).
    pub async fn verify(&self, token: &str) -> Result<(Principal, i64), TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(TokenError::UnsupportedAlgorithm(format!(
                "{:?}",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Malformed("no key id (kid)".into()))?;
        let (key, alg) = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await;
                self.key(&kid).ok_or(TokenError::UnknownKeyId(kid))?
            }
        };
        if alg != header.alg {
            return Err(TokenError::UnsupportedAlgorithm(format!(
                "{:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => TokenError::BadSignature,
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidIssuer => TokenError::WrongIssuer,
                    K::InvalidAudience => TokenError::WrongAudience(self.config.audience.clone()),
                    _ => TokenError::Malformed(e.to_string()),
                }
            })?;
        let claims = data.claims;
        let subject = claims
            .get(&self.config.subject_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 200)
            .ok_or_else(|| {
                TokenError::Malformed(format!("claim {:?} missing", self.config.subject_claim))
            })?;
        let mut groups = self.config.groups.clone();
        if let Some(claim) = &self.config.groups_claim
            && let Some(list) = claims.get(claim).and_then(|v| v.as_array())
        {
            groups.extend(
                list.iter()
                    .filter_map(|g| g.as_str())
                    .take(64)
                    .map(str::to_owned),
            );
        }
        let exp = claims
            .get("exp")
            .and_then(|e| e.as_i64())
            .unwrap_or_default()
            * 1_000_000;
        let principal = Principal {
            subject: format!("{}{subject}", self.config.subject_prefix),
            kind: kind_from_str(&self.config.kind) as i32,
            groups,
            issuer: self.config.issuer.clone(),
            token_id: claims
                .get("jti")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned(),
        };
        Ok((principal, exp))
    }

    fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys.lock().ok()?.by_kid.get(kid).cloned()
    }

    /// Fetches the JWKS again, unless it was fetched within `REFRESH_FLOOR`.
    async fn refresh(&self) {
        let _one_at_a_time = self.refresh.lock().await;
        if let Ok(keys) = self.keys.lock()
            && keys.fetched_at.is_some_and(|t| t.elapsed() < REFRESH_FLOOR)
        {
            return;
        }
        match self.fetch().await {
            Ok(by_kid) => {
                if let Ok(mut keys) = self.keys.lock() {
                    keys.by_kid = by_kid;
                    keys.fetched_at = Some(Instant::now());
                }
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, url = %self.config.jwks_url, error = %e, "JWKS fetch failed");
                if let Ok(mut keys) = self.keys.lock() {
                    keys.fetched_at = Some(Instant::now());
                }
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, (DecodingKey, Algorithm)>> {
        let uri: http::Uri = self.config.jwks_url.parse()?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.get(uri)).await??;
        if !response.status().is_success() {
            anyhow::bail!("HTTP {}", response.status());
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading JWKS: {e}"))?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match jwk.common.key_algorithm {
                Some(a) => match format!("{a:?}").parse::<Algorithm>() {
                    Ok(alg) => alg,
                    Err(_) => continue,
                },
                None => match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => continue,
                },
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, (key, alg));
            }
        }
        Ok(keys)
    }
}

/// The unverified `iss` of a JWT, to pick which verifier to use; never trusted otherwise.
pub fn peek_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_owned)
}
