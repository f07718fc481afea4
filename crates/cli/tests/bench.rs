//! End-to-end tests of `plexus bench` against a real `plexus serve`: every load mode finishes
//! a short bounded run with zero errors, every echoed byte verified and the JSON summary
//! complete; the adversarial modes report what the server did to their sockets (closed by
//! `idle_timeout` / `handshake_timeout`, kept open while bytes flow). Speed is never asserted.
//!
//! Transports or services this branch's server does not have (udp, dtls, http) are detected
//! with `plexus serve --check` and their cases are skipped with a message saying so.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use common::*;

/// Bound on one bench command (runs are 1–4 s plus setup).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A server with a tcp echo listener `tcp-echo` and a tls echo listener `tls-echo` using the
/// certificate in `cert_dir` (written by `plexus cert`).
fn start_server(cert_dir: &Path, server_extra: &str) -> Server {
    let cert = cert_dir.join("cert.pem");
    let key = cert_dir.join("key.pem");
    Server::start(&format!(
        r#"[server]
event_loops = 1
{server_extra}

[tls]
cert = {cert:?}
key = {key:?}

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"
"#
    ))
}

/// A temporary directory with `cert.pem` / `key.pem` for localhost and 127.0.0.1.
fn cert_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_plexus(
        &["cert", "--out", dir.path().to_str().expect("utf-8 path")],
        None,
        RUN_TIMEOUT,
    );
    out.assert_code(0);
    dir
}

/// Runs `plexus bench ARGS`, expects `code`, and returns the one JSON line it printed.
fn bench(args: &[&str], code: i32) -> Value {
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    let out = run_plexus(&full, None, RUN_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(code);
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one JSON line on stdout expected, got:\n{stdout}\nstderr:\n{}",
        out.stderr
    );
    let json: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", lines[0]));
    for key in [
        "mode",
        "addr",
        "connections",
        "size",
        "pipeline",
        "rate",
        "duration_s",
        "bytes",
        "throughput_per_s",
        "errors",
        "errors_total",
        "latency_us",
        "verified",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key:?}: {json}");
    }
    for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(
            json["latency_us"].get(key).is_some(),
            "latency_us lacks {key:?}: {json}"
        );
    }
    for kind in ["refused", "reset", "timeout", "mismatch", "tls"] {
        assert!(
            json["errors"][kind].is_u64(),
            "errors.{kind} missing: {json}"
        );
    }
    json
}

/// Asserts a load run was clean: no error, verified, something measured.
fn assert_clean(json: &Value, unit: &str) {
    assert_eq!(json["errors_total"], 0, "errors: {json}");
    assert_eq!(json["verified"], true, "not verified: {json}");
    assert!(json[unit].as_u64().unwrap_or(0) > 0, "no {unit}: {json}");
    assert!(json["latency_us"]["p50"].is_number(), "no latency: {json}");
    let p50 = json["latency_us"]["p50"].as_f64().unwrap_or(f64::NAN);
    let p99 = json["latency_us"]["p99"].as_f64().unwrap_or(f64::NAN);
    let max = json["latency_us"]["max"].as_f64().unwrap_or(f64::NAN);
    assert!(p50 <= p99 && p99 <= max, "percentiles out of order: {json}");
}

fn s(addr: std::net::SocketAddr) -> String {
    addr.to_string()
}

fn ca(dir: &Path) -> String {
    PathBuf::from(dir)
        .join("cert.pem")
        .to_str()
        .expect("utf-8")
        .to_owned()
}

#[test]
fn tcp_echo_closed_loop_is_error_free_and_byte_verified() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "");
    let addr = s(server.addr("tcp-echo"));
    let json = bench(
        &[
            "tcp-echo",
            "--addr",
            &addr,
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "8",
            "--size",
            "100",
            "--pipeline",
            "3",
            "--threads",
            "2",
        ],
        0,
    );
    assert_clean(&json, "messages");
    assert_eq!(json["mode"], "tcp-echo");
    assert_eq!(json["addr"], addr.as_str());
    assert_eq!(json["connections"], 8);
    assert_eq!(json["size"], 100);
    assert_eq!(json["pipeline"], 3);
    assert!(json["rate"].is_null(), "closed loop has no rate: {json}");
    assert_eq!(json["unanswered"], 0);
    // Every measured message is 100 echoed bytes.
    assert!(json["bytes"].as_u64().unwrap_or(0) >= json["messages"].as_u64().unwrap_or(1));
}

