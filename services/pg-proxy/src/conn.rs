//! One agent connection: the first packets (TLS, cancel, startup), the agent's token as its
//! password, the authz session, the upstream login, then the relay until the session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use agentgate_authz::client::Refused;
use agentgate_pgwire::{
    BackendKeyData, Frame, FrameCodec, FrameReader, StartupPacket, build, read_startup,
};
use agentgate_proto::authz::v1::{Credential, credential};
use agentgate_session::{EndReason, Session, refusal_message};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::Shared;
use crate::relay::{self, Context};
use crate::stream::Stream;
use crate::upstream::{self, UpstreamTarget};

/// Startup parameters an agent may pass to the server. Anything else is refused: a
/// parameter in the startup packet sets a server setting before any statement runs, so
/// `role` or `session_authorization` there would change identity without passing policy.
const FORWARDED_PARAMETERS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "datestyle",
    "TimeZone",
    "timezone",
    "extra_float_digits",
    "IntervalStyle",
    "intervalstyle",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "bytea_output",
    "standard_conforming_strings",
];

/// Where a cancel request for a key this proxy handed out goes.
#[derive(Clone)]
pub struct CancelTarget {
    upstream: UpstreamTarget,
    key: BackendKeyData,
}

/// Keys handed to agents, mapped to the upstream backend each session runs on.
#[derive(Default)]
pub struct CancelKeys {
    keys: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl CancelKeys {
    fn issue(&self, target: CancelTarget) -> BackendKeyData {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let key = BackendKeyData {
                process_id: rand::random::<i32>() & 0x7fff_ffff,
                secret_key: rand::random::<i32>(),
            };
            if let std::collections::hash_map::Entry::Vacant(e) =
                keys.entry((key.process_id, key.secret_key))
            {
                e.insert(target);
                return key;
            }
        }
    }

    fn find(&self, process_id: i32, secret_key: i32) -> Option<CancelTarget> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(&(process_id, secret_key)).cloned()
    }

    fn forget(&self, key: BackendKeyData) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.remove(&(key.process_id, key.secret_key));
    }
}

