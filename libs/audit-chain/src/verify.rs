//! Recomputes a chain record by record and holds it against the signed checkpoints.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;

use crate::{Checkpoint, GENESIS, Hash, Record};

/// Where verification starts: the chain's origin, or a signed checkpoint that retention kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub chain_sequence: u64,
    pub hash: Hash,
}

impl Anchor {
    /// The start of a chain that was never pruned.
    pub const GENESIS: Anchor = Anchor {
        chain_sequence: 0,
        hash: GENESIS,
    };
}

/// The first thing that does not verify, named by its chain sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {chain_sequence}: {reason}")]
pub struct VerifyFailure {
    pub chain_sequence: u64,
    pub reason: String,
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub events_checked: u64,
    pub checkpoints_checked: u64,
    /// The chain sequence verification started after.
    pub anchored_at: u64,
    /// The last record verified (the anchor when there were none).
    pub head_sequence: u64,
    pub head_hash: Hash,
    /// Records after the last checkpoint: chained, but no signature vouches for them yet.
    pub unsigned_tail: u64,
}

/// Streams records through the chain check, in chain order, so a store of any size verifies
/// in constant memory (checkpoints are few and held in a map).
pub struct Verifier {
    checkpoints: BTreeMap<u64, Checkpoint>,
    anchor: Anchor,
    previous: Hash,
    next: u64,
    events_checked: u64,
    checkpoints_checked: u64,
    last_signed: u64,
}

impl Verifier {
    /// Checks every checkpoint's signature with `key` and prepares to verify records after
    /// `anchor`. A checkpoint at the anchor must sign the anchor's hash.
    pub fn new(
        key: &VerifyingKey,
        anchor: Anchor,
        checkpoints: impl IntoIterator<Item = Checkpoint>,
    ) -> Result<Self, VerifyFailure> {
        let mut pending = BTreeMap::new();
        let mut checked = 0;
        let mut anchor_signed = anchor == Anchor::GENESIS;
        for cp in checkpoints {
            if !cp.verify_signature(key) {
                return Err(VerifyFailure {
                    chain_sequence: cp.chain_sequence,
                    reason: format!(
                        "checkpoint signature does not verify with key {}",
                        crate::key_id(key)
                    ),
                });
            }
            checked += 1;
            if cp.chain_sequence == anchor.chain_sequence {
                if cp.head_hash != anchor.hash {
                    return Err(VerifyFailure {
                        chain_sequence: cp.chain_sequence,
                        reason: "the anchor does not match its signed checkpoint".into(),
                    });
                }
                anchor_signed = true;
            } else if cp.chain_sequence > anchor.chain_sequence {
                pending.insert(cp.chain_sequence, cp);
            }
        }
        if !anchor_signed {
            return Err(VerifyFailure {
                chain_sequence: anchor.chain_sequence,
                reason: "no signed checkpoint vouches for the chain's starting point".into(),
            });
        }
        Ok(Verifier {
            checkpoints: pending,
            anchor,
            previous: anchor.hash,
            next: anchor.chain_sequence + 1,
            events_checked: 0,
            checkpoints_checked: checked,
            last_signed: anchor.chain_sequence,
        })
    }

    /// Checks the next record and the hash stored with it.
    pub fn push(&mut self, record: &Record, stored_hash: &[u8]) -> Result<(), VerifyFailure> {
        if record.chain_sequence != self.next {
            let missing = self.next;
            return Err(VerifyFailure {
                chain_sequence: missing,
                reason: if record.chain_sequence > missing {
                    format!(
                        "missing: the chain jumps from {} to {}",
                        missing - 1,
                        record.chain_sequence
                    )
                } else {
                    format!(
                        "out of order: {} follows {}",
                        record.chain_sequence,
                        missing - 1
                    )
                },
            });
        }
        let computed = record.hash(&self.previous);
        if stored_hash != computed {
            return Err(VerifyFailure {
                chain_sequence: record.chain_sequence,
                reason: "content does not match its chain hash (altered, or an earlier record was)"
                    .into(),
            });
        }
        if let Some(cp) = self.checkpoints.remove(&record.chain_sequence) {
            if cp.head_hash != computed {
                return Err(VerifyFailure {
                    chain_sequence: record.chain_sequence,
                    reason:
                        "the chain up to here differs from what its signed checkpoint vouches for"
                            .into(),
                });
            }
            self.last_signed = record.chain_sequence;
        }
        self.previous = computed;
        self.next += 1;
        self.events_checked += 1;
        Ok(())
    }

