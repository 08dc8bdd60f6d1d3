//! `agentgate approvals list|show|approve|deny|watch`: what a reviewer needs to decide — who
//! asks, for what, on which connection, the exact statement or command, its risk, and how
//! long it has been waiting — and the commands to decide it.
//!
//! Text that an agent chose (statements, reasons) is printed with control characters
//! escaped, so a request cannot rewrite the reviewer's terminal to hide what it really does.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_approvals::model::{approvals, state_name};
use agentgate_approvals::webhook::request_json;
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{
    ApprovalRequest, GetRequest, ListRequest, RequestKind, ReviewRequest, State, Verdict,
    WatchRequest,
};
use agentgate_proto::common::v1::{Principal, Protocol};
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;

/// Where the approvals service is and who is asking.
#[derive(Args, Clone)]
pub struct ApprovalsArgs {
    /// The approvals service's gRPC URL.
    #[arg(
        long,
        env = "AGENTGATE_APPROVALS_URL",
        default_value = "http://127.0.0.1:7405"
    )]
    pub url: String,
    /// Your agentgate token (the reviewer is whoever it names).
    #[arg(long, env = "AGENTGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA that signed the service's certificate (with an https:// URL).
    #[arg(long, env = "AGENTGATE_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate, when the service requires mutual TLS.
    #[arg(long, env = "AGENTGATE_TLS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long, env = "AGENTGATE_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl ApprovalsArgs {
    async fn connect(&self) -> anyhow::Result<Session> {
        let token = self
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .context("no token: pass --token or set AGENTGATE_TOKEN")?
            .to_owned();
        let tls = agentgate_tls::TlsConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        };
        let channel = crate::client::channel("approvals service", &self.url, Some(tls)).await?;
        Ok(Session {
            client: ApprovalsClient::new(channel)
                .max_decoding_message_size(128 << 20)
                .max_encoding_message_size(128 << 20),
            token,
        })
    }
}

struct Session {
    client: ApprovalsClient<Channel>,
    token: String,
}

impl Session {
    /// `message` with the bearer token attached.
    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token)
                .parse()
                .context("the token is not valid header text")?,
        );
        Ok(r)
    }
}

/// A gRPC refusal as one line a person can act on.
fn status(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unavailable => {
            anyhow::anyhow!("approvals service unavailable: {}", e.message())
        }
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "{} (pass a valid token with --token or AGENTGATE_TOKEN)",
            e.message()
        ),
        code => anyhow::anyhow!("{} ({code:?})", e.message()),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StateArg {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
    All,
}

