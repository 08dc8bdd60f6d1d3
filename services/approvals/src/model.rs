//! The rules of an approval request, as pure functions over the protobuf message.
//!
//! Everything that decides — who may create what, who may review, when a request is decided,
//! that a decision is final — lives here, apart from storage and transport, so the rules read
//! in one place and are unit-tested without a database. The store calls these functions while
//! it holds the request's row lock, which is what makes them hold across instances.

use agentgate_proto::approvals::v1::{
    ApprovalRequest, CreateRequest, RequestKind, Review, State, Verdict,
};
use agentgate_proto::common::v1::{Operation, Principal, PrincipalKind};

use crate::limits::*;

/// Why a call is refused. Each variant is one gRPC status code; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
}

impl From<RuleError> for tonic::Status {
    fn from(e: RuleError) -> Self {
        match e {
            RuleError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            RuleError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            RuleError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            RuleError::AlreadyExists(m) => tonic::Status::already_exists(m),
        }
    }
}

fn invalid(m: impl Into<String>) -> RuleError {
    RuleError::InvalidArgument(m.into())
}

/// The defaults and bounds a request is created under (from [`crate::ApprovalsConfig`]).
#[derive(Debug, Clone)]
pub struct Policy {
    pub default_pending_ttl_us: i64,
    pub max_pending_ttl_us: i64,
    pub default_reviewer_groups: Vec<String>,
    pub default_approvals_required: u32,
    pub require_reason: bool,
    pub viewer_groups: Vec<String>,
}

impl Policy {
    /// The policy of a configuration.
    pub fn from_config(c: &crate::ApprovalsConfig) -> Policy {
        Policy {
            default_pending_ttl_us: duration_us(c.default_pending_ttl),
            max_pending_ttl_us: duration_us(c.max_pending_ttl),
            default_reviewer_groups: c.default_reviewer_groups.clone(),
            default_approvals_required: c.default_approvals_required,
            require_reason: c.require_reason,
            viewer_groups: c.viewer_groups.clone(),
        }
    }
}

fn duration_us(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Whether a principal is a service (authz, a proxy): only those act for others.
pub fn is_service(p: &Principal) -> bool {
    p.kind == PrincipalKind::Service as i32
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), RuleError> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes, more than {max}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(invalid(format!("{field} contains a NUL character")));
    }
    Ok(())
}

fn check_list(
    field: &str,
    items: &[String],
    max_items: usize,
    max: usize,
) -> Result<(), RuleError> {
    if items.len() > max_items {
        return Err(invalid(format!(
            "{field} has {} entries, more than {max_items}",
            items.len()
        )));
    }
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() {
            return Err(invalid(format!("{field}[{i}] is empty")));
        }
        check_len(&format!("{field}[{i}]"), item, max)?;
    }
    Ok(())
}

/// Checks a principal a service passed as the requester.
fn check_principal(field: &str, p: &Principal) -> Result<(), RuleError> {
    if p.subject.trim().is_empty() {
        return Err(invalid(format!("{field}.subject is empty")));
    }
    check_len(&format!("{field}.subject"), &p.subject, MAX_NAME)?;
    if PrincipalKind::try_from(p.kind).is_err() {
        return Err(invalid(format!("{field}.kind {} is unknown", p.kind)));
    }
    check_list(
        &format!("{field}.groups"),
        &p.groups,
        MAX_PRINCIPAL_GROUPS,
        MAX_GROUP,
    )?;
    check_len(&format!("{field}.issuer"), &p.issuer, MAX_NAME)?;
    check_len(&format!("{field}.token_id"), &p.token_id, MAX_NAME)
}

