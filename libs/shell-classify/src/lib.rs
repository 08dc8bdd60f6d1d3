//! Classifies a shell command line — an SSH `exec` request or a line typed into an
//! interactive shell — into agentgate risk classes, with a real shell parser.
//!
//! The command line is parsed into a syntax tree by [`brush_parser`] (the POSIX/bash parser of
//! the brush shell; see docs/ssh-proxy.md for why this one), and the tree is walked: every
//! simple command in every pipeline, list (`;`, `&&`, `||`), compound command (`if`, `for`,
//! `while`, `case`, `{ }`, `( )`), command substitution (`$(...)`, backticks), process
//! substitution and redirection is looked at, and the strings handed to `sh -c`, `bash -c`,
//! `eval`, `sudo`, `env`, `xargs`, `find -exec` ... are parsed again, recursively.
//!
//! Every command line gets [`EXEC`] (`ssh.exec`). [`DESTRUCTIVE`] (`ssh.destructive`) is
//! added, with a reason per finding, when the line:
//!
//! - removes recursively (`rm -r`, `rm -rf`, `find -delete`, `find -exec rm -r`) a system
//!   path or `/` (see [`is_system_path`]), or a path computed at run time;
//! - makes a file system or wipes a disk (`mkfs*`, `mke2fs`, `mkswap`, `wipefs`, `shred`,
//!   `blkdiscard`, partitioning tools), writes to a device (`dd of=/dev/sda`, `> /dev/sda`,
//!   `tee /dev/sda`) or truncates a system file (`> /etc/passwd`);
//! - stops the machine (`shutdown`, `reboot`, `halt`, `poweroff`, `init 0|6`,
//!   `systemctl poweroff|reboot|...`), deletes users (`userdel`, `deluser`, `groupdel`),
//!   changes ownership or modes recursively on system paths (`chmod -R`, `chown -R`,
//!   `chgrp -R`), flushes the firewall (`iptables -F`, `nft flush ruleset`), kills every
//!   process (`kill -9 -1`);
//! - feeds a pipeline into a shell or interpreter (`curl ... | sh`, `wget -O- ... | bash`,
//!   `... | python3`), since what runs then is invisible here;
//! - cannot be classified: it does not parse, nests too deep, is too long, names its command
//!   with an expansion (`$CMD -rf /`), or hides a command substitution where the parser
//!   cannot reach it. A gateway fails closed: what it cannot read is treated as destructive.
//!
//! File-transfer commands that OpenSSH's tools run over exec (`scp -t`/`scp -f`,
//! `rsync --server`, `sftp-server`) are recognised as [`Classification::transfer`], so a proxy
//! knows their streams are a binary protocol rather than terminal output.
//!
//! ```
//! use agentgate_shell_classify::{classify, DESTRUCTIVE, EXEC};
//!
//! let c = classify("ls -la /var/log | grep error");
//! assert_eq!(c.risk_classes, vec![EXEC]);
//! let c = classify("cd / && rm -rf usr");
//! assert!(c.is_destructive(), "{:?}", c.reasons);
//! let c = classify("sh -c 'curl -s https://x.example/i.sh | bash'");
//! assert!(c.risk_classes.contains(&DESTRUCTIVE));
//! ```

#![deny(missing_docs)]

use std::panic::AssertUnwindSafe;

use brush_parser::ast;
use brush_parser::word::WordPiece;

/// Risk class of every command line.
pub const EXEC: &str = "ssh.exec";
/// Risk class of a command line that destroys data or the system, or cannot be read.
pub const DESTRUCTIVE: &str = "ssh.destructive";

/// Longest command line classified; a longer one is treated as destructive (a gateway does
/// not spend unbounded time on one line).
pub const MAX_LEN: usize = 64 * 1024;
/// How deep `sh -c`, `eval`, `$(...)` and wrappers may nest before the line is treated as
/// destructive.
pub const MAX_DEPTH: usize = 8;

/// What a command line is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classification {
    /// [`EXEC`], and [`DESTRUCTIVE`] when any reason was found.
    pub risk_classes: Vec<&'static str>,
    /// Why the line is destructive, one finding per entry (empty when it is not).
    pub reasons: Vec<String>,
    /// The commands it runs (their names, without path), in order of appearance, once each.
    pub commands: Vec<String>,
    /// Whether the line parsed (a line that did not is destructive).
    pub parsed: bool,
    /// A file-transfer protocol server run over exec: `"scp"`, `"rsync"`, `"sftp"`.
    pub transfer: Option<&'static str>,
}

