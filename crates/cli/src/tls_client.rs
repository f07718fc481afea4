//! `plexus connect tls://HOST:PORT`: the TLS client (rustls with the aws-lc-rs provider, TLS 1.2
//! and 1.3).
//!
//! It behaves like `tcp://`: standard input goes to the peer, the peer's plaintext to standard
//! output (binary-safe, flushed per chunk). When standard input ends it sends a TLS
//! `close_notify` and keeps reading until the peer closes (its `close_notify` or TCP EOF), then
//! exits 0.
//!
//! Trust: `--ca FILE` trusts only the certificates in that PEM file — as roots of a chain, and
//! each also as the very certificate a server may present (a self-signed certificate made by
//! `openssl req -x509` carries `CA:TRUE`, which webpki refuses as an end entity; like
//! `curl --cacert` and `openssl s_client -CAfile`, an explicitly trusted certificate is
//! accepted, after its name and validity period are checked); `--insecure` accepts any
//! certificate (the handshake signatures are still checked, chain and name are not); neither
//! uses the system roots. The name checked (and sent as SNI) is `--sni NAME`, else HOST.
//! The trust rules live in [`plexus::tls_client`]; [`trust_of`] maps the options onto them
//! (`connect` and `bench` use it).
//!
//! Design: one thread reads standard input and hands chunks over a bounded channel; the calling
//! thread owns the [`ClientConnection`] and the non-blocking socket and takes turns: plaintext
//! into rustls, `write_tls`, `read_tls` + `process_new_packets`, plaintext to standard output.
//! A turn that moved nothing waits in one read with a [`POLL_INTERVAL`] timeout, so an idle
//! connection wakes up at most once per interval, and a peer that does not read never blocks
//! the reading side.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use plexus::tls_client::ServerTrust;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ClientConnection};

use crate::connect::dial;
use crate::EXIT_USAGE;

/// Longest wait for the socket in one turn of the loop (read and write timeout).
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bound on the TLS handshake, from the TCP connection on.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest chunk read from standard input or handed to standard output at once.
const CHUNK: usize = 64 * 1024;
/// Socket reads (rustls reads at most 4 KiB each) per turn of the loop before writing again.
const READS_PER_TURN: usize = 32;
/// Chunks of standard input buffered between the reader thread and the connection.
const STDIN_QUEUE: usize = 4;

/// The `tls://` options of `plexus connect`.
#[derive(Debug, Default)]
pub(crate) struct TlsOptions {
    /// Accept any server certificate (handshake signatures are still verified).
    pub(crate) insecure: bool,
    /// Trust only the certificates in this PEM file.
    pub(crate) ca: Option<PathBuf>,
    /// Server name to send and verify, instead of HOST.
    pub(crate) sni: Option<String>,
    /// ALPN protocols to offer, in order of preference.
    pub(crate) alpn: Vec<String>,
}

