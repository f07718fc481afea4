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
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::connector::{Connecting, Upstream};
use crate::loop_local::{LoopLocal, LoopLocals};
use crate::metrics::{LoopStats, ServerStatus};
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

    /// The server began a graceful drain (SIGTERM once `drain_delay` passed, SIGINT, or the
    /// old process of an upgrade handing over): called once on every open stream session (tcp
    /// and tls, whose service is open) when its event loop stops taking sessions. This is the
    /// moment to say goodbye in the protocol's own terms, also on a session that is idle and
    /// would get no other callback: HTTP/2 sends GOAWAY (in-flight streams finish, new ones
    /// are refused), HTTP/1.1 closes keep-alive connections between requests. A session that
    /// does nothing here is closed once it has been idle for a second, or at
    /// `shutdown_grace`. Sessions opened after the drain began (none are accepted) and udp or
    /// dtls sessions (they end at the drain) are not called. The default does nothing.
    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        let _ = session;
    }

    /// The session ended; nothing can be sent any more. The default does nothing.
    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let _ = (info, reason);
    }

    /// Something happened to a session linked with this one (see [`crate::connector`]): the
    /// upstream this session opened with [`Session::connect`] is connected, or a linked session
    /// ended. The default closes this session (after flushing) when a linked one ends.
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Closed { .. } = event {
            session.close();
        }
    }

    /// The peer finished sending (TCP FIN, or TLS close_notify) on a session that has linked
    /// sessions. Such a session stays open until its own write side is finished too (with
    /// [`Session::finish`], or by a linked session's [`Session::finish_to`]), or it closes:
    /// a relay passes the end on with `finish_to`. Sessions without links are not asked: they
    /// close once their queue is flushed. The default closes the session after flushing.
    fn on_eof(&mut self, session: &mut Session<'_>) {
        session.close();
    }
}

/// What [`SessionHandler::on_link`] reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The upstream session `upstream` (the id [`Session::connect`] returned) is connected
    /// to `addr`; bytes sent to it before are on their way. For a TLS upstream
    /// ([`crate::Upstream::with_tls`]) this comes once the TLS handshake is complete (the
    /// server's certificate verified), not at the TCP connect: an upstream that accepts TCP
    /// and fails or stalls the handshake only ever reports [`LinkEvent::Closed`].
    Connected {
        /// The upstream session.
        upstream: SessionId,
        /// The address it connected to (the first of its upstream's addresses that accepted).
        addr: SocketAddr,
    },
    /// The linked session `peer` ended (its queued bytes are gone with it).
    Closed {
        /// The session that ended.
        peer: SessionId,
        /// Why: [`CloseReason::UpstreamFailed`] or [`CloseReason::UpstreamTimeout`] for an
        /// upstream that never connected.
        reason: CloseReason,
    },
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
    /// An upstream session ([`Session::connect`]) could not connect: every address refused,
    /// reset or failed (the last failure's kind).
    UpstreamFailed(std::io::ErrorKind),
    /// An upstream session's last address did not accept within the connect timeout.
    UpstreamTimeout,
    /// An upstream session needed a socket and the process (or the system) had no file
    /// descriptor left (EMFILE/ENFILE): the upstream was not tried, so it is not to blame.
    DescriptorsExhausted,
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
            CloseReason::DescriptorsExhausted => {
                f.write_str("no file descriptor left for the upstream socket (EMFILE/ENFILE)")
            }
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
    /// Linked sessions (connectors), and what a callback asked of them.
    pub(crate) links: Option<Box<Links>>,
}

