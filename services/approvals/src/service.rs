//! The `agentgate.approvals.v1.Approvals` gRPC service.
//!
//! Each call authenticates the caller from its bearer token, checks its input against
//! [`crate::limits`], and lets [`crate::model`] decide under the store's row lock. After a
//! change commits, the service publishes it to local watchers, records it in the audit log
//! (durable before the call returns) and queues webhook notifications (never waited for).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::{Authenticator, bearer_token};
use agentgate_proto::approvals::v1::approvals_server::Approvals as ApprovalsApi;
use agentgate_proto::approvals::v1::{
    ApprovalRequest, CancelRequest, CreateRequest, GetRequest, ListRequest, ListResponse,
    ReviewRequest, State, Verdict, WatchRequest,
};
use agentgate_proto::common::v1::Principal;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::{Actor, AuditLog, service_principal};
use crate::hub::{Event, Hub};
use crate::limits::*;
use crate::model::{self, Outcome, Policy, RuleError, state};
use crate::store::{Filter, Store, StoreError, Visibility};
use crate::webhook::{EventKind, Notifier};

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Counters of what the service did.
#[derive(Clone, Default)]
pub struct ServiceMetrics {
    pub created: Counter,
    pub reviews: Counter,
    pub approved: Counter,
    pub denied: Counter,
    pub expired: Counter,
    pub cancelled: Counter,
    pub refused: Counter,
}

/// Everything the calls share.
pub(crate) struct Inner {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub audit: AuditLog,
    pub notifier: Notifier,
    pub auth: Arc<dyn Authenticator>,
    pub audience: String,
    pub policy: Policy,
    pub metrics: ServiceMetrics,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ApprovalsService {
    pub(crate) inner: Arc<Inner>,
}

fn db_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "approvals database error");
    Status::unavailable(format!("approvals database: {e}"))
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id is required"));
    }
    if uuid::Uuid::parse_str(id).is_err() {
        let shown: String = id.chars().take(40).collect();
        return Err(Status::invalid_argument(format!(
            "id {shown:?} is not an approval request id (a UUID)"
        )));
    }
    Ok(())
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no approval request {id}"))
}

