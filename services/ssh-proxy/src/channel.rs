//! One session channel: pty, env, exec, shell, sftp, window changes and signals, relayed to a
//! channel of the same kind on the host, with a decision before anything runs.
//!
//! Two tasks per channel, one per direction, so that a direction waiting for its window never
//! stops the other from draining (russh applies back-pressure by pausing a connection's
//! reader when a channel's queue is full):
//!
//! - *in* (agent → host): requests in order; `exec`, `shell` and `subsystem` are classified,
//!   decided and, where the policy wants a human, held — while the agent's input is kept
//!   (up to [`HOLD_BUFFER`]) and the agent reads on stderr what it waits for;
//!   shell input goes through the line discipline ([`crate::lines`]);
//! - *out* (host → agent): output through the session's stream masker (not for sftp and
//!   file-transfer commands, whose streams are binary protocols), into the recording, then
//!   to the agent; exit status and exit signal passed back; the operation recorded at the end
//!   with its exit status, duration and bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentgate_masking::{MaskReport, StreamMasker};
use agentgate_proto::common::v1::{Decision, Operation, Protocol};
use agentgate_session::{ApprovalOutcome, LocalDecision, OperationEvent, Session};
use agentgate_shell_classify::classify;
use bytes::Bytes;
use russh::server::Msg as ServerMsg;
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{Mutex, mpsc};

use crate::cast::{CastRecorder, Header};
use crate::conn::Conn;
use crate::lines::{AltScreen, Feed, LineBuffer};
use crate::sftp::{FileOp, SftpLog};

/// Agent input kept while an operation waits for approval; past it the agent's connection
/// waits (back-pressure).
pub const HOLD_BUFFER: usize = 4 * 1024 * 1024;
/// How long held output (a possible secret's start) waits for more before it is decided.
const MASK_IDLE: Duration = Duration::from_millis(20);

type UpWrite = ChannelWriteHalf<russh::client::Msg>;

#[derive(Debug, Clone)]
struct Pty {
    term: String,
    cols: u32,
    rows: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Exec,
    Shell,
    Sftp,
}

struct In {
    conn: Arc<Conn>,
    session: Session,
    id: ChannelId,
    up: Arc<UpWrite>,
    pty: Option<Pty>,
    mode: Mode,
    /// Agent input that arrived before the command started.
    early: Vec<Bytes>,
    early_eof: bool,
    lines: LineBuffer,
    alt_screen: Arc<AtomicBool>,
    cast: Option<Arc<Mutex<CastRecorder>>>,
    sftp: Option<Arc<Mutex<SftpLog>>>,
}

/// Runs one session channel to its end.
pub async fn run(conn: Arc<Conn>, agent: Channel<ServerMsg>) {
    let id = agent.id();
    let Some(session) = conn.session() else {
        return;
    };
    let (mut agent_rx, agent_tx) = agent.split();
    let Some(upstream) = conn.upstream() else {
        return;
    };
    let up = match upstream.handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            let _ = agent_tx
                .extended_data_bytes(
                    1,
                    format!("agentgate: the host refused a new channel: {e}\r\n").into_bytes(),
                )
                .await;
            let _ = agent_tx.exit_status(1).await;
            let _ = agent_tx.close().await;
            return;
        }
    };
    let (up_rx, up_tx) = up.split();
    conn.register(id, false);
    let mut state = In {
        conn: conn.clone(),
        session,
        id,
        up: Arc::new(up_tx),
        pty: None,
        mode: Mode::Idle,
        early: Vec::new(),
        early_eof: false,
        lines: LineBuffer::default(),
        alt_screen: Arc::new(AtomicBool::new(false)),
        cast: None,
        sftp: None,
    };
    let mut out = Some((up_rx, agent_tx));
    while let Some(msg) = agent_rx.wait().await {
        if !state.handle(msg, &mut agent_rx, &mut out).await {
            break;
        }
    }
    let _ = state.up.close().await;
    conn.forget(id);
}

impl In {
    fn handle_out(&self) -> Option<russh::server::Handle> {
        self.conn.server()
    }

    /// A line for the agent on the channel's stderr (with CRLF on a terminal).
    async fn tell(&self, message: &str) {
        let text = if self.pty.is_some() {
            format!("{message}\r\n")
        } else {
            format!("{message}\n")
        };
        if let Some(h) = self.handle_out() {
            let _ = h.extended_data(self.id, 1, text.into_bytes()).await;
        }
    }

