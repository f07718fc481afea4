//! Sessions and the session table: the state an event loop keeps per connection.
//!
//! Each event loop owns one [`SessionTable`]: a slab of [`TcpSession`]s (the slab key is the
//! mio token) plus, per listener, the set of local members that broadcasts reach. Together with
//! the loops' command channels (see `event_loop`), this is plexus' session manager: ids are
//! process-unique, membership is per listener, counts feed the metrics, and a broadcast reaches
//! the members on every loop without any loop touching another's sessions.

use std::time::{Duration, Instant};

use plexus_proto::TimerKey;
use slab::Slab;

use std::sync::Arc;

use std::panic::{catch_unwind, AssertUnwindSafe};

use tracing::error;

use crate::admission::{HandshakeSlot, Ticket};
use crate::connection::stream::SessionStream;
use crate::connection::tls::TlsTransport;
use crate::connector::UPSTREAM_LISTENER;
use crate::loop_local::LoopLocals;
use crate::metrics::{LoopStats, Metrics};
use crate::outbound::OutboundQueue;
use crate::service::{Broadcast, DirectWrite, Session, SessionExtras};
use crate::service::{CloseReason, Service, SessionHandler, SessionId, SessionInfo};
use crate::worker::WorkQueue;

/// The limits a loop applies to each session.
#[derive(Debug, Clone)]
pub(crate) struct SessionLimits {
    pub(crate) idle_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) high_watermark: usize,
    pub(crate) low_watermark: usize,
    pub(crate) outbound_limit: usize,
    /// Blocking jobs one session may have queued (`worker_session_limit`).
    pub(crate) work_limit: usize,
}

/// One TCP connection owned by an event loop.
pub(crate) struct TcpSession {
    pub(crate) stream: SessionStream,
    pub(crate) info: SessionInfo,
    pub(crate) handler: Box<dyn SessionHandler>,
    pub(crate) outbound: OutboundQueue,
    /// Set when the session must end: flushing reasons wait for the queue to drain.
    pub(crate) closing: Option<CloseReason>,
    pub(crate) idle_timer: TimerKey,
    pub(crate) last_activity: Instant,
    /// An edge reported readability and the socket has not yet returned `WouldBlock`.
    pub(crate) readable: bool,
    /// The last write returned `WouldBlock`; wait for a writable event.
    pub(crate) write_blocked: bool,
    /// Not read because the outbound queue passed the high watermark.
    pub(crate) read_paused: bool,
    /// The peer sent FIN: flush what is queued, then close.
    pub(crate) peer_eof: bool,
    /// epoll reported read-closed or an error: keep reading until the socket returns it.
    pub(crate) read_closed: bool,
    /// Already on the loop's flush list this turn.
    pub(crate) flush_listed: bool,
    /// The TLS layer of a session on a tls listener (boxed: plain sessions stay small).
    pub(crate) tls: Option<Box<TlsState>>,
    /// Blocking jobs of this session, run on the worker pool one at a time.
    pub(crate) work: WorkQueue,
    /// Handler timer, TLS upgrade, PROXY wait: allocated by the sessions that use them.
    pub(crate) extras: Option<Box<SessionExtras>>,
    /// The handler wants `on_drain` once the outbound queue is down to the low watermark.
    pub(crate) drain_wanted: bool,
    /// The queue drained as asked: `on_drain` is called on the next `serve`.
    pub(crate) drain_due: bool,
    /// Not read because broadcasts it sent wait for room on another loop.
    pub(crate) broadcast_wait: bool,
    /// Not read because what it sent put a linked session's queue past the high watermark.
    pub(crate) link_wait: bool,
    member_slot: usize,
    /// Holds the session's place in the admission counts until dropped (`None` for upstream
    /// sessions, which were not admitted).
    ticket: Option<Ticket>,
}

impl TcpSession {
    pub(crate) fn new(
        stream: SessionStream,
        info: SessionInfo,
        ticket: Option<Ticket>,
        idle_timer: TimerKey,
        now: Instant,
    ) -> Self {
        TcpSession {
            stream,
            info,
            handler: Box::new(Opening),
            outbound: OutboundQueue::default(),
            closing: None,
            idle_timer,
            last_activity: now,
            readable: false,
            write_blocked: false,
            read_paused: false,
            peer_eof: false,
            read_closed: false,
            flush_listed: false,
            tls: None,
            work: WorkQueue::default(),
            extras: None,
            drain_wanted: false,
            drain_due: false,
            broadcast_wait: false,
            link_wait: false,
            member_slot: usize::MAX,
            ticket,
        }
    }
}

