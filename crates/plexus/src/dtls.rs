//! DTLS 1.2 for dtls listeners, on OpenSSL: the server context (certificate, MTU, cookie
//! callbacks), the stateless cookie, and the in-memory datagram "socket" each SSL object
//! reads from and writes to.
//!
//! Cookies: `HMAC-SHA256(secret, peer IP ‖ port)`, with a secret rotated every
//! [`COOKIE_ROTATION`] on the loop's clock (periods aligned to the first secret's creation,
//! checked against the `now` of every cookie made or verified); a cookie made with the current
//! or the previous secret is accepted, so a cookie lives at most two rotation periods however
//! rarely cookies are made. Before a ClientHello carries a valid cookie, the only state
//! is one shared "listen" SSL object per socket (`DTLSv1_listen`, reset for every datagram):
//! no allocation per peer. The datagram module owns sockets, sessions and timers.
//!
//! OpenSSL reports errors through a per-thread queue, and `SSL_get_error` reads that queue:
//! an error one call leaves there becomes the next call's error, on whatever session the loop
//! serves next. So every OpenSSL call of the runtime goes through this module, and each one
//! runs [`isolated`]: the queue is emptied before the call and drained after it, and what the
//! call left is reported for that call's session only.
//!
//! No panics from input: indexing, unchecked arithmetic and unwrap/expect are denied in this
//! module outside its tests (clippy), as in `plexus-proto`.

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
use plexus_sys::dtls::ListenOutcome;
use tracing::debug;

use crate::config::PskConfig;
use crate::tls::TlsContext;

/// How often the cookie secret changes.
pub(crate) const COOKIE_ROTATION: Duration = Duration::from_secs(60);

thread_local! {
    /// The peer whose datagram the loop thread is handing to OpenSSL right now, and the loop's
    /// time. The cookie callbacks (which OpenSSL calls synchronously, on this thread) read it;
    /// it is set only for the duration of one [`isolated`] call.
    static CURRENT: Cell<Option<(SocketAddr, Instant)>> = const { Cell::new(None) };
}

/// Runs one OpenSSL call for `peer` at `now` with a clean error queue: errors left by anyone
/// before are discarded (and logged: they would have been read as this call's), and whatever
/// the call leaves is drained and returned, so it is attributed to this call only.
fn isolated<T>(peer: SocketAddr, now: Instant, call: impl FnOnce() -> T) -> (T, ErrorStack) {
    let stale = ErrorStack::get();
    if !stale.errors().is_empty() {
        debug!("openssl error queue was not empty before a call for {peer}: {stale}");
    }
    CURRENT.with(|current| current.set(Some((peer, now))));
    let result = call();
    CURRENT.with(|current| current.set(None));
    (result, ErrorStack::get())
}

