//! Batched datagram I/O: `recvmmsg(2)` and `sendmmsg(2)` over a UDP socket, with the kernel's
//! UDP segmentation offloads where it has them.
//!
//! [`RecvBatch`] owns the buffers one `recvmmsg` fills (one slot per message, each with its
//! source address, length and truncation flag); [`send_batch`] sends many datagrams, each to
//! its own destination, in one system call. Both are non-blocking when the socket is.
//!
//! Offloads (Linux ≥ 4.18 / 5.0, see `udp(7)`), probed once per process by [`offload`]:
//! * **GSO** (`UDP_SEGMENT`): [`send_batch_segmented`] sends a run of equal-size datagrams to
//!   one destination (the last may be shorter) as one message with a `UDP_SEGMENT` control
//!   message; the kernel cuts it into the same datagrams a plain send would have produced.
//! * **GRO** (`UDP_GRO`, enabled per socket by [`enable_gro`]): the kernel may hand over
//!   several datagrams of one sender as one buffer with their segment size in a control
//!   message; [`RecvBatch`] splits such a buffer back into its datagrams, so a caller sees
//!   exactly the datagrams that were sent whether or not they were coalesced.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

/// The largest UDP payload over IPv4 (65,535 − 8-byte UDP header − 20-byte IP header).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// The most segments one GSO send may carry (`UDP_MAX_SEGMENTS` of kernels before 6.x;
/// newer ones accept 128).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Control-message room per received message: one `UDP_GRO` int needs 24 bytes
/// (`CMSG_SPACE(4)`); 64 leaves room for a cmsg the caller did not ask for (then ignored).
const RECV_CONTROL_WORDS: usize = 8;

/// Control-message room for one `UDP_SEGMENT` (a `u16`): `CMSG_SPACE(2)` = 24 bytes.
const SEND_CONTROL_WORDS: usize = 3;

/// What the kernel supports of the UDP segmentation offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// `UDP_SEGMENT` is known (GSO on send).
    pub gso: bool,
    /// `UDP_GRO` is known (coalesced receive).
    pub gro: bool,
}

/// Probes, once per process, whether this kernel knows `UDP_SEGMENT` and `UDP_GRO`: reads the
/// first and sets the second on a throw-away IPv4 UDP socket (an unknown option fails with
/// `ENOPROTOOPT`). A failure to create the probe socket reports neither.
pub fn offload() -> Offload {
    static PROBED: std::sync::OnceLock<Offload> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        let Ok(probe) = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) else {
            return Offload {
                gso: false,
                gro: false,
            };
        };
        Offload {
            gso: get_int(&probe, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok(),
            gro: enable_gro(&probe).is_ok(),
        }
    })
}

/// Turns on `UDP_GRO` for `socket`: the kernel may then deliver several datagrams of one
/// sender as one coalesced buffer, which [`RecvBatch`] splits again.
pub fn enable_gro(socket: impl AsFd) -> io::Result<()> {
    set_int(socket, libc::SOL_UDP, libc::UDP_GRO, 1)
}

fn set_int(socket: impl AsFd, level: libc::c_int, name: libc::c_int, value: i32) -> io::Result<()> {
    let value: libc::c_int = value;
    // SAFETY: the option value is a live c_int and its exact size is passed.
    syscall!(setsockopt(
        socket.as_fd().as_raw_fd(),
        level,
        name,
        (&value as *const libc::c_int).cast(),
        size_of::<libc::c_int>() as libc::socklen_t
    ))?;
    Ok(())
}

fn get_int(socket: impl AsFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and `len` says how much the kernel may write.
    syscall!(getsockopt(
        socket.as_fd().as_raw_fd(),
        level,
        name,
        (&mut value as *mut libc::c_int).cast(),
        &mut len
    ))?;
    Ok(value)
}

/// Buffers for receiving up to `batch` messages of up to `slot` bytes in one call.
///
/// With `UDP_GRO` on the socket one message may hold several coalesced datagrams; the batch
/// then yields each of them (so [`RecvBatch::len`] can exceed [`RecvBatch::capacity`]).
pub struct RecvBatch {
    /// `batch` slots of `slot` bytes each, back to back.
    buf: Box<[u8]>,
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    /// One control-message buffer per slot (u64 words: aligned for `cmsghdr`).
    controls: Vec<[u64; RECV_CONTROL_WORDS]>,
    /// The datagrams of the last receive, in arrival order.
    segments: Vec<Segment>,
}

