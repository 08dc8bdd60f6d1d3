//! audit-ingest: how many audit events per second the audit store takes in.
//!
//! Starts a private PostgreSQL cluster through the integration-test harness (or uses
//! `--database-url`), or an SQLite file with `--backend sqlite`; starts the audit store
//! in-process on a free loopback port; then runs `--clients` concurrent gRPC clients, each
//! with one Ingest stream on its own HTTP/2 connection, pipelining batches (`--batch`
//! events, up to `--in-flight` unacknowledged) of realistic `session.query` events.
//!
//! Each client first sends its share of `--warmup` events and waits for every ack; when all
//! clients are warm they start together. Throughput is the measured events divided by the
//! wall time from the first measured send to the last measured ack. Batch latency is send
//! to ack of each measured batch (it includes the time queued behind the batches in flight).
//! At the end the store's Verify must pass and the rows stored must equal the events sent.
//!
//! The store checks tokens as in production: each client presents a recorder's service
//! token (checked once, when its stream opens), Verify an admin's; all are signed by the
//! test issuer of the integration-test harness, which the store trusts here.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentgate_audit_store::{AuditStoreConfig, RunningAuditStore};
use agentgate_identity::BearerInterceptor;
use agentgate_integration_tests::{
    AuditClient, AuditStoreFixture, Backend, audit_client, audit_superuser_token, free_port,
    recorder_token, test_token_issuer,
};
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::audit_store_client::AuditStoreClient;
use agentgate_proto::audit::v1::{AuditEvent, IngestRequest, OperationRecord, VerifyRequest};
use agentgate_proto::common::v1::{Decision, Operation, Principal, PrincipalKind, Protocol};
use anyhow::{Context as _, bail, ensure};
use clap::{Parser, ValueEnum};
use sqlx::Connection as _;
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Postgres,
    Sqlite,
}

/// Streams audit events from concurrent clients into the audit store and reports events/s.
#[derive(Debug, Parser)]
#[command(name = "audit-ingest")]
struct Args {
    /// Storage backend of the store under test.
    #[arg(long, value_enum, default_value = "postgres")]
    backend: BackendArg,
    /// An existing Postgres database to use instead of a private cluster (postgres://…).
    /// Its events before the run are left alone; counts are taken as differences.
    #[arg(long, env = "AUDIT_INGEST_DATABASE_URL")]
    database_url: Option<String>,
    /// The store's data directory (its signing key) with `--database-url`; a fresh temporary
    /// one when unset. A database that already holds checkpoints needs the key that signed them.
    #[arg(long, requires = "database_url")]
    data_dir: Option<std::path::PathBuf>,
    /// Concurrent clients, each with one Ingest stream on its own connection.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events measured, in total over all clients.
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Events sent before measuring, in total over all clients.
    #[arg(long, default_value_t = 50_000)]
    warmup: u64,
    /// Events per Ingest batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Batches a client sends before it waits for the oldest ack.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Concurrent sessions per client; a batch takes events from all of them in turn.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// The store signs a checkpoint every this many events (the store's default is 1000).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Give up (non-zero exit) when the whole run takes longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// What one client measured.
struct ClientReport {
    started: Instant,
    finished: Instant,
    events: u64,
    stored: u64,
    duplicates: u64,
    gaps: u64,
    latencies: Vec<Duration>,
}

/// The store under test, with whatever keeps its database alive.
struct Target {
    running: Option<RunningAuditStore>,
    endpoint: String,
    database_url: String,
    /// Keeps the private cluster and data directory until the end.
    _fixture: Option<AuditStoreFixture>,
    _data_dir: Option<tempfile::TempDir>,
    backend: &'static str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.clients > 0 && args.batch > 0 && args.in_flight > 0 && args.sessions > 0,
        "counts must be positive"
    );
    ensure!(args.events > 0, "--events must be positive");
    let limit = Duration::from_secs(args.timeout_secs);
    match tokio::time::timeout(limit, run(&args)).await {
        Ok(result) => result,
        Err(_) => bail!(
            "audit-ingest: the run took longer than {}s (--timeout-secs)",
            args.timeout_secs
        ),
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let mut target = start_target(args).await?;
    let settings = database_settings(&target.database_url).await?;
    let before = count_events(&target.database_url).await?;
    let postmaster = postmaster_pid(&target.database_url).await;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Each client opens its own HTTP/2 connection, as separate proxies would.
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let channel = Channel::from_shared(target.endpoint.clone())?
            .connect()
            .await
            .with_context(|| format!("connecting to the audit store at {}", target.endpoint))?;
        let token = BearerInterceptor::new(&recorder_token(&format!("bench-proxy-{i}"))?)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        clients.push(
            AuditStoreClient::with_interceptor(channel, token)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        );
    }

