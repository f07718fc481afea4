//! HTTP/2 sessions of the `http` service: the glue between a plexus [`Session`] and the
//! sans-IO codec [`plexus_proto::h2::ServerConnection`], which owns the protocol (preface,
//! SETTINGS, streams, HPACK, flow control, the flood bounds).
//!
//! This module owns what the codec leaves to its caller: feeding it the session's bytes with
//! [`Session::now`], turning each request into the protocol-neutral [`Request`] that
//! [`Shared::respond`] answers (the same core as HTTP/1.1: files, HEAD, ETag/304, Range,
//! `/healthz`, `/metrics`, the status page, the limits), and writing the [`Response`] back as
//! HEADERS and DATA. Bodies leave as the windows allow, never whole, and only while the
//! session's outbound queue is under its high watermark — the rest waits for the peer's
//! WINDOW_UPDATE (the next `on_data`) or for the queue to drain (`on_drain`). On plain TCP
//! (h2c) a file goes out without a copy: each DATA frame is its 9-byte header, then the file
//! region queued with [`Session::send_file`] (the loop writes it with `sendfile`, as for
//! HTTP/1.1), a frame no larger than the windows and the peer's max frame size allow. On TLS
//! the file is read in chunks no larger than the windows accept (and at most [`CHUNK`]),
//! since its bytes must pass through rustls anyway.
//!
//! On a graceful drain (SIGTERM, an upgrade) GOAWAY goes out when the drain begins
//! (`SessionHandler::on_server_drain`, so idle connections get it too), or on the first
//! callback during the `drain_delay` lameduck before it: streams already opened finish, new
//! ones are refused, and the session closes once the last one ended. A
//! connection error (a protocol violation, a flood past its budget) sends GOAWAY with its
//! code, is counted by reason in `/metrics` and logged at most once a second, and closes the
//! session.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use plexus::config::HttpConfig;
use plexus::prometheus::{family, sample};
use plexus::{LogThrottle, Session};
use plexus_proto::h2::{
    ConnectionError, ErrorCode, Event, Flood, RequestHead, ServerConnection, Settings, Violation,
};
use plexus_proto::http::Method;
use tracing::{info, warn};

use super::{Body, Request, Response, Shared, TEXT};

/// The client connection preface (RFC 9113 §3.4) that switches a session to HTTP/2.
pub(super) const PREFACE: &[u8] = plexus_proto::h2::frame::PREFACE;

/// The most file bytes read for one stream at a time (the windows may allow less).
pub(super) const CHUNK: usize = 64 * 1024;

/// Output up to this size is copied into the session's queue rather than moved (a copy of a
/// few frames is cheaper than an allocation per write).
const SMALL_OUTPUT: usize = 4096;

/// Why connections ended with an error, as `/metrics` labels them.
const ERROR_REASONS: [&str; 9] = [
    "rapid_reset",
    "settings_flood",
    "ping_flood",
    "empty_frame_flood",
    "stream_error_flood",
    "header_block_too_large",
    "hpack",
    "output_backlog",
    "protocol",
];

/// What every HTTP/2 session of the service shares: the SETTINGS it advertises, counters,
/// and the throttle of its error log.
pub(super) struct H2Shared {
    settings: Settings,
    stall_timeout: Duration,
    connections: AtomicU64,
    streams: AtomicU64,
    stalled: AtomicU64,
    /// File body bytes queued as file regions (sendfile) and read into memory.
    file_bytes_sendfile: AtomicU64,
    file_bytes_read: AtomicU64,
    errors: [AtomicU64; ERROR_REASONS.len()],
    log: Mutex<LogThrottle>,
}

