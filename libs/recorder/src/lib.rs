//! The client side of the audit store, used by every proxy and control-plane service.
//!
//! An event counts as recorded once it is in a durable local spool (a directory of
//! append-only segment files, fdatasynced per group of events), never later:
//! [`SessionRecorder::record`] and [`Recorder::record_event`] return only then. A caller that
//! must not wait for the disk per event queues it ([`Recorder::queue_event`]) and waits for
//! durability later ([`Recorder::durable`]); one writer thread commits whatever queued up
//! meanwhile with one write and one fdatasync. A background shipper streams what was written
//! to the audit store in batches (from memory while it is fresh) and forgets what the store
//! acknowledges. After a store outage, or a crash and restart of the process, the shipper
//! sends whatever the spool still holds; the store is idempotent on (session, sequence), so
//! a batch sent twice is stored once.
//!
//! The store only takes events from a service principal: give the recorder a token with
//! [`RecorderConfig::with_token_file`], [`RecorderConfig::with_token`] or any
//! [`TokenSource`]. The source is asked on every connection, so renewed tokens are picked up;
//! a refused or missing token never loses an event — they wait in the spool, the shipper
//! warns and retries with backoff.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentgate_recorder::RecorderError> {
//! use agentgate_recorder::{Recorder, RecorderConfig, SessionContext};
//! let config = RecorderConfig::new("http://127.0.0.1:7403", "/var/lib/agentgate/spool.db")
//!     .with_token_file("/var/lib/agentgate/pg-proxy.recorder.token");
//! let recorder = Recorder::open(config).await?;
//! let session = recorder.session(SessionContext { connection: "prod-db".into(), ..Default::default() });
//! session.record("session.start", None).await?;
//! # Ok(()) }
//! ```

mod migrate;
mod shipper;
mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::audit::v1::AuditEvent;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::common::v1::{Principal, Protocol};
use prost::Message as _;
use tonic::transport::{ClientTlsConfig, Endpoint};

/// The credential sources are identity's; the recorder asks its source on every connection.
pub use agentgate_identity::{FixedToken, TokenFile, TokenSource};
pub use spool::{DEFAULT_SYNC_INTERVAL, Spool, Ticket};

/// Why recording failed. Only a spool failure can fail `record`: the store being away never
/// does, since that is what the spool is for.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("audit spool {path}: {reason}")]
    Spool { path: String, reason: String },
    #[error("audit store endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("the recorder is closed")]
    Closed,
    #[error("timed out with {0} events not yet acknowledged by the audit store")]
    FlushTimeout(u64),
}

/// Where to ship, with which credential, and how to batch.
#[derive(Clone)]
pub struct RecorderConfig {
    /// The audit store's gRPC address, e.g. `http://127.0.0.1:7403` (`https://` for TLS).
    pub endpoint: String,
    pub tls: Option<ClientTlsConfig>,
    /// The spool directory; it survives restarts and must be on durable storage. An SQLite
    /// spool file left at this path by an earlier version is taken over (its events moved
    /// into the directory) on open.
    pub spool_path: PathBuf,
    /// Most events in one Ingest batch.
    pub batch_max: usize,
    /// Batches sent before the first is acknowledged.
    pub in_flight: usize,
    /// Longest wait between reconnect attempts while the store is away.
    pub max_backoff: Duration,
    /// Shortest time between two fdatasyncs of the spool while events keep coming (default
    /// [`DEFAULT_SYNC_INTERVAL`]): longer costs less CPU and fewer disk flushes under load,
    /// and lets a crash take that much more of the events queued last.
    pub sync_interval: Duration,
    /// The bearer token for the store, asked for on every connection. Without one the store
    /// refuses the stream (UNAUTHENTICATED) and events wait in the spool.
    pub token: Option<Arc<dyn TokenSource>>,
}

impl std::fmt::Debug for RecorderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderConfig")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls.is_some())
            .field("spool_path", &self.spool_path)
            .field("batch_max", &self.batch_max)
            .field("in_flight", &self.in_flight)
            .field("max_backoff", &self.max_backoff)
            .field("sync_interval", &self.sync_interval)
            .field("token", &self.token.as_ref().map(|_| "<source>"))
            .finish()
    }
}

impl RecorderConfig {
    /// Defaults fit for a proxy: batches of 1000, 4 in flight, backoff up to 5 s.
    pub fn new(endpoint: impl Into<String>, spool_path: impl Into<PathBuf>) -> Self {
        RecorderConfig {
            endpoint: endpoint.into(),
            tls: None,
            spool_path: spool_path.into(),
            batch_max: 1000,
            in_flight: 4,
            max_backoff: Duration::from_secs(5),
            sync_interval: DEFAULT_SYNC_INTERVAL,
            token: None,
        }
    }

