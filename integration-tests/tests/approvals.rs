//! The approvals service against real servers: a private Postgres cluster (SCRAM auth) and the
//! embedded SQLite default, a real audit store, and real HTTP receivers for webhooks.
//!
//! Every rule of the service is checked through its gRPC API with real signed tokens; every
//! refusal is checked for its status code and message, and for the state being unchanged
//! afterwards.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_approvals::{ApprovalsConfig, WebhookConfig, WebhookFormat};
use agentgate_integration_tests::{ApprovalsFixture, AuditStoreFixture, Backend, Postgres, bearer};
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{
    ApprovalRequest, CancelRequest, CreateRequest, GetRequest, ListRequest, RequestKind,
    ReviewRequest, State, Verdict, WatchRequest,
};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{AuditEvent, GetSessionEventsRequest};
use agentgate_proto::common::v1::{Operation, Principal, PrincipalKind, Protocol};
use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;

type Client = ApprovalsClient<Channel>;

/// The people and services of these tests, and their tokens.
struct Cast {
    agent: String,
    other_agent: String,
    service: String,
    alice: String,
    bob: String,
    carol: String,
    dave: String,
    eve: String,
}

impl Cast {
    fn new(fx: &ApprovalsFixture) -> Cast {
        let t = |s: &str, k: PrincipalKind, g: &[&str]| fx.token(s, k, g).unwrap();
        Cast {
            agent: t("agent:deploy-bot", PrincipalKind::Agent, &["deployers"]),
            other_agent: t("agent:other-bot", PrincipalKind::Agent, &["deployers"]),
            service: t("service:authz", PrincipalKind::Service, &[]),
            // alice and bob review everything; carol only for the DBAs; dave only default.
            alice: t("human:alice", PrincipalKind::Human, &["approvers", "dba"]),
            bob: t("human:bob", PrincipalKind::Human, &["approvers", "dba"]),
            carol: t("human:carol", PrincipalKind::Human, &["dba"]),
            dave: t("human:dave", PrincipalKind::Human, &["approvers"]),
            eve: t("human:eve", PrincipalKind::Human, &["devs"]),
        }
    }
}

fn operation(connection: &str, text: &str) -> CreateRequest {
    CreateRequest {
        kind: RequestKind::Operation as i32,
        connection: connection.into(),
        operation: Some(Operation {
            protocol: Protocol::Postgres as i32,
            action: "drop".into(),
            text: text.into(),
            targets: vec!["users".into()],
            risk_classes: vec!["sql.ddl".into(), "sql.destructive".into()],
            ..Default::default()
        }),
        session_id: uuid::Uuid::now_v7().to_string(),
        reason: "clean up after the migration".into(),
        ..Default::default()
    }
}

/// An operation request created by a service for the agent, with its own reviewers.
fn on_behalf(connection: &str, groups: &[&str], required: u32) -> CreateRequest {
    CreateRequest {
        requester: Some(Principal {
            subject: "agent:deploy-bot".into(),
            kind: PrincipalKind::Agent as i32,
            groups: vec!["deployers".into()],
            ..Default::default()
        }),
        reviewer_groups: groups.iter().map(|g| g.to_string()).collect(),
        approvals_required: required,
        ..operation(connection, "ALTER TABLE users DROP COLUMN email")
    }
}

fn access(connection: &str) -> CreateRequest {
    CreateRequest {
        kind: RequestKind::Access as i32,
        connection: connection.into(),
        role: "admin".into(),
        duration: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        reason: "incident 4711".into(),
        ..Default::default()
    }
}

fn ttl(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    })
}

async fn create(c: &mut Client, token: &str, req: CreateRequest) -> ApprovalRequest {
    c.create(bearer(token, req)).await.unwrap().into_inner()
}

/// A token of a service principal, which may read every request.
fn reader() -> String {
    agentgate_integration_tests::test_token(
        &agentgate_integration_tests::test_token_issuer(),
        "service:reader",
        PrincipalKind::Service,
        &[],
    )
    .unwrap()
}

