//! The strategies: what a masked value is replaced with.

use std::net::Ipv6Addr;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::detect::{LITS, LitAction};
use crate::{DetectorKind, Strategy};

/// The fixed marker of the redact strategy.
pub const REDACTED: &str = "[REDACTED]";

/// Fill used by the partial strategy for hidden characters.
const STAR: u8 = b'*';

/// A keyed hasher for the hash strategy: HMAC-SHA256 keyed once, cloned per value.
#[derive(Clone)]
pub(crate) struct Hasher {
    mac: Hmac<Sha256>,
}

impl Hasher {
    pub(crate) fn new(key: &[u8]) -> Option<Hasher> {
        Hmac::<Sha256>::new_from_slice(key)
            .ok()
            .map(|mac| Hasher { mac })
    }

    /// `[HMAC:` + the first 8 bytes of HMAC-SHA256(value) in hex + `]`. 64 bits keep
    /// accidental collisions out of reach for any realistic number of distinct values (a
    /// birthday collision needs ~4 billion), and a short tag keeps cells readable.
    pub(crate) fn tag(&self, value: &[u8], out: &mut Vec<u8>) {
        let mut mac = self.mac.clone();
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        out.extend_from_slice(b"[HMAC:");
        const HEXD: &[u8; 16] = b"0123456789abcdef";
        for byte in digest.iter().take(8) {
            out.push(HEXD[(byte >> 4) as usize]);
            out.push(HEXD[(byte & 15) as usize]);
        }
        out.push(b']');
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(..)")
    }
}

/// Writes the replacement of `value` under `strategy`. `kind` is the format of the value when
/// known (a detector match, or a source value that is exactly one detector match); partial
/// masking uses it to keep the useful, non-secret part.
pub(crate) fn render(
    strategy: Strategy,
    kind: Option<DetectorKind>,
    value: &[u8],
    hasher: Option<&Hasher>,
    out: &mut Vec<u8>,
) {
    match strategy {
        Strategy::Redact => out.extend_from_slice(REDACTED.as_bytes()),
        Strategy::Hash => match hasher {
            Some(h) => h.tag(value, out),
            // Unreachable by construction (Masker::new refuses hash rules without a key);
            // failing closed keeps the value out of the output all the same.
            None => out.extend_from_slice(REDACTED.as_bytes()),
        },
        Strategy::Partial => match kind {
            Some(k) => partial(k, value, out),
            None => generic_partial(value, out),
        },
    }
}

fn stars(out: &mut Vec<u8>) {
    out.extend_from_slice(b"****");
}

/// Format-aware partial masking of a value known to be of kind `kind`.
fn partial(kind: DetectorKind, v: &[u8], out: &mut Vec<u8>) {
    use DetectorKind as K;
    match kind {
        K::Email => {
            let at = v.iter().rposition(|c| *c == b'@').unwrap_or(0);
            out.extend_from_slice(b"***");
            out.extend_from_slice(&v[at..]);
        }
        K::PaymentCard | K::UsSsn | K::Phone => keep_last_alnum(v, 4, |c| c.is_ascii_digit(), out),
        K::Iban => {
            let keep = v.len().min(2);
            out.extend_from_slice(&v[..keep]);
            keep_last_alnum(&v[keep..], 4, |c| c.is_ascii_alphanumeric(), out);
        }
        K::Ipv4 => {
            let mut parts = v.split(|c| *c == b'.');
            for _ in 0..2 {
                if let Some(p) = parts.next() {
                    out.extend_from_slice(p);
                    out.push(b'.');
                }
            }
            out.extend_from_slice(b"*.*");
        }
        K::Ipv6 => {
            if let Some(ip) = std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.parse::<Ipv6Addr>().ok())
            {
                let s = ip.segments();
                out.extend_from_slice(format!("{:x}:{:x}:", s[0], s[1]).as_bytes());
            }
            stars(out);
        }
        K::Jwt => {
            let dot = v.iter().position(|c| *c == b'.').unwrap_or(0);
            out.extend_from_slice(&v[..dot]);
            out.push(b'.');
            stars(out);
        }
        K::PrivateKey => {
            let begin_end = find(v, b"-----", 11).map_or(0, |i| i + 5);
            out.extend_from_slice(&v[..begin_end]);
            let nl: &[u8] = if find(v, b"\\n", 0).is_some() {
                b"\\n"
            } else {
                b"\n"
            };
            out.extend_from_slice(nl);
            stars(out);
            if let Some(e) = find(v, b"-----END ", begin_end) {
                out.extend_from_slice(nl);
                out.extend_from_slice(&v[e..]);
            }
        }
        K::AwsSecretKey | K::AzureStorageKey | K::UrlCredentials => stars(out),
        _ => {
            // API tokens: keep the documented prefix, which says what kind of credential
            // it was and nothing about which one.
            let prefix = LITS
                .iter()
                .filter(|l| matches!(l.action, LitAction::Token { .. } | LitAction::SendGrid))
                .filter(|l| v.starts_with(l.pattern.as_bytes()))
                .map(|l| l.pattern.len())
                .max()
                .unwrap_or(0);
            out.extend_from_slice(&v[..prefix]);
            stars(out);
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Replaces every byte for which `is_secret` holds with `*`, except the last `keep` of them.
fn keep_last_alnum(v: &[u8], keep: usize, is_secret: impl Fn(u8) -> bool, out: &mut Vec<u8>) {
    let total = v.iter().filter(|c| is_secret(**c)).count();
    let hide = total.saturating_sub(keep);
    let mut seen = 0;
    for &c in v {
        if is_secret(c) {
            seen += 1;
            out.push(if seen <= hide { STAR } else { c });
        } else {
            out.push(c);
        }
    }
}

/// How many of `n` letters and digits partial masking keeps: none of fewer than 8, then a
/// quarter, at most 4.
fn generic_keep(n: usize) -> usize {
    if n < 8 { 0 } else { (n / 4).min(4) }
}

/// Partial masking of a value of unknown format: letters and digits become `*` except the
/// last [`generic_keep`] of them; punctuation and spaces stay, so the shape is visible.
/// Invalid UTF-8 is handled byte-wise (every non-ASCII byte counts as a letter).
pub(crate) fn generic_partial(v: &[u8], out: &mut Vec<u8>) {
    match std::str::from_utf8(v) {
        Ok(s) => {
            let total = s.chars().filter(|c| c.is_alphanumeric()).count();
            let keep = generic_keep(total);
            let hide = total - keep;
            let mut seen = 0;
            let mut buf = [0u8; 4];
            for ch in s.chars() {
                if ch.is_alphanumeric() {
                    seen += 1;
                    if seen <= hide {
                        out.push(STAR);
                        continue;
                    }
                }
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
        }
        Err(_) => {
            let secret = |c: u8| c.is_ascii_alphanumeric() || c >= 0x80;
            let total = v.iter().filter(|c| secret(**c)).count();
            keep_last_alnum(v, generic_keep(total), secret, out);
        }
    }
}
