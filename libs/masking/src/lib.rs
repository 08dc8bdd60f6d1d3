//! The masking engine: confidential data never reaches the agent unmasked.
//!
//! Every proxy passes responses through a [`Masker`] before they reach the agent: pg-proxy
//! masks result cells, http-proxy JSON bodies and headers, k8s-proxy Kubernetes objects
//! (Secret data above all), ssh-proxy terminal output as a byte stream. The masker is built
//! from the session's policy ([`MaskingConfig`]) and the deployment's hash key, once per
//! session, and is cheap to clone and share between tasks.
//!
//! Two kinds of rules:
//!
//! - **by source**: a column (`schema.table.column`), a JSON path, an HTTP header, a
//!   Kubernetes field. The proxy knows where the value came from, so the whole value is
//!   masked, whatever it looks like.
//! - **by content**: detectors for data whose source says nothing (computed columns, free
//!   text, terminal output): email, phone, US SSN, payment card (Luhn checked), IBAN (mod 97
//!   checked), IPv4/IPv6, JWT, private key blocks, cloud keys and API tokens.
//!
//! Each rule has a [`Strategy`]: redact, partial, or keyed hash. Every masking action is
//! counted per rule in a [`MaskReport`] for the audit record, which never holds a value.
//!
//! ```
//! use agentgate_masking::{MaskReport, Masker, MaskingConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config: MaskingConfig = serde_json::from_str(r#"{"rules": [
//!     {"name": "emails", "selector": {"detector": "email"}, "strategy": "partial"},
//!     {"name": "cards", "selector": {"detector": "payment_card"}, "strategy": "redact"}
//! ]}"#)?;
//! let masker = Masker::new(&config, None)?;
//! let mut report = MaskReport::new();
//! let out = masker.mask_text("mail ann@example.com, card 4111 1111 1111 1111", &mut report);
//! assert_eq!(out, "mail ***@example.com, card [REDACTED]");
//! assert_eq!(report.count("cards"), 1);
//!
//! // a terminal stream, cut anywhere: the same result
//! let mut stream = masker.stream();
//! let mut shown = Vec::new();
//! stream.push(b"mail ann@exa", &mut shown, &mut report);
//! stream.push(b"mple.com\n", &mut shown, &mut report);
//! stream.finish(&mut shown, &mut report);
//! assert_eq!(shown, b"mail ***@example.com\n");
//! # Ok(())
//! # }
//! ```
//!
//! Scanning is one pass: anchors (a digit run, `@`, `:`, or a literal token prefix found by a
//! SIMD-prefiltered Aho-Corasick automaton) are confirmed by hand-written, bounded, never
//! backtracking detectors, so the cost is linear in the input whatever it contains. See
//! `docs/masking.md` for the design, the measured speed and the detector quality figures.

#![deny(missing_docs)]

mod config;
mod detect;
mod json;
mod render;
mod report;
mod scan;
mod select;
mod stream;

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

pub use config::{DetectorKind, MaskingConfig, RuleConfig, Selector, Strategy};
pub use render::REDACTED;
pub use report::MaskReport;
pub use stream::{MAX_HELD, MAX_MATCH_LEN, StreamMasker};

use detect::{Found, Hay};
use render::{Hasher, render};
use scan::Scanner;
use select::{ColumnSel, HeaderSel, KubeSel, PathSel};

/// Matches per detector during one call, folded into a [`MaskReport`] at its end.
pub(crate) type DetectorCounts = [u64; DetectorKind::ALL.len()];

/// Shortest accepted hash key, in bytes.
pub const MIN_HASH_KEY_LEN: usize = 16;

