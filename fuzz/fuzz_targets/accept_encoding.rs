//! Fuzzes the `Accept-Encoding` parser (`http::AcceptEncoding`, what picks a precompressed
//! variant): the input's lines are the field's lines. Besides "no panic": every quality is
//! within 0..=Q_MAX; what `ranked` returns is a subset of the offer, in non-increasing
//! quality, never a refused coding (q=0); `choose` is its first; and the lines parsed apart equal the lines joined with commas
//! (one list split over several lines is one list).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::http::{AcceptEncoding, Q_MAX};

const OFFERED: [&str; 4] = ["br", "zstd", "gzip", "identity"];

fuzz_target!(|data: &[u8]| {
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let accept = AcceptEncoding::parse(lines.iter().copied());
    let joined = AcceptEncoding::parse([lines.join(&b',').as_slice()]);
    assert_eq!(accept, joined);
    for coding in OFFERED.iter().chain(&["*", "deflate", "x-gzip"]) {
        assert!(accept.quality(coding) <= Q_MAX);
    }
    let ranked = accept.ranked(&OFFERED);
    let mut previous = Q_MAX;
    for coding in &ranked {
        assert!(OFFERED.contains(coding), "{coding} was not offered");
        let q = accept.quality(coding);
        assert!(q > 0, "{coding} is refused");
        assert!(q <= previous, "not in order of quality");
        previous = q;
    }
    assert_eq!(accept.choose(&OFFERED), ranked.first().copied());
});
