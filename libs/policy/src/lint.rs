//! Checks that Cedar's schema validation cannot make: string values that must come from a
//! closed list.
//!
//! The schema says `context.risk_class` is a `String`, so `context.risk_class == "sql.dll"`
//! validates. But that policy never matches anything, and if it is a `forbid` the typo
//! silently allows what it was meant to stop. So every string a policy compares
//! `context.risk_class` with (`==`, `!=`, `.contains(..)`, `like`) must be a known risk class
//! (or a pattern that matches one), and every string compared with `principal.kind` must be
//! a principal kind. The check walks Cedar's JSON form of each policy.

use serde_json::Value;

/// What the walk found in one policy.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    /// Literals compared with `context.risk_class` that are not risk classes.
    pub unknown_risk_classes: Vec<String>,
    /// `like` patterns on `context.risk_class` that match no risk class (rendered as written).
    pub dead_patterns: Vec<String>,
    /// Literals compared with `principal.kind` that are not principal kinds.
    pub unknown_kinds: Vec<String>,
    /// Whether the policy reads `context.approved`.
    pub uses_approved: bool,
    /// Whether the policy's outcome can depend on `context.approved`: it reads it, or uses
    /// `context` other than through `.role` and `.risk_class` (`context has approved`,
    /// `context == {..}`). Conservative, so that skipping the "once approved?" question
    /// when no such policy could change the answer is always sound.
    pub depends_on_approved: bool,
}

/// The principal kinds `principal.kind` can hold.
pub(crate) const PRINCIPAL_KINDS: [&str; 4] = ["agent", "human", "service", "unspecified"];

/// Walks the JSON form of one policy.
pub(crate) fn check(policy_json: &Value, risk_classes: &[&str]) -> Findings {
    let mut findings = Findings::default();
    walk(policy_json, risk_classes, &mut findings);
    findings
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attr {
    RiskClass,
    Kind,
}

fn attr_of(v: &Value) -> Option<Attr> {
    let dot = v.get(".")?;
    let var = dot.get("left")?.get("Var")?.as_str()?;
    let attr = dot.get("attr")?.as_str()?;
    match (var, attr) {
        ("context", "risk_class") => Some(Attr::RiskClass),
        ("principal", "kind") => Some(Attr::Kind),
        _ => None,
    }
}

fn is_approved(v: &Value) -> bool {
    v.get(".").is_some_and(|dot| {
        dot.get("left")
            .and_then(|l| l.get("Var"))
            .and_then(Value::as_str)
            == Some("context")
            && dot.get("attr").and_then(Value::as_str) == Some("approved")
    })
}

/// String literals of an expression that is a literal or a set of literals.
fn literals(v: &Value, out: &mut Vec<String>) {
    if let Some(s) = v.get("Value").and_then(Value::as_str) {
        out.push(s.to_owned());
    } else if let Some(items) = v.get("Set").and_then(Value::as_array) {
        for item in items {
            literals(item, out);
        }
    } else if let Some(items) = v.get("Value").and_then(Value::as_array) {
        for item in items {
            if let Some(s) = item.as_str() {
                out.push(s.to_owned());
            }
        }
    }
}

fn record(attr: Attr, other: &Value, risk_classes: &[&str], findings: &mut Findings) {
    let mut values = Vec::new();
    literals(other, &mut values);
    for value in values {
        match attr {
            Attr::RiskClass if !risk_classes.contains(&value.as_str()) => {
                findings.unknown_risk_classes.push(value);
            }
            Attr::Kind if !PRINCIPAL_KINDS.contains(&value.as_str()) => {
                findings.unknown_kinds.push(value);
            }
            _ => {}
        }
    }
}

fn walk(v: &Value, risk_classes: &[&str], findings: &mut Findings) {
    match v {
        Value::Object(map) => {
            if is_approved(v) {
                findings.uses_approved = true;
            }
            if let Some(dot) = map.get(".")
                && dot
                    .get("left")
                    .and_then(|l| l.get("Var"))
                    .and_then(Value::as_str)
                    == Some("context")
                && matches!(
                    dot.get("attr").and_then(Value::as_str),
                    Some("role" | "risk_class")
                )
            {
                // A plain read of role or risk_class: nothing below can see `approved`.
                return;
            }
            if map.get("Var").and_then(Value::as_str) == Some("context") {
                findings.depends_on_approved = true;
            }
            for op in ["==", "!=", "contains", "containsAll", "containsAny"] {
                if let Some(operands) = map.get(op) {
                    let (left, right) = (operands.get("left"), operands.get("right"));
                    if let (Some(left), Some(right)) = (left, right) {
                        if let Some(attr) = attr_of(left) {
                            record(attr, right, risk_classes, findings);
                        }
                        if let Some(attr) = attr_of(right) {
                            record(attr, left, risk_classes, findings);
                        }
                    }
                }
            }
            if let Some(like) = map.get("like")
                && like.get("left").and_then(attr_of) == Some(Attr::RiskClass)
                && let Some(pattern) = like.get("pattern").and_then(Value::as_array)
            {
                let pattern = Pattern::from_json(pattern);
                if !risk_classes.iter().any(|class| pattern.matches(class)) {
                    findings.dead_patterns.push(pattern.render());
                }
            }
            for child in map.values() {
                walk(child, risk_classes, findings);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, risk_classes, findings);
            }
        }
        _ => {}
    }
}

/// A Cedar `like` pattern: literal characters and `*` wildcards.
struct Pattern(Vec<Option<char>>);

impl Pattern {
    fn from_json(elements: &[Value]) -> Self {
        let mut out = Vec::new();
        for element in elements {
            if let Some(literal) = element.get("Literal").and_then(Value::as_str) {
                out.extend(literal.chars().map(Some));
            } else {
                out.push(None);
            }
        }
        Pattern(out)
    }

    fn matches(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        // Classic glob DP over (pattern position, text position).
        let mut reachable = vec![false; chars.len() + 1];
        reachable[0] = true;
        for element in &self.0 {
            let mut next = vec![false; chars.len() + 1];
            match element {
                None => {
                    let mut any = false;
                    for i in 0..=chars.len() {
                        any |= reachable[i];
                        next[i] = any;
                    }
                }
                Some(c) => {
                    for i in 0..chars.len() {
                        next[i + 1] = reachable[i] && chars[i] == *c;
                    }
                }
            }
            reachable = next;
        }
        reachable[chars.len()]
    }

    fn render(&self) -> String {
        self.0
            .iter()
            .map(|c| match c {
                None => "*".to_owned(),
                Some('*') => "\\*".to_owned(),
                Some(c) => c.to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_cedar() {
        let p = Pattern(vec![Some('s'), Some('q'), Some('l'), Some('.'), None]);
        assert!(p.matches("sql.ddl"));
        assert!(p.matches("sql."));
        assert!(!p.matches("ssh.exec"));
        let p = Pattern(vec![None, Some('.'), Some('d'), None]);
        assert!(p.matches("sql.ddl"));
        assert!(p.matches("ssh.destructive"));
        assert!(!p.matches("sql.read"));
        assert_eq!(Pattern(vec![Some('a'), None, Some('*')]).render(), "a*\\*");
    }
}
