//! HTTP/2 framing (RFC 9113 §4, §6): owns the 9-byte frame header, the
//! parsing of every frame type from a byte slice into a borrowed [`Frame`],
//! the typed [`FrameError`] carrying the HTTP/2 [`ErrorCode`] the peer must
//! get (and whether it ends the connection or one stream), and the encoders
//! for every frame a server sends.
//!
//! [`parse`] never copies: a complete frame borrows its payload from the
//! input; an incomplete one is `Ok(None)` (need more bytes). A frame longer
//! than our `SETTINGS_MAX_FRAME_SIZE` is refused from its header alone, so a
//! caller holds at most 9 + max_frame_size bytes of a frame. Unknown frame
//! types parse as [`Frame::Unknown`] for the caller to ignore (§4.1).

/// The connection preface a client sends first (§3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Length of the frame header.
pub const HEADER_LEN: usize = 9;

/// The smallest (and initial) SETTINGS_MAX_FRAME_SIZE.
pub const MIN_MAX_FRAME_SIZE: u32 = 16_384;

/// The largest SETTINGS_MAX_FRAME_SIZE (2^24 - 1).
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame type codes (§6).
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// PRIORITY.
    pub const PRIORITY: u8 = 0x2;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PUSH_PROMISE.
    pub const PUSH_PROMISE: u8 = 0x5;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (§6).
pub mod flag {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, PUSH_PROMISE, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
    /// PADDED (DATA, HEADERS, PUSH_PROMISE).
    pub const PADDED: u8 = 0x8;
    /// PRIORITY (HEADERS).
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS parameter identifiers (§6.5.2).
pub mod setting {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    /// SETTINGS_ENABLE_PUSH.
    pub const ENABLE_PUSH: u16 = 0x2;
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// SETTINGS_MAX_FRAME_SIZE.
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441).
    pub const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
}

/// An HTTP/2 error code (§7); unknown codes are kept as they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Graceful shutdown or no error.
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    /// A protocol rule was broken.
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(0x1);
    /// An internal error.
    pub const INTERNAL_ERROR: ErrorCode = ErrorCode(0x2);
    /// Flow control was violated.
    pub const FLOW_CONTROL_ERROR: ErrorCode = ErrorCode(0x3);
    /// SETTINGS were not acknowledged in time.
    pub const SETTINGS_TIMEOUT: ErrorCode = ErrorCode(0x4);
    /// A frame arrived on a half-closed or closed stream.
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(0x5);
    /// A frame had an invalid size.
    pub const FRAME_SIZE_ERROR: ErrorCode = ErrorCode(0x6);
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(0x7);
    /// The stream is no longer needed.
    pub const CANCEL: ErrorCode = ErrorCode(0x8);
    /// The HPACK context cannot be maintained.
    pub const COMPRESSION_ERROR: ErrorCode = ErrorCode(0x9);
    /// A CONNECT tunnel failed.
    pub const CONNECT_ERROR: ErrorCode = ErrorCode(0xa);
    /// The peer is generating excessive load.
    pub const ENHANCE_YOUR_CALM: ErrorCode = ErrorCode(0xb);
    /// The transport's security is inadequate.
    pub const INADEQUATE_SECURITY: ErrorCode = ErrorCode(0xc);
    /// HTTP/1.1 is required.
    pub const HTTP_1_1_REQUIRED: ErrorCode = ErrorCode(0xd);

    /// The code's RFC 9113 name, or `"UNKNOWN"`.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:x})", self.name(), self.0)
    }
}

