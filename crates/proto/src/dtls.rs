//! DTLS 1.0/1.2 record and ClientHello pre-parser (RFC 6347 §4.1, §4.2.2, §4.3.2): owns the
//! decision, made on the bytes alone and before any OpenSSL object sees a datagram, whether
//! the datagram is worth handing to the TLS library.
//!
//! Nothing here decrypts or keeps state; every function is pure, takes the whole datagram,
//! never panics and never reads past it. The API (stable; the fuzz target drives it):
//!
//! - [`parse_record`]: the first record of a datagram and the bytes after it.
//! - [`records`]: an iterator over the records of a datagram; it yields `Err` once (the
//!   first malformed record) and then stops.
//! - [`check_records`]: whether a datagram is a non-empty, well-formed sequence of records
//!   (what an established session accepts; the rest is dropped and counted).
//! - [`parse_client_hello`]: whether a datagram is a plausible initial ClientHello, checked
//!   as strictly as OpenSSL's `DTLSv1_listen` (3.x) does (epoch 0, one `client_hello`
//!   message, or its first fragment, filling its record, message sequence 0–1, session id and
//!   cookie within the fragment); it returns the fields a listener needs.
//!
//! Every error has a short [`label`](DtlsError::label) for metrics and logs.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

/// Bytes of a DTLS record header: type, version, epoch, sequence number, length.
pub const RECORD_HEADER_LEN: usize = 13;
/// Bytes of a DTLS handshake message header: type, length, message_seq, fragment offset and
/// fragment length.
pub const HANDSHAKE_HEADER_LEN: usize = 12;
/// The longest record payload DTLS 1.2 allows (`2^14 + 2048`, TLSCiphertext).
pub const MAX_RECORD_PAYLOAD: usize = 16384 + 2048;
/// The handshake message type of a ClientHello.
pub const CLIENT_HELLO: u8 = 1;
/// The highest message sequence number an initial ClientHello may carry (OpenSSL's bound:
/// 0 for the first, 1 after a HelloVerifyRequest).
pub const MAX_CLIENT_HELLO_SEQ: u16 = 1;

/// A record's content type (only the four DTLS 1.2 defines without extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// 20.
    ChangeCipherSpec,
    /// 21.
    Alert,
    /// 22.
    Handshake,
    /// 23.
    ApplicationData,
}

impl ContentType {
    /// The content type of wire value `value`, if DTLS 1.2 defines it.
    pub fn from_u8(value: u8) -> Option<ContentType> {
        match value {
            20 => Some(ContentType::ChangeCipherSpec),
            21 => Some(ContentType::Alert),
            22 => Some(ContentType::Handshake),
            23 => Some(ContentType::ApplicationData),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            ContentType::ChangeCipherSpec => 20,
            ContentType::Alert => 21,
            ContentType::Handshake => 22,
            ContentType::ApplicationData => 23,
        }
    }
}

/// A record-layer protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DtlsVersion {
    /// DTLS 1.0, `{254, 255}` (also the record version of many initial ClientHellos).
    Dtls10,
    /// DTLS 1.2, `{254, 253}`.
    Dtls12,
}

impl DtlsVersion {
    /// The version of wire value `value`, if it is DTLS 1.0 or 1.2.
    pub fn from_u16(value: u16) -> Option<DtlsVersion> {
        match value {
            0xfeff => Some(DtlsVersion::Dtls10),
            0xfefd => Some(DtlsVersion::Dtls12),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        match self {
            DtlsVersion::Dtls10 => 0xfeff,
            DtlsVersion::Dtls12 => 0xfefd,
        }
    }
}

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record carries.
    pub content_type: ContentType,
    /// The record-layer version.
    pub version: DtlsVersion,
    /// The epoch (0 until the first ChangeCipherSpec).
    pub epoch: u16,
    /// The 48-bit sequence number within the epoch.
    pub sequence: u64,
    /// The payload length (at most [`MAX_RECORD_PAYLOAD`], within the datagram).
    pub length: u16,
}

/// One record of a datagram: its header and its payload (ciphertext after epoch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The header.
    pub header: RecordHeader,
    /// The `header.length` bytes after the header.
    pub payload: &'a [u8],
}

