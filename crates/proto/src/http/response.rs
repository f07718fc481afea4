//! Response-side HTTP helpers, all pure: owns the status line and header
//! serialization, chunked encoding, HTTP dates, `Range` parsing, entity tags
//! with `If-None-Match`, and the extension → media type table of the static
//! file server.

use std::time::{SystemTime, UNIX_EPOCH};

/// The reason phrase for `status` (RFC 9110 §15); `""` for unknown codes
/// (the phrase is optional on the wire).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Appends `HTTP/1.1 <status> <reason>\r\n`, each `name: value\r\n`, and the
/// blank line. Names and values are written as given: they come from the
/// server, never from a client.
pub fn write_head(out: &mut Vec<u8>, status: u16, headers: &[(&str, &[u8])]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk (`<hex size>\r\n<data>\r\n`); nothing for empty `data`,
/// since an empty chunk would end the body.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk and an empty trailer section (`0\r\n\r\n`).
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn format_http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Parses any of the three HTTP date formats (IMF-fixdate, RFC 850, asctime).
pub fn parse_http_date(s: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(s).ok()?;
    httpdate::parse_http_date(s.trim()).ok()
}

/// What a `Range` header asks of a representation of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Send the whole representation (no range, or one the server ignores).
    Full,
    /// Send bytes `start..=end` (206).
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// The range starts past the end (416).
    Unsatisfiable,
}

/// Interprets a `Range` value for a representation of `len` bytes. Only a
/// single `bytes=` range is served; several ranges or bad syntax give
/// [`RangeRequest::Full`] (RFC 9110 §14.2 allows ignoring Range).
pub fn parse_range(value: &[u8], len: u64) -> RangeRequest {
    let value = value.trim_ascii();
    let Some((unit, spec)) = split_at_byte(value, b'=') else {
        return RangeRequest::Full;
    };
    if !unit.trim_ascii().eq_ignore_ascii_case(b"bytes") {
        return RangeRequest::Full;
    }
    let spec = spec.trim_ascii();
    if spec.contains(&b',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = split_at_byte(spec, b'-') else {
        return RangeRequest::Full;
    };
    // Every `len - 1` below is `len.saturating_sub(1)` with `len > 0` (checked first).
    match (digits(first), digits(last)) {
        // "-n": the last n bytes.
        (None, Some(suffix)) if first.is_empty() => {
            if suffix == 0 || len == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start: len.saturating_sub(suffix),
                    end: len.saturating_sub(1),
                }
            }
        }
        // "a-": from a to the end.
        (Some(start), None) if last.is_empty() => {
            if start >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start,
                    end: len.saturating_sub(1),
                }
            }
        }
        (Some(start), Some(end)) if start <= end => {
            if start >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start,
                    end: end.min(len.saturating_sub(1)),
                }
            }
        }
        _ => RangeRequest::Full,
    }
}

/// A non-empty run of decimal digits; values past `u64::MAX` saturate
/// (they are past any length anyway).
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0u64, |n, &b| {
        n.saturating_mul(10)
            .saturating_add(u64::from(b.saturating_sub(b'0')))
    }))
}

/// The media type served for a file extension (case-insensitive, without
/// the dot); `application/octet-stream` when unknown.
pub fn content_type(extension: &str) -> &'static str {
    match extension.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

/// A strong entity tag (quoted) derived from a file's length and
/// modification time: it changes whenever either does.
pub fn entity_tag(len: u64, modified_unix_nanos: u128) -> String {
    format!("\"{modified_unix_nanos:x}-{len:x}\"")
}

