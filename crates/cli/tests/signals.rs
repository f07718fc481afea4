//! End-to-end tests of signal handling: graceful drain on SIGTERM, fast stop on a second
//! signal, SIGPIPE never killing the server, and SIGHUP not stopping it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Echo server whose drain would outlast every test bound if it waited for the full grace.
fn config() -> String {
    echo_config("shutdown_grace = \"30s\"")
}

/// Asserts the server exits with status 0 within `within`.
fn assert_exits_cleanly(server: &mut Server, within: Duration, context: &str) {
    match server.wait_exit(within) {
        Some(status) if status.success() => {}
        Some(status) => panic!("{context}: server exited with {}", describe_status(status)),
        None => panic!("{context}: server still running after {within:?}"),
    }
}

/// SIGTERM in the middle of an 8 MiB echo: the listener closes at once (new connections are
/// refused), the running transfer completes byte-exact with EOF, and the process exits 0.
#[test]
fn sigterm_drains_running_transfer() {
    const TOTAL: u64 = 8 * MIB;
    const GATE: u64 = 2 * MIB;
    let mut server = Server::start(&config());
    let addr = server.addr("tcp-echo");

    let stream = connect(addr);
    let mut writer_stream = stream.try_clone().expect("clone stream");
    let mut reader_stream = stream;
    let (open_gate, gate) = mpsc::channel::<()>();
    // The writer stops after 2 MiB until the main thread has checked that new connections
    // are refused, so that check happens while the server is certainly still draining.
    let writer = thread::spawn(move || -> Result<(), String> {
        let pause = Duration::from_millis(1);
        write_pattern(&mut writer_stream, 0, GATE, 64 * 1024, pause)
            .map_err(|e| format!("writing the first 2 MiB: {e}"))?;
        gate.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "gate never opened")?;
        write_pattern(&mut writer_stream, GATE, TOTAL, 64 * 1024, pause)
            .map_err(|e| format!("writing after SIGTERM: {e}"))?;
        writer_stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))
    });
    let received = Arc::new(AtomicU64::new(0));
    let progress = Arc::clone(&received);
    let reader = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        read_pattern_to_eof(&mut reader_stream, TOTAL, deadline, Some(&progress))
    });

    assert!(
        wait_until(Duration::from_secs(20), || received.load(Ordering::SeqCst)
            >= MIB),
        "1 MiB was not echoed within 20 s (got {})",
        received.load(Ordering::SeqCst)
    );
    server.signal("TERM");

    // A connection accepted before the signal was handled may still be served; after that,
    // every attempt must fail to connect or be closed unanswered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        let outcome = probe(addr, None, b"late\n", Duration::from_secs(2));
        if outcome.refused() || Instant::now() > deadline {
            break outcome;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        outcome.refused(),
        "new connection after SIGTERM was not refused: {outcome:?}"
    );
    server.assert_running("while a session is mid-transfer after SIGTERM (30 s grace)");

    open_gate.send(()).expect("open gate");
    writer
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("{e}"));
    let got = reader.join().expect("reader thread");
    assert_eq!(got, Ok(TOTAL), "bytes echoed back before EOF");
    assert_exits_cleanly(
        &mut server,
        Duration::from_secs(20),
        "after the drained transfer",
    );
}

/// SIGTERM with only idle sessions: they are closed promptly (EOF), and the process exits 0
/// well before the 30 s grace.
#[test]
fn sigterm_with_idle_sessions_exits_promptly() {
    let mut server = Server::start(&config());
    let addr = server.addr("tcp-echo");
    let mut idle: Vec<_> = (0..5)
        .map(|i| {
            let mut s = connect(addr);
            assert_echo(&mut s, format!("idle {i}\n").as_bytes());
            s
        })
        .collect();

    server.signal("TERM");
    assert_exits_cleanly(
        &mut server,
        Duration::from_secs(10),
        "SIGTERM with 5 idle sessions",
    );
    for (i, s) in idle.iter_mut().enumerate() {
        assert_eof(s, &format!("idle session {i} after SIGTERM"));
    }
}

