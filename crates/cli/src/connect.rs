//! `plexus connect`: a netcat-like client. Standard input goes to the peer, the peer's bytes
//! go to standard output; when standard input ends the write side is shut down and the
//! command exits once the peer has closed (every reply has arrived).
//!
//! This module parses the peer URL and dispatches on its scheme. `tcp://` and `tls://` run on
//! plexus' client runtime ([`plexus::ClientRuntime`], one event loop): the library's connector
//! (connect timeout, fallback across the resolved addresses, the TLS client of
//! [`plexus::tls_client`], whose options [`crate::tls_client`] maps), a thread feeding standard
//! input through the connection's [`Connection`] handle with backpressure, and the peer's bytes
//! written to standard output by the runtime's worker thread. `udp://` and `dtls://` stay on
//! [`crate::dgram_client`] (one datagram per line): the client runtime has no datagram sessions yet.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use plexus::{
    ClientRuntime, CloseReason, Connection, LinkEvent, Session, SessionHandler, SessionInfo,
    Upstream,
};
use rustls::pki_types::ServerName;

use crate::dgram_client::{self, DtlsOptions};
use crate::tls_client::{self, TlsOptions};
use crate::EXIT_USAGE;

/// Bound on each connect attempt (each resolved address in turn).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the TLS handshake, from the TCP connection on.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest chunk read from standard input at once.
const CHUNK: usize = 64 * 1024;

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
    relay(target, None)
}

/// Connects to `target` (`HOST:PORT`) on a client runtime — over TLS when `tls` says so —
/// and relays standard input and output until the peer closes. Exit 0 on a clean end, 1 on a
/// connection (or TLS) failure.
pub(crate) fn relay(target: &str, tls: Option<TlsUpstream>) -> ExitCode {
    match relay_on_runtime(target, tls) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `tls://` adds to a connection: the client configuration and the name to verify.
pub(crate) struct TlsUpstream {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) name: ServerName<'static>,
}

/// How the connection ended, as its handler saw it.
#[derive(Default)]
struct Ending {
    connected: bool,
    reason: Option<CloseReason>,
    stdout: Option<io::Error>,
}

fn relay_on_runtime(target: &str, tls: Option<TlsUpstream>) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "tls" } else { "tcp" };
    let mut upstream = Upstream::resolve(target)
        .with_context(|| format!("{scheme}://{target}"))?
        .with_connect_timeout(CONNECT_TIMEOUT);
    let name = tls.as_ref().map(|tls| tls.name.clone());
    if let Some(TlsUpstream { config, name }) = tls {
        upstream = upstream.with_tls(config, name);
    }
    let runtime = ClientRuntime::builder()
        .event_loops(1)
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .build()
        .context("starting the client runtime")?;
    let ending = Arc::new(Mutex::new(Ending::default()));
    let handler = StdioRelay {
        ending: Arc::clone(&ending),
        tls: name.is_some(),
    };
    let connection = runtime
        .connect(&upstream, Box::new(handler))
        .context("opening the connection")?;
    thread::Builder::new()
        .name("plexus-stdin".to_owned())
        .spawn(move || feed_stdin(&connection))
        .context("starting the standard input thread")?;
    runtime.run().context("client runtime")?;
    let ending = std::mem::take(&mut *ending.lock().unwrap_or_else(PoisonError::into_inner));
    if let Some(err) = ending.stdout {
        bail!("writing to standard output: {err}");
    }
    let handshaking = !ending.connected;
    match ending.reason {
        None | Some(CloseReason::PeerClosed) if ending.connected => Ok(()),
        Some(CloseReason::UpstreamFailed(kind)) => {
            bail!("{scheme}://{target}: {}", io::Error::from(kind))
        }
        Some(CloseReason::UpstreamTimeout) => {
            bail!("{scheme}://{target}: connect timed out after {CONNECT_TIMEOUT:?}")
        }
        Some(CloseReason::Tls(err)) => match &name {
            Some(name) => bail!(
                "{scheme}://{target}: {}",
                tls_client::describe_tls_error(&err, handshaking, name)
            ),
            None => bail!("{scheme}://{target}: {err}"),
        },
        Some(CloseReason::HandshakeTimeout) => {
            bail!("{scheme}://{target}: TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}")
        }
        Some(CloseReason::PeerClosed) => {
            bail!("{scheme}://{target}: the peer closed the connection during the TLS handshake")
        }
        Some(reason) => bail!("{scheme}://{target}: {reason}"),
        None => bail!("{scheme}://{target}: the connection ended before it was established"),
    }
}

/// Standard input to the connection, in chunks: [`Connection::send`] blocks while the
/// connection is backlogged, so a peer that does not read stops this thread (nothing piles up
/// in memory). At the end of standard input the connection's write side is closed.
fn feed_stdin(connection: &Connection) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default().to_vec();
                if connection.send(chunk).is_err() {
                    return; // the connection ended
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                eprintln!("error: reading standard input: {err}");
                break;
            }
        }
    }
    let _ = connection.finish();
}

/// The connection's handler: the peer's bytes to standard output — written by the runtime's
/// worker thread, in order (`spawn_blocking`), so the loop never blocks on a slow standard
/// output and stops reading the peer while writes are pending — and how it ended.
struct StdioRelay {
    ending: Arc<Mutex<Ending>>,
    tls: bool,
}

impl StdioRelay {
    fn ending(&self) -> std::sync::MutexGuard<'_, Ending> {
        self.ending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SessionHandler for StdioRelay {
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Connected { .. } = event {
            self.ending().connected = true;
            if self.tls {
                if let Some(state) = session.tls_state() {
                    tls_client::announce(state);
                }
            }
        }
    }

    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let data = data.to_vec();
        let ending = Arc::clone(&self.ending);
        session.spawn_blocking(move |reply| {
            let mut stdout = io::stdout().lock();
            if let Err(err) = stdout.write_all(&data).and_then(|()| stdout.flush()) {
                let mut ending = ending.lock().unwrap_or_else(PoisonError::into_inner);
                ending.stdout.get_or_insert(err);
                reply.close();
            }
        });
    }

    fn on_close(&mut self, _: &SessionInfo, reason: &CloseReason) {
        self.ending().reason = Some(reason.clone());
    }
}
