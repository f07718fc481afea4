//! Connectors: client connections a session opens on its own event loop.
//!
//! An [`Upstream`] names a server to connect to: its addresses (resolved before the loop ever
//! sees them — [`Upstream::resolve`] blocks, so call it at start-up, in a
//! [`crate::ServiceFactory`], or in [`crate::Session::spawn_blocking`]), the timeout of each
//! connect attempt, and counters shared by every connection to it. A handler opens a
//! connection with [`crate::Session::connect`], giving the handler of the new connection; the
//! connection is then an ordinary session of the loop that opened it — the same outbound
//! watermarks and `outbound_limit`, the same idle timeout and close reasons — *linked* to the
//! session that opened it:
//!
//! - each side sends to the other with [`crate::Session::send_to`] (queued on the other's
//!   outbound queue after the callback; no copy beyond the one into the queue);
//! - backpressure is automatic in both directions: a session whose sends put its linked
//!   session's queue past the high watermark is not read until that queue drains to the low
//!   watermark, so a peer that stops reading stops the other side too (memory stays bounded);
//! - [`crate::SessionHandler::on_link`] tells the opener when the connection is established
//!   ([`crate::LinkEvent::Connected`]) and either side when the other ended
//!   ([`crate::LinkEvent::Closed`], with its reason: [`crate::CloseReason::UpstreamFailed`]
//!   or [`crate::CloseReason::UpstreamTimeout`] when it never connected). By default a session
//!   closes (after flushing) when its linked session ends;
//! - half-close: a linked session's peer FIN (or TLS close_notify) is delivered as
//!   [`crate::SessionHandler::on_eof`] rather than ending it, so a relay can pass it on with
//!   [`crate::Session::finish_to`] (the other side's write end closes once its queue is
//!   flushed); a session closes once its peer finished and its own write end is closed.
//!
//! The connect is non-blocking. Addresses are tried in order, happy-eyeballs style (RFC 8305
//! §5): when one refuses or fails the next is tried at once, and when one has not connected
//! after the attempt delay ([`DEFAULT_ATTEMPT_DELAY`], 250 ms; [`Upstream::with_attempt_delay`])
//! the next is started next to it — the first to connect wins and the others are closed. Each
//! attempt ends at its own connect timeout (all on the loop's timer wheel). When none is
//! left the upstream session ends with the last failure as its close reason, logged and
//! counted ([`UpstreamSnapshot`]) — unless the upstream has a [`Retry`]
//! ([`Upstream::with_retry`]): then it waits a backoff (doubling per round, capped, with
//! jitter, on the loop's timer wheel; the failed socket out of the poll) and tries every address
//! again, and ends only after its last round.
//!
//! Upstream sessions are not admitted connections: they count neither towards
//! `max_connections` nor in any listener's sessions, and are members of no listener for
//! broadcasts.
//!
//! # Datagram upstreams
//!
//! From a udp or dtls session, [`crate::Session::connect`] opens a *connected UDP socket* to
//! the upstream instead (bound to an ephemeral port of the address's family, `connect(2)`ed to
//! the first address that takes it: no resolution, nothing blocks), registered on the same
//! loop. [`crate::LinkEvent::Connected`] comes at once (UDP has no handshake). Each
//! [`crate::Session::send_to`] from the opener is one datagram to the upstream; each datagram
//! the upstream sends back is one `on_data` of the upstream's handler, which passes it on with
//! `send_to` (the opener sends it to its peer — encrypted on a dtls session). Bounded: a
//! link's datagrams wait in a queue of at most `outbound_high_watermark` bytes (one datagram
//! always fits) until the socket takes them (`sendmmsg`, after each receive batch); UDP drops
//! rather than blocks, so a datagram that does not fit is dropped and counted
//! (`plexus_upstream_datagrams_dropped_total{reason="overflow"}`), as is one the kernel
//! refuses (`reason="error"`). The upstream socket has no timer of its own: it lives and
//! ends with the session that opened it (whose `idle_timeout` counts the datagrams of both
//! directions). An ICMP error the kernel reports on the connected socket (`ECONNREFUSED`:
//! nothing listens there; host or network unreachable) is counted as refused and ends the
//! upstream session with [`crate::CloseReason::UpstreamFailed`], after
//! [`crate::LinkEvent::Connected`]: the opener hears `Closed` and decides (forward marks that
//! upstream down and moves on, or closes its client). With [`Upstream::with_dtls`] the socket
//! speaks DTLS 1.2 to the upstream ([`crate::DtlsClientConfig`]): `Connected` then waits for
//! the handshake, and each datagram is one record. A [`Upstream::with_tls`] upstream is
//! refused from a datagram session (`UpstreamFailed(Unsupported)`).
//!
//! Metrics: an upstream joins the server's `/metrics` (`plexus_upstream_*`, labelled with its
//! name) the first time a session of a [`crate::Server`] connects to it, and leaves when the
//! last clone of it is dropped (a reload replaced the listener that held it and its sessions
//! ended). Upstreams with the same name (two listeners forwarding to one address) are shown
//! summed. Bytes are the upstream sessions' own (read from and written to the upstream);
//! connect time is what the opener reports with [`Upstream::record_connect_time`].

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use plexus_proto::TimerKey;

