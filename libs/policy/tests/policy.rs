//! The policy engine against hand-written policies: load errors with their lines, standing
//! access, access requests, risk decisions, masking, and the example policy shipped in
//! deploy/.

use std::path::Path;
use std::time::Duration;

use agentgate_policy::{
    DEFAULT_APPROVAL_TIMEOUT, NO_RISK_CLASS, PolicyEngine, PolicyError, RISK_CLASSES, decide,
};
use agentgate_proto::authz::v1::{MaskingStrategy, masking_rule::Selector};
use agentgate_proto::common::v1::{Decision, Operation, Principal, PrincipalKind};

fn principal(subject: &str, kind: PrincipalKind, groups: &[&str]) -> Principal {
    Principal {
        subject: subject.into(),
        kind: kind as i32,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        issuer: "agentgate".into(),
        token_id: "t1".into(),
    }
}

fn agent(subject: &str, groups: &[&str]) -> Principal {
    principal(subject, PrincipalKind::Agent, groups)
}

fn human(subject: &str, groups: &[&str]) -> Principal {
    principal(subject, PrincipalKind::Human, groups)
}

fn op(classes: &[&str]) -> Operation {
    Operation {
        risk_classes: classes.iter().map(|c| (*c).to_owned()).collect(),
        ..Default::default()
    }
}

fn engine(text: &str) -> PolicyEngine {
    match PolicyEngine::parse(text, "policy.cedar") {
        Ok(engine) => engine,
        Err(e) => panic!("policy should load: {e}"),
    }
}

fn error(text: &str) -> PolicyError {
    match PolicyEngine::parse(text, "policy.cedar") {
        Ok(_) => panic!("policy should be refused:\n{text}"),
        Err(e) => e,
    }
}

fn example() -> PolicyEngine {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy.example.cedar");
    match PolicyEngine::load(&path) {
        Ok(engine) => engine,
        Err(e) => panic!("the example policy should load: {e}"),
    }
}

// ----- load errors ------------------------------------------------------------------------

#[test]
fn broken_syntax_is_refused_with_its_line() {
    let e = error(
        r#"permit (principal, action == Agentgate::Action::"connect", resource);

permit (principal action == Agentgate::Action::"connect", resource);
"#,
    );
    assert_eq!((e.source_name.as_str(), e.line), ("policy.cedar", 3), "{e}");
    assert!(e.column > 1, "{e}");
    assert!(e.to_string().starts_with("policy.cedar:3:"), "{e}");
}

#[test]
fn unknown_action_is_refused_by_the_schema_with_its_line() {
    let e = error(
        r#"// standing access
permit (principal, action == Agentgate::Action::"connect", resource);
permit (
  principal,
  action == Agentgate::Action::"exec",
  resource
);
"#,
    );
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("exec"), "{e}");
    assert!(
        !e.message.contains("policy1"),
        "Cedar's internal ids are not shown: {e}"
    );
}

#[test]
fn unknown_entity_type_and_attribute_are_refused() {
    let e = error(
        r#"permit (principal in Agentgate::Grup::"x", action == Agentgate::Action::"connect", resource);"#,
    );
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("Grup"), "{e}");

    let e = error(
        r#"
permit (principal, action == Agentgate::Action::"connect", resource)
when { context.rol == "read" };"#,
    );
    assert_eq!(e.line, 3, "{e}");
    // risk_class exists for execute but not for connect.
    let e = error(
        r#"
permit (principal, action == Agentgate::Action::"connect", resource)
when { context.risk_class == "sql.read" };"#,
    );
    assert_eq!(e.line, 3, "{e}");
}