/// Connects to `target` (`HOST:PORT`) over TLS and relays standard input and output.
/// Exit 0 on a clean end, 1 on a connection or TLS failure, 2 on bad options.
pub(crate) fn run(target: &str, options: TlsOptions) -> ExitCode {
    let (config, server_name) = match prepare(target, &options) {
        Ok(prepared) => prepared,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match session(target, config, server_name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: tls://{target}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the client configuration and the server name from the options (usage errors only).
fn prepare(
    target: &str,
    options: &TlsOptions,
) -> anyhow::Result<(Arc<ClientConfig>, ServerName<'static>)> {
    let host = host_of(target)?;
    let server_name = match &options.sni {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|_| anyhow!("--sni {name:?} is not a valid DNS name or IP address"))?,
        None => ServerName::try_from(host.to_owned()).map_err(|_| {
            anyhow!("{host:?} is not a valid DNS name; give the name to verify with --sni NAME")
        })?,
    };

    if options.insecure {
        eprintln!(
            "warning: --insecure: the server's certificate is not verified (anyone on the path \
             can impersonate the server)"
        );
    }
    let trust = trust_of(options.insecure, options.ca.as_deref());
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS configuration")?
        .dangerous()
        .with_custom_certificate_verifier(verifier_of(&trust, provider)?)
        .with_no_client_auth();
    for protocol in &options.alpn {
        if protocol.is_empty() || protocol.len() > 255 {
            bail!("--alpn {protocol:?}: an ALPN protocol name is 1 to 255 bytes");
        }
        config.alpn_protocols.push(protocol.as_bytes().to_vec());
    }
    Ok((Arc::new(config), server_name))
}

/// HOST of `HOST:PORT` (brackets of an IPv6 literal removed); the port must be a number.
fn host_of(target: &str) -> anyhow::Result<&str> {
    let Some((host, port)) = target.rsplit_once(':') else {
        bail!("'tls://{target}' has no port; expected tls://HOST:PORT");
    };
    if port.parse::<u16>().is_err() {
        bail!("'tls://{target}': {port:?} is not a port number; expected tls://HOST:PORT");
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        bail!("'tls://{target}' has no host; expected tls://HOST:PORT");
    }
    Ok(host)
}

/// The trust `--insecure` / `--ca FILE` ask for (the rules live in [`plexus::tls_client`]):
/// any certificate, the certificates of FILE only, or else the system roots. Problems reading
/// the system store are warnings; without any root every certificate is refused at the
/// handshake, with a clear error.
pub(crate) fn trust_of(insecure: bool, ca: Option<&Path>) -> ServerTrust {
    match (insecure, ca) {
        (true, _) => ServerTrust::AnyCertificate,
        (false, Some(path)) => ServerTrust::CaFile(path.to_owned()),
        (false, None) => {
            let native = plexus::tls_client::native_roots();
            for err in &native.errors {
                eprintln!("warning: reading the system root certificates: {err}");
            }
            if native.roots.is_empty() {
                eprintln!(
                    "warning: no system root certificates found: every server certificate will \
                     be rejected (use --ca FILE)"
                );
            }
            ServerTrust::Roots(Arc::new(native.roots))
        }
    }
}

/// The verifier for `trust` on `provider`; a `--ca` file that cannot be used is a usage error.
pub(crate) fn verifier_of(
    trust: &ServerTrust,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ServerCertVerifier>> {
    plexus::tls_client::verifier(trust, provider).map_err(|err| match trust {
        ServerTrust::CaFile(_) => anyhow!("--ca {err}"),
        _ => anyhow!("certificate verifier: {err}"),
    })
}

/// What the standard-input thread hands over; the end is the channel disconnecting.
type StdinChunk = io::Result<Vec<u8>>;

/// Reads standard input in chunks into a bounded channel until EOF or an error.
fn spawn_stdin_reader() -> Receiver<StdinChunk> {
    let (tx, rx) = mpsc::sync_channel(STDIN_QUEUE);
    thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    let _ = tx.send(Err(err));
                    return;
                }
            }
        }
    });
    rx
}

/// Connects, runs the handshake and relays until the peer closes.
fn session(
    target: &str,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> anyhow::Result<()> {
    let sock = dial(target).context("connecting")?;
    sock.set_nodelay(true).context("TCP_NODELAY")?;
    // Every socket call is non-blocking except the wait in `Relay::wait`, a read bounded by
    // this timeout.
    sock.set_read_timeout(Some(POLL_INTERVAL))
        .context("socket read timeout")?;
    sock.set_nonblocking(true).context("non-blocking socket")?;
    let conn = ClientConnection::new(config, server_name.clone())
        .map_err(|err| anyhow!("starting the TLS handshake: {err}"))?;
    Relay {
        conn,
        sock,
        server_name,
        stdin: spawn_stdin_reader(),
        stdout: io::stdout().lock(),
        pending: Vec::new(),
        sent: 0,
        stdin_open: true,
        close_sent: false,
        buf: vec![0u8; CHUNK],
    }
    .run()
}

/// The connection, its socket and the relay state, owned by the calling thread.
struct Relay {
    conn: ClientConnection,
    sock: TcpStream,
    server_name: ServerName<'static>,
    stdin: Receiver<StdinChunk>,
    stdout: io::StdoutLock<'static>,
    /// Standard input not yet accepted by rustls: `pending[sent..]`.
    pending: Vec<u8>,
    sent: usize,
    stdin_open: bool,
    close_sent: bool,
    /// Plaintext from the peer on its way to standard output.
    buf: Vec<u8>,
}

/// What reading from the peer found.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// Nothing was there.
    Nothing,
    /// Bytes arrived.
    Data,
    /// The peer closed (close_notify or TCP EOF); everything it sent has been written out.
    Closed,
}

