//! UDP and DTLS listeners on an event loop: the loop's datagram sockets, its datagram session
//! table (sessions keyed by peer address), and delivery of datagrams to and from services.
//!
//! Each event loop owns one socket per udp/dtls listener, all bound to the same port with
//! `SO_REUSEPORT`: the kernel spreads peers over the loops by a hash of the address pair, so a
//! peer always reaches the same loop and its session needs no lock. Sockets are read with
//! `recvmmsg` and written with `sendmmsg` in batches of `datagram_batch`.
//!
//! A session is created on a peer's first datagram (UDP) or on its first ClientHello carrying
//! a valid cookie (DTLS, see [`crate::dtls`]); it holds an admission ticket (so it counts
//! against `max_connections`) and places under the datagram caps
//! ([`crate::datagram_admission`]), and expires after `idle_timeout` without a datagram either
//! way. When a datagram cap (or `max_connections`) is full, the loop closes its longest-idle
//! session of that cap's scope ([`crate::idle_order`]) and admits the new peer. For a datagram
//! session one `on_data` is one datagram, and each `send` is one datagram.
//!
//! Hostile datagrams on a dtls port never reach OpenSSL unless the sans-IO pre-parser
//! ([`plexus_proto::dtls`]) accepts them: from a new peer only a plausible ClientHello goes to
//! `DTLSv1_listen`, and a session gets only well-formed records. The rest is dropped, counted
//! (`plexus_datagrams_dropped_total{reason="dtls_malformed"|"dtls_not_client_hello"}`) and
//! logged at most once a second; no other session notices (every OpenSSL call also runs with
//! a clean error queue, see [`crate::dtls`]). Well-formed application data that OpenSSL then
//! discards for an established session (a failed MAC or decryption, or a replay: OpenSSL says
//! nothing of either) is counted as `reason="dtls_bad_record"`, logged the same way, and does
//! not keep the session alive.
//!
//! Backpressure: replies wait in the socket's send queue. Past the outbound high watermark the
//! loop stops reading that socket (the kernel's receive buffer then absorbs or drops, which is
//! where UDP loses datagrams anyway) until the queue is below the low watermark; a datagram
//! that would push the queue past `outbound_limit` is dropped and counted.
//!
//! No panics from input: indexing, unchecked arithmetic and unwrap/expect are denied in this
//! module outside its tests (clippy), as in `plexus-proto`. Socket indexes and session keys
//! come from this module's own tables; one that no longer names an entry is ignored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use openssl::ssl::SslStream;
use plexus_proto::dtls::{
    check_records, parse_client_hello, records, ContentType, DtlsError as RecordError,
};
use plexus_proto::{deadline_after, Acl, TimerKey, TimerWheel};
use plexus_sys::dgram::{
    enable_gro, gso_runs, offload, send_batch_segmented, GsoRefusal, RecvBatch, MAX_UDP_PAYLOAD,
};
use plexus_sys::uring::{self, DgramId, Ring};
use slab::Slab;
use tracing::{debug, error, info, warn};

use crate::admission::{Admission, HandshakeSlot, RefusalReason, Ticket};
use crate::datagram_admission::{
    CapFull, DatagramCaps, DatagramPlace, DtlsHandshakePlace, ListenerCap,
};
use crate::dtls::{self, DatagramIo, DtlsContext, Progress};
use crate::idle_order::{IdleOrder, Scope};
use crate::log_throttle::LogThrottle;
use crate::loop_local::LoopLocals;
pub(crate) use crate::loop_timer::DatagramTimer;
use crate::loop_timer::{TimerEntry, TimerKind};
use crate::metrics::{LoopStats, Metrics};
use crate::outbound::OutboundQueue;
use crate::service::{Broadcast, CloseReason, ListenerInfo, Service, Session, SessionHandler};
use crate::service::{SessionExtras, TimerRequest};
use crate::service::{SessionId, SessionInfo};
use crate::session::SessionLimits;
use crate::worker::WorkQueue;

mod upstream;
use upstream::{DatagramUpstream, MAX_DATAGRAM_UPSTREAMS, UPSTREAM_BASE};

/// Receive slot per datagram: anything up to the largest UDP payload arrives whole.
const RECV_SLOT: usize = 64 * 1024;
/// Batched receives per socket per turn before other sockets and sessions get their turn.
const RECV_BATCHES_PER_TURN: usize = 8;
/// Most datagram sockets one loop may own (the size of the token range they use).
pub(crate) const MAX_DATAGRAM_SOCKETS: usize = 4096;
/// io_uring: sends in flight per socket; the rest of its queue waits (as after `EAGAIN`).
const RING_SENDS_PER_SOCKET: usize = 128;

/// The token of datagram socket `index`: counting down from just below the waker's.
pub(crate) fn socket_token(index: usize) -> Token {
    // Indexes stay below 2 × MAX_DATAGRAM_SOCKETS, far from saturating.
    Token(usize::MAX.saturating_sub(1).saturating_sub(index))
}

/// The token of the upgrade relay of datagram socket `index`.
fn relay_token(index: usize) -> Token {
    socket_token(MAX_DATAGRAM_SOCKETS.saturating_add(index))
}

/// How many tokens below the waker's the datagram sockets, relays and upstreams take (the
/// tokens below these are the listeners', `event_loop/accept.rs`).
pub(crate) const TOKEN_SPAN: usize = UPSTREAM_BASE + MAX_DATAGRAM_UPSTREAMS;

/// The datagram socket a token names, if it is in the datagram range.
pub(crate) fn token_socket(token: Token) -> Option<usize> {
    let index = (usize::MAX - 1).checked_sub(token.0)?;
    // Indexes from MAX_DATAGRAM_SOCKETS on are the upgrade relays of the sockets, from
    // UPSTREAM_BASE on the connected sockets of datagram upstreams (`datagram/upstream.rs`).
    (token.0 != usize::MAX && index < TOKEN_SPAN).then_some(index)
}

/// What every loop needs to know about one udp/dtls listener.
#[derive(Clone)]
pub(crate) struct DatagramListener {
    pub(crate) info: Arc<ListenerInfo>,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) acl: Acl,
    pub(crate) admission: Arc<Admission>,
    /// The server-wide datagram-session caps.
    pub(crate) caps: Arc<DatagramCaps>,
    /// This listener's own cap (`max_sessions`), shared by its sockets on every loop.
    pub(crate) listener_cap: Arc<ListenerCap>,
    /// Present for dtls listeners.
    pub(crate) dtls: Option<DtlsContext>,
    pub(crate) batch: usize,
    /// `udp_offload`: GRO/GSO where the kernel has them (false: plain messages both ways).
    pub(crate) offload: bool,
}

/// One loop's socket of one listener.
struct DatagramSocket {
    socket: UdpSocket,
    local: SocketAddr,
    listener: DatagramListener,
    /// Sessions of this socket by peer address (values are keys of the session slab).
    peers: HashMap<SocketAddr, usize>,
    /// The shared "listen" SSL object of a dtls socket: no per-peer state before a cookie.
    listen: Option<SslStream<DatagramIo>>,
    /// Datagrams waiting for `sendmmsg`, and their bytes.
    pending: VecDeque<(SocketAddr, Bytes)>,
    pending_bytes: usize,
    /// An edge announced datagrams not yet read.
    readable: bool,
    write_blocked: bool,
    /// Not read while the send queue is above the high watermark.
    read_paused: bool,
    /// Runs of equal-size replies to one peer, of a size below this, go out as one
    /// `UDP_SEGMENT` message (GSO). 0 when the kernel has no GSO or refused it on this
    /// socket; lowered to a size the kernel refused (larger than the route's MTU allows).
    gso_below: usize,
    /// The socket's position among its listener's sockets (its name in an upgrade).
    ordinal: usize,
    /// Upgrade: the relay to (new process) or from (old process) the other process.
    relay: Option<Relay>,
    /// Old process after an upgrade: the new process reads this socket; this one only sends.
    retired: bool,
    /// io_uring backend: the socket is served by the loop's ring (a duplicate of its
    /// descriptor, held by the ring until its last operation completed), not by epoll.
    ring: Option<DgramId>,
}

/// The relay of one shared socket during an upgrade (see `crate::upgrade`).
struct Relay {
    socket: mio::net::UnixDatagram,
    /// New process: the peers the old process still serves (their datagrams go to it).
    claimed: HashSet<SocketAddr>,
    /// True in the new process (forwards), false in the old one (serves what arrives).
    forwards: bool,
    readable: bool,
}