/// A parsed initial ClientHello (what a listener needs before any TLS state exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The record header it arrived in.
    pub record: RecordHeader,
    /// The handshake `message_seq` (0 first, 1 after a HelloVerifyRequest).
    pub message_seq: u16,
    /// `client_version` as sent (DTLS versions count down: 0xfefd is 1.2).
    pub client_version: u16,
    /// The 32-byte client random.
    pub random: &'a [u8],
    /// The legacy session id (0–32 bytes).
    pub session_id: &'a [u8],
    /// The cookie (empty on a first ClientHello; 0–255 bytes).
    pub cookie: &'a [u8],
}

/// Why a datagram is not what the caller wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DtlsError {
    /// No byte at all.
    #[error("empty datagram")]
    Empty,
    /// Fewer than the 13 bytes of a record header remain.
    #[error("record header truncated: {available} of 13 bytes")]
    ShortHeader {
        /// Bytes there were.
        available: usize,
    },
    /// A content type DTLS 1.2 does not define here.
    #[error("unknown record content type {0}")]
    ContentType(u8),
    /// A record version other than DTLS 1.0 or 1.2.
    #[error("record version {0:#06x} is not DTLS 1.0 or 1.2")]
    Version(u16),
    /// The record claims more payload than DTLS allows.
    #[error("record length {0} exceeds the DTLS maximum")]
    RecordTooLong(u16),
    /// The record claims more payload than the datagram holds.
    #[error("record length {declared} but only {available} bytes follow the header")]
    RecordTruncated {
        /// The length field.
        declared: u16,
        /// Bytes after the header.
        available: usize,
    },
    /// The first record is not a handshake record.
    #[error("not a handshake record")]
    NotHandshake,
    /// A ClientHello record with an epoch other than 0.
    #[error("initial ClientHello in epoch {0}")]
    Epoch(u16),
    /// The record is too short for a handshake message header.
    #[error("handshake header truncated")]
    ShortHandshake,
    /// A handshake message other than ClientHello.
    #[error("handshake message type {0} is not ClientHello")]
    NotClientHello(u8),
    /// The fragment does not fill the record exactly.
    #[error("handshake fragment length does not match its record")]
    FragmentLength,
    /// A ClientHello fragment other than the first, or one longer than its message (a
    /// listener keeps no state to reassemble).
    #[error("ClientHello fragment is not the first one")]
    Fragmented,
    /// `message_seq` beyond [`MAX_CLIENT_HELLO_SEQ`].
    #[error("ClientHello message_seq {0} is too high")]
    MessageSeq(u16),
    /// The (first fragment of the) body ends before client_version, random, session id or
    /// cookie.
    #[error("ClientHello body truncated")]
    ShortHello,
    /// A session id longer than 32 bytes.
    #[error("ClientHello session id of {0} bytes")]
    SessionIdTooLong(u8),
}

impl DtlsError {
    /// A short, stable label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            DtlsError::Empty => "empty",
            DtlsError::ShortHeader { .. } => "short_header",
            DtlsError::ContentType(_) => "content_type",
            DtlsError::Version(_) => "version",
            DtlsError::RecordTooLong(_) => "record_too_long",
            DtlsError::RecordTruncated { .. } => "record_truncated",
            DtlsError::NotHandshake => "not_handshake",
            DtlsError::Epoch(_) => "epoch",
            DtlsError::ShortHandshake => "short_handshake",
            DtlsError::NotClientHello(_) => "not_client_hello",
            DtlsError::FragmentLength => "fragment_length",
            DtlsError::Fragmented => "fragmented",
            DtlsError::MessageSeq(_) => "message_seq",
            DtlsError::ShortHello => "short_hello",
            DtlsError::SessionIdTooLong(_) => "session_id",
        }
    }

    /// Whether the datagram is not even a sequence of DTLS records (rather than records
    /// that are not a ClientHello).
    pub fn is_malformed_record(self) -> bool {
        matches!(
            self,
            DtlsError::Empty
                | DtlsError::ShortHeader { .. }
                | DtlsError::ContentType(_)
                | DtlsError::Version(_)
                | DtlsError::RecordTooLong(_)
                | DtlsError::RecordTruncated { .. }
        )
    }
}

