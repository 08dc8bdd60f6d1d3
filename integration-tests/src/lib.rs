//! The harness every end-to-end test of agentgate uses: it starts real servers on free
//! ports — a private Postgres cluster (initdb, SCRAM-SHA-256 auth), agentgate's own services —
//! and tears them down when the test ends.
//!
//! Nothing here is a stand-in: the Postgres is the machine's own PostgreSQL binaries, the
//! services are the same code `agentgate up` runs.

pub mod control_plane;
pub mod sshd;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where the PostgreSQL server binaries are: `$AGENTGATE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("AGENTGATE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("no PostgreSQL server found: install postgresql or set AGENTGATE_PG_BIN")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A private PostgreSQL cluster on a free port, stopped and deleted on drop.
///
/// Authentication is SCRAM-SHA-256 for every TCP connection, as on a production server.
/// PostgreSQL refuses to run as root, so under root the cluster runs as the `postgres` user.
pub struct Postgres {
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
}

impl Postgres {
    /// initdb, configure SCRAM, start, and wait until it accepts connections.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("agentgate-pg-").tempdir()?;
        let run_as = is_root().then(|| "postgres".to_string());
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)?;
        if let Some(user) = &run_as {
            chown_recursive(dir.path(), user)?;
        }
        let port = free_port()?;
        let pg = Postgres {
            port,
            password,
            dir,
            bin,
            run_as,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--pwfile",
                path_str(&pwfile)?,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        std::fs::remove_file(&pwfile)?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n\
             password_encryption = 'scram-sha-256'\n",
            pg.dir.path().display()
        );
        append_file(&data.join("postgresql.conf"), &conf)?;
        let log = pg.dir.path().join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
        .with_context(|| format!("starting postgres (log: {})", log.display()))?;
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The postmaster's process id (first line of `postmaster.pid`): benchmarks renice the
    /// cluster through it, and its backends, forked later, inherit the priority.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let file = self.dir.path().join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no process id in {}", file.display()))
    }

    /// A URL for the superuser on `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Creates a database and returns its superuser URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
        Ok(self.url(name))
    }

    /// Creates a login role with a SCRAM password, owning database `name`; returns its URL.
    pub async fn create_owned_database(&self, name: &str, role: &str) -> anyhow::Result<String> {
        use sqlx::Connection as _;
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"
        )))
        .execute(&mut conn)
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" OWNER \"{role}\""
        )))
        .execute(&mut conn)
        .await?;
        Ok(format!(
            "postgres://{role}:{password}@127.0.0.1:{}/{name}",
            self.port
        ))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if let Some(d) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", d, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

fn append_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_recursive(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(path)
        .status()?;
    if !status.success() {
        bail!("chown {user} {} failed", path.display());
    }
    Ok(())
}

/// Which database an audit store under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A client of the audit store that sends a bearer token with every call.
pub type AuditClient = agentgate_proto::audit::v1::audit_store_client::AuditStoreClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        agentgate_identity::BearerInterceptor,
    >,
>;

/// A connected audit store client that presents `token` on every call.
pub async fn audit_client(endpoint: &str, token: &str) -> anyhow::Result<AuditClient> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
    let bearer =
        agentgate_identity::BearerInterceptor::new(token).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(
        agentgate_proto::audit::v1::audit_store_client::AuditStoreClient::with_interceptor(
            channel, bearer,
        )
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20),
    )
}

/// A token the audit store takes for everything: a service principal (it may Ingest) in
/// group `admin` (it may read and prune), signed by [`test_token_issuer`].
pub fn audit_superuser_token() -> anyhow::Result<String> {
    test_token(
        &test_token_issuer(),
        "service:test-harness",
        agentgate_proto::common::v1::PrincipalKind::Service,
        &[agentgate_audit_store::access::ADMIN_GROUP],
    )
}

/// A recorder's token for the audit store: `service:<service>`, kind service, audience
/// `audit-store`, signed by [`test_token_issuer`], valid for an hour.
pub fn recorder_token(service: &str) -> anyhow::Result<String> {
    let (token, _) = test_token_issuer()
        .issue(&agentgate_identity::TokenRequest {
            subject: format!("service:{service}"),
            kind: agentgate_proto::common::v1::PrincipalKind::Service,
            groups: Vec::new(),
            audience: vec![agentgate_identity::AUDIT_STORE_AUDIENCE.to_owned()],
            ttl: Duration::from_secs(3600),
        })
        .map_err(|e| anyhow::anyhow!("issuing a recorder token: {e}"))?;
    Ok(token)
}

