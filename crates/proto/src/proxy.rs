//! PROXY protocol v1 and v2 (HAProxy's `proxy-protocol.txt`): owns parsing
//! the header a load balancer puts in front of a connection to pass on the
//! client's address.
//!
//! [`encode_proxy_v1`] and [`encode_proxy_v2`] write the header a proxy sends in front of
//! the connection it opens to an upstream (what HAProxy's `send-proxy` / `send-proxy-v2` do),
//! for a TCP client; [`parse_proxy_header`] reads them back.
//!
//! [`parse_proxy_header`] is pure: it answers `Ok(None)` while the bytes are
//! a valid prefix of a header, and otherwise the header and its length, or a
//! precise error. Its answer on a prefix never contradicts its answer on the
//! whole input, so bytes may arrive one at a time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::detect::PROXY_V2_SIGNATURE;

/// The v1 preamble.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED: usize = 16;

/// The largest header accepted: a v1 header is at most 107 bytes; a v2
/// header (16 bytes + addresses + TLVs) larger than this is refused, so a
/// peer cannot make the server buffer 64 KiB before the first real byte.
pub const MAX_PROXY_HEADER: usize = 4096;

/// What the PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// v2 LOCAL: the balancer's own connection (health check); use the real
    /// connection addresses.
    Local,
    /// v1 `UNKNOWN`, or v2 with an unspecified or UNIX family: no usable
    /// address; use the real connection addresses.
    Unknown,
    /// The client's address and the address it connected to.
    Proxied {
        /// The original client.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
}

/// Why bytes are not a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Neither the v1 preamble nor the v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// No CRLF within the 107 bytes a v1 header may take.
    #[error("PROXY v1 header without CRLF within {V1_MAX} bytes")]
    V1TooLong,
    /// A v1 line ending in a bare LF, or a CR elsewhere.
    #[error("PROXY v1 header line does not end with CRLF")]
    V1BadLineEnding,
    /// A v1 protocol other than TCP4, TCP6, UNKNOWN.
    #[error("PROXY v1 protocol {0:?} is not TCP4, TCP6 or UNKNOWN")]
    V1BadProtocol(String),
    /// Not exactly `src dst sport dport` separated by single spaces.
    #[error("PROXY v1 header is not 'PROXY <proto> <src> <dst> <sport> <dport>'")]
    V1Syntax,
    /// An address that is not a valid address of the declared family.
    #[error("PROXY v1 {field} address {value:?} is not a valid {family} address")]
    V1BadAddress {
        /// `source` or `destination`.
        field: &'static str,
        /// `TCP4` or `TCP6`.
        family: &'static str,
        /// The text received.
        value: String,
    },
    /// A port that is not a decimal 0..=65535 without sign or leading zero.
    #[error("PROXY v1 {field} port {value:?} is not a number 0..=65535")]
    V1BadPort {
        /// `source` or `destination`.
        field: &'static str,
        /// The text received.
        value: String,
    },
    /// A v2 version other than 2.
    #[error("PROXY v2 header with version {0} (only 2 exists)")]
    V2BadVersion(u8),
    /// A v2 command other than LOCAL (0) or PROXY (1).
    #[error("PROXY v2 command {0} is not LOCAL or PROXY")]
    V2BadCommand(u8),
    /// A v2 family/transport byte the spec does not define.
    #[error("PROXY v2 address family/transport byte {0:#04x} is not defined")]
    V2BadFamily(u8),
    /// A v2 header longer than [`MAX_PROXY_HEADER`].
    #[error("PROXY v2 header of {0} bytes is larger than {MAX_PROXY_HEADER}")]
    V2TooLong(usize),
    /// A v2 length too small for the family's address block.
    #[error("PROXY v2 length {len} is too small for the {family} address block ({needed} bytes)")]
    V2ShortAddress {
        /// `INET`, `INET6` or `UNIX`.
        family: &'static str,
        /// The length field.
        len: usize,
        /// The address block's size.
        needed: usize,
    },
    /// TLVs after the addresses that do not exactly fill the header.
    #[error("PROXY v2 TLV at offset {0} runs past the end of the header")]
    V2BadTlv(usize),
}

