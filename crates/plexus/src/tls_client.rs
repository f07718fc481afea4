//! TLS client configurations, for connectors ([`crate::Upstream::with_tls`]) and for client
//! programs (`plexus connect`, `plexus bench`): whom the client trusts, and what it offers. This
//! is the one place plexus' client-side trust rules live.
//!
//! [`ServerTrust`] says how the server's certificate is checked: against the system's roots,
//! against roots the program holds, against the certificates of one PEM file (as roots, and each
//! also as the very certificate a server may present, the way `curl --cacert` and
//! `openssl s_client -CAfile` accept a self-signed certificate), by pinning one exact
//! certificate, or not at all (`--insecure`: only the handshake signatures are checked). The name
//! checked (and sent as SNI) is the one given to the handshake. [`verifier`] builds the rustls
//! verifier for a configuration a program assembles itself (its own versions, resumption);
//! [`client_config`] builds a whole configuration: rustls with the aws-lc-rs provider, TLS 1.3
//! and 1.2, as the server side.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The three [`ServerCertVerifier`] methods every verifier here shares: the handshake's
/// signatures are checked with `self.provider`'s algorithms, as webpki would.
macro_rules! handshake_signatures_checked_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            verify_tls12_signature(message, cert, dss, algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            verify_tls13_signature(message, cert, dss, algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// How a TLS client checks the server's certificate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerTrust {
    /// The chain must end at one of the operating system's root certificates (an error when
    /// the system has none).
    SystemRoots,
    /// The chain must end at one of these roots. An empty store refuses every certificate at
    /// the handshake (what a client without system roots gets from [`native_roots`]).
    Roots(Arc<RootCertStore>),
    /// The certificates of this PEM file, and nothing else: as roots of the chain, and each as
    /// a certificate the server may present itself (its name and validity period are checked,
    /// as for any certificate).
    CaFile(PathBuf),
    /// The server must present exactly this certificate (DER); its chain, name and validity
    /// are not checked, the handshake's signatures are.
    Pinned(CertificateDer<'static>),
    /// Any certificate for any name (`--insecure`): only the handshake's signatures are
    /// checked, so the peer holds the key of the certificate it shows, whoever it is. Anyone
    /// on the path can impersonate the server.
    AnyCertificate,
}

/// The operating system's root certificates, and what went wrong reading them.
#[derive(Debug)]
#[non_exhaustive]
pub struct NativeRoots {
    /// The roots that parsed (possibly none).
    pub roots: RootCertStore,
    /// Problems met while reading the system's store (each worth a warning).
    pub errors: Vec<rustls_native_certs::Error>,
}

/// Reads the system's root certificates (rustls-native-certs). Reads files: call it at start.
pub fn native_roots() -> NativeRoots {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    NativeRoots {
        roots,
        errors: loaded.errors,
    }
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

/// The rustls verifier that checks a server's certificate as `trust` says, with `provider`'s
/// signature algorithms. Reads files (and the system store): call it at start-up.
pub fn verifier(
    trust: &ServerTrust,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsClientError> {
    Ok(match trust {
        ServerTrust::SystemRoots => {
            let native = native_roots();
            if native.roots.is_empty() {
                return Err(TlsClientError::NoSystemRoots);
            }
            TrustVerifier::shared(Arc::new(native.roots), Vec::new(), provider)?
        }
        ServerTrust::Roots(roots) => {
            TrustVerifier::shared(Arc::clone(roots), Vec::new(), provider)?
        }
        ServerTrust::CaFile(path) => {
            let certs = certificates_from_pem(path)?;
            let mut roots = RootCertStore::empty();
            for cert in &certs {
                roots
                    .add(cert.clone())
                    .map_err(|source| TlsClientError::BadCertificate {
                        path: path.clone(),
                        source,
                    })?;
            }
            TrustVerifier::shared(Arc::new(roots), certs, provider)?
        }
        ServerTrust::Pinned(cert) => Arc::new(PinnedCertificate {
            cert: Some(cert.clone()),
            provider,
        }),
        ServerTrust::AnyCertificate => Arc::new(PinnedCertificate {
            cert: None,
            provider,
        }),
    })
}

/// A client configuration that trusts as `trust` says and offers `alpn` (in order of
/// preference; empty = no ALPN), TLS 1.3 and 1.2, with rustls' in-memory session cache
/// (resumption). Reads files (and the system store): call it at start-up.
pub fn client_config(
    trust: &ServerTrust,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsClientError> {
    client_config_with(
        trust,
        alpn,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        true,
    )
}

/// [`client_config`] with a choice of protocol `versions`, and of `resumption`: `true` keeps
/// rustls' in-memory session cache (shared by every connection made from the returned
/// configuration), `false` makes every handshake a full one (a load generator measuring
/// handshakes).
pub fn client_config_with(
    trust: &ServerTrust,
    alpn: &[Vec<u8>],
    versions: &[&'static rustls::SupportedProtocolVersion],
    resumption: bool,
) -> Result<Arc<ClientConfig>, TlsClientError> {
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(TlsClientError::Alpn);
    }
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)?;
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier(trust, provider)?)
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// webpki's chain verification, except that a certificate byte-identical to one of `accepted`
/// is trusted as presented, once its name and validity period check out.
#[derive(Debug)]
struct TrustVerifier {
    /// `None` when there is no root: every other certificate is refused.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    accepted: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl TrustVerifier {
    /// The verifier, shared as rustls takes it.
    fn shared(
        roots: Arc<RootCertStore>,
        accepted: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ServerCertVerifier>, TlsClientError> {
        let webpki = match roots.is_empty() {
            true => None,
            false => Some(
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()?,
            ),
        };
        Ok(Arc::new(TrustVerifier {
            webpki,
            accepted,
            provider,
        }))
    }
}

impl ServerCertVerifier for TrustVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .accepted
            .iter()
            .any(|trusted| trusted.as_ref() == end_entity.as_ref())
        {
            check_validity(end_entity, now)?;
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, server_name)?;
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    handshake_signatures_checked_by_provider!();
}

/// The certificate's notBefore ≤ `now` ≤ notAfter (the check webpki makes on every chain).
fn check_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let bad = |_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let x509 = openssl::x509::X509::from_der(cert.as_ref()).map_err(bad)?;
    let seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let now = openssl::asn1::Asn1Time::from_unix(seconds).map_err(bad)?;
    if x509.not_before().compare(&now).map_err(bad)? == Ordering::Greater {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if x509.not_after().compare(&now).map_err(bad)? == Ordering::Less {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// Accepts exactly one certificate, or any with `cert: None` (the handshake's signatures are
/// verified either way).
#[derive(Debug)]
struct PinnedCertificate {
    cert: Option<CertificateDer<'static>>,
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
        let accepted = match &self.cert {
            Some(cert) => end_entity.as_ref() == cert.as_ref(),
            None => true,
        };
        match accepted {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    handshake_signatures_checked_by_provider!();
}

/// Parses `name` as the server name to verify and send (a DNS name or an IP address).
pub fn server_name(
    name: &str,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` (`CA:TRUE`, as `openssl req -x509` makes), in DER
    /// and PEM.
    fn self_signed(name: &str) -> (CertificateDer<'static>, String) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        (cert.der().clone(), cert.pem())
    }

    fn check(
        verifier: &Arc<dyn ServerCertVerifier>,
        cert: &CertificateDer<'_>,
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name(name).expect("server name");
        verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(aws_lc_rs::default_provider())
    }

    #[test]
    fn a_ca_files_own_self_signed_certificate_is_trusted_for_its_name_only() {
        let (der, pem) = self_signed("upstream.test");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pem).expect("write");
        let verifier = verifier(&ServerTrust::CaFile(path), provider()).expect("verifier");
        assert!(check(&verifier, &der, "upstream.test").is_ok());
        let wrong_name = check(&verifier, &der, "other.test");
        assert!(
            matches!(wrong_name, Err(rustls::Error::InvalidCertificate(_))),
            "{wrong_name:?}"
        );
        let (stranger, _) = self_signed("upstream.test");
        assert!(check(&verifier, &stranger, "upstream.test").is_err());
    }

    #[test]
    fn an_expired_certificate_of_the_ca_file_is_refused() {
        let mut params =
            rcgen::CertificateParams::new(vec!["old.test".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, cert.pem()).expect("write");
        let verifier = verifier(&ServerTrust::CaFile(path), provider()).expect("verifier");
        assert_eq!(
            check(&verifier, cert.der(), "old.test").err(),
            Some(rustls::Error::InvalidCertificate(CertificateError::Expired))
        );
    }

    #[test]
    fn no_roots_refuse_every_certificate_and_any_certificate_accepts_all() {
        let (der, _) = self_signed("a.test");
        let empty = ServerTrust::Roots(Arc::new(RootCertStore::empty()));
        let refusing = verifier(&empty, provider()).expect("verifier");
        assert_eq!(
            check(&refusing, &der, "a.test").err(),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
        let any = verifier(&ServerTrust::AnyCertificate, provider()).expect("verifier");
        assert!(check(&any, &der, "b.test").is_ok());
        let pinned = verifier(&ServerTrust::Pinned(der.clone()), provider()).expect("verifier");
        assert!(check(&pinned, &der, "b.test").is_ok());
        let (other, _) = self_signed("a.test");
        assert!(check(&pinned, &other, "a.test").is_err());
    }

    #[test]
    fn files_that_hold_no_certificate_and_bad_alpn_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "no certificate here\n").expect("write");
        let err = verifier(&ServerTrust::CaFile(path), provider()).err();
        assert!(
            matches!(err, Some(TlsClientError::NoCertificate(_))),
            "{err:?}"
        );
        let missing = ServerTrust::CaFile(dir.path().join("missing.pem"));
        assert!(matches!(
            verifier(&missing, provider()).err(),
            Some(TlsClientError::Pem { .. })
        ));
        assert!(matches!(
            client_config(&ServerTrust::AnyCertificate, &[Vec::new()]).err(),
            Some(TlsClientError::Alpn)
        ));
    }
}