/// A session's links to other sessions of its loop (see [`crate::connector`]).
#[derive(Default)]
pub(crate) struct Links {
    /// The linked sessions: key in the loop's table, and id.
    pub(crate) peers: Vec<(usize, SessionId)>,
    /// Asked in the current callback; applied by the loop after it.
    pub(crate) ops: Vec<LinkOp>,
    /// Bytes in `ops` (the loop stops reading this session's peer past the high watermark).
    pub(crate) pending: usize,
    /// Sessions not read because their sends put this session's queue past the high watermark.
    pub(crate) waiters: Vec<(usize, SessionId)>,
    /// The write side is to be closed (FIN / close_notify) once the queue is flushed.
    pub(crate) finish: bool,
    /// …and it was.
    pub(crate) write_shut: bool,
    /// The handler was told of the peer's end (`on_eof`).
    pub(crate) eof_told: bool,
    /// An upstream session whose connect is still running.
    pub(crate) connecting: Option<Box<Connecting>>,
    /// The upstream of an upstream session (its counters).
    pub(crate) upstream: Option<Upstream>,
    /// A TLS upstream session whose TCP connect succeeded: the opener hears `Connected` (with
    /// this address) once the TLS handshake is done, not before.
    pub(crate) announce: Option<SocketAddr>,
    /// What this session reads goes to a linked session inside the kernel
    /// ([`Session::splice_with`]).
    pub(crate) splice: Option<Box<SpliceOut>>,
    /// A client runtime's connection ([`crate::ClientRuntime::connect`]): no session opened
    /// it, so its own handler hears `Connected`, and [`Session::finish`] half-closes it.
    pub(crate) client: bool,
}

/// One direction of a spliced pair: this session's socket → `pipe` → the peer's socket.
pub(crate) struct SpliceOut {
    /// The linked session the bytes go to: key in the loop's table, and id.
    pub(crate) peer: (usize, SessionId),
    pub(crate) pipe: plexus_sys::splice::Pipe,
    /// Bytes in the pipe not yet written to the peer (at most the pipe's capacity).
    pub(crate) pending: usize,
}

/// What a callback asked of a linked session.
pub(crate) enum LinkOp {
    Connect(Box<ConnectRequest>),
    Send(SessionId, bytes::BytesMut),
    Finish(SessionId),
    Close(SessionId),
    Splice(SessionId),
}

/// An upstream session to open.
pub(crate) struct ConnectRequest {
    pub(crate) id: SessionId,
    pub(crate) upstream: Upstream,
    pub(crate) handler: Box<dyn SessionHandler>,
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
    /// Rarely used per-session state (handler timer, TLS upgrade), allocated on first use.
    pub(crate) extras: &'a mut Option<Box<SessionExtras>>,
    pub(crate) drain_wanted: &'a mut bool,
    pub(crate) high_watermark: usize,
    /// Bytes the socket took and has not written yet (an io_uring session's send): counted
    /// with the queue by [`Session::is_backlogged`] and [`Session::queued`].
    pub(crate) unsent: usize,
    pub(crate) metrics: Option<&'a Metrics>,
    /// The loop's clock for this callback.
    pub(crate) now: Instant,
    /// The loop's per-service state ([`crate::LoopLocal`]).
    pub(crate) locals: &'a mut LoopLocals,
    /// The protocol the TLS handshake agreed on by ALPN (read from the TLS stage).
    pub(crate) alpn: Option<&'a [u8]>,
    /// The TLS connection's state, on a TLS stream session.
    pub(crate) tls_state: Option<&'a rustls::CommonState>,
    /// The bytes arrive decrypted from TLS.
    pub(crate) tls: bool,
    /// A plain TCP session's socket, for [`Session::send`]'s write-through (`None`: TLS,
    /// datagram, test harness).
    pub(crate) direct: Option<DirectWrite<'a>>,
}

/// Sends of at least this many bytes onto an empty queue are written to the socket at once
/// ([`Session::send`]). Below it, copying into the queue costs less than the system call a
/// second send in the same callback would add (small replies leave together, in one `writev`).
pub const WRITE_THROUGH_MIN: usize = 8 * 1024;

