//! Binary upgrade (SIGUSR2 / `plexus upgrade`), end to end with real binaries: the server runs
//! from a copy of the binary under test in a temporary directory, which each test replaces
//! with another copy (so the upgrade starts a different file, as an install would) before
//! signalling. Under load: no connection refused or reset, long TCP and TLS streams byte-exact
//! to the end, the old process exits 0, the pid file names the new one, which serves every
//! listener. A new binary that exits, a broken configuration, or a new process that is not
//! ready in time leave the old one serving; a second SIGUSR2 during an upgrade is refused.
//! Datagram sessions stay with the old process and new peers go to the new one.
//!
//! Every process a test starts is killed at the end, whatever happens: the harness kills the
//! first server, and [`Pids`] kills every pid the pid file has named.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use plexus_testkit::accept_any_cert_config;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

const STEP: Duration = Duration::from_secs(30);

/// The tests of this file run one at a time: they copy executables, and a copy being written
/// while another test thread forks is inherited by that child until its `exec`, which makes
/// executing the copy fail with ETXTBSY ("text file busy").
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every pid that served, killed (SIGKILL) on drop.
#[derive(Default, Clone)]
struct Pids(Arc<Mutex<Vec<u32>>>);

impl Pids {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) > 1 {
            return;
        }
        for pid in self.0.lock().unwrap().iter() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z ") && !stat.contains(") X "))
        .unwrap_or(false)
}

/// A directory holding the binary the server runs as `bin/plexus`.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new() -> Install {
        let install = Install {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(install.dir.path().join("bin")).unwrap();
        install.put_copy();
        install
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin/plexus")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("plexus.pid")
    }

    /// Installs a fresh copy of the binary under test (a new file: rename over the old one).
    fn put_copy(&self) {
        let staged = self.dir.path().join("bin/.plexus.new");
        std::fs::copy(BIN, &staged).unwrap();
        std::fs::rename(&staged, self.bin()).unwrap();
    }

    /// Installs a shell script in place of the binary.
    fn put_script(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let staged = self.dir.path().join("bin/.plexus.new");
        std::fs::write(&staged, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&staged, self.bin()).unwrap();
    }

    fn start(&self, config: &str, pids: &Pids) -> Server {
        let pid_file = self.pid_file();
        let server = Server::start_binary(
            &self.bin(),
            &[],
            &["--pid-file", pid_file.to_str().unwrap()],
            &[],
            config,
        );
        pids.add(server.pid());
        server
    }
}

