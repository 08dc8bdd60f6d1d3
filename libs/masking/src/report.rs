//! What was masked, for the audit record.

use std::collections::BTreeMap;

use serde::Serialize;

/// Counts of masking actions per rule name.
///
/// Every time a rule rewrites a value (a cell, a JSON leaf, a header, a match in a stream)
/// its count goes up by one. The proxies put this in the audit record so that an auditor can
/// see *that* and *what kind of* data was masked; by construction the report holds rule names
/// and counts only, never a masked value or a hint of one.
///
/// Serializes as a JSON object `{"rule": count, ...}` with keys in sorted order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MaskReport {
    counts: BTreeMap<String, u64>,
}

impl MaskReport {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` actions for `rule`. Public so that a proxy can fold reports kept elsewhere
    /// (per cell, per message) into one per operation.
    pub fn add(&mut self, rule: &str, n: u64) {
        if n == 0 {
            return;
        }
        match self.counts.get_mut(rule) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.counts.insert(rule.to_owned(), n);
            }
        }
    }

    /// How many times `rule` masked something; 0 for a rule that never fired.
    pub fn count(&self, rule: &str) -> u64 {
        self.counts.get(rule).copied().unwrap_or(0)
    }

    /// All masking actions, over all rules.
    pub fn total(&self) -> u64 {
        self.counts.values().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// True when nothing was masked.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// (rule name, count) pairs in rule-name order, for writing the audit record.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.counts.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Adds every count of `other` into this report.
    pub fn merge(&mut self, other: &MaskReport) {
        for (rule, n) in other.iter() {
            self.add(rule, n);
        }
    }

    /// Empties the report, keeping its allocation, e.g. after each audited operation.
    pub fn clear(&mut self) {
        self.counts.clear();
    }
}
