//! Notifications to webhooks: on create and on every decision.
//!
//! Two payloads: CloudEvents 1.0 in structured mode (`application/cloudevents+json`, type
//! `dev.agentgate.approval.<created|approved|denied|expired|cancelled>`), and a Slack-compatible
//! incoming-webhook message (`{"text": …, "blocks": …}`) that tells a reviewer who asks, for
//! what, on which connection, the exact operation, its risk, and the command to approve.
//!
//! When a secret is configured, every POST carries `X-Agentgate-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the raw body under that secret; the body includes an event id and time, so a
//! receiver can also refuse replays.
//!
//! Delivery never blocks a decision: [`Notifier::notify`] only queues. Each webhook has its
//! own queue and worker; each notification is retried with exponential backoff until it is
//! delivered (any 2xx) or `max_attempts` is reached. The queue is in memory: a notification
//! still queued when the process stops is lost (the audit log and `Watch` are the records of
//! truth; webhooks are a convenience for people).

use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::approvals::v1::{ApprovalRequest, RequestKind, State, Verdict};
use agentgate_proto::common::v1::{Principal, PrincipalKind, Protocol};
use bytes::Bytes;
use hmac::{KeyInit as _, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::config::{WebhookConfig, WebhookFormat};
use crate::model::{self, approvals, rfc3339, state};

/// Notifications queued per webhook before new ones are dropped (and counted).
const QUEUE_CAPACITY: usize = 10_000;
/// Deliveries of one webhook in progress at once.
const CONCURRENCY: usize = 16;
/// Largest response body read (and discarded) from a receiver.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Largest operation text put in a Slack message (Slack limits a text block to 3000).
const SLACK_TEXT_MAX: usize = 2800;

/// Why a webhook could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook secret {0:?} must be `env:NAME` or `file:PATH`")]
    SecretSyntax(String),
    #[error("webhook secret: environment variable {0} is not set")]
    SecretEnv(String),
    #[error("webhook secret: reading {path}: {reason}")]
    SecretFile { path: String, reason: String },
    #[error("webhook {url}: {reason}")]
    Tls { url: String, reason: String },
}

/// Reads a secret given as `env:NAME` or `file:PATH` (a trailing newline is dropped).
pub fn resolve_secret(reference: &str) -> Result<Vec<u8>, WebhookError> {
    if let Some(name) = reference.strip_prefix("env:") {
        std::env::var(name)
            .map(String::into_bytes)
            .map_err(|_| WebhookError::SecretEnv(name.to_owned()))
    } else if let Some(path) = reference.strip_prefix("file:") {
        let mut bytes = std::fs::read(path).map_err(|e| WebhookError::SecretFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Ok(bytes)
    } else {
        Err(WebhookError::SecretSyntax(
            reference.chars().take(12).collect::<String>() + "…",
        ))
    }
}

/// `sha256=<hex>`: the value of `X-Agentgate-Signature` for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What happened to a request, as a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Decided(State),
}

impl EventKind {
    /// `created`, `approved`, `denied`, `expired`, `cancelled`.
    pub fn word(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Decided(s) => model::state_word(s),
        }
    }

    /// The CloudEvents `type`.
    pub fn cloudevents_type(self) -> String {
        format!("dev.agentgate.approval.{}", self.word())
    }
}

/// Webhook counters.
#[derive(Clone, Default)]
pub struct WebhookMetrics {
    pub delivered: Counter,
    pub failed_attempts: Counter,
    pub given_up: Counter,
    pub dropped: Counter,
}