    /// Refuses the channel's command: the message, exit status 1, close.
    async fn refuse(&self, message: &str) {
        self.tell(message).await;
        if let Some(h) = self.handle_out() {
            let _ = h.exit_status_request(self.id, 1).await;
            let _ = h.eof(self.id).await;
            let _ = h.close(self.id).await;
        }
    }

    /// Returns false when the channel is done.
    async fn handle(
        &mut self,
        msg: ChannelMsg,
        agent_rx: &mut ChannelReadHalf,
        out: &mut Option<(ChannelReadHalf, ChannelWriteHalf<ServerMsg>)>,
    ) -> bool {
        match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                self.pty = Some(Pty {
                    term: term.clone(),
                    cols: col_width,
                    rows: row_height,
                });
                self.conn.register(self.id, true);
                let _ = self
                    .up
                    .request_pty(
                        false,
                        &term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        &terminal_modes,
                    )
                    .await;
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                let policy = self.session.policy().settings.get("ssh.allowed_env");
                if crate::env_allowed(
                    &variable_name,
                    policy.map(String::as_str),
                    &self.conn.shared.config.allowed_env,
                ) {
                    let _ = self.up.set_env(false, variable_name, variable_value).await;
                } else {
                    tracing::debug!(session = %self.session.id(), name = %variable_name, "environment variable not passed");
                }
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(p) = &mut self.pty {
                    p.cols = col_width;
                    p.rows = row_height;
                }
                let _ = self
                    .up
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await;
                if let Some(c) = &self.cast {
                    c.lock().await.resize(col_width, row_height).await;
                }
            }
            ChannelMsg::Signal { signal } => {
                let _ = self.up.signal(signal).await;
            }
            // Ask the host for agent forwarding on the matching channel, before the command
            // starts, when policy allows it; its agent channels come back through the
            // upstream handler. Refused: the host never hears of it.
            ChannelMsg::AgentForward { .. }
                if crate::conn::agent_forward_allowed(&self.session) =>
            {
                let _ = self.up.agent_forward(false).await;
            }
            ChannelMsg::Exec { command, .. } if self.mode == Mode::Idle => {
                return self.exec(command, agent_rx, out).await;
            }
            ChannelMsg::RequestShell { .. } if self.mode == Mode::Idle => {
                return self.shell(agent_rx, out).await;
            }
            ChannelMsg::RequestSubsystem { name, .. } if self.mode == Mode::Idle => {
                return self.subsystem(name, agent_rx, out).await;
            }
            ChannelMsg::Data { data } => {
                return self.data(data, agent_rx).await && self.release_kept_input(agent_rx).await;
            }
            ChannelMsg::Eof => {
                if self.mode == Mode::Idle {
                    self.early_eof = true;
                } else {
                    return self.agent_eof(agent_rx).await;
                }
            }
            ChannelMsg::Close => return false,
            _ => {}
        }
        true
    }

    /// Holds `op` for approval while keeping the agent's input; returns the outcome and
    /// whether the channel is still open.
    async fn hold(
        &mut self,
        op: &Operation,
        decision: &LocalDecision,
        agent_rx: &mut ChannelReadHalf,
    ) -> (ApprovalOutcome, bool) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let session = self.session.clone();
        let hold = session.hold_for_approval(op, decision, "", move |p| {
            let _ = tx.send(p.message());
        });
        tokio::pin!(hold);
        let mut kept = 0usize;
        loop {
            tokio::select! {
                outcome = &mut hold => return (outcome, true),
                Some(message) = rx.recv() => {
                    self.tell(&message).await;
                    if let Some(c) = &self.cast {
                        c.lock().await.marker(&format!("held: {message}")).await;
                    }
                }
                msg = agent_rx.wait(), if kept < HOLD_BUFFER => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        kept += data.len();
                        self.early.push(data);
                    }
                    Some(ChannelMsg::Eof) => self.early_eof = true,
                    Some(ChannelMsg::Close) | None => {
                        // The agent left: dropping the hold cancels the request.
                        return (
                            ApprovalOutcome::SessionEnded {
                                approval_id: None,
                                reason: agentgate_session::EndReason::ClientClosed,
                            },
                            false,
                        );
                    }
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        let _ = self.up.window_change(col_width, row_height, pix_width, pix_height).await;
                    }
                    Some(_) => {}
                },
            }
        }
    }

    /// Decides (and holds) `op`; returns the event to record and whether it may run, and
    /// whether the channel is still open.
    async fn decide(
        &mut self,
        op: Operation,
        agent_rx: &mut ChannelReadHalf,
    ) -> (OperationEvent, bool, bool) {
        let decision = self.session.decide(&op);
        let mut event = OperationEvent::new(op.clone(), &decision);
        let mut open = true;
        match decision.decision {
            Decision::Allow => {}
            Decision::NeedsApproval => {
                let (outcome, still_open) = self.hold(&op, &decision, agent_rx).await;
                open = still_open;
                event.decision = outcome.decision();
                event.reason = outcome.message();
                event.approval_id = outcome.approval_id().unwrap_or_default().into();
                if open {
                    self.tell(&format!("agentgate: {}", outcome.message()))
                        .await;
                }
            }
            _ => {}
        }
        let allowed = event.decision == Decision::Allow;
        if let Some(c) = &self.cast {
            let label = if allowed {
                format!("allowed: {}", op.text)
            } else {
                format!("refused: {}: {}", op.text, event.reason)
            };
            c.lock().await.marker(&label).await;
        }
        event.duration = event.started_at.elapsed().unwrap_or_default();
        (event, allowed, open)
    }

    fn title(&self) -> String {
        format!(
            "{} on {} as {}",
            self.session.principal().subject,
            self.session.connection().name,
            self.session.role()
        )
    }

    async fn exec(
        &mut self,
        command: Vec<u8>,
        agent_rx: &mut ChannelReadHalf,
        out: &mut Option<(ChannelReadHalf, ChannelWriteHalf<ServerMsg>)>,
    ) -> bool {
        let text = String::from_utf8_lossy(&command).into_owned();
        let c = classify(&text);
        let mut risk_classes: Vec<String> = c.risk_classes.iter().map(|s| s.to_string()).collect();
        if c.transfer.is_some() {
            risk_classes.push("ssh.sftp".into());
        }
        let mut attributes = std::collections::HashMap::new();
        if !c.reasons.is_empty() {
            attributes.insert("destructive_because".to_owned(), c.reasons.join("; "));
        }
        if let Some(t) = c.transfer {
            attributes.insert("transfer".to_owned(), t.to_owned());
        }
        if let Some(p) = &self.pty {
            attributes.insert(
                "pty".to_owned(),
                format!("{}x{} {}", p.cols, p.rows, p.term),
            );
        }
        let op = Operation {
            protocol: Protocol::Ssh as i32,
            action: "exec".into(),
            text: text.clone(),
            targets: c.commands.clone(),
            risk_classes,
            attributes,
        };
        // A terminal recording for every exec (capped without a pty), except transfers.
        if c.transfer.is_none() {
            let limit = if self.pty.is_some() {
                None
            } else {
                Some(self.conn.shared.config.exec_record_limit)
            };
            let mut cast = CastRecorder::new(self.session.clone(), self.id.into(), limit);
            cast.header(Header {
                width: self.pty.as_ref().map_or(80, |p| p.cols),
                height: self.pty.as_ref().map_or(24, |p| p.rows),
                term: self.pty.as_ref().map(|p| p.term.as_str()),
                command: Some(&text),
                title: self.title(),
            })
            .await;
            self.cast = Some(Arc::new(Mutex::new(cast)));
        }
        let (mut event, allowed, open) = self.decide(op, agent_rx).await;
        if !allowed {
            if open {
                self.refuse(&format!("agentgate: refused: {}", event.reason))
                    .await;
            }
            event.status = "refused".into();
            let _ = self.session.record_operation(event).await;
            if let Some(c) = &self.cast {
                c.lock().await.finish().await;
            }
            return false;
        }
        self.mode = Mode::Exec;
        let _ = self.up.exec(false, command).await;
        self.start_out(out, event, c.transfer.is_none());
        self.release_early().await
    }

    async fn shell(
        &mut self,
        agent_rx: &mut ChannelReadHalf,
        out: &mut Option<(ChannelReadHalf, ChannelWriteHalf<ServerMsg>)>,
    ) -> bool {
        let op = Operation {
            protocol: Protocol::Ssh as i32,
            action: "shell".into(),
            text: "(interactive shell)".into(),
            risk_classes: vec!["ssh.shell".into()],
            attributes: self
                .pty
                .as_ref()
                .map(|p| {
                    [(
                        "pty".to_owned(),
                        format!("{}x{} {}", p.cols, p.rows, p.term),
                    )]
                    .into_iter()
                    .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut cast = CastRecorder::new(self.session.clone(), self.id.into(), None);
        cast.header(Header {
            width: self.pty.as_ref().map_or(80, |p| p.cols),
            height: self.pty.as_ref().map_or(24, |p| p.rows),
            term: self.pty.as_ref().map(|p| p.term.as_str()),
            command: None,
            title: self.title(),
        })
        .await;
        self.cast = Some(Arc::new(Mutex::new(cast)));
        let (mut event, allowed, open) = self.decide(op, agent_rx).await;
        if !allowed {
            if open {
                self.refuse(&format!("agentgate: refused: {}", event.reason))
                    .await;
            }
            event.status = "refused".into();
            let _ = self.session.record_operation(event).await;
            return false;
        }
        self.mode = Mode::Shell;
        let _ = self.up.request_shell(false).await;
        self.start_out(out, event, true);
        // Input typed before the shell started goes through the line discipline too.
        self.release_kept_input(agent_rx).await
    }

    /// In a shell, the input the agent sent while the shell or a line waited for approval
    /// (kept by [`Self::hold`]), once that is decided: through the line discipline like any
    /// input, after the held line, so its own lines are decided in turn (and may be held
    /// again).
    async fn release_kept_input(&mut self, agent_rx: &mut ChannelReadHalf) -> bool {
        if self.mode != Mode::Shell {
            return true;
        }
        while !self.early.is_empty() {
            for data in std::mem::take(&mut self.early) {
                if !self.data(data, agent_rx).await {
                    return false;
                }
            }
        }
        if std::mem::take(&mut self.early_eof) {
            return self.agent_eof(agent_rx).await;
        }
        true
    }

    /// The agent's end of input, once the command runs. In a shell, a last line without a
    /// newline is submitted (and decided) first.
    async fn agent_eof(&mut self, agent_rx: &mut ChannelReadHalf) -> bool {
        if self.mode == Mode::Shell && !self.lines.is_empty() {
            let held = self.lines.feed(b"\n");
            for f in held {
                if !self.feed(f, agent_rx).await {
                    return false;
                }
            }
        }
        let _ = self.up.eof().await;
        true
    }

    async fn subsystem(
        &mut self,
        name: String,
        agent_rx: &mut ChannelReadHalf,
        out: &mut Option<(ChannelReadHalf, ChannelWriteHalf<ServerMsg>)>,
    ) -> bool {
        if name != "sftp" {
            self.refuse(&format!("agentgate: the {name} subsystem is not available"))
                .await;
            return false;
        }
        let op = Operation {
            protocol: Protocol::Ssh as i32,
            action: "sftp".into(),
            text: "sftp subsystem".into(),
            risk_classes: vec!["ssh.sftp".into()],
            ..Default::default()
        };
        let (mut event, allowed, open) = self.decide(op, agent_rx).await;
        if !allowed {
            if open {
                self.refuse(&format!("agentgate: refused: {}", event.reason))
                    .await;
            }
            event.status = "refused".into();
            let _ = self.session.record_operation(event).await;
            return false;
        }
        self.mode = Mode::Sftp;
        self.sftp = Some(Arc::new(Mutex::new(SftpLog::default())));
        let _ = self.up.request_subsystem(false, "sftp").await;
        self.start_out(out, event, false);
        self.release_early().await
    }

    /// Sends what the agent sent before the command started.
    async fn release_early(&mut self) -> bool {
        let early = std::mem::take(&mut self.early);
        for data in early {
            if !self.forward(data).await {
                return false;
            }
        }
        if std::mem::take(&mut self.early_eof) {
            let _ = self.up.eof().await;
        }
        true
    }

    fn start_out(
        &mut self,
        out: &mut Option<(ChannelReadHalf, ChannelWriteHalf<ServerMsg>)>,
        event: OperationEvent,
        mask: bool,
    ) {
        let Some((up_rx, agent_tx)) = out.take() else {
            return;
        };
        let Some(handle) = self.conn.server() else {
            return;
        };
        let ctx = Out {
            session: self.session.clone(),
            id: self.id,
            handle,
            agent: agent_tx,
            mask,
            cast: self.cast.clone(),
            sftp: self.sftp.clone(),
            alt_screen: self.alt_screen.clone(),
            track_alt: self.mode == Mode::Shell,
            record_op: self.mode != Mode::Shell && self.mode != Mode::Sftp,
            conn: self.conn.clone(),
        };
        if self.mode != Mode::Exec {
            // Shell and sftp starts are recorded now; their parts follow.
            let session = self.session.clone();
            tokio::spawn(async move {
                let _ = session.record_operation(event).await;
            });
            tokio::spawn(ctx.run(up_rx, None));
        } else {
            tokio::spawn(ctx.run(up_rx, Some(event)));
        }
    }

    async fn data(&mut self, data: Bytes, agent_rx: &mut ChannelReadHalf) -> bool {
        match self.mode {
            Mode::Idle => {
                self.early.push(data);
                true
            }
            Mode::Exec => self.forward(data).await,
            Mode::Sftp => {
                if let Some(log) = &self.sftp {
                    let ops = log.lock().await.client_bytes(&data);
                    record_file_ops(&self.session, ops).await;
                }
                self.forward(data).await
            }
            Mode::Shell => {
                if self.alt_screen.load(Ordering::Relaxed) && self.lines.is_empty() {
                    if let Some(c) = &self.cast {
                        c.lock().await.input(&data).await;
                    }
                    return self.forward(data).await;
                }
                let feeds = self.lines.feed(&data);
                for f in feeds {
                    if !self.feed(f, agent_rx).await {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// One step of the line discipline.
    async fn feed(&mut self, f: Feed, agent_rx: &mut ChannelReadHalf) -> bool {
        match f {
            Feed::Forward(bytes) => {
                if let Some(c) = &self.cast {
                    c.lock().await.input(&bytes).await;
                }
                self.forward(Bytes::from(bytes)).await
            }
            Feed::Line {
                raw,
                text,
                uncertain,
            } => {
                if let Some(c) = &self.cast {
                    c.lock().await.input(&raw).await;
                }
                if text.trim().is_empty() && !uncertain {
                    return self.forward(Bytes::from(raw)).await;
                }
                let c = classify(&text);
                let mut risk_classes: Vec<String> =
                    c.risk_classes.iter().map(|s| s.to_string()).collect();
                let mut reasons = c.reasons.clone();
                if uncertain {
                    reasons.push(
                        "the line was edited with keys the proxy cannot follow (history, completion, cursor movement)".into(),
                    );
                    if !risk_classes
                        .iter()
                        .any(|r| r == agentgate_shell_classify::DESTRUCTIVE)
                    {
                        risk_classes.push(agentgate_shell_classify::DESTRUCTIVE.into());
                    }
                }
                let mut attributes = std::collections::HashMap::new();
                if !reasons.is_empty() {
                    attributes.insert("destructive_because".to_owned(), reasons.join("; "));
                }
                let op = Operation {
                    protocol: Protocol::Ssh as i32,
                    action: "shell.line".into(),
                    text: text.clone(),
                    targets: c.commands,
                    risk_classes,
                    attributes,
                };
                let (mut event, allowed, open) = self.decide(op, agent_rx).await;
                if !open {
                    let _ = self.session.record_operation(event).await;
                    return false;
                }
                if allowed {
                    event.status = "sent".into();
                    let _ = self.session.record_operation(event).await;
                    self.forward(Bytes::from(raw)).await
                } else {
                    event.status = "refused".into();
                    self.tell(&format!("agentgate: refused: {}", event.reason))
                        .await;
                    let _ = self.session.record_operation(event).await;
                    // The line never reached the shell; an empty line brings its prompt back.
                    self.forward(Bytes::from_static(b"\r")).await
                }
            }
        }
    }

    async fn forward(&self, data: Bytes) -> bool {
        self.session.count_bytes(data.len() as u64, 0);
        self.up.data_bytes(data).await.is_ok()
    }
}

/// The host → agent direction of one channel.
struct Out {
    conn: Arc<Conn>,
    session: Session,
    id: ChannelId,
    handle: russh::server::Handle,
    agent: ChannelWriteHalf<ServerMsg>,
    mask: bool,
    cast: Option<Arc<Mutex<CastRecorder>>>,
    sftp: Option<Arc<Mutex<SftpLog>>>,
    alt_screen: Arc<AtomicBool>,
    /// Whether to follow the host's alternate-screen switches (shells only).
    track_alt: bool,
    record_op: bool,
}

impl Out {
    async fn run(self, mut up: ChannelReadHalf, mut event: Option<OperationEvent>) {
        let masker = self.session.masker();
        // No masking rule for terminal output: no masker, no copy.
        let masking = self.mask && !masker.is_noop();
        let mut stdout: Option<StreamMasker> = masking.then(|| masker.stream());
        let mut stderr: Option<StreamMasker> = masking.then(|| masker.stream());
        let mut report = MaskReport::new();
        let mut alt = AltScreen::default();
        let mut bytes = 0u64;
        let mut status = String::new();
        let mut clean_close = false;
        let mut idle_at: Option<tokio::time::Instant> = None;
        let started = Instant::now();
        loop {
            let cast_deadline = match &self.cast {
                Some(c) => c.lock().await.flush_deadline(),
                None => None,
            };
            let deadline = [idle_at, cast_deadline.map(tokio::time::Instant::from_std)]
                .into_iter()
                .flatten()
                .min();
            let msg = tokio::select! {
                m = up.wait() => m,
                _ = sleep_until(deadline) => {
                    self.flush_maskers(&mut stdout, &mut stderr, &mut report, &mut alt).await;
                    idle_at = None;
                    if let Some(c) = &self.cast {
                        c.lock().await.flush().await;
                    }
                    continue;
                }
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    bytes += data.len() as u64;
                    if let Some(log) = &self.sftp {
                        let ops = log.lock().await.server_bytes(&data);
                        record_file_ops(&self.session, ops).await;
                    }
                    let [built, passed] = mask(&mut stdout, data, &mut report);
                    if stdout.as_ref().is_some_and(|m| m.held() > 0) {
                        idle_at = Some(tokio::time::Instant::now() + MASK_IDLE);
                    }
                    if !self.send(None, built, &mut alt).await
                        || !self.send(None, passed, &mut alt).await
                    {
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    bytes += data.len() as u64;
                    let [built, passed] = mask(&mut stderr, data, &mut report);
                    if stderr.as_ref().is_some_and(|m| m.held() > 0) {
                        idle_at = Some(tokio::time::Instant::now() + MASK_IDLE);
                    }
                    if !self.send(Some(ext), built, &mut alt).await
                        || !self.send(Some(ext), passed, &mut alt).await
                    {
                        break;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    self.flush_maskers(&mut stdout, &mut stderr, &mut report, &mut alt)
                        .await;
                    let _ = self.agent.eof().await;
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    self.flush_maskers(&mut stdout, &mut stderr, &mut report, &mut alt)
                        .await;
                    status = exit_status.to_string();
                    let _ = self.handle.exit_status_request(self.id, exit_status).await;
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                }) => {
                    self.flush_maskers(&mut stdout, &mut stderr, &mut report, &mut alt)
                        .await;
                    status = format!("signal {signal_name:?}");
                    let _ = self
                        .handle
                        .exit_signal_request(
                            self.id,
                            signal_name,
                            core_dumped,
                            error_message,
                            lang_tag,
                        )
                        .await;
                }
                Some(ChannelMsg::Close) => {
                    clean_close = true;
                    break;
                }
                None => break,
                Some(_) => {}
            }
        }
        self.flush_maskers(&mut stdout, &mut stderr, &mut report, &mut alt)
            .await;
        if !clean_close && status.is_empty() {
            // The host's side of the channel vanished without an exit status or a close:
            // the host (or the connection to it) died.
            let _ = self
                .agent
                .extended_data_bytes(
                    1,
                    Bytes::from_static(b"agentgate: the host closed the connection\r\n"),
                )
                .await;
            status = "host closed the connection".into();
        }
        let _ = self.agent.close().await;
        if let Some(c) = &self.cast {
            c.lock().await.finish().await;
        }
        if let Some(log) = &self.sftp {
            let (ops, note) = {
                let mut l = log.lock().await;
                (l.finish(), l.stop_reason.take())
            };
            record_file_ops(&self.session, ops).await;
            if let Some(note) = note {
                let _ = self
                    .session
                    .record_event(
                        "session.notice",
                        None,
                        [("notice".to_owned(), note)].into_iter().collect(),
                    )
                    .await;
            }
        }
        if self.record_op
            && let Some(mut e) = event.take()
        {
            e.status = if status.is_empty() {
                "no exit status".into()
            } else {
                status
            };
            e.bytes = bytes;
            e.duration += started.elapsed();
            e.masked = report;
            let _ = self.session.record_operation(e).await;
        }
        self.conn.forget(self.id);
    }

    async fn flush_maskers(
        &self,
        stdout: &mut Option<StreamMasker>,
        stderr: &mut Option<StreamMasker>,
        report: &mut MaskReport,
        alt: &mut AltScreen,
    ) {
        for (ext, m) in [(None, stdout), (Some(1u32), stderr)] {
            if let Some(m) = m.as_mut()
                && m.held() > 0
            {
                let mut out = Vec::new();
                m.flush(&mut out, report);
                if !out.is_empty() {
                    let _ = self.send(ext, Bytes::from(out), alt).await;
                }
            }
        }
    }

    /// Sends output to the agent and into the recording.
    async fn send(&self, ext: Option<u32>, data: Bytes, alt: &mut AltScreen) -> bool {
        if data.is_empty() {
            return true;
        }
        self.session.count_bytes(0, data.len() as u64);
        if let Some(c) = &self.cast {
            c.lock().await.output(&data).await;
        }
        if self.track_alt {
            alt.observe(&data);
            self.alt_screen.store(alt.active(), Ordering::Relaxed);
        }
        match ext {
            None => self.agent.data_bytes(data).await.is_ok(),
            Some(ext) => self.agent.extended_data_bytes(ext, data).await.is_ok(),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Output through the stream masker, as two parts to send in order: what the masker had to
/// build (held bytes, masked secrets), then the part of `data` it passed through unchanged —
/// a slice of the buffer russh handed over, not a copy (bulk output is scanned once and
/// never copied by the proxy).
fn mask(masker: &mut Option<StreamMasker>, data: Bytes, report: &mut MaskReport) -> [Bytes; 2] {
    match masker {
        Some(m) => {
            let mut built = Vec::new();
            let passed = m.push_borrowed(&data, &mut built, report);
            [Bytes::from(built), data.slice(passed)]
        }
        None => [Bytes::new(), data],
    }
}

/// Records sftp file operations as `session.sftp` events.
async fn record_file_ops(session: &Session, ops: Vec<FileOp>) {
    for op in ops {
        let text = match &op.target {
            Some(t) => format!("{} {} -> {}", op.action, op.path, t),
            None => format!("{} {}", op.action, op.path),
        };
        let mut targets = vec![op.path.clone()];
        targets.extend(op.target.clone());
        let operation = Operation {
            protocol: Protocol::Ssh as i32,
            action: format!("sftp.{}", op.action),
            text,
            targets,
            risk_classes: vec!["ssh.sftp".into()],
            ..Default::default()
        };
        let decision = LocalDecision {
            decision: Decision::Allow,
            rule: None,
            reason: "sftp subsystem allowed for the session".into(),
        };
        let mut event = OperationEvent::new(operation, &decision);
        event.bytes = op.bytes;
        event.status = op.status.clone();
        if op.status != "ok" {
            event.error = op.status;
        }
        event.kind = Some("session.sftp".into());
        let _ = session.record_operation(event).await;
    }
}

/// Relays a forwarded TCP channel as is (policy allowed it).
#[allow(clippy::collapsible_match)] // an await in a match guard would hide the write
pub async fn relay_plain(agent: Channel<ServerMsg>, upstream: Channel<russh::client::Msg>) {
    let (mut a_rx, a_tx) = agent.split();
    let (mut u_rx, u_tx) = upstream.split();
    let to_host = async {
        while let Some(m) = a_rx.wait().await {
            match m {
                ChannelMsg::Data { data } => {
                    if u_tx.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = u_tx.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = u_tx.close().await;
    };
    let to_agent = async {
        while let Some(m) = u_rx.wait().await {
            match m {
                ChannelMsg::Data { data } => {
                    if a_tx.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = a_tx.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = a_tx.close().await;
    };
    tokio::join!(to_host, to_agent);
}