/// Relay messages: a kind byte, then peers ([`ADDR_LEN`] bytes each) or one peer and a datagram.
const RELAY_CLAIM: u8 = b'C';
const RELAY_RELEASE: u8 = b'R';
const RELAY_DATA: u8 = b'D';
/// An encoded peer: family (4 or 6), 16 address bytes, port (big endian).
const ADDR_LEN: usize = 19;
/// Peers per claim message (a unix datagram of about 57 KiB).
const CLAIMS_PER_MESSAGE: usize = 3000;
/// Relay messages read per event, so forwarded traffic cannot starve the loop.
const RELAY_READS_PER_TURN: usize = 256;

fn encode_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let mut ip = [0u8; 16];
    let family = match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            ip[..4].copy_from_slice(&v4.octets());
            4
        }
        std::net::IpAddr::V6(v6) => {
            ip.copy_from_slice(&v6.octets());
            6
        }
    };
    out.push(family);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn decode_addr(bytes: &[u8]) -> Option<SocketAddr> {
    let bytes: &[u8; ADDR_LEN] = bytes.get(..ADDR_LEN)?.try_into().ok()?;
    let port = u16::from_be_bytes([bytes[17], bytes[18]]);
    let ip: std::net::IpAddr = match bytes[0] {
        4 => std::net::Ipv4Addr::new(bytes[1], bytes[2], bytes[3], bytes[4]).into(),
        6 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[1..17]).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A peer of a datagram socket.
struct DatagramSession {
    info: SessionInfo,
    socket: usize,
    handler: Box<dyn SessionHandler>,
    outbound: OutboundQueue,
    closing: Option<CloseReason>,
    work: WorkQueue,
    last_activity: Instant,
    idle_timer: Option<TimerKey>,
    dtls: Option<Box<DtlsPeer>>,
    /// The handler's timer and its pending change (allocated by the sessions that use one).
    extras: Option<Box<SessionExtras>>,
    /// The handler asked for `on_drain` once the socket's send queue is down to the low
    /// watermark.
    drain_wanted: bool,
    _ticket: Ticket,
    _place: DatagramPlace,
}

/// The DTLS state of a session.
struct DtlsPeer {
    stream: SslStream<DatagramIo>,
    /// Held until the handshake completes: counts against `max_handshakes` and the dtls share
    /// of it.
    handshake: Option<(HandshakeSlot, DtlsHandshakePlace)>,
    handshake_timer: Option<TimerKey>,
    retransmit_timer: Option<TimerKey>,
    /// Opened once the handshake completes.
    pending_service: Option<Arc<dyn Service>>,
    close_notify_sent: bool,
}

impl DtlsPeer {
    fn handshaking(&self) -> bool {
        self.pending_service.is_some()
    }
}

/// The handler a session has until its service opens (it receives no events).
struct Opening;

impl SessionHandler for Opening {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}

/// The loop's parts a datagram operation touches besides the endpoint itself.
pub(crate) struct LoopParts<'a> {
    pub(crate) now: Instant,
    pub(crate) locals: &'a mut LoopLocals,
    pub(crate) timers: &'a mut TimerWheel<TimerEntry>,
    pub(crate) broadcasts: &'a mut Vec<Broadcast>,
    pub(crate) metrics: Option<&'a Metrics>,
}

/// One event loop's datagram sockets and sessions.
pub(crate) struct DatagramEndpoint {
    sockets: Vec<DatagramSocket>,
    sessions: Slab<DatagramSession>,
    recv: Option<RecvBatch>,
    /// Where DTLS plaintext lands.
    plain: Box<[u8]>,
    limits: SessionLimits,
    stats: Arc<LoopStats>,
    refusals: LogThrottle,
    failures: LogThrottle,
    garbage: LogThrottle,
    reclaims: LogThrottle,
    /// Activity order of the sessions, for reclaiming the longest-idle one.
    idle: IdleOrder,
    draining: bool,
    /// New process of an upgrade: the sockets are not read until the old one has said which
    /// peers are still its own (`resume`).
    held: bool,
    /// Old process of an upgrade: its sessions were kept for the drain (`release`).
    released: bool,
    /// Sessions that asked for `on_drain` (key and id), told once their socket's send queue
    /// is down to the low watermark. At most one entry per session (`drain_wanted`).
    drain_waiters: Vec<(usize, SessionId)>,
    /// Connected UDP sockets to upstreams, opened by this loop's datagram sessions.
    upstreams: Slab<DatagramUpstream>,
    /// Upstreams left with datagrams to read (the per-turn budget) or a failure to report.
    upstream_ready: Vec<usize>,
    /// Upstreams whose queue waits for a flush.
    upstream_dirty: Vec<usize>,
    /// The loop's poll registry (for upstream sockets), cloned when the first socket is added.
    registry: Option<Registry>,
    /// Upstream sockets that found no descriptor (logged at most once a second).
    descriptor_shortages: LogThrottle,
    /// io_uring: a socket could not join the ring; the sockets stay on epoll.
    ring_refused: bool,
}

impl DatagramEndpoint {
    pub(crate) fn new(limits: SessionLimits, stats: Arc<LoopStats>) -> Self {
        DatagramEndpoint {
            sockets: Vec::new(),
            sessions: Slab::new(),
            recv: None,
            plain: Box::new([]),
            limits,
            stats,
            refusals: LogThrottle::new(),
            failures: LogThrottle::new(),
            garbage: LogThrottle::new(),
            reclaims: LogThrottle::new(),
            idle: IdleOrder::default(),
            draining: false,
            held: false,
            released: false,
            drain_waiters: Vec::new(),
            upstreams: Slab::new(),
            upstream_ready: Vec::new(),
            upstream_dirty: Vec::new(),
            registry: None,
            descriptor_shortages: LogThrottle::new(),
            ring_refused: false,
        }
    }

