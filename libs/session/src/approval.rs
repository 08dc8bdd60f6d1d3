//! Holding an operation for human approval: create the request in the approvals service on
//! the agent's behalf, tell the agent what it waits for, and resume the moment a reviewer
//! decides — or refuse when nobody does in time, when the session ends, or when approvals
//! cannot be reached (fail closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentgate_identity::{BearerInterceptor, TokenSource};

use agentgate_policy::LocalDecision;
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{
    ApprovalRequest, CancelRequest, CreateRequest, RequestKind, State, Verdict, WatchRequest,
};
use agentgate_proto::audit::v1::ApprovalRecord;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::common::v1::{Decision, Operation};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::gateway::GatewayError;
use crate::message::{EndReason, one_line};
use crate::rfc3339;
use crate::session::Session;

/// How long one Create or Cancel call may take before approvals counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The approvals request outlives the proxy's own timeout by this much, so that the proxy's
/// cancel (with its reason) decides a timed-out request, and the service's expiry only
/// cleans up after a proxy that died while holding.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);

/// The approvals service as a proxy calls it: as itself (a service principal), lazily
/// connected.
#[derive(Clone)]
pub(crate) struct ApprovalsApi {
    grpc: ApprovalsClient<InterceptedService<Channel, BearerInterceptor>>,
    url: String,
    retry: Duration,
}

impl ApprovalsApi {
    pub(crate) fn new(
        url: &str,
        tls: Option<ClientTlsConfig>,
        service_token: Arc<dyn TokenSource>,
        retry: Duration,
    ) -> Result<ApprovalsApi, GatewayError> {
        let invalid = |reason: String| GatewayError::Approvals {
            url: url.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(format!("TLS: {e}")))?;
        }
        // A token there now must be sendable (a mistake to fix at start); one missing now
        // (a file not yet written) fails each call until it appears, which refuses what
        // needed approval (fail closed).
        match service_token.token() {
            Ok(token) => {
                agentgate_identity::bearer_header(&token)
                    .map_err(|_| GatewayError::ServiceToken)?;
            }
            Err(e) => tracing::warn!(error = %e, "no service token for approvals yet"),
        }
        Ok(ApprovalsApi {
            grpc: ApprovalsClient::with_interceptor(
                endpoint.connect_lazy(),
                BearerInterceptor::from_source(service_token),
            ),
            url: url.to_owned(),
            retry,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        agentgate_telemetry::inject_context(tonic::Request::new(message))
    }

    async fn create(&self, create: CreateRequest) -> Result<ApprovalRequest, tonic::Status> {
        let mut grpc = self.grpc.clone();
        let call = grpc.create(self.request(create));
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        }
    }

    /// Cancels a pending request; failures are logged only (a request nobody cancels still
    /// expires shortly after).
    pub(crate) async fn cancel(&self, id: &str, reason: &str) {
        let mut grpc = self.grpc.clone();
        let call = grpc.cancel(self.request(CancelRequest {
            id: id.to_owned(),
            reason: reason.to_owned(),
        }));
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => tracing::debug!(approval = %id, reason, "approval request cancelled"),
            Ok(Err(s)) => {
                tracing::warn!(approval = %id, code = ?s.code(), error = s.message(), "cancelling the approval request failed")
            }
            Err(_) => tracing::warn!(approval = %id, "cancelling the approval request timed out"),
        }
    }

    /// Follows request `id` until it is decided. Reconnects while approvals is away, for at
    /// most `retry` of continuous absence; then gives up with the reason (fail closed).
    async fn decided(&self, id: &str) -> Result<ApprovalRequest, String> {
        let mut backoff = Duration::from_millis(100);
        let mut away_since: Option<tokio::time::Instant> = None;
        loop {
            let mut grpc = self.grpc.clone();
            let lost = match grpc
                .watch(self.request(WatchRequest {
                    id: id.to_owned(),
                    ..Default::default()
                }))
                .await
            {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    away_since = None;
                    backoff = Duration::from_millis(100);
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) if update.id == id => {
                                if state(&update) != State::Pending {
                                    return Ok(update);
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break "the watch stream ended".to_owned(),
                            Err(s) => break format!("{:?}: {}", s.code(), s.message()),
                        }
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(format!("approvals no longer knows request {id}"));
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(format!(
                        "approvals refused this proxy's watch ({})",
                        s.message()
                    ));
                }
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            };
            let since = *away_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= self.retry {
                return Err(format!(
                    "the approvals service at {} is unreachable ({lost})",
                    self.url
                ));
            }
            tracing::warn!(approval = %id, error = %lost, retry_in = ?backoff, "lost the approval watch; re-watching");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

fn state(r: &ApprovalRequest) -> State {
    State::try_from(r.state).unwrap_or(State::Unspecified)
}

/// What the agent is told while its operation waits, and what a reviewer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingApproval {
    /// The approval request's id.
    pub id: String,
    /// The exact command a reviewer runs to approve (`agentgate approvals approve ID`).
    pub approve_command: String,
    /// The exact command a reviewer runs to deny.
    pub deny_command: String,
    /// Who may approve; empty means the approvals service's default reviewers.
    pub reviewer_groups: Vec<String>,
    /// How many distinct approvals it needs.
    pub approvals_required: u32,
    /// When the proxy stops waiting and refuses the operation.
    pub deadline: SystemTime,
}