/// A cursor over bytes that never indexes out of bounds.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)
            .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    fn u24(&mut self) -> Option<u32> {
        self.array::<3>()
            .map(|[a, b, c]| u32::from_be_bytes([0, a, b, c]))
    }

    fn u48(&mut self) -> Option<u64> {
        self.array::<6>()
            .map(|[a, b, c, d, e, f]| u64::from_be_bytes([0, 0, a, b, c, d, e, f]))
    }

    /// A `<0..255>` vector: one length byte, then that many bytes.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }
}

/// Parses the record at the start of `datagram`; returns it and the bytes after it.
pub fn parse_record(datagram: &[u8]) -> Result<(Record<'_>, &[u8]), DtlsError> {
    if datagram.is_empty() {
        return Err(DtlsError::Empty);
    }
    let mut reader = Reader::new(datagram);
    let short = DtlsError::ShortHeader {
        available: datagram.len(),
    };
    let header = reader.array::<RECORD_HEADER_LEN>().ok_or(short)?;
    let mut fields = Reader::new(&header);
    let (Some(kind), Some(version), Some(epoch), Some(sequence), Some(length)) = (
        fields.u8(),
        fields.u16(),
        fields.u16(),
        fields.u48(),
        fields.u16(),
    ) else {
        return Err(short);
    };
    let content_type = ContentType::from_u8(kind).ok_or(DtlsError::ContentType(kind))?;
    let version = DtlsVersion::from_u16(version).ok_or(DtlsError::Version(version))?;
    if usize::from(length) > MAX_RECORD_PAYLOAD {
        return Err(DtlsError::RecordTooLong(length));
    }
    let available = reader.rest.len();
    let payload = reader
        .take(usize::from(length))
        .ok_or(DtlsError::RecordTruncated {
            declared: length,
            available,
        })?;
    let record = Record {
        header: RecordHeader {
            content_type,
            version,
            epoch,
            sequence,
            length,
        },
        payload,
    };
    Ok((record, reader.rest))
}

/// The records of a datagram, in order (see [`records`]).
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, DtlsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match parse_record(self.rest) {
            Ok((record, rest)) => {
                self.rest = rest;
                Some(Ok(record))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

/// Iterates the records of `datagram`; the first malformed record yields `Err` and ends the
/// iteration. An empty datagram yields nothing.
pub fn records(datagram: &[u8]) -> Records<'_> {
    Records {
        rest: datagram,
        failed: false,
    }
}

/// Checks that `datagram` is one or more well-formed records with nothing after the last;
/// returns how many.
pub fn check_records(datagram: &[u8]) -> Result<usize, DtlsError> {
    if datagram.is_empty() {
        return Err(DtlsError::Empty);
    }
    let mut count = 0usize;
    for record in records(datagram) {
        record?;
        count = count.saturating_add(1);
    }
    Ok(count)
}

/// Checks that `datagram` starts with a plausible initial ClientHello and returns its fields.
/// Records after the first are ignored (as `DTLSv1_listen` does), but must not be malformed
/// either: a datagram that fails [`check_records`] is refused.
pub fn parse_client_hello(datagram: &[u8]) -> Result<ClientHello<'_>, DtlsError> {
    let (record, rest) = parse_record(datagram)?;
    check_tail(rest)?;
    let header = record.header;
    if header.content_type != ContentType::Handshake {
        return Err(DtlsError::NotHandshake);
    }
    if header.epoch != 0 {
        return Err(DtlsError::Epoch(header.epoch));
    }
    let mut message = Reader::new(record.payload);
    let (Some(msg_type), Some(length), Some(message_seq), Some(offset), Some(fragment)) = (
        message.u8(),
        message.u24(),
        message.u16(),
        message.u24(),
        message.u24(),
    ) else {
        return Err(DtlsError::ShortHandshake);
    };
    if msg_type != CLIENT_HELLO {
        return Err(DtlsError::NotClientHello(msg_type));
    }
    let Ok(fragment_len) = usize::try_from(fragment) else {
        return Err(DtlsError::FragmentLength);
    };
    if fragment_len != message.rest.len() {
        return Err(DtlsError::FragmentLength);
    }
    if offset != 0 || fragment > length {
        return Err(DtlsError::Fragmented);
    }
    if message_seq > MAX_CLIENT_HELLO_SEQ {
        return Err(DtlsError::MessageSeq(message_seq));
    }
    let mut body = Reader::new(message.rest);
    let client_version = body.u16().ok_or(DtlsError::ShortHello)?;
    let random = body.take(32).ok_or(DtlsError::ShortHello)?;
    let session_id = body.vec8().ok_or(DtlsError::ShortHello)?;
    if session_id.len() > 32 {
        return Err(DtlsError::SessionIdTooLong(
            u8::try_from(session_id.len()).unwrap_or(u8::MAX),
        ));
    }
    let cookie = body.vec8().ok_or(DtlsError::ShortHello)?;
    Ok(ClientHello {
        record: header,
        message_seq,
        client_version,
        random,
        session_id,
        cookie,
    })
}

