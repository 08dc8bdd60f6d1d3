//! The `agentgate` command as a person runs it: `agentgate up`, then `agentgate audit …`
//! against it, and the one-line errors for wrong input.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentgate_integration_tests::free_port;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{OperationRecord, SessionEnded, SessionStarted};
use agentgate_proto::common::v1::{Decision, Operation, Principal, Protocol};
use agentgate_recorder::{Recorder, RecorderConfig, SessionContext};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const AGENTGATE: &str = env!("CARGO_BIN_EXE_agentgate");

fn agentgate(args: &[&str]) -> Output {
    Command::new(AGENTGATE)
        .args(args)
        .env_remove("AGENTGATE_AUDIT_STORE_URL")
        .env_remove("AGENTGATE_TOKEN")
        .env_remove("AGENTGATE_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed with exactly one line on stderr containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got {}", stdout(o));
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("agentgate: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

struct Up {
    child: tokio::process::Child,
    url: String,
    authz_url: String,
}

async fn up(dir: &Path) -> Up {
    let port = free_port().unwrap();
    let (authz_port, approvals_port) = (free_port().unwrap(), free_port().unwrap());
    let pg_port = free_port().unwrap();
    let ssh_port = free_port().unwrap();
    let config = dir.join("agentgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[audit_store]\nlisten = \"127.0.0.1:{port}\"\n\
             [authz]\nlisten = \"127.0.0.1:{authz_port}\"\n[[authz.connections]]\nname = \"prod-db\"\n\
             protocol = \"postgres\"\nupstream = \"127.0.0.1:5432\"\nroles = {{ read = {{ user = \"agent_ro\" }} }}\n\
             [approvals]\nlisten = \"127.0.0.1:{approvals_port}\"\n\
             [pg_proxy]\nlisten = \"127.0.0.1:{pg_port}\"\n\
             [ssh_proxy]\nlisten = \"127.0.0.1:{ssh_port}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(AGENTGATE)
        .args(["up", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("agentgate up starts")
            .unwrap()
            .unwrap_or_else(|| panic!("agentgate up exited: {seen:?}"));
        if line.contains("Press Ctrl-C") {
            break;
        }
        seen.push(line);
    }
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("127.0.0.1:{port}"))),
        "{seen:?}"
    );
    // ssh-proxy is part of `up`, with its host key in the data directory.
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("ssh -p {ssh_port} ROLE+CONNECTION@127.0.0.1"))),
        "{seen:?}"
    );
    let host_key = std::fs::read_to_string(dir.join("data/ssh-proxy-host-key.pub")).unwrap();
    assert!(seen.iter().any(|l| l.contains(host_key.trim())), "{seen:?}");
    // Keep reading stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Up {
        child,
        url: format!("http://127.0.0.1:{port}"),
        authz_url: format!("http://127.0.0.1:{authz_port}"),
    }
}

