//! The durable local spool: an SQLite file in WAL mode with full fsync, written by one task
//! that commits whatever queued up meanwhile in one transaction (group commit), so durability
//! costs one fsync per group, not per event.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::RecorderError;

/// Most events one spool transaction takes.
const GROUP_MAX: usize = 2000;

type Reply = oneshot::Sender<Result<(), String>>;

/// The spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    pool: SqlitePool,
    path: String,
    writes: mpsc::Sender<(Vec<u8>, Reply)>,
    /// Events spooled and not yet acknowledged, kept in memory (COUNT(*) is a full scan).
    backlog: Arc<watch::Sender<u64>>,
}

impl Spool {
    /// Opens or creates the spool file and its tables.
    pub async fn open(path: &Path) -> Result<Spool, RecorderError> {
        let display = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| RecorderError::Spool {
            path: display.clone(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{display}"))
            .map_err(|e| err(&e))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| err(&e))?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS spool_rejected (id INTEGER PRIMARY KEY, body BLOB NOT NULL, \
             reason TEXT NOT NULL, rejected_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        ] {
            sqlx::query(ddl).execute(&pool).await.map_err(|e| err(&e))?;
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM spool")
            .fetch_one(&pool)
            .await
            .map_err(|e| err(&e))?;
        let backlog = Arc::new(watch::Sender::new(count as u64));
        let (writes, rx) = mpsc::channel(4096);
        tokio::spawn(write_loop(pool.clone(), rx, backlog.clone()));
        Ok(Spool {
            pool,
            path: display,
            writes,
            backlog,
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> RecorderError {
        RecorderError::Spool {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Appends one encoded event; returns once it is committed to disk.
    pub async fn append(&self, body: Vec<u8>) -> Result<(), RecorderError> {
        let (tx, rx) = oneshot::channel();
        self.writes
            .send((body, tx))
            .await
            .map_err(|_| RecorderError::Closed)?;
        rx.await
            .map_err(|_| RecorderError::Closed)?
            .map_err(|e| self.error(e))
    }

    /// Up to `limit` spooled events after `after`, oldest first.
    pub async fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Vec<u8>)>, RecorderError> {
        sqlx::query_as("SELECT id, body FROM spool WHERE id > ?1 ORDER BY id LIMIT ?2")
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    /// Forgets everything up to `id`: the store has acknowledged it.
    pub async fn acknowledge_through(&self, id: i64) -> Result<(), RecorderError> {
        let removed = sqlx::query("DELETE FROM spool WHERE id <= ?1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?
            .rows_affected();
        self.backlog.send_modify(|n| *n = n.saturating_sub(removed));
        Ok(())
    }

    /// Moves events the store refused as malformed aside, so they neither block the spool
    /// nor vanish: they stay in `spool_rejected` for an operator to inspect.
    pub async fn reject_through(
        &self,
        from: i64,
        to: i64,
        reason: &str,
    ) -> Result<(), RecorderError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
        sqlx::query(
            "INSERT OR REPLACE INTO spool_rejected (id, body, reason) SELECT id, body, ?3 FROM spool \
             WHERE id >= ?1 AND id <= ?2",
        )
        .bind(from)
        .bind(to)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let removed = sqlx::query("DELETE FROM spool WHERE id >= ?1 AND id <= ?2")
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?
            .rows_affected();
        tx.commit().await.map_err(|e| self.error(e))?;
        self.backlog.send_modify(|n| *n = n.saturating_sub(removed));
        Ok(())
    }

    /// Events spooled and not yet acknowledged.
    pub fn len(&self) -> u64 {
        *self.backlog.borrow()
    }

    /// Whether everything spooled has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches the backlog, e.g. to wait until it reaches zero.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.backlog.subscribe()
    }

    /// Events the store refused, kept aside.
    pub async fn rejected(&self) -> Result<u64, RecorderError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM spool_rejected")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(n as u64)
    }
}

async fn write_loop(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<(Vec<u8>, Reply)>,
    backlog: Arc<watch::Sender<u64>>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let result = write_group(&pool, &group).await.map_err(|e| e.to_string());
        if result.is_ok() {
            backlog.send_modify(|n| *n += group.len() as u64);
        }
        for (_, reply) in group {
            let _ = reply.send(result.clone());
        }
    }
}

async fn write_group(pool: &SqlitePool, group: &[(Vec<u8>, Reply)]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for (body, _) in group {
        sqlx::query("INSERT INTO spool (body) VALUES (?1)")
            .bind(body)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reopen_and_acknowledges_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        {
            let spool = Spool::open(&path).await.expect("open");
            for i in 0..5u8 {
                spool.append(vec![i]).await.expect("append");
            }
        }
        let spool = Spool::open(&path).await.expect("reopen");
        let rows = spool.read_after(0, 10).await.expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        spool.acknowledge_through(rows[2].0).await.expect("ack");
        assert_eq!(spool.len(), 2);
        spool
            .reject_through(rows[3].0, rows[3].0, "bad")
            .await
            .expect("reject");
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.rejected().await.expect("rejected"), 1);
    }
}
