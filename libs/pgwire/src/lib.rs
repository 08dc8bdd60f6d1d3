//! The PostgreSQL frontend/backend protocol (version 3.0) as a proxy needs it.
//!
//! A proxy in the data path passes most messages through untouched and looks inside only a
//! few: the statements an agent sends (`Query`, `Parse`, `Bind`, `Execute`), the shape and
//! cells of results (`RowDescription`, `DataRow`), how they end (`CommandComplete`,
//! `ErrorResponse`, `ReadyForQuery`) and the start of a connection. This crate therefore
//! keeps each message whole ([`Frame`]: tag, length and body in one buffer, so passing it on
//! is one write with no copy) and parses bodies only on request, into borrowed views.
//!
//! Every length on the wire is checked before anything is allocated for it: a frame is at
//! most the [`FrameCodec`]'s limit, a startup packet at most [`MAX_STARTUP_LEN`], and every
//! parser reads through a bounds-checked [`Cursor`]. Malformed input is a [`WireError`],
//! never a panic; the proxy answers it with an `ErrorResponse` (SQLSTATE `08P01`,
//! [`PROTOCOL_VIOLATION`]) and closes that one connection.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

mod backend;
mod cursor;
mod frame;
mod frontend;
mod reader;
mod startup;

pub use backend::{
    BackendKeyData, CommandComplete, CopyResponse, DataRow, ErrorFields, FieldDescription,
    RowDescription, TransactionStatus, build,
};
pub use cursor::Cursor;
pub use frame::{Frame, FrameCodec};
pub use frontend::{Bind, Close, Describe, Execute, Parse, Query, Target, password};
pub use reader::FrameReader;
pub use startup::{StartupPacket, read_startup};

/// Largest startup packet accepted, the same bound PostgreSQL itself applies
/// (`MAX_STARTUP_PACKET_LENGTH`): the peer is not yet authenticated, so it gets little.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// The default largest message: big enough for large `bytea` values and COPY rows, small
/// enough that a hostile client cannot make the proxy hold much per connection.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// SQLSTATE for malformed protocol input.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE for a statement the session's policy refuses.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// SQLSTATE for a credential that did not verify.
pub const INVALID_PASSWORD: &str = "28P01";
/// SQLSTATE for an authorization failure at connection time (no grant, unknown role).
pub const INVALID_AUTHORIZATION: &str = "28000";
/// SQLSTATE for a connection the server cannot take (upstream unreachable, authz down).
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE for a session ended by an administrator (grant revoked or expired).
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// SQLSTATE for a statement cancelled on user request.
pub const QUERY_CANCELED: &str = "57014";
/// SQLSTATE for a feature the proxy does not offer (GSSAPI encryption, replication).
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer's declared length is above the limit; nothing was allocated for it.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A length smaller than its own header, or a negative one.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// The body ended before a field it must hold.
    #[error("{message}: message is truncated")]
    Truncated {
        /// The message being parsed.
        message: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{message}: {reason}")]
    Invalid {
        /// The message being parsed.
        message: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The message tag was not the one the parser reads.
    #[error("expected message {expected:?}, got {got:?}")]
    UnexpectedTag {
        /// Tag the parser reads.
        expected: char,
        /// Tag found.
        got: char,
    },
    /// The connection failed or closed in the middle of a message.
    #[error("connection: {0}")]
    Io(String),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e.to_string())
    }
}