/// Whether a `Range` may be honoured under `If-Range` (RFC 9110 §13.1.5): the value is an
/// entity-tag equal to `etag` under the strong comparison (neither weak), or an HTTP-date
/// equal to the representation's Last-Modified (`last_modified`, to the second). Anything
/// else — a stale or weak validator, garbage — means "send the whole representation" (200).
pub fn if_range_matches(value: &[u8], etag: &str, last_modified: SystemTime) -> bool {
    let value = value.trim_ascii();
    if value.starts_with(b"\"") {
        return !etag.starts_with("W/") && value == etag.as_bytes();
    }
    if value.starts_with(b"W/") {
        return false;
    }
    let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
    match parse_http_date(value) {
        Some(date) => seconds(date).is_some() && seconds(date) == seconds(last_modified),
        None => false,
    }
}

/// Whether an `If-None-Match` value matches `etag` (so the answer is 304):
/// `*`, or any listed tag equal to it under the weak comparison (RFC 9110
/// §8.8.3.2: `W/` ignored on both sides). A malformed list matches only by
/// the tags before the error.
pub fn if_none_match(value: &[u8], etag: &str) -> bool {
    let value = value.trim_ascii();
    if value == b"*" {
        return true;
    }
    let wanted = opaque_tag(etag.as_bytes());
    let mut rest = value;
    loop {
        rest = trim_list_separators(rest);
        if rest.is_empty() {
            return false;
        }
        if let Some(weak) = rest.strip_prefix(b"W/") {
            rest = weak;
        }
        let Some(after_quote) = rest.strip_prefix(b"\"") else {
            return false;
        };
        let Some((tag, after_tag)) = split_at_byte(after_quote, b'"') else {
            return false;
        };
        if Some(tag) == wanted {
            return true;
        }
        rest = after_tag;
        // Between tags only whitespace and a comma may appear.
        let next = rest.trim_ascii_start();
        if !next.is_empty() && !next.starts_with(b",") {
            return false;
        }
    }
}

/// The opaque part of an entity tag (`W/"x"` or `"x"` → `x`).
fn opaque_tag(tag: &[u8]) -> Option<&[u8]> {
    let tag = tag.trim_ascii();
    let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
    tag.strip_prefix(b"\"")?.strip_suffix(b"\"")
}

/// `bytes` split around the first `delimiter` (which neither part contains).
fn split_at_byte(bytes: &[u8], delimiter: u8) -> Option<(&[u8], &[u8])> {
    let mut parts = bytes.splitn(2, |&b| b == delimiter);
    Some((parts.next()?, parts.next()?))
}

