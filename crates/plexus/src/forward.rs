//! `forward`: relays a session's byte stream to an upstream TCP server and back — a TCP proxy
//! for plain listeners, TLS termination for tls listeners.
//!
//! The upstream socket belongs to the client's session on the same event loop (token `2k+1`
//! beside the client's `2k`). Each direction has bounded buffering and backpressure: the side
//! that produces is not read while the other side's queue is above the high watermark. A
//! half-close travels through (the client's FIN becomes a shutdown of the upstream's write side,
//! and back), and the session ends when both directions are finished.
//!
//! Two ways to move bytes: **copy** (read into the loop's buffer, queue, write — needed when one
//! side is TLS) and **splice** (plain TCP both sides: socket → pipe → socket inside the kernel,
//! no copy to user space; the pipe is the buffer).

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use plexus_proto::TimerKey;
use plexus_sys::splice::{splice, Pipe, PIPE_CAPACITY};

use crate::breakdown::ListenerInfo;
use crate::metrics::LoopStats;
use crate::outbound::OutboundQueue;
use crate::service::{CloseReason, Service, Session, SessionHandler};

/// Where a forward listener relays to, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardTarget {
    pub(crate) upstream: SocketAddr,
    /// Relay plain TCP with splice(2) instead of copying through user space.
    pub(crate) splice: bool,
}

/// The service of forward listeners: bytes the client sends (decrypted, for tls listeners) go
/// to the upstream queue. Replies come from the upstream socket, not from this handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forward;

impl Service for Forward {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(ForwardSession)
    }
}

struct ForwardSession;

impl SessionHandler for ForwardSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.relay_upstream(data);
    }
}

/// A forward session's upstream half.
pub(crate) struct Relay {
    pub(crate) upstream: TcpStream,
    pub(crate) target: SocketAddr,
    connected: bool,
    /// An edge reported the upstream readable and it has not yet returned `WouldBlock`.
    pub(crate) up_readable: bool,
    /// epoll reported the upstream read-closed (FIN) or an error: the bytes before the FIN may
    /// come in a short read, and no further edge will announce the FIN itself.
    pub(crate) up_read_closed: bool,
    pub(crate) up_write_blocked: bool,
    /// The upstream sent FIN.
    up_eof: bool,
    /// The upstream's write side was shut down (the client had finished).
    up_shut: bool,
    /// The client's write side was shut down (the upstream had finished).
    client_shut: bool,
    /// Client → upstream bytes in copy mode.
    pub(crate) to_upstream: OutboundQueue,
    pipes: Option<Box<Pipes>>,
    pub(crate) connect_timer: Option<TimerKey>,
}

/// Splice mode: one pipe per direction and the bytes each holds.
struct Pipes {
    to_upstream: Pipe,
    to_upstream_len: usize,
    to_client: Pipe,
    to_client_len: usize,
}

impl Relay {
    /// Starts a non-blocking connect to the upstream.
    pub(crate) fn connect(target: ForwardTarget, plain_client: bool) -> io::Result<Relay> {
        let upstream = TcpStream::connect(target.upstream)?;
        upstream.set_nodelay(true)?;
        let pipes = match target.splice && plain_client {
            true => Some(Box::new(Pipes {
                to_upstream: Pipe::new()?,
                to_upstream_len: 0,
                to_client: Pipe::new()?,
                to_client_len: 0,
            })),
            false => None,
        };
        Ok(Relay {
            upstream,
            target: target.upstream,
            connected: false,
            up_readable: false,
            up_read_closed: false,
            up_write_blocked: true,
            up_eof: false,
            up_shut: false,
            client_shut: false,
            to_upstream: OutboundQueue::default(),
            pipes,
            connect_timer: None,
        })
    }

    /// Whether client bytes move by splice (so the normal read path must leave the socket alone).
    pub(crate) fn spliced(&self) -> bool {
        self.pipes.is_some()
    }

    /// Bytes waiting to go upstream (for the watermarks).
    pub(crate) fn backlog(&self) -> usize {
        self.to_upstream.len()
    }

    /// Whether both directions are finished (each side's FIN delivered to the other).
    pub(crate) fn finished(&self, client_eof: bool) -> bool {
        client_eof && self.up_shut && self.up_eof && self.client_shut
    }

