//! The service API: what a user implements to handle sessions, and the handle it gets.
//!
//! A [`Service`] is shared by every session of the listeners that name it; for each new session
//! the event loop calls [`Service::open`], which returns that session's [`SessionHandler`]. The
//! handler then sees the session's bytes ([`SessionHandler::on_data`]) and its end
//! ([`SessionHandler::on_close`]), always on the loop thread that owns the session, so it needs
//! no locks. Handlers must not block: a send only queues bytes, which the loop writes once the
//! callback returns (with `writev`, applying the outbound watermarks).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

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

    /// The session ended; nothing can be sent any more. The default does nothing.
    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let _ = (info, reason);
    }
}

/// A process-unique session number, never reused while the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u64);

impl SessionId {
    /// The number itself.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// The listener a session arrived on.
#[derive(Debug)]
pub(crate) struct ListenerInfo {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
}

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
    /// The TLS layer failed: a bad handshake, a protocol violation, a bad record.
    Tls(rustls::Error),
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
    /// A forward session's upstream refused, reset or failed.
    UpstreamFailed(std::io::ErrorKind),
    /// A forward session's upstream did not accept the connection within `handshake_timeout`.
    UpstreamTimeout,
}

impl CloseReason {
    /// Whether queued bytes are still flushed to the peer before the socket closes.
    pub(crate) fn flushes(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerClosed | CloseReason::Requested | CloseReason::Shutdown
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
            CloseReason::WorkOverflow => {
                f.write_str("too many blocking jobs queued (worker_session_limit)")
            }
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
    pub fn broadcast(&mut self, data: &[u8]) {
        self.broadcasts.push(Broadcast {
            listener: self.info.listener.index,
            except: self.info.id,
            data: Bytes::copy_from_slice(data),
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
        if self.outbound.len() + extra > self.outbound_limit {
            *self.closing = Some(CloseReason::OutboundOverflow);
            return false;
        }
        true
    }
}
