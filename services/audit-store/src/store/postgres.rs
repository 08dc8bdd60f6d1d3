//! The audit log on Postgres: array-bound bulk inserts, and an advisory lock so that several
//! store instances on one database still build one chain.

use std::collections::HashSet;

use agentgate_audit_chain::{Checkpoint, SigningKey};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::plan::{Plan, checkpoint_due, head_from};
use super::{
    AppendOutcome, CheckpointRow, Gap, Head, NewEvent, SessionFilter, SessionRow, StoreError,
    StoredRow, holes, now_us,
};

/// Arbitrary constant naming the chain's advisory lock.
const CHAIN_LOCK: i64 = 0x6167_656e_7467_6174; // "agentgat"

macro_rules! event_columns {
    () => {
        "chain_sequence, stored_at_us, session_id, session_sequence, \
     occurred_at_us, kind, principal, connection, protocol, body, hash"
    };
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }

    async fn locked(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CHAIN_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn head_in(tx: &mut Transaction<'static, Postgres>) -> Result<(Head, u64), StoreError> {
        let event: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT chain_sequence, hash FROM audit_events ORDER BY chain_sequence DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let cp: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT chain_sequence, head_hash FROM audit_checkpoints ORDER BY chain_sequence DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        head_from(event, cp)
    }

    pub async fn head(&self) -> Result<Head, StoreError> {
        let mut tx = self.pool.begin().await?;
        Ok(Self::head_in(&mut tx).await?.0)
    }

    pub async fn append(
        &self,
        batches: Vec<Vec<NewEvent>>,
        key: &SigningKey,
        checkpoint_every: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut tx = self.locked().await?;
        let (head, last_cp) = Self::head_in(&mut tx).await?;

        // One index range scan per run of consecutive sequence numbers, not one probe per
        // event: a run holds only keys asked for, so the rows found are exactly the stored ones.
        let (ids, (from, to)): (Vec<String>, (Vec<i64>, Vec<i64>)) = key_runs(Plan::keys(&batches))
            .into_iter()
            .map(|(id, from, to)| (id, (from, to)))
            .unzip();
        let existing: HashSet<(String, i64)> = sqlx::query_as(
            "SELECT e.session_id, e.session_sequence FROM audit_events e \
             JOIN UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS k(session_id, first, last) \
             ON e.session_id = k.session_id AND e.session_sequence BETWEEN k.first AND k.last",
        )
        .bind(&ids)
        .bind(&from)
        .bind(&to)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

        let plan = Plan::new(batches, &existing, head, now_us());
        if !plan.rows.is_empty() {
            insert_events(&mut tx, &plan.rows).await?;
            upsert_sessions(&mut tx, &plan.sessions).await?;
        }
        let gaps = gaps_in(
            &mut tx,
            plan.sessions.iter().map(|s| s.session_id.clone()).collect(),
        )
        .await?;
        if checkpoint_due(plan.head.chain_sequence, last_cp, checkpoint_every) {
            insert_checkpoint(
                &mut tx,
                &Checkpoint::sign(key, plan.head.chain_sequence, &plan.head.hash, now_us()),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(plan.with_gaps(&gaps))
    }

    pub async fn checkpoint(&self, key: &SigningKey) -> Result<Option<Checkpoint>, StoreError> {
        let mut tx = self.locked().await?;
        let (head, last_cp) = Self::head_in(&mut tx).await?;
        if head.chain_sequence == last_cp {
            return Ok(None);
        }
        let cp = Checkpoint::sign(key, head.chain_sequence, &head.hash, now_us());
        insert_checkpoint(&mut tx, &cp).await?;
        tx.commit().await?;
        Ok(Some(cp))
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows: Vec<CheckpointRow> =
            sqlx::query_as("SELECT * FROM audit_checkpoints ORDER BY chain_sequence")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub async fn page(
        &self,
        after: i64,
        until: i64,
        limit: i64,
    ) -> Result<Vec<StoredRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            event_columns!(),
            " FROM audit_events WHERE chain_sequence > $1 AND chain_sequence <= $2 \
             ORDER BY chain_sequence LIMIT $3"
        ))
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn first_sequence(&self) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MIN(chain_sequence) FROM audit_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn session_events(
        &self,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            event_columns!(),
            " FROM audit_events WHERE session_id = $1 AND session_sequence > $2 \
             ORDER BY session_sequence LIMIT $3"
        ))
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM audit_sessions WHERE ($1::text IS NULL OR principal = $1) \
             AND ($2::text IS NULL OR connection = $2) AND ($3::int IS NULL OR protocol = $3) \
             AND ($4::bigint IS NULL OR last_event_us >= $4) AND ($5::bigint IS NULL OR first_event_us < $5) \
             ORDER BY first_event_us DESC, session_id LIMIT $6",
        )
        .bind(&f.principal)
        .bind(&f.connection)
        .bind(f.protocol)
        .bind(f.from_us)
        .bind(f.to_us)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn session_gaps(&self, session_id: &str) -> Result<Vec<Gap>, StoreError> {
        let mut tx = self.pool.begin().await?;
        gaps_in(&mut tx, vec![session_id.to_owned()]).await
    }

    pub async fn prune(&self, upto: i64) -> Result<u64, StoreError> {
        let mut tx = self.locked().await?;
        let removed: i64 = sqlx::query_scalar("SELECT audit_prune($1)")
            .bind(upto)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed as u64)
    }
}

/// The keys as runs of consecutive sequence numbers per session: (session, first, last).
fn key_runs(mut keys: Vec<(String, i64)>) -> Vec<(String, i64, i64)> {
    keys.sort_unstable();
    keys.dedup();
    let mut runs: Vec<(String, i64, i64)> = Vec::new();
    for (id, seq) in keys {
        match runs.last_mut() {
            Some((last_id, _, last)) if *last_id == id && last.checked_add(1) == Some(seq) => {
                *last = seq
            }
            _ => runs.push((id, seq, seq)),
        }
    }
    runs
}

