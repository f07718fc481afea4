//! The client runtime end to end: `ClientRuntime` connections to a plexus `Server` (echo, in
//! this process, on port 0), to plain std sockets standing in for a silent or a slow peer, and
//! over TLS to `openssl s_server` (trusted with a CA file; a wrong CA refused).
//!
//! No wall-clock assertions: every wait is bounded only so a broken build cannot hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use plexus::tls_client::{client_config, server_name, ServerTrust};
use plexus::{
    ClientRuntime, CloseReason, Config, LinkEvent, Retry, Server, ServerHandle, Session,
    SessionHandler, SessionInfo, Upstream,
};

const WAIT: Duration = Duration::from_secs(20);

/// What a probe connection saw.
#[derive(Debug, PartialEq)]
enum Seen {
    Connected(SocketAddr),
    /// TLS connections: the protocol version and the peer certificate's length.
    Tls(String, usize),
    /// TLS connections: `Full`, `FullWithHelloRetryRequest` or `Resumed`.
    Handshake(String),
    Data(Vec<u8>),
    Closed(CloseReason),
}

/// Sends `hello` once connected and finishes (half-close), reports everything it sees.
struct Probe {
    hello: Vec<u8>,
    seen: Sender<Seen>,
}

impl Probe {
    fn new(hello: &[u8]) -> (Box<Probe>, Receiver<Seen>) {
        let (seen, events) = mpsc::channel();
        let probe = Probe {
            hello: hello.to_vec(),
            seen,
        };
        (Box::new(probe), events)
    }
}

impl SessionHandler for Probe {
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Connected { upstream, addr } = event {
            assert_eq!(
                upstream,
                session.id(),
                "a client connection hears its own id"
            );
            let _ = self.seen.send(Seen::Connected(addr));
            if let Some(tls) = session.tls_state() {
                let version = format!("{:?}", tls.protocol_version());
                let cert = tls.peer_certificates().map_or(0, |c| c.len());
                let _ = self.seen.send(Seen::Tls(version, cert));
                let kind = tls.handshake_kind().map(|kind| format!("{kind:?}"));
                let _ = self.seen.send(Seen::Handshake(kind.unwrap_or_default()));
            }
            if !self.hello.is_empty() {
                session.send(&self.hello);
                session.finish();
            }
        }
    }

    fn on_data(&mut self, _: &mut Session<'_>, data: &[u8]) {
        let _ = self.seen.send(Seen::Data(data.to_vec()));
    }

    fn on_close(&mut self, _: &SessionInfo, reason: &CloseReason) {
        let _ = self.seen.send(Seen::Closed(reason.clone()));
    }
}

/// Everything the probe reported, in order, with the bytes joined.
fn collect(events: &Receiver<Seen>) -> (Vec<Seen>, Vec<u8>) {
    let mut others = Vec::new();
    let mut data = Vec::new();
    while let Ok(seen) = events.recv_timeout(WAIT) {
        match seen {
            Seen::Data(bytes) => data.extend_from_slice(&bytes),
            Seen::Closed(reason) => {
                others.push(Seen::Closed(reason));
                break;
            }
            other => others.push(other),
        }
    }
    (others, data)
}

/// A plexus echo server in this process, shut down on drop.
struct Echo {
    handle: ServerHandle,
    addr: SocketAddr,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let text = "[server]\nevent_loops = 1\n[[listener]]\nname = \"echo\"\n\
                    transport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n";
        let config = Config::parse(text, "echo").unwrap();
        let server = Server::builder(config)
            .service("echo", plexus_services::Echo)
            .build()
            .unwrap();
        let addr = server.local_addr("echo").unwrap();
        let handle = server.handle();
        let thread = thread::spawn(move || server.run().unwrap());
        Echo {
            handle,
            addr,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `run` on another thread, so a test can wait for it with a bound.
fn run_bounded(runtime: ClientRuntime) -> Receiver<Result<(), plexus::Error>> {
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(runtime.run());
    });
    finished
}

