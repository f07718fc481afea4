//! Fuzzes TLS after protocol detection, as the `auto` group does it on a
//! plain TCP session: the first bytes arrive in arbitrary pieces and are
//! sniffed as they accumulate (`detect::sniff`, with the byte budget rule of
//! `builtin/auto.rs`); on a TLS verdict every byte read so far, and then the
//! rest, is handed to a rustls `ServerConnection` built like the runtime's
//! (aws-lc-rs, TLS 1.3 + 1.2, ALPN, tickets), record by record with
//! `read_tls` / `process_new_packets` as `event_loop::feed_ciphertext` does.
//!
//! Checks: nothing panics; the verdict (and whether there is one yet) is the
//! same however the bytes were cut, byte by byte included; rustls reaches the
//! same error (or none) whether the bytes come in those pieces or at once.
//!
//! Input: byte 0 = mode (bit 0: the payload patches a real ClientHello made
//! by a rustls client at start, three bytes per patch: position high, low,
//! XOR value; otherwise the payload is the stream itself), byte 1 = the seed
//! of the piece sizes, the rest = the payload.
#![no_main]

use std::io::Read;
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use plexus_proto::detect::{sniff, Sniff, MAX_SNIFF_BYTES};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

#[path = "common/http.rs"]
#[allow(dead_code)]
mod http;

/// The server side, as `tls::TlsContext::server_config` builds it, with a
/// certificate rcgen makes once.
static SERVER: LazyLock<Arc<ServerConfig>> = LazyLock::new(|| {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("rcgen makes a certificate");
    let key = PrivateKeyDer::try_from(generated.key_pair.serialize_der()).expect("a DER key");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)
        .expect("the certificate matches its key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().expect("a ticketer");
    config.send_tls13_tickets = 2;
    Arc::new(config)
});

/// A real ClientHello (SNI, ALPN, key shares, every default extension), the
/// start of the patch mode.
static CLIENT_HELLO: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from("localhost").expect("a DNS name");
    let mut client = ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).expect("writes to a Vec");
    }
    hello
});

/// The `auto` group's decision over `pieces`: sniff what accumulated after
/// each piece; the byte budget spent without a verdict means `Other`.
fn detect<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> Sniff {
    let mut seen = Vec::new();
    for piece in pieces {
        seen.extend_from_slice(piece);
        let verdict = match sniff(&seen, false) {
            Sniff::NeedMore if seen.len() >= MAX_SNIFF_BYTES => Sniff::Other,
            verdict => verdict,
        };
        if verdict != Sniff::NeedMore {
            // Bounded as auto.rs says: at most the budget plus one read.
            assert!(seen.len() < MAX_SNIFF_BYTES + piece.len());
            return verdict;
        }
    }
    Sniff::NeedMore
}

/// Feeds `pieces` to a fresh server connection as the event loop does;
/// returns the first error rustls reported (after which the loop closes).
fn handshake<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> Option<rustls::Error> {
    let mut conn = ServerConnection::new(Arc::clone(&SERVER)).expect("a server connection");
    let mut out = Vec::new();
    let mut plain = [0u8; 4096];
    for piece in pieces {
        let mut ciphertext = piece;
        while !ciphertext.is_empty() {
            match conn.read_tls(&mut ciphertext) {
                Ok(0) => return None,
                Ok(_) => {}
                // rustls' buffer is full of what it cannot use: the loop closes.
                Err(_) => return None,
            }
            if let Err(err) = conn.process_new_packets() {
                // The alert the loop writes before closing.
                let _ = conn.write_tls(&mut out);
                return Some(err);
            }
            while conn.wants_write() {
                out.clear();
                conn.write_tls(&mut out).expect("writes to a Vec");
            }
            loop {
                match conn.reader().read(&mut plain) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let [mode, seed, payload @ ..] = data else {
        return;
    };
    let stream = if mode & 1 == 1 {
        let mut hello = CLIENT_HELLO.clone();
        let len = hello.len();
        for patch in payload.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([patch[0], patch[1]])) % len;
            hello[at] ^= patch[2];
        }
        hello
    } else {
        payload.to_vec()
    };

    let verdict = detect(http::pieces(&stream, *seed));
    assert_eq!(verdict, detect(stream.chunks(1)), "byte by byte");
    assert_eq!(verdict, detect(std::iter::once(&stream[..])), "at once");
    if verdict != Sniff::Tls {
        return;
    }
    let cut = handshake(http::pieces(&stream, *seed));
    let whole = handshake(std::iter::once(&stream[..]));
    assert_eq!(cut, whole, "rustls: cut by seed {seed} vs at once");
});
