//! The file-operation log of an sftp channel: the proxy relays the sftp protocol (version 3,
//! draft-ietf-secsh-filexfer-02, what OpenSSH speaks) untouched and reads a copy of it, to
//! record each operation with its path and bytes.
//!
//! Requests (agent → host) give the operation and path; responses (host → agent) give the
//! outcome and, for reads, the bytes. An open file is recorded once, when it is closed, with
//! the bytes read and written through its handle; a directory listing when its handle is
//! closed; remove, rename, mkdir, rmdir, setstat and symlink when the host answers them.
//! A packet larger than [`MAX_PACKET`] stops the log for that channel (the transfer itself
//! goes on; the log notes it).

use std::collections::HashMap;

/// Largest sftp packet the log reads (OpenSSH sends at most 256 KiB + headers).
pub const MAX_PACKET: usize = 512 * 1024;

const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const OPENDIR: u8 = 11;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;

/// One recorded file operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    /// `read`, `write`, `open`, `list`, `remove`, `rename`, `mkdir`, `rmdir`, `setstat`,
    /// `symlink`, `hardlink`.
    pub action: &'static str,
    /// The path.
    pub path: String,
    /// The second path (rename and link targets).
    pub target: Option<String>,
    /// Bytes read plus bytes written.
    pub bytes: u64,
    /// `ok`, or the host's error.
    pub status: String,
}

#[derive(Debug)]
enum Pending {
    Open {
        path: String,
        dir: bool,
    },
    Read {
        handle: Vec<u8>,
    },
    Close {
        handle: Vec<u8>,
    },
    Op {
        action: &'static str,
        path: String,
        target: Option<String>,
    },
}

#[derive(Debug, Default)]
struct OpenFile {
    path: String,
    dir: bool,
    read: u64,
    written: u64,
}

