//! The audit log's tamper evidence: a hash chain over the exact stored bytes, Ed25519-signed
//! checkpoints of its head, and a bundle format that an auditor verifies offline.
//!
//! The store and the offline `agentgate audit verify` use this one crate, so "verifies in
//! the store" and "verifies on the auditor's laptop" can never mean two different things.
//! The byte layouts are specified in `docs/audit-bundle.md`.

mod bundle;
mod keys;
mod verify;

pub use bundle::{
    BUNDLE_FORMAT, BundleError, BundleHeader, BundleLine, BundleReport, verify_bundle,
};
pub use keys::{KeyError, SigningKeyFile, key_id};
pub use verify::{Anchor, ChainReport, Verifier, VerifyFailure};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 chain hash.
pub type Hash = [u8; 32];

/// The hash before the first record: the chain starts from 32 zero bytes.
pub const GENESIS: Hash = [0; 32];

const RECORD_DOMAIN: &[u8] = b"agentgate.audit.v1.record\0";
const CHECKPOINT_DOMAIN: &[u8] = b"agentgate.audit.v1.checkpoint\0";

/// One stored record, as the chain hash sees it: every column the store keeps for an event
/// except derived query columns (which `Verify` checks against `body`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the store's single chain, 1-based and gap-free.
    pub chain_sequence: u64,
    /// When the store accepted it, microseconds since the Unix epoch (UTC).
    pub stored_at_us: i64,
    pub session_id: String,
    pub session_sequence: u64,
    /// The encoded `AuditEvent`, exactly as stored.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

impl Record {
    /// The chain hash of this record after `previous`.
    ///
    /// Fields are length-prefixed so no two different records share an input.
    pub fn hash(&self, previous: &Hash) -> Hash {
        let mut h = Sha256::new();
        h.update(RECORD_DOMAIN);
        h.update(previous);
        h.update(self.chain_sequence.to_be_bytes());
        h.update(self.stored_at_us.to_be_bytes());
        h.update((self.session_id.len() as u64).to_be_bytes());
        h.update(self.session_id.as_bytes());
        h.update(self.session_sequence.to_be_bytes());
        h.update((self.body.len() as u64).to_be_bytes());
        h.update(&self.body);
        h.finalize().into()
    }
}

/// A signed statement "the chain had this head at this position at this time".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub chain_sequence: u64,
    #[serde(with = "hex_bytes")]
    pub head_hash: Vec<u8>,
    pub created_at_us: i64,
    /// Ed25519 signature over [`Checkpoint::signed_bytes`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

impl Checkpoint {
    /// Signs the head of the chain at `chain_sequence`.
    pub fn sign(
        key: &SigningKey,
        chain_sequence: u64,
        head_hash: &Hash,
        created_at_us: i64,
    ) -> Self {
        let message = Self::message(chain_sequence, head_hash, created_at_us);
        Checkpoint {
            chain_sequence,
            head_hash: head_hash.to_vec(),
            created_at_us,
            signature: key.sign(&message).to_bytes().to_vec(),
            key_id: key_id(&key.verifying_key()),
        }
    }

    /// The exact bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut head = [0u8; 32];
        if self.head_hash.len() == 32 {
            head.copy_from_slice(&self.head_hash);
        }
        Self::message(self.chain_sequence, &head, self.created_at_us)
    }

    fn message(chain_sequence: u64, head_hash: &Hash, created_at_us: i64) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&chain_sequence.to_be_bytes());
        m.extend_from_slice(head_hash);
        m.extend_from_slice(&created_at_us.to_be_bytes());
        m
    }

    /// Checks the signature with `key`; the head hash must be 32 bytes.
    pub fn verify_signature(&self, key: &VerifyingKey) -> bool {
        if self.head_hash.len() != 32 {
            return false;
        }
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&self.signature) else {
            return false;
        };
        key.verify_strict(&self.signed_bytes(), &sig).is_ok()
    }
}

/// Converts a stored hash column into a [`Hash`], if it has the right length.
pub fn to_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

pub(crate) use hex_bytes as hex_serde;