/// What [`Session::send`] needs to write a plain TCP session's socket directly.
pub(crate) struct DirectWrite<'a> {
    pub(crate) stream: &'a mut mio::net::TcpStream,
    /// The session's "last write would block" flag, kept as the loop's flush keeps it.
    pub(crate) write_blocked: &'a mut bool,
    pub(crate) last_activity: &'a mut Instant,
    pub(crate) stats: &'a LoopStats,
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
    ///
    /// On a plain TCP session, a send of [`WRITE_THROUGH_MIN`] bytes or more with nothing
    /// queued before it is written to the socket at once, and only what the socket did not
    /// take is queued: a large reply costs no copy into the queue (the order of bytes is the
    /// same either way).
    #[inline]
    pub fn send(&mut self, data: &[u8]) {
        let mut data = data;
        if data.len() >= WRITE_THROUGH_MIN {
            match self.write_through(data) {
                Some([]) | None => return,
                Some(rest) => data = rest,
            }
        }
        if self.admits(data.len()) {
            self.outbound.push_copy(data);
        }
    }

    /// Writes `data` to the socket now if this session may ([`DirectWrite`]): a plain TCP
    /// session with nothing queued, its socket not known to be full, its write side open and
    /// nothing pending that must go first (a connect, a TLS upgrade, a splice). Returns what
    /// is left to queue, or `None` when the write failed (the session closes, as when the
    /// queue's own write fails).
    fn write_through<'d>(&mut self, data: &'d [u8]) -> Option<&'d [u8]> {
        if self.closing.is_some() || !self.outbound.is_empty() || !self.extras_allow_direct() {
            return Some(data);
        }
        let Some(direct) = self.direct.as_mut() else {
            return Some(data);
        };
        if *direct.write_blocked {
            return Some(data);
        }
        match direct.stream.write(data) {
            Ok(written) => {
                if written > 0 {
                    *direct.last_activity = self.now;
                    direct.stats.sent(&self.info.listener, written);
                }
                let rest = data.get(written..).unwrap_or_default();
                // A short write filled the socket: its writable edge says when to go on.
                *direct.write_blocked = !rest.is_empty();
                Some(rest)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                *direct.write_blocked = true;
                Some(data)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Some(data),
            Err(err) => {
                *self.closing = Some(CloseReason::Io(err.kind()));
                None
            }
        }
    }

    /// Whether nothing in the session's extras must reach the socket before new bytes.
    fn extras_allow_direct(&self) -> bool {
        let Some(extras) = self.extras.as_deref() else {
            return true;
        };
        extras.tls_upgrade.is_none()
            && extras.proxy.is_none()
            && extras.links.as_deref().is_none_or(|links| {
                links.connecting.is_none()
                    && links.splice.is_none()
                    && !links.finish
                    && !links.write_shut
            })
    }

    /// Like [`Session::send`], for bytes the caller already owns (no copy).
    #[inline]
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
        self.queued() > self.high_watermark
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

    /// The TLS connection of a tls stream session (a tls listener's, one an `auto` group
    /// upgraded, or a TLS upstream / client connection): its protocol version, cipher suite
    /// and the peer's certificates, once the handshake is done. `None` on plain, udp and dtls
    /// sessions.
    pub fn tls_state(&self) -> Option<&rustls::CommonState> {
        self.tls_state
    }

    /// Whether this is a datagram session (a udp or dtls listener's, or the UDP upstream one
    /// of those opened): each `on_data` is one datagram and each send one datagram.
    pub fn is_datagram(&self) -> bool {
        self.outbound.is_framed()
    }

    /// Whether the session's bytes travel inside TLS: a tls listener's session, or one a
    /// protocol group upgraded with [`Session::start_tls`] (from the service's
    /// [`Service::open`] on). False on plain, udp and dtls sessions.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Opens a connection to `upstream` on this session's event loop, handled by `handler`,
    /// linked with this session (see [`crate::connector`]); returns the new session's id, for
    /// [`Session::send_to`]. The connect starts when this callback returns;
    /// [`SessionHandler::on_link`] reports [`LinkEvent::Connected`] or
    /// [`LinkEvent::Closed`]. Bytes sent to it meanwhile wait in its queue.
    ///
    /// From a tcp or tls session this is a TCP connection (TLS with
    /// [`Upstream::with_tls`]). From a udp or dtls session it is a *connected UDP socket*
    /// (see "Datagram upstreams" in [`crate::connector`]): each `send_to` is one datagram to
    /// the upstream, each datagram the upstream sends is one `on_data` of `handler`, and the
    /// socket closes with this session; DTLS with [`Upstream::with_dtls`], while a
    /// [`Upstream::with_tls`] upstream is refused there ([`LinkEvent::Closed`] with
    /// [`CloseReason::UpstreamFailed`]). On a closing session the request is dropped, and the
    /// handler's `on_link` is never called.
    pub fn connect(&mut self, upstream: &Upstream, handler: Box<dyn SessionHandler>) -> SessionId {
        let id = SessionId::next();
        if let Some(metrics) = self.metrics {
            upstream.register(&metrics.upstreams);
        }
        if self.closing.is_none() {
            self.links()
                .ops
                .push(LinkOp::Connect(Box::new(ConnectRequest {
                    id,
                    upstream: upstream.clone(),
                    handler,
                })));
        }
        id
    }

    /// Queues `data` for the linked session `peer` (the upstream this session opened, or the
    /// session that opened this one). Dropped if `peer` is not linked or already ended. If
    /// `peer`'s queue would pass `outbound_limit`, `peer` is closed (`OutboundOverflow`);
    /// past its high watermark, this session is not read until it drains. Between datagram
    /// sessions (a udp/dtls session and its UDP upstream) each call is one datagram, and
    /// UDP drops rather than blocks: a datagram that finds its link's queue past the high
    /// watermark is dropped and counted (`plexus_upstream_datagrams_dropped_total`).
    pub fn send_to(&mut self, peer: SessionId, data: &[u8]) {
        let datagrams = self.outbound.is_framed();
        if (data.is_empty() && !datagrams) || self.closing.is_some() {
            return;
        }
        let links = self.links();
        links.pending = links.pending.saturating_add(data.len());
        // A datagram session's sends stay one datagram each: never merged.
        if let Some(LinkOp::Send(to, buf)) = links.ops.last_mut().filter(|_| !datagrams) {
            if *to == peer {
                buf.extend_from_slice(data);
                return;
            }
        }
        links
            .ops
            .push(LinkOp::Send(peer, bytes::BytesMut::from(data)));
    }

    /// Closes the write side of the linked session `peer` once its queue is flushed: a TCP
    /// FIN, or close_notify on TLS. It goes on reading; it closes once its own peer finished.
    pub fn finish_to(&mut self, peer: SessionId) {
        self.links().ops.push(LinkOp::Finish(peer));
    }

    /// Closes the linked session `peer` once its queue is flushed (as its own
    /// [`Session::close`] would).
    pub fn close_to(&mut self, peer: SessionId) {
        self.links().ops.push(LinkOp::Close(peer));
    }

    /// From now on, the bytes between this session and the linked session `peer` move socket
    /// to socket inside the kernel, both ways (`splice(2)` through a pipe per direction): the
    /// two handlers see no more `on_data`, and each still hears `on_eof` once its side's bytes
    /// are all across (a relay answers it with [`Session::finish_to`], as it would when
    /// copying). Bytes already queued for either side are written first. Only between two
    /// plain TCP sessions (no TLS on either, `peer` connected); otherwise, or when no pipe can
    /// be made (descriptor limit), nothing changes and the bytes keep coming to `on_data`.
    pub fn splice_with(&mut self, peer: SessionId) {
        self.links().ops.push(LinkOp::Splice(peer));
    }

    /// Closes this session's write side once its queue is flushed (FIN, or close_notify on
    /// TLS) and goes on reading: on a session with links, and on a client runtime's
    /// connection ([`crate::ClientRuntime::connect`]), which then closes once the peer has
    /// finished too. On any other session this is [`Session::close`].
    pub fn finish(&mut self) {
        match self
            .extras
            .as_deref_mut()
            .and_then(|e| e.links.as_deref_mut())
        {
            Some(links) if !links.peers.is_empty() || links.client => links.finish = true,
            _ => self.close(),
        }
    }

    fn links(&mut self) -> &mut Links {
        self.extras
            .get_or_insert_with(Box::default)
            .links
            .get_or_insert_with(Box::default)
    }

    /// Closes the session once every queued byte has been written.
    pub fn close(&mut self) {
        self.closing.get_or_insert(CloseReason::Requested);
    }

    /// Bytes queued for the peer and not yet written (with `backend = "io_uring"` this counts
    /// the bytes of the send on the ring too).
    pub fn queued(&self) -> usize {
        self.outbound.len().saturating_add(self.unsent)
    }

    #[inline]
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
