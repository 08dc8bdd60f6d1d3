//! The compiled policy and the questions authz asks it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use agentgate_proto::authz::v1::{MaskingRule, RiskRule, SessionPolicy};
use agentgate_proto::common::v1::{Decision, Operation, Principal, PrincipalKind};
use cedar_policy::{
    ActionConstraint, Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};
use sha2::{Digest, Sha256};

use crate::error::{PolicyError, diagnostic_message, diagnostic_offset, line_column};
use crate::meta::{self, PolicyMeta};
use crate::schema::{ACTIONS, CONNECT, EXECUTE, NAMESPACE, READ_UNMASKED, REQUEST_ACCESS, SCHEMA};
use crate::{
    AccessRequestRule, DEFAULT_APPROVAL_TIMEOUT, DEFAULT_MAX_ACCESS_DURATION, LocalDecision,
    NO_RISK_CLASS, RISK_CLASSES, combine, is_known_risk_class, lint, scan,
};

/// An immutable, compiled snapshot of one policy file.
///
/// Compiling (parsing, validating against [`crate::SCHEMA`], reading annotations) happens
/// once, in [`PolicyEngine::parse`]; every question after that only evaluates. A snapshot
/// never changes: a new policy file is a new engine, swapped in by [`crate::PolicyStore`], so
/// a session always knows exactly which policy ([`PolicyEngine::version`]) decided for it.
///
/// Everything is denied unless a policy permits it, and a `forbid` always wins over a
/// `permit` (Cedar's semantics). A policy that fails to evaluate for a request (Cedar skips
/// such policies) makes that question's answer "deny": a gateway fails closed.
pub struct PolicyEngine {
    version: String,
    source_name: String,
    /// The policies that can apply to each of [`ACTIONS`], so a question evaluates only those.
    sets: [PolicySet; ACTIONS.len()],
    meta: HashMap<PolicyId, PolicyMeta>,
    policy_count: usize,
    /// Whether some permit that can apply to `execute` may depend on `context.approved`; if
    /// none does, an operation no permit allows is denied without the second question.
    execute_permit_depends_on_approved: bool,
    authorizer: Authorizer,
    names: Names,
    /// Session policies already computed by this (immutable) engine; see
    /// [`PolicyEngine::session_policy`].
    sessions: Mutex<HashMap<SessionKey, SessionPolicy>>,
}

/// Everything a session policy depends on: the principal's identity attributes, the
/// connection and the role (not the token id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    subject: String,
    kind: i32,
    issuer: String,
    groups: Vec<String>,
    connection: String,
    role: String,
}

/// How many session policies an engine keeps before it starts over. A few thousand distinct
/// (principal, connection, role) triples cover a large deployment; each entry is about 2 KiB.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Parsed entity type names and action ids, built once per engine.
struct Names {
    principal: EntityTypeName,
    group: EntityTypeName,
    connection: EntityTypeName,
    actions: [EntityUid; ACTIONS.len()],
}

impl Names {
    fn new() -> Result<Self, String> {
        let ty = |name: &str| {
            EntityTypeName::from_str(&format!("{NAMESPACE}::{name}"))
                .map_err(|e| format!("entity type {name}: {e}"))
        };
        let action_ty = ty("Action")?;
        let action =
            |name: &str| EntityUid::from_type_name_and_id(action_ty.clone(), EntityId::new(name));
        Ok(Names {
            principal: ty("Principal")?,
            group: ty("Group")?,
            connection: ty("Connection")?,
            actions: ACTIONS.map(action),
        })
    }

    fn action_index(&self, uid: &EntityUid) -> Option<usize> {
        self.actions.iter().position(|a| a == uid)
    }
}

/// The entities of one question: the principal (with its groups) and the connection.
struct Subject {
    principal: EntityUid,
    resource: EntityUid,
    entities: Entities,
}

