//! Terminal recording as asciicast v2, streamed into the audit store as it happens.
//!
//! Each session channel that runs a shell or a command is one recording. Every piece is an
//! audit event of kind [`KIND`] with a `TerminalChunk` (seconds since the channel started,
//! the asciicast code, the bytes) and the attribute `channel`:
//!
//! | code | data |
//! | --- | --- |
//! | `h` | the asciicast v2 header line (JSON: version, width, height, timestamp, env, title, command) — agentgate's addition, first of each channel |
//! | `o` | output the agent saw (after masking), coalesced up to [`COALESCE_BYTES`] or [`COALESCE_DELAY`] |
//! | `i` | input the agent sent |
//! | `r` | a resize, `COLSxROWS` |
//! | `m` | a marker: a decision (`allowed: ...`, `held for approval ...`, `denied: ...`) |
//!
//! `agentgate sessions replay ID` and `agentgate sessions export ID -o x.cast` rebuild the
//! `.cast` file from these events. Output chunks never split a UTF-8 character, so every
//! chunk converts to text on its own. Commands run without a pty are recorded up to a limit
//! (`exec_record_limit`); what is cut is counted in a final marker.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentgate_proto::audit::v1::TerminalChunk;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_session::Session;

/// The audit event kind of recording chunks.
pub const KIND: &str = "session.terminal";
/// Output is sent as one chunk once this much is pending...
pub const COALESCE_BYTES: usize = 32 * 1024;
/// ...or once the oldest pending byte is this old.
pub const COALESCE_DELAY: Duration = Duration::from_millis(50);

/// The recording of one channel.
pub struct CastRecorder {
    session: Session,
    channel: u32,
    started: Instant,
    limit: Option<usize>,
    recorded: usize,
    dropped: u64,
    pending: Vec<u8>,
    pending_at: Option<Instant>,
}

/// The asciicast header of a channel.
pub struct Header<'a> {
    /// Terminal columns (80 without a pty).
    pub width: u32,
    /// Terminal rows (24 without a pty).
    pub height: u32,
    /// TERM, when a pty was requested.
    pub term: Option<&'a str>,
    /// The command, for exec channels.
    pub command: Option<&'a str>,
    /// A title: user, connection, role.
    pub title: String,
}

impl CastRecorder {
    /// A recording for `channel`; `limit` caps the recorded output (commands without a pty).
    pub fn new(session: Session, channel: u32, limit: Option<usize>) -> CastRecorder {
        CastRecorder {
            session,
            channel,
            started: Instant::now(),
            limit,
            recorded: 0,
            dropped: 0,
            pending: Vec::new(),
            pending_at: None,
        }
    }

    fn offset(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64()
    }

    async fn chunk(&self, offset: f64, code: &str, data: Vec<u8>) {
        let mut attributes = HashMap::new();
        attributes.insert("channel".to_owned(), self.channel.to_string());
        let detail = Detail::Terminal(TerminalChunk {
            offset_seconds: (offset * 1e6).round() / 1e6,
            code: code.to_owned(),
            data,
        });
        if let Err(e) = self
            .session
            .record_event(KIND, Some(detail), attributes)
            .await
        {
            tracing::debug!(session = %self.session.id(), error = %e, "terminal chunk not recorded");
        }
    }

    /// Records the header (first).
    pub async fn header(&mut self, h: Header<'_>) {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut env = serde_json::Map::new();
        if let Some(term) = h.term {
            env.insert("TERM".into(), term.into());
        }
        env.insert("SHELL".into(), "/bin/sh".into());
        let mut header = serde_json::json!({
            "version": 2,
            "width": h.width.max(1),
            "height": h.height.max(1),
            "timestamp": timestamp,
            "env": env,
            "title": h.title,
        });
        if let Some(c) = h.command {
            header["command"] = c.into();
        }
        self.started = Instant::now();
        self.chunk(0.0, "h", header.to_string().into_bytes()).await;
    }

