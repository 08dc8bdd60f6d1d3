//! The login to the host: TCP, the host key checked against the connection's `known_hosts`
//! setting, public-key authentication with the connection's own key (or certificate).
//!
//! Connection settings (`[[authz.connections]] settings`) read here:
//!
//! | setting | meaning |
//! | --- | --- |
//! | `known_hosts` | one or more lines `[host] keytype base64` (OpenSSH known_hosts or `.pub` format); the host must present one of these keys. Required: without it nothing connects. |
//! | `certificate` | optional OpenSSH user certificate for the role's key (a host that trusts a CA) |
//!
//! The role's upstream identity (`roles.<role>`) gives the user and the private key (OpenSSH
//! format) as the secret (`file:` / `env:` reference, resolved by authz or the proxy).

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use russh::client;
use russh::keys::key::PrivateKeyWithHashAlg;
use russh::keys::{Certificate, PrivateKey, PublicKey};
use tokio::sync::watch;

/// Why the host could not be reached or refused the login, in words for the agent.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection's settings are incomplete or wrong.
    #[error("connection {connection} is misconfigured: {why}")]
    Config {
        /// The connection name.
        connection: String,
        /// What is wrong.
        why: String,
    },
    /// TCP or SSH failed.
    #[error("cannot reach the host {address}: {why}")]
    Unreachable {
        /// host:port
        address: String,
        /// What failed.
        why: String,
    },
    /// The host presented a key that is not the configured one.
    #[error(
        "the host {address} presented the key {presented}, which is not the one configured for connection {connection}; refusing to connect (possible man-in-the-middle, or the host was reinstalled: update the connection's known_hosts)"
    )]
    HostKeyMismatch {
        /// host:port
        address: String,
        /// The connection name.
        connection: String,
        /// SHA-256 fingerprint of what the host sent.
        presented: String,
    },
    /// The host refused the connection's key.
    #[error("the host {address} refused the login of {user} with connection {connection}'s key")]
    LoginRefused {
        /// host:port
        address: String,
        /// The upstream user.
        user: String,
        /// The connection name.
        connection: String,
    },
}

/// What the policy allowed the session to forward from the host back to the agent; the
/// host's channel opens are refused otherwise, whatever it tries.
#[derive(Debug, Default)]
pub struct Forwarding {
    /// `tcpip-forward` was allowed (remote port forwarding).
    pub remote: AtomicBool,
    /// `auth-agent-req` was allowed (agent forwarding).
    pub agent: AtomicBool,
}

/// The client side of one upstream connection.
pub struct UpstreamHandler {
    expected: Vec<PublicKey>,
    presented: Option<String>,
    mismatch: bool,
    /// Flips to true when the connection to the host ends.
    closed: watch::Sender<bool>,
    /// The agent's connection, for channels the host opens back (forwarding).
    agent: Option<russh::server::Handle>,
    forwarding: Arc<Forwarding>,
}

impl client::Handler for UpstreamHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
                PublicKey::new(cert.public_key().clone(), "")
            }
        };
        let ok = self
            .expected
            .iter()
            .any(|k| k.key_data() == presented.key_data());
        self.presented = Some(
            presented
                .fingerprint(russh::keys::HashAlg::Sha256)
                .to_string(),
        );
        self.mismatch = !ok;
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(agent) = self
            .agent
            .clone()
            .filter(|_| self.forwarding.remote.load(Ordering::Acquire))
        else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let (connected, originator) = (connected_address.to_owned(), originator_address.to_owned());
        tokio::spawn(async move {
            match agent
                .channel_open_forwarded_tcpip(
                    connected,
                    connected_port,
                    originator,
                    originator_port,
                )
                .await
            {
                Ok(to_agent) => crate::channel::relay_plain(to_agent, channel).await,
                Err(e) => {
                    tracing::info!(error = %e, "the agent refused a forwarded connection");
                    let _ = channel.close().await;
                }
            }
        });
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(agent) = self
            .agent
            .clone()
            .filter(|_| self.forwarding.agent.load(Ordering::Acquire))
        else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(async move {
            match agent.channel_open_agent().await {
                Ok(to_agent) => crate::channel::relay_plain(to_agent, channel).await,
                Err(e) => {
                    tracing::info!(error = %e, "the agent refused an agent channel");
                    let _ = channel.close().await;
                }
            }
        });
        Ok(())
    }
}

