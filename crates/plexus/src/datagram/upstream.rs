//! Datagram connectors (see "Datagram upstreams" in `crate::connector`): the connected UDP
//! sockets udp and dtls sessions open to upstreams, on the loop's datagram endpoint.
//!
//! An upstream socket is registered under a token in the datagram range, after the listener
//! sockets and their upgrade relays ([`UPSTREAM_BASE`] on, in [`super::token_socket`]'s
//! numbering), so the stream loop dispatches its readiness to the endpoint like any datagram
//! socket's. Each upstream is linked with the session that opened it (its *client*): the
//! client's `send_to` queues one datagram on the upstream's bounded [`DatagramQueue`], which
//! goes out with `sendmmsg` after each receive batch and at the end of each turn; what the
//! upstream sends back is read with `recvmmsg` (at most [`RECV_BATCHES_PER_TURN`] batches per
//! turn, like a listener socket) and handed, datagram by datagram, to the upstream's handler,
//! whose `send_to` puts it on the client's send path (encrypted for a dtls client). The
//! upstream ends with its client, or on its own when the kernel reports an ICMP error on the
//! connected socket (`ECONNREFUSED` and friends: counted as refused, the client hears
//! `Closed { UpstreamFailed }`), or when either side closes it.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use openssl::ssl::SslStream;
use plexus_proto::{deadline_after, TimerKey};
use plexus_sys::dgram::send_batch;
use tracing::{debug, error, info, warn};

use super::{run_callback, DatagramTimer, HandleFields, RECV_SLOT};
use super::{socket_token, timer_entry, DatagramEndpoint, LoopParts, RECV_BATCHES_PER_TURN};
use crate::connector::{Upstream, UpstreamEvent};
use crate::dtls::{self, DatagramIo, DtlsClientConfig, Progress};
use crate::metrics::LoopStats;
use crate::outbound::OutboundQueue;
use crate::service::{
    CloseReason, ConnectRequest, LinkEvent, LinkOp, Links, Session, SessionExtras, SessionHandler,
    SessionId, SessionInfo,
};
use crate::worker::WorkQueue;

/// The first index (in `token_socket`'s numbering) of the upstream sockets: after the
/// listener sockets and their relays.
pub(crate) const UPSTREAM_BASE: usize = 2 * super::MAX_DATAGRAM_SOCKETS;
/// Most upstream sockets one loop may hold at once (the size of their token range).
pub(crate) const MAX_DATAGRAM_UPSTREAMS: usize = 1 << 24;

/// The token of upstream socket `slot`.
fn upstream_token(slot: usize) -> Token {
    // Slots stay below MAX_DATAGRAM_UPSTREAMS: no overflow.
    socket_token(UPSTREAM_BASE.saturating_add(slot))
}

/// Datagrams waiting for a socket, oldest first, bounded in bytes: sans-IO (the caller sends
/// and reports what went).
#[derive(Debug, Default)]
pub(crate) struct DatagramQueue {
    pending: VecDeque<Bytes>,
    bytes: usize,
}

impl DatagramQueue {
    /// Queues `datagram` unless it would take the queue past `limit` bytes (one datagram
    /// always fits an empty queue, however large). False: dropped.
    pub(crate) fn push(&mut self, datagram: Bytes, limit: usize) -> bool {
        let total = self.bytes.saturating_add(datagram.len());
        if !self.pending.is_empty() && total > limit {
            return false;
        }
        self.bytes = total;
        self.pending.push_back(datagram);
        true
    }

    /// Up to `max` of the oldest datagrams (the queue's front, for one `sendmmsg`).
    pub(crate) fn front(&self, max: usize) -> impl Iterator<Item = &Bytes> {
        self.pending.iter().take(max)
    }

    /// Removes the `sent` oldest datagrams; returns their bytes.
    pub(crate) fn consume(&mut self, sent: usize) -> usize {
        let mut bytes = 0usize;
        for _ in 0..sent {
            let Some(datagram) = self.pending.pop_front() else {
                break;
            };
            bytes = bytes.saturating_add(datagram.len());
        }
        self.bytes = self.bytes.saturating_sub(bytes);
        bytes
    }

    /// Removes and returns the oldest datagram.
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        let datagram = self.pending.pop_front()?;
        self.bytes = self.bytes.saturating_sub(datagram.len());
        Some(datagram)
    }

    /// Datagrams queued.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Bytes queued.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A connected UDP socket to an upstream, linked with the session that opened it.