struct Job {
    kind: EventKind,
    event_id: String,
    time: String,
    request: Arc<ApprovalRequest>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Target {
    config: WebhookConfig,
    uri: http::Uri,
    secret: Option<Vec<u8>>,
    client: HttpsClient,
}

/// Queues notifications for every configured webhook.
#[derive(Clone, Default)]
pub struct Notifier {
    queues: Vec<mpsc::Sender<Arc<Job>>>,
    metrics: WebhookMetrics,
}

impl Notifier {
    /// Resolves secrets and TLS roots (failing start-up on a mistake) and starts one worker
    /// per webhook.
    pub fn start(
        configs: &[WebhookConfig],
        metrics: WebhookMetrics,
    ) -> Result<Notifier, WebhookError> {
        let mut queues = Vec::new();
        for config in configs {
            let tls_err = |reason: String| WebhookError::Tls {
                url: config.url.clone(),
                reason,
            };
            let uri: http::Uri = config.url.parse().map_err(|e| tls_err(format!("{e}")))?;
            let secret = config.secret.as_deref().map(resolve_secret).transpose()?;
            let builder = hyper_rustls::HttpsConnectorBuilder::new();
            let builder = match &config.ca {
                Some(ca) => {
                    let roots =
                        agentgate_tls::load_roots(ca).map_err(|e| tls_err(e.to_string()))?;
                    let tls = agentgate_tls::rustls::ClientConfig::builder_with_provider(
                        agentgate_tls::crypto_provider(),
                    )
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_err(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                    builder.with_tls_config(tls)
                }
                None if uri.scheme_str() == Some("https") => builder
                    .with_provider_and_native_roots(agentgate_tls::crypto_provider())
                    .map_err(|e| tls_err(format!("system CA certificates: {e}")))?,
                None => {
                    // Plain http: TLS is never used, an empty trust store suffices.
                    let tls = agentgate_tls::rustls::ClientConfig::builder_with_provider(
                        agentgate_tls::crypto_provider(),
                    )
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_err(e.to_string()))?
                    .with_root_certificates(agentgate_tls::rustls::RootCertStore::empty())
                    .with_no_client_auth();
                    builder.with_tls_config(tls)
                }
            };
            let connector = builder.https_or_http().enable_http1().build();
            let client = Client::builder(TokioExecutor::new()).build(connector);
            let target = Arc::new(Target {
                config: config.clone(),
                uri,
                secret,
                client,
            });
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(worker(target, rx, metrics.clone()));
            queues.push(tx);
        }
        Ok(Notifier { queues, metrics })
    }

    /// Queues a notification for every webhook; never waits.
    pub fn notify(&self, kind: EventKind, request: &ApprovalRequest) {
        if self.queues.is_empty() {
            return;
        }
        let job = Arc::new(Job {
            kind,
            event_id: uuid::Uuid::new_v4().to_string(),
            time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            request: Arc::new(request.clone()),
        });
        for q in &self.queues {
            if q.try_send(job.clone()).is_err() {
                self.metrics.dropped.inc();
                tracing::error!(id = %request.id, "webhook queue full; notification dropped");
            }
        }
    }
}

async fn worker(target: Arc<Target>, mut rx: mpsc::Receiver<Arc<Job>>, metrics: WebhookMetrics) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(job) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let target = target.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            deliver(&target, &job, &metrics).await;
            drop(permit);
        });
    }
}

/// Sends one notification, retrying with exponential backoff.
async fn deliver(target: &Target, job: &Job, metrics: &WebhookMetrics) {
    let body = Bytes::from(
        match target.config.format {
            WebhookFormat::Cloudevents => {
                cloudevent(job.kind, &job.event_id, &job.time, &job.request)
            }
            WebhookFormat::Slack => slack_message(job.kind, &job.request),
        }
        .to_string(),
    );
    let signature = target.secret.as_deref().map(|s| signature(s, &body));
    let mut backoff = target.config.initial_backoff;
    for attempt in 1..=target.config.max_attempts {
        match attempt_once(target, job, &body, signature.as_deref()).await {
            Ok(()) => {
                metrics.delivered.inc();
                tracing::debug!(url = %target.config.url, id = %job.request.id, attempt, "webhook delivered");
                return;
            }
            Err(reason) => {
                metrics.failed_attempts.inc();
                tracing::warn!(url = %target.config.url, id = %job.request.id, attempt, %reason, "webhook attempt failed");
            }
        }
        if attempt < target.config.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(target.config.max_backoff);
        }
    }
    metrics.given_up.inc();
    tracing::error!(url = %target.config.url, id = %job.request.id, event = job.kind.word(),
        attempts = target.config.max_attempts, "webhook notification given up");
}

