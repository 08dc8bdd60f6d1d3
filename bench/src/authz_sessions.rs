//! OpenSession over gRPC: how many sessions per second authz opens for concurrent proxies,
//! and at what latency. authz runs in this process on SQLite (the default store), with a
//! policy that grants standing access, so every call verifies a token, evaluates Cedar for
//! the session policy, stores the session and answers.
//!
//! `cargo run --release -p agentgate-bench --bin authz-sessions -- --clients 8 --seconds 10`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentgate_authz::client::AuthzClient;
use agentgate_authz::{AuthzConfig, ConnectionConfig, UpstreamConfig};
use agentgate_identity::TokenRequest;
use agentgate_proto::authz::v1::credential::Kind;
use agentgate_proto::authz::v1::{ClientInfo, Credential};
use agentgate_proto::common::v1::{PrincipalKind, Protocol};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Concurrent proxies, each with its own connection.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long to measure (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"prod-db")
when { context.role == "read" };
@id("read-ops")
permit (principal, action == Agentgate::Action::"execute", resource)
when { ["sql.read", "none"].contains(context.risk_class) };
@id("ddl") @approvers("dba")
forbid (principal, action == Agentgate::Action::"execute", resource)
when { context.risk_class == "sql.ddl" } unless { context.approved };
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    agentgate_tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.cedar");
    std::fs::write(&policy, POLICY)?;
    let config = AuthzConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        policy: Some(policy),
        connections: vec![ConnectionConfig {
            name: "prod-db".into(),
            protocol: "postgres".into(),
            upstream: "127.0.0.1:5432".into(),
            roles: [(
                "read".to_string(),
                UpstreamConfig {
                    user: "agent_ro".into(),
                    secret: None,
                },
            )]
            .into_iter()
            .collect(),
            settings: Default::default(),
        }],
        ..Default::default()
    };
    let authz = agentgate_authz::start(&config, dir.path()).await?;
    let url = format!("http://{}", authz.addr);
    let service = authz.service_token("bench", Duration::from_secs(3600))?;
    let (agent, _) = authz.core.issuer.issue(&TokenRequest {
        subject: "agent:bench".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["agents".into()],
        audience: vec![],
        ttl: Duration::from_secs(3600),
    })?;

    let warmup = Instant::now() + Duration::from_secs(1);
    let end = warmup + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let client = AuthzClient::new(&url, &service, None)?;
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let opened = client
                    .open_session(
                        Credential {
                            kind: Some(Kind::Password(agent.clone())),
                        },
                        "prod-db",
                        "read",
                        Protocol::Postgres,
                        "127.0.0.1:1",
                        ClientInfo::default(),
                    )
                    .await?;
                if t >= warmup {
                    latencies.push(t.elapsed());
                }
                client.close_session(&opened.session_id, "bench").await?;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "OpenSession: {} clients, {} s: {:.0} sessions/s, p50 {:.2} ms, p99 {:.2} ms",
        args.clients,
        args.seconds,
        all.len() as f64 / args.seconds as f64,
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0
    );
    authz.shutdown().await
}