    /// Takes a bound socket of `listener` and registers it with the loop's poll.
    pub(crate) fn add_socket(
        &mut self,
        registry: &Registry,
        socket: std::net::UdpSocket,
        listener: DatagramListener,
        ordinal: usize,
        relay: Option<std::os::unix::net::UnixDatagram>,
    ) -> io::Result<()> {
        let index = self.sockets.len();
        if index >= MAX_DATAGRAM_SOCKETS {
            return Err(io::Error::other(
                "too many udp/dtls listeners for one event loop",
            ));
        }
        socket.set_nonblocking(true)?;
        if self.registry.is_none() {
            self.registry = Some(registry.try_clone()?);
        }
        let local = socket.local_addr()?;
        let gso_below = if udp_offload(&socket, &listener) {
            MAX_UDP_PAYLOAD
        } else {
            0
        };
        let mut socket = UdpSocket::from_std(socket);
        registry.register(
            &mut socket,
            socket_token(index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let listen = match &listener.dtls {
            Some(context) => Some(context.stream().map_err(io::Error::other)?),
            None => None,
        };
        if listener.dtls.is_some() && self.plain.is_empty() {
            self.plain = vec![0; RECV_SLOT].into_boxed_slice();
        }
        let relay = match relay {
            Some(relay) => {
                relay.set_nonblocking(true)?;
                let mut relay = mio::net::UnixDatagram::from_std(relay);
                registry.register(&mut relay, relay_token(index), Interest::READABLE)?;
                // Nothing is read before the old process's claims are in.
                self.held = true;
                Some(Relay {
                    socket: relay,
                    claimed: HashSet::new(),
                    forwards: true,
                    readable: true,
                })
            }
            None => None,
        };
        let batch = listener.batch.max(1);
        if self
            .recv
            .as_ref()
            .is_none_or(|recv| recv.capacity() < batch)
        {
            self.recv = Some(RecvBatch::new(batch, RECV_SLOT));
        }
        self.sockets.push(DatagramSocket {
            socket,
            local,
            listener,
            peers: HashMap::new(),
            listen,
            pending: VecDeque::new(),
            pending_bytes: 0,
            // Datagrams may have arrived before registration.
            readable: true,
            write_blocked: false,
            read_paused: false,
            gso_below,
            ordinal,
            relay,
            retired: false,
            ring: None,
        });
        Ok(())
    }

    /// Whether a socket still has datagrams to read this turn (the loop must not block).
    pub(crate) fn has_ready(&self) -> bool {
        self.sockets.iter().any(|socket| {
            (socket.readable && !socket.read_paused && !socket.retired && !self.held)
                || socket.relay.as_ref().is_some_and(|relay| relay.readable)
        }) || self.drain_due()
            || !self.upstream_ready.is_empty()
    }

    /// Datagram sessions open on this loop.
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A readiness event for socket `index`.
    pub(crate) fn event(
        &mut self,
        index: usize,
        readable: bool,
        writable: bool,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        if let Some(slot) = index.checked_sub(UPSTREAM_BASE) {
            self.upstream_event(slot, readable, writable, now, parts);
            return;
        }
        if let Some(index) = index.checked_sub(MAX_DATAGRAM_SOCKETS) {
            if let Some(relay) = self.sockets.get_mut(index).and_then(|s| s.relay.as_mut()) {
                relay.readable |= readable;
            }
            self.read_relay(index, now, parts);
            return;
        }
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        socket.readable |= readable;
        if writable {
            socket.write_blocked = false;
        }
        self.serve(index, now, parts);
    }

    /// Serves every socket with unread datagrams (after the loop's events of a turn).
    pub(crate) fn serve_ready(&mut self, now: Instant, parts: &mut LoopParts<'_>) {
        self.deliver_drains(now, parts);
        self.serve_upstreams(now, parts);
        for index in 0..self.sockets.len() {
            let relay_ready =
                |socket: &DatagramSocket| socket.relay.as_ref().is_some_and(|r| r.readable);
            if self.sockets.get(index).is_some_and(relay_ready) {
                self.read_relay(index, now, parts);
            }
            let ready = |socket: &DatagramSocket| socket.readable && !socket.read_paused;
            if self.sockets.get(index).is_some_and(ready) {
                self.serve(index, now, parts);
            }
        }
    }

    fn serve(&mut self, index: usize, now: Instant, parts: &mut LoopParts<'_>) {
        // A socket on the ring is read by its multishot receive (`ring_completion`).
        let off_epoll = |s: &DatagramSocket| s.retired || s.ring.is_some();
        if self.held || self.sockets.get(index).is_none_or(off_epoll) {
            return;
        }
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        for _ in 0..RECV_BATCHES_PER_TURN {
            let Some(socket) = self.sockets.get_mut(index) else {
                break;
            };
            if !socket.readable || socket.read_paused {
                break;
            }
            if socket.pending_bytes > self.limits.high_watermark {
                socket.read_paused = true;
                LoopStats::add(&self.stats.read_pauses, 1);
                break;
            }
            let count = match recv.recv(&socket.socket) {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    socket.readable = false;
                    break;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // ICMP errors queued on the socket (e.g. port unreachable) surface here;
                    // they concern one earlier send, not the socket.
                    debug!(
                        listener = socket.listener.info.name.as_ref(),
                        "udp receive: {err}"
                    );
                    continue;
                }
            };
            LoopStats::add(&self.stats.datagrams_in, count as u64);
            for position in 0..count {
                let received = recv.get(position);
                let Some(peer) = received.source else {
                    continue;
                };
                let Some(socket) = self.sockets.get(index) else {
                    continue;
                };
                self.stats
                    .received(&socket.listener.info, received.data.len());
                if received.truncated {
                    LoopStats::add(&self.stats.datagrams_dropped_truncated, 1);
                    continue;
                }
                self.receive(index, peer, received.data, now, parts);
            }
            self.flush(index);
            // What this batch's sessions sent to their upstreams: one sendmmsg each.
            self.flush_upstreams();
        }
        self.recv = Some(recv);
        self.flush(index);
    }

    fn receive(
        &mut self,
        index: usize,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        if let Some(relay) = socket.relay.as_mut().filter(|relay| relay.forwards) {
            if relay.claimed.contains(&peer) {
                self.forward(index, peer, data);
                return;
            }
        }
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        if let Some(&key) = socket.peers.get(&peer) {
            let Some(session) = self.sessions.get_mut(key) else {
                return;
            };
            if let Some(dtls) = session.dtls.as_ref() {
                // Only well-formed records reach the session's OpenSSL object; the rest is
                // not activity either (it must not keep the session alive).
                if let Err(why) = check_records(data) {
                    self.drop_garbage(peer, why, now);
                    return;
                }
                if dtls.handshaking() || !only_application_data(data) {
                    session.last_activity = now;
                    self.idle.touch(key);
                    self.dtls_input(key, data, now, parts);
                    return;
                }
                // Application data for an established session: activity only once OpenSSL
                // accepts it. It discards records that fail the MAC (forged, corrupted, from
                // another session) or replay old ones without a word: counted here.
                let id = session.info.id;
                if self.dtls_input(key, data, now, parts) {
                    if let Some(session) = self.sessions.get_mut(key).filter(|s| s.info.id == id) {
                        session.last_activity = now;
                        self.idle.touch(key);
                    }
                } else {
                    LoopStats::add(&self.stats.dtls_bad_record_dropped, 1);
                    if let Some(also) = self.garbage.allow(now) {
                        info!("dtls record dropped peer={peer}: an established session's record failed decryption or was a replay (+{also} more dropped in the last second)");
                    }
                }
            } else {
                session.last_activity = now;
                self.idle.touch(key);
                self.callback(key, parts, |handler, session| {
                    handler.on_data(session, data)
                });
                self.after_callback(key, now, parts);
            }
            return;
        }
        if self.draining {
            self.refuse(peer, "server draining");
            return;
        }
        match socket.listen.as_mut() {
            None => self.open_udp(index, peer, data, now, parts),
            // A source the ACLs refuse gets no cookie either.
            Some(_)
                if !socket
                    .listener
                    .admission
                    .permits(&socket.listener.acl, peer.ip()) =>
            {
                socket.listener.info.stats.refused(RefusalReason::Acl);
                self.refuse(peer, RefusalReason::Acl.as_str());
            }
            Some(_) if parse_client_hello(data).is_err() => {
                // Decided on the bytes alone: no OpenSSL call for what cannot be a ClientHello.
                if let Err(why) = parse_client_hello(data) {
                    self.drop_garbage(peer, why, now);
                }
            }
            Some(listen) => {
                listen.get_mut().reset();
                listen.get_mut().put(data);
                let (outcome, errors) = dtls::listen(listen, peer, now);
                let replies = std::mem::take(&mut listen.get_mut().outbound);
                match outcome {
                    plexus_sys::dtls::ListenOutcome::Verified => {
                        LoopStats::add(&self.stats.dtls_cookies_verified, 1);
                        self.open_dtls(index, peer, now, parts);
                    }
                    _ if !replies.is_empty() => {
                        LoopStats::add(&self.stats.dtls_cookies_sent, 1);
                        for reply in replies {
                            self.queue(index, peer, Bytes::from(reply));
                        }
                    }
                    _ => {
                        LoopStats::add(&self.stats.dtls_garbage_dropped, 1);
                        if let Some(also) = self.garbage.allow(now) {
                            info!("dtls datagram dropped peer={peer}: DTLSv1_listen: {errors} (+{also} more dropped in the last second)");
                        }
                    }
                }
            }
        }
    }

    /// A datagram on a dtls port the pre-parser refused: dropped, counted, logged (throttled).
    fn drop_garbage(&mut self, peer: SocketAddr, why: RecordError, now: Instant) {
        let counter = match why.is_malformed_record() {
            true => &self.stats.dtls_malformed_dropped,
            false => &self.stats.dtls_not_hello_dropped,
        };
        LoopStats::add(counter, 1);
        if let Some(also) = self.garbage.allow(now) {
            info!("dtls datagram dropped peer={peer}: {why} (+{also} more dropped in the last second)");
        }
    }

    fn refuse(&mut self, peer: SocketAddr, why: &str) {
        LoopStats::add(&self.stats.datagrams_dropped_refused, 1);
        if let Some(also) = self.refusals.allow(Instant::now()) {
            info!("datagram refused peer={peer}: {why} (+{also} more refused in the last second)");
        }
    }

    /// Admits `peer` on socket `index`: the ACLs, then the datagram caps and
    /// `max_connections`. A full cap reclaims the longest-idle session of its scope on this
    /// loop (per IP: the IP's; `max_sessions`: the listener's; `max_datagram_sessions` and
    /// `max_connections`: any) and tries again; with nothing to reclaim the datagram is dropped.
    fn admit(
        &mut self,
        index: usize,
        peer: SocketAddr,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) -> Option<(Ticket, DatagramPlace)> {
        let ip = peer.ip().to_canonical();
        let listener = &self.sockets.get(index)?.listener;
        if !listener.admission.permits(&listener.acl, ip) {
            listener.info.stats.refused(RefusalReason::Acl);
            self.refuse(peer, RefusalReason::Acl.as_str());
            return None;
        }
        // Each round frees one place, and each of the four caps needs at most one unless other
        // loops race for the same places: five attempts, four reclaims at most.
        for attempt in 0..5 {
            let listener = &self.sockets.get(index)?.listener;
            let loop_full = self.sessions.len() >= listener.caps.per_loop();
            let full = match listener.caps.take(&listener.listener_cap, ip) {
                // This loop's share of max_datagram_sessions: reclaim here, on this loop.
                Ok(_) if loop_full => Some(CapFull::Sessions),
                Ok(place) => match listener.admission.admit_datagram(&listener.acl, ip) {
                    Ok(ticket) => {
                        listener.info.stats.accepted();
                        return Some((ticket, place));
                    }
                    Err(RefusalReason::MaxConnections) => None,
                    Err(reason) => {
                        listener.info.stats.refused(reason);
                        self.refuse(peer, reason.as_str());
                        return None;
                    }
                },
                Err(full) => Some(full),
            };
            let (scope, counter, cap) = match full {
                Some(CapFull::PerIp) => (
                    Scope::Ip(ip),
                    &self.stats.reclaimed_for_per_ip,
                    CapFull::PerIp.as_str(),
                ),
                Some(CapFull::Listener) => (
                    Scope::Socket(index),
                    &self.stats.reclaimed_for_max_sessions,
                    CapFull::Listener.as_str(),
                ),
                Some(CapFull::Sessions) => (
                    Scope::Loop,
                    &self.stats.reclaimed_for_max_datagram_sessions,
                    CapFull::Sessions.as_str(),
                ),
                None => (
                    Scope::Loop,
                    &self.stats.reclaimed_for_max_connections,
                    RefusalReason::MaxConnections.as_str(),
                ),
            };
            if attempt == 4 {
                break;
            }
            let victim = match scope {
                Scope::Loop => self.cheapest_to_reclaim(),
                scope => self.idle.oldest(scope),
            };
            let Some(victim) = victim else {
                LoopStats::add(&self.stats.datagrams_dropped_session_cap, 1);
                if let Some(also) = self.refusals.allow(now) {
                    info!("datagram refused peer={peer}: {cap} full and no session of this loop to reclaim (+{also} more refused in the last second)");
                }
                return None;
            };
            LoopStats::add(counter, 1);
            if let Some(also) = self.reclaims.allow(now) {
                let old = self.sessions.get(victim).map(|s| s.info.peer);
                let old = old.map_or_else(String::new, |old| old.to_string());
                info!("datagram session reclaimed peer={old} for peer={peer}: {cap} full (+{also} more reclaimed in the last second)");
            }
            self.close(victim, CloseReason::Reclaimed, parts);
        }
        LoopStats::add(&self.stats.datagrams_dropped_session_cap, 1);
        None
    }

    /// The session a loop-wide cap reclaims: the longest-idle plain udp session, since its
    /// peer loses nothing (its next datagram opens a new session); only a loop without udp
    /// sessions gives up its longest-idle dtls session, whose peer must handshake again.
    fn cheapest_to_reclaim(&self) -> Option<usize> {
        let udp_oldest = (self.sockets.iter().enumerate())
            .filter(|(_, socket)| socket.listener.dtls.is_none())
            .filter_map(|(index, _)| self.idle.oldest(Scope::Socket(index)))
            .min_by_key(|&key| self.sessions.get(key).map(|s| s.last_activity));
        udp_oldest.or_else(|| self.idle.oldest(Scope::Loop))
    }

    /// Inserts a session for `peer` on socket `index` and arms its idle timer.
    fn insert(
        &mut self,
        index: usize,
        peer: SocketAddr,
        (ticket, place): (Ticket, DatagramPlace),
        dtls: Option<Box<DtlsPeer>>,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) -> Option<usize> {
        let key = self.sessions.vacant_key();
        let socket = self.sockets.get_mut(index)?;
        let id = SessionId::next();
        let idle_timer = parts.timers.insert(
            deadline_after(now, self.limits.idle_timeout),
            timer_entry(key, id, DatagramTimer::Idle),
        );
        let is_dtls = dtls.is_some();
        self.sessions.insert(DatagramSession {
            info: SessionInfo {
                id,
                peer,
                local: socket.local,
                listener: Arc::clone(&socket.listener.info),
            },
            socket: index,
            handler: Box::new(Opening),
            outbound: OutboundQueue::datagrams(),
            closing: None,
            work: WorkQueue::default(),
            last_activity: now,
            idle_timer: Some(idle_timer),
            dtls,
            extras: None,
            drain_wanted: false,
            _ticket: ticket,
            _place: place,
        });
        socket.peers.insert(peer, key);
        self.idle.insert(key, index, peer.ip().to_canonical());
        self.stats.opened(&socket.listener.info);
        let open = match is_dtls {
            true => &self.stats.dtls_sessions_open,
            false => &self.stats.udp_sessions_open,
        };
        LoopStats::add(open, 1);
        Some(key)
    }

    fn open_udp(
        &mut self,
        index: usize,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        let Some(admitted) = self.admit(index, peer, now, parts) else {
            return;
        };
        let Some(socket) = self.sockets.get(index) else {
            return;
        };
        let service = Arc::clone(&socket.listener.service);
        let Some(key) = self.insert(index, peer, admitted, None, now, parts) else {
            return;
        };
        self.callback(key, parts, |handler, session| {
            *handler = service.open(session)
        });
        if self.sessions.get(key).is_some_and(|s| s.closing.is_none()) {
            self.callback(key, parts, |handler, session| {
                handler.on_data(session, data)
            });
        }
        self.after_callback(key, now, parts);
    }

    /// A ClientHello came back with a valid cookie: the listen object holds it and becomes
    /// this peer's; the socket gets a fresh listen object.
    fn open_dtls(
        &mut self,
        index: usize,
        peer: SocketAddr,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        // The handshake places first: a refusal here must not have reclaimed a session.
        // DTLS handshakes may hold at most their share of max_handshakes, so datagrams alone
        // can never take every handshake slot tls clients need.
        let Some(socket) = self.sockets.get(index) else {
            return;
        };
        let listener = &socket.listener;
        let Some(share) = listener.caps.reserve_handshake() else {
            listener
                .admission
                .record_refusal(RefusalReason::HandshakeCapacity);
            self.refuse(
                peer,
                "handshake_capacity (the dtls share of max_handshakes)",
            );
            return;
        };
        let slot = match listener.admission.reserve_handshake(Some(peer.ip())) {
            Ok(slot) => slot,
            Err(reason) => {
                listener.info.stats.refused(reason);
                self.refuse(peer, reason.as_str());
                return;
            }
        };
        let Some(admitted) = self.admit(index, peer, now, parts) else {
            return;
        };
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        let listener = &socket.listener;
        let Some(context) = listener.dtls.as_ref() else {
            return;
        };
        let fresh = match context.stream() {
            Ok(fresh) => fresh,
            Err(err) => {
                error!("dtls: cannot create an SSL object: {err}");
                return;
            }
        };
        let service = Arc::clone(&listener.service);
        let Some(listen) = socket.listen.as_mut() else {
            return;
        };
        let stream = std::mem::replace(listen, fresh);
        let peer_state = Box::new(DtlsPeer {
            stream,
            handshake: Some((slot, share)),
            handshake_timer: None,
            retransmit_timer: None,
            pending_service: Some(service),
            close_notify_sent: false,
        });
        let Some(key) = self.insert(index, peer, admitted, Some(peer_state), now, parts) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let timer = parts.timers.insert(
            deadline_after(now, self.limits.handshake_timeout),
            timer_entry(key, session.info.id, DatagramTimer::Handshake),
        );
        if let Some(dtls) = session.dtls.as_mut() {
            dtls.handshake_timer = Some(timer);
        }
        // The buffered ClientHello: OpenSSL answers with the server's first flight.
        let _ = self.dtls_drive(key, now, parts);
    }

    /// Gives `data` to session `key`'s OpenSSL object; true if OpenSSL made anything of it
    /// (see [`Self::dtls_drive`]).
    fn dtls_input(
        &mut self,
        key: usize,
        data: &[u8],
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) -> bool {
        let Some(session) = self.sessions.get_mut(key) else {
            return false;
        };
        if let Some(dtls) = session.dtls.as_mut() {
            dtls.stream.get_mut().put(data);
        }
        self.dtls_drive(key, now, parts)
    }

    /// Lets OpenSSL process what arrived: the handshake, then application datagrams; sends
    /// what it wrote and re-arms its retransmission timer. Returns whether the input was of
    /// use: a handshake step, plaintext for the service, something OpenSSL wrote, or the
    /// session's end. False for an established session when OpenSSL silently discarded the
    /// datagram (a record that failed decryption or the MAC, or a replay).
    fn dtls_drive(&mut self, key: usize, now: Instant, parts: &mut LoopParts<'_>) -> bool {
        let Some(session) = self.sessions.get_mut(key) else {
            return false;
        };
        let Some(dtls) = session.dtls.as_mut() else {
            return false;
        };
        let mut used = dtls.handshaking();
        let peer = session.info.peer;
        if dtls.handshaking() {
            match dtls::handshake(&mut dtls.stream, peer, now) {
                Progress::Waiting => {}
                Progress::Established => {
                    dtls.handshake = None;
                    if let Some(timer) = dtls.handshake_timer.take() {
                        parts.timers.cancel(timer);
                    }
                    LoopStats::add(&self.stats.handshakes_ok, 1);
                    debug!(session = %session.info.id, peer = %session.info.peer, "dtls handshake complete");
                    if let Some(service) = dtls.pending_service.take() {
                        self.callback(key, parts, |handler, session| {
                            *handler = service.open(session)
                        });
                        self.after_callback(key, now, parts);
                    }
                }
                Progress::Closed => session.closing = Some(CloseReason::PeerClosed),
                Progress::Failed(why) => {
                    self.dtls_failed(key, &why, parts);
                    return true;
                }
            }
        }
        while let Some(session) = self.sessions.get_mut(key) {
            let Some(dtls) = session.dtls.as_mut() else {
                return true;
            };
            if dtls.handshaking() || session.closing.is_some() {
                break;
            }
            match dtls::read(&mut dtls.stream, &mut self.plain, peer, now) {
                Ok(n) => {
                    used = true;
                    let plain = std::mem::take(&mut self.plain);
                    self.callback(key, parts, |handler, session| {
                        handler.on_data(session, plain.get(..n).unwrap_or_default())
                    });
                    self.plain = plain;
                    self.after_callback(key, now, parts);
                }
                Err(Progress::Closed) => {
                    used = true;
                    session.closing = Some(CloseReason::PeerClosed);
                }
                Err(Progress::Failed(why)) => {
                    self.dtls_failed(key, &why, parts);
                    return true;
                }
                Err(_) => break,
            }
        }
        let Some(session) = self.sessions.get(key) else {
            return true;
        };
        used |= session.closing.is_some()
            || session
                .dtls
                .as_ref()
                .is_some_and(|dtls| !dtls.stream.get_ref().outbound.is_empty());
        self.dtls_output(key, now, parts);
        if let Some(reason) = self.sessions.get(key).and_then(|s| s.closing.clone()) {
            self.close(key, reason, parts);
        }
        used
    }

    /// Queues the datagrams OpenSSL wrote for `key` and re-arms the retransmission timer.
    fn dtls_output(&mut self, key: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let (peer, index, id) = (session.info.peer, session.socket, session.info.id);
        let Some(dtls) = session.dtls.as_mut() else {
            return;
        };
        let written = std::mem::take(&mut dtls.stream.get_mut().outbound);
        if !dtls.handshaking() {
            // An established session between datagrams holds no record buffers (~34 KiB).
            dtls::free_buffers(&dtls.stream, peer, now);
        }
        if let Some(timer) = dtls.retransmit_timer.take() {
            parts.timers.cancel(timer);
        }
        if let Some(wait) = dtls::retransmit_after(&dtls.stream, peer, now) {
            dtls.retransmit_timer = Some(parts.timers.insert(
                deadline_after(now, wait),
                timer_entry(key, id, DatagramTimer::Retransmit),
            ));
        }
        if !written.is_empty() {
            session.last_activity = now;
            self.idle.touch(key);
        }
        for datagram in written {
            self.queue(index, peer, Bytes::from(datagram));
        }
    }

    fn dtls_failed(&mut self, key: usize, why: &str, parts: &mut LoopParts<'_>) {
        if let Some(also) = self.failures.allow(Instant::now()) {
            let peer = self.sessions.get(key).map(|s| s.info.peer);
            let peer = peer.map_or_else(String::new, |peer| peer.to_string());
            info!("dtls session failed peer={peer}: {why} (+{also} more in the last second)");
        }
        // Failures close without close_notify (OpenSSL already queued its alert).
        self.close(key, CloseReason::Io(io::ErrorKind::InvalidData), parts);
    }

    /// Calls into the service with the session's handle; a panic closes this session only.
    fn callback(
        &mut self,
        key: usize,
        parts: &mut LoopParts<'_>,
        call: impl FnOnce(&mut Box<dyn SessionHandler>, &mut Session<'_>),
    ) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let DatagramSession {
            info,
            handler,
            outbound,
            closing,
            work,
            extras,
            drain_wanted,
            ..
        } = session;
        // A TLS upgrade request (a stream feature) lands in `extras` and is dropped by
        // `after_callback`; timers and drain requests are applied there.
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
            error!(session = %info.id, peer = %info.peer, "service handler panicked; closing this session only");
            LoopStats::add(&self.stats.handler_panics, 1);
            *closing = Some(CloseReason::Panic);
        }
    }

