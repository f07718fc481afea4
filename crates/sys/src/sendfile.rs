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