    /// The upstream has unread bytes that copy mode left there because the client's queue was
    /// full; once the queue drains, nothing but the loop will come back for them.
    pub(crate) fn upstream_pending(&self) -> bool {
        self.connected && self.pipes.is_none() && self.up_readable && !self.up_eof
    }

    /// Copy mode: once the upstream finished and its last bytes reached the client (the
    /// caller's queue is empty), passes its FIN on. A TLS client gets close_notify from the
    /// loop's close path instead of a TCP FIN.
    pub(crate) fn pass_fin_to_client(
        &mut self,
        client: &TcpStream,
        client_tls: bool,
    ) -> io::Result<()> {
        if self.pipes.is_none() && self.up_eof && !self.client_shut {
            if !client_tls {
                shutdown_write(client)?;
            }
            self.client_shut = true;
        }
        Ok(())
    }

    pub(crate) fn connecting(&self) -> bool {
        !self.connected
    }

    /// A writable edge on a connecting upstream: did the connect succeed?
    pub(crate) fn check_connected(&mut self) -> io::Result<bool> {
        if self.connected {
            return Ok(true);
        }
        if let Some(err) = self.upstream.take_error()? {
            return Err(err);
        }
        match self.upstream.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(err) => Err(err),
        }
    }
}

/// The client's half of a forward session, borrowed field by field from its session.
pub(crate) struct ClientSide<'a> {
    pub(crate) stream: &'a mut TcpStream,
    pub(crate) readable: &'a mut bool,
    pub(crate) write_blocked: &'a mut bool,
    pub(crate) peer_eof: &'a mut bool,
    pub(crate) last_activity: &'a mut Instant,
    pub(crate) outbound: &'a mut OutboundQueue,
    pub(crate) listener: &'a ListenerInfo,
}

/// Moves what can move in both directions of a forward session, without blocking. Returns
/// `Err` with the reason when the session must be closed.
pub(crate) fn pump(
    session: ClientSide<'_>,
    relay: &mut Relay,
    read_buf: &mut [u8],
    high_watermark: usize,
    stats: &LoopStats,
    now: Instant,
) -> Result<(), CloseReason> {
    if !relay.connected {
        return Ok(());
    }
    let io_error = |err: io::Error| CloseReason::Io(err.kind());
    if let Some(pipes) = relay.pipes.as_deref_mut() {
        let moved = pump_spliced(
            pipes,
            session.stream,
            session.readable,
            session.write_blocked,
            session.peer_eof,
            relay_sides(
                &mut relay.upstream,
                &mut relay.up_readable,
                &mut relay.up_write_blocked,
                &mut relay.up_eof,
            ),
        )
        .map_err(io_error)?;
        if moved.inbound > 0 || moved.outbound > 0 {
            *session.last_activity = now;
            stats.received(session.listener, moved.inbound);
            stats.sent(session.listener, moved.outbound);
        }
        if *session.peer_eof && pipes.to_upstream_len == 0 && !relay.up_shut {
            shutdown_write(&relay.upstream).map_err(io_error)?;
            relay.up_shut = true;
        }
        if relay.up_eof && pipes.to_client_len == 0 && !relay.client_shut {
            shutdown_write(session.stream).map_err(io_error)?;
            relay.client_shut = true;
        }
        return Ok(());
    }

    // Copy mode, client → upstream: the handler queued the client's bytes in `to_upstream`.
    if !relay.to_upstream.is_empty() && !relay.up_write_blocked {
        let flushed = relay
            .to_upstream
            .write_to(&mut relay.upstream)
            .map_err(io_error)?;
        relay.up_write_blocked = flushed.blocked;
        if flushed.written > 0 {
            *session.last_activity = now;
        }
    }
    if *session.peer_eof && relay.to_upstream.is_empty() && !relay.up_shut {
        shutdown_write(&relay.upstream).map_err(io_error)?;
        relay.up_shut = true;
    }
    // Upstream → client: into the session's outbound queue, which the loop's flush writes
    // (through TLS when the client is TLS). Not past the high watermark: backpressure.
    while relay.up_readable && !relay.up_eof && session.outbound.len() <= high_watermark {
        match relay.upstream.read(read_buf) {
            Ok(0) => relay.up_eof = true,
            Ok(n) => {
                // A short read drained the socket: the next byte brings a new edge — unless the
                // FIN already arrived, which no later edge will announce.
                if n < read_buf.len() && !relay.up_read_closed {
                    relay.up_readable = false;
                }
                *session.last_activity = now;
                session.outbound.push_copy(&read_buf[..n]);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => relay.up_readable = false,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(io_error(err)),
        }
    }
    // The upstream's FIN reaches the client in `pass_fin_to_client`, once the loop has written
    // the client's queue empty.
    Ok(())
}

/// The upstream's half of a splice pump, borrowed field by field.
struct UpstreamSide<'a> {
    stream: &'a mut TcpStream,
    readable: &'a mut bool,
    write_blocked: &'a mut bool,
    eof: &'a mut bool,
}

