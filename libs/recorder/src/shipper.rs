//! Ships the spool to the audit store over one Ingest stream, with a few batches in flight,
//! and reconnects with backoff whenever the store goes away. Freshly written events come
//! from the spool's memory, older ones (after an outage or a restart) from its files.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::audit::v1::IngestAck;
use bytes::{BufMut as _, Bytes};
use prost::Message as _;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::GrpcMethod;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

use agentgate_telemetry::TraceContextInterceptor;

use crate::{RecorderConfig, Spool};

/// Wakes the shipper when something new is spooled.
pub(crate) struct Handle {
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn spawn(spool: Spool, endpoint: Endpoint, config: RecorderConfig) -> Handle {
    let notify = Arc::new(Notify::new());
    let task = tokio::spawn(run(spool, endpoint, config, notify.clone()));
    Handle { notify, task }
}

async fn run(spool: Spool, endpoint: Endpoint, config: RecorderConfig, notify: Arc<Notify>) {
    let first_backoff = Duration::from_millis(100);
    let mut backoff = first_backoff;
    let mut failures = 0u32;
    loop {
        if spool.is_empty() {
            let woken = async {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = spool.written().notified() => {}
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
            continue;
        }
        match ship(&spool, &endpoint, &config, &notify).await {
            Ok(()) => {
                backoff = first_backoff;
                failures = 0;
                continue;
            }
            Err(ShipError::Expired) => {
                // Routine: the store ends a stream when its token runs out. Reconnect at
                // once with whatever the token source gives now.
                tracing::info!(
                    "audit store ended the ingest stream as its token expired; reconnecting with a fresh one"
                );
                backoff = first_backoff;
                failures = 0;
                continue;
            }
            Err(ShipError::Credential(reason)) => {
                tracing::warn!(
                    reason = %reason,
                    backlog = spool.len(),
                    retry_in = ?backoff,
                    "the audit store refused the recorder's credential, or there is none; events stay spooled until a valid service token is available"
                );
            }
            Err(ShipError::Other(e)) => {
                failures += 1;
                // One failed attempt is routine (the store restarting, or starting a moment
                // after this process); a second in a row is an outage worth a warning.
                if failures == 1 {
                    tracing::info!(error = %e, backlog = spool.len(), retry_in = ?backoff, "audit store not reachable; events stay spooled");
                } else {
                    tracing::warn!(error = %e, backlog = spool.len(), retry_in = ?backoff, "audit store unreachable; events stay spooled");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// Why one connection's worth of shipping ended. Whatever was in flight and unacknowledged
/// is still spooled in every case.
#[derive(Debug)]
enum ShipError {
    /// No token, or the store refused it (UNAUTHENTICATED, PERMISSION_DENIED).
    Credential(String),
    /// The store ended an established stream because its token expired.
    Expired,
    /// The store is away, the stream broke, or the spool failed.
    Other(String),
}

impl From<String> for ShipError {
    fn from(e: String) -> Self {
        ShipError::Other(e)
    }
}

/// Adds trace context and the connection's bearer token to every call.
#[derive(Clone)]
struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let mut req = TraceContextInterceptor.call(req)?;
        if let Some(value) = &self.authorization {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// The credential for the next connection: `None` when no source is configured (the store
/// will say UNAUTHENTICATED, which is logged as such).
fn credentials(config: &RecorderConfig) -> Result<Credentials, ShipError> {
    let Some(source) = &config.token else {
        return Ok(Credentials {
            authorization: None,
        });
    };
    let token = source.token().map_err(ShipError::Credential)?;
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ShipError::Credential("the audit token is not valid header text".into()))?;
    Ok(Credentials {
        authorization: Some(value),
    })
}

/// An Ingest batch whose events are sent as they lie in the spool, already encoded: the
/// shipper neither decodes nor re-encodes them. Encodes exactly as `IngestRequest`
/// (`batch_id = 1`, `repeated AuditEvent events = 2`).
struct RawBatch {
    batch_id: u64,
    events: Vec<Bytes>,
}

#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct AckDecoder;

impl Codec for RawCodec {
    type Encode = RawBatch;
    type Decode = IngestAck;
    type Encoder = RawEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> AckDecoder {
        AckDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = RawBatch;
    type Error = Status;

    fn encode(&mut self, item: RawBatch, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if item.batch_id != 0 {
            prost::encoding::uint64::encode(1, &item.batch_id, dst);
        }
        for event in &item.events {
            prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, dst);
            prost::encoding::encode_varint(event.len() as u64, dst);
            dst.put_slice(event);
        }
        Ok(())
    }
}

impl Decoder for AckDecoder {
    type Item = IngestAck;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<IngestAck>, Status> {
        IngestAck::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable acknowledgement: {e}")))
    }
}

/// A batch sent and not yet acknowledged.
struct InFlight {
    last: u64,
    events: Vec<(u64, Bytes)>,
}

/// One connection's worth of shipping. Returns an error when the stream breaks; whatever was
/// in flight and unacknowledged is still spooled and is resent on the next connection.
async fn ship(
    spool: &Spool,
    endpoint: &Endpoint,
    config: &RecorderConfig,
    notify: &Notify,
) -> Result<(), ShipError> {
    let credentials = credentials(config)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // Trace context rides along, so a proxy's span and the store's span join up.
    let mut grpc = tonic::client::Grpc::new(InterceptedService::new(channel, credentials))
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| ShipError::Other(format!("ingest: {e}")))?;
    let (requests, rx) = mpsc::channel(config.in_flight.max(1));
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .extensions_mut()
        .insert(GrpcMethod::new("agentgate.audit.v1.AuditStore", "Ingest"));
    let mut acks = grpc
        .streaming(
            request,
            PathAndQuery::from_static("/agentgate.audit.v1.AuditStore/Ingest"),
            RawCodec,
        )
        .await
        .map_err(|s| match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => {
                ShipError::Credential(format!("{:?}: {}", s.code(), s.message()))
            }
            _ => ShipError::Other(format!("ingest: {}", s.message())),
        })?
        .into_inner();

    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut sent_through = 0u64;
    loop {
        // Armed before reading, so an event written meanwhile is not missed.
        let written = spool.written().notified();
        let woken = notify.notified();
        while in_flight.len() < config.in_flight.max(1) {
            let events = spool
                .read_after(sent_through, config.batch_max.max(1))
                .map_err(|e| e.to_string())?;
            let Some(last) = events.last().map(|e| e.0) else {
                break;
            };
            requests
                .send(RawBatch {
                    batch_id: last,
                    events: events.iter().map(|e| e.1.clone()).collect(),
                })
                .await
                .map_err(|_| "the ingest stream closed".to_string())?;
            in_flight.push_back(InFlight { last, events });
            sent_through = last;
        }

        tokio::select! {
            ack = acks.message() => match ack {
                Ok(Some(ack)) => {
                    let Some(batch) = in_flight.pop_front() else {
                        return Err(format!("acknowledgement of batch {} that was not sent", ack.batch_id).into());
                    };
                    if ack.batch_id != batch.last {
                        return Err(format!("acknowledgement of batch {}, expected {}", ack.batch_id, batch.last).into());
                    }
                    spool
                        .acknowledge_through(batch.last, batch.events.len() as u64)
                        .map_err(|e| e.to_string())?;
                    for gap in &ack.gaps {
                        tracing::warn!(session = %gap.session_id, from = gap.from, to = gap.to, "audit store reports missing events");
                    }
                }
                Ok(None) => return Err(ShipError::Other("the audit store ended the ingest stream".into())),
                Err(status) if status.code() == Code::InvalidArgument => {
                    // The store acknowledges earlier batches before refusing one, so the
                    // refused batch is the oldest in flight. Keep it aside; resend the rest.
                    if let Some(batch) = in_flight.pop_front() {
                        let first = batch.events.first().map_or(0, |e| e.0);
                        tracing::error!(reason = status.message(), first, last = batch.last, "audit store refused a batch; kept in the spool's rejected.log");
                        spool.reject(&batch.events, status.message()).map_err(|e| e.to_string())?;
                    }
                    return Ok(());
                }
                // Only sent on a stream that was accepted: its token ran out.
                Err(status) if status.code() == Code::Unauthenticated => return Err(ShipError::Expired),
                Err(status) if status.code() == Code::PermissionDenied => {
                    return Err(ShipError::Credential(format!("{:?}: {}", status.code(), status.message())));
                }
                Err(status) => return Err(format!("{:?}: {}", status.code(), status.message()).into()),
            },
            _ = written, if in_flight.len() < config.in_flight.max(1) => {}
            _ = woken, if in_flight.len() < config.in_flight.max(1) => {}
        }
    }
}