use crate::breakdown::{ListenerInfo, ListenerStats};

/// The connect timeout of an [`Upstream`] unless set otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an attempt runs alone before the next address is tried alongside it (RFC 8305's
/// "Connection Attempt Delay", its recommended value): [`Upstream::with_attempt_delay`].
pub const DEFAULT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The listener index of upstream sessions: no listener has it, so they belong to none.
pub(crate) const UPSTREAM_LISTENER: usize = usize::MAX;

/// Why an [`Upstream`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The address list was empty (or the name resolved to nothing).
    #[error("upstream '{0}' has no address")]
    NoAddress(String),
    /// Name resolution failed.
    #[error("cannot resolve upstream '{name}': {source}")]
    Resolve {
        /// The `host:port` that did not resolve.
        name: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
}

/// A server sessions connect to: addresses tried in order, a connect timeout, and counters
/// shared by every connection to it (cheap to clone: the clones share them).
#[derive(Clone)]
pub struct Upstream {
    addrs: Arc<[SocketAddr]>,
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
    /// The local address connections are made from (`None`: the system picks).
    source: Option<IpAddr>,
    /// DTLS origination for datagram sessions' upstreams.
    dtls: Option<Arc<crate::dtls::DtlsClientConfig>>,
    /// Rounds over every address again after they all failed (`None`: give up at once).
    retry: Option<Retry>,
    /// How long an attempt runs before the next address races it (zero: one at a time).
    attempt_delay: Duration,
    shared: Arc<Shared>,
}

/// Connect retries of an [`Upstream`] ([`Upstream::with_retry`]): when every address failed
/// (refused, reset, timed out), the connection waits a backoff and tries them all again, up to
/// `rounds` more times. The backoff doubles each round from `backoff` up to `max_backoff`,
/// and each wait is drawn at random from its upper half ("equal jitter"), so clients that
/// failed together do not come back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    rounds: u32,
    backoff: Duration,
    max_backoff: Duration,
}

impl Retry {
    /// `rounds` more rounds after the first, the first wait `backoff` (at most `max_backoff`).
    pub fn new(rounds: u32, backoff: Duration, max_backoff: Duration) -> Retry {
        Retry {
            rounds,
            backoff,
            max_backoff: max_backoff.max(backoff),
        }
    }

    /// How long to wait before round `done + 1` when `done` rounds (after the first) were
    /// made already, `None` when none is left; `random` is any random number (it picks the
    /// point in the upper half of the backoff).
    pub fn delay(&self, done: u32, random: u64) -> Option<Duration> {
        if done >= self.rounds {
            return None;
        }
        let factor = 1u32.checked_shl(done.min(31)).unwrap_or(u32::MAX);
        let ceiling = self
            .backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff);
        let half = ceiling.checked_div(2).unwrap_or_default();
        let spread = u64::try_from(ceiling.saturating_sub(half).as_micros()).unwrap_or(u64::MAX);
        let jitter = random.checked_rem(spread.saturating_add(1)).unwrap_or(0);
        Some(half.saturating_add(Duration::from_micros(jitter)))
    }
}