impl H2Shared {
    pub(super) fn new(config: &HttpConfig) -> H2Shared {
        let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let settings = Settings {
            max_concurrent_streams: u32_of(config.h2_max_concurrent_streams),
            initial_window_size: u32_of(config.h2_initial_window_size),
            max_frame_size: u32_of(config.h2_max_frame_size),
            // One limit for both protocols: HTTP/2's header list is what HTTP/1.1's head is.
            max_header_list_size: u32_of(config.max_header_bytes),
            ..Settings::default()
        };
        H2Shared {
            settings,
            stall_timeout: config.h2_stall_timeout,
            connections: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            file_bytes_sendfile: AtomicU64::new(0),
            file_bytes_read: AtomicU64::new(0),
            errors: Default::default(),
            log: Mutex::new(LogThrottle::new()),
        }
    }

    fn error(&self, error: &ConnectionError) {
        let reason = match &error.violation {
            Violation::Flood(Flood::Resets) => 0,
            Violation::Flood(Flood::Settings) => 1,
            Violation::Flood(Flood::Pings) => 2,
            Violation::Flood(Flood::EmptyFrames) => 3,
            Violation::Flood(Flood::StreamErrors) => 4,
            Violation::HeaderBlockTooLarge(_) => 5,
            Violation::Hpack(_) => 6,
            Violation::OutputBacklog => 7,
            _ => 8,
        };
        self.errors[reason].fetch_add(1, Relaxed);
    }

    pub(super) fn write_prometheus(&self, out: &mut String) {
        family(
            out,
            "http2_connections_total",
            "counter",
            "HTTP/2 connections (prior knowledge, ALPN h2, or detected by auto).",
        );
        sample(
            out,
            "http2_connections_total",
            &[],
            self.connections.load(Relaxed),
        );
        family(
            out,
            "http2_streams_total",
            "counter",
            "HTTP/2 requests (streams) answered.",
        );
        sample(out, "http2_streams_total", &[], self.streams.load(Relaxed));
        family(
            out,
            "http2_streams_stalled_total",
            "counter",
            "HTTP/2 responses reset (CANCEL) because the peer's windows let nothing out for \
             h2_stall_timeout.",
        );
        sample(
            out,
            "http2_streams_stalled_total",
            &[],
            self.stalled.load(Relaxed),
        );
        family(
            out,
            "http2_file_bytes_total",
            "counter",
            "HTTP/2 response body bytes from files, by how they left: sendfile (plain TCP: \
             DATA frame headers, then the file regions the loop writes with sendfile) or read \
             (TLS: read into memory in window-sized chunks).",
        );
        for (via, count) in [
            ("sendfile", &self.file_bytes_sendfile),
            ("read", &self.file_bytes_read),
        ] {
            sample(
                out,
                "http2_file_bytes_total",
                &[("via", via)],
                count.load(Relaxed),
            );
        }
        family(
            out,
            "http2_connection_errors_total",
            "counter",
            "HTTP/2 connections closed with an error GOAWAY, by reason (floods past their \
             budget, CONTINUATION floods, HPACK errors, a peer not reading, other protocol \
             errors).",
        );
        for (reason, count) in ERROR_REASONS.iter().zip(&self.errors) {
            sample(
                out,
                "http2_connection_errors_total",
                &[("reason", reason)],
                count.load(Relaxed),
            );
        }
    }
}

/// A response body still going out on a stream.
struct Sending {
    stream: u32,
    body: Pending,
}

enum Pending {
    Memory {
        bytes: Bytes,
        sent: usize,
    },
    File {
        file: Arc<File>,
        offset: u64,
        left: u64,
    },
}

/// One HTTP/2 connection.
pub(super) struct H2Session {
    shared: Arc<Shared>,
    conn: ServerConnection,
    /// Bodies being sent, in the order their responses started (served round-robin).
    sending: Vec<Sending>,
    /// The buffer files are read into, one chunk at a time (allocated on first use; TLS).
    chunk: Vec<u8>,
    /// The frames handed to the session when they are few: the codec's output buffer and
    /// this one swap, so small writes allocate nothing.
    scratch: Vec<u8>,
    /// File bodies leave as file regions (sendfile): the session is plain TCP.
    sendfile: bool,
    /// GOAWAY was sent for a graceful drain.
    draining: bool,
    /// The connection failed (counted and logged once); nothing more is done.
    failed: bool,
    /// When a body last moved (or the first one was queued): for `h2_stall_timeout`.
    last_progress: Instant,
    /// The stall timer is set.
    timer_armed: bool,
}