impl Drop for UpstreamHandler {
    fn drop(&mut self) {
        let _ = self.closed.send(true);
    }
}

/// A logged-in connection to the host.
pub struct Upstream {
    /// The russh client handle: open channels with it.
    pub handle: client::Handle<UpstreamHandler>,
    /// Becomes true when the host connection ends.
    pub closed: watch::Receiver<bool>,
}

/// Parses a `known_hosts` setting: every line's `keytype base64` pair (a leading host
/// pattern, `@cert-authority` markers and comments are ignored).
pub fn parse_known_hosts(text: &str) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let is_type = w.starts_with("ssh-")
                || w.starts_with("ecdsa-sha2-")
                || w.starts_with("sk-")
                || w.starts_with("rsa-sha2-");
            if is_type
                && let Some(data) = words.get(i + 1)
                && let Ok(k) = PublicKey::from_openssh(&format!("{w} {data}"))
            {
                keys.push(k);
                break;
            }
        }
    }
    keys
}

/// Connects and logs in, or explains why not.
pub async fn connect(
    config: Arc<client::Config>,
    connection: &agentgate_proto::authz::v1::Connection,
    user: &str,
    secret: &[u8],
    timeout: Duration,
    agent: Option<russh::server::Handle>,
    forwarding: Arc<Forwarding>,
) -> Result<Upstream, UpstreamError> {
    let address = connection.upstream_address.clone();
    let name = connection.name.clone();
    let misconfigured = |why: String| UpstreamError::Config {
        connection: name.clone(),
        why,
    };
    let known = connection
        .settings
        .get("known_hosts")
        .map(|s| parse_known_hosts(s))
        .unwrap_or_default();
    if known.is_empty() {
        return Err(misconfigured(
            "its `known_hosts` setting names no host key; agentgate never connects to an unverified host".into(),
        ));
    }
    let key_text = std::str::from_utf8(secret)
        .map_err(|_| misconfigured("the role's private key is not text".into()))?;
    if key_text.trim().is_empty() {
        return Err(misconfigured(
            "the role has no private key (secret) for the host".into(),
        ));
    }
    let key =
        PrivateKey::from_openssh(format!("{}\n", key_text.trim()).as_bytes()).map_err(|e| {
            misconfigured(format!(
                "the role's private key does not parse as an OpenSSH key: {e}"
            ))
        })?;
    let certificate = match connection.settings.get("certificate") {
        Some(c) if !c.trim().is_empty() => Some(
            Certificate::from_openssh(c.trim())
                .map_err(|e| misconfigured(format!("its `certificate` does not parse: {e}")))?,
        ),
        _ => None,
    };
    let (closed_tx, closed_rx) = watch::channel(false);
    let handler = UpstreamHandler {
        expected: known,
        presented: None,
        mismatch: false,
        closed: closed_tx,
        agent,
        forwarding,
    };
    let unreachable = |why: String| UpstreamError::Unreachable {
        address: address.clone(),
        why,
    };
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        // The handler is moved into the session; learn about a mismatch from the error.
        let mut handle = match client::connect_stream(config, tcp, handler).await {
            Ok(h) => h,
            Err(russh::Error::UnknownKey) => {
                return Err(UpstreamError::HostKeyMismatch {
                    address: address.clone(),
                    connection: name.clone(),
                    presented: "(not the configured key)".into(),
                });
            }
            Err(e) => return Err(unreachable(e.to_string())),
        };
        let key = Arc::new(key);
        let result = match certificate {
            Some(cert) => handle.authenticate_openssh_cert(user, key, cert).await,
            None => {
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .ok()
                    .flatten()
                    .flatten();
                handle
                    .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
                    .await
            }
        }
        .map_err(|e| unreachable(e.to_string()))?;
        if !result.success() {
            return Err(UpstreamError::LoginRefused {
                address: address.clone(),
                user: user.to_owned(),
                connection: name.clone(),
            });
        }
        Ok(Upstream {
            handle,
            closed: closed_rx,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_lines_in_several_shapes() {
        let k = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let text = format!(
            "# comment\n[127.0.0.1]:2200 ssh-ed25519 {k}\nssh-ed25519 {k} root@host\nhost.example ssh-ed25519 {k}\n\ngarbage line\n"
        );
        assert_eq!(parse_known_hosts(&text).len(), 3);
        assert!(parse_known_hosts("").is_empty());
    }
}