#[test]
fn tls_echo_with_verified_certificate_is_error_free() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "");
    let addr = s(server.addr("tls-echo"));
    let ca = ca(certs.path());
    for version in ["1.2", "1.3"] {
        let json = bench(
            &[
                "tls-echo",
                "--addr",
                &addr,
                "--ca",
                &ca,
                "--sni",
                "localhost",
                "--tls-version",
                version,
                "--duration",
                "1s",
                "--warmup",
                "200ms",
                "--connections",
                "6",
                "--size",
                "5000",
                "--pipeline",
                "2",
            ],
            0,
        );
        assert_clean(&json, "messages");
        assert_eq!(json["certificates_verified"], true);
        let negotiated = json["tls"].as_str().unwrap_or_default();
        let want = if version == "1.2" {
            "TLSv1_2"
        } else {
            "TLSv1_3"
        };
        assert!(negotiated.starts_with(want), "asked {version}, got {json}");
    }
}

#[test]
fn tls_echo_against_an_untrusted_certificate_counts_tls_errors_and_exits_1() {
    let certs = cert_dir();
    let other = cert_dir();
    let server = start_server(certs.path(), "");
    let json = bench(
        &[
            "tls-echo",
            "--addr",
            &s(server.addr("tls-echo")),
            "--ca",
            &ca(other.path()),
            "--sni",
            "localhost",
            "--duration",
            "200ms",
            "--warmup",
            "0s",
            "--connections",
            "3",
        ],
        1,
    );
    assert_eq!(json["errors"]["tls"], 3, "{json}");
    assert_eq!(json["verified"], false);
}

#[test]
fn open_loop_rate_sends_on_schedule_and_answers_everything() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "");
    let json = bench(
        &[
            "tcp-echo",
            "--addr",
            &s(server.addr("tcp-echo")),
            "--rate",
            "400",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "4",
        ],
        0,
    );
    assert_clean(&json, "messages");
    assert_eq!(json["rate"], 400.0);
    // The schedule, not the server, decides how many are sent: 400 in the 1 s window.
    let sent = json["sent"].as_u64().unwrap_or(0);
    assert!(
        (395..=405).contains(&sent),
        "sent {sent} at 400/s for 1 s: {json}"
    );
    assert_eq!(
        json["messages"], sent,
        "every scheduled message answered: {json}"
    );
    assert_eq!(json["unanswered"], 0);
    assert!(json["max_backlog_per_connection"].is_u64());
}

#[test]
fn connect_rate_tcp_tls_full_and_resumed_are_error_free() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "");
    let ca = ca(certs.path());
    let tcp = bench(
        &[
            "connect-rate",
            "--addr",
            &s(server.addr("tcp-echo")),
            "--duration",
            "1s",
            "--warmup",
            "100ms",
            "--connections",
            "4",
        ],
        0,
    );
    assert_clean(&tcp, "handshakes");
    assert_eq!(tcp["transport"], "tcp");

    let tls_addr = s(server.addr("tls-echo"));
    let full = bench(
        &[
            "connect-rate",
            "--tls",
            "--addr",
            &tls_addr,
            "--ca",
            &ca,
            "--sni",
            "localhost",
            "--duration",
            "1s",
            "--warmup",
            "100ms",
            "--connections",
            "2",
        ],
        0,
    );
    assert_clean(&full, "handshakes");
    assert_eq!(full["resumed_handshakes"], 0, "{full}");
    assert_eq!(full["full_handshakes"], full["handshakes"]);

    let resumed = bench(
        &[
            "connect-rate",
            "--tls",
            "--resume",
            "--addr",
            &tls_addr,
            "--ca",
            &ca,
            "--sni",
            "localhost",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "2",
        ],
        0,
    );
    assert_clean(&resumed, "handshakes");
    assert!(
        resumed["resumed_handshakes"].as_u64().unwrap_or(0) > 0,
        "--resume resumed nothing: {resumed}"
    );
}

#[test]
fn idle_flood_sockets_are_closed_by_the_idle_timeout() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "idle_timeout = \"1s\"");
    for (addr, tls) in [
        (s(server.addr("tcp-echo")), false),
        (s(server.addr("tls-echo")), true),
    ] {
        let mut args = vec![
            "idle-flood",
            "--addr",
            &addr,
            "--connections",
            "20",
            "--echo-first",
            "32",
            "--duration",
            "4s",
        ];
        let ca = ca(certs.path());
        if tls {
            args.extend(["--tls", "--ca", &ca, "--sni", "localhost"]);
        }
        let json = bench(&args, 0);
        assert_eq!(json["opened"], 20, "{json}");
        assert_eq!(json["errors_total"], 0, "{json}");
        assert_eq!(
            json["verified"], true,
            "the first echo of each socket: {json}"
        );
        assert_eq!(json["closed_by_server"], 20, "idle_timeout = 1s: {json}");
        assert_eq!(json["still_open"], 0);
        let first = json["close_after_ms"]["min"].as_f64().unwrap_or(0.0);
        assert!(first >= 900.0, "closed before the idle timeout: {json}");
    }
}