    /// Moves what the service sent to the socket (encrypting for DTLS), then closes the
    /// session if the service asked to.
    fn after_callback(&mut self, key: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if !session.work.is_idle() {
            error!(
                session = %session.info.id,
                "spawn_blocking is not available on udp/dtls sessions in this version; closing"
            );
            session.closing = Some(CloseReason::WorkOverflow);
        }
        let (peer, index, session_id) = (session.info.peer, session.socket, session.info.id);
        let mut datagrams = Vec::new();
        while let Some(datagram) = session.outbound.pop_datagram() {
            datagrams.push(datagram);
        }
        if !datagrams.is_empty() {
            session.last_activity = now;
            self.idle.touch(key);
        }
        match session.dtls.as_mut() {
            None => {
                for datagram in datagrams {
                    self.queue(index, peer, datagram);
                }
            }
            Some(dtls) => {
                for datagram in datagrams {
                    if let Err(why) = dtls::write(&mut dtls.stream, &datagram, peer, now) {
                        debug!(session = %session.info.id, "dtls write failed: {why}");
                        LoopStats::add(&self.stats.datagrams_dropped_send_error, 1);
                    }
                }
                let written = std::mem::take(&mut dtls.stream.get_mut().outbound);
                if !dtls.handshaking() {
                    dtls::free_buffers(&dtls.stream, peer, now);
                }
                for datagram in written {
                    self.queue(index, peer, Bytes::from(datagram));
                }
            }
        }
        self.apply_handler_requests(key, now, parts);
        let id = session_id;
        self.apply_link_ops(key, now, parts);
        let closing = (self.sessions.get(key))
            .filter(|s| s.info.id == id)
            .and_then(|s| s.closing.clone());
        if let Some(reason) = closing {
            self.close(key, reason, parts);
        }
    }

