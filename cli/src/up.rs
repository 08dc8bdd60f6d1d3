//! `agentgate up`: every service that exists, in one process, each on its own port, from one
//! configuration file (or built-in defaults that need nothing installed).

use std::path::PathBuf;
use std::sync::Arc;

use agentgate_identity::LateAuthenticator;
use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub struct UpArgs {
    /// The deployment's TOML file; every value can also be set as AGENTGATE_<SECTION>__<KEY>.
    #[arg(long, env = "AGENTGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Where keys and embedded databases live (overrides `data_dir` in the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The whole deployment's configuration: one table per service.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Keys and embedded databases; default `$XDG_DATA_HOME/agentgate` or
    /// `~/.local/share/agentgate`.
    pub data_dir: Option<PathBuf>,
    pub telemetry: agentgate_telemetry::TelemetryConfig,
    pub audit_store: agentgate_audit_store::AuditStoreConfig,
    pub authz: agentgate_authz::AuthzConfig,
    pub approvals: agentgate_approvals::ApprovalsConfig,
    pub pg_proxy: agentgate_pg_proxy::PgProxyConfig,
    pub ssh_proxy: agentgate_ssh_proxy::SshProxyConfig,
}

/// `$XDG_DATA_HOME/agentgate`, else `~/.local/share/agentgate`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("agentgate");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/agentgate"),
        None => PathBuf::from(".agentgate"),
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let config: GatewayConfig =
        agentgate_config::load(args.config.as_deref(), "AGENTGATE", &["data_dir"])?;
    let _telemetry = agentgate_telemetry::init("agentgate", &config.telemetry)?;
    let data_dir = args
        .data_dir
        .or(config.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    create_private_dir(&data_dir)?;

    let metrics = agentgate_telemetry::Metrics::new("agentgate");
    // The audit store checks every caller's token with authz's own authenticator (which also
    // knows revocations), but starts first, so that authz can record to it from its first
    // moment. Until authz is up, the store answers UNAVAILABLE ("authz is starting"); the
    // recorders keep their events spooled meanwhile and retry.
    let authn = Arc::new(LateAuthenticator::new("authz is starting"));
    let audit = agentgate_audit_store::start(
        &config.audit_store,
        &data_dir,
        authn.clone(),
        Some(&metrics),
    )
    .await?;
    let scheme = |tls: &agentgate_tls::TlsConfig| if tls.enabled() { "https" } else { "http" };
    let audit_url = format!("{}://{}", scheme(&config.audit_store.tls), audit.addr);

    // Services in one process find each other at the addresses they bound, unless the
    // configuration names others.
    let mut authz_config = config.authz.clone();
    authz_config
        .audit_url
        .get_or_insert_with(|| audit_url.clone());
    authz_config.approvals_url.get_or_insert_with(|| {
        format!(
            "{}://{}",
            scheme(&config.approvals.tls),
            config.approvals.listen
        )
    });
    let authz = agentgate_authz::start(&authz_config, &data_dir).await?;
    authn.set(authz.authenticator());
    let mut approvals_config = config.approvals.clone();
    if approvals_config.audit.endpoint
        == agentgate_approvals::config::AuditConfig::default().endpoint
    {
        approvals_config.audit.endpoint = audit_url.clone();
    }
    // approvals records with a service token authz signs and renews, unless the
    // configuration names a token file.
    let approvals_audit_token = approvals_config
        .audit
        .token_file
        .is_none()
        .then(|| authz.recorder_token_source("approvals"));
    let approvals = agentgate_approvals::start(
        &approvals_config,
        &data_dir,
        authz.authenticator(),
        approvals_audit_token,
        Some(&metrics),
    )
    .await?;

    // The proxies reach the services of this process (unless configured elsewhere), with
    // tokens authz signs itself and renews at half their lifetime.
    let in_process = InProcess {
        authz: &authz,
        urls: [
            format!("{}://{}", scheme(&authz_config.tls), authz.addr),
            format!("{}://{}", scheme(&approvals_config.tls), approvals.addr),
            audit_url.clone(),
        ],
    };
    let pg_proxy = if config.pg_proxy.enabled {
        let mut pg_config = config.pg_proxy.clone();
        let defaults = agentgate_pg_proxy::PgProxyConfig::default();
        in_process.point([
            (&mut pg_config.authz_url, defaults.authz_url),
            (&mut pg_config.approvals_url, defaults.approvals_url),
            (&mut pg_config.audit_url, defaults.audit_url),
        ]);
        let credentials = in_process.credentials(&pg_config.name);
        let gateway = agentgate_pg_proxy::gateway(&pg_config, &data_dir, credentials).await?;
        Some(agentgate_pg_proxy::start(&pg_config, gateway).await?)
    } else {
        None
    };

    // ssh-proxy likewise; its host key is generated once in the data directory
    // (`ssh-proxy-host-key`) so that agents can pin it.
    let ssh_proxy = if config.ssh_proxy.enabled {
        let mut ssh_config = config.ssh_proxy.clone();
        let defaults = agentgate_ssh_proxy::SshProxyConfig::default();
        in_process.point([
            (&mut ssh_config.authz_url, defaults.authz_url),
            (&mut ssh_config.approvals_url, defaults.approvals_url),
            (&mut ssh_config.audit_url, defaults.audit_url),
        ]);
        let credentials = in_process.credentials(&ssh_config.name);
        let gateway = agentgate_ssh_proxy::gateway(&ssh_config, &data_dir, credentials).await?;
        Some(agentgate_ssh_proxy::start(&ssh_config, gateway, &data_dir).await?)
    } else {
        None
    };

    let metrics_server = match config.telemetry.metrics_address {
        Some(addr) => Some(
            agentgate_telemetry::serve_metrics(addr, metrics.clone(), std::future::pending())
                .await
                .with_context(|| format!("metrics endpoint {addr}"))?,
        ),
        None => None,
    };

    println!("agentgate is up; data in {}", data_dir.display());
    println!(
        "  audit-store  {audit_url}  ({}, signing key {})",
        audit.store.backend(),
        agentgate_audit_chain::key_id(&audit.public_key)
    );
    println!(
        "  authz        {}://{}  (admin token in {})",
        scheme(&authz_config.tls),
        authz.addr,
        authz.admin_token_path.display()
    );
    println!(
        "  approvals    {}://{}",
        scheme(&approvals_config.tls),
        approvals.addr
    );
    if let Some(p) = &pg_proxy {
        println!(
            "  pg-proxy     postgres://ROLE@{}/CONNECTION  (the agent's token is the password)",
            p.addr
        );
    }
    if let Some(p) = &ssh_proxy {
        println!(
            "  ssh-proxy    ssh -p {} ROLE+CONNECTION@{}  (certificate from `agentgate ssh cert`, or the token as password)",
            p.addr.port(),
            p.addr.ip()
        );
        println!("               host key {}", p.host_public_key);
    }
    if let Some(m) = &metrics_server {
        println!("  metrics      http://{}/metrics", m.local_addr());
    }
    println!("Press Ctrl-C to stop.");

    let (mut audit, mut authz, mut approvals) = (audit, authz, approvals);
    tokio::select! {
        r = audit.wait() => return r.context("the audit store stopped"),
        r = authz.wait() => return r.context("authz stopped"),
        r = approvals.wait() => return r.context("approvals stopped"),
        _ = agentgate_telemetry::shutdown_signal() => {}
    }
    println!("stopping");
    if let Some(p) = pg_proxy {
        p.shutdown().await;
    }
    if let Some(p) = ssh_proxy {
        p.shutdown().await;
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    approvals.shutdown().await?;
    authz.shutdown().await?;
    audit.shutdown().await?;
    println!("stopped");
    Ok(())
}

/// What a proxy in `agentgate up` gets from the services beside it.
struct InProcess<'a> {
    authz: &'a agentgate_authz::RunningAuthz,
    /// authz, approvals and the audit store, as URLs.
    urls: [String; 3],
}

impl InProcess<'_> {
    /// Points a proxy's authz, approvals and audit URLs (in that order) at this process's
    /// services where they were left at their defaults.
    fn point(&self, urls: [(&mut String, String); 3]) {
        for ((url, default), here) in urls.into_iter().zip(&self.urls) {
            if *url == default {
                *url = here.clone();
            }
        }
    }

    /// A service token for authz and approvals and a recorder token for the audit store,
    /// both renewing.
    fn credentials(&self, proxy: &str) -> agentgate_session::ServiceCredentials {
        agentgate_session::ServiceCredentials {
            service: self.authz.service_token_source(proxy),
            recorder: self.authz.recorder_token_source(proxy),
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))
}
