//! End-to-end tests of the `resp_server` example against real Redis clients: `redis-cli` for
//! every command's reply, `redis-benchmark` for pipelined load, and raw sockets for malformed
//! and oversized input. Each test runs the example binary on an ephemeral port, finds the
//! address in its `listening name=resp transport=tcp addr=…` line, and kills it by PID.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The example binary, built if it is missing or older than its sources (a workspace build
/// with `--all-targets` has built it already, next to this test's directory).
fn example_binary() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<this test> → target/<profile>/examples/resp_server
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = profile_dir.join("examples").join("resp_server");
    let newest_source = [manifest.join("examples/resp_server"), manifest.join("src")]
        .iter()
        .map(|dir| newest_mtime(dir))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let fresh = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= newest_source);
    if !fresh {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "plexus", "--example", "resp_server"]);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build --example resp_server failed");
    }
    binary
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(newest)
        };
        newest = newest.max(time);
    }
    newest
}

/// A running `resp_server`; killed (by PID) and reaped on drop.
struct RespServer {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl RespServer {
    fn start() -> RespServer {
        let mut child = Command::new(example_binary())
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start resp_server");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, addr) = mpsc::channel();
        let lines = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening name=resp transport=tcp addr=") {
                    let _ = found.send(addr.parse::<SocketAddr>().expect("logged address"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut server = RespServer {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        match addr.recv_timeout(START_TIMEOUT) {
            Ok(addr) => server.addr = addr,
            Err(_) => panic!("no listening line; log: {:?}", server.log.lock().unwrap()),
        }
        server
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// `redis-cli` fed `commands` on stdin (one per line), in its human-readable format.
    fn cli(&self, commands: &[&str]) -> String {
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port(), "--no-raw"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli (Debian redis-tools) is installed");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{}\n", commands.join("\n")).as_bytes())
            .unwrap();
        drop(stdin);
        let output = wait_bounded(child, Duration::from_secs(30), "redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        // SIGKILL by PID (Child::kill), then reap.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("resp_server log:\n{}", self.log.lock().unwrap().join("\n"));
        }
    }
}

/// Waits for `child` up to `limit`, killing it (by PID) past that.
fn wait_bounded(child: Child, limit: Duration, what: &str) -> Output {
    let pid = child.id();
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match result.recv_timeout(limit) {
        Ok(output) => output.expect("wait for child"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} (pid {pid}) ran longer than {limit:?}");
        }
    }
}

/// Everything the server sends until it closes the connection.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => out,
        Err(err) if err.kind() == ErrorKind::ConnectionReset => out,
        Err(err) => panic!("read: {err} after {:?}", String::from_utf8_lossy(&out)),
    }
}

