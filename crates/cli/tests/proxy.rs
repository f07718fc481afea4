//! End-to-end tests of `proxy_protocol = true`: PROXY v1 and v2 headers from trusted sources,
//! the real client address used by ACLs and the per-IP cap, `curl --haproxy-protocol` over http
//! and https (the header before the ClientHello), and a malformed-header suite after which the
//! server keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn proxy_config(extra_server: &str, extra_listener: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
max_connections_per_ip = 1
{extra_server}

[[listener]]
name = "echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
proxy_protocol = true
{extra_listener}

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
proxy_protocol = true

[[listener]]
name = "https"
transport = "tls"
addr = "127.0.0.1:0"
service = "http"
proxy_protocol = true

[[listener]]
name = "plain"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

fn v1(source: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {source} 127.0.0.1 {port} 7000\r\n").into_bytes()
}

/// A PROXY v2 header (PROXY command, TCP over IPv4) with one TLV to skip.
fn v2(source: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21); // version 2, PROXY
    header.push(0x11); // AF_INET, STREAM
    let tlv = [0x04u8, 0x00, 0x03, b'a', b'b', b'c']; // PP2_TYPE_NOOP, 3 bytes
    let len = 12 + tlv.len() as u16;
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&7000u16.to_be_bytes());
    header.extend_from_slice(&tlv);
    header
}

fn with_header(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(header).unwrap();
    stream
}

#[test]
fn v1_and_v2_headers_are_accepted_and_the_real_client_counts_for_the_per_ip_cap() {
    let server = Server::start(&proxy_config("", ""));
    let addr = server.addr("echo");
    // v1, with the payload in the same segment as the header.
    let mut first = connect(addr);
    let mut bytes = v1("192.0.2.10", 4000);
    bytes.extend_from_slice(b"same segment\n");
    first.write_all(&bytes).unwrap();
    let mut got = vec![0u8; 13];
    first.read_exact(&mut got).unwrap();
    assert_eq!(got, b"same segment\n");
    // v2 from another client: served although the TCP source (127.0.0.1) is the same.
    let mut second = with_header(addr, &v2(Ipv4Addr::new(198, 51, 100, 7), 5000));
    assert_echo(&mut second, b"v2 client\n");
    // The per-IP cap (1) applies to the client named in the header, not to the balancer.
    let mut third = with_header(addr, &v1("192.0.2.10", 4001));
    assert_closed_without_echo(
        &mut third,
        Duration::from_secs(5),
        "second session of 192.0.2.10",
    );
    assert_echo(&mut first, b"first still served\n");
    server.assert_log(
        0,
        Duration::from_secs(5),
        "refusing the capped client",
        |line| line.contains("max_connections_per_ip") && line.contains("192.0.2.10"),
    );
}

#[test]
fn the_listener_acl_applies_to_the_client_named_in_the_header() {
    let server = Server::start(&proxy_config(
        "",
        "[listener.acl]\ndeny = [\"203.0.113.0/24\"]",
    ));
    let addr = server.addr("echo");
    let mut denied = with_header(addr, &v1("203.0.113.5", 1234));
    assert_closed_without_echo(&mut denied, Duration::from_secs(5), "denied client");
    let mut allowed = with_header(addr, &v1("192.0.2.99", 1234));
    assert_echo(&mut allowed, b"allowed\n");
    let metrics = http_get(server.addr("plain"), server.addr("http"));
    assert!(
        metrics.contains("plexus_connections_refused_total{reason=\"acl\"} 1"),
        "{metrics}"
    );
}

/// GET /metrics through the PROXY-speaking http listener (a v1 header first).
fn http_get(_plain: SocketAddr, http: SocketAddr) -> String {
    let mut stream = with_header(http, &v1("192.0.2.200", 9999));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn curl_with_haproxy_protocol_reaches_http_and_https_listeners() {
    let server = Server::start(&proxy_config("", ""));
    for url in [
        format!("http://{}/healthz", server.addr("http")),
        format!("https://{}/healthz", server.addr("https")),
    ] {
        let out = Command::new("curl")
            .args(["--max-time", "20", "-sS", "-k", "--haproxy-protocol", &url])
            .stdin(Stdio::null())
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"ok", "{url}");
    }
    // Without the header, the PROXY listener refuses what curl sends.
    let out = Command::new("curl")
        .args([
            "--max-time",
            "20",
            "-sS",
            &format!("http://{}/healthz", server.addr("http")),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "served without a PROXY header");
}

#[test]
fn malformed_missing_late_and_untrusted_headers_are_refused_and_others_keep_being_served() {
    let server = Server::start(&proxy_config("handshake_timeout = \"1s\"", ""));
    let addr = server.addr("echo");
    let mut bystander = with_header(addr, &v1("192.0.2.1", 1));
    assert_echo(&mut bystander, b"before\n");
    let long_v1 = format!("PROXY TCP4 {} 127.0.0.1 1 2\r\n", "1".repeat(200));
    let mut bad_v2_family = v2(Ipv4Addr::new(192, 0, 2, 3), 1);
    bad_v2_family[13] = 0x71; // unknown family
    let mut bad_v2_length = v2(Ipv4Addr::new(192, 0, 2, 4), 1);
    bad_v2_length[15] = 4; // shorter than an IPv4 address block
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no header at all", b"hello without a header\n".to_vec()),
        (
            "HTTP instead of PROXY",
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
        ),
        (
            "v1 with a bad address",
            b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n".to_vec(),
        ),
        (
            "v1 with a bad port",
            b"PROXY TCP4 192.0.2.1 127.0.0.1 70000 2\r\n".to_vec(),
        ),
        (
            "v1 family mismatch",
            b"PROXY TCP6 192.0.2.1 127.0.0.1 1 2\r\n".to_vec(),
        ),
        ("v1 without CRLF within 107 bytes", long_v1.into_bytes()),
        ("v2 with an unknown family", bad_v2_family),
        ("v2 with a short address block", bad_v2_length),
        ("binary garbage", vec![0xff; 64]),
    ];
    for (what, bytes) in cases {
        let mut stream = with_header(addr, &bytes);
        assert_closed_without_echo(&mut stream, Duration::from_secs(5), what);
        assert_echo(&mut bystander, what.as_bytes());
    }
    // A truncated header and silence: closed at handshake_timeout.
    let mut late = with_header(addr, b"PROXY TCP4 192.0.2.");
    assert_closed_without_echo(&mut late, Duration::from_secs(5), "truncated header");
    server.assert_log(0, Duration::from_secs(5), "about a bad header", |line| {
        line.contains("reason=proxy_header") && line.contains("malformed PROXY header")
    });
    assert_echo(&mut bystander, b"after\n");
}

#[test]
fn sources_outside_proxy_trusted_are_refused() {
    let server = Server::start(&proxy_config("", "proxy_trusted = [\"10.0.0.0/8\"]"));
    let mut stream = with_header(server.addr("echo"), &v1("192.0.2.1", 1));
    assert_closed_without_echo(&mut stream, Duration::from_secs(5), "untrusted balancer");
    server.assert_log(
        0,
        Duration::from_secs(5),
        "about the untrusted source",
        |line| line.contains("reason=proxy_header") && line.contains("listener=echo"),
    );
}
