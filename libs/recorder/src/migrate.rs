//! Takes over a spool from the SQLite era (before the segment log): its events are moved into
//! a new spool directory at the same path, so an upgrade loses nothing that was spooled.
//!
//! Crash-safe: the new directory is built aside (`PATH.migrating`), marked complete, and only
//! then are the SQLite files removed and the directory moved into place. A crash before the
//! mark starts over from the SQLite file; after it, the move is finished.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

fn aside(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".migrating");
    PathBuf::from(p)
}

fn sqlite_files(path: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .collect()
}

/// Finishes or redoes an interrupted migration, and migrates `path` if it is an SQLite
/// spool file. Does nothing for a spool directory.
pub(crate) async fn prepare(path: &Path) -> Result<(), String> {
    let aside = aside(path);
    if aside.join("migrated").exists() {
        return finish(path, &aside);
    }
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
    }
    if !path.is_file() {
        return Ok(());
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| e.to_string())?;
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| format!("opening the old SQLite spool: {e}"))?;
    let events: Vec<(i64, Vec<u8>)> = match sqlx::query_as("SELECT id, body FROM spool ORDER BY id")
        .fetch_all(&pool)
        .await
    {
        Ok(rows) => rows,
        Err(e) => return Err(format!("reading the old SQLite spool: {e}")),
    };
    let rejected: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT body, reason FROM spool_rejected ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    pool.close().await;

    std::fs::create_dir_all(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
    let write = || -> std::io::Result<()> {
        let bodies: Vec<&[u8]> = events.iter().map(|(_, b)| b.as_slice()).collect();
        crate::spool::write_segment(&aside, 1, &bodies)?;
        let reasons: Vec<(&str, &[u8])> = rejected
            .iter()
            .map(|(b, r)| (r.as_str(), b.as_slice()))
            .collect();
        crate::spool::write_rejected(&aside, &reasons)?;
        std::fs::File::create(aside.join("migrated"))?.sync_all()?;
        std::fs::File::open(&aside)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", aside.display()))?;
    tracing::info!(
        spool = %path.display(),
        events = events.len(),
        rejected = rejected.len(),
        "moved the SQLite audit spool's events into the segment spool"
    );
    finish(path, &aside)
}

fn finish(path: &Path, aside: &Path) -> Result<(), String> {
    for f in sqlite_files(path) {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", f.display())),
        }
    }
    std::fs::remove_file(aside.join("migrated")).map_err(|e| e.to_string())?;
    std::fs::rename(aside, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn an_sqlite_spool_is_taken_over_with_its_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let pool = sqlx::SqlitePool::connect_with(options).await.expect("db");
            for ddl in [
                "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)",
                "CREATE TABLE spool_rejected (id INTEGER PRIMARY KEY, body BLOB NOT NULL, reason TEXT NOT NULL)",
                "INSERT INTO spool (body) VALUES (x'01'), (x'02'), (x'03')",
                "INSERT INTO spool_rejected (id, body, reason) VALUES (9, x'09', 'bad')",
            ] {
                sqlx::query(ddl).execute(&pool).await.expect("ddl");
            }
            // Left open-ish: the WAL may hold the rows, as after a crash.
            pool.close().await;
        }
        let spool = crate::Spool::open(&path).await.expect("open");
        assert!(path.is_dir());
        assert_eq!(spool.len(), 3);
        assert_eq!(spool.rejected(), 1);
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
}
