//! Line framing for line-based services: owns splitting a byte stream into
//! `\n`-terminated lines with a length limit.
//!
//! [`LineFramer`] is fed whatever bytes a read returned and hands back every
//! complete line. Lines that arrive whole are passed as sub-slices of the
//! input (zero-copy); only an incomplete tail is buffered until the rest
//! arrives.

/// Size above which an emptied buffer gives its allocation back, so idle
/// sessions stay small.
const KEEP_CAPACITY: usize = 4096;

/// A line exceeded the framer's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {limit} bytes")]
pub struct LineTooLong {
    /// The configured maximum line length.
    pub limit: usize,
}

/// Sans-IO splitter of a byte stream into `\n`-terminated lines.
///
/// The limit counts the bytes of a line before its `\n` (a `\r` before the
/// `\n` counts): a line of exactly `max_line_bytes` bytes plus `\n` is
/// accepted, one byte more is rejected, as soon as that many bytes have
/// arrived without a `\n`.
#[derive(Debug, Clone)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
}

impl LineFramer {
    /// Creates a framer accepting lines of up to `max_line_bytes` bytes
    /// (not counting the terminating `\n`).
    pub fn new(max_line_bytes: usize) -> Self {
        LineFramer {
            buf: Vec::new(),
            max: max_line_bytes,
        }
    }

    /// The configured maximum line length.
    pub fn max_line_bytes(&self) -> usize {
        self.max
    }

    /// Bytes of an incomplete line currently buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feeds `data`, calling `on_line` with each complete line including its
    /// trailing `\n` (a preceding `\r` is kept as is).
    ///
    /// When nothing is buffered, lines wholly inside `data` are passed as
    /// sub-slices of `data`; only an incomplete tail is copied into the
    /// internal buffer.
    ///
    /// # Errors
    ///
    /// [`LineTooLong`] when a line exceeds the limit (counting buffered
    /// bytes plus new ones, without waiting for its `\n`). Lines completed
    /// before it in the same call are still delivered; the framer is then
    /// reset: its buffer and the rest of `data` are discarded, and the next
    /// call starts a fresh line.
    pub fn push(&mut self, data: &[u8], mut on_line: impl FnMut(&[u8])) -> Result<(), LineTooLong> {
        let mut rest = data;
        if !self.buf.is_empty() {
            match split_line(rest) {
                Some((line, tail)) => {
                    if self.buf.len().saturating_add(content_len(line)) > self.max {
                        return Err(self.fail());
                    }
                    self.buf.extend_from_slice(line);
                    on_line(&self.buf);
                    self.clear_buffer();
                    rest = tail;
                }
                None => {
                    if self.buf.len().saturating_add(rest.len()) > self.max {
                        return Err(self.fail());
                    }
                    self.buf.extend_from_slice(rest);
                    return Ok(());
                }
            }
        }
        while let Some((line, tail)) = split_line(rest) {
            if content_len(line) > self.max {
                return Err(self.fail());
            }
            on_line(line);
            rest = tail;
        }
        if rest.len() > self.max {
            return Err(self.fail());
        }
        self.buf.extend_from_slice(rest);
        Ok(())
    }

    /// Resets after an overlong line.
    fn fail(&mut self) -> LineTooLong {
        self.clear_buffer();
        LineTooLong { limit: self.max }
    }