impl PendingApproval {
    /// One line for the agent (a pg NOTICE, a line on the SSH channel's stderr).
    pub fn message(&self) -> String {
        let who = if self.reviewer_groups.is_empty() {
            "a reviewer".to_owned()
        } else {
            format!("a member of {}", self.reviewer_groups.join(" or "))
        };
        let count = match self.approvals_required {
            0 | 1 => String::new(),
            n => format!(" ({n} approvals)"),
        };
        one_line(&format!(
            "agentgate: this operation needs approval by {who}{count}; waiting until {} for approval {}; a reviewer runs: {}",
            rfc3339(self.deadline),
            self.id,
            self.approve_command
        ))
    }
}

/// How a held operation ended. Only [`ApprovalOutcome::Approved`] lets it run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved; run it. `by` lists the approving reviewers.
    Approved {
        /// The approval request.
        approval_id: String,
        /// Subjects of the reviewers who approved.
        by: Vec<String>,
    },
    /// A reviewer denied it (or someone cancelled the request), or it could not be asked
    /// for (policy denies outright, a reason was required and missing, the request was
    /// refused as invalid).
    Denied {
        /// The approval request, if one was created.
        approval_id: Option<String>,
        /// Who decided, when a person did.
        by: Option<String>,
        /// Why, in one line.
        reason: String,
    },
    /// Nobody decided within the policy's approval timeout; the request was cancelled (or
    /// the approvals service expired it).
    TimedOut {
        /// The approval request.
        approval_id: String,
        /// How long it waited.
        after: Duration,
    },
    /// The approvals service could not be reached (or lost and not regained): refused, fail
    /// closed.
    Unavailable {
        /// The approval request, if it was created before approvals went away.
        approval_id: Option<String>,
        /// What went wrong.
        reason: String,
    },
    /// The session ended while the operation waited; the request was cancelled.
    SessionEnded {
        /// The approval request, if one was created.
        approval_id: Option<String>,
        /// Why the session ended.
        reason: EndReason,
    },
}

impl ApprovalOutcome {
    /// True only for [`ApprovalOutcome::Approved`].
    pub fn is_approved(&self) -> bool {
        matches!(self, ApprovalOutcome::Approved { .. })
    }

    /// The approval request behind the outcome, for the operation's record.
    pub fn approval_id(&self) -> Option<&str> {
        match self {
            ApprovalOutcome::Approved { approval_id, .. }
            | ApprovalOutcome::TimedOut { approval_id, .. } => Some(approval_id),
            ApprovalOutcome::Denied { approval_id, .. }
            | ApprovalOutcome::Unavailable { approval_id, .. }
            | ApprovalOutcome::SessionEnded { approval_id, .. } => approval_id.as_deref(),
        }
    }