    /// Applies what the handler asked for in its callback: its timer set or cancelled, a
    /// drain notification (queued until the socket's send queue has room). A TLS upgrade
    /// request is a stream feature and is dropped.
    fn apply_handler_requests(&mut self, key: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if std::mem::take(&mut session.drain_wanted) && session.closing.is_none() {
            self.drain_waiters.push((key, session.info.id));
        }
        let id = session.info.id;
        let Some(extras) = session.extras.as_deref_mut() else {
            return;
        };
        if extras.tls_upgrade.take().is_some() {
            debug!(session = %id, "start_tls is not available on udp/dtls sessions; ignored");
        }
        let request = std::mem::take(&mut extras.timer_request);
        if request == TimerRequest::Keep {
            return;
        }
        if let Some(timer) = extras.handler_timer.take() {
            parts.timers.cancel(timer);
        }
        if let TimerRequest::Set(after) = request {
            let due = deadline_after(now, after);
            let entry = timer_entry(key, id, DatagramTimer::Handler);
            extras.handler_timer = Some(parts.timers.insert(due, entry));
        }
    }

    /// Whether a session waits for `on_drain` and its socket's queue is down to the low
    /// watermark (the loop must not block while one does).
    fn drain_due(&self) -> bool {
        self.drain_waiters.iter().any(|(key, _)| {
            self.sessions
                .get(*key)
                .and_then(|s| self.sockets.get(s.socket))
                .is_some_and(|socket| socket.pending_bytes <= self.limits.low_watermark)
        })
    }