async fn attempt_once(
    target: &Target,
    job: &Job,
    body: &Bytes,
    signature: Option<&str>,
) -> Result<(), String> {
    let content_type = match target.config.format {
        WebhookFormat::Cloudevents => "application/cloudevents+json; charset=utf-8",
        WebhookFormat::Slack => "application/json",
    };
    let mut request = http::Request::post(target.uri.clone())
        .header(http::header::CONTENT_TYPE, content_type)
        .header(
            http::header::USER_AGENT,
            concat!("agentgate-approvals/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-agentgate-event", job.kind.cloudevents_type())
        .header("x-agentgate-delivery", &job.event_id);
    if let Some(sig) = signature {
        request = request.header("x-agentgate-signature", sig);
    }
    let request = request
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = target
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        // Read (a bounded amount of) the body so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {status}"))
        }
    };
    match tokio::time::timeout(target.config.timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(target.config.timeout)
        )),
    }
}

fn kind_name(r: &ApprovalRequest) -> &'static str {
    match RequestKind::try_from(r.kind).unwrap_or_default() {
        RequestKind::Access => "access",
        RequestKind::Operation => "operation",
        RequestKind::Unspecified => "unspecified",
    }
}

fn protocol_name(p: i32) -> &'static str {
    match Protocol::try_from(p).unwrap_or_default() {
        Protocol::Postgres => "postgres",
        Protocol::Ssh => "ssh",
        Protocol::Http => "http",
        Protocol::Kubernetes => "kubernetes",
        Protocol::ControlPlane => "control-plane",
        Protocol::Unspecified => "",
    }
}

fn principal_json(p: Option<&Principal>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({
            "subject": p.subject,
            "kind": agentgate_identity::kind_to_str(
                PrincipalKind::try_from(p.kind).unwrap_or_default()),
            "groups": p.groups,
        }),
    }
}

/// The command a reviewer runs to approve `r`.
pub fn approve_command(r: &ApprovalRequest) -> String {
    format!("agentgate approvals approve {}", r.id)
}

/// A request as JSON, for webhook payloads (the CloudEvents `data`).
pub fn request_json(r: &ApprovalRequest) -> Value {
    json!({
        "id": r.id,
        "kind": kind_name(r),
        "state": model::state_word(state(r)),
        "requester": principal_json(r.requester.as_ref()),
        "connection": r.connection,
        "role": r.role,
        "duration_seconds": r.duration.as_ref().map(|d| d.seconds),
        "operation": r.operation.as_ref().map(|op| json!({
            "protocol": protocol_name(op.protocol),
            "action": op.action,
            "text": op.text,
            "targets": op.targets,
            "risk_classes": op.risk_classes,
        })),
        "session_id": r.session_id,
        "reason": r.reason,
        "reviewer_groups": r.reviewer_groups,
        "approvals_required": r.approvals_required,
        "approvals": approvals(r),
        "created_at": r.created_at.as_ref().map(rfc3339),
        "expires_at": r.expires_at.as_ref().map(rfc3339),
        "decided_at": r.decided_at.as_ref().map(rfc3339),
        "decided_by": principal_json(r.decided_by.as_ref()),
        "decision_comment": r.decision_comment,
        "reviews": r.reviews.iter().map(|v| json!({
            "reviewer": principal_json(v.reviewer.as_ref()),
            "verdict": if v.verdict == Verdict::Deny as i32 { "deny" } else { "approve" },
            "comment": v.comment,
            "time": v.time.as_ref().map(rfc3339),
            "source_address": v.source_address,
        })).collect::<Vec<_>>(),
        "version": r.version,
        "approve_command": approve_command(r),
    })
}

/// A CloudEvents 1.0 structured-mode event about `r`.
pub fn cloudevent(kind: EventKind, event_id: &str, time: &str, r: &ApprovalRequest) -> Value {
    json!({
        "specversion": "1.0",
        "type": kind.cloudevents_type(),
        "source": "/agentgate/approvals",
        "id": event_id,
        "time": time,
        "subject": r.id,
        "datacontenttype": "application/json",
        "data": request_json(r),
    })
}

/// Escapes text for Slack mrkdwn.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// What the request asks for, in one line: "run an operation on prod-db" / "access …".
fn asks_for(r: &ApprovalRequest) -> String {
    match RequestKind::try_from(r.kind).unwrap_or_default() {
        RequestKind::Access => format!(
            "access to *{}* as role *{}* for {}",
            slack_escape(&r.connection),
            slack_escape(&r.role),
            r.duration
                .as_ref()
                .map(
                    |d| humantime::format_duration(Duration::from_secs(d.seconds.max(0) as u64))
                        .to_string()
                )
                .unwrap_or_default()
        ),
        _ => format!("to run an operation on *{}*", slack_escape(&r.connection)),
    }
}

