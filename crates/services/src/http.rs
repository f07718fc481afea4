//! `http`: an HTTP/1.1 and HTTP/2 server for static files, `/healthz` and `/metrics`.
//!
//! Requests are answered by a protocol-neutral core ([`Shared::respond`]: a [`Request`] in, a
//! [`Response`] out) that HTTP/1.1 (this module's `HttpSession`) and HTTP/2 (`h2`, on the
//! first bytes being the client preface, or ALPN `h2`) write each their own way.
//!
//! The protocol itself (request parsing, limits, ranges, paths, dates) is the sans-IO codec in
//! `plexus_proto::http`; this module owns what touches the world: the document root (opened
//! once as a directory descriptor, files opened below it with `openat2(RESOLVE_BENEATH)`, so
//! neither `..` nor a symlink can leave it), file bodies queued as `sendfile` regions, the
//! per-session header deadline, and the request counters `/metrics` reports.
//!
//! Responses leave strictly in request order: each request is answered when its message ends,
//! and when the peer stops reading (the outbound queue passes the high watermark) the session
//! stops parsing pipelined requests until the queue drains.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use plexus_proto::http::{
    content_type, entity_tag, format_http_date, if_none_match, if_range_matches, normalize_path,
    origin_form, parse_http_date, parse_range, write_head, Limits, Method, RangeRequest,
    RequestDecoder, RequestError, RequestEvent, RequestHead, Version,
};
use tracing::{debug, info, warn};

use plexus::config::HttpConfig;
use plexus::prometheus::{family, sample};
use plexus::{LogThrottle, LoopLocal, Service, Session, SessionHandler};

mod access_log;
mod h2;
mod precompressed;
mod status;

use access_log::{AccessLog, AccessLogEntry};

/// Files up to this size are read and sent with their head in one write; larger ones are
/// queued as file regions (sendfile on plain TCP).
const INLINE_FILE_MAX: u64 = 32 * 1024;

/// What a response needs to know about a file, computed once per open (or cache fill).
struct FileMeta {
    len: u64,
    modified: SystemTime,
    etag: String,
    last_modified: String,
    mime: &'static str,
    /// The coding of a precompressed variant (`Content-Encoding`); `None` = the file itself.
    encoding: Option<&'static str>,
}

/// Where a file's bytes come from.
enum FileBody {
    /// Cached (small files): no system call to serve it.
    Memory(Bytes),
    /// Open below the root: read (small) or sent with sendfile (large).
    File(File),
}

/// The page served at `/` when no `[http].root` is configured.
const BUILTIN_INDEX: &str = "<!doctype html>\n<html><head><title>plexus</title></head>\
<body><h1>plexus</h1><p>It works. Configure <code>[http].root</code> to serve files; \
see <a href=\"/metrics\">/metrics</a> and <a href=\"/healthz\">/healthz</a>.</p></body></html>\n";

/// Upper bounds (seconds) of the request latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

/// Small files kept in memory, per event loop (a [`LoopLocal`]: no lock on the hot path), for
/// at most `file_cache_valid` before the file is looked at again (as nginx's
/// `open_file_cache_valid`). Bounded by `file_cache_bytes` per loop; when full it starts over
/// (entries are cheap to refill).
struct FileCache {
    store: LoopLocal<CacheStore>,
    capacity: usize,
    valid: Duration,
}

struct CachedFile {
    meta: Arc<FileMeta>,
    body: Bytes,
    filled: Instant,
}

/// One loop's cached files, by path (looked up by `&str`: no allocation on a hit).
#[derive(Default)]
struct CacheStore {
    files: std::collections::HashMap<String, CachedFile>,
    bytes: usize,
}

impl FileCache {
    fn new(capacity: usize, valid: Duration) -> FileCache {
        FileCache {
            store: LoopLocal::new(),
            capacity,
            valid,
        }
    }

    /// Whether a file of `len` bytes is kept in memory.
    fn admits(&self, len: u64) -> bool {
        len <= INLINE_FILE_MAX && (len as usize) <= self.capacity
    }

    fn get(&self, session: &mut Session<'_>, key: &str) -> Option<(Arc<FileMeta>, FileBody)> {
        if self.capacity == 0 {
            return None;
        }
        let now = session.now();
        let entry = session.loop_local(&self.store).files.get(key)?;
        (now.duration_since(entry.filled) < self.valid).then(|| {
            (
                Arc::clone(&entry.meta),
                FileBody::Memory(entry.body.clone()),
            )
        })
    }

    fn insert(&self, session: &mut Session<'_>, key: String, meta: Arc<FileMeta>, body: Bytes) {
        let filled = session.now();
        let store = session.loop_local(&self.store);
        if store.bytes + body.len() > self.capacity {
            store.files.clear();
            store.bytes = 0;
        }
        store.bytes += body.len();
        let entry = CachedFile { meta, body, filled };
        if let Some(old) = store.files.insert(key, entry) {
            store.bytes -= old.body.len();
        }
    }
}

/// The `Date` header value of one loop, formatted at most once per second.
#[derive(Default)]
struct DateCache {
    second: Option<u64>,
    value: String,
}

/// The http service. Shared by every http listener of a server.
pub struct Http {
    shared: Arc<Shared>,
}

