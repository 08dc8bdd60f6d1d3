//! The `agentgate.audit.v1.AuditStore` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use agentgate_audit_chain::VerifyingKey;
use agentgate_identity::{Authenticator, TokenError, bearer_token, unverified_expiry};
use agentgate_proto::audit::v1::audit_store_server::AuditStore as AuditStoreApi;
use agentgate_proto::audit::v1::{
    AuditEvent, CheckpointRequest, ExportChunk, ExportRequest, GetSessionEventsRequest,
    GetSessionEventsResponse, IngestAck, IngestRequest, ListSessionsRequest, ListSessionsResponse,
    PruneRequest, PruneResponse, ReplaySessionRequest, SequenceGap, SessionSummary,
    SignedCheckpoint, StoredEvent, VerifyRequest, VerifyResponse,
};
use agentgate_proto::common::v1::{Principal, Protocol};
use futures::stream::{FuturesOrdered, StreamExt as _};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{self, AUDIENCE, Need};
use crate::evidence::{self, WalkError};
use crate::metrics::StoreMetrics;
use crate::store::{Gap, NewEvent, SessionFilter, Store, StoreError, StoredRow};
use crate::writer::Writer;
use crate::{timestamp_us, us_timestamp};

/// Batches of one Ingest stream that may be in flight before the first is acknowledged.
const MAX_IN_FLIGHT: usize = 8;
/// Largest encoded event accepted.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Most events GetSessionEvents returns; ReplaySession streams any number.
const MAX_SESSION_EVENTS: i64 = 10_000;

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service state shared by every call.
#[derive(Clone)]
pub struct AuditStoreService {
    pub(crate) store: Store,
    pub(crate) writer: Writer,
    pub(crate) public_key: Arc<VerifyingKey>,
    pub(crate) max_batch_events: usize,
    pub(crate) metrics: StoreMetrics,
    /// Turns each caller's bearer token into a principal (see [`crate::access`]).
    pub(crate) auth: Arc<dyn Authenticator>,
}

fn db_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "audit store database error");
    Status::unavailable(format!("audit store database: {e}"))
}

fn walk_status(e: WalkError) -> Status {
    match e {
        WalkError::Store(e) => db_status(e),
        WalkError::Failed(f) => Status::data_loss(f.to_string()),
    }
}

/// Checks one event and turns it into a row to chain. Every bound here protects the store
/// from a misbehaving or hostile recorder.
pub fn validate(event: AuditEvent) -> Result<NewEvent, String> {
    if uuid::Uuid::parse_str(&event.session_id).is_err() {
        return Err(format!(
            "session_id {:?} is not a UUID",
            truncate(&event.session_id)
        ));
    }
    if event.sequence == 0 || event.sequence > i64::MAX as u64 {
        return Err(format!(
            "sequence {} is out of range (1..2^63)",
            event.sequence
        ));
    }
    let time = event.time.as_ref().ok_or("time is missing")?;
    if time.seconds < 946_684_800
        || time.seconds > 32_503_680_000
        || !(0..1_000_000_000).contains(&time.nanos)
    {
        return Err("time is outside 2000..3000 or malformed".into());
    }
    let kind_ok = !event.kind.is_empty()
        && event.kind.len() <= 64
        && event
            .kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
    if !kind_ok {
        return Err(format!(
            "kind {:?} must be 1-64 of [a-z0-9._]",
            truncate(&event.kind)
        ));
    }
    if Protocol::try_from(event.protocol).is_err() {
        return Err(format!("protocol {} is unknown", event.protocol));
    }
    let principal = event
        .principal
        .as_ref()
        .map(|p| p.subject.clone())
        .unwrap_or_default();
    for (name, value, max) in [
        ("principal.subject", principal.as_str(), 256),
        ("connection", event.connection.as_str(), 256),
        ("role", event.role.as_str(), 64),
        ("source_address", event.source_address.as_str(), 128),
    ] {
        if value.len() > max {
            return Err(format!("{name} is longer than {max} bytes"));
        }
    }
    let body = event.encode_to_vec();
    if body.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "event is {} bytes, more than {MAX_EVENT_BYTES}",
            body.len()
        ));
    }
    Ok(NewEvent {
        occurred_at_us: timestamp_us(time),
        session_id: event.session_id,
        session_sequence: event.sequence as i64,
        kind: event.kind,
        principal,
        connection: event.connection,
        protocol: event.protocol,
        role: event.role,
        source_address: event.source_address,
        body,
    })
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn gap_message(g: Gap) -> SequenceGap {
    SequenceGap {
        session_id: g.session_id,
        from: g.from,
        to: g.to,
    }
}

