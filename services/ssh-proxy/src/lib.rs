//! ssh-proxy: agents use SSH hosts through agentgate with the OpenSSH client, unchanged.
//!
//! An agent runs `ssh -p 2222 ROLE+CONNECTION@gateway` (e.g. `ssh -p 2222 read+web1@gw`),
//! `scp`, `sftp` or `rsync -e 'ssh -p 2222'` as to any host. It logs in with an SSH
//! certificate signed by agentgate's SSH CA (`agentgate ssh cert`), a public key registered
//! to its principal in authz, or its agentgate token as the password (password or
//! keyboard-interactive). The proxy has authz open a session (no grant, no session), logs in
//! to the host itself with the connection's own key (the agent never holds it), checks the
//! host's key against the connection's `known_hosts` setting, and relays channel by channel:
//!
//! - `exec`: the command line is classified with a real shell parser
//!   (`agentgate-shell-classify`), decided by the session's policy, held for approval where
//!   the policy says so (the agent reads why on stderr while it waits), refused with a message
//!   and exit status 1, or run; its exit status and signal come back faithfully;
//! - `shell` with a pty: the shell is decided as `ssh.shell`, and each line the agent submits
//!   is classified and decided like an exec before it reaches the host (best effort: see
//!   docs/ssh-proxy.md);
//! - `sftp` (so also scp, which uses sftp by default, and sftp): decided as `ssh.sftp`; each
//!   file operation is recorded with its path and bytes;
//! - port forwarding (`ssh -L`, `-W`, `-R`) and agent forwarding (`ssh -A`): refused unless
//!   the policy allows `ssh.port_forward` / `ssh.agent_forward`; allowed, relayed.
//!
//! Terminal output passes through the session's masking engine (stream mode); terminal
//! sessions are recorded as asciicast v2 into the audit store as they happen. The session ends
//! within a second of grant expiry or revocation, with a message on every open channel.
//!
//! Layout: [`conn`] is one agent connection (authentication, the session, the end watcher),
//! [`channel`] one session channel (exec, shell, sftp), [`upstream`] the login to the host,
//! [`cast`] the recording, [`sftp`] the file-operation log, [`lines`] the shell line
//! discipline. See docs/ssh-proxy.md.

pub mod cast;
pub mod channel;
pub mod conn;
pub mod lines;
pub mod sftp;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentgate_session::Gateway;
use anyhow::Context as _;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Settings of ssh-proxy (the `[ssh_proxy]` table of the deployment's TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshProxyConfig {
    /// Whether `agentgate up` starts ssh-proxy (the standalone binary ignores it).
    pub enabled: bool,
    /// Where agents connect.
    pub listen: SocketAddr,
    /// This instance's name, recorded with every session.
    pub name: String,
    /// The gateway's host key (OpenSSH format); generated when absent, so it is stable
    /// across restarts. Default `DATA_DIR/<name>-host-key`.
    pub host_key: Option<PathBuf>,
    /// authz's gRPC address.
    pub authz_url: String,
    /// approvals' gRPC address.
    pub approvals_url: String,
    /// TLS for authz, approvals and the audit store (CA, and this proxy's client
    /// certificate).
    pub control_tls: agentgate_tls::TlsConfig,
    /// File holding this proxy's service token (for authz, approvals and the audit store).
    pub service_token_file: Option<PathBuf>,
    /// The audit store's gRPC address.
    pub audit_url: String,
    /// The durable local spool of audit events.
    pub spool_path: Option<PathBuf>,
    /// Shortest time between two fdatasyncs of the spool while events keep coming: longer
    /// costs less CPU and fewer disk flushes under load, and lets a crash take up to that
    /// much of the events recorded last.
    #[serde(with = "humantime_serde")]
    pub spool_sync_interval: Duration,
    /// Environment variables an agent may set (`SendEnv`), unless the session policy's
    /// `ssh.allowed_env` setting (comma-separated) says otherwise. A trailing `*` matches a
    /// prefix.
    pub allowed_env: Vec<String>,
    /// How much output of a command run without a pty is kept in the recording (per
    /// channel); the rest is counted, not stored. Terminal (pty) sessions are recorded whole.
    pub exec_record_limit: usize,
    /// How long the upstream host may take to connect and log in.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// How long a new connection may take to authenticate.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// SSH channel window (bytes) on both sides; larger windows carry bulk transfers faster.
    pub window_size: u32,
    /// Largest SSH packet payload accepted on both sides.
    pub max_packet_size: u32,
    /// Ciphers offered to agents, in order (the agent's client picks its first one the
    /// proxy offers).
    pub agent_ciphers: Vec<String>,
    /// Ciphers toward hosts, in the proxy's order of preference (the proxy picks).
    pub upstream_ciphers: Vec<String>,
}

