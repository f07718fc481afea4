//! A test harness for services: one session driven in memory, with a fake clock — bytes in,
//! bytes and closes out, no sockets and no threads (the way quinn-proto's tests drive a
//! connection pair).
//!
//! Available with the `testing` cargo feature of `plexus` (off by default); a crate enables it
//! for its own tests only:
//!
//! ```toml
//! [dev-dependencies]
//! plexus = { version = "…", features = ["testing"] }
//! ```
//!
//! A [`Harness`] owns what an event loop keeps for one session — the real outbound queue,
//! blocking-job queue and per-session extras — and builds the handler's [`Session`] handle
//! exactly as the loop does, so the service under test runs the same code it runs under a
//! [`crate::Server`]: the same `outbound_limit` check, the same watermarks, the same timer and
//! drain requests. What the loop would do with sockets, the harness does on request:
//!
//! - [`Harness::receive`] is the peer sending bytes: they are read in chunks of at most 64 KiB
//!   (the loop's read size) and handed to [`SessionHandler::on_data`], unless reading is paused
//!   because the outbound queue passed the high watermark (then they wait, as in the socket's
//!   receive buffer, until the queue drains).
//! - The peer reads only when asked: what the handler sends stays queued ([`Harness::queued`])
//!   until [`Harness::take_sent`] (or [`Harness::drain`]) writes the whole queue to it — file
//!   regions of [`Session::send_file`] are read back, so a test sees the real bytes. That write
//!   has the loop's consequences: a requested close completes once nothing is queued, an
//!   [`SessionHandler::on_drain`] asked for with [`Session::notify_when_drained`] is called once
//!   the queue is at the low watermark, and paused reading resumes.
//! - [`Harness::advance`] moves the fake clock ([`Harness::now`]); the handler's timer
//!   ([`Session::set_timer`]) fires at its deadline exactly and never before (the loop's timer
//!   wheel may fire up to one 10 ms tick later), and a session with no byte moved for
//!   `idle_timeout` closes with [`CloseReason::IdleTimeout`].
//! - Blocking jobs ([`Session::spawn_blocking`]) wait until [`Harness::run_jobs`] runs them, in
//!   order, on the calling thread; their replies are queued in that order.
//! - [`Session::broadcast`] calls are captured ([`Harness::take_broadcasts`]);
//!   [`Harness::deliver_broadcast`] is another member's broadcast arriving.
//! - [`Harness::start_server_drain`] is the server beginning a graceful drain
//!   ([`SessionHandler::on_server_drain`]).
//! - A panic in a handler or a job closes the session with [`CloseReason::Panic`], as in the
//!   runtime; [`Harness::closed`] says how the session ended, after `on_close` ran.
//!
//! ```
//! use plexus::testing::Harness;
//! use plexus::{Service, Session, SessionHandler};
//!
//! struct Upper;
//! struct UpperSession;
//! impl Service for Upper {
//!     fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
//!         Box::new(UpperSession)
//!     }
//! }
//! impl SessionHandler for UpperSession {
//!     fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
//!         session.send(&data.to_ascii_uppercase());
//!     }
//! }
//!
//! let mut h = Harness::new(Upper);
//! h.receive(b"hello");
//! assert_eq!(h.take_sent(), b"HELLO");
//! h.close_by_peer();
//! assert_eq!(h.closed(), Some(&plexus::CloseReason::PeerClosed));
//! ```

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use plexus_proto::{deadline_after, TimerKey, TimerWheel};
use tracing::error;

use crate::config::{ServerConfig, READ_CHUNK};
use crate::outbound::OutboundQueue;
use crate::service::{
    Broadcast, CloseReason, ListenerInfo, Service, Session, SessionExtras, SessionHandler,
    SessionId, SessionInfo, TimerRequest,
};
use crate::worker::{Reply, WorkQueue};

