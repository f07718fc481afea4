//! The service API: what a user implements to handle sessions, and the handle it gets.
//!
//! A [`Service`] is shared by every session of the listeners that name it; for each new session
//! the event loop calls [`Service::open`], which returns that session's [`SessionHandler`]. The
//! handler then sees the session's bytes ([`SessionHandler::on_data`]) and its end
//! ([`SessionHandler::on_close`]), always on the loop thread that owns the session, so it needs
//! no locks. Handlers must not block: a send only queues bytes, which the loop writes once the
//! callback returns (with `writev`, applying the outbound watermarks).

use std::fmt;
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::loop_local::{LoopLocal, LoopLocals};
use crate::metrics::ServerStatus;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::outbound::OutboundQueue;
use crate::worker::{Reply, WorkQueue};

/// Handles the sessions of the listeners that name it. Shared across event-loop threads.
pub trait Service: Send + Sync + 'static {
    /// A session was accepted; returns the per-session handler. The session may already be
    /// sent to (a greeting) or closed (a refusal) here.
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler>;
}

/// The per-session half of a service: lives on the session's event loop until it closes.
///
/// `Send` because a handler may be handed between threads (the loop is built before its
/// thread starts, and blocking services move work to the worker pool).
pub trait SessionHandler: Send {
    /// Bytes arrived from the peer (in order; any split is possible). On a udp or dtls
    /// session, each call is exactly one datagram.
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]);

    /// The deadline set with [`Session::set_timer`] passed. The default does nothing.
    fn on_timer(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// The outbound queue drained to the low watermark after [`Session::notify_when_drained`]
    /// asked for it: a producer that paused because the peer was slow may go on. The default
    /// does nothing.
    fn on_drain(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// The session ended; nothing can be sent any more. The default does nothing.
    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let _ = (info, reason);
    }
}

pub use crate::session_id::SessionId;

pub(crate) use crate::breakdown::ListenerInfo;

/// What stays true for a session's whole life.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub(crate) id: SessionId,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) listener: Arc<ListenerInfo>,
}

