//! End-to-end tests of `transport = "dtls"` listeners: interop with `openssl s_client
//! -dtls1_2` and `plexus connect dtls://`, 50 clients at once, stateless cookies under a flood
//! of cookieless ClientHellos from many sources, garbage datagrams, idle expiry with
//! close_notify, and handshakes through 20% loss (a lossy relay here; `tc netem` where the
//! machine allows it).

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{run_plexus, Server};
use openssl::ssl::{ErrorCode, SslConnector, SslMethod, SslOptions, SslStream, SslVerifyMode};

const CMD_TIMEOUT: Duration = Duration::from_secs(30);

fn dtls_config(server_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
{server_extra}

[[listener]]
name = "dtls-echo"
transport = "dtls"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

/// A running in-process server (the library), for tests that read its metrics.
struct InProcess {
    addr: SocketAddr,
    /// The listener named "http", if the configuration has one.
    http: Option<SocketAddr>,
    handle: plexus::ServerHandle,
    runner: Option<thread::JoinHandle<Result<(), plexus::Error>>>,
}

impl InProcess {
    fn start(server_extra: &str) -> InProcess {
        InProcess::from_text(&dtls_config(server_extra))
    }

    /// A dtls listener whose ACL denies `deny`.
    fn start_with_acl(deny: &str) -> InProcess {
        InProcess::from_text(&format!(
            "{}[listener.acl]\ndeny = [\"{deny}\"]\n",
            dtls_config("")
        ))
    }

    fn from_text(text: &str) -> InProcess {
        let config = plexus::Config::parse(text, "dtls-test").unwrap();
        let server = plexus_services::register(plexus::Server::builder(config))
            .build()
            .unwrap();
        let addr = server.local_addr("dtls-echo").unwrap();
        let http = server.local_addr("http");
        let handle = server.handle();
        let runner = Some(thread::spawn(move || server.run()));
        InProcess {
            addr,
            http,
            handle,
            runner,
        }
    }

    fn metrics(&self) -> plexus::MetricsSnapshot {
        self.handle.metrics()
    }

    /// Waits (bounded) until `check` holds for the metrics.
    fn wait_for(&self, what: &str, check: impl Fn(&plexus::MetricsSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check(&self.metrics()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.metrics()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
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

/// DTLS 1.2 client handshake from `local_ip` to `to` (no certificate check: these tests are
/// about the transport), retransmitting on OpenSSL's timer, within `within`.
fn dtls_connect(local_ip: &str, to: SocketAddr, within: Duration) -> SslStream<Udp> {
    let socket = UdpSocket::bind((local_ip, 0)).expect("bind");
    socket.connect(to).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut builder = SslConnector::builder(SslMethod::dtls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    builder.set_options(SslOptions::NO_QUERY_MTU);
    let mut config = builder.build().configure().unwrap();
    config.set_verify_hostname(false);
    let mut ssl = config.into_ssl("localhost").unwrap();
    ssl.set_mtu(1200).unwrap();
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Udp(socket)).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match stream.do_handshake() {
            Ok(()) => return stream,
            Err(err) if err.code() == ErrorCode::WANT_READ => {
                assert!(
                    Instant::now() < deadline,
                    "dtls handshake to {to} timed out"
                );
                plexus_sys::dtls::handle_timeout(stream.ssl());
            }
            Err(err) => panic!("dtls handshake to {to} failed: {err}"),
        }
    }
}

/// Sends `payload` as one record and waits (bounded, resending on loss when `resend`) for it
/// to come back.
fn dtls_echo(stream: &mut SslStream<Udp>, payload: &[u8], resend: bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 16 * 1024];
    stream.ssl_write(payload).expect("dtls write");
    let mut last_send = Instant::now();
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            Err(err) if err.code() == ErrorCode::WANT_READ => {}
            Err(err) => panic!("dtls read failed: {err}"),
        }
        assert!(Instant::now() < deadline, "no dtls echo");
        if resend && last_send.elapsed() > Duration::from_millis(500) {
            stream.ssl_write(payload).expect("dtls write");
            last_send = Instant::now();
        }
    }
}

/// The first datagram of a DTLS 1.2 client: a ClientHello without a cookie.
fn client_hello() -> Vec<u8> {
    #[derive(Default)]
    struct Capture(Vec<Vec<u8>>);
    impl Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
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

/// `openssl s_client -dtls1_2` completes a handshake with plexus and gets its line back.
#[test]
fn openssl_s_client_dtls1_2_handshakes_and_echoes() {
    let server = Server::start(&dtls_config("idle_timeout = \"60s\""));
    let addr = server.addr("dtls-echo");
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &addr.to_string(),
            "-quiet",
        ])
        .args(["-mtu", "1200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("hello over dtls") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    stdin.write_all(b"hello over dtls\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let got = reader.join().unwrap();
    assert!(
        String::from_utf8_lossy(&got).contains("hello over dtls"),
        "s_client printed {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// `plexus connect dtls://` verifies plexus' certificate (`--ca`), sends one record per line
/// and prints each reply; exit 0 after close_notify.
#[test]
fn connect_dtls_verifies_the_certificate_and_echoes_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_plexus(
        &["cert", "--out", dir.path().to_str().unwrap()],
        None,
        CMD_TIMEOUT,
    );
    out.assert_code(0);
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", cert, key);
    let server = Server::start(&format!("{tls}\n{}", dtls_config("")));
    let url = format!("dtls://localhost:{}", server.addr("dtls-echo").port());
    let out = run_plexus(
        &["connect", &url, "--ca", cert.to_str().unwrap()],
        Some(b"one\ntwo\nthree\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nthree\n");
}

/// 50 DTLS clients handshaking at once all complete and each gets its own record back.
#[test]
fn fifty_parallel_dtls_clients_all_complete_and_echo() {
    let server = Server::start(&dtls_config(""));
    let addr = server.addr("dtls-echo");
    let clients: Vec<_> = (0..50)
        .map(|i| {
            thread::spawn(move || {
                let mut stream = dtls_connect("127.0.0.1", addr, Duration::from_secs(20));
                let payload = format!("client {i}");
                let reply = dtls_echo(&mut stream, payload.as_bytes(), false);
                assert_eq!(reply, payload.as_bytes());
                let _ = stream.shutdown();
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a dtls client failed");
    }
}

/// 10,000 cookieless ClientHellos from 10,000 source addresses (127.1.x.y) get only stateless
/// HelloVerifyRequests: no session, no admission, no handshake slot. A real client still
/// connects afterwards.
#[test]
fn ten_thousand_cookieless_client_hellos_create_no_session_state() {
    let server = InProcess::start("");
    let hello = client_hello();
    let mut sent = 0u64;
    for i in 0..10_000u32 {
        let source = format!("127.1.{}.{}", i / 250, 1 + i % 250);
        let socket = UdpSocket::bind((source.as_str(), 0)).expect("bind spoofed-looking source");
        socket.send_to(&hello, server.addr).expect("send hello");
        sent += 1;
        if i % 500 == 499 {
            // Let the server keep up, so the kernel buffer does not drop the flood.
            server.wait_for("hellos processed", |m| m.datagrams_in + 200 >= sent);
        }
    }
    server.wait_for("every hello answered", |m| {
        m.datagrams_in >= sent && m.dtls_cookies_sent + m.dtls_garbage_dropped >= m.datagrams_in
    });
    let after_flood = server.metrics();
    assert_eq!(after_flood.dtls_cookies_sent, sent, "{after_flood:?}");
    assert_eq!(after_flood.dtls_cookies_verified, 0);
    assert_eq!(after_flood.dtls_sessions_open, 0);
    assert_eq!(after_flood.sessions_open, 0);
    assert_eq!(after_flood.accepted, 0, "nothing was admitted");
    assert_eq!(after_flood.dtls_garbage_dropped, 0);

    let mut stream = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(
        dtls_echo(&mut stream, b"still served", false),
        b"still served"
    );
    server.wait_for("the real client counted", |m| m.dtls_cookies_verified >= 1);
    let metrics = server.metrics();
    assert_eq!(metrics.dtls_cookies_verified, 1);
    assert_eq!(metrics.dtls_sessions_open, 1);
}

/// Garbage on the DTLS port (random bytes, truncated records, a TLS-over-TCP hello) is
/// dropped and counted; no session is created and a real client is served meanwhile.
#[test]
fn garbage_datagrams_on_the_dtls_port_are_dropped_and_counted() {
    let server = InProcess::start("");
    let mut stream = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    let hello = client_hello();
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0u8; 1],
        vec![0xff; 1500],
        hello[..20].to_vec(),
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
        (0..=255u8).collect(),
    ];
    let socket = UdpSocket::bind("127.0.0.3:0").unwrap();
    for datagram in &garbage {
        socket.send_to(datagram, server.addr).unwrap();
    }
    let expected = garbage.len() as u64;
    server.wait_for("garbage counted", |m| garbage_dropped(m) >= expected);
    let metrics = server.metrics();
    assert_eq!(garbage_dropped(&metrics), expected);
    assert_eq!(
        metrics.dtls_garbage_dropped, 0,
        "the pre-parser refused all of it before OpenSSL"
    );
    assert_eq!(
        metrics.dtls_cookies_sent, 1,
        "only the real client's hello got a cookie"
    );
    assert_eq!(metrics.dtls_sessions_open, 1);
    assert_eq!(
        dtls_echo(&mut stream, b"undisturbed", false),
        b"undisturbed"
    );
}

/// Every datagram a dtls port dropped as unusable, whichever stage refused it.
fn garbage_dropped(m: &plexus::MetricsSnapshot) -> u64 {
    m.dtls_malformed_dropped + m.dtls_not_hello_dropped + m.dtls_garbage_dropped
}

/// `hello` (a cookieless ClientHello of one record) with `cookie` in it.
fn with_cookie(hello: &[u8], cookie: &[u8]) -> Vec<u8> {
    let grow = |bytes: &mut [u8]| {
        let mut value = 0u32;
        for byte in bytes.iter() {
            value = value << 8 | u32::from(*byte);
        }
        value += cookie.len() as u32;
        let be = value.to_be_bytes();
        let len = bytes.len();
        bytes.copy_from_slice(&be[4 - len..]);
    };
    let mut out = hello.to_vec();
    grow(&mut out[11..13]); // record length
    grow(&mut out[14..17]); // handshake length
    grow(&mut out[22..25]); // fragment length
                            // record header 13 + handshake header 12 + version 2 + random 32 + session id (empty) 1
    let cookie_at = 13 + 12 + 2 + 32;
    assert_eq!(out[cookie_at], 0, "a cookieless hello without session id");
    assert_eq!(out[cookie_at + 1], 0);
    out[cookie_at + 1] = cookie.len() as u8;
    out.splice(cookie_at + 2..cookie_at + 2, cookie.iter().copied());
    out
}

/// A DTLS record with the given header fields around `payload`.
fn record(kind: u8, version: u16, epoch: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 7]);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Defect: one datagram from anywhere killed the next DTLS session on its loop (OpenSSL's
/// per-thread error queue, left dirty by `DTLSv1_listen`, was read as that session's error).
/// With one event loop (every session shares the thread), three established sessions keep
/// echoing every record while garbage arrives from other sources — 1 byte, random bytes, a
/// truncated ClientHello, well-formed records that are no ClientHello, a ClientHello that
/// OpenSSL itself refuses — and from the sessions' own addresses; every datagram is dropped
/// and counted, no session fails.
#[test]
fn garbage_from_anywhere_never_disturbs_established_dtls_sessions() {
    let server =
        InProcess::from_text(&dtls_config("").replace("event_loops = 2", "event_loops = 1"));
    let mut sessions: Vec<SslStream<Udp>> = (0..3)
        .map(|_| dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20)))
        .collect();
    let hello = client_hello();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..1400)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    // A ClientHello whose handshake header says message_seq 5: refused by the pre-parser.
    let mut late_seq = hello.clone();
    late_seq[13 + 4..13 + 6].copy_from_slice(&5u16.to_be_bytes());
    // ClientHellos that pass the pre-parser go to DTLSv1_listen between the sessions' records
    // (answered with a HelloVerifyRequest: the forged cookie is refused).
    let forged_cookie = with_cookie(&hello, b"forged!!");
    let from_elsewhere: Vec<Vec<u8>> = vec![
        vec![0],
        random.clone(),
        hello[..20].to_vec(),
        hello[..hello.len() - 1].to_vec(),
        record(23, 0xfefd, 1, &random[..64]),
        record(22, 0xfefd, 0, &[1, 0, 0]),
        record(21, 0xfefd, 0, &[2, 40]),
        late_seq,
        forged_cookie,
        hello.clone(),
        vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
    ];
    let hellos = 2;
    let from_sessions: Vec<Vec<u8>> = vec![
        vec![0],
        random[..100].to_vec(),
        record(23, 0xfefd, 1, &[0xee; 48])[..30].to_vec(),
    ];
    let mut sent = 0u64;
    let mut round = 0;
    for (i, datagram) in from_elsewhere.iter().enumerate() {
        let source = UdpSocket::bind(format!("127.0.0.{}:0", 20 + i)).unwrap();
        source.send_to(datagram, server.addr).unwrap();
        for (n, session) in sessions.iter_mut().enumerate() {
            round += 1;
            let payload = format!("session {n} after garbage {i} ({round})");
            assert_eq!(
                dtls_echo(session, payload.as_bytes(), false),
                payload.as_bytes(),
                "session {n} after garbage datagram {i}"
            );
        }
    }
    for (i, datagram) in from_sessions.iter().enumerate() {
        for session in sessions.iter_mut() {
            session.get_ref().0.send(datagram).unwrap();
            sent += 1;
        }
        for (n, session) in sessions.iter_mut().enumerate() {
            let payload = format!("session {n} after own garbage {i}");
            assert_eq!(
                dtls_echo(session, payload.as_bytes(), false),
                payload.as_bytes()
            );
        }
    }
    sent += from_elsewhere.len() as u64 - hellos;
    server.wait_for("every garbage datagram counted", |m| {
        garbage_dropped(m) >= sent
    });
    let metrics = server.metrics();
    assert_eq!(garbage_dropped(&metrics), sent, "{metrics:?}");
    // From elsewhere: 5 not even records, 4 records that are no ClientHello; from each of
    // the 3 sessions: 3 malformed.
    assert_eq!(metrics.dtls_malformed_dropped, 5 + 9, "{metrics:?}");
    assert_eq!(metrics.dtls_not_hello_dropped, 4, "{metrics:?}");
    assert_eq!(metrics.dtls_garbage_dropped, 0, "{metrics:?}");
    assert!(metrics.dtls_cookies_sent >= 3 + hellos, "{metrics:?}");
    assert_eq!(metrics.handshakes_failed, 0);
    assert_eq!(metrics.dtls_sessions_open, 3);
    assert_eq!(metrics.closed_io_error, 0);
}

/// Well-formed application-data records with garbage ciphertext, from an established
/// session's own address and port (a spoofer's best guess): OpenSSL discards them (the MAC
/// fails) without a word. Each is counted as `dtls_bad_record` (on `/metrics` too), the
/// session survives and echoes, and no session fails. Before, they vanished uncounted.
#[test]
fn records_failing_the_mac_in_a_session_are_counted_and_the_session_survives() {
    let text = format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        dtls_config("").replace("event_loops = 2", "event_loops = 1")
    );
    let server = InProcess::from_text(&text);
    let http = server.http.unwrap();
    let mut session = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut session, b"before", false), b"before");
    for (i, sequence_byte) in [7u8, 8, 9].into_iter().enumerate() {
        // Epoch 1 (the session's), a sequence number the client has not used yet.
        let mut forged = record(23, 0xfefd, 1, &[0xee; 48]);
        forged[10] = sequence_byte;
        session.get_ref().0.send(&forged).unwrap();
        let payload = format!("after forged record {i}");
        assert_eq!(
            dtls_echo(&mut session, payload.as_bytes(), false),
            payload.as_bytes()
        );
    }
    server.wait_for("bad records counted", |m| m.dtls_bad_record_dropped >= 3);
    let metrics = server.metrics();
    assert_eq!(metrics.dtls_bad_record_dropped, 3, "{metrics:?}");
    assert_eq!(metrics.dtls_malformed_dropped, 0, "{metrics:?}");
    assert_eq!(metrics.dtls_sessions_open, 1);
    assert_eq!(metrics.handshakes_failed, 0);
    assert_eq!(metrics.closed_io_error, 0);
    let text = metrics_text(http);
    assert!(
        text.contains("plexus_datagrams_dropped_total{reason=\"dtls_bad_record\"} 3\n"),
        "{text}"
    );
}

