//! The built-in services driven through `plexus::testing`: one in-memory session each, a fake
//! clock, bytes in and bytes and closes out — no sockets, no threads.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use plexus::config::HttpConfig;
use plexus::testing::Harness;
use plexus::CloseReason;
use plexus_services::{Chat, Echo, Http};

#[test]
fn echo_sends_every_byte_back_however_it_is_split() {
    let input: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    for split in [1, 3, 1000, 10_000] {
        let mut h = Harness::new(Echo);
        let mut echoed = Vec::new();
        for piece in input.chunks(split) {
            h.receive(piece);
            if split == 3 {
                // Sometimes the peer reads in between, sometimes it lets bytes pile up.
                echoed.extend(h.take_sent());
            }
        }
        echoed.extend(h.take_sent());
        assert!(
            echoed == input,
            "split {split}: {} bytes back",
            echoed.len()
        );
        h.close_by_peer();
        assert_eq!(h.closed(), Some(&CloseReason::PeerClosed));
    }
}

#[test]
fn echo_of_more_than_the_high_watermark_pauses_reading_instead_of_overflowing() {
    // 16 MiB in at once: four times outbound_limit. The loop stops reading past the high
    // watermark, so the session never overflows, it just waits for its peer.
    let input = vec![b'e'; 16 << 20];
    let mut h = Harness::new(Echo);
    h.receive(&input);
    assert!(h.unread() > 0);
    let mut total = 0;
    while h.unread() > 0 || h.queued() > 0 {
        total += h.take_sent().len();
        assert!(h.closed().is_none());
    }
    assert_eq!(total, input.len());
}

/// Three members of one chat listener: what one broadcasts is delivered to the others, as
/// the loop delivers it.
fn relay(from: &mut Harness, others: &mut [&mut Harness]) {
    for broadcast in from.take_broadcasts() {
        for other in others.iter_mut() {
            other.deliver_broadcast(broadcast.clone());
        }
    }
}

#[test]
fn chat_lines_reach_the_other_members_and_partial_lines_wait_for_their_end() {
    let chat = Chat::new(64);
    let mut a = Harness::new(chat);
    let mut b = Harness::new(chat);
    let mut c = Harness::new(chat);
    a.receive(b"hello\nwor");
    relay(&mut a, &mut [&mut b, &mut c]);
    assert_eq!(b.take_sent(), b"hello\n");
    assert_eq!(c.take_sent(), b"hello\n");
    assert!(a.take_sent().is_empty(), "a member does not hear itself");
    a.receive(b"ld\n");
    let sent = a.take_broadcasts();
    assert_eq!(sent, vec![bytes::Bytes::from_static(b"world\n")]);
    // Lines completed in one read travel as one broadcast.
    b.receive(b"one\ntwo\nthr");
    assert_eq!(
        b.take_broadcasts(),
        vec![bytes::Bytes::from_static(b"one\ntwo\n")]
    );
    // Nothing complete: nothing broadcast.
    c.receive(b"no newline yet");
    assert!(c.take_broadcasts().is_empty());
}

#[test]
fn chat_closes_a_member_whose_line_passes_max_line_bytes_after_delivering_the_lines_before_it() {
    let mut a = Harness::new(Chat::new(8));
    a.receive(b"fine\n");
    a.receive(b"ok\n0123456789\nlost\n");
    let sent = a.take_broadcasts();
    assert_eq!(
        sent,
        vec![
            bytes::Bytes::from_static(b"fine\n"),
            bytes::Bytes::from_static(b"ok\n")
        ]
    );
    assert!(a.is_closing());
    assert_eq!(a.take_sent(), b"error: line longer than 8 bytes\n");
    assert_eq!(a.closed(), Some(&CloseReason::Requested));
}

#[test]
fn chat_closes_a_member_that_does_not_read_once_broadcasts_pass_outbound_limit() {
    let mut slow = Harness::builder(Chat::new(1024))
        .watermarks(1000, 100)
        .outbound_limit(70_000)
        .open();
    let line = bytes::Bytes::from(
        vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<_>>(),
    );
    for _ in 0..100 {
        slow.deliver_broadcast(line.clone());
    }
    assert_eq!(slow.closed(), Some(&CloseReason::OutboundOverflow));
}

fn http(config: HttpConfig) -> Arc<Http> {
    Arc::new(Http::new(&config))
}

fn builtin() -> Arc<Http> {
    http(HttpConfig::default())
}

fn open(service: &Arc<Http>) -> Harness {
    Harness::builder_shared(Arc::clone(service) as _).open()
}

/// One response parsed off the front of `bytes`: (status, head, body).
fn response(bytes: &mut Vec<u8>, head_only: bool) -> (u16, String, Vec<u8>) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head")
        + 4;
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let length = if head_only { 0 } else { length };
    let body = bytes[end..end + length].to_vec();
    bytes.drain(..end + length);
    (status, head, body)
}

