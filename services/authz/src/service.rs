//! The `agentgate.authz.v1.Authz` gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::{TokenRequest, bearer_token};
use agentgate_proto::authz::v1::authz_server::Authz as AuthzApi;
use agentgate_proto::authz::v1::credential::Kind as CredentialKind;
use agentgate_proto::authz::v1::*;
use agentgate_proto::common::v1::{Principal, PrincipalKind};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::access::AccessRequests;
use crate::core::{Core, Refusal, grant_message, kind_or_agent};
use crate::{now_us, us_timestamp};

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of [`Core`].
#[derive(Clone)]
pub struct AuthzService {
    pub(crate) core: Arc<Core>,
    pub(crate) access: Arc<AccessRequests>,
    pub(crate) ssh: Arc<crate::ssh::SshIdentities>,
}

fn peer<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| {
        (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
    })
}

impl AuthzService {
    /// The verified principal behind the call's bearer token.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let token = bearer_token(request.metadata())?;
        Ok(self
            .core
            .verify_token(token, None, &peer(request), "bearer")
            .await?
            .0)
    }

    /// Proxies and other services call the session API; agents and people do not.
    async fn service_caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let p = self.caller(request).await?;
        if p.kind != PrincipalKind::Service as i32 && !self.core.is_admin(&p) {
            return Err(Status::permission_denied(format!(
                "{} is not a service principal; only proxies call this",
                p.subject
            )));
        }
        Ok(p)
    }

    /// Verifies the credential an agent presented to a proxy.
    async fn agent_credential(
        &self,
        credential: Option<Credential>,
        audience: Option<&str>,
        source: &str,
    ) -> Result<(Principal, i64), Status> {
        let token = match credential.and_then(|c| c.kind) {
            Some(CredentialKind::BearerToken(t)) | Some(CredentialKind::Password(t)) => t,
            Some(CredentialKind::SshPublicKey(key)) => {
                return self.ssh_credential(false, &key, source).await;
            }
            Some(CredentialKind::SshCertificate(cert)) => {
                return self.ssh_credential(true, &cert, source).await;
            }
            None => return Err(Status::unauthenticated("no credential presented")),
        };
        Ok(self
            .core
            .verify_token(&token, audience, source, "token")
            .await?)
    }
}

impl AuthzService {
    /// Verifies an SSH certificate or registered key (ssh-proxy checked that the agent holds
    /// the private key) and records the outcome.
    async fn ssh_credential(
        &self,
        certificate: bool,
        text: &str,
        source: &str,
    ) -> Result<(Principal, i64), Status> {
        let now = now_us();
        let result = if certificate {
            self.ssh
                .verify_certificate(text, u64::try_from(now / 1_000_000).unwrap_or(0))
                .and_then(|p| {
                    if !p.principal.token_id.is_empty()
                        && self.core.is_token_revoked(&p.principal.token_id)
                    {
                        Err(format!(
                            "the token {} this certificate was signed for is revoked",
                            p.principal.token_id
                        ))
                    } else {
                        Ok(p)
                    }
                })
        } else {
            self.ssh.verify_key(text, now)
        };
        let kind = if certificate {
            "ssh_certificate"
        } else {
            "ssh_public_key"
        };
        let (success, reason) = match &result {
            Ok(_) => (true, "verified".to_owned()),
            Err(e) => (false, e.clone()),
        };
        self.core
            .record(
                if success {
                    "authz.verify"
                } else {
                    "authz.refuse"
                },
                result.as_ref().ok().map(|p| &p.principal),
                source,
                agentgate_proto::audit::v1::audit_event::Detail::Auth(
                    agentgate_proto::audit::v1::AuthRecord {
                        success,
                        reason: reason.clone(),
                        credential_kind: kind.into(),
                    },
                ),
            )
            .await;
        match result {
            Ok(p) => Ok((p.principal, p.expires_at_us)),
            Err(e) => {
                tracing::info!(source, reason = %e, kind, "SSH credential refused");
                Err(Status::unauthenticated(format!("credential refused: {e}")))
            }
        }
    }
}

