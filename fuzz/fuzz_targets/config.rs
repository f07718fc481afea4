//! Fuzzes the configuration loader with arbitrary TOML text: what
//! `plexus serve --config FILE --check` does (`Config::parse`, then
//! `Server::builder(config).validate()`), and what `--print-config` does
//! (`Config::to_toml`).
//!
//! Each input is loaded twice: as it is, and with a valid `[[listener]]`
//! appended (most fragments fail only for lacking one).
//!
//! Checks: nothing panics; a refused file names at least one problem and
//! prints; an accepted file prints as TOML that parses back to the same
//! configuration; and every value of a configuration that validates is within
//! the bounds docs/CONFIG.md documents (see `check_bounds`), including that
//! every duration it accepts can be added to `Instant::now()` without
//! overflowing (issue 13, defect 6: `idle_timeout = "500000000000years"` once
//! passed `--check` and then panicked the event loop).
//!
//! The loader touches the outside world in two places, which the target
//! redirects before validating so a run stays hermetic and cannot hang:
//! file paths (certificates, keys, PSK key files, `http.root`: a FIFO or
//! `/dev/zero` would block or never end) are mapped onto four fixed paths
//! made at start (missing, a directory, a valid hex key, a non-key file),
//! chosen by the original path; an `upstream` that would need a name lookup
//! gets host `127.0.0.1` with its port kept.
#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use plexus::config::{Config, Transport};
use plexus::Server;

/// Files the configuration's paths are mapped onto (kept for the whole run).
struct Files {
    _dir: PathBuf,
    paths: [PathBuf; 4],
}

static FILES: LazyLock<Files> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("plexus-fuzz-config-{}", std::process::id()));
    let sub = dir.join("root");
    std::fs::create_dir_all(&sub).expect("a temporary directory");
    let key = dir.join("key.hex");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").expect("a key file");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "-----BEGIN NOTHING-----\nzz\n").expect("a junk file");
    Files {
        paths: [dir.join("missing"), sub, key, junk],
        _dir: dir,
    }
});

fn redirect(path: &mut PathBuf) {
    let choice = path.as_os_str().len() % 4;
    *path = FILES.paths[choice].clone();
}

/// Makes validation hermetic (see the module docs).
fn hermetic(config: &mut Config) {
    if let Some(tls) = config.tls.as_mut() {
        tls.cert
            .iter_mut()
            .chain(tls.key.iter_mut())
            .for_each(redirect);
        for sni in &mut tls.sni {
            redirect(&mut sni.cert);
            redirect(&mut sni.key);
        }
        for psk in &mut tls.psk {
            redirect(&mut psk.key_file);
        }
    }
    if let Some(root) = config.http.root.as_mut() {
        redirect(root);
    }
    for listener in &mut config.listeners {
        if let Some(upstream) = listener.upstream.as_mut() {
            if upstream.parse::<SocketAddr>().is_err() {
                if let Some((_, port)) = upstream.rsplit_once(':') {
                    if port.parse::<u16>().is_ok() {
                        *upstream = format!("127.0.0.1:{port}");
                    }
                }
            }
        }
    }
}

/// The bounds docs/CONFIG.md states for a configuration `--check` accepts.
fn check_bounds(config: &Config) {
    let server = &config.server;
    assert!(server.max_connections >= 1);
    assert!(server.worker_queue >= 1);
    assert!(server.worker_session_limit >= 1);
    assert!(server.max_handshakes >= 1);
    assert!(server.outbound_low_watermark < server.outbound_high_watermark);
    assert!(server.outbound_limit >= server.outbound_high_watermark);
    for duration in [
        server.idle_timeout,
        server.handshake_timeout,
        config.http.header_timeout,
    ] {
        assert!(!duration.is_zero());
    }
    assert!(config.chat.max_line_bytes >= 1);
    assert!(config.http.max_header_bytes >= 64);
    assert!(config.http.max_uri_bytes >= 64);
    if let Some(tls) = &config.tls {
        assert_eq!(tls.cert.is_some(), tls.key.is_some());
        for sni in &tls.sni {
            assert!(!sni.names.is_empty());
        }
        for psk in &tls.psk {
            assert!((1..=128).contains(&psk.identity.len()));
        }
    }
    assert!(!config.listeners.is_empty());
    let mut names = std::collections::HashSet::new();
    for listener in &config.listeners {
        assert!(!listener.name.is_empty());
        assert!(names.insert(&listener.name), "duplicate name accepted");
        assert!(listener.addr.parse::<SocketAddr>().is_ok());
        assert!(listener.backlog >= 1);
        assert!(listener.alpn.iter().all(|p| (1..=255).contains(&p.len())));
        assert_eq!(listener.upstream.is_some(), listener.service == "forward");
        if matches!(listener.transport, Transport::Udp | Transport::Dtls) {
            assert!((256..=16_384).contains(&listener.mtu));
            assert!((1..=1024).contains(&listener.datagram_batch));
            assert!(!matches!(listener.service.as_str(), "forward" | "chat"));
        }
    }
    // Every accepted duration is usable as a deadline from now (config/bounds.rs caps them).
    let now = Instant::now();
    let mut durations: Vec<Duration> = vec![
        server.idle_timeout,
        server.handshake_timeout,
        server.shutdown_grace,
        server.drain_delay,
        server.upgrade_timeout,
        config.http.header_timeout,
        config.http.file_cache_valid,
    ];
    for listener in &config.listeners {
        durations.extend(listener.keepalive);
        durations.extend(listener.linger);
    }
    for duration in durations {
        assert!(now.checked_add(duration).is_some(), "{duration:?} accepted");
    }
}

/// Appended to every input for a second run: most fragments of a file are
/// refused only for lacking a listener, so with one the values they set reach
/// validation and `check_bounds`.
const LISTENER: &str = "
[[listener]]
name = \"fuzz\"
transport = \"tcp\"
addr = \"127.0.0.1:0\"
service = \"echo\"
";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    load(text);
    load(&format!("{text}{LISTENER}"));
});

/// What `--print-config` and `--check` do with `text`, checked.
fn load(text: &str) {
    let config = match Config::parse(text, "fuzz.toml") {
        Ok(config) => config,
        Err(err) => {
            assert!(!err.problems.is_empty());
            let _ = err.to_string();
            return;
        }
    };
    // --print-config: prints, and what it prints reads back the same.
    let printed = config.to_toml();
    match Config::parse(&printed, "printed.toml") {
        Ok(again) => assert_eq!(again, config, "print-config round trip:\n{printed}"),
        Err(err) => panic!("print-config output does not parse: {err}\n{printed}"),
    }
    let mut config = config;
    hermetic(&mut config);
    match Server::builder(config).validate() {
        Ok(valid) => {
            check_bounds(&valid.config);
            assert_eq!(valid.listeners.len(), valid.config.listeners.len());
        }
        Err(err) => {
            assert!(!err.problems.is_empty());
            let _ = err.to_string();
        }
    }
}
