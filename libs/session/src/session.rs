//! One agent session: what authz granted, the local decision per operation, the end signal,
//! and the ordered audit record.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use agentgate_masking::{MaskReport, Masker};
use agentgate_policy::LocalDecision;
use agentgate_proto::audit::v1::SessionEnded;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::authz::v1::{Connection, Grant, SessionPolicy, UpstreamIdentity};
use agentgate_proto::common::v1::{Decision, Operation, Principal, Protocol};

use crate::gateway::{CLOSE_TIMEOUT, EndSignal, GatewayInner};
use crate::message::EndReason;
use crate::record::{NewEvent, Writer};
use crate::to_timestamp;

/// How long closing waits for the session's queued events to reach the spool.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets a session's end reason unless one is already set (the first reason wins, so the
/// record says what actually ended it).
pub(crate) fn signal(end: &EndSignal, reason: EndReason) {
    end.send_if_modified(|current| {
        if current.is_none() {
            *current = Some(reason);
            true
        } else {
            false
        }
    });
}

/// Why recording an event failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The session was closed; nothing more is recorded for it.
    #[error("the session is closed; nothing more can be recorded for it")]
    Closed,
    /// The audit spool refused an event; the session is ending
    /// ([`EndReason::RecordingFailed`]).
    #[error("the audit spool failed: {0}")]
    Spool(String),
}

/// The identity the proxy uses upstream for this session's role. The agent never sees it.
///
/// Its `Debug` output shows the user and where the secret came from, never the secret.
#[derive(Clone)]
pub struct UpstreamCredential {
    user: String,
    secret_ref: String,
    secret: Vec<u8>,
}

impl UpstreamCredential {
    /// Takes authz's answer; when authz sent only a reference (`env:NAME`, `file:/path`),
    /// resolves it on this proxy. A reference that does not resolve is an error: the session
    /// would fail upstream anyway, and the operator must hear of it.
    pub(crate) fn from_proto(u: UpstreamIdentity) -> Result<UpstreamCredential, String> {
        let secret = if u.secret.is_empty() && !u.secret_ref.is_empty() {
            agentgate_authz::config::resolve_secret(&u.secret_ref)?
        } else {
            u.secret
        };
        Ok(UpstreamCredential {
            user: u.user,
            secret_ref: u.secret_ref,
            secret,
        })
    }

    /// The upstream user name (pg role, SSH user, …).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The secret (password, private key, bearer token); empty when the role has none
    /// (e.g. upstream trust by certificate). Do not log it.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Where the secret came from (`env:…`, `file:…`), for error messages; never the secret.
    pub fn secret_ref(&self) -> &str {
        &self.secret_ref
    }
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCredential")
            .field("user", &self.user)
            .field("secret_ref", &self.secret_ref)
            .field(
                "secret",
                &format_args!("<{} bytes redacted>", self.secret.len()),
            )
            .finish()
    }
}

/// One operation's record: what was asked, what was decided, what happened. Fill what the
/// protocol knows and leave the rest at its default.
#[derive(Debug, Clone)]
pub struct OperationEvent {
    /// The operation as classified: text, action, targets, risk classes, attributes. Shared,
    /// so a statement run many times (a prepared statement) is not copied per run.
    pub operation: Arc<Operation>,
    /// The decision that applied (after approval, if one was held).
    pub decision: Decision,
    /// Why, in one line (the policy's reason, or the reviewer's).
    pub reason: String,
    /// The risk class of the rule that decided, if any; recorded as attribute
    /// `decided_by`.
    pub rule: Option<String>,
    /// The approval request that held it, if one did.
    pub approval_id: String,
    /// Bind parameters or arguments, already masked by the caller.
    pub parameters: Vec<String>,
    /// When the operation started (the agent's request arrived).
    pub started_at: SystemTime,
    /// How long it took, including any wait for approval.
    pub duration: Duration,
    /// Rows returned or affected.
    pub rows: u64,
    /// Bytes of the response.
    pub bytes: u64,
    /// The upstream's outcome code: SQLSTATE, exit status, HTTP status.
    pub status: String,
    /// The error, if it failed (already masked if it can carry data).
    pub error: String,
    /// What masking changed in the response (rule names and counts, never values).
    pub masked: MaskReport,
    /// The event kind; default by protocol: `session.query` (Postgres), `session.command`
    /// (SSH), `session.request` (HTTP, Kubernetes).
    pub kind: Option<String>,
    /// Anything else worth keeping.
    pub attributes: HashMap<String, String>,
}

