//! A dead event loop fails the server (so the process exits 1 and a supervisor restarts it),
//! and an absurd timer from a service does not kill the loop in the first place.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use plexus::{Config, Server, Service, Session, SessionHandler};

/// Echoes; `timer` asks for a timer too far away to represent as an `Instant`, `die` closes
/// the session, whose handler then panics when the loop drops it (callbacks, `on_close`
/// included, are guarded and close only their session; dropping the handler is not a callback,
/// so this panic unwinds the loop thread).
struct Faulty;
struct FaultySession {
    die: bool,
}

impl Service for Faulty {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(FaultySession { die: false })
    }
}

impl SessionHandler for FaultySession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if data.starts_with(b"timer") {
            session.set_timer(Duration::MAX);
        }
        if data.starts_with(b"die") {
            self.die = true;
            session.close();
            return;
        }
        session.send(data);
    }
}

impl Drop for FaultySession {
    fn drop(&mut self) {
        if self.die {
            panic!("the handler's drop panics on purpose (test)");
        }
    }
}

fn config(loops: usize) -> Config {
    let text = format!(
        "[server]\nevent_loops = {loops}\nshutdown_grace = \"5s\"\n[[listener]]\nname = \"f\"\n\
         transport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"faulty\"\n"
    );
    Config::parse(&text, "test").unwrap()
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn echo(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

/// Runs the server on a thread; the receiver gets `run`'s result as a string.
fn run(server: Server) -> mpsc::Receiver<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(server.run().map_err(|err| err.to_string()));
    });
    rx
}

#[test]
fn a_timer_too_far_away_neither_panics_nor_kills_the_loop() {
    let server = Server::builder(config(1))
        .service("faulty", Faulty)
        .build()
        .unwrap();
    let addr = server.local_addr("f").unwrap();
    let handle = server.handle();
    let result = run(server);
    let mut first = connect(addr);
    echo(&mut first, b"timer please");
    // The one loop still serves this session and a new one.
    echo(&mut first, b"still here");
    echo(&mut connect(addr), b"and a new session");
    handle.shutdown();
    let outcome = result.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(outcome, Ok(()));
}

#[test]
fn the_only_loop_dying_makes_run_fail() {
    let server = Server::builder(config(1))
        .service("faulty", Faulty)
        .build()
        .unwrap();
    let addr = server.local_addr("f").unwrap();
    let result = run(server);
    let mut stream = connect(addr);
    echo(&mut stream, b"hello");
    stream.write_all(b"die").unwrap();
    let outcome = result
        .recv_timeout(Duration::from_secs(20))
        .expect("the server stops once its only loop is dead");
    let err = outcome.expect_err("a dead loop must fail Server::run");
    assert!(err.contains("event loop"), "{err}");
}

#[test]
fn one_of_two_loops_dying_makes_run_fail() {
    let server = Server::builder(config(2))
        .service("faulty", Faulty)
        .build()
        .unwrap();
    let addr = server.local_addr("f").unwrap();
    let result = run(server);
    let mut stream = connect(addr);
    echo(&mut stream, b"hello");
    stream.write_all(b"die").unwrap();
    let outcome = result
        .recv_timeout(Duration::from_secs(20))
        .expect("the server stops once a loop is dead");
    assert!(outcome.is_err(), "{outcome:?}");
}
