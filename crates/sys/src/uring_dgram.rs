//! UDP sockets on the io_uring ring: multishot `RECVMSG` into a provided-buffer ring of its
//! own, and `SENDMSG` operations (with `UDP_SEGMENT` for runs to one peer).
//!
//! A child module of [`crate::uring`]: its operations live in the ring's one operation table
//! and its completions arrive through [`Ring::complete`], so a loop still blocks in one place.
//!
//! Ownership, as for streams: **every buffer the kernel may touch belongs to the ring until
//! the operation's completion arrives.**
//! * Receives: one multishot `RECVMSG` per socket selects buffers of the datagram buffer
//!   group ([`DGRAM_GROUP`], buffers of [`DGRAM_BUFFER`] bytes). Each completion's buffer holds
//!   the `io_uring_recvmsg_out` header, the peer's address, the control messages (the
//!   `UDP_GRO` segment size) and the payload; it is handed to the user for the callback only,
//!   then given back. The operation's `msghdr` (which tells the kernel the name and control
//!   room) is boxed in the operation table until its last completion.
//! * Sends: each `SENDMSG` owns a boxed message: `msghdr`, iovec, destination address,
//!   control buffer and the payload `Vec`, all pointing into the same box, which stays in the
//!   operation table until the completion.
//! * The socket's descriptor is held by the ring until its last operation completed
//!   ([`Ring::retire_datagrams`] cancels them).

use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use io_uring::{cqueue, opcode, types, IoUring, Probe};

use super::{BufferRing, Completion, OpKind, Ring};
use crate::dgram::{to_storage, GsoRefusal};

/// The provided-buffer group of datagram receives (group 0 is the streams').
pub(super) const DGRAM_GROUP: u16 = 1;
/// Receive buffers of the datagram group.
const DGRAM_BUFFERS: u16 = 64;
/// Room for the peer's address in each receive buffer.
const NAME_ROOM: usize = size_of::<libc::sockaddr_storage>();
/// Room for control messages (one `UDP_GRO` int needs 24 bytes).
const CONTROL_ROOM: usize = 64;
/// Payload room: a whole GRO-coalesced buffer (at most 64 KiB).
const PAYLOAD_ROOM: usize = 64 * 1024;
/// Size of the kernel's `io_uring_recvmsg_out` header (four u32) at the start of a buffer.
const RECVMSG_OUT: usize = 16;
/// Bytes per datagram receive buffer: header, name, control, payload.
const DGRAM_BUFFER: usize = RECVMSG_OUT + NAME_ROOM + CONTROL_ROOM + PAYLOAD_ROOM;

/// A UDP socket registered with a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DgramId(usize);

/// The ring's datagram part: its sockets and buffer group.
#[derive(Default)]
pub(super) struct Datagrams {
    /// The kernel has multishot `RECVMSG` and `SENDMSG` (Linux ≥ 6.0).
    pub(super) supported: bool,
    /// Created with the first socket; freed by [`Datagrams::free`] only once no operation is
    /// in flight (leaked otherwise, with the ring's own buffers).
    buffers: Option<ManuallyDrop<BufferRing>>,
    socks: Vec<Option<DgramSock>>,
    free_socks: Vec<usize>,
}

struct DgramSock {
    fd: OwnedFd,
    tag: usize,
    /// Operations in flight for this socket.
    ops: usize,
    recv: Option<u64>,
    want_recv: bool,
    sends: usize,
    retired: bool,
}

/// The `msghdr` of a multishot receive: only its name and control lengths matter.
pub(super) struct RecvHeader(libc::msghdr);

// SAFETY: the header's pointers are null (the kernel reads only its lengths): nothing is
// shared through it, so it can move to another thread with the ring.
unsafe impl Send for RecvHeader {}

/// Everything one `SENDMSG` points to, kept together (and in place, boxed) until its
/// completion.
pub(super) struct OutMessage {
    header: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    control: SegmentControl,
    payload: Vec<u8>,
    dest: SocketAddr,
    /// `UDP_SEGMENT` size, for a run of several datagrams.
    segment: Option<u16>,
}

// SAFETY: the message's pointers point only into its own box (and the payload Vec it owns):
// moving the box to another thread moves everything they refer to.
unsafe impl Send for OutMessage {}

