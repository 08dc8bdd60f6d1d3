//! The single-pass scanner: find anchors cheaply, confirm them with the detectors.
//!
//! Running one regular expression per detector over every value would cost N passes. Instead
//! the scanner walks the input once, looking for *anchors*, the bytes or literals every match
//! of some detector must contain:
//!
//! - a byte-class table for single-byte anchors: the first digit of a digit run (cards, SSN,
//!   phone, IBAN check digits, IPv4), `@` (email) and `:` (IPv6, `scheme://` credentials);
//! - one Aho-Corasick automaton (SIMD-prefiltered) over the literal prefixes of the token
//!   formats (`AKIA`, `ghp_`, `xoxb-`, `eyJ`, `-----BEGIN `, …).
//!
//! The two anchor sources are merged in position order. At each anchor only the detectors
//! that can start there run, each reading a bounded window, so text without anchors costs a
//! table lookup per byte, and the total work is linear in the input.

use aho_corasick::{AhoCorasick, Input, MatchKind};

use crate::DetectorKind;
use crate::detect::{self, Decide, Found, Hay, LITS, Lit, NeedMore};

const DIGIT: u8 = 1;
const AT: u8 = 2;
const COLON: u8 = 3;

/// Where a scan of a (possibly partial) input stopped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanEnd {
    /// Scanning must resume here when more bytes arrive: anchors before it are decided.
    pub(crate) resume: usize,
    /// True when `resume` is an anchor whose detectors need more bytes to decide.
    pub(crate) pending: bool,
    /// Matches may not start before this (the end of the last match).
    pub(crate) lo: usize,
}

/// The compiled detector set of one masker.
#[derive(Clone)]
pub(crate) struct Scanner {
    enabled: [bool; DetectorKind::ALL.len()],
    class: [u8; 256],
    ac: Option<AhoCorasick>,
    /// Per automaton pattern: its anchor literal and the token formats starting with it.
    lits: Vec<(&'static str, Vec<Lit>)>,
    /// Longest literal anchor: a stream prefix defers anchors this close to its end.
    max_lit: usize,
    /// Some detector anchored on digits is on.
    digits_on: bool,
    any: bool,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<&str> = DetectorKind::ALL
            .iter()
            .filter(|k| self.on(**k))
            .map(|k| k.name())
            .collect();
        f.debug_struct("Scanner").field("detectors", &on).finish()
    }
}

impl Scanner {
    /// A scanner for the detectors in `kinds`.
    pub(crate) fn new(kinds: &[DetectorKind]) -> Scanner {
        let mut enabled = [false; DetectorKind::ALL.len()];
        for k in kinds {
            enabled[k.index()] = true;
        }
        let on = |k: DetectorKind| enabled[k.index()];
        let mut class = [0u8; 256];
        if [
            DetectorKind::Phone,
            DetectorKind::UsSsn,
            DetectorKind::PaymentCard,
            DetectorKind::Iban,
            DetectorKind::Ipv4,
        ]
        .into_iter()
        .any(on)
        {
            for c in b'0'..=b'9' {
                class[c as usize] = DIGIT;
            }
        }
        if on(DetectorKind::Email) {
            class[b'@' as usize] = AT;
        }
        if on(DetectorKind::Ipv6) || on(DetectorKind::UrlCredentials) {
            class[b':' as usize] = COLON;
        }
        // one automaton pattern per anchor literal, with the token formats it stands for
        let mut lits: Vec<(&'static str, Vec<Lit>)> = Vec::new();
        for lit in LITS.iter().copied().filter(|l| on(l.kind())) {
            let anchor = detect::anchor_of(lit.pattern);
            match lits.iter_mut().find(|(a, _)| *a == anchor) {
                Some((_, group)) => group.push(lit),
                None => lits.push((anchor, vec![lit])),
            }
        }
        let ac = if lits.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(lits.iter().map(|(a, _)| *a))
                .ok()
        };
        let max_lit = lits.iter().map(|(a, _)| a.len()).max().unwrap_or(1);
        Scanner {
            enabled,
            class,
            ac,
            lits,
            max_lit,
            digits_on: class[b'0' as usize] == DIGIT,
            any: !kinds.is_empty(),
        }
    }

    /// The length of the longest tail of `b` that is a proper prefix of an anchor literal
    /// (0 if none): where a literal may begin that the end of a stream prefix cut. Bytes
    /// that cannot start one (zeros, most binary data) are decided at once, not held.
    fn cut_literal(&self, b: &[u8]) -> usize {
        let longest = self.max_lit.saturating_sub(1).min(b.len());
        (1..=longest)
            .rev()
            .find(|&k| {
                let tail = &b[b.len() - k..];
                self.lits
                    .iter()
                    .any(|(a, _)| a.len() > k && a.as_bytes().starts_with(tail))
            })
            .unwrap_or(0)
    }