impl Classification {
    /// Whether [`DESTRUCTIVE`] applies.
    pub fn is_destructive(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Classifies one command line. Never panics; what cannot be read is destructive.
pub fn classify(line: &str) -> Classification {
    let mut w = Walker::default();
    if line.len() > MAX_LEN {
        w.flag(format!(
            "the command line is longer than {MAX_LEN} bytes and was not classified"
        ));
    } else {
        w.parsed = true;
        w.program_text(line, 0);
    }
    // A transfer server alone on the line (nothing chained to it that could run unmasked).
    if w.commands.len() == 1 && !line.contains([';', '|', '&', '$', '`', '<', '>', '\n']) {
        w.transfer = transfer_of(line);
    }
    let mut risk_classes = vec![EXEC];
    if !w.reasons.is_empty() {
        risk_classes.push(DESTRUCTIVE);
    }
    Classification {
        risk_classes,
        reasons: w.reasons,
        commands: w.commands,
        parsed: w.parsed,
        transfer: w.transfer,
    }
}

/// Whether `path` (absolute, or with `~`) is a system path that a recursive removal, mode or
/// owner change or truncation must not touch without review:
///
/// - `/` and every top-level directory (`/usr`, `/tmp`, `/home`, ...), and globs at the top
///   level (`/*`);
/// - anything under `/bin`, `/boot`, `/dev`, `/etc`, `/lib*`, `/proc`, `/root`, `/sbin`,
///   `/sys`, `/usr`;
/// - the direct children of `/home`, `/var`, `/opt`, `/srv`, `/mnt`, `/media`, `/run`,
///   `/snap` (a user's home, `/var/lib`, an installed product) and of `/var/lib`
///   (`/var/lib/postgresql`);
/// - a home directory itself (`~`, `~user`).
///
/// `/tmp/build` or `/home/alice/project/target` are not system paths.
pub fn is_system_path(path: &str) -> bool {
    if path == "~" || path == "~/" || (path.starts_with('~') && !path[1..].contains('/')) {
        return true;
    }
    if !path.starts_with('/') {
        return false;
    }
    let normal = normalize(path);
    // A glob decides at its first component with a wildcard: "/usr/*" is "/usr/...".
    let components: Vec<&str> = normal.split('/').filter(|c| !c.is_empty()).collect();
    let mut parts = Vec::new();
    for c in &components {
        if c.contains(['*', '?', '[']) {
            // Everything from here on is unknown: the glob matches at this depth.
            parts.push("*");
            break;
        }
        parts.push(c);
    }
    match parts.as_slice() {
        [] | [_] => true,
        [top, ..] if WHOLE_TREE.contains(top) || top.starts_with("lib") => true,
        ["var", "lib", _] => true,
        [top, _] if CHILDREN.contains(top) => true,
        _ => false,
    }
}

/// Top-level directories protected in depth.
const WHOLE_TREE: &[&str] = &[
    "bin", "boot", "dev", "etc", "proc", "root", "sbin", "sys", "usr",
];
/// Top-level directories whose direct children are protected.
const CHILDREN: &[&str] = &["home", "var", "opt", "srv", "mnt", "media", "run", "snap"];

/// Lexical normalisation: collapses `//`, `.` and `..` (never above `/`).
fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

/// Devices that writing to destroys nothing.
fn is_harmless_device(path: &str) -> bool {
    let p = normalize(path);
    matches!(
        p.as_str(),
        "/dev/null"
            | "/dev/zero"
            | "/dev/full"
            | "/dev/random"
            | "/dev/urandom"
            | "/dev/stdout"
            | "/dev/stderr"
            | "/dev/stdin"
            | "/dev/tty"
            | "/dev/ptmx"
            | "/dev/console"
    ) || p.starts_with("/dev/fd/")
        || p.starts_with("/dev/pts/")
        || p.starts_with("/dev/shm/")
        // bash's network pseudo-files: sockets, not devices.
        || p.starts_with("/dev/tcp/")
        || p.starts_with("/dev/udp/")
}

fn is_device(path: &str) -> bool {
    path.starts_with("/dev/") && !is_harmless_device(path)
}

/// A word after quote removal.
#[derive(Debug, Clone)]
struct Arg {
    /// The value when the word is fully static.
    lit: Option<String>,
    /// The value with expansions left as their source text (`$HOME/x`).
    text: String,
}

impl Arg {
    fn literal(s: &str) -> Arg {
        Arg {
            lit: Some(s.to_owned()),
            text: s.to_owned(),
        }
    }
    /// The best reading: the literal, or the text with expansions.
    fn best(&self) -> &str {
        self.lit.as_deref().unwrap_or(&self.text)
    }
}

#[derive(Default)]
struct Walker {
    reasons: Vec<String>,
    commands: Vec<String>,
    parsed: bool,
    transfer: Option<&'static str>,
    /// The working directory, when a `cd` to a known absolute path preceded.
    cwd: Option<String>,
}

fn options() -> brush_parser::ParserOptions {
    brush_parser::ParserOptions {
        enable_extended_globbing: false,
        ..Default::default()
    }
}

impl Walker {
    fn flag(&mut self, reason: String) {
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }

    fn note_command(&mut self, name: &str) {
        if !self.commands.iter().any(|c| c == name) && self.commands.len() < 64 {
            self.commands.push(name.to_owned());
        }
    }

    /// Parses and walks a program text (the whole line, an `sh -c` string, a `$(...)` body).
    fn program_text(&mut self, text: &str, depth: usize) {
        if depth > MAX_DEPTH {
            self.flag(format!(
                "commands nest more than {MAX_DEPTH} levels deep and were not classified"
            ));
            return;
        }
        let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut parser =
                brush_parser::Parser::new(std::io::Cursor::new(text.as_bytes()), &options());
            parser.parse_program()
        }));
        match parsed {
            Ok(Ok(program)) => {
                for list in &program.complete_commands {
                    self.compound_list(list, depth);
                }
            }
            Ok(Err(e)) => {
                if depth == 0 {
                    self.parsed = false;
                }
                self.flag(format!("the command line could not be parsed ({e})"));
            }
            Err(_) => {
                if depth == 0 {
                    self.parsed = false;
                }
                self.flag("the command line could not be parsed (parser failure)".into());
            }
        }
    }

    fn compound_list(&mut self, list: &ast::CompoundList, depth: usize) {
        for item in &list.0 {
            self.and_or(&item.0, depth);
        }
    }

    fn and_or(&mut self, list: &ast::AndOrList, depth: usize) {
        self.pipeline(&list.first, depth);
        for next in &list.additional {
            match next {
                ast::AndOr::And(p) | ast::AndOr::Or(p) => self.pipeline(p, depth),
            }
        }
    }

    fn pipeline(&mut self, p: &ast::Pipeline, depth: usize) {
        for (i, command) in p.seq.iter().enumerate() {
            let argv = self.command(command, depth);
            if i > 0
                && let Some(argv) = argv
                && let Some(interpreter) = reads_program_from_stdin(&argv)
            {
                self.flag(format!(
                    "a pipeline feeds {interpreter}, which runs whatever it reads"
                ));
            }
        }
    }

    /// Walks one command; returns the argv of a simple command (after wrappers) for the
    /// pipeline check.
    fn command(&mut self, c: &ast::Command, depth: usize) -> Option<Vec<Arg>> {
        match c {
            ast::Command::Simple(s) => self.simple(s, depth),
            ast::Command::Compound(cc, redirects) => {
                self.compound(cc, depth);
                if let Some(r) = redirects {
                    for r in &r.0 {
                        self.redirect(r, depth);
                    }
                }
                None
            }
            ast::Command::Function(f) => {
                // Defining is not running, but the body runs when called: classify it.
                self.compound(&f.body.0, depth);
                if let Some(r) = &f.body.1 {
                    for r in &r.0 {
                        self.redirect(r, depth);
                    }
                }
                None
            }
            ast::Command::ExtendedTest(e, redirects) => {
                self.extended_test(&e.expr, depth);
                if let Some(r) = redirects {
                    for r in &r.0 {
                        self.redirect(r, depth);
                    }
                }
                None
            }
        }
    }

    fn extended_test(&mut self, e: &ast::ExtendedTestExpr, depth: usize) {
        match e {
            ast::ExtendedTestExpr::And(a, b) | ast::ExtendedTestExpr::Or(a, b) => {
                self.extended_test(a, depth);
                self.extended_test(b, depth);
            }
            ast::ExtendedTestExpr::Not(a) | ast::ExtendedTestExpr::Parenthesized(a) => {
                self.extended_test(a, depth)
            }
            ast::ExtendedTestExpr::UnaryTest(_, w) => {
                self.word(&w.value, depth);
            }
            ast::ExtendedTestExpr::BinaryTest(_, a, b) => {
                self.word(&a.value, depth);
                self.word(&b.value, depth);
            }
        }
    }

    fn compound(&mut self, cc: &ast::CompoundCommand, depth: usize) {
        use ast::CompoundCommand as C;
        match cc {
            C::Arithmetic(a) => self.arithmetic(&a.expr.value),
            C::ArithmeticForClause(f) => {
                for e in [&f.initializer, &f.condition, &f.updater]
                    .into_iter()
                    .flatten()
                {
                    self.arithmetic(&e.value);
                }
                self.compound_list(&f.body.list, depth);
            }
            C::BraceGroup(b) => self.compound_list(&b.list, depth),
            C::Subshell(s) => {
                let cwd = self.cwd.clone();
                self.compound_list(&s.list, depth);
                self.cwd = cwd;
            }
            C::ForClause(f) => {
                for w in f.values.iter().flatten() {
                    self.word(&w.value, depth);
                }
                self.compound_list(&f.body.list, depth);
            }
            C::CaseClause(c) => {
                self.word(&c.value.value, depth);
                for item in &c.cases {
                    for p in &item.patterns {
                        self.word(&p.value, depth);
                    }
                    if let Some(cmd) = &item.cmd {
                        self.compound_list(cmd, depth);
                    }
                }
            }
            C::IfClause(i) => {
                self.compound_list(&i.condition, depth);
                self.compound_list(&i.then, depth);
                for e in i.elses.iter().flatten() {
                    if let Some(c) = &e.condition {
                        self.compound_list(c, depth);
                    }
                    self.compound_list(&e.body, depth);
                }
            }
            C::WhileClause(w) | C::UntilClause(w) => {
                self.compound_list(&w.0, depth);
                self.compound_list(&w.1.list, depth);
            }
            C::Coprocess(c) => {
                self.command(&c.body, depth);
            }
        }
    }

    fn arithmetic(&mut self, expr: &str) {
        if expr.contains("$(") || expr.contains('`') {
            self.flag("a command substitution inside arithmetic was not classified".into());
        }
    }

    fn redirect(&mut self, r: &ast::IoRedirect, depth: usize) {
        match r {
            ast::IoRedirect::File(_, kind, target) => match target {
                ast::IoFileRedirectTarget::Filename(w) => {
                    let arg = self.word(&w.value, depth);
                    let writes = matches!(
                        kind,
                        ast::IoFileRedirectKind::Write
                            | ast::IoFileRedirectKind::Append
                            | ast::IoFileRedirectKind::ReadAndWrite
                            | ast::IoFileRedirectKind::Clobber
                    );
                    if writes {
                        self.written_file(&arg, !matches!(kind, ast::IoFileRedirectKind::Append));
                    }
                }
                ast::IoFileRedirectTarget::Fd(_) => {}
                ast::IoFileRedirectTarget::ProcessSubstitution(_, s) => {
                    self.compound_list(&s.list, depth)
                }
                ast::IoFileRedirectTarget::Duplicate(w) => {
                    self.word(&w.value, depth);
                }
            },
            ast::IoRedirect::HereDocument(_, doc) => {
                if doc.requires_expansion {
                    self.word(&doc.doc.value, depth);
                }
            }
            ast::IoRedirect::HereString(_, w) => {
                self.word(&w.value, depth);
            }
            ast::IoRedirect::OutputAndError(w, _) => {
                let arg = self.word(&w.value, depth);
                self.written_file(&arg, true);
            }
        }
    }

    /// A redirection or `tee`/`dd of=` writes to `arg`.
    fn written_file(&mut self, arg: &Arg, truncates: bool) {
        let path = self.resolve(arg.best());
        if is_device(&path) {
            self.flag(format!("writes to the device {path}"));
        } else if truncates
            && path.starts_with('/')
            && is_system_path(&path)
            && !path.starts_with("/tmp/")
            && !path.starts_with("/dev/")
        {
            self.flag(format!("overwrites the system file {path}"));
        }
    }

    /// Quote removal and expansion analysis of one word; classifies the command
    /// substitutions inside it.
    fn word(&mut self, word: &str, depth: usize) -> Arg {
        let pieces = std::panic::catch_unwind(AssertUnwindSafe(|| {
            brush_parser::word::parse(word, &options())
        }));
        let pieces = match pieces {
            Ok(Ok(p)) => p,
            _ => {
                // An unparseable word: take it as text, and refuse to trust hidden code.
                if word.contains("$(") || word.contains('`') {
                    self.flag(format!("the word {word:?} could not be read"));
                }
                return Arg {
                    lit: None,
                    text: word.to_owned(),
                };
            }
        };
        let mut lit = Some(String::new());
        let mut text = String::new();
        self.pieces(word, &pieces, &mut lit, &mut text, depth);
        Arg { lit, text }
    }

    fn pieces(
        &mut self,
        source: &str,
        pieces: &[brush_parser::word::WordPieceWithSource],
        lit: &mut Option<String>,
        text: &mut String,
        depth: usize,
    ) {
        let push = |lit: &mut Option<String>, text: &mut String, s: &str| {
            if let Some(l) = lit.as_mut() {
                l.push_str(s);
            }
            text.push_str(s);
        };
        for p in pieces {
            let src = source.get(p.start_index..p.end_index).unwrap_or("");
            match &p.piece {
                WordPiece::Text(s)
                | WordPiece::SingleQuotedText(s)
                | WordPiece::AnsiCQuotedText(s) => push(lit, text, s),
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => {
                    self.pieces(source, inner, lit, text, depth);
                }
                WordPiece::TildeExpansion(_) => {
                    *lit = None;
                    text.push_str(if src.is_empty() { "~" } else { src });
                }
                WordPiece::ParameterExpansion(_) => {
                    *lit = None;
                    text.push_str(src);
                    if src.contains("$(") || src.contains('`') {
                        self.flag(format!(
                            "a command substitution inside {src:?} was not classified"
                        ));
                    }
                }
                WordPiece::CommandSubstitution(body)
                | WordPiece::BackquotedCommandSubstitution(body) => {
                    *lit = None;
                    text.push_str(src);
                    let cwd = self.cwd.clone();
                    self.program_text(body, depth + 1);
                    self.cwd = cwd;
                }
                WordPiece::EscapeSequence(s) => {
                    let unescaped = s.strip_prefix('\\').unwrap_or(s);
                    if unescaped != "\n" {
                        push(lit, text, unescaped);
                    }
                }
                WordPiece::ArithmeticExpression(e) => {
                    *lit = None;
                    text.push_str(src);
                    self.arithmetic(&e.value);
                }
            }
        }
    }

    fn simple(&mut self, s: &ast::SimpleCommand, depth: usize) -> Option<Vec<Arg>> {
        let mut argv = Vec::new();
        let items = s
            .prefix
            .iter()
            .flat_map(|p| p.0.iter())
            .map(|i| (true, Some(i)))
            .chain(std::iter::once((false, None)))
            .chain(
                s.suffix
                    .iter()
                    .flat_map(|p| p.0.iter())
                    .map(|i| (false, Some(i))),
            );
        for (in_prefix, item) in items {
            match item {
                // After the command name, `of=/dev/sda` is an argument, not an assignment.
                Some(ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w)) if !in_prefix => {
                    let arg = self.word(&w.value, depth);
                    argv.push(arg);
                }
                None => {
                    if let Some(w) = &s.word_or_name {
                        let arg = self.word(&w.value, depth);
                        argv.push(arg);
                    }
                }
                Some(ast::CommandPrefixOrSuffixItem::Word(w)) => {
                    let arg = self.word(&w.value, depth);
                    argv.push(arg);
                }
                Some(ast::CommandPrefixOrSuffixItem::IoRedirect(r)) => self.redirect(r, depth),
                Some(ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w)) => {
                    // `X=$(cmd)`: the substitution runs.
                    let value = w.value.split_once('=').map_or("", |(_, v)| v);
                    self.word(value, depth);
                }
                Some(ast::CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub)) => {
                    self.compound_list(&sub.list, depth);
                }
            }
        }
        if argv.is_empty() {
            return None;
        }
        self.argv(&argv, depth)
    }

    /// Analyses one command's arguments; returns the argv that actually runs (after
    /// wrappers such as `sudo`). One arm per command, each with its own test: clearer than
    /// match guards.
    #[allow(clippy::collapsible_match)]
    fn argv(&mut self, argv: &[Arg], depth: usize) -> Option<Vec<Arg>> {
        if depth > MAX_DEPTH {
            self.flag(format!(
                "commands nest more than {MAX_DEPTH} levels deep and were not classified"
            ));
            return None;
        }
        let first = argv.first()?;
        let Some(name_path) = first.lit.as_deref() else {
            self.flag(format!(
                "the command name {:?} is computed at run time",
                first.text
            ));
            return None;
        };
        let name = name_path.rsplit('/').next().unwrap_or(name_path).to_owned();
        self.note_command(&name);
        let args = &argv[1..];
        let lits: Vec<&str> = args.iter().map(Arg::best).collect();
        match name.as_str() {
            // Wrappers: what follows their options runs.
            "sudo" | "doas" => {
                return self.wrapped(
                    args,
                    &[
                        "-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T", "-c",
                    ],
                    depth,
                );
            }
            "env" => {
                let mut i = 0;
                while i < args.len() {
                    let a = args[i].best();
                    if a == "-u" || a == "-C" || a == "-S" || a == "--chdir" || a == "--unset" {
                        i += 2;
                    } else if a.starts_with('-') || (a.contains('=') && !a.starts_with('=')) {
                        i += 1;
                    } else {
                        break;
                    }
                }
                return self.argv(&args[i.min(args.len())..], depth + 1);
            }
            "nice" | "ionice" | "nohup" | "stdbuf" | "time" | "command" | "builtin" | "exec"
            | "setsid" | "unbuffer" | "chronic" | "caffeinate" | "torsocks" | "strace"
            | "ltrace" | "flock" | "taskset" | "chrt" | "runuser" | "su" => {
                if name == "command" && lits.first().is_some_and(|a| *a == "-v" || *a == "-V") {
                    return None;
                }
                if name == "su" {
                    // `su -c CMD [user]`
                    if let Some(i) = lits.iter().position(|a| *a == "-c" || *a == "--command")
                        && let Some(cmd) = args.get(i + 1)
                    {
                        self.nested(cmd, depth);
                    }
                    return None;
                }
                let with_value: &[&str] = match name.as_str() {
                    "nice" => &["-n", "--adjustment"],
                    "ionice" => &["-c", "-n", "-p", "-t"],
                    "taskset" | "chrt" => &[],
                    "runuser" => &["-u", "-g", "-G"],
                    "strace" | "ltrace" => &["-o", "-e", "-p", "-s", "-u"],
                    _ => &[],
                };
                let mut rest = self.skip_options(args, with_value);
                // taskset MASK CMD, chrt PRIO CMD, flock FILE CMD
                if matches!(name.as_str(), "taskset" | "chrt" | "flock") && !rest.is_empty() {
                    rest = &rest[1..];
                }
                return self.argv(rest, depth + 1);
            }
            "timeout" => {
                let rest = self.skip_options(args, &["-s", "--signal", "-k", "--kill-after"]);
                let rest = if rest.is_empty() { rest } else { &rest[1..] };
                return self.argv(rest, depth + 1);
            }
            "watch" => {
                let rest = self.skip_options(args, &["-n", "--interval", "-d"]);
                if rest.len() == 1 {
                    self.nested(&rest[0], depth);
                    return None;
                }
                return self.argv(rest, depth + 1);
            }
            "xargs" => {
                let rest = self.skip_options(
                    args,
                    &[
                        "-I",
                        "-i",
                        "-n",
                        "-P",
                        "-d",
                        "-L",
                        "-l",
                        "-s",
                        "-E",
                        "-e",
                        "-a",
                        "--arg-file",
                        "--delimiter",
                        "--max-args",
                        "--max-procs",
                    ],
                );
                if rest.is_empty() {
                    return None;
                }
                // The arguments come from stdin: a recursive removal there has unknown targets.
                if is_recursive_rm(rest) {
                    self.flag("removes recursively paths read from stdin (xargs rm -r)".into());
                }
                return self.argv(rest, depth + 1);
            }
            "busybox" | "toybox" => return self.argv(args, depth + 1),
            "sh" | "bash" | "dash" | "zsh" | "ksh" | "ash" | "mksh" | "yash" | "fish" | "csh"
            | "tcsh" => {
                if let Some(script) = shell_c_argument(args) {
                    self.nested(script, depth);
                }
                return Some(argv.to_vec());
            }
            "eval" => {
                let joined = Arg {
                    lit: args
                        .iter()
                        .map(|a| a.lit.clone())
                        .collect::<Option<Vec<_>>>()
                        .map(|v| v.join(" ")),
                    text: args
                        .iter()
                        .map(|a| a.text.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                self.nested(&joined, depth);
                return None;
            }
            "source" | "." => {}
            "cd" | "pushd" => {
                self.cwd = match lits.iter().find(|a| !a.starts_with('-')) {
                    Some(dir) if args.iter().all(|a| a.lit.is_some()) => {
                        if dir.starts_with('/') {
                            Some(normalize(dir))
                        } else {
                            self.cwd
                                .as_ref()
                                .map(|cwd| normalize(&format!("{cwd}/{dir}")))
                        }
                    }
                    _ => None,
                };
            }
            "rm" => self.rm(args),
            "find" => self.find(args, depth),
            "mkfs" | "mke2fs" | "mkswap" | "wipefs" | "blkdiscard" | "shred" | "mkdosfs"
            | "mkntfs" | "zpool" | "pvremove" | "vgremove" | "lvremove" | "cryptsetup" => {
                let harmless = match name.as_str() {
                    "zpool" => !lits
                        .first()
                        .is_some_and(|a| matches!(*a, "destroy" | "create" | "labelclear")),
                    "cryptsetup" => !lits
                        .iter()
                        .any(|a| matches!(*a, "luksFormat" | "erase" | "luksErase" | "format")),
                    _ => lits
                        .iter()
                        .any(|a| matches!(*a, "--help" | "-V" | "--version")),
                };
                if !harmless {
                    self.flag(format!("{name} destroys the data on a device"));
                }
            }
            n if n.starts_with("mkfs.") => {
                self.flag(format!(
                    "{n} makes a new file system, destroying the old one"
                ));
            }
            "fdisk" | "sfdisk" | "cfdisk" | "parted" | "sgdisk" | "gdisk" => {
                let listing = lits.iter().any(|a| {
                    matches!(
                        *a,
                        "-l" | "--list"
                            | "print"
                            | "-p"
                            | "--print"
                            | "-V"
                            | "--version"
                            | "--help"
                    )
                });
                if !listing {
                    self.flag(format!("{name} changes a partition table"));
                }
            }
            "dd" => {
                for a in args {
                    if let Some(target) = a.best().strip_prefix("of=") {
                        let target = Arg {
                            lit: Some(target.to_owned()),
                            text: target.to_owned(),
                        };
                        self.written_file(&target, true);
                    }
                }
            }
            "tee" => {
                for a in args.iter().filter(|a| !a.best().starts_with('-')) {
                    self.written_file(a, !lits.iter().any(|l| *l == "-a" || *l == "--append"));
                }
            }
            "cp" | "mv" | "install" | "ln" | "rsync" | "cat" => {
                // A device as the destination; a system path moved away.
                let positional: Vec<&Arg> =
                    args.iter().filter(|a| !a.best().starts_with('-')).collect();
                if let Some(dest) = positional.last() {
                    let path = self.resolve(dest.best());
                    if name != "cat" && is_device(&path) {
                        self.flag(format!("{name} writes to the device {path}"));
                    }
                }
                if name == "mv" && positional.len() >= 2 {
                    for src in &positional[..positional.len() - 1] {
                        let path = self.resolve(src.best());
                        if path.starts_with('/') && is_system_path(&path) {
                            self.flag(format!("moves the system path {path} away"));
                        }
                    }
                }
            }
            "shutdown" | "reboot" | "halt" | "poweroff" => {
                if !lits.iter().any(|a| *a == "-c" || *a == "--help") {
                    self.flag(format!("{name} stops the machine"));
                }
            }
            "init" | "telinit" => {
                if lits
                    .iter()
                    .any(|a| matches!(*a, "0" | "6" | "1" | "s" | "S"))
                {
                    self.flag(format!("{name} {} changes the run level", lits.join(" ")));
                }
            }
            "systemctl" | "loginctl" => {
                if lits.iter().any(|a| {
                    matches!(
                        *a,
                        "poweroff"
                            | "reboot"
                            | "halt"
                            | "kexec"
                            | "rescue"
                            | "emergency"
                            | "soft-reboot"
                    )
                }) {
                    self.flag(format!("{name} {} stops the machine", lits.join(" ")));
                }
            }
            "userdel" | "deluser" | "groupdel" | "delgroup" => {
                self.flag(format!("{name} deletes an account"));
            }
            "chmod" | "chown" | "chgrp" | "setfacl" => self.chmod(&name, args),
            "iptables" | "ip6tables" | "iptables-legacy" | "ip6tables-legacy" | "iptables-nft"
            | "ip6tables-nft" | "ebtables" | "arptables" => {
                if lits.iter().any(|a| {
                    matches!(*a, "-F" | "--flush" | "-X" | "--delete-chain")
                        || (a.starts_with('-')
                            && !a.starts_with("--")
                            && a.len() > 2
                            && a.contains('F'))
                }) {
                    self.flag(format!("{name} flushes the firewall rules"));
                }
            }
            "nft" => {
                if lits
                    .windows(2)
                    .any(|w| w[0] == "flush" && w[1] == "ruleset")
                    || lits.first().is_some_and(|a| *a == "flush")
                {
                    self.flag("nft flushes the firewall rules".into());
                }
            }
            "ufw" => {
                if lits.iter().any(|a| matches!(*a, "reset" | "disable")) {
                    self.flag("ufw turns the firewall off".into());
                }
            }
            "kill" | "pkill" | "killall" | "killall5" => {
                let positional: Vec<&str> = lits
                    .iter()
                    .copied()
                    .filter(|a| !a.starts_with('-') || a.parse::<i64>().is_ok())
                    .collect();
                if name == "kill" && positional.iter().any(|a| *a == "-1" || *a == "1") {
                    self.flag("kill targets every process or init".into());
                }
                if name == "killall5" {
                    self.flag("killall5 kills every process".into());
                }
            }
            "crontab" => {
                if lits.contains(&"-r") {
                    self.flag("crontab -r removes the crontab".into());
                }
            }
            "truncate" => {
                for a in args.iter().filter(|a| !a.best().starts_with('-')) {
                    let path = self.resolve(a.best());
                    if path.starts_with('/') && is_system_path(&path) && !path.starts_with("/tmp/")
                    {
                        self.flag(format!("truncates the system file {path}"));
                    }
                }
            }
            _ => {}
        }
        Some(argv.to_vec())
    }

    /// `sudo [options] CMD...`: skips options (and the values of `with_value` ones).
    fn wrapped(&mut self, args: &[Arg], with_value: &[&str], depth: usize) -> Option<Vec<Arg>> {
        let rest = self.skip_options(args, with_value);
        if rest.is_empty() {
            return None;
        }
        self.argv(rest, depth + 1)
    }

    fn skip_options<'a>(&self, args: &'a [Arg], with_value: &[&str]) -> &'a [Arg] {
        let mut i = 0;
        while i < args.len() {
            let a = args[i].best();
            if a == "--" {
                i += 1;
                break;
            }
            if !a.starts_with('-') || a == "-" {
                break;
            }
            i += if with_value.contains(&a) { 2 } else { 1 };
        }
        &args[i.min(args.len())..]
    }

    /// A string that a shell will parse again (`sh -c`, `eval`, `su -c`, `watch`).
    fn nested(&mut self, arg: &Arg, depth: usize) {
        let cwd = self.cwd.clone();
        self.program_text(arg.best(), depth + 1);
        self.cwd = cwd;
    }

    /// Resolves a path against the tracked working directory.
    fn resolve(&self, path: &str) -> String {
        if path.starts_with('/') || path.starts_with('~') || path.starts_with('$') {
            return path.to_owned();
        }
        match &self.cwd {
            Some(cwd) => normalize(&format!("{cwd}/{path}")),
            None => path.to_owned(),
        }
    }

    /// Checks one target of a destructive recursive operation.
    fn recursive_target(&mut self, what: &str, arg: &Arg) {
        let raw = arg.best();
        if arg.lit.is_none()
            && (raw.starts_with('$') || raw.starts_with("\"$") || raw.starts_with('`'))
            && !raw.starts_with("$PWD")
        {
            self.flag(format!(
                "{what} a path computed at run time ({raw}); it may be a system path"
            ));
            return;
        }
        if raw == "$HOME" || raw == "${HOME}" || raw.starts_with("$HOME/") && raw.len() <= 6 {
            self.flag(format!("{what} the home directory"));
            return;
        }
        let path = self.resolve(raw);
        if (path.starts_with('/') || path.starts_with('~')) && is_system_path(&path) {
            self.flag(format!("{what} the system path {path}"));
        }
    }

    fn rm(&mut self, args: &[Arg]) {
        let mut recursive = false;
        let mut targets = Vec::new();
        let mut options_done = false;
        for a in args {
            let s = a.best();
            if !options_done && s == "--" {
                options_done = true;
            } else if !options_done && s.starts_with("--") {
                if s == "--recursive" {
                    recursive = true;
                }
                if s == "--no-preserve-root" {
                    self.flag("rm --no-preserve-root".into());
                }
            } else if !options_done && s.starts_with('-') && s.len() > 1 {
                if s.contains('r') || s.contains('R') {
                    recursive = true;
                }
            } else {
                targets.push(a.clone());
            }
        }
        if recursive {
            for t in &targets {
                self.recursive_target("rm -r removes", t);
            }
        }
    }

    fn find(&mut self, args: &[Arg], depth: usize) {
        let starts: Vec<Arg> = args
            .iter()
            .take_while(|a| {
                let s = a.best();
                !s.starts_with('-') && s != "(" && s != "!"
            })
            .cloned()
            .collect();
        let starts = if starts.is_empty() {
            vec![Arg::literal(".")]
        } else {
            starts
        };
        let lits: Vec<&str> = args.iter().map(Arg::best).collect();
        if lits.contains(&"-delete") {
            for s in &starts {
                self.recursive_target("find -delete removes under", s);
            }
        }
        let mut i = 0;
        while i < args.len() {
            let s = args[i].best();
            if matches!(s, "-exec" | "-execdir" | "-ok" | "-okdir") {
                let end = args[i + 1..]
                    .iter()
                    .position(|a| matches!(a.best(), ";" | "+" | "\\;"))
                    .map_or(args.len(), |p| i + 1 + p);
                let sub = &args[i + 1..end];
                // `{}` stands for what find found: under its start paths.
                for start in &starts {
                    let replaced: Vec<Arg> = sub
                        .iter()
                        .map(|a| {
                            if a.best() == "{}" {
                                start.clone()
                            } else {
                                a.clone()
                            }
                        })
                        .collect();
                    self.argv(&replaced, depth + 1);
                }
                i = end + 1;
            } else {
                i += 1;
            }
        }
    }

    fn chmod(&mut self, name: &str, args: &[Arg]) {
        let recursive = args.iter().any(|a| {
            let s = a.best();
            s == "--recursive" || (s.starts_with('-') && !s.starts_with("--") && s.contains('R'))
        });
        let positional: Vec<&Arg> = args
            .iter()
            .filter(|a| !a.best().starts_with('-') || a.best().starts_with("-rwx"))
            .collect();
        // The first positional is the mode / owner (not for setfacl, whose spec is an option).
        let targets = if name == "setfacl" {
            &positional[..]
        } else {
            positional.get(1..).unwrap_or(&[])
        };
        for t in targets {
            let path = self.resolve(t.best());
            if path == "/" || (recursive && path.starts_with('/') && is_system_path(&path)) {
                self.flag(format!("{name} -R changes the system path {path}"));
            } else if recursive {
                self.recursive_target(&format!("{name} -R changes"), t);
            }
        }
    }
}

