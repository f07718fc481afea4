//! The HTTP/1.1 request decoder: owns request-head parsing (on `httparse`),
//! message framing (RFC 9112 §6: Content-Length, chunked), the limits that
//! bound what a client can make the server buffer, and the decoded request
//! types.

use std::cmp::min;
use std::mem::MaybeUninit;

/// Size above which an emptied buffer gives its allocation back, so idle
/// keep-alive connections stay small.
const KEEP_CAPACITY: usize = 4096;

/// Longest chunk-size line (hex size, extensions, CRLF) accepted: extensions
/// are allowed but must not let a client make the server buffer freely.
const MAX_CHUNK_LINE: usize = 4096;

/// Header slots httparse gets on the stack (no allocation, no initialisation
/// per request); a larger `max_headers` falls back to the heap.
const STACK_HEADERS: usize = 64;

/// Runs httparse's request parser on `$buf` with `$max` header slots, binding
/// the parser to `$request` and the result to `$result` for the code that follows.
macro_rules! parse_request {
    ($buf:expr, $max:expr, |$request:ident, $result:ident| $body:block) => {{
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        // `$max <= STACK_HEADERS` is checked before the slice is taken.
        #[allow(clippy::indexing_slicing)]
        let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if $max <= STACK_HEADERS {
            &mut stack[..$max]
        } else {
            heap.resize_with($max, MaybeUninit::uninit);
            &mut heap
        };
        let mut $request = httparse::Request::new(&mut []);
        let $result = $request.parse_with_uninit_headers($buf, slots);
        $body
    }};
}

/// What a client may make the decoder accept. Every limit has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line, header fields, final blank line);
    /// also the bound of a chunked body's trailer section. Over it: 431.
    pub max_head_bytes: usize,
    /// Longest request-target. Over it: 414.
    pub max_uri_bytes: usize,
    /// Most header fields in a head (and in a trailer section). Over it: 431.
    pub max_headers: usize,
    /// Largest body, whatever its framing. Over it: 413.
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16384,
            max_uri_bytes: 8192,
            max_headers: 100,
            max_body_bytes: 1_048_576,
        }
    }
}

/// A request method; the registered ones by name, any other token as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `OPTIONS`
    Options,
    /// `PATCH`
    Patch,
    /// `TRACE`
    Trace,
    /// `CONNECT`
    Connect,
    /// Any other (syntactically valid) method token; methods are case-sensitive.
    Other(String),
}

impl Method {
    /// The method a token names (`"GET"` → [`Method::Get`]; unknown ones as
    /// [`Method::Other`]): for methods that arrive outside a request line,
    /// such as HTTP/2's `:method`.
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            "TRACE" => Method::Trace,
            "CONNECT" => Method::Connect,
            other => Method::Other(other.to_owned()),
        }
    }

    /// The method token as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Trace => "TRACE",
            Method::Connect => "CONNECT",
            Method::Other(token) => token,
        }
    }
}

/// The protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

/// One header field line, in the order received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The field name as sent (names compare case-insensitively).
    pub name: String,
    /// The field value, leading and trailing whitespace removed.
    pub value: Vec<u8>,
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body (neither Content-Length nor Transfer-Encoding).
    Empty,
    /// Exactly this many bytes (Content-Length; may be 0).
    Length(u64),
    /// Chunked transfer coding; the length is known at the end.
    Chunked,
}

/// A parsed and validated request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The request method.
    pub method: Method,
    /// The request-target exactly as sent (origin-, absolute-, authority- or
    /// asterisk-form); [`normalize_path`](super::normalize_path) maps it to a file.
    pub target: String,
    /// The protocol version.
    pub version: Version,
    /// Every header field, in order.
    pub headers: Vec<Header>,
    /// How the body is framed.
    pub body: BodyLength,
    /// Whether the connection may stay open after this exchange: HTTP/1.1
    /// unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` and waits for a 100 before the body.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The value of the first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// Every value of the header fields called `name` (case-insensitive).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEvent {
    /// A complete, validated request head.
    Head(RequestHead),
    /// A piece of the decoded body (chunk framing removed); never empty.
    Body(Vec<u8>),
    /// The message (head and body) is complete; the next request may follow.
    End,
}

/// Why a request was refused. Each variant maps to the status the server
/// answers with ([`RequestError::status`]) before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request line is not `method SP request-target SP HTTP-version`.
    #[error("malformed request line: {0}")]
    BadRequestLine(&'static str),
    /// A syntactically valid but unsupported version (HTTP/2 and later).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(String),
    /// The request-target is longer than the limit.
    #[error("request-target longer than {limit} bytes")]
    UriTooLong {
        /// `Limits::max_uri_bytes`
        limit: usize,
    },
    /// The request head did not end within the limit.
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge {
        /// `Limits::max_head_bytes`
        limit: usize,
    },
    /// More header fields than the limit.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// `Limits::max_headers`
        limit: usize,
    },
    /// A header field name is empty or not a token (or is followed by whitespace).
    #[error("invalid header field name")]
    BadHeaderName,
    /// A header field value contains a forbidden byte (NUL, a control
    /// character, a bare CR).
    #[error("invalid byte in a header field value")]
    BadHeaderValue,
    /// A header field line starts with whitespace (obsolete line folding).
    #[error("obsolete line folding in the request head")]
    ObsFold,
    /// A line of the head ends with something other than CRLF (or LF).
    #[error("invalid line ending in the request head")]
    BadLineEnding,
    /// An HTTP/1.1 request without a Host header field.
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    /// More than one Host header field.
    #[error("more than one Host header field")]
    MultipleHost,
    /// A Content-Length value that is not a decimal number of bytes.
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    /// Content-Length values that disagree.
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    /// Both Transfer-Encoding and Content-Length (a request-smuggling vector).
    #[error("both Transfer-Encoding and Content-Length")]
    TransferEncodingWithContentLength,
    /// Transfer-Encoding in an HTTP/1.0 request (framing cannot be trusted).
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    /// The final transfer coding is not `chunked` (or `chunked` is repeated),
    /// so the body length cannot be determined.
    #[error("Transfer-Encoding {0:?} does not end with a single chunked")]
    NotChunked(String),
    /// A transfer coding this server does not implement.
    #[error("unsupported transfer coding {0:?}")]
    UnsupportedTransferCoding(String),
    /// The body is larger than the limit.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// `Limits::max_body_bytes`
        limit: u64,
    },
    /// A chunk-size line that is not hex digits with optional extensions.
    #[error("malformed chunk size line")]
    BadChunkSize,
    /// A chunk size that does not fit in 64 bits.
    #[error("chunk size overflows 64 bits")]
    ChunkSizeOverflow,
    /// A chunk-size line (with its extensions) longer than the bound.
    #[error("chunk size line longer than {limit} bytes")]
    ChunkLineTooLong {
        /// The fixed bound on chunk-size lines.
        limit: usize,
    },
    /// Chunk data not followed by CRLF, or a chunk-size line not ended by CRLF.
    #[error("missing CRLF in chunked body")]
    BadChunkDelimiter,
    /// The trailer section did not end within `max_head_bytes`.
    #[error("trailer section larger than {limit} bytes")]
    TrailersTooLarge {
        /// `Limits::max_head_bytes`
        limit: usize,
    },
    /// More trailer fields than `max_headers`.
    #[error("more than {limit} trailer fields")]
    TooManyTrailers {
        /// `Limits::max_headers`
        limit: usize,
    },
    /// A malformed trailer field.
    #[error("malformed trailer section")]
    BadTrailer,
}