/// Waits until the pid file names a live process other than `old`, and records it.
fn wait_new_pid(install: &Install, old: u32, pids: &Pids, server: &Server) -> u32 {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(pid) = read_pid(&install.pid_file()).filter(|&p| p != old) {
            if is_alive(pid) {
                pids.add(pid);
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new pid in the pid file within {STEP:?}; logs:\n{}",
            server.stderr_lines().join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    wait_until(within, || !is_alive(pid))
}

fn full_config(server_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "30s"
{server_extra}

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"

[[listener]]
name = "udp-echo"
transport = "udp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "dtls-echo"
transport = "dtls"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

// --- TLS client -------------------------------------------------------------------------------

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr) -> io::Result<Tls> {
    let tcp = try_connect(addr)?;
    let conn = ClientConnection::new(
        accept_any_cert_config(),
        ServerName::try_from("localhost").unwrap(),
    )
    .map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

// --- load -------------------------------------------------------------------------------------

/// Failures seen by the load, by kind, with the first few messages.
#[derive(Default)]
struct Failures {
    refused: AtomicU64,
    reset: AtomicU64,
    other: AtomicU64,
    ok: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Failures {
    fn record(&self, what: &str, err: &io::Error) {
        let counter = match err.kind() {
            io::ErrorKind::ConnectionRefused => &self.refused,
            _ if is_reset(err) => &self.reset,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap();
        if first.len() < 10 {
            first.push(format!("{what}: {err} ({:?})", err.kind()));
        }
    }

    fn total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
            + self.reset.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }

    fn summary(&self) -> String {
        format!(
            "ok {} refused {} reset {} other {}; first: {:?}",
            self.ok.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.reset.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.first.lock().unwrap()
        )
    }
}

fn short_echo(addr: SocketAddr) -> io::Result<()> {
    let mut stream = try_connect(addr)?;
    let msg = [0x5au8; 64];
    stream.write_all(&msg)?;
    let mut back = [0u8; 64];
    stream.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

fn short_http(addr: SocketAddr) -> io::Result<()> {
    let mut stream = try_connect(addr)?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(io::Error::other(format!(
            "unexpected response {:?}",
            String::from_utf8_lossy(&response[..response.len().min(40)])
        )));
    }
    Ok(())
}

/// Runs a long echo stream until `stop`, checking every byte; returns the bytes verified.
fn long_stream<S: Read + Write>(mut stream: S, stop: &AtomicBool) -> io::Result<u64> {
    const CHUNK: usize = 16 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut back = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        fill_pattern(offset, &mut buf);
        stream.write_all(&buf)?;
        stream.flush()?;
        stream.read_exact(&mut back)?;
        if let Err(at) = check_pattern(offset, &back) {
            return Err(io::Error::other(format!("stream byte {at} differs")));
        }
        offset += CHUNK as u64;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(offset)
}

/// Continuous load on a server's listeners, until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Failures>,
    threads: Vec<thread::JoinHandle<()>>,
    streams: Vec<thread::JoinHandle<Result<u64, String>>>,
}

impl Load {
    fn start(tcp: SocketAddr, tls: SocketAddr, http: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Failures::default());
        let mut threads = Vec::new();
        for (index, target) in [tcp, tcp, http, http].into_iter().enumerate() {
            let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let result = match index {
                        0 | 1 => short_echo(target),
                        _ => short_http(target),
                    };
                    match result {
                        Ok(()) => {
                            failures.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => failures.record(if index < 2 { "echo" } else { "http" }, &err),
                    }
                }
            }));
        }
        let mut streams = Vec::new();
        {
            let stop = Arc::clone(&stop);
            let stream = connect(tcp);
            streams.push(thread::spawn(move || {
                let total = long_stream(&stream, &stop).map_err(|e| format!("tcp stream: {e}"))?;
                stream.shutdown(std::net::Shutdown::Write).ok();
                Ok(total)
            }));
        }
        {
            let stop = Arc::clone(&stop);
            let tls = tls_connect(tls).expect("tls connect");
            streams.push(thread::spawn(move || {
                let mut tls = tls;
                let total = long_stream(&mut tls, &stop).map_err(|e| format!("tls stream: {e}"))?;
                tls.conn.send_close_notify();
                let _ = tls.flush();
                Ok(total)
            }));
        }
        Load {
            stop,
            failures,
            threads,
            streams,
        }
    }

    /// Stops the load; panics unless there was no failure and every long stream was exact.
    fn finish(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let mut streams = Vec::new();
        for stream in self.streams {
            match stream.join().unwrap() {
                Ok(bytes) => streams.push(bytes),
                Err(err) => panic!(
                    "long stream failed: {err}; short: {}",
                    self.failures.summary()
                ),
            }
        }
        let summary = self.failures.summary();
        assert_eq!(self.failures.total(), 0, "failures under load: {summary}");
        assert!(self.failures.ok.load(Ordering::Relaxed) > 0, "no load ran");
        assert!(
            streams.iter().all(|&b| b > 0),
            "long streams moved bytes: {streams:?}"
        );
        format!("{summary}; long streams verified {streams:?} bytes")
    }
}

fn assert_serves_everything(
    server_logs: &Server,
    tcp: SocketAddr,
    tls: SocketAddr,
    http: SocketAddr,
    udp: SocketAddr,
) {
    short_echo(tcp).expect("tcp echo after the upgrade");
    short_http(http).expect("http after the upgrade");
    let mut stream = tls_connect(tls).expect("tls after the upgrade");
    stream.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.connect(udp).unwrap();
    socket.send(b"datagram").unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap_or_else(|err| {
        panic!(
            "no udp echo after the upgrade: {err}; logs:\n{}",
            server_logs.stderr_lines().join("\n")
        )
    });
    assert_eq!(&buf[..n], b"datagram");
}