    /// Calls `on_drain` for the sessions that asked and whose socket has room; the others
    /// keep waiting. A handler that asks again in `on_drain` is told on a later turn.
    fn deliver_drains(&mut self, now: Instant, parts: &mut LoopParts<'_>) {
        if self.drain_waiters.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.drain_waiters);
        for (key, id) in waiters {
            let Some(session) = self.sessions.get(key).filter(|s| s.info.id == id) else {
                continue;
            };
            let backlogged = self
                .sockets
                .get(session.socket)
                .is_some_and(|socket| socket.pending_bytes > self.limits.low_watermark);
            if backlogged {
                self.drain_waiters.push((key, id));
                continue;
            }
            self.callback(key, parts, |handler, handle| handler.on_drain(handle));
            self.after_callback(key, now, parts);
        }
    }

    /// Adds a datagram to socket `index`'s send queue (dropped and counted when full).
    fn queue(&mut self, index: usize, peer: SocketAddr, datagram: Bytes) {
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        let queued = socket.pending_bytes.checked_add(datagram.len());
        let Some(queued) = queued.filter(|&queued| queued <= self.limits.outbound_limit) else {
            LoopStats::add(&self.stats.datagrams_dropped_overflow, 1);
            return;
        };
        socket.pending_bytes = queued;
        socket.pending.push_back((peer, datagram));
    }

    /// Sends socket `index`'s queue with `sendmmsg` until it is empty or the socket is full.
    fn flush(&mut self, index: usize) {
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        if socket.ring.is_some() {
            // Handed to the ring by `sync_ring`, before the loop waits.
            return;
        }
        let batch = socket.listener.batch.max(1);
        while !socket.pending.is_empty() && !socket.write_blocked {
            let (front, back) = socket.pending.as_slices();
            let slice = if front.is_empty() { back } else { front };
            let messages: Vec<(SocketAddr, &[u8])> = slice
                .iter()
                .take(batch)
                .map(|(peer, data)| (*peer, data.as_ref()))
                .collect();
            // With `gso_below` 0 no run forms: plain `sendmmsg`, one message per datagram.
            match send_batch_segmented(&socket.socket, &messages, socket.gso_below) {
                Ok(sent) => {
                    if let Some(refusal) = sent.refused {
                        socket.gso_below = match refusal {
                            GsoRefusal::SegmentTooLarge(size) => size.min(socket.gso_below),
                            GsoRefusal::Unsupported => 0,
                        };
                        log_gso_refusal(socket.listener.info.name.as_ref(), refusal);
                    }
                    // `sendmmsg` reports at most the messages it was given.
                    let sent = sent.datagrams.min(messages.len());
                    let bytes: usize = messages.iter().take(sent).map(|(_, d)| d.len()).sum();
                    socket.pending.drain(..sent);
                    socket.pending_bytes = socket.pending_bytes.saturating_sub(bytes);
                    LoopStats::add(&self.stats.datagrams_out, sent as u64);
                    self.stats.sent(&socket.listener.info, bytes);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => socket.write_blocked = true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    // The first datagram cannot be sent (too large, unreachable peer…):
                    // drop it, keep the others.
                    if let Some((peer, data)) = socket.pending.pop_front() {
                        debug!(peer = %peer, "udp send: {err}");
                        socket.pending_bytes = socket.pending_bytes.saturating_sub(data.len());
                    }
                    LoopStats::add(&self.stats.datagrams_dropped_send_error, 1);
                }
            }
        }
        if socket.read_paused && socket.pending_bytes <= self.limits.low_watermark {
            // Reading resumes; `has_ready` brings the loop back without blocking.
            socket.read_paused = false;
        }
    }

    /// io_uring backend, before the loop waits: moves the sockets onto the ring (the first
    /// time), turns their send queues into `SENDMSG` operations (`UDP_SEGMENT` runs as
    /// `sendmmsg` would have, at most [`RING_SENDS_PER_SOCKET`] in flight each), and arms or
    /// cancels their multishot receive as backpressure, an upgrade's hold or release say.
    pub(crate) fn sync_ring(&mut self, ring: &mut Ring) {
        for index in 0..self.sockets.len() {
            if self.sockets.get(index).is_some_and(|s| s.ring.is_none()) {
                self.join_ring(index, ring);
            }
            let Some(socket) = self.sockets.get_mut(index) else {
                continue;
            };
            let Some(id) = socket.ring else {
                continue;
            };
            let batch = socket.listener.batch.max(1);
            'queue: while !socket.pending.is_empty()
                && ring.datagram_sends(id) < RING_SENDS_PER_SOCKET
            {
                let (mut taken, mut bytes) = (0usize, 0usize);
                {
                    let (front, back) = socket.pending.as_slices();
                    let slice = if front.is_empty() { back } else { front };
                    let messages: Vec<(SocketAddr, &[u8])> = slice
                        .iter()
                        .take(batch)
                        .map(|(peer, data)| (*peer, data.as_ref()))
                        .collect();
                    for (first, count) in gso_runs(&messages, socket.gso_below) {
                        if ring.datagram_sends(id) >= RING_SENDS_PER_SOCKET {
                            break;
                        }
                        let Some(run) = messages.get(first..first.saturating_add(count)) else {
                            break;
                        };
                        let Some(&(dest, head)) = run.first() else {
                            break;
                        };
                        let size: usize = run.iter().map(|(_, data)| data.len()).sum();
                        let mut payload = Vec::with_capacity(size);
                        for (_, data) in run {
                            payload.extend_from_slice(data);
                        }
                        let segment = match run.len() {
                            1 => None,
                            _ => u16::try_from(head.len()).ok(),
                        };
                        if ring.send_datagrams(id, dest, payload, segment).is_err() {
                            break 'queue;
                        }
                        taken = taken.saturating_add(run.len());
                        bytes = bytes.saturating_add(size);
                    }
                }
                if taken == 0 {
                    break;
                }
                socket.pending.drain(..taken.min(socket.pending.len()));
                socket.pending_bytes = socket.pending_bytes.saturating_sub(bytes);
            }
            if socket.read_paused && socket.pending_bytes <= self.limits.low_watermark {
                socket.read_paused = false;
            }
            let want = !socket.retired && !self.held && !socket.read_paused;
            if want != ring.receiving_datagrams(id) {
                match want {
                    true => ring.start_datagrams(id),
                    false => ring.stop_datagrams(id),
                }
            }
        }
    }

    /// Moves socket `index` from epoll onto the ring: the ring gets a duplicate of its
    /// descriptor (closed once the ring's last operation on it completed), epoll forgets it.
    fn join_ring(&mut self, index: usize, ring: &mut Ring) {
        static LOGGED: std::sync::Once = std::sync::Once::new();
        if self.ring_refused || !ring.datagrams_supported() {
            LOGGED.call_once(|| {
                info!("io_uring: udp/dtls sockets stay on epoll (the kernel lacks RECVMSG/SENDMSG on the ring)")
            });
            return;
        }
        let Some(socket) = self.sockets.get_mut(index) else {
            return;
        };
        let joined = std::os::fd::AsFd::as_fd(&socket.socket)
            .try_clone_to_owned()
            .map_err(|err| err.to_string())
            .and_then(|fd| {
                ring.register_datagrams(fd, index)
                    .map_err(|err| err.to_string())
            });
        match joined {
            Ok(id) => {
                if let Some(registry) = self.registry.as_ref() {
                    // Readiness events would only wake the loop for nothing now.
                    let _ = registry.deregister(&mut socket.socket);
                }
                socket.ring = Some(id);
                socket.readable = false;
                socket.write_blocked = false;
            }
            Err(err) => {
                self.ring_refused = true;
                LOGGED.call_once(|| info!("io_uring: udp/dtls sockets stay on epoll: {err}"));
            }
        }
    }

    /// A datagram completion of the ring: a received datagram goes where `serve` would have
    /// sent it (its session, a new session, the DTLS listener, an upgrade's relay); a send's
    /// completion is counted.
    pub(crate) fn ring_completion(
        &mut self,
        completion: uring::Completion<'_>,
        parts: &mut LoopParts<'_>,
    ) {
        let now = parts.now;
        match completion {
            uring::Completion::Datagram {
                tag,
                source,
                data,
                truncated,
            } => {
                let index = tag;
                let Some(socket) = self.sockets.get_mut(index) else {
                    return;
                };
                LoopStats::add(&self.stats.datagrams_in, 1);
                self.stats.received(&socket.listener.info, data.len());
                let Some(peer) = source else {
                    return;
                };
                if truncated {
                    LoopStats::add(&self.stats.datagrams_dropped_truncated, 1);
                    return;
                }
                if !socket.read_paused && socket.pending_bytes > self.limits.high_watermark {
                    // The receive is cancelled before the loop waits; what the kernel had
                    // read already is still served.
                    socket.read_paused = true;
                    LoopStats::add(&self.stats.read_pauses, 1);
                }
                self.receive(index, peer, data, now, parts);
            }
            uring::Completion::DatagramsSent {
                tag,
                datagrams,
                bytes,
                result,
                refused,
            } => {
                let Some(socket) = self.sockets.get_mut(tag) else {
                    return;
                };
                if let Some(refusal) = refused {
                    socket.gso_below = match refusal {
                        GsoRefusal::SegmentTooLarge(size) => size.min(socket.gso_below),
                        GsoRefusal::Unsupported => 0,
                    };
                    log_gso_refusal(socket.listener.info.name.as_ref(), refusal);
                }
                match result {
                    Ok(()) => {
                        LoopStats::add(&self.stats.datagrams_out, datagrams as u64);
                        self.stats.sent(&socket.listener.info, bytes);
                    }
                    Err(err) => {
                        debug!("udp send: {err}");
                        LoopStats::add(&self.stats.datagrams_dropped_send_error, datagrams as u64);
                    }
                }
            }
            _ => {}
        }
    }

    /// Flushes every socket whose queue is not empty (end of a loop turn).
    pub(crate) fn flush_all(&mut self) {
        self.flush_upstreams();
        for index in 0..self.sockets.len() {
            if self
                .sockets
                .get(index)
                .is_some_and(|s| !s.pending.is_empty())
            {
                self.flush(index);
            }
        }
    }

    /// A datagram-session timer fired.
    pub(crate) fn timer(
        &mut self,
        key: usize,
        id: SessionId,
        kind: DatagramTimer,
        now: Instant,
        parts: &mut LoopParts<'_>,
    ) {
        if matches!(
            kind,
            DatagramTimer::UpstreamRetransmit | DatagramTimer::UpstreamHandshake
        ) {
            // A DTLS upstream's: `key` is its slot among the upstream sockets.
            self.upstream_timer(key, id, kind, now, parts);
            return;
        }
        let Some(session) = self.sessions.get_mut(key).filter(|s| s.info.id == id) else {
            return;
        };
        match kind {
            DatagramTimer::UpstreamRetransmit | DatagramTimer::UpstreamHandshake => {}
            DatagramTimer::Idle => {
                session.idle_timer = None;
                let due = deadline_after(session.last_activity, self.limits.idle_timeout);
                if now < due {
                    session.idle_timer = Some(parts.timers.insert(due, timer_entry(key, id, kind)));
                    return;
                }
                self.close(key, CloseReason::IdleTimeout, parts);
            }
            DatagramTimer::Handshake => {
                let Some(dtls) = session.dtls.as_mut() else {
                    return;
                };
                dtls.handshake_timer = None;
                if dtls.handshaking() {
                    self.close(key, CloseReason::HandshakeTimeout, parts);
                }
            }
            DatagramTimer::Handler => {
                if let Some(extras) = session.extras.as_deref_mut() {
                    extras.handler_timer = None;
                }
                let index = session.socket;
                self.callback(key, parts, |handler, handle| handler.on_timer(handle));
                self.after_callback(key, now, parts);
                // Timers run after the turn's flush: send what the handler queued now.
                self.flush(index);
            }
            DatagramTimer::Retransmit => {
                let Some(dtls) = session.dtls.as_mut() else {
                    return;
                };
                dtls.retransmit_timer = None;
                if !dtls::handle_timeout(&mut dtls.stream, session.info.peer, now) {
                    let reason = CloseReason::HandshakeTimeout;
                    self.close(key, reason, parts);
                    return;
                }
                self.dtls_output(key, now, parts);
                if let Some(index) = self.sessions.get(key).map(|s| s.socket) {
                    self.flush(index);
                }
            }
        }
    }

    /// Ends a session: close_notify for an established DTLS session (unless the transport
    /// failed), timers cancelled, the service told, the admission place given back.
    fn close(&mut self, key: usize, reason: CloseReason, parts: &mut LoopParts<'_>) {
        let Some(mut session) = self.sessions.try_remove(key) else {
            return;
        };
        let index = session.socket;
        if let Some(socket) = self.sockets.get_mut(index) {
            socket.peers.remove(&session.info.peer);
        }
        self.idle.remove(key);
        self.release_peers(index, &[session.info.peer]);
        // Its upstream sockets end with it.
        if let Some(links) = session.extras.as_deref_mut().and_then(|e| e.links.take()) {
            self.close_upstreams_of(&links.peers, &reason, parts);
        }
        let mut cancel = |timer: Option<TimerKey>| {
            if let Some(timer) = timer {
                parts.timers.cancel(timer);
            }
        };
        cancel(session.idle_timer.take());
        cancel(
            session
                .extras
                .as_deref_mut()
                .and_then(|extras| extras.handler_timer.take()),
        );
        let open = match session.dtls.as_mut() {
            Some(dtls) => {
                cancel(dtls.handshake_timer.take());
                cancel(dtls.retransmit_timer.take());
                if dtls.handshaking() {
                    let counter = match reason {
                        CloseReason::HandshakeTimeout => &self.stats.handshake_timeouts,
                        _ => &self.stats.handshakes_failed,
                    };
                    LoopStats::add(counter, 1);
                } else if !dtls.close_notify_sent && !matches!(reason, CloseReason::Io(_)) {
                    dtls.close_notify_sent = true;
                    dtls::close_notify(&mut dtls.stream, session.info.peer, Instant::now());
                }
                let written = std::mem::take(&mut dtls.stream.get_mut().outbound);
                for datagram in written {
                    self.queue(index, session.info.peer, Bytes::from(datagram));
                }
                &self.stats.dtls_sessions_open
            }
            None => &self.stats.udp_sessions_open,
        };
        // The reason first: whoever sees the session gone also sees why.
        if reason == CloseReason::IdleTimeout {
            LoopStats::add(&self.stats.closed_idle_timeout, 1);
        }
        LoopStats::sub(open, 1);
        self.stats.closed(&session.info.listener);
        debug!(session = %session.info.id, peer = %session.info.peer, "datagram session closed: {reason}");
        let (handler, info) = (&mut session.handler, &session.info);
        if catch_unwind(AssertUnwindSafe(|| handler.on_close(info, &reason))).is_err() {
            error!(session = %info.id, peer = %info.peer, "service handler panicked in on_close");
            LoopStats::add(&self.stats.handler_panics, 1);
        }
        self.flush(index);
        // Dropping the session gives its admission place back (the ticket).
    }

    /// Graceful stop: no new peers; every session ends now (DTLS ones with close_notify) —
    /// unless an upgrade released the sockets: then sessions go on until they idle out or the
    /// loop's grace ends.
    pub(crate) fn drain(&mut self, parts: &mut LoopParts<'_>) {
        self.draining = true;
        if !self.released {
            self.close_all(CloseReason::Shutdown, parts);
        }
    }

    /// Old process of an upgrade, once the new one is ready: stop reading the shared sockets
    /// (the new process reads them now), and tell it over each socket's relay which peers
    /// this loop still serves, so it forwards their datagrams here. `relays` are
    /// `(listener index, socket ordinal, relay)`.
    pub(crate) fn release(
        &mut self,
        registry: &Registry,
        relays: Vec<(usize, usize, std::os::unix::net::UnixDatagram)>,
    ) {
        self.released = true;
        for (listener, ordinal, relay) in relays {
            let Some(index) = self
                .sockets
                .iter()
                .position(|s| s.listener.info.index == listener && s.ordinal == ordinal)
            else {
                continue;
            };
            let relay = relay.set_nonblocking(true).map(|()| {
                let mut relay = mio::net::UnixDatagram::from_std(relay);
                let token = relay_token(index);
                registry
                    .register(&mut relay, token, Interest::READABLE)
                    .map(|()| relay)
            });
            let Some(socket) = self.sockets.get_mut(index) else {
                continue;
            };
            socket.retired = true;
            socket.readable = false;
            match relay {
                Ok(Ok(relay)) => {
                    socket.relay = Some(Relay {
                        socket: relay,
                        claimed: HashSet::new(),
                        forwards: false,
                        readable: true,
                    });
                }
                Ok(Err(err)) | Err(err) => {
                    warn!("upgrade: relay of a datagram socket unusable: {err}");
                }
            }
            let peers: Vec<SocketAddr> = socket.peers.keys().copied().collect();
            for chunk in peers.chunks(CLAIMS_PER_MESSAGE) {
                self.relay_send(index, RELAY_CLAIM, chunk);
            }
        }
        // Sockets without a relay (none in practice) are not read any more either.
        for socket in &mut self.sockets {
            socket.retired = true;
            socket.readable = false;
        }
        debug!(
            sessions = self.sessions.len(),
            "datagram sessions kept for the drain"
        );
    }

    /// New process of an upgrade: the old one has sent its claims; read the sockets.
    pub(crate) fn resume(&mut self, now: Instant, parts: &mut LoopParts<'_>) {
        for index in 0..self.sockets.len() {
            self.read_relay(index, now, parts);
        }
        self.held = false;
    }

    /// Sends peers (claims or releases) over socket `index`'s relay, if it has one.
    fn release_peers(&mut self, index: usize, peers: &[SocketAddr]) {
        let serves =
            |socket: &DatagramSocket| socket.relay.as_ref().is_some_and(|relay| !relay.forwards);
        if self.sockets.get(index).is_some_and(serves) {
            self.relay_send(index, RELAY_RELEASE, peers);
        }
    }

    fn relay_send(&mut self, index: usize, kind: u8, peers: &[SocketAddr]) {
        let Some(relay) = self.sockets.get(index).and_then(|s| s.relay.as_ref()) else {
            return;
        };
        // At most CLAIMS_PER_MESSAGE peers: no overflow.
        let capacity = peers.len().saturating_mul(ADDR_LEN).saturating_add(1);
        let mut message = Vec::with_capacity(capacity);
        message.push(kind);
        for &peer in peers {
            encode_addr(&mut message, peer);
        }
        if let Err(err) = relay.socket.send(&message) {
            // The new process is gone or not reading: its side decides alone from now on.
            debug!("upgrade relay: cannot send: {err}");
        }
    }

    /// New process: a datagram from a peer the old process still serves goes to it.
    fn forward(&mut self, index: usize, peer: SocketAddr, data: &[u8]) {
        let Some(relay) = self.sockets.get_mut(index).and_then(|s| s.relay.as_mut()) else {
            return;
        };
        let mut message = Vec::with_capacity(data.len().saturating_add(1 + ADDR_LEN));
        message.push(RELAY_DATA);
        encode_addr(&mut message, peer);
        message.extend_from_slice(data);
        match relay.socket.send(&message) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                LoopStats::add(&self.stats.datagrams_dropped_overflow, 1);
            }
            Err(err) => {
                info!(
                    "upgrade: the old process no longer takes datagrams ({err}); its {} peer(s) \
                     are served here from now on",
                    relay.claimed.len()
                );
                if let Some(socket) = self.sockets.get_mut(index) {
                    socket.relay = None;
                }
            }
        }
    }

    /// Reads socket `index`'s relay: claims and releases (new process), forwarded datagrams
    /// (old process).
    fn read_relay(&mut self, index: usize, now: Instant, parts: &mut LoopParts<'_>) {
        let mut buf = vec![0u8; 1 + ADDR_LEN + RECV_SLOT];
        for _ in 0..RELAY_READS_PER_TURN {
            let Some(relay) = self.sockets.get_mut(index).and_then(|s| s.relay.as_mut()) else {
                return;
            };
            let n = match relay.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    relay.readable = false;
                    return;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    debug!("upgrade relay: {err}");
                    relay.readable = false;
                    return;
                }
            };
            let Some((&kind, body)) = buf.get(..n).and_then(|read| read.split_first()) else {
                continue;
            };
            match (kind, relay.forwards) {
                (RELAY_CLAIM, true) => {
                    relay
                        .claimed
                        .extend(body.chunks_exact(ADDR_LEN).filter_map(decode_addr));
                }
                (RELAY_RELEASE, true) => {
                    for peer in body.chunks_exact(ADDR_LEN).filter_map(decode_addr) {
                        relay.claimed.remove(&peer);
                    }
                }
                (RELAY_DATA, false) => {
                    if let Some(peer) = decode_addr(body) {
                        let data = body.get(ADDR_LEN..).unwrap_or_default().to_vec();
                        LoopStats::add(&self.stats.datagrams_in, 1);
                        LoopStats::add(&self.stats.bytes_in, data.len() as u64);
                        self.receive(index, peer, &data, now, parts);
                        self.flush(index);
                    }
                }
                _ => {}
            }
        }
    }

    /// Closes every session with `reason`.
    pub(crate) fn close_all(&mut self, reason: CloseReason, parts: &mut LoopParts<'_>) {
        let keys: Vec<usize> = self.sessions.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, reason.clone(), parts);
        }
    }
}

