//! A private OpenSSH server for tests and benchmarks: `sshd -D -e -f CONFIG` on a free
//! loopback port, run as the current user, with its own host key and authorized_keys in a
//! directory of the caller's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::free_port;

/// A running sshd; killed (with its session processes) on drop.
pub struct Sshd {
    pub port: u16,
    /// The host's public key, OpenSSH format (`ssh-ed25519 AAAA... comment`).
    pub host_public: String,
    /// The user sessions log in as (the current user).
    pub user: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// `ssh-keygen -t ed25519` without a passphrase.
pub fn keygen(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .context("running ssh-keygen (apt-get install openssh-client)")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Sshd {
    /// Starts sshd in `dir/sshd`, trusting the public keys in `authorized`.
    pub fn start(dir: &Path, authorized: &str) -> anyhow::Result<Sshd> {
        Sshd::start_with_ca(dir, authorized, None)
    }

    /// Starts sshd in `dir/sshd`, trusting the public keys in `authorized` and, when given,
    /// user certificates signed by the CA whose public key is `user_ca` (`TrustedUserCAKeys`;
    /// the certificate must name the current user as a principal). It accepts the
    /// environment variables `LANG`, `LC_*` and `AGENTGATE_TEST_*` (so that a test can tell
    /// the proxy's filter from sshd's), and allows TCP and agent forwarding.
    pub fn start_with_ca(
        dir: &Path,
        authorized: &str,
        user_ca: Option<&str>,
    ) -> anyhow::Result<Sshd> {
        let dir = dir.join("sshd");
        std::fs::create_dir_all(&dir)?;
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        keygen(&dir.join("host_key"))?;
        std::fs::write(dir.join("authorized_keys"), authorized)?;
        let ca_line = match user_ca {
            Some(ca) => {
                std::fs::write(dir.join("user_ca.pub"), ca)?;
                format!("TrustedUserCAKeys {}/user_ca.pub\n", dir.display())
            }
            None => String::new(),
        };
        let port = free_port()?;
        let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?
            .trim()
            .to_owned();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             UsePAM no\nSubsystem sftp internal-sftp\nAcceptEnv LANG LC_* AGENTGATE_TEST_*\nAllowTcpForwarding yes\nAllowAgentForwarding yes\n\
             PrintMotd no\nLogLevel ERROR\n{ca_line}",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("sshd is not installed (apt-get install openssh-server)")?;
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("sshd did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let host_public = std::fs::read_to_string(dir.join("host_key.pub"))?;
        Ok(Sshd {
            port,
            host_public,
            user,
            dir,
            child: Some(child),
        })
    }

    /// The process ids of sshd and every process it started.
    fn family(root: u32) -> Vec<u32> {
        let mut family = vec![root];
        loop {
            let mut grew = false;
            let Ok(entries) = std::fs::read_dir("/proc") else {
                break;
            };
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if family.contains(&pid) {
                    continue;
                }
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                let ppid = stat
                    .rsplit(')')
                    .next()
                    .and_then(|rest| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid.is_some_and(|p| family.contains(&p)) {
                    family.push(pid);
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        family
    }

    /// Kills sshd and every session process it started (SIGKILL), like a host going away.
    pub fn kill_all(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pids: Vec<String> = Self::family(child.id())
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill_all();
    }
}