    /// Ends verification: a checkpoint past the last record means records were removed.
    pub fn finish(self) -> Result<ChainReport, VerifyFailure> {
        if let Some((&seq, _)) = self.checkpoints.iter().next() {
            return Err(VerifyFailure {
                chain_sequence: self.next,
                reason: format!(
                    "missing: a signed checkpoint covers records up to {seq}, the chain ends at {}",
                    self.next - 1
                ),
            });
        }
        Ok(ChainReport {
            events_checked: self.events_checked,
            checkpoints_checked: self.checkpoints_checked,
            anchored_at: self.anchor.chain_sequence,
            head_sequence: self.next - 1,
            head_hash: self.previous,
            unsigned_tail: self.next - 1 - self.last_signed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKey;

    fn chain(n: u64) -> Vec<(Record, Hash)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|i| {
                let r = Record {
                    chain_sequence: i,
                    stored_at_us: 1_700_000_000_000_000 + i as i64,
                    session_id: format!("s{}", i % 3),
                    session_sequence: i,
                    body: vec![i as u8; 10],
                };
                prev = r.hash(&prev);
                (r, prev)
            })
            .collect()
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn run(
        records: &[(Record, Hash)],
        cps: Vec<Checkpoint>,
        anchor: Anchor,
    ) -> Result<ChainReport, VerifyFailure> {
        let mut v = Verifier::new(&key().verifying_key(), anchor, cps)?;
        for (r, h) in records {
            v.push(r, h)?;
        }
        v.finish()
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(10);
        let cp = Checkpoint::sign(&key(), 8, &c[7].1, 1);
        let report = run(&c, vec![cp], Anchor::GENESIS).expect("verifies");
        assert_eq!(report.events_checked, 10);
        assert_eq!(report.unsigned_tail, 2);
    }

    #[test]
    fn altered_body_is_named() {
        let mut c = chain(10);
        c[4].0.body[0] ^= 1;
        let err = run(&c, vec![], Anchor::GENESIS).expect_err("fails");
        assert_eq!(err.chain_sequence, 5);
    }

    #[test]
    fn rehashed_forgery_is_caught_by_checkpoint() {
        let mut c = chain(10);
        let cp = Checkpoint::sign(&key(), 10, &c[9].1, 1);
        // The forger rewrites record 3 and recomputes every hash after it.
        c[2].0.body = b"forged".to_vec();
        let mut prev = c[1].1;
        for (r, h) in c.iter_mut().skip(2) {
            *h = r.hash(&prev);
            prev = *h;
        }
        let err = run(&c, vec![cp], Anchor::GENESIS).expect_err("fails");
        assert_eq!(err.chain_sequence, 10);
    }

    #[test]
    fn deleted_record_and_truncated_tail_are_caught() {
        let c = chain(10);
        let mut holed = c.clone();
        holed.remove(3);
        assert_eq!(
            run(&holed, vec![], Anchor::GENESIS)
                .expect_err("hole")
                .chain_sequence,
            4
        );
        let cp = Checkpoint::sign(&key(), 10, &c[9].1, 1);
        let err = run(&c[..7], vec![cp], Anchor::GENESIS).expect_err("truncated");
        assert_eq!(err.chain_sequence, 8);
    }

    #[test]
    fn pruned_chain_verifies_from_its_checkpoint() {
        let c = chain(10);
        let cp = Checkpoint::sign(&key(), 4, &c[3].1, 1);
        let anchor = Anchor {
            chain_sequence: 4,
            hash: c[3].1,
        };
        let report = run(&c[4..], vec![cp], anchor).expect("verifies");
        assert_eq!(report.anchored_at, 4);
        assert_eq!(report.events_checked, 6);
        // An anchor with no checkpoint behind it is refused.
        assert!(run(&c[4..], vec![], anchor).is_err());
    }

    #[test]
    fn forged_signature_is_refused() {
        let c = chain(3);
        let other = SigningKey::from_bytes(&[9; 32]);
        let cp = Checkpoint::sign(&other, 3, &c[2].1, 1);
        assert_eq!(
            run(&c, vec![cp], Anchor::GENESIS)
                .expect_err("bad sig")
                .chain_sequence,
            3
        );
    }
}