impl Relay {
    /// Turns of: standard input into rustls, TLS records out, TLS records in, plaintext out;
    /// a turn that moved nothing waits up to [`POLL_INTERVAL`] for the peer.
    fn run(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut announced = false;
        loop {
            let mut progress = false;
            if self.conn.is_handshaking() {
                if started.elapsed() > HANDSHAKE_TIMEOUT {
                    bail!("TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                }
            } else {
                if !announced {
                    announce(&self.conn);
                    announced = true;
                }
                progress |= self.feed_stdin()?;
            }
            progress |= self.write_out()?;
            let mut received = self.receive(READS_PER_TURN)?;
            if received == Received::Nothing && !progress {
                received = self.wait()?;
            }
            if received == Received::Closed {
                return self.finish();
            }
        }
    }

    /// Moves standard input into rustls as far as its outgoing buffer allows, and queues
    /// close_notify once standard input has ended and all of it was taken. Returns whether
    /// anything changed.
    fn feed_stdin(&mut self) -> anyhow::Result<bool> {
        let mut progress = false;
        loop {
            if self.sent == self.pending.len() && self.stdin_open {
                match self.stdin.try_recv() {
                    Ok(Ok(chunk)) => {
                        self.pending = chunk;
                        self.sent = 0;
                    }
                    Ok(Err(err)) => {
                        eprintln!("error: reading standard input: {err}");
                        self.stdin_open = false;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.stdin_open = false,
                }
                progress = true;
            }
            if self.sent == self.pending.len() {
                break;
            }
            let n = self
                .conn
                .writer()
                .write(&self.pending[self.sent..])
                .context("encrypting standard input")?;
            if n == 0 {
                break; // rustls' outgoing buffer is full: write it out first
            }
            self.sent += n;
            progress = true;
        }
        if !self.stdin_open && self.sent == self.pending.len() && !self.close_sent {
            self.conn.send_close_notify();
            self.close_sent = true;
            progress = true;
        }
        Ok(progress)
    }

    /// Writes queued TLS records until rustls has none left or the socket is full. Returns
    /// whether anything was written.
    fn write_out(&mut self) -> anyhow::Result<bool> {
        let mut wrote = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => break,
                Ok(_) => wrote = true,
                Err(err) if is_wait(&err) => break,
                Err(err) => return Err(err).context("sending to the peer"),
            }
        }
        Ok(wrote)
    }

    /// Waits up to [`POLL_INTERVAL`] for the peer (one blocking read with the socket's read
    /// timeout), then handles what came.
    fn wait(&mut self) -> anyhow::Result<Received> {
        self.sock
            .set_nonblocking(false)
            .context("blocking socket")?;
        let received = self.receive(1);
        self.sock
            .set_nonblocking(true)
            .context("non-blocking socket")?;
        received
    }

    /// Up to `max_reads` reads from the socket (until it has nothing more), each followed by
    /// record processing and plaintext to standard output.
    fn receive(&mut self, max_reads: usize) -> anyhow::Result<Received> {
        let mut received = Received::Nothing;
        for _ in 0..max_reads {
            let eof = match self.conn.read_tls(&mut self.sock) {
                Ok(0) => true,
                Ok(_) => false,
                Err(err) if is_wait(&err) => break,
                Err(err) => return Err(err).context("receiving from the peer"),
            };
            received = Received::Data;
            if self.process(eof)? {
                return Ok(Received::Closed);
            }
        }
        Ok(received)
    }

    /// Processes the records read so far and writes their plaintext to standard output.
    /// Returns whether the peer has closed (close_notify, or `eof` on the socket).
    fn process(&mut self, eof: bool) -> anyhow::Result<bool> {
        if let Err(err) = self.conn.process_new_packets() {
            // Tell the peer why (rustls queued an alert), then fail.
            let _ = self.write_out();
            bail!(
                "{}",
                describe_tls_error(&err, self.conn.is_handshaking(), &self.server_name)
            );
        }
        if eof && self.conn.is_handshaking() {
            bail!("the peer closed the connection during the TLS handshake");
        }
        loop {
            match self.conn.reader().read(&mut self.buf) {
                Ok(0) => return Ok(true), // close_notify
                Ok(n) => self
                    .stdout
                    .write_all(&self.buf[..n])
                    .and_then(|()| self.stdout.flush())
                    .context("writing to standard output")?,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(eof),
                // TCP EOF without close_notify: everything that arrived has been written.
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
                Err(err) => return Err(err).context("reading from the TLS connection"),
            }
        }
    }

    /// The peer has closed: answer with close_notify (best effort) and flush standard output.
    fn finish(&mut self) -> anyhow::Result<()> {
        if !self.close_sent {
            self.conn.send_close_notify();
            self.close_sent = true;
        }
        let _ = self.write_out();
        self.stdout.flush().context("writing to standard output")
    }
}

/// A socket with nothing to do now (would block, timed out) or an interrupted call: try again
/// on the next turn.
fn is_wait(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Prints the one-line handshake summary on standard error.
fn announce(conn: &ClientConnection) {
    let version = conn
        .protocol_version()
        .map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}"));
    let cipher = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_owned(), |s| format!("{:?}", s.suite()));
    let alpn = conn.alpn_protocol().map_or_else(
        || "none".to_owned(),
        |p| String::from_utf8_lossy(p).into_owned(),
    );
    let fingerprint = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| sha256_hex(leaf.as_ref()))
        .unwrap_or_else(|| "none".to_owned());
    eprintln!(
        "connected tls version={version} cipher={cipher} alpn={alpn} \
         peer_cert_sha256={fingerprint}"
    );
}