/// Where one received datagram lies in the batch.
#[derive(Debug, Clone, Copy)]
struct Segment {
    slot: usize,
    start: usize,
    len: usize,
    truncated: bool,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("batch", &self.addrs.len())
            .field("slot", &self.slot)
            .field("count", &self.segments.len())
            .finish()
    }
}

/// One received datagram.
#[derive(Debug)]
pub struct Received<'a> {
    /// Who sent it (`None` for an address family other than IPv4/IPv6).
    pub source: Option<SocketAddr>,
    /// Its bytes (only the first `slot` bytes when truncated).
    pub data: &'a [u8],
    /// The datagram was longer than the slot (`MSG_TRUNC`): its tail is lost.
    pub truncated: bool,
}

impl RecvBatch {
    /// Buffers for `batch` datagrams (at least 1) of `slot` bytes each. The memory is zeroed
    /// lazily by the allocator, so untouched slots cost no resident memory.
    pub fn new(batch: usize, slot: usize) -> RecvBatch {
        let batch = batch.max(1);
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
        let empty: libc::sockaddr_storage = unsafe { zeroed() };
        RecvBatch {
            buf: vec![0u8; batch * slot].into_boxed_slice(),
            slot,
            addrs: vec![empty; batch],
            controls: vec![[0; RECV_CONTROL_WORDS]; batch],
            segments: Vec::with_capacity(batch),
        }
    }

    /// Receives up to a batch of messages without blocking; returns how many datagrams they
    /// held (`WouldBlock` when none were waiting). A message coalesced by `UDP_GRO` counts
    /// as each of its datagrams.
    pub fn recv(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let batch = self.addrs.len();
        self.segments.clear();
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(batch);
        for chunk in self.buf.chunks_mut(self.slot.max(1)).take(batch) {
            iovecs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            });
        }
        // SAFETY: mmsghdr is plain old data; zero is a valid initial value for every field.
        let mut headers: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { zeroed() }).collect();
        for (index, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name =
                (&mut self.addrs[index] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = &mut iovecs[index];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[index].as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = size_of::<[u64; RECV_CONTROL_WORDS]>() as _;
        }
        let fd = socket.as_fd().as_raw_fd();
        // SAFETY: `headers` holds `batch` entries whose name, iovec and control pointers
        // point into `self.addrs`, `iovecs`, `self.buf` and `self.controls`, all alive and
        // unaliased for the call.
        let received = syscall!(recvmmsg(
            fd,
            headers.as_mut_ptr(),
            batch as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut()
        ))? as usize;
        for (index, header) in headers.iter().take(received).enumerate() {
            let len = (header.msg_len as usize).min(self.slot);
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let start = index * self.slot;
            match gro_segment_size(&header.msg_hdr) {
                Some(size) if size > 0 && size < len => {
                    // Coalesced: every `size` bytes are one datagram, the last may be
                    // shorter. Under truncation only the datagrams copied whole are intact.
                    let mut offset = 0;
                    while offset < len {
                        let part = size.min(len - offset);
                        let cut = truncated && offset + size > len;
                        self.segments.push(Segment {
                            slot: index,
                            start: start + offset,
                            len: part,
                            truncated: cut,
                        });
                        offset += part;
                    }
                }
                _ => self.segments.push(Segment {
                    slot: index,
                    start,
                    len,
                    truncated,
                }),
            }
        }
        Ok(self.segments.len())
    }

    /// How many messages one receive can return (each of which may hold several datagrams
    /// when `UDP_GRO` is on).
    pub fn capacity(&self) -> usize {
        self.addrs.len()
    }

    /// How many datagrams the last [`RecvBatch::recv`] returned.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether the last receive returned nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Datagram `index` of the last receive (`index < len()`).
    pub fn get(&self, index: usize) -> Received<'_> {
        let segment = self.segments[index];
        Received {
            source: from_storage(&self.addrs[segment.slot]),
            data: &self.buf[segment.start..segment.start + segment.len],
            truncated: segment.truncated,
        }
    }
}

