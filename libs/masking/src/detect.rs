//! Content detectors: each confirms one kind of secret at an anchor the scanner found.
//!
//! Every detector is a hand-written, bounded, forward-only (plus a bounded look-behind)
//! recogniser. None backtracks: each reads at most a fixed number of bytes around its anchor
//! (see the constants below), so a scan is linear in the input whatever the input is.
//!
//! Detectors read through [`Hay`], which knows whether the bytes it holds are the whole input
//! (`eof`) or a prefix of a stream. Reading past the end of a prefix yields [`NeedMore`]
//! instead of a guess, which is what makes the streaming masker give exactly the answer the
//! whole-value masker gives: a detector decides only on bytes it has actually seen.

use std::net::Ipv6Addr;

use base64::Engine as _;

use crate::DetectorKind;

/// Longest local part of an email address (RFC 5321), and so the longest look-behind of any
/// detector from its anchor.
pub(crate) const MAX_LOCAL: usize = 64;
/// Longest domain of an email address.
const MAX_DOMAIN: usize = 253;
/// Longest private key block the detector masks as one match; a longer block is masked up to
/// this length (which destroys it as a key).
pub(crate) const PEM_MAX: usize = 16 * 1024;
/// Longest JWT masked as one match; a longer one is masked up to this length.
pub(crate) const JWT_MAX: usize = 16 * 1024;
/// Longest variable-length API token body.
const TOKEN_MAX: usize = 1024;

/// The detector could not decide without bytes beyond the end of a stream prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NeedMore;

/// A decision, or a request for more bytes.
pub(crate) type Decide<T> = Result<T, NeedMore>;

/// A confirmed match: `start..end` in the haystack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) kind: DetectorKind,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Not a match: the span is recognised as something that is not secret, and scanning
    /// skips it without masking (a mistyped IBAN).
    pub(crate) veto: bool,
}

/// The bytes a detector may read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hay<'a> {
    pub(crate) b: &'a [u8],
    /// True when `b` ends where the input ends; false when more may follow (a stream).
    pub(crate) eof: bool,
}

impl Hay<'_> {
    /// The byte at `i`; `None` past the end of the input; `NeedMore` past the end of a prefix.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> Decide<Option<u8>> {
        match self.b.get(i) {
            Some(&c) => Ok(Some(c)),
            None if self.eof => Ok(None),
            None => Err(NeedMore),
        }
    }

    /// The byte before `i`, if any.
    #[inline(always)]
    pub(crate) fn prev(&self, i: usize) -> Option<u8> {
        if i == 0 {
            None
        } else {
            self.b.get(i - 1).copied()
        }
    }

    #[inline(always)]
    pub(crate) fn is(&self, i: usize, f: impl Fn(u8) -> bool) -> Decide<bool> {
        Ok(self.get(i)?.is_some_and(f))
    }
}

const fn class(ranges: &[(u8, u8)], singles: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < ranges.len() {
        let (lo, hi) = ranges[i];
        let mut c = lo as usize;
        while c <= hi as usize {
            t[c] = true;
            c += 1;
        }
        i += 1;
    }
    let mut j = 0;
    while j < singles.len() {
        t[singles[j] as usize] = true;
        j += 1;
    }
    t
}

const ALNUM_R: [(u8, u8); 3] = [(b'0', b'9'), (b'A', b'Z'), (b'a', b'z')];
/// Characters of an email local part (the common subset of RFC 5322 atext, plus dots).
pub(crate) const LOCAL: [bool; 256] = class(&ALNUM_R, b"._%+-'");
/// Characters of a domain label.
const LABEL: [bool; 256] = class(&ALNUM_R, b"-");
const HEX: [bool; 256] = class(&[(b'0', b'9'), (b'A', b'F'), (b'a', b'f')], b"");
pub(crate) const ALNUM: [bool; 256] = class(&ALNUM_R, b"");
const ALNUM_UNDERSCORE: [bool; 256] = class(&ALNUM_R, b"_");
const UPPER_ALNUM: [bool; 256] = class(&[(b'0', b'9'), (b'A', b'Z')], b"");
const B64URL: [bool; 256] = class(&ALNUM_R, b"_-");
const B64: [bool; 256] = class(&ALNUM_R, b"+/=");
const SLACK: [bool; 256] = class(&ALNUM_R, b"-");
const SLACK_HOOK: [bool; 256] = class(&ALNUM_R, b"/");
const SENDGRID: [bool; 256] = class(&ALNUM_R, b"_-.");
/// What may appear inside a PEM block between BEGIN and END: base64, whitespace, header
/// lines (`Proc-Type: 4,ENCRYPTED`), and the `\n` escapes of a key inside JSON text.
const PEM_BODY: [bool; 256] = class(&ALNUM_R, b"+/= \t\r\n:,-\\");
/// Bytes that may precede an anchor inside a match (email local part, IBAN country code,
/// the `+` or `(` of a phone number, the first hex group of an IPv6 address). The stream
/// masker holds back a trailing run of these, because a later anchor may claim them.
pub(crate) const REACH: [bool; 256] = class(&ALNUM_R, b"._%+-'(");