#[tonic::async_trait]
impl AuthzApi for AuthzService {
    async fn sign_ssh_certificate(
        &self,
        request: Request<SignSshCertificateRequest>,
    ) -> Result<Response<SignSshCertificateResponse>, Status> {
        let token = bearer_token(request.metadata())?.to_owned();
        let (caller, token_exp) = self
            .core
            .verify_token(&token, None, &peer(&request), "bearer")
            .await?;
        let r = request.into_inner();
        let ttl = duration(r.ttl.as_ref()).unwrap_or_default();
        let (certificate, expires_at_us) = self
            .ssh
            .sign(&r.public_key, &caller, ttl, token_exp)
            .map_err(Status::invalid_argument)?;
        self.core
            .record(
                "authz.ssh_certificate_issued",
                Some(&caller),
                "",
                agentgate_proto::audit::v1::audit_event::Detail::Grant(
                    agentgate_proto::audit::v1::GrantRecord {
                        grant_id: String::new(),
                        change: format!(
                            "SSH certificate signed for {} (token {})",
                            caller.subject, caller.token_id
                        ),
                        expires_at: Some(us_timestamp(expires_at_us)),
                        reason: String::new(),
                    },
                ),
            )
            .await;
        Ok(Response::new(SignSshCertificateResponse {
            certificate,
            expires_at: Some(us_timestamp(expires_at_us)),
            ca_public_key: self.ssh.ca_public_key(),
        }))
    }

    type WatchGrantsStream = BoxStream<GrantEvent>;

    async fn verify_credential(
        &self,
        request: Request<VerifyCredentialRequest>,
    ) -> Result<Response<VerifyCredentialResponse>, Status> {
        self.service_caller(&request).await?;
        let r = request.into_inner();
        let audience = (!r.audience.is_empty()).then_some(r.audience.as_str());
        let (principal, exp) = self
            .agent_credential(r.credential, audience, &r.source_address)
            .await?;
        Ok(Response::new(VerifyCredentialResponse {
            principal: Some(principal),
            expires_at: Some(us_timestamp(exp)),
        }))
    }