/// Lower-case hex SHA-256 of `data`, from the aws-lc-rs provider's SHA-256 (the hash of its
/// `TLS13_AES_128_GCM_SHA256` suite); `None` if that suite is unavailable.
pub(crate) fn sha256_hex(data: &[u8]) -> Option<String> {
    let suite = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13()?;
    let hash = suite.common.hash_provider;
    if hash.algorithm() != rustls::crypto::hash::HashAlgorithm::SHA256 {
        return None;
    }
    let digest = hash.hash(data);
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    Some(hex)
}

/// A TLS error with a hint at the usual cause.
fn describe_tls_error(err: &rustls::Error, handshaking: bool, name: &ServerName<'_>) -> String {
    let what = if handshaking {
        "TLS handshake failed"
    } else {
        "TLS error"
    };
    let hint = match err {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer => {
                " (the server's certificate is not issued by a trusted root: pass its CA with \
                 --ca FILE, or skip verification with --insecure)"
                    .to_owned()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    " (the certificate does not name {}: check HOST or pass the name it has \
                     with --sni NAME)",
                    name.to_str()
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                " (check the certificate's validity dates and the system clock)".to_owned()
            }
            _ => String::new(),
        },
        rustls::Error::InvalidMessage(_) if handshaking => {
            " (is the peer speaking TLS on this port?)".to_owned()
        }
        rustls::Error::NoApplicationProtocol => {
            " (the server supports none of the --alpn protocols offered)".to_owned()
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            " (the server supports none of the --alpn protocols offered)".to_owned()
        }
        _ => String::new(),
    };
    format!("{what}: {err}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_parses_targets() {
        assert_eq!(host_of("example.test:443").ok(), Some("example.test"));
        assert_eq!(host_of("127.0.0.1:1").ok(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8443").ok(), Some("::1"));
        for bad in [
            "example.test",
            "example.test:",
            "example.test:http",
            ":443",
            "[]:1",
        ] {
            assert!(host_of(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sha256_hex_of_empty_input() {
        assert_eq!(
            sha256_hex(b"").as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }
}
