//! `plexus connect`: a netcat-like client. Standard input goes to the peer, the peer's bytes
//! go to standard output; when standard input ends the write side is shut down and the
//! command exits once the peer has closed (every reply has arrived).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use clap::Args;

use crate::EXIT_USAGE;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Peer as SCHEME://HOST:PORT; scheme tcp (tls, udp and dtls arrive with their transports).
    url: String,
}

pub(crate) fn run(args: ConnectArgs) -> ExitCode {
    let target = match args.url.split_once("://") {
        Some(("tcp", target)) => target,
        Some((scheme @ ("tls" | "udp" | "dtls"), _)) => {
            eprintln!(
                "error: {scheme}:// is not available in this version of plexus yet (use tcp://)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        _ => {
            eprintln!(
                "error: '{}' is not a peer address; expected tcp://HOST:PORT",
                args.url
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match connect_tcp(target) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {target}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn connect_tcp(target: &str) -> io::Result<()> {
    let addrs: Vec<_> = target.to_socket_addrs()?.collect();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return relay(stream),
            Err(err) => last_error = err,
        }
    }
    Err(last_error)
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
