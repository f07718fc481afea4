//! The server side of one HTTP/2 connection, sans-IO (quinn-proto style):
//! owns the client preface check, SETTINGS exchange, the stream table and
//! each stream's state (idle → open → half-closed → closed, RFC 9113 §5.1),
//! stream-ID rules, header blocks across CONTINUATION frames, HPACK contexts,
//! flow control in both directions, GOAWAY and the bounds against abusive
//! peers ([`Limits`]).
//!
//! The caller feeds what the socket returned to [`ServerConnection::recv`]
//! with the current time, takes [`Event`]s from
//! [`poll_event`](ServerConnection::poll_event), answers through
//! [`send_headers`](ServerConnection::send_headers) /
//! [`send_data`](ServerConnection::send_data) /
//! [`reset`](ServerConnection::reset) /
//! [`goaway`](ServerConnection::goaway), and writes whatever
//! [`poll_transmit`](ServerConnection::poll_transmit) hands out. Nothing
//! here reads a clock or touches a socket.
//!
//! Memory per connection is bounded: at most one partial frame of input
//! (9 + `max_frame_size` bytes), one header block of at most
//! `max_header_list_size` encoded bytes, `max_concurrent_streams` streams,
//! request body held by the caller up to the receive windows it has not yet
//! released, and queued output: control frames up to
//! [`Limits::max_pending_output`] (past it the connection closes with
//! ENHANCE_YOUR_CALM) and body data only as far as the peer's windows and
//! that same cap allow ([`send_data`](ServerConnection::send_data) accepts
//! 0 bytes when either is exhausted).
//!
//! Floods are counted per [`Limits::window`], measured with the `now` passed
//! in: peer RST_STREAMs (rapid reset, CVE-2023-44487), SETTINGS, PINGs,
//! empty frames (DATA without payload or END_STREAM, empty header fragments)
//! and stream errors the peer causes (WINDOW_UPDATE of 0 on a stream,
//! malformed or refused requests). Past a budget the connection ends with
//! GOAWAY ENHANCE_YOUR_CALM.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::frame::{self, setting, ErrorCode, Frame, FrameError, FrameErrorKind, MAX_WINDOW};
use super::hpack::{self, HeaderField, HpackError};
use crate::http::Header;

/// The highest stream identifier (2^31 - 1).
pub const MAX_STREAM_ID: u32 = MAX_WINDOW;

/// The flow-control window both directions start with before SETTINGS (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;

/// What the server advertises and enforces; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams the peer may have open at
    /// once; a HEADERS past it is refused with RST_STREAM REFUSED_STREAM.
    /// Default 128.
    pub max_concurrent_streams: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: each request body's receive window.
    /// Default 65,535 (the protocol's initial value); at most 2^31 - 1.
    pub initial_window_size: u32,
    /// The connection-level receive window the server opens at start (a
    /// WINDOW_UPDATE on stream 0 raises it from 65,535). Default 1 MiB.
    pub connection_window_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE: the largest frame payload accepted.
    /// Default 16,384 (the protocol minimum); at most 2^24 - 1.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: the largest request header list
    /// (name + value + 32 per field, decoded) and also the largest encoded
    /// header block (HEADERS + CONTINUATION) held. A larger decoded list is
    /// answered 431; a larger encoded block closes the connection
    /// (ENHANCE_YOUR_CALM, the CONTINUATION flood bound). Default 16 KiB.
    pub max_header_list_size: u32,
    /// SETTINGS_HEADER_TABLE_SIZE: the HPACK dynamic table the peer's
    /// encoder may use. Default 4,096.
    pub header_table_size: u32,
    /// The flood and resource bounds.
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_concurrent_streams: 128,
            initial_window_size: DEFAULT_WINDOW,
            connection_window_size: 1 << 20,
            max_frame_size: frame::MIN_MAX_FRAME_SIZE,
            max_header_list_size: 16 * 1024,
            header_table_size: hpack::DEFAULT_TABLE_SIZE as u32,
            limits: Limits::default(),
        }
    }
}

/// Budgets against abusive peers: each counts events per [`window`](Limits::window);
/// one past the budget ends the connection with GOAWAY ENHANCE_YOUR_CALM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The period the budgets below are counted over. Default 10 s.
    pub window: Duration,
    /// RST_STREAM frames from the peer (rapid reset, CVE-2023-44487).
    /// Default 200 per window: browsers cancel a few streams per page, an
    /// attack resets thousands per second.
    pub max_peer_resets: u32,
    /// Stream errors the peer causes (WINDOW_UPDATE of 0 on a stream, a
    /// malformed, oversized or refused request, DATA past a stream window).
    /// Default 100 per window.
    pub max_stream_errors: u32,
    /// SETTINGS frames (not ACKs) from the peer. Default 100 per window.
    pub max_settings: u32,
    /// PING frames (not ACKs) from the peer. Default 100 per window.
    pub max_pings: u32,
    /// Frames that carry nothing: DATA with no payload and no END_STREAM,
    /// HEADERS/CONTINUATION with an empty fragment and no END_HEADERS.
    /// Default 100 per window.
    pub max_empty_frames: u32,
    /// Bytes of output queued here (not yet taken by `poll_transmit`) past
    /// which control answers (PING/SETTINGS ACKs, RST_STREAMs) close the
    /// connection with ENHANCE_YOUR_CALM and `send_data` accepts nothing:
    /// a peer that does not read cannot make the server queue. Default 1 MiB.
    pub max_pending_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: Duration::from_secs(10),
            max_peer_resets: 200,
            max_stream_errors: 100,
            max_settings: 100,
            max_pings: 100,
            max_empty_frames: 100,
            max_pending_output: 1 << 20,
        }
    }
}

/// A decoded request head: the pseudo-header fields and the regular fields
/// (names lowercase, as HTTP/2 requires; cookie crumbs joined with `"; "`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `:method`.
    pub method: String,
    /// `:scheme` (absent for CONNECT).
    pub scheme: Option<String>,
    /// `:authority`, when sent.
    pub authority: Option<String>,
    /// `:path` (absent for CONNECT).
    pub path: Option<String>,
    /// `:protocol` (extended CONNECT, RFC 8441).
    pub protocol: Option<String>,
    /// The regular header fields, in order.
    pub headers: Vec<Header>,
    /// The `content-length` value, when sent (DATA must add up to it).
    pub content_length: Option<u64>,
}

impl RequestHead {
    /// The value of the first header field called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_slice())
    }
}

/// What the connection has for the service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new request on `stream`; `end_stream` means it has no body.
    Request {
        /// The stream.
        stream: u32,
        /// The request head.
        head: RequestHead,
        /// No body follows.
        end_stream: bool,
    },
    /// Request body bytes. Call
    /// [`release_capacity`](ServerConnection::release_capacity) with their
    /// length once consumed, so the peer's window reopens.
    Data {
        /// The stream.
        stream: u32,
        /// The bytes (possibly empty on the last one).
        data: Vec<u8>,
        /// The body is complete.
        end_stream: bool,
    },
    /// Trailer fields; the request body is complete.
    Trailers {
        /// The stream.
        stream: u32,
        /// The trailer fields.
        headers: Vec<Header>,
    },
    /// The stream is gone: reset by the peer (`remote`) or by the connection
    /// for the peer's error. Stop sending on it.
    Reset {
        /// The stream.
        stream: u32,
        /// The error code.
        code: ErrorCode,
        /// The peer sent RST_STREAM.
        remote: bool,
    },
    /// A stream whose `send_data` was cut short can send again.
    SendReady {
        /// The stream.
        stream: u32,
    },
    /// The peer sent GOAWAY: it opens no more streams.
    GoAway {
        /// The last stream it may have processed.
        last_stream: u32,
        /// Its error code.
        code: ErrorCode,
    },
}

/// The flood a budget counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flood {
    /// RST_STREAM frames from the peer (rapid reset).
    Resets,
    /// Stream errors caused by the peer.
    StreamErrors,
    /// SETTINGS frames.
    Settings,
    /// PING frames.
    Pings,
    /// Frames carrying nothing.
    EmptyFrames,
}

/// Why the connection was closed (with the [`ErrorCode`] sent in GOAWAY).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The first 24 bytes were not the client preface.
    #[error("bad client preface")]
    BadPreface,
    /// The first frame after the preface was not SETTINGS.
    #[error("first frame is not SETTINGS")]
    FirstFrameNotSettings,
    /// A frame could not be parsed.
    #[error("{0}")]
    Frame(FrameErrorKind),
    /// A header block could not be decoded.
    #[error("HPACK: {0}")]
    Hpack(HpackError),
    /// A client sent PUSH_PROMISE.
    #[error("PUSH_PROMISE from a client")]
    PushPromise,
    /// A client opened an even-numbered stream.
    #[error("client opened even stream {0}")]
    EvenStream(u32),
    /// A new stream's id was not above every earlier one.
    #[error("stream {stream} is not above the last stream {last}")]
    StreamIdNotIncreasing {
        /// The id sent.
        stream: u32,
        /// The highest id seen.
        last: u32,
    },
    /// HEADERS on a stream that is closed.
    #[error("HEADERS on closed stream {0}")]
    HeadersOnClosedStream(u32),
    /// A frame other than HEADERS/PRIORITY on a stream never opened.
    #[error("{kind} on idle stream {stream}")]
    IdleStream {
        /// The frame type.
        kind: &'static str,
        /// The stream.
        stream: u32,
    },
    /// Another frame inside a header block (only CONTINUATION may follow).
    #[error("expected CONTINUATION for stream {0}")]
    ExpectedContinuation(u32),
    /// CONTINUATION without a header block in progress.
    #[error("unexpected CONTINUATION")]
    UnexpectedContinuation,
    /// A header block grew past `max_header_list_size` (CONTINUATION flood).
    #[error("header block exceeds {0} bytes")]
    HeaderBlockTooLarge(u32),
    /// A SETTINGS value out of its range.
    #[error("SETTINGS parameter {id} has invalid value {value}")]
    BadSetting {
        /// The parameter.
        id: u16,
        /// Its value.
        value: u32,
    },
    /// A send window past 2^31 - 1 (stream 0 is the connection).
    #[error("flow-control window of stream {0} overflows")]
    WindowOverflow(u32),
    /// DATA past the connection's receive window.
    #[error("DATA exceeds the connection window")]
    ConnectionWindowExceeded,
    /// A budget of [`Limits`] was spent.
    #[error("{0:?} flood")]
    Flood(Flood),
    /// Output queued past [`Limits::max_pending_output`] while the peer kept asking for more.
    #[error("peer does not read its output")]
    OutputBacklog,
}

