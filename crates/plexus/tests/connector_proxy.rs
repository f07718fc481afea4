//! End-to-end tests of the `connector_proxy` example: the example binary runs on an ephemeral
//! port in front of an upstream the test owns (a thread answering lines, a dead port, a
//! listener that is never accepted from, one that accepts and never reads), found by its
//! `listening name=proxy …` line and killed by PID. No wall-clock assertions: every wait is a
//! bounded read whose timeout only keeps a broken build from hanging.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The example binary, built if it is missing or older than its sources.
fn example_binary() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = profile_dir.join("examples").join("connector_proxy");
    let newest_source = [
        manifest.join("examples/connector_proxy.rs"),
        manifest.join("src"),
    ]
    .iter()
    .map(|path| newest_mtime(path))
    .max()
    .unwrap_or(SystemTime::UNIX_EPOCH);
    let fresh = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= newest_source);
    if !fresh {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "plexus", "--example", "connector_proxy"]);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --example connector_proxy failed"
        );
    }
    binary
}

fn newest_mtime(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    if !meta.is_dir() {
        return meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            newest = newest.max(newest_mtime(&entry.path()));
        }
    }
    newest
}

/// A running `connector_proxy`; killed (by PID) and reaped on drop.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        let mut child = Command::new(example_binary())
            .arg("127.0.0.1:0")
            .arg(upstream.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start connector_proxy");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, addr) = mpsc::channel();
        let lines = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening name=proxy transport=tcp addr=") {
                    let _ = found.send(addr.parse::<SocketAddr>().expect("logged address"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut proxy = Proxy {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        match addr.recv_timeout(START_TIMEOUT) {
            Ok(addr) => proxy.addr = addr,
            Err(_) => panic!("no listening line; log: {:?}", proxy.log.lock().unwrap()),
        }
        proxy
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// The proxy's resident set, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that answers every line `L` with `ok L`, for each connection (a thread each).
fn answering_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            thread::spawn(move || {
                let mut writer = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    if writer.write_all(format!("ok {line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads until EOF (or an error: a reset also ends the session); returns what came.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the proxy neither answered nor closed; got {got:?}")
            }
            Err(_) => return got,
        }
    }
}

#[test]
fn a_thousand_pipelined_lines_come_back_in_order() {
    let proxy = Proxy::start(answering_upstream(), &[]);
    let mut client = proxy.connect();
    let mut request = String::new();
    for i in 0..1000 {
        request.push_str(&format!("line {i}\n"));
    }
    // All at once, in pieces that split lines anywhere.
    for piece in request.as_bytes().chunks(777) {
        client.write_all(piece).unwrap();
    }
    let mut reader = BufReader::new(client.try_clone().unwrap());
    for i in 0..1000 {
        let mut line = String::new();
        reader.read_line(&mut line).expect("a reply line");
        assert_eq!(line, format!("ok line {i}\n"), "reply {i} in order");
    }
    // Two clients have two upstream connections: both get their own answers.
    let mut other = proxy.connect();
    other.write_all(b"second\n").unwrap();
    let mut line = String::new();
    BufReader::new(other).read_line(&mut line).unwrap();
    assert_eq!(line, "ok second\n");
    // A half-close still gets the answer to what was sent before it, then the close.
    client.write_all(b"last\n").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "ok last\n");
}

#[test]
fn an_upstream_that_is_down_gets_the_client_an_error_line_and_a_close() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(dead, &[]);
    let mut client = proxy.connect();
    client.write_all(b"hello\n").unwrap();
    let got = read_to_close(&mut client);
    assert_eq!(got, b"-ERR upstream unavailable\n");
    // The proxy goes on serving the next client the same way.
    let mut again = proxy.connect();
    assert_eq!(read_to_close(&mut again), b"-ERR upstream unavailable\n");
}

#[test]
fn an_upstream_that_never_accepts_is_bounded_by_the_connect_timeout() {
    // A listener with the smallest backlog, filled by connections nobody accepts: the
    // kernel drops further SYNs, so the proxy's connect stays pending until its timeout.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let filler =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        filler.set_nonblocking(true).unwrap();
        let _ = filler.connect(&addr.into());
        fillers.push(filler);
    }
    thread::sleep(Duration::from_millis(200));
    let proxy = Proxy::start(
        addr,
        &["--connect-timeout", "300ms", "--reply-timeout", "1s"],
    );
    let mut client = proxy.connect();
    client.write_all(b"anyone there?\n").unwrap();
    let got = String::from_utf8(read_to_close(&mut client)).unwrap();
    // Whether the kernel queued this connect (then the upstream is silent: the reply
    // timeout) or dropped its SYN (the connect timeout), the client hears why, and closes.
    eprintln!("a client behind a full backlog got {got:?}");
    assert!(
        got == "-ERR upstream unavailable\n" || got == "-ERR upstream timeout\n",
        "got {got:?}"
    );
    drop(socket);
}

#[test]
fn an_upstream_that_accepts_and_never_answers_is_bounded_by_the_reply_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = thread::spawn(move || listener.accept().map(|(conn, _)| conn));
    let proxy = Proxy::start(addr, &["--reply-timeout", "500ms"]);
    let mut client = proxy.connect();
    client.write_all(b"ping\n").unwrap();
    assert_eq!(read_to_close(&mut client), b"-ERR upstream timeout\n");
    drop(held.join());
}

#[test]
fn an_upstream_that_stops_reading_stops_the_proxy_reading_its_client() {
    // Accepts, never reads: everything the client sends piles up somewhere.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = thread::spawn(move || listener.accept().map(|(conn, _)| conn));
    let proxy = Proxy::start(addr, &["--reply-timeout", "1h"]);
    let before = proxy.rss_kib();
    let mut client = proxy.connect();
    client
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let line = [b'x'; 1023];
    let mut chunk = Vec::new();
    for _ in 0..64 {
        chunk.extend_from_slice(&line);
        chunk.push(b'\n');
    }
    // 512 MiB offered; kernel buffers on both sides hold a few MiB, the proxy's queues a few
    // hundred KiB: the client's writes must block long before the end.
    let mut sent = 0usize;
    let total = 512 * 1024 * 1024;
    while sent < total {
        match client.write(&chunk) {
            Ok(n) => sent += n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(err) => panic!("write failed after {sent} bytes: {err}"),
        }
    }
    assert!(
        sent < total,
        "the proxy took all {sent} bytes: no backpressure"
    );
    let after = proxy.rss_kib();
    eprintln!("sent {sent} bytes before the writes blocked; proxy RSS {before} KiB -> {after} KiB");
    assert!(
        after < before + 32 * 1024,
        "proxy RSS grew from {before} KiB to {after} KiB holding {sent} bytes"
    );
    drop(held.join());
}
