//! Real TLS handshakes over loopback with the configurations this crate builds, using
//! certificates from its development CA.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use agentgate_tls::rustls::pki_types::ServerName;
use agentgate_tls::tokio_rustls::{TlsAcceptor, TlsConnector};
use agentgate_tls::{
    DevCerts, TlsConfig, generate_dev_certs, rustls_client_config, rustls_server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn certs(dir: &Path) -> DevCerts {
    generate_dev_certs(dir, &["audit-store", "agent"]).expect("generating dev certs")
}

/// Accepts one TLS connection, answers "ping" with "pong"; returns whether the handshake and
/// the exchange succeeded, and whether the client presented a certificate.
async fn serve_once(listener: TcpListener, acceptor: TlsAcceptor) -> Result<bool, String> {
    let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
    let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().is_some();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    Ok(presented)
}

async fn server(cfg: &TlsConfig) -> (SocketAddr, tokio::task::JoinHandle<Result<bool, String>>) {
    let acceptor = TlsAcceptor::from(rustls_server_config(cfg).expect("server config"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (addr, tokio::spawn(serve_once(listener, acceptor)))
}

/// Connects, sends "ping", expects "pong". In TLS 1.3 the client finishes its side of the
/// handshake before the server checks the client certificate, so a refusal can show up at the
/// first read rather than at `connect`.
async fn client(addr: SocketAddr, cfg: &TlsConfig, name: &str) -> Result<(), String> {
    let connector = TlsConnector::from(rustls_client_config(cfg).expect("client config"));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if &buf != b"pong" {
        return Err(format!("unexpected answer {buf:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate_works() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (addr, server) = server(&certs.tls_config("audit-store").unwrap()).await;
    let agent = certs.tls_config("agent").unwrap();
    client(addr, &agent, "audit-store")
        .await
        .expect("handshake with a client certificate");
    let presented = server.await.unwrap().expect("server side");
    assert!(presented, "the server saw the client certificate");
}

#[tokio::test]
async fn loopback_names_are_in_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    for name in ["localhost", "127.0.0.1"] {
        let (addr, server) = server(&certs.tls_config("audit-store").unwrap()).await;
        client(addr, &certs.tls_config("agent").unwrap(), name)
            .await
            .unwrap_or_else(|e| panic!("verifying as {name}: {e}"));
        server.await.unwrap().expect("server side");
    }
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (addr, server) = server(&certs.tls_config("audit-store").unwrap()).await;
    let anonymous = TlsConfig {
        ca: Some(certs.ca_cert.clone()),
        ..Default::default()
    };
    let client_result = client(addr, &anonymous, "audit-store").await;
    let server_result = server.await.unwrap();
    assert!(
        client_result.is_err(),
        "client got through: {client_result:?}"
    );
    let err = server_result.expect_err("server accepted a client without a certificate");
    assert!(err.contains("no certificates"), "{err}");
}

#[tokio::test]
async fn server_without_ca_does_not_ask_for_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let mut server_cfg = certs.tls_config("audit-store").unwrap();
    server_cfg.ca = None;
    let (addr, server) = server(&server_cfg).await;
    let anonymous = TlsConfig {
        ca: Some(certs.ca_cert.clone()),
        ..Default::default()
    };
    client(addr, &anonymous, "audit-store")
        .await
        .expect("plain server-authenticated TLS");
    assert!(!server.await.unwrap().expect("server side"));
}

#[tokio::test]
async fn client_trusting_another_ca_refuses_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let other_certs = certs_of_other_ca(other.path());
    let (addr, server) = server(&certs.tls_config("audit-store").unwrap()).await;
    // Its own certificate is from the other CA too: a consistent but foreign deployment.
    let foreign = other_certs.tls_config("agent").unwrap();
    let err = client(addr, &foreign, "audit-store")
        .await
        .expect_err("client trusted a server of another CA");
    assert!(err.starts_with("connect: "), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn client_certificate_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let other_certs = certs_of_other_ca(other.path());
    let (addr, server) = server(&certs.tls_config("audit-store").unwrap()).await;
    // Trusts the right CA but presents a certificate signed by another one.
    let mut impostor = other_certs.tls_config("agent").unwrap();
    impostor.ca = Some(certs.ca_cert.clone());
    let client_result = client(addr, &impostor, "audit-store").await;
    assert!(client_result.is_err(), "impostor got through");
    let err = server
        .await
        .unwrap()
        .expect_err("server accepted a foreign client certificate");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn certificates_issued_before_a_regeneration_stay_valid() {
    let dir = tempfile::tempdir().unwrap();
    let before = certs(dir.path());
    // Keep the old agent certificate aside, then regenerate everything.
    let old_cert = dir.path().join("old-agent.pem");
    let old_key = dir.path().join("old-agent-key.pem");
    std::fs::copy(&before.service("agent").unwrap().cert, &old_cert).unwrap();
    std::fs::copy(&before.service("agent").unwrap().key, &old_key).unwrap();
    let after = certs(dir.path());
    assert!(!after.ca_created);

    let (addr, server) = server(&after.tls_config("audit-store").unwrap()).await;
    let old_agent = TlsConfig {
        cert: Some(old_cert),
        key: Some(old_key),
        ca: Some(after.ca_cert.clone()),
    };
    client(addr, &old_agent, "audit-store")
        .await
        .expect("an old client certificate against a new server certificate");
    assert!(server.await.unwrap().expect("server side"));
}

fn certs_of_other_ca(dir: &Path) -> DevCerts {
    generate_dev_certs(dir, &["audit-store", "agent"]).expect("generating the other CA")
}

#[test]
fn server_config_errors_name_the_file() {
    let cfg = TlsConfig {
        cert: Some("/nonexistent/agentgate/server.pem".into()),
        key: Some("/nonexistent/agentgate/server-key.pem".into()),
        ca: None,
    };
    let err = rustls_server_config(&cfg).unwrap_err().to_string();
    assert!(
        err.starts_with("reading /nonexistent/agentgate/server.pem: No such file"),
        "{err}"
    );
}

#[test]
fn a_certificate_given_as_key_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let agent = certs.service("agent").unwrap();
    let cfg = TlsConfig {
        cert: Some(agent.cert.clone()),
        key: Some(agent.cert.clone()),
        ca: None,
    };
    let err = rustls_server_config(&cfg).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("no private key in {}", agent.cert.display())),
        "{err}"
    );
}

#[test]
fn mismatched_key_is_reported_with_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let cfg = TlsConfig {
        cert: Some(certs.service("agent").unwrap().cert.clone()),
        key: Some(certs.service("audit-store").unwrap().key.clone()),
        ca: None,
    };
    let err = rustls_server_config(&cfg).unwrap_err().to_string();
    assert!(err.starts_with("certificate "), "{err}");
    assert!(err.contains("agent.pem with key"), "{err}");
    assert!(err.contains("audit-store-key.pem"), "{err}");
}

#[test]
fn client_needs_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = certs(dir.path()).tls_config("agent").unwrap();
    cfg.ca = None;
    let err = rustls_client_config(&cfg).unwrap_err().to_string();
    assert!(err.contains("a TLS client needs `ca`"), "{err}");
    let _: Arc<_> = rustls_client_config(&TlsConfig {
        ca: Some(dir.path().join("ca.pem")),
        ..Default::default()
    })
    .expect("a CA alone is a valid client config");
}
