//! agentgate's own access tokens and the authentication of callers.
//!
//! authz signs short-lived tokens as JWTs with Ed25519 (`alg: EdDSA`, a `kid` naming the
//! key). Everything that accepts a token verifies it with [`TokenVerifier`], which refuses
//! every algorithm but EdDSA (so `alg: none` and HMAC-with-the-public-key tricks cannot work),
//! unknown key ids, and tokens outside their validity, audience or issuer, each with its own
//! [`TokenError`] so the refusal can be recorded with its reason.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_proto::common::v1::{Principal, PrincipalKind};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

mod token_source;
pub use token_source::{FixedToken, TokenFile, TokenSource};

/// The audience of tokens meant for the audit store. The store refuses a token whose
/// audience list does not name it (a token without audience is for any service), so a
/// recorder's token, issued for this audience only, opens nothing else that checks audience.
pub const AUDIT_STORE_AUDIENCE: &str = "audit-store";

/// The claims of an agentgate token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    /// "agent", "human" or "service".
    pub kind: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Which proxies or connections may accept it; empty means any.
    #[serde(default)]
    pub aud: Vec<String>,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    /// Token id, for revocation.
    pub jti: String,
}

impl Claims {
    /// The verified identity these claims describe.
    pub fn principal(&self) -> Principal {
        Principal {
            subject: self.sub.clone(),
            kind: kind_from_str(&self.kind) as i32,
            groups: self.groups.clone(),
            issuer: self.iss.clone(),
            token_id: self.jti.clone(),
        }
    }

    /// When the token stops being valid.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

/// "agent" → Agent, and so on; anything else is Unspecified.
pub fn kind_from_str(kind: &str) -> PrincipalKind {
    match kind {
        "agent" => PrincipalKind::Agent,
        "human" => PrincipalKind::Human,
        "service" => PrincipalKind::Service,
        _ => PrincipalKind::Unspecified,
    }
}

/// The claim value of a principal kind.
pub fn kind_to_str(kind: PrincipalKind) -> &'static str {
    match kind {
        PrincipalKind::Agent => "agent",
        PrincipalKind::Human => "human",
        PrincipalKind::Service => "service",
        PrincipalKind::Unspecified => "unspecified",
    }
}

/// Why a token was refused. The message is safe to show the caller and to record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted (only EdDSA)")]
    UnsupportedAlgorithm(String),
    #[error("token signed by unknown key id {0:?}")]
    UnknownKeyId(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token is not for {0:?}")]
    WrongAudience(String),
    #[error("token issuer is not trusted")]
    WrongIssuer,
    #[error("token {0} was revoked")]
    Revoked(String),
    /// Not a verdict on the token: it cannot be checked right now (e.g. a
    /// [`LateAuthenticator`] not set yet). Callers answer UNAVAILABLE, so clients retry.
    #[error("cannot verify tokens yet: {0}")]
    Unavailable(String),
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub subject: String,
    pub kind: PrincipalKind,
    pub groups: Vec<String>,
    pub audience: Vec<String>,
    pub ttl: Duration,
}

/// A short, stable key id: the first 16 hex digits of SHA-256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Signs agentgate tokens.
pub struct TokenIssuer {
    encoding: EncodingKey,
    public: VerifyingKey,
    kid: String,
    issuer: String,
}

impl TokenIssuer {
    /// An issuer named `issuer` (the `iss` claim) signing with `key`.
    pub fn new(key: &SigningKey, issuer: impl Into<String>) -> Result<TokenIssuer, TokenError> {
        let der = key
            .to_pkcs8_der()
            .map_err(|e| TokenError::Malformed(format!("signing key: {e}")))?;
        Ok(TokenIssuer {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public: key.verifying_key(),
            kid: key_id(&key.verifying_key()),
            issuer: issuer.into(),
        })
    }