#[test]
fn handshake_flood_sockets_are_closed_by_the_handshake_timeout() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "handshake_timeout = \"1s\"");
    let addr = s(server.addr("tls-echo"));
    for partial in [true, false] {
        let mut args = vec![
            "handshake-flood",
            "--addr",
            &addr,
            "--connections",
            "15",
            "--duration",
            "4s",
            "--insecure",
        ];
        if partial {
            args.push("--partial");
        }
        let json = bench(&args, 0);
        assert_eq!(json["opened"], 15, "{json}");
        assert_eq!(
            json["closed_by_server"], 15,
            "handshake_timeout = 1s: {json}"
        );
        assert_eq!(json["still_open"], 0);
        assert_eq!(json["partial"], partial);
        let first = json["close_after_ms"]["min"].as_f64().unwrap_or(0.0);
        assert!(
            first >= 900.0,
            "closed before the handshake timeout: {json}"
        );
        if !partial {
            // A complete ClientHello gets the server's first flight before the silence.
            assert!(json["bytes_received"].as_u64().unwrap_or(0) > 0, "{json}");
        }
    }
}

#[test]
fn slowloris_keeps_an_echo_session_alive_and_is_dropped_by_a_tls_listener() {
    let certs = cert_dir();
    let server = start_server(certs.path(), "idle_timeout = \"1s\"");
    // Echo: every dribbled byte comes back, so the idle timeout never fires.
    let echo = bench(
        &[
            "slowloris",
            "--addr",
            &s(server.addr("tcp-echo")),
            "--connections",
            "5",
            "--interval",
            "200ms",
            "--duration",
            "2500ms",
        ],
        0,
    );
    assert_eq!(echo["opened"], 5, "{echo}");
    assert_eq!(
        echo["still_open"], 5,
        "dribbling keeps echo sessions open: {echo}"
    );
    assert!(echo["bytes_received"].as_u64().unwrap_or(0) > 0, "{echo}");
    // TLS: an HTTP request head is not a ClientHello; every socket is closed.
    let tls = bench(
        &[
            "slowloris",
            "--addr",
            &s(server.addr("tls-echo")),
            "--connections",
            "5",
            "--interval",
            "100ms",
            "--duration",
            "3s",
        ],
        0,
    );
    assert_eq!(tls["closed_by_server"], 5, "{tls}");
}

#[test]
fn udp_echo_is_error_free_and_byte_verified() {
    let server = Server::start(
        "[[listener]]\nname = \"udp-echo\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"echo\"\n",
    );
    let json = bench(
        &[
            "udp-echo",
            "--addr",
            &s(server.addr("udp-echo")),
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "4",
            "--size",
            "200",
        ],
        0,
    );
    assert_clean(&json, "messages");
    assert_eq!(json["lost"], 0);
}

