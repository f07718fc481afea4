//! Datagram connectors with DTLS, end to end on the library: a udp listener's service opens
//! a DTLS upstream (`Upstream::with_dtls`) to plexus' own dtls echo listener and tells its
//! client what `on_link` reported. With the right pre-shared key the handshake completes
//! (`Connected` after it) and the datagram sent before it arrives and comes back; a wrong key
//! ends the upstream before `Connected` (failed, or out of handshake time); an upstream that never answers the ClientHello runs
//! out of `handshake_timeout` (OpenSSL's retransmissions on the loop's wheel meanwhile).
//!
//! No wall-clock assertions: every wait is a bounded read whose timeout only keeps a broken
//! build from hanging.

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use plexus::{
    Config, DtlsClientConfig, LinkEvent, Server, ServerHandle, Service, Session, SessionHandler,
    SessionId, Upstream,
};

const IO_TIMEOUT: Duration = Duration::from_secs(20);
const KEY: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];

/// Opens a DTLS upstream per session; sends its client `connected` / `closed: REASON`, then
/// relays datagrams both ways.
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
        assert!(session.is_datagram());
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
            LinkEvent::Connected { .. } => session.send(b"connected"),
            LinkEvent::Closed { reason, .. } => {
                session.send(format!("closed: {reason}").as_bytes());
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

/// plexus as the DTLS upstream: a dtls echo listener accepting the PSK identity `sensor`.
fn dtls_echo(dir: &std::path::Path) -> Running {
    let key = dir.join("sensor.hex");
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key, hex).unwrap();
    let text = format!(
        "[server]\nevent_loops = 1\n[tls]\n[[tls.psk]]\nidentity = \"sensor\"\nkey_file = {key:?}\n\
         [[listener]]\nname = \"echo\"\ntransport = \"dtls\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    );
    let config = Config::parse(&text, "upstream").unwrap();
    let server = Server::builder(config)
        .service("echo", plexus_services::Echo)
        .build()
        .unwrap();
    run(server, "echo")
}

/// A udp listener whose service is `Probe` to `upstream`.
fn probe(upstream: Upstream, handshake_timeout: &str) -> Running {
    let text = format!(
        "[server]\nevent_loops = 1\nhandshake_timeout = \"{handshake_timeout}\"\n\
         [[listener]]\nname = \"probe\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\nservice = \"probe\"\n"
    );
    let config = Config::parse(&text, "probe").unwrap();
    let server = Server::builder(config)
        .service("probe", Probe { upstream })
        .build()
        .unwrap();
    run(server, "probe")
}

fn recv(socket: &UdpSocket) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a datagram within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn client(to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    socket.connect(to).unwrap();
    socket
}

#[test]
fn a_dtls_upstream_with_the_right_psk_connects_after_its_handshake_and_relays() {
    let dir = tempfile::tempdir().unwrap();
    let echo = dtls_echo(dir.path());
    let config = DtlsClientConfig::psk("sensor", KEY.to_vec()).unwrap();
    let upstream = Upstream::new("psk-echo", vec![echo.addr])
        .unwrap()
        .with_dtls(config);
    let server = probe(upstream.clone(), "10s");
    let socket = client(server.addr);
    // Sent before the handshake completes: it waits for it, then goes as one record.
    socket.send(b"early").unwrap();
    assert_eq!(recv(&socket), "connected");
    assert_eq!(recv(&socket), "early");
    for payload in ["one", "two", "three"] {
        socket.send(payload.as_bytes()).unwrap();
        assert_eq!(recv(&socket), payload);
    }
    let snapshot = upstream.snapshot();
    assert_eq!((snapshot.connected, snapshot.open), (1, 1));
    assert!(snapshot.bytes_sent > 0 && snapshot.bytes_received > 0);
}

#[test]
fn a_wrong_psk_ends_the_dtls_upstream_before_connected() {
    let dir = tempfile::tempdir().unwrap();
    let echo = dtls_echo(dir.path());
    let config = DtlsClientConfig::psk("sensor", vec![0x42; 16]).unwrap();
    let upstream = Upstream::new("bad-psk", vec![echo.addr])
        .unwrap()
        .with_dtls(config);
    let server = probe(upstream, "1500ms");
    let socket = client(server.addr);
    socket.send(b"hello").unwrap();
    // The server cannot verify the client's Finished: DTLS discards such records silently
    // (or the handshake fails outright), so the handshake fails or runs out of time; either
    // way the opener never hears `Connected`.
    let got = recv(&socket);
    assert!(
        got == "closed: upstream connect timed out" || got.starts_with("closed: upstream failed"),
        "{got}"
    );
}

#[test]
fn a_silent_dtls_upstream_times_out_its_handshake() {
    // Bound, never read: the ClientHello and its retransmissions go unanswered.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = DtlsClientConfig::psk("sensor", KEY.to_vec()).unwrap();
    let upstream = Upstream::new("silent", vec![silent.local_addr().unwrap()])
        .unwrap()
        .with_dtls(config);
    let server = probe(upstream, "2500ms");
    let socket = client(server.addr);
    socket.send(b"hello").unwrap();
    assert_eq!(recv(&socket), "closed: upstream connect timed out");
    // OpenSSL retransmitted its flight meanwhile (its first timer is one second, well inside
    // the handshake's 2.5 s).
    let mut buf = [0u8; 2048];
    silent.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut hellos = 0;
    silent.set_nonblocking(true).unwrap();
    while silent.recv(&mut buf).is_ok() {
        hellos += 1;
    }
    assert!(hellos >= 2, "a ClientHello and a retransmission: {hellos}");
}
