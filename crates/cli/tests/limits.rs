//! End-to-end tests of the server's limits: idle timeout, ACLs, connection caps, and running
//! out of file descriptors.

mod common;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LOCAL_1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LOCAL_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL_3: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A silent connection is closed after `idle_timeout` (1 s; EOF well within 10 s), while one
/// that talks every 300 ms for 3 s stays open.
#[test]
fn idle_timeout_closes_silent_sessions_only() {
    let config = echo_config("").replace(r#"idle_timeout = "60s""#, r#"idle_timeout = "1s""#);
    let server = Server::start(&config);
    let addr = server.addr("tcp-echo");

    let opened = Instant::now();
    let mut silent = connect(addr);
    let mut chatty = connect(addr);
    for i in 0..10 {
        assert_echo(&mut chatty, format!("tick {i}\n").as_bytes());
        thread::sleep(Duration::from_millis(300));
    }
    assert_echo(&mut chatty, b"still here\n");

    // The silent one has been closed by now (or is closed within what is left of 10 s).
    let left = Duration::from_secs(10).saturating_sub(opened.elapsed());
    silent
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 16];
    match silent.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("silent connection received {n} unexpected bytes"),
        Err(e) => panic!("silent connection not closed within 10 s of opening: {e}"),
    }
}

/// Global `[acl] deny`: a client from 127.0.0.2 is closed without being served, one from
/// 127.0.0.1 is served, and the refusal is logged with reason `acl`.
#[test]
fn global_acl_deny() {
    let config = echo_config("").replace(
        "[[listener]]",
        "[acl]\ndeny = [\"127.0.0.2/32\"]\n\n[[listener]]",
    );
    let server = Server::start(&config);
    let addr = server.addr("tcp-echo");
    let mark = server.log_mark();

    let mut denied = connect_from(LOCAL_2, addr);
    assert_closed_without_echo(
        &mut denied,
        Duration::from_secs(5),
        "client 127.0.0.2 (denied)",
    );

    let mut allowed = connect_from(LOCAL_1, addr);
    assert_echo(&mut allowed, b"from 127.0.0.1\n");

    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning the acl refusal",
        |l| l.to_lowercase().contains("acl"),
    );
}

/// Per-listener `[listener.acl] allow`: on that listener only 127.0.0.3 is served; another
/// listener of the same server without an ACL still serves 127.0.0.1.
#[test]
fn per_listener_acl_allow() {
    let config = r#"[server]
event_loops = 2
idle_timeout = "60s"

[[listener]]
name = "open"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "restricted"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
[listener.acl]
allow = ["127.0.0.3/32"]
"#;
    let server = Server::start(config);
    let restricted = server.addr("restricted");
    let mark = server.log_mark();

    let mut refused = connect_from(LOCAL_1, restricted);
    assert_closed_without_echo(
        &mut refused,
        Duration::from_secs(5),
        "127.0.0.1 on `restricted`",
    );

    let mut served = connect_from(LOCAL_3, restricted);
    assert_echo(&mut served, b"from 127.0.0.3\n");

    let mut other = connect_from(LOCAL_1, server.addr("open"));
    assert_echo(&mut other, b"127.0.0.1 on the open listener\n");

    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning the acl refusal",
        |l| l.to_lowercase().contains("acl"),
    );
}

/// `max_connections = 3`: the 4th connection is closed at once; after one of the three
/// closes, a new connection is served again. The refusal is logged as `max_connections`.
#[test]
fn max_connections() {
    let server = Server::start(&echo_config("max_connections = 3"));
    let addr = server.addr("tcp-echo");
    let mark = server.log_mark();

    let mut open: Vec<_> = (0..3)
        .map(|i| {
            let mut s = connect(addr);
            assert_echo(&mut s, format!("conn {i}\n").as_bytes());
            s
        })
        .collect();

    let mut fourth = connect(addr);
    assert_closed_without_echo(&mut fourth, Duration::from_secs(5), "4th connection");
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning max_connections",
        |l| l.contains("max_connections"),
    );

    drop(open.remove(0));
    let mut again = wait_until_served(addr, Duration::from_secs(5), "after closing one of three");
    // The two survivors are unaffected.
    for (i, s) in open.iter_mut().enumerate() {
        assert_echo(s, format!("survivor {i}\n").as_bytes());
    }
    assert_echo(&mut again, b"replacement\n");
}

/// `max_connections_per_ip = 2`: a third connection from 127.0.0.1 is refused while a
/// connection from 127.0.0.2 is accepted.
#[test]
fn max_connections_per_ip() {
    let server = Server::start(&echo_config("max_connections_per_ip = 2"));
    let addr = server.addr("tcp-echo");

    let mut first = connect_from(LOCAL_1, addr);
    assert_echo(&mut first, b"first\n");
    let mut second = connect_from(LOCAL_1, addr);
    assert_echo(&mut second, b"second\n");

    let mut third = connect_from(LOCAL_1, addr);
    assert_closed_without_echo(
        &mut third,
        Duration::from_secs(5),
        "3rd connection from 127.0.0.1",
    );

    let mut other_ip = connect_from(LOCAL_2, addr);
    assert_echo(&mut other_ip, b"from 127.0.0.2\n");
    assert_echo(&mut first, b"first still served\n");
}

/// Under `prlimit --nofile=64:64`, 200 extra connections exhaust the server's descriptors:
/// an established session keeps being served, the server does not spin (< 50% of one CPU
/// over 3 s), it logs the exhaustion, and it serves new connections once the 200 are gone.
#[test]
fn descriptor_exhaustion_does_not_spin_and_recovers() {
    let server = Server::start_with_prefix(&["prlimit", "--nofile=64:64"], &echo_config(""));
    let addr = server.addr("tcp-echo");
    let pid = server.pid();

    let mut a = connect(addr);
    assert_echo(&mut a, b"A before\n");
    let mark = server.log_mark();

    // Some of these are accepted, the rest stay in the backlog or are closed: either is fine.
    // Short connect timeouts and an overall deadline keep this bounded if the backlog is full.
    let flood_deadline = Instant::now() + Duration::from_secs(10);
    let flood: Vec<_> = (0..200)
        .take_while(|_| Instant::now() < flood_deadline)
        .filter_map(|_| connect_socket_within(addr, None, None, Duration::from_millis(500)).ok())
        .collect();
    assert!(
        flood.len() > 64,
        "only {} of 200 flood connections could connect",
        flood.len()
    );
    thread::sleep(Duration::from_millis(300));
    assert_echo(&mut a, b"A while descriptors are exhausted\n");

    let window = Duration::from_secs(3);
    let before = cpu_ticks(pid);
    thread::sleep(window);
    let used = cpu_ticks(pid) - before;
    eprintln!(
        "server CPU while out of descriptors: {used} ticks in {window:?}; {} flood connections",
        flood.len()
    );
    assert!(
        used < 150,
        "server used {used} CPU ticks (1/100 s) in a {window:?} window while out of \
         descriptors: it is spinning on accept"
    );
    assert_echo(&mut a, b"A after the CPU window\n");

    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning descriptor exhaustion",
        |l| l.to_lowercase().contains("descriptor") || l.contains("EMFILE"),
    );

    drop(flood);
    let mut fresh = wait_until_served(addr, Duration::from_secs(10), "after closing the flood");
    assert_echo(&mut fresh, b"fresh\n");
    assert_echo(&mut a, b"A at the end\n");
}
