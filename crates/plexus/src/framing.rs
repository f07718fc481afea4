//! Framing: turning a session's byte stream into whole messages, and messages back into bytes.
//!
//! A [`Framer`] is a sans-IO decoder: it looks at the bytes received so far (a [`BytesMut`]),
//! takes one whole frame off the front when there is one, and says "need more bytes" otherwise.
//! It never reads a socket, never blocks and keeps what it has to remember between calls, so it
//! works on any split of the stream — down to one byte at a time. Every framer has a limit
//! ([`Framer::max_buffered`]): a peer cannot make it hold more than that many bytes waiting
//! for a frame to complete. [`FrameEncoder`] is the other direction.
//!
//! Ready framers, modelled on Netty's `LineBasedFrameDecoder`, `DelimiterBasedFrameDecoder`
//! and `LengthFieldBasedFrameDecoder` and tokio-util's `LinesCodec` and `LengthDelimitedCodec`:
//! [`Lines`], [`Delimited`] and [`LengthPrefixed`].
//!
//! [`Framed`] puts a framer under a [`FrameHandler`], so the handler receives whole frames
//! instead of arbitrary chunks of bytes: it is itself a [`SessionHandler`]. A frame that passes
//! the framer's limit closes the session with [`CloseReason::FrameTooLarge`] (counted in
//! `sessions_closed_total{reason="frame_too_large"}`); bytes the framer cannot parse close it
//! with [`CloseReason::Requested`]. Either way the handler sees the [`FrameError`] first and
//! may answer it, and a log line says why.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use tracing::info;

use crate::service::{CloseReason, LinkEvent, Session, SessionHandler, SessionInfo};

/// Why bytes could not be framed. After any of these the stream cannot be resynchronised: the
/// session should be closed (which [`Framed`] does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame is (or declares itself) longer than the framer's limit.
    #[error("frame too long: {seen} bytes, the limit is {limit}")]
    TooLong {
        /// The framer's limit, in bytes.
        limit: usize,
        /// How long the frame is, as far as known: bytes buffered without finding its end, or
        /// the length its header declares.
        seen: u64,
    },
    /// A byte that the protocol does not allow at this place.
    #[error("expected {expected}, got {}", ByteText(*found))]
    Unexpected {
        /// What the protocol wants here (for example `"'$'"`).
        expected: &'static str,
        /// The byte that came instead.
        found: u8,
    },
    /// A field whose value is not valid, such as a length that is not a number.
    #[error("invalid {what}")]
    Invalid {
        /// The field (for example `"bulk length"`).
        what: &'static str,
    },
    /// A length field whose value plus the framer's length adjustment is negative.
    #[error("length field {field} plus the adjustment {adjustment} is negative")]
    NegativeLength {
        /// The length field's value.
        field: u64,
        /// The framer's length adjustment.
        adjustment: i64,
    },
}

/// Shows a byte as a character when it is printable, as `\xNN` otherwise.
struct ByteText(u8);

impl fmt::Display for ByteText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() || self.0 == b' ' {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "'\\x{:02x}'", self.0)
        }
    }
}

/// A sans-IO frame decoder.
///
/// `decode` is called with everything received and not yet framed; it removes one whole frame
/// from the front of `buf` and returns it, or returns `Ok(None)` when `buf` does not hold a
/// whole frame yet (it may keep state to resume the search where it stopped). A framer must
/// return [`FrameError::TooLong`] rather than wait for more bytes once `buf` holds more than
/// [`Framer::max_buffered`] bytes without a frame.
///
/// ```
/// use bytes::BytesMut;
/// use plexus::framing::{Framer, Lines};
///
/// let mut lines = Lines::new(80);
/// let mut buf = BytesMut::from(&b"hello\r\nwor"[..]);
/// assert_eq!(lines.decode(&mut buf).unwrap().as_deref(), Some(&b"hello"[..]));
/// assert_eq!(lines.decode(&mut buf).unwrap(), None); // "wor" waits for its end
/// buf.extend_from_slice(b"ld\n");
/// assert_eq!(lines.decode(&mut buf).unwrap().as_deref(), Some(&b"world"[..]));
/// ```
pub trait Framer {
    /// What one decoded frame is.
    type Frame;

    /// Takes the next whole frame off the front of `buf`, if there is one.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Frame>, FrameError>;

    /// The most bytes `decode` lets wait in `buf` for a frame to complete. [`Framed`] treats
    /// more as [`FrameError::TooLong`] even if the framer did not, so a session's buffer never
    /// holds more than this plus one read.
    fn max_buffered(&self) -> usize;
}

