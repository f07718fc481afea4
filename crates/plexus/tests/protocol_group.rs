//! End-to-end tests of the `protocol_group` example: one port, four protocols (binary frames,
//! TLS with detection again inside, HTTP/1.1, upper-cased lines), each in bulk and one byte at
//! a time, plain and inside TLS, with real peers (`curl`, `openssl s_client`), and the time
//! budget's fallback.
//!
//! "One byte at a time" goes through a relay in this test that forwards the client's bytes to
//! the server one per write (flushed, with a short pause), so even the TLS ClientHello arrives
//! in pieces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use plexus_testkit::{curl, read_until, through_openssl};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The example's process, killed by PID when dropped.
struct Example {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example's binary, built if needed (with the test's own profile, next to its deps).
fn example_binary() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "plexus", "--example", "protocol_group"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the example failed");
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/protocol_group
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile.join("examples").join("protocol_group")
}

/// Starts the example on a free loopback port with time budget `budget`; waits (bounded) for
/// its `listening name=… addr=…` line.
fn start(budget: &str) -> Example {
    let mut child = Command::new(example_binary())
        .args(["127.0.0.1:0", budget])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("listening name=group") {
                let addr = line
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix("addr="))
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let mut example = Example {
        child,
        addr: "127.0.0.1:0".parse().expect("literal"),
    };
    example.addr = rx
        .recv_timeout(IO_TIMEOUT)
        .ok()
        .flatten()
        .expect("the example logs its listening line");
    example
}

