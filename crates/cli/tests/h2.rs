//! End-to-end tests of HTTP/2 in `service = "http"`: real clients (curl with prior knowledge
//! and over TLS by ALPN, nghttp, h2load) get files, HEAD, 304, ranges, `/healthz` and
//! `/metrics`; a 4 MiB file arrives byte-exact over h2c and h2, also through a 16 KiB window
//! that the client reopens slowly; HTTP/1.1 clients on the same listeners are unaffected, and
//! a listener restricted to `alpn = ["http/1.1"]` negotiates HTTP/1.1. Then hand-written
//! abusive clients (raw frames over a TcpStream): rapid reset, CONTINUATION flood, HPACK bomb,
//! SETTINGS, PING and empty-DATA floods, a zero-window reader, stream ids at 2^31-1, window
//! overflow (FLOW_CONTROL_ERROR) — each is closed with the right GOAWAY code
//! (or limited) while a well-behaved HTTP/2 connection opened before them keeps being served,
//! and the server's RSS stays bounded.
//!
//! Every process is started on port 0 over loopback, killed by PID, and every wait is bounded.
//! A test whose client program is not installed says so and passes (Debian: curl,
//! nghttp2-client).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::*;
use plexus_proto::h2::frame::{self, flag, kind, setting, FrameHeader};
use plexus_proto::h2::{hpack, ErrorCode};

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("{tool} not installed: skipped (Debian: curl / nghttp2-client)");
    }
    found
}

/// A root with a small text file and a 4 MiB pattern file.
fn make_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("public");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, plexus\n").unwrap();
    std::fs::write(root.join("docs/index.html"), b"<h1>docs</h1>\n").unwrap();
    let big: Vec<u8> = (0..4 * MIB).map(pattern_byte).collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
    root
}

fn config(root: &Path) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "30s"

[http]
root = "{}"

[[listener]]
name = "h2c"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"

[[listener]]
name = "h2"
transport = "tls"
addr = "127.0.0.1:0"
service = "http"

[[listener]]
name = "h1only"
transport = "tls"
addr = "127.0.0.1:0"
service = "http"
alpn = ["http/1.1"]

[[listener]]
name = "auto"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
"#,
        root.display()
    )
}

/// Runs a shell command with a time bound; returns (success, stdout, stderr).
fn run(cmd: &str) -> (bool, Vec<u8>, String) {
    let out = Command::new("timeout")
        .arg("120")
        .arg("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn big() -> Vec<u8> {
    (0..4 * MIB).map(pattern_byte).collect()
}

#[test]
fn curl_over_h2c_h2_and_auto_gets_files_head_304_ranges_and_http11_is_unaffected() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&config(&root));
    let bases = [
        (
            "--http2-prior-knowledge",
            format!("http://{}", server.addr("h2c")),
        ),
        ("--http2 -k", format!("https://{}", server.addr("h2"))),
        (
            "--http2-prior-knowledge",
            format!("http://{}", server.addr("auto")),
        ),
    ];
    for (flags, base) in &bases {
        let curl = format!("curl -sS --max-time 60 {flags}");
        // Two URLs, one connection (TLS only: curl 7.88 fails to reuse a prior-knowledge
        // connection, curl/curl#10634); the head says HTTP/2.
        let urls = if flags.contains("prior") {
            format!("{base}/hello.txt -o /dev/stdout && {curl} {base}/docs/")
        } else {
            format!("{base}/hello.txt {base}/docs/ -o /dev/stdout -o /dev/stdout")
        };
        let (ok, out, err) = run(&format!("{curl} -D - {urls}"));
        assert!(ok, "{base}: {err}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/2 200"), "{base}: {text}");
        assert!(text.contains("hello, plexus\n"), "{base}: {text}");
        assert!(text.contains("<h1>docs</h1>"), "{base}: {text}");
        assert!(text.contains("content-length: 14"), "{base}: {text}");
        // HEAD: the length and validators, no body.
        let (ok, out, err) = run(&format!("{curl} -I {base}/hello.txt"));
        assert!(ok, "{err}");
        let head = String::from_utf8_lossy(&out).to_lowercase();
        assert!(head.starts_with("http/2 200"), "{head}");
        assert!(head.contains("content-length: 14"), "{head}");
        let etag = head
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .expect("an ETag")
            .trim()
            .to_owned();
        // The ETag revalidates to 304 with no body.
        let (ok, out, _) = run(&format!(
            "{curl} -i -H 'If-None-Match: {etag}' {base}/hello.txt"
        ));
        assert!(ok);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/2 304"), "{text}");
        assert!(!text.contains("hello, plexus"), "{text}");
        // Ranges: 206 with exactly those bytes; past the end 416.
        let (ok, out, _) = run(&format!("{curl} -r 1000-1099 {base}/big.bin"));
        assert!(ok);
        let expected: Vec<u8> = (1000..1100).map(pattern_byte).collect();
        assert_eq!(out, expected, "{base}: range bytes");
        let (_, out, _) = run(&format!(
            "{curl} -o /dev/null -w '%{{http_code}}' -r 99999999- {base}/big.bin"
        ));
        assert_eq!(String::from_utf8_lossy(&out), "416");
        // 404, 405, /healthz.
        let (_, out, _) = run(&format!(
            "{curl} -o /dev/null -w '%{{http_code}} ' {base}/nope; \
             {curl} -o /dev/null -w '%{{http_code}} ' -X POST {base}/hello.txt"
        ));
        assert_eq!(String::from_utf8_lossy(&out), "404 405 ");
        let (ok, out, _) = run(&format!("{curl} {base}/healthz"));
        assert!(ok);
        assert_eq!(out, b"ok");
        // 4 MiB byte-exact.
        let (ok, out, err) = run(&format!("{curl} {base}/big.bin"));
        assert!(ok, "{err}");
        assert!(
            out == big(),
            "{base}: 4 MiB body differs ({} bytes)",
            out.len()
        );
        // HTTP/1.1 on the same listener.
        let http11 = flags
            .replace("--http2-prior-knowledge", "")
            .replace("--http2", "");
        let (ok, out, err) = run(&format!(
            "curl -sS --max-time 60 --http1.1 {http11} -D - {base}/hello.txt"
        ));
        assert!(ok, "{err}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{base}: {text}");
        assert!(text.ends_with("hello, plexus\n"), "{text}");
    }
    // A listener restricted to http/1.1 negotiates it even for a client that prefers h2.
    let base = format!("https://{}", server.addr("h1only"));
    let (ok, out, err) = run(&format!(
        "curl -sS --max-time 20 --http2 -k -D - {base}/hello.txt"
    ));
    assert!(ok, "{err}");
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // /metrics counts the HTTP/2 connections.
    let (ok, out, _) = run(&format!(
        "curl -sS --max-time 20 --http2-prior-knowledge http://{}/metrics",
        server.addr("h2c")
    ));
    assert!(ok);
    let metrics = String::from_utf8_lossy(&out);
    let connections: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("plexus_http2_connections_total "))
        .and_then(|v| v.parse().ok())
        .expect("plexus_http2_connections_total");
    assert!(connections >= 20, "{metrics}");
}