fn is_recursive_rm(argv: &[Arg]) -> bool {
    argv.first()
        .and_then(|a| a.lit.as_deref())
        .is_some_and(|n| n.rsplit('/').next() == Some("rm"))
        && argv[1..].iter().any(|a| {
            let s = a.best();
            s == "--recursive"
                || (s.starts_with('-')
                    && !s.starts_with("--")
                    && (s.contains('r') || s.contains('R')))
        })
}

/// The string an `sh -c` runs: the first operand after an option cluster containing `c`.
fn shell_c_argument(args: &[Arg]) -> Option<&Arg> {
    let mut i = 0;
    let mut has_c = false;
    while i < args.len() {
        let s = args[i].best();
        if s == "--" {
            i += 1;
            break;
        }
        if s.starts_with('-') && !s.starts_with("--") && s.len() > 1 {
            if s[1..].contains('c') {
                has_c = true;
            }
            // -o OPTION takes a value
            if s == "-o" || s == "+o" {
                i += 1;
            }
            i += 1;
        } else if s.starts_with("--") {
            i += 1;
        } else {
            break;
        }
    }
    if has_c { args.get(i) } else { None }
}

/// Whether a pipeline stage runs a program from its stdin: a shell or interpreter with no
/// script operand (`sh`, `bash -s`, `python3 -`).
fn reads_program_from_stdin(argv: &[Arg]) -> Option<String> {
    let name = argv.first()?.lit.as_deref()?;
    let name = name.rsplit('/').next().unwrap_or(name);
    let shells = [
        "sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "yash", "fish", "csh", "tcsh",
    ];
    let interpreters = [
        "python",
        "python2",
        "python3",
        "perl",
        "ruby",
        "node",
        "php",
        "lua",
        "tclsh",
        "osascript",
    ];
    let is_shell = shells.contains(&name);
    let is_interpreter = interpreters.contains(&name) || name.starts_with("python3.");
    if !is_shell && !is_interpreter {
        return None;
    }
    let args = &argv[1..];
    if is_shell && shell_c_argument(args).is_some() {
        return None;
    }
    let operand = args.iter().find(|a| {
        let s = a.best();
        !s.starts_with('-')
    });
    match operand {
        None => Some(name.to_owned()),
        Some(a) if a.best() == "-" => Some(name.to_owned()),
        Some(_)
            if is_interpreter && args.iter().any(|a| matches!(a.best(), "-c" | "-e" | "-m")) =>
        {
            None
        }
        Some(_) => None,
    }
}

/// The file-transfer protocol server a command line starts, if it is one.
fn transfer_of(line: &str) -> Option<&'static str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let name = words.first()?.rsplit('/').next()?;
    match name {
        "scp" if words.iter().any(|w| *w == "-t" || *w == "-f") => Some("scp"),
        "rsync" if words.contains(&"--server") => Some("rsync"),
        "sftp-server" => Some("sftp"),
        _ => None,
    }
}