/// One `UDP_SEGMENT` control message: header then the u16 size (`CMSG_SPACE(2)` bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentControl {
    header: libc::cmsghdr,
    size: u16,
    pad: [u8; 6],
}

/// A datagram operation of the ring's table.
pub(super) enum DgramOp {
    Recv {
        sock: usize,
        header: Box<RecvHeader>,
    },
    Send {
        sock: usize,
        message: Box<OutMessage>,
    },
}

impl Datagrams {
    pub(super) fn new(supported: bool) -> Datagrams {
        Datagrams {
            supported,
            ..Datagrams::default()
        }
    }

    /// Whether the kernel has what datagram sockets need on the ring.
    pub(super) fn probe(probe: &Probe) -> bool {
        probe.is_supported(opcode::RecvMsg::CODE) && probe.is_supported(opcode::SendMsg::CODE)
    }

    /// Unregisters and frees the buffer group: only when nothing is in flight.
    pub(super) fn free(&mut self, ring: &IoUring) {
        if let Some(mut buffers) = self.buffers.take() {
            let _ = ring.submitter().unregister_buf_ring(DGRAM_GROUP);
            // SAFETY: the caller saw no operation in flight and the group is unregistered:
            // the kernel refers to no buffer of it any more.
            unsafe { ManuallyDrop::drop(&mut buffers) };
        }
    }

    /// Makes the buffers given back so far visible to the kernel.
    pub(super) fn publish(&self) {
        if let Some(buffers) = self.buffers.as_deref() {
            buffers.publish();
        }
    }

    /// Forgets the buffer group without freeing it (the kernel may still use it).
    pub(super) fn leak(&mut self) {
        let _ = self.buffers.take();
    }

    fn sock(&self, index: usize) -> Option<&DgramSock> {
        self.socks.get(index).and_then(Option::as_ref)
    }

    fn sock_mut(&mut self, index: usize) -> Option<&mut DgramSock> {
        self.socks.get_mut(index).and_then(Option::as_mut)
    }
}

/// Why a datagram socket could not join the ring (it stays on epoll).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DgramRingError {
    /// The kernel lacks multishot `RECVMSG` or `SENDMSG`.
    #[error("the kernel lacks io_uring RECVMSG/SENDMSG")]
    Unsupported,
    /// The datagram buffer group could not be allocated or registered.
    #[error("cannot register the datagram buffer ring: {0}")]
    BufferRing(io::Error),
}

impl Ring {
    /// Whether datagram sockets can be served on this ring.
    pub fn datagrams_supported(&self) -> bool {
        self.dgram.supported
    }

    /// Takes ownership of a UDP socket's descriptor; its completions carry `tag`. The first
    /// socket sets up the datagram buffer group (on the ring's issuer thread).
    pub fn register_datagrams(
        &mut self,
        fd: OwnedFd,
        tag: usize,
    ) -> Result<DgramId, DgramRingError> {
        if !self.dgram.supported {
            return Err(DgramRingError::Unsupported);
        }
        if self.dgram.buffers.is_none() {
            let mut buffers =
                BufferRing::new(DGRAM_BUFFERS, DGRAM_BUFFER).map_err(DgramRingError::BufferRing)?;
            // SAFETY: `buffers.entries` is a page-aligned allocation of `count` entries; it is
            // freed only after being unregistered (`Datagrams::free`), or leaked.
            unsafe {
                self.ring.submitter().register_buf_ring(
                    buffers.entries as u64,
                    buffers.count,
                    DGRAM_GROUP,
                )
            }
            .map_err(DgramRingError::BufferRing)?;
            for bid in 0..buffers.count {
                buffers.give(bid);
            }
            buffers.publish();
            self.dgram.buffers = Some(ManuallyDrop::new(buffers));
        }
        let sock = DgramSock {
            fd,
            tag,
            ops: 0,
            recv: None,
            want_recv: false,
            sends: 0,
            retired: false,
        };
        let index = match self.dgram.free_socks.pop() {
            Some(index) => {
                if let Some(slot) = self.dgram.socks.get_mut(index) {
                    *slot = Some(sock);
                }
                index
            }
            None => {
                self.dgram.socks.push(Some(sock));
                self.dgram.socks.len().saturating_sub(1)
            }
        };
        Ok(DgramId(index))
    }

