//! The audit log in an embedded SQLite file: the default, so a fresh machine runs the stack
//! with nothing else installed. WAL mode with full fsync on commit; one writer at a time.

use std::collections::HashSet;
use std::str::FromStr;

use agentgate_audit_chain::{Checkpoint, SigningKey};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::plan::{Plan, checkpoint_due, head_from};
use super::{
    AppendOutcome, CheckpointRow, Gap, Head, NewEvent, SessionFilter, SessionRow, StoreError,
    StoredRow, holes, now_us,
};

macro_rules! event_columns {
    () => {
        "chain_sequence, stored_at_us, session_id, session_sequence, \
     occurred_at_us, kind, principal, connection, protocol, body, hash"
    };
}

/// Rows per multi-row statement, within SQLite's bound-parameter limit.
const ROWS_PER_STATEMENT: usize = 500;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &str) -> Result<Self, StoreError> {
        if let Some(dir) = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Invalid(format!("creating {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn head_in(tx: &mut Transaction<'static, Sqlite>) -> Result<(Head, u64), StoreError> {
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
        let mut tx = self.write_tx().await?;
        let (head, last_cp) = Self::head_in(&mut tx).await?;

        let keys = Plan::keys(&batches);
        let mut existing = HashSet::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT session_id, session_sequence FROM audit_events WHERE (session_id, session_sequence) IN (",
            );
            let mut sep = q.separated(", ");
            for (id, seq) in chunk {
                sep.push("(")
                    .push_bind_unseparated(id)
                    .push_unseparated(", ");
                sep.push_bind_unseparated(*seq).push_unseparated(")");
            }
            q.push(")");
            let found: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
            existing.extend(found);
        }

        let plan = Plan::new(batches, &existing, head, now_us());
        for chunk in plan.rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(concat!(
                "INSERT INTO audit_events (",
                event_columns!(),
                ") "
            ));
            q.push_values(chunk, |mut b, r| {
                b.push_bind(r.chain_sequence)
                    .push_bind(r.stored_at_us)
                    .push_bind(&r.session_id)
                    .push_bind(r.session_sequence)
                    .push_bind(r.occurred_at_us)
                    .push_bind(&r.kind)
                    .push_bind(&r.principal)
                    .push_bind(&r.connection)
                    .push_bind(r.protocol)
                    .push_bind(&r.body)
                    .push_bind(&r.hash);
            });
            q.build().execute(&mut *tx).await?;
        }
        for chunk in plan.sessions.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO audit_sessions ");
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.session_id)
                    .push_bind(&r.principal)
                    .push_bind(&r.connection)
                    .push_bind(r.protocol)
                    .push_bind(&r.role)
                    .push_bind(&r.source_address)
                    .push_bind(r.first_event_us)
                    .push_bind(r.last_event_us)
                    .push_bind(r.events)
                    .push_bind(r.last_sequence);
            });
            q.push(
                " ON CONFLICT (session_id) DO UPDATE SET \
                   principal = COALESCE(NULLIF(principal, ''), excluded.principal), \
                   connection = COALESCE(NULLIF(connection, ''), excluded.connection), \
                   protocol = CASE WHEN protocol = 0 THEN excluded.protocol ELSE protocol END, \
                   role = COALESCE(NULLIF(role, ''), excluded.role), \
                   source_address = COALESCE(NULLIF(source_address, ''), excluded.source_address), \
                   first_event_us = MIN(first_event_us, excluded.first_event_us), \
                   last_event_us = MAX(last_event_us, excluded.last_event_us), \
                   events = events + excluded.events, \
                   last_sequence = MAX(last_sequence, excluded.last_sequence)",
            );
            q.build().execute(&mut *tx).await?;
        }
        let mut gaps = Vec::new();
        for s in &plan.sessions {
            gaps.extend(gaps_in(&mut tx, &s.session_id).await?);
        }
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
        let mut tx = self.write_tx().await?;
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
            " FROM audit_events WHERE chain_sequence > ?1 AND chain_sequence <= ?2 \
             ORDER BY chain_sequence LIMIT ?3"
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
            " FROM audit_events WHERE session_id = ?1 AND session_sequence > ?2 \
             ORDER BY session_sequence LIMIT ?3"
        ))
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM audit_sessions WHERE (?1 IS NULL OR principal = ?1) \
             AND (?2 IS NULL OR connection = ?2) AND (?3 IS NULL OR protocol = ?3) \
             AND (?4 IS NULL OR last_event_us >= ?4) AND (?5 IS NULL OR first_event_us < ?5) \
             ORDER BY first_event_us DESC, session_id LIMIT ?6",
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
        gaps_in(&mut tx, session_id).await
    }

    pub async fn prune(&self, upto: i64) -> Result<u64, StoreError> {
        let mut tx = self.write_tx().await?;
        let signed: Option<i64> = sqlx::query_scalar(
            "SELECT chain_sequence FROM audit_checkpoints WHERE chain_sequence = ?1",
        )
        .bind(upto)
        .fetch_optional(&mut *tx)
        .await?;
        if signed.is_none() {
            return Err(StoreError::Invalid(format!(
                "prune: no signed checkpoint at {upto}"
            )));
        }
        sqlx::query("INSERT INTO audit_prune_window (upto) VALUES (?1)")
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        let removed = sqlx::query("DELETE FROM audit_events WHERE chain_sequence <= ?1")
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM audit_prune_window")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed)
    }
}

async fn gaps_in(
    tx: &mut Transaction<'static, Sqlite>,
    session: &str,
) -> Result<Vec<Gap>, StoreError> {
    let short: Option<String> = sqlx::query_scalar(
        "SELECT session_id FROM audit_sessions WHERE session_id = ?1 AND events < last_sequence",
    )
    .bind(session)
    .fetch_optional(&mut **tx)
    .await?;
    if short.is_none() {
        return Ok(Vec::new());
    }
    let seqs: Vec<i64> = sqlx::query_scalar(
        "SELECT session_sequence FROM audit_events WHERE session_id = ?1 ORDER BY session_sequence",
    )
    .bind(session)
    .fetch_all(&mut **tx)
    .await?;
    Ok(holes(session, seqs))
}

async fn insert_checkpoint(
    tx: &mut Transaction<'static, Sqlite>,
    cp: &Checkpoint,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (chain_sequence, head_hash, created_at_us, signature, key_id) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
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