fn metric(http: SocketAddr, line_prefix: &str) -> Option<u64> {
    let mut stream = try_connect(http).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

// --- tests ------------------------------------------------------------------------------------

#[test]
fn upgrade_under_load_refuses_nothing_and_the_new_process_serves_every_listener() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let mut server = install.start(&full_config(""), &pids);
    let (tcp, tls, http, udp) = (
        server.addr("tcp-echo"),
        server.addr("tls-echo"),
        server.addr("http"),
        server.addr("udp-echo"),
    );
    let old = server.pid();
    assert_eq!(read_pid(&install.pid_file()), Some(old));

    let load = Load::start(tcp, tls, http);
    thread::sleep(Duration::from_millis(500));
    install.put_copy();
    let mark = server.log_mark();
    let signalled = Instant::now();
    server.signal("USR2");
    let new = wait_new_pid(&install, old, &pids, &server);
    server.assert_log(mark, STEP, "new process took over", |l| {
        l.contains("upgrade: took over from pid")
    });
    eprintln!("upgrade: pid {old} -> {new} in {:?}", signalled.elapsed());
    thread::sleep(Duration::from_millis(700));
    let summary = load.finish();
    eprintln!("load during the upgrade: {summary}");

    let status = server
        .wait_exit(STEP)
        .expect("the old process exits once drained");
    assert!(status.success(), "old process exit: {status}");
    assert_eq!(
        read_pid(&install.pid_file()),
        Some(new),
        "pid file names the new process"
    );
    assert!(is_alive(new));
    assert_serves_everything(&server, tcp, tls, http, udp);
    let lines = server.stderr_lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("panicked") || l.contains("ERROR")),
        "no error logged:\n{}",
        lines.join("\n")
    );
}

#[test]
fn three_upgrades_in_a_row_under_load_fail_nothing() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let mut server = install.start(&full_config(""), &pids);
    let (tcp, tls, http, udp) = (
        server.addr("tcp-echo"),
        server.addr("tls-echo"),
        server.addr("http"),
        server.addr("udp-echo"),
    );
    let first = server.pid();
    let mut current = first;
    for round in 1..=3 {
        let load = Load::start(tcp, tls, http);
        thread::sleep(Duration::from_millis(300));
        install.put_copy();
        let mark = server.log_mark();
        plexus_sys_kill_usr2(current);
        let new = wait_new_pid(&install, current, &pids, &server);
        server.assert_log(mark, STEP, "new process took over", |l| {
            l.contains("upgrade: took over from pid")
        });
        thread::sleep(Duration::from_millis(300));
        let summary = load.finish();
        eprintln!("round {round}: pid {current} -> {new}: {summary}");
        assert!(
            wait_gone(current, STEP),
            "pid {current} exits after draining"
        );
        current = new;
    }
    let status = server.wait_exit(STEP).expect("the first process exited");
    assert!(status.success(), "first process exit: {status}");
    assert_serves_everything(&server, tcp, tls, http, udp);
}

