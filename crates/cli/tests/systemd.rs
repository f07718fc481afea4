//! systemd integration: `sd_notify` messages (READY, RELOADING, STOPPING, WATCHDOG) arrive on a
//! test-owned unix datagram socket named by `NOTIFY_SOCKET` (path and abstract names), and
//! socket activation through the distribution's `systemd-socket-activate` hands plexus its
//! listening socket, matched by `LISTEN_FDNAMES` to the listener's name.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const NOTIFY_WAIT: Duration = Duration::from_secs(10);

/// Receives datagrams until one contains `wanted` (or panics after [`NOTIFY_WAIT`]); returns
/// that datagram and every one received on the way.
fn expect_state(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + NOTIFY_WAIT;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(message.clone());
                if message.lines().any(|line| line == wanted) {
                    return message;
                }
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(err) => panic!("recv on the notify socket: {err}"),
        }
    }
    panic!("no {wanted:?} within {NOTIFY_WAIT:?}; received: {seen:?}");
}

#[test]
fn notify_socket_receives_ready_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut server = Server::start_with(
        &[],
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &echo_config(""),
    );
    let mut seen = Vec::new();
    let ready = expect_state(&socket, "READY=1", &mut seen);
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", server.pid())),
        "{ready:?}"
    );
    // Ready means serving.
    let mut stream = connect(server.addr("tcp-echo"));
    assert_echo(&mut stream, b"ready means serving\n");

    // Every WATCHDOG_USEC/2 = 100 ms; two pings prove it repeats.
    expect_state(&socket, "WATCHDOG=1", &mut seen);
    expect_state(&socket, "WATCHDOG=1", &mut seen);

    server.signal("HUP");
    let reloading = expect_state(&socket, "RELOADING=1", &mut seen);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    expect_state(&socket, "READY=1", &mut seen);

    drop(stream);
    server.signal("TERM");
    expect_state(&socket, "STOPPING=1", &mut seen);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn notify_socket_may_be_an_abstract_name() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("plexus-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let _server = Server::start_with(
        &[],
        &[],
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
        &echo_config(""),
    );
    expect_state(&socket, "READY=1", &mut Vec::new());
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_server_runs() {
    // The variable removed explicitly: the test runner could be a systemd service itself.
    let server = Server::start_with(&[], &[], &[("NOTIFY_SOCKET", "")], &echo_config(""));
    let mut stream = connect(server.addr("tcp-echo"));
    assert_echo(&mut stream, b"no systemd\n");
    assert!(!server
        .stderr_lines()
        .iter()
        .any(|l| l.contains("notify systemd")));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have_socket_activate() -> bool {
    Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn socket_activation_hands_the_named_socket_to_its_listener_and_warns_about_the_rest() {
    if !have_socket_activate() {
        eprintln!("skipped: systemd-socket-activate is not installed (package systemd)");
        return;
    }
    let (port, spare_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // systemd-socket-activate execs plexus on the first connection: make one, and keep it.
    let client = thread::spawn(move || {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match try_connect(addr) {
                Ok(mut stream) => {
                    assert_echo(&mut stream, b"first connection, queued before plexus ran\n");
                    return;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(err) => panic!("connect to the activation socket {addr}: {err}"),
            }
        }
    });
    let listen = format!("--listen=127.0.0.1:{port}");
    let spare = format!("--listen=127.0.0.1:{spare_port}");
    let server = Server::start_with(
        &[
            "systemd-socket-activate",
            &listen,
            &spare,
            "--fdname=tcp-echo:not-a-listener",
        ],
        &[],
        &[],
        &echo_config(""),
    );
    client.join().expect("the first client was served");
    assert_eq!(
        server.addr("tcp-echo"),
        addr,
        "the inherited socket is used"
    );
    server.assert_log(
        0,
        Duration::from_secs(5),
        "naming the adopted socket",
        |l| l.contains("using the socket passed by the service manager") && l.contains("tcp-echo"),
    );
    server.assert_log(
        0,
        Duration::from_secs(5),
        "about the unmatched socket",
        |l| {
            l.contains("WARN")
                && l.contains("name not-a-listener")
                && l.contains("matches no listener")
        },
    );
    let mut stream = connect(addr);
    assert_echo(&mut stream, b"and later connections\n");
    // The unmatched descriptor was closed: nothing listens there any more.
    let spare_addr: SocketAddr = format!("127.0.0.1:{spare_port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || try_connect(spare_addr).is_err()),
        "the unmatched socket is closed"
    );
}

#[test]
fn socket_activation_without_names_matches_by_position() {
    if !have_socket_activate() {
        eprintln!("skipped: systemd-socket-activate is not installed (package systemd)");
        return;
    }
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = thread::spawn(move || {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match try_connect(addr) {
                Ok(mut stream) => {
                    assert_echo(&mut stream, b"by position\n");
                    return;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(err) => panic!("connect to the activation socket {addr}: {err}"),
            }
        }
    });
    let listen = format!("--listen=127.0.0.1:{port}");
    let server = Server::start_with(
        &["systemd-socket-activate", &listen],
        &[],
        &[],
        &echo_config(""),
    );
    client.join().expect("the first client was served");
    assert_eq!(
        server.addr("tcp-echo"),
        addr,
        "the first listener took descriptor 3"
    );
}
