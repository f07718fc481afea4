//! The loop's side of connectors (see `crate::connector`): opening upstream sessions (a
//! non-blocking connect per address, bounded by the connect timeout on the wheel), handing
//! bytes between linked sessions with backpressure both ways, passing half-closes on, and
//! telling each side when the other connected or ended.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use plexus_proto::{deadline_after, TimerWheel};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, info, warn};

use super::{client_token, upstream_token, EventLoop};
use crate::connection::stream::SessionStream;
use crate::connection::tls::TlsTransport;
use crate::connector::{Connecting, Racer, Upstream, UpstreamEvent};
use crate::loop_timer::{TimerEntry, TimerKind};
use crate::metrics::LoopStats;
use crate::service::{
    CloseReason, ConnectRequest, LinkEvent, LinkOp, Links, SessionExtras, SessionId, SessionInfo,
};
use crate::session::{CallbackContext, TcpSession, TlsState};

/// The links in a session's extras, if any.
pub(super) fn links_of(extras: &mut Option<Box<SessionExtras>>) -> Option<&mut Links> {
    extras.as_deref_mut()?.links.as_deref_mut()
}

/// A closure another thread runs on a client connection ([`super::Command::Deliver`]).
pub(crate) type Delivery = Box<dyn FnOnce(&mut crate::Session<'_>) + Send>;

/// What an upstream session knows of itself before it connects: `addr` is the address tried.
fn upstream_info(id: SessionId, upstream: &Upstream, addr: Option<&SocketAddr>) -> SessionInfo {
    SessionInfo {
        id,
        peer: addr
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        local: SocketAddr::from(([0, 0, 0, 0], 0)),
        listener: Arc::clone(upstream.info()),
    }
}

/// Starts a non-blocking connect to `addr` (from `source`, if given), registered under
/// `token`.
fn open_stream(
    addr: SocketAddr,
    source: Option<IpAddr>,
    registry: &Registry,
    token: Token,
) -> io::Result<TcpStream> {
    let mut stream = match source {
        None => TcpStream::connect(addr)?,
        Some(ip) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
            match socket.connect(&SockAddr::from(addr)) {
                Ok(()) => {}
                Err(err) if plexus_sys::is_connect_in_progress(&err) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
            TcpStream::from_std(socket.into())
        }
    };
    stream.set_nodelay(true)?;
    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
}

/// A connect attempt (the session's socket) just started: its timeout, and when the next
/// address races it (only if one is left and the upstream races).
fn begin_attempt(connecting: &mut Connecting, now: Instant) {
    let upstream = &connecting.upstream;
    connecting.deadline = Some(deadline_after(now, upstream.connect_timeout()));
    connecting.race_at = upstream
        .race_delay()
        .filter(|_| connecting.has_next())
        .map(|delay| deadline_after(now, delay));
}

/// (Re)arms an upstream session's connect timer for the next thing due
/// ([`Connecting::next_wake`]).
fn arm_connect_timer(
    timers: &mut TimerWheel<TimerEntry>,
    connecting: &mut Connecting,
    key: usize,
    id: SessionId,
) {
    if let Some(timer) = connecting.timer.take() {
        timers.cancel(timer);
    }
    if let Some(wake) = connecting.next_wake() {
        let entry = TimerEntry {
            key,
            id,
            kind: TimerKind::Connect,
        };
        connecting.timer = Some(timers.insert(wake, entry));
    }
}

/// A random number for the jitter of a connection's `round`-th retry (std's per-process random
/// hash keys, over the session id and the round: no generator to keep).
fn retry_jitter(id: SessionId, round: u32) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    id.hash(&mut hasher);
    round.hash(&mut hasher);
    hasher.finish()
}

/// After a writable (or error) edge on a connecting socket: did the connect succeed?
fn check_connected(stream: &TcpStream) -> io::Result<bool> {
    if let Some(err) = stream.take_error()? {
        return Err(err);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(err) => Err(err),
    }
}

