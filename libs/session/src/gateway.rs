//! One [`Gateway`] per proxy process: the clients of the control plane, the recorder, and the
//! one grant-event subscription that ends live sessions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentgate_authz::client::{AuthzClient, Refused};
use agentgate_identity::{FixedToken, TokenSource};
use agentgate_masking::HashKey;
use agentgate_proto::audit::v1::audit_event::Detail;
use agentgate_proto::audit::v1::{AuditEvent, SessionStarted};
use agentgate_proto::authz::v1::{
    ClientInfo, Credential, GrantEvent, GrantEventKind, OpenSessionResponse,
};
use agentgate_proto::common::v1::{Operation, Protocol};
use agentgate_recorder::Recorder;
use futures::StreamExt as _;
use tokio::sync::watch;
use tonic::transport::ClientTlsConfig;

use crate::approval::ApprovalsApi;
use crate::from_timestamp;
use crate::message::EndReason;
use crate::session::{Session, Shared, UpstreamCredential};

/// How long `close` waits for authz's `CloseSession` before giving up (it is best effort:
/// authz ends sessions at their expiry anyway).
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Grant events for sessions this proxy does not (yet) hold, remembered in case the session
/// registers a moment later (an event can overtake the `OpenSession` answer).
const UNMATCHED_EVENTS: usize = 4096;

/// What a proxy configures once, at start.
#[derive(Clone)]
pub struct GatewayConfig {
    /// This proxy instance, e.g. `pg-proxy@db-gw-1`: authz records it with each session and
    /// names the grant-stream subscriber after it.
    pub proxy: String,
    /// The protocol this proxy speaks; authz refuses sessions on connections of another.
    pub protocol: Protocol,
    /// The approvals service's gRPC address, e.g. `http://127.0.0.1:7405` (`https://` with
    /// [`GatewayConfig::approvals_tls`]). Connected on first use, so a proxy can start before
    /// approvals; while it is unreachable, held operations are refused.
    pub approvals_url: String,
    /// TLS (and client certificate) for the approvals service.
    pub approvals_tls: Option<ClientTlsConfig>,
    /// The proxy's service token, presented to approvals as `Bearer` and asked for anew on
    /// every call (a renewed file is picked up); approvals lets only service principals create
    /// requests on an agent's behalf with the reviewers policy names. Never logged.
    pub service_token: Arc<dyn TokenSource>,
    /// The deployment's key for the keyed-hash masking strategy; sessions whose policy uses
    /// that strategy are refused without it.
    pub masking_hash_key: Option<HashKey>,
    /// How long a held operation keeps trying to reach approvals after losing it before the
    /// operation is refused (fail closed). Default 15 s.
    pub approvals_retry: Duration,
    /// Longest wait between attempts to re-subscribe to authz's grant events. Default 5 s.
    pub grant_stream_max_backoff: Duration,
}

impl GatewayConfig {
    /// A configuration with the defaults above and a fixed service token (see
    /// [`GatewayConfig::with_token_source`] for one that is renewed).
    pub fn new(
        proxy: impl Into<String>,
        protocol: Protocol,
        approvals_url: impl Into<String>,
        service_token: impl Into<String>,
    ) -> GatewayConfig {
        GatewayConfig {
            proxy: proxy.into(),
            protocol,
            approvals_url: approvals_url.into(),
            approvals_tls: None,
            service_token: Arc::new(FixedToken::new(service_token)),
            masking_hash_key: None,
            approvals_retry: Duration::from_secs(15),
            grant_stream_max_backoff: Duration::from_secs(5),
        }
    }
}

impl GatewayConfig {
    /// Presents the token `source` gives at the time of each call.
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> GatewayConfig {
        self.service_token = source;
        self
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("proxy", &self.proxy)
            .field("protocol", &self.protocol)
            .field("approvals_url", &self.approvals_url)
            .field("approvals_tls", &self.approvals_tls.is_some())
            .field("service_token", &"<redacted>")
            .field("masking_hash_key", &self.masking_hash_key)
            .field("approvals_retry", &self.approvals_retry)
            .field("grant_stream_max_backoff", &self.grant_stream_max_backoff)
            .finish()
    }
}

/// Why a [`Gateway`] could not be set up; all are configuration mistakes to fix at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The approvals URL does not parse, or its TLS settings are refused.
    #[error("approvals service {url:?}: {reason}")]
    Approvals {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The service token cannot be sent as a header.
    #[error("the service token is not a valid header value (check for stray newlines)")]
    ServiceToken,
    /// `Gateway::start` spawns tasks: it must run inside a Tokio runtime.
    #[error("Gateway::start must be called from within a Tokio runtime")]
    NoRuntime,
}