/// The `UDP_GRO` segment size the kernel attached to a received message, if any.
fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: `msg` is a header the kernel just filled: `msg_control` points at our control
    // buffer and `msg_controllen` says how much of it the kernel wrote (0 when nothing).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a complete
        // cmsghdr inside the control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_UDP && header.cmsg_type == libc::UDP_GRO {
            // SAFETY: a UDP_GRO cmsg carries one int right after its header, inside the
            // buffer; read unaligned since the data is only guaranteed int alignment.
            let size = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()) };
            return usize::try_from(size).ok();
        }
        // SAFETY: as above, `msg` still describes the same, valid control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// Sends each `(destination, payload)` as one datagram with `sendmmsg(2)`, without blocking.
/// Returns how many of the first datagrams were sent (`WouldBlock` when none could be).
pub fn send_batch(socket: impl AsFd, datagrams: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    if datagrams.is_empty() {
        return Ok(0);
    }
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        datagrams.iter().map(|(addr, _)| to_storage(addr)).collect();
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|(_, data)| libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; zero is a valid initial value for every field.
    let mut headers: Vec<libc::mmsghdr> =
        (0..datagrams.len()).map(|_| unsafe { zeroed() }).collect();
    for (index, header) in headers.iter_mut().enumerate() {
        header.msg_hdr.msg_name = (&mut addrs[index].0 as *mut libc::sockaddr_storage).cast();
        header.msg_hdr.msg_namelen = addrs[index].1;
        header.msg_hdr.msg_iov = &mut iovecs[index];
        header.msg_hdr.msg_iovlen = 1;
    }
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: every header points at an address and one iovec that live until the call
    // returns; the kernel only reads the payloads (the iovec's mutable pointer is its ABI).
    let sent = syscall!(sendmmsg(
        fd,
        headers.as_mut_ptr(),
        headers.len() as libc::c_uint,
        libc::MSG_DONTWAIT
    ))?;
    Ok(sent as usize)
}

/// What [`send_batch_segmented`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// How many of the first datagrams were sent.
    pub datagrams: usize,
    /// The kernel refused the batch's first GSO message, which then went out without GSO.
    pub refused: Option<GsoRefusal>,
}

/// Why the kernel refused a `UDP_SEGMENT` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoRefusal {
    /// `EINVAL` / `EMSGSIZE`: this segment size does not fit the route (segments larger than
    /// its MTU allows); smaller ones may.
    SegmentTooLarge(usize),
    /// Any other error (e.g. `EIO`: the device has no checksum offload): GSO does not work
    /// on this socket.
    Unsupported,
}

/// Like [`send_batch`], but each run of consecutive datagrams to one destination that share
/// one size below `max_segment` (the run's last one may be shorter) goes out as one message
/// with `UDP_SEGMENT` (at most [`MAX_GSO_SEGMENTS`] datagrams and [`MAX_UDP_PAYLOAD`] bytes a
/// message): the kernel cuts it into exactly those datagrams, in order. Lone datagrams are
/// sent as plain messages. If the kernel refuses the batch's first GSO message, the batch is
/// sent again without GSO and [`Sent::refused`] says why.
pub fn send_batch_segmented(
    socket: impl AsFd,
    datagrams: &[(SocketAddr, &[u8])],
    max_segment: usize,
) -> io::Result<Sent> {
    let groups = gso_groups(datagrams, max_segment);
    if groups.iter().all(|&(_, count)| count == 1) {
        return send_batch(socket, datagrams).map(|datagrams| Sent {
            datagrams,
            refused: None,
        });
    }
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> = groups
        .iter()
        .map(|&(first, _)| to_storage(&datagrams[first].0))
        .collect();
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|(_, data)| libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        })
        .collect();
    let mut controls: Vec<[u64; SEND_CONTROL_WORDS]> = vec![[0; SEND_CONTROL_WORDS]; groups.len()];
    // SAFETY: mmsghdr is plain old data; zero is a valid initial value for every field.
    let mut headers: Vec<libc::mmsghdr> = (0..groups.len()).map(|_| unsafe { zeroed() }).collect();
    for (index, header) in headers.iter_mut().enumerate() {
        let (first, count) = groups[index];
        header.msg_hdr.msg_name = (&mut addrs[index].0 as *mut libc::sockaddr_storage).cast();
        header.msg_hdr.msg_namelen = addrs[index].1;
        header.msg_hdr.msg_iov = &mut iovecs[first];
        header.msg_hdr.msg_iovlen = count as _;
        if count > 1 {
            let size = datagrams[first].1.len() as u16;
            let control = &mut controls[index];
            header.msg_hdr.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            header.msg_hdr.msg_controllen =
                unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            // SAFETY: the header's control buffer is `controls[index]` (24 bytes, u64-aligned),
            // just set with its length, so CMSG_FIRSTHDR returns a pointer into it.
            let cmsg = unsafe { libc::CMSG_FIRSTHDR(&header.msg_hdr) };
            // SAFETY: `cmsg` points at the start of that zeroed, aligned buffer, which has
            // room for a cmsghdr followed by a u16 (CMSG_SPACE(2) bytes).
            unsafe {
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
            }
        }
    }
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: every header points at an address, its run of iovecs and (for a GSO run) its
    // control buffer, all living until the call returns; the kernel only reads the payloads.
    match syscall!(sendmmsg(
        fd,
        headers.as_mut_ptr(),
        headers.len() as libc::c_uint,
        libc::MSG_DONTWAIT
    )) {
        Ok(sent) => Ok(Sent {
            datagrams: groups
                .iter()
                .take(sent as usize)
                .map(|&(_, count)| count)
                .sum(),
            refused: None,
        }),
        Err(err) => {
            // Only errors that name GSO itself are a refusal; the rest (WouldBlock, a
            // route or buffer error) concern the send and go back to the caller as they are.
            let refused = match err.raw_os_error() {
                _ if groups[0].1 == 1 => return Err(err),
                Some(libc::EINVAL | libc::EMSGSIZE) => {
                    GsoRefusal::SegmentTooLarge(datagrams[groups[0].0].1.len())
                }
                Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => GsoRefusal::Unsupported,
                _ => return Err(err),
            };
            send_batch(&socket, datagrams).map(|datagrams| Sent {
                datagrams,
                refused: Some(refused),
            })
        }
    }
}

