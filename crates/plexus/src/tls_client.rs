//! TLS client configurations, for connectors ([`crate::Upstream::with_tls`]): whom the client
//! trusts, and what it offers.
//!
//! [`ServerTrust`] says how the server's certificate is checked: against the system's roots,
//! against the CAs of one PEM file only, or by pinning one exact certificate. The name checked
//! (and sent as SNI) is the one given to `with_tls`. rustls with the aws-lc-rs provider, TLS
//! 1.3 and 1.2, as the server side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How a TLS client checks the server's certificate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerTrust {
    /// The chain must end at one of the operating system's root certificates.
    SystemRoots,
    /// The chain must end at one of the certificates in this PEM file (and nothing else).
    CaFile(PathBuf),
    /// The server must present exactly this certificate (DER); its chain, name and validity
    /// are not checked, the handshake's signatures are.
    Pinned(CertificateDer<'static>),
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsClientError {
    /// A certificate file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A CA file held no certificate.
    #[error("{0}: no certificate in it")]
    NoCertificate(PathBuf),
    /// A certificate of a CA file was refused as a root.
    #[error("{path}: {source}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The system's root certificates could not be loaded (or there are none).
    #[error("no system root certificates could be loaded")]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("tls client configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The certificate verifier could not be built.
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// An ALPN protocol name is not 1 to 255 bytes.
    #[error("ALPN protocol names are 1 to 255 bytes")]
    Alpn,
}

/// The certificates of a PEM file.
pub fn certificates_from_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsClientError> {
    let pem = |source| TlsClientError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsClientError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// A client configuration that trusts as `trust` says and offers `alpn` (in order of
/// preference; empty = no ALPN). Reads files (and the system store): call it at start-up.
pub fn client_config(
    trust: &ServerTrust,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsClientError> {
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(TlsClientError::Alpn);
    }
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(TlsClientError::NoSystemRoots);
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?
        }
        ServerTrust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates_from_pem(path)? {
                roots
                    .add(cert)
                    .map_err(|source| TlsClientError::BadCertificate {
                        path: path.clone(),
                        source,
                    })?;
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?
        }
        ServerTrust::Pinned(cert) => Arc::new(PinnedCertificate {
            cert: cert.clone(),
            provider,
        }),
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate (the handshake's signatures still verified).
#[derive(Debug)]
struct PinnedCertificate {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match end_entity.as_ref() == self.cert.as_ref() {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses `name` as the server name to verify and send (a DNS name or an IP address).
pub fn server_name(
    name: &str,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(name.to_owned())
}
