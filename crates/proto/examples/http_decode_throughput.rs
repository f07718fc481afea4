//! Measures the request decoder alone: how many pipelined requests per
//! second one core decodes (no sockets), for a small GET like curl's and
//! for a POST with a chunked body.
//!
//! `cargo run --release -p plexus-proto --example http_decode_throughput`

use std::time::Instant;

use plexus_proto::http::{Limits, RequestDecoder, RequestEvent};

/// Decodes `requests` copies of `request`, pushed in 64 KiB reads as the
/// event loop would, and prints the rate.
fn measure(name: &str, request: &[u8], requests: usize) {
    let stream: Vec<u8> = request.repeat(requests);
    let start = Instant::now();
    let mut decoder = RequestDecoder::new(Limits::default());
    let mut ends = 0;
    for read in stream.chunks(64 * 1024) {
        decoder.push(read);
        while let Some(event) = decoder.poll().expect("valid stream") {
            if event == RequestEvent::End {
                ends += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(ends, requests);
    println!(
        "{name}: {requests} requests of {} bytes in {:.3} s = {:.2} M requests/s, {:.0} MB/s",
        request.len(),
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64() / 1e6,
        stream.len() as f64 / elapsed.as_secs_f64() / 1e6,
    );
}

fn main() {
    measure(
        "GET (curl-like)",
        b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        1_000_000,
    );
    let mut post =
        b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        post.extend_from_slice(b"100\r\n");
        post.extend_from_slice(&[b'x'; 256]);
        post.extend_from_slice(b"\r\n");
    }
    post.extend_from_slice(b"0\r\n\r\n");
    measure("POST chunked 4x256 B", &post, 200_000);
}