fn check_tail(rest: &[u8]) -> Result<(), DtlsError> {
    match rest.is_empty() {
        true => Ok(()),
        false => check_records(rest).map(|_| ()),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record with the given fields around `payload`.
    fn record(kind: u8, version: u16, epoch: u16, sequence: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&sequence.to_be_bytes()[2..]);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A ClientHello handshake message (unfragmented) with `seq`, `session` and `cookie`.
    fn hello_message(seq: u16, session: &[u8], cookie: &[u8]) -> Vec<u8> {
        let mut body = 0xfefdu16.to_be_bytes().to_vec();
        body.extend_from_slice(&[7; 32]);
        body.push(session.len() as u8);
        body.extend_from_slice(session);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        // cipher_suites, compression_methods: not examined, but present as a client sends.
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
        let len = (body.len() as u32).to_be_bytes();
        let mut message = vec![CLIENT_HELLO, len[1], len[2], len[3]];
        message.extend_from_slice(&seq.to_be_bytes());
        message.extend_from_slice(&[0, 0, 0, len[1], len[2], len[3]]);
        message.extend_from_slice(&body);
        message
    }

    fn hello(seq: u16, cookie: &[u8]) -> Vec<u8> {
        record(22, 0xfeff, 0, 0, &hello_message(seq, &[], cookie))
    }

    #[test]
    fn a_client_hello_parses_with_its_cookie() {
        let datagram = hello(1, b"cookie-bytes");
        let parsed = parse_client_hello(&datagram).unwrap();
        assert_eq!(parsed.message_seq, 1);
        assert_eq!(parsed.client_version, 0xfefd);
        assert_eq!(parsed.cookie, b"cookie-bytes");
        assert_eq!(parsed.random, &[7; 32]);
        assert_eq!(parsed.record.version, DtlsVersion::Dtls10);
        assert_eq!(check_records(&datagram), Ok(1));
    }

    #[test]
    fn garbage_is_refused_with_a_precise_reason() {
        assert_eq!(parse_client_hello(b""), Err(DtlsError::Empty));
        assert_eq!(
            parse_client_hello(b"x"),
            Err(DtlsError::ShortHeader { available: 1 })
        );
        let mut long = hello(0, b"");
        long.truncate(long.len() - 1);
        assert!(matches!(
            parse_client_hello(&long),
            Err(DtlsError::RecordTruncated { .. })
        ));
        let app = record(23, 0xfefd, 1, 5, b"ciphertext");
        assert_eq!(parse_client_hello(&app), Err(DtlsError::NotHandshake));
        assert_eq!(check_records(&app), Ok(1));
        let epoch = record(22, 0xfefd, 1, 0, &hello_message(0, &[], &[]));
        assert_eq!(parse_client_hello(&epoch), Err(DtlsError::Epoch(1)));
        let tls = record(22, 0x0303, 0, 0, &hello_message(0, &[], &[]));
        assert_eq!(parse_client_hello(&tls), Err(DtlsError::Version(0x0303)));
        let seq = hello(2, b"");
        assert_eq!(parse_client_hello(&seq), Err(DtlsError::MessageSeq(2)));
        let mut message = hello_message(0, &[], &[]);
        message[0] = 2;
        let server_hello = record(22, 0xfefd, 0, 0, &message);
        assert_eq!(
            parse_client_hello(&server_hello),
            Err(DtlsError::NotClientHello(2))
        );
        let mut message = hello_message(0, &[], &[]);
        message[8] = 1; // fragment_offset 256: not the first fragment
        let fragment = record(22, 0xfefd, 0, 0, &message);
        assert_eq!(parse_client_hello(&fragment), Err(DtlsError::Fragmented));
        let mut message = hello_message(0, &[], b"c");
        message[3] -= 1; // message length below the fragment's
        let fragment = record(22, 0xfefd, 0, 0, &message);
        assert_eq!(parse_client_hello(&fragment), Err(DtlsError::Fragmented));
        let mut message = hello_message(0, &[], b"cookie");
        message[3] += 100; // a first fragment of a longer message, cookie inside: accepted
        let first = record(22, 0xfefd, 0, 0, &message);
        assert_eq!(parse_client_hello(&first).unwrap().cookie, b"cookie");
        let mut message = hello_message(0, &[], &[]);
        message.push(0); // a byte after the fragment, inside the record
        let padded = record(22, 0xfefd, 0, 0, &message);
        assert_eq!(parse_client_hello(&padded), Err(DtlsError::FragmentLength));
        let mut big = record(23, 0xfefd, 1, 0, &[]);
        big[11..13].copy_from_slice(&(MAX_RECORD_PAYLOAD as u16 + 1).to_be_bytes());
        assert!(matches!(
            parse_record(&big),
            Err(DtlsError::RecordTooLong(_))
        ));
        let session = record(22, 0xfefd, 0, 0, &hello_message(0, &[1; 33], &[]));
        assert_eq!(
            parse_client_hello(&session),
            Err(DtlsError::SessionIdTooLong(33))
        );
    }

    #[test]
    fn records_iterate_and_stop_at_the_first_malformed_one() {
        let mut datagram = record(20, 0xfefd, 0, 3, &[1]);
        datagram.extend(record(22, 0xfefd, 1, 0, b"finished"));
        assert_eq!(check_records(&datagram), Ok(2));
        datagram.extend_from_slice(&[23, 0xfe]);
        let all: Vec<_> = records(&datagram).collect();
        assert_eq!(all.len(), 3);
        assert!(all[2].is_err());
        assert_eq!(
            check_records(&datagram),
            Err(DtlsError::ShortHeader { available: 2 })
        );
        let mut hello_and_junk = hello(0, b"");
        hello_and_junk.push(0);
        assert!(
            parse_client_hello(&hello_and_junk).is_err(),
            "a malformed trailing record spoils the datagram"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_record(&bytes);
            let _ = check_records(&bytes);
            let _ = parse_client_hello(&bytes);
            prop_assert!(records(&bytes).count() <= bytes.len() / RECORD_HEADER_LEN + 1);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(
            kind in 19u8..26,
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![kind, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes.extend_from_slice(&tail);
            let _ = check_records(&bytes);
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn a_built_record_parses_back(
            kind in prop_oneof![Just(20u8), Just(21u8), Just(22u8), Just(23u8)],
            dtls12 in any::<bool>(),
            epoch in any::<u16>(),
            sequence in 0u64..(1 << 48),
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
            cut in any::<prop::sample::Index>(),
        ) {
            let version = if dtls12 { 0xfefd } else { 0xfeff };
            let bytes = record(kind, version, epoch, sequence, &payload);
            let (parsed, rest) = parse_record(&bytes).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(parsed.header.content_type.as_u8(), kind);
            prop_assert_eq!(parsed.header.version.as_u16(), version);
            prop_assert_eq!(parsed.header.epoch, epoch);
            prop_assert_eq!(parsed.header.sequence, sequence);
            prop_assert_eq!(parsed.payload, &payload[..]);
            prop_assert_eq!(check_records(&bytes), Ok(1));
            // Every strict prefix is refused.
            let prefix = &bytes[..cut.index(bytes.len())];
            prop_assert!(check_records(prefix).is_err());
        }

        #[test]
        fn a_built_client_hello_parses_back(
            seq in 0u16..=MAX_CLIENT_HELLO_SEQ,
            session in proptest::collection::vec(any::<u8>(), 0..=32),
            cookie in proptest::collection::vec(any::<u8>(), 0..=255),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = record(22, 0xfefd, 0, 1, &hello_message(seq, &session, &cookie));
            let parsed = parse_client_hello(&bytes).unwrap();
            prop_assert_eq!(parsed.message_seq, seq);
            prop_assert_eq!(parsed.session_id, &session[..]);
            prop_assert_eq!(parsed.cookie, &cookie[..]);
            let prefix = &bytes[..cut.index(bytes.len())];
            prop_assert!(parse_client_hello(prefix).is_err());
        }
    }
}
