//! Storage of approval requests on Postgres (several instances) or SQLite (one instance).
//!
//! A row holds the whole request (`body`, the protobuf message) plus columns derived from it
//! for filtering and expiry. Every change happens in a transaction that first locks the row
//! (`SELECT … FOR UPDATE` on Postgres; `BEGIN IMMEDIATE` takes SQLite's one write lock), then
//! applies the rules of [`crate::model`] to what it read, then writes. So two instances
//! reviewing the same request at once are serialised, and the rules see the latest state.
//!
//! On Postgres every change also sends `NOTIFY agentgate_approvals, '<id> <version>'` in the
//! same transaction — delivered only if it commits — which is how a watcher on another
//! instance hears of it (see [`crate::hub`]).
//!
//! The SQL is the same for both backends except for a few fragments ([`Dialect`]); sqlx
//! accepts `$N` parameters on SQLite too.

use std::str::FromStr as _;

use agentgate_proto::approvals::v1::{ApprovalRequest, State};
use prost::Message as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row as _};

use crate::model::{self, Outcome, RuleError};

/// The Postgres channel changes are announced on.
pub const CHANNEL: &str = "agentgate_approvals";

/// Errors from the database, with what the store was doing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored request {id} does not decode: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The few places where the two SQL dialects differ.
struct Dialect {
    /// How a write transaction starts.
    begin: &'static str,
    /// Appended to the SELECT that reads a row about to change.
    lock_row: &'static str,
    /// Appended to the sweeper's SELECT, so instances sweeping at once take different rows.
    lock_due: &'static str,
    /// True when `r.reviewer_groups` (JSON text) shares an element with the JSON array `$6`.
    groups_overlap: &'static str,
    /// Sends a change to the other instances (`$1`: payload), or None.
    notify: Option<&'static str>,
}

const POSTGRES: Dialect = Dialect {
    begin: "BEGIN",
    lock_row: " FOR UPDATE",
    lock_due: " FOR UPDATE SKIP LOCKED",
    groups_overlap: "EXISTS (SELECT 1 FROM jsonb_array_elements_text(r.reviewer_groups::jsonb) AS g(v) \
         WHERE g.v IN (SELECT jsonb_array_elements_text($6::jsonb)))",
    notify: Some("SELECT pg_notify('agentgate_approvals', $1)"),
};

const SQLITE: Dialect = Dialect {
    begin: "BEGIN IMMEDIATE",
    lock_row: "",
    lock_due: "",
    groups_overlap: "EXISTS (SELECT 1 FROM json_each(r.reviewer_groups) AS g \
         WHERE g.value IN (SELECT value FROM json_each($6)))",
    notify: None,
};

#[derive(Clone)]
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the concrete pool and `$d` to its dialect: the same
/// code, compiled once per backend.
macro_rules! with_pool {
    ($self:expr, |$pool:ident, $d:ident| $body:expr) => {
        match &$self.pool {
            Pool::Postgres($pool) => {
                let $d = &POSTGRES;
                $body
            }
            Pool::Sqlite($pool) => {
                let $d = &SQLITE;
                $body
            }
        }
    };
}

/// Writes a changed request (derived columns and body) in the transaction `$tx`, and
/// announces it. A macro rather than a generic function: it expands inside [`with_pool!`],
/// where the backend types are concrete.
macro_rules! write_change {
    ($tx:expr, $d:expr, $r:expr) => {{
        let r: &ApprovalRequest = $r;
        let done = sqlx::query(
            "UPDATE approval_requests SET state = $2, decided_at_us = $3, version = $4, body = $5 \
             WHERE id = $1",
        )
        .bind(&r.id)
        .bind(r.state)
        .bind(decided_at_us(r))
        .bind(r.version as i64)
        .bind(r.encode_to_vec())
        .execute(&mut *$tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Invalid(format!(
                "request {} vanished while locked",
                r.id
            )));
        }
        if let Some(notify) = $d.notify {
            sqlx::query(notify)
                .bind(payload(r))
                .execute(&mut *$tx)
                .await?;
        }
    }};
}