pub(super) struct DatagramUpstream {
    info: SessionInfo,
    socket: UdpSocket,
    upstream: Upstream,
    /// The session that opened it: key in the session slab, and id.
    client: (usize, SessionId),
    handler: Box<dyn SessionHandler>,
    /// What the handler sends (`Session::send`): datagrams to the upstream.
    outbound: OutboundQueue,
    closing: Option<CloseReason>,
    work: WorkQueue,
    extras: Option<Box<SessionExtras>>,
    drain_wanted: bool,
    /// Datagrams waiting for the socket.
    queue: DatagramQueue,
    /// Datagrams per `sendmmsg` (the client's listener's `datagram_batch`).
    batch: usize,
    readable: bool,
    write_blocked: bool,
    /// Listed in the endpoint's `upstream_dirty` (its queue waits for a flush).
    dirty: bool,
    /// A send reported an ICMP error: the upstream ends at its next read.
    failed: Option<io::ErrorKind>,
    /// DTLS origination ([`Upstream::with_dtls`]).
    dtls: Option<Box<UpstreamDtls>>,
}

/// A DTLS upstream's client state.
struct UpstreamDtls {
    config: Arc<DtlsClientConfig>,
    stream: SslStream<DatagramIo>,
    established: bool,
    /// Plaintext datagrams sent before the handshake completed (bounded like the queue).
    early: DatagramQueue,
    handshake_timer: Option<TimerKey>,
    retransmit_timer: Option<TimerKey>,
}

/// Binds an ephemeral port of `addr`'s family, connects it to `addr` (no packet is sent:
/// UDP's connect only fixes the peer) and registers it.
fn open_socket(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<UdpSocket> {
    let bind = match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let mut socket = UdpSocket::bind(bind)?;
    socket.connect(addr)?;
    registry.register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(socket)
}

/// Whether a socket error means the upstream is gone (an ICMP error on the connected
/// socket), rather than one datagram failing.
fn ends_upstream(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NotConnected
    )
}

impl DatagramEndpoint {
    /// Applies what session `key`'s last callback asked of its links: upstreams to open,
    /// datagrams for them, closes. Half-close and splice are stream features (ignored).
    pub(super) fn apply_link_ops(&mut self, key: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let client = session.info.id;
        let Some(links) = session
            .extras
            .as_deref_mut()
            .and_then(|e| e.links.as_deref_mut())
            .filter(|links| !links.ops.is_empty())
        else {
            return;
        };
        let ops = std::mem::take(&mut links.ops);
        links.pending = 0;
        for op in ops {
            let to = match op {
                LinkOp::Connect(request) => {
                    self.open_upstream(key, *request, now, parts);
                    continue;
                }
                LinkOp::Send(to, _) | LinkOp::Close(to) => to,
                LinkOp::Finish(_) | LinkOp::Splice(_) => {
                    debug!(session = %client, "half-close and splice are stream features; ignored on a datagram link");
                    continue;
                }
            };
            let slot = self.sessions.get_mut(key).and_then(|session| {
                let links = session.extras.as_deref()?.links.as_deref()?;
                links
                    .peers
                    .iter()
                    .find(|(_, id)| *id == to)
                    .map(|(s, _)| *s)
            });
            let Some(slot) = slot.filter(|&slot| self.upstream_is(slot, to)) else {
                debug!(session = %client, to = %to, "dropped a request for a session that is not linked (or ended)");
                continue;
            };
            match op {
                LinkOp::Send(_, data) => self.queue_upstream(slot, data.freeze(), now),
                LinkOp::Close(_) => self.close_upstream(slot, CloseReason::Requested, now, parts),
                _ => {}
            }
        }
    }

    fn upstream_is(&self, slot: usize, id: SessionId) -> bool {
        self.upstreams.get(slot).is_some_and(|up| up.info.id == id)
    }

