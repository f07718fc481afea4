//! Unit tests of accepting around its sockets: an [`Intake`] over a real loopback listener,
//! whose admitted connections are collected instead of adopted by a loop. Admission's own
//! decisions are tested without sockets in `admit`; the loops' side in `event_loop/tests.rs`.
//! Descriptor exhaustion runs in a child process under `prlimit`, so that lowering the
//! descriptor limit cannot disturb other tests. Every wait is bounded; no test asserts a
//! duration it measured.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::process::Command as Process;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_proto::Acl;

use super::{BoundListener, Intake, NewSession, RefusalLog, SocketOptions};
use super::{BACKOFF_MAX, BACKOFF_START};
use crate::admission::{Admission, RefusalReason};
use crate::breakdown::ListenerStats;
use crate::metrics::Metrics;
use crate::service::{ListenerInfo, Service, Session, SessionHandler};

/// Upper bound of every wait (never reached when accepting works).
const WAIT: Duration = Duration::from_secs(10);
/// Accepts per listener per call, as a loop's turn takes them.
const BUDGET: usize = 16;

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

/// A plain listener on a loopback port, with `tcp_nodelay` (as configured by default).
fn loopback_listener() -> BoundListener {
    let info = Arc::new(ListenerInfo {
        index: 0,
        name: "one".into(),
        stats: ListenerStats::default(),
    });
    listener_on_loopback(info, Arc::new(Silent))
}

/// A plain listener of `service` on a loopback port, with `tcp_nodelay` (as configured by
/// default), ready (connections may wait).
pub(crate) fn listener_on_loopback(
    info: Arc<ListenerInfo>,
    service: Arc<dyn Service>,
) -> BoundListener {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.set_nonblocking(true).expect("non-blocking");
    BoundListener {
        local: socket.local_addr().expect("addr"),
        socket: Arc::new(mio::net::TcpListener::from_std(socket)),
        info,
        service,
        acl: Arc::new(Acl::default()),
        proxy_trusted: None,
        options: SocketOptions {
            nodelay: true,
            recv_buffer: 0,
            send_buffer: 0,
            keepalive: None,
            linger: None,
        },
        tls: None,
        ready: true,
        ring_accept: None,
    }
}

/// An intake with room for `max_connections`, one loopback listener, and what they accept.
struct Accepting {
    intake: Intake,
    listeners: Vec<BoundListener>,
    admission: Arc<Admission>,
    addr: SocketAddr,
    /// The admitted connections (a loop would adopt them; here they stay open).
    admitted: Vec<NewSession>,
}

fn accepting(max_connections: usize) -> Accepting {
    let bound = loopback_listener();
    let addr = bound.local;
    let admission = Arc::new(Admission::new(
        Acl::default(),
        max_connections,
        0,
        8,
        Arc::new(Metrics::default()),
    ));
    let intake = Intake::new(Arc::clone(&admission), Arc::new(RefusalLog::new()));
    Accepting {
        intake,
        listeners: vec![bound],
        admission,
        addr,
        admitted: Vec::new(),
    }
}

impl Accepting {
    /// `count` clients whose connections wait in the listener's accept queue.
    fn queued_clients(&self, count: usize) -> Vec<StdStream> {
        let mut tcp = File::open("/proc/net/tcp").expect("open /proc/net/tcp");
        let clients = (0..count)
            .map(|_| StdStream::connect(self.addr).expect("connect"))
            .collect();
        wait_for_backlog(&mut tcp, self.addr, count);
        clients
    }

    fn accept_ready(&mut self, now: Instant) {
        let admitted = &mut self.admitted;
        let mut adopt = |new: NewSession| {
            admitted.push(new);
            Ok(())
        };
        self.intake
            .accept_ready(&mut self.listeners, BUDGET, now, &mut adopt);
    }