/// An audit store served in-process on a free port, with its own data directory and, for
/// the Postgres backend, its own private cluster. It trusts [`test_token_issuer`]'s tokens;
/// [`AuditStoreFixture::client`] carries one that may do everything.
pub struct AuditStoreFixture {
    pub running: Option<agentgate_audit_store::RunningAuditStore>,
    pub config: agentgate_audit_store::AuditStoreConfig,
    pub data_dir: tempfile::TempDir,
    /// The superuser URL of the store's database (Postgres), for tests that tamper.
    pub admin_url: Option<String>,
    pub database_url: String,
    pub postgres: Option<Postgres>,
    /// Signs the tokens the store accepts (unless started with another authenticator).
    pub issuer: agentgate_identity::TokenIssuer,
    /// What the store checks tokens with; kept for restarts.
    pub auth: std::sync::Arc<dyn agentgate_identity::Authenticator>,
}

impl AuditStoreFixture {
    /// Starts a store on `backend` with checkpoints every `checkpoint_every` events, trusting
    /// [`test_token_issuer`].
    pub async fn start(backend: Backend, checkpoint_every: u64) -> anyhow::Result<Self> {
        let auth = std::sync::Arc::new(test_token_issuer().verifier());
        Self::start_with(backend, checkpoint_every, auth).await
    }

    /// Like [`AuditStoreFixture::start`], checking tokens with `auth` (e.g. authz's, set
    /// late through an `agentgate_identity::LateAuthenticator`, as `agentgate up` does).
    pub async fn start_with(
        backend: Backend,
        checkpoint_every: u64,
        auth: std::sync::Arc<dyn agentgate_identity::Authenticator>,
    ) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new()
            .prefix("agentgate-audit-")
            .tempdir()?;
        let (postgres, admin_url, database_url) = match backend {
            Backend::Sqlite => (
                None,
                None,
                format!("sqlite://{}", data_dir.path().join("audit.db").display()),
            ),
            Backend::Postgres => {
                let pg = Postgres::start()?;
                let url = pg.create_owned_database("audit", "agentgate_audit").await?;
                let admin = pg.url("audit");
                (Some(pg), Some(admin), url)
            }
        };
        let config = agentgate_audit_store::AuditStoreConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            database_url: Some(database_url.clone()),
            checkpoint_every,
            checkpoint_interval: Duration::from_secs(3600),
            ..Default::default()
        };
        let running =
            agentgate_audit_store::start(&config, data_dir.path(), auth.clone(), None).await?;
        Ok(AuditStoreFixture {
            running: Some(running),
            config,
            data_dir,
            admin_url,
            database_url,
            postgres,
            issuer: test_token_issuer(),
            auth,
        })
    }

    /// The store's gRPC address as a URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.config.listen)
    }

    /// A connected gRPC client whose token may do everything ([`audit_superuser_token`]).
    pub async fn client(&self) -> anyhow::Result<AuditClient> {
        audit_client(&self.endpoint(), &audit_superuser_token()?).await
    }

    /// A connected gRPC client presenting `token`.
    pub async fn client_as(&self, token: &str) -> anyhow::Result<AuditClient> {
        audit_client(&self.endpoint(), token).await
    }

    /// A connected gRPC client that sends no credential at all.
    pub async fn anonymous_client(
        &self,
    ) -> anyhow::Result<
        agentgate_proto::audit::v1::audit_store_client::AuditStoreClient<tonic::transport::Channel>,
    > {
        Ok(
            agentgate_proto::audit::v1::audit_store_client::AuditStoreClient::connect(
                self.endpoint(),
            )
            .await?,
        )
    }

    /// A token for `subject` of `kind` in `groups`, which the store accepts.
    pub fn token(
        &self,
        subject: &str,
        kind: agentgate_proto::common::v1::PrincipalKind,
        groups: &[&str],
    ) -> anyhow::Result<String> {
        test_token(&self.issuer, subject, kind, groups)
    }

    /// A recorder configuration shipping to this store with a valid service token.
    pub fn recorder_config(
        &self,
        spool: &Path,
    ) -> anyhow::Result<agentgate_recorder::RecorderConfig> {
        Ok(
            agentgate_recorder::RecorderConfig::new(self.endpoint(), spool)
                .with_token(recorder_token("test-recorder")?),
        )
    }

    /// Stops the server (the database stays), as an outage would.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port, database and key.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let auth = self.auth.clone();
            match agentgate_audit_store::start(&self.config, self.data_dir.path(), auth, None).await
            {
                Ok(r) => {
                    self.running = Some(r);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "port not free yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The store's signing key, as an offline verifier would pin it.
    pub fn public_key(&self) -> anyhow::Result<agentgate_audit_chain::VerifyingKey> {
        let path = self.config.signing_key_path(self.data_dir.path());
        Ok(agentgate_audit_chain::SigningKeyFile::load_or_generate(&path)?.verifying_key())
    }
}

/// The path of a binary this workspace builds (target/<profile>/NAME), for tests that run
/// agentgate as a separate process. `cargo test --workspace` builds them first.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test binary location")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --workspace` (or `cargo test --workspace`) first",
            path.display()
        );
    }
    Ok(path)
}

