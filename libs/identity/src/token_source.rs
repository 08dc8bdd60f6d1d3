//! Where a service finds the credential it presents to another agentgate service.
//!
//! Service tokens are short-lived, so a long-running caller must never read its token once at
//! start: it asks its [`TokenSource`] on every call or (re)connection, and whatever renews the
//! token — authz's token files, a Kubernetes projected volume, a sidecar, an in-process
//! issuer — is picked up without a restart.

use std::path::{Path, PathBuf};

/// Gives the bearer token to present now.
///
/// Called on every request or connection, so it must be quick: a source that has to fetch a
/// token over the network should renew it in the background and hand out the cached value
/// here. Any `Fn() -> Result<String, String>` closure is a source.
///
/// ```
/// use std::sync::Arc;
/// use agentgate_identity::{FixedToken, TokenFile, TokenSource};
///
/// let fixed: Arc<dyn TokenSource> = Arc::new(FixedToken::new("eyJ..."));
/// let file: Arc<dyn TokenSource> =
///     Arc::new(TokenFile::new("/var/lib/agentgate/pg-proxy.service.token"));
/// let custom: Arc<dyn TokenSource> = Arc::new(|| -> Result<String, String> { Ok("eyJ...".into()) });
/// # let _ = (fixed, file, custom);
/// ```
pub trait TokenSource: Send + Sync + 'static {
    /// The token to present now, or why there is none (the caller then sends nothing).
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

/// The same token every time: for tests and short-lived jobs. Once it expires every call is
/// refused; prefer [`TokenFile`] or a renewing source for anything long-running.
pub struct FixedToken(String);

impl FixedToken {
    /// Surrounding whitespace (a trailing newline from a file or `echo`) is dropped.
    pub fn new(token: impl Into<String>) -> FixedToken {
        FixedToken(token.into().trim().to_owned())
    }
}

impl TokenSource for FixedToken {
    fn token(&self) -> Result<String, String> {
        if self.0.is_empty() {
            return Err("the configured token is empty".into());
        }
        Ok(self.0.clone())
    }
}

/// A token file, read again every time it is asked (surrounding whitespace ignored), so a
/// renewed file is picked up without a restart. Meant for calls made per connection or per
/// session, not per packet.
pub struct TokenFile(PathBuf);

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> TokenFile {
        TokenFile(path.into())
    }

    /// The file it reads, for messages.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl TokenSource for TokenFile {
    fn token(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| format!("token file {}: {e}", self.0.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("token file {} is empty", self.0.display()));
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
        let dir = std::env::temp_dir().join(format!("agentgate-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        let _ = std::fs::remove_file(&path);
        let file = TokenFile::new(&path);
        assert!(
            file.token()
                .err()
                .unwrap_or_default()
                .contains("token file")
        );
        std::fs::write(&path, "one\n").expect("write");
        assert_eq!(file.token(), Ok("one".to_owned()));
        // Renewed on disk: the next read sees the new token.
        std::fs::write(&path, "two").expect("write");
        assert_eq!(file.token(), Ok("two".to_owned()));
        std::fs::write(&path, "  \n").expect("write");
        assert!(file.token().err().unwrap_or_default().contains("empty"));
        let closure = || -> Result<String, String> { Ok("c".into()) };
        assert_eq!(TokenSource::token(&closure), Ok("c".to_owned()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
