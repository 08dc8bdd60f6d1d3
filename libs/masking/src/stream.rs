//! Masking byte streams cut at arbitrary points (terminal output, exec streams).

use std::ops::Range;

use crate::detect::{Hay, JWT_MAX, MAX_LOCAL, PEM_MAX, REACH};
use crate::scan::ScanEnd;
use crate::{DetectorCounts, MaskReport, Masker};

/// Bytes of already-written input kept for look-behind checks ("is the byte before this card
/// number a digit?"). Detectors read at most two bytes before a match.
const CONTEXT: usize = 8;

/// [`StreamMasker::push_borrowed`]: how much of a new chunk is scanned together with the
/// held bytes (in a small copy) before the rest of the chunk is scanned in place.
const JUNCTION: usize = 256;
/// Anchors at least this far into a chunk can be decided in place: no detector looks back
/// further (an email's local part, and a few bytes of context before it).
const IN_PLACE_FROM: usize = MAX_LOCAL + 2 * CONTEXT;
/// Chunks shorter than this take the copying path of [`StreamMasker::push`].
const BORROW_MIN: usize = 4 * JUNCTION;

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
    /// Scratch space of [`Self::push_borrowed`] (held bytes and the head of a chunk).
    junction: Vec<u8>,
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
            junction: Vec::new(),
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

    /// Like [`push`](Self::push), without copying what passes through unchanged: appends to
    /// `out` the output that had to be built (bytes held from earlier chunks, masked
    /// matches and what precedes them), and returns the range of `chunk` that follows it.
    /// The output of this call is `out`'s new bytes, then `chunk[range]`; the rest of
    /// `chunk` is held. A proxy relaying bulk data sends `chunk[range]` as a slice of the
    /// buffer it received: most chunks contain no secret, and their bytes are then scanned
    /// once and never copied.
    ///
    /// The result is byte-for-byte what `push` gives (and so what [`Masker::mask_bytes`]
    /// gives for the whole stream). How: the held bytes and the first [`JUNCTION`] bytes of
    /// the chunk are scanned as a stream prefix in a small copy, and the rest of the chunk
    /// in place, from the point where no detector can look back past the chunk's start (a
    /// candidate still undecided at the end of the junction is decided there too). When that
    /// does not work out — a short chunk, a candidate from earlier chunks that waits for more
    /// bytes than the junction holds, or one undecided within the chunk's first bytes — the
    /// chunk takes `push`'s copying path and the range is empty.
    pub fn push_borrowed(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) -> Range<usize> {
        let scanner = &self.masker.inner.scanner;
        if !scanner.any() {
            return 0..chunk.len();
        }
        let base = self.buf.len();
        // A candidate pending from earlier chunks is decided in the junction if the bytes it
        // waits for are there.
        if chunk.len() < BORROW_MIN || self.retry_len > base + JUNCTION {
            self.push(chunk, out, report);
            return 0..0;
        }
        let mut junction = std::mem::take(&mut self.junction);
        junction.clear();
        junction.extend_from_slice(&self.buf);
        junction.extend_from_slice(&chunk[..JUNCTION]);
        let masker = &self.masker;
        let mark = out.len();
        let mut counts = DetectorCounts::default();
        // Output written so far, in the coordinates of `buf ++ chunk`.
        let mut written = self.written;
        let head = scanner.scan(
            Hay {
                b: &junction,
                eof: false,
            },
            self.resume,
            self.lo,
            &mut |m| {
                out.extend_from_slice(&junction[written..m.start]);
                masker.render_found(m, &junction[m.start..m.end], out, &mut counts);
                written = m.end;
            },
        );
        if head.resume < base + IN_PLACE_FROM {
            // A candidate at the junction needs more than the junction holds. (One further
            // in is decided in place, where the whole chunk is at hand.)
            out.truncate(mark);
            self.junction = junction;
            self.push(chunk, out, report);
            return 0..0;
        }
        let (from, lo) = (head.resume - base, head.lo.saturating_sub(base));
        let mut tail_from = written.saturating_sub(base);
        let rest = scanner.scan(
            Hay {
                b: chunk,
                eof: false,
            },
            from,
            lo,
            &mut |m| {
                if written < base {
                    out.extend_from_slice(&junction[written..base]);
                    written = base;
                }
                out.extend_from_slice(&chunk[written - base..m.start]);
                masker.render_found(m, &chunk[m.start..m.end], out, &mut counts);
                written = base + m.end;
                tail_from = m.end;
            },
        );
        masker.report_counts(&counts, report);
        if written < base {
            // Bytes held from earlier chunks come first.
            out.extend_from_slice(&junction[written..base]);
        }
        let hold = hold_from(chunk, rest.resume, rest.lo).max(tail_from);
        // Keep the held tail and its look-behind context, in `buf`'s coordinates.
        let keep = hold.saturating_sub(CONTEXT);
        self.buf.clear();
        self.buf.extend_from_slice(&chunk[keep..]);
        self.written = hold - keep;
        self.resume = rest.resume - keep;
        self.lo = rest.lo.saturating_sub(keep);
        self.retry_len = retry_len(rest, self.buf.len(), keep);
        self.junction = junction;
        tail_from..hold
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
            self.retry_len = retry_len(end, len, 0);
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

/// How long `buf` must grow before a pending candidate is rescanned (0: none pending).
/// `end` is in coordinates `shift` bytes ahead of `buf`'s, whose length is `len`.
fn retry_len(end: ScanEnd, len: usize, shift: usize) -> usize {
    if !end.pending {
        return 0;
    }
    // Retry when the candidate's window has doubled (or is complete), so a candidate fed one
    // byte at a time is rescanned O(log n) times, not n.
    let a = end.resume - shift;
    (a + 2 * (len - a).max(32))
        .min(a + MAX_MATCH_LEN + 2)
        .max(len + 1)
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