async fn fatal(stream: &mut Stream, code: &str, message: &str) {
    let frame = build::error("FATAL", code, message, None);
    let _ = stream.write_all(frame.raw()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Serves one accepted connection to its end. Never panics on input; every refusal is a
/// FATAL ErrorResponse the agent's client shows.
pub async fn serve(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr) {
    let _ = socket.set_nodelay(true);
    let mut stream = Stream::Plain(socket);
    let params = loop {
        let packet =
            match tokio::time::timeout(shared.config.startup_timeout, read_startup(&mut stream))
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    fatal(
                        &mut stream,
                        agentgate_pgwire::PROTOCOL_VIOLATION,
                        &format!("agentgate: invalid startup packet: {e}"),
                    )
                    .await;
                    return;
                }
                Err(_) => return,
            };
        match packet {
            StartupPacket::SslRequest => match (&stream, &shared.tls) {
                (Stream::Plain(_), Some(acceptor)) => {
                    let Stream::Plain(mut tcp) = stream else {
                        return;
                    };
                    if tcp.write_all(b"S").await.is_err() {
                        return;
                    }
                    match acceptor.accept(tcp).await {
                        Ok(tls) => stream = Stream::ServerTls(Box::new(tls)),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    }
                }
                _ => {
                    if stream.write_all(b"N").await.is_err() {
                        return;
                    }
                }
            },
            StartupPacket::GssEncRequest => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            StartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => {
                if let Some(t) = shared.cancels.find(process_id, secret_key)
                    && let Err(e) = upstream::cancel(&t.upstream, t.key).await
                {
                    tracing::debug!(error = %e, "cancel request could not be forwarded");
                }
                return;
            }
            StartupPacket::Startup { version, params } => {
                if version & 0xffff != 0 || params.iter().any(|(k, _)| k.starts_with("_pq_.")) {
                    // NegotiateProtocolVersion: 3.0, and no protocol extensions.
                    let unknown: Vec<&str> = params
                        .iter()
                        .filter(|(k, _)| k.starts_with("_pq_."))
                        .map(|(k, _)| k.as_str())
                        .collect();
                    let mut body = 0i32.to_be_bytes().to_vec();
                    body.extend_from_slice(&(unknown.len() as i32).to_be_bytes());
                    for u in &unknown {
                        body.extend_from_slice(u.as_bytes());
                        body.push(0);
                    }
                    if stream
                        .write_all(Frame::new(b'v', &body).raw())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                break params;
            }
        }
    };
    login(shared, stream, peer, params).await;
}

async fn login(
    shared: Arc<Shared>,
    mut stream: Stream,
    peer: SocketAddr,
    params: Vec<(String, String)>,
) {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(role) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            &mut stream,
            agentgate_pgwire::INVALID_AUTHORIZATION,
            "agentgate: no user given: the user name is the role to use (e.g. read)",
        )
        .await;
        return;
    };
    let role = role.to_owned();
    let connection = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&role)
        .to_owned();
    if get("replication").is_some_and(|r| r != "false" && r != "0") {
        fatal(
            &mut stream,
            agentgate_pgwire::FEATURE_NOT_SUPPORTED,
            "agentgate: replication connections are not supported",
        )
        .await;
        return;
    }
    let mut forwarded = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            _ if k.starts_with("_pq_.") => {}
            // SQL_ASCII means "no conversion": a UTF-8 server's bytes reach the client as they
            // are either way, so the proxy asks for UTF8, which it needs to read statements.
            "client_encoding" if v.eq_ignore_ascii_case("SQL_ASCII") => {
                forwarded.push((k.clone(), "UTF8".to_owned()))
            }
            "client_encoding"
                if !matches!(
                    v.to_ascii_uppercase().as_str(),
                    "UTF8" | "UTF-8" | "UNICODE"
                ) =>
            {
                fatal(
                    &mut stream,
                    agentgate_pgwire::FEATURE_NOT_SUPPORTED,
                    &format!("agentgate: client_encoding {v:?} is not supported; use UTF8"),
                )
                .await;
                return;
            }
            _ if FORWARDED_PARAMETERS.contains(&k.as_str()) => {
                forwarded.push((k.clone(), v.clone()))
            }
            _ => {
                fatal(&mut stream, agentgate_pgwire::FEATURE_NOT_SUPPORTED, &format!("agentgate: startup parameter {k:?} is not allowed through the gateway; set it with SET after connecting")).await;
                return;
            }
        }
    }
    let loopback = peer.ip().is_loopback();
    let cleartext_ok = loopback && shared.config.allow_cleartext_on_loopback;
    if !(stream.is_tls() || cleartext_ok) {
        fatal(
            &mut stream,
            agentgate_pgwire::INVALID_AUTHORIZATION,
            "agentgate: the token may only be sent over TLS: connect with sslmode=require",
        )
        .await;
        return;
    }
    // The agent's agentgate token is its password.
    if stream
        .write_all(build::authentication_cleartext().raw())
        .await
        .is_err()
    {
        return;
    }
    let token = {
        let mut reader = FrameReader::new(&mut stream, FrameCodec::new(64 * 1024));
        let frame =
            match tokio::time::timeout(shared.config.startup_timeout, reader.read_frame()).await {
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    drop(reader);
                    fatal(
                        &mut stream,
                        agentgate_pgwire::PROTOCOL_VIOLATION,
                        &format!("agentgate: {e}"),
                    )
                    .await;
                    return;
                }
            };
        if reader.buffered() != 0 {
            drop(reader);
            fatal(
                &mut stream,
                agentgate_pgwire::PROTOCOL_VIOLATION,
                "agentgate: data after the password message",
            )
            .await;
            return;
        }
        match agentgate_pgwire::password(&frame) {
            Ok(p) => p.to_owned(),
            Err(e) => {
                drop(reader);
                fatal(
                    &mut stream,
                    agentgate_pgwire::PROTOCOL_VIOLATION,
                    &format!("agentgate: expected the password message: {e}"),
                )
                .await;
                return;
            }
        }
    };
    let client = get("application_name")
        .filter(|a| !a.is_empty())
        .unwrap_or("postgres client")
        .to_owned();
    let credential = Credential {
        kind: Some(credential::Kind::Password(token)),
    };
    let session = match shared
        .gateway
        .open(credential, &connection, &role, &peer.to_string(), &client)
        .await
    {
        Ok(s) => s,
        Err(refused) => {
            let code = match &refused {
                Refused::Unauthenticated(_) => agentgate_pgwire::INVALID_PASSWORD,
                Refused::Unavailable(_) => agentgate_pgwire::CANNOT_CONNECT_NOW,
                Refused::Denied(_) | Refused::Invalid(_) => agentgate_pgwire::INVALID_AUTHORIZATION,
            };
            fatal(&mut stream, code, &refusal_message(&refused)).await;
            return;
        }
    };
    run_session(shared, stream, session, forwarded).await;
}