/// Connections spread over two loops each get their bytes echoed, half-close with `finish`,
/// end with `PeerClosed` once the server closed, and `run` returns once all have ended.
#[test]
fn connections_echo_half_close_and_run_returns_when_all_ended() {
    let echo = Echo::start();
    let runtime = ClientRuntime::builder().event_loops(2).build().unwrap();
    let upstream = Upstream::new("echo", vec![echo.addr]).unwrap();
    let mut probes = Vec::new();
    for n in 0..6u8 {
        let hello: Vec<u8> = (0..100_000u32)
            .map(|i| (i as u8).wrapping_mul(n + 1))
            .collect();
        let (probe, events) = Probe::new(&hello);
        runtime.connect(&upstream, probe).unwrap();
        probes.push((hello, events));
    }
    let finished = run_bounded(runtime);
    for (hello, events) in probes {
        let (seen, data) = collect(&events);
        assert_eq!(
            seen,
            vec![
                Seen::Connected(echo.addr),
                Seen::Closed(CloseReason::PeerClosed)
            ]
        );
        assert!(data == hello, "echo differs ({} bytes back)", data.len());
    }
    finished.recv_timeout(WAIT).unwrap().unwrap();
    let snapshot = upstream.snapshot();
    assert_eq!((snapshot.connected, snapshot.open), (6, 0));
}

/// The first address refuses, the next one is used (fallback); an upstream that refuses on
/// every address reports `UpstreamFailed` to the handler's `on_close`, without `Connected`.
#[test]
fn refused_addresses_fall_back_and_the_last_failure_is_the_close_reason() {
    let echo = Echo::start();
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let runtime = ClientRuntime::builder().build().unwrap();
    let fallback = Upstream::new("fallback", vec![closed, echo.addr]).unwrap();
    let (probe, events) = Probe::new(b"ping\n");
    runtime.connect(&fallback, probe).unwrap();
    let refused = Upstream::new("refused", vec![closed]).unwrap();
    let (lonely, refusals) = Probe::new(b"ping\n");
    runtime.connect(&refused, lonely).unwrap();
    let finished = run_bounded(runtime);
    let (seen, data) = collect(&events);
    assert_eq!(
        seen,
        vec![
            Seen::Connected(echo.addr),
            Seen::Closed(CloseReason::PeerClosed)
        ]
    );
    assert_eq!(data, b"ping\n");
    let (seen, data) = collect(&refusals);
    assert_eq!(
        seen,
        vec![Seen::Closed(CloseReason::UpstreamFailed(
            std::io::ErrorKind::ConnectionRefused
        ))]
    );
    assert!(data.is_empty());
    finished.recv_timeout(WAIT).unwrap().unwrap();
    assert_eq!(fallback.snapshot().attempts, 2);
    assert_eq!(refused.snapshot().unreachable, 1);
}

/// Bytes handed in from another thread through `Connection::send` reach a peer that does not
/// read only up to a bound: the sender waits (no unbounded buffering); once the peer reads,
/// every byte arrives in order, and `finish` ends the stream.
#[test]
fn sending_from_another_thread_waits_for_a_peer_that_does_not_read() {
    const CHUNK: usize = 16 * 1024;
    const TOTAL: usize = 64 * 1024 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = ClientRuntime::builder()
        .outbound_watermarks(64 * 1024, 16 * 1024)
        .build()
        .unwrap();
    let upstream = Upstream::new("slow", vec![addr]).unwrap();
    let (probe, events) = Probe::new(b"");
    let connection = runtime.connect(&upstream, probe).unwrap();
    let finished = run_bounded(runtime);
    let (peer, _) = listener.accept().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let sender = {
        let accepted = Arc::clone(&accepted);
        thread::spawn(move || {
            for n in 0..TOTAL / CHUNK {
                let chunk = vec![n as u8; CHUNK];
                connection.send(chunk).unwrap();
                accepted.fetch_add(CHUNK, Ordering::Relaxed);
            }
            connection.finish().unwrap();
        })
    };
    // Wait until the sender is stuck (no progress for a while), bounded.
    let start = Instant::now();
    let mut last = usize::MAX;
    while start.elapsed() < WAIT {
        thread::sleep(Duration::from_millis(300));
        let now = accepted.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let stuck_at = accepted.load(Ordering::Relaxed);
    // The kernel's socket buffers (a few MiB on loopback) plus the runtime's bound (twice
    // the high watermark plus a chunk): far below what the sender has to send.
    assert!(
        stuck_at < 24 * 1024 * 1024,
        "{stuck_at} bytes accepted while the peer read nothing"
    );
    let mut reader = BufReader::with_capacity(1 << 20, peer);
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (at, byte) in buf[..n].iter().enumerate() {
            let chunk = (received + at) / CHUNK;
            assert_eq!(*byte, chunk as u8, "byte {} out of order", received + at);
        }
        received += n;
    }
    assert_eq!(received, TOTAL);
    sender.join().unwrap();
    drop(reader); // the peer closes: the connection ends
    let (seen, _) = collect(&events);
    assert_eq!(seen.first(), Some(&Seen::Connected(addr)));
    finished.recv_timeout(WAIT).unwrap().unwrap();
}