    /// The decision to record for the operation: allow if approved, deny otherwise.
    pub fn decision(&self) -> Decision {
        if self.is_approved() {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }

    /// One line for the agent (and the operation's recorded reason).
    pub fn message(&self) -> String {
        let id = |id: &Option<String>| {
            id.as_deref()
                .map(|i| format!(" (approval {i})"))
                .unwrap_or_default()
        };
        one_line(&match self {
            ApprovalOutcome::Approved { approval_id, by } => format!(
                "approved by {} (approval {approval_id})",
                if by.is_empty() {
                    "a reviewer".to_owned()
                } else {
                    by.join(", ")
                }
            ),
            ApprovalOutcome::Denied {
                approval_id,
                by,
                reason,
            } => match by {
                Some(by) => format!(
                    "operation refused by agentgate: denied by {by}: {reason}{}",
                    id(approval_id)
                ),
                None => format!(
                    "operation refused by agentgate: {reason}{}",
                    id(approval_id)
                ),
            },
            ApprovalOutcome::TimedOut { approval_id, after } => format!(
                "operation refused by agentgate: no reviewer decided approval {approval_id} within {}",
                humantime::format_duration(Duration::from_secs(after.as_secs()))
            ),
            ApprovalOutcome::Unavailable {
                approval_id,
                reason,
            } => format!(
                "operation refused by agentgate: approval could not be obtained: {reason}{}; nothing that needs approval runs until the approvals service is back",
                id(approval_id)
            ),
            ApprovalOutcome::SessionEnded {
                approval_id,
                reason,
            } => format!(
                "operation refused by agentgate: the session ended while it waited for approval ({reason}){}",
                id(approval_id)
            ),
        })
    }
}

/// Cancels the request if the hold is abandoned midway (the agent disconnected and the proxy
/// dropped the future): a reviewer should not approve something nobody waits for.
struct CancelOnDrop {
    api: ApprovalsApi,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let api = self.api.clone();
            let id = std::mem::take(&mut self.id);
            runtime.spawn(async move {
                api.cancel(&id, "the agent stopped waiting (disconnected)")
                    .await;
            });
        }
    }
}

/// Why the wait stopped before a decision.
enum Stop {
    Ended(EndReason),
    Timeout,
}

