//! `plexus connect`: a netcat-like client. Standard input goes to the peer, the peer's bytes
//! go to standard output; when standard input ends the write side is shut down and the
//! command exits once the peer has closed (every reply has arrived).
//!
//! This module parses the peer URL and dispatches on its scheme: `tcp://` is relayed here,
//! `tls://` by [`crate::tls_client`], `udp://` and `dtls://` by [`crate::dgram_client`] (one
//! datagram per line).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use clap::Args;

use crate::dgram_client::{self, DtlsOptions};
use crate::tls_client::{self, TlsOptions};
use crate::EXIT_USAGE;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Peer as SCHEME://HOST:PORT; scheme tcp, tls, udp or dtls (udp/dtls: one datagram per
    /// input line).
    url: String,
    /// tls/dtls: accept any server certificate (no chain or name check; handshake signatures are
    /// still verified). For testing only.
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// tls/dtls: trust only the certificates in this PEM file (instead of the system roots).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// tls/dtls: server name to send (SNI) and to verify the certificate against; default HOST.
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// dtls: authenticate with a pre-shared key under this identity (PSK cipher suites only;
    /// needs --psk-key-file).
    #[arg(long, value_name = "ID", requires = "psk_key_file")]
    psk_identity: Option<String>,
    /// dtls: file holding the pre-shared key as hex (with --psk-identity).
    #[arg(long, value_name = "FILE", requires = "psk_identity")]
    psk_key_file: Option<PathBuf>,
    /// tls: offer this ALPN protocol (repeatable, in order of preference).
    #[arg(long = "alpn", value_name = "P")]
    alpn: Vec<String>,
}

pub(crate) fn run(args: ConnectArgs) -> ExitCode {
    let (scheme, target) = match args.url.split_once("://") {
        Some((scheme @ ("tcp" | "tls" | "udp" | "dtls"), target)) => (scheme, target),
        _ => {
            eprintln!(
                "error: '{}' is not a peer address; expected tcp://, tls://, udp:// or \
                 dtls://HOST:PORT",
                args.url
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if scheme == "dtls" {
        if !args.alpn.is_empty() {
            eprintln!("error: --alpn applies to tls:// only");
            return ExitCode::from(EXIT_USAGE);
        }
        let options = DtlsOptions {
            insecure: args.insecure,
            ca: args.ca,
            sni: args.sni,
            psk: args.psk_identity.zip(args.psk_key_file),
        };
        return dgram_client::run_dtls(target, options);
    }
    if scheme == "tls" {
        let options = TlsOptions {
            insecure: args.insecure,
            ca: args.ca,
            sni: args.sni,
            alpn: args.alpn,
        };
        return tls_client::run(target, options);
    }
    if args.psk_identity.is_some() {
        eprintln!("error: --psk-identity and --psk-key-file apply to dtls:// only");
        return ExitCode::from(EXIT_USAGE);
    }
    if args.insecure || args.ca.is_some() || args.sni.is_some() || !args.alpn.is_empty() {
        eprintln!("error: --insecure, --ca, --sni and --alpn apply to tls:// (and dtls://) only");
        return ExitCode::from(EXIT_USAGE);
    }
    if scheme == "udp" {
        return dgram_client::run_udp(target);
    }
    match connect_tcp(target) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {target}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves `target` (`HOST:PORT`) and connects to the first address that accepts, with a
/// connect timeout; the error is the last address's.
pub(crate) fn dial(target: &str) -> io::Result<TcpStream> {
    let addrs: Vec<_> = target.to_socket_addrs()?.collect();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(err) => last_error = err,
        }
    }
    Err(last_error)
}

fn connect_tcp(target: &str) -> io::Result<()> {
    relay(dial(target)?)
}

fn relay(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut to_peer = stream.try_clone()?;
    // Standard input to the peer; at its end, half-close so the peer knows we are done.
    thread::spawn(move || {
        let copied = io::copy(&mut io::stdin().lock(), &mut to_peer);
        let _ = to_peer.shutdown(Shutdown::Write);
        if let Err(err) = copied {
            eprintln!("error: sending to peer: {err}");
        }
    });
    let mut from_peer = stream;
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from_peer.read(&mut buf) {
            Ok(0) => return stdout.flush(),
            Ok(n) => {
                stdout.write_all(&buf[..n])?;
                stdout.flush()?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}
