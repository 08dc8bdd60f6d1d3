//! The two directions of a live session.
//!
//! The agent-side task reads the agent's messages, classifies and decides every statement,
//! holds those that need approval, and forwards; for every message that the server will
//! answer it first queues an [`Expect`], so the upstream-side task knows what each answer
//! belongs to. That task masks result cells (by the column's source table and column, or by
//! content), replaces the server's answer to a refused statement's stand-in with the refusal,
//! and records each statement when it completes. Each task reads a batch of messages per
//! system call and writes its output once per batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use agentgate_masking::{CellPlan, MaskReport, Masker};
use agentgate_pgwire::{
    Bind, Close, CommandComplete, DataRow, Describe, ErrorFields, Execute, FieldDescription, Frame,
    FrameCodec, FrameReader, Parse, Query, RowDescription, Target, build,
};
use agentgate_proto::common::v1::{Decision, Operation, Protocol};
use agentgate_session::{EndReason, OperationEvent, Session};
use agentgate_sql_classify::{Classification, Classifier, PreparedStatements};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::catalog::Catalog;
use crate::ops::{Decided, Denial, OpRecord};
use crate::stream::{ReadHalf, WriteHalf};

/// Most answers the proxy waits for at once on one connection: a client pipelining more
/// than this without reading is refused rather than letting the queue grow without bound.
const MAX_EXPECTED: usize = 100_000;
/// Most named statements and portals tracked per connection.
const MAX_NAMED: usize = 10_000;

/// What the server owes for a message the proxy forwarded.
enum Expect {
    /// ParseComplete: the server now holds `statement` under `name`. `change` numbers the
    /// message among those that change what a name denotes.
    Parse {
        change: u64,
        name: String,
        statement: Arc<PreparedStatement>,
    },
    /// BindComplete; then the portal exists, running statement `statement` (by id) with
    /// these result formats.
    Bind {
        portal: String,
        statement: u64,
        result_formats: Vec<i16>,
    },
    /// ParameterDescription, then RowDescription or NoData, for the statement of this id
    /// (`None`: the proxy knows no statement of that name, nor will the server).
    DescribeStatement(Option<u64>),
    /// RowDescription or NoData.
    DescribePortal(String),
    /// CloseComplete for a statement: the server no longer holds one under `name`.
    CloseStatement { change: u64, name: String },
    /// CloseComplete for a portal.
    ClosePortal,
    /// The rows and completion of one Execute; `sql` is its statement's text, to describe
    /// when the server has not.
    Execute {
        portal: String,
        sql: Option<Arc<str>>,
        op: Box<OpRecord>,
    },
    /// Every statement of a simple Query, then ReadyForQuery. `done` holds the statements
    /// that completed while later ones may still fail: the server runs a multi-statement
    /// Query in one implicit transaction, so their outcome is known only at ReadyForQuery.
    Query {
        ops: VecDeque<OpRecord>,
        done: Vec<OpRecord>,
    },
    /// A FunctionCall's result, then ReadyForQuery.
    FunctionCall { op: Box<OpRecord> },
    /// ReadyForQuery for a Sync.
    Sync,
}

/// The agent's connection, written by both tasks.
pub type ClientWriter = Arc<tokio::sync::Mutex<WriteHalf>>;

/// What both tasks of one session share.
pub struct Context {
    /// The authz session: policy, masker, recording, end signal.
    pub session: Session,
    /// The shared statement classifier.
    pub classifier: Arc<Classifier>,
    /// Column origins for masking, for this connection's upstream.
    pub catalog: Arc<Catalog>,
    /// Largest message accepted from the agent.
    pub max_message: usize,
    /// The agent's connection.
    pub client: ClientWriter,
    expect: Mutex<VecDeque<Expect>>,
    /// The statement waiting for approval, if any: recorded if the session ends meanwhile.
    held: Mutex<Option<OpRecord>>,
    /// The server's prepared statements by name, as its answers (ParseComplete,
    /// CloseComplete) confirmed them, in order. See [`Prepared::lookup`].
    statements: Mutex<HashMap<String, Arc<PreparedStatement>>>,
    /// Every name change up to this number has been answered (or skipped by an error).
    settled: std::sync::atomic::AtomicU64,
    settled_changed: tokio::sync::Notify,
}

impl Context {
    /// The shared state of a session about to be relayed.
    pub fn new(
        session: Session,
        classifier: Arc<Classifier>,
        catalog: Arc<Catalog>,
        max_message: usize,
        client: ClientWriter,
    ) -> Arc<Context> {
        Arc::new(Context {
            session,
            classifier,
            catalog,
            max_message,
            client,
            expect: Mutex::new(VecDeque::new()),
            held: Mutex::new(None),
            statements: Mutex::new(HashMap::new()),
            settled: std::sync::atomic::AtomicU64::new(0),
            settled_changed: tokio::sync::Notify::new(),
        })
    }

    fn push(&self, e: Expect) -> Result<(), EndReason> {
        let mut q = self
            .expect
            .lock()
            .map_err(|_| EndReason::Error("internal state poisoned".into()))?;
        if q.len() >= MAX_EXPECTED {
            return Err(EndReason::Error(format!(
                "more than {MAX_EXPECTED} messages awaiting an answer"
            )));
        }
        q.push_back(e);
        Ok(())
    }