    /// Presents this token on every connection ([`FixedToken`]).
    pub fn with_token(self, token: impl Into<String>) -> Self {
        self.with_token_source(Arc::new(FixedToken::new(token)))
    }

    /// Presents the token in `path`, read again on every connection ([`TokenFile`]).
    pub fn with_token_file(self, path: impl Into<PathBuf>) -> Self {
        self.with_token_source(Arc::new(TokenFile::new(path)))
    }

    /// Presents whatever `source` gives on each connection.
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.token = Some(source);
        self
    }
}

/// Records events durably and ships them; cheap to clone, one per process is enough.
#[derive(Clone)]
pub struct Recorder {
    spool: Spool,
    shipper: Arc<shipper::Handle>,
}

impl Recorder {
    /// Opens (or creates) the spool and starts shipping what it holds.
    pub async fn open(config: RecorderConfig) -> Result<Recorder, RecorderError> {
        let endpoint_err = |reason: String| RecorderError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| endpoint_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(tls) = config.tls.clone() {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| endpoint_err(e.to_string()))?;
        }
        let spool = Spool::open_with(&config.spool_path, config.sync_interval).await?;
        let shipper = shipper::spawn(spool.clone(), endpoint, config);
        Ok(Recorder {
            spool,
            shipper: Arc::new(shipper),
        })
    }

    /// Starts recording a new session with a fresh id (UUID v7: sortable by time).
    pub fn session(&self, context: SessionContext) -> SessionRecorder {
        self.session_with_id(uuid::Uuid::now_v7().to_string(), context)
    }

    /// Records under a session id chosen elsewhere (e.g. the one authz assigned).
    pub fn session_with_id(&self, session_id: String, context: SessionContext) -> SessionRecorder {
        SessionRecorder {
            recorder: self.clone(),
            session_id,
            context,
            next: Arc::new(std::sync::Mutex::new(1)),
        }
    }

    /// Appends one complete event to the spool; returns once it is durable.
    pub async fn record_event(&self, event: &AuditEvent) -> Result<(), RecorderError> {
        self.reserve().await?;
        let ticket = self.queue_event(event)?;
        self.durable(ticket).await
    }

    /// Waits while the spool's queue is over its bound (the disk is behind): call before
    /// queueing, so a burst cannot grow memory without limit. Returns at once otherwise.
    pub async fn reserve(&self) -> Result<(), RecorderError> {
        self.spool.reserve().await
    }

    /// Queues one complete event without waiting for the disk; it is durable once
    /// [`Recorder::durable`] says so. Events are written in the order they are queued, so a
    /// caller that numbers a session's events under its own lock and queues them under the
    /// same lock keeps spool order equal to sequence order. Call [`Recorder::reserve`]
    /// first.
    pub fn queue_event(&self, event: &AuditEvent) -> Result<Ticket, RecorderError> {
        self.spool.queue_with(|buf| event.encode_raw(buf))
    }

    /// Like [`Recorder::queue_event`] for an event split in two: `template`, the fields every
    /// event of a session repeats (encoded once), and `event`, the rest. Protobuf fields may
    /// come in any order, so the two encodings one after the other are one `AuditEvent`.
    pub fn queue_templated(
        &self,
        template: &EventTemplate,
        event: &AuditEvent,
    ) -> Result<Ticket, RecorderError> {
        self.spool.queue_with(|buf| {
            buf.extend_from_slice(&template.0);
            event.encode_raw(buf);
        })
    }

    /// Like [`Recorder::queue_templated`] for the rest of the event already encoded (by a
    /// caller that encodes its events from borrowed fields instead of an `AuditEvent`).
    pub fn queue_templated_encoded(
        &self,
        template: &EventTemplate,
        rest: &[u8],
    ) -> Result<Ticket, RecorderError> {
        self.spool.queue(&[&template.0, rest])
    }

    /// Like [`Recorder::queue_event`] for an event already encoded, given as parts whose
    /// concatenation is one encoded `AuditEvent`.
    pub fn queue_encoded(&self, parts: &[&[u8]]) -> Result<Ticket, RecorderError> {
        self.spool.queue(parts)
    }

    /// Waits until the queued event of `ticket` is durable; an error if its write failed.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), RecorderError> {
        self.spool.durable(ticket).await
    }

    /// Waits until the queued events `first` through `last` (and any queued between them)
    /// are durable; an error if the write of any of them failed.
    pub async fn durable_range(&self, first: Ticket, last: Ticket) -> Result<(), RecorderError> {
        self.spool.durable_range(first, last).await
    }

    /// Tells of spool writes that fail from now on: events of a failed write are not
    /// recorded (their [`Recorder::durable`] fails), and a proxy ends the sessions it can no
    /// longer vouch for. Does not keep the recorder open.
    pub fn write_failures(&self) -> WriteFailures {
        let mut progress = self.spool.progress();
        let seen = progress.borrow_and_update().failed_groups;
        WriteFailures { progress, seen }
    }

    /// Events queued or spooled and not yet acknowledged by the store.
    pub fn backlog(&self) -> u64 {
        self.spool.len()
    }

    /// Events the store refused as malformed, kept aside in the spool's `rejected.log`
    /// (a refused credential never puts events there: they wait in the spool).
    pub async fn rejected(&self) -> Result<u64, RecorderError> {
        Ok(self.spool.rejected())
    }

    /// Waits until the store has acknowledged everything spooled so far.
    pub async fn flush(&self, timeout: Duration) -> Result<(), RecorderError> {
        let mut backlog = self.spool.subscribe();
        self.shipper.wake();
        let wait = backlog.wait_for(|n| *n == 0);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(RecorderError::Closed),
            Err(_) => Err(RecorderError::FlushTimeout(self.backlog())),
        }
    }
}

