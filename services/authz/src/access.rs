//! Just-in-time access: an agent asks for a role on a connection for a while; authz creates
//! an approval request in the approvals service on its behalf (as a service principal, with
//! the reviewers policy names), watches it, and when it is approved creates a grant from the
//! approval time for the granted duration.

use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::TokenRequest;
use agentgate_proto::approvals::v1::approvals_client::ApprovalsClient;
use agentgate_proto::approvals::v1::{
    ApprovalRequest, CreateRequest, RequestKind, State, Verdict, WatchRequest,
};
use agentgate_proto::authz::v1::GrantSource;
use agentgate_proto::common::v1::{Principal, PrincipalKind};
use tonic::transport::{Channel, Endpoint};

use crate::core::{Core, Refusal};
use crate::store::{AccessRequestRow, GrantRow};
use crate::{now_us, timestamp_us};

/// The approvals side of access requests.
pub struct AccessRequests {
    endpoint: Option<Endpoint>,
}

impl AccessRequests {
    pub fn new(approvals_url: Option<&str>) -> anyhow::Result<AccessRequests> {
        let endpoint = match approvals_url {
            Some(url) => Some(
                Endpoint::from_shared(url.to_owned())
                    .map_err(|e| anyhow::anyhow!("approvals URL {url:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(5)),
            ),
            None => None,
        };
        Ok(AccessRequests { endpoint })
    }

    async fn client(&self) -> Result<ApprovalsClient<Channel>, Refusal> {
        let endpoint = self.endpoint.as_ref().ok_or_else(|| {
            Refusal::Invalid(
                "access requests need the approvals service, which is not configured".into(),
            )
        })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Refusal::Storage(format!("approvals service unreachable: {e}")))?;
        Ok(ApprovalsClient::new(channel))
    }

    /// A short-lived token authz presents to approvals as itself.
    fn service_token(core: &Core) -> Result<String, Refusal> {
        core.issuer
            .issue(&TokenRequest {
                subject: "service:authz".into(),
                kind: PrincipalKind::Service,
                groups: Vec::new(),
                audience: Vec::new(),
                ttl: Duration::from_secs(300),
            })
            .map(|(t, _)| t)
            .map_err(|e| Refusal::Invalid(e.to_string()))
    }

    fn authorized<T>(core: &Core, message: T) -> Result<tonic::Request<T>, Refusal> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", Self::service_token(core)?)
            .parse()
            .map_err(|_| Refusal::Invalid("token is not a header value".into()))?;
        request.metadata_mut().insert("authorization", value);
        Ok(agentgate_telemetry::inject_context(request))
    }

    /// Checks the request against policy, creates the approval request, and starts watching
    /// it. Returns the approval id and the duration that will be granted.
    pub async fn request(
        self: &Arc<Self>,
        core: &Arc<Core>,
        requester: Principal,
        connection: &str,
        role: &str,
        requested: Duration,
        reason: &str,
    ) -> Result<(String, Duration), Refusal> {
        let conn = core
            .connection(connection)
            .ok_or_else(|| Refusal::NotFound(format!("no connection named {connection:?}")))?;
        if !conn.roles.contains_key(role) {
            return Err(Refusal::Invalid(format!(
                "connection {connection} has no role {role:?}"
            )));
        }
        let rule = core
            .current_policy()
            .access_request_rule(&requester, connection, role)
            .ok_or_else(|| {
                Refusal::Denied(format!(
                    "policy does not let {} request {role} on {connection}",
                    requester.subject
                ))
            })?;
        if rule.reason_required && reason.trim().is_empty() {
            return Err(Refusal::Invalid(
                "a reason is required for this request".into(),
            ));
        }
        if reason.len() > 2000 {
            return Err(Refusal::Invalid(
                "the reason is longer than 2000 characters".into(),
            ));
        }
        let granted = if requested.is_zero() {
            rule.max_duration
        } else {
            requested.min(rule.max_duration)
        };
        let mut client = self.client().await?;
        let created = client
            .create(Self::authorized(
                core,
                CreateRequest {
                    kind: RequestKind::Access as i32,
                    connection: connection.to_owned(),
                    role: role.to_owned(),
                    duration: Some(prost_types::Duration {
                        seconds: granted.as_secs() as i64,
                        nanos: 0,
                    }),
                    reason: reason.to_owned(),
                    reviewer_groups: rule.approver_groups.clone(),
                    approvals_required: rule.approvals_required,
                    requester: Some(requester.clone()),
                    ..Default::default()
                },
            )?)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::InvalidArgument => Refusal::Invalid(s.message().to_owned()),
                _ => Refusal::Storage(format!("approvals: {}", s.message())),
            })?
            .into_inner();
        let row = AccessRequestRow {
            approval_id: created.id.clone(),
            subject: requester.subject.clone(),
            connection: connection.to_owned(),
            role: role.to_owned(),
            duration_secs: granted.as_secs() as i64,
            reason: reason.to_owned(),
            created_at_us: now_us(),
            state: "pending".into(),
            grant_id: None,
        };
        core.store.insert_access_request(&row).await?;
        tokio::spawn(watch(self.clone(), core.clone(), row));
        Ok((created.id, granted))
    }

    /// Watches every request still pending (after a restart).
    pub async fn resume(self: &Arc<Self>, core: &Arc<Core>) -> Result<(), Refusal> {
        if self.endpoint.is_none() {
            return Ok(());
        }
        for row in core.store.pending_access_requests().await? {
            tokio::spawn(watch(self.clone(), core.clone(), row));
        }
        Ok(())
    }
}