    // The clients and this task: CPU counters are read when every client is warm.
    let barrier = Arc::new(Barrier::new(args.clients + 1));
    let mut tasks = Vec::with_capacity(args.clients);
    for (i, client) in clients.into_iter().enumerate() {
        let share = |total: u64| {
            total / args.clients as u64 + u64::from((i as u64) < total % args.clients as u64)
        };
        let plan = ClientPlan {
            index: i,
            warmup: share(args.warmup),
            events: share(args.events),
            batch: args.batch,
            in_flight: args.in_flight,
            sessions: args.sessions,
        };
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            run_client(client, plan, barrier).await
        }));
    }
    let cpu_before = tokio::select! {
        _ = barrier.wait() => CpuSample::take(postmaster),
        // A client that fails during warm-up never reaches the barrier.
        Some(failed) = first_failure(&mut tasks) => return Err(failed),
    };
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        reports.push(t.await.context("client task")??);
    }
    let cpu = CpuSample::take(postmaster).since(&cpu_before);

    let started = reports
        .iter()
        .map(|r| r.started)
        .min()
        .context("no clients")?;
    let finished = reports
        .iter()
        .map(|r| r.finished)
        .max()
        .context("no clients")?;
    let wall = finished - started;
    let measured: u64 = reports.iter().map(|r| r.events).sum();
    let stored: u64 = reports.iter().map(|r| r.stored).sum();
    let duplicates: u64 = reports.iter().map(|r| r.duplicates).sum();
    let gaps: u64 = reports.iter().map(|r| r.gaps).sum();
    let mut latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort();
    let rate = measured as f64 / wall.as_secs_f64();

    // Correctness: every event stored once, and the chain verifies.
    let verify_started = Instant::now();
    let mut client = audit_client(&target.endpoint, &audit_superuser_token()?).await?;
    let verify = client.verify(VerifyRequest {}).await?.into_inner();
    let verify_time = verify_started.elapsed();
    let after = count_events(&target.database_url).await?;
    let sent = measured + args.warmup;
    let rows = after - before;

    println!();
    println!("audit-ingest: {} backend, {settings}", target.backend);
    println!(
        "  {} clients x 1 Ingest stream, {} events/batch, {} batches in flight, {} sessions/client, checkpoint every {} events",
        args.clients, args.batch, args.in_flight, args.sessions, args.checkpoint_every
    );
    println!(
        "  warm-up {} events, then {} measured events",
        args.warmup, measured
    );
    println!();
    println!(
        "| backend  | clients | events  | wall (s) | events/s | batch ack p50 (ms) | batch ack p99 (ms) |"
    );
    println!(
        "|----------|---------|---------|----------|----------|--------------------|--------------------|"
    );
    println!(
        "| {:<8} | {:>7} | {:>7} | {:>8.2} | {:>8.0} | {:>18.1} | {:>18.1} |",
        target.backend,
        args.clients,
        measured,
        wall.as_secs_f64(),
        rate,
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
    );
    println!();
    println!(
        "  CPU while measuring (2 cores = {:.0} core-s): this process (clients + store) {:.1} core-s, \
         Postgres cluster {}, whole machine {:.1} core-s busy; load average before: {}",
        wall.as_secs_f64() * cpu.cores as f64,
        cpu.process,
        match cpu.postgres {
            Some(pg) => format!("{pg:.1} core-s"),
            None => "n/a".into(),
        },
        cpu.machine_busy,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!(
        "  acks: {stored} stored, {duplicates} duplicates, {gaps} gaps (warm-up included: {sent} sent); rows added: {rows}"
    );
    println!(
        "  verify: ok={} events_checked={} checkpoints_checked={} unsigned_tail={} in {:.2}s{}",
        verify.ok,
        verify.events_checked,
        verify.checkpoints_checked,
        verify.unsigned_tail,
        verify_time.as_secs_f64(),
        if verify.ok {
            String::new()
        } else {
            format!(" error: {}", verify.error)
        }
    );

    if let Some(running) = target.running.take() {
        running.shutdown().await?;
    }
    ensure!(
        verify.ok,
        "Verify failed at {}: {}",
        verify.first_bad_sequence,
        verify.error
    );
    ensure!(
        stored == sent && duplicates == 0 && gaps == 0,
        "acks say {stored} stored, {duplicates} duplicates, {gaps} gaps of {sent} sent"
    );
    ensure!(
        rows == sent,
        "the database holds {rows} new events, {sent} were sent"
    );
    ensure!(
        verify.events_checked >= sent,
        "Verify checked {} events, fewer than the {sent} sent",
        verify.events_checked
    );
    Ok(())
}