/// TLS origination: the client configuration and the name sent (SNI) and verified.
#[derive(Clone)]
pub(crate) struct UpstreamTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) name: rustls::pki_types::ServerName<'static>,
}

/// What every connection to one upstream shares.
struct Shared {
    /// The upstream's name (logs, [`UpstreamSnapshot`]) and its sessions' byte counters.
    info: Arc<ListenerInfo>,
    attempts: AtomicU64,
    connected: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    unreachable: AtomicU64,
    retries: AtomicU64,
    open: AtomicU64,
    /// Datagrams (UDP upstreams) dropped: their link's queue was full; the kernel refused them.
    dropped_overflow: AtomicU64,
    dropped_error: AtomicU64,
    /// Connect times by [`CONNECT_BUCKETS`] (one more slot: above the last bound), their sum
    /// in microseconds and their number.
    connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    connect_micros: AtomicU64,
    connects_timed: AtomicU64,
    /// Whether a server's [`UpstreamRegistry`] lists it already.
    registered: AtomicBool,
}

/// Upper bounds of the connect-time histogram's buckets, in microseconds (the Prometheus
/// `le` labels, in seconds, are these / 1e6).
pub const CONNECT_BUCKETS: [u64; 12] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name())
            .field("addrs", &self.addrs)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls.as_ref().map(|tls| &tls.name))
            .field("source", &self.source)
            .field("dtls", &self.dtls)
            .field("retry", &self.retry)
            .field("attempt_delay", &self.attempt_delay)
            .finish()
    }
}

/// An upstream's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct UpstreamSnapshot {
    /// Connect attempts started (one per address tried).
    pub attempts: u64,
    /// Attempts that connected.
    pub connected: u64,
    /// Attempts the upstream refused or reset (or that failed with another socket error).
    pub refused: u64,
    /// Attempts that did not connect within the connect timeout.
    pub timed_out: u64,
    /// Connections that failed on every address: the session that asked got
    /// [`crate::LinkEvent::Closed`] without ever being connected.
    pub unreachable: u64,
    /// Rounds over the addresses started again after every one failed ([`Upstream::with_retry`]).
    pub retries: u64,
    /// Upstream sessions open now (connecting or connected).
    pub open: u64,
    /// Bytes read from the upstream (by its sessions).
    pub bytes_received: u64,
    /// Bytes written to the upstream.
    pub bytes_sent: u64,
    /// Datagrams to a UDP upstream dropped because their link's queue was full (UDP drops
    /// rather than blocks).
    pub datagrams_dropped_overflow: u64,
    /// Datagrams to or from a UDP upstream the kernel refused or cut (too large, a send
    /// error, a truncated reply).
    pub datagrams_dropped_error: u64,
    /// Connect times recorded with [`Upstream::record_connect_time`], per bucket of
    /// [`CONNECT_BUCKETS`] (not cumulative; the last slot: longer than every bound).
    pub connect_buckets: [u64; CONNECT_BUCKETS.len() + 1],
    /// Their sum, in microseconds.
    pub connect_micros: u64,
    /// How many were recorded.
    pub connects_timed: u64,
}

impl UpstreamSnapshot {
    /// Adds `other`'s counters to these (two upstreams of the same name).
    fn add(&mut self, other: &UpstreamSnapshot) {
        self.attempts = self.attempts.wrapping_add(other.attempts);
        self.connected = self.connected.wrapping_add(other.connected);
        self.refused = self.refused.wrapping_add(other.refused);
        self.timed_out = self.timed_out.wrapping_add(other.timed_out);
        self.unreachable = self.unreachable.wrapping_add(other.unreachable);
        self.retries = self.retries.wrapping_add(other.retries);
        self.open = self.open.wrapping_add(other.open);
        self.bytes_received = self.bytes_received.wrapping_add(other.bytes_received);
        self.bytes_sent = self.bytes_sent.wrapping_add(other.bytes_sent);
        self.datagrams_dropped_overflow = self
            .datagrams_dropped_overflow
            .wrapping_add(other.datagrams_dropped_overflow);
        self.datagrams_dropped_error = self
            .datagrams_dropped_error
            .wrapping_add(other.datagrams_dropped_error);
        for (sum, n) in self.connect_buckets.iter_mut().zip(other.connect_buckets) {
            *sum = sum.wrapping_add(n);
        }
        self.connect_micros = self.connect_micros.wrapping_add(other.connect_micros);
        self.connects_timed = self.connects_timed.wrapping_add(other.connects_timed);
    }
}

