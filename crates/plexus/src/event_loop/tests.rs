//! Unit tests of the event loop: a real `EventLoop` on its own thread, sessions adopted over
//! real loopback sockets (no server, no acceptor, no CLI), a recording service. Every wait is
//! bounded; no test asserts a duration.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Token, Waker};
use plexus_proto::Acl;

use super::{Command, EventLoop, ExitSignal, LoopHandle, NewSession, SessionLimits};
use crate::accept::{BoundListener, Intake, RefusalLog};
use crate::admission::Admission;
use crate::breakdown::ListenerStats;
use crate::config::Backend;
use crate::metrics::Metrics;
use crate::service::{CloseReason, ListenerInfo, Service, Session, SessionHandler};
use crate::service::{SessionId, SessionInfo};

/// Upper bound of every wait (never reached when the loop works).
const WAIT: Duration = Duration::from_secs(10);

/// What the recording service saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Opened(SessionId),
    Data(SessionId, Vec<u8>),
    /// `session.queued()` right after the sends of a `big` or `small+big` command.
    Queued(usize),
    Closed(SessionId, CloseReason),
}

/// The payload of the `big` commands: larger than `WRITE_THROUGH_MIN`, smaller than what a
/// loopback socket takes at once.
const BIG: usize = 64 * 1024;

fn big_payload() -> Vec<u8> {
    (0..BIG).map(|i| (i % 253) as u8).collect()
}

/// Echoes, and obeys a few commands: `panic` panics in `on_data`, `bye` answers then closes.
/// With `panic_on_close`, `on_close` panics after reporting.
struct Recorder {
    seen: mpsc::Sender<Seen>,
    panic_on_close: bool,
}

struct RecorderSession {
    seen: mpsc::Sender<Seen>,
    panic_on_close: bool,
}

impl Service for Recorder {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let _ = self.seen.send(Seen::Opened(session.id()));
        Box::new(RecorderSession {
            seen: self.seen.clone(),
            panic_on_close: self.panic_on_close,
        })
    }
}

impl SessionHandler for RecorderSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let _ = self.seen.send(Seen::Data(session.id(), data.to_vec()));
        match data {
            b"panic" => panic!("test handler panics in on_data"),
            b"bye" => {
                session.send(b"later\n");
                session.close();
            }
            b"big" => {
                session.send(&big_payload());
                let _ = self.seen.send(Seen::Queued(session.queued()));
            }
            b"small+big" => {
                session.send(b"first\n");
                session.send(&big_payload());
                let _ = self.seen.send(Seen::Queued(session.queued()));
            }
            _ => session.send(data),
        }
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let _ = self.seen.send(Seen::Closed(info.id(), reason.clone()));
        if self.panic_on_close {
            panic!("test handler panics in on_close");
        }
    }
}

/// One event loop running on its own thread, and what adopting sessions into it needs.
struct Running {
    handle: LoopHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    admission: Arc<Admission>,
    listener: Arc<ListenerInfo>,
    seen: mpsc::Receiver<Seen>,
    /// Seen but not asked for yet (by `take`).
    pending: RefCell<VecDeque<Seen>>,
    service: Arc<dyn Service>,
    live_loops: Arc<AtomicUsize>,
    /// Owns the exit signal's waker registration.
    _exit_poll: Poll,
}

fn limits(idle_timeout: Duration) -> SessionLimits {
    SessionLimits {
        idle_timeout,
        handshake_timeout: Duration::from_secs(10),
        high_watermark: 256 * 1024,
        low_watermark: 64 * 1024,
        outbound_limit: 4 << 20,
        work_limit: 64,
    }
}

impl Running {
    fn start(idle_timeout: Duration, panic_on_close: bool) -> Running {
        Running::start_with(idle_timeout, panic_on_close, |_, _| {})
    }