/// A listener's `max_sessions`: a third DTLS client reclaims the longest-idle session (which
/// gets close_notify), the two newest are served, and the reclaim is counted.
#[test]
fn a_full_dtls_listener_reclaims_its_longest_idle_session_with_close_notify() {
    let server = InProcess::from_text(&format!(
        "{}max_sessions = 2\n",
        dtls_config("").replace("event_loops = 2", "event_loops = 1")
    ));
    let mut first = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut first, b"first", false), b"first");
    let mut second = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut second, b"second", false), b"second");
    let mut third = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut third, b"third", false), b"third");
    assert_eq!(
        dtls_echo(&mut second, b"second again", false),
        b"second again"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    loop {
        match first.ssl_read(&mut buf) {
            Err(err) if err.code() == ErrorCode::ZERO_RETURN => break,
            Ok(0) => break,
            Err(err) if err.code() == ErrorCode::WANT_READ => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no close_notify for the reclaimed session"
        );
    }
    let metrics = server.metrics();
    assert_eq!(metrics.reclaimed_for_max_sessions, 1, "{metrics:?}");
    assert_eq!(metrics.dtls_sessions_open, 2);
}

/// Completes the cookie exchange from a fresh socket on `local_ip`, sends the ClientHello
/// with the cookie and goes silent: the server holds a handshaking session (and its handshake
/// slot) until `handshake_timeout`. The socket is returned so its port stays taken.
fn stalled_dtls_handshake(local_ip: &str, to: SocketAddr) -> UdpSocket {
    #[derive(Default)]
    struct Pipe {
        inbound: Option<Vec<u8>>,
        outbound: Vec<Vec<u8>>,
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let datagram = self.inbound.take().ok_or(io::ErrorKind::WouldBlock)?;
            buf[..datagram.len()].copy_from_slice(&datagram);
            Ok(datagram.len())
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.outbound.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let socket = UdpSocket::bind((local_ip, 0)).unwrap();
    socket.connect(to).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut builder = SslConnector::builder(SslMethod::dtls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    let mut ssl = builder
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Pipe::default()).unwrap();
    assert!(stream.do_handshake().is_err(), "waits for the cookie");
    for datagram in stream.get_mut().outbound.drain(..) {
        socket.send(&datagram).unwrap();
    }
    let mut buf = vec![0u8; 2048];
    let n = socket.recv(&mut buf).expect("a HelloVerifyRequest");
    stream.get_mut().inbound = Some(buf[..n].to_vec());
    assert!(
        stream.do_handshake().is_err(),
        "waits for the server's flight"
    );
    let hello = stream.get_mut().outbound.drain(..).collect::<Vec<_>>();
    assert!(!hello.is_empty(), "a ClientHello with the cookie");
    for datagram in hello {
        socket.send(&datagram).unwrap();
    }
    socket
}

/// `max_handshakes` is shared by tls and dtls listeners: dtls handshakes may hold at most
/// half of it, so clients that pass the cookie exchange and stall can never take every slot
/// a TLS client needs (on main, 4 stalled DTLS handshakes refused every TLS client).
#[test]
fn stalled_dtls_handshakes_never_take_every_tls_handshake_slot() {
    let text = format!(
        "{}\n[[listener]]\nname = \"tls-echo\"\ntransport = \"tls\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n",
        dtls_config("max_handshakes = 4\nhandshake_timeout = \"60s\"")
    );
    let config = plexus::Config::parse(&text, "dtls-share").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let dtls = server.local_addr("dtls-echo").unwrap();
    let tls = server.local_addr("tls-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let _stalled: Vec<UdpSocket> = (0..4)
        .map(|i| stalled_dtls_handshake(&format!("127.0.0.{}", 30 + i), dtls))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while handle
        .metrics()
        .refused(plexus::RefusalReason::HandshakeCapacity)
        < 2
    {
        assert!(Instant::now() < deadline, "{:?}", handle.metrics());
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        handle.metrics().dtls_sessions_open,
        2,
        "the dtls share: 2 of 4"
    );
    for i in 0..2 {
        let out = run_plexus(
            &["connect", &format!("tls://{tls}"), "--insecure"],
            Some(format!("tls client {i}\n").as_bytes()),
            CMD_TIMEOUT,
        );
        out.assert_code(0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("tls client {i}\n")
        );
    }
    handle.stop();
    let _ = runner.join();
}

/// `GET /metrics` from the server's http listener `http` (HTTP/1.0: the server closes after).
fn metrics_text(http: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// `max_handshakes_per_ip` over DTLS, end to end: 10 handshakes from 127.0.0.1 (each from its
/// own port) pass the cookie exchange and stall. With a pool of 16 (a dtls share of 8) and a
/// per-IP share of 3, the host keeps 3 and its other 7 are refused as
/// `handshake_capacity_per_ip` (on `/metrics` too); a client from 127.0.0.2 still completes
/// its DTLS handshake and echoes, and the pool itself is never full. Without the per-IP share
/// the stalled host would take the whole dtls share (8) and the client would be refused.
#[test]
fn one_hosts_stalled_dtls_handshakes_leave_room_for_another_host() {
    let text = format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        dtls_config("max_handshakes = 16\nmax_handshakes_per_ip = 3\nhandshake_timeout = \"60s\"")
    );
    let config = plexus::Config::parse(&text, "dtls-per-ip").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let dtls = server.local_addr("dtls-echo").unwrap();
    let http = server.local_addr("http").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let _stalled: Vec<UdpSocket> = (0..10)
        .map(|_| stalled_dtls_handshake("127.0.0.1", dtls))
        .collect();
    let per_ip = || {
        handle
            .metrics()
            .refused(plexus::RefusalReason::HandshakeCapacityPerIp)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while per_ip() < 7 {
        assert!(Instant::now() < deadline, "{:?}", handle.metrics());
        thread::sleep(Duration::from_millis(50));
    }
    let metrics = handle.metrics();
    assert_eq!(per_ip(), 7, "{metrics:?}");
    assert_eq!(
        metrics.dtls_sessions_open, 3,
        "the host's share: 3 handshaking"
    );
    let text = metrics_text(http);
    assert!(
        text.contains("plexus_connections_refused_total{reason=\"handshake_capacity_per_ip\"} 7\n"),
        "{text}"
    );

    let mut other = dtls_connect("127.0.0.2", dtls, Duration::from_secs(20));
    assert_eq!(
        dtls_echo(&mut other, b"another host", false),
        b"another host"
    );
    let metrics = handle.metrics();
    assert_eq!(metrics.dtls_sessions_open, 4, "{metrics:?}");
    assert_eq!(
        metrics.refused(plexus::RefusalReason::HandshakeCapacity),
        0,
        "neither the pool nor the dtls share was full"
    );
    assert_eq!(per_ip(), 7, "the other host was not refused");
    handle.stop();
    let _ = runner.join();
}

/// A source the listener's ACL denies gets no cookie (its hello is dropped and counted).
#[test]
fn acl_denied_source_gets_no_dtls_cookie() {
    let server = InProcess::start_with_acl("127.0.0.7/32");
    let socket = UdpSocket::bind("127.0.0.7:0").unwrap();
    socket.send_to(&client_hello(), server.addr).unwrap();
    server.wait_for("refusal counted", |m| m.datagrams_dropped_refused == 1);
    assert_eq!(server.metrics().dtls_cookies_sent, 0);
    let mut stream = dtls_connect("127.0.0.8", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut stream, b"allowed", false), b"allowed");
}

/// An idle DTLS session ends after `idle_timeout`: the server sends close_notify (the client
/// reads end of stream) and the session is gone from the metrics.
#[test]
fn idle_dtls_session_expires_with_close_notify() {
    let server = InProcess::start("idle_timeout = \"1s\"");
    let mut stream = dtls_connect("127.0.0.1", server.addr, Duration::from_secs(20));
    assert_eq!(dtls_echo(&mut stream, b"ping", false), b"ping");
    assert_eq!(server.metrics().dtls_sessions_open, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    loop {
        match stream.ssl_read(&mut buf) {
            Err(err) if err.code() == ErrorCode::ZERO_RETURN => break,
            Ok(0) => break,
            Err(err) if err.code() == ErrorCode::WANT_READ => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no close_notify after idle_timeout"
        );
    }
    server.wait_for("session gone", |m| m.dtls_sessions_open == 0);
    assert_eq!(server.metrics().closed_idle_timeout, 1);
}

/// Relays datagrams between one client and `server`, dropping a pseudo-random 20% in each
/// direction. Returns the relay's address and a stop flag.
fn lossy_relay(server: SocketAddr, loss_percent: u64) -> (SocketAddr, Arc<AtomicBool>) {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(server).unwrap();
    for socket in [&front, &back] {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
    }
    let addr = front.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let drop_it = move |state: &mut u64| {
        // xorshift64: reproducible, no dependency.
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state % 100 < loss_percent
    };
    let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
    let (stop1, stop2) = (Arc::clone(&stop), Arc::clone(&stop));
    let client2 = Arc::clone(&client);
    thread::spawn(move || {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 65_536];
        while !stop1.load(Ordering::Relaxed) {
            if let Ok((n, from)) = front.recv_from(&mut buf) {
                *client.lock().unwrap() = Some(from);
                if !drop_it(&mut state) {
                    let _ = back.send(&buf[..n]);
                }
            }
        }
    });
    thread::spawn(move || {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut buf = vec![0u8; 65_536];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok(n) = back2.recv(&mut buf) {
                let to = *client2.lock().unwrap();
                if let (Some(to), false) = (to, drop_it(&mut state)) {
                    let _ = front2.send_to(&buf[..n], to);
                }
            }
        }
    });
    (addr, stop)
}

/// With 20% of datagrams lost in each direction (a lossy relay in front of the server),
/// DTLS handshakes still complete through retransmission, driven by the server's timers.
#[test]
fn dtls_handshakes_complete_through_20_percent_loss() {
    let server = InProcess::start("handshake_timeout = \"60s\"");
    for round in 0..3 {
        let (relay, stop) = lossy_relay(server.addr, 20);
        let mut stream = dtls_connect("127.0.0.1", relay, Duration::from_secs(60));
        let payload = format!("through loss {round}");
        assert_eq!(
            dtls_echo(&mut stream, payload.as_bytes(), true),
            payload.as_bytes()
        );
        stop.store(true, Ordering::Relaxed);
    }
    assert!(server.metrics().handshakes_ok >= 3);
}

/// The same through the kernel: a network namespace whose loopback drops 20% (`tc netem`).
/// Needs root, `ip netns` and the sch_netem module; where any is missing the test says so
/// and is skipped (it does not pretend to have run).
#[test]
fn dtls_handshakes_complete_through_netem_loss_in_a_namespace() {
    let namespace = format!("plexus-dtls-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|err| err.to_string())
            .and_then(|out| match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            })
    };
    if let Err(why) = run(&["ip", "netns", "add", &namespace]) {
        eprintln!("SKIPPED: cannot create a network namespace (ip netns add): {why}");
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(namespace.clone());
    let netns = ["ip", "netns", "exec", namespace.as_str()];
    let setup = run(&[&netns[..], &["ip", "link", "set", "lo", "up"]].concat()).and_then(|_| {
        run(&[
            &netns[..],
            &[
                "tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", "20%",
            ],
        ]
        .concat())
    });
    if let Err(why) = setup {
        eprintln!("SKIPPED: cannot add 20% netem loss on the namespace's loopback: {why}");
        return;
    }
    let server = Server::start_with_prefix(&netns, &dtls_config("handshake_timeout = \"60s\""));
    let url = format!("dtls://{}", server.addr("dtls-echo"));
    for _ in 0..3 {
        let out = Command::new(netns[0])
            .args(&netns[1..])
            .args([common::BIN, "connect", &url, "--insecure"])
            .stdin(Stdio::null())
            .output()
            .expect("run plexus connect in the namespace");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "handshake through netem loss failed: {stderr}"
        );
    }
}