impl Session {
    /// Holds `operation` until a human decides, as the session's policy requires for
    /// `decision` (normally [`Decision::NeedsApproval`] from [`Session::decide`]).
    ///
    /// Creates an operation approval request in the approvals service on the agent's behalf:
    /// requester = the session's principal, reviewer groups and approvals required from the
    /// deciding rule, pending for the policy's `approval_timeout`, tied to this session. Then
    /// calls `on_pending` once with the request id and the reviewer's command (tell the agent
    /// [`PendingApproval::message`]), and waits — for the decision, the timeout (the request
    /// is then cancelled), or the end of the session (cancelled too). Approvals unreachable,
    /// at creation or for longer than `GatewayConfig::approvals_retry` while waiting, refuses
    /// the operation ([`ApprovalOutcome::Unavailable`]): fail closed.
    ///
    /// `reason` is the agent's stated reason, if its protocol carries one; it is required
    /// when the rule says so. A `decision` of deny is returned as denied without asking
    /// anyone. Dropping the returned future while it waits cancels the request.
    ///
    /// The hold is recorded in the session (`approval.requested`, `approval.decided`); the
    /// caller records the operation itself with [`ApprovalOutcome::approval_id`].
    #[tracing::instrument(skip_all, fields(session = %self.id()))]
    pub async fn hold_for_approval(
        &self,
        operation: &Operation,
        decision: &LocalDecision,
        reason: &str,
        on_pending: impl FnOnce(&PendingApproval),
    ) -> ApprovalOutcome {
        if decision.decision == Decision::Deny {
            return ApprovalOutcome::Denied {
                approval_id: None,
                by: None,
                reason: decision.reason.clone(),
            };
        }
        if let Some(reason) = self.end_reason() {
            return ApprovalOutcome::SessionEnded {
                approval_id: None,
                reason,
            };
        }
        let (groups, required, reason_required) = match &decision.rule {
            Some(rule) => (
                rule.approver_groups.clone(),
                rule.approvals_required,
                rule.reason_required,
            ),
            None => (Vec::new(), 0, false),
        };
        if reason_required && reason.trim().is_empty() {
            return ApprovalOutcome::Denied {
                approval_id: None,
                by: None,
                reason: format!(
                    "{}; this operation needs a stated reason before it can be approved",
                    decision.reason
                ),
            };
        }
        let s = &self.shared;
        let api = &s.gateway.approvals;
        let timeout = approval_timeout(&s.policy);
        // A request that outlives its session would ask reviewers about nothing.
        let left = s
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let pending_ttl = (timeout + EXPIRY_GRACE).min(left.max(Duration::from_secs(1)));
        let stated = if reason.trim().is_empty() {
            format!("held by {}: {}", s.gateway.proxy, decision.reason)
        } else {
            reason.to_owned()
        };
        let create = CreateRequest {
            kind: RequestKind::Operation as i32,
            connection: s.connection.name.clone(),
            role: s.role.clone(),
            operation: Some(operation.clone()),
            session_id: s.id.clone(),
            reason: stated.clone(),
            reviewer_groups: groups.clone(),
            approvals_required: required,
            pending_ttl: Some(prost_types::Duration {
                seconds: pending_ttl.as_secs() as i64,
                nanos: pending_ttl.subsec_nanos() as i32,
            }),
            requester: Some(s.principal.clone()),
            ..Default::default()
        };
        let started = tokio::time::Instant::now();
        // Not raced with the session's end: a request created by a call given up midway
        // would stay pending with nobody to cancel it. The call is bounded; an end meanwhile
        // is seen first thing below, and the request cancelled.
        let created = api.create(create).await;
        let ended = self.ended();
        tokio::pin!(ended);
        let request = match created {
            Ok(r) => r,
            Err(status) => {
                use tonic::Code as C;
                let message = one_line(status.message());
                return match status.code() {
                    C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => {
                        ApprovalOutcome::Denied {
                            approval_id: None,
                            by: None,
                            reason: format!("the approval request was refused: {message}"),
                        }
                    }
                    code => ApprovalOutcome::Unavailable {
                        approval_id: None,
                        reason: format!(
                            "the approvals service at {} did not take the request ({code:?}: {message})",
                            api.url
                        ),
                    },
                };
            }
        };
        let id = request.id.clone();
        let mut guard = CancelOnDrop {
            api: api.clone(),
            id: id.clone(),
            armed: true,
        };
        let deadline = started + timeout;
        let pending = PendingApproval {
            approve_command: format!("agentgate approvals approve {id}"),
            deny_command: format!("agentgate approvals deny {id}"),
            id: id.clone(),
            reviewer_groups: request.reviewer_groups.clone(),
            approvals_required: request.approvals_required,
            deadline: SystemTime::now()
                + deadline.saturating_duration_since(tokio::time::Instant::now()),
        };
        self.record_approval("approval.requested", &id, "PENDING", &stated, {
            let mut a = HashMap::new();
            a.insert(
                "reviewer_groups".to_owned(),
                request.reviewer_groups.join(","),
            );
            a.insert(
                "approvals_required".to_owned(),
                request.approvals_required.to_string(),
            );
            a.insert("deadline".to_owned(), rfc3339(pending.deadline));
            a
        })
        .await;
        tracing::info!(session = %s.id, approval = %id, text = %one_line(&operation.text), "operation held for approval");
        on_pending(&pending);

        let waited = tokio::select! {
            biased;
            reason = &mut ended => Err(Stop::Ended(reason)),
            _ = tokio::time::sleep_until(deadline) => Err(Stop::Timeout),
            decided = api.decided(&id) => Ok(decided),
        };
        let outcome = match waited {
            Err(Stop::Ended(reason)) => {
                api.cancel(&id, &format!("the session ended: {reason}"))
                    .await;
                ApprovalOutcome::SessionEnded {
                    approval_id: Some(id.clone()),
                    reason,
                }
            }
            Err(Stop::Timeout) => {
                api.cancel(
                    &id,
                    &format!(
                        "not decided within {}; the operation was refused",
                        humantime::format_duration(timeout)
                    ),
                )
                .await;
                ApprovalOutcome::TimedOut {
                    approval_id: id.clone(),
                    after: started.elapsed(),
                }
            }
            Ok(Err(unreachable)) => {
                api.cancel(&id, "the proxy lost the approvals service")
                    .await;
                ApprovalOutcome::Unavailable {
                    approval_id: Some(id.clone()),
                    reason: unreachable,
                }
            }
            Ok(Ok(decided)) => outcome_of(&decided, started.elapsed()),
        };
        guard.armed = false;
        let (state, comment) = match &outcome {
            ApprovalOutcome::Approved { .. } => ("APPROVED", outcome.message()),
            ApprovalOutcome::Denied { .. } => ("DENIED", outcome.message()),
            ApprovalOutcome::TimedOut { .. } => ("TIMED_OUT", outcome.message()),
            ApprovalOutcome::Unavailable { .. } => ("UNAVAILABLE", outcome.message()),
            ApprovalOutcome::SessionEnded { .. } => ("SESSION_ENDED", outcome.message()),
        };
        self.record_approval("approval.decided", &id, state, &comment, HashMap::new())
            .await;
        tracing::info!(session = %s.id, approval = %id, outcome = state, "held operation resumed");
        outcome
    }

