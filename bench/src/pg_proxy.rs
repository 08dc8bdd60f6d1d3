//! pg-proxy: `pgbench -S` through pg-proxy, side by side with Postgres directly and with
//! pgbouncer (session pooling), in one run on the same machine.
//!
//! Starts a private PostgreSQL cluster through the integration-test harness (initdb, SCRAM),
//! creates a login role `bench` owning database `bench` and initialises it with
//! `pgbench -i -s <scale>`; starts pgbouncer (`pool_mode = session`, SCRAM for clients and
//! for the server; as the `postgres` user under root, since pgbouncer refuses to run as
//! root); and starts agentgate as a deployment runs it: the audit store as its own process
//! (`agentgate-audit-store`, Postgres backend by default, on a second private cluster; both
//! at `--audit-nice`, see below), and in this process authz with connection
//! `benchdb` and a Cedar policy that lets group `agents` connect as role `read`, allows every
//! statement and carries masking rules (a column rule on `public.pgbench_accounts.filler`
//! and the `email` detector), approvals, and pg-proxy with its recorder. Every statement
//! through the proxy is classified, decided by the session's policy, its result masked, and
//! recorded (spooled, then shipped to the audit store).
//!
//! Then, for every `--modes` × `--clients`, it runs
//! `pgbench -n -S -T <duration> -c N -j min(N,2) -M <mode>` against the three targets in
//! turn (direct, pgbouncer, pg-proxy: interleaved, so drift of the machine hits all three
//! alike) and prints TPS, the ratios, and the latency each middle layer adds per query
//! (pgbench's average latency minus the direct one). For the two middle layers it also
//! prints the CPU time they used per query (pgbouncer's process; this whole process for
//! agentgate, which holds the proxy, authz, approvals and the recorder; and the audit store's
//! process on its own).
//!
//! In a deployment the audit store and its database run on other machines than the proxy;
//! here all share two cores. `--audit-nice 10` (the default) runs the store and its cluster
//! at a lower priority, standing in for that: they take the CPU the data path leaves, and
//! catch up after the run (the last column says when). `--audit-nice 0` makes them compete
//! with the data path as equals.
//!
//! Recording ships behind the statements (spool, then batches to the audit store), so after
//! each pg-proxy run the bench waits until the audit store holds every statement sent through
//! the proxy so far, prints how long that took, and only then starts the next run: no run
//! pays for shipping an earlier one's events. pg-proxy's CPU per query counts until then, so
//! it is the whole cost of a query: relay, classification, policy, masking and recording.
//!
//! `cargo build --release -p agentgate-audit-store -p agentgate-bench &&
//! target/release/pg-proxy --duration 10`

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentgate_authz::{AuthzConfig, ConnectionConfig, RunningAuthz, UpstreamConfig};
use agentgate_identity::TokenRequest;
use agentgate_integration_tests::{Postgres, free_port};
use agentgate_proto::common::v1::PrincipalKind;
use anyhow::{Context as _, bail, ensure};
use clap::{Parser, ValueEnum};
use sqlx::Connection as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    Direct,
    Pgbouncer,
    PgProxy,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Pgbouncer => "pgbouncer",
            TargetKind::PgProxy => "pg-proxy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuditBackend {
    Postgres,
    Sqlite,
}

/// pgbench -S directly, through pgbouncer and through pg-proxy; TPS, ratios, added latency.
#[derive(Debug, Parser)]
#[command(name = "pg-proxy")]
struct Args {
    /// Seconds each pgbench run measures (`pgbench -T`).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Client counts (`pgbench -c`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Query modes (`pgbench -M`), comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "simple,extended,prepared"
    )]
    modes: Vec<Mode>,
    /// Targets measured, comma-separated (the ratios need all three).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,pgbouncer,pg-proxy"
    )]
    targets: Vec<TargetKind>,
    /// pgbench scale factor (`pgbench -i -s`): 100,000 accounts per unit.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Runs of each cell; the table shows the run with the median TPS.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seconds of pgbench against each target before measuring (caches, connections).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// The audit store's database.
    #[arg(long, value_enum, default_value = "postgres")]
    audit_backend: AuditBackend,
    /// Niceness of the audit store's process and its database cluster (0: the same
    /// priority as the data path; see the module documentation).
    #[arg(long, default_value_t = 10)]
    audit_nice: i32,
    /// The pgbouncer executable.
    #[arg(long, default_value = "pgbouncer")]
    pgbouncer: String,
    /// pg-proxy's `spool_sync_interval` (e.g. `2ms`, the default, or `10ms`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2ms")]
    spool_sync_interval: Duration,
}

