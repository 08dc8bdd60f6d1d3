//! One agent connection: authentication (certificate, registered key, token as password or
//! keyboard-interactive), the session with authz, the login to the host, and the watcher that
//! ends everything when the grant expires or is revoked, the host goes away or the agent
//! does.
//!
//! The SSH user name is `ROLE+CONNECTION` (`read+web1`). A credential authz does not accept
//! is an ordinary SSH authentication failure (the client tries its next method). A credential
//! authz accepts for a session it refuses (no grant, authz unreachable, the host unreachable
//! or its key wrong) logs in, and every channel the agent opens then prints why on stderr and
//! exits with status 1: a plain "Permission denied" would hide the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate_proto::authz::v1::Credential;
use agentgate_proto::authz::v1::credential::Kind;
use agentgate_proto::common::v1::{Decision, Operation, Protocol};
use agentgate_session::{EndReason, OperationEvent, Refused, Session, refusal_message};
use russh::server::{self, Auth, ChannelOpenHandle, Msg};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;
use crate::upstream::{self, Upstream};

/// What a channel needs to know to be told the session ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenChannel {
    pub(crate) pty: bool,
}

/// State of one agent connection, shared by the russh handler and the channel tasks.
pub struct Conn {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: SocketAddr,
    pub(crate) client: String,
    pub(crate) session: watch::Sender<Option<Session>>,
    pub(crate) upstream: Mutex<Option<Arc<Upstream>>>,
    pub(crate) upstream_closed: watch::Sender<Option<watch::Receiver<bool>>>,
    /// Why the session was refused after authentication (shown on every channel).
    pub(crate) refusal: Mutex<Option<String>>,
    pub(crate) server: Mutex<Option<server::Handle>>,
    pub(crate) channels: Mutex<HashMap<ChannelId, OpenChannel>>,
    /// What the policy allowed to be forwarded back from the host.
    pub(crate) forwarding: Arc<upstream::Forwarding>,
}

impl Conn {
    pub(crate) fn session(&self) -> Option<Session> {
        self.session.borrow().clone()
    }

    pub(crate) fn upstream(&self) -> Option<Arc<Upstream>> {
        self.upstream.lock().ok()?.clone()
    }

    pub(crate) fn server(&self) -> Option<server::Handle> {
        self.server.lock().ok()?.clone()
    }

    pub(crate) fn register(&self, id: ChannelId, pty: bool) {
        if let Ok(mut c) = self.channels.lock() {
            c.insert(id, OpenChannel { pty });
        }
    }

    pub(crate) fn forget(&self, id: ChannelId) {
        if let Ok(mut c) = self.channels.lock() {
            c.remove(&id);
        }
    }

    /// Tells every open channel `message` (stderr, or the terminal with a pty), with exit
    /// status 1, and closes them.
    pub(crate) async fn tell_all(&self, message: &str) {
        let Some(handle) = self.server() else { return };
        let channels: Vec<(ChannelId, OpenChannel)> = self
            .channels
            .lock()
            .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        for (id, c) in channels {
            let text = if c.pty {
                format!("\r\n{message}\r\n")
            } else {
                format!("{message}\n")
            };
            let _ = handle.extended_data(id, 1, text.into_bytes()).await;
            let _ = handle.exit_status_request(id, 1).await;
            let _ = handle.eof(id).await;
            let _ = handle.close(id).await;
        }
    }
}

/// Splits `ROLE+CONNECTION`.
pub fn parse_user(user: &str) -> Option<(&str, &str)> {
    let (role, connection) = user.split_once('+')?;
    (!role.is_empty() && !connection.is_empty()).then_some((role, connection))
}

/// Reads the client's SSH identification line without consuming it.
async fn client_version(socket: &TcpStream) -> String {
    let mut buf = [0u8; 256];
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_millis(100), socket.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&buf[..end]);
                    return line
                        .trim()
                        .strip_prefix("SSH-2.0-")
                        .unwrap_or(line.trim())
                        .chars()
                        .take(100)
                        .collect();
                }
                if n == buf.len() {
                    break;
                }
            }
            Ok(Ok(_)) | Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    "unknown SSH client".into()
}