/// `shutdown` from another thread ends a connection to a peer that never speaks: its handler
/// hears `ShutdownForced`, and `run` returns.
#[test]
fn shutdown_closes_open_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = ClientRuntime::builder().build().unwrap();
    let handle = runtime.handle();
    let (probe, events) = Probe::new(b"");
    handle
        .connect(&Upstream::new("silent", vec![addr]).unwrap(), probe)
        .unwrap();
    assert_eq!(runtime.open_connections(), 1);
    let finished = run_bounded(runtime);
    let _peer = listener.accept().unwrap();
    assert_eq!(
        events.recv_timeout(WAIT).unwrap(),
        Seen::Connected(addr),
        "connected first"
    );
    handle.shutdown();
    finished.recv_timeout(WAIT).unwrap().unwrap();
    let (seen, _) = collect(&events);
    assert_eq!(seen, vec![Seen::Closed(CloseReason::ShutdownForced)]);
    assert!(matches!(
        handle.connect(
            &Upstream::new("late", vec![addr]).unwrap(),
            Probe::new(b"").0
        ),
        Err(plexus::ClientError::Stopped)
    ));
}

/// `openssl s_server -rev` (lines come back reversed) on a free port; killed by PID on drop.
struct OpensslServer {
    child: Child,
    addr: SocketAddr,
}

impl OpensslServer {
    fn start(cert: &Path, key: &Path) -> OpensslServer {
        for _ in 0..3 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let mut child = Command::new("openssl")
                .args(["s_server", "-accept", &addr.to_string(), "-rev"])
                .arg("-cert")
                .arg(cert)
                .arg("-key")
                .arg(key)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl s_server");
            let stdout = child.stdout.take().unwrap();
            let (ready, accepting) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("ACCEPT") {
                        let _ = ready.send(());
                    }
                }
            });
            let server = OpensslServer { child, addr };
            if accepting.recv_timeout(Duration::from_secs(10)).is_ok() {
                return server;
            }
        }
        panic!("openssl s_server did not start");
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `localhost` in `dir` as `NAME.pem` / `NAME.key`.
fn certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// TLS to a real non-plexus peer: trusted through `--ca`-style `ServerTrust::CaFile`, the
/// name `localhost` sent as SNI and verified, `Connected` after the handshake with the
/// version and certificate readable; with another CA the handshake is refused and the
/// handler hears `Tls` only.
#[test]
fn tls_to_openssl_s_server_with_a_ca_file_and_a_wrong_ca_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "server");
    let (other, _) = certificate(dir.path(), "other");
    let server = OpensslServer::start(&cert, &key);
    let runtime = ClientRuntime::builder().build().unwrap();
    let upstream = |ca: &Path| {
        Upstream::new("openssl", vec![server.addr])
            .unwrap()
            .with_tls(
                client_config(&ServerTrust::CaFile(ca.to_owned()), &[]).unwrap(),
                server_name("localhost").unwrap(),
            )
    };
    let (probe, events) = Probe::new(b"hello\nworld\n");
    runtime.connect(&upstream(&cert), probe).unwrap();
    let (refused, refusals) = Probe::new(b"hello\n");
    runtime.connect(&upstream(&other), refused).unwrap();
    let finished = run_bounded(runtime);

    let (seen, data) = collect(&events);
    assert_eq!(seen.first(), Some(&Seen::Connected(server.addr)));
    assert!(
        matches!(seen.get(1), Some(Seen::Tls(version, 1)) if version.contains("TLSv1_3")),
        "{seen:?}"
    );
    assert_eq!(String::from_utf8_lossy(&data), "olleh\ndlrow\n");
    assert!(matches!(seen.last(), Some(Seen::Closed(_))), "{seen:?}");

    let (seen, data) = collect(&refusals);
    assert!(
        matches!(
            seen.as_slice(),
            [Seen::Closed(CloseReason::Tls(err))]
                if matches!(**err, rustls::Error::InvalidCertificate(_))
        ),
        "{seen:?}"
    );
    assert!(data.is_empty());
    finished.recv_timeout(WAIT).unwrap().unwrap();
}

