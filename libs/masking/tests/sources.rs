//! Rules by source (column, JSON path, header, Kubernetes field), strategies, configuration
//! and the report.

use agentgate_masking::{
    CellPlan, ConfigError, DetectorKind, HashKey, MaskReport, Masker, MaskingConfig, REDACTED,
    RuleConfig, Selector, Strategy,
};
use base64::Engine as _;
use serde_json::json;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn rule(name: &str, selector: Selector, strategy: Strategy) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        selector,
        strategy,
    }
}

fn masker(rules: Vec<RuleConfig>) -> Masker {
    let key = HashKey::new(KEY).expect("key");
    Masker::new(&MaskingConfig { rules }, Some(key)).expect("config")
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf-8")
}

#[test]
fn columns_by_plan() {
    let m = masker(vec![
        rule(
            "customer-email",
            Selector::Column("public.customers.email".into()),
            Strategy::Partial,
        ),
        rule(
            "any-ssn",
            Selector::Column("*.*.ssn".into()),
            Strategy::Redact,
        ),
        rule(
            "customer-id-hash",
            Selector::Column("public.customers.national_id".into()),
            Strategy::Hash,
        ),
        rule(
            "emails",
            Selector::Detector(DetectorKind::Email),
            Strategy::Redact,
        ),
    ]);
    let mut r = MaskReport::new();
    let email = m.column_plan("public", "customers", "email");
    assert!(email.is_rule());
    assert_eq!(
        text(&m.mask_cell(email, b"ann@example.com", &mut r)),
        "***@example.com"
    );
    // a source rule masks the whole value, whatever it looks like
    assert_eq!(
        text(&m.mask_cell(email, b"not an address", &mut r)),
        "*** ** ****ess"
    );
    let ssn = m.column_plan("hr", "People", "SSN");
    assert_eq!(text(&m.mask_cell(ssn, b"123-45-6789", &mut r)), REDACTED);
    let id = m.column_plan("public", "customers", "national_id");
    let a = m.mask_cell(id, b"AB123456", &mut r).into_owned();
    let b = m.mask_cell(id, b"AB123456", &mut r).into_owned();
    let c = m.mask_cell(id, b"AB123457", &mut r).into_owned();
    assert_eq!(a, b, "equal values hash equal: joins still work");
    assert_ne!(a, c);
    assert!(text(&a).starts_with("[HMAC:") && a.len() == "[HMAC:]".len() + 16);
    // unknown origin (computed column): detectors
    let computed = m.column_plan("", "", "?column?");
    assert_eq!(computed, CellPlan::CONTENT);
    assert_eq!(
        text(&m.mask_cell(computed, b"x ann@example.com", &mut r)),
        "x [REDACTED]"
    );
    assert_eq!(r.count("customer-email"), 2);
    assert_eq!(r.count("any-ssn"), 1);
    assert_eq!(r.count("customer-id-hash"), 3);
    assert_eq!(r.count("emails"), 1);
    assert_eq!(r.total(), 7);
}

#[test]
fn partial_keeps_the_useful_part_by_format() {
    let m = masker(vec![rule(
        "p",
        Selector::Column("*.*.*".into()),
        Strategy::Partial,
    )]);
    let plan = m.column_plan("s", "t", "c");
    let mut r = MaskReport::new();
    let cases: &[(&str, &str)] = &[
        ("4111 1111 1111 1111", "**** **** **** 1111"),
        ("5555555555554444", "************4444"),
        ("123-45-6789", "***-**-6789"),
        ("+1 415 555 2671", "+* *** *** 2671"),
        ("DE89 3704 0044 0532 0130 00", "DE** **** **** **** **30 00"),
        ("192.168.10.20", "192.168.*.*"),
        ("2001:db8::1", "2001:db8:****"),
        (" ann@example.com ", " ***@example.com "),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_****"),
        ("Jane Doe", "**** ***"),
        ("Jane Q. Public", "**** *. ****ic"),
        ("short", "*****"),
        ("", ""),
    ];
    for (input, want) in cases {
        assert_eq!(
            text(&m.mask_cell(plan, input.as_bytes(), &mut r)),
            *want,
            "{input}"
        );
    }
    // invalid UTF-8 is masked byte-wise, never panics
    let out = m.mask_cell(plan, b"\xff\xfeabc\xc3 defgh", &mut r);
    assert_eq!(&out[..], b"****** ***gh" as &[u8]);
}