/// What Cedar answered to one question, with the agentgate view of the policies involved.
struct Outcome<'a> {
    allowed: bool,
    /// The policies that determined the answer (satisfied permits on allow, satisfied forbids
    /// on deny), in file order.
    determining: Vec<&'a PolicyMeta>,
    /// Policies that failed to evaluate, in file order.
    errored: Vec<&'a PolicyMeta>,
}

/// A risk rule plus the approval timeout of the policies behind it.
struct RuleOutcome {
    rule: RiskRule,
    approval_timeout: Option<Duration>,
}

impl PolicyEngine {
    /// Compiles policy text. `source` names it in error messages (usually the file name).
    ///
    /// Refuses, with the line and column of the first problem: Cedar syntax errors; anything
    /// the schema rejects (an unknown entity type, action or attribute); templates (agentgate
    /// has no use for them); an unknown or misplaced annotation or a bad annotation value; a
    /// risk class or principal kind that does not exist; duplicate `@id`s; an approval policy
    /// (one that reads `context.approved`) with no `@approvers`.
    pub fn parse(text: &str, source: &str) -> Result<PolicyEngine, PolicyError> {
        let names = Names::new().map_err(|e| PolicyError::whole_file(source, e))?;
        let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| PolicyError::whole_file("agentgate schema", diagnostic_message(&e)))?;

        let parsed = PolicySet::from_str(text).map_err(|errors| {
            let count = errors.iter().count();
            match errors.iter().next() {
                Some(first) => {
                    let mut message = diagnostic_message(first);
                    if count > 1 {
                        message.push_str(&format!(" (and {} more errors)", count - 1));
                    }
                    PolicyError::at(source, text, diagnostic_offset(first).unwrap_or(0), message)
                }
                None => PolicyError::whole_file(source, errors.to_string()),
            }
        })?;
        if parsed.templates().next().is_some() {
            let offset = text.find('?').unwrap_or(0);
            return Err(PolicyError::at(
                source,
                text,
                offset,
                "policy templates (?principal, ?resource) are not supported: write static policies"
                    .into(),
            ));
        }

        let validation = Validator::new(schema).validate(&parsed, ValidationMode::Strict);
        let first_error = validation
            .validation_errors()
            .map(|e| {
                // Cedar names the policy by its internal number ("for policy `policy3`, ..."),
                // which means nothing to the reader; the line says which policy it is.
                let message = diagnostic_message(e);
                let message = match message.strip_prefix("for policy `") {
                    Some(rest) => rest
                        .split_once("`, ")
                        .map_or(message.clone(), |(_, tail)| tail.to_owned()),
                    None => message,
                };
                (diagnostic_offset(e).unwrap_or(0), message)
            })
            .min_by_key(|(offset, _)| *offset);
        if let Some((offset, message)) = first_error {
            let count = validation.validation_errors().count();
            let message = if count > 1 {
                format!("{message} (and {} more errors)", count - 1)
            } else {
                message
            };
            return Err(PolicyError::at(source, text, offset, message));
        }

        let spans = scan::policy_spans(text);
        let file_name = Path::new(source)
            .file_name()
            .map_or_else(|| source.to_owned(), |n| n.to_string_lossy().into_owned());
        let known_classes: Vec<&str> = RISK_CLASSES
            .iter()
            .copied()
            .chain([NO_RISK_CLASS])
            .collect();

        // Cedar numbers policies policy0, policy1, ... in source order.
        let mut ordered: Vec<(usize, &cedar_policy::Policy)> = parsed
            .policies()
            .map(|p| {
                let index = p
                    .id()
                    .to_string()
                    .strip_prefix("policy")
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(usize::MAX);
                (index, p)
            })
            .collect();
        ordered.sort_by_key(|(index, _)| *index);
        let spans_match = spans.len() == ordered.len();