    /// The socket's descriptor (socket options, `getsockname`).
    pub fn datagram_fd(&self, id: DgramId) -> Option<BorrowedFd<'_>> {
        self.dgram.sock(id.0).map(|sock| sock.fd.as_fd())
    }

    /// Receives datagrams (multishot) until [`Ring::stop_datagrams`] or retirement.
    pub fn start_datagrams(&mut self, id: DgramId) {
        let Some(sock) = self.dgram.sock_mut(id.0) else {
            return;
        };
        if sock.retired {
            return;
        }
        sock.want_recv = true;
        if sock.recv.is_some() {
            return;
        }
        let fd = sock.fd.as_raw_fd();
        // SAFETY: msghdr is plain old data; all-zero (null pointers) is a valid value.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_namelen = NAME_ROOM as libc::socklen_t;
        header.msg_controllen = CONTROL_ROOM as _;
        let header = Box::new(RecvHeader(header));
        let entry = opcode::RecvMsgMulti::new(types::Fd(fd), &header.0, DGRAM_GROUP).build();
        let op = OpKind::Dgram(DgramOp::Recv { sock: id.0, header });
        if let Some(user_data) = self.start_op(None, op, entry) {
            if let Some(sock) = self.dgram.sock_mut(id.0) {
                sock.recv = Some(user_data);
                sock.ops = sock.ops.saturating_add(1);
            }
        }
    }

    /// Stops receiving: datagrams wait in the socket's receive buffer (backpressure).
    pub fn stop_datagrams(&mut self, id: DgramId) {
        let Some(sock) = self.dgram.sock_mut(id.0) else {
            return;
        };
        sock.want_recv = false;
        if let Some(user_data) = sock.recv {
            self.cancel(user_data);
        }
    }

    /// Whether the socket's receive is armed (or wanted).
    pub fn receiving_datagrams(&self, id: DgramId) -> bool {
        self.dgram.sock(id.0).is_some_and(|sock| sock.want_recv)
    }

    /// Sends in flight on the socket.
    pub fn datagram_sends(&self, id: DgramId) -> usize {
        self.dgram.sock(id.0).map_or(0, |sock| sock.sends)
    }

    /// Sends `payload` to `dest` as one datagram, or with `segment` as a `UDP_SEGMENT` run
    /// of datagrams of that size (the last may be shorter). A refused segmentation is sent
    /// again datagram by datagram, and its completion says so. Hands `payload` back if the
    /// socket is gone or retired.
    pub fn send_datagrams(
        &mut self,
        id: DgramId,
        dest: SocketAddr,
        payload: Vec<u8>,
        segment: Option<u16>,
    ) -> Result<(), Vec<u8>> {
        let Some(sock) = self.dgram.sock(id.0).filter(|sock| !sock.retired) else {
            return Err(payload);
        };
        let fd = sock.fd.as_raw_fd();
        let (addr, addr_len) = to_storage(&dest);
        // SAFETY: msghdr, iovec and cmsghdr are plain old data; all-zero is valid for each.
        let (header, iov, cmsg) = unsafe {
            (
                std::mem::zeroed::<libc::msghdr>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::cmsghdr>(),
            )
        };
        let mut message = Box::new(OutMessage {
            header,
            iov,
            addr,
            control: SegmentControl {
                header: cmsg,
                size: 0,
                pad: [0; 6],
            },
            payload,
            dest,
            segment: segment.filter(|&size| size > 0),
        });
        // Every pointer below points into the box (or the Vec's heap buffer, which does not
        // move when the box does).
        let message_ref = &mut *message;
        message_ref.iov.iov_base = message_ref.payload.as_mut_ptr().cast();
        message_ref.iov.iov_len = message_ref.payload.len();
        message_ref.header.msg_name = (&mut message_ref.addr as *mut libc::sockaddr_storage).cast();
        message_ref.header.msg_namelen = addr_len;
        message_ref.header.msg_iov = &mut message_ref.iov;
        message_ref.header.msg_iovlen = 1;
        if let Some(size) = message_ref.segment {
            message_ref.control.header.cmsg_level = libc::SOL_UDP;
            message_ref.control.header.cmsg_type = libc::UDP_SEGMENT;
            message_ref.control.header.cmsg_len = size_of::<libc::cmsghdr>() + size_of::<u16>();
            message_ref.control.size = size;
            message_ref.header.msg_control =
                (&mut message_ref.control as *mut SegmentControl).cast();
            message_ref.header.msg_controllen = size_of::<SegmentControl>();
        }
        let entry = opcode::SendMsg::new(types::Fd(fd), &message_ref.header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        let op = OpKind::Dgram(DgramOp::Send {
            sock: id.0,
            message,
        });
        match self.start_op(None, op, entry) {
            Some(_) => {
                if let Some(sock) = self.dgram.sock_mut(id.0) {
                    sock.ops = sock.ops.saturating_add(1);
                    sock.sends = sock.sends.saturating_add(1);
                }
                Ok(())
            }
            None => Err(Vec::new()),
        }
    }

    /// Ends a datagram socket: cancels its operations and closes its descriptor once the
    /// last one completed (at once if none is in flight). Nothing more is reported for it.
    pub fn retire_datagrams(&mut self, id: DgramId) {
        let Some(sock) = self.dgram.sock_mut(id.0) else {
            return;
        };
        sock.retired = true;
        sock.want_recv = false;
        if sock.ops == 0 {
            self.release_dgram(id.0);
            return;
        }
        let fd = sock.fd.as_raw_fd();
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(super::CANCEL);
        self.push(entry);
    }

    /// Registered datagram sockets, retired ones with operations in flight included.
    pub fn datagram_sockets(&self) -> usize {
        self.dgram
            .socks
            .iter()
            .filter(|sock| sock.is_some())
            .count()
    }

    fn release_dgram(&mut self, index: usize) {
        if let Some(slot) = self.dgram.socks.get_mut(index) {
            // Dropping the OwnedFd closes the socket: no operation refers to it any more.
            *slot = None;
            self.dgram.free_socks.push(index);
        }
    }

    fn maybe_release_dgram(&mut self, index: usize) {
        if self
            .dgram
            .sock(index)
            .is_some_and(|sock| sock.retired && sock.ops == 0)
        {
            self.release_dgram(index);
        }
    }

    /// One completion of a datagram operation (the op at `index` of the table).
    pub(super) fn handle_dgram(
        &mut self,
        index: usize,
        cqe: &cqueue::Entry,
        report: &mut impl FnMut(Completion<'_>),
    ) {
        let result = cqe.result();
        let flags = cqe.flags();
        let more = cqueue::more(flags);
        let Some(super::Op {
            kind: OpKind::Dgram(op),
            ..
        }) = self.ops.get(index).and_then(Option::as_ref)
        else {
            return;
        };
        match op {
            DgramOp::Recv { sock, header } => {
                let sock = *sock;
                let (tag, retired) = match self.dgram.sock(sock) {
                    Some(state) => (state.tag, state.retired),
                    None => (0, true),
                };
                if let Some(bid) = cqueue::buffer_select(flags) {
                    if let Some(buffers) = self.dgram.buffers.as_deref() {
                        if result > 0 && !retired && bid < buffers.count {
                            let len = usize::try_from(result).unwrap_or(0);
                            // SAFETY: this completion selected buffer `bid` (< count); the
                            // kernel is done with it until it is given back below, after
                            // `report` returned.
                            let buffer = unsafe { buffers.filled(bid, len) };
                            report_datagrams(tag, buffer, &header.0, report);
                        }
                    }
                    if let Some(buffers) = self.dgram.buffers.as_deref_mut() {
                        buffers.give(bid);
                    }
                }
                if more {
                    return;
                }
                self.finish_op(index);
                let want = match self.dgram.sock_mut(sock) {
                    Some(state) => {
                        state.recv = None;
                        state.ops = state.ops.saturating_sub(1);
                        state.want_recv && !state.retired
                    }
                    None => false,
                };
                // Out of buffers, a multishot ended by the kernel, an error queued on the
                // socket (ICMP), or a cancel a new start overtook: go on if still wanted.
                if want && result != -libc::EBADF && result != -libc::ENOTSOCK {
                    self.start_datagrams(DgramId(sock));
                }
                self.maybe_release_dgram(sock);
            }
            DgramOp::Send { sock, .. } => {
                let sock = *sock;
                let Some(super::Op {
                    kind: OpKind::Dgram(DgramOp::Send { message, .. }),
                    ..
                }) = self.finish_op(index)
                else {
                    return;
                };
                let (tag, retired) = match self.dgram.sock_mut(sock) {
                    Some(state) => {
                        state.ops = state.ops.saturating_sub(1);
                        state.sends = state.sends.saturating_sub(1);
                        (state.tag, state.retired)
                    }
                    None => (0, true),
                };
                if !retired {
                    self.send_done(DgramId(sock), tag, *message, result, report);
                }
                self.maybe_release_dgram(sock);
            }
        }
    }

    fn send_done(
        &mut self,
        id: DgramId,
        tag: usize,
        message: OutMessage,
        result: i32,
        report: &mut impl FnMut(Completion<'_>),
    ) {
        let OutMessage {
            payload,
            dest,
            segment,
            ..
        } = message;
        let size = segment.map_or(payload.len(), usize::from).max(1);
        let datagrams = match segment {
            Some(_) => payload.len().div_ceil(size),
            None => 1,
        };
        if result >= 0 {
            report(Completion::DatagramsSent {
                tag,
                datagrams,
                bytes: payload.len(),
                result: Ok(()),
                refused: None,
            });
            return;
        }
        let refused = match -result {
            _ if segment.is_none() || datagrams <= 1 => None,
            libc::EINVAL | libc::EMSGSIZE => Some(GsoRefusal::SegmentTooLarge(size)),
            libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP => Some(GsoRefusal::Unsupported),
            _ => None,
        };
        let Some(refused) = refused else {
            report(Completion::DatagramsSent {
                tag,
                datagrams,
                bytes: payload.len(),
                result: Err(io::Error::from_raw_os_error(-result)),
                refused: None,
            });
            return;
        };
        // The kernel refused the segmentation: the same datagrams go out one by one.
        report(Completion::DatagramsSent {
            tag,
            datagrams: 0,
            bytes: 0,
            result: Ok(()),
            refused: Some(refused),
        });
        for chunk in payload.chunks(size) {
            if self.send_datagrams(id, dest, chunk.to_vec(), None).is_err() {
                report(Completion::DatagramsSent {
                    tag,
                    datagrams: 1,
                    bytes: chunk.len(),
                    result: Err(io::ErrorKind::NotConnected.into()),
                    refused: None,
                });
            }
        }
    }
}

/// Reports the datagrams of one receive buffer: the peer, then each datagram (a buffer
/// coalesced by `UDP_GRO` holds several, every `segment` bytes one).
fn report_datagrams(
    tag: usize,
    buffer: &[u8],
    header: &libc::msghdr,
    report: &mut impl FnMut(Completion<'_>),
) {
    let Ok(out) = types::RecvMsgOut::parse(buffer, header) else {
        return;
    };
    let source = source(out.name_data());
    let payload = out.payload_data();
    let truncated = out.is_payload_truncated();
    match gro_segment(out.control_data()) {
        Some(size) if size > 0 && size < payload.len() => {
            let mut chunks = payload.chunks(size).peekable();
            while let Some(data) = chunks.next() {
                // Under truncation only the datagrams copied whole are intact.
                let cut = truncated && chunks.peek().is_none();
                report(Completion::Datagram {
                    tag,
                    source,
                    data,
                    truncated: cut,
                });
            }
        }
        _ => report(Completion::Datagram {
            tag,
            source,
            data: payload,
            truncated,
        }),
    }
}

/// The peer's address from the name bytes of a received message (IPv4 or IPv6).
fn source(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope: [u8; 4] = name.get(24..28)?.try_into().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                u32::from_be_bytes(flow),
                u32::from_ne_bytes(scope),
            )))
        }
        _ => None,
    }
}