async fn record_a_session(url: &str, spool: &Path, token: &str) -> String {
    let recorder = Recorder::open(RecorderConfig::new(url, spool).with_token(token))
        .await
        .unwrap();
    let s = recorder.session(SessionContext {
        principal: Some(Principal {
            subject: "agent:deploy-bot".into(),
            ..Default::default()
        }),
        source_address: "10.1.2.3:51515".into(),
        connection: "prod-db".into(),
        protocol: Protocol::Postgres,
        role: "read".into(),
    });
    s.record(
        "session.start",
        Some(Detail::SessionStarted(SessionStarted {
            client: "psql 15".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    s.record(
        "session.query",
        Some(Detail::Operation(OperationRecord {
            operation: Some(Operation {
                text: "SELECT email\n  FROM users".into(),
                ..Default::default()
            }),
            decision: Decision::Allow as i32,
            rows: 3,
            duration_us: 1200,
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    s.record(
        "session.end",
        Some(Detail::SessionEnded(SessionEnded {
            reason: "client closed".into(),
            operations: 1,
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    recorder.flush(Duration::from_secs(20)).await.unwrap();
    s.session_id().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_then_audit_commands_then_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = up(dir.path()).await;
    let url = gw.url.clone();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let authz = gw.authz_url.clone();

    // A proxy's recorder needs a service token; the bootstrap admin token issues one.
    let issued = agentgate(&[
        "token",
        "issue",
        "--authz",
        &authz,
        "--data-dir",
        data,
        "--subject",
        "service:test-proxy",
        "--kind",
        "service",
        "--audience",
        "audit-store",
        "--ttl",
        "15m",
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    let service_token = stdout(&issued).trim().to_owned();
    let session = record_a_session(&url, &dir.path().join("spool.db"), &service_token).await;

    // Reading the log needs a token in group admin or auditor: the bootstrap admin token in
    // the data directory is the default.
    let sessions = agentgate(&[
        "audit",
        "sessions",
        "--store",
        &url,
        "--data-dir",
        data,
        "--principal",
        "agent:deploy-bot",
    ]);
    assert!(sessions.status.success(), "{}", stderr(&sessions));
    let out = stdout(&sessions);
    assert!(
        out.contains(&session) && out.contains("prod-db") && out.contains("10.1.2.3:51515"),
        "{out}"
    );
    let none = agentgate(&[
        "audit",
        "sessions",
        "--store",
        &url,
        "--data-dir",
        data,
        "--principal",
        "agent:nobody",
    ]);
    assert_eq!(stdout(&none).trim(), "no sessions");
    // The recorder's service token cannot read; a forged one is refused with a hint.
    let service_reads = agentgate(&[
        "audit",
        "sessions",
        "--store",
        &url,
        "--token",
        &service_token,
    ]);
    assert_one_line_error(&service_reads, "needs group \"admin\" or \"auditor\"");
    let forged = agentgate(&["audit", "verify", "--store", &url, "--token", "not.a.token"]);
    assert_one_line_error(
        &forged,
        "pass a valid token with --token or AGENTGATE_TOKEN",
    );
    let nowhere = dir.path().join("no-such-data-dir");
    let no_token = agentgate(&[
        "audit",
        "verify",
        "--store",
        &url,
        "--data-dir",
        nowhere.to_str().unwrap(),
    ]);
    assert_one_line_error(&no_token, "no token: pass --token or set AGENTGATE_TOKEN");

    // authz records to the store with a service token it signs itself.
    let mut authz_sessions = String::new();
    for _ in 0..50 {
        let o = agentgate(&[
            "audit",
            "sessions",
            "--store",
            &url,
            "--data-dir",
            data,
            "--connection",
            "authz",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        authz_sessions = stdout(&o);
        if authz_sessions.contains("service:authz") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(authz_sessions.contains("service:authz"), "{authz_sessions}");

    let events = agentgate(&[
        "audit",
        "events",
        &session,
        "--store",
        &url,
        "--data-dir",
        data,
    ]);
    assert!(events.status.success(), "{}", stderr(&events));
    let timeline = stdout(&events);
    let lines: Vec<&str> = timeline.lines().collect();
    assert_eq!(lines.len(), 3, "{timeline}");
    assert!(
        lines[0].contains("session.start")
            && lines[0].contains("agent:deploy-bot")
            && lines[0].contains("psql 15")
    );
    assert!(
        lines[1].contains("ALLOW")
            && lines[1].contains("SELECT email FROM users")
            && lines[1].contains("3 rows")
    );
    assert!(lines[2].contains("client closed"));

    let online = agentgate(&["audit", "verify", "--store", &url, "--data-dir", data]);
    assert!(online.status.success(), "{}", stderr(&online));
    // The session's 3 events, and what authz recorded meanwhile.
    assert!(stdout(&online).starts_with("OK: "), "{}", stdout(&online));

    let bundle = dir.path().join("evidence.ndjson");
    let export = agentgate(&[
        "audit",
        "export",
        "--store",
        &url,
        "--data-dir",
        data,
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert!(export.status.success(), "{}", stderr(&export));
    let header: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&bundle)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let key = header["header"]["public_key"].as_str().unwrap().to_owned();

    // Offline: the store can be gone.
    let offline = agentgate(&[
        "audit",
        "verify",
        bundle.to_str().unwrap(),
        "--public-key",
        &key,
    ]);
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert!(stdout(&offline).contains("pinned"), "{}", stdout(&offline));
    let wrong_key = "11".repeat(32);
    let pinned_wrong = agentgate(&[
        "audit",
        "verify",
        bundle.to_str().unwrap(),
        "--public-key",
        &wrong_key,
    ]);
    assert!(!pinned_wrong.status.success());

    // An edited bundle fails and names the record.
    let text = std::fs::read_to_string(&bundle).unwrap();
    let tampered = dir.path().join("tampered.ndjson");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let i = lines
        .iter()
        .position(|l| l.contains(&session) && l.contains("\"session_sequence\":2"))
        .unwrap();
    let record: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
    let chain_sequence = record["event"]["chain_sequence"].as_u64().unwrap();
    lines[i] = lines[i].replace("\"session_sequence\":2", "\"session_sequence\":7");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let caught = agentgate(&["audit", "verify", tampered.to_str().unwrap()]);
    assert_one_line_error(
        &caught,
        &format!("TAMPERED at chain record {chain_sequence}"),
    );

    // The bootstrap admin token in the data directory issues tokens; agents use theirs.
    let issued = agentgate(&[
        "token",
        "issue",
        "--authz",
        &authz,
        "--data-dir",
        data,
        "--subject",
        "agent:deploy-bot",
        "--ttl",
        "15m",
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    let agent_token = stdout(&issued).trim().to_owned();
    assert_eq!(agent_token.split('.').count(), 3, "a JWT alone on stdout");
    assert!(stderr(&issued).contains("token id"), "{}", stderr(&issued));
    let connections = agentgate(&["connections", "--authz", &authz, "--token", &agent_token]);
    assert!(
        stdout(&connections).contains("prod-db"),
        "{}",
        stderr(&connections)
    );
    let grants = agentgate(&["grants", "list", "--authz", &authz, "--token", &agent_token]);
    assert_eq!(stdout(&grants).trim(), "no grants", "{}", stderr(&grants));
    // The default policy permits nothing: the request is refused, and says why.
    let request = agentgate(&[
        "access",
        "request",
        "--authz",
        &authz,
        "--token",
        &agent_token,
        "--connection",
        "prod-db",
        "--role",
        "read",
        "--for",
        "30m",
        "--reason",
        "debugging",
    ]);
    assert_one_line_error(
        &request,
        "policy does not let agent:deploy-bot request read on prod-db",
    );
    // An agent cannot issue tokens.
    let not_admin = agentgate(&[
        "token",
        "issue",
        "--authz",
        &authz,
        "--token",
        &agent_token,
        "--subject",
        "agent:x",
    ]);
    assert_one_line_error(&not_admin, "not in the admin group");

    // Ctrl-C stops it cleanly.
    let pid = nix::unistd::Pid::from_raw(gw.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), gw.child.wait())
        .await
        .expect("stops within 15 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn clear_errors_for_wrong_input() {
    assert_one_line_error(
        &agentgate(&["audit", "sessions", "--store", "not a url"]),
        "is not an http",
    );
    let port = free_port().unwrap();
    assert_one_line_error(
        &agentgate(&[
            "audit",
            "sessions",
            "--store",
            &format!("http://127.0.0.1:{port}"),
        ]),
        "cannot reach the audit store",
    );
    assert_one_line_error(
        &agentgate(&["audit", "verify", "/nonexistent/bundle"]),
        "/nonexistent/bundle",
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[audit_store]\ncheckpoint_every = \"often\"\n").unwrap();
    assert_one_line_error(
        &agentgate(&["up", "--config", cfg.to_str().unwrap()]),
        "audit_store.checkpoint_every",
    );
    std::fs::write(
        &cfg,
        "[audit_store]\nlisten = \"127.0.0.1:1\"\ncolour = 3\n",
    )
    .unwrap();
    assert_one_line_error(
        &agentgate(&["up", "--config", cfg.to_str().unwrap()]),
        "colour",
    );
    assert_one_line_error(
        &agentgate(&["up", "--config", "/nonexistent/agentgate.toml"]),
        "/nonexistent/agentgate.toml",
    );
    let env_bad = Command::new(AGENTGATE)
        .args(["up", "--data-dir", dir.path().to_str().unwrap()])
        .env("AGENTGATE_AUDIT_STORE__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_one_line_error(&env_bad, "audit_store.listen");
    // A port already taken is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let busy = Command::new(AGENTGATE)
        .args(["up", "--data-dir", dir.path().to_str().unwrap()])
        .env("AGENTGATE_AUDIT_STORE__LISTEN", &addr)
        .output()
        .unwrap();
    assert_one_line_error(&busy, &addr);
    let bad_db = Command::new(AGENTGATE)
        .args(["up", "--data-dir", dir.path().to_str().unwrap()])
        .env("AGENTGATE_AUDIT_STORE__DATABASE_URL", "mysql://x")
        .output()
        .unwrap();
    assert_one_line_error(&bad_db, "postgres:// or sqlite://");
}

#[test]
fn dev_certs_creates_a_ca_and_service_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let o = agentgate(&["dev", "certs", "--dir", certs.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "ca.pem",
        "ca-key.pem",
        "audit-store.pem",
        "audit-store-key.pem",
        "agentgate-cli.pem",
    ] {
        assert!(certs.join(f).exists(), "{f}");
    }
    let again = agentgate(&["dev", "certs", "--dir", certs.to_str().unwrap()]);
    assert!(
        stdout(&again).starts_with("reused development CA"),
        "{}",
        stdout(&again)
    );
}
