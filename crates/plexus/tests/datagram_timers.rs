//! Handler timers and drain notifications work on udp sessions as they do on tcp ones:
//! `set_timer` → `on_timer` at the deadline (replaced, cancelled), `notify_when_drained` →
//! `on_drain` once the socket's send queue is down to the low watermark.

use std::net::UdpSocket;
use std::thread;
use std::time::Duration;

use plexus::{Config, Server, Service, Session, SessionHandler};

/// `timer N`: answers `tick` after N ms; `cancel`: cancels it; `drain`: answers `drained`
/// from `on_drain`; anything else is echoed.
struct Timed;
struct TimedSession;

impl Service for Timed {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(TimedSession)
    }
}

impl SessionHandler for TimedSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let text = std::str::from_utf8(data).unwrap_or("");
        if let Some(ms) = text.strip_prefix("timer ") {
            session.set_timer(Duration::from_millis(ms.trim().parse().unwrap_or(10)));
            session.send(b"armed");
        } else if text == "cancel" {
            session.cancel_timer();
            session.send(b"cancelled");
        } else if text == "drain" {
            session.notify_when_drained();
        } else {
            session.send(data);
        }
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        session.send(b"tick");
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        session.send(b"drained");
    }
}

fn start() -> (
    std::net::SocketAddr,
    plexus::ServerHandle,
    thread::JoinHandle<()>,
) {
    let config = Config::parse(
        "[server]\nevent_loops = 1\n\n[[listener]]\nname = \"timed\"\ntransport = \"udp\"\n\
         addr = \"127.0.0.1:0\"\nservice = \"timed\"\n",
        "test",
    )
    .unwrap();
    let server = Server::builder(config)
        .service("timed", Timed)
        .build()
        .unwrap();
    let addr = server.local_addr("timed").unwrap();
    let handle = server.handle();
    let running = thread::spawn(move || server.run().unwrap());
    (addr, handle, running)
}

fn client(addr: std::net::SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket
}

fn ask(socket: &UdpSocket, message: &[u8]) -> Vec<u8> {
    socket.send(message).unwrap();
    receive(socket)
}

fn receive(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).expect("an answer within 10 s");
    buf[..n].to_vec()
}

#[test]
fn a_udp_session_timer_fires_once_and_can_be_replaced_or_cancelled() {
    let (addr, handle, running) = start();
    let socket = client(addr);
    assert_eq!(ask(&socket, b"timer 50"), b"armed");
    assert_eq!(receive(&socket), b"tick");

    // Replaced: only the second deadline fires (one tick, then silence).
    assert_eq!(ask(&socket, b"timer 5000"), b"armed");
    assert_eq!(ask(&socket, b"timer 20"), b"armed");
    assert_eq!(receive(&socket), b"tick");
    assert_eq!(ask(&socket, b"ping"), b"ping");

    // Cancelled: no tick arrives before the echo of a later message.
    assert_eq!(ask(&socket, b"timer 100"), b"armed");
    assert_eq!(ask(&socket, b"cancel"), b"cancelled");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(ask(&socket, b"after"), b"after");

    // Another peer's session has its own timer.
    let other = client(addr);
    assert_eq!(ask(&other, b"timer 10"), b"armed");
    assert_eq!(receive(&other), b"tick");
    handle.stop();
    running.join().unwrap();
}

#[test]
fn a_udp_session_is_told_when_its_socket_queue_has_drained() {
    let (addr, handle, running) = start();
    let socket = client(addr);
    socket.send(b"drain").unwrap();
    assert_eq!(receive(&socket), b"drained");
    // Asking again works again (one notification per request).
    socket.send(b"drain").unwrap();
    assert_eq!(receive(&socket), b"drained");
    assert_eq!(ask(&socket, b"ping"), b"ping");
    handle.stop();
    running.join().unwrap();
}
