//! The audit store against both backends: a private Postgres cluster (SCRAM auth) and the
//! embedded SQLite default. Every case runs on both.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use agentgate_audit_chain::{BundleError, verify_bundle};
use agentgate_integration_tests::{AuditClient, AuditStoreFixture, Backend};
use agentgate_proto::audit::v1::{
    AuditEvent, CheckpointRequest, ExportRequest, GetSessionEventsRequest, IngestAck,
    IngestRequest, ListSessionsRequest, PruneRequest, ReplaySessionRequest, VerifyRequest,
};
use agentgate_proto::common::v1::{Principal, Protocol, TimeRange};
use futures::StreamExt as _;

fn now() -> prost_types::Timestamp {
    agentgate_audit_store::us_timestamp(agentgate_audit_store::store::now_us())
}

fn event(
    session: &str,
    seq: u64,
    principal: &str,
    connection: &str,
    protocol: Protocol,
) -> AuditEvent {
    AuditEvent {
        session_id: session.into(),
        sequence: seq,
        time: Some(now()),
        kind: if seq == 1 {
            "session.start"
        } else {
            "session.query"
        }
        .into(),
        principal: Some(Principal {
            subject: principal.into(),
            ..Default::default()
        }),
        source_address: "127.0.0.1:40000".into(),
        connection: connection.into(),
        protocol: protocol as i32,
        role: "read".into(),
        ..Default::default()
    }
}

fn session_events(session: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<AuditEvent> {
    seqs.into_iter()
        .map(|s| event(session, s, "agent:bot", "prod-db", Protocol::Postgres))
        .collect()
}

fn new_session() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Sends batches over one Ingest stream and collects the acknowledgements.
async fn ingest(
    client: &mut AuditClient,
    batches: Vec<Vec<AuditEvent>>,
) -> Result<Vec<IngestAck>, tonic::Status> {
    let requests: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(i, events)| IngestRequest {
            batch_id: i as u64 + 1,
            events,
        })
        .collect();
    let mut acks = client
        .ingest(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ack) = acks.next().await {
        out.push(ack?);
    }
    Ok(out)
}

async fn verify(client: &mut AuditClient) -> agentgate_proto::audit::v1::VerifyResponse {
    client.verify(VerifyRequest {}).await.unwrap().into_inner()
}

async fn export(client: &mut AuditClient) -> Vec<u8> {
    let mut stream = client
        .export(ExportRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut bundle = Vec::new();
    while let Some(chunk) = stream.next().await {
        bundle.extend(chunk.unwrap().data);
    }
    bundle
}

async fn session_count(client: &mut AuditClient, session: &str) -> usize {
    match client
        .get_session_events(GetSessionEventsRequest {
            session_id: session.into(),
        })
        .await
    {
        Ok(r) => r.into_inner().events.len(),
        Err(s) if s.code() == tonic::Code::NotFound => 0,
        Err(s) => panic!("{s}"),
    }
}

/// Runs a raw SQL statement as the database superuser, bypassing the append-only triggers —
/// what an attacker with database access would do.
async fn tamper(fx: &AuditStoreFixture, sql: &str) {
    use sqlx::Connection as _;
    match &fx.admin_url {
        Some(url) => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET session_replication_role = replica; {sql}"
            )))
            .execute(&mut c)
            .await
            .unwrap();
        }
        None => {
            let mut c = sqlx::SqliteConnection::connect(&fx.database_url)
                .await
                .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete; {sql}"
            )))
            .execute(&mut c)
            .await
            .unwrap();
        }
    }
}