fn trim_list_separators(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b',', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn if_range_needs_a_strong_equal_etag_or_the_exact_last_modified() {
        let modified = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let etag = "\"abc-10\"";
        assert!(if_range_matches(b"\"abc-10\"", etag, modified));
        assert!(!if_range_matches(b"\"stale\"", etag, modified));
        assert!(!if_range_matches(b"W/\"abc-10\"", etag, modified));
        assert!(!if_range_matches(b"\"abc-10\"", "W/\"abc-10\"", modified));
        assert!(if_range_matches(
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            etag,
            modified
        ));
        assert!(!if_range_matches(
            b"Sun, 06 Nov 1994 08:49:38 GMT",
            etag,
            modified
        ));
        assert!(!if_range_matches(b"yesterday", etag, modified));
        assert!(!if_range_matches(b"", etag, modified));
    }

    #[test]
    fn head_is_status_line_headers_and_blank_line() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            404,
            &[("Content-Length", b"9"), ("Connection", b"close")],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn reason_phrases_cover_every_error_status_the_decoder_gives() {
        for status in [400, 408, 413, 414, 431, 501, 505, 206, 304, 416] {
            assert!(!reason_phrase(status).is_empty(), "{status}");
        }
        assert_eq!(reason_phrase(799), "");
    }

    #[test]
    fn chunks_are_hex_sized_and_empty_data_writes_nothing() {
        let mut out = Vec::new();
        write_chunk(&mut out, &[b'x'; 26]);
        write_chunk(&mut out, b"");
        write_last_chunk(&mut out);
        let mut expected = b"1a\r\n".to_vec();
        expected.extend_from_slice(&[b'x'; 26]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, expected);
    }

    #[test]
    fn http_dates_round_trip_and_all_three_formats_parse() {
        let t = UNIX_EPOCH + Duration::from_secs(784111777);
        assert_eq!(format_http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(parse_http_date(b"yesterday"), None);
        assert_eq!(parse_http_date(b"\xff\xfe"), None);
    }

    #[test]
    fn single_byte_ranges_are_served() {
        use RangeRequest::*;
        assert_eq!(parse_range(b"bytes=0-9", 100), Partial { start: 0, end: 9 });
        assert_eq!(
            parse_range(b"bytes=90-", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(b"bytes=-10", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(b"bytes=-1000", 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            parse_range(b"bytes=50-1000", 100),
            Partial { start: 50, end: 99 }
        );
        assert_eq!(
            parse_range(b"Bytes = 5-5", 100),
            Partial { start: 5, end: 5 }
        );
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        use RangeRequest::*;
        assert_eq!(parse_range(b"bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(
            parse_range(b"bytes=99999999999999999999999-", 100),
            Unsatisfiable
        );
    }

    #[test]
    fn multi_ranges_and_bad_syntax_give_the_full_representation() {
        for value in [
            &b"bytes=0-1,5-6"[..],
            b"bytes=5-1",
            b"bytes=-",
            b"bytes=a-b",
            b"bytes=+1-2",
            b"items=0-1",
            b"bytes 0-1",
            b"",
            b"bytes=1-2-3",
        ] {
            assert_eq!(
                parse_range(value, 100),
                RangeRequest::Full,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn content_types_of_common_extensions() {
        assert_eq!(content_type("html"), "text/html; charset=utf-8");
        assert_eq!(content_type("PNG"), "image/png");
        assert_eq!(content_type("wasm"), "application/wasm");
        assert_eq!(content_type("woff2"), "font/woff2");
        assert_eq!(content_type("exe"), "application/octet-stream");
        assert_eq!(content_type(""), "application/octet-stream");
    }

    #[test]
    fn entity_tags_are_strong_and_change_with_length_and_time() {
        let tag = entity_tag(10, 1_000);
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
        assert_ne!(tag, entity_tag(11, 1_000));
        assert_ne!(tag, entity_tag(10, 1_001));
    }

    #[test]
    fn if_none_match_uses_weak_comparison_over_a_list() {
        let tag = entity_tag(10, 1_000);
        assert!(if_none_match(tag.as_bytes(), &tag));
        assert!(if_none_match(b" * ", &tag));
        assert!(if_none_match(format!("W/{tag}").as_bytes(), &tag));
        assert!(if_none_match(
            format!("\"a\", W/\"b,c\" ,{tag}").as_bytes(),
            &tag
        ));
        assert!(!if_none_match(b"\"other\"", &tag));
        assert!(!if_none_match(b"", &tag));
        // Garbage stops the list: a later tag is not looked at.
        assert!(!if_none_match(format!("nonsense, {tag}").as_bytes(), &tag));
        assert!(!if_none_match(b"\"unterminated", &tag));
    }

    proptest::proptest! {
        #[test]
        fn parse_range_never_panics_and_stays_in_bounds(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            len in 0u64..1000,
        ) {
            if let RangeRequest::Partial { start, end } = parse_range(&value, len) {
                proptest::prop_assert!(start <= end && end < len);
            }
        }

        #[test]
        fn parse_range_of_generated_ranges_stays_in_bounds(
            a in 0u64..2000, b in 0u64..2000, len in 0u64..1000,
        ) {
            for value in [format!("bytes={a}-{b}"), format!("bytes={a}-"), format!("bytes=-{b}")] {
                if let RangeRequest::Partial { start, end } = parse_range(value.as_bytes(), len) {
                    proptest::prop_assert!(start <= end && end < len, "{value} {len}");
                }
            }
        }
    }
}