fn check_operation(op: &Operation) -> Result<(), RuleError> {
    if op.text.trim().is_empty() {
        return Err(invalid(
            "operation.text is empty: an operation request must carry the exact statement or \
             command",
        ));
    }
    check_len("operation.text", &op.text, MAX_OPERATION_TEXT)?;
    check_len("operation.action", &op.action, MAX_ACTION)?;
    check_list("operation.targets", &op.targets, MAX_TARGETS, MAX_TARGET)?;
    check_list(
        "operation.risk_classes",
        &op.risk_classes,
        MAX_RISK_CLASSES,
        MAX_RISK_CLASS,
    )?;
    if op.attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid(format!(
            "operation.attributes has {} entries, more than {MAX_ATTRIBUTES}",
            op.attributes.len()
        )));
    }
    for (k, v) in &op.attributes {
        check_len("operation.attributes key", k, MAX_ATTRIBUTE_KEY)?;
        check_len(
            &format!("operation.attributes[{k}]"),
            v,
            MAX_ATTRIBUTE_VALUE,
        )?;
    }
    Ok(())
}

/// Checks a reason (create, cancel) against the policy.
pub fn check_reason(field: &str, reason: &str, policy: &Policy) -> Result<(), RuleError> {
    check_len(field, reason, MAX_TEXT)?;
    if policy.require_reason && reason.trim().is_empty() {
        return Err(invalid(format!(
            "{field} is required: say why (policy requires a reason)"
        )));
    }
    Ok(())
}

/// Builds a new pending request from a `Create` call, or says why not.
///
/// The requester is the caller. Only a service principal may create on someone's behalf,
/// name reviewer groups or set how many approvals are needed; for anyone else those fields
/// must be empty and the policy's defaults apply.
pub fn new_request(
    caller: &Principal,
    create: CreateRequest,
    policy: &Policy,
    id: String,
    now_us: i64,
) -> Result<ApprovalRequest, RuleError> {
    let service = is_service(caller);
    let kind = RequestKind::try_from(create.kind).unwrap_or(RequestKind::Unspecified);
    if kind == RequestKind::Unspecified {
        return Err(invalid(
            "kind must be REQUEST_KIND_ACCESS or REQUEST_KIND_OPERATION",
        ));
    }
    if create.connection.trim().is_empty() {
        return Err(invalid("connection is required"));
    }
    check_len("connection", &create.connection, MAX_NAME)?;
    check_len("role", &create.role, MAX_ROLE)?;
    check_len("session_id", &create.session_id, MAX_NAME)?;
    check_reason("reason", &create.reason, policy)?;
    match kind {
        RequestKind::Access => {
            if create.role.trim().is_empty() {
                return Err(invalid("role is required for an access request"));
            }
            let d = create
                .duration
                .as_ref()
                .ok_or_else(|| invalid("duration is required for an access request"))?;
            if d.seconds <= 0 || d.seconds > MAX_ACCESS_DURATION_SECS || d.nanos < 0 {
                return Err(invalid(format!(
                    "duration must be between 1 s and {MAX_ACCESS_DURATION_SECS} s"
                )));
            }
        }
        RequestKind::Operation => {
            let op = create
                .operation
                .as_ref()
                .ok_or_else(|| invalid("operation is required for an operation request"))?;
            check_operation(op)?;
        }
        RequestKind::Unspecified => {}
    }

    let not_yours = |field: &str| {
        RuleError::PermissionDenied(format!(
            "only service principals may set {field}; {} is a {} principal (leave it empty: \
             the configured defaults apply)",
            caller.subject,
            agentgate_identity::kind_to_str(
                PrincipalKind::try_from(caller.kind).unwrap_or_default()
            )
        ))
    };
    let requester = match create.requester {
        Some(r) if !service => {
            if r != Principal::default() {
                return Err(not_yours("requester"));
            }
            caller.clone()
        }
        Some(r) => {
            check_principal("requester", &r)?;
            r
        }
        None => caller.clone(),
    };
    let reviewer_groups = if create.reviewer_groups.is_empty() {
        policy.default_reviewer_groups.clone()
    } else if !service {
        return Err(not_yours("reviewer_groups"));
    } else {
        check_list(
            "reviewer_groups",
            &create.reviewer_groups,
            MAX_GROUPS,
            MAX_GROUP,
        )?;
        let mut g = create.reviewer_groups;
        g.sort();
        g.dedup();
        g
    };
    let approvals_required = match create.approvals_required {
        0 => policy.default_approvals_required,
        _ if !service => return Err(not_yours("approvals_required")),
        n if n > MAX_APPROVALS_REQUIRED => {
            return Err(invalid(format!(
                "approvals_required {n} is more than {MAX_APPROVALS_REQUIRED}"
            )));
        }
        n => n,
    };
    let ttl_us = match create.pending_ttl {
        None => policy.default_pending_ttl_us,
        Some(d) if d.seconds == 0 && d.nanos == 0 => policy.default_pending_ttl_us,
        Some(d) => {
            let us = d
                .seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(d.nanos) / 1000);
            if us <= 0 || us > policy.max_pending_ttl_us {
                return Err(invalid(format!(
                    "pending_ttl must be positive and at most {}",
                    humantime::format_duration(std::time::Duration::from_micros(
                        policy.max_pending_ttl_us.max(0) as u64
                    ))
                )));
            }
            us
        }
    };

    Ok(ApprovalRequest {
        id,
        kind: kind as i32,
        requester: Some(requester),
        connection: create.connection,
        role: create.role,
        duration: if kind == RequestKind::Access {
            create.duration
        } else {
            None
        },
        operation: if kind == RequestKind::Operation {
            create.operation
        } else {
            None
        },
        session_id: create.session_id,
        reason: create.reason,
        reviewer_groups,
        approvals_required,
        state: State::Pending as i32,
        created_at: Some(us_timestamp(now_us)),
        expires_at: Some(us_timestamp(now_us.saturating_add(ttl_us))),
        decided_at: None,
        reviews: Vec::new(),
        version: 1,
        decided_by: None,
        decision_comment: String::new(),
    })
}

