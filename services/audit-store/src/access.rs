//! Who may call what. Every call carries `authorization: Bearer <token>`, an agentgate token
//! for the audience [`AUDIENCE`] (or for any); the store turns it into a principal with the
//! `Authenticator` it was started with and then checks the principal against the call:
//!
//! | call | who |
//! | --- | --- |
//! | `Ingest` | a principal of kind SERVICE (the recorders of proxies and services) |
//! | `ListSessions`, `GetSessionEvents`, `ReplaySession`, `Verify`, `Checkpoint`, `Export` | a member of [`ADMIN_GROUP`] or [`AUDITOR_GROUP`] |
//! | `Prune` | a member of [`ADMIN_GROUP`] |
//!
//! No token, or one that does not verify: UNAUTHENTICATED. A verified principal that may not
//! make the call: PERMISSION_DENIED, naming what the call needs. Nothing is open without a
//! credential, on loopback included.

use agentgate_proto::common::v1::{Principal, PrincipalKind};
use tonic::Status;

/// The audience a caller's token must be for (a token without audience is for any).
pub const AUDIENCE: &str = agentgate_identity::AUDIT_STORE_AUDIENCE;

/// Members may read the log (sessions, events, replay, verify, checkpoint, export) and prune
/// it. The same name as authz's default `admin_group`, so the bootstrap admin token works.
pub const ADMIN_GROUP: &str = "admin";

/// Members may read the log — sessions, events, replay, verify, checkpoint, export — but not
/// prune it: the group to give auditors and reviewers of evidence.
pub const AUDITOR_GROUP: &str = "auditor";

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Ingest: a service principal.
    Ingest,
    /// Any read, and Checkpoint: admin or auditor.
    Read,
    /// Prune: admin.
    Prune,
}

/// Allows `principal` to make a call needing `need`, or says why not (PERMISSION_DENIED).
pub fn check(principal: &Principal, call: &str, need: Need) -> Result<(), Status> {
    let in_group = |g: &str| principal.groups.iter().any(|x| x == g);
    let allowed = match need {
        Need::Ingest => principal.kind == PrincipalKind::Service as i32,
        Need::Read => in_group(ADMIN_GROUP) || in_group(AUDITOR_GROUP),
        Need::Prune => in_group(ADMIN_GROUP),
    };
    if allowed {
        return Ok(());
    }
    let who = describe(principal);
    Err(Status::permission_denied(match need {
        Need::Ingest => format!(
            "{call} needs a service principal (kind SERVICE, as the recorders of proxies and services have); {who}"
        ),
        Need::Read => format!("{call} needs group \"{ADMIN_GROUP}\" or \"{AUDITOR_GROUP}\"; {who}"),
        Need::Prune => format!("{call} needs group \"{ADMIN_GROUP}\"; {who}"),
    }))
}

/// "agent:x is an agent in groups [a, b]", for refusals.
fn describe(p: &Principal) -> String {
    let kind = PrincipalKind::try_from(p.kind).unwrap_or_default();
    let groups = if p.groups.is_empty() {
        "no groups".to_owned()
    } else {
        format!("groups [{}]", p.groups.join(", "))
    };
    format!(
        "{} is {} in {groups}",
        p.subject,
        match kind {
            PrincipalKind::Agent => "an agent",
            PrincipalKind::Human => "a human",
            PrincipalKind::Service => "a service",
            PrincipalKind::Unspecified => "a principal of unspecified kind",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(kind: PrincipalKind, groups: &[&str]) -> Principal {
        Principal {
            subject: "x:y".into(),
            kind: kind as i32,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_call_needs_its_own_kind_or_group() {
        let service = principal(PrincipalKind::Service, &[]);
        let agent_admin = principal(PrincipalKind::Agent, &[ADMIN_GROUP]);
        let auditor = principal(PrincipalKind::Human, &[AUDITOR_GROUP]);
        let admin = principal(PrincipalKind::Human, &["devs", ADMIN_GROUP]);
        assert!(check(&service, "Ingest", Need::Ingest).is_ok());
        assert!(check(&agent_admin, "Ingest", Need::Ingest).is_err());
        assert!(check(&service, "Verify", Need::Read).is_err());
        assert!(check(&auditor, "Verify", Need::Read).is_ok());
        assert!(check(&admin, "Export", Need::Read).is_ok());
        assert!(check(&admin, "Prune", Need::Prune).is_ok());
        let refused = check(&auditor, "Prune", Need::Prune).expect_err("auditor cannot prune");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "Prune needs group \"admin\"; x:y is a human in groups [auditor]"
        );
        let refused = check(&agent_admin, "Ingest", Need::Ingest).expect_err("agent");
        assert!(refused.message().contains("kind SERVICE"), "{refused}");
        assert!(refused.message().contains("is an agent"), "{refused}");
    }
}
