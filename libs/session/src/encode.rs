//! An operation's audit event, encoded straight from the proxy's [`OperationEvent`].
//!
//! Every statement a proxy relays is one event, so this is on the hot path. Building an
//! `AuditEvent` to encode it meant owning a copy of everything (the operation, the reason,
//! an attributes map with the policy version), then freeing it all once encoded: most of
//! the cost of recording a statement. Here the fields are written from references, in the
//! protobuf encoding prost itself produces for them, so the store decodes the same
//! `AuditEvent` (the tests check it against prost's own encoding).

use agentgate_proto::common::v1::Operation;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::OperationEvent;
use crate::to_timestamp;

// Field numbers of agentgate.audit.v1.AuditEvent.
const EVENT_SEQUENCE: u32 = 2;
const EVENT_TIME: u32 = 3;
const EVENT_KIND: u32 = 4;
const EVENT_OPERATION: u32 = 22;
const EVENT_ATTRIBUTES: u32 = 30;

// Field numbers of agentgate.audit.v1.OperationRecord.
const OP_OPERATION: u32 = 1;
const OP_DECISION: u32 = 2;
const OP_REASON: u32 = 3;
const OP_APPROVAL_ID: u32 = 4;
const OP_PARAMETERS: u32 = 5;
const OP_STARTED_AT: u32 = 6;
const OP_DURATION_US: u32 = 7;
const OP_ROWS: u32 = 8;
const OP_BYTES: u32 = 9;
const OP_ERROR: u32 = 10;
const OP_MASKED: u32 = 11;
const OP_STATUS: u32 = 12;

/// The fields of an operation's `AuditEvent` that are not the session's template.
pub(crate) struct OperationFields<'a> {
    pub(crate) sequence: u64,
    pub(crate) time: &'a prost_types::Timestamp,
    pub(crate) kind: &'a str,
    pub(crate) event: &'a OperationEvent,
    /// Attributes added by the session (`decided_by`, `policy_version`); an event attribute
    /// of the same name is left out, as these win.
    pub(crate) extra: &'a [(&'a str, &'a str)],
}

impl OperationFields<'_> {
    /// Appends the fields to `out`; `scratch` holds the nested record meanwhile (reused so
    /// that a session's events allocate nothing once warm).
    pub(crate) fn encode(&self, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        uint64(out, EVENT_SEQUENCE, self.sequence);
        message(out, EVENT_TIME, self.time);
        string(out, EVENT_KIND, self.kind);
        scratch.clear();
        record(scratch, self.event);
        encode_key(EVENT_OPERATION, WireType::LengthDelimited, out);
        encode_varint(scratch.len() as u64, out);
        out.extend_from_slice(scratch);
        for (k, v) in &self.event.attributes {
            if !self.extra.iter().any(|(name, _)| name == k) {
                map_entry(out, EVENT_ATTRIBUTES, k, v);
            }
        }
        for (k, v) in self.extra {
            map_entry(out, EVENT_ATTRIBUTES, k, v);
        }
    }
}

/// The `OperationRecord` of `e`, without its key and length.
fn record(out: &mut Vec<u8>, e: &OperationEvent) {
    message::<Operation>(out, OP_OPERATION, &e.operation);
    uint64(out, OP_DECISION, e.decision as i32 as u64);
    string(out, OP_REASON, &e.reason);
    string(out, OP_APPROVAL_ID, &e.approval_id);
    for p in &e.parameters {
        // Repeated strings are encoded even when empty.
        encode_key(OP_PARAMETERS, WireType::LengthDelimited, out);
        encode_varint(p.len() as u64, out);
        out.extend_from_slice(p.as_bytes());
    }
    message(out, OP_STARTED_AT, &to_timestamp(e.started_at));
    uint64(
        out,
        OP_DURATION_US,
        u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX),
    );
    uint64(out, OP_ROWS, e.rows);
    uint64(out, OP_BYTES, e.bytes);
    string(out, OP_ERROR, &e.error);
    for (rule, count) in e.masked.iter() {
        // agentgate.common.v1.MaskingCount { rule = 1; count = 2; }
        let len = string_len(1, rule) + uint64_len(2, count);
        encode_key(OP_MASKED, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        string(out, 1, rule);
        uint64(out, 2, count);
    }
    string(out, OP_STATUS, &e.status);
}

/// A non-default string field (proto3 leaves empty strings out).
fn string(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
}

