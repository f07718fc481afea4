//! Registrations mio does not make: a descriptor shared by several epoll instances with
//! `EPOLLEXCLUSIVE` (Linux 4.5), so a new connection on a listener shared by every event loop
//! wakes one waiting loop instead of all of them.
//!
//! The event's `u64` is the caller's token, as mio stores it, so a descriptor registered here
//! in a `mio::Poll`'s epoll instance reports through that `Poll` like its own sources (mio
//! turns the raw event's flags into readable/writable as for any other). The registration is
//! edge-triggered, like mio's.

use std::io;
use std::os::fd::AsRawFd;

/// How a descriptor was registered by [`add_shared`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `EPOLLEXCLUSIVE`: one waiting instance is woken per event.
    Exclusive,
    /// The kernel refused `EPOLLEXCLUSIVE` (older than 4.5): every instance is woken.
    Shared,
}

/// Registers `fd` for readability (edge-triggered) in the epoll instance `epoll`, with
/// `EPOLLEXCLUSIVE` where the kernel has it, and `token` as the event's data.
pub fn add_shared(epoll: &impl AsRawFd, fd: &impl AsRawFd, token: u64) -> io::Result<Sharing> {
    let base = (libc::EPOLLIN | libc::EPOLLET) as u32;
    match ctl(
        epoll,
        libc::EPOLL_CTL_ADD,
        fd,
        base | libc::EPOLLEXCLUSIVE as u32,
        token,
    ) {
        Ok(()) => Ok(Sharing::Exclusive),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            ctl(epoll, libc::EPOLL_CTL_ADD, fd, base, token).map(|()| Sharing::Shared)
        }
        Err(err) => Err(err),
    }
}

/// Removes `fd` from the epoll instance `epoll` (it must be removed before it is closed
/// when another process or thread keeps the same open file: epoll forgets a registration
/// only once every descriptor of the file is closed).
pub fn remove(epoll: &impl AsRawFd, fd: &impl AsRawFd) -> io::Result<()> {
    ctl(epoll, libc::EPOLL_CTL_DEL, fd, 0, 0)
}

fn ctl(
    epoll: &impl AsRawFd,
    op: libc::c_int,
    fd: &impl AsRawFd,
    events: u32,
    token: u64,
) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: both descriptors belong to live owners borrowed for the duration of the call;
    // `event` is a valid epoll_event the kernel only reads (ignored for EPOLL_CTL_DEL).
    syscall!(epoll_ctl(epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut event))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};

    fn epoll() -> OwnedFd {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC)).expect("epoll_create1");
        // SAFETY: epoll_create1 succeeded: the descriptor is open and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// The events `epoll` has, waiting up to `timeout_ms` for the first.
    fn wait(epoll: &OwnedFd, timeout_ms: i32) -> Vec<(u32, u64)> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `events` is a valid array of 8 epoll_events for the kernel to fill.
        let count = syscall!(epoll_wait(
            epoll.as_raw_fd(),
            events.as_mut_ptr(),
            8,
            timeout_ms
        ))
        .expect("epoll_wait");
        events[..count as usize]
            .iter()
            .map(|e| (e.events, e.u64))
            .collect()
    }

    #[test]
    fn a_shared_listener_reports_its_token_once_per_edge_and_is_forgotten_when_removed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (first, second) = (epoll(), epoll());
        for (instance, token) in [(&first, 7), (&second, 9)] {
            add_shared(instance, &listener, token).expect("add");
        }
        assert!(wait(&first, 0).is_empty(), "nothing is pending yet");
        let _client = TcpStream::connect(addr).expect("connect");
        // Nobody waits: an exclusive wake-up goes on to every instance.
        let seen = wait(&first, 10_000);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, 7);
        assert_ne!(seen[0].0 & libc::EPOLLIN as u32, 0);
        assert!(wait(&first, 0).is_empty(), "edge-triggered: reported once");
        let tokens = |events: Vec<(u32, u64)>| events.iter().map(|e| e.1).collect::<Vec<_>>();
        assert_eq!(tokens(wait(&second, 10_000)), vec![9]);
        remove(&first, &listener).expect("remove");
        let _another = TcpStream::connect(addr).expect("connect");
        assert_eq!(tokens(wait(&second, 10_000)), vec![9], "a new edge");
        assert!(wait(&first, 0).is_empty(), "removed: no more events");
        assert!(remove(&first, &listener).is_err(), "already removed");
    }
}
