//! End-to-end tests of `service = "http"`: `curl` over http and https (files, HEAD, 304, ranges,
//! keep-alive reuse, a 4 MiB file through sendfile and through TLS), `/healthz` and `/metrics`,
//! pipelining, a malformed-request suite with the expected statuses, path traversal, and 200
//! slow-header clients that must not hold up anyone else.
//!
//! Every process is started on port 0 over loopback, killed by PID, and every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A document root with a page, a text file, a 4 MiB binary, a directory with an index, and a
/// symlink that points outside the root.
fn make_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("public");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), b"<h1>home</h1>\n").unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, plexus\n").unwrap();
    std::fs::write(root.join("docs/index.html"), b"<h1>docs</h1>\n").unwrap();
    let big: Vec<u8> = (0..4 * MIB).map(pattern_byte).collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
    std::fs::write(dir.join("secret.txt"), b"TOP SECRET\n").unwrap();
    std::os::unix::fs::symlink(dir.join("secret.txt"), root.join("escape.txt")).unwrap();
    root
}

fn http_config(root: &Path, extra_http: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "30s"

[http]
root = "{}"
{extra_http}

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"

[[listener]]
name = "https"
transport = "tls"
addr = "127.0.0.1:0"
service = "http"
"#,
        root.display()
    )
}

/// Runs curl with a time bound; returns (exit code, stdout, stderr). HTTP/1.1 only (https
/// listeners also offer h2 by ALPN, which `tests/h2.rs` covers).
fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let mut child = Command::new("curl")
        .args(["--max-time", "20", "-sS", "--http1.1"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let mut stdout = Vec::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), stdout, stderr)
}

/// One parsed response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (Content-Length framed; `head_only` for HEAD) from `stream`.
fn read_response(
    stream: &mut TcpStream,
    buffered: &mut Vec<u8>,
    head_only: bool,
) -> Option<Response> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let head_end = loop {
        if let Some(pos) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buffered.extend_from_slice(&chunk[..n]),
            Err(err) => panic!("reading a response head: {err}"),
        }
        assert!(Instant::now() < deadline, "response head did not arrive");
    };
    let head = String::from_utf8_lossy(&buffered[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    buffered.drain(..head_end);
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let length: usize = match (head_only, status) {
        (true, _) | (_, 100..=199 | 204 | 304) => 0,
        _ => response
            .header("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0),
    };
    while buffered.len() < length {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed inside a body"),
            Ok(n) => buffered.extend_from_slice(&chunk[..n]),
            Err(err) => panic!("reading a body: {err}"),
        }
        assert!(Instant::now() < deadline, "response body did not arrive");
    }
    response.body = buffered.drain(..length).collect();
    Some(response)
}

fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = connect(addr);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_response(&mut stream, &mut Vec::new(), false).expect("a response")
}

/// Whether the server closed `stream` (EOF or reset) within `within`, after any bytes it sent.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if is_reset(&err) => return true,
            Err(_) => return false,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