/// Why a DTLS context could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DtlsError {
    /// OpenSSL refused the certificate, key or settings.
    #[error("dtls: {0}")]
    OpenSsl(#[from] ErrorStack),
    /// A `[[tls.psk]]` key file could not be used.
    #[error("tls.psk: {0}")]
    Psk(#[from] crate::config::PskKeyError),
    /// A DTLS client's CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The CA file holds no certificate.
    #[error("CA file {0} holds no PEM certificate")]
    EmptyCaFile(std::path::PathBuf),
    /// A trust choice a DTLS client cannot make (a rustls root store holds no certificates
    /// OpenSSL could use: give a CA file or the system roots instead).
    #[error("a DTLS client cannot use a rustls root store (ServerTrust::Roots)")]
    UnsupportedTrust,
}

/// A DTLS 1.2 client configuration (OpenSSL) for UDP upstreams
/// ([`crate::Upstream::with_dtls`]): how the server's certificate is checked — the same
/// choices as [`crate::tls_client::ServerTrust`] — or a pre-shared key, and the name sent
/// (SNI) and verified. Build it once, at start-up (it may read files).
#[derive(Clone)]
pub struct DtlsClientConfig {
    connector: openssl::ssl::SslConnector,
    name: String,
    verify_hostname: bool,
    /// `ServerTrust::Pinned`: the certificate the server must present (DER).
    pinned: Option<Arc<[u8]>>,
    mtu: u32,
}

impl std::fmt::Debug for DtlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsClientConfig")
            .field("name", &self.name)
            .field("verify_hostname", &self.verify_hostname)
            .field("pinned", &self.pinned.is_some())
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// The record size of DTLS client connections unless set otherwise (as dtls listeners').
pub(crate) const DEFAULT_CLIENT_MTU: u32 = 1200;

impl DtlsClientConfig {
    /// A client that verifies the server by `trust` for `server_name` (a DNS name or an IP
    /// address; sent as SNI when it is a name). `SystemRoots` reads the system's roots (as
    /// the TLS client does), `CaFile` trusts that PEM file's certificates (as roots, or as
    /// the server's own certificate), `Pinned` accepts exactly that certificate (name and
    /// chain not checked), `AnyCertificate` anything (the `--insecure` choice).
    pub fn new(
        trust: &crate::tls_client::ServerTrust,
        server_name: &str,
    ) -> Result<DtlsClientConfig, DtlsError> {
        use crate::tls_client::ServerTrust;
        use openssl::ssl::SslVerifyMode;
        use openssl::x509::verify::X509VerifyFlags;
        let mut builder = Self::builder()?;
        let mut verify_hostname = true;
        let mut pinned = None;
        match trust {
            ServerTrust::SystemRoots => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    if let Ok(cert) = X509::from_der(cert.as_ref()) {
                        // A duplicate is refused by the store: harmless.
                        let _ = builder.cert_store_mut().add_cert(cert);
                    }
                }
            }
            ServerTrust::Roots(_) => return Err(DtlsError::UnsupportedTrust),
            ServerTrust::CaFile(path) => {
                let pem = std::fs::read(path).map_err(|source| DtlsError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                let certs = X509::stack_from_pem(&pem)?;
                if certs.is_empty() {
                    return Err(DtlsError::EmptyCaFile(path.clone()));
                }
                for cert in certs {
                    let _ = builder.cert_store_mut().add_cert(cert);
                }
                // A certificate of the file is trusted as it is, self-signed or not.
                builder
                    .verify_param_mut()
                    .set_flags(X509VerifyFlags::PARTIAL_CHAIN)?;
            }
            ServerTrust::Pinned(der) => {
                builder.set_verify(SslVerifyMode::NONE);
                verify_hostname = false;
                pinned = Some(Arc::from(der.as_ref()));
            }
            _ => {
                builder.set_verify(SslVerifyMode::NONE);
                verify_hostname = false;
            }
        }
        Ok(DtlsClientConfig {
            connector: builder.build(),
            name: server_name.to_owned(),
            verify_hostname,
            pinned,
            mtu: DEFAULT_CLIENT_MTU,
        })
    }

    /// A client that authenticates with a pre-shared key (`identity`, `key`: PSK suites only,
    /// no certificate), as a dtls listener's `[[tls.psk]]` entry expects.
    pub fn psk(identity: &str, key: Vec<u8>) -> Result<DtlsClientConfig, DtlsError> {
        let mut builder = Self::builder()?;
        let mut id = identity.as_bytes().to_vec();
        id.push(0);
        builder.set_cipher_list("PSK")?;
        builder.set_psk_client_callback(move |_, _hint, identity_out, key_out| {
            let slots = (
                identity_out.get_mut(..id.len()),
                key_out.get_mut(..key.len()),
            );
            Ok(match slots {
                (Some(identity_out), Some(key_out)) => {
                    identity_out.copy_from_slice(&id);
                    key_out.copy_from_slice(&key);
                    key.len()
                }
                // 0 = no PSK: the handshake fails.
                _ => 0,
            })
        });
        Ok(DtlsClientConfig {
            connector: builder.build(),
            name: String::new(),
            verify_hostname: false,
            pinned: None,
            mtu: DEFAULT_CLIENT_MTU,
        })
    }

    /// The same configuration with records of at most `mtu` bytes.
    #[must_use]
    pub fn with_mtu(mut self, mtu: u32) -> DtlsClientConfig {
        self.mtu = mtu;
        self
    }

    fn builder() -> Result<openssl::ssl::SslConnectorBuilder, DtlsError> {
        let mut builder = openssl::ssl::SslConnector::builder(SslMethod::dtls())?;
        builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        builder.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        builder.set_options(SslOptions::NO_QUERY_MTU);
        builder.set_mode(SslMode::RELEASE_BUFFERS);
        Ok(builder)
    }

    /// A client SSL object in connect state (SNI, name verification and MTU set), for a
    /// caller that runs the handshake over its own socket — `plexus connect dtls://` and
    /// `plexus bench dtls-echo` do, blocking. With a pinned certificate, check
    /// [`DtlsClientConfig::accepts`] once the handshake is done.
    pub fn ssl(&self) -> Result<openssl::ssl::Ssl, ErrorStack> {
        let mut config = self.connector.configure()?;
        config.set_verify_hostname(self.verify_hostname);
        config.set_use_server_name_indication(!self.name.is_empty());
        let mut ssl = config.into_ssl(&self.name)?;
        ssl.set_mtu(self.mtu)?;
        ssl.set_connect_state();
        Ok(ssl)
    }

    /// A fresh client-side SSL object over an empty [`DatagramIo`], its handshake not started.
    pub(crate) fn stream(&self) -> Result<SslStream<DatagramIo>, ErrorStack> {
        let build = || SslStream::new(self.ssl()?, DatagramIo::default());
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        isolated(unspecified, Instant::now(), build).0
    }

    /// Whether an established session shows the pinned certificate (true without a pin).
    pub fn accepts(&self, ssl: &openssl::ssl::SslRef) -> bool {
        let Some(pinned) = &self.pinned else {
            return true;
        };
        ssl.peer_certificate()
            .and_then(|cert| cert.to_der().ok())
            .is_some_and(|der| der.as_slice() == pinned.as_ref())
    }
}

