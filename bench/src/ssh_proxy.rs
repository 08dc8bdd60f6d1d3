//! ssh-proxy: bulk throughput of `ssh host 'head -c 1G /dev/zero' > /dev/null` through
//! ssh-proxy, side by side with the same command over ssh directly, and the proxy's peak
//! memory.
//!
//! Starts a private sshd (the integration-test harness: `sshd -D -f CONFIG` on a free
//! port), the audit store (SQLite) and authz in this process — authz with connection `bench`
//! (the host's key pinned in `known_hosts`) and a Cedar policy that lets group `agents`
//! connect as role `read` and run anything — and ssh-proxy as its own process
//! (`agentgate-ssh-proxy`, the release binary next to this one), so that its peak RSS
//! (`VmHWM`) is the proxy's alone. The agent logs in with a certificate from authz's SSH CA.
//!
//! Each round runs the command directly and through the proxy, interleaved (`--rounds`,
//! default 3), with OpenSSH's default cipher on every hop. The proxy classifies the
//! command, passes the output through the session's masking engine (`--masking`: the
//! policy carries detector rules, so every byte is scanned) and records the command, its
//! first 64 KiB of output (asciicast) and its exit status.
//!
//! `cargo build --release -p agentgate-ssh-proxy -p agentgate-bench`
//! `target/release/ssh-proxy --bytes 1G`

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_authz::{AuthzConfig, ConnectionConfig, UpstreamConfig};
use agentgate_identity::TokenRequest;
use agentgate_integration_tests::sshd::{Sshd, keygen};
use agentgate_integration_tests::{AuditStoreFixture, Backend, free_port};
use agentgate_proto::authz::v1::SignSshCertificateRequest;
use agentgate_proto::authz::v1::authz_client::AuthzClient;
use agentgate_proto::common::v1::PrincipalKind;
use anyhow::{Context as _, bail, ensure};
use clap::Parser;

/// ssh `head -c N /dev/zero` directly and through ssh-proxy: throughput, ratio, peak RSS.
#[derive(Debug, Parser)]
struct Args {
    /// Bytes per transfer (suffixes K, M, G as `head -c` takes them).
    #[arg(long, default_value = "1G")]
    bytes: String,
    /// Interleaved rounds (direct, proxy).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Give the session masking rules (content detectors), so every byte is scanned.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    masking: bool,
    /// The agent's cipher (`ssh -c`), on both paths; default OpenSSH's own choice
    /// (chacha20-poly1305).
    #[arg(long)]
    cipher: Option<String>,
    /// What the command prints: `zero` (`head -c N /dev/zero`: nothing for a detector to
    /// start on) or `text` (log-like lines with digits, colons and `@`, which the masking
    /// scan must look at, from `yes … | head -c N`).
    #[arg(long, default_value = "zero")]
    source: String,
    /// The ciphers the proxy offers agents (`ssh_proxy.agent_ciphers`, comma-separated);
    /// default the proxy's default list. The agent's client picks the first of its own list
    /// that is offered, so only leaving a cipher out changes what is negotiated.
    #[arg(long)]
    agent_ciphers: Option<String>,
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The cipher ssh negotiated server → client (from `ssh -v`'s `kex:` line).
fn negotiated_cipher(mut cmd: Command) -> String {
    let Ok(out) = cmd.stdout(Stdio::null()).stdin(Stdio::null()).output() else {
        return "unknown".into();
    };
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| {
            l.strip_prefix("debug1: kex: server->client cipher: ")
                .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

const POLICY: &str = r#"
@id("agents")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"bench")
when { context.role == "read" };

@id("everything")
permit (principal, action == Agentgate::Action::"execute", resource);
"#;

const MASKING: &str = r#"
@id("keys")
@mask("detector:aws_access_key, detector:email, detector:payment_card")
@strategy("redact")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);
"#;

fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let (n, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>().context("--bytes")? * mult)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based, whole line).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ssh_base(known_hosts: &Path, cipher: Option<&str>) -> Command {
    let mut c = Command::new("ssh");
    if let Some(cipher) = cipher {
        c.args(["-c", cipher]);
    }
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "LogLevel=ERROR",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
    c
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agentgate_tls::install_crypto_provider();
    let args = Args::parse();
    let bytes = parse_bytes(&args.bytes)?;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys)?;
    let upstream_key = keys.join("upstream");
    keygen(&upstream_key)?;
    let agent_key = keys.join("agent");
    keygen(&agent_key)?;
    let sshd = Sshd::start(
        dir.path(),
        &std::fs::read_to_string(keys.join("upstream.pub"))?,
    )?;

