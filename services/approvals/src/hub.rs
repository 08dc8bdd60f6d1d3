//! Fan-out of changes to the `Watch` streams of this instance.
//!
//! Every change committed through this instance is published here directly. With Postgres,
//! changes made by other instances arrive as `NOTIFY agentgate_approvals '<id> <version>'`;
//! one listener per instance reads the request once and publishes it here, so a thousand
//! watchers cost one query per change, not a thousand. The hub drops a version it has already
//! published, so a local change that also comes back as a notification reaches watchers once.
//!
//! Notifications are not durable: while the listener's connection is down, changes are lost.
//! When it reconnects the hub sends [`Event::Resync`], and every watcher reads its requests
//! again — so a decision is never missed, only delivered a moment later.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agentgate_proto::approvals::v1::ApprovalRequest;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use crate::store::{self, Store};

/// Versions remembered for deduplication (oldest forgotten first).
const SEEN_CAPACITY: usize = 65_536;
/// Events a slow watcher may fall behind before it must resync.
const CHANNEL_CAPACITY: usize = 4096;

/// What a watcher receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// A request changed; this is its new state.
    Changed(Arc<ApprovalRequest>),
    /// Changes may have been missed: read the current state again.
    Resync,
}

#[derive(Default)]
struct Seen {
    versions: HashMap<String, u64>,
    order: VecDeque<String>,
}

/// The per-instance broadcast of changes.
pub struct Hub {
    tx: broadcast::Sender<Event>,
    seen: Mutex<Seen>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Arc<Hub> {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Arc::new(Hub {
            tx,
            seen: Mutex::new(Seen::default()),
        })
    }

    /// Subscribe before reading the current state, so nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The newest version of `id` published, if remembered.
    fn published(&self, id: &str) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.versions.get(id).copied()
    }

    /// Publishes a request's new state, unless this version (or a newer one) was published.
    pub fn publish(&self, r: ApprovalRequest) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            match seen.versions.get_mut(&r.id) {
                Some(v) if *v >= r.version => return,
                Some(v) => *v = r.version,
                None => {
                    if seen.order.len() >= SEEN_CAPACITY
                        && let Some(old) = seen.order.pop_front()
                    {
                        seen.versions.remove(&old);
                    }
                    seen.order.push_back(r.id.clone());
                    seen.versions.insert(r.id.clone(), r.version);
                }
            }
        }
        // No receivers is not an error: nobody watches.
        let _ = self.tx.send(Event::Changed(Arc::new(r)));
    }

    /// Tells every watcher to read again.
    pub fn resync(&self) {
        let _ = self.tx.send(Event::Resync);
    }
}

/// Starts listening for other instances' changes on Postgres; returns once `LISTEN` is in
/// place, so a change committed after this returns is never missed.
pub async fn listen(
    store: Store,
    hub: Arc<Hub>,
) -> Result<Option<tokio::task::JoinHandle<()>>, store::StoreError> {
    let Some(pool) = store.postgres_pool() else {
        return Ok(None);
    };
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(store::CHANNEL).await?;
    Ok(Some(tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    backoff = Duration::from_millis(100);
                    let Some((id, version)) = store::parse_payload(n.payload()) else {
                        tracing::warn!(payload = n.payload(), "unexpected approvals notification");
                        continue;
                    };
                    if hub.published(id).is_some_and(|v| v >= version) {
                        continue;
                    }
                    match store.get(id).await {
                        Ok(Some(r)) => hub.publish(r),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, id, "reading a changed request failed; watchers resync");
                            hub.resync();
                        }
                    }
                }
                Ok(None) => {
                    tracing::warn!("approvals change listener lost its connection; reconnecting");
                    hub.resync();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "approvals change listener failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    hub.resync();
                }
            }
        }
    })))
}
