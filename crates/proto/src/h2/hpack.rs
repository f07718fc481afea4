//! HPACK (RFC 7541) header compression for HTTP/2: owns the static table,
//! the dynamic table with its size accounting, the integer and string
//! literal codings, and the [`Decoder`] / [`Encoder`] pair of a connection.
//!
//! The [`Decoder`] never allocates beyond its limits: a literal string is
//! refused (and skipped) before it is copied when it exceeds what is left of
//! the header-list budget (counted as RFC 9113 §6.5.2 does: name + value + 32
//! bytes per field), and a block that would decode to more than the budget
//! — an "HPACK bomb", e.g. one large dynamic-table entry referenced hundreds
//! of times — stops producing fields at the limit and finishes in
//! [`DecodedBlock::oversized`] mode: the rest of the block is still walked
//! (each byte once) so the dynamic table stays in step with the peer's
//! encoder, but nothing more is copied out. A dynamic table size update above
//! the advertised `SETTINGS_HEADER_TABLE_SIZE`, or after the first field of a
//! block, is a [`HpackError`] (COMPRESSION_ERROR).
//!
//! The [`Encoder`] (for responses) uses the static table for whole fields and
//! names, inserts fields into its dynamic table (bounded by the peer's
//! `SETTINGS_HEADER_TABLE_SIZE`, at most [`DEFAULT_TABLE_SIZE`]) and
//! Huffman-codes a string when that is shorter.

use std::collections::VecDeque;

use super::huffman::{self, HuffmanError};

/// The dynamic table size both sides start with (RFC 9113 §6.5.2).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Per-entry overhead in table and header-list sizes (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;

/// Why a header block was refused; every one is a connection error of type
/// COMPRESSION_ERROR (the dynamic table may be out of step with the peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer does not fit in 32 bits.
    #[error("HPACK integer overflows")]
    IntegerOverflow,
    /// Index 0, or an index past the static and dynamic tables.
    #[error("HPACK index {0} is not in the table")]
    BadIndex(u32),
    /// A Huffman-coded string is malformed.
    #[error("bad Huffman string: {0}")]
    Huffman(HuffmanError),
    /// A dynamic table size update above the advertised maximum.
    #[error("table size update to {requested} above the maximum {max}")]
    TableSizeTooLarge {
        /// The size the peer asked for.
        requested: u32,
        /// The `SETTINGS_HEADER_TABLE_SIZE` we advertised.
        max: usize,
    },
    /// A dynamic table size update after a field of the same block.
    #[error("table size update after a header field")]
    LateTableSizeUpdate,
    /// The block did not start with the size update our smaller
    /// `SETTINGS_HEADER_TABLE_SIZE` requires (RFC 7541 §4.2).
    #[error("missing table size update")]
    MissingTableSizeUpdate,
}

impl From<HuffmanError> for HpackError {
    fn from(e: HuffmanError) -> Self {
        HpackError::Huffman(e)
    }
}

/// One decoded header field (name and value as sent, not validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField {
    /// The field name.
    pub name: Vec<u8>,
    /// The field value.
    pub value: Vec<u8>,
}

impl HeaderField {
    /// The size it counts for in a header list or table: name + value + 32.
    pub fn size(&self) -> usize {
        entry_size(&self.name, &self.value)
    }
}

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len()
        .saturating_add(value.len())
        .saturating_add(ENTRY_OVERHEAD)
}

/// What [`Decoder::decode`] produced from one header block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodedBlock {
    /// The fields, in order (all of them unless `oversized`).
    pub fields: Vec<HeaderField>,
    /// The size of the whole list (name + value + 32 per field), counted
    /// also past the limit (saturating).
    pub list_size: usize,
    /// The list exceeded the limit: `fields` holds only those that fit and the
    /// request must be refused (431); the connection's state is intact.
    pub oversized: bool,
}