/// What was wrong with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameErrorKind {
    /// Longer than our SETTINGS_MAX_FRAME_SIZE.
    #[error("frame of {len} bytes exceeds the maximum frame size {max}")]
    TooLarge {
        /// The frame's length field.
        len: u32,
        /// Our SETTINGS_MAX_FRAME_SIZE.
        max: u32,
    },
    /// A fixed-size frame (PRIORITY, RST_STREAM, PING, WINDOW_UPDATE,
    /// SETTINGS' multiple of 6, GOAWAY's 8) with the wrong length.
    #[error("{kind} frame has invalid length {len}")]
    BadLength {
        /// The frame's type name.
        kind: &'static str,
        /// The frame's length field.
        len: u32,
    },
    /// The padding length is not smaller than the payload.
    #[error("padding exceeds the payload")]
    BadPadding,
    /// A frame that needs a stream came on stream 0, or one that must be on stream 0 did not.
    #[error("{kind} frame on the wrong stream {stream}")]
    WrongStream {
        /// The frame's type name.
        kind: &'static str,
        /// The stream it named.
        stream: u32,
    },
    /// A SETTINGS ACK with a payload.
    #[error("SETTINGS ACK with a payload")]
    AckWithPayload,
    /// A WINDOW_UPDATE with an increment of 0.
    #[error("WINDOW_UPDATE with increment 0")]
    ZeroIncrement,
    /// A stream depending on itself (§5.3.1).
    #[error("stream {0} depends on itself")]
    SelfDependency(u32),
}

/// A frame the peer must be told about: the error code, and the stream it
/// concerns when it is a stream error (the connection carries on after
/// resetting that stream and skipping `len` bytes) rather than a connection
/// error (`stream` is `None`: GOAWAY and close).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {code}")]
pub struct FrameError {
    /// The HTTP/2 error code to send.
    pub code: ErrorCode,
    /// What was wrong.
    pub kind: FrameErrorKind,
    /// The stream to reset for a stream error; `None` for a connection error.
    pub stream: Option<u32>,
    /// The whole frame's length (header included), to skip it after a stream error.
    pub len: usize,
}

/// A frame header (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The payload length.
    pub length: u32,
    /// The frame type.
    pub kind: u8,
    /// The flags.
    pub flags: u8,
    /// The stream identifier (the reserved bit cleared).
    pub stream: u32,
}

impl FrameHeader {
    /// Parses the first 9 bytes of `buf`, or `None` if there are fewer.
    pub fn parse(buf: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            length: u32::from_be_bytes([0, h[0], h[1], h[2]]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_WINDOW,
        })
    }

    /// Appends the 9-byte encoding.
    pub fn write(&self, out: &mut Vec<u8>) {
        let l = self.length.to_be_bytes();
        out.extend_from_slice(&[l[1], l[2], l[3], self.kind, self.flags]);
        out.extend_from_slice(&(self.stream & MAX_WINDOW).to_be_bytes());
    }
}

/// A stream's priority fields (§6.3; deprecated by RFC 9113, parsed and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    /// The exclusive flag.
    pub exclusive: bool,
    /// The stream depended on.
    pub dependency: u32,
    /// The weight minus one.
    pub weight: u8,
}

/// The parameters of a SETTINGS frame, 6 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsParams<'a>(&'a [u8]);

impl<'a> SettingsParams<'a> {
    /// Each (identifier, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32)> + 'a {
        self.0.chunks_exact(6).map(|c| {
            let id = u16::from_be_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ]);
            let mut v = [0u8; 4];
            v.copy_from_slice(c.get(2..6).unwrap_or(&[0; 4]));
            (id, u32::from_be_bytes(v))
        })
    }

    /// How many parameters there are.
    pub fn len(&self) -> usize {
        self.0.len() / 6
    }

    /// No parameters.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One parsed frame, borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame<'a> {
    /// DATA (§6.1): `data` without padding; `flow_len` is the whole payload,
    /// padding included, which is what flow control counts.
    Data {
        /// The stream.
        stream: u32,
        /// END_STREAM was set.
        end_stream: bool,
        /// The data.
        data: &'a [u8],
        /// The payload length counted by flow control.
        flow_len: u32,
    },
    /// HEADERS (§6.2), padding and priority fields removed.
    Headers {
        /// The stream.
        stream: u32,
        /// END_STREAM was set.
        end_stream: bool,
        /// END_HEADERS was set (else CONTINUATION frames follow).
        end_headers: bool,
        /// The priority fields, when the PRIORITY flag was set.
        priority: Option<Priority>,
        /// The header block fragment.
        fragment: &'a [u8],
    },
    /// PRIORITY (§6.3).
    Priority {
        /// The stream.
        stream: u32,
        /// The priority fields.
        priority: Priority,
    },
    /// RST_STREAM (§6.4).
    RstStream {
        /// The stream.
        stream: u32,
        /// The error code.
        code: ErrorCode,
    },
    /// SETTINGS (§6.5).
    Settings {
        /// This acknowledges our SETTINGS.
        ack: bool,
        /// The parameters (none for an ACK).
        params: SettingsParams<'a>,
    },
    /// PUSH_PROMISE (§6.6); a server refuses one (PROTOCOL_ERROR).
    PushPromise {
        /// The stream.
        stream: u32,
        /// The promised stream.
        promised: u32,
    },
    /// PING (§6.7).
    Ping {
        /// This answers our PING.
        ack: bool,
        /// The opaque data.
        data: [u8; 8],
    },
    /// GOAWAY (§6.8).
    GoAway {
        /// The last stream the sender may have processed.
        last_stream: u32,
        /// The error code.
        code: ErrorCode,
        /// Opaque debug data.
        debug: &'a [u8],
    },
    /// WINDOW_UPDATE (§6.9); the increment is never 0 (that is an error).
    WindowUpdate {
        /// The stream, or 0 for the connection.
        stream: u32,
        /// The increment, 1..=2^31-1.
        increment: u32,
    },
    /// CONTINUATION (§6.10).
    Continuation {
        /// The stream.
        stream: u32,
        /// END_HEADERS was set.
        end_headers: bool,
        /// The header block fragment.
        fragment: &'a [u8],
    },
    /// A frame type this implementation does not know (ignored, §4.1).
    Unknown {
        /// The type code.
        kind: u8,
        /// The stream.
        stream: u32,
    },
}

