//! Configuration: the TOML schema (every key with its default), loading, and validation.
//!
//! [`Config`] is what the file says, with defaults filled in; it serialises back to TOML for
//! `--print-config`. [`Config::validate`] checks what serde cannot (addresses, CIDRs,
//! duplicates, limits that contradict each other) and reports every problem at once, each
//! naming its key, so an operator fixes a file in one pass.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use plexus_proto::{Acl, Cidr};
use serde::{Deserialize, Serialize};

mod bounds;
mod http_keys;
pub(crate) use http_keys::MAX_OCSP_BYTES;
mod rules;

/// The embedded default configuration: what `plexus serve` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// Bytes one read may add to a session's outbound queue (the event loop's read buffer size).
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Certificates for tls and dtls listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Settings of http services.
    #[serde(default)]
    pub http: HttpConfig,
    /// Settings of the built-in chat service.
    #[serde(default)]
    pub chat: ChatConfig,
    /// The global access list, applied to every listener.
    #[serde(default, skip_serializing_if = "AclConfig::is_empty")]
    pub acl: AclConfig,
    /// The listeners, in order.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
}

/// `[server]`: threads, limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Event-loop threads; 0 = one per CPU.
    pub event_loops: usize,
    /// Worker threads for blocking services; 0 = one per CPU.
    pub workers: usize,
    /// Blocking jobs waiting in the worker pool's queue, all sessions together.
    pub worker_queue: usize,
    /// Blocking jobs one session may have queued; more close the session.
    pub worker_session_limit: usize,
    /// Sessions open at once, all listeners together.
    pub max_connections: usize,
    /// Sessions open at once from one client IP; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// TLS handshakes in flight at once; more connections are refused.
    pub max_handshakes: usize,
    /// udp/dtls sessions open at once, all datagram listeners together (they also count in
    /// `max_connections`, and stay below it when tcp/tls listeners exist); 0 = half of
    /// `max_connections` (rounded up), or all of it without tcp/tls listeners.
    pub max_datagram_sessions: usize,
    /// udp/dtls sessions open at once from one client IP; 0 = unlimited.
    pub max_datagram_sessions_per_ip: usize,
    /// Handshakes in flight at once from one source address (its share of `max_handshakes`);
    /// absent = `max_handshakes / 8`, at least 1. See [`ServerConfig::handshakes_per_ip`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_handshakes_per_ip: Option<usize>,
    /// Bound on handshakes, PROXY headers and protocol detection.
    #[serde(with = "human_duration")]
    pub handshake_timeout: Duration,
    /// A session with no byte in either direction for this long is closed.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// Time established sessions get to finish after SIGTERM/SIGINT.
    #[serde(with = "human_duration")]
    pub shutdown_grace: Duration,
    /// Lameduck: after SIGTERM, `/healthz` answers 503 for this long while listeners still
    /// accept; then the graceful drain starts.
    #[serde(with = "human_duration")]
    pub drain_delay: Duration,
    /// How long the new process of a binary upgrade (SIGUSR2) has to report ready.
    #[serde(with = "human_duration")]
    pub upgrade_timeout: Duration,
    /// Queued outbound bytes above which a session is no longer read.
    pub outbound_high_watermark: usize,
    /// Queued outbound bytes below which reading resumes.
    pub outbound_low_watermark: usize,
    /// Queued outbound bytes beyond which a session is closed.
    pub outbound_limit: usize,
    /// How event loops do stream sessions' socket I/O; the default comes from the
    /// `PLEXUS_BACKEND` environment variable (`epoll` when unset).
    pub backend: Backend,
}

/// `[server] backend`: the event loops' I/O model for stream sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Readiness: epoll (through mio), then `read`/`writev` per session.
    #[default]
    Epoll,
    /// Completions: io_uring (multishot receive into provided buffers, owned sends) for the
    /// TCP and TLS sessions of tcp/tls listeners; falls back to epoll when io_uring cannot
    /// be set up.
    IoUring,
}

/// The environment variable that sets the default of `[server] backend` (the test matrix).
pub const BACKEND_ENV: &str = "PLEXUS_BACKEND";

impl Backend {
    /// The value's name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::IoUring => "io_uring",
        }
    }

    fn parse(value: &str) -> Option<Backend> {
        match value {
            "epoll" => Some(Backend::Epoll),
            "io_uring" => Some(Backend::IoUring),
            _ => None,
        }
    }

    /// The default: `PLEXUS_BACKEND` if it names a backend (validation reports one that does
    /// not), else epoll.
    pub fn from_env() -> Backend {
        std::env::var(BACKEND_ENV)
            .ok()
            .and_then(|value| Backend::parse(&value))
            .unwrap_or_default()
    }
}

impl ServerConfig {
    /// Each source address's share of `max_handshakes`: `max_handshakes_per_ip`, or an eighth
    /// of the pool (at least 1), so that one host's silent connections cannot hold every place.
    pub fn handshakes_per_ip(&self) -> usize {
        self.max_handshakes_per_ip
            .unwrap_or((self.max_handshakes / 8).max(1))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            event_loops: 0,
            workers: 0,
            worker_queue: 1024,
            worker_session_limit: 65_536,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_handshakes: 1024,
            max_datagram_sessions: 0,
            max_datagram_sessions_per_ip: 256,
            max_handshakes_per_ip: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            upgrade_timeout: Duration::from_secs(30),
            outbound_high_watermark: 1024 * 1024,
            outbound_low_watermark: 256 * 1024,
            outbound_limit: 4 * 1024 * 1024,
            backend: Backend::from_env(),
        }
    }
}

impl ServerConfig {
    /// The cap on datagram sessions in effect: `max_datagram_sessions`, or when it is 0, half
    /// of `max_connections` (rounded up) if stream listeners share the server (`has_streams`),
    /// else all of it.
    pub fn datagram_session_cap(&self, has_streams: bool) -> usize {
        match (self.max_datagram_sessions, has_streams) {
            (0, true) => self.max_connections.div_ceil(2),
            (0, false) => self.max_connections,
            (cap, _) => cap,
        }
    }
}

