//! A stream session's socket, on either backend: a mio `TcpStream` (epoll: readiness, the
//! loop calls `read`/`writev` itself) or a [`UringStream`] (io_uring: completions).
//!
//! A `UringStream` offers the same `Read`/`Write` face as a non-blocking socket, so every
//! layer above (plain reads, TLS, the outbound queue's `writev`/`sendfile`) works unchanged:
//! `read` takes bytes the ring already received into the stream's inbox (`WouldBlock` when
//! it is empty), `write` copies into the stream's next send (`WouldBlock` once a send's worth
//! is waiting). The event loop moves the inbox and the next send to and from the ring
//! ([`UringStream::sync`]) and turns completions into the same flags epoll edges set
//! (`readable`, `write_blocked`). The ring owns the bytes of a send in flight and a reference
//! to the socket's one descriptor (shared with the stream) until the last completion (see
//! `plexus_sys::uring`): dropping a session frees nothing the kernel still uses, and closes
//! nothing the ring still uses.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use plexus_sys::uring::{ConnId, Ring};

use crate::outbound::FileSink;
use crate::session_id::SessionId;

/// Bytes received and not yet read past which the ring stops receiving for the session (the
/// socket's own buffer, then TCP, hold the rest): one read's worth, like epoll's read buffer.
const INBOX_HIGH: usize = 64 * 1024;
/// Bytes one send takes before `write` returns `WouldBlock` (the default high watermark's
/// worth; what bounds the user-space memory a session holds for the ring). One send is in
/// flight at a time, and `write` takes nothing while it is: a turn moves up to this much per
/// session — a quarter of it was measured too little for a member of a chat flood of one-byte
/// lines to keep up (`chat::one_byte_lines_…`). The watermarks count these bytes with the
/// outbound queue ([`SessionStream::unsent`]).
const SEND_CAP: usize = 1024 * 1024;

/// A stream session's socket.
#[derive(Debug)]
pub(crate) enum SessionStream {
    /// Registered with the loop's mio `Poll` (edge-triggered readiness).
    Epoll(TcpStream),
    /// Served by the loop's io_uring ring (boxed: an epoll session's entry stays small).
    Uring(Box<UringStream>),
}

impl From<TcpStream> for SessionStream {
    fn from(stream: TcpStream) -> Self {
        SessionStream::Epoll(stream)
    }
}

impl SessionStream {
    /// The mio socket, for registration (epoll sessions only).
    pub(crate) fn mio(&mut self) -> Option<&mut TcpStream> {
        match self {
            SessionStream::Epoll(stream) => Some(stream),
            SessionStream::Uring(_) => None,
        }
    }

    /// The io_uring state (io_uring sessions only).
    pub(crate) fn uring(&mut self) -> Option<&mut UringStream> {
        match self {
            SessionStream::Epoll(_) => None,
            SessionStream::Uring(stream) => Some(stream),
        }
    }

    /// Bytes accepted by `write` and not yet written (io_uring: the next send and the one in
    /// flight; epoll: none, `write` hands them to the kernel). The watermarks count them with
    /// the outbound queue: they are the session's memory as much as the queue is.
    pub(crate) fn unsent(&self) -> usize {
        match self {
            SessionStream::Epoll(_) => 0,
            SessionStream::Uring(stream) => stream
                .next_send
                .len()
                .saturating_add(stream.in_flight_bytes),
        }
    }

    /// Whether bytes accepted by `write` are still on their way to the socket (io_uring): the
    /// session may not end, nor shut its write side, before they are written.
    pub(crate) fn sending(&self) -> bool {
        match self {
            SessionStream::Epoll(_) => false,
            SessionStream::Uring(stream) => stream.in_flight() || !stream.next_send.is_empty(),
        }
    }

    /// The socket's local address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            SessionStream::Epoll(stream) => stream.local_addr(),
            SessionStream::Uring(stream) => socket2::SockRef::from(&stream.socket)
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::ErrorKind::Unsupported.into()),
        }
    }

    /// Shuts the write side (a FIN), after everything accepted was written.
    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        let result = match self {
            SessionStream::Epoll(stream) => stream.shutdown(Shutdown::Write),
            SessionStream::Uring(stream) => {
                socket2::SockRef::from(&stream.socket).shutdown(Shutdown::Write)
            }
        };
        match result {
            Err(err) if err.kind() != io::ErrorKind::NotConnected => Err(err),
            _ => Ok(()),
        }
    }
}

impl AsFd for SessionStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            SessionStream::Epoll(stream) => stream.as_fd(),
            SessionStream::Uring(stream) => stream.socket.as_fd(),
        }
    }
}

impl Read for SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SessionStream::Epoll(stream) => stream.read(buf),
            SessionStream::Uring(stream) => stream.read(buf),
        }
    }
}