    /// Signs a token; returns it with its claims.
    pub fn issue(&self, request: &TokenRequest) -> Result<(String, Claims), TokenError> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: request.subject.clone(),
            kind: kind_to_str(request.kind).to_owned(),
            groups: request.groups.clone(),
            aud: request.audience.clone(),
            exp: now + request.ttl.as_secs().max(1),
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        Ok((token, claims))
    }

    /// A verifier that trusts this issuer's key.
    pub fn verifier(&self) -> TokenVerifier {
        let mut v = TokenVerifier::new(self.issuer.clone());
        v.add_key(&self.public);
        v
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK set, for services that verify tokens locally.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
            "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(self.public.as_bytes()),
        }]})
    }
}

/// Verifies agentgate tokens against a set of Ed25519 public keys (several during a key
/// rotation), one trusted issuer, and optionally an audience.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    issuer: String,
    /// Clock skew tolerated on exp and nbf.
    pub leeway: Duration,
}

impl TokenVerifier {
    pub fn new(issuer: impl Into<String>) -> TokenVerifier {
        TokenVerifier {
            keys: HashMap::new(),
            issuer: issuer.into(),
            leeway: Duration::from_secs(5),
        }
    }

    /// Trusts `key` under its key id.
    pub fn add_key(&mut self, key: &VerifyingKey) {
        self.keys
            .insert(key_id(key), DecodingKey::from_ed_der(key.as_bytes()));
    }

    /// Checks algorithm, key id, signature, validity window, issuer and (when given) that
    /// `audience` is among the token's audiences; a token with no audience is for any.
    pub fn verify(&self, token: &str, audience: Option<&str>) -> Result<Claims, TokenError> {
        let alg = header_alg(token)?;
        if alg != "EdDSA" {
            return Err(TokenError::UnsupportedAlgorithm(alg));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header.kid.unwrap_or_default();
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKeyId(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        validation.set_issuer(&[&self.issuer]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::BadSignature,
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidIssuer => TokenError::WrongIssuer,
                _ => TokenError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        if let Some(aud) = audience
            && !claims.aud.is_empty()
            && !claims.aud.iter().any(|a| a == aud)
        {
            return Err(TokenError::WrongAudience(aud.to_owned()));
        }
        Ok(claims)
    }
}

/// Turns a presented token into a verified principal. [`TokenVerifier`] checks signature and
/// validity locally; authz's implementation also checks revocation. Services take an
/// `Arc<dyn Authenticator>` so tests and `agentgate up` can wire either.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// `audience`: the service or connection the token must be for, if any.
    async fn authenticate(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Principal, TokenError>;
}

#[tonic::async_trait]
impl Authenticator for TokenVerifier {
    async fn authenticate(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Principal, TokenError> {
        self.verify(token, audience).map(|c| c.principal())
    }
}

/// Tokens a standalone service accepts (the `[<service>.auth]` table): agentgate's own,
/// signed by authz with one of these Ed25519 keys. Under `agentgate up` services get authz's
/// own authenticator instead, which also knows revocations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The `iss` claim agentgate tokens carry.
    pub issuer: String,
    /// authz's public keys (PEM `PUBLIC KEY` files, as authz writes `authz-public-key.pem`);
    /// several during a key rotation.
    pub public_keys: Vec<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: "agentgate".into(),
            public_keys: Vec::new(),
        }
    }
}

/// Why an [`AuthConfig`] gives no verifier. `table` is where the keys are configured
/// (`approvals.auth`, `audit_store.auth`), so the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "{table}.public_keys is empty: name authz's public key file(s) (authz writes authz-public-key.pem into its data directory) so tokens can be verified"
    )]
    NoKeys { table: String },
    #[error("{table}.public_keys: reading {path}: {error}")]
    Read {
        table: String,
        path: String,
        error: std::io::Error,
    },
    #[error("{table}.public_keys: {path} is not an Ed25519 PUBLIC KEY PEM: {reason}")]
    NotAKey {
        table: String,
        path: String,
        reason: String,
    },
}

