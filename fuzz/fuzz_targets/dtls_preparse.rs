//! Fuzzes the DTLS pre-cookie path: `proto::dtls`, which looks at every
//! datagram a dtls listener receives before any OpenSSL state exists.
//!
//! Checks, besides "no panic": a parsed record's header re-encodes to the
//! bytes it came from and its payload is exactly the `length` bytes after
//! it; `records` accounts for every byte (records, then at most one error,
//! last); `check_records` agrees with `records`; a ClientHello accepted by
//! `parse_client_hello` is an epoch-0 handshake record in a well-formed
//! datagram, with a 32-byte random, a session id of at most 32 bytes and
//! every field inside the datagram; and `parse_client_hello` reports a
//! malformed record exactly when `check_records` refuses the datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::dtls::{
    check_records, parse_client_hello, parse_record, records, ContentType, Record,
    MAX_CLIENT_HELLO_SEQ, MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN,
};

/// Whether `part` lies inside `whole` (same memory).
fn within(part: &[u8], whole: &[u8]) -> bool {
    let whole = whole.as_ptr_range();
    let part = part.as_ptr_range();
    whole.start <= part.start && part.end <= whole.end
}

/// The 13 header bytes `record` was parsed from.
fn encode_header(record: &Record<'_>) -> Vec<u8> {
    let header = record.header;
    let mut out = vec![header.content_type.as_u8()];
    out.extend_from_slice(&header.version.as_u16().to_be_bytes());
    out.extend_from_slice(&header.epoch.to_be_bytes());
    out.extend_from_slice(&header.sequence.to_be_bytes()[2..]);
    out.extend_from_slice(&header.length.to_be_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    // One record.
    match parse_record(data) {
        Ok((record, rest)) => {
            let len = record.payload.len();
            assert_eq!(usize::from(record.header.length), len);
            assert!(len <= MAX_RECORD_PAYLOAD);
            assert_eq!(RECORD_HEADER_LEN + len + rest.len(), data.len());
            assert_eq!(encode_header(&record), data[..RECORD_HEADER_LEN]);
            assert_eq!(
                record.payload,
                &data[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]
            );
            assert!(within(record.payload, data) && within(rest, data));
        }
        Err(err) => {
            assert!(err.is_malformed_record(), "{err:?}");
            assert!(!err.label().is_empty());
            let _ = err.to_string();
        }
    }

    // Every record.
    let mut offset = 0usize;
    let mut count = 0usize;
    let mut failed = None;
    for record in records(data) {
        assert!(failed.is_none(), "a record after an error");
        match record {
            Ok(record) => {
                assert_eq!(
                    encode_header(&record),
                    data[offset..offset + RECORD_HEADER_LEN]
                );
                offset += RECORD_HEADER_LEN + record.payload.len();
                count += 1;
            }
            Err(err) => {
                assert!(err.is_malformed_record());
                failed = Some(err);
            }
        }
    }
    if failed.is_none() {
        assert_eq!(offset, data.len(), "records left bytes unaccounted for");
    }
    match check_records(data) {
        Ok(n) => {
            assert!(failed.is_none());
            assert_eq!(n, count);
            assert!(n >= 1);
        }
        Err(err) => {
            assert!(err.is_malformed_record());
            assert!(failed.is_some() || data.is_empty());
        }
    }

    // The initial ClientHello.
    let hello = parse_client_hello(data);
    assert_eq!(
        hello
            .as_ref()
            .err()
            .is_some_and(|err| err.is_malformed_record()),
        check_records(data).is_err(),
        "{hello:?}"
    );
    if let Ok(hello) = hello {
        let (first, _) = parse_record(data).expect("a ClientHello is a record");
        assert_eq!(hello.record, first.header);
        assert_eq!(first.header.content_type, ContentType::Handshake);
        assert_eq!(first.header.epoch, 0);
        assert!(hello.message_seq <= MAX_CLIENT_HELLO_SEQ);
        assert_eq!(hello.random.len(), 32);
        assert!(hello.session_id.len() <= 32);
        assert!(hello.cookie.len() <= 255);
        for field in [hello.random, hello.session_id, hello.cookie] {
            assert!(within(field, first.payload));
        }
    }
});