impl Write for SessionStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            SessionStream::Epoll(stream) => stream.write_vectored(bufs),
            SessionStream::Uring(stream) => stream.accept(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileSink for SessionStream {
    fn send_file(&mut self, file: &File, offset: &mut u64, len: usize) -> io::Result<usize> {
        match self {
            SessionStream::Epoll(stream) => stream.send_file(file, offset, len),
            SessionStream::Uring(stream) => {
                // Bytes accepted before the file go first: wait for them.
                if stream.in_flight() || !stream.next_send.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                // The ring has nothing in flight to write: the kernel copies the file now.
                let sent = plexus_sys::sendfile::sendfile(&stream.socket, file, offset, len);
                // A short or blocked `sendfile` means the socket buffer is full: the ring
                // says when it has room (what an epoll writable edge says).
                match &sent {
                    Ok(n) if *n < len => stream.want_writable = true,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        stream.want_writable = true
                    }
                    _ => {}
                }
                sent
            }
        }
    }

    fn write_before_file(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            SessionStream::Epoll(stream) => stream.write_before_file(bufs),
            SessionStream::Uring(stream) => stream.accept(bufs),
        }
    }
}

/// An io_uring session's socket state on the loop's side.
#[derive(Debug)]
pub(crate) struct UringStream {
    /// The socket's descriptor, shared with the ring (which holds it until its operations
    /// completed): for the calls that stay synchronous (`sendfile`, `shutdown`, addresses).
    socket: Arc<OwnedFd>,
    conn: ConnId,
    /// Received, not yet read.
    inbox: BytesMut,
    /// How receiving ended: `Ok` for the peer's FIN, or the error.
    read_end: Option<Result<(), io::ErrorKind>>,
    /// Whether the ring is asked to receive (off while the inbox is full).
    receiving: bool,
    /// Accepted by `write`, handed to the ring by the next `sync`.
    next_send: Vec<u8>,
    /// The bytes of the send in flight (the ring holds them until it completes; 0: none is,
    /// as a send is never empty).
    in_flight_bytes: usize,
    /// A send failed: the next `write` reports it.
    write_error: Option<io::ErrorKind>,
    /// `sendfile` would block: ask the ring for a writable completion.
    want_writable: bool,
    /// Moving back to readiness (to splice): how far.
    leaving: Leaving,
    /// The epoll side's descriptor of the socket, made when the move starts.
    for_epoll: Option<OwnedFd>,
    /// The linked session (slab key, id) to splice with once on epoll.
    pub(crate) splice_peer: Option<(usize, SessionId)>,
    /// Listed for serving after this batch of completions.
    pub(crate) notified: bool,
}

/// How far an io_uring session is on its way back to epoll ([`UringStream::leave`]).
#[derive(Debug)]
enum Leaving {
    /// Served by the ring.
    No,
    /// Asked to leave: the receive is stopped, what was accepted is still being sent.
    Draining,
    /// Given to [`Ring::detach`]: waiting for the ring's last completion.
    Detaching,
    /// The ring let go of the socket (its operations are over): the session may move to epoll
    /// once the inbox is read.
    Detached,
}

impl UringStream {
    /// Registers `stream` with `ring` (completions carry `tag`) and starts receiving. The
    /// ring shares the socket's descriptor: no second one is made.
    pub(crate) fn register(stream: TcpStream, ring: &mut Ring, tag: usize) -> Box<Self> {
        let socket = Arc::new(OwnedFd::from(stream));
        let conn = ring.register(Arc::clone(&socket), tag);
        ring.start_recv(conn);
        Box::new(UringStream {
            socket,
            conn,
            inbox: BytesMut::new(),
            read_end: None,
            receiving: true,
            next_send: Vec::new(),
            in_flight_bytes: 0,
            write_error: None,
            want_writable: false,
            leaving: Leaving::No,
            for_epoll: None,
            splice_peer: None,
            notified: false,
        })
    }