/// Parses a PROXY v1 or v2 header at the start of `buf`.
///
/// Returns `Ok(None)` while `buf` is a valid prefix of a header, or the
/// header and the number of bytes it took (the connection's data follows).
///
/// # Errors
///
/// The bytes are not a valid header; see [`ProxyError`].
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.starts_with(PROXY_V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    if PROXY_V2_SIGNATURE.starts_with(buf) || V1_PREFIX.starts_with(buf) {
        return Ok(None);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = buf.get(..V1_MAX).unwrap_or(buf);
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= V1_MAX {
            return Err(ProxyError::V1TooLong);
        }
        return Ok(None);
    };
    let Some((line, _)) = window.split_at_checked(lf) else {
        return Err(ProxyError::V1BadLineEnding);
    };
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(ProxyError::V1BadLineEnding);
    };
    if line.contains(&b'\r') {
        return Err(ProxyError::V1BadLineEnding);
    }
    // `lf` indexes `window` (at most V1_MAX bytes): no overflow.
    let consumed = lf.saturating_add(1);
    // The caller saw the prefix, and a line ends after it (it holds no CR or LF).
    let Some(rest) = line.strip_prefix(V1_PREFIX) else {
        return Err(ProxyError::V1Syntax);
    };
    // UNKNOWN: the receiver ignores whatever follows (spec §2.1).
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        return Ok(Some((ProxyHeader::Unknown, consumed)));
    }
    let fields: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
    let family = match fields.first().copied() {
        Some(b"TCP4") => "TCP4",
        Some(b"TCP6") => "TCP6",
        Some(other) => {
            return Err(ProxyError::V1BadProtocol(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
        None => return Err(ProxyError::V1Syntax),
    };
    let [_, src, dst, sport, dport] = fields.as_slice() else {
        return Err(ProxyError::V1Syntax);
    };
    let source_ip = v1_address(src, family, "source")?;
    let destination_ip = v1_address(dst, family, "destination")?;
    let source_port = v1_port(sport, "source")?;
    let destination_port = v1_port(dport, "destination")?;
    Ok(Some((
        ProxyHeader::Proxied {
            source: SocketAddr::new(source_ip, source_port),
            destination: SocketAddr::new(destination_ip, destination_port),
        },
        consumed,
    )))
}

fn v1_address(
    text: &[u8],
    family: &'static str,
    field: &'static str,
) -> Result<IpAddr, ProxyError> {
    let bad = || ProxyError::V1BadAddress {
        field,
        family,
        value: String::from_utf8_lossy(text).into_owned(),
    };
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    if family == "TCP4" {
        text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad())
    } else {
        text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad())
    }
}

fn v1_port(text: &[u8], field: &'static str) -> Result<u16, ProxyError> {
    let bad = || ProxyError::V1BadPort {
        field,
        value: String::from_utf8_lossy(text).into_owned(),
    };
    let digits_only = !text.is_empty() && text.len() <= 5 && text.iter().all(u8::is_ascii_digit);
    if !digits_only || (text.len() > 1 && text.first() == Some(&b'0')) {
        return Err(bad());
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|digits| digits.parse::<u16>().ok())
        .ok_or_else(bad)
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(&[version_command, family, len_hi, len_lo]) = buf.get(12..V2_FIXED) else {
        // Refuse a bad version or command as soon as its byte is in.
        if let Some(&version_command) = buf.get(12) {
            check_version_command(version_command)?;
        }
        if let Some(&family) = buf.get(13) {
            check_family(family)?;
        }
        return Ok(None);
    };
    let command = check_version_command(version_command)?;
    check_family(family)?;
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    // At most V2_FIXED + 65535.
    let total = V2_FIXED.saturating_add(len);
    if total > MAX_PROXY_HEADER {
        return Err(ProxyError::V2TooLong(total));
    }
    let Some(body) = buf.get(V2_FIXED..total) else {
        return Ok(None);
    };
    let (name, needed) = match family >> 4 {
        0x1 => ("INET", 12),
        0x2 => ("INET6", 36),
        0x3 => ("UNIX", 216),
        _ => ("UNSPEC", 0),
    };
    if command == Command::Local {
        // LOCAL: the receiver must ignore the address block (spec §2.2).
        return Ok(Some((ProxyHeader::Local, total)));
    }
    let short = || ProxyError::V2ShortAddress {
        family: name,
        len,
        needed,
    };
    // `body` is `len` bytes long, so this is `len < needed`.
    let Some(tlvs) = body.get(needed..) else {
        return Err(short());
    };
    check_tlvs(tlvs, V2_FIXED.saturating_add(needed))?;
    let header = match family >> 4 {
        0x1 => {
            let Some((&[s0, s1, s2, s3, d0, d1, d2, d3, sp0, sp1, dp0, dp1], _)) =
                body.split_first_chunk::<12>()
            else {
                return Err(short());
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(s0, s1, s2, s3)),
                    u16::from_be_bytes([sp0, sp1]),
                ),
                destination: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(d0, d1, d2, d3)),
                    u16::from_be_bytes([dp0, dp1]),
                ),
            }
        }
        0x2 => {
            let Some((source, rest)) = body.split_first_chunk::<16>() else {
                return Err(short());
            };
            let Some((destination, rest)) = rest.split_first_chunk::<16>() else {
                return Err(short());
            };
            let Some((&[sp0, sp1, dp0, dp1], _)) = rest.split_first_chunk::<4>() else {
                return Err(short());
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(*source)),
                    u16::from_be_bytes([sp0, sp1]),
                ),
                destination: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(*destination)),
                    u16::from_be_bytes([dp0, dp1]),
                ),
            }
        }
        _ => ProxyHeader::Unknown,
    };
    Ok(Some((header, total)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Local,
    Proxy,
}

fn check_version_command(byte: u8) -> Result<Command, ProxyError> {
    if byte >> 4 != 2 {
        return Err(ProxyError::V2BadVersion(byte >> 4));
    }
    match byte & 0x0f {
        0 => Ok(Command::Local),
        1 => Ok(Command::Proxy),
        other => Err(ProxyError::V2BadCommand(other)),
    }
}

/// The spec's defined family/transport bytes; others must be rejected.
fn check_family(byte: u8) -> Result<(), ProxyError> {
    match byte {
        0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32 => Ok(()),
        other => Err(ProxyError::V2BadFamily(other)),
    }
}

/// Walks the TLVs (type, 16-bit length, value) and checks they exactly
/// fill `tlvs`; their contents are not used. `offset` is for the error.
fn check_tlvs(mut tlvs: &[u8], mut offset: usize) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        let [_, hi, lo, rest @ ..] = tlvs else {
            return Err(ProxyError::V2BadTlv(offset));
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(next) = rest.get(len..) else {
            return Err(ProxyError::V2BadTlv(offset));
        };
        tlvs = next;
        // Bounded by the header's length (at most 65551).
        offset = offset.saturating_add(3).saturating_add(len);
    }
    Ok(())
}

