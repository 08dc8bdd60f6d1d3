//! The decisions of authz, independent of gRPC: who a credential is, whether a session may
//! open, which grant backs it, when it must end.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use agentgate_identity::{Claims, TokenError, TokenIssuer, TokenRequest, TokenVerifier};
use agentgate_policy::{PolicyEngine, PolicyStore};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{AuthRecord, GrantRecord};
use agentgate_proto::authz::v1::{
    Connection, Grant, GrantEvent, GrantEventKind, GrantSource, RoleBinding, SessionPolicy,
    UpstreamIdentity,
};
use agentgate_proto::common::v1::{Principal, PrincipalKind, Protocol};
use agentgate_recorder::SessionRecorder;
use tokio::sync::{Notify, broadcast};

use crate::config::{ConnectionConfig, resolve_secret};
use crate::oidc::{OidcIssuer, peek_issuer};
use crate::store::{GrantRow, Store};
use crate::{now_us, us_timestamp};

/// Why a session or call is refused, in words fit to show the agent.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("authz storage: {0}")]
    Storage(String),
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "authz database error");
        Refusal::Storage(e.to_string())
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Refusal::Denied(m) => tonic::Status::permission_denied(m),
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::Invalid(m) => tonic::Status::invalid_argument(m),
            Refusal::Storage(m) => tonic::Status::unavailable(format!("authz storage: {m}")),
        }
    }
}

/// A session authz opened and has not seen end.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub principal: Principal,
    pub connection: String,
    pub role: String,
    pub grant_id: String,
    pub expires_at_us: i64,
}

/// Something that ends at a time: a just-in-time grant or a session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Grant(String),
    Session(String),
}