#[test]
fn nghttp_with_a_slow_window_and_h2load_are_served() {
    if !have("nghttp") || !have("h2load") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&config(&root));
    let h2c = format!("http://{}", server.addr("h2c"));
    let h2 = format!("https://{}", server.addr("h2"));
    let (ok, out, err) = run(&format!("nghttp -nv {h2c}/hello.txt"));
    let text = String::from_utf8_lossy(&out);
    assert!(ok, "{text}{err}");
    assert!(text.contains(":status: 200"), "{text}");
    assert!(text.contains("content-length: 14"), "{text}");
    assert!(text.contains("recv SETTINGS frame"), "{text}");
    assert!(text.contains("recv DATA frame"), "{text}");
    // 16 KiB windows (2^14) that nghttp reopens as it reads: flow control both ways.
    for base in [&h2c, &h2] {
        let (ok, out, err) = run(&format!("nghttp -w 14 -W 14 {base}/big.bin"));
        assert!(ok, "{err}");
        assert!(
            out == big(),
            "{base}: 4 MiB body differs ({} bytes)",
            out.len()
        );
    }
    // Many streams on few connections: the issue's 100,000 requests, 10 connections, 10
    // streams each, on h2c and on h2.
    for base in [&h2c, &h2] {
        let (ok, out, err) = run(&format!(
            "h2load -n 100000 -c 10 -m 10 {base}/hello.txt 2>&1"
        ));
        let text = String::from_utf8_lossy(&out);
        assert!(ok, "{text}{err}");
        assert!(
            text.contains("100000 succeeded, 0 failed, 0 errored"),
            "{text}"
        );
        assert!(text.contains("100000 2xx"), "{text}");
    }
    let (ok, out, _) = run(&format!("h2load -n 40 -c 4 -m 4 {h2c}/big.bin 2>&1"));
    let text = String::from_utf8_lossy(&out);
    assert!(ok, "{text}");
    assert!(text.contains("40 succeeded, 0 failed, 0 errored"), "{text}");
}

