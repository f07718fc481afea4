//! Fuzzes the PROXY v1/v2 header parser: arbitrary bytes never panic, a
//! parsed header never claims more bytes than it was given or than
//! MAX_PROXY_HEADER, and the answer byte by byte is the answer at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::proxy::{parse_proxy_header, MAX_PROXY_HEADER};

fuzz_target!(|data: &[u8]| {
    let all = parse_proxy_header(data);
    if let Ok(Some((_, consumed))) = &all {
        assert!(*consumed <= data.len() && *consumed <= MAX_PROXY_HEADER);
    }
    let mut first = Ok(None);
    for n in 0..=data.len() {
        first = parse_proxy_header(&data[..n]);
        if !matches!(first, Ok(None)) {
            break;
        }
    }
    assert_eq!(first, all);
});