/// Bytes written by an in-test peer before the client sends anything arrive too (the
/// connection reads as soon as it is connected), and `Connection::run` runs a closure on the
/// connection's loop.
#[test]
fn closures_from_another_thread_run_on_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = ClientRuntime::builder().build().unwrap();
    let (probe, events) = Probe::new(b"");
    let connection = runtime
        .connect(&Upstream::new("greeter", vec![addr]).unwrap(), probe)
        .unwrap();
    let finished = run_bounded(runtime);
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(b"welcome\n").unwrap();
    connection
        .run(|session| {
            let line = format!("from {}\n", session.id());
            session.send(line.as_bytes());
            session.finish();
        })
        .unwrap();
    let mut got = String::new();
    peer.read_to_string(&mut got).unwrap();
    assert_eq!(got, format!("from {}\n", connection.id()));
    drop(peer);
    let (seen, data) = collect(&events);
    assert_eq!(
        seen,
        vec![Seen::Connected(addr), Seen::Closed(CloseReason::PeerClosed)]
    );
    assert_eq!(data, b"welcome\n");
    finished.recv_timeout(WAIT).unwrap().unwrap();
    assert!(connection.is_ended());
    assert!(connection.send(b"late".to_vec()).is_err());
}

/// With `Upstream::with_retry`, a connection whose every address refuses waits a backoff and
/// tries them again: a server that starts listening meanwhile is reached; with nobody ever
/// listening the connection ends after its last round with `UpstreamFailed`, each round
/// counted.
#[test]
fn a_retrying_connection_reaches_a_server_that_starts_late_and_gives_up_after_its_rounds() {
    let free_port = || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (late_addr, never_addr) = (free_port(), free_port());
    let runtime = ClientRuntime::builder().build().unwrap();
    let patient = Retry::new(100, Duration::from_millis(10), Duration::from_millis(100));
    let late = Upstream::new("late", vec![late_addr])
        .unwrap()
        .with_retry(patient);
    let (probe, events) = Probe::new(b"ping\n");
    runtime.connect(&late, probe).unwrap();
    let brief = Retry::new(3, Duration::from_millis(1), Duration::from_millis(4));
    let never = Upstream::new("never", vec![never_addr])
        .unwrap()
        .with_retry(brief);
    let (lonely, refusals) = Probe::new(b"ping\n");
    runtime.connect(&never, lonely).unwrap();
    let finished = run_bounded(runtime);

    let (seen, _) = collect(&refusals);
    assert_eq!(
        seen,
        vec![Seen::Closed(CloseReason::UpstreamFailed(
            std::io::ErrorKind::ConnectionRefused
        ))]
    );
    let snapshot = never.snapshot();
    assert_eq!(
        (snapshot.attempts, snapshot.retries, snapshot.unreachable),
        (4, 3, 1),
        "the first round and three more, then given up once"
    );

    // The late server starts only once the connection has been refused and is waiting.
    let deadline = Instant::now() + WAIT;
    while late.snapshot().retries == 0 {
        assert!(Instant::now() < deadline, "no retry within the bound");
        thread::sleep(Duration::from_millis(5));
    }
    let listener = TcpListener::bind(late_addr).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        stream.write_all(b"pong\n").unwrap();
        request
    });
    let (seen, data) = collect(&events);
    assert_eq!(
        seen,
        vec![
            Seen::Connected(late_addr),
            Seen::Closed(CloseReason::PeerClosed)
        ]
    );
    assert_eq!(data, b"pong\n");
    assert_eq!(server.join().unwrap(), b"ping\n");
    finished.recv_timeout(WAIT).unwrap().unwrap();
    let snapshot = late.snapshot();
    assert!(snapshot.retries >= 1);
    assert_eq!((snapshot.connected, snapshot.unreachable), (1, 0));
}

/// A listening address that never answers a new connect: its accept queue (backlog 0) is
/// full with one connection nobody accepts, so the kernel drops further SYNs. Returns the
/// listener and that connection (both must stay open), or `None` if this kernel answers anyway.
fn silent_address() -> Option<(socket2::Socket, std::net::TcpStream, SocketAddr)> {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    probe.is_err().then_some((listener, filler, addr))
}