impl RequestError {
    /// The response status for this error: 400, 413, 414, 431, 501 or 505.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::UriTooLong { .. } => 414,
            RequestError::HeadTooLarge { .. }
            | RequestError::TooManyHeaders { .. }
            | RequestError::TrailersTooLarge { .. }
            | RequestError::TooManyTrailers { .. } => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::UnsupportedTransferCoding(_) => 501,
            RequestError::UnsupportedVersion(_) => 505,
            _ => 400,
        }
    }
}

/// Where the decoder is in the byte stream.
#[derive(Debug, Clone)]
enum State {
    /// Waiting for (the rest of) a request head.
    Head,
    /// The current message has no body bytes left: `End` comes next.
    EndNext,
    /// Content-Length framing with this many bytes still to come.
    Fixed { remaining: u64 },
    /// Waiting for a chunk-size line.
    ChunkSize,
    /// Inside chunk data.
    ChunkData { remaining: u64 },
    /// Waiting for the CRLF that ends chunk data.
    ChunkDataEnd,
    /// Waiting for the trailer section after the last chunk.
    Trailers,
    /// A request was refused; the decoder accepts nothing more.
    Failed(RequestError),
}

/// Sans-IO HTTP/1.1 request decoder (RFC 9112).
///
/// [`push`](Self::push) the bytes a read returned, then call
/// [`poll`](Self::poll) until it returns `Ok(None)`. Pipelined requests come
/// out in order: `Head`, zero or more `Body` pieces, `End`, then the next
/// request. After an error the decoder stays failed: every later `poll`
/// returns the same error and pushed bytes are dropped (the runtime answers
/// with [`RequestError::status`] and closes).
///
/// Memory: an incomplete head never makes the buffer hold more than
/// `max_head_bytes` (`push` drops what cannot matter any more, and `poll`
/// refuses such a head with 431); otherwise, when the runtime polls after
/// every push, the decoder holds at most an incomplete chunk-size or trailer
/// line beyond the last push; body bytes are handed out as they arrive.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    state: State,
    /// Bytes of the current head or trailer section (from `pos`) already
    /// searched for the blank line, so a slow client's head is scanned once.
    scanned: usize,
    /// The early request-target length check of the current head.
    target: TargetScan,
    /// Chunked body bytes of the current message so far.
    body_total: u64,
}

impl RequestDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        RequestDecoder {
            limits,
            buf: Vec::new(),
            pos: 0,
            state: State::Head,
            scanned: 0,
            target: TargetScan::default(),
            body_total: 0,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends received bytes (dropped once the decoder has failed).
    pub fn push(&mut self, data: &[u8]) {
        if matches!(self.state, State::Failed(_)) || data.is_empty() {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
        self.bound_incomplete_head();
    }

    /// Keeps an incomplete head from growing the buffer past `max_head_bytes`:
    /// when no head can end within the first `max_head_bytes` pending bytes,
    /// `poll` refuses the request from those bytes alone, so the rest is
    /// dropped now instead of being held until then.
    fn bound_incomplete_head(&mut self) {
        let limit = self.limits.max_head_bytes;
        if !matches!(self.state, State::Head) || self.buffered() <= limit {
            return;
        }
        let window = first_pending(&self.buf, self.pos, limit);
        // Leading empty lines are stripped by `poll` and shift the head: leave those to it.
        if matches!(window.first(), Some(b'\r' | b'\n')) || find_blank_line(window, 0).0.is_some() {
            return;
        }
        self.buf.truncate(self.pos.saturating_add(limit));
    }

    /// The next event, `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    ///
    /// The request is malformed or over a limit; see [`RequestError`]. The
    /// decoder stays failed.
    pub fn poll(&mut self) -> Result<Option<RequestEvent>, RequestError> {
        let result = self.step();
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
            self.buf = Vec::new();
            self.pos = 0;
        }
        result
    }

    /// At least one byte of a request head is buffered and the head is not
    /// complete yet (the runtime arms its header timeout on this).
    pub fn head_in_progress(&self) -> bool {
        matches!(self.state, State::Head) && self.buffered() > 0
    }