/// The state every authz call shares.
pub struct Core {
    pub store: Store,
    pub issuer: Arc<TokenIssuer>,
    verifier: TokenVerifier,
    oidc: Vec<OidcIssuer>,
    pub policy: Arc<PolicyStore>,
    connections: RwLock<HashMap<String, ConnectionConfig>>,
    revoked: RwLock<HashSet<String>>,
    sessions: Mutex<HashMap<String, LiveSession>>,
    deadlines: Mutex<BTreeSet<(i64, Deadline)>>,
    deadline_changed: Notify,
    pub events: broadcast::Sender<GrantEvent>,
    recorder: Option<SessionRecorder>,
    pub admin_group: String,
    pub max_token_ttl: Duration,
    pub exchange_token_ttl: Duration,
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        store: Store,
        issuer: Arc<TokenIssuer>,
        oidc: Vec<OidcIssuer>,
        policy: Arc<PolicyStore>,
        connections: Vec<ConnectionConfig>,
        recorder: Option<SessionRecorder>,
        admin_group: String,
        max_token_ttl: Duration,
        exchange_token_ttl: Duration,
    ) -> Result<Arc<Core>, Refusal> {
        let now = now_us();
        let revoked = store.live_revocations(now).await?.into_iter().collect();
        let mut deadlines = BTreeSet::new();
        for g in store.live_grants(now).await? {
            deadlines.insert((g.expires_at_us, Deadline::Grant(g.id)));
        }
        let (events, _) = broadcast::channel(1024);
        let core = Arc::new(Core {
            store,
            verifier: issuer.verifier(),
            issuer,
            oidc,
            policy,
            connections: RwLock::new(
                connections
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect(),
            ),
            revoked: RwLock::new(revoked),
            sessions: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(deadlines),
            deadline_changed: Notify::new(),
            events,
            recorder,
            admin_group,
            max_token_ttl,
            exchange_token_ttl,
        });
        tokio::spawn(expiry_loop(Arc::downgrade(&core)));
        Ok(core)
    }

    /// Records an audit event; a recorder failure is logged, never fatal to the decision
    /// (the spool is local; failing means the disk is gone).
    pub async fn record(
        &self,
        kind: &str,
        principal: Option<&Principal>,
        source: &str,
        detail: Detail,
    ) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut attributes = HashMap::new();
        if let Some(p) = principal {
            attributes.insert("subject".to_owned(), p.subject.clone());
        }
        if !source.is_empty() {
            attributes.insert("source_address".to_owned(), source.to_owned());
        }
        if let Err(e) = recorder.record_with(kind, Some(detail), attributes).await {
            tracing::error!(error = %e, kind, "cannot record audit event");
        }
    }

    /// Verifies a bearer token — agentgate's own or a configured OIDC issuer's — and records
    /// the outcome with its reason, subject (when known) and source address.
    /// Returns the principal and when its credential expires (µs since the epoch).
    pub async fn verify_token(
        &self,
        token: &str,
        audience: Option<&str>,
        source: &str,
        credential_kind: &str,
    ) -> Result<(Principal, i64), Refusal> {
        let result = self.verify_token_inner(token, audience).await;
        let (success, reason, principal) = match &result {
            Ok((p, _)) => (true, "verified".to_owned(), Some(p.clone())),
            Err(e) => (false, e.to_string(), None),
        };
        let detail = Detail::Auth(AuthRecord {
            success,
            reason: reason.clone(),
            credential_kind: credential_kind.to_owned(),
        });
        self.record(
            if success {
                "authz.verify"
            } else {
                "authz.refuse"
            },
            principal.as_ref(),
            source,
            detail,
        )
        .await;
        if !success {
            tracing::info!(source, reason, "credential refused");
        }
        result.map_err(|e| Refusal::Unauthenticated(format!("credential refused: {e}")))
    }

    async fn verify_token_inner(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<(Principal, i64), TokenError> {
        if let Some(iss) = peek_issuer(token)
            && let Some(oidc) = self.oidc.iter().find(|o| o.issuer() == iss)
        {
            return oidc.verify(token).await;
        }
        let claims = self.verifier.verify(token, audience)?;
        self.check_revoked(&claims)?;
        Ok((claims.principal(), claims.exp as i64 * 1_000_000))
    }

    /// Verifies an external workload token for exchange; only configured OIDC issuers count.
    pub async fn verify_external(&self, token: &str, source: &str) -> Result<Principal, Refusal> {
        let result =
            match peek_issuer(token).and_then(|iss| self.oidc.iter().find(|o| o.issuer() == iss)) {
                Some(oidc) => oidc.verify(token).await.map(|(p, _)| p),
                None => Err(TokenError::WrongIssuer),
            };
        let detail = Detail::Auth(AuthRecord {
            success: result.is_ok(),
            reason: result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_else(|| "verified".into()),
            credential_kind: "oidc".into(),
        });
        let kind = if result.is_ok() {
            "authz.verify"
        } else {
            "authz.refuse"
        };
        self.record(kind, result.as_ref().ok(), source, detail)
            .await;
        result.map_err(|e| Refusal::Unauthenticated(format!("workload token refused: {e}")))
    }

    /// Whether a token id was revoked (SSH certificates carry the id of the token they were
    /// signed for).
    pub fn is_token_revoked(&self, jti: &str) -> bool {
        self.revoked.read().map(|r| r.contains(jti)).unwrap_or(true)
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), TokenError> {
        let revoked = self
            .revoked
            .read()
            .map(|r| r.contains(&claims.jti))
            .unwrap_or(true);
        if revoked {
            return Err(TokenError::Revoked(claims.jti.clone()));
        }
        Ok(())
    }

    /// Signs a token and records that it was issued and by whom.
    pub async fn issue_token(
        &self,
        request: &TokenRequest,
        issued_by: &Principal,
    ) -> Result<(String, Claims), Refusal> {
        if request.ttl > self.max_token_ttl {
            return Err(Refusal::Invalid(format!(
                "ttl {}s exceeds the maximum of {}s",
                request.ttl.as_secs(),
                self.max_token_ttl.as_secs()
            )));
        }
        if request.subject.is_empty() || request.subject.len() > 200 {
            return Err(Refusal::Invalid(
                "subject must be 1 to 200 characters".into(),
            ));
        }
        let (token, claims) = self
            .issuer
            .issue(request)
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        self.store
            .record_token(&crate::store::IssuedToken {
                jti: &claims.jti,
                subject: &claims.sub,
                kind: &claims.kind,
                groups: &claims.groups,
                audience: &claims.aud,
                issued_at_us: claims.iat as i64 * 1_000_000,
                expires_at_us: claims.exp as i64 * 1_000_000,
                issued_by: &issued_by.subject,
            })
            .await?;
        Ok((token, claims))
    }

    pub fn is_admin(&self, p: &Principal) -> bool {
        p.groups.iter().any(|g| g == &self.admin_group)
    }

    pub fn require_admin(&self, p: &Principal) -> Result<(), Refusal> {
        if self.is_admin(p) {
            Ok(())
        } else {
            Err(Refusal::Denied(format!(
                "{} is not in the {} group",
                p.subject, self.admin_group
            )))
        }
    }

    /// Revokes a token id: new sessions refuse it at once, live ones end now.
    pub async fn revoke_token(
        &self,
        jti: &str,
        reason: &str,
        by: &Principal,
    ) -> Result<u32, Refusal> {
        let expires = self
            .store
            .token_expiry(jti)
            .await?
            .unwrap_or(now_us() + self.max_token_ttl.as_micros() as i64);
        self.store
            .revoke_token(jti, &by.subject, reason, expires, now_us())
            .await?;
        if let Ok(mut r) = self.revoked.write() {
            r.insert(jti.to_owned());
        }
        let ended = self.end_sessions(|s| s.principal.token_id == jti);
        let event = GrantEvent {
            kind: GrantEventKind::TokenRevoked as i32,
            token_id: jti.to_owned(),
            session_ids: ended.clone(),
            time: Some(us_timestamp(now_us())),
            reason: format!("token revoked: {reason}"),
            ..Default::default()
        };
        let _ = self.events.send(event);
        self.record(
            "authz.token_revoked",
            Some(by),
            "",
            Detail::Grant(GrantRecord {
                grant_id: String::new(),
                change: format!("token {jti} revoked"),
                expires_at: None,
                reason: reason.to_owned(),
            }),
        )
        .await;
        Ok(ended.len() as u32)
    }

    /// Removes and returns the live sessions `matches` selects.
    fn end_sessions(&self, matches: impl Fn(&LiveSession) -> bool) -> Vec<String> {
        let Ok(mut sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        let ids: Vec<String> = sessions
            .iter()
            .filter(|(_, s)| matches(s))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            sessions.remove(id);
        }
        ids
    }

    pub fn connection(&self, name: &str) -> Option<ConnectionConfig> {
        self.connections.read().ok()?.get(name).cloned()
    }

    pub fn connections(&self) -> Vec<Connection> {
        let Ok(all) = self.connections.read() else {
            return Vec::new();
        };
        let mut list: Vec<Connection> =
            all.values().map(|c| connection_message(c, false)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn current_policy(&self) -> Arc<PolicyEngine> {
        self.policy.current()
    }

    /// Opens a session: the credential must verify for this connection, the role must exist,
    /// and a grant — standing, by policy, or just-in-time — must back it.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_session(
        &self,
        principal: Principal,
        token_expires_at_us: i64,
        connection: &str,
        role: &str,
        protocol: i32,
        source: &str,
    ) -> Result<OpenedSession, Refusal> {
        let conn = self
            .connection(connection)
            .ok_or_else(|| Refusal::NotFound(format!("no connection named {connection:?}")))?;
        if protocol != 0 && protocol_of(&conn) as i32 != protocol {
            return Err(Refusal::Invalid(format!(
                "connection {connection} speaks {}, not this protocol",
                conn.protocol
            )));
        }
        let upstream = conn.roles.get(role).ok_or_else(|| {
            Refusal::Denied(format!("connection {connection} has no role {role:?}"))
        })?;
        let policy = self.current_policy();
        let now = now_us();
        let grant = if policy.standing_access(&principal, connection, role) {
            Grant {
                id: format!("standing:{}:{connection}:{role}", principal.subject),
                subject: principal.subject.clone(),
                connection: connection.to_owned(),
                role: role.to_owned(),
                source: GrantSource::Standing as i32,
                not_before: Some(us_timestamp(now)),
                expires_at: Some(us_timestamp(token_expires_at_us)),
                reason: "standing access by policy".into(),
                ..Default::default()
            }
        } else {
            match self
                .store
                .live_grant(&principal.subject, connection, role, now)
                .await?
            {
                Some(g) => grant_message(&g),
                None => {
                    return Err(Refusal::Denied(format!(
                        "{} has no grant for {connection} as {role}; ask for one: agentgate access request --connection {connection} --role {role} --for 30m --reason \"...\"",
                        principal.subject
                    )));
                }
            }
        };
        let grant_expiry = grant
            .expires_at
            .as_ref()
            .map(crate::timestamp_us)
            .unwrap_or(token_expires_at_us);
        let expires_at_us = grant_expiry.min(token_expires_at_us);
        let session_policy: SessionPolicy = policy.session_policy(&principal, connection, role);
        let secret = match &upstream.secret {
            Some(reference) => resolve_secret(reference).map_err(|e| {
                tracing::error!(connection, role, error = %e, "upstream secret unavailable");
                Refusal::Storage(format!(
                    "the upstream credential of {connection}/{role} is not available"
                ))
            })?,
            None => Vec::new(),
        };
        let session_id = uuid::Uuid::now_v7().to_string();
        self.store
            .open_session(
                &session_id,
                &principal.subject,
                &principal.token_id,
                &grant.id,
                connection,
                role,
                source,
                now,
                expires_at_us,
            )
            .await?;
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(
                session_id.clone(),
                LiveSession {
                    principal: principal.clone(),
                    connection: connection.to_owned(),
                    role: role.to_owned(),
                    grant_id: grant.id.clone(),
                    expires_at_us,
                },
            );
        }
        self.add_deadline(expires_at_us, Deadline::Session(session_id.clone()));
        Ok(OpenedSession {
            session_id,
            principal,
            grant,
            policy: session_policy,
            upstream: UpstreamIdentity {
                user: upstream.user.clone(),
                secret_ref: upstream.secret.clone().unwrap_or_default(),
                secret,
            },
            connection: connection_message(&conn, false),
            expires_at_us,
        })
    }

    pub fn session(&self, id: &str) -> Option<LiveSession> {
        self.sessions.lock().ok()?.get(id).cloned()
    }

    pub async fn close_session(&self, id: &str, reason: &str) -> Result<(), Refusal> {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(id);
        }
        self.store.close_session(id, reason, now_us()).await?;
        Ok(())
    }

    /// Stores a just-in-time grant and arms its expiry.
    pub async fn create_grant(&self, row: GrantRow) -> Result<Grant, Refusal> {
        self.store.insert_grant(&row).await?;
        self.add_deadline(row.expires_at_us, Deadline::Grant(row.id.clone()));
        let grant = grant_message(&row);
        let _ = self.events.send(GrantEvent {
            kind: GrantEventKind::Created as i32,
            grant_id: row.id.clone(),
            subject: row.subject.clone(),
            connection: row.connection.clone(),
            time: Some(us_timestamp(now_us())),
            reason: row.reason.clone(),
            ..Default::default()
        });
        self.record(
            "grant.created",
            Some(&Principal {
                subject: row.subject.clone(),
                ..Default::default()
            }),
            "",
            Detail::Grant(GrantRecord {
                grant_id: row.id.clone(),
                change: format!(
                    "created for {} on {} as {}, approved by {}",
                    row.subject, row.connection, row.role, row.approved_by_json
                ),
                expires_at: grant.expires_at,
                reason: row.reason.clone(),
            }),
        )
        .await;
        Ok(grant)
    }

    /// Ends a grant now, and the sessions it backs.
    pub async fn revoke_grant(
        &self,
        id: &str,
        reason: &str,
        by: &Principal,
    ) -> Result<u32, Refusal> {
        let grant = self
            .store
            .grant(id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no grant {id}")))?;
        if !self
            .store
            .revoke_grant(id, &by.subject, reason, now_us())
            .await?
        {
            return Err(Refusal::Invalid(format!("grant {id} is already revoked")));
        }
        let ended = self.end_sessions(|s| s.grant_id == id);
        let _ = self.events.send(GrantEvent {
            kind: GrantEventKind::Revoked as i32,
            grant_id: id.to_owned(),
            subject: grant.subject.clone(),
            connection: grant.connection.clone(),
            session_ids: ended.clone(),
            time: Some(us_timestamp(now_us())),
            reason: format!("grant revoked: {reason}"),
            ..Default::default()
        });
        self.record(
            "grant.revoked",
            Some(by),
            "",
            Detail::Grant(GrantRecord {
                grant_id: id.to_owned(),
                change: "revoked".into(),
                expires_at: None,
                reason: reason.to_owned(),
            }),
        )
        .await;
        Ok(ended.len() as u32)
    }

    /// Announces a policy change to the proxies.
    pub fn policy_changed(&self, version: &str) {
        let _ = self.events.send(GrantEvent {
            kind: GrantEventKind::PolicyChanged as i32,
            time: Some(us_timestamp(now_us())),
            reason: format!("policy {version} in force"),
            ..Default::default()
        });
    }

    fn add_deadline(&self, at_us: i64, what: Deadline) {
        if let Ok(mut d) = self.deadlines.lock() {
            d.insert((at_us, what));
        }
        self.deadline_changed.notify_one();
    }

    /// Fires every deadline due by `now`.
    fn fire_due(&self, now: i64) -> Option<i64> {
        let due: Vec<(i64, Deadline)> = {
            let Ok(mut d) = self.deadlines.lock() else {
                return None;
            };
            let mut due = Vec::new();
            while let Some(first) = d.first().cloned() {
                if first.0 > now {
                    break;
                }
                d.pop_first();
                due.push(first);
            }
            due
        };
        for (at, what) in due {
            match what {
                Deadline::Grant(id) => {
                    let ended = self.end_sessions(|s| s.grant_id == id);
                    let _ = self.events.send(GrantEvent {
                        kind: GrantEventKind::Expired as i32,
                        grant_id: id,
                        session_ids: ended,
                        time: Some(us_timestamp(at)),
                        reason: "grant expired".into(),
                        ..Default::default()
                    });
                }
                Deadline::Session(id) => {
                    let live = self.sessions.lock().ok().and_then(|mut s| {
                        // Only if it still ends now (not closed or already ended).
                        if s.get(&id).is_some_and(|l| l.expires_at_us == at) {
                            s.remove(&id)
                        } else {
                            None
                        }
                    });
                    if let Some(s) = live {
                        let _ = self.events.send(GrantEvent {
                            kind: GrantEventKind::Expired as i32,
                            grant_id: s.grant_id,
                            token_id: s.principal.token_id,
                            subject: s.principal.subject,
                            connection: s.connection,
                            session_ids: vec![id],
                            time: Some(us_timestamp(at)),
                            reason: "access expired".into(),
                        });
                    }
                }
            }
        }
        self.deadlines.lock().ok()?.first().map(|f| f.0)
    }
}