/// Consecutive `on_drain` calls one step delivers before it returns (a handler that asks to be
/// notified while its queue is already empty would otherwise be called for ever).
const MAX_DRAINS_PER_STEP: usize = 1024;

/// The limits the harness applies, as a loop's `SessionLimits` (defaults: `[server]`'s).
#[derive(Debug, Clone, Copy)]
struct Limits {
    high_watermark: usize,
    low_watermark: usize,
    outbound_limit: usize,
    work_limit: usize,
    idle_timeout: Duration,
}

impl Limits {
    fn from_config(server: &ServerConfig) -> Limits {
        Limits {
            high_watermark: server.outbound_high_watermark,
            low_watermark: server.outbound_low_watermark,
            outbound_limit: server.outbound_limit,
            work_limit: server.worker_session_limit,
            idle_timeout: server.idle_timeout,
        }
    }
}

/// What a harness timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Handler,
    Idle,
}

/// Sets up a [`Harness`]: the session's addresses, listener name and limits.
///
/// Available with the `testing` feature.
pub struct HarnessBuilder {
    service: Arc<dyn Service>,
    peer: SocketAddr,
    local: SocketAddr,
    listener: String,
    limits: Limits,
    datagram: bool,
    alpn: Option<Vec<u8>>,
}

impl HarnessBuilder {
    /// The client's address ([`Session::peer`]); default `127.0.0.1:40000`.
    pub fn peer(mut self, peer: SocketAddr) -> Self {
        self.peer = peer;
        self
    }

    /// The local address the client connected to; default `127.0.0.1:7000`.
    pub fn local(mut self, local: SocketAddr) -> Self {
        self.local = local;
        self
    }

    /// The name of the listener the session arrived on; default `"test"`.
    pub fn listener(mut self, name: &str) -> Self {
        self.listener = name.to_owned();
        self
    }

    /// Takes every session limit from a `[server]` section (watermarks, `outbound_limit`,
    /// `worker_session_limit`, `idle_timeout`). Without it the defaults of
    /// [`ServerConfig::default`] apply.
    pub fn server_config(mut self, server: &ServerConfig) -> Self {
        self.limits = Limits::from_config(server);
        self
    }

    /// `outbound_limit`: queued bytes past which a send closes the session
    /// ([`CloseReason::OutboundOverflow`]).
    pub fn outbound_limit(mut self, limit: usize) -> Self {
        self.limits.outbound_limit = limit;
        self
    }

    /// `outbound_high_watermark` and `outbound_low_watermark`: past `high` the session is not
    /// read and [`Session::is_backlogged`] is true; at `low` reading resumes and `on_drain` is
    /// due.
    pub fn watermarks(mut self, high: usize, low: usize) -> Self {
        self.limits.high_watermark = high;
        self.limits.low_watermark = low;
        self
    }

    /// `worker_session_limit`: blocking jobs the session may have queued.
    pub fn worker_session_limit(mut self, limit: usize) -> Self {
        self.limits.work_limit = limit;
        self
    }

