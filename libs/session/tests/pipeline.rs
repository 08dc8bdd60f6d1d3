//! The session pipeline against the real control plane, in process: authz (SQLite, Cedar
//! policy), approvals (SQLite) and the audit store (SQLite), all on free loopback ports, with
//! real signed tokens. Nothing is mocked.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agentgate_authz::client::AuthzClient;
use agentgate_authz::{AuthzConfig, ConnectionConfig, RunningAuthz, UpstreamConfig};
use agentgate_identity::TokenRequest;
use agentgate_integration_tests::{AuditStoreFixture, Backend, bearer, free_port};
use agentgate_masking::MaskReport;
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{GetRequest, ReviewRequest, State, Verdict};
use agentgate_proto::audit::v1::GetSessionEventsRequest;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::authz::v1::authz_client::AuthzClient as AuthzGrpc;
use agentgate_proto::authz::v1::credential::Kind;
use agentgate_proto::authz::v1::{
    Credential, GrantSource, RequestAccessRequest, RevokeGrantRequest, RevokeTokenRequest,
};
use agentgate_proto::common::v1::{Decision, Operation, PrincipalKind, Protocol};
use agentgate_recorder::{Recorder, RecorderConfig};
use agentgate_session::{
    ApprovalOutcome, EndReason, Gateway, GatewayConfig, GrantStreamState, OperationEvent, Refused,
    Session,
};

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource)
when { context.role == "read" };

@id("agents-request-write")
@max_duration("1h")
@approvers("dba")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"request_access", resource == Agentgate::Connection::"prod-db")
when { context.role == "write" };

@id("operations")
permit (principal, action == Agentgate::Action::"execute", resource);

@id("ddl-needs-dba")
@approvers("dba")
@approval_timeout("60s")
forbid (principal, action == Agentgate::Action::"execute", resource == Agentgate::Connection::"prod-db")
when { context.risk_class == "sql.ddl" }
unless { context.approved };

@id("ddl-needs-dba-quickly")
@approvers("dba")
@approval_timeout("2s")
forbid (principal, action == Agentgate::Action::"execute", resource == Agentgate::Connection::"quick-db")
when { context.risk_class == "sql.ddl" }
unless { context.approved };

@id("no-dcl")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.dcl" };

@id("mask-emails")
@mask("detector:email")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);
"#;

