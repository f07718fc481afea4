//! DTLS 1.2 for dtls listeners, on OpenSSL: the server context (certificate, MTU, cookie
//! callbacks), the stateless cookie, and the in-memory datagram "socket" each SSL object
//! reads from and writes to.
//!
//! Cookies: `HMAC-SHA256(secret, peer IP ‖ port)`, with a secret rotated every
//! [`COOKIE_ROTATION`]; a cookie made with the current or the previous secret is accepted, so
//! a cookie lives 1–2 rotations. Before a ClientHello carries a valid cookie, the only state
//! is one shared "listen" SSL object per socket (`DTLSv1_listen`, reset for every datagram):
//! no allocation per peer. The datagram module owns sockets, sessions and timers.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslMode, SslOptions, SslStream, SslVersion,
};
use openssl::x509::X509;

use crate::config::PskConfig;
use crate::tls::TlsContext;

/// How often the cookie secret changes.
pub(crate) const COOKIE_ROTATION: Duration = Duration::from_secs(60);

thread_local! {
    /// The peer whose datagram the loop thread is handing to OpenSSL right now. The cookie
    /// callbacks (which OpenSSL calls synchronously, on this thread) read it.
    static CURRENT_PEER: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// Marks `peer` as the source of the datagram about to be processed on this thread.
pub(crate) fn set_current_peer(peer: SocketAddr) {
    CURRENT_PEER.with(|current| current.set(Some(peer)));
}

/// Why a DTLS context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    /// OpenSSL refused the certificate, key or settings.
    #[error("dtls: {0}")]
    OpenSsl(#[from] ErrorStack),
    /// A `[[tls.psk]]` key file could not be used.
    #[error("tls.psk: {0}")]
    Psk(String),
}

/// The keyed MAC behind cookies, with its rotating secret.
struct CookieSecret {
    keys: Mutex<Keys>,
    rng: SystemRandom,
}

struct Keys {
    current: hmac::Key,
    previous: hmac::Key,
    rotated: Instant,
}

impl CookieSecret {
    fn new() -> Result<CookieSecret, ErrorStack> {
        let rng = SystemRandom::new();
        let generate = |rng: &SystemRandom| {
            hmac::Key::generate(hmac::HMAC_SHA256, rng).map_err(|_| ErrorStack::get())
        };
        Ok(CookieSecret {
            keys: Mutex::new(Keys {
                current: generate(&rng)?,
                previous: generate(&rng)?,
                rotated: Instant::now(),
            }),
            rng,
        })
    }

    fn message(peer: SocketAddr) -> Vec<u8> {
        let mut message = match peer.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
            std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        message.extend_from_slice(&peer.port().to_be_bytes());
        message
    }

    fn rotate_if_due(&self, keys: &mut Keys, now: Instant) {
        if now.duration_since(keys.rotated) < COOKIE_ROTATION {
            return;
        }
        if let Ok(fresh) = hmac::Key::generate(hmac::HMAC_SHA256, &self.rng) {
            keys.previous = std::mem::replace(&mut keys.current, fresh);
            keys.rotated = now;
        }
    }

    fn cookie(&self, peer: SocketAddr, out: &mut [u8]) -> usize {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate_if_due(&mut keys, Instant::now());
        let tag = hmac::sign(&keys.current, &Self::message(peer));
        let len = tag.as_ref().len().min(out.len());
        out[..len].copy_from_slice(&tag.as_ref()[..len]);
        len
    }

    fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let message = Self::message(peer);
        hmac::verify(&keys.current, &message, cookie).is_ok()
            || hmac::verify(&keys.previous, &message, cookie).is_ok()
    }
}

/// The OpenSSL server context shared by every dtls listener (and loop) of a server.
#[derive(Clone)]
pub(crate) struct DtlsContext {
    context: SslContext,
    mtu: u32,
}

impl DtlsContext {
    /// A DTLS 1.2 server context presenting the default certificate of `tls`, with records
    /// of at most `mtu` bytes.
    pub(crate) fn new(
        tls: &TlsContext,
        psk: &[PskConfig],
        mtu: u32,
    ) -> Result<DtlsContext, DtlsError> {
        let (chain, key) = tls.default_identity();
        let mut builder = SslContext::builder(SslMethod::dtls())?;
        builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        builder.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        let mut certs = chain.iter();
        if let Some(leaf) = certs.next() {
            let leaf = X509::from_der(leaf.as_ref())?;
            builder.set_certificate(&leaf)?;
        }
        for extra in certs {
            builder.add_extra_chain_cert(X509::from_der(extra.as_ref())?)?;
        }
        let key = PKey::private_key_from_der(key.secret_der())?;
        builder.set_private_key(&key)?;
        builder.check_private_key()?;
        // The MTU is ours to set (no path-MTU queries through a BIO that cannot answer);
        // cookies are mandatory; a record buffer is released when idle.
        builder.set_options(SslOptions::NO_QUERY_MTU | SslOptions::COOKIE_EXCHANGE);
        builder.set_mode(SslMode::RELEASE_BUFFERS);
        if !psk.is_empty() {
            let mut keys = HashMap::new();
            for entry in psk {
                let key = entry.load_key().map_err(DtlsError::Psk)?;
                keys.insert(entry.identity.clone().into_bytes(), key);
            }
            // Certificate suites stay available; a client offering PSK suites gets one.
            builder.set_cipher_list("DEFAULT:PSK")?;
            builder.set_psk_server_callback(move |_, identity, out| {
                let key = identity.and_then(|identity| keys.get(identity));
                Ok(match key {
                    Some(key) if key.len() <= out.len() => {
                        out[..key.len()].copy_from_slice(key);
                        key.len()
                    }
                    // 0 = unknown identity: the handshake fails.
                    _ => 0,
                })
            });
        }
        let secret = Arc::new(CookieSecret::new()?);
        let generator = Arc::clone(&secret);
        builder.set_cookie_generate_cb(move |_, out| {
            let peer = CURRENT_PEER.with(Cell::get).ok_or_else(ErrorStack::get)?;
            Ok(generator.cookie(peer, out))
        });
        builder.set_cookie_verify_cb(move |_, cookie| {
            CURRENT_PEER
                .with(Cell::get)
                .is_some_and(|peer| secret.verify(peer, cookie))
        });
        Ok(DtlsContext {
            context: builder.build(),
            mtu,
        })
    }