struct Shared {
    /// The document root, opened once; `None` = built-in pages only.
    root: Option<File>,
    root_path: Option<PathBuf>,
    limits: Limits,
    header_timeout: Duration,
    cache: FileCache,
    dates: LoopLocal<DateCache>,
    stats: HttpStats,
    /// Refused requests are logged at most once a second (a flood must not flood the log).
    refusals: Mutex<LogThrottle>,
    /// `/status` and `/status.json` (their own module).
    status: status::StatusPage,
    /// HTTP/2: its SETTINGS and counters (its own module).
    h2: h2::H2Shared,
    /// `Strict-Transport-Security` on responses over TLS (`[http] hsts`).
    hsts: Option<String>,
    /// One line per response (`[http] access_log`), written by its own thread.
    access_log: Option<AccessLog>,
    /// `x.br` / `x.gz` next to `x` (`[http] precompressed`).
    precompressed: precompressed::Precompressed,
}

/// Counters of every http session, rendered by `/metrics`.
#[derive(Default)]
struct HttpStats {
    /// Responses by status class: 1xx … 5xx.
    responses: [AtomicU64; 5],
    /// Requests refused by the parser, by status (400, 408, 413, 414, 431, 501, 505).
    rejected: [AtomicU64; REJECT_STATUSES.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
}

const REJECT_STATUSES: [u16; 7] = [400, 408, 413, 414, 431, 501, 505];

impl HttpStats {
    fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }

    fn rejected(&self, status: u16) {
        if let Some(index) = REJECT_STATUSES.iter().position(|s| *s == status) {
            self.rejected[index].fetch_add(1, Relaxed);
        }
    }

    fn latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(index) = LATENCY_BUCKETS.iter().position(|le| seconds <= *le) {
            self.latency_buckets[index].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn write_prometheus(&self, out: &mut String) {
        family(
            out,
            "http_responses_total",
            "counter",
            "HTTP responses, by status class.",
        );
        for (index, count) in self.responses.iter().enumerate() {
            let class = format!("{}xx", index + 1);
            sample(
                out,
                "http_responses_total",
                &[("class", &class)],
                count.load(Relaxed),
            );
        }
        family(
            out,
            "http_requests_rejected_total",
            "counter",
            "Requests refused before a response could be made, by status (malformed, \
             oversized, too slow, unsupported).",
        );
        for (status, count) in REJECT_STATUSES.iter().zip(&self.rejected) {
            sample(
                out,
                "http_requests_rejected_total",
                &[("status", &status.to_string())],
                count.load(Relaxed),
            );
        }
        let name = "plexus_http_request_duration_seconds";
        out.push_str(&format!(
            "# HELP {name} Time from a complete request head to its queued response.\n\
             # TYPE {name} histogram\n"
        ));
        let mut cumulative = 0;
        for (le, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += count.load(Relaxed);
            out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {cumulative}\n"));
        }
        let total = self.latency_count.load(Relaxed);
        let sum = self.latency_sum_nanos.load(Relaxed) as f64 / 1e9;
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {total}\n{name}_sum {sum}\n{name}_count {total}\n"
        ));
    }
}

impl Http {
    /// The service for `[http]`. A root that cannot be opened is logged and leaves only the
    /// built-in pages (configuration checking reports it before this point).
    pub fn new(config: &HttpConfig) -> Http {
        let root = config.root.as_ref().and_then(|path| {
            use std::os::unix::fs::OpenOptionsExt;
            // O_DIRECTORY: a FIFO put where the root should be fails instead of blocking.
            let open = File::options()
                .read(true)
                .custom_flags(plexus_sys::fs::OPEN_DIRECTORY_FLAGS)
                .open(path);
            match open.and_then(|dir| {
                if dir.metadata()?.is_dir() {
                    Ok(dir)
                } else {
                    Err(io::Error::other("not a directory"))
                }
            }) {
                Ok(dir) => Some(dir),
                Err(err) => {
                    warn!(
                        "http.root {}: {err}; serving built-in pages only",
                        path.display()
                    );
                    None
                }
            }
        });
        let limits = Limits {
            max_head_bytes: config.max_header_bytes,
            max_uri_bytes: config.max_uri_bytes,
            max_body_bytes: config.max_body_bytes as u64,
            ..Limits::default()
        };
        Http {
            shared: Arc::new(Shared {
                root_path: root.as_ref().and(config.root.clone()),
                root,
                limits,
                header_timeout: config.header_timeout,
                cache: FileCache::new(config.file_cache_bytes, config.file_cache_valid),
                dates: LoopLocal::new(),
                stats: HttpStats::default(),
                refusals: Mutex::new(LogThrottle::new()),
                status: status::StatusPage::new(config),
                h2: h2::H2Shared::new(config),
                hsts: config.hsts.clone(),
                access_log: AccessLog::new(config),
                precompressed: precompressed::Precompressed::new(&config.precompressed),
            }),
        }
    }

    /// Whether this service writes an access log (then SIGUSR1 should reach
    /// [`reopen_logs`](Self::reopen_logs), e.g. through [`plexus::ServerBuilder::on_reopen`]).
    pub fn has_access_log(&self) -> bool {
        self.shared.access_log.is_some()
    }

    /// Reopens the access log file at its configured path (SIGUSR1, after logrotate moved
    /// it). Never blocks: the log's writer thread reopens it; lines queued before go to the
    /// old file.
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }
}