const POLICY: &str = r#"
@id("bench-connect")
permit (principal in Agentgate::Group::"agents", action == Agentgate::Action::"connect", resource == Agentgate::Connection::"benchdb")
when { context.role == "read" };

@id("execute-all")
permit (principal, action == Agentgate::Action::"execute", resource);

@id("filler")
@mask("column:public.pgbench_accounts.filler")
@strategy("redact")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);

@id("emails")
@mask("detector:email")
@strategy("redact")
forbid (principal, action == Agentgate::Action::"read_unmasked", resource);
"#;

/// The database role pgbench uses directly and through pgbouncer, and pg-proxy upstream.
const DB_USER: &str = "bench";
const DB_NAME: &str = "bench";
/// The catalog connection and role agents name through pg-proxy.
const CONNECTION: &str = "benchdb";
const ROLE: &str = "read";

/// Where and how pgbench connects.
struct Endpoint {
    port: u16,
    user: String,
    dbname: String,
    password: String,
}

/// One row of the table: a mode and client count, and each target's (median) run.
type Row = (Mode, usize, Vec<(TargetKind, Run)>);

/// What one pgbench run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    /// CPU seconds of the middle layer during the run, when known (for pg-proxy, until the
    /// audit store has caught up: recording's whole cost).
    cpu: Option<f64>,
    /// pg-proxy: CPU seconds of the audit store's process over the same time.
    store_cpu: Option<f64>,
    /// pg-proxy: CPU seconds of the audit store's Postgres (postmaster and every process
    /// forked from it) over the same time; with `--audit-backend sqlite`, none.
    database_cpu: Option<f64>,
    /// pg-proxy: seconds after pgbench ended until the audit store held every statement.
    catch_up: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.duration > 0, "--duration must be positive");
    ensure!(
        !args.clients.is_empty() && args.clients.iter().all(|&c| c > 0),
        "--clients must be positive numbers"
    );
    ensure!(args.rounds > 0, "--rounds must be positive");
    agentgate_tls::install_crypto_provider();

    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    eprintln!(
        "starting Postgres and initialising pgbench (scale {})",
        args.scale
    );
    let pg = Postgres::start()?;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    psql(
        &pg.url("postgres"),
        &format!("CREATE ROLE {DB_USER} LOGIN PASSWORD '{password}'"),
    )?;
    psql(
        &pg.url("postgres"),
        &format!("CREATE DATABASE {DB_NAME} OWNER {DB_USER}"),
    )?;
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", &args.scale.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            DB_USER,
            DB_NAME,
        ])
        .env("PGPASSWORD", &password)
        .stdin(Stdio::null())
        .output()
        .context("running pgbench -i (is postgresql-client installed?)")?;
    check(&init, "pgbench -i")?;

    let dir = tempfile::Builder::new()
        .prefix("agentgate-bench-")
        .tempdir()?;
    let bouncer = if args.targets.contains(&TargetKind::Pgbouncer) {
        eprintln!("starting pgbouncer");
        Some(Pgbouncer::start(
            &args.pgbouncer,
            pg.port,
            &password,
            max_clients,
        )?)
    } else {
        None
    };
    eprintln!(
        "starting the agentgate stack (audit store on {:?})",
        args.audit_backend
    );
    let stack = Stack::start(&args, &pg, &password, dir.path()).await?;

    let direct = Endpoint {
        port: pg.port,
        user: DB_USER.into(),
        dbname: DB_NAME.into(),
        password: password.clone(),
    };
    let pooled = bouncer.as_ref().map(|b| Endpoint {
        port: b.port,
        user: DB_USER.into(),
        dbname: DB_NAME.into(),
        password: password.clone(),
    });
    let proxied = Endpoint {
        port: stack.proxy.addr.port(),
        user: ROLE.into(),
        dbname: CONNECTION.into(),
        password: stack.agent_token.clone(),
    };
    tokio::task::block_in_place(|| stack.check_masking(&proxied))?;

    let endpoint = |t: TargetKind| -> Option<&Endpoint> {
        match t {
            TargetKind::Direct => Some(&direct),
            TargetKind::Pgbouncer => pooled.as_ref(),
            TargetKind::PgProxy => Some(&proxied),
        }
    };
    let cpu_of = |t: TargetKind| -> Option<f64> {
        match t {
            TargetKind::Direct => None,
            TargetKind::Pgbouncer => bouncer.as_ref().and_then(|b| process_cpu(b.pid)),
            TargetKind::PgProxy => process_cpu(std::process::id()),
        }
    };
    let store_cpu = || process_cpu(stack.audit.child.id());
    let database_cpu = || stack.audit.database_cpu();

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    // Statements sent through pg-proxy, each of which must end up in the audit store: the two
    // of the masking check, then every pgbench transaction (one SELECT each).
    let mut proxy_statements = 2u64;
    if args.warmup > 0 {
        for &t in &args.targets {
            if let Some(e) = endpoint(t) {
                eprintln!("warm-up: {} ({} s)", t.name(), args.warmup);
                let run = pgbench(e, Mode::Prepared, max_clients.min(8), args.warmup).await?;
                if t == TargetKind::PgProxy {
                    proxy_statements += run.transactions;
                    stack.catch_up(proxy_statements).await?;
                }
            }
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    let started = Instant::now();
    for &mode in &args.modes {
        for &clients in &args.clients {
            let mut rounds: Vec<Vec<(TargetKind, Run)>> = vec![Vec::new(); args.targets.len()];
            for _ in 0..args.rounds {
                for (i, &t) in args.targets.iter().enumerate() {
                    let Some(e) = endpoint(t) else { continue };
                    let cpu_before = cpu_of(t);
                    let store_before = store_cpu();
                    let database_before = database_cpu();
                    let mut run = pgbench(e, mode, clients, args.duration).await?;
                    if t == TargetKind::PgProxy {
                        // Recording ships behind the statements: the next run starts only
                        // when the store has caught up, so it does not pay for this one.
                        proxy_statements += run.transactions;
                        run.catch_up = Some(stack.catch_up(proxy_statements).await?);
                    }
                    run.cpu = spent(cpu_before, cpu_of(t));
                    if t == TargetKind::PgProxy {
                        run.store_cpu = spent(store_before, store_cpu());
                        run.database_cpu = spent(database_before, database_cpu());
                    }
                    eprintln!(
                        "-M {:<8} -c {:>2}  {:<9}  {:>9.0} tps  {:.3} ms{}{}{}{}",
                        mode.name(),
                        clients,
                        t.name(),
                        run.tps,
                        run.latency_ms,
                        run.cpu
                            .map(|c| format!(
                                "  {:.1} µs CPU/query",
                                c * 1e6 / run.transactions.max(1) as f64
                            ))
                            .unwrap_or_default(),
                        run.store_cpu
                            .map(|c| format!(
                                "  audit store {:.1} µs CPU/query",
                                c * 1e6 / run.transactions.max(1) as f64
                            ))
                            .unwrap_or_default(),
                        run.database_cpu
                            .map(|c| format!(
                                "  its Postgres {:.1} µs CPU/query",
                                c * 1e6 / run.transactions.max(1) as f64
                            ))
                            .unwrap_or_default(),
                        run.catch_up
                            .map(|c| format!("  audit store caught up {c:.1} s later"))
                            .unwrap_or_default()
                    );
                    rounds[i].push((t, run));
                }
            }
            let medians = rounds
                .into_iter()
                .filter_map(|mut r| {
                    r.sort_by(|a, b| a.1.tps.total_cmp(&b.1.tps));
                    r.get(r.len() / 2).copied()
                })
                .collect();
            rows.push((mode, clients, medians));
        }
    }
    let wall = started.elapsed();

    let stored = stack.stored_events().await?;

    print_report(&args, &rows, &load, wall, bouncer.as_ref());
    println!();
    if args.targets.contains(&TargetKind::PgProxy) {
        println!(
            "Audit store ({:?}, nice {}): {stored} session.query events stored for {proxy_statements} statements sent through pg-proxy (warm-up included).",
            args.audit_backend, args.audit_nice
        );
        ensure!(
            stored >= proxy_statements,
            "the audit store holds fewer query events than statements ran through the proxy"
        );
    }
    drop(bouncer);
    stack.shutdown().await;
    Ok(())
}

fn print_report(
    args: &Args,
    rows: &[Row],
    load: &str,
    wall: Duration,
    bouncer: Option<&Pgbouncer>,
) {
    println!(
        "pgbench -n -S -T {} -j min(c,2), scale {}, {} round(s) per cell (median TPS), {:.0} s in all",
        args.duration,
        args.scale,
        args.rounds,
        wall.as_secs_f64()
    );
    println!(
        "machine: {} cores, {}; load average before: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model(),
        load.trim()
    );
    println!(
        "versions: {}; {}",
        first_line(Command::new("pgbench").arg("--version").output().ok()),
        bouncer
            .map(|b| first_line(Command::new(&b.exe).arg("--version").output().ok()))
            .unwrap_or_else(|| "pgbouncer not run".into())
    );
    println!();
    println!(
        "| mode | clients | direct TPS | pgbouncer TPS | pg-proxy TPS | proxy/pgbouncer | proxy/direct | added latency pgbouncer (ms) | added latency pg-proxy (ms) | CPU/query pgbouncer (µs) | CPU/query agentgate (µs) | CPU/query audit store (µs) | CPU/query audit store's Postgres (µs) | audit store caught up after (s) |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (mode, clients, runs) in rows {
        let get = |t: TargetKind| runs.iter().find(|(k, _)| *k == t).map(|(_, r)| *r);
        let (d, b, p) = (
            get(TargetKind::Direct),
            get(TargetKind::Pgbouncer),
            get(TargetKind::PgProxy),
        );
        let tps = |r: Option<Run>| r.map(|r| group(r.tps)).unwrap_or_else(|| "–".into());
        let ratio = |a: Option<Run>, b: Option<Run>| match (a, b) {
            (Some(a), Some(b)) if b.tps > 0.0 => format!("{:.2}", a.tps / b.tps),
            _ => "–".into(),
        };
        let added = |a: Option<Run>| match (a, d) {
            (Some(a), Some(d)) => format!("{:+.3}", a.latency_ms - d.latency_ms),
            _ => "–".into(),
        };
        // µs per query of one of a run's CPU readings.
        let per_query = |r: Option<Run>, cpu: fn(&Run) -> Option<f64>| match r {
            Some(r) if r.transactions > 0 => cpu(&r)
                .map(|c| format!("{:.0}", c * 1e6 / r.transactions as f64))
                .unwrap_or_else(|| "–".into()),
            _ => "–".into(),
        };
        let bold = match ratio(p, b).parse::<f64>() {
            Ok(x) if x >= 1.0 => format!("**{}**", ratio(p, b)),
            _ => ratio(p, b),
        };
        let caught_up = p
            .and_then(|r| r.catch_up)
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(|| "–".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.name(),
            clients,
            tps(d),
            tps(b),
            tps(p),
            bold,
            ratio(p, d),
            added(b),
            added(p),
            per_query(b, |r| r.cpu),
            per_query(p, |r| r.cpu),
            per_query(p, |r| r.store_cpu),
            per_query(p, |r| r.database_cpu),
            caught_up,
        );
    }
}

/// One pgbench run; TPS (without connection time) and average latency from its output.
async fn pgbench(e: &Endpoint, mode: Mode, clients: usize, seconds: u64) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args(["-n", "-S", "-M", mode.name()])
        .args(["-T", &seconds.to_string()])
        .args(["-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string()])
        .args(["-h", "127.0.0.1", "-p", &e.port.to_string()])
        .args(["-U", &e.user, &e.dbname])
        .env("PGPASSWORD", &e.password)
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null());
    let out = cmd.output().await.context("running pgbench")?;
    let what = format!("pgbench -M {} -c {clients} on port {}", mode.name(), e.port);
    check(&out, &what)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.parse().ok())
    };
    let tps = field("tps =").with_context(|| format!("{what}: no tps in\n{text}"))?;
    let latency_ms =
        field("latency average =").with_context(|| format!("{what}: no latency in\n{text}"))?;
    let transactions = field("number of transactions actually processed:")
        .with_context(|| format!("{what}: no transaction count in\n{text}"))?
        as u64;
    if let Some(failed) = field("number of failed transactions:") {
        ensure!(
            failed == 0.0,
            "{what}: {failed} failed transactions\n{text}"
        );
    }
    Ok(Run {
        tps,
        latency_ms,
        transactions,
        cpu: None,
        store_cpu: None,
        database_cpu: None,
        catch_up: None,
    })
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    check(&out, "psql")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}

