//! Taking connections from the TCP listeners: what each event loop does with the listeners it
//! shares with the others (`event_loop/accept.rs` registers them and runs [`Intake`] each
//! turn), sans the loop. It owns
//! - [`BoundListener`]: a listener's socket (shared, one open file for the whole process) and
//!   everything its sessions need (service, ACL, PROXY trust, socket options, TLS);
//! - [`Intake`]: one thread's accepting — a budget per listener per turn, the admission gate
//!   ([`admit`]: ACL, caps, handshake places, PROXY trust), the socket options, and the
//!   descriptor-exhaustion rules;
//! - [`NewSession`]: an admitted connection, ready to become a session.
//!
//! Descriptor exhaustion (EMFILE/ENFILE) is handled the way nginx and libev advise: a spare
//! descriptor is kept open; when `accept` fails for lack of descriptors the spare is closed,
//! the waiting connections are accepted and closed at once (the client sees a clean close
//! instead of hanging in the backlog), the spare is reopened, and accepting pauses with an
//! exponential backoff. The listener is never polled in a tight loop.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use plexus_proto::{deadline_after, Acl};
use plexus_sys::uring::AcceptId;
use rustls::ServerConfig;
use socket2::{SockRef, TcpKeepalive};
use tracing::{debug, warn};

use crate::admission::{Admission, HandshakeSlot, RefusalReason, Ticket};
use crate::service::{ListenerInfo, Service, SessionId, SessionInfo};

mod admit;
#[cfg(test)]
pub(crate) mod tests;

pub(crate) use admit::RefusalLog;
use admit::{Admitted, Gate};

/// Rounds of accepts that take a listener's queue before a graceful drain lets it go.
pub(crate) const BACKLOG_SWEEPS: usize = 64;
/// Waiting connections shed per turn while descriptors are exhausted.
const SHED_BUDGET: usize = 64;
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(10);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Socket options applied to each accepted connection.
#[derive(Debug, Clone)]
pub(crate) struct SocketOptions {
    pub(crate) nodelay: bool,
    pub(crate) recv_buffer: usize,
    pub(crate) send_buffer: usize,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) linger: Option<Duration>,
}

impl SocketOptions {
    pub(crate) fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(self.nodelay)?;
        let socket = SockRef::from(stream);
        if self.recv_buffer > 0 {
            socket.set_recv_buffer_size(self.recv_buffer)?;
        }
        if self.send_buffer > 0 {
            socket.set_send_buffer_size(self.send_buffer)?;
        }
        if let Some(idle) = self.keepalive {
            socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
        }
        if let Some(linger) = self.linger {
            socket.set_linger(Some(linger))?;
        }
        Ok(())
    }
}

/// A bound TCP listener and what its sessions need. Cloned into every event loop: the clones
/// share the socket (one open file, closed when the last clone goes) and each keeps its own
/// `ready` flag.
#[derive(Clone)]
pub(crate) struct BoundListener {
    pub(crate) socket: Arc<TcpListener>,
    pub(crate) local: SocketAddr,
    pub(crate) info: Arc<ListenerInfo>,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) acl: Arc<Acl>,
    /// For `proxy_protocol` listeners: the sources trusted to send a PROXY header.
    pub(crate) proxy_trusted: Option<Acl>,
    pub(crate) options: SocketOptions,
    /// The rustls configuration of a tls listener.
    pub(crate) tls: Option<Arc<ServerConfig>>,
    /// An edge reported pending connections and `accept` has not yet returned `WouldBlock`
    /// (start with `true`: connections may be waiting before the first edge).
    pub(crate) ready: bool,
    /// With `backend = "io_uring"`: this loop's multishot accept of the listener, while one is
    /// armed (per loop, like `ready`).
    pub(crate) ring_accept: Option<AcceptId>,
}

/// An admitted TCP connection on its way to becoming a session.
pub(crate) struct NewSession {
    pub(crate) stream: TcpStream,
    pub(crate) info: SessionInfo,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) ticket: Ticket,
    /// Present for tls listeners: the handshake runs on the loop before the service opens.
    pub(crate) tls: Option<TlsStart>,
    /// Present for `proxy_protocol` listeners: a PROXY header comes first; the listener's ACL
    /// then applies to the client it names.
    pub(crate) proxy: Option<Arc<Acl>>,
}