impl EventLoop {
    /// `splice_with` between `key` and `target_key` with one or both on the ring: each plain
    /// TCP one starts moving to epoll ([`UringStream::leave`]); the last to arrive starts the
    /// splice ([`EventLoop::splice_when_on_epoll`]). TLS or PROXY-pending sessions stay
    /// (`start_splice` refuses them anyway) and the pair copies.
    ///
    /// [`UringStream::leave`]: crate::connection::stream::UringStream
    fn leave_ring_to_splice(
        &mut self,
        key: usize,
        id: SessionId,
        target_key: usize,
        target_id: SessionId,
    ) {
        let plain = |session: &TcpSession| session.tls.is_none() && !session.proxy_pending();
        let both_plain = self.sessions.get_mut(key).is_some_and(|s| plain(s))
            && self.sessions.get_mut(target_key).is_some_and(|s| plain(s));
        if !both_plain {
            debug!(session = %id, "splice_with: not two plain TCP sessions; copying");
            return;
        }
        for (this, peer) in [(key, (target_key, target_id)), (target_key, (key, id))] {
            let left = self
                .sessions
                .get_mut(this)
                .and_then(|session| session.stream.uring())
                .map(|stream| stream.leave(peer));
            if let Some(Err(err)) = left {
                if let Some(also) = self.pipe_failures.allow(Instant::now()) {
                    warn!(
                        session = %id, peer = %target_id,
                        "cannot make a descriptor to move the session to epoll to splice with \
                         ({err}); copying (+{also} more in the last second)"
                    );
                }
            }
            self.list_for_flush(this);
        }
    }

    /// Session `key` arrived on epoll wanting to splice with `peer_key`: starts the splice if
    /// the peer (still session `peer_id`) is on epoll too (else the peer's arrival does).
    pub(super) fn splice_when_on_epoll(&mut self, key: usize, peer_key: usize, peer_id: SessionId) {
        let peer_here = self
            .sessions
            .get_mut(peer_key)
            .is_some_and(|peer| peer.info.id == peer_id);
        if peer_here && self.on_epoll(key) && self.on_epoll(peer_key) {
            self.start_splice(key, peer_key);
        }
    }

    /// Whether session `key` is served by epoll (not by the io_uring ring).
    fn on_epoll(&mut self, key: usize) -> bool {
        self.sessions
            .get_mut(key)
            .is_some_and(|session| session.stream.mio().is_some())
    }

    /// Calls `call` on session `key`'s handler (if it is still session `id`), then applies
    /// what the handler asked.
    fn link_callback(
        &mut self,
        key: usize,
        id: SessionId,
        now: Instant,
        call: impl FnOnce(&mut Box<dyn crate::SessionHandler>, &mut crate::Session<'_>),
    ) {
        let Some(session) = self.sessions.get_if(key, id) else {
            return;
        };
        let mut context = CallbackContext {
            now,
            locals: &mut self.locals,
            broadcasts: &mut self.broadcasts,
            limits: &self.limits,
            stats: &self.stats,
            metrics: self.metrics.as_deref(),
        };
        session.callback(&mut context, call);
        self.after_callback(key, now);
    }

    /// Applies what session `key`'s last callback asked of its links: connects, sends,
    /// half-closes, closes. A sender whose bytes put a linked queue past the high watermark
    /// is not read until that queue drains to the low watermark.
    pub(super) fn apply_link_ops(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let from = session.info.id;
        let Some(links) = links_of(&mut session.extras) else {
            return;
        };
        if links.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut links.ops);
        links.pending = 0;
        let high = self.limits.high_watermark;
        let limit = self.limits.outbound_limit;
        let mut pause = false;
        for op in ops {
            let to = match &op {
                LinkOp::Connect(_) => None,
                LinkOp::Send(to, _)
                | LinkOp::Finish(to)
                | LinkOp::Close(to)
                | LinkOp::Splice(to) => Some(*to),
            };
            let Some(to) = to else {
                if let LinkOp::Connect(request) = op {
                    self.start_connect(Some(key), *request, now);
                }
                continue;
            };
            let target_key = self.sessions.get_mut(key).and_then(|session| {
                let links = links_of(&mut session.extras)?;
                links
                    .peers
                    .iter()
                    .find(|(_, id)| *id == to)
                    .map(|(key, _)| *key)
            });
            let Some(target_key) = target_key else {
                debug!(session = %from, to = %to, "dropped a request for a session that is not linked (or ended)");
                continue;
            };
            // Splicing reads the sockets itself: io_uring sessions (whose bytes the ring
            // receives) move to epoll first, and the pair copies until they did.
            let may_splice = self.on_epoll(key) && self.on_epoll(target_key);
            let Some(target) = self.sessions.get_if(target_key, to) else {
                continue;
            };
            match op {
                LinkOp::Send(_, data) => {
                    if target.closing.is_some() {
                        continue;
                    }
                    if !target.outbound.fits(data.len(), limit) {
                        target.closing = Some(CloseReason::OutboundOverflow);
                    } else {
                        target.outbound.push_shared(data.freeze());
                        if target.queued() > high {
                            if let Some(links) = links_of(&mut target.extras) {
                                if !links.waiters.contains(&(key, from)) {
                                    links.waiters.push((key, from));
                                }
                                pause = true;
                            }
                        }
                    }
                }
                LinkOp::Finish(_) => {
                    if let Some(links) = links_of(&mut target.extras) {
                        links.finish = true;
                    }
                }
                LinkOp::Close(_) => {
                    target.closing.get_or_insert(CloseReason::Requested);
                }
                LinkOp::Splice(_) if may_splice => self.start_splice(key, target_key),
                LinkOp::Splice(_) => {
                    debug!(session = %from, "splice_with: io_uring sessions move to epoll first");
                    self.leave_ring_to_splice(key, from, target_key, to);
                }
                LinkOp::Connect(_) => {}
            }
            self.list_for_flush(target_key);
        }
        if pause {
            if let Some(session) = self.sessions.get_mut(key) {
                if !session.link_wait {
                    session.link_wait = true;
                    LoopStats::add(&self.stats.read_pauses, 1);
                }
            }
        }
    }