fn check(out: &Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// pgbouncer

/// pgbouncer in session pooling mode in front of the private cluster, stopped on drop.
struct Pgbouncer {
    port: u16,
    pid: u32,
    exe: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    fn start(exe: &str, pg_port: u16, password: &str, clients: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("agentgate-pgbouncer-")
            .tempdir()?;
        let port = free_port()?;
        let d = dir.path().display();
        // Enough server connections that no client ever waits for one.
        let pool = clients.max(40);
        let ini = format!(
            "[databases]\n\
             {DB_NAME} = host=127.0.0.1 port={pg_port} dbname={DB_NAME}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {d}/userlist.txt\n\
             pool_mode = session\n\
             max_client_conn = {}\n\
             default_pool_size = {pool}\n\
             max_db_connections = 0\n\
             logfile = {d}/pgbouncer.log\n\
             pidfile = {d}/pgbouncer.pid\n\
             ignore_startup_parameters = extra_float_digits\n",
            (clients * 2).max(64),
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), ini)?;
        // The plain password: pgbouncer runs SCRAM with the client and with the server.
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!("\"{DB_USER}\" \"{password}\"\n"),
        )?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let ini = dir.path().join("pgbouncer.ini");
        let mut cmd = if root {
            // pgbouncer refuses to run as root.
            let status = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir.path())
                .status()?;
            ensure!(status.success(), "chown postgres {}", dir.path().display());
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", exe]);
            c
        } else {
            Command::new(exe)
        };
        let child = cmd
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {exe} (install it: apt-get install -y pgbouncer)")
            })?;
        let mut bouncer = Pgbouncer {
            port,
            pid: 0,
            exe: exe.to_owned(),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = bouncer.child.try_wait()? {
                let log = std::fs::read_to_string(bouncer._dir.path().join("pgbouncer.log"))
                    .unwrap_or_default();
                bail!("pgbouncer exited ({status}): {log}");
            }
            let pid = std::fs::read_to_string(bouncer._dir.path().join("pgbouncer.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid
                && TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
            {
                bouncer.pid = pid;
                return Ok(bouncer);
            }
            ensure!(
                Instant::now() < deadline,
                "pgbouncer did not start listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // SIGTERM to pgbouncer itself (runuser, if any, then exits with it).
        terminate(&mut self.child, (self.pid != 0).then_some(self.pid));
    }
}

/// A process's parent and its utime + stime in seconds, from `/proc/PID/stat`.
fn process_stat(pid: u32) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let parent: u32 = f.get(1)?.parse().ok()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((parent, (utime + stime) / clock_ticks()))
}

/// utime + stime of a process, in seconds.
fn process_cpu(pid: u32) -> Option<f64> {
    process_stat(pid).map(|(_, cpu)| cpu)
}

/// CPU seconds spent between two readings, when both were taken.
fn spent(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn first_line(out: Option<Output>) -> String {
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    })
    .unwrap_or_default()
}

