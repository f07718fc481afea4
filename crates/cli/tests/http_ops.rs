//! End-to-end tests of the http service's operator settings, with real clients, over
//! HTTP/1.1, h2c (`curl --http2-prior-knowledge`) and h2 over TLS (`curl -k --http2`): the
//! access log (requests → one line each, combined and json, the PROXY client on a
//! `proxy_protocol` listener; `mv` + SIGUSR1 → a new file), precompressed files (`curl
//! --compressed`, raw `Accept-Encoding` offers, ranges of the encoded file, 304, HEAD, clients
//! without Accept-Encoding), and OCSP stapling (real responses made by `openssl ocsp`, checked
//! with `openssl s_client -status`, replaced and reloaded on SIGHUP).
//!
//! Every process is started on port 0 over loopback, killed by PID, and every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn make_root(dir: &Path) -> PathBuf {
    let root = dir.join("public");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, plexus\n").unwrap();
    root
}

fn config(root: &Path, http_extra: &str, tls_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2

[http]
root = "{}"
{http_extra}

{tls_extra}

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

[[listener]]
name = "proxied"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
proxy_protocol = true
"#,
        root.display()
    )
}

/// Runs curl with a time bound; returns (exit code, stdout, stderr).
fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let output = Command::new("curl")
        .args(["--max-time", "20", "-sS"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed");
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// curl with the response head written to stdout first (`-D -`): (head, body).
fn curl_head_body(args: &[&str]) -> (String, Vec<u8>) {
    let mut all = vec!["-D", "-"];
    all.extend_from_slice(args);
    let (code, out, err) = curl(&all);
    assert_eq!(code, 0, "curl {args:?}: {err}");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    (head, out[split + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Waits (bounded) until `path` holds at least `lines` lines; returns them.
fn wait_lines(path: &Path, lines: usize) -> Vec<String> {
    wait_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().count() >= lines
    });
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(str::to_owned).collect()
}

/// Sends one HTTP/1.1 request behind a PROXY v1 header naming `203.0.113.9:5555` as the
/// client, to the `proxied` listener; returns the response.
fn proxied_request(server: &Server, path: &str) -> String {
    let mut stream = connect(server.addr("proxied"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\nGET {path} HTTP/1.1\r\nHost: t\r\n\
         User-Agent: behind-proxy\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// A counter of `/metrics` (over HTTP/1.1 on the `http` listener).
fn metric(server: &Server, name: &str) -> Option<u64> {
    let (_, metrics, _) = curl(&[&format!("http://{}/metrics", server.addr("http"))]);
    String::from_utf8(metrics)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// N requests of several kinds, over HTTP/1.1, h2c, h2 over TLS and behind a PROXY header →
/// N combined lines with the client, request, protocol, status, bytes, referer, user-agent
/// and a duration.
#[test]
fn every_response_gets_one_combined_access_log_line_over_h1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let log = dir.path().join("access.log");
    let extra = format!("access_log = \"{}\"", log.display());
    let server = Server::start(&config(&root, &extra, ""));
    let base = format!("http://{}", server.addr("http"));
    let tls = format!("https://{}", server.addr("https"));
    let requests: [(&[&str], String); 7] = [
        (
            &["-e", "http://ref.test/page", "-A", "plexus-test/1"],
            format!("{base}/hello.txt"),
        ),
        (&["-I"], format!("{base}/hello.txt")),
        (&["-A", "quote\"agent"], format!("{base}/missing")),
        (&[], format!("{base}/healthz")),
        (&["-r", "0-4"], format!("{base}/hello.txt")),
        (
            &["--http2-prior-knowledge", "-e", "h2c.ref", "-A", "ua/h2c"],
            format!("{base}/hello.txt?q=1"),
        ),
        (
            &["-k", "--http2", "-I", "-A", "ua/h2"],
            format!("{tls}/hello.txt"),
        ),
    ];
    for (args, url) in &requests {
        let mut all = args.to_vec();
        all.push(url);
        let (code, _, err) = curl(&all);
        assert_eq!(code, 0, "{all:?}: {err}");
    }
    let response = proxied_request(&server, "/hello.txt");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lines = wait_lines(&log, 8);
    assert_eq!(lines.len(), 8, "{lines:#?}");
    let expected = [
        (
            "127.0.0.1",
            "\"GET /hello.txt HTTP/1.1\" 200 14 \"http://ref.test/page\" \"plexus-test/1\"",
        ),
        (
            "127.0.0.1",
            "\"HEAD /hello.txt HTTP/1.1\" 200 0 \"-\" \"curl/",
        ),
        (
            "127.0.0.1",
            "\"GET /missing HTTP/1.1\" 404 14 \"-\" \"quote\\x22agent\"",
        ),
        ("127.0.0.1", "\"GET /healthz HTTP/1.1\" 200 2 \"-\" \"curl/"),
        (
            "127.0.0.1",
            "\"GET /hello.txt HTTP/1.1\" 206 5 \"-\" \"curl/",
        ),
        (
            "127.0.0.1",
            "\"GET /hello.txt?q=1 HTTP/2.0\" 200 14 \"h2c.ref\" \"ua/h2c\"",
        ),
        (
            "127.0.0.1",
            "\"HEAD /hello.txt HTTP/2.0\" 200 0 \"-\" \"ua/h2\"",
        ),
        (
            "203.0.113.9",
            "\"GET /hello.txt HTTP/1.1\" 200 14 \"-\" \"behind-proxy\"",
        ),
    ];
    for (line, (client, fragment)) in lines.iter().zip(expected) {
        assert!(line.starts_with(&format!("{client} - - [")), "{line}");
        assert!(line.contains(" +0000] "), "{line}");
        assert!(line.contains(fragment), "{line} lacks {fragment}");
        let duration: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(duration >= 0.0, "{line}");
    }
    assert_eq!(metric(&server, "plexus_access_log_lines_total"), Some(8));
    assert_eq!(metric(&server, "plexus_access_log_dropped_total"), Some(0));
}

/// The json format: one object per line with every field, over HTTP/1.1, h2c, h2 over TLS
/// and behind a PROXY header.
#[test]
fn json_access_log_lines_carry_every_field_over_h1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let log = dir.path().join("access.json");
    let extra = format!(
        "access_log = \"{}\"\naccess_log_format = \"json\"",
        log.display()
    );
    let server = Server::start(&config(&root, &extra, ""));
    let http = format!("http://{}/hello.txt?x=1", server.addr("http"));
    let https = format!("https://{}/nothing", server.addr("https"));
    for _ in 0..2 {
        assert_eq!(curl(&["-A", "ua/1", "-e", "r.test", &http]).0, 0);
    }
    let h2c = [
        "--http2-prior-knowledge",
        "-A",
        "ua/1",
        "-e",
        "r.test",
        &http,
    ];
    assert_eq!(curl(&h2c).0, 0);
    assert_eq!(curl(&["-k", "--http2", &https]).0, 0);
    assert_eq!(curl(&["-k", "--http1.1", &https]).0, 0);
    assert!(proxied_request(&server, "/hello.txt").starts_with("HTTP/1.1 200"));
    let lines = wait_lines(&log, 6);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for (json, protocol) in parsed[..3].iter().zip(["HTTP/1.1", "HTTP/1.1", "HTTP/2.0"]) {
        assert_eq!(json["client"], "127.0.0.1", "{json}");
        assert!(json["client_port"].as_u64().unwrap() > 0, "{json}");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["target"], "/hello.txt?x=1");
        assert_eq!(json["protocol"], protocol);
        assert_eq!(json["status"], 200);
        assert_eq!(json["bytes"], 14);
        assert_eq!(json["referer"], "r.test");
        assert_eq!(json["user_agent"], "ua/1");
        assert!(json["duration_seconds"].as_f64().unwrap() >= 0.0);
        assert!(json["time"].as_str().unwrap().ends_with('Z'), "{json}");
    }
    for (json, protocol) in parsed[3..5].iter().zip(["HTTP/2.0", "HTTP/1.1"]) {
        assert_eq!(json["status"], 404, "{json}");
        assert_eq!(json["target"], "/nothing", "{json}");
        assert_eq!(json["protocol"], protocol, "{json}");
        assert_eq!(json["referer"], serde_json::Value::Null, "{json}");
    }
    assert_eq!(parsed[5]["client"], "203.0.113.9", "{}", parsed[5]);
    assert_eq!(parsed[5]["client_port"], 5555, "{}", parsed[5]);
    assert_eq!(parsed[5]["user_agent"], "behind-proxy", "{}", parsed[5]);
}

/// logrotate's convention: move the file, SIGUSR1, and the next lines (HTTP/1.1 and h2) go to
/// a new file at the configured path while the moved one keeps what was written before.
#[test]
fn sigusr1_after_moving_the_log_starts_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let log = dir.path().join("access.log");
    let extra = format!("access_log = \"{}\"", log.display());
    let mut server = Server::start(&config(&root, &extra, ""));
    let url = format!("http://{}/hello.txt", server.addr("http"));
    for _ in 0..3 {
        assert_eq!(curl(&[&url]).0, 0);
    }
    assert_eq!(wait_lines(&log, 3).len(), 3);
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let mark = server.log_mark();
    server.signal("USR1");
    server.assert_log(mark, Duration::from_secs(10), "about the reopen", |l| {
        l.contains("access log reopened")
    });
    assert_eq!(curl(&[&url]).0, 0);
    assert_eq!(curl(&["--http2-prior-knowledge", &url]).0, 0);
    let lines = wait_lines(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains("\"GET /hello.txt HTTP/1.1\" 200 14"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("\"GET /hello.txt HTTP/2.0\" 200 14"),
        "{lines:#?}"
    );
    server.assert_running("after SIGUSR1");
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        3
    );
}

/// `[http] access_log` values that cannot work are refused by `--check` (exit 2), naming
/// the key.
#[test]
fn bad_access_log_and_precompressed_values_are_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    for (extra, needle) in [
        (
            "access_log = \"/nonexistent-dir/access.log\"".to_owned(),
            "http.access_log",
        ),
        (
            "access_log = \"stderr\"\naccess_log_format = \"xml\"".to_owned(),
            "access_log_format",
        ),
        (
            "precompressed = [\"gzip\", \"deflate\"]".to_owned(),
            "http.precompressed[1]",
        ),
        ("access_log_queue = 0".to_owned(), "http.access_log_queue"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config(&root, &extra, "")).unwrap();
        let out = run_plexus(
            &["serve", "--check", "--config", path.to_str().unwrap()],
            None,
            Duration::from_secs(20),
        );
        out.assert_code(2);
        out.assert_stderr_contains(needle);
    }
}

/// A real brotli encoding of `data` (libbrotlienc, through Python's ctypes: Debian ships the
/// library with curl but no `brotli` command).
fn brotli(data: &[u8], dir: &Path) -> Vec<u8> {
    let input = dir.join("brotli.in");
    let output = dir.join("brotli.out");
    std::fs::write(&input, data).unwrap();
    let script = r#"
import ctypes, sys
lib = ctypes.CDLL("libbrotlienc.so.1")
data = open(sys.argv[1], "rb").read()
out = ctypes.create_string_buffer(len(data) + 1024)
size = ctypes.c_size_t(len(out))
if not lib.BrotliEncoderCompress(11, 22, 0, ctypes.c_size_t(len(data)), data, ctypes.byref(size), out):
    sys.exit("BrotliEncoderCompress failed")
open(sys.argv[2], "wb").write(out.raw[:size.value])
"#;
    let status = Command::new("timeout")
        .args(["20", "python3", "-c", script])
        .arg(&input)
        .arg(&output)
        .status()
        .expect("python3 installed");
    assert!(status.success(), "brotli via libbrotlienc");
    std::fs::read(output).unwrap()
}

/// `x.br` / `x.gz` / `x.zst` next to `x`, chosen by Accept-Encoding: curl --compressed over
/// HTTP/1.1, h2c and h2 over TLS gets the encoded bytes with their headers; q-values, `q=0`,
/// `*` and identity preferences; ranges, HEAD and 304 of the encoded representation; clients
/// without Accept-Encoding get the file itself.
#[test]
fn precompressed_variants_follow_accept_encoding_over_h1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let text: Vec<u8> = (0..2000)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    std::fs::write(root.join("page.txt"), &text).unwrap();
    for tool in [&["gzip", "-k", "-9"][..], &["zstd", "-q", "-k"]] {
        let status = Command::new(tool[0])
            .args(&tool[1..])
            .arg(root.join("page.txt"))
            .status()
            .expect("gzip/zstd installed");
        assert!(status.success(), "{tool:?}");
    }
    let br = brotli(&text, dir.path());
    std::fs::write(root.join("page.txt.br"), &br).unwrap();
    let gz = std::fs::read(root.join("page.txt.gz")).unwrap();
    let zst = std::fs::read(root.join("page.txt.zst")).unwrap();
    assert!(br.len() < text.len() && gz.len() < text.len());
    let server = Server::start(&config(
        &root,
        "precompressed = [\"br\", \"zstd\", \"gzip\"]",
        "",
    ));
    let http = format!("http://{}/page.txt", server.addr("http"));
    let https = format!("https://{}/page.txt", server.addr("https"));
    let clients: [(&str, &[&str], &str); 3] = [
        ("HTTP/1.1", &[], &http),
        ("h2c", &["--http2-prior-knowledge"], &http),
        ("h2", &["-k", "--http2"], &https),
    ];
    for (name, proto, url) in clients {
        let get = |args: &[&str]| {
            let mut all = proto.to_vec();
            all.extend_from_slice(args);
            all.push(url);
            curl_head_body(&all)
        };
        // No Accept-Encoding: identity, with Vary.
        let (head, body) = get(&[]);
        assert_eq!(body, text, "{name}");
        assert_eq!(header(&head, "content-encoding"), None, "{name}: {head}");
        assert_eq!(
            header(&head, "vary"),
            Some("Accept-Encoding"),
            "{name}: {head}"
        );
        let identity_etag = header(&head, "etag").unwrap().to_owned();

        // curl --compressed offers what it decodes and decodes what it gets.
        for (coding, encoded) in [("gzip", &gz), ("br", &br), ("zstd", &zst)] {
            let offer = format!("Accept-Encoding: {coding}");
            let (head, body) = get(&["--compressed", "-H", &offer]);
            assert_eq!(body, text, "{name}: curl decoded the {coding} variant");
            assert_eq!(
                header(&head, "content-encoding"),
                Some(coding),
                "{name}: {head}"
            );
            assert_eq!(
                header(&head, "content-length"),
                Some(encoded.len().to_string().as_str()),
                "{name}: {head}"
            );
            // The raw bytes, as sent.
            let (raw_head, raw) = get(&["-H", &offer]);
            assert_eq!(&raw, encoded, "{name} {coding}");
            assert_eq!(header(&raw_head, "vary"), Some("Accept-Encoding"));
            let etag = header(&raw_head, "etag").unwrap();
            assert_ne!(etag, identity_etag, "{name} {coding}");
        }
        // What curl --compressed sends by itself (all q=1): the configured preference, br.
        let (head, body) = get(&["--compressed"]);
        assert_eq!(
            header(&head, "content-encoding"),
            Some("br"),
            "{name}: {head}"
        );
        assert_eq!(body, text);
        // q-values, q=0 and `*`.
        for (offer, coding, encoded) in [
            ("gzip;q=0.5, zstd;q=0.9", Some("zstd"), &zst),
            ("br;q=0, zstd;q=0, gzip", Some("gzip"), &gz),
            ("br;q=0, *;q=0.3", Some("zstd"), &zst),
            ("gzip;q=0, br;q=0, zstd;q=0", None, &text),
            ("identity, gzip;q=0.5", None, &text),
            ("deflate", None, &text),
        ] {
            let (head, body) = get(&["-H", &format!("Accept-Encoding: {offer}")]);
            assert_eq!(
                header(&head, "content-encoding"),
                coding,
                "{name} {offer}: {head}"
            );
            assert_eq!(&body, encoded, "{name} {offer}");
        }

        // A range applies to the encoded representation.
        let (head, body) = get(&["-H", "Accept-Encoding: gzip", "-r", "0-9"]);
        assert!(head.contains(" 206"), "{name}: {head}");
        assert_eq!(body, &gz[..10], "{name}");
        assert_eq!(
            header(&head, "content-range"),
            Some(format!("bytes 0-9/{}", gz.len()).as_str()),
            "{name}"
        );
        assert_eq!(header(&head, "content-encoding"), Some("gzip"), "{name}");
        // HEAD says what GET would send.
        // (curl -I prints the head on stdout as -D does: only the head is looked at.)
        let (head, _) = get(&["-I", "-H", "Accept-Encoding: gzip"]);
        assert_eq!(
            header(&head, "content-encoding"),
            Some("gzip"),
            "{name}: {head}"
        );
        assert_eq!(
            header(&head, "content-length"),
            Some(gz.len().to_string().as_str()),
            "{name}: {head}"
        );
        let gzip_etag = header(&head, "etag").unwrap().to_owned();
        // Its own ETag revalidates it (304); the identity one does not.
        let inm = format!("If-None-Match: {gzip_etag}");
        let (head, body) = get(&["-H", "Accept-Encoding: gzip", "-H", &inm]);
        assert!(head.contains(" 304"), "{name}: {head}");
        assert!(body.is_empty());
        assert_eq!(header(&head, "etag"), Some(gzip_etag.as_str()), "{name}");
        assert_eq!(header(&head, "vary"), Some("Accept-Encoding"), "{name}");
        let (head, body) = get(&["-H", &inm]);
        assert!(head.contains(" 200"), "{name}: {head}");
        assert_eq!(body, text, "{name}");
    }
    // A file without variants is served as itself to a client that takes gzip.
    let (head, body) = curl_head_body(&[
        "-H",
        "Accept-Encoding: gzip",
        &format!("http://{}/hello.txt", server.addr("http")),
    ]);
    assert_eq!(header(&head, "content-encoding"), None);
    assert_eq!(body, b"hello, plexus\n");
}
/// Runs `openssl ARGS` in `dir`, asserting success.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl installed");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate it signed, and a real OCSP response for it (`openssl ocsp` as
/// a responder over an index file), in `dir`.
fn make_pki_with_ocsp(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    ca.extend(["-subj", "/CN=plexus test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    csr.extend(["-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let serial = Command::new("openssl")
        .args(["x509", "-in", "server.pem", "-noout", "-serial"])
        .current_dir(dir)
        .output()
        .unwrap();
    let serial = String::from_utf8(serial.stdout).unwrap();
    let serial = serial.trim().trim_start_matches("serial=");
    // The same certificate as valid, then as revoked: two real responses that differ.
    let entries = [
        (
            "index.txt",
            format!("V\t301231235959Z\t\t{serial}\tunknown\t/CN=localhost\n"),
        ),
        (
            "index-revoked.txt",
            format!("R\t301231235959Z\t250101000000Z\t{serial}\tunknown\t/CN=localhost\n"),
        ),
    ];
    for (index, line) in &entries {
        std::fs::write(dir.join(index), line).unwrap();
    }
    ocsp_response(dir, "index-revoked.txt", "ocsp-revoked.der");
    ocsp_response(dir, "index.txt", "ocsp.der");
}

/// `openssl ocsp` as a responder over `index`: the response for server.pem, into `out`.
fn ocsp_response(dir: &Path, index: &str, out: &str) {
    openssl(
        dir,
        &[
            "ocsp",
            "-index",
            index,
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-issuer",
            "ca.pem",
            "-cert",
            "server.pem",
            "-respout",
            out,
            "-ndays",
            "1",
        ],
    );
}

/// `openssl s_client -status` against `addr` (SNI `localhost`): its stdout.
fn s_client_status(addr: std::net::SocketAddr, extra: &[&str]) -> String {
    s_client_status_as(addr, "localhost", extra)
}

/// `openssl s_client -status -servername NAME` against `addr`: its stdout.
fn s_client_status_as(addr: std::net::SocketAddr, name: &str, extra: &[&str]) -> String {
    let mut child = Command::new("timeout")
        .args(["20", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(["-servername", name, "-status"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl installed");
    let mut stdin = child.stdin.take().unwrap();
    let _ =
        stdin.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    drop(stdin);
    let _ = child.wait();
    out
}

/// OCSP stapling from a file: openssl s_client -status sees the response (TLS 1.3 and 1.2,
/// HTTP/1.1 inside); a new response file + SIGHUP is served from the next handshake; a broken
/// file on SIGHUP is refused and the stapled one stays; an unreadable one fails `--check`.
#[test]
fn ocsp_response_from_a_file_is_stapled_and_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_pki_with_ocsp(&pki);
    let ca = format!("{}/ca.pem", pki.display());
    let tls = format!(
        "[tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nocsp = \"{0}/ocsp.der\"\n",
        pki.display()
    );
    let mut server = Server::start(&config(&root, "", &tls));
    let addr = server.addr("https");
    for version in ["-tls1_3", "-tls1_2"] {
        let out = s_client_status(addr, &[version, "-CAfile", &ca]);
        assert!(
            out.contains("OCSP Response Status: successful"),
            "{version}: {out}"
        );
        assert!(out.contains("Cert Status: good"), "{version}: {out}");
        assert!(out.contains("hello, plexus"), "{version}: {out}");
    }
    // A new response (the certificate now revoked) + SIGHUP: served from the next handshake.
    std::fs::copy(pki.join("ocsp-revoked.der"), pki.join("ocsp.der")).unwrap();
    let mark = server.log_mark();
    server.signal("HUP");
    server.assert_log(mark, Duration::from_secs(10), "about the reload", |l| {
        l.contains("certificate(s) loaded")
    });
    let out = s_client_status(addr, &["-CAfile", &ca]);
    assert!(out.contains("OCSP Response Status: successful"), "{out}");
    assert!(out.contains("Cert Status: revoked"), "{out}");

    // A broken OCSP file is refused on reload; the last good response stays stapled.
    std::fs::write(pki.join("ocsp.der"), b"not an OCSP response").unwrap();
    let mark = server.log_mark();
    server.signal("HUP");
    server.assert_log(
        mark,
        Duration::from_secs(10),
        "about the refused reload",
        |l| l.contains("reload failed") && l.contains("ocsp"),
    );
    let out = s_client_status(addr, &["-CAfile", &ca]);
    assert!(out.contains("Cert Status: revoked"), "{out}");
    server.assert_running("after the refused reload");

    // An unreadable (here: missing) file is a configuration error naming the key.
    let missing = tls.replace("ocsp.der", "missing.der");
    let path = dir.path().join("missing.toml");
    std::fs::write(&path, config(&root, "", &missing)).unwrap();
    let out = run_plexus(
        &["serve", "--check", "--config", path.to_str().unwrap()],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(2);
    out.assert_stderr_contains("tls.ocsp");
    out.assert_stderr_contains("missing.der");
}

/// An `[[tls.sni]]` entry staples its own OCSP response: a client naming it gets that
/// response with the entry's certificate; a client naming another host gets the default
/// certificate, which has none, and nothing stapled.
#[test]
fn an_sni_certificate_staples_its_own_ocsp_response() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_pki_with_ocsp(&pki);
    // The default certificate: self-signed for another name, no OCSP response.
    openssl(
        &pki,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "default.key",
            "-out",
            "default.pem",
            "-days",
            "2",
            "-subj",
            "/CN=default.test",
        ],
    );
    let tls = format!(
        "[tls]\ncert = \"{0}/default.pem\"\nkey = \"{0}/default.key\"\n\n\
         [[tls.sni]]\nnames = [\"localhost\"]\ncert = \"{0}/server.pem\"\n\
         key = \"{0}/server.key\"\nocsp = \"{0}/ocsp.der\"\n",
        pki.display()
    );
    let server = Server::start(&config(&root, "", &tls));
    let addr = server.addr("https");
    let ca = format!("{}/ca.pem", pki.display());
    for version in ["-tls1_3", "-tls1_2"] {
        let out = s_client_status_as(addr, "localhost", &[version, "-CAfile", &ca]);
        assert!(
            out.contains("OCSP Response Status: successful"),
            "{version}: {out}"
        );
        assert!(out.contains("Cert Status: good"), "{version}: {out}");
        assert!(
            out.contains("CN=localhost") || out.contains("CN = localhost"),
            "{out}"
        );
        let other = s_client_status_as(addr, "other.test", &[version]);
        assert!(
            other.contains("OCSP response: no response sent"),
            "{version}: the default certificate staples nothing: {other}"
        );
        assert!(
            other.contains("CN=default.test") || other.contains("CN = default.test"),
            "{version}: {other}"
        );
    }
}
