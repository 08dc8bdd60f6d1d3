//! The proxy's own connection to the upstream Postgres: TLS when the connection's settings
//! ask for it, and authentication with the connection's credential (SCRAM-SHA-256, MD5 or
//! cleartext, whichever the server asks for). The agent never sees that credential.

use std::sync::Arc;
use std::time::Duration;

use agentgate_pgwire::{
    BackendKeyData, ErrorFields, Frame, FrameCodec, FrameReader, StartupPacket, build,
};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::Stream;

/// How to reach and log in to one upstream database, from the connection catalog.
#[derive(Clone)]
pub struct UpstreamTarget {
    /// `host:port`.
    pub address: String,
    /// Database name on the server.
    pub database: String,
    /// The role the proxy logs in as (the session role's upstream identity).
    pub user: String,
    /// Its password. Never logged, never sent to the agent.
    pub password: Vec<u8>,
    /// TLS to the server, verified against these roots; `None` for plain TCP.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("address", &self.address)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the upstream could not be reached or refused the proxy.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Network or TLS failure.
    #[error("cannot reach the database at {address}: {reason}")]
    Connect {
        /// Upstream address.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an error (bad credential, unknown database, too many
    /// connections); its SQLSTATE is kept for the agent.
    #[error("the database refused the gateway's login: {}", .0.message)]
    Refused(ErrorFields),
    /// The server asked for something the proxy does not do.
    #[error("the database asked for {0}, which agentgate does not support")]
    Unsupported(String),
    /// The server broke the protocol.
    #[error("the database sent an invalid message: {0}")]
    Protocol(String),
}

impl From<agentgate_pgwire::WireError> for UpstreamError {
    fn from(e: agentgate_pgwire::WireError) -> Self {
        UpstreamError::Protocol(e.to_string())
    }
}

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    /// The connection, positioned after the first ReadyForQuery.
    pub stream: Stream,
    /// Every ParameterStatus the server sent, for the agent.
    pub parameters: Vec<Frame>,
    /// The server's key for cancelling this backend's queries.
    pub key: BackendKeyData,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects, negotiates TLS as configured, logs in and reads up to ReadyForQuery.
/// `params` are the startup parameters the agent may set (application name, date style...).
pub async fn connect(
    target: &UpstreamTarget,
    params: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let connect_err = |reason: String| UpstreamError::Connect {
        address: target.address.clone(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.address))
        .await
        .map_err(|_| connect_err(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match &target.tls {
        None => Stream::Plain(tcp),
        Some((config, name)) => {
            let mut tcp = tcp;
            tcp.write_all(&StartupPacket::ssl_request())
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let answer = tcp
                .read_u8()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            if answer != b'S' {
                return Err(connect_err(
                    "the server does not offer TLS, which this connection requires".into(),
                ));
            }
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| connect_err(format!("TLS: {e}")))?;
            Stream::ClientTls(Box::new(tls))
        }
    };
    let mut startup: Vec<(&str, &str)> = vec![
        ("user", target.user.as_str()),
        ("database", target.database.as_str()),
    ];
    startup.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    stream
        .write_all(&StartupPacket::startup_body(startup))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut reader = FrameReader::new(&mut stream, FrameCodec::new(1024 * 1024));
    let mut scram: Option<ScramSha256> = None;
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let frame = reader
            .read_frame()
            .await?
            .ok_or_else(|| connect_err("the server closed the connection during login".into()))?;
        let reply = match frame.tag() {
            b'R' => authentication(&frame, target, &mut scram)?,
            b'S' => {
                parameters.push(frame);
                None
            }
            b'K' => {
                key = Some(BackendKeyData::parse(&frame)?);
                None
            }
            b'N' => None,
            b'E' => return Err(UpstreamError::Refused(ErrorFields::parse(&frame)?)),
            b'Z' => break,
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during login",
                    char::from(other)
                )));
            }
        };
        if let Some(reply) = reply {
            drop(reader);
            stream
                .write_all(reply.raw())
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            reader = FrameReader::new(&mut stream, FrameCodec::new(1024 * 1024));
        }
    }
    if reader.buffered() != 0 {
        return Err(UpstreamError::Protocol(
            "data after ReadyForQuery during login".into(),
        ));
    }
    drop(reader);
    Ok(Upstream {
        stream,
        parameters,
        key: key.unwrap_or(BackendKeyData {
            process_id: 0,
            secret_key: 0,
        }),
    })
}

/// Answers one Authentication request; `None` when the server expects nothing back.
fn authentication(
    frame: &Frame,
    target: &UpstreamTarget,
    scram: &mut Option<ScramSha256>,
) -> Result<Option<Frame>, UpstreamError> {
    let mut c = agentgate_pgwire::Cursor::new(frame.body(), "Authentication");
    let code = c.i32()?;
    match code {
        0 => Ok(None),
        3 => Ok(Some(build::password(&target.password))),
        5 => {
            let salt: [u8; 4] = c
                .bytes(4)?
                .try_into()
                .map_err(|_| UpstreamError::Protocol("MD5 salt".into()))?;
            let hash = postgres_protocol::authentication::md5_hash(
                target.user.as_bytes(),
                &target.password,
                salt,
            );
            Ok(Some(build::password(hash.as_bytes())))
        }
        10 => {
            let mut offered = Vec::new();
            loop {
                let m = c.cstr()?;
                if m.is_empty() {
                    break;
                }
                offered.push(m.to_owned());
            }
            if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                return Err(UpstreamError::Unsupported(format!(
                    "SASL mechanisms {offered:?}"
                )));
            }
            let s = ScramSha256::new(&target.password, ChannelBinding::unsupported());
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::sasl_initial_response(
                SCRAM_SHA_256,
                s.message(),
                &mut buf,
            )
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            *scram = Some(s);
            Ok(Some(Frame::from_raw(buf.freeze())?))
        }
        11 => {
            let s = scram
                .as_mut()
                .ok_or_else(|| UpstreamError::Protocol("SASLContinue before SASL".into()))?;
            s.update(c.remaining())
                .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::sasl_response(s.message(), &mut buf)
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            Ok(Some(Frame::from_raw(buf.freeze())?))
        }
        12 => {
            let mut s = scram
                .take()
                .ok_or_else(|| UpstreamError::Protocol("SASLFinal before SASL".into()))?;
            // Verifies the server's signature: a server that does not know the password
            // cannot impersonate the database.
            s.finish(c.remaining())
                .map_err(|e| UpstreamError::Protocol(format!("SCRAM server signature: {e}")))?;
            Ok(None)
        }
        other => Err(UpstreamError::Unsupported(format!(
            "authentication method {other}"
        ))),
    }
}

/// Sends a CancelRequest for `key` to the upstream on a fresh connection, as a client
/// would; the server answers nothing.
pub async fn cancel(target: &UpstreamTarget, key: BackendKeyData) -> std::io::Result<()> {
    let mut tcp =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.address)).await??;
    let packet = StartupPacket::cancel_request(key.process_id, key.secret_key);
    match &target.tls {
        None => {
            tcp.write_all(&packet).await?;
            let _ = tcp.read_u8().await;
        }
        Some((config, name)) => {
            tcp.write_all(&StartupPacket::ssl_request()).await?;
            if tcp.read_u8().await? == b'S' {
                let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await?;
                tls.write_all(&packet).await?;
                let _ = tls.read_u8().await;
            }
        }
    }
    Ok(())
}