#[test]
fn bad_annotation_values_are_refused_at_the_annotation() {
    let e = error(
        r#"permit (principal, action == Agentgate::Action::"connect", resource);

@id("ddl")
@approvers("dba")
@approvals("two")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" } unless { context.approved };
"#,
    );
    assert_eq!((e.line, e.column), (5, 1), "{e}");
    assert!(e.message.contains("@approvals"), "{e}");
    assert!(e.message.contains("two"), "{e}");

    for (text, line, needle) in [
        (
            "\n@max_duration(\"forever\") @approvers(\"a\")\npermit (principal, action == Agentgate::Action::\"request_access\", resource);",
            2,
            "@max_duration",
        ),
        (
            "@reason_required(\"yes\") @approvers(\"a\")\npermit (principal, action == Agentgate::Action::\"request_access\", resource);",
            1,
            "@reason_required",
        ),
        (
            "@approverz(\"a\")\npermit (principal, action == Agentgate::Action::\"request_access\", resource);",
            1,
            "unknown annotation",
        ),
        (
            "@max_duration(\"1h\")\npermit (principal, action == Agentgate::Action::\"connect\", resource);",
            1,
            "request_access",
        ),
        (
            "\n\n@mask(\"column:public.users.email\")\npermit (principal, action == Agentgate::Action::\"read_unmasked\", resource);",
            3,
            "forbid",
        ),
        (
            "@mask(\"detector:emails\")\nforbid (principal, action == Agentgate::Action::\"read_unmasked\", resource);",
            1,
            "unknown detector",
        ),
        (
            "@mask(\"column:users.email\")\nforbid (principal, action == Agentgate::Action::\"read_unmasked\", resource);",
            1,
            "schema.table.column",
        ),
        (
            "@mask(\"header:x-key\") @strategy(\"scramble\")\nforbid (principal, action == Agentgate::Action::\"read_unmasked\", resource);",
            1,
            "@strategy",
        ),
        (
            "forbid (principal, action == Agentgate::Action::\"read_unmasked\", resource);",
            1,
            "needs @mask",
        ),
        (
            "permit (principal, action == Agentgate::Action::\"request_access\", resource);",
            1,
            "@approvers",
        ),
    ] {
        let e = error(text);
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(needle), "{needle:?} not in {e}");
    }
}

#[test]
fn risk_class_typos_and_unknown_kinds_are_refused_at_the_literal() {
    let e = error(
        r#"permit (principal, action == Agentgate::Action::"execute", resource);
forbid (principal, action == Agentgate::Action::"execute", resource)
when {
  context.risk_class == "sql.ddl" ||
  ["sql.dcl", "sql.dll"].contains(context.risk_class)
};
"#,
    );
    assert_eq!((e.line, e.column), (5, 15), "{e}");
    assert!(e.message.contains("sql.dll"), "{e}");

    let e = error(
        r#"forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class like "sq.*" };"#,
    );
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("matches no risk class"), "{e}");

    let e = error(
        r#"permit (principal, action == Agentgate::Action::"connect", resource)
when { principal.kind == "bot" };"#,
    );
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("principal kind"), "{e}");
}

#[test]
fn approval_rules_must_say_who_approves_and_ids_are_unique() {
    let e = error(
        r#"
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" } unless { context.approved };"#,
    );
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("@approvers"), "{e}");

    let e = error(
        r#"@approvers("dba")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" };"#,
    );
    assert!(e.message.contains("context.approved"), "{e}");

    let e = error(
        r#"@id("a") permit (principal, action == Agentgate::Action::"connect", resource);
@id("a") permit (principal, action == Agentgate::Action::"connect", resource);"#,
    );
    assert_eq!((e.line, e.column), (2, 1), "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
}

#[test]
fn templates_and_unreadable_files_are_refused() {
    let e = error(
        r#"permit (principal == ?principal, action == Agentgate::Action::"connect", resource);"#,
    );
    assert!(e.message.contains("template"), "{e}");

    let missing = Path::new("/nonexistent/agentgate/policy.cedar");
    match PolicyEngine::load(missing) {
        Ok(_) => panic!("a missing file loads"),
        Err(e) => {
            assert_eq!(e.line, 0);
            assert!(
                e.to_string()
                    .starts_with("/nonexistent/agentgate/policy.cedar: cannot read")
            );
        }
    }
}

#[test]
fn an_empty_policy_denies_everything() {
    let engine = engine("// nothing yet\n");
    let p = agent("agent:x", &["deployers"]);
    assert!(!engine.standing_access(&p, "prod-db", "read"));
    assert!(engine.access_request_rule(&p, "prod-db", "read").is_none());
    let policy = engine.session_policy(&p, "prod-db", "read");
    assert_eq!(policy.default_decision, Decision::Deny as i32);
    assert!(
        policy
            .risk_rules
            .iter()
            .all(|r| r.decision == Decision::Deny as i32)
    );
    assert!(policy.masking_rules.is_empty());
    assert_eq!(decide(&policy, &op(&["sql.read"])).decision, Decision::Deny);
}