/// Sleeps until the next deadline (or a new, earlier one) and fires what is due. Holds only
/// a weak reference, so it ends with the service.
async fn expiry_loop(core: std::sync::Weak<Core>) {
    loop {
        let Some(c) = core.upgrade() else { return };
        let next = c.fire_due(now_us());
        let wait = match next {
            Some(at) => {
                Duration::from_micros((at - now_us()).max(0) as u64).min(Duration::from_secs(1))
            }
            None => Duration::from_secs(1),
        };
        // Waiting holds the core for at most a second; the next turn lets it go.
        let _ = tokio::time::timeout(wait, c.deadline_changed.notified()).await;
    }
}

/// What `OpenSession` answers.
pub struct OpenedSession {
    pub session_id: String,
    pub principal: Principal,
    pub grant: Grant,
    pub policy: SessionPolicy,
    pub upstream: UpstreamIdentity,
    pub connection: Connection,
    pub expires_at_us: i64,
}

pub fn grant_message(g: &GrantRow) -> Grant {
    Grant {
        id: g.id.clone(),
        subject: g.subject.clone(),
        connection: g.connection.clone(),
        role: g.role.clone(),
        source: g.source,
        not_before: Some(us_timestamp(g.not_before_us)),
        expires_at: Some(us_timestamp(g.expires_at_us)),
        approved_by: serde_json::from_str(&g.approved_by_json).unwrap_or_default(),
        reason: g.reason.clone(),
        approval_id: g.approval_id.clone(),
        revoked: g.revoked_at_us.is_some(),
    }
}

