//! `plexus connect udp://HOST:PORT` and `dtls://HOST:PORT`: one datagram per input line.
//!
//! Each line of standard input (without its newline) is sent as one datagram (over DTLS: one
//! record); each datagram that comes back is written to standard output followed by a
//! newline. When standard input ends, the command waits until as many datagrams came back as
//! were sent, or [`REPLY_WAIT`] passed without any (UDP loses datagrams; a service need not
//! answer each one), then exits 0 — a DTLS session first sends close_notify.
//!
//! DTLS uses OpenSSL (DTLS 1.2, records of at most [`MTU`] bytes); trust works as for `tls://`:
//! `--ca FILE` trusts only that file, `--insecure` checks nothing, otherwise the system roots.
//! `--psk-identity ID --psk-key-file FILE` uses a pre-shared key instead (PSK suites only).

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use openssl::ssl::{ErrorCode, SslStream};
use plexus::tls_client::ServerTrust;

/// How long to wait for outstanding replies after standard input ended.
const REPLY_WAIT: Duration = Duration::from_secs(2);
/// Longest wait for a datagram in one turn.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bound on the DTLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// DTLS record size limit (the server's default too).
const MTU: u32 = 1200;
/// The largest message that fits one record of [`MTU`] bytes whatever the suite: the DTLS 1.2
/// record header (13 bytes) and the worst CBC overhead (16-byte IV, 48-byte SHA-384 MAC, up
/// to 16 bytes of padding) leave 1107 bytes; rounded down.
pub(crate) const MAX_RECORD_PAYLOAD: usize = 1100;
/// Largest datagram received.
const MAX_DATAGRAM: usize = 65_536;

/// The `dtls://` trust options.
#[derive(Debug, Default)]
pub(crate) struct DtlsOptions {
    pub(crate) insecure: bool,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) sni: Option<String>,
    /// `--psk-identity` and `--psk-key-file`.
    pub(crate) psk: Option<(String, PathBuf)>,
}

/// `udp://HOST:PORT`.
pub(crate) fn run_udp(target: &str) -> ExitCode {
    let result = connect_udp(target).and_then(|socket| relay(&mut PlainUdp(socket), |_| Ok(())));
    finish("udp", target, result)
}

/// `dtls://HOST:PORT`.
pub(crate) fn run_dtls(target: &str, options: DtlsOptions) -> ExitCode {
    let result = connect_udp(target)
        .and_then(|socket| {
            let mut stream = DtlsClient::new(target, &options)?.session(socket)?;
            handshake(&mut stream, HANDSHAKE_TIMEOUT)?;
            Ok(stream)
        })
        .and_then(|mut stream| {
            relay(&mut stream, |stream| {
                let _ = stream.shutdown();
                Ok(())
            })
        });
    finish("dtls", target, result)
}

fn finish(scheme: &str, target: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {scheme}://{target}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn connect_udp(target: &str) -> anyhow::Result<UdpSocket> {
    let addr: SocketAddr = target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{target:?} resolved to no address"))?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let socket = UdpSocket::bind(local).context("bind a UDP socket")?;
    socket.connect(addr).context("connect the UDP socket")?;
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    Ok(socket)
}

/// A connected UDP socket as a byte "stream" where each read/write is one datagram.
pub(crate) struct PlainUdp(pub(crate) UdpSocket);

impl Read for PlainUdp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for PlainUdp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One datagram in or out, whatever the transport.
trait Datagrams {
    fn send(&mut self, data: &[u8]) -> anyhow::Result<()>;
    /// `Ok(None)`: nothing arrived within the poll interval; `Err` on a closed session.
    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<Option<usize>>;
}

impl Datagrams for PlainUdp {
    fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.0.send(data).context("send")?;
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<Option<usize>> {
        match self.0.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(err) => Err(err).context("receive"),
        }
    }
}

impl Datagrams for SslStream<PlainUdp> {
    fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.ssl_write(data)
            .map_err(|err| anyhow!("dtls send: {err}"))?;
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<Option<usize>> {
        match self.ssl_read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(err) if err.code() == ErrorCode::ZERO_RETURN => bail!("server closed the session"),
            Err(err) if err.code() == ErrorCode::WANT_READ => Ok(None),
            Err(err) => Err(anyhow!("dtls receive: {err}")),
        }
    }
}

