//! The PROXY-header preamble stage (`proxy_protocol = true` listeners): the first bytes of the
//! connection are a PROXY v1/v2 header naming the real client; nothing reaches the layers above
//! until it is complete.
//!
//! Bytes go in with [`ProxyPreamble::receive`] (never more than [`ProxyPreamble::room`] at a
//! time, so the bytes after a header stay in the socket as far as possible); out comes
//! [`ProxyDone`] — the header and the bytes after it — or a [`ProxyFailure`]. The stage is
//! bounded in bytes (`MAX_PROXY_HEADER`) and in time (a deadline checked against `now`).

use std::net::SocketAddr;
use std::time::Instant;

use plexus_proto::proxy::{parse_proxy_header, ProxyError, ProxyHeader, MAX_PROXY_HEADER};

/// Why a connection's PROXY header was not accepted. Each closes the session
/// (`CloseReason::ProxyHeader`, counted as a `proxy_header` refusal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ProxyFailure {
    /// The peer closed before the header was complete.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// `MAX_PROXY_HEADER` bytes arrived and no header ended within them.
    #[error("PROXY header too long")]
    TooLong,
    /// The bytes are not a PROXY header.
    #[error("malformed PROXY header: {0}")]
    Malformed(ProxyError),
    /// The deadline (`handshake_timeout` after the connection) passed first.
    #[error("no complete PROXY header within handshake_timeout")]
    Late,
}

/// A complete header and what followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyDone {
    /// What the header says.
    pub(crate) header: ProxyHeader,
    /// Bytes after the header (already read from the socket): the first bytes of the layer
    /// above.
    pub(crate) leftover: Vec<u8>,
}

impl ProxyDone {
    /// The session's real client: the source the header names, or (LOCAL, UNKNOWN: a health
    /// check) the connection's own peer.
    pub(crate) fn client(&self, connection_peer: SocketAddr) -> SocketAddr {
        match self.header {
            ProxyHeader::Proxied { source, .. } => source,
            ProxyHeader::Local | ProxyHeader::Unknown => connection_peer,
        }
    }
}

/// A connection waiting for its PROXY header.
#[derive(Debug)]
pub(crate) struct ProxyPreamble {
    /// Bytes read so far (at most `MAX_PROXY_HEADER`).
    received: Vec<u8>,
    deadline: Instant,
}

impl ProxyPreamble {
    /// Waits for a header until `deadline`.
    pub(crate) fn new(deadline: Instant) -> Self {
        ProxyPreamble {
            received: Vec::new(),
            deadline,
        }
    }

    /// How many bytes the stage takes next: no further than the longest header could need.
    pub(crate) fn room(&self) -> usize {
        MAX_PROXY_HEADER.saturating_sub(self.received.len()).max(1)
    }

