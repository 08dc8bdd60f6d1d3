//! pg-proxy end to end: a private Postgres with SCRAM, the audit store, authz, approvals and
//! pg-proxy in-process, and the real clients an agent uses (psql, pgbench, psycopg 3, JDBC)
//! connecting through the proxy with an agentgate token as the password.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentgate_authz::{ConnectionConfig, RunningAuthz, UpstreamConfig};
use agentgate_identity::TokenRequest;
use agentgate_integration_tests::control_plane::ControlPlane;
use agentgate_integration_tests::{AuditStoreFixture, Postgres, free_port};
use agentgate_proto::approvals::v1::Verdict;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{AuditEvent, GetSessionEventsRequest, ListSessionsRequest};
use agentgate_proto::common::v1::{Decision, PrincipalKind};

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"appdb")
when { context.role == "read" };

@id("agents-write")
permit (principal in Agentgate::Group::"writers", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"appdb")
when { context.role == "write" };

@id("everything")
permit (principal, action == Agentgate::Action::"execute", resource);

@id("read-role-only-reads")
@approvers("dba")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "read" && ["sql.write", "sql.write.unbounded", "sql.ddl", "sql.admin", "sql.opaque_code"].contains(context.risk_class) }
unless { context.approved };

@id("no-grants")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.dcl" };

@id("emails")
@mask("column:public.customers.email")
@strategy("redact")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);

@id("cards")
@mask("detector:payment_card")
@strategy("redact")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);
"#;

const SCHEMA: &str = r#"
CREATE ROLE agent_ro LOGIN PASSWORD 'ro-secret';
CREATE ROLE agent_rw LOGIN PASSWORD 'rw-secret';
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text, note jsonb);
INSERT INTO customers SELECT g, 'name ' || g, 'user' || g || '@example.com', '4111 1111 1111 1111', '{"k": 1}' FROM generate_series(1, 50) g;
CREATE TABLE scratch (id int, v text);
GRANT SELECT ON customers TO agent_ro;
GRANT ALL ON customers, scratch TO agent_rw;
GRANT CREATE ON SCHEMA public TO agent_rw;
GRANT SELECT, INSERT, UPDATE, DELETE ON scratch TO agent_ro;
GRANT CREATE ON SCHEMA public TO agent_ro;
"#;

