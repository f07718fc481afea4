//! Fuzzes the chunked body decoder: a fixed, valid `Transfer-Encoding:
//! chunked` request head, then the fuzzer's bytes as the body (chunk-size
//! lines, extensions, data, CRLFs, trailers, and whatever follows: the next
//! pipelined request). Same checks as `http_request`: invariants on every
//! event, and cut / at once / byte by byte decode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common/http.rs"]
mod http;

const HEAD: &[u8] = b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(HEAD.len() + body.len());
    input.extend_from_slice(HEAD);
    input.extend_from_slice(body);
    http::differential(&input, seed);
});