/// Why a masking configuration was refused. The proxy should refuse the session: masking
/// that silently does less than the policy says is a leak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A rule has no name; names key the audit report.
    #[error(
        "masking rule #{index} has an empty name; every rule needs a name for the audit report"
    )]
    EmptyName {
        /// Position of the rule in the list, from 0.
        index: usize,
    },
    /// Two rules share a name, so their counts could not be told apart.
    #[error("two masking rules are named {0:?}; rule names must be unique")]
    DuplicateName(String),
    /// A selector does not parse.
    #[error("masking rule {rule:?}: {reason}")]
    Selector {
        /// The rule's name.
        rule: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A rule uses the hash strategy and the deployment has no hash key.
    #[error(
        "masking rule {rule:?} uses the hash strategy but no hash key is configured; \
         set the deployment's masking hash key or use redact/partial"
    )]
    MissingHashKey {
        /// The rule's name.
        rule: String,
    },
    /// The hash key is too short to resist guessing.
    #[error(
        "the masking hash key is {len} bytes; use at least {MIN_HASH_KEY_LEN} random bytes (32 recommended)"
    )]
    WeakHashKey {
        /// The length given.
        len: usize,
    },
}

impl ConfigError {
    pub(crate) fn selector(rule: &str, reason: &str) -> ConfigError {
        ConfigError::Selector {
            rule: rule.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// The deployment secret of the hash strategy.
///
/// It is per deployment, not per policy: the same value must hash to the same tag in every
/// session so that agents can join across queries, and the key must never travel with the
/// policy to where an agent could read it. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey(Vec<u8>);

impl HashKey {
    /// Wraps a secret of at least [`MIN_HASH_KEY_LEN`] bytes (use 32 random bytes).
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<HashKey, ConfigError> {
        let secret = secret.into();
        if secret.len() < MIN_HASH_KEY_LEN {
            return Err(ConfigError::WeakHashKey { len: secret.len() });
        }
        Ok(HashKey(secret))
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HashKey({} bytes)", self.0.len())
    }
}

/// A detector match reported by [`Masker::find`]: which detector, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The detector that matched.
    pub detector: DetectorKind,
    /// Byte range of the match in the input.
    pub range: Range<usize>,
}

/// How the cells of one result column are masked, resolved once per result set by
/// [`Masker::column_plan`] rather than once per row.
///
/// A plan is meaningful only for the masker that made it; given to another, an unknown rule
/// redacts (fails closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellPlan {
    rule: Option<usize>,
}

impl CellPlan {
    /// Cells of unknown origin (computed columns, expressions): run the detectors.
    pub const CONTENT: CellPlan = CellPlan { rule: None };

    /// True if a source rule masks every cell of the column.
    pub fn is_rule(&self) -> bool {
        self.rule.is_some()
    }
}

#[derive(Debug)]
struct Rule {
    name: String,
    strategy: Strategy,
}

#[derive(Debug)]
pub(crate) struct Inner {
    rules: Vec<Rule>,
    columns: Vec<(ColumnSel, usize)>,
    json: Vec<(PathSel, usize)>,
    headers: Vec<(HeaderSel, usize)>,
    kube: Vec<(KubeSel, usize)>,
    detector_rule: [Option<usize>; DetectorKind::ALL.len()],
    pub(crate) scanner: Scanner,
    /// Every detector: recognises the format of a source value for partial masking.
    formats: Scanner,
    hasher: Option<Hasher>,
}

/// The masking engine for one policy. Cheap to clone (an `Arc`), `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Masker {
    pub(crate) inner: Arc<Inner>,
}