/// The GSO runs [`send_batch_segmented`] would form of `datagrams`: `(first index, count)`
/// per message (a run of one is a plain datagram). For senders that build their own
/// messages, such as the io_uring ring ([`crate::uring::Ring::send_datagrams`]).
pub fn gso_runs(datagrams: &[(SocketAddr, &[u8])], max_segment: usize) -> Vec<(usize, usize)> {
    gso_groups(datagrams, max_segment)
}

/// Splits `datagrams` into GSO runs: `(first index, count)` for each run of consecutive
/// datagrams to one destination with one non-zero size below `max_segment`, where only the
/// last may be shorter, capped at [`MAX_GSO_SEGMENTS`] datagrams and [`MAX_UDP_PAYLOAD`] bytes.
fn gso_groups(datagrams: &[(SocketAddr, &[u8])], max_segment: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut first = 0;
    while first < datagrams.len() {
        let (to, data) = datagrams[first];
        let size = data.len();
        let mut count = 1;
        let mut bytes = size;
        if size > 0 && size < max_segment {
            while let Some((next_to, next)) = datagrams.get(first + count) {
                if *next_to != to
                    || next.is_empty()
                    || next.len() > size
                    || count >= MAX_GSO_SEGMENTS
                    || bytes + next.len() > MAX_UDP_PAYLOAD
                {
                    break;
                }
                count += 1;
                bytes += next.len();
                if next.len() < size {
                    break; // a shorter datagram ends its run
                }
            }
        }
        groups.push((first, count));
        first += count;
    }
    groups
}

