//! The Cedar schema every policy file is validated against.
//!
//! Validation is what turns a typo into an error with a line number instead of a rule that
//! silently never matches: an unknown entity type (`Agentgate::Grup`), an unknown action
//! (`Agentgate::Action::"exec"`), an attribute that does not exist (`principal.knd`) or one a
//! given action does not have (`context.risk_class` in a `connect` policy) all fail the load.

/// The entity types and actions agentgate evaluates, in Cedar's schema syntax.
///
/// It is public so that tools (an editor plugin, `cedar validate` in CI) can check a policy
/// file against exactly what the gateway enforces.
pub const SCHEMA: &str = r#"
namespace Agentgate {
  // A group a principal belongs to: one per entry of the token's `groups` claim.
  entity Group;

  // A verified identity. The entity id is the token subject ("agent:deploy-bot").
  entity Principal in [Group] {
    // "agent" | "human" | "service" | "unspecified"
    kind: String,
    // Who vouched for the identity: "agentgate" or an external OIDC issuer URL.
    issuer: String,
  };

  // An entry of the connection catalog. The entity id is the connection name ("prod-db").
  entity Connection;

  // Standing access: may the principal open a session on the connection with this role
  // without an access request?
  action connect appliesTo {
    principal: [Principal],
    resource: [Connection],
    context: { role: String },
  };

  // Just-in-time access: may the principal ask for this role? Annotations on the permit say
  // for how long at most and who approves.
  action request_access appliesTo {
    principal: [Principal],
    resource: [Connection],
    context: { role: String },
  };

  // One operation of a session, asked once per risk class the proxy assigned to it
  // ("none" for an operation with no class). `approved` is false for the first question
  // ("may it run as is?") and true for the second ("may it run once a human approved it?").
  action execute appliesTo {
    principal: [Principal],
    resource: [Connection],
    context: { role: String, risk_class: String, approved: Bool },
  };

  // Reading data in the clear. A forbid with a @mask annotation that matches a session adds
  // that masking rule to the session's policy.
  action read_unmasked appliesTo {
    principal: [Principal],
    resource: [Connection],
    context: { role: String },
  };
}
"#;

/// The namespace of every agentgate entity type and action.
pub const NAMESPACE: &str = "Agentgate";

/// The actions of [`SCHEMA`], in a fixed order used to partition the policy set.
pub const ACTIONS: [&str; 4] = ["connect", "request_access", "execute", "read_unmasked"];

/// Index into [`ACTIONS`] of `connect`.
pub(crate) const CONNECT: usize = 0;
/// Index into [`ACTIONS`] of `request_access`.
pub(crate) const REQUEST_ACCESS: usize = 1;
/// Index into [`ACTIONS`] of `execute`.
pub(crate) const EXECUTE: usize = 2;
/// Index into [`ACTIONS`] of `read_unmasked`.
pub(crate) const READ_UNMASKED: usize = 3;