    /// `idle_timeout`: the session closes when no byte moved either way for this long (on
    /// the fake clock).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.limits.idle_timeout = timeout;
        self
    }

    /// A udp-style session, as the runtime's datagram sessions: each [`Harness::receive`] is
    /// one datagram (one `on_data`), each send one datagram ([`Harness::take_datagrams`]),
    /// written at once after every callback; a close takes effect at once; handler timers and
    /// drain notifications are not acted on, and `spawn_blocking` closes the session
    /// ([`CloseReason::WorkOverflow`]), as on a udp listener today.
    pub fn datagram(mut self) -> Self {
        self.datagram = true;
        self
    }

    /// The protocol [`Session::alpn_protocol`] reports, as if a TLS handshake had agreed on it
    /// by ALPN, and [`Session::is_tls`] true (the harness runs no TLS: bytes stay plaintext);
    /// default none.
    pub fn alpn(mut self, protocol: &[u8]) -> Self {
        self.alpn = Some(protocol.to_vec());
        self
    }

    /// Opens the session: [`Service::open`] runs (it may already send or close).
    pub fn open(self) -> Harness {
        let now = Instant::now();
        let info = SessionInfo {
            id: SessionId::next(),
            peer: self.peer,
            local: self.local,
            listener: Arc::new(ListenerInfo {
                index: 0,
                name: Arc::from(self.listener.as_str()),
                stats: Default::default(),
            }),
        };
        let mut timers = TimerWheel::new(Duration::from_millis(1), 1024, now);
        let idle_timer = Some(timers.insert(
            deadline_after(now, self.limits.idle_timeout),
            TimerKind::Idle,
        ));
        let mut harness = Harness {
            service: Arc::clone(&self.service),
            info,
            handler: Box::new(Opening),
            outbound: if self.datagram {
                OutboundQueue::datagrams()
            } else {
                OutboundQueue::default()
            },
            closing: None,
            closed: None,
            pending_broadcasts: Vec::new(),
            broadcasts: Vec::new(),
            work: WorkQueue::default(),
            extras: None,
            locals: Default::default(),
            drain_wanted: false,
            drain_due: false,
            limits: self.limits,
            datagram: self.datagram,
            timers,
            idle_timer,
            handler_deadline: None,
            now,
            last_activity: now,
            unread: VecDeque::new(),
            fin_pending: false,
            peer_eof: false,
            read_paused: false,
            sent: Vec::new(),
            datagrams: Vec::new(),
            tls_request: None,
            alpn: self.alpn,
        };
        let service = Arc::clone(&self.service);
        harness.callback(|handler, session| *handler = service.open(session));
        harness.settle();
        harness
    }
}

/// One session of a [`Service`], driven in memory with a fake clock. See the
/// [module documentation](self) for the model.
///
/// Available with the `testing` feature.
pub struct Harness {
    /// Kept alive for the handler's sake (it may hold references into it).
    #[allow(dead_code)]
    service: Arc<dyn Service>,
    info: SessionInfo,
    handler: Box<dyn SessionHandler>,
    outbound: OutboundQueue,
    closing: Option<CloseReason>,
    closed: Option<CloseReason>,
    /// `Session::broadcast` calls of the current callback (the loop's outbox).
    pending_broadcasts: Vec<Broadcast>,
    broadcasts: Vec<Bytes>,
    work: WorkQueue,
    extras: Option<Box<SessionExtras>>,
    /// The loop's per-service state ([`crate::LoopLocal`]) of the harness's one-session loop.
    locals: crate::loop_local::LoopLocals,
    drain_wanted: bool,
    drain_due: bool,
    limits: Limits,
    datagram: bool,
    timers: TimerWheel<TimerKind>,
    idle_timer: Option<TimerKey>,
    handler_deadline: Option<Instant>,
    now: Instant,
    last_activity: Instant,
    /// Bytes the peer sent that the session has not read yet (its socket's receive buffer).
    unread: VecDeque<u8>,
    /// The peer closed its side: the end is read once `unread` is.
    fin_pending: bool,
    peer_eof: bool,
    read_paused: bool,
    /// Bytes written to the peer and not yet taken by the test.
    sent: Vec<u8>,
    datagrams: Vec<Bytes>,
    tls_request: Option<Vec<u8>>,
    alpn: Option<Vec<u8>>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("session", &self.info.id)
            .field("now", &self.now)
            .field("queued", &self.outbound.len())
            .field("unread", &self.unread.len())
            .field("closing", &self.closing)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for HarnessBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HarnessBuilder")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .field("datagram", &self.datagram)
            .finish_non_exhaustive()
    }
}

/// The handler a session has while its service's `open` runs (it receives no events).
struct Opening;

impl SessionHandler for Opening {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}

impl Harness {
    /// Opens a stream session of `service` with the default addresses and limits.
    pub fn new(service: impl Service) -> Harness {
        Harness::builder(service).open()
    }