/// The 4 MiB file over h2c goes out with sendfile: byte-exact to curl, nghttp, nghttp with
/// 16 KiB windows it reopens as it reads, and a hand-written client that opens its window
/// 4 KiB at a time; `plexus_http2_file_bytes_total{via="sendfile"}` counts every one of those
/// bytes (and `via="read"` none), while over TLS the same file is read in chunks.
#[test]
fn big_files_over_h2c_use_sendfile_byte_exact_also_through_slow_windows() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&config(&root));
    let addr = server.addr("h2c");
    let sendfile = |server: &Server| {
        metric(
            server.addr("h2c"),
            "plexus_http2_file_bytes_total{via=\"sendfile\"}",
        )
    };
    let read = |server: &Server| {
        metric(
            server.addr("h2c"),
            "plexus_http2_file_bytes_total{via=\"read\"}",
        )
    };
    assert_eq!((sendfile(&server), read(&server)), (0, 0));
    let mut expected = 0;
    let base = format!("http://{addr}");
    if have("curl") {
        let (ok, out, err) = run(&format!(
            "curl -sS --max-time 60 --http2-prior-knowledge {base}/big.bin"
        ));
        assert!(ok, "{err}");
        assert!(
            out == big(),
            "curl: 4 MiB body differs ({} bytes)",
            out.len()
        );
        expected += 4 * MIB;
    }
    if have("nghttp") {
        for flags in ["", "-w 14 -W 14"] {
            let (ok, out, err) = run(&format!("nghttp {flags} {base}/big.bin"));
            assert!(ok, "{err}");
            assert!(
                out == big(),
                "nghttp {flags}: body differs ({} bytes)",
                out.len()
            );
            expected += 4 * MIB;
        }
    }
    // A window of 4 KiB, reopened 4 KiB at a time once each 4 KiB arrived.
    let mut slow = Raw::connect(
        addr,
        &[
            (setting::INITIAL_WINDOW_SIZE, 4096),
            (setting::MAX_FRAME_SIZE, 16_384),
        ],
    );
    slow.get(1, "/big.bin");
    let mut body = Vec::new();
    let mut unacked = 0usize;
    let mut ended = false;
    while !ended {
        let (h, payload) = slow.frame().expect("the slow stream");
        match h.kind {
            kind::SETTINGS if h.flags & flag::ACK == 0 => {
                let mut ack = Vec::new();
                frame::write_settings_ack(&mut ack);
                slow.send(&ack);
            }
            kind::DATA if h.stream == 1 => {
                assert!(payload.len() <= 4096, "a frame past the window");
                body.extend_from_slice(&payload);
                ended = h.flags & flag::END_STREAM != 0;
                unacked += payload.len();
                if unacked >= 4096 && !ended {
                    let mut update = Vec::new();
                    frame::write_window_update(&mut update, 0, unacked as u32);
                    frame::write_window_update(&mut update, 1, unacked as u32);
                    slow.send(&update);
                    unacked = 0;
                }
            }
            kind::GOAWAY | kind::RST_STREAM => panic!("the slow stream was ended"),
            _ => {}
        }
    }
    assert!(
        body == big(),
        "slow window: body differs ({} bytes)",
        body.len()
    );
    expected += 4 * MIB;
    assert_eq!(
        sendfile(&server),
        expected,
        "every h2c file byte went by sendfile"
    );
    assert_eq!(read(&server), 0);
    if have("curl") {
        let (ok, out, err) = run(&format!(
            "curl -sS --max-time 60 --http2 -k https://{}/big.bin",
            server.addr("h2")
        ));
        assert!(ok, "{err}");
        assert!(
            out == big(),
            "h2 over TLS: body differs ({} bytes)",
            out.len()
        );
        assert_eq!(read(&server), 4 * MIB, "TLS reads the file");
        assert_eq!(sendfile(&server), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-written HTTP/2 client (raw frames), for the well-behaved and the abusive sides
// ---------------------------------------------------------------------------------------------

struct Raw {
    sock: TcpStream,
    input: Vec<u8>,
    encoder: hpack::Encoder,
    decoder: hpack::Decoder,
}

/// What the server sent on a stream, as far as the client read.
#[derive(Debug, Default)]
struct Answer {
    status: Option<String>,
    body: Vec<u8>,
    ended: bool,
}

impl Raw {
    /// Connects and sends the preface with `settings`.
    fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> Raw {
        let mut sock = connect(addr);
        let mut out = frame::PREFACE.to_vec();
        frame::write_settings(&mut out, settings);
        sock.write_all(&out).unwrap();
        Raw {
            sock,
            input: Vec::new(),
            encoder: hpack::Encoder::new(),
            decoder: hpack::Decoder::new(4096),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        // The server may close while a flood is still being written: what it read decides.
        let _ = self.sock.write_all(bytes);
    }

    fn block(&mut self, path: &str) -> Vec<u8> {
        let mut block = Vec::new();
        self.encoder.encode(
            [
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"http"),
                (b":authority", b"localhost"),
                (b":path", path.as_bytes()),
            ],
            &mut block,
        );
        block
    }

    fn get(&mut self, stream: u32, path: &str) {
        let block = self.block(path);
        let mut out = Vec::new();
        frame::write_headers(&mut out, stream, &block, true, 16_384);
        self.send(&out);
    }

    /// The next frame, `None` on EOF, reset or timeout.
    fn frame(&mut self) -> Option<(FrameHeader, Vec<u8>)> {
        loop {
            if let Some(h) = FrameHeader::parse(&self.input) {
                let end = frame::HEADER_LEN + h.length as usize;
                if self.input.len() >= end {
                    let payload = self.input[frame::HEADER_LEN..end].to_vec();
                    self.input.drain(..end);
                    return Some((h, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until `stream` ends (acknowledging SETTINGS and reopening windows as a
    /// normal client does); `None` if the connection ended first.
    fn answer(&mut self, stream: u32) -> Option<Answer> {
        let mut answer = Answer::default();
        while !answer.ended {
            let (h, payload) = self.frame()?;
            match h.kind {
                kind::SETTINGS if h.flags & flag::ACK == 0 => {
                    let mut ack = Vec::new();
                    frame::write_settings_ack(&mut ack);
                    self.send(&ack);
                }
                kind::HEADERS if h.stream == stream => {
                    let block = self.decoder.decode(&payload, 1 << 20).unwrap();
                    answer.status = block
                        .fields
                        .iter()
                        .find(|f| f.name == b":status")
                        .map(|f| String::from_utf8_lossy(&f.value).into_owned());
                    answer.ended = h.flags & flag::END_STREAM != 0;
                }
                kind::HEADERS => {
                    self.decoder.decode(&payload, 1 << 20).unwrap();
                }
                kind::DATA => {
                    if !payload.is_empty() {
                        let mut update = Vec::new();
                        let n = payload.len() as u32;
                        frame::write_window_update(&mut update, 0, n);
                        frame::write_window_update(&mut update, h.stream, n);
                        self.send(&update);
                    }
                    if h.stream == stream {
                        answer.body.extend_from_slice(&payload);
                        answer.ended = h.flags & flag::END_STREAM != 0;
                    }
                }
                kind::RST_STREAM if h.stream == stream => return Some(answer),
                kind::GOAWAY => return None,
                _ => {}
            }
        }
        Some(answer)
    }

    /// Reads until GOAWAY: its error code (`None` if the connection ended without one).
    fn goaway_code(&mut self) -> Option<ErrorCode> {
        loop {
            let (h, payload) = self.frame()?;
            if h.kind == kind::GOAWAY {
                let code = payload.get(4..8)?;
                return Some(ErrorCode(u32::from_be_bytes(code.try_into().ok()?)));
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset) after what it sent.
    fn closed(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        loop {
            match self.sock.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(err) => return is_reset(&err),
            }
        }
    }
}

/// The well-behaved client: one request on its long-lived connection, answered in full.
fn assert_served(good: &mut Raw, stream: u32, after: &str) {
    good.get(stream, "/hello.txt");
    let answer = good
        .answer(stream)
        .unwrap_or_else(|| panic!("the good connection ended after {after}"));
    assert_eq!(answer.status.as_deref(), Some("200"), "after {after}");
    assert_eq!(answer.body, b"hello, plexus\n", "after {after}");
}

fn metric(addr: SocketAddr, line_start: &str) -> u64 {
    let mut stream = connect(addr);
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
}

#[test]
fn abusive_clients_are_closed_with_the_right_code_while_a_good_one_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&config(&root));
    let addr = server.addr("h2c");
    let rss_before = rss_kib(server.pid());
    let mut good = Raw::connect(addr, &[]);
    assert_served(&mut good, 1, "the start");

    // Rapid reset (CVE-2023-44487): streams opened and reset at once, past the budget.
    let mut abuser = Raw::connect(addr, &[]);
    let mut out = Vec::new();
    for n in 0..260u32 {
        let block = abuser.block("/hello.txt");
        frame::write_headers(&mut out, 2 * n + 1, &block, true, 16_384);
        frame::write_rst_stream(&mut out, 2 * n + 1, ErrorCode::CANCEL);
    }
    abuser.send(&out);
    assert_eq!(abuser.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
    assert!(abuser.closed());
    assert_served(&mut good, 3, "a rapid reset");

    // CONTINUATION flood (CVE-2024-27316): a header block that never ends.
    let mut abuser = Raw::connect(addr, &[]);
    let block = abuser.block("/hello.txt");
    let mut out = Vec::new();
    frame::write_frame(&mut out, kind::HEADERS, 0, 1, &block);
    for _ in 0..20 {
        frame::write_frame(&mut out, kind::CONTINUATION, 0, 1, &[0x82; 1000]);
    }
    abuser.send(&out);
    assert_eq!(abuser.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
    assert!(abuser.closed());
    assert_served(&mut good, 5, "a CONTINUATION flood");

    // HPACK bomb: a 4 KB table entry referenced 4,000 times (16 MB decoded from 8 KB) is
    // answered 431, and the same connection goes on.
    let mut bomber = Raw::connect(addr, &[]);
    let mut block = bomber.block("/hello.txt");
    block.extend([0x40, 0x01, b'x']);
    hpack::write_integer(&mut block, 0, 7, 4000);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, 4000));
    let mut out = Vec::new();
    frame::write_headers(&mut out, 1, &block, true, 16_384);
    bomber.send(&out);
    let answer = bomber.answer(1).expect("an answer to the bomb");
    assert_eq!(answer.status.as_deref(), Some("431"));
    // The connection goes on (its HPACK tables are in step with the bomber's bytes, not with
    // its encoder, so it is asked with a PING).
    let mut ping = Vec::new();
    frame::write_ping(&mut ping, *b"still up", false);
    bomber.send(&ping);
    loop {
        let (h, payload) = bomber.frame().expect("the bomber's connection stays open");
        assert_ne!(
            h.kind,
            kind::GOAWAY,
            "an HPACK bomb is answered, not a GOAWAY"
        );
        if h.kind == kind::PING && h.flags & flag::ACK != 0 {
            assert_eq!(payload, b"still up");
            break;
        }
    }
    assert_served(&mut good, 7, "an HPACK bomb");

    // SETTINGS and PING floods.
    for (name, make) in [
        (
            "SETTINGS",
            (|b: &mut Vec<u8>| frame::write_settings(b, &[])) as fn(&mut Vec<u8>),
        ),
        ("PING", |b: &mut Vec<u8>| {
            frame::write_ping(b, *b"flooding", false)
        }),
    ] {
        let mut abuser = Raw::connect(addr, &[]);
        let mut out = Vec::new();
        for _ in 0..150 {
            make(&mut out);
        }
        abuser.send(&out);
        assert_eq!(
            abuser.goaway_code(),
            Some(ErrorCode::ENHANCE_YOUR_CALM),
            "{name} flood"
        );
        assert!(abuser.closed(), "{name} flood");
    }
    assert_served(&mut good, 9, "SETTINGS and PING floods");

    // Zero-window readers: SETTINGS_INITIAL_WINDOW_SIZE = 0 and 4 MiB asked for on many
    // streams. The server sends the heads and no DATA — nothing of the files is buffered for
    // them — while others are served.
    let mut sleepers: Vec<Raw> = (0..8)
        .map(|_| Raw::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 0)]))
        .collect();
    for sleeper in &mut sleepers {
        for n in 0..50u32 {
            sleeper.get(2 * n + 1, "/big.bin");
        }
    }
    for sleeper in &mut sleepers {
        sleeper
            .sock
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut heads = 0;
        while let Some((h, payload)) = sleeper.frame() {
            match h.kind {
                kind::HEADERS => heads += 1,
                kind::DATA => panic!("DATA ({} bytes) into a zero window", payload.len()),
                kind::GOAWAY => panic!("a zero-window reader is not an error"),
                _ => {}
            }
        }
        assert_eq!(heads, 50, "a head for every stream");
    }
    if have("curl") {
        let base = format!("http://{addr}");
        let (ok, out, err) = run(&format!(
            "curl -sS --max-time 60 --http2-prior-knowledge {base}/big.bin"
        ));
        assert!(ok, "{err}");
        assert!(out == big(), "4 MiB next to zero-window readers");
    }
    assert_served(&mut good, 11, "zero-window readers");

    // Bounded memory: 400 streams of a 4 MiB file are waiting for windows.
    let rss_after = rss_kib(server.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The floods are counted by reason.
    let errors = "plexus_http2_connection_errors_total{reason=";
    for reason in [
        "rapid_reset",
        "header_block_too_large",
        "settings_flood",
        "ping_flood",
    ] {
        let n = metric(addr, &format!("{errors}\"{reason}\"}}"));
        assert_eq!(n, 1, "{reason}");
    }
    drop(sleepers);
    thread::sleep(Duration::from_millis(100));
    assert_served(&mut good, 13, "the zero-window readers left");
}

/// A zero-window reader's streams are reset (CANCEL) once `h2_stall_timeout` passes without
/// progress, and counted; the connection stays up for what it asks next.
#[test]
fn a_stream_stalled_by_a_closed_window_is_reset_after_h2_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let config = config(&root).replace(
        "[http]\n",
        "[http]\nh2_stall_timeout = \"300ms\"\nh2_max_concurrent_streams = 10\n",
    );
    let server = Server::start(&config);
    let addr = server.addr("h2c");
    let mut sleeper = Raw::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 0)]);
    sleeper.get(1, "/big.bin");
    let reset = loop {
        let (h, payload) = sleeper.frame().expect("the connection stays open");
        assert_ne!(h.kind, kind::DATA, "DATA into a zero window");
        if h.kind == kind::HEADERS {
            // Decoded to keep the HPACK table in step.
            sleeper.decoder.decode(&payload, 1 << 20).unwrap();
        }
        if h.kind == kind::SETTINGS && h.flags & flag::ACK == 0 {
            let mut ack = Vec::new();
            frame::write_settings_ack(&mut ack);
            sleeper.send(&ack);
        }
        if h.kind == kind::RST_STREAM && h.stream == 1 {
            break ErrorCode(u32::from_be_bytes(payload[..4].try_into().unwrap()));
        }
    };
    assert_eq!(reset, ErrorCode::CANCEL);
    // The SETTINGS advertised what the keys say.
    let mut other = Raw::connect(addr, &[]);
    let (h, payload) = other.frame().unwrap();
    assert_eq!(h.kind, kind::SETTINGS);
    let params: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
        .collect();
    assert!(
        params.contains(&(setting::MAX_CONCURRENT_STREAMS, 10)),
        "{params:?}"
    );
    // Small responses still go out on the stalled connection (their window is 0 too, so a
    // HEAD, which has no body).
    let mut block = Vec::new();
    sleeper.encoder.encode(
        [
            (&b":method"[..], &b"HEAD"[..]),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", b"/hello.txt"),
        ],
        &mut block,
    );
    let mut out = Vec::new();
    frame::write_headers(&mut out, 3, &block, true, 16_384);
    sleeper.send(&out);
    let answer = sleeper.answer(3).expect("an answer");
    assert_eq!(answer.status.as_deref(), Some("200"));
    assert_eq!(
        metric(addr, "plexus_http2_streams_stalled_total "),
        1,
        "counted"
    );
}

/// SIGTERM: GOAWAY (NO_ERROR, the last stream) goes out, the response in flight finishes
/// byte-exact, a new stream is refused, and the connection then closes.
#[test]
fn graceful_drain_sends_goaway_and_the_stream_in_flight_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let mut server = Server::start(&config(&root).replace(
        "idle_timeout = \"30s\"",
        "idle_timeout = \"30s\"\nshutdown_grace = \"60s\"",
    ));
    let addr = server.addr("h2c");
    let mut client = Raw::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 16_384)]);
    client.get(1, "/big.bin");
    // The first window's worth arrives; no WINDOW_UPDATE yet.
    let mut body = Vec::new();
    while body.len() < 16_384 {
        let (h, payload) = client.frame().expect("the first DATA");
        if h.kind == kind::SETTINGS && h.flags & flag::ACK == 0 {
            let mut ack = Vec::new();
            frame::write_settings_ack(&mut ack);
            client.send(&ack);
        }
        if h.kind == kind::DATA && h.stream == 1 {
            body.extend_from_slice(&payload);
        }
    }
    let mark = server.log_mark();
    server.signal("TERM");
    // PINGs keep the connection busy (a drain closes sessions idle for 1 s) until the drain
    // has begun.
    while server
        .wait_for_log(mark, Duration::from_millis(200), |l| {
            l.contains("draining sessions")
        })
        .is_none()
    {
        let mut ping = Vec::new();
        frame::write_ping(&mut ping, *b"waiting!", false);
        client.send(&ping);
    }
    let mut ping = Vec::new();
    frame::write_ping(&mut ping, *b"drained?", false);
    client.send(&ping);
    // GOAWAY arrives with NO_ERROR and last stream 1.
    let mut goaway = None;
    let mut refused = false;
    let mut ended = false;
    let mut update = Vec::new();
    frame::write_window_update(&mut update, 0, 16_384);
    frame::write_window_update(&mut update, 1, 16_384);
    client.send(&update);
    while !(ended && refused) {
        let (h, payload) = client
            .frame()
            .unwrap_or_else(|| panic!("closed early: {} bytes, goaway {goaway:?}", body.len()));
        match h.kind {
            kind::GOAWAY => {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let code = ErrorCode(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                goaway = Some((last, code));
                // A stream opened now is refused.
                client.get(3, "/hello.txt");
            }
            kind::RST_STREAM if h.stream == 3 => {
                let code = ErrorCode(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                assert_eq!(code, ErrorCode::REFUSED_STREAM);
                refused = true;
            }
            kind::HEADERS if h.stream == 3 => panic!("a stream after GOAWAY was served"),
            kind::DATA if h.stream == 1 => {
                body.extend_from_slice(&payload);
                ended = h.flags & flag::END_STREAM != 0;
                if !payload.is_empty() {
                    let mut update = Vec::new();
                    let n = payload.len() as u32;
                    frame::write_window_update(&mut update, 0, n);
                    frame::write_window_update(&mut update, 1, n);
                    client.send(&update);
                }
            }
            _ => {}
        }
    }
    assert_eq!(goaway, Some((1, ErrorCode::NO_ERROR)));
    assert!(
        body == big(),
        "the stream in flight differs ({} bytes)",
        body.len()
    );
    assert!(
        client.closed(),
        "the connection closes once its streams are done"
    );
    let status = server.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// Reads until GOAWAY (acknowledging SETTINGS): its (last stream, code); `None` if the
/// connection ended without one.
fn read_goaway(client: &mut Raw) -> Option<(u32, ErrorCode)> {
    loop {
        let (h, payload) = client.frame()?;
        match h.kind {
            kind::SETTINGS if h.flags & flag::ACK == 0 => {
                let mut ack = Vec::new();
                frame::write_settings_ack(&mut ack);
                client.send(&ack);
            }
            kind::GOAWAY => {
                let last = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
                let code = u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?);
                return Some((last, ErrorCode(code)));
            }
            _ => {}
        }
    }
}

/// SIGTERM reaches idle HTTP/2 connections when the drain starts (`on_server_drain`): an idle
/// connection reads GOAWAY (NO_ERROR, its last stream) and then the close — before, it saw
/// only the FIN of the drain's idle close —, and a connection whose response is blocked on a
/// closed window gets GOAWAY too, then its whole body once it reopens the window.
#[test]
fn a_drain_sends_goaway_to_idle_connections_and_lets_the_blocked_stream_finish() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let mut server = Server::start(&config(&root).replace(
        "idle_timeout = \"30s\"",
        "idle_timeout = \"30s\"\nshutdown_grace = \"60s\"",
    ));
    let addr = server.addr("h2c");
    let mut idle = Raw::connect(addr, &[]);
    assert_served(&mut idle, 1, "the start");
    let mut busy = Raw::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 16_384)]);
    busy.get(1, "/big.bin");
    let mut body = Vec::new();
    while body.len() < 16_384 {
        let (h, payload) = busy.frame().expect("the first DATA");
        if h.kind == kind::SETTINGS && h.flags & flag::ACK == 0 {
            let mut ack = Vec::new();
            frame::write_settings_ack(&mut ack);
            busy.send(&ack);
        }
        if h.kind == kind::DATA && h.stream == 1 {
            body.extend_from_slice(&payload);
        }
    }
    server.signal("TERM");
    assert_eq!(read_goaway(&mut idle), Some((1, ErrorCode::NO_ERROR)));
    assert!(idle.closed(), "the idle connection closes after its GOAWAY");
    // The blocked stream: GOAWAY while nothing of it moves, then the rest as windows open.
    assert_eq!(read_goaway(&mut busy), Some((1, ErrorCode::NO_ERROR)));
    let mut update = Vec::new();
    frame::write_window_update(&mut update, 0, 16_384);
    frame::write_window_update(&mut update, 1, 16_384);
    busy.send(&update);
    let rest = busy.answer(1).expect("the stream in flight finishes");
    body.extend_from_slice(&rest.body);
    assert!(
        body == big(),
        "the body in flight differs ({} bytes)",
        body.len()
    );
    assert!(
        busy.closed(),
        "the connection closes once its stream is done"
    );
    let status = server.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// The RST_STREAM code of a frame's payload.