async fn start_target(args: &Args) -> anyhow::Result<Target> {
    match (args.backend, &args.database_url) {
        (BackendArg::Postgres, Some(url)) => {
            let temp = tempfile::Builder::new().prefix("audit-ingest-").tempdir()?;
            let dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| temp.path().to_owned());
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the data directory {}", dir.display()))?;
            let config = AuditStoreConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                database_url: Some(url.clone()),
                checkpoint_every: args.checkpoint_every,
                checkpoint_interval: Duration::from_secs(3600),
                ..Default::default()
            };
            let auth = Arc::new(test_token_issuer().verifier());
            let running = agentgate_audit_store::start(&config, &dir, auth, None).await?;
            Ok(Target {
                endpoint: format!("http://{}", running.addr),
                running: Some(running),
                database_url: url.clone(),
                _fixture: None,
                _data_dir: Some(temp),
                backend: "postgres",
            })
        }
        (BackendArg::Sqlite, Some(_)) => bail!("--database-url is for --backend postgres"),
        (backend, None) => {
            let (backend, name) = match backend {
                BackendArg::Postgres => (Backend::Postgres, "postgres"),
                BackendArg::Sqlite => (Backend::Sqlite, "sqlite"),
            };
            let mut fixture = AuditStoreFixture::start(backend, args.checkpoint_every).await?;
            Ok(Target {
                endpoint: fixture.endpoint(),
                running: fixture.running.take(),
                database_url: fixture
                    .admin_url
                    .clone()
                    .unwrap_or_else(|| fixture.database_url.clone()),
                _fixture: Some(fixture),
                _data_dir: None,
                backend: name,
            })
        }
    }
}

/// The settings that decide what a commit costs, for the report.
async fn database_settings(url: &str) -> anyhow::Result<String> {
    if url.starts_with("sqlite://") {
        return Ok("SQLite file (store's own pragmas)".into());
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut parts = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut conn)
            .await?;
        parts.push(format!("{name}={value}"));
    }
    Ok(parts.join(" "))
}

/// Rows in audit_events, counted by the database itself.
async fn count_events(url: &str) -> anyhow::Result<u64> {
    let n: i64 = if url.starts_with("sqlite://") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
            .fetch_one(&mut conn)
            .await?
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
            .fetch_one(&mut conn)
            .await?
    };
    Ok(n as u64)
}