    async fn exchange_token(
        &self,
        request: Request<ExchangeTokenRequest>,
    ) -> Result<Response<ExchangeTokenResponse>, Status> {
        let source = peer(&request);
        let r = request.into_inner();
        let principal = self
            .core
            .verify_external(&r.external_token, &source)
            .await?;
        let ttl = duration(r.ttl.as_ref())
            .filter(|d| !d.is_zero())
            .unwrap_or(self.core.exchange_token_ttl)
            .min(self.core.exchange_token_ttl);
        let request = TokenRequest {
            subject: principal.subject.clone(),
            kind: kind_or_agent(principal.kind),
            groups: principal.groups.clone(),
            audience: r.audience,
            ttl,
        };
        let (token, claims) = self.core.issue_token(&request, &principal).await?;
        Ok(Response::new(ExchangeTokenResponse {
            token,
            principal: Some(claims.principal()),
            expires_at: Some(us_timestamp(claims.exp as i64 * 1_000_000)),
        }))
    }

    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        let admin = self.caller(&request).await?;
        self.core.require_admin(&admin)?;
        let r = request.into_inner();
        let ttl = duration(r.ttl.as_ref())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(15 * 60));
        let (token, claims) = self
            .core
            .issue_token(
                &TokenRequest {
                    subject: r.subject,
                    kind: kind_or_agent(r.kind),
                    groups: r.groups,
                    audience: r.audience,
                    ttl,
                },
                &admin,
            )
            .await?;
        self.core
            .record(
                "authz.token_issued",
                Some(&admin),
                "",
                agentgate_proto::audit::v1::audit_event::Detail::Grant(
                    agentgate_proto::audit::v1::GrantRecord {
                        grant_id: String::new(),
                        change: format!(
                            "token {} issued to {} ({}) for {}s",
                            claims.jti,
                            claims.sub,
                            claims.kind,
                            ttl.as_secs()
                        ),
                        expires_at: Some(us_timestamp(claims.exp as i64 * 1_000_000)),
                        reason: String::new(),
                    },
                ),
            )
            .await;
        Ok(Response::new(IssueTokenResponse {
            token,
            token_id: claims.jti,
            expires_at: Some(us_timestamp(claims.exp as i64 * 1_000_000)),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let admin = self.caller(&request).await?;
        self.core.require_admin(&admin)?;
        let r = request.into_inner();
        if uuid::Uuid::parse_str(&r.token_id).is_err() {
            return Err(Status::invalid_argument(
                "token_id must be a token's id (a UUID)",
            ));
        }
        let sessions_ended = self
            .core
            .revoke_token(&r.token_id, &r.reason, &admin)
            .await?;
        Ok(Response::new(RevokeTokenResponse { sessions_ended }))
    }

    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<OpenSessionResponse>, Status> {
        self.service_caller(&request).await?;
        let r = request.into_inner();
        let (principal, token_exp) = self
            .agent_credential(r.credential, Some(&r.connection), &r.source_address)
            .await?;
        let opened = self
            .core
            .open_session(
                principal,
                token_exp,
                &r.connection,
                &r.role,
                r.protocol,
                &r.source_address,
            )
            .await?;
        Ok(Response::new(OpenSessionResponse {
            session_id: opened.session_id,
            principal: Some(opened.principal),
            grant: Some(opened.grant),
            policy: Some(opened.policy),
            upstream: Some(opened.upstream),
            connection: Some(opened.connection),
            expires_at: Some(us_timestamp(opened.expires_at_us)),
        }))
    }

    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<CloseSessionResponse>, Status> {
        self.service_caller(&request).await?;
        let r = request.into_inner();
        self.core.close_session(&r.session_id, &r.reason).await?;
        Ok(Response::new(CloseSessionResponse {}))
    }

    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        self.service_caller(&request).await?;
        let r = request.into_inner();
        let session = self
            .core
            .session(&r.session_id)
            .ok_or_else(|| Status::not_found(format!("no live session {}", r.session_id)))?;
        let op = r.operation.unwrap_or_default();
        let d = self.core.current_policy().authorize(
            &session.principal,
            &session.connection,
            &session.role,
            &op,
        );
        Ok(Response::new(AuthorizeResponse {
            decision: d.decision as i32,
            reason: d.reason,
            rule: d.rule,
        }))
    }

    async fn watch_grants(
        &self,
        request: Request<WatchGrantsRequest>,
    ) -> Result<Response<Self::WatchGrantsStream>, Status> {
        self.service_caller(&request).await?;
        let stream = BroadcastStream::new(self.core.events.subscribe()).map(|item| {
            item.map_err(|_| {
                Status::data_loss(
                    "the grant event stream fell behind; reconnect and re-check sessions",
                )
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn request_access(
        &self,
        request: Request<RequestAccessRequest>,
    ) -> Result<Response<RequestAccessResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let requested = duration(r.duration.as_ref()).unwrap_or_default();
        let (approval_id, granted) = self
            .access
            .request(
                &self.core,
                caller,
                &r.connection,
                &r.role,
                requested,
                &r.reason,
            )
            .await?;
        Ok(Response::new(RequestAccessResponse {
            approval_id,
            duration: Some(prost_types::Duration {
                seconds: granted.as_secs() as i64,
                nanos: 0,
            }),
        }))
    }

    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        // Admins see every grant; anyone else only their own.
        let subject = if self.core.is_admin(&caller) {
            (!r.subject.is_empty()).then_some(r.subject)
        } else {
            Some(caller.subject)
        };
        let rows = self
            .core
            .store
            .list_grants(
                subject.as_deref(),
                (!r.connection.is_empty()).then_some(r.connection.as_str()),
                r.include_expired,
                now_us(),
            )
            .await
            .map_err(Refusal::from)?;
        Ok(Response::new(ListGrantsResponse {
            grants: rows.iter().map(grant_message).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        let admin = self.caller(&request).await?;
        self.core.require_admin(&admin)?;
        let r = request.into_inner();
        let sessions_ended = self
            .core
            .revoke_grant(&r.grant_id, &r.reason, &admin)
            .await?;
        Ok(Response::new(RevokeGrantResponse { sessions_ended }))
    }

    async fn list_connections(
        &self,
        request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        self.caller(&request).await?;
        Ok(Response::new(ListConnectionsResponse {
            connections: self.core.connections(),
        }))
    }
}
