//! The adversarial suite: while an attack runs against a real `plexus serve`, a healthy client
//! on every transport keeps getting every byte and every response, and the server's memory
//! stays bounded.
//!
//! Every test starts its own server ([`suite_config`]: listeners on every transport and service
//! with small caps, so the attacks reach them quickly), starts the healthy clients
//! ([`Healthy`]: tcp, tls and auto echo, udp and dtls echo, http and https GET, chat; each on a
//! persistent session plus fresh connections from time to time, all from [`HEALTHY_IP`]), runs
//! one attack for [`ATTACK_TIME`] from other loopback addresses (127.0.0.1-127.0.0.4 and, for
//! the spoofed floods, many more of 127.0.0.0/8), keeps the healthy clients going a little
//! longer to catch after-effects, and then asserts:
//! - every healthy attempt succeeded (bytes equal, status 200, chat line delivered), and there
//!   were some on every transport;
//! - the server's RSS (VmRSS, sampled every 100 ms) grew by less than [`RSS_GROWTH_LIMIT_KIB`];
//! - the server is still running and never panicked.
//!
//! Attack sources never use the healthy client's address, so wherever a per-IP rule applies
//! (`max_connections_per_ip`, a source's share of the handshake slots) it is that rule that
//! protects the healthy client. Nothing here asserts a wall-clock time: waits are bounds only.
//! Each test prints one `adversarial:` line with the healthy client's successes/attempts per
//! transport and the server's RSS before/peak/after (copied into docs/BENCHMARKS.md).

mod common;

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, SslConnector, SslMethod, SslOptions, SslStream, SslVerifyMode};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use socket2::SockRef;

use common::*;
use plexus_testkit::accept_any_cert_config;

/// Where every healthy client connects from (no attack uses it).
const HEALTHY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 99, 0, 1));
/// The attackers' addresses where per-IP caps apply (`plexus bench --sources 3` uses the
/// first three; the hand-written attacks use the last three).
const ATTACK_IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)),
];
/// How long each attack runs.
const ATTACK_TIME: Duration = Duration::from_secs(8);
/// How long the healthy clients keep going after the attack ended.
const AFTER_TIME: Duration = Duration::from_secs(2);
/// Bound on the server's RSS growth during an attack.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;
/// The size of `/big.bin` (slow readers, RST storms mid-response).
const BIG_FILE: usize = 4 * 1024 * 1024;
/// The body of `/index.html`, which the healthy http clients fetch.
const INDEX: &str = "<html><body>plexus adversarial suite: healthy page</body></html>\n";
/// The caps of [`suite_config`].
const MAX_CONNECTIONS_PER_IP: usize = 40;

/// The server under attack: every transport and service, small caps, short timeouts.
fn suite_config(root: &Path) -> String {
    let listeners = [
        ("tcp-echo", "tcp", "echo"),
        ("tls-echo", "tls", "echo"),
        ("udp-echo", "udp", "echo"),
        ("dtls-echo", "dtls", "echo"),
        ("http", "tcp", "http"),
        ("https", "tls", "http"),
        ("chat", "tcp", "chat"),
        ("auto", "tcp", "auto"),
    ]
    .iter()
    .map(|(name, transport, service)| {
        format!(
            "[[listener]]\nname = \"{name}\"\ntransport = \"{transport}\"\n\
             addr = \"127.0.0.1:0\"\nservice = \"{service}\"\n\n"
        )
    })
    .collect::<String>();
    // max_connections = 300: datagram sessions may take half of it, and the other 150 places
    // exceed what the per-IP cap lets three attacker addresses hold (3 × 40) plus the healthy
    // client, so any refusal of the healthy client is a defect, not arithmetic.
    format!(
        r#"[server]
event_loops = 2
workers = 2
max_connections = 300
max_connections_per_ip = {MAX_CONNECTIONS_PER_IP}
max_handshakes = 64
handshake_timeout = "5s"
idle_timeout = "5s"
shutdown_grace = "2s"

[http]
root = "{root}"
header_timeout = "3s"

{listeners}"#,
        root = root.display()
    )
}

/// A server started on [`suite_config`] with its document root.
struct Fixture {
    server: Server,
    _root: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        let root = tempfile::tempdir().expect("tempdir for the document root");
        std::fs::write(root.path().join("index.html"), INDEX).expect("write index.html");
        let mut big = vec![0u8; BIG_FILE];
        fill_pattern(0, &mut big);
        std::fs::write(root.path().join("big.bin"), big).expect("write big.bin");
        let server = Server::start(&suite_config(root.path()));
        Fixture {
            server,
            _root: root,
        }
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.server.addr(name)
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: healthy clients, RSS sampling, the verdict
// ---------------------------------------------------------------------------------------------

/// One healthy client's record.
#[derive(Debug, Default, Clone)]
struct Tally {
    attempts: u64,
    ok: u64,
    failures: Vec<String>,
}

/// One healthy client: `round` does one exchange (reconnecting first if its last one failed)
/// and says whether every byte came back.
trait HealthyClient: Send {
    fn round(&mut self) -> Result<(), String>;
}

/// A running healthy client: its name, its record, its thread.
type Running = (&'static str, Arc<Mutex<Tally>>, JoinHandle<()>);

/// The healthy clients, one thread each, until stopped.
struct Healthy {
    stop: Arc<AtomicBool>,
    clients: Vec<Running>,
}

impl Healthy {
    fn start(fx: &Fixture) -> Healthy {
        let stop = Arc::new(AtomicBool::new(false));
        let mut healthy = Healthy {
            stop,
            clients: Vec::new(),
        };
        healthy.spawn("tcp-echo", EchoClient::tcp(fx.addr("tcp-echo")));
        healthy.spawn("tls-echo", EchoClient::tls(fx.addr("tls-echo")));
        healthy.spawn("auto-echo", EchoClient::auto(fx.addr("auto")));
        healthy.spawn("udp-echo", UdpClient::new(fx.addr("udp-echo")));
        healthy.spawn("dtls-echo", DtlsClient::new(fx.addr("dtls-echo")));
        healthy.spawn("http", HttpClient::new(fx.addr("http"), false));
        healthy.spawn("https", HttpClient::new(fx.addr("https"), true));
        healthy.spawn("chat", ChatClient::new(fx.addr("chat")));
        healthy
    }

    fn spawn(&mut self, name: &'static str, mut client: impl HealthyClient + 'static) {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, record) = (Arc::clone(&self.stop), Arc::clone(&tally));
        let thread = thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let result = client.round();
                let mut t = record.lock().unwrap();
                t.attempts += 1;
                match result {
                    Ok(()) => t.ok += 1,
                    Err(e) => {
                        if t.failures.len() < 20 {
                            t.failures.push(e);
                        }
                    }
                }
                drop(t);
                thread::sleep(Duration::from_millis(20));
            }
        });
        self.clients.push((name, tally, thread));
    }

    /// Waits (bounded) until every client succeeded a few times, then zeroes the tallies:
    /// what counts is what happens from here on.
    fn warm_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let cold: Vec<_> = self
                .clients
                .iter()
                .filter(|(_, t, _)| t.lock().unwrap().ok < 3)
                .map(|(name, t, _)| (*name, t.lock().unwrap().clone()))
                .collect();
            if cold.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "healthy clients not working before any attack: {cold:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        for (_, t, _) in &self.clients {
            *t.lock().unwrap() = Tally::default();
        }
    }

    fn finish(self) -> Vec<(&'static str, Tally)> {
        self.stop.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .map(|(name, tally, thread)| {
                thread.join().expect("healthy client thread panicked");
                let t = tally.lock().unwrap().clone();
                (name, t)
            })
            .collect()
    }
}