#[test]
fn headers() {
    let m = masker(vec![
        rule(
            "auth",
            Selector::Header("Authorization".into()),
            Strategy::Redact,
        ),
        rule(
            "secrets",
            Selector::Header("x-secret-*".into()),
            Strategy::Hash,
        ),
        rule(
            "jwt",
            Selector::Detector(DetectorKind::Jwt),
            Strategy::Redact,
        ),
    ]);
    let mut r = MaskReport::new();
    assert_eq!(
        text(&m.mask_header("authorization", b"Basic YWxhZGRpbjpvcGVu", &mut r)),
        REDACTED
    );
    assert!(text(&m.mask_header("X-Secret-Token", b"abc", &mut r)).starts_with("[HMAC:"));
    let jwt = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    assert_eq!(
        text(&m.mask_header("x-forwarded-token", jwt, &mut r)),
        REDACTED
    );
    assert_eq!(
        &m.mask_header("content-type", b"application/json", &mut r)[..],
        b"application/json"
    );
    assert_eq!(
        (r.count("auth"), r.count("secrets"), r.count("jwt")),
        (1, 1, 1)
    );
}

#[test]
fn json_paths_and_detectors() {
    let m = masker(vec![
        rule(
            "user-email",
            Selector::JsonPath("$.user.email".into()),
            Strategy::Partial,
        ),
        rule(
            "passwords",
            Selector::JsonPath("**.password".into()),
            Strategy::Redact,
        ),
        rule(
            "cards",
            Selector::JsonPath("orders[*].card".into()),
            Strategy::Partial,
        ),
        rule(
            "salary",
            Selector::JsonPath("user.salary".into()),
            Strategy::Hash,
        ),
        rule(
            "ssn",
            Selector::Detector(DetectorKind::UsSsn),
            Strategy::Redact,
        ),
        rule(
            "ip",
            Selector::Detector(DetectorKind::Ipv4),
            Strategy::Redact,
        ),
    ]);
    let mut v = json!({
        "user": {
            "email": "ann@example.com",
            "salary": 123456,
            "note": "ssn 123-45-6789 on file",
            "creds": {"Password": "hunter2", "nested": [{"password": {"a": "x", "b": 7}}]},
        },
        "orders": [
            {"id": 1, "card": {"number": "4111111111111111", "brand": "visa"}},
            {"id": 2, "card": "5555 5555 5555 4444"},
        ],
        "peers": ["10.0.0.1", "example.org", true, null],
        "count": 3,
    });
    let mut r = MaskReport::new();
    m.mask_json(&mut v, &mut r);
    assert_eq!(v["user"]["email"], "***@example.com");
    assert!(
        v["user"]["salary"]
            .as_str()
            .is_some_and(|s| s.starts_with("[HMAC:"))
    );
    assert_eq!(v["user"]["note"], "ssn [REDACTED] on file");
    assert_eq!(v["user"]["creds"]["Password"], REDACTED);
    assert_eq!(
        v["user"]["creds"]["nested"][0]["password"],
        json!({"a": REDACTED, "b": REDACTED})
    );
    assert_eq!(v["orders"][0]["card"]["number"], "************1111");
    assert_eq!(v["orders"][0]["card"]["brand"], "****");
    assert_eq!(v["orders"][1]["card"], "**** **** **** 4444");
    assert_eq!(v["orders"][0]["id"], 1);
    assert_eq!(v["peers"], json!([REDACTED, "example.org", true, null]));
    assert_eq!(v["count"], 3);
    assert_eq!(r.count("passwords"), 3);
    assert_eq!(r.count("cards"), 3);
    assert_eq!((r.count("ssn"), r.count("ip")), (1, 1));
}

