//! The tonic configurations from `grpc_server_tls` / `grpc_client_tls` over a real tonic
//! server and channel on loopback (HTTP/2 over mutual TLS). No protobuf service is needed: the
//! server is a bare tower service that reports whether it saw a client certificate.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;

use agentgate_tls::{
    DevCerts, TlsConfig, generate_dev_certs, grpc_client_tls, grpc_server_tls,
    install_crypto_provider,
};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming, TlsConnectInfo};
use tonic::transport::{Endpoint, Server};
use tower::ServiceExt;

/// Starts a tonic server with `cfg`'s TLS; every request answers 200 with `x-client-cert:
/// yes|no`. Dropping the returned sender stops it.
async fn start_server(cfg: &TlsConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    install_crypto_provider();
    let tls = grpc_server_tls(cfg).unwrap().expect("TLS is configured");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc = tower::service_fn(|req: http::Request<Body>| async move {
        let cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .is_some();
        let response = http::Response::builder()
            .header("x-client-cert", if cert { "yes" } else { "no" })
            .header("grpc-status", "0")
            .body(Body::empty())
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let server = Server::builder().tls_config(tls).unwrap();
    tokio::spawn(server.serve_with_incoming_shutdown(
        svc,
        TcpIncoming::from(listener),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// One request over a fresh channel; `Ok(x-client-cert)` or the error as text.
async fn call(addr: SocketAddr, cfg: &TlsConfig, server_name: &str) -> Result<String, String> {
    let tls = grpc_client_tls(cfg, server_name)
        .unwrap()
        .expect("TLS is configured");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("tls_config: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://{addr}/test.Echo/Call"))
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let response = channel
        .oneshot(request)
        .await
        .map_err(|e| format!("call: {e:?}"))?;
    Ok(response
        .headers()
        .get("x-client-cert")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned())
}

fn certs(dir: &std::path::Path) -> DevCerts {
    generate_dev_certs(dir, &["authz", "pg-proxy"]).unwrap()
}

#[tokio::test]
async fn grpc_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (addr, _stop) = start_server(&certs.tls_config("authz").unwrap()).await;
    let seen = call(addr, &certs.tls_config("pg-proxy").unwrap(), "authz")
        .await
        .expect("mutual TLS call");
    assert_eq!(seen, "yes");
}

#[tokio::test]
async fn grpc_client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (addr, _stop) = start_server(&certs.tls_config("authz").unwrap()).await;
    let anonymous = TlsConfig {
        ca: Some(certs.ca_cert.clone()),
        ..Default::default()
    };
    let result = call(addr, &anonymous, "authz").await;
    assert!(result.is_err(), "served without a client cert: {result:?}");
}

#[tokio::test]
async fn grpc_server_name_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (addr, _stop) = start_server(&certs.tls_config("authz").unwrap()).await;
    let result = call(addr, &certs.tls_config("pg-proxy").unwrap(), "approvals").await;
    let err = result.expect_err("a certificate for authz accepted as approvals");
    assert!(err.contains("NotValidForName"), "{err}");
}

#[test]
fn empty_config_means_plaintext() {
    assert!(grpc_server_tls(&TlsConfig::default()).unwrap().is_none());
    assert!(
        grpc_client_tls(&TlsConfig::default(), "authz")
            .unwrap()
            .is_none()
    );
}

#[test]
fn grpc_configs_validate_files_up_front() {
    let cfg = TlsConfig {
        cert: Some("/nonexistent/authz.pem".into()),
        key: Some("/nonexistent/authz-key.pem".into()),
        ca: Some("/nonexistent/ca.pem".into()),
    };
    let err = grpc_server_tls(&cfg).unwrap_err().to_string();
    assert!(err.starts_with("reading /nonexistent/authz.pem: "), "{err}");
    let err = grpc_client_tls(&cfg, "authz").unwrap_err().to_string();
    assert!(err.starts_with("reading /nonexistent/ca.pem: "), "{err}");

    let ca_only = TlsConfig {
        ca: Some("/nonexistent/ca.pem".into()),
        ..Default::default()
    };
    let err = grpc_server_tls(&ca_only).unwrap_err().to_string();
    assert!(
        err.contains("`ca` is set but `cert` and `key` are not"),
        "{err}"
    );
    let err = grpc_client_tls(&ca_only, "not a name!")
        .unwrap_err()
        .to_string();
    assert!(err.contains("server name \"not a name!\""), "{err}");
}