impl Masker {
    /// Compiles `config`. `hash_key` is required if, and only used if, a rule uses
    /// [`Strategy::Hash`].
    pub fn new(config: &MaskingConfig, hash_key: Option<HashKey>) -> Result<Masker, ConfigError> {
        let mut rules = Vec::with_capacity(config.rules.len());
        let mut columns = Vec::new();
        let mut json = Vec::new();
        let mut headers = Vec::new();
        let mut kube = Vec::new();
        let mut detector_rule = [None; DetectorKind::ALL.len()];
        let mut names = std::collections::HashSet::new();
        for (index, rc) in config.rules.iter().enumerate() {
            let name = rc.name.trim();
            if name.is_empty() {
                return Err(ConfigError::EmptyName { index });
            }
            if !names.insert(name.to_owned()) {
                return Err(ConfigError::DuplicateName(name.to_owned()));
            }
            if rc.strategy == Strategy::Hash && hash_key.is_none() {
                return Err(ConfigError::MissingHashKey {
                    rule: name.to_owned(),
                });
            }
            let id = rules.len();
            match &rc.selector {
                Selector::Column(s) => columns.push((ColumnSel::parse(name, s)?, id)),
                Selector::JsonPath(s) => json.push((PathSel::parse(name, s)?, id)),
                Selector::Header(s) => headers.push((HeaderSel::parse(name, s)?, id)),
                Selector::KubernetesField(s) => kube.push((KubeSel::parse(name, s)?, id)),
                Selector::Detector(k) => {
                    // first rule for a detector wins
                    detector_rule[k.index()].get_or_insert(id);
                }
            }
            rules.push(Rule {
                name: name.to_owned(),
                strategy: rc.strategy,
            });
        }
        let kinds: Vec<DetectorKind> = DetectorKind::ALL
            .into_iter()
            .filter(|k| detector_rule[k.index()].is_some())
            .collect();
        let hasher = match &hash_key {
            Some(k) => Some(Hasher::new(&k.0).ok_or(ConfigError::WeakHashKey { len: k.0.len() })?),
            None => None,
        };
        Ok(Masker {
            inner: Arc::new(Inner {
                rules,
                columns,
                json,
                headers,
                kube,
                detector_rule,
                scanner: Scanner::new(&kinds),
                formats: Scanner::new(&DetectorKind::ALL),
                hasher,
            }),
        })
    }

    /// True if this masker can change nothing (no rules): a proxy may skip it entirely.
    pub fn is_noop(&self) -> bool {
        self.inner.rules.is_empty()
    }