/// The private key of [`test_token_issuer`].
const TEST_KEY: [u8; 32] = [42; 32];

/// The token issuer the tests sign with (a fixed test key, issuer "agentgate"); the audit
/// store and approvals fixtures trust it.
pub fn test_token_issuer() -> agentgate_identity::TokenIssuer {
    // A fixed key: tests and the processes they start agree on it without sharing files.
    agentgate_identity::TokenIssuer::new(
        &ed25519_dalek::SigningKey::from_bytes(&TEST_KEY),
        "agentgate",
    )
    .expect("a fixed Ed25519 key is valid")
}

/// A signed token for a principal, valid for an hour.
pub fn test_token(
    issuer: &agentgate_identity::TokenIssuer,
    subject: &str,
    kind: agentgate_proto::common::v1::PrincipalKind,
    groups: &[&str],
) -> anyhow::Result<String> {
    let (token, _) = issuer
        .issue(&agentgate_identity::TokenRequest {
            subject: subject.to_owned(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audience: Vec::new(),
            ttl: Duration::from_secs(3600),
        })
        .map_err(|e| anyhow::anyhow!("issuing a test token: {e}"))?;
    Ok(token)
}

/// `msg` as a gRPC request carrying `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(value) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// An approvals service served in-process on a free port, trusting [`test_token_issuer`].
/// Give several fixtures the same `database_url` (Postgres) to run several instances.
pub struct ApprovalsFixture {
    pub running: Option<agentgate_approvals::RunningApprovals>,
    pub config: agentgate_approvals::ApprovalsConfig,
    pub data_dir: tempfile::TempDir,
    pub issuer: agentgate_identity::TokenIssuer,
}

impl ApprovalsFixture {
    /// Starts with `config` as given, except `listen` (a free port) and, when unset,
    /// `database_url` (SQLite in a fresh data directory) and `audit.endpoint` (a port where
    /// nothing listens: events stay in the spool). The recorder presents a
    /// [`recorder_token`] for `service:approvals` unless `audit.token_file` is set.
    pub async fn start(mut config: agentgate_approvals::ApprovalsConfig) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new()
            .prefix("agentgate-approvals-")
            .tempdir()?;
        config.listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        if config.database_url.is_none() {
            config.database_url = Some(format!(
                "sqlite://{}",
                data_dir.path().join("approvals.db").display()
            ));
        }
        if config.audit.endpoint == agentgate_approvals::AuditConfig::default().endpoint {
            config.audit.endpoint = format!("http://127.0.0.1:{}", free_port()?);
        }
        let issuer = test_token_issuer();
        let audit_token: Option<std::sync::Arc<dyn agentgate_recorder::TokenSource>> =
            match config.audit.token_file {
                Some(_) => None,
                None => Some(std::sync::Arc::new(agentgate_recorder::FixedToken::new(
                    recorder_token("approvals")?,
                ))),
            };
        let running = agentgate_approvals::start(
            &config,
            data_dir.path(),
            std::sync::Arc::new(issuer.verifier()),
            audit_token,
            None,
        )
        .await?;
        Ok(ApprovalsFixture {
            running: Some(running),
            config,
            data_dir,
            issuer,
        })
    }

    /// The service's gRPC address as a URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.config.listen)
    }

    /// A token for `subject` of `kind` in `groups`.
    pub fn token(
        &self,
        subject: &str,
        kind: agentgate_proto::common::v1::PrincipalKind,
        groups: &[&str],
    ) -> anyhow::Result<String> {
        test_token(&self.issuer, subject, kind, groups)
    }

    /// A connected gRPC client (send requests with [`bearer`]).
    pub async fn client(
        &self,
    ) -> anyhow::Result<
        agentgate_proto::approvals::v1::approvals_client::ApprovalsClient<
            tonic::transport::Channel,
        >,
    > {
        Ok(
            agentgate_proto::approvals::v1::approvals_client::ApprovalsClient::connect(
                self.endpoint(),
            )
            .await?,
        )
    }

    /// The running service.
    pub fn running(&self) -> anyhow::Result<&agentgate_approvals::RunningApprovals> {
        self.running
            .as_ref()
            .context("the approvals service is stopped")
    }

    /// Stops the service (the database stays).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await?;
        }
        Ok(())
    }
}