/// The static table (RFC 7541 Appendix A), index 1 first.
#[rustfmt::skip]
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// A dynamic table: newest entry first, its size per RFC 7541 §4.1.
#[derive(Debug, Clone)]
struct Table {
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Table {
    fn new(max: usize) -> Self {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    fn set_max(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            let Some((n, v)) = self.entries.pop_back() else {
                self.size = 0;
                break;
            };
            self.size = self.size.saturating_sub(entry_size(&n, &v));
        }
    }

    /// Inserts (evicting as needed); an entry larger than the table empties it (§4.4).
    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max.saturating_sub(size));
        self.size = self.size.saturating_add(size);
        self.entries.push_front((name, value));
    }

    /// The entry at `index` of the combined address space (1-based, static first).
    fn get(&self, index: u32) -> Option<(&[u8], &[u8])> {
        let i = usize::try_from(index).ok()?.checked_sub(1)?;
        if let Some(&(n, v)) = STATIC.get(i) {
            return Some((n, v));
        }
        let (n, v) = self.entries.get(i.checked_sub(STATIC.len())?)?;
        Some((n.as_slice(), v.as_slice()))
    }
}

/// A cursor over a header block.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<u8, HpackError> {
        let b = self.peek().ok_or(HpackError::Truncated)?;
        self.pos = self.pos.saturating_add(1);
        Ok(b)
    }

    /// An integer with an N-bit prefix (RFC 7541 §5.1), at most `u32::MAX`.
    fn integer(&mut self, prefix_bits: u8) -> Result<u32, HpackError> {
        let mask = (1u16 << prefix_bits).wrapping_sub(1) as u8;
        let mut value = u64::from(self.next()? & mask);
        if value < u64::from(mask) {
            return Ok(value as u32);
        }
        let mut shift = 0u32;
        loop {
            let b = self.next()?;
            value = value.saturating_add(u64::from(b & 0x7f) << shift);
            if value > u64::from(u32::MAX) {
                return Err(HpackError::IntegerOverflow);
            }
            if b & 0x80 == 0 {
                return Ok(value as u32);
            }
            shift = shift.saturating_add(7);
            if shift > 28 {
                return Err(HpackError::IntegerOverflow);
            }
        }
    }

    /// A string literal (§5.2): its bytes if they decode to at most `limit`
    /// bytes, else `None` with the literal skipped.
    fn string(&mut self, limit: usize) -> Result<Option<Vec<u8>>, HpackError> {
        let huffman = self.peek().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = usize::try_from(self.integer(7)?).map_err(|_| HpackError::IntegerOverflow)?;
        let end = self.pos.checked_add(len).ok_or(HpackError::Truncated)?;
        let raw = self.buf.get(self.pos..end).ok_or(HpackError::Truncated)?;
        self.pos = end;
        if huffman {
            // Codes are at least 5 bits: never reserve more than the limit or 8/5 of the input.
            let mut out = Vec::with_capacity(limit.min(len.saturating_mul(8) / 5));
            match huffman::decode(raw, limit, &mut out) {
                Ok(()) => Ok(Some(out)),
                Err(HuffmanError::TooLong) => Ok(None),
                Err(e) => Err(e.into()),
            }
        } else if len > limit {
            Ok(None)
        } else {
            Ok(Some(raw.to_vec()))
        }
    }
}

/// The HPACK decoder of one connection (requests from the peer).
#[derive(Debug, Clone)]
pub struct Decoder {
    table: Table,
    /// The `SETTINGS_HEADER_TABLE_SIZE` in force (what a size update may ask for).
    max_allowed: usize,
    /// A smaller maximum took effect: the next block must start with a size update.
    update_required: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Decoder {
    /// A decoder whose dynamic table may grow to `max_table_size` bytes.
    pub fn new(max_table_size: usize) -> Self {
        Decoder {
            table: Table::new(max_table_size),
            max_allowed: max_table_size,
            update_required: false,
        }
    }

    /// A new `SETTINGS_HEADER_TABLE_SIZE` took effect (our SETTINGS were
    /// acknowledged). Lowering it below the table's current maximum requires
    /// the peer's next block to start with a size update.
    pub fn set_max_allowed(&mut self, max: usize) {
        if max < self.table.max {
            self.update_required = true;
        }
        self.max_allowed = max;
    }

    /// The dynamic table's current size in bytes (RFC 7541 §4.1).
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// The dynamic table's entries, newest first.
    pub fn table_entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.table
            .entries
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
    }

