//! Detector quality on the labeled test set (`tests/data/labeled.tsv`, built by
//! `tests/data/gen_labeled.py`): precision and recall per detector.
//!
//! Each line names a detector and holds a sample; spans between ⟦ and ⟧ must be masked by
//! that detector (positives); lines without them are look-alike negatives. All detectors run
//! on every sample, so a detector firing on another detector's sample counts against it.
//!
//! - true positive: a marked span fully covered by a finding of its detector (a finding that
//!   covers only part of a secret leaks the rest, so it counts as a miss);
//! - false negative: a marked span not fully covered;
//! - false positive: a finding that overlaps no marked span of its own detector.
//!
//! Run with `--nocapture` to see the table (it is copied into docs/masking.md).

use std::collections::BTreeMap;

use agentgate_masking::{DetectorKind, Masker, MaskingConfig};

struct Sample {
    kind: DetectorKind,
    text: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some(o) => {
                    out.push('\\');
                    out.push(o);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn load() -> Vec<Sample> {
    let raw = include_str!("data/labeled.tsv");
    let mut samples = Vec::new();
    for (n, line) in raw.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (kind, rest) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("line {}: no tab", n + 1));
        let kind: DetectorKind = serde_json::from_value(serde_json::Value::String(kind.into()))
            .unwrap_or_else(|e| panic!("line {}: unknown detector {kind}: {e}", n + 1));
        let text = unescape(rest);
        let mut out = Vec::new();
        let mut spans = Vec::new();
        let mut open = None;
        for c in text.chars() {
            match c {
                '⟦' => open = Some(out.len()),
                '⟧' => {
                    let s = open
                        .take()
                        .unwrap_or_else(|| panic!("line {}: unbalanced", n + 1));
                    spans.push((s, out.len()));
                }
                c => {
                    let mut b = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        samples.push(Sample {
            kind,
            text: out,
            spans,
        });
    }
    samples
}

#[derive(Default, Clone, Copy)]
struct Counts {
    positives: u32,
    negatives: u32,
    tp: u32,
    fn_: u32,
    fp: u32,
}

#[test]
fn precision_and_recall_per_detector() {
    let masker = Masker::new(&MaskingConfig::recommended(), None).expect("config");
    let samples = load();
    let mut counts: BTreeMap<DetectorKind, Counts> = BTreeMap::new();
    for k in DetectorKind::ALL {
        counts.insert(k, Counts::default());
    }
    let mut misses = Vec::new();
    for s in &samples {
        let found = masker.find(&s.text);
        let c = counts.entry(s.kind).or_default();
        if s.spans.is_empty() {
            c.negatives += 1;
        }
        for &(a, b) in &s.spans {
            c.positives += 1;
            if found
                .iter()
                .any(|f| f.detector == s.kind && f.range.start <= a && f.range.end >= b)
            {
                c.tp += 1;
            } else {
                c.fn_ += 1;
                misses.push(format!(
                    "FN {}: {:?} (found {:?})",
                    s.kind,
                    String::from_utf8_lossy(&s.text[a..b]),
                    found
                ));
            }
        }
        for f in &found {
            let own = s.kind == f.detector
                && s.spans
                    .iter()
                    .any(|&(a, b)| f.range.start < b && f.range.end > a);
            if !own {
                counts.entry(f.detector).or_default().fp += 1;
                misses.push(format!(
                    "FP {} on a {} sample: {:?}",
                    f.detector,
                    s.kind,
                    String::from_utf8_lossy(&s.text[f.range.clone()])
                ));
            }
        }
    }
    for m in &misses {
        println!("{m}");
    }
    println!();
    println!("| detector | positives | look-alike negatives | TP | FN | FP | precision | recall |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let ratio = |a: u32, b: u32| {
        if b == 0 {
            1.0
        } else {
            f64::from(a) / f64::from(b)
        }
    };
    let mut failures = Vec::new();
    for (k, c) in &counts {
        let precision = ratio(c.tp, c.tp + c.fp);
        let recall = ratio(c.tp, c.tp + c.fn_);
        println!(
            "| {k} | {} | {} | {} | {} | {} | {:.3} | {:.3} |",
            c.positives, c.negatives, c.tp, c.fn_, c.fp, precision, recall
        );
        assert!(
            c.positives > 0,
            "{k}: no positive sample in the labeled set"
        );
        // Checksum-backed detectors: no false negative at all on the positive set, and the
        // checksum keeps look-alikes out (a check digit still lets one random number in ten
        // through for Luhn, one in 97 for IBAN, hence not 1.0).
        if matches!(k, DetectorKind::PaymentCard | DetectorKind::Iban) {
            if c.fn_ != 0 || precision < 0.95 {
                failures.push(format!(
                    "{k}: {} false negatives, precision {precision:.3}",
                    c.fn_
                ));
            }
            continue;
        }
        if recall < 0.85 || precision < 0.85 {
            failures.push(format!(
                "{k}: precision {precision:.3}, recall {recall:.3} below 0.85"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "detector quality below thresholds: {failures:#?}"
    );
}