    /// Runs the detectors over free text. Borrows when nothing was masked.
    pub fn mask_text<'a>(&self, text: &'a str, report: &mut MaskReport) -> Cow<'a, str> {
        match self.mask_bytes(text.as_bytes(), report) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            Cow::Owned(v) => Cow::Owned(into_string(v)),
        }
    }

    /// Runs the detectors over bytes that need not be UTF-8; bytes around matches pass
    /// through untouched. Borrows when nothing was masked.
    pub fn mask_bytes<'a>(&self, input: &'a [u8], report: &mut MaskReport) -> Cow<'a, [u8]> {
        let scanner = &self.inner.scanner;
        if !scanner.any() {
            return Cow::Borrowed(input);
        }
        let mut out: Option<Vec<u8>> = None;
        let mut last = 0;
        let mut counts = DetectorCounts::default();
        scanner.scan(
            Hay {
                b: input,
                eof: true,
            },
            0,
            0,
            &mut |m| {
                let o = out.get_or_insert_with(|| Vec::with_capacity(input.len() + 32));
                o.extend_from_slice(&input[last..m.start]);
                self.render_found(m, &input[m.start..m.end], o, &mut counts);
                last = m.end;
            },
        );
        self.report_counts(&counts, report);
        match out {
            None => Cow::Borrowed(input),
            Some(mut o) => {
                o.extend_from_slice(&input[last..]);
                Cow::Owned(o)
            }
        }
    }

    /// The detector matches in `input`, without masking: for callers that classify rather
    /// than rewrite, and for measuring detector quality.
    pub fn find(&self, input: &[u8]) -> Vec<Finding> {
        self.inner
            .scanner
            .find_all(input)
            .into_iter()
            .map(|f| Finding {
                detector: f.kind,
                range: f.start..f.end,
            })
            .collect()
    }

    /// Resolves how cells of the column `schema.table.column` are masked: by the first column
    /// rule that selects it, else by the detectors. Call it once per result column.
    pub fn column_plan(&self, schema: &str, table: &str, column: &str) -> CellPlan {
        let rule = self
            .inner
            .columns
            .iter()
            .find(|(sel, _)| sel.matches(schema, table, column))
            .map(|(_, r)| *r);
        CellPlan { rule }
    }

    /// Masks one database cell (text format) according to its column's plan.
    pub fn mask_cell<'a>(
        &self,
        plan: CellPlan,
        cell: &'a [u8],
        report: &mut MaskReport,
    ) -> Cow<'a, [u8]> {
        match plan.rule {
            None => self.mask_bytes(cell, report),
            Some(r) => {
                let mut out = Vec::new();
                self.apply_rule(r, cell, &mut out, report);
                Cow::Owned(out)
            }
        }
    }

    /// Masks an HTTP header value: by the first header rule naming it, else by the
    /// detectors (a JWT in a custom header is still caught).
    pub fn mask_header<'a>(
        &self,
        name: &str,
        value: &'a [u8],
        report: &mut MaskReport,
    ) -> Cow<'a, [u8]> {
        match self.inner.headers.iter().find(|(sel, _)| sel.matches(name)) {
            Some((_, r)) => {
                let mut out = Vec::new();
                self.apply_rule(*r, value, &mut out, report);
                Cow::Owned(out)
            }
            None => self.mask_bytes(value, report),
        }
    }

    /// A streaming masker for one byte stream (one direction of one session) that applies
    /// this masker's detectors.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker::new(self.clone())
    }

    /// Writes the replacement of a detector match and counts it in `counts` (per detector;
    /// see [`Masker::report_counts`]), which is cheaper per match than the report's map.
    pub(crate) fn render_found(
        &self,
        m: Found,
        value: &[u8],
        out: &mut Vec<u8>,
        counts: &mut DetectorCounts,
    ) {
        let inner = &self.inner;
        match inner.detector_rule[m.kind.index()].and_then(|r| inner.rules.get(r)) {
            Some(rule) => {
                render(
                    rule.strategy,
                    Some(m.kind),
                    value,
                    inner.hasher.as_ref(),
                    out,
                );
                counts[m.kind.index()] += 1;
            }
            // The scanner only runs detectors that have a rule; fail closed regardless.
            None => out.extend_from_slice(REDACTED.as_bytes()),
        }
    }

    /// Adds per-detector counts to `report` under the names of their rules.
    pub(crate) fn report_counts(&self, counts: &DetectorCounts, report: &mut MaskReport) {
        let inner = &self.inner;
        for (i, n) in counts.iter().enumerate() {
            if *n > 0
                && let Some(rule) = inner.detector_rule[i].and_then(|r| inner.rules.get(r))
            {
                report.add(&rule.name, *n);
            }
        }
    }

    /// Masks a whole source value with rule `r` and counts it.
    pub(crate) fn apply_rule(
        &self,
        r: usize,
        value: &[u8],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) {
        let inner = &self.inner;
        let Some(rule) = inner.rules.get(r) else {
            out.extend_from_slice(REDACTED.as_bytes());
            return;
        };
        report.add(&rule.name, 1);
        if rule.strategy == Strategy::Partial {
            // A value that is exactly one recognisable thing (an email, a card number) keeps
            // the useful part its format allows; anything else gets generic partial masking.
            let t = value.trim_ascii();
            if !t.is_empty() {
                let found = inner.formats.find_all(t);
                if let [f] = found.as_slice()
                    && f.start == 0
                    && f.end == t.len()
                {
                    let lead = value.len() - value.trim_ascii_start().len();
                    out.extend_from_slice(&value[..lead]);
                    render(Strategy::Partial, Some(f.kind), t, None, out);
                    out.extend_from_slice(&value[lead + t.len()..]);
                    return;
                }
            }
        }
        render(rule.strategy, None, value, inner.hasher.as_ref(), out);
    }
}

/// Masked output of UTF-8 input is UTF-8 (matches are ASCII, replacements are ASCII or keep
/// whole characters); the lossy path is a guard, not an expected case.
pub(crate) fn into_string(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}
