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
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    enabled: [bool; DetectorKind::ALL.len()],
    class: [u8; 256],
    ac: Option<AhoCorasick>,
    lits: Vec<Lit>,
    /// Longest literal anchor: a stream prefix defers anchors this close to its end.
    max_lit: usize,
    any: bool,
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
        let lits: Vec<Lit> = LITS.iter().copied().filter(|l| on(l.kind())).collect();
        let ac = if lits.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(lits.iter().map(|l| l.pattern))
                .ok()
        };
        let max_lit = lits.iter().map(|l| l.pattern.len()).max().unwrap_or(1);
        Scanner { enabled, class, ac, lits, max_lit, any: !kinds.is_empty() }
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
        // Anchors too close to the end of a stream prefix wait: a literal may be cut.
        let limit = if hay.eof { len } else { len.saturating_sub(self.max_lit.saturating_sub(1)) };
        if !self.any {
            return ScanEnd { resume: limit.max(pos), pending: false, lo };
        }
        let mut class_next: Option<usize> = None; // cached next single-byte anchor >= pos
        let mut lit_next: Option<(usize, usize)> = None; // cached next literal >= pos
        let mut lit_done = self.ac.is_none(); // no literal left before `limit`
        loop {
            if pos >= limit {
                break;
            }
            if class_next.is_none_or(|c| c < pos) {
                class_next = self.next_class_anchor(b, pos, limit);
            }
            if !lit_done && lit_next.is_none_or(|(p, _)| p < pos) {
                lit_next = self.next_literal(b, pos, limit);
                if lit_next.is_none() {
                    lit_done = true;
                }
            }
            let lit_pos = if lit_done { None } else { lit_next.map(|(p, _)| p) };
            let (a, decision) = match (class_next, lit_pos) {
                (None, None) => break,
                (Some(c), l) if l.is_none_or(|l| c < l) => (c, self.at_class(hay, c, lo)),
                (_, Some(l)) => {
                    let id = lit_next.map_or(0, |(_, id)| id);
                    (l, detect::literal(&hay, l, &self.lits[id]))
                }
                (Some(c), None) => (c, self.at_class(hay, c, lo)),
            };
            match decision {
                Err(NeedMore) => return ScanEnd { resume: a, pending: true, lo },
                Ok(Some(m)) => {
                    debug_assert!(m.start >= lo && m.end > m.start);
                    sink(m);
                    lo = m.end;
                    pos = m.end.max(a + 1);
                }
                Ok(None) => pos = a + 1,
            }
        }
        ScanEnd { resume: pos.max(limit), pending: false, lo }
    }

    /// The next single-byte anchor in `pos..limit`: a digit that starts a digit run, `@`, `:`.
    #[inline]
    fn next_class_anchor(&self, b: &[u8], mut pos: usize, limit: usize) -> Option<usize> {
        while pos < limit {
            let off = b[pos..limit].iter().position(|&c| self.class[c as usize] != 0)?;
            let i = pos + off;
            if self.class[b[i] as usize] == DIGIT && i > 0 {
                let p = b[i - 1];
                if p.is_ascii_digit() {
                    // inside a digit run: skip to its end
                    let run = b[i..limit].iter().position(|c| !c.is_ascii_digit());
                    pos = i + run?;
                    continue;
                }
                if glued(p) && !self.iban_possible(b, i) {
                    pos = i + 1;
                    continue;
                }
            }
            return Some(i);
        }
        None
    }

    fn next_literal(&self, b: &[u8], pos: usize, limit: usize) -> Option<(usize, usize)> {
        let ac = self.ac.as_ref()?;
        let m = ac.find(Input::new(b).span(pos..b.len()))?;
        (m.start() < limit).then(|| (m.start(), m.pattern().as_usize()))
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
        let b = h.b;
        if self.iban_possible(b, a)
            && let Some(m) = detect::iban(&h, a, lo)?
        {
            return Ok(Some(m));
        }
        let prev = h.prev(a);
        if prev.is_some_and(glued) {
            // every other digit detector refuses a number glued to a word or a decimal point
            return Ok(None);
        }
        // The shape of the run decides which detectors can match at all; most numbers in
        // text (counts, dates, times, sizes) are rejected here without running any.
        let mut e = a;
        while e - a < 20 {
            match h.get(e)? {
                Some(c) if c.is_ascii_digit() => e += 1,
                _ => break,
            }
        }
        let l = e - a;
        let next = h.get(e)?;
        let maybe = matches!(prev, Some(b'+' | b'('))
            || l >= 12
            || (matches!(next, Some(b' ' | b'-'))
                && ((3..=6).contains(&l) || (l == 1 && b[a] == b'1')))
            || (next == Some(b'.') && l <= 3);
        if !maybe {
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
        self.scan(Hay { b: input, eof: true }, 0, 0, &mut |m| out.push(m));
        out
    }
}

/// A byte that glues a following digit run to something else (a word, a decimal number).
#[inline(always)]
fn glued(p: u8) -> bool {
    p.is_ascii_alphanumeric() || p == b'.' || p == b'_'
}
