//! A recorder client as its own process, so tests can kill it mid-stream (SIGKILL) and
//! start it again on the same spool.
//!
//! `record-events ENDPOINT SPOOL SESSIONS EVENTS DELAY_MS` records EVENTS events in each of
//! SESSIONS sessions, printing `recorded SESSION SEQ` once each is durable, then waits until
//! the store acknowledged everything and prints `flushed`. With SESSIONS = 0 it only ships
//! what the spool already holds. It presents a recorder token of the harness's test issuer.

use std::io::Write as _;
use std::time::Duration;

use agentgate_proto::audit::v1::OperationRecord;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::common::v1::{Operation, Principal, Protocol};
use agentgate_recorder::{Recorder, RecorderConfig, SessionContext};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, spool, sessions, events, delay_ms] = args.as_slice() else {
        anyhow::bail!("usage: record-events ENDPOINT SPOOL SESSIONS EVENTS DELAY_MS");
    };
    let (sessions, events, delay): (usize, u64, u64) =
        (sessions.parse()?, events.parse()?, delay_ms.parse()?);
    let mut config = RecorderConfig::new(endpoint.clone(), spool).with_token(
        agentgate_integration_tests::recorder_token("record-events")?,
    );
    config.batch_max = 50;
    config.max_backoff = Duration::from_millis(500);
    let recorder = Recorder::open(config).await?;
    let recorders: Vec<_> = (0..sessions)
        .map(|i| {
            recorder.session(SessionContext {
                principal: Some(Principal {
                    subject: format!("agent:test-{i}"),
                    ..Default::default()
                }),
                source_address: "127.0.0.1:5000".into(),
                connection: "test-db".into(),
                protocol: Protocol::Postgres,
                role: "read".into(),
            })
        })
        .collect();
    let mut out = std::io::stdout();
    for seq in 1..=events {
        for s in &recorders {
            let detail = Detail::Operation(OperationRecord {
                operation: Some(Operation {
                    text: format!("SELECT {seq}"),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let n = s.record("session.query", Some(detail)).await?;
            writeln!(out, "recorded {} {n}", s.session_id())?;
            out.flush()?;
        }
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    recorder.flush(Duration::from_secs(60)).await?;
    writeln!(out, "flushed")?;
    Ok(())
}
