//! Bounds-checked reading of message bodies.

use crate::WireError;

/// Reads the fields of one message body; every read checks the remaining length, so a
/// lying length or a missing terminator is an error, not a panic or an over-read.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor over `buf`, the body of the message named `message` (for errors).
    pub fn new(buf: &'a [u8], message: &'static str) -> Self {
        Cursor { buf, message }
    }

    fn truncated(&self) -> WireError {
        WireError::Truncated {
            message: self.message,
        }
    }

    /// An error about this message.
    pub fn invalid(&self, reason: impl Into<String>) -> WireError {
        WireError::Invalid {
            message: self.message,
            reason: reason.into(),
        }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// True when the whole body has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    /// A big-endian Int16.
    pub fn i16(&mut self) -> Result<i16, WireError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian Int32.
    pub fn i32(&mut self) -> Result<i32, WireError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian Int32 that must be at least zero.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let v = self.i32()?;
        u32::try_from(v).map_err(|_| self.invalid(format!("negative value {v}")))
    }

    /// An Int16 count that must be at least zero; checked against what is left, assuming
    /// each counted item takes at least `min_item_len` bytes, so a huge count cannot make
    /// the caller reserve memory the body cannot fill.
    pub fn count(&mut self, min_item_len: usize) -> Result<usize, WireError> {
        let v = self.i16()?;
        let n = usize::try_from(v).map_err(|_| self.invalid(format!("negative count {v}")))?;
        if n.saturating_mul(min_item_len) > self.buf.len() {
            return Err(self.truncated());
        }
        Ok(n)
    }

    /// A NUL-terminated string, without its terminator; must be UTF-8 (the proxy requires
    /// `client_encoding` UTF8 for anything it reads as text).
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let raw = self.cstr_bytes()?;
        std::str::from_utf8(raw).map_err(|_| self.invalid("string is not valid UTF-8"))
    }

    /// A NUL-terminated byte string, without its terminator.
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.invalid("string without terminator"))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// An Int32 length followed by that many bytes; length -1 is SQL NULL (`None`).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let len = self.i32()?;
        match len {
            -1 => Ok(None),
            n if n < 0 => Err(self.invalid(format!("value length {n}"))),
            n => self.bytes(n as usize).map(Some),
        }
    }

    /// Fails unless the whole body was read: trailing bytes mean the peer and the proxy
    /// disagree on the message, which must not pass silently.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.invalid(format!("{} unexpected trailing bytes", self.buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_refuses_overreads() {
        let body = [
            0, 0, 0, 3, b'a', b'b', b'c', b'x', 0, 0xff, 0xff, 0xff, 0xff,
        ];
        let mut c = Cursor::new(&body, "Test");
        assert_eq!(c.value().expect("value"), Some(&b"abc"[..]));
        assert_eq!(c.cstr().expect("cstr"), "x");
        assert_eq!(c.value().expect("null"), None);
        c.finish().expect("all read");
        assert!(matches!(c.u8(), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn counts_cannot_exceed_the_body() {
        let body = [0x7f, 0xff, 0, 0];
        let mut c = Cursor::new(&body, "Test");
        assert!(c.count(2).is_err());
        let mut c = Cursor::new(&[0xff, 0xff], "Test");
        assert!(c.count(0).is_err(), "negative count");
    }

    #[test]
    fn missing_terminator_is_an_error() {
        let mut c = Cursor::new(b"abc", "Test");
        assert!(c.cstr().is_err());
    }
}