/// The connection failed: the GOAWAY with `code` is queued for sending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 connection error {code}: {violation}")]
pub struct ConnectionError {
    /// The code sent in GOAWAY.
    pub code: ErrorCode,
    /// What the peer did.
    pub violation: Violation,
}

/// Why a call of the service was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The stream is not open for sending (unknown, reset, or ended).
    #[error("stream {0} is not open for sending")]
    StreamClosed(u32),
    /// The final response headers were already sent.
    #[error("headers already sent on stream {0}")]
    HeadersSent(u32),
    /// DATA before the response headers.
    #[error("DATA before headers on stream {0}")]
    HeadersNotSent(u32),
    /// The connection is closed.
    #[error("connection closed")]
    ConnectionClosed,
}

#[derive(Debug)]
struct Stream {
    /// The peer sent END_STREAM (half-closed remote).
    recv_closed: bool,
    /// We sent END_STREAM (half-closed local).
    send_closed: bool,
    /// Final response headers were sent.
    headers_sent: bool,
    send_window: i64,
    recv_window: i64,
    /// Bytes the service consumed that were not yet re-advertised.
    recv_unacked: u32,
    /// `send_data` was cut short: tell the service when the window opens.
    blocked: bool,
    content_length: Option<u64>,
    received: u64,
}

/// A header block being collected across CONTINUATION frames.
#[derive(Debug)]
struct PendingBlock {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// A count of events over a time window.
#[derive(Debug, Default)]
struct Budget {
    start: Option<Instant>,
    used: u32,
}

impl Budget {
    /// Counts one event at `now`; false once more than `max` fell in the current window.
    fn spend(&mut self, now: Instant, window: Duration, max: u32) -> bool {
        let fresh = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= window);
        if fresh {
            self.start = Some(now);
            self.used = 0;
        }
        self.used = self.used.saturating_add(1);
        self.used <= max
    }
}

#[derive(Debug, Default)]
struct Budgets {
    resets: Budget,
    stream_errors: Budget,
    settings: Budget,
    pings: Budget,
    empty: Budget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 24-byte preface.
    Preface,
    /// The first frame must be SETTINGS.
    FirstSettings,
    /// Frames flow.
    Open,
    /// GOAWAY sent for an error or a hard close; input is ignored.
    Closed,
}

/// The server side of one HTTP/2 connection.
#[derive(Debug)]
pub struct ServerConnection {
    settings: Settings,
    phase: Phase,
    error: Option<ConnectionError>,
    input: Vec<u8>,
    output: Vec<u8>,
    events: VecDeque<Event>,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    streams: HashMap<u32, Stream>,
    last_peer_stream: u32,
    pending_block: Option<PendingBlock>,
    /// Our SETTINGS were acknowledged (their values are in force for the peer).
    settings_acked: bool,
    peer_initial_window: u32,
    peer_max_frame_size: u32,
    conn_send_window: i64,
    conn_recv_window: i64,
    conn_recv_unacked: u32,
    /// GOAWAY sent (graceful drain): streams above this id are refused.
    goaway_last: Option<u32>,
    budgets: Budgets,
}

impl ServerConnection {
    /// A connection that has just been accepted; the server's SETTINGS (and
    /// the connection window's WINDOW_UPDATE) are queued for sending at once.
    pub fn new(settings: Settings) -> Self {
        let mut s = settings;
        s.max_frame_size = s
            .max_frame_size
            .clamp(frame::MIN_MAX_FRAME_SIZE, frame::MAX_MAX_FRAME_SIZE);
        s.initial_window_size = s.initial_window_size.min(MAX_WINDOW);
        s.connection_window_size = s.connection_window_size.clamp(DEFAULT_WINDOW, MAX_WINDOW);
        let mut output = Vec::new();
        let mut params = vec![
            (setting::ENABLE_PUSH, 0),
            (setting::MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
            (setting::INITIAL_WINDOW_SIZE, s.initial_window_size),
            (setting::MAX_FRAME_SIZE, s.max_frame_size),
            (setting::MAX_HEADER_LIST_SIZE, s.max_header_list_size),
        ];
        if s.header_table_size != hpack::DEFAULT_TABLE_SIZE as u32 {
            params.push((setting::HEADER_TABLE_SIZE, s.header_table_size));
        }
        frame::write_settings(&mut output, &params);
        let extra = s.connection_window_size.saturating_sub(DEFAULT_WINDOW);
        if extra > 0 {
            frame::write_window_update(&mut output, 0, extra);
        }
        // Until our SETTINGS are acknowledged the peer may use the protocol's defaults.
        let table = (s.header_table_size as usize).max(hpack::DEFAULT_TABLE_SIZE);
        ServerConnection {
            phase: Phase::Preface,
            error: None,
            input: Vec::new(),
            output,
            events: VecDeque::new(),
            decoder: hpack::Decoder::new(table),
            encoder: hpack::Encoder::new(),
            streams: HashMap::new(),
            last_peer_stream: 0,
            pending_block: None,
            settings_acked: false,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame_size: frame::MIN_MAX_FRAME_SIZE,
            conn_send_window: i64::from(DEFAULT_WINDOW),
            conn_recv_window: i64::from(s.connection_window_size),
            conn_recv_unacked: 0,
            goaway_last: None,
            budgets: Budgets::default(),
            settings: s,
        }
    }

    /// The settings in force (after clamping to the protocol's ranges).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Feeds bytes read from the peer. On `Err` the connection is over: a
    /// GOAWAY with the error's code is queued; flush `poll_transmit` and close.
    pub fn recv(&mut self, bytes: &[u8], now: Instant) -> Result<(), ConnectionError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.phase == Phase::Closed {
            return Ok(());
        }
        self.input.extend_from_slice(bytes);
        let input = std::mem::take(&mut self.input);
        let result = self.process(&input, now);
        let used = match result {
            Ok(used) => used,
            Err(e) => {
                return Err(self.fail(e));
            }
        };
        let mut input = input;
        input.drain(..used.min(input.len()));
        // Give back a large allocation once the partial frame is small.
        if input.capacity() > 64 * 1024 && input.len() < 16 * 1024 {
            input.shrink_to(16 * 1024);
        }
        self.input = input;
        Ok(())
    }

    fn process(&mut self, input: &[u8], now: Instant) -> Result<usize, (ErrorCode, Violation)> {
        let mut pos = 0usize;
        loop {
            if self.phase == Phase::Closed {
                return Ok(pos);
            }
            let rest = input.get(pos..).unwrap_or(&[]);
            if self.phase == Phase::Preface {
                let n = rest.len().min(frame::PREFACE.len());
                if rest.get(..n) != frame::PREFACE.get(..n) {
                    return Err((ErrorCode::PROTOCOL_ERROR, Violation::BadPreface));
                }
                if n < frame::PREFACE.len() {
                    return Ok(pos);
                }
                pos = pos.saturating_add(n);
                self.phase = Phase::FirstSettings;
                continue;
            }
            match frame::parse(rest, self.settings.max_frame_size) {
                Ok(None) => return Ok(pos),
                Ok(Some((f, n))) => {
                    if self.phase == Phase::FirstSettings {
                        if !matches!(f, Frame::Settings { ack: false, .. }) {
                            return Err((
                                ErrorCode::PROTOCOL_ERROR,
                                Violation::FirstFrameNotSettings,
                            ));
                        }
                        self.phase = Phase::Open;
                    }
                    self.handle(f, now)?;
                    pos = pos.saturating_add(n);
                }
                Err(FrameError {
                    code,
                    kind,
                    stream: Some(stream),
                    len,
                }) if self.phase == Phase::Open && self.pending_block.is_none() => {
                    if kind == FrameErrorKind::ZeroIncrement && stream > self.last_peer_stream {
                        let kind = "WINDOW_UPDATE";
                        return Err((
                            ErrorCode::PROTOCOL_ERROR,
                            Violation::IdleStream { kind, stream },
                        ));
                    }
                    self.stream_error(stream, code, now)?;
                    pos = pos.saturating_add(len);
                }
                Err(e) => return Err((e.code, Violation::Frame(e.kind))),
            }
        }
    }

    /// Records a connection error: GOAWAY queued, state closed.
    fn fail(&mut self, (code, violation): (ErrorCode, Violation)) -> ConnectionError {
        let e = ConnectionError { code, violation };
        if self.phase != Phase::Preface {
            let debug = e.violation.to_string();
            frame::write_goaway(
                &mut self.output,
                self.last_peer_stream,
                code,
                debug.as_bytes(),
            );
        }
        self.phase = Phase::Closed;
        self.streams.clear();
        self.pending_block = None;
        self.input = Vec::new();
        self.error = Some(e.clone());
        e
    }

    fn spend(&mut self, which: Flood, now: Instant) -> Result<(), (ErrorCode, Violation)> {
        let l = &self.settings.limits;
        let (budget, max) = match which {
            Flood::Resets => (&mut self.budgets.resets, l.max_peer_resets),
            Flood::StreamErrors => (&mut self.budgets.stream_errors, l.max_stream_errors),
            Flood::Settings => (&mut self.budgets.settings, l.max_settings),
            Flood::Pings => (&mut self.budgets.pings, l.max_pings),
            Flood::EmptyFrames => (&mut self.budgets.empty, l.max_empty_frames),
        };
        if budget.spend(now, l.window, max) {
            Ok(())
        } else {
            Err((ErrorCode::ENHANCE_YOUR_CALM, Violation::Flood(which)))
        }
    }

    /// Control output is about to be queued: refuse a peer that makes us queue without reading.
    fn check_backlog(&self) -> Result<(), (ErrorCode, Violation)> {
        if self.output.len() > self.settings.limits.max_pending_output {
            return Err((ErrorCode::ENHANCE_YOUR_CALM, Violation::OutputBacklog));
        }
        Ok(())
    }

    /// A stream error caused by the peer: RST_STREAM, the stream forgotten, counted.
    fn stream_error(
        &mut self,
        stream: u32,
        code: ErrorCode,
        now: Instant,
    ) -> Result<(), (ErrorCode, Violation)> {
        self.spend(Flood::StreamErrors, now)?;
        self.check_backlog()?;
        frame::write_rst_stream(&mut self.output, stream, code);
        if self.streams.remove(&stream).is_some() {
            self.events.push_back(Event::Reset {
                stream,
                code,
                remote: false,
            });
        }
        Ok(())
    }