impl OperationEvent {
    /// An event for `operation` decided by `decision`, started now.
    pub fn new(operation: impl Into<Arc<Operation>>, decision: &LocalDecision) -> OperationEvent {
        OperationEvent {
            operation: operation.into(),
            decision: decision.decision,
            reason: decision.reason.clone(),
            rule: decision.rule.as_ref().map(|r| r.risk_class.clone()),
            approval_id: String::new(),
            parameters: Vec::new(),
            started_at: SystemTime::now(),
            duration: Duration::ZERO,
            rows: 0,
            bytes: 0,
            status: String::new(),
            error: String::new(),
            masked: MaskReport::new(),
            kind: None,
            attributes: HashMap::new(),
        }
    }
}

/// The event kind of an operation in a session of `protocol`.
fn operation_kind(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Postgres => "session.query",
        Protocol::Ssh => "session.command",
        Protocol::Http | Protocol::Kubernetes => "session.request",
        _ => "session.operation",
    }
}

/// One agent session, from a successful [`crate::Gateway::open`] to [`Session::close`].
///
/// Cheap to clone (an `Arc`), so a proxy's client-reading and upstream-reading tasks can
/// share it. If the last clone is dropped without `close`, the session is closed in the
/// background with the reason it ended for (or "error: dropped without close"), so a panic
/// in a proxy task still leaves `session.end` on record and authz told.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) gateway: Arc<GatewayInner>,
    pub(crate) id: String,
    pub(crate) principal: Principal,
    pub(crate) grant: Grant,
    pub(crate) expires_at: SystemTime,
    /// `expires_at` on the monotonic clock, for the local expiry timer.
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) connection: Connection,
    pub(crate) role: String,
    pub(crate) source_address: String,
    pub(crate) upstream: UpstreamCredential,
    pub(crate) policy: SessionPolicy,
    pub(crate) masker: Masker,
    pub(crate) end: EndSignal,
    events: Arc<Writer>,
    operations: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    closed: AtomicBool,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        gateway: Arc<GatewayInner>,
        id: String,
        principal: Principal,
        grant: Grant,
        expires_at: SystemTime,
        connection: Connection,
        role: String,
        source_address: String,
        upstream: UpstreamCredential,
        policy: SessionPolicy,
        masker: Masker,
        end: EndSignal,
        events: Arc<Writer>,
    ) -> Shared {
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Shared {
            gateway,
            id,
            principal,
            grant,
            expires_at,
            deadline: tokio::time::Instant::now() + left,
            connection,
            role,
            source_address,
            upstream,
            policy,
            masker,
            end,
            events,
            operations: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }
}

impl Session {
    pub(crate) fn new(shared: Shared) -> Session {
        Session {
            shared: Arc::new(shared),
        }
    }

    /// authz's session id; the audit store files the session's events under it.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Who the agent is, as authz verified it.
    pub fn principal(&self) -> &Principal {
        &self.shared.principal
    }

    /// The grant behind the session (standing or just-in-time).
    pub fn grant(&self) -> &Grant {
        &self.shared.grant
    }

    /// When the session ends by itself: the earlier of the grant's and the credential's
    /// expiry. [`Session::ended`] fires then even if authz is unreachable.
    pub fn expires_at(&self) -> SystemTime {
        self.shared.expires_at
    }

    /// The catalog entry: upstream address and protocol settings (database, TLS mode, …).
    pub fn connection(&self) -> &Connection {
        &self.shared.connection
    }

    /// The role the session was opened with.
    pub fn role(&self) -> &str {
        &self.shared.role
    }

    /// The agent's address as the proxy saw it.
    pub fn source_address(&self) -> &str {
        &self.shared.source_address
    }

    /// The upstream identity to connect with.
    pub fn upstream(&self) -> &UpstreamCredential {
        &self.shared.upstream
    }

    /// The policy this session enforces; fixed for its life (a policy change applies to the
    /// next session).
    pub fn policy(&self) -> &SessionPolicy {
        &self.shared.policy
    }

    /// The masking engine built from the policy's masking rules; pass every response
    /// through it.
    pub fn masker(&self) -> &Masker {
        &self.shared.masker
    }