/// `kill -USR2 PID` for a process that is not the harness's child.
fn plexus_sys_kill_usr2(pid: u32) {
    let status = Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_failing_new_binary_a_broken_config_or_a_late_process_leave_the_old_one_serving() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let mut server = install.start(&echo_config("upgrade_timeout = \"2s\""), &pids);
    let tcp = server.addr("tcp-echo");
    let old = server.pid();

    // A binary that exits at once.
    install.put_script("echo 'new binary fails' >&2; exit 1");
    let mark = server.log_mark();
    server.signal("USR2");
    server.assert_log(mark, STEP, "the failed upgrade", |l| {
        l.contains("upgrade failed")
            && l.contains("exited before it was ready")
            && l.contains("still serving")
    });
    short_echo(tcp).expect("old process still serves");
    assert_eq!(read_pid(&install.pid_file()), Some(old));

    // The real binary, but a broken configuration: `plexus upgrade` says why and exits 1.
    install.put_copy();
    let good = std::fs::read_to_string(server.config_path()).unwrap();
    std::fs::write(server.config_path(), "[server]\nevent_loops = \"many\"\n").unwrap();
    let mark = server.log_mark();
    let pid_arg = install.pid_file();
    let out = run_plexus(
        &[
            "upgrade",
            "--pid-file",
            pid_arg.to_str().unwrap(),
            "--timeout",
            "20s",
        ],
        None,
        STEP,
    );
    out.assert_code(1);
    assert!(
        out.stderr.contains("exited before it was ready"),
        "plexus upgrade says why: {}",
        out.stderr
    );
    server.assert_log(mark, STEP, "the config error of the new process", |l| {
        l.contains("error:") && l.contains("event_loops")
    });
    server.assert_log(mark, STEP, "the failed upgrade", |l| {
        l.contains("upgrade failed") && l.contains("exit status: 2")
    });
    short_echo(tcp).expect("old process still serves");
    std::fs::write(server.config_path(), good).unwrap();

    // A new process that never reports ready is killed at upgrade_timeout.
    install.put_script("exec sleep 600");
    let mark = server.log_mark();
    server.signal("USR2");
    server.assert_log(mark, STEP, "the timed-out upgrade", |l| {
        l.contains("upgrade failed") && l.contains("was not ready within 2s")
    });
    short_echo(tcp).expect("old process still serves");
    server.assert_running("after three failed upgrades");
    assert_eq!(read_pid(&install.pid_file()), Some(old));

    // And a good one still works afterwards, through `plexus upgrade --binary`.
    let other = install.dir.path().join("plexus-other");
    std::fs::copy(BIN, &other).unwrap();
    let out = run_plexus(
        &[
            "upgrade",
            "--pid-file",
            pid_arg.to_str().unwrap(),
            "--binary",
            other.to_str().unwrap(),
        ],
        None,
        STEP,
    );
    let new = read_pid(&install.pid_file()).unwrap();
    pids.add(new);
    out.assert_code(0);
    assert_ne!(new, old);
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/exe")).unwrap(),
        other,
        "the new process runs the --binary file"
    );
    assert!(server.wait_exit(STEP).is_some_and(|s| s.success()));
    short_echo(tcp).expect("the new process serves");
}

#[test]
fn a_second_sigusr2_during_an_upgrade_is_refused_and_the_first_completes() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let mut server = install.start(&echo_config(""), &pids);
    let tcp = server.addr("tcp-echo");
    let old = server.pid();
    // A slow start: the new binary waits a second before it runs.
    let real = install.dir.path().join("plexus-real");
    std::fs::copy(BIN, &real).unwrap();
    install.put_script(&format!("sleep 1; exec {} \"$@\"", real.display()));
    let mark = server.log_mark();
    server.signal("USR2");
    server.assert_log(mark, STEP, "the upgrade start", |l| {
        l.contains("SIGUSR2 received: upgrading")
    });
    server.signal("USR2");
    server.assert_log(mark, STEP, "the refusal", |l| {
        l.contains("upgrade refused: an upgrade is already in progress")
    });
    let new = wait_new_pid(&install, old, &pids, &server);
    assert!(server.wait_exit(STEP).is_some_and(|s| s.success()));
    short_echo(tcp).expect("the new process serves");
    assert!(is_alive(new));
}

