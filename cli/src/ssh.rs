//! `agentgate ssh cert`: a short-lived SSH certificate for ssh-proxy, signed by agentgate's
//! SSH CA after authz checked your token.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use agentgate_proto::authz::v1::SignSshCertificateRequest;
use agentgate_proto::authz::v1::authz_client::AuthzClient;
use anyhow::Context as _;
use clap::Subcommand;

use crate::authz::AuthzArgs;
use crate::client::status;

#[derive(Subcommand)]
pub enum SshCommand {
    /// Sign your SSH public key as a short-lived certificate (written next to the key as
    /// KEY-cert.pub, where OpenSSH finds it): `ssh -p 2222 ROLE+CONNECTION@gateway` then logs
    /// in with it.
    Cert {
        #[command(flatten)]
        authz: AuthzArgs,
        /// Your public key (default ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Lifetime; capped by authz and by your token's own expiry.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Where to write the certificate (default: KEY without .pub, plus -cert.pub).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn default_key() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --key")?;
    Ok(Path::new(&home).join(".ssh/id_ed25519.pub"))
}

/// `id_ed25519.pub` → `id_ed25519-cert.pub`, as OpenSSH looks for it.
pub fn certificate_path(key: &Path) -> PathBuf {
    let s = key.display().to_string();
    let base = s.strip_suffix(".pub").unwrap_or(&s);
    PathBuf::from(format!("{base}-cert.pub"))
}

pub async fn run(cmd: SshCommand) -> anyhow::Result<()> {
    match cmd {
        SshCommand::Cert {
            authz,
            key,
            ttl,
            output,
        } => {
            let key = match key {
                Some(k) => k,
                None => default_key()?,
            };
            let public = std::fs::read_to_string(&key)
                .with_context(|| format!("reading the public key {}", key.display()))?;
            let token =
                crate::client::resolve_token(authz.token.as_deref(), authz.data_dir.as_deref())?;
            let channel = crate::client::channel("authz", &authz.url, None).await?;
            let mut request = tonic::Request::new(SignSshCertificateRequest {
                public_key: public,
                ttl: Some(prost_types::Duration {
                    seconds: ttl.as_secs() as i64,
                    nanos: 0,
                }),
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .context("the token is not valid header text")?,
            );
            let signed = AuthzClient::new(channel)
                .sign_ssh_certificate(request)
                .await
                .map_err(status)?
                .into_inner();
            let path = output.unwrap_or_else(|| certificate_path(&key));
            std::fs::write(&path, format!("{}\n", signed.certificate.trim()))
                .with_context(|| format!("writing {}", path.display()))?;
            let expires = signed
                .expires_at
                .map(|t| {
                    humantime::format_rfc3339_seconds(
                        UNIX_EPOCH + Duration::from_secs(t.seconds.max(0) as u64),
                    )
                    .to_string()
                })
                .unwrap_or_default();
            eprintln!("wrote {} (valid until {expires})", path.display());
            println!("{}", path.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_go_where_openssh_looks() {
        assert_eq!(
            certificate_path(Path::new("/h/.ssh/id_ed25519.pub")),
            PathBuf::from("/h/.ssh/id_ed25519-cert.pub")
        );
        assert_eq!(
            certificate_path(Path::new("k")),
            PathBuf::from("k-cert.pub")
        );
    }
}
