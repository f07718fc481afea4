//! Fuzzes the HTTP/1.1 request decoder: the input is split into pieces (the
//! first byte chooses their size) and pushed as a client could send it; every
//! event is checked against the decoder's invariants, and the path, range
//! and conditional helpers are run on what the requests carry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::http::{
    if_none_match, normalize_path, parse_http_date, parse_range, Limits, RequestDecoder,
    RequestEvent,
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_head_bytes: 1024,
        max_uri_bytes: 256,
        max_headers: 16,
        max_body_bytes: 4096,
    };
    let mut decoder = RequestDecoder::new(limits);
    let piece = usize::from(split % 64) + 1;
    let mut body_bytes = 0u64;
    'pieces: for chunk in input.chunks(piece) {
        decoder.push(chunk);
        loop {
            match decoder.poll() {
                Ok(None) => {
                    // An incomplete head never holds more than the limit plus one push.
                    if decoder.head_in_progress() {
                        assert!(decoder.buffered() < limits.max_head_bytes + piece);
                    }
                    break;
                }
                Ok(Some(RequestEvent::Head(head))) => {
                    body_bytes = 0;
                    assert!(head.target.len() <= limits.max_uri_bytes);
                    assert!(head.headers.len() <= limits.max_headers);
                    if let Ok(segments) = normalize_path(&head.target) {
                        for segment in segments {
                            assert!(!segment.is_empty() && segment != "." && segment != "..");
                            assert!(!segment.contains(['/', '\\', '\0']));
                        }
                    }
                    for header in &head.headers {
                        let _ = parse_range(&header.value, 1000);
                        let _ = parse_http_date(&header.value);
                        let _ = if_none_match(&header.value, "\"a-1\"");
                    }
                }
                Ok(Some(RequestEvent::Body(piece))) => {
                    assert!(!piece.is_empty());
                    body_bytes += piece.len() as u64;
                    assert!(body_bytes <= limits.max_body_bytes);
                }
                Ok(Some(RequestEvent::End)) => {}
                Err(error) => {
                    let status = error.status();
                    assert!([400, 413, 414, 431, 501, 505].contains(&status));
                    // Failed stays failed, and keeps nothing.
                    assert_eq!(decoder.poll(), Err(error));
                    assert_eq!(decoder.buffered(), 0);
                    break 'pieces;
                }
            }
        }
    }
});
