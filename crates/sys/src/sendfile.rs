//! `sendfile(2)`: file bytes to a socket without copying them through user space.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Sends up to `len` bytes of `file`, starting at `*offset`, to `socket`; advances `*offset` by
/// what was sent. The file position itself is not used or changed. On a non-blocking socket
/// `WouldBlock` means the send buffer is full; `Ok(0)` means the file ended early (it shrank).
pub fn sendfile(
    socket: impl AsFd,
    file: impl AsFd,
    offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(*offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset out of range"))?;
    let out_fd = socket.as_fd().as_raw_fd();
    let in_fd = file.as_fd().as_raw_fd();
    // SAFETY: both descriptors are borrowed from live owners for the duration of the call and
    // `off` is a valid off_t the kernel reads and updates.
    let sent = syscall!(sendfile(out_fd, in_fd, &mut off, len))?;
    *offset = off as u64;
    Ok(sent as usize)
}

/// Writes `bufs` to `socket` with `MSG_MORE`: the kernel holds a partial segment back until
/// more data follows (e.g. a response head just before its `sendfile` body), so the head and the
/// first body bytes leave in one segment even with `TCP_NODELAY`.
pub fn send_more(socket: impl AsFd, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is a plain C struct; all-zero (no name, no control data) is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: `msg` points at `bufs`, which outlives the call; the kernel only reads them.
    let sent = syscall!(sendmsg(fd, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL))?;
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_file_range_arrives_byte_exact_and_the_offset_advances() {
        let mut file = tempfile_with((0..100_000u32).map(|i| (i % 251) as u8).collect());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut offset = 1000u64;
        let mut sent = 0;
        while sent < 50_000 {
            sent += sendfile(&server, &file, &mut offset, 50_000 - sent).unwrap();
        }
        assert_eq!(offset, 51_000);
        drop(server);
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        let expected: Vec<u8> = (1000..51_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(received, expected);
        // The file position was not used.
        let mut first = [0u8; 1];
        file.read_exact(&mut first).unwrap();
        assert_eq!(first[0], 0);
    }

    #[test]
    fn a_head_sent_with_msg_more_arrives_before_the_file_bytes() {
        let file = tempfile_with(b"BODY".to_vec());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let head = [std::io::IoSlice::new(b"HE"), std::io::IoSlice::new(b"AD ")];
        assert_eq!(send_more(&server, &head).unwrap(), 5);
        let mut offset = 0;
        assert_eq!(sendfile(&server, &file, &mut offset, 4).unwrap(), 4);
        drop(server);
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        assert_eq!(received, b"HEAD BODY");
    }

    fn tempfile_with(bytes: Vec<u8>) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("plexus-sendfile-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