/// `[tls]`: certificate and key files (absent = ephemeral self-signed certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A DER OCSP response for `cert`, stapled to every TLS handshake (re-read on SIGHUP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocsp: Option<PathBuf>,
    /// Session resumption with stateless tickets.
    #[serde(default = "default_true")]
    pub session_tickets: bool,
    /// Extra certificates chosen by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniConfig>,
    /// Pre-shared keys dtls listeners accept (DTLS 1.2 PSK cipher suites), by identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub psk: Vec<PskConfig>,
}

/// One `[[tls.psk]]` table: a client identity and the file holding its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PskConfig {
    /// The identity the client sends (1 to 128 bytes).
    pub identity: String,
    /// A file holding the key as hex (16 to 64 bytes of key; surrounding whitespace ignored).
    pub key_file: PathBuf,
}

impl PskConfig {
    /// Reads and decodes the key file.
    pub fn load_key(&self) -> Result<Vec<u8>, PskKeyError> {
        let path = || self.key_file.clone();
        let text = std::fs::read_to_string(&self.key_file).map_err(|source| PskKeyError::Read {
            path: path(),
            source,
        })?;
        let hex = text.trim();
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PskKeyError::NotHex { path: path() });
        }
        let key: Vec<u8> = (0..hex.len())
            .step_by(2)
            .filter_map(|i| hex.get(i..i.saturating_add(2)))
            .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
            .collect();
        if !(16..=64).contains(&key.len()) {
            return Err(PskKeyError::Length {
                path: path(),
                len: key.len(),
            });
        }
        Ok(key)
    }
}

/// Why a `[[tls.psk]]` key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PskKeyError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The key file.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file does not hold an even number of hex digits.
    #[error("{}: not a hex key", path.display())]
    NotHex {
        /// The key file.
        path: std::path::PathBuf,
    },
    /// The key is shorter than 16 or longer than 64 bytes.
    #[error("{}: a key of {len} bytes; 16 to 64 are accepted", path.display())]
    Length {
        /// The key file.
        path: std::path::PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            ocsp: None,
            session_tickets: true,
            sni: Vec::new(),
            psk: Vec::new(),
        }
    }
}

/// One `[[tls.sni]]` table: a certificate for the names a client may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniConfig {
    /// Exact names, or `*.suffix` for one label.
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// A DER OCSP response for this certificate, stapled (re-read on SIGHUP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocsp: Option<PathBuf>,
}

/// `[http]`: limits and document root of http services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Directory of static files; absent = built-in pages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
    /// Longest request target (URI) in bytes.
    pub max_uri_bytes: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// The whole request head must arrive within this.
    #[serde(with = "human_duration")]
    pub header_timeout: Duration,
    /// Memory per event loop for small files (≤ 32 KiB) served without touching the disk;
    /// 0 = off.
    pub file_cache_bytes: usize,
    /// How long a cached file is served before the file system is asked again.
    #[serde(with = "human_duration")]
    pub file_cache_valid: Duration,
    /// Whether `GET /status` and `/status.json` (the live status page) are served.
    pub status: bool,
    /// Clients allowed to see the status page (CIDRs); others get 403.
    pub status_allow: Vec<String>,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: requests one connection may have in flight.
    pub h2_max_concurrent_streams: usize,
    /// HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE: each request body's receive window, in bytes.
    pub h2_initial_window_size: usize,
    /// HTTP/2 SETTINGS_MAX_FRAME_SIZE: the largest frame payload accepted, in bytes.
    pub h2_max_frame_size: usize,
    /// An HTTP/2 response body that the peer's flow-control windows let nothing of out for
    /// this long is reset (a zero-window reader holds no stream forever).
    #[serde(with = "human_duration")]
    pub h2_stall_timeout: Duration,
    /// The `Strict-Transport-Security` value sent on http responses over TLS (RFC 6797), e.g.
    /// `"max-age=63072000; includeSubDomains"`; absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts: Option<String>,
    /// Where one line per response goes: `"stderr"` or a file path; absent = no access log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<PathBuf>,
    /// The access log's line format.
    pub access_log_format: AccessLogFormat,
    /// Lines waiting for the access log's writer thread; past it, lines are dropped (counted).
    pub access_log_queue: usize,
    /// Content codings served from files next to the requested one (`x.br`, `x.gz`,
    /// `x.zst`) when the request's Accept-Encoding takes them, in order of preference.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub precompressed: Vec<String>,
}

/// Where the access log goes (`[http] access_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// The process's standard error.
    Stderr,
    /// A file, opened for appending (created if missing), reopened on SIGUSR1.
    File(PathBuf),
}

/// `[http] access_log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// The NCSA combined format (Apache's and nginx's default).
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// The codings `[http] precompressed` accepts, with the file extension of each.
pub const PRECOMPRESSED_CODINGS: [(&str, &str); 3] =
    [("br", "br"), ("gzip", "gz"), ("zstd", "zst")];

impl HttpConfig {
    /// Where the access log goes, if anywhere.
    pub fn access_log_target(&self) -> Option<AccessLogTarget> {
        self.access_log.as_ref().map(|path| match path.to_str() {
            Some("stderr") => AccessLogTarget::Stderr,
            _ => AccessLogTarget::File(path.clone()),
        })
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            root: None,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            file_cache_bytes: 4 * 1024 * 1024,
            file_cache_valid: Duration::from_secs(1),
            status: true,
            status_allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            h2_max_concurrent_streams: 128,
            h2_initial_window_size: 65_535,
            h2_max_frame_size: 16_384,
            h2_stall_timeout: Duration::from_secs(30),
            access_log: None,
            access_log_format: AccessLogFormat::Combined,
            access_log_queue: 16 * 1024,
            precompressed: Vec::new(),
            hsts: None,
        }
    }
}

/// `[chat]`: settings of the built-in chat service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Longest line a member may send; a longer one closes that member.
    pub max_line_bytes: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_line_bytes: 8192,
        }
    }
}

