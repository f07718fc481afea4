//! `plexus connect tls://HOST:PORT`: the TLS client (rustls with the aws-lc-rs provider, TLS 1.2
//! and 1.3).
//!
//! It behaves like `tcp://`: standard input goes to the peer, the peer's plaintext to standard
//! output (binary-safe, flushed per chunk). When standard input ends it sends a TLS
//! `close_notify` and keeps reading until the peer closes (its `close_notify` or TCP EOF), then
//! exits 0.
//!
//! Trust: `--ca FILE` trusts only the certificates in that PEM file — as roots of a chain, and
//! each also as the very certificate a server may present (a self-signed certificate made by
//! `openssl req -x509` carries `CA:TRUE`, which webpki refuses as an end entity; like
//! `curl --cacert` and `openssl s_client -CAfile`, an explicitly trusted certificate is
//! accepted, after its name and validity period are checked); `--insecure` accepts any
//! certificate (the handshake signatures are still checked, chain and name are not); neither
//! uses the system roots. The name checked (and sent as SNI) is `--sni NAME`, else HOST.
//! The trust rules live in [`plexus::tls_client`]; [`trust_of`] maps the options onto them
//! (`connect` and `bench` use it).
//!
//! The connection itself runs on plexus' client runtime, as `tcp://` does
//! ([`crate::connect::relay`]): the library's TLS connector does the handshake (bounded by
//! the handshake timeout) and this module prints its summary line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use plexus::tls_client::{ServerTrust, TlsClientError};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, CommonState};

use crate::connect::TlsUpstream;
use crate::EXIT_USAGE;

/// The `tls://` options of `plexus connect`.
#[derive(Debug, Default)]
pub(crate) struct TlsOptions {
    /// Accept any server certificate (handshake signatures are still verified).
    pub(crate) insecure: bool,
    /// Trust only the certificates in this PEM file.
    pub(crate) ca: Option<PathBuf>,
    /// Server name to send and verify, instead of HOST.
    pub(crate) sni: Option<String>,
    /// ALPN protocols to offer, in order of preference.
    pub(crate) alpn: Vec<String>,
}

/// Connects to `target` (`HOST:PORT`) over TLS and relays standard input and output.
/// Exit 0 on a clean end, 1 on a connection or TLS failure, 2 on bad options.
pub(crate) fn run(target: &str, options: TlsOptions) -> ExitCode {
    let (config, name) = match prepare(target, &options) {
        Ok(prepared) => prepared,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    crate::connect::relay(target, Some(TlsUpstream { config, name }))
}

/// Builds the client configuration and the server name from the options (usage errors only).
fn prepare(
    target: &str,
    options: &TlsOptions,
) -> anyhow::Result<(Arc<ClientConfig>, ServerName<'static>)> {
    let host = host_of(target)?;
    let server_name = match &options.sni {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|_| anyhow!("--sni {name:?} is not a valid DNS name or IP address"))?,
        None => ServerName::try_from(host.to_owned()).map_err(|_| {
            anyhow!("{host:?} is not a valid DNS name; give the name to verify with --sni NAME")
        })?,
    };
    if options.insecure {
        eprintln!(
            "warning: --insecure: the server's certificate is not verified (anyone on the path \
             can impersonate the server)"
        );
    }
    let trust = trust_of(options.insecure, options.ca.as_deref());
    let alpn: Vec<Vec<u8>> = options.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let config = plexus::tls_client::client_config(&trust, &alpn)
        .map_err(|err| option_error(&trust, err))?;
    Ok((config, server_name))
}

/// HOST of `HOST:PORT` (brackets of an IPv6 literal removed); the port must be a number.
fn host_of(target: &str) -> anyhow::Result<&str> {
    let Some((host, port)) = target.rsplit_once(':') else {
        bail!("'tls://{target}' has no port; expected tls://HOST:PORT");
    };
    if port.parse::<u16>().is_err() {
        bail!("'tls://{target}': {port:?} is not a port number; expected tls://HOST:PORT");
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        bail!("'tls://{target}' has no host; expected tls://HOST:PORT");
    }
    Ok(host)
}

