//! Zero-copy relaying between sockets: a non-blocking pipe and `splice(2)`.
//!
//! A byte stream moves socket → pipe → socket inside the kernel, without being copied to user
//! space. The pipe is the relay's buffer: its capacity bounds the bytes in flight.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// Capacity the relay asks of each pipe (the Linux default is 64 KiB as well).
pub const PIPE_CAPACITY: usize = 64 * 1024;

/// Both ends of a non-blocking, close-on-exec pipe.
#[derive(Debug)]
pub struct Pipe {
    /// The end `splice` reads from.
    pub read: OwnedFd,
    /// The end `splice` writes to.
    pub write: OwnedFd,
}

impl Pipe {
    /// Creates a pipe with `O_NONBLOCK | O_CLOEXEC`.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [-1 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` with `splice(2)` (`SPLICE_F_MOVE |
/// SPLICE_F_NONBLOCK`); one side must be a pipe. `Ok(0)` means end of stream on `from`;
/// `WouldBlock` means `from` has nothing or `to` has no room.
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    let from = from.as_fd().as_raw_fd();
    let to = to.as_fd().as_raw_fd();
    // SAFETY: both descriptors are borrowed from live owners for the duration of the call;
    // null offsets mean "use and advance the file position", valid for pipes and sockets.
    let moved = syscall!(splice(
        from,
        std::ptr::null_mut(),
        to,
        std::ptr::null_mut(),
        len,
        flags
    ))?;
    Ok(moved as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn bytes_cross_socket_to_socket_through_a_pipe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (source, _) = listener.accept().unwrap();
        let sink_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let destination = TcpStream::connect(sink_listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = sink_listener.accept().unwrap();

        sender.write_all(b"zero copy").unwrap();
        sender.shutdown(std::net::Shutdown::Write).unwrap();
        let pipe = Pipe::new().unwrap();
        let mut moved = 0;
        while moved < 9 {
            match splice(&source, &pipe.write, PIPE_CAPACITY) {
                Ok(n) => moved += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(err) => panic!("{err}"),
            }
        }
        assert_eq!(splice(&pipe.read, &destination, moved).unwrap(), 9);
        drop(destination);
        let mut got = String::new();
        receiver.read_to_string(&mut got).unwrap();
        assert_eq!(got, "zero copy");
        // The source's FIN reads as end of stream.
        loop {
            match splice(&source, &pipe.write, PIPE_CAPACITY) {
                Ok(0) => break,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
