//! Unit tests of the acceptor around its sockets: an [`Acceptor`] over a real loopback
//! listener, with event loops that are created but never run (their command queues are the
//! hand-over), or none at all. Admission's own decisions are tested without sockets in
//! `admit`. Descriptor exhaustion runs in a child process under `prlimit`, so that lowering
//! the descriptor limit cannot disturb other tests. Every wait is bounded; no test asserts a
//! duration it measured.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::process::Command as Process;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_proto::Acl;

use super::{Acceptor, StopRequest, BACKOFF_MAX, BACKOFF_START};
use crate::admission::{Admission, RefusalReason};
use crate::config::{Config, ValidConfig};
use crate::event_loop::{EventLoop, LoopHandle};
use crate::listen;
use crate::metrics::Metrics;
use crate::service::{Service, Session, SessionHandler};

/// Upper bound of every wait (never reached when the acceptor works).
const WAIT: Duration = Duration::from_secs(10);

struct Silent;
struct SilentSession;

impl Service for Silent {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(SilentSession)
    }
}

impl SessionHandler for SilentSession {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}

fn valid_config() -> ValidConfig {
    let text = "[[listener]]\nname = \"one\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
                service = \"silent\"\n";
    let config = Config::parse(text, "acceptor test").expect("config");
    config
        .validate("acceptor test", &["silent"])
        .expect("valid config")
}

/// An acceptor of one loopback listener with room for `max_connections`, and its address.
fn acceptor(max_connections: usize) -> (Acceptor, SocketAddr, Arc<Admission>) {
    let valid = valid_config();
    let listener = valid.listeners.first().expect("one listener");
    let bound = listen::bind(0, listener, Arc::new(Silent), None, None).expect("bind");
    let addr = bound.local;
    let admission = Arc::new(Admission::new(
        Acl::default(),
        max_connections,
        0,
        8,
        Arc::new(Metrics::default()),
    ));
    let (acceptor, _control) = Acceptor::new(
        vec![bound],
        false,
        Arc::clone(&admission),
        None,
        Duration::from_secs(1),
    )
    .expect("acceptor");
    (acceptor, addr, admission)
}

/// Loop handles whose loops are never run: what is sent to them waits in their queues.
fn idle_loops(count: usize) -> (Vec<EventLoop>, Vec<LoopHandle>) {
    let limits = listen::session_limits(&valid_config().config.server);
    (0..count)
        .map(|index| EventLoop::new(index, 1, limits.clone(), 1).expect("event loop"))
        .unzip()
}

