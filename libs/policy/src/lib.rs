//! Authorization policy as data, written in [Cedar](https://www.cedarpolicy.com).
//!
//! authz compiles the deployment's policy file into a [`PolicyEngine`] and asks it four
//! things: who has standing access to which connection and role
//! ([`PolicyEngine::standing_access`]); who may request which role, for how long and approved
//! by whom ([`PolicyEngine::access_request_rule`]); what each risk class of an operation
//! gets — allow, deny or needs approval ([`PolicyEngine::operation_rule`]); and what to mask
//! ([`PolicyEngine::masking_rules`]). [`PolicyEngine::session_policy`] packs the last two into
//! the [`SessionPolicy`] a proxy holds for a session, so that it decides each operation with
//! [`decide`] and no network round trip; [`PolicyEngine::authorize`] gives the same answer
//! centrally. [`PolicyStore`] reloads the file without a restart and keeps the old policy
//! when the new one is broken.
//!
//! The modeling (entities, actions, annotations) is described in `docs/policy.md`, with a
//! complete example in `deploy/policy.example.cedar`. In short:
//!
//! ```cedar
//! // Standing access: deployers may read prod-db.
//! permit (principal in Agentgate::Group::"deployers",
//!         action == Agentgate::Action::"connect",
//!         resource == Agentgate::Connection::"prod-db")
//! when { context.role == "read" };
//!
//! // Allowed operations: everything a session's role may do ...
//! permit (principal, action == Agentgate::Action::"execute", resource);
//!
//! // ... except DDL, which waits for a DBA.
//! @approvers("dba")
//! forbid (principal, action == Agentgate::Action::"execute", resource)
//! when { context.risk_class == "sql.ddl" }
//! unless { context.approved };
//! ```

use std::time::Duration;

pub use agentgate_proto::authz::v1::{MaskingRule, RiskRule, SessionPolicy};
use agentgate_proto::common::v1::{Decision, Operation};

mod engine;
mod error;
mod lint;
mod meta;
mod scan;
mod schema;
mod store;

pub use engine::PolicyEngine;
pub use error::PolicyError;
pub use schema::{ACTIONS, NAMESPACE, SCHEMA};
pub use store::PolicyStore;

/// The risk classes the proxies' classifiers emit, one catalog for all protocols.
///
/// A policy can only name these (a typo is a load error), every [`SessionPolicy`] carries a
/// rule for each, and an operation carrying a class outside this list is denied: a proxy
/// newer than its policy library fails closed. An operation may carry several classes (an
/// unbounded delete is `sql.write` and `sql.write.unbounded`); the most restrictive decides.
///
/// | class | what the proxy saw |
/// | --- | --- |
/// | `sql.read` | a statement that only reads (SELECT, SHOW, EXPLAIN without ANALYZE) |
/// | `sql.write` | INSERT, UPDATE, DELETE, MERGE |
/// | `sql.write.unbounded` | UPDATE or DELETE without WHERE, TRUNCATE |
/// | `sql.ddl` | CREATE, ALTER, DROP of schema objects |
/// | `sql.dcl` | GRANT, REVOKE, CREATE/ALTER ROLE |
/// | `sql.admin` | server administration: ALTER SYSTEM, VACUUM, pg_terminate_backend, server SET |
/// | `sql.opaque_code` | code the classifier cannot see into: DO blocks, function bodies, COPY ... PROGRAM |
/// | `sql.copy` | bulk data movement with COPY to or from the client |
/// | `ssh.exec` | a single command (exec request) |
/// | `ssh.shell` | an interactive shell |
/// | `ssh.destructive` | a command that destroys data or the system (rm -rf, mkfs, dd to a device, shutdown) |
/// | `ssh.port_forward` | TCP port forwarding, either direction |
/// | `ssh.agent_forward` | SSH agent forwarding |
/// | `ssh.sftp` | the sftp subsystem |
/// | `http.read` | GET, HEAD, OPTIONS |
/// | `http.write` | POST, PUT, PATCH, DELETE |
/// | `http.websocket` | a websocket upgrade |
/// | `k8s.read` | get, list, watch |
/// | `k8s.write` | create, update, patch |
/// | `k8s.delete` | delete, deletecollection |
/// | `k8s.rbac` | anything on rbac.authorization.k8s.io, impersonation, token requests |
/// | `k8s.exec` | exec and attach |
/// | `k8s.port_forward` | port-forward and proxy subresources |
/// | `k8s.secrets` | reading or changing Secrets |
pub const RISK_CLASSES: &[&str] = &[
    "sql.read",
    "sql.write",
    "sql.write.unbounded",
    "sql.ddl",
    "sql.dcl",
    "sql.admin",
    "sql.opaque_code",
    "sql.copy",
    "ssh.exec",
    "ssh.shell",
    "ssh.destructive",
    "ssh.port_forward",
    "ssh.agent_forward",
    "ssh.sftp",
    "http.read",
    "http.write",
    "http.websocket",
    "k8s.read",
    "k8s.write",
    "k8s.delete",
    "k8s.rbac",
    "k8s.exec",
    "k8s.port_forward",
    "k8s.secrets",
];