    /// The server's statements by name. Every change under this lock is one insert or
    /// remove, so a poisoned lock is still consistent.
    fn statements(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PreparedStatement>>> {
        self.statements.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server answered (or skipped) every name change up to `change`.
    fn settle(&self, change: u64) {
        self.settled
            .fetch_max(change, std::sync::atomic::Ordering::Release);
        self.settled_changed.notify_waiters();
    }

    /// Works on the statement held for approval. Every change under this lock is a plain
    /// assignment, so a poisoned lock is still consistent.
    fn with_held(&self, f: impl FnOnce(&mut Option<OpRecord>)) {
        f(&mut self.held.lock().unwrap_or_else(|e| e.into_inner()));
    }

    async fn write_client(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.client.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    }
}

/// Why a task stopped: the session's end reason, and for a protocol error the message the
/// agent is sent before the connection closes.
pub struct Stop {
    /// The reason recorded.
    pub reason: EndReason,
    /// A final ErrorResponse for the agent, if any.
    pub notify: Option<Frame>,
}

impl Stop {
    fn quiet(reason: EndReason) -> Stop {
        Stop {
            reason,
            notify: None,
        }
    }

    fn protocol(message: String) -> Stop {
        Stop {
            notify: Some(build::error(
                "FATAL",
                agentgate_pgwire::PROTOCOL_VIOLATION,
                &message,
                None,
            )),
            reason: EndReason::Error(format!("protocol violation: {message}")),
        }
    }
}

impl From<EndReason> for Stop {
    fn from(r: EndReason) -> Stop {
        Stop::quiet(r)
    }
}

// ---------------------------------------------------------------------------------------
// agent → upstream

/// A prepared statement as Parse left it: its text, the operation policy sees and the
/// decision, made once here and reused by every Execute of it (the session's policy is fixed
/// for its life, so the decision cannot change).
struct PreparedStatement {
    /// Unique on the connection. The upstream side knows statements by id, not name: a
    /// name can be prepared again while portals bound to the old statement still run it.
    id: u64,
    sql: Arc<str>,
    operation: Arc<Operation>,
    decided: Decided,
    copy_source: Option<String>,
}

impl PreparedStatement {
    fn new(
        ctx: &Context,
        decisions: &mut Decisions,
        id: u64,
        sql: &str,
        classified: &Result<Arc<Classification>, String>,
    ) -> Self {
        let (operation, decided, copy_source) = match classified {
            Ok(c) => {
                let operation = operation_for(sql, c);
                let decided = decisions.decide(&ctx.session, &operation);
                (operation, decided, copy_source_of(c))
            }
            Err(e) => {
                let (operation, decided) = unparseable(sql, e);
                (operation, decided, None)
            }
        };
        PreparedStatement {
            id,
            sql: Arc::from(sql),
            operation: Arc::new(operation),
            decided,
            copy_source,
        }
    }
}

/// The session's decisions by risk classes. A session's policy is fixed for its life and
/// [`agentgate_policy::decide`] looks at nothing of an operation but its risk classes, so
/// each combination of classes is decided once per connection instead of per statement
/// (which cloned the deciding rule and formatted its reason every time).
#[derive(Default)]
struct Decisions {
    known: Vec<(Vec<String>, Decided)>,
}

impl Decisions {
    /// Combinations remembered; a connection sees a handful (read, write, none, …).
    const MAX: usize = 32;

    fn decide(&mut self, session: &Session, operation: &Operation) -> Decided {
        if let Some((_, d)) = self
            .known
            .iter()
            .find(|(classes, _)| *classes == operation.risk_classes)
        {
            return d.clone();
        }
        let d = Decided::from(session.decide(operation));
        if self.known.len() < Self::MAX {
            self.known.push((operation.risk_classes.clone(), d.clone()));
        }
        d
    }
}

/// Statements of one connection as the agent prepared them (Parse) and bound them (Bind).
///
/// What a statement name denotes on the server is known for sure only from the server's
/// answers: a Parse can fail (a name that exists is not prepared again) or be skipped (an
/// error earlier in its batch skips everything up to Sync), and a Close can be skipped.
/// Within one batch (up to Sync) the proxy may assume the changes it forwarded took effect:
/// had one failed, the server would skip the rest of the batch, the Bind that relies on it
/// included. For a name last changed in an earlier batch it takes the server's confirmed
/// state ([`Context::statements`]), waiting for the answers still due if need be.
#[derive(Default)]
struct Prepared {
    /// SQL-level PREPARE/EXECUTE, which the classifier resolves through.
    sql: PreparedStatements,
    /// Names changed in the current batch: prepared (`Some`) or closed (`None`).
    batch: HashMap<String, Option<Arc<PreparedStatement>>>,
    /// Names changed in earlier batches whose change may still be unanswered, with the
    /// number of their last change.
    unsettled: HashMap<String, u64>,
    portals: HashMap<String, Portal>,
    /// The id of the last statement.
    last_id: u64,
    /// The number of the last name change.
    last_change: u64,
    decisions: Decisions,
}

impl Prepared {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Notes a change of `name` in this batch; returns its number.
    fn change(&mut self, name: &str, to: Option<Arc<PreparedStatement>>) -> u64 {
        self.last_change += 1;
        self.batch.insert(name.to_owned(), to);
        self.unsettled.insert(name.to_owned(), self.last_change);
        self.last_change
    }

    /// A batch ended (Sync, or a simple Query).
    fn end_batch(&mut self, ctx: &Context) {
        self.batch.clear();
        if self.unsettled.len() > 64 {
            let settled = ctx.settled.load(std::sync::atomic::Ordering::Acquire);
            self.unsettled.retain(|_, change| *change > settled);
        }
    }

    /// The statement `name` denotes on the server for a message sent now (see the type's
    /// doc). When its last change came in an earlier batch and is still unanswered, sends
    /// what is queued in `out` and waits for the answer.
    async fn lookup(
        &mut self,
        ctx: &Context,
        name: &str,
        upstream: &mut WriteHalf,
        out: &mut BytesMut,
    ) -> Result<Option<Arc<PreparedStatement>>, Stop> {
        if let Some(changed) = self.batch.get(name) {
            return Ok(changed.clone());
        }
        if let Some(&change) = self.unsettled.get(name) {
            let settled = || ctx.settled.load(std::sync::atomic::Ordering::Acquire) >= change;
            if !settled() && !out.is_empty() {
                write_upstream(upstream, out)
                    .await
                    .map_err(|e| Stop::quiet(EndReason::Error(format!("upstream write: {e}"))))?;
            }
            loop {
                let answered = ctx.settled_changed.notified();
                if settled() {
                    break;
                }
                answered.await;
            }
            self.unsettled.remove(name);
        }
        Ok(ctx.statements().get(name).cloned())
    }
}

/// A portal as Bind made it. It runs the statement its Bind named, as that statement was
/// then: closing the statement or preparing another under its name (the unnamed one is
/// prepared again all the time) does not change what the portal runs on the server, so it
/// must not change what the proxy decides for it either.
struct Portal {
    statement: Arc<PreparedStatement>,
    /// Bind's parameters, masked for the record.
    params: Vec<String>,
}

/// Reads the agent's messages until the session ends.
pub async fn agent_to_upstream(
    ctx: Arc<Context>,
    client: ReadHalf,
    mut upstream: WriteHalf,
) -> Stop {
    let mut reader = FrameReader::new(client, FrameCodec::new(ctx.max_message));
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut prepared = Prepared::default();
    let mut denials = DenialMarkers::new();
    loop {
        match reader.fill().await {
            Ok(true) => {}
            Ok(false) => return Stop::quiet(EndReason::ClientClosed),
            Err(agentgate_pgwire::WireError::Io(_)) => {
                return Stop::quiet(EndReason::ClientClosed);
            }
            Err(e) => return Stop::protocol(e.to_string()),
        }
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Stop::protocol(e.to_string()),
            };
            ctx.session.count_bytes(frame.wire_len() as u64, 0);
            match on_agent_frame(
                &ctx,
                frame,
                &mut out,
                &mut upstream,
                &mut prepared,
                &mut denials,
            )
            .await
            {
                Ok(Flow::Continue) => {}
                Ok(Flow::Terminate) => {
                    let _ = upstream.write_all(&out).await;
                    let _ = upstream.write_all(build::terminate().raw()).await;
                    let _ = upstream.flush().await;
                    return Stop::quiet(EndReason::ClientClosed);
                }
                Err(stop) => return stop,
            }
        }
        if !out.is_empty()
            && let Err(e) = write_upstream(&mut upstream, &mut out).await
        {
            return Stop::quiet(EndReason::Error(format!("upstream write: {e}")));
        }
    }
}

async fn write_upstream(up: &mut WriteHalf, out: &mut BytesMut) -> std::io::Result<()> {
    up.write_all(out).await?;
    up.flush().await?;
    out.clear();
    Ok(())
}

enum Flow {
    Continue,
    Terminate,
}

/// Unique markers for refused statements' stand-ins.
struct DenialMarkers {
    prefix: String,
    next: u64,
}

impl DenialMarkers {
    fn new() -> Self {
        DenialMarkers {
            prefix: format!("agentgate_refused_{:016x}", rand::random::<u64>()),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}_{}", self.prefix, self.next)
    }
}

/// The operation a classified text performs: every statement's classes and tables, each
/// once, and its commands joined by `;` in lower case (`select`, `begin;update;commit`).
fn operation_for(sql: &str, classification: &Classification) -> Operation {
    let statements = &classification.statements;
    let mut classes: Vec<String> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    let mut action = String::new();
    for (i, s) in statements.iter().enumerate() {
        for c in &s.risk_classes {
            if !classes.iter().any(|x| x == c) {
                classes.push((*c).to_owned());
            }
        }
        for t in &s.tables {
            if !targets.contains(t) {
                targets.push(t.clone());
            }
        }
        if i > 0 {
            action.push(';');
        }
        action.push_str(&s.command);
    }
    // Command tags are ASCII (`SELECT`, `CREATE TABLE`, `UNKNOWN`).
    action.make_ascii_lowercase();
    let mut attributes = HashMap::new();
    if statements.len() > 1 {
        attributes.insert("statements".into(), statements.len().to_string());
    }
    Operation {
        protocol: Protocol::Postgres as i32,
        action,
        text: sql.to_owned(),
        targets,
        risk_classes: classes,
        attributes,
    }
}

fn copy_source_of(c: &Classification) -> Option<String> {
    match c.statements.as_slice() {
        [one] => one.copy_source.clone(),
        _ => None,
    }
}