impl SessionInfo {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    /// The local address the client connected to.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
    /// The name of the listener the session arrived on.
    pub fn listener(&self) -> &str {
        &self.listener.name
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its side and every queued byte was delivered.
    PeerClosed,
    /// The service called [`Session::close`].
    Requested,
    /// No byte moved in either direction for `idle_timeout`.
    IdleTimeout,
    /// The TLS handshake did not complete within `handshake_timeout`.
    HandshakeTimeout,
    /// The TLS layer failed: a bad handshake, a protocol violation, a bad record. (Shared, so
    /// that every session carries a small close reason.)
    Tls(Arc<rustls::Error>),
    /// The peer did not read and the outbound queue would pass `outbound_limit`.
    OutboundOverflow,
    /// A socket error (reset by peer, broken pipe, …).
    Io(std::io::ErrorKind),
    /// The server is shutting down and the session was idle or finished.
    Shutdown,
    /// The server's `shutdown_grace` ran out, or a fast stop was requested.
    ShutdownForced,
    /// The service's handler or one of its blocking jobs panicked.
    Panic,
    /// More blocking jobs were queued than `worker_session_limit` allows.
    WorkOverflow,
    /// The session's next blocking job found the worker pool's queue (`worker_queue`) full
    /// for `idle_timeout`.
    WorkerPoolFull,
    /// A forward session's upstream refused, reset or failed.
    UpstreamFailed(std::io::ErrorKind),
    /// A forward session's upstream did not accept the connection within `handshake_timeout`.
    UpstreamTimeout,
    /// A `proxy_protocol` session's PROXY header was missing, malformed or late.
    ProxyHeader,
    /// A datagram session cap was full and this was the longest-idle session in its scope:
    /// it made room for a new peer.
    Reclaimed,
    /// A [`crate::framing::Framed`] session's peer sent a frame longer than the framer's limit.
    FrameTooLarge,
}

impl CloseReason {
    /// Whether queued bytes are still flushed to the peer before the socket closes.
    pub(crate) fn flushes(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerClosed
                | CloseReason::Requested
                | CloseReason::Shutdown
                | CloseReason::FrameTooLarge
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed"),
            CloseReason::Requested => f.write_str("closed by service"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::HandshakeTimeout => f.write_str("tls handshake timeout"),
            CloseReason::Tls(err) => write!(f, "tls error: {err}"),
            CloseReason::OutboundOverflow => {
                f.write_str("outbound queue passed outbound_limit (peer not reading)")
            }
            CloseReason::Io(kind) => write!(f, "socket error: {kind}"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::ShutdownForced => {
                f.write_str("server stopped before the session finished")
            }
            CloseReason::Panic => f.write_str("service panicked"),
            CloseReason::UpstreamFailed(kind) => write!(f, "upstream failed: {kind}"),
            CloseReason::UpstreamTimeout => f.write_str("upstream connect timed out"),
            CloseReason::ProxyHeader => f.write_str("missing or malformed PROXY header"),
            CloseReason::Reclaimed => {
                f.write_str("reclaimed for a new peer (datagram session cap full)")
            }
            CloseReason::WorkOverflow => {
                f.write_str("too many blocking jobs queued (worker_session_limit)")
            }
            CloseReason::WorkerPoolFull => {
                f.write_str("the worker pool's queue (worker_queue) stayed full for idle_timeout")
            }
            CloseReason::FrameTooLarge => f.write_str("frame longer than the framer's limit"),
        }
    }
}

/// A message a service asked to deliver to the other sessions of its listener.
#[derive(Debug, Clone)]
pub(crate) struct Broadcast {
    pub(crate) listener: usize,
    pub(crate) except: SessionId,
    pub(crate) data: Bytes,
}

/// A plain session turning into a TLS session (the `auto` group found a ClientHello).
pub(crate) struct TlsUpgrade {
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// The bytes already read: the start of the ClientHello.
    pub(crate) received: Vec<u8>,
    /// Opened on the decrypted stream once the handshake completes.
    pub(crate) service: Arc<dyn Service>,
}

/// The parts of a session most sessions never use, kept out of the session itself (an idle
/// session's size is what the idle-memory budget is made of).
#[derive(Default)]
pub(crate) struct SessionExtras {
    /// The handler's deadline ([`Session::set_timer`]), and a change asked for in a callback.
    pub(crate) handler_timer: Option<plexus_proto::TimerKey>,
    pub(crate) timer_request: TimerRequest,
    /// The handler asked to switch this plain session to TLS (applied after its callback).
    pub(crate) tls_upgrade: Option<Box<TlsUpgrade>>,
    /// A `proxy_protocol` session before its PROXY header is complete.
    pub(crate) proxy: Option<Box<ProxyWait>>,
}

/// A session waiting for its PROXY header.
pub(crate) struct ProxyWait {
    /// The preamble stage: the bytes read so far and the deadline.
    pub(crate) preamble: crate::connection::proxy_header::ProxyPreamble,
    /// The listener's ACL, applied to the client the header names.
    pub(crate) acl: Arc<plexus_proto::Acl>,
    /// The service to open once the header is in (plain sessions; TLS ones hold theirs).
    pub(crate) service: Option<Arc<dyn Service>>,
    pub(crate) timer: plexus_proto::TimerKey,
}

/// A change to a session's handler timer, applied by the loop after the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TimerRequest {
    #[default]
    Keep,
    Set(Duration),
    Cancel,
}

/// The handle a service gets for one session during a callback.
pub struct Session<'a> {
    pub(crate) info: &'a SessionInfo,
    pub(crate) outbound: &'a mut OutboundQueue,
    pub(crate) closing: &'a mut Option<CloseReason>,
    pub(crate) broadcasts: &'a mut Vec<Broadcast>,
    pub(crate) outbound_limit: usize,
    pub(crate) work: &'a mut WorkQueue,
    pub(crate) work_limit: usize,
    /// The upstream queue of a forward session.
    pub(crate) relay: Option<&'a mut OutboundQueue>,
    /// Rarely used per-session state (handler timer, TLS upgrade), allocated on first use.
    pub(crate) extras: &'a mut Option<Box<SessionExtras>>,
    pub(crate) drain_wanted: &'a mut bool,
    pub(crate) high_watermark: usize,
    pub(crate) metrics: Option<&'a Metrics>,
    /// The loop's clock for this callback.
    pub(crate) now: Instant,
    /// The loop's per-service state ([`crate::LoopLocal`]).
    pub(crate) locals: &'a mut LoopLocals,
    /// The protocol the TLS handshake agreed on by ALPN (read from the TLS stage).
    pub(crate) alpn: Option<&'a [u8]>,
    /// The bytes arrive decrypted from TLS.
    pub(crate) tls: bool,
}