struct Stack {
    pg: Postgres,
    audit: AuditStoreFixture,
    authz: RunningAuthz,
    approvals: agentgate_approvals::RunningApprovals,
    proxy: agentgate_pg_proxy::RunningPgProxy,
    _dir: tempfile::TempDir,
    _authz_dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        let pg = Postgres::start().unwrap();
        psql_admin(&pg, "postgres", "CREATE DATABASE appdb");
        psql_admin(&pg, "appdb", SCHEMA);
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro.secret");
        std::fs::write(&ro, "ro-secret\n").unwrap();
        let rw = dir.path().join("rw.secret");
        std::fs::write(&rw, "rw-secret\n").unwrap();
        let roles = [
            (
                "read".to_string(),
                UpstreamConfig {
                    user: "agent_ro".into(),
                    secret: Some(format!("file:{}", ro.display())),
                },
            ),
            (
                "write".to_string(),
                UpstreamConfig {
                    user: "agent_rw".into(),
                    secret: Some(format!("file:{}", rw.display())),
                },
            ),
        ];
        let connection = ConnectionConfig {
            name: "appdb".into(),
            protocol: "postgres".into(),
            upstream: format!("127.0.0.1:{}", pg.port),
            roles: roles.into_iter().collect(),
            settings: [("database".to_string(), "appdb".to_string())]
                .into_iter()
                .collect(),
        };
        let ControlPlane {
            audit,
            authz,
            approvals,
            dir: authz_dir,
            ..
        } = ControlPlane::start(POLICY, vec![connection], |_| {}, |_| {})
            .await
            .unwrap();
        let token_file = dir.path().join("pg-proxy.token");
        std::fs::write(
            &token_file,
            authz
                .service_token("pg-proxy", Duration::from_secs(3600))
                .unwrap(),
        )
        .unwrap();
        let proxy_config = agentgate_pg_proxy::PgProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            authz_url: format!("http://{}", authz.addr),
            approvals_url: format!("http://{}", approvals.addr),
            audit_url: audit.endpoint(),
            service_token_file: Some(token_file),
            ..Default::default()
        };
        let gateway = agentgate_pg_proxy::gateway_from_config(&proxy_config, dir.path())
            .await
            .unwrap();
        let proxy = agentgate_pg_proxy::start(&proxy_config, gateway)
            .await
            .unwrap();
        Stack {
            pg,
            audit,
            authz,
            approvals,
            proxy,
            _dir: dir,
            _authz_dir: authz_dir,
        }
    }

    fn token(&self, subject: &str, groups: &[&str], ttl: Duration) -> String {
        self.authz
            .core
            .issuer
            .issue(&TokenRequest {
                subject: subject.into(),
                kind: PrincipalKind::Agent,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                audience: Vec::new(),
                ttl,
            })
            .unwrap()
            .0
    }

    /// Every event of the sessions whose `session.query` events include `text`, in order,
    /// once the proxy's recorder has shipped them.
    async fn events_of_session_with(&self, text: &str) -> Vec<AuditEvent> {
        let auditor = self
            .authz
            .core
            .issuer
            .issue(&TokenRequest {
                subject: "human:audrey".into(),
                kind: PrincipalKind::Human,
                groups: vec!["auditor".into()],
                audience: Vec::new(),
                ttl: Duration::from_secs(600),
            })
            .unwrap()
            .0;
        let mut client = self.audit.client_as(&auditor).await.unwrap();
        for _ in 0..200 {
            let sessions = client
                .list_sessions(ListSessionsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .sessions;
            for session in sessions {
                let events = client
                    .get_session_events(GetSessionEventsRequest {
                        session_id: session.session_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .events;
                let events: Vec<AuditEvent> = events.into_iter().filter_map(|e| e.event).collect();
                let found = events.iter().any(|e| {
                    matches!(&e.detail, Some(Detail::Operation(op)) if op.operation.as_ref().is_some_and(|o| o.text.contains(text)))
                });
                if found && events.iter().any(|e| e.kind == "session.end") {
                    return events;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no recorded session ran {text:?}");
    }

    fn reviewer_token(&self) -> String {
        self.authz
            .core
            .issuer
            .issue(&TokenRequest {
                subject: "human:dana".into(),
                kind: PrincipalKind::Human,
                groups: vec!["dba".into(), "approvers".into()],
                audience: Vec::new(),
                ttl: Duration::from_secs(600),
            })
            .unwrap()
            .0
    }

    fn conninfo(&self, role: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={role} dbname=appdb sslmode=disable",
            self.proxy.addr.port()
        )
    }

    /// psql through the proxy with the agent's token as the password.
    fn psql(&self, token: &str, role: &str, args: &[&str]) -> Output {
        Command::new("psql")
            .arg(self.conninfo(role))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .env("PGPASSWORD", token)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    async fn approve_pending(&self, expect_text: &str) -> String {
        self.review_pending(expect_text, Verdict::Approve).await
    }

    async fn review_pending(&self, expect_text: &str, verdict: Verdict) -> String {
        agentgate_integration_tests::control_plane::review_pending(
            &format!("http://{}", self.approvals.addr),
            &self.reviewer_token(),
            expect_text,
            verdict,
        )
        .await
        .unwrap()
    }
}

fn psql_admin(pg: &Postgres, db: &str, sql: &str) {
    let out = Command::new("psql")
        .arg(pg.url(db))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reads_and_masks_through_the_proxy() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let out = s.psql(&token, "read", &["-c", "SELECT count(*) FROM customers"]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(text(&out), "50");

    // A masked column stays masked under an alias and in binary-free expressions' detectors.
    let out = s.psql(
        &token,
        "read",
        &["-c", "SELECT email AS e, name FROM customers WHERE id = 7"],
    );
    assert!(out.status.success(), "{}", err(&out));
    let row = text(&out);
    assert!(!row.contains("user7@example.com"), "alias leaked: {row}");
    assert!(row.ends_with("|name 7"), "{row}");
    // Computed text goes through the detectors.
    let out = s.psql(
        &token,
        "read",
        &["-c", "SELECT card || '' FROM customers WHERE id = 1"],
    );
    assert!(out.status.success(), "{}", err(&out));
    assert!(
        !text(&out).contains("4111 1111 1111 1111"),
        "{}",
        text(&out)
    );
    // \copy (COPY TO STDOUT) does not pass cards raw.
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "\\copy (SELECT card FROM customers WHERE id < 3) TO STDOUT",
        ],
    );
    assert!(out.status.success(), "{}", err(&out));
    assert!(!text(&out).contains("4111"), "{}", text(&out));
    // COPY of a masked column, as a query and as a table: masked by source.
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "\\copy (SELECT id, email AS x FROM customers WHERE id < 4) TO STDOUT",
        ],
    );
    assert!(out.status.success(), "{}", err(&out));
    assert!(!text(&out).contains("@example.com"), "{}", text(&out));
    assert!(text(&out).starts_with("1\t"), "{}", text(&out));
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "\\copy customers (id, email) TO STDOUT WITH (FORMAT csv)",
        ],
    );
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(text(&out).lines().count(), 50);
    assert!(!text(&out).contains("@example.com"), "{}", text(&out));
    // \d works (catalog queries through the proxy).
    let out = s.psql(&token, "read", &["-c", "\\d customers"]);
    assert!(out.status.success(), "{}", err(&out));
    assert!(text(&out).contains("email"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_no_grant_are_refused_in_postgres_terms() {
    let s = Stack::start().await;
    let out = s.psql("not-a-token", "read", &["-c", "SELECT 1"]);
    assert!(!out.status.success());
    assert!(err(&out).contains("FATAL"), "{}", err(&out));
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    // No grant for role write.
    let out = s.psql(&token, "write", &["-c", "SELECT 1"]);
    assert!(!out.status.success());
    assert!(err(&out).contains("FATAL"), "{}", err(&out));
    // A startup parameter that would change identity is refused.
    let out = Command::new("psql")
        .arg(format!("{} options='-c role=postgres'", s.conninfo("read")))
        .args(["-X", "-c", "SELECT 1"])
        .env("PGPASSWORD", &token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(err(&out).contains("not allowed"), "{}", err(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risky_statements_wait_for_approval_and_denials_abort_the_transaction() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    // An unbounded delete is held; approved through the approvals API, it runs.
    let conninfo = s.conninfo("read");
    let t = token.clone();
    let held = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-c", "DELETE FROM scratch"])
            .env("PGPASSWORD", t)
            .output()
            .unwrap()
    });
    let id = s.approve_pending("DELETE FROM scratch").await;
    let out = held.await.unwrap();
    assert!(out.status.success(), "{}", err(&out));
    assert!(
        err(&out).contains(&id),
        "the notice names the approval: {}",
        err(&out)
    );
    // The record: who, from where, what, how it was classified and decided, and by which
    // approval; session start and end around it.
    let events = s.events_of_session_with("DELETE FROM scratch").await;
    assert_eq!(
        events.first().map(|e| e.kind.as_str()),
        Some("session.start")
    );
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("session.end"));
    let (event, op) = events
        .iter()
        .find_map(|e| match &e.detail {
            Some(Detail::Operation(op)) if e.kind == "session.query" => Some((e, op.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(event.principal.as_ref().unwrap().subject, "agent:reader");
    assert!(
        event.source_address.starts_with("127.0.0.1:"),
        "{}",
        event.source_address
    );
    let operation = op.operation.as_ref().unwrap();
    assert!(
        operation
            .risk_classes
            .contains(&"sql.write.unbounded".to_string()),
        "{operation:?}"
    );
    assert_eq!(op.decision, Decision::Allow as i32);
    assert_eq!(op.approval_id, id);
    // The rule that held it, by the risk class it covers.
    let decided_by = event.attributes.get("decided_by");
    assert!(
        decided_by.is_some_and(|class| operation.risk_classes.contains(class)),
        "{decided_by:?} {operation:?}"
    );

    // Denied by the reviewer: the agent gets 42501 and nothing ran.
    let conninfo = s.conninfo("read");
    let t = token.clone();
    let held = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-c", "DROP TABLE scratch"])
            .env("PGPASSWORD", t)
            .output()
            .unwrap()
    });
    s.review_pending("DROP TABLE scratch", Verdict::Deny).await;
    let out = held.await.unwrap();
    assert!(!out.status.success());
    assert!(err(&out).contains("denied"), "{}", err(&out));
    let out = s.psql(&token, "read", &["-c", "SELECT count(*) FROM scratch"]);
    assert!(
        out.status.success(),
        "the table is still there: {}",
        err(&out)
    );

    // In a transaction block, a refused statement aborts the block as Postgres would: the
    // next statement fails, and COMMIT rolls back what the block did.
    let writer = s.token(
        "agent:writer",
        &["agents", "writers"],
        Duration::from_secs(600),
    );
    let script = "BEGIN;\nINSERT INTO scratch VALUES (42, 'in-tx');\nGRANT SELECT ON customers TO PUBLIC;\nSELECT 2;\nCOMMIT;\n";
    let conninfo = s.conninfo("write");
    let mut child = Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-f", "-"])
        .env("PGPASSWORD", &writer)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let e = err(&out);
    assert!(
        e.contains("agentgate"),
        "the refusal names the gateway: {e}"
    );
    assert!(e.contains("current transaction is aborted"), "{e}");
    assert!(
        text(&out).contains("ROLLBACK"),
        "COMMIT of an aborted block: {}",
        text(&out)
    );
    let out = s.psql(
        &token,
        "read",
        &["-c", "SELECT count(*) FROM scratch WHERE v = 'in-tx'"],
    );
    assert_eq!(text(&out), "0", "the block was rolled back: {}", err(&out));

    // Unparseable input is refused with a syntax error and runs nothing.
    let out = s.psql(&token, "read", &["-c", "SELEC 1"]);
    assert!(!out.status.success());
    assert!(
        err(&out).contains("42601") || err(&out).contains("parse"),
        "{}",
        err(&out)
    );
}

/// The `session.query` records of a session, in order.
fn query_records(events: &[AuditEvent]) -> Vec<agentgate_proto::audit::v1::OperationRecord> {
    events
        .iter()
        .filter_map(|e| match &e.detail {
            Some(Detail::Operation(op)) if e.kind == "session.query" => Some(op.clone()),
            _ => None,
        })
        .collect()
}

/// The `status` of each statement of the session that ran `marker`, in order.
async fn statuses_of_query_with(s: &Stack, marker: &str) -> Vec<String> {
    let events = s.events_of_session_with(marker).await;
    query_records(&events)
        .into_iter()
        .map(|o| o.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_a_failed_query_rolled_back_are_recorded_so() {
    let s = Stack::start().await;
    let token = s.token(
        "agent:implicit",
        &["agents", "writers"],
        Duration::from_secs(600),
    );
    let write = |args: &[&str]| s.psql(&token, "write", args);
    let count = |ids: &str| {
        let out = write(&[
            "-c",
            &format!("SELECT count(*) FROM scratch WHERE id IN ({ids})"),
        ]);
        assert!(out.status.success(), "{}", err(&out));
        text(&out).trim().to_owned()
    };

    // Idle session: the Query is one implicit transaction; the failure undoes the INSERT.
    let out = write(&[
        "-c",
        "INSERT INTO scratch VALUES (501, 'implicit'); SELECT 1/0 AS implicit_fails",
    ]);
    assert!(err(&out).contains("division by zero"), "{}", err(&out));
    assert_eq!(count("501"), "0");
    assert_eq!(
        statuses_of_query_with(&s, "implicit_fails").await,
        ["rolled_back", "error"]
    );

    // A COMMIT inside the Query settles what came before it; only what follows is undone
    // (the example of PostgreSQL's protocol documentation).
    let out = write(&[
        "-c",
        "INSERT INTO scratch VALUES (502, 'kept'); COMMIT; INSERT INTO scratch VALUES (503, 'undone'); SELECT 1/0 AS commit_then_fails",
    ]);
    assert!(err(&out).contains("division by zero"), "{}", err(&out));
    assert_eq!(count("502"), "1");
    assert_eq!(count("503"), "0");
    assert_eq!(
        statuses_of_query_with(&s, "commit_then_fails").await,
        ["ok", "ok", "rolled_back", "error"]
    );

    // Inside an explicit block the failure aborts the block and undoes nothing yet: the
    // INSERT stays `ok`, and what ends the block is recorded as its own statement.
    let out = write(&[
        "-c",
        "BEGIN",
        "-c",
        "INSERT INTO scratch VALUES (504, 'in block'); SELECT 1/0 AS in_block_fails",
    ]);
    assert!(err(&out).contains("division by zero"), "{}", err(&out));
    assert_eq!(
        statuses_of_query_with(&s, "in_block_fails").await,
        ["ok", "ok", "error"]
    );
    assert_eq!(count("504"), "0");

    // A deferred constraint fails as the implicit transaction ends: the server commits before
    // it completes the last statement, so the last statement fails, and the others were
    // undone with it.
    let out = write(&[
        "-c",
        "CREATE TABLE deferred_once (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    ]);
    assert!(out.status.success(), "{}", err(&out));
    let out = write(&[
        "-c",
        "INSERT INTO deferred_once VALUES (1); INSERT INTO deferred_once VALUES (1); SELECT 'deferred_fails'",
    ]);
    assert!(err(&out).contains("duplicate key"), "{}", err(&out));
    let ops = query_records(&s.events_of_session_with("deferred_fails").await);
    let statuses: Vec<&str> = ops.iter().map(|o| o.status.as_str()).collect();
    assert_eq!(statuses, ["rolled_back", "rolled_back", "error"]);
    assert!(ops[2].error.contains("23505"), "{}", ops[2].error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_statement_of_a_multi_statement_query_is_its_own_audit_event() {
    let s = Stack::start().await;
    let token = s.token("agent:multi", &["agents"], Duration::from_secs(600));
    // psql -c sends the whole string as one Query message. The third statement fails, so the
    // server never runs the fourth.
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "SELECT count(*) FROM customers WHERE id <= 3; SELECT id FROM customers WHERE id IN (1, 2); SELECT 1/0 AS multi_fails; SELECT 'multi never runs'",
        ],
    );
    assert!(!out.status.success());
    assert!(err(&out).contains("division by zero"), "{}", err(&out));
    let events = s.events_of_session_with("multi_fails").await;
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=events.len() as u64).collect::<Vec<_>>());
    let ops = query_records(&events);
    let texts: Vec<String> = ops
        .iter()
        .map(|o| o.operation.as_ref().unwrap().text.trim().to_owned())
        .collect();
    assert_eq!(
        texts,
        [
            "SELECT count(*) FROM customers WHERE id <= 3",
            "SELECT id FROM customers WHERE id IN (1, 2)",
            "SELECT 1/0 AS multi_fails",
            "SELECT 'multi never runs'",
        ]
    );
    // The first two ran (and sent their rows); the server then rolled back the Query's
    // implicit transaction.
    let statuses: Vec<&str> = ops.iter().map(|o| o.status.as_str()).collect();
    assert_eq!(statuses, ["rolled_back", "rolled_back", "error", "skipped"]);
    let rows: Vec<u64> = ops.iter().map(|o| o.rows).collect();
    assert_eq!(rows, [1, 2, 0, 0]);
    assert!(
        ops[2].error.contains("division by zero"),
        "{}",
        ops[2].error
    );
    for (i, op) in ops.iter().enumerate() {
        let operation = op.operation.as_ref().unwrap();
        assert_eq!(op.decision, Decision::Allow as i32);
        assert_eq!(operation.action, "select", "{operation:?}");
        assert_eq!(
            operation.attributes.get("statement").map(String::as_str),
            Some(format!("{}/4", i + 1).as_str())
        );
    }
    assert!(
        ops[0]
            .operation
            .as_ref()
            .unwrap()
            .targets
            .iter()
            .any(|t| t.contains("customers")),
        "{:?}",
        ops[0].operation
    );
    assert!(ops[3].operation.as_ref().unwrap().targets.is_empty());

    // A Query with one refused statement runs none of them; each is recorded, classified
    // on its own, with the Query's decision.
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "SELECT 'multi refused'; GRANT SELECT ON customers TO PUBLIC",
        ],
    );
    assert!(!out.status.success());
    assert!(err(&out).contains("agentgate"), "{}", err(&out));
    let events = s.events_of_session_with("multi refused").await;
    let ops = query_records(&events);
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(ops.iter().all(|o| o.decision == Decision::Deny as i32));
    assert_eq!(
        ops[0].operation.as_ref().unwrap().text.trim(),
        "SELECT 'multi refused'"
    );
    assert_eq!(ops[0].status, "error");
    assert!(
        ops[0].error.contains("refused by agentgate"),
        "{}",
        ops[0].error
    );
    let grant = ops[1].operation.as_ref().unwrap();
    assert_eq!(grant.text.trim(), "GRANT SELECT ON customers TO PUBLIC");
    assert!(
        grant.risk_classes.contains(&"sql.dcl".to_string()),
        "{grant:?}"
    );
    assert_eq!(ops[1].status, "skipped");
    let out = s.psql(
        &token,
        "read",
        &[
            "-c",
            "SELECT has_table_privilege('public', 'customers', 'SELECT')",
        ],
    );
    assert_eq!(text(&out), "f", "the GRANT did not run: {}", err(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_query_mode() {
    let s = Stack::start().await;
    let token = s.token(
        "agent:writer",
        &["agents", "writers"],
        Duration::from_secs(600),
    );
    // Initialise directly (it needs DDL), then run through the proxy as the write role.
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q"])
        .arg(s.pg.url("appdb"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", err(&init));
    psql_admin(
        &s.pg,
        "appdb",
        "GRANT SELECT, UPDATE, INSERT ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO agent_rw",
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new("pgbench")
            .args(["-n", "-S", "-t", "200", "-c", "2", "-M", mode])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &s.proxy.addr.port().to_string(),
                "-U",
                "write",
                "appdb",
            ])
            .env("PGPASSWORD", &token)
            .output()
            .unwrap();
        assert!(out.status.success(), "pgbench -M {mode}: {}", err(&out));
        assert!(
            text(&out).contains("number of transactions actually processed: 400/400"),
            "{}",
            text(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_server_side_binding_binary_copy_and_pipeline() {
    let s = Stack::start().await;
    let token = s.token(
        "agent:writer",
        &["agents", "writers"],
        Duration::from_secs(600),
    );
    let script = r#"
import sys, psycopg
conninfo = sys.argv[1]
with psycopg.connect(conninfo) as conn:
    cur = conn.cursor()
    cur.execute("SELECT id, email FROM customers WHERE id = %s", (3,))
    row = cur.fetchone()
    assert row[0] == 3, row
    assert "user3@example.com" not in row[1], row
    cur = conn.cursor(binary=True)
    cur.execute("SELECT id, email, note FROM customers WHERE id = %s", (4,))
    row = cur.fetchone()
    assert row[0] == 4 and "user4@example.com" not in (row[1] or ""), row
    with cur.copy("COPY scratch (id, v) FROM STDIN") as copy:
        for i in range(100):
            copy.write_row((i, f"v{i}"))
    cur.execute("SELECT count(*) FROM scratch")
    assert cur.fetchone()[0] >= 100
    with conn.pipeline():
        for i in range(20):
            cur.execute("INSERT INTO scratch VALUES (%s, %s)", (1000 + i, "p"))
    cur.execute("SELECT count(*) FROM scratch WHERE v = 'p'")
    assert cur.fetchone()[0] == 20
    rows = []
    with cur.copy("COPY (SELECT email FROM customers ORDER BY id LIMIT 3) TO STDOUT") as copy:
        for r in copy.rows():
            rows.append(r)
    assert len(rows) == 3 and not any("@example.com" in str(r) for r in rows), rows
    brows = []
    with cur.copy("COPY (SELECT id, email FROM customers ORDER BY id LIMIT 3) TO STDOUT (FORMAT binary)") as copy:
        copy.set_types(["int4", "text"])
        for r in copy.rows():
            brows.append(r)
    assert len(brows) == 3 and not any("@example.com" in str(r) for r in brows), brows
    print("ok", rows, brows)
"#;
    let conninfo = format!("{} password={token}", s.conninfo("write"));
    let out = Command::new("python3")
        .args(["-c", script, &conninfo])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), err(&out));
    assert!(text(&out).starts_with("ok"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_grant_ends_the_session_within_a_second() {
    let s = Stack::start().await;
    let token = s.token("agent:brief", &["agents"], Duration::from_secs(3));
    let started = std::time::Instant::now();
    let out = s.psql(&token, "read", &["-c", "SELECT pg_sleep(30)"]);
    let elapsed = started.elapsed();
    assert!(!out.status.success());
    assert!(err(&out).contains("expired"), "{}", err(&out));
    assert!(
        elapsed < Duration::from_millis(4500),
        "ended {elapsed:?} after start, for a 3 s token"
    );
    // The statement the expiry cut short is recorded, and says so.
    let events = s.events_of_session_with("pg_sleep(30)").await;
    let ops = query_records(&events);
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0].status, "interrupted");
    assert!(ops[0].error.contains("expired"), "{}", ops[0].error);
    // A new session after expiry is refused.
    let out = s.psql(&token, "read", &["-c", "SELECT 1"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_waiting_for_approval_when_the_session_ends_is_recorded() {
    let s = Stack::start().await;
    let token = s.token("agent:patient", &["agents"], Duration::from_secs(3));
    // Needs approval (DDL by the read role); nobody decides before the grant expires.
    let out = s.psql(&token, "read", &["-c", "DROP TABLE held_until_expiry"]);
    assert!(!out.status.success());
    assert!(err(&out).contains("expired"), "{}", err(&out));
    let events = s.events_of_session_with("held_until_expiry").await;
    let ops = query_records(&events);
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0].status, "interrupted");
    assert_eq!(ops[0].decision, Decision::NeedsApproval as i32);
    assert!(!ops[0].approval_id.is_empty(), "names its approval request");
    assert!(
        ops[0].error.contains("waited for approval") && ops[0].error.contains("expired"),
        "{}",
        ops[0].error
    );
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("session.end"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_unreachable_refuses_new_sessions() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("t");
    std::fs::write(&token_file, "irrelevant").unwrap();
    let config = agentgate_pg_proxy::PgProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        authz_url: format!("http://127.0.0.1:{}", free_port().unwrap()),
        approvals_url: format!("http://{}", s.approvals.addr),
        audit_url: s.audit.endpoint(),
        service_token_file: Some(token_file),
        ..Default::default()
    };
    let gateway = agentgate_pg_proxy::gateway_from_config(&config, dir.path())
        .await
        .unwrap();
    let lonely = agentgate_pg_proxy::start(&config, gateway).await.unwrap();
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=read dbname=appdb sslmode=disable",
            lonely.addr.port()
        ))
        .args(["-X", "-c", "SELECT 1"])
        .env("PGPASSWORD", &token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(err(&out).contains("unreachable"), "{}", err(&out));
    lonely.shutdown().await;
}

/// A raw protocol client in Python, logged in as role `read` through the proxy
/// (`argv`: port, token, mode), for what no driver sends: `msg(tag, body)` writes a message,
/// `read_msg()` reads one (`(None, b"")` once the connection is closed), `results()` prints
/// what came back up to ReadyForQuery.
const RAW_CLIENT: &str = r#"
import socket, struct, sys
port, token, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
params = b"user\0read\0database\0appdb\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
def read_msg():
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        if not chunk: return None, b""
        head += chunk
    tag, n = head[0:1], struct.unpack("!i", head[1:5])[0]
    body = b""
    while len(body) < n - 4:
        body += s.recv(n - 4 - len(body))
    return tag, body
def msg(tag, body):
    s.sendall(tag + struct.pack("!i", 4 + len(body)) + body)
tag, body = read_msg()
assert tag == b"R", tag
msg(b"p", token.encode() + b"\0")
while True:
    tag, body = read_msg()
    if tag == b"Z": break
    assert tag is not None and tag != b"E", body
def results():
    # Prints each row's first value, errors and a hold for approval, up to ReadyForQuery.
    while True:
        tag, body = read_msg()
        if tag is None or tag == b"Z": return
        if tag == b"D":
            n = struct.unpack("!i", body[2:6])[0]
            print("row", body[6:6 + n].decode(errors="replace"))
        if tag == b"N" and b"approv" in body:
            print("held"); return
        if tag == b"E":
            print("error", body.decode(errors="replace"))
"#;

/// Runs [`RAW_CLIENT`] followed by `script` as `mode`; what it printed.
fn raw_client(s: &Stack, token: &str, script: &str, mode: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("{RAW_CLIENT}{script}"),
            &s.proxy.addr.port().to_string(),
            token,
            mode,
        ])
        .output()
        .unwrap();
    let o = text(&out);
    assert!(out.status.success(), "{mode}: {o}\n{}", err(&out));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_08p01_and_other_sessions_go_on() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    // A raw client: logs in properly, then sends a Query whose length lies, and one with a
    // huge declared length.
    let script = r#"
if mode == "lying":
    s.sendall(b"Q" + struct.pack("!i", 12) + b"select 1")  # no terminator, short body
    s.sendall(b"S" + struct.pack("!i", 4))
else:
    s.sendall(b"Q" + struct.pack("!i", 0x7ffffff0))
while True:
    tag, body = read_msg()
    if tag is None:
        print("closed"); break
    if tag == b"E":
        print("error", body.decode(errors="replace"))
"#;
    for mode in ["lying", "huge"] {
        let o = raw_client(&s, &token, script, mode);
        assert!(o.contains("08P01"), "{mode}: {o}");
        assert!(
            o.ends_with("closed"),
            "{mode}: the connection is closed: {o}"
        );
    }
    let out = s.psql(&token, "read", &["-c", "SELECT 1"]);
    assert!(out.status.success(), "{}", err(&out));
}

/// A portal runs the statement it was bound to, and a statement name denotes what the
/// server holds under it, whatever the agent did to the name in between: closing the
/// statement or preparing another under the unnamed name after the Bind, a Parse the server
/// refused (the name exists) or skipped (an error earlier in its batch), a Close it skipped.
/// Each sequence is sent in one go, without waiting for answers (pipelined), and ends with
/// an unbounded DELETE bound under an innocent name: policy must see the DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_is_decided_by_the_statement_the_server_runs() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    psql_admin(
        &s.pg,
        "appdb",
        "INSERT INTO scratch SELECT g, 'v' FROM generate_series(1, 5) g",
    );
    let script = r#"
syncs = 0
def parse(name, sql): msg(b"P", name + b"\0" + sql + b"\0" + struct.pack("!h", 0))
def bind(portal, name): msg(b"B", portal + b"\0" + name + b"\0" + struct.pack("!hhh", 0, 0, 0))
def execute(portal): msg(b"E", portal + b"\0" + struct.pack("!i", 0))
def close(name): msg(b"C", b"S" + name + b"\0")
def sync():
    global syncs
    syncs += 1
    msg(b"S", b"")
delete, innocent = b"DELETE FROM scratch", b"SELECT 1"
if mode == "closed after bind":
    parse(b"s1", delete); bind(b"p1", b"s1"); close(b"s1"); execute(b"p1"); sync()
elif mode == "unnamed prepared again after bind":
    parse(b"", delete); bind(b"", b""); parse(b"", innocent); execute(b""); sync()
elif mode == "refused parse":
    parse(b"s1", delete); sync()
    parse(b"s1", innocent); sync()  # the server refuses: s1 exists
    bind(b"p1", b"s1"); execute(b"p1"); sync()
elif mode == "skipped parse":
    parse(b"", delete); sync()
    bind(b"x", b"nope"); parse(b"", innocent); sync()  # the Bind fails, the Parse is skipped
    bind(b"", b""); execute(b""); sync()
elif mode == "skipped close":
    parse(b"s1", delete); sync()
    bind(b"x", b"nope"); close(b"s1"); sync()  # the Close is skipped: s1 stays
    parse(b"s1", innocent); sync()  # refused: s1 exists
    bind(b"p1", b"s1"); execute(b"p1"); sync()
ready = 0
while True:
    tag, body = read_msg()
    if tag is None:
        print("closed"); break
    if tag == b"N" and b"approv" in body:
        print("held"); break
    if tag == b"C":
        print("completed", body.decode(errors="replace"))
    if tag == b"Z":
        ready += 1
        if ready == syncs:
            print("ready"); break
"#;
    for mode in [
        "closed after bind",
        "unnamed prepared again after bind",
        "refused parse",
        "skipped parse",
        "skipped close",
    ] {
        let o = raw_client(&s, &token, script, mode);
        assert_eq!(o, "held", "{mode}: the unbounded DELETE waits for approval");
        let count = Command::new("psql")
            .arg(s.pg.url("appdb"))
            .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM scratch"])
            .output()
            .unwrap();
        assert_eq!(text(&count), "5", "{mode}: nothing was deleted");
    }
}

/// Rows are masked by the statement that produced them: the unnamed statement prepared
/// again between a Bind and its Execute (described or not) does not lend its result shape
/// to the portal's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_masked_by_the_statement_that_produced_them() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let script = r#"
def parse(name, sql): msg(b"P", name + b"\0" + sql + b"\0" + struct.pack("!h", 0))
def describe(name): msg(b"D", b"S" + name + b"\0")
secret, innocent = b"SELECT email FROM customers WHERE id = 1", b"SELECT 'a'::text AS email"
parse(b"", secret)
if mode == "described": describe(b"")
msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
parse(b"", innocent)
if mode == "described": describe(b"")
msg(b"E", b"\0" + struct.pack("!i", 0))
msg(b"S", b"")
results()
"#;
    for mode in ["described", "not described"] {
        let o = raw_client(&s, &token, script, mode);
        assert!(o.starts_with("row "), "{mode}: {o}");
        assert!(!o.contains("@example.com"), "{mode}: the email leaked: {o}");
    }
}

/// A Bind may name a statement SQL `PREPARE` made (the server keeps both kinds in one
/// namespace): it is decided as `EXECUTE` of it, so a read runs and a delete is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_of_a_sql_prepared_statement_is_decided_by_what_it_runs() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let script = r#"
msg(b"Q", b"PREPARE q AS SELECT count(*) FROM customers\0")
while read_msg()[0] != b"Z": pass
msg(b"B", b"\0q\0" + struct.pack("!hhh", 0, 0, 0))
msg(b"E", b"\0" + struct.pack("!i", 0))
msg(b"S", b"")
results()
"#;
    assert_eq!(raw_client(&s, &token, script, "-"), "row 50");
    let events = s.events_of_session_with("PREPARE q AS SELECT").await;
    let ops = query_records(&events);
    let run = ops
        .iter()
        .find(|o| o.operation.as_ref().unwrap().text == "EXECUTE \"q\"")
        .unwrap_or_else(|| panic!("{ops:?}"));
    assert_eq!(run.operation.as_ref().unwrap().risk_classes, ["sql.read"]);
    assert_eq!(run.decision, Decision::Allow as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_right_backend() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let script = r#"
import sys, threading, time, psycopg
conn = psycopg.connect(sys.argv[1])
threading.Timer(1.0, conn.cancel).start()
t = time.time()
try:
    conn.execute("SELECT pg_sleep(20)")
    print("not cancelled")
except psycopg.errors.QueryCanceled:
    print("cancelled after %.1f" % (time.time() - t))
"#;
    let conninfo = format!("{} password={token}", s.conninfo("read"));
    let out = Command::new("python3")
        .args(["-c", script, &conninfo])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err(&out));
    assert!(text(&out).starts_with("cancelled"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_prepared_statements_pass_through() {
    let s = Stack::start().await;
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        std::path::Path::new(jar).exists(),
        "Debian's libpostgresql-jdbc-java is needed (.ci/run installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("Probe.java");
    std::fs::write(
        &source,
        r#"
import java.sql.*;
public class Probe {
    public static void main(String[] a) throws Exception {
        try (Connection c = DriverManager.getConnection(a[0], "read", a[1])) {
            // Past prepareThreshold (5) the driver switches to a named server-side statement.
            try (PreparedStatement p = c.prepareStatement("SELECT id, email, name FROM customers WHERE id = ?")) {
                for (int i = 1; i <= 8; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        if (!r.next() || r.getInt(1) != i) throw new Exception("row " + i);
                        if (r.getString(2).contains("@example.com")) throw new Exception("unmasked: " + r.getString(2));
                    }
                }
            }
            try (Statement st = c.createStatement(); ResultSet r = st.executeQuery("SELECT count(*) FROM customers")) {
                r.next();
                System.out.println("count " + r.getInt(1));
            }
        }
    }
}
"#,
    )
    .unwrap();
    let javac = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(dir.path())
        .arg(&source)
        .output()
        .unwrap();
    assert!(javac.status.success(), "{}", err(&javac));
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/appdb?sslmode=disable",
        s.proxy.addr.port()
    );
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{}:{jar}", dir.path().display()))
        .args(["Probe", &url, &token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), err(&out));
    assert_eq!(text(&out), "count 50");
}

/// As in docker-compose: agents arrive through a port mapping rather than from loopback, so
/// the token may only travel over TLS; pg-proxy answers SSLRequest with a certificate it
/// created once (`generated_tls_dir`) and a client can verify it with the CA it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate_and_no_cleartext_token() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let token_file = dir.path().join("service.token");
    std::fs::write(
        &token_file,
        s.authz
            .service_token("pg-proxy-tls", Duration::from_secs(600))
            .unwrap(),
    )
    .unwrap();
    let config = agentgate_pg_proxy::PgProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        name: "pg-proxy-tls".into(),
        generated_tls_dir: Some(tls_dir.clone()),
        allow_cleartext_on_loopback: false,
        authz_url: format!("http://{}", s.authz.addr),
        approvals_url: format!("http://{}", s.approvals.addr),
        audit_url: s.audit.endpoint(),
        service_token_file: Some(token_file),
        ..Default::default()
    };
    let gateway = agentgate_pg_proxy::gateway_from_config(&config, dir.path())
        .await
        .unwrap();
    let proxy = agentgate_pg_proxy::start(&config, gateway).await.unwrap();
    let token = s.token("agent:reader", &["agents"], Duration::from_secs(600));
    let psql = |ssl: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=read dbname=appdb {ssl}",
                proxy.addr.port()
            ))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-c",
                "SELECT count(*) FROM customers",
            ])
            .env("PGPASSWORD", &token)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = psql("sslmode=require");
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(text(&out), "50");
    let ca = tls_dir.join("ca.pem");
    let out = psql(&format!("sslmode=verify-ca sslrootcert={}", ca.display()));
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(text(&out), "50");
    // Without TLS the token is not taken, even from loopback here.
    let out = psql("sslmode=disable");
    assert!(!out.status.success());
    assert!(err(&out).contains("TLS"), "{}", err(&out));
    proxy.shutdown().await;
}