        let mut sets: [PolicySet; ACTIONS.len()] = std::array::from_fn(|_| PolicySet::new());
        let mut meta_by_id = HashMap::new();
        let mut seen_ids = HashSet::new();
        let mut execute_permit_depends_on_approved = false;
        for (position, (_, policy)) in ordered.iter().enumerate() {
            let span = spans.get(position).filter(|_| spans_match);
            let start = span.map_or(0, |s| s.start);
            let end = span.map_or(text.len(), |s| s.end);
            let at_key = |key: &str| {
                span.and_then(|s| s.annotations.iter().find(|(k, _)| k == key))
                    .map_or(start, |(_, offset)| *offset)
            };

            let id = match policy.annotation("id") {
                Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
                _ => format!("{file_name}:{}", line_column(text, start).0),
            };
            if !seen_ids.insert(id.clone()) {
                return Err(PolicyError::at(
                    source,
                    text,
                    at_key("id"),
                    format!("duplicate policy id {id:?}: each @id must be unique"),
                ));
            }

            let mut actions = [false; ACTIONS.len()];
            match policy.action_constraint() {
                ActionConstraint::Any => actions = [true; ACTIONS.len()],
                ActionConstraint::Eq(uid) => {
                    if let Some(i) = names.action_index(&uid) {
                        actions[i] = true;
                    }
                }
                ActionConstraint::In(uids) => {
                    for uid in uids {
                        if let Some(i) = names.action_index(&uid) {
                            actions[i] = true;
                        }
                    }
                }
            }

            let annotations: Vec<(&str, &str)> = policy.annotations().collect();
            let mut meta =
                meta::parse(position, id.clone(), policy.effect(), actions, &annotations).map_err(
                    |e| {
                        let offset = if e.key.is_empty() {
                            start
                        } else {
                            at_key(&e.key)
                        };
                        PolicyError::at(source, text, offset, e.message)
                    },
                )?;

            let json = policy.to_json().map_err(|e| {
                PolicyError::at(source, text, start, format!("cannot inspect policy: {e}"))
            })?;
            let findings = lint::check(&json, &known_classes);
            meta.depends_on_approved = findings.depends_on_approved;
            if actions[EXECUTE] && policy.effect() == Effect::Permit && findings.depends_on_approved
            {
                execute_permit_depends_on_approved = true;
            }
            let literal_at =
                |value: &str| scan::find_string_literal(text, start, end, value).unwrap_or(start);
            if let Some(class) = findings.unknown_risk_classes.first() {
                return Err(PolicyError::at(
                    source,
                    text,
                    literal_at(class),
                    format!(
                        "unknown risk class {class:?}; risk classes are {} (and \"{NO_RISK_CLASS}\" for operations with none)",
                        RISK_CLASSES.join(", ")
                    ),
                ));
            }
            if let Some(pattern) = findings.dead_patterns.first() {
                return Err(PolicyError::at(
                    source,
                    text,
                    literal_at(pattern),
                    format!("pattern {pattern:?} matches no risk class"),
                ));
            }
            if let Some(kind) = findings.unknown_kinds.first() {
                return Err(PolicyError::at(
                    source,
                    text,
                    literal_at(kind),
                    format!(
                        "unknown principal kind {kind:?}; kinds are {}",
                        lint::PRINCIPAL_KINDS.join(", ")
                    ),
                ));
            }
            if findings.uses_approved && meta.approval.approvers.is_empty() {
                return Err(PolicyError::at(
                    source,
                    text,
                    start,
                    "this policy reads context.approved, so it defines an approval: say who approves with @approvers(\"group,...\")"
                        .into(),
                ));
            }
            let only_execute = actions
                .iter()
                .enumerate()
                .all(|(i, &a)| a == (i == EXECUTE));
            if only_execute && !findings.uses_approved && meta.approval != Default::default() {
                return Err(PolicyError::at(
                    source,
                    text,
                    at_key(if meta.approval.approvers.is_empty() {
                        if meta.approval.approvals.is_some() {
                            "approvals"
                        } else {
                            "reason_required"
                        }
                    } else {
                        "approvers"
                    }),
                    "approval annotations on an execute policy that never reads context.approved have no effect; an approval rule reads `forbid (...) when { ... } unless { context.approved };`"
                        .into(),
                ));
            }
            let only_request = actions
                .iter()
                .enumerate()
                .all(|(i, &a)| a == (i == REQUEST_ACCESS));
            if only_request
                && policy.effect() == Effect::Permit
                && meta.approval.approvers.is_empty()
            {
                return Err(PolicyError::at(
                    source,
                    text,
                    start,
                    "a request_access permit needs @approvers(\"group,...\"): who approves the request?"
                        .into(),
                ));
            }

            let renamed = policy.new_id(PolicyId::new(&id));
            for (i, applies) in actions.iter().enumerate() {
                if *applies {
                    sets[i].add(renamed.clone()).map_err(|e| {
                        PolicyError::at(source, text, start, format!("cannot add policy: {e}"))
                    })?;
                }
            }
            meta_by_id.insert(PolicyId::new(&id), meta);
        }