/// Waits for the first client task that ends in an error (or never, if none does).
async fn first_failure(
    tasks: &mut [tokio::task::JoinHandle<anyhow::Result<ClientReport>>],
) -> Option<anyhow::Error> {
    loop {
        for t in tasks.iter_mut() {
            if t.is_finished() {
                match t.await {
                    Err(e) => return Some(e.into()),
                    Ok(Err(e)) => return Some(e),
                    // Finished fine before the barrier: cannot happen, it waits there.
                    Ok(Ok(_)) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process id of the Postgres postmaster behind `url`, when it runs on this machine.
async fn postmaster_pid(url: &str) -> Option<u32> {
    if url.starts_with("sqlite://") {
        return None;
    }
    let mut conn = sqlx::PgConnection::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    proc_stat(backend as u32).map(|s| s.ppid)
}

/// CPU used so far, in core-seconds, from /proc (Linux; USER_HZ taken as 100).
struct CpuSample {
    process: f64,
    /// Every process of the Postgres cluster (postmaster and its children).
    postgres: Option<f64>,
    machine_busy: f64,
    cores: usize,
}

struct ProcStat {
    ppid: u32,
    cpu: f64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 4 (ppid), 14 (utime), 15 (stime) of proc(5), counted from `state` = 3.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        cpu: (utime + stime) / 100.0,
    })
}

impl CpuSample {
    fn take(postmaster: Option<u32>) -> CpuSample {
        let process = proc_stat(std::process::id()).map(|s| s.cpu).unwrap_or(0.0);
        let postgres = postmaster.map(|pm| {
            let children: f64 = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(proc_stat)
                .filter(|s| s.ppid == pm)
                .map(|s| s.cpu)
                .sum();
            children + proc_stat(pm).map(|s| s.cpu).unwrap_or(0.0)
        });
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cores = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
            .max(1);
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
        let total: f64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
        CpuSample {
            process,
            postgres,
            machine_busy: (total - idle) / 100.0,
            cores,
        }
    }

    fn since(&self, before: &CpuSample) -> CpuSample {
        CpuSample {
            process: self.process - before.process,
            postgres: self.postgres.zip(before.postgres).map(|(a, b)| a - b),
            machine_busy: self.machine_busy - before.machine_busy,
            cores: self.cores,
        }
    }
}

struct ClientPlan {
    index: usize,
    warmup: u64,
    events: u64,
    batch: usize,
    in_flight: usize,
    sessions: usize,
}

/// Makes the events of one client: `sessions` sessions, each numbered 1.., in turn.
struct EventSource {
    client: usize,
    sessions: Vec<(String, u64)>,
    next: usize,
}

impl EventSource {
    fn new(client: usize, sessions: usize) -> Self {
        EventSource {
            client,
            sessions: (0..sessions)
                .map(|_| (uuid::Uuid::new_v4().to_string(), 0))
                .collect(),
            next: 0,
        }
    }

    fn event(&mut self) -> AuditEvent {
        let slot = self.next;
        self.next = (self.next + 1) % self.sessions.len();
        let (id, seq) = &mut self.sessions[slot];
        *seq += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let time = prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: (now.subsec_micros() * 1000) as i32,
        };
        let order = *seq * 7919 % 1_000_000;
        // About 100 bytes of SQL, different for every event.
        let text = format!(
            "SELECT id, customer_id, status, total FROM public.orders WHERE customer_id = {order} AND status = 'open' LIMIT 50"
        );
        AuditEvent {
            session_id: id.clone(),
            sequence: *seq,
            time: Some(time),
            kind: "session.query".into(),
            principal: Some(Principal {
                subject: format!("agent:bench-{}", self.client),
                kind: PrincipalKind::Agent as i32,
                groups: vec!["agents".into()],
                issuer: "agentgate".into(),
                token_id: format!("tok-{}-{slot}", self.client),
            }),
            source_address: format!("10.0.{}.{}:5{:04}", self.client, slot % 250 + 1, slot),
            connection: "orders-db".into(),
            protocol: Protocol::Postgres as i32,
            role: "readonly".into(),
            detail: Some(Detail::Operation(OperationRecord {
                operation: Some(Operation {
                    protocol: Protocol::Postgres as i32,
                    action: "select".into(),
                    text,
                    targets: vec!["public.orders".into()],
                    risk_classes: Vec::new(),
                    attributes: Default::default(),
                }),
                decision: Decision::Allow as i32,
                reason: "policy readonly allows select".into(),
                approval_id: String::new(),
                parameters: Vec::new(),
                started_at: Some(time),
                duration_us: 250 + order % 1000,
                rows: order % 50,
                bytes: 1200 + order % 4000,
                error: String::new(),
                masked: Vec::new(),
                status: "00000".into(),
            })),
            attributes: Default::default(),
        }
    }
}

/// One client: one Ingest stream; warm-up, wait for every client, then the measured run.
async fn run_client(
    mut client: AuditClient,
    plan: ClientPlan,
    barrier: Arc<Barrier>,
) -> anyhow::Result<ClientReport> {
    let (tx, rx) = mpsc::channel::<IngestRequest>(plan.in_flight);
    let mut acks = client
        .ingest(ReceiverStream::new(rx))
        .await
        .context("opening the Ingest stream")?
        .into_inner();
    let mut source = EventSource::new(plan.index, plan.sessions);
    let mut batch_id = 0u64;
    let mut stream = Stream {
        tx: &tx,
        acks: &mut acks,
        source: &mut source,
        batch_id: &mut batch_id,
        batch: plan.batch,
        in_flight: plan.in_flight,
    };

    let mut warm = Phase::default();
    stream.send_events(plan.warmup, &mut warm).await?;
    barrier.wait().await;
    let started = Instant::now();
    let mut measured = Phase::default();
    stream.send_events(plan.events, &mut measured).await?;
    let finished = Instant::now();
    drop(tx);
    // The server ends the stream once the client's side is closed and every ack is sent.
    while acks.message().await?.is_some() {}
    Ok(ClientReport {
        started,
        finished,
        events: plan.events,
        stored: warm.stored + measured.stored,
        duplicates: warm.duplicates + measured.duplicates,
        gaps: warm.gaps + measured.gaps,
        latencies: measured.latencies,
    })
}

#[derive(Default)]
struct Phase {
    stored: u64,
    duplicates: u64,
    gaps: u64,
    latencies: Vec<Duration>,
}

struct Stream<'a> {
    tx: &'a mpsc::Sender<IngestRequest>,
    acks: &'a mut tonic::Streaming<agentgate_proto::audit::v1::IngestAck>,
    source: &'a mut EventSource,
    batch_id: &'a mut u64,
    batch: usize,
    in_flight: usize,
}

impl Stream<'_> {
    /// Sends `events` in batches, keeping up to `in_flight` unacknowledged, and returns
    /// once every one of them is acknowledged.
    async fn send_events(&mut self, events: u64, phase: &mut Phase) -> anyhow::Result<()> {
        let mut left = events;
        let mut pending: VecDeque<(u64, usize, Instant)> = VecDeque::with_capacity(self.in_flight);
        while left > 0 || !pending.is_empty() {
            while left > 0 && pending.len() < self.in_flight {
                let n = left.min(self.batch as u64) as usize;
                let events: Vec<AuditEvent> = (0..n).map(|_| self.source.event()).collect();
                *self.batch_id += 1;
                let id = *self.batch_id;
                let sent = Instant::now();
                self.tx
                    .send(IngestRequest {
                        batch_id: id,
                        events,
                    })
                    .await
                    .map_err(|_| anyhow::anyhow!("the Ingest stream closed"))?;
                pending.push_back((id, n, sent));
                left -= n as u64;
            }
            let ack = self
                .acks
                .message()
                .await
                .context("Ingest stream")?
                .context("the store ended the Ingest stream early")?;
            let (id, n, sent) = pending.pop_front().context("an ack for no batch")?;
            phase.latencies.push(sent.elapsed());
            ensure!(
                ack.batch_id == id,
                "ack for batch {} where {id} was next",
                ack.batch_id
            );
            ensure!(
                u64::from(ack.stored) + u64::from(ack.duplicates) == n as u64,
                "batch {id}: {} stored + {} duplicates of {n}",
                ack.stored,
                ack.duplicates
            );
            phase.stored += u64::from(ack.stored);
            phase.duplicates += u64::from(ack.duplicates);
            phase.gaps += ack.gaps.len() as u64;
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