fn name_of(kind: u8) -> &'static str {
    match kind {
        kind::DATA => "DATA",
        kind::HEADERS => "HEADERS",
        kind::PRIORITY => "PRIORITY",
        kind::RST_STREAM => "RST_STREAM",
        kind::SETTINGS => "SETTINGS",
        kind::PUSH_PROMISE => "PUSH_PROMISE",
        kind::PING => "PING",
        kind::GOAWAY => "GOAWAY",
        kind::WINDOW_UPDATE => "WINDOW_UPDATE",
        kind::CONTINUATION => "CONTINUATION",
        _ => "UNKNOWN",
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(..4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

/// Strips padding (§6.1): the payload after the pad-length byte, without the padding.
fn unpad(payload: &[u8], flags: u8) -> Option<&[u8]> {
    if flags & flag::PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len()
        .checked_sub(usize::from(pad))
        .and_then(|end| rest.get(..end))
}

fn parse_priority(b: &[u8]) -> Priority {
    let dep = be32(b);
    Priority {
        exclusive: dep & 0x8000_0000 != 0,
        dependency: dep & MAX_WINDOW,
        weight: b.get(4).copied().unwrap_or(0),
    }
}

/// Parses one frame from the start of `buf`: `Ok(None)` if it is not all
/// there yet, else the frame and the bytes it took. `max_frame_size` is our
/// SETTINGS_MAX_FRAME_SIZE.
pub fn parse(buf: &[u8], max_frame_size: u32) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(h) = FrameHeader::parse(buf) else {
        return Ok(None);
    };
    let total = HEADER_LEN.saturating_add(h.length as usize);
    let conn = |kind: FrameErrorKind, code: ErrorCode| FrameError {
        code,
        kind,
        stream: None,
        len: total,
    };
    let on_stream = |kind: FrameErrorKind, code: ErrorCode| FrameError {
        code,
        kind,
        stream: Some(h.stream),
        len: total,
    };
    if h.length > max_frame_size {
        return Err(conn(
            FrameErrorKind::TooLarge {
                len: h.length,
                max: max_frame_size,
            },
            ErrorCode::FRAME_SIZE_ERROR,
        ));
    }
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let name = name_of(h.kind);
    let len = h.length;
    let bad_len = || {
        conn(
            FrameErrorKind::BadLength { kind: name, len },
            ErrorCode::FRAME_SIZE_ERROR,
        )
    };
    let needs_stream = matches!(
        h.kind,
        kind::DATA
            | kind::HEADERS
            | kind::PRIORITY
            | kind::RST_STREAM
            | kind::PUSH_PROMISE
            | kind::CONTINUATION
    );
    let needs_zero = matches!(h.kind, kind::SETTINGS | kind::PING | kind::GOAWAY);
    if (needs_stream && h.stream == 0) || (needs_zero && h.stream != 0) {
        return Err(conn(
            FrameErrorKind::WrongStream {
                kind: name,
                stream: h.stream,
            },
            ErrorCode::PROTOCOL_ERROR,
        ));
    }
    let bad_padding = || conn(FrameErrorKind::BadPadding, ErrorCode::PROTOCOL_ERROR);
    let frame = match h.kind {
        kind::DATA => Frame::Data {
            stream: h.stream,
            end_stream: h.flags & flag::END_STREAM != 0,
            data: unpad(payload, h.flags).ok_or_else(bad_padding)?,
            flow_len: h.length,
        },
        kind::HEADERS => {
            let mut block = unpad(payload, h.flags).ok_or_else(bad_padding)?;
            let mut priority = None;
            if h.flags & flag::PRIORITY != 0 {
                let (fields, rest) = block.split_at_checked(5).ok_or_else(bad_len)?;
                let p = parse_priority(fields);
                if p.dependency == h.stream {
                    return Err(on_stream(
                        FrameErrorKind::SelfDependency(h.stream),
                        ErrorCode::PROTOCOL_ERROR,
                    ));
                }
                priority = Some(p);
                block = rest;
            }
            Frame::Headers {
                stream: h.stream,
                end_stream: h.flags & flag::END_STREAM != 0,
                end_headers: h.flags & flag::END_HEADERS != 0,
                priority,
                fragment: block,
            }
        }
        kind::PRIORITY => {
            if payload.len() != 5 {
                // A stream error (§6.3): the connection carries on.
                return Err(on_stream(
                    FrameErrorKind::BadLength { kind: name, len },
                    ErrorCode::FRAME_SIZE_ERROR,
                ));
            }
            let priority = parse_priority(payload);
            if priority.dependency == h.stream {
                return Err(on_stream(
                    FrameErrorKind::SelfDependency(h.stream),
                    ErrorCode::PROTOCOL_ERROR,
                ));
            }
            Frame::Priority {
                stream: h.stream,
                priority,
            }
        }
        kind::RST_STREAM => {
            if payload.len() != 4 {
                return Err(bad_len());
            }
            Frame::RstStream {
                stream: h.stream,
                code: ErrorCode(be32(payload)),
            }
        }
        kind::SETTINGS => {
            let ack = h.flags & flag::ACK != 0;
            if ack && !payload.is_empty() {
                return Err(conn(
                    FrameErrorKind::AckWithPayload,
                    ErrorCode::FRAME_SIZE_ERROR,
                ));
            }
            if payload.len() % 6 != 0 {
                return Err(bad_len());
            }
            Frame::Settings {
                ack,
                params: SettingsParams(payload),
            }
        }
        kind::PUSH_PROMISE => {
            let block = unpad(payload, h.flags).ok_or_else(bad_padding)?;
            if block.len() < 4 {
                return Err(bad_len());
            }
            Frame::PushPromise {
                stream: h.stream,
                promised: be32(block) & MAX_WINDOW,
            }
        }
        kind::PING => {
            let data: [u8; 8] = payload.try_into().map_err(|_| bad_len())?;
            Frame::Ping {
                ack: h.flags & flag::ACK != 0,
                data,
            }
        }
        kind::GOAWAY => {
            let (fixed, debug) = payload.split_at_checked(8).ok_or_else(bad_len)?;
            Frame::GoAway {
                last_stream: be32(fixed) & MAX_WINDOW,
                code: ErrorCode(be32(fixed.get(4..).unwrap_or(&[]))),
                debug,
            }
        }
        kind::WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(bad_len());
            }
            let increment = be32(payload) & MAX_WINDOW;
            if increment == 0 {
                let e = FrameError {
                    code: ErrorCode::PROTOCOL_ERROR,
                    kind: FrameErrorKind::ZeroIncrement,
                    stream: (h.stream != 0).then_some(h.stream),
                    len: total,
                };
                return Err(e);
            }
            Frame::WindowUpdate {
                stream: h.stream,
                increment,
            }
        }
        kind::CONTINUATION => Frame::Continuation {
            stream: h.stream,
            end_headers: h.flags & flag::END_HEADERS != 0,
            fragment: payload,
        },
        other => Frame::Unknown {
            kind: other,
            stream: h.stream,
        },
    };
    Ok(Some((frame, total)))
}

