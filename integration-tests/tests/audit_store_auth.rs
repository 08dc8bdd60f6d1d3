//! Nothing of the audit store is open without a credential, on loopback included: every call
//! needs a valid token, Ingest a service principal, reading group admin or auditor, Prune
//! admin. A recorder whose token is refused loses nothing: its events wait in the spool and
//! ship once it has a valid one. Run against both backends where storage is involved.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_audit_store::access::{ADMIN_GROUP, AUDITOR_GROUP};
use agentgate_identity::{AUDIT_STORE_AUDIENCE, LateAuthenticator, TokenIssuer, TokenRequest};
use agentgate_integration_tests::{
    AuditClient, AuditStoreFixture, Backend, bearer, free_port, recorder_token, test_token_issuer,
};
use agentgate_proto::audit::v1::audit_store_client::AuditStoreClient;
use agentgate_proto::audit::v1::{
    AuditEvent, CheckpointRequest, ExportRequest, GetSessionEventsRequest, IngestRequest,
    ListSessionsRequest, PruneRequest, ReplaySessionRequest, VerifyRequest,
};
use agentgate_proto::common::v1::{Principal, PrincipalKind, Protocol};
use agentgate_recorder::{Recorder, SessionContext, TokenSource};
use futures::StreamExt as _;
use tonic::Code;
use tonic::transport::Channel;

fn now() -> prost_types::Timestamp {
    agentgate_audit_store::us_timestamp(agentgate_audit_store::store::now_us())
}

