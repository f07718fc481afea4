//! A session's outbound queue: bytes waiting for the peer, written with `writev`, and file
//! regions, written with `sendfile`.
//!
//! Small sends are copied into a staging buffer so that a burst of replies leaves in one
//! system call; shared buffers (broadcasts) are queued without copying; a file region costs
//! no memory at all until the kernel sends it (plain TCP) or one record's worth is read for
//! TLS. When the queue empties its memory is released, so an idle session holds no buffer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Buf, Bytes};

/// Most buffers handed to one `writev` (Linux allows 1024; 64 covers any realistic burst).
const MAX_IOVECS: usize = 64;
/// The staging buffer is frozen into the chunk list once it holds this much.
const STAGING_CHUNK: usize = 64 * 1024;
/// Staging capacity always kept once everything staged was written (see `Staging::restart`).
const STAGING_KEEP: usize = 4 * 1024;
/// Most file bytes handed to one `sendfile` call.
const SENDFILE_CHUNK: usize = 1 << 20;
/// What one queued entry costs beyond its payload: its slot in the chunk list plus the
/// allocator's share of the buffer (or file) handle it keeps alive. Counting it is what stops
/// a flood of tiny entries (1-byte broadcasts, 1-byte file regions) from holding many times
/// `outbound_limit` in bookkeeping while the payload counted stays small.
pub(crate) const ENTRY_COST: usize = std::mem::size_of::<Chunk>() + 32;

/// Where a queue's file regions go: a socket that can take them without a copy.
pub(crate) trait FileSink: Write {
    /// Sends up to `len` bytes of `file` from `*offset` (advanced by what was sent).
    fn send_file(&mut self, file: &File, offset: &mut u64, len: usize) -> io::Result<usize>;

    /// Writes bytes that a file region follows at once (`MSG_MORE`: one segment for both).
    fn write_before_file(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }
}

impl FileSink for mio::net::TcpStream {
    fn send_file(&mut self, file: &File, offset: &mut u64, len: usize) -> io::Result<usize> {
        plexus_sys::sendfile::sendfile(&*self, file, offset, len)
    }

    fn write_before_file(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        plexus_sys::sendfile::send_more(&*self, bufs)
    }
}

/// A part of a file still to be sent.
#[derive(Debug, Clone)]
pub(crate) struct FileRegion {
    file: Arc<File>,
    offset: u64,
    remaining: u64,
}

#[derive(Debug)]
enum Chunk {
    Data(Bytes),
    File(FileRegion),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Data(bytes) => bytes.len(),
            Chunk::File(region) => region.remaining as usize,
        }
    }
}

/// Copies of small sends, coalesced behind the queued chunks; its first `sent` bytes already
/// went out. A plain `Vec` with an offset rather than a `BytesMut`: when everything staged was
/// written the buffer starts over at its beginning with its capacity kept, so a session that
/// answers each read at once never reallocates or moves bytes (a `BytesMut` advanced to its
/// end has to reclaim its space on every next copy).
#[derive(Debug, Default)]
struct Staging {
    buf: Vec<u8>,
    sent: usize,
}

impl Staging {
    /// The bytes not written yet.
    #[inline]
    fn pending(&self) -> &[u8] {
        self.buf.get(self.sent..).unwrap_or_default()
    }

