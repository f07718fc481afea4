//! First-bytes protocol detection for the `auto` protocol group: owns the
//! decision, from the first bytes a client sent, between a PROXY header, a
//! TLS handshake, an HTTP request line and anything else.
//!
//! [`sniff`] is a pure function of the bytes seen so far; it answers
//! [`Sniff::NeedMore`] while those bytes are a prefix of some protocol's
//! signature, so the answer is the same whether the bytes arrive at once or
//! one at a time, and is reached after at most [`MAX_SNIFF_BYTES`] bytes.

/// The PROXY protocol v1 preamble.
const PROXY_V1: &[u8] = b"PROXY ";
/// The PROXY protocol v2 signature.
pub(crate) const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Request-line beginnings recognised as HTTP/1.x (and the HTTP/2 prior
/// knowledge preface, so the runtime can refuse it properly).
const HTTP_STARTS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2.0",
];

/// Bytes of a TLS record header that identify a handshake record:
/// content type 22, then protocol version major 3, minor 0..=4.
const TLS_HEADER_LEN: usize = 3;

/// The most bytes [`sniff`] can need before it decides (the longest
/// signature, `PRI * HTTP/2.0`).
pub const MAX_SNIFF_BYTES: usize = {
    let mut max = PROXY_V2_SIGNATURE.len();
    if PROXY_V1.len() > max {
        max = PROXY_V1.len();
    }
    if TLS_HEADER_LEN > max {
        max = TLS_HEADER_LEN;
    }
    let mut i = 0;
    // Evaluated at compile time: an out-of-bounds index would fail the build, not a session.
    #[allow(clippy::indexing_slicing)]
    while i < HTTP_STARTS.len() {
        if HTTP_STARTS[i].len() > max {
            max = HTTP_STARTS[i].len();
        }
        i += 1;
    }
    max
};

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Still a prefix of some signature: wait for more bytes.
    NeedMore,
    /// A PROXY protocol v1 or v2 header (only when allowed).
    Proxy,
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line (or the HTTP/2 preface).
    Http,
    /// None of the above.
    Other,
}