        let digest = Sha256::digest(text.as_bytes());
        Ok(PolicyEngine {
            version: hex::encode(&digest[..6]),
            source_name: source.to_owned(),
            sets,
            policy_count: ordered.len(),
            execute_permit_depends_on_approved,
            meta: meta_by_id,
            authorizer: Authorizer::new(),
            names,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Reads and compiles a policy file; errors name the file as given.
    pub fn load(path: &Path) -> Result<PolicyEngine, PolicyError> {
        let bytes = std::fs::read(path).map_err(|e| PolicyError::io(path, &e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let offset = e.utf8_error().valid_up_to();
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            PolicyError::at(
                &path.display().to_string(),
                &text,
                offset,
                "the policy file is not valid UTF-8".into(),
            )
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// A short hash of the policy text (12 hex digits of its SHA-256), recorded with every
    /// session and decision so that an auditor can tell which policy was in force. Two
    /// engines compiled from the same text have the same version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What the policy was compiled from (the `source` given to [`PolicyEngine::parse`]).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// How many policies the file has; for logs on (re)load.
    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    /// Standing access: may `p` open a session on `connection` with `role` without an
    /// approved access request (Cedar action `connect`, `context.role`)?
    pub fn standing_access(&self, p: &Principal, connection: &str, role: &str) -> bool {
        let Some(subject) = self.subject(p, connection) else {
            return false;
        };
        let outcome = self.query(&subject, CONNECT, role_context(role));
        outcome.allowed && outcome.errored.is_empty()
    }

    /// Just-in-time access: may `p` request `role` on `connection`, and on what terms
    /// (Cedar action `request_access`)? `None` means the request is refused outright.
    ///
    /// When several permits match, the most restrictive one applies as a whole (shortest
    /// `@max_duration`, then most `@approvals`, then the one requiring a reason, then the
    /// first in the file): one coherent rule, never a mix of two.
    pub fn access_request_rule(
        &self,
        p: &Principal,
        connection: &str,
        role: &str,
    ) -> Option<AccessRequestRule> {
        let subject = self.subject(p, connection)?;
        let outcome = self.query(&subject, REQUEST_ACCESS, role_context(role));
        if !outcome.allowed || !outcome.errored.is_empty() {
            return None;
        }
        outcome
            .determining
            .iter()
            .map(|m| AccessRequestRule {
                max_duration: m.max_duration.unwrap_or(DEFAULT_MAX_ACCESS_DURATION),
                approver_groups: m.approval.approvers.clone(),
                approvals_required: m.approval.approvals.unwrap_or(1),
                reason_required: m.approval.reason_required.unwrap_or(false),
                policy: m.id.clone(),
            })
            .min_by(|a, b| {
                a.max_duration
                    .cmp(&b.max_duration)
                    .then(b.approvals_required.cmp(&a.approvals_required))
                    .then(b.reason_required.cmp(&a.reason_required))
            })
    }

    /// What the policy says about one risk class of an operation on this session: allow,
    /// deny, or needs approval (with who approves and how many).
    ///
    /// Two Cedar questions (action `execute`): "may it run as is?" (`context.approved ==
    /// false`) and, if not, "may it run once approved?" (`context.approved == true`). Yes →
    /// allow; no then yes → needs approval, from the `@approvers`/`@approvals`/
    /// `@reason_required` of the policies behind both answers; no and no → deny.
    ///
    /// Any string can be asked, including [`NO_RISK_CLASS`]; [`PolicyEngine::authorize`] and
    /// [`decide`](crate::decide) deny classes outside [`RISK_CLASSES`] without asking.
    pub fn operation_rule(
        &self,
        p: &Principal,
        connection: &str,
        role: &str,
        risk_class: &str,
    ) -> RiskRule {
        match self.subject(p, connection) {
            Some(subject) => self.rule_for(&subject, role, risk_class).rule,
            None => deny_rule(risk_class),
        }
    }

    /// The masking rules for a session: one per selector of each `read_unmasked` forbid with
    /// `@mask` that matches, in file order (the masking engine applies the first rule that
    /// selects a value, so a specific rule written first wins over a broad one).
    pub fn masking_rules(&self, p: &Principal, connection: &str, role: &str) -> Vec<MaskingRule> {
        let Some(subject) = self.subject(p, connection) else {
            return Vec::new();
        };
        let outcome = self.query(&subject, READ_UNMASKED, role_context(role));
        let mut metas: Vec<&PolicyMeta> = if outcome.allowed {
            Vec::new()
        } else {
            outcome.determining
        };
        // A masking forbid that failed to evaluate still masks: fail closed.
        metas.extend(outcome.errored);
        metas.sort_by_key(|m| m.index);
        metas.dedup_by_key(|m| m.index);
        metas.iter().flat_map(|m| m.masks.iter().cloned()).collect()
    }

    /// Everything a proxy needs to decide each operation of one session locally: a risk rule
    /// for every class of [`RISK_CLASSES`] and for [`NO_RISK_CLASS`], the decision for
    /// operations with no class, the masking rules, the approval timeout (the shortest
    /// `@approval_timeout` among the policies behind the session's approval rules, else
    /// [`DEFAULT_APPROVAL_TIMEOUT`]) and the policy version.
    ///
    /// Computing one takes about fifty Cedar evaluations, so results are kept for the life of
    /// this engine (it never changes; a reload is a new engine with an empty cache), keyed by
    /// subject, kind, issuer, groups, connection and role: the second session of the same
    /// agent on the same connection costs a hash lookup.
    pub fn session_policy(&self, p: &Principal, connection: &str, role: &str) -> SessionPolicy {
        let mut groups = p.groups.clone();
        groups.sort();
        groups.dedup();
        let key = SessionKey {
            subject: p.subject.clone(),
            kind: p.kind,
            issuer: p.issuer.clone(),
            groups,
            connection: connection.to_owned(),
            role: role.to_owned(),
        };
        if let Some(policy) = self.sessions.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return policy;
        }
        let policy = self.compute_session_policy(p, connection, role);
        if let Ok(mut cache) = self.sessions.lock() {
            if cache.len() >= SESSION_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, policy.clone());
        }
        policy
    }

    /// [`PolicyEngine::session_policy`] without the cache: always evaluates. For benchmarks
    /// and for callers that want to measure or bypass the cache.
    pub fn compute_session_policy(
        &self,
        p: &Principal,
        connection: &str,
        role: &str,
    ) -> SessionPolicy {
        let subject = self.subject(p, connection);
        let mut risk_rules = Vec::with_capacity(RISK_CLASSES.len() + 1);
        let mut timeout: Option<Duration> = None;
        for class in RISK_CLASSES.iter().copied().chain([NO_RISK_CLASS]) {
            let outcome = match &subject {
                Some(subject) => self.rule_for(subject, role, class),
                None => RuleOutcome {
                    rule: deny_rule(class),
                    approval_timeout: None,
                },
            };
            if let Some(t) = outcome.approval_timeout {
                timeout = Some(timeout.map_or(t, |current| current.min(t)));
            }
            risk_rules.push(outcome.rule);
        }
        let default_decision = risk_rules
            .last()
            .map_or(Decision::Deny as i32, |rule| rule.decision);
        let timeout = timeout.unwrap_or(DEFAULT_APPROVAL_TIMEOUT);
        SessionPolicy {
            default_decision,
            risk_rules,
            masking_rules: self.masking_rules(p, connection, role),
            approval_timeout: Some(agentgate_proto::Duration {
                seconds: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(timeout.subsec_nanos()).unwrap_or(0),
            }),
            settings: HashMap::new(),
            version: self.version.clone(),
        }
    }

    /// The central decision for one operation, evaluated with Cedar directly rather than
    /// through a [`SessionPolicy`]; authz's `Authorize` answers with it.
    ///
    /// It is, by construction and by test, the same answer as
    /// `decide(&engine.session_policy(p, connection, role), op)`: each risk class gets the rule
    /// [`PolicyEngine::operation_rule`] gives, a class outside [`RISK_CLASSES`] is denied, an
    /// operation with no class is asked as [`NO_RISK_CLASS`], and the rules combine with the
    /// same function as [`decide`](crate::decide).
    pub fn authorize(
        &self,
        p: &Principal,
        connection: &str,
        role: &str,
        op: &Operation,
    ) -> LocalDecision {
        let subject = self.subject(p, connection);
        let rule = |class: &str| match &subject {
            Some(subject) if is_known_risk_class(class) => self.rule_for(subject, role, class).rule,
            _ => deny_rule(class),
        };
        if op.risk_classes.is_empty() {
            combine(std::iter::once(rule(NO_RISK_CLASS)))
        } else {
            combine(op.risk_classes.iter().map(|class| rule(class)))
        }
    }

    fn rule_for(&self, subject: &Subject, role: &str, class: &str) -> RuleOutcome {
        let as_is = self.query(subject, EXECUTE, execute_context(role, class, false));
        if as_is.allowed && as_is.errored.is_empty() {
            return RuleOutcome {
                rule: RiskRule {
                    risk_class: class.to_owned(),
                    decision: Decision::Allow as i32,
                    approver_groups: Vec::new(),
                    approvals_required: 0,
                    reason_required: false,
                },
                approval_timeout: None,
            };
        }
        // Deny without asking "once approved?" when approval cannot change the answer: a
        // policy failed to evaluate (fail closed); a satisfied forbid does not depend on
        // `approved` (it is satisfied in the second question too); or nothing permitted it
        // and no permit depends on `approved`.
        let hard_forbid = as_is.determining.iter().any(|m| !m.depends_on_approved);
        let nothing_to_lift =
            as_is.determining.is_empty() && !self.execute_permit_depends_on_approved;
        if !as_is.errored.is_empty() || hard_forbid || nothing_to_lift {
            return RuleOutcome {
                rule: deny_rule(class),
                approval_timeout: None,
            };
        }
        let approved = self.query(subject, EXECUTE, execute_context(role, class, true));
        if !approved.allowed || !approved.errored.is_empty() {
            return RuleOutcome {
                rule: deny_rule(class),
                approval_timeout: None,
            };
        }
        let behind = as_is.determining.iter().chain(approved.determining.iter());
        let mut groups = BTreeSet::new();
        let mut approvals = None::<u32>;
        let mut reason_required = false;
        let mut timeout = None::<Duration>;
        for m in behind {
            groups.extend(m.approval.approvers.iter().cloned());
            if let Some(n) = m.approval.approvals {
                approvals = Some(approvals.map_or(n, |a| a.max(n)));
            }
            reason_required |= m.approval.reason_required.unwrap_or(false);
            if let Some(t) = m.approval_timeout {
                timeout = Some(timeout.map_or(t, |current| current.min(t)));
            }
        }
        RuleOutcome {
            rule: RiskRule {
                risk_class: class.to_owned(),
                decision: Decision::NeedsApproval as i32,
                approver_groups: groups.into_iter().collect(),
                approvals_required: approvals.unwrap_or(1),
                reason_required,
            },
            approval_timeout: timeout,
        }
    }

    /// [`Self::rule_for`] without its shortcuts: always both questions. Tests compare the two.
    #[cfg(test)]
    fn rule_for_naive(&self, subject: &Subject, role: &str, class: &str) -> Decision {
        let as_is = self.query(subject, EXECUTE, execute_context(role, class, false));
        if as_is.allowed && as_is.errored.is_empty() {
            return Decision::Allow;
        }
        let approved = self.query(subject, EXECUTE, execute_context(role, class, true));
        if as_is.errored.is_empty() && approved.allowed && approved.errored.is_empty() {
            Decision::NeedsApproval
        } else {
            Decision::Deny
        }
    }

    /// Builds the entities of a question. `None` only if Cedar refuses them, which a
    /// well-formed principal never causes; callers then deny.
    fn subject(&self, p: &Principal, connection: &str) -> Option<Subject> {
        let principal = EntityUid::from_type_name_and_id(
            self.names.principal.clone(),
            EntityId::new(&p.subject),
        );
        let resource = EntityUid::from_type_name_and_id(
            self.names.connection.clone(),
            EntityId::new(connection),
        );
        let parents: HashSet<EntityUid> = p
            .groups
            .iter()
            .map(|g| EntityUid::from_type_name_and_id(self.names.group.clone(), EntityId::new(g)))
            .collect();
        let kind = match PrincipalKind::try_from(p.kind) {
            Ok(PrincipalKind::Agent) => "agent",
            Ok(PrincipalKind::Human) => "human",
            Ok(PrincipalKind::Service) => "service",
            _ => "unspecified",
        };
        let attrs = HashMap::from([
            (
                "kind".to_owned(),
                RestrictedExpression::new_string(kind.to_owned()),
            ),
            (
                "issuer".to_owned(),
                RestrictedExpression::new_string(p.issuer.clone()),
            ),
        ]);
        let entity = match Entity::new(principal.clone(), attrs, parents) {
            Ok(entity) => entity,
            Err(e) => {
                tracing::warn!(subject = %p.subject, error = %e, "policy: cannot build principal entity; denying");
                return None;
            }
        };
        let entities = match Entities::from_entities([entity], None) {
            Ok(entities) => entities,
            Err(e) => {
                tracing::warn!(subject = %p.subject, error = %e, "policy: cannot build entities; denying");
                return None;
            }
        };
        Some(Subject {
            principal,
            resource,
            entities,
        })
    }

    fn query(
        &self,
        subject: &Subject,
        action: usize,
        context: Vec<(String, RestrictedExpression)>,
    ) -> Outcome<'_> {
        let denied = Outcome {
            allowed: false,
            determining: Vec::new(),
            errored: Vec::new(),
        };
        let context = match Context::from_pairs(context) {
            Ok(context) => context,
            Err(e) => {
                tracing::warn!(error = %e, "policy: cannot build request context; denying");
                return denied;
            }
        };
        let request = match Request::new(
            subject.principal.clone(),
            self.names.actions[action].clone(),
            subject.resource.clone(),
            context,
            None,
        ) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "policy: cannot build request; denying");
                return denied;
            }
        };
        let response =
            self.authorizer
                .is_authorized(&request, &self.sets[action], &subject.entities);
        let diagnostics = response.diagnostics();
        let mut determining: Vec<&PolicyMeta> = diagnostics
            .reason()
            .filter_map(|id| self.meta.get(id))
            .collect();
        determining.sort_by_key(|m| m.index);
        let mut errored: Vec<&PolicyMeta> = Vec::new();
        for error in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = error;
            tracing::warn!(policy = %e.policy_id(), error = %e, "policy: evaluation error; treated as deny");
            if let Some(m) = self.meta.get(e.policy_id()) {
                errored.push(m);
            }
        }
        errored.sort_by_key(|m| m.index);
        Outcome {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            determining,
            errored,
        }
    }
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("source", &self.source_name)
            .field("version", &self.version)
            .field("policies", &self.policy_count)
            .finish_non_exhaustive()
    }
}