/// The records of a multi-statement Query: one per statement, with its own text, command,
/// targets and risk classes, and the Query's decision (it runs whole or not at all). A
/// refused Query's stand-in fails as its first statement; the others are recorded as skipped.
fn per_statement(whole: &OpRecord, c: &Classification) -> VecDeque<OpRecord> {
    let n = c.statements.len();
    c.statements
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut classes: Vec<String> = Vec::new();
            for class in &s.risk_classes {
                if !classes.iter().any(|x| x == class) {
                    classes.push((*class).to_owned());
                }
            }
            let mut attributes = HashMap::new();
            attributes.insert("statement".to_owned(), format!("{}/{n}", i + 1));
            let operation = Operation {
                protocol: Protocol::Postgres as i32,
                action: s.command.to_lowercase(),
                text: s.text.clone(),
                targets: s.tables.clone(),
                risk_classes: classes,
                attributes,
            };
            let decided = Decided {
                decision: whole.decision,
                reason: whole.reason.clone(),
                rule: whole.rule.clone(),
            };
            let mut op = OpRecord::new(operation, decided);
            op.approval_id = whole.approval_id.clone();
            op.started_at = whole.started_at;
            op.started = whole.started;
            op.copy_source = s.copy_source.clone();
            if i == 0 {
                op.denial = whole.denial.clone();
            }
            op
        })
        .collect()
}

/// An operation for text the classifier refused (unparseable): denied.
fn unparseable(sql: &str, why: &str) -> (Operation, Decided) {
    (
        Operation {
            protocol: Protocol::Postgres as i32,
            action: "unparseable".into(),
            text: sql.to_owned(),
            ..Default::default()
        },
        Decided {
            decision: Decision::Deny,
            reason: format!("statement refused: it does not parse as PostgreSQL ({why})"),
            rule: None,
        },
    )
}

/// What a Bind of a name this connection never prepared with Parse runs: a statement a
/// SQL `PREPARE` made (the server shares one namespace), decided as `EXECUTE` of it is;
/// otherwise opaque code, decided as such (the server will most likely refuse the Bind).
fn unknown_statement(ctx: &Context, prepared: &mut Prepared, name: &str) -> PreparedStatement {
    let sql = format!("EXECUTE \"{}\"", name.replace('"', "\"\""));
    let classified = prepared
        .sql
        .classify(&ctx.classifier, &sql)
        .map_err(|e| e.to_string());
    let id = prepared.next_id();
    PreparedStatement::new(ctx, &mut prepared.decisions, id, &sql, &classified)
}

/// The refusal the agent sees for a statement.
fn refusal(op: &OpRecord) -> Frame {
    let code = if op.operation.action == "unparseable" {
        "42601"
    } else {
        agentgate_pgwire::INSUFFICIENT_PRIVILEGE
    };
    build::error("ERROR", code, &format!("agentgate: {}", op.reason), None)
}

/// Decides `op`; holds it for approval when policy says so. Returns the final decision
/// in `op` (allow or deny).
async fn decide(
    ctx: &Context,
    op: &mut OpRecord,
    upstream: &mut WriteHalf,
    out: &mut BytesMut,
) -> Result<(), Stop> {
    if op.decision != Decision::NeedsApproval {
        return Ok(());
    }
    // Everything before the held statement goes to the server now: only this statement
    // and what follows it wait.
    if !out.is_empty() {
        write_upstream(upstream, out)
            .await
            .map_err(|e| Stop::quiet(EndReason::Error(format!("upstream write: {e}"))))?;
    }
    let decision = ctx.session.decide(&op.operation);
    let client = ctx.client.clone();
    ctx.with_held(|h| *h = Some(op.clone()));
    let outcome = ctx
        .session
        .hold_for_approval(&op.operation, &decision, "", |pending| {
            ctx.with_held(|h| {
                if let Some(h) = h {
                    h.approval_id = Some(pending.id.clone());
                }
            });
            // libpq and the drivers show a NOTICE while they wait for the result.
            let notice = build::notice(
                "01000",
                &pending.message(),
                Some("the statement runs as soon as it is approved"),
            );
            tokio::spawn(async move {
                let mut w = client.lock().await;
                let _ = w.write_all(notice.raw()).await;
                let _ = w.flush().await;
            });
        })
        .await;
    if let agentgate_session::ApprovalOutcome::SessionEnded { reason, .. } = outcome {
        // Still held: recorded with what the server never answered.
        return Err(Stop::quiet(reason));
    }
    ctx.with_held(|h| *h = None);
    op.approval_id = outcome.approval_id().map(str::to_owned);
    op.decision = outcome.decision();
    op.reason = outcome.message();
    Ok(())
}

