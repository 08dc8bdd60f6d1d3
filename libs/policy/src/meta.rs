//! agentgate's annotations on Cedar policies, parsed and checked once at load time.
//!
//! Cedar decides allow or deny; the annotations on the policies that decided carry what
//! agentgate needs beyond that: who approves, how many approvals, for how long access may be
//! requested, what to mask. They are checked when the file loads, so `@approvals("two")` is
//! an error with its line rather than a surprise at the first approval.

use std::time::Duration;

use agentgate_proto::authz::v1::{MaskingRule, MaskingStrategy, masking_rule::Selector};
use cedar_policy::Effect;

use crate::schema::{ACTIONS, EXECUTE, READ_UNMASKED, REQUEST_ACCESS};

/// Every annotation key agentgate reads, with the actions it means something for and what it
/// is, for error messages and docs. `None` means any action.
pub(crate) const ANNOTATIONS: &[(&str, Option<&[usize]>, &str)] = &[
    (
        "id",
        None,
        "a name for the policy, shown in decisions and errors",
    ),
    ("description", None, "free text"),
    (
        "approvers",
        Some(&[REQUEST_ACCESS, EXECUTE]),
        "comma-separated groups whose members may approve",
    ),
    (
        "approvals",
        Some(&[REQUEST_ACCESS, EXECUTE]),
        "how many distinct approvals are needed (a positive integer)",
    ),
    (
        "reason_required",
        Some(&[REQUEST_ACCESS, EXECUTE]),
        "whether the requester must give a reason (\"true\" or \"false\")",
    ),
    (
        "max_duration",
        Some(&[REQUEST_ACCESS]),
        "the longest grant an access request can get (\"30m\", \"4h\")",
    ),
    (
        "approval_timeout",
        Some(&[EXECUTE]),
        "how long a held operation waits for a decision (\"5m\")",
    ),
    (
        "mask",
        Some(&[READ_UNMASKED]),
        "comma-separated selectors: column:, json_path:, header:, kubernetes_field:, detector:",
    ),
    (
        "strategy",
        Some(&[READ_UNMASKED]),
        "how masked values are rewritten: redact, partial or keyed_hash",
    ),
];

/// Everything agentgate needs to know about one policy besides what Cedar evaluates.
#[derive(Debug, Clone)]
pub(crate) struct PolicyMeta {
    /// Position in the file, so that results keep the file's order.
    pub index: usize,
    /// The policy id: its `@id`, or `file:line`.
    pub id: String,
    pub approval: ApprovalMeta,
    pub max_duration: Option<Duration>,
    pub approval_timeout: Option<Duration>,
    /// The masking rules a matching `read_unmasked` forbid adds to a session.
    pub masks: Vec<MaskingRule>,
    /// Whether the policy's outcome can depend on `context.approved` (see
    /// [`crate::lint::Findings::depends_on_approved`]); set after the lint walk.
    pub depends_on_approved: bool,
}

/// The approval annotations of a policy, each absent unless written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ApprovalMeta {
    pub approvers: Vec<String>,
    pub approvals: Option<u32>,
    pub reason_required: Option<bool>,
}

/// An annotation problem: the key it concerns (to find its line) and the message.
pub(crate) struct MetaError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: String) -> MetaError {
    MetaError {
        key: key.to_owned(),
        message,
    }
}

