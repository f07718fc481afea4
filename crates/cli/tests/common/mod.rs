//! Shared harness for the plexus end-to-end tests.
//!
//! [`Server`] runs `plexus serve` on a config written to a temporary directory, keeps draining
//! its stderr, finds the address of every listener from the `listening` log lines, and kills the
//! process (by PID) when dropped. [`run_plexus`] runs a short-lived `plexus` command with a time
//! bound. The rest are socket helpers (every socket has connect, read and write timeouts, so no
//! test can hang), a deterministic byte pattern, and readers of `/proc/PID/*`.
//!
//! Each test file uses only part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_plexus");
/// How long a server may take to log `listening` for all its listeners.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a TCP connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default read and write timeout on every test socket.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// One mebibyte.
pub(crate) const MIB: u64 = 1024 * 1024;

/// The standard test config: one echo listener named `tcp-echo` on an ephemeral port, two event
/// loops. `server_extra` is appended to the `[server]` table (one `key = value` per line).
pub(crate) fn echo_config(server_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "60s"
{server_extra}

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A running `plexus serve` process. Killed (SIGKILL by PID) and reaped on drop; if the test is
/// panicking, its captured stderr is printed first.
pub(crate) struct Server {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    logs: LogCapture,
    addrs: HashMap<String, SocketAddr>,
}

impl Server {
    /// Writes `config` to a temporary file, runs `plexus serve --config FILE` and waits (up to
    /// [`START_TIMEOUT`]) until every `[[listener]]` of the config has logged `listening`.
    pub(crate) fn start(config: &str) -> Server {
        Server::start_with_prefix(&[], config)
    }

    /// Like [`Server::start`], but runs the server through a wrapper command that `exec`s it,
    /// e.g. `&["prlimit", "--nofile=64:64"]` (the PID stays the server's).
    pub(crate) fn start_with_prefix(prefix: &[&str], config: &str) -> Server {
        Server::start_with(prefix, &[], &[], config)
    }

    /// The general form: a wrapper command (`prefix`), extra `plexus serve` arguments, and
    /// extra environment variables.
    pub(crate) fn start_with(
        prefix: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        config: &str,
    ) -> Server {
        Server::start_binary(Path::new(BIN), prefix, args, env, config)
    }

    /// Like [`Server::start_with`], with another `plexus` binary than the one under test (e.g.
    /// a copy that an upgrade test replaces).
    pub(crate) fn start_binary(
        bin: &Path,
        prefix: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        config: &str,
    ) -> Server {
        let dir = tempfile::tempdir().expect("create tempdir");
        let config_path = dir.path().join("plexus.toml");
        std::fs::write(&config_path, config).expect("write config");

        let mut cmd = match prefix.split_first() {
            Some((program, prefix_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(prefix_args).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("RUST_LOG")
            // A test runner started by systemd must not have its manager notified by servers.
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn plexus serve");
        let pid = child.id();
        let logs = LogCapture::spawn(child.stderr.take().expect("piped stderr"));

        let mut server = Server {
            child,
            pid,
            dir,
            config_path,
            logs,
            addrs: HashMap::new(),
        };
        server.wait_listening(&listener_names(config));
        server
    }

    /// Waits until each of `names` has a `listening` line, and records its bound address.
    fn wait_listening(&mut self, names: &[String]) {
        assert!(!names.is_empty(), "config has no [[listener]] with a name");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for line in self.logs.lines() {
                if let Some((name, addr)) = parse_listening(&line) {
                    self.addrs.insert(name, addr);
                }
            }
            if names.iter().all(|n| self.addrs.contains_key(n)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the drain thread collect the last lines before reporting.
                self.logs.wait_eof(Duration::from_secs(1));
                panic!(
                    "plexus serve exited ({}) before listening on {names:?}; stderr:\n{}",
                    describe_status(status),
                    self.logs.lines().join("\n")
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "plexus serve did not log `listening` for all of {names:?} within \
                     {START_TIMEOUT:?} (seen: {:?}); stderr:\n{}",
                    self.addrs,
                    self.logs.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bound address of listener `name` (from its `listening` line).
    pub(crate) fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no listener named {name:?}; known: {:?}", self.addrs))
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the config file the server was started with.
    pub(crate) fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory holding the config (removed on drop).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every stderr line captured so far (ANSI colour codes stripped).
    pub(crate) fn stderr_lines(&self) -> Vec<String> {
        self.logs.lines()
    }

    /// The number of stderr lines captured so far: pass it to [`Server::wait_for_log`] to look
    /// only at lines logged after this point.
    pub(crate) fn log_mark(&self) -> usize {
        self.logs.len()
    }

    /// Waits up to `timeout` for a stderr line (among those after `mark`) matching `pred`.
    pub(crate) fn wait_for_log(
        &self,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs.lines().into_iter().skip(mark).find(|l| pred(l)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Server::wait_for_log`] but panics (describing `what`) if no line matches.
    pub(crate) fn assert_log(
        &self,
        mark: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let line = self.wait_for_log(mark, timeout, pred).unwrap_or_else(|| {
            panic!(
                "no stderr line {what} within {timeout:?}; lines since mark:\n{}",
                self.logs.lines()[mark.min(self.logs.len())..].join("\n")
            )
        });
        eprintln!("matched stderr line {what}: {line}");
        line
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, ...) with `kill -SIG PID`.
    pub(crate) fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{sig} {} failed: {status}",
            self.pid
        );
    }

    /// Polls for the process's exit for up to `timeout`; `None` if it is still running.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Panics (with the exit status and stderr) unless the process is still running.
    pub(crate) fn assert_running(&mut self, context: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            self.logs.wait_eof(Duration::from_secs(1));
            panic!(
                "server is not running {context}: it exited ({})",
                describe_status(status)
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL to self.pid; harmless if already exited
        let status = self.child.wait().ok();
        if thread::panicking() {
            self.logs.wait_eof(Duration::from_secs(1));
            let lines = self.logs.lines();
            let skip = lines.len().saturating_sub(400);
            eprintln!(
                "---- plexus server pid {} stderr ({} lines{}); exit: {} ----",
                self.pid,
                lines.len(),
                if skip > 0 { ", last 400 shown" } else { "" },
                status.map_or_else(|| "unknown".to_string(), describe_status),
            );
            for line in &lines[skip..] {
                eprintln!("{line}");
            }
            eprintln!("---- end of server stderr ----");
        }
    }
}

/// "exit code N" or "killed by signal N".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

/// Lines of a child's stderr, drained forever by a background thread so the pipe never fills.
#[derive(Clone)]
struct LogCapture {
    lines: Arc<Mutex<Vec<String>>>,
    eof: Arc<AtomicBool>,
}

impl LogCapture {
    fn spawn(stderr: ChildStderr) -> LogCapture {
        let capture = LogCapture {
            lines: Arc::default(),
            eof: Arc::new(AtomicBool::new(false)),
        };
        let sink = capture.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                        sink.lines.lock().unwrap().push(line);
                    }
                }
            }
            sink.eof.store(true, Ordering::SeqCst);
        });
        capture
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits (bounded) until the child's stderr reached EOF.
    fn wait_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.eof.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... final-byte`), in case the logger colours output.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses `... listening name=<name> transport=<t> addr=<addr>` (values optionally quoted).
pub(crate) fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening")? + "listening".len()..];
    let mut name = None;
    let mut addr = None;
    for token in rest.split_whitespace() {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        let value = value.trim_matches(|c| c == '"' || c == ',' || c == '}');
        match key {
            "name" => name = Some(value.to_string()),
            "addr" => addr = value.parse().ok(),
            _ => {}
        }
    }
    Some((name?, addr?))
}

/// The `name` of every `[[listener]]` table of a TOML config (a line-based scan, enough for the
/// configs written by these tests).
pub(crate) fn listener_names(config: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_listener = false;
    for line in config.lines().map(str::trim) {
        if line.starts_with('[') {
            in_listener = line == "[[listener]]" || line.starts_with("[listener.");
            continue;
        }
        if !in_listener {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if key.trim() == "name" {
                names.push(value.trim().trim_matches('"').to_string());
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Short-lived commands
// ---------------------------------------------------------------------------------------------

/// What a finished (or timed-out) `plexus` command produced.
pub(crate) struct CmdOutput {
    /// Exit status, or `None` if it was killed after the time bound.
    pub(crate) status: Option<ExitStatus>,
    /// Everything written to stdout.
    pub(crate) stdout: Vec<u8>,
    /// Everything written to stderr (lossy UTF-8, ANSI codes stripped).
    pub(crate) stderr: String,
    /// The arguments, for messages.
    pub(crate) args: Vec<String>,
}

impl CmdOutput {
    /// The exit code; panics with the full output if the command timed out or was signalled.
    pub(crate) fn code(&self) -> i32 {
        match self.status.and_then(|s| s.code()) {
            Some(code) => code,
            None => panic!(
                "`plexus {}` did not exit normally ({}); stderr:\n{}",
                self.args.join(" "),
                self.status
                    .map_or_else(|| "timed out, killed".to_string(), describe_status),
                self.stderr
            ),
        }
    }

    /// Asserts the exit code, showing stdout/stderr on failure.
    pub(crate) fn assert_code(&self, expected: i32) {
        let code = self.code();
        assert_eq!(
            code,
            expected,
            "`plexus {}` exited {code}, expected {expected}\nstdout:\n{}\nstderr:\n{}",
            self.args.join(" "),
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
    }

    /// Asserts stderr contains `needle` (case-insensitive).
    pub(crate) fn assert_stderr_contains(&self, needle: &str) {
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr of `plexus {}` does not mention {needle:?}:\n{}",
            self.args.join(" "),
            self.stderr
        );
    }

    /// Asserts the command did not panic.
    pub(crate) fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "`plexus {}` panicked:\n{}",
            self.args.join(" "),
            self.stderr
        );
    }
}

/// Runs `plexus ARGS...`, feeding `stdin` (then closing it; `None` = /dev/null), and collects
/// its output. Killed (by PID) if it has not exited within `timeout`.
pub(crate) fn run_plexus(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CmdOutput {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plexus");
    let feeder = stdin.map(|data| {
        let data = data.to_vec();
        let mut pipe = child.stdin.take().expect("piped stdin");
        // Dropping the pipe at the end closes the child's stdin.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = read_all_in_thread(child.stdout.take().expect("piped stdout"));
    let err = read_all_in_thread(child.stderr.take().expect("piped stderr"));

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    CmdOutput {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: strip_ansi(&String::from_utf8_lossy(
            &err.join().expect("stderr reader"),
        )),
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// Reads a pipe to its end on a background thread.
fn read_all_in_thread(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

/// Connects with [`CONNECT_TIMEOUT`] and [`IO_TIMEOUT`] read/write timeouts; panics on failure.
pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Like [`connect`] but returns the error.
pub(crate) fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    connect_socket(addr, None, None)
}

/// Connects from a given local IP (e.g. 127.0.0.2; any port), panicking on failure.
pub(crate) fn connect_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    connect_socket(addr, Some(local), None)
        .unwrap_or_else(|e| panic!("connect from {local} to {addr}: {e}"))
}

/// Connects with SO_RCVBUF set to `bytes` before connecting (so the window stays small).
pub(crate) fn connect_small_rcvbuf(addr: SocketAddr, bytes: usize) -> TcpStream {
    connect_socket(addr, None, Some(bytes))
        .unwrap_or_else(|e| panic!("connect to {addr} with SO_RCVBUF={bytes}: {e}"))
}

/// The general connect: optional local IP to bind and SO_RCVBUF, [`CONNECT_TIMEOUT`], and
/// [`IO_TIMEOUT`] for reads and writes.
pub(crate) fn connect_socket(
    addr: SocketAddr,
    local: Option<IpAddr>,
    rcvbuf: Option<usize>,
) -> io::Result<TcpStream> {
    connect_socket_within(addr, local, rcvbuf, CONNECT_TIMEOUT)
}

/// [`connect_socket`] with an explicit connect timeout.
pub(crate) fn connect_socket_within(
    addr: SocketAddr,
    local: Option<IpAddr>,
    rcvbuf: Option<usize>,
    connect_timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes)?;
    }
    if let Some(ip) = local {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), connect_timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `msg` and asserts the same bytes come back (bounded by the socket's read timeout).
pub(crate) fn assert_echo(stream: &mut TcpStream, msg: &[u8]) {
    stream
        .write_all(msg)
        .unwrap_or_else(|e| panic!("write {:?}: {e}", String::from_utf8_lossy(msg)));
    let mut back = vec![0u8; msg.len()];
    stream
        .read_exact(&mut back)
        .unwrap_or_else(|e| panic!("read echo of {:?}: {e}", String::from_utf8_lossy(msg)));
    assert_eq!(
        String::from_utf8_lossy(&back),
        String::from_utf8_lossy(msg),
        "echo mismatch"
    );
}

/// How a connection attempt that should be refused turned out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// `connect` itself failed.
    ConnectFailed(String),
    /// Connected, but the server closed it (EOF or reset) without echoing.
    Closed,
    /// The probe message came back: the connection was served.
    Echoed,
    /// Neither an echo nor a close within the wait.
    NoAnswer,
    /// Something else came back.
    Garbage(Vec<u8>),
}

impl Probe {
    /// True for the two ways a server refuses: connect failure or close without echo.
    pub(crate) fn refused(&self) -> bool {
        matches!(self, Probe::ConnectFailed(_) | Probe::Closed)
    }
}

/// Sends `msg` on an open stream and classifies what comes back within `wait`.
pub(crate) fn probe_stream(stream: &mut TcpStream, msg: &[u8], wait: Duration) -> Probe {
    // Writing may fail already if the server reset the connection: that is a close.
    if let Err(e) = stream.write_all(msg) {
        return if is_reset(&e) {
            Probe::Closed
        } else {
            Probe::Garbage(e.to_string().into())
        };
    }
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if got.is_empty() {
                Probe::NoAnswer
            } else {
                Probe::Garbage(got)
            };
        }
        stream
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        match stream.read(&mut buf) {
            Ok(0) => {
                return if got.is_empty() {
                    Probe::Closed
                } else {
                    Probe::Garbage(got)
                }
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got == msg {
                    return Probe::Echoed;
                }
                if !msg.starts_with(&got) {
                    return Probe::Garbage(got);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_reset(&e) => {
                return if got.is_empty() {
                    Probe::Closed
                } else {
                    Probe::Garbage(got)
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Probe::Garbage(e.to_string().into()),
        }
    }
}

/// Connects (optionally from `local`) and probes with `msg`, see [`probe_stream`].
pub(crate) fn probe(addr: SocketAddr, local: Option<IpAddr>, msg: &[u8], wait: Duration) -> Probe {
    match connect_socket(addr, local, None) {
        Ok(mut stream) => probe_stream(&mut stream, msg, wait),
        Err(e) => Probe::ConnectFailed(e.to_string()),
    }
}

/// Asserts the server closes `stream` (EOF or reset) within `within` without echoing a probe.
pub(crate) fn assert_closed_without_echo(stream: &mut TcpStream, within: Duration, what: &str) {
    let outcome = probe_stream(stream, b"x", within);
    assert_eq!(
        outcome,
        Probe::Closed,
        "{what}: expected the server to close the connection"
    );
}

/// Retries `probe` every 100 ms for up to `within` until the connection is served (echoes);
/// panics with the last outcome otherwise.
pub(crate) fn wait_until_served(addr: SocketAddr, within: Duration, what: &str) -> TcpStream {
    let deadline = Instant::now() + within;
    loop {
        let last = match connect_socket(addr, None, None) {
            Ok(mut stream) => match probe_stream(&mut stream, b"again\n", Duration::from_secs(2)) {
                Probe::Echoed => {
                    stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .expect("set_read_timeout");
                    return stream;
                }
                other => other,
            },
            Err(e) => Probe::ConnectFailed(e.to_string()),
        };
        if Instant::now() > deadline {
            panic!("{what}: no connection was served within {within:?}; last attempt: {last:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts the next read on `stream` is EOF (within the socket's read timeout).
pub(crate) fn assert_eof(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{what}: expected EOF, got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: expected EOF, got error {e}"),
    }
}

/// Reads and discards until EOF or a reset, for up to `within`. Returns the number of bytes
/// discarded, or an error describing why the end was not seen.
pub(crate) fn drain_until_closed(stream: &mut TcpStream, within: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + within;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("still open after {within:?} ({total} bytes read)"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if is_reset(&e) => return Ok(total),
            Err(e) if e.kind() == ErrorKind::Interrupted || is_timeout(&e) => {}
            Err(e) => return Err(format!("read error {e} after {total} bytes")),
        }
    }
}

/// A connection reset / abort / broken pipe.
pub(crate) fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// Byte `i` of the test pattern: not periodic over small windows, so a lost, duplicated or
/// reordered chunk is detected.
pub(crate) fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(i / 7)) as u8
}

/// Fills `buf` with the pattern bytes starting at stream offset `offset`.
pub(crate) fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + k as u64);
    }
}

/// Checks `buf` against the pattern at `offset`; `Err(absolute offset)` of the first mismatch.
pub(crate) fn check_pattern(offset: u64, buf: &[u8]) -> Result<(), u64> {
    match buf
        .iter()
        .enumerate()
        .find(|(k, b)| **b != pattern_byte(offset + *k as u64))
    {
        Some((k, _)) => Err(offset + k as u64),
        None => Ok(()),
    }
}

/// Writes pattern bytes `[from, to)` in `chunk`-sized writes, sleeping `pause` after each.
pub(crate) fn write_pattern(
    stream: &mut TcpStream,
    from: u64,
    to: u64,
    chunk: usize,
    pause: Duration,
) -> io::Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut offset = from;
    while offset < to {
        let n = chunk.min((to - offset) as usize);
        fill_pattern(offset, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        offset += n as u64;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    Ok(())
}

/// Reads until EOF, verifying every byte against the pattern, and returns the byte count.
/// Fails on a mismatch, on more than `expected` bytes, on a read error or timeout, or when
/// `deadline` passes. `progress` (if given) is updated with the count as data arrives.
pub(crate) fn read_pattern_to_eof(
    stream: &mut TcpStream,
    expected: u64,
    deadline: Instant,
    progress: Option<&AtomicU64>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        if Instant::now() > deadline {
            return Err(format!("deadline passed after {total} of {expected} bytes"));
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read error after {total} of {expected} bytes: {e}")),
        };
        check_pattern(total, &buf[..n])
            .map_err(|at| format!("pattern mismatch at byte {at} (of {expected})"))?;
        total += n as u64;
        if total > expected {
            return Err(format!(
                "received {total} bytes, more than the {expected} sent"
            ));
        }
        if let Some(p) = progress {
            p.store(total, Ordering::SeqCst);
        }
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub(crate) fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// A `kB` field of /proc/PID/status, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident set size of process `pid`, KiB (VmRSS).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident set size of process `pid`, KiB (VmHWM).
pub(crate) fn hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

/// Whether process `pid` ignores (`SigIgn`) or catches (`SigCgt`) signal number `signo`, i.e.
/// its disposition is not the default action (from /proc/PID/status).
pub(crate) fn signal_not_default(pid: u32, signo: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let mask = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    };
    (mask("SigIgn") | mask("SigCgt")) & (1u64 << (signo - 1)) != 0
}

/// CPU time (user + system) used by process `pid`, in clock ticks (1/100 s).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name, which is in parentheses and may contain spaces: the
    // first one after ')' is field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let rest = &stat[stat.rfind(')').expect("')' in stat") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// The value of the `/metrics` sample whose line starts with `sample` (a family name, with its
/// labels if it has any), from the http listener at `http`; 0 when it is absent.
pub(crate) fn metric(http: SocketAddr, sample: &str) -> u64 {
    let mut stream = connect(http);
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
