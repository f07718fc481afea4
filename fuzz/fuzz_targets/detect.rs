//! Fuzzes first-bytes protocol detection: arbitrary bytes never panic, the
//! answer byte by byte is the answer at once, and it is reached within
//! MAX_SNIFF_BYTES.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::detect::{sniff, Sniff, MAX_SNIFF_BYTES};

fuzz_target!(|data: &[u8]| {
    for allow_proxy in [false, true] {
        let all = sniff(data, allow_proxy);
        let mut first = Sniff::NeedMore;
        for n in 0..=data.len() {
            first = sniff(&data[..n], allow_proxy);
            if first != Sniff::NeedMore {
                assert!(n <= MAX_SNIFF_BYTES);
                break;
            }
        }
        assert_eq!(first, all);
        if data.len() >= MAX_SNIFF_BYTES {
            assert_ne!(all, Sniff::NeedMore);
        }
    }
});
