//! Fuzzes the envelope check of a stapled OCSP response (`ocsp::check_response`, run on the
//! `[tls] ocsp` file at start and on every SIGHUP). Besides "no panic": an accepted input is a
//! DER SEQUENCE, and no strict prefix of an accepted input is accepted (lengths are exact).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::ocsp::check_response;

fuzz_target!(|data: &[u8]| {
    if check_response(data).is_ok() {
        assert_eq!(data.first(), Some(&0x30));
        for n in 0..data.len().min(4096) {
            assert!(
                check_response(&data[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }
});
