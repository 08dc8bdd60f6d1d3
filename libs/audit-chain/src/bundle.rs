//! Evidence bundles: newline-delimited JSON that carries events, checkpoints and the public
//! key, so an auditor verifies them with no database and no network.

use std::io::BufRead;

use ed25519_dalek::VerifyingKey;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::{Anchor, ChainReport, Checkpoint, Record, Verifier, VerifyFailure, hex_serde, key_id};

/// The value of the header's `format` field; a reader refuses any other.
pub const BUNDLE_FORMAT: &str = "agentgate-audit-bundle/1";

/// The first line of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleHeader {
    pub format: String,
    /// The store's Ed25519 public key (hex). Pin it out of band with `--public-key`.
    #[serde(with = "hex_serde")]
    pub public_key: Vec<u8>,
    pub key_id: String,
    /// Verification starts after this chain sequence (0: the chain's origin).
    pub anchor_sequence: u64,
    #[serde(with = "hex_serde")]
    pub anchor_hash: Vec<u8>,
    pub exported_at_us: i64,
}

/// One line of a bundle: the header first, then checkpoints, then events in chain order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleLine {
    Header(BundleHeader),
    Checkpoint(Checkpoint),
    Event {
        #[serde(flatten)]
        record: Record,
        #[serde(with = "hex_serde")]
        hash: Vec<u8>,
    },
}

/// Why a bundle does not verify.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("the bundle is signed by key {found}, not the pinned key {expected}")]
    WrongKey { expected: String, found: String },
    #[error("tampered: {0}")]
    Tampered(#[from] VerifyFailure),
    #[error("reading the bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// What a verified bundle holds.
#[derive(Debug, Clone)]
pub struct BundleReport {
    pub chain: ChainReport,
    pub key_id: String,
    pub exported_at_us: i64,
}

/// Verifies a bundle read line by line. With `pinned`, the bundle's key must be that key;
/// without it, the bundle only proves it is consistent with the key it carries.
pub fn verify_bundle(
    reader: impl BufRead,
    pinned: Option<&VerifyingKey>,
) -> Result<BundleReport, BundleError> {
    let mut lines = reader.lines().enumerate().map(|(i, l)| (i + 1, l));
    let malformed = |line: usize, reason: String| BundleError::Malformed { line, reason };

    let (n, first) = lines
        .next()
        .ok_or_else(|| malformed(1, "empty bundle".into()))?;
    let header = match serde_json::from_str::<BundleLine>(&first?) {
        Ok(BundleLine::Header(h)) if h.format == BUNDLE_FORMAT => h,
        Ok(BundleLine::Header(h)) => {
            return Err(malformed(n, format!("unknown format {:?}", h.format)));
        }
        Ok(_) => return Err(malformed(n, "the first line must be the header".into())),
        Err(e) => return Err(malformed(n, e.to_string())),
    };
    let key_bytes: [u8; 32] = header
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| malformed(n, "public_key must be 32 bytes".into()))?;
    let key = VerifyingKey::from_bytes(&key_bytes)
        .map_err(|e| malformed(n, format!("public_key: {e}")))?;
    if let Some(pinned) = pinned
        && pinned != &key
    {
        return Err(BundleError::WrongKey {
            expected: key_id(pinned),
            found: key_id(&key),
        });
    }
    let anchor = Anchor {
        chain_sequence: header.anchor_sequence,
        hash: crate::to_hash(&header.anchor_hash)
            .ok_or_else(|| malformed(n, "anchor_hash must be 32 bytes".into()))?,
    };

    let mut checkpoints = Vec::new();
    let mut verifier: Option<Verifier> = None;
    for (n, line) in lines {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<BundleLine>(&line).map_err(|e| malformed(n, e.to_string()))? {
            BundleLine::Header(_) => return Err(malformed(n, "a second header".into())),
            BundleLine::Checkpoint(cp) => {
                if verifier.is_some() {
                    return Err(malformed(n, "checkpoints must precede events".into()));
                }
                checkpoints.push(cp);
            }
            BundleLine::Event { record, hash } => {
                let v = match verifier.as_mut() {
                    Some(v) => v,
                    None => verifier.insert(Verifier::new(
                        &key,
                        anchor,
                        std::mem::take(&mut checkpoints),
                    )?),
                };
                v.push(&record, &hash)?;
                check_body(&record)?;
            }
        }
    }
    let verifier = match verifier {
        Some(v) => v,
        None => Verifier::new(&key, anchor, checkpoints)?,
    };
    Ok(BundleReport {
        chain: verifier.finish()?,
        key_id: key_id(&key),
        exported_at_us: header.exported_at_us,
    })
}

