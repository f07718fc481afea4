//! Fuzzes the HTTP/1.1 request decoder from the first byte of a connection:
//! the input is pushed in varying pieces (the first byte seeds their sizes),
//! at once, and byte by byte; every event is checked against the decoder's
//! invariants, the three decodings must agree (heads, joined body bytes,
//! ends, error status), and the path, range and conditional helpers run on
//! what the requests carry.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common/http.rs"]
mod http;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    http::differential(input, seed);
});