/// 12345.6 → "12,346".
fn group(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// agentgate

/// authz, approvals and pg-proxy in this process, as `agentgate up` runs them, and the audit
/// store in its own.
struct Stack {
    audit: AuditProcess,
    authz: RunningAuthz,
    approvals: agentgate_approvals::RunningApprovals,
    proxy: agentgate_pg_proxy::RunningPgProxy,
    agent_token: String,
    /// (last chain sequence counted, session.query events up to it)
    counted: std::sync::Mutex<(i64, u64)>,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(
        args: &Args,
        pg: &Postgres,
        password: &str,
        scratch: &Path,
    ) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new()
            .prefix("agentgate-stack-")
            .tempdir_in(scratch)?;
        // authz first: the store verifies tokens with the public key authz writes. Until the
        // store listens, authz's recorder keeps its events in its spool.
        let audit_port = free_port()?;
        let audit_endpoint = format!("http://127.0.0.1:{audit_port}");
        let policy = dir.path().join("policy.cedar");
        std::fs::write(&policy, POLICY)?;
        let secret = dir.path().join("bench.secret");
        std::fs::write(&secret, format!("{password}\n"))?;
        let approvals_port = free_port()?;
        let config = AuthzConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            policy: Some(policy),
            audit_url: Some(audit_endpoint.clone()),
            approvals_url: Some(format!("http://127.0.0.1:{approvals_port}")),
            connections: vec![ConnectionConfig {
                name: CONNECTION.into(),
                protocol: "postgres".into(),
                upstream: format!("127.0.0.1:{}", pg.port),
                roles: [(
                    ROLE.to_string(),
                    UpstreamConfig {
                        user: DB_USER.into(),
                        secret: Some(format!("file:{}", secret.display())),
                    },
                )]
                .into_iter()
                .collect(),
                settings: [("database".to_string(), DB_NAME.to_string())]
                    .into_iter()
                    .collect(),
            }],
            ..Default::default()
        };
        let authz = agentgate_authz::start(&config, dir.path()).await?;
        let audit = AuditProcess::start(args, dir.path(), audit_port).await?;
        let approvals_config = agentgate_approvals::ApprovalsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], approvals_port)),
            require_reason: false,
            audit: agentgate_approvals::config::AuditConfig {
                endpoint: audit_endpoint.clone(),
                ..Default::default()
            },
            ..Default::default()
        };
        let approvals = agentgate_approvals::start(
            &approvals_config,
            dir.path(),
            authz.authenticator(),
            Some(authz.recorder_token_source("approvals")),
            None,
        )
        .await?;
        let service_token = authz.service_token("pg-proxy", Duration::from_secs(24 * 3600))?;
        let token_file = dir.path().join("pg-proxy.token");
        std::fs::write(&token_file, &service_token)?;
        let proxy_config = agentgate_pg_proxy::PgProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            authz_url: format!("http://{}", authz.addr),
            approvals_url: format!("http://127.0.0.1:{approvals_port}"),
            audit_url: audit_endpoint,
            service_token_file: Some(token_file),
            spool_sync_interval: args.spool_sync_interval,
            ..Default::default()
        };
        let gateway = agentgate_pg_proxy::gateway_from_config(&proxy_config, dir.path()).await?;
        let proxy = agentgate_pg_proxy::start(&proxy_config, gateway).await?;
        let (agent_token, _) = authz.core.issuer.issue(&TokenRequest {
            subject: "agent:bench".into(),
            kind: PrincipalKind::Agent,
            groups: vec!["agents".into()],
            audience: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
        })?;
        Ok(Stack {
            audit,
            authz,
            approvals,
            proxy,
            agent_token,
            counted: std::sync::Mutex::new((0, 0)),
            _dir: dir,
        })
    }

    /// Makes sure the masking rules are in force through the proxy (the column rule and the
    /// detector), so the figures are those of a proxy that masks.
    fn check_masking(&self, e: &Endpoint) -> anyhow::Result<()> {
        let url = format!(
            "host=127.0.0.1 port={} user={} dbname={} password={} sslmode=disable",
            e.port, e.user, e.dbname, e.password
        );
        let filler = psql(&url, "SELECT filler FROM pgbench_accounts WHERE aid = 1")?;
        ensure!(
            !filler.trim().is_empty(),
            "pgbench_accounts.filler came through unmasked: {filler:?}"
        );
        let email = psql(&url, "SELECT 'someone@example.com'::text")?;
        ensure!(
            !email.contains("someone@example.com"),
            "an e-mail address came through unmasked: {email:?}"
        );
        eprintln!("masking is on: filler -> {filler:?}, e-mail -> {email:?}");
        Ok(())
    }

    /// `session.query` events in the audit store.
    async fn stored_events(&self) -> anyhow::Result<u64> {
        // Counted incrementally over the chain (one writer appends in chain order), so that
        // polling stays cheap as the log grows.
        let (after, counted) = *self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let url = &self.audit.database_url;
        let sql = |p: &str| {
            format!(
                "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'session.query' THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 COALESCE(MAX(chain_sequence), {p}) FROM audit_events WHERE chain_sequence > {p}"
            )
        };
        let (n, last): (i64, i64) = if url.starts_with("sqlite://") {
            let mut conn = sqlx::SqliteConnection::connect(url).await?;
            sqlx::query_as(sqlx::AssertSqlSafe(sql("?1")))
                .bind(after)
                .fetch_one(&mut conn)
                .await?
        } else {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query_as(sqlx::AssertSqlSafe(sql("$1")))
                .bind(after)
                .fetch_one(&mut conn)
                .await?
        };
        let total = counted + n as u64;
        *self.counted.lock().unwrap_or_else(|p| p.into_inner()) = (last, total);
        Ok(total)
    }

    /// Waits until the audit store holds at least `statements` query events; returns how
    /// long that took.
    async fn catch_up(&self, statements: u64) -> anyhow::Result<f64> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        loop {
            if self.stored_events().await? >= statements {
                return Ok(started.elapsed().as_secs_f64());
            }
            ensure!(
                Instant::now() < deadline,
                "the audit store did not catch up with pg-proxy within 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn shutdown(self) {
        self.proxy.shutdown().await;
        let _ = self.approvals.shutdown().await;
        let _ = self.authz.shutdown().await;
        drop(self.audit);
    }
}