/// Appends one frame: header then payload (the payload must fit in 24 bits).
pub fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    FrameHeader {
        length: u32::try_from(payload.len()).unwrap_or(MAX_MAX_FRAME_SIZE),
        kind,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(payload);
}

/// Appends a DATA frame header for `len` bytes the caller appends next.
pub fn write_data_header(out: &mut Vec<u8>, stream: u32, len: u32, end_stream: bool) {
    FrameHeader {
        length: len,
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(out);
}

/// Appends a DATA frame.
pub fn write_data(out: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    write_frame(out, kind::DATA, flags, stream, data);
}

/// Appends a header block as HEADERS plus as many CONTINUATION frames as
/// `max_frame_size` (the peer's SETTINGS_MAX_FRAME_SIZE) requires.
pub fn write_headers(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = (max_frame_size as usize).max(1);
    let mut chunks = block.chunks(max);
    let first = chunks.next().unwrap_or(&[]);
    let mut rest = chunks.peekable();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if rest.peek().is_none() {
        flags |= flag::END_HEADERS;
    }
    write_frame(out, kind::HEADERS, flags, stream, first);
    while let Some(chunk) = rest.next() {
        let flags = if rest.peek().is_none() {
            flag::END_HEADERS
        } else {
            0
        };
        write_frame(out, kind::CONTINUATION, flags, stream, chunk);
    }
}

/// Appends a RST_STREAM frame.
pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, code: ErrorCode) {
    write_frame(out, kind::RST_STREAM, 0, stream, &code.0.to_be_bytes());
}