/// The encoding side of a framer: appends one message, framed, to `dst`.
///
/// ```
/// use bytes::BytesMut;
/// use plexus::framing::{FrameEncoder, LengthPrefixed, LengthWidth};
///
/// let mut framer = LengthPrefixed::new(LengthWidth::U16, 1024);
/// let mut out = BytesMut::new();
/// framer.encode(b"hi", &mut out).unwrap();
/// assert_eq!(&out[..], b"\x00\x02hi");
/// ```
pub trait FrameEncoder<Item: ?Sized> {
    /// Appends `item`, framed, to `dst`; fails (leaving `dst` as it was) when `item` cannot be
    /// framed, e.g. because it is longer than the framer's limit.
    fn encode(&mut self, item: &Item, dst: &mut BytesMut) -> Result<(), FrameError>;
}

// ---------------------------------------------------------------------------------------------
// Lines
// ---------------------------------------------------------------------------------------------

/// Lines ending in `\n`, with an optional `\r` before it; the frame is the line without them.
/// A line longer than `max_length` (not counting its end) is [`FrameError::TooLong`], found
/// as soon as `max_length + 2` bytes are buffered without a `\n`.
///
/// ```
/// use bytes::BytesMut;
/// use plexus::framing::{FrameError, Framer, Lines};
///
/// let mut lines = Lines::new(4);
/// let mut buf = BytesMut::from(&b"ok\ntoo long\n"[..]);
/// assert_eq!(lines.decode(&mut buf).unwrap().as_deref(), Some(&b"ok"[..]));
/// assert!(matches!(lines.decode(&mut buf), Err(FrameError::TooLong { limit: 4, .. })));
/// ```
#[derive(Debug, Clone)]
pub struct Lines {
    max_length: usize,
    /// Bytes of `buf` already searched for `\n` (so one-byte reads do not rescan).
    searched: usize,
}

impl Lines {
    /// Lines of at most `max_length` bytes.
    pub fn new(max_length: usize) -> Self {
        Lines {
            max_length,
            searched: 0,
        }
    }

    /// The longest line accepted, in bytes, without its end.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

impl Framer for Lines {
    type Frame = Bytes;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let start = self.searched.min(buf.len());
        let unsearched = buf.get(start..).unwrap_or_default();
        let Some(found) = unsearched.iter().position(|&b| b == b'\n') else {
            self.searched = buf.len();
            if buf.len() >= self.max_buffered() {
                return Err(FrameError::TooLong {
                    limit: self.max_length,
                    seen: buf.len() as u64,
                });
            }
            return Ok(None);
        };
        self.searched = 0;
        // The '\n' is at `start + found`, inside `buf`.
        let mut line = buf.split_to(start.saturating_add(found).saturating_add(1));
        let mut end = line.len().saturating_sub(1);
        if end > 0 && line.get(end.saturating_sub(1)) == Some(&b'\r') {
            end = end.saturating_sub(1);
        }
        line.truncate(end);
        if line.len() > self.max_length {
            return Err(FrameError::TooLong {
                limit: self.max_length,
                seen: line.len() as u64,
            });
        }
        Ok(Some(line.freeze()))
    }

    fn max_buffered(&self) -> usize {
        // The line, a '\r', and a '\n' not yet seen.
        self.max_length.saturating_add(2)
    }
}

/// Writes the line and a `\n`.
impl<T: AsRef<[u8]> + ?Sized> FrameEncoder<T> for Lines {
    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let line = item.as_ref();
        if line.len() > self.max_length {
            return Err(FrameError::TooLong {
                limit: self.max_length,
                seen: line.len() as u64,
            });
        }
        if let Some(&found) = line.iter().find(|&&b| b == b'\n') {
            return Err(FrameError::Unexpected {
                expected: "no '\\n' inside a line",
                found,
            });
        }
        dst.reserve(line.len().saturating_add(1));
        dst.put_slice(line);
        dst.put_u8(b'\n');
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Delimited
// ---------------------------------------------------------------------------------------------

/// Frames ended by a delimiter (any non-empty byte sequence); the frame is what comes before
/// it. A frame longer than `max_length` is [`FrameError::TooLong`].
///
/// ```
/// use bytes::BytesMut;
/// use plexus::framing::{Delimited, Framer};
///
/// let mut records = Delimited::new(b"\r\n\r\n", 1024);
/// let mut buf = BytesMut::from(&b"a\r\nb\r\n\r\nc"[..]);
/// assert_eq!(records.decode(&mut buf).unwrap().as_deref(), Some(&b"a\r\nb"[..]));
/// assert_eq!(records.decode(&mut buf).unwrap(), None);
/// ```
#[derive(Debug, Clone)]
pub struct Delimited {
    delimiter: Bytes,
    max_length: usize,
    /// Bytes of `buf` known not to start a delimiter.
    searched: usize,
}

impl Delimited {
    /// Frames of at most `max_length` bytes ended by `delimiter`.
    ///
    /// # Panics
    /// If `delimiter` is empty.
    pub fn new(delimiter: &[u8], max_length: usize) -> Self {
        assert!(!delimiter.is_empty(), "a frame delimiter cannot be empty");
        Delimited {
            delimiter: Bytes::copy_from_slice(delimiter),
            max_length,
            searched: 0,
        }
    }