/// The keyed MAC behind cookies, with its rotating secret.
struct CookieSecret {
    keys: Mutex<Keys>,
    rng: SystemRandom,
}

struct Keys {
    current: hmac::Key,
    previous: hmac::Key,
    /// Start of the current rotation period (periods are aligned to the first one).
    rotated: Instant,
}

impl CookieSecret {
    fn new(now: Instant) -> Result<CookieSecret, ErrorStack> {
        let rng = SystemRandom::new();
        Ok(CookieSecret {
            keys: Mutex::new(Keys {
                current: Self::generate(&rng)?,
                previous: Self::generate(&rng)?,
                rotated: now,
            }),
            rng,
        })
    }

    fn generate(rng: &SystemRandom) -> Result<hmac::Key, ErrorStack> {
        hmac::Key::generate(hmac::HMAC_SHA256, rng).map_err(|_| ErrorStack::get())
    }

    fn message(peer: SocketAddr) -> Vec<u8> {
        let mut message = match peer.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
            std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        message.extend_from_slice(&peer.port().to_be_bytes());
        message
    }

    /// Advances the secrets to the period `now` falls in: one period later the current secret
    /// becomes the previous one; two or more, both are new. A key that cannot be generated
    /// (no entropy) leaves the secrets as they are until the next call.
    fn rotate_if_due(&self, keys: &mut Keys, now: Instant) {
        let elapsed = now.saturating_duration_since(keys.rotated).as_nanos();
        let period = COOKIE_ROTATION.as_nanos();
        let (Some(periods), Some(into_period)) =
            (elapsed.checked_div(period), elapsed.checked_rem(period))
        else {
            return;
        };
        if periods == 0 {
            return;
        }
        let Ok(fresh) = Self::generate(&self.rng) else {
            return;
        };
        if periods == 1 {
            keys.previous = std::mem::replace(&mut keys.current, fresh);
        } else {
            let Ok(also_fresh) = Self::generate(&self.rng) else {
                return;
            };
            keys.previous = also_fresh;
            keys.current = fresh;
        }
        // The start of the period `now` is in: `now` minus the part of a period elapsed.
        let into_period = Duration::from_nanos(u64::try_from(into_period).unwrap_or(0));
        keys.rotated = now.checked_sub(into_period).unwrap_or(now);
    }

