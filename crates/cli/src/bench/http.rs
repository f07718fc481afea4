//! The http mode's [`Exchange`]: keep-alive `GET` requests and a streaming HTTP/1.1 response
//! parser (status line and headers, then a body framed by Content-Length or chunked
//! transfer coding). A response must be 2xx, and every body as long as the first one (the
//! same file each time); anything else is an error.

use super::stream::Exchange;
use super::Fail;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug)]
enum State {
    Head,
    Body { remaining: u64 },
    ChunkSize,
    ChunkData { remaining: u64 },
    ChunkEnd { seen: u8 },
    Trailers,
}

/// Keep-alive GETs of one path.
pub(crate) struct HttpExchange {
    request: Vec<u8>,
    state: State,
    /// The response head (or the current chunk-size / trailer line) being collected.
    line: Vec<u8>,
    body: u64,
    first_body: Option<u64>,
}

impl HttpExchange {
    pub(crate) fn new(path: &str, authority: &str) -> HttpExchange {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: plexus-bench\r\n\r\n");
        HttpExchange {
            request: request.into_bytes(),
            state: State::Head,
            line: Vec::new(),
            body: 0,
            first_body: None,
        }
    }

    /// Parses a complete head; the next state, or the response is complete (`None`).
    fn head(&mut self) -> Result<Option<State>, Fail> {
        let text = std::str::from_utf8(&self.line)
            .map_err(|_| Fail::Http("response head is not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let code: u16 = parts
            .next()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Fail::Http(format!("bad status line {status_line:?}")))?;
        if !version.starts_with("HTTP/1.") {
            return Err(Fail::Http(format!("bad status line {status_line:?}")));
        }
        if !(200..300).contains(&code) {
            return Err(Fail::Http(format!("status {code} ({status_line:?})")));
        }
        let (mut length, mut chunked) = (None, false);
        for header in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = header.split_once(':') else {
                return Err(Fail::Http(format!("bad header line {header:?}")));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| Fail::Http(format!("bad Content-Length {value:?}")))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            }
        }
        Ok(match (chunked, length) {
            (true, _) => Some(State::ChunkSize),
            (false, Some(0)) => None,
            (false, Some(n)) => Some(State::Body { remaining: n }),
            (false, None) if code == 204 => None,
            (false, None) => {
                return Err(Fail::Http(
                    "response without Content-Length or chunked framing (cannot keep alive)".into(),
                ))
            }
        })
    }

    /// A response ended: checks its body length against the first one.
    fn complete(&mut self) -> Result<(), Fail> {
        let body = std::mem::take(&mut self.body);
        match self.first_body {
            None => self.first_body = Some(body),
            Some(first) if first != body => {
                return Err(Fail::Mismatch(format!(
                    "response body of {body} bytes, the first one had {first}"
                )))
            }
            Some(_) => {}
        }
        self.state = State::Head;
        self.line.clear();
        Ok(())
    }
}

impl Exchange for HttpExchange {
    fn request(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.request);
    }

    fn receive(&mut self, mut data: &[u8]) -> Result<u64, Fail> {
        let mut completed = 0;
        while !data.is_empty() {
            match &mut self.state {
                State::Head => {
                    let (&byte, rest) = data.split_first().unwrap_or((&0, &[]));
                    data = rest;
                    self.line.push(byte);
                    if self.line.ends_with(b"\r\n\r\n") {
                        self.line.truncate(self.line.len() - 4);
                        match self.head()? {
                            Some(next) => {
                                self.state = next;
                                self.line.clear();
                            }
                            None => {
                                self.complete()?;
                                completed += 1;
                            }
                        }
                    } else if self.line.len() > MAX_HEAD {
                        return Err(Fail::Http("response head over 64 KiB".into()));
                    }
                }
                State::Body { remaining } | State::ChunkData { remaining } => {
                    let take = (*remaining).min(data.len() as u64);
                    *remaining -= take;
                    self.body += take;
                    data = &data[take as usize..];
                    if *remaining == 0 {
                        if matches!(self.state, State::Body { .. }) {
                            self.complete()?;
                            completed += 1;
                        } else {
                            self.state = State::ChunkEnd { seen: 0 };
                        }
                    }
                }
                State::ChunkEnd { seen } => {
                    let want = if *seen == 0 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        return Err(Fail::Http("chunk data not followed by CRLF".into()));
                    }
                    data = &data[1..];
                    *seen += 1;
                    if *seen == 2 {
                        self.state = State::ChunkSize;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let (&byte, rest) = data.split_first().unwrap_or((&0, &[]));
                    data = rest;
                    self.line.push(byte);
                    if self.line.len() > MAX_LINE {
                        return Err(Fail::Http("chunk-size or trailer line over 4 KiB".into()));
                    }
                    if !self.line.ends_with(b"\r\n") {
                        continue;
                    }
                    let line = &self.line[..self.line.len() - 2];
                    if matches!(self.state, State::Trailers) {
                        if line.is_empty() {
                            self.complete()?;
                            completed += 1;
                        } else {
                            self.line.clear();
                        }
                        continue;
                    }
                    let text = std::str::from_utf8(line).unwrap_or("");
                    let hex = text.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| Fail::Http(format!("bad chunk size {text:?}")))?;
                    self.line.clear();
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData { remaining: size }
                    };
                }
            }
        }
        Ok(completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_bytewise(ex: &mut HttpExchange, data: &[u8]) -> Result<u64, Fail> {
        let mut n = 0;
        for b in data {
            n += ex.receive(std::slice::from_ref(b))?;
        }
        Ok(n)
    }

    #[test]
    fn content_length_and_chunked_responses_complete_in_any_split() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nT: v\r\n\r\n";
        let mut all = Vec::new();
        all.extend_from_slice(cl);
        all.extend_from_slice(chunked);
        all.extend_from_slice(cl);
        let mut whole = HttpExchange::new("/", "h");
        assert_eq!(whole.receive(&all).unwrap(), 3);
        let mut bytewise = HttpExchange::new("/", "h");
        assert_eq!(feed_bytewise(&mut bytewise, &all).unwrap(), 3);
    }

    #[test]
    fn non_2xx_unframed_and_changing_bodies_are_errors() {
        let mut ex = HttpExchange::new("/", "h");
        let err = ex
            .receive(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .unwrap_err();
        assert_eq!(err.kind(), "http");
        let mut ex = HttpExchange::new("/", "h");
        assert_eq!(
            ex.receive(b"HTTP/1.1 200 OK\r\n\r\n").unwrap_err().kind(),
            "http"
        );
        let mut ex = HttpExchange::new("/", "h");
        ex.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
            .unwrap();
        let err = ex
            .receive(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            .unwrap_err();
        assert_eq!(err.kind(), "mismatch");
    }
}
