//! The recorder loses nothing and duplicates nothing when the audit store crashes mid-stream
//! and the recording process is killed: both run as real processes and get SIGKILL, and the
//! spool's last write is torn.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use agentgate_integration_tests::{
    Backend, Postgres, audit_client, audit_superuser_token, free_port,
};
use agentgate_proto::audit::v1::{GetSessionEventsRequest, ListSessionsRequest, VerifyRequest};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

struct Store {
    child: Child,
}

async fn start_store(data_dir: &std::path::Path, url: &str, port: u16) -> Store {
    let mut child = Command::new(env!("CARGO_BIN_EXE_run-audit-store"))
        .args([data_dir.to_str().unwrap(), url, &port.to_string(), "50"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("store starts")
        .unwrap();
    assert_eq!(line.as_deref(), Some("listening"));
    Store { child }
}

fn record(
    endpoint: &str,
    spool: &std::path::Path,
    sessions: u32,
    events: u32,
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_record-events"))
        .args([
            endpoint,
            spool.to_str().unwrap(),
            &sessions.to_string(),
            &events.to_string(),
            "2",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads `recorded SESSION SEQ` lines until `n` more were seen.
async fn read_recorded(
    lines: &mut Lines<BufReader<ChildStdout>>,
    n: usize,
    acked: &mut HashMap<String, u64>,
) {
    for _ in 0..n {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("client keeps recording")
            .unwrap()
            .expect("client still running");
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("recorded"), "{line}");
        let session = parts.next().unwrap().to_owned();
        let seq: u64 = parts.next().unwrap().parse().unwrap();
        acked.insert(session, seq);
    }
}

async fn crash_and_recover(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let pg = match backend {
        Backend::Postgres => Some(Postgres::start().unwrap()),
        Backend::Sqlite => None,
    };
    let url = match &pg {
        Some(pg) => pg
            .create_owned_database("audit", "agentgate_audit")
            .await
            .unwrap(),
        None => format!("sqlite://{}", dir.path().join("audit.db").display()),
    };
    let port = free_port().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let spool = dir.path().join("spool.db");

    let mut store = start_store(dir.path(), &url, port).await;
    let (mut client, mut lines) = record(&endpoint, &spool, 3, 100_000);
    let mut acked = HashMap::new();
    read_recorded(&mut lines, 600, &mut acked).await;

    // The store crashes mid-stream; the client keeps recording into its spool.
    store.child.kill().await.unwrap();
    read_recorded(&mut lines, 600, &mut acked).await;
    // Then the client process is killed too, with events spooled and unshipped.
    client.kill().await.unwrap();
    drop(lines);
    // And its last write was cut short: half a frame right after the last whole one of the
    // newest segment, in the zeros the writer put ahead of its frames (a SIGKILL between write
    // and fdatasync can leave one). Recovery cuts it; nothing that was reported recorded is
    // in it.
    let newest = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("the spool has a segment");
    {
        use std::os::unix::fs::FileExt as _;
        let bytes = std::fs::read(&newest).unwrap();
        // Frames are [length u32][crc u32][id u64][body]; zeros follow the last one.
        let mut end = 0;
        while end + 16 <= bytes.len() && bytes[end..end + 16] != [0u8; 16] {
            let len = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
            end += 16 + len;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap();
        // A frame header promising 200 bytes, then only 20 of them.
        let mut torn = Vec::new();
        torn.extend_from_slice(&200u32.to_le_bytes());
        torn.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        torn.extend_from_slice(&u64::MAX.to_le_bytes());
        torn.extend_from_slice(&[7u8; 20]);
        f.write_all_at(&torn, end as u64).unwrap();
    }

    // Both come back: the store on the same database, a client on the same spool.
    let _store = start_store(dir.path(), &url, port).await;
    let (mut drain, mut lines) = record(&endpoint, &spool, 0, 0);
    let done = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("spool drains")
        .unwrap();
    assert_eq!(done.as_deref(), Some("flushed"));
    assert!(drain.wait().await.unwrap().success());

    let mut c = audit_client(&endpoint, &audit_superuser_token().unwrap())
        .await
        .unwrap();
    assert_eq!(acked.len(), 3);
    for (session, last_acked) in &acked {
        let events = c
            .get_session_events(GetSessionEventsRequest {
                session_id: session.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let seqs: Vec<u64> = events
            .iter()
            .map(|e| e.event.as_ref().unwrap().sequence)
            .collect();
        // Exactly once: 1..=n without a hole or a repeat, and n covers every event the
        // client was told was recorded (it may have spooled a few more before the kill).
        let n = seqs.len() as u64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "session {session}");
        assert!(
            n >= *last_acked,
            "session {session}: stored {n}, recorded {last_acked}"
        );
    }
    let sessions = c
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(
        sessions
            .iter()
            .all(|s| s.gaps.is_empty() && s.events == s.last_sequence)
    );
    let v = c.verify(VerifyRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{}", v.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_crash_and_client_kill() {
    crash_and_recover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_crash_and_client_kill() {
    crash_and_recover(Backend::Postgres).await;
}
