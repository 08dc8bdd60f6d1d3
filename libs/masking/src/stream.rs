//! Masking byte streams cut at arbitrary points (terminal output, exec streams).

use crate::detect::{Hay, JWT_MAX, MAX_LOCAL, PEM_MAX, REACH};
use crate::{DetectorCounts, MaskReport, Masker};

/// Bytes of already-written input kept for look-behind checks ("is the byte before this card
/// number a digit?"). Detectors read at most two bytes before a match.
const CONTEXT: usize = 8;

/// The longest match any detector makes, in bytes. The streaming masker masks every secret up
/// to this length wherever the stream is cut; today the bound comes from private key blocks
/// and JWTs (16 KiB each, END marker included). Longer blocks are masked up to the bound,
/// which already destroys them as credentials.
pub const MAX_MATCH_LEN: usize = (if PEM_MAX > JWT_MAX { PEM_MAX } else { JWT_MAX }) + 64;

/// The most input a [`StreamMasker`] holds back after any call: a candidate match still
/// undecided ([`MAX_MATCH_LEN`] plus the byte after it) and the longest look-behind of a
/// detector (an email's local part, 64 bytes). About 16.5 KiB.
pub const MAX_HELD: usize = MAX_MATCH_LEN + MAX_LOCAL + 2;

/// Masks a byte stream chunk by chunk.
///
/// For any way of cutting the input into chunks, the concatenated output of
/// [`push`](Self::push) calls followed by [`finish`](Self::finish) is byte-for-byte what
/// [`Masker::mask_bytes`] gives for the whole input, so a secret split across two chunks is
/// masked. To get there the masker holds back the tail of the input that may still become
/// part of a match: a candidate whose end it has not seen yet (at most [`MAX_MATCH_LEN`]
/// bytes) and a trailing run of characters that a later `@` could turn into an email's local
/// part (at most 64). Memory is bounded by [`MAX_HELD`] plus the chunk being processed.
///
/// Held bytes add latency. An interactive proxy should call [`flush`](Self::flush) when the
/// upstream goes quiet (say, no new bytes for 20 ms): held bytes are decided as if the stream
/// ended there and written out. A secret that straddles a flush point may then be missed;
/// secrets printed in one burst are not.
///
/// Invalid UTF-8 is passed through byte for byte: detectors match ASCII only, so a cut in the
/// middle of a multi-byte character is harmless.
#[derive(Debug, Clone)]
pub struct StreamMasker {
    masker: Masker,
    /// Unwritten input, preceded by up to CONTEXT bytes already written.
    buf: Vec<u8>,
    /// `buf[..written]` has been written out.
    written: usize,
    /// Scanning resumes here.
    resume: usize,
    /// Matches may not start before this.
    lo: usize,
    /// Do not rescan before `buf` is this long (a pending candidate waits for enough bytes).
    retry_len: usize,
}

impl StreamMasker {
    pub(crate) fn new(masker: Masker) -> StreamMasker {
        StreamMasker {
            masker,
            buf: Vec::new(),
            written: 0,
            resume: 0,
            lo: 0,
            retry_len: 0,
        }
    }

    /// Feeds the next chunk; appends to `out` every byte that can be decided now, masked.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>, report: &mut MaskReport) {
        if !self.masker.inner.scanner.any() {
            out.extend_from_slice(chunk);
            return;
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() < self.retry_len {
            return;
        }
        self.run(false, out, report);
    }

    /// Decides and writes out everything held, as if the stream ended here, then goes on
    /// accepting input. Use it when the upstream is idle so that interactive output is not
    /// delayed; see the type's documentation for what it costs.
    pub fn flush(&mut self, out: &mut Vec<u8>, report: &mut MaskReport) {
        if self.masker.inner.scanner.any() {
            self.run(true, out, report);
        }
    }

    /// Ends the stream: decides and writes out everything held.
    pub fn finish(mut self, out: &mut Vec<u8>, report: &mut MaskReport) {
        self.flush(out, report);
    }

    /// How many input bytes are held back, not yet written.
    pub fn held(&self) -> usize {
        self.buf.len() - self.written
    }

    fn run(&mut self, eof: bool, out: &mut Vec<u8>, report: &mut MaskReport) {
        let masker = &self.masker;
        let buf = &self.buf;
        let mut written = self.written;
        let mut counts = DetectorCounts::default();
        let end = masker
            .inner
            .scanner
            .scan(Hay { b: buf, eof }, self.resume, self.lo, &mut |m| {
                out.extend_from_slice(&buf[written..m.start]);
                masker.render_found(m, &buf[m.start..m.end], out, &mut counts);
                written = m.end;
            });
        masker.report_counts(&counts, report);
        let len = buf.len();
        if eof {
            out.extend_from_slice(&buf[written..]);
            written = len;
            self.lo = len;
            self.resume = len;
            self.retry_len = 0;
        } else {
            self.lo = end.lo;
            self.resume = end.resume;
            let hold = hold_from(buf, end.resume, end.lo).max(written);
            out.extend_from_slice(&buf[written..hold]);
            written = hold;
            self.retry_len = if end.pending {
                // Retry when the candidate's window has doubled (or is complete), so a
                // candidate fed one byte at a time is rescanned O(log n) times, not n.
                let a = end.resume;
                (a + 2 * (len - a).max(32))
                    .min(a + MAX_MATCH_LEN + 2)
                    .max(len + 1)
            } else {
                0
            };
        }
        self.written = written;
        let drop = written.saturating_sub(CONTEXT);
        if drop > 0 {
            self.buf.drain(..drop);
            self.written -= drop;
            self.resume -= drop;
            self.lo = self.lo.saturating_sub(drop);
            self.retry_len = self.retry_len.saturating_sub(drop);
        }
    }
}

/// The first byte that a future match may still claim by looking back from an anchor at or
/// after `resume`: the start of the trailing run of [`REACH`] bytes, at most [`MAX_LOCAL`]
/// long, never before `lo`.
fn hold_from(buf: &[u8], resume: usize, lo: usize) -> usize {
    let lower = lo.max(resume.saturating_sub(MAX_LOCAL));
    let mut i = resume.max(lower);
    while i > lower && REACH[buf[i - 1] as usize] {
        i -= 1;
    }
    i
}