/// authz, approvals and the audit store, and a gateway as a pg-proxy would hold it.
struct Stack {
    audit: AuditStoreFixture,
    authz: Option<RunningAuthz>,
    authz_url: String,
    approvals: Option<agentgate_approvals::RunningApprovals>,
    approvals_url: String,
    recorder: Recorder,
    gateway: Gateway,
    service_token: String,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        agentgate_tls::install_crypto_provider();
        // The store checks tokens with authz's own authenticator, set once authz runs (as
        // `agentgate up` wires it).
        let authn = Arc::new(agentgate_identity::LateAuthenticator::new(
            "authz is starting",
        ));
        let audit = AuditStoreFixture::start_with(Backend::Sqlite, 100, authn.clone())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.cedar");
        std::fs::write(&policy, POLICY).unwrap();
        let secret = dir.path().join("ro.secret");
        std::fs::write(&secret, "s3cret-ro\n").unwrap();
        let roles = [
            (
                "read".to_owned(),
                UpstreamConfig {
                    user: "agent_ro".into(),
                    secret: Some(format!("file:{}", secret.display())),
                },
            ),
            (
                "write".to_owned(),
                UpstreamConfig {
                    user: "agent_rw".into(),
                    secret: None,
                },
            ),
        ];
        let approvals_port = free_port().unwrap();
        let approvals_url = format!("http://127.0.0.1:{approvals_port}");
        let config = AuthzConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
            policy: Some(policy),
            approvals_url: Some(approvals_url.clone()),
            connections: ["prod-db", "quick-db"]
                .map(|name| ConnectionConfig {
                    name: name.into(),
                    protocol: "postgres".into(),
                    upstream: "127.0.0.1:5432".into(),
                    roles: roles.iter().cloned().collect(),
                    settings: [("database".to_owned(), "app".to_owned())].into(),
                })
                .to_vec(),
            ..Default::default()
        };
        let authz = agentgate_authz::start(&config, dir.path()).await.unwrap();
        authn.set(authz.authenticator());
        let approvals_config = agentgate_approvals::ApprovalsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], approvals_port)),
            audit: agentgate_approvals::config::AuditConfig {
                // approvals' own events are not what these tests look at: nothing listens.
                endpoint: format!("http://127.0.0.1:{}", free_port().unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        let approvals = agentgate_approvals::start(
            &approvals_config,
            dir.path(),
            authz.authenticator(),
            None,
            None,
        )
        .await
        .unwrap();
        let authz_url = format!("http://{}", authz.addr);
        let service_token = authz
            .service_token("pg-proxy", Duration::from_secs(600))
            .unwrap();
        let recorder = Recorder::open(
            RecorderConfig::new(audit.endpoint(), dir.path().join("pg-proxy-spool.db"))
                .with_token_source(authz.recorder_token_source("pg-proxy")),
        )
        .await
        .unwrap();
        let gateway = gateway(&authz_url, &approvals_url, &service_token, recorder.clone());
        Stack {
            audit,
            authz: Some(authz),
            authz_url,
            approvals: Some(approvals),
            approvals_url,
            recorder,
            gateway,
            service_token,
            _dir: dir,
        }
    }

    fn authz(&self) -> &RunningAuthz {
        self.authz.as_ref().unwrap()
    }

    /// A token for `subject`; returns it with its token id.
    fn token(
        &self,
        subject: &str,
        kind: PrincipalKind,
        groups: &[&str],
        ttl: Duration,
    ) -> (String, String) {
        let (token, claims) = self
            .authz()
            .core
            .issuer
            .issue(&TokenRequest {
                subject: subject.into(),
                kind,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                audience: Vec::new(),
                ttl,
            })
            .unwrap();
        (token, claims.jti)
    }

    fn agent(&self) -> (String, String) {
        self.token(
            "agent:deploy-bot",
            PrincipalKind::Agent,
            &["agents"],
            Duration::from_secs(600),
        )
    }

    fn alice(&self) -> String {
        self.token(
            "human:alice",
            PrincipalKind::Human,
            &["dba"],
            Duration::from_secs(600),
        )
        .0
    }

    fn admin(&self) -> String {
        self.token(
            "human:admin",
            PrincipalKind::Human,
            &["admin"],
            Duration::from_secs(600),
        )
        .0
    }

    async fn open(&self, token: &str, connection: &str, role: &str) -> Result<Session, Refused> {
        self.gateway
            .open(
                password(token),
                connection,
                role,
                "10.9.8.7:54321",
                "psql 16.2",
            )
            .await
    }

    async fn approvals(&self) -> ApprovalsClient<tonic::transport::Channel> {
        ApprovalsClient::connect(self.approvals_url.clone())
            .await
            .unwrap()
    }

    async fn authz_grpc(&self) -> AuthzGrpc<tonic::transport::Channel> {
        AuthzGrpc::connect(self.authz_url.clone()).await.unwrap()
    }

    async fn review(&self, id: &str, verdict: Verdict, comment: &str) {
        self.approvals()
            .await
            .review(bearer(
                &self.alice(),
                ReviewRequest {
                    id: id.to_owned(),
                    verdict: verdict as i32,
                    comment: comment.to_owned(),
                },
            ))
            .await
            .unwrap();
    }

    async fn approval_state(&self, id: &str) -> agentgate_proto::approvals::v1::ApprovalRequest {
        self.approvals()
            .await
            .get(bearer(
                &self.service_token,
                GetRequest { id: id.to_owned() },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn grant_stream_connected(&self) {
        let mut state = self.gateway.grant_stream();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| *s == GrantStreamState::Connected),
        )
        .await
        .expect("the gateway subscribes to grant events")
        .unwrap();
    }

    /// The session's events as the audit store holds them, once the recorder shipped them.
    async fn stored_events(&self, session: &str) -> Vec<agentgate_proto::audit::v1::AuditEvent> {
        self.recorder.flush(Duration::from_secs(20)).await.unwrap();
        let auditor = self
            .token(
                "human:auditor",
                PrincipalKind::Human,
                &["auditor"],
                Duration::from_secs(600),
            )
            .0;
        let mut client = self.audit.client_as(&auditor).await.unwrap();
        client
            .get_session_events(GetSessionEventsRequest {
                session_id: session.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .into_iter()
            .map(|e| e.event.unwrap())
            .collect()
    }
}

fn gateway(authz_url: &str, approvals_url: &str, token: &str, recorder: Recorder) -> Gateway {
    let authz = AuthzClient::new(authz_url, token, None).unwrap();
    let mut config = GatewayConfig::new("pg-proxy-test", Protocol::Postgres, approvals_url, token);
    config.approvals_retry = Duration::from_secs(2);
    config.grant_stream_max_backoff = Duration::from_millis(500);
    Gateway::start(authz, recorder, config).unwrap()
}

fn password(token: &str) -> Credential {
    Credential {
        kind: Some(Kind::Password(token.to_owned())),
    }
}

fn op(text: &str, class: &str) -> Operation {
    Operation {
        protocol: Protocol::Postgres as i32,
        action: text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_lowercase(),
        text: text.to_owned(),
        targets: vec!["users".into()],
        risk_classes: vec![class.to_owned()],
        ..Default::default()
    }
}

/// Waits for `ended()` and says how late it fired after the session's expiry.
async fn ended_within(session: &Session, limit: Duration) -> (EndReason, Duration) {
    let reason = tokio::time::timeout(limit, session.ended())
        .await
        .expect("the session ends in time");
    let late = SystemTime::now()
        .duration_since(session.expires_at())
        .unwrap_or_default();
    (reason, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_decide_mask_record_close_lands_in_the_store_in_order() {
    let s = Stack::start().await;
    let (token, _) = s.agent();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    assert_eq!(session.principal().subject, "agent:deploy-bot");
    assert_eq!(session.grant().source, GrantSource::Standing as i32);
    assert_eq!(session.connection().name, "prod-db");
    assert_eq!(session.connection().settings["database"], "app");
    assert_eq!(session.role(), "read");
    assert_eq!(session.upstream().user(), "agent_ro");
    assert_eq!(session.upstream().secret(), b"s3cret-ro");
    assert!(
        !format!("{session:?}").contains("s3cret"),
        "the upstream secret stays out of Debug output"
    );
    assert!(session.expires_at() > SystemTime::now() + Duration::from_secs(500));
    assert!(!session.policy().risk_rules.is_empty());
    assert_eq!(s.gateway.live_sessions(), 1);

    assert_eq!(
        session.decide(&op("SELECT 1", "sql.read")).decision,
        Decision::Allow
    );
    assert_eq!(
        session
            .decide(&op("GRANT ALL ON users TO x", "sql.dcl"))
            .decision,
        Decision::Deny
    );
    let ddl = session.decide(&op("DROP TABLE users", "sql.ddl"));
    assert_eq!(ddl.decision, Decision::NeedsApproval);
    assert_eq!(ddl.rule.as_ref().unwrap().approver_groups, ["dba"]);

    // The policy's masking rule is in the session's masker.
    let mut report = MaskReport::new();
    let shown = session
        .masker()
        .mask_text("contact ann@example.com", &mut report);
    assert!(!shown.contains("ann@"), "{shown}");
    assert_eq!(report.total(), 1);

    let read = op("SELECT email FROM users", "sql.read");
    let mut event = OperationEvent::new(read.clone(), &session.decide(&read));
    event.rows = 3;
    event.bytes = 120;
    event.duration = Duration::from_micros(850);
    event.status = "SELECT 3".into();
    event.masked = report;
    event.parameters = vec!["$1 = ***".into()];
    session.record_operation(event).await.unwrap();
    let dcl = op("GRANT ALL ON users TO x", "sql.dcl");
    let mut denied = OperationEvent::new(dcl.clone(), &session.decide(&dcl));
    denied.error = "denied by policy".into();
    session.record_operation(denied).await.unwrap();
    session.count_bytes(64, 512);
    session.close(EndReason::ClientClosed).await.unwrap();
    // A second close does nothing; recording after close is refused.
    session.close(EndReason::Shutdown).await.unwrap();
    assert!(
        session
            .record_operation(OperationEvent::new(read.clone(), &session.decide(&read)))
            .await
            .is_err()
    );
    assert_eq!(s.gateway.live_sessions(), 0);

    let events = s.stored_events(session.id()).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "session.start",
            "session.query",
            "session.query",
            "session.end"
        ]
    );
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4]);
    for e in &events {
        assert_eq!(e.session_id, session.id());
        assert_eq!(e.principal.as_ref().unwrap().subject, "agent:deploy-bot");
        assert_eq!(e.source_address, "10.9.8.7:54321");
        assert_eq!(e.connection, "prod-db");
        assert_eq!(e.role, "read");
        assert_eq!(e.protocol, Protocol::Postgres as i32);
    }
    match &events[0].detail {
        Some(Detail::SessionStarted(start)) => {
            assert_eq!(start.client, "psql 16.2");
            assert_eq!(start.upstream_user, "agent_ro");
            assert_eq!(start.grant_id, session.grant().id);
        }
        other => panic!("session.start detail: {other:?}"),
    }
    assert_eq!(events[0].attributes["proxy"], "pg-proxy-test");
    match &events[1].detail {
        Some(Detail::Operation(o)) => {
            assert_eq!(
                o.operation.as_ref().unwrap().text,
                "SELECT email FROM users"
            );
            assert_eq!(o.operation.as_ref().unwrap().risk_classes, ["sql.read"]);
            assert_eq!(o.decision, Decision::Allow as i32);
            assert_eq!((o.rows, o.bytes, o.duration_us), (3, 120, 850));
            assert_eq!(o.status, "SELECT 3");
            assert_eq!(o.parameters, ["$1 = ***"]);
            assert_eq!(o.masked.len(), 1);
            assert_eq!(o.masked[0].count, 1);
            assert!(o.started_at.is_some());
        }
        other => panic!("operation detail: {other:?}"),
    }
    assert_eq!(events[1].attributes["decided_by"], "sql.read");
    // Every operation names the policy that decided it.
    assert_eq!(
        events[1].attributes.get("policy_version"),
        Some(&session.policy().version),
        "{:?}",
        events[1].attributes
    );
    assert!(!session.policy().version.is_empty());
    match &events[2].detail {
        Some(Detail::Operation(o)) => {
            assert_eq!(o.decision, Decision::Deny as i32);
            assert_eq!(o.error, "denied by policy");
        }
        other => panic!("operation detail: {other:?}"),
    }
    match &events[3].detail {
        Some(Detail::SessionEnded(end)) => {
            assert_eq!(end.reason, "client closed");
            assert_eq!(end.operations, 2);
            assert_eq!((end.bytes_in, end.bytes_out), (64, 512));
        }
        other => panic!("session.end detail: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_unreachable_authz_are_refused() {
    let s = Stack::start().await;
    match s.open("not-a-token", "prod-db", "read").await {
        Err(Refused::Unauthenticated(m)) => assert!(!m.is_empty()),
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    // A signature from another key.
    let forged = agentgate_integration_tests::test_token(
        &agentgate_identity::TokenIssuer::new(
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            "agentgate",
        )
        .unwrap(),
        "agent:deploy-bot",
        PrincipalKind::Agent,
        &["agents"],
    )
    .unwrap();
    assert!(matches!(
        s.open(&forged, "prod-db", "read").await,
        Err(Refused::Unauthenticated(_))
    ));
    // No grant: denied, with the way to ask for one.
    let (token, _) = s.agent();
    match s.open(&token, "prod-db", "write").await {
        Err(e @ Refused::Denied(_)) => {
            let m = agentgate_session::refusal_message(&e);
            assert!(m.contains("agentgate access request"), "{m}");
            assert!(!m.contains('\n'));
        }
        other => panic!("expected Denied, got {other:?}"),
    }

    let nowhere = format!("http://127.0.0.1:{}", free_port().unwrap());
    let g = gateway(
        &nowhere,
        &s.approvals_url,
        &s.service_token,
        s.recorder.clone(),
    );
    let started = Instant::now();
    match g
        .open(password(&token), "prod-db", "read", "10.0.0.1:1", "psql")
        .await
    {
        Err(e @ Refused::Unavailable(_)) => {
            assert!(
                agentgate_session::refusal_message(&e).contains("authz is unreachable"),
                "{e}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(g.live_sessions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_grant_ends_the_session_within_a_second_of_expiry() {
    let s = Stack::start().await;
    let (token, _) = s.token(
        "agent:deploy-bot",
        PrincipalKind::Agent,
        &["agents"],
        Duration::from_secs(2),
    );
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    let (reason, late) = ended_within(&session, Duration::from_secs(5)).await;
    assert_eq!(reason, EndReason::GrantExpired);
    assert!(late < Duration::from_secs(1), "ended {late:?} after expiry");
    assert!(reason.message().contains("expired"));
    session.close(reason).await.unwrap();
    let events = s.stored_events(session.id()).await;
    match &events.last().unwrap().detail {
        Some(Detail::SessionEnded(end)) => assert_eq!(end.reason, "grant expired"),
        other => panic!("{other:?}"),
    }
}

/// A TCP relay to `target` standing in for the network between a proxy and authz: `cut`
/// drops every connection and refuses new ones until `restore`.
struct Relay {
    url: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (up, _) = tokio::sync::watch::channel(true);
        let watch = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut state = watch.subscribe();
                if !*state.borrow_and_update() {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { url, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_ends_the_session_while_authz_is_unreachable() {
    let s = Stack::start().await;
    let relay = Relay::start(s.authz().addr).await;
    let g = gateway(
        &relay.url,
        &s.approvals_url,
        &s.service_token,
        s.recorder.clone(),
    );
    let (token, _) = s.token(
        "agent:deploy-bot",
        PrincipalKind::Agent,
        &["agents"],
        Duration::from_secs(3),
    );
    let session = g
        .open(password(&token), "prod-db", "read", "10.0.0.1:1", "psql")
        .await
        .unwrap();
    let mut state = g.grant_stream();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|st| *st == GrantStreamState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    // authz's EXPIRED event cannot reach the proxy now: only the session's own timer can.
    relay.cut();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|st| matches!(st, GrantStreamState::Disconnected(_))),
    )
    .await
    .expect("the gateway notices authz is gone")
    .unwrap();
    let (reason, late) = ended_within(&session, Duration::from_secs(6)).await;
    assert_eq!(reason, EndReason::GrantExpired);
    assert!(late < Duration::from_secs(1), "ended {late:?} after expiry");
    // Closing still records the end; authz's CloseSession is best effort.
    let started = Instant::now();
    session.close(reason).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let events = s.stored_events(session.id()).await;
    assert_eq!(events.last().unwrap().kind, "session.end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_during_a_partition_ends_the_session_on_reconnect() {
    let s = Stack::start().await;
    let relay = Relay::start(s.authz().addr).await;
    let g = gateway(
        &relay.url,
        &s.approvals_url,
        &s.service_token,
        s.recorder.clone(),
    );
    let (token, jti) = s.agent();
    let session = g
        .open(password(&token), "prod-db", "read", "10.0.0.1:1", "psql")
        .await
        .unwrap();
    let kept = g
        .open(
            password(&s.agent().0),
            "prod-db",
            "read",
            "10.0.0.1:2",
            "psql",
        )
        .await
        .unwrap();
    let mut state = g.grant_stream();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|st| *st == GrantStreamState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    relay.cut();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|st| matches!(st, GrantStreamState::Disconnected(_))),
    )
    .await
    .unwrap()
    .unwrap();
    // The TOKEN_REVOKED event is sent while nobody listens.
    s.authz_grpc()
        .await
        .revoke_token(bearer(
            &s.admin(),
            RevokeTokenRequest {
                token_id: jti,
                reason: "leaked".into(),
            },
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(session.end_reason(), None);
    relay.restore();
    let reason = tokio::time::timeout(Duration::from_secs(10), session.ended())
        .await
        .expect("the re-check on reconnect ends the session");
    assert!(
        matches!(&reason, EndReason::EndedByAuthz(m) if m.contains("no longer knows")),
        "{reason:?}"
    );
    // A session authz still knows is left alone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kept.end_reason(), None);
    session.close(reason).await.unwrap();
    kept.close(EndReason::ClientClosed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_ends_the_session_through_the_grant_stream() {
    let s = Stack::start().await;
    let (token, _) = s.agent();
    // Just-in-time access: the agent asks, a DBA approves, authz issues the grant.
    let asked = s
        .authz_grpc()
        .await
        .request_access(bearer(
            &token,
            RequestAccessRequest {
                connection: "prod-db".into(),
                role: "write".into(),
                duration: Some(prost_types::Duration {
                    seconds: 1800,
                    nanos: 0,
                }),
                reason: "migration 42".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    s.review(&asked.approval_id, Verdict::Approve, "ok").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        match s.open(&token, "prod-db", "write").await {
            Ok(session) => break session,
            Err(Refused::Denied(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no session on the approved grant: {e}"),
        }
    };
    assert_eq!(session.grant().source, GrantSource::JustInTime as i32);
    assert_eq!(session.upstream().user(), "agent_rw");
    s.grant_stream_connected().await;

    let revoked_at = Instant::now();
    s.authz_grpc()
        .await
        .revoke_grant(bearer(
            &s.admin(),
            RevokeGrantRequest {
                grant_id: session.grant().id.clone(),
                reason: "incident 7".into(),
            },
        ))
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), session.ended())
        .await
        .expect("the revocation ends the session");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    match &reason {
        EndReason::GrantRevoked(why) => assert!(why.contains("incident 7"), "{why}"),
        other => panic!("expected GrantRevoked, got {other:?}"),
    }
    assert_eq!(session.end_reason(), Some(reason.clone()));
    session.close(reason).await.unwrap();
    let events = s.stored_events(session.id()).await;
    match &events.last().unwrap().detail {
        Some(Detail::SessionEnded(end)) => {
            assert_eq!(end.reason, "grant revoked: incident 7")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_a_held_operation_and_its_session() {
    let s = Stack::start().await;
    let (token, jti) = s.agent();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    s.grant_stream_connected().await;
    let ddl = op("DROP TABLE users", "sql.ddl");
    let decision = session.decide(&ddl);
    let (pending_tx, pending_rx) = tokio::sync::oneshot::channel();
    let hold = {
        let session = session.clone();
        let ddl = ddl.clone();
        tokio::spawn(async move {
            session
                .hold_for_approval(&ddl, &decision, "", |p| {
                    let _ = pending_tx.send(p.id.clone());
                })
                .await
        })
    };
    let id = pending_rx.await.unwrap();
    s.authz_grpc()
        .await
        .revoke_token(bearer(
            &s.admin(),
            RevokeTokenRequest {
                token_id: jti,
                reason: "leaked".into(),
            },
        ))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), hold)
        .await
        .unwrap()
        .unwrap();
    match &outcome {
        ApprovalOutcome::SessionEnded {
            approval_id,
            reason: EndReason::TokenRevoked(why),
        } => {
            assert_eq!(approval_id.as_deref(), Some(id.as_str()));
            assert!(why.contains("leaked"), "{why}");
        }
        other => panic!("expected SessionEnded(TokenRevoked), got {other:?}"),
    }
    assert!(!outcome.is_approved());
    // The request no longer waits for a reviewer.
    assert_eq!(s.approval_state(&id).await.state, State::Cancelled as i32);
    session.close(session.end_reason().unwrap()).await.unwrap();
}

/// Holds `text` in a session on `connection`; a DBA answers with `verdict` (or nobody, for
/// `None`) as soon as the request exists.
async fn hold(
    s: &Stack,
    connection: &str,
    verdict: Option<(Verdict, &str)>,
) -> (
    Session,
    ApprovalOutcome,
    agentgate_session::PendingApproval,
    Duration,
) {
    let (token, _) = s.agent();
    let session = s.open(&token, connection, "read").await.unwrap();
    let ddl = op("ALTER TABLE users DROP COLUMN email", "sql.ddl");
    let decision = session.decide(&ddl);
    assert_eq!(decision.decision, Decision::NeedsApproval);
    let (pending_tx, pending_rx) = tokio::sync::oneshot::channel();
    let started = Instant::now();
    let holding = session.hold_for_approval(&ddl, &decision, "drop the old column", |p| {
        let _ = pending_tx.send(p.clone());
    });
    let reviewing = async {
        let pending: agentgate_session::PendingApproval = pending_rx.await.unwrap();
        if let Some((verdict, comment)) = verdict {
            s.review(&pending.id, verdict, comment).await;
        }
        pending
    };
    let (outcome, pending) = tokio::join!(holding, reviewing);
    (session, outcome, pending, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_operation_resumes_when_a_reviewer_approves() {
    let s = Stack::start().await;
    let (session, outcome, pending, waited) =
        hold(&s, "prod-db", Some((Verdict::Approve, "looks fine"))).await;
    assert_eq!(
        pending.approve_command,
        format!("agentgate approvals approve {}", pending.id)
    );
    assert_eq!(pending.reviewer_groups, ["dba"]);
    assert!(pending.message().contains(&pending.approve_command));
    match &outcome {
        ApprovalOutcome::Approved { approval_id, by } => {
            assert_eq!(approval_id, &pending.id);
            assert_eq!(by, &["human:alice".to_owned()]);
        }
        other => panic!("expected Approved, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(10));
    // What the reviewer saw: the agent as requester, the policy's reviewers, this session.
    let request = s.approval_state(&pending.id).await;
    assert_eq!(request.state, State::Approved as i32);
    assert_eq!(request.requester.unwrap().subject, "agent:deploy-bot");
    assert_eq!(request.reviewer_groups, ["dba"]);
    assert_eq!(request.session_id, session.id());
    assert_eq!(request.reason, "drop the old column");
    assert_eq!(
        request.operation.unwrap().text,
        "ALTER TABLE users DROP COLUMN email"
    );

    let ddl = op("ALTER TABLE users DROP COLUMN email", "sql.ddl");
    let mut event = OperationEvent::new(ddl.clone(), &session.decide(&ddl));
    event.decision = outcome.decision();
    event.reason = outcome.message();
    event.approval_id = outcome.approval_id().unwrap().to_owned();
    session.record_operation(event).await.unwrap();
    session.close(EndReason::ClientClosed).await.unwrap();

    let events = s.stored_events(session.id()).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "session.start",
            "approval.requested",
            "approval.decided",
            "session.query",
            "session.end"
        ]
    );
    match &events[2].detail {
        Some(Detail::Approval(a)) => {
            assert_eq!(a.approval_id, pending.id);
            assert_eq!(a.state, "APPROVED");
        }
        other => panic!("{other:?}"),
    }
    match &events[3].detail {
        Some(Detail::Operation(o)) => {
            assert_eq!(o.approval_id, pending.id);
            assert_eq!(o.decision, Decision::Allow as i32);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_operation_is_refused_when_a_reviewer_denies() {
    let s = Stack::start().await;
    let (session, outcome, pending, _) = hold(
        &s,
        "prod-db",
        Some((Verdict::Deny, "not during business hours")),
    )
    .await;
    match &outcome {
        ApprovalOutcome::Denied {
            approval_id,
            by,
            reason,
        } => {
            assert_eq!(approval_id.as_deref(), Some(pending.id.as_str()));
            assert_eq!(by.as_deref(), Some("human:alice"));
            assert_eq!(reason, "not during business hours");
        }
        other => panic!("expected Denied, got {other:?}"),
    }
    assert_eq!(outcome.decision(), Decision::Deny);
    let m = outcome.message();
    assert!(
        m.contains("denied by human:alice: not during business hours"),
        "{m}"
    );
    session.close(EndReason::ClientClosed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_operation_times_out_and_its_request_is_cancelled() {
    let s = Stack::start().await;
    // quick-db's policy gives reviewers two seconds.
    let (session, outcome, pending, waited) = hold(&s, "quick-db", None).await;
    match &outcome {
        ApprovalOutcome::TimedOut { approval_id, after } => {
            assert_eq!(approval_id, &pending.id);
            assert!(*after >= Duration::from_secs(2), "{after:?}");
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    let request = s.approval_state(&pending.id).await;
    assert_eq!(request.state, State::Cancelled as i32);
    assert!(
        request.decision_comment.contains("not decided within 2s"),
        "{}",
        request.decision_comment
    );
    assert!(outcome.message().contains("no reviewer decided"));
    session.close(EndReason::ClientClosed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_operation_is_refused_when_approvals_is_unreachable() {
    let mut s = Stack::start().await;
    let (token, _) = s.agent();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    s.approvals.take().unwrap().shutdown().await.unwrap();
    let ddl = op("DROP TABLE users", "sql.ddl");
    let started = Instant::now();
    let mut told = false;
    let outcome = session
        .hold_for_approval(&ddl, &session.decide(&ddl), "", |_| told = true)
        .await;
    match &outcome {
        ApprovalOutcome::Unavailable {
            approval_id: None,
            reason,
        } => assert!(reason.contains(&s.approvals_url), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!told, "nothing is pending when nothing was created");
    assert!(!outcome.is_approved());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(outcome.message().contains("could not be obtained"));
    // A policy deny is never sent to reviewers.
    let dcl = op("GRANT ALL ON users TO x", "sql.dcl");
    assert!(matches!(
        session
            .hold_for_approval(&dcl, &session.decide(&dcl), "", |_| {})
            .await,
        ApprovalOutcome::Denied {
            approval_id: None,
            ..
        }
    ));
    session.close(EndReason::ClientClosed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_is_still_closed_and_recorded() {
    let s = Stack::start().await;
    let (token, _) = s.agent();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    let id = session.id().to_owned();
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.gateway.live_sessions() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.gateway.live_sessions(), 0);
    let events = s.stored_events(&id).await;
    let last = events.last().unwrap();
    assert_eq!(last.kind, "session.end");
    match &last.detail {
        Some(Detail::SessionEnded(end)) => {
            assert!(end.reason.contains("without closing"), "{}", end.reason)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_operations_keep_their_order_without_waiting_for_the_disk() {
    let s = Stack::start().await;
    let (token, _) = s.agent();
    let session = s.open(&token, "prod-db", "read").await.unwrap();
    const N: usize = 1500;
    let read = op("SELECT 1", "sql.read");
    let decision = session.decide(&read);
    let started = Instant::now();
    for i in 0..N {
        let mut operation = read.clone();
        operation.text = format!("SELECT {i}");
        session
            .record_operation(OperationEvent::new(operation, &decision))
            .await
            .unwrap();
    }
    let queued = started.elapsed();
    session.close(EndReason::ClientClosed).await.unwrap();
    let durable = started.elapsed();
    println!(
        "{N} operations: {:?} per record_operation call, {:?} per event until durable",
        queued / N as u32,
        durable / N as u32
    );
    let events = s.stored_events(session.id()).await;
    assert_eq!(events.len(), N + 2);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1);
    }
    for (i, e) in events[1..=N].iter().enumerate() {
        match &e.detail {
            Some(Detail::Operation(o)) => {
                assert_eq!(o.operation.as_ref().unwrap().text, format!("SELECT {i}"))
            }
            other => panic!("{other:?}"),
        }
    }
    match &events[N + 1].detail {
        Some(Detail::SessionEnded(end)) => assert_eq!(end.operations, N as u64),
        other => panic!("{other:?}"),
    }
}