#[test]
fn version_is_a_hash_of_the_text() {
    let a = engine("permit (principal, action == Agentgate::Action::\"connect\", resource);");
    let b = engine("permit (principal, action == Agentgate::Action::\"connect\", resource);");
    let c = engine("permit (principal, action == Agentgate::Action::\"connect\", resource); ");
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert_eq!(a.version().len(), 12);
    assert!(a.version().chars().all(|c| c.is_ascii_hexdigit()));
}

// ----- standing access --------------------------------------------------------------------

#[test]
fn standing_access_by_group_and_by_subject() {
    let engine = example();
    let deployer = agent("agent:ci", &["deployers"]);
    let bot = agent("agent:deploy-bot", &[]);
    let stranger = agent("agent:other", &["analysts-not"]);
    let sre = human("human:sam@example.com", &["sre"]);

    assert!(engine.standing_access(&deployer, "prod-db", "read"));
    assert!(!engine.standing_access(&deployer, "prod-db", "write"));
    assert!(engine.standing_access(&deployer, "staging-db", "write"));
    assert!(engine.standing_access(&deployer, "web-1", "deploy"));
    assert!(!engine.standing_access(&deployer, "prod-k8s", "edit"));

    assert!(engine.standing_access(&bot, "prod-k8s", "edit"));
    assert!(!engine.standing_access(&bot, "prod-k8s", "view"));
    assert!(!engine.standing_access(&bot, "prod-db", "read"));

    assert!(!engine.standing_access(&stranger, "prod-db", "read"));

    assert!(engine.standing_access(&sre, "prod-db", "write"));
    // forbid wins over the sre permit: admin is never standing.
    assert!(!engine.standing_access(&sre, "prod-db", "admin"));
}

// ----- access requests --------------------------------------------------------------------

#[test]
fn access_request_rules_carry_their_annotations() {
    let engine = example();
    let deployer = agent("agent:ci", &["deployers"]);
    let rule = engine
        .access_request_rule(&deployer, "prod-db", "write")
        .expect("deployers may request write");
    assert_eq!(rule.max_duration, Duration::from_secs(3600));
    assert_eq!(rule.approver_groups, ["dba", "sre"]);
    assert_eq!(rule.approvals_required, 1);
    assert!(rule.reason_required);
    assert_eq!(rule.policy, "deployers-request-prod-write");

    assert!(
        engine
            .access_request_rule(&deployer, "prod-db", "admin")
            .is_none()
    );
    assert!(
        engine
            .access_request_rule(&deployer, "staging-db", "write")
            .is_none()
    );

    let sre_human = human("human:sam@example.com", &["sre"]);
    let rule = engine
        .access_request_rule(&sre_human, "prod-db", "admin")
        .expect("sre humans may request admin");
    assert_eq!(rule.max_duration, Duration::from_secs(1800));
    assert_eq!(rule.approvals_required, 2);
    assert!(rule.reason_required, "a bare @reason_required means true");
    // ... but an sre agent may not.
    let sre_agent = agent("agent:sre-bot", &["sre"]);
    assert!(
        engine
            .access_request_rule(&sre_agent, "prod-db", "admin")
            .is_none()
    );

    let bot = agent("agent:deploy-bot", &[]);
    let rule = engine
        .access_request_rule(&bot, "billing-api", "write")
        .expect("deploy-bot may request billing write");
    assert_eq!(rule.max_duration, Duration::from_secs(900));
    assert_eq!(rule.approvals_required, 1, "default");
    assert!(!rule.reason_required, "default");
}

