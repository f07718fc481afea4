//! The TLS transport stage: one rustls connection — a server's, or a connector's client one —
//! and what a session needs from it.
//!
//! Ciphertext from the socket goes in with [`TlsTransport::receive_ciphertext`]; what it
//! produced comes out of [`TlsTransport::poll_event`]: the end of the handshake (once), the
//! decrypted bytes, and the peer's close_notify, which behaves as a FIN — it comes only after
//! every byte the peer sent before it. The other way, [`TlsTransport::flush`] moves queued
//! plaintext through rustls into a writer one record at a time. The stage never reads the
//! socket itself (the shape of rustls' `tlsserver-mio` `OpenConnection`, minus the socket).

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::outbound::{Flushed, OutboundQueue};

/// Plaintext handed to rustls per step: one full TLS record.
pub(crate) const TLS_PLAINTEXT_CHUNK: usize = 16 * 1024;

/// Why the TLS stage cannot go on. The session ends; for [`TlsFailure::Protocol`] rustls has
/// queued an alert telling the peer why (write it with
/// [`TlsTransport::write_pending_ciphertext`] before closing).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TlsFailure {
    /// The peer's bytes broke the protocol: a bad handshake, a bad record, a failed check.
    #[error("tls error: {0}")]
    Protocol(rustls::Error),
    /// rustls took none of the ciphertext: its buffer is full of bytes it cannot process.
    #[error("tls input buffer full")]
    Stalled,
    /// Reading the ciphertext or the plaintext failed.
    #[error("tls i/o: {0}")]
    Io(io::ErrorKind),
}

/// What the stage has for the layer above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsEvent {
    /// The handshake completed: the session is established (reported once, before any data).
    HandshakeComplete,
    /// This many decrypted bytes are at the start of the buffer given to `poll_event`.
    Plaintext(usize),
    /// The peer's close_notify: its orderly end of data, after everything it sent before.
    PeerClosed,
}

/// A TLS session's protocol state.
pub(crate) struct TlsTransport {
    conn: Connection,
    established: bool,
    peer_closed: bool,
    close_notify_sent: bool,
}