#[inline(always)]
fn is_digit(c: u8) -> bool {
    c.is_ascii_digit()
}

/// Reads exactly `n` digits at `i`; their value, or `None` if one is not a digit.
fn digits(h: &Hay, i: usize, n: usize) -> Decide<Option<u32>> {
    let mut v = 0u32;
    for k in 0..n {
        match h.get(i + k)? {
            Some(c) if is_digit(c) => v = v * 10 + u32::from(c - b'0'),
            _ => return Ok(None),
        }
    }
    Ok(Some(v))
}

fn found(kind: DetectorKind, start: usize, end: usize) -> Decide<Option<Found>> {
    Ok(Some(Found {
        kind,
        start,
        end,
        veto: false,
    }))
}

// ---------------------------------------------------------------------------------------
// email

/// Anchor: the `@` at `a`. The local part is found by looking back at most [`MAX_LOCAL`]
/// bytes, never before `lo` (the end of the previous match).
pub(crate) fn email(h: &Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
    let b = h.b;
    let lower = lo.max(a.saturating_sub(MAX_LOCAL));
    let mut s = a;
    while s > lower && LOCAL[b[s - 1] as usize] {
        s -= 1;
    }
    if s == lower && s > lo && s > 0 && LOCAL[b[s - 1] as usize] {
        return Ok(None); // local part longer than 64: not an address
    }
    // a local part does not start with a dot; a leading quote is the text's, not the
    // address's ('alice@example.com')
    while s < a && (b[s] == b'.' || b[s] == b'\'') {
        s += 1;
    }
    if s == a || b[a - 1] == b'.' {
        return Ok(None);
    }
    let d0 = a + 1;
    let mut i = d0;
    let mut labels = 0usize;
    let mut end = None;
    let mut first_label = (d0, d0);
    loop {
        let ls = i;
        while i - d0 < MAX_DOMAIN {
            match h.get(i)? {
                Some(c) if LABEL[c as usize] => i += 1,
                _ => break,
            }
        }
        let len = i - ls;
        if len == 0 || len > 63 || b[ls] == b'-' || b[i - 1] == b'-' {
            break;
        }
        labels += 1;
        if labels == 1 {
            first_label = (ls, i);
        }
        if labels >= 2 && (2..=24).contains(&len) && b[ls..i].iter().all(u8::is_ascii_alphabetic) {
            end = Some(i);
        }
        if i - d0 < MAX_DOMAIN && h.get(i)? == Some(b'.') && h.is(i + 1, |c| LABEL[c as usize])? {
            i += 1;
        } else {
            break;
        }
    }
    let Some(e) = end else { return Ok(None) };
    // `icon@2x.png`: an image name, not an address.
    let fl = &b[first_label.0..first_label.1];
    if fl.len() >= 2 && fl[fl.len() - 1] == b'x' && fl[..fl.len() - 1].iter().all(|c| is_digit(*c))
    {
        return Ok(None);
    }
    found(DetectorKind::Email, s, e)
}

// ---------------------------------------------------------------------------------------
// phone

/// Anchor: a digit run starting at `a`, possibly preceded by `+` or `(`.
pub(crate) fn phone(h: &Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
    match h.prev(a) {
        Some(b'+') => {
            let s = a - 1;
            if s < lo
                || h.prev(s)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'+')
            {
                return Ok(None);
            }
            phone_international(h, s, a)
        }
        Some(b'(') => {
            let s = a - 1;
            if s < lo || h.prev(s).is_some_and(|c| c.is_ascii_alphanumeric()) {
                return Ok(None);
            }
            phone_nanp(h, s, a, true)
        }
        Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'/') => Ok(None),
        _ => phone_nanp(h, a, a, false),
    }
}

/// `+` country code and subscriber number: 8 to 15 digits in groups separated by one space,
/// dash or dot, or by parentheses.
fn phone_international(h: &Hay, s: usize, a: usize) -> Decide<Option<Found>> {
    let mut i = a;
    let mut n = 0usize;
    let mut last = a;
    loop {
        match h.get(i)? {
            Some(c) if is_digit(c) => {
                n += 1;
                if n > 15 {
                    return Ok(None);
                }
                i += 1;
                last = i;
            }
            Some(c @ (b' ' | b'-' | b'.' | b'(' | b')')) => {
                let skip = match (c, h.get(i + 1)?) {
                    (b')', Some(b' ' | b'-' | b'.')) | (b' ' | b'-' | b'.', Some(b'(')) => 2,
                    _ => 1,
                };
                if h.is(i + skip, is_digit)? {
                    i += skip;
                } else {
                    break;
                }
            }
            _ => break,
        }
    }
    if n < 8 || h.is(last, |c| c.is_ascii_alphanumeric())? {
        return Ok(None);
    }
    found(DetectorKind::Phone, s, last)
}

