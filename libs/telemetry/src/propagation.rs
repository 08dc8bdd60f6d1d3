//! W3C trace context across gRPC (tonic metadata) and HTTP (headers).
//!
//! The format is whatever the global text-map propagator speaks; [`crate::init`] sets it to W3C
//! TraceContext (`traceparent`, `tracestate`). Without it (no `init`) the global propagator is
//! a no-op: nothing is injected and extraction yields an empty context, which is harmless.

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Writes propagation fields into tonic metadata; invalid keys or values are skipped (the
/// TraceContext propagator only produces ASCII).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            value.parse::<MetadataValue<_>>(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes propagation fields into HTTP headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads propagation fields from HTTP headers (gRPC metadata are HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Injects the current `tracing` span's OpenTelemetry context into gRPC request metadata.
///
/// The lower-level form of [`inject_context`], for code that holds a `MetadataMap` (a
/// streaming call built by hand, say).
pub fn inject_metadata(metadata: &mut MetadataMap) {
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut MetadataInjector(metadata));
    });
}

/// Returns `req` with the current span's trace context in its metadata (`traceparent`), so the
/// server's [`server_span`] continues the same trace.
///
/// Call it where the request is built, inside the span that makes the call:
///
/// ```no_run
/// # fn example() {
/// let request = agentgate_telemetry::inject_context(tonic::Request::new(()));
/// # let _ = request; }
/// ```
pub fn inject_context<T>(mut req: tonic::Request<T>) -> tonic::Request<T> {
    inject_metadata(req.metadata_mut());
    req
}

/// Injects the current span's trace context into HTTP headers (for HTTP calls between
/// services, or a proxy that forwards the trace to its upstream).
pub fn inject_http_headers(headers: &mut http::HeaderMap) {
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// The OpenTelemetry context carried by `headers` (empty when there is none or it is invalid).
///
/// Attach it with `span.set_parent(cx)` (from `tracing_opentelemetry::OpenTelemetrySpanExt`)
/// before the span is first entered.
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// The span of one incoming gRPC request, child of the caller's trace when the request carries
/// a `traceparent`.
///
/// Made for `tonic::transport::Server::builder().trace_fn(server_span)`: tonic enters it around
/// the handling of each request, so every span and event of the handler belongs to the
/// caller's trace. The span is `grpc.request` at INFO with the request path (`path`), the
/// OpenTelemetry RPC attributes (`rpc.system`, `rpc.service`, `rpc.method`) and, as its
/// exported name, `package.Service/Method`.
pub fn server_span<B>(req: &http::Request<B>) -> Span {
    let path = req.uri().path();
    let full_method = path.trim_start_matches('/');
    let (service, method) = full_method.split_once('/').unwrap_or((full_method, ""));
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %full_method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        path = %path,
    );
    // Fails only when there is no OpenTelemetry layer or the span is disabled by the filter;
    // either way there is nothing to attach to.
    let _ = span.set_parent(extract_context(req.headers()));
    span
}

/// A tonic client interceptor that adds the current span's trace context to every request:
/// `FooClient::with_interceptor(channel, TraceContextInterceptor)`.
///
/// tonic calls interceptors synchronously in the task that makes the call, so "current span"
/// is the caller's span (instrument the calling code, e.g. with `#[tracing::instrument]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_metadata(req.metadata_mut());
        Ok(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tonic::service::Interceptor as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A subscriber with an OpenTelemetry layer, scoped to the test's thread (the global one
    /// belongs to whoever calls `init` first).
    fn with_otel<R>(f: impl FnOnce() -> R) -> R {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn to_http(req: tonic::Request<()>) -> http::Request<()> {
        let mut http_req = http::Request::builder()
            .method("POST")
            .uri("http://authz/agentgate.authz.v1.Authz/OpenSession")
            .body(())
            .unwrap();
        *http_req.headers_mut() = req.metadata().clone().into_headers();
        http_req
    }

    #[test]
    fn trace_id_survives_a_grpc_hop() {
        with_otel(|| {
            let client = tracing::info_span!("client.call");
            let _entered = client.enter();
            let client_cx = client.context();
            let client_span = client_cx.span().span_context().clone();
            assert!(client_span.is_valid());

            let req = inject_context(tonic::Request::new(()));
            let traceparent = req
                .metadata()
                .get("traceparent")
                .expect("traceparent injected")
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                traceparent.contains(&client_span.trace_id().to_string()),
                "{traceparent}"
            );

            let server = server_span(&to_http(req));
            let server_cx = server.context();
            let server_span = server_cx.span().span_context().clone();
            assert_eq!(server_span.trace_id(), client_span.trace_id());
            assert_ne!(server_span.span_id(), client_span.span_id());
        });
    }

    #[test]
    fn the_interceptor_injects_too() {
        with_otel(|| {
            let span = tracing::info_span!("client.call");
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id();
            let req = TraceContextInterceptor
                .call(tonic::Request::new(()))
                .expect("the interceptor never refuses");
            let server = server_span(&to_http(req));
            assert_eq!(server.context().span().span_context().trace_id(), trace_id);
        });
    }

    #[test]
    fn without_traceparent_the_server_starts_a_new_trace() {
        with_otel(|| {
            let server = server_span(&to_http(tonic::Request::new(())));
            assert!(server.context().span().span_context().is_valid());
        });
    }

    #[test]
    fn http_headers_round_trip() {
        with_otel(|| {
            let span = tracing::info_span!("proxy.forward");
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id();
            let mut headers = http::HeaderMap::new();
            inject_http_headers(&mut headers);
            let cx = extract_context(&headers);
            assert_eq!(cx.span().span_context().trace_id(), trace_id);
        });
    }

    #[test]
    fn server_span_fits_tonic_trace_fn() {
        // Compiles only if the signature is what `trace_fn` wants.
        let _server = tonic::transport::Server::builder().trace_fn(server_span);
    }
}