fn events(session: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<AuditEvent> {
    seqs.map(|seq| AuditEvent {
        session_id: session.into(),
        sequence: seq,
        time: Some(now()),
        kind: "session.query".into(),
        principal: Some(Principal {
            subject: "agent:bot".into(),
            ..Default::default()
        }),
        connection: "prod-db".into(),
        protocol: Protocol::Postgres as i32,
        ..Default::default()
    })
    .collect()
}

/// Opens an Ingest stream with one batch on a raw client (so the token is per request),
/// and returns the first answer.
async fn ingest_once(
    client: &mut AuditStoreClient<Channel>,
    token: Option<&str>,
) -> Result<u32, tonic::Status> {
    let batch = IngestRequest {
        batch_id: 1,
        events: events(&uuid::Uuid::now_v7().to_string(), 1..=2),
    };
    let stream = tokio_stream::iter(vec![batch]);
    let request = match token {
        Some(t) => bearer(t, stream),
        None => tonic::Request::new(stream),
    };
    let mut acks = client.ingest(request).await?.into_inner();
    match acks.next().await {
        Some(ack) => Ok(ack?.stored),
        None => Err(tonic::Status::unknown("no acknowledgement")),
    }
}

/// Every call of the API, each as `(name, result code)` with `token` (or none).
async fn every_call(
    client: &mut AuditStoreClient<Channel>,
    token: Option<&str>,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    fn req<T>(token: Option<&str>, m: T) -> tonic::Request<T> {
        match token {
            Some(t) => bearer(t, m),
            None => tonic::Request::new(m),
        }
    }
    let session = uuid::Uuid::now_v7().to_string();
    let ok = |r: Result<(), tonic::Status>| match r {
        // A session that does not exist is a verdict after the credential was accepted.
        Err(s) if s.code() == Code::NotFound => Ok(()),
        other => other,
    };
    vec![
        ("Ingest", ingest_once(client, token).await.map(|_| ())),
        (
            "ListSessions",
            client
                .list_sessions(req(token, ListSessionsRequest::default()))
                .await
                .map(|_| ()),
        ),
        (
            "GetSessionEvents",
            ok(client
                .get_session_events(req(
                    token,
                    GetSessionEventsRequest {
                        session_id: session.clone(),
                    },
                ))
                .await
                .map(|_| ())),
        ),
        (
            "ReplaySession",
            ok(client
                .replay_session(req(
                    token,
                    ReplaySessionRequest {
                        session_id: session.clone(),
                    },
                ))
                .await
                .map(|_| ())),
        ),
        (
            "Verify",
            client
                .verify(req(token, VerifyRequest {}))
                .await
                .map(|_| ()),
        ),
        (
            "Checkpoint",
            client
                .checkpoint(req(token, CheckpointRequest {}))
                .await
                .map(|_| ())
                .or_else(|s| {
                    // An empty chain has nothing to sign: the call itself was allowed.
                    if s.code() == Code::FailedPrecondition {
                        Ok(())
                    } else {
                        Err(s)
                    }
                }),
        ),
        ("Export", export(client, token).await),
        (
            "Prune",
            client
                .prune(req(
                    token,
                    PruneRequest {
                        before: Some(prost_types::Timestamp {
                            seconds: 1_000_000_000,
                            nanos: 0,
                        }),
                    },
                ))
                .await
                .map(|_| ()),
        ),
    ]
}

async fn export(
    client: &mut AuditStoreClient<Channel>,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let request = match token {
        Some(t) => bearer(t, ExportRequest::default()),
        None => tonic::Request::new(ExportRequest::default()),
    };
    let mut stream = client.export(request).await?.into_inner();
    while let Some(chunk) = stream.next().await {
        chunk?;
    }
    Ok(())
}

/// Asserts which calls `token` may make: every call named in `allowed` succeeds, every other
/// is refused with `refused` and a message containing `needle`.
async fn assert_calls(
    fx: &AuditStoreFixture,
    token: Option<&str>,
    allowed: &[&str],
    refused: Code,
    needle: &str,
) {
    let mut client = fx.anonymous_client().await.unwrap();
    for (call, result) in every_call(&mut client, token).await {
        match result {
            Ok(()) => assert!(allowed.contains(&call), "{call} must be refused"),
            Err(s) => {
                assert!(!allowed.contains(&call), "{call} must be allowed: {s}");
                assert_eq!(s.code(), refused, "{call}: {s}");
                assert!(s.message().contains(needle), "{call}: {}", s.message());
            }
        }
    }
}

/// Signs arbitrary claims with the test key (the one the fixture trusts).
fn sign(claims: serde_json::Value) -> String {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let der = key.to_pkcs8_der().unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(agentgate_identity::key_id(&key.verifying_key()));
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const ALL: &[&str] = &[
    "Ingest",
    "ListSessions",
    "GetSessionEvents",
    "ReplaySession",
    "Verify",
    "Checkpoint",
    "Export",
    "Prune",
];
const READS: &[&str] = &[
    "ListSessions",
    "GetSessionEvents",
    "ReplaySession",
    "Verify",
    "Checkpoint",
    "Export",
];

async fn no_credential_no_call(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    assert_calls(&fx, None, &[], Code::Unauthenticated, "no credential").await;
    assert_calls(
        &fx,
        Some("not-a-token"),
        &[],
        Code::Unauthenticated,
        "token refused: malformed token",
    )
    .await;
    // With a token that may do everything, everything works (the refusals above were for
    // the credential, not for the calls themselves).
    let all = fx
        .token("service:ops", PrincipalKind::Service, &[ADMIN_GROUP, "ops"])
        .unwrap();
    assert_calls(&fx, Some(&all), ALL, Code::Ok, "").await;
}

async fn forged_expired_and_misaddressed_tokens_are_refused(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let now = unix_now();
    let claims = |exp: u64, aud: &[&str]| {
        serde_json::json!({
            "iss": "agentgate", "sub": "service:pg-proxy", "kind": "service",
            "groups": [ADMIN_GROUP], "aud": aud, "exp": exp, "nbf": now - 120, "iat": now - 120,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    };
    // Signed by a key the store does not trust, under the same issuer name.
    let foreign = TokenIssuer::new(
        &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        "agentgate",
    )
    .unwrap();
    let (forged, _) = foreign
        .issue(&TokenRequest {
            subject: "service:pg-proxy".into(),
            kind: PrincipalKind::Service,
            groups: vec![ADMIN_GROUP.into()],
            audience: vec![],
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    // A valid signature over an edited payload.
    let good = sign(claims(now + 600, &[]));
    let parts: Vec<&str> = good.split('.').collect();
    let other = sign(claims(now + 6000, &[]));
    let edited = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    for (what, token, needle) in [
        ("unknown key", forged, "unknown key id"),
        ("edited payload", edited, "signature does not verify"),
        ("expired", sign(claims(now - 60, &[])), "token expired"),
        (
            "for approvals only",
            sign(claims(now + 600, &["approvals"])),
            "is not for \"audit-store\"",
        ),
    ] {
        let mut client = fx.anonymous_client().await.unwrap();
        for (call, result) in every_call(&mut client, Some(&token)).await {
            let s = result.expect_err(what);
            assert_eq!(s.code(), Code::Unauthenticated, "{what}, {call}: {s}");
            assert!(
                s.message().contains(needle),
                "{what}, {call}: {}",
                s.message()
            );
        }
    }
    // The same claims, properly signed and for the audit store, are accepted.
    let fine = sign(claims(now + 600, &[AUDIT_STORE_AUDIENCE]));
    assert_calls(&fx, Some(&fine), ALL, Code::Ok, "").await;
}

async fn each_call_needs_its_kind_or_group(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    // An agent can neither ingest nor read, whatever it claims in groups other than the
    // store's.
    let agent = fx
        .token("agent:deploy-bot", PrincipalKind::Agent, &["deployers"])
        .unwrap();
    let mut client = fx.anonymous_client().await.unwrap();
    for (call, result) in every_call(&mut client, Some(&agent)).await {
        let s = result.expect_err(call);
        assert_eq!(s.code(), Code::PermissionDenied, "{call}: {s}");
        assert!(s.message().contains("agent:deploy-bot is an agent"), "{s}");
        let need = match call {
            "Ingest" => "needs a service principal (kind SERVICE",
            "Prune" => "Prune needs group \"admin\"",
            _ => "needs group \"admin\" or \"auditor\"",
        };
        assert!(s.message().contains(need), "{call}: {}", s.message());
    }
    // An agent in the admin group reads and prunes (groups decide), but still cannot ingest.
    let agent_admin = fx
        .token("agent:ops-bot", PrincipalKind::Agent, &[ADMIN_GROUP])
        .unwrap();
    let mut allowed = READS.to_vec();
    allowed.push("Prune");
    assert_calls(
        &fx,
        Some(&agent_admin),
        &allowed,
        Code::PermissionDenied,
        "kind SERVICE",
    )
    .await;
    // A recorder's token ingests and nothing else.
    assert_calls(
        &fx,
        Some(&recorder_token("pg-proxy").unwrap()),
        &["Ingest"],
        Code::PermissionDenied,
        "needs group",
    )
    .await;
    // An auditor reads everything but cannot prune (or ingest).
    let auditor = fx
        .token("human:audrey", PrincipalKind::Human, &[AUDITOR_GROUP])
        .unwrap();
    assert_calls(
        &fx,
        Some(&auditor),
        READS,
        Code::PermissionDenied,
        "human:audrey is a human",
    )
    .await;
    let mut c = fx.anonymous_client().await.unwrap();
    let refused = c
        .prune(bearer(
            &auditor,
            PruneRequest {
                before: Some(now()),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "Prune needs group \"admin\"; human:audrey is a human in groups [auditor]"
    );
    // An admin prunes.
    let admin = fx
        .token("human:admin", PrincipalKind::Human, &[ADMIN_GROUP])
        .unwrap();
    assert_calls(
        &fx,
        Some(&admin),
        &allowed,
        Code::PermissionDenied,
        "kind SERVICE",
    )
    .await;
}

async fn session_sequences(c: &mut AuditClient, session: &str) -> Vec<u64> {
    match c
        .get_session_events(GetSessionEventsRequest {
            session_id: session.into(),
        })
        .await
    {
        Ok(r) => r
            .into_inner()
            .events
            .iter()
            .map(|e| e.event.as_ref().unwrap().sequence)
            .collect(),
        Err(s) if s.code() == Code::NotFound => Vec::new(),
        Err(s) => panic!("{s}"),
    }
}

async fn a_refused_recorder_keeps_every_event_until_it_has_a_valid_token(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("recorder.token");
    let mut config =
        agentgate_recorder::RecorderConfig::new(fx.endpoint(), dir.path().join("spool.db"))
            .with_token_file(&token_file);
    config.max_backoff = Duration::from_millis(200);
    config.batch_max = 7;
    let recorder = Recorder::open(config).await.unwrap();
    let sessions: Vec<_> = (0..2)
        .map(|_| recorder.session(SessionContext::default()))
        .collect();
    let mut store = fx.client().await.unwrap();

    // No token file yet, then an agent's token (wrong kind), then a token for another
    // service's audience: each time everything stays spooled.
    let agent = fx
        .token("agent:deploy-bot", PrincipalKind::Agent, &[])
        .unwrap();
    let (for_approvals, _) = test_token_issuer()
        .issue(&TokenRequest {
            subject: "service:pg-proxy".into(),
            kind: PrincipalKind::Service,
            groups: vec![],
            audience: vec!["approvals".into()],
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let mut recorded = 0;
    for wrong in [None, Some(agent), Some(for_approvals)] {
        if let Some(t) = &wrong {
            std::fs::write(&token_file, t).unwrap();
        }
        for _ in 0..10 {
            for s in &sessions {
                s.record("session.query", None).await.unwrap();
            }
        }
        recorded += 10;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(recorder.backlog(), 2 * recorded, "everything stays spooled");
        assert_eq!(
            recorder.rejected().await.unwrap(),
            0,
            "nothing is set aside"
        );
        for s in &sessions {
            assert!(
                session_sequences(&mut store, s.session_id())
                    .await
                    .is_empty()
            );
        }
        assert!(
            recorder.flush(Duration::from_millis(300)).await.is_err(),
            "cannot flush with a refused token"
        );
    }

    // A valid service token in the file: the next attempt ships everything, once, in order.
    std::fs::write(&token_file, recorder_token("pg-proxy").unwrap()).unwrap();
    recorder.flush(Duration::from_secs(20)).await.unwrap();
    assert_eq!(recorder.rejected().await.unwrap(), 0);
    for s in &sessions {
        assert_eq!(
            session_sequences(&mut store, s.session_id()).await,
            (1..=recorded).collect::<Vec<_>>()
        );
    }
    let v = store.verify(VerifyRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{}", v.error);
}

async fn a_stream_ends_with_its_token_and_the_recorder_renews_it(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let issuer = Arc::new(test_token_issuer());
    let short = |issuer: &TokenIssuer| {
        issuer
            .issue(&TokenRequest {
                subject: "service:pg-proxy".into(),
                kind: PrincipalKind::Service,
                groups: vec![],
                audience: vec![AUDIT_STORE_AUDIENCE.into()],
                ttl: Duration::from_secs(2),
            })
            .unwrap()
            .0
    };

    // The store ends an accepted stream when its token expires, after acknowledging what it
    // took.
    let mut raw = fx.anonymous_client().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(IngestRequest {
        batch_id: 1,
        events: events(&uuid::Uuid::now_v7().to_string(), 1..=3),
    })
    .await
    .unwrap();
    let mut acks = raw
        .ingest(bearer(
            &short(&issuer),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().stored, 3);
    let ended = tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .expect("the stream ends when its token expires")
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(ended.message().contains("token expired"), "{ended}");
    drop(tx);

    // A recorder whose source signs a fresh short-lived token on each connection keeps
    // shipping across expiries.
    let asked = Arc::new(AtomicUsize::new(0));
    let source: Arc<dyn TokenSource> = {
        let (issuer, asked) = (issuer.clone(), asked.clone());
        Arc::new(move || -> Result<String, String> {
            asked.fetch_add(1, Ordering::SeqCst);
            Ok(short(&issuer))
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::open(
        agentgate_recorder::RecorderConfig::new(fx.endpoint(), dir.path().join("spool.db"))
            .with_token_source(source),
    )
    .await
    .unwrap();
    let s = recorder.session(SessionContext::default());
    for round in 0..2 {
        for _ in 0..5 {
            s.record("session.query", None).await.unwrap();
        }
        recorder.flush(Duration::from_secs(10)).await.unwrap();
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "a new token for the new connection"
    );
    let mut store = fx.client().await.unwrap();
    assert_eq!(
        session_sequences(&mut store, s.session_id()).await,
        (1..=10).collect::<Vec<_>>()
    );
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

on_both_backends!(
    no_credential_no_call,
    forged_expired_and_misaddressed_tokens_are_refused,
    each_call_needs_its_kind_or_group,
    a_refused_recorder_keeps_every_event_until_it_has_a_valid_token,
    a_stream_ends_with_its_token_and_the_recorder_renews_it,
);

/// `agentgate up`'s wiring: the store starts before authz and uses authz's authenticator
/// once set; until then it answers UNAVAILABLE, which recorders ride out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_authenticator_answers_unavailable_until_set() {
    let late = Arc::new(LateAuthenticator::new("authz is starting"));
    let fx = AuditStoreFixture::start_with(Backend::Sqlite, 10, late.clone())
        .await
        .unwrap();
    let token = recorder_token("pg-proxy").unwrap();
    let mut raw = fx.anonymous_client().await.unwrap();
    let s = ingest_once(&mut raw, Some(&token)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("authz is starting"), "{s}");
    // A recorder started now keeps its events and ships them once the store can check.
    let dir = tempfile::tempdir().unwrap();
    let mut config = fx.recorder_config(&dir.path().join("spool.db")).unwrap();
    config.max_backoff = Duration::from_millis(200);
    let recorder = Recorder::open(config).await.unwrap();
    let session = recorder.session(SessionContext::default());
    session.record("session.start", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorder.backlog(), 1);
    late.set(Arc::new(test_token_issuer().verifier()));
    recorder.flush(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ingest_once(&mut raw, Some(&token)).await.unwrap(), 2);
}

/// authz records with a token it signs itself; approvals in the same process with one authz
/// renews; a standalone service with the file authz keeps for it (`recorder_tokens`). The
/// store checks all of them with authz's own authenticator, as in `agentgate up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_record_with_tokens_authz_signs() {
    agentgate_tls::install_crypto_provider();
    let late = Arc::new(LateAuthenticator::new("authz is starting"));
    let fx = AuditStoreFixture::start_with(Backend::Sqlite, 10, late.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = agentgate_authz::AuthzConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
        audit_url: Some(fx.endpoint()),
        recorder_tokens: vec!["approvals".into()],
        ..Default::default()
    };
    let authz = agentgate_authz::start(&config, dir.path()).await.unwrap();
    late.set(authz.authenticator());

    // The file for a standalone approvals: private, for the audit store only.
    let file = agentgate_authz::recorder_token_path(dir.path(), "approvals");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let claims = authz
        .core
        .issuer
        .verifier()
        .verify(std::fs::read_to_string(&file).unwrap().trim(), None)
        .unwrap();
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.kind.as_str(),
            claims.aud.clone()
        ),
        (
            "service:approvals",
            "service",
            vec![AUDIT_STORE_AUDIENCE.to_owned()]
        )
    );

    // Two approvals instances record their start-up state changes: one with the token
    // source of this process's authz, one with the file.
    let agent = authz
        .core
        .issuer
        .issue(&TokenRequest {
            subject: "agent:deploy-bot".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
            audience: vec![],
            ttl: Duration::from_secs(600),
        })
        .unwrap()
        .0;
    let mut standalone = agentgate_approvals::ApprovalsConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
        default_reviewer_groups: vec!["approvers".into()],
        ..Default::default()
    };
    standalone.audit.endpoint = fx.endpoint();
    standalone.audit.spool_path = Some(dir.path().join("a-spool.db"));
    standalone.audit.token_file = Some(file.clone());
    let mut in_process = standalone.clone();
    in_process.listen = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    in_process.audit.spool_path = Some(dir.path().join("b-spool.db"));
    in_process.audit.token_file = None;
    in_process.database_url = Some(format!(
        "sqlite://{}",
        dir.path().join("approvals-b.db").display()
    ));
    let a = agentgate_approvals::start(&standalone, dir.path(), authz.authenticator(), None, None)
        .await
        .unwrap();
    let b = agentgate_approvals::start(
        &in_process,
        dir.path(),
        authz.authenticator(),
        Some(authz.recorder_token_source("approvals")),
        None,
    )
    .await
    .unwrap();
    for running in [&a, &b] {
        let mut c = agentgate_proto::approvals::v1::approvals_client::ApprovalsClient::connect(
            format!("http://{}", running.addr),
        )
        .await
        .unwrap();
        c.create(bearer(
            &agent,
            agentgate_proto::approvals::v1::CreateRequest {
                kind: agentgate_proto::approvals::v1::RequestKind::Operation as i32,
                connection: "prod-db".into(),
                operation: Some(agentgate_proto::common::v1::Operation {
                    protocol: Protocol::Postgres as i32,
                    text: "DROP TABLE users".into(),
                    ..Default::default()
                }),
                reason: "cleanup".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
        running.flush_audit(Duration::from_secs(20)).await.unwrap();
    }

    // An auditor (token from authz) finds all three recorders' sessions.
    let auditor = authz
        .core
        .issuer
        .issue(&TokenRequest {
            subject: "human:audrey".into(),
            kind: PrincipalKind::Human,
            groups: vec![AUDITOR_GROUP.into()],
            audience: vec![],
            ttl: Duration::from_secs(600),
        })
        .unwrap()
        .0;
    let mut store = fx.client_as(&auditor).await.unwrap();
    for session in [a.audit_session_id(), b.audit_session_id()] {
        assert!(!session_sequences(&mut store, session).await.is_empty());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let authz_sessions = store
            .list_sessions(ListSessionsRequest {
                connection: "authz".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sessions;
        if authz_sessions
            .iter()
            .any(|s| s.principal == "service:authz")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "authz's own events never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The test harness's own superuser token is not authz's: refused.
    let foreign = fx.client().await.unwrap().verify(VerifyRequest {}).await;
    assert_eq!(foreign.unwrap_err().code(), Code::Unauthenticated);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    authz.shutdown().await.unwrap();
}