async fn on_agent_frame(
    ctx: &Context,
    frame: Frame,
    out: &mut BytesMut,
    upstream: &mut WriteHalf,
    prepared: &mut Prepared,
    denials: &mut DenialMarkers,
) -> Result<Flow, Stop> {
    match frame.tag() {
        b'Q' => {
            let query = Query::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            // A simple Query drops the unnamed prepared statement on the server.
            prepared.sql.remove("");
            prepared.end_batch(ctx);
            let mut copy_source = None;
            let mut classification = None;
            let (operation, d) = match prepared.sql.classify(&ctx.classifier, query.sql) {
                Ok(c) => {
                    copy_source = copy_source_of(&c);
                    let operation = operation_for(query.sql, &c);
                    let d = prepared.decisions.decide(&ctx.session, &operation);
                    classification = Some(c);
                    (operation, d)
                }
                Err(e) => unparseable(query.sql, &e.to_string()),
            };
            // The Query is decided (and held for approval) as a whole: it is forwarded whole
            // or not at all, as the server runs it in one implicit transaction.
            let mut op = OpRecord::new(operation, d);
            op.copy_source = copy_source;
            decide(ctx, &mut op, upstream, out).await?;
            let allowed = op.decision == Decision::Allow;
            if !allowed {
                op.denial = Some(Denial {
                    error: refusal(&op),
                    marker: denials.next(),
                });
            }
            let stand_in = op.denial.as_ref().map(|d| Query::frame(&d.marker));
            // Each statement is its own audit event, with the Query's decision.
            let ops = match classification {
                Some(c) if c.statements.len() > 1 => per_statement(&op, &c),
                _ => VecDeque::from([op]),
            };
            ctx.push(Expect::Query {
                ops,
                done: Vec::new(),
            })?;
            match stand_in {
                None => out.extend_from_slice(frame.raw()),
                Some(f) => out.extend_from_slice(f.raw()),
            }
        }
        b'P' => {
            let parse = Parse::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            if parse.name.is_empty() {
                prepared.sql.remove("");
            }
            let classified = prepared
                .sql
                .classify(&ctx.classifier, parse.sql)
                .map_err(|e| e.to_string());
            if let Ok(c) = &classified {
                // Protocol-level and SQL-level prepared statements share one namespace:
                // `EXECUTE name` in SQL runs what this Parse prepared.
                if !parse.name.is_empty() {
                    prepared.sql.register(parse.name, c.clone());
                }
            }
            if ctx.statements().len() + prepared.batch.len() >= MAX_NAMED {
                return Err(Stop::protocol(format!(
                    "more than {MAX_NAMED} prepared statements on one connection"
                )));
            }
            let id = prepared.next_id();
            let statement = Arc::new(PreparedStatement::new(
                ctx,
                &mut prepared.decisions,
                id,
                parse.sql,
                &classified,
            ));
            let change = prepared.change(parse.name, Some(statement.clone()));
            ctx.push(Expect::Parse {
                change,
                name: parse.name.to_owned(),
                statement,
            })?;
            out.extend_from_slice(frame.raw());
        }
        b'B' => {
            let bind = Bind::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            let masker = ctx.session.masker();
            let mut report = MaskReport::new();
            let params = bind
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    None => "NULL".to_owned(),
                    Some(v) if bind.param_format(i) == 0 => {
                        let text = String::from_utf8_lossy(v);
                        masker.mask_text(&text, &mut report).into_owned()
                    }
                    Some(v) => format!("<{} bytes binary>", v.len()),
                })
                .collect();
            if prepared.portals.len() >= MAX_NAMED && !prepared.portals.contains_key(bind.portal) {
                return Err(Stop::protocol(format!(
                    "more than {MAX_NAMED} portals on one connection"
                )));
            }
            let statement = match prepared.lookup(ctx, bind.statement, upstream, out).await? {
                Some(s) => s,
                None => Arc::new(unknown_statement(ctx, prepared, bind.statement)),
            };
            ctx.push(Expect::Bind {
                portal: bind.portal.to_owned(),
                statement: statement.id,
                result_formats: bind.result_formats.clone(),
            })?;
            prepared
                .portals
                .insert(bind.portal.to_owned(), Portal { statement, params });
            out.extend_from_slice(frame.raw());
        }
        b'E' => {
            let execute = Execute::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            let portal = prepared.portals.get(execute.portal);
            let sql = portal.map(|p| p.statement.sql.clone());
            let mut op = match portal {
                Some(Portal {
                    statement: p,
                    params,
                }) => {
                    let mut op = OpRecord::new(p.operation.clone(), p.decided.clone());
                    op.copy_source = p.copy_source.clone();
                    op.parameters = params.clone();
                    op
                }
                // No portal bound on this connection: the server will say so, or (a cursor
                // a DECLARE opened, decided then) send more of its rows.
                None => OpRecord::new(
                    Operation {
                        protocol: Protocol::Postgres as i32,
                        action: "execute".into(),
                        ..Default::default()
                    },
                    Decided {
                        decision: Decision::Allow,
                        reason: "no statement to run".into(),
                        rule: None,
                    },
                ),
            };
            decide(ctx, &mut op, upstream, out).await?;
            if op.decision == Decision::Allow {
                ctx.push(Expect::Execute {
                    portal: execute.portal.to_owned(),
                    sql,
                    op: Box::new(op),
                })?;
                out.extend_from_slice(frame.raw());
            } else {
                let marker = denials.next();
                op.denial = Some(Denial {
                    error: refusal(&op),
                    marker: marker.clone(),
                });
                ctx.push(Expect::Execute {
                    portal: execute.portal.to_owned(),
                    sql: None,
                    op: Box::new(op),
                })?;
                // A portal that cannot exist: the server fails it, naming the marker, and
                // skips to the next Sync as for any error.
                out.extend_from_slice(Execute::frame(&marker, 0).raw());
            }
        }
        b'D' => {
            let describe = Describe::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            let expect = match describe.target {
                Target::Statement(s) => {
                    let statement = prepared.lookup(ctx, s, upstream, out).await?;
                    Expect::DescribeStatement(statement.map(|p| p.id))
                }
                Target::Portal(p) => Expect::DescribePortal(p.to_owned()),
            };
            ctx.push(expect)?;
            out.extend_from_slice(frame.raw());
        }
        b'C' => {
            let close = Close::parse(&frame).map_err(|e| Stop::protocol(e.to_string()))?;
            let expect = match close.target {
                Target::Statement(s) => {
                    prepared.sql.remove(s);
                    let change = prepared.change(s, None);
                    Expect::CloseStatement {
                        change,
                        name: s.to_owned(),
                    }
                }
                Target::Portal(p) => {
                    prepared.portals.remove(p);
                    Expect::ClosePortal
                }
            };
            ctx.push(expect)?;
            out.extend_from_slice(frame.raw());
        }
        b'S' => {
            prepared.end_batch(ctx);
            ctx.push(Expect::Sync)?;
            out.extend_from_slice(frame.raw());
        }
        b'H' | b'd' | b'c' | b'f' => out.extend_from_slice(frame.raw()),
        b'F' => {
            // A call by function OID: nothing to parse, so it is opaque code to policy.
            let operation = Operation {
                protocol: Protocol::Postgres as i32,
                action: "function_call".into(),
                text: "<FunctionCall message>".into(),
                risk_classes: vec!["sql.opaque_code".into()],
                ..Default::default()
            };
            let d = prepared.decisions.decide(&ctx.session, &operation);
            let mut op = OpRecord::new(operation, d);
            decide(ctx, &mut op, upstream, out).await?;
            if op.decision != Decision::Allow {
                // No stand-in exists for a function call; refuse it like the server refuses
                // a bad one: an error, then ReadyForQuery from the server's own Sync.
                let marker = denials.next();
                op.denial = Some(Denial {
                    error: refusal(&op),
                    marker: marker.clone(),
                });
                ctx.push(Expect::Query {
                    ops: VecDeque::from([op]),
                    done: Vec::new(),
                })?;
                out.extend_from_slice(Query::frame(&marker).raw());
            } else {
                ctx.push(Expect::FunctionCall { op: Box::new(op) })?;
                out.extend_from_slice(frame.raw());
            }
        }
        b'X' => return Ok(Flow::Terminate),
        other => {
            return Err(Stop::protocol(format!(
                "unexpected message type {:?} from the client",
                char::from(other)
            )));
        }
    }
    Ok(Flow::Continue)
}

// ---------------------------------------------------------------------------------------
// upstream → agent

/// How one result column's cells are masked.
#[derive(Debug, Clone, Copy)]
enum Cell {
    /// Passed as is (binary non-text values, or no masking at all).
    Pass,
    /// Text (or binary text-like) value: masked per plan.
    Mask(CellPlan),
    /// jsonb in binary: a version byte, then text.
    Jsonb(CellPlan),
    /// A rule selects a value the proxy cannot rewrite in place (binary number, date...):
    /// replaced by NULL, counted under the rule.
    Null(CellPlan),
}

/// Result shapes the server described, by statement (id) and portal.
#[derive(Default)]
struct Shapes {
    statements: HashMap<u64, Arc<Vec<FieldDescription>>>,
    portals: HashMap<String, Arc<Vec<FieldDescription>>>,
    /// portal → (statement id, result formats) from Bind.
    bound: HashMap<String, (u64, Vec<i16>)>,
}

impl Shapes {
    fn describe_statement(&mut self, id: u64, fields: Arc<Vec<FieldDescription>>) {
        if self
            .statements
            .get(&id)
            .is_some_and(|known| Arc::ptr_eq(known, &fields))
        {
            return;
        }
        // Shapes of statements dropped while an error skipped their answers are not
        // forgotten one by one; this bounds them.
        if self.statements.len() >= MAX_NAMED && !self.statements.contains_key(&id) {
            self.statements.clear();
        }
        self.statements.insert(id, fields);
    }
}

/// Relays the server's messages until the session ends.
pub async fn upstream_to_agent(ctx: Arc<Context>, upstream: ReadHalf) -> Stop {
    let mut reader = FrameReader::new(upstream, FrameCodec::new(1024 * 1024 * 1024));
    let mut out = BytesMut::with_capacity(64 * 1024);
    let masker = ctx.session.masker().clone();
    let mut state = UpstreamState {
        shapes: Shapes::default(),
        streamed: Streamed::default(),
        last_description: None,
        copy: None,
        cells: None,
        plans: PlanCache::default(),
        masking: !masker.is_noop(),
        masker,
    };
    loop {
        match reader.fill().await {
            Ok(true) => {}
            Ok(false) | Err(agentgate_pgwire::WireError::Io(_)) => {
                return Stop::quiet(EndReason::UpstreamClosed);
            }
            Err(e) => {
                return Stop::quiet(EndReason::Error(format!("upstream protocol: {e}")));
            }
        }
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Stop::quiet(EndReason::Error(format!("upstream protocol: {e}"))),
            };
            if let Err(stop) = on_server_frame(&ctx, &mut state, frame, &mut out).await {
                let _ = state.streamed.settle(&ctx);
                let _ = ctx.write_client(&out).await;
                return stop;
            }
        }
        if let Err(stop) = state.streamed.settle(&ctx) {
            return stop;
        }
        if !out.is_empty() {
            ctx.session.count_bytes(0, out.len() as u64);
            if let Err(e) = ctx.write_client(&out).await {
                return Stop::quiet(EndReason::Error(format!("client write: {e}")));
            }
            out.clear();
        }
    }
}

/// Bytes and masking counts of result rows (DataRow, CopyData) sent and not yet counted to
/// the statement they belong to, the one at the front of the queue. They are counted once
/// per batch of messages read, and before any other message (which may end that
/// statement), instead of taking the queue's lock per row.
#[derive(Default)]
struct Streamed {
    bytes: u64,
    masked: MaskReport,
}

impl Streamed {
    fn add(&mut self, bytes: usize, masked: &MaskReport) {
        self.bytes += bytes as u64;
        if !masked.is_empty() {
            self.masked.merge(masked);
        }
    }

    fn settle(&mut self, ctx: &Context) -> Result<(), Stop> {
        if self.bytes == 0 && self.masked.is_empty() {
            return Ok(());
        }
        let mut q = ctx
            .expect
            .lock()
            .map_err(|_| Stop::quiet(EndReason::Error("internal state poisoned".into())))?;
        if let Some(op) = front_op(&mut q) {
            op.bytes += self.bytes;
            op.masked.merge(&self.masked);
        }
        self.bytes = 0;
        self.masked.clear();
        Ok(())
    }
}

