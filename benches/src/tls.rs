//! TLS helpers shared by the TLS benchmark binaries.
//!
//! Everything uses rustls 0.23 on the aws-lc-rs provider with its default
//! cipher suites and key-exchange groups, the same stack plexus uses, so the
//! servers and the load generators negotiate what a default plexus would.
//!
//! The client side is driven by hand over non-blocking mio sockets
//! ([`flush`], [`read`]) so that the load generators stay single-threaded
//! and cheap; the server side ([`server_config`]) is for `tokio-rustls-echo`.

use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, CommonState, DigitallySignedStruct, RootCertStore,
    ServerConfig, SignatureScheme, SupportedProtocolVersion,
};

/// The name the load generators verify the server certificate against.
pub const SERVER_NAME: &str = "localhost";

/// Which TLS versions a client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.2 and 1.3 (1.3 is negotiated with any modern server).
    Any,
    /// TLS 1.2 only.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

static ONLY_TLS12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
static ONLY_TLS13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

impl Versions {
    fn list(self) -> &'static [&'static SupportedProtocolVersion] {
        match self {
            Versions::Any => rustls::ALL_VERSIONS,
            Versions::Tls12 => &ONLY_TLS12,
            Versions::Tls13 => &ONLY_TLS13,
        }
    }
}

impl FromStr for Versions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Versions::Any),
            "1.2" => Ok(Versions::Tls12),
            "1.3" => Ok(Versions::Tls13),
            _ => Err("expected `1.2`, `1.3` or `any`".into()),
        }
    }
}

/// How a client checks the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Full WebPKI verification on every handshake (what a real client does).
    Full,
    /// Full verification the first time a certificate is seen; afterwards
    /// the exact same certificate (byte for byte, no intermediates) is
    /// accepted without re-checking its chain. The handshake signature
    /// (CertificateVerify / ServerKeyExchange) is still verified every time,
    /// so the server's work is unchanged; this only takes one ECDSA
    /// verification and the certificate parsing off the load generator.
    Cached,
}

impl FromStr for Verify {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Verify::Full),
            "cached" => Ok(Verify::Cached),
            _ => Err("expected `full` or `cached`".into()),
        }
    }
}

/// [`Verify::Cached`]: WebPKI verification, remembered per certificate.
#[derive(Debug)]
struct CachedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// End-entity certificates (DER) already verified for [`SERVER_NAME`].
    verified: Mutex<Vec<Vec<u8>>>,
}

