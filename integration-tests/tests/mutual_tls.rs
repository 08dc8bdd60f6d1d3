//! The audit store behind mutual TLS with certificates from `agentgate dev certs`: a client
//! with a certificate of the development CA is served; one without is refused.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use agentgate_integration_tests::free_port;
use agentgate_proto::audit::v1::VerifyRequest;
use agentgate_proto::audit::v1::audit_store_client::AuditStoreClient;
use tonic::transport::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_store_requires_a_client_certificate() {
    agentgate_tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs =
        agentgate_tls::generate_dev_certs(&dir.path().join("certs"), &["audit-store", "pg-proxy"])
            .unwrap();
    let config = agentgate_audit_store::AuditStoreConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
        tls: certs.tls_config("audit-store").unwrap(),
        ..Default::default()
    };
    let auth = std::sync::Arc::new(agentgate_integration_tests::test_token_issuer().verifier());
    let running = agentgate_audit_store::start(&config, dir.path(), auth, None)
        .await
        .unwrap();
    let token = agentgate_integration_tests::audit_superuser_token().unwrap();
    let url = format!("https://localhost:{}", running.addr.port());

    let client_tls = certs.tls_config("pg-proxy").unwrap();
    let tls = agentgate_tls::grpc_client_tls(&client_tls, "audit-store")
        .unwrap()
        .unwrap();
    let channel = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let v = AuditStoreClient::new(channel)
        .verify(agentgate_integration_tests::bearer(
            &token,
            VerifyRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok);

    // Trusting the CA but presenting no certificate: the handshake or the first call fails.
    let anonymous = agentgate_tls::TlsConfig {
        ca: client_tls.ca.clone(),
        ..Default::default()
    };
    let tls = agentgate_tls::grpc_client_tls(&anonymous, "audit-store")
        .unwrap()
        .unwrap();
    let refused = async {
        let channel = Endpoint::from_shared(url.clone())?
            .tls_config(tls)?
            .connect()
            .await?;
        AuditStoreClient::new(channel)
            .verify(agentgate_integration_tests::bearer(
                &token,
                VerifyRequest {},
            ))
            .await
            .map_err(anyhow::Error::from)?;
        anyhow::Ok(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .unwrap();
    assert!(
        outcome.is_err(),
        "a client without a certificate must be refused"
    );

    // Plain text is refused too.
    let plain = format!("http://127.0.0.1:{}", running.addr.port());
    let outcome = async {
        let mut c = AuditStoreClient::connect(plain).await?;
        c.verify(agentgate_integration_tests::bearer(
            &token,
            VerifyRequest {},
        ))
        .await?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), outcome)
            .await
            .unwrap()
            .is_err()
    );
    running.shutdown().await.unwrap();
}
