//! authz's state on Postgres or SQLite, through sqlx's `Any` driver: the queries are plain
//! portable SQL, so one code path serves both.

use std::str::FromStr as _;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions as _};

/// A grant as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GrantRow {
    pub id: String,
    pub subject: String,
    pub connection: String,
    pub role: String,
    pub source: i32,
    pub not_before_us: i64,
    pub expires_at_us: i64,
    pub approved_by_json: String,
    pub reason: String,
    pub approval_id: String,
    pub created_at_us: i64,
    pub revoked_at_us: Option<i64>,
}

/// An access request waiting for (or decided by) the approvals service.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AccessRequestRow {
    pub approval_id: String,
    pub subject: String,
    pub connection: String,
    pub role: String,
    pub duration_secs: i64,
    pub reason: String,
    pub created_at_us: i64,
    pub state: String,
    pub grant_id: Option<String>,
}

/// A token authz signed, as recorded at issue.
#[derive(Debug, Clone)]
pub struct IssuedToken<'a> {
    pub jti: &'a str,
    pub subject: &'a str,
    pub kind: &'a str,
    pub groups: &'a [String],
    pub audience: &'a [String],
    pub issued_at_us: i64,
    pub expires_at_us: i64,
    pub issued_by: &'a str,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

const GRANT_COLUMNS: &str = "id, subject, connection, role, source, not_before_us, expires_at_us, \
    approved_by_json, reason, approval_id, created_at_us, revoked_at_us";