/// The state of the grant-event subscription, for readiness checks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantStreamState {
    /// Not subscribed yet.
    Connecting,
    /// Subscribed: revocations reach live sessions within milliseconds.
    Connected,
    /// Lost, reconnecting with backoff; the reason it was lost. Live sessions still end at
    /// their own expiry meanwhile, and sessions authz ended in the gap are found and ended
    /// on reconnect.
    Disconnected(String),
}

/// The pipeline's shared half for one proxy process. Cheap to clone (an `Arc`): hand a clone
/// to every connection task. Dropping the last clone stops the grant-event subscription.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) inner: Arc<GatewayInner>,
}

pub(crate) struct GatewayInner {
    pub(crate) authz: AuthzClient,
    pub(crate) approvals: ApprovalsApi,
    pub(crate) recorder: Recorder,
    pub(crate) proxy: String,
    pub(crate) protocol: Protocol,
    pub(crate) hash_key: Option<HashKey>,
    pub(crate) registry: Arc<Registry>,
    stream_state: watch::Receiver<GrantStreamState>,
    /// Dropped with the gateway, which tells the subscription task to stop.
    _stop: watch::Sender<()>,
}

impl Gateway {
    /// Sets up the gateway and starts the grant-event subscription (in the background; see
    /// [`Gateway::grant_stream`]). `authz` and `recorder` are built by the proxy, which owns
    /// their configuration (URLs, TLS, the recorder's spool and store credentials).
    pub fn start(
        authz: AuthzClient,
        recorder: Recorder,
        config: GatewayConfig,
    ) -> Result<Gateway, GatewayError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(GatewayError::NoRuntime);
        }
        let approvals = ApprovalsApi::new(
            &config.approvals_url,
            config.approvals_tls.clone(),
            config.service_token.clone(),
            config.approvals_retry,
        )?;
        let registry = Arc::new(Registry::default());
        let (state_tx, stream_state) = watch::channel(GrantStreamState::Connecting);
        let (stop, stopped) = watch::channel(());
        tokio::spawn(watch_grants(
            authz.clone(),
            config.proxy.clone(),
            registry.clone(),
            state_tx,
            stopped,
            config.grant_stream_max_backoff,
        ));
        // A failed spool write loses the events in it, whichever sessions they were of:
        // every live session ends (RecordingFailed) rather than run on with a hole in its
        // record. New sessions open again once the spool writes (session.start must be
        // durable first).
        let mut failures = recorder.write_failures();
        let failing = registry.clone();
        tokio::spawn(async move {
            while let Some(why) = failures.next().await {
                tracing::error!(error = %why, "audit spool write failed; ending every live session");
                for (_, end) in failing.snapshot() {
                    crate::session::signal(&end, EndReason::RecordingFailed(why.clone()));
                }
            }
        });
        Ok(Gateway {
            inner: Arc::new(GatewayInner {
                authz,
                approvals,
                recorder,
                proxy: config.proxy,
                protocol: config.protocol,
                hash_key: config.masking_hash_key,
                registry,
                stream_state,
                _stop: stop,
            }),
        })
    }

    /// Opens a session for an agent's credential: authz verifies it and answers with the
    /// grant and the policy (no grant, no session), the session's masker is built, and
    /// `session.start` is durably recorded before this returns — nothing runs unrecorded.
    ///
    /// Every failure is a refusal (fail closed): authz unreachable is
    /// [`Refused::Unavailable`], a bad credential [`Refused::Unauthenticated`], no grant
    /// [`Refused::Denied`]. A policy this proxy cannot apply (an unknown masking detector, a
    /// missing hash key), an upstream secret it cannot resolve, or an audit spool it cannot
    /// write also refuse the session, and authz's session is closed again. Show the agent
    /// [`crate::refusal_message`].
    ///
    /// `client` is the agent's client as its protocol names it (`psql 16.2`, `OpenSSH_9.6`);
    /// `source_address` is the agent's address as the proxy saw it (after PROXY protocol).
    #[tracing::instrument(skip_all, fields(connection = connection, role = role, source = source_address))]
    pub async fn open(
        &self,
        credential: Credential,
        connection: &str,
        role: &str,
        source_address: &str,
        client: &str,
    ) -> Result<Session, Refused> {
        let g = &self.inner;
        let answer = g
            .authz
            .open_session(
                credential,
                connection,
                role,
                g.protocol,
                source_address,
                ClientInfo {
                    user_agent: client.to_owned(),
                    proxy: g.proxy.clone(),
                },
            )
            .await?;
        let session_id = answer.session_id.clone();
        match self.build(answer, role, source_address, client).await {
            Ok(session) => Ok(session),
            Err(refused) => {
                tracing::warn!(session = %session_id, connection, role, reason = %refused, "session refused by the proxy after authz opened it");
                let why = format!("refused by proxy: {refused}");
                let closing = g.authz.close_session(&session_id, &why);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                Err(refused)
            }
        }
    }

    async fn build(
        &self,
        answer: OpenSessionResponse,
        role: &str,
        source_address: &str,
        client: &str,
    ) -> Result<Session, Refused> {
        let g = &self.inner;
        let incomplete =
            |what: &str| Refused::Unavailable(format!("authz answered OpenSession without {what}"));
        if answer.session_id.is_empty() {
            return Err(incomplete("a session id"));
        }
        let principal = answer.principal.ok_or_else(|| incomplete("a principal"))?;
        let grant = answer.grant.ok_or_else(|| incomplete("a grant"))?;
        let policy = answer.policy.ok_or_else(|| incomplete("a policy"))?;
        let connection = answer
            .connection
            .ok_or_else(|| incomplete("a connection"))?;
        let expires_at = answer
            .expires_at
            .as_ref()
            .map(from_timestamp)
            .ok_or_else(|| incomplete("an expiry"))?;
        if expires_at <= SystemTime::now() {
            return Err(Refused::Denied(
                "your access has already expired; request access again".into(),
            ));
        }
        let upstream = UpstreamCredential::from_proto(answer.upstream.unwrap_or_default())
            .map_err(|e| {
                tracing::error!(connection = %connection.name, role, error = %e, "upstream secret unavailable on this proxy");
                Refused::Denied(format!(
                    "the upstream credential of {}/{role} is not available on this proxy; tell the operator",
                    connection.name
                ))
            })?;
        let masker = crate::masking::masker_for(&policy.masking_rules, g.hash_key.clone())
            .map_err(|e| {
                Refused::Denied(format!(
                    "this session's masking policy cannot be applied ({e}); refusing rather than showing unmasked data"
                ))
            })?;

        let session_id = answer.session_id;
        let end = g.registry.register(&session_id);
        let template = AuditEvent {
            session_id: session_id.clone(),
            principal: Some(principal.clone()),
            source_address: source_address.to_owned(),
            connection: connection.name.clone(),
            protocol: g.protocol as i32,
            role: role.to_owned(),
            ..Default::default()
        };
        let failed = end.clone();
        let events = Arc::new(crate::record::Writer::new(
            g.recorder.clone(),
            &template,
            move |e| crate::session::signal(&failed, EndReason::RecordingFailed(e)),
        ));
        let session = Session::new(Shared::new(
            self.inner.clone(),
            session_id,
            principal,
            grant,
            expires_at,
            connection,
            role.to_owned(),
            source_address.to_owned(),
            upstream,
            policy,
            masker,
            end,
            events,
        ));
        let s = &session.shared;
        let mut attributes = HashMap::new();
        attributes.insert("proxy".to_owned(), g.proxy.clone());
        attributes.insert("policy_version".to_owned(), s.policy.version.clone());
        attributes.insert(
            "session_expires_at".to_owned(),
            crate::rfc3339(s.expires_at),
        );
        attributes.insert(
            "grant_source".to_owned(),
            grant_source_name(s.grant.source).to_owned(),
        );
        let started = SessionStarted {
            client: client.to_owned(),
            grant_id: s.grant.id.clone(),
            grant_expires_at: s.grant.expires_at,
            upstream_user: s.upstream.user().to_owned(),
        };
        let recorded = async {
            session
                .record_event(
                    "session.start",
                    Some(Detail::SessionStarted(started)),
                    attributes,
                )
                .await?;
            session.flush().await
        };
        if let Err(e) = recorded.await {
            // Nothing runs unrecorded. The session is marked closed so that dropping it does
            // not record an end to a session whose start is not on record.
            session.abandon();
            return Err(Refused::Denied(format!(
                "this proxy cannot record the session ({e}); nothing runs unrecorded"
            )));
        }
        tracing::info!(
            session = %session.id(),
            principal = %session.principal().subject,
            connection = %session.connection().name,
            role,
            source = source_address,
            expires_at = %crate::rfc3339(session.expires_at()),
            "session opened"
        );
        Ok(session)
    }

    /// The authz client, for the rare central call (`Authorize`) a proxy makes itself.
    pub fn authz(&self) -> &AuthzClient {
        &self.inner.authz
    }

    /// The recorder, for events outside any session and for `flush` at shutdown.
    pub fn recorder(&self) -> &Recorder {
        &self.inner.recorder
    }

    /// Sessions open on this gateway right now.
    pub fn live_sessions(&self) -> usize {
        self.inner.registry.len()
    }

    /// The grant-event subscription's state; `wait_for(|s| *s == Connected)` for readiness.
    pub fn grant_stream(&self) -> watch::Receiver<GrantStreamState> {
        self.inner.stream_state.clone()
    }

    /// Signals every live session to end with `reason` (e.g. [`EndReason::Shutdown`]); each
    /// proxy task sees it on [`Session::ended`] and closes its session.
    pub fn end_all(&self, reason: EndReason) {
        for (_, end) in self.inner.registry.snapshot() {
            crate::session::signal(&end, reason.clone());
        }
    }
}