    /// True if at least one detector is on.
    pub(crate) fn any(&self) -> bool {
        self.any
    }

    #[inline]
    fn on(&self, k: DetectorKind) -> bool {
        self.enabled[k.index()]
    }

    /// Scans `hay` from `pos`; matches never start before `lo`. Calls `sink` for every match,
    /// in order. With `hay.eof` the whole input is decided and `resume == hay.b.len()`.
    pub(crate) fn scan(
        &self,
        hay: Hay,
        mut pos: usize,
        mut lo: usize,
        sink: &mut dyn FnMut(Found),
    ) -> ScanEnd {
        let b = hay.b;
        let len = b.len();
        // Anchors from where a literal may have been cut by the end of a stream prefix wait
        // (a later literal match there would come first in position order).
        let limit = if hay.eof {
            len
        } else {
            len - self.cut_literal(b)
        };
        if !self.any {
            return ScanEnd {
                resume: limit.max(pos),
                pending: false,
                lo,
            };
        }
        let mut class_next: Option<usize> = None; // cached next single-byte anchor >= pos
        let mut class_done = false; // no single-byte anchor left before `limit`
        let mut lit_next: Option<(usize, usize)> = None; // cached next literal >= pos
        let mut lit_done = self.ac.is_none(); // no literal left before `limit`
        loop {
            if pos >= limit {
                break;
            }
            if !class_done && class_next.is_none_or(|c| c < pos) {
                class_next = self.next_class_anchor(hay, pos, limit);
                class_done = class_next.is_none();
            }
            if !lit_done && lit_next.is_none_or(|(p, _)| p < pos) {
                lit_next = self.next_literal(b, pos, limit);
                if lit_next.is_none() {
                    lit_done = true;
                }
            }
            let lit_pos = if lit_done {
                None
            } else {
                lit_next.map(|(p, _)| p)
            };
            let (a, decision) = match (class_next, lit_pos) {
                (None, None) => break,
                (Some(c), l) if l.is_none_or(|l| c < l) => (c, self.at_class(hay, c, lo)),
                (_, Some(l)) => {
                    let id = lit_next.map_or(0, |(_, id)| id);
                    (l, self.at_literal(hay, l, id))
                }
                (Some(c), None) => (c, self.at_class(hay, c, lo)),
            };
            match decision {
                Err(NeedMore) => {
                    return ScanEnd {
                        resume: a,
                        pending: true,
                        lo,
                    };
                }
                Ok(Some(m)) if m.veto => pos = m.end.max(a + 1),
                Ok(Some(m)) => {
                    debug_assert!(m.start >= lo && m.end > m.start);
                    sink(m);
                    lo = m.end;
                    pos = m.end.max(a + 1);
                }
                Ok(None) => pos = a + 1,
            }
        }
        ScanEnd {
            resume: pos.max(limit),
            pending: false,
            lo,
        }
    }