/// North American numbers written with separators: `[1 ](NXX) NXX-XXXX`, `NXX-NXX-XXXX`,
/// `NXX.NXX.XXXX`, `NXX NXX XXXX`. A bare run of ten digits is not taken: too many other
/// numbers look like that.
fn phone_nanp(h: &Hay, s: usize, a: usize, mut paren: bool) -> Decide<Option<Found>> {
    let b = h.b;
    let mut i = a;
    if !paren
        && b[a] == b'1'
        && let Some(b' ' | b'-' | b'.') = h.get(a + 1)?
    {
        match h.get(a + 2)? {
            Some(b'(') => {
                paren = true;
                i = a + 3;
            }
            Some(c) if is_digit(c) => i = a + 2,
            _ => return Ok(None),
        }
    }
    let Some(area) = digits(h, i, 3)? else {
        return Ok(None);
    };
    i += 3;
    let sep1;
    if paren {
        if h.get(i)? != Some(b')') {
            return Ok(None);
        }
        i += 1;
        match h.get(i)? {
            Some(c @ (b' ' | b'-')) => {
                sep1 = Some(c);
                i += 1;
            }
            _ => sep1 = None,
        }
    } else {
        match h.get(i)? {
            Some(c @ (b' ' | b'-' | b'.')) => {
                sep1 = Some(c);
                i += 1;
            }
            _ => return Ok(None),
        }
    }
    let Some(exchange) = digits(h, i, 3)? else {
        return Ok(None);
    };
    i += 3;
    match h.get(i)? {
        Some(c @ (b' ' | b'-' | b'.')) if paren || Some(c) == sep1 => i += 1,
        _ => return Ok(None),
    }
    if digits(h, i, 4)?.is_none() {
        return Ok(None);
    }
    i += 4;
    if area / 100 < 2 || exchange / 100 < 2 {
        return Ok(None);
    }
    match h.get(i)? {
        Some(c) if c.is_ascii_alphanumeric() => return Ok(None),
        Some(b'-' | b'.') if h.is(i + 1, is_digit)? => return Ok(None),
        _ => {}
    }
    found(DetectorKind::Phone, s, i)
}

// ---------------------------------------------------------------------------------------
// US SSN

/// Anchor: a digit run at `a`. `AAA-GG-SSSS` (or spaces), with the never-issued ranges
/// excluded.
pub(crate) fn us_ssn(h: &Hay, a: usize) -> Decide<Option<Found>> {
    if let Some(p) = h.prev(a) {
        if p.is_ascii_alphanumeric() || p == b'_' || p == b'.' {
            return Ok(None);
        }
        if matches!(p, b'-' | b'/') && h.prev(a - 1).is_some_and(is_digit) {
            return Ok(None);
        }
    }
    let Some(area) = digits(h, a, 3)? else {
        return Ok(None);
    };
    let sep = match h.get(a + 3)? {
        Some(c @ (b'-' | b' ')) => c,
        _ => return Ok(None),
    };
    let Some(group) = digits(h, a + 4, 2)? else {
        return Ok(None);
    };
    if h.get(a + 6)? != Some(sep) {
        return Ok(None);
    }
    let Some(serial) = digits(h, a + 7, 4)? else {
        return Ok(None);
    };
    let end = a + 11;
    match h.get(end)? {
        Some(c) if c.is_ascii_alphanumeric() || c == b'_' => return Ok(None),
        Some(b'-' | b'.') if h.is(end + 1, is_digit)? => return Ok(None),
        _ => {}
    }
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return Ok(None);
    }
    found(DetectorKind::UsSsn, a, end)
}

// ---------------------------------------------------------------------------------------
// payment card