    fn clear_buffer(&mut self) {
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

/// `data` cut after its first `\n`: the line (with its `\n`) and the rest.
fn split_line(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = data.iter().position(|&b| b == b'\n')?;
    data.split_at_checked(end.checked_add(1)?)
}

/// The length of a line from [`split_line`] without its `\n` (what the limit counts).
fn content_len(line: &[u8]) -> usize {
    line.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds each chunk, collecting lines until the first error.
    fn feed(framer: &mut LineFramer, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<LineTooLong>) {
        let mut lines = Vec::new();
        for chunk in chunks {
            if let Err(e) = framer.push(chunk, |l| lines.push(l.to_vec())) {
                return (lines, Some(e));
            }
        }
        (lines, None)
    }

    #[test]
    fn splits_lines_and_keeps_terminators() {
        let mut f = LineFramer::new(100);
        let (lines, err) = feed(&mut f, &[b"one\r\ntwo\n\nthree"]);
        assert_eq!(err, None);
        assert_eq!(
            lines,
            vec![b"one\r\n".to_vec(), b"two\n".to_vec(), b"\n".to_vec()]
        );
        assert_eq!(f.pending(), 5);
        let (lines, _) = feed(&mut f, &[b"\r", b"\n"]);
        assert_eq!(lines, vec![b"three\r\n".to_vec()]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn crlf_split_between_cr_and_lf() {
        let mut f = LineFramer::new(10);
        let (lines, err) = feed(&mut f, &[b"ab\r", b"\ncd\r", b"\n"]);
        assert_eq!(err, None);
        assert_eq!(lines, vec![b"ab\r\n".to_vec(), b"cd\r\n".to_vec()]);
    }

    #[test]
    fn empty_input_and_empty_lines() {
        let mut f = LineFramer::new(0);
        let (lines, err) = feed(&mut f, &[b"", b"\n\n", b"", b"\n"]);
        assert_eq!(err, None);
        assert_eq!(lines, vec![b"\n".to_vec(); 3]);
        assert_eq!(feed(&mut f, &[b"x"]).1, Some(LineTooLong { limit: 0 }));
    }

    #[test]
    fn whole_lines_are_zero_copy_subslices() {
        let mut f = LineFramer::new(100);
        let data = b"alpha\nbeta\ngam";
        let range = data.as_ptr_range();
        let mut seen = 0;
        f.push(data, |line| {
            assert!(range.contains(&line.as_ptr()), "line was copied");
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, 2);
        assert_eq!(f.pending(), 3);
    }

    #[test]
    fn limit_exactly_at_the_boundary() {
        // Whole in one push.
        let mut f = LineFramer::new(4);
        let (lines, err) = feed(&mut f, &[b"abcd\n"]);
        assert_eq!((lines, err), (vec![b"abcd\n".to_vec()], None));
        assert_eq!(
            feed(&mut f, &[b"abcde\n"]).1,
            Some(LineTooLong { limit: 4 })
        );

        // The '\r' counts toward the limit.
        assert_eq!(
            feed(&mut f, &[b"abcd\r\n"]).1,
            Some(LineTooLong { limit: 4 })
        );
        assert_eq!(feed(&mut f, &[b"abc\r\n"]).0, vec![b"abc\r\n".to_vec()]);

        // Across pushes: exactly the limit buffered is fine, one more is not.
        let mut f = LineFramer::new(4);
        assert_eq!(feed(&mut f, &[b"ab", b"cd"]).1, None);
        assert_eq!(f.pending(), 4);
        assert_eq!(feed(&mut f, &[b"\n"]).0, vec![b"abcd\n".to_vec()]);
        assert_eq!(
            feed(&mut f, &[b"ab", b"cd", b"e"]).1,
            Some(LineTooLong { limit: 4 })
        );
        assert_eq!(
            feed(&mut f, &[b"ab", b"cde\n"]).1,
            Some(LineTooLong { limit: 4 })
        );
    }

    #[test]
    fn overlong_is_detected_before_newline_and_framer_recovers() {
        let mut f = LineFramer::new(8);
        let mut lines = Vec::new();
        let err = f.push(b"ok\nthis is far too long", |l| lines.push(l.to_vec()));
        assert_eq!(err, Err(LineTooLong { limit: 8 }));
        assert_eq!(err.unwrap_err().to_string(), "line longer than 8 bytes");
        // Lines before the overlong one were delivered.
        assert_eq!(lines, vec![b"ok\n".to_vec()]);
        assert_eq!(f.pending(), 0);
        // After the error the framer starts fresh.
        let (lines, err) = feed(&mut f, &[b"next\n"]);
        assert_eq!((lines, err), (vec![b"next\n".to_vec()], None));

        // Overlong reached while appending to a buffered tail.
        let (_, err) = feed(&mut f, &[b"12345", b"6789"]);
        assert_eq!(err, Some(LineTooLong { limit: 8 }));
        assert_eq!(f.pending(), 0);
        assert_eq!(feed(&mut f, &[b"x\n"]).0, vec![b"x\n".to_vec()]);
    }

    #[test]
    fn large_buffer_is_released_when_emptied() {
        let mut f = LineFramer::new(1 << 20);
        let big = vec![b'a'; 64 * 1024];
        f.push(&big, |_| panic!("no line yet")).unwrap();
        assert!(f.buf.capacity() >= big.len());
        let mut got = 0;
        f.push(b"\n", |l| got = l.len()).unwrap();
        assert_eq!(got, big.len() + 1);
        assert_eq!(f.buf.capacity(), 0, "idle framer kept a big buffer");

        // Small buffers are kept for reuse.
        f.push(b"abc", |_| {}).unwrap();
        let cap = f.buf.capacity();
        f.push(b"\n", |_| {}).unwrap();
        assert_eq!(f.buf.capacity(), cap);

        // Reset after an error releases too.
        let mut f = LineFramer::new(10_000);
        f.push(&[b'z'; 9_000], |_| {}).unwrap();
        assert!(f.push(&[b'z'; 2_000], |_| {}).is_err());
        assert_eq!(f.buf.capacity(), 0);
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![4 => Just(b'a'), 1 => Just(b'\r'), 2 => Just(b'\n')],
            0..200,
        )
    }

    fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts {
            chunks.push(&data[start..cut]);
            start = cut;
        }
        chunks.push(&data[start..]);
        chunks
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_lines(
            data in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let (whole, err) = feed(&mut LineFramer::new(1000), &[&data]);
            prop_assert_eq!(err, None);
            let mut f = LineFramer::new(1000);
            let (parts, err) = feed(&mut f, &split(&data, &cuts));
            prop_assert_eq!(err, None);
            prop_assert_eq!(&parts, &whole);
            // Model: every '\n'-terminated piece, and the tail stays pending.
            let expect: Vec<Vec<u8>> = data
                .split_inclusive(|&b| b == b'\n')
                .filter(|l| l.ends_with(b"\n"))
                .map(<[u8]>::to_vec)
                .collect();
            prop_assert_eq!(&whole, &expect);
            let tail = data.len() - data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            prop_assert_eq!(f.pending(), tail);
        }

        #[test]
        fn with_a_limit_any_split_agrees_up_to_the_first_error(
            data in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            limit in 0usize..12,
        ) {
            let (whole, whole_err) = feed(&mut LineFramer::new(limit), &[&data]);
            let (parts, parts_err) = feed(&mut LineFramer::new(limit), &split(&data, &cuts));
            prop_assert_eq!(&parts, &whole);
            prop_assert_eq!(parts_err, whole_err);
            for line in &whole {
                prop_assert!(line.len() <= limit + 1, "delivered overlong line {:?}", line);
            }
        }
    }
}