impl Default for SshProxyConfig {
    fn default() -> Self {
        SshProxyConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 2222)),
            name: "ssh-proxy".into(),
            host_key: None,
            authz_url: "http://127.0.0.1:7404".into(),
            approvals_url: "http://127.0.0.1:7405".into(),
            control_tls: agentgate_tls::TlsConfig::default(),
            service_token_file: None,
            audit_url: "http://127.0.0.1:7403".into(),
            spool_path: None,
            spool_sync_interval: agentgate_recorder::DEFAULT_SYNC_INTERVAL,
            allowed_env: vec![
                "LANG".into(),
                "LC_*".into(),
                "TZ".into(),
                "TERM".into(),
                "COLORTERM".into(),
            ],
            exec_record_limit: 64 * 1024,
            upstream_timeout: Duration::from_secs(15),
            auth_timeout: Duration::from_secs(60),
            window_size: 8 * 1024 * 1024,
            max_packet_size: 32 * 1024,
            agent_ciphers: default_ciphers(),
            upstream_ciphers: default_ciphers(),
        }
    }
}

/// AES-GCM first (hardware-accelerated through aws-lc, the cheapest AEAD on x86 and ARM
/// servers), then ChaCha20-Poly1305, then AES-CTR.
fn default_ciphers() -> Vec<String> {
    [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes256-ctr",
        "aes192-ctr",
        "aes128-ctr",
    ]
    .map(String::from)
    .to_vec()
}

/// The russh names of configured ciphers; an unknown name is a configuration error.
fn cipher_names(key: &str, names: &[String]) -> anyhow::Result<Vec<russh::cipher::Name>> {
    let known = [
        russh::cipher::AES_128_GCM,
        russh::cipher::AES_256_GCM,
        russh::cipher::CHACHA20_POLY1305,
        russh::cipher::AES_256_CTR,
        russh::cipher::AES_192_CTR,
        russh::cipher::AES_128_CTR,
    ];
    let list: Vec<russh::cipher::Name> = names
        .iter()
        .map(|n| {
            known
                .iter()
                .find(|k| k.as_ref() == n.as_str())
                .copied()
                .with_context(|| {
                    format!(
                        "ssh_proxy.{key}: unknown cipher {n:?}; known: {}",
                        known.map(|k| k.as_ref().to_owned()).join(", ")
                    )
                })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!list.is_empty(), "ssh_proxy.{key} is empty");
    Ok(list)
}

/// What every connection of one proxy shares.
pub struct Shared {
    pub(crate) config: SshProxyConfig,
    pub(crate) gateway: Gateway,
    pub(crate) server_config: Arc<russh::server::Config>,
    pub(crate) client_config: Arc<russh::client::Config>,
}

/// A running ssh-proxy.
pub struct RunningSshProxy {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The gateway's host key, OpenSSH public format (for the agents' known_hosts).
    pub host_public_key: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningSshProxy {
    /// Stops accepting and ends live sessions.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the accept loop ends.
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Loads the gateway's host key, or generates and stores one (mode 0600).
pub fn load_or_generate_host_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("ssh_proxy.host_key {}", path.display()))?;
        return PrivateKey::from_openssh(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("ssh_proxy.host_key {}: {e}", path.display()));
    }
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("agentgate ssh-proxy host key");
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the host key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    tracing::info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(HashAlg::Sha256), "generated the ssh-proxy host key");
    Ok(key)
}

