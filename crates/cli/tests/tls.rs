//! End-to-end tests of `transport = "tls"` listeners: interop with `openssl s_client`, rustls
//! clients (protocol versions, ALPN, resumption, SNI), silent and garbage clients, a slow reader
//! through the TLS echo, certificate reload on SIGHUP, the ephemeral certificate, orderly close
//! (close_notify) and the SIGTERM drain.
//!
//! Certificates are generated with rcgen into temporary directories. Every wait is bounded and
//! every process started here is killed by PID.

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, RootCertStore, StreamOwned,
    SupportedProtocolVersion,
};

use common::*;
use plexus_testkit::accept_any_cert_config;

/// A client TLS stream over a blocking socket (with the harness's read/write timeouts).
type Tls = StreamOwned<ClientConnection, TcpStream>;

const TLS12: &SupportedProtocolVersion = &rustls::version::TLS12;
const TLS13: &SupportedProtocolVersion = &rustls::version::TLS13;
const BOTH: &[&SupportedProtocolVersion] = &[TLS13, TLS12];

// ---------------------------------------------------------------------------------------------
// Certificates and configs
// ---------------------------------------------------------------------------------------------

/// A generated certificate and key, written as PEM files.
struct TestCert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl TestCert {
    /// A self-signed certificate for `names` (DNS names or IP addresses).
    fn new(names: &[&str]) -> TestCert {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .expect("rcgen: generate certificate");
        TestCert {
            der: ck.cert.der().clone(),
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
        }
    }

    /// A certificate for localhost and 127.0.0.1.
    fn localhost() -> TestCert {
        TestCert::new(&["localhost", "127.0.0.1"])
    }

    /// Writes `<stem>.pem` and `<stem>.key` into `dir`; returns (cert path, key path).
    fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        self.write_to(&cert, &key);
        (cert, key)
    }

    /// (Over)writes the PEM files at the given paths.
    fn write_to(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.cert_pem).expect("write cert PEM");
        std::fs::write(key, &self.key_pem).expect("write key PEM");
    }
}

/// A TOML string literal for a path.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("UTF-8 temp path"))
}

/// A `[tls]` table with a default certificate (no SNI entries).
fn tls_table(cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\ncert = {}\nkey = {}\n",
        toml_path(cert),
        toml_path(key)
    )
}

/// A config with one tls echo listener `tls-echo`. `server_extra` goes into `[server]`,
/// `tls` is the `[tls]` table (and `[[tls.sni]]` tables) or empty for the ephemeral
/// certificate, `listener_extra` goes into the `[[listener]]` table.
fn tls_config(server_extra: &str, tls: &str, listener_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
{server_extra}

{tls}

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"
{listener_extra}
"#
    )
}

/// Starts a server with a tls echo listener using `cert` (written into a fresh tempdir, which
/// is returned so it lives as long as the server).
fn start_with_cert(
    cert: &TestCert,
    server_extra: &str,
    listener_extra: &str,
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir for certificates");
    let (c, k) = cert.write(dir.path(), "cert");
    let server = Server::start(&tls_config(
        server_extra,
        &tls_table(&c, &k),
        listener_extra,
    ));
    (server, dir)
}

// ---------------------------------------------------------------------------------------------
// rustls client helpers
// ---------------------------------------------------------------------------------------------

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// A client config trusting exactly `roots`, restricted to `versions`, offering `alpn`.
fn client_config(
    roots: &[&CertificateDer<'static>],
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).expect("add root certificate");
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_string())
        .unwrap_or_else(|e| panic!("invalid server name {name:?}: {e}"))
}

/// Connects and completes a TLS handshake (blocking, bounded by the socket timeouts).
fn try_tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> io::Result<Tls> {
    let mut sock = try_connect(addr)?;
    let mut conn =
        ClientConnection::new(Arc::clone(config), server_name(name)).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(StreamOwned::new(conn, sock))
}

/// [`try_tls_connect`] that panics on failure.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> Tls {
    try_tls_connect(addr, config, name)
        .unwrap_or_else(|e| panic!("TLS connect to {addr} as {name:?}: {e}"))
}

