//! RESP2 (the Redis protocol) on the plexus framing API: a [`Framer`] that turns the client's
//! bytes into commands, and the reply encoders.
//!
//! A command is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or an inline line
//! (`GET k\r\n`, words split on spaces and tabs; no quoting). Parsing is bounded by [`Limits`]:
//! a bulk string, an array's element count, an inline line and a whole command each have a
//! maximum, checked as soon as a header announces it (before any of it is buffered).
//! Completed arguments leave the buffer as they arrive, so feeding one byte at a time costs no
//! rescanning.

use bytes::{BufMut, Bytes, BytesMut};
use plexus::framing::{FrameError, Framer};

/// Bounds on what one command may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest bulk string (redis' `proto-max-bulk-len` is 512 MiB; we take 64 MiB).
    pub(crate) max_bulk: usize,
    /// Most elements in a command array (each costs a handle in memory even when empty).
    pub(crate) max_args: usize,
    /// Longest inline command or `*`/`$` header line (redis' `PROTO_INLINE_MAX_SIZE`).
    pub(crate) max_inline: usize,
    /// Most bulk bytes in one command, all arguments together.
    pub(crate) max_command: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 64 << 20,
            max_args: 1 << 16,
            max_inline: 64 << 10,
            max_command: 64 << 20,
        }
    }
}

/// The command decoder. A frame is the command's arguments, its name first.
#[derive(Debug)]
pub(crate) struct Resp {
    limits: Limits,
    /// An array command in progress: elements still to come, and those complete.
    array: Option<Array>,
    /// Bytes at the front of the buffer known to hold no `\n` (the header or inline line
    /// being searched).
    searched: usize,
}

#[derive(Debug)]
struct Array {
    remaining: usize,
    args: Vec<Bytes>,
    /// The announced length of the bulk string being received.
    bulk: Option<usize>,
    /// Bulk bytes announced so far in this command.
    total: usize,
}

impl Resp {
    /// A decoder with these limits.
    pub(crate) fn new(limits: Limits) -> Self {
        Resp {
            limits,
            array: None,
            searched: 0,
        }
    }

    /// The line at the front of `buf` without its `\r\n`, once complete (consumed).
    fn line(&mut self, buf: &mut BytesMut, too_long: usize) -> Result<Option<Bytes>, FrameError> {
        let start = self.searched.min(buf.len());
        let Some(found) = buf[start..].iter().position(|&b| b == b'\n') else {
            self.searched = buf.len();
            if buf.len() > too_long {
                return Err(FrameError::TooLong {
                    limit: too_long,
                    seen: buf.len() as u64,
                });
            }
            return Ok(None);
        };
        self.searched = 0;
        let end = start + found;
        if end > too_long {
            return Err(FrameError::TooLong {
                limit: too_long,
                seen: end as u64,
            });
        }
        let mut line = buf.split_to(end + 1);
        line.truncate(end);
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        Ok(Some(line.freeze()))
    }