/// Appends a SETTINGS frame with these parameters.
pub fn write_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    let mut payload = Vec::with_capacity(params.len().saturating_mul(6));
    for &(id, value) in params {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    write_frame(out, kind::SETTINGS, 0, 0, &payload);
}

/// Appends a SETTINGS ACK.
pub fn write_settings_ack(out: &mut Vec<u8>) {
    write_frame(out, kind::SETTINGS, flag::ACK, 0, &[]);
}

/// Appends a PING (or, with `ack`, its answer).
pub fn write_ping(out: &mut Vec<u8>, data: [u8; 8], ack: bool) {
    write_frame(out, kind::PING, if ack { flag::ACK } else { 0 }, 0, &data);
}

/// Appends a GOAWAY frame.
pub fn write_goaway(out: &mut Vec<u8>, last_stream: u32, code: ErrorCode, debug: &[u8]) {
    let mut payload = Vec::with_capacity(debug.len().saturating_add(8));
    payload.extend_from_slice(&(last_stream & MAX_WINDOW).to_be_bytes());
    payload.extend_from_slice(&code.0.to_be_bytes());
    payload.extend_from_slice(debug);
    write_frame(out, kind::GOAWAY, 0, 0, &payload);
}

/// Appends a WINDOW_UPDATE frame (stream 0 for the connection).
pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    write_frame(
        out,
        kind::WINDOW_UPDATE,
        0,
        stream,
        &(increment & MAX_WINDOW).to_be_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(buf: &[u8]) -> Frame<'_> {
        let (f, n) = parse(buf, MIN_MAX_FRAME_SIZE).unwrap().unwrap();
        assert_eq!(n, buf.len());
        f
    }

    fn err(buf: &[u8]) -> FrameError {
        parse(buf, MIN_MAX_FRAME_SIZE).unwrap_err()
    }

    #[test]
    fn every_frame_a_server_sends_round_trips() {
        let mut out = Vec::new();
        write_data(&mut out, 1, b"hello", true);
        assert_eq!(
            one(&out),
            Frame::Data {
                stream: 1,
                end_stream: true,
                data: b"hello",
                flow_len: 5
            }
        );
        out.clear();
        write_headers(&mut out, 3, b"\x88", false, MIN_MAX_FRAME_SIZE);
        assert_eq!(
            one(&out),
            Frame::Headers {
                stream: 3,
                end_stream: false,
                end_headers: true,
                priority: None,
                fragment: b"\x88"
            }
        );
        out.clear();
        write_rst_stream(&mut out, 5, ErrorCode::CANCEL);
        assert_eq!(
            one(&out),
            Frame::RstStream {
                stream: 5,
                code: ErrorCode::CANCEL
            }
        );
        out.clear();
        write_settings(
            &mut out,
            &[
                (setting::MAX_CONCURRENT_STREAMS, 128),
                (setting::INITIAL_WINDOW_SIZE, 1 << 20),
            ],
        );
        let Frame::Settings { ack: false, params } = one(&out) else {
            panic!()
        };
        assert_eq!(params.iter().collect::<Vec<_>>(), [(3, 128), (4, 1 << 20)]);
        out.clear();
        write_settings_ack(&mut out);
        assert!(matches!(one(&out), Frame::Settings { ack: true, params } if params.is_empty()));
        out.clear();
        write_ping(&mut out, *b"12345678", true);
        assert_eq!(
            one(&out),
            Frame::Ping {
                ack: true,
                data: *b"12345678"
            }
        );
        out.clear();
        write_goaway(&mut out, 7, ErrorCode::ENHANCE_YOUR_CALM, b"calm");
        assert_eq!(
            one(&out),
            Frame::GoAway {
                last_stream: 7,
                code: ErrorCode::ENHANCE_YOUR_CALM,
                debug: b"calm"
            }
        );
        out.clear();
        write_window_update(&mut out, 0, MAX_WINDOW);
        assert_eq!(
            one(&out),
            Frame::WindowUpdate {
                stream: 0,
                increment: MAX_WINDOW
            }
        );
    }

    #[test]
    fn a_big_header_block_is_split_into_continuations() {
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        write_headers(&mut out, 1, &block, true, MIN_MAX_FRAME_SIZE);
        let mut rest = &out[..];
        let mut joined = Vec::new();
        let mut frames = Vec::new();
        while let Some((f, n)) = parse(rest, MIN_MAX_FRAME_SIZE).unwrap() {
            match f {
                Frame::Headers {
                    fragment,
                    end_headers,
                    end_stream,
                    ..
                } => {
                    assert!(end_stream);
                    frames.push(("H", end_headers));
                    joined.extend_from_slice(fragment);
                }
                Frame::Continuation {
                    fragment,
                    end_headers,
                    ..
                } => {
                    frames.push(("C", end_headers));
                    joined.extend_from_slice(fragment);
                }
                other => panic!("{other:?}"),
            }
            rest = &rest[n..];
        }
        assert_eq!(frames, [("H", false), ("C", false), ("C", true)]);
        assert_eq!(joined, block);
    }

    #[test]
    fn headers_with_padding_and_priority() {
        // PADDED | PRIORITY | END_HEADERS, pad 3, dependency 0 weight 15, block "\x82", padding.
        let payload = [3, 0x80, 0, 0, 0, 15, 0x82, 0, 0, 0];
        let mut out = Vec::new();
        write_frame(
            &mut out,
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
            1,
            &payload,
        );
        assert_eq!(
            one(&out),
            Frame::Headers {
                stream: 1,
                end_stream: false,
                end_headers: true,
                priority: Some(Priority {
                    exclusive: true,
                    dependency: 0,
                    weight: 15
                }),
                fragment: b"\x82"
            }
        );
        // Padding as long as the payload.
        out.clear();
        write_frame(&mut out, kind::HEADERS, flag::PADDED, 1, &[5, 1, 2, 3, 4]);
        assert_eq!(err(&out).kind, FrameErrorKind::BadPadding);
        // Depending on itself is a stream error.
        out.clear();
        write_frame(
            &mut out,
            kind::HEADERS,
            flag::PRIORITY,
            1,
            &[0, 0, 0, 1, 0, 0x82],
        );
        let e = err(&out);
        assert_eq!((e.code, e.stream), (ErrorCode::PROTOCOL_ERROR, Some(1)));
        // Padded DATA: flow control counts the whole payload.
        out.clear();
        write_frame(
            &mut out,
            kind::DATA,
            flag::PADDED,
            1,
            &[2, b'a', b'b', 0, 0],
        );
        assert_eq!(
            one(&out),
            Frame::Data {
                stream: 1,
                end_stream: false,
                data: b"ab",
                flow_len: 5
            }
        );
    }

    #[test]
    fn errors_carry_their_codes() {
        let mut out = Vec::new();
        // Too large: refused from the header alone.
        FrameHeader {
            length: 16_385,
            kind: kind::DATA,
            flags: 0,
            stream: 1,
        }
        .write(&mut out);
        let e = err(&out);
        assert_eq!((e.code, e.stream), (ErrorCode::FRAME_SIZE_ERROR, None));
        // Need more.
        out.clear();
        write_data(&mut out, 1, b"abc", false);
        assert_eq!(parse(&out[..11], MIN_MAX_FRAME_SIZE), Ok(None));
        assert_eq!(parse(&out[..5], MIN_MAX_FRAME_SIZE), Ok(None));
        // DATA on stream 0; SETTINGS on stream 1.
        out.clear();
        write_data(&mut out, 0, b"", false);
        assert_eq!(err(&out).code, ErrorCode::PROTOCOL_ERROR);
        out.clear();
        write_frame(&mut out, kind::SETTINGS, 0, 1, &[]);
        assert_eq!(err(&out).code, ErrorCode::PROTOCOL_ERROR);
        // Bad lengths.
        for (k, len) in [
            (kind::RST_STREAM, 3),
            (kind::PING, 7),
            (kind::WINDOW_UPDATE, 5),
            (kind::SETTINGS, 5),
            (kind::GOAWAY, 7),
        ] {
            out.clear();
            write_frame(
                &mut out,
                k,
                0,
                if matches!(k, kind::PING | kind::SETTINGS | kind::GOAWAY) {
                    0
                } else {
                    1
                },
                &vec![0; len],
            );
            let e = err(&out);
            assert_eq!(
                (e.code, e.stream),
                (ErrorCode::FRAME_SIZE_ERROR, None),
                "{k}"
            );
        }
        // PRIORITY with a bad length is a stream error.
        out.clear();
        write_frame(&mut out, kind::PRIORITY, 0, 3, &[0; 4]);
        let e = err(&out);
        assert_eq!(
            (e.code, e.stream, e.len),
            (ErrorCode::FRAME_SIZE_ERROR, Some(3), 13)
        );
        // SETTINGS ACK with payload.
        out.clear();
        write_frame(&mut out, kind::SETTINGS, flag::ACK, 0, &[0; 6]);
        assert_eq!(err(&out).code, ErrorCode::FRAME_SIZE_ERROR);
        // WINDOW_UPDATE 0: stream error on a stream, connection error on 0.
        out.clear();
        write_window_update(&mut out, 1, 0);
        assert_eq!(err(&out).stream, Some(1));
        out.clear();
        write_window_update(&mut out, 0, 0);
        assert_eq!(err(&out).stream, None);
        // Unknown types parse and are ignored.
        out.clear();
        write_frame(&mut out, 0xfa, 0xff, 9, b"whatever");
        assert_eq!(
            one(&out),
            Frame::Unknown {
                kind: 0xfa,
                stream: 9
            }
        );
        // The reserved bit of a stream id is ignored.
        out.clear();
        write_frame(&mut out, kind::RST_STREAM, 0, 0, &[0, 0, 0, 8]);
        out[5] = 0x80;
        out[8] = 1;
        assert_eq!(
            one(&out),
            Frame::RstStream {
                stream: 1,
                code: ErrorCode::CANCEL
            }
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            match parse(&buf, MIN_MAX_FRAME_SIZE) {
                Ok(Some((_, n))) => prop_assert!(n <= buf.len() && n >= HEADER_LEN),
                Ok(None) => {}
                Err(e) => prop_assert!(e.len >= HEADER_LEN),
            }
        }

        #[test]
        fn header_round_trips(length in 0u32..(1 << 24), kind: u8, flags: u8, stream in 0u32..=MAX_WINDOW) {
            let h = FrameHeader { length, kind, flags, stream };
            let mut out = Vec::new();
            h.write(&mut out);
            prop_assert_eq!(FrameHeader::parse(&out), Some(h));
        }
    }
}