    /// The delimiter.
    pub fn delimiter(&self) -> &[u8] {
        &self.delimiter
    }

    /// The longest frame accepted, in bytes, without the delimiter.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

impl Framer for Delimited {
    type Frame = Bytes;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let delimiter = &self.delimiter[..];
        let start = self.searched.min(buf.len());
        let found = buf
            .get(start..)
            .unwrap_or_default()
            .windows(delimiter.len())
            .position(|window| window == delimiter);
        let Some(found) = found else {
            // A delimiter may begin in the last len-1 bytes: search them again next time.
            self.searched = buf.len().saturating_sub(delimiter.len().saturating_sub(1));
            if buf.len() >= self.max_buffered() {
                return Err(FrameError::TooLong {
                    limit: self.max_length,
                    seen: buf.len() as u64,
                });
            }
            return Ok(None);
        };
        self.searched = 0;
        let end = start.saturating_add(found);
        if end > self.max_length {
            return Err(FrameError::TooLong {
                limit: self.max_length,
                seen: end as u64,
            });
        }
        let frame = buf.split_to(end).freeze();
        let _ = buf.split_to(delimiter.len());
        Ok(Some(frame))
    }

    fn max_buffered(&self) -> usize {
        self.max_length.saturating_add(self.delimiter.len())
    }
}

/// Writes the frame and the delimiter.
impl<T: AsRef<[u8]> + ?Sized> FrameEncoder<T> for Delimited {
    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let frame = item.as_ref();
        if frame.len() > self.max_length {
            return Err(FrameError::TooLong {
                limit: self.max_length,
                seen: frame.len() as u64,
            });
        }
        dst.reserve(frame.len().saturating_add(self.delimiter.len()));
        dst.put_slice(frame);
        dst.put_slice(&self.delimiter);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LengthPrefixed
// ---------------------------------------------------------------------------------------------

/// The size of a length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthWidth {
    /// One byte.
    U8,
    /// Two bytes.
    U16,
    /// Four bytes.
    U32,
    /// Eight bytes.
    U64,
}

impl LengthWidth {
    /// The field's size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            LengthWidth::U8 => 1,
            LengthWidth::U16 => 2,
            LengthWidth::U32 => 4,
            LengthWidth::U64 => 8,
        }
    }

    fn max_value(self) -> u64 {
        match self {
            LengthWidth::U8 => u8::MAX.into(),
            LengthWidth::U16 => u16::MAX.into(),
            LengthWidth::U32 => u32::MAX.into(),
            LengthWidth::U64 => u64::MAX,
        }
    }
}

/// Byte order of a length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    /// Most significant byte first (network order).
    #[default]
    BigEndian,
    /// Least significant byte first.
    LittleEndian,
}

/// Frames announced by a length field: `[offset bytes][length field][payload]`.
///
/// The payload is `field + adjustment` bytes long (an adjustment covers protocols whose field
/// counts the header too, or counts something else after it); a payload longer than
/// `max_frame` is [`FrameError::TooLong`] as soon as the header arrives, before any of it is
/// buffered. The frame is the payload alone, or the whole frame with its header after
/// [`LengthPrefixed::keep_header`].
///
/// ```
/// use bytes::BytesMut;
/// use plexus::framing::{Framer, LengthPrefixed, LengthWidth};
///
/// // A 4-byte little-endian length that counts itself.
/// let mut framer = LengthPrefixed::new(LengthWidth::U32, 1 << 20)
///     .little_endian()
///     .length_adjustment(-4);
/// let mut buf = BytesMut::from(&b"\x07\x00\x00\x00abc"[..]);
/// assert_eq!(framer.decode(&mut buf).unwrap().as_deref(), Some(&b"abc"[..]));
/// ```
#[derive(Debug, Clone)]
pub struct LengthPrefixed {
    width: LengthWidth,
    order: ByteOrder,
    offset: usize,
    adjustment: i64,
    keep_header: bool,
    max_frame: usize,
    /// The payload length of the frame whose header was read, until its payload is complete.
    pending: Option<usize>,
}

impl LengthPrefixed {
    /// Big-endian length fields of `width` at the start of each frame, counting the payload
    /// only; payloads of at most `max_frame` bytes.
    pub fn new(width: LengthWidth, max_frame: usize) -> Self {
        LengthPrefixed {
            width,
            order: ByteOrder::BigEndian,
            offset: 0,
            adjustment: 0,
            keep_header: false,
            max_frame,
            pending: None,
        }
    }

    /// The length field is little-endian.
    pub fn little_endian(mut self) -> Self {
        self.order = ByteOrder::LittleEndian;
        self
    }

    /// The length field's byte order.
    pub fn byte_order(mut self, order: ByteOrder) -> Self {
        self.order = order;
        self
    }

