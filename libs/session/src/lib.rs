//! The session pipeline every agentgate proxy shares: everything between "an agent presented
//! a credential" and "the session is over" that does not depend on the protocol.
//!
//! pg-proxy, ssh-proxy, http-proxy and k8s-proxy differ in how they read a credential, how they
//! classify an operation and how they talk to the agent and the upstream. They do not differ
//! in what happens around that, and so it lives here, once:
//!
//! 1. [`Gateway::open`] has authz verify the credential and open a session; authz answers with
//!    the grant, its expiry, the upstream identity and the whole policy. No grant, no session;
//!    authz unreachable, no session ([`Refused`], fail closed). `session.start` is durable in
//!    the audit spool before `open` returns.
//! 2. For each operation the proxy classifies, [`Session::decide`] decides locally from the
//!    session's policy (no round trip; authz answers the same centrally).
//! 3. Where the policy wants a human, [`Session::hold_for_approval`] creates the approval
//!    request on the agent's behalf, tells the agent what it waits for, and returns the
//!    moment a reviewer decides — or refuses on timeout, on session end, or when approvals
//!    is unreachable.
//! 4. The proxy forwards with [`Session::upstream`]'s credential, masks the response with
//!    [`Session::masker`], and hands [`Session::record_operation`] the event, which queues it
//!    for the session's ordered audit writer without waiting for the disk.
//! 5. [`Session::ended`] resolves the moment the session must end — authz announced expiry or
//!    revocation on the grant stream the gateway follows, or the session's own timer at
//!    [`Session::expires_at`] fired (expiry works while authz is away) — and
//!    [`Session::close`] records `session.end` and tells authz.
//!
//! What a proxy shows the agent when something is refused is written here too:
//! [`refusal_message`], [`ApprovalOutcome::message`], [`PendingApproval::message`],
//! [`EndReason::message`]. See `docs/session-pipeline.md` for the failure behaviour.
//!
//! ```no_run
//! use agentgate_authz::client::AuthzClient;
//! use agentgate_proto::authz::v1::{credential::Kind, Credential};
//! use agentgate_proto::common::v1::{Decision, Operation, Protocol};
//! use agentgate_recorder::{Recorder, RecorderConfig};
//! use agentgate_session::{EndReason, Gateway, GatewayConfig, OperationEvent};
//!
//! # async fn proxy() -> Result<(), Box<dyn std::error::Error>> {
//! // Once per process.
//! let token = std::env::var("AGENTGATE_SERVICE_TOKEN")?;
//! let authz = AuthzClient::new("http://127.0.0.1:7404", &token, None)?;
//! let recorder = Recorder::open(RecorderConfig::new("http://127.0.0.1:7403", "/var/lib/agentgate/pg-spool.db")).await?;
//! let gateway = Gateway::start(
//!     authz,
//!     recorder,
//!     GatewayConfig::new("pg-proxy", Protocol::Postgres, "http://127.0.0.1:7405", &token),
//! )?;
//!
//! // Per connection.
//! let credential = Credential { kind: Some(Kind::Password("<the agent's token>".into())) };
//! let session = match gateway.open(credential, "prod-db", "read", "10.0.0.7:51514", "psql 16").await {
//!     Ok(s) => s,
//!     Err(refused) => {
//!         eprintln!("{}", agentgate_session::refusal_message(&refused)); // as a pg ErrorResponse
//!         return Ok(());
//!     }
//! };
//! let ended = session.ended();
//! tokio::pin!(ended);
//! loop {
//!     let statement = tokio::select! {
//!         reason = &mut ended => {
//!             eprintln!("{}", reason.message()); // tell the agent, then hang up
//!             session.close(reason).await?;
//!             return Ok(());
//!         }
//!         s = read_statement() => s,
//!     };
//!     let Some(text) = statement else { break };
//!     // Classification is the proxy's: here every statement is a plain read.
//!     let op = Operation { protocol: Protocol::Postgres as i32, text, risk_classes: vec!["sql.read".into()], ..Default::default() };
//!     let decision = session.decide(&op);
//!     let mut event = OperationEvent::new(op.clone(), &decision);
//!     if decision.decision == Decision::NeedsApproval {
//!         let outcome = session
//!             .hold_for_approval(&op, &decision, "", |p| eprintln!("{}", p.message()))
//!             .await;
//!         event.decision = outcome.decision();
//!         event.reason = outcome.message();
//!         event.approval_id = outcome.approval_id().unwrap_or_default().to_owned();
//!     }
//!     if event.decision == Decision::Allow {
//!         // forward upstream with session.upstream(), mask rows with session.masker(),
//!         // fill event.rows, event.masked, event.duration ...
//!     }
//!     session.record_operation(event).await?;
//! }
//! session.close(EndReason::ClientClosed).await?;
//! # Ok(()) }
//! # async fn read_statement() -> Option<String> { None }
//! ```

#![deny(missing_docs)]

mod approval;
mod control;
mod encode;
mod gateway;
mod masking;
mod message;
mod record;
mod session;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use agentgate_authz::client::Refused;
pub use agentgate_policy::LocalDecision;
pub use approval::{ApprovalOutcome, PendingApproval};
pub use control::{ControlPlane, ControlPlaneError, ServiceCredentials, connect};
pub use gateway::{Gateway, GatewayConfig, GatewayError, GrantStreamState};
pub use masking::{MaskingPolicyError, masker_for, masking_config};
pub use message::{EndReason, one_line, refusal_message};
pub use session::{OperationEvent, RecordError, Session, UpstreamCredential};

/// A wall-clock time as a protobuf timestamp, to the microsecond (what the audit store keeps).
pub(crate) fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: (d.subsec_micros() * 1000) as i32,
    }
}

/// A protobuf timestamp as a wall-clock time (times before 1970 clamp to the epoch).
pub(crate) fn from_timestamp(t: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// RFC 3339 in UTC with microseconds, for attributes and messages.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_to_the_microsecond() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let back = from_timestamp(&to_timestamp(t));
        assert_eq!(back, UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000));
        assert_eq!(rfc3339(back), "2023-11-14T22:13:20.123456Z");
    }
}