fn relay_sides<'a>(
    stream: &'a mut TcpStream,
    readable: &'a mut bool,
    write_blocked: &'a mut bool,
    eof: &'a mut bool,
) -> UpstreamSide<'a> {
    UpstreamSide {
        stream,
        readable,
        write_blocked,
        eof,
    }
}

/// Bytes moved by one splice pump, per direction.
struct Moved {
    inbound: usize,
    outbound: usize,
}

/// Splices both directions until nothing moves. `WouldBlock` from a source is "empty" only
/// when its pipe is empty; with bytes in the pipe it may mean "pipe full", so the source stays
/// marked readable and is tried again once the pipe drains.
fn pump_spliced(
    pipes: &mut Pipes,
    client: &mut TcpStream,
    client_readable: &mut bool,
    client_write_blocked: &mut bool,
    client_eof: &mut bool,
    upstream: UpstreamSide<'_>,
) -> io::Result<Moved> {
    let mut moved = Moved {
        inbound: 0,
        outbound: 0,
    };
    loop {
        let mut progress = false;
        // client → pipe → upstream
        if *client_readable && !*client_eof && pipes.to_upstream_len < PIPE_CAPACITY {
            match splice(
                &*client,
                &pipes.to_upstream.write,
                PIPE_CAPACITY - pipes.to_upstream_len,
            ) {
                Ok(0) => *client_eof = true,
                Ok(n) => {
                    pipes.to_upstream_len += n;
                    moved.inbound += n;
                    progress = true;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if pipes.to_upstream_len == 0 {
                        *client_readable = false;
                    }
                }
                Err(err) => return Err(err),
            }
        }
        if pipes.to_upstream_len > 0 && !*upstream.write_blocked {
            match splice(
                &pipes.to_upstream.read,
                &*upstream.stream,
                pipes.to_upstream_len,
            ) {
                Ok(n) => {
                    pipes.to_upstream_len -= n;
                    progress |= n > 0;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    *upstream.write_blocked = true
                }
                Err(err) => return Err(err),
            }
        }
        // upstream → pipe → client
        if *upstream.readable && !*upstream.eof && pipes.to_client_len < PIPE_CAPACITY {
            match splice(
                &*upstream.stream,
                &pipes.to_client.write,
                PIPE_CAPACITY - pipes.to_client_len,
            ) {
                Ok(0) => *upstream.eof = true,
                Ok(n) => {
                    pipes.to_client_len += n;
                    progress = true;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if pipes.to_client_len == 0 {
                        *upstream.readable = false;
                    }
                }
                Err(err) => return Err(err),
            }
        }
        if pipes.to_client_len > 0 && !*client_write_blocked {
            match splice(&pipes.to_client.read, &*client, pipes.to_client_len) {
                Ok(n) => {
                    pipes.to_client_len -= n;
                    moved.outbound += n;
                    progress |= n > 0;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => *client_write_blocked = true,
                Err(err) => return Err(err),
            }
        }
        if !progress {
            return Ok(moved);
        }
    }
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match stream.shutdown(Shutdown::Write) {
        Err(err) if err.kind() != io::ErrorKind::NotConnected => Err(err),
        _ => Ok(()),
    }
}