fn rst_code(payload: &[u8]) -> ErrorCode {
    ErrorCode(u32::from_be_bytes(payload[..4].try_into().unwrap()))
}

/// Empty-DATA floods, stream-ID exhaustion and window overflow (issue 16 item 2): each
/// abuser is closed or limited with the right code while a well-behaved connection opened
/// before them keeps being served, and the server's RSS stays bounded.
#[test]
fn empty_data_floods_exhausted_stream_ids_and_window_overflows_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let server = Server::start(&config(&root));
    let addr = server.addr("h2c");
    let rss_before = rss_kib(server.pid());
    let mut good = Raw::connect(addr, &[]);
    assert_served(&mut good, 1, "the start");

    // Empty-DATA flood: a request whose body never comes, only DATA frames of 0 bytes
    // without END_STREAM (each costs the server a frame's work and carries nothing).
    let mut abuser = Raw::connect(addr, &[]);
    let block = abuser.block("/hello.txt");
    let mut out = Vec::new();
    frame::write_headers(&mut out, 1, &block, false, 16_384);
    for _ in 0..500 {
        frame::write_data(&mut out, 1, &[], false);
    }
    abuser.send(&out);
    assert_eq!(abuser.goaway_code(), Some(ErrorCode::ENHANCE_YOUR_CALM));
    assert!(abuser.closed(), "empty-DATA flood");
    assert_served(&mut good, 3, "an empty-DATA flood");

    // Stream-ID exhaustion: a client at the top of the id space is served on its last id,
    // told with GOAWAY (NO_ERROR, last stream 2^31-1) that the connection is used up, and
    // the connection closes once that stream is done. An id not above the last one is a
    // connection error (PROTOCOL_ERROR).
    let max = (1u32 << 31) - 1;
    let mut client = Raw::connect(addr, &[]);
    client.get(max - 2, "/hello.txt");
    let answer = client.answer(max - 2).expect("stream 2^31-3 answered");
    assert_eq!(answer.status.as_deref(), Some("200"));
    client.get(max, "/hello.txt");
    let mut goaway = None;
    let mut body = Vec::new();
    let mut ended = false;
    while let Some((h, payload)) = client.frame() {
        match h.kind {
            kind::GOAWAY => {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                goaway = Some((last, rst_code(&payload[4..8])));
            }
            kind::HEADERS => {
                client.decoder.decode(&payload, 1 << 20).unwrap();
            }
            kind::DATA if h.stream == max => {
                body.extend_from_slice(&payload);
                ended |= h.flags & flag::END_STREAM != 0;
            }
            _ => {}
        }
    }
    assert_eq!(goaway, Some((max, ErrorCode::NO_ERROR)));
    assert!(
        ended && body == b"hello, plexus\n",
        "the last stream is served"
    );
    let mut client = Raw::connect(addr, &[]);
    client.get(101, "/hello.txt");
    assert_eq!(client.answer(101).unwrap().status.as_deref(), Some("200"));
    client.get(99, "/hello.txt");
    assert_eq!(client.goaway_code(), Some(ErrorCode::PROTOCOL_ERROR));
    assert_served(&mut good, 5, "stream-ID exhaustion");

    // Window overflow on the connection: a WINDOW_UPDATE taking the send window past
    // 2^31-1 is a connection error FLOW_CONTROL_ERROR.
    let mut abuser = Raw::connect(addr, &[]);
    let mut out = Vec::new();
    frame::write_window_update(&mut out, 0, max);
    abuser.send(&out);
    assert_eq!(abuser.goaway_code(), Some(ErrorCode::FLOW_CONTROL_ERROR));
    assert!(abuser.closed(), "connection window overflow");
    // On a stream: that stream is reset with FLOW_CONTROL_ERROR, the connection goes on.
    let mut abuser = Raw::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 0)]);
    abuser.get(1, "/big.bin");
    let mut out = Vec::new();
    // The stream's window is 0: 2^31-1 brings it to the maximum, one more is past it (both
    // in one write, so no DATA goes out in between).
    frame::write_window_update(&mut out, 1, max);
    frame::write_window_update(&mut out, 1, 1);
    abuser.send(&out);
    let code = loop {
        let (h, payload) = abuser.frame().expect("the connection stays open");
        assert_ne!(
            h.kind,
            kind::GOAWAY,
            "a stream's overflow is a stream error"
        );
        if h.kind == kind::HEADERS {
            abuser.decoder.decode(&payload, 1 << 20).unwrap();
        }
        if h.kind == kind::RST_STREAM && h.stream == 1 {
            break rst_code(&payload);
        }
    };
    assert_eq!(code, ErrorCode::FLOW_CONTROL_ERROR);
    let mut ping = Vec::new();
    frame::write_ping(&mut ping, *b"still up", false);
    abuser.send(&ping);
    loop {
        let (h, _) = abuser.frame().expect("the connection stays open");
        assert_ne!(h.kind, kind::GOAWAY);
        if h.kind == kind::PING && h.flags & flag::ACK != 0 {
            break;
        }
    }
    assert_served(&mut good, 7, "window overflows");

    let rss_after = rss_kib(server.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    let errors = "plexus_http2_connection_errors_total{reason=";
    assert_eq!(metric(addr, &format!("{errors}\"empty_frame_flood\"}}")), 1);
    assert_eq!(metric(addr, &format!("{errors}\"protocol\"}}")), 2);
}

