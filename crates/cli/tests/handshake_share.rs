//! `max_handshakes_per_ip`: one source address gets only its share of the handshake pool, so
//! silent connections from one host cannot starve every other client's TLS handshakes.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const LOCAL_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn config(server_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
handshake_timeout = "30s"
{server_extra}

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
"#
    )
}

/// `GET /metrics` over plain HTTP/1.0 (the server closes after the response).
fn metrics(addr: SocketAddr) -> String {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample line starting with `name` (labels included), or 0.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn refused(addr: SocketAddr, reason: &str) -> u64 {
    sample(
        &metrics(addr),
        &format!("plexus_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// A TLS echo through `plexus connect` (a real client) from 127.0.0.1.
fn assert_tls_client_served(addr: SocketAddr, what: &str) {
    let url = format!("tls://{addr}");
    let out = run_plexus(
        &["connect", &url, "--insecure"],
        Some(b"handshake still possible\n"),
        Duration::from_secs(20),
    );
    out.assert_no_panic();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "handshake still possible\n",
        "{what}: the TLS client from 127.0.0.1 (stderr: {})",
        out.stderr
    );
    out.assert_code(0);
}

/// 12 silent connections from 127.0.0.2 with a pool of 8 and a share of 4: the first 4 hold
/// their places, the rest are refused at once (`handshake_capacity_per_ip`, logged and
/// counted), and a TLS client from 127.0.0.1 still completes its handshake and echoes. On a
/// single shared pool the 8 first silent connections held every place and the client was
/// refused.
#[test]
fn silent_connections_from_one_host_cannot_take_the_handshake_pool() {
    let server = Server::start(&config("max_handshakes = 8\nmax_handshakes_per_ip = 4"));
    let tls = server.addr("tls-echo");
    let http = server.addr("http");
    let mark = server.log_mark();
    let silent: Vec<TcpStream> = (0..12).map(|_| connect_from(LOCAL_2, tls)).collect();
    assert!(
        wait_until(Duration::from_secs(10), || refused(
            http,
            "handshake_capacity_per_ip"
        ) == 8),
        "8 of the 12 silent connections refused for the per-IP share; metrics:\n{}",
        metrics(http)
    );
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "a refusal line naming handshake_capacity_per_ip",
        |l| l.contains("reason=handshake_capacity_per_ip") && l.contains("127.0.0.2"),
    );
    assert_tls_client_served(tls, "share of 4");
    assert_eq!(
        refused(http, "handshake_capacity"),
        0,
        "the pool itself was never full"
    );
    drop(silent);
}

/// Without the key, a host's share is an eighth of `max_handshakes`: 16 places give 2 per
/// host, so 16 silent connections from one host still leave room for everyone else.
#[test]
fn the_default_share_is_an_eighth_of_the_pool() {
    let server = Server::start(&config("max_handshakes = 16"));
    let tls = server.addr("tls-echo");
    let http = server.addr("http");
    let silent: Vec<TcpStream> = (0..16).map(|_| connect_from(LOCAL_2, tls)).collect();
    assert!(
        wait_until(Duration::from_secs(10), || refused(
            http,
            "handshake_capacity_per_ip"
        ) == 14),
        "14 of 16 refused; metrics:\n{}",
        metrics(http)
    );
    assert_tls_client_served(tls, "default share");
    drop(silent);
}

/// A share of 0 or above the pool is a configuration error naming the key (exit 2).
#[test]
fn a_share_outside_the_pool_is_refused_by_check() {
    for (value, why) in [("0", "at least 1"), ("9", "at most server.max_handshakes")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plexus.toml");
        std::fs::write(
            &path,
            config(&format!(
                "max_handshakes = 8\nmax_handshakes_per_ip = {value}"
            )),
        )
        .unwrap();
        let out = run_plexus(
            &["serve", "--check", "--config", path.to_str().unwrap()],
            None,
            Duration::from_secs(10),
        );
        out.assert_no_panic();
        out.assert_code(2);
        out.assert_stderr_contains("server.max_handshakes_per_ip");
        out.assert_stderr_contains(why);
    }
}