    fn handle(&mut self, f: Frame<'_>, now: Instant) -> Result<(), (ErrorCode, Violation)> {
        if let Some(p) = &self.pending_block {
            let stream = p.stream;
            match f {
                Frame::Continuation { stream: s, .. } if s == stream => {}
                _ => {
                    return Err((
                        ErrorCode::PROTOCOL_ERROR,
                        Violation::ExpectedContinuation(stream),
                    ))
                }
            }
        }
        match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(stream, end_stream, data, flow_len, now),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                fragment,
                ..
            } => {
                if stream % 2 == 0 {
                    return Err((ErrorCode::PROTOCOL_ERROR, Violation::EvenStream(stream)));
                }
                if end_headers {
                    return self.on_header_block(stream, end_stream, fragment, now);
                }
                if fragment.is_empty() {
                    self.spend(Flood::EmptyFrames, now)?;
                }
                self.check_block_size(fragment.len())?;
                self.pending_block = Some(PendingBlock {
                    stream,
                    end_stream,
                    block: fragment.to_vec(),
                });
                Ok(())
            }
            Frame::Continuation {
                end_headers,
                fragment,
                ..
            } => {
                let Some(mut p) = self.pending_block.take() else {
                    return Err((ErrorCode::PROTOCOL_ERROR, Violation::UnexpectedContinuation));
                };
                if fragment.is_empty() && !end_headers {
                    self.spend(Flood::EmptyFrames, now)?;
                }
                self.check_block_size(p.block.len().saturating_add(fragment.len()))?;
                p.block.extend_from_slice(fragment);
                if end_headers {
                    self.on_header_block(p.stream, p.end_stream, &p.block, now)
                } else {
                    self.pending_block = Some(p);
                    Ok(())
                }
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => Ok(()),
            Frame::RstStream { stream, code } => {
                if stream > self.last_peer_stream {
                    return Err((
                        ErrorCode::PROTOCOL_ERROR,
                        Violation::IdleStream {
                            kind: "RST_STREAM",
                            stream,
                        },
                    ));
                }
                self.spend(Flood::Resets, now)?;
                if self.streams.remove(&stream).is_some() {
                    self.events.push_back(Event::Reset {
                        stream,
                        code,
                        remote: true,
                    });
                }
                Ok(())
            }
            Frame::Settings { ack: true, .. } => {
                if !self.settings_acked {
                    self.settings_acked = true;
                    self.decoder
                        .set_max_allowed(self.settings.header_table_size as usize);
                }
                Ok(())
            }
            Frame::Settings { ack: false, params } => {
                self.spend(Flood::Settings, now)?;
                for (id, value) in params.iter() {
                    self.apply_setting(id, value)?;
                }
                self.check_backlog()?;
                frame::write_settings_ack(&mut self.output);
                Ok(())
            }
            Frame::PushPromise { .. } => Err((ErrorCode::PROTOCOL_ERROR, Violation::PushPromise)),
            Frame::Ping { ack: true, .. } => Ok(()),
            Frame::Ping { ack: false, data } => {
                self.spend(Flood::Pings, now)?;
                self.check_backlog()?;
                frame::write_ping(&mut self.output, data, true);
                Ok(())
            }
            Frame::GoAway {
                last_stream, code, ..
            } => {
                self.events.push_back(Event::GoAway { last_stream, code });
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                self.on_window_update(stream, increment, now)
            }
            // Frame is non_exhaustive for users; every variant is handled above.
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    fn check_block_size(&self, len: usize) -> Result<(), (ErrorCode, Violation)> {
        let max = self.settings.max_header_list_size;
        if len > max as usize {
            return Err((
                ErrorCode::ENHANCE_YOUR_CALM,
                Violation::HeaderBlockTooLarge(max),
            ));
        }
        Ok(())
    }

    fn apply_setting(&mut self, id: u16, value: u32) -> Result<(), (ErrorCode, Violation)> {
        let bad = |code| Err((code, Violation::BadSetting { id, value }));
        match id {
            setting::HEADER_TABLE_SIZE => self.encoder.set_peer_max_table_size(value as usize),
            setting::ENABLE_PUSH | setting::ENABLE_CONNECT_PROTOCOL if value > 1 => {
                return bad(ErrorCode::PROTOCOL_ERROR)
            }
            setting::INITIAL_WINDOW_SIZE => {
                if value > MAX_WINDOW {
                    return bad(ErrorCode::FLOW_CONTROL_ERROR);
                }
                let delta = i64::from(value).saturating_sub(i64::from(self.peer_initial_window));
                self.peer_initial_window = value;
                let mut overflow = None;
                for (&id, s) in self.streams.iter_mut() {
                    let was = s.send_window;
                    s.send_window = s.send_window.saturating_add(delta);
                    if s.send_window > i64::from(MAX_WINDOW) {
                        overflow = Some(id);
                    }
                    if was <= 0 && s.send_window > 0 && s.blocked && self.conn_send_window > 0 {
                        s.blocked = false;
                        self.events.push_back(Event::SendReady { stream: id });
                    }
                }
                if let Some(id) = overflow {
                    return Err((ErrorCode::FLOW_CONTROL_ERROR, Violation::WindowOverflow(id)));
                }
            }
            setting::MAX_FRAME_SIZE => {
                if !(frame::MIN_MAX_FRAME_SIZE..=frame::MAX_MAX_FRAME_SIZE).contains(&value) {
                    return bad(ErrorCode::PROTOCOL_ERROR);
                }
                self.peer_max_frame_size = value;
            }
            // MAX_CONCURRENT_STREAMS limits pushes (never sent); MAX_HEADER_LIST_SIZE is
            // advisory; unknown parameters are ignored (§6.5.2).
            _ => {}
        }
        Ok(())
    }

    fn on_data(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: &[u8],
        flow_len: u32,
        now: Instant,
    ) -> Result<(), (ErrorCode, Violation)> {
        if stream > self.last_peer_stream {
            return Err((
                ErrorCode::PROTOCOL_ERROR,
                Violation::IdleStream {
                    kind: "DATA",
                    stream,
                },
            ));
        }
        let flow = i64::from(flow_len);
        if flow > self.conn_recv_window {
            return Err((
                ErrorCode::FLOW_CONTROL_ERROR,
                Violation::ConnectionWindowExceeded,
            ));
        }
        self.conn_recv_window = self.conn_recv_window.saturating_sub(flow);
        if flow_len == 0 && !end_stream {
            self.spend(Flood::EmptyFrames, now)?;
        }
        let padding = flow_len.saturating_sub(u32::try_from(data.len()).unwrap_or(u32::MAX));
        let Some(s) = self.streams.get_mut(&stream) else {
            // Closed (or reset) stream: frames in flight are ignored, their bytes credited back.
            self.release_connection(flow_len);
            return Ok(());
        };
        if s.recv_closed {
            self.release_connection(flow_len);
            return self.stream_error(stream, ErrorCode::STREAM_CLOSED, now);
        }
        if flow > s.recv_window {
            self.release_connection(flow_len);
            return self.stream_error(stream, ErrorCode::FLOW_CONTROL_ERROR, now);
        }
        s.recv_window = s.recv_window.saturating_sub(flow);
        s.received = s.received.saturating_add(data.len() as u64);
        let length_wrong = match s.content_length {
            Some(cl) => s.received > cl || (end_stream && s.received != cl),
            None => false,
        };
        if length_wrong {
            self.release_connection(flow_len);
            return self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now);
        }
        // The response is complete: the rest of the body is read and dropped.
        let discard = s.send_closed;
        // Padding is never handed to the service: its window comes back at once.
        let unseen = if discard { flow_len } else { padding };
        if unseen > 0 {
            self.release_capacity(stream, unseen);
        }
        if end_stream {
            if let Some(s) = self.streams.get_mut(&stream) {
                s.recv_closed = true;
            }
        }
        if !discard && (!data.is_empty() || end_stream) {
            self.events.push_back(Event::Data {
                stream,
                data: data.to_vec(),
                end_stream,
            });
        }
        self.remove_if_done(stream);
        Ok(())
    }

    fn on_window_update(
        &mut self,
        stream: u32,
        increment: u32,
        now: Instant,
    ) -> Result<(), (ErrorCode, Violation)> {
        if stream == 0 {
            let was = self.conn_send_window;
            self.conn_send_window = self.conn_send_window.saturating_add(i64::from(increment));
            if self.conn_send_window > i64::from(MAX_WINDOW) {
                return Err((ErrorCode::FLOW_CONTROL_ERROR, Violation::WindowOverflow(0)));
            }
            if was <= 0 && self.conn_send_window > 0 {
                let mut ready: Vec<u32> = self
                    .streams
                    .iter_mut()
                    .filter(|(_, s)| s.blocked && s.send_window > 0)
                    .map(|(&id, s)| {
                        s.blocked = false;
                        id
                    })
                    .collect();
                ready.sort_unstable();
                self.events
                    .extend(ready.into_iter().map(|stream| Event::SendReady { stream }));
            }
            return Ok(());
        }
        if stream > self.last_peer_stream {
            return Err((
                ErrorCode::PROTOCOL_ERROR,
                Violation::IdleStream {
                    kind: "WINDOW_UPDATE",
                    stream,
                },
            ));
        }
        let conn_open = self.conn_send_window > 0;
        let Some(s) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let was = s.send_window;
        s.send_window = s.send_window.saturating_add(i64::from(increment));
        if s.send_window > i64::from(MAX_WINDOW) {
            return self.stream_error(stream, ErrorCode::FLOW_CONTROL_ERROR, now);
        }
        if was <= 0 && s.send_window > 0 && s.blocked && conn_open {
            s.blocked = false;
            self.events.push_back(Event::SendReady { stream });
        }
        Ok(())
    }