/// Anchor: a digit run at `a`. 12 to 19 digits, one run or groups of 3 to 6 separated by
/// one kind of separator (space or dash); known issuer prefix and length; Luhn.
pub(crate) fn payment_card(h: &Hay, a: usize) -> Decide<Option<Found>> {
    if h.prev(a)
        .is_some_and(|p| p.is_ascii_alphanumeric() || p == b'.' || p == b'_')
    {
        return Ok(None);
    }
    // The groups of an IBAN written in fours ("DE12 3456 …") are not a card number, even
    // when the IBAN is mistyped and its checksum fails.
    let b = h.b;
    if a >= 5
        && b[a - 1] == b' '
        && b[a - 3..a - 1].iter().all(u8::is_ascii_digit)
        && b[a - 5..a - 3].iter().all(u8::is_ascii_uppercase)
    {
        return Ok(None);
    }
    let mut ds = [0u8; 19];
    let mut n = 0usize;
    let mut i = a;
    let mut sep: Option<u8> = None;
    loop {
        let gs = n;
        while let Some(c) = h.get(i)? {
            if !is_digit(c) {
                break;
            }
            if n == ds.len() {
                return Ok(None); // longer than any card number
            }
            ds[n] = c - b'0';
            n += 1;
            i += 1;
        }
        let glen = n - gs;
        let next = h.get(i)?;
        let continues = matches!(next, Some(b' ' | b'-'))
            && (sep.is_none() || sep == next)
            && h.is(i + 1, is_digit)?;
        if continues && !(3..=6).contains(&glen) {
            // grouped: every group but the last has 3..=6 digits
            return Ok(None);
        }
        if sep.is_some() && !continues && !(1..=6).contains(&glen) {
            // the last group holds the rest: 1..=6 digits (4-4-4-1, 4-4-4-2, 4-6-5, …)
            return Ok(None);
        }
        if continues {
            sep = next;
            i += 1;
        } else {
            if next.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                return Ok(None);
            }
            break;
        }
    }
    let d = &ds[..n];
    if !(12..=19).contains(&n) || !card_issuer_ok(d) || !luhn_ok(d) {
        return Ok(None);
    }
    found(DetectorKind::PaymentCard, a, i)
}

