//! The control plane as `agentgate up` wires it, in the test process: the audit store
//! (SQLite) checking tokens with authz's own authenticator, authz with a policy and a
//! connection catalog, and approvals recording with a token authz renews. Proxy tests and
//! benchmarks start their proxy on top of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate_authz::{AuthzConfig, ConnectionConfig, RunningAuthz};
use agentgate_identity::TokenRequest;
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{ListRequest, ReviewRequest, State, Verdict};
use agentgate_proto::common::v1::PrincipalKind;

use crate::{AuditClient, AuditStoreFixture, Backend, bearer, free_port};

/// A running control plane; everything stops when it is dropped.
pub struct ControlPlane {
    pub audit: AuditStoreFixture,
    pub authz: RunningAuthz,
    pub approvals: agentgate_approvals::RunningApprovals,
    /// authz's data directory (its keys, the policy file, token files).
    pub dir: tempfile::TempDir,
    /// The Cedar policy authz reloads when it changes.
    pub policy_path: PathBuf,
}

impl ControlPlane {
    /// Starts the audit store, authz with `policy` and `connections` (then `adjust`ed), and
    /// approvals (`adjust_approvals`ed; reasons not required unless it says so).
    pub async fn start(
        policy: &str,
        connections: Vec<ConnectionConfig>,
        adjust: impl FnOnce(&mut AuthzConfig),
        adjust_approvals: impl FnOnce(&mut agentgate_approvals::ApprovalsConfig),
    ) -> anyhow::Result<ControlPlane> {
        agentgate_tls::install_crypto_provider();
        // The store checks tokens with authz's authenticator once authz runs, as
        // `agentgate up` wires it.
        let authn = Arc::new(agentgate_identity::LateAuthenticator::new(
            "authz is starting",
        ));
        let audit = AuditStoreFixture::start_with(Backend::Sqlite, 100, authn.clone()).await?;
        let dir = tempfile::tempdir()?;
        let policy_path = dir.path().join("policy.cedar");
        std::fs::write(&policy_path, policy)?;
        // authz binds a port of the kernel's choosing (no race with parallel tests); the
        // approvals port must be known first, as authz's configuration names it.
        let approvals_port = free_port()?;
        let mut config = AuthzConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            policy: Some(policy_path.clone()),
            audit_url: Some(audit.endpoint()),
            approvals_url: Some(format!("http://127.0.0.1:{approvals_port}")),
            connections,
            ..Default::default()
        };
        adjust(&mut config);
        let authz = agentgate_authz::start(&config, dir.path()).await?;
        authn.set(authz.authenticator());
        let mut approvals_config = agentgate_approvals::ApprovalsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], approvals_port)),
            require_reason: false,
            audit: agentgate_approvals::config::AuditConfig {
                endpoint: audit.endpoint(),
                ..Default::default()
            },
            ..Default::default()
        };
        adjust_approvals(&mut approvals_config);
        let approvals = agentgate_approvals::start(
            &approvals_config,
            dir.path(),
            authz.authenticator(),
            Some(authz.recorder_token_source("approvals")),
            None,
        )
        .await?;
        Ok(ControlPlane {
            audit,
            authz,
            approvals,
            dir,
            policy_path,
        })
    }

    /// authz's gRPC address as a URL.
    pub fn authz_url(&self) -> String {
        format!("http://{}", self.authz.addr)
    }

    /// approvals' gRPC address as a URL.
    pub fn approvals_url(&self) -> String {
        format!("http://{}", self.approvals.addr)
    }

    /// A token authz signed for `subject` of `kind` in `groups`.
    pub fn token(
        &self,
        subject: &str,
        kind: PrincipalKind,
        groups: &[&str],
        ttl: Duration,
    ) -> anyhow::Result<String> {
        Ok(self
            .authz
            .core
            .issuer
            .issue(&TokenRequest {
                subject: subject.into(),
                kind,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                audience: Vec::new(),
                ttl,
            })?
            .0)
    }

    /// A file holding a service token for proxy `name`, as a proxy's `service_token_file`.
    pub fn service_token_file(&self, name: &str, ttl: Duration) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.test.token"));
        std::fs::write(&path, self.authz.service_token(name, ttl)?)?;
        Ok(path)
    }

    /// An audit-store client as an auditor.
    pub async fn auditor(&self) -> anyhow::Result<AuditClient> {
        let token = self.token(
            "human:audrey",
            PrincipalKind::Human,
            &["auditor"],
            Duration::from_secs(600),
        )?;
        self.audit.client_as(&token).await
    }

    /// Waits for a pending approval request whose operation text contains `text`, reviews it
    /// with `verdict` as a member of `reviewer_groups`, and returns its id.
    pub async fn review_pending(
        &self,
        text: &str,
        verdict: Verdict,
        reviewer_groups: &[&str],
    ) -> anyhow::Result<String> {
        let token = self.token(
            "human:dana",
            PrincipalKind::Human,
            reviewer_groups,
            Duration::from_secs(600),
        )?;
        review_pending(&self.approvals_url(), &token, text, verdict).await
    }
}

/// Waits (up to 20 s) for a pending approval request at `approvals_url` whose operation text
/// contains `text`, reviews it with `verdict` as the holder of `reviewer_token`, and returns
/// its id: what a reviewer does while a proxy holds an operation.
pub async fn review_pending(
    approvals_url: &str,
    reviewer_token: &str,
    text: &str,
    verdict: Verdict,
) -> anyhow::Result<String> {
    let mut client = ApprovalsClient::connect(approvals_url.to_owned()).await?;
    for _ in 0..400 {
        let list = client
            .list(bearer(
                reviewer_token,
                ListRequest {
                    state: State::Pending as i32,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        if let Some(r) = list
            .requests
            .iter()
            .find(|r| r.operation.as_ref().is_some_and(|o| o.text.contains(text)))
        {
            client
                .review(bearer(
                    reviewer_token,
                    ReviewRequest {
                        id: r.id.clone(),
                        verdict: verdict as i32,
                        comment: "reviewed in test".into(),
                    },
                ))
                .await?;
            return Ok(r.id.clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no pending approval for {text:?}")
}
