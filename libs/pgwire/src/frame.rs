//! Framing of regular messages: one tag byte, an Int32 length that counts itself, a body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{DEFAULT_MAX_MESSAGE_LEN, WireError};

/// One whole message as it was on the wire (tag, length, body) in one shared buffer, so
/// forwarding it is a single write and cloning it costs a reference count.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// The frame of a message with this tag and body.
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::with_capacity(5 + body.len());
        raw.put_u8(tag);
        raw.put_i32((body.len() + 4) as i32);
        raw.put_slice(body);
        Frame { raw: raw.freeze() }
    }

    /// Wraps bytes that already hold exactly one message (tag, length, body).
    pub fn from_raw(raw: Bytes) -> Result<Frame, WireError> {
        if raw.len() < 5 {
            return Err(WireError::BadLength(raw.len() as i64));
        }
        let len = i32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
        if len < 4 || len as usize + 1 != raw.len() {
            return Err(WireError::BadLength(len as i64));
        }
        Ok(Frame { raw })
    }

    /// The message type byte, e.g. `b'Q'` for Query.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message body, after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The whole message, ready to write.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Length on the wire, for byte counts.
    pub fn wire_len(&self) -> usize {
        self.raw.len()
    }
}

impl std::fmt::Debug for Frame {
    // Bodies hold statements and result cells: never print them, only their shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Frame({:?}, {} bytes)",
            char::from(self.tag()),
            self.body().len()
        )
    }
}

/// Splits a byte stream into [`Frame`]s, refusing any message longer than `max_len` before
/// buffering it: the declared length is checked as soon as the five header bytes arrive.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_len: usize,
}

impl FrameCodec {
    /// A codec that refuses messages longer than `max_len` bytes (body plus length field).
    pub fn new(max_len: usize) -> Self {
        FrameCodec { max_len }
    }

    /// The limit in force.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_MESSAGE_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if src.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len < 4 {
            return Err(WireError::BadLength(len as i64));
        }
        let len = len as usize;
        if len > self.max_len {
            return Err(WireError::TooLong {
                len,
                max: self.max_len,
            });
        }
        if src.len() < len + 1 {
            // Reserve for the rest of this message only; the bound above caps it.
            src.reserve(len + 1 - src.len());
            return Ok(None);
        }
        let raw = src.split_to(len + 1).freeze();
        Ok(Some(Frame { raw }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let n = src.len();
                src.advance(n);
                Err(WireError::Io(format!(
                    "connection closed in the middle of a message ({n} bytes pending)"
                )))
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        dst.extend_from_slice(item.raw());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_joins_messages() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(Frame::new(b'Q', b"select 1\0").raw());
        buf.extend_from_slice(&Frame::new(b'S', b"").raw()[..3]);
        let q = codec.decode(&mut buf).expect("ok").expect("frame");
        assert_eq!(q.tag(), b'Q');
        assert_eq!(q.body(), b"select 1\0");
        assert_eq!(codec.decode(&mut buf).expect("ok"), None, "partial header");
        buf.extend_from_slice(&[0, 4]);
        let s = codec.decode(&mut buf).expect("ok").expect("frame");
        assert_eq!((s.tag(), s.body().len()), (b'S', 0));
    }

    #[test]
    fn refuses_oversized_and_negative_lengths_before_buffering() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::TooLong { .. })
        ));
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for the claimed size"
        );
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(codec.decode(&mut buf), Err(WireError::BadLength(3)));
    }

    #[test]
    fn eof_inside_a_message_is_an_error() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 9, b's'][..]);
        assert!(codec.decode_eof(&mut buf).is_err());
    }

    #[test]
    fn from_raw_checks_the_length() {
        assert!(Frame::from_raw(Bytes::from_static(&[b'Z', 0, 0, 0, 5, b'I'])).is_ok());
        assert!(Frame::from_raw(Bytes::from_static(&[b'Z', 0, 0, 0, 6, b'I'])).is_err());
    }
}