    /// `offset` bytes (a type, a version, …) come before the length field; they are part of
    /// the header.
    pub fn length_offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// The payload is `field + adjustment` bytes (e.g. `-4` for a 4-byte field that counts
    /// itself).
    pub fn length_adjustment(mut self, adjustment: i64) -> Self {
        self.adjustment = adjustment;
        self
    }

    /// Frames include their header (the offset bytes and the length field).
    pub fn keep_header(mut self) -> Self {
        self.keep_header = true;
        self
    }

    /// The longest payload accepted, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn header_len(&self) -> usize {
        self.offset.saturating_add(self.width.bytes())
    }

    fn read_field(&self, field: &[u8]) -> u64 {
        let mut value = 0u64;
        match self.order {
            ByteOrder::BigEndian => field
                .iter()
                .for_each(|&b| value = value << 8 | u64::from(b)),
            ByteOrder::LittleEndian => field
                .iter()
                .rev()
                .for_each(|&b| value = value << 8 | u64::from(b)),
        }
        value
    }
}

impl Framer for LengthPrefixed {
    type Frame = Bytes;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let header = self.header_len();
        let payload = match self.pending {
            Some(payload) => payload,
            None => {
                if buf.len() < header {
                    return Ok(None);
                }
                let field = self.read_field(buf.get(self.offset..header).unwrap_or_default());
                let payload = i128::from(field).saturating_add(i128::from(self.adjustment));
                if payload < 0 {
                    return Err(FrameError::NegativeLength {
                        field,
                        adjustment: self.adjustment,
                    });
                }
                if payload > self.max_frame as i128 {
                    return Err(FrameError::TooLong {
                        limit: self.max_frame,
                        seen: u64::try_from(payload).unwrap_or(u64::MAX),
                    });
                }
                let payload = payload as usize;
                self.pending = Some(payload);
                payload
            }
        };
        let total = header.saturating_add(payload);
        if buf.len() < total {
            // No reserve for the declared length: a header alone must not cost its payload.
            return Ok(None);
        }
        self.pending = None;
        let mut frame = buf.split_to(total);
        if !self.keep_header {
            let _ = frame.split_to(header);
        }
        Ok(Some(frame.freeze()))
    }

    fn max_buffered(&self) -> usize {
        self.header_len().saturating_add(self.max_frame)
    }
}