/// `[acl]` or `[listener.acl]`: CIDR allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// When non-empty, a client must match one of these.
    pub allow: Vec<String>,
    /// Clients matching one of these are refused; deny wins over allow.
    pub deny: Vec<String>,
}

impl AclConfig {
    fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// Plain UDP datagrams.
    Udp,
    /// DTLS over UDP.
    Dtls,
}

impl Transport {
    /// The lowercase name used in the configuration and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Udp => "udp",
            Transport::Dtls => "dtls",
        }
    }

    /// Whether this transport binds a TCP port (as opposed to a UDP one).
    fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// Whether this transport carries datagrams (udp, dtls).
    pub(crate) fn is_datagram(self) -> bool {
        !self.is_stream()
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a forward listener with several `upstreams` picks one for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each in turn (per event loop).
    #[default]
    RoundRobin,
    /// The one with the fewest open upstream sessions (ties: in turn).
    LeastConn,
}

impl Balance {
    fn is_default(&self) -> bool {
        *self == Balance::default()
    }
}

/// The PROXY protocol version a forward listener sends to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 …\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// One `[[listener]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in logs.
    pub name: String,
    /// Transport to bind.
    pub transport: Transport,
    /// `IP:PORT` to bind; port 0 picks a free port.
    pub addr: String,
    /// Name of the service that handles its sessions.
    pub service: String,
    /// `service = "auto"` only: the protocol group's members in the order they are asked
    /// (`"tls"`, `"http"`), then the fallback service (any shared service: `"echo"`, `"chat"`,
    /// `"http"`, your own). Absent = the preset `["tls", "http", "echo"]` (without `"tls"`
    /// on a tls listener). See [`ListenerConfig::protocols`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<String>>,
    /// `HOST:PORT` for the forward service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Forward only, instead of `upstream`: several `HOST:PORT` upstreams, each connection
    /// going to one of them (see `balance`), those whose connect failed skipped for
    /// `upstream_fail_timeout`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// With `upstreams`: how a connection picks its upstream.
    #[serde(default, skip_serializing_if = "Balance::is_default")]
    pub balance: Balance,
    /// With `upstreams`: how long an upstream whose connect failed (refused, timed out) is
    /// skipped — the passive health check; 0 = never skipped.
    #[serde(
        default = "default_upstream_fail_timeout",
        with = "human_duration",
        skip_serializing_if = "is_default_upstream_fail_timeout"
    )]
    pub upstream_fail_timeout: Duration,
    /// Forward only: send a PROXY header (v1 text or v2 binary) naming the client as the
    /// first bytes to the upstream; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_proxy_protocol: Option<ProxyVersion>,
    /// Forward only: speak TLS to the upstream (TLS origination), its certificate verified
    /// against `upstream_ca` (else the system's roots) for `upstream_sni`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub upstream_tls: bool,
    /// With `upstream_tls`: a PEM file of the CAs the upstream's certificate must chain to
    /// (only these are trusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    /// With `upstream_tls`: the name sent (SNI) and verified; absent = the upstream's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_sni: Option<String>,
    /// Require a PROXY v1/v2 header (from a load balancer) before anything else.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
    /// Sources allowed to send PROXY headers (CIDRs); connections from elsewhere are refused.
    #[serde(default = "default_proxy_trusted")]
    pub proxy_trusted: Vec<String>,
    /// Set SO_REUSEPORT before binding, so several processes can listen on the same port and
    /// the kernel spreads connections among them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reuse_port: bool,
    /// ALPN protocols for tls listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Forward listeners on plain TCP relay with splice(2) (zero copy); false = read/write copy.
    #[serde(default = "default_true")]
    pub splice: bool,
    /// Listen backlog.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Disable Nagle's algorithm on accepted sockets.
    #[serde(default = "default_true")]
    pub tcp_nodelay: bool,
    /// SO_RCVBUF for accepted sockets; 0 = kernel default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recv_buffer: usize,
    /// SO_SNDBUF for accepted sockets; 0 = kernel default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub send_buffer: usize,
    /// TCP keepalive idle time; absent = off.
    #[serde(
        default,
        with = "human_duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub keepalive: Option<Duration>,
    /// SO_LINGER; absent = kernel default.
    #[serde(
        default,
        with = "human_duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub linger: Option<Duration>,
    /// This listener's own access list, applied after the global one.
    #[serde(default, skip_serializing_if = "AclConfig::is_empty")]
    pub acl: AclConfig,
    /// dtls: largest datagram (record) OpenSSL sends, handshake flights included.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// udp/dtls: datagrams received (recvmmsg) or sent (sendmmsg) per system call.
    #[serde(default = "default_datagram_batch")]
    pub datagram_batch: usize,
    /// udp/dtls: use the kernel's UDP offloads (`UDP_GRO` on receive, `UDP_SEGMENT` on send)
    /// where it has them; false = one datagram per message both ways.
    #[serde(default = "default_true")]
    pub udp_offload: bool,
    /// udp/dtls: sessions of this listener open at once; 0 = only the `[server]` caps.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_sessions: usize,
}

/// The keys a forward listener's service is built from (a reload that changes one rebuilds
/// it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UpstreamKeys<'a> {
    upstream: &'a Option<String>,
    upstreams: &'a [String],
    balance: Balance,
    fail_timeout: Duration,
    proxy: Option<ProxyVersion>,
    tls: bool,
    ca: &'a Option<PathBuf>,
    sni: &'a Option<String>,
}