impl TcpSession {
    /// Bytes on their way to the peer that the watermarks count: the outbound queue and what
    /// the socket took but has not written (an io_uring session's send).
    pub(crate) fn queued(&self) -> usize {
        self.outbound.len().saturating_add(self.stream.unsent())
    }

    /// The session's admission ticket (`None` for an upstream session).
    pub(crate) fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// A `proxy_protocol` session whose PROXY header is not complete yet.
    pub(crate) fn proxy_pending(&self) -> bool {
        self.extras
            .as_ref()
            .is_some_and(|extras| extras.proxy.is_some())
    }

    pub(crate) fn ticket_mut(&mut self) -> Option<&mut Ticket> {
        self.ticket.as_mut()
    }
}

/// What a handler callback needs besides its session: the loop's shared parts.
pub(crate) struct CallbackContext<'a> {
    pub(crate) now: Instant,
    pub(crate) locals: &'a mut LoopLocals,
    pub(crate) broadcasts: &'a mut Vec<Broadcast>,
    pub(crate) limits: &'a SessionLimits,
    pub(crate) stats: &'a LoopStats,
    pub(crate) metrics: Option<&'a Metrics>,
}

impl TcpSession {
    /// Calls into the service with this session's [`Session`] handle. A panic in the service
    /// closes this session only (logged with its id, counted); the loop and every other
    /// session go on.
    pub(crate) fn callback(
        &mut self,
        context: &mut CallbackContext<'_>,
        call: impl FnOnce(&mut Box<dyn SessionHandler>, &mut Session<'_>),
    ) {
        let TcpSession {
            stream,
            info,
            handler,
            outbound,
            closing,
            work,
            extras,
            drain_wanted,
            tls,
            write_blocked,
            last_activity,
            ..
        } = self;
        let unsent = stream.unsent();
        // Write-through needs the socket itself: plain TCP on epoll (an io_uring session's
        // bytes go through its ring, in order, from the queue).
        let direct = match (tls.is_none(), stream.mio()) {
            (true, Some(stream)) => Some(DirectWrite {
                stream,
                write_blocked,
                last_activity,
                stats: context.stats,
            }),
            _ => None,
        };
        let tls_state = tls
            .as_deref()
            .map(|tls| -> &rustls::CommonState { tls.transport.connection() });
        let alpn = tls_state.and_then(rustls::CommonState::alpn_protocol);
        let mut handle = Session {
            info,
            outbound,
            closing: &mut *closing,
            broadcasts: &mut *context.broadcasts,
            outbound_limit: context.limits.outbound_limit,
            work,
            work_limit: context.limits.work_limit,
            extras,
            drain_wanted,
            high_watermark: context.limits.high_watermark,
            unsent,
            metrics: context.metrics,
            now: context.now,
            locals: &mut *context.locals,
            alpn,
            tls_state,
            tls: tls.is_some(),
            direct,
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| call(handler, &mut handle)));
        if outcome.is_err() {
            error!(
                session = %info.id, peer = %info.peer, listener = info.listener(),
                "service handler panicked; closing this session only"
            );
            LoopStats::add(&context.stats.handler_panics, 1);
            *closing = Some(CloseReason::Panic);
        }
    }
}

impl TcpSession {
    /// Tells the handler the session ended. A panic in its `on_close` is caught like one in
    /// any other callback (logged with the session's id, counted): the session is gone
    /// already, and the loop and every other session go on.
    pub(crate) fn handler_closed(&mut self, reason: &CloseReason, stats: &LoopStats) {
        let TcpSession { info, handler, .. } = self;
        let outcome = catch_unwind(AssertUnwindSafe(|| handler.on_close(info, reason)));
        if outcome.is_err() {
            error!(
                session = %info.id, peer = %info.peer, listener = info.listener(),
                "service handler panicked in on_close; the session was closed already"
            );
            LoopStats::add(&stats.handler_panics, 1);
        }
    }
}

/// A TLS session's protocol state.
pub(crate) struct TlsState {
    /// The transport stage (rustls).
    pub(crate) transport: TlsTransport,
    /// Held until the handshake completes: counts against `max_handshakes`.
    pub(crate) handshake: Option<HandshakeSlot>,
    pub(crate) handshake_timer: Option<TimerKey>,
    /// Opened once the handshake completes, so services only ever see established sessions.
    pub(crate) pending_service: Option<Arc<dyn Service>>,
}

