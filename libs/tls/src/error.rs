//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong loading TLS material or generating development certificates.
///
/// Each variant names the file it is about and what is wrong with it, because the operator's
/// fix is almost always "point at the right file" or "regenerate the file". The underlying
/// error is part of the message (not a separate `source`), so a report prints it once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read (missing, unreadable, a directory, ...).
    #[error("reading {}: {error}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },

    /// A file or directory could not be written (development certificates).
    #[error("writing {}: {error}", path.display())]
    Write {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },

    /// A certificate file holds no `CERTIFICATE` PEM block.
    #[error("no certificate in {} (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate {
        /// The file that was expected to hold certificates.
        path: PathBuf,
    },

    /// A key file holds no private key PEM block.
    #[error(
        "no private key in {} (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)",
        path.display()
    )]
    NoPrivateKey {
        /// The file that was expected to hold a private key.
        path: PathBuf,
    },

    /// A file holds PEM (or DER) that does not parse, or a certificate rustls rejects.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The certificate and the key do not belong together, or rustls refused the pair.
    #[error("certificate {} with key {}: {reason}", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said about the pair.
        reason: String,
    },

    /// The combination of settings cannot work (half an identity, a client without a CA, an
    /// invalid server name, ...). The message says which setting to change.
    #[error("TLS configuration: {0}")]
    Config(String),

    /// rcgen failed to generate a development certificate or key.
    #[error("generating {what}: {error}")]
    Generate {
        /// What was being generated ("the development CA", "the certificate of authz", ...).
        what: String,
        /// What rcgen said.
        error: rcgen::Error,
    },
}