impl From<StateArg> for State {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => State::Pending,
            StateArg::Approved => State::Approved,
            StateArg::Denied => State::Denied,
            StateArg::Expired => State::Expired,
            StateArg::Cancelled => State::Cancelled,
            StateArg::All => State::Unspecified,
        }
    }
}

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// Requests you may see (pending ones by default), newest first.
    List {
        #[command(flatten)]
        service: ApprovalsArgs,
        #[arg(long, value_enum, default_value = "pending")]
        state: StateArg,
        #[arg(long)]
        connection: Option<String>,
        /// Requester subject, e.g. agent:deploy-bot.
        #[arg(long)]
        requester: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line instead.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one request: who asks, for what, the exact operation, the reviews.
    Show {
        id: String,
        #[command(flatten)]
        service: ApprovalsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (you must be in one of its reviewer groups, and not its requester).
    Approve {
        id: String,
        #[command(flatten)]
        service: ApprovalsArgs,
        /// Why; recorded in the audit log.
        #[arg(long, short, default_value = "")]
        comment: String,
    },
    /// Deny a request: a single deny decides.
    Deny {
        id: String,
        #[command(flatten)]
        service: ApprovalsArgs,
        /// Why; recorded in the audit log and shown to the requester.
        #[arg(long, short, default_value = "")]
        comment: String,
    },
    /// Follow one request until it is decided (exit 0 if approved, 1 otherwise), or every
    /// request matching the filters until interrupted.
    Watch {
        /// A request id; omit to follow every request that matches the filters.
        id: Option<String>,
        #[command(flatten)]
        service: ApprovalsArgs,
        #[arg(long, value_enum, default_value = "all")]
        state: StateArg,
        #[arg(long)]
        connection: Option<String>,
        #[arg(long)]
        requester: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    match cmd {
        ApprovalsCommand::List {
            service,
            state,
            connection,
            requester,
            limit,
            json,
        } => {
            let mut s = service.connect().await?;
            let req = s.request(ListRequest {
                state: State::from(state) as i32,
                connection: connection.unwrap_or_default(),
                requester: requester.unwrap_or_default(),
                limit,
            })?;
            let list = s.client.list(req).await.map_err(status)?.into_inner();
            if json {
                for r in &list.requests {
                    println!("{}", request_json(r));
                }
            } else if list.requests.is_empty() {
                println!(
                    "no {}requests",
                    match state {
                        StateArg::All => String::new(),
                        s => format!("{} ", state_name(State::from(s)).to_lowercase()),
                    }
                );
            } else {
                let now = SystemTime::now();
                for r in &list.requests {
                    println!("{}", list_line(r, now));
                }
            }
            Ok(())
        }
        ApprovalsCommand::Show { id, service, json } => {
            let mut s = service.connect().await?;
            let req = s.request(GetRequest { id })?;
            let r = s.client.get(req).await.map_err(status)?.into_inner();
            if json {
                println!("{}", request_json(&r));
            } else {
                print!("{}", details(&r, SystemTime::now()));
            }
            Ok(())
        }
        ApprovalsCommand::Approve {
            id,
            service,
            comment,
        } => decide(service, id, Verdict::Approve, comment).await,
        ApprovalsCommand::Deny {
            id,
            service,
            comment,
        } => decide(service, id, Verdict::Deny, comment).await,
        ApprovalsCommand::Watch {
            id,
            service,
            state,
            connection,
            requester,
            json,
        } => {
            let mut s = service.connect().await?;
            let one = id.is_some();
            let req = s.request(WatchRequest {
                id: id.unwrap_or_default(),
                state: State::from(state) as i32,
                connection: connection.unwrap_or_default(),
                requester: requester.unwrap_or_default(),
            })?;
            let mut stream = s.client.watch(req).await.map_err(status)?.into_inner();
            let mut last: Option<ApprovalRequest> = None;
            loop {
                let message = tokio::select! {
                    m = stream.message() => m.map_err(status)?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(r) = message else { break };
                if json {
                    println!("{}", request_json(&r));
                } else {
                    println!("{}", watch_line(&r));
                }
                last = Some(r);
            }
            if !one {
                bail!("the approvals service ended the watch");
            }
            match last {
                Some(r) if r.state == State::Approved as i32 => Ok(()),
                Some(r) if r.state != State::Pending as i32 => bail!(
                    "request {} was {}{}",
                    r.id,
                    state_name(state_of(&r)),
                    decided_by(&r)
                ),
                _ => bail!("the watch ended before a decision"),
            }
        }
    }
}

async fn decide(
    service: ApprovalsArgs,
    id: String,
    verdict: Verdict,
    comment: String,
) -> anyhow::Result<()> {
    let mut s = service.connect().await?;
    let req = s.request(ReviewRequest {
        id,
        verdict: verdict as i32,
        comment,
    })?;
    let r = s.client.review(req).await.map_err(status)?.into_inner();
    let what = one_line(&asks_for(&r), 80);
    match state_of(&r) {
        State::Approved => println!(
            "approved {}: {} may now {what} ({} of {} approvals)",
            r.id,
            subject(r.requester.as_ref()),
            approvals(&r),
            r.approvals_required
        ),
        State::Denied => println!(
            "denied {}: {} may not {what}",
            r.id,
            subject(r.requester.as_ref())
        ),
        State::Pending => println!(
            "recorded your approval of {}: {} of {} approvals, still PENDING",
            r.id,
            approvals(&r),
            r.approvals_required
        ),
        s => println!("{}: {}", r.id, state_name(s)),
    }
    Ok(())
}

fn state_of(r: &ApprovalRequest) -> State {
    State::try_from(r.state).unwrap_or(State::Unspecified)
}

fn subject(p: Option<&Principal>) -> String {
    p.map(|p| clean(&p.subject)).unwrap_or_else(|| "-".into())
}

fn decided_by(r: &ApprovalRequest) -> String {
    let by = r
        .decided_by
        .as_ref()
        .map(|p| format!(" by {}", clean(&p.subject)))
        .unwrap_or_default();
    let why = if r.decision_comment.is_empty() {
        String::new()
    } else {
        format!(": {}", one_line(&r.decision_comment, 200))
    };
    format!("{by}{why}")
}

/// Escapes control characters (except newline and tab) so text an agent chose cannot move
/// the cursor, change colours or clear the reviewer's screen.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Text on one line, whitespace runs collapsed, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat = clean(&s.split_whitespace().collect::<Vec<_>>().join(" "));
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn to_time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t?;
    let secs = u64::try_from(t.seconds).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, t.nanos.clamp(0, 999_999_999) as u32))
}

