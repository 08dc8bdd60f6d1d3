//! `agentgate audit …`: sessions, a readable event timeline, verification and evidence export.

use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_audit_chain::{BundleError, VerifyingKey, verify_bundle};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{
    AuditEvent, CheckpointRequest, ExportRequest, ListSessionsRequest, PruneRequest,
    ReplaySessionRequest, VerifyRequest,
};
use agentgate_proto::common::v1::{Decision, Protocol, TimeRange};
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use tokio_stream::StreamExt as _;

use crate::client::{StoreArgs, status};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// List recorded sessions, newest first.
    Sessions {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        connection: Option<String>,
        #[arg(long, value_enum)]
        protocol: Option<ProtocolArg>,
        #[command(flatten)]
        window: Window,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one session's events as a timeline.
    Events {
        /// The session id (a UUID, as `audit sessions` lists it).
        session: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print each event as a JSON line instead.
        #[arg(long)]
        json: bool,
    },
    /// Verify the chain and checkpoints: of the running store, or of an exported bundle
    /// offline (no database, no network).
    Verify {
        /// An evidence bundle from `agentgate audit export`; omit to ask the store.
        bundle: Option<PathBuf>,
        /// The store's public key (hex), obtained out of band, that the bundle must carry.
        #[arg(long)]
        public_key: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Export an evidence bundle (events, checkpoints, public key) to a file.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        window: Window,
    },
    /// Sign a checkpoint of the chain head now.
    Checkpoint {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Retention: remove events older than a duration, up to the checkpoint before it.
    Prune {
        #[command(flatten)]
        store: StoreArgs,
        /// e.g. 400d
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
}

/// A time window: RFC 3339 instants or durations back from now ("2h").
#[derive(Args)]
pub struct Window {
    /// Start: an RFC 3339 time or a duration ago, e.g. 2h.
    #[arg(long, value_parser = parse_instant)]
    since: Option<SystemTime>,
    /// End: an RFC 3339 time or a duration ago.
    #[arg(long, value_parser = parse_instant)]
    until: Option<SystemTime>,
}

impl Window {
    fn range(&self) -> Option<TimeRange> {
        (self.since.is_some() || self.until.is_some()).then(|| TimeRange {
            start: self.since.map(timestamp),
            end: self.until.map(timestamp),
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    Postgres,
    Ssh,
    Http,
    Kubernetes,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Postgres => Protocol::Postgres,
            ProtocolArg::Ssh => Protocol::Ssh,
            ProtocolArg::Http => Protocol::Http,
            ProtocolArg::Kubernetes => Protocol::Kubernetes,
        }
    }
}

fn parse_instant(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| SystemTime::now() - d)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 2h"))
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn show_time(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let Ok(secs) = u64::try_from(t.seconds) else {
        return "-".into();
    };
    let time = UNIX_EPOCH + Duration::new(secs, t.nanos.clamp(0, 999_999_999) as u32);
    humantime::format_rfc3339_micros(time).to_string()
}

fn protocol_name(p: i32) -> &'static str {
    match Protocol::try_from(p).unwrap_or_default() {
        Protocol::Postgres => "postgres",
        Protocol::Ssh => "ssh",
        Protocol::Http => "http",
        Protocol::Kubernetes => "kubernetes",
        Protocol::ControlPlane => "control-plane",
        Protocol::Unspecified => "-",
    }
}

pub async fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Sessions {
            store,
            principal,
            connection,
            protocol,
            window,
            limit,
        } => {
            let mut c = store.connect().await?;
            let sessions = c
                .list_sessions(ListSessionsRequest {
                    principal: principal.unwrap_or_default(),
                    connection: connection.unwrap_or_default(),
                    protocol: protocol
                        .map(|p| Protocol::from(p) as i32)
                        .unwrap_or_default(),
                    time: window.range(),
                    limit,
                })
                .await
                .map_err(status)?
                .into_inner()
                .sessions;
            if sessions.is_empty() {
                println!("no sessions");
            }
            for s in sessions {
                let gaps = if s.gaps.is_empty() {
                    String::new()
                } else {
                    let runs: Vec<String> = s
                        .gaps
                        .iter()
                        .map(|g| format!("{}-{}", g.from, g.to))
                        .collect();
                    format!("  MISSING EVENTS {}", runs.join(","))
                };
                println!(
                    "{}  {}  {:<24} {:<16} {:<10} {:<6} {:>6} events  from {}{gaps}",
                    s.session_id,
                    show_time(s.first_event_at.as_ref()),
                    s.principal,
                    s.connection,
                    protocol_name(s.protocol),
                    s.role,
                    s.events,
                    s.source_address,
                );
            }
            Ok(())
        }
        AuditCommand::Events {
            session,
            store,
            json,
        } => {
            let mut c = store.connect().await?;
            let mut stream = c
                .replay_session(ReplaySessionRequest {
                    session_id: session,
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(stored) = stream.next().await {
                let stored = stored.map_err(status)?;
                let Some(event) = stored.event else { continue };
                if json {
                    writeln!(out, "{}", event_json(&event, stored.chain_sequence))?;
                } else {
                    writeln!(out, "{}", timeline_line(&event))?;
                }
            }
            Ok(())
        }
        AuditCommand::Verify {
            bundle: Some(path),
            public_key,
            ..
        } => verify_offline(&path, public_key.as_deref()),
        AuditCommand::Verify {
            bundle: None,
            store,
            ..
        } => {
            let mut c = store.connect().await?;
            let v = c
                .verify(VerifyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if !v.ok {
                bail!(
                    "TAMPERED at chain record {}: {}",
                    v.first_bad_sequence,
                    v.error
                );
            }
            println!(
                "OK: {} events and {} signed checkpoints verify (chain starts after {}; {} newest events not yet signed)",
                v.events_checked, v.checkpoints_checked, v.anchored_at, v.unsigned_tail
            );
            Ok(())
        }
        AuditCommand::Export {
            store,
            output,
            window,
        } => {
            let mut c = store.connect().await?;
            let mut stream = c
                .export(ExportRequest {
                    time: window.range(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let tmp = output.with_extension("partial");
            let mut file = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut bytes = 0;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(status)?;
                bytes += chunk.data.len();
                file.write_all(&chunk.data)?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("writing {}", output.display()))?;
            let report = verify_bundle(BufReader::new(std::fs::File::open(&output)?), None)
                .context("the exported bundle does not verify")?;
            println!(
                "wrote {} ({bytes} bytes): {} events, {} checkpoints, key {}",
                output.display(),
                report.chain.events_checked,
                report.chain.checkpoints_checked,
                report.key_id
            );
            Ok(())
        }
        AuditCommand::Checkpoint { store } => {
            let mut c = store.connect().await?;
            let cp = c
                .checkpoint(CheckpointRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "checkpoint at chain record {}, head {}, key {}",
                cp.chain_sequence,
                hex(&cp.head_hash),
                cp.key_id
            );
            Ok(())
        }
        AuditCommand::Prune { store, older_than } => {
            let mut c = store.connect().await?;
            let r = c
                .prune(PruneRequest {
                    before: Some(timestamp(SystemTime::now() - older_than)),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "removed {} events; the retained chain starts after record {}",
                r.events_removed, r.anchored_at
            );
            Ok(())
        }
    }
}

fn verify_offline(path: &Path, public_key: Option<&str>) -> anyhow::Result<()> {
    let pinned = public_key.map(parse_public_key).transpose()?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match verify_bundle(BufReader::new(file), pinned.as_ref()) {
        Ok(report) => {
            println!(
                "OK: {} events and {} signed checkpoints verify (key {}{}; chain starts after {})",
                report.chain.events_checked,
                report.chain.checkpoints_checked,
                report.key_id,
                if pinned.is_some() {
                    ", pinned"
                } else {
                    ", not pinned: pass --public-key"
                },
                report.chain.anchored_at
            );
            Ok(())
        }
        Err(BundleError::Tampered(f)) => {
            bail!(
                "{}: TAMPERED at chain record {}: {}",
                path.display(),
                f.chain_sequence,
                f.reason
            )
        }
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

fn parse_public_key(s: &str) -> anyhow::Result<VerifyingKey> {
    let bytes: [u8; 32] = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .and_then(|v| v.try_into().ok())
        .context("--public-key must be 64 hex digits (the Ed25519 public key)")?;
    VerifyingKey::from_bytes(&bytes).context("--public-key is not a valid Ed25519 key")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One event as a line a reviewer can read.
fn timeline_line(e: &AuditEvent) -> String {
    let who = e
        .principal
        .as_ref()
        .map(|p| p.subject.as_str())
        .unwrap_or("-");
    let head = format!(
        "{}  #{:<4} {:<16}",
        show_time(e.time.as_ref()),
        e.sequence,
        e.kind
    );
    let body = match &e.detail {
        Some(Detail::SessionStarted(s)) => format!(
            "{who} from {} to {} ({}) as {}{}",
            e.source_address,
            e.connection,
            protocol_name(e.protocol),
            e.role,
            if s.client.is_empty() {
                String::new()
            } else {
                format!(", client {}", s.client)
            }
        ),
        Some(Detail::SessionEnded(s)) => format!("{} ({} operations)", s.reason, s.operations),
        Some(Detail::Operation(op)) => {
            let decision = match Decision::try_from(op.decision).unwrap_or_default() {
                Decision::Allow => "ALLOW",
                Decision::Deny => "DENY",
                Decision::NeedsApproval => "APPROVAL",
                Decision::Unspecified => "-",
            };
            let text = op
                .operation
                .as_ref()
                .map(|o| o.text.as_str())
                .unwrap_or_default();
            let mut line = format!("{decision:<8} {}", one_line(text));
            if !op.approval_id.is_empty() {
                line += &format!("  approval {}", op.approval_id);
            }
            if op.duration_us > 0 || op.rows > 0 {
                line += &format!(
                    "  ({} rows, {:.1} ms)",
                    op.rows,
                    op.duration_us as f64 / 1000.0
                );
            }
            if !op.error.is_empty() {
                line += &format!("  error: {}", one_line(&op.error));
            }
            let masked: u64 = op.masked.iter().map(|m| m.count).sum();
            if masked > 0 {
                line += &format!("  [{masked} values masked]");
            }
            line
        }
        Some(Detail::Terminal(t)) => format!("terminal {} {} bytes", t.code, t.data.len()),
        Some(Detail::Auth(a)) => format!(
            "{} {who}: {}",
            if a.success { "verified" } else { "REFUSED" },
            a.reason
        ),
        Some(Detail::Approval(a)) => {
            format!("approval {} {} {}", a.approval_id, a.state, a.comment)
        }
        Some(Detail::Grant(g)) => format!("grant {} {} {}", g.grant_id, g.change, g.reason),
        None => format!("{who} {}", e.connection),
    };
    format!("{head} {body}")
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 200 {
        flat.chars().take(200).collect::<String>() + "…"
    } else {
        flat
    }
}

fn event_json(e: &AuditEvent, chain_sequence: u64) -> serde_json::Value {
    let op = match &e.detail {
        Some(Detail::Operation(op)) => serde_json::json!({
            "text": op.operation.as_ref().map(|o| o.text.clone()),
            "decision": op.decision,
            "approval_id": op.approval_id,
            "rows": op.rows,
            "duration_us": op.duration_us,
            "error": op.error,
        }),
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "chain_sequence": chain_sequence,
        "session_id": e.session_id,
        "sequence": e.sequence,
        "time": show_time(e.time.as_ref()),
        "kind": e.kind,
        "principal": e.principal.as_ref().map(|p| p.subject.clone()),
        "source_address": e.source_address,
        "connection": e.connection,
        "protocol": protocol_name(e.protocol),
        "role": e.role,
        "operation": op,
    })
}