    /// Opens the connected socket `request` asks for, linked with session `client_key`, and
    /// tells the opener it is connected (or, when no address takes a socket, that it ended).
    fn open_upstream(
        &mut self,
        client_key: usize,
        request: ConnectRequest,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let ConnectRequest {
            id,
            upstream,
            handler,
        } = request;
        let Some(client) = self.sessions.get(client_key) else {
            return;
        };
        let (client_id, index) = (client.info.id, client.socket);
        let batch = self
            .sockets
            .get(index)
            .map_or(1, |socket| socket.listener.batch.max(1));
        let slot = self.upstreams.vacant_key();
        let mut failure = io::ErrorKind::AddrNotAvailable;
        let mut exhausted = false;
        let mut opened = None;
        if upstream.tls().is_some() {
            // TLS origination is a stream feature: a datagram session cannot speak it.
            failure = io::ErrorKind::Unsupported;
        } else if slot >= MAX_DATAGRAM_UPSTREAMS {
            failure = io::ErrorKind::OutOfMemory;
        } else if let Some(registry) = self.registry.as_ref() {
            for &addr in upstream.addrs() {
                upstream.count(UpstreamEvent::Attempt);
                match open_socket(addr, registry, upstream_token(slot)) {
                    Ok(socket) => {
                        opened = Some((socket, addr));
                        break;
                    }
                    Err(err) if plexus_sys::is_descriptor_exhaustion(&err) => {
                        // A local shortage: every other address would fail the same way, and
                        // the upstream is not to blame (a health check must not mark it down).
                        if let Some(also) = self.descriptor_shortages.allow(now) {
                            warn!(
                                session = %id, upstream = upstream.name(), %addr,
                                "cannot open a udp upstream socket: {err} (+{also} more in the last second)"
                            );
                        }
                        exhausted = true;
                        break;
                    }
                    Err(err) => {
                        upstream.count(UpstreamEvent::Refused);
                        debug!(session = %id, upstream = upstream.name(), %addr, "udp upstream socket failed: {err}");
                        failure = err.kind();
                    }
                }
            }
        }
        let dtls = match (opened.is_some(), upstream.dtls()) {
            (true, Some(config)) => match config.stream() {
                Ok(stream) => Some(Box::new(UpstreamDtls {
                    config: Arc::clone(config),
                    stream,
                    established: false,
                    early: DatagramQueue::default(),
                    handshake_timer: None,
                    retransmit_timer: None,
                })),
                Err(err) => {
                    error!(session = %id, "dtls: cannot create a client SSL object: {err}");
                    failure = io::ErrorKind::Other;
                    opened = None;
                    None
                }
            },
            _ => None,
        };
        let Some((socket, addr)) = opened else {
            let reason = match exhausted {
                true => CloseReason::DescriptorsExhausted,
                false => {
                    upstream.count(UpstreamEvent::Unreachable);
                    let reason = CloseReason::UpstreamFailed(failure);
                    info!(session = %id, upstream = upstream.name(), "udp upstream unreachable: {reason}");
                    reason
                }
            };
            self.client_link_event(
                client_key,
                client_id,
                LinkEvent::Closed { peer: id, reason },
                now,
                parts,
            );
            return;
        };
        let local = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let info = SessionInfo {
            id,
            peer: addr,
            local,
            listener: Arc::clone(upstream.info()),
        };
        upstream.count(UpstreamEvent::Connected);
        upstream.count(UpstreamEvent::Opened);
        self.stats.opened(&info.listener);
        let inserted = self.upstreams.insert(DatagramUpstream {
            info,
            socket,
            upstream: upstream.clone(),
            client: (client_key, client_id),
            handler,
            outbound: OutboundQueue::datagrams(),
            closing: None,
            work: WorkQueue::default(),
            extras: None,
            drain_wanted: false,
            queue: DatagramQueue::default(),
            batch,
            readable: false,
            write_blocked: false,
            dirty: false,
            failed: None,
            dtls,
        });
        debug_assert_eq!(inserted, slot);
        if let Some(client) = self.sessions.get_mut(client_key) {
            let extras = client.extras.get_or_insert_with(Box::default);
            let links = extras.links.get_or_insert_with(Box::<Links>::default);
            links.peers.push((slot, id));
        }
        if self.upstreams.get(slot).is_some_and(|up| up.dtls.is_some()) {
            // The opener hears `Connected` once the handshake is done.
            debug!(session = %id, opener = %client_id, upstream = upstream.name(), %addr, "dtls upstream handshaking");
            let entry = timer_entry(slot, id, DatagramTimer::UpstreamHandshake);
            let timer = parts
                .timers
                .insert(deadline_after(now, self.limits.handshake_timeout), entry);
            if let Some(dtls) = self.upstreams.get_mut(slot).and_then(|up| up.dtls.as_mut()) {
                dtls.handshake_timer = Some(timer);
            }
            self.dtls_upstream_drive(slot, now, parts);
            self.flush_upstream(slot);
            return;
        }
        debug!(session = %id, opener = %client_id, upstream = upstream.name(), %addr, "udp upstream connected");
        self.client_link_event(
            client_key,
            client_id,
            LinkEvent::Connected { upstream: id, addr },
            now,
            parts,
        );
    }