#[test]
fn curl_gets_files_head_304_ranges_and_reuses_the_connection_over_http_and_https() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    for (scheme, name) in [("http", "http"), ("https", "https")] {
        let base = format!("{scheme}://{}", server.addr(name));
        let insecure = if scheme == "https" { "-k" } else { "-s" };

        // Two URLs in one curl run: the second must reuse the first connection.
        let (code, out, err) = curl(&[
            insecure,
            "-v",
            &format!("{base}/hello.txt"),
            &format!("{base}/docs/"),
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, b"hello, plexus\n<h1>docs</h1>\n".to_vec(), "{scheme}");
        assert!(
            err.contains("Re-using existing connection") || err.contains("Reusing existing"),
            "{scheme}: curl -v shows no connection reuse:\n{err}"
        );

        // HEAD: headers only, with the length and validators of the file.
        let (code, out, err) = curl(&[insecure, "-I", &format!("{base}/hello.txt")]);
        assert_eq!(code, 0, "{err}");
        let head = String::from_utf8_lossy(&out).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-length: 14"), "{head}");
        assert!(head.contains("content-type: text/plain"), "{head}");
        let etag = head
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .expect("an ETag")
            .trim()
            .to_owned();
        assert!(head.contains("last-modified: "), "{head}");

        // Revalidation: the ETag gives 304 with no body.
        let (code, out, err) = curl(&[
            insecure,
            "-i",
            "-H",
            &format!("If-None-Match: {etag}"),
            &format!("{base}/hello.txt"),
        ]);
        assert_eq!(code, 0, "{err}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 304"), "{text}");
        assert!(!text.contains("hello, plexus"), "{text}");

        // A single range: 206 with exactly those bytes; past the end: 416.
        let (code, out, err) = curl(&[insecure, "-r", "1000-1099", &format!("{base}/big.bin")]);
        assert_eq!(code, 0, "{err}");
        let expected: Vec<u8> = (1000..1100).map(pattern_byte).collect();
        assert_eq!(out, expected, "{scheme}: range bytes");
        let (_, out, _) = curl(&[
            insecure,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-r",
            "99999999-",
            &format!("{base}/big.bin"),
        ]);
        assert_eq!(String::from_utf8_lossy(&out), "416");

        // The 4 MiB file (sendfile on http, TLS records on https), byte-exact.
        let (code, out, err) = curl(&[insecure, &format!("{base}/big.bin")]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.len() as u64, 4 * MIB, "{scheme}");
        assert!(
            check_pattern(0, &out).is_ok(),
            "{scheme}: big.bin corrupted"
        );

        let (_, out, _) = curl(&[insecure, &format!("{base}/healthz")]);
        assert_eq!(out, b"ok");
        let (_, out, _) = curl(&[
            insecure,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/missing"),
        ]);
        assert_eq!(String::from_utf8_lossy(&out), "404");
    }
}

