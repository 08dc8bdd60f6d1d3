//! The single writer: every append goes through one task, which groups the batches that
//! queue up while a transaction commits into the next one (group commit). The chain needs
//! one order anyway; grouping turns that into throughput.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use agentgate_audit_chain::{Checkpoint, SigningKey};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::metrics::StoreMetrics;
use crate::store::{AppendOutcome, NewEvent, Store};

/// Most events one transaction takes.
const MAX_GROUP_EVENTS: usize = 20_000;

enum Job {
    Append(
        Vec<NewEvent>,
        oneshot::Sender<Result<AppendOutcome, Status>>,
    ),
    Checkpoint(oneshot::Sender<Result<Option<Checkpoint>, Status>>),
}

/// A handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer; it also signs a checkpoint every `interval` when the head moved.
    pub fn spawn(
        store: Store,
        key: Arc<SigningKey>,
        checkpoint_every: u64,
        interval: Duration,
        metrics: StoreMetrics,
    ) -> Writer {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run(store, key, checkpoint_every, interval, metrics, rx));
        Writer { tx }
    }

    /// Queues a batch; the receiver resolves once it is committed.
    pub async fn append(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, Status>>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Append(events, tx))
            .await
            .map_err(|_| Status::unavailable("audit store is shutting down"))?;
        Ok(rx)
    }

    /// Signs a checkpoint of the head now (none if the head is already signed).
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Checkpoint(tx))
            .await
            .map_err(|_| Status::unavailable("audit store is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("audit store is shutting down"))?
    }
}

async fn run(
    store: Store,
    key: Arc<SigningKey>,
    every: u64,
    interval: Duration,
    metrics: StoreMetrics,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut later = VecDeque::new();
    loop {
        let first = tokio::select! {
            job = rx.recv() => match job { Some(j) => j, None => break },
            _ = ticker.tick() => {
                if let Err(e) = store.checkpoint(&key).await {
                    tracing::error!(error = %e, "timed checkpoint failed");
                }
                continue;
            }
        };
        let mut group = Vec::new();
        let mut replies = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append(events, reply) => {
                    size += events.len();
                    group.push(events);
                    replies.push(reply);
                }
                other => later.push_back(other),
            }
            if size < MAX_GROUP_EVENTS {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() {
            let started = std::time::Instant::now();
            let count = size;
            match store.append(group, &key, every).await {
                Ok(outcomes) => {
                    metrics.record_append(&outcomes, started.elapsed());
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, events = count, "append failed");
                    metrics.append_failures.inc();
                    for reply in replies {
                        let _ = reply.send(Err(Status::unavailable(format!(
                            "audit store database: {e}"
                        ))));
                    }
                }
            }
        }
        while let Some(job) = later.pop_front() {
            if let Job::Checkpoint(reply) = job {
                let result = store
                    .checkpoint(&key)
                    .await
                    .map_err(|e| Status::unavailable(format!("audit store database: {e}")));
                let _ = reply.send(result);
            }
        }
    }
}