/// Serves one agent connection to its end.
pub async fn serve(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr) {
    let client = client_version(&socket).await;
    let (session_tx, mut session_rx) = watch::channel(None);
    let (closed_tx, mut closed_rx) = watch::channel(None);
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        peer,
        client,
        session: session_tx,
        upstream: Mutex::new(None),
        upstream_closed: closed_tx,
        refusal: Mutex::new(None),
        server: Mutex::new(None),
        channels: Mutex::new(HashMap::new()),
        forwarding: Arc::new(upstream::Forwarding::default()),
    });
    let handler = ConnHandler {
        conn: conn.clone(),
        user: String::new(),
    };
    let mut running = match server::run_stream(shared.server_config.clone(), socket, handler).await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "SSH handshake failed");
            return;
        }
    };
    if let Ok(mut s) = conn.server.lock() {
        *s = Some(running.handle());
    }

    // Until authentication: the connection, or the auth timeout.
    let auth_deadline = tokio::time::sleep(shared.config.auth_timeout);
    tokio::pin!(auth_deadline);
    let session = loop {
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended before a session");
                }
                return;
            }
            changed = session_rx.changed() => {
                if changed.is_err() { return; }
                if let Some(s) = session_rx.borrow().clone() { break s; }
            }
            _ = &mut auth_deadline => {
                let _ = running.handle().disconnect(
                    russh::Disconnect::ByApplication,
                    "agentgate: authentication took too long".into(),
                    String::new(),
                ).await;
                return;
            }
        }
    };

    let mut upstream_closed = loop {
        if let Some(rx) = closed_rx.borrow().clone() {
            break rx;
        }
        if closed_rx.changed().await.is_err() {
            return;
        }
    };
    let ended = session.ended();
    tokio::pin!(ended);
    let mut client_gone = false;
    let reason = tokio::select! {
        r = &mut running => {
            client_gone = true;
            if let Err(e) = r {
                tracing::debug!(session = %session.id(), error = %e, "agent connection ended with an error");
            }
            EndReason::ClientClosed
        }
        reason = &mut ended => {
            conn.tell_all(&reason.message()).await;
            reason
        }
        _ = wait_true(&mut upstream_closed) => {
            conn.tell_all("agentgate: the host closed the connection").await;
            EndReason::UpstreamClosed
        }
    };
    tracing::info!(session = %session.id(), reason = %reason, "ssh session ending");
    if let Some(handle) = conn.server() {
        let _ = handle
            .disconnect(
                russh::Disconnect::ByApplication,
                reason.message(),
                String::new(),
            )
            .await;
    }
    if let Some(up) = conn.upstream.lock().ok().and_then(|mut u| u.take()) {
        let _ = up
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
    }
    // Give channel tasks a moment to record their last events, then close.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Err(e) = session.close(reason).await {
        tracing::warn!(session = %session.id(), error = %e, "session end not recorded");
    }
    if !client_gone {
        let _ = tokio::time::timeout(Duration::from_secs(2), running).await;
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

/// The russh handler of one agent connection.
pub struct ConnHandler {
    conn: Arc<Conn>,
    user: String,
}

impl ConnHandler {
    /// Opens the session for `credential`; see the module docs for what is accepted.
    async fn login(&mut self, user: &str, credential: Credential) -> Auth {
        if self.conn.session().is_some()
            || self
                .conn
                .refusal
                .lock()
                .map(|r| r.is_some())
                .unwrap_or(false)
        {
            return Auth::Accept;
        }
        let Some((role, connection)) = parse_user(user) else {
            tracing::info!(user, "SSH user is not ROLE+CONNECTION");
            self.refuse(format!(
                "agentgate: log in as ROLE+CONNECTION (e.g. read+web1), not {user:?}"
            ));
            return Auth::Accept;
        };
        let source = self.conn.peer.to_string();
        let opened = self
            .conn
            .shared
            .gateway
            .open(credential, connection, role, &source, &self.conn.client)
            .await;
        let session = match opened {
            Ok(s) => s,
            Err(Refused::Unauthenticated(m)) => {
                tracing::info!(%source, user, reason = %m, "SSH credential refused");
                return Auth::reject();
            }
            Err(refused) => {
                self.refuse(refusal_message(&refused));
                return Auth::Accept;
            }
        };
        let up = upstream::connect(
            self.conn.shared.client_config.clone(),
            session.connection(),
            session.upstream().user(),
            session.upstream().secret(),
            self.conn.shared.config.upstream_timeout,
            self.conn.server(),
            self.conn.forwarding.clone(),
        )
        .await;
        match up {
            Ok(up) => {
                let _ = self.conn.upstream_closed.send(Some(up.closed.clone()));
                if let Ok(mut u) = self.conn.upstream.lock() {
                    *u = Some(Arc::new(up));
                }
                let _ = self.conn.session.send(Some(session));
            }
            Err(e) => {
                tracing::warn!(session = %session.id(), error = %e, "upstream login failed");
                let _ = session
                    .record_event(
                        "session.upstream_refused",
                        None,
                        [("error".to_owned(), e.to_string())].into_iter().collect(),
                    )
                    .await;
                let message = format!("agentgate: {e}");
                let _ = session.close(EndReason::Error(e.to_string())).await;
                self.refuse(message);
            }
        }
        Auth::Accept
    }

    fn refuse(&self, message: String) {
        if let Ok(mut r) = self.conn.refusal.lock() {
            *r = Some(agentgate_session::one_line(&message));
        }
    }

    fn refusal(&self) -> Option<String> {
        self.conn.refusal.lock().ok()?.clone()
    }

    /// Decides a connection-level operation (forwarding) and records it.
    async fn decide_forward(&self, class: &str, text: String) -> bool {
        let Some(session) = self.conn.session() else {
            return false;
        };
        let op = forward_operation(class, text);
        let decision = session.decide(&op);
        let allowed = decision.decision == Decision::Allow;
        let mut event = OperationEvent::new(op, &decision);
        if decision.decision == Decision::NeedsApproval {
            // Forwarding is not held (the client would time out): it is refused.
            event.decision = Decision::Deny;
            event.reason = format!(
                "{} (forwarding cannot wait for approval; ask for a role whose policy allows it)",
                decision.reason
            );
        }
        let _ = session.record_operation(event).await;
        allowed
    }
}

/// The operation a forwarding request is decided as (`ssh.port_forward`,
/// `ssh.agent_forward`).
fn forward_operation(class: &str, text: String) -> Operation {
    Operation {
        protocol: Protocol::Ssh as i32,
        action: class.trim_start_matches("ssh.").to_owned(),
        text,
        risk_classes: vec![class.to_owned()],
        ..Default::default()
    }
}

/// Whether the session's policy lets the agent forward its SSH agent to the host. The
/// same local decision as [`ConnHandler::agent_request`] makes (which records it): the
/// channel task asks too, because russh hands the request to the channel before the
/// handler has answered it, and the channel must ask the host for agent forwarding before
/// it starts the command. Approval counts as a refusal (forwarding cannot wait).
pub(crate) fn agent_forward_allowed(session: &Session) -> bool {
    let op = forward_operation(AGENT_FORWARD, AGENT_FORWARD_TEXT.into());
    session.decide(&op).decision == Decision::Allow
}

const AGENT_FORWARD: &str = "ssh.agent_forward";
const AGENT_FORWARD_TEXT: &str = "auth-agent-req";

impl server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self
            .login(
                user,
                Credential {
                    kind: Some(Kind::Password(password.to_owned())),
                },
            )
            .await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        match response {
            None => {
                self.user = user.to_owned();
                Ok(Auth::Partial {
                    name: "agentgate".into(),
                    instructions: "Log in with your agentgate token.".into(),
                    prompts: vec![("agentgate token: ".into(), false)].into(),
                })
            }
            Some(mut answers) => {
                let token = answers
                    .next()
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .unwrap_or_default();
                if token.is_empty() {
                    return Ok(Auth::reject());
                }
                Ok(self
                    .login(
                        user,
                        Credential {
                            kind: Some(Kind::Password(token)),
                        },
                    )
                    .await)
            }
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        _offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // The client proves it holds the key first; authz decides after.
        Ok(if parse_user(user).is_some() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Ok(text) = key.public_key.to_openssh() else {
            return Ok(Auth::reject());
        };
        Ok(self
            .login(
                user,
                Credential {
                    kind: Some(Kind::SshPublicKey(text)),
                },
            )
            .await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let Ok(text) = certificate.to_openssh() else {
            return Ok(Auth::reject());
        };
        Ok(self
            .login(
                user,
                Credential {
                    kind: Some(Kind::SshCertificate(text)),
                },
            )
            .await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        match (self.conn.session(), self.refusal()) {
            (Some(_), _) => {
                let conn = self.conn.clone();
                tokio::spawn(crate::channel::run(conn, channel));
            }
            (None, refusal) => {
                let message = refusal.unwrap_or_else(|| "agentgate: no session".into());
                tokio::spawn(refuse_channel(channel, message));
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        let text = format!("direct-tcpip {host_to_connect}:{port_to_connect}");
        if !self.decide_forward("ssh.port_forward", text).await {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some(up) = self.conn.upstream() else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        match up
            .handle
            .channel_open_direct_tcpip(
                host_to_connect,
                port_to_connect,
                originator_address,
                originator_port,
            )
            .await
        {
            Ok(upstream) => {
                reply.accept().await;
                tokio::spawn(crate::channel::relay_plain(channel, upstream));
            }
            Err(e) => {
                tracing::info!(error = %e, "upstream refused direct-tcpip");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        let allowed = self
            .decide_forward(
                "ssh.port_forward",
                format!("tcpip-forward {address}:{port}"),
            )
            .await;
        if !allowed {
            return Ok(false);
        }
        let Some(up) = self.conn.upstream() else {
            return Ok(false);
        };
        // The host listens; its connections come back as forwarded-tcpip channels, which
        // the upstream handler relays to the agent.
        self.conn
            .forwarding
            .remote
            .store(true, std::sync::atomic::Ordering::Release);
        match up.handle.tcpip_forward(address, *port).await {
            Ok(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                Ok(true)
            }
            Err(e) => {
                tracing::info!(error = %e, "the host refused tcpip-forward");
                Ok(false)
            }
        }
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        // Allowed: the channel asks the host for agent forwarding too (channel.rs), and the
        // host's `auth-agent@openssh.com` channels are relayed back to the agent's client
        // (upstream.rs) — only from now on, and only on this connection.
        let allowed = self
            .decide_forward(AGENT_FORWARD, AGENT_FORWARD_TEXT.into())
            .await;
        if allowed {
            self.conn
                .forwarding
                .agent
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(allowed)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }
}

/// A channel of a refused session: the first request is answered with the refusal on
/// stderr and exit status 1.
async fn refuse_channel(mut channel: Channel<Msg>, message: String) {
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Exec { .. }
            | ChannelMsg::RequestShell { .. }
            | ChannelMsg::RequestSubsystem { .. } => {
                let _ = channel
                    .extended_data_bytes(1, format!("{message}\r\n").into_bytes())
                    .await;
                let _ = channel.exit_status(1).await;
                let _ = channel.eof().await;
                let _ = channel.close().await;
                return;
            }
            ChannelMsg::Close | ChannelMsg::Eof => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_carry_role_and_connection() {
        assert_eq!(parse_user("read+web1"), Some(("read", "web1")));
        assert_eq!(parse_user("admin+db+x"), Some(("admin", "db+x")));
        assert_eq!(parse_user("web1"), None);
        assert_eq!(parse_user("+web1"), None);
        assert_eq!(parse_user("read+"), None);
    }
}