fn from_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and suitably aligned for.
            let addr = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let addr = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(crate) fn to_storage(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and aligned for a sockaddr_in.
            let out = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = v4.port().to_be();
            out.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let out = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = v6.port().to_be();
            out.sin6_addr.s6_addr = v6.ip().octets();
            out.sin6_flowinfo = v6.flowinfo();
            out.sin6_scope_id = v6.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn batch_round_trip_keeps_sources_lengths_and_flags_truncation() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.2:0").unwrap();
        let to = server.local_addr().unwrap();
        a.send_to(b"one", to).unwrap();
        b.send_to(&[7u8; 100], to).unwrap();
        let mut batch = RecvBatch::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 2 {
            match batch.recv(&server) {
                Ok(n) => {
                    for i in 0..n {
                        let r = batch.get(i);
                        got.push((r.source.unwrap(), r.data.to_vec(), r.truncated));
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(err) => panic!("{err}"),
            }
        }
        assert_eq!(got[0], (a.local_addr().unwrap(), b"one".to_vec(), false));
        assert_eq!(got[1].0, b.local_addr().unwrap());
        assert_eq!(got[1].1.len(), 64);
        assert!(
            got[1].2,
            "a 100-byte datagram in a 64-byte slot is flagged truncated"
        );

        let replies: [(SocketAddr, &[u8]); 2] = [
            (a.local_addr().unwrap(), b"to a"),
            (b.local_addr().unwrap(), b"to b"),
        ];
        assert_eq!(send_batch(&server, &replies).unwrap(), 2);
        let mut buf = [0u8; 16];
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"to a"[..], to));
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"to b");
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn gso_runs_need_one_destination_and_one_size_with_a_shorter_tail() {
        let big = [1u8; 100];
        let small = [2u8; 40];
        let d: Vec<(SocketAddr, &[u8])> = vec![
            (addr(1), &big),
            (addr(1), &big),
            (addr(1), &small), // shorter tail ends the run
            (addr(1), &big),
            (addr(2), &big), // other peer
            (addr(2), &[]),  // empty: never in a run
            (addr(2), &small),
            (addr(2), &big), // longer than the run's size: new run
        ];
        assert_eq!(
            gso_groups(&d, usize::MAX),
            vec![(0, 3), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1)]
        );
        // Sizes at or above a refused segment size are never grouped again.
        assert_eq!(
            gso_groups(&d, 100),
            vec![
                (0, 1),
                (1, 1),
                (2, 1),
                (3, 1),
                (4, 1),
                (5, 1),
                (6, 1),
                (7, 1)
            ]
        );
        let many: Vec<(SocketAddr, &[u8])> = (0..MAX_GSO_SEGMENTS + 3)
            .map(|_| (addr(1), &small[..]))
            .collect();
        assert_eq!(
            gso_groups(&many, usize::MAX),
            vec![(0, MAX_GSO_SEGMENTS), (MAX_GSO_SEGMENTS, 3)]
        );
        let huge = vec![0u8; 30_000];
        let bytes: Vec<(SocketAddr, &[u8])> = (0..3).map(|_| (addr(1), &huge[..])).collect();
        assert_eq!(
            gso_groups(&bytes, usize::MAX),
            vec![(0, 2), (2, 1)],
            "at most 65,507 bytes a run"
        );
    }

    /// Bursts from two senders, in sizes that make GSO runs, lone datagrams and short tails.
    fn bursts() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut n = 0u8;
        for (count, size) in [(10, 64), (1, 7), (5, 1200), (3, 1), (40, 100), (2, 3000)] {
            for i in 0..count {
                n = n.wrapping_add(1);
                // A shorter last datagram in some bursts.
                let len = if i + 1 == count && size > 10 {
                    size / 2
                } else {
                    size
                };
                out.push((0..len).map(|b| n.wrapping_add(b as u8)).collect());
            }
        }
        out
    }

    /// Sends `bursts()` from `from` to `to` with [`send_batch_segmented`]; returns how many
    /// messages (not datagrams) were handed to the kernel.
    fn send_bursts(from: &UdpSocket, to: SocketAddr) -> Vec<Vec<u8>> {
        let sent = bursts();
        let list: Vec<(SocketAddr, &[u8])> = sent.iter().map(|d| (to, d.as_slice())).collect();
        let mut done = 0;
        while done < list.len() {
            let r = send_batch_segmented(from, &list[done..], usize::MAX).unwrap();
            assert!(
                r.refused.is_none() || !offload().gso,
                "GSO refused on loopback"
            );
            done += r.datagrams;
        }
        sent
    }

    fn receive_all(server: &UdpSocket, want: usize) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
        let mut batch = RecvBatch::new(4, 64 * 1024);
        let mut got = Vec::new();
        let mut calls = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < want && std::time::Instant::now() < deadline {
            match batch.recv(server) {
                Ok(n) => {
                    calls += 1;
                    for i in 0..n {
                        let r = batch.get(i);
                        assert!(!r.truncated);
                        got.push((r.source.unwrap(), r.data.to_vec()));
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(err) => panic!("{err}"),
            }
        }
        (got, calls)
    }

    #[test]
    fn segmented_send_arrives_as_the_same_datagrams_at_a_plain_receiver() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = send_bursts(&client, server.local_addr().unwrap());
        let (got, _) = receive_all(&server, sent.len());
        let from = client.local_addr().unwrap();
        assert_eq!(got.len(), sent.len());
        for (index, (source, data)) in got.iter().enumerate() {
            assert_eq!(*source, from);
            assert_eq!(data, &sent[index], "datagram {index}");
        }
    }

    #[test]
    fn gro_receive_splits_coalesced_buffers_into_the_datagrams_sent() {
        if !offload().gro {
            eprintln!("UDP_GRO unsupported by this kernel: nothing to split");
            return;
        }
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        enable_gro(&server).unwrap();
        // Two senders whose bursts interleave: every datagram must keep its own source.
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.2:0").unwrap();
        let to = server.local_addr().unwrap();
        let sent_a = send_bursts(&a, to);
        let sent_b = send_bursts(&b, to);
        let (got, calls) = receive_all(&server, sent_a.len() + sent_b.len());
        let of = |who: SocketAddr| -> Vec<Vec<u8>> {
            got.iter()
                .filter(|(s, _)| *s == who)
                .map(|(_, d)| d.clone())
                .collect()
        };
        assert_eq!(of(a.local_addr().unwrap()), sent_a, "sender a, in order");
        assert_eq!(of(b.local_addr().unwrap()), sent_b, "sender b, in order");
        if offload().gso {
            // Loopback keeps a GSO message whole for a GRO socket, so the split really ran:
            // 4 messages per receive, fewer receives than a datagram-per-slot batch needs.
            assert!(
                calls < got.len().div_ceil(4),
                "{calls} receives for {} datagrams: nothing was coalesced",
                got.len()
            );
        }
    }

    /// A coalesced buffer longer than the slot: the kernel copies the slot's worth and flags
    /// `MSG_TRUNC`; the split yields the datagrams that fit whole, byte-exact, then one piece
    /// flagged truncated, and never reads past the slot. The rest of the buffer is gone (as a
    /// plain datagram's tail is), so one oversized message costs at most one slot.
    #[test]
    fn a_coalesced_buffer_longer_than_the_slot_is_cut_at_the_slot_and_flagged() {
        if !(offload().gro && offload().gso) {
            eprintln!("UDP_GRO/UDP_SEGMENT unsupported by this kernel: nothing to coalesce");
            return;
        }
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        enable_gro(&server).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let sent: Vec<Vec<u8>> = (0..10u8).map(|n| vec![n; 300]).collect();
        let list: Vec<(SocketAddr, &[u8])> = sent.iter().map(|d| (to, d.as_slice())).collect();
        let result = send_batch_segmented(&client, &list, usize::MAX).unwrap();
        assert_eq!((result.datagrams, result.refused), (10, None));
        // A 1000-byte slot for a 3000-byte coalesced message.
        let mut batch = RecvBatch::new(2, 1000);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let count = loop {
            match batch.recv(&server) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing received");
                    std::thread::yield_now()
                }
                Err(err) => panic!("{err}"),
            }
        };
        assert_eq!(count, 4, "three whole datagrams and the cut one");
        for (index, want) in sent.iter().take(3).enumerate() {
            let got = batch.get(index);
            assert_eq!((got.data, got.truncated), (want.as_slice(), false));
        }
        let cut = batch.get(3);
        assert_eq!((cut.data.len(), cut.truncated), (100, true));
        assert_eq!(cut.data, &sent[3][..100]);
        // Nothing of the lost tail is waiting: the message was consumed as a whole.
        assert_eq!(
            batch.recv(&server).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn a_refused_gso_send_goes_out_datagram_by_datagram() {
        if !offload().gso {
            return;
        }
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Without UDP checksums the kernel refuses GSO (EINVAL): the same path as a segment
        // larger than the route's MTU.
        set_int(&client, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let payload = [9u8; 500];
        let list: Vec<(SocketAddr, &[u8])> = (0..5)
            .map(|_| (server.local_addr().unwrap(), &payload[..]))
            .collect();
        let sent = send_batch_segmented(&client, &list, usize::MAX).unwrap();
        assert_eq!(sent.datagrams, 5);
        assert_eq!(sent.refused, Some(GsoRefusal::SegmentTooLarge(500)));
        let (got, _) = receive_all(&server, 5);
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|(_, d)| d.as_slice() == payload));
    }
}