/// Known issuer identification number ranges and their lengths.
fn card_issuer_ok(d: &[u8]) -> bool {
    let len = d.len();
    let p = |k: usize| d[..k].iter().fold(0u32, |v, x| v * 10 + u32::from(*x));
    let (p2, p3, p4, p6) = (p(2), p(3), p(4), p(6));
    let visa = d[0] == 4 && matches!(len, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16;
    let amex = (p2 == 34 || p2 == 37) && len == 15;
    let discover =
        (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || (622126..=622925).contains(&p6))
            && (16..=19).contains(&len);
    let jcb = (3528..=3589).contains(&p4) && (16..=19).contains(&len);
    let diners = ((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 || p4 == 3095)
        && (14..=19).contains(&len);
    let unionpay = p2 == 62 && (16..=19).contains(&len);
    let maestro = matches!(
        p4,
        5018 | 5020 | 5038 | 5893 | 6304 | 6759 | 6761 | 6762 | 6763
    ) && (12..=19).contains(&len);
    visa || mastercard || amex || discover || jcb || diners || unionpay || maestro
}

/// The Luhn (mod 10) check digit test.
pub(crate) fn luhn_ok(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, x) in d.iter().rev().enumerate() {
        let mut v = u32::from(*x);
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

// ---------------------------------------------------------------------------------------
// IBAN

/// IBAN length per country (SWIFT IBAN registry).
fn iban_len(cc: [u8; 2]) -> Option<usize> {
    Some(match &cc {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" | b"SD" | b"FK" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" | b"MN" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"OM" | b"SO" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"LY" | b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"BI" | b"DJ" | b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"NI" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" | b"YE" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        b"RU" => 33,
        _ => return None,
    })
}

/// Anchor: the check digits at `a`, after two capital letters. Plain or grouped by single
/// spaces; the country's length; ISO 7064 mod 97-10.
pub(crate) fn iban(h: &Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
    let b = h.b;
    if a < 2 || a - 2 < lo {
        return Ok(None);
    }
    let s = a - 2;
    let cc = [b[s], b[s + 1]];
    if !cc.iter().all(u8::is_ascii_uppercase)
        || h.prev(s).is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Ok(None);
    }
    let Some(len) = iban_len(cc) else {
        return Ok(None);
    };
    let mut chars = [0u8; 34];
    chars[0] = cc[0];
    chars[1] = cc[1];
    let mut n = 2;
    let mut i = a;
    while n < len {
        match h.get(i)? {
            Some(c) if UPPER_ALNUM[c as usize] => {
                chars[n] = c;
                n += 1;
                i += 1;
            }
            Some(b' ') if n >= 4 && h.is(i + 1, |c| UPPER_ALNUM[c as usize])? => i += 1,
            _ => return Ok(None),
        }
    }
    if !chars[2].is_ascii_digit() || !chars[3].is_ascii_digit() {
        return Ok(None);
    }
    if h.is(i, |c| c.is_ascii_alphanumeric() || c == b'_')? {
        return Ok(None);
    }
    if !iban_checksum_ok(&chars[..len]) {
        // Shaped exactly like an IBAN of its country, checksum wrong: a mistyped IBAN. Not
        // masked, and not handed to the other detectors either (its digit groups are not a
        // card number).
        return Ok(Some(Found {
            kind: DetectorKind::Iban,
            start: s,
            end: i,
            veto: true,
        }));
    }
    found(DetectorKind::Iban, s, i)
}

/// ISO 13616 check: move the first four characters to the end, letters to 10..35, mod 97.
pub(crate) fn iban_checksum_ok(chars: &[u8]) -> bool {
    let mut r = 0u32;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        if c.is_ascii_digit() {
            r = (r * 10 + u32::from(c - b'0')) % 97;
        } else if c.is_ascii_uppercase() {
            r = (r * 100 + u32::from(c - b'A') + 10) % 97;
        } else {
            return false;
        }
    }
    r == 1
}

// ---------------------------------------------------------------------------------------
// IP addresses

/// Anchor: a digit run at `a`. Four decimal octets 0..=255 without leading zeros, not part of
/// a longer dotted number (`1.2.3.4.5`) or word.
pub(crate) fn ipv4(h: &Hay, a: usize) -> Decide<Option<Found>> {
    if h.prev(a)
        .is_some_and(|p| p.is_ascii_alphanumeric() || p == b'.' || p == b'_')
    {
        return Ok(None);
    }
    let b = h.b;
    let mut i = a;
    for k in 0..4 {
        let st = i;
        let mut v = 0u32;
        while i - st < 3 {
            match h.get(i)? {
                Some(c) if is_digit(c) => {
                    v = v * 10 + u32::from(c - b'0');
                    i += 1;
                }
                _ => break,
            }
        }
        if i == st || (i - st > 1 && b[st] == b'0') || v > 255 || h.is(i, is_digit)? {
            return Ok(None);
        }
        if k < 3 {
            if h.get(i)? != Some(b'.') {
                return Ok(None);
            }
            i += 1;
        }
    }
    match h.get(i)? {
        Some(c) if c.is_ascii_alphanumeric() || c == b'_' => return Ok(None),
        Some(b'.') if h.is(i + 1, is_digit)? => return Ok(None),
        _ => {}
    }
    found(DetectorKind::Ipv4, a, i)
}

/// Anchor: a `:` at `a`. The address starts at most four hex digits before it.
pub(crate) fn ipv6(h: &Hay, a: usize, lo: usize) -> Decide<Option<Found>> {
    let b = h.b;
    let left_hex = h.prev(a).is_some_and(|c| HEX[c as usize]);
    if !left_hex && !h.is(a + 1, |c| HEX[c as usize] || c == b':')? {
        return Ok(None);
    }
    let lower = lo.max(a.saturating_sub(4));
    let mut s = a;
    while s > lower && HEX[b[s - 1] as usize] {
        s -= 1;
    }
    if h.prev(s)
        .is_some_and(|p| p.is_ascii_alphanumeric() || matches!(p, b':' | b'.' | b'_'))
    {
        return Ok(None);
    }
    let mut e = a;
    while let Some(c) = h.get(e)? {
        if HEX[c as usize] || c == b':' || c == b'.' {
            e += 1;
            if e - s > 45 {
                return Ok(None);
            }
        } else {
            break;
        }
    }
    if h.is(e, |c| c.is_ascii_alphanumeric() || c == b'_')? {
        return Ok(None);
    }
    while e > a && b[e - 1] == b'.' {
        e -= 1;
    }
    let cand = &b[s..e];
    let colons = cand.iter().filter(|c| **c == b':').count();
    let compressed = cand.windows(2).any(|w| w == b"::");
    if !(compressed || colons == 7 || (colons == 6 && cand.contains(&b'.'))) {
        return Ok(None); // times (12:34:56), MAC addresses, `key:value`
    }
    if !cand.iter().any(|c| is_digit(*c)) {
        return Ok(None);
    }
    let groups = cand.split(|c| *c == b':').filter(|g| !g.is_empty()).count();
    if groups < 2 {
        return Ok(None);
    }
    let ok = std::str::from_utf8(cand)
        .ok()
        .and_then(|t| t.parse::<Ipv6Addr>().ok())
        .is_some();
    if !ok {
        return Ok(None);
    }
    found(DetectorKind::Ipv6, s, e)
}

// ---------------------------------------------------------------------------------------
// URL credentials

/// Anchor: the `:` of `scheme://`. Masks the password of `user:password@host`.
pub(crate) fn url_credentials(h: &Hay, a: usize) -> Decide<Option<Found>> {
    if !h.prev(a).is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    let start = a + 3;
    let mut i = start;
    let mut colon = None;
    let mut at = None;
    loop {
        if i - start > 256 {
            return Ok(None);
        }
        match h.get(i)? {
            None => break,
            // `#` is not a terminator: real DSNs carry it unencoded in passwords
            Some(c) if c.is_ascii_whitespace() || b"/?\"'<>`\\".contains(&c) => break,
            Some(b'@') => at = Some(i),
            Some(b':') if colon.is_none() => colon = Some(i),
            Some(_) => {}
        }
        i += 1;
    }
    let (Some(at), Some(colon)) = (at, colon) else {
        return Ok(None);
    };
    if colon > at || colon + 1 == at || !h.is(at + 1, |c| c.is_ascii_alphanumeric() || c == b'[')? {
        return Ok(None);
    }
    found(DetectorKind::UrlCredentials, colon + 1, at)
}

// ---------------------------------------------------------------------------------------
// literal-anchored formats

/// What to do when the literal prefilter finds one of its patterns.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LitAction {
    /// prefix + body of `class` with `min..=max` characters.
    Token {
        kind: DetectorKind,
        class: &'static [bool; 256],
        min: usize,
        max: usize,
    },
    /// A key name (`aws_secret_access_key`) followed by an assignment and the secret;
    /// only the secret is the match.
    Named {
        kind: DetectorKind,
        class: &'static [bool; 256],
        min: usize,
        max: usize,
        needs_assign: bool,
    },
    SendGrid,
    Jwt,
    PrivateKey,
}

