//! Broadcasts between event loops are never dropped: when the receiving loop has no room, the
//! sending loop keeps them, in order, and stops reading the sender until they are handed over.
//!
//! The service broadcasts every byte it reads as its own message, so one 64 KiB read becomes
//! 65,536 broadcasts: far more than a loop may have in flight towards another (half its
//! 65,536-command channel), while the receiving loop is held up by a member whose handler
//! blocks (`!`; a stand-in for a loop busy with other work) until the sender has stalled.
//! Before, what did not fit
//! was dropped with a debug log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use plexus::{Config, Server, ServerHandle, Service, Session, SessionHandler};
use plexus_testkit::sessions_on_loops;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Lets the blocked loop go on.
static RELEASE: AtomicBool = AtomicBool::new(false);

struct Bytewise;
struct BytewiseSession;

impl Service for Bytewise {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(BytewiseSession)
    }
}

impl SessionHandler for BytewiseSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if data == b"!" {
            // Holds this loop up (on purpose: a test of what the other loop does meanwhile)
            // until the test has seen the sender stall, or 30 s at most.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !RELEASE.load(Ordering::Acquire) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        for byte in data {
            session.broadcast(std::slice::from_ref(byte));
        }
    }
}

struct Running {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<thread::JoinHandle<Result<(), plexus::Error>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start() -> Running {
    // Receivers' queues may hold every one-byte message (64 B of bookkeeping each) if they
    // fall behind: the limit is set so that only the loop-to-loop path is under test.
    let text = "[server]\nevent_loops = 2\noutbound_limit = 67108864\n\
                [[listener]]\nname = \"bytes\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
                service = \"bytewise\"\n";
    let config = Config::parse(text, "test").unwrap();
    let server = Server::builder(config)
        .service("bytewise", Bytewise)
        .build()
        .unwrap();
    let addr = server.local_addr("bytes").unwrap();
    let handle = server.handle();
    let thread = Some(thread::spawn(move || server.run()));
    Running {
        addr,
        handle,
        thread,
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn a_flood_of_broadcasts_to_another_loop_arrives_whole_and_in_order() {
    const TOTAL: usize = 512 * 1024;
    let server = start();
    // The sender and `near` on loop 0, `far` and `blocker` on loop 1.
    let placed = sessions_on_loops(&server.handle, server.addr, &[2, 2], READ_TIMEOUT);
    let [on_0, on_1]: [Vec<TcpStream>; 2] = placed.try_into().expect("two loops");
    let [mut sender, near]: [TcpStream; 2] = on_0.try_into().expect("two on loop 0");
    let [far, mut blocker]: [TcpStream; 2] = on_1.try_into().expect("two on loop 1");
    let expected = pattern(TOTAL);
    let readers: Vec<_> = [("far", far), ("near", near)]
        .into_iter()
        .map(|(who, mut stream)| {
            let expected = expected.clone();
            thread::spawn(move || -> Result<(), String> {
                let mut got = vec![0u8; TOTAL];
                stream
                    .read_exact(&mut got)
                    .map_err(|e| format!("{who}: {e}"))?;
                match got.iter().zip(&expected).position(|(a, b)| a != b) {
                    None => Ok(()),
                    Some(at) => Err(format!("{who}: byte {at} differs")),
                }
            })
        })
        .collect();
    blocker.write_all(b"!").unwrap();
    thread::sleep(Duration::from_millis(100));
    let flood = expected.clone();
    let writer = thread::spawn(move || sender.write_all(&flood));
    // Loop 1 stays blocked until the sender has been paused for want of room there.
    let deadline = Instant::now() + Duration::from_secs(25);
    while server.handle.metrics().broadcast_stalls == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let stalled = server.handle.metrics().broadcast_stalls;
    RELEASE.store(true, Ordering::Release);
    writer.join().unwrap().unwrap();
    for reader in readers {
        match reader.join() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => panic!("{msg}"),
            Err(_) => panic!("reader panicked"),
        }
    }
    assert!(
        stalled > 0,
        "the sender was never paused while loop 1 had no room"
    );
    assert_eq!(server.handle.metrics().closed_outbound_overflow, 0);
}