    /// A fresh server-side SSL object over an empty [`DatagramIo`].
    pub(crate) fn stream(&self) -> Result<SslStream<DatagramIo>, ErrorStack> {
        let mut ssl = Ssl::new(&self.context)?;
        ssl.set_mtu(self.mtu)?;
        ssl.set_accept_state();
        SslStream::new(ssl, DatagramIo::default())
    }
}

/// The "socket" under one SSL object: each read returns exactly one datagram (the one the
/// loop put there), each write is one outgoing datagram.
#[derive(Debug, Default)]
pub(crate) struct DatagramIo {
    inbound: Vec<u8>,
    has_inbound: bool,
    /// Datagrams OpenSSL wrote, oldest first, for the loop to send.
    pub(crate) outbound: Vec<Vec<u8>>,
}

impl DatagramIo {
    /// Makes `datagram` the next (and only) thing a read returns.
    pub(crate) fn put(&mut self, datagram: &[u8]) {
        self.inbound.clear();
        self.inbound.extend_from_slice(datagram);
        self.has_inbound = true;
    }

    /// Forgets an unread datagram and any datagram written but not yet taken.
    pub(crate) fn reset(&mut self) {
        self.has_inbound = false;
        self.outbound.clear();
    }
}

impl Read for DatagramIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.has_inbound {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.has_inbound = false;
        let len = self.inbound.len().min(buf.len());
        buf[..len].copy_from_slice(&self.inbound[..len]);
        Ok(len)
    }
}

impl Write for DatagramIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a step of OpenSSL made of the input so far.
#[derive(Debug)]
pub(crate) enum Progress {
    /// Waiting for more datagrams (or for the retransmission timer).
    Waiting,
    /// The handshake completed.
    Established,
    /// The peer sent close_notify.
    Closed,
    /// A fatal protocol error.
    Failed(String),
}

/// Advances the handshake of `stream`.
pub(crate) fn handshake(stream: &mut SslStream<DatagramIo>) -> Progress {
    match stream.do_handshake() {
        Ok(()) => Progress::Established,
        Err(err) if would_block(err.code()) => Progress::Waiting,
        Err(err) => Progress::Failed(err.to_string()),
    }
}

/// Reads the next application datagram into `buf` (`Ok(n)`), or says why there is none.
pub(crate) fn read(stream: &mut SslStream<DatagramIo>, buf: &mut [u8]) -> Result<usize, Progress> {
    match stream.ssl_read(buf) {
        Ok(0) => Err(Progress::Closed),
        Ok(n) => Ok(n),
        Err(err) if err.code() == ErrorCode::ZERO_RETURN => Err(Progress::Closed),
        Err(err) if would_block(err.code()) => Err(Progress::Waiting),
        Err(err) => Err(Progress::Failed(err.to_string())),
    }
}

/// Encrypts one application datagram (one record) into `stream`'s outbound datagrams.
pub(crate) fn write(stream: &mut SslStream<DatagramIo>, data: &[u8]) -> Result<(), String> {
    match stream.ssl_write(data) {
        Ok(_) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

/// Queues close_notify (best effort: the connection is over either way).
pub(crate) fn close_notify(stream: &mut SslStream<DatagramIo>) {
    let _ = stream.shutdown();
}

fn would_block(code: ErrorCode) -> bool {
    code == ErrorCode::WANT_READ || code == ErrorCode::WANT_WRITE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_bind_the_peer_address_and_survive_one_rotation() {
        let secret = CookieSecret::new().unwrap();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let mut out = [0u8; 255];
        let len = secret.cookie(peer, &mut out);
        assert_eq!(len, 32);
        assert!(secret.verify(peer, &out[..len]));
        assert!(!secret.verify(other, &out[..len]));
        let mut keys = secret.keys.lock().unwrap();
        let later = keys.rotated + COOKIE_ROTATION;
        secret.rotate_if_due(&mut keys, later);
        drop(keys);
        assert!(
            secret.verify(peer, &out[..len]),
            "previous secret still accepted"
        );
        let mut keys = secret.keys.lock().unwrap();
        secret.rotate_if_due(&mut keys, later + COOKIE_ROTATION);
        drop(keys);
        assert!(
            !secret.verify(peer, &out[..len]),
            "two rotations later it expired"
        );
    }
}