    /// Accepts until `done` holds (a connection made by `connect` can reach the backlog a
    /// moment after `connect` returns on a loaded machine).
    fn accept_until(&mut self, done: impl Fn(&Accepting) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "accepting did not get there");
            if let Some(listener) = self.listeners.first_mut() {
                listener.ready = true;
            }
            self.accept_ready(Instant::now());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn listener(&self) -> &BoundListener {
        self.listeners.first().expect("listener")
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

/// Whether `stream` is still open and silent: nothing to read, neither an end nor a reset
/// (on loopback a close by the server reaches the client before `close` returns there).
fn kept_open(stream: &mut StdStream) -> bool {
    stream.set_nonblocking(true).expect("non-blocking");
    let mut byte = [0u8; 1];
    let open = matches!(
        stream.read(&mut byte),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock
    );
    stream.set_nonblocking(false).expect("blocking");
    open
}

#[test]
fn an_admitted_connection_is_handed_on_with_its_ticket_its_identity_and_its_options() {
    let mut accepting = accepting(100);
    let mut clients: Vec<StdStream> = (0..2)
        .map(|_| StdStream::connect(accepting.addr).expect("connect"))
        .collect();
    accepting.accept_until(|a| a.admitted.len() == 2);
    assert_eq!(accepting.listener().info.stats.accepted_count(), 2);
    assert_eq!(accepting.admission.open_count(), 2, "the tickets are held");
    let peers: Vec<SocketAddr> = clients
        .iter()
        .map(|c| c.local_addr().expect("addr"))
        .collect();
    for new in &accepting.admitted {
        assert!(peers.contains(&new.info.peer));
        assert_eq!(new.info.local, accepting.addr);
        assert_eq!(new.info.listener.index, 0);
        assert!(new.tls.is_none() && new.proxy.is_none());
        // The listener's socket options were applied.
        assert!(new.stream.nodelay().expect("nodelay"));
    }
    assert_eq!(accepting.intake.backoff, BACKOFF_START);
    assert!(accepting.intake.may_accept(Instant::now()));
    for client in &mut clients {
        assert!(kept_open(client), "an admitted connection stays open");
    }
    accepting.admitted.clear();
    assert_eq!(
        accepting.admission.open_count(),
        0,
        "their places went with them"
    );
}

/// A graceful drain takes the connections waiting in the accept queue before the listener is
/// let go (closing it would reset them, after their clients may have sent a request), even
/// without an edge saying they are there.
#[test]
fn the_backlog_sweep_takes_every_waiting_connection_without_an_edge() {
    let mut accepting = accepting(100);
    let mut clients = accepting.queued_clients(40);
    accepting.listeners[0].ready = false;
    let admitted = &mut accepting.admitted;
    let mut adopt = |new: NewSession| {
        admitted.push(new);
        Ok(())
    };
    // More than one budget's worth: the sweep goes round until the queue is empty.
    accepting
        .intake
        .accept_backlog(&mut accepting.listeners, BUDGET, Instant::now(), &mut adopt);
    assert_eq!(accepting.admitted.len(), 40);
    assert!(!accepting.listener().ready, "the queue is empty");
    assert_eq!(
        accepting
            .admission
            .metrics()
            .accepted
            .load(Ordering::Relaxed),
        40
    );
    for client in &mut clients {
        assert!(kept_open(client), "a queued connection was not kept open");
    }
}

#[test]
fn a_turn_takes_at_most_its_budget_and_the_listener_stays_ready_for_the_next() {
    let mut accepting = accepting(100);
    let _clients = accepting.queued_clients(BUDGET + 3);
    accepting.accept_ready(Instant::now());
    assert_eq!(accepting.admitted.len(), BUDGET);
    assert!(
        accepting.listener().ready,
        "connections are left: no edge will say so"
    );
    accepting.accept_ready(Instant::now());
    assert_eq!(accepting.admitted.len(), BUDGET + 3);
    assert!(!accepting.listener().ready);
}

#[test]
fn a_refused_connection_is_closed_at_once_and_counted_per_listener() {
    let mut accepting = accepting(1);
    let _first = StdStream::connect(accepting.addr).expect("connect");
    let mut second = StdStream::connect(accepting.addr).expect("connect");
    accepting.accept_until(|a| refused(&a.admission, RefusalReason::MaxConnections) == 1);
    assert!(closed_by_server(&mut second));
    assert_eq!(accepting.admitted.len(), 1);
    let stats = &accepting.listener().info.stats;
    assert_eq!(stats.accepted_count(), 1);
    assert_eq!(stats.refusals().get(RefusalReason::MaxConnections), 1);
}

/// A loop that cannot register an accepted connection for lack of descriptors (a
/// registration that needs one) is out of descriptors as surely as a failed `accept`: the
/// waiting connections are closed, counted, and accepting pauses.
#[test]
fn an_adoption_that_runs_out_of_descriptors_sheds_the_queue_and_pauses() {
    let mut accepting = accepting(100);
    let mut clients = accepting.queued_clients(4);
    let mut attempts = 0;
    let mut adopt = |_: NewSession| {
        attempts += 1;
        Err(io::Error::from_raw_os_error(24 /* EMFILE */))
    };
    let now = Instant::now();
    accepting
        .intake
        .accept_ready(&mut accepting.listeners, BUDGET, now, &mut adopt);
    assert_eq!(
        attempts, 1,
        "no adoption is tried after the first one failed"
    );
    assert!(accepting
        .intake
        .paused_until()
        .is_some_and(|until| until > now));
    assert!(!accepting.intake.may_accept(now), "accepting pauses");
    for (at, client) in clients.iter_mut().enumerate() {
        assert!(
            closed_by_server(client),
            "client {at} is closed, not left waiting"
        );
    }
    assert_eq!(
        refused(&accepting.admission, RefusalReason::DescriptorsExhausted),
        3,
        "the three shed from the queue are counted (the first was admitted, then dropped)"
    );
}

/// Any other failure to adopt pauses accepting (one log line per pause, not one per
/// connection).
#[test]
fn an_adoption_that_fails_otherwise_pauses_accepting() {
    let mut accepting = accepting(100);
    let _client = accepting.queued_clients(1);
    let mut adopt = |_: NewSession| Err(io::Error::from_raw_os_error(12 /* ENOMEM */));
    let now = Instant::now();
    accepting
        .intake
        .accept_ready(&mut accepting.listeners, BUDGET, now, &mut adopt);
    assert!(!accepting.intake.may_accept(now));
    assert_eq!(
        refused(&accepting.admission, RefusalReason::DescriptorsExhausted),
        0
    );
}

#[test]
fn pauses_back_off_exponentially_up_to_the_maximum_and_success_resets() {
    let mut accepting = accepting(10);
    let intake = &mut accepting.intake;
    let now = Instant::now();
    let mut pauses = Vec::new();
    for _ in 0..9 {
        intake.pause(now);
        let until = intake.paused_until().expect("paused");
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
    // While paused, nothing is accepted until the pause ends.
    assert!(!intake.may_accept(now));
    assert!(!intake.may_accept(now + BACKOFF_MAX - ms(1)));
    assert!(intake.may_accept(now + BACKOFF_MAX));
    assert_eq!(intake.paused_until(), None, "the pause is over");
    // A turn of accepting that ends with an empty backlog resets the backoff.
    accepting.accept_ready(now);
    assert_eq!(accepting.intake.backoff, BACKOFF_START);
    assert!(!accepting.listener().ready);
}

/// The environment variable that tells [`emfile_child`] it runs under `prlimit`.
const EMFILE_CHILD: &str = "PLEXUS_ACCEPT_EMFILE_CHILD";

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
            "accept::tests::emfile_child",
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
/// three connections waiting in the backlog, then lets the intake handle it.
#[test]
#[ignore = "run by out_of_descriptors_…, in a process under prlimit"]
fn emfile_child() {
    assert!(
        std::env::var_os(EMFILE_CHILD).is_some(),
        "run by the test above, under prlimit"
    );
    let mut accepting = accepting(100);
    let addr = accepting.addr;
    assert!(
        accepting.intake.reserve.is_some(),
        "the spare descriptor is open"
    );
    let mut tcp = File::open("/proc/net/tcp").expect("/proc/net/tcp");
    let mut waiting: Vec<StdStream> = (0..3)
        .map(|_| StdStream::connect(addr).expect("connect"))
        .collect();
    wait_for_backlog(&mut tcp, addr, 3);
    let mut filler = exhaust_descriptors();
    let now = Instant::now();
    accepting.accept_ready(now);
    // The spare descriptor let each waiting connection be accepted and closed in turn.
    let admission = Arc::clone(&accepting.admission);
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 3);
    for client in &mut waiting {
        assert!(closed_by_server(client), "the client sees a clean close");
    }
    assert!(
        accepting.intake.reserve.is_some(),
        "the spare is open again"
    );
    assert_eq!(accepting.intake.paused_until(), Some(now + BACKOFF_START));
    assert_eq!(accepting.intake.backoff, BACKOFF_START * 2);
    let stats = &accepting.listener().info.stats;
    assert_eq!(stats.refusals().get(RefusalReason::DescriptorsExhausted), 3);
    assert_eq!(admission.open_count(), 0, "none was admitted");
    assert!(accepting.admitted.is_empty());

    // Still exhausted at the next turn: the pause doubles.
    drop(filler.pop());
    let mut another = StdStream::connect(addr).expect("connect");
    wait_for_backlog(&mut tcp, addr, 1);
    let later = now + BACKOFF_START;
    assert!(accepting.intake.may_accept(later), "the pause is over");
    accepting.listeners[0].ready = true;
    accepting.accept_ready(later);
    assert!(closed_by_server(&mut another));
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 4);
    assert_eq!(
        accepting.intake.paused_until(),
        Some(later + BACKOFF_START * 2)
    );

    // Descriptors are back: connections are admitted, and the backoff starts over.
    drop(filler);
    let _client = StdStream::connect(addr).expect("connect");
    accepting.accept_until(|a| a.admitted.len() == 1);
    assert_eq!(refused(&admission, RefusalReason::DescriptorsExhausted), 4);
    assert_eq!(accepting.intake.backoff, BACKOFF_START);
    assert_eq!(admission.metrics().accepted.load(Ordering::Relaxed), 1);
}

/// Waits until `count` connections wait in the accept queue of the listener on `addr` (a
/// listening socket's `rx_queue` in `/proc/net/tcp`): connections made on loopback reach it
/// a moment after `connect` returns when the machine is loaded. `tcp` is that file, opened
/// before the descriptors ran out, read again from its start each time.
pub(crate) fn wait_for_backlog(tcp: &mut File, addr: SocketAddr, count: usize) {
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
