//! Connecting to agentgate's services with errors a person can act on.

use std::path::{Path, PathBuf};

use agentgate_identity::BearerInterceptor;
use agentgate_proto::audit::v1::audit_store_client::AuditStoreClient;
use anyhow::Context as _;
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A client of the audit store that sends the caller's token with every call.
pub type AuditClient = AuditStoreClient<InterceptedService<Channel, BearerInterceptor>>;

/// Where the audit store is, how to trust it, and who is asking.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The audit store's gRPC URL.
    #[arg(
        long = "store",
        env = "AGENTGATE_AUDIT_STORE_URL",
        default_value = "http://127.0.0.1:7403"
    )]
    pub url: String,
    /// CA that signed the store's certificate (with an https:// URL).
    #[arg(long, env = "AGENTGATE_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate, when the store requires mutual TLS.
    #[arg(long, env = "AGENTGATE_TLS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long, env = "AGENTGATE_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Your agentgate token: group `admin` or `auditor` reads the log, `admin` also prunes.
    /// Default: the bootstrap admin token `agentgate up` wrote (DATA_DIR/admin.token), if
    /// readable.
    #[arg(long, env = "AGENTGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The data directory to find admin.token in.
    #[arg(long, env = "AGENTGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl StoreArgs {
    /// Connects, or explains in one line why not.
    pub async fn connect(&self) -> anyhow::Result<AuditClient> {
        let tls = agentgate_tls::TlsConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        };
        let channel = channel("audit store", &self.url, Some(tls)).await?;
        let token = resolve_token(self.token.as_deref(), self.data_dir.as_deref())?;
        let bearer = BearerInterceptor::new(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(AuditStoreClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}

/// The caller's token: `token` when given (flag or AGENTGATE_TOKEN), else the bootstrap
/// admin token `agentgate up` wrote to the data directory, else an error saying both.
pub fn resolve_token(token: Option<&str>, data_dir: Option<&Path>) -> anyhow::Result<String> {
    if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_owned());
    }
    let path = data_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::up::default_data_dir)
        .join(agentgate_authz::ADMIN_TOKEN_FILE);
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_owned())
        .ok()
        .filter(|t| !t.is_empty())
        .with_context(|| {
            format!(
                "no token: pass --token or set AGENTGATE_TOKEN (no readable {} either)",
                path.display()
            )
        })
}

/// Connects to one of agentgate's services, or explains in one line why not: a URL that is
/// not http(s), or a service that does not answer.
pub async fn channel(
    service: &str,
    url: &str,
    tls: Option<agentgate_tls::TlsConfig>,
) -> anyhow::Result<Channel> {
    let uri: http::Uri = url
        .parse()
        .ok()
        .filter(|u: &http::Uri| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        })
        .with_context(|| format!("{service} URL {url:?} is not an http:// or https:// URL"))?;
    let mut endpoint =
        Endpoint::from(uri.clone()).connect_timeout(std::time::Duration::from_secs(5));
    if uri.scheme_str() == Some("https")
        && let Some(tls) = tls
        && let Some(tls) = agentgate_tls::grpc_client_tls(&tls, uri.host().unwrap_or_default())?
    {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the {service} at {url}: {} (is it running? `agentgate up` starts it)",
            root_cause(&e)
        )
    })
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A gRPC error as one line: the status message, with the code when it adds something.
pub fn status(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("service unavailable: {}", e.message()),
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "{} (pass a valid token with --token or AGENTGATE_TOKEN)",
            e.message()
        ),
        code => anyhow::anyhow!("{} ({code:?})", e.message()),
    }
}