/// How the rows of a COPY TO STDOUT in progress are masked.
struct CopyMask {
    cells: Vec<Cell>,
    binary: bool,
    /// The binary header has been passed (it comes before the first row).
    header_done: bool,
}

struct UpstreamState {
    shapes: Shapes,
    /// Result rows sent and not yet counted to their statement.
    streamed: Streamed,
    /// The last RowDescription, as sent and as parsed. Drivers describe every execution of
    /// a prepared statement (libpq does), and the same bytes are the same shape: reusing it
    /// skips the parse, and its masking plan is found by pointer.
    last_description: Option<(Vec<u8>, Arc<Vec<FieldDescription>>)>,
    copy: Option<CopyMask>,
    /// How the cells of the result being streamed are masked; `None` until known.
    cells: Option<Arc<Vec<Cell>>>,
    /// Plans of recent result shapes.
    plans: PlanCache,
    masking: bool,
    masker: Masker,
}

fn is_textual(type_oid: u32) -> bool {
    // text, varchar, bpchar, name, char, json, xml, unknown; and user-defined types
    // (enums, domains, citext), whose text and binary forms are text.
    matches!(type_oid, 25 | 1043 | 1042 | 19 | 18 | 114 | 142 | 705) || type_oid >= 16384
}

/// Most result shapes whose masking plans are kept per connection.
const PLANS_KEPT: usize = 32;
/// How long a plan is reused: as long as the catalog keeps a table's columns.
const PLAN_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Masking plans of recent result shapes (columns and formats), so a prepared statement run
/// again, or a simple query of the same shape, reuses its plan instead of resolving its
/// columns' sources and rules per execution.
#[derive(Default)]
struct PlanCache {
    entries: VecDeque<PlanEntry>,
}

struct PlanEntry {
    fields: Arc<Vec<FieldDescription>>,
    formats: Option<Vec<i16>>,
    made: std::time::Instant,
    cells: Arc<Vec<Cell>>,
}

impl PlanCache {
    fn get(
        &self,
        fields: &Arc<Vec<FieldDescription>>,
        formats: Option<&[i16]>,
    ) -> Option<Arc<Vec<Cell>>> {
        self.entries
            .iter()
            .find(|e| {
                (Arc::ptr_eq(&e.fields, fields) || *e.fields == **fields)
                    && e.formats.as_deref() == formats
                    && e.made.elapsed() < PLAN_TTL
            })
            .map(|e| e.cells.clone())
    }

    fn put(
        &mut self,
        fields: Arc<Vec<FieldDescription>>,
        formats: Option<&[i16]>,
        cells: Arc<Vec<Cell>>,
    ) {
        self.entries.retain(|e| e.made.elapsed() < PLAN_TTL);
        if self.entries.len() >= PLANS_KEPT {
            self.entries.pop_front();
        }
        self.entries.push_back(PlanEntry {
            fields,
            formats: formats.map(<[i16]>::to_vec),
            made: std::time::Instant::now(),
            cells,
        });
    }
}

/// The masking plan of a result shape: cached, or planned and cached (unless the catalog
/// could not name a column's source, in which case the fail-closed plan is not kept).
async fn plan(
    ctx: &Context,
    masker: &Masker,
    plans: &mut PlanCache,
    fields: &Arc<Vec<FieldDescription>>,
    formats: Option<&[i16]>,
) -> Arc<Vec<Cell>> {
    if let Some(cells) = plans.get(fields, formats) {
        return cells;
    }
    let (cells, complete) = plan_cells(ctx, masker, fields, formats).await;
    let cells = Arc::new(cells);
    if complete {
        plans.put(fields.clone(), formats, cells.clone());
    }
    cells
}

/// Plans how each column's cells are masked; false with it when the catalog could not be
/// asked (the plan then fails closed).
async fn plan_cells(
    ctx: &Context,
    masker: &Masker,
    fields: &[FieldDescription],
    formats: Option<&[i16]>,
) -> (Vec<Cell>, bool) {
    let oids: Vec<u32> = fields.iter().map(|f| f.table_oid).collect();
    let tables = if oids.iter().any(|&o| o != 0) {
        match ctx.catalog.tables(&oids).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "column origins unavailable; masking table columns by content and rule as unknown");
                None
            }
        }
    } else {
        Some(HashMap::new())
    };
    let complete = tables.is_some();
    let cells = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let format = match formats {
                Some(fs) => agentgate_pgwire_format(fs, i),
                None => f.format,
            };
            let plan = if f.table_oid == 0 {
                CellPlan::CONTENT
            } else {
                match &tables {
                    Some(t) => match t.get(&f.table_oid).and_then(|t| t.as_ref()) {
                        Some(table) => match table.column(f.column) {
                            Some(col) => masker.column_plan(&table.schema, &table.table, col),
                            None => CellPlan::CONTENT,
                        },
                        None => CellPlan::CONTENT,
                    },
                    // Fail closed: the origin is a table the proxy cannot name right now.
                    None => masker.column_plan("*", "*", "*"),
                }
            };
            let textual = is_textual(f.type_oid);
            match (format, textual, plan.is_rule()) {
                (_, true, _) => Cell::Mask(plan),
                (1, false, _) if f.type_oid == 3802 => Cell::Jsonb(plan),
                (0, false, _) if f.type_oid == 3802 => Cell::Mask(plan),
                (_, false, true) => Cell::Null(plan),
                (_, false, false) => Cell::Pass,
            }
        })
        .collect();
    (cells, complete)
}

/// The none/one/each convention of Bind's result format codes.
fn agentgate_pgwire_format(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        each => each.get(i).copied().unwrap_or(0),
    }
}

/// Whether a DataRow has exactly the planned columns and every one passes unmasked.
fn passes_whole(cells: &[Cell], row: &Frame) -> bool {
    let count = row
        .body()
        .get(..2)
        .map(|n| usize::from(u16::from_be_bytes([n[0], n[1]])));
    count == Some(cells.len()) && !cells.is_empty() && cells.iter().all(|c| matches!(c, Cell::Pass))
}

fn mask_row(
    masker: &Masker,
    cells: &[Cell],
    frame: &Frame,
    report: &mut MaskReport,
) -> Result<Option<Frame>, String> {
    let row = DataRow::parse(frame).map_err(|e| e.to_string())?;
    let mut changed = false;
    let mut masked: Vec<Option<std::borrow::Cow<'_, [u8]>>> = Vec::with_capacity(row.cells.len());
    for (i, value) in row.cells.iter().enumerate() {
        let Some(v) = value else {
            masked.push(None);
            continue;
        };
        let cell = cells
            .get(i)
            .copied()
            .unwrap_or(Cell::Mask(CellPlan::CONTENT));
        let out = match cell {
            Cell::Pass => Some(std::borrow::Cow::Borrowed(*v)),
            Cell::Mask(plan) => Some(masker.mask_cell(plan, v, report)),
            Cell::Jsonb(plan) => match v.split_first() {
                Some((&version, text)) => match masker.mask_cell(plan, text, report) {
                    std::borrow::Cow::Borrowed(_) => Some(std::borrow::Cow::Borrowed(*v)),
                    std::borrow::Cow::Owned(m) => {
                        let mut o = Vec::with_capacity(m.len() + 1);
                        o.push(version);
                        o.extend_from_slice(&m);
                        Some(std::borrow::Cow::Owned(o))
                    }
                },
                None => Some(std::borrow::Cow::Borrowed(*v)),
            },
            Cell::Null(plan) => {
                let _ = masker.mask_cell(plan, v, report);
                None
            }
        };
        if !matches!(&out, Some(std::borrow::Cow::Borrowed(_))) {
            changed = true;
        }
        masked.push(out);
    }
    Ok(changed.then(|| DataRow::frame(&masked)))
}

