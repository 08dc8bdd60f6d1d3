//! Policy evaluation throughput, one core: the proxy's local `decide` (per operation), the
//! central `authorize` (Cedar per operation) and `session_policy` (once per session open),
//! all against the example policy shipped in deploy/.

use std::hint::black_box;
use std::path::Path;

use agentgate_policy::{PolicyEngine, decide};
use agentgate_proto::common::v1::{Operation, Principal, PrincipalKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn engine() -> PolicyEngine {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy.example.cedar");
    match PolicyEngine::load(&path) {
        Ok(engine) => engine,
        Err(e) => panic!("example policy: {e}"),
    }
}

fn principal() -> Principal {
    Principal {
        subject: "agent:ci".into(),
        kind: PrincipalKind::Agent as i32,
        groups: vec!["deployers".into(), "builders".into()],
        issuer: "agentgate".into(),
        token_id: "tok".into(),
    }
}

fn ops() -> Vec<Operation> {
    [
        &["sql.read"][..],
        &["sql.write"][..],
        &["sql.write", "sql.write.unbounded"][..],
        &["sql.ddl"][..],
        &["sql.dcl"][..],
        &[][..],
    ]
    .iter()
    .map(|classes| Operation {
        risk_classes: classes.iter().map(|c| (*c).to_owned()).collect(),
        text: "UPDATE accounts SET balance = 0".into(),
        ..Default::default()
    })
    .collect()
}

fn bench(c: &mut Criterion) {
    let engine = engine();
    let p = principal();
    let ops = ops();
    let session = engine.session_policy(&p, "prod-db", "write");

    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(ops.len() as u64));
    group.bench_function("decide (local, per operation)", |b| {
        b.iter(|| {
            for op in &ops {
                black_box(decide(black_box(&session), black_box(op)));
            }
        })
    });
    group.bench_function("authorize (Cedar, per operation)", |b| {
        b.iter(|| {
            for op in &ops {
                black_box(engine.authorize(black_box(&p), "prod-db", "write", black_box(op)));
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("session_policy, first time (per session open)", |b| {
        b.iter(|| black_box(engine.compute_session_policy(black_box(&p), "prod-db", "write")))
    });
    group.bench_function("session_policy, cached (per session open)", |b| {
        b.iter(|| black_box(engine.session_policy(black_box(&p), "prod-db", "write")))
    });
    group.bench_function("standing_access (per session open)", |b| {
        b.iter(|| black_box(engine.standing_access(black_box(&p), "prod-db", "read")))
    });
    group.bench_function("parse example policy (per reload)", |b| {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy.example.cedar"),
        )
        .unwrap_or_default();
        b.iter(|| black_box(PolicyEngine::parse(black_box(&text), "policy.cedar").is_ok()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
