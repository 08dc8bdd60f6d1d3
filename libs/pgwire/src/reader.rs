//! Batched reading: one socket read, then every complete message it brought.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use crate::{Frame, FrameCodec, WireError};

/// Reads frames from a socket in batches: [`FrameReader::fill`] does one read, then
/// [`FrameReader::next_frame`] hands out the complete messages it brought without more
/// system calls. A proxy relays a whole batch and flushes once, which is what keeps its
/// per-message cost near a plain TCP relay's.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    codec: FrameCodec,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`, refusing messages above the codec's limit.
    pub fn new(inner: R, codec: FrameCodec) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(16 * 1024),
            codec,
        }
    }

    /// Reads once from the socket. `Ok(false)` on a clean end of stream between messages.
    pub async fn fill(&mut self) -> Result<bool, WireError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            if self.buf.is_empty() {
                return Ok(false);
            }
            return Err(WireError::Io(format!(
                "connection closed in the middle of a message ({} bytes pending)",
                self.buf.len()
            )));
        }
        Ok(true)
    }

    /// The next complete message already read, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        self.codec.decode(&mut self.buf)
    }

    /// The next message, reading as needed; `None` at a clean end of stream.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Bytes read but not yet handed out as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The socket, for the rare exchange outside framing (the TLS upgrade). Refuses when
    /// bytes are buffered: data sent before a TLS handshake must not be trusted after it.
    pub fn into_inner(self) -> Result<R, WireError> {
        if self.buf.is_empty() {
            Ok(self.inner)
        } else {
            Err(WireError::Invalid {
                message: "connection",
                reason: "data arrived ahead of the TLS handshake".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_out_every_frame_of_one_read() {
        let mut bytes = Vec::new();
        for sql in ["a", "b", "c"] {
            bytes.extend_from_slice(crate::Query::frame(sql).raw());
        }
        let mut r = FrameReader::new(&bytes[..], FrameCodec::new(1024));
        assert!(r.fill().await.expect("read"));
        let mut n = 0;
        while let Some(f) = r.next_frame().expect("frame") {
            assert_eq!(f.tag(), b'Q');
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(!r.fill().await.expect("eof"));
    }
}