    /// Takes bytes read from the connection (at most [`ProxyPreamble::room`]). `Ok(None)`: the
    /// header is not complete yet.
    pub(crate) fn receive(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Option<ProxyDone>, ProxyFailure> {
        self.check_deadline(now)?;
        self.received.extend_from_slice(bytes);
        match parse_proxy_header(&self.received) {
            Ok(Some((header, consumed))) => {
                let mut leftover = std::mem::take(&mut self.received);
                leftover.drain(..consumed);
                Ok(Some(ProxyDone { header, leftover }))
            }
            Ok(None) if self.received.len() >= MAX_PROXY_HEADER => Err(ProxyFailure::TooLong),
            Ok(None) => Ok(None),
            Err(err) => Err(ProxyFailure::Malformed(err)),
        }
    }

    /// The peer closed its side: the header can never complete.
    pub(crate) fn peer_closed(&self) -> ProxyFailure {
        ProxyFailure::Closed
    }

    /// `Err(Late)` once `now` has reached the deadline.
    pub(crate) fn check_deadline(&self, now: Instant) -> Result<(), ProxyFailure> {
        match now >= self.deadline {
            true => Err(ProxyFailure::Late),
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    fn preamble(now: Instant) -> ProxyPreamble {
        ProxyPreamble::new(now + Duration::from_secs(5))
    }

    fn peer() -> SocketAddr {
        "10.0.0.1:9999".parse().unwrap()
    }

    #[test]
    fn a_v1_header_names_the_client_and_keeps_what_follows() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let done = stage
            .receive(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET /", now)
            .unwrap()
            .expect("complete");
        assert_eq!(done.client(peer()), "192.0.2.7:56324".parse().unwrap());
        assert_eq!(done.leftover, b"GET /");
    }

    #[test]
    fn a_header_fed_one_byte_at_a_time_completes_on_its_last_byte() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let header = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n";
        for (index, byte) in header.iter().enumerate() {
            assert!(stage.room() >= 1);
            let outcome = stage.receive(&[*byte], now).unwrap();
            assert_eq!(outcome.is_some(), index == header.len() - 1);
            if let Some(done) = outcome {
                assert_eq!(done.client(peer()), "[2001:db8::1]:4000".parse().unwrap());
                assert!(done.leftover.is_empty());
            }
        }
    }

    #[test]
    fn a_v2_local_header_keeps_the_connection_peer() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]); // v2 LOCAL, no addresses
        bytes.extend_from_slice(b"ping");
        let done = stage.receive(&bytes, now).unwrap().expect("complete");
        assert_eq!(done.header, ProxyHeader::Local);
        assert_eq!(done.client(peer()), peer());
        assert_eq!(done.leftover, b"ping");
    }

    #[test]
    fn v2_with_ipv4_addresses() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 12]); // PROXY, TCP over IPv4, 12 bytes
        bytes.extend_from_slice(&[203, 0, 113, 9, 192, 0, 2, 1]);
        bytes.extend_from_slice(&1234u16.to_be_bytes());
        bytes.extend_from_slice(&443u16.to_be_bytes());
        let done = stage.receive(&bytes, now).unwrap().expect("complete");
        assert_eq!(done.client(peer()), "203.0.113.9:1234".parse().unwrap());
    }

    #[test]
    fn bytes_that_are_not_a_header_are_refused_at_once() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let failure = stage.receive(b"GET / HTTP/1.1\r\n", now).unwrap_err();
        assert!(matches!(failure, ProxyFailure::Malformed(_)), "{failure:?}");
        assert!(failure.to_string().starts_with("malformed PROXY header: "));
    }

    #[test]
    fn a_header_that_never_ends_is_bounded() {
        let now = Instant::now();
        let mut stage = preamble(now);
        let mut bytes = V2_SIGNATURE.to_vec();
        // A v2 header announcing more address bytes than the stage will ever buffer.
        bytes.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let mut outcome = stage.receive(&bytes, now);
        let mut fed = bytes.len();
        while let Ok(None) = outcome {
            let chunk = vec![0u8; stage.room()];
            fed += chunk.len();
            outcome = stage.receive(&chunk, now);
            assert!(
                fed <= MAX_PROXY_HEADER + 1,
                "the stage buffered past its bound"
            );
        }
        let failure = outcome.unwrap_err();
        assert!(
            matches!(failure, ProxyFailure::TooLong | ProxyFailure::Malformed(_)),
            "{failure:?}"
        );
    }

    #[test]
    fn the_deadline_is_checked_against_now() {
        let start = Instant::now();
        let mut stage = ProxyPreamble::new(start + Duration::from_millis(100));
        assert_eq!(stage.receive(b"PROXY TCP4 ", start), Ok(None));
        assert_eq!(
            stage.check_deadline(start + Duration::from_millis(99)),
            Ok(())
        );
        let late = start + Duration::from_millis(100);
        assert_eq!(stage.check_deadline(late), Err(ProxyFailure::Late));
        // Even the rest of a valid header is refused once late.
        assert_eq!(
            stage.receive(b"192.0.2.7 198.51.100.1 1 2\r\n", late),
            Err(ProxyFailure::Late)
        );
        assert_eq!(
            ProxyFailure::Late.to_string(),
            "no complete PROXY header within handshake_timeout"
        );
    }

    #[test]
    fn a_close_before_the_header_is_a_failure() {
        let now = Instant::now();
        let mut stage = preamble(now);
        assert_eq!(stage.receive(b"PROXY", now), Ok(None));
        assert_eq!(stage.peer_closed(), ProxyFailure::Closed);
    }
}
