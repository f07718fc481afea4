//! TLS connectors end to end: a library service opens a TLS upstream (`Upstream::with_tls`)
//! to plexus' own tls listener (echo) and tells its client what `on_link` reported.
//! `LinkEvent::Connected` comes after the TLS handshake, not at the TCP connect: an upstream
//! that accepts TCP and never answers the ClientHello, or one whose certificate is not
//! trusted, never reports `Connected` — the opener hears `Closed` only.
//!
//! No wall-clock assertions: every wait is a bounded read whose timeout only keeps a broken
//! build from hanging.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use plexus::tls_client::{client_config, server_name, ServerTrust};
use plexus::{
    Config, LinkEvent, Server, ServerHandle, Service, Session, SessionHandler, SessionId, Upstream,
};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens a TLS upstream per session; reports `connected` / `closed: REASON` to its client,
/// then relays lines both ways.
struct Probe {
    upstream: Upstream,
}

struct ProbeClient {
    upstream: SessionId,
}

struct ProbeUpstream {
    client: SessionId,
}

impl Service for Probe {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let client = session.id();
        let upstream = session.connect(&self.upstream, Box::new(ProbeUpstream { client }));
        Box::new(ProbeClient { upstream })
    }
}

impl SessionHandler for ProbeClient {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.upstream, data);
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        match event {
            LinkEvent::Connected { .. } => session.send(b"connected\n"),
            LinkEvent::Closed { reason, .. } => {
                session.send(format!("closed: {reason}\n").as_bytes());
                session.close();
            }
            _ => {}
        }
    }
}

impl SessionHandler for ProbeUpstream {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.client, data);
    }
}

/// A running server, shut down on drop.
struct Running {
    handle: ServerHandle,
    addr: SocketAddr,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(server: Server, listener: &str) -> Running {
    let addr = server.local_addr(listener).unwrap();
    let handle = server.handle();
    let thread = thread::spawn(move || server.run().unwrap());
    Running {
        handle,
        addr,
        thread: Some(thread),
    }
}

/// A self-signed certificate for `localhost` written to `dir` as `NAME.pem` / `NAME.key`.
fn certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// plexus itself as the TLS upstream: a tls listener running echo with `cert`/`key`.
fn tls_echo(cert: &Path, key: &Path) -> Running {
    let text = format!(
        "[server]\nevent_loops = 1\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [[listener]]\nname = \"echo\"\ntransport = \"tls\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    );
    let config = Config::parse(&text, "upstream").unwrap();
    let server = Server::builder(config)
        .service("echo", plexus_services::Echo)
        .build()
        .unwrap();
    run(server, "echo")
}

/// The probe in front of `upstream`, trusting `trust`.
fn probe(upstream: SocketAddr, trust: &ServerTrust) -> Running {
    let text = "[server]\nevent_loops = 1\nhandshake_timeout = \"1s\"\n[[listener]]\n\
                name = \"probe\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"probe\"\n";
    let config = Config::parse(text, "probe").unwrap();
    let upstream = Upstream::new("tls-upstream", vec![upstream])
        .unwrap()
        .with_tls(
            client_config(trust, &[]).unwrap(),
            server_name("localhost").unwrap(),
        );
    let server = Server::builder(config)
        .service("probe", Probe { upstream })
        .build()
        .unwrap();
    run(server, "probe")
}

fn client(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("a line within the timeout");
    line
}

#[test]
fn connected_comes_after_the_handshake_and_bytes_flow_through_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "upstream");
    let upstream = tls_echo(&cert, &key);
    let relay = probe(upstream.addr, &ServerTrust::CaFile(cert));
    let (mut stream, mut reader) = client(relay.addr);
    assert_eq!(line(&mut reader), "connected\n");
    stream.write_all(b"through tls\n").unwrap();
    assert_eq!(line(&mut reader), "through tls\n");
}

#[test]
fn an_upstream_that_never_answers_the_client_hello_is_never_connected() {
    // Accepts TCP (the kernel completes the connect) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = thread::spawn(move || silent.accept().map(|(stream, _)| stream));
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(dir.path(), "unused");
    let relay = probe(addr, &ServerTrust::CaFile(cert));
    let (_stream, mut reader) = client(relay.addr);
    let first = line(&mut reader);
    assert!(
        first.starts_with("closed: "),
        "the handshake timeout ends it before any Connected: {first:?}"
    );
    let _held = holder.join().unwrap();
}

#[test]
fn an_untrusted_certificate_is_never_connected() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "upstream");
    let (other, _) = certificate(dir.path(), "other");
    let upstream = tls_echo(&cert, &key);
    let relay = probe(upstream.addr, &ServerTrust::CaFile(other));
    let (_stream, mut reader) = client(relay.addr);
    let first = line(&mut reader);
    assert!(
        first.starts_with("closed: ") && first.contains("tls"),
        "refused certificate, no Connected first: {first:?}"
    );
    // Pinning the upstream's own certificate is accepted.
    let der = CertificateDer::from_pem_file(&cert).unwrap();
    let pinned = probe(upstream.addr, &ServerTrust::Pinned(der));
    let (_stream, mut reader) = client(pinned.addr);
    assert_eq!(line(&mut reader), "connected\n");
}
