//! Bounds on every input, so a caller cannot make the service store or send unbounded data.
//! Strings are measured in bytes.

/// Connection names, roles, session ids.
pub const MAX_NAME: usize = 256;
/// A role name.
pub const MAX_ROLE: usize = 64;
/// Reasons and review comments.
pub const MAX_TEXT: usize = 4096;
/// The exact operation text (a SQL statement, a command line).
pub const MAX_OPERATION_TEXT: usize = 64 * 1024;
/// An operation's action name.
pub const MAX_ACTION: usize = 64;
/// Targets of one operation, and the length of each.
pub const MAX_TARGETS: usize = 64;
pub const MAX_TARGET: usize = 512;
/// Risk classes of one operation, and the length of each.
pub const MAX_RISK_CLASSES: usize = 32;
pub const MAX_RISK_CLASS: usize = 64;
/// Protocol-specific attributes of one operation.
pub const MAX_ATTRIBUTES: usize = 32;
pub const MAX_ATTRIBUTE_KEY: usize = 64;
pub const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// Reviewer groups of one request, and the length of each group name.
pub const MAX_GROUPS: usize = 32;
pub const MAX_GROUP: usize = 128;
/// Groups of a requester principal passed by a service.
pub const MAX_PRINCIPAL_GROUPS: usize = 256;
/// Approvals one request may need.
pub const MAX_APPROVALS_REQUIRED: u32 = 10;
/// The longest access a request may ask for.
pub const MAX_ACCESS_DURATION_SECS: i64 = 366 * 24 * 3600;
/// Default and largest page of `List`.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;
/// Requests a filtered `Watch` sends before the changes.
pub const WATCH_SNAPSHOT_LIMIT: u32 = 500;
