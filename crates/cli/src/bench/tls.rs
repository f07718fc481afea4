//! TLS for `plexus bench`: the client configuration from `--insecure`/`--ca`/`--sni`/
//! `--tls-version` (the same trust rules as `plexus connect tls://`), non-blocking record I/O
//! helpers for rustls over mio sockets, and a real ClientHello for handshake-flood.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, SupportedProtocolVersion};

use super::Fail;
use crate::tls_client::{option_error, trust_of};
use plexus::tls_client::ServerTrust;

static BOTH: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
static ONLY_12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
static ONLY_13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

/// The validated TLS options of a run.
#[derive(Debug, Clone)]
pub(crate) struct TlsPlan {
    name: ServerName<'static>,
    insecure: bool,
    trust: ServerTrust,
    versions: &'static [&'static SupportedProtocolVersion],
}

impl TlsPlan {
    /// Checks the options: the name to verify (`--sni`, else HOST), the trust anchors and the
    /// versions.
    pub(crate) fn new(
        host: &str,
        insecure: bool,
        ca: Option<&Path>,
        sni: Option<&str>,
        version: Option<&str>,
    ) -> anyhow::Result<TlsPlan> {
        let name = match sni {
            Some(name) => ServerName::try_from(name.to_owned())
                .map_err(|_| anyhow!("--sni {name:?} is not a valid DNS name or IP address"))?,
            None => ServerName::try_from(host.to_owned()).map_err(|_| {
                anyhow!("{host:?} is not a valid DNS name; give the name to verify with --sni")
            })?,
        };
        let versions: &'static [&'static SupportedProtocolVersion] = match version {
            None => &BOTH,
            Some("1.2") => &ONLY_12,
            Some("1.3") => &ONLY_13,
            Some(other) => bail!("--tls-version {other:?}: expected 1.2 or 1.3"),
        };
        let trust = trust_of(insecure, ca);
        // A --ca file that cannot be used is a usage error now, not at the first connection.
        plexus::tls_client::verifier(&trust, Arc::new(aws_lc_rs::default_provider()))
            .map_err(|err| option_error(&trust, err))?;
        Ok(TlsPlan {
            name,
            insecure,
            trust,
            versions,
        })
    }

    /// A client configuration; `resume` keeps rustls' in-memory session cache (shared by
    /// every connection made from the returned `Arc`), otherwise every handshake is full.
    pub(crate) fn config(&self, resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
        plexus::tls_client::client_config_with(&self.trust, &[], self.versions, resume)
            .map_err(|err| option_error(&self.trust, err))
    }

    /// The name sent (SNI) and verified.
    pub(crate) fn name(&self) -> ServerName<'static> {
        self.name.clone()
    }

    /// Whether certificates are checked (for the report).
    pub(crate) fn verifies_certificates(&self) -> bool {
        !self.insecure
    }

    /// A new client session.
    pub(crate) fn connect(&self, config: &Arc<ClientConfig>) -> Result<ClientConnection, Fail> {
        ClientConnection::new(Arc::clone(config), self.name.clone()).map_err(Fail::from)
    }

    /// The bytes of the first flight (the ClientHello record) a client would send.
    pub(crate) fn client_hello(&self) -> anyhow::Result<Vec<u8>> {
        let config = self.config(false)?;
        let mut conn = ClientConnection::new(config, self.name.clone())
            .map_err(|err| anyhow!("TLS client: {err}"))?;
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }
}

/// Writes queued TLS records to `sock` until none is left (`true`) or it would block
/// (`false`: wait for the writable edge).
pub(crate) fn flush<S: Write>(conn: &mut ClientConnection, sock: &mut S) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// Whether the peer is still there after [`read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// Open; the socket is drained until the next readable edge.
    Open,
    /// close_notify or TCP EOF.
    Closed,
}

/// Remembers whether the last read filled the buffer it was offered.
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

/// Reads and decrypts records from `sock`, handing each piece of plaintext to `on_data`,
/// until the socket is drained. A read shorter than offered means drained: with
/// edge-triggered readiness the next byte makes a new edge, so the read that would only
/// return `WouldBlock` is saved (one read per received flight).
pub(crate) fn read<S: Read>(
    conn: &mut ClientConnection,
    sock: &mut S,
    plain: &mut [u8],
    mut on_data: impl FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<Peer, Fail> {
    loop {
        let mut tracked = Tracked {
            inner: sock,
            full: false,
        };
        let eof = match conn.read_tls(&mut tracked) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Peer::Open),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Fail::from_io(err)),
        };
        let drained = !tracked.full;
        // On error rustls queues an alert; the caller's next flush sends it.
        conn.process_new_packets().map_err(Fail::from)?;
        loop {
            match conn.reader().read(plain) {
                Ok(0) => return Ok(Peer::Closed),
                Ok(n) => on_data(&plain[..n])?,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(Peer::Closed),
                Err(err) => return Err(Fail::from_io(err)),
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
