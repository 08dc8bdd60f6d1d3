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
//! that can start there run, each reading a bounded window, so the total work is linear in
//! the input.
//!
//! Logs are full of numbers (timestamps, sizes, ids), and nearly all of them are no secret.
//! So single-byte anchors are sifted 64 bytes at a time before any detector sees them: a
//! block without an anchor byte is skipped by one vectorised test, and in the others each
//! byte class (digits, dots, …) becomes a bit mask, and the shape every digit detector
//! needs (a card's first 12 bytes, an SSN's `ddd-dd-dddd`, …) becomes a few shifts and ands
//! over the masks. Only the digit runs that fit some detector that is on, and the `@` and
//! `:`, reach the exact shape tests and then the detectors.

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
    /// Which digit shapes, and which single-byte anchors, can lead to a match.
    shapes: Shapes,
    /// Whole blocks are sifted by [`Scanner::block_anchors`]. Only tests turn it off, to
    /// compare with the word-at-a-time path that needs no such sifting.
    block_masks: bool,
    any: bool,
}

/// The detectors behind the single-byte anchors, as the shape tests need them: a digit run
/// is only worth confirming if the shape of some detector that is on fits it.
#[derive(Debug, Clone, Copy, Default)]
struct Shapes {
    card: bool,
    ssn: bool,
    phone: bool,
    ipv4: bool,
    iban: bool,
    at: bool,
    colon: bool,
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
            shapes: Shapes {
                card: on(DetectorKind::PaymentCard),
                ssn: on(DetectorKind::UsSsn),
                phone: on(DetectorKind::Phone),
                ipv4: on(DetectorKind::Ipv4),
                iban: on(DetectorKind::Iban),
                at: class[b'@' as usize] != 0,
                colon: class[b':' as usize] != 0,
            },
            block_masks: true,
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
        let mut blocks = BlockCache::default();
        let mut class_next: Option<usize> = None; // cached next single-byte anchor >= pos
        let mut class_done = false; // no single-byte anchor left before `limit`
        let mut lit_next: Option<(usize, usize)> = None; // cached next literal >= pos
        let mut lit_done = self.ac.is_none(); // no literal left before `limit`
        loop {
            if pos >= limit {
                break;
            }
            if !class_done && class_next.is_none_or(|c| c < pos) {
                class_next = self.next_class_anchor(hay, pos, limit, &mut blocks);
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
    /// before it may start an IBAN). Where 64 bytes and the [`AHEAD`] bytes after them are
    /// at hand, [`Self::block_anchors`] drops, with bit masks over the whole block, the digit
    /// runs whose shape fits no detector that is on (a timestamp, `1234`); the few left, and
    /// the `@` and `:`, go through the exact shape tests ([`Self::digit_shape`], …), so that
    /// the numbers, times and `key: value` colons that fill logs are dropped before any
    /// detector runs. The last bytes of the input are looked at eight at a time.
    #[inline]
    fn next_class_anchor(
        &self,
        hay: Hay,
        pos: usize,
        limit: usize,
        cache: &mut BlockCache,
    ) -> Option<usize> {
        let b = hay.b;
        let mut i = pos - pos % BLOCK;
        while self.block_masks && i < limit && i + BLOCK + AHEAD <= b.len() {
            let bits = if cache.at == Some(i) {
                cache.bits
            } else if self.block_may_anchor(&b[i..i + BLOCK]) {
                let m = self.block_anchors(b, i);
                *cache = BlockCache {
                    at: Some(i),
                    bits: m,
                };
                m
            } else {
                // Whole blocks without a single anchor byte (binary data, zeros, prose
                // without digits) are skipped with a test the compiler vectorises.
                i += BLOCK;
                continue;
            };
            let mut m = bits & (u64::MAX << (pos.max(i) - i));
            while m != 0 {
                let k = i + m.trailing_zeros() as usize;
                if k >= limit {
                    return None;
                }
                if self.worth(hay, k) {
                    return Some(k);
                }
                m &= m - 1;
            }
            i += BLOCK;
        }
        self.next_in_words(hay, pos.max(i), limit)
    }

    /// The next single-byte anchor in `pos..to` worth confirming, eight bytes at a time with
    /// branch-free byte masks (and blocks without an anchor byte skipped at once).
    #[inline]
    fn next_in_words(&self, hay: Hay, pos: usize, to: usize) -> Option<usize> {
        let b = hay.b;
        let mut i = pos;
        while i + 8 <= to {
            if i + BLOCK <= to && !self.block_may_anchor(&b[i..i + BLOCK]) {
                i += BLOCK;
                continue;
            }
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            let x = u64::from_le_bytes(w);
            let p1 = if i >= 1 { b[i - 1] } else { 0 };
            let mut m = self.anchor_mask(x, p1);
            while m != 0 {
                let k = i + (m.trailing_zeros() / 8) as usize;
                if self.worth(hay, k) {
                    return Some(k);
                }
                m &= m - 1;
            }
            i += 8;
        }
        while i < to {
            if self.is_anchor(b, i) && self.worth(hay, i) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Bit k set iff byte `i + k` may be an anchor worth confirming: `@` or `:` (when their
    /// detectors are on), or a digit starting a digit run whose surroundings fit the shape
    /// of a digit detector that is on. Needs `i + BLOCK + AHEAD <= b.len()`. Every test here
    /// is a necessary condition of a match (see the shapes below), so a cleared bit never
    /// hides one; set bits still go through [`Self::worth`].
    ///
    /// Each class of bytes (digits, dots, …) is turned into one bit per byte for the block
    /// and the [`AHEAD`] bytes after it, and the shapes become shifts and ands over those
    /// bits: a few operations for 64 bytes, where testing each digit run costs a dozen
    /// branches. Separators are mostly tested as "not a digit", which needs no class of
    /// its own; [`Self::digit_shape`] checks them exactly.
    #[inline]
    fn block_anchors(&self, b: &[u8], i: usize) -> u64 {
        let sh = self.shapes;
        let mut words = [0u64; WORDS];
        for (w, x) in words.iter_mut().enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i + 8 * w..i + 8 * w + 8]);
            *x = u64::from_le_bytes(a);
        }
        // One bit per byte of each class, 8 bytes at a time, in one u128 per class (bits 80
        // and up stand for no byte). One loop per class, so that the choice of classes is
        // made once per block.
        let class = |f: &dyn Fn(u64) -> u64| {
            let mut m = 0u128;
            for (w, &x) in words.iter().enumerate() {
                m |= u128::from(bits(f(x))) << (8 * w);
            }
            m
        };
        let none = 0u128;
        // A class of rare bytes (`+`, `@`) that the window lacks costs a quick vectorised
        // look instead of its bits.
        let mut window = [0u8; BLOCK + AHEAD];
        window.copy_from_slice(&b[i..i + BLOCK + AHEAD]);
        let at = sh.at && any_byte(&window, |c| c == b'@');
        let mut m = match (at, sh.colon) {
            (true, true) => class(&|x| eq(x, b'@') | eq(x, b':')),
            (true, false) => class(&|x| eq(x, b'@')),
            (false, true) => class(&|x| eq(x, b':')),
            (false, false) => none,
        };
        let d = if self.digits_on {
            class(&|x| between(x, b'0' - 1, b'9' + 1))
        } else {
            none
        };
        if d as u64 == 0 {
            // no digit in the block: no digit run starts there
            return m as u64;
        }
        let dot = if sh.phone || sh.ipv4 {
            class(&|x| eq(x, b'.'))
        } else {
            none
        };
        let pp = if sh.phone && any_byte(&window, |c| (c == b'+') | (c == b'(')) {
            class(&|x| eq(x, b'+') | eq(x, b'('))
        } else {
            none
        };
        let up = if sh.iban {
            class(&|x| between(x, b'A' - 1, b'Z' + 1))
        } else {
            none
        };
        // Bit j of `x >> k` tells about byte j + k; `before(x, c)` about byte j - 1, with
        // the byte before the block given.
        let before = |x: u128, c: u8, f: fn(u8) -> bool| x << 1 | u128::from(f(c));
        let p1 = if i >= 1 { b[i - 1] } else { 0 };
        let p2 = if i >= 2 { b[i - 2] } else { 0 };
        // Bit j of `n` for a non-digit: no shape reads past bit 63 + 12, inside AHEAD.
        let n = !d;
        let d2 = d & d >> 1;
        let d3 = d2 & d >> 2;
        let d4 = d2 & d2 >> 2;
        let mut fits = 0u128;
        if sh.card {
            // 12 to 19 digits, one run or groups of 3 to 6 joined by single separators
            // (`detect::payment_card`). The first 12 bytes are inside the number, so a
            // non-digit there is a separator, after the first group of 3 digits or more,
            // and followed by a group: one of 3 digits or more, or the last group, which
            // holds what is left of the 12 digits at least. So a non-digit at offset k of
            // the first 12 bytes has a digit at k + 1 and k + 2 (k <= 10) and k + 3
            // (k <= 9). A run of fewer than 12 digits followed by two non-digits (`1234567
            // May`, a timestamp) fails.
            let n1 = n & n >> 1;
            let n2 = n1 | n & n >> 2;
            let n3 = n2 | n & n >> 3;
            let c2 = n3 | n3 >> 1;
            let c4 = c2 | c2 >> 2;
            let c8 = c4 | c4 >> 4;
            fits |= d3 & !(c8 | c2 >> 8 | n2 >> 10 | n1 >> 11);
        }
        if sh.ssn {
            // `ddd-dd-dddd` or with spaces (`detect::us_ssn`)
            fits |= d3 & n >> 3 & d2 >> 4 & n >> 6 & d4 >> 7;
        }
        if sh.phone {
            // after `+` or `(`; `ddd-ddd-dddd` with spaces, dashes or dots; `1 ` and a
            // digit or `(` (`detect::phone`)
            fits |= before(pp, p1, |c| c == b'+' || c == b'(')
                | d3 & n >> 3 & d3 >> 4 & n >> 7 & d4 >> 8
                | n >> 1 & (d | pp) >> 2;
        }
        if sh.ipv4 {
            // 1 to 3 digits, a dot, 1 to 3 digits, a dot (`detect::ipv4`)
            let octet_dot = d & (dot >> 1 | d >> 1 & dot >> 2 | d2 >> 1 & dot >> 3);
            let next = dot & octet_dot >> 1;
            fits |= next >> 1 | d2 & next >> 2 | d3 & next >> 3;
        }
        if sh.iban {
            // two capitals before the check digits (`detect::iban`)
            let upper = |c: u8| c.is_ascii_uppercase();
            fits |= before(up, p1, upper) & (before(up, p1, upper) << 1 | u128::from(upper(p2)));
        }
        // digits starting a run
        m |= d & !before(d, p1, |c| c.is_ascii_digit()) & fits;
        m as u64
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
    fn anchor_mask(&self, x: u64, p1: u8) -> u64 {
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

    /// Can a card, SSN, phone number or IPv4 address start with the digit run at `a`, as far
    /// as the detectors that are on go? Most numbers in text (counts, sizes, dates, times)
    /// fit none of their shapes. Each test below is a necessary condition of its detector.
    #[inline(always)]
    fn digit_shape(&self, h: &Hay, a: usize) -> Decide<bool> {
        let sh = self.shapes;
        let b = h.b;
        let prev = h.prev(a);
        if prev.is_some_and(glued) {
            // every detector but IBAN refuses a number glued to a word or a decimal point
            return Ok(false);
        }
        if sh.phone && matches!(prev, Some(b'+' | b'(')) {
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
        let lead = b[a];
        // card numbers start with 2 to 6 (issuer prefixes, `detect::card_issuer_ok`)
        let card = sh.card && (b'2'..=b'6').contains(&lead);
        if l >= 12 {
            // only a card is a run of 12 digits or more
            return Ok(card);
        }
        let d = |i: usize| h.is(i, |c| c.is_ascii_digit());
        let Some(c @ (b' ' | b'-' | b'.')) = h.get(e)? else {
            return Ok(false);
        };
        // NANP with country code: "1 415…", "1 (415)…"
        if sh.phone && l == 1 && lead == b'1' && (d(e + 1)? || h.get(e + 1)? == Some(b'(')) {
            return Ok(true);
        }
        if !d(e + 1)? {
            return Ok(false);
        }
        // IPv4: 1 to 3 digits and a dot, twice
        if sh.ipv4 && c == b'.' && l <= 3 && octet_dot(h, e + 1)? {
            return Ok(true);
        }
        if !(3..=6).contains(&l) || !d(e + 2)? {
            return Ok(false);
        }
        // SSN: 3 digits, 2 digits, the same separator (space or dash)
        if sh.ssn && c != b'.' && l == 3 && h.get(e + 3)? == Some(c) {
            return Ok(true);
        }
        // card: a group of 3 to 6 digits, a space or dash, 3 digits or more; NANP: 3 digits,
        // 3 digits, the area code starting with 2 to 9
        Ok(((card && c != b'.') || (sh.phone && l == 3 && lead >= b'2')) && d(e + 3)?)
    }

    /// `scheme://` (URL credentials) or an IPv6 address around the colon at `a`.
    #[inline]
    fn colon_shape(&self, h: &Hay, a: usize) -> Decide<bool> {
        let next = h.get(a + 1)?;
        if next == Some(b'/') {
            return Ok(self.on(DetectorKind::UrlCredentials));
        }
        if !self.on(DetectorKind::Ipv6)
            || !(h.prev(a).is_some_and(|c| c.is_ascii_hexdigit())
                || next.is_some_and(|c| c.is_ascii_hexdigit() || c == b':'))
        {
            return Ok(false);
        }
        ipv6_colons(h, a)
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

/// Bytes tested at once by [`Scanner::block_may_anchor`] and [`Scanner::block_anchors`].
const BLOCK: usize = 64;
/// Bytes after a block that its shape tests read (the longest shape reads 12 past a digit
/// run's first digit), rounded up to whole words.
const AHEAD: usize = 16;
/// Words of 8 bytes classified per block: the block and [`AHEAD`].
const WORDS: usize = (BLOCK + AHEAD) / 8;

/// The anchors of the last block [`Scanner::block_anchors`] computed, kept for the next
/// call of one scan.
#[derive(Debug, Default, Clone, Copy)]
struct BlockCache {
    at: Option<usize>,
    bits: u64,
}

/// Whether `f` holds for a byte of `window`: branch-free, so that it compiles to SIMD.
#[inline(always)]
fn any_byte(window: &[u8; BLOCK + AHEAD], f: impl Fn(u8) -> bool) -> bool {
    let mut hit = 0u8;
    for &c in window {
        hit |= u8::from(f(c));
    }
    hit != 0
}

/// One bit per byte from the high bits of a byte mask (bit k for byte k).
#[inline(always)]
fn bits(highs: u64) -> u8 {
    // Byte k's bit lands on bit 56 + k; no two partial products overlap, so no carries.
    ((highs >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

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

/// 1 to 3 digits from `i`, then a dot: an IPv4 octet that is not the last.
#[inline]
fn octet_dot(h: &Hay, i: usize) -> Decide<bool> {
    for k in 0..3 {
        if !h.is(i + k, |c| c.is_ascii_digit())? {
            return Ok(k > 0 && h.get(i + k)? == Some(b'.'));
        }
    }
    Ok(h.get(i + 3)? == Some(b'.'))
}

/// Can an IPv6 address hold the colon at `a`? `detect::ipv6` takes at most four hex digits
/// before it, so every colon of the address is at or after `a`, and an address has a `::` or
/// at least six colons, with 1 to 4 hex digits between two colons. Times (`12:34:56`) and
/// `key:value` have neither.
#[inline]
fn ipv6_colons(h: &Hay, a: usize) -> Decide<bool> {
    let mut colon = a;
    // the second to the sixth colon
    for _ in 0..5 {
        let mut k = colon + 1;
        while k - colon <= 4 && h.is(k, |c| c.is_ascii_hexdigit())? {
            k += 1;
        }
        match h.get(k)? {
            Some(b':') if k == colon + 1 => return Ok(true),
            Some(b':') => colon = k,
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// A byte that glues a following digit run to something else (a word, a decimal number).
#[inline(always)]
fn glued(p: u8) -> bool {
    p.is_ascii_alphanumeric() || p == b'.' || p == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MaskReport, Masker, MaskingConfig, RuleConfig, Selector, Strategy};

    /// `body` followed by its Luhn check digit.
    fn luhn(body: &str) -> String {
        let mut digits: Vec<u8> = body.bytes().map(|c| c - b'0').collect();
        digits.push(0);
        let check = (0..10u8)
            .find(|&c| {
                digits[body.len()] = c;
                detect::luhn_ok(&digits)
            })
            .map_or(0, |c| c);
        format!("{body}{check}")
    }

    /// `number` cut into groups of `sizes` digits joined by `sep`.
    fn grouped(number: &str, sizes: &[usize], sep: char) -> String {
        let mut out = String::new();
        let mut at = 0;
        for (k, size) in sizes.iter().enumerate() {
            if k > 0 {
                out.push(sep);
            }
            out.push_str(&number[at..at + size]);
            at += size;
        }
        assert_eq!(at, number.len(), "groups must cover {number}");
        out
    }

    /// Card numbers at the edges of the length range, plain and grouped: 12 digits (Maestro),
    /// 13 and 19 (Visa).
    fn edge_cards() -> Vec<String> {
        let c12 = luhn("50180000000");
        let c13 = luhn("422222222222");
        let c19 = luhn("411111111111111111");
        assert_eq!((c12.len(), c13.len(), c19.len()), (12, 13, 19));
        let mut cards = vec![c12.clone(), c13.clone(), c19.clone()];
        for sep in [' ', '-'] {
            cards.push(grouped(&c12, &[4, 4, 4], sep));
            cards.push(grouped(&c12, &[6, 6], sep));
            cards.push(grouped(&c12, &[3, 3, 3, 3], sep));
            cards.push(grouped(&c12, &[5, 5, 2], sep));
            cards.push(grouped(&c13, &[4, 4, 4, 1], sep));
            cards.push(grouped(&c13, &[4, 4, 5], sep));
            cards.push(grouped(&c19, &[4, 4, 4, 4, 3], sep));
            cards.push(grouped(&c19, &[6, 6, 6, 1], sep));
        }
        cards
    }

    /// Digit-dense text as ssh-proxy relays it: timestamps, ids, sizes, addresses.
    const LOG_LINE: &str = "2026-11-26T12:00:00.123Z INFO req=4f2a9c user=42 path=/api/v1/items?id=1234 took 12 ms from 10.1.2.3:5678\n";

    fn filler(len: usize) -> String {
        LOG_LINE.chars().cycle().take(len).collect()
    }

    /// The same detectors without the block masks: the word-at-a-time path.
    fn without_masks(kinds: &[DetectorKind]) -> Scanner {
        let mut s = Scanner::new(kinds);
        s.block_masks = false;
        s
    }

    fn card_masker() -> Masker {
        let config = MaskingConfig {
            rules: vec![RuleConfig {
                name: "cards".into(),
                selector: Selector::Detector(DetectorKind::PaymentCard),
                strategy: Strategy::Redact,
            }],
        };
        Masker::new(&config, None).expect("valid config")
    }

    #[test]
    fn bits_gives_one_bit_per_byte() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let highs = x & HIGHS;
            let want = (0..8).fold(0u8, |m, k| {
                m | (u8::from(highs >> (8 * k + 7) & 1 == 1) << k)
            });
            assert_eq!(bits(highs), want, "{highs:#x}");
        }
    }

    #[test]
    fn edge_cards_are_found_at_every_offset_of_a_block() {
        let kinds = [
            vec![DetectorKind::PaymentCard],
            vec![
                DetectorKind::Email,
                DetectorKind::PaymentCard,
                DetectorKind::AwsAccessKey,
            ],
            DetectorKind::ALL.to_vec(),
        ];
        for kinds in &kinds {
            let (masked, plain) = (Scanner::new(kinds), without_masks(kinds));
            for card in edge_cards() {
                // every position of the card relative to a block, and near the input's end
                for offset in 0..2 * BLOCK + AHEAD {
                    let text = format!("{} {card} ms {}", filler(offset), filler(150));
                    for input in [text.as_str(), &text[..offset + 1 + card.len()]] {
                        let found = masked.find_all(input.as_bytes());
                        let card_at = |f: &Found| {
                            f.kind == DetectorKind::PaymentCard
                                && f.start == offset + 1
                                && f.end == offset + 1 + card.len()
                        };
                        assert!(
                            found.iter().any(card_at),
                            "{card:?} at {offset} not found with {kinds:?}"
                        );
                        assert_eq!(found, plain.find_all(input.as_bytes()), "{input:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn digit_runs_below_the_threshold_are_not_cards() {
        let (masked, plain) = (
            Scanner::new(&[DetectorKind::PaymentCard]),
            without_masks(&[DetectorKind::PaymentCard]),
        );
        let c12 = luhn("50180000000");
        let c13 = luhn("422222222222");
        let short = [
            c12[..11].to_owned(),
            c13[..11].to_owned(),
            grouped(&c12[..11], &[4, 4, 3], ' '),
            grouped(&c12[..11], &[4, 4, 3], '-'),
            grouped(&c12[..11], &[3, 3, 3, 2], ' '),
            grouped(&c12[..11], &[6, 5], '-'),
        ];
        for number in &short {
            for offset in 0..BLOCK + 8 {
                let input = format!("{} {number} ms {}", filler(offset), filler(150));
                assert!(masked.find_all(input.as_bytes()).is_empty(), "{input:?}");
                assert!(plain.find_all(input.as_bytes()).is_empty(), "{input:?}");
            }
        }
        // Plain runs of fewer than 12 digits followed by text never reach the shape tests,
        // nor do the numbers of a log line; a run of 12 digits does.
        for len in 1..=12 {
            let input = format!("x {} ms {}", &c13[..len], filler(100));
            let bits = masked.block_anchors(input.as_bytes(), 0);
            assert_eq!(bits & (1 << 2) != 0, len == 12, "{len} digits");
        }
        let line = filler(BLOCK + AHEAD);
        assert_eq!(masked.block_anchors(line.as_bytes(), 0), 0, "{line:?}");
    }

    #[test]
    fn card_split_across_chunks_at_every_position_is_masked() {
        let masker = card_masker();
        for card in edge_cards() {
            let before = filler(3000);
            let text = format!("{before} {card} ms {}", filler(3000));
            let mut r = MaskReport::new();
            let whole = masker.mask_bytes(text.as_bytes(), &mut r).into_owned();
            assert_eq!(r.count("cards"), 1, "{card}");
            let start = before.len() + 1;
            // every cut inside the card and a few bytes around it, and cuts that put the card
            // at the junction of the next chunk
            let cuts = (start - 4..start + card.len() + 4).chain(start - 300..start - 200);
            for cut in cuts {
                for borrowed in [false, true] {
                    let mut s = masker.stream();
                    let mut out = Vec::new();
                    let mut r = MaskReport::new();
                    for piece in [&text.as_bytes()[..cut], &text.as_bytes()[cut..]] {
                        if borrowed {
                            let mut built = Vec::new();
                            let range = s.push_borrowed(piece, &mut built, &mut r);
                            out.extend_from_slice(&built);
                            out.extend_from_slice(&piece[range]);
                        } else {
                            s.push(piece, &mut out, &mut r);
                        }
                    }
                    s.finish(&mut out, &mut r);
                    assert!(out == whole, "{card} cut at {cut} (borrowed: {borrowed})");
                    assert_eq!(r.count("cards"), 1);
                }
            }
        }
    }

    #[test]
    fn block_masks_change_no_match() {
        // Pseudo-random digit-dense text with secrets in it, scanned with and without the
        // block masks, for the recommended detectors and each digit detector alone.
        const PIECES: &[&str] = &[
            "4111 1111 1111 1111",
            "5555555555554444",
            "378282246310005",
            "123-45-6789",
            "123 45 6789",
            "(415) 555-2671",
            "415.555.2671",
            "1 415 555 2671",
            "+44 20 7946 0958",
            "10.1.2.3",
            "1.2.3.4.5",
            "DE89 3704 0044 0532 0130 00",
            "GB82WEST12345698765432",
            "fe80::1",
            "1:2:3:4:5:6:7:8",
            "12:34:56",
            "2024-05-01T12:34:56.789Z",
            "ann@example.com",
            "1234.56",
            "12345678901",
        ];
        let mut sets: Vec<Vec<DetectorKind>> = vec![DetectorKind::ALL.to_vec()];
        for k in [
            DetectorKind::PaymentCard,
            DetectorKind::UsSsn,
            DetectorKind::Phone,
            DetectorKind::Ipv4,
            DetectorKind::Iban,
            DetectorKind::Ipv6,
        ] {
            sets.push(vec![k]);
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as usize
        };
        for _ in 0..300 {
            let mut input = Vec::new();
            while input.len() < 600 {
                match next(4) {
                    0 | 1 => input.extend_from_slice(PIECES[next(PIECES.len() as u64)].as_bytes()),
                    2 => input.push(b"0123456789 -.:+(A"[next(17)]),
                    _ => input.push(b" x\n"[next(3)]),
                }
            }
            for kinds in &sets {
                let (masked, plain) = (Scanner::new(kinds), without_masks(kinds));
                assert_eq!(
                    masked.find_all(&input),
                    plain.find_all(&input),
                    "{kinds:?} {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    #[test]
    fn colons_of_times_are_no_ipv6_anchor() {
        let s = Scanner::new(&[DetectorKind::Ipv6]);
        let shape = |t: &str| {
            let hay = Hay {
                b: t.as_bytes(),
                eof: true,
            };
            s.colon_shape(&hay, t.find(':').map_or(0, |a| a))
        };
        for t in [
            "12:34:56.789Z",
            "09:45 report",
            "key:value",
            "a1:b2:c3:d4:e5",
        ] {
            assert_eq!(shape(t), Ok(false), "{t}");
        }
        for t in [
            "fe80::1",
            "2001:db8::8a2e:370:7334",
            "1:2:3:4:5:6:7:8",
            "::ffff:1.2.3.4",
        ] {
            assert_eq!(shape(t), Ok(true), "{t}");
        }
        // a stream prefix that ends inside the address asks for more
        let hay = Hay {
            b: b"2001:db8:1",
            eof: false,
        };
        assert_eq!(s.colon_shape(&hay, 4), Err(NeedMore));
    }
}