/// The fields every event of a session repeats (session id, principal, source address,
/// connection, protocol, role), encoded once for [`Recorder::queue_templated`].
#[derive(Debug, Clone)]
pub struct EventTemplate(Vec<u8>);

impl EventTemplate {
    /// Encodes `fixed`; leave `sequence`, `time`, `kind`, `detail` and `attributes` empty
    /// here and set them per event.
    pub fn new(fixed: &AuditEvent) -> EventTemplate {
        EventTemplate(fixed.encode_to_vec())
    }
}

/// Failed spool writes, as they happen ([`Recorder::write_failures`]).
pub struct WriteFailures {
    progress: tokio::sync::watch::Receiver<spool::Progress>,
    seen: u64,
}

impl WriteFailures {
    /// Resolves at the next failed write with why; `None` once the recorder is gone.
    pub async fn next(&mut self) -> Option<String> {
        let seen = self.seen;
        let p = self
            .progress
            .wait_for(|p| p.failed_groups > seen)
            .await
            .ok()?;
        self.seen = p.failed_groups;
        Some(
            p.last_failure()
                .unwrap_or("the audit spool write failed")
                .to_owned(),
        )
    }
}

/// Who and what a session is about; copied into every event of the session, so each event
/// stands on its own as evidence.
#[derive(Debug, Clone, Default)]
pub struct SessionContext {
    pub principal: Option<Principal>,
    pub source_address: String,
    pub connection: String,
    pub protocol: Protocol,
    pub role: String,
}

/// Records the events of one session with gap-free sequence numbers.
#[derive(Clone)]
pub struct SessionRecorder {
    recorder: Recorder,
    session_id: String,
    context: SessionContext,
    /// The next sequence number; queueing under the lock keeps spool order equal to
    /// sequence order.
    next: Arc<std::sync::Mutex<u64>>,
}

impl SessionRecorder {
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Records an event of this session now; returns its sequence number once durable.
    pub async fn record(&self, kind: &str, detail: Option<Detail>) -> Result<u64, RecorderError> {
        self.record_with(kind, detail, Default::default()).await
    }

    /// Like [`SessionRecorder::record`], with extra string attributes.
    pub async fn record_with(
        &self,
        kind: &str,
        detail: Option<Detail>,
        attributes: std::collections::HashMap<String, String>,
    ) -> Result<u64, RecorderError> {
        self.recorder.reserve().await?;
        // Numbered and queued under one lock: events of the session reach the spool in
        // sequence order, and several can be on their way to the disk at once.
        let (sequence, ticket) = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let sequence = *next;
            let event = AuditEvent {
                session_id: self.session_id.clone(),
                sequence,
                time: Some(now()),
                kind: kind.to_owned(),
                principal: self.context.principal.clone(),
                source_address: self.context.source_address.clone(),
                connection: self.context.connection.clone(),
                protocol: self.context.protocol as i32,
                role: self.context.role.clone(),
                detail,
                attributes,
            };
            let ticket = self.recorder.queue_event(&event)?;
            *next += 1;
            (sequence, ticket)
        };
        self.recorder.durable(ticket).await?;
        Ok(sequence)
    }
}

fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        // Microsecond precision, as the store keeps it.
        nanos: (d.subsec_micros() * 1000) as i32,
    }
}