async fn get(c: &mut Client, id: &str) -> ApprovalRequest {
    c.get(bearer(&reader(), GetRequest { id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

async fn review(
    c: &mut Client,
    token: &str,
    id: &str,
    verdict: Verdict,
    comment: &str,
) -> Result<ApprovalRequest, tonic::Status> {
    c.review(bearer(
        token,
        ReviewRequest {
            id: id.into(),
            verdict: verdict as i32,
            comment: comment.into(),
        },
    ))
    .await
    .map(|r| r.into_inner())
}

async fn cancel(
    c: &mut Client,
    token: &str,
    id: &str,
    reason: &str,
) -> Result<ApprovalRequest, tonic::Status> {
    c.cancel(bearer(
        token,
        CancelRequest {
            id: id.into(),
            reason: reason.into(),
        },
    ))
    .await
    .map(|r| r.into_inner())
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("the call should be refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(needle),
        "{needle:?} not in {:?}",
        e.message()
    );
}

/// Asserts that a refused call left the request exactly as it was.
async fn assert_unchanged(c: &mut Client, before: &ApprovalRequest) {
    assert_eq!(&get(c, &before.id).await, before, "state changed");
}

fn state_of(r: &ApprovalRequest) -> State {
    State::try_from(r.state).unwrap()
}

fn base_config() -> ApprovalsConfig {
    ApprovalsConfig {
        default_reviewer_groups: vec!["approvers".into()],
        ..Default::default()
    }
}

/// Starts the service on `backend`: SQLite in its data directory, or a private Postgres.
async fn start(backend: Backend) -> (ApprovalsFixture, Option<Postgres>) {
    let mut config = base_config();
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let pg = Postgres::start().unwrap();
            config.database_url = Some(
                pg.create_owned_database("approvals", "agentgate_approvals")
                    .await
                    .unwrap(),
            );
            Some(pg)
        }
    };
    let fx = ApprovalsFixture::start(config).await.unwrap();
    (fx, pg)
}

async fn next(stream: &mut tonic::Streaming<ApprovalRequest>) -> Option<ApprovalRequest> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch message within 10 s")
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The rules, on both backends.

async fn rules(fx: &ApprovalsFixture) {
    let cast = Cast::new(fx);
    let mut c = fx.client().await.unwrap();

    // An agent creates for itself; the defaults decide who reviews and how many.
    let r = create(
        &mut c,
        &cast.agent,
        operation("prod-db", "DROP TABLE users"),
    )
    .await;
    assert_eq!(state_of(&r), State::Pending);
    assert_eq!(r.requester.as_ref().unwrap().subject, "agent:deploy-bot");
    assert_eq!(r.reviewer_groups, vec!["approvers".to_string()]);
    assert_eq!(r.approvals_required, 1);
    assert_eq!(r.version, 1);
    let ttl = r.expires_at.unwrap().seconds - r.created_at.unwrap().seconds;
    assert!((3599..=3601).contains(&ttl), "default pending ttl: {ttl}");
    assert_eq!(get(&mut c, &r.id).await, r);

    // ... and cannot choose its reviewers, their number, or act for someone else.
    let count = |c: &mut Client| {
        let mut c = c.clone();
        let token = cast.service.clone();
        async move {
            c.list(bearer(
                &token,
                ListRequest {
                    limit: 1000,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .requests
            .len()
        }
    };
    let before = count(&mut c).await;
    for (req, field) in [
        (
            CreateRequest {
                reviewer_groups: vec!["deployers".into()],
                ..operation("prod-db", "DROP TABLE t")
            },
            "reviewer_groups",
        ),
        (
            CreateRequest {
                approvals_required: 3,
                ..operation("prod-db", "DROP TABLE t")
            },
            "approvals_required",
        ),
        (
            CreateRequest {
                requester: Some(Principal {
                    subject: "human:alice".into(),
                    ..Default::default()
                }),
                ..operation("prod-db", "DROP TABLE t")
            },
            "requester",
        ),
    ] {
        assert_status(
            c.create(bearer(&cast.agent, req)).await,
            Code::PermissionDenied,
            &format!("only service principals may set {field}"),
        );
    }
    assert_eq!(count(&mut c).await, before, "nothing was created");

    // Not eligible: outside the reviewer groups.
    assert_status(
        review(&mut c, &cast.eve, &r.id, Verdict::Approve, "lgtm").await,
        Code::PermissionDenied,
        "reviewers must be in one of the groups [approvers]",
    );
    assert_status(
        review(&mut c, &cast.carol, &r.id, Verdict::Deny, "no").await,
        Code::PermissionDenied,
        "may not review",
    );
    assert_unchanged(&mut c, &r).await;

    // Only people approve: an agent in the reviewer group cannot.
    let rogue = fx
        .token("agent:rogue", PrincipalKind::Agent, &["approvers"])
        .unwrap();
    assert_status(
        review(&mut c, &rogue, &r.id, Verdict::Approve, "trust me").await,
        Code::PermissionDenied,
        "approvals are given by people",
    );
    assert_unchanged(&mut c, &r).await;

    // A requester never approves their own request, even when in the reviewer group.
    let own = create(&mut c, &cast.alice, access("prod-db")).await;
    assert_eq!(
        own.requester.as_ref().unwrap().kind,
        PrincipalKind::Human as i32
    );
    assert_status(
        review(&mut c, &cast.alice, &own.id, Verdict::Approve, "mine").await,
        Code::PermissionDenied,
        "cannot review their own request",
    );
    assert_unchanged(&mut c, &own).await;

    // One approval suffices by default; the decision records who and when.
    let done = review(&mut c, &cast.dave, &r.id, Verdict::Approve, "go ahead")
        .await
        .unwrap();
    assert_eq!(state_of(&done), State::Approved);
    assert_eq!(done.decided_by.as_ref().unwrap().subject, "human:dave");
    assert_eq!(done.decision_comment, "go ahead");
    assert!(done.decided_at.is_some());
    assert_eq!(done.reviews.len(), 1);
    assert!(
        done.reviews[0].source_address.starts_with("127.0.0.1:"),
        "{:?}",
        done.reviews[0].source_address
    );
    assert_eq!(done.version, 2);

    // A decision is final.
    assert_status(
        review(&mut c, &cast.alice, &r.id, Verdict::Deny, "too late").await,
        Code::FailedPrecondition,
        "is already APPROVED",
    );
    assert_status(
        cancel(&mut c, &cast.agent, &r.id, "never mind").await,
        Code::FailedPrecondition,
        "a decision is final",
    );
    assert_unchanged(&mut c, &done).await;

    // A service names reviewers and the number of approvals; one reviewer counts once.
    let two = create(&mut c, &cast.service, on_behalf("prod-db", &["dba"], 2)).await;
    assert_eq!(two.requester.as_ref().unwrap().subject, "agent:deploy-bot");
    assert_eq!(two.reviewer_groups, vec!["dba".to_string()]);
    assert_status(
        review(&mut c, &cast.dave, &two.id, Verdict::Approve, "").await,
        Code::PermissionDenied,
        "[dba]",
    );
    let one = review(&mut c, &cast.alice, &two.id, Verdict::Approve, "ok")
        .await
        .unwrap();
    assert_eq!(state_of(&one), State::Pending);
    assert_eq!(one.reviews.len(), 1);
    for verdict in [Verdict::Approve, Verdict::Deny] {
        assert_status(
            review(&mut c, &cast.alice, &two.id, verdict, "again").await,
            Code::AlreadyExists,
            "one reviewer counts once (1 of 2 approvals)",
        );
    }
    assert_unchanged(&mut c, &one).await;
    let approved = review(&mut c, &cast.bob, &two.id, Verdict::Approve, "ok too")
        .await
        .unwrap();
    assert_eq!(state_of(&approved), State::Approved);
    assert_eq!(approved.reviews.len(), 2);
    assert_status(
        review(&mut c, &cast.carol, &two.id, Verdict::Deny, "no").await,
        Code::FailedPrecondition,
        "a decision is final",
    );
    assert_unchanged(&mut c, &approved).await;

    // A single deny denies, whatever the approvals so far.
    let three = create(&mut c, &cast.service, on_behalf("prod-db", &["dba"], 3)).await;
    review(&mut c, &cast.alice, &three.id, Verdict::Approve, "ok")
        .await
        .unwrap();
    let denied = review(&mut c, &cast.carol, &three.id, Verdict::Deny, "not in prod")
        .await
        .unwrap();
    assert_eq!(state_of(&denied), State::Denied);
    assert_eq!(denied.decided_by.as_ref().unwrap().subject, "human:carol");
    assert_status(
        review(&mut c, &cast.bob, &three.id, Verdict::Approve, "").await,
        Code::FailedPrecondition,
        "DENIED",
    );
    assert_unchanged(&mut c, &denied).await;

    // Cancel: only the requester (or a service), only while pending, with a reason.
    let mine = create(&mut c, &cast.agent, operation("stage-db", "TRUNCATE audit")).await;
    assert_status(
        cancel(&mut c, &cast.other_agent, &mine.id, "not yours").await,
        Code::PermissionDenied,
        "only the requester (agent:deploy-bot) may cancel",
    );
    assert_status(
        cancel(&mut c, &cast.alice, &mine.id, "reviewers deny instead").await,
        Code::PermissionDenied,
        "only the requester",
    );
    assert_status(
        cancel(&mut c, &cast.agent, &mine.id, " ").await,
        Code::InvalidArgument,
        "reason is required",
    );
    assert_unchanged(&mut c, &mine).await;
    let cancelled = cancel(&mut c, &cast.agent, &mine.id, "done another way")
        .await
        .unwrap();
    assert_eq!(state_of(&cancelled), State::Cancelled);
    assert_eq!(cancelled.decision_comment, "done another way");
    assert_status(
        review(&mut c, &cast.alice, &mine.id, Verdict::Approve, "").await,
        Code::FailedPrecondition,
        "CANCELLED",
    );
    assert_unchanged(&mut c, &cancelled).await;
    let held = create(&mut c, &cast.service, on_behalf("stage-db", &["dba"], 1)).await;
    let by_service = cancel(&mut c, &cast.service, &held.id, "agent disconnected")
        .await
        .unwrap();
    assert_eq!(state_of(&by_service), State::Cancelled);
    assert_eq!(
        by_service.decided_by.as_ref().unwrap().subject,
        "service:authz"
    );

    // List filters by state, connection, requester, and shows each caller only what it
    // may see.
    let other = create(
        &mut c,
        &cast.other_agent,
        operation("stage-db", "DELETE FROM jobs"),
    )
    .await;
    let list = |token: &str, req: ListRequest| {
        let mut c = c.clone();
        let token = token.to_owned();
        async move {
            c.list(bearer(&token, req))
                .await
                .unwrap()
                .into_inner()
                .requests
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    let pending = list(
        &cast.service,
        ListRequest {
            state: State::Pending as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(pending.contains(&other.id) && pending.contains(&own.id));
    assert!(!pending.contains(&r.id), "approved is not pending");
    let on_stage = list(
        &cast.service,
        ListRequest {
            connection: "stage-db".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        on_stage,
        vec![other.id.clone(), held.id.clone(), mine.id.clone()]
    );
    let by_other = list(
        &cast.service,
        ListRequest {
            requester: "agent:other-bot".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_other, vec![other.id.clone()]);
    let agent_sees = list(&cast.agent, ListRequest::default()).await;
    assert!(agent_sees.contains(&r.id) && !agent_sees.contains(&other.id));
    assert!(list(&cast.eve, ListRequest::default()).await.is_empty());
    let carol_sees = list(&cast.carol, ListRequest::default()).await;
    assert!(carol_sees.contains(&two.id) && !carol_sees.contains(&other.id));
    assert_status(
        c.get(bearer(&cast.eve, GetRequest { id: r.id.clone() }))
            .await,
        Code::PermissionDenied,
        "may not see request",
    );
}

async fn bad_input(fx: &ApprovalsFixture) {
    let cast = Cast::new(fx);
    let mut c = fx.client().await.unwrap();
    let r = create(
        &mut c,
        &cast.agent,
        operation("prod-db", "DROP TABLE users"),
    )
    .await;
    let unknown = uuid::Uuid::now_v7().to_string();

    // Unknown id: NOT_FOUND, for every call that names one.
    assert_status(
        c.get(bearer(
            &cast.service,
            GetRequest {
                id: unknown.clone(),
            },
        ))
        .await,
        Code::NotFound,
        &format!("no approval request {unknown}"),
    );
    assert_status(
        review(&mut c, &cast.alice, &unknown, Verdict::Approve, "").await,
        Code::NotFound,
        "no approval request",
    );
    assert_status(
        cancel(&mut c, &cast.agent, &unknown, "x").await,
        Code::NotFound,
        "no approval request",
    );
    assert_status(
        c.watch(bearer(
            &cast.service,
            WatchRequest {
                id: unknown.clone(),
                ..Default::default()
            },
        ))
        .await,
        Code::NotFound,
        "no approval request",
    );
    assert_status(
        review(
            &mut c,
            &cast.alice,
            "../../etc/passwd",
            Verdict::Approve,
            "",
        )
        .await,
        Code::InvalidArgument,
        "is not an approval request id",
    );

    // No token, a forged token, a token of another issuer: UNAUTHENTICATED.
    assert_status(
        c.get(GetRequest { id: r.id.clone() }).await,
        Code::Unauthenticated,
        "send `authorization: Bearer <token>`",
    );
    assert_status(
        c.review(ReviewRequest {
            id: r.id.clone(),
            verdict: Verdict::Approve as i32,
            comment: String::new(),
        })
        .await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_status(
        c.create(operation("prod-db", "x")).await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_status(
        c.watch(WatchRequest::default()).await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_status(
        review(&mut c, "not.a.token", &r.id, Verdict::Approve, "").await,
        Code::Unauthenticated,
        "token refused",
    );
    let stranger = agentgate_identity::TokenIssuer::new(
        &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        "agentgate",
    )
    .unwrap();
    let forged = agentgate_integration_tests::test_token(
        &stranger,
        "human:alice",
        PrincipalKind::Human,
        &["approvers"],
    )
    .unwrap();
    assert_status(
        review(&mut c, &forged, &r.id, Verdict::Approve, "").await,
        Code::Unauthenticated,
        "unknown key id",
    );
    assert_unchanged(&mut c, &r).await;

    // Bad requests: named, and nothing created.
    let before = c
        .list(bearer(&cast.service, ListRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .requests
        .len();
    let too_many_groups: Vec<&str> = (0..33).map(|_| "g").collect();
    let huge = operation("prod-db", &"x".repeat(64 * 1024 + 1));
    for (token, req, needle) in [
        (
            &cast.agent,
            CreateRequest {
                reason: String::new(),
                ..operation("prod-db", "DROP TABLE t")
            },
            "reason is required",
        ),
        (
            &cast.agent,
            CreateRequest {
                kind: 0,
                ..operation("prod-db", "DROP TABLE t")
            },
            "kind must be",
        ),
        (
            &cast.agent,
            operation("", "DROP TABLE t"),
            "connection is required",
        ),
        (
            &cast.agent,
            operation("prod-db", "  "),
            "operation.text is empty",
        ),
        (&cast.agent, huge, "operation.text is 65537 bytes"),
        (
            &cast.agent,
            CreateRequest {
                reason: "r".repeat(5000),
                ..operation("prod-db", "DROP TABLE t")
            },
            "reason is 5000 bytes",
        ),
        (
            &cast.agent,
            CreateRequest {
                pending_ttl: ttl(7 * 24 * 3600),
                ..operation("prod-db", "DROP TABLE t")
            },
            "pending_ttl must be positive and at most 1day",
        ),
        (
            &cast.service,
            on_behalf("prod-db", &too_many_groups, 1),
            "reviewer_groups has 33 entries",
        ),
        (
            &cast.service,
            on_behalf("prod-db", &["dba"], 11),
            "approvals_required 11",
        ),
        (
            &cast.agent,
            CreateRequest {
                duration: None,
                ..access("prod-db")
            },
            "duration is required",
        ),
    ] {
        assert_status(
            c.create(bearer(token, req)).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let after = c
        .list(bearer(&cast.service, ListRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .requests
        .len();
    assert_eq!(before, after, "nothing was created");

    assert_status(
        review(&mut c, &cast.alice, &r.id, Verdict::Unspecified, "").await,
        Code::InvalidArgument,
        "verdict must be",
    );
    assert_status(
        review(
            &mut c,
            &cast.alice,
            &r.id,
            Verdict::Approve,
            &"c".repeat(5000),
        )
        .await,
        Code::InvalidArgument,
        "comment must be at most 4096 bytes",
    );
    assert_unchanged(&mut c, &r).await;
}

async fn expiry(fx: &ApprovalsFixture) {
    let cast = Cast::new(fx);
    let mut c = fx.client().await.unwrap();
    let store = fx.running().unwrap().store.clone();

    // Nobody looks: the sweeper expires it on time anyway. Read the store directly, which
    // applies no expiry of its own.
    let r = create(
        &mut c,
        &cast.service,
        CreateRequest {
            pending_ttl: ttl(1),
            ..on_behalf("prod-db", &["dba"], 1)
        },
    )
    .await;
    let expires = agentgate_approvals::model::timestamp_us(r.expires_at.as_ref().unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(state_of(&stored), State::Expired, "expired by the sweeper");
    let decided = agentgate_approvals::model::timestamp_us(stored.decided_at.as_ref().unwrap());
    assert!(
        decided >= expires && decided - expires < 1_500_000,
        "expired {} ms after its time",
        (decided - expires) / 1000
    );
    assert!(stored.decided_by.is_none());
    assert!(stored.decision_comment.starts_with("expired"));

    // An expired request cannot be approved, and stays expired.
    assert_status(
        review(&mut c, &cast.alice, &r.id, Verdict::Approve, "sorry, late").await,
        Code::FailedPrecondition,
        "expired at",
    );
    assert_status(
        cancel(&mut c, &cast.service, &r.id, "x").await,
        Code::FailedPrecondition,
        "expired at",
    );
    assert_unchanged(&mut c, &stored).await;

    // A watcher sees EXPIRED on time, and the stream ends there.
    let w = create(
        &mut c,
        &cast.service,
        CreateRequest {
            pending_ttl: ttl(1),
            ..on_behalf("prod-db", &["dba"], 1)
        },
    )
    .await;
    let mut stream = c
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: w.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&next(&mut stream).await.unwrap()), State::Pending);
    let ended = next(&mut stream).await.unwrap();
    let seen_at = agentgate_approvals::model::now_us();
    assert_eq!(state_of(&ended), State::Expired);
    let due = agentgate_approvals::model::timestamp_us(w.expires_at.as_ref().unwrap());
    assert!(
        seen_at - due < 1_000_000,
        "seen {} ms late",
        (seen_at - due) / 1000
    );
    assert!(next(&mut stream).await.is_none(), "the stream ends");
}

async fn watch(fx: &ApprovalsFixture) {
    let cast = Cast::new(fx);
    let mut c = fx.client().await.unwrap();
    let r = create(&mut c, &cast.agent, operation("watch-db", "DROP TABLE a")).await;

    // A filtered watch: the pending snapshot first, then changes.
    let mut all = c
        .watch(bearer(
            &cast.alice,
            WatchRequest {
                state: State::Pending as i32,
                connection: "watch-db".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut all).await.unwrap().id, r.id);

    // One request: its current state first, each change, and the end after a decision.
    let mut one = c
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: r.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut one).await.unwrap(), r);
    let decided = review(&mut c, &cast.alice, &r.id, Verdict::Approve, "ok")
        .await
        .unwrap();
    assert_eq!(next(&mut one).await.unwrap(), decided);
    assert!(next(&mut one).await.is_none());
    assert_eq!(
        next(&mut all).await.unwrap(),
        decided,
        "leaving pending is a change"
    );

    // A new request reaches the filtered watcher; one on another connection does not.
    create(&mut c, &cast.agent, operation("elsewhere", "DROP TABLE b")).await;
    let fresh = create(&mut c, &cast.agent, operation("watch-db", "DROP TABLE c")).await;
    assert_eq!(next(&mut all).await.unwrap().id, fresh.id);

    // A watcher that (re)connects after the decision gets the current state at once.
    let mut again = c
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: r.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut again).await.unwrap(), decided);
    assert!(next(&mut again).await.is_none());

    // Someone who may not see a request may not watch it either.
    assert_status(
        c.watch(bearer(
            &cast.eve,
            WatchRequest {
                id: fresh.id.clone(),
                ..Default::default()
            },
        ))
        .await,
        Code::PermissionDenied,
        "may not watch",
    );
}

async fn storage_suite(backend: Backend) {
    let (fx, _pg) = start(backend).await;
    assert_eq!(
        fx.running().unwrap().backend(),
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    rules(&fx).await;
    bad_input(&fx).await;
    watch(&fx).await;
    expiry(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_watch_expiry_and_bad_input_on_sqlite() {
    storage_suite(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_watch_expiry_and_bad_input_on_postgres() {
    storage_suite(Backend::Postgres).await;
}

/// Reads expire a request past its time even when the sweeper has not run yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_expire_what_the_sweeper_has_not_reached() {
    let fx = ApprovalsFixture::start(ApprovalsConfig {
        // The sweeper looked at start, found nothing, and sleeps for an hour.
        sweep_interval: Duration::from_secs(3600),
        ..base_config()
    })
    .await
    .unwrap();
    let cast = Cast::new(&fx);
    let mut c = fx.client().await.unwrap();
    let store = fx.running().unwrap().store.clone();
    let r = create(
        &mut c,
        &cast.service,
        CreateRequest {
            pending_ttl: ttl(1),
            ..on_behalf("prod-db", &["dba"], 1)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let raw = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(state_of(&raw), State::Pending, "nobody has looked yet");
    let read = get(&mut c, &r.id).await;
    assert_eq!(state_of(&read), State::Expired);
    assert_eq!(read.version, 2);
    assert_eq!(
        store.get(&r.id).await.unwrap().unwrap(),
        read,
        "the expiry is stored"
    );
    let listed = c
        .list(bearer(
            &cast.service,
            ListRequest {
                state: State::Pending as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(listed.is_empty(), "{listed:?}");
}

/// The database itself refuses to change a decided request, whatever the service does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_to_change_a_decision() {
    let (fx, pg) = start(Backend::Postgres).await;
    let cast = Cast::new(&fx);
    let mut c = fx.client().await.unwrap();
    let r = create(
        &mut c,
        &cast.agent,
        operation("prod-db", "DROP TABLE users"),
    )
    .await;
    review(&mut c, &cast.alice, &r.id, Verdict::Deny, "no")
        .await
        .unwrap();
    use sqlx::Connection as _;
    let url = fx.config.database_url.clone().unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let e =
        sqlx::query("UPDATE approval_requests SET state = 2, version = version + 1 WHERE id = $1")
            .bind(&r.id)
            .execute(&mut conn)
            .await
            .expect_err("refused");
    assert!(e.to_string().contains("a decision is final"), "{e}");
    let e = sqlx::query("DELETE FROM approval_requests WHERE id = $1")
        .bind(&r.id)
        .execute(&mut conn)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("never deleted"), "{e}");
    drop(pg);
}

// ---------------------------------------------------------------------------------------
// Two instances on one Postgres.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_postgres() {
    let pg = Postgres::start().unwrap();
    let url = pg
        .create_owned_database("approvals", "agentgate_approvals")
        .await
        .unwrap();
    let audit = AuditStoreFixture::start(Backend::Sqlite, 1000)
        .await
        .unwrap();
    let mut config = base_config();
    config.database_url = Some(url);
    config.audit.endpoint = audit.endpoint();
    let a = ApprovalsFixture::start(config.clone()).await.unwrap();
    let b = ApprovalsFixture::start(config).await.unwrap();
    let cast = Cast::new(&a);
    let mut ca = a.client().await.unwrap();
    let mut cb = b.client().await.unwrap();

    // A watcher on B, a decision through A: B hears it within one second.
    let r = create(
        &mut ca,
        &cast.agent,
        operation("prod-db", "DROP TABLE users"),
    )
    .await;
    let mut on_b = cb
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: r.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut filtered_b = cb
        .watch(bearer(
            &cast.service,
            WatchRequest {
                state: State::Pending as i32,
                connection: "prod-db".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut on_b).await.unwrap(), r);
    assert_eq!(next(&mut filtered_b).await.unwrap(), r);
    let sent = Instant::now();
    let decided = review(&mut ca, &cast.alice, &r.id, Verdict::Approve, "ok")
        .await
        .unwrap();
    let heard = next(&mut on_b).await.unwrap();
    let latency = sent.elapsed();
    assert_eq!(heard, decided);
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    assert!(next(&mut on_b).await.is_none());
    assert_eq!(next(&mut filtered_b).await.unwrap(), decided);

    // A request created on A reaches B's filtered watcher.
    let sent = Instant::now();
    let fresh = create(&mut ca, &cast.agent, operation("prod-db", "DROP TABLE x")).await;
    assert_eq!(next(&mut filtered_b).await.unwrap(), fresh);
    assert!(sent.elapsed() < Duration::from_secs(1));

    // Reconnecting to B after the decision: the current state first.
    let mut again = cb
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: r.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut again).await.unwrap(), decided);

    // The LISTEN connections are killed (a failover, a connection reaper): the listeners
    // reconnect and watchers read again, so a decision made meanwhile still arrives.
    let lost = create(&mut ca, &cast.agent, operation("prod-db", "DROP TABLE y")).await;
    let mut on_b = cb
        .watch(bearer(
            &cast.agent,
            WatchRequest {
                id: lost.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut on_b).await.unwrap(), lost);
    {
        use sqlx::Connection as _;
        let mut admin = sqlx::PgConnection::connect(&pg.url("approvals"))
            .await
            .unwrap();
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(killed.len(), 2, "one listener per instance");
    }
    let decided = review(&mut ca, &cast.alice, &lost.id, Verdict::Deny, "no")
        .await
        .unwrap();
    assert_eq!(next(&mut on_b).await.unwrap(), decided);

    // Reviews racing on both instances: each reviewer counts once, the request is decided
    // once.
    for _ in 0..5 {
        let two = create(&mut ca, &cast.service, on_behalf("prod-db", &["dba"], 2)).await;
        let (mut xa, mut xb) = (ca.clone(), cb.clone());
        let (x, y) = tokio::join!(
            review(&mut xa, &cast.alice, &two.id, Verdict::Approve, "a"),
            review(&mut xb, &cast.bob, &two.id, Verdict::Approve, "b"),
        );
        x.unwrap();
        y.unwrap();
        let done = get(&mut ca, &two.id).await;
        assert_eq!(state_of(&done), State::Approved);
        assert_eq!(done.reviews.len(), 2);
        assert_eq!(done.version, 3);

        let same = create(&mut ca, &cast.service, on_behalf("prod-db", &["dba"], 2)).await;
        let (mut xa, mut xb) = (ca.clone(), cb.clone());
        let (x, y) = tokio::join!(
            review(&mut xa, &cast.carol, &same.id, Verdict::Approve, "a"),
            review(&mut xb, &cast.carol, &same.id, Verdict::Approve, "b"),
        );
        let codes: Vec<Code> = [&x, &y]
            .iter()
            .map(|r| r.as_ref().map(|_| Code::Ok).unwrap_or_else(|e| e.code()))
            .collect();
        assert!(
            codes.contains(&Code::Ok) && codes.contains(&Code::AlreadyExists),
            "{codes:?}"
        );
        let one = get(&mut ca, &same.id).await;
        assert_eq!(state_of(&one), State::Pending);
        assert_eq!(one.reviews.len(), 1);
    }

    // Both sweepers run; each request expires exactly once (one audit event, one instance).
    let mut ids = Vec::new();
    for _ in 0..6 {
        let req = CreateRequest {
            pending_ttl: ttl(1),
            ..on_behalf("prod-db", &["dba"], 1)
        };
        let c = if ids.len() % 2 == 0 { &mut ca } else { &mut cb };
        ids.push(create(c, &cast.service, req).await.id);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in &ids {
        let stored = a.running().unwrap().store.get(id).await.unwrap().unwrap();
        assert_eq!(state_of(&stored), State::Expired);
        assert_eq!(stored.version, 2, "expired once");
    }
    let ra = a.running().unwrap();
    let rb = b.running().unwrap();
    ra.flush_audit(Duration::from_secs(20)).await.unwrap();
    rb.flush_audit(Duration::from_secs(20)).await.unwrap();
    let mut expired_events = Vec::new();
    for session in [ra.audit_session_id(), rb.audit_session_id()] {
        for e in audit_events(&audit, session).await {
            if e.kind == "approval.expired" {
                let Some(Detail::Approval(rec)) = e.detail else {
                    panic!("no approval record")
                };
                expired_events.push(rec.approval_id);
            }
        }
    }
    for id in &ids {
        assert_eq!(
            expired_events.iter().filter(|e| *e == id).count(),
            1,
            "{id} expired once in the audit log: {expired_events:?}"
        );
    }
}

async fn audit_events(audit: &AuditStoreFixture, session: &str) -> Vec<AuditEvent> {
    let mut client = audit.client().await.unwrap();
    client
        .get_session_events(GetSessionEventsRequest {
            session_id: session.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|s| AuditEvent::decode(&s.body[..]).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Audit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_change_reaches_the_audit_store() {
    let audit = AuditStoreFixture::start(Backend::Sqlite, 1000)
        .await
        .unwrap();
    let mut config = base_config();
    config.audit.endpoint = audit.endpoint();
    let fx = ApprovalsFixture::start(config).await.unwrap();
    let cast = Cast::new(&fx);
    let mut c = fx.client().await.unwrap();

    let r = create(
        &mut c,
        &cast.agent,
        operation("prod-db", "DROP TABLE users"),
    )
    .await;
    review(&mut c, &cast.alice, &r.id, Verdict::Approve, "ok by me")
        .await
        .unwrap();
    let d = create(&mut c, &cast.service, on_behalf("prod-db", &["dba"], 2)).await;
    review(&mut c, &cast.carol, &d.id, Verdict::Deny, "not now")
        .await
        .unwrap();
    let x = create(&mut c, &cast.agent, access("prod-db")).await;
    cancel(&mut c, &cast.agent, &x.id, "not needed")
        .await
        .unwrap();
    let e = create(
        &mut c,
        &cast.service,
        CreateRequest {
            pending_ttl: ttl(1),
            ..on_behalf("prod-db", &["dba"], 1)
        },
    )
    .await;
    // A refused call changes nothing and records nothing.
    review(&mut c, &cast.eve, &x.id, Verdict::Approve, "")
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let running = fx.running().unwrap();
    running.flush_audit(Duration::from_secs(20)).await.unwrap();
    let events = audit_events(&audit, running.audit_session_id()).await;
    let seen: Vec<(String, String, String, String, String)> = events
        .iter()
        .map(|ev| {
            let Some(Detail::Approval(rec)) = &ev.detail else {
                panic!("{} has no approval record", ev.kind)
            };
            assert_eq!(ev.protocol, Protocol::ControlPlane as i32);
            assert_eq!(ev.connection, "prod-db");
            (
                ev.kind.clone(),
                rec.approval_id.clone(),
                ev.principal.as_ref().unwrap().subject.clone(),
                rec.state.clone(),
                rec.comment.clone(),
            )
        })
        .collect();
    let s = |k: &str, id: &str, who: &str, state: &str, comment: &str| {
        (
            k.to_owned(),
            id.to_owned(),
            who.to_owned(),
            state.to_owned(),
            comment.to_owned(),
        )
    };
    assert_eq!(
        &seen[..9],
        &[
            s(
                "approval.created",
                &r.id,
                "agent:deploy-bot",
                "pending",
                "clean up after the migration"
            ),
            s(
                "approval.review",
                &r.id,
                "human:alice",
                "approved",
                "ok by me"
            ),
            s(
                "approval.approved",
                &r.id,
                "human:alice",
                "approved",
                "ok by me"
            ),
            s(
                "approval.created",
                &d.id,
                "service:authz",
                "pending",
                "clean up after the migration"
            ),
            s("approval.review", &d.id, "human:carol", "denied", "not now"),
            s("approval.denied", &d.id, "human:carol", "denied", "not now"),
            s(
                "approval.created",
                &x.id,
                "agent:deploy-bot",
                "pending",
                "incident 4711"
            ),
            s(
                "approval.cancelled",
                &x.id,
                "agent:deploy-bot",
                "cancelled",
                "not needed"
            ),
            s(
                "approval.created",
                &e.id,
                "service:authz",
                "pending",
                "clean up after the migration"
            ),
        ]
    );
    assert_eq!(
        &seen[9..],
        &[s(
            "approval.expired",
            &e.id,
            "service:agentgate-approvals",
            "expired",
            &seen[9].4
        )]
    );
    assert!(
        seen[9].4.starts_with("expired: not decided by"),
        "{:?}",
        seen[9].4
    );
    // Who, when, from where.
    for ev in &events[..8] {
        assert!(ev.source_address.starts_with("127.0.0.1:"), "{ev:?}");
        assert!(ev.time.is_some());
    }
    assert!(events[9].source_address.is_empty(), "expiry has no caller");
    assert_eq!(events[0].attributes["operation"], "DROP TABLE users");
    assert_eq!(
        events[0].attributes["risk_classes"],
        "sql.ddl,sql.destructive"
    );
    assert_eq!(events[3].attributes["requester"], "agent:deploy-bot");
    assert_eq!(events[4].attributes["verdict"], "deny");
}

// ---------------------------------------------------------------------------------------
// Webhooks.

#[derive(Clone)]
struct Hit {
    path: String,
    headers: http::HeaderMap,
    body: bytes::Bytes,
    at: Instant,
    status: u16,
}

/// A real HTTP server on 127.0.0.1 that answers 503 to the first `fail_first` requests on
/// each path, then 200, and remembers every request.
async fn receiver(fail_first: usize) -> (SocketAddr, Arc<Mutex<Vec<Hit>>>) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let shared = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let hits = shared.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let hits = hits.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut h = hits.lock().unwrap();
                            let n = h.iter().filter(|x| x.path == path).count();
                            let status = if n < fail_first { 503 } else { 200 };
                            h.push(Hit {
                                path,
                                headers,
                                body,
                                at: Instant::now(),
                                status,
                            });
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_never_block_a_decision() {
    let (addr, hits) = receiver(2).await;
    // A receiver that accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = black_hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, "s3cret-for-tests\n").unwrap();

    let mut config = base_config();
    let fast = |url: String, format| WebhookConfig {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        ..WebhookConfig::new(url, format)
    };
    config.webhooks = vec![
        WebhookConfig {
            secret: Some(format!("file:{}", secret_file.display())),
            ..fast(format!("http://{addr}/ce"), WebhookFormat::Cloudevents)
        },
        fast(format!("http://{addr}/slack"), WebhookFormat::Slack),
        fast(format!("http://{hole}/never"), WebhookFormat::Cloudevents),
    ];
    let fx = ApprovalsFixture::start(config).await.unwrap();
    let cast = Cast::new(&fx);
    let mut c = fx.client().await.unwrap();

    let t = Instant::now();
    let r = create(
        &mut c,
        &cast.agent,
        operation(
            "prod-db",
            "DELETE FROM users WHERE last_login < now() - '2 years'",
        ),
    )
    .await;
    let decided = review(&mut c, &cast.alice, &r.id, Verdict::Approve, "ok")
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "webhooks never block: create + review took {:?}",
        t.elapsed()
    );

    // Wait until both events were delivered to both receivers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let delivered = hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.status == 200)
            .count();
        if delivered >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "webhooks not delivered in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = hits.lock().unwrap().clone();

    // CloudEvents: structured mode, signed, the same event id and body on every attempt.
    let ce: Vec<&Hit> = hits.iter().filter(|h| h.path == "/ce").collect();
    assert_eq!(ce.iter().filter(|h| h.status == 503).count(), 2);
    let mut types = Vec::new();
    for h in ce.iter().filter(|h| h.status == 200) {
        assert_eq!(
            h.headers["content-type"],
            "application/cloudevents+json; charset=utf-8"
        );
        assert_eq!(
            h.headers["x-agentgate-signature"].to_str().unwrap(),
            hmac_hex(b"s3cret-for-tests", &h.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&h.body).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["source"], "/agentgate/approvals");
        assert_eq!(v["subject"], r.id.as_str());
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["requester"]["subject"], "agent:deploy-bot");
        assert_eq!(
            v["data"]["operation"]["text"],
            "DELETE FROM users WHERE last_login < now() - '2 years'"
        );
        assert_eq!(
            v["data"]["operation"]["risk_classes"],
            serde_json::json!(["sql.ddl", "sql.destructive"])
        );
        assert_eq!(
            v["data"]["approve_command"],
            format!("agentgate approvals approve {}", r.id)
        );
        let id = h.headers["x-agentgate-delivery"].to_str().unwrap();
        assert_eq!(v["id"], id);
        // Every attempt of this event carried the same body.
        for attempt in ce
            .iter()
            .filter(|a| a.headers["x-agentgate-delivery"] == id)
        {
            assert_eq!(attempt.body, h.body);
        }
        types.push(v["type"].as_str().unwrap().to_owned());
        if v["type"] == "dev.agentgate.approval.approved" {
            assert_eq!(v["data"]["state"], "approved");
            assert_eq!(v["data"]["decided_by"]["subject"], "human:alice");
            assert_eq!(v["data"]["version"], decided.version);
        }
    }
    types.sort();
    assert_eq!(
        types,
        [
            "dev.agentgate.approval.approved",
            "dev.agentgate.approval.created"
        ]
    );
    // Retried with backoff: the attempts of the first event are spaced 100 ms, then 200 ms.
    let first_id = ce[0].headers["x-agentgate-delivery"].clone();
    let attempts: Vec<Instant> = ce
        .iter()
        .filter(|h| h.headers["x-agentgate-delivery"] == first_id)
        .map(|h| h.at)
        .collect();
    assert!(attempts.len() >= 2, "the first event was retried");
    assert!(attempts[1] - attempts[0] >= Duration::from_millis(90));
    if attempts.len() >= 3 {
        assert!(attempts[2] - attempts[1] >= Duration::from_millis(190));
    }

    // Slack: the request, the risk, who asks, the exact operation and the approve command.
    let slack: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.path == "/slack" && h.status == 200)
        .collect();
    assert_eq!(slack.len(), 2);
    let created = slack
        .iter()
        .map(|h| serde_json::from_slice::<serde_json::Value>(&h.body).unwrap())
        .find(|v| v["text"].as_str().unwrap().starts_with("Approval needed"))
        .expect("a creation message");
    let all = created.to_string();
    for needle in [
        "agent:deploy-bot",
        "prod-db",
        "sql.ddl, sql.destructive",
        "DELETE FROM users WHERE last_login &lt; now() - '2 years'",
        &format!("agentgate approvals approve {}", r.id),
        "clean up after the migration",
    ] {
        assert!(all.contains(needle), "{needle:?} in {all}");
    }
    assert!(created["blocks"].as_array().unwrap().len() >= 3);
}
