//! Fuzzes the HPACK decoder on a connection's worth of header blocks: byte 0
//! chooses the header-list limit, then each block is a length byte and that
//! many bytes, decoded by one `Decoder` (so the dynamic table carries over,
//! with size updates). Checks: the fields produced stay within the limit
//! (name + value + 32 each), the dynamic table within its maximum; a block
//! that decodes fully is re-encoded by the `Encoder` and decodes back to the
//! same fields; the Huffman coder round-trips every decoded value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus_proto::h2::hpack::{Decoder, Encoder, HeaderField, DEFAULT_TABLE_SIZE};
use plexus_proto::h2::huffman;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, mut rest)) = data.split_first() else {
        return;
    };
    let limit = 64 + usize::from(seed) * 64;
    let mut decoder = Decoder::default();
    let mut encoder = Encoder::new();
    let mut check = Decoder::default();
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (block, tail) = tail.split_at(n);
        rest = tail;
        let Ok(got) = decoder.decode(block, limit) else {
            break;
        };
        assert!(decoder.table_size() <= DEFAULT_TABLE_SIZE);
        let kept: usize = got.fields.iter().map(HeaderField::size).sum();
        assert!(kept <= limit);
        assert!(got.list_size >= kept);
        if got.oversized {
            continue;
        }
        if len % 7 == 0 {
            // A SETTINGS_HEADER_TABLE_SIZE change from the peer, announced in the next block.
            encoder.set_peer_max_table_size(usize::from(len) * 8);
        }
        let mut again = Vec::new();
        encoder.encode(got.fields.iter().map(|f| (f.name.as_slice(), f.value.as_slice())), &mut again);
        let back = check.decode(&again, usize::MAX).expect("our encoding decodes");
        assert_eq!(back.fields, got.fields);
        for f in &got.fields {
            let mut coded = Vec::new();
            huffman::encode(&f.value, &mut coded);
            assert_eq!(coded.len(), huffman::encoded_len(&f.value));
            let mut plain = Vec::new();
            huffman::decode(&coded, f.value.len(), &mut plain).expect("our Huffman decodes");
            assert_eq!(plain, f.value);
        }
    }
});