/// The risk class an operation with no class is evaluated as (`context.risk_class ==
/// "none"` in a policy). [`SessionPolicy::default_decision`] is its decision, and its rule is
/// in [`SessionPolicy::risk_rules`] too so that "needs approval" keeps its approvers.
pub const NO_RISK_CLASS: &str = "none";

/// How long a held operation waits for approval when no policy behind the session's approval
/// rules says (`@approval_timeout`). Long enough for a human to notice a notification, short
/// enough that an agent does not hang on a forgotten request.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The longest grant an access request gets when its policy has no `@max_duration`: an hour,
/// the usual just-in-time window.
pub const DEFAULT_MAX_ACCESS_DURATION: Duration = Duration::from_secs(60 * 60);

/// Whether `class` is in [`RISK_CLASSES`] or is [`NO_RISK_CLASS`].
pub fn is_known_risk_class(class: &str) -> bool {
    class == NO_RISK_CLASS || RISK_CLASSES.contains(&class)
}

/// The terms on which a principal may request a role on a connection: the approvals service
/// creates the request with these, and authz caps the granted duration with `max_duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequestRule {
    /// The longest grant the request can get (`@max_duration`, else
    /// [`DEFAULT_MAX_ACCESS_DURATION`]); a longer ask is cut to this.
    pub max_duration: Duration,
    /// Groups whose members may approve (`@approvers`).
    pub approver_groups: Vec<String>,
    /// How many distinct approvals are needed (`@approvals`, else 1).
    pub approvals_required: u32,
    /// Whether the requester must give a reason (`@reason_required`, else false).
    pub reason_required: bool,
    /// The id of the policy these terms come from, for the audit record.
    pub policy: String,
}

/// A decision for one operation, with the rule that made it and a reason fit to show the
/// agent (and to record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDecision {
    /// Allow, deny or needs approval; never unspecified.
    pub decision: Decision,
    /// The risk rule that decided: the most restrictive one among the operation's classes.
    /// `None` only when a session policy without a [`NO_RISK_CLASS`] rule decided an
    /// operation with no class by its `default_decision`.
    pub rule: Option<RiskRule>,
    /// One line saying why.
    pub reason: String,
}

/// The proxy's local decision for one operation from the session's policy: no network round
/// trip, a few comparisons per risk class.
///
/// The most restrictive rule among the operation's risk classes decides (deny over needs
/// approval over allow); among several "needs approval" rules, the one needing the most
/// approvals; otherwise the first in the operation's order. A class the policy has no rule for
/// is denied. An operation with no class gets the [`NO_RISK_CLASS`] rule, or the policy's
/// `default_decision` if it has none. An unspecified decision anywhere counts as deny.
///
/// Only the operation's risk classes are read, never its text, action or targets: a proxy may
/// decide each combination of classes once per session (pg-proxy does), so keep it so.
pub fn decide(policy: &SessionPolicy, op: &Operation) -> LocalDecision {
    let find = |class: &str| {
        policy
            .risk_rules
            .iter()
            .find(|rule| rule.risk_class == class)
            .cloned()
            .unwrap_or_else(|| engine::deny_rule(class))
    };
    if op.risk_classes.is_empty() {
        match policy
            .risk_rules
            .iter()
            .find(|rule| rule.risk_class == NO_RISK_CLASS)
        {
            Some(rule) => combine(std::iter::once(rule.clone())),
            None => {
                let decision = normalize(policy.default_decision);
                LocalDecision {
                    decision,
                    rule: None,
                    reason: format!(
                        "{}: operation has no risk class (session default)",
                        decision_word(decision)
                    ),
                }
            }
        }
    } else {
        combine(op.risk_classes.iter().map(|class| find(class)))
    }
}

/// Picks the deciding rule among an operation's rules; shared by [`decide`] and
/// [`PolicyEngine::authorize`] so that the two cannot disagree on how rules combine.
pub(crate) fn combine(rules: impl Iterator<Item = RiskRule>) -> LocalDecision {
    let mut best: Option<RiskRule> = None;
    for rule in rules {
        let better = match &best {
            None => true,
            Some(current) => {
                let (new, old) = (severity(rule.decision), severity(current.decision));
                new > old
                    || (new == old
                        && normalize(rule.decision) == Decision::NeedsApproval
                        && rule.approvals_required > current.approvals_required)
            }
        };
        if better {
            let final_answer = severity(rule.decision) == 2;
            best = Some(rule);
            if final_answer {
                // Nothing after a deny can replace it (ties keep the first), so stop: callers
                // pass lazy iterators and the remaining classes are never evaluated.
                break;
            }
        }
    }
    match best {
        Some(rule) => {
            let decision = normalize(rule.decision);
            LocalDecision {
                decision,
                reason: reason(decision, &rule),
                rule: Some(rule),
            }
        }
        None => LocalDecision {
            decision: Decision::Deny,
            rule: None,
            reason: "denied: nothing to decide on".into(),
        },
    }
}