impl Service for Http {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let shared = Arc::clone(&self.shared);
        // On TLS the ALPN answer decides; elsewhere (and without ALPN) the first bytes do.
        match session.alpn_protocol() {
            Some(b"h2") => Box::new(HttpConnection::H2(Box::new(h2::H2Session::new(
                shared, session,
            )))),
            Some(b"http/1.1") => Box::new(HttpConnection::H1(HttpSession::new(shared))),
            _ => Box::new(HttpConnection::Sniffing {
                shared,
                seen: Vec::new(),
                draining: false,
            }),
        }
    }
}

/// One connection: HTTP/1.1, or HTTP/2 once the client's preface (prior knowledge, or
/// `auto` having recognised it) or ALPN said so.
// The connection is itself boxed (the session's `Box<dyn SessionHandler>`): HTTP/1.1, the
// common case, lives in it without a second allocation; HTTP/2's larger state is boxed.
#[allow(clippy::large_enum_variant)]
enum HttpConnection {
    /// The bytes so far are a prefix of the HTTP/2 preface (or none arrived yet).
    Sniffing {
        shared: Arc<Shared>,
        seen: Vec<u8>,
        /// The server's drain began meanwhile: the protocol chosen says goodbye too.
        draining: bool,
    },
    H1(HttpSession),
    H2(Box<h2::H2Session>),
}

impl SessionHandler for HttpConnection {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if let HttpConnection::Sniffing {
            shared,
            seen,
            draining,
        } = self
        {
            let preface = h2::PREFACE;
            let offered = seen.len() + data.len();
            let matches = {
                let got = seen.iter().chain(data).take(preface.len());
                got.zip(preface).all(|(a, b)| a == b)
            };
            if matches && offered < preface.len() {
                // Not decided yet: a prefix of the preface (a client sending `P`, `PR`, …).
                if seen.is_empty() {
                    session.set_timer(shared.header_timeout);
                }
                seen.extend_from_slice(data);
                return;
            }
            let seen = std::mem::take(seen);
            let shared = Arc::clone(shared);
            let draining = *draining;
            if !seen.is_empty() {
                session.cancel_timer();
            }
            *self = if matches {
                HttpConnection::H2(Box::new(h2::H2Session::new(shared, session)))
            } else {
                let mut h1 = HttpSession::new(shared);
                // Its first response says `Connection: close`.
                h1.draining = draining;
                HttpConnection::H1(h1)
            };
            if !seen.is_empty() {
                self.on_data(session, &seen);
            }
            if let (true, HttpConnection::H2(h2)) = (draining, &mut *self) {
                // After its first streams are in: they are served, later ones refused.
                h2.on_data(session, data);
                h2.on_server_drain(session);
                return;
            }
        }
        match self {
            HttpConnection::Sniffing { .. } => {}
            HttpConnection::H1(h1) => h1.on_data(session, data),
            HttpConnection::H2(h2) => h2.on_data(session, data),
        }
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        match self {
            HttpConnection::Sniffing { shared, .. } => {
                // A few bytes of the preface and then nothing: as a late HTTP/1.1 head.
                let mut h1 = HttpSession::new(Arc::clone(shared));
                h1.timed_out(session);
                *self = HttpConnection::H1(h1);
            }
            HttpConnection::H1(h1) => h1.on_timer(session),
            HttpConnection::H2(h2) => h2.on_timer(session),
        }
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        match self {
            HttpConnection::Sniffing { .. } => {}
            HttpConnection::H1(h1) => h1.on_drain(session),
            HttpConnection::H2(h2) => h2.on_drain(session),
        }
    }

    /// A graceful drain began: HTTP/2 sends GOAWAY; HTTP/1.1 closes between requests (see
    /// [`HttpSession::on_server_drain`]). A connection that has sent nothing yet is left to the
    /// drain's idle close: its first request may be on the way, and clients retry a request
    /// lost to a closing keep-alive connection, not one lost on a fresh connection.
    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        match self {
            HttpConnection::Sniffing { draining, .. } => *draining = true,
            HttpConnection::H1(h1) => h1.on_server_drain(session),
            HttpConnection::H2(h2) => h2.on_server_drain(session),
        }
    }
}

/// A request as the response core sees it, whichever protocol carried it.
pub(crate) struct Request<'a> {
    pub(crate) method: &'a Method,
    /// The target as sent (`:path` on HTTP/2), for logs.
    pub(crate) raw_target: &'a str,
    /// The origin-form path and query the response is for.
    pub(crate) target: &'a str,
    pub(crate) headers: &'a [plexus_proto::http::Header],
}

impl Request<'_> {
    /// The first field called `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }
}

/// Where a response's body comes from.
pub(crate) enum Body {
    /// Bytes in memory (a page, a cached file, a slice of one).
    Memory(Bytes),
    /// `count` bytes of an open file from `start`: HTTP/1.1 sends them with sendfile (or
    /// inline when small), HTTP/2 reads them in window-sized chunks.
    File { file: File, start: u64, count: u64 },
}