    /// Starts the loop once `before` has set it up (its handle's commands wait until then).
    fn start_with(
        idle_timeout: Duration,
        panic_on_close: bool,
        before: impl FnOnce(&mut EventLoop, &Running),
    ) -> Running {
        let (mut event_loop, handle) = EventLoop::new(0, 1, limits(idle_timeout), 64).unwrap();
        event_loop.set_peers(vec![handle.clone()]);
        let exit_poll = Poll::new().unwrap();
        let live_loops = Arc::new(AtomicUsize::new(1));
        let exit = ExitSignal {
            live_loops: Arc::clone(&live_loops),
            waker: Arc::new(Waker::new(exit_poll.registry(), Token(0)).unwrap()),
        };
        let (sender, seen) = mpsc::channel();
        let mut running = Running {
            handle,
            thread: None,
            admission: Arc::new(Admission::new(
                Acl::default(),
                100,
                0,
                8,
                Arc::new(Metrics::default()),
            )),
            listener: Arc::new(ListenerInfo {
                index: 0,
                name: "unit".into(),
                stats: ListenerStats::default(),
            }),
            seen,
            pending: RefCell::default(),
            service: Arc::new(Recorder {
                seen: sender,
                panic_on_close,
            }),
            live_loops,
            _exit_poll: exit_poll,
        };
        before(&mut event_loop, &running);
        running.thread = Some(std::thread::spawn(move || event_loop.run(exit)));
        running
    }

    /// A loop on `backend` that accepts from a loopback listener of the recording service
    /// itself, and that listener (the test's share of its socket keeps it open).
    fn listening(
        backend: Backend,
        before_start: impl FnOnce(&LoopHandle, &BoundListener),
    ) -> (Running, BoundListener) {
        Running::listening_with(backend, |_, handle, listener| {
            before_start(handle, listener)
        })
    }

    /// [`Running::listening`], with the loop itself given to `before_start` too.
    fn listening_with(
        backend: Backend,
        before_start: impl FnOnce(&mut EventLoop, &LoopHandle, &BoundListener),
    ) -> (Running, BoundListener) {
        let mut shared = None;
        let running = Running::start_with(Duration::from_secs(60), false, |event_loop, running| {
            event_loop.set_backend(backend);
            assert_eq!(
                event_loop.ring.is_some(),
                backend == Backend::IoUring,
                "io_uring is available on the test machine"
            );
            let listener = crate::accept::tests::listener_on_loopback(
                Arc::clone(&running.listener),
                Arc::clone(&running.service),
            );
            let refusals = Arc::new(RefusalLog::new());
            event_loop.set_intake(Intake::new(Arc::clone(&running.admission), refusals));
            event_loop.listen(listener.clone()).unwrap();
            before_start(event_loop, &running.handle, &listener);
            shared = Some(listener);
        });
        (running, shared.unwrap())
    }

    /// A loopback connection whose server side the loop adopts; returns the client side and
    /// the session's id.
    fn connect(&self) -> (StdStream, SessionId) {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let id = SessionId::next();
        let new = NewSession {
            info: SessionInfo {
                id,
                peer,
                local: server.local_addr().unwrap(),
                listener: Arc::clone(&self.listener),
            },
            stream: mio::net::TcpStream::from_std(server),
            service: Arc::clone(&self.service),
            ticket: self.admission.admit(&Acl::default(), peer.ip()).unwrap(),
            tls: None,
            proxy: None,
        };
        assert!(self.handle.send(Command::Adopt(Box::new(new))).is_ok());
        self.take(|seen| *seen == Seen::Opened(id));
        (client, id)
    }

    /// The next thing the service saw (bounded wait).
    fn next(&self) -> Seen {
        if let Some(seen) = self.pending.borrow_mut().pop_front() {
            return seen;
        }
        self.seen
            .recv_timeout(WAIT)
            .expect("the service saw nothing within the bound")
    }

    /// The first thing seen that `wanted` picks; the others stay for `next` in their order.
    fn take(&self, wanted: impl Fn(&Seen) -> bool) -> Seen {
        let mut pending = self.pending.borrow_mut();
        if let Some(at) = pending.iter().position(&wanted) {
            return pending.remove(at).unwrap();
        }
        loop {
            let seen = self
                .seen
                .recv_timeout(WAIT)
                .expect("the service did not see it within the bound");
            if wanted(&seen) {
                return seen;
            }
            pending.push_back(seen);
        }
    }

    /// How session `id` ended.
    fn closed(&self, id: SessionId) -> CloseReason {
        match self.take(|seen| matches!(seen, Seen::Closed(closed, _) if *closed == id)) {
            Seen::Closed(_, reason) => reason,
            _ => unreachable!(),
        }
    }