/// A second SIGTERM during a drain that would otherwise last (a transfer that never ends)
/// stops the server within 5 s, exit code 0.
#[test]
fn second_sigterm_stops_fast() {
    let mut server = Server::start(&config());
    let stream = connect(server.addr("tcp-echo"));
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));

    let mut writer_stream = stream.try_clone().expect("clone stream");
    let writer_stop = Arc::clone(&stop);
    let writer = thread::spawn(move || {
        let chunk = [b'z'; 1024];
        while !writer_stop.load(Ordering::SeqCst) {
            if writer_stream.write_all(&chunk).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let mut reader_stream = stream;
    let reader_echoed = Arc::clone(&echoed);
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match reader_stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    reader_echoed.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });

    assert!(
        wait_until(Duration::from_secs(10), || echoed.load(Ordering::SeqCst)
            >= 10 * 1024),
        "the endless transfer did not get going"
    );
    server.signal("TERM");
    thread::sleep(Duration::from_millis(500));
    server.assert_running("500 ms after the first SIGTERM with an active session");
    server.signal("TERM");
    let outcome = server.wait_exit(Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);

    match outcome {
        Some(status) => assert!(
            status.success(),
            "second SIGTERM: server exited with {}",
            describe_status(status)
        ),
        None => panic!("second SIGTERM: server still running after 5 s"),
    }
    writer.join().expect("writer thread");
    reader.join().expect("reader thread");
}

/// Peers that vanish (RST) while the server is writing to them never kill it with SIGPIPE.
///
/// Whether a reset actually leads to a write returning EPIPE depends on the order in which the
/// server handles the error (the first call after an RST gets ECONNRESET), so the test also
/// checks the server's SIGPIPE disposition directly.
#[test]
fn sigpipe_never_kills() {
    // A small server send buffer keeps echoed data queued in the server, so it is writing
    // (or about to) when each reset arrives.
    let config = config().replace(
        "service = \"echo\"",
        "service = \"echo\"\nsend_buffer = 16384",
    );
    let mut server = Server::start(&config);
    let addr = server.addr("tcp-echo");
    const SIGPIPE: u32 = 13;
    assert!(
        signal_not_default(server.pid(), SIGPIPE),
        "SIGPIPE has its default action (terminate) in the server: neither ignored nor caught"
    );

    for round in 0..20 {
        let stream = connect_small_rcvbuf(addr, 4096);
        stream.set_nonblocking(true).expect("nonblocking");
        let data = vec![b'p'; 64 * 1024];
        let mut written = 0usize;
        // Up to 1 MiB, as much as the buffers take without blocking.
        while written < MIB as usize {
            match (&stream).write(&data) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("round {round}: write: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(20)); // let the server start echoing
                                                  // Closing with unread data sends an RST; linger 0 makes sure of it.
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .expect("linger 0");
        drop::<TcpStream>(stream);
        server.assert_running(&format!("after round {round} of resets"));
    }

    thread::sleep(Duration::from_millis(200));
    server.assert_running("after 20 resets mid-write");
    let mut fresh = connect(addr);
    assert_echo(&mut fresh, b"still alive\n");
}

/// SIGHUP is handled (logged as a reload / SIGHUP) and does not stop the server.
#[test]
fn sighup_does_not_stop_the_server() {
    let mut server = Server::start(&config());
    let addr = server.addr("tcp-echo");
    let mut before = connect(addr);
    assert_echo(&mut before, b"before\n");
    let mark = server.log_mark();

    server.signal("HUP");
    thread::sleep(Duration::from_millis(300));
    server.assert_running("after SIGHUP");
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning reload or SIGHUP",
        |l| {
            let l = l.to_lowercase();
            l.contains("reload") || l.contains("sighup")
        },
    );
    server.assert_running("after SIGHUP was logged");
    assert_echo(&mut before, b"after hup, same connection\n");
    let mut after = connect(addr);
    assert_echo(&mut after, b"after hup, new connection\n");
}

/// Lameduck (`drain_delay`): on SIGTERM `/healthz` answers 503 at once while the listeners
/// keep accepting (a new echo connection is served) for the delay; then the normal graceful
/// drain, and exit 0.
#[test]
fn sigterm_with_drain_delay_fails_health_checks_while_still_accepting() {
    let config = format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n",
        echo_config("drain_delay = \"5s\"\nshutdown_grace = \"10s\"")
    );
    let mut server = Server::start(&config);
    let (echo, http) = (server.addr("tcp-echo"), server.addr("http"));
    let health = |what: &str| -> String {
        let mut stream = connect(http);
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        text
    };
    assert!(health("before").starts_with("HTTP/1.1 200"));
    let mark = server.log_mark();
    server.signal("TERM");
    server.assert_log(mark, Duration::from_secs(10), "lameduck log line", |line| {
        line.contains("lameduck")
    });
    let answer = health("during the delay");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Still accepting: a new echo session is served.
    let mut late = connect(echo);
    assert_echo(&mut late, b"accepted during drain_delay\n");
    drop(late);
    assert_exits_cleanly(&mut server, Duration::from_secs(60), "after drain_delay");
    server.assert_log(
        mark,
        Duration::from_secs(1),
        "drain after the delay",
        |line| line.contains("draining sessions"),
    );
}
