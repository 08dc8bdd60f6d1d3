//! The first packet of a connection, which has no tag: SSLRequest, GSSENCRequest,
//! CancelRequest or a StartupMessage.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{Cursor, MAX_STARTUP_LEN, WireError};

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
/// Protocol 3.0.
const PROTOCOL_3: i32 = 196608;

/// What a client opens a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS before anything else.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the running query of the backend with this key, on a fresh connection.
    CancelRequest {
        /// The process id the client was given in BackendKeyData.
        process_id: i32,
        /// The secret key it was given.
        secret_key: i32,
    },
    /// A session start: protocol version and parameters (`user`, `database`, ...), in order.
    Startup {
        /// Major version in the upper 16 bits, minor in the lower.
        version: i32,
        /// Parameter names and values, as sent.
        params: Vec<(String, String)>,
    },
}

impl StartupPacket {
    /// Parses the body of a first packet (after its length).
    pub fn parse(body: &[u8]) -> Result<StartupPacket, WireError> {
        let mut c = Cursor::new(body, "StartupMessage");
        let code = c.i32()?;
        match code {
            SSL_REQUEST => {
                c.finish()?;
                Ok(StartupPacket::SslRequest)
            }
            GSSENC_REQUEST => {
                c.finish()?;
                Ok(StartupPacket::GssEncRequest)
            }
            CANCEL_REQUEST => {
                let process_id = c.i32()?;
                let secret_key = c.i32()?;
                c.finish()?;
                Ok(StartupPacket::CancelRequest {
                    process_id,
                    secret_key,
                })
            }
            version if version >> 16 == 3 => {
                let mut params = Vec::new();
                loop {
                    let name = c.cstr()?;
                    if name.is_empty() {
                        break;
                    }
                    let value = c.cstr()?;
                    params.push((name.to_owned(), value.to_owned()));
                }
                c.finish()?;
                Ok(StartupPacket::Startup { version, params })
            }
            other => Err(c.invalid(format!(
                "unsupported frontend protocol {}.{}: agentgate speaks 3.0",
                other >> 16,
                other & 0xffff
            ))),
        }
    }

    /// The StartupMessage body for protocol 3.0 with these parameters, for the upstream.
    pub fn startup_body<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        for (name, value) in params {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = Vec::with_capacity(body.len() + 4);
        packet.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        packet.extend_from_slice(&body);
        packet
    }

    /// An SSLRequest packet, for asking the upstream for TLS.
    pub fn ssl_request() -> [u8; 8] {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&8i32.to_be_bytes());
        p[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
        p
    }

    /// A CancelRequest packet for the given backend key, for forwarding a cancel upstream.
    pub fn cancel_request(process_id: i32, secret_key: i32) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[..4].copy_from_slice(&16i32.to_be_bytes());
        p[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
        p[8..12].copy_from_slice(&process_id.to_be_bytes());
        p[12..].copy_from_slice(&secret_key.to_be_bytes());
        p
    }
}

/// Reads one first packet, refusing lengths outside 8..=[`MAX_STARTUP_LEN`] before reading
/// the body.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, WireError> {
    let len = r.read_i32().await?;
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(if len > 0 {
            WireError::TooLong {
                len: len as usize,
                max: MAX_STARTUP_LEN,
            }
        } else {
            WireError::BadLength(len as i64)
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    StartupPacket::parse(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_startup_message() {
        let packet = StartupPacket::startup_body([("user", "read"), ("database", "prod")]);
        let got = read_startup(&mut &packet[..]).await.expect("startup");
        assert_eq!(
            got,
            StartupPacket::Startup {
                version: PROTOCOL_3,
                params: vec![
                    ("user".into(), "read".into()),
                    ("database".into(), "prod".into())
                ]
            }
        );
    }

    #[tokio::test]
    async fn reads_ssl_and_cancel_requests() {
        let ssl = StartupPacket::ssl_request();
        assert_eq!(
            read_startup(&mut &ssl[..]).await.expect("ssl"),
            StartupPacket::SslRequest
        );
        let cancel = StartupPacket::cancel_request(42, -7);
        assert_eq!(
            read_startup(&mut &cancel[..]).await.expect("cancel"),
            StartupPacket::CancelRequest {
                process_id: 42,
                secret_key: -7
            }
        );
    }

    #[tokio::test]
    async fn refuses_bad_lengths_and_versions() {
        let huge = 1_000_000i32.to_be_bytes();
        assert!(matches!(
            read_startup(&mut &huge[..]).await,
            Err(WireError::TooLong { .. })
        ));
        let mut v2 = Vec::new();
        v2.extend_from_slice(&8i32.to_be_bytes());
        v2.extend_from_slice(&(2i32 << 16).to_be_bytes());
        assert!(read_startup(&mut &v2[..]).await.is_err());
        let mut unterminated = StartupPacket::startup_body([("user", "x")]);
        unterminated.pop();
        let len = unterminated.len() as i32;
        unterminated[..4].copy_from_slice(&len.to_be_bytes());
        assert!(read_startup(&mut &unterminated[..]).await.is_err());
    }
}