    /// Stops the loop (unless it has stopped already) and returns how it ended.
    fn stop(mut self) -> std::io::Result<()> {
        let _ = self.handle.send(Command::Stop);
        let result = self
            .thread
            .take()
            .unwrap()
            .join()
            .expect("loop thread panicked");
        assert_eq!(self.live_loops.load(Ordering::Acquire), 0);
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.handle.send(Command::Stop);
            let _ = thread.join();
        }
    }
}

/// Reads until `want` bytes arrived (bounded by the socket's read timeout).
fn read_exactly(client: &mut StdStream, want: usize) -> Vec<u8> {
    let mut got = vec![0; want];
    client.read_exact(&mut got).expect("bytes from the loop");
    got
}

/// A client of the loop's listener at `addr` whose session answered (the recording service
/// echoes): accepted, admitted and adopted.
fn served_client(addr: std::net::SocketAddr) -> StdStream {
    let mut client = StdStream::connect(addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(b"ping").unwrap();
    assert_eq!(read_exactly(&mut client, 4), b"ping");
    client
}

fn read_to_eof(client: &mut StdStream) -> Vec<u8> {
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("EOF from the loop");
    rest
}

#[test]
fn bytes_in_reach_the_handler_and_its_sends_go_out() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, id) = running.connect();
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exactly(&mut client, 5), b"hello");
    let mut data = Vec::new();
    while data.len() < 5 {
        match running.next() {
            Seen::Data(from, bytes) => {
                assert_eq!(from, id);
                data.extend(bytes);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(data, b"hello");
    let before = running.handle.stats.handler_panics.load(Ordering::Relaxed);
    assert_eq!(before, 0);
    running.stop().unwrap();
}

#[test]
fn a_large_echo_comes_back_whole_under_backpressure() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, _) = running.connect();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut reader = client.try_clone().unwrap();
    let expected = payload.len();
    let collector = std::thread::spawn(move || read_exactly(&mut reader, expected));
    client.write_all(&payload).unwrap();
    assert!(collector.join().unwrap() == payload);
    running.stop().unwrap();
}

/// A large send onto an empty queue goes straight to the socket (nothing is left queued, so
/// nothing was copied into the queue); behind bytes already queued it is queued too, so the
/// peer gets everything in order.
#[test]
fn a_large_send_is_written_through_unless_bytes_wait_before_it() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, _) = running.connect();
    let queued = |running: &Running| match running.take(|seen| matches!(seen, Seen::Queued(_))) {
        Seen::Queued(queued) => queued,
        _ => unreachable!(),
    };
    client.write_all(b"big").unwrap();
    assert_eq!(queued(&running), 0, "written through, not queued");
    assert!(read_exactly(&mut client, BIG) == big_payload());
    client.write_all(b"small+big").unwrap();
    assert_eq!(queued(&running), 6 + BIG, "queued behind the small send");
    assert_eq!(read_exactly(&mut client, 6), b"first\n");
    assert!(read_exactly(&mut client, BIG) == big_payload());
    running.stop().unwrap();
}

#[test]
fn the_peers_fin_closes_the_session_as_peer_closed() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, id) = running.connect();
    client.write_all(b"last words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client), b"last words");
    assert_eq!(running.closed(id), CloseReason::PeerClosed);
    running.stop().unwrap();
}

#[test]
fn a_requested_close_flushes_what_was_queued_first() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, id) = running.connect();
    client.write_all(b"bye").unwrap();
    assert_eq!(read_to_eof(&mut client), b"later\n");
    assert_eq!(running.closed(id), CloseReason::Requested);
    running.stop().unwrap();
}

#[test]
fn a_silent_session_is_closed_by_the_idle_timeout() {
    let running = Running::start(Duration::from_millis(50), false);
    let (mut client, id) = running.connect();
    assert_eq!(running.closed(id), CloseReason::IdleTimeout);
    assert!(read_to_eof(&mut client).is_empty());
    assert_eq!(
        running
            .handle
            .stats
            .closed_idle_timeout
            .load(Ordering::Relaxed),
        1
    );
    running.stop().unwrap();
}