/// The state of a request as the enum.
pub fn state(r: &ApprovalRequest) -> State {
    State::try_from(r.state).unwrap_or(State::Unspecified)
}

/// Upper-case state name for messages: "PENDING", "APPROVED", …
pub fn state_name(s: State) -> &'static str {
    match s {
        State::Unspecified => "UNSPECIFIED",
        State::Pending => "PENDING",
        State::Approved => "APPROVED",
        State::Denied => "DENIED",
        State::Expired => "EXPIRED",
        State::Cancelled => "CANCELLED",
    }
}

/// Lower-case state name for event kinds and payloads: "approved", …
pub fn state_word(s: State) -> &'static str {
    match s {
        State::Unspecified => "unspecified",
        State::Pending => "pending",
        State::Approved => "approved",
        State::Denied => "denied",
        State::Expired => "expired",
        State::Cancelled => "cancelled",
    }
}

/// When a pending request expires, in microseconds.
pub fn expires_at_us(r: &ApprovalRequest) -> i64 {
    r.expires_at.as_ref().map(timestamp_us).unwrap_or(i64::MAX)
}

/// Whether a request is pending but past its expiry, i.e. must become EXPIRED now.
pub fn is_due(r: &ApprovalRequest, now_us: i64) -> bool {
    state(r) == State::Pending && now_us >= expires_at_us(r)
}

/// Approvals a request has so far.
pub fn approvals(r: &ApprovalRequest) -> u32 {
    r.reviews
        .iter()
        .filter(|v| v.verdict == Verdict::Approve as i32)
        .count() as u32
}

fn requester_subject(r: &ApprovalRequest) -> &str {
    r.requester
        .as_ref()
        .map(|p| p.subject.as_str())
        .unwrap_or("")
}

/// Whether `caller` may read `r`: its requester, a service, a possible reviewer, or a viewer.
pub fn may_see(r: &ApprovalRequest, caller: &Principal, policy: &Policy) -> bool {
    is_service(caller)
        || requester_subject(r) == caller.subject
        || caller
            .groups
            .iter()
            .any(|g| r.reviewer_groups.contains(g) || policy.viewer_groups.contains(g))
}

fn not_pending(r: &ApprovalRequest) -> RuleError {
    let s = state(r);
    if s == State::Expired {
        return RuleError::FailedPrecondition(format!(
            "request {} expired at {} without a decision; it can no longer be approved, denied \
             or cancelled",
            r.id,
            r.expires_at.as_ref().map(rfc3339).unwrap_or_default()
        ));
    }
    let when = r
        .decided_at
        .as_ref()
        .map(|t| format!(" at {}", rfc3339(t)))
        .unwrap_or_default();
    RuleError::FailedPrecondition(format!(
        "request {} is already {}{when}; a decision is final",
        r.id,
        state_name(s)
    ))
}

