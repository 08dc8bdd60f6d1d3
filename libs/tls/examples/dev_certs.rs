//! Writes a development CA and service certificates, like `agentgate dev certs` will:
//!
//! ```text
//! cargo run -p agentgate-tls --example dev_certs -- ./certs authz approvals audit-store
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: dev_certs DIR [SERVICE...]");
        return ExitCode::from(2);
    };
    let services: Vec<String> = args.collect();
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    match agentgate_tls::generate_dev_certs(&dir, &names) {
        Ok(certs) => {
            let verb = if certs.ca_created { "created" } else { "kept" };
            println!("CA ({verb}): {}", certs.ca_cert.display());
            for service in &certs.services {
                println!(
                    "{}: {} {}",
                    service.name,
                    service.cert.display(),
                    service.key.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