impl ServerCertVerifier for CachedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cacheable = intermediates.is_empty() && server_name.to_str().as_ref() == SERVER_NAME;
        if cacheable {
            let seen = self
                .verified
                .lock()
                .is_ok_and(|v| v.iter().any(|c| c[..] == end_entity[..]));
            if seen {
                return Ok(ServerCertVerified::assertion());
            }
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if cacheable {
            if let Ok(mut v) = self.verified.lock() {
                v.push(end_entity.to_vec());
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The crypto provider: aws-lc-rs with its defaults, as plexus uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

fn pem_error(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

/// A client configuration trusting the certificates in `ca`.
///
/// With `resume` the configuration keeps rustls' default in-memory session
/// cache (TLS 1.3 tickets and TLS 1.2 tickets/session ids), so connections
/// made from the same `Arc` resume; without it resumption is disabled and
/// every handshake is a full one. `verify` says how the server certificate
/// is checked (see [`Verify`]).
pub fn client_config(
    ca: &Path,
    versions: Versions,
    resume: bool,
    verify: Verify,
) -> io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| pem_error(ca, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions.list())
        .map_err(io::Error::other)?;
    let mut cfg = match verify {
        Verify::Full => builder.with_root_certificates(roots),
        Verify::Cached => {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(io::Error::other)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CachedVerifier {
                    inner,
                    verified: Mutex::new(Vec::new()),
                }))
        }
    }
    .with_no_client_auth();
    if !resume {
        cfg.resumption = Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// A server configuration for `cert`/`key` (TLS 1.2 and 1.3), with
/// stateless session tickets from aws-lc-rs' `Ticketer`.
pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<ServerConfig>> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    cfg.ticketer = aws_lc_rs::Ticketer::new().map_err(io::Error::other)?;
    Ok(Arc::new(cfg))
}

/// A new client connection to [`SERVER_NAME`].
pub fn connect(cfg: &Arc<ClientConfig>) -> Result<ClientConnection, rustls::Error> {
    let name =
        ServerName::try_from(SERVER_NAME).map_err(|e| rustls::Error::General(e.to_string()))?;
    ClientConnection::new(Arc::clone(cfg), name)
}

/// What was negotiated, e.g. `TLSv1_3/TLS13_AES_256_GCM_SHA384/X25519`
/// (JSON-safe: no quotes or backslashes).
pub fn describe(conn: &CommonState) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".to_owned(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".to_owned(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "?".to_owned(), |g| format!("{:?}", g.name()));
    format!("{version}/{suite}/{group}").replace(['"', '\\'], "")
}

/// Writes queued TLS records to `sock` until none is left or it would block.
///
/// Returns `true` when everything was written (`false`: wait for the
/// writable edge and call again).
pub fn flush<S: Write>(conn: &mut ClientConnection, sock: &mut S) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Why [`read`] failed.
#[derive(Debug)]
pub enum ReadError<E> {
    /// The socket failed.
    Io(io::Error),
    /// The peer sent something rustls rejected (an alert is queued: a
    /// [`flush`] sends it).
    Tls(rustls::Error),
    /// The data callback refused the plaintext.
    Data(E),
}

/// Whether the peer is still there after a [`read`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Open; the socket is drained (wait for the next readable edge).
    Open,
    /// The peer sent close_notify or closed the TCP stream.
    Closed,
}

/// Counts whether the last `read` filled the buffer it was offered.
struct Tracked<'a, S> {
    inner: &'a mut S,
    full: bool,
}

impl<S: Read> Read for Tracked<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.full = n == buf.len();
        Ok(n)
    }
}

