//! `agentgate`: runs the gateway on one machine and drives everything a person does with it.
//!
//! The binary only parses arguments and wires things; the services and libraries do the
//! work. Every failure ends in one line on stderr saying what and where, and exit status 1.

mod approvals;
mod audit;
mod authz;
mod client;
mod dev;
mod sessions;
mod ssh;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// agentgate: an access gateway for AI agents, with SOC 2 evidence built in.
#[derive(Parser)]
#[command(name = "agentgate", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every agentgate service in this process, each on its own port.
    Up(up::UpArgs),
    /// Query, verify and export the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Review approval requests: list, show, approve, deny, watch.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Agentgate tokens: issue and revoke (admin).
    #[command(subcommand)]
    Token(authz::TokenCommand),
    /// Just-in-time access: ask for a role on a connection for a while.
    #[command(subcommand)]
    Access(authz::AccessCommand),
    /// Grants: list and revoke.
    #[command(subcommand)]
    Grants(authz::GrantsCommand),
    /// The connection catalog.
    Connections(authz::AuthzArgs),
    /// SSH: a short-lived certificate for ssh-proxy.
    #[command(subcommand)]
    Ssh(ssh::SshCommand),
    /// Session recordings: replay in the terminal, export as asciicast.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// Development helpers.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Subcommand)]
enum DevCommand {
    /// Create a development CA and a certificate per service (mutual TLS between services).
    Certs {
        /// Where to write ca.pem, ca-key.pem and SERVICE.pem / SERVICE-key.pem.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Services to issue certificates for.
        #[arg(default_values_t = dev::DEFAULT_SERVICES.map(String::from))]
        services: Vec<String>,
    },
}

fn main() {
    agentgate_tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Approvals(cmd) => approvals::run(cmd).await,
            Command::Token(cmd) => authz::token(cmd).await,
            Command::Access(cmd) => authz::access(cmd).await,
            Command::Grants(cmd) => authz::grants(cmd).await,
            Command::Connections(args) => authz::connections(args).await,
            Command::Ssh(cmd) => ssh::run(cmd).await,
            Command::Sessions(cmd) => sessions::run(cmd).await,
            Command::Dev(DevCommand::Certs { dir, services }) => dev::certs(&dir, &services),
        }
    });
    if let Err(e) = result {
        fail(e);
    }
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("agentgate: {e:#}");
    std::process::exit(1);
}