#[test]
fn the_most_restrictive_matching_request_rule_applies() {
    let engine = engine(
        r#"
@id("broad") @approvers("sre") @max_duration("4h")
permit (principal in Agentgate::Group::"ops", action == Agentgate::Action::"request_access", resource);

@id("narrow") @approvers("dba") @approvals("2") @max_duration("30m")
permit (principal, action == Agentgate::Action::"request_access", resource == Agentgate::Connection::"prod-db");

@id("same-length") @approvers("x") @approvals("3") @max_duration("30m")
permit (principal == Agentgate::Principal::"agent:z", action == Agentgate::Action::"request_access", resource == Agentgate::Connection::"prod-db");
"#,
    );
    let ops = agent("agent:a", &["ops"]);
    let rule = engine
        .access_request_rule(&ops, "staging-db", "read")
        .expect("broad");
    assert_eq!(
        (rule.policy.as_str(), rule.max_duration),
        ("broad", Duration::from_secs(4 * 3600))
    );
    let rule = engine
        .access_request_rule(&ops, "prod-db", "read")
        .expect("narrow");
    assert_eq!(rule.policy, "narrow");
    let z = agent("agent:z", &["ops"]);
    let rule = engine
        .access_request_rule(&z, "prod-db", "read")
        .expect("same-length");
    assert_eq!(
        rule.policy, "same-length",
        "equal durations: more approvals wins"
    );
}

// ----- risk decisions ---------------------------------------------------------------------

#[test]
fn each_risk_decision_kind() {
    let engine = example();
    let deployer = agent("agent:ci", &["deployers"]);

    // allow
    let rule = engine.operation_rule(&deployer, "prod-db", "read", "sql.read");
    assert_eq!(rule.decision, Decision::Allow as i32);
    assert!(rule.approver_groups.is_empty());

    // deny: the role does not permit it
    let rule = engine.operation_rule(&deployer, "prod-db", "read", "sql.write");
    assert_eq!(rule.decision, Decision::Deny as i32);
    // deny: a hard forbid, whatever the role
    let rule = engine.operation_rule(&deployer, "prod-db", "admin", "sql.dcl");
    assert_eq!(rule.decision, Decision::Deny as i32);

    // needs approval, with who and how many
    let rule = engine.operation_rule(&deployer, "prod-db", "write", "sql.ddl");
    assert_eq!(rule.decision, Decision::NeedsApproval as i32);
    assert_eq!(rule.approver_groups, ["dba"]);
    assert_eq!(rule.approvals_required, 1);
    assert!(!rule.reason_required);
    // the same class on staging is simply allowed
    let rule = engine.operation_rule(&deployer, "staging-db", "write", "sql.ddl");
    assert_eq!(rule.decision, Decision::Allow as i32);
    // needing approval never lifts a role limit: DDL under role read stays denied
    let rule = engine.operation_rule(&deployer, "prod-db", "read", "sql.ddl");
    assert_eq!(rule.decision, Decision::Deny as i32);

    // principal kind matters: agents need approval to delete in prod-k8s, humans do not
    let bot = agent("agent:deploy-bot", &[]);
    let rule = engine.operation_rule(&bot, "prod-k8s", "edit", "k8s.delete");
    assert_eq!(rule.decision, Decision::NeedsApproval as i32);
    assert_eq!(rule.approver_groups, ["sre"]);
    assert!(rule.reason_required);
    let person = human("human:ana@example.com", &[]);
    let rule = engine.operation_rule(&person, "prod-k8s", "edit", "k8s.delete");
    assert_eq!(rule.decision, Decision::Allow as i32);

    // unclassified operations follow the "none" class
    let rule = engine.operation_rule(&deployer, "prod-db", "read", NO_RISK_CLASS);
    assert_eq!(rule.decision, Decision::Allow as i32);
}