/// What a transition did, for the audit log and notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An approval was counted; more are needed.
    Reviewed,
    /// The request left the pending state into this one.
    Decided(State),
}

fn decide(r: &mut ApprovalRequest, s: State, by: Option<Principal>, comment: String, now_us: i64) {
    r.state = s as i32;
    r.decided_at = Some(us_timestamp(now_us));
    r.decided_by = by;
    r.decision_comment = comment;
}

/// Marks a due request expired. Call only when [`is_due`].
pub fn expire(r: &mut ApprovalRequest, now_us: i64) -> Outcome {
    let note = format!(
        "expired: not decided by {}",
        r.expires_at.as_ref().map(rfc3339).unwrap_or_default()
    );
    decide(r, State::Expired, None, note, now_us);
    r.version += 1;
    Outcome::Decided(State::Expired)
}

/// Applies a review by `reviewer` to `r` at `now_us`.
///
/// Refused: a reviewer who is the requester, not a person (agents and services never
/// approve: the point is human approval), or in none of the reviewer groups; a request that
/// is not pending (a decision is final); a second review by the same reviewer (one reviewer
/// counts once). A single deny denies; enough approvals approve. A request past its expiry is
/// refused here: the caller expires it first (see [`is_due`]).
pub fn review(
    r: &mut ApprovalRequest,
    reviewer: &Principal,
    verdict: Verdict,
    comment: String,
    source_address: String,
    now_us: i64,
) -> Result<Outcome, RuleError> {
    if reviewer.subject == requester_subject(r) {
        return Err(RuleError::PermissionDenied(format!(
            "{} cannot review their own request {}",
            reviewer.subject, r.id
        )));
    }
    if reviewer.kind != PrincipalKind::Human as i32 {
        return Err(RuleError::PermissionDenied(format!(
            "{} is {} principal; approvals are given by people (human principals) only",
            reviewer.subject,
            match PrincipalKind::try_from(reviewer.kind).unwrap_or_default() {
                PrincipalKind::Agent => "an agent",
                PrincipalKind::Service => "a service",
                _ => "an unknown kind of",
            }
        )));
    }
    if !reviewer
        .groups
        .iter()
        .any(|g| r.reviewer_groups.contains(g))
    {
        return Err(RuleError::PermissionDenied(format!(
            "{} may not review request {}: reviewers must be in one of the groups [{}]",
            reviewer.subject,
            r.id,
            r.reviewer_groups.join(", ")
        )));
    }
    if state(r) != State::Pending {
        return Err(not_pending(r));
    }
    if is_due(r, now_us) {
        return Err(RuleError::FailedPrecondition(format!(
            "request {} expired at {}; it can no longer be approved",
            r.id,
            r.expires_at.as_ref().map(rfc3339).unwrap_or_default()
        )));
    }
    if let Some(prior) = r
        .reviews
        .iter()
        .find(|v| v.reviewer.as_ref().map(|p| p.subject.as_str()) == Some(&reviewer.subject))
    {
        let word = if prior.verdict == Verdict::Approve as i32 {
            "approved"
        } else {
            "denied"
        };
        return Err(RuleError::AlreadyExists(format!(
            "{} already {word} request {}; one reviewer counts once ({} of {} approvals)",
            reviewer.subject,
            r.id,
            approvals(r),
            r.approvals_required
        )));
    }
    r.reviews.push(Review {
        reviewer: Some(reviewer.clone()),
        verdict: verdict as i32,
        comment: comment.clone(),
        time: Some(us_timestamp(now_us)),
        source_address,
    });
    r.version += 1;
    let outcome = match verdict {
        Verdict::Deny => {
            decide(r, State::Denied, Some(reviewer.clone()), comment, now_us);
            Outcome::Decided(State::Denied)
        }
        _ if approvals(r) >= r.approvals_required.max(1) => {
            decide(r, State::Approved, Some(reviewer.clone()), comment, now_us);
            Outcome::Decided(State::Approved)
        }
        _ => Outcome::Reviewed,
    };
    Ok(outcome)
}