impl Inner {
    /// The caller's verified principal and network address.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Actor, Status> {
        let token = bearer_token(req.metadata())?;
        let principal = self
            .auth
            .authenticate(token, Some(&self.audience))
            .await
            .map_err(|e| Status::unauthenticated(format!("token refused: {e}")))?;
        Ok(Actor {
            principal: Some(principal),
            source_address: req.remote_addr().map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    fn visibility(&self, p: &Principal) -> Visibility {
        Visibility {
            all: model::is_service(p)
                || p.groups
                    .iter()
                    .any(|g| self.policy.viewer_groups.contains(g)),
            subject: p.subject.clone(),
            groups: p.groups.clone(),
        }
    }

    /// After a change committed: watchers, audit log, webhooks, metrics.
    async fn changed(&self, r: &ApprovalRequest, outcome: Outcome, actor: &Actor, review: bool) {
        self.hub.publish(r.clone());
        if review {
            self.metrics.reviews.inc();
            let comment = r.reviews.last().map(|v| v.comment.as_str()).unwrap_or("");
            self.audit
                .record("approval.review", actor, r, comment)
                .await;
        }
        if let Outcome::Decided(s) = outcome {
            let counter = match s {
                State::Approved => &self.metrics.approved,
                State::Denied => &self.metrics.denied,
                State::Expired => &self.metrics.expired,
                _ => &self.metrics.cancelled,
            };
            counter.inc();
            let kind = format!("approval.{}", model::state_word(s));
            self.audit
                .record(&kind, actor, r, &r.decision_comment)
                .await;
            self.notifier.notify(EventKind::Decided(s), r);
            tracing::info!(id = %r.id, state = model::state_word(s),
                by = %actor.principal.as_ref().map(|p| p.subject.as_str()).unwrap_or(""),
                "approval request decided");
        }
    }

    /// Records an expiry found by a read, a review or the sweeper.
    pub(crate) async fn expired(&self, r: &ApprovalRequest) {
        let actor = Actor {
            principal: Some(service_principal()),
            source_address: String::new(),
        };
        self.changed(r, Outcome::Decided(State::Expired), &actor, false)
            .await;
    }

    /// Reads a request, expiring it first when it is past due.
    async fn load(&self, id: &str) -> Result<Option<ApprovalRequest>, Status> {
        let Some(r) = self.store.get(id).await.map_err(db_status)? else {
            return Ok(None);
        };
        if !model::is_due(&r, model::now_us()) {
            return Ok(Some(r));
        }
        let updated = self
            .store
            .update(id, model::now_us(), |_| Ok(None))
            .await
            .map_err(db_status)?;
        let Some(u) = updated else { return Ok(None) };
        if let Some(e) = &u.expired {
            self.expired(e).await;
        }
        Ok(Some(u.request))
    }

    /// Applies a change under the row lock and reports it; refusals become statuses.
    async fn apply<F>(
        &self,
        id: &str,
        actor: &Actor,
        review: bool,
        change: F,
    ) -> Result<ApprovalRequest, Status>
    where
        F: FnOnce(&mut ApprovalRequest) -> Result<Option<Outcome>, RuleError>,
    {
        let updated = self
            .store
            .update(id, model::now_us(), change)
            .await
            .map_err(db_status)?
            .ok_or_else(|| not_found(id))?;
        if let Some(e) = &updated.expired {
            self.expired(e).await;
        }
        match updated.result {
            Ok(Some(outcome)) => {
                self.changed(&updated.request, outcome, actor, review).await;
                Ok(updated.request)
            }
            Ok(None) => Ok(updated.request),
            Err(e) => {
                self.metrics.refused.inc();
                Err(e.into())
            }
        }
    }
}

#[tonic::async_trait]
impl ApprovalsApi for ApprovalsService {
    async fn create(
        &self,
        request: Request<CreateRequest>,
    ) -> Result<Response<ApprovalRequest>, Status> {
        let s = &self.inner;
        let actor = s.caller(&request).await?;
        let caller = actor.principal.clone().unwrap_or_default();
        let id = uuid::Uuid::now_v7().to_string();
        let r = model::new_request(
            &caller,
            request.into_inner(),
            &s.policy,
            id,
            model::now_us(),
        )
        .map_err(|e| {
            s.metrics.refused.inc();
            Status::from(e)
        })?;
        s.store.insert(&r).await.map_err(db_status)?;
        s.metrics.created.inc();
        s.hub.publish(r.clone());
        s.audit
            .record("approval.created", &actor, &r, &r.reason)
            .await;
        s.notifier.notify(EventKind::Created, &r);
        tracing::info!(id = %r.id, requester = %r.requester.as_ref().map(|p| p.subject.as_str()).unwrap_or(""),
            connection = %r.connection, by = %caller.subject, "approval request created");
        Ok(Response::new(r))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ApprovalRequest>, Status> {
        let s = &self.inner;
        let actor = s.caller(&request).await?;
        let caller = actor.principal.unwrap_or_default();
        let id = request.into_inner().id;
        check_id(&id)?;
        let r = s.load(&id).await?.ok_or_else(|| not_found(&id))?;
        if !model::may_see(&r, &caller, &s.policy) {
            return Err(Status::permission_denied(format!(
                "{} may not see request {id}: only its requester, its reviewers and viewers may",
                caller.subject
            )));
        }
        Ok(Response::new(r))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let s = &self.inner;
        let actor = s.caller(&request).await?;
        let caller = actor.principal.unwrap_or_default();
        let q = request.into_inner();
        let filter = filter(
            &s.visibility(&caller),
            q.state,
            q.connection,
            q.requester,
            q.limit,
        )?;
        let now = model::now_us();
        let mut requests = Vec::new();
        for r in s.store.list(&filter).await.map_err(db_status)? {
            let r = if model::is_due(&r, now) {
                match s.load(&r.id).await? {
                    Some(r) => r,
                    None => continue,
                }
            } else {
                r
            };
            if filter.state == 0 || filter.state == r.state {
                requests.push(r);
            }
        }
        Ok(Response::new(ListResponse { requests }))
    }

    async fn review(
        &self,
        request: Request<ReviewRequest>,
    ) -> Result<Response<ApprovalRequest>, Status> {
        let s = &self.inner;
        let actor = s.caller(&request).await?;
        let reviewer = actor.principal.clone().unwrap_or_default();
        let q = request.into_inner();
        check_id(&q.id)?;
        let verdict = match Verdict::try_from(q.verdict) {
            Ok(v @ (Verdict::Approve | Verdict::Deny)) => v,
            _ => {
                return Err(Status::invalid_argument(
                    "verdict must be VERDICT_APPROVE or VERDICT_DENY",
                ));
            }
        };
        if q.comment.len() > MAX_TEXT || q.comment.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "comment must be at most {MAX_TEXT} bytes of text"
            )));
        }
        let source = actor.source_address.clone();
        let now = model::now_us();
        let r = s
            .apply(&q.id, &actor, true, |r| {
                model::review(r, &reviewer, verdict, q.comment, source, now).map(Some)
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<ApprovalRequest>, Status> {
        let s = &self.inner;
        let actor = s.caller(&request).await?;
        let caller = actor.principal.clone().unwrap_or_default();
        let q = request.into_inner();
        check_id(&q.id)?;
        model::check_reason("reason", &q.reason, &s.policy)?;
        let now = model::now_us();
        let r = s
            .apply(&q.id, &actor, false, |r| {
                model::cancel(r, &caller, q.reason, now).map(Some)
            })
            .await?;
        Ok(Response::new(r))
    }

    type WatchStream = BoxStream<ApprovalRequest>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let s = self.inner.clone();
        let actor = s.caller(&request).await?;
        let caller = actor.principal.unwrap_or_default();
        let q = request.into_inner();
        // Subscribe before the first read, so no change falls in between.
        let events = s.hub.subscribe();
        let (tx, rx) = mpsc::channel(64);
        if q.id.is_empty() {
            let state = State::try_from(q.state)
                .map_err(|_| Status::invalid_argument(format!("state {} is unknown", q.state)))?;
            let snapshot_state = if state == State::Unspecified {
                State::Pending
            } else {
                state
            };
            let f = filter(
                &s.visibility(&caller),
                snapshot_state as i32,
                q.connection,
                q.requester,
                WATCH_SNAPSHOT_LIMIT,
            )?;
            // Fail the call, not the stream, when the database is down.
            let first = s.store.list(&f).await.map_err(db_status)?;
            tokio::spawn(watch_filter(s, caller, f, state, first, events, tx));
        } else {
            check_id(&q.id)?;
            let r = s.load(&q.id).await?.ok_or_else(|| not_found(&q.id))?;
            if !model::may_see(&r, &caller, &s.policy) {
                return Err(Status::permission_denied(format!(
                    "{} may not watch request {}: only its requester, its reviewers and viewers may",
                    caller.subject, q.id
                )));
            }
            tokio::spawn(watch_one(s, r, events, tx));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn filter(
    visibility: &Visibility,
    state: i32,
    connection: String,
    requester: String,
    limit: u32,
) -> Result<Filter, Status> {
    if State::try_from(state).is_err() {
        return Err(Status::invalid_argument(format!(
            "state {state} is unknown"
        )));
    }
    if connection.len() > MAX_NAME || requester.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "connection and requester filters are at most {MAX_NAME} bytes"
        )));
    }
    Ok(Filter {
        state,
        connection,
        requester,
        limit: match limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        },
        visibility: visibility.clone(),
    })
}