impl Upstream {
    /// An upstream at `addrs`, tried in order. `name` is how logs and metrics call it.
    pub fn new(name: &str, addrs: Vec<SocketAddr>) -> Result<Upstream, UpstreamError> {
        if addrs.is_empty() {
            return Err(UpstreamError::NoAddress(name.to_owned()));
        }
        Ok(Upstream {
            addrs: addrs.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
            source: None,
            dtls: None,
            retry: None,
            attempt_delay: DEFAULT_ATTEMPT_DELAY,
            shared: Arc::new(Shared {
                info: Arc::new(ListenerInfo {
                    index: UPSTREAM_LISTENER,
                    name: name.into(),
                    stats: ListenerStats::default(),
                }),
                attempts: AtomicU64::new(0),
                connected: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                unreachable: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                open: AtomicU64::new(0),
                dropped_overflow: AtomicU64::new(0),
                dropped_error: AtomicU64::new(0),
                connect_buckets: Default::default(),
                connect_micros: AtomicU64::new(0),
                connects_timed: AtomicU64::new(0),
                registered: AtomicBool::new(false),
            }),
        })
    }

    /// Resolves `host_port` (`"db.internal:5432"`, `"127.0.0.1:6379"`) into an upstream named
    /// after it, addresses in the resolver's order. **Blocks** on the system resolver: call it
    /// at start-up or from a blocking job, never in a handler callback.
    pub fn resolve(host_port: &str) -> Result<Upstream, UpstreamError> {
        let addrs = host_port
            .to_socket_addrs()
            .map_err(|source| UpstreamError::Resolve {
                name: host_port.to_owned(),
                source,
            })?
            .collect();
        Upstream::new(host_port, addrs)
    }

