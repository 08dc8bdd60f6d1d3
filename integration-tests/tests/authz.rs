//! authz end to end: real gRPC, the audit store recording every verification, the approvals
//! service deciding access requests, and a local JWKS server standing in for an external
//! OIDC issuer (a CI system or cloud identity provider, which cannot run on this machine).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_authz::client::{AuthzClient, Refused};
use agentgate_authz::{
    AuthzConfig, ConnectionConfig, OidcIssuerConfig, RunningAuthz, UpstreamConfig,
};
use agentgate_identity::{TokenRequest, key_id};
use agentgate_integration_tests::control_plane::ControlPlane;
use agentgate_integration_tests::{AuditStoreFixture, free_port};
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{ReviewRequest, Verdict};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{GetSessionEventsRequest, ListSessionsRequest};
use agentgate_proto::authz::v1::authz_client::AuthzClient as AuthzGrpc;
use agentgate_proto::authz::v1::credential::Kind;
use agentgate_proto::authz::v1::{
    ClientInfo, Credential, ExchangeTokenRequest, GrantEventKind, IssueTokenRequest,
    ListGrantsRequest, RequestAccessRequest, RevokeTokenRequest,
};
use agentgate_proto::common::v1::{Decision, Operation, PrincipalKind, Protocol};
use base64::Engine as _;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"prod-db")
when { context.role == "read" };

@id("ci-read")
permit (principal == Agentgate::Principal::"workload:ci/build-42", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"prod-db")
when { context.role == "read" };

@id("agents-request-write")
@max_duration("1h")
@approvers("dba")
@approvals("1")
@reason_required("true")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"request_access", resource == Agentgate::Connection::"prod-db")
when { context.role == "write" };

@id("read-ops")
permit (principal, action == Agentgate::Action::"execute", resource)
when { ["sql.read", "sql.ddl", "none"].contains(context.risk_class) };

@id("write-ops")
permit (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "write" };

@id("ddl-needs-dba")
@approvers("dba")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" }
unless { context.approved };

@id("no-dcl")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.dcl" };
"#;

struct Stack {
    audit: AuditStoreFixture,
    authz: RunningAuthz,
    approvals_url: String,
    _approvals: agentgate_approvals::RunningApprovals,
    dir: tempfile::TempDir,
    _secrets: tempfile::TempDir,
    policy_path: std::path::PathBuf,
    proxy: AuthzClient,
    authz_url: String,
}

impl Stack {
    async fn start(oidc: Vec<OidcIssuerConfig>) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("ro.secret");
        std::fs::write(&secret, "s3cret-ro\n").unwrap();
        let roles = [
            (
                "read".to_string(),
                UpstreamConfig {
                    user: "agent_ro".into(),
                    secret: Some(format!("file:{}", secret.display())),
                },
            ),
            (
                "write".to_string(),
                UpstreamConfig {
                    user: "agent_rw".into(),
                    secret: None,
                },
            ),
        ];
        let connections = ["prod-db", "other-db"]
            .map(|name| ConnectionConfig {
                name: name.into(),
                protocol: "postgres".into(),
                upstream: "127.0.0.1:5432".into(),
                roles: roles.iter().cloned().collect(),
                settings: Default::default(),
            })
            .to_vec();
        let ControlPlane {
            audit,
            authz,
            approvals,
            dir: authz_dir,
            policy_path,
        } = ControlPlane::start(
            POLICY,
            connections,
            |config| {
                config.policy_reload_interval = Duration::from_millis(200);
                config.oidc_issuers = oidc;
                // A proxy beside authz (docker-compose) finds its token here.
                config.service_tokens = vec!["pg-proxy".into()];
            },
            |approvals| approvals.require_reason = true,
        )
        .await
        .unwrap();
        let authz_url = format!("http://{}", authz.addr);
        let proxy = AuthzClient::new(
            &authz_url,
            &authz
                .service_token("pg-proxy", Duration::from_secs(600))
                .unwrap(),
            None,
        )
        .unwrap();
        Stack {
            audit,
            approvals_url: format!("http://{}", approvals.addr),
            _approvals: approvals,
            authz,
            dir: authz_dir,
            _secrets: dir,
            policy_path,
            proxy,
            authz_url,
        }
    }

    fn token(
        &self,
        subject: &str,
        kind: PrincipalKind,
        groups: &[&str],
        audience: &[&str],
        ttl: Duration,
    ) -> String {
        self.authz
            .core
            .issuer
            .issue(&TokenRequest {
                subject: subject.into(),
                kind,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                audience: audience.iter().map(|a| a.to_string()).collect(),
                ttl,
            })
            .unwrap()
            .0
    }

    fn agent_token(&self) -> String {
        self.token(
            "agent:deploy-bot",
            PrincipalKind::Agent,
            &["agents"],
            &[],
            Duration::from_secs(600),
        )
    }

    async fn open(
        &self,
        token: &str,
        connection: &str,
        role: &str,
    ) -> Result<agentgate_proto::authz::v1::OpenSessionResponse, Refused> {
        self.proxy
            .open_session(
                Credential {
                    kind: Some(Kind::Password(token.to_owned())),
                },
                connection,
                role,
                Protocol::Postgres,
                "192.0.2.10:5555",
                ClientInfo {
                    user_agent: "psql".into(),
                    proxy: "pg-proxy".into(),
                },
            )
            .await
    }

    async fn grpc(&self) -> AuthzGrpc<tonic::transport::Channel> {
        AuthzGrpc::connect(self.authz_url.clone()).await.unwrap()
    }

    /// Signs arbitrary claims with authz's own key, as a forger holding a copy would not be
    /// able to — used to build tokens that are valid except for one thing.
    fn sign_claims(&self, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = agentgate_audit_chain::SigningKeyFile::load_or_generate(
            &self.dir.path().join("authz-signing-key.pem"),
        )
        .unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(
            kid.map(str::to_owned)
                .unwrap_or_else(|| key_id(&key.verifying_key())),
        );
        let der = key.to_pkcs8_der().unwrap();
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(der.as_bytes())).unwrap()
    }
}

fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_are_refused_and_recorded() {
    let s = Stack::start(Vec::new()).await;
    let good = s.agent_token();
    assert!(s.open(&good, "prod-db", "read").await.is_ok());

    let base = |exp: i64, nbf: i64, aud: &[&str], iss: &str| {
        serde_json::json!({"iss": iss, "sub": "agent:deploy-bot", "kind": "agent", "groups": ["agents"],
            "aud": aud, "exp": exp, "nbf": nbf, "iat": nbf, "jti": uuid::Uuid::new_v4().to_string()})
    };
    let now = now_secs();
    let parts: Vec<&str> = good.split('.').collect();
    let other = agentgate_identity::TokenIssuer::new(
        &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        "agentgate",
    )
    .unwrap();
    let foreign_sig = other
        .issue(&TokenRequest {
            subject: "agent:deploy-bot".into(),
            kind: PrincipalKind::Agent,
            groups: vec!["agents".into()],
            audience: vec![],
            ttl: Duration::from_secs(60),
        })
        .unwrap()
        .0;
    let none_header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "wrong signature",
            format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                foreign_sig.split('.').nth(2).unwrap()
            ),
            "prod-db",
            "signature",
        ),
        (
            "alg none",
            format!("{none_header}.{}.", parts[1]),
            "prod-db",
            "\"none\"",
        ),
        (
            "expired",
            s.sign_claims(&base(now - 60, now - 120, &[], "agentgate"), None),
            "prod-db",
            "expired",
        ),
        (
            "not yet valid",
            s.sign_claims(&base(now + 600, now + 300, &[], "agentgate"), None),
            "prod-db",
            "not yet valid",
        ),
        (
            "wrong audience",
            s.sign_claims(&base(now + 600, now, &["billing-api"], "agentgate"), None),
            "prod-db",
            "not for",
        ),
        (
            "wrong issuer",
            s.sign_claims(&base(now + 600, now, &[], "evil"), None),
            "prod-db",
            "issuer",
        ),
        (
            "unknown key id",
            s.sign_claims(
                &base(now + 600, now, &[], "agentgate"),
                Some("0000000000000000"),
            ),
            "prod-db",
            "unknown key",
        ),
        (
            "token for A used on B",
            s.sign_claims(&base(now + 600, now, &["prod-db"], "agentgate"), None),
            "other-db",
            "not for",
        ),
    ];
    for (what, token, connection, needle) in &cases {
        match s.open(token, connection, "read").await {
            Err(Refused::Unauthenticated(m)) => assert!(m.contains(needle), "{what}: {m}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    // The token for A does work on A: it was refused on B for its audience only.
    assert!(s.open(&cases[7].1, "prod-db", "read").await.is_ok());

    // Every verification is recorded, refusals with their reason.
    let auditor = s.token(
        "human:auditor",
        PrincipalKind::Human,
        &["auditor"],
        &[],
        Duration::from_secs(600),
    );
    let mut audit = s.audit.client_as(&auditor).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sessions = audit
            .list_sessions(ListSessionsRequest {
                connection: "authz".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sessions;
        let mut reasons = Vec::new();
        for session in sessions {
            let events = audit
                .get_session_events(GetSessionEventsRequest {
                    session_id: session.session_id,
                })
                .await
                .unwrap()
                .into_inner()
                .events;
            for e in events.into_iter().filter_map(|e| e.event) {
                if let Some(Detail::Auth(a)) = e.detail
                    && !a.success
                {
                    assert_eq!(e.kind, "authz.refuse");
                    assert_eq!(
                        e.attributes.get("source_address").map(String::as_str),
                        Some("192.0.2.10:5555")
                    );
                    reasons.push(a.reason);
                }
            }
        }
        if reasons.len() >= cases.len() {
            for (what, _, _, needle) in &cases {
                assert!(
                    reasons.iter().any(|r| r.contains(needle)),
                    "{what} not recorded: {reasons:?}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals not recorded: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standing_session_carries_policy_and_upstream_and_reload_applies() {
    let s = Stack::start(Vec::new()).await;
    let token = s.agent_token();
    let opened = s.open(&token, "prod-db", "read").await.unwrap();
    assert_eq!(
        opened.principal.as_ref().unwrap().subject,
        "agent:deploy-bot"
    );
    let upstream = opened.upstream.unwrap();
    assert_eq!(
        (upstream.user.as_str(), upstream.secret.as_slice()),
        ("agent_ro", b"s3cret-ro".as_slice())
    );
    let policy = opened.policy.unwrap();
    assert!(!policy.risk_rules.is_empty());
    // No grant for write: refused with the way to ask for one.
    match s.open(&token, "prod-db", "write").await {
        Err(Refused::Denied(m)) => assert!(m.contains("agentgate access request"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Unknown connection and role.
    assert!(matches!(
        s.open(&token, "nope", "read").await,
        Err(Refused::Denied(_))
    ));
    assert!(matches!(
        s.open(&token, "prod-db", "superuser").await,
        Err(Refused::Denied(_))
    ));

    // The policy loses the read role: new sessions are refused, without a restart, and
    // the proxies hear of the change.
    let mut events = s.proxy.watch_grants("test").await.unwrap();
    std::fs::write(
        &s.policy_path,
        POLICY.replace(
            r#"when { context.role == "read" };"#,
            r#"when { context.role == "nothing" };"#,
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.open(&token, "prod-db", "read").await.is_ok() {
        assert!(Instant::now() < deadline, "policy change did not apply");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, GrantEventKind::PolicyChanged as i32);

    // A broken policy is refused; the one in force stays.
    std::fs::write(&s.policy_path, "permit (principal, action, resource").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(s.open(&token, "prod-db", "read").await.is_err());
    assert!(s.authz.core.current_policy().policy_count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_grant_is_approved_then_expires_on_the_stream() {
    let s = Stack::start(Vec::new()).await;
    let agent = s.agent_token();
    let mut grpc = s.grpc().await;
    let mut events = s.proxy.watch_grants("test").await.unwrap();

    // A reason is required by policy.
    let no_reason = grpc
        .request_access(bearer(
            &agent,
            RequestAccessRequest {
                connection: "prod-db".into(),
                role: "write".into(),
                duration: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), tonic::Code::InvalidArgument);
    let requested = grpc
        .request_access(bearer(
            &agent,
            RequestAccessRequest {
                connection: "prod-db".into(),
                role: "write".into(),
                duration: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                reason: "deploy migration 42".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.open(&agent, "prod-db", "write").await.is_err(),
        "no grant before approval"
    );

    // A DBA approves through the approvals API.
    let dba = s.token(
        "human:dana",
        PrincipalKind::Human,
        &["dba"],
        &[],
        Duration::from_secs(600),
    );
    let mut approvals = ApprovalsClient::connect(s.approvals_url.clone())
        .await
        .unwrap();
    approvals
        .review(bearer(
            &dba,
            ReviewRequest {
                id: requested.approval_id.clone(),
                verdict: Verdict::Approve as i32,
                comment: "ok".into(),
            },
        ))
        .await
        .unwrap();

    let created = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.message().await.unwrap().unwrap();
            if e.kind == GrantEventKind::Created as i32 {
                return e;
            }
        }
    })
    .await
    .expect("grant created after approval");
    let session = s.open(&agent, "prod-db", "write").await.unwrap();
    let grant = session.grant.unwrap();
    assert_eq!(grant.id, created.grant_id);
    assert_eq!(grant.approved_by, vec!["human:dana".to_string()]);
    let expires_at = agentgate_authz::timestamp_us(grant.expires_at.as_ref().unwrap());

    // The stream reports the expiry within a second of it, naming the session.
    let expired = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.message().await.unwrap().unwrap();
            if e.kind == GrantEventKind::Expired as i32 && e.grant_id == grant.id {
                return (e, agentgate_authz::now_us());
            }
        }
    })
    .await
    .expect("expiry event");
    let lateness = expired.1 - expires_at;
    assert!(
        (0..1_000_000).contains(&lateness),
        "expiry seen {lateness} µs after the grant ended"
    );
    assert!(
        expired.0.session_ids.contains(&session.session_id),
        "{:?}",
        expired.0
    );
    match s.open(&agent, "prod-db", "write").await {
        Err(Refused::Denied(_)) => {}
        other => panic!("a session after expiry must be refused: {other:?}"),
    }
    let grants = grpc
        .list_grants(bearer(
            &agent,
            ListGrantsRequest {
                include_expired: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].reason, "deploy migration 42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_live_sessions_and_refuses_new_ones() {
    let s = Stack::start(Vec::new()).await;
    let admin = std::fs::read_to_string(&s.authz.admin_token_path).unwrap();
    let mut grpc = s.grpc().await;
    let issued = grpc
        .issue_token(bearer(
            &admin,
            IssueTokenRequest {
                subject: "agent:deploy-bot".into(),
                kind: PrincipalKind::Agent as i32,
                groups: vec!["agents".into()],
                audience: vec![],
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let session = s.open(&issued.token, "prod-db", "read").await.unwrap();
    let mut events = s.proxy.watch_grants("test").await.unwrap();
    let revoked = grpc
        .revoke_token(bearer(
            &admin,
            RevokeTokenRequest {
                token_id: issued.token_id.clone(),
                reason: "leaked".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.sessions_ended, 1);
    let e = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, GrantEventKind::TokenRevoked as i32);
    assert_eq!(e.session_ids, vec![session.session_id]);
    match s.open(&issued.token, "prod-db", "read").await {
        Err(Refused::Unauthenticated(m)) => assert!(m.contains("revoked"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Only admins issue tokens; no token, no answer.
    let agent = s.agent_token();
    let denied = grpc
        .issue_token(bearer(
            &agent,
            IssueTokenRequest {
                subject: "agent:x".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let anonymous = grpc
        .issue_token(IssueTokenRequest {
            subject: "agent:x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    // An agent is not a proxy: the session API refuses it.
    let as_agent = AuthzClient::new(&s.authz_url, &agent, None).unwrap();
    assert!(matches!(
        as_agent
            .open_session(
                Credential {
                    kind: Some(Kind::Password(agent.clone()))
                },
                "prod-db",
                "read",
                Protocol::Postgres,
                "",
                ClientInfo::default()
            )
            .await,
        Err(Refused::Denied(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_authorize_agrees_with_local_evaluation() {
    let s = Stack::start(Vec::new()).await;
    let token = s.agent_token();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    let policy = session.policy.clone().unwrap();
    let classes = [
        "sql.read",
        "sql.write",
        "sql.ddl",
        "sql.dcl",
        "sql.write.unbounded",
        "sql.admin",
    ];
    let mut sets: Vec<Vec<&str>> = vec![vec![]];
    for a in classes {
        sets.push(vec![a]);
        for b in classes {
            if a < b {
                sets.push(vec![a, b]);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for set in sets {
        let op = Operation {
            protocol: Protocol::Postgres as i32,
            text: "…".into(),
            risk_classes: set.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let local = agentgate_policy::decide(&policy, &op);
        let central = s.proxy.authorize(&session.session_id, op).await.unwrap();
        assert_eq!(central.decision, local.decision as i32, "{set:?}");
        seen.insert(central.decision);
    }
    // The grid covers all three outcomes.
    for d in [Decision::Allow, Decision::Deny, Decision::NeedsApproval] {
        assert!(seen.contains(&(d as i32)), "{d:?} never decided");
    }
}

/// A proxy beside authz (docker-compose) presents the service token authz keeps in the shared
/// data directory, read again on every call: a renewed file is used at once, a missing or
/// wrong one refuses the agent (fail closed) instead of letting it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_use_the_service_token_file_authz_renews() {
    let s = Stack::start(vec![]).await;
    let file = agentgate_authz::service_token_path(s.dir.path(), "pg-proxy");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let claims = s
        .authz
        .core
        .issuer
        .verifier()
        .verify(
            std::fs::read_to_string(&file).unwrap().trim(),
            Some("approvals"),
        )
        .unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.kind.as_str(), claims.aud.len()),
        ("service:pg-proxy", "service", 0)
    );

    let proxy = AuthzClient::with_token_source(
        &s.authz_url,
        Arc::new(agentgate_identity::TokenFile::new(&file)),
        None,
    )
    .unwrap();
    let open = |proxy: AuthzClient, agent: String| async move {
        proxy
            .open_session(
                Credential {
                    kind: Some(Kind::Password(agent)),
                },
                "prod-db",
                "read",
                Protocol::Postgres,
                "10.0.0.7:5000",
                ClientInfo::default(),
            )
            .await
    };
    let agent = s.agent_token();
    open(proxy.clone(), agent.clone()).await.unwrap();

    // Renewed (here by hand, as authz does at half the lifetime): the next call uses it.
    let renewed = s
        .authz
        .service_token("pg-proxy", Duration::from_secs(600))
        .unwrap();
    std::fs::write(&file, format!("{renewed}\n")).unwrap();
    open(proxy.clone(), agent.clone()).await.unwrap();

    // An agent's token in the file is not a service's: refused.
    std::fs::write(&file, &agent).unwrap();
    let refused = open(proxy.clone(), agent.clone()).await.unwrap_err();
    assert!(
        matches!(refused, Refused::Unauthenticated(_) | Refused::Denied(_)),
        "{refused:?}"
    );

    // No file: nothing is asked, the agent is refused.
    std::fs::remove_file(&file).unwrap();
    let refused = open(proxy, agent).await.unwrap_err();
    assert!(
        matches!(&refused, Refused::Unavailable(m) if m.contains("no valid service token")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn authz_unreachable_fails_closed() {
    let port = free_port().unwrap();
    let client = AuthzClient::new(&format!("http://127.0.0.1:{port}"), "token", None).unwrap();
    let refused = client
        .open_session(
            Credential {
                kind: Some(Kind::Password("t".into())),
            },
            "prod-db",
            "read",
            Protocol::Postgres,
            "",
            ClientInfo::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(refused, Refused::Unavailable(_)), "{refused:?}");
    let message = refused.to_string();
    assert!(
        message.contains("authz is unreachable") && message.contains(&port.to_string()),
        "{message}"
    );
}

/// A JWKS endpoint on loopback: the stand-in for an external OIDC issuer.
async fn jwks_server(keys: Arc<Mutex<serde_json::Value>>) -> String {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let keys = keys.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = keys.lock().unwrap().to_string();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

fn external_token(key: &ed25519_dalek::SigningKey, kid: &str, sub: &str, aud: &str) -> String {
    let now = now_secs();
    let claims = serde_json::json!({"iss": "https://ci.example", "sub": sub, "aud": aud, "exp": now + 300, "iat": now, "groups": ["ci"]});
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    let der = key.to_pkcs8_der().unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(der.as_bytes())).unwrap()
}

fn jwk(key: &ed25519_dalek::SigningKey, kid: &str) -> serde_json::Value {
    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid,
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_token_exchange_with_jwks_refresh() {
    let k1 = ed25519_dalek::SigningKey::from_bytes(&[21; 32]);
    let k2 = ed25519_dalek::SigningKey::from_bytes(&[22; 32]);
    let keys = Arc::new(Mutex::new(serde_json::json!({"keys": [jwk(&k1, "k1")]})));
    let url = jwks_server(keys.clone()).await;
    let s = Stack::start(vec![OidcIssuerConfig {
        issuer: "https://ci.example".into(),
        jwks_url: url,
        audience: "agentgate".into(),
        subject_claim: "sub".into(),
        subject_prefix: "workload:ci/".into(),
        groups_claim: Some("groups".into()),
        groups: vec![],
        kind: "agent".into(),
    }])
    .await;
    let mut grpc = s.grpc().await;
    let exchanged = grpc
        .exchange_token(ExchangeTokenRequest {
            external_token: external_token(&k1, "k1", "build-42", "agentgate"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let p = exchanged.principal.unwrap();
    assert_eq!(p.subject, "workload:ci/build-42");
    assert_eq!(p.groups, vec!["ci".to_string()]);
    // The short-lived agentgate token it got opens a session the policy allows.
    assert!(s.open(&exchanged.token, "prod-db", "read").await.is_ok());

    // Wrong audience and an unknown key are refused.
    let wrong_aud = grpc
        .exchange_token(ExchangeTokenRequest {
            external_token: external_token(&k1, "k1", "build-42", "other"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_aud.code(), tonic::Code::Unauthenticated);
    let unknown = grpc
        .exchange_token(ExchangeTokenRequest {
            external_token: external_token(&k2, "k2", "build-42", "agentgate"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        unknown.message().contains("unknown key"),
        "{}",
        unknown.message()
    );
    // The issuer rotates in k2: a token naming it makes authz fetch the keys again.
    keys.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(jwk(&k2, "k2"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let rotated = grpc
        .exchange_token(ExchangeTokenRequest {
            external_token: external_token(&k2, "k2", "build-42", "agentgate"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rotated.token.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_storage_keeps_revocations_across_restarts() {
    agentgate_tls::install_crypto_provider();
    let pg = agentgate_integration_tests::Postgres::start().unwrap();
    let url = pg
        .create_owned_database("authz", "agentgate_authz")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.cedar");
    std::fs::write(&policy, POLICY).unwrap();
    let config = AuthzConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
        database_url: Some(url),
        policy: Some(policy),
        connections: vec![ConnectionConfig {
            name: "prod-db".into(),
            protocol: "postgres".into(),
            upstream: "127.0.0.1:5432".into(),
            roles: [(
                "read".to_string(),
                UpstreamConfig {
                    user: "agent_ro".into(),
                    secret: None,
                },
            )]
            .into_iter()
            .collect(),
            settings: Default::default(),
        }],
        ..Default::default()
    };
    let authz = agentgate_authz::start(&config, dir.path()).await.unwrap();
    let admin = std::fs::read_to_string(&authz.admin_token_path).unwrap();
    let url = format!("http://{}", authz.addr);
    let mut grpc = AuthzGrpc::connect(url.clone()).await.unwrap();
    let issued = grpc
        .issue_token(bearer(
            &admin,
            IssueTokenRequest {
                subject: "agent:deploy-bot".into(),
                groups: vec!["agents".into()],
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let proxy = AuthzClient::new(
        &url,
        &authz
            .service_token("pg-proxy", Duration::from_secs(600))
            .unwrap(),
        None,
    )
    .unwrap();
    let open = |proxy: AuthzClient, token: String| async move {
        proxy
            .open_session(
                Credential {
                    kind: Some(Kind::BearerToken(token)),
                },
                "prod-db",
                "read",
                Protocol::Postgres,
                "",
                ClientInfo::default(),
            )
            .await
    };
    assert!(open(proxy.clone(), issued.token.clone()).await.is_ok());
    grpc.revoke_token(bearer(
        &admin,
        RevokeTokenRequest {
            token_id: issued.token_id.clone(),
            reason: "test".into(),
        },
    ))
    .await
    .unwrap();
    authz.shutdown().await.unwrap();

    // A new authz on the same database still refuses the revoked token.
    let authz = agentgate_authz::start(&config, dir.path()).await.unwrap();
    let proxy = AuthzClient::new(
        &url,
        &authz
            .service_token("pg-proxy", Duration::from_secs(600))
            .unwrap(),
        None,
    )
    .unwrap();
    match open(proxy, issued.token).await {
        Err(Refused::Unauthenticated(m)) => assert!(m.contains("revoked"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_services_verify_tokens_with_the_published_public_key() {
    let s = Stack::start(Vec::new()).await;
    let path = s.dir.path().join(agentgate_authz::PUBLIC_KEY_FILE);
    let auth =
        agentgate_approvals::authenticator_from_config(&agentgate_approvals::config::AuthConfig {
            issuer: "agentgate".into(),
            public_keys: vec![path],
        })
        .unwrap();
    let principal = auth.authenticate(&s.agent_token(), None).await.unwrap();
    assert_eq!(principal.subject, "agent:deploy-bot");
    let foreign = agentgate_identity::TokenIssuer::new(
        &ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
        "agentgate",
    )
    .unwrap();
    let (t, _) = foreign
        .issue(&TokenRequest {
            subject: "agent:x".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
            audience: vec![],
            ttl: Duration::from_secs(60),
        })
        .unwrap();
    assert!(auth.authenticate(&t, None).await.is_err());
}