pub fn protocol_of(c: &ConnectionConfig) -> Protocol {
    match c.protocol.as_str() {
        "postgres" => Protocol::Postgres,
        "ssh" => Protocol::Ssh,
        "http" => Protocol::Http,
        "kubernetes" => Protocol::Kubernetes,
        _ => Protocol::Unspecified,
    }
}

/// A catalog entry as a message; secrets only as references, never values.
pub fn connection_message(c: &ConnectionConfig, _with_secrets: bool) -> Connection {
    Connection {
        name: c.name.clone(),
        protocol: protocol_of(c) as i32,
        upstream_address: c.upstream.clone(),
        roles: c
            .roles
            .iter()
            .map(|(role, u)| RoleBinding {
                role: role.clone(),
                upstream: Some(UpstreamIdentity {
                    user: u.user.clone(),
                    secret_ref: u.secret.clone().unwrap_or_default(),
                    secret: Vec::new(),
                }),
            })
            .collect(),
        settings: c.settings.clone().into_iter().collect(),
    }
}

/// A principal kind from its claim form, for IssueToken.
pub fn kind_or_agent(kind: i32) -> PrincipalKind {
    match PrincipalKind::try_from(kind).unwrap_or_default() {
        PrincipalKind::Unspecified => PrincipalKind::Agent,
        k => k,
    }
}