    /// Between messages with nothing buffered (and not failed).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Head) && self.buffered() == 0
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        // `pos <= buf.len()` always (`consume` clamps).
        self.buf.len().saturating_sub(self.pos)
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.pos = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
    }

    /// Takes up to `remaining` available body bytes as one piece.
    fn take_body(&mut self, remaining: u64) -> Option<(Vec<u8>, u64)> {
        let avail = self.buffered();
        if avail == 0 {
            return None;
        }
        let n = min(remaining, avail as u64) as usize;
        let piece = self.pending().get(..n)?.to_vec();
        self.consume(n);
        // `n <= remaining`.
        Some((piece, remaining.saturating_sub(n as u64)))
    }

    fn step(&mut self) -> Result<Option<RequestEvent>, RequestError> {
        loop {
            match self.state {
                State::Failed(ref error) => return Err(error.clone()),
                State::Head => return self.poll_head(),
                State::EndNext => {
                    self.state = State::Head;
                    // Pipelined bytes already buffered are the next head.
                    self.bound_incomplete_head();
                    return Ok(Some(RequestEvent::End));
                }
                State::Fixed { remaining } => {
                    let Some((piece, left)) = self.take_body(remaining) else {
                        return Ok(None);
                    };
                    self.state = if left == 0 {
                        State::EndNext
                    } else {
                        State::Fixed { remaining: left }
                    };
                    return Ok(Some(RequestEvent::Body(piece)));
                }
                State::ChunkData { remaining } => {
                    let Some((piece, left)) = self.take_body(remaining) else {
                        return Ok(None);
                    };
                    self.state = if left == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData { remaining: left }
                    };
                    return Ok(Some(RequestEvent::Body(piece)));
                }
                State::ChunkDataEnd => {
                    let pending = self.pending();
                    match pending {
                        [] => return Ok(None),
                        [b'\r'] => return Ok(None),
                        [b'\r', b'\n', ..] => {
                            self.consume(2);
                            self.state = State::ChunkSize;
                        }
                        _ => return Err(RequestError::BadChunkDelimiter),
                    }
                }
                State::ChunkSize => {
                    let window = first_pending(&self.buf, self.pos, MAX_CHUNK_LINE);
                    let from = self.scanned.min(window.len());
                    let Some(lf) = window
                        .get(from..)
                        .unwrap_or_default()
                        .iter()
                        .position(|&b| b == b'\n')
                        .map(|i| from.saturating_add(i))
                    else {
                        self.scanned = window.len();
                        if window.len() >= MAX_CHUNK_LINE {
                            return Err(RequestError::ChunkLineTooLong {
                                limit: MAX_CHUNK_LINE,
                            });
                        }
                        // Refuse garbage now rather than after MAX_CHUNK_LINE bytes.
                        if window.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                            return Err(RequestError::BadChunkSize);
                        }
                        return Ok(None);
                    };
                    let line = match window.get(..lf).and_then(|l| l.strip_suffix(b"\r")) {
                        Some(line) => line,
                        None => return Err(RequestError::BadChunkDelimiter),
                    };
                    let size = parse_chunk_size(line)?;
                    self.consume(lf.saturating_add(1));
                    self.scanned = 0;
                    self.body_total = self
                        .body_total
                        .checked_add(size)
                        .filter(|&total| total <= self.limits.max_body_bytes)
                        .ok_or(RequestError::BodyTooLarge {
                            limit: self.limits.max_body_bytes,
                        })?;
                    if size == 0 {
                        self.state = State::Trailers;
                        self.scanned = 0;
                    } else {
                        self.state = State::ChunkData { remaining: size };
                    }
                }
                State::Trailers => {
                    let limit = self.limits.max_head_bytes;
                    let window = first_pending(&self.buf, self.pos, limit);
                    let end = if window.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        let (end, next) = find_blank_line(window, self.scanned);
                        self.scanned = next;
                        end
                    };
                    let Some(end) = end else {
                        if window.len() >= limit {
                            return Err(RequestError::TrailersTooLarge { limit });
                        }
                        return Ok(None);
                    };
                    self.check_trailers(end)?;
                    self.consume(end);
                    self.scanned = 0;
                    self.state = State::EndNext;
                }
            }
        }
    }

    /// Validates the trailer section `pending()[..end]` (the fields are discarded).
    fn check_trailers(&self, end: usize) -> Result<(), RequestError> {
        let Some(section) = self.pending().get(..end) else {
            return Err(RequestError::BadTrailer);
        };
        // The chunked framing is strict about CRLF (a bare LF is a smuggling vector).
        if has_bare_lf(section) {
            return Err(RequestError::BadChunkDelimiter);
        }
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        match httparse::parse_headers(section, &mut headers) {
            Ok(httparse::Status::Complete((n, _))) if n == end => Ok(()),
            Err(httparse::Error::TooManyHeaders) => Err(RequestError::TooManyTrailers {
                limit: self.limits.max_headers,
            }),
            _ => Err(RequestError::BadTrailer),
        }
    }

    fn poll_head(&mut self) -> Result<Option<RequestEvent>, RequestError> {
        // RFC 9112 §2.2: ignore empty lines before a request line (some
        // clients send a CRLF after a POST body).
        loop {
            match self.pending() {
                [b'\n', ..] => self.consume(1),
                [b'\r', b'\n', ..] => self.consume(2),
                [b'\r'] => return Ok(None),
                [b'\r', ..] => return Err(RequestError::BadLineEnding),
                _ => break,
            }
        }
        let avail = self.buffered();
        if avail == 0 {
            return Ok(None);
        }
        let limit = self.limits.max_head_bytes;
        let window_len = min(avail, limit);
        let window = first_pending(&self.buf, self.pos, window_len);
        let from = self.scanned;
        let (end, next) = find_blank_line(window, from);
        self.scanned = next;
        let Some(end) = end else {
            self.target.advance(window, self.limits.max_uri_bytes)?;
            // A line completed since the last look: let httparse refuse a
            // malformed request line or field now instead of at the limit.
            if window
                .get(from.min(window_len)..)
                .is_some_and(|new| new.contains(&b'\n'))
            {
                parse_request!(window, self.limits.max_headers, |_request, result| {
                    if let Err(error) = result {
                        return Err(self.map_parse_error(error, window));
                    }
                });
                if has_obs_fold(window) {
                    return Err(RequestError::ObsFold);
                }
            }
            if avail >= limit {
                return Err(RequestError::HeadTooLarge { limit });
            }
            return Ok(None);
        };
        let Some(head) = window.get(..end) else {
            return Err(RequestError::HeadTooLarge { limit });
        };
        let head = self.parse_head(head)?;
        self.consume(end);
        self.scanned = 0;
        self.target = TargetScan::default();
        self.body_total = 0;
        self.state = match head.body {
            BodyLength::Empty | BodyLength::Length(0) => State::EndNext,
            BodyLength::Length(n) => State::Fixed { remaining: n },
            BodyLength::Chunked => State::ChunkSize,
        };
        Ok(Some(RequestEvent::Head(head)))
    }

    fn map_parse_error(&self, error: httparse::Error, head: &[u8]) -> RequestError {
        match error {
            httparse::Error::TooManyHeaders => RequestError::TooManyHeaders {
                limit: self.limits.max_headers,
            },
            httparse::Error::HeaderName if has_obs_fold(head) => RequestError::ObsFold,
            httparse::Error::HeaderName => RequestError::BadHeaderName,
            httparse::Error::HeaderValue => RequestError::BadHeaderValue,
            httparse::Error::NewLine => RequestError::BadLineEnding,
            httparse::Error::Version => match newer_version(head) {
                Some(version) => RequestError::UnsupportedVersion(version),
                None => RequestError::BadRequestLine("invalid HTTP version"),
            },
            httparse::Error::Token | httparse::Error::Status => {
                RequestError::BadRequestLine("invalid method or request-target")
            }
        }
    }

    /// Parses and validates a complete head (`head` ends with the blank line).
    fn parse_head(&self, head: &[u8]) -> Result<RequestHead, RequestError> {
        parse_request!(head, self.limits.max_headers, |request, result| {
            match result {
                Ok(httparse::Status::Complete(_)) => {}
                // The blank line was found, so httparse can only stop early on
                // something it does not accept as the end of a head.
                Ok(httparse::Status::Partial) => return Err(RequestError::BadLineEnding),
                Err(error) => return Err(self.map_parse_error(error, head)),
            }
            self.build_head(&request)
        })
    }

    /// Validates what httparse accepted and builds the head.
    fn build_head(&self, request: &httparse::Request<'_, '_>) -> Result<RequestHead, RequestError> {
        let (Some(method), Some(target), Some(version)) =
            (request.method, request.path, request.version)
        else {
            return Err(RequestError::BadRequestLine("incomplete request line"));
        };
        if target.len() > self.limits.max_uri_bytes {
            return Err(RequestError::UriTooLong {
                limit: self.limits.max_uri_bytes,
            });
        }
        let version = if version == 0 {
            Version::Http10
        } else {
            Version::Http11
        };
        let mut head = RequestHead {
            method: Method::from_token(method),
            target: target.to_owned(),
            version,
            headers: request
                .headers
                .iter()
                .map(|h| Header {
                    name: h.name.to_owned(),
                    value: trim_ows(h.value).to_vec(),
                })
                .collect(),
            body: BodyLength::Empty,
            keep_alive: false,
            expect_continue: false,
        };
        match head.values("host").count() {
            0 if version == Version::Http11 => return Err(RequestError::MissingHost),
            0 | 1 => {}
            _ => return Err(RequestError::MultipleHost),
        }
        head.body = self.framing(&head)?;
        let mut close = false;
        let mut keep_alive = false;
        for value in head.values("connection") {
            for token in list_elements(value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        head.keep_alive = !close && (version == Version::Http11 || keep_alive);
        let expect_continue = head
            .values("expect")
            .any(|v| v.eq_ignore_ascii_case(b"100-continue"));
        head.expect_continue = expect_continue;
        Ok(head)
    }

    /// Determines the body framing (RFC 9112 §6.1–6.3).
    fn framing(&self, head: &RequestHead) -> Result<BodyLength, RequestError> {
        let mut length: Option<u64> = None;
        for value in head.values("content-length") {
            for element in value.split(|&b| b == b',') {
                let element = trim_ows(element);
                let parsed = parse_decimal(element).ok_or_else(|| {
                    RequestError::BadContentLength(String::from_utf8_lossy(value).into_owned())
                })?;
                match length {
                    Some(previous) if previous != parsed => {
                        return Err(RequestError::ConflictingContentLength)
                    }
                    _ => length = Some(parsed),
                }
            }
        }
        let mut codings: Vec<&[u8]> = Vec::new();
        let mut has_te = false;
        for value in head.values("transfer-encoding") {
            has_te = true;
            codings.extend(list_elements(value));
        }
        if has_te {
            if length.is_some() {
                return Err(RequestError::TransferEncodingWithContentLength);
            }
            if head.version == Version::Http10 {
                return Err(RequestError::TransferEncodingInHttp10);
            }
            let all = || {
                let joined: Vec<String> = codings
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                joined.join(", ")
            };
            let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
            // Without a final, single `chunked` the length is unknowable: 400.
            if codings.last().is_none_or(|c| !chunked(c))
                || codings.iter().filter(|c| chunked(c)).count() > 1
            {
                return Err(RequestError::NotChunked(all()));
            }
            // Any other coding (gzip, …) would have to be decoded: not implemented.
            if let Some(other) = codings.iter().find(|c| !chunked(c)) {
                return Err(RequestError::UnsupportedTransferCoding(
                    String::from_utf8_lossy(other).into_owned(),
                ));
            }
            return Ok(BodyLength::Chunked);
        }
        match length {
            None => Ok(BodyLength::Empty),
            Some(n) if n > self.limits.max_body_bytes => Err(RequestError::BodyTooLarge {
                limit: self.limits.max_body_bytes,
            }),
            Some(n) => Ok(BodyLength::Length(n)),
        }
    }
}

/// The first `max` (or fewer) bytes of `buf[pos..]`: a borrow of `buf` alone, so the decoder's
/// other fields stay writable while it is held.
fn first_pending(buf: &[u8], pos: usize, max: usize) -> &[u8] {
    let pending = buf.get(pos..).unwrap_or_default();
    pending.get(..max).unwrap_or(pending)
}

/// Searches `window[from..]` for the blank line that ends a head whose first
/// line starts at 0. Returns the index just after it, if found, and where the
/// next search should start.
fn find_blank_line(window: &[u8], from: usize) -> (Option<usize>, usize) {
    // Every index here is within `window` plus 3: no overflow.
    let mut i = from;
    while let Some(offset) = window
        .get(i..)
        .and_then(|w| w.iter().position(|&b| b == b'\n'))
    {
        let lf = i.saturating_add(offset);
        match window.get(lf.saturating_add(1)..) {
            Some([b'\n', ..]) => return (Some(lf.saturating_add(2)), lf),
            Some([b'\r', b'\n', ..]) => return (Some(lf.saturating_add(3)), lf),
            // Not decidable yet: look at this LF again when more bytes are in.
            Some([]) | Some([b'\r']) => return (None, lf),
            _ => i = lf.saturating_add(1),
        }
    }
    (None, window.len().max(from))
}

/// While the request line is incomplete, refuses a request-target that is
/// already longer than the limit. Incremental: each byte is looked at once,
/// however slowly the line arrives.
#[derive(Debug, Clone, Copy, Default)]
struct TargetScan {
    /// Bytes of the head already looked at.
    scanned: usize,
    /// Where the target starts (after the method's SP), once seen.
    start: Option<usize>,
    /// The target ended within the limit: nothing more to check.
    done: bool,
}

impl TargetScan {
    fn advance(&mut self, window: &[u8], max_uri: usize) -> Result<(), RequestError> {
        if self.done {
            return Ok(());
        }
        for (i, &b) in window.iter().enumerate().skip(self.scanned) {
            match self.start {
                None if b == b' ' || b == b'\n' => self.start = Some(i.saturating_add(1)),
                None => {}
                Some(_) if b == b' ' || b == b'\r' || b == b'\n' => {
                    self.done = true;
                    return Ok(());
                }
                // `start <= i`: it was set at an earlier byte.
                Some(start) if i.saturating_add(1).saturating_sub(start) > max_uri => {
                    return Err(RequestError::UriTooLong { limit: max_uri })
                }
                Some(_) => {}
            }
        }
        self.scanned = window.len();
        Ok(())
    }
}

/// A header line that starts with SP or HTAB (obs-fold, RFC 9112 §5.2).
fn has_obs_fold(head: &[u8]) -> bool {
    head.windows(2).any(|w| matches!(w, [b'\n', b' ' | b'\t']))
}

/// A LF not preceded by CR.
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'\n')
        || bytes
            .windows(2)
            .any(|w| matches!(w, [before, b'\n'] if *before != b'\r'))
}