/// A relay on a free port: one connection at a time, the client's bytes go to `server` one
/// byte per write; the server's bytes come back as they are.
fn dribbling_relay(server: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(upstream) = TcpStream::connect(server) else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let (mut c_read, mut u_write) = (client.try_clone().expect("clone"), upstream);
            let mut u_read = u_write.try_clone().expect("clone");
            let mut c_write = client;
            thread::spawn(move || {
                let _ = std::io::copy(&mut u_read, &mut c_write);
                let _ = c_write.shutdown(Shutdown::Write);
            });
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            for byte in &buf[..n] {
                                if u_write.write_all(&[*byte]).is_err() {
                                    return;
                                }
                                let _ = u_write.flush();
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                }
                let _ = u_write.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("short payload");
    let mut out = vec![0xB7];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Two frames (the second split across the first's write) and the answers they get.
fn binary_exchange() -> (Vec<u8>, Vec<u8>) {
    let mut request = frame(b"hello, binary");
    request.extend(frame(&[1, 2, 3, 0xB7, 0]));
    let mut expected = frame(b"yranib ,olleh");
    expected.extend(frame(&[0, 0xB7, 3, 2, 1]));
    (request, expected)
}

fn assert_line_and_binary_over_tcp(addr: SocketAddr) {
    let mut lines = connect(addr);
    lines
        .write_all(b"hello, group\nsecond line\n")
        .expect("write");
    let got = read_until(&mut lines, b"SECOND LINE\n", IO_TIMEOUT);
    assert_eq!(got, b"HELLO, GROUP\nSECOND LINE\n");

    let (request, expected) = binary_exchange();
    let mut binary = connect(addr);
    binary.write_all(&request).expect("write");
    assert_eq!(read_until(&mut binary, &expected, IO_TIMEOUT), expected);

    // HTTP by hand (through the relay: one byte at a time).
    let mut http = connect(addr);
    http.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let got =
        String::from_utf8_lossy(&read_until(&mut http, b"\r\n\r\nok", IO_TIMEOUT)).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
}

#[test]
fn four_protocols_on_one_port_in_bulk_and_one_byte_at_a_time() {
    let example = start("10s");
    let relay = dribbling_relay(example.addr);
    for addr in [example.addr, relay] {
        assert_line_and_binary_over_tcp(addr);

        let (code, out) = curl(&[&format!("http://{addr}/healthz")]);
        assert_eq!((code, out.as_str()), (0, "ok"), "plain http via {addr}");
        let (code, out) = curl(&["-k", &format!("https://{addr}/healthz")]);
        assert_eq!((code, out.as_str()), (0, "ok"), "https via {addr}");
    }
}

#[test]
fn line_and_binary_protocols_inside_tls() {
    let example = start("10s");
    let relay = dribbling_relay(example.addr);
    let (request, expected) = binary_exchange();
    // Direct (application bytes at once or one per TLS record), and through the relay (the
    // handshake itself one byte at a time).
    for (addr, dribble) in [(example.addr, false), (example.addr, true), (relay, false)] {
        let got = through_openssl(addr, b"inside tls\n", b"INSIDE TLS\n", dribble, IO_TIMEOUT);
        assert_eq!(got, b"INSIDE TLS\n", "line via {addr}, dribble {dribble}");
        let got = through_openssl(addr, &request, &expected, dribble, IO_TIMEOUT);
        assert_eq!(got, expected, "binary via {addr}, dribble {dribble}");
    }
    // HTTP inside TLS, its request one byte per record.
    let got = through_openssl(
        example.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\n\r\nok",
        true,
        IO_TIMEOUT,
    );
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // What the group decided, per layer, on /metrics (itself one more plain http session):
    // seven TLS sessions; inside them three binary, one http, and three lines (no member
    // claims "inside tls", so the fallback, at once).
    let metrics = metrics(example.addr);
    for (layer, member, count) in [
        ("plain", "tls", 7),
        ("plain", "binary", 0),
        ("plain", "http", 1),
        ("tls", "binary", 3),
        ("tls", "http", 1),
    ] {
        let line = format!(
            "plexus_protocol_group_sessions_total{{listener=\"group\",layer=\"{layer}\",member=\"{member}\"}} {count}\n"
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    for (layer, reason, count) in [
        ("plain", "no_match", 0),
        ("tls", "no_match", 3),
        ("tls", "time_budget", 0),
    ] {
        let line = format!(
            "plexus_protocol_group_fallbacks_total{{listener=\"group\",layer=\"{layer}\",reason=\"{reason}\"}} {count}\n"
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

/// The example's `/metrics` page (its http member serves it to loopback clients).
fn metrics(addr: SocketAddr) -> String {
    let (code, out) = curl(&[&format!("http://{addr}/metrics")]);
    assert_eq!(code, 0, "{out}");
    out
}

#[test]
fn an_undecided_client_gets_the_line_protocol_when_the_time_budget_passes() {
    let example = start("300ms");
    let mut client = connect(example.addr);
    // "G" could start GET: the group waits for more, until the time budget passes.
    client.write_all(b"G").expect("write");
    client.flush().expect("flush");
    thread::sleep(Duration::from_secs(2));
    // Had the group still been waiting, this would be an HTTP request; the fallback (the
    // line protocol) was chosen instead and answers the whole line, "G" included.
    client
        .write_all(b"ET /healthz HTTP/1.1\r\n\r\n")
        .expect("write");
    let got = read_until(&mut client, b"HTTP/1.1", IO_TIMEOUT);
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("GET /HEALTHZ HTTP/1.1"), "{got}");

    // A client that sends nothing at all gets the fallback too.
    let mut silent = connect(example.addr);
    thread::sleep(Duration::from_secs(2));
    silent.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let got =
        String::from_utf8_lossy(&read_until(&mut silent, b"HTTP/1.1", IO_TIMEOUT)).into_owned();
    assert!(got.starts_with("GET / HTTP/1.1"), "{got}");

    // Both were the time budget's fallbacks, and counted as such.
    let metrics = metrics(example.addr);
    for line in [
        "plexus_protocol_group_fallbacks_total{listener=\"group\",layer=\"plain\",reason=\"time_budget\"} 2\n",
        "plexus_protocol_group_budget_spent_total{listener=\"group\",layer=\"plain\",budget=\"time\"} 2\n",
        "plexus_protocol_group_sessions_total{listener=\"group\",layer=\"plain\",member=\"http\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}