/// `plexus connect` as a long-lived datagram client: a line in, its echo out.
struct LineClient {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LineClient {
    fn start(url: &str) -> LineClient {
        let mut child = Command::new(BIN)
            .args(["connect", url, "--insecure"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineClient {
            child,
            stdin,
            lines,
        }
    }

    fn echo(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let got = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no echo of {line:?}"));
        assert_eq!(got, line);
    }

    /// Closes stdin: the client ends its session (close_notify for dtls) and exits. Not
    /// waited for here (the drop reaps it), so other peers need not be silent meanwhile.
    fn finish(&mut self) {
        drop(self.stdin.take());
    }
}

impl Drop for LineClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn datagram_sessions_stay_with_the_old_process_and_new_peers_go_to_the_new_one() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let mut server = install.start(
        &full_config("shutdown_grace = \"60s\"")
            .replace("idle_timeout = \"30s\"", "idle_timeout = \"3s\""),
        &pids,
    );
    let (dtls, udp, http) = (
        server.addr("dtls-echo"),
        server.addr("udp-echo"),
        server.addr("http"),
    );
    let old = server.pid();
    // The new binary is in place before the peers start: copying a debug build (over 100 MB)
    // takes seconds on a loaded machine, and the old peers would be silent meanwhile.
    install.put_copy();
    let mut dtls_old = LineClient::start(&format!("dtls://{dtls}"));
    dtls_old.echo("before the upgrade");
    let udp_old = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_old
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    udp_old.connect(udp).unwrap();
    let udp_echo = |socket: &UdpSocket, payload: &[u8]| {
        socket.send(payload).unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("udp echo");
        assert_eq!(&buf[..n], payload);
    };
    udp_echo(&udp_old, b"udp before");

    let mark = server.log_mark();
    server.signal("USR2");
    // The old peers keep talking through the hand-over. A silence of idle_timeout (3 s) ends
    // their sessions in the old process: the DTLS one with close_notify, on which the line
    // client exits, so the next echo's write broke its pipe. That was this test's flake
    // whenever the new process took over 3 s to start (a loaded machine); the sessions'
    // idle expiry itself is right.
    let deadline = Instant::now() + STEP;
    let mut new = None;
    let mut round = 0;
    let new = loop {
        if new.is_none() {
            new = read_pid(&install.pid_file()).filter(|&pid| pid != old && is_alive(pid));
            new.inspect(|&pid| pids.add(pid));
        }
        let took_over = server
            .wait_for_log(mark, Duration::ZERO, |l| {
                l.contains("upgrade: took over from pid")
            })
            .is_some();
        if let (Some(new), true) = (new, took_over) {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "no new process took over within {STEP:?}; logs:\n{}",
            server.stderr_lines().join("\n")
        );
        dtls_old.echo(&format!("during the upgrade {round}"));
        udp_echo(
            &udp_old,
            format!("udp during the upgrade {round}").as_bytes(),
        );
        round += 1;
        thread::sleep(Duration::from_millis(200));
    };

    // The old peers keep their sessions (served by the old process through the relay): the
    // new process has no datagram session for them.
    for round in 0..5 {
        dtls_old.echo(&format!("after the upgrade {round}"));
        udp_echo(&udp_old, format!("udp after {round}").as_bytes());
    }
    assert!(
        is_alive(old),
        "the old process drains while its datagram peers are active"
    );
    let dtls_open = r#"plexus_datagram_sessions_open{transport="dtls"}"#;
    let udp_open = r#"plexus_datagram_sessions_open{transport="udp"}"#;
    assert_eq!(
        metric(http, dtls_open),
        Some(0),
        "old dtls peer not in the new process"
    );
    assert_eq!(
        metric(http, udp_open),
        Some(0),
        "old udp peer not in the new process"
    );

    // New peers go to the new process.
    let mut dtls_new = LineClient::start(&format!("dtls://{dtls}"));
    dtls_new.echo("a new peer");
    let udp_new = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_new
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    udp_new.connect(udp).unwrap();
    udp_echo(&udp_new, b"udp new peer");
    assert_eq!(
        metric(http, dtls_open),
        Some(1),
        "the new dtls peer is the new process's"
    );
    assert_eq!(
        metric(http, udp_open),
        Some(1),
        "the new udp peer is the new process's"
    );

    // The old DTLS session ends (close_notify), the old UDP one idles out (idle_timeout):
    // then the old process has nothing left and exits 0 on its own.
    dtls_old.finish();
    // Meanwhile the new peers keep talking, so they do not idle out (3 s) in the new process
    // (the same expiry as above, which a slow machine would otherwise reach).
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = server.wait_exit(Duration::from_millis(500)) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "old process exits once its peers are gone"
        );
        dtls_new.echo("keep-alive");
        udp_echo(&udp_new, b"udp new keep-alive");
    };
    assert!(status.success(), "old process exit: {status}");
    // Its UDP peer, released, is the new process's now.
    udp_echo(&udp_old, b"udp after the old process");
    udp_echo(&udp_new, b"udp new peer again");
    assert_eq!(metric(http, udp_open), Some(2));
    dtls_new.echo("still served");
    assert!(is_alive(new));
}

