//! `agentgate approvals …` as a reviewer runs it, against a real approvals service: what a
//! reviewer sees, deciding, watching, and one-line errors for wrong input.

#![allow(clippy::unwrap_used)]

use std::process::{Output, Stdio};
use std::time::Duration;

use agentgate_approvals::ApprovalsConfig;
use agentgate_integration_tests::{ApprovalsFixture, bearer, free_port};
use agentgate_proto::approvals::v1::{CreateRequest, RequestKind};
use agentgate_proto::common::v1::{Operation, PrincipalKind, Protocol};

const AGENTGATE: &str = env!("CARGO_BIN_EXE_agentgate");

fn command(args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(AGENTGATE);
    c.args(args)
        .env_remove("AGENTGATE_APPROVALS_URL")
        .env_remove("AGENTGATE_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn agentgate(args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(30), command(args).output())
        .await
        .expect("agentgate finishes")
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed with exactly one line on stderr containing `needle`.
#[track_caller]
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got {}", stdout(o));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("agentgate: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[track_caller]
fn assert_ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(o));
    stdout(o)
}

fn operation(text: &str) -> CreateRequest {
    CreateRequest {
        kind: RequestKind::Operation as i32,
        connection: "prod-db".into(),
        operation: Some(Operation {
            protocol: Protocol::Postgres as i32,
            action: "delete".into(),
            text: text.into(),
            targets: vec!["users".into()],
            risk_classes: vec!["sql.destructive".into()],
            ..Default::default()
        }),
        reason: "remove test accounts".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_lists_shows_decides_and_watches() {
    let fx = ApprovalsFixture::start(ApprovalsConfig {
        default_reviewer_groups: vec!["approvers".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let url = fx.endpoint();
    let agent = fx
        .token("agent:deploy-bot", PrincipalKind::Agent, &["deployers"])
        .unwrap();
    let alice = fx
        .token("human:alice", PrincipalKind::Human, &["approvers"])
        .unwrap();
    let eve = fx
        .token("human:eve", PrincipalKind::Human, &["devs"])
        .unwrap();
    let mut c = fx.client().await.unwrap();
    let statement = "DELETE FROM users\n WHERE email LIKE '%@test.example'";
    let r = c
        .create(bearer(&agent, operation(statement)))
        .await
        .unwrap()
        .into_inner();
    let access = c
        .create(bearer(
            &agent,
            CreateRequest {
                kind: RequestKind::Access as i32,
                connection: "prod-db".into(),
                role: "admin".into(),
                duration: Some(prost_types::Duration {
                    seconds: 1800,
                    nanos: 0,
                }),
                reason: "incident 4711".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // A statement that tries to rewrite the reviewer's terminal.
    let sneaky = c
        .create(bearer(
            &agent,
            operation("SELECT 1;\x1b[2K\x1b[1A\rDROP TABLE users"),
        ))
        .await
        .unwrap()
        .into_inner();

    // list: who asks, for what, where, the risk, how long it has been waiting.
    let out = assert_ok(&agentgate(&["approvals", "list", "--url", &url, "--token", &alice]).await);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let line = lines.iter().find(|l| l.contains(&r.id)).unwrap();
    for needle in [
        "PENDING",
        "waiting",
        "agent:deploy-bot",
        "0/1 approvals",
        "sql.destructive",
        "run DELETE FROM users WHERE email LIKE '%@test.example' on prod-db",
    ] {
        assert!(line.contains(needle), "{needle:?} in {line}");
    }
    let line = lines.iter().find(|l| l.contains(&access.id)).unwrap();
    assert!(line.contains("access prod-db as admin for 30m"), "{line}");
    assert!(
        !out.contains('\x1b'),
        "control characters are escaped: {out:?}"
    );
    // Someone outside the reviewer groups sees nothing.
    let none = assert_ok(&agentgate(&["approvals", "list", "--url", &url, "--token", &eve]).await);
    assert_eq!(none.trim(), "no pending requests");
    let json = assert_ok(
        &agentgate(&[
            "approvals",
            "list",
            "--json",
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
    );
    for l in json.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["state"], "pending");
    }

    // show: everything, the exact statement line by line, and how to decide.
    let out = assert_ok(
        &agentgate(&["approvals", "show", &r.id, "--url", &url, "--token", &alice]).await,
    );
    for needle in [
        &format!("Request     {}", r.id),
        "State       PENDING, 0 of 1 approvals; waiting ",
        "expires in 59m",
        "Requester   agent:deploy-bot (agent; groups deployers)",
        "Asks for    an operation on connection prod-db (postgres)",
        "Risk        sql.destructive",
        "Operation   delete on users",
        "\n    DELETE FROM users\n     WHERE email LIKE '%@test.example'\n",
        "Reason      remove test accounts",
        "Reviewers   approvers (1 approval needed)",
        "Reviews     none yet",
        &format!("To approve  agentgate approvals approve {}", r.id),
    ] {
        assert!(out.contains(needle), "{needle:?} in\n{out}");
    }
    let out = assert_ok(
        &agentgate(&[
            "approvals",
            "show",
            &sneaky.id,
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
    );
    assert!(!out.contains('\x1b') && !out.contains('\r'), "{out:?}");
    assert!(
        out.contains("\\u{1b}[2K") && out.contains("DROP TABLE users"),
        "{out}"
    );

    // watch ID follows the request until it is decided; approve decides it.
    let watcher = command(&[
        "approvals",
        "watch",
        &r.id,
        "--url",
        &url,
        "--token",
        &agent,
    ])
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = assert_ok(
        &agentgate(&[
            "approvals",
            "approve",
            &r.id,
            "--comment",
            "test accounts only",
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
    );
    assert!(
        out.starts_with(&format!(
            "approved {}: agent:deploy-bot may now run DELETE FROM users",
            r.id
        )),
        "{out}"
    );
    let watched = tokio::time::timeout(Duration::from_secs(10), watcher.wait_with_output())
        .await
        .expect("watch ends with the decision")
        .unwrap();
    let out = assert_ok(&watched);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("PENDING"));
    assert!(
        lines[1].contains("APPROVED")
            && lines[1].contains("; approved by human:alice: test accounts only"),
        "{}",
        lines[1]
    );
    let out = assert_ok(
        &agentgate(&["approvals", "show", &r.id, "--url", &url, "--token", &agent]).await,
    );
    assert!(out.contains("State       APPROVED at "), "{out}");
    assert!(
        out.contains("Reviews     human:alice APPROVED at ")
            && out.contains(": test accounts only"),
        "{out}"
    );
    assert!(!out.contains("To approve"), "{out}");

    // A decided request: one line, exit 1; the watch of a denial exits 1 and says so.
    assert_one_line_error(
        &agentgate(&["approvals", "deny", &r.id, "--url", &url, "--token", &alice]).await,
        "a decision is final (FailedPrecondition)",
    );
    let watcher = command(&[
        "approvals",
        "watch",
        &access.id,
        "--url",
        &url,
        "--token",
        &agent,
    ])
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = assert_ok(
        &agentgate(&[
            "approvals",
            "deny",
            &access.id,
            "-c",
            "use the read role",
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
    );
    assert!(out.starts_with(&format!("denied {}", access.id)), "{out}");
    let watched = tokio::time::timeout(Duration::from_secs(10), watcher.wait_with_output())
        .await
        .expect("watch ends with the decision")
        .unwrap();
    assert_one_line_error(
        &watched,
        &format!(
            "request {} was DENIED by human:alice: use the read role",
            access.id
        ),
    );

    // Wrong input: each a clear line and exit 1, and nothing changed.
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "approve",
            &sneaky.id,
            "--url",
            &url,
            "--token",
            &eve,
        ])
        .await,
        "may not review request",
    );
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "approve",
            &sneaky.id,
            "--url",
            &url,
            "--token",
            &agent,
        ])
        .await,
        "cannot review their own request",
    );
    assert_one_line_error(
        &agentgate(&["approvals", "approve", &sneaky.id, "--url", &url]).await,
        "no token: pass --token or set AGENTGATE_TOKEN",
    );
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "show",
            &sneaky.id,
            "--url",
            &url,
            "--token",
            "garbage",
        ])
        .await,
        "token refused",
    );
    let unknown = "01900000-0000-7000-8000-000000000000";
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "show",
            unknown,
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
        &format!("no approval request {unknown} (NotFound)"),
    );
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "approve",
            "nonsense",
            "--url",
            &url,
            "--token",
            &alice,
        ])
        .await,
        "is not an approval request id",
    );
    let port = free_port().unwrap();
    assert_one_line_error(
        &agentgate(&[
            "approvals",
            "list",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            &alice,
        ])
        .await,
        "cannot reach the approvals service",
    );
    assert_one_line_error(
        &agentgate(&["approvals", "list", "--url", "not a url", "--token", &alice]).await,
        "is not an http",
    );
    let still = c
        .get(bearer(
            &alice,
            agentgate_proto::approvals::v1::GetRequest {
                id: sneaky.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still, sneaky, "refused calls changed nothing");
}
