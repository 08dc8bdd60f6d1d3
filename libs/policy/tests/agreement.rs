//! The proxy's local decision (`decide` over the session policy) and authz's central one
//! (`authorize`, Cedar directly) must agree on every case: the issue's "both paths agree".
//! Checked exhaustively over a grid of principals × connections × roles × single classes and
//! pairs, and with proptest over random sets of classes (including unknown ones).

use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use agentgate_policy::{NO_RISK_CLASS, PolicyEngine, RISK_CLASSES, SessionPolicy, decide};
use agentgate_proto::common::v1::{Decision, Operation, Principal, PrincipalKind};
use proptest::prelude::*;

/// A second policy with every construct the example lacks: approval by permit, forbids on
/// any action, role-dependent classes, patterns.
const MIXED: &str = r#"
@approvers("oncall") @approvals("2")
permit (principal in Agentgate::Group::"ops", action == Agentgate::Action::"execute", resource)
when { context.risk_class like "ssh.*" && context.approved };

permit (principal, action == Agentgate::Action::"execute", resource)
when { context.role == "read" && (context.risk_class like "*.read" || context.risk_class == "none") };

permit (principal in Agentgate::Group::"deployers", action == Agentgate::Action::"execute", resource)
unless { context.role == "read" };

@approvers("dba") @reason_required
forbid (principal, action == Agentgate::Action::"execute", resource == Agentgate::Connection::"prod-db")
when { context.risk_class like "sql.write*" }
unless { context.approved };

@approvers("sre") @approvals("3")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { principal.kind == "agent" && ["k8s.delete", "k8s.exec", "sql.write.unbounded"].contains(context.risk_class) }
unless { context.approved };

forbid (principal == Agentgate::Principal::"agent:rogue", action, resource);

forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "k8s.rbac" && context.role != "admin" };
"#;

static ENGINES: LazyLock<Vec<PolicyEngine>> = LazyLock::new(|| {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy.example.cedar");
    let example = match PolicyEngine::load(&example) {
        Ok(engine) => engine,
        Err(e) => panic!("example: {e}"),
    };
    let mixed = match PolicyEngine::parse(MIXED, "mixed.cedar") {
        Ok(engine) => engine,
        Err(e) => panic!("mixed: {e}"),
    };
    vec![example, mixed]
});

fn principals() -> Vec<Principal> {
    let mk = |subject: &str, kind: PrincipalKind, groups: &[&str]| Principal {
        subject: subject.into(),
        kind: kind as i32,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        issuer: "agentgate".into(),
        token_id: String::new(),
    };
    vec![
        mk("agent:deploy-bot", PrincipalKind::Agent, &[]),
        mk("agent:ci", PrincipalKind::Agent, &["deployers"]),
        mk("agent:ops-bot", PrincipalKind::Agent, &["ops", "deployers"]),
        mk("agent:rogue", PrincipalKind::Agent, &["deployers", "sre"]),
        mk("human:sam", PrincipalKind::Human, &["sre", "ops"]),
        mk("human:lee", PrincipalKind::Human, &["support-leads"]),
        mk("service:etl", PrincipalKind::Service, &["analysts"]),
        mk("", PrincipalKind::Unspecified, &[]),
    ]
}

const CONNECTIONS: &[&str] = &[
    "prod-db",
    "staging-db",
    "web-1",
    "billing-api",
    "prod-k8s",
    "vault",
];
const ROLES: &[&str] = &["read", "write", "admin", "deploy", "edit", "view", ""];

fn all_classes() -> Vec<&'static str> {
    RISK_CLASSES
        .iter()
        .copied()
        .chain([NO_RISK_CLASS, "bogus.class", ""])
        .collect()
}

fn op(classes: &[&str]) -> Operation {
    Operation {
        risk_classes: classes.iter().map(|c| (*c).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn decide_and_authorize_agree_on_the_grid() {
    let classes = all_classes();
    let mut sets: Vec<Vec<&str>> = vec![vec![]];
    sets.extend(classes.iter().map(|c| vec![*c]));
    // pairs within a protocol family plus a few across, to keep the grid small
    for (i, a) in classes.iter().enumerate() {
        for b in &classes[i + 1..] {
            if a.split('.').next() == b.split('.').next() {
                sets.push(vec![*a, *b]);
            }
        }
    }
    sets.push(vec!["sql.read", "ssh.exec", "k8s.delete"]);
    sets.push(vec!["sql.write", "bogus.class"]);

    let mut cases = 0usize;
    let mut seen = HashMap::<Decision, usize>::new();
    for engine in ENGINES.iter() {
        for p in principals() {
            for connection in CONNECTIONS {
                for role in ROLES {
                    let session: SessionPolicy = engine.session_policy(&p, connection, role);
                    for set in &sets {
                        let operation = op(set);
                        let local = decide(&session, &operation);
                        let central = engine.authorize(&p, connection, role, &operation);
                        assert_eq!(
                            local, central,
                            "{} {connection} {role} {set:?}",
                            p.subject
                        );
                        *seen.entry(local.decision).or_default() += 1;
                        cases += 1;
                    }
                }
            }
        }
    }
    // The grid must exercise all three outcomes, or it proves little.
    for decision in [Decision::Allow, Decision::Deny, Decision::NeedsApproval] {
        assert!(seen.get(&decision).copied().unwrap_or(0) > 100, "{seen:?}");
    }
    assert!(cases > 50_000, "{cases}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decide_and_authorize_agree_on_random_operations(
        engine_index in 0usize..2,
        principal_index in 0usize..8,
        connection_index in 0usize..CONNECTIONS.len(),
        role_index in 0usize..ROLES.len(),
        class_indexes in proptest::collection::vec(0usize..27, 0..6),
    ) {
        let engine = &ENGINES[engine_index];
        let p = &principals()[principal_index];
        let classes = all_classes();
        let set: Vec<&str> = class_indexes.iter().map(|i| classes[*i % classes.len()]).collect();
        let (connection, role) = (CONNECTIONS[connection_index], ROLES[role_index]);
        let operation = op(&set);
        let local = decide(&engine.session_policy(p, connection, role), &operation);
        let central = engine.authorize(p, connection, role, &operation);
        prop_assert_eq!(local, central);
    }
}