#[test]
fn a_panic_in_on_data_closes_only_that_session() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut doomed, doomed_id) = running.connect();
    let (mut other, other_id) = running.connect();
    doomed.write_all(b"panic").unwrap();
    assert_eq!(running.closed(doomed_id), CloseReason::Panic);
    assert!(read_to_eof(&mut doomed).is_empty());
    other.write_all(b"still here").unwrap();
    assert_eq!(read_exactly(&mut other, 10), b"still here");
    assert_eq!(
        running.handle.stats.handler_panics.load(Ordering::Relaxed),
        1
    );
    drop(other);
    assert_eq!(running.closed(other_id), CloseReason::PeerClosed);
    running.stop().unwrap();
}

#[test]
fn a_panic_in_on_close_is_caught_and_the_loop_goes_on() {
    let running = Running::start(Duration::from_secs(60), true);
    let (mut first, first_id) = running.connect();
    let (mut second, _) = running.connect();
    first.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut first).is_empty());
    assert_eq!(running.closed(first_id), CloseReason::PeerClosed);
    // The loop survived the panic: an existing session and a new one are both served.
    second.write_all(b"alive").unwrap();
    assert_eq!(read_exactly(&mut second, 5), b"alive");
    let (mut third, _) = running.connect();
    third.write_all(b"new").unwrap();
    assert_eq!(read_exactly(&mut third, 3), b"new");
    let deadline = Instant::now() + WAIT;
    while running.handle.stats.handler_panics.load(Ordering::Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "the on_close panic was not counted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Stop closes the rest (their on_close panics too) and the loop still exits cleanly.
    running.stop().unwrap();
}

#[test]
fn stop_closes_every_session_as_forced() {
    let running = Running::start(Duration::from_secs(60), false);
    let (mut client, id) = running.connect();
    assert!(running.handle.send(Command::Stop).is_ok());
    assert_eq!(running.closed(id), CloseReason::ShutdownForced);
    assert!(read_to_eof(&mut client).is_empty());
    running
        .stop()
        .unwrap_or_else(|err| panic!("loop failed: {err}"));
}

#[test]
fn drain_ends_idle_sessions_and_the_loop_exits() {
    let mut running = Running::start(Duration::from_secs(60), false);
    let (mut client, id) = running.connect();
    let deadline = Instant::now() + WAIT;
    assert!(running.handle.send(Command::Drain { deadline }).is_ok());
    assert_eq!(running.closed(id), CloseReason::Shutdown);
    assert!(read_to_eof(&mut client).is_empty());
    let thread = running.thread.take().unwrap();
    thread.join().expect("loop thread panicked").unwrap();
    assert_eq!(running.live_loops.load(Ordering::Acquire), 0);
}

/// Connect to a listener the loop accepts from: the connections become the loop's sessions
/// (admitted: their tickets are held), with no acceptor thread in between.
#[test]
fn connections_to_a_listener_of_the_loop_become_its_sessions() {
    connections_become_sessions(Backend::Epoll);
}

/// The same through the io_uring ring's multishot accept.
#[test]
fn connections_the_ring_accepts_become_the_loops_sessions() {
    connections_become_sessions(Backend::IoUring);
}

