//! The proxy's local decision (`decide` over the session policy) and authz's central one
//! (`authorize`, Cedar directly) must agree on every case: the issue's "both paths agree".
//! Checked exhaustively over a grid of principals × connections × roles × every single class
//! and chosen combinations, and with proptest over random sets of classes (including unknown ones).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

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
        mk("service:etl", PrincipalKind::Service, &["analysts"]),
        mk("", PrincipalKind::Unspecified, &[]),
    ]
}

const CONNECTIONS: &[&str] = &["prod-db", "staging-db", "web-1", "prod-k8s", "vault"];
const ROLES: &[&str] = &["read", "write", "admin", "edit", ""];

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

/// Session policies, computed once per (engine, principal, connection, role).
/// (engine, principal, connection, role) indexes.
type SessionKey = (usize, usize, usize, usize);

static SESSIONS: LazyLock<Mutex<HashMap<SessionKey, SessionPolicy>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn session(e: usize, p: usize, c: usize, r: usize) -> SessionPolicy {
    let mut sessions = SESSIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    sessions
        .entry((e, p, c, r))
        .or_insert_with(|| ENGINES[e].session_policy(&principals()[p], CONNECTIONS[c], ROLES[r]))
        .clone()
}

#[test]
fn decide_and_authorize_agree_on_the_grid() {
    let classes = all_classes();
    let mut sets: Vec<Vec<&str>> = vec![vec![]];
    sets.extend(classes.iter().map(|c| vec![*c]));
    sets.extend(
        [
            &["sql.write", "sql.write.unbounded"][..],
            &["sql.read", "sql.ddl"][..],
            &["sql.ddl", "sql.dcl"][..],
            &["sql.opaque_code", "sql.write"][..],
            &["ssh.exec", "ssh.destructive"][..],
            &["ssh.shell", "ssh.sftp"][..],
            &["k8s.read", "k8s.secrets"][..],
            &["k8s.delete", "k8s.exec"][..],
            &["http.read", "http.write", "http.websocket"][..],
            &["sql.read", "ssh.exec", "k8s.delete"][..],
            &["sql.write", "bogus.class"][..],
            &["none", "sql.read"][..],
        ]
        .map(<[&str]>::to_vec),
    );

    let mut cases = 0usize;
    let mut seen = HashMap::<Decision, usize>::new();
    let people = principals();
    for (e, engine) in ENGINES.iter().enumerate() {
        for (pi, p) in people.iter().enumerate() {
            for (ci, connection) in CONNECTIONS.iter().enumerate() {
                for (ri, role) in ROLES.iter().enumerate() {
                    let session = session(e, pi, ci, ri);
                    for set in &sets {
                        let operation = op(set);
                        let local = decide(&session, &operation);
                        let central = engine.authorize(p, connection, role, &operation);
                        assert_eq!(local, central, "{} {connection} {role} {set:?}", p.subject);
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
    assert!(cases > 10_000, "{cases}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn decide_and_authorize_agree_on_random_operations(
        e in 0usize..2,
        pi in 0usize..6,
        ci in 0usize..CONNECTIONS.len(),
        ri in 0usize..ROLES.len(),
        class_indexes in proptest::collection::vec(0usize..27, 0..6),
    ) {
        let classes = all_classes();
        let set: Vec<&str> = class_indexes.iter().map(|i| classes[*i % classes.len()]).collect();
        let operation = op(&set);
        let local = decide(&session(e, pi, ci, ri), &operation);
        let central = ENGINES[e].authorize(&principals()[pi], CONNECTIONS[ci], ROLES[ri], &operation);
        prop_assert_eq!(local, central);
    }
}