/// VmRSS of `pid` in KiB, `None` once the process is gone.
fn try_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples the server's RSS every 100 ms; the peak is returned on `finish`.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(try_rss_kib(pid).unwrap_or(0)));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(rss) = try_rss_kib(pid) {
                    p.fetch_max(rss, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { stop, peak, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        self.peak.load(Ordering::SeqCst)
    }
}

/// Runs one attack against a fresh server while the healthy clients run, prints the record
/// and asserts the outcome (see the module documentation).
fn run_attack(name: &str, attack: impl FnOnce(&Fixture) -> String) {
    let fx = Fixture::start();
    let pid = fx.server.pid();
    let healthy = Healthy::start(&fx);
    healthy.warm_up();
    let before = try_rss_kib(pid).expect("server RSS");
    let sampler = RssSampler::start(pid);
    let attack_report = attack(&fx);
    thread::sleep(AFTER_TIME);
    let tallies = healthy.finish();
    let peak = sampler.finish();
    // Let the attack's leftovers time out (idle_timeout = 5 s) before the last sample.
    thread::sleep(Duration::from_secs(3));
    let after = try_rss_kib(pid).unwrap_or(0);

    let summary: Vec<String> = tallies
        .iter()
        .map(|(n, t)| format!("{n}={}/{}", t.ok, t.attempts))
        .collect();
    eprintln!(
        "adversarial: attack={name} healthy: {} | server RSS KiB before={before} peak={peak} \
         after={after} (growth {} KiB) | attack: {attack_report}",
        summary.join(" "),
        peak.saturating_sub(before)
    );

    let mut server = fx.server;
    server.assert_running(&format!("after the {name} attack"));
    let panics: Vec<String> = server
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "the server panicked: {panics:?}");
    let failed: Vec<_> = tallies
        .iter()
        .filter(|(_, t)| t.attempts == 0 || t.ok != t.attempts)
        .collect();
    assert!(
        failed.is_empty(),
        "{name}: healthy clients failed during the attack: {failed:#?}"
    );
    assert!(
        peak.saturating_sub(before) < RSS_GROWTH_LIMIT_KIB,
        "{name}: server RSS grew from {before} KiB to {peak} KiB (limit +{RSS_GROWTH_LIMIT_KIB} KiB)"
    );
}

// ---------------------------------------------------------------------------------------------
// Healthy clients
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A message for round `seq` of a client, `len` bytes, starting with `prefix`.
fn message(prefix: &str, seq: u64, len: usize) -> Vec<u8> {
    let mut m = format!("{prefix} {seq:08} ").into_bytes();
    let mut fill = vec![0u8; len.saturating_sub(m.len())];
    fill_pattern(seq * 4096, &mut fill);
    // Printable filler, so that an `auto` listener never takes it for a protocol.
    for b in &mut fill {
        *b = b'a' + *b % 26;
    }
    m.extend_from_slice(&fill);
    m
}

type Tls = rustls::StreamOwned<ClientConnection, TcpStream>;

/// A TCP connection from `from` with the harness's timeouts.
fn tcp_from(from: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    connect_socket(addr, Some(from), None)
}

/// Connects from `from` and completes a TLS handshake (blocking, bounded by the timeouts).
fn tls_from(from: IpAddr, addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<Tls> {
    tls_on(tcp_from(from, addr)?, config)
}

/// Completes a TLS handshake on a connected socket.
fn tls_on(mut sock: TcpStream, config: &Arc<ClientConfig>) -> io::Result<Tls> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// Writes `msg` and reads the same number of bytes back, which must be equal.
fn echo_over(s: &mut (impl Read + Write), msg: &[u8]) -> Result<(), String> {
    s.write_all(msg)
        .and_then(|()| s.flush())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err(format!(
            "echo mismatch: sent {:?}…, got {:?}…",
            String::from_utf8_lossy(&msg[..msg.len().min(24)]),
            String::from_utf8_lossy(&back[..back.len().min(24)])
        ));
    }
    Ok(())
}

enum EchoConn {
    Tcp(TcpStream),
    Tls(Box<Tls>),
}

impl EchoConn {
    fn echo(&mut self, msg: &[u8]) -> Result<(), String> {
        match self {
            EchoConn::Tcp(s) => echo_over(s, msg),
            EchoConn::Tls(s) => echo_over(s.as_mut(), msg),
        }
    }
}

/// tcp-echo, tls-echo and auto (plain echo): a persistent session echoing 1 KiB per round,
/// plus a fresh connection every 5th round.
struct EchoClient {
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    prefix: &'static str,
    conn: Option<EchoConn>,
    seq: u64,
}

impl EchoClient {
    fn tcp(addr: SocketAddr) -> EchoClient {
        EchoClient::new(addr, None, "tcp")
    }

    fn tls(addr: SocketAddr) -> EchoClient {
        EchoClient::new(addr, Some(accept_any_cert_config()), "tls")
    }

    /// On an `auto` listener: the first byte (`#`) is neither TLS, HTTP nor PROXY, so echo.
    fn auto(addr: SocketAddr) -> EchoClient {
        EchoClient::new(addr, None, "#auto")
    }