/// `HTTP/2.0`, `HTTP/3` … in the request line: a version too new, not garbage.
fn newer_version(head: &[u8]) -> Option<String> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = head.get(..line_end)?;
    let version = line.get(line.iter().rposition(|&b| b == b' ')?.checked_add(1)?..)?;
    let digits = version.strip_prefix(b"HTTP/")?;
    let ok = match digits {
        [major] => (b'2'..=b'9').contains(major),
        [major, b'.', minor] => (b'2'..=b'9').contains(major) && minor.is_ascii_digit(),
        _ => false,
    };
    ok.then(|| String::from_utf8_lossy(version).into_owned())
}

fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// The non-empty elements of a comma-separated list (RFC 9110 §5.6.1).
fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// Digits only (no sign, no whitespace), no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// `chunk-size [ BWS ";" chunk-ext ]` without the CRLF.
fn parse_chunk_size(line: &[u8]) -> Result<u64, RequestError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(RequestError::BadChunkSize);
    }
    let (hex, rest) = line
        .split_at_checked(digits)
        .ok_or(RequestError::BadChunkSize)?;
    let mut size: u64 = 0;
    for &b in hex {
        let digit = (b as char).to_digit(16).unwrap_or(0);
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(RequestError::ChunkSizeOverflow)?;
    }
    let rest = trim_ows(rest);
    match rest {
        [] => Ok(size),
        // Extensions are ignored, but may not smuggle control bytes.
        [b';', ext @ ..] if ext.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)) => Ok(size),
        _ => Err(RequestError::BadChunkSize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pushes `input` at once and polls until the decoder needs more bytes
    /// or fails. Consecutive body pieces are merged.
    fn decode(limits: Limits, input: &[u8]) -> (Vec<RequestEvent>, Option<RequestError>) {
        decode_pieces(limits, &[input])
    }

    fn decode_pieces(
        limits: Limits,
        pieces: &[&[u8]],
    ) -> (Vec<RequestEvent>, Option<RequestError>) {
        let mut decoder = RequestDecoder::new(limits);
        let mut events: Vec<RequestEvent> = Vec::new();
        for piece in pieces {
            decoder.push(piece);
            loop {
                match decoder.poll() {
                    Ok(Some(RequestEvent::Body(data))) => {
                        assert!(!data.is_empty(), "empty body piece");
                        match events.last_mut() {
                            Some(RequestEvent::Body(previous)) => previous.extend_from_slice(&data),
                            _ => events.push(RequestEvent::Body(data)),
                        }
                    }
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(error) => {
                        assert_eq!(decoder.poll(), Err(error.clone()), "decoder stays failed");
                        assert_eq!(decoder.buffered(), 0, "a failed decoder keeps no bytes");
                        return (events, Some(error));
                    }
                }
            }
        }
        (events, None)
    }

    /// The single head of a complete request.
    fn head_of(input: &str) -> RequestHead {
        match decode(Limits::default(), input.as_bytes()) {
            (events, None) => match events.first() {
                Some(RequestEvent::Head(head)) => head.clone(),
                other => panic!("{input:?}: {other:?}"),
            },
            (_, Some(error)) => panic!("{input:?}: {error}"),
        }
    }

    /// The error (and so the status) a request gets with these limits.
    fn error_with(limits: Limits, input: &[u8]) -> RequestError {
        match decode(limits, input) {
            (_, Some(error)) => error,
            (events, None) => panic!("{:?} accepted: {events:?}", String::from_utf8_lossy(input)),
        }
    }

    fn error_of(input: &str) -> RequestError {
        error_with(Limits::default(), input.as_bytes())
    }

    fn small_limits() -> Limits {
        Limits {
            max_head_bytes: 256,
            max_uri_bytes: 64,
            max_headers: 4,
            max_body_bytes: 100,
        }
    }

    #[test]
    fn default_limits_are_the_documented_ones() {
        let limits = Limits::default();
        assert_eq!(limits.max_head_bytes, 16384);
        assert_eq!(limits.max_uri_bytes, 8192);
        assert_eq!(limits.max_headers, 100);
        assert_eq!(limits.max_body_bytes, 1_048_576);
    }

    #[test]
    fn simple_get_gives_head_then_end() {
        let (events, error) = decode(
            Limits::default(),
            b"GET /index.html?x=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing:  spaced value \r\n\r\n",
        );
        assert_eq!(error, None);
        let [RequestEvent::Head(head), RequestEvent::End] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(head.method, Method::Get);
        assert_eq!(head.target, "/index.html?x=1");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.body, BodyLength::Empty);
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(head.header("HOST"), Some(&b"example.com"[..]));
        assert_eq!(head.header("x-thing"), Some(&b"spaced value"[..]));
        assert_eq!(head.header("missing"), None);
    }

    #[test]
    fn pipelined_requests_come_out_in_order() {
        let input = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
            PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
            3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n\
            HEAD /d HTTP/1.1\r\nHost: h\r\n\r\n";
        let (events, error) = decode(Limits::default(), input);
        assert_eq!(error, None);
        let summary: Vec<String> = events
            .iter()
            .map(|e| match e {
                RequestEvent::Head(h) => format!("{} {} {:?}", h.method.as_str(), h.target, h.body),
                RequestEvent::Body(b) => String::from_utf8_lossy(b).into_owned(),
                RequestEvent::End => "end".into(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "GET /a Empty",
                "end",
                "POST /b Length(5)",
                "hello",
                "end",
                "PUT /c Chunked",
                "abcde",
                "end",
                "HEAD /d Empty",
                "end"
            ]
        );
    }

    #[test]
    fn a_request_sent_one_byte_at_a_time_is_decoded() {
        let input = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n";
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        let (events, error) = decode_pieces(Limits::default(), &pieces);
        assert_eq!(error, None);
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], RequestEvent::Body(b"wiki".to_vec()));
        assert_eq!(events[2], RequestEvent::End);
    }

    #[test]
    fn head_method_and_zero_length_body() {
        let head = head_of("HEAD / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(head.method, Method::Head);
        assert_eq!(head.body, BodyLength::Length(0));
        let (events, _) = decode(
            Limits::default(),
            b"HEAD / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(events.len(), 2, "head then end, no body piece: {events:?}");
        assert_eq!(
            head_of("BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n").method,
            Method::Other("BREW".into())
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection_tokens() {
        assert!(head_of("GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive);
        assert!(!head_of("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            !head_of("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, CLOSE\r\n\r\n").keep_alive
        );
        assert!(
            !head_of("GET / HTTP/1.1\r\nHost: h\r\nConnection: te\r\nConnection: close\r\n\r\n")
                .keep_alive
        );
        assert!(!head_of("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head_of("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head_of("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
        assert_eq!(head_of("GET / HTTP/1.0\r\n\r\n").version, Version::Http10);
    }

    #[test]
    fn expect_100_continue_is_reported() {
        let head = head_of(
            "PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(head.expect_continue);
        assert!(!head_of("PUT /f HTTP/1.1\r\nHost: h\r\n\r\n").expect_continue);
    }

    #[test]
    fn empty_lines_before_a_request_are_ignored() {
        let (events, error) = decode(
            Limits::default(),
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        );
        assert_eq!(error, None);
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn bad_request_lines_are_400() {
        for input in [
            "GET\r\n\r\n",
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.2\r\nHost: h\r\n\r\n",
            "GET / FTP/1.1\r\nHost: h\r\n\r\n",
            " GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            "\rGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(error_of(input).status(), 400, "{input:?}");
        }
        let non_utf8 = error_with(
            Limits::default(),
            b"GET /\xff\xfe HTTP/1.1\r\nHost: h\r\n\r\n",
        );
        assert_eq!(non_utf8.status(), 400);
    }

    #[test]
    fn http_2_and_later_are_505() {
        let error = error_of("GET / HTTP/2.0\r\nHost: h\r\n\r\n");
        assert_eq!(error, RequestError::UnsupportedVersion("HTTP/2.0".into()));
        assert_eq!(error.status(), 505);
        assert_eq!(error_of("GET / HTTP/3\r\nHost: h\r\n\r\n").status(), 505);
    }

    #[test]
    fn bad_header_names_are_400() {
        for input in [
            "GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\n: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nName : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nFo(o: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
        ] {
            assert_eq!(error_of(input).status(), 400, "{input:?}");
        }
    }

    #[test]
    fn obs_fold_is_400() {
        let error = error_of("GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n b\r\n\r\n");
        assert_eq!(error, RequestError::ObsFold);
        assert_eq!(error.status(), 400);
        assert_eq!(
            error_of("GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n\tb\r\n\r\n"),
            RequestError::ObsFold
        );
    }

    #[test]
    fn nul_and_bare_cr_in_values_are_400() {
        let nul = error_with(
            Limits::default(),
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
        );
        assert_eq!(nul, RequestError::BadHeaderValue);
        assert_eq!(nul.status(), 400);
        let cr = error_with(
            Limits::default(),
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
        );
        assert_eq!(cr.status(), 400);
        let del = error_with(
            Limits::default(),
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n",
        );
        assert_eq!(del.status(), 400);
    }

    #[test]
    fn missing_or_repeated_host_is_400() {
        assert_eq!(
            error_of("GET / HTTP/1.1\r\n\r\n"),
            RequestError::MissingHost
        );
        assert_eq!(
            error_of("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
            RequestError::MultipleHost
        );
        assert_eq!(error_of("GET / HTTP/1.1\r\n\r\n").status(), 400);
    }

    #[test]
    fn an_incomplete_head_reaching_the_limit_is_431_without_growing() {
        let limits = small_limits();
        let mut decoder = RequestDecoder::new(limits);
        decoder.push(b"GET / HTTP/1.1\r\nHost: h\r\nX-Filler: ");
        assert_eq!(decoder.poll(), Ok(None));
        assert!(decoder.head_in_progress());
        let filler = vec![b'a'; limits.max_head_bytes];
        decoder.push(&filler);
        let error = decoder.poll().unwrap_err();
        assert_eq!(error, RequestError::HeadTooLarge { limit: 256 });
        assert_eq!(error.status(), 431);
        assert_eq!(decoder.buffered(), 0);
        decoder.push(b"more");
        assert_eq!(
            decoder.buffered(),
            0,
            "a failed decoder drops what is pushed"
        );
        assert_eq!(decoder.poll(), Err(error));
    }

    #[test]
    fn a_large_push_of_an_endless_head_is_cut_to_the_limit_before_poll() {
        let limits = small_limits();
        let mut decoder = RequestDecoder::new(limits);
        let mut junk = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
        junk.resize(64 * 1024, b'j');
        decoder.push(&junk);
        assert_eq!(decoder.buffered(), limits.max_head_bytes);
        decoder.push(&junk);
        assert_eq!(decoder.buffered(), limits.max_head_bytes);
        assert_eq!(decoder.poll().map_err(|e| e.status()), Err(431));
        // A complete head followed by more bytes than the limit is kept whole.
        let mut decoder = RequestDecoder::new(limits);
        let mut pipelined = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n".to_vec();
        pipelined.resize(pipelined.len() + 100, b'b');
        pipelined.extend_from_slice(&junk);
        decoder.push(&pipelined);
        assert_eq!(decoder.buffered(), pipelined.len());
        assert!(matches!(decoder.poll(), Ok(Some(RequestEvent::Head(_)))));
        assert!(matches!(decoder.poll(), Ok(Some(RequestEvent::Body(_)))));
        assert_eq!(decoder.poll(), Ok(Some(RequestEvent::End)));
        // The pipelined endless head behind it is cut as soon as it is the current head.
        assert_eq!(decoder.buffered(), limits.max_head_bytes);
        assert_eq!(decoder.poll().map_err(|e| e.status()), Err(431));
    }

    #[test]
    fn a_head_of_exactly_the_limit_is_accepted_and_one_byte_more_is_431() {
        let limits = small_limits();
        let start = "GET / HTTP/1.1\r\nHost: h\r\nX: ";
        let fill = limits.max_head_bytes - start.len() - 4;
        let exact = format!("{start}{}\r\n\r\n", "v".repeat(fill));
        assert_eq!(exact.len(), limits.max_head_bytes);
        assert_eq!(decode(limits, exact.as_bytes()).1, None);
        let over = format!("{start}{}\r\n\r\n", "v".repeat(fill + 1));
        assert_eq!(error_with(limits, over.as_bytes()).status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let input = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        let error = error_with(small_limits(), input.as_bytes());
        assert_eq!(error, RequestError::TooManyHeaders { limit: 4 });
        assert_eq!(error.status(), 431);
    }

    #[test]
    fn absurd_uris_are_414_even_before_the_request_line_ends() {
        let limits = small_limits();
        let long = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(64));
        assert_eq!(
            error_with(limits, long.as_bytes()),
            RequestError::UriTooLong { limit: 64 }
        );
        let ok = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(63));
        assert_eq!(decode(limits, ok.as_bytes()).1, None);
        // Partial request line: 65 target bytes, no SP, no CRLF yet.
        let mut decoder = RequestDecoder::new(limits);
        decoder.push(format!("GET /{}", "a".repeat(63)).as_bytes());
        assert_eq!(decoder.poll(), Ok(None));
        decoder.push(b"a");
        let error = decoder.poll().unwrap_err();
        assert_eq!(error.status(), 414);
        // Byte by byte: refused at the first target byte past the limit.
        let mut decoder = RequestDecoder::new(limits);
        let line = format!("GET /{}", "b".repeat(100));
        let mut refused_at = None;
        for (i, byte) in line.bytes().enumerate() {
            decoder.push(&[byte]);
            if decoder.poll().is_err() {
                refused_at = Some(i + 1);
                break;
            }
        }
        assert_eq!(refused_at, Some("GET ".len() + 65));
        // With the default limits too, long before the head limit.
        let mut decoder = RequestDecoder::new(Limits::default());
        decoder.push(format!("GET /{}", "x".repeat(8192)).as_bytes());
        assert_eq!(decoder.poll().map_err(|e| e.status()), Err(414));
    }

    #[test]
    fn content_length_is_strict() {
        for value in [
            "abc",
            "+5",
            "-1",
            "5 5",
            "0x10",
            "",
            "99999999999999999999999",
            "5;",
        ] {
            let input = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {value}\r\n\r\n");
            let error = error_of(&input);
            assert!(
                matches!(error, RequestError::BadContentLength(_)),
                "{value:?}: {error}"
            );
            assert_eq!(error.status(), 400);
        }
        for input in [
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n",
        ] {
            assert_eq!(
                error_of(input),
                RequestError::ConflictingContentLength,
                "{input:?}"
            );
        }
        // Agreeing values are one value; the name is case-insensitive.
        for input in [
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nCONTENT-LENGTH: 3, 3\r\n\r\n",
        ] {
            assert_eq!(head_of(input).body, BodyLength::Length(3), "{input:?}");
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        let te = |value: &str| {
            format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {value}\r\n\r\n")
        };
        assert_eq!(
            error_of("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
            RequestError::TransferEncodingWithContentLength
        );
        for value in ["gzip", "chunked, gzip", "chunked, chunked", "", ","] {
            let error = error_of(&te(value));
            assert!(
                matches!(error, RequestError::NotChunked(_)),
                "{value:?}: {error}"
            );
            assert_eq!(error.status(), 400);
        }
        for value in ["gzip, chunked", "foo, chunked", "chunked;x=1, chunked"] {
            let error = error_of(&te(value));
            assert_eq!(error.status(), 501, "{value:?}: {error}");
        }
        assert_eq!(head_of(&te("Chunked")).body, BodyLength::Chunked);
        assert_eq!(
            head_of("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n").body,
            BodyLength::Chunked
        );
        assert_eq!(
            error_of("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            RequestError::TransferEncodingInHttp10
        );
    }

    #[test]
    fn bodies_over_the_limit_are_413() {
        let limits = small_limits();
        // Content-Length already says so: refused at the head, no body needed.
        let error = error_with(
            limits,
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n",
        );
        assert_eq!(error, RequestError::BodyTooLarge { limit: 100 });
        assert_eq!(error.status(), 413);
        assert_eq!(
            decode(
                limits,
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n"
            )
            .1,
            None
        );
        // Chunked: refused when the sizes add up past the limit.
        let (events, error) = decode(
            limits,
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n\
              aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n33\r\n",
        );
        assert_eq!(error.map(|e| e.status()), Some(413));
        assert_eq!(
            events.len(),
            2,
            "head and the first chunk came out: {events:?}"
        );
    }

    fn chunked(body: &str) -> Vec<u8> {
        format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
            .into_bytes()
    }

    #[test]
    fn chunk_sizes_are_strict_hex_with_overflow_check() {
        for body in [
            "zz\r\n",
            "\r\n\r\n",
            "-5\r\nabcde\r\n0\r\n\r\n",
            " 5\r\nabcde\r\n0\r\n\r\n",
            "5 x\r\n",
        ] {
            assert_eq!(
                error_with(Limits::default(), &chunked(body)),
                RequestError::BadChunkSize,
                "{body:?}"
            );
        }
        let overflow = error_with(Limits::default(), &chunked("10000000000000000\r\n"));
        assert_eq!(overflow, RequestError::ChunkSizeOverflow);
        assert_eq!(overflow.status(), 400);
        // A size that fits in 64 bits but not in the body limit is 413.
        assert_eq!(
            error_with(Limits::default(), &chunked("ffffffffffffffff\r\n")).status(),
            413
        );
    }

    #[test]
    fn chunk_extensions_are_allowed_but_bounded() {
        let (events, error) = decode(
            Limits::default(),
            &chunked("3;name=\"v\" ; x\r\nabc\r\n0;last\r\n\r\n"),
        );
        assert_eq!(error, None);
        assert_eq!(events[1], RequestEvent::Body(b"abc".to_vec()));
        assert_eq!(
            error_with(Limits::default(), &chunked("3;a\0b\r\nabc\r\n")),
            RequestError::BadChunkSize
        );
        let long = chunked(&format!("3;{}", "e".repeat(MAX_CHUNK_LINE)));
        assert_eq!(
            error_with(Limits::default(), &long),
            RequestError::ChunkLineTooLong {
                limit: MAX_CHUNK_LINE
            }
        );
    }

    #[test]
    fn bad_crlfs_in_chunked_bodies_are_400() {
        for body in [
            "3\nabc\r\n0\r\n\r\n",
            "3\r\nabcX\r\n0\r\n\r\n",
            "3\r\nabc\n0\r\n\r\n",
            "3\r\nabc\r\n0\r\nX: y\n\r\n",
        ] {
            let error = error_with(Limits::default(), &chunked(body));
            assert_eq!(error.status(), 400, "{body:?}: {error}");
        }
    }

    #[test]
    fn trailers_are_bounded_and_validated() {
        let (events, error) = decode(Limits::default(), &chunked("0\r\nX-Sum: 1\r\nY: 2\r\n\r\n"));
        assert_eq!(error, None);
        assert_eq!(events.len(), 2, "head, end: {events:?}");
        let limits = small_limits();
        let too_long = chunked(&format!("0\r\nX: {}", "t".repeat(limits.max_head_bytes)));
        let error = error_with(limits, &too_long);
        assert_eq!(error, RequestError::TrailersTooLarge { limit: 256 });
        assert_eq!(error.status(), 431);
        let many = error_with(
            limits,
            &chunked("0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n"),
        );
        assert_eq!(many, RequestError::TooManyTrailers { limit: 4 });
        assert_eq!(many.status(), 431);
        assert_eq!(
            error_with(limits, &chunked("0\r\nBad Name: 1\r\n\r\n")),
            RequestError::BadTrailer
        );
    }

    #[test]
    fn idle_and_head_in_progress_track_the_message_boundary() {
        let mut decoder = RequestDecoder::new(Limits::default());
        assert!(decoder.is_idle() && !decoder.head_in_progress());
        decoder.push(b"POST / HTTP/1.1\r\nHo");
        assert_eq!(decoder.poll(), Ok(None));
        assert!(decoder.head_in_progress() && !decoder.is_idle());
        decoder.push(b"st: h\r\nContent-Length: 2\r\n\r\nx");
        assert!(matches!(decoder.poll(), Ok(Some(RequestEvent::Head(_)))));
        assert!(!decoder.head_in_progress() && !decoder.is_idle());
        assert_eq!(decoder.poll(), Ok(Some(RequestEvent::Body(b"x".to_vec()))));
        assert_eq!(decoder.poll(), Ok(None));
        decoder.push(b"y");
        assert_eq!(decoder.poll(), Ok(Some(RequestEvent::Body(b"y".to_vec()))));
        assert_eq!(decoder.poll(), Ok(Some(RequestEvent::End)));
        assert!(decoder.is_idle());
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.poll(), Ok(None));
    }

    /// A generated request and what it must decode to.
    #[derive(Debug, Clone)]
    struct Model {
        method: &'static str,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// `None`: Content-Length (or no body when empty); `Some`: chunk sizes.
        chunks: Option<Vec<usize>>,
        extensions: bool,
        trailers: bool,
    }

    impl Model {
        fn bytes(&self) -> Vec<u8> {
            let mut out = format!(
                "{} {} HTTP/1.1\r\nHost: example\r\n",
                self.method, self.target
            )
            .into_bytes();
            for (name, value) in &self.headers {
                out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            match &self.chunks {
                None if self.body.is_empty() => out.extend_from_slice(b"\r\n"),
                None => {
                    out.extend_from_slice(
                        format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes(),
                    );
                    out.extend_from_slice(&self.body);
                }
                Some(sizes) => {
                    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    let mut at = 0;
                    for &size in sizes {
                        let ext = if self.extensions { ";e=1" } else { "" };
                        out.extend_from_slice(format!("{size:X}{ext}\r\n").as_bytes());
                        out.extend_from_slice(&self.body[at..at + size]);
                        out.extend_from_slice(b"\r\n");
                        at += size;
                    }
                    out.extend_from_slice(b"0\r\n");
                    if self.trailers {
                        out.extend_from_slice(b"X-Checksum: abc\r\n");
                    }
                    out.extend_from_slice(b"\r\n");
                }
            }
            out
        }
    }

    fn model() -> impl Strategy<Value = Model> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH"]),
            "/[a-z0-9/._~%-]{0,30}",
            prop::collection::vec(("X-[A-Za-z]{1,10}", "[ -~]{0,20}"), 0..5),
            prop::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
            prop::collection::vec(1usize..80, 1..8),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(method, target, headers, body, use_chunks, cuts, extensions, trailers)| {
                    let chunks = use_chunks.then(|| {
                        // Cut the body into chunks of the generated sizes.
                        let mut sizes = Vec::new();
                        let mut left = body.len();
                        for cut in cuts.iter().cycle() {
                            if left == 0 {
                                break;
                            }
                            let size = (*cut).min(left);
                            sizes.push(size);
                            left -= size;
                        }
                        sizes
                    });
                    let headers = headers
                        .into_iter()
                        .map(|(n, v)| (n, v.trim().to_owned()))
                        .collect();
                    Model {
                        method,
                        target,
                        headers,
                        body,
                        chunks,
                        extensions,
                        trailers,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn any_split_of_a_pipelined_stream_gives_the_same_events(
            models in prop::collection::vec(model(), 1..5),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let stream: Vec<u8> = models.iter().flat_map(Model::bytes).collect();
            let (whole, error) = decode(Limits::default(), &stream);
            prop_assert_eq!(error, None);
            // The events are the generated requests.
            prop_assert_eq!(whole.len(), models.iter().map(|m| if m.body.is_empty() { 2 } else { 3 }).sum::<usize>());
            let mut events = whole.iter();
            for m in &models {
                let Some(RequestEvent::Head(head)) = events.next() else { panic!("head expected") };
                prop_assert_eq!(head.method.as_str(), m.method);
                prop_assert_eq!(&head.target, &m.target);
                for (name, value) in &m.headers {
                    prop_assert!(head.headers.iter().any(|h| &h.name == name && h.value == value.as_bytes()));
                }
                if !m.body.is_empty() {
                    prop_assert_eq!(events.next(), Some(&RequestEvent::Body(m.body.clone())));
                }
                prop_assert_eq!(events.next(), Some(&RequestEvent::End));
            }
            // Split at random points: same events.
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for point in points {
                pieces.push(&stream[at..point]);
                at = point;
            }
            pieces.push(&stream[at..]);
            let (split, error) = decode_pieces(Limits::default(), &pieces);
            prop_assert_eq!(error, None);
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            prefix in prop::sample::select(vec![
                &b""[..],
                b"GET / HTTP/1.1\r\n",
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n",
            ]),
            piece in 1usize..64,
        ) {
            let mut input = prefix.to_vec();
            input.extend_from_slice(&bytes);
            let limits = small_limits();
            let _ = decode(limits, &input);
            let pieces: Vec<&[u8]> = input.chunks(piece).collect();
            let _ = decode_pieces(limits, &pieces);
        }

        #[test]
        fn incomplete_heads_never_buffer_past_the_limit(
            pieces in prop::collection::vec(prop::collection::vec(32u8..127, 1..50), 1..40),
        ) {
            // Printable bytes without LF: a head that never ends.
            let limits = small_limits();
            let mut decoder = RequestDecoder::new(limits);
            for piece in &pieces {
                decoder.push(piece);
                prop_assert!(decoder.buffered() <= limits.max_head_bytes);
                match decoder.poll() {
                    Ok(None) => prop_assert!(decoder.buffered() < limits.max_head_bytes),
                    Ok(Some(event)) => panic!("{event:?}"),
                    Err(error) => {
                        prop_assert!([400, 414, 431].contains(&error.status()), "{}", error);
                        break;
                    }
                }
            }
        }
    }
}