impl ListenerConfig {
    /// The keys its forward service is built from.
    pub(crate) fn upstream_keys(&self) -> UpstreamKeys<'_> {
        UpstreamKeys {
            upstream: &self.upstream,
            upstreams: &self.upstreams,
            balance: self.balance,
            fail_timeout: self.upstream_fail_timeout,
            proxy: self.upstream_proxy_protocol,
            tls: self.upstream_tls,
            ca: &self.upstream_ca,
            sni: &self.upstream_sni,
        }
    }

    /// The protocol group of an auto listener, as configured or the preset: the members in
    /// order, then the fallback (the last entry). Empty for a listener of another service.
    pub fn protocols(&self) -> Vec<&str> {
        if self.service != "auto" {
            return Vec::new();
        }
        match &self.protocols {
            Some(list) => list.iter().map(String::as_str).collect(),
            None if self.transport == Transport::Tcp => vec!["tls", "http", "echo"],
            None => vec!["http", "echo"],
        }
    }

    /// The ALPN protocols a TLS handshake on this listener offers, in preference order: its
    /// `alpn` when set; otherwise `["h2", "http/1.1"]` when the listener serves HTTP (the
    /// `http` service, or an `auto` group with `http` among its members — the built-in
    /// `http` service speaks HTTP/2); otherwise none.
    pub fn alpn_offered(&self) -> Vec<String> {
        if !self.alpn.is_empty() {
            return self.alpn.clone();
        }
        if self.service == "http" || self.protocols().contains(&"http") {
            vec!["h2".into(), "http/1.1".into()]
        } else {
            Vec::new()
        }
    }

    /// Checks `protocols` (the key is only read with `service = "auto"`; `rules` says so).
    fn check_protocols(
        &self,
        key: &str,
        known_services: &[&str],
        problem: &mut impl FnMut(String, String),
    ) {
        let Some(list) = self.protocols.as_ref().filter(|_| self.service == "auto") else {
            return;
        };
        let Some((fallback, members)) = list.split_last() else {
            problem(
                key.into(),
                "must list at least the fallback service (e.g. [\"tls\", \"http\", \"echo\"])"
                    .into(),
            );
            return;
        };
        let detectors = PROTOCOL_MEMBERS;
        for (at, member) in members.iter().enumerate() {
            let here = format!("{key}[{at}]");
            if !detectors.contains(&member.as_str()) {
                problem(
                    here,
                    format!(
                        "'{member}' is not a protocol plexus detects (members: {}); only the \
                         last entry, the fallback, may be any service",
                        detectors.join(", ")
                    ),
                );
            } else if members.iter().take(at).any(|earlier| earlier == member) {
                problem(here, format!("'{member}' is listed twice"));
            } else if member == "tls" && self.transport != Transport::Tcp {
                problem(
                    here,
                    "a tls listener's sessions are decrypted before the group runs: \"tls\" \
                     is a member on tcp listeners only"
                        .into(),
                );
            } else if member != "tls" && !known_services.contains(&member.as_str()) {
                problem(
                    here,
                    format!("'{member}' needs the {member} service, which is not registered"),
                );
            }
        }
        let here = format!("{key}[{}]", members.len());
        if matches!(fallback.as_str(), "tls" | "auto" | "forward") {
            problem(
                here,
                format!(
                    "'{fallback}' cannot be the fallback (the last entry): it must be a service \
                     that takes any session, e.g. \"echo\""
                ),
            );
        } else if !known_services.contains(&fallback.as_str()) {
            problem(
                here,
                format!(
                    "'{fallback}' is not a known service (available: {})",
                    known_services.join(", ")
                ),
            );
        }
    }
}

fn default_mtu() -> u32 {
    1200
}
fn default_datagram_batch() -> usize {
    32
}

fn default_proxy_trusted() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}

fn default_upstream_fail_timeout() -> Duration {
    Duration::from_secs(10)
}
fn is_default_upstream_fail_timeout(value: &Duration) -> bool {
    *value == default_upstream_fail_timeout()
}

fn default_backlog() -> u32 {
    1024
}
fn default_true() -> bool {
    true
}
fn is_false(value: &bool) -> bool {
    !*value
}
fn is_zero(value: &usize) -> bool {
    *value == 0
}

/// One thing wrong with a configuration, tied to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `listener[1].addr` (with the line, when known).
    pub key: String,
    /// What is wrong, in words an operator acts on.
    pub message: String,
}

/// The member names a listener's `protocols` key may list before its last entry (the
/// fallback): the protocols plexus has a ready detector and a built-in service for.
pub const PROTOCOL_MEMBERS: &[&str] = &["tls", "http"];

/// A configuration that could not be read or does not make sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or `<embedded default>`.
    pub source: String,
    /// Every problem found, at least one.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.source, problem.key, problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn single(source: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            source: source.to_owned(),
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