impl Session<'_> {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.info.id
    }
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.info.peer
    }
    /// What stays true for the session's whole life.
    pub fn info(&self) -> &SessionInfo {
        self.info
    }

    /// The time of this callback: the event loop reads its clock once per turn (after
    /// `epoll_wait`) and every callback of that turn sees the same instant. Protocol code
    /// takes its time from here rather than calling `Instant::now()` (cheaper, and a test
    /// harness can set it).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// This event loop's value of `key` (created with `T::default()` on first use): state a
    /// service shares among its sessions on one loop without a lock. See
    /// [`crate::LoopLocal`].
    pub fn loop_local<T: Default + Send + 'static>(&mut self, key: &LoopLocal<T>) -> &mut T {
        self.locals.get(key)
    }

    /// Queues bytes for the peer. If the queue would pass `outbound_limit` the session is
    /// closed instead (its peer is not reading) and the bytes are dropped with it. On a udp or
    /// dtls session, each call sends exactly one datagram.
    pub fn send(&mut self, data: &[u8]) {
        if self.admits(data.len()) {
            self.outbound.push_copy(data);
        }
    }

    /// Like [`Session::send`], for bytes the caller already owns (no copy).
    pub fn send_bytes(&mut self, data: Bytes) {
        if self.admits(data.len()) {
            self.outbound.push_shared(data);
        }
    }

    /// Sends `data` to every other session of this listener, on every event loop. A member
    /// whose outbound queue would pass `outbound_limit` is closed, never waited for.
    ///
    /// Every member gets the same shared buffer (no copy per member): a service that has many
    /// small messages at once (a read's worth of chat lines) should broadcast them together, as
    /// one buffer, rather than one call each.
    pub fn broadcast(&mut self, data: &[u8]) {
        self.broadcast_bytes(Bytes::copy_from_slice(data));
    }

    /// Like [`Session::broadcast`], for bytes the caller already owns (no copy).
    pub fn broadcast_bytes(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.broadcasts.push(Broadcast {
            listener: self.info.listener.index,
            except: self.info.id,
            data,
        });
    }

    /// Runs `job` on the worker pool, for work that blocks (a database call, a file, a heavy
    /// computation). Jobs of one session run one at a time, in the order they were spawned, and
    /// what each writes into its [`Reply`] is sent in that order. While a session has many jobs
    /// waiting, plexus stops reading it; past `worker_session_limit` jobs the session is closed.
    /// A job that panics closes only its session.
    pub fn spawn_blocking(&mut self, job: impl FnOnce(&mut Reply) + Send + 'static) {
        if self.closing.is_some() {
            return;
        }
        if self.work.len() >= self.work_limit {
            *self.closing = Some(CloseReason::WorkOverflow);
            return;
        }
        self.work.push(Box::new(job));
    }

    /// Queues `len` bytes of `file` starting at `offset`. On plain TCP they go out with
    /// `sendfile` (no copy through user space); on TLS they are read one record at a time. File
    /// bytes count towards the outbound watermarks (reading pauses while they are queued) but
    /// not towards `outbound_limit`, since they hold no memory; the queue entry itself does, so
    /// a flood of tiny regions to a peer that does not read closes the session like any other.
    pub fn send_file(&mut self, file: Arc<File>, offset: u64, len: u64) {
        if len > 0 && self.admits(0) {
            self.outbound.push_file(file, offset, len);
        }
    }

    /// Calls [`SessionHandler::on_timer`] once `after` has passed (replacing an earlier
    /// deadline). For protocol deadlines such as "the request head must arrive in 10 s".
    /// Works the same on every transport (tcp, tls, udp, dtls sessions).
    pub fn set_timer(&mut self, after: Duration) {
        self.extras.get_or_insert_with(Box::default).timer_request = TimerRequest::Set(after);
    }

    /// Cancels the deadline of [`Session::set_timer`], if any.
    pub fn cancel_timer(&mut self) {
        // Without extras no timer was ever set: nothing to cancel.
        if let Some(extras) = self.extras.as_deref_mut() {
            extras.timer_request = TimerRequest::Cancel;
        }
    }

    /// Whether the outbound queue is past the high watermark: a producer should stop
    /// producing, call [`Session::notify_when_drained`], and go on in
    /// [`SessionHandler::on_drain`].
    pub fn is_backlogged(&self) -> bool {
        self.outbound.len() > self.high_watermark
    }

    /// Asks for one [`SessionHandler::on_drain`] call once the outbound queue is down to the
    /// low watermark (at once, after this callback, if it already is). On a udp or dtls
    /// session the queue that counts is its socket's send queue, shared with the other peers
    /// of that socket.
    pub fn notify_when_drained(&mut self) {
        *self.drain_wanted = true;
    }

    /// The server's counters now (sessions, refusals, bytes, handshakes, …), e.g. for a
    /// metrics endpoint. `None` only for a session not running under a [`crate::Server`].
    pub fn server_metrics(&self) -> Option<MetricsSnapshot> {
        self.metrics.map(Metrics::snapshot)
    }

    /// Whether the server is shutting down (SIGTERM received: the `drain_delay` lameduck or
    /// the drain after it): a health check should fail so balancers stop sending clients.
    pub fn server_draining(&self) -> bool {
        self.metrics
            .is_some_and(|m| m.draining.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The server's counters with the facts around them (uptime, configuration source, the
    /// last reload), for a status page. `None` only for a session not running under a
    /// [`crate::Server`].
    pub fn server_status(&self) -> Option<ServerStatus> {
        self.metrics.map(Metrics::status)
    }

    /// Turns this plain TCP session into a TLS session — what a protocol group does when the
    /// first bytes are a TLS ClientHello. `received` holds the bytes the handler has read so
    /// far (the start of the ClientHello); they become the first ciphertext of the handshake.
    /// Once the handshake completes, `service` is opened on the decrypted stream and its
    /// handler replaces this one (so detection can run again inside TLS).
    ///
    /// Applied when the current callback returns; the handshake is bounded by
    /// `handshake_timeout` and counted like a tls listener's. On a session that is already TLS,
    /// on a session that is closing, or on a udp/dtls session, the request is ignored and the
    /// session goes on as it was.
    pub fn start_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        received: Vec<u8>,
        service: Arc<dyn Service>,
    ) {
        self.extras.get_or_insert_with(Box::default).tls_upgrade = Some(Box::new(TlsUpgrade {
            config,
            received,
            service,
        }));
    }

    /// The application protocol the TLS handshake agreed on by ALPN (RFC 7301), e.g. `b"h2"`
    /// or `b"http/1.1"` — what a listener's `alpn` list offered and the client chose. `None`
    /// on a plain session, or when the client offered no protocol the listener lists. Known
    /// from the service's [`Service::open`] on (services are opened once the handshake
    /// completes), also on a session an `auto` group turned into TLS.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn
    }

    /// Whether the session's bytes travel inside TLS: a tls listener's session, or one a
    /// protocol group upgraded with [`Session::start_tls`] (from the service's
    /// [`Service::open`] on). False on plain, udp and dtls sessions.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Queues bytes for the upstream of a forward session (the relay's own handler uses this).
    pub(crate) fn relay_upstream(&mut self, data: &[u8]) {
        if let Some(queue) = self.relay.as_deref_mut() {
            queue.push_copy(data);
        }
    }

    /// Closes the session once every queued byte has been written.
    pub fn close(&mut self) {
        self.closing.get_or_insert(CloseReason::Requested);
    }

    /// Bytes queued for the peer and not yet written.
    pub fn queued(&self) -> usize {
        self.outbound.len()
    }

    fn admits(&mut self, extra: usize) -> bool {
        if self.closing.is_some() {
            return false;
        }
        if !self.outbound.fits(extra, self.outbound_limit) {
            *self.closing = Some(CloseReason::OutboundOverflow);
            return false;
        }
        true
    }
}