    /// Continues the array command in progress; `Some` once all its elements are here.
    fn array(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, FrameError> {
        loop {
            let array = self.array.as_mut().expect("an array in progress");
            if array.remaining == 0 {
                return Ok(self.array.take().map(|array| array.args));
            }
            match array.bulk {
                None => {
                    let Some(&first) = buf.first() else {
                        return Ok(None);
                    };
                    if first != b'$' {
                        return Err(FrameError::Unexpected {
                            expected: "'$'",
                            found: first,
                        });
                    }
                    let Some(line) = self.line(buf, self.limits.max_inline)? else {
                        return Ok(None);
                    };
                    let len = parse_len(&line[1..]).ok_or(FrameError::Invalid {
                        what: "bulk length",
                    })?;
                    let array = self.array.as_mut().expect("an array in progress");
                    if len > self.limits.max_bulk {
                        return Err(FrameError::TooLong {
                            limit: self.limits.max_bulk,
                            seen: len as u64,
                        });
                    }
                    array.total += len;
                    if array.total > self.limits.max_command {
                        return Err(FrameError::TooLong {
                            limit: self.limits.max_command,
                            seen: array.total as u64,
                        });
                    }
                    array.bulk = Some(len);
                }
                Some(len) => {
                    if buf.len() < len + 2 {
                        return Ok(None);
                    }
                    if &buf[len..len + 2] != b"\r\n" {
                        let found = if buf[len] == b'\r' {
                            buf[len + 1]
                        } else {
                            buf[len]
                        };
                        return Err(FrameError::Unexpected {
                            expected: "CRLF after a bulk string",
                            found,
                        });
                    }
                    let arg = buf.split_to(len).freeze();
                    let _ = buf.split_to(2);
                    array.args.push(arg);
                    array.remaining -= 1;
                    array.bulk = None;
                }
            }
        }
    }
}

impl Framer for Resp {
    type Frame = Vec<Bytes>;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, FrameError> {
        loop {
            if self.array.is_some() {
                return self.array(buf);
            }
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            let Some(line) = self.line(buf, self.limits.max_inline)? else {
                return Ok(None);
            };
            if first == b'*' {
                let count = parse_signed(&line[1..]).ok_or(FrameError::Invalid {
                    what: "multibulk length",
                })?;
                if count > self.limits.max_args as i64 {
                    return Err(FrameError::Invalid {
                        what: "multibulk length",
                    });
                }
                if count <= 0 {
                    continue; // `*0` and `*-1` are empty commands, skipped as redis does.
                }
                let count = count as usize;
                self.array = Some(Array {
                    remaining: count,
                    // Not the announced count: a header alone must not cost its elements.
                    args: Vec::with_capacity(count.min(16)),
                    bulk: None,
                    total: 0,
                });
                continue;
            }
            let args: Vec<Bytes> = line
                .split(|&b| b == b' ' || b == b'\t')
                .filter(|word| !word.is_empty())
                .map(|word| line.slice_ref(word))
                .collect();
            if !args.is_empty() {
                return Ok(Some(args));
            }
        }
    }

