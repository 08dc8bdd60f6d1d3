//! Why a session ended, and the one-line messages an agent is shown.
//!
//! Each proxy speaks to the agent in its own protocol (a pg `ErrorResponse`, an SSH channel
//! message, an HTTP JSON body, a Kubernetes `Status`), but what the message *says* is the
//! same everywhere, so it is written once, here. Every message is a single line without
//! control characters: it may end up in a terminal or a log line.

use agentgate_authz::client::Refused;

/// Why a session ended; what `session.end` records and what the agent is told.
///
/// The [`std::fmt::Display`] form is the audit wording (`"grant expired"`, `"grant revoked:
/// …"`), [`EndReason::message`] the sentence for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The agent closed the connection.
    ClientClosed,
    /// The upstream closed the connection.
    UpstreamClosed,
    /// The grant (or the credential it was opened with) reached its expiry: authz said so,
    /// or the session's own timer fired first.
    GrantExpired,
    /// An administrator revoked the grant; authz's reason.
    GrantRevoked(String),
    /// The credential the session was opened with was revoked; authz's reason.
    TokenRevoked(String),
    /// authz no longer knows the session: it ended while this proxy was not listening to the
    /// grant stream (or authz restarted and can no longer revoke it). Fail closed.
    EndedByAuthz(String),
    /// A reviewer denied an operation and the proxy's policy ends the session for it.
    ApprovalDenied(String),
    /// The session's events could not be written to the audit spool: nothing may run
    /// unrecorded.
    RecordingFailed(String),
    /// The proxy is shutting down.
    Shutdown,
    /// Anything else (a protocol error, an upstream failure).
    Error(String),
}

impl EndReason {
    /// One line for the agent, e.g. `session ended by agentgate: your access expired; request
    /// access again to continue`.
    pub fn message(&self) -> String {
        let text = match self {
            EndReason::ClientClosed => "session closed by the client".to_owned(),
            EndReason::UpstreamClosed => "session ended: the upstream closed the connection".into(),
            EndReason::GrantExpired => {
                "session ended by agentgate: your access expired; request access again to continue"
                    .into()
            }
            EndReason::GrantRevoked(r) => {
                format!("session ended by agentgate: your access was revoked ({r})")
            }
            EndReason::TokenRevoked(r) => {
                format!("session ended by agentgate: your credential was revoked ({r})")
            }
            EndReason::EndedByAuthz(r) => format!("session ended by agentgate: {r}"),
            EndReason::ApprovalDenied(r) => {
                format!("session ended by agentgate: an operation was denied ({r})")
            }
            EndReason::RecordingFailed(r) => format!(
                "session ended by agentgate: it can no longer be recorded ({r}); nothing runs unrecorded"
            ),
            EndReason::Shutdown => "session ended: the agentgate proxy is shutting down".into(),
            EndReason::Error(r) => format!("session ended: {r}"),
        };
        one_line(&text)
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => f.write_str("client closed"),
            EndReason::UpstreamClosed => f.write_str("upstream closed"),
            EndReason::GrantExpired => f.write_str("grant expired"),
            EndReason::GrantRevoked(r) => write!(f, "grant revoked: {r}"),
            EndReason::TokenRevoked(r) => write!(f, "token revoked: {r}"),
            EndReason::EndedByAuthz(r) => write!(f, "ended by authz: {r}"),
            EndReason::ApprovalDenied(r) => write!(f, "approval denied: {r}"),
            EndReason::RecordingFailed(r) => write!(f, "recording failed: {r}"),
            EndReason::Shutdown => f.write_str("proxy shutdown"),
            EndReason::Error(r) => write!(f, "error: {r}"),
        }
    }
}

/// The one line an agent is shown when its session is refused.
///
/// authz's own messages already say what to do (for a missing grant: the exact
/// `agentgate access request` command); this prefixes them so the agent knows it was
/// agentgate, not the upstream, that refused.
pub fn refusal_message(refused: &Refused) -> String {
    let text = match refused {
        // Already a full sentence: "access refused: authz is unreachable (…); nothing is
        // allowed until it is back".
        Refused::Unavailable(_) => refused.to_string(),
        Refused::Unauthenticated(m) => {
            format!("access refused by agentgate: the credential was not accepted: {m}")
        }
        Refused::Denied(m) | Refused::Invalid(m) => format!("access refused by agentgate: {m}"),
    };
    one_line(&text)
}

/// `text` on one line: newlines and other control characters become spaces, runs of spaces
/// collapse, and it is cut at 2000 bytes (on a character boundary).
pub fn one_line(text: &str) -> String {
    const MAX: usize = 2000;
    let mut out = String::with_capacity(text.len().min(MAX));
    let mut space = false;
    for c in text.trim().chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' {
            if space {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if out.len() + c.len_utf8() > MAX {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        assert_eq!(one_line("a\nb\r\n\tc  d"), "a b c d");
        let m = refusal_message(&Refused::Denied("no grant\nask for one".into()));
        assert_eq!(m, "access refused by agentgate: no grant ask for one");
        assert!(
            refusal_message(&Refused::Unavailable("x".into())).contains("authz is unreachable")
        );
        assert!(
            !EndReason::GrantRevoked("a\nb".into())
                .message()
                .contains('\n')
        );
        assert_eq!(EndReason::GrantExpired.to_string(), "grant expired");
        assert_eq!(one_line(&"é".repeat(3000)).len(), 2000 + '…'.len_utf8());
    }
}