/// Writes the rows with `COPY ... FROM STDIN (FORMAT binary)`: the cheapest way into
/// Postgres (multi-row heap inserts, no array to unpack). Same rows, same transaction, same
/// constraints as an INSERT; a duplicate key still fails the whole group.
async fn insert_events(
    tx: &mut Transaction<'static, Postgres>,
    rows: &[StoredRow],
) -> Result<(), StoreError> {
    let mut copy = tx
        .copy_in_raw(concat!(
            "COPY audit_events (",
            event_columns!(),
            ") FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for r in rows {
        buf.extend_from_slice(&11i16.to_be_bytes());
        for v in [r.chain_sequence, r.stored_at_us] {
            copy_field(&mut buf, &v.to_be_bytes());
        }
        copy_field(&mut buf, r.session_id.as_bytes());
        for v in [r.session_sequence, r.occurred_at_us] {
            copy_field(&mut buf, &v.to_be_bytes());
        }
        for v in [&r.kind, &r.principal, &r.connection] {
            copy_field(&mut buf, v.as_bytes());
        }
        copy_field(&mut buf, &r.protocol.to_be_bytes());
        copy_field(&mut buf, &r.body);
        copy_field(&mut buf, &r.hash);
        if buf.len() >= 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
            buf.reserve(1 << 20);
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    copy.send(buf).await?;
    copy.finish().await?;
    Ok(())
}

/// One field of a binary COPY tuple: its length, then its bytes.
fn copy_field(buf: &mut Vec<u8>, value: &[u8]) {
    // Every field is bounded far below 2 GiB (an event is at most 1 MiB).
    buf.extend_from_slice(&(value.len() as i32).to_be_bytes());
    buf.extend_from_slice(value);
}

async fn upsert_sessions(
    tx: &mut Transaction<'static, Postgres>,
    rows: &[SessionRow],
) -> Result<(), StoreError> {
    let text =
        |f: fn(&SessionRow) -> &str| rows.iter().map(|r| f(r).to_owned()).collect::<Vec<_>>();
    let num = |f: fn(&SessionRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO audit_sessions AS s SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], \
         $4::int[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) \
         ON CONFLICT (session_id) DO UPDATE SET \
           principal = COALESCE(NULLIF(s.principal, ''), EXCLUDED.principal), \
           connection = COALESCE(NULLIF(s.connection, ''), EXCLUDED.connection), \
           protocol = CASE WHEN s.protocol = 0 THEN EXCLUDED.protocol ELSE s.protocol END, \
           role = COALESCE(NULLIF(s.role, ''), EXCLUDED.role), \
           source_address = COALESCE(NULLIF(s.source_address, ''), EXCLUDED.source_address), \
           first_event_us = LEAST(s.first_event_us, EXCLUDED.first_event_us), \
           last_event_us = GREATEST(s.last_event_us, EXCLUDED.last_event_us), \
           events = s.events + EXCLUDED.events, \
           last_sequence = GREATEST(s.last_sequence, EXCLUDED.last_sequence)",
    )
    .bind(text(|r| &r.session_id))
    .bind(text(|r| &r.principal))
    .bind(text(|r| &r.connection))
    .bind(rows.iter().map(|r| r.protocol).collect::<Vec<_>>())
    .bind(text(|r| &r.role))
    .bind(text(|r| &r.source_address))
    .bind(num(|r| r.first_event_us))
    .bind(num(|r| r.last_event_us))
    .bind(num(|r| r.events))
    .bind(num(|r| r.last_sequence))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Holes of the given sessions; only sessions whose count falls short of their last
/// sequence are scanned, so the common case costs one index lookup per session.
async fn gaps_in(
    tx: &mut Transaction<'static, Postgres>,
    sessions: Vec<String>,
) -> Result<Vec<Gap>, StoreError> {
    let short: Vec<String> = sqlx::query_scalar(
        "SELECT session_id FROM audit_sessions WHERE session_id = ANY($1) AND events < last_sequence",
    )
    .bind(&sessions)
    .fetch_all(&mut **tx)
    .await?;
    let mut gaps = Vec::new();
    for session in short {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT session_sequence FROM audit_events WHERE session_id = $1 ORDER BY session_sequence",
        )
        .bind(&session)
        .fetch_all(&mut **tx)
        .await?;
        gaps.extend(holes(&session, seqs));
    }
    Ok(gaps)
}

async fn insert_checkpoint(
    tx: &mut Transaction<'static, Postgres>,
    cp: &Checkpoint,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (chain_sequence, head_hash, created_at_us, signature, key_id) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(cp.chain_sequence as i64)
    .bind(&cp.head_hash)
    .bind(cp.created_at_us)
    .bind(&cp.signature)
    .bind(&cp.key_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::key_runs;

    #[test]
    fn keys_become_runs_of_consecutive_sequences() {
        let keys = [
            ("b", 2),
            ("a", 1),
            ("a", 2),
            ("a", 4),
            ("b", 3),
            ("a", 2),
            ("b", i64::MAX),
        ]
        .map(|(s, n)| (s.to_string(), n))
        .to_vec();
        let runs = key_runs(keys);
        let expect = [
            ("a", 1, 2),
            ("a", 4, 4),
            ("b", 2, 3),
            ("b", i64::MAX, i64::MAX),
        ]
        .map(|(s, a, b)| (s.to_string(), a, b))
        .to_vec();
        assert_eq!(runs, expect);
    }
}