/// Cancels a pending request: by its requester, or a service acting for it.
pub fn cancel(
    r: &mut ApprovalRequest,
    caller: &Principal,
    reason: String,
    now_us: i64,
) -> Result<Outcome, RuleError> {
    if !is_service(caller) && caller.subject != requester_subject(r) {
        return Err(RuleError::PermissionDenied(format!(
            "only the requester ({}) may cancel request {}",
            requester_subject(r),
            r.id
        )));
    }
    if state(r) != State::Pending {
        return Err(not_pending(r));
    }
    decide(r, State::Cancelled, Some(caller.clone()), reason, now_us);
    r.version += 1;
    Ok(Outcome::Decided(State::Cancelled))
}

/// Microseconds since the Unix epoch of a protobuf timestamp.
pub fn timestamp_us(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn us_timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// RFC 3339 (UTC, seconds) of a protobuf timestamp.
pub fn rfc3339(t: &prost_types::Timestamp) -> String {
    let Ok(secs) = u64::try_from(t.seconds) else {
        return "-".into();
    };
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_config(&crate::ApprovalsConfig::default())
    }

    fn principal(subject: &str, kind: PrincipalKind, groups: &[&str]) -> Principal {
        Principal {
            subject: subject.into(),
            kind: kind as i32,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }
    }

    fn op_request(required: u32, groups: &[&str]) -> CreateRequest {
        CreateRequest {
            kind: RequestKind::Operation as i32,
            connection: "prod-db".into(),
            operation: Some(Operation {
                text: "DROP TABLE users".into(),
                risk_classes: vec!["sql.ddl".into()],
                ..Default::default()
            }),
            reason: "cleanup".into(),
            reviewer_groups: groups.iter().map(|g| g.to_string()).collect(),
            approvals_required: required,
            ..Default::default()
        }
    }

    fn created(required: u32) -> ApprovalRequest {
        let svc = principal("service:authz", PrincipalKind::Service, &[]);
        let mut c = op_request(required, &["dba"]);
        c.requester = Some(principal("agent:bot", PrincipalKind::Agent, &[]));
        new_request(&svc, c, &policy(), "r1".into(), 1_000_000).expect("valid")
    }

    #[test]
    fn agents_get_the_defaults_and_cannot_choose_reviewers() {
        let agent = principal("agent:bot", PrincipalKind::Agent, &["dba"]);
        let r = new_request(&agent, op_request(0, &[]), &policy(), "r".into(), 0).expect("ok");
        assert_eq!(r.reviewer_groups, vec!["approvers".to_string()]);
        assert_eq!(r.approvals_required, 1);
        assert_eq!(
            r.requester.as_ref().map(|p| p.subject.as_str()),
            Some("agent:bot")
        );
        for c in [
            op_request(0, &["friends"]),
            op_request(2, &[]),
            CreateRequest {
                requester: Some(principal("human:alice", PrincipalKind::Human, &[])),
                ..op_request(0, &[])
            },
        ] {
            assert!(matches!(
                new_request(&agent, c, &policy(), "r".into(), 0),
                Err(RuleError::PermissionDenied(_))
            ));
        }
    }

    #[test]
    fn bad_input_is_named() {
        let agent = principal("agent:bot", PrincipalKind::Agent, &[]);
        let mut c = op_request(0, &[]);
        c.reason = "  ".into();
        let e = new_request(&agent, c, &policy(), "r".into(), 0).expect_err("no reason");
        assert!(e.to_string().contains("reason is required"), "{e}");
        let mut c = op_request(0, &[]);
        c.connection = "x".repeat(MAX_NAME + 1);
        assert!(matches!(
            new_request(&agent, c, &policy(), "r".into(), 0),
            Err(RuleError::InvalidArgument(_))
        ));
        let c = CreateRequest {
            kind: RequestKind::Access as i32,
            connection: "prod-db".into(),
            role: "admin".into(),
            reason: "x".into(),
            ..Default::default()
        };
        let e = new_request(&agent, c, &policy(), "r".into(), 0).expect_err("no duration");
        assert!(e.to_string().contains("duration"), "{e}");
    }

    #[test]
    fn one_reviewer_counts_once_and_a_decision_is_final() {
        let mut r = created(2);
        let alice = principal("human:alice", PrincipalKind::Human, &["dba"]);
        let bob = principal("human:bob", PrincipalKind::Human, &["dba"]);
        let now = 2_000_000;
        assert_eq!(
            review(
                &mut r,
                &alice,
                Verdict::Approve,
                "ok".into(),
                String::new(),
                now
            ),
            Ok(Outcome::Reviewed)
        );
        let before = r.clone();
        assert!(matches!(
            review(
                &mut r,
                &alice,
                Verdict::Approve,
                "again".into(),
                String::new(),
                now
            ),
            Err(RuleError::AlreadyExists(_))
        ));
        assert_eq!(r, before);
        assert_eq!(
            review(
                &mut r,
                &bob,
                Verdict::Approve,
                "ok".into(),
                String::new(),
                now
            ),
            Ok(Outcome::Decided(State::Approved))
        );
        assert_eq!(r.version, 3);
        let carol = principal("human:carol", PrincipalKind::Human, &["dba"]);
        let before = r.clone();
        assert!(matches!(
            review(
                &mut r,
                &carol,
                Verdict::Deny,
                "no".into(),
                String::new(),
                now
            ),
            Err(RuleError::FailedPrecondition(_))
        ));
        assert_eq!(r, before);
    }

    #[test]
    fn a_single_deny_denies_and_requesters_cannot_review() {
        let mut r = created(3);
        let bot = principal("agent:bot", PrincipalKind::Agent, &["dba"]);
        assert!(matches!(
            review(
                &mut r,
                &bot,
                Verdict::Approve,
                String::new(),
                String::new(),
                2
            ),
            Err(RuleError::PermissionDenied(_))
        ));
        let other_bot = principal("agent:other", PrincipalKind::Agent, &["dba"]);
        let e = review(
            &mut r,
            &other_bot,
            Verdict::Approve,
            String::new(),
            String::new(),
            2,
        )
        .expect_err("agents never approve");
        assert!(e.to_string().contains("by people"), "{e}");
        let outsider = principal("human:eve", PrincipalKind::Human, &["devs"]);
        assert!(matches!(
            review(
                &mut r,
                &outsider,
                Verdict::Approve,
                String::new(),
                String::new(),
                2
            ),
            Err(RuleError::PermissionDenied(_))
        ));
        let alice = principal("human:alice", PrincipalKind::Human, &["dba"]);
        assert_eq!(
            review(&mut r, &alice, Verdict::Deny, "no".into(), String::new(), 2),
            Ok(Outcome::Decided(State::Denied))
        );
        assert_eq!(r.decision_comment, "no");
    }

    #[test]
    fn expired_requests_cannot_be_approved() {
        let mut r = created(1);
        let late = expires_at_us(&r);
        assert!(is_due(&r, late));
        let alice = principal("human:alice", PrincipalKind::Human, &["dba"]);
        assert!(matches!(
            review(
                &mut r,
                &alice,
                Verdict::Approve,
                String::new(),
                String::new(),
                late
            ),
            Err(RuleError::FailedPrecondition(_))
        ));
        assert_eq!(expire(&mut r, late), Outcome::Decided(State::Expired));
        assert!(!is_due(&r, late));
    }

    #[test]
    fn only_the_requester_or_a_service_cancels() {
        let mut r = created(1);
        let other = principal("agent:other", PrincipalKind::Agent, &[]);
        assert!(matches!(
            cancel(&mut r, &other, "x".into(), 2),
            Err(RuleError::PermissionDenied(_))
        ));
        let bot = principal("agent:bot", PrincipalKind::Agent, &[]);
        assert_eq!(
            cancel(&mut r, &bot, "not needed".into(), 2),
            Ok(Outcome::Decided(State::Cancelled))
        );
        assert!(matches!(
            cancel(&mut r, &bot, "again".into(), 3),
            Err(RuleError::FailedPrecondition(_))
        ));
    }
}