fn grant_source_name(source: i32) -> &'static str {
    use agentgate_proto::authz::v1::GrantSource;
    match GrantSource::try_from(source) {
        Ok(GrantSource::Standing) => "standing",
        Ok(GrantSource::JustInTime) => "just_in_time",
        _ => "unspecified",
    }
}

/// The end signal of one session: `None` while it lives, then why it ended (first reason
/// wins).
pub(crate) type EndSignal = Arc<watch::Sender<Option<EndReason>>>;

/// Live sessions by id, so that a grant event finds the sessions it ends.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    live: HashMap<String, EndSignal>,
    /// Ends announced for sessions not registered (yet), oldest first.
    unmatched: VecDeque<String>,
    unmatched_reasons: HashMap<String, EndReason>,
}

impl Registry {
    /// Registers a session; if authz already announced its end, the signal starts set.
    pub(crate) fn register(&self, id: &str) -> EndSignal {
        let signal: EndSignal = Arc::new(watch::Sender::new(None));
        if let Ok(mut r) = self.inner.lock() {
            if let Some(reason) = r.unmatched_reasons.remove(id) {
                signal.send_replace(Some(reason));
            }
            r.live.insert(id.to_owned(), signal.clone());
        }
        signal
    }

    pub(crate) fn deregister(&self, id: &str) {
        if let Ok(mut r) = self.inner.lock() {
            r.live.remove(id);
        }
    }