/// The audit store as its own process (`agentgate-audit-store`, built next to this binary),
/// on a private cluster of its own (or SQLite), both at `--audit-nice`.
struct AuditProcess {
    child: Child,
    database_url: String,
    postgres: Option<Postgres>,
    _dir: tempfile::TempDir,
}

impl AuditProcess {
    /// CPU seconds so far of the audit store's Postgres, with every live process it forked
    /// (backends, WAL writer, checkpointer): recording's cost in the database. The store
    /// keeps its connections open, so no backend's time leaves with it during a run.
    fn database_cpu(&self) -> Option<f64> {
        let pid = self.postgres.as_ref()?.postmaster_pid().ok()?;
        let mut total = process_cpu(pid)?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let child = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok());
            if let Some((parent, cpu)) = child.and_then(process_stat)
                && parent == pid
            {
                total += cpu;
            }
        }
        Some(total)
    }

    async fn start(args: &Args, authz_dir: &Path, port: u16) -> anyhow::Result<AuditProcess> {
        let exe = std::env::current_exe()?;
        let bin = exe
            .parent()
            .map(|d| d.join("agentgate-audit-store"))
            .filter(|p| p.exists())
            .context("agentgate-audit-store is not built next to this binary: cargo build --release -p agentgate-audit-store")?;
        let dir = tempfile::Builder::new()
            .prefix("agentgate-audit-")
            .tempdir()?;
        let (database_url, postgres) = match args.audit_backend {
            AuditBackend::Postgres => {
                let pg = Postgres::start()?;
                // Backends fork from the postmaster after this and inherit its priority.
                renice(pg.postmaster_pid()?, args.audit_nice)?;
                let url = pg.create_database("audit").await?;
                (url, Some(pg))
            }
            AuditBackend::Sqlite => (
                format!("sqlite://{}", dir.path().join("audit.db").display()),
                None,
            ),
        };
        let config = dir.path().join("audit-store.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n\n[audit_store]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = {database_url:?}\n\n[audit_store.auth]\npublic_keys = [{key:?}]\n",
                data = dir.path().display().to_string(),
                key = authz_dir
                    .join(agentgate_authz::PUBLIC_KEY_FILE)
                    .display()
                    .to_string(),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("audit-store.log"))?;
        let mut child = Command::new("nice")
            .args(["-n", &args.audit_nice.to_string()])
            .arg(&bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting agentgate-audit-store")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.path().join("audit-store.log")).unwrap_or_default();
                bail!("agentgate-audit-store exited ({status}): {log}");
            }
            ensure!(
                Instant::now() < deadline,
                "agentgate-audit-store did not listen within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(AuditProcess {
            child,
            database_url,
            postgres,
            _dir: dir,
        })
    }
}

impl Drop for AuditProcess {
    fn drop(&mut self) {
        let pid = self.child.id();
        terminate(&mut self.child, Some(pid));
    }
}

/// Stops a child: SIGTERM to `pid` (the process that serves, which may be the child's own
/// child), up to 5 s for the child to exit, then SIGKILL.
fn terminate(child: &mut Child, pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sets a process's niceness (`renice`).
fn renice(pid: u32, nice: i32) -> anyhow::Result<()> {
    let out = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
        .output()
        .context("running renice")?;
    check(&out, "renice")
}
