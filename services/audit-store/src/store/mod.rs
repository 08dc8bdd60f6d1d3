//! Storage of the audit log on Postgres or SQLite.
//!
//! Both backends keep the same tables (see `migrations/`) and pass the same tests. What is
//! the same for both — deduplication, sequence gaps, chain linking, when to checkpoint —
//! lives in [`plan`]; each backend module holds only its SQL.

mod plan;
mod postgres;
mod sqlite;

use agentgate_audit_chain::{Checkpoint, Hash, Record, SigningKey};

pub use plan::{AppendOutcome, NewEvent};

/// Errors from the database, with what the store was doing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
}

/// A stored event: its chain record, hash and the query columns derived from its body.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredRow {
    pub chain_sequence: i64,
    pub stored_at_us: i64,
    pub session_id: String,
    pub session_sequence: i64,
    pub occurred_at_us: i64,
    pub kind: String,
    pub principal: String,
    pub connection: String,
    pub protocol: i32,
    pub body: Vec<u8>,
    pub hash: Vec<u8>,
}

impl StoredRow {
    /// The part of the row the chain hash covers.
    pub fn record(&self) -> Record {
        Record {
            chain_sequence: self.chain_sequence as u64,
            stored_at_us: self.stored_at_us,
            session_id: self.session_id.clone(),
            session_sequence: self.session_sequence as u64,
            body: self.body.clone(),
        }
    }
}

/// One row of the derived session index.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub session_id: String,
    pub principal: String,
    pub connection: String,
    pub protocol: i32,
    pub role: String,
    pub source_address: String,
    pub first_event_us: i64,
    pub last_event_us: i64,
    pub events: i64,
    pub last_sequence: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct CheckpointRow {
    chain_sequence: i64,
    head_hash: Vec<u8>,
    created_at_us: i64,
    signature: Vec<u8>,
    key_id: String,
}

impl From<CheckpointRow> for Checkpoint {
    fn from(r: CheckpointRow) -> Self {
        Checkpoint {
            chain_sequence: r.chain_sequence as u64,
            head_hash: r.head_hash,
            created_at_us: r.created_at_us,
            signature: r.signature,
            key_id: r.key_id,
        }
    }
}

/// Filters of `ListSessions`; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub principal: Option<String>,
    pub connection: Option<String>,
    pub protocol: Option<i32>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
    pub limit: i64,
}

/// A run of missing sequence numbers in one session, inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub session_id: String,
    pub from: u64,
    pub to: u64,
}

/// The last link of the chain: its sequence and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub chain_sequence: u64,
    pub hash: Hash,
}

/// The audit log on one of the two backends.
#[derive(Clone)]
pub enum Store {
    Postgres(postgres::PgStore),
    Sqlite(sqlite::SqliteStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Postgres($s) => $call,
            Store::Sqlite($s) => $call,
        }
    };
}

impl Store {
    /// Connects and applies migrations: `postgres://…` for Postgres, `sqlite://PATH` for SQLite.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(postgres::PgStore::connect(url).await?))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Store::Sqlite(sqlite::SqliteStore::open(path).await?))
        } else {
            Err(StoreError::Invalid(format!(
                "database url must start with postgres:// or sqlite://, got {:?}",
                url.split(':').next().unwrap_or_default()
            )))
        }
    }

    /// "postgres" or "sqlite", for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Appends batches in one transaction: duplicates skipped, the rest chained, a checkpoint
    /// signed when `checkpoint_every` events have passed since the last one.
    pub async fn append(
        &self,
        batches: Vec<Vec<NewEvent>>,
        key: &SigningKey,
        checkpoint_every: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        dispatch!(self, s => s.append(batches, key, checkpoint_every).await)
    }

    /// Signs and stores a checkpoint of the current head, unless the head is already signed.
    pub async fn checkpoint(&self, key: &SigningKey) -> Result<Option<Checkpoint>, StoreError> {
        dispatch!(self, s => s.checkpoint(key).await)
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        dispatch!(self, s => s.checkpoints().await)
    }

    /// Events with chain sequence in (after, until], in chain order, at most `limit`.
    pub async fn page(
        &self,
        after: i64,
        until: i64,
        limit: i64,
    ) -> Result<Vec<StoredRow>, StoreError> {
        dispatch!(self, s => s.page(after, until, limit).await)
    }

    /// The oldest retained event's chain sequence.
    pub async fn first_sequence(&self) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.first_sequence().await)
    }

    pub async fn head(&self) -> Result<Head, StoreError> {
        dispatch!(self, s => s.head().await)
    }

    /// A session's events after sequence `after`, in sequence order, at most `limit`.
    pub async fn session_events(
        &self,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredRow>, StoreError> {
        dispatch!(self, s => s.session_events(session_id, after, limit).await)
    }

    pub async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionRow>, StoreError> {
        dispatch!(self, s => s.list_sessions(filter).await)
    }

    /// Missing sequence numbers of a session (at most 100 runs).
    pub async fn session_gaps(&self, session_id: &str) -> Result<Vec<Gap>, StoreError> {
        dispatch!(self, s => s.session_gaps(session_id).await)
    }

    /// Retention: removes events up to `upto`, which must be a checkpoint's sequence.
    pub async fn prune(&self, upto: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune(upto).await)
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Computes the holes of a session from its sorted sequence numbers.
fn holes(session_id: &str, sorted: impl IntoIterator<Item = i64>) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut expected = 1i64;
    for seq in sorted {
        if seq > expected {
            gaps.push(Gap {
                session_id: session_id.to_owned(),
                from: expected as u64,
                to: (seq - 1) as u64,
            });
            if gaps.len() == 100 {
                break;
            }
        }
        expected = seq + 1;
    }
    gaps
}