/// Writes the length field and the payload. Bytes before the field
/// ([`LengthPrefixed::length_offset`]) are the caller's: write them to `dst` first.
impl<T: AsRef<[u8]> + ?Sized> FrameEncoder<T> for LengthPrefixed {
    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let payload = item.as_ref();
        let too_long = FrameError::TooLong {
            limit: self.max_frame,
            seen: payload.len() as u64,
        };
        if payload.len() > self.max_frame {
            return Err(too_long);
        }
        let field = (payload.len() as i128).saturating_sub(i128::from(self.adjustment));
        let Ok(field) = u64::try_from(field) else {
            return Err(FrameError::NegativeLength {
                field: 0,
                adjustment: self.adjustment,
            });
        };
        if field > self.width.max_value() {
            return Err(too_long);
        }
        let width = self.width.bytes();
        dst.reserve(width.saturating_add(payload.len()));
        match self.order {
            ByteOrder::BigEndian => dst.put_uint(field, width),
            ByteOrder::LittleEndian => dst.put_uint_le(field, width),
        }
        dst.put_slice(payload);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Framed
// ---------------------------------------------------------------------------------------------

/// A handler of whole frames, run under [`Framed`].
///
/// The callbacks are those of [`SessionHandler`] with `on_data` replaced by
/// [`FrameHandler::on_frame`], plus [`FrameHandler::on_read_end`] (for answering a pipelined
/// batch in one send) and [`FrameHandler::on_frame_error`] (for a last word before the close).
pub trait FrameHandler<Frame>: Send {
    /// One whole frame arrived (frames arrive in order).
    fn on_frame(&mut self, session: &mut Session<'_>, frame: Frame);

    /// Every whole frame of one read was delivered (also after a [`FrameError`]): the moment
    /// to send what the frames produced, together. The default does nothing.
    fn on_read_end(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// The bytes after the last whole frame could not be framed. The session closes once this
    /// and [`FrameHandler::on_read_end`] return; what they send is still delivered. The
    /// default does nothing.
    fn on_frame_error(&mut self, session: &mut Session<'_>, error: &FrameError) {
        let _ = (session, error);
    }

    /// As [`SessionHandler::on_timer`].
    fn on_timer(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// As [`SessionHandler::on_drain`].
    fn on_drain(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// As [`SessionHandler::on_server_drain`]: the server began a graceful drain (the moment
    /// for a protocol's own goodbye). The default does nothing.
    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// As [`SessionHandler::on_link`]. The default closes the session (after flushing) when a
    /// linked one ends.
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Closed { .. } = event {
            session.close();
        }
    }

    /// As [`SessionHandler::on_eof`] (only sessions with links are asked). The default closes
    /// the session after flushing.
    fn on_eof(&mut self, session: &mut Session<'_>) {
        session.close();
    }

    /// As [`SessionHandler::on_close`].
    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let _ = (info, reason);
    }
}

/// A [`SessionHandler`] that frames the session's bytes with `F` and hands each whole frame to
/// `H`. Bytes of an incomplete frame wait in a buffer that never holds more than
/// [`Framer::max_buffered`] plus one read, and holds no memory while it is empty.
///
/// ```
/// use bytes::Bytes;
/// use plexus::framing::{FrameHandler, Framed, Lines};
/// use plexus::{Service, Session, SessionHandler};
///
/// /// Answers each line with its length.
/// struct LineLength;
/// impl FrameHandler<Bytes> for LineLength {
///     fn on_frame(&mut self, session: &mut Session<'_>, line: Bytes) {
///         session.send(format!("{}\n", line.len()).as_bytes());
///     }
/// }
///
/// struct LineLengths;
/// impl Service for LineLengths {
///     fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
///         Box::new(Framed::new(Lines::new(4096), LineLength))
///     }
/// }
/// ```
pub struct Framed<F, H> {
    framer: F,
    handler: H,
    buffer: BytesMut,
}

impl<F, H> Framed<F, H> {
    /// Frames with `framer` for `handler`.
    pub fn new(framer: F, handler: H) -> Self {
        Framed {
            framer,
            handler,
            buffer: BytesMut::new(),
        }
    }

    /// The framer.
    pub fn framer(&self) -> &F {
        &self.framer
    }

    /// The frame handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The frame handler, to change.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Bytes received that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

impl<F, H> Framed<F, H>
where
    F: Framer,
    H: FrameHandler<F::Frame>,
{
    /// Decodes every whole frame in the buffer; the first error, if any.
    fn deliver(&mut self, session: &mut Session<'_>) -> Option<FrameError> {
        while session.closing.is_none() {
            match self.framer.decode(&mut self.buffer) {
                Ok(Some(frame)) => self.handler.on_frame(session, frame),
                Ok(None) if self.buffer.len() > self.framer.max_buffered() => {
                    return Some(FrameError::TooLong {
                        limit: self.framer.max_buffered(),
                        seen: self.buffer.len() as u64,
                    });
                }
                Ok(None) => return None,
                Err(error) => return Some(error),
            }
        }
        None
    }
}

impl<F, H> SessionHandler for Framed<F, H>
where
    F: Framer + Send,
    H: FrameHandler<F::Frame>,
{
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if session.closing.is_some() {
            return;
        }
        self.buffer.extend_from_slice(data);
        let error = self.deliver(session);
        if let Some(error) = &error {
            self.handler.on_frame_error(session, error);
        }
        self.handler.on_read_end(session);
        if self.buffer.is_empty() || error.is_some() {
            // An idle session keeps no buffer.
            self.buffer = BytesMut::new();
        }
        let Some(error) = error else {
            return;
        };
        let info = session.info;
        let reason = match error {
            FrameError::TooLong { .. } => CloseReason::FrameTooLarge,
            _ => CloseReason::Requested,
        };
        info!(
            session = %info.id, peer = %info.peer, listener = info.listener(),
            "closing session: {error}"
        );
        if session.closing.is_none() && reason == CloseReason::FrameTooLarge {
            if let Some(metrics) = session.metrics {
                metrics
                    .closed_frame_too_large
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        session.closing.get_or_insert(reason);
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        self.handler.on_timer(session);
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        self.handler.on_drain(session);
    }

    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        self.handler.on_server_drain(session);
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        self.handler.on_link(session, event);
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        self.handler.on_eof(session);
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        self.handler.on_close(info, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;
    use crate::outbound::OutboundQueue;
    use crate::service::{ListenerInfo, SessionId};
    use crate::worker::WorkQueue;

    /// Feeds `input` to `framer` in pieces of `step` bytes, collecting frames until the first
    /// error; asserts the buffer stays within the framer's bound plus one piece.
    fn frames<F: Framer<Frame = Bytes>>(
        framer: &mut F,
        input: &[u8],
        step: usize,
    ) -> (Vec<Bytes>, Option<FrameError>) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match framer.decode(&mut buf) {
                    Ok(Some(frame)) => out.push(frame),
                    Ok(None) => break,
                    Err(error) => return (out, Some(error)),
                }
            }
            assert!(buf.len() <= framer.max_buffered(), "buffer {}", buf.len());
        }
        (out, None)
    }

    fn texts(frames: &[Bytes]) -> Vec<&[u8]> {
        frames.iter().map(|f| &f[..]).collect()
    }

    #[test]
    fn lines_split_any_way_including_one_byte_at_a_time() {
        let input = b"one\r\ntwo\n\nthree\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (out, error) = frames(&mut Lines::new(5), input, step);
            assert_eq!(error, None, "step {step}");
            let want: Vec<&[u8]> = vec![b"one", b"two", b"", b"three", b""];
            assert_eq!(texts(&out), want, "step {step}");
        }
    }

    #[test]
    fn lines_too_long_with_or_without_an_end() {
        for step in [1, 4, 100] {
            let (out, error) = frames(&mut Lines::new(3), b"abc\r\nabcd\n", step);
            assert_eq!(texts(&out), vec![b"abc"]);
            assert!(matches!(error, Some(FrameError::TooLong { limit: 3, .. })));
            // No end at all: found once 3 + 2 bytes wait.
            let (_, error) = frames(&mut Lines::new(3), b"abcdefgh", step);
            assert!(matches!(error, Some(FrameError::TooLong { limit: 3, .. })));
        }
        // A line of exactly the limit with "\r" still waiting for its "\n" is fine.
        let (out, error) = frames(&mut Lines::new(3), b"abc\r", 1);
        assert!(out.is_empty() && error.is_none());
    }

    #[test]
    fn lines_encode() {
        let mut out = BytesMut::new();
        Lines::new(5).encode("hello", &mut out).unwrap();
        assert_eq!(&out[..], b"hello\n");
        assert!(Lines::new(4).encode("hello", &mut out).is_err());
        assert!(matches!(
            Lines::new(9).encode("a\nb", &mut out),
            Err(FrameError::Unexpected { found: b'\n', .. })
        ));
        assert_eq!(&out[..], b"hello\n");
    }

    #[test]
    fn delimited_split_any_way_including_one_byte_at_a_time() {
        let input = b"a||bb|||c|||||";
        for step in [1, 2, 3, 5, input.len()] {
            let (out, error) = frames(&mut Delimited::new(b"||", 3), input, step);
            assert_eq!(error, None, "step {step}");
            // The last "|" waits for a second one.
            let want: Vec<&[u8]> = vec![b"a", b"bb", b"|c", b""];
            assert_eq!(texts(&out), want, "step {step}");
        }
        for step in [1, 2, 10] {
            let (out, error) = frames(&mut Delimited::new(b"\0", 2), b"ab\0abc\0", step);
            assert_eq!(texts(&out), vec![b"ab"]);
            assert!(matches!(error, Some(FrameError::TooLong { limit: 2, .. })));
        }
    }

    #[test]
    fn delimited_encode() {
        let mut out = BytesMut::new();
        let mut framer = Delimited::new(b"\r\n\r\n", 8);
        framer.encode(b"abc".as_slice(), &mut out).unwrap();
        assert_eq!(&out[..], b"abc\r\n\r\n");
        let (decoded, _) = frames(&mut framer, &out, 1);
        assert_eq!(texts(&decoded), vec![b"abc"]);
    }

    #[test]
    fn length_prefixed_every_width_and_order_one_byte_at_a_time() {
        for width in [
            LengthWidth::U8,
            LengthWidth::U16,
            LengthWidth::U32,
            LengthWidth::U64,
        ] {
            for order in [ByteOrder::BigEndian, ByteOrder::LittleEndian] {
                let mut framer = LengthPrefixed::new(width, 300).byte_order(order);
                let payloads: Vec<Vec<u8>> = vec![b"".to_vec(), b"x".to_vec(), vec![7; 255]];
                let mut wire = BytesMut::new();
                for payload in &payloads {
                    framer.encode(payload, &mut wire).unwrap();
                }
                assert_eq!(
                    wire.len(),
                    3 * width.bytes() + 256,
                    "{width:?} {order:?} header size"
                );
                for step in [1, 3, wire.len()] {
                    let (out, error) = frames(&mut framer.clone(), &wire, step);
                    assert_eq!(error, None);
                    assert_eq!(out, payloads, "{width:?} {order:?} step {step}");
                }
            }
        }
        assert_eq!(
            LengthPrefixed::new(LengthWidth::U8, 1000)
                .encode(&[0u8; 256][..], &mut BytesMut::new()),
            Err(FrameError::TooLong {
                limit: 1000,
                seen: 256
            })
        );
    }

    #[test]
    fn length_prefixed_byte_orders_on_the_wire() {
        let mut be = BytesMut::new();
        LengthPrefixed::new(LengthWidth::U32, 10)
            .encode(b"ab".as_slice(), &mut be)
            .unwrap();
        assert_eq!(&be[..], b"\0\0\0\x02ab");
        let mut le = BytesMut::new();
        LengthPrefixed::new(LengthWidth::U16, 10)
            .little_endian()
            .encode(b"ab".as_slice(), &mut le)
            .unwrap();
        assert_eq!(&le[..], b"\x02\0ab");
    }

    #[test]
    fn length_prefixed_offset_adjustment_and_header() {
        // [type byte][u16 length counting the whole frame][payload], kept whole.
        let framer = LengthPrefixed::new(LengthWidth::U16, 16)
            .length_offset(1)
            .length_adjustment(-3)
            .keep_header();
        let wire = b"\xB7\x00\x05hi\xB7\x00\x03";
        for step in [1, 2, wire.len()] {
            let (out, error) = frames(&mut framer.clone(), wire, step);
            assert_eq!(error, None);
            assert_eq!(
                texts(&out),
                vec![&b"\xB7\x00\x05hi"[..], &b"\xB7\x00\x03"[..]]
            );
        }
        let (_, error) = frames(&mut framer.clone(), b"\x01\x00\x02", 1);
        assert_eq!(
            error,
            Some(FrameError::NegativeLength {
                field: 2,
                adjustment: -3
            })
        );
    }

    #[test]
    fn length_prefixed_too_long_is_found_at_the_header() {
        let mut framer = LengthPrefixed::new(LengthWidth::U64, 1 << 20);
        let mut buf = BytesMut::from(&[0xff; 8][..]);
        assert_eq!(
            framer.decode(&mut buf),
            Err(FrameError::TooLong {
                limit: 1 << 20,
                seen: u64::MAX
            })
        );
        // Nothing of the payload was waited for.
        let mut framer = LengthPrefixed::new(LengthWidth::U32, 4);
        let (_, error) = frames(&mut framer, b"\0\0\0\x05", 1);
        assert_eq!(error, Some(FrameError::TooLong { limit: 4, seen: 5 }));
    }

    // --- Framed, through a real Session ---

    /// Records frames and errors; answers each frame in `on_read_end`, all at once.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<Bytes>,
        errors: Vec<FrameError>,
        pending: Vec<u8>,
        reads: usize,
    }