    fn len(&self) -> usize {
        self.inner.lock().map(|r| r.live.len()).unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<(String, EndSignal)> {
        self.inner
            .lock()
            .map(|r| r.live.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Ends the session `id` with `reason`, or remembers the reason for a while if the
    /// session is not registered.
    fn end(&self, id: &str, reason: EndReason) {
        let Ok(mut r) = self.inner.lock() else {
            return;
        };
        if let Some(signal) = r.live.get(id) {
            crate::session::signal(signal, reason);
            return;
        }
        if r.unmatched_reasons.insert(id.to_owned(), reason).is_none() {
            r.unmatched.push_back(id.to_owned());
        }
        while r.unmatched.len() > UNMATCHED_EVENTS {
            if let Some(old) = r.unmatched.pop_front() {
                r.unmatched_reasons.remove(&old);
            }
        }
    }
}

/// What a grant event means for the sessions it names.
fn end_reason(event: &GrantEvent) -> Option<EndReason> {
    let strip = |prefix: &str| {
        event
            .reason
            .strip_prefix(prefix)
            .unwrap_or(&event.reason)
            .to_owned()
    };
    match GrantEventKind::try_from(event.kind) {
        Ok(GrantEventKind::Expired) => Some(EndReason::GrantExpired),
        Ok(GrantEventKind::Revoked) => Some(EndReason::GrantRevoked(strip("grant revoked: "))),
        Ok(GrantEventKind::TokenRevoked) => Some(EndReason::TokenRevoked(strip("token revoked: "))),
        Ok(GrantEventKind::Created | GrantEventKind::PolicyChanged) => None,
        // An event kind this proxy does not know that names sessions: authz says they end.
        _ => Some(EndReason::EndedByAuthz(if event.reason.is_empty() {
            format!("authz ended the session (event kind {})", event.kind)
        } else {
            event.reason.clone()
        })),
    }
}

/// The process's one subscription to authz's grant events. Reconnects with backoff; on every
/// (re)subscription it asks authz about each live session, so a revocation sent while the
/// stream was down still ends its sessions.
async fn watch_grants(
    authz: AuthzClient,
    proxy: String,
    registry: Arc<Registry>,
    state: watch::Sender<GrantStreamState>,
    mut stop: watch::Receiver<()>,
    max_backoff: Duration,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = tokio::select! {
            _ = stop.changed() => return,
            attempt = authz.watch_grants(&proxy) => attempt,
        };
        let lost = match attempt {
            Ok(mut stream) => {
                state.send_replace(GrantStreamState::Connected);
                tracing::info!(proxy = %proxy, "subscribed to authz grant events");
                backoff = FIRST_BACKOFF;
                tokio::spawn(recheck(authz.clone(), registry.clone()));
                loop {
                    let message = tokio::select! {
                        _ = stop.changed() => return,
                        message = stream.message() => message,
                    };
                    match message {
                        Ok(Some(event)) => dispatch(&registry, &event),
                        Ok(None) => break "authz ended the grant event stream".to_owned(),
                        Err(status) if status.code() == tonic::Code::DataLoss => {
                            // Fell behind: re-subscribe at once; the recheck finds what was
                            // missed.
                            tracing::warn!(proxy = %proxy, "grant event stream fell behind; re-subscribing");
                            backoff = Duration::ZERO;
                            break status.message().to_owned();
                        }
                        Err(status) => break format!("{:?}: {}", status.code(), status.message()),
                    }
                }
            }
            Err(refused) => refused.to_string(),
        };
        tracing::warn!(proxy = %proxy, error = %lost, retry_in = ?backoff, "authz grant event stream lost; live sessions still end at their expiry");
        state.send_replace(GrantStreamState::Disconnected(lost));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).clamp(FIRST_BACKOFF, max_backoff.max(FIRST_BACKOFF));
    }
}

fn dispatch(registry: &Registry, event: &GrantEvent) {
    if event.session_ids.is_empty() {
        if event.kind == GrantEventKind::PolicyChanged as i32 {
            tracing::debug!(reason = %event.reason, "policy changed; live sessions keep theirs");
        }
        return;
    }
    let Some(reason) = end_reason(event) else {
        return;
    };
    for id in &event.session_ids {
        registry.end(id, reason.clone());
    }
}

/// Asks authz about every live session; those it no longer knows have ended while this
/// proxy was not listening (or authz restarted and could no longer revoke them): fail closed.
async fn recheck(authz: AuthzClient, registry: Arc<Registry>) {
    let live = registry.snapshot();
    if live.is_empty() {
        return;
    }
    let ended = futures::stream::iter(live)
        .map(|(id, signal)| {
            let authz = authz.clone();
            async move {
                match authz.authorize(&id, Operation::default()).await {
                    Err(Refused::Denied(m)) => {
                        crate::session::signal(
                            &signal,
                            EndReason::EndedByAuthz(format!(
                                "authz no longer knows this session ({m})"
                            )),
                        );
                        1
                    }
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "could not re-check a live session with authz");
                        0
                    }
                    Ok(_) => 0,
                }
            }
        })
        .buffer_unordered(8)
        .fold(0u32, |n, e| async move { n + e })
        .await;
    if ended > 0 {
        tracing::warn!(
            ended,
            "sessions ended by authz while the grant stream was down"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_registered_and_late_registered_sessions() {
        let r = Registry::default();
        let live = r.register("a");
        dispatch(
            &r,
            &GrantEvent {
                kind: GrantEventKind::Revoked as i32,
                session_ids: vec!["a".into(), "b".into()],
                reason: "grant revoked: incident 7".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            *live.borrow(),
            Some(EndReason::GrantRevoked("incident 7".into()))
        );
        // "b" opened a moment after the event: it starts ended.
        let late = r.register("b");
        assert_eq!(
            *late.borrow(),
            Some(EndReason::GrantRevoked("incident 7".into()))
        );
        // the first reason wins
        dispatch(
            &r,
            &GrantEvent {
                kind: GrantEventKind::Expired as i32,
                session_ids: vec!["a".into()],
                ..Default::default()
            },
        );
        assert_eq!(
            *live.borrow(),
            Some(EndReason::GrantRevoked("incident 7".into()))
        );
        // policy changes end nothing
        let c = r.register("c");
        dispatch(
            &r,
            &GrantEvent {
                kind: GrantEventKind::PolicyChanged as i32,
                session_ids: vec!["c".into()],
                ..Default::default()
            },
        );
        assert_eq!(*c.borrow(), None);
    }

    #[test]
    fn unmatched_events_are_bounded() {
        let r = Registry::default();
        for i in 0..(UNMATCHED_EVENTS + 10) {
            r.end(&i.to_string(), EndReason::GrantExpired);
        }
        let inner = r.inner.lock().expect("lock");
        assert_eq!(inner.unmatched.len(), UNMATCHED_EVENTS);
        assert_eq!(inner.unmatched_reasons.len(), UNMATCHED_EVENTS);
        assert!(!inner.unmatched_reasons.contains_key("0"));
    }
}