    /// The next single-byte anchor in `pos..limit` worth confirming: `@`, `:`, or a digit
    /// that starts a digit run not glued to a word or decimal point (unless two capitals
    /// before it may start an IBAN). Eight bytes at a time, with branch-free byte masks; the
    /// candidates of a word are then put through the cheap shape tests
    /// ([`Self::digit_shape`], …), so that the numbers, times and `key: value` colons that fill
    /// logs are dropped here, before any detector runs.
    #[inline]
    fn next_class_anchor(&self, hay: Hay, pos: usize, limit: usize) -> Option<usize> {
        let b = hay.b;
        let mut i = pos;
        while i + 8 <= limit {
            // Whole blocks without a single anchor byte (binary data, zeros, prose without
            // digits) are skipped with a test the compiler vectorises.
            if i + BLOCK <= limit && !self.block_may_anchor(&b[i..i + BLOCK]) {
                i += BLOCK;
                continue;
            }
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            let x = u64::from_le_bytes(w);
            let p1 = if i >= 1 { b[i - 1] } else { 0 };
            let p2 = if i >= 2 { b[i - 2] } else { 0 };
            let mut m = self.anchor_mask(x, p1, p2);
            while m != 0 {
                let k = i + (m.trailing_zeros() / 8) as usize;
                if self.worth(hay, k) {
                    return Some(k);
                }
                m &= m - 1;
            }
            i += 8;
        }
        while i < limit {
            if self.is_anchor(b, i) && self.worth(hay, i) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Whether `block` holds a digit (when a digit detector is on), `@` or `:` (when theirs
    /// are): branch-free over the block, so that it compiles to SIMD compares.
    #[inline(always)]
    fn block_may_anchor(&self, block: &[u8]) -> bool {
        let (digits, at, colon) = (
            self.digits_on,
            self.class[b'@' as usize] != 0,
            self.class[b':' as usize] != 0,
        );
        let mut hit = false;
        for &c in block {
            hit |=
                (digits & (c.wrapping_sub(b'0') < 10)) | (at & (c == b'@')) | (colon & (c == b':'));
        }
        hit
    }

    /// High bit of byte k set iff byte k of `x` is `@`, `:` or a digit that starts a digit
    /// run; `p1` is the byte before `x` (0 at the start of the input).
    #[inline(always)]
    fn anchor_mask(&self, x: u64, p1: u8, _p2: u8) -> u64 {
        let mut m = 0;
        if self.digits_on {
            let digit = between(x, b'0' - 1, b'9' + 1);
            let prev_digit = (digit << 8) | if p1.is_ascii_digit() { 0x80 } else { 0 };
            m |= digit & !prev_digit;
        }
        if self.class[b'@' as usize] != 0 {
            m |= eq(x, b'@');
        }
        if self.class[b':' as usize] != 0 {
            m |= eq(x, b':');
        }
        m
    }

    /// Byte-at-a-time version of [`Self::anchor_mask`], for the last few bytes.
    #[inline]
    fn is_anchor(&self, b: &[u8], i: usize) -> bool {
        match self.class[b[i] as usize] {
            0 => false,
            DIGIT => i == 0 || !b[i - 1].is_ascii_digit(),
            _ => true,
        }
    }

    /// Could a detector match at this anchor? `false` only when none can; `true` also when
    /// the answer depends on bytes not received yet (the detectors will then ask for them).
    #[inline(always)]
    fn worth(&self, h: Hay, a: usize) -> bool {
        match self.class[h.b[a] as usize] {
            DIGIT => {
                self.iban_possible(h.b, a)
                    || (!h.prev(a).is_some_and(glued) && self.digit_shape(&h, a).unwrap_or(true))
            }
            AT => at_shape(&h, a).unwrap_or(true),
            COLON => self.colon_shape(&h, a).unwrap_or(true),
            _ => false,
        }
    }

    /// Can a card, SSN, phone number or IPv4 address start with the digit run at `a`? Most
    /// numbers in text (counts, sizes, dates, times) are rejected by their shape.
    #[inline(always)]
    fn digit_shape(&self, h: &Hay, a: usize) -> Decide<bool> {
        let b = h.b;
        let prev = h.prev(a);
        if prev.is_some_and(glued) {
            // every detector but IBAN refuses a number glued to a word or a decimal point
            return Ok(false);
        }
        if matches!(prev, Some(b'+' | b'(')) {
            return Ok(true);
        }
        let mut e = a;
        while e - a < 12 {
            match h.get(e)? {
                Some(c) if c.is_ascii_digit() => e += 1,
                _ => break,
            }
        }
        let l = e - a;
        if l >= 12 {
            return Ok(true);
        }
        let d = |i: usize| h.is(i, |c| c.is_ascii_digit());
        Ok(match h.get(e)? {
            Some(c @ (b' ' | b'-')) => {
                // SSN: 3 digits, 2 digits, the same separator; card group, NANP: 3+ digits;
                // NANP with country code: "1 415…", "1 (415)…"
                (l == 3 && d(e + 1)? && d(e + 2)? && h.get(e + 3)? == Some(c))
                    || ((3..=6).contains(&l) && d(e + 1)? && d(e + 2)? && d(e + 3)?)
                    || (l == 1 && b[a] == b'1' && (d(e + 1)? || h.get(e + 1)? == Some(b'(')))
            }
            // IPv4 octet, NANP with dots
            Some(b'.') => l <= 3 && d(e + 1)?,
            _ => false,
        })
    }

    /// `scheme://` (URL credentials) or a colon next to a hex digit or colon (IPv6).
    #[inline]
    fn colon_shape(&self, h: &Hay, a: usize) -> Decide<bool> {
        let next = h.get(a + 1)?;
        if next == Some(b'/') {
            return Ok(self.on(DetectorKind::UrlCredentials));
        }
        Ok(self.on(DetectorKind::Ipv6)
            && (h.prev(a).is_some_and(|c| c.is_ascii_hexdigit())
                || next.is_some_and(|c| c.is_ascii_hexdigit() || c == b':')))
    }

    fn next_literal(&self, b: &[u8], pos: usize, limit: usize) -> Option<(usize, usize)> {
        let ac = self.ac.as_ref()?;
        let m = ac.find(Input::new(b).span(pos..b.len()))?;
        (m.start() < limit).then(|| (m.start(), m.pattern().as_usize()))
    }

    /// The first token format of the anchor's family whose whole prefix is at `a` decides.
    fn at_literal(&self, hay: Hay, a: usize, id: usize) -> Decide<Option<Found>> {
        let Some((_, group)) = self.lits.get(id) else {
            return Ok(None);
        };
        for lit in group {
            if detect::prefix_at(&hay, a, lit)? {
                return detect::literal(&hay, a, lit);
            }
        }
        Ok(None)
    }

    fn at_class(&self, hay: Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
        match self.class[hay.b[a] as usize] {
            DIGIT => self.at_digit(hay, a, lo),
            AT => detect::email(&hay, a, lo),
            COLON => self.at_colon(hay, a, lo),
            _ => Ok(None),
        }
    }

    fn at_digit(&self, h: Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
        if self.iban_possible(h.b, a)
            && let Some(m) = detect::iban(&h, a, lo)?
        {
            return Ok(Some(m));
        }
        if !self.digit_shape(&h, a)? {
            return Ok(None);
        }
        if self.on(DetectorKind::PaymentCard)
            && let Some(m) = detect::payment_card(&h, a)?
        {
            return Ok(Some(m));
        }
        if self.on(DetectorKind::UsSsn)
            && let Some(m) = detect::us_ssn(&h, a)?
        {
            return Ok(Some(m));
        }
        if self.on(DetectorKind::Phone)
            && let Some(m) = detect::phone(&h, a, lo)?
        {
            return Ok(Some(m));
        }
        if self.on(DetectorKind::Ipv4)
            && let Some(m) = detect::ipv4(&h, a)?
        {
            return Ok(Some(m));
        }
        Ok(None)
    }

    /// Two capital letters before the digits: an IBAN country code may be there.
    #[inline]
    fn iban_possible(&self, b: &[u8], a: usize) -> bool {
        self.on(DetectorKind::Iban)
            && a >= 2
            && b[a - 1].is_ascii_uppercase()
            && b[a - 2].is_ascii_uppercase()
    }

    fn at_colon(&self, h: Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
        if h.get(a + 1)? == Some(b'/') && h.get(a + 2)? == Some(b'/') {
            if self.on(DetectorKind::UrlCredentials) {
                return detect::url_credentials(&h, a);
            }
            return Ok(None);
        }
        if self.on(DetectorKind::Ipv6) {
            return detect::ipv6(&h, a, lo);
        }
        Ok(None)
    }

    /// All matches in a complete input.
    pub(crate) fn find_all(&self, input: &[u8]) -> Vec<Found> {
        let mut out = Vec::new();
        self.scan(
            Hay {
                b: input,
                eof: true,
            },
            0,
            0,
            &mut |m| out.push(m),
        );
        out
    }
}

/// Bytes tested at once by [`Scanner::block_may_anchor`].
const BLOCK: usize = 64;

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = ONES * 127;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// High bit of each byte of `x` that lies strictly between `lo` and `hi` (`hi <= 128`).
/// Exact per byte: no carry or borrow crosses a byte, and bytes >= 0x80 never count
/// ("hasbetween" from Bit Twiddling Hacks).
#[inline(always)]
fn between(x: u64, lo: u8, hi: u8) -> u64 {
    let lo7 = x & LOW7;
    (ONES * (127 + u64::from(hi))).wrapping_sub(lo7)
        & !x
        & (lo7 + ONES * (127 - u64::from(lo)))
        & HIGHS
}

/// High bit of each byte of `x` equal to `v` (`v < 128`), exact per byte.
#[inline(always)]
fn eq(x: u64, v: u8) -> u64 {
    let y = x ^ (ONES * u64::from(v));
    !(((y & LOW7) + LOW7) | y) & HIGHS
}

/// An email needs a local-part character before the `@` and a domain character after it.
#[inline]
fn at_shape(h: &Hay, a: usize) -> Decide<bool> {
    Ok(h.prev(a).is_some_and(|c| detect::LOCAL[c as usize])
        && h.is(a + 1, |c| c.is_ascii_alphanumeric())?)
}

/// A byte that glues a following digit run to something else (a word, a decimal number).
#[inline(always)]
fn glued(p: u8) -> bool {
    p.is_ascii_alphanumeric() || p == b'.' || p == b'_'
}