/// Reads exactly `expected.len()` bytes and compares them.
fn expect_reply(stream: &mut TcpStream, expected: &[u8]) {
    let mut got = vec![0; expected.len()];
    stream.read_exact(&mut got).expect("reply");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

#[test]
fn redis_cli_round_trips_every_command() {
    let server = RespServer::start();
    let cases: &[(&str, &str)] = &[
        ("PING", "PONG"),
        ("ping hello", "\"hello\""),
        ("ECHO \"a b\"", "\"a b\""),
        ("SET k v", "OK"),
        ("GET k", "\"v\""),
        ("GET missing", "(nil)"),
        ("SET k v2 NX", "(nil)"),
        ("SET k v2 XX", "OK"),
        ("GET k", "\"v2\""),
        ("SET fresh v XX", "(nil)"),
        ("SET k v3 GET", "\"v2\""),
        ("SET n 1 EX 100", "OK"),
        ("TTL n", "(integer) 100"),
        ("SET p 1 PX 100000", "OK"),
        ("TTL p", "(integer) 100"),
        ("SET p 2 KEEPTTL", "OK"),
        ("TTL p", "(integer) 100"),
        (
            "SET k v EX 0",
            "(error) ERR invalid expire time in 'set' command",
        ),
        (
            "SET k v EX x",
            "(error) ERR value is not an integer or out of range",
        ),
        ("SET k v NX XX", "(error) ERR syntax error"),
        ("SET k v EX 1 PX 1", "(error) ERR syntax error"),
        (
            "SET k",
            "(error) ERR wrong number of arguments for 'set' command",
        ),
        ("DEL k missing", "(integer) 1"),
        ("DEL k", "(integer) 0"),
        ("EXISTS n n missing", "(integer) 2"),
        ("INCR c", "(integer) 1"),
        ("INCRBY c 41", "(integer) 42"),
        ("INCRBY c -50", "(integer) -8"),
        ("GET c", "\"-8\""),
        (
            "INCRBY c x",
            "(error) ERR value is not an integer or out of range",
        ),
        ("SET s abc", "OK"),
        (
            "INCR s",
            "(error) ERR value is not an integer or out of range",
        ),
        ("SET big 9223372036854775807", "OK"),
        (
            "INCR big",
            "(error) ERR increment or decrement would overflow",
        ),
        ("INCR n", "(integer) 2"),
        ("TTL n", "(integer) 100"),
        ("MSET a 1 b 2", "OK"),
        ("MGET a b missing", "1) \"1\"\n2) \"2\"\n3) (nil)"),
        (
            "MSET a",
            "(error) ERR wrong number of arguments for 'mset' command",
        ),
        (
            "MSET a 1 b",
            "(error) ERR wrong number of arguments for 'mset' command",
        ),
        ("EXPIRE a 100", "(integer) 1"),
        ("TTL a", "(integer) 100"),
        ("EXPIRE a 200 LT", "(integer) 0"),
        ("EXPIRE a 50 GT", "(integer) 0"),
        ("EXPIRE a 50 LT", "(integer) 1"),
        ("TTL a", "(integer) 50"),
        ("EXPIRE b 10 XX", "(integer) 0"),
        (
            "EXPIRE b 10 NX XX",
            "(error) ERR NX and XX, GT or LT options at the same time are not compatible",
        ),
        ("EXPIRE missing 10", "(integer) 0"),
        ("TTL b", "(integer) -1"),
        ("TTL missing", "(integer) -2"),
        ("EXPIRE b -1", "(integer) 1"),
        ("EXISTS b", "(integer) 0"),
        (
            "EXPIRE a x",
            "(error) ERR value is not an integer or out of range",
        ),
        ("DBSIZE", "(integer) 6"),
        (
            "GET",
            "(error) ERR wrong number of arguments for 'get' command",
        ),
        (
            "DBSIZE x",
            "(error) ERR wrong number of arguments for 'dbsize' command",
        ),
        (
            "FOO bar \"b z\"",
            "(error) ERR unknown command 'FOO', with args beginning with: 'bar' 'b z' ",
        ),
        ("COMMAND COUNT", "(integer) 21"),
        ("COMMAND DOCS", "(empty array)"),
        (
            "COMMAND NOPE",
            "(error) ERR unknown subcommand 'NOPE'. Try COMMAND HELP.",
        ),
        ("CONFIG GET save", "1) \"save\"\n2) \"\""),
        ("CONFIG GET appendonly", "1) \"appendonly\"\n2) \"no\""),
        ("CONFIG GET nothing", "(empty array)"),
        (
            "HELLO 3",
            "(error) NOPROTO sorry, this protocol version is not supported.",
        ),
        ("CLIENT SETNAME test", "OK"),
        ("SELECT 0", "OK"),
        ("SELECT 1", "(error) ERR DB index is out of range"),
        ("FLUSHALL", "OK"),
        ("DBSIZE", "(integer) 0"),
        (
            "PING a b",
            "(error) ERR wrong number of arguments for 'ping' command",
        ),
    ];
    let commands: Vec<&str> = cases.iter().map(|(command, _)| *command).collect();
    let output = server.cli(&commands);
    let mut lines = output.lines();
    for (command, expected) in cases {
        let got: Vec<&str> = (0..expected.lines().count())
            .map(|_| lines.next().unwrap_or("<no more output>"))
            .collect();
        assert_eq!(got.join("\n"), *expected, "reply to {command}");
    }
    assert_eq!(lines.next(), None, "no output beyond the replies");
}

#[test]
fn command_replies_with_the_command_table() {
    let server = RespServer::start();
    let mut stream = server.connect();
    stream.write_all(b"*2\r\n$7\r\nCOMMAND\r\n$4\r\nINFO\r\n*4\r\n$7\r\nCOMMAND\r\n$4\r\nINFO\r\n$3\r\nget\r\n").unwrap();
    stream.write_all(b"$4\r\nnope\r\n").unwrap();
    expect_reply(&mut stream, b"*0\r\n");
    expect_reply(
        &mut stream,
        b"*2\r\n*10\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n:1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n*-1\r\n",
    );
    // The whole table through redis-cli: one entry per command, the first being ping.
    let output = server.cli(&["COMMAND"]);
    assert!(
        output.starts_with(" 1)  1) \"ping\"\n     2) (integer) -1\n"),
        "{output}"
    );
    assert_eq!(output.matches("10) (empty array)").count(), 21, "{output}");
}

#[test]
fn pipelined_commands_are_answered_in_order_in_bulk_and_one_byte_at_a_time() {
    let server = RespServer::start();
    let batch: &[u8] =
        b"PING\r\n*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2\r\n41\r\n*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n\
          *0\r\n*2\r\n$4\r\nECHO\r\n$4\r\n\r\n\0*\r\nGET x\r\n*1\r\n$3\r\nNOP\r\n";
    let replies: &[u8] = b"+PONG\r\n+OK\r\n:42\r\n$4\r\n\r\n\0*\r\n$2\r\n42\r\n\
          -ERR unknown command 'NOP', with args beginning with: \r\n";
    let mut bulk = server.connect();
    bulk.write_all(batch).unwrap();
    expect_reply(&mut bulk, replies);
    let mut trickle = server.connect();
    trickle.set_nodelay(true).unwrap();
    for byte in batch {
        trickle.write_all(&[*byte]).unwrap();
    }
    // The same keyspace: `SET x 41` then `INCR x` answers 42 again.
    expect_reply(&mut trickle, replies);
    // QUIT answers and closes.
    trickle.write_all(b"QUIT\r\nPING\r\n").unwrap();
    assert_eq!(read_to_close(&mut trickle), b"+OK\r\n");
}

#[test]
fn malformed_and_oversized_input_get_an_error_and_a_close_while_others_are_served() {
    let server = RespServer::start();
    let mut other = server.connect();
    other.write_all(b"SET kept 1\r\n").unwrap();
    expect_reply(&mut other, b"+OK\r\n");
    let cases: &[(&[u8], &[u8])] = &[
        (
            b"PING\r\n*1\r\n+OK\r\n",
            b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*1\r\n$999999999999\r\n",
            b"-ERR Protocol error: too big request (999999999999 bytes, the limit is 67108864)\r\n",
        ),
        (
            b"*99999999\r\n",
            b"-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$x\r\n",
            b"-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$2\r\nGETX\r\n",
            b"-ERR Protocol error: expected CRLF after a bulk string, got 'T'\r\n",
        ),
    ];
    for (input, expected) in cases {
        let mut bad = server.connect();
        bad.write_all(input).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&read_to_close(&mut bad)),
            String::from_utf8_lossy(expected),
            "reply to {:?}, then a close",
            String::from_utf8_lossy(input)
        );
        other.write_all(b"GET kept\r\n").unwrap();
        expect_reply(&mut other, b"$1\r\n1\r\n");
    }
    // An inline line with no end, past 64 KiB: refused. (Just past it, and nothing more: a
    // server that closes with unread bytes resets the connection, and the reset can discard
    // the reply before the client reads it.)
    let mut flood = server.connect();
    flood.write_all(&vec![b'a'; (64 << 10) + 100]).unwrap();
    let reply = read_to_close(&mut flood);
    assert!(
        reply.starts_with(b"-ERR Protocol error: too big request"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    other.write_all(b"PING\r\n").unwrap();
    expect_reply(&mut other, b"+PONG\r\n");
    // The server's stderr is read by another thread: wait (bounded) for the line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = |log: &str| log.contains("Protocol error: invalid multibulk length; closing");
    let mut log = server.log.lock().unwrap().join("\n");
    while !logged(&log) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = server.log.lock().unwrap().join("\n");
    }
    assert!(logged(&log), "{log}");
}