impl Config {
    /// Parses TOML text; `source` names it in error messages (a path, or `<embedded default>`).
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|err| {
            let (key, message) = describe_toml_error(text, &err);
            ConfigError::single(source, key, message)
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::single(&source, "file", format!("cannot read: {err}")))?;
        Config::parse(&text, &source)
    }

    /// The embedded default configuration.
    #[allow(clippy::expect_used)] // why: a constant input, parsed by a unit test.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("the embedded default configuration is valid TOML (checked by a unit test)")
    }

    /// The configuration as TOML, as `--print-config` shows it.
    #[allow(clippy::expect_used)] // why: every field is a string, number, bool or table.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every Config value serialises to TOML")
    }

    /// Checks everything serde cannot; `known_services` are the service names available.
    /// Returns the listeners in a form the runtime binds, or every problem found.
    pub fn validate(
        &self,
        source: &str,
        known_services: &[&str],
    ) -> Result<ValidConfig, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });
        let server = &self.server;

        // Every duration and size against its range (one table, in `bounds`).
        bounds::check(self, &mut problem);
        // Keys set where their transport or service never reads them (table in `rules`).
        rules::check(self, &mut problem);
        if let Some(value) = &self.http.hsts {
            if let Err(why) = check_hsts(value) {
                problem("http.hsts".into(), why);
            }
        }
        // Values of the access-log, precompressed and OCSP keys.
        http_keys::check(self, &mut problem);
        if let Some(value) = std::env::var_os(BACKEND_ENV) {
            let value = value.to_string_lossy();
            if Backend::parse(&value).is_none() {
                problem(
                    "server.backend".into(),
                    format!(
                        "{BACKEND_ENV}={value:?} in the environment is not a backend \
                         (expected \"epoll\" or \"io_uring\")"
                    ),
                );
            }
        }
        if server.outbound_low_watermark >= server.outbound_high_watermark {
            problem(
                "server.outbound_low_watermark".into(),
                format!(
                    "{} must be less than outbound_high_watermark ({})",
                    server.outbound_low_watermark, server.outbound_high_watermark
                ),
            );
        }
        if server.outbound_limit < server.outbound_high_watermark.saturating_add(READ_CHUNK) {
            problem(
                "server.outbound_limit".into(),
                format!(
                    "{} must be at least outbound_high_watermark + {READ_CHUNK} (one read), i.e. {}",
                    server.outbound_limit,
                    server.outbound_high_watermark.saturating_add(READ_CHUNK)
                ),
            );
        }
        // datagram: their own cap stays below max_connections, so stream clients keep places.
        let has_streams = self.listeners.iter().any(|l| l.transport.is_stream());
        let datagram_cap = server.max_datagram_sessions;
        if datagram_cap > server.max_connections
            || (has_streams && datagram_cap != 0 && datagram_cap >= server.max_connections)
        {
            problem(
                "server.max_datagram_sessions".into(),
                format!(
                    "{datagram_cap} must be less than server.max_connections ({}) so that tcp/tls \
                     clients keep places (0 = half of max_connections)",
                    server.max_connections
                ),
            );
        }
        match server.max_handshakes_per_ip {
            Some(0) => problem(
                "server.max_handshakes_per_ip".into(),
                "must be at least 1".into(),
            ),
            Some(share) if share > server.max_handshakes => problem(
                "server.max_handshakes_per_ip".into(),
                format!(
                    "must be at most server.max_handshakes ({}), got {share}",
                    server.max_handshakes
                ),
            ),
            _ => {}
        }
        if let Some(tls) = &self.tls {
            let mut files = vec![];
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    files.push(("tls.cert".to_owned(), cert));
                    files.push(("tls.key".to_owned(), key));
                }
                (Some(_), None) => {
                    problem("tls.key".into(), "required when tls.cert is set".into())
                }
                (None, Some(_)) => {
                    problem("tls.cert".into(), "required when tls.key is set".into())
                }
                (None, None) => {}
            }
            for (index, sni) in tls.sni.iter().enumerate() {
                if sni.names.is_empty() || sni.names.iter().any(|name| name.trim().is_empty()) {
                    problem(
                        format!("tls.sni[{index}].names"),
                        "must list at least one non-empty name".into(),
                    );
                }
                files.push((format!("tls.sni[{index}].cert"), &sni.cert));
                files.push((format!("tls.sni[{index}].key"), &sni.key));
            }
            let mut identities = HashMap::new();
            for (index, psk) in tls.psk.iter().enumerate() {
                if psk.identity.is_empty() || psk.identity.len() > 128 {
                    problem(
                        format!("tls.psk[{index}].identity"),
                        "must be 1 to 128 bytes".into(),
                    );
                } else if let Some(first) = identities.insert(psk.identity.as_str(), index) {
                    problem(
                        format!("tls.psk[{index}].identity"),
                        format!("duplicate identity (also tls.psk[{first}])"),
                    );
                }
                let special = std::fs::metadata(&psk.key_file).is_ok_and(|m| !m.is_file());
                if special {
                    problem(
                        format!("tls.psk[{index}].key_file"),
                        format!("{} is not a regular file", psk.key_file.display()),
                    );
                } else if let Err(err) = psk.load_key() {
                    problem(format!("tls.psk[{index}].key_file"), err.to_string());
                }
            }
            for (key, path) in files {
                // stat first: opening a FIFO put there would block until a writer appears.
                match std::fs::metadata(path) {
                    Ok(meta) if !meta.is_file() => {
                        problem(key, format!("{} is not a regular file", path.display()));
                    }
                    _ => {
                        if let Err(err) = std::fs::File::open(path) {
                            problem(key, format!("cannot read {}: {err}", path.display()));
                        }
                    }
                }
            }
        }

        if let Some(root) = &self.http.root {
            match std::fs::metadata(root) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => problem(
                    "http.root".into(),
                    format!("{} is not a directory", root.display()),
                ),
                Err(err) => problem(
                    "http.root".into(),
                    format!("cannot read {}: {err}", root.display()),
                ),
            }
        }

        for (index, text) in self.http.status_allow.iter().enumerate() {
            if let Err(err) = text.parse::<Cidr>() {
                problem(format!("http.status_allow[{index}]"), err.to_string());
            }
        }
        let global_acl = parse_acl(&self.acl, "acl", &mut problem);

        let mut listeners = Vec::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ports: HashMap<(bool, u16), (usize, IpAddr)> = HashMap::new();
        for (index, listener) in self.listeners.iter().enumerate() {
            let key = |field: &str| format!("listener[{index}].{field}");
            if listener.name.is_empty() {
                problem(key("name"), "must not be empty".into());
            } else if listener.name.contains([':', '#', '@']) {
                // They separate the names of passed sockets (LISTEN_FDNAMES, upgrades).
                problem(key("name"), "must not contain ':', '#' or '@'".into());
            } else if let Some(first) = names.insert(&listener.name, index) {
                problem(
                    key("name"),
                    format!(
                        "duplicate listener name '{}' (also listener[{first}])",
                        listener.name
                    ),
                );
            }
            // datagram: udp/dtls listeners carry datagram services (echo, forward to a udp
            // upstream, or your own).
            if !listener.transport.is_stream() {
                if listener.service == "chat" {
                    problem(
                        key("service"),
                        format!(
                            "'{}' is not available on {} listeners (byte streams only)",
                            listener.service, listener.transport
                        ),
                    );
                }
                if !(256..=16_384).contains(&listener.mtu) {
                    problem(key("mtu"), format!("{} must be 256 to 16384", listener.mtu));
                }
                if !(1..=1024).contains(&listener.datagram_batch) {
                    problem(
                        key("datagram_batch"),
                        format!("{} must be 1 to 1024", listener.datagram_batch),
                    );
                }
            } else if listener.max_sessions != 0 {
                problem(
                    key("max_sessions"),
                    "only udp/dtls listeners have a session cap of their own \
                     (streams: server.max_connections)"
                        .into(),
                );
            }
            let detects_tls = listener.service == "auto" && listener.transport == Transport::Tcp;
            if !listener.alpn.is_empty() && listener.transport != Transport::Tls && !detects_tls {
                problem(
                    key("alpn"),
                    "only tls listeners (and auto listeners on tcp) negotiate ALPN".into(),
                );
            }
            if listener
                .alpn
                .iter()
                .any(|protocol| protocol.is_empty() || protocol.len() > 255)
            {
                problem(key("alpn"), "each protocol must be 1 to 255 bytes".into());
            }

            if !known_services.contains(&listener.service.as_str()) {
                let hint = "is not a known service";
                problem(
                    key("service"),
                    format!(
                        "'{}' {hint} (available: {})",
                        listener.service,
                        known_services.join(", ")
                    ),
                );
            }
            listener.check_protocols(&key("protocols"), known_services, &mut problem);
            let proxy_trusted = listener.proxy_protocol.then(|| {
                if listener.proxy_trusted.is_empty() {
                    problem(
                        key("proxy_trusted"),
                        "must list the load balancers' addresses when proxy_protocol = true".into(),
                    );
                }
                let trusted = listener
                    .proxy_trusted
                    .iter()
                    .enumerate()
                    .filter_map(|(at, text)| match text.parse::<Cidr>() {
                        Ok(cidr) => Some(cidr),
                        Err(err) => {
                            problem(format!("{}[{at}]", key("proxy_trusted")), err.to_string());
                            None
                        }
                    })
                    .collect();
                Acl::new(trusted, Vec::new())
            });
            let addr = match listener.addr.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problem(
                        key("addr"),
                        format!(
                            "'{}' is not an IP:PORT address (e.g. \"127.0.0.1:7000\" or \"[::1]:7000\")",
                            listener.addr
                        ),
                    );
                    None
                }
            };
            if let Some(addr) = addr.filter(|addr| addr.port() != 0) {
                let slot = (listener.transport.is_stream(), addr.port());
                if let Some((other, other_ip)) = ports.get(&slot) {
                    let overlaps = *other_ip == addr.ip()
                        || other_ip.is_unspecified()
                        || addr.ip().is_unspecified();
                    if overlaps {
                        problem(
                            key("addr"),
                            format!(
                                "duplicate port: {} is already used by listener[{other}] ({})",
                                addr,
                                self.listeners.get(*other).map_or("", |l| l.name.as_str())
                            ),
                        );
                    }
                } else {
                    ports.insert(slot, (index, addr.ip()));
                }
            }
            let acl = parse_acl(&listener.acl, &key("acl"), &mut problem);
            let forward = listener.service == "forward";
            let upstream = match (&listener.upstream, &listener.upstreams[..], forward) {
                (Some(_), [_, ..], true) => {
                    problem(
                        key("upstreams"),
                        "set either upstream (one) or upstreams (several), not both".into(),
                    );
                    None
                }
                (Some(upstream), [], true) => match resolve_upstream(upstream) {
                    Ok(resolved) => Some(resolved),
                    Err(err) => {
                        problem(key("upstream"), format!("'{upstream}': {err}"));
                        None
                    }
                },
                (None, list @ [_, ..], true) => {
                    let mut first = None;
                    for (at, upstream) in list.iter().enumerate() {
                        let entry = format!("{}[{at}]", key("upstreams"));
                        if list.iter().take(at).any(|earlier| earlier == upstream) {
                            problem(entry, format!("'{upstream}' is listed twice"));
                            continue;
                        }
                        match resolve_upstream(upstream) {
                            Ok(resolved) => {
                                first.get_or_insert(resolved);
                            }
                            Err(err) => problem(entry, format!("'{upstream}': {err}")),
                        }
                    }
                    first
                }
                (None, [], true) => {
                    problem(
                        key("upstream"),
                        "required for service = \"forward\" (upstream = \"HOST:PORT\", or \
                         upstreams = [\"HOST:PORT\", …])"
                            .into(),
                    );
                    None
                }
                (Some(_), _, false) => {
                    problem(
                        key("upstream"),
                        "only forward listeners have an upstream".into(),
                    );
                    None
                }
                (None, [_, ..], false) => {
                    problem(
                        key("upstreams"),
                        "only forward listeners have upstreams".into(),
                    );
                    None
                }
                (None, [], false) => None,
            };
            if listener.upstream_tls && listener.upstream_sni.is_none() {
                // Each upstream's own host is verified: check them all below.
                for (at, upstream) in listener.upstreams.iter().enumerate() {
                    let Some((host, _)) = upstream.rsplit_once(':') else {
                        continue;
                    };
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    if rustls::pki_types::ServerName::try_from(host).is_err() {
                        problem(
                            format!("{}[{at}]", key("upstreams")),
                            format!("'{host}' is not a DNS name or IP address to verify (TLS)"),
                        );
                    }
                }
            }
            let sni = listener.upstream_sni.as_deref().or_else(|| {
                let upstream = listener.upstream.as_deref()?;
                let (host, _) = upstream.rsplit_once(':')?;
                Some(host.trim_start_matches('[').trim_end_matches(']'))
            });
            if let (true, Some(sni)) = (listener.upstream_tls, sni) {
                if rustls::pki_types::ServerName::try_from(sni).is_err() {
                    let name = match listener.upstream_sni {
                        Some(_) => "upstream_sni",
                        None => "upstream",
                    };
                    problem(
                        key(name),
                        format!("'{sni}' is not a DNS name or IP address to verify (TLS)"),
                    );
                }
            }
            if let Some(addr) = addr {
                listeners.push(ValidListener {
                    config: listener.clone(),
                    addr,
                    acl,
                    upstream,
                    proxy_trusted,
                });
            }
        }
        if self.listeners.is_empty() {
            problem(
                "listener".into(),
                "at least one [[listener]] is required".into(),
            );
        }

        if problems.is_empty() {
            Ok(ValidConfig {
                config: self.clone(),
                global_acl,
                listeners,
            })
        } else {
            Err(ConfigError {
                source: source.to_owned(),
                problems,
            })
        }
    }
}