/// `[[tls.psk]]`: a client with the configured identity and key completes a PSK handshake
/// (`openssl s_client -cipher PSK`, and `plexus connect --psk-identity`) and is echoed; a
/// wrong key never completes; a bad key file is a configuration error naming its key.
#[test]
fn psk_clients_with_the_right_key_are_served_and_a_wrong_key_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sensor.hex");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let bad_key = dir.path().join("bad.hex");
    std::fs::write(&bad_key, "ffeeddccbbaa99887766554433221100").unwrap();
    let tls = format!("[tls]\n[[tls.psk]]\nidentity = \"sensor-1\"\nkey_file = {key:?}\n");
    let server = Server::start(&format!("{tls}\n{}", dtls_config("")));
    let addr = server.addr("dtls-echo");
    let url = format!("dtls://{addr}");

    let out = run_plexus(
        &[
            "connect",
            &url,
            "--psk-identity",
            "sensor-1",
            "--psk-key-file",
            key.to_str().unwrap(),
        ],
        Some(b"psk works\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "psk works\n");

    let out = Command::new("openssl")
        .args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &addr.to_string(),
            "-quiet",
            "-cipher",
            "PSK",
        ])
        .args([
            "-psk_identity",
            "sensor-1",
            "-psk",
            "00112233445566778899aabbccddeeff",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"psk via s_client\n")?;
            let mut stdout = child.stdout.take().unwrap();
            let reader = thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                while !String::from_utf8_lossy(&got).contains("psk via s_client") {
                    match stdout.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                got
            });
            let deadline = Instant::now() + Duration::from_secs(15);
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            drop(stdin);
            Ok(reader.join().unwrap())
        })
        .expect("run openssl s_client");
    assert!(
        String::from_utf8_lossy(&out).contains("psk via s_client"),
        "s_client printed {:?}",
        String::from_utf8_lossy(&out)
    );

    let out = run_plexus(
        &[
            "connect",
            &url,
            "--psk-identity",
            "sensor-1",
            "--psk-key-file",
            bad_key.to_str().unwrap(),
        ],
        Some(b"no\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(1);
    assert!(out.stdout.is_empty(), "a wrong key must not be echoed");

    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&key, "not hex").unwrap();
    std::fs::write(&bad_config, format!("{tls}\n{}", dtls_config(""))).unwrap();
    let out = run_plexus(
        &["serve", "--config", bad_config.to_str().unwrap(), "--check"],
        None,
        CMD_TIMEOUT,
    );
    out.assert_code(2);
    out.assert_stderr_contains("tls.psk[0].key_file");
}
