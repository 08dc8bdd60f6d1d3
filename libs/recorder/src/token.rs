//! The credential a recorder presents to the audit store.
//!
//! The store refuses an Ingest stream without a valid service token, and ends a stream when
//! the token it was opened with expires. The shipper therefore asks its [`TokenSource`] for
//! the current token every time it connects, never once at start: a source can renew or
//! rotate tokens and the next connection picks the new one up.

use std::path::{Path, PathBuf};

/// Gives the bearer token for the next Ingest connection.
///
/// Called on every (re)connection, from the shipper task, so it must be quick: a source that
/// has to fetch a token over the network should renew it in the background and hand out the
/// cached value here. Any `Fn() -> Result<String, String>` closure is a source.
///
/// ```
/// use std::sync::Arc;
/// use agentgate_recorder::{RecorderConfig, TokenSource};
///
/// // A fixed token, a file re-read on every connection, or anything else:
/// let fixed = RecorderConfig::new("http://127.0.0.1:7403", "/tmp/spool.db").with_token("eyJ...");
/// let file = RecorderConfig::new("http://127.0.0.1:7403", "/tmp/spool.db")
///     .with_token_file("/var/lib/agentgate/pg-proxy.recorder.token");
/// let renewed: Arc<dyn TokenSource> = Arc::new(|| -> Result<String, String> {
///     Ok("eyJ...".to_owned())
/// });
/// let custom = RecorderConfig::new("http://127.0.0.1:7403", "/tmp/spool.db").with_token_source(renewed);
/// # let _ = (fixed, file, custom);
/// ```
pub trait TokenSource: Send + Sync + 'static {
    /// The token to present now, or why there is none. Without a token nothing is sent:
    /// the events stay in the spool and the shipper asks again after its backoff.
    fn token(&self) -> Result<String, String>;
}

impl<F> TokenSource for F
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    fn token(&self) -> Result<String, String> {
        self()
    }
}

/// The same token on every connection: for tests and short-lived jobs. Once it expires the
/// store refuses it and events wait in the spool; prefer [`TokenFile`] or a renewing source
/// for anything long-running.
pub struct FixedToken(String);

impl FixedToken {
    pub fn new(token: impl Into<String>) -> FixedToken {
        FixedToken(token.into().trim().to_owned())
    }
}

impl TokenSource for FixedToken {
    fn token(&self) -> Result<String, String> {
        if self.0.is_empty() {
            return Err("the configured audit token is empty".into());
        }
        Ok(self.0.clone())
    }
}

/// A token file, read again on every connection (surrounding whitespace ignored), so
/// whatever renews it — authz's `recorder_tokens`, a Kubernetes projected volume, a sidecar —
/// is picked up without a restart.
pub struct TokenFile(PathBuf);

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> TokenFile {
        TokenFile(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl TokenSource for TokenFile {
    fn token(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| format!("audit token file {}: {e}", self.0.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("audit token file {} is empty", self.0.display()));
        }
        Ok(token.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_give_their_token_or_a_reason() {
        assert_eq!(FixedToken::new(" t \n").token(), Ok("t".to_owned()));
        assert!(FixedToken::new("").token().is_err());
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let file = TokenFile::new(&path);
        assert!(
            file.token()
                .err()
                .unwrap_or_default()
                .contains("audit token file")
        );
        std::fs::write(&path, "one\n").expect("write");
        assert_eq!(file.token(), Ok("one".to_owned()));
        // Rotated on disk: the next read sees the new token.
        std::fs::write(&path, "two").expect("write");
        assert_eq!(file.token(), Ok("two".to_owned()));
        std::fs::write(&path, "  \n").expect("write");
        assert!(file.token().err().unwrap_or_default().contains("empty"));
        let closure = || -> Result<String, String> { Ok("c".into()) };
        assert_eq!(TokenSource::token(&closure), Ok("c".to_owned()));
    }
}