    /// The decision for one classified operation, from the session's policy, without a
    /// network round trip (about half a microsecond).
    pub fn decide(&self, operation: &Operation) -> LocalDecision {
        agentgate_policy::decide(&self.shared.policy, operation)
    }

    /// Resolves with the reason the moment the session must end: authz announced expiry or
    /// revocation, the local timer at [`Session::expires_at`] fired (so expiry works while
    /// authz is unreachable), recording failed, the gateway ended all sessions, or another
    /// holder closed it.
    ///
    /// Each call gives a new, independent future; select on it next to the protocol's reads
    /// and, when it fires, tell the agent [`EndReason::message`] and [`Session::close`].
    pub fn ended(&self) -> impl Future<Output = EndReason> + Send + 'static {
        let end = self.shared.end.clone();
        let mut changes = end.subscribe();
        let deadline = self.shared.deadline;
        async move {
            tokio::select! {
                biased;
                reason = changes.wait_for(Option::is_some) => match reason {
                    Ok(reason) => reason.clone().unwrap_or(EndReason::Shutdown),
                    Err(_) => EndReason::Shutdown,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    signal(&end, EndReason::GrantExpired);
                    end.borrow().clone().unwrap_or(EndReason::GrantExpired)
                }
            }
        }
    }

    /// The end reason if the session has ended, without waiting.
    pub fn end_reason(&self) -> Option<EndReason> {
        if tokio::time::Instant::now() >= self.shared.deadline {
            signal(&self.shared.end, EndReason::GrantExpired);
        }
        self.shared.end.borrow().clone()
    }

    /// Records one operation, in order with every other event of the session.
    ///
    /// Returns as soon as the event is numbered and queued at the recorder's spool (whose
    /// writer makes it durable moments later, in one write with whatever else queued
    /// meanwhile); it waits only when the spool's queue is full — backpressure, never a
    /// dropped event. If the spool fails, the session ends with
    /// [`EndReason::RecordingFailed`].
    pub async fn record_operation(&self, event: OperationEvent) -> Result<(), RecordError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed);
        }
        let kind = event
            .kind
            .as_deref()
            .unwrap_or_else(|| operation_kind(self.shared.gateway.protocol));
        let mut extra: [(&str, &str); 2] = [("", ""); 2];
        let mut n = 0;
        if let Some(rule) = &event.rule {
            extra[n] = ("decided_by", rule);
            n += 1;
        }
        let version = &self.shared.policy.version;
        if !version.is_empty() && !event.attributes.contains_key("policy_version") {
            extra[n] = ("policy_version", version);
            n += 1;
        }
        self.shared
            .events
            .record_operation(kind, &event, &extra[..n])
            .await?;
        self.shared.operations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records any other event of the session (a terminal chunk, a protocol notice), in order
    /// with its operations; same queueing as [`Session::record_operation`].
    pub async fn record_event(
        &self,
        kind: &str,
        detail: Option<Detail>,
        attributes: HashMap<String, String>,
    ) -> Result<(), RecordError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed);
        }
        self.send_event(kind, detail, attributes).await
    }

    async fn send_event(
        &self,
        kind: &str,
        detail: Option<Detail>,
        attributes: HashMap<String, String>,
    ) -> Result<(), RecordError> {
        self.shared
            .events
            .record(NewEvent {
                time: to_timestamp(SystemTime::now()),
                kind: kind.to_owned(),
                detail,
                attributes,
            })
            .await
    }

    /// Waits until every event recorded so far is durable in the spool.
    pub async fn flush(&self) -> Result<(), RecordError> {
        self.shared.events.flush().await
    }

    /// Adds to the session's byte counters (agent → upstream, upstream → agent), reported in
    /// `session.end`.
    pub fn count_bytes(&self, from_client: u64, to_client: u64) {
        self.shared
            .bytes_in
            .fetch_add(from_client, Ordering::Relaxed);
        self.shared
            .bytes_out
            .fetch_add(to_client, Ordering::Relaxed);
    }

    /// Ends the session: records `session.end` with `reason` and the totals, waits until the
    /// session's events are durable in the spool, tells authz (best effort: authz ends
    /// sessions at expiry anyway) and forgets the session. Other holders see `reason` on
    /// [`Session::ended`]. A second call does nothing.
    ///
    /// The error says only that the record could not be completed; the session is closed
    /// regardless.
    #[tracing::instrument(skip_all, fields(session = %self.id(), reason = %reason))]
    pub async fn close(&self, reason: EndReason) -> Result<(), RecordError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        signal(&self.shared.end, reason.clone());
        let s = &self.shared;
        let ended = SessionEnded {
            reason: reason.to_string(),
            operations: s.operations.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
        };
        let recorded = async {
            self.send_event(
                "session.end",
                Some(Detail::SessionEnded(ended)),
                HashMap::new(),
            )
            .await?;
            self.flush().await
        };
        let recorded = match tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, recorded).await {
            Ok(r) => r,
            Err(_) => Err(RecordError::Spool(format!(
                "session.end not durable after {CLOSE_FLUSH_TIMEOUT:?}"
            ))),
        };
        close_with_authz(&s.gateway, &s.id, &reason).await;
        tracing::info!(session = %s.id, reason = %reason, operations = s.operations.load(Ordering::Relaxed), "session closed");
        recorded
    }

    /// Marks the session closed without recording its end (its start never made it to the
    /// record); authz is closed by the caller.
    pub(crate) fn abandon(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.gateway.registry.deregister(&self.shared.id);
    }
}