    /// Tells client session `key` (if it is still `id`) of a link event, and applies what it
    /// asks in return.
    fn client_link_event(
        &mut self,
        key: usize,
        id: SessionId,
        event: LinkEvent,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        if self.sessions.get(key).is_none_or(|s| s.info.id != id) {
            return;
        }
        self.callback(key, parts, |handler, session| {
            handler.on_link(session, event)
        });
        self.after_callback(key, now, parts);
    }

    /// Sends one datagram to upstream `slot`: queued (dropped and counted when its queue is
    /// full); on a DTLS upstream encrypted first, or held until its handshake is done.
    fn queue_upstream(&mut self, slot: usize, datagram: Bytes, now: Instant) {
        let limit = self.limits.high_watermark;
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        if let Some(dtls) = up.dtls.as_mut() {
            if !dtls.established {
                if !dtls.early.push(datagram, limit) {
                    up.upstream.count(UpstreamEvent::DroppedOverflow);
                }
                return;
            }
            if let Err(why) = dtls::write(&mut dtls.stream, &datagram, up.info.peer, now) {
                debug!(session = %up.info.id, "dtls upstream write failed: {why}");
                up.upstream.count(UpstreamEvent::DroppedError);
            }
            let records = std::mem::take(&mut dtls.stream.get_mut().outbound);
            for record in records {
                self.queue_raw(slot, Bytes::from(record));
            }
            return;
        }
        self.queue_raw(slot, datagram);
    }

    /// Queues one datagram as it is for upstream `slot`'s socket.
    fn queue_raw(&mut self, slot: usize, datagram: Bytes) {
        let limit = self.limits.high_watermark;
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        if !up.queue.push(datagram, limit) {
            up.upstream.count(UpstreamEvent::DroppedOverflow);
            return;
        }
        if !up.dirty {
            up.dirty = true;
            self.upstream_dirty.push(slot);
        }
    }

    /// Sends every queued upstream datagram the sockets take (after a receive batch, and at
    /// the end of each turn).
    pub(super) fn flush_upstreams(&mut self) {
        for slot in std::mem::take(&mut self.upstream_dirty) {
            if let Some(up) = self.upstreams.get_mut(slot) {
                up.dirty = false;
            }
            self.flush_upstream(slot);
        }
    }

    /// Sends upstream `slot`'s queue with `sendmmsg` until it is empty or the socket is full.
    fn flush_upstream(&mut self, slot: usize) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        while !up.queue.is_empty() && !up.write_blocked && up.failed.is_none() {
            let peer = up.info.peer;
            let messages: Vec<(SocketAddr, &[u8])> = up
                .queue
                .front(up.batch)
                .map(|datagram| (peer, datagram.as_ref()))
                .collect();
            match send_batch(&up.socket, &messages) {
                Ok(sent) => {
                    let bytes = up.queue.consume(sent.min(messages.len()));
                    self.stats.sent(&up.info.listener, bytes);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => up.write_blocked = true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if ends_upstream(err.kind()) => {
                    // The upstream is gone: it ends at its next read (which needs the loop's
                    // parts to tell the client).
                    up.failed = Some(err.kind());
                    if !self.upstream_ready.contains(&slot) {
                        self.upstream_ready.push(slot);
                    }
                }
                Err(err) => {
                    // This datagram cannot be sent (too large…): drop it, keep the others.
                    debug!(session = %up.info.id, "udp upstream send: {err}");
                    up.queue.consume(1);
                    up.upstream.count(UpstreamEvent::DroppedError);
                }
            }
        }
    }

    /// A readiness event for upstream socket `slot`.
    pub(super) fn upstream_event(
        &mut self,
        slot: usize,
        readable: bool,
        writable: bool,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        up.readable |= readable;
        if writable && up.write_blocked {
            up.write_blocked = false;
            self.flush_upstream(slot);
        }
        self.read_upstream(slot, now, parts);
    }

    /// Serves the upstream sockets left with datagrams (or a failure) by an earlier turn.
    pub(super) fn serve_upstreams(&mut self, now: Instant, parts: &mut LoopParts<'_>) {
        for slot in std::mem::take(&mut self.upstream_ready) {
            self.read_upstream(slot, now, parts);
        }
    }