fn stored_event(row: StoredRow) -> StoredEvent {
    let event = AuditEvent::decode(row.body.as_slice()).ok();
    StoredEvent {
        chain_sequence: row.chain_sequence as u64,
        stored_at: Some(us_timestamp(row.stored_at_us)),
        previous_hash: Vec::new(),
        hash: row.hash,
        body: row.body,
        event,
    }
}

fn session_id_arg(id: &str) -> Result<(), Status> {
    uuid::Uuid::parse_str(id).map(|_| ()).map_err(|_| {
        Status::invalid_argument(format!("session_id {:?} is not a UUID", truncate(id)))
    })
}

#[tonic::async_trait]
impl AuditStoreApi for AuditStoreService {
    type IngestStream = BoxStream<IngestAck>;
    type ReplaySessionStream = BoxStream<StoredEvent>;
    type ExportStream = BoxStream<ExportChunk>;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let principal = self.authorize(&request, "Ingest", Need::Ingest).await?;
        // A stream lives as long as the recorder's process: it must not outlive its token.
        // (The clock-skew leeway of verification does not extend a stream: a token already
        // past its expiry opens none.)
        let expires = match bearer_token(request.metadata())
            .ok()
            .and_then(unverified_expiry)
        {
            Some(at) => match at.duration_since(std::time::SystemTime::now()) {
                Ok(left) if !left.is_zero() => Some(tokio::time::Instant::now() + left),
                _ => {
                    self.metrics.calls_refused.inc();
                    return Err(Status::unauthenticated("token refused: token expired"));
                }
            },
            None => None,
        };
        tracing::debug!(subject = %principal.subject, "ingest stream opened");
        let mut inbound = request.into_inner();
        let (acks, rx) = mpsc::channel(MAX_IN_FLIGHT * 2);
        let this = self.clone();
        tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            let mut reading = true;
            let mut expired = false;
            let expiry = async {
                match expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expiry);
            loop {
                tokio::select! {
                    msg = inbound.message(), if reading && in_flight.len() < MAX_IN_FLIGHT => {
                        match msg {
                            Ok(Some(batch)) => match this.accept(batch).await {
                                Ok(pending) => in_flight.push_back(pending),
                                Err(status) => {
                                    this.metrics.batches_rejected.inc();
                                    // Acknowledge what was accepted before, then refuse.
                                    while let Some(ack) = in_flight.next().await {
                                        if acks.send(ack).await.is_err() { return; }
                                    }
                                    let _ = acks.send(Err(status)).await;
                                    return;
                                }
                            },
                            Ok(None) => reading = false,
                            Err(status) => {
                                tracing::debug!(%status, "ingest stream ended by the client");
                                reading = false;
                            }
                        }
                    }
                    Some(ack) = in_flight.next(), if !in_flight.is_empty() => {
                        if acks.send(ack).await.is_err() { return; }
                    }
                    // The token ran out: take no more batches, acknowledge those taken, then
                    // end the stream so the recorder reconnects with a fresh token.
                    _ = &mut expiry, if reading => {
                        reading = false;
                        expired = true;
                    }
                    else => break,
                }
            }
            if expired {
                tracing::debug!(subject = %principal.subject, "ingest stream ended: its token expired");
                let _ = acks
                    .send(Err(Status::unauthenticated(
                        "the stream's token expired: reconnect with a fresh token",
                    )))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        self.authorize(&request, "ListSessions", Need::Read).await?;
        let r = request.into_inner();
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let filter = SessionFilter {
            principal: nonempty(r.principal),
            connection: nonempty(r.connection),
            protocol: (r.protocol != 0).then_some(r.protocol),
            from_us: r
                .time
                .as_ref()
                .and_then(|t| t.start.as_ref())
                .map(timestamp_us),
            to_us: r
                .time
                .as_ref()
                .and_then(|t| t.end.as_ref())
                .map(timestamp_us),
            limit: match r.limit {
                0 => 100,
                n => n.min(1000) as i64,
            },
        };
        let rows = self.store.list_sessions(&filter).await.map_err(db_status)?;
        let mut sessions = Vec::with_capacity(rows.len());
        for row in rows {
            let gaps = if row.events < row.last_sequence {
                self.store
                    .session_gaps(&row.session_id)
                    .await
                    .map_err(db_status)?
            } else {
                Vec::new()
            };
            sessions.push(SessionSummary {
                session_id: row.session_id,
                principal: row.principal,
                connection: row.connection,
                protocol: row.protocol,
                role: row.role,
                source_address: row.source_address,
                first_event_at: Some(us_timestamp(row.first_event_us)),
                last_event_at: Some(us_timestamp(row.last_event_us)),
                events: row.events as u64,
                last_sequence: row.last_sequence as u64,
                gaps: gaps.into_iter().map(gap_message).collect(),
            });
        }
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn get_session_events(
        &self,
        request: Request<GetSessionEventsRequest>,
    ) -> Result<Response<GetSessionEventsResponse>, Status> {
        self.authorize(&request, "GetSessionEvents", Need::Read)
            .await?;
        let id = request.into_inner().session_id;
        session_id_arg(&id)?;
        let rows = self
            .store
            .session_events(&id, 0, MAX_SESSION_EVENTS + 1)
            .await
            .map_err(db_status)?;
        if rows.len() as i64 > MAX_SESSION_EVENTS {
            return Err(Status::out_of_range(format!(
                "session {id} has more than {MAX_SESSION_EVENTS} events: use ReplaySession"
            )));
        }
        if rows.is_empty() {
            return Err(Status::not_found(format!("no events for session {id}")));
        }
        Ok(Response::new(GetSessionEventsResponse {
            events: rows.into_iter().map(stored_event).collect(),
        }))
    }

    async fn replay_session(
        &self,
        request: Request<ReplaySessionRequest>,
    ) -> Result<Response<Self::ReplaySessionStream>, Status> {
        self.authorize(&request, "ReplaySession", Need::Read)
            .await?;
        let id = request.into_inner().session_id;
        session_id_arg(&id)?;
        let first = self
            .store
            .session_events(&id, 0, 1000)
            .await
            .map_err(db_status)?;
        if first.is_empty() {
            return Err(Status::not_found(format!("no events for session {id}")));
        }
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut page = first;
            loop {
                let Some(last) = page.last().map(|r| r.session_sequence) else {
                    return;
                };
                for row in page {
                    if tx.send(Ok(stored_event(row))).await.is_err() {
                        return;
                    }
                }
                page = match store.session_events(&id, last, 1000).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(db_status(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        self.authorize(&request, "Verify", Need::Read).await?;
        let response = match evidence::verify(&self.store, &self.public_key).await {
            Ok(report) => VerifyResponse {
                ok: true,
                events_checked: report.events_checked,
                checkpoints_checked: report.checkpoints_checked,
                first_bad_sequence: 0,
                error: String::new(),
                anchored_at: report.anchored_at,
                unsigned_tail: report.unsigned_tail,
            },
            Err(WalkError::Failed(f)) => VerifyResponse {
                ok: false,
                first_bad_sequence: f.chain_sequence,
                error: f.to_string(),
                ..Default::default()
            },
            Err(WalkError::Store(e)) => return Err(db_status(e)),
        };
        Ok(Response::new(response))
    }

    async fn checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<SignedCheckpoint>, Status> {
        self.authorize(&request, "Checkpoint", Need::Read).await?;
        self.writer.checkpoint().await?;
        let cp = self
            .store
            .checkpoints()
            .await
            .map_err(db_status)?
            .pop()
            .ok_or_else(|| {
                Status::failed_precondition("the chain is empty: nothing to sign yet")
            })?;
        Ok(Response::new(SignedCheckpoint {
            chain_sequence: cp.chain_sequence,
            head_hash: cp.head_hash,
            created_at: Some(us_timestamp(cp.created_at_us)),
            signature: cp.signature,
            key_id: cp.key_id,
        }))
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let principal = self.authorize(&request, "Export", Need::Read).await?;
        tracing::info!(subject = %principal.subject, "evidence export");
        let r = request.into_inner();
        let from = r
            .time
            .as_ref()
            .and_then(|t| t.start.as_ref())
            .map(timestamp_us);
        let to = r
            .time
            .as_ref()
            .and_then(|t| t.end.as_ref())
            .map(timestamp_us);
        // Sign the head first, so the bundle is vouched for to its last event.
        self.writer.checkpoint().await?;
        let (bytes_tx, mut bytes_rx) = mpsc::channel::<Vec<u8>>(8);
        let (tx, rx) = mpsc::channel(8);
        let store = self.store.clone();
        let key = self.public_key.clone();
        let errors = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = evidence::export(&store, &key, from, to, bytes_tx).await {
                let _ = errors.send(Err(walk_status(e))).await;
            }
        });
        tokio::spawn(async move {
            while let Some(data) = bytes_rx.recv().await {
                if tx.send(Ok(ExportChunk { data })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn prune(
        &self,
        request: Request<PruneRequest>,
    ) -> Result<Response<PruneResponse>, Status> {
        let principal = self.authorize(&request, "Prune", Need::Prune).await?;
        let before = request
            .into_inner()
            .before
            .ok_or_else(|| Status::invalid_argument("before is required"))?;
        let (events_removed, anchored_at) = evidence::prune(&self.store, timestamp_us(&before))
            .await
            .map_err(walk_status)?;
        tracing::info!(subject = %principal.subject, events_removed, anchored_at, "pruned on request");
        Ok(Response::new(PruneResponse {
            events_removed,
            anchored_at,
        }))
    }
}

impl AuditStoreService {
    /// The verified caller of `call`, if it may make it: UNAUTHENTICATED without a token or
    /// with one that does not verify, PERMISSION_DENIED naming what the call needs.
    async fn authorize<T>(
        &self,
        request: &Request<T>,
        call: &str,
        need: Need,
    ) -> Result<Principal, Status> {
        let refused = |status: Status| {
            self.metrics.calls_refused.inc();
            tracing::info!(call, code = ?status.code(), reason = status.message(),
                peer = ?request.remote_addr(), "audit store call refused");
            status
        };
        let token = bearer_token(request.metadata()).map_err(refused)?;
        let principal = match self.auth.authenticate(token, Some(AUDIENCE)).await {
            Ok(p) => p,
            // Not a refusal: tokens cannot be checked yet (authz starting); clients retry.
            Err(TokenError::Unavailable(why)) => {
                return Err(Status::unavailable(format!(
                    "cannot check credentials yet: {why}"
                )));
            }
            Err(e) => {
                return Err(refused(Status::unauthenticated(format!(
                    "token refused: {e}"
                ))));
            }
        };
        access::check(&principal, call, need).map_err(refused)?;
        Ok(principal)
    }

    /// Validates a whole batch (all or nothing) and hands it to the writer.
    async fn accept(
        &self,
        batch: IngestRequest,
    ) -> Result<impl Future<Output = Result<IngestAck, Status>> + use<>, Status> {
        if batch.events.len() > self.max_batch_events {
            return Err(Status::invalid_argument(format!(
                "batch {} has {} events, more than {}",
                batch.batch_id,
                batch.events.len(),
                self.max_batch_events
            )));
        }
        let mut events = Vec::with_capacity(batch.events.len());
        for (i, e) in batch.events.into_iter().enumerate() {
            events.push(validate(e).map_err(|reason| {
                Status::invalid_argument(format!("batch {} event {i}: {reason}", batch.batch_id))
            })?);
        }
        let batch_id = batch.batch_id;
        let pending = self.writer.append(events).await?;
        Ok(async move {
            let outcome = pending
                .await
                .map_err(|_| Status::unavailable("audit store is shutting down"))??;
            Ok(IngestAck {
                batch_id,
                stored: outcome.stored,
                duplicates: outcome.duplicates,
                gaps: outcome.gaps.into_iter().map(gap_message).collect(),
            })
        })
    }
}