/// Masks one CopyData message of a COPY TO STDOUT. `None` means unchanged.
///
/// Text format: fields split on tabs, `\N` is NULL; CSV: fields split on commas outside
/// quotes. Binary: the header, then per row a field count and length-prefixed fields. A row
/// whose layout does not match the described columns is masked by content as a whole
/// (fail closed: never passed raw when masking applies).
fn mask_copy_data(
    masker: &Masker,
    copy: &mut CopyMask,
    data: &[u8],
    report: &mut MaskReport,
) -> Option<Vec<u8>> {
    if copy.cells.is_empty() {
        return match masker.mask_bytes(data, report) {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(m) => Some(m),
        };
    }
    if copy.binary {
        return mask_copy_binary(masker, copy, data, report);
    }
    let (line, newline) = match data.strip_suffix(b"\n") {
        Some(l) => (l, true),
        None => (data, false),
    };
    let mut fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
    let mut csv = false;
    if fields.len() != copy.cells.len() {
        match split_csv(line) {
            Some(f) if f.len() == copy.cells.len() => {
                fields = f;
                csv = true;
            }
            _ => {
                return match masker.mask_bytes(data, report) {
                    std::borrow::Cow::Borrowed(_) => None,
                    std::borrow::Cow::Owned(m) => Some(m),
                };
            }
        }
    }
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut changed = false;
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(if csv { b',' } else { b'\t' });
        }
        let null = if csv {
            field.is_empty()
        } else {
            *field == b"\\N"
        };
        let (quoted, value): (bool, std::borrow::Cow<'_, [u8]>) =
            if csv && field.first() == Some(&b'"') {
                let inner = &field[1..field.len().saturating_sub(1).max(1)];
                (true, std::borrow::Cow::Owned(unquote_csv(inner)))
            } else {
                (false, std::borrow::Cow::Borrowed(*field))
            };
        let masked: Option<Vec<u8>> = if null {
            None
        } else {
            match copy.cells[i] {
                Cell::Pass => None,
                Cell::Mask(plan) | Cell::Jsonb(plan) => {
                    match masker.mask_cell(plan, &value, report) {
                        std::borrow::Cow::Borrowed(_) => None,
                        std::borrow::Cow::Owned(m) => Some(m),
                    }
                }
                Cell::Null(plan) => {
                    let _ = masker.mask_cell(plan, &value, report);
                    Some(if csv { Vec::new() } else { b"\\N".to_vec() })
                }
            }
        };
        match masked {
            Some(m) => {
                changed = true;
                if csv && !m.is_empty() {
                    out.push(b'"');
                    for &b in &m {
                        if b == b'"' {
                            out.push(b'"');
                        }
                        out.push(b);
                    }
                    out.push(b'"');
                } else {
                    out.extend_from_slice(&m);
                }
            }
            None => {
                let _ = quoted;
                out.extend_from_slice(field);
            }
        }
    }
    if newline {
        out.push(b'\n');
    }
    changed.then_some(out)
}

/// Splits a CSV line on commas outside double quotes; `None` on an unbalanced quote.
fn split_csv(line: &[u8]) -> Option<Vec<&[u8]>> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                fields.push(&line[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    fields.push(&line[start..]);
    Some(fields)
}

fn unquote_csv(inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        out.push(inner[i]);
        if inner[i] == b'"' && inner.get(i + 1) == Some(&b'"') {
            i += 1;
        }
        i += 1;
    }
    out
}

const BINARY_COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

fn mask_copy_binary(
    masker: &Masker,
    copy: &mut CopyMask,
    data: &[u8],
    report: &mut MaskReport,
) -> Option<Vec<u8>> {
    let mut c = agentgate_pgwire::Cursor::new(data, "CopyData");
    let mut out = Vec::with_capacity(data.len() + 16);
    if !copy.header_done {
        let sig = c.bytes(BINARY_COPY_SIGNATURE.len()).ok()?;
        if sig != BINARY_COPY_SIGNATURE {
            return Some(Vec::new());
        }
        let flags = c.i32().ok()?;
        let ext_len = c.u32().ok()?;
        let ext = c.bytes(ext_len as usize).ok()?;
        out.extend_from_slice(sig);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&ext_len.to_be_bytes());
        out.extend_from_slice(ext);
        copy.header_done = true;
    }
    let mut changed = false;
    while !c.is_empty() {
        let count = match c.i16() {
            Ok(n) => n,
            Err(_) => return Some(Vec::new()),
        };
        out.extend_from_slice(&count.to_be_bytes());
        if count < 0 {
            continue; // trailer
        }
        for i in 0..count as usize {
            let value = match c.value() {
                Ok(v) => v,
                // A row split across messages or malformed: never pass it raw.
                Err(_) => return Some(Vec::new()),
            };
            let cell = copy
                .cells
                .get(i)
                .copied()
                .unwrap_or(Cell::Mask(CellPlan::CONTENT));
            let masked = value.map(|v| match cell {
                Cell::Pass => std::borrow::Cow::Borrowed(v),
                Cell::Mask(plan) => masker.mask_cell(plan, v, report),
                Cell::Jsonb(plan) => match v.split_first() {
                    Some((&version, text)) => match masker.mask_cell(plan, text, report) {
                        std::borrow::Cow::Borrowed(_) => std::borrow::Cow::Borrowed(v),
                        std::borrow::Cow::Owned(m) => {
                            let mut o = vec![version];
                            o.extend_from_slice(&m);
                            std::borrow::Cow::Owned(o)
                        }
                    },
                    None => std::borrow::Cow::Borrowed(v),
                },
                Cell::Null(plan) => {
                    let _ = masker.mask_cell(plan, v, report);
                    std::borrow::Cow::Owned(Vec::new())
                }
            });
            let null_now = matches!(cell, Cell::Null(_)) && value.is_some();
            match (&masked, null_now) {
                (_, true) | (None, _) => {
                    if null_now {
                        changed = true;
                    }
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                }
                (Some(m), false) => {
                    if matches!(m, std::borrow::Cow::Owned(_)) {
                        changed = true;
                    }
                    out.extend_from_slice(&(m.len() as i32).to_be_bytes());
                    out.extend_from_slice(m);
                }
            }
        }
    }
    changed.then_some(out)
}

/// Marks the statements of a Query that completed and were then undone by the server: a
/// later statement failed (`done` ends with it) and the session is idle again (`idle`: the
/// server rolled back the Query's implicit transaction, not left an explicit block aborted).
/// What ran before the Query's last COMMIT, ROLLBACK or PREPARE TRANSACTION was already
/// settled and stays as it was.
fn mark_rolled_back(done: &mut [OpRecord], idle: bool) {
    let Some((failed, completed)) = done.split_last_mut() else {
        return;
    };
    if !idle || failed.error.is_none() {
        return;
    }
    let settled = completed
        .iter()
        .rposition(|op| {
            matches!(
                op.operation.action.as_str(),
                "commit" | "rollback" | "prepare transaction"
            )
        })
        .map_or(0, |i| i + 1);
    for op in &mut completed[settled..] {
        if op.error.is_none() {
            op.rolled_back = true;
        }
    }
}

fn front_op(q: &mut VecDeque<Expect>) -> Option<&mut OpRecord> {
    match q.front_mut()? {
        Expect::Execute { op, .. } | Expect::FunctionCall { op } => Some(op),
        Expect::Query { ops, .. } => ops.front_mut(),
        _ => None,
    }
}