    impl FrameHandler<Bytes> for Recorder {
        fn on_frame(&mut self, _: &mut Session<'_>, frame: Bytes) {
            self.pending.extend_from_slice(&frame);
            self.pending.push(b';');
            self.frames.push(frame);
        }
        fn on_read_end(&mut self, session: &mut Session<'_>) {
            self.reads += 1;
            if !self.pending.is_empty() {
                session.send(&std::mem::take(&mut self.pending));
            }
        }
        fn on_frame_error(&mut self, _: &mut Session<'_>, error: &FrameError) {
            self.errors.push(error.clone());
            self.pending.extend_from_slice(b"error;");
        }
        fn on_server_drain(&mut self, session: &mut Session<'_>) {
            session.send(b"goodbye;");
        }
    }

    #[test]
    fn framed_passes_the_server_drain_link_and_eof_callbacks_to_its_handler() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(Lines::new(8), Recorder::default());
        harness.with_session(|session| framed.on_server_drain(session));
        assert_eq!(
            harness.sent(),
            b"goodbye;",
            "the handler's own drain goodbye"
        );
        assert_eq!(harness.closing, None);
        // FrameHandler's defaults are SessionHandler's: a linked session's end closes...
        harness.with_session(|session| {
            framed.on_link(
                session,
                LinkEvent::Closed {
                    peer: SessionId(2),
                    reason: CloseReason::PeerClosed,
                },
            );
        });
        assert_eq!(harness.closing, Some(CloseReason::Requested));
        // ...and so does the peer's end of data.
        let mut harness = Harness::new();
        harness.with_session(|session| framed.on_eof(session));
        assert_eq!(harness.closing, Some(CloseReason::Requested));
    }