    /// Whether a send is in flight.
    fn in_flight(&self) -> bool {
        self.in_flight_bytes > 0
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.inbox.is_empty() {
            let n = self.inbox.len().min(buf.len());
            if let (Some(to), Some(from)) = (buf.get_mut(..n), self.inbox.get(..n)) {
                to.copy_from_slice(from);
            }
            self.inbox.advance(n);
            if self.inbox.is_empty() {
                // Give the memory back: an idle session holds no buffer.
                self.inbox = BytesMut::new();
            }
            return Ok(n);
        }
        match self.read_end {
            Some(Ok(())) => Ok(0),
            Some(Err(kind)) => Err(kind.into()),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn accept(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(kind) = self.write_error {
            return Err(kind.into());
        }
        let mut room = SEND_CAP.saturating_sub(self.next_send.len());
        // A session leaving the ring takes nothing more: the outbound queue keeps it for epoll.
        if room == 0 || self.in_flight() || !matches!(self.leaving, Leaving::No) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0usize;
        for buf in bufs {
            let part = buf.get(..room.min(buf.len())).unwrap_or_default();
            self.next_send.extend_from_slice(part);
            taken = taken.saturating_add(part.len());
            room = room.saturating_sub(part.len());
            if room == 0 {
                break;
            }
        }
        Ok(taken)
    }

    /// Bytes the ring received for this session.
    pub(crate) fn received(&mut self, data: &[u8]) {
        self.inbox.extend_from_slice(data);
    }

    /// Receiving ended: the peer's FIN (`Ok`) or an error.
    pub(crate) fn read_ended(&mut self, end: Result<(), io::ErrorKind>) {
        self.read_end.get_or_insert(end);
        self.receiving = false;
    }

    /// The send in flight completed.
    pub(crate) fn sent(&mut self, result: io::Result<usize>) {
        self.in_flight_bytes = 0;
        if let Err(err) = result {
            self.write_error.get_or_insert(err.kind());
        }
    }

    /// Moves the loop's side to the ring: the next send (if none is in flight), a request
    /// for writability, and receiving on or off by how full the inbox is.
    pub(crate) fn sync(&mut self, ring: &mut Ring) {
        if matches!(self.leaving, Leaving::Detaching | Leaving::Detached) {
            return;
        }
        if !self.in_flight() && !self.next_send.is_empty() {
            let data = std::mem::take(&mut self.next_send);
            let len = data.len();
            match ring.send(self.conn, data) {
                Ok(()) => self.in_flight_bytes = len,
                Err(data) => self.next_send = data,
            }
        }
        if self.want_writable {
            self.want_writable = false;
            ring.poll_writable(self.conn);
        }
        if matches!(self.leaving, Leaving::Draining) {
            if self.receiving {
                self.receiving = false;
                ring.stop_recv(self.conn);
            }
            if !self.in_flight() && self.next_send.is_empty() && !self.want_writable {
                self.leaving = match ring.detach(self.conn) {
                    Some(_ring_reference) => Leaving::Detached,
                    None => Leaving::Detaching,
                };
            }
            return;
        }
        let full = self.inbox.len() >= INBOX_HIGH;
        if self.receiving && full {
            self.receiving = false;
            ring.stop_recv(self.conn);
        } else if !self.receiving && !full && self.read_end.is_none() {
            self.receiving = true;
            ring.start_recv(self.conn);
        }
    }

    /// Ends the session's use of the ring: a last send of what was accepted (best effort, as
    /// a non-blocking write would be), then every operation cancelled; the ring drops its
    /// reference to the descriptor once their completions arrived (the descriptor closes when
    /// this stream's goes too).
    pub(crate) fn retire(&mut self, ring: &mut Ring) {
        if matches!(self.leaving, Leaving::Detached) {
            // The ring let go of the socket (its ConnId may be another socket's by now).
            return;
        }
        if !self.in_flight() && !self.next_send.is_empty() {
            let _ = ring.send(self.conn, std::mem::take(&mut self.next_send));
        }
        ring.retire(self.conn);
    }
}

impl UringStream {
    /// Starts moving the session back to readiness (to splice its socket): no more receiving,
    /// what was accepted is sent, then the ring lets go of its descriptor
    /// ([`UringStream::detached`]). The epoll side gets a descriptor of its own, made here:
    /// the one shared with the ring cannot be moved out of the stream while it lives. `Err`
    /// (nothing changes: the session stays on the ring, and its pair copies) when no
    /// descriptor is left.
    pub(crate) fn leave(&mut self, peer: (usize, SessionId)) -> io::Result<()> {
        if matches!(self.leaving, Leaving::No) {
            self.for_epoll = Some(self.socket.try_clone()?);
            self.leaving = Leaving::Draining;
        }
        self.splice_peer = Some(peer);
        Ok(())
    }

    /// The ring reported [`plexus_sys::uring::Completion::Detached`] (and dropped its
    /// reference to the descriptor with it).
    pub(crate) fn detached(&mut self) {
        self.leaving = Leaving::Detached;
    }

    /// The socket, as a mio stream for epoll, once the ring let go of it and every byte it
    /// received was read (a received end stays with the socket: reading it again says so).
    /// It is the descriptor made by [`UringStream::leave`]; this stream's closes with it.
    pub(crate) fn take_for_epoll(&mut self) -> Option<TcpStream> {
        if !self.inbox.is_empty() || !matches!(self.leaving, Leaving::Detached) {
            return None;
        }
        let fd = self.for_epoll.take()?;
        Some(TcpStream::from_std(std::net::TcpStream::from(fd)))
    }
}
