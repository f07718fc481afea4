//! A session's outbound queue: bytes waiting for the peer, written with `writev`.
//!
//! Small sends are copied into a staging buffer so that a burst of replies leaves in one
//! system call; shared buffers (broadcasts) are queued without copying. When the queue empties
//! its memory is released, so an idle session holds no buffer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{Buf, Bytes, BytesMut};

/// Most buffers handed to one `writev` (Linux allows 1024; 64 covers any realistic burst).
const MAX_IOVECS: usize = 64;
/// The staging buffer is frozen into the chunk list once it holds this much.
const STAGING_CHUNK: usize = 64 * 1024;
/// Staging capacity kept across sends while a session is busy; more is released when empty.
const STAGING_KEEP: usize = 4 * 1024;

/// Bytes queued for one peer, oldest first.
#[derive(Debug, Default)]
pub(crate) struct OutboundQueue {
    chunks: VecDeque<Bytes>,
    staging: BytesMut,
    len: usize,
    /// Datagram mode: each push is its own chunk (one datagram), never coalesced.
    framed: bool,
}

impl OutboundQueue {
    /// Total bytes queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A queue for a datagram session: every push stays one datagram (see `pop_datagram`).
    pub(crate) fn datagrams() -> Self {
        OutboundQueue {
            framed: true,
            ..OutboundQueue::default()
        }
    }

    /// The oldest queued datagram (datagram mode), removed from the queue.
    pub(crate) fn pop_datagram(&mut self) -> Option<Bytes> {
        let chunk = self.chunks.pop_front()?;
        self.len -= chunk.len();
        Some(chunk)
    }

    /// Queues a copy of `data`.
    pub(crate) fn push_copy(&mut self, data: &[u8]) {
        if self.framed {
            // An empty datagram is a valid datagram.
            self.chunks.push_back(Bytes::copy_from_slice(data));
            self.len += data.len();
            return;
        }
        if data.is_empty() {
            return;
        }
        self.staging.extend_from_slice(data);
        self.len += data.len();
        if self.staging.len() >= STAGING_CHUNK {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Queues `data` without copying.
    pub(crate) fn push_shared(&mut self, data: Bytes) {
        if data.is_empty() && !self.framed {
            return;
        }
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
        self.len += data.len();
        self.chunks.push_back(data);
    }

    /// Drops everything queued (the session is being aborted).
    pub(crate) fn clear(&mut self) {
        let framed = self.framed;
        *self = OutboundQueue::default();
        self.framed = framed;
    }

    /// Writes as much as `writer` accepts. Returns the bytes written; stops at `WouldBlock`
    /// (returned as `Ok` with what was written so far, and `blocked = true`).
    pub(crate) fn write_to(&mut self, writer: &mut impl Write) -> io::Result<Flushed> {
        let mut written = 0;
        while !self.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for chunk in self.chunks.iter().take(MAX_IOVECS - 1) {
                slices[count] = IoSlice::new(chunk);
                count += 1;
            }
            if !self.staging.is_empty() && count < MAX_IOVECS {
                slices[count] = IoSlice::new(&self.staging);
                count += 1;
            }
            let offered: usize = slices[..count].iter().map(|slice| slice.len()).sum();
            // One buffer: plain write (send) is cheaper in the kernel than writev.
            let result = match count {
                1 => writer.write(&slices[0]),
                _ => writer.write_vectored(&slices[..count]),
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    written += n;
                    if n < offered {
                        // A short write means the socket buffer is full; the writable edge
                        // that follows says when to go on (no WouldBlock round trip).
                        return Ok(Flushed {
                            written,
                            blocked: true,
                        });
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Flushed {
                        written,
                        blocked: true,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(Flushed {
            written,
            blocked: false,
        })
    }

    /// The oldest queued bytes (one chunk), for a writer that takes them piecewise (TLS).
    pub(crate) fn front(&self) -> &[u8] {
        self.chunks
            .front()
            .map_or(&self.staging[..], |chunk| &chunk[..])
    }

    /// Drops the first `n` queued bytes (they were written).
    pub(crate) fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.staging.advance(n);
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if self.len == 0 {
            if self.chunks.capacity() > 0 {
                self.chunks = VecDeque::new();
            }
            if self.staging.capacity() > STAGING_KEEP {
                self.staging = BytesMut::new();
            } else {
                self.staging.clear();
            }
        }
    }
}

/// The result of one flush attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flushed {
    pub(crate) written: usize,
    /// The socket would block: wait for a writable event before trying again.
    pub(crate) blocked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `budget` bytes per call, then blocks once it runs out.
    struct Trickle {
        out: Vec<u8>,
        per_call: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.per_call).min(self.budget);
            self.out.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            // Like a socket: takes from every buffer in turn, up to the per-call limit.
            let joined: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            self.write(&joined)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn mixed_copies_and_shared_chunks_come_out_in_order_across_partial_writes() {
        let mut queue = OutboundQueue::default();
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let piece = format!("piece-{i};").into_bytes();
            if i % 3 == 0 {
                queue.push_shared(Bytes::from(piece.clone()));
            } else {
                queue.push_copy(&piece);
            }
            expected.extend_from_slice(&piece);
        }
        queue.push_copy(&vec![7u8; 100_000]);
        expected.extend(std::iter::repeat_n(7u8, 100_000));
        assert_eq!(queue.len(), expected.len());

        let mut writer = Trickle {
            out: Vec::new(),
            per_call: 333,
            budget: 5000,
        };
        let first = queue.write_to(&mut writer).unwrap();
        assert_eq!(
            first,
            Flushed {
                written: 333,
                blocked: true
            },
            "a short write ends the flush"
        );
        let mut rounds = 0;
        while writer.budget > 0 {
            queue.write_to(&mut writer).unwrap();
            rounds += 1;
            assert!(rounds < 100);
        }
        let stalled = queue.write_to(&mut writer).unwrap();
        assert_eq!(
            stalled,
            Flushed {
                written: 0,
                blocked: true
            },
            "WouldBlock"
        );
        assert_eq!(queue.len(), expected.len() - 5000);
        writer.budget = usize::MAX;
        writer.per_call = usize::MAX;
        let rest = queue.write_to(&mut writer).unwrap();
        assert!(!rest.blocked);
        assert_eq!(writer.out, expected);
        assert!(queue.is_empty());
    }

    #[test]
    fn memory_is_released_once_drained() {
        let mut queue = OutboundQueue::default();
        queue.push_copy(&vec![1u8; 50_000]);
        queue.push_shared(Bytes::from_static(b"tail"));
        let mut writer = Trickle {
            out: Vec::new(),
            per_call: usize::MAX,
            budget: usize::MAX,
        };
        queue.write_to(&mut writer).unwrap();
        assert_eq!(queue.staging.capacity(), 0);
        assert_eq!(queue.chunks.capacity(), 0);
    }

    #[test]
    fn write_zero_is_an_error_not_a_spin() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut queue = OutboundQueue::default();
        queue.push_copy(b"x");
        assert_eq!(
            queue.write_to(&mut Zero).unwrap_err().kind(),
            io::ErrorKind::WriteZero
        );
    }
}