/// A server with one dtls echo listener `dtls-echo` presenting the certificate in `cert_dir`.
fn start_dtls_server(cert_dir: &Path) -> Server {
    let cert = cert_dir.join("cert.pem");
    let key = cert_dir.join("key.pem");
    Server::start(&format!(
        "[server]\nevent_loops = 1\n\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\n[[listener]]\n\
         name = \"dtls-echo\"\ntransport = \"dtls\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    ))
}

#[test]
fn dtls_echo_closed_loop_is_error_free_and_every_record_verified() {
    let certs = cert_dir();
    let server = start_dtls_server(certs.path());
    let json = bench(
        &[
            "dtls-echo",
            "--addr",
            &s(server.addr("dtls-echo")),
            "--insecure",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "4",
            "--pipeline",
            "2",
            "--size",
            "1100",
        ],
        0,
    );
    assert_eq!(json["mode"], "dtls-echo", "{json}");
    assert_clean(&json, "messages");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["errors"]["tls"], 0, "{json}");
    assert_eq!(json["size"], 1100, "{json}");
}

#[test]
fn dtls_echo_open_loop_verifies_the_server_with_ca_and_keeps_the_rate() {
    let certs = cert_dir();
    let server = start_dtls_server(certs.path());
    let ca = certs.path().join("cert.pem");
    let json = bench(
        &[
            "dtls-echo",
            "--addr",
            &s(server.addr("dtls-echo")),
            "--ca",
            ca.to_str().expect("utf-8"),
            "--rate",
            "400",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "4",
        ],
        0,
    );
    assert_clean(&json, "messages");
    assert_eq!(json["rate"], 400.0, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    // Open loop: what was scheduled in the window is what came back (a count, not a speed).
    assert_eq!(json["sent"], json["messages"], "{json}");
}

#[test]
fn dtls_echo_counts_a_certificate_it_cannot_verify_as_a_tls_error() {
    let certs = cert_dir();
    let server = start_dtls_server(certs.path());
    // Trusting a different self-signed certificate: every handshake fails verification.
    let other = cert_dir();
    let ca = other.path().join("cert.pem");
    let json = bench(
        &[
            "dtls-echo",
            "--addr",
            &s(server.addr("dtls-echo")),
            "--ca",
            ca.to_str().expect("utf-8"),
            "--duration",
            "200ms",
            "--warmup",
            "0s",
            "--connections",
            "3",
        ],
        1,
    );
    assert_eq!(json["errors"]["tls"], 3, "{json}");
    assert_eq!(json["verified"], false, "{json}");
}

#[test]
fn http_keep_alive_get_is_error_free() {
    let server = Server::start(
        "[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n",
    );
    let json = bench(
        &[
            "http",
            "--addr",
            &s(server.addr("http")),
            "--path",
            "/healthz",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "4",
            "--pipeline",
            "2",
        ],
        0,
    );
    assert_clean(&json, "requests");
}

#[test]
fn dtls_hello_flood_sends_client_hellos_from_many_loopback_sources() {
    // A plain UDP socket stands in for the target: it records who sent what, and never
    // answers (which is what the flood expects of a cookie-less server too).
    let target = UdpSocket::bind("127.0.0.1:0").expect("bind");
    target
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let addr = target.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let mut sources = std::collections::HashSet::new();
        let mut hellos = 0;
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = target.recv_from(&mut buf) {
            // DTLS 1.2 handshake record carrying a ClientHello.
            if n > 13 && buf[0] == 22 && buf[1..3] == [0xfe, 0xfd] && buf[13] == 1 {
                hellos += 1;
            }
            sources.insert(from.ip());
        }
        (hellos, sources.len())
    });
    let json = bench(
        &[
            "dtls-hello-flood",
            "--addr",
            &s(addr),
            "--sources",
            "50",
            "--rate",
            "500",
            "--duration",
            "1s",
        ],
        0,
    );
    let (hellos, sources) = reader.join().expect("reader");
    assert_eq!(json["sources"], 50, "{json}");
    assert_eq!(json["replies"], 0, "{json}");
    let sent = json["datagrams"].as_u64().unwrap_or(0);
    assert!(sent > 0, "{json}");
    assert_eq!(
        hellos, sent,
        "every datagram is a ClientHello that arrived: {json}"
    );
    assert_eq!(sources, 50, "distinct 127.x source addresses");
}

#[test]
fn bench_usage_errors_exit_2_naming_the_problem() {
    for (args, needle) in [
        (&["tcp-echo", "--size", "0"][..], "--size"),
        (&["tcp-echo", "--addr", "not-an-address"][..], "--addr"),
        (&["connect-rate", "--rate", "10"][..], "--rate"),
        (&["tcp-echo", "--rate=-3"][..], "--rate"),
        (&["udp-echo", "--size", "8"][..], "--size"),
        (&["dtls-echo", "--size", "1101"][..], "1100"),
        (&["dtls-echo", "--tls-version", "1.3"][..], "--tls-version"),
        (&["tcp-echo", "--tls"][..], "--tls"),
        (
            &["dtls-hello-flood", "--addr", "192.0.2.1:4444"][..],
            "loopback",
        ),
        (&["http", "--path", "no-slash"][..], "--path"),
    ] {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let out = run_plexus(&full, None, RUN_TIMEOUT);
        out.assert_no_panic();
        out.assert_code(2);
        out.assert_stderr_contains(needle);
    }
}

#[test]
fn nothing_listening_is_counted_as_refused_and_exits_1() {
    // Bind then drop: a loopback port with nobody behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let json = bench(
        &[
            "tcp-echo",
            "--addr",
            &addr,
            "--connections",
            "3",
            "--duration",
            "200ms",
        ],
        1,
    );
    assert_eq!(json["errors"]["refused"], 3, "{json}");
    assert_eq!(json["verified"], false);
}
