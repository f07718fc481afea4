//! A peer's TLS close_notify behaves exactly as a TCP FIN: everything received before it is
//! processed and answered (as the outbound queue drains, under backpressure), then the server
//! ends the session with its own close_notify.
//!
//! The client here is rustls, driven by hand so that the requests and the close_notify leave
//! in one write (one TCP send), as a pipelining client that half-closes would send them. Checked
//! on every path that ends in TLS: a tls listener (http, echo, forward), an `auto` listener that
//! detects TLS, and a tls listener behind a PROXY header.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use common::*;
use plexus_testkit::accept_any_cert_config;

/// On an open socket (after `preamble`, e.g. a PROXY header, was written in the clear): a TLS
/// handshake, then `payload` and close_notify in one write; returns every plaintext byte the
/// server sent until its own close_notify, and whether that close_notify came.
fn send_then_close_notify(
    mut sock: TcpStream,
    preamble: &[u8],
    payload: &[u8],
) -> io::Result<(Vec<u8>, bool)> {
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.write_all(preamble)?;
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn =
        ClientConnection::new(accept_any_cert_config(), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // The whole payload is encrypted up front, to leave in the one write below.
    conn.set_buffer_limit(None);
    conn.writer().write_all(payload)?;
    conn.send_close_notify();
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire)?;
    }
    // Everything in one send, from another thread: the server answers while it arrives, and
    // a payload larger than the socket buffers must not wait for this thread to read.
    let mut writer = sock.try_clone()?;
    let sending = std::thread::spawn(move || writer.write_all(&wire));
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let outcome = loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => break Ok((received, true)),
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // The socket closed without close_notify.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break Ok((received, false)),
            Err(err) => break Err(err),
        }
        match conn.read_tls(&mut sock) {
            Ok(0) => break Ok((received, false)),
            Ok(_) => {}
            Err(err) => break Err(err),
        }
        if let Err(err) = conn.process_new_packets() {
            break Err(io::Error::other(err));
        }
    };
    sending
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    outcome
}

const BIG: usize = 4 * 1024 * 1024;

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// A root with `big` (4 MiB, far past the high watermark) and `small`.
fn web_root(dir: &Path) {
    std::fs::write(dir.join("big"), big_body()).unwrap();
    std::fs::write(dir.join("small"), b"small body\n").unwrap();
}

fn config(root: &Path, listeners: &str) -> String {
    // `[http]` only where a listener serves http: elsewhere the key would not apply (exit 2).
    let serves_http =
        listeners.contains("service = \"http\"") || listeners.contains("service = \"auto\"");
    let http = match serves_http {
        true => format!("[http]\nroot = \"{}\"\n\n", root.display()),
        false => String::new(),
    };
    format!("[server]\nevent_loops = 1\nidle_timeout = \"60s\"\n\n{http}{listeners}")
}

fn listener(name: &str, transport: &str, service: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\ntransport = \"{transport}\"\naddr = \"127.0.0.1:0\"\n\
         service = \"{service}\"\n{extra}\n"
    )
}

const PIPELINED: &[u8] =
    b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\nGET /small HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Splits `bytes` into HTTP/1.1 responses (Content-Length bodies): (status line, body).
fn responses(mut bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_start = end + 4;
        let body_end = (body_start + length).min(bytes.len());
        let status = head.lines().next().unwrap_or_default().to_owned();
        out.push((status, bytes[body_start..body_end].to_vec()));
        bytes = &bytes[body_end..];
    }
    out
}

fn assert_both_responses(received: &[u8], closed_with_notify: bool, what: &str) {
    let responses = responses(received);
    let summary: Vec<(&str, usize)> = responses
        .iter()
        .map(|(status, body)| (status.as_str(), body.len()))
        .collect();
    assert_eq!(responses.len(), 2, "{what}: responses {summary:?}");
    assert!(responses[0].0.contains(" 200 "), "{what}: {summary:?}");
    assert!(responses[0].1 == big_body(), "{what}: /big body incomplete");
    assert!(responses[1].0.contains(" 200 "), "{what}: {summary:?}");
    assert_eq!(responses[1].1, b"small body\n", "{what}");
    assert!(
        closed_with_notify,
        "{what}: the server ended with close_notify"
    );
}