    /// Output the agent saw; coalesced.
    pub async fn output(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let take = match self.limit {
            Some(limit) => {
                let room = limit.saturating_sub(self.recorded + self.pending.len());
                if room < data.len() {
                    self.dropped += (data.len() - room) as u64;
                }
                room.min(data.len())
            }
            None => data.len(),
        };
        if take == 0 {
            return;
        }
        if self.pending_at.is_none() {
            self.pending_at = Some(Instant::now());
        }
        self.pending.extend_from_slice(&data[..take]);
        if self.pending.len() >= COALESCE_BYTES {
            self.flush().await;
        }
    }

    /// When pending output must go out at the latest.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.pending_at.map(|t| t + COALESCE_DELAY)
    }

    /// Sends pending output, keeping an incomplete UTF-8 character for the next chunk.
    pub async fn flush(&mut self) {
        self.flush_inner(false).await;
    }

    async fn flush_inner(&mut self, all: bool) {
        let Some(at) = self.pending_at else { return };
        let cut = if all {
            self.pending.len()
        } else {
            utf8_safe_len(&self.pending)
        };
        if cut == 0 {
            return;
        }
        let rest = self.pending.split_off(cut);
        let data = std::mem::replace(&mut self.pending, rest);
        self.recorded += data.len();
        self.pending_at = if self.pending.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        let offset = self.offset(at);
        self.chunk(offset, "o", data).await;
    }

    /// Input the agent sent.
    pub async fn input(&mut self, data: &[u8]) {
        self.flush().await;
        let offset = self.offset(Instant::now());
        self.chunk(offset, "i", data.to_vec()).await;
    }

    /// The terminal was resized.
    pub async fn resize(&mut self, cols: u32, rows: u32) {
        self.flush().await;
        let offset = self.offset(Instant::now());
        self.chunk(offset, "r", format!("{cols}x{rows}").into_bytes())
            .await;
    }

    /// A marker (a decision).
    pub async fn marker(&mut self, label: &str) {
        self.flush().await;
        let offset = self.offset(Instant::now());
        self.chunk(offset, "m", label.as_bytes().to_vec()).await;
    }

    /// Ends the recording: pending output, and a marker for what the limit cut.
    pub async fn finish(&mut self) {
        self.flush_inner(true).await;
        if self.dropped > 0 {
            let label = format!(
                "recording limit reached: {} more bytes of output not recorded",
                self.dropped
            );
            self.dropped = 0;
            self.marker(&label).await;
        }
    }
}

/// Builds asciicast v2 files from a session's recorded chunks (`(channel, chunk)` in record
/// order): one `(channel, .cast text)` per channel, in order of first appearance. A channel
/// without a header chunk gets an 80x24 one.
pub fn asciicast(
    chunks: impl IntoIterator<Item = (String, TerminalChunk)>,
) -> Vec<(String, String)> {
    let mut order: Vec<String> = Vec::new();
    let mut files: HashMap<String, (Option<String>, Vec<String>)> = HashMap::new();
    for (channel, chunk) in chunks {
        if !files.contains_key(&channel) {
            order.push(channel.clone());
        }
        let entry = files.entry(channel).or_default();
        if chunk.code == "h" {
            entry.0 = Some(String::from_utf8_lossy(&chunk.data).into_owned());
            continue;
        }
        let line = serde_json::json!([
            chunk.offset_seconds,
            chunk.code,
            String::from_utf8_lossy(&chunk.data)
        ]);
        entry.1.push(line.to_string());
    }
    order
        .into_iter()
        .filter_map(|channel| {
            let (header, lines) = files.remove(&channel)?;
            let header = header.unwrap_or_else(|| {
                serde_json::json!({"version": 2, "width": 80, "height": 24}).to_string()
            });
            let mut text = header;
            text.push('\n');
            for l in lines {
                text.push_str(&l);
                text.push('\n');
            }
            Some((channel, text))
        })
        .collect()
}

