//! `agentgate dev certs`: a development CA and service certificates for mutual TLS.

use std::path::Path;

/// Every service agentgate has, plus the CLI as a client.
pub const DEFAULT_SERVICES: [&str; 2] = ["audit-store", "agentgate-cli"];

pub fn certs(dir: &Path, services: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let certs = agentgate_tls::generate_dev_certs(dir, &names)?;
    println!(
        "{} development CA: {}",
        if certs.ca_created {
            "created"
        } else {
            "reused"
        },
        certs.ca_cert.display()
    );
    for s in &certs.services {
        println!("  {:<14} {}  {}", s.name, s.cert.display(), s.key.display());
    }
    println!("For development only: the CA key can issue certificates every service trusts.");
    Ok(())
}