/// A literal anchor of the prefilter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lit {
    pub(crate) pattern: &'static str,
    pub(crate) action: LitAction,
}

impl Lit {
    pub(crate) fn kind(&self) -> DetectorKind {
        match self.action {
            LitAction::Token { kind, .. } | LitAction::Named { kind, .. } => kind,
            LitAction::SendGrid => DetectorKind::SendgridKey,
            LitAction::Jwt => DetectorKind::Jwt,
            LitAction::PrivateKey => DetectorKind::PrivateKey,
        }
    }
}

const fn tok(
    pattern: &'static str,
    kind: DetectorKind,
    class: &'static [bool; 256],
    min: usize,
    max: usize,
) -> Lit {
    Lit {
        pattern,
        action: LitAction::Token {
            kind,
            class,
            min,
            max,
        },
    }
}

const fn named(pattern: &'static str, kind: DetectorKind, min: usize, max: usize, a: bool) -> Lit {
    Lit {
        pattern,
        action: LitAction::Named {
            kind,
            class: &B64,
            min,
            max,
            needs_assign: a,
        },
    }
}

use DetectorKind as K;

/// Every literal anchor. Prefixes and lengths are those the issuers document.
///
/// AWS: only the prefixes of credentials (`AKIA` long-term, `ASIA` temporary, `ABIA` and
/// `ACCA` service-specific); the other `A…A` prefixes name users, roles and policies, which
/// are identifiers, not secrets.
pub(crate) const LITS: &[Lit] = &[
    tok("AKIA", K::AwsAccessKey, &UPPER_ALNUM, 16, 16),
    tok("ASIA", K::AwsAccessKey, &UPPER_ALNUM, 16, 16),
    tok("ABIA", K::AwsAccessKey, &UPPER_ALNUM, 16, 16),
    tok("ACCA", K::AwsAccessKey, &UPPER_ALNUM, 16, 16),
    named("aws_secret_access_key", K::AwsSecretKey, 40, 40, true),
    named("AWS_SECRET_ACCESS_KEY", K::AwsSecretKey, 40, 40, true),
    named("SecretAccessKey", K::AwsSecretKey, 40, 40, true),
    named("secretAccessKey", K::AwsSecretKey, 40, 40, true),
    tok("ghp_", K::GithubToken, &ALNUM, 30, 251),
    tok("gho_", K::GithubToken, &ALNUM, 30, 251),
    tok("ghu_", K::GithubToken, &ALNUM, 30, 251),
    tok("ghs_", K::GithubToken, &ALNUM, 30, 251),
    tok("ghr_", K::GithubToken, &ALNUM, 30, 251),
    tok("github_pat_", K::GithubToken, &ALNUM_UNDERSCORE, 22, 255),
    tok("glpat-", K::GitlabToken, &B64URL, 20, 64),
    tok("xoxb-", K::SlackToken, &SLACK, 10, 255),
    tok("xoxp-", K::SlackToken, &SLACK, 10, 255),
    tok("xoxa-", K::SlackToken, &SLACK, 10, 255),
    tok("xoxr-", K::SlackToken, &SLACK, 10, 255),
    tok("xoxs-", K::SlackToken, &SLACK, 10, 255),
    tok("xoxe-", K::SlackToken, &SLACK, 10, 255),
    tok("xapp-", K::SlackToken, &SLACK, 10, 255),
    tok(
        "hooks.slack.com/services/",
        K::SlackToken,
        &SLACK_HOOK,
        20,
        128,
    ),
    tok("AIza", K::GoogleApiKey, &B64URL, 35, 35),
    tok("sk_live_", K::StripeKey, &ALNUM, 16, 255),
    tok("rk_live_", K::StripeKey, &ALNUM, 16, 255),
    tok("sk_test_", K::StripeKey, &ALNUM, 16, 255),
    tok("rk_test_", K::StripeKey, &ALNUM, 16, 255),
    tok("whsec_", K::StripeKey, &ALNUM, 24, 255),
    tok("sk-proj-", K::OpenaiApiKey, &B64URL, 20, 255),
    tok("sk-svcacct-", K::OpenaiApiKey, &B64URL, 20, 255),
    tok("sk-admin-", K::OpenaiApiKey, &B64URL, 20, 255),
    tok("sk-ant-", K::AnthropicApiKey, &B64URL, 20, 255),
    // legacy OpenAI keys: "sk-" and 48 letters and digits (after the longer prefixes, which
    // win at the same position)
    tok("sk-", K::OpenaiApiKey, &ALNUM, 48, 48),
    tok("npm_", K::NpmToken, &ALNUM, 36, 36),
    tok("pypi-AgEIcHlwaS5vcmc", K::PypiToken, &B64URL, 50, TOKEN_MAX),
    tok("hf_", K::HuggingfaceToken, &ALNUM, 30, 40),
    Lit {
        pattern: "SG.",
        action: LitAction::SendGrid,
    },
    named("AccountKey=", K::AzureStorageKey, 86, 88, false),
    Lit {
        pattern: "eyJ",
        action: LitAction::Jwt,
    },
    Lit {
        pattern: "-----BEGIN ",
        action: LitAction::PrivateKey,
    },
];

