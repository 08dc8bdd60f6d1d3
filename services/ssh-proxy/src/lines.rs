//! The line discipline of interactive shells: what the agent types is held back until it
//! submits a line (`\r` or `\n`), so the proxy can classify the line before the host's shell
//! sees any of it.
//!
//! This is best effort, by nature: the proxy sees keystrokes, not commands. Backspace,
//! Ctrl-U and Ctrl-W are applied to the line as a shell's line editor would; keys whose
//! effect depends on the host's state (Tab completion, history with arrows or Ctrl-R/P/N,
//! cursor movement, other escape sequences) make the line *uncertain*, which the proxy treats
//! as destructive (it cannot know what would run). Ctrl-C discards the held line. While a
//! full-screen program runs (the host switched to the alternate screen), keystrokes pass
//! through unheld. Programs that read lines which are not shell commands (a REPL, a
//! password prompt) see their lines classified as shell lines too.

/// Longest held line; a longer one is submitted as uncertain.
pub const MAX_LINE: usize = 16 * 1024;

/// What to do with agent input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Send these bytes to the host now.
    Forward(Vec<u8>),
    /// A submitted line: decide on `text`, then send `raw` (or not).
    Line {
        /// The bytes as typed, terminator included.
        raw: Vec<u8>,
        /// The line after applying the editing keys.
        text: String,
        /// Keys the proxy could not follow were used.
        uncertain: bool,
    },
}

/// The held, unsubmitted input of one shell channel.
#[derive(Debug, Default)]
pub struct LineBuffer {
    raw: Vec<u8>,
    /// The previous byte submitted a line with `\r`: a following `\n` belongs to it.
    after_cr: bool,
}

impl LineBuffer {
    /// Whether input is held.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Feeds input; returns what to do, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Feed> {
        let mut out = Vec::new();
        for &b in data {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match b {
                b'\n' if after_cr && self.raw.is_empty() => out.push(Feed::Forward(vec![b])),
                b'\r' | b'\n' => {
                    self.raw.push(b);
                    self.after_cr = b == b'\r';
                    out.push(self.submit());
                }
                // Ctrl-C: the held line never reached the host; drop it.
                0x03 => {
                    self.raw.clear();
                    out.push(Feed::Forward(vec![b]));
                }
                // Ctrl-D, Ctrl-Z, Ctrl-\ on an empty line go through.
                0x04 | 0x1a | 0x1c if self.raw.is_empty() => out.push(Feed::Forward(vec![b])),
                _ => {
                    self.raw.push(b);
                    if self.raw.len() >= MAX_LINE {
                        let mut f = self.submit();
                        if let Feed::Line { uncertain, .. } = &mut f {
                            *uncertain = true;
                        }
                        out.push(f);
                    }
                }
            }
        }
        out
    }

    fn submit(&mut self) -> Feed {
        let raw = std::mem::take(&mut self.raw);
        let (text, uncertain) = edit(&raw);
        Feed::Line {
            raw,
            text,
            uncertain,
        }
    }
}

/// Applies line-editing keys to the typed bytes.
pub fn edit(raw: &[u8]) -> (String, bool) {
    let mut line: Vec<char> = Vec::new();
    let mut uncertain = false;
    let text = String::from_utf8_lossy(raw);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {}
            '\u{7f}' | '\u{8}' => {
                line.pop();
            }
            '\u{15}' => line.clear(),
            '\u{17}' => {
                while line.last().is_some_and(|c| c.is_whitespace()) {
                    line.pop();
                }
                while line.last().is_some_and(|c| !c.is_whitespace()) {
                    line.pop();
                }
            }
            '\u{1b}' => {
                uncertain = true;
                // Skip the escape sequence: ESC [ params final, or ESC O x, or ESC x.
                match chars.peek() {
                    Some('[') => {
                        chars.next();
                        for c in chars.by_ref() {
                            if ('\u{40}'..='\u{7e}').contains(&c) {
                                break;
                            }
                        }
                    }
                    Some('O') => {
                        chars.next();
                        chars.next();
                    }
                    Some(_) => {
                        chars.next();
                    }
                    None => {}
                }
            }
            c if c.is_control() && c != '\t' => uncertain = true,
            '\t' => {
                // Completion: what the host inserts is unknown.
                uncertain = true;
                line.push(' ');
            }
            c => line.push(c),
        }
    }
    (line.into_iter().collect(), uncertain)
}