    fn on_header_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: &[u8],
        now: Instant,
    ) -> Result<(), (ErrorCode, Violation)> {
        // Always decoded, so the HPACK context stays in step even for refused streams.
        let decoded = self
            .decoder
            .decode(block, self.settings.max_header_list_size as usize)
            .map_err(|e| (ErrorCode::COMPRESSION_ERROR, Violation::Hpack(e)))?;
        if let Some(s) = self.streams.get_mut(&stream) {
            // Trailers: only on a stream still receiving, and they end it.
            if s.recv_closed {
                return self.stream_error(stream, ErrorCode::STREAM_CLOSED, now);
            }
            let cl_wrong = s.content_length.is_some_and(|cl| cl != s.received);
            if !end_stream || decoded.oversized || cl_wrong {
                return self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now);
            }
            match validate_fields(&decoded.fields, false) {
                Ok(Validated { headers, .. }) => {
                    s.recv_closed = true;
                    self.events.push_back(Event::Trailers { stream, headers });
                    self.remove_if_done(stream);
                    Ok(())
                }
                Err(()) => self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now),
            }
        } else if stream <= self.last_peer_stream {
            if stream == self.last_peer_stream {
                Err((
                    ErrorCode::STREAM_CLOSED,
                    Violation::HeadersOnClosedStream(stream),
                ))
            } else {
                Err((
                    ErrorCode::PROTOCOL_ERROR,
                    Violation::StreamIdNotIncreasing {
                        stream,
                        last: self.last_peer_stream,
                    },
                ))
            }
        } else {
            self.last_peer_stream = stream;
            if self.goaway_last.is_some_and(|last| stream > last) {
                // Draining: new streams are refused (the client may retry elsewhere).
                self.check_backlog()?;
                frame::write_rst_stream(&mut self.output, stream, ErrorCode::REFUSED_STREAM);
                return Ok(());
            }
            if self.streams.len() >= self.settings.max_concurrent_streams as usize {
                return self.stream_error(stream, ErrorCode::REFUSED_STREAM, now);
            }
            if decoded.oversized {
                // 431 Request Header Fields Too Large, then the stream is done.
                self.spend(Flood::StreamErrors, now)?;
                self.check_backlog()?;
                let mut block = Vec::new();
                self.encoder
                    .encode([(&b":status"[..], &b"431"[..])], &mut block);
                frame::write_headers(
                    &mut self.output,
                    stream,
                    &block,
                    true,
                    self.peer_max_frame_size,
                );
                if !end_stream {
                    frame::write_rst_stream(&mut self.output, stream, ErrorCode::NO_ERROR);
                }
                return Ok(());
            }
            let Ok(v) = validate_fields(&decoded.fields, true) else {
                return self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now);
            };
            let Some(head) = v.into_request() else {
                return self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now);
            };
            if end_stream && head.content_length.is_some_and(|cl| cl != 0) {
                return self.stream_error(stream, ErrorCode::PROTOCOL_ERROR, now);
            }
            self.streams.insert(
                stream,
                Stream {
                    recv_closed: end_stream,
                    send_closed: false,
                    headers_sent: false,
                    send_window: i64::from(self.peer_initial_window),
                    recv_window: i64::from(self.recv_initial_window()),
                    recv_unacked: 0,
                    blocked: false,
                    content_length: head.content_length,
                    received: 0,
                },
            );
            self.events.push_back(Event::Request {
                stream,
                head,
                end_stream,
            });
            if stream == MAX_STREAM_ID && self.goaway_last.is_none() {
                // The client's stream ids are used up: it must open a new connection.
                self.goaway(true);
            }
            Ok(())
        }
    }

    /// The receive window a new stream gets: ours once acknowledged, until
    /// then the larger of ours and the protocol default the peer may still assume.
    fn recv_initial_window(&self) -> u32 {
        if self.settings_acked {
            self.settings.initial_window_size
        } else {
            self.settings.initial_window_size.max(DEFAULT_WINDOW)
        }
    }

    fn remove_if_done(&mut self, stream: u32) {
        if self
            .streams
            .get(&stream)
            .is_some_and(|s| s.recv_closed && s.send_closed)
        {
            self.streams.remove(&stream);
        }
    }

    fn release_connection(&mut self, n: u32) {
        self.conn_recv_window = self.conn_recv_window.saturating_add(i64::from(n));
        self.conn_recv_unacked = self.conn_recv_unacked.saturating_add(n);
        if self.conn_recv_unacked >= self.settings.connection_window_size / 2
            && self.phase != Phase::Closed
        {
            frame::write_window_update(&mut self.output, 0, self.conn_recv_unacked);
            self.conn_recv_unacked = 0;
        }
    }

    /// The service consumed `n` bytes of request body on `stream`: the
    /// connection window (and the stream's, while it still receives) reopen,
    /// with WINDOW_UPDATE sent once half a window is owed. Call it for every
    /// [`Event::Data`], also after the stream was reset.
    pub fn release_capacity(&mut self, stream: u32, n: u32) {
        if n == 0 || self.phase == Phase::Closed {
            return;
        }
        self.release_connection(n);
        let target = self.settings.initial_window_size;
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.recv_closed {
                return;
            }
            s.recv_window = s.recv_window.saturating_add(i64::from(n));
            s.recv_unacked = s.recv_unacked.saturating_add(n);
            if s.recv_unacked >= target / 2 {
                frame::write_window_update(&mut self.output, stream, s.recv_unacked);
                s.recv_unacked = 0;
            }
        }
    }

    /// Sends the response head (`:status` then `headers`, names lowercased;
    /// connection-specific fields such as `connection` and
    /// `transfer-encoding` are dropped, as HTTP/2 forbids them). A 1xx head
    /// may precede the final one.
    pub fn send_headers(
        &mut self,
        stream: u32,
        status: u16,
        headers: &[(&[u8], &[u8])],
        end_stream: bool,
    ) -> Result<(), SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::ConnectionClosed);
        }
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.send_closed)
            .ok_or(SendError::StreamClosed(stream))?;
        if s.headers_sent {
            return Err(SendError::HeadersSent(stream));
        }
        let informational = (100..200).contains(&status);
        if !informational {
            s.headers_sent = true;
        }
        let status = status.to_string();
        let lower: Vec<(Vec<u8>, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), *v))
            .filter(|(n, _)| !is_connection_specific(n))
            .collect();
        let fields = std::iter::once((&b":status"[..], status.as_bytes()))
            .chain(lower.iter().map(|(n, v)| (n.as_slice(), *v)));
        let mut block = Vec::new();
        self.encoder.encode(fields, &mut block);
        let end = end_stream && !informational;
        frame::write_headers(
            &mut self.output,
            stream,
            &block,
            end,
            self.peer_max_frame_size,
        );
        if end {
            s.send_closed = true;
            self.remove_if_done(stream);
        }
        Ok(())
    }

    /// How many body bytes `send_data` would accept on `stream` now: the
    /// smaller of the stream's and the connection's send windows and the
    /// room left under [`Limits::max_pending_output`].
    pub fn send_capacity(&self, stream: u32) -> usize {
        let Some(s) = self.streams.get(&stream) else {
            return 0;
        };
        let room = self
            .settings
            .limits
            .max_pending_output
            .saturating_sub(self.output.len());
        let window = s.send_window.min(self.conn_send_window).max(0);
        usize::try_from(window).unwrap_or(0).min(room)
    }

    /// Sends body bytes, as many as [`send_capacity`](Self::send_capacity)
    /// allows, in frames of the peer's SETTINGS_MAX_FRAME_SIZE; returns how
    /// many were taken (0 when a window is closed: wait for
    /// [`Event::SendReady`]). `end_stream` applies only if every byte was
    /// taken; an empty `data` with `end_stream` just ends the stream. After
    /// a complete response, request body still coming is discarded (no
    /// events, windows reopened at once) until the peer ends it, as nginx
    /// does: curl 7.88 reports an RST_STREAM NO_ERROR (§8.1) as a failure.
    pub fn send_data(
        &mut self,
        stream: u32,
        data: &[u8],
        end_stream: bool,
    ) -> Result<usize, SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::ConnectionClosed);
        }
        let cap = self.send_capacity(stream);
        let max_frame = self.peer_max_frame_size as usize;
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.send_closed)
            .ok_or(SendError::StreamClosed(stream))?;
        if !s.headers_sent {
            return Err(SendError::HeadersNotSent(stream));
        }
        let n = data.len().min(cap);
        let (taken, _) = data.split_at(n);
        let end = end_stream && n == data.len();
        if taken.is_empty() && end {
            frame::write_data(&mut self.output, stream, &[], true);
        }
        let mut chunks = taken.chunks(max_frame.max(1)).peekable();
        while let Some(chunk) = chunks.next() {
            frame::write_data(
                &mut self.output,
                stream,
                chunk,
                end && chunks.peek().is_none(),
            );
        }
        let sent = i64::try_from(n).unwrap_or(i64::MAX);
        s.send_window = s.send_window.saturating_sub(sent);
        self.conn_send_window = self.conn_send_window.saturating_sub(sent);
        if n < data.len() {
            s.blocked = true;
        }
        if end {
            s.send_closed = true;
            self.remove_if_done(stream);
        }
        Ok(n)
    }

    /// Starts one DATA frame whose payload the caller sends itself (a file region that the
    /// transport writes with `sendfile`), and returns its length: at most `len`, the stream's
    /// and the connection's send windows (charged here) and the peer's
    /// SETTINGS_MAX_FRAME_SIZE; 0 when a window is closed (wait for
    /// [`Event::SendReady`]). Only the 9-byte frame header is queued: the caller must send
    /// exactly that many payload bytes right after what the next
    /// [`poll_transmit`](Self::poll_transmit) hands out, before any later output of this
    /// connection. `end_stream` applies only if the frame takes all of `len`; a `len` of 0
    /// with `end_stream` just ends the stream.
    pub fn send_data_header(
        &mut self,
        stream: u32,
        len: u64,
        end_stream: bool,
    ) -> Result<usize, SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::ConnectionClosed);
        }
        let max_frame = (self.peer_max_frame_size as usize).max(1);
        let conn_window = self.conn_send_window;
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.send_closed)
            .ok_or(SendError::StreamClosed(stream))?;
        if !s.headers_sent {
            return Err(SendError::HeadersNotSent(stream));
        }
        let window = usize::try_from(s.send_window.min(conn_window).max(0)).unwrap_or(0);
        let want = usize::try_from(len).unwrap_or(usize::MAX);
        let n = want.min(window).min(max_frame);
        let end = end_stream && n == want;
        if n == 0 && !end {
            s.blocked = true;
            return Ok(0);
        }
        frame::write_data_header(
            &mut self.output,
            stream,
            u32::try_from(n).unwrap_or(u32::MAX),
            end,
        );
        let sent = i64::try_from(n).unwrap_or(i64::MAX);
        s.send_window = s.send_window.saturating_sub(sent);
        self.conn_send_window = self.conn_send_window.saturating_sub(sent);
        if n < want && n < max_frame {
            // The window, not the frame size, cut it short.
            s.blocked = true;
        }
        if end {
            s.send_closed = true;
            self.remove_if_done(stream);
        }
        Ok(n)
    }

    /// Resets `stream` with `code` (e.g. CANCEL, INTERNAL_ERROR); no event follows.
    pub fn reset(&mut self, stream: u32, code: ErrorCode) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.streams.remove(&stream).is_some() {
            frame::write_rst_stream(&mut self.output, stream, code);
        }
    }

    /// Sends GOAWAY. Graceful: streams already opened finish, new ones are
    /// refused, and [`is_closed`](Self::is_closed) turns true once the last
    /// one ends. Not graceful: every stream is dropped at once.
    pub fn goaway(&mut self, graceful: bool) {
        if self.phase == Phase::Closed {
            return;
        }
        if graceful {
            if self.goaway_last.is_none() {
                self.goaway_last = Some(self.last_peer_stream);
                frame::write_goaway(
                    &mut self.output,
                    self.last_peer_stream,
                    ErrorCode::NO_ERROR,
                    b"",
                );
            }
        } else {
            frame::write_goaway(
                &mut self.output,
                self.last_peer_stream,
                ErrorCode::NO_ERROR,
                b"",
            );
            self.streams.clear();
            self.phase = Phase::Closed;
        }
    }

    /// The next event for the service.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Moves every queued output byte to `out`; true if there were any.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.output.is_empty() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut self.output);
        } else {
            out.append(&mut self.output);
        }
        true
    }

    /// Bytes queued for sending.
    pub fn pending_output(&self) -> usize {
        self.output.len()
    }

    /// Bytes of a partial frame held until the rest arrives (at most
    /// 9 + `max_frame_size`, or the 24-byte preface).
    pub fn buffered_input(&self) -> usize {
        self.input.len()
    }

    /// Streams currently open or half-closed.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The connection is over: closed for an error or a hard GOAWAY, or
    /// drained after a graceful one. Flush `poll_transmit`, then close.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed || (self.goaway_last.is_some() && self.streams.is_empty())
    }

    /// The error that closed the connection, if one did.
    pub fn error(&self) -> Option<&ConnectionError> {
        self.error.as_ref()
    }
}

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2).
fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}