    #[inline]
    fn len(&self) -> usize {
        self.buf.len().saturating_sub(self.sent)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the buffer holds, written or not (what bounds its size).
    #[inline]
    fn stored(&self) -> usize {
        self.buf.len()
    }

    #[inline]
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// `n` more bytes were written; when that is all of them the buffer starts over.
    #[inline]
    fn advance(&mut self, n: usize) {
        self.sent = self.sent.saturating_add(n).min(self.buf.len());
        if self.sent == self.buf.len() {
            self.restart();
        }
    }

    /// Empties the buffer (everything in it was written). Its capacity is kept while it is the
    /// session's working size: at most [`STAGING_KEEP`], or up to [`STAGING_CHUNK`] when the
    /// fill just written used at least half of it, so a steady stream of same-size replies
    /// never reallocates. A buffer that one burst grew past what is now used is released.
    fn restart(&mut self) {
        let capacity = self.buf.capacity();
        let working = capacity <= STAGING_CHUNK && self.buf.len().saturating_mul(2) >= capacity;
        match capacity > STAGING_KEEP && !working {
            true => self.buf = Vec::new(),
            false => self.buf.clear(),
        }
        self.sent = 0;
    }

    /// The pending bytes as one shared buffer (no copy); the staging buffer is left empty.
    fn take(&mut self) -> Bytes {
        let mut bytes = Bytes::from(std::mem::take(&mut self.buf));
        bytes.advance(self.sent.min(bytes.len()));
        self.sent = 0;
        bytes
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Bytes queued for one peer, oldest first.
#[derive(Debug, Default)]
pub(crate) struct OutboundQueue {
    chunks: VecDeque<Chunk>,
    staging: Staging,
    len: usize,
    /// Datagram mode: each push is its own chunk (one datagram), never coalesced.
    framed: bool,
    /// Of `len`, the bytes that are still in files (not in memory).
    file_len: usize,
}

impl OutboundQueue {
    /// Total bytes queued (memory and files): what the watermarks compare.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Memory the queue holds: payload bytes in memory plus [`ENTRY_COST`] per queued entry
    /// (file regions included: their bytes are on disk, their entries are not). What
    /// `outbound_limit` bounds.
    #[inline]
    pub(crate) fn memory_len(&self) -> usize {
        self.len
            .saturating_sub(self.file_len)
            .saturating_add(self.chunks.len().saturating_mul(ENTRY_COST))
    }

    /// Whether an entry of `payload` more bytes in memory keeps [`OutboundQueue::memory_len`]
    /// within `limit` (charged as a whole new entry, whichever way the push stores it).
    #[inline]
    pub(crate) fn fits(&self, payload: usize, limit: usize) -> bool {
        self.memory_len()
            .saturating_add(payload)
            .saturating_add(ENTRY_COST)
            <= limit
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

    /// Whether the queue is in datagram mode (each push one datagram, never merged).
    pub(crate) fn is_framed(&self) -> bool {
        self.framed
    }

    /// The oldest queued datagram (datagram mode), removed from the queue.
    pub(crate) fn pop_datagram(&mut self) -> Option<Bytes> {
        loop {
            let chunk = self.chunks.pop_front()?;
            let len = chunk.len();
            self.len = self.len.saturating_sub(len);
            match chunk {
                Chunk::Data(bytes) => return Some(bytes),
                // A file region is not a datagram: datagram sessions do not send files.
                Chunk::File(_) => self.file_len = self.file_len.saturating_sub(len),
            }
        }
    }

    /// Queues a copy of `data`.
    #[inline]
    pub(crate) fn push_copy(&mut self, data: &[u8]) {
        if self.framed {
            // An empty datagram is a valid datagram.
            self.chunks
                .push_back(Chunk::Data(Bytes::copy_from_slice(data)));
            self.len = self.len.saturating_add(data.len());
            return;
        }
        if data.is_empty() {
            return;
        }
        self.staging.push(data);
        self.len = self.len.saturating_add(data.len());
        if self.staging.stored() >= STAGING_CHUNK {
            self.chunks.push_back(Chunk::Data(self.staging.take()));
        }
    }

    /// Queues `data` without copying.
    #[inline]
    pub(crate) fn push_shared(&mut self, data: Bytes) {
        if data.is_empty() && !self.framed {
            return;
        }
        self.seal_staging();
        self.len = self.len.saturating_add(data.len());
        self.chunks.push_back(Chunk::Data(data));
    }

    /// Queues `len` bytes of `file` from `offset`; they are read only when sent.
    pub(crate) fn push_file(&mut self, file: Arc<File>, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.seal_staging();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.len = self.len.saturating_add(len);
        self.file_len = self.file_len.saturating_add(len);
        self.chunks.push_back(Chunk::File(FileRegion {
            file,
            offset,
            remaining: len as u64,
        }));
    }

    fn seal_staging(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(Chunk::Data(self.staging.take()));
        }
    }

    /// Drops everything queued (the session is being aborted).
    pub(crate) fn clear(&mut self) {
        let framed = self.framed;
        *self = OutboundQueue::default();
        self.framed = framed;
    }

    /// Writes as much as `writer` accepts. Returns the bytes written; stops at `WouldBlock`
    /// (returned as `Ok` with what was written so far, and `blocked = true`).
    pub(crate) fn write_to(&mut self, writer: &mut impl FileSink) -> io::Result<Flushed> {
        let mut written = 0usize;
        while !self.is_empty() {
            let result = match self.chunks.front_mut() {
                Some(Chunk::File(region)) => {
                    let want = (region.remaining as usize).min(SENDFILE_CHUNK);
                    let mut offset = region.offset;
                    match writer.send_file(&region.file, &mut offset, want) {
                        // The file shrank under us: the promised length cannot be kept.
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        other => other.map(|n| (n, want)),
                    }
                }
                _ => self.write_memory(writer),
            };
            match result {
                Ok((0, _)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok((n, offered)) => {
                    self.consume(n);
                    written = written.saturating_add(n);
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

    /// One `writev` (or `send`) of the in-memory chunks up to the first file region, and of
    /// the staging buffer when every chunk before it fits. Returns what was written and what
    /// was offered.
    fn write_memory(&self, writer: &mut impl FileSink) -> io::Result<(usize, usize)> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut count = 0usize;
        let mut reached_file = false;
        let mut chunks = self.chunks.iter();
        // One slot stays for the staging buffer.
        for (slot, chunk) in slices.iter_mut().take(MAX_IOVECS - 1).zip(chunks.by_ref()) {
            match chunk {
                Chunk::Data(bytes) => {
                    *slot = IoSlice::new(bytes);
                    count = count.saturating_add(1);
                }
                Chunk::File(_) => {
                    reached_file = true;
                    break;
                }
            }
        }
        // The staging buffer holds the newest bytes: it goes only behind the last chunk.
        if !reached_file && !self.staging.is_empty() && chunks.next().is_none() {
            if let Some(slot) = slices.get_mut(count) {
                *slot = IoSlice::new(self.staging.pending());
                count = count.saturating_add(1);
            }
        }
        let used = slices.get(..count).unwrap_or_default();
        let offered: usize = used.iter().map(|slice| slice.len()).sum();
        // One buffer: plain write (send) is cheaper in the kernel than writev.
        let n = match (used, reached_file) {
            (_, true) => writer.write_before_file(used)?,
            ([one], false) => writer.write(one)?,
            _ => writer.write_vectored(used)?,
        };
        Ok((n, offered))
    }

    /// The oldest queued bytes (one chunk), for a writer that takes them piecewise (TLS). A
    /// file region at the front is read first, at most `max` bytes of it.
    pub(crate) fn front(&mut self, max: usize) -> io::Result<&[u8]> {
        if let Some(Chunk::File(region)) = self.chunks.front_mut() {
            let take = (region.remaining as usize).min(max);
            let mut buf = vec![0u8; take];
            // A file that shrank under us ends in `UnexpectedEof`: the length cannot be kept.
            region.file.read_exact_at(&mut buf, region.offset)?;
            region.offset = region.offset.saturating_add(take as u64);
            region.remaining = region.remaining.saturating_sub(take as u64);
            if region.remaining == 0 {
                self.chunks.pop_front();
            }
            self.file_len = self.file_len.saturating_sub(take);
            self.chunks.push_front(Chunk::Data(Bytes::from(buf)));
        }
        Ok(match self.chunks.front() {
            Some(Chunk::Data(chunk)) => &chunk[..],
            _ => self.staging.pending(),
        })
    }

    /// Drops the first `n` queued bytes (they were written).
    pub(crate) fn consume(&mut self, mut n: usize) {
        self.len = self.len.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.staging.advance(n);
                break;
            };
            let front_len = front.len();
            if let Some(rest) = n.checked_sub(front_len) {
                n = rest;
                if let Chunk::File(_) = front {
                    self.file_len = self.file_len.saturating_sub(front_len);
                }
                self.chunks.pop_front();
            } else {
                match front {
                    Chunk::Data(bytes) => bytes.advance(n),
                    Chunk::File(region) => {
                        region.offset = region.offset.saturating_add(n as u64);
                        region.remaining = region.remaining.saturating_sub(n as u64);
                        self.file_len = self.file_len.saturating_sub(n);
                    }
                }
                n = 0;
            }
        }
        if self.len == 0 && self.chunks.capacity() > 0 {
            self.chunks = VecDeque::new();
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

    impl FileSink for Trickle {
        fn send_file(&mut self, file: &File, offset: &mut u64, len: usize) -> io::Result<usize> {
            let mut buf = vec![0u8; len.min(self.per_call).min(self.budget)];
            let n = file.read_at(&mut buf, *offset)?;
            let sent = self.write(&buf[..n])?;
            *offset += sent as u64;
            Ok(sent)
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
    fn staged_bytes_wait_behind_more_chunks_than_one_writev_takes() {
        let mut queue = OutboundQueue::default();
        let mut expected = Vec::new();
        for i in 0..(MAX_IOVECS as u8 + 10) {
            queue.push_shared(Bytes::from(vec![i]));
            expected.push(i);
        }
        queue.push_copy(b"staged");
        expected.extend_from_slice(b"staged");
        let mut writer = Trickle {
            out: Vec::new(),
            per_call: usize::MAX,
            budget: usize::MAX,
        };
        queue.write_to(&mut writer).unwrap();
        assert!(queue.is_empty());
        assert_eq!(writer.out, expected);
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
    fn a_steady_stream_of_same_size_replies_reuses_one_staging_buffer() {
        let mut queue = OutboundQueue::default();
        let mut writer = Trickle {
            out: Vec::new(),
            per_call: usize::MAX,
            budget: usize::MAX,
        };
        queue.push_copy(&[7u8; 16 * 1024]);
        queue.write_to(&mut writer).unwrap();
        let buffer = queue.staging.buf.as_ptr();
        let capacity = queue.staging.capacity();
        assert!(capacity >= 16 * 1024);
        for round in 0..10u8 {
            queue.push_copy(&[round; 16 * 1024]);
            queue.write_to(&mut writer).unwrap();
            assert!(queue.is_empty());
            assert_eq!(
                queue.staging.buf.as_ptr(),
                buffer,
                "round {round} reallocated"
            );
        }
        assert_eq!(queue.staging.capacity(), capacity);
        assert_eq!(writer.out.len(), 11 * 16 * 1024);
    }

    #[test]
    fn a_staging_buffer_grown_by_one_burst_is_released_when_small_replies_follow() {
        let mut queue = OutboundQueue::default();
        let mut writer = Trickle {
            out: Vec::new(),
            per_call: usize::MAX,
            budget: usize::MAX,
        };
        queue.push_copy(&[1u8; 40_000]);
        queue.write_to(&mut writer).unwrap();
        queue.push_copy(b"small");
        queue.write_to(&mut writer).unwrap();
        assert_eq!(queue.staging.capacity(), 0);
        // Small buffers are always kept.
        queue.push_copy(b"small again");
        queue.write_to(&mut writer).unwrap();
        assert!(queue.staging.capacity() > 0 && queue.staging.capacity() <= STAGING_KEEP);
    }

    #[test]
    fn bytes_staged_behind_a_partly_written_staging_buffer_keep_their_order() {
        let mut queue = OutboundQueue::default();
        let mut writer = Trickle {
            out: Vec::new(),
            per_call: 3,
            budget: 4,
        };
        queue.push_copy(b"abcdef");
        let _ = queue.write_to(&mut writer);
        assert_eq!(writer.out, b"abc");
        queue.push_copy(b"ghi");
        writer.budget = usize::MAX;
        writer.per_call = usize::MAX;
        queue.write_to(&mut writer).unwrap();
        assert_eq!(writer.out, b"abcdefghi");
        assert!(queue.is_empty());
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
        impl FileSink for Zero {
            fn send_file(&mut self, _: &File, _: &mut u64, _: usize) -> io::Result<usize> {
                Ok(0)
            }
        }
        let mut queue = OutboundQueue::default();
        queue.push_copy(b"x");
        assert_eq!(
            queue.write_to(&mut Zero).unwrap_err().kind(),
            io::ErrorKind::WriteZero
        );
    }

    fn file_with(bytes: &[u8]) -> Arc<File> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        Arc::new(file)
    }

    #[test]
    fn file_regions_interleave_with_memory_in_order_and_cost_no_memory() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let file = file_with(&body);
        let mut queue = OutboundQueue::default();
        queue.push_copy(b"HEAD1\r\n");
        queue.push_file(Arc::clone(&file), 10, 200_000);
        queue.push_copy(b"HEAD2\r\n");
        queue.push_file(file, 0, 5);
        queue.push_shared(Bytes::from_static(b"tail"));
        assert_eq!(queue.len(), 7 + 200_000 + 7 + 5 + 4);
        // Five entries (two sealed copies, two regions, one shared buffer): file bytes cost
        // nothing, entries do.
        assert_eq!(queue.memory_len(), 7 + 7 + 4 + 5 * ENTRY_COST);

        let mut writer = Trickle {
            out: Vec::new(),
            per_call: 7_777,
            budget: usize::MAX,
        };
        let mut rounds = 0;
        while !queue.is_empty() {
            queue.write_to(&mut writer).unwrap();
            rounds += 1;
            assert!(rounds < 1000);
        }
        let mut expected = b"HEAD1\r\n".to_vec();
        expected.extend_from_slice(&body[10..200_010]);
        expected.extend_from_slice(b"HEAD2\r\n");
        expected.extend_from_slice(&body[..5]);
        expected.extend_from_slice(b"tail");
        assert_eq!(writer.out, expected);
        assert_eq!(queue.memory_len(), 0);
    }

    #[test]
    fn tiny_entries_are_charged_what_they_cost_not_their_payload() {
        // One-byte shared buffers (what per-line broadcasts were): a 4 MiB limit admits about
        // 64 Ki of them, not 4 Mi.
        let limit = 4 * 1024 * 1024;
        let mut queue = OutboundQueue::default();
        let one = Bytes::from_static(b"x");
        let mut admitted = 0;
        while queue.fits(1, limit) {
            queue.push_shared(one.clone());
            admitted += 1;
        }
        assert_eq!(admitted, limit / (1 + ENTRY_COST));
        assert!(queue.memory_len() <= limit);
        // Copies coalesce into the staging buffer: their bytes are what they cost.
        let mut copies = OutboundQueue::default();
        for _ in 0..10_000 {
            copies.push_copy(b"y");
        }
        assert_eq!(copies.memory_len(), 10_000);
        // A file region holds no file bytes in memory, but its entry counts.
        let mut files = OutboundQueue::default();
        files.push_file(file_with(b"z"), 0, 1);
        assert_eq!(files.memory_len(), ENTRY_COST);
        assert!(ENTRY_COST >= std::mem::size_of::<Chunk>());
    }

    #[test]
    fn a_file_region_is_read_piecewise_for_tls() {
        let body: Vec<u8> = (0..40_000u32).map(|i| (i % 249) as u8).collect();
        let mut queue = OutboundQueue::default();
        queue.push_copy(b"H");
        queue.push_file(file_with(&body), 0, 40_000);
        let mut out = Vec::new();
        while !queue.is_empty() {
            let chunk = queue.front(16_384).unwrap();
            let take = chunk.len().min(10_000);
            out.extend_from_slice(&chunk[..take]);
            queue.consume(take);
            assert!(queue.memory_len() <= 16_384 + 1);
        }
        assert_eq!(out[0], b'H');
        assert_eq!(&out[1..], &body[..]);
    }
}