/// A response, protocol-neutral: [`Shared::respond`] makes it, HTTP/1.1 and HTTP/2 write it.
/// `Server`, `Date` and `Content-Length` (from the body) are added by the writer.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, Cow<'static, str>)>,
    pub(crate) body: Body,
    /// The head only (HEAD, 204, 304): the body's length may still be announced.
    pub(crate) head_only: bool,
    /// Whether `Content-Length` is sent (not on 204 and 304).
    pub(crate) content_length: bool,
    /// Nothing after this request can be trusted (unknown method, bad target): HTTP/1.1
    /// closes the connection; HTTP/2 only ends the stream.
    pub(crate) close: bool,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Response {
    /// A response with `body` from memory and the given fields.
    fn with(
        status: u16,
        headers: Vec<(&'static str, Cow<'static, str>)>,
        body: impl Into<Bytes>,
        head_only: bool,
    ) -> Response {
        Response {
            status,
            headers,
            body: Body::Memory(body.into()),
            head_only: head_only || status == 204 || status == 304,
            content_length: status != 204 && status != 304,
            close: false,
        }
    }

    /// A response whose only field is its `Content-Type`.
    fn simple(
        status: u16,
        mime: &'static str,
        body: impl Into<Bytes>,
        head_only: bool,
    ) -> Response {
        Response::with(
            status,
            vec![("Content-Type", Cow::Borrowed(mime))],
            body,
            head_only,
        )
    }

    fn not_found(head_only: bool) -> Response {
        Response::simple(404, TEXT, &b"404 Not Found\n"[..], head_only)
    }

    fn forbidden(head_only: bool) -> Response {
        Response::simple(403, TEXT, &b"403 Forbidden\n"[..], head_only)
    }

    /// The body bytes that go out (none for a head-only response).
    pub(crate) fn sent_len(&self) -> u64 {
        if self.head_only {
            0
        } else {
            self.body_len()
        }
    }

    /// The body's length (what `Content-Length` says).
    pub(crate) fn body_len(&self) -> u64 {
        match &self.body {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::File { count, .. } => *count,
        }
    }
}

impl Shared {
    /// Logs why a request was refused, at most once a second for the whole service.
    pub(crate) fn log_refusal(
        &self,
        session: &Session<'_>,
        status: u16,
        why: &dyn std::fmt::Display,
    ) {
        let allowed = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(session.now());
        if let Some(also) = allowed {
            info!(
                "http request refused peer={} listener={} status={status}: {why} \
                 (+{also} more refused in the last second)",
                session.peer(),
                session.info().listener()
            );
        }
    }

    /// Hook: the access-log line of one response, queued for the log's writer (no-op
    /// without `[http] access_log`). `request` is `None` for a request refused before its
    /// head was complete (400 from the parser, 408); `bytes` counts body bytes queued.
    pub(crate) fn log_access(
        &self,
        session: &Session<'_>,
        request: Option<&Request<'_>>,
        response: (u16, u64),
        protocol: &str,
        started: Instant,
    ) {
        let Some(log) = &self.access_log else {
            return;
        };
        let (status, bytes) = response;
        log.record(&AccessLogEntry {
            peer: session.peer(),
            method: request.map_or("", |r| r.method.as_str()),
            target: request.map_or("", |r| r.raw_target),
            protocol,
            status,
            bytes,
            referer: request.and_then(|r| r.header("referer")),
            user_agent: request.and_then(|r| r.header("user-agent")),
            started,
            finished: Instant::now(),
            time: SystemTime::now(),
        });
    }

    /// The response to one complete request: the protocol-neutral core of the service
    /// (methods, `/healthz`, `/metrics`, the status page, static files with their
    /// conditionals and ranges). Counts the response's status class.
    pub(crate) fn respond(&self, session: &mut Session<'_>, request: &Request<'_>) -> Response {
        let response = self.answer(session, request);
        self.stats.response(response.status);
        response
    }

    fn answer(&self, session: &mut Session<'_>, request: &Request<'_>) -> Response {
        let head_only = *request.method == Method::Head;
        let target = request.target;
        let path = target.split(['?', '#']).next().unwrap_or("");
        match request.method {
            Method::Get | Method::Head => {}
            Method::Options => {
                let allow = vec![("Allow", Cow::Borrowed("GET, HEAD, OPTIONS"))];
                return Response::with(204, allow, Bytes::new(), true);
            }
            Method::Other(method) => {
                // Unknown semantics: nothing after this request can be trusted; close.
                let why = format!("unknown method {method:?}");
                self.log_refusal(session, 501, &why);
                self.stats.rejected(501);
                let body = &b"501 Not Implemented: unknown method\n"[..];
                let mut response = Response::simple(501, TEXT, body, head_only);
                response.close = true;
                return response;
            }
            _ => {
                let body = &b"405 Method Not Allowed: this server serves GET and HEAD\n"[..];
                let headers = vec![
                    ("Allow", Cow::Borrowed("GET, HEAD, OPTIONS")),
                    ("Content-Type", Cow::Borrowed(TEXT)),
                ];
                return Response::with(405, headers, body, false);
            }
        }
        match path {
            "/healthz" if session.server_draining() => {
                // Lameduck / drain: the balancer takes this instance out before it refuses.
                Response::simple(503, TEXT, &b"draining"[..], head_only)
            }
            "/healthz" => Response::simple(200, TEXT, &b"ok"[..], head_only),
            "/metrics" => {
                let mut text = String::with_capacity(8 * 1024);
                if let Some(snapshot) = session.server_metrics() {
                    snapshot.write_prometheus(&mut text);
                }
                self.stats.write_prometheus(&mut text);
                self.h2.write_prometheus(&mut text);
                if let Some(log) = &self.access_log {
                    log.write_prometheus(&mut text);
                }
                let mime = "text/plain; version=0.0.4; charset=utf-8";
                Response::simple(200, mime, text.into_bytes(), head_only)
            }
            "/status" | "/status.json" => {
                let json = path == "/status.json";
                self.serve_status(session, json, head_only)
            }
            _ => self.serve_file(session, request, head_only),
        }
    }