    /// Reads what upstream `slot` sent (a bounded number of batches this turn) and hands each
    /// datagram to its handler; an ICMP error ends it.
    fn read_upstream(&mut self, slot: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(up) = self.upstreams.get(slot) else {
            return;
        };
        let id = up.info.id;
        if let Some(kind) = up.failed {
            self.upstream_failed(slot, kind, now, parts);
            return;
        }
        if !up.readable {
            return;
        }
        let Some(mut recv) = self.recv.take() else {
            self.upstream_ready.push(slot);
            return;
        };
        let mut budget_left = false;
        for round in 0..RECV_BATCHES_PER_TURN {
            let Some(up) = self.upstreams.get_mut(slot).filter(|up| up.info.id == id) else {
                break;
            };
            let count = match recv.recv(&up.socket) {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    up.readable = false;
                    break;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if ends_upstream(err.kind()) => {
                    self.recv = Some(recv);
                    self.upstream_failed(slot, err.kind(), now, parts);
                    return;
                }
                Err(err) => {
                    debug!(session = %id, "udp upstream receive: {err}");
                    continue;
                }
            };
            // A short batch emptied the socket: on Linux every datagram that arrives later
            // wakes epoll again (edge-triggered sockets signal each arrival), so the extra
            // `recvmmsg` that would only say EAGAIN is saved — it was one syscall per reply.
            if count < recv.capacity() {
                up.readable = false;
            }
            let drained = !up.readable;
            for position in 0..count {
                let received = recv.get(position);
                let Some(up) = self.upstreams.get(slot).filter(|up| up.info.id == id) else {
                    break;
                };
                self.stats.received(&up.info.listener, received.data.len());
                if received.truncated {
                    up.upstream.count(UpstreamEvent::DroppedError);
                    continue;
                }
                if up.dtls.is_some() {
                    self.dtls_upstream_input(slot, received.data, now, parts);
                    continue;
                }
                self.upstream_callback(slot, parts, |handler, session| {
                    handler.on_data(session, received.data)
                });
                self.upstream_after_callback(slot, now, parts);
            }
            // What the client side queued for its peer leaves with the socket's next flush
            // (at the latest the end of this turn: one sendmmsg for every upstream's replies).
            self.flush_upstreams();
            budget_left = round.saturating_add(1) == RECV_BATCHES_PER_TURN;
            if drained {
                break;
            }
        }
        self.recv = Some(recv);
        let still = self
            .upstreams
            .get(slot)
            .is_some_and(|up| up.info.id == id && up.readable);
        if budget_left && still && !self.upstream_ready.contains(&slot) {
            // More may be waiting: `has_ready` brings the loop back without blocking.
            self.upstream_ready.push(slot);
        }
    }

    /// The kernel reported an ICMP error on upstream `slot`'s socket: counted as refused, the
    /// upstream ends (`UpstreamFailed`) and its client hears of it.
    fn upstream_failed(
        &mut self,
        slot: usize,
        kind: io::ErrorKind,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(up) = self.upstreams.get(slot) else {
            return;
        };
        up.upstream.count(UpstreamEvent::Refused);
        info!(
            session = %up.info.id, upstream = up.upstream.name(), addr = %up.info.peer,
            "udp upstream failed: {kind}"
        );
        self.close_upstream(slot, CloseReason::UpstreamFailed(kind), now, parts);
    }

    /// Calls into upstream `slot`'s handler with its session handle; a panic closes it only.
    fn upstream_callback(
        &mut self,
        slot: usize,
        parts: &mut LoopParts<'_>,
        call: impl FnOnce(&mut Box<dyn SessionHandler>, &mut Session<'_>),
    ) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        let DatagramUpstream {
            info,
            handler,
            outbound,
            closing,
            work,
            extras,
            drain_wanted,
            ..
        } = up;
        let fields = HandleFields {
            info,
            handler,
            outbound,
            closing,
            work,
            extras,
            drain_wanted,
        };
        if !run_callback(fields, &self.limits, parts, call) {
            error!(session = %info.id, upstream = %info.peer, "upstream handler panicked; closing this upstream session only");
            LoopStats::add(&self.stats.handler_panics, 1);
            *closing = Some(CloseReason::Panic);
        }
    }