impl TlsTransport {
    /// Starts a server session with `config` (the handshake waits for the ClientHello).
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(TlsTransport {
            conn: Connection::Server(ServerConnection::new(config)?),
            established: false,
            peer_closed: false,
            close_notify_sent: false,
        })
    }

    /// Starts a client session to `name` (SNI and the name verified) with `config`; its
    /// ClientHello is pending at once (`has_pending_ciphertext`).
    pub(crate) fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        Ok(TlsTransport {
            conn: Connection::Client(ClientConnection::new(config, name)?),
            established: false,
            peer_closed: false,
            close_notify_sent: false,
        })
    }

    /// Takes ciphertext (as much as rustls accepts in one step, at least one byte) and
    /// processes the records it completes. Returns how many bytes were taken: the caller feeds
    /// the rest after draining [`TlsTransport::poll_event`].
    pub(crate) fn receive_ciphertext(&mut self, ciphertext: &[u8]) -> Result<usize, TlsFailure> {
        let mut rest = ciphertext;
        let taken = match self.conn.read_tls(&mut rest) {
            Ok(0) if !ciphertext.is_empty() => return Err(TlsFailure::Stalled),
            Ok(taken) => taken,
            Err(err) => return Err(TlsFailure::Io(err.kind())),
        };
        self.conn
            .process_new_packets()
            .map_err(TlsFailure::Protocol)?;
        Ok(taken)
    }

    /// The next thing the received ciphertext produced, decrypted bytes going into `plaintext`;
    /// `None` when it needs more ciphertext (or the peer has closed and all was reported).
    pub(crate) fn poll_event(
        &mut self,
        plaintext: &mut [u8],
    ) -> Result<Option<TlsEvent>, TlsFailure> {
        if !self.established {
            if self.conn.is_handshaking() {
                return Ok(None);
            }
            self.established = true;
            return Ok(Some(TlsEvent::HandshakeComplete));
        }
        if self.peer_closed {
            return Ok(None);
        }
        match self.conn.reader().read(plaintext) {
            Ok(0) => {
                self.peer_closed = true;
                Ok(Some(TlsEvent::PeerClosed))
            }
            Ok(n) => Ok(Some(TlsEvent::Plaintext(n))),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) => Err(TlsFailure::Io(err.kind())),
        }
    }

    /// Whether the handshake completed (and was reported by `poll_event`).
    pub(crate) fn is_established(&self) -> bool {
        self.established
    }

    /// The rustls session, for what it negotiated (version, ALPN).
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The name the client asked for (SNI), on a server session.
    pub(crate) fn server_name(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(conn) => conn.server_name(),
            Connection::Client(_) => None,
        }
    }

    /// Encrypts `data` into records (rustls may take less than all of it); `Ok(0)` before the
    /// handshake completes or after close_notify, since rustls would buffer that plaintext
    /// where no limit counts it.
    pub(crate) fn write_plaintext(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.established || self.close_notify_sent {
            return Ok(0);
        }
        self.conn.writer().write(data)
    }

    /// Whether records (handshake, data, alerts, close_notify) wait to be written.
    pub(crate) fn has_pending_ciphertext(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes waiting records to `out` (one call; may be partial).
    pub(crate) fn write_pending_ciphertext(&mut self, out: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(out)
    }

    /// Queues our close_notify (once): nothing is encrypted after it.
    pub(crate) fn send_close_notify(&mut self) {
        if !self.close_notify_sent {
            self.conn.send_close_notify();
            self.close_notify_sent = true;
        }
    }

    /// Whether our close_notify was queued.
    pub(crate) fn close_notify_sent(&self) -> bool {
        self.close_notify_sent
    }

    /// Moves queued plaintext through rustls and its records to `out`: one record's worth of
    /// plaintext at a time, and only when rustls has nothing left to write, so the bytes
    /// waiting for the peer are counted by the outbound queue (and its watermarks), not hidden
    /// in rustls. Nothing but pending records moves before the handshake completes or after
    /// close_notify.
    pub(crate) fn flush(
        &mut self,
        outbound: &mut OutboundQueue,
        out: &mut impl Write,
    ) -> io::Result<Flushed> {
        let mut written = 0usize;
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(out) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => written = written.saturating_add(n),
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
            if outbound.is_empty() || !self.established || self.close_notify_sent {
                return Ok(Flushed {
                    written,
                    blocked: false,
                });
            }
            let chunk = outbound.front(TLS_PLAINTEXT_CHUNK)?;
            let chunk = chunk.get(..TLS_PLAINTEXT_CHUNK).unwrap_or(chunk);
            let accepted = self.write_plaintext(chunk)?;
            if accepted == 0 {
                return Ok(Flushed {
                    written,
                    blocked: false,
                });
            }
            outbound.consume(accepted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    /// A server config with a fresh self-signed certificate for `localhost`, and a client
    /// config that trusts exactly that certificate.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert: CertificateDer<'static> = generated.cert.der().clone();
        let key = PrivateKeyDer::try_from(generated.key_pair.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The stage and a real rustls client, connected in memory.
    struct Pair {
        server: TlsTransport,
        client: ClientConnection,
        /// What the server stage reported, in order (plaintext concatenated per event).
        events: Vec<TlsEvent>,
        received: Vec<u8>,
    }

    impl Pair {
        fn new() -> Pair {
            let (server, client) = configs();
            let name = ServerName::try_from("localhost").unwrap();
            Pair {
                server: TlsTransport::new(server).unwrap(),
                client: ClientConnection::new(client, name).unwrap(),
                events: Vec::new(),
                received: Vec::new(),
            }
        }

        /// Client → server: everything the client wants to send, fed to the stage.
        fn client_sends(&mut self) -> Result<(), TlsFailure> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            self.feed(&wire)
        }

        /// Feeds raw bytes to the stage as the event loop does, draining events after each step.
        fn feed(&mut self, mut wire: &[u8]) -> Result<(), TlsFailure> {
            let mut plain = [0u8; 64];
            while !wire.is_empty() {
                let taken = self.server.receive_ciphertext(wire)?;
                wire = &wire[taken..];
                while let Some(event) = self.server.poll_event(&mut plain)? {
                    if let TlsEvent::Plaintext(n) = event {
                        self.received.extend_from_slice(&plain[..n]);
                    }
                    self.events.push(event);
                }
            }
            Ok(())
        }

        /// Server → client: the stage's pending records (and queued plaintext), to the client.
        fn server_sends(&mut self, outbound: &mut OutboundQueue) -> Vec<u8> {
            let mut wire = Vec::new();
            let flushed = self.server.flush(outbound, &mut wire).unwrap();
            assert!(!flushed.blocked);
            assert_eq!(flushed.written, wire.len());
            let mut rest = &wire[..];
            let mut plain = Vec::new();
            while !rest.is_empty() {
                self.client.read_tls(&mut rest).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut plain);
            }
            plain
        }

        fn handshake(&mut self) {
            let mut none = OutboundQueue::default();
            for _ in 0..4 {
                if !self.client.is_handshaking() && self.server.is_established() {
                    break;
                }
                self.client_sends().unwrap();
                self.server_sends(&mut none);
            }
            assert!(self.server.is_established());
            assert!(!self.client.is_handshaking());
        }
    }

    #[test]
    fn handshake_completes_once_then_data_flows_both_ways() {
        let mut pair = Pair::new();
        pair.handshake();
        assert_eq!(pair.events, vec![TlsEvent::HandshakeComplete]);
        assert_eq!(pair.server.write_plaintext(b"hi").unwrap(), 2);
        assert_eq!(pair.server_sends(&mut OutboundQueue::default()), b"hi");

        let request = vec![b'q'; 1000];
        pair.client.writer().write_all(&request).unwrap();
        pair.client_sends().unwrap();
        assert_eq!(pair.received, request);
        assert!(pair.events[1..]
            .iter()
            .all(|event| matches!(event, TlsEvent::Plaintext(_))));

        // More than one record's worth: the flush moves it all, record by record.
        let mut outbound = OutboundQueue::default();
        let reply: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        outbound.push_copy(&reply);
        assert_eq!(pair.server_sends(&mut outbound), reply);
        assert!(outbound.is_empty());
    }

    #[test]
    fn nothing_queued_moves_before_the_handshake_completes() {
        let mut pair = Pair::new();
        let mut outbound = OutboundQueue::default();
        outbound.push_copy(b"too early");
        assert_eq!(pair.server.write_plaintext(b"x").unwrap(), 0);
        pair.client_sends().unwrap(); // ClientHello
        pair.server_sends(&mut outbound);
        assert_eq!(outbound.len(), 9, "plaintext waits for the handshake");
        pair.client_sends().unwrap(); // client Finished
        assert!(pair.server.is_established());
        assert_eq!(pair.server_sends(&mut outbound), b"too early");
    }

    #[test]
    fn close_notify_comes_after_the_data_pipelined_before_it() {
        let mut pair = Pair::new();
        pair.handshake();
        pair.client.writer().write_all(b"one\n").unwrap();
        pair.client.writer().write_all(b"two\n").unwrap();
        pair.client.send_close_notify();
        // Data records and close_notify in one write, as a half-closing pipeliner sends them.
        pair.client_sends().unwrap();
        assert_eq!(pair.received, b"one\ntwo\n");
        assert_eq!(pair.events.last(), Some(&TlsEvent::PeerClosed));
        assert_eq!(
            pair.events
                .iter()
                .filter(|e| **e == TlsEvent::PeerClosed)
                .count(),
            1
        );
        // Our answer and our own close_notify still reach the client.
        let mut outbound = OutboundQueue::default();
        outbound.push_copy(b"answers");
        assert_eq!(pair.server_sends(&mut outbound), b"answers");
        pair.server.send_close_notify();
        assert!(pair.server.close_notify_sent());
        assert!(pair.server.has_pending_ciphertext());
        let mut wire = Vec::new();
        pair.server.write_pending_ciphertext(&mut wire).unwrap();
        let mut rest = &wire[..];
        pair.client.read_tls(&mut rest).unwrap();
        let state = pair.client.process_new_packets().unwrap();
        assert!(state.peer_has_closed());
    }

    #[test]
    fn plaintext_after_close_notify_is_not_encrypted() {
        let mut pair = Pair::new();
        pair.handshake();
        pair.server.send_close_notify();
        let mut outbound = OutboundQueue::default();
        outbound.push_copy(b"late");
        let mut wire = Vec::new();
        pair.server.flush(&mut outbound, &mut wire).unwrap();
        assert_eq!(outbound.len(), 4, "nothing is encrypted after close_notify");
    }

    #[test]
    fn garbage_is_a_protocol_error_with_an_alert_for_the_peer() {
        let mut pair = Pair::new();
        let failure = pair.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        assert!(matches!(failure, TlsFailure::Protocol(_)), "{failure:?}");
        assert!(!pair.server.is_established());
        assert!(pair.events.is_empty());
        assert!(
            pair.server.has_pending_ciphertext(),
            "an alert tells the peer why"
        );
    }

    #[test]
    fn a_corrupted_record_after_the_handshake_is_an_error() {
        let mut pair = Pair::new();
        pair.handshake();
        pair.client.writer().write_all(b"secret").unwrap();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        let last = wire.len() - 1;
        wire[last] ^= 0x55;
        let failure = pair.feed(&wire).unwrap_err();
        assert!(matches!(failure, TlsFailure::Protocol(_)), "{failure:?}");
        assert!(
            pair.received.is_empty(),
            "no byte of a bad record is delivered"
        );
    }

    #[test]
    fn ciphertext_fed_one_byte_at_a_time_is_the_same_stream() {
        let mut pair = Pair::new();
        let mut none = OutboundQueue::default();
        for _ in 0..4 {
            if pair.server.is_established() && !pair.client.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            while pair.client.wants_write() {
                pair.client.write_tls(&mut wire).unwrap();
            }
            for byte in wire.chunks(1) {
                pair.feed(byte).unwrap();
            }
            pair.server_sends(&mut none);
        }
        pair.client.writer().write_all(b"byte by byte").unwrap();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        for byte in wire.chunks(1) {
            pair.feed(byte).unwrap();
        }
        assert_eq!(pair.received, b"byte by byte");
        assert_eq!(pair.events[0], TlsEvent::HandshakeComplete);
    }
}