    fn serve_file(
        &self,
        session: &mut Session<'_>,
        request: &Request<'_>,
        head_only: bool,
    ) -> Response {
        let target = request.target;
        if self.root.is_none() {
            return if target == "/" || target == "/index.html" {
                let mime = "text/html; charset=utf-8";
                Response::simple(200, mime, BUILTIN_INDEX.as_bytes(), head_only)
            } else {
                Response::not_found(head_only)
            };
        }
        let segments = match normalize_path(target) {
            Ok(segments) => segments,
            Err(err) => {
                // A traversal attempt or an undecodable path: answer and close.
                let why = format!("request target {:?}: {err}", request.raw_target);
                self.log_refusal(session, 400, &why);
                self.stats.rejected(400);
                let body = format!("400 Bad Request: {err}\n");
                let mut response = Response::simple(400, TEXT, body.into_bytes(), head_only);
                response.close = true;
                return response;
            }
        };
        let (meta, body) = match self.resolve(session, request, &segments, head_only) {
            Ok(found) => found,
            Err(response) => return response,
        };
        let len = meta.len;
        // Conditional requests: If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
        let not_modified = match request.header("if-none-match") {
            Some(value) => if_none_match(value, &meta.etag),
            None => request
                .header("if-modified-since")
                .and_then(parse_http_date)
                .is_some_and(|since| unix_seconds(meta.modified) <= unix_seconds(since)),
        };
        if not_modified {
            let mut validators = vec![
                ("ETag", Cow::Owned(meta.etag.clone())),
                ("Last-Modified", Cow::Owned(meta.last_modified.clone())),
            ];
            if self.precompressed.enabled() {
                validators.push(("Vary", Cow::Borrowed("Accept-Encoding")));
            }
            return Response::with(304, validators, Bytes::new(), true);
        }
        // A Range under a stale If-Range validator gets the whole file (RFC 9110 13.1.5).
        let range = match request.header("range") {
            Some(value)
                if *request.method == Method::Get
                    && request.header("if-range").is_none_or(|validator| {
                        if_range_matches(validator, &meta.etag, meta.modified)
                    }) =>
            {
                parse_range(value, len)
            }
            _ => RangeRequest::Full,
        };
        let (status, start, count, content_range) = match range {
            RangeRequest::Full => (200, 0, len, None),
            RangeRequest::Partial { start, end } => (
                206,
                start,
                end - start + 1,
                Some(format!("bytes {start}-{end}/{len}")),
            ),
            RangeRequest::Unsatisfiable => {
                let mut headers = vec![
                    ("Content-Range", Cow::Owned(format!("bytes */{len}"))),
                    ("Content-Type", Cow::Borrowed(TEXT)),
                ];
                if self.precompressed.enabled() {
                    headers.push(("Vary", Cow::Borrowed("Accept-Encoding")));
                }
                let body = &b"416 Range Not Satisfiable\n"[..];
                return Response::with(416, headers, body, head_only);
            }
        };
        let mut headers = vec![
            ("Content-Type", Cow::Borrowed(meta.mime)),
            ("ETag", Cow::Owned(meta.etag.clone())),
            ("Last-Modified", Cow::Owned(meta.last_modified.clone())),
            ("Accept-Ranges", Cow::Borrowed("bytes")),
        ];
        if let Some(content_range) = content_range {
            headers.push(("Content-Range", Cow::Owned(content_range)));
        }
        if let Some(coding) = meta.encoding {
            headers.push(("Content-Encoding", Cow::Borrowed(coding)));
        }
        if self.precompressed.enabled() {
            headers.push(("Vary", Cow::Borrowed("Accept-Encoding")));
        }
        let body = match body {
            FileBody::Memory(bytes) => {
                let (start, end) = (start as usize, (start + count) as usize);
                Body::Memory(bytes.slice(start..end))
            }
            FileBody::File(file) => Body::File { file, start, count },
        };
        Response {
            status,
            headers,
            body,
            head_only,
            content_length: true,
            close: false,
        }
    }

