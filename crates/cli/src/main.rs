//! `plexus`: the command. `serve` runs the server from a configuration file (or the embedded
//! default); `connect` is a small netcat-like client for plexus' transports; `bench` is the
//! load generator and adversarial client; `cert` writes a self-signed certificate for tls
//! listeners; `upgrade` replaces a running server's binary without refusing a connection.

mod bench;
mod cert;
mod connect;
mod dgram_client;
mod logging;
mod serve;
mod tls_client;
mod upgrade;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for usage and configuration errors (runtime failures exit 1).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "plexus",
    version,
    about = "Event-driven multi-protocol network server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the embedded default configuration without --config).
    Serve(serve::ServeArgs),
    /// Connect to a peer: standard input to it, its replies to standard output.
    Connect(connect::ConnectArgs),
    /// Load a server (echo, connect rate, http) or test its defences (floods); one JSON line
    /// on stdout.
    Bench(bench::BenchArgs),
    /// Write a self-signed certificate and key (DIR/cert.pem, DIR/key.pem).
    Cert(cert::CertArgs),
    /// Upgrade the running server's binary without refusing a connection (SIGUSR2 to the pid
    /// in FILE), and wait until the new process serves.
    Upgrade(upgrade::UpgradeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Connect(args) => connect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Cert(args) => cert::run(args),
        Command::Upgrade(args) => upgrade::run(args),
    }
}