/// Checks that `text` is an asciicast v2 file a player accepts: a JSON header with
/// `version: 2` and positive `width` and `height`, then `[time, code, data]` events with
/// non-decreasing times, known codes and string data.
pub fn validate_asciicast(text: &str) -> Result<(), String> {
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().ok_or("empty file")?)
        .map_err(|e| format!("header: {e}"))?;
    if header["version"] != 2 {
        return Err(format!("header version is {}, not 2", header["version"]));
    }
    for field in ["width", "height"] {
        if header[field].as_u64().unwrap_or(0) == 0 {
            return Err(format!("header {field} is not a positive integer"));
        }
    }
    let mut last = 0.0f64;
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("event {}: {e}", i + 1))?;
        let a = v
            .as_array()
            .ok_or(format!("event {} is not an array", i + 1))?;
        if a.len() != 3 {
            return Err(format!("event {} has {} elements", i + 1, a.len()));
        }
        let t = a[0].as_f64().ok_or(format!("event {} time", i + 1))?;
        if t + 1e-9 < last {
            return Err(format!("event {} goes back in time ({t} < {last})", i + 1));
        }
        last = t;
        let code = a[1].as_str().ok_or(format!("event {} code", i + 1))?;
        if !matches!(code, "o" | "i" | "r" | "m") {
            return Err(format!("event {} has unknown code {code:?}", i + 1));
        }
        if !a[2].is_string() {
            return Err(format!("event {} data is not a string", i + 1));
        }
    }
    Ok(())
}

/// The longest prefix of `b` that does not end inside a UTF-8 character (invalid bytes count
/// as complete).
pub fn utf8_safe_len(b: &[u8]) -> usize {
    let n = b.len();
    // Look back at most 3 bytes for the start of a multi-byte sequence.
    for back in 1..=3.min(n) {
        let c = b[n - back];
        if c & 0xC0 == 0x80 {
            continue; // continuation byte
        }
        let need = if c & 0xE0 == 0xC0 {
            2
        } else if c & 0xF0 == 0xE0 {
            3
        } else if c & 0xF8 == 0xF0 {
            4
        } else {
            1
        };
        return if need > back { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_valid_cast_files_per_channel() {
        let chunk = |o: f64, code: &str, data: &str| TerminalChunk {
            offset_seconds: o,
            code: code.into(),
            data: data.as_bytes().to_vec(),
        };
        let chunks = vec![
            (
                "0".to_owned(),
                chunk(
                    0.0,
                    "h",
                    r#"{"version":2,"width":120,"height":40,"timestamp":1}"#,
                ),
            ),
            ("0".to_owned(), chunk(0.1, "o", "$ ")),
            ("1".to_owned(), chunk(0.0, "o", "no header")),
            ("0".to_owned(), chunk(0.2, "i", "ls\r")),
            ("0".to_owned(), chunk(0.3, "r", "100x30")),
            ("0".to_owned(), chunk(0.4, "m", "allowed: ls")),
        ];
        let files = asciicast(chunks);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "0");
        validate_asciicast(&files[0].1).expect("valid");
        validate_asciicast(&files[1].1).expect("valid");
        assert!(
            files[0]
                .1
                .lines()
                .nth(3)
                .unwrap_or_default()
                .contains("100x30")
        );
        assert!(validate_asciicast("{\"version\":1}").is_err());
        assert!(
            validate_asciicast(
                "{\"version\":2,\"width\":1,\"height\":1}\n[2,\"o\",\"a\"]\n[1,\"o\",\"b\"]"
            )
            .is_err()
        );
    }

    #[test]
    fn utf8_cuts_keep_characters_whole() {
        let s = "aé€😀".as_bytes();
        assert_eq!(utf8_safe_len(s), s.len());
        for cut in 0..s.len() {
            let n = utf8_safe_len(&s[..cut]);
            assert!(std::str::from_utf8(&s[..n]).is_ok(), "cut {cut} -> {n}");
            assert!(cut - n < 4);
        }
        assert_eq!(utf8_safe_len(b"\xff\xff"), 2);
    }
}
