//! An io_uring completion ring for stream sockets: every `unsafe` of plexus' io_uring
//! backend lives here.
//!
//! [`Ring`] owns the kernel ring, a provided-buffer ring for multishot receives, and a table
//! of the operations in flight. The ownership rule that makes the `unsafe` sound: **every
//! buffer the kernel may read or write belongs to the ring until the operation's completion
//! arrives** — a send's bytes are a `Vec` moved into the operation table, receive buffers are
//! slots of the ring's own buffer area, and the ring holds a reference to a socket's
//! descriptor (an `Arc<OwnedFd>`, shared with the socket's user: one descriptor per socket)
//! until its last operation completed ([`Ring::retire`] cancels them; the descriptor is closed
//! when both the last completion arrived and the user let go of it). Dropping the ring cancels everything and waits for the
//! completions; if that fails the buffers are leaked rather than freed under the kernel.
//!
//! The ring also accepts connections on listening sockets ([`Ring::accept`]: one multishot
//! accept per socket, which keeps the socket open until its last completion) and watches
//! foreign descriptors ([`Ring::watch`], e.g. mio's epoll descriptor),
//! so that a loop blocks in one place: [`Ring::submit_and_wait`].

use std::alloc::{self, Layout};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

#[path = "uring_dgram.rs"]
mod dgram;
pub use dgram::{DgramId, DgramRingError};

/// user_data of cancel requests: their completions carry nothing to do.
const CANCEL: u64 = u64::MAX;
/// The provided-buffer group of the ring's receive buffers.
const BUFFER_GROUP: u16 = 0;
/// Alignment the kernel wants for a buffer ring (one page).
const PAGE: usize = 4096;
/// How many times `Drop` waits for outstanding completions before leaking the buffers.
const DROP_WAITS: usize = 100;

/// Why a ring could not be set up (the caller serves on epoll instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// `io_uring_setup` failed: no io_uring in this kernel (ENOSYS), disabled by
    /// `kernel.io_uring_disabled` or a seccomp filter (EPERM), or out of memory.
    #[error("io_uring_setup failed: {0}")]
    Setup(io::Error),
    /// Probing the kernel's operations failed.
    #[error("cannot probe io_uring operations: {0}")]
    Probe(io::Error),
    /// The kernel lacks an operation or feature the ring needs.
    #[error("the kernel lacks io_uring {0}")]
    Missing(&'static str),
    /// The provided-buffer ring could not be allocated or registered (Linux < 5.19).
    #[error("cannot register the provided-buffer ring: {0}")]
    BufferRing(io::Error),
    /// Turned off by the operator (for instance `PLEXUS_IO_URING=off`).
    #[error("turned off by {0}")]
    Disabled(&'static str),
}

/// Sizes of a ring.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue has twice as many).
    pub entries: u32,
    /// Receive buffers in the provided-buffer ring (a power of two, at most 32768).
    pub buffers: u16,
    /// Bytes per receive buffer.
    pub buffer_size: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            entries: 1024,
            buffers: 128,
            buffer_size: 16 * 1024,
        }
    }
}

/// A socket registered with a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(usize);

/// A listening socket's multishot accept on a [`Ring`] ([`Ring::accept`]); valid until its
/// [`Completion::AcceptEnded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptId(u64);

/// A listening socket handed to [`Ring::accept`]: the operation keeps it (and so the socket)
/// until its last completion, so its descriptor cannot be closed, and its number reused,
/// under the kernel.
pub type Listening = Arc<dyn AsRawFd + Send + Sync>;

/// What a completion means for the ring's user. `tag` is the value given to
/// [`Ring::register`].
#[derive(Debug)]
pub enum Completion<'a> {
    /// Bytes received (valid only during the callback: the buffer goes back to the ring).
    Received {
        /// The socket's tag.
        tag: usize,
        /// The bytes.
        data: &'a [u8],
    },
    /// The peer ended its side (a receive returned 0): nothing more is received.
    ReadClosed {
        /// The socket's tag.
        tag: usize,
    },
    /// Receiving failed (ECONNRESET…): nothing more is received.
    ReadFailed {
        /// The socket's tag.
        tag: usize,
        /// Why.
        error: io::Error,
    },
    /// Everything handed to [`Ring::send`] was written (or writing failed).
    Sent {
        /// The socket's tag.
        tag: usize,
        /// Bytes written, or why writing failed.
        result: io::Result<usize>,
    },
    /// The socket became writable ([`Ring::poll_writable`]).
    Writable {
        /// The socket's tag.
        tag: usize,
    },
    /// A socket given to [`Ring::detach`] has no operation in flight any more: the ring
    /// hands its reference to the descriptor back and forgets the socket (its [`ConnId`] is
    /// not to be used again).
    Detached {
        /// The socket's tag.
        tag: usize,
        /// The descriptor given to [`Ring::register`].
        fd: Arc<OwnedFd>,
    },
    /// A connection accepted on a listening socket ([`Ring::accept`]): its descriptor,
    /// non-blocking and close-on-exec (the peer's address is `getpeername(2)`'s: a multishot
    /// accept has no address buffer of its own).
    Accepted {
        /// The token given to `accept`.
        token: u64,
        /// The connection's descriptor.
        fd: OwnedFd,
    },
    /// A listening socket's accept ended, and nothing more is accepted until [`Ring::accept`]
    /// is called again: after [`Ring::stop_accept`] (`error` is `None`), an accept that failed
    /// (`EMFILE`…: the connection stays in the socket's queue), or the kernel ending the
    /// multishot on its own (a full completion queue; `None`).
    AcceptEnded {
        /// The token given to `accept`.
        token: u64,
        /// Why, when an accept failed.
        error: Option<io::Error>,
    },
    /// A watched descriptor became readable ([`Ring::watch`]).
    Watched {
        /// The token given to `watch`.
        token: u64,
    },
    /// One datagram received on a datagram socket ([`Ring::start_datagrams`]); valid only
    /// during the callback. A buffer coalesced by `UDP_GRO` is reported datagram by datagram.
    Datagram {
        /// The socket's tag (given to [`Ring::register_datagrams`]).
        tag: usize,
        /// The sender (`None` for a family other than IPv4/IPv6).
        source: Option<std::net::SocketAddr>,
        /// The datagram's bytes.
        data: &'a [u8],
        /// Longer than the receive buffer: its tail is lost.
        truncated: bool,
    },
    /// A send of [`Ring::send_datagrams`] completed.
    DatagramsSent {
        /// The socket's tag.
        tag: usize,
        /// Datagrams the send carried (0 for a refused segmentation, sent again one by one).
        datagrams: usize,
        /// Their bytes.
        bytes: usize,
        /// Whether they went out.
        result: io::Result<()>,
        /// The kernel refused `UDP_SEGMENT` for this send.
        refused: Option<crate::dgram::GsoRefusal>,
    },
}