/// Calls `accept_ready` until `done` holds (a connection made by `connect` can reach the
/// backlog a moment after `connect` returns on a loaded machine).
fn accept_until(acceptor: &mut Acceptor, done: impl Fn(&Acceptor) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(acceptor) {
        assert!(Instant::now() < deadline, "the acceptor did not get there");
        if let Some(listener) = acceptor.listeners.first_mut() {
            listener.ready = true;
        }
        acceptor.accept_ready(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn refused(admission: &Admission, reason: RefusalReason) -> u64 {
    admission.metrics().refused.get(reason)
}

/// Whether the peer closed `stream` (end of stream or reset) within [`WAIT`].
fn closed_by_server(stream: &mut StdStream) -> bool {
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn an_admitted_connection_goes_to_the_least_loaded_loop_and_ties_rotate() {
    let (mut acceptor, addr, admission) = acceptor(100);
    let (_loops, handles) = idle_loops(3);
    // Loop 1 is busier than the others.
    handles
        .get(1)
        .expect("loop 1")
        .stats
        .sessions_open
        .store(5, Ordering::Relaxed);
    acceptor.set_loops(handles);
    let picks: Vec<usize> = (0..4).map(|_| acceptor.least_loaded()).collect();
    assert_eq!(picks, [0, 2, 0, 2], "ties rotate; the busy loop is skipped");

    let _clients: Vec<StdStream> = (0..2)
        .map(|_| StdStream::connect(addr).expect("connect"))
        .collect();
    accept_until(&mut acceptor, |a| {
        a.admission.metrics().accepted.load(Ordering::Relaxed) == 2
    });
    let listener = acceptor.listeners.first().expect("listener");
    assert_eq!(listener.info.stats.accepted_count(), 2);
    // Handed over, not refused; the tickets are held by the queued sessions.
    assert_eq!(refused(&admission, RefusalReason::EventLoopBusy), 0);
    assert_eq!(admission.open_count(), 2);
    assert_eq!(acceptor.backoff, BACKOFF_START);
}

/// A graceful stop takes the connections waiting in the accept queue before it closes the
/// listener (closing it would reset them, after their clients may have sent a request): they
/// are handed to the loops like any other and drained there.
#[test]
fn a_graceful_stop_takes_the_accept_queue_before_closing_the_listener() {
    let (mut acceptor, addr, admission) = acceptor(100);
    let (_loops, handles) = idle_loops(1);
    acceptor.set_loops(handles);
    let mut tcp = File::open("/proc/net/tcp").expect("open /proc/net/tcp");
    let mut clients: Vec<StdStream> = (0..3)
        .map(|_| StdStream::connect(addr).expect("connect"))
        .collect();
    wait_for_backlog(&mut tcp, addr, 3);
    acceptor.stop_loops(StopRequest::Graceful);
    assert_eq!(admission.metrics().accepted.load(Ordering::Relaxed), 3);
    assert!(acceptor.listeners.is_empty(), "the listener is closed");
    for client in &mut clients {
        client
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        match client.read(&mut byte) {
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("a queued connection was not kept open: {other:?}"),
        }
    }
}

#[test]
fn a_connection_no_loop_takes_is_refused_as_event_loop_busy_and_closed() {
    let (mut acceptor, addr, admission) = acceptor(100);
    // A loop that is gone: its queue's receiving end was dropped.
    let (loops, handles) = idle_loops(1);
    drop(loops);
    acceptor.set_loops(handles);
    let mut client = StdStream::connect(addr).expect("connect");
    accept_until(&mut acceptor, |_| {
        refused(&admission, RefusalReason::EventLoopBusy) == 1
    });
    assert!(closed_by_server(&mut client));
    let listener = acceptor.listeners.first().expect("listener");
    // Admitted first (and counted so), then refused; its place was given back.
    assert_eq!(listener.info.stats.accepted_count(), 1);
    assert_eq!(
        listener
            .info
            .stats
            .refusals()
            .get(RefusalReason::EventLoopBusy),
        1
    );
    assert_eq!(admission.open_count(), 0);
}

#[test]
fn a_refused_connection_is_closed_at_once_and_counted_per_listener() {
    let (mut acceptor, addr, admission) = acceptor(1);
    let (_loops, handles) = idle_loops(1);
    acceptor.set_loops(handles);
    let _first = StdStream::connect(addr).expect("connect");
    let mut second = StdStream::connect(addr).expect("connect");
    accept_until(&mut acceptor, |_| {
        refused(&admission, RefusalReason::MaxConnections) == 1
    });
    assert!(closed_by_server(&mut second));
    let listener = acceptor.listeners.first().expect("listener");
    assert_eq!(listener.info.stats.accepted_count(), 1);
    assert_eq!(
        listener
            .info
            .stats
            .refusals()
            .get(RefusalReason::MaxConnections),
        1
    );
}

#[test]
fn pauses_back_off_exponentially_up_to_the_maximum_and_success_resets() {
    let (mut acceptor, _addr, _admission) = acceptor(10);
    let now = Instant::now();
    let mut pauses = Vec::new();
    for _ in 0..9 {
        acceptor.pause(now);
        let until = acceptor.paused_until.expect("paused");
        pauses.push(until.duration_since(now));
    }
    let ms = Duration::from_millis;
    assert_eq!(
        pauses,
        [
            ms(10),
            ms(20),
            ms(40),
            ms(80),
            ms(160),
            ms(320),
            ms(640),
            BACKOFF_MAX,
            BACKOFF_MAX
        ]
    );
    // While paused, the poll wakes when the pause ends (not at once, not never).
    assert_eq!(acceptor.poll_timeout(now), Some(BACKOFF_MAX));
    // A turn of accepting that ends with an empty backlog resets the backoff.
    acceptor.paused_until = None;
    acceptor.accept_ready(now);
    assert_eq!(acceptor.backoff, BACKOFF_START);
    assert!(!acceptor.listeners.first().expect("listener").ready);
    assert_eq!(acceptor.poll_timeout(now), None, "nothing to wait for");
    acceptor.listeners.first_mut().expect("listener").ready = true;
    assert_eq!(acceptor.poll_timeout(now), Some(Duration::ZERO));
}

/// The environment variable that tells [`emfile_child`] it runs under `prlimit`.
const EMFILE_CHILD: &str = "PLEXUS_ACCEPTOR_EMFILE_CHILD";

/// Runs [`emfile_child`] in a child process whose descriptor limit is 64 (`prlimit`, part of
/// util-linux; no privilege needed to lower one's own limit).
#[test]
fn out_of_descriptors_the_waiting_connections_are_closed_with_the_reserve_and_accepting_pauses() {
    if Process::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `prlimit` (util-linux) is not installed; it runs the child test");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let output = Process::new("prlimit")
        .arg("--nofile=64:64")
        .arg(exe)
        .args([
            "--exact",
            "acceptor::tests::emfile_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EMFILE_CHILD, "1")
        .output()
        .expect("run the child under prlimit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// The child of the test above (ignored unless run by it): exhausts its own descriptors with
/// three connections waiting in the backlog, then lets the acceptor handle it.
#[test]
#[ignore = "run by out_of_descriptors_…, in a process under prlimit"]
fn emfile_child() {
    assert!(
        std::env::var_os(EMFILE_CHILD).is_some(),
        "run by the test above, under prlimit"
    );
    let (mut acceptor, addr, admission) = acceptor(100);
    assert!(acceptor.reserve.is_some(), "the spare descriptor is open");
    let mut tcp = File::open("/proc/net/tcp").expect("/proc/net/tcp");
    let mut waiting: Vec<StdStream> = (0..3)
        .map(|_| StdStream::connect(addr).expect("connect"))
        .collect();
    wait_for_backlog(&mut tcp, addr, 3);
    let mut filler = exhaust_descriptors();
    let now = Instant::now();
    acceptor.accept_ready(now);
    // The spare descriptor let each waiting connection be accepted and closed in turn.
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 3);
    for client in &mut waiting {
        assert!(closed_by_server(client), "the client sees a clean close");
    }
    assert!(acceptor.reserve.is_some(), "the spare is open again");
    assert_eq!(acceptor.paused_until, Some(now + BACKOFF_START));
    assert_eq!(acceptor.backoff, BACKOFF_START * 2);
    let listener = acceptor.listeners.first().expect("listener");
    assert_eq!(
        listener
            .info
            .stats
            .refusals()
            .get(RefusalReason::DescriptorsExhausted),
        3
    );
    assert_eq!(admission.open_count(), 0, "none was admitted");

    // Still exhausted at the next turn: the pause doubles.
    drop(filler.pop());
    let mut another = StdStream::connect(addr).expect("connect");
    wait_for_backlog(&mut tcp, addr, 1);
    let later = now + BACKOFF_START;
    acceptor.accept_ready(later);
    assert!(closed_by_server(&mut another));
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 4);
    assert_eq!(acceptor.paused_until, Some(later + BACKOFF_START * 2));

    // Descriptors are back: connections are admitted (here refused only because no loop
    // runs), and the backoff starts over.
    drop(filler);
    let _client = StdStream::connect(addr).expect("connect");
    accept_until(&mut acceptor, |_| {
        refused(&admission, RefusalReason::EventLoopBusy) == 1
    });
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 4);
    assert_eq!(acceptor.backoff, BACKOFF_START);
    assert_eq!(admission.metrics().accepted.load(Ordering::Relaxed), 1);
}

/// Waits until `count` connections wait in the accept queue of the listener on `addr` (a
/// listening socket's `rx_queue` in `/proc/net/tcp`): connections made on loopback reach it
/// a moment after `connect` returns when the machine is loaded. `tcp` is that file, opened
/// before the descriptors ran out, read again from its start each time.
fn wait_for_backlog(tcp: &mut File, addr: SocketAddr, count: usize) {
    let port = format!(":{:04X}", addr.port());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut table = String::new();
        tcp.seek(SeekFrom::Start(0)).expect("seek /proc/net/tcp");
        tcp.read_to_string(&mut table).expect("read /proc/net/tcp");
        let queued = table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
            // 0A: LISTEN; the queues field is tx_queue:rx_queue in hex.
            (local.ends_with(&port) && *state == "0A")
                .then(|| usize::from_str_radix(queues.split(':').nth(1)?, 16).ok())?
        });
        if queued == Some(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queued:?} connections queued, waiting for {count}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Opens `/dev/null` until the process is out of descriptors; the files keep them taken.
fn exhaust_descriptors() -> Vec<File> {
    let mut files = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => files.push(file),
            Err(err) if plexus_sys::is_descriptor_exhaustion(&err) => return files,
            Err(err) => panic!("cannot open /dev/null: {err}"),
        }
        assert!(files.len() < 100_000, "no descriptor limit in effect");
    }
}