    /// Decodes one complete header block, producing fields up to
    /// `max_list_size` (name + value + 32 each); past it the block is only
    /// walked to keep the table in step and the result is `oversized`.
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
    ) -> Result<DecodedBlock, HpackError> {
        let mut cur = Cursor { buf: block, pos: 0 };
        let mut out = DecodedBlock::default();
        let mut seen_field = false;
        while let Some(first) = cur.peek() {
            if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                if seen_field {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let requested = cur.integer(5)?;
                let size = usize::try_from(requested).unwrap_or(usize::MAX);
                if size > self.max_allowed {
                    return Err(HpackError::TableSizeTooLarge {
                        requested,
                        max: self.max_allowed,
                    });
                }
                self.table.set_max(size);
                self.update_required = false;
                continue;
            }
            if self.update_required {
                return Err(HpackError::MissingTableSizeUpdate);
            }
            seen_field = true;
            let budget = if out.oversized {
                0
            } else {
                max_list_size.saturating_sub(out.list_size)
            };
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = cur.integer(7)?;
                let (n, v) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                let size = entry_size(n, v);
                if !out.oversized && size <= budget {
                    out.fields.push(HeaderField {
                        name: n.to_vec(),
                        value: v.to_vec(),
                    });
                } else {
                    out.oversized = true;
                }
                out.list_size = out.list_size.saturating_add(size);
                continue;
            }
            // Literal (§6.2): with incremental indexing (01), without (0000), never (0001).
            let (indexing, prefix) = if first & 0x40 != 0 {
                (true, 6)
            } else {
                (false, 4)
            };
            // An entry worth inserting fits the table, so it is decoded even past the budget.
            let limit = if indexing {
                budget.max(self.table.max)
            } else {
                budget
            };
            let index = cur.integer(prefix)?;
            let name = if index == 0 {
                cur.string(limit)?
            } else {
                let (n, _) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                (n.len() <= limit).then(|| n.to_vec())
            };
            let value = cur.string(limit)?;
            match (name, value) {
                (Some(name), Some(value)) => {
                    let size = entry_size(&name, &value);
                    out.list_size = out.list_size.saturating_add(size);
                    let emit = !out.oversized && size <= budget;
                    if !emit {
                        out.oversized = true;
                    }
                    match (emit, indexing) {
                        (true, true) => {
                            self.table.insert(name.clone(), value.clone());
                            out.fields.push(HeaderField { name, value });
                        }
                        (true, false) => out.fields.push(HeaderField { name, value }),
                        (false, true) => self.table.insert(name, value),
                        (false, false) => {}
                    }
                }
                _ => {
                    // Longer than both the budget and the table: not emitted, and
                    // inserting it would have emptied the table.
                    out.oversized = true;
                    out.list_size = out.list_size.saturating_add(limit).saturating_add(1);
                    if indexing {
                        self.table.evict_to(0);
                    }
                }
            }
        }
        if self.update_required {
            // An empty block still had to carry the update.
            return Err(HpackError::MissingTableSizeUpdate);
        }
        Ok(out)
    }
}

/// The HPACK encoder of one connection (responses to the peer).
#[derive(Debug, Clone)]
pub struct Encoder {
    table: Table,
    /// Size updates to announce at the start of the next block: the
    /// smallest since the last block, then the final one (§4.2).
    pending: Option<(usize, usize)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder with the default 4,096-byte table.
    pub fn new() -> Self {
        Encoder {
            table: Table::new(DEFAULT_TABLE_SIZE),
            pending: None,
        }
    }

    /// The peer's `SETTINGS_HEADER_TABLE_SIZE` changed: the table is set to it
    /// (capped at [`DEFAULT_TABLE_SIZE`]) and the change announced in the next block.
    pub fn set_peer_max_table_size(&mut self, peer_max: usize) {
        let size = peer_max.min(DEFAULT_TABLE_SIZE);
        if size == self.table.max && self.pending.is_none() {
            return;
        }
        let min = self.pending.map_or(size, |(min, _)| min.min(size));
        self.pending = Some((min, size));
        self.table.set_max(size);
    }