impl AuthConfig {
    /// A verifier trusting the configured issuer and keys; `table` names the configuration
    /// table in errors.
    pub fn verifier(&self, table: &str) -> Result<TokenVerifier, AuthConfigError> {
        use ed25519_dalek::pkcs8::DecodePublicKey as _;
        if self.public_keys.is_empty() {
            return Err(AuthConfigError::NoKeys {
                table: table.to_owned(),
            });
        }
        let mut verifier = TokenVerifier::new(self.issuer.clone());
        for path in &self.public_keys {
            let shown = path.display().to_string();
            let pem = std::fs::read_to_string(path).map_err(|error| AuthConfigError::Read {
                table: table.to_owned(),
                path: shown.clone(),
                error,
            })?;
            let key =
                VerifyingKey::from_public_key_pem(&pem).map_err(|e| AuthConfigError::NotAKey {
                    table: table.to_owned(),
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
            verifier.add_key(&key);
        }
        Ok(verifier)
    }
}

/// Sends `authorization: Bearer <token>` with every call of a tonic client:
/// `AuditStoreClient::with_interceptor(channel, BearerInterceptor::new(&token)?)`, or with
/// [`BearerInterceptor::from_source`] a token asked for anew on every call (renewed files).
#[derive(Clone)]
pub struct BearerInterceptor {
    token: Bearer,
}

#[derive(Clone)]
enum Bearer {
    Fixed(tonic::metadata::MetadataValue<tonic::metadata::Ascii>),
    Source(std::sync::Arc<dyn TokenSource>),
}

impl BearerInterceptor {
    /// Fails when the token cannot be sent as header text.
    pub fn new(token: &str) -> Result<BearerInterceptor, TokenError> {
        Ok(BearerInterceptor {
            token: Bearer::Fixed(bearer_header(token)?),
        })
    }

    /// Asks `source` on every call, so a renewed token is used from the next call on. A call
    /// without a token fails locally with `UNAUTHENTICATED` and the source's reason.
    pub fn from_source(source: std::sync::Arc<dyn TokenSource>) -> BearerInterceptor {
        BearerInterceptor {
            token: Bearer::Source(source),
        }
    }
}

/// The `authorization` header value for `token`; fails when it is not valid header text
/// (a stray control character from a badly written file).
pub fn bearer_header(
    token: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, TokenError> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| TokenError::Malformed("the token is not valid header text".into()))
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = match &self.token {
            Bearer::Fixed(value) => value.clone(),
            Bearer::Source(source) => {
                let token = source.token().map_err(|e| {
                    tonic::Status::unauthenticated(format!("no service token to send: {e}"))
                })?;
                bearer_header(&token).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?
            }
        };
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// The `exp` of a JWT, read **without verifying anything**: only for a token an
/// [`Authenticator`] has just accepted, e.g. to end a long-lived stream when its credential
/// runs out. `None` when the token has no readable `exp`.
pub fn unverified_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = value.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// An authenticator that is set once, after the service using it has started: `agentgate up`
/// starts the audit store before authz, whose authenticator the store uses. Until
/// [`LateAuthenticator::set`], every token gets [`TokenError::Unavailable`].
pub struct LateAuthenticator {
    inner: std::sync::OnceLock<std::sync::Arc<dyn Authenticator>>,
    pending: String,
}

impl LateAuthenticator {
    /// `pending` says why tokens cannot be checked yet, e.g. "authz is starting".
    pub fn new(pending: impl Into<String>) -> LateAuthenticator {
        LateAuthenticator {
            inner: std::sync::OnceLock::new(),
            pending: pending.into(),
        }
    }

    /// Sets the authenticator; a second call is ignored (the first one stays).
    pub fn set(&self, authenticator: std::sync::Arc<dyn Authenticator>) {
        let _ = self.inner.set(authenticator);
    }
}

#[tonic::async_trait]
impl Authenticator for LateAuthenticator {
    async fn authenticate(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Principal, TokenError> {
        match self.inner.get() {
            Some(a) => a.authenticate(token, audience).await,
            None => Err(TokenError::Unavailable(self.pending.clone())),
        }
    }
}

/// The `alg` of a JWT header, read without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, TokenError> {
    if token.len() > 16 * 1024 {
        return Err(TokenError::Malformed("longer than 16 KiB".into()));
    }
    let head = token
        .split('.')
        .next()
        .ok_or_else(|| TokenError::Malformed("not a JWT".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| TokenError::Malformed("header is not JSON".into()))?;
    Ok(value
        .get("alg")
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .to_owned())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The bearer token of a gRPC call (`authorization: Bearer …`), or UNAUTHENTICATED.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, tonic::Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| {
            tonic::Status::unauthenticated("no credential: send `authorization: Bearer <token>`")
        })?
        .to_str()
        .map_err(|_| tonic::Status::unauthenticated("authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| tonic::Status::unauthenticated("authorization must be `Bearer <token>`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(&SigningKey::from_bytes(&[3; 32]), "agentgate").expect("issuer")
    }

    fn request(ttl: u64, aud: &[&str]) -> TokenRequest {
        TokenRequest {
            subject: "agent:deploy-bot".into(),
            kind: PrincipalKind::Agent,
            groups: vec!["deployers".into()],
            audience: aud.iter().map(|s| s.to_string()).collect(),
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn issued_token_verifies_into_a_principal() {
        let i = issuer();
        let (token, claims) = i.issue(&request(60, &["prod-db"])).expect("issue");
        let got = i
            .verifier()
            .verify(&token, Some("prod-db"))
            .expect("verify");
        assert_eq!(got, claims);
        let p = got.principal();
        assert_eq!(p.subject, "agent:deploy-bot");
        assert_eq!(p.kind, PrincipalKind::Agent as i32);
        assert_eq!(p.token_id, claims.jti);
    }

    #[test]
    fn forgeries_are_refused_with_their_reason() {
        let i = issuer();
        let v = i.verifier();
        let (token, _) = i.issue(&request(60, &["prod-db"])).expect("issue");
        // Wrong audience.
        assert_eq!(
            v.verify(&token, Some("other-db")),
            Err(TokenError::WrongAudience("other-db".into()))
        );
        // Signature of another key with the same kid.
        let other =
            TokenIssuer::new(&SigningKey::from_bytes(&[4; 32]), "agentgate").expect("issuer");
        let (forged, _) = other.issue(&request(60, &[])).expect("issue");
        let mut parts: Vec<&str> = forged.split('.').collect();
        let real: Vec<&str> = token.split('.').collect();
        parts[0] = real[0];
        assert_eq!(
            v.verify(&parts.join("."), None),
            Err(TokenError::BadSignature)
        );
        // Unknown key id.
        assert!(matches!(
            v.verify(&forged, None),
            Err(TokenError::UnknownKeyId(_))
        ));
        // alg: none.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", real[1]);
        assert_eq!(
            v.verify(&unsigned, None),
            Err(TokenError::UnsupportedAlgorithm("none".into()))
        );
        // Wrong issuer.
        let foreign =
            TokenIssuer::new(&SigningKey::from_bytes(&[3; 32]), "someone-else").expect("issuer");
        let (t, _) = foreign.issue(&request(60, &[])).expect("issue");
        assert_eq!(v.verify(&t, None), Err(TokenError::WrongIssuer));
        // Garbage.
        assert!(matches!(
            v.verify("a.b.c", None),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(v.verify("", None), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn time_window_is_enforced() {
        let i = issuer();
        let mut v = i.verifier();
        v.leeway = Duration::ZERO;
        let sign = |claims: &Claims| {
            let key = SigningKey::from_bytes(&[3; 32]);
            let der = key.to_pkcs8_der().expect("der");
            let mut h = Header::new(Algorithm::EdDSA);
            h.kid = Some(key_id(&key.verifying_key()));
            jsonwebtoken::encode(&h, claims, &EncodingKey::from_ed_der(der.as_bytes()))
                .expect("encode")
        };
        let (_, mut claims) = i.issue(&request(60, &[])).expect("issue");
        claims.exp = now_secs() - 10;
        assert_eq!(v.verify(&sign(&claims), None), Err(TokenError::Expired));
        claims.exp = now_secs() + 600;
        claims.nbf = now_secs() + 300;
        assert_eq!(v.verify(&sign(&claims), None), Err(TokenError::NotYetValid));
    }

    #[tokio::test]
    async fn late_authenticator_is_unavailable_until_set() {
        let i = issuer();
        let (token, _) = i.issue(&request(60, &[])).expect("issue");
        let late = LateAuthenticator::new("authz is starting");
        assert_eq!(
            late.authenticate(&token, None).await,
            Err(TokenError::Unavailable("authz is starting".into()))
        );
        late.set(std::sync::Arc::new(i.verifier()));
        assert!(late.authenticate(&token, None).await.is_ok());
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        let (token, claims) = issuer().issue(&request(60, &[])).expect("issue");
        assert_eq!(unverified_expiry(&token), Some(claims.expires_at()));
        assert_eq!(unverified_expiry("a.b.c"), None);
        assert_eq!(unverified_expiry(""), None);
    }

    #[test]
    fn auth_config_loads_public_keys_and_names_the_table() {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        let dir = std::env::temp_dir().join(format!("agentgate-identity-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = SigningKey::from_bytes(&[3; 32]);
        let pem = key
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pem");
        let path = dir.join("authz-public-key.pem");
        std::fs::write(&path, pem).expect("write");
        let config = AuthConfig {
            public_keys: vec![path.clone()],
            ..Default::default()
        };
        let (token, _) = issuer().issue(&request(60, &[])).expect("issue");
        assert!(
            config
                .verifier("x.auth")
                .expect("verifier")
                .verify(&token, None)
                .is_ok()
        );
        let empty = AuthConfig::default().verifier("audit_store.auth");
        assert!(matches!(empty, Err(AuthConfigError::NoKeys { .. })));
        std::fs::write(&path, "not a key").expect("write");
        let bad = config
            .verifier("audit_store.auth")
            .err()
            .expect("error")
            .to_string();
        assert!(bad.starts_with("audit_store.auth.public_keys: "), "{bad}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bearer_interceptor_sets_the_header() {
        use tonic::service::Interceptor as _;
        let mut i = BearerInterceptor::new(" abc\n").expect("interceptor");
        let req = i.call(tonic::Request::new(())).expect("call");
        assert_eq!(bearer_token(req.metadata()).expect("bearer"), "abc");
        assert!(BearerInterceptor::new("a\u{1}b").is_err());
    }

    #[test]
    fn bearer_interceptor_asks_its_source_on_every_call() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use tonic::service::Interceptor as _;
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let mut i = BearerInterceptor::from_source(std::sync::Arc::new(
            move || -> Result<String, String> {
                match seen.fetch_add(1, Ordering::SeqCst) {
                    0 => Ok("first".into()),
                    1 => Ok("second\n".into()),
                    2 => Ok("bad\u{1}".into()),
                    _ => Err("file missing".into()),
                }
            },
        ));
        let first = i.call(tonic::Request::new(())).expect("call");
        assert_eq!(bearer_token(first.metadata()).expect("bearer"), "first");
        let second = i.call(tonic::Request::new(())).expect("call");
        assert_eq!(bearer_token(second.metadata()).expect("bearer"), "second");
        let bad = i
            .call(tonic::Request::new(()))
            .expect_err("control character");
        assert_eq!(bad.code(), tonic::Code::Unauthenticated);
        let missing = i.call(tonic::Request::new(())).expect_err("no token");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(
            missing.message().contains("file missing"),
            "{}",
            missing.message()
        );
    }

    #[test]
    fn bearer_header_is_required() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            bearer_token(&md).expect_err("none").code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Basic x".parse().expect("value"));
        assert!(bearer_token(&md).is_err());
        md.insert("authorization", "Bearer abc".parse().expect("value"));
        assert_eq!(bearer_token(&md).expect("bearer"), "abc");
    }
}