/// A field name per RFC 9110 token rules, lowercase only (RFC 9113 §8.2.1).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// A field value: no NUL, CR or LF, no leading or trailing whitespace (§8.2.1).
fn valid_value(value: &[u8]) -> bool {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    !value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
        && !value.first().is_some_and(ws)
        && !value.last().is_some_and(ws)
}

#[derive(Default)]
struct Validated {
    method: Option<String>,
    scheme: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    protocol: Option<String>,
    headers: Vec<Header>,
    content_length: Option<u64>,
}

impl Validated {
    fn into_request(self) -> Option<RequestHead> {
        let method = self.method?;
        let connect = method == "CONNECT";
        if connect && self.protocol.is_none() {
            // Plain CONNECT: only :method and :authority (§8.5).
            if self.scheme.is_some() || self.path.is_some() || self.authority.is_none() {
                return None;
            }
        } else {
            self.scheme.as_ref()?;
            let path = self.path.as_ref()?;
            if path.is_empty() || (self.protocol.is_some() && !connect) {
                return None;
            }
        }
        Some(RequestHead {
            method,
            scheme: self.scheme,
            authority: self.authority,
            path: self.path,
            protocol: self.protocol,
            headers: self.headers,
            content_length: self.content_length,
        })
    }
}

/// Checks a request's (or trailers', with `pseudo_allowed` false) fields:
/// pseudo-fields known, first and once; names lowercase tokens; values clean;
/// no connection-specific fields; `te` only `trailers`; one content-length.
fn validate_fields(fields: &[HeaderField], pseudo_allowed: bool) -> Result<Validated, ()> {
    let mut v = Validated::default();
    let mut regular_seen = false;
    let mut cookies: Vec<u8> = Vec::new();
    for f in fields {
        if !valid_value(&f.value) {
            return Err(());
        }
        if let Some(pseudo) = f.name.strip_prefix(b":") {
            if !pseudo_allowed || regular_seen {
                return Err(());
            }
            let value = String::from_utf8(f.value.clone()).map_err(|_| ())?;
            let slot = match pseudo {
                b"method" => &mut v.method,
                b"scheme" => &mut v.scheme,
                b"authority" => &mut v.authority,
                b"path" => &mut v.path,
                b"protocol" => &mut v.protocol,
                _ => return Err(()),
            };
            if slot.replace(value).is_some() {
                return Err(());
            }
            continue;
        }
        regular_seen = true;
        if !valid_name(&f.name) || is_connection_specific(&f.name) {
            return Err(());
        }
        if f.name == b"te" && f.value != b"trailers" {
            return Err(());
        }
        if f.name == b"content-length" {
            let text = std::str::from_utf8(&f.value).map_err(|_| ())?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = text.parse().map_err(|_| ())?;
            if v.content_length.replace(n).is_some_and(|old| old != n) {
                return Err(());
            }
        }
        if f.name == b"cookie" {
            // Crumbs are joined for HTTP/1.1 semantics (§8.2.3).
            if !cookies.is_empty() {
                cookies.extend_from_slice(b"; ");
            }
            cookies.extend_from_slice(&f.value);
            continue;
        }
        let name = String::from_utf8(f.name.clone()).map_err(|_| ())?;
        v.headers.push(Header {
            name,
            value: f.value.clone(),
        });
    }
    if !cookies.is_empty() {
        v.headers.push(Header {
            name: "cookie".to_string(),
            value: cookies,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::frame::{flag, kind, write_frame, FrameHeader, HEADER_LEN, PREFACE};
    use proptest::prelude::*;

    /// A frame the server sent, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Out {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn split(mut buf: &[u8]) -> Vec<Out> {
        let mut v = Vec::new();
        while let Some(h) = FrameHeader::parse(buf) {
            let end = HEADER_LEN + h.length as usize;
            v.push(Out {
                kind: h.kind,
                flags: h.flags,
                stream: h.stream,
                payload: buf[HEADER_LEN..end].to_vec(),
            });
            buf = &buf[end..];
        }
        assert!(buf.is_empty(), "partial frame in output");
        v
    }

    /// The test's client: an HPACK encoder and a frame writer.
    struct Client {
        enc: hpack::Encoder,
        dec: hpack::Decoder,
        t0: Instant,
    }

    impl Client {
        fn new() -> Self {
            Client {
                enc: hpack::Encoder::new(),
                dec: hpack::Decoder::default(),
                t0: Instant::now(),
            }
        }

        fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
            let mut b = Vec::new();
            self.enc.encode(
                fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
                &mut b,
            );
            b
        }

        fn get(&mut self, stream: u32, path: &str) -> Vec<u8> {
            let block = self.block(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "example"),
            ]);
            let mut out = Vec::new();
            write_frame(
                &mut out,
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                stream,
                &block,
            );
            out
        }

        fn status(&mut self, f: &Out) -> String {
            let fields = self.dec.decode(&f.payload, 1 << 20).unwrap().fields;
            assert_eq!(fields[0].name, b":status");
            String::from_utf8(fields[0].value.clone()).unwrap()
        }
    }

    fn preface(settings: &[(u16, u32)]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        frame::write_settings(&mut out, settings);
        out
    }

    /// A connection past the preface (with the client's `settings`), its output drained.
    fn open_with(s: Settings, client_settings: &[(u16, u32)]) -> (ServerConnection, Client) {
        let c = Client::new();
        let mut conn = ServerConnection::new(s);
        conn.recv(&preface(client_settings), c.t0).unwrap();
        let mut out = Vec::new();
        conn.poll_transmit(&mut out);
        let frames = split(&out);
        assert!(frames
            .iter()
            .any(|f| f.kind == kind::SETTINGS && f.flags == flag::ACK));
        (conn, c)
    }

    fn open() -> (ServerConnection, Client) {
        open_with(Settings::default(), &[])
    }

    fn drain(conn: &mut ServerConnection) -> Vec<Out> {
        let mut out = Vec::new();
        conn.poll_transmit(&mut out);
        split(&out)
    }

    fn goaway_code(frames: &[Out]) -> Option<ErrorCode> {
        frames
            .iter()
            .find(|f| f.kind == kind::GOAWAY)
            .map(|f| ErrorCode(u32::from_be_bytes(f.payload[4..8].try_into().unwrap())))
    }

    fn rst_codes(frames: &[Out]) -> Vec<(u32, ErrorCode)> {
        frames
            .iter()
            .filter(|f| f.kind == kind::RST_STREAM)
            .map(|f| {
                (
                    f.stream,
                    ErrorCode(u32::from_be_bytes(f.payload[..4].try_into().unwrap())),
                )
            })
            .collect()
    }

    fn events(conn: &mut ServerConnection) -> Vec<Event> {
        std::iter::from_fn(|| conn.poll_event()).collect()
    }

    #[test]
    fn server_settings_then_ack_of_the_clients() {
        let mut conn = ServerConnection::new(Settings {
            initial_window_size: 1 << 20,
            ..Settings::default()
        });
        let frames = drain(&mut conn);
        assert_eq!(frames[0].kind, kind::SETTINGS);
        let mut raw = Vec::new();
        write_frame(
            &mut raw,
            frames[0].kind,
            frames[0].flags,
            0,
            &frames[0].payload,
        );
        let f = frame::parse(&raw, 16_384).unwrap().unwrap().0;
        let Frame::Settings { params, .. } = f else {
            panic!()
        };
        let params: Vec<_> = params.iter().collect();
        assert!(params.contains(&(setting::MAX_CONCURRENT_STREAMS, 128)));
        assert!(params.contains(&(setting::INITIAL_WINDOW_SIZE, 1 << 20)));
        assert!(params.contains(&(setting::MAX_FRAME_SIZE, 16_384)));
        assert!(params.contains(&(setting::MAX_HEADER_LIST_SIZE, 16_384)));
        assert!(params.contains(&(setting::ENABLE_PUSH, 0)));
        // The connection window is raised to 1 MiB.
        assert_eq!(frames[1].kind, kind::WINDOW_UPDATE);
        assert_eq!(
            u32::from_be_bytes(frames[1].payload[..].try_into().unwrap()),
            (1 << 20) - 65_535
        );
        // The preface split anywhere, then SETTINGS: one ACK.
        let t = Instant::now();
        let bytes = preface(&[(setting::MAX_FRAME_SIZE, 20_000)]);
        for b in bytes.chunks(5) {
            conn.recv(b, t).unwrap();
        }
        assert_eq!(
            drain(&mut conn),
            [Out {
                kind: kind::SETTINGS,
                flags: flag::ACK,
                stream: 0,
                payload: vec![]
            }]
        );
        // A SETTINGS ACK from the client, a PING: PING ACK with the same data.
        let mut b = Vec::new();
        frame::write_settings_ack(&mut b);
        frame::write_ping(&mut b, *b"pingpong", false);
        conn.recv(&b, t).unwrap();
        assert_eq!(
            drain(&mut conn),
            [Out {
                kind: kind::PING,
                flags: flag::ACK,
                stream: 0,
                payload: b"pingpong".to_vec()
            }]
        );
    }

    #[test]
    fn bad_preface_or_first_frame() {
        let t = Instant::now();
        let mut conn = ServerConnection::new(Settings::default());
        let e = conn.recv(b"GET / HTTP/1.1\r\n", t).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (ErrorCode::PROTOCOL_ERROR, Violation::BadPreface)
        );
        assert!(conn.is_closed());
        let mut conn = ServerConnection::new(Settings::default());
        let mut b = PREFACE.to_vec();
        frame::write_ping(&mut b, [0; 8], false);
        let e = conn.recv(&b, t).unwrap_err();
        assert_eq!(e.violation, Violation::FirstFrameNotSettings);
        assert_eq!(
            goaway_code(&drain(&mut conn)),
            Some(ErrorCode::PROTOCOL_ERROR)
        );
        // Bad SETTINGS values.
        for (id, value, code) in [
            (setting::ENABLE_PUSH, 2, ErrorCode::PROTOCOL_ERROR),
            (setting::MAX_FRAME_SIZE, 100, ErrorCode::PROTOCOL_ERROR),
            (
                setting::INITIAL_WINDOW_SIZE,
                1 << 31,
                ErrorCode::FLOW_CONTROL_ERROR,
            ),
        ] {
            let mut conn = ServerConnection::new(Settings::default());
            let e = conn.recv(&preface(&[(id, value)]), t).unwrap_err();
            assert_eq!(e.code, code);
        }
    }

    #[test]
    fn request_and_response() {
        let (mut conn, mut c) = open();
        let block = c.block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "example.org"),
            (":path", "/upload?x=1"),
            ("content-length", "5"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let mut b = Vec::new();
        write_frame(&mut b, kind::HEADERS, flag::END_HEADERS, 1, &block);
        frame::write_data(&mut b, 1, b"hel", false);
        frame::write_data(&mut b, 1, b"lo", true);
        conn.recv(&b, c.t0).unwrap();
        let ev = events(&mut conn);
        let Event::Request {
            stream: 1,
            head,
            end_stream: false,
        } = &ev[0]
        else {
            panic!("{ev:?}")
        };
        assert_eq!(head.method, "POST");
        assert_eq!(head.scheme.as_deref(), Some("https"));
        assert_eq!(head.authority.as_deref(), Some("example.org"));
        assert_eq!(head.path.as_deref(), Some("/upload?x=1"));
        assert_eq!(head.content_length, Some(5));
        assert_eq!(head.header("cookie"), Some(&b"a=1; b=2"[..]));
        assert_eq!(
            ev[1],
            Event::Data {
                stream: 1,
                data: b"hel".to_vec(),
                end_stream: false
            }
        );
        assert_eq!(
            ev[2],
            Event::Data {
                stream: 1,
                data: b"lo".to_vec(),
                end_stream: true
            }
        );
        conn.release_capacity(1, 5);
        conn.send_headers(
            1,
            200,
            &[(b"Content-Type", b"text/plain"), (b"connection", b"close")],
            false,
        )
        .unwrap();
        assert_eq!(conn.send_data(1, b"done", true), Ok(4));
        assert_eq!(conn.open_streams(), 0);
        let frames = drain(&mut conn);
        assert_eq!(frames[0].kind, kind::HEADERS);
        let fields = c.dec.decode(&frames[0].payload, 1 << 20).unwrap().fields;
        let pairs: Vec<_> = fields
            .iter()
            .map(|f| (f.name.as_slice(), f.value.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            [
                (&b":status"[..], &b"200"[..]),
                (b"content-type", b"text/plain")
            ]
        );
        assert_eq!(
            frames[1],
            Out {
                kind: kind::DATA,
                flags: flag::END_STREAM,
                stream: 1,
                payload: b"done".to_vec()
            }
        );
        // Sending on the finished stream is refused.
        assert_eq!(
            conn.send_data(1, b"x", true),
            Err(SendError::StreamClosed(1))
        );
    }

    #[test]
    fn input_cut_anywhere_gives_the_same_events() {
        let mut c = Client::new();
        let mut bytes = preface(&[]);
        bytes.extend(c.get(1, "/a"));
        let block = c.block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/b"),
            ("x-long", &"v".repeat(40_000)[..10_000]),
        ]);
        let (first, rest) = block.split_at(100);
        write_frame(
            &mut bytes,
            kind::HEADERS,
            flag::END_STREAM | flag::PADDED | flag::PRIORITY,
            3,
            &[&[4u8, 0, 0, 0, 1, 7][..], first, &[0; 4]].concat(),
        );
        for (i, chunk) in rest.chunks(3000).enumerate() {
            let last = (i + 1) * 3000 >= rest.len();
            write_frame(
                &mut bytes,
                kind::CONTINUATION,
                if last { flag::END_HEADERS } else { 0 },
                3,
                chunk,
            );
        }
        let all_at_once = {
            let mut conn = ServerConnection::new(Settings::default());
            conn.recv(&bytes, c.t0).unwrap();
            events(&mut conn)
        };
        assert_eq!(all_at_once.len(), 2);
        let Event::Request { head, .. } = &all_at_once[1] else {
            panic!()
        };
        assert_eq!(head.path.as_deref(), Some("/b"));
        assert_eq!(head.header("x-long").map(<[u8]>::len), Some(10_000));
        for step in [1, 7, 1000] {
            let mut conn = ServerConnection::new(Settings::default());
            for chunk in bytes.chunks(step) {
                conn.recv(chunk, c.t0).unwrap();
            }
            assert_eq!(events(&mut conn), all_at_once, "step {step}");
        }
    }

    #[test]
    fn continuation_must_follow_on_the_same_stream() {
        let (mut conn, mut c) = open();
        let block = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        let mut b = Vec::new();
        write_frame(&mut b, kind::HEADERS, flag::END_STREAM, 1, &block);
        frame::write_ping(&mut b, [0; 8], false);
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (
                ErrorCode::PROTOCOL_ERROR,
                Violation::ExpectedContinuation(1)
            )
        );
        let (mut conn, mut c) = open();
        let block = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        let mut b = Vec::new();
        write_frame(&mut b, kind::HEADERS, flag::END_STREAM, 1, &block);
        write_frame(&mut b, kind::CONTINUATION, flag::END_HEADERS, 3, &[]);
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().violation,
            Violation::ExpectedContinuation(1)
        );
        let (mut conn, c) = open();
        let mut b = Vec::new();
        write_frame(&mut b, kind::CONTINUATION, flag::END_HEADERS, 1, &[0x82]);
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().violation,
            Violation::UnexpectedContinuation
        );
    }

    #[test]
    fn stream_id_rules() {
        let (mut conn, mut c) = open();
        let e = conn.recv(&c.get(2, "/"), c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (ErrorCode::PROTOCOL_ERROR, Violation::EvenStream(2))
        );
        let (mut conn, mut c) = open();
        conn.recv(&c.get(5, "/"), c.t0).unwrap();
        let e = conn.recv(&c.get(3, "/"), c.t0).unwrap_err();
        assert_eq!(
            e.violation,
            Violation::StreamIdNotIncreasing { stream: 3, last: 5 }
        );
        // DATA or WINDOW_UPDATE on a stream never opened.
        let (mut conn, c) = open();
        let mut b = Vec::new();
        frame::write_data(&mut b, 1, b"x", false);
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().code,
            ErrorCode::PROTOCOL_ERROR
        );
        // HEADERS again on a stream that ended.
        let (mut conn, mut c) = open();
        conn.recv(&c.get(1, "/"), c.t0).unwrap();
        conn.reset(1, ErrorCode::CANCEL);
        assert_eq!(
            conn.recv(&c.get(1, "/"), c.t0).unwrap_err().code,
            ErrorCode::STREAM_CLOSED
        );
    }

    /// The client's ids run out at 2^31 - 1: that stream is served, the
    /// server asks it to move on (GOAWAY NO_ERROR, last = 2^31 - 1), and no
    /// id can follow (any other is not increasing: PROTOCOL_ERROR).
    #[test]
    fn stream_id_exhaustion() {
        let (mut conn, mut c) = open();
        conn.recv(&c.get(MAX_STREAM_ID, "/"), c.t0).unwrap();
        assert!(matches!(
            conn.poll_event(),
            Some(Event::Request {
                stream: MAX_STREAM_ID,
                ..
            })
        ));
        let frames = drain(&mut conn);
        assert_eq!(goaway_code(&frames), Some(ErrorCode::NO_ERROR));
        assert_eq!(frames[0].payload[..4], MAX_STREAM_ID.to_be_bytes());
        assert!(!conn.is_closed());
        conn.send_headers(MAX_STREAM_ID, 204, &[], true).unwrap();
        assert!(conn.is_closed());
        let (mut conn, mut c) = open();
        conn.recv(&c.get(MAX_STREAM_ID, "/"), c.t0).unwrap();
        let e = conn.recv(&c.get(1, "/"), c.t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::PROTOCOL_ERROR);
    }

    /// CVE-2023-44487: streams opened and reset in a loop. Up to
    /// `max_peer_resets` per window are served; one more is GOAWAY
    /// ENHANCE_YOUR_CALM. The same number spread over two windows is fine.
    #[test]
    fn rapid_reset_is_bounded() {
        let (mut conn, mut c) = open();
        let max = conn.settings().limits.max_peer_resets;
        let mut id = 1;
        for _ in 0..max {
            let mut b = c.get(id, "/");
            frame::write_rst_stream(&mut b, id, ErrorCode::CANCEL);
            conn.recv(&b, c.t0).unwrap();
            id += 2;
        }
        assert_eq!(conn.open_streams(), 0);
        let mut b = c.get(id, "/");
        frame::write_rst_stream(&mut b, id, ErrorCode::CANCEL);
        let e = conn.recv(&b, c.t0 + Duration::from_secs(9)).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (
                ErrorCode::ENHANCE_YOUR_CALM,
                Violation::Flood(Flood::Resets)
            )
        );
        assert_eq!(
            goaway_code(&drain(&mut conn)),
            Some(ErrorCode::ENHANCE_YOUR_CALM)
        );
        assert!(conn.is_closed());
        // Events say which streams went away.
        assert!(events(&mut conn).iter().any(|e| matches!(
            e,
            Event::Reset {
                stream: 1,
                remote: true,
                ..
            }
        )));

        let (mut conn, mut c) = open();
        let mut id = 1;
        for round in 0..3u64 {
            let now = c.t0 + Duration::from_secs(10 * round);
            for _ in 0..max {
                let mut b = c.get(id, "/");
                frame::write_rst_stream(&mut b, id, ErrorCode::CANCEL);
                conn.recv(&b, now).unwrap();
                id += 2;
            }
        }
    }

    /// CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION
    /// forever. The block held never passes `max_header_list_size`; once it
    /// would, GOAWAY ENHANCE_YOUR_CALM.
    #[test]
    fn continuation_flood_is_bounded() {
        let (mut conn, mut c) = open();
        let block = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        let mut b = Vec::new();
        write_frame(&mut b, kind::HEADERS, 0, 1, &block);
        conn.recv(&b, c.t0).unwrap();
        let mut sent = 0usize;
        let err = loop {
            let mut b = Vec::new();
            write_frame(&mut b, kind::CONTINUATION, 0, 1, &[0x82; 1000]);
            sent += 1000;
            match conn.recv(&b, c.t0) {
                Ok(()) => assert!(sent <= 16 * 1024, "still collecting after {sent} bytes"),
                Err(e) => break e,
            }
        };
        assert_eq!(
            (err.code, err.violation),
            (
                ErrorCode::ENHANCE_YOUR_CALM,
                Violation::HeaderBlockTooLarge(16 * 1024)
            )
        );
        assert!(sent <= 17 * 1024);
        assert_eq!(
            goaway_code(&drain(&mut conn)),
            Some(ErrorCode::ENHANCE_YOUR_CALM)
        );
        // Empty CONTINUATIONs are a flood of their own.
        let (mut conn, mut c) = open();
        let block = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        let mut b = Vec::new();
        write_frame(&mut b, kind::HEADERS, 0, 1, &block);
        for _ in 0..=conn.settings().limits.max_empty_frames {
            write_frame(&mut b, kind::CONTINUATION, 0, 1, &[]);
        }
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().violation,
            Violation::Flood(Flood::EmptyFrames)
        );
    }

    /// HPACK bomb through the connection: a 4 KB entry referenced 4,000
    /// times (an 8 KB block, 16 MB decoded) is answered 431 without
    /// copying past the limit; the connection keeps serving.
    #[test]
    fn hpack_bomb_gets_431_and_the_connection_carries_on() {
        let (mut conn, mut c) = open();
        let mut block = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        block.extend([0x40, 0x01, b'x']);
        hpack::write_integer(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'a', 4000));
        block.extend(std::iter::repeat_n(0xbe, 4000));
        let mut b = Vec::new();
        frame::write_headers(&mut b, 1, &block, true, 16_384);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(events(&mut conn), []);
        let frames = drain(&mut conn);
        assert_eq!(frames[0].kind, kind::HEADERS);
        assert_eq!(c.status(&frames[0]), "431");
        // The tables are still in step: a request using the client's table works.
        conn.recv(&c.get(3, "/next"), c.t0).unwrap();
        assert!(matches!(
            &events(&mut conn)[..],
            [Event::Request { stream: 3, .. }]
        ));
    }

    #[test]
    fn settings_ping_and_empty_data_floods() {
        let limits = Limits::default();
        type Make = fn(&mut Vec<u8>);
        let cases: [(&str, Make, u32, Flood); 3] = [
            (
                "settings",
                |b| frame::write_settings(b, &[]),
                limits.max_settings,
                Flood::Settings,
            ),
            (
                "ping",
                |b| frame::write_ping(b, [1; 8], false),
                limits.max_pings,
                Flood::Pings,
            ),
            (
                "empty data",
                |b| frame::write_data(b, 1, &[], false),
                limits.max_empty_frames,
                Flood::EmptyFrames,
            ),
        ];
        for (name, make, max, flood) in cases {
            let (mut conn, mut c) = open();
            let mut b = Vec::new();
            write_frame(
                &mut b,
                kind::HEADERS,
                flag::END_HEADERS,
                1,
                &c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]),
            );
            conn.recv(&b, c.t0).unwrap();
            // The client's own preface SETTINGS counted one already.
            let already = u32::from(flood == Flood::Settings);
            for i in already..max {
                let mut b = Vec::new();
                make(&mut b);
                conn.recv(&b, c.t0 + Duration::from_millis(u64::from(i)))
                    .unwrap_or_else(|e| panic!("{name} {i}: {e}"));
            }
            drain(&mut conn);
            let mut b = Vec::new();
            make(&mut b);
            let e = conn.recv(&b, c.t0 + Duration::from_secs(1)).unwrap_err();
            assert_eq!(
                (e.code, e.violation),
                (ErrorCode::ENHANCE_YOUR_CALM, Violation::Flood(flood)),
                "{name}"
            );
            assert_eq!(
                goaway_code(&drain(&mut conn)),
                Some(ErrorCode::ENHANCE_YOUR_CALM)
            );
            // Further input is refused with the same error, and nothing more is queued.
            assert!(conn.recv(&b, c.t0).is_err());
            assert_eq!(conn.pending_output(), 0);
        }
    }

    /// WINDOW_UPDATE with increment 0 on a stream is a stream error
    /// (RST_STREAM PROTOCOL_ERROR); a flood of them ends the connection.
    #[test]
    fn window_update_zero_flood() {
        let (mut conn, mut c) = open();
        let max = conn.settings().limits.max_stream_errors;
        let mut b = Vec::new();
        write_frame(
            &mut b,
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]),
        );
        frame::write_window_update(&mut b, 1, 0);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(
            rst_codes(&drain(&mut conn)),
            [(1, ErrorCode::PROTOCOL_ERROR)]
        );
        assert!(matches!(
            &events(&mut conn)[..],
            [
                Event::Request { .. },
                Event::Reset {
                    stream: 1,
                    remote: false,
                    ..
                }
            ]
        ));
        for _ in 1..max {
            let mut b = Vec::new();
            frame::write_window_update(&mut b, 1, 0);
            conn.recv(&b, c.t0).unwrap();
        }
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 1, 0);
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (
                ErrorCode::ENHANCE_YOUR_CALM,
                Violation::Flood(Flood::StreamErrors)
            )
        );
        // On stream 0 it is a connection error at once.
        let (mut conn, c) = open();
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 0, 0);
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().code,
            ErrorCode::PROTOCOL_ERROR
        );
    }

    /// A client that opens no window: `send_data` takes nothing and nothing
    /// is queued; WINDOW_UPDATEs let exactly their increments through, in
    /// frames of the peer's max frame size.
    #[test]
    fn zero_window_slow_reader() {
        let (mut conn, mut c) =
            open_with(Settings::default(), &[(setting::INITIAL_WINDOW_SIZE, 0)]);
        conn.recv(&c.get(1, "/big"), c.t0).unwrap();
        events(&mut conn);
        conn.send_headers(1, 200, &[(b"content-length", b"4194304")], false)
            .unwrap();
        drain(&mut conn);
        let file = vec![7u8; 4 << 20];
        for _ in 0..1000 {
            assert_eq!(conn.send_data(1, &file, true), Ok(0));
        }
        assert_eq!(conn.pending_output(), 0);
        assert_eq!(conn.send_capacity(1), 0);
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 1, 40_000);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(events(&mut conn), [Event::SendReady { stream: 1 }]);
        assert_eq!(conn.send_data(1, &file, true), Ok(40_000));
        let frames = drain(&mut conn);
        assert_eq!(
            frames.iter().map(|f| f.payload.len()).collect::<Vec<_>>(),
            [16_384, 16_384, 7_232]
        );
        assert!(frames.iter().all(|f| f.flags & flag::END_STREAM == 0));
        // The connection window (65,535) is the next bound.
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 1, 1 << 30);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(events(&mut conn), [Event::SendReady { stream: 1 }]);
        assert_eq!(
            conn.send_data(1, &file[40_000..], true),
            Ok(65_535 - 40_000)
        );
        assert_eq!(conn.send_data(1, &file, true), Ok(0));
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 0, 1 << 30);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(events(&mut conn), [Event::SendReady { stream: 1 }]);
        // Now the pending-output cap bounds what is queued while the caller does not drain.
        let mut total = 0;
        loop {
            let n = conn.send_data(1, &file[total..], true).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert!(conn.pending_output() <= conn.settings().limits.max_pending_output + 9 * 64);
        assert!(total < file.len());
    }

    /// A peer that asks for answers (PINGs) without reading them: past
    /// `max_pending_output` the connection closes instead of queuing.
    #[test]
    fn unread_output_is_bounded() {
        let limits = Limits {
            max_pings: u32::MAX,
            max_pending_output: 64 * 1024,
            ..Limits::default()
        };
        let (mut conn, c) = open_with(
            Settings {
                limits,
                ..Settings::default()
            },
            &[],
        );
        let mut b = Vec::new();
        for _ in 0..100_000 {
            frame::write_ping(&mut b, [2; 8], false);
        }
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (ErrorCode::ENHANCE_YOUR_CALM, Violation::OutputBacklog)
        );
        assert!(conn.pending_output() < 64 * 1024 + 200);
    }

    #[test]
    fn window_overflow_is_flow_control_error() {
        let (mut conn, mut c) = open();
        conn.recv(&c.get(1, "/"), c.t0).unwrap();
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 1, MAX_WINDOW);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(
            rst_codes(&drain(&mut conn)),
            [(1, ErrorCode::FLOW_CONTROL_ERROR)]
        );
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 0, MAX_WINDOW);
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (ErrorCode::FLOW_CONTROL_ERROR, Violation::WindowOverflow(0))
        );
        assert_eq!(
            goaway_code(&drain(&mut conn)),
            Some(ErrorCode::FLOW_CONTROL_ERROR)
        );
        // Through SETTINGS_INITIAL_WINDOW_SIZE on an open stream whose window grew.
        let (mut conn, mut c) = open();
        conn.recv(&c.get(1, "/"), c.t0).unwrap();
        let mut b = Vec::new();
        frame::write_window_update(&mut b, 1, MAX_WINDOW - 65_535);
        frame::write_settings(&mut b, &[(setting::INITIAL_WINDOW_SIZE, 65_536)]);
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(
            (e.code, e.violation),
            (ErrorCode::FLOW_CONTROL_ERROR, Violation::WindowOverflow(1))
        );
    }

    #[test]
    fn receive_windows_are_enforced_and_reopened() {
        let s = Settings {
            initial_window_size: 20_000,
            connection_window_size: 65_535,
            ..Settings::default()
        };
        let (mut conn, mut c) = open_with(s, &[]);
        let mut b = Vec::new();
        frame::write_settings_ack(&mut b);
        let post = c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]);
        write_frame(&mut b, kind::HEADERS, flag::END_HEADERS, 1, &post);
        frame::write_data(&mut b, 1, &[0; 16_000], false);
        conn.recv(&b, c.t0).unwrap();
        events(&mut conn);
        // Past the stream's 20,000: RST_STREAM FLOW_CONTROL_ERROR.
        let mut b = Vec::new();
        frame::write_data(&mut b, 1, &[0; 5_000], false);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(
            rst_codes(&drain(&mut conn)),
            [(1, ErrorCode::FLOW_CONTROL_ERROR)]
        );
        // The service releases what it was given, even for the reset stream.
        conn.release_capacity(1, 16_000);
        // Released capacity comes back as WINDOW_UPDATE on the stream and connection.
        let mut b = Vec::new();
        write_frame(
            &mut b,
            kind::HEADERS,
            flag::END_HEADERS,
            3,
            &c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]),
        );
        frame::write_data(&mut b, 3, &[0; 16_000], false);
        conn.recv(&b, c.t0).unwrap();
        conn.release_capacity(3, 16_000);
        let frames = drain(&mut conn);
        let updates: Vec<_> = frames
            .iter()
            .filter(|f| f.kind == kind::WINDOW_UPDATE)
            .map(|f| {
                (
                    f.stream,
                    u32::from_be_bytes(f.payload[..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(updates, [(0, 16_000 + 5_000 + 16_000), (3, 16_000)]);
        // Past the connection's window: FLOW_CONTROL_ERROR for the connection.
        // (Data the service holds, on five streams within their own windows.)
        let mut b = Vec::new();
        frame::write_data(&mut b, 3, &[0; 16_000], false);
        for id in [5, 7, 9, 11] {
            write_frame(
                &mut b,
                kind::HEADERS,
                flag::END_HEADERS,
                id,
                &c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]),
            );
            frame::write_data(&mut b, id, &[0; 16_000], false);
        }
        let e = conn.recv(&b, c.t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::FLOW_CONTROL_ERROR);
    }

    /// `send_data_header` frames a body the caller writes itself: frames no larger than the
    /// peer's max frame size, the windows charged (the stream stops at 65,535 and goes on after
    /// WINDOW_UPDATE), END_STREAM on the last, and the byte stream is valid HTTP/2.
    #[test]
    fn data_headers_for_caller_sent_payloads_respect_windows_and_frame_size() {
        let (mut conn, mut client) = open();
        let request = client.get(1, "/f");
        conn.recv(&request, Instant::now()).unwrap();
        let _ = events(&mut conn);
        conn.send_headers(1, 200, &[], false).unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Vec::new();
        let mut sent = 0usize;
        let send_all = |conn: &mut ServerConnection, sent: &mut usize, wire: &mut Vec<u8>| loop {
            let left = (body.len() - *sent) as u64;
            let n = conn.send_data_header(1, left, true).unwrap();
            conn.poll_transmit(wire);
            wire.extend_from_slice(&body[*sent..*sent + n]);
            *sent += n;
            if n == 0 || *sent == body.len() {
                break;
            }
        };
        send_all(&mut conn, &mut sent, &mut wire);
        assert_eq!(sent, 65_535, "the initial window");
        let mut update = Vec::new();
        frame::write_window_update(&mut update, 0, 65_535);
        frame::write_window_update(&mut update, 1, 65_535);
        conn.recv(&update, Instant::now()).unwrap();
        send_all(&mut conn, &mut sent, &mut wire);
        assert_eq!(sent, body.len());
        assert!(
            conn.send_data_header(1, 0, true).is_err(),
            "the stream ended"
        );
        let frames = split(&wire);
        let data: Vec<&Out> = frames.iter().filter(|f| f.kind == kind::DATA).collect();
        assert!(data.iter().all(|f| f.payload.len() <= 16_384));
        let got: Vec<u8> = data.iter().flat_map(|f| f.payload.clone()).collect();
        assert!(got == body);
        let ends: Vec<bool> = data
            .iter()
            .map(|f| f.flags & flag::END_STREAM != 0)
            .collect();
        assert_eq!(ends.iter().filter(|e| **e).count(), 1);
        assert_eq!(ends.last(), Some(&true));
    }

    #[test]
    fn graceful_goaway_finishes_in_flight_streams() {
        let (mut conn, mut c) = open();
        conn.recv(&c.get(1, "/a"), c.t0).unwrap();
        conn.goaway(true);
        let frames = drain(&mut conn);
        assert_eq!(goaway_code(&frames), Some(ErrorCode::NO_ERROR));
        assert_eq!(frames[0].payload[..4], 1u32.to_be_bytes());
        conn.recv(&c.get(3, "/b"), c.t0).unwrap();
        assert_eq!(
            rst_codes(&drain(&mut conn)),
            [(3, ErrorCode::REFUSED_STREAM)]
        );
        assert!(!conn.is_closed());
        conn.send_headers(1, 200, &[], false).unwrap();
        conn.send_data(1, b"ok", true).unwrap();
        assert!(conn.is_closed());
        assert_eq!(drain(&mut conn).len(), 2);
    }

    #[test]
    fn refused_and_malformed_requests() {
        let s = Settings {
            max_concurrent_streams: 1,
            ..Settings::default()
        };
        let (mut conn, mut c) = open_with(s, &[]);
        conn.recv(&c.get(1, "/"), c.t0).unwrap();
        conn.recv(&c.get(3, "/"), c.t0).unwrap();
        assert_eq!(
            rst_codes(&drain(&mut conn)),
            [(3, ErrorCode::REFUSED_STREAM)]
        );
        let bad: [&[(&str, &str)]; 7] = [
            &[(":method", "GET"), (":scheme", "http")],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("Upper", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("connection", "close"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("te", "gzip"),
            ],
            &[
                (":method", "GET"),
                ("a", "b"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":foo", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x", " padded"),
            ],
        ];
        let (mut conn, mut c) = open();
        let mut id = 1;
        for fields in bad {
            let mut b = Vec::new();
            write_frame(
                &mut b,
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                id,
                &c.block(fields),
            );
            conn.recv(&b, c.t0).unwrap();
            assert_eq!(
                rst_codes(&drain(&mut conn)),
                [(id, ErrorCode::PROTOCOL_ERROR)],
                "{fields:?}"
            );
            id += 2;
        }
        assert_eq!(events(&mut conn), []);
        // PUSH_PROMISE from a client.
        let mut b = Vec::new();
        write_frame(
            &mut b,
            kind::PUSH_PROMISE,
            flag::END_HEADERS,
            1,
            &[0, 0, 0, 2],
        );
        assert_eq!(
            conn.recv(&b, c.t0).unwrap_err().violation,
            Violation::PushPromise
        );
    }

    /// A response completed before the request body: RST_STREAM NO_ERROR
    /// after it, the stream slot is free, DATA still in flight is ignored
    /// (and credited back to the connection window).
    #[test]
    fn early_response_stops_the_upload() {
        let (mut conn, mut c) = open();
        let mut b = Vec::new();
        write_frame(
            &mut b,
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]),
        );
        conn.recv(&b, c.t0).unwrap();
        events(&mut conn);
        conn.send_headers(1, 405, &[], true).unwrap();
        let frames = drain(&mut conn);
        assert_eq!(frames.len(), 1);
        assert_eq!(conn.open_streams(), 1);
        // 10 MB through a 65,535-byte stream window: every frame's window comes back.
        for _ in 0..625 {
            let mut b = Vec::new();
            frame::write_data(&mut b, 1, &[0; 16_000], false);
            conn.recv(&b, c.t0).unwrap();
        }
        let mut b = Vec::new();
        frame::write_data(&mut b, 1, b"end", true);
        conn.recv(&b, c.t0).unwrap();
        assert_eq!(events(&mut conn), []);
        assert_eq!(conn.open_streams(), 0);
        let frames = drain(&mut conn);
        assert!(frames.iter().all(|f| f.kind == kind::WINDOW_UPDATE));
        let credited = |id| -> u64 {
            frames
                .iter()
                .filter(|f| f.stream == id)
                .map(|f| u64::from(u32::from_be_bytes(f.payload[..].try_into().unwrap())))
                .sum()
        };
        assert!(credited(1) >= 10_000_000 - 65_535);
        assert!(credited(0) >= 10_000_000 - (1 << 20));
    }

    #[test]
    fn peer_reset_and_goaway_are_events() {
        let (mut conn, mut c) = open();
        conn.recv(&c.get(1, "/"), c.t0).unwrap();
        let mut b = Vec::new();
        frame::write_rst_stream(&mut b, 1, ErrorCode::CANCEL);
        frame::write_goaway(&mut b, 0, ErrorCode::NO_ERROR, b"bye");
        write_frame(&mut b, 0xee, 0, 0, b"unknown frames are ignored");
        conn.recv(&b, c.t0).unwrap();
        let ev = events(&mut conn);
        assert_eq!(
            ev[1],
            Event::Reset {
                stream: 1,
                code: ErrorCode::CANCEL,
                remote: true
            }
        );
        assert_eq!(
            ev[2],
            Event::GoAway {
                last_stream: 0,
                code: ErrorCode::NO_ERROR
            }
        );
        assert_eq!(
            conn.send_headers(1, 200, &[], true),
            Err(SendError::StreamClosed(1))
        );
    }

    proptest! {
        /// Arbitrary frames after a valid preface, cut at arbitrary points:
        /// no panic, bounded output and input.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec((0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..40)), 0..30),
            cut in 1usize..50,
        ) {
            let mut c = Client::new();
            let mut bytes = preface(&[]);
            bytes.extend(c.get(1, "/"));
            for (k, flags, stream, payload) in frames {
                write_frame(&mut bytes, k, flags, stream, &payload);
            }
            let mut conn = ServerConnection::new(Settings::default());
            for chunk in bytes.chunks(cut) {
                if conn.recv(chunk, c.t0).is_err() {
                    break;
                }
                while let Some(ev) = conn.poll_event() {
                    if let Event::Request { stream, .. } = ev {
                        let _ = conn.send_headers(stream, 200, &[], false);
                        let _ = conn.send_data(stream, b"body", true);
                    }
                }
            }
            prop_assert!(conn.pending_output() < 64 * 1024);
            prop_assert!(conn.input.len() <= HEADER_LEN + 16_384);
        }
    }
}