/// `[http] hsts`: `Strict-Transport-Security` on every response over TLS (HTTP/1.1 and h2),
/// never over plain HTTP (h2c or HTTP/1.1).
#[test]
fn hsts_is_sent_over_tls_only() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = make_root(dir.path());
    let config = config(&root).replace(
        "[http]\n",
        "[http]\nhsts = \"max-age=63072000; includeSubDomains\"\n",
    );
    let server = Server::start(&config);
    let tls = format!("https://{}/hello.txt", server.addr("h2"));
    let clear = format!("http://{}/hello.txt", server.addr("h2c"));
    for (flags, url, wanted) in [
        ("--http1.1 -k", &tls, true),
        ("--http2 -k", &tls, true),
        ("--http1.1", &clear, false),
        ("--http2-prior-knowledge", &clear, false),
    ] {
        let (ok, out, err) = run(&format!(
            "curl -sS --max-time 20 {flags} -D - -o /dev/null {url}"
        ));
        assert!(ok, "{flags}: {err}");
        let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(head.contains(" 200"), "{flags}: {head}");
        assert_eq!(
            head.contains("strict-transport-security: max-age=63072000; includesubdomains"),
            wanted,
            "{flags}: {head}"
        );
    }
    // A bad value is a configuration error naming the key.
    let bad = config.replace("max-age=63072000; includeSubDomains", "max-age=1y");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.hsts"), "{err}");
}