/// Turns on the kernel's UDP offloads for a new socket of a listener with `udp_offload` on,
/// where the kernel has them (probed once per process, logged once): `UDP_GRO` on receive
/// (coalesced buffers are split back into their datagrams by [`RecvBatch`]), and returns
/// whether sends may use `UDP_SEGMENT` (GSO). A listener with `udp_offload = false` gets
/// neither: one datagram per message both ways.
fn udp_offload(socket: &std::net::UdpSocket, listener: &DatagramListener) -> bool {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    if !listener.offload {
        debug!(
            listener = listener.info.name.as_ref(),
            "udp offload off (udp_offload = false)"
        );
        return false;
    }
    let support = offload();
    LOGGED.call_once(|| {
        let word = |on: bool| if on { "on" } else { "unavailable (kernel)" };
        info!(
            "udp offload: GSO (UDP_SEGMENT) {}, GRO (UDP_GRO) {}",
            word(support.gso),
            word(support.gro)
        );
    });
    if support.gro {
        if let Err(err) = enable_gro(socket) {
            debug!(
                listener = listener.info.name.as_ref(),
                "udp: UDP_GRO refused: {err}; receiving without it"
            );
        }
    }
    support.gso
}

/// Logs a GSO refusal at info the first time in this process (each socket then stops using
/// that size, or GSO altogether), at debug after that: a refusal costs one log line.
fn log_gso_refusal(listener: &str, refusal: GsoRefusal) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    let first = !LOGGED.swap(true, Ordering::Relaxed);
    let what = match refusal {
        GsoRefusal::SegmentTooLarge(size) => format!(
            "with {size}-byte segments; replies of that size or larger go datagram by datagram"
        ),
        GsoRefusal::Unsupported => {
            "on this socket; it sends datagram by datagram from now on".to_owned()
        }
    };
    if first {
        info!(listener, "udp: the kernel refused UDP_SEGMENT (GSO) {what}");
    } else {
        debug!(listener, "udp: the kernel refused UDP_SEGMENT (GSO) {what}");
    }
}