/// Tracks whether the host switched to the alternate screen (a full-screen program runs),
/// across output chunks.
#[derive(Debug, Default)]
pub struct AltScreen {
    active: bool,
    tail: Vec<u8>,
}

impl AltScreen {
    /// Whether a full-screen program has the terminal.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Looks at output the host sent (one linear pass over the escape characters).
    pub fn observe(&mut self, out: &[u8]) {
        const SWITCHES: [(&[u8], bool); 6] = [
            (b"\x1b[?1049h", true),
            (b"\x1b[?1049l", false),
            (b"\x1b[?1047h", true),
            (b"\x1b[?1047l", false),
            (b"\x1b[?47h", true),
            (b"\x1b[?47l", false),
        ];
        let mut hay = std::mem::take(&mut self.tail);
        hay.extend_from_slice(out);
        for (i, _) in hay.iter().enumerate().filter(|(_, b)| **b == 0x1b) {
            let rest = &hay[i..];
            if let Some((_, on)) = SWITCHES.iter().find(|(seq, _)| rest.starts_with(seq)) {
                self.active = *on;
            }
        }
        // Keep a tail that may hold the start of a switch cut by the chunk boundary.
        let keep = hay.len().min(7);
        let from = hay.len() - keep;
        self.tail = match hay[from..].iter().position(|b| *b == 0x1b) {
            Some(p) => hay[from + p..].to_vec(),
            None => Vec::new(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, raw: &[u8], uncertain: bool) -> Feed {
        Feed::Line {
            raw: raw.to_vec(),
            text: text.into(),
            uncertain,
        }
    }

    #[test]
    fn lines_are_held_until_submitted_and_edited() {
        let mut lb = LineBuffer::default();
        assert!(lb.feed(b"ls -l").is_empty());
        assert_eq!(lb.feed(b"a\r"), vec![line("ls -la", b"ls -la\r", false)]);
        assert_eq!(
            lb.feed(b"rm -rf /tmpX\x7f/x\n"),
            vec![line("rm -rf /tmp/x", b"rm -rf /tmpX\x7f/x\n", false)]
        );
        assert_eq!(
            lb.feed(b"echo hi there\x17\x17ok\r\n"),
            vec![
                line("echo ok", b"echo hi there\x17\x17ok\r", false),
                Feed::Forward(b"\n".to_vec())
            ]
        );
        assert_eq!(
            lb.feed(b"junk\x15ls\r"),
            vec![line("ls", b"junk\x15ls\r", false)]
        );
        // Two lines in one packet.
        assert_eq!(lb.feed(b"a\rb\r").len(), 2);
    }

    #[test]
    fn history_and_completion_make_lines_uncertain() {
        let mut lb = LineBuffer::default();
        let f = lb.feed(b"\x1b[A\r");
        assert_eq!(f, vec![line("", b"\x1b[A\r", true)]);
        let f = lb.feed(b"rm -rf /us\t\r");
        assert!(matches!(
            &f[0],
            Feed::Line {
                uncertain: true,
                ..
            }
        ));
    }

    #[test]
    fn control_keys_pass_and_ctrl_c_drops_the_line() {
        let mut lb = LineBuffer::default();
        assert_eq!(lb.feed(b"\x04"), vec![Feed::Forward(vec![4])]);
        assert!(lb.feed(b"rm -rf /").is_empty());
        assert_eq!(lb.feed(b"\x03"), vec![Feed::Forward(vec![3])]);
        assert!(lb.is_empty());
    }

    #[test]
    fn alternate_screen_switches_across_chunks() {
        let mut a = AltScreen::default();
        a.observe(b"hello \x1b[?10");
        assert!(!a.active());
        a.observe(b"49h screen");
        assert!(a.active());
        a.observe(b"\x1b[?1049l");
        assert!(!a.active());
        a.observe(b"\x1b[?1049h...\x1b[?1049l");
        assert!(!a.active());
    }
}