/// A configuration that passed [`Config::validate`], with addresses and ACLs parsed.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The configuration as written (with defaults).
    pub config: Config,
    /// The parsed global `[acl]`.
    pub global_acl: Acl,
    /// The listeners with parsed addresses and ACLs, in order.
    pub listeners: Vec<ValidListener>,
}

/// A listener that passed validation.
#[derive(Debug, Clone)]
pub struct ValidListener {
    /// The listener's table as written.
    pub config: ListenerConfig,
    /// The parsed bind address.
    pub addr: SocketAddr,
    /// The parsed `[listener.acl]`.
    pub acl: Acl,
    /// The resolved upstream of a forward listener (the first of `upstreams`).
    pub upstream: Option<SocketAddr>,
    /// For `proxy_protocol = true`: the sources trusted to send PROXY headers.
    pub proxy_trusted: Option<Acl>,
}

/// Resolves `HOST:PORT` (once, at start).
fn resolve_upstream(upstream: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    match upstream.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| "resolves to no address".to_owned()),
        Err(err) => Err(format!("not a reachable HOST:PORT ({err})")),
    }
}

fn parse_acl(acl: &AclConfig, key: &str, problem: &mut impl FnMut(String, String)) -> Acl {
    let mut parse = |list: &[String], field: &str| -> Vec<Cidr> {
        list.iter()
            .enumerate()
            .filter_map(|(index, text)| match text.parse::<Cidr>() {
                Ok(cidr) => Some(cidr),
                Err(err) => {
                    problem(format!("{key}.{field}[{index}]"), err.to_string());
                    None
                }
            })
            .collect()
    };
    let allow = parse(&acl.allow, "allow");
    let deny = parse(&acl.deny, "deny");
    Acl::new(allow, deny)
}

