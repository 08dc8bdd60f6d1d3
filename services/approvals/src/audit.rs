//! Every state change of a request, and every review, as an audit event.
//!
//! One recorder session per service instance (protocol CONTROL_PLANE), numbered by this
//! module. Each event carries the principal who acted (the reviewer, the requester, the
//! service that created on someone's behalf; the approvals service itself for an expiry),
//! their source address as the gRPC peer, the request's connection and role, and an
//! `ApprovalRecord` with the request id, its state and the comment — so an auditor can query
//! the store by who approved, and each event stands on its own as evidence.

use std::collections::HashMap;
use std::time::Duration;

use agentgate_proto::approvals::v1::{ApprovalRequest, RequestKind};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{ApprovalRecord, AuditEvent};
use agentgate_proto::common::v1::{Principal, PrincipalKind, Protocol};
use agentgate_recorder::{Recorder, RecorderError};
use tokio::sync::Mutex;

use crate::model::{self, approvals, state};

/// The principal recorded for what the service does by itself (expiry).
pub fn service_principal() -> Principal {
    Principal {
        subject: "service:agentgate-approvals".into(),
        kind: PrincipalKind::Service as i32,
        ..Default::default()
    }
}

/// The audit trail of one service instance.
pub struct AuditLog {
    recorder: Recorder,
    session_id: String,
    /// The next sequence number; held across the spool append so order equals sequence.
    next: Mutex<u64>,
}

/// Who did it and from where.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub principal: Option<Principal>,
    pub source_address: String,
}

impl AuditLog {
    /// A new session (UUID v7) on `recorder`.
    pub fn new(recorder: Recorder) -> AuditLog {
        AuditLog {
            recorder,
            session_id: uuid::Uuid::now_v7().to_string(),
            next: Mutex::new(1),
        }
    }

    /// This instance's audit session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Waits until the audit store acknowledged everything recorded so far.
    pub async fn flush(&self, timeout: Duration) -> Result<(), RecorderError> {
        self.recorder.flush(timeout).await
    }

    /// Records `kind` about `r` once it is durable in the spool. A failure is logged: the
    /// change is already committed, and refusing the call now would misreport it.
    pub async fn record(&self, kind: &str, actor: &Actor, r: &ApprovalRequest, comment: &str) {
        let mut attributes = HashMap::new();
        let requester = r.requester.clone().unwrap_or_default();
        attributes.insert("requester".to_owned(), requester.subject.clone());
        attributes.insert(
            "request_kind".to_owned(),
            match RequestKind::try_from(r.kind).unwrap_or_default() {
                RequestKind::Access => "access",
                RequestKind::Operation => "operation",
                RequestKind::Unspecified => "unspecified",
            }
            .to_owned(),
        );
        attributes.insert(
            "approvals".to_owned(),
            format!("{}/{}", approvals(r), r.approvals_required),
        );
        attributes.insert("version".to_owned(), r.version.to_string());
        if kind == "approval.created" {
            attributes.insert("reviewer_groups".to_owned(), r.reviewer_groups.join(","));
            attributes.insert("reason".to_owned(), r.reason.clone());
            attributes.insert(
                "expires_at".to_owned(),
                r.expires_at
                    .as_ref()
                    .map(model::rfc3339)
                    .unwrap_or_default(),
            );
            if let Some(op) = &r.operation {
                attributes.insert("operation".to_owned(), op.text.clone());
                attributes.insert("risk_classes".to_owned(), op.risk_classes.join(","));
            }
            if let Some(d) = &r.duration {
                attributes.insert("duration_seconds".to_owned(), d.seconds.to_string());
            }
            if !r.session_id.is_empty() {
                attributes.insert("held_session_id".to_owned(), r.session_id.clone());
            }
        }
        if kind == "approval.review"
            && let Some(last) = r.reviews.last()
        {
            attributes.insert(
                "verdict".to_owned(),
                if last.verdict == agentgate_proto::approvals::v1::Verdict::Deny as i32 {
                    "deny"
                } else {
                    "approve"
                }
                .to_owned(),
            );
        }
        let mut next = self.next.lock().await;
        let event = AuditEvent {
            session_id: self.session_id.clone(),
            sequence: *next,
            time: Some(model::us_timestamp(model::now_us())),
            kind: kind.to_owned(),
            principal: actor.principal.clone(),
            source_address: truncate(&actor.source_address, 128),
            connection: r.connection.clone(),
            protocol: Protocol::ControlPlane as i32,
            role: r.role.clone(),
            detail: Some(Detail::Approval(ApprovalRecord {
                approval_id: r.id.clone(),
                state: model::state_word(state(r)).to_owned(),
                comment: comment.to_owned(),
            })),
            attributes,
        };
        match self.recorder.record_event(&event).await {
            Ok(()) => *next += 1,
            Err(e) => tracing::error!(
                error = %e, kind, id = %r.id,
                "could not record an approvals audit event; the change itself is committed"
            ),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