#[test]
fn kubernetes_secrets_lists_and_last_applied() {
    let m = Masker::new(&MaskingConfig::recommended(), None).expect("config");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "db",
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration":
                    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "Secret",
                        "data": {"password": b64("hunter2")}, "metadata": {"name": "db"}}))
                        .expect("json"),
            },
        },
        "data": {"password": b64("hunter2"), "user": b64("app")},
        "stringData": {"token": "plain"},
        "type": "Opaque",
    });
    let mut list = json!({"apiVersion": "v1", "kind": "SecretList", "items": [secret.clone()]});
    let mut r = MaskReport::new();
    m.mask_kubernetes(&mut list, &mut r);
    let item = &list["items"][0];
    // still valid base64, decoding to the marker
    assert_eq!(item["data"]["password"], b64(REDACTED));
    assert_eq!(item["data"]["user"], b64(REDACTED));
    assert_eq!(item["stringData"]["token"], REDACTED);
    assert_eq!(item["type"], "Opaque");
    let annotation =
        item["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .expect("annotation stays a string");
    assert!(!annotation.contains(&b64("hunter2")), "{annotation}");
    assert!(annotation.contains(&b64(REDACTED)));
    assert_eq!(r.count("kubernetes:secret-data"), 3);

    // a watch event carries the object under "object"; items without kind take the list's
    let mut event = json!({"type": "ADDED", "object": secret});
    m.mask_kubernetes(&mut event, &mut r);
    assert_eq!(event["object"]["data"]["password"], b64(REDACTED));
    let mut bare_items = json!({"kind": "SecretList", "items": [{"data": {"k": b64("v")}}]});
    m.mask_kubernetes(&mut bare_items, &mut r);
    assert_eq!(bare_items["items"][0]["data"]["k"], b64(REDACTED));

    // other kinds: field rules by kind, detectors elsewhere
    let m = masker(vec![
        rule(
            "env",
            Selector::KubernetesField("Pod.spec.containers.env.value".into()),
            Strategy::Redact,
        ),
        rule(
            "email",
            Selector::Detector(DetectorKind::Email),
            Strategy::Partial,
        ),
    ]);
    let mut pod = json!({"kind": "Pod", "spec": {"containers": [{"name": "app",
        "env": [{"name": "DB_PASSWORD", "value": "s3cret"}], "args": ["--admin=ann@example.com"]}]}});
    m.mask_kubernetes(&mut pod, &mut r);
    assert_eq!(pod["spec"]["containers"][0]["env"][0]["value"], REDACTED);
    assert_eq!(
        pod["spec"]["containers"][0]["env"][0]["name"],
        "DB_PASSWORD"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["args"][0],
        "--admin=***@example.com"
    );
    let mut cm = json!({"kind": "ConfigMap", "data": {"value": "s3cret"}});
    m.mask_kubernetes(&mut cm, &mut r);
    assert_eq!(
        cm["data"]["value"], "s3cret",
        "Pod rule does not apply to a ConfigMap"
    );
}