    /// One session's state outside its handler, as the event loop keeps it.
    struct Harness {
        info: SessionInfo,
        outbound: OutboundQueue,
        closing: Option<CloseReason>,
        work: WorkQueue,
        extras: Option<Box<crate::service::SessionExtras>>,
        metrics: crate::metrics::Metrics,
        locals: crate::loop_local::LoopLocals,
    }

    impl Harness {
        fn new() -> Harness {
            let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
            Harness {
                info: SessionInfo {
                    id: SessionId(1),
                    peer: addr,
                    local: addr,
                    listener: Arc::new(ListenerInfo {
                        index: 0,
                        name: "test".into(),
                        stats: Default::default(),
                    }),
                },
                outbound: OutboundQueue::default(),
                closing: None,
                work: WorkQueue::default(),
                extras: None,
                metrics: Default::default(),
                locals: Default::default(),
            }
        }

        fn feed(&mut self, handler: &mut dyn SessionHandler, data: &[u8]) {
            self.with_session(|session| handler.on_data(session, data));
        }

        /// Runs `callback` on a session built over this harness's state.
        fn with_session(&mut self, callback: impl FnOnce(&mut Session<'_>)) {
            let mut broadcasts = Vec::new();
            let mut drain_wanted = false;
            let mut session = Session {
                info: &self.info,
                outbound: &mut self.outbound,
                closing: &mut self.closing,
                broadcasts: &mut broadcasts,
                outbound_limit: 1 << 20,
                work: &mut self.work,
                work_limit: 1,
                extras: &mut self.extras,
                drain_wanted: &mut drain_wanted,
                high_watermark: 1 << 16,
                unsent: 0,
                metrics: Some(&self.metrics),
                now: std::time::Instant::now(),
                locals: &mut self.locals,
                alpn: None,
                tls_state: None,
                tls: false,
                direct: None,
            };
            callback(&mut session);
        }

        fn sent(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while !self.outbound.is_empty() {
                let chunk = self.outbound.front(usize::MAX).unwrap().to_vec();
                self.outbound.consume(chunk.len());
                out.extend_from_slice(&chunk);
            }
            out
        }
    }