    /// Finds the file a request names (through the per-loop cache of small files, or below the
    /// root), or the response that answers the request instead (redirect, 403, 404, 500).
    fn resolve(
        &self,
        session: &mut Session<'_>,
        request: &Request<'_>,
        segments: &[String],
        head_only: bool,
    ) -> Result<(Arc<FileMeta>, FileBody), Response> {
        let target = request.target;
        let Some(root) = self.root.as_ref() else {
            return Err(Response::not_found(head_only));
        };
        let path = target.split(['?', '#']).next().unwrap_or("");
        let wants_directory = path.ends_with('/');
        // `dir/` (its index.html) and `dir` (a redirect) are different answers: the key says
        // which was asked, so a cached index never answers the path without its slash.
        let mut key = segments.join("/");
        if wants_directory {
            key.push('/');
        }
        // Hook: the precompressed codings this request takes, best first; the cache keeps
        // one answer per list (no variant found = the file itself).
        let wanted = self.precompressed.wanted(request.headers);
        for (index, (coding, _)) in wanted.iter().enumerate() {
            key.push(if index == 0 { '\0' } else { ',' });
            key.push_str(coding);
        }
        if let Some(hit) = self.cache.get(session, &key) {
            return Ok(hit);
        }
        let relative: PathBuf = if segments.is_empty() {
            PathBuf::from(".")
        } else {
            segments.iter().collect()
        };
        let (file, metadata, name) = match open_below(root, &relative) {
            Ok((_, metadata)) if metadata.is_dir() => {
                if !wants_directory {
                    let headers = vec![
                        ("Location", Cow::Owned(directory_location(target))),
                        ("Content-Type", Cow::Borrowed(TEXT)),
                    ];
                    let body = &b"301 Moved Permanently\n"[..];
                    return Err(Response::with(301, headers, body, head_only));
                }
                match open_below(root, &relative.join("index.html")) {
                    Ok((file, metadata)) if metadata.is_file() => (file, metadata, "index.html"),
                    Ok(_) => return Err(Response::forbidden(head_only)),
                    _ => return Err(Response::not_found(head_only)),
                }
            }
            Ok((_, metadata)) if metadata.is_file() && wants_directory => {
                // `/file.txt/` names a directory that is not there.
                return Err(Response::not_found(head_only));
            }
            Ok((file, metadata)) if metadata.is_file() => {
                (file, metadata, segments.last().map_or("", String::as_str))
            }
            Ok((_, metadata)) => {
                // A FIFO, socket or device under the root: opened without blocking, never read.
                debug!(
                    session = %session.id(), target = %request.raw_target,
                    "http: forbidden: not a regular file ({:?})", metadata.file_type()
                );
                return Err(Response::forbidden(head_only));
            }
            Err(err)
                if plexus_sys::fs::is_escape(&err)
                    || err.kind() == io::ErrorKind::PermissionDenied =>
            {
                // Outside the root (openat2 refused the path) or not readable by this process.
                debug!(session = %session.id(), target = %target, "http: forbidden: {err}");
                return Err(Response::forbidden(head_only));
            }
            Err(err)
                if err.kind() == io::ErrorKind::NotFound
                    || plexus_sys::fs::is_not_a_directory(&err) =>
            {
                return Err(Response::not_found(head_only));
            }
            Err(err) => {
                warn!(
                    root = %self.root_path.as_deref().unwrap_or(std::path::Path::new("?")).display(),
                    target = %request.raw_target,
                    "http: cannot open file: {err}"
                );
                let body = &b"500 Internal Server Error\n"[..];
                return Err(Response::simple(500, TEXT, body, head_only));
            }
        };
        // Hook: a precompressed variant of the file, when the request takes one that exists
        // (the file itself decided 404/403/redirects above).
        let (file, metadata, encoding) = if wanted.is_empty() {
            (file, metadata, None)
        } else {
            let identity = if wants_directory {
                relative.join("index.html")
            } else {
                relative
            };
            match precompressed::open_variant(&wanted, &identity, |path| open_below(root, path)) {
                Some((coding, file, metadata)) => (file, metadata, Some(coding)),
                None => (file, metadata, None),
            }
        };
        let len = metadata.len();
        let modified = metadata.modified().unwrap_or(UNIX_EPOCH);
        let modified_nanos = modified
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let extension = name.rsplit_once('.').map_or("", |(_, ext)| ext);
        let etag = entity_tag(len, modified_nanos ^ u128::from(metadata.ino()));
        let meta = Arc::new(FileMeta {
            len,
            modified,
            etag: match encoding {
                Some(coding) => precompressed::variant_tag(&etag, coding),
                None => etag,
            },
            last_modified: format_http_date(modified),
            mime: content_type(extension),
            encoding,
        });
        if self.cache.admits(len) {
            let mut body = vec![0u8; len as usize];
            if read_exact_at(&file, &mut body, 0).is_ok() {
                let body = Bytes::from(body);
                self.cache
                    .insert(session, key, Arc::clone(&meta), body.clone());
                return Ok((meta, FileBody::Memory(body)));
            }
        }
        Ok((meta, FileBody::File(file)))
    }

    /// The `Strict-Transport-Security` value for a response on `session`: `[http] hsts`, on
    /// TLS sessions only (RFC 6797 §7.2: never over plain HTTP).
    pub(crate) fn hsts(&self, session: &Session<'_>) -> Option<&str> {
        self.hsts.as_deref().filter(|_| session.is_tls())
    }

    /// The `Date` header value of this loop (formatted at most once a second).
    pub(crate) fn date(&self, session: &mut Session<'_>) -> String {
        http_date_now(session.loop_local(&self.dates))
    }
}

/// One HTTP/1.1 connection's state.
struct HttpSession {
    shared: Arc<Shared>,
    decoder: RequestDecoder,
    /// The request whose body is being read, with the time its head completed.
    current: Option<(RequestHead, Instant)>,
    header_timer_armed: bool,
    /// A response said `Connection: close` (or the request was refused): parse nothing more.
    done: bool,
    /// The request being answered is HTTP/1.0: keeping the connection open must be said.
    http10: bool,
    /// The server is draining: the response in progress says `Connection: close`.
    draining: bool,
    /// A response was written: the connection is a keep-alive one between requests when idle.
    answered: bool,
}