    fn new(addr: SocketAddr, tls: Option<Arc<ClientConfig>>, prefix: &'static str) -> EchoClient {
        EchoClient {
            addr,
            tls,
            prefix,
            conn: None,
            seq: 0,
        }
    }

    fn open(&self) -> Result<EchoConn, String> {
        match &self.tls {
            Some(config) => tls_from(HEALTHY_IP, self.addr, config)
                .map(|s| EchoConn::Tls(Box::new(s)))
                .map_err(|e| format!("tls connect: {e}")),
            None => tcp_from(HEALTHY_IP, self.addr)
                .map(EchoConn::Tcp)
                .map_err(|e| format!("connect: {e}")),
        }
    }
}

impl HealthyClient for EchoClient {
    fn round(&mut self) -> Result<(), String> {
        self.seq += 1;
        let seq = self.seq;
        if seq.is_multiple_of(5) {
            let mut fresh = self.open().map_err(|e| format!("fresh connection: {e}"))?;
            return fresh
                .echo(&message(self.prefix, seq, 64))
                .map_err(|e| format!("fresh connection: {e}"));
        }
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = conn.echo(&message(self.prefix, seq, 1024));
        if result.is_err() {
            self.conn = None;
        }
        result.map_err(|e| format!("persistent session: {e}"))
    }
}

/// udp-echo: one datagram per round (resent up to 10 times: UDP may drop under a flood, the
/// server must still answer); a new source port (a new session) every 10th round.
struct UdpClient {
    addr: SocketAddr,
    sock: Option<UdpSocket>,
    seq: u64,
}

impl UdpClient {
    fn new(addr: SocketAddr) -> UdpClient {
        UdpClient {
            addr,
            sock: None,
            seq: 0,
        }
    }
}

impl HealthyClient for UdpClient {
    fn round(&mut self) -> Result<(), String> {
        self.seq += 1;
        if self.seq.is_multiple_of(10) {
            self.sock = None;
        }
        if self.sock.is_none() {
            let sock = UdpSocket::bind(SocketAddr::new(HEALTHY_IP, 0))
                .and_then(|s| s.connect(self.addr).map(|()| s))
                .map_err(|e| format!("udp socket: {e}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .map_err(|e| e.to_string())?;
            self.sock = Some(sock);
        }
        let sock = self.sock.as_ref().expect("opened above");
        let msg = message("udp", self.seq, 512);
        let mut buf = vec![0u8; 2048];
        for _ in 0..10 {
            sock.send(&msg).map_err(|e| format!("udp send: {e}"))?;
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                match sock.recv(&mut buf) {
                    Ok(n) if buf[..n] == msg[..] => return Ok(()),
                    Ok(_) => {} // a late reply to an earlier resend
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => {
                        self.sock = None;
                        return Err(format!("udp recv: {e}"));
                    }
                }
            }
        }
        self.sock = None;
        Err(format!("udp datagram {} never echoed (10 sends)", self.seq))
    }
}

/// A connected UDP socket where each read or write is one datagram.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL DTLS 1.2 client on a UDP socket bound to `from` (no certificate check).
fn dtls_client(from: IpAddr, to: SocketAddr) -> io::Result<SslStream<Udp>> {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut builder = SslConnector::builder(SslMethod::dtls()).map_err(io::Error::other)?;
    builder.set_verify(SslVerifyMode::NONE);
    builder.set_options(SslOptions::NO_QUERY_MTU);
    let config = builder
        .build()
        .configure()
        .map_err(io::Error::other)?
        .verify_hostname(false);
    let mut ssl = config.into_ssl("localhost").map_err(io::Error::other)?;
    ssl.set_mtu(1200).map_err(io::Error::other)?;
    ssl.set_connect_state();
    SslStream::new(ssl, Udp(socket)).map_err(io::Error::other)
}

/// A completed DTLS handshake from `from` to `to`, within `within`.
fn dtls_connect(from: IpAddr, to: SocketAddr, within: Duration) -> Result<SslStream<Udp>, String> {
    let mut stream = dtls_client(from, to).map_err(|e| format!("dtls client: {e}"))?;
    let deadline = Instant::now() + within;
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(stream),
            Err(err) if err.code() == ErrorCode::WANT_READ => {
                if Instant::now() > deadline {
                    return Err(format!("dtls handshake not complete within {within:?}"));
                }
                plexus_sys::dtls::handle_timeout(stream.ssl());
            }
            Err(err) => return Err(format!("dtls handshake: {err}")),
        }
    }
}

/// Sends `payload` as one record (resent every 500 ms) until it comes back, within 10 s.
fn dtls_echo(stream: &mut SslStream<Udp>, payload: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 4096];
    stream
        .ssl_write(payload)
        .map_err(|e| format!("dtls write: {e}"))?;
    let mut last_send = Instant::now();
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(n) if buf[..n] == payload[..] => return Ok(()),
            Ok(_) => {} // a late echo of an earlier resend
            Err(err) if err.code() == ErrorCode::WANT_READ => {}
            Err(err) => return Err(format!("dtls read: {err}")),
        }
        if Instant::now() > deadline {
            return Err("no dtls echo within 10 s (resent every 500 ms)".into());
        }
        if last_send.elapsed() > Duration::from_millis(500) {
            stream
                .ssl_write(payload)
                .map_err(|e| format!("dtls write: {e}"))?;
            last_send = Instant::now();
        }
    }
}

/// dtls-echo: a persistent session echoing one record per round, plus a fresh session (a full
/// handshake with a cookie exchange) every 10th round.
struct DtlsClient {
    addr: SocketAddr,
    stream: Option<SslStream<Udp>>,
    seq: u64,
}

impl DtlsClient {
    fn new(addr: SocketAddr) -> DtlsClient {
        DtlsClient {
            addr,
            stream: None,
            seq: 0,
        }
    }
}

