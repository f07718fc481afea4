//! TLS for stream listeners: certificates (files, SNI, or an ephemeral self-signed one),
//! the rustls server configuration per listener, and certificate reload.
//!
//! All listeners share one [`TlsContext`]: one certificate resolver (so a reload reaches every
//! listener at once) and one session-ticket key. Reload builds the complete new certificate set
//! first and swaps it in only if every file loaded, so a broken file never replaces a working
//! certificate. Handshakes themselves run inside the event loops (see `event_loop`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tracing::info;

use crate::config::{SniConfig, TlsConfig};

/// Names on the ephemeral certificate used when `[tls]` names no certificate.
const EPHEMERAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{path}: no PEM certificate found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM block could not be parsed.
    #[error("{}: invalid PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        source: rustls::pki_types::pem::Error,
    },
    /// The generated ephemeral key could not be used.
    #[error("the generated ephemeral key is unusable: {0}")]
    EphemeralKey(&'static str),
    /// The key is not usable with the certificate (unsupported type, or not its key).
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The ephemeral certificate could not be generated.
    #[error("cannot generate the ephemeral certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// An OCSP response file is not a stapleable OCSP response.
    #[error("{}: {source}", path.display())]
    Ocsp {
        /// The OCSP response file.
        path: PathBuf,
        /// What is wrong with it.
        source: plexus_proto::ocsp::OcspError,
    },
    /// An OCSP response file is larger than any real response.
    #[error("{}: {len} bytes; an OCSP response is at most {max}", path.display())]
    OcspTooLarge {
        /// The OCSP response file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificates in use: a default, and extra ones by server name.
#[derive(Debug)]
struct CertificateSet {
    default: Arc<CertifiedKey>,
    /// The default certificate's private key, for the DTLS (OpenSSL) side.
    default_key: PrivateKeyDer<'static>,
    by_name: Vec<(NamePattern, Arc<CertifiedKey>)>,
}

/// An SNI name as configured: exact, or `*.suffix` matching one label.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    Exact(String),
    Wildcard(String),
}

impl NamePattern {
    fn parse(name: &str) -> NamePattern {
        let name = name.to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(suffix) => NamePattern::Wildcard(suffix.to_owned()),
            None => NamePattern::Exact(name),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact),
            NamePattern::Wildcard(suffix) => name.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && rest.eq_ignore_ascii_case(suffix)
            }),
        }
    }
}

/// Chooses the certificate for a ClientHello; swapped atomically on reload.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertificateSet>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner));
        let chosen = hello
            .server_name()
            .and_then(|name| {
                set.by_name
                    .iter()
                    .find(|(pattern, _)| pattern.matches(name))
            })
            .map_or(&set.default, |(_, key)| key);
        Some(Arc::clone(chosen))
    }
}

/// The TLS state shared by every tls listener of a server.
#[derive(Debug)]
pub(crate) struct TlsContext {
    /// The `[tls]` table the certificates come from; replaced by a reload that changes it.
    config: RwLock<Option<TlsConfig>>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

impl TlsContext {
    /// Loads the configured certificates, or generates the ephemeral one.
    pub(crate) fn new(config: Option<&TlsConfig>) -> Result<TlsContext, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let set = load_certificates(config, &provider)?;
        let tickets = config.is_none_or(|tls| tls.session_tickets);
        let ticketer = if tickets {
            Some(rustls::crypto::aws_lc_rs::Ticketer::new()?)
        } else {
            None
        };
        Ok(TlsContext {
            config: RwLock::new(config.cloned()),
            provider,
            resolver: Arc::new(Resolver {
                current: RwLock::new(Arc::new(set)),
            }),
            ticketer,
        })
    }

    /// The rustls configuration of one listener (its ALPN list; everything else shared).
    pub(crate) fn server_config(&self, alpn: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&self.resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn
            .iter()
            .map(|protocol| protocol.as_bytes().to_vec())
            .collect();
        if let Some(ticketer) = &self.ticketer {
            config.ticketer = Arc::clone(ticketer);
            config.send_tls13_tickets = 2;
        }
        Ok(Arc::new(config))
    }

    /// Re-reads every certificate and key file; on any error the current set stays in use.
    /// Returns how many certificates are now loaded.
    pub(crate) fn reload(&self) -> Result<usize, TlsError> {
        let config = self.tls_config();
        self.reload_from(config.as_ref())
    }

    /// Loads the certificates a new `[tls]` table names; on success they, and the table, replace
    /// the current ones (`session_tickets` is not changed: that needs a restart).
    pub(crate) fn reload_from(&self, config: Option<&TlsConfig>) -> Result<usize, TlsError> {
        let set = load_certificates(config, &self.provider)?;
        let count = set.by_name.len().saturating_add(1);
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config.cloned();
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }

    /// The default certificate chain and its private key (DER), for DTLS listeners: the same
    /// certificate TLS listeners present, whether from `[tls]` or ephemeral.
    pub(crate) fn default_identity(
        &self,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let set = Arc::clone(
            &self
                .resolver
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        );
        (set.default.cert.clone(), set.default_key.clone_key())
    }

    /// Whether certificates come from files (an ephemeral certificate has nothing to reload).
    pub(crate) fn has_files(&self) -> bool {
        self.tls_config()
            .is_some_and(|tls| tls.cert.is_some() || !tls.sni.is_empty())
    }