/// Happy eyeballs: the first address never answers and the connect timeout is far longer than
/// the test's own bound; after the attempt delay the second address is tried next to it, and
/// it connects and is used (the sequential fallback would wait out the first attempt).
#[test]
fn a_silent_first_address_is_raced_by_the_next_after_the_attempt_delay() {
    let Some((_listener, _filler, silent)) = silent_address() else {
        eprintln!("skipped: this kernel answers connects to a full accept queue");
        return;
    };
    let echo = Echo::start();
    let runtime = ClientRuntime::builder().build().unwrap();
    let upstream = Upstream::new("eyeballs", vec![silent, echo.addr])
        .unwrap()
        .with_connect_timeout(Duration::from_secs(600))
        .with_attempt_delay(Duration::from_millis(50));
    let (probe, events) = Probe::new(b"ping\n");
    runtime.connect(&upstream, probe).unwrap();
    let finished = run_bounded(runtime);
    let (seen, data) = collect(&events);
    assert_eq!(
        seen,
        vec![
            Seen::Connected(echo.addr),
            Seen::Closed(CloseReason::PeerClosed)
        ]
    );
    assert_eq!(data, b"ping\n");
    finished.recv_timeout(WAIT).unwrap().unwrap();
    let snapshot = upstream.snapshot();
    assert_eq!((snapshot.attempts, snapshot.connected), (2, 1));
}

/// The racing attempt fails at once (refused): the earlier attempt, still running, carries on
/// as the current one and ends at its own connect timeout; then the connection gives up.
#[test]
fn when_the_racing_attempt_is_refused_the_earlier_one_runs_to_its_timeout() {
    let Some((_listener, _filler, silent)) = silent_address() else {
        eprintln!("skipped: this kernel answers connects to a full accept queue");
        return;
    };
    let refused = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let runtime = ClientRuntime::builder().build().unwrap();
    let upstream = Upstream::new("eyeballs", vec![silent, refused])
        .unwrap()
        .with_connect_timeout(Duration::from_millis(400))
        .with_attempt_delay(Duration::from_millis(50));
    let (probe, events) = Probe::new(b"ping\n");
    runtime.connect(&upstream, probe).unwrap();
    let finished = run_bounded(runtime);
    let (seen, _) = collect(&events);
    assert_eq!(seen, vec![Seen::Closed(CloseReason::UpstreamTimeout)]);
    finished.recv_timeout(WAIT).unwrap().unwrap();
    let snapshot = upstream.snapshot();
    assert_eq!(
        (
            snapshot.attempts,
            snapshot.refused,
            snapshot.timed_out,
            snapshot.unreachable
        ),
        (2, 1, 1, 1)
    );
}

/// TLS session resumption: connections through one `Upstream` share its client configuration
/// and so its session cache; after a full handshake with `openssl s_server`, the next
/// connection resumes (TLS 1.3 ticket).
#[test]
fn a_second_tls_connection_to_the_same_upstream_resumes_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "server");
    let server = OpensslServer::start(&cert, &key);
    let upstream = Upstream::new("openssl", vec![server.addr])
        .unwrap()
        .with_tls(
            client_config(&ServerTrust::CaFile(cert.clone()), &[]).unwrap(),
            server_name("localhost").unwrap(),
        );
    // A connection that stays open keeps the runtime running between the two.
    let idle = TcpListener::bind("127.0.0.1:0").unwrap();
    let runtime = ClientRuntime::builder().build().unwrap();
    let handle = runtime.handle();
    let (keeper, _) = Probe::new(b"");
    let keeper = runtime
        .connect(
            &Upstream::new("idle", vec![idle.local_addr().unwrap()]).unwrap(),
            keeper,
        )
        .unwrap();
    let finished = run_bounded(runtime);
    let mut kinds = Vec::new();
    for round in 0..2 {
        let (probe, events) = Probe::new(b"hello\n");
        handle.connect(&upstream, probe).unwrap();
        let (seen, data) = collect(&events);
        assert_eq!(String::from_utf8_lossy(&data), "olleh\n", "round {round}");
        kinds.extend(seen.into_iter().filter_map(|seen| match seen {
            Seen::Handshake(kind) => Some(kind),
            _ => None,
        }));
    }
    assert_eq!(kinds, ["Full", "Resumed"]);
    keeper.close().unwrap();
    finished.recv_timeout(WAIT).unwrap().unwrap();
}
