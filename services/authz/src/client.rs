//! The proxies' side of authz. Every failure to get an answer — authz down, slow, or
//! answering with an error — is a refusal: nothing is allowed by default (fail closed).

use std::sync::Arc;
use std::time::Duration;

use agentgate_identity::{FixedToken, TokenSource};

use agentgate_proto::authz::v1::authz_client::AuthzClient as Grpc;
use agentgate_proto::authz::v1::{
    AuthorizeRequest, AuthorizeResponse, ClientInfo, CloseSessionRequest, Credential, GrantEvent,
    OpenSessionRequest, OpenSessionResponse, WatchGrantsRequest,
};
use agentgate_proto::common::v1::{Operation, Protocol};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Why a proxy must refuse, in words fit to show the agent in its own protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// authz could not be asked: fail closed.
    #[error("access refused: authz is unreachable ({0}); nothing is allowed until it is back")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<tonic::Status> for Refused {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code as C;
        let message = s.message().to_owned();
        match s.code() {
            C::Unauthenticated => Refused::Unauthenticated(message),
            C::PermissionDenied | C::NotFound => Refused::Denied(message),
            C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => Refused::Invalid(message),
            C::Unavailable | C::DeadlineExceeded | C::Cancelled | C::Unknown | C::Internal => {
                Refused::Unavailable(message)
            }
            _ => Refused::Unavailable(format!("{:?}: {message}", s.code())),
        }
    }
}

/// A connection to authz for one proxy, authenticated with the proxy's service token.
#[derive(Clone)]
pub struct AuthzClient {
    grpc: Grpc<Channel>,
    token: Arc<dyn TokenSource>,
    url: String,
}

impl AuthzClient {
    /// Prepares the connection with a fixed service token (tests, short-lived jobs); it is
    /// made on first use, so a proxy can start before authz.
    pub fn new(
        url: &str,
        service_token: &str,
        tls: Option<ClientTlsConfig>,
    ) -> Result<AuthzClient, Refused> {
        AuthzClient::with_token_source(url, Arc::new(FixedToken::new(service_token)), tls)
    }

    /// Like [`AuthzClient::new`], asking `token` on every call: a renewed token file or an
    /// in-process issuer is picked up without a restart.
    pub fn with_token_source(
        url: &str,
        token: Arc<dyn TokenSource>,
        tls: Option<ClientTlsConfig>,
    ) -> Result<AuthzClient, Refused> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Refused::Invalid(format!("authz URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10));
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Refused::Invalid(format!("authz TLS: {e}")))?;
        }
        Ok(AuthzClient {
            grpc: Grpc::new(endpoint.connect_lazy()),
            token,
            url: url.to_owned(),
        })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Refused> {
        let mut r = tonic::Request::new(message);
        // Without its own credential the proxy cannot ask, so it refuses (fail closed); the
        // reason (a file path, perhaps) goes to the log, not to the agent.
        let token = self.token.token().map_err(|e| {
            tracing::error!(error = %e, "no service token to present to authz");
            Refused::Unavailable("this proxy has no valid service token".into())
        })?;
        let value = agentgate_identity::bearer_header(&token).map_err(|_| {
            Refused::Invalid("the service token is not a valid header value".into())
        })?;
        r.metadata_mut().insert("authorization", value);
        Ok(agentgate_telemetry::inject_context(r))
    }

    fn unreachable(&self, status: tonic::Status) -> Refused {
        match Refused::from(status) {
            Refused::Unavailable(m) => Refused::Unavailable(format!("{}: {m}", self.url)),
            other => other,
        }
    }

    /// Opens a session for an agent's credential; any failure is a refusal.
    pub async fn open_session(
        &self,
        credential: Credential,
        connection: &str,
        role: &str,
        protocol: Protocol,
        source_address: &str,
        client: ClientInfo,
    ) -> Result<OpenSessionResponse, Refused> {
        let request = self.request(OpenSessionRequest {
            credential: Some(credential),
            connection: connection.to_owned(),
            role: role.to_owned(),
            source_address: source_address.to_owned(),
            client: Some(client),
            protocol: protocol as i32,
        })?;
        let mut grpc = self.grpc.clone();
        Ok(grpc
            .open_session(request)
            .await
            .map_err(|s| self.unreachable(s))?
            .into_inner())
    }

    /// The central decision for one operation.
    pub async fn authorize(
        &self,
        session_id: &str,
        operation: Operation,
    ) -> Result<AuthorizeResponse, Refused> {
        let request = self.request(AuthorizeRequest {
            session_id: session_id.to_owned(),
            operation: Some(operation),
        })?;
        let mut grpc = self.grpc.clone();
        Ok(grpc
            .authorize(request)
            .await
            .map_err(|s| self.unreachable(s))?
            .into_inner())
    }

    pub async fn close_session(&self, session_id: &str, reason: &str) -> Result<(), Refused> {
        let request = self.request(CloseSessionRequest {
            session_id: session_id.to_owned(),
            reason: reason.to_owned(),
        })?;
        let mut grpc = self.grpc.clone();
        grpc.close_session(request)
            .await
            .map_err(|s| self.unreachable(s))?;
        Ok(())
    }

    /// Grant and token events; a proxy ends the sessions each event names.
    pub async fn watch_grants(&self, proxy: &str) -> Result<tonic::Streaming<GrantEvent>, Refused> {
        let request = self.request(WatchGrantsRequest {
            proxy: proxy.to_owned(),
        })?;
        let mut grpc = self.grpc.clone();
        Ok(grpc
            .watch_grants(request)
            .await
            .map_err(|s| self.unreachable(s))?
            .into_inner())
    }
}
