//! Prometheus metrics: a registry per service and a tiny HTTP endpoint that serves it.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::TelemetryError;

/// The `Content-Type` of `GET /metrics`: the OpenMetrics text format prometheus-client encodes
/// (Prometheus scrapes it natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client may take to send its request headers before the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight scrapes may take to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The metrics of one service: a `prometheus_client` registry behind a shared lock, cheap to
/// clone into every component that registers metrics.
///
/// Every metric is named `agentgate_<name>` and carries the label `service="<service>"`, so
/// several services in one process (`agentgate up`) or behind one Prometheus stay apart.
///
/// The lock is held only while registering (at start-up) and while encoding a scrape; updating
/// a metric (`counter.inc()`) never takes it, since prometheus-client metrics are atomics
/// shared by clone.
///
/// ```
/// use prometheus_client::metrics::counter::Counter;
///
/// let metrics = agentgate_telemetry::Metrics::new("authz");
/// let sessions = Counter::<u64>::default();
/// metrics.register("sessions_opened", "Sessions opened", sessions.clone());
/// sessions.inc();
/// assert!(metrics.encode()?.contains("agentgate_sessions_opened_total{service=\"authz\"} 1"));
/// # Ok::<(), agentgate_telemetry::TelemetryError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Metrics {
    service: Arc<str>,
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// A registry for `service`, with the `agentgate` prefix and the `service` label.
    pub fn new(service: &str) -> Self {
        let labels = [(Cow::Borrowed("service"), Cow::Owned(service.to_owned()))];
        Self {
            service: service.into(),
            registry: Arc::new(Mutex::new(Registry::with_prefix_and_labels(
                "agentgate",
                labels.into_iter(),
            ))),
        }
    }

    /// The service name given to [`Metrics::new`].
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Locked access to the registry, for everything [`Metrics::register`] does not cover
    /// (sub-registries, units, collectors). Don't hold it across an `.await`.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while registering leaves the registry usable; keep serving it.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `metric` as `agentgate_<name>` with `help`. Keep a clone of the metric to
    /// update it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// The current metrics in the OpenMetrics text format (what `GET /metrics` returns).
    pub fn encode(&self) -> Result<String, TelemetryError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry())
            .map_err(TelemetryError::Encode)?;
        Ok(out)
    }
}

/// A running metrics endpoint, as returned by [`serve_metrics`].
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped (after the shutdown future completed and in-flight
    /// scrapes finished or timed out).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Stops the server now without waiting for in-flight scrapes.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Serves `metrics` on `GET /metrics` (and `HEAD`) at `addr` over HTTP/1.1, answering 404
/// elsewhere and 405 for other methods on `/metrics`.
///
/// It binds before returning, so a taken port is reported here and port 0 works (read the
/// address from [`MetricsServer::local_addr`]); the server then runs in a spawned task until
/// `shutdown` completes, after which it stops accepting and gives in-flight scrapes a few
/// seconds. Must be called inside a Tokio runtime.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<MetricsServer, TelemetryError> {
    let bind_error = |error| TelemetryError::Bind { addr, error };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let task = tokio::spawn(run(listener, metrics, shutdown));
    Ok(MetricsServer { local_addr, task })
}

async fn run(listener: TcpListener, metrics: Metrics, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&metrics, &req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "metrics endpoint: connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics endpoint: in-flight scrapes cut short at shutdown");
    }
}

fn respond<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    match metrics.encode() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            response
        }
        Err(error) => {
            tracing::warn!(%error, "metrics endpoint: encoding failed");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 request over a raw TCP connection; returns the whole response as text.
    async fn raw_request(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_registered_counters() {
        let metrics = Metrics::new("test");
        let requests = Counter::<u64>::default();
        metrics.register("requests", "Requests handled", requests.clone());
        requests.inc();
        requests.inc();

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve_metrics("127.0.0.1:0".parse().unwrap(), metrics, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let response = raw_request(addr, "GET", "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains(&format!("content-type: {METRICS_CONTENT_TYPE}\r\n")),
            "{response}"
        );
        assert!(
            response.contains("# TYPE agentgate_requests counter\n"),
            "{response}"
        );
        assert!(
            response.contains("\nagentgate_requests_total{service=\"test\"} 2\n"),
            "{response}"
        );
        assert!(response.ends_with("# EOF\n"), "{response}");

        let response = raw_request(addr, "GET", "/").await;
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let response = raw_request(addr, "POST", "/metrics").await;
        assert!(
            response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{response}"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server.wait())
            .await
            .expect("the server stops after shutdown");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn a_taken_port_is_reported() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve_metrics(addr, Metrics::new("test"), std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("metrics endpoint: listening on {addr}: ")),
            "{err}"
        );
    }

    #[test]
    fn services_stay_apart() {
        let a = Metrics::new("authz");
        let counter = Counter::<u64>::default();
        a.register("grants", "Grants issued", counter.clone());
        counter.inc();
        let text = a.encode().unwrap();
        assert!(
            text.contains("agentgate_grants_total{service=\"authz\"} 1"),
            "{text}"
        );
        assert_eq!(a.service(), "authz");
        assert!(
            !Metrics::new("approvals")
                .encode()
                .unwrap()
                .contains("grants")
        );
    }
}