#[test]
fn approvals_merge_over_the_policies_behind_a_rule() {
    let engine = engine(
        r#"
permit (principal, action == Agentgate::Action::"execute", resource);

@approvers("dba") @approvals("1") @approval_timeout("20m")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class like "sql.*" && context.risk_class != "sql.read" }
unless { context.approved };

@approvers("sre, security") @approvals("2") @reason_required("true") @approval_timeout("3m")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" }
unless { context.approved };

// Everything on "vault" waits for its owners.
@approvers("vault-owners")
forbid (principal, action == Agentgate::Action::"execute", resource == Agentgate::Connection::"vault")
unless { context.approved };
"#,
    );
    let p = agent("agent:a", &[]);
    let rule = engine.operation_rule(&p, "db", "write", "sql.ddl");
    assert_eq!(rule.decision, Decision::NeedsApproval as i32);
    assert_eq!(rule.approver_groups, ["dba", "security", "sre"]);
    assert_eq!(rule.approvals_required, 2);
    assert!(rule.reason_required);
    let rule = engine.operation_rule(&p, "db", "write", "sql.write");
    assert_eq!(rule.approver_groups, ["dba"]);
    assert_eq!(rule.approvals_required, 1);

    // the session's timeout is the shortest of its approval rules
    let policy = engine.session_policy(&p, "db", "write");
    assert_eq!(policy.approval_timeout.map(|d| d.seconds), Some(180));
    // with no approval rule in the session, the default
    let policy = engine.session_policy(&p, "vault", "write");
    assert!(
        policy
            .risk_rules
            .iter()
            .all(|r| r.decision == Decision::NeedsApproval as i32),
        "{policy:?}"
    );
    let engine2 =
        self::engine(r#"permit (principal, action == Agentgate::Action::"execute", resource);"#);
    let policy = engine2.session_policy(&p, "db", "write");
    assert_eq!(
        policy.approval_timeout.map(|d| d.seconds),
        Some(i64::try_from(DEFAULT_APPROVAL_TIMEOUT.as_secs()).expect("fits"))
    );
}

#[test]
fn a_permit_that_needs_approval_yields_needs_approval() {
    let engine = engine(
        r#"
@approvers("oncall") @approvals("2")
permit (principal in Agentgate::Group::"ops", action == Agentgate::Action::"execute", resource)
when { context.risk_class == "ssh.destructive" && context.approved };
"#,
    );
    let ops = agent("agent:a", &["ops"]);
    let rule = engine.operation_rule(&ops, "web-1", "deploy", "ssh.destructive");
    assert_eq!(rule.decision, Decision::NeedsApproval as i32);
    assert_eq!(rule.approver_groups, ["oncall"]);
    assert_eq!(rule.approvals_required, 2);
    let other = agent("agent:b", &[]);
    let rule = engine.operation_rule(&other, "web-1", "deploy", "ssh.destructive");
    assert_eq!(rule.decision, Decision::Deny as i32);
}

#[test]
fn session_policy_covers_every_class_and_decides_locally() {
    let engine = example();
    let deployer = agent("agent:ci", &["deployers"]);
    let policy = engine.session_policy(&deployer, "prod-db", "write");
    assert_eq!(policy.version, engine.version());
    assert_eq!(policy.risk_rules.len(), RISK_CLASSES.len() + 1);
    for class in RISK_CLASSES.iter().chain([&NO_RISK_CLASS]) {
        assert!(
            policy.risk_rules.iter().any(|r| r.risk_class == *class),
            "no rule for {class}"
        );
    }
    assert_eq!(policy.default_decision, Decision::Allow as i32);
    assert_eq!(policy.approval_timeout.map(|d| d.seconds), Some(15 * 60));

    let d = decide(&policy, &op(&["sql.write"]));
    assert_eq!(d.decision, Decision::Allow, "{}", d.reason);
    let d = decide(&policy, &op(&["sql.write", "sql.write.unbounded"]));
    assert_eq!(d.decision, Decision::NeedsApproval, "{}", d.reason);
    assert_eq!(
        d.rule.as_ref().map(|r| r.risk_class.as_str()),
        Some("sql.write.unbounded")
    );
    assert!(d.reason.contains("dba"), "{}", d.reason);
    let d = decide(&policy, &op(&["sql.ddl", "sql.dcl"]));
    assert_eq!(d.decision, Decision::Deny, "deny beats needs approval");
    assert_eq!(
        d.rule.as_ref().map(|r| r.risk_class.as_str()),
        Some("sql.dcl")
    );
    let d = decide(&policy, &op(&["sql.teleport"]));
    assert_eq!(d.decision, Decision::Deny);
    assert!(d.reason.contains("unknown risk class"), "{}", d.reason);
    let d = decide(&policy, &op(&[]));
    assert_eq!(d.decision, Decision::Allow);
}

// ----- masking ----------------------------------------------------------------------------