impl H2Session {
    /// A session that has just become HTTP/2; the server's SETTINGS are queued at once.
    pub(super) fn new(shared: Arc<Shared>, session: &mut Session<'_>) -> H2Session {
        shared.h2.connections.fetch_add(1, Relaxed);
        let mut h2 = H2Session {
            conn: ServerConnection::new(shared.h2.settings.clone()),
            shared,
            sending: Vec::new(),
            chunk: Vec::new(),
            scratch: Vec::new(),
            sendfile: !session.is_tls(),
            draining: false,
            failed: false,
            last_progress: session.now(),
            timer_armed: false,
        };
        h2.transmit(session);
        h2
    }

    pub(super) fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if self.failed {
            return;
        }
        if let Err(error) = self.conn.recv(data, session.now()) {
            self.failed(session, &error);
            return;
        }
        self.run(session);
    }

    pub(super) fn on_drain(&mut self, session: &mut Session<'_>) {
        self.run(session);
    }

    /// The server began a graceful drain: GOAWAY (NO_ERROR, the last stream the peer opened)
    /// goes out now, also on an idle connection; streams in flight finish, new ones are
    /// refused, and the session closes once the last one ended — at once when none is open.
    pub(super) fn on_server_drain(&mut self, session: &mut Session<'_>) {
        self.goaway();
        self.run(session);
    }

    /// Starts the graceful GOAWAY (once).
    fn goaway(&mut self) {
        if !self.draining && !self.failed {
            self.draining = true;
            self.conn.goaway(true);
        }
    }

    /// The stall timer: bodies that could send nothing for `h2_stall_timeout` are reset.
    pub(super) fn on_timer(&mut self, session: &mut Session<'_>) {
        self.timer_armed = false;
        if self.failed {
            return;
        }
        let stall = self.shared.h2.stall_timeout;
        let waited = session.now().saturating_duration_since(self.last_progress);
        if !self.sending.is_empty() && waited >= stall {
            let n = self.sending.len();
            self.shared.h2.stalled.fetch_add(n as u64, Relaxed);
            info!(
                "http/2 responses reset peer={} listener={}: {n} stream(s) sent nothing for \
                 h2_stall_timeout ({stall:?}): the peer's flow-control windows stayed closed",
                session.peer(),
                session.info().listener()
            );
            for sending in self.sending.drain(..) {
                self.conn.reset(sending.stream, ErrorCode::CANCEL);
            }
        }
        self.run(session);
    }

    /// Answers what the codec has, sends what the windows allow, and hands the frames to
    /// the session.
    fn run(&mut self, session: &mut Session<'_>) {
        if self.failed {
            return;
        }
        if session.server_draining() {
            // Also covers the `drain_delay` lameduck, before `on_server_drain`.
            self.goaway();
        }
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Request {
                    stream,
                    head,
                    end_stream: _,
                } => {
                    // Answered at once: this service reads no request body (the codec
                    // discards what still comes and keeps the windows open).
                    self.answer(session, stream, &head);
                }
                Event::Data { stream, data, .. } => {
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    self.conn.release_capacity(stream, n);
                }
                Event::Reset { stream, .. } => self.sending.retain(|s| s.stream != stream),
                _ => {}
            }
        }
        self.pump(session);
        self.transmit(session);
        self.update_stall_timer(session);
        if let Some(error) = self.conn.error().cloned() {
            self.failed(session, &error);
        } else if self.conn.is_closed() {
            session.close();
        }
    }

    /// While bodies wait, the stall timer runs from their last progress.
    fn update_stall_timer(&mut self, session: &mut Session<'_>) {
        if self.sending.is_empty() {
            if self.timer_armed {
                session.cancel_timer();
                self.timer_armed = false;
            }
            return;
        }
        let waited = session.now().saturating_duration_since(self.last_progress);
        let left = self.shared.h2.stall_timeout.saturating_sub(waited);
        // Re-armed on each callback: the deadline moves with the last progress.
        session.set_timer(left);
        self.timer_armed = true;
    }

    /// One request: the core's response, written as HEADERS (and DATA queued).
    fn answer(&mut self, session: &mut Session<'_>, stream: u32, head: &RequestHead) {
        let started = Instant::now();
        self.shared.h2.streams.fetch_add(1, Relaxed);
        let method = Method::from_token(&head.method);
        let path = head.path.as_deref().unwrap_or("");
        let limits = &self.shared.limits;
        let request = Request {
            method: &method,
            raw_target: path,
            target: path,
            headers: &head.headers,
        };
        let response = if path.len() > limits.max_uri_bytes {
            self.refused(session, 414, "request target longer than max_uri_bytes")
        } else if head
            .content_length
            .is_some_and(|n| n > limits.max_body_bytes)
        {
            self.refused(session, 413, "request body larger than max_body_bytes")
        } else {
            self.shared.respond(session, &request)
        };
        let sent = (response.status, response.sent_len());
        self.write(session, stream, response);
        self.shared.stats.latency(started.elapsed());
        // Hook: the access log (bytes = the body queued for the stream).
        self.shared
            .log_access(session, Some(&request), sent, "HTTP/2.0", started);
    }

    /// A request refused by a limit: counted and logged as HTTP/1.1 refusals are.
    fn refused(&self, session: &Session<'_>, status: u16, why: &str) -> Response {
        self.shared.log_refusal(session, status, &why);
        self.shared.stats.rejected(status);
        self.shared.stats.response(status);
        let body = format!(
            "{status} {}: {why}\n",
            plexus_proto::http::reason_phrase(status)
        );
        Response::simple(status, TEXT, body.into_bytes(), false)
    }

    fn write(&mut self, session: &mut Session<'_>, stream: u32, response: Response) {
        let date = self.shared.date(session);
        let length = response.body_len().to_string();
        let mut fields: Vec<(&[u8], &[u8])> = Vec::with_capacity(response.headers.len() + 3);
        fields.push((b"server", b"plexus"));
        fields.push((b"date", date.as_bytes()));
        fields.extend(
            response
                .headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        );
        if response.content_length {
            fields.push((b"content-length", length.as_bytes()));
        }
        if let Some(hsts) = self.shared.hsts(session) {
            fields.push((b"strict-transport-security", hsts.as_bytes()));
        }
        let empty = response.head_only || response.body_len() == 0;
        if self
            .conn
            .send_headers(stream, response.status, &fields, empty)
            .is_err()
            || empty
        {
            return;
        }
        let body = match response.body {
            Body::Memory(bytes) => Pending::Memory { bytes, sent: 0 },
            Body::File { file, start, count } => Pending::File {
                file: Arc::new(file),
                offset: start,
                left: count,
            },
        };
        if self.sending.is_empty() {
            self.last_progress = session.now();
        }
        self.sending.push(Sending { stream, body });
    }

    /// Sends body bytes, round-robin over the streams, as far as the flow-control windows
    /// and the session's high watermark allow.
    fn pump(&mut self, session: &mut Session<'_>) {
        let mut backlogged = false;
        while !self.sending.is_empty() {
            let mut progressed = false;
            let mut index = 0;
            while index < self.sending.len() {
                if session.is_backlogged() {
                    backlogged = true;
                    break;
                }
                let (moved, finished) = self.send_some(session, index);
                progressed |= moved;
                if moved {
                    self.last_progress = session.now();
                }
                if finished {
                    self.sending.swap_remove(index);
                } else {
                    index += 1;
                }
                if moved {
                    // Frames go to the session as they are made: the queue's length is
                    // what the watermark check above sees.
                    self.transmit(session);
                }
            }
            if backlogged || !progressed {
                break;
            }
        }
        if backlogged {
            session.notify_when_drained();
        }
    }

    /// Sends what the windows allow of body `index`: (whether bytes moved, whether done).
    fn send_some(&mut self, session: &mut Session<'_>, index: usize) -> (bool, bool) {
        let Some(sending) = self.sending.get_mut(index) else {
            return (false, true);
        };
        let stream = sending.stream;
        match &mut sending.body {
            Pending::Memory { bytes, sent } => {
                let rest = bytes.get(*sent..).unwrap_or_default();
                match self.conn.send_data(stream, rest, true) {
                    Ok(n) => {
                        *sent += n;
                        (n > 0, *sent >= bytes.len())
                    }
                    Err(_) => (false, true),
                }
            }
            Pending::File { file, offset, left } if self.sendfile => {
                let n = match self.conn.send_data_header(stream, *left, true) {
                    Ok(0) => return (false, false),
                    Ok(n) => n,
                    Err(_) => return (false, true),
                };
                // The frame header (and whatever the codec queued before it), then its
                // payload as a file region: nothing of this connection may come between.
                Self::transmit_into(&mut self.conn, &mut self.scratch, session);
                session.send_file(Arc::clone(file), *offset, n as u64);
                self.shared
                    .h2
                    .file_bytes_sendfile
                    .fetch_add(n as u64, Relaxed);
                *offset += n as u64;
                *left -= n as u64;
                (true, *left == 0)
            }
            Pending::File { file, offset, left } => {
                let room = self.conn.send_capacity(stream).min(CHUNK);
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(room);
                if n == 0 {
                    // A window is closed: the peer's WINDOW_UPDATE brings this back.
                    return (false, false);
                }
                if self.chunk.len() < n {
                    self.chunk.resize(CHUNK, 0);
                }
                let Some(buf) = self.chunk.get_mut(..n) else {
                    return (false, true);
                };
                if let Err(err) = super::read_exact_at(file, buf, *offset) {
                    warn!(session = %session.id(), stream, "http: cannot read file: {err}");
                    self.conn.reset(stream, ErrorCode::INTERNAL_ERROR);
                    return (true, true);
                }
                let last = n as u64 == *left;
                match self.conn.send_data(stream, buf, last) {
                    Ok(sent) => {
                        self.shared
                            .h2
                            .file_bytes_read
                            .fetch_add(sent as u64, Relaxed);
                        *offset += sent as u64;
                        *left -= sent as u64;
                        (sent > 0, *left == 0)
                    }
                    Err(_) => (false, true),
                }
            }
        }
    }

    /// Hands the codec's queued frames to the session.
    fn transmit(&mut self, session: &mut Session<'_>) {
        Self::transmit_into(&mut self.conn, &mut self.scratch, session);
    }

    /// [`H2Session::transmit`], for callers holding a borrow of another field: a few frames
    /// are copied into the session's staging buffer (the codec's buffer and `scratch` swap,
    /// nothing is allocated); many move to the session without a copy.
    fn transmit_into(
        conn: &mut ServerConnection,
        scratch: &mut Vec<u8>,
        session: &mut Session<'_>,
    ) {
        if conn.pending_output() <= SMALL_OUTPUT {
            scratch.clear();
            if conn.poll_transmit(scratch) {
                session.send(scratch);
            }
            return;
        }
        let mut out = Vec::new();
        if conn.poll_transmit(&mut out) {
            session.send_bytes(Bytes::from(out));
        }
    }

    /// The connection failed: GOAWAY with the error's code goes out, then the session closes.
    fn failed(&mut self, session: &mut Session<'_>, error: &ConnectionError) {
        self.sending.clear();
        self.transmit(session);
        if !self.failed {
            self.failed = true;
            self.shared.h2.error(error);
            let allowed = self
                .shared
                .h2
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .allow(session.now());
            if let Some(also) = allowed {
                info!(
                    "http/2 connection closed peer={} listener={}: {error} \
                     (+{also} more in the last second)",
                    session.peer(),
                    session.info().listener()
                );
            }
        }
        session.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use plexus::config::HttpConfig;
    use plexus::testing::Harness;
    use plexus_proto::h2::frame::{self, kind, FrameHeader};
    use plexus_proto::h2::hpack;

    use crate::Http;

    /// (type, stream, payload) of every frame in `bytes`.
    fn frames(bytes: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(h) = FrameHeader::parse(rest) {
            let end = frame::HEADER_LEN + h.length as usize;
            out.push((h.kind, h.stream, rest[frame::HEADER_LEN..end].to_vec()));
            rest = &rest[end..];
        }
        assert!(rest.is_empty(), "a partial frame");
        out
    }

    fn request(path: &str) -> Vec<u8> {
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_settings(&mut bytes, &[]);
        let mut block = Vec::new();
        hpack::Encoder::new().encode(
            [
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
            ],
            &mut block,
        );
        frame::write_headers(&mut bytes, 1, &block, true, 16_384);
        bytes
    }

    /// The preface fed one byte at a time is still recognised (the session waits while the
    /// bytes are a prefix of it), and `/healthz` is answered over HTTP/2.
    #[test]
    fn a_preface_split_into_single_bytes_switches_to_http2() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut h = Harness::builder_shared(service as _).open();
        for byte in request("/healthz") {
            h.receive(&[byte]);
        }
        let sent = frames(&h.take_sent());
        assert_eq!(sent.first().map(|f| f.0), Some(kind::SETTINGS));
        let headers = sent
            .iter()
            .find(|f| f.0 == kind::HEADERS && f.1 == 1)
            .expect("a response");
        let fields = hpack::Decoder::new(4096)
            .decode(&headers.2, 1 << 16)
            .unwrap();
        assert_eq!(fields.fields[0].name, b":status");
        assert_eq!(fields.fields[0].value, b"200");
        let data: Vec<u8> = sent
            .iter()
            .filter(|f| f.0 == kind::DATA && f.1 == 1)
            .flat_map(|f| f.2.clone())
            .collect();
        assert_eq!(data, b"ok");
        assert!(h.closed().is_none());
    }

    /// ALPN `h2` decides at once: the server's SETTINGS go out before the client sent a byte,
    /// and a request is answered over HTTP/2; ALPN `http/1.1` never looks for the preface.
    #[test]
    fn alpn_decides_the_protocol_before_any_byte_arrives() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut h = Harness::builder_shared(Arc::clone(&service) as _)
            .alpn(b"h2")
            .open();
        let sent = frames(&h.take_sent());
        assert_eq!(sent.first().map(|f| f.0), Some(kind::SETTINGS));
        h.receive(&request("/healthz"));
        let sent = frames(&h.take_sent());
        assert!(
            sent.iter().any(|f| f.0 == kind::HEADERS && f.1 == 1),
            "{sent:?}"
        );

        let mut h1 = Harness::builder_shared(service as _)
            .alpn(b"http/1.1")
            .open();
        assert!(h1.take_sent().is_empty());
        h1.receive(&request("/healthz"));
        let sent = String::from_utf8_lossy(&h1.take_sent()).into_owned();
        assert!(sent.starts_with("HTTP/1.1 505"), "{sent}");
    }

    /// `POST` shares the preface's first byte: HTTP/1.1 as before.
    #[test]
    fn a_request_line_that_starts_like_the_preface_stays_http11() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut h = Harness::builder_shared(service as _).open();
        h.receive(b"P");
        assert!(h.take_sent().is_empty());
        h.receive(b"OST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let sent = String::from_utf8(h.take_sent()).unwrap();
        assert!(sent.starts_with("HTTP/1.1 405"), "{sent}");
    }

    /// GOAWAY (type, last stream, code) frames in `sent`.
    fn goaways(sent: &[(u8, u32, Vec<u8>)]) -> Vec<(u32, u32)> {
        sent.iter()
            .filter(|f| f.0 == kind::GOAWAY)
            .map(|f| {
                let last = u32::from_be_bytes(f.2[..4].try_into().unwrap());
                let code = u32::from_be_bytes(f.2[4..8].try_into().unwrap());
                (last, code)
            })
            .collect()
    }

    /// A drain reaching an idle HTTP/2 connection: GOAWAY(last stream 1, NO_ERROR) at once,
    /// and the session closes (nothing is in flight).
    #[test]
    fn an_idle_connection_gets_goaway_when_the_drain_starts_and_closes() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut h = Harness::builder_shared(service as _).open();
        h.receive(&request("/healthz"));
        let _ = h.take_sent();
        assert!(h.closed().is_none());
        h.start_server_drain();
        let sent = frames(&h.take_sent());
        assert_eq!(goaways(&sent), vec![(1, 0)], "{sent:?}");
        assert!(h.closed().is_some(), "closed once GOAWAY is written");

        // A connection whose preface arrives after the drain began: its first request is
        // served, GOAWAY names it, and the session closes.
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut fresh = Harness::builder_shared(service as _).open();
        fresh.start_server_drain();
        assert!(fresh.closed().is_none());
        fresh.receive(&request("/healthz"));
        let sent = frames(&fresh.take_sent());
        assert!(sent
            .iter()
            .any(|f| f.0 == kind::DATA && f.1 == 1 && f.2 == b"ok"));
        assert_eq!(goaways(&sent), vec![(1, 0)], "{sent:?}");
        assert!(fresh.closed().is_some());
    }

    /// A drain while a body is still going out: GOAWAY now, the body finishes as the window
    /// opens, a new stream is refused, then the session closes.
    #[test]
    fn a_drain_lets_the_stream_in_flight_finish_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &body).unwrap();
        let config = HttpConfig {
            root: Some(dir.path().to_owned()),
            ..HttpConfig::default()
        };
        let service = Arc::new(Http::new(&config));
        let mut h = Harness::builder_shared(service as _).open();
        h.receive(&request("/big.bin"));
        let mut got: Vec<u8> = Vec::new();
        let data = |sent: &[(u8, u32, Vec<u8>)]| -> Vec<u8> {
            sent.iter()
                .filter(|f| f.0 == kind::DATA && f.1 == 1)
                .flat_map(|f| f.2.clone())
                .collect()
        };
        got.extend(data(&frames(&h.take_sent())));
        assert_eq!(got.len(), 65_535, "the first window's worth");
        h.start_server_drain();
        let sent = frames(&h.take_sent());
        assert_eq!(goaways(&sent), vec![(1, 0)], "{sent:?}");
        assert!(h.closed().is_none(), "stream 1 is still in flight");
        // A new stream is refused.
        let mut block = Vec::new();
        hpack::Encoder::new().encode(
            [
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"http"),
                (b":path", b"/healthz"),
            ],
            &mut block,
        );
        let mut more = Vec::new();
        frame::write_headers(&mut more, 3, &block, true, 16_384);
        h.receive(&more);
        let sent = frames(&h.take_sent());
        assert!(
            sent.iter().any(|f| f.0 == kind::RST_STREAM && f.1 == 3),
            "{sent:?}"
        );
        while h.closed().is_none() {
            let mut update = Vec::new();
            frame::write_window_update(&mut update, 0, 65_535);
            frame::write_window_update(&mut update, 1, 65_535);
            h.receive(&update);
            let sent = frames(&h.take_sent());
            assert!(!sent.iter().any(|f| f.1 == 3 && f.0 != kind::RST_STREAM));
            got.extend(data(&sent));
        }
        assert!(
            got == body,
            "the body in flight differs ({} bytes)",
            got.len()
        );
    }

    /// A file over h2c leaves as DATA frame headers and file regions (sendfile), within the
    /// windows and the 16 KiB frame size, byte-exact; over TLS it is read in chunks.
    #[test]
    fn file_bodies_use_sendfile_on_plain_tcp_and_reads_on_tls() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &body).unwrap();
        let config = HttpConfig {
            root: Some(dir.path().to_owned()),
            ..HttpConfig::default()
        };
        for tls in [false, true] {
            let service = Arc::new(Http::new(&config));
            let mut builder = Harness::builder_shared(Arc::clone(&service) as _);
            if tls {
                builder = builder.alpn(b"h2");
            }
            let mut h = builder.open();
            h.receive(&request("/big.bin"));
            let mut got = Vec::new();
            while got.len() < body.len() {
                let sent = frames(&h.take_sent());
                let mut update = Vec::new();
                for (kind_, stream, payload) in &sent {
                    if *kind_ == kind::DATA && *stream == 1 {
                        assert!(payload.len() <= 16_384);
                        got.extend_from_slice(payload);
                        let n = payload.len() as u32;
                        frame::write_window_update(&mut update, 0, n);
                        frame::write_window_update(&mut update, 1, n);
                    }
                }
                assert!(!update.is_empty(), "stuck at {} bytes", got.len());
                h.receive(&update);
            }
            assert!(got == body, "tls={tls}: {} bytes differ", got.len());
            let h2 = &service.shared.h2;
            let (sendfile, read) = (
                h2.file_bytes_sendfile.load(Relaxed),
                h2.file_bytes_read.load(Relaxed),
            );
            if tls {
                assert_eq!((sendfile, read), (0, body.len() as u64));
            } else {
                assert_eq!((sendfile, read), (body.len() as u64, 0));
            }
        }
    }

    /// HTTP/1.1 at a drain: a keep-alive connection between requests closes at once; a fresh
    /// one, or one whose next request head is arriving, gets its request answered with
    /// `Connection: close`.
    #[test]
    fn http11_closes_between_requests_and_answers_the_one_in_progress_with_close() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut idle = Harness::builder_shared(Arc::clone(&service) as _).open();
        idle.receive(get);
        let sent = String::from_utf8(idle.take_sent()).unwrap();
        assert!(!sent.contains("Connection: close"), "{sent}");
        idle.start_server_drain();
        assert!(idle.take_sent().is_empty());
        assert!(idle.closed().is_some());

        // Nothing received yet: the first request may be on the way; the drain's idle close
        // ends it if not.
        let mut fresh = Harness::builder_shared(Arc::clone(&service) as _).open();
        fresh.start_server_drain();
        assert!(fresh.closed().is_none() && !fresh.is_closing());
        fresh.receive(get);
        let sent = String::from_utf8(fresh.take_sent()).unwrap();
        assert!(sent.contains("Connection: close"), "{sent}");
        assert!(fresh.closed().is_some());

        let mut busy = Harness::builder_shared(service as _).open();
        busy.receive(b"GET /healthz HTTP/1.1\r\nHo");
        busy.start_server_drain();
        assert!(busy.closed().is_none(), "a head in progress is answered");
        busy.receive(b"st: x\r\n\r\n");
        let sent = String::from_utf8(busy.take_sent()).unwrap();
        assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
        assert!(sent.contains("Connection: close"), "{sent}");
        assert!(busy.closed().is_some());
    }

    /// Garbage after the preface is a connection error: GOAWAY, then the session closes.
    #[test]
    fn a_bad_first_frame_gets_goaway_and_a_close() {
        let service = Arc::new(Http::new(&HttpConfig::default()));
        let mut h = Harness::builder_shared(service as _).open();
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_ping(&mut bytes, [0; 8], false);
        h.receive(&bytes);
        let sent = frames(&h.take_sent());
        assert!(sent.iter().any(|f| f.0 == kind::GOAWAY), "{sent:?}");
        assert!(h.closed().is_some());
    }
}