/// Reads and processes TLS records from `sock` and hands every piece of
/// plaintext to `on_data`, until the socket is drained.
///
/// "Drained" is either `WouldBlock` or a read that returned less than it
/// was offered: with edge-triggered readiness the next byte to arrive makes
/// a new edge, so the `read` that would only return `WouldBlock` is saved
/// (one `read` per received flight, as in the plain TCP load).
pub fn read<S, E, F>(
    conn: &mut ClientConnection,
    sock: &mut S,
    plain: &mut [u8],
    mut on_data: F,
) -> Result<Peer, ReadError<E>>
where
    S: Read,
    F: FnMut(&[u8]) -> Result<(), E>,
{
    loop {
        let mut tracked = Tracked {
            inner: sock,
            full: false,
        };
        let eof = match conn.read_tls(&mut tracked) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Peer::Open),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        let drained = !tracked.full;
        conn.process_new_packets().map_err(ReadError::Tls)?;
        loop {
            match conn.reader().read(plain) {
                Ok(0) => return Ok(Peer::Closed), // close_notify
                Ok(n) => on_data(&plain[..n]).map_err(ReadError::Data)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // TCP EOF without close_notify, all plaintext consumed.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Peer::Closed),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        if eof {
            return Ok(Peer::Closed);
        }
        if drained {
            return Ok(Peer::Open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;

    /// A fresh self-signed localhost certificate and key, as PEM files.
    fn cert_files(tag: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()]).expect("rcgen");
        let dir = std::env::temp_dir().join(format!("plexus-benches-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
        (cert, key)
    }

    /// A blocking rustls echo server for `conns` connections (it answers
    /// the client's close_notify with its own).
    fn echo_server(cfg: Arc<ServerConfig>, conns: usize) -> (u16, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let t = std::thread::spawn(move || {
            for _ in 0..conns {
                let (sock, _) = listener.accept().expect("accept");
                let conn = rustls::ServerConnection::new(Arc::clone(&cfg)).expect("server conn");
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => tls.write_all(&buf[..n]).expect("echo"),
                    }
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        (port, t)
    }

    /// One client session over a blocking socket with the helpers: handshake,
    /// echo `msg`, close_notify; returns how the handshake went.
    fn client_echo(
        cfg: &Arc<ClientConfig>,
        port: u16,
        msg: &[u8],
    ) -> Option<rustls::HandshakeKind> {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut tls = connect(cfg).expect("client conn");
        let mut buf = [0u8; 1024];
        while tls.is_handshaking() {
            flush(&mut tls, &mut sock).expect("flush");
            let peer = read(&mut tls, &mut sock, &mut buf, |_| Err(()));
            assert_eq!(peer.expect("handshake read"), Peer::Open);
        }
        tls.writer().write_all(msg).expect("plaintext");
        assert!(flush(&mut tls, &mut sock).expect("flush"));
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let peer = read(&mut tls, &mut sock, &mut buf, |d| {
                got.extend_from_slice(d);
                Ok::<(), ()>(())
            });
            assert_eq!(peer.expect("echo read"), Peer::Open);
        }
        assert_eq!(got, msg);
        tls.send_close_notify();
        flush(&mut tls, &mut sock).expect("close_notify");
        let peer = read(&mut tls, &mut sock, &mut buf, |_| Err(()));
        assert_eq!(peer.expect("closing read"), Peer::Closed);
        tls.handshake_kind()
    }

    #[test]
    fn echo_and_resumption_over_loopback() {
        let (cert, key) = cert_files("resume");
        let (port, server) = echo_server(server_config(&cert, &key).expect("server config"), 6);
        for verify in [Verify::Full, Verify::Cached] {
            let full = client_config(&cert, Versions::Any, false, verify).expect("client config");
            let resume = client_config(&cert, Versions::Any, true, verify).expect("client config");
            assert_eq!(
                client_echo(&full, port, b"hello"),
                Some(rustls::HandshakeKind::Full)
            );
            // The first session with the caching config is full, and leaves
            // tickets that the next one uses.
            let _ = client_echo(&resume, port, b"ticket please");
            if verify == Verify::Cached {
                assert_eq!(
                    client_echo(&resume, port, b"again"),
                    Some(rustls::HandshakeKind::Resumed)
                );
            } else {
                assert_eq!(
                    client_echo(&full, port, b"x"),
                    Some(rustls::HandshakeKind::Full)
                );
            }
        }
        server.join().expect("server thread");
        let _ = std::fs::remove_dir_all(cert.parent().expect("dir"));
    }

    #[test]
    fn wrong_ca_is_a_tls_error() {
        let (cert, key) = cert_files("server");
        let (other, _) = cert_files("other-ca");
        let (port, _server) = echo_server(server_config(&cert, &key).expect("server config"), 1);
        let cfg = client_config(&other, Versions::Tls13, false, Verify::Cached).expect("config");
        let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut tls = connect(&cfg).expect("client conn");
        let mut buf = [0u8; 1024];
        let err = loop {
            flush(&mut tls, &mut sock).expect("flush");
            match read(&mut tls, &mut sock, &mut buf, |_| Err(())) {
                Ok(Peer::Open) => continue,
                Ok(Peer::Closed) => panic!("server closed before the client rejected it"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ReadError::Tls(_)), "{err:?}");
        let _ = flush(&mut tls, &mut sock); // the alert
        for f in [&cert, &other] {
            let _ = std::fs::remove_dir_all(f.parent().expect("dir"));
        }
    }

    #[test]
    fn versions_parse() {
        assert_eq!("1.3".parse::<Versions>(), Ok(Versions::Tls13));
        assert_eq!("1.2".parse::<Versions>(), Ok(Versions::Tls12));
        assert_eq!("any".parse::<Versions>(), Ok(Versions::Any));
        assert!("1.1".parse::<Versions>().is_err());
        assert_eq!("cached".parse::<Verify>(), Ok(Verify::Cached));
        assert!("none".parse::<Verify>().is_err());
    }
}