/// The descriptors registered with epoll instance `epoll` (its `/proc` fdinfo `tfd` lines).
fn epoll_targets(epoll: i32) -> Vec<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")).unwrap();
    info.lines()
        .filter_map(|line| line.strip_prefix("tfd:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// On epoll the listener sits in the loop's epoll instance; on io_uring it does not (the
/// ring accepts on it), yet connections are accepted either way.
#[test]
fn a_ring_loop_accepts_without_registering_the_listener_with_epoll() {
    use std::os::fd::AsRawFd;
    for backend in [Backend::Epoll, Backend::IoUring] {
        let mut epoll = None;
        let (running, listener) = Running::listening_with(backend, |event_loop, _, _| {
            epoll = Some(event_loop.poll.as_raw_fd());
        });
        let _client = served_client(listener.local);
        let registered = epoll_targets(epoll.unwrap()).contains(&listener.socket.as_raw_fd());
        assert_eq!(registered, backend == Backend::Epoll, "{backend:?}");
        running.stop().unwrap();
    }
}

/// A listener removed by a reload stops listening once every share of its socket is gone —
/// on io_uring too, where the ring's accept holds the socket until it is cancelled.
#[test]
fn an_unlistened_listener_closes_once_its_shares_are_gone_on_both_backends() {
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (running, listener) = Running::listening(backend, |_, _| {});
        let addr = listener.local;
        let mut client = served_client(addr);
        assert!(running.handle.send(Command::Unlisten(0)).is_ok());
        drop(listener);
        let deadline = Instant::now() + WAIT;
        while StdStream::connect(addr).is_ok() {
            assert!(
                Instant::now() < deadline,
                "{backend:?}: {addr} still listens"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The session accepted before goes on.
        client.write_all(b"pong").unwrap();
        assert_eq!(read_exactly(&mut client, 4), b"pong");
        running.stop().unwrap();
    }
}

fn connections_become_sessions(backend: Backend) {
    let (running, listener) = Running::listening(backend, |_, _| {});
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(served_client(listener.local));
    }
    let mut opened: Vec<Seen> = (0..3)
        .map(|_| running.take(|seen| matches!(seen, Seen::Opened(_))))
        .collect();
    opened.dedup();
    assert_eq!(opened.len(), 3, "three sessions: {opened:?}");
    assert_eq!(
        running.handle.stats.sessions_open.load(Ordering::Relaxed),
        3
    );
    assert_eq!(running.admission.open_count(), 3);
    assert_eq!(listener.info.stats.accepted_count(), 3);
    let admission = Arc::clone(&running.admission);
    running.stop().unwrap();
    assert_eq!(
        admission.open_count(),
        0,
        "the sessions gave their places back"
    );
}

/// A graceful drain first takes the connections waiting in the listener's queue (closing the
/// socket would reset them, after their clients may have sent a request): they become
/// sessions, are drained like the others, and their clients see a clean end.
#[test]
fn a_drain_takes_the_connections_waiting_in_the_listeners_queue_and_drains_them() {
    drain_takes_the_queue(Backend::Epoll);
}

/// The same with the ring's accepts armed.
#[test]
fn a_drain_on_the_ring_takes_the_connections_waiting_in_the_listeners_queue() {
    drain_takes_the_queue(Backend::IoUring);
}

fn drain_takes_the_queue(backend: Backend) {
    let mut clients = Vec::new();
    let (mut running, _listener) = Running::listening(backend, |handle, listener| {
        // Queued before the loop runs: its first turn takes the drain command first.
        let mut tcp = std::fs::File::open("/proc/net/tcp").unwrap();
        for _ in 0..3 {
            let mut client = StdStream::connect(listener.local).unwrap();
            client.set_read_timeout(Some(WAIT)).unwrap();
            client.write_all(b"request").unwrap();
            clients.push(client);
        }
        crate::accept::tests::wait_for_backlog(&mut tcp, listener.local, 3);
        let deadline = Instant::now() + WAIT;
        assert!(handle.send(Command::Drain { deadline }).is_ok());
    });
    for client in &mut clients {
        // Served (the request is echoed), then ended cleanly by the drain.
        assert_eq!(read_exactly(client, 7), b"request");
        assert!(read_to_eof(client).is_empty());
    }
    let mut opened: Vec<Seen> = (0..3)
        .map(|_| running.take(|seen| matches!(seen, Seen::Opened(_))))
        .collect();
    opened.dedup();
    assert_eq!(opened.len(), 3, "three sessions: {opened:?}");
    let thread = running.thread.take().unwrap();
    thread.join().expect("loop thread panicked").unwrap();
}

/// A command that finds the loop's queue full waits for room within its patience (a reload's
/// listener change), and fails once the patience is over.
#[test]
fn a_command_waits_for_room_in_a_full_queue_within_its_patience() {
    let (event_loop, handle) = EventLoop::new(0, 1, limits(Duration::from_secs(60)), 64).unwrap();
    while handle.send(Command::Stop).is_ok() {}
    assert!(
        handle
            .send_within(Command::Stop, Duration::from_millis(20))
            .is_err(),
        "the queue stays full: the patience runs out"
    );
    let drainer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let taken = event_loop.commands.try_recv().is_ok();
        (taken, event_loop)
    });
    assert!(
        handle.send_within(Command::Stop, WAIT).is_ok(),
        "room was made while it waited"
    );
    let (taken, _event_loop) = drainer.join().unwrap();
    assert!(taken);
}