/// The trust `--insecure` / `--ca FILE` ask for (the rules live in [`plexus::tls_client`]):
/// any certificate, the certificates of FILE only, or else the system roots. Problems reading
/// the system store are warnings; without any root every certificate is refused at the
/// handshake, with a clear error.
pub(crate) fn trust_of(insecure: bool, ca: Option<&Path>) -> ServerTrust {
    match (insecure, ca) {
        (true, _) => ServerTrust::AnyCertificate,
        (false, Some(path)) => ServerTrust::CaFile(path.to_owned()),
        (false, None) => {
            let native = plexus::tls_client::native_roots();
            for err in &native.errors {
                eprintln!("warning: reading the system root certificates: {err}");
            }
            if native.roots.is_empty() {
                eprintln!(
                    "warning: no system root certificates found: every server certificate will \
                     be rejected (use --ca FILE)"
                );
            }
            ServerTrust::Roots(Arc::new(native.roots))
        }
    }
}

/// A TLS client configuration error in the terms of the options that caused it.
pub(crate) fn option_error(trust: &ServerTrust, err: TlsClientError) -> anyhow::Error {
    match (trust, err) {
        (_, TlsClientError::Alpn) => anyhow!("--alpn: an ALPN protocol name is 1 to 255 bytes"),
        (ServerTrust::CaFile(_), err) => anyhow!("--ca {err}"),
        (_, err) => anyhow!("TLS client configuration: {err}"),
    }
}

/// Prints the one-line handshake summary on standard error.
pub(crate) fn announce(conn: &CommonState) {
    let version = conn
        .protocol_version()
        .map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}"));
    let cipher = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_owned(), |s| format!("{:?}", s.suite()));
    let alpn = conn.alpn_protocol().map_or_else(
        || "none".to_owned(),
        |p| String::from_utf8_lossy(p).into_owned(),
    );
    let fingerprint = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| sha256_hex(leaf.as_ref()))
        .unwrap_or_else(|| "none".to_owned());
    eprintln!(
        "connected tls version={version} cipher={cipher} alpn={alpn} \
         peer_cert_sha256={fingerprint}"
    );
}

/// Lower-case hex SHA-256 of `data`, from the aws-lc-rs provider's SHA-256 (the hash of its
/// `TLS13_AES_128_GCM_SHA256` suite); `None` if that suite is unavailable.
pub(crate) fn sha256_hex(data: &[u8]) -> Option<String> {
    let suite = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13()?;
    let hash = suite.common.hash_provider;
    if hash.algorithm() != rustls::crypto::hash::HashAlgorithm::SHA256 {
        return None;
    }
    let digest = hash.hash(data);
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    Some(hex)
}

/// A TLS error with a hint at the usual cause.
pub(crate) fn describe_tls_error(
    err: &rustls::Error,
    handshaking: bool,
    name: &ServerName<'_>,
) -> String {
    let what = if handshaking {
        "TLS handshake failed"
    } else {
        "TLS error"
    };
    let hint = match err {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer => {
                " (the server's certificate is not issued by a trusted root: pass its CA with \
                 --ca FILE, or skip verification with --insecure)"
                    .to_owned()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    " (the certificate does not name {}: check HOST or pass the name it has \
                     with --sni NAME)",
                    name.to_str()
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                " (check the certificate's validity dates and the system clock)".to_owned()
            }
            _ => String::new(),
        },
        rustls::Error::InvalidMessage(_) if handshaking => {
            " (is the peer speaking TLS on this port?)".to_owned()
        }
        rustls::Error::NoApplicationProtocol => {
            " (the server supports none of the --alpn protocols offered)".to_owned()
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            " (the server supports none of the --alpn protocols offered)".to_owned()
        }
        _ => String::new(),
    };
    format!("{what}: {err}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_parses_targets() {
        assert_eq!(host_of("example.test:443").ok(), Some("example.test"));
        assert_eq!(host_of("127.0.0.1:1").ok(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8443").ok(), Some("::1"));
        for bad in [
            "example.test",
            "example.test:",
            "example.test:http",
            ":443",
            "[]:1",
        ] {
            assert!(host_of(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sha256_hex_of_empty_input() {
        assert_eq!(
            sha256_hex(b"").as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }
}