    /// A builder for a session of `service`.
    pub fn builder(service: impl Service) -> HarnessBuilder {
        Harness::builder_shared(Arc::new(service))
    }

    /// A builder for a session of a service that is already shared (as
    /// [`crate::ServerBuilder::shared_service`] takes it).
    pub fn builder_shared(service: Arc<dyn Service>) -> HarnessBuilder {
        HarnessBuilder {
            service,
            peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
            local: SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)),
            listener: "test".to_owned(),
            limits: Limits::from_config(&ServerConfig::default()),
            datagram: false,
            alpn: None,
        }
    }

    /// What stays true for the session's whole life (id, addresses, listener).
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The fake clock: starts at the harness' creation, moves only with [`Harness::advance`].
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The peer sends `data`. On a stream session the handler reads it in chunks of at most
    /// 64 KiB, as far as reading is not paused; on a datagram session it is one datagram.
    /// Ignored once the session is closing or closed, or after [`Harness::close_by_peer`].
    pub fn receive(&mut self, data: &[u8]) {
        if self.closed.is_some() || self.fin_pending {
            return;
        }
        if self.datagram {
            if self.closing.is_some() {
                return;
            }
            self.touch();
            self.callback(|handler, session| handler.on_data(session, data));
            self.settle();
            return;
        }
        self.unread.extend(data);
        self.settle();
    }

    /// The peer closes its side (FIN, or a TLS close_notify): once everything it sent has been
    /// read and what is queued has been written, the session ends with
    /// [`CloseReason::PeerClosed`] (after the next [`Harness::take_sent`] if bytes are queued).
    pub fn close_by_peer(&mut self) {
        if self.closed.is_none() {
            self.fin_pending = true;
            self.settle();
        }
    }

    /// The peer resets the connection: the session ends at once with
    /// [`CloseReason::Io`]`(ConnectionReset)`, queued bytes dropped.
    pub fn reset_by_peer(&mut self) {
        if self.closed.is_none() {
            self.close(CloseReason::Io(std::io::ErrorKind::ConnectionReset));
        }
    }

    /// The server begins a graceful drain: [`SessionHandler::on_server_drain`] is called, as
    /// the event loop calls it on every stream session (ignored on a datagram session, or one
    /// closing or closed). [`Session::server_draining`] stays false in the harness (it has no
    /// server), so this tests the hook alone.
    pub fn start_server_drain(&mut self) {
        if self.datagram || self.closed.is_some() || self.closing.is_some() {
            return;
        }
        self.callback(|handler, session| handler.on_server_drain(session));
        self.settle();
    }

    /// Bytes the handler queued and the peer has not read yet (what
    /// [`Session::queued`] and the watermarks see).
    pub fn queued(&self) -> usize {
        self.outbound.len()
    }

    /// Bytes the peer sent that the handler has not been given yet (reading is paused).
    pub fn unread(&self) -> usize {
        self.unread.len()
    }

    /// The peer reads everything queued; returns every byte written to it since the last call
    /// (file regions read back from their files). See [`Harness::drain`] for what the write
    /// sets off.
    pub fn take_sent(&mut self) -> Vec<u8> {
        self.drain();
        std::mem::take(&mut self.sent)
    }

    /// The peer reads everything queued (kept for the next [`Harness::take_sent`]). As in the
    /// loop, a close the handler asked for then completes, `on_drain` is called if the handler
    /// asked for it and the queue is at the low watermark (what that call queues stays queued
    /// until the peer reads again), and paused reading resumes.
    pub fn drain(&mut self) {
        if self.datagram || self.closed.is_some() {
            return;
        }
        if self
            .closing
            .as_ref()
            .is_some_and(|reason| !reason.flushes())
        {
            self.settle();
            return;
        }
        let mut wrote = false;
        while !self.outbound.is_empty() {
            match self.outbound.front(READ_CHUNK) {
                Ok(chunk) => {
                    let n = chunk.len();
                    self.sent.extend_from_slice(chunk);
                    self.outbound.consume(n);
                    wrote = true;
                }
                Err(err) => {
                    // What the loop's write does when a queued file cannot be read (it shrank).
                    self.close(CloseReason::Io(err.kind()));
                    return;
                }
            }
        }
        if wrote {
            self.touch();
        }
        self.settle();
    }

    /// The datagrams the handler sent since the last call, in order (datagram sessions).
    pub fn take_datagrams(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.datagrams)
    }

    /// How the session ended, once it has (`on_close` has run).
    pub fn closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// Whether the session is ending: a close was asked for (queued bytes still to be
    /// written) or it has ended.
    pub fn is_closing(&self) -> bool {
        self.closing.is_some() || self.closed.is_some()
    }

    /// When the handler's timer ([`Session::set_timer`]) fires, if one is armed.
    pub fn timer_deadline(&self) -> Option<Instant> {
        self.handler_deadline
    }

    /// Moves the fake clock on by `by`, firing every timer that comes due on the way at its
    /// own deadline, in deadline order (a timer the handler sets in `on_timer` fires too if
    /// it falls within `by`).
    pub fn advance(&mut self, by: Duration) {
        let target = deadline_after(self.now, by);
        let mut expired = Vec::new();
        while self.closed.is_none() {
            let Some(next) = self.timers.next_wakeup().filter(|at| *at <= target) else {
                break;
            };
            self.now = self.now.max(next);
            self.timers.poll_expired(self.now, &mut expired);
            for kind in expired.drain(..) {
                self.fire(kind);
            }
        }
        self.now = target;
    }

    /// The broadcasts the handler made since the last call ([`Session::broadcast`]), in order.
    /// Under a server each would reach every other session of the listener.
    pub fn take_broadcasts(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.broadcasts)
    }

    /// The broadcasts made since the last [`Harness::take_broadcasts`], without taking them.
    pub fn broadcasts(&self) -> &[Bytes] {
        &self.broadcasts
    }

    /// Another session of the listener broadcast `data`: it is queued for this session's peer
    /// as the loop queues it (shared, no copy), or closes this session with
    /// [`CloseReason::OutboundOverflow`] if it would pass `outbound_limit`.
    pub fn deliver_broadcast(&mut self, data: Bytes) {
        if self.closed.is_some() || self.closing.is_some() {
            return;
        }
        if !self.outbound.fits(data.len(), self.limits.outbound_limit) {
            self.closing = Some(CloseReason::OutboundOverflow);
        } else {
            self.outbound.push_shared(data);
        }
        self.settle();
    }

    /// Blocking jobs queued and not yet run.
    pub fn pending_jobs(&self) -> usize {
        self.work.len()
    }

    /// Runs the queued blocking jobs one after another, on this thread, delivering each reply
    /// as the loop does (queued in order; a reply that asks to close closes once written; a
    /// job that panics closes the session with [`CloseReason::Panic`]). Returns how many ran.
    pub fn run_jobs(&mut self) -> usize {
        let mut ran = 0usize;
        while self.closed.is_none() {
            let Some(job) = self.work.next() else { break };
            let mut reply = Reply::default();
            let outcome = catch_unwind(AssertUnwindSafe(|| job(&mut reply)));
            ran = ran.saturating_add(1);
            self.work.finished();
            match outcome {
                Err(_) => {
                    error!(session = %self.info.id, "blocking job panicked; closing this session only");
                    self.closing = Some(CloseReason::Panic);
                }
                Ok(()) => {
                    let (data, close) = reply.into_parts();
                    if self.closing.is_none() {
                        if !self.outbound.fits(data.len(), self.limits.outbound_limit) {
                            self.closing = Some(CloseReason::OutboundOverflow);
                        } else {
                            self.outbound.push_shared(Bytes::from(data));
                            if close {
                                self.closing = Some(CloseReason::Requested);
                            }
                        }
                    }
                }
            }
            self.settle();
        }
        ran
    }

    /// The bytes the handler handed to [`Session::start_tls`], if it asked to switch to TLS
    /// (and was not closing). The harness does not run TLS: the session goes on as it was.
    pub fn tls_requested(&self) -> Option<&[u8]> {
        self.tls_request.as_deref()
    }

    /// What the protocol groups this session ran through decided, as the listener's
    /// `/metrics` counts it ([`crate::ListenerSnapshot::protocol_groups`]): for a service that
    /// is (or builds on) a [`crate::ProtocolGroup`].
    pub fn protocol_groups(&self) -> Vec<crate::ProtocolGroupSnapshot> {
        self.info.listener.stats.group_snapshots()
    }

    /// Calls into the handler with a [`Session`] handle built as the loop builds it; a panic
    /// closes the session ([`CloseReason::Panic`]), as in the runtime.
    fn callback(&mut self, call: impl FnOnce(&mut Box<dyn SessionHandler>, &mut Session<'_>)) {
        // As in the runtime, datagram sessions have handler timers and drain requests too.
        let (extras, drain_wanted) = (&mut self.extras, &mut self.drain_wanted);
        let mut handle = Session {
            info: &self.info,
            outbound: &mut self.outbound,
            closing: &mut self.closing,
            broadcasts: &mut self.pending_broadcasts,
            outbound_limit: self.limits.outbound_limit,
            work: &mut self.work,
            work_limit: self.limits.work_limit,
            extras,
            drain_wanted,
            high_watermark: self.limits.high_watermark,
            unsent: 0,
            metrics: None,
            now: self.now,
            locals: &mut self.locals,
            alpn: self.alpn.as_deref(),
            tls_state: None,
            tls: self.alpn.is_some(),
            direct: None,
        };
        let handler = &mut self.handler;
        if catch_unwind(AssertUnwindSafe(|| call(handler, &mut handle))).is_err() {
            error!(session = %self.info.id, peer = %self.info.peer, "service handler panicked; closing this session only");
            self.closing = Some(CloseReason::Panic);
        }
        self.after_callback();
    }

    /// What the loop applies once a callback returns: the timer request, the TLS request,
    /// the broadcasts; for a datagram session, the sends and the close.
    fn after_callback(&mut self) {
        self.broadcasts
            .extend(self.pending_broadcasts.drain(..).map(|b| b.data));
        if self.datagram {
            if !self.work.is_idle() {
                error!(session = %self.info.id, "spawn_blocking is not available on udp/dtls sessions in this version; closing");
                self.closing = Some(CloseReason::WorkOverflow);
            }
            let before = self.datagrams.len();
            while let Some(datagram) = self.outbound.pop_datagram() {
                self.datagrams.push(datagram);
            }
            if self.datagrams.len() > before {
                self.touch();
            }
            if let Some(reason) = self.closing.clone() {
                self.close(reason);
                return;
            }
            // The datagrams are the socket's at once: a drain request is due now (delivered
            // by the next step, as the loop does on its next turn).
            if std::mem::take(&mut self.drain_wanted) {
                self.drain_due = true;
            }
        }
        let Some(extras) = self.extras.as_deref_mut() else {
            return;
        };
        let request = std::mem::take(&mut extras.timer_request);
        if request != TimerRequest::Keep {
            if let Some(timer) = extras.handler_timer.take() {
                self.timers.cancel(timer);
            }
            self.handler_deadline = None;
            if let TimerRequest::Set(after) = request {
                let deadline = deadline_after(self.now, after);
                extras.handler_timer = Some(self.timers.insert(deadline, TimerKind::Handler));
                self.handler_deadline = Some(deadline);
            }
        }
        if let Some(upgrade) = extras.tls_upgrade.take() {
            if self.closing.is_none() {
                self.tls_request = Some(upgrade.received);
            }
        }
    }

    /// Runs the loop's consequences of the current state until nothing more happens: a
    /// close that is due, an `on_drain` that is due, bytes that may be read.
    fn settle(&mut self) {
        let mut drains = 0usize;
        if self.datagram {
            while self.closed.is_none() && self.drain_due && drains < MAX_DRAINS_PER_STEP {
                self.drain_due = false;
                drains = drains.saturating_add(1);
                self.callback(|handler, session| handler.on_drain(session));
            }
            return;
        }
        while self.closed.is_none() && !self.datagram {
            if let Some(reason) = self.closing.as_ref().filter(|reason| !reason.flushes()) {
                let reason = reason.clone();
                self.close(reason);
                return;
            }
            let queued = self.outbound.len();
            if self.read_paused && queued <= self.limits.low_watermark {
                self.read_paused = false;
            }
            if self.drain_wanted && self.closing.is_none() && queued <= self.limits.low_watermark {
                self.drain_wanted = false;
                self.drain_due = true;
            }
            if self.drain_due && drains < MAX_DRAINS_PER_STEP {
                self.drain_due = false;
                drains = drains.saturating_add(1);
                self.callback(|handler, session| handler.on_drain(session));
                continue;
            }
            if self.read_once() {
                continue;
            }
            if !self.outbound.is_empty() || (!self.work.is_idle() && self.closing.is_none()) {
                return;
            }
            let finished = self
                .closing
                .clone()
                .or_else(|| (self.peer_eof && !self.drain_due).then_some(CloseReason::PeerClosed));
            if let Some(reason) = finished {
                self.close(reason);
            }
            return;
        }
    }

    /// One read of what the peer sent, as the loop's `serve` does it; false if nothing was
    /// read (nothing there, paused, closing, or the peer's end already read).
    fn read_once(&mut self) -> bool {
        if self.read_paused || self.peer_eof || self.closing.is_some() {
            return false;
        }
        if self.unread.is_empty() {
            if self.fin_pending {
                self.peer_eof = true;
            }
            return false;
        }
        if self.outbound.len() > self.limits.high_watermark {
            self.read_paused = true;
            return false;
        }
        let n = self.unread.len().min(READ_CHUNK);
        let chunk: Vec<u8> = self.unread.drain(..n).collect();
        self.touch();
        self.callback(|handler, session| handler.on_data(session, &chunk));
        true
    }

    /// A timer came due at `self.now`.
    fn fire(&mut self, kind: TimerKind) {
        match kind {
            TimerKind::Handler => {
                if let Some(extras) = self.extras.as_deref_mut() {
                    extras.handler_timer = None;
                }
                self.handler_deadline = None;
                if self.closing.is_none() {
                    self.callback(|handler, session| handler.on_timer(session));
                    self.settle();
                }
            }
            TimerKind::Idle => {
                self.idle_timer = None;
                if !self.work.is_idle() {
                    // A job is running for this session: it is busy, not idle.
                    self.last_activity = self.now;
                }
                let due = deadline_after(self.last_activity, self.limits.idle_timeout);
                if self.now < due {
                    self.idle_timer = Some(self.timers.insert(due, TimerKind::Idle));
                } else {
                    self.close(CloseReason::IdleTimeout);
                }
            }
        }
    }

    /// A byte moved: the idle deadline starts again.
    fn touch(&mut self) {
        self.last_activity = self.now;
    }

    /// Ends the session: timers cancelled, queued bytes dropped, `on_close` called.
    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        if let Some(timer) = self.idle_timer.take() {
            self.timers.cancel(timer);
        }
        if let Some(timer) = self
            .extras
            .as_deref_mut()
            .and_then(|extras| extras.handler_timer.take())
        {
            self.timers.cancel(timer);
        }
        self.handler_deadline = None;
        self.outbound.clear();
        self.closing = Some(reason.clone());
        self.handler.on_close(&self.info, &reason);
        self.closed = Some(reason);
    }
}