/// The two addresses in one family: both IPv4 when both are (IPv4-mapped IPv6 counts as
/// IPv4), otherwise both IPv6 (an IPv4 one mapped).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let (source, destination) = (canonical(source), canonical(destination));
    let v6 = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (source, destination),
        _ => (v6(source), v6(destination)),
    }
}

/// Appends a PROXY v1 header (`PROXY TCP4 SRC DST SPORT DPORT\r\n`) for a TCP connection
/// from `source` to `destination` to `out`: TCP4 when both are IPv4 (IPv4-mapped IPv6
/// included), else TCP6.
pub fn encode_proxy_v1(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    use std::io::Write;
    let (source, destination) = same_family(source, destination);
    let family = match source.ip() {
        IpAddr::V4(_) => "TCP4",
        IpAddr::V6(_) => "TCP6",
    };
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    );
}

/// Appends a PROXY v2 header (command PROXY, TCP over IPv4 or IPv6, no TLVs) for a TCP
/// connection from `source` to `destination` to `out`; families as [`encode_proxy_v1`].
pub fn encode_proxy_v2(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    let (source, destination) = same_family(source, destination);
    out.extend_from_slice(PROXY_V2_SIGNATURE);
    // Version 2, command PROXY.
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_headers_parse_back_to_the_same_addresses() {
        let cases = [
            (
                "192.0.2.1:56324",
                "198.51.100.7:443",
                "192.0.2.1:56324",
                "198.51.100.7:443",
            ),
            (
                "[2001:db8::1]:1",
                "[2001:db8::2]:65535",
                "[2001:db8::1]:1",
                "[2001:db8::2]:65535",
            ),
            // IPv4-mapped on both sides: sent as IPv4.
            (
                "[::ffff:10.0.0.1]:9",
                "[::ffff:10.0.0.2]:80",
                "10.0.0.1:9",
                "10.0.0.2:80",
            ),
            // Mixed families: both as IPv6.
            (
                "10.0.0.1:9",
                "[2001:db8::2]:80",
                "[::ffff:10.0.0.1]:9",
                "[2001:db8::2]:80",
            ),
        ];
        for (source, destination, want_source, want_destination) in cases {
            let (source, destination) = (addr(source), addr(destination));
            let want = ProxyHeader::Proxied {
                source: addr(want_source),
                destination: addr(want_destination),
            };
            for encode in [encode_proxy_v1, encode_proxy_v2] {
                let mut out = b"already queued".to_vec();
                encode(source, destination, &mut out);
                let header = out.split_off(14);
                assert_eq!(out, b"already queued");
                let mut stream = header.clone();
                stream.extend_from_slice(b"payload");
                assert_eq!(check(&stream), Ok(Some((want, header.len()))), "{header:?}");
            }
        }
        let mut v1 = Vec::new();
        encode_proxy_v1(addr("192.0.2.1:56324"), addr("198.51.100.7:443"), &mut v1);
        assert_eq!(v1, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
        let mut v2 = Vec::new();
        encode_proxy_v2(addr("192.0.2.1:56324"), addr("198.51.100.7:443"), &mut v2);
        assert_eq!(v2.len(), 28);
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = PROXY_V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Feeds `input` one byte at a time, as a slow peer would send it.
    fn byte_at_a_time(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        for n in 0..=input.len() {
            match parse_proxy_header(&input[..n]) {
                Ok(None) => continue,
                other => return other,
            }
        }
        Ok(None)
    }

    fn check(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        let all = parse_proxy_header(input);
        assert_eq!(byte_at_a_time(input), all, "{input:?}");
        all
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let input = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            check(input),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: addr("192.0.2.1:56324"),
                    destination: addr("198.51.100.2:443")
                },
                input.len() - 5
            )))
        );
        let input = b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n";
        assert_eq!(
            check(input),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: addr("[2001:db8::1]:0"),
                    destination: addr("[::1]:65535")
                },
                input.len()
            )))
        );
        assert_eq!(
            check(b"PROXY UNKNOWN\r\n"),
            Ok(Some((ProxyHeader::Unknown, 15)))
        );
        assert_eq!(
            check(b"PROXY UNKNOWN ffff:: 1.2.3.4 1 2\r\nxyz"),
            Ok(Some((ProxyHeader::Unknown, 34)))
        );
    }

    #[test]
    fn v1_malformed_headers_are_refused() {
        use ProxyError::*;
        type Expect = fn(&ProxyError) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", |e| {
                *e == V1BadLineEnding
            }),
            (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", |e| {
                *e == V1BadLineEnding
            }),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", |e| {
                matches!(e, V1BadProtocol(_))
            }),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", |e| *e == V1Syntax),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", |e| *e == V1Syntax),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", |e| *e == V1Syntax),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", |e| {
                matches!(
                    e,
                    V1BadAddress {
                        field: "source",
                        ..
                    }
                )
            }),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", |e| {
                matches!(
                    e,
                    V1BadAddress {
                        field: "source",
                        ..
                    }
                )
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", |e| {
                matches!(
                    e,
                    V1BadAddress {
                        field: "destination",
                        ..
                    }
                )
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", |e| {
                matches!(
                    e,
                    V1BadPort {
                        field: "source",
                        ..
                    }
                )
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", |e| {
                matches!(e, V1BadPort { .. })
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", |e| {
                matches!(
                    e,
                    V1BadPort {
                        field: "destination",
                        ..
                    }
                )
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", |e| {
                matches!(e, V1BadPort { .. })
            }),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", |e| {
                matches!(e, V1BadPort { .. })
            }),
            (b"PROXZ TCP4", |e| *e == NotProxy),
            (b"GET / HTTP/1.1\r\n", |e| *e == NotProxy),
        ];
        for (input, expected) in cases {
            let result = check(input);
            match &result {
                Err(e) if expected(e) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn v1_without_crlf_within_107_bytes_is_refused() {
        let mut input = b"PROXY UNKNOWN ".to_vec();
        input.resize(106, b'a');
        assert_eq!(check(&input), Ok(None));
        input.push(b'a');
        assert_eq!(check(&input), Err(ProxyError::V1TooLong));
        // CRLF as bytes 106 and 107: the longest valid header.
        let mut input = b"PROXY UNKNOWN ".to_vec();
        input.resize(105, b'a');
        input.extend_from_slice(b"\r\n");
        assert_eq!(check(&input), Ok(Some((ProxyHeader::Unknown, 107))));
    }

    #[test]
    fn v2_inet_inet6_local_unspec_unix() {
        let mut inet = vec![192, 0, 2, 1, 198, 51, 100, 2];
        inet.extend_from_slice(&56324u16.to_be_bytes());
        inet.extend_from_slice(&443u16.to_be_bytes());
        let input = v2(1, 0x11, &inet);
        assert_eq!(
            check(&input),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: addr("192.0.2.1:56324"),
                    destination: addr("198.51.100.2:443")
                },
                28
            )))
        );
        let mut inet6 = Vec::new();
        inet6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        inet6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        inet6.extend_from_slice(&[0, 80, 1, 187]);
        // A TLV (PP2_TYPE_AUTHORITY "example") is skipped.
        inet6.extend_from_slice(&[0x02, 0, 7]);
        inet6.extend_from_slice(b"example");
        let mut input = v2(1, 0x22, &inet6);
        input.extend_from_slice(b"data after");
        assert_eq!(
            check(&input),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: addr("[2001:db8::1]:80"),
                    destination: addr("[::1]:443")
                },
                16 + 36 + 10
            )))
        );
        assert_eq!(check(&v2(0, 0x00, &[])), Ok(Some((ProxyHeader::Local, 16))));
        assert_eq!(
            check(&v2(0, 0x11, &inet)),
            Ok(Some((ProxyHeader::Local, 28)))
        );
        assert_eq!(
            check(&v2(1, 0x00, &[])),
            Ok(Some((ProxyHeader::Unknown, 16)))
        );
        assert_eq!(
            check(&v2(1, 0x31, &[0; 216])),
            Ok(Some((ProxyHeader::Unknown, 232)))
        );
    }

    #[test]
    fn v2_malformed_headers_are_refused() {
        use ProxyError::*;
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert_eq!(check(&bad_version), Err(V2BadVersion(1)));
        assert_eq!(check(&v2(2, 0x11, &[0; 12])), Err(V2BadCommand(2)));
        assert_eq!(check(&v2(1, 0x13, &[0; 12])), Err(V2BadFamily(0x13)));
        assert_eq!(check(&v2(1, 0x41, &[0; 12])), Err(V2BadFamily(0x41)));
        assert_eq!(check(&v2(1, 0x10, &[0; 12])), Err(V2BadFamily(0x10)));
        assert_eq!(
            check(&v2(1, 0x11, &[0; 11])),
            Err(V2ShortAddress {
                family: "INET",
                len: 11,
                needed: 12
            })
        );
        assert_eq!(
            check(&v2(1, 0x21, &[0; 12])),
            Err(V2ShortAddress {
                family: "INET6",
                len: 12,
                needed: 36
            })
        );
        assert_eq!(
            check(&v2(1, 0x31, &[0; 100])),
            Err(V2ShortAddress {
                family: "UNIX",
                len: 100,
                needed: 216
            })
        );
        // A TLV claiming 5 bytes with only 2 left.
        let mut body = vec![0; 12];
        body.extend_from_slice(&[0x04, 0, 5, 1, 2]);
        assert_eq!(check(&v2(1, 0x11, &body)), Err(V2BadTlv(28)));
        // A length over the cap is refused before waiting for the bytes.
        let mut huge = PROXY_V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(check(&huge), Err(V2TooLong(16 + 0xffff)));
    }

    #[test]
    fn prefixes_need_more() {
        assert_eq!(parse_proxy_header(b""), Ok(None));
        assert_eq!(parse_proxy_header(b"PROX"), Ok(None));
        assert_eq!(parse_proxy_header(b"PROXY TCP4 1.2"), Ok(None));
        assert_eq!(parse_proxy_header(&PROXY_V2_SIGNATURE[..5]), Ok(None));
        assert_eq!(parse_proxy_header(&v2(1, 0x11, &[0; 12])[..20]), Ok(None));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_prefixes_agree(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            start in 0usize..3,
        ) {
            let mut input = match start {
                0 => Vec::new(),
                1 => V1_PREFIX.to_vec(),
                _ => PROXY_V2_SIGNATURE.to_vec(),
            };
            input.extend_from_slice(&bytes);
            let all = parse_proxy_header(&input);
            proptest::prop_assert_eq!(byte_at_a_time(&input), all.clone());
            if let Ok(Some((_, consumed))) = all {
                proptest::prop_assert!(consumed <= input.len() && consumed <= MAX_PROXY_HEADER);
            }
        }

        #[test]
        fn generated_v1_headers_round_trip(
            a in proptest::num::u32::ANY, b in proptest::num::u32::ANY,
            p in proptest::num::u16::ANY, q in proptest::num::u16::ANY,
        ) {
            let (a, b) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let line = format!("PROXY TCP4 {a} {b} {p} {q}\r\n");
            let expected = ProxyHeader::Proxied {
                source: SocketAddr::new(a.into(), p),
                destination: SocketAddr::new(b.into(), q),
            };
            proptest::prop_assert_eq!(check(line.as_bytes()), Ok(Some((expected, line.len()))));
        }
    }
}