#[test]
fn keys_expire_lazily_and_by_the_timer_sweep() {
    let server = RespServer::start();
    let mut stream = server.connect();
    stream
        .write_all(b"SET lazy 1 PX 100\r\nSET kept 1\r\n")
        .unwrap();
    expect_reply(&mut stream, b"+OK\r\n+OK\r\n");
    let mut batch = Vec::new();
    for i in 0..200 {
        batch.extend_from_slice(format!("SET swept:{i} v PX 50\r\n").as_bytes());
    }
    stream.write_all(&batch).unwrap();
    expect_reply(&mut stream, &b"+OK\r\n".repeat(200));
    thread::sleep(Duration::from_millis(150));
    stream.write_all(b"GET lazy\r\n").unwrap();
    expect_reply(&mut stream, b"$-1\r\n");
    // DBSIZE looks at no key: only the sweep makes the expired ones go.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        stream.write_all(b"DBSIZE\r\n").unwrap();
        let mut reply = [0; 4];
        stream.read_exact(&mut reply).unwrap();
        if &reply == b":1\r\n" {
            break;
        }
        let mut rest = Vec::new();
        while rest.last() != Some(&b'\n') {
            let mut byte = [0];
            stream.read_exact(&mut byte).unwrap();
            rest.push(byte[0]);
        }
        assert!(Instant::now() < deadline, "expired keys were never swept");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_benchmark_pipelined_has_no_errors() {
    let server = RespServer::start();
    let child = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port()])
        .args([
            "-t",
            "ping,set,get,incr,mset",
            "-P",
            "16",
            "-n",
            "20000",
            "-c",
            "10",
        ])
        .arg("-q")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark (Debian redis-tools) is installed");
    let output = wait_bounded(child, Duration::from_secs(120), "redis-benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("rror") && !stderr.contains("rror"),
        "{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("Could not fetch server CONFIG"),
        "CONFIG GET is answered: {stderr}"
    );
    // -q prints one "NAME: N requests per second" line per test (the \r progress lines aside).
    for test in [
        "PING_INLINE",
        "PING_MBULK",
        "SET",
        "GET",
        "INCR",
        "MSET (10 keys)",
    ] {
        let line = stdout
            .split(['\r', '\n'])
            .rfind(|line| line.starts_with(&format!("{test}: ")))
            .unwrap_or_else(|| panic!("no {test} line in {stdout}"));
        let rate: f64 = line[test.len() + 2..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {line:?}"));
        assert!(rate > 0.0, "{line}");
    }
    // Every INCR arrived and was answered: the counter counts exactly the requests. (SET and
    // MSET stored 3-byte values under one key.)
    let output = server.cli(&["GET counter:__rand_int__", "GET key:__rand_int__"]);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "\"20000\"", "{output}");
    assert_eq!(lines[1].len(), 5, "a 3-byte value: {output}");
}