/// The same two requests over plain TCP with a FIN: both answered (the reference behaviour).
#[test]
fn pipelined_requests_then_fin_get_both_responses_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    web_root(dir.path());
    let server = Server::start(&config(dir.path(), &listener("http", "tcp", "http", "")));
    let mut sock = connect(server.addr("http"));
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(PIPELINED).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut received = Vec::new();
    sock.read_to_end(&mut received).unwrap();
    assert_both_responses(&received, true, "tcp");
}

/// The defect: over TLS, `GET /big` + `GET /small` + close_notify in one send got only the
/// first response.
#[test]
fn pipelined_requests_then_close_notify_get_both_responses_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    web_root(dir.path());
    let server = Server::start(&config(dir.path(), &listener("https", "tls", "http", "")));
    for round in 0..3 {
        let sock = connect(server.addr("https"));
        let (received, notified) = send_then_close_notify(sock, b"", PIPELINED).unwrap();
        assert_both_responses(&received, notified, &format!("tls, round {round}"));
    }
}

/// The same through an `auto` listener that detects the ClientHello.
#[test]
fn pipelined_requests_then_close_notify_get_both_responses_over_auto_tls() {
    let dir = tempfile::tempdir().unwrap();
    web_root(dir.path());
    let server = Server::start(&config(dir.path(), &listener("auto", "tcp", "auto", "")));
    for round in 0..3 {
        let sock = connect(server.addr("auto"));
        let (received, notified) = send_then_close_notify(sock, b"", PIPELINED).unwrap();
        assert_both_responses(&received, notified, &format!("auto tls, round {round}"));
    }
}

/// The same behind a PROXY v1 header on a tls listener.
#[test]
fn pipelined_requests_then_close_notify_get_both_responses_behind_proxy_protocol() {
    let dir = tempfile::tempdir().unwrap();
    web_root(dir.path());
    let server = Server::start(&config(
        dir.path(),
        &listener("https", "tls", "http", "proxy_protocol = true"),
    ));
    for round in 0..3 {
        let sock = connect(server.addr("https"));
        let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 443\r\n";
        let (received, notified) = send_then_close_notify(sock, header, PIPELINED).unwrap();
        assert_both_responses(&received, notified, &format!("proxy+tls, round {round}"));
    }
}

/// Echo over TLS: 4 MiB (far past the high watermark, so reading pauses on the way) and the
/// close_notify in one send: every byte comes back, then the server's close_notify.
#[test]
fn a_large_echo_then_close_notify_comes_back_whole_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), &listener("echo", "tls", "echo", "")));
    let payload = big_body();
    for round in 0..2 {
        let sock = connect(server.addr("echo"));
        let (received, notified) = send_then_close_notify(sock, b"", &payload).unwrap();
        assert_eq!(received.len(), payload.len(), "round {round}: bytes echoed");
        assert!(received == payload, "round {round}: echo differs");
        assert!(
            notified,
            "round {round}: the server ended with close_notify"
        );
    }
}

/// Forward over TLS: the client's bytes and close_notify in one send reach the upstream, the
/// upstream's FIN follows them, and its whole answer comes back before the server's close_notify.
#[test]
fn forward_over_tls_relays_everything_before_a_close_notify() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr: SocketAddr = upstream.local_addr().unwrap();
    // The upstream reads to EOF (the relayed close_notify), then answers with what it read
    // twice, and closes.
    let upstream_thread = thread::spawn(move || {
        let (mut sock, _) = upstream.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        sock.read_to_end(&mut got).unwrap();
        sock.write_all(&got).unwrap();
        sock.write_all(&got).unwrap();
        got.len()
    });
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(
        dir.path(),
        &listener(
            "fwd",
            "tls",
            "forward",
            &format!("upstream = \"{upstream_addr}\""),
        ),
    ));
    let payload: Vec<u8> = big_body()[..1024 * 1024].to_vec();
    let started = Instant::now();
    let sock = connect(server.addr("fwd"));
    let (received, notified) = send_then_close_notify(sock, b"", &payload).unwrap();
    assert_eq!(
        upstream_thread.join().unwrap(),
        payload.len(),
        "upstream got it all"
    );
    assert_eq!(
        received.len(),
        2 * payload.len(),
        "after {:?}",
        started.elapsed()
    );
    assert!(received[..payload.len()] == payload[..] && received[payload.len()..] == payload[..]);
    assert!(notified, "the server ended with close_notify");
}
