//! `plexus cert`: writes a self-signed certificate and its private key (PEM) for tls listeners
//! and tests.
//!
//! `plexus cert --out DIR [--name NAME]... [--days N] [--force]` generates an ECDSA P-256 key
//! and a certificate for the names (default `localhost`, `127.0.0.1`, `::1`; IP addresses
//! become IP subject alternative names, the rest DNS names, `*.` wildcards allowed) and writes
//! `DIR/cert.pem` and `DIR/key.pem` (PKCS#8, mode 0600), creating DIR. Existing files are kept
//! unless `--force`. Exit 0, 1 on an I/O failure or existing files, 2 on bad arguments.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::DnsName;

use crate::tls_client::sha256_hex;
use crate::EXIT_USAGE;

/// Names used when no `--name` is given.
const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// The certificate is valid from this long before now (tolerates clock skew between hosts).
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, Args)]
pub(crate) struct CertArgs {
    /// Directory to write cert.pem and key.pem into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A name the certificate is for (repeatable): DNS name, `*.` wildcard or IP address.
    /// Default: localhost, 127.0.0.1, ::1.
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Validity in days, from now.
    #[arg(long, value_name = "N", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
    /// Overwrite existing cert.pem and key.pem.
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: CertArgs) -> ExitCode {
    let names = match check_names(&args.names) {
        Ok(names) => names,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (cert_pem, key_pem, fingerprint) = match generate(&names, args.days) {
        Ok(generated) => generated,
        Err(err) => {
            eprintln!("error: generating the certificate: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cert_path = args.out.join("cert.pem");
    let key_path = args.out.join("key.pem");
    if let Err(err) = write_pair(
        &args.out, &cert_path, &key_path, &cert_pem, &key_pem, args.force,
    ) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "wrote {} (self-signed; names: {}; valid {} days; sha256 {})",
        cert_path.display(),
        names.join(", "),
        args.days,
        fingerprint.as_deref().unwrap_or("unavailable"),
    );
    eprintln!("wrote {} (private key, mode 0600)", key_path.display());
    ExitCode::SUCCESS
}

/// The names to certify (the defaults if none), de-duplicated; each must be an IP address, a
/// DNS name, or `*.` followed by a DNS name.
fn check_names(given: &[String]) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    let given: Vec<String> = if given.is_empty() {
        DEFAULT_NAMES.iter().map(|n| (*n).to_owned()).collect()
    } else {
        given.to_vec()
    };
    for name in given {
        let valid = name.parse::<IpAddr>().is_ok()
            || DnsName::try_from(name.strip_prefix("*.").unwrap_or(&name)).is_ok();
        if !valid {
            return Err(format!(
                "--name {name:?} is not a DNS name, a *. wildcard name or an IP address"
            ));
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// A new key pair and a self-signed certificate for `names`, valid `days` days from now:
/// (certificate PEM, key PEM, certificate SHA-256 in hex).
fn generate(names: &[String], days: u32) -> Result<(String, String, Option<String>), String> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params
        .distinguished_name
        .push(DnType::OrganizationName, "plexus self-signed");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_owned())?;
    let start = now.saturating_sub(BACKDATE);
    let end = now + Duration::from_secs(u64::from(days) * 86_400);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + start;
    params.not_after = epoch + end;

    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let fingerprint = sha256_hex(cert.der());
    Ok((cert.pem(), key.serialize_pem(), fingerprint))
}

/// Creates `dir` and writes the key (mode 0600) and the certificate (0644); unless `force`,
/// fails without writing anything if either file exists.
fn write_pair(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &str,
    key_pem: &str,
    force: bool,
) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if !force {
        for path in [cert_path, key_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(format!(
                    "{} already exists (use --force to overwrite)",
                    path.display()
                ));
            }
        }
    }
    write_file(key_path, key_pem.as_bytes(), 0o600, force)
        .map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    write_file(cert_path, cert_pem.as_bytes(), 0o644, force)
        .map_err(|e| format!("writing {}: {e}", cert_path.display()))
}

/// Writes `contents` to `path` with permissions `mode` (also when replacing an existing file,
/// before anything is written); without `force` the file must not exist.
fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_dedupe_and_validate() {
        assert_eq!(
            check_names(&[]).ok(),
            Some(DEFAULT_NAMES.map(str::to_owned).to_vec())
        );
        let given = ["a.test", "*.b.test", "10.0.0.1", "a.test", "fe80::1"].map(str::to_owned);
        assert_eq!(
            check_names(&given).ok(),
            Some(
                ["a.test", "*.b.test", "10.0.0.1", "fe80::1"]
                    .map(str::to_owned)
                    .to_vec()
            )
        );
        for bad in ["", "a b", "*.", "a..b"] {
            assert!(check_names(&[bad.to_owned()]).is_err(), "{bad:?} accepted");
        }
    }
}
