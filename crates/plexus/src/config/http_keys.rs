//! Value checks of the operator-facing http and TLS keys: `[http] access_log`
//! and `precompressed`, and `[tls] ocsp` (plus `[[tls.sni]] ocsp`). Where each may be
//! set at all is in `rules`; ranges (`access_log_queue`) are in `bounds`.

use std::path::Path;

use super::{AccessLogTarget, Config, PRECOMPRESSED_CODINGS};

/// Reports every bad value of these keys.
pub(super) fn check(config: &Config, problem: &mut impl FnMut(String, String)) {
    let http = &config.http;
    if let Some(AccessLogTarget::File(path)) = http.access_log_target() {
        if let Err(why) = check_log_path(path.as_path()) {
            problem("http.access_log".into(), why);
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for (index, coding) in http.precompressed.iter().enumerate() {
        let key = format!("http.precompressed[{index}]");
        if !PRECOMPRESSED_CODINGS.iter().any(|(name, _)| name == coding) {
            let known: Vec<&str> = PRECOMPRESSED_CODINGS
                .iter()
                .map(|(name, _)| *name)
                .collect();
            problem(
                key,
                format!(
                    "{coding:?} is not a coding plexus serves (known: {})",
                    known.join(", ")
                ),
            );
        } else if seen.contains(&coding.as_str()) {
            problem(key, format!("{coding:?} is listed twice"));
        } else {
            seen.push(coding);
        }
    }
    if !http.precompressed.is_empty() && http.root.is_none() {
        problem(
            "http.precompressed".into(),
            "precompressed variants are files below http.root, which is not set".into(),
        );
    }
    if let Some(tls) = &config.tls {
        if tls.ocsp.is_some() && tls.cert.is_none() {
            problem(
                "tls.ocsp".into(),
                "needs tls.cert: the ephemeral self-signed certificate has no OCSP response".into(),
            );
        }
        let files = tls
            .ocsp
            .iter()
            .map(|path| ("tls.ocsp".to_owned(), path))
            .chain(tls.sni.iter().enumerate().filter_map(|(index, sni)| {
                sni.ocsp
                    .as_ref()
                    .map(|path| (format!("tls.sni[{index}].ocsp"), path))
            }));
        for (key, path) in files {
            if let Err(why) = check_ocsp_file(path) {
                problem(key, why);
            }
        }
    }
}

/// An access log file: an existing regular file this process can append to, or a new one in
/// an existing directory (created on first use, so `--check` creates nothing).
fn check_log_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("must be \"stderr\" or a file path".into());
    }
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(format!("{} is not a regular file", path.display())),
        Ok(_) => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|err| format!("cannot append to {}: {err}", path.display())),
        Err(_) => {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            match std::fs::metadata(parent) {
                Ok(meta) if meta.is_dir() => Ok(()),
                _ => Err(format!(
                    "{}: the directory {} does not exist",
                    path.display(),
                    parent.display()
                )),
            }
        }
    }
}

/// An OCSP response file: readable, regular, and a successful DER OCSP response.
fn check_ocsp_file(path: &Path) -> Result<(), String> {
    // stat first: opening a FIFO put there would block until a writer appears.
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return Err(format!("{} is not a regular file", path.display()))
        }
        Ok(meta) if meta.len() > MAX_OCSP_BYTES => {
            return Err(format!(
                "{}: {} bytes; an OCSP response is at most {MAX_OCSP_BYTES}",
                path.display(),
                meta.len()
            ))
        }
        _ => {}
    }
    let der =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    plexus_proto::ocsp::check_response(&der).map_err(|err| format!("{}: {err}", path.display()))
}

/// The largest OCSP response file accepted (real ones are 1–3 KiB; rustls sends it whole in
/// every handshake).
pub(crate) const MAX_OCSP_BYTES: u64 = 64 * 1024;
