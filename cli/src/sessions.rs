//! `agentgate sessions replay|export`: terminal recordings of SSH sessions (asciicast v2),
//! played in the terminal with their timing or written to a `.cast` file that asciinema
//! plays.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use agentgate_proto::audit::v1::ReplaySessionRequest;
use agentgate_proto::audit::v1::TerminalChunk;
use agentgate_proto::audit::v1::audit_event::Detail;
use anyhow::{Context as _, bail};
use clap::Subcommand;
use tokio_stream::StreamExt as _;

use crate::client::{StoreArgs, status};

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// Play a session's terminal recording here, with its timing.
    Replay {
        /// The session id (as `agentgate audit sessions` lists it).
        session: String,
        /// Which channel of the session (as listed when there are several); default the
        /// first.
        #[arg(long)]
        channel: Option<String>,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Longest pause between two events, whatever the recording says.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        max_wait: Duration,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write a session's terminal recording as an asciicast v2 file (`asciinema play FILE`).
    Export {
        /// The session id.
        session: String,
        /// The .cast file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Which channel; default the first.
        #[arg(long)]
        channel: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The recording of one channel: (channel, .cast text), chosen among the session's.
async fn recording(
    store: &StoreArgs,
    session: &str,
    channel: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let mut c = store.connect().await?;
    let mut stream = c
        .replay_session(ReplaySessionRequest {
            session_id: session.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut chunks: Vec<(String, TerminalChunk)> = Vec::new();
    while let Some(stored) = stream.next().await {
        let stored = stored.map_err(status)?;
        let Some(event) = stored.event else { continue };
        if event.kind != agentgate_ssh_proxy::cast::KIND {
            continue;
        }
        if let Some(Detail::Terminal(t)) = event.detail {
            let ch = event.attributes.get("channel").cloned().unwrap_or_default();
            chunks.push((ch, t));
        }
    }
    let mut casts = agentgate_ssh_proxy::cast::asciicast(chunks);
    if casts.is_empty() {
        bail!("session {session} has no terminal recording (not an SSH session, or nothing ran)");
    }
    if casts.len() > 1 {
        let names: Vec<&str> = casts.iter().map(|(c, _)| c.as_str()).collect();
        eprintln!(
            "session {session} has {} recorded channels: {}",
            casts.len(),
            names.join(", ")
        );
    }
    match channel {
        Some(want) => casts
            .into_iter()
            .find(|(c, _)| c == want)
            .with_context(|| format!("session {session} has no recorded channel {want}")),
        None => Ok(casts.swap_remove(0)),
    }
}

pub async fn run(cmd: SessionsCommand) -> anyhow::Result<()> {
    match cmd {
        SessionsCommand::Export {
            session,
            output,
            channel,
            store,
        } => {
            let (channel, cast) = recording(&store, &session, channel.as_deref()).await?;
            agentgate_ssh_proxy::cast::validate_asciicast(&cast)
                .map_err(|e| anyhow::anyhow!("the recording is not valid asciicast: {e}"))?;
            std::fs::write(&output, &cast)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "wrote channel {channel} of session {session} to {} ({} events); play it with: asciinema play {}",
                output.display(),
                cast.lines().count().saturating_sub(1),
                output.display()
            );
            Ok(())
        }
        SessionsCommand::Replay {
            session,
            channel,
            speed,
            max_wait,
            store,
        } => {
            if speed <= 0.0 || !speed.is_finite() {
                bail!("--speed must be a positive number");
            }
            let (_, cast) = recording(&store, &session, channel.as_deref()).await?;
            play(&cast, speed, max_wait).await
        }
    }
}

/// Plays a .cast: output to stdout with the recorded pauses (divided by `speed`, capped at
/// `max_wait`), markers to stderr.
async fn play(cast: &str, speed: f64, max_wait: Duration) -> anyhow::Result<()> {
    let mut lines = cast.lines();
    let header: serde_json::Value =
        serde_json::from_str(lines.next().unwrap_or("{}")).context("recording header")?;
    eprintln!(
        "replaying {} ({}x{}); markers show agentgate's decisions",
        header["title"].as_str().unwrap_or("session"),
        header["width"],
        header["height"]
    );
    let mut out = std::io::stdout().lock();
    let mut last = 0.0f64;
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).context("recording event")?;
        let t = event[0].as_f64().unwrap_or(last);
        let wait =
            Duration::from_secs_f64(((t - last).max(0.0) / speed).min(max_wait.as_secs_f64()));
        last = t;
        if !wait.is_zero() {
            out.flush()?;
            tokio::time::sleep(wait).await;
        }
        let data = event[2].as_str().unwrap_or_default();
        match event[1].as_str() {
            Some("o") => out.write_all(data.as_bytes())?,
            Some("m") => {
                out.flush()?;
                eprintln!("\r\n[agentgate] {data}\r");
            }
            Some("r") => {
                out.flush()?;
                eprintln!("\r\n[agentgate] terminal resized to {data}\r");
            }
            _ => {}
        }
    }
    out.flush()?;
    eprintln!();
    Ok(())
}
