//! Batched datagram I/O: `recvmmsg(2)` and `sendmmsg(2)` over a UDP socket.
//!
//! [`RecvBatch`] owns the buffers one `recvmmsg` fills (one slot per datagram, each with its
//! source address, length and truncation flag); [`send_batch`] sends many datagrams, each to
//! its own destination, in one system call. Both are non-blocking when the socket is.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

/// The largest UDP payload over IPv4 (65,535 − 8-byte UDP header − 20-byte IP header).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Buffers for receiving up to `batch` datagrams of up to `slot` bytes in one call.
pub struct RecvBatch {
    /// `batch` slots of `slot` bytes each, back to back.
    buf: Box<[u8]>,
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("batch", &self.lens.len())
            .field("slot", &self.slot)
            .field("count", &self.count)
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
            lens: vec![0; batch],
            truncated: vec![false; batch],
            count: 0,
        }
    }

    /// Receives up to a batch of datagrams without blocking; returns how many arrived
    /// (`WouldBlock` when none were waiting).
    pub fn recv(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let batch = self.lens.len();
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
        }
        let fd = socket.as_fd().as_raw_fd();
        // SAFETY: `headers` holds `batch` entries whose name and iovec pointers point into
        // `self.addrs`, `iovecs` and `self.buf`, all alive and unaliased for the call.
        let received = syscall!(recvmmsg(
            fd,
            headers.as_mut_ptr(),
            batch as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut()
        ))? as usize;
        for (index, header) in headers.iter().take(received).enumerate() {
            self.lens[index] = (header.msg_len as usize).min(self.slot);
            self.truncated[index] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        self.count = received;
        Ok(received)
    }

    /// How many datagrams one receive can return.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// How many datagrams the last [`RecvBatch::recv`] returned.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last receive returned nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `index` of the last receive (`index < len()`).
    pub fn get(&self, index: usize) -> Received<'_> {
        let start = index * self.slot;
        Received {
            source: from_storage(&self.addrs[index]),
            data: &self.buf[start..start + self.lens[index]],
            truncated: self.truncated[index],
        }
    }
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

fn to_storage(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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
}
