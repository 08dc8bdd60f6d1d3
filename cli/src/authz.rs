//! `agentgate token|access|grants|connections`: identities, just-in-time access and grants,
//! through authz.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use agentgate_proto::authz::v1::authz_client::AuthzClient;
use agentgate_proto::authz::v1::{
    IssueTokenRequest, ListConnectionsRequest, ListGrantsRequest, RequestAccessRequest,
    RevokeGrantRequest, RevokeTokenRequest,
};
use agentgate_proto::common::v1::PrincipalKind;
use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::client::status;

/// Where authz is and who is asking.
#[derive(Args, Clone)]
pub struct AuthzArgs {
    /// authz's gRPC URL.
    #[arg(
        long = "authz",
        env = "AGENTGATE_AUTHZ_URL",
        default_value = "http://127.0.0.1:7404"
    )]
    pub url: String,
    /// Your agentgate token. Default: the bootstrap admin token `agentgate up` wrote
    /// (DATA_DIR/admin.token), if readable.
    #[arg(long, env = "AGENTGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The data directory to find admin.token in.
    #[arg(long, env = "AGENTGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl AuthzArgs {
    fn token(&self) -> anyhow::Result<String> {
        crate::client::resolve_token(self.token.as_deref(), self.data_dir.as_deref())
    }

    async fn connect(&self) -> anyhow::Result<(AuthzClient<Channel>, String)> {
        let token = self.token()?;
        let channel = crate::client::channel("authz", &self.url, None).await?;
        Ok((AuthzClient::new(channel), token))
    }
}

/// Attaches the bearer token.
fn with_token<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not valid header text")?,
    );
    Ok(r)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Agent,
    Human,
    Service,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Sign a short-lived agentgate token (admin). The token alone goes to stdout.
    Issue {
        #[command(flatten)]
        authz: AuthzArgs,
        /// e.g. agent:deploy-bot
        #[arg(long)]
        subject: String,
        #[arg(long, value_enum, default_value = "agent")]
        kind: KindArg,
        /// Groups the policy refers to; repeat for several.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Connections the token is for; repeat for several; none means any.
        #[arg(long = "audience")]
        audience: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
        ttl: Duration,
    },
    /// Revoke a token id (admin): new sessions refuse it, live ones end.
    Revoke {
        #[command(flatten)]
        authz: AuthzArgs,
        token_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum AccessCommand {
    /// Ask for a role on a connection for a while; a human approves it.
    Request {
        #[command(flatten)]
        authz: AuthzArgs,
        #[arg(long)]
        connection: String,
        #[arg(long)]
        role: String,
        /// How long, e.g. 30m (capped by policy).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum GrantsCommand {
    /// Live grants (yours; every grant for an admin).
    List {
        #[command(flatten)]
        authz: AuthzArgs,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        connection: Option<String>,
        /// Include expired and revoked grants.
        #[arg(long)]
        all: bool,
    },
    /// End a grant now, and the sessions it backs (admin).
    Revoke {
        #[command(flatten)]
        authz: AuthzArgs,
        grant_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn show(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| u64::try_from(t.seconds).ok())
        .map(|s| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue {
            authz,
            subject,
            kind,
            groups,
            audience,
            ttl,
        } => {
            let (mut c, token) = authz.connect().await?;
            let kind = match kind {
                KindArg::Agent => PrincipalKind::Agent,
                KindArg::Human => PrincipalKind::Human,
                KindArg::Service => PrincipalKind::Service,
            };
            let r = c
                .issue_token(with_token(
                    &token,
                    IssueTokenRequest {
                        subject,
                        kind: kind as i32,
                        groups,
                        audience,
                        ttl: Some(prost_types::Duration {
                            seconds: ttl.as_secs() as i64,
                            nanos: 0,
                        }),
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            eprintln!(
                "token id {} expires {}",
                r.token_id,
                show(r.expires_at.as_ref())
            );
            println!("{}", r.token);
            Ok(())
        }
        TokenCommand::Revoke {
            authz,
            token_id,
            reason,
        } => {
            let (mut c, token) = authz.connect().await?;
            let r = c
                .revoke_token(with_token(
                    &token,
                    RevokeTokenRequest {
                        token_id: token_id.clone(),
                        reason,
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "revoked token {token_id}; {} live sessions ended",
                r.sessions_ended
            );
            Ok(())
        }
    }
}

pub async fn access(cmd: AccessCommand) -> anyhow::Result<()> {
    let AccessCommand::Request {
        authz,
        connection,
        role,
        duration,
        reason,
    } = cmd;
    let (mut c, token) = authz.connect().await?;
    let r = c
        .request_access(with_token(
            &token,
            RequestAccessRequest {
                connection: connection.clone(),
                role: role.clone(),
                duration: Some(prost_types::Duration {
                    seconds: duration.as_secs() as i64,
                    nanos: 0,
                }),
                reason,
            },
        )?)
        .await
        .map_err(status)?
        .into_inner();
    let granted = r.duration.map(|d| d.seconds).unwrap_or_default();
    println!(
        "requested {role} on {connection} for {}: approval {} is pending",
        humantime::format_duration(Duration::from_secs(granted as u64)),
        r.approval_id
    );
    println!(
        "a reviewer approves it with: agentgate approvals approve {}",
        r.approval_id
    );
    Ok(())
}

pub async fn grants(cmd: GrantsCommand) -> anyhow::Result<()> {
    match cmd {
        GrantsCommand::List {
            authz,
            subject,
            connection,
            all,
        } => {
            let (mut c, token) = authz.connect().await?;
            let grants = c
                .list_grants(with_token(
                    &token,
                    ListGrantsRequest {
                        subject: subject.unwrap_or_default(),
                        connection: connection.unwrap_or_default(),
                        include_expired: all,
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner()
                .grants;
            if grants.is_empty() {
                println!("no grants");
            }
            for g in grants {
                println!(
                    "{}  {:<24} {:<16} {:<8} until {}{}  approved by {}  reason: {}",
                    g.id,
                    g.subject,
                    g.connection,
                    g.role,
                    show(g.expires_at.as_ref()),
                    if g.revoked { " (REVOKED)" } else { "" },
                    if g.approved_by.is_empty() {
                        "-".into()
                    } else {
                        g.approved_by.join(",")
                    },
                    g.reason
                );
            }
            Ok(())
        }
        GrantsCommand::Revoke {
            authz,
            grant_id,
            reason,
        } => {
            let (mut c, token) = authz.connect().await?;
            let r = c
                .revoke_grant(with_token(
                    &token,
                    RevokeGrantRequest {
                        grant_id: grant_id.clone(),
                        reason,
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "revoked grant {grant_id}; {} live sessions ended",
                r.sessions_ended
            );
            Ok(())
        }
    }
}

pub async fn connections(authz: AuthzArgs) -> anyhow::Result<()> {
    let (mut c, token) = authz.connect().await?;
    let list = c
        .list_connections(with_token(&token, ListConnectionsRequest {})?)
        .await
        .map_err(status)?
        .into_inner()
        .connections;
    for conn in list {
        let roles: Vec<String> = conn.roles.iter().map(|r| r.role.clone()).collect();
        println!(
            "{:<20} {:<40} roles: {}",
            conn.name,
            conn.upstream_address,
            roles.join(", ")
        );
    }
    Ok(())
}