/// The literal the prefilter searches for a token prefix: prefixes of one family share one
/// (`xoxb-`, `xoxp-`, … are found as `xox`), which keeps the automaton at 32 patterns or
/// fewer, where its SIMD prefilter runs at full speed.
pub(crate) fn anchor_of(pattern: &'static str) -> &'static str {
    for family in ["xox", "sk-", "sk_", "rk_"] {
        if pattern.starts_with(family) {
            return family;
        }
    }
    pattern
}

/// Does `lit`'s full prefix start at `a`? (The anchor found only its family's part.)
pub(crate) fn prefix_at(h: &Hay, a: usize, lit: &Lit) -> Decide<bool> {
    for (k, want) in lit.pattern.bytes().enumerate() {
        if h.get(a + k)? != Some(want) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Confirms the literal `lit` found at `a`.
pub(crate) fn literal(h: &Hay, a: usize, lit: &Lit) -> Decide<Option<Found>> {
    let plen = lit.pattern.len();
    match lit.action {
        LitAction::Token {
            kind,
            class,
            min,
            max,
        } => {
            if h.prev(a).is_some_and(|c| c.is_ascii_alphanumeric()) {
                return Ok(None);
            }
            let b0 = a + plen;
            let Some(e) = run(h, b0, class, max)? else {
                return Ok(None);
            };
            if e - b0 < min || h.is(e, |c| c.is_ascii_alphanumeric())? {
                return Ok(None);
            }
            found(kind, a, e)
        }
        LitAction::Named {
            kind,
            class,
            min,
            max,
            needs_assign,
        } => {
            if h.prev(a).is_some_and(|c| c.is_ascii_alphanumeric()) {
                return Ok(None);
            }
            let mut i = a + plen;
            let mut assigned = !needs_assign;
            while i - (a + plen) < 8 {
                match h.get(i)? {
                    Some(c @ (b' ' | b'\t' | b'"' | b'\'' | b'=' | b':' | b'>')) => {
                        // `key = v`, `key: v`, `"key": "v"`, `<Key>v</Key>`
                        assigned |= matches!(c, b'=' | b':' | b'>');
                        i += 1;
                    }
                    _ => break,
                }
            }
            if !assigned {
                return Ok(None);
            }
            let Some(e) = run(h, i, class, max)? else {
                return Ok(None);
            };
            if e - i < min || h.is(e, |c| c.is_ascii_alphanumeric())? {
                return Ok(None);
            }
            found(kind, i, e)
        }
        LitAction::SendGrid => {
            if h.prev(a).is_some_and(|c| c.is_ascii_alphanumeric()) {
                return Ok(None);
            }
            let b0 = a + plen;
            let Some(e) = run(h, b0, &SENDGRID, 66)? else {
                return Ok(None);
            };
            let body = &h.b[b0..e];
            if body.len() != 66
                || body[22] != b'.'
                || body.iter().filter(|c| **c == b'.').count() != 1
                || h.is(e, |c| c.is_ascii_alphanumeric())?
            {
                return Ok(None);
            }
            found(K::SendgridKey, a, e)
        }
        LitAction::Jwt => jwt(h, a),
        LitAction::PrivateKey => private_key(h, a),
    }
}

/// The end of a run of `class` bytes starting at `i`, or `None` if it is longer than `max`.
fn run(h: &Hay, i: usize, class: &[bool; 256], max: usize) -> Decide<Option<usize>> {
    let mut e = i;
    while let Some(c) = h.get(e)? {
        if !class[c as usize] {
            break;
        }
        e += 1;
        if e - i > max {
            return Ok(None);
        }
    }
    Ok(Some(e))
}

/// A run of base64url bytes from `i`, stopping at `cap`: (end, reached the cap).
fn b64url_run(h: &Hay, mut i: usize, cap: usize) -> Decide<(usize, bool)> {
    while i < cap {
        match h.get(i)? {
            Some(c) if B64URL[c as usize] => i += 1,
            _ => return Ok((i, false)),
        }
    }
    Ok((i, true))
}

/// `eyJ<header>.eyJ<payload>.<signature>`, the header decoding to JSON with `"alg"`.
fn jwt(h: &Hay, a: usize) -> Decide<Option<Found>> {
    if h.prev(a).is_some_and(|c| B64URL[c as usize] || c == b'.') {
        return Ok(None);
    }
    let cap = a + JWT_MAX;
    let (he, capped) = b64url_run(h, a, a + 2048)?;
    if capped || he - a < 10 || h.get(he)? != Some(b'.') {
        return Ok(None);
    }
    let p = he + 1;
    if h.get(p)? != Some(b'e') || h.get(p + 1)? != Some(b'y') || h.get(p + 2)? != Some(b'J') {
        return Ok(None);
    }
    let (pe, capped) = b64url_run(h, p, cap)?;
    let end = if capped {
        pe
    } else {
        if h.get(pe)? != Some(b'.') {
            return Ok(None);
        }
        let (se, _) = b64url_run(h, pe + 1, cap)?;
        se
    };
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&h.b[a..he]);
    let Ok(header) = header else {
        return Ok(None);
    };
    if header.first() != Some(&b'{') || !header.windows(5).any(|w| w == b"\"alg\"") {
        return Ok(None);
    }
    found(K::Jwt, a, end)
}

/// `-----BEGIN … PRIVATE KEY-----` through the matching END line. Without an END line (a
/// truncated key, `head id_rsa`) the block ends at the first byte that cannot be in a PEM
/// body, at the end of the input, or at [`PEM_MAX`].
fn private_key(h: &Hay, a: usize) -> Decide<Option<Found>> {
    let b = h.b;
    let ls = a + "-----BEGIN ".len();
    let le = label_end(h, ls)?;
    let label = &b[ls..le];
    if !(label.ends_with(b"PRIVATE KEY") || label == b"PGP PRIVATE KEY BLOCK") {
        return Ok(None);
    }
    if !dashes(h, le)? {
        return Ok(None);
    }
    let cap = a + PEM_MAX;
    let mut i = le + 5;
    let mut end = None;
    while i < cap {
        match h.get(i)? {
            None => break,
            Some(b'-') => {
                if let Some(e) = pem_end_marker(h, i)? {
                    end = Some(e);
                    break;
                }
                i += 1;
            }
            Some(c) if PEM_BODY[c as usize] => i += 1,
            Some(_) => break,
        }
    }
    let end = match end {
        Some(e) => e,
        None => {
            let mut e = i;
            while e > le + 5 && b[e - 1].is_ascii_whitespace() {
                e -= 1;
            }
            e
        }
    };
    found(K::PrivateKey, a, end)
}

/// The end of a `[A-Z0-9 ]{0,48}` label starting at `i`.
fn label_end(h: &Hay, mut i: usize) -> Decide<usize> {
    let start = i;
    while i - start < 48 {
        match h.get(i)? {
            Some(c) if c.is_ascii_uppercase() || c.is_ascii_digit() || c == b' ' => i += 1,
            _ => break,
        }
    }
    Ok(i)
}

fn dashes(h: &Hay, i: usize) -> Decide<bool> {
    for k in 0..5 {
        if h.get(i + k)? != Some(b'-') {
            return Ok(false);
        }
    }
    Ok(true)
}

/// If `-----END <label>-----` starts at `i`, its end.
fn pem_end_marker(h: &Hay, i: usize) -> Decide<Option<usize>> {
    for (k, want) in b"-----END ".iter().enumerate() {
        if h.get(i + k)? != Some(*want) {
            return Ok(None);
        }
    }
    let le = label_end(h, i + 9)?;
    if !dashes(h, le)? {
        return Ok(None);
    }
    Ok(Some(le + 5))
}