/// Reads notifications until one contains every part of `wanted`; returns it.
fn expect_notify(
    socket: &std::os::unix::net::UnixDatagram,
    wanted: &[&str],
    seen: &mut Vec<String>,
) -> String {
    let deadline = Instant::now() + STEP;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let state = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(state.clone());
            if wanted.iter().all(|part| state.contains(part)) {
                return state;
            }
        }
    }
    panic!("no notification with {wanted:?}; seen: {seen:?}");
}

#[test]
fn under_systemd_the_old_process_names_the_new_main_pid_and_the_new_one_reports_ready() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let pid_file = install.pid_file();
    let mut server = Server::start_binary(
        &install.bin(),
        &[],
        &["--pid-file", pid_file.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        &echo_config(""),
    );
    let old = server.pid();
    pids.add(old);
    let mut seen = Vec::new();
    expect_notify(&socket, &["READY=1", &format!("MAINPID={old}")], &mut seen);

    install.put_copy();
    server.signal("USR2");
    let new = wait_new_pid(&install, old, &pids, &server);
    let handover = expect_notify(&socket, &[&format!("MAINPID={new}")], &mut seen);
    assert!(
        !handover.contains("READY=1"),
        "the old process only names the new pid: {handover}"
    );
    expect_notify(&socket, &["READY=1", &format!("MAINPID={new}")], &mut seen);
    assert!(server.wait_exit(STEP).is_some_and(|s| s.success()));
    // The new process pings the watchdog (the old one's WATCHDOG_PID did not reach it).
    expect_notify(&socket, &["WATCHDOG=1"], &mut seen);
    assert!(
        !seen.iter().any(|s| s.contains("STOPPING=1")),
        "nobody told systemd the service stops: {seen:?}"
    );
    short_echo(server.addr("tcp-echo")).expect("the new process serves");
}

#[test]
fn a_daemon_upgrades_through_its_pid_file_and_the_new_one_removes_the_file_at_exit() {
    let _serial = serial();
    let install = Install::new();
    let pids = Pids::default();
    let config = install.dir.path().join("plexus.toml");
    std::fs::write(&config, echo_config("")).unwrap();
    let pid_file = install.pid_file();
    let out = Command::new(install.bin())
        .args(["serve", "--config", config.to_str().unwrap(), "--daemon"])
        .args(["--pid-file", pid_file.to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "daemon start: {stderr}");
    let old = read_pid(&pid_file).expect("pid file");
    pids.add(old);
    let addr = stderr
        .lines()
        .find_map(parse_listening)
        .map(|(_, addr)| addr)
        .expect("listening line");
    short_echo(addr).expect("the daemon serves");

    install.put_copy();
    let upgrade = run_plexus(
        &["upgrade", "--pid-file", pid_file.to_str().unwrap()],
        None,
        STEP,
    );
    upgrade.assert_code(0);
    let new = read_pid(&pid_file).expect("pid file after the upgrade");
    pids.add(new);
    assert_ne!(new, old);
    assert_eq!(
        String::from_utf8_lossy(&upgrade.stdout).trim(),
        new.to_string(),
        "plexus upgrade prints the new pid"
    );
    assert!(wait_gone(old, STEP), "the old daemon exits");
    short_echo(addr).expect("the new daemon serves");
    // The lock went over with the file: a second instance is still refused.
    let again = run_plexus(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        None,
        STEP,
    );
    again.assert_code(1);
    assert!(
        again
            .stderr
            .contains(&format!("already running with pid {new}")),
        "{}",
        again.stderr
    );
    let _ = Command::new("kill")
        .args(["-TERM", &new.to_string()])
        .status();
    assert!(wait_gone(new, STEP));
    assert!(
        wait_until(STEP, || !pid_file.exists()),
        "the new process removes the pid file"
    );
}