    /// Opens the upstream session `request` asks for, linked with session `opener` (`None`:
    /// a client runtime's connection, linked with nothing, that hears of its own connect):
    /// the first address whose connect starts (the others follow on failure or timeout). If
    /// none does, the opener hears at once that it ended (without an opener, the handler's
    /// `on_close` does).
    pub(super) fn start_connect(
        &mut self,
        opener: Option<usize>,
        request: ConnectRequest,
        now: Instant,
    ) {
        let ConnectRequest {
            id,
            upstream,
            handler,
        } = request;
        let opener = match opener {
            Some(key) => match self.sessions.get_mut(key) {
                Some(session) => Some((key, session.info.id)),
                None => return,
            },
            None => None,
        };
        let key = self.sessions.vacant_key();
        let mut connecting = Connecting::new(upstream.clone());
        let mut failure = io::ErrorKind::AddrNotAvailable;
        let (stream, addr) = loop {
            let Some(addr) = connecting.addr() else {
                upstream.count(UpstreamEvent::Unreachable);
                let reason = CloseReason::UpstreamFailed(failure);
                info!(session = %id, upstream = upstream.name(), "upstream unreachable: {reason}");
                let info = upstream_info(id, &upstream, upstream.addrs().first());
                self.never_opened(opener, handler, &info, reason, now);
                return;
            };
            upstream.count(UpstreamEvent::Attempt);
            match open_stream(
                addr,
                upstream.source(),
                self.poll.registry(),
                upstream_token(key),
            ) {
                Ok(stream) => break (stream, addr),
                Err(err) if plexus_sys::is_descriptor_exhaustion(&err) => {
                    // A local shortage: every other address would fail the same way, and the
                    // upstream is not to blame (a health check must not mark it down).
                    let reason = CloseReason::DescriptorsExhausted;
                    if let Some(also) = self.descriptor_shortages.allow(now) {
                        warn!(
                            session = %id, upstream = upstream.name(), %addr,
                            "cannot open an upstream socket: {err} (+{also} more in the last second)"
                        );
                    }
                    let info = upstream_info(id, &upstream, Some(&addr));
                    self.never_opened(opener, handler, &info, reason, now);
                    return;
                }
                Err(err) => {
                    upstream.count(UpstreamEvent::Refused);
                    debug!(session = %id, upstream = upstream.name(), %addr, "connect failed: {err}");
                    failure = err.kind();
                    connecting.advance();
                }
            }
        };
        begin_attempt(&mut connecting, now);
        arm_connect_timer(&mut self.timers, &mut connecting, key, id);
        let idle_timer = self.timers.insert(
            deadline_after(now, self.idle_limit),
            TimerEntry {
                key,
                id,
                kind: TimerKind::Idle,
            },
        );
        let info = upstream_info(id, &upstream, Some(&addr));
        let mut session = TcpSession::new(stream.into(), info, None, idle_timer, now);
        session.handler = handler;
        // Nothing is written before the connect completes (its writable edge clears this).
        session.write_blocked = true;
        session.extras.get_or_insert_with(Box::default).links = Some(Box::new(Links {
            peers: opener.into_iter().collect(),
            connecting: Some(Box::new(connecting)),
            upstream: Some(upstream.clone()),
            client: opener.is_none(),
            ..Links::default()
        }));
        self.stats.opened(&session.info.listener);
        upstream.count(UpstreamEvent::Opened);
        let inserted = self.sessions.insert(session);
        debug_assert_eq!(inserted, key);
        match opener {
            Some((opener, _)) => {
                if let Some(links) = self
                    .sessions
                    .get_mut(opener)
                    .and_then(|s| links_of(&mut s.extras))
                {
                    links.peers.push((key, id));
                }
            }
            None => {
                self.clients.insert(id, key);
            }
        }
        debug!(session = %id, opener = ?opener.map(|(_, id)| id), upstream = upstream.name(), %addr, "upstream connecting");
    }