impl HealthyClient for DtlsClient {
    fn round(&mut self) -> Result<(), String> {
        self.seq += 1;
        let msg = message("dtls", self.seq, 512);
        if self.seq.is_multiple_of(10) {
            let mut fresh = dtls_connect(HEALTHY_IP, self.addr, Duration::from_secs(10))
                .map_err(|e| format!("fresh session: {e}"))?;
            let result = dtls_echo(&mut fresh, &msg).map_err(|e| format!("fresh session: {e}"));
            let _ = fresh.shutdown();
            return result;
        }
        if self.stream.is_none() {
            self.stream = Some(dtls_connect(
                HEALTHY_IP,
                self.addr,
                Duration::from_secs(10),
            )?);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let result = dtls_echo(stream, &msg);
        if result.is_err() {
            self.stream = None;
        }
        result.map_err(|e| format!("persistent session: {e}"))
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: (status, body).
fn read_response(s: &mut impl Read) -> Result<(u16, Vec<u8>), String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("EOF after {} bytes of the head", data.len())),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the head: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    let mut body = data[head_end..].to_vec();
    if body.len() > len {
        return Err(format!("{} bytes beyond the body", body.len() - len));
    }
    let mut rest = vec![0u8; len - body.len()];
    s.read_exact(&mut rest)
        .map_err(|e| format!("reading the body: {e}"))?;
    body.extend_from_slice(&rest);
    Ok((status, body))
}

/// `GET path` on `s`, expecting 200 and `expected` as the body.
fn get_expect(s: &mut (impl Read + Write), path: &str, expected: &[u8]) -> Result<(), String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| format!("write request: {e}"))?;
    let (status, body) = read_response(s)?;
    if status != 200 || body != expected {
        return Err(format!(
            "GET {path}: status {status}, body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
    }
    Ok(())
}

/// http and https: keep-alive `GET /index.html` per round on a persistent connection, plus a
/// fresh connection with `GET /healthz` every 5th round.
struct HttpClient {
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    conn: Option<EchoConn>,
    seq: u64,
}

impl HttpClient {
    fn new(addr: SocketAddr, tls: bool) -> HttpClient {
        HttpClient {
            addr,
            tls: tls.then(accept_any_cert_config),
            conn: None,
            seq: 0,
        }
    }

    fn open(&self) -> Result<EchoConn, String> {
        match &self.tls {
            Some(config) => tls_from(HEALTHY_IP, self.addr, config)
                .map(|s| EchoConn::Tls(Box::new(s)))
                .map_err(|e| format!("tls connect: {e}")),
            None => tcp_from(HEALTHY_IP, self.addr)
                .map(EchoConn::Tcp)
                .map_err(|e| format!("connect: {e}")),
        }
    }
}

fn get_on(conn: &mut EchoConn, path: &str, expected: &[u8]) -> Result<(), String> {
    match conn {
        EchoConn::Tcp(s) => get_expect(s, path, expected),
        EchoConn::Tls(s) => get_expect(s.as_mut(), path, expected),
    }
}

impl HealthyClient for HttpClient {
    fn round(&mut self) -> Result<(), String> {
        self.seq += 1;
        if self.seq.is_multiple_of(5) {
            let mut fresh = self.open().map_err(|e| format!("fresh connection: {e}"))?;
            return get_on(&mut fresh, "/healthz", b"ok")
                .map_err(|e| format!("fresh connection: {e}"));
        }
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = get_on(conn, "/index.html", INDEX.as_bytes());
        if result.is_err() {
            self.conn = None;
        }
        result.map_err(|e| format!("keep-alive connection: {e}"))
    }
}

/// Two chat members; A sends `healthy <seq>` per round and B must receive exactly that line
/// next among the healthy lines (attack lines are skipped). Both read all the time, on their
/// own threads, so neither becomes a non-reader whatever the attack sends.
struct ChatClient {
    addr: SocketAddr,
    members: Option<ChatPair>,
    seq: u64,
}

struct ChatPair {
    a: TcpStream,
    b: TcpStream,
    lines: Receiver<String>,
}

impl Drop for ChatPair {
    fn drop(&mut self) {
        // Ends the two reader threads.
        let _ = self.a.shutdown(Shutdown::Both);
        let _ = self.b.shutdown(Shutdown::Both);
    }
}

impl ChatClient {
    fn new(addr: SocketAddr) -> ChatClient {
        ChatClient {
            addr,
            members: None,
            seq: 0,
        }
    }

    fn join(&self) -> Result<ChatPair, String> {
        let a = tcp_from(HEALTHY_IP, self.addr).map_err(|e| format!("chat A connect: {e}"))?;
        let b = tcp_from(HEALTHY_IP, self.addr).map_err(|e| format!("chat B connect: {e}"))?;
        let mut a_reader = a.try_clone().map_err(|e| e.to_string())?;
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match a_reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        let (tx, lines) = mpsc::channel();
        let b_reader = b.try_clone().map_err(|e| e.to_string())?;
        thread::spawn(move || {
            let mut reader = BufReader::with_capacity(256 * 1024, b_reader);
            let mut line = Vec::new();
            loop {
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => return,
                    Ok(_) if line.ends_with(b"\n") => {
                        if line.starts_with(b"healthy ") {
                            let text = String::from_utf8_lossy(&line).trim_end().to_string();
                            if tx.send(text).is_err() {
                                return;
                            }
                        }
                        line.clear();
                    }
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        // Let the server register both members before the first line.
        thread::sleep(Duration::from_millis(300));
        Ok(ChatPair { a, b, lines })
    }
}

impl HealthyClient for ChatClient {
    fn round(&mut self) -> Result<(), String> {
        self.seq += 1;
        if self.members.is_none() {
            self.members = Some(self.join()?);
        }
        let pair = self.members.as_mut().expect("joined above");
        let expected = format!("healthy {:08}", self.seq);
        let result = (|| {
            pair.a
                .write_all(format!("{expected}\n").as_bytes())
                .map_err(|e| format!("A writing: {e}"))?;
            // B forwards only the healthy lines, so the next one must be this round's.
            match pair.lines.recv_timeout(Duration::from_secs(15)) {
                Ok(line) if line == expected => Ok(()),
                Ok(line) => Err(format!("B got {line:?} while waiting for {expected:?}")),
                Err(RecvTimeoutError::Timeout) => {
                    Err(format!("B did not get {expected:?} within 15 s"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Err(format!("B was disconnected waiting for {expected:?}"))
                }
            }
        })();
        if result.is_err() {
            self.members = None;
        }
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Attack tools
// ---------------------------------------------------------------------------------------------

/// Runs `plexus bench ARGS` as a child process (bounded: killed by PID if it overruns) on a
/// thread; the handle yields its JSON summary line.
fn bench(args: Vec<String>) -> JoinHandle<serde_json::Value> {
    thread::spawn(move || {
        let mut full = vec!["bench".to_string()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = run_plexus(&refs, None, ATTACK_TIME + Duration::from_secs(60));
        out.assert_no_panic();
        let code = out.code();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        match json {
            Some(json) if code == 0 || code == 1 => json,
            _ => panic!(
                "`plexus {}` exited {code} without a JSON summary; stderr:\n{}",
                full.join(" "),
                out.stderr
            ),
        }
    })
}

/// Arguments for a bench flood against `addr` for [`ATTACK_TIME`] from 3 sources.
fn flood_args(mode: &str, addr: SocketAddr, connections: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        mode,
        "--addr",
        &addr.to_string(),
        "--connections",
        &connections.to_string(),
        "--sources",
        "3",
        "--warmup",
        "0s",
        "--duration",
        &format!("{}s", ATTACK_TIME.as_secs()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The JSON values of several bench runs, joined, as one short report.
fn join_benches(runs: Vec<(&str, JoinHandle<serde_json::Value>)>, keys: &[&str]) -> String {
    runs.into_iter()
        .map(|(what, handle)| {
            let json = handle.join().expect("bench thread panicked");
            let fields: Vec<String> = keys.iter().map(|k| format!("{k}={}", json[k])).collect();
            format!("{what}: {}", fields.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The address of hand-written attacker `i` (127.0.0.2-127.0.0.4).
fn attacker(i: usize) -> IpAddr {
    ATTACK_IPS[1 + i % 3]
}

/// Runs `f(i, deadline)` on `n` threads until the deadline; returns the sum of their counts.
fn swarm(n: usize, f: impl Fn(usize, Instant) -> u64 + Send + Sync + 'static) -> u64 {
    let deadline = Instant::now() + ATTACK_TIME;
    let f = Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let f = Arc::clone(&f);
            thread::spawn(move || f(i, deadline))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("attack thread panicked"))
        .sum()
}

/// Resets the connection on close (SO_LINGER 0).
fn reset_on_drop(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// The first flight of a rustls client (its ClientHello record).
fn client_hello() -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(accept_any_cert_config(), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ClientHello to memory");
    }
    out
}

/// Holds `socks` until the attack deadline, then drops them; returns how many the server had
/// closed by then (EOF or reset).
fn hold_and_count_closed(socks: &mut [TcpStream], deadline: Instant) -> u64 {
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let mut closed = 0;
    let mut buf = [0u8; 4096];
    for s in socks.iter_mut() {
        let _ = s.set_nonblocking(true);
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    closed
}

// ---------------------------------------------------------------------------------------------
// The attacks
// ---------------------------------------------------------------------------------------------

/// Slowloris: HTTP request heads dribbled a byte every 100 ms from 240 connections (3
/// sources) at the http and auto listeners, and inside TLS at https; `header_timeout` (3 s)
/// ends each with a 408 and per-IP caps keep the rest out.
#[test]
fn slowloris() {
    run_attack("slowloris", |fx| {
        let interval = ["--interval", "100ms"];
        let runs = vec![
            (
                "http",
                bench(flood_args("slowloris", fx.addr("http"), 120, &interval)),
            ),
            (
                "auto",
                bench(flood_args("slowloris", fx.addr("auto"), 120, &interval)),
            ),
        ];
        let https = fx.addr("https");
        let tls_dribbled = swarm(3, move |i, deadline| {
            let config = accept_any_cert_config();
            let mut socks: Vec<Tls> = (0..10)
                .filter_map(|_| tls_from(ATTACK_IPS[3], https, &config).ok())
                .collect();
            let head = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".repeat(100);
            let mut sent = 0u64;
            let mut k = 0;
            while Instant::now() < deadline {
                for s in &mut socks {
                    if s.write_all(&head[k % head.len()..][..1]).is_ok() && s.flush().is_ok() {
                        sent += 1;
                    }
                }
                k += 1;
                thread::sleep(Duration::from_millis(100 + i as u64));
            }
            sent
        });
        let report = join_benches(runs, &["opened", "closed_by_server", "responses"]);
        format!("{report}; https (TLS) bytes dribbled={tls_dribbled}")
    });
}

/// Idle floods past every cap: silent TCP connections to every stream listener and idle TLS
/// sessions (3 sources, 800 connections, far past `max_connections_per_ip` = 40 and
/// `max_connections` = 300), plus UDP sessions from 300 source addresses and from 300 ports
/// of one address, kept alive until the attack ends (past the datagram share of `max_connections`: datagram
/// sessions must not lock out the stream transports).
#[test]
fn idle_floods() {
    run_attack("idle-floods", |fx| {
        let mut runs = Vec::new();
        for (name, n) in [
            ("tcp-echo", 300),
            ("http", 100),
            ("chat", 100),
            ("auto", 100),
        ] {
            runs.push((name, bench(flood_args("idle-flood", fx.addr(name), n, &[]))));
        }
        for name in ["tls-echo", "https"] {
            let tls = ["--tls", "--insecure"];
            runs.push((
                name,
                bench(flood_args("idle-flood", fx.addr(name), 100, &tls)),
            ));
        }
        let udp = fx.addr("udp-echo");
        let datagrams = swarm(2, move |i, deadline| {
            // Thread 0: 300 source addresses 127.0.4.x/127.0.5.x; thread 1: 300 ports of 127.0.0.4.
            let socks: Vec<UdpSocket> = (0..300u32)
                .filter_map(|k| {
                    let ip = if i == 0 {
                        IpAddr::V4(Ipv4Addr::new(
                            127,
                            0,
                            4 + (k / 250) as u8,
                            1 + (k % 250) as u8,
                        ))
                    } else {
                        ATTACK_IPS[3]
                    };
                    let s = UdpSocket::bind(SocketAddr::new(ip, 0)).ok()?;
                    s.connect(udp).ok()?;
                    s.set_nonblocking(true).ok()?;
                    Some(s)
                })
                .collect();
            let mut sent = 0u64;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                for s in &socks {
                    if s.send(b"idle").is_ok() {
                        sent += 1;
                    }
                    while s.recv(&mut buf).is_ok() {}
                }
                // Less than idle_timeout: every session stays, never expires.
                thread::sleep(Duration::from_secs(2));
            }
            sent
        });
        let report = join_benches(
            runs,
            &["opened", "closed_by_server", "still_open", "errors"],
        );
        format!("{report}; udp datagrams from 600 idle sources={datagrams}")
    });
}

/// Handshake floods: partial and complete TLS ClientHellos that never continue, and silent
/// TCP connections, at every TLS-speaking listener (tls-echo, https, auto) from 3 sources,
/// plus DTLS handshakes stalled after the cookie exchange (each holds a handshake slot). Per
/// source, the handshake slots are bounded, so the healthy client still gets one.
#[test]
fn handshake_floods() {
    run_attack("handshake-floods", |fx| {
        let runs = vec![
            (
                "tls-echo partial",
                bench(flood_args(
                    "handshake-flood",
                    fx.addr("tls-echo"),
                    100,
                    &["--partial", "--insecure"],
                )),
            ),
            (
                "https full",
                bench(flood_args(
                    "handshake-flood",
                    fx.addr("https"),
                    100,
                    &["--insecure"],
                )),
            ),
            (
                "auto partial",
                bench(flood_args(
                    "handshake-flood",
                    fx.addr("auto"),
                    100,
                    &["--partial", "--insecure"],
                )),
            ),
            (
                "tls-echo silent",
                bench(flood_args("idle-flood", fx.addr("tls-echo"), 100, &[])),
            ),
            (
                "https silent",
                bench(flood_args("idle-flood", fx.addr("https"), 100, &[])),
            ),
        ];
        let dtls = fx.addr("dtls-echo");
        let stalled = swarm(3, move |i, deadline| {
            // Up to 30 at a time per source, each replaced once the server's handshake_timeout
            // (5 s) must have ended it.
            let mut held: Vec<(Instant, UdpSocket)> = Vec::new();
            let mut made = 0u64;
            while Instant::now() < deadline {
                held.retain(|(at, _)| at.elapsed() < Duration::from_secs(6));
                if held.len() < 30 {
                    if let Some(s) = stalled_dtls_handshake(attacker(i), dtls) {
                        held.push((Instant::now(), s));
                        made += 1;
                    }
                } else {
                    thread::sleep(Duration::from_millis(100));
                }
            }
            made
        });
        let report = join_benches(runs, &["opened", "closed_by_server", "still_open"]);
        format!("{report}; stalled dtls handshakes={stalled}")
    });
}

/// A DTLS handshake that stops right after the cookie exchange: the ClientHello with the
/// cookie is sent (the server opens a session and takes a handshake slot), the server's flight
/// is never read. The socket is returned so it stays bound.
fn stalled_dtls_handshake(from: IpAddr, to: SocketAddr) -> Option<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).ok()?;
    sock.connect(to).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let reader = sock.try_clone().ok()?;
    /// Passes the first datagram received (the HelloVerifyRequest) and then nothing.
    struct FirstOnly(Udp, bool);
    impl Read for FirstOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = self.0.read(buf)?;
            self.1 = true;
            Ok(n)
        }
    }
    impl Write for FirstOnly {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut builder = SslConnector::builder(SslMethod::dtls()).ok()?;
    builder.set_verify(SslVerifyMode::NONE);
    builder.set_options(SslOptions::NO_QUERY_MTU);
    let config = builder.build().configure().ok()?.verify_hostname(false);
    let mut ssl = config.into_ssl("localhost").ok()?;
    ssl.set_mtu(1200).ok()?;
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, FirstOnly(Udp(reader), false)).ok()?;
    // 1: ClientHello, WANT_READ; 2: HelloVerifyRequest read, ClientHello + cookie sent; then
    // nothing more is read.
    for _ in 0..3 {
        if stream.do_handshake().is_ok() {
            break;
        }
    }
    stream.get_ref().1.then_some(sock)
}

/// Spoofed DTLS hello floods: cookieless ClientHellos from 2,000 addresses of 127.0.0.0/8 at
/// 4,000 per second; each gets a stateless HelloVerifyRequest and nothing else.
#[test]
fn spoofed_dtls_hello_flood() {
    run_attack("spoofed-dtls-hello-flood", |fx| {
        let args = vec![
            "dtls-hello-flood".to_string(),
            "--addr".into(),
            fx.addr("dtls-echo").to_string(),
            "--sources".into(),
            "2000".into(),
            "--rate".into(),
            "4000".into(),
            "--warmup".into(),
            "0s".into(),
            "--duration".into(),
            format!("{}s", ATTACK_TIME.as_secs()),
        ];
        join_benches(
            vec![("dtls-echo", bench(args))],
            &[
                "datagrams",
                "hello_verify_requests",
                "other_replies",
                "amplification",
            ],
        )
    });
}

/// The garbage datagrams sent at udp and dtls ports, in turn.
fn garbage_datagram(k: u64) -> Vec<u8> {
    let random = random_bytes(1 + (k as usize * 7919) % 1400, k);
    match k % 7 {
        0 => vec![0x16],
        1 => random,
        // A DTLS handshake record header claiming 256 bytes, with 20.
        2 => [
            &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0x00][..],
            &random[..random.len().min(20)],
        ]
        .concat(),
        // An application-data record of epoch 1 with random "ciphertext".
        3 => [
            &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 64][..],
            &random_bytes(64, k)[..],
        ]
        .concat(),
        // A ClientHello cut in half.
        4 => {
            static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
            let hello = HELLO.get_or_init(dtls_client_hello);
            hello[..hello.len() / 2].to_vec()
        }
        // An alert record in epoch 0 (a fatal handshake_failure).
        5 => vec![21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 2, 40],
        _ => Vec::new(),
    }
}

/// A real first DTLS flight (cookieless ClientHello) from OpenSSL.
fn dtls_client_hello() -> Vec<u8> {
    #[derive(Default)]
    struct Capture(Vec<Vec<u8>>);
    impl Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(ErrorKind::WouldBlock.into())
        }
    }
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let connector = SslConnector::builder(SslMethod::dtls()).unwrap().build();
    let mut ssl = connector
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Capture::default()).unwrap();
    assert!(stream.do_handshake().is_err(), "needs the server's reply");
    stream.get_mut().0.remove(0)
}

/// Garbage datagrams at every udp/dtls port: 1-byte, empty, random, truncated records, a
/// half ClientHello, stray alerts and epoch-1 records, from fixed sockets and from a new
/// source port every time, about 2,000 a second.
#[test]
fn garbage_datagrams() {
    run_attack("garbage-datagrams", |fx| {
        let targets = [fx.addr("udp-echo"), fx.addr("dtls-echo")];
        let sent = swarm(3, move |i, deadline| {
            let from = attacker(i);
            let fixed: Vec<UdpSocket> = (0..4)
                .filter_map(|_| {
                    let s = UdpSocket::bind(SocketAddr::new(from, 0)).ok()?;
                    s.set_nonblocking(true).ok()?;
                    Some(s)
                })
                .collect();
            let mut k = i as u64 * 1_000_000;
            let mut sent = 0u64;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                for _ in 0..20 {
                    k += 1;
                    let target = targets[(k % 2) as usize];
                    let datagram = garbage_datagram(k);
                    let result = if k.is_multiple_of(3) {
                        // A new source port: a new peer for the server every time.
                        UdpSocket::bind(SocketAddr::new(from, 0))
                            .and_then(|s| s.send_to(&datagram, target))
                    } else {
                        fixed[(k % 4) as usize % fixed.len()].send_to(&datagram, target)
                    };
                    sent += u64::from(result.is_ok());
                }
                for s in &fixed {
                    while s.recv(&mut buf).is_ok() {}
                }
                thread::sleep(Duration::from_millis(30));
            }
            sent
        });
        format!("garbage datagrams sent={sent}")
    });
}

/// RST storms: connections to every stream listener that send part of a request (or a
/// ClientHello, or a full https request whose 4 MiB response is underway) and are then reset
/// (SO_LINGER 0), over and over from 3 sources.
#[test]
fn rst_storms() {
    run_attack("rst-storms", |fx| {
        let targets: Vec<(&'static str, SocketAddr)> =
            ["tcp-echo", "tls-echo", "http", "https", "chat", "auto"]
                .iter()
                .map(|n| (*n, fx.addr(n)))
                .collect();
        let resets = swarm(3, move |i, deadline| {
            let from = attacker(i);
            let hello = client_hello();
            let config = accept_any_cert_config();
            let mut n = 0u64;
            let mut k = 0usize;
            while Instant::now() < deadline {
                k += 1;
                let (name, addr) = targets[k % targets.len()];
                if name == "https" && (k / targets.len()).is_multiple_of(2) {
                    // A full request over TLS, reset while the big response streams.
                    if let Ok(mut s) = tls_from(from, addr, &config) {
                        let _ = s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n");
                        let _ = s.flush();
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        reset_on_drop(&s.sock);
                        n += 1;
                    }
                    continue;
                }
                let Ok(mut s) = tcp_from(from, addr) else {
                    continue;
                };
                let partial: Vec<u8> = match name {
                    "tcp-echo" => random_bytes(4096, k as u64),
                    "tls-echo" | "https" => hello[..hello.len() * (k % 2 + 1) / 2].to_vec(),
                    "http" => b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /ind".to_vec(),
                    "chat" => b"a whole line\nhalf a li".to_vec(),
                    _ => b"GET / HT".to_vec(),
                };
                let _ = s.write_all(&partial);
                if name == "http" {
                    // Let the response start before the reset.
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                }
                reset_on_drop(&s);
                drop(s);
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            n
        });
        format!("connections reset={resets}")
    });
}

/// Half-open connections: every stream listener gets connections that send part of
/// something (half a TLS record after the handshake, half a request head, a line without its
/// newline, 2 bytes to auto) and then neither finish nor shut down their write side; held for
/// the whole attack, past every timeout.
#[test]
fn half_open_connections() {
    run_attack("half-open", |fx| {
        let targets: Vec<(&'static str, SocketAddr)> =
            ["tcp-echo", "tls-echo", "http", "https", "chat", "auto"]
                .iter()
                .map(|n| (*n, fx.addr(n)))
                .collect();
        let total = Arc::new(AtomicU64::new(0));
        let opened = Arc::clone(&total);
        let closed = swarm(3, move |i, deadline| {
            let from = attacker(i);
            let config = accept_any_cert_config();
            let mut socks = Vec::new();
            for (name, addr) in &targets {
                for _ in 0..5 {
                    let opened_one = (|| -> io::Result<TcpStream> {
                        if name.starts_with("tls") || *name == "https" {
                            let mut s = tls_from(from, *addr, &config)?;
                            if *name == "https" {
                                s.write_all(b"GET / HTTP/1.1\r\nHost: loc")?;
                                s.flush()?;
                            }
                            // Half of an application-data record: header claims 1000 bytes.
                            let mut record = vec![23, 3, 3, 0x03, 0xe8];
                            record.extend_from_slice(&random_bytes(400, 7));
                            s.sock.write_all(&record)?;
                            return Ok(s.sock);
                        }
                        let mut s = tcp_from(from, *addr)?;
                        let part: &[u8] = match *name {
                            "tcp-echo" => b"no end in sight",
                            "http" => b"GET /index.html HTTP/1.1\r\nHost: loc",
                            "chat" => b"a line that never ends",
                            _ => b"GE",
                        };
                        s.write_all(part)?;
                        Ok(s)
                    })();
                    if let Ok(s) = opened_one {
                        socks.push(s);
                        opened.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            hold_and_count_closed(&mut socks, deadline)
        });
        format!(
            "half-open connections={} closed by the server within the attack={closed}",
            total.load(Ordering::SeqCst)
        )
    });
}

/// Slow readers on every service: echo and tls echo peers that write a lot and read 512
/// bytes every 100 ms, http and https peers that pipeline `GET /big.bin` (4 MiB) four times
/// and read slowly, chat members that read slowly while another member sends 1 KiB lines.
#[test]
fn slow_readers() {
    run_attack("slow-readers", |fx| {
        let targets: Vec<(&'static str, SocketAddr)> =
            ["tcp-echo", "tls-echo", "http", "https", "chat", "auto"]
                .iter()
                .map(|n| (*n, fx.addr(n)))
                .collect();
        let chat = fx.addr("chat");
        let talker = thread::spawn(move || {
            // The other chat member: 1 KiB lines at about 2 MB/s.
            let deadline = Instant::now() + ATTACK_TIME;
            let Ok(mut s) = tcp_from(ATTACK_IPS[1], chat) else {
                return 0u64;
            };
            let mut drain = s.try_clone().expect("clone");
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
            });
            let mut line = vec![b's'; 1023];
            line.push(b'\n');
            let mut sent = 0u64;
            while Instant::now() < deadline {
                if s.write_all(&line.repeat(20)).is_err() {
                    break;
                }
                sent += 20 * 1024;
                thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        let read = swarm(3, move |i, deadline| {
            let from = attacker(i);
            let config = accept_any_cert_config();
            let mut readers: Vec<SlowReader> = Vec::new();
            for (name, addr) in &targets {
                for _ in 0..3 {
                    if let Some(r) = SlowReader::open(name, from, *addr, &config) {
                        readers.push(r);
                    }
                }
            }
            let mut read = 0;
            while Instant::now() < deadline {
                for r in &mut readers {
                    read += r.tick();
                }
                thread::sleep(Duration::from_millis(100));
            }
            read
        });
        let chat_sent = talker.join().expect("chat talker");
        format!("bytes read by slow readers={read}; chat bytes sent by the talker={chat_sent}")
    });
}

/// A peer that keeps the server's output queued: writes what it can, reads 512 bytes a tick.
struct SlowReader {
    sock: TcpStream,
    tls: Option<ClientConnection>,
    /// What to write on each tick (empty for http/chat after the first requests).
    feed: Vec<u8>,
    closed: bool,
}

impl SlowReader {
    fn open(
        name: &str,
        from: IpAddr,
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
    ) -> Option<SlowReader> {
        let sock = connect_socket(addr, Some(from), Some(4096)).ok()?;
        let (sock, tls) = if name == "tls-echo" || name == "https" {
            let tls = tls_on(sock, config).ok()?;
            (tls.sock, Some(tls.conn))
        } else {
            (sock, None)
        };
        let mut r = SlowReader {
            sock,
            tls,
            feed: Vec::new(),
            closed: false,
        };
        let get = b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4);
        match name {
            "http" | "https" => r.write(&get),
            "chat" => {}
            _ => r.feed = random_bytes(16 * 1024, 99),
        }
        r.sock.set_nonblocking(true).ok()?;
        Some(r)
    }

    /// Writes `data` (plaintext), blocking.
    fn write(&mut self, data: &[u8]) {
        match &mut self.tls {
            Some(tls) => {
                let _ = tls.writer().write_all(data);
                while tls.wants_write() {
                    if tls.write_tls(&mut self.sock).is_err() {
                        break;
                    }
                }
            }
            None => {
                let _ = self.sock.write_all(data);
            }
        }
    }

    /// One tick: push more input (non-blocking, as much as fits), read at most 512 bytes.
    fn tick(&mut self) -> u64 {
        if self.closed {
            return 0;
        }
        if !self.feed.is_empty() {
            match &mut self.tls {
                Some(tls) => {
                    if !tls.wants_write() {
                        let _ = tls.writer().write(&self.feed);
                    }
                    while tls.wants_write() {
                        if tls.write_tls(&mut self.sock).is_err() {
                            break;
                        }
                    }
                }
                None => {
                    let _ = self.sock.write(&self.feed);
                }
            }
        }
        let mut buf = [0u8; 512];
        match self.sock.read(&mut buf) {
            Ok(0) => {
                self.closed = true;
                0
            }
            Ok(n) => {
                if let Some(tls) = &mut self.tls {
                    let mut slice = &buf[..n];
                    while !slice.is_empty() {
                        if tls.read_tls(&mut slice).is_err() || tls.process_new_packets().is_err() {
                            self.closed = true;
                            break;
                        }
                        let mut plain = [0u8; 16384];
                        while matches!(tls.reader().read(&mut plain), Ok(n) if n > 0) {}
                    }
                }
                n as u64
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => {
                self.closed = true;
                0
            }
        }
    }
}

/// Garbage TLS records after a completed handshake, at tls-echo, https and auto (TLS
/// detected): random ciphertext in an application-data record, a bogus handshake record, an
/// oversized record header, plain noise; and garbage datagrams on established DTLS sessions.
#[test]
fn garbage_tls_records_after_handshake() {
    run_attack("garbage-tls-records", |fx| {
        let targets = [fx.addr("tls-echo"), fx.addr("https"), fx.addr("auto")];
        let dtls = fx.addr("dtls-echo");
        let dtls_thread = thread::spawn(move || {
            let deadline = Instant::now() + ATTACK_TIME;
            let mut k = 0u64;
            while Instant::now() < deadline {
                let Ok(mut s) = dtls_connect(ATTACK_IPS[3], dtls, Duration::from_secs(5)) else {
                    continue;
                };
                for _ in 0..20 {
                    k += 1;
                    let _ = s.get_ref().0.send(&garbage_datagram(k));
                }
                // Its own session may survive the garbage or not; only others matter here.
                let _ = dtls_echo(&mut s, b"after garbage");
            }
            k
        });
        let sent = swarm(3, move |i, deadline| {
            let from = attacker(i);
            let config = accept_any_cert_config();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let addr = targets[n as usize % targets.len()];
                let Ok(mut s) = tls_from(from, addr, &config) else {
                    continue;
                };
                let garbage: Vec<u8> = match n % 4 {
                    0 => [&[23, 3, 3, 0, 200][..], &random_bytes(200, n)[..]].concat(),
                    1 => [&[22, 3, 3, 0, 64][..], &random_bytes(64, n)[..]].concat(),
                    2 => vec![23, 3, 3, 0x48, 0x01, 1, 2, 3],
                    _ => random_bytes(300, n),
                };
                let _ = s.sock.write_all(&garbage);
                let _ = drain_until_closed(&mut s.sock, Duration::from_secs(5));
            }
            n
        });
        let dtls_garbage = dtls_thread.join().expect("dtls garbage thread");
        format!("tls connections with garbage={sent}; garbage datagrams on dtls sessions={dtls_garbage}")
    });
}

/// Chat non-readers: three members that never read (4 KiB receive buffers) while another
/// member sends 8 MiB of 1-byte lines; each non-reader must be dropped at its outbound limit
/// with bounded memory, and the healthy members keep getting every line.
#[test]
fn chat_non_readers() {
    run_attack("chat-non-readers", |fx| {
        let chat = fx.addr("chat");
        let non_readers: Vec<TcpStream> = (0..3)
            .filter_map(|i| connect_socket(chat, Some(attacker(i)), Some(4096)).ok())
            .collect();
        thread::sleep(Duration::from_millis(300));
        let deadline = Instant::now() + ATTACK_TIME;
        let mut sender = tcp_from(ATTACK_IPS[1], chat).expect("chat sender");
        let mut drain = sender.try_clone().expect("clone");
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
        });
        let chunk = b"x\n".repeat(32 * 1024);
        let mut sent = 0u64;
        while sent < 8 * MIB && Instant::now() < deadline {
            if sender.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let mut held = non_readers;
        let closed = hold_and_count_closed(&mut held, Instant::now());
        format!(
            "1-byte lines sent={} ({sent} bytes) non-readers={} closed by the server={closed}",
            sent / 2,
            held.len()
        )
    });
}