/// A Slack incoming-webhook message about `r`.
pub fn slack_message(kind: EventKind, r: &ApprovalRequest) -> Value {
    let requester = r
        .requester
        .as_ref()
        .map(|p| p.subject.as_str())
        .unwrap_or("someone");
    let risk = r
        .operation
        .as_ref()
        .map(|op| op.risk_classes.join(", "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let statement = r.operation.as_ref().map(|op| op.text.as_str());
    match kind {
        EventKind::Created => {
            let mut text = format!(
                "Approval needed: {} asks {} (risk: {}). Approve with `{}`",
                slack_escape(requester),
                asks_for(r),
                slack_escape(&risk),
                approve_command(r)
            );
            if let Some(s) = statement {
                text.push_str(&format!(
                    "\nOperation: {}",
                    slack_escape(&clip(s, SLACK_TEXT_MAX / 2))
                ));
            }
            let mut blocks = vec![
                json!({"type": "header", "text": {"type": "plain_text", "text": "Approval needed"}}),
                json!({"type": "section", "text": {"type": "mrkdwn", "text": format!(
                "*{}* asks {}", slack_escape(requester), asks_for(r))},
                "fields": [
                    {"type": "mrkdwn", "text": format!("*Connection*\n{}", slack_escape(&r.connection))},
                    {"type": "mrkdwn", "text": format!("*Risk*\n{}", slack_escape(&risk))},
                    {"type": "mrkdwn", "text": format!("*Reason*\n{}", slack_escape(&clip(&r.reason, 500)))},
                    {"type": "mrkdwn", "text": format!("*Approvals needed*\n{} from {}",
                        r.approvals_required, slack_escape(&r.reviewer_groups.join(", ")))},
                    {"type": "mrkdwn", "text": format!("*Expires*\n{}",
                        r.expires_at.as_ref().map(rfc3339).unwrap_or_default())},
                    {"type": "mrkdwn", "text": format!("*Request*\n{}", r.id)},
                ]}),
            ];
            if let Some(s) = statement {
                blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
                    "text": format!("```{}```", slack_escape(&clip(s, SLACK_TEXT_MAX)))}}));
            }
            blocks.push(
                json!({"type": "section", "text": {"type": "mrkdwn", "text": format!(
                "Approve: `{}`\nDeny: `agentgate approvals deny {} --comment \"…\"`",
                approve_command(r), r.id)}}),
            );
            json!({"text": text, "blocks": blocks})
        }
        EventKind::Decided(s) => {
            let by = r
                .decided_by
                .as_ref()
                .map(|p| format!(" by {}", slack_escape(&p.subject)))
                .unwrap_or_default();
            let comment = if r.decision_comment.is_empty() {
                String::new()
            } else {
                format!(": {}", slack_escape(&clip(&r.decision_comment, 500)))
            };
            let text = format!(
                "Request {} from {} ({}) was {}{by}{comment}",
                r.id,
                slack_escape(requester),
                asks_for(r),
                model::state_name(s)
            );
            json!({"text": text, "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            ]})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_proto::common::v1::Operation;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_come_from_env_or_file() {
        assert!(matches!(
            resolve_secret("hunter2"),
            Err(WebhookError::SecretSyntax(_))
        ));
        assert!(matches!(
            resolve_secret("env:AGENTGATE_SURELY_UNSET_VARIABLE"),
            Err(WebhookError::SecretEnv(_))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(
            resolve_secret(&format!("file:{}", path.display())).expect("file"),
            b"s3cret"
        );
    }

    #[test]
    fn slack_message_tells_a_reviewer_everything() {
        let r = ApprovalRequest {
            id: "0190".into(),
            kind: RequestKind::Operation as i32,
            requester: Some(Principal {
                subject: "agent:bot".into(),
                ..Default::default()
            }),
            connection: "prod-db".into(),
            operation: Some(Operation {
                text: "DELETE FROM users WHERE id < 5".into(),
                risk_classes: vec!["sql.destructive".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = slack_message(EventKind::Created, &r).to_string();
        for needle in [
            "agent:bot",
            "prod-db",
            "sql.destructive",
            "DELETE FROM users WHERE id &lt; 5",
            "agentgate approvals approve 0190",
        ] {
            assert!(m.contains(needle), "{needle} in {m}");
        }
    }
}