impl TlsState {
    pub(crate) fn new(
        transport: TlsTransport,
        handshake: HandshakeSlot,
        handshake_timer: TimerKey,
        service: Arc<dyn Service>,
    ) -> Self {
        TlsState {
            transport,
            handshake: Some(handshake),
            handshake_timer: Some(handshake_timer),
            pending_service: Some(service),
        }
    }

    /// A connector's client session: no handshake slot (it was not admitted), no service to
    /// open (its handler is there already).
    pub(crate) fn client(transport: TlsTransport, handshake_timer: TimerKey) -> Self {
        TlsState {
            transport,
            handshake: None,
            handshake_timer: Some(handshake_timer),
            pending_service: None,
        }
    }

    /// Whether the handshake is still running (the service has not been opened).
    pub(crate) fn handshaking(&self) -> bool {
        !self.transport.is_established()
    }
}

/// The handler a session has while its service's `open` runs (it receives no events).
struct Opening;

impl SessionHandler for Opening {
    fn on_data(&mut self, _: &mut crate::service::Session<'_>, _: &[u8]) {}
}

/// One loop's sessions and their per-listener membership.
pub(crate) struct SessionTable {
    sessions: Slab<TcpSession>,
    members: Vec<Slab<usize>>,
}

impl SessionTable {
    pub(crate) fn new(listeners: usize) -> Self {
        SessionTable {
            sessions: Slab::new(),
            members: (0..listeners).map(|_| Slab::new()).collect(),
        }
    }

    /// The key the next inserted session will get (its mio token).
    pub(crate) fn vacant_key(&self) -> usize {
        self.sessions.vacant_key()
    }

    pub(crate) fn insert(&mut self, mut session: TcpSession) -> usize {
        let key = self.sessions.vacant_key();
        let listener = session.info.listener.index;
        if listener == UPSTREAM_LISTENER {
            // Upstream sessions belong to no listener.
            return self.sessions.insert(session);
        }
        // Listeners added by a reload get indexes past the initial count.
        if listener >= self.members.len() {
            self.members
                .resize_with(listener.saturating_add(1), Slab::new);
        }
        if let Some(members) = self.members.get_mut(listener) {
            session.member_slot = members.insert(key);
        }
        self.sessions.insert(session)
    }

    pub(crate) fn remove(&mut self, key: usize) -> Option<TcpSession> {
        let session = self.sessions.try_remove(key)?;
        if let Some(members) = self.members.get_mut(session.info.listener.index) {
            members.try_remove(session.member_slot);
        }
        Some(session)
    }

    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut TcpSession> {
        self.sessions.get_mut(key)
    }

    /// The session at `key` if it is still the one with `id` (keys are reused).
    pub(crate) fn get_if(&mut self, key: usize, id: SessionId) -> Option<&mut TcpSession> {
        self.sessions
            .get_mut(key)
            .filter(|session| session.info.id == id)
    }

    /// Two distinct sessions at once (a linked pair).
    pub(crate) fn pair_mut(
        &mut self,
        first: usize,
        second: usize,
    ) -> Option<(&mut TcpSession, &mut TcpSession)> {
        if first == second {
            return None;
        }
        self.sessions.get2_mut(first, second)
    }

    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub(crate) fn keys(&self) -> Vec<usize> {
        self.sessions.iter().map(|(key, _)| key).collect()
    }

    /// Calls `visit` for each of this loop's sessions on `listener`.
    pub(crate) fn for_each_member(
        &mut self,
        listener: usize,
        mut visit: impl FnMut(usize, &mut TcpSession),
    ) {
        let SessionTable { sessions, members } = self;
        let Some(members) = members.get(listener) else {
            return;
        };
        for (_, &key) in members.iter() {
            if let Some(session) = sessions.get_mut(key) {
                visit(key, session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TcpSession;

    /// An idle TCP session costs its slab entry plus the kernel's socket; DESIGN's budget is
    /// 512 B of RSS per idle session, so the entry must stay well below it. Rarely used state
    /// belongs in `SessionExtras` (boxed on first use), not here.
    #[test]
    fn a_session_entry_stays_within_the_idle_memory_budget() {
        let size = std::mem::size_of::<TcpSession>();
        assert!(size <= 376, "TcpSession grew to {size} bytes");
    }
}