    /// Encodes one header block (a list of fields) into `out`.
    pub fn encode<'a>(
        &mut self,
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        out: &mut Vec<u8>,
    ) {
        if let Some((min, last)) = self.pending.take() {
            if min != last {
                write_integer(out, 0x20, 5, min);
            }
            write_integer(out, 0x20, 5, last);
        }
        for (name, value) in fields {
            self.encode_field(name, value, out);
        }
    }

    fn encode_field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let mut name_index = None;
        for (i, &(n, v)) in STATIC.iter().enumerate() {
            if n == name {
                if v == value {
                    write_integer(out, 0x80, 7, i.saturating_add(1));
                    return;
                }
                name_index.get_or_insert(i.saturating_add(1));
            }
        }
        for (i, (n, v)) in self.table.entries.iter().enumerate() {
            if n == name {
                let index = i.saturating_add(STATIC.len()).saturating_add(1);
                if v == value {
                    write_integer(out, 0x80, 7, index);
                    return;
                }
                name_index.get_or_insert(index);
            }
        }
        // Credentials never enter a table (RFC 7541 §7.1.3); everything else that fits does.
        let sensitive = name == b"set-cookie" || name == b"authorization";
        let indexing = !sensitive && entry_size(name, value) <= self.table.max;
        let (flag, prefix) = match (sensitive, indexing) {
            (true, _) => (0x10, 4),
            (false, true) => (0x40, 6),
            (false, false) => (0x00, 4),
        };
        match name_index {
            Some(i) => write_integer(out, flag, prefix, i),
            None => {
                write_integer(out, flag, prefix, 0);
                write_string(out, name);
            }
        }
        write_string(out, value);
        if indexing {
            self.table.insert(name.to_vec(), value.to_vec());
        }
    }
}