/// A non-zero integer field (uint64, or an enum's non-negative value).
fn uint64(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn uint64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn message<M: Message>(out: &mut Vec<u8>, tag: u32, m: &M) {
    prost::encoding::message::encode(tag, m, out);
}

/// One entry of a `map<string, string>` field, as prost encodes it (a default key or value
/// is left out of the entry).
fn map_entry(out: &mut Vec<u8>, tag: u32, key: &str, value: &str) {
    let len = string_len(1, key) + string_len(2, value);
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    string(out, 1, key);
    string(out, 2, value);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

    use agentgate_masking::MaskReport;
    use agentgate_proto::audit::v1::audit_event::Detail;
    use agentgate_proto::audit::v1::{AuditEvent, OperationRecord};
    use agentgate_proto::common::v1::{Decision, MaskingCount, Protocol};

    use super::*;

    fn event() -> OperationEvent {
        let mut masked = MaskReport::new();
        masked.add("pii.email", 3);
        masked.add("secret.aws_key", 1);
        OperationEvent {
            operation: std::sync::Arc::new(Operation {
                protocol: Protocol::Postgres as i32,
                action: "select".into(),
                text: "SELECT email FROM users WHERE id = $1".into(),
                targets: vec!["public.users".into()],
                risk_classes: vec!["sql.read".into()],
                attributes: HashMap::from([("statements".into(), "1".into())]),
            }),
            decision: Decision::NeedsApproval,
            reason: "policy: reads need approval".into(),
            rule: None,
            approval_id: "apr-1".into(),
            parameters: vec!["42".into(), String::new(), "<4 bytes binary>".into()],
            started_at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_790_000_000_123_456),
            duration: Duration::from_micros(1234),
            rows: 1,
            bytes: 300,
            status: "ok".into(),
            error: "57014: canceling statement".into(),
            masked,
            kind: None,
            attributes: HashMap::from([
                ("decided_by".into(), "the event's own".into()),
                ("note".into(), String::new()),
                (String::new(), "no name".into()),
            ]),
        }
    }

    /// What prost encodes for the same event, built as an owned `AuditEvent`.
    fn by_prost(
        e: &OperationEvent,
        sequence: u64,
        time: prost_types::Timestamp,
        extra: &[(&str, &str)],
    ) -> AuditEvent {
        let mut attributes = e.attributes.clone();
        for (k, v) in extra {
            attributes.insert((*k).to_owned(), (*v).to_owned());
        }
        AuditEvent {
            sequence,
            time: Some(time),
            kind: "session.query".into(),
            detail: Some(Detail::Operation(OperationRecord {
                operation: Some((*e.operation).clone()),
                decision: e.decision as i32,
                reason: e.reason.clone(),
                approval_id: e.approval_id.clone(),
                parameters: e.parameters.clone(),
                started_at: Some(to_timestamp(e.started_at)),
                duration_us: e.duration.as_micros() as u64,
                rows: e.rows,
                bytes: e.bytes,
                error: e.error.clone(),
                masked: e
                    .masked
                    .iter()
                    .map(|(rule, count)| MaskingCount {
                        rule: rule.to_owned(),
                        count,
                    })
                    .collect(),
                status: e.status.clone(),
            })),
            attributes,
            ..Default::default()
        }
    }

    fn encode(e: &OperationEvent, sequence: u64, extra: &[(&str, &str)]) -> (Vec<u8>, AuditEvent) {
        let time = prost_types::Timestamp {
            seconds: 1_790_000_001,
            nanos: 5_000,
        };
        let mut out = Vec::new();
        OperationFields {
            sequence,
            time: &time,
            kind: "session.query",
            event: e,
            extra,
        }
        .encode(&mut out, &mut Vec::new());
        (out, by_prost(e, sequence, time, extra))
    }

    #[test]
    fn decodes_to_what_prost_encodes() {
        let e = event();
        let extra = [("decided_by", "sql.read"), ("policy_version", "v7")];
        let (ours, expected) = encode(&e, 17, &extra);
        let decoded = AuditEvent::decode(ours.as_slice()).expect("decodes");
        assert_eq!(decoded, expected);
        assert_eq!(decoded.attributes["decided_by"], "sql.read");
        // Same fields, same bytes: prost writes a record's fields in this order too.
        let Some(Detail::Operation(by_prost)) = &expected.detail else {
            unreachable!()
        };
        let mut nested = Vec::new();
        record(&mut nested, &e);
        assert_eq!(nested, by_prost.encode_to_vec());
    }

    #[test]
    fn an_empty_event_decodes_to_defaults() {
        let e = OperationEvent::new(
            Operation::default(),
            &agentgate_policy::LocalDecision {
                decision: Decision::Unspecified,
                rule: None,
                reason: String::new(),
            },
        );
        let (ours, expected) = encode(&e, 1, &[]);
        assert_eq!(
            AuditEvent::decode(ours.as_slice()).expect("decodes"),
            expected
        );
    }

    #[test]
    fn large_values_take_multi_byte_lengths() {
        let mut e = event();
        e.parameters = vec!["x".repeat(70_000)];
        e.rows = u64::MAX;
        let (ours, expected) = encode(&e, u64::MAX, &[]);
        assert_eq!(
            AuditEvent::decode(ours.as_slice()).expect("decodes"),
            expected
        );
    }
}