/// The body must be the event the record says it is: same session and sequence.
fn check_body(record: &Record) -> Result<(), VerifyFailure> {
    let fail = |reason: String| VerifyFailure {
        chain_sequence: record.chain_sequence,
        reason,
    };
    let event = agentgate_proto::audit::v1::AuditEvent::decode(record.body.as_slice())
        .map_err(|e| fail(format!("body is not an audit event: {e}")))?;
    if event.session_id != record.session_id || event.sequence != record.session_sequence {
        return Err(fail(
            "body names another session or sequence than its record".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GENESIS, SigningKey};
    use agentgate_proto::audit::v1::AuditEvent;

    fn bundle(key: &SigningKey, n: u64) -> Vec<String> {
        let header = BundleLine::Header(BundleHeader {
            format: BUNDLE_FORMAT.into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            key_id: key_id(&key.verifying_key()),
            anchor_sequence: 0,
            anchor_hash: GENESIS.to_vec(),
            exported_at_us: 5,
        });
        let mut prev = GENESIS;
        let mut events = Vec::new();
        for i in 1..=n {
            let ev = AuditEvent {
                session_id: "s".into(),
                sequence: i,
                kind: "session.query".into(),
                ..Default::default()
            };
            let record = Record {
                chain_sequence: i,
                stored_at_us: i as i64,
                session_id: "s".into(),
                session_sequence: i,
                body: ev.encode_to_vec(),
            };
            prev = record.hash(&prev);
            events.push(BundleLine::Event {
                record,
                hash: prev.to_vec(),
            });
        }
        let cp = BundleLine::Checkpoint(Checkpoint::sign(key, n, &prev, 9));
        std::iter::once(header)
            .chain(std::iter::once(cp))
            .chain(events)
            .map(|l| serde_json::to_string(&l).expect("json"))
            .collect()
    }

    #[test]
    fn intact_bundle_verifies_and_pins() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let text = bundle(&key, 5).join("\n");
        let report = verify_bundle(text.as_bytes(), Some(&key.verifying_key())).expect("ok");
        assert_eq!(report.chain.events_checked, 5);
        let other = SigningKey::from_bytes(&[2; 32]);
        assert!(matches!(
            verify_bundle(text.as_bytes(), Some(&other.verifying_key())),
            Err(BundleError::WrongKey { .. })
        ));
    }

    #[test]
    fn edited_event_is_named() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut lines = bundle(&key, 5);
        lines[4] = lines[4].replace("\"stored_at_us\":3", "\"stored_at_us\":4");
        let err = verify_bundle(lines.join("\n").as_bytes(), None).expect_err("tampered");
        assert!(
            matches!(
                err,
                BundleError::Tampered(VerifyFailure {
                    chain_sequence: 3,
                    ..
                })
            ),
            "{err}"
        );
    }

    #[test]
    fn dropped_last_event_is_caught() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut lines = bundle(&key, 5);
        lines.pop();
        assert!(matches!(
            verify_bundle(lines.join("\n").as_bytes(), None),
            Err(BundleError::Tampered(VerifyFailure {
                chain_sequence: 5,
                ..
            }))
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for text in ["", "{", "{\"event\":{}}", "\u{0}\u{1}"] {
            assert!(verify_bundle(text.as_bytes(), None).is_err());
        }
    }
}