/// What `List` and a filtered `Watch` ask for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `State::Unspecified` matches any state.
    pub state: i32,
    pub connection: String,
    pub requester: String,
    pub limit: u32,
    /// Who asks: they see only what they may (see [`model::may_see`]).
    pub visibility: Visibility,
}

/// Which requests a caller may see.
#[derive(Debug, Clone, Default)]
pub struct Visibility {
    /// Services and viewer groups see everything.
    pub all: bool,
    pub subject: String,
    pub groups: Vec<String>,
}

/// The result of [`Store::update`].
#[derive(Debug, Clone)]
pub struct Updated {
    /// The request as stored after the call.
    pub request: ApprovalRequest,
    /// The request had passed its expiry and was expired first (in its own committed step).
    pub expired: Option<ApprovalRequest>,
    /// What the change did, `Ok(None)` when nothing changed, or why it was refused.
    pub result: Result<Option<Outcome>, RuleError>,
}

/// The approval requests, on one of the two backends. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Connects and applies migrations: `postgres://…` or `sqlite://PATH`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect(url)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Ok(Store {
                pool: Pool::Postgres(pool),
            })
        } else if let Some(path) = url.strip_prefix("sqlite://") {
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
            Ok(Store {
                pool: Pool::Sqlite(pool),
            })
        } else {
            Err(StoreError::Invalid(format!(
                "database url must start with postgres:// or sqlite://, got {:?}",
                url.split(':').next().unwrap_or_default()
            )))
        }
    }

    /// "postgres" or "sqlite", for logs.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Postgres(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    /// The Postgres pool, for the change listener; None on SQLite.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    /// Stores a new request (and announces it).
    pub async fn insert(&self, r: &ApprovalRequest) -> Result<(), StoreError> {
        with_pool!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin).await?;
            sqlx::query(
                "INSERT INTO approval_requests (id, state, connection, requester, reviewer_groups, \
                 created_at_us, expires_at_us, decided_at_us, version, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&r.id)
            .bind(r.state)
            .bind(&r.connection)
            .bind(requester(r))
            .bind(groups_json(&r.reviewer_groups))
            .bind(created_at_us(r))
            .bind(model::expires_at_us(r))
            .bind(decided_at_us(r))
            .bind(r.version as i64)
            .bind(r.encode_to_vec())
            .execute(&mut *tx)
            .await?;
            if let Some(notify) = d.notify {
                sqlx::query(notify)
                    .bind(payload(r))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// One request as stored (no expiry check: see [`Store::update`]).
    pub async fn get(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        with_pool!(self, |pool, _d| {
            let body: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT body FROM approval_requests WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
            body.map(|b| decode(id, &b)).transpose()
        })
    }

    /// Requests matching `filter` that the caller may see, newest first.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<ApprovalRequest>, StoreError> {
        with_pool!(self, |pool, d| {
            let sql = format!(
                "SELECT r.id, r.body FROM approval_requests r \
                 WHERE ($1 = 0 OR r.state = $1) AND ($2 = '' OR r.connection = $2) \
                 AND ($3 = '' OR r.requester = $3) \
                 AND ($4 OR r.requester = $5 OR {}) \
                 ORDER BY r.created_at_us DESC, r.id DESC LIMIT $7",
                d.groups_overlap
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(filter.state)
                .bind(&filter.connection)
                .bind(&filter.requester)
                .bind(filter.visibility.all)
                .bind(&filter.visibility.subject)
                .bind(groups_json(&filter.visibility.groups))
                .bind(i64::from(filter.limit))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    let id: String = row.try_get("id")?;
                    let body: Vec<u8> = row.try_get("body")?;
                    decode(&id, &body)
                })
                .collect()
        })
    }

    /// Changes one request under its row lock.
    ///
    /// Reads the request, expires it first when it is past its expiry (committed on its own,
    /// so the expiry stands whatever `change` does), then applies `change` to the request as
    /// read. When `change` returns `Ok(Some(_))` the result is written (with a NOTIFY on
    /// Postgres); otherwise nothing is. `Ok(None)` from this function means no such request.
    pub async fn update<F>(
        &self,
        id: &str,
        now_us: i64,
        change: F,
    ) -> Result<Option<Updated>, StoreError>
    where
        F: FnOnce(&mut ApprovalRequest) -> Result<Option<Outcome>, RuleError>,
    {
        with_pool!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin).await?;
            let sql = format!(
                "SELECT body FROM approval_requests WHERE id = $1{}",
                d.lock_row
            );
            let body: Option<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(body) = body else {
                return Ok(None);
            };
            let mut r = decode(id, &body)?;
            let mut expired = None;
            if model::is_due(&r, now_us) {
                model::expire(&mut r, now_us);
                write_change!(tx, d, &r);
                tx.commit().await?;
                expired = Some(r.clone());
                tx = pool.begin_with(d.begin).await?;
                // Decided now: `change` will be refused by the rules; nothing more to lock.
            }
            let before = r.clone();
            let result = change(&mut r);
            match &result {
                Ok(Some(_)) => {
                    write_change!(tx, d, &r);
                    tx.commit().await?;
                }
                _ => {
                    r = before;
                    tx.rollback().await?;
                }
            }
            Ok(Some(Updated {
                request: r,
                expired,
                result,
            }))
        })
    }

    /// Expires up to `limit` pending requests whose time has come, and returns them.
    ///
    /// Safe to run on every instance at once: on Postgres the rows are taken with
    /// `FOR UPDATE SKIP LOCKED` and re-checked under the lock, so each request is expired by
    /// exactly one instance, which alone records and announces it.
    pub async fn expire_due(
        &self,
        now_us: i64,
        limit: u32,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        with_pool!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin).await?;
            let sql = format!(
                "SELECT id, body FROM approval_requests WHERE state = $1 AND expires_at_us <= $2 \
                 ORDER BY expires_at_us LIMIT $3{}",
                d.lock_due
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(State::Pending as i32)
                .bind(now_us)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            let mut expired = Vec::with_capacity(rows.len());
            for row in rows {
                let id: String = row.try_get("id")?;
                let body: Vec<u8> = row.try_get("body")?;
                let mut r = decode(&id, &body)?;
                if model::is_due(&r, now_us) {
                    model::expire(&mut r, now_us);
                    write_change!(tx, d, &r);
                    expired.push(r);
                }
            }
            tx.commit().await?;
            Ok(expired)
        })
    }

    /// When the next pending request expires, if any.
    pub async fn next_expiry_us(&self) -> Result<Option<i64>, StoreError> {
        with_pool!(self, |pool, _d| {
            let next: Option<i64> = sqlx::query_scalar(
                "SELECT MIN(expires_at_us) FROM approval_requests WHERE state = $1",
            )
            .bind(State::Pending as i32)
            .fetch_one(pool)
            .await?;
            Ok(next)
        })
    }
}

fn decode(id: &str, body: &[u8]) -> Result<ApprovalRequest, StoreError> {
    ApprovalRequest::decode(body).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

fn requester(r: &ApprovalRequest) -> String {
    r.requester
        .as_ref()
        .map(|p| p.subject.clone())
        .unwrap_or_default()
}

fn groups_json(groups: &[String]) -> String {
    serde_json::to_string(groups).unwrap_or_else(|_| "[]".into())
}

fn created_at_us(r: &ApprovalRequest) -> i64 {
    r.created_at.as_ref().map(model::timestamp_us).unwrap_or(0)
}

fn decided_at_us(r: &ApprovalRequest) -> Option<i64> {
    r.decided_at.as_ref().map(model::timestamp_us)
}

/// The NOTIFY payload: `<id> <version>`.
fn payload(r: &ApprovalRequest) -> String {
    format!("{} {}", r.id, r.version)
}

/// Parses a NOTIFY payload.
pub fn parse_payload(payload: &str) -> Option<(&str, u64)> {
    let (id, version) = payload.split_once(' ')?;
    Some((id, version.parse().ok()?))
}