/// Turns a TOML/serde error into (key path with line, one-line message).
fn describe_toml_error(text: &str, err: &toml::de::Error) -> (String, String) {
    let message = err.message().trim().replace('\n', " ");
    let Some(span) = err.span() else {
        return ("document".into(), message);
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_number = before.matches('\n').count().saturating_add(1);
    let mut table = String::new();
    let mut listener_index: Option<usize> = None;
    for line in before.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let header = header.trim();
            if header == "listener" {
                listener_index = Some(listener_index.map_or(0, |i| i.saturating_add(1)));
            }
            table = header.to_owned();
        } else if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = header.trim().to_owned();
        }
    }
    if let (Some(index), true) = (listener_index, table.starts_with("listener")) {
        table = table.replacen("listener", &format!("listener[{index}]"), 1);
    }
    let current_line = text
        .get(before.rfind('\n').map_or(0, |i| i.saturating_add(1))..)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("");
    let key = current_line
        .split_once('=')
        .map(|(key, _)| key.trim().trim_matches('"').to_owned())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    let path = match key {
        Some(key) if table.is_empty() => key,
        Some(key) => format!("{table}.{key}"),
        None if !table.is_empty() => table,
        None => "document".into(),
    };
    (format!("line {line_number}: {path}"), message)
}

/// Serde adapter for durations written as `"10s"`, `"500ms"`, `"2m"`.
mod human_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "'{text}' is not a duration ({err}); write e.g. \"500ms\", \"10s\", \"2m\""
            ))
        })
    }
}