    fn max_buffered(&self) -> usize {
        // A header line, then one bulk string and its CRLF.
        self.limits.max_inline + self.limits.max_bulk + 2
    }
}

/// A non-negative length, as redis reads it (digits only, no sign, no spaces).
fn parse_len(digits: &[u8]) -> Option<usize> {
    let value = parse_signed(digits)?;
    usize::try_from(value).ok()
}

/// An integer as redis' `string2ll` reads it: an optional `-`, no leading zeros, no spaces,
/// no `+`, within `i64`.
pub(crate) fn parse_signed(text: &[u8]) -> Option<i64> {
    match text {
        [] => None,
        [b'0'] => Some(0),
        [b'-', rest @ ..] => {
            let magnitude = parse_digits(rest)?;
            0i64.checked_sub_unsigned(magnitude)
        }
        digits => i64::try_from(parse_digits(digits)?).ok(),
    }
}

/// Decimal digits with a non-zero first digit, within `u64`.
fn parse_digits(digits: &[u8]) -> Option<u64> {
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    digits.iter().try_fold(0u64, |value, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// `+text\r\n`.
pub(crate) fn simple(out: &mut BytesMut, text: &str) {
    out.reserve(text.len() + 3);
    out.put_u8(b'+');
    out.put_slice(text.as_bytes());
    out.put_slice(b"\r\n");
}

/// `-text\r\n`; `text` starts with the error code (`ERR …`, `WRONGTYPE …`). Line ends inside
/// it become spaces, so a reply stays one line whatever the client sent.
pub(crate) fn error(out: &mut BytesMut, text: &str) {
    out.reserve(text.len() + 3);
    out.put_u8(b'-');
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

/// `:n\r\n`.
pub(crate) fn integer(out: &mut BytesMut, n: i64) {
    header(out, b':', n);
}

/// `$len\r\nbytes\r\n`.
pub(crate) fn bulk(out: &mut BytesMut, bytes: &[u8]) {
    header(out, b'$', bytes.len() as i64);
    out.reserve(bytes.len() + 2);
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

/// `$-1\r\n`: no value.
pub(crate) fn null(out: &mut BytesMut) {
    out.put_slice(b"$-1\r\n");
}

/// `*-1\r\n`: no array.
pub(crate) fn array_null(out: &mut BytesMut) {
    out.put_slice(b"*-1\r\n");
}

/// `*n\r\n`, followed by `n` replies.
pub(crate) fn array(out: &mut BytesMut, n: usize) {
    header(out, b'*', n as i64);
}

fn header(out: &mut BytesMut, kind: u8, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.reserve(24);
    out.put_u8(kind);
    if n < 0 {
        out.put_u8(b'-');
    }
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` `step` bytes at a time; the commands decoded until the first error.
    fn decode(limits: Limits, input: &[u8], step: usize) -> (Vec<Vec<Bytes>>, Option<FrameError>) {
        let mut resp = Resp::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match resp.decode(&mut buf) {
                    Ok(Some(command)) => out.push(command),
                    Ok(None) => break,
                    Err(error) => return (out, Some(error)),
                }
            }
            assert!(buf.len() <= resp.max_buffered());
        }
        (out, None)
    }

    fn words(commands: &[Vec<Bytes>]) -> Vec<Vec<&[u8]>> {
        commands
            .iter()
            .map(|c| c.iter().map(|a| &a[..]).collect())
            .collect()
    }

    #[test]
    fn arrays_and_inline_commands_split_any_way() {
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*0\r\n  SET  a\tb \n*1\r\n$0\r\n\r\n";
        for step in [1, 2, 5, input.len()] {
            let (out, error) = decode(Limits::default(), input, step);
            assert_eq!(error, None);
            let want: Vec<Vec<&[u8]>> = vec![
                vec![b"GET", b"k"],
                vec![b"PING"],
                vec![b"SET", b"a", b"b"],
                vec![b""],
            ];
            assert_eq!(words(&out), want, "step {step}");
        }
    }

    #[test]
    fn bulk_strings_may_hold_any_byte() {
        let (out, error) = decode(Limits::default(), b"*1\r\n$4\r\n\r\n\0*\r\n", 1);
        assert_eq!(error, None);
        assert_eq!(words(&out), vec![vec![&b"\r\n\0*"[..]]]);
    }

    #[test]
    fn malformed_commands_are_errors() {
        let cases: &[(&[u8], FrameError)] = &[
            (
                b"*1\r\n+OK\r\n",
                FrameError::Unexpected {
                    expected: "'$'",
                    found: b'+',
                },
            ),
            (
                b"*x\r\n",
                FrameError::Invalid {
                    what: "multibulk length",
                },
            ),
            (
                b"*1\r\n$-3\r\n",
                FrameError::Invalid {
                    what: "bulk length",
                },
            ),
            (
                b"*1\r\n$01\r\n",
                FrameError::Invalid {
                    what: "bulk length",
                },
            ),
            (
                b"*1\r\n$1\r\nabc",
                FrameError::Unexpected {
                    expected: "CRLF after a bulk string",
                    found: b'b',
                },
            ),
        ];
        for (input, want) in cases {
            for step in [1, input.len()] {
                let (_, error) = decode(Limits::default(), input, step);
                assert_eq!(
                    error.as_ref(),
                    Some(want),
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn limits_are_checked_at_the_header() {
        let limits = Limits {
            max_bulk: 10,
            max_args: 3,
            max_inline: 16,
            max_command: 15,
        };
        let (_, error) = decode(limits, b"*1\r\n$999999999999\r\n", 1);
        assert_eq!(
            error,
            Some(FrameError::TooLong {
                limit: 10,
                seen: 999_999_999_999
            })
        );
        let (_, error) = decode(limits, b"*4\r\n", 1);
        assert_eq!(
            error,
            Some(FrameError::Invalid {
                what: "multibulk length"
            })
        );
        let (_, error) = decode(limits, b"*2\r\n$10\r\n0123456789\r\n$6\r\n", 3);
        assert_eq!(
            error,
            Some(FrameError::TooLong {
                limit: 15,
                seen: 16
            })
        );
        let (_, error) = decode(limits, b"PING PING PING PING", 1);
        assert!(matches!(error, Some(FrameError::TooLong { limit: 16, .. })));
    }

    #[test]
    fn integers_as_redis_reads_them() {
        for (text, want) in [
            (&b"0"[..], Some(0)),
            (b"-1", Some(-1)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775808", None),
            (b"01", None),
            (b"-0", None),
            (b"+1", None),
            (b" 1", None),
            (b"1a", None),
            (b"", None),
        ] {
            assert_eq!(
                parse_signed(text),
                want,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn replies() {
        let mut out = BytesMut::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR a\r\nb");
        integer(&mut out, -42);
        integer(&mut out, i64::MIN);
        bulk(&mut out, b"hi");
        null(&mut out);
        array(&mut out, 2);
        assert_eq!(
            &out[..],
            &b"+OK\r\n-ERR a  b\r\n:-42\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*2\r\n"[..]
        );
    }
}