async fn on_server_frame(
    ctx: &Context,
    st: &mut UpstreamState,
    frame: Frame,
    out: &mut BytesMut,
) -> Result<(), Stop> {
    let lock_err = || Stop::quiet(EndReason::Error("internal state poisoned".into()));
    if !matches!(frame.tag(), b'D' | b'd') {
        st.streamed.settle(ctx)?;
    }
    match frame.tag() {
        b'D' => {
            if st.masking {
                if st.cells.is_none() {
                    let fields = current_fields(ctx, st).map_err(|_| lock_err())?;
                    st.cells = Some(match fields {
                        Shape::Known(fields, formats) => {
                            plan(ctx, &st.masker, &mut st.plans, &fields, formats.as_deref()).await
                        }
                        // Rows of a statement the server never described on this
                        // connection: describe it on the proxy's own connection.
                        Shape::Describe(sql, formats) => match ctx.catalog.describe(&sql).await {
                            Ok(fields) => Arc::new(
                                plan_cells(ctx, &st.masker, &fields, formats.as_deref())
                                    .await
                                    .0,
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot describe a statement's result; masking its rows by content");
                                Arc::new(Vec::new())
                            }
                        },
                        Shape::Unknown => Arc::new(Vec::new()),
                    });
                }
                let mut report = MaskReport::new();
                let cells = st.cells.as_deref().map(Vec::as_slice).unwrap_or_default();
                // Nothing to mask in a row whose every column passes as is.
                let replaced = if passes_whole(cells, &frame) {
                    None
                } else {
                    mask_row(&st.masker, cells, &frame, &mut report)
                        .map_err(|e| Stop::quiet(EndReason::Error(format!("upstream row: {e}"))))?
                };
                let sent = replaced.as_ref().unwrap_or(&frame);
                out.extend_from_slice(sent.raw());
                st.streamed.add(sent.wire_len(), &report);
            } else {
                out.extend_from_slice(frame.raw());
                st.streamed.add(frame.wire_len(), &MaskReport::new());
            }
            return Ok(());
        }
        b'd' => {
            // COPY TO STDOUT rows: masked by their columns' sources, learnt when the copy
            // started (CopyOutResponse).
            if st.masking {
                let mut report = MaskReport::new();
                let masked = match st.copy.as_mut() {
                    Some(copy) => mask_copy_data(&st.masker, copy, frame.body(), &mut report),
                    None => Some(st.masker.mask_bytes(frame.body(), &mut report).into_owned()),
                };
                let sent = match masked {
                    Some(m) if m != frame.body() => Frame::new(b'd', &m),
                    _ => frame.clone(),
                };
                out.extend_from_slice(sent.raw());
                st.streamed.add(sent.wire_len(), &report);
            } else {
                out.extend_from_slice(frame.raw());
            }
            return Ok(());
        }
        b'T' => {
            let fields = match &st.last_description {
                Some((body, fields)) if body.as_slice() == frame.body() => fields.clone(),
                _ => {
                    let desc = RowDescription::parse(&frame)
                        .map_err(|e| Stop::quiet(EndReason::Error(format!("upstream: {e}"))))?;
                    let fields = Arc::new(desc.fields);
                    st.last_description = Some((frame.body().to_vec(), fields.clone()));
                    fields
                }
            };
            let described = {
                let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
                match q.front() {
                    Some(Expect::DescribeStatement(id)) => {
                        if let Some(id) = *id {
                            st.shapes.describe_statement(id, fields.clone());
                        }
                        q.pop_front();
                        true
                    }
                    Some(Expect::DescribePortal(name)) => {
                        let name = name.clone();
                        q.pop_front();
                        // The portal's statement has this shape too, for later Executes
                        // that Bind it again without describing (JDBC does).
                        if let Some(&(statement, _)) = st.shapes.bound.get(&name) {
                            st.shapes.describe_statement(statement, fields.clone());
                        }
                        st.shapes.portals.insert(name, fields.clone());
                        true
                    }
                    _ => false,
                }
            };
            if !described {
                // The shape of the result about to stream (simple query).
                st.cells = if st.masking {
                    Some(plan(ctx, &st.masker, &mut st.plans, &fields, None).await)
                } else {
                    None
                };
            }
        }
        b'n' => {
            let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
            if matches!(
                q.front(),
                Some(Expect::DescribeStatement(_) | Expect::DescribePortal(_))
            ) {
                q.pop_front();
            }
        }
        b't' => {}
        b'1' | b'3' => {
            let answered = ctx.expect.lock().map_err(|_| lock_err())?.pop_front();
            let (change, replaced) = match answered {
                Some(Expect::Parse {
                    change,
                    name,
                    statement,
                }) => (change, ctx.statements().insert(name, statement)),
                Some(Expect::CloseStatement { change, name }) => {
                    (change, ctx.statements().remove(&name))
                }
                _ => (0, None),
            };
            if let Some(old) = replaced {
                st.shapes.statements.remove(&old.id);
            }
            if change > 0 {
                ctx.settle(change);
            }
        }
        b'2' => {
            let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
            if let Some(Expect::Bind {
                portal,
                statement,
                result_formats,
            }) = q.pop_front()
            {
                st.shapes.portals.remove(&portal);
                if st.shapes.bound.len() >= MAX_NAMED && !st.shapes.bound.contains_key(&portal) {
                    st.shapes.bound.clear();
                }
                st.shapes.bound.insert(portal, (statement, result_formats));
            }
        }
        b'C' | b'I' | b's' => {
            let rows = if frame.tag() == b'C' {
                CommandComplete::parse(&frame).ok().and_then(|c| c.rows())
            } else {
                None
            };
            st.cells = None;
            let rows = rows.unwrap_or(0);
            let finished = {
                let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
                match q.front_mut() {
                    Some(Expect::Execute { .. }) => match q.pop_front() {
                        Some(Expect::Execute { op, .. }) => Some(op),
                        _ => None,
                    },
                    // A Query completes statement by statement, each its own record, made
                    // at ReadyForQuery (see `Expect::Query`).
                    Some(Expect::Query { ops, done }) => {
                        if let Some(mut op) = ops.pop_front() {
                            op.rows += rows;
                            done.push(op);
                        }
                        None
                    }
                    _ => None,
                }
            };
            if let Some(mut op) = finished {
                op.rows += rows;
                record(ctx, *op, "ok").await?;
            }
        }
        b'E' => {
            let fields = ErrorFields::parse(&frame).unwrap_or_default();
            let mut replace: Option<Frame> = None;
            let mut finished: Vec<OpRecord> = Vec::new();
            let mut skipped_change = 0;
            {
                let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
                let simple = matches!(q.front(), Some(Expect::Query { .. }));
                if let Some(op) = front_op(&mut q) {
                    match &op.denial {
                        Some(d) if fields.message.contains(&d.marker) => {
                            replace = Some(d.error.clone());
                            op.error = Some(format!("refused by agentgate: {}", op.reason));
                        }
                        _ => op.error = Some(format!("{}: {}", fields.code, fields.message)),
                    }
                } else if let Some(Expect::Query { done, .. }) = q.front_mut()
                    && let Some(last) = done.last_mut()
                {
                    // An error after every statement completed. The server commits a
                    // Query's implicit transaction before completing its last statement, so
                    // a failed commit is that statement's error; should one come later, the
                    // last statement carries it.
                    last.error = Some(format!(
                        "{}: {} (as the query's implicit transaction ended)",
                        fields.code, fields.message
                    ));
                }
                if let Some(Expect::Query { ops, done }) = q.front_mut() {
                    // The failed statement ends here; the server skips the rest of the Query,
                    // which ReadyForQuery records as skipped, with those that completed.
                    done.extend(ops.pop_front());
                } else if !simple {
                    // Extended protocol: the server skips everything up to the next Sync.
                    let mut first = true;
                    while let Some(e) = q.front() {
                        if matches!(e, Expect::Sync) {
                            break;
                        }
                        match q.pop_front() {
                            Some(Expect::Execute { mut op, .. })
                            | Some(Expect::FunctionCall { mut op }) => {
                                if !first {
                                    op.skipped = true;
                                }
                                first = false;
                                finished.push(*op);
                            }
                            // Not done: what the name denotes stays as it was.
                            Some(
                                Expect::Parse { change, .. }
                                | Expect::CloseStatement { change, .. },
                            ) => skipped_change = change,
                            _ => {}
                        }
                    }
                }
            }
            if skipped_change > 0 {
                ctx.settle(skipped_change);
            }
            for op in finished {
                let status = if op.skipped { "skipped" } else { "error" };
                record(ctx, op, status).await?;
            }
            st.cells = None;
            let sent = replace.unwrap_or(frame);
            out.extend_from_slice(sent.raw());
            return Ok(());
        }
        b'Z' => {
            st.cells = None;
            let mut finished = Vec::new();
            {
                let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
                while let Some(e) = q.pop_front() {
                    match e {
                        Expect::Sync => break,
                        Expect::Query { ops, mut done } => {
                            let idle = frame.body().first() == Some(&b'I');
                            mark_rolled_back(&mut done, idle);
                            finished.append(&mut done);
                            // Statements of the Query that never completed did not run.
                            finished.extend(ops.into_iter().map(|mut op| {
                                if op.error.is_none() {
                                    op.skipped = true;
                                }
                                op
                            }));
                            break;
                        }
                        Expect::FunctionCall { op } => {
                            finished.push(*op);
                            break;
                        }
                        Expect::Execute { mut op, .. } => {
                            op.skipped = true;
                            finished.push(*op);
                        }
                        // Never answered, so not done; a Bind waiting on it goes on.
                        Expect::Parse { change, .. } | Expect::CloseStatement { change, .. } => {
                            ctx.settle(change);
                        }
                        _ => {}
                    }
                }
            }
            for op in finished {
                let status = if op.error.is_some() {
                    "error"
                } else if op.skipped {
                    "skipped"
                } else if op.rolled_back {
                    "rolled_back"
                } else {
                    "ok"
                };
                record(ctx, op, status).await?;
            }
        }
        b'H' if st.masking => {
            st.cells = None;
            let format = agentgate_pgwire::CopyResponse::parse(&frame)
                .map_err(|e| Stop::quiet(EndReason::Error(format!("upstream: {e}"))))?;
            let source = {
                let mut q = ctx.expect.lock().map_err(|_| lock_err())?;
                front_op(&mut q).and_then(|op| op.copy_source.clone())
            };
            let binary = format.format == 1;
            let cells = match source {
                Some(sql) => match ctx.catalog.describe(&sql).await {
                    Ok(fields) => {
                        let formats = vec![if binary { 1 } else { 0 }];
                        plan_cells(ctx, &st.masker, &fields, Some(&formats)).await.0
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot describe the COPY source; masking its rows by content");
                        Vec::new()
                    }
                },
                None => Vec::new(),
            };
            st.copy = Some(CopyMask {
                cells,
                binary,
                header_done: false,
            });
        }
        b'c' => st.copy = None,
        b'S' => {
            // The classifier reads statements as UTF-8 with standard-conforming strings; a
            // server reading them otherwise could run something else than what was decided.
            let mut c = agentgate_pgwire::Cursor::new(frame.body(), "ParameterStatus");
            if let (Ok(name), Ok(value)) = (c.cstr(), c.cstr()) {
                let unsafe_setting = match name {
                    "client_encoding" => !value.eq_ignore_ascii_case("UTF8"),
                    "standard_conforming_strings" => value != "on",
                    _ => false,
                };
                if unsafe_setting {
                    let message = format!(
                        "agentgate: the server now uses {name} = {value}, under which statements would not be read as they were checked; the session is ended"
                    );
                    return Err(Stop {
                        notify: Some(build::error(
                            "FATAL",
                            agentgate_pgwire::FEATURE_NOT_SUPPORTED,
                            &message,
                            None,
                        )),
                        reason: EndReason::Error(message),
                    });
                }
            }
        }
        b'H' | b'G' | b'W' => {
            st.cells = None;
        }
        _ => {}
    }
    out.extend_from_slice(frame.raw());
    Ok(())
}