    #[test]
    fn framed_delivers_whole_frames_fed_one_byte_at_a_time() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(Lines::new(8), Recorder::default());
        for &byte in b"ab\ncd\r\n".iter() {
            harness.feed(&mut framed, &[byte]);
            assert!(framed.buffered() <= 8 + 2 + 1);
        }
        assert_eq!(texts(&framed.handler().frames), vec![b"ab", b"cd"]);
        assert_eq!(harness.sent(), b"ab;cd;");
        assert_eq!(harness.closing, None);
        assert_eq!(framed.buffered(), 0);
        assert_eq!(
            framed.buffer.capacity(),
            0,
            "an idle session holds no buffer"
        );
    }

    #[test]
    fn framed_answers_a_pipelined_read_in_one_send() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(Delimited::new(b",", 8), Recorder::default());
        harness.feed(&mut framed, b"a,b,c,d");
        assert_eq!(framed.handler().reads, 1);
        assert_eq!(harness.outbound.front(usize::MAX).unwrap(), b"a;b;c;");
        assert_eq!(framed.buffered(), 1);
    }

    #[test]
    fn framed_closes_on_an_oversized_frame_after_the_handler_answers() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(
            LengthPrefixed::new(LengthWidth::U16, 4),
            Recorder::default(),
        );
        harness.feed(&mut framed, b"\x00\x02ok\x00");
        harness.feed(&mut framed, b"\x05hello");
        assert_eq!(texts(&framed.handler().frames), vec![b"ok"]);
        assert_eq!(
            framed.handler().errors,
            vec![FrameError::TooLong { limit: 4, seen: 5 }]
        );
        assert_eq!(harness.closing, Some(CloseReason::FrameTooLarge));
        assert!(
            CloseReason::FrameTooLarge.flushes(),
            "the answer is delivered"
        );
        assert_eq!(harness.sent(), b"ok;error;");
        assert_eq!(harness.metrics.snapshot().closed_frame_too_large, 1);
        // A closing session reads nothing more.
        harness.feed(&mut framed, b"\x00\x01x");
        assert_eq!(framed.handler().frames.len(), 1);
    }

    /// A framer that never reports an overlong buffer: `Framed` bounds it anyway.
    struct Careless;
    impl Framer for Careless {
        type Frame = Bytes;
        fn decode(&mut self, _: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
            Ok(None)
        }
        fn max_buffered(&self) -> usize {
            10
        }
    }

    #[test]
    fn framed_bounds_its_buffer_even_for_a_careless_framer() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(Careless, Recorder::default());
        for _ in 0..10 {
            harness.feed(&mut framed, b"x");
        }
        assert_eq!(harness.closing, None);
        harness.feed(&mut framed, b"x");
        assert_eq!(harness.closing, Some(CloseReason::FrameTooLarge));
        assert_eq!(
            framed.handler().errors,
            vec![FrameError::TooLong {
                limit: 10,
                seen: 11
            }]
        );
    }

    /// Fails on a byte that is not a digit: a protocol error, not an oversized frame.
    struct Digits;
    impl Framer for Digits {
        type Frame = Bytes;
        fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
            match buf.first() {
                None => Ok(None),
                Some(&b) if b.is_ascii_digit() => Ok(Some(buf.split_to(1).freeze())),
                Some(&found) => Err(FrameError::Unexpected {
                    expected: "a digit",
                    found,
                }),
            }
        }
        fn max_buffered(&self) -> usize {
            1
        }
    }

    #[test]
    fn framed_closes_on_malformed_bytes_as_requested() {
        let mut harness = Harness::new();
        let mut framed = Framed::new(Digits, Recorder::default());
        harness.feed(&mut framed, b"12x3");
        assert_eq!(texts(&framed.handler().frames), vec![b"1", b"2"]);
        assert_eq!(harness.closing, Some(CloseReason::Requested));
        assert_eq!(harness.sent(), b"1;2;error;");
        assert_eq!(harness.metrics.snapshot().closed_frame_too_large, 0);
        assert_eq!(
            framed.handler().errors[0].to_string(),
            "expected a digit, got 'x'"
        );
    }
}