/// A DTLS 1.2 client configuration: trust (or PSK) from [`DtlsOptions`] and the server name
/// to send and verify, as the library's [`plexus::DtlsClientConfig`] (one DTLS client setup,
/// shared with forward's DTLS origination). Built once; every session of `plexus connect` or
/// `plexus bench dtls-echo` is started from it.
#[derive(Clone, Debug)]
pub(crate) struct DtlsClient {
    config: plexus::DtlsClientConfig,
}

impl DtlsClient {
    /// The configuration for `target` (HOST:PORT; HOST is the name verified unless `--sni`).
    pub(crate) fn new(target: &str, options: &DtlsOptions) -> anyhow::Result<DtlsClient> {
        let config = if let Some((identity, key_file)) = &options.psk {
            let key = plexus::config::PskConfig {
                identity: identity.clone(),
                key_file: key_file.clone(),
            }
            .load_key()
            .map_err(|err| anyhow!("--psk-key-file: {err}"))?;
            // PSK suites only: the key authenticates the server, there is no certificate.
            plexus::DtlsClientConfig::psk(identity, key).context("OpenSSL")?
        } else {
            let trust = if options.insecure {
                eprintln!("warning: --insecure: the server's certificate is not verified");
                ServerTrust::AnyCertificate
            } else if let Some(ca) = &options.ca {
                ServerTrust::CaFile(ca.clone())
            } else {
                ServerTrust::SystemRoots
            };
            let host = target
                .rsplit_once(':')
                .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(target);
            let name = options.sni.clone().unwrap_or_else(|| host.to_owned());
            plexus::DtlsClientConfig::new(&trust, &name).map_err(|err| match &options.ca {
                Some(ca) => anyhow!("--ca {}: {err}", ca.display()),
                None => anyhow!("{err}"),
            })?
        };
        Ok(DtlsClient {
            config: config.with_mtu(MTU),
        })
    }

    /// A client session over the connected `socket` (records of at most [`MTU`] bytes), its
    /// handshake not started yet: see [`handshake`].
    pub(crate) fn session(&self, socket: UdpSocket) -> anyhow::Result<SslStream<PlainUdp>> {
        let ssl = self.config.ssl().context("OpenSSL")?;
        SslStream::new(ssl, PlainUdp(socket)).context("OpenSSL")
    }
}

/// Runs the handshake of `stream` to completion within `timeout`. The socket must be
/// blocking with a short read timeout: each timed-out read is a chance to let OpenSSL
/// retransmit its flight.
pub(crate) fn handshake(stream: &mut SslStream<PlainUdp>, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(()),
            Err(err) if err.code() == ErrorCode::WANT_READ => {
                if Instant::now() > deadline {
                    bail!("dtls handshake did not complete within {timeout:?}");
                }
                // The read timed out: let OpenSSL retransmit if its timer expired.
                plexus_sys::dtls::handle_timeout(stream.ssl());
            }
            Err(err) => bail!("dtls handshake failed: {err}"),
        }
    }
}

/// Standard input lines → datagrams, datagrams → standard output lines.
fn relay<D: Datagrams>(
    link: &mut D,
    close: impl FnOnce(&mut D) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let lines = stdin_lines();
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let (mut sent, mut received) = (0u64, 0u64);
    let mut input_done_at: Option<Instant> = None;
    let mut last_reply = Instant::now();
    loop {
        if input_done_at.is_none() {
            loop {
                match lines.try_recv() {
                    Ok(line) => {
                        link.send(&line)?;
                        sent += 1;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        input_done_at = Some(Instant::now());
                        break;
                    }
                }
            }
        }
        if let Some(done) = input_done_at {
            let quiet_since = last_reply.max(done);
            if received >= sent || quiet_since.elapsed() > REPLY_WAIT {
                if received < sent {
                    eprintln!("note: {} of {sent} datagrams got no reply", sent - received);
                }
                stdout.flush()?;
                return close(link);
            }
        }
        if let Some(n) = link.recv(&mut buf)? {
            received += 1;
            last_reply = Instant::now();
            stdout.write_all(&buf[..n])?;
            stdout.write_all(b"\n")?;
            stdout.flush()?;
        }
    }
}

fn stdin_lines() -> Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::sync_channel(64);
    thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if sender.send(line.clone()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    receiver
}