/// What a TLS session needs to start its handshake.
pub(crate) struct TlsStart {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) slot: HandshakeSlot,
}

/// One thread's accepting: the admission it answers to, the refusal log it shares with the
/// other threads, its spare descriptor and its pause.
pub(crate) struct Intake {
    admission: Arc<Admission>,
    refusals: Arc<RefusalLog>,
    /// The spare descriptor closed to shed connections when descriptors run out.
    reserve: Option<File>,
    paused_until: Option<Instant>,
    backoff: Duration,
}

impl Intake {
    pub(crate) fn new(admission: Arc<Admission>, refusals: Arc<RefusalLog>) -> Intake {
        Intake {
            admission,
            refusals,
            reserve: open_reserve(),
            paused_until: None,
            backoff: BACKOFF_START,
        }
    }

    /// When accepting resumes, while it is paused (after running out of descriptors or an
    /// accept error).
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Whether accepting may go on at `now` (a pause that is over ends here).
    pub(crate) fn may_accept(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(until) if now < until => false,
            _ => {
                self.paused_until = None;
                true
            }
        }
    }

    /// Accepts from every ready listener, up to `budget` connections each; each admitted one
    /// goes to `adopt`. Refused ones are closed at once, counted and logged (throttled). An
    /// `adopt` that fails (the connection is dropped) for lack of descriptors counts as
    /// running out of them; another failure pauses accepting like a failed `accept`.
    pub(crate) fn accept_ready(
        &mut self,
        listeners: &mut [BoundListener],
        budget: usize,
        now: Instant,
        adopt: &mut impl FnMut(NewSession) -> io::Result<()>,
    ) {
        for index in 0..listeners.len() {
            for _ in 0..budget {
                let Some(listener) = listeners.get_mut(index) else {
                    break;
                };
                if !listener.ready {
                    break;
                }
                let going_on = match listener.socket.accept() {
                    Ok((stream, peer)) => self.take(listener, stream, peer, now, adopt),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        listener.ready = false;
                        true
                    }
                    Err(err) => self.accept_failed(listener, &err, now),
                };
                if !going_on {
                    return;
                }
            }
        }
        self.backoff = BACKOFF_START;
    }

    /// Admits and adopts a connection the io_uring ring accepted on `listener` (its peer's
    /// address is asked for here: a multishot accept has none). `false` when accepting is
    /// paused now (the caller stops the ring's accepts until [`Intake::paused_until`]).
    pub(crate) fn take_accepted(
        &mut self,
        listener: &BoundListener,
        stream: TcpStream,
        now: Instant,
        adopt: &mut impl FnMut(NewSession) -> io::Result<()>,
    ) -> bool {
        match stream.peer_addr() {
            Ok(peer) => {
                let going_on = self.take(listener, stream, peer, now, adopt);
                if going_on {
                    self.backoff = BACKOFF_START;
                }
                going_on
            }
            // Reset before it could be looked at (ENOTCONN): like a connection that died in
            // the backlog, it concerns nobody else.
            Err(err) => {
                debug!(listener = %listener.info.name, "an accepted connection is gone: {err}");
                true
            }
        }
    }

    /// An accept of `listener` failed with `err` (by `accept(2)` or on the io_uring ring).
    /// `false` when accepting must stop: out of descriptors (the queue is shed, accepting
    /// pauses) or an error that concerns the listener (accepting pauses); errors about one
    /// connection that died in the backlog go by.
    pub(crate) fn accept_failed(
        &mut self,
        listener: &BoundListener,
        err: &io::Error,
        now: Instant,
    ) -> bool {
        if plexus_sys::is_descriptor_exhaustion(err) {
            self.shed(listener, err, now);
            return false;
        }
        if is_transient_accept_error(err) {
            return true;
        }
        warn!(listener = %listener.info.name, "accept failed: {err}; pausing");
        self.pause(now);
        false
    }

    /// Admits one accepted connection and hands it to `adopt`. Refused ones are closed at
    /// once, counted and logged (throttled). `false` when `adopt` failed and accepting
    /// paused: for lack of descriptors the queue is shed first.
    fn take(
        &mut self,
        listener: &BoundListener,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
        adopt: &mut impl FnMut(NewSession) -> io::Result<()>,
    ) -> bool {
        let Some(new) = self.admit(listener, stream, peer, now) else {
            return true;
        };
        match adopt(new) {
            Ok(()) => true,
            Err(err) if plexus_sys::is_descriptor_exhaustion(&err) => {
                self.shed(listener, &err, now);
                false
            }
            Err(err) => {
                warn!(
                    listener = %listener.info.name,
                    "cannot serve an accepted connection: {err}; pausing"
                );
                self.pause(now);
                false
            }
        }
    }

    /// Takes what waits in the listeners' queues (bounded: [`BACKLOG_SWEEPS`] rounds of
    /// `budget` each), edge or not, pause or not: a graceful drain is about to let them go.
    pub(crate) fn accept_backlog(
        &mut self,
        listeners: &mut [BoundListener],
        budget: usize,
        now: Instant,
        adopt: &mut impl FnMut(NewSession) -> io::Result<()>,
    ) {
        for listener in listeners.iter_mut() {
            listener.ready = true;
        }
        for _ in 0..BACKLOG_SWEEPS {
            self.accept_ready(listeners, budget, now, adopt);
            if listeners.iter().all(|listener| !listener.ready) {
                return;
            }
        }
    }

    /// Admission of one accepted connection: its socket options, its identity, its places.
    fn admit(
        &self,
        listener: &BoundListener,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<NewSession> {
        let gate = Gate {
            admission: &self.admission,
            acl: &listener.acl,
            proxy_trusted: listener.proxy_trusted.as_ref(),
            tls: listener.tls.is_some(),
            listener: &listener.info,
        };
        let Admitted { ticket, handshake } = gate.admit(peer, now, &self.refusals).ok()?;
        if let Err(err) = listener.options.apply(&stream) {
            debug!(peer = %peer, "cannot set socket options: {err}");
        }
        let info = SessionInfo {
            id: SessionId::next(),
            peer,
            // A listener bound to one address accepts on that address: no getsockname(2).
            local: match listener.local.ip().is_unspecified() {
                true => stream.local_addr().unwrap_or(listener.local),
                false => listener.local,
            },
            listener: Arc::clone(&listener.info),
        };
        let tls = match (&listener.tls, handshake) {
            (Some(config), Some(slot)) => Some(TlsStart {
                config: Arc::clone(config),
                slot,
            }),
            _ => None,
        };
        Some(NewSession {
            stream,
            info,
            service: Arc::clone(&listener.service),
            ticket,
            tls,
            proxy: listener
                .proxy_trusted
                .as_ref()
                .map(|_| Arc::clone(&listener.acl)),
        })
    }

    /// Out of descriptors: close waiting connections with the help of the spare descriptor,
    /// then pause accepting.
    fn shed(&mut self, listener: &BoundListener, err: &io::Error, now: Instant) {
        let reason = RefusalReason::DescriptorsExhausted;
        let name = &listener.info.name;
        self.reserve = None;
        let mut shed = 0usize;
        for _ in 0..SHED_BUDGET {
            match listener.socket.accept() {
                Ok((stream, peer)) => {
                    drop(stream);
                    shed = shed.saturating_add(1);
                    self.admission.record_refusal(reason);
                    listener.info.stats.refused(reason);
                    self.refusals.record(reason, Some(peer), name, now);
                }
                Err(_) => break,
            }
        }
        if shed == 0 {
            self.admission.record_refusal(reason);
            listener.info.stats.refused(reason);
            self.refusals.record(reason, None, name, now);
        }
        self.reserve = open_reserve();
        self.pause(now);
        warn!(
            listener = %name,
            "out of file descriptors ({err}); closed {shed} waiting connection(s), \
             accepting again in {}",
            humantime::format_duration(self.backoff)
        );
    }

    fn pause(&mut self, now: Instant) {
        self.paused_until = Some(deadline_after(now, self.backoff));
        self.backoff = self.backoff.saturating_mul(2).min(BACKOFF_MAX);
    }
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Errors that concern one connection that died in the backlog, not the listener.
fn is_transient_accept_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::PermissionDenied
    )
}