/// `KEY.pub` for `KEY`.
fn public_key_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Binds the listener and serves agents through `gateway`. The host key's public half is
/// (re)written next to it as `KEY.pub`.
pub async fn start(
    config: &SshProxyConfig,
    gateway: Gateway,
    data_dir: &Path,
) -> anyhow::Result<RunningSshProxy> {
    let key_path = config
        .host_key
        .clone()
        .unwrap_or_else(|| data_dir.join(format!("{}-host-key", config.name)));
    let host_key = load_or_generate_host_key(&key_path)?;
    let host_public_key = host_key
        .public_key()
        .to_openssh()
        .map_err(|e| anyhow::anyhow!("host key: {e}"))?;
    // The public half next to it, for agents' known_hosts (`[host]:2222 <this line>`).
    let public_path = public_key_path(&key_path);
    let public_line = format!("{host_public_key}\n");
    if std::fs::read_to_string(&public_path).ok().as_deref() != Some(public_line.as_str())
        && let Err(e) = std::fs::write(&public_path, &public_line)
    {
        tracing::warn!(path = %public_path.display(), error = %e, "could not write the host key's public half");
    }
    let agent_ciphers = cipher_names("agent_ciphers", &config.agent_ciphers)?;
    let upstream_ciphers = cipher_names("upstream_ciphers", &config.upstream_ciphers)?;
    let server_config = russh::server::Config {
        preferred: russh::Preferred {
            cipher: agent_ciphers.into(),
            ..Default::default()
        },
        server_id: russh::SshId::Standard("SSH-2.0-agentgate_ssh_proxy".into()),
        methods: russh::MethodSet::from(
            &[
                russh::MethodKind::PublicKey,
                russh::MethodKind::Password,
                russh::MethodKind::KeyboardInteractive,
            ][..],
        ),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: config.window_size,
        maximum_packet_size: config.max_packet_size,
        channel_buffer_size: 256,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    };
    let client_config = russh::client::Config {
        preferred: russh::Preferred {
            cipher: upstream_ciphers.into(),
            ..Default::default()
        },
        window_size: config.window_size,
        maximum_packet_size: config.max_packet_size,
        channel_buffer_size: 256,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("ssh-proxy: binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        gateway,
        server_config: Arc::new(server_config),
        client_config: Arc::new(client_config),
    });
    let (tx, mut rx) = oneshot::channel();
    let gateway = shared.gateway.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        tokio::spawn(conn::serve(shared.clone(), socket, peer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        gateway.end_all(agentgate_session::EndReason::Shutdown);
    });
    tracing::info!(%addr, "ssh-proxy listening");
    Ok(RunningSshProxy {
        addr,
        host_public_key,
        shutdown: Some(tx),
        task,
    })
}

/// Everything ssh-proxy needs from the control plane, built from its configuration: the
/// authz client, the recorder and the session gateway, with the service token from
/// `service_token_file` (read again on every call, so authz's `service_tokens` can renew it)
/// or the `AGENTGATE_SERVICE_TOKEN` environment variable.
pub async fn gateway_from_config(
    config: &SshProxyConfig,
    data_dir: &Path,
) -> anyhow::Result<Gateway> {
    let credentials = agentgate_session::ServiceCredentials::from_file_or_env(
        config.service_token_file.as_deref(),
        "ssh_proxy",
    )?;
    gateway(config, data_dir, credentials).await
}

/// The session gateway for `config` with `credentials` (`agentgate up` passes renewing
/// tokens authz signs itself).
pub async fn gateway(
    config: &SshProxyConfig,
    data_dir: &Path,
    credentials: agentgate_session::ServiceCredentials,
) -> anyhow::Result<Gateway> {
    let plane = agentgate_session::ControlPlane {
        proxy: &config.name,
        protocol: agentgate_proto::common::v1::Protocol::Ssh,
        authz_url: &config.authz_url,
        approvals_url: &config.approvals_url,
        audit_url: &config.audit_url,
        tls: &config.control_tls,
        spool_path: config.spool_path.as_deref(),
        spool_sync_interval: config.spool_sync_interval,
        table: "ssh_proxy",
    };
    Ok(agentgate_session::connect(plane, credentials, data_dir, |_| {}).await?)
}

/// Whether `name` may be set by the agent: the policy's `ssh.allowed_env` setting
/// (comma-separated, `*` suffix for prefixes) when present, else the configured list.
pub fn env_allowed(name: &str, policy_setting: Option<&str>, configured: &[String]) -> bool {
    let matches = |pattern: &str| match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    };
    match policy_setting {
        Some(list) => list.split(',').map(str::trim).any(matches),
        None => configured.iter().any(|p| matches(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_policy_then_configuration() {
        let configured = SshProxyConfig::default().allowed_env;
        assert!(env_allowed("LANG", None, &configured));
        assert!(env_allowed("LC_ALL", None, &configured));
        assert!(!env_allowed("LD_PRELOAD", None, &configured));
        assert!(!env_allowed("LANG", Some("FOO, BAR_*"), &configured));
        assert!(env_allowed("BAR_X", Some("FOO, BAR_*"), &configured));
    }

    #[test]
    fn host_keys_are_generated_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("agentgate-ssh-hk-{}", std::process::id()));
        let path = dir.join("hk");
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_generate_host_key(&path).expect("generated");
        let b = load_or_generate_host_key(&path).expect("loaded");
        assert_eq!(a.public_key(), b.public_key());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