/// Follows one approval request until it is decided; reconnects until then. The approvals
/// Watch stream sends the current state first, so nothing decided meanwhile is missed.
async fn watch(access: Arc<AccessRequests>, core: Arc<Core>, row: AccessRequestRow) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow(&access, &core, &row).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(approval = %row.approval_id, error = %e, "watching approval; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn follow(
    access: &AccessRequests,
    core: &Arc<Core>,
    row: &AccessRequestRow,
) -> Result<(), Refusal> {
    let mut client = access.client().await?;
    let watched = client
        .watch(AccessRequests::authorized(
            core,
            WatchRequest {
                id: row.approval_id.clone(),
                ..Default::default()
            },
        )?)
        .await;
    let mut stream = match watched {
        Ok(s) => s.into_inner(),
        // The approvals service no longer knows it (its store was reset): final, no grant.
        Err(s) if s.code() == tonic::Code::NotFound => {
            tracing::warn!(approval = %row.approval_id, "approval request unknown to the approvals service; no grant");
            core.store
                .settle_access_request(&row.approval_id, "unknown", None)
                .await?;
            return Ok(());
        }
        Err(s) => return Err(Refusal::Storage(s.message().to_owned())),
    };
    while let Some(update) = stream
        .message()
        .await
        .map_err(|s| Refusal::Storage(s.message().to_owned()))?
    {
        if update.id != row.approval_id {
            continue;
        }
        match State::try_from(update.state).unwrap_or_default() {
            State::Pending | State::Unspecified => continue,
            State::Approved => return settle_approved(core, row, &update).await,
            other => {
                let state = format!("{other:?}").to_lowercase();
                core.store
                    .settle_access_request(&row.approval_id, &state, None)
                    .await?;
                return Ok(());
            }
        }
    }
    Err(Refusal::Storage("the approvals watch stream ended".into()))
}

async fn settle_approved(
    core: &Arc<Core>,
    row: &AccessRequestRow,
    update: &ApprovalRequest,
) -> Result<(), Refusal> {
    let approved_at = update
        .decided_at
        .as_ref()
        .map(timestamp_us)
        .unwrap_or_else(now_us);
    let approvers: Vec<String> = update
        .reviews
        .iter()
        .filter(|r| r.verdict == Verdict::Approve as i32)
        .filter_map(|r| r.reviewer.as_ref().map(|p| p.subject.clone()))
        .collect();
    let grant = GrantRow {
        id: uuid::Uuid::now_v7().to_string(),
        subject: row.subject.clone(),
        connection: row.connection.clone(),
        role: row.role.clone(),
        source: GrantSource::JustInTime as i32,
        not_before_us: approved_at,
        expires_at_us: approved_at + row.duration_secs * 1_000_000,
        approved_by_json: serde_json::to_string(&approvers).unwrap_or_default(),
        reason: row.reason.clone(),
        approval_id: row.approval_id.clone(),
        created_at_us: now_us(),
        revoked_at_us: None,
    };
    // Settle first: if another authz instance already did, it made the grant.
    if core
        .store
        .settle_access_request(&row.approval_id, "approved", Some(&grant.id))
        .await?
    {
        core.create_grant(grant).await?;
    }
    Ok(())
}