    let audit = AuditStoreFixture::start(Backend::Sqlite, 1000).await?;
    let signing_key = dir.path().join("authz-signing-key.pem");
    {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let pem = ed25519_dalek::SigningKey::from_bytes(&[42; 32])
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(&signing_key, pem.as_bytes())?;
    }
    let policy = dir.path().join("policy.cedar");
    std::fs::write(
        &policy,
        format!("{POLICY}{}", if args.masking { MASKING } else { "" }),
    )?;
    let config = AuthzConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        policy: Some(policy),
        signing_key: Some(signing_key),
        audit_url: Some(audit.endpoint()),
        connections: vec![ConnectionConfig {
            name: "bench".into(),
            protocol: "ssh".into(),
            upstream: format!("127.0.0.1:{}", sshd.port),
            roles: [(
                "read".to_string(),
                UpstreamConfig {
                    user: sshd.user.clone(),
                    secret: Some(format!("file:{}", upstream_key.display())),
                },
            )]
            .into_iter()
            .collect(),
            settings: [(
                "known_hosts".to_string(),
                format!("[127.0.0.1]:{} {}", sshd.port, sshd.host_public),
            )]
            .into_iter()
            .collect(),
        }],
        ..Default::default()
    };
    let authz = agentgate_authz::start(&config, dir.path()).await?;
    let token_file = dir.path().join("ssh-proxy.token");
    std::fs::write(
        &token_file,
        authz.service_token("ssh-proxy", Duration::from_secs(3600))?,
    )?;

    // The proxy as its own process.
    let exe = std::env::current_exe()?;
    let proxy_bin = exe
        .parent()
        .map(|d| d.join("agentgate-ssh-proxy"))
        .filter(|p| p.exists())
        .context("agentgate-ssh-proxy is not built next to this binary: cargo build --release -p agentgate-ssh-proxy")?;
    let port = free_port()?;
    let proxy_config = dir.path().join("ssh-proxy.toml");
    std::fs::write(
        &proxy_config,
        format!(
            "data_dir = {data:?}\n[ssh_proxy]\nlisten = \"127.0.0.1:{port}\"\nauthz_url = \"http://{authz}\"\naudit_url = {audit:?}\napprovals_url = \"http://127.0.0.1:1\"\nservice_token_file = {token:?}\n{ciphers}",
            data = dir.path().display().to_string(),
            authz = authz.addr,
            audit = audit.endpoint(),
            token = token_file.display().to_string(),
            ciphers = match &args.agent_ciphers {
                Some(list) => format!(
                    "agent_ciphers = [{}]\n",
                    list.split(',')
                        .map(|c| format!("{:?}", c.trim()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => String::new(),
            },
        ),
    )?;
    let proxy = Proxy(
        Command::new(&proxy_bin)
            .arg("--config")
            .arg(&proxy_config)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "ssh-proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gw_key = russh_public(&dir.path().join("ssh-proxy-host-key"))?;
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{port} {gw_key}\n[127.0.0.1]:{} {}",
            sshd.port, sshd.host_public
        ),
    )?;

    // The agent's certificate.
    let (token, _) = authz.core.issuer.issue(&TokenRequest {
        subject: "agent:bench".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["agents".into()],
        audience: Vec::new(),
        ttl: Duration::from_secs(3600),
    })?;
    let mut client = AuthzClient::connect(format!("http://{}", authz.addr)).await?;
    let mut request = tonic::Request::new(SignSshCertificateRequest {
        public_key: std::fs::read_to_string(keys.join("agent.pub"))?,
        ttl: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let cert = client.sign_ssh_certificate(request).await?.into_inner();
    let cert_path = keys.join("agent-cert.pub");
    std::fs::write(&cert_path, cert.certificate)?;

    let command = match args.source.as_str() {
        "zero" => format!("head -c {bytes} /dev/zero"),
        "text" => format!(
            "yes '2026-11-26T12:00:00.123Z INFO req=4f2a9c user=42 path=/api/v1/items?id=1234 took 12 ms from 10.1.2.3:5678' | head -c {bytes}"
        ),
        other => bail!("--source {other}: zero or text"),
    };
    let direct_to = |remote: &str, verbose: bool| {
        let mut c = ssh_base(&known_hosts, args.cipher.as_deref());
        if verbose {
            c.arg("-v");
        }
        c.arg("-i")
            .arg(&upstream_key)
            .args(["-p", &sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg(remote);
        c
    };
    let proxied_to = |remote: &str, verbose: bool| {
        let mut c = ssh_base(&known_hosts, args.cipher.as_deref());
        if verbose {
            c.arg("-v");
        }
        c.arg("-i")
            .arg(&agent_key)
            .arg("-o")
            .arg(format!("CertificateFile={}", cert_path.display()))
            .args(["-p", &port.to_string(), "read+bench@127.0.0.1"])
            .arg(remote);
        c
    };
    let direct = || direct_to(&command, false);
    let proxied = || proxied_to(&command, false);
    // Warm up both paths (and check they work).
    timed(&mut direct())?;
    timed(&mut proxied())?;
    let direct_cipher = negotiated_cipher(direct_to("true", true));
    let agent_cipher = negotiated_cipher(proxied_to("true", true));
    let mut d = Vec::new();
    let mut p = Vec::new();
    let mut proxy_cpu = 0.0;
    for round in 1..=args.rounds {
        let td = timed(&mut direct())?;
        let before = cpu_seconds(proxy.0.id()).unwrap_or_default();
        let tp = timed(&mut proxied())?;
        proxy_cpu += cpu_seconds(proxy.0.id()).unwrap_or_default() - before;
        eprintln!(
            "round {round}: direct {:.2}s, proxy {:.2}s (load average {})",
            td.as_secs_f64(),
            tp.as_secs_f64(),
            load_average()
        );
        d.push(td);
        p.push(tp);
    }
    let mib = bytes as f64 / (1 << 20) as f64;
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let median = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        s[s.len() / 2]
    };
    let (dm, pm) = (median(&d), median(&p));
    println!("| path | median s | best s | MiB/s (median) |\n| --- | --- | --- | --- |");
    println!(
        "| ssh direct | {:.2} | {:.2} | {:.0} |",
        dm.as_secs_f64(),
        best(&d).as_secs_f64(),
        mib / dm.as_secs_f64()
    );
    println!(
        "| ssh through ssh-proxy{} | {:.2} | {:.2} | {:.0} |",
        if args.masking { " (masking on)" } else { "" },
        pm.as_secs_f64(),
        best(&p).as_secs_f64(),
        mib / pm.as_secs_f64()
    );
    println!(
        "\nagent cipher asked: {}; negotiated: direct {direct_cipher}, agent → proxy {agent_cipher}; source {}",
        args.cipher.as_deref().unwrap_or("OpenSSH default"),
        args.source
    );
    println!(
        "ratio proxy/direct (best throughput): {:.2}",
        best(&d).as_secs_f64() / best(&p).as_secs_f64()
    );
    println!("load average at the end: {}", load_average());
    println!(
        "ratio proxy/direct (median throughput): {:.2}",
        dm.as_secs_f64() / pm.as_secs_f64()
    );
    println!(
        "ssh-proxy CPU time: {:.2} s per GiB relayed",
        proxy_cpu / (bytes as f64 * args.rounds as f64 / (1u64 << 30) as f64)
    );
    match peak_rss_kib(proxy.0.id()) {
        Some(kib) => println!("ssh-proxy peak RSS (VmHWM): {:.1} MiB", kib as f64 / 1024.0),
        None => println!("ssh-proxy peak RSS: unavailable"),
    }
    drop(proxy);
    drop(sshd);
    Ok(())
}

/// The public half of an OpenSSH private key file, via ssh-keygen.
fn russh_public(private: &Path) -> anyhow::Result<String> {
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(private)
        .output()?;
    ensure!(
        out.status.success(),
        "ssh-keygen -y: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
