//! The HTTP/2 codec against real clients. Two captures (the bytes curl
//! 7.88 and nghttp 1.52 sent to a recording socket, in `fixtures/h2/`) are
//! decoded without a network; then curl, nghttp and h2load (when installed)
//! talk to the codec driven by a small blocking server on port 0
//! (`support/h2_blocking.rs`), and their outputs are checked byte for byte.

#[path = "support/h2_blocking.rs"]
mod h2_blocking;

use std::net::TcpListener;
use std::process::Command;
use std::time::Instant;

use plexus_proto::h2::frame::{self, FrameHeader};
use plexus_proto::h2::{Event, RequestHead, ServerConnection, Settings};

/// A decoded request: stream, head, END_STREAM.
type Request = (u32, RequestHead, bool);

/// Feeds a capture; returns the requests and the (type, flags) of each frame the server sent.
fn replay(capture: &[u8]) -> (Vec<Request>, Vec<(u8, u8)>) {
    let mut conn = ServerConnection::new(Settings::default());
    conn.recv(capture, Instant::now())
        .expect("capture is valid HTTP/2");
    let mut requests = Vec::new();
    while let Some(ev) = conn.poll_event() {
        if let Event::Request {
            stream,
            head,
            end_stream,
        } = ev
        {
            requests.push((stream, head, end_stream));
        }
    }
    let mut out = Vec::new();
    conn.poll_transmit(&mut out);
    let mut sent = Vec::new();
    let mut rest = &out[..];
    while let Some(h) = FrameHeader::parse(rest) {
        sent.push((h.kind, h.flags));
        rest = &rest[frame::HEADER_LEN + h.length as usize..];
    }
    (requests, sent)
}

#[test]
fn curl_capture_decodes() {
    let capture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/h2/curl-prior-knowledge.bin"
    ))
    .unwrap();
    let (requests, sent) = replay(&capture);
    assert_eq!(requests.len(), 1);
    let (stream, head, end_stream) = &requests[0];
    assert_eq!((*stream, *end_stream), (1, true));
    assert_eq!(head.method, "GET");
    assert_eq!(head.scheme.as_deref(), Some("http"));
    assert_eq!(head.path.as_deref(), Some("/files/index.html?q=1"));
    assert!(head.authority.as_deref().unwrap().starts_with("127.0.0.1:"));
    assert!(head.header("user-agent").unwrap().starts_with(b"curl/7.88"));
    assert_eq!(head.header("accept"), Some(&b"text/html"[..]));
    // Our SETTINGS and connection WINDOW_UPDATE, then the ACK of curl's SETTINGS.
    assert_eq!(
        sent,
        [
            (frame::kind::SETTINGS, 0),
            (frame::kind::WINDOW_UPDATE, 0),
            (frame::kind::SETTINGS, frame::flag::ACK)
        ]
    );
}

#[test]
fn nghttp_capture_decodes() {
    let capture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/h2/nghttp.bin"
    ))
    .unwrap();
    let (requests, sent) = replay(&capture);
    assert_eq!(requests.len(), 1);
    let (stream, head, end_stream) = &requests[0];
    // nghttp first declares priority-group streams 3..11 with PRIORITY frames.
    assert_eq!((*stream, *end_stream), (13, true));
    assert_eq!(head.method, "GET");
    assert_eq!(head.path.as_deref(), Some("/docs/a%20b"));
    assert!(head.authority.as_deref().unwrap().starts_with("127.0.0.1:"));
    assert!(head
        .header("user-agent")
        .unwrap()
        .starts_with(b"nghttp2/1.52"));
    assert!(sent.contains(&(frame::kind::SETTINGS, frame::flag::ACK)));
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("{tool} not installed: skipped (Debian: nghttp2-client / curl)");
    }
    found
}

fn start() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || h2_blocking::run(listener));
    port
}

fn run(cmd: &str) -> (bool, Vec<u8>) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    (out.status.success(), out.stdout)
}

#[test]
fn curl_gets_small_and_4_mib_responses_and_posts() {
    if !have("curl") {
        return;
    }
    let port = start();
    let base = format!("http://127.0.0.1:{port}");
    let (ok, body) = run(&format!("curl -sS --http2-prior-knowledge {base}/hello"));
    assert!(ok);
    assert_eq!(body, format!("GET /hello 127.0.0.1:{port}\n").into_bytes());
    // 4 MiB: 64 windows of the default 65,535 bytes, byte-exact.
    let (ok, body) = run(&format!(
        "curl -sS --http2-prior-knowledge {base}/bytes/4194304"
    ));
    assert!(ok);
    let want: Vec<u8> = b"0123456789"
        .iter()
        .copied()
        .cycle()
        .take(4 << 20)
        .collect();
    assert!(body == want, "4 MiB body differs ({} bytes)", body.len());
    // A 1 MiB upload: the body crosses our 65,535-byte stream window many times.
    let (ok, body) = run(&format!(
        "head -c 1048576 /dev/zero | curl -sS --http2-prior-knowledge --data-binary @- {base}/upload"
    ));
    assert!(ok);
    assert_eq!(
        body,
        format!("POST /upload 127.0.0.1:{port} 1048576\n").into_bytes()
    );
    // The status line and headers, as curl saw them.
    let (ok, head) = run(&format!(
        "curl -sS -o /dev/null -D - --http2-prior-knowledge {base}/bytes/10"
    ));
    assert!(ok);
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("content-length: 10"), "{head}");
}

#[test]
fn nghttp_and_h2load_are_served() {
    if !have("nghttp") || !have("h2load") {
        return;
    }
    let port = start();
    let base = format!("http://127.0.0.1:{port}");
    let (ok, out) = run(&format!("nghttp -nv {base}/bytes/200000 2>&1"));
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "{out}");
    assert!(out.contains(":status: 200"), "{out}");
    assert!(out.contains("content-length: 200000"), "{out}");
    assert!(out.contains("recv SETTINGS frame"), "{out}");
    assert!(out.contains("recv DATA frame"), "{out}");
    assert!(!out.contains("GOAWAY frame <length=8, flags=0x00, stream_id=0>\n          (last_stream_id=0, error_code=PROTOCOL_ERROR"), "{out}");
    // nghttp with a 16 KiB-window (-w 14, -W 14): flow control both ways.
    let (ok, body) = run(&format!("nghttp -w 14 -W 14 {base}/bytes/1000000"));
    assert!(ok);
    assert_eq!(body.len(), 1_000_000);
    let (ok, out) = run(&format!("h2load -n 2000 -c 4 -m 10 {base}/bytes/100 2>&1"));
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "{out}");
    assert!(out.contains("2000 succeeded, 0 failed, 0 errored"), "{out}");
}