    /// The same upstream (sharing its counters) with another connect timeout per attempt.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Upstream {
        self.connect_timeout = timeout;
        self
    }

    /// The same upstream (sharing its counters) whose connections, when every address
    /// failed, wait and try again as `retry` says, rather than ending at once (stream
    /// sessions; a UDP connect does not fail). While it waits the connection is still
    /// connecting: what the opener sends is queued (bounded by the watermarks), and its idle
    /// timeout runs. Each new round is counted (`plexus_upstream_connect_retries_total`).
    #[must_use]
    pub fn with_retry(mut self, retry: Retry) -> Upstream {
        self.retry = Some(retry);
        self
    }

    /// The retry policy, if one was set.
    pub fn retry(&self) -> Option<Retry> {
        self.retry
    }

    /// The same upstream (sharing its counters) racing its addresses after `delay` rather
    /// than [`DEFAULT_ATTEMPT_DELAY`]: an attempt that has not connected after `delay` keeps
    /// running while the next address is tried too (happy eyeballs, RFC 8305 §5), and the
    /// first to connect wins; an attempt that fails starts the next one at once. Each attempt
    /// still ends at its own connect timeout. `Duration::ZERO` (or a delay not shorter than
    /// the connect timeout): one attempt at a time, the next only when it failed.
    #[must_use]
    pub fn with_attempt_delay(mut self, delay: Duration) -> Upstream {
        self.attempt_delay = delay;
        self
    }

    /// How long an attempt runs alone before the next address races it (`None`: no race).
    pub(crate) fn race_delay(&self) -> Option<Duration> {
        (!self.attempt_delay.is_zero() && self.attempt_delay < self.connect_timeout)
            .then_some(self.attempt_delay)
    }

    /// The same upstream spoken to over TLS: once connected, the upstream session runs a
    /// client handshake with `config` (see [`crate::tls_client::client_config`]) for
    /// `server_name` (sent as SNI and verified), bounded by `handshake_timeout`; bytes sent to
    /// it before the handshake completes wait in its queue, and the opener's
    /// [`crate::LinkEvent::Connected`] comes after the handshake. A refused certificate closes the
    /// upstream session with [`crate::CloseReason::Tls`].
    #[must_use]
    pub fn with_tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> Upstream {
        self.tls = Some(UpstreamTls {
            config,
            name: server_name,
        });
        self
    }

    /// The same upstream (sharing its counters), connected to from the local address `ip`
    /// (bound with port 0 before each connect): to spread many connections over several
    /// source addresses (127.0.0.x), past one address' ephemeral ports.
    #[must_use]
    pub fn with_source(mut self, ip: IpAddr) -> Upstream {
        self.source = Some(ip);
        self
    }

    /// The local address connections are made from, if one was set.
    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// The same upstream spoken to over DTLS 1.2, for connections opened from udp or dtls
    /// sessions (a UDP upstream): once the socket is open the upstream session runs a client
    /// handshake with `config` (see [`crate::DtlsClientConfig`]), bounded by
    /// `handshake_timeout`, OpenSSL's retransmissions on the loop's timer wheel. Datagrams sent
    /// to it before the handshake completes wait (bounded like its queue), each is then one
    /// record; the opener's [`crate::LinkEvent::Connected`] comes after the handshake, and a
    /// refused certificate or a failed handshake ends the upstream session with
    /// [`crate::CloseReason::UpstreamFailed`] (`InvalidData`), a handshake past its timeout or
    /// retransmission limit with [`crate::CloseReason::UpstreamTimeout`]. Stream sessions
    /// ignore it (use [`Upstream::with_tls`]).
    #[must_use]
    pub fn with_dtls(mut self, config: crate::dtls::DtlsClientConfig) -> Upstream {
        self.dtls = Some(Arc::new(config));
        self
    }

    /// The DTLS origination settings, if any.
    pub(crate) fn dtls(&self) -> Option<&Arc<crate::dtls::DtlsClientConfig>> {
        self.dtls.as_ref()
    }

    /// The TLS origination settings, if any.
    pub(crate) fn tls(&self) -> Option<&UpstreamTls> {
        self.tls.as_ref()
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.shared.info.name
    }

    /// Its addresses, in the order they are tried.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// How long one connect attempt may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Its counters now.
    pub fn snapshot(&self) -> UpstreamSnapshot {
        self.shared.snapshot()
    }
}

impl Shared {
    fn snapshot(&self) -> UpstreamSnapshot {
        let s = self;
        UpstreamSnapshot {
            attempts: s.attempts.load(Relaxed),
            connected: s.connected.load(Relaxed),
            refused: s.refused.load(Relaxed),
            timed_out: s.timed_out.load(Relaxed),
            unreachable: s.unreachable.load(Relaxed),
            retries: s.retries.load(Relaxed),
            open: s.open.load(Relaxed),
            bytes_received: s.info.stats.bytes_received(),
            bytes_sent: s.info.stats.bytes_sent(),
            datagrams_dropped_overflow: s.dropped_overflow.load(Relaxed),
            datagrams_dropped_error: s.dropped_error.load(Relaxed),
            connect_buckets: std::array::from_fn(|at| {
                s.connect_buckets.get(at).map_or(0, |n| n.load(Relaxed))
            }),
            connect_micros: s.connect_micros.load(Relaxed),
            connects_timed: s.connects_timed.load(Relaxed),
        }
    }
}

impl Upstream {
    /// Upstream sessions open now (connecting or connected), on every event loop: one
    /// relaxed load, for balancing by least connections.
    pub fn open_sessions(&self) -> u64 {
        self.shared.open.load(Relaxed)
    }