/// One receive buffer area and its ring of free buffers, shared with the kernel.
struct BufferRing {
    /// The ring of free buffers: `count` entries, page aligned, written by us, read by the
    /// kernel (its `resv` field of entry 0 is the tail).
    entries: *mut types::BufRingEntry,
    entries_layout: Layout,
    /// The buffers: `count × size` bytes, written by the kernel. Never borrowed as a whole:
    /// only a buffer whose completion arrived is read, and only until it is given back.
    memory: *mut u8,
    memory_layout: Layout,
    count: u16,
    size: usize,
    tail: u16,
}

// SAFETY: a `BufferRing` owns its two allocations exclusively (like a `Box`); moving it to
// another thread moves that ownership. The kernel's view of them does not depend on threads.
unsafe impl Send for BufferRing {}

impl BufferRing {
    fn new(count: u16, size: usize) -> io::Result<BufferRing> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        if count == 0 || !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(invalid());
        }
        let entries_size = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        let entries_layout = Layout::from_size_align(entries_size, PAGE).map_err(|_| invalid())?;
        let memory_size = usize::from(count).checked_mul(size).ok_or_else(invalid)?;
        let memory_layout = Layout::from_size_align(memory_size, PAGE).map_err(|_| invalid())?;
        // SAFETY: both layouts have a non-zero size (count ≥ 1, size ≥ 1).
        let entries = unsafe { alloc::alloc_zeroed(entries_layout) }.cast::<types::BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: as above.
        let memory = unsafe { alloc::alloc_zeroed(memory_layout) };
        if memory.is_null() {
            // SAFETY: allocated just above with this layout, not shared with anyone yet.
            unsafe { alloc::dealloc(entries.cast(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // Touch every page now: the area is a fixed cost of the ring, paid (and visible in
        // the process's RSS) at setup rather than as the first bytes arrive.
        for page in (0..memory_size).step_by(PAGE) {
            // SAFETY: `page < memory_size`: inside the allocation, which nobody else uses yet.
            unsafe { memory.add(page).write_volatile(0) };
        }
        Ok(BufferRing {
            entries,
            entries_layout,
            memory,
            memory_layout,
            count,
            size,
            tail: 0,
        })
    }

    /// Puts buffer `bid` in the next free entry (published by [`BufferRing::publish`]).
    fn give(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: `index < count`, so the entry is inside the allocation; the kernel reads
        // only entries before the published tail, and this one is past it (ring discipline:
        // at most `count` buffers exist, so the slot at `tail` was consumed already).
        let entry = unsafe { &mut *self.entries.add(index) };
        // SAFETY: `bid < count`: the buffer lies inside `memory`.
        let addr = unsafe { self.memory.add(usize::from(bid) * self.size) };
        entry.set_addr(addr as u64);
        entry.set_len(u32::try_from(self.size).unwrap_or(u32::MAX));
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries given so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: `entries` is the page-aligned first entry of the ring; the tail field is a
        // u16 inside it, aligned for `AtomicU16`, and the kernel reads it atomically too.
        let tail =
            unsafe { AtomicU16::from_ptr(types::BufRingEntry::tail(self.entries).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, which the kernel just completed.
    ///
    /// # Safety
    /// `bid` must be a buffer whose completion arrived and which was not given back since.
    unsafe fn filled(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: the caller guarantees the kernel is done with this buffer and will not
        // touch it until it is given back; it lies inside `memory` (`bid < count` checked by
        // the caller) and `len ≤ size`.
        unsafe { std::slice::from_raw_parts(self.memory.add(usize::from(bid) * self.size), len) }
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts. `Ring::drop` drops this only after
        // the kernel ring was closed with no operation in flight (or leaks it instead).
        unsafe {
            alloc::dealloc(self.entries.cast(), self.entries_layout);
            alloc::dealloc(self.memory, self.memory_layout);
        }
    }
}

enum OpKind {
    /// The multishot receive of a socket.
    Recv,
    /// A send: the bytes, and how many were written so far.
    Send { data: Vec<u8>, done: usize },
    /// A one-shot POLLOUT on a socket.
    Writable,
    /// A multishot POLLIN on a foreign descriptor.
    Watch { fd: RawFd, token: u64 },
    /// A multishot accept on a listening socket, kept open (never read) until it ends.
    Accept { _listener: Listening, token: u64 },
    /// A datagram socket's receive or send (`uring_dgram.rs`).
    Dgram(dgram::DgramOp),
}

struct Op {
    conn: Option<ConnId>,
    kind: OpKind,
}

struct Conn {
    /// Shared with the socket's user; the ring's reference goes when its last operation did.
    fd: Arc<OwnedFd>,
    tag: usize,
    /// Operations in flight for this socket.
    ops: usize,
    recv: Option<u64>,
    want_recv: bool,
    send: Option<u64>,
    writable: Option<u64>,
    /// Closed by its user: report nothing, close the descriptor after the last completion.
    retired: bool,
    /// Leaving the ring ([`Ring::detach`]): report [`Completion::Detached`] after the last
    /// completion.
    detaching: bool,
}

/// A completion ring for stream sockets (see the module docs for the ownership rule).
pub struct Ring {
    ring: IoUring,
    /// Freed by `Drop` only once no operation is in flight (leaked otherwise).
    buffers: ManuallyDrop<BufferRing>,
    /// Completions taken from the queue, handled one by one (kept for its capacity).
    cqes: Vec<cqueue::Entry>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    conns: Vec<Option<Conn>>,
    free_conns: Vec<usize>,
    /// Entries that found the submission queue full, pushed after the next submit.
    backlog: Vec<squeue::Entry>,
    in_flight: usize,
    /// [`Ring::enable`] was called (a disabled ring submits nothing).
    enabled: bool,
    /// Datagram sockets and their buffer group (`uring_dgram.rs`).
    dgram: dgram::Datagrams,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Sets up a ring: the kernel ring (single issuer, deferred task work where the kernel
    /// has them), a probe for the operations used, and the provided-buffer ring. The ring
    /// starts disabled, so that it can be made on one thread and used on another: the thread
    /// that calls [`Ring::enable`] is its single issuer.
    pub fn new(config: RingConfig) -> Result<Ring, RingError> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .setup_cqsize(config.entries.saturating_mul(2))
            .build(config.entries)
            .or_else(|_| {
                // Older kernels (< 6.1) reject the newer setup flags: try without them.
                IoUring::builder()
                    .setup_r_disabled()
                    .setup_cqsize(config.entries.saturating_mul(2))
                    .build(config.entries)
            })
            .map_err(RingError::Setup)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(RingError::Missing(
                "IORING_FEAT_EXT_ARG (waits with a timeout)",
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Probe)?;
        for (code, name) in [
            (opcode::RecvMulti::CODE, "RECV"),
            (opcode::Send::CODE, "SEND"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::AcceptMulti::CODE, "ACCEPT"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err(RingError::Missing(name));
            }
        }
        let mut buffers =
            BufferRing::new(config.buffers, config.buffer_size).map_err(RingError::BufferRing)?;
        // SAFETY: `buffers.entries` is a page-aligned allocation of `count` entries that lives
        // as long as the ring: the field order drops `ring` (unregistering it) first.
        unsafe {
            ring.submitter()
                .register_buf_ring(buffers.entries as u64, buffers.count, BUFFER_GROUP)
        }
        .map_err(RingError::BufferRing)?;
        for bid in 0..buffers.count {
            buffers.give(bid);
        }
        buffers.publish();
        Ok(Ring {
            ring,
            buffers: ManuallyDrop::new(buffers),
            cqes: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            conns: Vec::new(),
            free_conns: Vec::new(),
            backlog: Vec::new(),
            in_flight: 0,
            enabled: false,
            dgram: dgram::Datagrams::new(dgram::Datagrams::probe(&probe)),
        })
    }

    /// Enables the ring: from now on the calling thread is the only one that submits.
    pub fn enable(&mut self) -> io::Result<()> {
        if self.enabled {
            return Ok(());
        }
        self.ring.submitter().register_enable_rings()?;
        self.enabled = true;
        Ok(())
    }

    /// Takes a reference to a socket's descriptor (its user may keep another one, for the
    /// calls that stay synchronous: no second descriptor is needed); completions for it carry
    /// `tag`.
    pub fn register(&mut self, fd: impl Into<Arc<OwnedFd>>, tag: usize) -> ConnId {
        let conn = Conn {
            fd: fd.into(),
            tag,
            ops: 0,
            recv: None,
            want_recv: false,
            send: None,
            writable: None,
            retired: false,
            detaching: false,
        };
        match self.free_conns.pop() {
            Some(index) => {
                if let Some(slot) = self.conns.get_mut(index) {
                    *slot = Some(conn);
                }
                ConnId(index)
            }
            None => {
                self.conns.push(Some(conn));
                ConnId(self.conns.len() - 1)
            }
        }
    }

    /// The socket's descriptor, for the calls that stay synchronous (`sendfile`, `shutdown`,
    /// socket options).
    pub fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
        self.conn(conn).map(|conn| conn.fd.as_fd())
    }

    /// Receives on the socket (multishot, into the provided buffers) until
    /// [`Ring::stop_recv`], the peer's end or an error.
    pub fn start_recv(&mut self, conn: ConnId) {
        let Some(state) = self.conn_mut(conn).filter(|state| !state.detaching) else {
            return;
        };
        state.want_recv = true;
        if state.recv.is_none() {
            let fd = state.fd.as_raw_fd();
            let entry = opcode::RecvMulti::new(types::Fd(fd), BUFFER_GROUP).build();
            if let Some(user_data) = self.start_op(Some(conn), OpKind::Recv, entry) {
                if let Some(state) = self.conn_mut(conn) {
                    state.recv = Some(user_data);
                }
            }
        }
    }

    /// Stops receiving (the socket's own buffer holds what arrives next: TCP backpressure).
    pub fn stop_recv(&mut self, conn: ConnId) {
        let Some(state) = self.conn_mut(conn) else {
            return;
        };
        state.want_recv = false;
        if let Some(user_data) = state.recv {
            self.cancel(user_data);
        }
    }

    /// Whether a send of this socket is in flight.
    pub fn sending(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some_and(|conn| conn.send.is_some())
    }

    /// Sends `data` (all of it: a short write is continued by the ring). One send per socket
    /// at a time: while one is in flight, `data` is handed back.
    pub fn send(&mut self, conn: ConnId, data: Vec<u8>) -> Result<(), Vec<u8>> {
        let Some(state) = self.conn(conn) else {
            return Err(data);
        };
        if state.send.is_some() || state.retired || state.detaching || data.is_empty() {
            return Err(data);
        }
        let fd = state.fd.as_raw_fd();
        let entry = send_entry(fd, &data, 0);
        // The Vec's heap buffer does not move when the Vec moves into the table.
        match self.start_op(Some(conn), OpKind::Send { data, done: 0 }, entry) {
            Some(user_data) => {
                if let Some(state) = self.conn_mut(conn) {
                    state.send = Some(user_data);
                }
                Ok(())
            }
            None => Err(Vec::new()),
        }
    }

    /// Reports [`Completion::Writable`] once the socket can take more bytes.
    pub fn poll_writable(&mut self, conn: ConnId) {
        let Some(state) = self.conn(conn) else {
            return;
        };
        if state.writable.is_some() || state.retired {
            return;
        }
        let fd = state.fd.as_raw_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build();
        if let Some(user_data) = self.start_op(Some(conn), OpKind::Writable, entry) {
            if let Some(state) = self.conn_mut(conn) {
                state.writable = Some(user_data);
            }
        }
    }

    /// Reports [`Completion::Watched`] whenever `fd` becomes readable, until the ring is
    /// dropped. The kernel takes its own reference to the file when the request is submitted
    /// (a descriptor closed before that completes the request with `EBADF`): no memory is
    /// involved, so any descriptor is safe to pass.
    pub fn watch(&mut self, fd: &impl AsRawFd, token: u64) {
        let fd = fd.as_raw_fd();
        let entry = watch_entry(fd);
        let _ = self.start_op(None, OpKind::Watch { fd, token }, entry);
    }

    /// Accepts connections on `listener` (one multishot accept, reported as
    /// [`Completion::Accepted`] with `token`) until [`Ring::stop_accept`] or an error
    /// ([`Completion::AcceptEnded`]). The operation holds `listener` until it ended: no memory
    /// is involved (no address buffer), and the descriptor stays open under the kernel.
    pub fn accept(&mut self, listener: Listening, token: u64) -> AcceptId {
        let fd = listener.as_raw_fd();
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build();
        let kind = OpKind::Accept {
            _listener: listener,
            token,
        };
        // `start_op` fails only for an index past u64::MAX; `stop_accept` then finds nothing.
        AcceptId(self.start_op(None, kind, entry).unwrap_or(CANCEL))
    }

    /// Stops an accept: its [`Completion::AcceptEnded`] follows (connections it accepted
    /// before the cancel reached it are reported first).
    pub fn stop_accept(&mut self, accept: AcceptId) {
        let index = usize::try_from(accept.0).unwrap_or(usize::MAX);
        let accepting = self.ops.get(index).and_then(Option::as_ref);
        if accepting.is_some_and(|op| matches!(op.kind, OpKind::Accept { .. })) {
            self.cancel(accept.0);
        }
    }

    /// Ends a socket: cancels its operations and lets go of the ring's reference to its
    /// descriptor once the last one completed (at once if none is in flight); the descriptor
    /// closes when its user's reference is gone too. Nothing more is reported for it. Bytes of a
    /// send in flight go out only if the socket takes them before the cancel reaches it.
    pub fn retire(&mut self, conn: ConnId) {
        let Some(state) = self.conn_mut(conn) else {
            return;
        };
        state.retired = true;
        state.want_recv = false;
        let pending = [state.recv, state.send, state.writable];
        if state.ops == 0 {
            self.release_conn(conn);
            return;
        }
        for user_data in pending.into_iter().flatten() {
            self.cancel(user_data);
        }
    }

    /// Moves a socket off the ring (its user goes on with readiness, e.g. to `splice(2)` it):
    /// stops receiving and cancels a writability poll, lets a send in flight finish, and once
    /// the last completion arrived hands its reference to the descriptor back in
    /// [`Completion::Detached`]. Bytes received until then are reported as usual. Returns it
    /// at once if nothing was in flight (no `Detached` follows then).
    pub fn detach(&mut self, conn: ConnId) -> Option<Arc<OwnedFd>> {
        let state = self.conn_mut(conn)?;
        state.detaching = true;
        state.want_recv = false;
        let pending = [state.recv, state.writable];
        if state.ops == 0 {
            return self.release_conn(conn).map(|state| state.fd);
        }
        for user_data in pending.into_iter().flatten() {
            self.cancel(user_data);
        }
        None
    }

    /// Operations in flight (cancelled ones included, until their completion arrives).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Registered sockets, retired ones whose operations are still in flight included.
    pub fn sockets(&self) -> usize {
        self.conns.iter().filter(|conn| conn.is_some()).count()
    }

    /// Submits what was queued without waiting for anything (no system call when nothing
    /// is queued): a user busy for a while gets its sends going before its next wait.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() && self.backlog.is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => {}
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(err) => return Err(err),
        }
        self.push_backlog();
        Ok(())
    }

    /// Submits what was queued and waits for at least one completion, at most `timeout`
    /// (`None`: no limit, zero: no wait).
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            // Completions are waiting already: submit, do not sleep.
            return self.submit_now(Some(Duration::ZERO));
        }
        self.submit_now(timeout)
    }

    fn submit_now(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            Some(timeout) => {
                let ts = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submitter().submit_and_wait(1),
        };
        match result {
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(err) => return Err(err),
        }
        self.push_backlog();
        Ok(())
    }

    /// Hands every completion that arrived to `report`, in order; re-arms multishot
    /// operations that ended early and continues short sends.
    pub fn complete(&mut self, mut report: impl FnMut(Completion<'_>)) {
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.extend(self.ring.completion());
            if cqes.is_empty() {
                break;
            }
            for cqe in cqes.drain(..) {
                self.handle(cqe, &mut report);
            }
        }
        self.cqes = cqes;
        self.buffers.publish();
        self.dgram.publish();
        self.push_backlog();
    }

    fn handle(&mut self, cqe: cqueue::Entry, report: &mut impl FnMut(Completion<'_>)) {
        let user_data = cqe.user_data();
        if user_data == CANCEL {
            return;
        }
        let result = cqe.result();
        let flags = cqe.flags();
        let more = cqueue::more(flags);
        let index = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(conn_id) = self
            .ops
            .get(index)
            .and_then(Option::as_ref)
            .map(|op| op.conn)
        else {
            return;
        };
        let (tag, retired, fd) = match conn_id.and_then(|id| self.conn(id)) {
            Some(conn) => (conn.tag, conn.retired, conn.fd.as_raw_fd()),
            None => (0, true, -1),
        };
        if let Some(Some(Op {
            kind: OpKind::Dgram(_),
            ..
        })) = self.ops.get(index)
        {
            self.handle_dgram(index, &cqe, report);
            return;
        }
        let Some(op) = self.ops.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        match &mut op.kind {
            OpKind::Recv => {
                if let Some(bid) = cqueue::buffer_select(flags) {
                    if result > 0 && !retired {
                        let len = usize::try_from(result).unwrap_or(0);
                        // SAFETY: this completion selected buffer `bid`; the kernel is done with
                        // it and it goes back to the ring only below, after `report` returned.
                        let data = unsafe { self.buffers.filled(bid, len) };
                        report(Completion::Received { tag, data });
                    }
                    self.buffers.give(bid);
                }
                if more {
                    return;
                }
                self.finish_op(index);
                let Some(id) = conn_id else { return };
                if let Some(conn) = self.conn_mut(id) {
                    conn.recv = None;
                }
                match result {
                    0 if !retired => report(Completion::ReadClosed { tag }),
                    // Out of buffers, a multishot ended by the kernel, or a cancel that a new
                    // `start_recv` overtook: go on receiving if still wanted.
                    n if (n > 0 || n == -libc::ENOBUFS || n == -libc::ECANCELED) && !retired => {
                        self.rearm_recv(id)
                    }
                    n if n < 0 && n != -libc::ECANCELED && !retired => {
                        report(Completion::ReadFailed {
                            tag,
                            error: io::Error::from_raw_os_error(-n),
                        })
                    }
                    _ => {}
                }
                self.maybe_release(id, report);
            }
            OpKind::Send { data, done } => {
                if result > 0 && !retired {
                    *done = done.saturating_add(usize::try_from(result).unwrap_or(0));
                    if *done < data.len() {
                        // A short write: the rest goes in a new request of the same operation.
                        let entry = send_entry(fd, data, *done).user_data(user_data);
                        self.push(entry);
                        return;
                    }
                }
                let written = *done;
                self.finish_op(index);
                let Some(id) = conn_id else { return };
                if let Some(conn) = self.conn_mut(id) {
                    conn.send = None;
                }
                if !retired {
                    let result = match result {
                        n if n < 0 => Err(io::Error::from_raw_os_error(-n)),
                        0 => Err(io::ErrorKind::WriteZero.into()),
                        _ => Ok(written),
                    };
                    report(Completion::Sent { tag, result });
                }
                self.maybe_release(id, report);
            }
            OpKind::Writable => {
                self.finish_op(index);
                let Some(id) = conn_id else { return };
                if let Some(conn) = self.conn_mut(id) {
                    conn.writable = None;
                }
                if !retired {
                    report(Completion::Writable { tag });
                }
                self.maybe_release(id, report);
            }
            OpKind::Dgram(_) => {}
            OpKind::Accept { token, .. } => {
                let token = *token;
                if result >= 0 {
                    // SAFETY: a successful accept's result is a descriptor the kernel has just
                    // installed in this process for us; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(result) };
                    report(Completion::Accepted { token, fd });
                }
                if !more {
                    // Dropping the operation lets go of the listening socket.
                    self.finish_op(index);
                    let failed = result < 0 && result != -libc::ECANCELED;
                    let error = failed.then(|| io::Error::from_raw_os_error(-result));
                    report(Completion::AcceptEnded { token, error });
                }
            }
            OpKind::Watch { fd, token } => {
                let (fd, token) = (*fd, *token);
                if result >= 0 {
                    report(Completion::Watched { token });
                }
                if !more {
                    // The multishot poll ended (overflow, or its file went away): arm it again
                    // unless the descriptor is gone.
                    self.finish_op(index);
                    if result != -libc::EBADF && result != -libc::ECANCELED {
                        let entry = watch_entry(fd);
                        let _ = self.start_op(None, OpKind::Watch { fd, token }, entry);
                    }
                }
            }
        }
    }

    /// Arms the receive again if its user still wants it (not after [`Ring::stop_recv`]).
    fn rearm_recv(&mut self, conn: ConnId) {
        if self.conn(conn).is_some_and(|state| state.want_recv) {
            self.start_recv(conn);
        }
    }

    fn conn(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(conn.0).and_then(Option::as_ref)
    }

    fn conn_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(conn.0).and_then(Option::as_mut)
    }

    /// Closes a retired or detached socket's descriptor once nothing is in flight for it
    /// (a detached one's user hears of it).
    fn maybe_release(&mut self, conn: ConnId, report: &mut impl FnMut(Completion<'_>)) {
        let Some(state) = self.conn(conn) else {
            return;
        };
        if state.ops > 0 || !(state.retired || state.detaching) {
            return;
        }
        let detached = state.detaching && !state.retired;
        // Dropping the ring's reference closes the socket unless its user holds one: no
        // operation refers to it any more.
        if let Some(state) = self.release_conn(conn).filter(|_| detached) {
            report(Completion::Detached {
                tag: state.tag,
                fd: state.fd,
            });
        }
    }

    /// Forgets a socket no operation refers to any more (dropping it lets go of the ring's
    /// reference to the descriptor).
    fn release_conn(&mut self, conn: ConnId) -> Option<Conn> {
        let state = self.conns.get_mut(conn.0)?.take()?;
        self.free_conns.push(conn.0);
        Some(state)
    }

    /// Records an operation and queues its entry; `None` if the table cannot grow.
    fn start_op(
        &mut self,
        conn: Option<ConnId>,
        kind: OpKind,
        entry: squeue::Entry,
    ) -> Option<u64> {
        let op = Op { conn, kind };
        let index = match self.free_ops.pop() {
            Some(index) => {
                if let Some(slot) = self.ops.get_mut(index) {
                    *slot = Some(op);
                }
                index
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        let user_data = u64::try_from(index).ok()?;
        if let Some(id) = conn {
            if let Some(state) = self.conn_mut(id) {
                state.ops = state.ops.saturating_add(1);
            }
        }
        self.in_flight = self.in_flight.saturating_add(1);
        // The operation's buffers now live in `self.ops[index]` until its completion.
        self.push(entry.user_data(user_data));
        Some(user_data)
    }

    /// Takes a completed operation out of the table (its buffers are the kernel's no more).
    fn finish_op(&mut self, index: usize) -> Option<Op> {
        let op = self.ops.get_mut(index).and_then(Option::take)?;
        self.free_ops.push(index);
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(id) = op.conn {
            if let Some(state) = self.conn_mut(id) {
                state.ops = state.ops.saturating_sub(1);
            }
        }
        // `op` (and a send's bytes) is dropped by the caller: the kernel completed it.
        Some(op)
    }

    fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(CANCEL);
        self.push(entry);
    }

    fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push(entry);
            return;
        }
        // SAFETY: every buffer an entry points to is owned by the operation table (a send's
        // Vec) or by the buffer ring, both kept until the entry's completion arrives; the
        // descriptor is owned by the table's socket until then too.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.backlog.push(entry);
        }
    }

    /// Submits to make room, then queues the entries that found the queue full.
    fn push_backlog(&mut self) {
        while !self.backlog.is_empty() {
            if self.ring.submission().is_full() && self.ring.submit().is_err() {
                return;
            }
            let mut rest = std::mem::take(&mut self.backlog).into_iter();
            for entry in rest.by_ref() {
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    self.backlog.push(entry);
                    break;
                }
            }
            self.backlog.extend(rest);
            if self.ring.submission().is_full() && self.ring.submit().is_err() {
                return;
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.enabled {
            // Nothing was ever submitted: the kernel refers to no buffer.
            self.in_flight = 0;
        }
        // Cancel everything and wait for the completions: only then does nothing in the
        // kernel refer to the buffers the fields free.
        let all = types::CancelBuilder::any();
        let limit = types::Timespec::from(Duration::from_millis(100));
        let _ = self.ring.submitter().register_sync_cancel(Some(limit), all);
        for _ in 0..DROP_WAITS {
            if !self.enabled {
                break;
            }
            self.complete(|_| {});
            if self.in_flight == 0 {
                break;
            }
            for index in 0..self.ops.len() {
                if self.ops.get(index).is_some_and(Option::is_some) {
                    self.cancel(u64::try_from(index).unwrap_or(CANCEL));
                }
            }
            if self.submit_now(Some(Duration::from_millis(10))).is_err() {
                break;
            }
        }
        self.complete(|_| {});
        if self.in_flight == 0 {
            let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
            // SAFETY: no operation is in flight and the buffer ring is unregistered: the
            // kernel refers to no buffer any more. `buffers` is not used after this.
            unsafe { ManuallyDrop::drop(&mut self.buffers) };
            self.dgram.free(&self.ring);
        } else {
            self.dgram.leak();
        }
        // Otherwise the kernel may still use the buffers: they are leaked, not freed.
    }
}

fn send_entry(fd: RawFd, data: &[u8], from: usize) -> squeue::Entry {
    let rest = data.get(from..).unwrap_or_default();
    let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
    opcode::Send::new(types::Fd(fd), rest.as_ptr(), len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

fn watch_entry(fd: RawFd) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .multi(true)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// A connected TCP pair: (the side given to the ring, the peer).
    fn pair() -> (OwnedFd, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (OwnedFd::from(server), peer)
    }

    fn ring() -> Ring {
        let mut ring = Ring::new(RingConfig {
            entries: 64,
            buffers: 8,
            buffer_size: 4096,
        })
        .expect("io_uring is available on the test machine");
        ring.enable().expect("enable");
        ring
    }

    /// Waits (at most 10 s) until `done` says so, collecting owned copies of completions.
    fn run_until(ring: &mut Ring, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        let start = Instant::now();
        while !done(&events) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {events:?}"
            );
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .unwrap();
            ring.complete(|completion| events.push(Event::from(completion)));
        }
        events
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Received(usize, Vec<u8>),
        ReadClosed(usize),
        ReadFailed(usize),
        Sent(usize, usize),
        Writable(usize),
        Detached(usize),
        Watched(u64),
        Accepted(u64, std::net::SocketAddr),
        AcceptEnded(u64, Option<i32>),
    }

    impl From<Completion<'_>> for Event {
        fn from(completion: Completion<'_>) -> Self {
            match completion {
                Completion::Received { tag, data } => Event::Received(tag, data.to_vec()),
                Completion::ReadClosed { tag } => Event::ReadClosed(tag),
                Completion::ReadFailed { tag, .. } => Event::ReadFailed(tag),
                Completion::Sent { tag, result } => Event::Sent(tag, result.unwrap()),
                Completion::Writable { tag } => Event::Writable(tag),
                Completion::Detached { tag, .. } => Event::Detached(tag),
                Completion::Watched { token } => Event::Watched(token),
                Completion::Accepted { token, fd } => {
                    // SAFETY: F_GETFL only reads the flags of a descriptor this test owns.
                    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
                    assert_ne!(
                        flags & libc::O_NONBLOCK,
                        0,
                        "an accepted socket is non-blocking"
                    );
                    let stream = TcpStream::from(fd);
                    Event::Accepted(token, stream.peer_addr().unwrap())
                }
                Completion::AcceptEnded { token, error } => {
                    Event::AcceptEnded(token, error.and_then(|err| err.raw_os_error()))
                }
                other => panic!("a datagram completion in a stream test: {other:?}"),
            }
        }
    }

    fn received(events: &[Event], tag: usize) -> Vec<u8> {
        events
            .iter()
            .filter_map(|event| match event {
                Event::Received(t, data) if *t == tag => Some(data.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    #[test]
    fn receives_sends_and_sees_the_peers_end() {
        let mut ring = ring();
        let (fd, mut peer) = pair();
        let conn = ring.register(fd, 7);
        ring.start_recv(conn);
        peer.write_all(b"hello").unwrap();
        let events = run_until(&mut ring, |events| received(events, 7).len() == 5);
        assert_eq!(received(&events, 7), b"hello");
        ring.send(conn, b"world".to_vec()).unwrap();
        assert!(ring.sending(conn));
        let events = run_until(&mut ring, |events| events.contains(&Event::Sent(7, 5)));
        assert_eq!(events, vec![Event::Sent(7, 5)]);
        assert!(!ring.sending(conn));
        let mut reply = [0u8; 5];
        peer.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"world");
        drop(peer);
        run_until(&mut ring, |events| events.contains(&Event::ReadClosed(7)));
        ring.retire(conn);
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(ring.sockets(), 0);
    }

    #[test]
    fn more_bytes_than_buffers_arrive_in_order() {
        // 8 buffers of 4 KiB and 1 MiB sent: the multishot receive runs out of buffers and
        // is re-armed; nothing is lost or reordered.
        let mut ring = ring();
        let (fd, mut peer) = pair();
        let conn = ring.register(fd, 1);
        ring.start_recv(conn);
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || peer.write_all(&sent).map(|()| peer));
        let events = run_until(&mut ring, |events| received(events, 1).len() == data.len());
        assert_eq!(received(&events, 1), data);
        drop(writer.join().unwrap().unwrap());
        run_until(&mut ring, |events| events.contains(&Event::ReadClosed(1)));
    }

    #[test]
    fn one_accept_takes_every_connection_until_stopped_and_keeps_the_socket_open_until_then() {
        let mut ring = ring();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // Two connections wait in the queue before the accept is armed, three come after.
        let mut clients: Vec<TcpStream> =
            (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let accept = ring.accept(Arc::new(listener), 42);
        let accepted = |events: &[Event]| {
            events
                .iter()
                .filter(|event| matches!(event, Event::Accepted(42, _)))
                .count()
        };
        run_until(&mut ring, |events| accepted(events) == 2);
        clients.extend((0..3).map(|_| TcpStream::connect(addr).unwrap()));
        let events = run_until(&mut ring, |events| accepted(events) == 3);
        let mut peers: Vec<_> = events
            .iter()
            .filter_map(|event| match event {
                Event::Accepted(_, peer) => Some(*peer),
                _ => None,
            })
            .collect();
        peers.sort();
        let mut locals: Vec<_> = clients
            .iter()
            .skip(2)
            .map(|client| client.local_addr().unwrap())
            .collect();
        locals.sort();
        assert_eq!(peers, locals, "each completion is one client's connection");
        // The ring holds the only reference to the socket: it still listens.
        let late = TcpStream::connect(addr).unwrap();
        let events = run_until(&mut ring, |events| accepted(events) == 1);
        assert!(
            matches!(events.as_slice(), [Event::Accepted(42, peer)] if *peer == late.local_addr().unwrap())
        );
        ring.stop_accept(accept);
        let events = run_until(&mut ring, |events| {
            events.contains(&Event::AcceptEnded(42, None))
        });
        assert_eq!(events, vec![Event::AcceptEnded(42, None)]);
        assert_eq!(ring.in_flight(), 0);
        // Ended, the operation let go of the last reference: the socket is closed.
        assert!(
            TcpStream::connect(addr).is_err(),
            "nothing listens any more"
        );
    }

    #[test]
    fn a_large_send_is_continued_until_complete() {
        let mut ring = ring();
        let (fd, peer) = pair();
        let conn = ring.register(fd, 3);
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        ring.send(conn, data.clone()).unwrap();
        // A second send while one is in flight is handed back.
        assert_eq!(ring.send(conn, vec![1]), Err(vec![1]));
        let reader = std::thread::spawn(move || {
            let mut peer = peer;
            let mut got = vec![0u8; 8 << 20];
            peer.read_exact(&mut got).map(|()| got)
        });
        run_until(&mut ring, |events| {
            events.contains(&Event::Sent(3, 8 << 20))
        });
        assert_eq!(reader.join().unwrap().unwrap(), data);
    }

    #[test]
    fn a_descriptor_shared_with_its_user_closes_only_when_both_let_go() {
        // The user keeps a reference (as a session does for `shutdown`, `sendfile`): retiring
        // the socket with a receive in flight lets go of the ring's, not of the descriptor.
        let mut ring = ring();
        let (fd, mut peer) = pair();
        let fd = Arc::new(fd);
        let conn = ring.register(Arc::clone(&fd), 4);
        ring.start_recv(conn);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        assert_eq!(Arc::strong_count(&fd), 2, "the ring holds a reference");
        ring.retire(conn);
        let start = Instant::now();
        while ring.in_flight() > 0 || ring.sockets() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .unwrap();
            ring.complete(|completion| panic!("completion for a retired socket: {completion:?}"));
        }
        assert_eq!(
            Arc::strong_count(&fd),
            1,
            "the ring let go of its reference"
        );
        // Still open: the peer sees no end, and the user's reference still writes.
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 8];
        let err = peer
            .read(&mut buf)
            .expect_err("no end while the user holds the socket");
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        let mut user = TcpStream::from(Arc::into_inner(fd).expect("the only reference"));
        user.write_all(b"still open").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        peer.read_exact(&mut buf[..5]).unwrap();
        assert_eq!(&buf[..5], b"still");
        drop(user);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert_eq!(
            rest, b" open",
            "the end comes when the last reference is gone"
        );
    }

    #[test]
    fn retiring_sockets_mid_receive_closes_them_after_their_completions() {
        // Sockets retired while their receive is armed and bytes keep arriving: the ring keeps
        // each descriptor (and every buffer) until the cancelled receive completed, then
        // closes it (the peer sees the end), and reports nothing more for it.
        for _round in 0..5 {
            let mut ring = ring();
            let mut peers = Vec::new();
            let mut conns = Vec::new();
            for tag in 0..16 {
                let (fd, peer) = pair();
                let conn = ring.register(fd, tag);
                ring.start_recv(conn);
                conns.push(conn);
                peers.push(peer);
            }
            let writers: Vec<_> = peers
                .iter()
                .map(|peer| {
                    let mut peer = peer.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let chunk = [0x5au8; 4096];
                        while peer.write_all(&chunk).is_ok() {}
                    })
                })
                .collect();
            // Bytes received on any of them: the 8 shared buffers may all go to other sockets
            // for a while, so no one socket is waited for.
            run_until(&mut ring, |events| {
                (0..16)
                    .map(|tag| received(events, tag).len())
                    .sum::<usize>()
                    > 16 * 1024
            });
            for conn in &conns {
                ring.retire(*conn);
            }
            let start = Instant::now();
            while ring.in_flight() > 0 || ring.sockets() > 0 {
                assert!(start.elapsed() < Duration::from_secs(10));
                ring.submit_and_wait(Some(Duration::from_millis(50)))
                    .unwrap();
                ring.complete(|completion| {
                    panic!("completion for a retired socket: {completion:?}")
                });
            }
            // Every descriptor is closed: the writers fail (reset or broken pipe) and end.
            for writer in writers {
                writer.join().unwrap();
            }
            for mut peer in peers {
                let mut buf = [0u8; 16];
                peer.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                assert!(matches!(peer.read(&mut buf), Ok(0) | Err(_)));
            }
        }
    }

    #[test]
    fn a_detached_socket_leaves_the_ring_after_its_last_completion() {
        // Detached mid-receive with a send in flight: the send finishes, bytes received before
        // the cancel are reported, then `Detached`; the user's own descriptor still works.
        let mut ring = ring();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mine, _) = listener.accept().unwrap();
        mine.set_nonblocking(true).unwrap();
        let conn = ring.register(OwnedFd::from(mine.try_clone().unwrap()), 4);
        ring.start_recv(conn);
        peer.write_all(b"before").unwrap();
        let events = run_until(&mut ring, |events| received(events, 4).len() == 6);
        assert_eq!(received(&events, 4), b"before");
        ring.send(conn, vec![7u8; 1 << 20]).unwrap();
        assert!(ring.detach(conn).is_none());
        assert_eq!(ring.send(conn, vec![1]), Err(vec![1]));
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1 << 20];
            peer.read_exact(&mut got).map(|()| peer)
        });
        let events = run_until(&mut ring, |events| events.contains(&Event::Detached(4)));
        assert!(events.contains(&Event::Sent(4, 1 << 20)), "{events:?}");
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(ring.sockets(), 0);
        let mut peer = reader.join().unwrap().unwrap();
        peer.write_all(b"after").unwrap();
        let mut mine = mine;
        mine.set_nonblocking(false).unwrap();
        let mut got = [0u8; 5];
        mine.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after");
        // Nothing in flight: detached at once.
        let (fd, _peer) = pair();
        let idle = ring.register(fd, 5);
        assert!(ring.detach(idle).is_some());
        assert_eq!(ring.sockets(), 0);
    }

    #[test]
    fn watching_a_descriptor_reports_readability() {
        let mut ring = ring();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.watch(&a, 42);
        b.write_all(b"x").unwrap();
        run_until(&mut ring, |events| events.contains(&Event::Watched(42)));
    }

    #[test]
    fn writable_is_reported() {
        let mut ring = ring();
        let (fd, _peer) = pair();
        let conn = ring.register(fd, 9);
        ring.poll_writable(conn);
        run_until(&mut ring, |events| events.contains(&Event::Writable(9)));
    }

    #[test]
    fn dropping_a_ring_with_operations_in_flight_cancels_them() {
        let mut ring = ring();
        let (fd, _peer) = pair();
        let conn = ring.register(fd, 1);
        ring.start_recv(conn);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }

    #[test]
    fn a_ring_made_on_one_thread_serves_on_another() {
        let ring = Ring::new(RingConfig::default()).unwrap();
        std::thread::spawn(move || {
            let mut ring = ring;
            ring.enable().unwrap();
            let (fd, mut peer) = pair();
            let conn = ring.register(fd, 5);
            ring.start_recv(conn);
            peer.write_all(b"moved").unwrap();
            let events = run_until(&mut ring, |events| received(events, 5).len() == 5);
            assert_eq!(received(&events, 5), b"moved");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_bad_buffer_count_is_refused() {
        let err = Ring::new(RingConfig {
            entries: 8,
            buffers: 3,
            buffer_size: 4096,
        })
        .unwrap_err();
        assert!(matches!(err, RingError::BufferRing(_)), "{err}");
    }
}