/// Both directions of one sftp channel.
#[derive(Debug, Default)]
pub struct SftpLog {
    requests: Vec<u8>,
    responses: Vec<u8>,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, OpenFile>,
    stopped: bool,
    /// Set once when the log stopped (for one notice).
    pub stop_reason: Option<String>,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (x, rest) = self.b.split_first()?;
        self.b = rest;
        Some(*x)
    }
    fn u32(&mut self) -> Option<u32> {
        if self.b.len() < 4 {
            return None;
        }
        let (x, rest) = self.b.split_at(4);
        self.b = rest;
        Some(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if self.b.len() < n {
            return None;
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Some(x)
    }
    fn text(&mut self) -> Option<String> {
        self.string()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

impl SftpLog {
    /// Reads bytes the agent sent.
    pub fn client_bytes(&mut self, data: &[u8]) -> Vec<FileOp> {
        if self.stopped {
            return Vec::new();
        }
        self.requests.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(packet) = self.next_packet(true) {
            self.request(&packet, &mut out);
        }
        out
    }

    /// Reads bytes the host sent.
    pub fn server_bytes(&mut self, data: &[u8]) -> Vec<FileOp> {
        if self.stopped {
            return Vec::new();
        }
        self.responses.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(packet) = self.next_packet(false) {
            self.response(&packet, &mut out);
        }
        out
    }

    /// Files still open when the channel ends: recorded as they stand.
    pub fn finish(&mut self) -> Vec<FileOp> {
        self.handles
            .drain()
            .map(|(_, f)| file_op(f, "channel closed before the file was"))
            .collect()
    }

    fn next_packet(&mut self, requests: bool) -> Option<Vec<u8>> {
        let buf = if requests {
            &mut self.requests
        } else {
            &mut self.responses
        };
        if buf.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_PACKET {
            self.stopped = true;
            self.stop_reason = Some(format!(
                "an sftp packet of {len} bytes exceeds the log's limit; file operations of this channel are no longer recorded"
            ));
            self.requests = Vec::new();
            self.responses = Vec::new();
            return None;
        }
        if buf.len() < 4 + len {
            return None;
        }
        let packet = buf[4..4 + len].to_vec();
        buf.drain(..4 + len);
        Some(packet)
    }

    fn request(&mut self, packet: &[u8], _out: &mut [FileOp]) {
        let mut r = Reader { b: packet };
        let Some(kind) = r.u8() else { return };
        let Some(id) = r.u32() else { return };
        let pending = match kind {
            OPEN => r.text().map(|path| Pending::Open { path, dir: false }),
            OPENDIR => r.text().map(|path| Pending::Open { path, dir: true }),
            READ => r.string().map(|h| Pending::Read { handle: h.to_vec() }),
            WRITE => {
                if let Some(h) = r.string() {
                    let _offset = (r.u32(), r.u32());
                    if let Some(data) = r.string()
                        && let Some(f) = self.handles.get_mut(h)
                    {
                        f.written += data.len() as u64;
                    }
                }
                None
            }
            CLOSE => r.string().map(|h| Pending::Close { handle: h.to_vec() }),
            REMOVE => r.text().map(|path| op("remove", path, None)),
            MKDIR => r.text().map(|path| op("mkdir", path, None)),
            RMDIR => r.text().map(|path| op("rmdir", path, None)),
            SETSTAT => r.text().map(|path| op("setstat", path, None)),
            FSETSTAT => r.string().map(|h| {
                let path = self
                    .handles
                    .get(h)
                    .map(|f| f.path.clone())
                    .unwrap_or_default();
                op("setstat", path, None)
            }),
            RENAME => match (r.text(), r.text()) {
                (Some(a), Some(b)) => Some(op("rename", a, Some(b))),
                _ => None,
            },
            SYMLINK => match (r.text(), r.text()) {
                // OpenSSH sends (target, link) — the reverse of the draft.
                (Some(a), Some(b)) => Some(op("symlink", b, Some(a))),
                _ => None,
            },
            EXTENDED => match r.text().as_deref() {
                Some("posix-rename@openssh.com") => match (r.text(), r.text()) {
                    (Some(a), Some(b)) => Some(op("rename", a, Some(b))),
                    _ => None,
                },
                Some("hardlink@openssh.com") => match (r.text(), r.text()) {
                    (Some(a), Some(b)) => Some(op("hardlink", b, Some(a))),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        if let Some(p) = pending {
            if self.pending.len() >= 4096 {
                self.pending.clear();
            }
            self.pending.insert(id, p);
        }
    }

    fn response(&mut self, packet: &[u8], out: &mut Vec<FileOp>) {
        let mut r = Reader { b: packet };
        let Some(kind) = r.u8() else { return };
        let Some(id) = r.u32() else { return };
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (kind, pending) {
            (HANDLE, Pending::Open { path, dir }) => {
                if let Some(h) = r.string() {
                    self.handles.insert(
                        h.to_vec(),
                        OpenFile {
                            path,
                            dir,
                            ..Default::default()
                        },
                    );
                }
            }
            (STATUS, Pending::Open { path, dir }) => {
                let status = status_text(&mut r);
                out.push(FileOp {
                    action: if dir { "list" } else { "open" },
                    path,
                    target: None,
                    bytes: 0,
                    status,
                });
            }
            (DATA, Pending::Read { handle }) => {
                if let Some(data) = r.string()
                    && let Some(f) = self.handles.get_mut(&handle)
                {
                    f.read += data.len() as u64;
                }
            }
            (_, Pending::Close { handle }) => {
                if let Some(f) = self.handles.remove(&handle) {
                    out.push(file_op(f, ""));
                }
            }
            (
                STATUS,
                Pending::Op {
                    action,
                    path,
                    target,
                },
            ) => out.push(FileOp {
                action,
                path,
                target,
                bytes: 0,
                status: status_text(&mut r),
            }),
            _ => {}
        }
    }
}

fn op(action: &'static str, path: String, target: Option<String>) -> Pending {
    Pending::Op {
        action,
        path,
        target,
    }
}

fn file_op(f: OpenFile, note: &str) -> FileOp {
    let action = if f.dir {
        "list"
    } else if f.written > 0 {
        "write"
    } else if f.read > 0 {
        "read"
    } else {
        "open"
    };
    FileOp {
        action,
        path: f.path,
        target: None,
        bytes: f.read + f.written,
        status: if note.is_empty() {
            "ok".into()
        } else {
            format!("{note} closed")
        },
    }
}

fn status_text(r: &mut Reader<'_>) -> String {
    match r.u32() {
        Some(0) => "ok".into(),
        Some(code) => {
            let message = r.text().unwrap_or_default();
            let name = match code {
                1 => "eof",
                2 => "no such file",
                3 => "permission denied",
                4 => "failure",
                5 => "bad message",
                8 => "unsupported",
                _ => "error",
            };
            if message.is_empty() {
                name.into()
            } else {
                format!("{name}: {message}")
            }
        }
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, id: u32, body: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend_from_slice(&id.to_be_bytes());
        for b in body {
            p.extend_from_slice(b);
        }
        let mut out = (p.len() as u32).to_be_bytes().to_vec();
        out.extend(p);
        out
    }

    fn s(x: &[u8]) -> Vec<u8> {
        let mut v = (x.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(x);
        v
    }

    #[test]
    fn a_write_and_a_read_are_recorded_at_close_split_anywhere() {
        let mut log = SftpLog::default();
        let mut req = Vec::new();
        req.extend(packet(
            OPEN,
            1,
            &[
                &s(b"/tmp/up.bin"),
                &26u32.to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        ));
        let mut resp = Vec::new();
        resp.extend(packet(HANDLE, 1, &[&s(b"h1")]));
        req.extend(packet(
            WRITE,
            2,
            &[&s(b"h1"), &0u64.to_be_bytes(), &s(&[7u8; 1000])],
        ));
        req.extend(packet(CLOSE, 3, &[&s(b"h1")]));
        resp.extend(packet(STATUS, 2, &[&0u32.to_be_bytes()]));
        resp.extend(packet(STATUS, 3, &[&0u32.to_be_bytes()]));
        let mut ops = Vec::new();
        // Requests arrive byte by byte: OPEN first, then its HANDLE reply, then the rest.
        let open_len = 4 + u32::from_be_bytes([req[0], req[1], req[2], req[3]]) as usize;
        for b in &req[..open_len] {
            ops.extend(log.client_bytes(std::slice::from_ref(b)));
        }
        let handle_len = 4 + u32::from_be_bytes([resp[0], resp[1], resp[2], resp[3]]) as usize;
        ops.extend(log.server_bytes(&resp[..handle_len]));
        for chunk in req[open_len..].chunks(7) {
            ops.extend(log.client_bytes(chunk));
        }
        ops.extend(log.server_bytes(&resp[handle_len..]));
        assert_eq!(
            ops,
            vec![FileOp {
                action: "write",
                path: "/tmp/up.bin".into(),
                target: None,
                bytes: 1000,
                status: "ok".into()
            }]
        );
        // A remove that fails.
        let ops = log.client_bytes(&packet(REMOVE, 9, &[&s(b"/etc/passwd")]));
        assert!(ops.is_empty());
        let mut err = 3u32.to_be_bytes().to_vec();
        err.extend(s(b"Permission denied"));
        let ops = log.server_bytes(&packet(STATUS, 9, &[&err]));
        assert_eq!(ops[0].action, "remove");
        assert!(ops[0].status.contains("permission denied"), "{:?}", ops[0]);
    }

    #[test]
    fn oversized_packets_stop_the_log() {
        let mut log = SftpLog::default();
        log.client_bytes(&(10_000_000u32).to_be_bytes());
        assert!(log.stop_reason.is_some());
        assert!(log.client_bytes(b"anything").is_empty());
    }
}