/// A duration for people: "3m 12s", at most two units.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, mins, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) if s == 0 => format!("{m}m"),
        (0, 0, m) => format!("{m}m {s}s"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

fn show_time(t: Option<&prost_types::Timestamp>) -> String {
    match to_time(t) {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => "-".into(),
    }
}

/// "run DROP TABLE users on prod-db" / "access prod-db as admin for 1h".
fn asks_for(r: &ApprovalRequest) -> String {
    match RequestKind::try_from(r.kind).unwrap_or_default() {
        RequestKind::Access => format!(
            "access {} as {} for {}",
            clean(&r.connection),
            clean(&r.role),
            r.duration
                .as_ref()
                .map(|d| human(Duration::from_secs(d.seconds.max(0) as u64)))
                .unwrap_or_else(|| "-".into())
        ),
        _ => format!(
            "run {} on {}",
            r.operation
                .as_ref()
                .map(|op| one_line(&op.text, 60))
                .unwrap_or_default(),
            clean(&r.connection)
        ),
    }
}

fn risk(r: &ApprovalRequest) -> String {
    r.operation
        .as_ref()
        .map(|op| clean(&op.risk_classes.join(",")))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// How long it has waited (pending) or waited before its decision.
fn waiting(r: &ApprovalRequest, now: SystemTime) -> String {
    let created = to_time(r.created_at.as_ref()).unwrap_or(now);
    let end = if r.state == State::Pending as i32 {
        now
    } else {
        to_time(r.decided_at.as_ref()).unwrap_or(now)
    };
    human(end.duration_since(created).unwrap_or_default())
}

fn list_line(r: &ApprovalRequest, now: SystemTime) -> String {
    let when = if r.state == State::Pending as i32 {
        format!("waiting {}", waiting(r, now))
    } else {
        format!("after {}", waiting(r, now))
    };
    format!(
        "{}  {:<9}  {:<16}  {:<20}  {}/{} approvals  risk {:<20}  {}",
        r.id,
        state_name(state_of(r)),
        when,
        subject(r.requester.as_ref()),
        approvals(r),
        r.approvals_required,
        risk(r),
        asks_for(r)
    )
}

fn watch_line(r: &ApprovalRequest) -> String {
    let last_review = r.reviews.last().map(|v| {
        format!(
            "; last review: {} {}{}",
            subject(v.reviewer.as_ref()),
            if v.verdict == Verdict::Deny as i32 {
                "denied"
            } else {
                "approved"
            },
            if v.comment.is_empty() {
                String::new()
            } else {
                format!(" ({})", one_line(&v.comment, 80))
            }
        )
    });
    format!(
        "{}  {}  {:<9}  {}/{} approvals  {}: {}{}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        r.id,
        state_name(state_of(r)),
        approvals(r),
        r.approvals_required,
        subject(r.requester.as_ref()),
        asks_for(r),
        if r.state == State::Pending as i32 {
            last_review.unwrap_or_default()
        } else {
            format!(
                "; {}{}",
                state_name(state_of(r)).to_lowercase(),
                decided_by(r)
            )
        }
    )
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

/// The full view of one request, as `show` prints it.
fn details(r: &ApprovalRequest, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let st = state_of(r);
    let _ = writeln!(o, "Request     {}", r.id);
    let status = match st {
        State::Pending => {
            let left = to_time(r.expires_at.as_ref())
                .and_then(|e| e.duration_since(now).ok())
                .map(human)
                .unwrap_or_else(|| "0s".into());
            format!(
                "PENDING, {} of {} approvals; waiting {}, expires in {left} ({})",
                approvals(r),
                r.approvals_required,
                waiting(r, now),
                show_time(r.expires_at.as_ref())
            )
        }
        s => format!(
            "{} at {}{} (after {})",
            state_name(s),
            show_time(r.decided_at.as_ref()),
            decided_by(r),
            waiting(r, now)
        ),
    };
    let _ = writeln!(o, "State       {status}");
    if let Some(p) = &r.requester {
        let kind = agentgate_proto::common::v1::PrincipalKind::try_from(p.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("PRINCIPAL_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let groups = if p.groups.is_empty() {
            String::new()
        } else {
            format!("; groups {}", clean(&p.groups.join(", ")))
        };
        let _ = writeln!(o, "Requester   {} ({kind}{groups})", clean(&p.subject));
    }
    let _ = writeln!(o, "Asked at    {}", show_time(r.created_at.as_ref()));
    match RequestKind::try_from(r.kind).unwrap_or_default() {
        RequestKind::Access => {
            let _ = writeln!(
                o,
                "Asks for    access to connection {} as role {} for {}",
                clean(&r.connection),
                clean(&r.role),
                r.duration
                    .as_ref()
                    .map(|d| human(Duration::from_secs(d.seconds.max(0) as u64)))
                    .unwrap_or_else(|| "-".into())
            );
        }
        _ => {
            let op = r.operation.clone().unwrap_or_default();
            let session = if r.session_id.is_empty() {
                String::new()
            } else {
                format!(", held in session {}", clean(&r.session_id))
            };
            let _ = writeln!(
                o,
                "Asks for    an operation on connection {} ({}{session})",
                clean(&r.connection),
                protocol_name(op.protocol)
            );
            let _ = writeln!(o, "Risk        {}", risk(r));
            let targets = if op.targets.is_empty() {
                String::new()
            } else {
                format!(" on {}", clean(&op.targets.join(", ")))
            };
            let _ = writeln!(o, "Operation   {}{targets}", clean(&op.action));
            for line in clean(&op.text).lines() {
                let _ = writeln!(o, "    {line}");
            }
        }
    }
    let _ = writeln!(o, "Reason      {}", one_line(&r.reason, 500));
    let _ = writeln!(
        o,
        "Reviewers   {} ({} approval{} needed)",
        clean(&r.reviewer_groups.join(", ")),
        r.approvals_required,
        if r.approvals_required == 1 { "" } else { "s" }
    );
    if r.reviews.is_empty() {
        let _ = writeln!(o, "Reviews     none yet");
    }
    for (i, v) in r.reviews.iter().enumerate() {
        let _ = writeln!(
            o,
            "{}{} {} at {} from {}{}",
            if i == 0 {
                "Reviews     "
            } else {
                "            "
            },
            subject(v.reviewer.as_ref()),
            if v.verdict == Verdict::Deny as i32 {
                "DENIED"
            } else {
                "APPROVED"
            },
            show_time(v.time.as_ref()),
            if v.source_address.is_empty() {
                "-".to_owned()
            } else {
                clean(&v.source_address)
            },
            if v.comment.is_empty() {
                String::new()
            } else {
                format!(": {}", one_line(&v.comment, 200))
            }
        );
    }
    if st == State::Pending {
        let _ = writeln!(
            o,
            "To approve  agentgate approvals approve {} --comment \"…\"",
            r.id
        );
        let _ = writeln!(
            o,
            "To deny     agentgate approvals deny {} --comment \"…\"",
            r.id
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_control_sequences_are_escaped() {
        let evil = "SELECT 1;\x1b[2K\x1b[1A-- harmless\rDROP TABLE users";
        let shown = clean(evil);
        assert!(!shown.contains('\x1b') && !shown.contains('\r'), "{shown}");
        assert!(shown.contains("DROP TABLE users"));
    }

    #[test]
    fn durations_read_like_people_say_them() {
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_secs(192)), "3m 12s");
        assert_eq!(human(Duration::from_secs(1800)), "30m");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3h 2m");
        assert_eq!(human(Duration::from_secs(2 * 86400 + 3600)), "2d 1h");
    }
}