fn normalize(decision: i32) -> Decision {
    match Decision::try_from(decision) {
        Ok(Decision::Allow) => Decision::Allow,
        Ok(Decision::NeedsApproval) => Decision::NeedsApproval,
        _ => Decision::Deny,
    }
}

fn severity(decision: i32) -> u8 {
    match normalize(decision) {
        Decision::Allow => 0,
        Decision::NeedsApproval => 1,
        _ => 2,
    }
}

fn decision_word(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allowed",
        Decision::NeedsApproval => "needs approval",
        _ => "denied",
    }
}

fn reason(decision: Decision, rule: &RiskRule) -> String {
    let class = &rule.risk_class;
    let what = if class == NO_RISK_CLASS {
        "an operation with no risk class".to_owned()
    } else {
        format!("risk class {class}")
    };
    match decision {
        Decision::Allow => format!("allowed: policy allows {what} for this session"),
        Decision::NeedsApproval => {
            let who = if rule.approver_groups.is_empty() {
                "a reviewer".to_owned()
            } else {
                format!("a member of {}", rule.approver_groups.join(" or "))
            };
            let count = match rule.approvals_required {
                0 | 1 => String::new(),
                n => format!(" ({n} approvals)"),
            };
            let why = if rule.reason_required {
                "; a reason is required"
            } else {
                ""
            };
            format!("needs approval: {what} must be approved by {who}{count}{why}")
        }
        _ if !is_known_risk_class(class) => {
            format!("denied: unknown risk class {class:?} (not in this gateway's catalog)")
        }
        _ => format!("denied: policy does not allow {what} for this session"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(class: &str, decision: Decision, approvals: u32) -> RiskRule {
        RiskRule {
            risk_class: class.into(),
            decision: decision as i32,
            approver_groups: vec![],
            approvals_required: approvals,
            reason_required: false,
        }
    }

    #[test]
    fn combine_prefers_deny_then_most_approvals_then_first() {
        let d = combine(
            [
                rule("a", Decision::Allow, 0),
                rule("b", Decision::NeedsApproval, 1),
                rule("c", Decision::NeedsApproval, 2),
                rule("d", Decision::NeedsApproval, 2),
            ]
            .into_iter(),
        );
        assert_eq!(d.decision, Decision::NeedsApproval);
        assert_eq!(d.rule.map(|r| r.risk_class), Some("c".to_owned()));
        let d = combine(
            [
                rule("a", Decision::NeedsApproval, 3),
                rule("b", Decision::Unspecified, 0),
                rule("c", Decision::Deny, 0),
            ]
            .into_iter(),
        );
        assert_eq!(d.decision, Decision::Deny);
        assert_eq!(d.rule.map(|r| r.risk_class), Some("b".to_owned()));
    }

    /// pg-proxy decides each combination of risk classes once per session: two operations
    /// with the same classes must get the same decision, whatever else differs.
    #[test]
    fn decide_reads_only_the_risk_classes() {
        let policy = SessionPolicy {
            risk_rules: vec![
                rule("sql.read", Decision::Allow, 0),
                rule("sql.write", Decision::NeedsApproval, 1),
            ],
            ..Default::default()
        };
        let classes = vec!["sql.read".to_owned(), "sql.write".to_owned()];
        let one = Operation {
            action: "select;update".into(),
            text: "SELECT 1; UPDATE accounts SET n = 1 WHERE id = 1".into(),
            targets: vec!["accounts".into()],
            risk_classes: classes.clone(),
            ..Default::default()
        };
        let other = Operation {
            action: "insert".into(),
            text: "INSERT INTO audit VALUES (1)".into(),
            targets: vec!["audit".into(), "payroll".into()],
            risk_classes: classes,
            attributes: [("statements".to_owned(), "2".to_owned())].into(),
            ..Default::default()
        };
        let (a, b) = (decide(&policy, &one), decide(&policy, &other));
        assert_eq!(a.decision, Decision::NeedsApproval);
        assert_eq!(a.decision, b.decision);
        assert_eq!(a.reason, b.reason);
        assert_eq!(a.rule, b.rule);
    }

    #[test]
    fn decide_with_an_empty_policy_denies() {
        let op = Operation {
            risk_classes: vec!["sql.read".into()],
            ..Default::default()
        };
        assert_eq!(
            decide(&SessionPolicy::default(), &op).decision,
            Decision::Deny
        );
        assert_eq!(
            decide(&SessionPolicy::default(), &Operation::default()).decision,
            Decision::Deny
        );
    }
}