impl HttpSession {
    fn new(shared: Arc<Shared>) -> Self {
        HttpSession {
            decoder: RequestDecoder::new(shared.limits),
            shared,
            current: None,
            header_timer_armed: false,
            done: false,
            http10: false,
            draining: false,
            answered: false,
        }
    }

    /// Answers every complete request buffered, in order, until the peer falls behind.
    fn process(&mut self, session: &mut Session<'_>) {
        while !self.done {
            if session.is_backlogged() {
                // Pipelined requests wait in the decoder until the peer reads its responses.
                session.notify_when_drained();
                break;
            }
            match self.decoder.poll() {
                Ok(None) => break,
                Ok(Some(RequestEvent::Head(head))) => {
                    // This head made it in time: the next one gets its own header_timeout
                    // (a long pipelined stream is not one slow head).
                    if self.header_timer_armed {
                        session.cancel_timer();
                        self.header_timer_armed = false;
                    }
                    if head.expect_continue && !matches!(head.method, Method::Get | Method::Head) {
                        // Refuse before the client sends a body we would discard.
                        let started = Instant::now();
                        self.respond(session, &head, started);
                        self.done = true;
                        session.close();
                        break;
                    }
                    if head.expect_continue {
                        session.send(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    self.current = Some((head, Instant::now()));
                }
                Ok(Some(RequestEvent::Body(_))) => {}
                Ok(Some(RequestEvent::End)) => {
                    if let Some((head, started)) = self.current.take() {
                        let keep_alive = self.respond(session, &head, started);
                        if !keep_alive {
                            self.done = true;
                            session.close();
                        }
                    }
                }
                Err(err) => {
                    self.reject(session, &err);
                    break;
                }
            }
        }
        self.update_header_timer(session);
    }

    /// The head of a request must arrive within `header_timeout` of its first byte, however
    /// it trickles in (the deadline is not pushed back by each byte).
    fn update_header_timer(&mut self, session: &mut Session<'_>) {
        let waiting_for_head = !self.done && self.decoder.head_in_progress();
        if waiting_for_head && !self.header_timer_armed {
            session.set_timer(self.shared.header_timeout);
            self.header_timer_armed = true;
        } else if !waiting_for_head && self.header_timer_armed {
            session.cancel_timer();
            self.header_timer_armed = false;
        }
    }

    /// Answers a request the parser refused, and closes the connection.
    fn reject(&mut self, session: &mut Session<'_>, err: &RequestError) {
        let status = err.status();
        self.shared.log_refusal(session, status, err);
        self.shared.stats.rejected(status);
        self.shared.stats.response(status);
        let body = format!(
            "{status} {}: {err}\n",
            plexus_proto::http::reason_phrase(status)
        );
        let response = Response::simple(status, TEXT, body.into_bytes(), false);
        let sent = (status, response.body_len());
        self.write(session, response, false);
        self.shared
            .log_access(session, None, sent, "HTTP/1.1", Instant::now());
        self.done = true;
        session.close();
    }

    /// The head did not complete within `header_timeout`: 408, and the connection closes.
    fn timed_out(&mut self, session: &mut Session<'_>) {
        self.shared.log_refusal(
            session,
            408,
            &"request head not complete within header_timeout",
        );
        self.shared.stats.rejected(408);
        self.shared.stats.response(408);
        let response = Response::simple(408, TEXT, &b"408 Request Timeout\n"[..], false);
        let sent = (408, response.body_len());
        self.write(session, response, false);
        self.shared
            .log_access(session, None, sent, "HTTP/1.1", Instant::now());
        self.done = true;
        session.close();
    }

    /// Answers one complete request; returns whether the connection stays open.
    fn respond(&mut self, session: &mut Session<'_>, head: &RequestHead, started: Instant) -> bool {
        self.http10 = head.version == Version::Http10;
        // An absolute-form target (`GET http://host/x`) is served as its path (RFC 9112
        // §3.2.2); other forms stay as sent and are refused by the path mapping.
        let origin = origin_form(&head.target);
        let target: &str = origin
            .as_ref()
            .map_or(head.target.as_str(), |o| &*o.path_and_query);
        let request = Request {
            method: &head.method,
            raw_target: &head.target,
            target,
            headers: &head.headers,
        };
        let response = self.shared.respond(session, &request);
        let keep_alive = head.keep_alive && !response.close && !self.draining;
        let sent = (response.status, response.sent_len());
        self.answered = true;
        let open = self.write(session, response, keep_alive);
        self.shared.stats.latency(started.elapsed());
        let protocol = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        self.shared
            .log_access(session, Some(&request), sent, protocol, started);
        keep_alive && open
    }

    /// Writes `response` as HTTP/1.1: head and small bodies in one write, larger files as
    /// sendfile regions. Returns false if the connection must close (a file read failed).
    fn write(&mut self, session: &mut Session<'_>, response: Response, keep_alive: bool) -> bool {
        let count = response.body_len();
        let length = count.to_string();
        let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(response.headers.len() + 1);
        headers.extend(response.headers.iter().map(|(n, v)| (*n, v.as_bytes())));
        if response.content_length {
            headers.push(("Content-Length", length.as_bytes()));
        }
        let inline = match &response.body {
            _ if response.head_only => 0,
            Body::Memory(bytes) => bytes.len(),
            Body::File { count, .. } if *count <= INLINE_FILE_MAX => *count as usize,
            Body::File { .. } => 0,
        };
        let mut out = Vec::with_capacity(320 + inline);
        self.write_response_head(session, &mut out, response.status, &headers, keep_alive);
        if response.head_only || count == 0 {
            session.send(&out);
            return true;
        }
        match response.body {
            Body::Memory(bytes) => {
                // Head and body leave in one write.
                out.extend_from_slice(&bytes);
                session.send(&out);
            }
            Body::File { file, start, count } if count <= INLINE_FILE_MAX => {
                let mut body = vec![0u8; count as usize];
                match read_exact_at(&file, &mut body, start) {
                    Ok(()) => {
                        out.extend_from_slice(&body);
                        session.send(&out);
                    }
                    Err(err) => {
                        warn!(session = %session.id(), "http: cannot read file: {err}");
                        self.done = true;
                        session.close();
                        return false;
                    }
                }
            }
            Body::File { file, start, count } => {
                session.send(&out);
                session.send_file(Arc::new(file), start, count);
            }
        }
        true
    }

    /// Writes the status line and headers common to every response, then `headers`.
    fn write_response_head(
        &self,
        session: &mut Session<'_>,
        out: &mut Vec<u8>,
        status: u16,
        headers: &[(&str, &[u8])],
        keep_alive: bool,
    ) {
        let date = self.shared.date(session);
        let mut all: Vec<(&str, &[u8])> = Vec::with_capacity(headers.len() + 3);
        all.push(("Server", b"plexus"));
        all.push(("Date", date.as_bytes()));
        all.extend_from_slice(headers);
        if let Some(hsts) = self.shared.hsts(session) {
            all.push(("Strict-Transport-Security", hsts.as_bytes()));
        }
        if !keep_alive {
            all.push(("Connection", b"close"));
        } else if self.http10 {
            // HTTP/1.0 closes by default: a persistent connection must be announced.
            all.push(("Connection", b"keep-alive"));
        }
        write_head(out, status, &all);
    }
}

impl SessionHandler for HttpSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if self.done {
            // A refused or final request: nothing after it is parsed.
            return;
        }
        self.decoder.push(data);
        self.process(session);
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        self.header_timer_armed = false;
        if self.done || !self.decoder.head_in_progress() {
            return;
        }
        self.timed_out(session);
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        self.process(session);
    }