#[test]
fn masking_rules_follow_principal_connection_and_file_order() {
    let engine = example();
    let bot = agent("agent:ci", &["deployers"]);
    let rules = engine.masking_rules(&bot, "prod-db", "read");
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "customer-email#1",
            "customer-email#2",
            "card-numbers#1",
            "card-numbers#2",
            "user-ids-hashed",
            "api-keys#1",
            "api-keys#2",
            "api-keys#3",
            "api-keys#4",
        ]
    );
    assert_eq!(
        rules[0].selector,
        Some(Selector::Column("public.customers.email".into()))
    );
    assert_eq!(rules[0].strategy, MaskingStrategy::Partial as i32);
    assert_eq!(
        rules[1].selector,
        Some(Selector::JsonPath("$.customer.email".into()))
    );
    assert_eq!(
        rules[3].selector,
        Some(Selector::Detector("payment_card".into()))
    );
    assert_eq!(rules[4].strategy, MaskingStrategy::KeyedHash as i32);
    assert_eq!(
        rules[5].selector,
        Some(Selector::Header("x-api-key".into()))
    );
    assert_eq!(rules[5].strategy, MaskingStrategy::Redact as i32, "default");
    assert_eq!(
        rules[6].selector,
        Some(Selector::KubernetesField("Secret.data".into()))
    );

    // hashed national ids: agents on prod-db only
    let on_staging = engine.masking_rules(&bot, "staging-db", "read");
    assert!(on_staging.iter().all(|r| r.name != "user-ids-hashed"));
    let person = human("human:lee@example.com", &["support-leads"]);
    let for_lead = engine.masking_rules(&person, "prod-db", "read");
    assert!(for_lead.iter().all(|r| r.name != "user-ids-hashed"));
    // the support-leads exception lifts the email masks
    assert!(
        for_lead
            .iter()
            .all(|r| !r.name.starts_with("customer-email"))
    );
    assert!(for_lead.iter().any(|r| r.name.starts_with("card-numbers")));

    // and the session policy carries them
    let policy = engine.session_policy(&bot, "prod-db", "read");
    assert_eq!(policy.masking_rules, rules);
}

#[test]
fn masks_can_depend_on_role() {
    let engine = engine(
        r#"
@id("ssn") @mask("column:*.*.ssn")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource)
unless { context.role == "admin" };
"#,
    );
    let p = agent("agent:a", &[]);
    assert_eq!(engine.masking_rules(&p, "db", "read").len(), 1);
    assert!(engine.masking_rules(&p, "db", "admin").is_empty());
}

#[test]
fn authorize_matches_decide_on_the_example() {
    let engine = example();
    let p = agent("agent:deploy-bot", &["deployers"]);
    for classes in [
        &[][..],
        &["k8s.read"][..],
        &["k8s.delete", "k8s.read"][..],
        &["k8s.rbac"][..],
        &["bogus"][..],
    ] {
        let operation = op(classes);
        let local = decide(&engine.session_policy(&p, "prod-k8s", "edit"), &operation);
        let central = engine.authorize(&p, "prod-k8s", "edit", &operation);
        assert_eq!(local, central, "{classes:?}");
    }
}

#[test]
fn session_policies_are_cached_per_identity_connection_and_role() {
    let engine = example();
    let a = agent("agent:ci", &["deployers", "builders"]);
    let b = agent("agent:ci", &["builders", "deployers"]);
    let first = engine.session_policy(&a, "prod-db", "write");
    assert_eq!(first, engine.compute_session_policy(&a, "prod-db", "write"));
    assert_eq!(engine.session_policy(&b, "prod-db", "write"), first);
    // a different role, group set or kind is a different entry
    assert_ne!(engine.session_policy(&a, "prod-db", "read"), first);
    let lead = agent("agent:ci", &["support-leads"]);
    assert_ne!(engine.session_policy(&lead, "prod-db", "write"), first);
    let person = human("agent:ci", &["deployers", "builders"]);
    assert_ne!(engine.session_policy(&person, "prod-db", "write"), first);
}

#[test]
fn engine_and_store_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicyEngine>();
    assert_send_sync::<agentgate_policy::PolicyStore>();
}

#[test]
fn the_docs_show_the_example_policy_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let docs = std::fs::read_to_string(root.join("docs/policy.md")).expect("docs/policy.md");
    let example =
        std::fs::read_to_string(root.join("deploy/policy.example.cedar")).expect("example");
    assert!(
        docs.contains(&format!("```cedar\n{example}```")),
        "docs/policy.md must end with deploy/policy.example.cedar, verbatim"
    );
}