/// The rustls error inside an I/O error, if there is one.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Writes `msg` and checks the same bytes come back.
fn tls_echo(stream: &mut Tls, msg: &[u8]) -> Result<(), String> {
    let what = String::from_utf8_lossy(msg);
    stream
        .write_all(msg)
        .and_then(|()| stream.flush())
        .map_err(|e| format!("write {what:?}: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("read echo of {what:?}: {e}"))?;
    if back != msg {
        return Err(format!(
            "echo mismatch: sent {what:?}, got {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    Ok(())
}

/// [`tls_echo`] that panics on failure.
fn assert_tls_echo(stream: &mut Tls, msg: &[u8]) {
    tls_echo(stream, msg).unwrap_or_else(|e| panic!("TLS echo: {e}"));
}

/// The leaf certificate the server presented.
fn leaf(stream: &Tls) -> CertificateDer<'static> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server presented no certificate")
        .clone()
}

/// Sends close_notify and flushes it (best effort).
fn tls_close(stream: &mut Tls) {
    stream.conn.send_close_notify();
    while stream.conn.wants_write() {
        if stream.conn.write_tls(&mut stream.sock).is_err() {
            break;
        }
    }
}

/// Lowercase hex SHA-256 of `data` (aws-lc-rs through the rustls provider).
fn sha256_hex(data: &[u8]) -> String {
    let suite = match aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256 {
        rustls::SupportedCipherSuite::Tls13(s) => s,
        _ => unreachable!("a TLS 1.3 suite"),
    };
    suite
        .common
        .hash_provider
        .hash(data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first bytes a rustls client sends: its ClientHello record(s).
fn client_hello_bytes() -> Vec<u8> {
    let cert = TestCert::localhost();
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mut conn = ClientConnection::new(config, server_name("localhost")).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .expect("write ClientHello to memory");
    }
    assert!(
        out.len() > 100 && out[0] == 0x16,
        "unexpected ClientHello bytes"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Raw socket helpers
// ---------------------------------------------------------------------------------------------

/// Waits up to `within` for the server to close `stream` (EOF or reset), discarding anything
/// it sends (e.g. an alert). Returns how long it took from the call.
fn time_to_close(stream: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    drain_until_closed(stream, within).map(|_| start.elapsed())
}

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// A healthy TLS session echoing a line every 20 ms on a thread until `stop`; the thread
/// returns the number of round trips or the first failure.
fn spawn_healthy_session(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<u64, String>> {
    let mut stream = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut stream, b"healthy: first\n");
    thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tls_echo(&mut stream, format!("healthy {n}\n").as_bytes())
                .map_err(|e| format!("healthy session, round trip {n}: {e}"))?;
            n += 1;
            thread::sleep(Duration::from_millis(20));
        }
        tls_close(&mut stream);
        Ok(n)
    })
}

// ---------------------------------------------------------------------------------------------
// openssl s_client
// ---------------------------------------------------------------------------------------------

/// What an `openssl s_client` run produced.
struct SClient {
    /// Whether `expect` showed up on stdout.
    echoed: bool,
    /// Exit code if s_client exited by itself (`None` if the test killed it).
    exit: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `openssl s_client -quiet ... extra`, writes `input` to its stdin (kept open), and waits
/// up to `within` for `expect` on stdout or for s_client to exit; then kills it by PID.
fn s_client(
    addr: SocketAddr,
    extra: &[&str],
    input: &[u8],
    expect: &str,
    within: Duration,
) -> SClient {
    let mut child: Child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-quiet")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let pump = |mut pipe: Box<dyn Read + Send>, sink: Arc<Mutex<Vec<u8>>>| {
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let out_thread = pump(Box::new(child.stdout.take().unwrap()), Arc::clone(&stdout));
    let err_thread = pump(Box::new(child.stderr.take().unwrap()), Arc::clone(&stderr));
    let mut stdin = child.stdin.take().unwrap();
    // Give the handshake a moment so the line is sent as application data after it; s_client
    // buffers stdin until the handshake is done anyway.
    thread::sleep(Duration::from_millis(200));
    let _ = stdin.write_all(input);
    let _ = stdin.flush();

    let deadline = Instant::now() + within;
    let mut exit = None;
    let echoed = loop {
        if String::from_utf8_lossy(&stdout.lock().unwrap()).contains(expect) {
            break true;
        }
        if let Some(status) = child.try_wait().expect("try_wait s_client") {
            exit = Some(status.code().unwrap_or(-1));
            // Collect the last output before deciding.
            thread::sleep(Duration::from_millis(100));
            break String::from_utf8_lossy(&stdout.lock().unwrap()).contains(expect);
        }
        if Instant::now() > deadline {
            break false;
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let _ = child.kill(); // by PID; harmless if it already exited
    let _ = child.wait();
    let _ = out_thread.join();
    let _ = err_thread.join();
    let stdout = String::from_utf8_lossy(&stdout.lock().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    SClient {
        echoed,
        exit,
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `openssl s_client` with TLS 1.3 and with TLS 1.2 gets "ping" echoed (verifying the
/// certificate against the test CA for `localhost`); with TLS 1.1 the handshake fails, the
/// failure is logged, and the server goes on serving.
#[test]
fn openssl_s_client_interop() {
    let cert = TestCert::localhost();
    let (server, dir) = start_with_cert(&cert, "", "");
    let addr = server.addr("tls-echo");
    let ca = dir.path().join("cert.pem");
    let ca = ca.to_str().unwrap();

    for version in ["-tls1_3", "-tls1_2"] {
        let out = s_client(
            addr,
            &[
                version,
                "-CAfile",
                ca,
                "-servername",
                "localhost",
                "-verify_return_error",
            ],
            b"ping\n",
            "ping",
            Duration::from_secs(15),
        );
        assert!(
            out.echoed,
            "s_client {version}: no echo of \"ping\" (exit {:?})\nstdout:\n{}\nstderr:\n{}",
            out.exit, out.stdout, out.stderr
        );
        eprintln!("s_client {version}: echoed; stderr: {}", out.stderr.trim());
    }

    let mark = server.log_mark();
    let out = s_client(
        addr,
        &["-tls1_1", "-CAfile", ca, "-servername", "localhost"],
        b"ping\n",
        "ping",
        Duration::from_secs(10),
    );
    eprintln!(
        "s_client -tls1_1: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.exit, out.stdout, out.stderr
    );
    assert!(
        !out.echoed,
        "TLS 1.1 session was served: stdout:\n{}",
        out.stdout
    );
    let err = out.stderr.to_lowercase();
    assert!(
        out.exit.is_some_and(|c| c != 0)
            || err.contains("protocol")
            || err.contains("version")
            || err.contains("alert"),
        "s_client -tls1_1 neither failed nor reported a protocol/version error (exit {:?})",
        out.exit
    );
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "containing `tls handshake failed` after a TLS 1.1 ClientHello",
        |l| l.contains("tls handshake failed"),
    );

    // Still serving, both through openssl and rustls.
    let out = s_client(
        addr,
        &["-tls1_3", "-CAfile", ca, "-servername", "localhost"],
        b"again\n",
        "again",
        Duration::from_secs(15),
    );
    assert!(
        out.echoed,
        "after the TLS 1.1 attempt: no echo (exit {:?})\nstderr:\n{}",
        out.exit, out.stderr
    );
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mut s = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut s, b"rustls after tls1.1 attempt\n");
}

/// Rustls clients: TLS 1.3 and TLS 1.2 each negotiate that version and echo; ALPN "echo/1"
/// is agreed; a client offering only "h2" is refused with no_application_protocol.
#[test]
fn rustls_versions_and_alpn() {
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "", r#"alpn = ["echo/1", "http/1.1"]"#);
    let addr = server.addr("tls-echo");

    for (version, expected) in [
        (TLS13, ProtocolVersion::TLSv1_3),
        (TLS12, ProtocolVersion::TLSv1_2),
    ] {
        let config = client_config(&[&cert.der], &[version], &[]);
        let mut s = tls_connect(addr, &config, "localhost");
        assert_eq!(
            s.conn.protocol_version(),
            Some(expected),
            "negotiated version"
        );
        assert_eq!(leaf(&s), cert.der, "served certificate");
        assert_tls_echo(&mut s, format!("hello over {expected:?}\n").as_bytes());
        // Several records and a bigger message.
        let big: Vec<u8> = (0..100_000u64).map(pattern_byte).collect();
        assert_tls_echo(&mut s, &big);
        tls_close(&mut s);
    }

    // A client without ALPN is served (ALPN is optional for the client).
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mut s = tls_connect(addr, &config, "localhost");
    assert_eq!(s.conn.alpn_protocol(), None, "no ALPN offered, none agreed");
    assert_tls_echo(&mut s, b"no alpn\n");

    for version in [TLS13, TLS12] {
        let config = client_config(&[&cert.der], &[version], &["echo/1"]);
        let mut s = tls_connect(addr, &config, "localhost");
        assert_eq!(
            s.conn.alpn_protocol(),
            Some(&b"echo/1"[..]),
            "ALPN with {version:?}"
        );
        assert_tls_echo(&mut s, b"alpn echo/1\n");

        let config = client_config(&[&cert.der], &[version], &["h2"]);
        match try_tls_connect(addr, &config, "localhost") {
            Ok(mut s) => {
                let alpn = s.conn.alpn_protocol().map(<[u8]>::to_vec);
                panic!(
                    "{version:?}: client offering only h2 completed the handshake (ALPN {alpn:?}, \
                     echo: {:?})",
                    tls_echo(&mut s, b"h2?\n")
                )
            }
            Err(e) => {
                eprintln!("{version:?}: h2-only client refused: {e}");
                assert!(
                    matches!(
                        rustls_error(&e),
                        Some(rustls::Error::AlertReceived(
                            rustls::AlertDescription::NoApplicationProtocol
                        ))
                    ),
                    "{version:?}: expected a no_application_protocol alert, got: {e} ({:?})",
                    rustls_error(&e)
                );
            }
        }
    }
    let mut s = tls_connect(addr, &client_config(&[&cert.der], BOTH, &[]), "localhost");
    assert_tls_echo(&mut s, b"still serving\n");
}

/// Two consecutive connections sharing one ClientConfig: the second is resumed, with TLS 1.3
/// (ticket read after the handshake) and with TLS 1.2.
#[test]
fn session_resumption() {
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "", "");
    let addr = server.addr("tls-echo");

    for version in [TLS13, TLS12] {
        let config = client_config(&[&cert.der], &[version], &[]);
        let mut first = tls_connect(addr, &config, "localhost");
        assert!(
            matches!(
                first.conn.handshake_kind(),
                Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
            ),
            "{version:?}: first handshake: {:?}",
            first.conn.handshake_kind()
        );
        // Reading the echo also processes the NewSessionTicket(s) sent after the handshake.
        assert_tls_echo(&mut first, b"first\n");
        tls_close(&mut first);
        drop(first);

        let mut second = tls_connect(addr, &config, "localhost");
        assert_eq!(
            second.conn.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: second handshake with the same ClientConfig was not resumed"
        );
        assert_eq!(
            second.conn.protocol_version(),
            Some(if version == TLS13 {
                ProtocolVersion::TLSv1_3
            } else {
                ProtocolVersion::TLSv1_2
            })
        );
        assert_tls_echo(&mut second, b"second, resumed\n");
        tls_close(&mut second);
    }
}

/// 50 TCP connections that never send a byte do not hinder 200 TLS clients, and are closed at
/// the 2 s handshake timeout.
#[test]
fn silent_clients_time_out_without_blocking_others() {
    const SILENT: usize = 50;
    const CLIENTS: usize = 200;
    const THREADS: usize = 4;
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "handshake_timeout = \"2s\"", "");
    let addr = server.addr("tls-echo");
    let mark = server.log_mark();

    let opened = Instant::now();
    let silent: Vec<TcpStream> = (0..SILENT).map(|_| connect(addr)).collect();
    // Watch the silent sockets on a thread: for each, the time (since `opened`) it was closed.
    let watcher = thread::spawn(move || {
        let mut closed_at: Vec<Option<Duration>> = vec![None; SILENT];
        let mut unexpected: Vec<String> = Vec::new();
        for s in &silent {
            s.set_nonblocking(true).expect("nonblocking");
        }
        let limit = Duration::from_secs(15);
        let mut buf = [0u8; 1024];
        while closed_at.iter().any(Option::is_none) && opened.elapsed() < limit {
            for (i, mut s) in silent.iter().enumerate() {
                if closed_at[i].is_some() {
                    continue;
                }
                match s.read(&mut buf) {
                    Ok(0) => closed_at[i] = Some(opened.elapsed()),
                    Ok(n) => unexpected.push(format!("silent socket {i}: {n} bytes received")),
                    Err(e) if is_reset(&e) => closed_at[i] = Some(opened.elapsed()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => {
                        unexpected.push(format!("silent socket {i}: {e}"));
                        closed_at[i] = Some(opened.elapsed());
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        (closed_at, unexpected)
    });

    let config = client_config(&[&cert.der], BOTH, &[]);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let config = Arc::clone(&config);
            thread::spawn(move || -> Result<(), String> {
                for i in 0..CLIENTS / THREADS {
                    let mut s = try_tls_connect(addr, &config, "localhost")
                        .map_err(|e| format!("client {t}/{i}: handshake: {e}"))?;
                    tls_echo(&mut s, format!("client {t}/{i}\n").as_bytes())
                        .map_err(|e| format!("client {t}/{i}: {e}"))?;
                    tls_close(&mut s);
                }
                Ok(())
            })
        })
        .collect();
    let results: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("client thread"))
        .collect();
    let clients_done = opened.elapsed();
    let failures: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "TLS clients failed while {SILENT} silent connections were open: {failures:?}"
    );
    eprintln!("{CLIENTS} TLS clients done {clients_done:?} after the silent sockets opened");

    let (closed_at, unexpected) = watcher.join().expect("watcher thread");
    assert!(
        unexpected.is_empty(),
        "silent sockets: unexpected: {unexpected:?}"
    );
    let still_open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of {SILENT} silent connections still open after 15 s (handshake_timeout = 2s)"
    );
    let times: Vec<Duration> = closed_at.into_iter().flatten().collect();
    let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    eprintln!("silent connections closed between {min:?} and {max:?} after opening");
    assert!(
        min >= Duration::from_millis(1500),
        "a silent connection was closed after {min:?}, before the 2 s handshake timeout"
    );
    assert!(
        max <= Duration::from_secs(6),
        "the last silent connection was closed only after {max:?} (handshake_timeout = 2s)"
    );
    server.assert_log(
        mark,
        Duration::from_secs(2),
        "mentioning `handshake timeout`",
        |l| l.contains("handshake timeout"),
    );
}

/// 8 MiB through the TLS echo to a client that reads slowly: every byte comes back in order,
/// the client's close_notify is answered with close_notify, and the server's peak memory grows
/// by less than 4 MiB (backpressure with the outbound watermarks; a server without it would
/// buffer most of the 8 MiB).
#[test]
fn slow_reader_8mib_through_tls() {
    const TOTAL: u64 = 8 * MIB;
    const MAX_GROWTH_KIB: u64 = 4 * 1024;
    const CHUNK: usize = 16 * 1024;
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(
        &cert,
        "outbound_high_watermark = 262144\noutbound_low_watermark = 65536",
        "",
    );
    let addr = server.addr("tls-echo");
    let deadline = Instant::now() + Duration::from_secs(120);

    // Handshake on a blocking socket with a small receive buffer, then go non-blocking.
    let mut sock = connect_small_rcvbuf(addr, 64 * 1024);
    let mut conn = ClientConnection::new(
        client_config(&[&cert.der], BOTH, &[]),
        server_name("localhost"),
    )
    .expect("client connection");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("handshake");
    }
    let rss_before = rss_kib(server.pid());
    sock.set_nonblocking(true).expect("nonblocking");

    let mut out = vec![0u8; CHUNK];
    let mut inbuf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut read_since_pause = 0usize;
    // For the first 500 ms only write: a server without backpressure would then hold most of
    // what the client managed to send.
    let write_only_until = Instant::now() + Duration::from_millis(500);
    let mut tls_eof = false;
    while received < TOTAL {
        assert!(
            Instant::now() < deadline,
            "slow TLS transfer incomplete: sent {sent}, received {received} of {TOTAL}"
        );
        let mut progress = false;

        // Write: plaintext only when rustls has no TLS bytes left to flush.
        loop {
            while conn.wants_write() {
                match conn.write_tls(&mut sock) {
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write_tls after sending {sent}: {e}"),
                }
            }
            if conn.wants_write() || sent >= TOTAL {
                break;
            }
            let n = CHUNK.min((TOTAL - sent) as usize);
            fill_pattern(sent, &mut out[..n]);
            let accepted = conn.writer().write(&out[..n]).expect("buffer plaintext");
            sent += accepted as u64;
            if accepted == 0 {
                break;
            }
        }

        if Instant::now() < write_only_until {
            thread::sleep(Duration::from_millis(1));
            continue;
        }

        // Read: one read_tls, process, then drain the plaintext slowly.
        if !tls_eof {
            match conn.read_tls(&mut sock) {
                Ok(0) => tls_eof = true,
                Ok(_) => {
                    progress = true;
                    conn.process_new_packets()
                        .unwrap_or_else(|e| panic!("TLS error after {received} bytes: {e}"));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read_tls after {received} of {TOTAL} bytes: {e}"),
            }
        }
        loop {
            match conn.reader().read(&mut inbuf) {
                Ok(0) => panic!("close_notify from the server after {received} of {TOTAL} bytes"),
                Ok(n) => {
                    if let Err(at) = check_pattern(received, &inbuf[..n]) {
                        panic!("pattern mismatch at byte {at}");
                    }
                    received += n as u64;
                    progress = true;
                    read_since_pause += n;
                    if read_since_pause >= CHUNK {
                        read_since_pause = 0;
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading plaintext after {received} of {TOTAL} bytes: {e}"),
            }
        }
        if tls_eof && received < TOTAL {
            panic!("server closed the TCP connection after {received} of {TOTAL} bytes");
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(sent, TOTAL);
    assert_eq!(received, TOTAL, "more bytes came back than were sent");

    // Orderly close: our close_notify is answered with the server's close_notify.
    conn.send_close_notify();
    let close_deadline = Instant::now() + Duration::from_secs(10);
    let mut got_close_notify = false;
    while Instant::now() < close_deadline && !got_close_notify {
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("sending close_notify: {e}"),
            }
        }
        match conn.read_tls(&mut sock) {
            Ok(0) => {}
            Ok(_) => {
                conn.process_new_packets()
                    .unwrap_or_else(|e| panic!("TLS error while closing: {e}"));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read_tls while closing: {e}"),
        }
        match conn.reader().read(&mut inbuf) {
            Ok(0) => got_close_notify = true,
            Ok(n) => panic!("{n} extra bytes after the whole {TOTAL}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for the server's close_notify: {e}"),
        }
    }
    assert!(
        got_close_notify,
        "no close_notify from the server within 10 s of ours"
    );

    let hwm_after = hwm_kib(server.pid());
    let growth = hwm_after.saturating_sub(rss_before);
    eprintln!(
        "server RSS before {rss_before} KiB, peak after {hwm_after} KiB, growth {growth} KiB"
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "server peak RSS grew by {growth} KiB (RSS before {rss_before} KiB, peak after \
         {hwm_after} KiB) while relaying {} KiB over TLS to a slow reader",
        TOTAL / 1024
    );
}

/// Garbage on the TLS port: 4 KiB of random bytes and an HTTP request are closed at once, a
/// truncated ClientHello at the 2 s handshake timeout; a healthy session echoes throughout, and
/// the failures are logged.
#[test]
fn garbage_is_refused_and_others_keep_working() {
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "handshake_timeout = \"2s\"", "");
    let addr = server.addr("tls-echo");
    let mark = server.log_mark();

    let stop = Arc::new(AtomicBool::new(false));
    let healthy = spawn_healthy_session(
        addr,
        client_config(&[&cert.der], BOTH, &[]),
        Arc::clone(&stop),
    );

    // (b) first, since it lasts until the handshake timeout.
    let hello = client_hello_bytes();
    let mut truncated = connect(addr);
    truncated.write_all(&hello[..20]).expect("write 20 bytes");
    let truncated_sent = Instant::now();

    // (a) 4 KiB of random bytes (not starting like a handshake record).
    let mut junk = random_bytes(4096, 0x9E37_79B9_7F4A_7C15);
    if junk[0] == 0x16 {
        junk[0] = 0x42;
    }
    let mut random = connect(addr);
    if let Err(e) = random.write_all(&junk) {
        assert!(is_reset(&e), "writing random bytes: {e}");
    }
    let took = time_to_close(&mut random, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("random bytes: connection not closed: {e}"));
    eprintln!("random bytes: closed after {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "random bytes: closed only after {took:?}, not at the handshake failure"
    );

    // (c) plain HTTP on the TLS port.
    let mut http = connect(addr);
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write HTTP request");
    let took = time_to_close(&mut http, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("HTTP request: connection not closed: {e}"));
    eprintln!("HTTP request: closed after {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "HTTP request: closed only after {took:?}, not at the handshake failure"
    );

    // (b) the truncated ClientHello is closed at the handshake timeout.
    time_to_close(&mut truncated, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("truncated ClientHello: connection not closed: {e}"));
    let took = truncated_sent.elapsed();
    eprintln!("truncated ClientHello: closed {took:?} after it was sent");
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_secs(6),
        "truncated ClientHello: closed after {took:?}, expected about the 2 s handshake timeout"
    );

    // A fresh session works, and the healthy one never failed.
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mut fresh = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut fresh, b"fresh after garbage\n");
    stop.store(true, Ordering::SeqCst);
    let rounds = healthy
        .join()
        .expect("healthy session thread")
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("healthy session: {rounds} round trips during the garbage");
    assert!(
        rounds > 10,
        "healthy session made only {rounds} round trips"
    );

    server.assert_log(
        mark,
        Duration::from_secs(5),
        "containing `tls handshake failed`",
        |l| l.contains("tls handshake failed"),
    );
    server.assert_log(
        mark,
        Duration::from_secs(2),
        "mentioning `handshake timeout` (truncated ClientHello)",
        |l| l.contains("handshake timeout"),
    );
}

/// SIGHUP reloads the certificate files: new handshakes get the new certificate, an
/// established session keeps echoing; a corrupt key file is reported and the last good
/// certificate stays.
#[test]
fn sighup_reloads_certificate() {
    let a = TestCert::localhost();
    let b = TestCert::localhost();
    assert_ne!(a.der, b.der);
    let dir = tempfile::tempdir().expect("tempdir");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    a.write_to(&cert_path, &key_path);
    let server = Server::start(&tls_config("", &tls_table(&cert_path, &key_path), ""));
    let addr = server.addr("tls-echo");
    let config = client_config(&[&a.der, &b.der], BOTH, &[]);

    let mut old = tls_connect(addr, &config, "localhost");
    assert_eq!(leaf(&old), a.der, "initial certificate is A");
    assert_tls_echo(&mut old, b"old session, cert A\n");

    // Reload to B.
    b.write_to(&cert_path, &key_path);
    let mark = server.log_mark();
    server.signal("HUP");
    server.assert_log(mark, Duration::from_secs(10), "mentioning reload", |l| {
        l.to_lowercase().contains("reload")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        let s = tls_connect(addr, &config, "localhost");
        if leaf(&s) == b.der {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "new handshakes still get certificate A 10 s after SIGHUP; log since HUP:\n{}",
            server.stderr_lines()[mark..].join("\n")
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_tls_echo(&mut new, b"new session, cert B\n");
    assert_tls_echo(&mut old, b"old session after reload\n");
    assert_eq!(leaf(&old), a.der, "the old session's certificate");

    // A corrupt key: reload fails, B stays.
    std::fs::write(
        &key_path,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .expect("corrupt key file");
    let mark = server.log_mark();
    server.signal("HUP");
    let line = server.assert_log(
        mark,
        Duration::from_secs(10),
        "reporting a failed reload",
        |l| {
            let l = l.to_lowercase();
            l.contains("reload")
                && (l.contains("error")
                    || l.contains("fail")
                    || l.contains("invalid")
                    || l.contains("keep"))
        },
    );
    eprintln!("reload error line: {line}");
    thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        let mut s = tls_connect(addr, &config, "localhost");
        assert_eq!(
            leaf(&s),
            b.der,
            "connection {i} after the failed reload: certificate is not B"
        );
        assert_tls_echo(&mut s, b"after failed reload\n");
    }
    assert_tls_echo(&mut old, b"old session after failed reload\n");
    assert_tls_echo(&mut new, b"B session after failed reload\n");
}

/// SNI: "other.test" gets its own certificate C; "localhost" and a client sending no SNI (an
/// IP address as server name) get the default certificate.
#[test]
fn sni_selects_certificate() {
    let a = TestCert::localhost();
    let c = TestCert::new(&["other.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_cert, a_key) = a.write(dir.path(), "default");
    let (c_cert, c_key) = c.write(dir.path(), "other");
    let tls = format!(
        "{}\n[[tls.sni]]\nnames = [\"other.test\"]\ncert = {}\nkey = {}\n",
        tls_table(&a_cert, &a_key),
        toml_path(&c_cert),
        toml_path(&c_key)
    );
    let server = Server::start(&tls_config("", &tls, ""));
    let addr = server.addr("tls-echo");
    let config = client_config(&[&a.der, &c.der], BOTH, &[]);

    for version in [TLS13, TLS12] {
        let config = client_config(&[&a.der, &c.der], &[version], &[]);
        let mut other = tls_connect(addr, &config, "other.test");
        assert_eq!(leaf(&other), c.der, "{version:?}: SNI other.test gets C");
        assert_tls_echo(&mut other, b"other.test\n");
    }

    let mut local = tls_connect(addr, &config, "localhost");
    assert_eq!(leaf(&local), a.der, "SNI localhost gets the default");
    assert_tls_echo(&mut local, b"localhost\n");

    let mut no_sni = tls_connect(addr, &config, "127.0.0.1");
    assert_eq!(leaf(&no_sni), a.der, "no SNI gets the default");
    assert_tls_echo(&mut no_sni, b"no sni\n");

    // A name with no entry gets the default.
    let mut unknown = tls_connect(addr, &accept_any_cert_config(), "unknown.test");
    assert_eq!(leaf(&unknown), a.der, "SNI unknown.test gets the default");
    assert_tls_echo(&mut unknown, b"unknown.test\n");
}

/// Without a `[tls]` table the server generates a certificate, logs its SHA-256
/// fingerprint, serves it, and the fingerprint matches the served leaf; the certificate is
/// valid for localhost, 127.0.0.1 and ::1.
#[test]
fn ephemeral_certificate_fingerprint() {
    let server = Server::start(&tls_config("", "", ""));
    let addr = server.addr("tls-echo");
    let line = server.assert_log(
        0,
        Duration::from_secs(5),
        "with the certificate's sha256 fingerprint",
        |l| l.to_lowercase().contains("sha256"),
    );
    let logged = parse_fingerprint(&line)
        .unwrap_or_else(|| panic!("no SHA-256 fingerprint (64 hex digits) in: {line}"));

    let mut s = tls_connect(addr, &accept_any_cert_config(), "localhost");
    assert_tls_echo(&mut s, b"ephemeral\n");
    let der = leaf(&s);
    let actual = sha256_hex(der.as_ref());
    assert_eq!(
        logged, actual,
        "logged fingerprint differs from the SHA-256 of the served certificate"
    );

    // Cross-check with openssl on the DER.
    let dir = tempfile::tempdir().expect("tempdir");
    let der_path = dir.path().join("leaf.der");
    std::fs::write(&der_path, der.as_ref()).expect("write DER");
    let out = Command::new("openssl")
        .args([
            "x509",
            "-inform",
            "DER",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
        ])
        .arg(&der_path)
        .output()
        .expect("run openssl x509");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        parse_fingerprint(&text).as_deref(),
        Some(actual.as_str()),
        "openssl x509 fingerprint: {text}"
    );

    // Verified against itself as the only root, for each of its names.
    for name in ["localhost", "127.0.0.1", "::1"] {
        let config = client_config(&[&der], BOTH, &[]);
        let mut s = tls_connect(addr, &config, name);
        assert_tls_echo(&mut s, format!("verified as {name}\n").as_bytes());
    }
}

/// The SHA-256 fingerprint in a log or openssl line (`sha256=AB:CD:...` or
/// `SHA256 Fingerprint=AB:CD:...`), lowercase without colons.
fn parse_fingerprint(line: &str) -> Option<String> {
    let lower = line.to_lowercase();
    let start = lower.find("sha256")?;
    let after = &lower[start + "sha256".len()..];
    // Skip to the first run of hex digits and colons that holds 64 hex digits.
    let bytes: Vec<char> = after.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_hexdigit() {
            let run: String = bytes[i..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit() || **c == ':')
                .filter(|c| **c != ':')
                .collect();
            if run.len() == 64 {
                return Some(run);
            }
            i += bytes[i..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit() || **c == ':')
                .count();
        } else {
            i += 1;
        }
    }
    None
}

/// Orderly close: the client writes 1 MiB and its close_notify at once; the server flushes
/// every echoed byte, then answers with close_notify (a clean end, not a bare EOF).
#[test]
fn close_notify_flushes_queued_echo() {
    const TOTAL: u64 = MIB;
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "", "");
    let addr = server.addr("tls-echo");
    let config = client_config(&[&cert.der], BOTH, &[]);

    for version in [TLS13, TLS12] {
        let config = client_config(&[&cert.der], &[version], &[]);
        let mut s = tls_connect(addr, &config, "localhost");
        // One thread: queue all the plaintext and close_notify, then read while flushing.
        let mut data = vec![0u8; TOTAL as usize];
        fill_pattern(0, &mut data);
        s.conn.set_buffer_limit(None);
        s.conn.writer().write_all(&data).expect("buffer 1 MiB");
        s.conn.send_close_notify();
        s.sock.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let clean = loop {
            assert!(
                Instant::now() < deadline,
                "{version:?}: {received} of {TOTAL} bytes echoed within 30 s"
            );
            while s.conn.wants_write() {
                match s.conn.write_tls(&mut s.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{version:?}: write_tls: {e}"),
                }
            }
            match s.conn.read_tls(&mut s.sock) {
                Ok(0) => {}
                Ok(_) => {
                    s.conn
                        .process_new_packets()
                        .unwrap_or_else(|e| panic!("{version:?}: TLS error: {e}"));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1))
                }
                Err(e) if is_reset(&e) => break false,
                Err(e) => panic!("{version:?}: read_tls after {received} bytes: {e}"),
            }
            match s.conn.reader().read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    check_pattern(received, &buf[..n])
                        .unwrap_or_else(|at| panic!("{version:?}: mismatch at byte {at}"));
                    received += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break false,
                Err(e) => panic!("{version:?}: reading after {received} bytes: {e}"),
            }
        };
        assert_eq!(received, TOTAL, "{version:?}: bytes echoed before the end");
        assert!(
            clean,
            "{version:?}: the server closed without close_notify (EOF/reset) after all data"
        );
    }
    let mut s = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut s, b"after orderly closes\n");
}

/// SIGTERM drains TLS sessions: an established session gets its pending echo, then
/// close_notify, and the process exits 0.
#[test]
fn sigterm_drains_tls_sessions() {
    let cert = TestCert::localhost();
    let (mut server, _dir) = start_with_cert(&cert, "shutdown_grace = \"30s\"", "");
    let addr = server.addr("tls-echo");
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mut idle = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut idle, b"idle before TERM\n");
    let mut busy = tls_connect(addr, &config, "localhost");
    assert_tls_echo(&mut busy, b"busy before TERM\n");
    let payload: Vec<u8> = (0..256 * 1024u64).map(pattern_byte).collect();
    busy.write_all(&payload).expect("write 256 KiB");
    busy.flush().expect("flush");

    server.signal("TERM");
    let mut back = vec![0u8; payload.len()];
    busy.read_exact(&mut back)
        .expect("pending echo after SIGTERM");
    assert!(back == payload, "echo after SIGTERM differs");

    let mut problems = Vec::new();
    for (what, s) in [("idle", &mut idle), ("busy", &mut busy)] {
        let start = Instant::now();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => {
                eprintln!("{what}: close_notify after {:?}", start.elapsed())
            }
            Ok(_) => problems.push(format!("{what}: {} unexpected bytes", rest.len())),
            Err(e) => problems.push(format!(
                "{what} session: expected close_notify after SIGTERM, got after {:?}: {e}",
                start.elapsed()
            )),
        }
    }
    let exit = server.wait_exit(Duration::from_secs(15));
    assert!(problems.is_empty(), "{problems:#?} (server exit: {exit:?})");
    match exit {
        Some(status) if status.success() => {}
        Some(status) => panic!(
            "server exited with {} after SIGTERM",
            describe_status(status)
        ),
        None => panic!("server still running 15 s after SIGTERM with drained TLS sessions"),
    }
}

/// A TLS session the server closes at `idle_timeout` ends with its close_notify (an orderly
/// close), not a bare EOF.
#[test]
fn idle_timeout_sends_close_notify() {
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(&cert, "idle_timeout = \"2s\"", "");
    let addr = server.addr("tls-echo");
    for version in [TLS13, TLS12] {
        let config = client_config(&[&cert.der], &[version], &[]);
        let mut s = tls_connect(addr, &config, "localhost");
        assert_tls_echo(&mut s, b"then silence\n");
        let start = Instant::now();
        let mut rest = Vec::new();
        let outcome = s.read_to_end(&mut rest);
        let took = start.elapsed();
        eprintln!("{version:?}: idle session ended after {took:?}: {outcome:?}");
        assert!(
            rest.is_empty(),
            "{version:?}: {} unexpected bytes",
            rest.len()
        );
        assert!(
            took >= Duration::from_millis(1500),
            "{version:?}: closed after {took:?}, before the 2 s idle timeout"
        );
        if let Err(e) = outcome {
            panic!("{version:?}: idle-timeout close without close_notify after {took:?}: {e}");
        }
    }
}

/// `max_handshakes`: with 5 silent connections holding every handshake place, the next TLS
/// connection is closed at once (logged as `handshake_capacity`); once the silent ones time
/// out, handshakes succeed again. (One host may take the whole pool here only because its
/// share, `max_handshakes_per_ip`, is set to all of it; see `handshake_share.rs`.)
#[test]
fn max_handshakes_refuses_excess() {
    const PLACES: usize = 5;
    let cert = TestCert::localhost();
    let (server, _dir) = start_with_cert(
        &cert,
        &format!(
            "handshake_timeout = \"2s\"\nmax_handshakes = {PLACES}\nmax_handshakes_per_ip = {PLACES}"
        ),
        "",
    );
    let addr = server.addr("tls-echo");
    let config = client_config(&[&cert.der], BOTH, &[]);
    let mark = server.log_mark();

    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..PLACES).map(|_| connect(addr)).collect();
    // Let the server accept them all before the extra one arrives.
    thread::sleep(Duration::from_millis(300));

    let mut extra = connect(addr);
    let took = time_to_close(&mut extra, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connection beyond max_handshakes not closed: {e}"));
    eprintln!("connection beyond max_handshakes closed after {took:?}");
    assert!(
        opened.elapsed() < Duration::from_millis(1800),
        "connection beyond max_handshakes closed only after {took:?} (by the handshake timeout?)"
    );
    let refused = try_tls_connect(addr, &config, "localhost");
    assert!(
        refused.is_err(),
        "a TLS client was served while {PLACES} silent handshakes held every place"
    );
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning handshake_capacity",
        |l| l.contains("reason=handshake_capacity "),
    );

    for (i, s) in silent.iter_mut().enumerate() {
        time_to_close(s, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("silent connection {i} not closed: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match try_tls_connect(addr, &config, "localhost") {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("after the silent ones closed: {e}; retrying");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("handshakes still refused after the silent ones closed: {e}"),
        }
    };
    assert_tls_echo(&mut s, b"place freed\n");
}