/// Classifies a connection from its first bytes. `allow_proxy` says whether
/// this listener accepts a PROXY header; when it does not, such bytes are
/// [`Sniff::Other`] (or HTTP, where a method matches).
pub fn sniff(prefix: &[u8], allow_proxy: bool) -> Sniff {
    if prefix.is_empty() {
        return Sniff::NeedMore;
    }
    let mut need_more = false;
    let mut check = |signature: &[u8]| -> bool {
        if prefix.starts_with(signature) {
            return true;
        }
        if signature.starts_with(prefix) {
            need_more = true;
        }
        false
    };
    if allow_proxy && (check(PROXY_V1) || check(PROXY_V2_SIGNATURE)) {
        return Sniff::Proxy;
    }
    if HTTP_STARTS.iter().any(|start| check(start)) {
        return Sniff::Http;
    }
    match prefix {
        [0x16, 0x03, 0x00..=0x04, ..] => return Sniff::Tls,
        [0x16] | [0x16, 0x03] => need_more = true,
        _ => {}
    }
    if need_more {
        Sniff::NeedMore
    } else {
        Sniff::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer for `input` when it arrives one byte at a time: the first
    /// answer that is not NeedMore, and the byte count it took.
    fn byte_at_a_time(input: &[u8], allow_proxy: bool) -> (Sniff, usize) {
        for n in 0..=input.len() {
            let answer = sniff(&input[..n], allow_proxy);
            if answer != Sniff::NeedMore {
                return (answer, n);
            }
        }
        (Sniff::NeedMore, input.len())
    }

    #[test]
    fn every_protocol_is_recognised_at_once_and_byte_by_byte() {
        let cases: &[(&[u8], bool, Sniff)] = &[
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", true, Sniff::Proxy),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c", true, Sniff::Proxy),
            (b"\x16\x03\x01\x02\x00\x01\x00", true, Sniff::Tls),
            (b"\x16\x03\x03\x00\x10", false, Sniff::Tls),
            (b"GET / HTTP/1.1\r\n", true, Sniff::Http),
            (b"HEAD / HTTP/1.1\r\n", false, Sniff::Http),
            (b"POST /x HTTP/1.1\r\n", false, Sniff::Http),
            (b"PUT /x HTTP/1.1\r\n", false, Sniff::Http),
            (b"DELETE /x HTTP/1.1\r\n", false, Sniff::Http),
            (b"OPTIONS * HTTP/1.1\r\n", false, Sniff::Http),
            (b"PATCH /x HTTP/1.1\r\n", false, Sniff::Http),
            (b"TRACE / HTTP/1.1\r\n", false, Sniff::Http),
            (b"CONNECT a:443 HTTP/1.1\r\n", false, Sniff::Http),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false, Sniff::Http),
            (b"hello world\n", true, Sniff::Other),
            (b"GETX / HTTP/1.1", false, Sniff::Other),
            (b"get / HTTP/1.1", false, Sniff::Other),
            (b"\x16\x05\x01", false, Sniff::Other),
            (b"\x16\x03\x05", false, Sniff::Other),
            (b"\x17\x03\x03", false, Sniff::Other),
            // Without allow_proxy a PROXY header is just bytes for the echo.
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", false, Sniff::Other),
            (b"\r\n\r\n\0\r\nQUIT\n\x21", false, Sniff::Other),
        ];
        for &(input, allow_proxy, expected) in cases {
            assert_eq!(sniff(input, allow_proxy), expected, "{input:?}");
            let (answer, used) = byte_at_a_time(input, allow_proxy);
            assert_eq!(answer, expected, "{input:?} byte by byte");
            assert!(used <= MAX_SNIFF_BYTES, "{input:?} took {used} bytes");
        }
    }

    #[test]
    fn prefixes_of_signatures_need_more() {
        assert_eq!(sniff(b"", true), Sniff::NeedMore);
        assert_eq!(sniff(b"P", false), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2.", false), Sniff::NeedMore);
        assert_eq!(sniff(b"PROXY", true), Sniff::NeedMore);
        assert_eq!(sniff(b"\r\n\r\n\0", true), Sniff::NeedMore);
        assert_eq!(sniff(b"\x16\x03", true), Sniff::NeedMore);
        assert_eq!(sniff(b"OPTIONS", true), Sniff::NeedMore);
        // "PRO" can only be PROXY, which is not allowed here.
        assert_eq!(sniff(b"PRO", false), Sniff::Other);
    }

    #[test]
    fn max_sniff_bytes_is_the_longest_signature() {
        assert_eq!(MAX_SNIFF_BYTES, b"PRI * HTTP/2.0".len());
    }

    proptest::proptest! {
        #[test]
        fn sniff_never_panics_and_decides_within_max_sniff_bytes(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..32),
            allow_proxy in proptest::bool::ANY,
        ) {
            let all = sniff(&bytes, allow_proxy);
            let (answer, used) = byte_at_a_time(&bytes, allow_proxy);
            proptest::prop_assert_eq!(answer, all);
            proptest::prop_assert!(used <= MAX_SNIFF_BYTES);
            if bytes.len() >= MAX_SNIFF_BYTES {
                proptest::prop_assert_ne!(all, Sniff::NeedMore);
            }
        }

        #[test]
        fn known_starts_with_random_tails_are_stable(
            which in 0usize..13,
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
        ) {
            let starts: [&[u8]; 13] = [
                b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"TRACE ", b"CONNECT ", b"PRI * HTTP/2.0", b"PROXY ",
                b"\r\n\r\n\0\r\nQUIT\n", b"\x16\x03\x03",
            ];
            let mut input = starts[which].to_vec();
            input.extend_from_slice(&tail);
            let all = sniff(&input, true);
            proptest::prop_assert_ne!(all, Sniff::NeedMore);
            proptest::prop_assert_ne!(all, Sniff::Other);
            proptest::prop_assert_eq!(byte_at_a_time(&input, true).0, all);
        }
    }
}