    /// Records how long one connection took to become usable (from the opener's
    /// [`crate::Session::connect`] to its [`crate::LinkEvent::Connected`]: the TCP connect,
    /// and the TLS handshake for a TLS upstream), for the `plexus_upstream_connect_seconds`
    /// histogram.
    pub fn record_connect_time(&self, elapsed: Duration) {
        let s = &self.shared;
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = CONNECT_BUCKETS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(CONNECT_BUCKETS.len());
        if let Some(counter) = s.connect_buckets.get(bucket) {
            counter.fetch_add(1, Relaxed);
        }
        s.connect_micros.fetch_add(micros, Relaxed);
        s.connects_timed.fetch_add(1, Relaxed);
    }

    /// Lists this upstream in `registry` (once: later calls are one relaxed load).
    pub(crate) fn register(&self, registry: &UpstreamRegistry) {
        if self.shared.registered.load(Relaxed) || self.shared.registered.swap(true, Relaxed) {
            return;
        }
        registry.add(Arc::downgrade(&self.shared));
    }

    /// The listener-like identity of this upstream's sessions (name and byte counters).
    pub(crate) fn info(&self) -> &Arc<ListenerInfo> {
        &self.shared.info
    }

    pub(crate) fn count(&self, event: UpstreamEvent) {
        let s = &self.shared;
        let counter = match event {
            UpstreamEvent::Attempt => &s.attempts,
            UpstreamEvent::Connected => &s.connected,
            UpstreamEvent::Refused => &s.refused,
            UpstreamEvent::TimedOut => &s.timed_out,
            UpstreamEvent::Unreachable => &s.unreachable,
            UpstreamEvent::Retry => &s.retries,
            UpstreamEvent::Opened => &s.open,
            UpstreamEvent::DroppedOverflow => &s.dropped_overflow,
            UpstreamEvent::DroppedError => &s.dropped_error,
            UpstreamEvent::Closed => {
                s.open.fetch_sub(1, Relaxed);
                return;
            }
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// The upstreams a server's sessions connected to, for `/metrics`: weak, so an upstream no
/// listener or session holds any more leaves the list.
#[derive(Default)]
pub(crate) struct UpstreamRegistry {
    upstreams: Mutex<Vec<Weak<Shared>>>,
}

impl std::fmt::Debug for UpstreamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRegistry").finish_non_exhaustive()
    }
}

impl UpstreamRegistry {
    fn add(&self, upstream: Weak<Shared>) {
        let mut list = self
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        list.retain(|weak| weak.strong_count() > 0);
        list.push(upstream);
    }