/// Appends an integer with an N-bit prefix, the flag bits above it (§5.1).
pub fn write_integer(out: &mut Vec<u8>, flags: u8, prefix_bits: u8, value: usize) {
    let max = usize::from((1u16 << prefix_bits).wrapping_sub(1) as u8);
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value.saturating_sub(max);
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Appends a string literal, Huffman-coded when that is shorter (§5.2).
pub fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    let coded = huffman::encoded_len(s);
    if coded < s.len() {
        write_integer(out, 0x80, 7, coded);
        huffman::encode(s, out);
    } else {
        write_integer(out, 0x00, 7, s.len());
        out.extend_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[HeaderField]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.table_entries()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn rfc_7541_c1_integers() {
        let mut out = Vec::new();
        write_integer(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        write_integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        let mut c = Cursor { buf: &out, pos: 0 };
        assert_eq!(c.integer(5), Ok(1337));
        // 2^32 does not fit.
        let big = [0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            Cursor { buf: &big, pos: 0 }.integer(5),
            Err(HpackError::IntegerOverflow)
        );
        // An endless continuation is refused after a few bytes.
        let endless = [0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80];
        assert_eq!(
            Cursor {
                buf: &endless,
                pos: 0
            }
            .integer(5),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(
            Cursor {
                buf: &[0x1f, 0x80],
                pos: 0
            }
            .integer(5),
            Err(HpackError::Truncated)
        );
    }

    #[test]
    fn rfc_7541_c2_representations() {
        let cases = [
            (
                "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
                ("custom-key", "custom-header"),
                vec![("custom-key", "custom-header")],
            ),
            (
                "040c 2f73 616d 706c 652f 7061 7468",
                (":path", "/sample/path"),
                vec![],
            ),
            (
                "1008 7061 7373 776f 7264 0673 6563 7265 74",
                ("password", "secret"),
                vec![],
            ),
            ("82", (":method", "GET"), vec![]),
        ];
        for (block, field, want_table) in cases {
            let mut d = Decoder::default();
            let got = d.decode(&hex(block), 1 << 16).unwrap();
            assert_eq!(pairs(&got.fields), owned(&[field]));
            assert_eq!(table(&d), owned(&want_table));
            assert!(!got.oversized);
        }
        let mut d = Decoder::default();
        d.decode(
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
            1 << 16,
        )
        .unwrap();
        assert_eq!(d.table_size(), 55);
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];

    fn chain(
        size: usize,
        blocks: &[&str],
        lists: &[&[(&str, &str)]],
        tables: &[&[(&str, &str)]],
        sizes: &[usize],
    ) {
        let mut d = Decoder::new(size);
        for i in 0..blocks.len() {
            let got = d.decode(&hex(blocks[i]), 1 << 16).unwrap();
            assert_eq!(pairs(&got.fields), owned(lists[i]), "block {i}");
            assert_eq!(table(&d), owned(tables[i]), "table {i}");
            assert_eq!(d.table_size(), sizes[i], "size {i}");
        }
    }

    const REQ_TABLES: [&[(&str, &str)]; 3] = [
        &[(":authority", "www.example.com")],
        &[
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
        &[
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
    ];

    #[test]
    fn rfc_7541_c3_requests_plain() {
        chain(
            4096,
            &[
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            &[REQ1, REQ2, REQ3],
            &REQ_TABLES,
            &[57, 110, 164],
        );
    }

    #[test]
    fn rfc_7541_c4_requests_huffman() {
        chain(
            4096,
            &[
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
            &[REQ1, REQ2, REQ3],
            &REQ_TABLES,
            &[57, 110, 164],
        );
    }

    const D1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const D2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const URL: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
    const RESP1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", D1),
        ("location", URL),
    ];
    const RESP2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", D1),
        ("location", URL),
    ];
    const RESP3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", D2),
        ("location", URL),
        ("content-encoding", "gzip"),
        ("set-cookie", COOKIE),
    ];
    const RESP_TABLES: [&[(&str, &str)]; 3] = [
        &[
            ("location", URL),
            ("date", D1),
            ("cache-control", "private"),
            (":status", "302"),
        ],
        &[
            (":status", "307"),
            ("location", URL),
            ("date", D1),
            ("cache-control", "private"),
        ],
        &[
            ("set-cookie", COOKIE),
            ("content-encoding", "gzip"),
            ("date", D2),
        ],
    ];

    #[test]
    fn rfc_7541_c5_responses_plain_with_eviction() {
        chain(
            256,
            &[
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "4803 3330 37c1 c0bf",
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
            ],
            &[RESP1, RESP2, RESP3],
            &RESP_TABLES,
            &[222, 222, 215],
        );
    }

    #[test]
    fn rfc_7541_c6_responses_huffman_with_eviction() {
        chain(
            256,
            &[
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                "4883 640e ffc1 c0bf",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ],
            &[RESP1, RESP2, RESP3],
            &RESP_TABLES,
            &[222, 222, 215],
        );
    }

    #[test]
    fn refuses_bad_blocks() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0x80], 1000), Err(HpackError::BadIndex(0)));
        assert_eq!(
            Decoder::default().decode(&[0xbe], 1000),
            Err(HpackError::BadIndex(62))
        );
        assert_eq!(
            Decoder::default().decode(&hex("400a6375"), 1000),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            Decoder::default().decode(&[0x41], 1000),
            Err(HpackError::Truncated)
        );
        // A size update above SETTINGS_HEADER_TABLE_SIZE (4096 -> 4097: 3f e2 1f).
        assert_eq!(
            Decoder::default().decode(&hex("3fe21f"), 1000),
            Err(HpackError::TableSizeTooLarge {
                requested: 4097,
                max: 4096
            })
        );
        // An update after a field.
        assert_eq!(
            Decoder::default().decode(&[0x82, 0x20], 1000),
            Err(HpackError::LateTableSizeUpdate)
        );
        // Two updates at the start are fine; the table empties.
        let mut d = Decoder::default();
        d.decode(
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
            1000,
        )
        .unwrap();
        assert_eq!(d.table_size(), 57);
        let got = d.decode(&[0x20, 0x3f, 0xe1, 0x1f, 0x82], 1000).unwrap();
        assert_eq!(pairs(&got.fields), owned(&[(":method", "GET")]));
        assert_eq!(d.table_size(), 0);
    }

    #[test]
    fn a_smaller_settings_value_requires_an_update() {
        let mut d = Decoder::default();
        d.set_max_allowed(100);
        assert_eq!(
            d.decode(&[0x82], 1000),
            Err(HpackError::MissingTableSizeUpdate)
        );
        let mut d = Decoder::default();
        d.set_max_allowed(100);
        assert_eq!(
            d.decode(&hex("3f e1 01"), 1000),
            Err(HpackError::TableSizeTooLarge {
                requested: 256,
                max: 100
            })
        );
        let mut d = Decoder::default();
        d.set_max_allowed(100);
        assert!(d.decode(&[0x3f, 0x45, 0x82], 1000).is_ok()); // update to 100, then :method GET
        assert!(d.decode(&[0x82], 1000).is_ok());
    }

    /// HPACK bomb: one 4 KB table entry referenced 4,000 times is a 4 KB block
    /// decoding to 16 MB; the decoder stops copying at the limit, and the
    /// connection's table stays in step (the next block decodes).
    #[test]
    fn hpack_bomb_stops_at_the_limit() {
        let mut block = vec![0x40, 0x01, b'x'];
        write_integer(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'a', 4000));
        block.extend(std::iter::repeat_n(0xbe, 4000)); // index 62: the new entry
        let mut d = Decoder::default();
        let limit = 16 * 1024;
        let got = d.decode(&block, limit).unwrap();
        assert!(got.oversized);
        let kept: usize = got.fields.iter().map(HeaderField::size).sum();
        assert!(kept <= limit, "kept {kept}");
        assert_eq!(got.fields.len(), 4); // 4 x 4033 fit in 16 KiB
        assert!(got.list_size > 4000 * 4000);
        // The entry is in the table, so the next block's reference to it works.
        let next = d.decode(&[0x82, 0xbe], limit).unwrap();
        assert_eq!(next.fields.len(), 2);
        assert!(!next.oversized);
    }

    /// A literal longer than both the budget and the table is skipped unread,
    /// and its incremental indexing empties the table as RFC 7541 §4.4 says.
    #[test]
    fn huge_literal_is_skipped_without_copying() {
        let mut block = vec![0x40, 0x01, b'x'];
        write_integer(&mut block, 0, 7, 60_000);
        block.extend(std::iter::repeat_n(b'a', 60_000));
        block.push(0x82);
        let mut d = Decoder::default();
        d.decode(
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
            1000,
        )
        .unwrap();
        let got = d.decode(&block, 16 * 1024).unwrap();
        assert!(got.oversized);
        assert!(got.fields.is_empty());
        assert_eq!(d.table_size(), 0);
    }

    #[test]
    fn encoder_round_trips_with_table_changes() {
        let mut e = Encoder::new();
        let mut d = Decoder::default();
        let lists: Vec<Vec<(&[u8], &[u8])>> = vec![
            vec![
                (b":status", b"200"),
                (b"content-type", b"text/html"),
                (b"content-length", b"1234"),
            ],
            vec![
                (b":status", b"200"),
                (b"content-type", b"text/html"),
                (b"set-cookie", b"a=b"),
            ],
            vec![(b":status", b"404"), (b"x-long", &[b'z'; 5000])],
        ];
        for (round, list) in lists.iter().enumerate() {
            if round == 2 {
                e.set_peer_max_table_size(0);
                e.set_peer_max_table_size(300);
            }
            let mut block = Vec::new();
            e.encode(list.iter().copied(), &mut block);
            let got = d.decode(&block, 1 << 20).unwrap();
            let want: Vec<HeaderField> = list
                .iter()
                .map(|(n, v)| HeaderField {
                    name: n.to_vec(),
                    value: v.to_vec(),
                })
                .collect();
            assert_eq!(got.fields, want, "round {round}");
        }
        // The second identical content-type was one byte (an index).
        let mut block = Vec::new();
        e.encode([(&b"x-long"[..], &b"q"[..])], &mut block);
        assert!(d.decode(&block, 1000).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(
            lists in proptest::collection::vec(
                proptest::collection::vec(
                    (proptest::sample::select(vec![":status", "content-type", "etag", "x-a", "date", "set-cookie", "vary"]),
                     proptest::collection::vec(any::<u8>(), 0..80)),
                    0..12),
                1..6),
            sizes in proptest::collection::vec(0usize..5000, 6),
        ) {
            let mut e = Encoder::new();
            let mut d = Decoder::default();
            for (i, list) in lists.iter().enumerate() {
                e.set_peer_max_table_size(sizes[i]);
                let mut block = Vec::new();
                e.encode(list.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())), &mut block);
                let got = d.decode(&block, 1 << 20).unwrap();
                prop_assert_eq!(got.fields.len(), list.len());
                for (f, (n, v)) in got.fields.iter().zip(list) {
                    prop_assert_eq!(&f.name, n.as_bytes());
                    prop_assert_eq!(&f.value, v);
                }
            }
        }

        #[test]
        fn arbitrary_blocks_stay_within_limits(block in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::default();
            if let Ok(got) = d.decode(&block, 2048) {
                let kept: usize = got.fields.iter().map(HeaderField::size).sum();
                prop_assert!(kept <= 2048);
            }
            prop_assert!(d.table_size() <= DEFAULT_TABLE_SIZE);
        }
    }
}