/// What the proxy knows of the rows an Execute streams.
enum Shape {
    /// Described by the server on this connection (with Bind's formats, if they apply).
    Known(Arc<Vec<FieldDescription>>, Option<Vec<i16>>),
    /// Not described: the statement's text, to describe, and Bind's formats.
    Describe(Arc<str>, Option<Vec<i16>>),
    /// Nothing to go on (no Execute at the front).
    Unknown,
}

/// The result shape of the Execute at the front: the portal's own description, else its
/// statement's with Bind's result formats, else the statement's text to describe.
fn current_fields(ctx: &Context, st: &UpstreamState) -> Result<Shape, ()> {
    let q = ctx.expect.lock().map_err(|_| ())?;
    let Some(Expect::Execute { portal, sql, .. }) = q.front() else {
        return Ok(Shape::Unknown);
    };
    if let Some(f) = st.shapes.portals.get(portal) {
        return Ok(Shape::Known(f.clone(), None));
    }
    let bound = st.shapes.bound.get(portal);
    let formats = bound.map(|(_, f)| f.clone());
    if let Some(f) = bound.and_then(|(statement, _)| st.shapes.statements.get(statement)) {
        return Ok(Shape::Known(f.clone(), formats));
    }
    Ok(match sql {
        Some(sql) => Shape::Describe(sql.clone(), formats),
        None => Shape::Unknown,
    })
}

/// Records the statements still waiting for the server when the session ended (revoked,
/// expired, a connection lost): statements of a Query that completed keep their outcome, a
/// refused one its refusal, and the rest are `interrupted`, with why. Call it once both
/// directions have stopped.
pub async fn record_unanswered(ctx: &Context, why: &str) {
    let pending: Vec<Expect> = match ctx.expect.lock() {
        Ok(mut q) => q.drain(..).collect(),
        Err(_) => return,
    };
    let mut unanswered: Vec<(OpRecord, bool)> = Vec::new();
    for e in pending {
        match e {
            Expect::Execute { op, .. } | Expect::FunctionCall { op } => {
                unanswered.push((*op, false));
            }
            Expect::Query { ops, done } => {
                unanswered.extend(done.into_iter().map(|op| (op, true)));
                unanswered.extend(ops.into_iter().map(|op| (op, false)));
            }
            _ => {}
        }
    }
    let mut held = None;
    ctx.with_held(|h| held = h.take());
    for (mut op, completed) in unanswered {
        let status = if op.error.is_some() {
            "error"
        } else if op.skipped {
            "skipped"
        } else if op.denial.is_some() {
            op.error = Some(format!("refused by agentgate: {}", op.reason));
            "error"
        } else if completed {
            "ok"
        } else {
            op.error = Some(format!(
                "the session ended before the server answered: {why}"
            ));
            "interrupted"
        };
        if record(ctx, op, status).await.is_err() {
            return;
        }
    }
    // Sent after everything above, so recorded after it.
    if let Some(mut op) = held {
        op.error = Some(format!(
            "the session ended while the statement waited for approval: {why}"
        ));
        let _ = record(ctx, op, "interrupted").await;
    }
}

async fn record(ctx: &Context, op: OpRecord, status: &str) -> Result<(), Stop> {
    let event = OperationEvent {
        operation: op.operation,
        decision: op.decision,
        reason: op.reason,
        rule: op.rule,
        approval_id: op.approval_id.unwrap_or_default(),
        parameters: op.parameters,
        started_at: op.started_at,
        duration: op.started.elapsed(),
        rows: op.rows,
        bytes: op.bytes,
        status: status.to_owned(),
        error: op.error.unwrap_or_default(),
        masked: op.masked,
        kind: None,
        attributes: HashMap::new(),
    };
    ctx.session
        .record_operation(event)
        .await
        .map_err(|e| Stop::quiet(EndReason::RecordingFailed(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(sql: &str) -> Operation {
        let classification = agentgate_sql_classify::classify(sql).expect("parses");
        operation_for(sql, &classification)
    }

    #[test]
    fn one_statement_is_its_own_command_classes_and_tables() {
        let op = operation("SELECT * FROM accounts a JOIN accounts b USING (id)");
        assert_eq!(op.action, "select");
        assert_eq!(op.risk_classes, [agentgate_sql_classify::risk::READ]);
        assert_eq!(op.targets, ["accounts"]);
        assert!(op.attributes.is_empty());
        assert_eq!(
            op.text,
            "SELECT * FROM accounts a JOIN accounts b USING (id)"
        );
    }

    #[test]
    fn a_multi_statement_query_joins_commands_and_merges_classes_and_tables() {
        use agentgate_sql_classify::risk;
        let sql = "BEGIN; DELETE FROM accounts; SELECT * FROM accounts, audit; COMMIT";
        let op = operation(sql);
        assert_eq!(op.action, "begin;delete;select;commit");
        assert_eq!(op.targets, ["accounts", "audit"]);
        let distinct: std::collections::HashSet<&String> = op.risk_classes.iter().collect();
        assert_eq!(
            distinct.len(),
            op.risk_classes.len(),
            "{:?}",
            op.risk_classes
        );
        for class in [risk::READ, risk::WRITE_UNBOUNDED] {
            assert!(
                op.risk_classes.iter().any(|c| c == class),
                "{:?}",
                op.risk_classes
            );
        }
        assert_eq!(
            op.attributes.get("statements").map(String::as_str),
            Some("4")
        );
    }
}