fn upstream_target(shared: &Shared, session: &Session) -> Result<UpstreamTarget, String> {
    let c = session.connection();
    let setting = |k: &str| c.settings.get(k).map(String::as_str);
    let tls = match setting("tls").unwrap_or("disable") {
        "disable" => None,
        "verify-full" => {
            let ca =
                setting("tls_ca").ok_or("connection setting tls = \"verify-full\" needs tls_ca")?;
            let cfg = agentgate_tls::rustls_client_config(&agentgate_tls::TlsConfig {
                ca: Some(ca.into()),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            let host = setting("tls_server_name")
                .map(str::to_owned)
                .unwrap_or_else(|| host_of(&c.upstream_address));
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| format!("tls_server_name: {e}"))?;
            Some((cfg, name))
        }
        other => {
            return Err(format!(
                "connection setting tls = {other:?}: use \"disable\" or \"verify-full\""
            ));
        }
    };
    let _ = shared;
    Ok(UpstreamTarget {
        address: c.upstream_address.clone(),
        database: setting("database").unwrap_or(&c.name).to_owned(),
        user: session.upstream().user().to_owned(),
        password: session.upstream().secret().to_vec(),
        tls,
    })
}

fn host_of(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => address.to_owned(),
    }
}

async fn run_session(
    shared: Arc<Shared>,
    mut stream: Stream,
    session: Session,
    forwarded: Vec<(String, String)>,
) {
    let target = match upstream_target(&shared, &session) {
        Ok(t) => t,
        Err(e) => {
            let message = format!(
                "agentgate: connection {:?} is misconfigured: {e}",
                session.connection().name
            );
            fatal(&mut stream, agentgate_pgwire::CANNOT_CONNECT_NOW, &message).await;
            let _ = session.close(EndReason::Error(message)).await;
            return;
        }
    };
    let up = match upstream::connect(&target, &forwarded).await {
        Ok(u) => u,
        Err(e) => {
            let code = match &e {
                upstream::UpstreamError::Refused(f) if !f.code.is_empty() => f.code.clone(),
                _ => "08006".into(),
            };
            let message = format!("agentgate: {e}");
            fatal(&mut stream, &code, &message).await;
            let _ = session.close(EndReason::Error(message)).await;
            return;
        }
    };
    let key = shared.cancels.issue(CancelTarget {
        upstream: target.clone(),
        key: up.key,
    });
    let mut hello = Vec::with_capacity(256);
    hello.extend_from_slice(build::authentication_ok().raw());
    for p in &up.parameters {
        hello.extend_from_slice(p.raw());
    }
    hello.extend_from_slice(key.frame().raw());
    hello
        .extend_from_slice(build::ready_for_query(agentgate_pgwire::TransactionStatus::Idle).raw());
    if stream.write_all(&hello).await.is_err() {
        shared.cancels.forget(key);
        let _ = session.close(EndReason::ClientClosed).await;
        return;
    }
    let catalog = shared.catalog(&session.connection().name, &target);
    let (client_r, client_w) = stream.split();
    let (up_r, up_w) = up.stream.split();
    let client_w = Arc::new(tokio::sync::Mutex::new(client_w));
    let ctx = Context::new(
        session.clone(),
        shared.classifier.clone(),
        catalog,
        shared.config.max_message_bytes,
        client_w.clone(),
    );
    let mut agent_task = tokio::spawn(relay::agent_to_upstream(ctx.clone(), client_r, up_w));
    let mut upstream_task = tokio::spawn(relay::upstream_to_agent(ctx.clone(), up_r));
    let ended = session.ended();
    let ((mut reason, mut notify), rest) = tokio::select! {
        r = &mut agent_task => (stop_of(r), Some(upstream_task)),
        r = &mut upstream_task => (stop_of(r), Some(agent_task)),
        reason = ended => {
            let notify = build::error("FATAL", agentgate_pgwire::ADMIN_SHUTDOWN, &reason.message(), None);
            agent_task.abort();
            upstream_task.abort();
            let _ = agent_task.await;
            let _ = upstream_task.await;
            ((reason, Some(notify)), None)
        }
    };
    // Both directions stop before what the server never answered is recorded. One
    // direction's end can end the other (the agent side's task drops the upstream write
    // half, which closes the upstream connection), so both may have finished by now: the
    // stop that owes the agent an error (a protocol violation) wins over the plain close
    // it caused.
    if let Some(other) = rest {
        other.abort();
        if let Ok(stop) = other.await
            && notify.is_none()
            && stop.notify.is_some()
        {
            reason = stop.reason;
            notify = stop.notify;
        }
    }
    relay::record_unanswered(&ctx, &reason.to_string()).await;
    {
        let mut w = client_w.lock().await;
        if let Some(frame) = notify {
            let _ = w.write_all(frame.raw()).await;
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
    shared.cancels.forget(key);
    drop(ctx);
    if let Err(e) = session.close(reason).await {
        tracing::warn!(session = %session.id(), error = %e, "closing the session");
    }
}

fn stop_of(r: Result<relay::Stop, tokio::task::JoinError>) -> (EndReason, Option<Frame>) {
    match r {
        Ok(stop) => (stop.reason, stop.notify),
        Err(e) => (EndReason::Error(format!("relay task failed: {e}")), None),
    }
}