type Tx = mpsc::Sender<Result<ApprovalRequest, Status>>;

/// Follows one request: the current state (already read), then each newer version, until a
/// final state. Also wakes at the expiry time, so a watcher sees EXPIRED on time.
async fn watch_one(
    s: Arc<Inner>,
    first: ApprovalRequest,
    mut events: broadcast::Receiver<Event>,
    tx: Tx,
) {
    let id = first.id.clone();
    let mut last = first.version;
    let mut expires_at = model::expires_at_us(&first);
    let mut done = state(&first) != State::Pending;
    if tx.send(Ok(first)).await.is_err() || done {
        return;
    }
    loop {
        let wait =
            Duration::from_micros((expires_at - model::now_us()).clamp(0, 3_600_000_000) as u64)
                + Duration::from_millis(5);
        let reread = tokio::select! {
            ev = events.recv() => match ev {
                Ok(Event::Changed(r)) if r.id == id => {
                    if r.version > last {
                        last = r.version;
                        expires_at = model::expires_at_us(&r);
                        done = state(&r) != State::Pending;
                        if tx.send(Ok((*r).clone())).await.is_err() {
                            return;
                        }
                    }
                    false
                }
                Ok(Event::Changed(_)) => false,
                Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(wait) => true,
            _ = tx.closed() => return,
        };
        if reread {
            match s.load(&id).await {
                Ok(Some(r)) if r.version > last => {
                    last = r.version;
                    expires_at = model::expires_at_us(&r);
                    done = state(&r) != State::Pending;
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if done {
            return;
        }
    }
}

/// Whether a change matches a filtered watch. Only pending requests change, so every change
/// is one of a request that was pending: a watcher of PENDING sees every change.
fn matches(r: &ApprovalRequest, f: &Filter, watched: State) -> bool {
    (f.connection.is_empty() || r.connection == f.connection)
        && (f.requester.is_empty()
            || r.requester.as_ref().map(|p| p.subject.as_str()) == Some(f.requester.as_str()))
        && (watched == State::Unspecified || watched == State::Pending || r.state == watched as i32)
}

/// Follows every request matching a filter: a snapshot, then every matching change. After
/// a resync the snapshot is sent again. A change the snapshot already shows (it landed
/// between the subscription and the read) is not sent twice: the versions the snapshot sent
/// are remembered until a newer version of each arrives.
async fn watch_filter(
    s: Arc<Inner>,
    caller: Principal,
    f: Filter,
    watched: State,
    first: Vec<ApprovalRequest>,
    mut events: broadcast::Receiver<Event>,
    tx: Tx,
) {
    let mut snapshot = Some(first);
    let mut in_snapshot: HashMap<String, u64> = HashMap::new();
    loop {
        if let Some(list) = snapshot.take() {
            in_snapshot.clear();
            // Oldest first, as they happened.
            for r in list.into_iter().rev() {
                in_snapshot.insert(r.id.clone(), r.version);
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(Event::Changed(r)) => {
                    let sent = in_snapshot.get(&r.id).is_some_and(|v| *v >= r.version);
                    if !sent {
                        in_snapshot.remove(&r.id);
                    }
                    if !sent
                        && matches(&r, &f, watched)
                        && model::may_see(&r, &caller, &s.policy)
                        && tx.send(Ok((*r).clone())).await.is_err()
                    {
                        return;
                    }
                }
                Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    match s.store.list(&f).await {
                        Ok(list) => snapshot = Some(list),
                        Err(e) => {
                            let _ = tx.send(Err(db_status(e))).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tx.closed() => return,
        }
    }
}

/// Expires pending requests on time, whether or not anyone looks: sleeps until the next
/// expiry (at most `interval`, since another instance may have added an earlier one), then
/// expires what is due. Safe on every instance at once (see [`Store::expire_due`]).
pub(crate) async fn sweeper(s: Arc<Inner>, interval: Duration) {
    const BATCH: u32 = 100;
    loop {
        // Look first (a read), write only when something is due: on SQLite a write
        // transaction takes the one write lock.
        let next = match s.store.next_expiry_us().await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "expiry sweep failed; retrying");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        let now = model::now_us();
        if next.is_some_and(|n| n <= now) {
            match s.store.expire_due(now, BATCH).await {
                Ok(expired) => {
                    for r in &expired {
                        s.expired(r).await;
                    }
                    if expired.len() as u32 == BATCH {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiry sweep failed; retrying");
                    tokio::time::sleep(interval).await;
                    continue;
                }
            }
            // Another instance may hold the rows; look again soon.
            tokio::time::sleep(Duration::from_millis(20).min(interval)).await;
            continue;
        }
        let sleep = match next {
            Some(n) => interval.min(Duration::from_micros((n - now).max(0) as u64)),
            None => interval,
        };
        tokio::time::sleep(sleep + Duration::from_millis(1)).await;
    }
}