    /// Every live upstream's counters, those of one name summed, sorted by name.
    pub(crate) fn snapshots(&self) -> Vec<(String, UpstreamSnapshot)> {
        let live: Vec<Arc<Shared>> = {
            let mut list = self
                .upstreams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            list.retain(|weak| weak.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let mut out: Vec<(String, UpstreamSnapshot)> = Vec::new();
        for shared in live {
            let name = shared.info.name.to_string();
            let snapshot = shared.snapshot();
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => sum.add(&snapshot),
                None => out.push((name, snapshot)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// What [`Upstream::count`] counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UpstreamEvent {
    Attempt,
    Connected,
    Refused,
    TimedOut,
    Unreachable,
    /// Every address failed and the connection will try them again after a backoff.
    Retry,
    Opened,
    Closed,
    /// A datagram for a UDP upstream found its link's queue full.
    DroppedOverflow,
    /// A datagram to or from a UDP upstream was refused by the kernel or truncated.
    DroppedError,
}

/// An upstream session while its connect runs: which address is being tried, and its timer.
pub(crate) struct Connecting {
    pub(crate) upstream: Upstream,
    /// Index in `upstream.addrs()` of the address being tried.
    pub(crate) attempt: usize,
    pub(crate) timer: Option<TimerKey>,
    /// Rounds over the addresses started again so far ([`Retry`]).
    pub(crate) retries: u32,
    /// Every address failed: `timer` ends the backoff, then the first address is tried again.
    pub(crate) waiting: bool,
    /// When the current attempt (the session's socket) times out.
    pub(crate) deadline: Option<Instant>,
    /// When the next address starts alongside the current attempt (happy eyeballs).
    pub(crate) race_at: Option<Instant>,
    /// Earlier attempts still running next to the current one (the first to connect wins).
    pub(crate) racing: Vec<Racer>,
}

/// An earlier connect attempt still in flight while a later address is tried too.
pub(crate) struct Racer {
    pub(crate) stream: mio::net::TcpStream,
    pub(crate) addr: SocketAddr,
    pub(crate) deadline: Instant,
}

impl Connecting {
    pub(crate) fn new(upstream: Upstream) -> Self {
        Connecting {
            upstream,
            attempt: 0,
            timer: None,
            retries: 0,
            waiting: false,
            deadline: None,
            race_at: None,
            racing: Vec::new(),
        }
    }

    /// Whether an address after the current one is left to try.
    pub(crate) fn has_next(&self) -> bool {
        self.attempt.saturating_add(1) < self.upstream.addrs().len()
    }

    /// When the connect timer must fire next: the current attempt's timeout, the next race,
    /// or a racer's timeout, whichever comes first.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let racers = self.racing.iter().map(|racer| racer.deadline);
        self.deadline
            .into_iter()
            .chain(self.race_at)
            .chain(racers)
            .min()
    }

    /// Starts a new round at the first address (after a backoff).
    pub(crate) fn restart(&mut self) -> Option<SocketAddr> {
        self.attempt = 0;
        self.waiting = false;
        self.addr()
    }

    /// The address being tried.
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        self.upstream.addrs().get(self.attempt).copied()
    }

    /// Moves on to the next address, if there is one.
    pub(crate) fn advance(&mut self) -> Option<SocketAddr> {
        self.attempt = self.attempt.saturating_add(1);
        self.addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_up_to_its_ceiling_with_jitter_in_the_upper_half() {
        let ms = Duration::from_millis;
        let retry = Retry::new(6, ms(100), ms(1000));
        for random in [0, 1, 12_345, u64::MAX] {
            let ceilings = [100, 200, 400, 800, 1000, 1000];
            for (done, ceiling) in ceilings.into_iter().enumerate() {
                let delay = retry.delay(done as u32, random).unwrap();
                assert!(
                    delay >= ms(ceiling / 2) && delay <= ms(ceiling),
                    "round {done}: {delay:?} outside [{}, {ceiling}] ms",
                    ceiling / 2
                );
            }
            assert_eq!(retry.delay(6, random), None, "no round left");
        }
        // Different random numbers spread the waits.
        let spread: std::collections::HashSet<_> =
            (0..50u64).map(|r| retry.delay(2, r * 7919)).collect();
        assert!(spread.len() > 10);
        // Huge rounds and backoffs saturate at the ceiling instead of overflowing.
        let long = Retry::new(u32::MAX, Duration::MAX, Duration::MAX);
        assert!(long.delay(40, 3).is_some());
        assert_eq!(Retry::new(0, ms(1), ms(1)).delay(0, 0), None);
    }

    #[test]
    fn an_upstream_needs_an_address_and_tries_them_in_order() {
        assert!(matches!(
            Upstream::new("none", Vec::new()),
            Err(UpstreamError::NoAddress(_))
        ));
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "[::1]:1".parse().unwrap();
        let upstream = Upstream::new("two", vec![a, b]).unwrap();
        let mut connecting = Connecting::new(upstream.clone());
        assert_eq!(connecting.addr(), Some(a));
        assert_eq!(connecting.advance(), Some(b));
        assert_eq!(connecting.advance(), None);
        assert_eq!(connecting.advance(), None);
        upstream.count(UpstreamEvent::Attempt);
        upstream.count(UpstreamEvent::Opened);
        upstream.count(UpstreamEvent::Closed);
        let snap = upstream.snapshot();
        assert_eq!((snap.attempts, snap.open), (1, 0));
        assert_eq!(upstream.name(), "two");
    }

    #[test]
    fn resolve_reads_numeric_addresses_and_reports_bad_names() {
        let upstream = Upstream::resolve("127.0.0.1:6379").unwrap();
        assert_eq!(upstream.addrs(), &["127.0.0.1:6379".parse().unwrap()]);
        assert!(matches!(
            Upstream::resolve("no port here"),
            Err(UpstreamError::Resolve { .. })
        ));
    }
}