/// Whether every record of `datagram` (already checked well-formed) is application data.
fn only_application_data(datagram: &[u8]) -> bool {
    records(datagram).all(|record| {
        record.is_ok_and(|record| record.header.content_type == ContentType::ApplicationData)
    })
}

fn timer_entry(key: usize, id: SessionId, kind: DatagramTimer) -> TimerEntry {
    TimerEntry {
        key,
        id,
        kind: TimerKind::Datagram(kind),
    }
}

/// The parts of a datagram session (or of a UDP upstream session) a callback's [`Session`]
/// handle borrows.
pub(super) struct HandleFields<'a> {
    pub(super) info: &'a SessionInfo,
    pub(super) handler: &'a mut Box<dyn SessionHandler>,
    pub(super) outbound: &'a mut OutboundQueue,
    pub(super) closing: &'a mut Option<CloseReason>,
    pub(super) work: &'a mut WorkQueue,
    pub(super) extras: &'a mut Option<Box<SessionExtras>>,
    pub(super) drain_wanted: &'a mut bool,
}

/// Runs `call` with a datagram [`Session`] handle over `fields`; `false` if it panicked (the
/// caller logs and closes that session only).
pub(super) fn run_callback(
    fields: HandleFields<'_>,
    limits: &SessionLimits,
    parts: &mut LoopParts<'_>,
    call: impl FnOnce(&mut Box<dyn SessionHandler>, &mut Session<'_>),
) -> bool {
    let HandleFields {
        info,
        handler,
        outbound,
        closing,
        work,
        extras,
        drain_wanted,
    } = fields;
    let mut handle = Session {
        info,
        outbound,
        closing,
        broadcasts: &mut *parts.broadcasts,
        outbound_limit: limits.outbound_limit,
        work,
        work_limit: limits.work_limit,
        extras,
        drain_wanted,
        high_watermark: limits.high_watermark,
        unsent: 0,
        metrics: parts.metrics,
        now: parts.now,
        locals: &mut *parts.locals,
        alpn: None,
        tls_state: None,
        tls: false,
        direct: None,
    };
    catch_unwind(AssertUnwindSafe(|| call(handler, &mut handle))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_round_trip_and_short_input_is_refused() {
        for addr in ["127.0.0.1:7000", "[::1]:65535", "[2001:db8::7]:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut bytes = Vec::new();
            encode_addr(&mut bytes, addr);
            assert_eq!(bytes.len(), ADDR_LEN);
            assert_eq!(decode_addr(&bytes), Some(addr));
            assert_eq!(decode_addr(&bytes[..ADDR_LEN - 1]), None);
        }
        let mut bad = vec![0u8; ADDR_LEN];
        bad[0] = 5;
        assert_eq!(decode_addr(&bad), None, "unknown family");
    }

    #[test]
    fn relay_tokens_follow_the_socket_tokens() {
        assert_eq!(
            token_socket(socket_token(MAX_DATAGRAM_SOCKETS)),
            Some(MAX_DATAGRAM_SOCKETS)
        );
        assert_eq!(
            token_socket(socket_token(UPSTREAM_BASE)),
            Some(UPSTREAM_BASE),
            "the first upstream socket"
        );
    }

    #[test]
    fn datagram_tokens_stay_clear_of_session_tokens_and_the_waker() {
        assert_eq!(token_socket(socket_token(0)), Some(0));
        assert_eq!(
            token_socket(socket_token(MAX_DATAGRAM_SOCKETS - 1)),
            Some(MAX_DATAGRAM_SOCKETS - 1)
        );
        assert_eq!(token_socket(Token(usize::MAX)), None, "the waker");
        assert_eq!(token_socket(Token(0)), None);
        assert_eq!(token_socket(Token(1 << 40)), None, "a session token");
    }
}
