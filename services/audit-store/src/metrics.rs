//! The audit store's Prometheus metrics.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::AppendOutcome;

/// Counters of what ingestion did; cheap to clone (shared atomics).
#[derive(Clone)]
pub struct StoreMetrics {
    pub events_stored: Counter,
    pub events_duplicate: Counter,
    pub batches_rejected: Counter,
    pub append_failures: Counter,
    /// Calls refused for their credential (UNAUTHENTICATED) or permission (PERMISSION_DENIED).
    pub calls_refused: Counter,
    pub commit_seconds: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            events_stored: Counter::default(),
            events_duplicate: Counter::default(),
            batches_rejected: Counter::default(),
            append_failures: Counter::default(),
            calls_refused: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

impl StoreMetrics {
    /// Registers every metric under the `audit_store` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("audit_store");
        r.register(
            "events_stored",
            "Events appended to the chain",
            self.events_stored.clone(),
        );
        r.register(
            "events_duplicate",
            "Resent events already stored",
            self.events_duplicate.clone(),
        );
        r.register(
            "batches_rejected",
            "Ingest batches refused as malformed",
            self.batches_rejected.clone(),
        );
        r.register(
            "append_failures",
            "Group commits that failed",
            self.append_failures.clone(),
        );
        r.register(
            "calls_refused",
            "Calls refused for a missing or invalid credential or a missing permission",
            self.calls_refused.clone(),
        );
        r.register(
            "commit_seconds",
            "Time to commit one group of batches",
            self.commit_seconds.clone(),
        );
    }

    pub(crate) fn record_append(&self, outcomes: &[AppendOutcome], took: Duration) {
        for o in outcomes {
            self.events_stored.inc_by(o.stored.into());
            self.events_duplicate.inc_by(o.duplicates.into());
        }
        self.commit_seconds.observe(took.as_secs_f64());
    }
}