    /// An upstream session that could not even start connecting: its opener hears that it
    /// ended, or — a client runtime's connection, without opener — its own handler's
    /// `on_close` does.
    fn never_opened(
        &mut self,
        opener: Option<(usize, SessionId)>,
        mut handler: Box<dyn crate::SessionHandler>,
        info: &SessionInfo,
        reason: CloseReason,
        now: Instant,
    ) {
        let id = info.id;
        match opener {
            Some((opener, opener_id)) => {
                self.link_callback(opener, opener_id, now, |handler, session| {
                    handler.on_link(session, LinkEvent::Closed { peer: id, reason })
                });
            }
            None => handler.on_close(info, &reason),
        }
    }

    /// Runs `call` on the client connection `id` (a [`Command::Deliver`]); dropped if it ended.
    ///
    /// [`Command::Deliver`]: super::Command::Deliver
    pub(super) fn deliver(&mut self, id: SessionId, call: Delivery, now: Instant) {
        let Some(&key) = self.clients.get(&id) else {
            return;
        };
        self.link_callback(key, id, now, |_, session| call(session));
    }

    /// Readiness of an upstream session's socket while its connect runs.
    pub(super) fn connect_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if !(event.is_writable() || event.is_error() || event.is_read_closed()) {
            return;
        }
        let Some(connecting) =
            links_of(&mut session.extras).and_then(|l| l.connecting.as_deref_mut())
        else {
            return;
        };
        // Earlier attempts still racing share the token: the first one connected wins.
        let mut winner = None;
        let upstream = &connecting.upstream;
        connecting.racing.retain(|racer| match check_connected(&racer.stream) {
            Ok(false) => true,
            Ok(true) => {
                winner = winner.or(Some(racer.addr));
                true
            }
            Err(err) => {
                upstream.count(UpstreamEvent::Refused);
                debug!(session = %session.info.id, addr = %racer.addr, "racing connect attempt failed: {err}");
                false
            }
        });
        if let Some(addr) = winner {
            if let Some(at) = connecting.racing.iter().position(|r| r.addr == addr) {
                let racer = connecting.racing.swap_remove(at);
                // The attempt that lost closes (and leaves the poll) as it is dropped.
                session.stream = racer.stream.into();
                session.info.peer = racer.addr;
            }
            self.connected(key, now);
            return;
        }
        let Some(stream) = session.stream.mio() else {
            return;
        };
        match check_connected(stream) {
            Ok(false) => {}
            Ok(true) => self.connected(key, now),
            Err(err) => self.attempt_failed(key, Some(err.kind()), now),
        }
    }

    /// An upstream session's connect timer fired: the end of a retry backoff, the time to race
    /// the next address, or the timeout of the current attempt or of a racing one.
    pub(super) fn connect_timed_out(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let id = session.info.id;
        let Some(connecting) =
            links_of(&mut session.extras).and_then(|l| l.connecting.as_deref_mut())
        else {
            return;
        };
        connecting.timer = None;
        if connecting.waiting {
            // The backoff after a failed round is over: the addresses again, from the first.
            let first = connecting.restart();
            self.open_next(key, id, first, CloseReason::UpstreamTimeout, false, now);
            return;
        }
        let upstream = connecting.upstream.clone();
        connecting.racing.retain(|racer| {
            let alive = racer.deadline > now;
            if !alive {
                upstream.count(UpstreamEvent::TimedOut);
            }
            alive
        });
        if connecting.deadline.is_some_and(|deadline| deadline <= now) {
            self.attempt_failed(key, None, now);
            return;
        }
        if connecting.race_at.is_some_and(|at| at <= now) {
            // The current attempt goes on, and the next address starts next to it.
            connecting.race_at = None;
            let next = connecting.advance();
            debug!(session = %id, upstream = upstream.name(), addr = ?next, "racing the next address");
            self.open_next(key, id, next, CloseReason::UpstreamTimeout, true, now);
            return;
        }
        arm_connect_timer(&mut self.timers, connecting, key, id);
    }

    /// The connect succeeded: the session becomes an ordinary one (its socket under its
    /// session token), and the opener hears of it.
    fn connected(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(links) = links_of(&mut session.extras) else {
            return;
        };
        let Some(connecting) = links.connecting.take() else {
            return;
        };
        if let Some(timer) = connecting.timer {
            self.timers.cancel(timer);
        }
        connecting.upstream.count(UpstreamEvent::Connected);
        let opener = links.peers.first().copied();
        let client = links.client;
        let id = session.info.id;
        let addr = session.info.peer;
        if let Ok(local) = session.stream.local_addr() {
            session.info.local = local;
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registered = match session.stream.mio() {
            Some(stream) => self
                .poll
                .registry()
                .reregister(stream, client_token(key), interest),
            None => Err(io::ErrorKind::Unsupported.into()),
        };
        if let Err(err) = registered {
            self.close(key, CloseReason::Io(err.kind()));
            return;
        }
        session.readable = true;
        session.write_blocked = false;
        session.last_activity = now;
        if let Some(tls) = connecting.upstream.tls() {
            match TlsTransport::client(Arc::clone(&tls.config), tls.name.clone()) {
                Ok(transport) => {
                    let timer = self.timers.insert(
                        deadline_after(now, self.limits.handshake_timeout),
                        TimerEntry {
                            key,
                            id,
                            kind: TimerKind::Handshake,
                        },
                    );
                    session.tls = Some(Box::new(TlsState::client(transport, timer)));
                    LoopStats::add(&self.stats.tls_sessions_open, 1);
                }
                Err(err) => {
                    self.close(key, CloseReason::Tls(Arc::new(err)));
                    return;
                }
            }
        }
        debug!(session = %id, upstream = connecting.upstream.name(), %addr, "upstream connected");
        if session.tls.is_some() {
            // The opener hears of it once the handshake is done (`announce_connected`): a
            // TLS upstream is not usable before, and may still refuse its certificate.
            if let Some(links) = links_of(&mut session.extras) {
                links.announce = Some(addr);
            }
        } else if let Some((told, told_id)) = opener.or(client.then_some((key, id))) {
            self.link_callback(told, told_id, now, |handler, session| {
                handler.on_link(session, LinkEvent::Connected { upstream: id, addr })
            });
        }
        // Write what waited for the connect (the ClientHello first, for TLS), and read what
        // the upstream may have sent.
        self.ready.push(key);
    }

    /// A TLS upstream session whose handshake just completed: its opener hears that it is
    /// connected (`LinkEvent::Connected`), once.
    pub(super) fn announce_connected(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.tls.as_deref().is_none_or(|tls| tls.handshaking()) {
            return;
        }
        let id = session.info.id;
        let Some(links) = links_of(&mut session.extras) else {
            return;
        };
        let Some(addr) = links.announce.take() else {
            return;
        };
        debug!(session = %id, %addr, "upstream tls handshake complete");
        let told = match links.client {
            true => Some((key, id)),
            false => links.peers.first().copied(),
        };
        if let Some((opener_key, opener_id)) = told {
            self.link_callback(opener_key, opener_id, now, |handler, session| {
                handler.on_link(session, LinkEvent::Connected { upstream: id, addr })
            });
        }
    }

    /// The current attempt failed (`None`: timed out): the next address, or the end.
    fn attempt_failed(&mut self, key: usize, failure: Option<io::ErrorKind>, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let id = session.info.id;
        let Some(connecting) =
            links_of(&mut session.extras).and_then(|l| l.connecting.as_deref_mut())
        else {
            return;
        };
        if let Some(timer) = connecting.timer.take() {
            self.timers.cancel(timer);
        }
        let upstream = connecting.upstream.clone();
        let reason = match failure {
            Some(kind) => {
                upstream.count(UpstreamEvent::Refused);
                CloseReason::UpstreamFailed(kind)
            }
            None => {
                upstream.count(UpstreamEvent::TimedOut);
                CloseReason::UpstreamTimeout
            }
        };
        debug!(session = %id, upstream = upstream.name(), addr = ?connecting.addr(), "connect attempt failed: {reason}");
        let next = connecting.advance();
        self.open_next(key, id, next, reason, false, now);
    }

    /// Starts the connect to `next` (or, should its socket fail at once, to the addresses
    /// after it). With `race`, the session's current attempt goes on next to the new one
    /// (happy eyeballs); without, it is over. When no new attempt starts, the current one (if
    /// it races on) or the latest racing one carries on; with none, a backoff before the next
    /// round if the upstream's [`crate::Retry`] allows one, else the session ends with
    /// `reason` (the last failure).
    #[allow(clippy::too_many_arguments)]
    fn open_next(
        &mut self,
        key: usize,
        id: SessionId,
        next: Option<SocketAddr>,
        mut reason: CloseReason,
        race: bool,
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(connecting) =
            links_of(&mut session.extras).and_then(|l| l.connecting.as_deref_mut())
        else {
            return;
        };
        if let Some(timer) = connecting.timer.take() {
            self.timers.cancel(timer);
        }
        let upstream = connecting.upstream.clone();
        let mut next = next;
        while let Some(addr) = next {
            upstream.count(UpstreamEvent::Attempt);
            match open_stream(
                addr,
                upstream.source(),
                self.poll.registry(),
                upstream_token(key),
            ) {
                Ok(stream) => {
                    let previous = std::mem::replace(&mut session.stream, stream.into());
                    let previous_addr = std::mem::replace(&mut session.info.peer, addr);
                    // Racing, the attempt before goes on; else it failed, and its socket
                    // closes (and leaves the poll) as it is dropped here.
                    if let (true, Some(deadline), SessionStream::Epoll(previous)) =
                        (race, connecting.deadline, previous)
                    {
                        connecting.racing.push(Racer {
                            stream: previous,
                            addr: previous_addr,
                            deadline,
                        });
                    }
                    begin_attempt(connecting, now);
                    arm_connect_timer(&mut self.timers, connecting, key, id);
                    return;
                }
                Err(err) => {
                    upstream.count(UpstreamEvent::Refused);
                    debug!(session = %id, upstream = upstream.name(), %addr, "connect failed: {err}");
                    reason = CloseReason::UpstreamFailed(err.kind());
                }
            }
            next = connecting.advance();
        }
        if race {
            // No address left to race with: the current attempt runs to its own end.
            arm_connect_timer(&mut self.timers, connecting, key, id);
            return;
        }
        if let Some(racer) = connecting.racing.pop() {
            // The current attempt failed; an earlier one still runs and becomes current.
            session.stream = racer.stream.into();
            session.info.peer = racer.addr;
            connecting.deadline = Some(racer.deadline);
            connecting.race_at = None;
            arm_connect_timer(&mut self.timers, connecting, key, id);
            return;
        }
        connecting.deadline = None;
        connecting.race_at = None;
        let random = retry_jitter(id, connecting.retries);
        if let Some(delay) = upstream
            .retry()
            .and_then(|retry| retry.delay(connecting.retries, random))
        {
            connecting.retries = connecting.retries.saturating_add(1);
            connecting.waiting = true;
            connecting.timer = Some(self.timers.insert(
                deadline_after(now, delay),
                TimerEntry {
                    key,
                    id,
                    kind: TimerKind::Connect,
                },
            ));
            upstream.count(UpstreamEvent::Retry);
            debug!(
                session = %id, upstream = upstream.name(), retry = connecting.retries,
                "every address failed ({reason}); trying again in {delay:?}"
            );
            // The failed socket stays the session's until the next one replaces it, but
            // leaves the poll: nothing is to be heard from it.
            if let Some(stream) = session.stream.mio() {
                let _ = self.poll.registry().deregister(stream);
            }
            return;
        }
        self.close(key, reason);
    }

    /// Tells a linked session's handler that its peer finished sending (once).
    pub(super) fn deliver_eof(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let id = session.info.id;
        let Some(links) = links_of(&mut session.extras) else {
            return;
        };
        if links.eof_told || links.peers.is_empty() {
            return;
        }
        links.eof_told = true;
        self.link_callback(key, id, now, |handler, session| handler.on_eof(session));
    }

    /// The link part of a flush: wakes the senders paused for this session's queue once it is
    /// down to the low watermark, and closes the write side when asked and flushed. Returns
    /// whether the session may end once its peer finished (no live link, or its own write side
    /// closed).
    pub(super) fn flush_links(&mut self, key: usize) -> bool {
        let low = self.limits.low_watermark;
        let Some(session) = self.sessions.get_mut(key) else {
            return true;
        };
        let TcpSession {
            stream,
            extras,
            outbound,
            tls,
            closing,
            work,
            drain_due,
            write_blocked,
            ..
        } = session;
        let Some(links) = links_of(extras) else {
            return true;
        };
        let queued = outbound.len().saturating_add(stream.unsent());
        let waiters = match !links.waiters.is_empty() && queued <= low {
            true => std::mem::take(&mut links.waiters),
            false => Vec::new(),
        };
        // A TLS session's write side closes with close_notify, which must wait for the
        // handshake (a client finished before its upstream's handshake completed).
        if links.finish
            && !links.write_shut
            && links.connecting.is_none()
            && tls.as_deref().is_none_or(|tls| !tls.handshaking())
            && outbound.is_empty()
            && !stream.sending()
            && work.is_idle()
            && !*drain_due
            && closing.is_none()
        {
            links.write_shut = true;
            let shut = match tls.as_deref_mut() {
                Some(tls) => {
                    tls.transport.send_close_notify();
                    match *write_blocked {
                        true => Ok(()),
                        false => tls.transport.flush(outbound, stream).map(|flushed| {
                            *write_blocked = flushed.blocked;
                        }),
                    }
                }
                None => stream.shutdown_write(),
            };
            if let Err(err) = shut {
                *closing = Some(CloseReason::Io(err.kind()));
            }
        }
        let done = links.peers.is_empty() || links.write_shut;
        for (waiter, id) in waiters {
            if let Some(waiting) = self.sessions.get_if(waiter, id) {
                if waiting.link_wait {
                    waiting.link_wait = false;
                    self.ready.push(waiter);
                }
            }
        }
        done
    }

    /// Counts the end of an upstream session (and logs one that never connected).
    pub(super) fn upstream_closed(
        &mut self,
        info: &SessionInfo,
        links: Option<&Links>,
        reason: &CloseReason,
    ) {
        let Some(links) = links else {
            return;
        };
        let Some(upstream) = links.upstream.as_ref() else {
            return;
        };
        if links.client {
            self.clients.remove(&info.id);
        }
        upstream.count(UpstreamEvent::Closed);
        let Some(connecting) = links.connecting.as_deref() else {
            if matches!(reason, CloseReason::Tls(_) | CloseReason::HandshakeTimeout) {
                info!(
                    session = %info.id, upstream = upstream.name(), addr = %info.peer,
                    "upstream session ended: {reason}"
                );
            }
            return;
        };
        if let Some(timer) = connecting.timer {
            self.timers.cancel(timer);
        }
        if matches!(
            reason,
            CloseReason::UpstreamFailed(_) | CloseReason::UpstreamTimeout
        ) {
            upstream.count(UpstreamEvent::Unreachable);
            info!(
                session = %info.id, upstream = upstream.name(), addr = %info.peer,
                "upstream unreachable: {reason}"
            );
        }
    }

    /// Session `id` ended: its linked sessions hear of it (and stop waiting for it).
    pub(super) fn tell_links_closed(
        &mut self,
        id: SessionId,
        links: Links,
        reason: &CloseReason,
        now: Instant,
    ) {
        for (waiter, waiter_id) in links.waiters {
            if let Some(waiting) = self.sessions.get_if(waiter, waiter_id) {
                if waiting.link_wait {
                    waiting.link_wait = false;
                    self.ready.push(waiter);
                }
            }
        }
        for (peer, peer_id) in links.peers {
            let Some(session) = self.sessions.get_if(peer, peer_id) else {
                continue;
            };
            if let Some(links) = links_of(&mut session.extras) {
                links.peers.retain(|(_, linked)| *linked != id);
                links.waiters.retain(|(_, waiting)| *waiting != id);
            }
            if session.link_wait {
                session.link_wait = false;
                self.ready.push(peer);
            }
            let reason = reason.clone();
            self.link_callback(peer, peer_id, now, |handler, session| {
                handler.on_link(session, LinkEvent::Closed { peer: id, reason })
            });
            self.list_for_flush(peer);
        }
    }
}
