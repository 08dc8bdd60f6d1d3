//! The session's audit writer: numbers the session's events and queues them at the
//! recorder's spool, in order, without making the proxy wait for the disk.
//!
//! Why not `SessionRecorder::record` per operation: it returns once the event is fsynced, so
//! a proxy calling it per statement would wait a disk flush per statement. Here an event is
//! numbered and queued under the session's lock (a copy into the spool's queue: no task, no
//! channel, no wake-up per event); the spool's writer thread makes whatever queued up
//! meanwhile durable with one write and one fdatasync. The fields every event of the session
//! repeats are encoded once ([`agentgate_recorder::EventTemplate`]).
//!
//! Order: numbering and queueing happen under one lock, and the spool writes in queue order,
//! so spool order is sequence order. Nothing is dropped: when the spool's queue is over its
//! bound the proxy waits (backpressure), and a failed write ends the session (see
//! [`crate::EndReason::RecordingFailed`]).

use std::collections::HashMap;
use std::sync::Mutex;

use agentgate_proto::audit::v1::AuditEvent;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_recorder::{EventTemplate, Recorder, RecorderError, Ticket};

use crate::OperationEvent;
use crate::encode::OperationFields;
use crate::session::RecordError;

/// An event of the session before the writer numbers it.
pub(crate) struct NewEvent {
    /// When it happened, not when it is written.
    pub(crate) time: prost_types::Timestamp,
    pub(crate) kind: String,
    pub(crate) detail: Option<Detail>,
    pub(crate) attributes: HashMap<String, String>,
}

/// Numbers and queues one session's events.
pub(crate) struct Writer {
    recorder: Recorder,
    template: EventTemplate,
    state: Mutex<State>,
    on_failure: Box<dyn Fn(String) + Send + Sync>,
}

#[derive(Default)]
struct State {
    next_sequence: u64,
    /// Reused buffers for encoding operations (see [`crate::encode`]).
    encoded: Vec<u8>,
    nested: Vec<u8>,
    /// Queued events not yet confirmed durable: the first and the last.
    unconfirmed: Option<(Ticket, Ticket)>,
    failure: Option<String>,
}

impl Writer {
    /// The writer of one session. `template` carries what every event of the session repeats
    /// (session id, principal, source, connection, protocol, role); `on_failure` is told the
    /// first failure.
    pub(crate) fn new(
        recorder: Recorder,
        template: &AuditEvent,
        on_failure: impl Fn(String) + Send + Sync + 'static,
    ) -> Writer {
        Writer {
            recorder,
            template: EventTemplate::new(template),
            state: Mutex::new(State {
                next_sequence: 1,
                ..Default::default()
            }),
            on_failure: Box::new(on_failure),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under this lock is a plain assignment: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, state: &mut State, e: &RecorderError) -> RecordError {
        let why = e.to_string();
        if state.failure.is_none() {
            tracing::error!(error = %why, "audit spool append failed; ending the session");
            (self.on_failure)(why.clone());
            state.failure = Some(why.clone());
        }
        match e {
            RecorderError::Closed => RecordError::Closed,
            _ => RecordError::Spool(why),
        }
    }

    /// Numbers and queues one event; waits only while the spool's queue is full.
    pub(crate) async fn record(&self, new: NewEvent) -> Result<(), RecordError> {
        let NewEvent {
            time,
            kind,
            detail,
            attributes,
        } = new;
        let mut event = AuditEvent {
            time: Some(time),
            kind,
            detail,
            attributes,
            ..Default::default()
        };
        self.queue_next(|_, sequence| {
            event.sequence = sequence;
            self.recorder.queue_templated(&self.template, &event)
        })
        .await
    }

    /// Numbers and queues one operation's event, encoded from `event` itself (see
    /// [`crate::encode`]); `extra` are the session's own attributes. Waits only while the
    /// spool's queue is full.
    pub(crate) async fn record_operation(
        &self,
        kind: &str,
        event: &OperationEvent,
        extra: &[(&str, &str)],
    ) -> Result<(), RecordError> {
        let time = crate::to_timestamp(std::time::SystemTime::now());
        self.queue_next(|state, sequence| {
            state.encoded.clear();
            OperationFields {
                sequence,
                time: &time,
                kind,
                event,
                extra,
            }
            .encode(&mut state.encoded, &mut state.nested);
            self.recorder
                .queue_templated_encoded(&self.template, &state.encoded)
        })
        .await
    }

    /// Waits for room in the spool's queue, then, under the session's lock, has `queue`
    /// queue the event numbered `sequence` and counts it; the first failure ends recording.
    async fn queue_next(
        &self,
        queue: impl FnOnce(&mut State, u64) -> Result<Ticket, RecorderError>,
    ) -> Result<(), RecordError> {
        if let Err(e) = self.recorder.reserve().await {
            return Err(self.failed(&mut self.state(), &e));
        }
        let mut state = self.state();
        if let Some(f) = &state.failure {
            return Err(RecordError::Spool(f.clone()));
        }
        let sequence = state.next_sequence;
        let queued = queue(&mut state, sequence);
        self.queued(&mut state, queued)
    }

    fn queued(
        &self,
        state: &mut State,
        queued: Result<Ticket, RecorderError>,
    ) -> Result<(), RecordError> {
        match queued {
            Ok(ticket) => {
                state.next_sequence += 1;
                state.unconfirmed = Some(match state.unconfirmed {
                    Some((first, _)) => (first, ticket),
                    None => (ticket, ticket),
                });
                Ok(())
            }
            Err(e) => Err(self.failed(state, &e)),
        }
    }

    /// Waits until every event queued so far is durable.
    pub(crate) async fn flush(&self) -> Result<(), RecordError> {
        let unconfirmed = {
            let state = self.state();
            if let Some(f) = &state.failure {
                return Err(RecordError::Spool(f.clone()));
            }
            state.unconfirmed
        };
        let Some((first, last)) = unconfirmed else {
            return Ok(());
        };
        let result = self.recorder.durable_range(first, last).await;
        let mut state = self.state();
        match result {
            Ok(()) => {
                // Confirmed through `last`; what was queued since stays unconfirmed.
                if let Some((_, now_last)) = state.unconfirmed {
                    state.unconfirmed = (now_last != last).then_some((last, now_last));
                }
                Ok(())
            }
            Err(e) => Err(self.failed(&mut state, &e)),
        }
    }
}