/// The `UDP_GRO` segment size among received control messages, if any.
fn gro_segment(mut control: &[u8]) -> Option<usize> {
    let header = size_of::<libc::cmsghdr>();
    let align = size_of::<usize>();
    while control.len() >= header {
        let len = usize::from_ne_bytes(control.get(..size_of::<usize>())?.try_into().ok()?);
        let level_at = size_of::<usize>();
        let level = i32::from_ne_bytes(control.get(level_at..level_at + 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(control.get(level_at + 4..level_at + 8)?.try_into().ok()?);
        if len < header {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO {
            let data = control.get(header..header + 4)?;
            return usize::try_from(i32::from_ne_bytes(data.try_into().ok()?)).ok();
        }
        let next = len.checked_add(align - 1)? / align * align;
        control = control.get(next..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::RingConfig;
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    fn ring() -> Ring {
        let mut ring = Ring::new(RingConfig {
            entries: 256,
            buffers: 8,
            buffer_size: 4096,
        })
        .expect("io_uring is available on the test machine");
        ring.enable().expect("enable");
        ring
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Datagram(usize, Option<SocketAddr>, Vec<u8>),
        Sent(usize, usize, bool),
    }

    fn run_until(ring: &mut Ring, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        let start = Instant::now();
        while !done(&events) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {} events",
                events.len()
            );
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .unwrap();
            ring.complete(|completion| match completion {
                Completion::Datagram {
                    tag, source, data, ..
                } => events.push(Event::Datagram(tag, source, data.to_vec())),
                Completion::DatagramsSent {
                    tag,
                    datagrams,
                    result,
                    ..
                } => events.push(Event::Sent(tag, datagrams, result.is_ok())),
                other => panic!("unexpected {other:?}"),
            });
        }
        events
    }

    fn server() -> (UdpSocket, SocketAddr) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    fn datagrams(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|event| matches!(event, Event::Datagram(..)))
            .count()
    }

    #[test]
    fn receives_datagrams_with_their_source_and_sends_replies() {
        let mut ring = ring();
        let (socket, addr) = server();
        let id = ring.register_datagrams(OwnedFd::from(socket), 4).unwrap();
        ring.start_datagrams(id);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.send_to(b"one", addr).unwrap();
        client.send_to(b"two", addr).unwrap();
        let events = run_until(&mut ring, |events| datagrams(events) == 2);
        let from = Some(client.local_addr().unwrap());
        assert_eq!(
            events,
            vec![
                Event::Datagram(4, from, b"one".to_vec()),
                Event::Datagram(4, from, b"two".to_vec())
            ]
        );
        ring.send_datagrams(id, client.local_addr().unwrap(), b"reply".to_vec(), None)
            .unwrap();
        assert_eq!(ring.datagram_sends(id), 1);
        let events = run_until(&mut ring, |events| !events.is_empty());
        assert_eq!(events, vec![Event::Sent(4, 1, true)]);
        let mut buf = [0u8; 16];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        ring.retire_datagrams(id);
        let start = Instant::now();
        while ring.datagram_sockets() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .unwrap();
            ring.complete(|completion| panic!("after retire: {completion:?}"));
        }
    }

    #[test]
    fn a_segmented_send_arrives_as_its_datagrams() {
        let mut ring = ring();
        let (socket, _) = server();
        let id = ring.register_datagrams(OwnedFd::from(socket), 1).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Ten 100-byte datagrams and a 40-byte one, as one UDP_SEGMENT message.
        let payload: Vec<u8> = (0..1040u32).map(|i| (i / 100) as u8).collect();
        ring.send_datagrams(id, client.local_addr().unwrap(), payload, Some(100))
            .unwrap();
        let events = run_until(&mut ring, |events| {
            events
                .iter()
                .any(|event| matches!(event, Event::Sent(_, n, true) if *n > 0))
        });
        assert!(events.contains(&Event::Sent(1, 11, true)), "{events:?}");
        let mut buf = [0u8; 2048];
        for index in 0..11u8 {
            let (n, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(n, if index == 10 { 40 } else { 100 });
            assert!(buf[..n].iter().all(|&b| b == index));
        }
    }

    #[test]
    fn coalesced_receives_are_split_into_their_datagrams() {
        // With UDP_GRO on, the kernel may coalesce a burst from one sender (on loopback it
        // does when the sender uses GSO); either way every datagram is reported on its own.
        let mut ring = ring();
        let (socket, addr) = server();
        let _ = crate::dgram::enable_gro(&socket);
        let id = ring.register_datagrams(OwnedFd::from(socket), 2).unwrap();
        ring.start_datagrams(id);
        let (sender, _) = server();
        let sender_id = ring.register_datagrams(OwnedFd::from(sender), 3).unwrap();
        let payload: Vec<u8> = (0..20 * 500u32).map(|i| (i / 500) as u8).collect();
        ring.send_datagrams(sender_id, addr, payload, Some(500))
            .unwrap();
        let events = run_until(&mut ring, |events| datagrams(events) == 20);
        let received: Vec<&Vec<u8>> = events
            .iter()
            .filter_map(|event| match event {
                Event::Datagram(2, _, data) => Some(data),
                _ => None,
            })
            .collect();
        assert_eq!(received.len(), 20);
        for (index, data) in received.iter().enumerate() {
            assert_eq!(data.len(), 500);
            assert!(data.iter().all(|&b| usize::from(b) == index));
        }
    }

    #[test]
    fn sources_and_control_messages_parse_without_panics() {
        assert_eq!(source(&[]), None);
        assert_eq!(source(&[0; 3]), None);
        let (storage, len) = to_storage(&"[::1]:4433".parse().unwrap());
        // SAFETY: test only: the bytes of a plain-old-data struct, `len` of them.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&storage as *const libc::sockaddr_storage).cast::<u8>(),
                len as usize,
            )
        };
        assert_eq!(source(bytes), Some("[::1]:4433".parse().unwrap()));
        assert_eq!(gro_segment(&[]), None);
        assert_eq!(gro_segment(&[0xff; 16]), None);
        let mut control = Vec::new();
        control.extend_from_slice(&(size_of::<libc::cmsghdr>() + 4).to_ne_bytes());
        control.extend_from_slice(&libc::SOL_UDP.to_ne_bytes());
        control.extend_from_slice(&libc::UDP_GRO.to_ne_bytes());
        control.extend_from_slice(&1200i32.to_ne_bytes());
        assert_eq!(gro_segment(&control), Some(1200));
    }

    #[test]
    fn retiring_datagram_sockets_under_load_closes_them_after_their_completions() {
        // Sockets retired while their receives are armed, datagrams keep arriving and sends
        // are in flight: the ring keeps each descriptor and every buffer until the cancelled
        // operations completed, reports nothing more for them, then closes them.
        for _round in 0..5 {
            let mut ring = ring();
            let mut ids = Vec::new();
            let mut addrs = Vec::new();
            for tag in 0..8 {
                let (socket, addr) = server();
                let id = ring.register_datagrams(OwnedFd::from(socket), tag).unwrap();
                ring.start_datagrams(id);
                ids.push(id);
                addrs.push(addr);
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flooders: Vec<_> = addrs
                .iter()
                .map(|&addr| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
                        let chunk = [0x5au8; 1200];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = client.send_to(&chunk, addr);
                        }
                    })
                })
                .collect();
            let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sink_addr = sink.local_addr().unwrap();
            run_until(&mut ring, |events| datagrams(events) > 256);
            for &id in &ids {
                for _ in 0..16 {
                    ring.send_datagrams(id, sink_addr, vec![7; 1000], None)
                        .unwrap();
                }
                ring.retire_datagrams(id);
                assert!(ring.send_datagrams(id, sink_addr, vec![1], None).is_err());
            }
            let start = Instant::now();
            while ring.in_flight() > 0 || ring.datagram_sockets() > 0 {
                assert!(start.elapsed() < Duration::from_secs(10));
                ring.submit_and_wait(Some(Duration::from_millis(50)))
                    .unwrap();
                ring.complete(|completion| {
                    panic!("completion for a retired socket: {completion:?}")
                });
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for flooder in flooders {
                flooder.join().unwrap();
            }
            // Every descriptor is closed: the ports are free again.
            for addr in addrs {
                assert!(UdpSocket::bind(addr).is_ok(), "{addr} still bound");
            }
        }
    }

    #[test]
    fn dropping_a_ring_with_datagram_operations_in_flight_cancels_them() {
        let mut ring = ring();
        let (socket, _) = server();
        let id = ring.register_datagrams(OwnedFd::from(socket), 1).unwrap();
        ring.start_datagrams(id);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }
}
