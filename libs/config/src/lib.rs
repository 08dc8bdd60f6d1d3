//! One TOML file per deployment, every value overridable by environment variable.
//!
//! Each service describes its settings as a `serde` struct with defaults. [`load`] merges,
//! in order of increasing precedence: the struct's defaults, the TOML file (when given),
//! then environment variables named `PREFIX_SECTION__KEY` (a double underscore separates
//! nesting levels, so `AGENTGATE_AUDIT_STORE__DATABASE_URL` sets `audit_store.database_url`).
//! An error names the key and where its bad value came from, in one line.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded; the message is fit for one line of output.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist or cannot be read.
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    /// A value is missing, malformed or of the wrong type.
    #[error("config: {0}")]
    Invalid(String),
    /// The command line is not `BINARY [--config FILE]`.
    #[error("usage: {0} [--config FILE]")]
    Usage(String),
}

/// Where a service binary keeps its data when `data_dir` is not set: the images' volume.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/agentgate";

/// What every agentgate service binary does first: reads `BINARY [--config FILE]` from `args`
/// (without the program name) and [`load`]s `T` with prefix `AGENTGATE` and the top-level
/// key `data_dir` (`AGENTGATE_DATA_DIR`).
pub fn load_service<T>(
    binary: &str,
    args: impl IntoIterator<Item = String>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut args = args.into_iter();
    let file = match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => None,
        (Some("--config"), Some(path), None) => Some(PathBuf::from(path)),
        _ => return Err(ConfigError::Usage(binary.to_owned())),
    };
    load(file.as_deref(), "AGENTGATE", &["data_dir"])
}

/// Loads `T` from its defaults, an optional TOML file, and `PREFIX_*` environment variables.
///
/// `env_prefix` is given without the trailing underscore (e.g. `"AGENTGATE"`);
/// `top_level` names the top-level keys that may come from the environment (e.g.
/// `["data_dir"]` for `AGENTGATE_DATA_DIR`); nested keys always may.
pub fn load<T>(file: Option<&Path>, env_prefix: &str, top_level: &[&str]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        // Figment treats a missing file as empty; a named file that is absent is an error.
        if let Err(e) = std::fs::metadata(path) {
            return Err(ConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    // Only nested keys (`PREFIX_TABLE__KEY`) and the few top-level keys named come from the
    // environment, so other `PREFIX_*` variables (a CLI's own, Kubernetes service links) are
    // not mistaken for configuration.
    let top_level: Vec<String> = top_level.iter().map(|k| k.to_ascii_lowercase()).collect();
    figment = figment.merge(
        Env::prefixed(&format!("{env_prefix}_"))
            .filter(move |k| {
                k.as_str().contains("__")
                    || top_level.iter().any(|t| t.eq_ignore_ascii_case(k.as_str()))
            })
            .split("__"),
    );
    figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(e)))
}

/// Folds figment's error chain into one line: what, which key, and from where.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!(" at `{}`", e.path.join("."))
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (from {src})"),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            format!("{}{key}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        name: String,
        port: u16,
        nested: Nested,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Nested {
        url: Option<String>,
    }

    #[test]
    fn service_command_lines() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"from-file\"\n").expect("write");
        let s: Sample = load_service(
            "agentgate-x",
            args(&["--config", path.to_str().expect("utf-8")]),
        )
        .expect("with a file");
        assert_eq!(s.name, "from-file");
        let s: Sample = load_service("agentgate-x", args(&[])).expect("defaults");
        assert_eq!(s.name, "");
        for bad in [
            &["--config"][..],
            &["-c", "x"],
            &["--config", "a", "b"],
            &["x"],
        ] {
            let e = load_service::<Sample>("agentgate-x", args(bad)).expect_err("usage");
            assert_eq!(e.to_string(), "usage: agentgate-x [--config FILE]");
        }
        let e = load_service::<Sample>("agentgate-x", args(&["--config", "/nonexistent.toml"]))
            .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent.toml"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn file_then_environment_override() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"a\"\nport = 1\n[nested]\nurl = \"x\"\n").expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGCFGTEST_PORT", "7");
            jail.set_env("AGCFGTEST_NESTED__URL", "y");
            jail.set_env("AGCFGTEST_UNRELATED", "ignored");
            let s: Sample = load(Some(&path), "AGCFGTEST", &["port"]).expect("load");
            assert_eq!(s.name, "a");
            assert_eq!(s.port, 7);
            assert_eq!(s.nested.url.as_deref(), Some("y"));
            Ok(())
        });
    }

    #[test]
    fn bad_value_names_key_and_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "port = \"not a number\"\n").expect("write");
        let err = load::<Sample>(Some(&path), "AGCFGTEST2", &[]).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("`port`"), "{msg}");
        assert!(msg.contains("c.toml"), "{msg}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/x.toml")), "AGCFGTEST3", &[])
            .expect_err("must fail");
        assert!(err.to_string().contains("/nonexistent/x.toml"));
    }
}