#[test]
fn config_from_toml_and_json() {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    let toml = r#"
        [[rules]]
        name = "customer-email"
        selector = { column = "public.customers.email" }
        strategy = "partial"

        [[rules]]
        name = "cards"
        selector = { detector = "payment_card" }
        strategy = "redact"

        [[rules]]
        name = "k8s-secrets"
        selector = { kubernetes_field = "Secret.data" }
        strategy = "hash"
    "#;
    let config: MaskingConfig = Figment::from(Toml::string(toml)).extract().expect("toml");
    assert_eq!(config.rules.len(), 3);
    assert_eq!(
        config.rules[1].selector,
        Selector::Detector(DetectorKind::PaymentCard)
    );
    assert_eq!(config.rules[2].strategy, Strategy::Hash);
    let json = serde_json::to_string(&config).expect("serialize");
    let back: MaskingConfig = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, config);
    assert!(
        serde_json::from_str::<MaskingConfig>(
            r#"{"rules": [{"name": "x",
        "selector": {"detector": "no_such_thing"}, "strategy": "redact"}]}"#
        )
        .is_err()
    );
    assert!(serde_json::from_str::<MaskingConfig>(r#"{"rules": [], "extra": 1}"#).is_err());
    let recommended = MaskingConfig::recommended();
    let json = serde_json::to_string(&recommended).expect("serialize");
    assert_eq!(
        serde_json::from_str::<MaskingConfig>(&json).expect("parse"),
        recommended
    );
}

#[test]
fn config_errors_say_what_to_do() {
    let cfg = |rules| MaskingConfig { rules };
    let err = |c: MaskingConfig, key: Option<HashKey>| Masker::new(&c, key).expect_err("must fail");
    let hashed = rule("h", Selector::Header("x".into()), Strategy::Hash);
    assert_eq!(
        err(cfg(vec![hashed.clone()]), None),
        ConfigError::MissingHashKey { rule: "h".into() }
    );
    assert!(Masker::new(&cfg(vec![hashed]), Some(HashKey::new(KEY).expect("key"))).is_ok());
    assert_eq!(
        HashKey::new(&b"short"[..]).expect_err("weak"),
        ConfigError::WeakHashKey { len: 5 }
    );
    let dup = vec![
        rule("a", Selector::Header("x".into()), Strategy::Redact),
        rule("a", Selector::Header("y".into()), Strategy::Redact),
    ];
    assert_eq!(err(cfg(dup), None), ConfigError::DuplicateName("a".into()));
    assert_eq!(
        err(
            cfg(vec![rule(
                " ",
                Selector::Header("x".into()),
                Strategy::Redact
            )]),
            None
        ),
        ConfigError::EmptyName { index: 0 }
    );
    for bad in [
        Selector::Column("users.email".into()),
        Selector::JsonPath("a..b".into()),
        Selector::JsonPath("$".into()),
        Selector::KubernetesField("Secret".into()),
        Selector::Header("".into()),
    ] {
        let e = err(cfg(vec![rule("r", bad.clone(), Strategy::Redact)]), None);
        assert!(matches!(e, ConfigError::Selector { .. }), "{bad:?}: {e}");
    }
    assert!(format!("{:?}", HashKey::new(KEY).expect("key")).contains("32 bytes"));
    assert!(!format!("{:?}", HashKey::new(KEY).expect("key")).contains("0123"));
}

#[test]
fn first_rule_wins_and_report_serializes_names_only() {
    let m = masker(vec![
        rule(
            "cards-hashed",
            Selector::Detector(DetectorKind::PaymentCard),
            Strategy::Hash,
        ),
        rule(
            "cards-redacted",
            Selector::Detector(DetectorKind::PaymentCard),
            Strategy::Redact,
        ),
    ]);
    let mut r = MaskReport::new();
    let out = m.mask_text("a 4111111111111111 b 4111111111111111", &mut r);
    assert!(out.starts_with("a [HMAC:"));
    assert_eq!(r.count("cards-hashed"), 2);
    assert_eq!(r.count("cards-redacted"), 0);
    let json = serde_json::to_string(&r).expect("serialize");
    assert_eq!(json, r#"{"cards-hashed":2}"#);
    let mut total = MaskReport::new();
    total.merge(&r);
    total.merge(&r);
    assert_eq!(total.iter().collect::<Vec<_>>(), vec![("cards-hashed", 4)]);
    total.clear();
    assert!(total.is_empty());
}

#[test]
fn different_keys_give_different_tags() {
    let rules = vec![rule("h", Selector::Header("x".into()), Strategy::Hash)];
    let a = Masker::new(
        &MaskingConfig {
            rules: rules.clone(),
        },
        Some(HashKey::new(KEY).expect("k")),
    )
    .expect("config");
    let b = Masker::new(
        &MaskingConfig { rules },
        Some(HashKey::new(vec![7u8; 32]).expect("k")),
    )
    .expect("config");
    let mut r = MaskReport::new();
    assert_ne!(
        a.mask_header("x", b"v", &mut r),
        b.mask_header("x", b"v", &mut r)
    );
}

#[test]
fn noop_masker_borrows() {
    let m = Masker::new(&MaskingConfig::default(), None).expect("config");
    assert!(m.is_noop());
    let mut r = MaskReport::new();
    assert!(matches!(
        m.mask_text("ann@example.com", &mut r),
        std::borrow::Cow::Borrowed(_)
    ));
}
