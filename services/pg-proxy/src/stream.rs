//! A connection that is plain TCP or TLS, on either side of the proxy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One end of the proxy: the agent's connection (maybe TLS-terminated here) or the
/// upstream's (maybe TLS to the database).
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS terminated by the proxy (agent side).
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS originated by the proxy (upstream side).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the bytes on this connection are encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Splits the connection for the two directions of the relay.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

/// `match` on every variant of a one-field enum, binding the field as `$s` in `$body`: the
/// stream types here only pass each call on to whichever socket they hold.
macro_rules! each_variant {
    ($value:expr, $enum:ident { $($variant:ident),+ }, $s:ident => $body:expr) => {
        match $value {
            $($enum::$variant($s) => $body,)+
        }
    };
}

/// Implements tokio's `AsyncRead` for an enum of streams by passing each call on to the
/// variant's stream.
macro_rules! pass_read_through {
    ($enum:ident { $($variant:ident),+ }) => {
        impl AsyncRead for $enum {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), $enum { $($variant),+ }, s => Pin::new(s).poll_read(cx, buf))
            }
        }
    };
}

/// Implements tokio's `AsyncWrite` for an enum of streams, as [`pass_read_through`] does
/// `AsyncRead`.
macro_rules! pass_write_through {
    ($enum:ident { $($variant:ident),+ }) => {
        impl AsyncWrite for $enum {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                each_variant!(self.get_mut(), $enum { $($variant),+ }, s => Pin::new(s).poll_write(cx, buf))
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), $enum { $($variant),+ }, s => Pin::new(s).poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), $enum { $($variant),+ }, s => Pin::new(s).poll_shutdown(cx))
            }
        }
    };
}

/// The reading side of a [`Stream`]. A plain socket splits into halves that own one
/// direction each, so the two relay tasks never wait on each other; a TLS session's state
/// serves both directions, so its halves share it behind tokio's lock.
pub enum ReadHalf {
    /// Plain TCP: lock-free.
    Plain(tokio::net::tcp::OwnedReadHalf),
    /// TLS: shared with the writing half.
    Tls(tokio::io::ReadHalf<Stream>),
}

/// The writing side of a [`Stream`]; see [`ReadHalf`].
pub enum WriteHalf {
    /// Plain TCP: lock-free.
    Plain(tokio::net::tcp::OwnedWriteHalf),
    /// TLS: shared with the reading half.
    Tls(tokio::io::WriteHalf<Stream>),
}

pass_read_through!(Stream {
    Plain,
    ServerTls,
    ClientTls
});
pass_write_through!(Stream {
    Plain,
    ServerTls,
    ClientTls
});
pass_read_through!(ReadHalf { Plain, Tls });
pass_write_through!(WriteHalf { Plain, Tls });