    fn tls_config(&self) -> Option<TlsConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn load_certificates(
    config: Option<&TlsConfig>,
    provider: &CryptoProvider,
) -> Result<CertificateSet, TlsError> {
    let (default, default_key) =
        match config.and_then(|tls| tls.cert.as_deref().zip(tls.key.as_deref())) {
            Some((cert, key)) => {
                let ocsp = config.and_then(|tls| tls.ocsp.as_deref());
                load_pair(cert, key, ocsp, provider)?
            }
            None => ephemeral(provider)?,
        };
    let mut by_name = Vec::new();
    for sni in config.map_or(&[][..], |tls| &tls.sni[..]) {
        let SniConfig {
            names,
            cert,
            key,
            ocsp,
        } = sni;
        let (certified, _) = load_pair(cert, key, ocsp.as_deref(), provider)?;
        for name in names {
            by_name.push((NamePattern::parse(name), Arc::clone(&certified)));
        }
    }
    Ok(CertificateSet {
        default,
        default_key,
        by_name,
    })
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    ocsp_path: Option<&Path>,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, PrivateKeyDer<'static>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let pem_error = |path: &Path, source: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let cert_pem = read(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(cert_path, err))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key_pem = read(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| pem_error(key_path, err))?;
    let mut certified =
        CertifiedKey::from_der(chain, key.clone_key(), provider).map_err(|source| {
            TlsError::Key {
                path: key_path.to_owned(),
                source,
            }
        })?;
    if let Some(path) = ocsp_path {
        certified.ocsp = Some(load_ocsp(path)?);
    }
    info!(
        "tls certificate loaded cert={} sha256={}{}",
        cert_path.display(),
        certified.cert.first().map_or_else(String::new, fingerprint),
        ocsp_path.map_or(String::new(), |path| format!(
            " ocsp={} (stapled)",
            path.display()
        ))
    );
    Ok((Arc::new(certified), key))
}

/// Reads an OCSP response file and checks it is a successful DER response (its signature and
/// freshness are the client's to verify).
fn load_ocsp(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let max = crate::config::MAX_OCSP_BYTES;
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        // A FIFO put there would block the reload until a writer appears.
        return Err(read_error(std::io::Error::other("not a regular file")));
    }
    let len = meta.len();
    if len > max {
        return Err(TlsError::OcspTooLarge {
            path: path.to_owned(),
            len,
            max,
        });
    }
    let der = std::fs::read(path).map_err(read_error)?;
    plexus_proto::ocsp::check_response(&der).map_err(|source| TlsError::Ocsp {
        path: path.to_owned(),
        source,
    })?;
    Ok(der)
}

fn ephemeral(
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, PrivateKeyDer<'static>), TlsError> {
    let names = EPHEMERAL_NAMES
        .iter()
        .map(|name| (*name).to_owned())
        .collect::<Vec<_>>();
    let generated = rcgen::generate_simple_self_signed(names)?;
    let cert = generated.cert.der().clone();
    let key = PrivateKeyDer::try_from(generated.key_pair.serialize_der())
        .map_err(TlsError::EphemeralKey)?;
    let certified =
        CertifiedKey::from_der(vec![cert], key.clone_key(), provider).map_err(|source| {
            TlsError::Key {
                path: PathBuf::from("<ephemeral>"),
                source,
            }
        })?;
    info!(
        "tls: no [tls] cert configured; using an ephemeral self-signed certificate for {} sha256={}",
        EPHEMERAL_NAMES.join(", "),
        certified.cert.first().map_or_else(String::new, fingerprint)
    );
    Ok((Arc::new(certified), key))
}

/// SHA-256 of a certificate as `AB:CD:…` (the form `openssl x509 -fingerprint` prints).
pub(crate) fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    let mut text = String::with_capacity(95);
    for (index, byte) in digest.as_ref().iter().enumerate() {
        if index > 0 {
            text.push(':');
        }
        let _ = write!(text, "{byte:02X}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_exactly_one_label() {
        let pattern = NamePattern::parse("*.Example.test");
        assert!(pattern.matches("api.example.test"));
        assert!(!pattern.matches("example.test"));
        assert!(!pattern.matches("a.b.example.test"));
        assert!(!pattern.matches(".example.test"));
        assert!(NamePattern::parse("Exact.test").matches("exact.TEST"));
    }

    #[test]
    fn ephemeral_context_builds_and_fingerprint_is_formatted() {
        let context = TlsContext::new(None).unwrap();
        assert!(!context.has_files());
        let config = context.server_config(&["http/1.1".into()]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let set = context.resolver.current.read().unwrap().default.clone();
        let print = fingerprint(&set.cert[0]);
        assert_eq!(print.len(), 95);
        assert!(print.chars().all(|c| c == ':' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn broken_key_file_is_named_and_reload_keeps_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
        let tls = TlsConfig {
            cert: Some(cert),
            key: Some(key.clone()),
            ..TlsConfig::default()
        };
        let context = TlsContext::new(Some(&tls)).unwrap();
        let before = Arc::clone(&context.resolver.current.read().unwrap());

        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = context.reload().unwrap_err().to_string();
        assert!(err.contains("key.pem"), "{err}");
        let after = Arc::clone(&context.resolver.current.read().unwrap());
        assert!(
            Arc::ptr_eq(&before, &after),
            "a failed reload must keep the old certificates"
        );

        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        let mismatch = context.reload().unwrap_err();
        assert!(matches!(mismatch, TlsError::Key { .. }), "{mismatch}");
    }
}
