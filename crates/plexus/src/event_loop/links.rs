//! The loop's side of connectors (see `crate::connector`): opening upstream sessions (a
//! non-blocking connect per address, bounded by the connect timeout on the wheel), handing
//! bytes between linked sessions with backpressure both ways, passing half-closes on, and
//! telling each side when the other connected or ended.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use plexus_proto::deadline_after;
use tracing::{debug, info, warn};

use super::{client_token, upstream_token, EventLoop};
use crate::connection::tls::TlsTransport;
use crate::connector::{Connecting, UpstreamEvent};
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

/// Starts a non-blocking connect to `addr`, registered under `token`.
fn open_stream(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
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
                    self.start_connect(key, *request, now);
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
            // receives) go on copying.
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
                        if target.outbound.len() > high {
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
                    debug!(session = %from, "splice_with: an io_uring session; copying");
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

    /// Opens the upstream session `request` asks for, linked with session `opener`: the first
    /// address whose connect starts (the others follow on failure or timeout). If none does,
    /// the opener hears at once that it ended.
    fn start_connect(&mut self, opener: usize, request: ConnectRequest, now: Instant) {
        let ConnectRequest {
            id,
            upstream,
            handler,
        } = request;
        let Some(opener_id) = self.sessions.get_mut(opener).map(|s| s.info.id) else {
            return;
        };
        let key = self.sessions.vacant_key();
        let mut connecting = Connecting::new(upstream.clone());
        let mut failure = io::ErrorKind::AddrNotAvailable;
        let (stream, addr) = loop {
            let Some(addr) = connecting.addr() else {
                upstream.count(UpstreamEvent::Unreachable);
                let reason = CloseReason::UpstreamFailed(failure);
                info!(session = %id, upstream = upstream.name(), "upstream unreachable: {reason}");
                self.link_callback(opener, opener_id, now, |handler, session| {
                    handler.on_link(session, LinkEvent::Closed { peer: id, reason })
                });
                return;
            };
            upstream.count(UpstreamEvent::Attempt);
            match open_stream(addr, self.poll.registry(), upstream_token(key)) {
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
                    self.link_callback(opener, opener_id, now, |handler, session| {
                        handler.on_link(session, LinkEvent::Closed { peer: id, reason })
                    });
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
        let timer = self.timers.insert(
            deadline_after(now, upstream.connect_timeout()),
            TimerEntry {
                key,
                id,
                kind: TimerKind::Connect,
            },
        );
        connecting.timer = Some(timer);
        let idle_timer = self.timers.insert(
            deadline_after(now, self.idle_limit),
            TimerEntry {
                key,
                id,
                kind: TimerKind::Idle,
            },
        );
        let info = SessionInfo {
            id,
            peer: addr,
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
            listener: Arc::clone(upstream.info()),
        };
        let mut session = TcpSession::new(stream.into(), info, None, idle_timer, now);
        session.handler = handler;
        // Nothing is written before the connect completes (its writable edge clears this).
        session.write_blocked = true;
        session.extras.get_or_insert_with(Box::default).links = Some(Box::new(Links {
            peers: vec![(opener, opener_id)],
            connecting: Some(Box::new(connecting)),
            upstream: Some(upstream.clone()),
            ..Links::default()
        }));
        self.stats.opened(&session.info.listener);
        upstream.count(UpstreamEvent::Opened);
        let inserted = self.sessions.insert(session);
        debug_assert_eq!(inserted, key);
        if let Some(links) = self
            .sessions
            .get_mut(opener)
            .and_then(|s| links_of(&mut s.extras))
        {
            links.peers.push((key, id));
        }
        debug!(session = %id, opener = %opener_id, upstream = upstream.name(), %addr, "upstream connecting");
    }

    /// Readiness of an upstream session's socket while its connect runs.
    pub(super) fn connect_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let connecting = links_of(&mut session.extras).is_some_and(|l| l.connecting.is_some());
        if !connecting || !(event.is_writable() || event.is_error() || event.is_read_closed()) {
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

    /// An upstream session's connect attempt timer fired.
    pub(super) fn connect_timed_out(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(connecting) = links_of(&mut session.extras).and_then(|l| l.connecting.as_mut())
        else {
            return;
        };
        connecting.timer = None;
        self.attempt_failed(key, None, now);
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
        } else if let Some((opener_key, opener_id)) = opener {
            self.link_callback(opener_key, opener_id, now, |handler, session| {
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
        if let Some((opener_key, opener_id)) = links.peers.first().copied() {
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
        let mut reason = match failure {
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
        while let Some(addr) = connecting.advance() {
            upstream.count(UpstreamEvent::Attempt);
            match open_stream(addr, self.poll.registry(), upstream_token(key)) {
                Ok(stream) => {
                    connecting.timer = Some(self.timers.insert(
                        deadline_after(now, upstream.connect_timeout()),
                        TimerEntry {
                            key,
                            id,
                            kind: TimerKind::Connect,
                        },
                    ));
                    // The failed socket closes (and leaves the poll) as it is dropped.
                    session.stream = stream.into();
                    session.info.peer = addr;
                    return;
                }
                Err(err) => {
                    upstream.count(UpstreamEvent::Refused);
                    debug!(session = %id, upstream = upstream.name(), %addr, "connect failed: {err}");
                    reason = CloseReason::UpstreamFailed(err.kind());
                }
            }
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
        let waiters = match !links.waiters.is_empty() && outbound.len() <= low {
            true => std::mem::take(&mut links.waiters),
            false => Vec::new(),
        };
        if links.finish
            && !links.write_shut
            && links.connecting.is_none()
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
