//! Fuzz target `startup`: arbitrary bytes as the first packet of a connection.
//!
//! The input is used twice: as a body for `StartupPacket::parse`, and as the stream that
//! `read_startup` reads from (over an in-memory reader that returns small chunks). What
//! `read_startup` answers must follow from its length rules and `parse`; what parses is
//! rebuilt with the crate's own packet builders and must come out byte for byte the same.
//! Any panic is a finding.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use agentgate_pgwire::{MAX_STARTUP_LEN, StartupPacket, WireError, read_startup};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

const PROTOCOL_3: i32 = 196608;

fuzz_target!(|data: &[u8]| {
    // As a body (after the length word).
    if let Ok(p) = StartupPacket::parse(data) {
        check_rebuild(&p, data);
    }

    // As a stream: length word, body, maybe more bytes the proxy would read as frames.
    let chunk = 1 + usize::from(data.last().copied().unwrap_or(0) % 13);
    let mut reader = Chunked { data, chunk };
    let got = runtime().block_on(read_startup(&mut reader));
    let consumed = data.len() - reader.data.len();
    match expected(data) {
        Ok((len, want)) => {
            assert_eq!(got, want, "read_startup vs parse");
            assert_eq!(
                consumed, len,
                "read_startup must consume exactly one packet"
            );
        }
        Err(want) => match (&got, &want) {
            (Err(WireError::Io(_)), WireError::Io(_)) => {}
            (got, want) => assert_eq!(got.as_ref(), Err(want), "read_startup length rules"),
        },
    }
    // Nothing is read past the packet, and nothing is allocated past the bound: the body
    // buffer is at most MAX_STARTUP_LEN, so consumption is bounded too.
    assert!(consumed <= MAX_STARTUP_LEN.max(4));
});

/// What `read_startup` must answer for `data`: the packet's length and the parse of its
/// body, or the framing error.
fn expected(data: &[u8]) -> Result<(usize, Result<StartupPacket, WireError>), WireError> {
    if data.len() < 4 {
        return Err(WireError::Io(String::new()));
    }
    let len = i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(if len > 0 {
            WireError::TooLong {
                len: len as usize,
                max: MAX_STARTUP_LEN,
            }
        } else {
            WireError::BadLength(i64::from(len))
        });
    }
    let len = len as usize;
    if data.len() < len {
        return Err(WireError::Io(String::new()));
    }
    Ok((len, StartupPacket::parse(&data[4..len])))
}

/// The builders write the same bytes the parser read.
fn check_rebuild(p: &StartupPacket, body: &[u8]) {
    match p {
        StartupPacket::SslRequest => {
            assert_eq!(
                &StartupPacket::ssl_request()[4..],
                body,
                "SSLRequest rebuild"
            );
        }
        StartupPacket::GssEncRequest => {
            assert_eq!(body, &80877104i32.to_be_bytes(), "GSSENCRequest body");
        }
        StartupPacket::CancelRequest {
            process_id,
            secret_key,
        } => {
            let packet = StartupPacket::cancel_request(*process_id, *secret_key);
            assert_eq!(&packet[4..], body, "CancelRequest rebuild");
            assert_eq!(StartupPacket::parse(&packet[4..]).as_ref(), Ok(p));
        }
        StartupPacket::Startup { version, params } => {
            assert_eq!(version >> 16, 3);
            for (name, value) in params {
                assert!(!name.is_empty() && !name.contains('\0') && !value.contains('\0'));
            }
            // startup_body always writes protocol 3.0; the rest must match exactly.
            let packet =
                StartupPacket::startup_body(params.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            assert_eq!(
                i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]) as usize,
                packet.len()
            );
            assert_eq!(&packet[4..8], &PROTOCOL_3.to_be_bytes());
            assert_eq!(&packet[8..], &body[4..], "StartupMessage rebuild");
            let again = StartupPacket::parse(&packet[4..]).expect("rebuilt startup parses");
            assert_eq!(
                again,
                StartupPacket::Startup {
                    version: PROTOCOL_3,
                    params: params.clone()
                }
            );
            // Through the reader too, when the rebuilt packet is within the bound.
            if packet.len() <= MAX_STARTUP_LEN {
                let mut r = &packet[..];
                let read = runtime().block_on(read_startup(&mut r));
                assert_eq!(read, Ok(again));
                assert!(r.is_empty());
            }
        }
    }
}

/// An in-memory socket that hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}
