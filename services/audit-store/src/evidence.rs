//! Verification, export and retention: the operations that read the whole chain.

use agentgate_audit_chain::{
    Anchor, BUNDLE_FORMAT, BundleHeader, BundleLine, ChainReport, Checkpoint, GENESIS, Verifier,
    VerifyFailure, VerifyingKey, key_id, to_hash,
};
use agentgate_proto::audit::v1::AuditEvent;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::store::{Store, StoreError, StoredRow, now_us};

/// Rows read per page while walking the chain.
const PAGE: i64 = 5000;

/// Why a walk of the chain stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Failed(#[from] VerifyFailure),
}

/// Where the retained chain starts: the origin, or the checkpoint retention stopped at.
pub async fn retained_anchor(
    store: &Store,
    checkpoints: &[Checkpoint],
) -> Result<Anchor, WalkError> {
    let first = match store.first_sequence().await? {
        Some(first) => first as u64,
        // Nothing retained: the chain so far ends at the newest checkpoint.
        None => match checkpoints.last() {
            Some(cp) => cp.chain_sequence + 1,
            None => 1,
        },
    };
    anchor_at(first - 1, checkpoints)
}

fn anchor_at(sequence: u64, checkpoints: &[Checkpoint]) -> Result<Anchor, WalkError> {
    if sequence == 0 {
        return Ok(Anchor::GENESIS);
    }
    let cp = checkpoints
        .iter()
        .find(|c| c.chain_sequence == sequence)
        .ok_or(VerifyFailure {
            chain_sequence: sequence + 1,
            reason: format!("the chain starts after {sequence}, where no signed checkpoint is"),
        })?;
    Ok(Anchor {
        chain_sequence: sequence,
        hash: to_hash(&cp.head_hash).unwrap_or(GENESIS),
    })
}

/// Recomputes the whole retained chain, checks every checkpoint, and checks that the query
/// columns of each row say what its signed body says.
pub async fn verify(store: &Store, key: &VerifyingKey) -> Result<ChainReport, WalkError> {
    let checkpoints = store.checkpoints().await?;
    let anchor = retained_anchor(store, &checkpoints).await?;
    let mut verifier = Verifier::new(key, anchor, checkpoints)?;
    let mut after = anchor.chain_sequence as i64;
    loop {
        let rows = store.page(after, i64::MAX, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.chain_sequence;
        for row in &rows {
            verifier.push(&row.record(), &row.hash)?;
            check_columns(row)?;
        }
    }
    Ok(verifier.finish()?)
}

/// The derived columns must match the body the chain covers, or queries would lie.
fn check_columns(row: &StoredRow) -> Result<(), VerifyFailure> {
    let fail = |what: &str| VerifyFailure {
        chain_sequence: row.chain_sequence as u64,
        reason: format!("the {what} column differs from the signed event"),
    };
    let event = AuditEvent::decode(row.body.as_slice()).map_err(|_| fail("body"))?;
    if event.session_id != row.session_id || event.sequence as i64 != row.session_sequence {
        return Err(fail("session"));
    }
    if event.kind != row.kind {
        return Err(fail("kind"));
    }
    if event.principal.map(|p| p.subject).unwrap_or_default() != row.principal {
        return Err(fail("principal"));
    }
    if event.connection != row.connection || event.protocol != row.protocol {
        return Err(fail("connection"));
    }
    if event.time.map(|t| crate::timestamp_us(&t)) != Some(row.occurred_at_us) {
        return Err(fail("time"));
    }
    Ok(())
}

/// Writes an evidence bundle to `out` line by line. The head is signed first, so the bundle
/// is vouched for end to end; `from_us`/`to_us` narrow it to whole checkpoint intervals.
pub async fn export(
    store: &Store,
    key: &VerifyingKey,
    from_us: Option<i64>,
    to_us: Option<i64>,
    out: mpsc::Sender<Vec<u8>>,
) -> Result<(), WalkError> {
    let checkpoints = store.checkpoints().await?;
    let retained = retained_anchor(store, &checkpoints).await?;
    // Start at the newest checkpoint taken before the window opens.
    let start = match from_us {
        Some(from) => checkpoints
            .iter()
            .filter(|c| c.created_at_us <= from && c.chain_sequence >= retained.chain_sequence)
            .map(|c| c.chain_sequence)
            .max()
            .unwrap_or(retained.chain_sequence),
        None => retained.chain_sequence,
    };
    let anchor = anchor_at(start, &checkpoints)?;
    // End at the first checkpoint taken after the window closes.
    let end = match to_us {
        Some(to) => checkpoints
            .iter()
            .filter(|c| c.created_at_us >= to && c.chain_sequence >= start)
            .map(|c| c.chain_sequence)
            .min(),
        None => None,
    }
    .or_else(|| checkpoints.last().map(|c| c.chain_sequence))
    .unwrap_or(0)
    .max(start);

    let mut buf = Vec::with_capacity(1 << 16);
    let header = BundleLine::Header(BundleHeader {
        format: BUNDLE_FORMAT.into(),
        public_key: key.to_bytes().to_vec(),
        key_id: key_id(key),
        anchor_sequence: anchor.chain_sequence,
        anchor_hash: anchor.hash.to_vec(),
        exported_at_us: now_us(),
    });
    push_line(&mut buf, &header);
    for cp in checkpoints
        .into_iter()
        .filter(|c| c.chain_sequence >= start && c.chain_sequence <= end)
    {
        push_line(&mut buf, &BundleLine::Checkpoint(cp));
    }
    let mut after = start as i64;
    loop {
        let rows = store.page(after, end as i64, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.chain_sequence;
        for row in rows {
            let hash = row.hash.clone();
            push_line(
                &mut buf,
                &BundleLine::Event {
                    record: row.record(),
                    hash,
                },
            );
            if buf.len() >= 1 << 16 && out.send(std::mem::take(&mut buf)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
    }
    if !buf.is_empty() {
        let _ = out.send(buf).await;
    }
    Ok(())
}

fn push_line(buf: &mut Vec<u8>, line: &BundleLine) {
    // Serializing these plain structs cannot fail.
    if serde_json::to_writer(&mut *buf, line).is_ok() {
        buf.push(b'\n');
    }
}

/// Retention: removes events up to the newest checkpoint taken at or before `before_us`.
/// Returns (events removed, the chain sequence the retained chain now starts after).
pub async fn prune(store: &Store, before_us: i64) -> Result<(u64, u64), WalkError> {
    let checkpoints = store.checkpoints().await?;
    let retained = retained_anchor(store, &checkpoints).await?;
    let target = checkpoints
        .iter()
        .filter(|c| c.created_at_us <= before_us && c.chain_sequence > retained.chain_sequence)
        .map(|c| c.chain_sequence)
        .max();
    match target {
        Some(upto) => Ok((store.prune(upto as i64).await?, upto)),
        None => Ok((0, retained.chain_sequence)),
    }
}