impl Store {
    /// Connects and migrates: `postgres://…` or `sqlite://PATH`.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        if let Some(path) = url.strip_prefix("sqlite://")
            && let Some(dir) = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)?;
        }
        let url = if url.starts_with("sqlite://") && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let sqlite = url.starts_with("sqlite:");
        // SQLite allows one writer: one connection avoids lock retries between our own
        // connections. WAL with NORMAL sync: a crash may lose the last session rows, never
        // corrupt them; the evidence itself lives in the audit store.
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        use sqlx::Executor as _;
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn record_token(&self, t: &IssuedToken<'_>) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO authz_tokens (jti, subject, kind, groups_json, audience_json, issued_at_us, expires_at_us, issued_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(t.jti)
        .bind(t.subject)
        .bind(t.kind)
        .bind(serde_json::to_string(t.groups).unwrap_or_default())
        .bind(serde_json::to_string(t.audience).unwrap_or_default())
        .bind(t.issued_at_us)
        .bind(t.expires_at_us)
        .bind(t.issued_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a revocation; true if it is new.
    pub async fn revoke_token(
        &self,
        jti: &str,
        by: &str,
        reason: &str,
        expires_at_us: i64,
        now_us: i64,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO authz_revocations (jti, revoked_at_us, revoked_by, reason, expires_at_us) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (jti) DO NOTHING",
        )
        .bind(jti)
        .bind(now_us)
        .bind(by)
        .bind(reason)
        .bind(expires_at_us)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Token ids revoked and not yet expired (older ones cannot verify anyway).
    pub async fn live_revocations(&self, now_us: i64) -> sqlx::Result<Vec<String>> {
        sqlx::query_scalar("SELECT jti FROM authz_revocations WHERE expires_at_us > $1")
            .bind(now_us)
            .fetch_all(&self.pool)
            .await
    }

    /// The expiry of a token authz issued, if it did.
    pub async fn token_expiry(&self, jti: &str) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar("SELECT expires_at_us FROM authz_tokens WHERE jti = $1")
            .bind(jti)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn insert_grant(&self, g: &GrantRow) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO authz_grants (id, subject, connection, role, source, not_before_us, expires_at_us, \
             approved_by_json, reason, approval_id, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&g.id)
        .bind(&g.subject)
        .bind(&g.connection)
        .bind(&g.role)
        .bind(g.source)
        .bind(g.not_before_us)
        .bind(g.expires_at_us)
        .bind(&g.approved_by_json)
        .bind(&g.reason)
        .bind(&g.approval_id)
        .bind(g.created_at_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The grant that lasts longest among the live ones for (subject, connection, role).
    pub async fn live_grant(
        &self,
        subject: &str,
        connection: &str,
        role: &str,
        now_us: i64,
    ) -> sqlx::Result<Option<GrantRow>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLUMNS} FROM authz_grants WHERE subject = $1 AND connection = $2 AND role = $3 \
             AND not_before_us <= $4 AND expires_at_us > $4 AND revoked_at_us IS NULL \
             ORDER BY expires_at_us DESC LIMIT 1"
        )))
        .bind(subject)
        .bind(connection)
        .bind(role)
        .bind(now_us)
        .fetch_optional(&self.pool)
        .await
    }

    pub async fn grant(&self, id: &str) -> sqlx::Result<Option<GrantRow>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLUMNS} FROM authz_grants WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Grants still live at `now_us` (for the expiry timer after a restart).
    pub async fn live_grants(&self, now_us: i64) -> sqlx::Result<Vec<GrantRow>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLUMNS} FROM authz_grants WHERE expires_at_us > $1 AND revoked_at_us IS NULL"
        )))
        .bind(now_us)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn list_grants(
        &self,
        subject: Option<&str>,
        connection: Option<&str>,
        include_expired: bool,
        now_us: i64,
    ) -> sqlx::Result<Vec<GrantRow>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLUMNS} FROM authz_grants WHERE ($1 = '' OR subject = $1) AND ($2 = '' OR connection = $2) \
             AND ($3 = 1 OR (expires_at_us > $4 AND revoked_at_us IS NULL)) ORDER BY created_at_us DESC LIMIT 1000"
        )))
        .bind(subject.unwrap_or_default())
        .bind(connection.unwrap_or_default())
        .bind(i32::from(include_expired))
        .bind(now_us)
        .fetch_all(&self.pool)
        .await
    }

    /// Marks a grant revoked; false when it was already revoked or does not exist.
    pub async fn revoke_grant(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        now_us: i64,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE authz_grants SET revoked_at_us = $1, revoked_by = $2, revoke_reason = $3 \
             WHERE id = $4 AND revoked_at_us IS NULL",
        )
        .bind(now_us)
        .bind(by)
        .bind(reason)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn insert_access_request(&self, r: &AccessRequestRow) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO authz_access_requests (approval_id, subject, connection, role, duration_secs, reason, created_at_us, state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&r.approval_id)
        .bind(&r.subject)
        .bind(&r.connection)
        .bind(&r.role)
        .bind(r.duration_secs)
        .bind(&r.reason)
        .bind(r.created_at_us)
        .bind(&r.state)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn pending_access_requests(&self) -> sqlx::Result<Vec<AccessRequestRow>> {
        sqlx::query_as(
            "SELECT approval_id, subject, connection, role, duration_secs, reason, created_at_us, state, grant_id \
             FROM authz_access_requests WHERE state = 'pending'",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Settles a pending request; false when another instance settled it first.
    pub async fn settle_access_request(
        &self,
        approval_id: &str,
        state: &str,
        grant_id: Option<&str>,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE authz_access_requests SET state = $1, grant_id = $2 WHERE approval_id = $3 AND state = 'pending'",
        )
        .bind(state)
        .bind(grant_id)
        .bind(approval_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn open_session(
        &self,
        id: &str,
        subject: &str,
        token_id: &str,
        grant_id: &str,
        connection: &str,
        role: &str,
        source: &str,
        opened_at_us: i64,
        expires_at_us: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO authz_sessions (id, subject, token_id, grant_id, connection, role, source_address, opened_at_us, expires_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(subject)
        .bind(token_id)
        .bind(grant_id)
        .bind(connection)
        .bind(role)
        .bind(source)
        .bind(opened_at_us)
        .bind(expires_at_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn close_session(&self, id: &str, reason: &str, now_us: i64) -> sqlx::Result<()> {
        sqlx::query("UPDATE authz_sessions SET closed_at_us = $1, close_reason = $2 WHERE id = $3 AND closed_at_us IS NULL")
            .bind(now_us)
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
