//! Shared by the HTTP targets: drives a `RequestDecoder` over an input cut
//! into pieces, checks the decoder's invariants on every event, and returns
//! what it decoded in a form that does not depend on how the input was cut
//! (body pieces joined per message), so two cuttings can be compared.

use plexus_proto::http::{
    if_none_match, normalize_path, parse_http_date, parse_range, AcceptEncoding, Limits,
    RequestDecoder, RequestEvent, RequestHead, Q_MAX,
};

/// The limits the targets decode with: small, so every limit is reachable.
pub const LIMITS: Limits = Limits {
    max_head_bytes: 1024,
    max_uri_bytes: 256,
    max_headers: 16,
    max_body_bytes: 4096,
};

/// One decoded message part, with body pieces joined.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Head(Box<RequestHead>),
    Body(Vec<u8>),
    End,
}

/// Everything a decoder produced from one input: the parts, then the status
/// of the error that stopped it (if one did), and whether it was left in the
/// middle of a head.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub parts: Vec<Part>,
    pub error: Option<u16>,
    pub mid_head: bool,
}

/// Piece sizes from a seed: 1 to 64 bytes, varying (a small LCG), so a
/// boundary can fall anywhere, including inside CRLF and chunk-size lines.
pub fn pieces(input: &[u8], seed: u8) -> impl Iterator<Item = &[u8]> {
    let mut state = u32::from(seed) | 1;
    let mut rest = input;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let size = usize::try_from((state >> 16) % 64).unwrap_or(0) + 1;
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// Pushes every piece (polling after each, as the runtime does) and checks
/// the invariants; `helpers` also runs the path/range/date helpers on heads.
pub fn decode<'a>(chunks: impl Iterator<Item = &'a [u8]>, helpers: bool) -> Decoded {
    let limits = LIMITS;
    let mut decoder = RequestDecoder::new(limits);
    let mut parts = Vec::new();
    let mut body_bytes = 0u64;
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.poll() {
                Ok(None) => {
                    // An incomplete head never holds the limit's worth of bytes.
                    if decoder.head_in_progress() {
                        assert!(decoder.buffered() < limits.max_head_bytes);
                    }
                    break;
                }
                Ok(Some(RequestEvent::Head(head))) => {
                    body_bytes = 0;
                    assert!(head.target.len() <= limits.max_uri_bytes);
                    assert!(head.headers.len() <= limits.max_headers);
                    if helpers {
                        check_helpers(&head);
                    }
                    parts.push(Part::Head(Box::new(head)));
                }
                Ok(Some(RequestEvent::Body(piece))) => {
                    assert!(!piece.is_empty());
                    body_bytes += piece.len() as u64;
                    assert!(body_bytes <= limits.max_body_bytes);
                    match parts.last_mut() {
                        Some(Part::Body(body)) => body.extend_from_slice(&piece),
                        Some(Part::Head(_)) => parts.push(Part::Body(piece)),
                        other => panic!("body after {other:?}"),
                    }
                }
                Ok(Some(RequestEvent::End)) => {
                    assert!(matches!(parts.last(), Some(Part::Head(_) | Part::Body(_))));
                    parts.push(Part::End);
                }
                Err(error) => {
                    let status = error.status();
                    assert!([400, 413, 414, 431, 501, 505].contains(&status));
                    // Failed stays failed, and keeps nothing.
                    assert_eq!(decoder.poll(), Err(error));
                    assert_eq!(decoder.buffered(), 0);
                    decoder.push(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
                    assert_eq!(decoder.buffered(), 0);
                    return Decoded {
                        parts,
                        error: Some(status),
                        mid_head: false,
                    };
                }
            }
        }
    }
    Decoded {
        parts,
        error: None,
        mid_head: decoder.head_in_progress(),
    }
}

fn check_helpers(head: &RequestHead) {
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
        let accept = AcceptEncoding::parse([header.value.as_slice()]);
        assert!(accept.quality("identity") <= Q_MAX);
        if let Some(chosen) = accept.choose(&["br", "gzip", "zstd"]) {
            assert!(accept.quality(chosen) > 0, "chose a refused coding");
        }
    }
}

/// Whether two decodings of the same bytes agree. They must produce the same
/// heads, body bytes and ends. Where they may differ is a head that is still
/// incomplete when the input ends: the decoder refuses a malformed head as
/// soon as it can tell, and what it can tell depends on where the last read
/// ended (httparse sees an incomplete field line only in the bigger read; the
/// request-target length is checked byte by byte), so one decoding may have
/// refused it while the other still waits for it, and two refusals of a head
/// may name different faults (400, 414, 431). A refusal inside a body or
/// trailer section must be the same in both.
fn agree(a: &Decoded, b: &Decoded) -> bool {
    if a.parts != b.parts {
        return false;
    }
    let in_head = matches!(a.parts.last(), None | Some(Part::End));
    match (a.error, b.error) {
        (None, None) => a.mid_head == b.mid_head,
        (Some(_), None) => in_head && b.mid_head,
        (None, Some(_)) => in_head && a.mid_head,
        (Some(x), Some(y)) => x == y || in_head,
    }
}

/// Decodes `input` cut by `seed`, and at once, and byte by byte when it is
/// short: all three must agree (see `agree`).
pub fn differential(input: &[u8], seed: u8) {
    let cut = decode(pieces(input, seed), true);
    let whole = decode(std::iter::once(input), false);
    assert!(
        agree(&cut, &whole),
        "cut by seed {seed}: {cut:?}\nat once: {whole:?}"
    );
    if input.len() <= 512 {
        let bytes = decode(input.chunks(1), false);
        assert!(
            agree(&bytes, &whole),
            "byte by byte: {bytes:?}\nat once: {whole:?}"
        );
    }
}