    /// After upstream `slot`'s callback: its own sends go to the upstream, its `send_to` to
    /// the client's peer; a close asked for is applied. Timers, drain notifications and
    /// blocking jobs are not available to upstream sessions (dropped; a job closes it).
    fn upstream_after_callback(&mut self, slot: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        if !up.work.is_idle() {
            error!(session = %up.info.id, "spawn_blocking is not available on udp upstream sessions; closing");
            up.closing = Some(CloseReason::WorkOverflow);
        }
        up.drain_wanted = false;
        let mut own = Vec::new();
        while let Some(datagram) = up.outbound.pop_datagram() {
            own.push(datagram);
        }
        let (client_key, client_id) = up.client;
        let id = up.info.id;
        let ops = match up.extras.as_deref_mut() {
            Some(extras) => {
                extras.timer_request = Default::default();
                extras.tls_upgrade = None;
                extras
                    .links
                    .as_deref_mut()
                    .map(|links| {
                        links.pending = 0;
                        std::mem::take(&mut links.ops)
                    })
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        for datagram in own {
            self.queue_upstream(slot, datagram, now);
        }
        for op in ops {
            match op {
                LinkOp::Send(to, data) if to == client_id => {
                    self.deliver_to_client(client_key, client_id, data.freeze(), now, parts);
                }
                LinkOp::Close(to) if to == client_id => {
                    if let Some(client) = self.sessions.get_mut(client_key) {
                        if client.info.id == client_id {
                            client.closing.get_or_insert(CloseReason::Requested);
                        }
                    }
                    self.after_callback(client_key, now, parts);
                }
                LinkOp::Connect(request) => {
                    debug!(session = %request.id, "an upstream session cannot open upstreams; dropped");
                }
                _ => {}
            }
        }
        // The slot may have been freed (its client closed) and taken by another upstream.
        let closing = (self.upstreams.get(slot))
            .filter(|up| up.info.id == id)
            .and_then(|up| up.closing.clone());
        if let Some(reason) = closing {
            self.close_upstream(slot, reason, now, parts);
        }
    }

    /// One datagram from an upstream's handler for its client's peer: through the client's
    /// send path (DTLS encryption, the socket's bounded send queue).
    fn deliver_to_client(
        &mut self,
        key: usize,
        id: SessionId,
        datagram: Bytes,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(client) = self.sessions.get_mut(key).filter(|s| s.info.id == id) else {
            return;
        };
        if client.closing.is_some() {
            return;
        }
        client.outbound.push_shared(datagram);
        self.after_callback(key, now, parts);
    }

    /// One datagram from a DTLS upstream: the handshake's next step, or records whose
    /// plaintext goes to the upstream's handler (one `on_data` per record).
    fn dtls_upstream_input(
        &mut self,
        slot: usize,
        data: &[u8],
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(dtls) = self.upstreams.get_mut(slot).and_then(|up| up.dtls.as_mut()) else {
            return;
        };
        dtls.stream.get_mut().put(data);
        self.dtls_upstream_drive(slot, now, parts);
    }

    /// Lets OpenSSL process what arrived for DTLS upstream `slot`: the handshake (its end
    /// announced to the client, the early datagrams then sent), then application records;
    /// sends what OpenSSL wrote and re-arms its retransmission timer.
    fn dtls_upstream_drive(&mut self, slot: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        let (id, peer, client) = (up.info.id, up.info.peer, up.client);
        let Some(dtls) = up.dtls.as_mut() else {
            return;
        };
        if !dtls.established {
            match dtls::handshake(&mut dtls.stream, peer, now) {
                Progress::Waiting => {}
                Progress::Established if !dtls.config.accepts(dtls.stream.ssl()) => {
                    info!(session = %id, upstream = up.upstream.name(), %peer, "dtls upstream refused: not the pinned certificate");
                    self.dtls_upstream_output(slot, now, parts);
                    let reason = CloseReason::UpstreamFailed(io::ErrorKind::InvalidData);
                    self.close_upstream(slot, reason, now, parts);
                    return;
                }
                Progress::Established => {
                    dtls.established = true;
                    if let Some(timer) = dtls.handshake_timer.take() {
                        parts.timers.cancel(timer);
                    }
                    LoopStats::add(&self.stats.handshakes_ok, 1);
                    debug!(session = %id, upstream = up.upstream.name(), %peer, "dtls upstream handshake complete");
                    let mut early = Vec::new();
                    while let Some(datagram) = dtls.early.pop() {
                        early.push(datagram);
                    }
                    for datagram in early {
                        self.queue_upstream(slot, datagram, now);
                    }
                    self.dtls_upstream_output(slot, now, parts);
                    let (client_key, client_id) = client;
                    self.client_link_event(
                        client_key,
                        client_id,
                        LinkEvent::Connected {
                            upstream: id,
                            addr: peer,
                        },
                        now,
                        parts,
                    );
                    if !self.upstream_is(slot, id) {
                        return;
                    }
                }
                Progress::Closed => {
                    self.close_upstream(slot, CloseReason::PeerClosed, now, parts);
                    return;
                }
                Progress::Failed(why) => {
                    info!(session = %id, upstream = up.upstream.name(), %peer, "dtls upstream handshake failed: {why}");
                    // OpenSSL's alert goes out; the upstream cannot serve.
                    self.dtls_upstream_output(slot, now, parts);
                    let reason = CloseReason::UpstreamFailed(io::ErrorKind::InvalidData);
                    self.close_upstream(slot, reason, now, parts);
                    return;
                }
            }
        }
        if self.plain.is_empty() {
            self.plain = vec![0; RECV_SLOT].into_boxed_slice();
        }
        while let Some(dtls) = (self.upstreams.get_mut(slot))
            .filter(|up| up.info.id == id)
            .and_then(|up| up.dtls.as_mut())
            .filter(|dtls| dtls.established)
        {
            match dtls::read(&mut dtls.stream, &mut self.plain, peer, now) {
                Ok(n) => {
                    let plain = std::mem::take(&mut self.plain);
                    self.upstream_callback(slot, parts, |handler, session| {
                        handler.on_data(session, plain.get(..n).unwrap_or_default())
                    });
                    self.plain = plain;
                    self.upstream_after_callback(slot, now, parts);
                }
                Err(Progress::Closed) => {
                    self.close_upstream(slot, CloseReason::PeerClosed, now, parts);
                    return;
                }
                Err(Progress::Failed(why)) => {
                    debug!(session = %id, "dtls upstream failed: {why}");
                    let reason = CloseReason::Io(io::ErrorKind::InvalidData);
                    self.close_upstream(slot, reason, now, parts);
                    return;
                }
                Err(_) => break,
            }
        }
        if self.upstream_is(slot, id) {
            self.dtls_upstream_output(slot, now, parts);
        }
    }

    /// Queues what OpenSSL wrote for DTLS upstream `slot` and re-arms its retransmission
    /// timer.
    fn dtls_upstream_output(&mut self, slot: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(up) = self.upstreams.get_mut(slot) else {
            return;
        };
        let (id, peer) = (up.info.id, up.info.peer);
        let Some(dtls) = up.dtls.as_mut() else {
            return;
        };
        let records = std::mem::take(&mut dtls.stream.get_mut().outbound);
        if dtls.established {
            dtls::free_buffers(&dtls.stream, peer, now);
        }
        if let Some(timer) = dtls.retransmit_timer.take() {
            parts.timers.cancel(timer);
        }
        if let Some(wait) = dtls::retransmit_after(&dtls.stream, peer, now) {
            let entry = timer_entry(slot, id, DatagramTimer::UpstreamRetransmit);
            dtls.retransmit_timer = Some(parts.timers.insert(deadline_after(now, wait), entry));
        }
        for record in records {
            self.queue_raw(slot, Bytes::from(record));
        }
    }

    /// A DTLS upstream's timer fired: a retransmission (the handshake fails past OpenSSL's
    /// limit), or the end of its handshake time.
    pub(super) fn upstream_timer(
        &mut self,
        slot: usize,
        id: SessionId,
        kind: DatagramTimer,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(up) = self.upstreams.get_mut(slot).filter(|up| up.info.id == id) else {
            return;
        };
        let peer = up.info.peer;
        let Some(dtls) = up.dtls.as_mut() else {
            return;
        };
        match kind {
            DatagramTimer::UpstreamHandshake => {
                dtls.handshake_timer = None;
                if !dtls.established {
                    LoopStats::add(&self.stats.handshake_timeouts, 1);
                    self.close_upstream(slot, CloseReason::UpstreamTimeout, now, parts);
                }
            }
            _ => {
                dtls.retransmit_timer = None;
                if !dtls::handle_timeout(&mut dtls.stream, peer, now) {
                    self.close_upstream(slot, CloseReason::UpstreamTimeout, now, parts);
                    return;
                }
                self.dtls_upstream_output(slot, now, parts);
                self.flush_upstream(slot);
            }
        }
    }

    /// Ends upstream `slot`: its queue flushed once (best effort), its socket closed, its
    /// handler and its client told.
    fn close_upstream(
        &mut self,
        slot: usize,
        reason: CloseReason,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some((id, (client_key, client_id))) = self.end_upstream(slot, &reason, parts) else {
            return;
        };
        if let Some(links) = self
            .sessions
            .get_mut(client_key)
            .filter(|s| s.info.id == client_id)
            .and_then(|s| s.extras.as_deref_mut())
            .and_then(|e| e.links.as_deref_mut())
        {
            links.peers.retain(|(_, linked)| *linked != id);
        }
        self.client_link_event(
            client_key,
            client_id,
            LinkEvent::Closed { peer: id, reason },
            now,
            parts,
        );
    }

    /// The upstreams `peers` of a client that ended with `reason` end with it.
    pub(super) fn close_upstreams_of(
        &mut self,
        peers: &[(usize, SessionId)],
        reason: &CloseReason,
        parts: &mut LoopParts<'_>,
    ) {
        for &(slot, id) in peers {
            if self.upstream_is(slot, id) {
                self.end_upstream(slot, reason, parts);
            }
        }
    }

    /// Removes upstream `slot` (flushing its queue once), counts its end and tells its
    /// handler; returns its id and its client.
    fn end_upstream(
        &mut self,
        slot: usize,
        reason: &CloseReason,
        parts: &mut LoopParts<'_>,
    ) -> Option<(SessionId, (usize, SessionId))> {
        if let Some(up) = self.upstreams.get_mut(slot) {
            if let Some(dtls) = up.dtls.as_mut() {
                for timer in [dtls.handshake_timer.take(), dtls.retransmit_timer.take()]
                    .into_iter()
                    .flatten()
                {
                    parts.timers.cancel(timer);
                }
                // An orderly end of an established session says so (close_notify).
                let orderly =
                    !matches!(reason, CloseReason::UpstreamFailed(_) | CloseReason::Io(_));
                let records = match dtls.established && orderly {
                    true => {
                        dtls::close_notify(&mut dtls.stream, up.info.peer, parts.now);
                        std::mem::take(&mut dtls.stream.get_mut().outbound)
                    }
                    false => Vec::new(),
                };
                for record in records {
                    self.queue_raw(slot, Bytes::from(record));
                }
            }
        }
        self.flush_upstream(slot);
        let mut up = self.upstreams.try_remove(slot)?;
        self.upstream_ready.retain(|&ready| ready != slot);
        self.upstream_dirty.retain(|&dirty| dirty != slot);
        up.upstream.count(UpstreamEvent::Closed);
        self.stats.closed(&up.info.listener);
        if let Some(registry) = self.registry.as_ref() {
            let _ = registry.deregister(&mut up.socket);
        }
        debug!(session = %up.info.id, upstream = up.upstream.name(), "udp upstream closed: {reason}");
        let (handler, info) = (&mut up.handler, &up.info);
        if catch_unwind(AssertUnwindSafe(|| handler.on_close(info, reason))).is_err() {
            error!(session = %info.id, "upstream handler panicked in on_close");
            LoopStats::add(&self.stats.handler_panics, 1);
        }
        Some((up.info.id, up.client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_queue_is_bounded_in_bytes_and_always_takes_one() {
        let mut queue = DatagramQueue::default();
        assert!(
            queue.push(Bytes::from(vec![0u8; 3000]), 1000),
            "one always fits"
        );
        assert!(
            !queue.push(Bytes::from_static(b"x"), 1000),
            "past the limit"
        );
        assert_eq!((queue.len(), queue.bytes()), (1, 3000));
        assert_eq!(queue.consume(1), 3000);
        assert!(queue.is_empty());
        for n in 0..4 {
            assert!(queue.push(Bytes::from(vec![n; 250]), 1000));
        }
        assert!(
            !queue.push(Bytes::from_static(b"y"), 1000),
            "1000 + 1 > 1000"
        );
        let front: Vec<u8> = queue.front(2).map(|d| d[0]).collect();
        assert_eq!(front, [0, 1], "oldest first, at most the batch");
        assert_eq!(queue.consume(3), 750);
        assert_eq!((queue.len(), queue.bytes()), (1, 250));
        assert_eq!(
            queue.consume(5),
            250,
            "consuming more than queued stops at empty"
        );
        assert!(
            queue.push(Bytes::new(), 0),
            "an empty datagram is a datagram"
        );
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn upstream_tokens_follow_the_relays_and_name_their_slot() {
        for slot in [0, 1, MAX_DATAGRAM_UPSTREAMS - 1] {
            let index = super::super::token_socket(upstream_token(slot)).unwrap();
            assert_eq!(index.checked_sub(UPSTREAM_BASE), Some(slot));
        }
        assert_eq!(
            super::super::token_socket(upstream_token(MAX_DATAGRAM_UPSTREAMS)),
            None
        );
    }

    #[test]
    fn icmp_errors_end_an_upstream_and_others_drop_one_datagram() {
        assert!(ends_upstream(io::ErrorKind::ConnectionRefused));
        assert!(ends_upstream(io::ErrorKind::HostUnreachable));
        assert!(!ends_upstream(io::ErrorKind::InvalidInput));
        assert!(!ends_upstream(io::ErrorKind::WouldBlock));
    }
}