#[test]
fn http_get_slash_serves_the_builtin_index() {
    let mut h = open(&builtin());
    h.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, body) = response(&mut out, false);
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(String::from_utf8(body).unwrap().contains("<h1>plexus</h1>"));
    assert!(out.is_empty());
    assert!(!h.is_closing(), "HTTP/1.1 keeps the connection");
}

#[test]
fn http_head_healthz_and_404() {
    let mut h = open(&builtin());
    h.receive(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    h.receive(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, body) = response(&mut out, true);
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: "), "{head}");
    assert!(body.is_empty());
    let (status, _, body) = response(&mut out, false);
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    let (status, _, body) = response(&mut out, false);
    assert_eq!((status, &body[..]), (404, &b"404 Not Found\n"[..]));
    assert!(out.is_empty());
}

#[test]
fn http_answers_a_request_fed_one_byte_at_a_time() {
    let mut h = open(&builtin());
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for (i, byte) in request.iter().enumerate() {
        h.receive(std::slice::from_ref(byte));
        if i + 1 < request.len() {
            assert_eq!(h.queued(), 0, "answered before the head was complete");
        }
    }
    let mut out = h.take_sent();
    let (status, head, body) = response(&mut out, false);
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert!(head.contains("Connection: close"));
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}

#[test]
fn http_answers_pipelined_requests_in_order_even_when_the_peer_falls_behind() {
    // Watermarks small enough that one response makes the session backlogged: the later
    // requests wait in the decoder until the peer reads (on_drain), and still come in order.
    let service = builtin();
    let mut h = Harness::builder_shared(Arc::clone(&service) as _)
        .watermarks(100, 10)
        .open();
    let mut batch = Vec::new();
    for path in ["/healthz", "/nope", "/", "/healthz"] {
        batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    h.receive(&batch);
    let mut out = Vec::new();
    let mut reads = 0;
    while h.queued() > 0 {
        out.extend(h.take_sent());
        reads += 1;
    }
    assert!(reads > 1, "the peer falling behind paused the pipeline");
    let statuses: Vec<u16> = (0..4).map(|_| response(&mut out, false).0).collect();
    assert_eq!(statuses, [200, 404, 200, 200]);
    assert!(out.is_empty());
}

#[test]
fn http_bad_request_gets_400_and_a_close() {
    let mut h = open(&builtin());
    h.receive(b"NOT HTTP AT ALL\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, _) = response(&mut out, false);
    assert_eq!(status, 400);
    assert!(head.contains("Connection: close"));
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}

#[test]
fn http_header_timeout_answers_408_and_closes_on_the_fake_clock() {
    let config = HttpConfig {
        header_timeout: Duration::from_secs(5),
        ..HttpConfig::default()
    };
    let mut h = open(&http(config));
    h.receive(b"GET / HTTP/1.1\r\nHo");
    h.advance(Duration::from_secs(3));
    h.receive(b"st: x\r\n"); // trickling bytes do not push the deadline back
    h.advance(Duration::from_millis(1999));
    assert_eq!(h.queued(), 0);
    assert!(!h.is_closing());
    h.advance(Duration::from_millis(1));
    let mut out = h.take_sent();
    let (status, _, _) = response(&mut out, false);
    assert_eq!(status, 408);
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}

#[test]
fn http_serves_a_file_with_range_and_if_none_match() {
    let root = tempfile::tempdir().unwrap();
    // Larger than the inline/cache size: queued as a file region and read back by the harness.
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::File::create(root.path().join("data.bin"))
        .unwrap()
        .write_all(&body)
        .unwrap();
    std::fs::write(root.path().join("small.txt"), b"small file\n").unwrap();
    let config = HttpConfig {
        root: Some(root.path().to_path_buf()),
        ..HttpConfig::default()
    };
    let service = http(config);
    let mut h = open(&service);

    h.receive(b"GET /data.bin HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, got) = response(&mut out, false);
    assert_eq!(status, 200);
    assert_eq!(got, body);
    let etag = head
        .lines()
        .find_map(|line| line.strip_prefix("ETag: "))
        .expect("an ETag")
        .to_owned();

    h.receive(b"GET /data.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-1999\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, got) = response(&mut out, false);
    assert_eq!(status, 206);
    assert!(
        head.contains("Content-Range: bytes 1000-1999/100000"),
        "{head}"
    );
    assert_eq!(got, &body[1000..2000]);

    h.receive(
        format!("GET /data.bin HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n").as_bytes(),
    );
    let mut out = h.take_sent();
    let (status, _, got) = response(&mut out, true);
    assert_eq!(status, 304);
    assert!(got.is_empty());
    assert!(out.is_empty(), "a 304 has no body");

    h.receive(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = h.take_sent();
    let (status, head, got) = response(&mut out, false);
    assert_eq!((status, &got[..]), (200, &b"small file\n"[..]));
    assert!(head.contains("Content-Type: text/plain"), "{head}");
    assert!(!h.is_closing());
}