    /// A graceful drain began. A keep-alive connection between requests (one answered,
    /// nothing of the next received) closes now, after the response still queued, if any, is
    /// written — what a `Connection: close` on the last response would have done, without
    /// waiting for the drain's idle close (a client whose next request crosses the close
    /// retries it, as with any keep-alive close). With a request in progress (its head or
    /// body arriving, or pipelined requests waiting for the peer to read), or none yet, the
    /// next response says `Connection: close` and nothing after it is parsed.
    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        self.draining = true;
        if self.answered && !self.done && self.current.is_none() && self.decoder.is_idle() {
            self.done = true;
            if self.header_timer_armed {
                session.cancel_timer();
                self.header_timer_armed = false;
            }
            session.close();
        }
    }
}

/// Opens `relative` below `root` and reads its metadata. Uses `openat2(RESOLVE_BENEATH)`; on
/// kernels without it, falls back to resolving the path and checking it stays in the root.
fn open_below(root: &File, relative: &std::path::Path) -> io::Result<(File, std::fs::Metadata)> {
    let file = match plexus_sys::fs::open_beneath(root, relative) {
        Err(err) if plexus_sys::fs::is_unsupported(&err) => open_checked(root, relative)?,
        other => other?,
    };
    let metadata = file.metadata()?;
    Ok((file, metadata))
}

/// The fallback of [`open_below`] for kernels before 5.6 (no openat2): canonical paths compared.
fn open_checked(root: &File, relative: &std::path::Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let root_path = std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd()))?;
    let full = root_path.join(relative).canonicalize()?;
    if !full.starts_with(&root_path) {
        return Err(plexus_sys::fs::escape_error());
    }
    use std::os::unix::fs::OpenOptionsExt;
    // Never blocks (a FIFO opens at once); the caller checks the type.
    File::options()
        .read(true)
        .custom_flags(plexus_sys::fs::OPEN_FLAGS)
        .open(full)
}

/// Where a directory asked for without its trailing slash redirects: the same path with `/`
/// added and the query kept. Leading slashes collapse to one: `//host/dir/` would be a
/// protocol-relative reference, i.e. another host.
fn directory_location(target: &str) -> String {
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let mut location = String::with_capacity(target.len() + 2);
    location.push('/');
    location.push_str(path.trim_start_matches('/'));
    location.push('/');
    if let Some(query) = query {
        location.push('?');
        location.push_str(query);
    }
    location
}

/// Whole seconds since the epoch (HTTP dates have no finer resolution).
fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// The `Date` header value, formatted at most once per second per loop.
fn http_date_now(cache: &mut DateCache) -> String {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if cache.second != Some(second) {
        cache.second = Some(second);
        cache.value = format_http_date(now);
    }
    cache.value.clone()
}