/// Serde adapter for optional durations.
mod human_duration_opt {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::human_duration::serialize(value, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::human_duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICES: &[&str] = &["echo", "chat", "http", "auto"];

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text, "t.toml") {
            Err(err) => err.problems,
            Ok(config) => config
                .validate("t.toml", SERVICES)
                .err()
                .map_or(vec![], |e| e.problems),
        }
    }

    #[test]
    fn datagram_caps_stay_below_max_connections_and_apply_only_to_datagram_listeners() {
        let listener = |transport: &str, extra: &str| {
            format!(
                "[[listener]]\nname = \"{transport}\"\ntransport = \"{transport}\"\n\
                 addr = \"127.0.0.1:0\"\nservice = \"echo\"\n{extra}\n"
            )
        };
        let both = format!("{}{}", listener("tcp", ""), listener("udp", ""));
        let text = format!("[server]\nmax_connections = 50\nmax_datagram_sessions = 50\n{both}");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "server.max_datagram_sessions");
        assert!(found[0]
            .message
            .contains("less than server.max_connections (50)"));
        // Without stream listeners datagram sessions may have every place.
        let text = format!(
            "[server]\nmax_connections = 50\nmax_datagram_sessions = 50\n{}",
            listener("udp", "")
        );
        assert!(problems(&text).is_empty());
        let text = format!(
            "[server]\nmax_connections = 50\nmax_datagram_sessions = 51\n{}",
            listener("udp", "")
        );
        assert_eq!(problems(&text)[0].key, "server.max_datagram_sessions");
        let found = problems(&listener("tcp", "max_sessions = 5"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "listener[0].max_sessions");
        assert!(problems(&listener("dtls", "max_sessions = 5")).is_empty());

        let mut server = ServerConfig {
            max_connections: 51,
            ..ServerConfig::default()
        };
        assert_eq!(server.datagram_session_cap(true), 26);
        assert_eq!(server.datagram_session_cap(false), 51);
        server.max_datagram_sessions = 7;
        assert_eq!(server.datagram_session_cap(true), 7);
        assert_eq!(ServerConfig::default().max_datagram_sessions_per_ip, 256);
    }

    #[test]
    fn embedded_default_is_valid_and_round_trips() {
        let config = Config::embedded_default();
        let valid = config.validate("<embedded default>", SERVICES).unwrap();
        let names: Vec<_> = valid
            .listeners
            .iter()
            .map(|l| l.config.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "tcp-echo",
                "tls-echo",
                "udp-echo",
                "dtls-echo",
                "chat",
                "http",
                "https"
            ]
        );
        assert!(valid.listeners.iter().all(|l| l.addr.ip().is_loopback()));
        let again = Config::parse(&config.to_toml(), "printed").unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let found = problems("[server]\nmax_conections = 5\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].key.contains("line 2"), "{found:?}");
        assert!(found[0].message.contains("max_conections"), "{found:?}");
    }

    #[test]
    fn wrong_type_names_table_and_key() {
        let found = problems("[server]\nmax_connections = \"many\"\n");
        assert_eq!(found[0].key, "line 2: server.max_connections", "{found:?}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let found = problems("[server]\nidle_timeout = \"soon\"\n");
        assert!(found[0].message.contains("not a duration"), "{found:?}");
    }

    #[test]
    fn semantic_problems_are_all_reported_with_keys() {
        let text = r#"
[server]
outbound_low_watermark = 2000000
[acl]
deny = ["10.0.0.300/8"]
[[listener]]
name = "a"
transport = "tcp"
addr = "127.0.0.1:7000"
service = "echo"
[[listener]]
name = "a"
transport = "tcp"
addr = "127.0.0.1:7000"
service = "nope"
[[listener]]
name = "c"
transport = "tcp"
addr = "localhost"
service = "echo"
"#;
        let keys: Vec<_> = problems(text).into_iter().map(|p| p.key).collect();
        for expected in [
            "server.outbound_low_watermark",
            "acl.deny[0]",
            "listener[1].name",
            "listener[1].addr",
            "listener[1].service",
            "listener[2].addr",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "missing {expected} in {keys:?}"
            );
        }
    }

    #[test]
    fn same_port_on_tcp_and_udp_is_not_a_duplicate_but_wildcard_overlap_is() {
        let listeners = |a: &str, ta: &str, b: &str, tb: &str| {
            format!(
                "[[listener]]\nname=\"a\"\ntransport=\"{ta}\"\naddr=\"{a}\"\nservice=\"echo\"\n\
                 [[listener]]\nname=\"b\"\ntransport=\"{tb}\"\naddr=\"{b}\"\nservice=\"echo\"\n"
            )
        };
        let dup = |text: String| {
            problems(&text)
                .iter()
                .any(|p| p.message.contains("duplicate port"))
        };
        assert!(!dup(listeners(
            "127.0.0.1:7000",
            "tcp",
            "127.0.0.1:7000",
            "udp"
        )));
        assert!(dup(listeners(
            "0.0.0.0:7000",
            "tcp",
            "127.0.0.1:7000",
            "tcp"
        )));
        assert!(!dup(listeners("127.0.0.1:0", "tcp", "127.0.0.1:0", "tcp")));
    }

    #[test]
    fn listener_acl_table_attaches_to_its_listener() {
        let text =
            "[[listener]]\nname=\"a\"\ntransport=\"tcp\"\naddr=\"127.0.0.1:0\"\nservice=\"echo\"\n\
                    [listener.acl]\ndeny=[\"127.0.0.2\"]\n";
        let config = Config::parse(text, "t").unwrap();
        let valid = config.validate("t", SERVICES).unwrap();
        assert!(!valid.listeners[0].acl.permits("127.0.0.2".parse().unwrap()));
        assert!(valid.listeners[0].acl.permits("127.0.0.1".parse().unwrap()));
    }
}

/// A `Strict-Transport-Security` value (RFC 6797 §6.1): `max-age=SECONDS` (required), and
/// optionally `includeSubDomains` and `preload`, each once, separated by `;`.
fn check_hsts(value: &str) -> Result<(), String> {
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err("must be printable ASCII (it becomes a header value)".into());
    }
    let mut max_age = false;
    let mut seen: Vec<String> = Vec::new();
    for directive in value.split(';').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let (name, argument) = match directive.split_once('=') {
            Some((name, argument)) => (name.trim(), Some(argument.trim())),
            None => (directive, None),
        };
        let lower = name.to_ascii_lowercase();
        if seen.contains(&lower) {
            return Err(format!("directive {name} appears twice"));
        }
        match (lower.as_str(), argument) {
            ("max-age", Some(seconds)) => {
                let digits = seconds
                    .strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .unwrap_or(seconds);
                if digits.is_empty()
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || digits.parse::<u64>().is_err()
                {
                    return Err(format!("max-age={seconds}: must be a number of seconds"));
                }
                max_age = true;
            }
            ("includesubdomains" | "preload", None) => {}
            ("max-age", None) => return Err("max-age needs a value (max-age=SECONDS)".into()),
            ("includesubdomains" | "preload", Some(_)) => {
                return Err(format!("directive {name} takes no value"))
            }
            _ => {
                return Err(format!(
                    "unknown directive {name:?} (known: max-age, includeSubDomains, preload)"
                ))
            }
        }
        seen.push(lower);
    }
    if !max_age {
        return Err("must start with max-age=SECONDS (e.g. \"max-age=63072000\")".into());
    }
    Ok(())
}

#[cfg(test)]
mod hsts_tests {
    use super::check_hsts;

    #[test]
    fn hsts_values_are_checked_by_directive() {
        assert_eq!(check_hsts("max-age=63072000"), Ok(()));
        assert_eq!(check_hsts("max-age=0; includeSubDomains; preload"), Ok(()));
        assert_eq!(check_hsts("Max-Age=\"300\";INCLUDESUBDOMAINS"), Ok(()));
        for bad in [
            "",
            "includeSubDomains",
            "max-age",
            "max-age=",
            "max-age=-1",
            "max-age=1y",
            "max-age=99999999999999999999999",
            "max-age=1; max-age=2",
            "max-age=1; preload=yes",
            "max-age=1\r\nSet-Cookie: x",
        ] {
            assert!(check_hsts(bad).is_err(), "{bad:?} accepted");
        }
    }
}
