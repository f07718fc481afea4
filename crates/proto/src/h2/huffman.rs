//! The HPACK Huffman code (RFC 7541 §5.2, Appendix B): owns the code table
//! and the string encoder and decoder built on it.
//!
//! The code is canonical (codes of one length are consecutive, in symbol
//! order, and shorter codes sort first; `tests::table_is_canonical` checks
//! it), so decoding needs only, per bit length, the first code and where its
//! symbols start in a symbol list sorted by (length, symbol) — both computed
//! at compile time from the `CODES` table. Decoding walks the input bit by bit and
//! never allocates more than the caller's `limit`.

/// Why a Huffman-coded string was refused (each is a COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HuffmanError {
    /// The string contains the EOS symbol, which RFC 7541 §5.2 forbids.
    #[error("Huffman string contains EOS")]
    Eos,
    /// The padding is longer than 7 bits or not the most significant bits of EOS.
    #[error("Huffman string has invalid padding")]
    Padding,
    /// The decoded string would exceed the caller's byte limit.
    #[error("Huffman string decodes to more than the limit")]
    TooLong,
}

/// The shortest and longest code lengths in the table.
const MIN_LEN: usize = 5;
const MAX_LEN: usize = 30;

/// The EOS symbol's index in [`CODES`].
const EOS: u16 = 256;

/// Per code length: the first canonical code, and the index in `sorted`
/// of its first symbol; `count` is the number of codes of that length.
struct Canonical {
    first: [u32; MAX_LEN + 1],
    start: [u16; MAX_LEN + 1],
    count: [u16; MAX_LEN + 1],
    sorted: [u16; 257],
}

// Evaluated at compile time: an out-of-bounds index here is a build error, not a panic.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; MAX_LEN + 1],
        start: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        sorted: [0; 257],
    };
    let mut n = 0usize;
    let mut len = MIN_LEN;
    while len <= MAX_LEN {
        c.start[len] = n as u16;
        let mut sym = 0usize;
        let mut first_set = false;
        while sym < 257 {
            if CODES[sym].1 as usize == len {
                if !first_set {
                    c.first[len] = CODES[sym].0;
                    first_set = true;
                }
                c.sorted[n] = sym as u16;
                n += 1;
                c.count[len] += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    c
}

static CANONICAL: Canonical = canonical();

/// Decodes the Huffman-coded `input`, appending to `out`; refuses (without
/// growing `out` past it) a result longer than `limit` bytes.
pub fn decode(input: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let c = &CANONICAL;
    let mut code: u32 = 0;
    let mut len: usize = 0;
    let mut produced = 0usize;
    for &byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len = len.saturating_add(1);
            if len < MIN_LEN {
                continue;
            }
            let (Some(&first), Some(&count), Some(&start)) =
                (c.first.get(len), c.count.get(len), c.start.get(len))
            else {
                // Longer than any code: only possible after 30 ones, i.e. inside EOS.
                return Err(HuffmanError::Eos);
            };
            let offset = code.wrapping_sub(first);
            if count == 0 || code < first || offset >= u32::from(count) {
                continue;
            }
            let index = usize::from(start).saturating_add(offset as usize);
            let Some(&sym) = c.sorted.get(index) else {
                return Err(HuffmanError::Eos);
            };
            if sym == EOS {
                return Err(HuffmanError::Eos);
            }
            if produced >= limit {
                return Err(HuffmanError::TooLong);
            }
            produced = produced.saturating_add(1);
            out.push(sym as u8);
            code = 0;
            len = 0;
        }
    }
    // At most 7 bits of padding, all ones (the most significant bits of EOS).
    if len > 7 || code != (1u32 << len).wrapping_sub(1) {
        return Err(HuffmanError::Padding);
    }
    Ok(())
}

/// The length in bytes of `input` once Huffman-coded.
pub fn encoded_len(input: &[u8]) -> usize {
    let bits: usize = input
        .iter()
        .map(|&b| {
            CODES
                .get(usize::from(b))
                .map_or(0, |&(_, l)| usize::from(l))
        })
        .sum();
    bits.div_ceil(8)
}

/// Appends the Huffman coding of `input` to `out`, padded with ones.
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in input {
        let Some(&(code, len)) = CODES.get(usize::from(b)) else {
            continue;
        };
        acc = (acc << len) | u64::from(code);
        bits = bits.saturating_add(u32::from(len));
        while bits >= 8 {
            bits = bits.saturating_sub(8);
            out.push((acc >> bits) as u8);
        }
        // Keep only the bits not yet written (at most 7), so `acc` never overflows.
        acc &= (1u64 << bits).wrapping_sub(1);
    }
    if bits > 0 {
        let pad = 8u32.saturating_sub(bits);
        out.push(((acc << pad) | ((1u64 << pad).wrapping_sub(1))) as u8);
    }
}

/// (code, bit length) of each symbol 0..=256 (256 is EOS), RFC 7541 Appendix B.
#[rustfmt::skip]
pub(super) const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table_is_canonical() {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODES[s].1, s));
        let mut code = 0u32;
        let mut prev = CODES[order[0]].1;
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (CODES[s].1 - prev);
                prev = CODES[s].1;
            }
            assert_eq!(code, CODES[s].0, "symbol {s}");
        }
        assert_eq!(CODES[256], (0x3fff_ffff, 30));
    }

    #[test]
    fn rfc_7541_c4_strings() {
        // RFC 7541 C.4.1: "www.example.com".
        let mut out = Vec::new();
        encode(b"www.example.com", &mut out);
        assert_eq!(
            out,
            [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff]
        );
        assert_eq!(encoded_len(b"www.example.com"), 12);
        let mut back = Vec::new();
        decode(&out, 100, &mut back).unwrap();
        assert_eq!(back, b"www.example.com");
        // C.4.2: "no-cache".
        let mut out = Vec::new();
        encode(b"no-cache", &mut out);
        assert_eq!(out, [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]);
    }

    #[test]
    fn refuses_bad_padding_eos_and_overlong() {
        let mut out = Vec::new();
        // 'a' is 00011 (5 bits); pad 000 is not all ones.
        assert_eq!(
            decode(&[0b0001_1000], 10, &mut out),
            Err(HuffmanError::Padding)
        );
        // A whole byte of ones as padding is more than 7 bits.
        out.clear();
        assert_eq!(
            decode(&[0b0001_1111, 0xff], 10, &mut out),
            Err(HuffmanError::Padding)
        );
        // EOS itself (30 ones) followed by padding.
        out.clear();
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], 10, &mut out),
            Err(HuffmanError::Eos)
        );
        // A limit below the decoded length.
        out.clear();
        let mut enc = Vec::new();
        encode(b"hello world", &mut enc);
        assert_eq!(decode(&enc, 5, &mut out), Err(HuffmanError::TooLong));
        assert!(out.len() <= 5);
    }

    proptest! {
        #[test]
        fn round_trip(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut enc = Vec::new();
            encode(&input, &mut enc);
            prop_assert_eq!(enc.len(), encoded_len(&input));
            let mut dec = Vec::new();
            decode(&enc, input.len(), &mut dec).unwrap();
            prop_assert_eq!(dec, input);
        }

        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut dec = Vec::new();
            let _ = decode(&input, 1000, &mut dec);
            prop_assert!(dec.len() <= 1000);
        }
    }
}