async fn close_with_authz(gateway: &GatewayInner, id: &str, reason: &EndReason) {
    let why = reason.to_string();
    let closing = gateway.authz.close_session(id, &why);
    match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(session = %id, error = %e, "authz CloseSession failed (it ends sessions at expiry anyway)");
        }
        Err(_) => tracing::debug!(session = %id, "authz CloseSession timed out"),
    }
    gateway.registry.deregister(id);
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.gateway.registry.deregister(&self.id);
            return;
        };
        let reason = self.end.borrow().clone().unwrap_or_else(|| {
            EndReason::Error("the proxy dropped the session without closing it".into())
        });
        tracing::warn!(session = %self.id, reason = %reason, "session dropped without close; closing it in the background");
        let ended = SessionEnded {
            reason: reason.to_string(),
            operations: self.operations.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        };
        let events = self.events.clone();
        let gateway = self.gateway.clone();
        let id = self.id.clone();
        runtime.spawn(async move {
            let _ = events
                .record(NewEvent {
                    time: to_timestamp(SystemTime::now()),
                    kind: "session.end".into(),
                    detail: Some(Detail::SessionEnded(ended)),
                    attributes: HashMap::new(),
                })
                .await;
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, events.flush()).await;
            close_with_authz(&gateway, &id, &reason).await;
        });
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shared;
        f.debug_struct("Session")
            .field("id", &s.id)
            .field("principal", &s.principal.subject)
            .field("connection", &s.connection.name)
            .field("role", &s.role)
            .field("source_address", &s.source_address)
            .field("expires_at", &crate::rfc3339(s.expires_at))
            .field("upstream", &s.upstream)
            .field("ended", &*s.end.borrow())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_secrets_resolve_from_references_and_stay_out_of_debug() {
        let sent = UpstreamCredential::from_proto(UpstreamIdentity {
            user: "u".into(),
            secret_ref: "env:AGENTGATE_SESSION_TEST_UNSET".into(),
            secret: b"from-authz".to_vec(),
        })
        .expect("authz sent the secret: no resolution");
        assert_eq!(sent.secret(), b"from-authz");

        let dir = std::env::temp_dir().join(format!("agentgate-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("pw");
        std::fs::write(&file, "hunter2\n").expect("write");
        let resolved = UpstreamCredential::from_proto(UpstreamIdentity {
            user: "u".into(),
            secret_ref: format!("file:{}", file.display()),
            secret: Vec::new(),
        })
        .expect("resolves");
        assert_eq!(resolved.secret(), b"hunter2");
        let shown = format!("{resolved:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("7 bytes redacted"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);

        let missing = UpstreamCredential::from_proto(UpstreamIdentity {
            user: "u".into(),
            secret_ref: "env:AGENTGATE_SESSION_TEST_UNSET".into(),
            secret: Vec::new(),
        });
        assert!(missing.is_err());
        let none = UpstreamCredential::from_proto(UpstreamIdentity {
            user: "u".into(),
            ..Default::default()
        })
        .expect("no secret is fine");
        assert!(none.secret().is_empty());
    }
}