/// Reads and checks the annotations of one policy.
pub(crate) fn parse(
    index: usize,
    id: String,
    effect: Effect,
    actions: [bool; ACTIONS.len()],
    annotations: &[(&str, &str)],
) -> Result<PolicyMeta, MetaError> {
    let mut meta = PolicyMeta {
        index,
        id,
        approval: ApprovalMeta::default(),
        max_duration: None,
        approval_timeout: None,
        masks: Vec::new(),
        depends_on_approved: true,
    };
    let mut strategy = None;
    let mut mask = None;
    for &(key, value) in annotations {
        if key.starts_with("x_") {
            continue;
        }
        let Some((_, applies, _)) = ANNOTATIONS.iter().find(|(k, _, _)| *k == key) else {
            let known: Vec<&str> = ANNOTATIONS.iter().map(|(k, _, _)| *k).collect();
            return Err(err(
                key,
                format!(
                    "unknown annotation @{key}; agentgate reads @{} (keys starting with x_ are free for your own use)",
                    known.join(", @")
                ),
            ));
        };
        if let Some(applies) = applies
            && !applies.iter().any(|&a| actions[a])
        {
            let names: Vec<String> = applies
                .iter()
                .map(|&a| format!("Agentgate::Action::\"{}\"", ACTIONS[a]))
                .collect();
            return Err(err(
                key,
                format!(
                    "@{key} means nothing on this policy: it applies to {} only",
                    names.join(" or ")
                ),
            ));
        }
        match key {
            "approvers" => {
                let groups: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect();
                if groups.is_empty() {
                    return Err(err(
                        key,
                        "@approvers needs at least one group name, e.g. @approvers(\"dba,sre\")"
                            .into(),
                    ));
                }
                meta.approval.approvers = groups;
            }
            "approvals" => match value.trim().parse::<u32>() {
                Ok(n) if n >= 1 => meta.approval.approvals = Some(n),
                _ => {
                    return Err(err(
                        key,
                        format!(
                            "@approvals must be a positive whole number like \"2\", not {value:?}"
                        ),
                    ));
                }
            },
            "reason_required" => meta.approval.reason_required = Some(parse_bool(key, value)?),
            "max_duration" => meta.max_duration = Some(parse_duration(key, value)?),
            "approval_timeout" => meta.approval_timeout = Some(parse_duration(key, value)?),
            "strategy" => strategy = Some(parse_strategy(value)?),
            "mask" => mask = Some(value),
            _ => {}
        }
    }
    if strategy.is_some() && mask.is_none() {
        return Err(err(
            "strategy",
            "@strategy without @mask: say what to mask, e.g. @mask(\"column:public.users.email\")"
                .into(),
        ));
    }
    if let Some(mask) = mask {
        if effect != Effect::Forbid {
            return Err(err(
                "mask",
                "@mask belongs on a forbid policy (\"forbid reading this unmasked\"); write exceptions as `unless { .. }` on it"
                    .into(),
            ));
        }
        let strategy = strategy.unwrap_or(MaskingStrategy::Redact);
        let selectors = parse_selectors(mask)?;
        let many = selectors.len() > 1;
        for (n, selector) in selectors.into_iter().enumerate() {
            meta.masks.push(MaskingRule {
                name: if many {
                    format!("{}#{}", meta.id, n + 1)
                } else {
                    meta.id.clone()
                },
                selector: Some(selector),
                strategy: strategy as i32,
            });
        }
    } else if actions == only(READ_UNMASKED) && effect == Effect::Forbid {
        return Err(err(
            "",
            "a read_unmasked forbid needs @mask(\"...\") to say what it masks".into(),
        ));
    } else if actions == only(READ_UNMASKED) {
        return Err(err(
            "",
            "a permit on read_unmasked has no effect: masking comes from forbid policies with @mask; write exceptions as `unless { .. }` on them"
                .into(),
        ));
    }
    Ok(meta)
}

fn only(action: usize) -> [bool; ACTIONS.len()] {
    let mut a = [false; ACTIONS.len()];
    a[action] = true;
    a
}

fn parse_bool(key: &str, value: &str) -> Result<bool, MetaError> {
    match value.trim() {
        "" | "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(err(
            key,
            format!("@{key} must be \"true\" or \"false\", not {value:?}"),
        )),
    }
}

fn parse_duration(key: &str, value: &str) -> Result<Duration, MetaError> {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(err(key, format!("@{key} must be longer than zero"))),
        Err(e) => Err(err(
            key,
            format!("@{key} must be a duration like \"30m\" or \"4h\", not {value:?} ({e})"),
        )),
    }
}

fn parse_strategy(value: &str) -> Result<MaskingStrategy, MetaError> {
    match value.trim() {
        "redact" => Ok(MaskingStrategy::Redact),
        "partial" => Ok(MaskingStrategy::Partial),
        "keyed_hash" | "hash" => Ok(MaskingStrategy::KeyedHash),
        _ => Err(err(
            "strategy",
            format!("@strategy must be redact, partial or keyed_hash, not {value:?}"),
        )),
    }
}

fn parse_selectors(value: &str) -> Result<Vec<Selector>, MetaError> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((kind, target)) = item.split_once(':') else {
            return Err(err(
                "mask",
                format!(
                    "mask selector {item:?} needs a kind: column:, json_path:, header:, kubernetes_field: or detector:"
                ),
            ));
        };
        let target = target.trim();
        if target.is_empty() {
            return Err(err(
                "mask",
                format!("mask selector {item:?} selects nothing"),
            ));
        }
        let target_owned = target.to_owned();
        let selector = match kind.trim() {
            "column" => {
                if target.split('.').count() != 3 {
                    return Err(err(
                        "mask",
                        format!(
                            "column selector {target:?} must be schema.table.column (a segment may be *)"
                        ),
                    ));
                }
                Selector::Column(target_owned)
            }
            "json_path" => Selector::JsonPath(target_owned),
            "header" => Selector::Header(target_owned),
            "kubernetes_field" => Selector::KubernetesField(target_owned),
            "detector" => {
                let known: Result<agentgate_masking::DetectorKind, _> =
                    serde_json::from_value(serde_json::Value::String(target_owned.clone()));
                if known.is_err() {
                    let names: Vec<String> = agentgate_masking::DetectorKind::ALL
                        .iter()
                        .filter_map(|d| serde_json::to_value(d).ok())
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect();
                    return Err(err(
                        "mask",
                        format!(
                            "unknown detector {target:?}; detectors are {}",
                            names.join(", ")
                        ),
                    ));
                }
                Selector::Detector(target_owned)
            }
            other => {
                return Err(err(
                    "mask",
                    format!(
                        "unknown mask selector kind {other:?}: use column:, json_path:, header:, kubernetes_field: or detector:"
                    ),
                ));
            }
        };
        out.push(selector);
    }
    if out.is_empty() {
        return Err(err(
            "mask",
            "@mask needs at least one selector, e.g. @mask(\"column:public.users.email\")".into(),
        ));
    }
    Ok(out)
}