    fn cookie(&self, peer: SocketAddr, out: &mut [u8], now: Instant) -> usize {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate_if_due(&mut keys, now);
        let tag = hmac::sign(&keys.current, &Self::message(peer));
        copy_prefix(tag.as_ref(), out)
    }

    fn verify(&self, peer: SocketAddr, cookie: &[u8], now: Instant) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate_if_due(&mut keys, now);
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
                let slot = key.and_then(|key| Some((key, out.get_mut(..key.len())?)));
                Ok(match slot {
                    Some((key, slot)) => {
                        slot.copy_from_slice(key);
                        key.len()
                    }
                    // 0 = unknown identity (or a key longer than OpenSSL's buffer): the
                    // handshake fails.
                    None => 0,
                })
            });
        }
        let secret = Arc::new(CookieSecret::new(Instant::now())?);
        let generator = Arc::clone(&secret);
        // Outside an `isolated` call there is no peer: no cookie (the listen fails cleanly).
        builder.set_cookie_generate_cb(move |_, out| {
            let (peer, now) = CURRENT.with(Cell::get).ok_or_else(ErrorStack::get)?;
            Ok(generator.cookie(peer, out, now))
        });
        builder.set_cookie_verify_cb(move |_, cookie| {
            CURRENT
                .with(Cell::get)
                .is_some_and(|(peer, now)| secret.verify(peer, cookie, now))
        });
        Ok(DtlsContext {
            context: builder.build(),
            mtu,
        })
    }

    /// A fresh server-side SSL object over an empty [`DatagramIo`].
    pub(crate) fn stream(&self) -> Result<SslStream<DatagramIo>, ErrorStack> {
        let build = || {
            let mut ssl = Ssl::new(&self.context)?;
            ssl.set_mtu(self.mtu)?;
            ssl.set_accept_state();
            SslStream::new(ssl, DatagramIo::default())
        };
        // No peer yet: the unspecified address only labels the log line of a stale queue.
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        isolated(unspecified, Instant::now(), build).0
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
        Ok(copy_prefix(&self.inbound, buf))
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

/// Copies as much of `from` as fits into the start of `to`; returns how many bytes.
fn copy_prefix(from: &[u8], to: &mut [u8]) -> usize {
    let len = from.len().min(to.len());
    if let (Some(to), Some(from)) = (to.get_mut(..len), from.get(..len)) {
        to.copy_from_slice(from);
    }
    len
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

/// Advances the handshake of `stream` (peer `peer`, loop time `now`).
pub(crate) fn handshake(
    stream: &mut SslStream<DatagramIo>,
    peer: SocketAddr,
    now: Instant,
) -> Progress {
    match isolated(peer, now, || stream.do_handshake()) {
        (Ok(()), _) => Progress::Established,
        (Err(err), _) if would_block(err.code()) => Progress::Waiting,
        (Err(err), left) => Progress::Failed(describe(&err.to_string(), &left)),
    }
}

/// Reads the next application datagram into `buf` (`Ok(n)`), or says why there is none.
pub(crate) fn read(
    stream: &mut SslStream<DatagramIo>,
    buf: &mut [u8],
    peer: SocketAddr,
    now: Instant,
) -> Result<usize, Progress> {
    match isolated(peer, now, || stream.ssl_read(buf)) {
        (Ok(0), _) => Err(Progress::Closed),
        (Ok(n), _) => Ok(n),
        (Err(err), _) if err.code() == ErrorCode::ZERO_RETURN => Err(Progress::Closed),
        (Err(err), _) if would_block(err.code()) => Err(Progress::Waiting),
        (Err(err), left) => Err(Progress::Failed(describe(&err.to_string(), &left))),
    }
}

/// Encrypts one application datagram (one record) into `stream`'s outbound datagrams.
pub(crate) fn write(
    stream: &mut SslStream<DatagramIo>,
    data: &[u8],
    peer: SocketAddr,
    now: Instant,
) -> Result<(), String> {
    match isolated(peer, now, || stream.ssl_write(data)) {
        (Ok(_), _) => Ok(()),
        (Err(err), left) => Err(describe(&err.to_string(), &left)),
    }
}

/// Queues close_notify (best effort: the connection is over either way).
pub(crate) fn close_notify(stream: &mut SslStream<DatagramIo>, peer: SocketAddr, now: Instant) {
    let _ = isolated(peer, now, || stream.shutdown());
}

/// Runs `DTLSv1_listen` for a datagram from `peer` already put in `listen`'s input; the
/// errors it leaves for a datagram it rejects are returned (never seen by another call).
pub(crate) fn listen(
    listen: &mut SslStream<DatagramIo>,
    peer: SocketAddr,
    now: Instant,
) -> (ListenOutcome, ErrorStack) {
    isolated(peer, now, || plexus_sys::dtls::listen(listen.ssl()))
}

/// Lets OpenSSL retransmit its last flight if the DTLS timer expired; `false` when the
/// retransmission limit was reached (the handshake failed).
pub(crate) fn handle_timeout(
    stream: &mut SslStream<DatagramIo>,
    peer: SocketAddr,
    now: Instant,
) -> bool {
    isolated(peer, now, || plexus_sys::dtls::handle_timeout(stream.ssl())).0
}

/// When the DTLS retransmission timer of `stream` fires, from now (`None`: not running).
pub(crate) fn retransmit_after(
    stream: &SslStream<DatagramIo>,
    peer: SocketAddr,
    now: Instant,
) -> Option<Duration> {
    isolated(peer, now, || plexus_sys::dtls::get_timeout(stream.ssl())).0
}

/// Frees the record buffers of an established session between datagrams (see
/// [`plexus_sys::dtls::free_buffers`]).
pub(crate) fn free_buffers(stream: &SslStream<DatagramIo>, peer: SocketAddr, now: Instant) {
    let _ = isolated(peer, now, || plexus_sys::dtls::free_buffers(stream.ssl()));
}

/// A failed call's error, with what else it left in the queue.
fn describe(error: &str, left: &ErrorStack) -> String {
    match left.errors().is_empty() {
        true => error.to_owned(),
        false => format!("{error} ({left})"),
    }
}

fn would_block(code: ErrorCode) -> bool {
    code == ErrorCode::WANT_READ || code == ErrorCode::WANT_WRITE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn cookies_bind_the_peer_address() {
        let start = Instant::now();
        let secret = CookieSecret::new(start).unwrap();
        let mut out = [0u8; 255];
        let len = secret.cookie(peer(4000), &mut out, start);
        assert_eq!(len, 32);
        assert!(secret.verify(peer(4000), &out[..len], start));
        assert!(!secret.verify(peer(4001), &out[..len], start));
    }

    /// The secret rotates with the clock passed in, not only when a cookie is made: with no
    /// cookie generated in between, a cookie is accepted within its own and the next period
    /// and refused from two periods after its period began.
    #[test]
    fn a_cookie_expires_two_rotation_periods_after_its_period_began() {
        let start = Instant::now();
        let secret = CookieSecret::new(start).unwrap();
        let mut out = [0u8; 255];
        let made = start + COOKIE_ROTATION / 2;
        let len = secret.cookie(peer(4000), &mut out, made);
        let cookie = out[..len].to_vec();
        assert!(secret.verify(peer(4000), &cookie, made + COOKIE_ROTATION / 4));
        assert!(
            secret.verify(
                peer(4000),
                &cookie,
                start + COOKIE_ROTATION + COOKIE_ROTATION / 2
            ),
            "within the next period: the previous secret"
        );
        assert!(
            !secret.verify(peer(4000), &cookie, start + 2 * COOKIE_ROTATION),
            "two periods on: refused"
        );

        // Without any verification in between either: a long pause replaces both secrets.
        let secret = CookieSecret::new(start).unwrap();
        let len = secret.cookie(peer(4000), &mut out, start);
        let cookie = out[..len].to_vec();
        assert!(!secret.verify(peer(4000), &cookie, start + 10 * COOKIE_ROTATION));
        // And periods stay aligned: a cookie made late in a period expires on schedule.
        let late = start + 10 * COOKIE_ROTATION + COOKIE_ROTATION * 9 / 10;
        let len = secret.cookie(peer(4000), &mut out, late);
        let cookie = out[..len].to_vec();
        assert!(secret.verify(peer(4000), &cookie, start + 11 * COOKIE_ROTATION));
        assert!(!secret.verify(peer(4000), &cookie, start + 12 * COOKIE_ROTATION));
    }

    /// `DTLSv1_listen` leaves an error in the thread's queue for a datagram it rejects (the
    /// cause of one datagram killing other sessions): the call reports it as its own, the
    /// queue is empty afterwards, and a stale error someone else left is never read as the
    /// next session's.
    #[test]
    fn errors_stay_with_the_call_that_caused_them() {
        let tls = TlsContext::new(None).unwrap();
        let context = DtlsContext::new(&tls, &[], 1200).unwrap();
        let now = Instant::now();
        let mut listener = context.stream().unwrap();
        listener.get_mut().put(&[0]);
        let (outcome, left) = listen(&mut listener, peer(5000), now);
        assert_ne!(outcome, ListenOutcome::Verified);
        assert!(
            !left.errors().is_empty(),
            "OpenSSL reports the 1-byte record to this call"
        );
        assert!(ErrorStack::get().errors().is_empty(), "nothing left behind");

        // A raw call (as the runtime made before) leaves the queue dirty …
        listener.get_mut().put(&[0]);
        let _ = plexus_sys::dtls::listen(listener.ssl());
        // … and a session's next step still sees only its own state: it waits for input.
        let mut session = context.stream().unwrap();
        assert!(matches!(
            handshake(&mut session, peer(5001), now),
            Progress::Waiting
        ));
        let mut buf = [0u8; 64];
        assert!(matches!(
            read(&mut session, &mut buf, peer(5001), now),
            Err(Progress::Waiting)
        ));
    }

    /// Runs a client and a server SSL object against each other in memory (the server with
    /// the cookie exchange, as a dtls listener does) until both are done or stuck; returns
    /// whether the client's handshake completed, and the client.
    fn handshake_in_memory(
        client: &DtlsClientConfig,
        tls: &TlsContext,
    ) -> (bool, SslStream<DatagramIo>) {
        let server = DtlsContext::new(tls, &[], 1200).unwrap();
        let now = Instant::now();
        let (cp, sp) = (peer(6000), peer(6001));
        let mut c = client.stream().unwrap();
        let mut lobby = server.stream().unwrap();
        let mut session: Option<SslStream<DatagramIo>> = None;
        let mut client_done = false;
        assert!(matches!(handshake(&mut c, sp, now), Progress::Waiting));
        for _ in 0..20 {
            let to_server = std::mem::take(&mut c.get_mut().outbound);
            for datagram in to_server {
                match session.as_mut() {
                    None => {
                        lobby.get_mut().reset();
                        lobby.get_mut().put(&datagram);
                        if listen(&mut lobby, cp, now).0 == ListenOutcome::Verified {
                            let mut s = std::mem::replace(&mut lobby, server.stream().unwrap());
                            let _ = handshake(&mut s, cp, now);
                            session = Some(s);
                        }
                    }
                    Some(s) => {
                        s.get_mut().put(&datagram);
                        let _ = handshake(s, cp, now);
                    }
                }
            }
            let to_client = match session.as_mut() {
                Some(s) => std::mem::take(&mut s.get_mut().outbound),
                None => std::mem::take(&mut lobby.get_mut().outbound),
            };
            if to_client.is_empty() && client_done {
                break;
            }
            for datagram in to_client {
                c.get_mut().put(&datagram);
                match handshake(&mut c, sp, now) {
                    Progress::Established => client_done = true,
                    Progress::Failed(_) => return (false, c),
                    _ => {}
                }
            }
        }
        (client_done, c)
    }

    #[test]
    fn a_dtls_client_verifies_by_ca_file_and_name_or_by_pin() {
        use crate::tls_client::ServerTrust;
        let tls = TlsContext::new(None).unwrap();
        // Each ephemeral context has its own certificate: `other`'s is not `tls`'s.
        let other = TlsContext::new(None).unwrap();
        let (chain, _) = tls.default_identity();
        let leaf = chain[0].clone();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            X509::from_der(leaf.as_ref()).unwrap().to_pem().unwrap(),
        )
        .unwrap();
        let trust = ServerTrust::CaFile(ca);
        let by_ca = DtlsClientConfig::new(&trust, "localhost").unwrap();
        assert!(
            handshake_in_memory(&by_ca, &tls).0,
            "the CA file's certificate, its name"
        );
        assert!(
            !handshake_in_memory(&by_ca, &other).0,
            "a certificate the file lacks"
        );
        let wrong_name = DtlsClientConfig::new(&trust, "other.example").unwrap();
        assert!(
            !handshake_in_memory(&wrong_name, &tls).0,
            "a name it is not valid for"
        );
        let by_ip = DtlsClientConfig::new(&trust, "127.0.0.1").unwrap();
        assert!(
            handshake_in_memory(&by_ip, &tls).0,
            "an IP address it names"
        );
        let pinned = DtlsClientConfig::new(&ServerTrust::Pinned(leaf), "ignored").unwrap();
        let (done, stream) = handshake_in_memory(&pinned, &tls);
        assert!(
            done && pinned.accepts(stream.ssl()),
            "the pinned certificate"
        );
        let (done, stream) = handshake_in_memory(&pinned, &other);
        assert!(done, "a pin is checked after the handshake");
        assert!(
            !pinned.accepts(stream.ssl()),
            "another certificate than the pinned one"
        );
        let any = DtlsClientConfig::new(&ServerTrust::AnyCertificate, "x").unwrap();
        let (done, stream) = handshake_in_memory(&any, &other);
        assert!(done && any.accepts(stream.ssl()), "any certificate");
    }

    #[test]
    fn dtls_client_trust_errors_are_precise() {
        use crate::tls_client::ServerTrust;
        let roots = ServerTrust::Roots(Arc::new(rustls::RootCertStore::empty()));
        assert!(matches!(
            DtlsClientConfig::new(&roots, "x"),
            Err(DtlsError::UnsupportedTrust)
        ));
        let missing = ServerTrust::CaFile("/nonexistent/ca.pem".into());
        assert!(matches!(
            DtlsClientConfig::new(&missing, "x"),
            Err(DtlsError::CaFile { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(DtlsClientConfig::new(&ServerTrust::CaFile(empty), "x").is_err());
        let psk = DtlsClientConfig::psk("client", vec![7; 32]).unwrap();
        assert!(psk.stream().is_ok());
    }
}