fn role_context(role: &str) -> Vec<(String, RestrictedExpression)> {
    vec![(
        "role".to_owned(),
        RestrictedExpression::new_string(role.to_owned()),
    )]
}

fn execute_context(role: &str, class: &str, approved: bool) -> Vec<(String, RestrictedExpression)> {
    vec![
        (
            "role".to_owned(),
            RestrictedExpression::new_string(role.to_owned()),
        ),
        (
            "risk_class".to_owned(),
            RestrictedExpression::new_string(class.to_owned()),
        ),
        (
            "approved".to_owned(),
            RestrictedExpression::new_bool(approved),
        ),
    ]
}

/// The rule for a class the policy does not allow (or cannot be asked about).
pub(crate) fn deny_rule(class: &str) -> RiskRule {
    RiskRule {
        risk_class: class.to_owned(),
        decision: Decision::Deny as i32,
        approver_groups: Vec::new(),
        approvals_required: 0,
        reason_required: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/policy.example.cedar");
    const TRICKY: &str = r#"
permit (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "read" && context.risk_class like "*.read" };

@approvers("oncall")
permit (principal in Agentgate::Group::"ops", action == Agentgate::Action::"execute", resource)
when { context.approved && context.risk_class like "ssh.*" };

@approvers("dba")
forbid (principal, action, resource)
when { context has approved && context.approved == false && context.role == "write" };

permit (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "write" };

forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "write" && context.risk_class == "sql.dcl" };
"#;

    /// The shortcuts in `rule_for` (no second question when approval cannot change the
    /// answer) must never change a decision.
    #[test]
    fn shortcuts_never_change_a_decision() {
        for (text, name) in [(EXAMPLE, "example"), (TRICKY, "tricky")] {
            let engine = match PolicyEngine::parse(text, name) {
                Ok(engine) => engine,
                Err(e) => panic!("{e}"),
            };
            let mut seen = HashSet::new();
            for groups in [vec![], vec!["ops".to_owned()], vec!["deployers".to_owned()]] {
                for kind in [PrincipalKind::Agent, PrincipalKind::Human] {
                    let p = Principal {
                        subject: "agent:deploy-bot".into(),
                        kind: kind as i32,
                        groups: groups.clone(),
                        ..Default::default()
                    };
                    for connection in ["prod-db", "prod-k8s", "web-1", "x"] {
                        let Some(subject) = engine.subject(&p, connection) else {
                            panic!("subject");
                        };
                        for role in ["read", "write", "edit", "admin", "deploy"] {
                            for class in RISK_CLASSES.iter().copied().chain([NO_RISK_CLASS]) {
                                let fast = engine.rule_for(&subject, role, class).rule.decision;
                                let naive = engine.rule_for_naive(&subject, role, class) as i32;
                                assert_eq!(fast, naive, "{name} {connection} {role} {class}");
                                seen.insert(fast);
                            }
                        }
                    }
                }
            }
            assert_eq!(seen.len(), 3, "{name}: all three outcomes exercised");
        }
    }
}