/// Runs SQL through the store's own database role and connection path.
async fn as_store_role(fx: &AuditStoreFixture, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    if fx.admin_url.is_some() {
        let mut c = sqlx::PgConnection::connect(&fx.database_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await?;
    } else {
        let mut c = sqlx::SqliteConnection::connect(&fx.database_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await?;
    }
    Ok(())
}

async fn ingest_list_fetch_replay(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 1000).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let (a, b, k) = (new_session(), new_session(), new_session());
    let mut batch = session_events(&a, 1..=5);
    batch.extend((1..=3).map(|s| event(&b, s, "agent:other", "staging-db", Protocol::Postgres)));
    batch.extend((1..=2).map(|s| event(&k, s, "agent:bot", "cluster", Protocol::Kubernetes)));
    let acks = ingest(&mut c, vec![batch]).await.unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!((acks[0].stored, acks[0].duplicates), (10, 0));
    assert!(acks[0].gaps.is_empty());

    let list = |r: ListSessionsRequest| {
        let mut c = c.clone();
        async move { c.list_sessions(r).await.unwrap().into_inner().sessions }
    };
    let by_principal = list(ListSessionsRequest {
        principal: "agent:bot".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_principal.len(), 2);
    let by_conn = list(ListSessionsRequest {
        connection: "staging-db".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_conn.len(), 1);
    assert_eq!(by_conn[0].session_id, b);
    assert_eq!((by_conn[0].events, by_conn[0].last_sequence), (3, 3));
    assert_eq!(by_conn[0].role, "read");
    assert_eq!(by_conn[0].source_address, "127.0.0.1:40000");
    let by_proto = list(ListSessionsRequest {
        protocol: Protocol::Kubernetes as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(by_proto.len(), 1);
    assert_eq!(by_proto[0].session_id, k);
    let future = prost_types::Timestamp {
        seconds: now().seconds + 3600,
        nanos: 0,
    };
    let later = list(ListSessionsRequest {
        time: Some(TimeRange {
            start: Some(future),
            end: None,
        }),
        ..Default::default()
    })
    .await;
    assert!(later.is_empty());

    let events = c
        .get_session_events(GetSessionEventsRequest {
            session_id: a.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.event.as_ref().unwrap().sequence)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(events.iter().all(|e| e.hash.len() == 32));

    let mut replay = c
        .replay_session(ReplaySessionRequest {
            session_id: b.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(e) = replay.next().await {
        n += 1;
        assert_eq!(e.unwrap().event.unwrap().sequence, n);
    }
    assert_eq!(n, 3);

    let unknown = c
        .get_session_events(GetSessionEventsRequest {
            session_id: new_session(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let bad = c
        .get_session_events(GetSessionEventsRequest {
            session_id: "x; DROP".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(verify(&mut c).await.ok);
}

async fn resend_is_idempotent(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 1000).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let s = new_session();
    let batch = session_events(&s, 1..=20);
    let first = ingest(&mut c, vec![batch.clone()]).await.unwrap();
    assert_eq!((first[0].stored, first[0].duplicates), (20, 0));
    // A client that lost the acknowledgement sends the same batch again, on a new stream,
    // plus the same event twice within one batch.
    let mut again = batch.clone();
    again.push(batch[0].clone());
    let second = ingest(&mut c, vec![again, batch]).await.unwrap();
    assert_eq!((second[0].stored, second[0].duplicates), (0, 21));
    assert_eq!((second[1].stored, second[1].duplicates), (0, 20));
    assert_eq!(session_count(&mut c, &s).await, 20);
    let v = verify(&mut c).await;
    assert!(v.ok, "{}", v.error);
    assert_eq!(v.events_checked, 20);
}

async fn gaps_are_reported(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 1000).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let s = new_session();
    let acks = ingest(&mut c, vec![session_events(&s, [1, 2, 5, 6, 9])])
        .await
        .unwrap();
    let gaps: Vec<(u64, u64)> = acks[0].gaps.iter().map(|g| (g.from, g.to)).collect();
    assert_eq!(gaps, vec![(3, 4), (7, 8)]);
    let listed = c
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed[0].gaps.len(), 2);
    // The late events arrive: the gaps close.
    let acks = ingest(&mut c, vec![session_events(&s, [3, 4, 7, 8])])
        .await
        .unwrap();
    assert!(acks[0].gaps.is_empty(), "{:?}", acks[0].gaps);
}

async fn malformed_events_are_rejected(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 1000).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let s = new_session();
    let good = session_events(&s, 1..=3);
    let cases: Vec<(AuditEvent, &str)> = vec![
        (
            AuditEvent {
                session_id: "not-a-uuid".into(),
                ..good[0].clone()
            },
            "UUID",
        ),
        (
            AuditEvent {
                sequence: 0,
                ..good[0].clone()
            },
            "sequence",
        ),
        (
            AuditEvent {
                time: None,
                ..good[0].clone()
            },
            "time",
        ),
        (
            AuditEvent {
                kind: "DROP TABLE".into(),
                ..good[0].clone()
            },
            "kind",
        ),
        (
            AuditEvent {
                protocol: 99,
                ..good[0].clone()
            },
            "protocol",
        ),
        (
            AuditEvent {
                connection: "x".repeat(10_000),
                ..good[0].clone()
            },
            "connection",
        ),
    ];
    for (bad, what) in cases {
        let mut batch = good.clone();
        batch.push(bad);
        let err = ingest(&mut c, vec![batch]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        assert!(err.message().contains(what), "{what}: {}", err.message());
        assert_eq!(
            session_count(&mut c, &s).await,
            0,
            "nothing of the batch is stored"
        );
    }
    // Batches before the bad one on the same stream are stored and acknowledged.
    let bad = AuditEvent {
        sequence: 0,
        ..good[0].clone()
    };
    let mut stream = c
        .ingest(tokio_stream::iter(vec![
            IngestRequest {
                batch_id: 1,
                events: good.clone(),
            },
            IngestRequest {
                batch_id: 2,
                events: vec![bad],
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().stored, 3);
    assert_eq!(
        stream.next().await.unwrap().unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(session_count(&mut c, &s).await, 3);
}

async fn rows_cannot_be_changed_through_the_store_role(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 1000).await.unwrap();
    let mut c = fx.client().await.unwrap();
    ingest(&mut c, vec![session_events(&new_session(), 1..=3)])
        .await
        .unwrap();
    c.checkpoint(CheckpointRequest {}).await.unwrap();
    for sql in [
        "UPDATE audit_events SET kind = 'x' WHERE chain_sequence = 2",
        "DELETE FROM audit_events WHERE chain_sequence = 2",
        "UPDATE audit_checkpoints SET created_at_us = 0",
        "DELETE FROM audit_checkpoints",
    ] {
        let err = as_store_role(&fx, sql).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    if backend == Backend::Postgres {
        let err = as_store_role(&fx, "TRUNCATE audit_events")
            .await
            .expect_err("truncate");
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    assert!(verify(&mut c).await.ok);
}

async fn altered_row_is_named_by_verify(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let mut c = fx.client().await.unwrap();
    ingest(&mut c, vec![session_events(&new_session(), 1..=25)])
        .await
        .unwrap();
    assert!(verify(&mut c).await.ok);
    // The body of record 7 changes, as a tamperer rewriting history would.
    let mut forged = event(
        &new_session(),
        1,
        "agent:nobody",
        "prod-db",
        Protocol::Postgres,
    );
    forged.kind = "session.start".into();
    let sql = match backend {
        Backend::Postgres => {
            "UPDATE audit_events SET body = body || '\\x00'::bytea WHERE chain_sequence = 7"
        }
        Backend::Sqlite => "UPDATE audit_events SET body = body || x'00' WHERE chain_sequence = 7",
    };
    tamper(&fx, sql).await;
    let v = verify(&mut c).await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_sequence, 7, "{}", v.error);
    // A query column changed alone is caught too.
    let fx2 = AuditStoreFixture::start(backend, 10).await.unwrap();
    let mut c2 = fx2.client().await.unwrap();
    ingest(&mut c2, vec![session_events(&new_session(), 1..=5)])
        .await
        .unwrap();
    tamper(
        &fx2,
        "UPDATE audit_events SET principal = 'agent:innocent' WHERE chain_sequence = 4",
    )
    .await;
    let v = verify(&mut c2).await;
    assert_eq!(v.first_bad_sequence, 4, "{}", v.error);
    assert!(v.error.contains("principal"), "{}", v.error);
}

async fn deleted_row_is_named_by_verify(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let mut c = fx.client().await.unwrap();
    ingest(&mut c, vec![session_events(&new_session(), 1..=25)])
        .await
        .unwrap();
    tamper(&fx, "DELETE FROM audit_events WHERE chain_sequence = 13").await;
    let v = verify(&mut c).await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_sequence, 13, "{}", v.error);

    // Removing the newest signed events is caught by the checkpoint that covers them.
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let mut c = fx.client().await.unwrap();
    ingest(&mut c, vec![session_events(&new_session(), 1..=20)])
        .await
        .unwrap();
    tamper(&fx, "DELETE FROM audit_events WHERE chain_sequence >= 18").await;
    let v = verify(&mut c).await;
    assert_eq!(v.first_bad_sequence, 18, "{}", v.error);
}

async fn exported_bundle_verifies_offline_and_catches_edits(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 7).await.unwrap();
    let mut c = fx.client().await.unwrap();
    for _ in 0..3 {
        ingest(&mut c, vec![session_events(&new_session(), 1..=10)])
            .await
            .unwrap();
    }
    let bundle = export(&mut c).await;
    let key = fx.public_key().unwrap();
    let report = verify_bundle(bundle.as_slice(), Some(&key)).unwrap();
    assert_eq!(report.chain.events_checked, 30);
    assert_eq!(report.chain.unsigned_tail, 0, "export signs the head first");

    // Edit one event's stored time in the file: caught offline, and named.
    let text = String::from_utf8(bundle).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let idx = lines
        .iter()
        .position(|l| l.contains("\"chain_sequence\":12,"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&lines[idx]).unwrap();
    let stored = v["event"]["stored_at_us"].as_i64().unwrap();
    lines[idx] = lines[idx].replace(&stored.to_string(), &(stored + 1).to_string());
    let edited = lines.join("\n");
    match verify_bundle(edited.as_bytes(), Some(&key)) {
        Err(BundleError::Tampered(f)) => assert_eq!(f.chain_sequence, 12),
        other => panic!("expected tampering at 12, got {other:?}"),
    }
    // Dropping a line is caught too.
    let mut dropped = text.lines().map(str::to_owned).collect::<Vec<_>>();
    dropped.remove(idx);
    assert!(verify_bundle(dropped.join("\n").as_bytes(), Some(&key)).is_err());
}

async fn retention_keeps_the_chain_verifiable(backend: Backend) {
    let fx = AuditStoreFixture::start(backend, 10).await.unwrap();
    let mut c = fx.client().await.unwrap();
    // Checkpoints are signed at group commits: after 10 and 20 events here, not after 25.
    let s = new_session();
    ingest(&mut c, vec![session_events(&s, 1..=10)])
        .await
        .unwrap();
    ingest(&mut c, vec![session_events(&s, 11..=20)])
        .await
        .unwrap();
    ingest(&mut c, vec![session_events(&s, 21..=25)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    ingest(&mut c, vec![session_events(&new_session(), 1..=5)])
        .await
        .unwrap();
    let pruned = c
        .prune(PruneRequest {
            before: Some(cutoff),
        })
        .await
        .unwrap()
        .into_inner();
    // The newest checkpoint before the cut-off is at 20: 1..=20 go, 21..=30 stay.
    assert_eq!((pruned.events_removed, pruned.anchored_at), (20, 20));
    let v = verify(&mut c).await;
    assert!(v.ok, "{}", v.error);
    assert_eq!((v.anchored_at, v.events_checked), (20, 10));
    let bundle = export(&mut c).await;
    let report = verify_bundle(bundle.as_slice(), Some(&fx.public_key().unwrap())).unwrap();
    assert_eq!(report.chain.anchored_at, 20);
    // Appending after a prune continues the same chain.
    ingest(&mut c, vec![session_events(&new_session(), 1..=3)])
        .await
        .unwrap();
    let v = verify(&mut c).await;
    assert!(v.ok, "{}", v.error);
    assert_eq!(v.events_checked, 13);
}

async fn a_replaced_signing_key_is_refused_at_start(backend: Backend) {
    let mut fx = AuditStoreFixture::start(backend, 5).await.unwrap();
    let mut c = fx.client().await.unwrap();
    ingest(&mut c, vec![session_events(&new_session(), 1..=5)])
        .await
        .unwrap();
    fx.stop().await.unwrap();
    // The key file is lost; a fresh one would sign checkpoints the old ones do not match.
    std::fs::remove_file(fx.config.signing_key_path(fx.data_dir.path())).unwrap();
    let auth = std::sync::Arc::new(fx.issuer.verifier());
    let err = match agentgate_audit_store::start(&fx.config, fx.data_dir.path(), auth, None).await {
        Ok(_) => panic!("a store with a new key over old checkpoints must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("did not sign this store's checkpoints"),
        "{err}"
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
    ingest_list_fetch_replay,
    resend_is_idempotent,
    gaps_are_reported,
    malformed_events_are_rejected,
    rows_cannot_be_changed_through_the_store_role,
    altered_row_is_named_by_verify,
    deleted_row_is_named_by_verify,
    exported_bundle_verifies_offline_and_catches_edits,
    retention_keeps_the_chain_verifiable,
    a_replaced_signing_key_is_refused_at_start,
);