    async fn record_approval(
        &self,
        kind: &str,
        id: &str,
        state: &str,
        comment: &str,
        attributes: HashMap<String, String>,
    ) {
        let detail = Detail::Approval(ApprovalRecord {
            approval_id: id.to_owned(),
            state: state.to_owned(),
            comment: comment.to_owned(),
        });
        if let Err(e) = self.record_event(kind, Some(detail), attributes).await {
            tracing::warn!(session = %self.id(), approval = %id, error = %e, "could not record the approval step");
        }
    }
}

/// The policy's approval timeout, else the library default.
fn approval_timeout(policy: &agentgate_proto::authz::v1::SessionPolicy) -> Duration {
    policy
        .approval_timeout
        .as_ref()
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok()?;
            Some(Duration::new(secs, nanos))
        })
        .filter(|d| !d.is_zero())
        .unwrap_or(agentgate_policy::DEFAULT_APPROVAL_TIMEOUT)
}

fn outcome_of(r: &ApprovalRequest, waited: Duration) -> ApprovalOutcome {
    let by = r.decided_by.as_ref().map(|p| p.subject.clone());
    let comment = if r.decision_comment.trim().is_empty() {
        "no comment".to_owned()
    } else {
        one_line(&r.decision_comment)
    };
    match state(r) {
        State::Approved => ApprovalOutcome::Approved {
            approval_id: r.id.clone(),
            by: r
                .reviews
                .iter()
                .filter(|v| v.verdict == Verdict::Approve as i32)
                .filter_map(|v| v.reviewer.as_ref().map(|p| p.subject.clone()))
                .collect(),
        },
        State::Denied => ApprovalOutcome::Denied {
            approval_id: Some(r.id.clone()),
            by,
            reason: comment,
        },
        State::Cancelled => ApprovalOutcome::Denied {
            approval_id: Some(r.id.clone()),
            reason: format!(
                "the request was cancelled by {}: {comment}",
                by.as_deref().unwrap_or("someone")
            ),
            by,
        },
        State::Expired => ApprovalOutcome::TimedOut {
            approval_id: r.id.clone(),
            after: waited,
        },
        // A state this proxy does not know is not an approval.
        State::Pending | State::Unspecified => ApprovalOutcome::Denied {
            approval_id: Some(r.id.clone()),
            by: None,
            reason: format!("the request is in an unknown state ({})", r.state),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_proto::common::v1::Principal;

    #[test]
    fn outcomes_map_states_and_read_as_one_line() {
        let base = ApprovalRequest {
            id: "a1".into(),
            decided_by: Some(Principal {
                subject: "human:alice".into(),
                ..Default::default()
            }),
            decision_comment: "not on\nprod".into(),
            ..Default::default()
        };
        let denied = outcome_of(
            &ApprovalRequest {
                state: State::Denied as i32,
                ..base.clone()
            },
            Duration::ZERO,
        );
        assert_eq!(
            denied.message(),
            "operation refused by agentgate: denied by human:alice: not on prod (approval a1)"
        );
        assert_eq!(denied.decision(), Decision::Deny);
        let expired = outcome_of(
            &ApprovalRequest {
                state: State::Expired as i32,
                ..base.clone()
            },
            Duration::from_secs(3),
        );
        assert!(matches!(expired, ApprovalOutcome::TimedOut { .. }));
        let cancelled = outcome_of(
            &ApprovalRequest {
                state: State::Cancelled as i32,
                ..base.clone()
            },
            Duration::ZERO,
        );
        assert!(matches!(cancelled, ApprovalOutcome::Denied { .. }));
        assert_eq!(cancelled.approval_id(), Some("a1"));
        let pending = PendingApproval {
            id: "a1".into(),
            approve_command: "agentgate approvals approve a1".into(),
            deny_command: "agentgate approvals deny a1".into(),
            reviewer_groups: vec!["dba".into(), "sre".into()],
            approvals_required: 2,
            deadline: SystemTime::UNIX_EPOCH,
        };
        let m = pending.message();
        assert!(m.contains("a member of dba or sre (2 approvals)"), "{m}");
        assert!(m.ends_with("agentgate approvals approve a1"), "{m}");
    }

    #[test]
    fn approval_timeout_defaults_when_unset_or_zero() {
        use agentgate_proto::authz::v1::SessionPolicy;
        assert_eq!(
            approval_timeout(&SessionPolicy::default()),
            agentgate_policy::DEFAULT_APPROVAL_TIMEOUT
        );
        let p = SessionPolicy {
            approval_timeout: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(approval_timeout(&p), Duration::from_secs(2));
    }
}