#[test]
fn metrics_report_connections_handshakes_and_http_statuses_in_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let addr = server.addr("http");
    assert_eq!(get(addr, "/hello.txt").status, 200);
    assert_eq!(get(addr, "/nope").status, 404);
    let (code, _, err) = curl(&["-k", &format!("https://{}/healthz", server.addr("https"))]);
    assert_eq!(code, 0, "{err}");
    let mut bad = connect(addr);
    bad.write_all(b"BROKEN\r\n\r\n").unwrap();
    assert_eq!(
        read_response(&mut bad, &mut Vec::new(), false)
            .unwrap()
            .status,
        400
    );

    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(response.body).unwrap();
    let value = |sample: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    };
    assert!(value("plexus_connections_accepted_total") >= 5);
    assert!(value("plexus_tls_handshakes_total{result=\"ok\"}") >= 1);
    assert!(value("plexus_http_responses_total{class=\"2xx\"}") >= 2);
    assert!(value("plexus_http_responses_total{class=\"4xx\"}") >= 2);
    assert!(value("plexus_http_requests_rejected_total{status=\"400\"}") >= 1);
    assert_eq!(value("plexus_connections_refused_total{reason=\"acl\"}"), 0);
    assert!(value("plexus_http_request_duration_seconds_count") >= 3);
    assert!(
        value("plexus_sessions_open{transport=\"tcp\"}") >= 1,
        "this very request"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let mut stream = connect(server.addr("http"));
    let paths = [
        "/hello.txt",
        "/docs/",
        "/nope",
        "/healthz",
        "/big.bin",
        "/hello.txt",
    ];
    let mut batch = Vec::new();
    for _ in 0..20 {
        for path in paths {
            batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        }
    }
    // HEAD in the middle must not carry a body, or the framing of what follows breaks.
    batch.extend_from_slice(
        b"HEAD /big.bin HTTP/1.1\r\nHost: t\r\n\r\nGET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    stream.write_all(&batch).unwrap();
    let mut buffered = Vec::new();
    for round in 0..20 {
        for path in paths {
            let response = read_response(&mut stream, &mut buffered, false).expect("a response");
            let expected = match path {
                "/nope" => 404,
                _ => 200,
            };
            assert_eq!(response.status, expected, "round {round} {path}");
            match path {
                "/hello.txt" => assert_eq!(response.body, b"hello, plexus\n"),
                "/docs/" => assert_eq!(response.body, b"<h1>docs</h1>\n"),
                "/big.bin" => assert_eq!(response.body.len() as u64, 4 * MIB),
                _ => {}
            }
        }
    }
    let head = read_response(&mut stream, &mut buffered, true).unwrap();
    assert_eq!(head.header("content-length"), Some("4194304"));
    let last = read_response(&mut stream, &mut buffered, false).unwrap();
    assert_eq!(last.body, b"hello, plexus\n");
}

#[test]
fn malformed_requests_get_the_right_status_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(
        &root,
        "max_header_bytes = 4096\nmax_uri_bytes = 1024\nmax_body_bytes = 1000",
    ));
    let addr = server.addr("http");
    // A keep-alive client that must be served between every bad request.
    let mut good = connect(addr);
    let mut good_buf = Vec::new();

    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(5000));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "b".repeat(8000)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), 400),
        ("missing version", b"GET /\r\n\r\n".to_vec(), 400),
        ("bad header name", b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n".to_vec(), 400),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  folded\r\n\r\n".to_vec(), 400),
        ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n".to_vec(), 400),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("conflicting Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(), 400),
        ("Transfer-Encoding with Content-Length", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n".to_vec(), 400),
        ("body over max_body_bytes", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n".to_vec(), 413),
        ("URI over max_uri_bytes", long_uri.into_bytes(), 414),
        ("head over max_header_bytes", huge_header.into_bytes(), 431),
        ("unknown method", b"BREW /pot HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 501),
        // RFC 9112 6.3: chunked must be the final coding (else 400); an unknown one is 501.
        ("transfer coding not ending in chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), 400),
        ("unknown transfer coding", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip2, chunked\r\n\r\n".to_vec(), 501),
        ("dot-dot traversal", b"GET /../secret.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
        ("encoded dot-dot traversal", b"GET /%2e%2e/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
        ("encoded slash", b"GET /docs%2f..%2f..%2fsecret.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
        ("symlink escaping the root", b"GET /escape.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 403),
        ("absolute-form to a path outside", b"GET http://t/../../etc/passwd HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
    ];
    for (what, request, expected) in &cases {
        let mut bad = connect(addr);
        bad.write_all(request).unwrap();
        let mut buffered = Vec::new();
        let response = read_response(&mut bad, &mut buffered, false)
            .unwrap_or_else(|| panic!("{what}: closed without a response"));
        assert_eq!(
            response.status,
            *expected,
            "{what}: {:?}",
            String::from_utf8_lossy(&response.body)
        );
        assert!(
            !response.body.windows(10).any(|w| w == b"TOP SECRET"),
            "{what}: leaked the secret"
        );
        if response.status != 403 {
            // Refused requests close the connection (their framing cannot be trusted).
            assert!(
                closed_within(&mut bad, Duration::from_secs(5)),
                "{what}: not closed"
            );
        }
        write!(good, "GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let ok = read_response(&mut good, &mut good_buf, false).expect("good client served");
        assert_eq!(ok.status, 200, "after {what}");
    }
    server.assert_log(
        0,
        Duration::from_secs(5),
        "about a refused request",
        |line| line.contains("http request refused") && line.contains("status=400"),
    );
}

#[test]
fn slow_header_clients_are_closed_at_header_timeout_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, "header_timeout = \"2s\""));
    let addr = server.addr("http");
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200).map(|_| connect(addr)).collect();
    let request = b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nX-Slow: yes\r\n\r\n";
    // Dribble one byte a second on every slow connection while a normal client is served.
    let mut served = 0;
    for second in 0..3 {
        for stream in &mut slow {
            let _ = stream.write_all(&request[second..second + 1]);
        }
        for _ in 0..10 {
            let response = get(addr, "/hello.txt");
            assert_eq!(response.status, 200);
            served += 1;
        }
        thread::sleep(Duration::from_millis(700));
    }
    assert_eq!(served, 30);
    // Each slow client gets 408 and is closed, having sent only part of its head.
    for (index, stream) in slow.iter_mut().enumerate() {
        let mut buffered = Vec::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let response = read_response(stream, &mut buffered, false)
            .unwrap_or_else(|| panic!("slow client {index}: closed without 408"));
        assert_eq!(response.status, 408, "slow client {index}");
        assert!(
            closed_within(stream, Duration::from_secs(5)),
            "slow client {index} still open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let metrics = String::from_utf8(get(addr, "/metrics").body).unwrap();
    assert!(
        metrics.contains("plexus_http_requests_rejected_total{status=\"408\"} 200"),
        "{metrics}"
    );
}

#[test]
fn expect_100_continue_and_chunked_bodies_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let mut stream = connect(server.addr("http"));
    let mut buffered = Vec::new();
    // A chunked body on a GET is read and discarded; the connection stays usable.
    stream
        .write_all(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .unwrap();
    let first = read_response(&mut stream, &mut buffered, false).unwrap();
    assert_eq!(first.status, 200);
    stream
        .write_all(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let interim = read_response(&mut stream, &mut buffered, false).unwrap();
    assert_eq!(interim.status, 100);
    stream.write_all(b"abc").unwrap();
    let second = read_response(&mut stream, &mut buffered, false).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.body, b"hello, plexus\n");
    // A POST the server will refuse gets its final status at once instead of 100.
    stream
        .write_all(b"POST /hello.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let refused = read_response(&mut stream, &mut buffered, false).unwrap();
    assert_eq!(refused.status, 405);
}

#[test]
fn a_changed_file_is_served_fresh_once_file_cache_valid_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, "file_cache_valid = \"300ms\""));
    let addr = server.addr("http");
    assert_eq!(get(addr, "/hello.txt").body, b"hello, plexus\n");
    std::fs::write(root.join("hello.txt"), b"changed!\n").unwrap();
    let fresh = wait_until(Duration::from_secs(10), || {
        get(addr, "/hello.txt").body == b"changed!\n"
    });
    assert!(fresh, "the new content was never served");
    // A deleted file is gone too (no stale copy served forever).
    std::fs::remove_file(root.join("hello.txt")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || get(
        addr,
        "/hello.txt"
    )
    .status
        == 404));
}

#[test]
fn a_pipelining_client_that_does_not_read_costs_neither_memory_nor_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let addr = server.addr("http");
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let (rss_before, fds_before) = (rss_kib(server.pid()), fds(server.pid()));
    // 2,000 pipelined requests for a 4 MiB file (8 GiB of responses) that nobody reads.
    let mut greedy = connect_small_rcvbuf(addr, 4096);
    let batch = "GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n".repeat(2000);
    greedy.write_all(batch.as_bytes()).unwrap();
    thread::sleep(Duration::from_secs(1));
    let (rss_after, fds_after) = (rss_kib(server.pid()), fds(server.pid()));
    assert!(
        fds_after <= fds_before + 8,
        "pipelined requests hold descriptors: {fds_before} → {fds_after}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "pipelined requests hold memory: {rss_before} KiB → {rss_after} KiB"
    );
    // Everyone else is served meanwhile, and the greedy client gets its responses in order.
    assert_eq!(get(addr, "/hello.txt").status, 200);
    let mut buffered = Vec::new();
    for _ in 0..3 {
        let response = read_response(&mut greedy, &mut buffered, false).unwrap();
        assert_eq!(response.status, 200);
        assert!(check_pattern(0, &response.body).is_ok());
    }
}

/// Sends `request` (raw) on a new connection and reads one response.
fn exchange(addr: SocketAddr, request: &str) -> Response {
    let mut stream = connect(addr);
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut stream, &mut Vec::new(), false).expect("a response")
}

/// A named pipe under the root is refused at once (403) without blocking the event loop: with
/// one loop, a healthy client on another connection is served while the FIFO request would
/// still be pending if the open blocked (it used to wait forever for a writer).
#[test]
fn a_fifo_under_the_root_is_refused_without_blocking_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    std::fs::create_dir(root.join("fifodir")).unwrap();
    for fifo in [root.join("pipe"), root.join("fifodir/index.html")] {
        let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(status.success());
    }
    let config = http_config(&root, "").replace("event_loops = 2", "event_loops = 1");
    let server = Server::start(&config);
    let addr = server.addr("http");
    let mut fifo_client = connect(addr);
    fifo_client
        .write_all(b"GET /pipe HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    // The one loop is not stuck in open(2): another client is served meanwhile.
    let healthy = get(addr, "/hello.txt");
    assert_eq!(healthy.status, 200);
    assert_eq!(healthy.body, b"hello, plexus\n");
    let refused = read_response(&mut fifo_client, &mut Vec::new(), false).expect("a response");
    assert_eq!(refused.status, 403);
    // The same for a FIFO where a directory's index.html should be, over keep-alive.
    write!(fifo_client, "GET /fifodir/ HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let index = read_response(&mut fifo_client, &mut Vec::new(), false).expect("a response");
    assert_eq!(index.status, 403);
    assert_eq!(get(addr, "/hello.txt").status, 200);
}

/// If-Range (RFC 9110 §13.1.5): a range is honoured only under a validator that still matches
/// (the strong ETag, or exactly the Last-Modified date); a stale one gets the whole file (200).
#[test]
fn if_range_with_a_stale_validator_gets_the_full_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let base = format!("http://{}", server.addr("http"));
    let url = format!("{base}/hello.txt");
    let (code, out, err) = curl(&["-I", &url]);
    assert_eq!(code, 0, "{err}");
    let head = String::from_utf8_lossy(&out).into_owned();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    };
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    let ranged = |if_range: &str| {
        let (code, out, err) = curl(&[
            "-r",
            "0-4",
            "-H",
            &format!("If-Range: {if_range}"),
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        assert_eq!(code, 0, "{err}");
        String::from_utf8_lossy(&out).into_owned()
    };
    assert_eq!(ranged(&etag), "hello\n206");
    assert_eq!(ranged(&last_modified), "hello\n206");
    assert_eq!(ranged("\"stale-etag\""), "hello, plexus\n\n200");
    assert_eq!(ranged(&format!("W/{etag}")), "hello, plexus\n\n200");
    assert_eq!(
        ranged("Sun, 06 Nov 1994 08:49:37 GMT"),
        "hello, plexus\n\n200"
    );
}

/// A directory without its slash redirects (also once its index is cached), to one leading
/// slash (`//docs` must not become the protocol-relative `//docs/`), keeping the query.
#[test]
fn directory_redirects_survive_the_cache_collapse_slashes_and_keep_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let addr = server.addr("http");
    let base = format!("http://{addr}");
    // Fill the cache with docs/index.html, then ask for the directory without its slash.
    let (_, out, _) = curl(&[&format!("{base}/docs/")]);
    assert_eq!(out, b"<h1>docs</h1>\n");
    let (code, out, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("{base}/docs?lang=en"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("301 {base}/docs/?lang=en")
    );
    // curl -L follows it to the index.
    let (_, out, _) = curl(&["-L", &format!("{base}/docs")]);
    assert_eq!(out, b"<h1>docs</h1>\n");
    for (target, location) in [
        ("//docs", "/docs/"),
        ("///docs?x=1", "/docs/?x=1"),
        ("/docs", "/docs/"),
    ] {
        let response = exchange(
            addr,
            &format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(response.status, 301, "{target}");
        assert_eq!(response.header("location"), Some(location), "{target}");
    }
    // A file is not a directory.
    assert_eq!(get(addr, "/hello.txt/").status, 404);
}

/// An HTTP/1.0 client that asks for keep-alive is told the connection stays open, and it does.
#[test]
fn http10_keep_alive_is_announced_and_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let mut stream = connect(server.addr("http"));
    let mut buffered = Vec::new();
    for _ in 0..2 {
        stream
            .write_all(b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream, &mut buffered, false).expect("a response");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
        assert_eq!(response.body, b"hello, plexus\n");
    }
    // Without it, HTTP/1.0 closes.
    stream
        .write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        .unwrap();
    let response = read_response(&mut stream, &mut buffered, false).expect("a response");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(closed_within(&mut stream, Duration::from_secs(5)));
}

/// Absolute-form targets are accepted (RFC 9112 §3.2.2): curl through plexus as its "proxy"
/// sends `GET http://example.test/hello.txt`, which is served as `/hello.txt`.
#[test]
fn absolute_form_targets_are_served_as_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&http_config(&root, ""));
    let addr = server.addr("http");
    let (code, out, err) = curl(&[
        "-v",
        "-x",
        &format!("http://{addr}"),
        "http://example.test/hello.txt",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("GET http://example.test/hello.txt"),
        "curl did not send absolute-form:\n{err}"
    );
    assert_eq!(out, b"hello, plexus\n");
    let response = exchange(
        addr,
        "GET http://other.test HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"<h1>home</h1>\n");
    let response = exchange(
        addr,
        "GET http://t/docs?q HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.status, 301);
    assert_eq!(response.header("location"), Some("/docs/?q"));
}
