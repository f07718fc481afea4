//! `reuse_port = true`: two plexus processes listen on the same port (SO_REUSEPORT) and the
//! kernel spreads connections between them — both serve. Without the key the second bind fails.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn config(port: u16, reuse_port: bool) -> String {
    format!(
        r#"[server]
event_loops = 1

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:{port}"
service = "echo"
reuse_port = {reuse_port}
"#
    )
}

/// Open sockets of a process (listeners, sessions, the notify and signal plumbing).
fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn two_processes_on_one_port_with_reuse_port_both_receive_connections() {
    let first = Server::start(&config(0, true));
    let addr = first.addr("tcp-echo");
    let second = Server::start(&config(addr.port(), true));
    assert_eq!(second.addr("tcp-echo"), addr);

    let baseline = (socket_count(first.pid()), socket_count(second.pid()));
    let mut open: Vec<TcpStream> = Vec::new();
    // The kernel hashes each connection's 4-tuple to one of the two listeners; with 200
    // connections the chance that one process gets none is 2^-199.
    for i in 0..200 {
        let mut stream = connect(addr);
        assert_echo(&mut stream, format!("connection {i}\n").as_bytes());
        open.push(stream);
        let now = (socket_count(first.pid()), socket_count(second.pid()));
        if now.0 > baseline.0 && now.1 > baseline.1 {
            eprintln!(
                "both processes hold sessions after {} connections: {now:?} sockets (baseline {baseline:?})",
                i + 1
            );
            return;
        }
    }
    panic!(
        "after 200 connections one process served none: sockets {:?}, baseline {baseline:?}",
        (socket_count(first.pid()), socket_count(second.pid()))
    );
}

#[test]
fn without_reuse_port_the_second_process_cannot_bind() {
    let first = Server::start(&config(0, false));
    let port = first.addr("tcp-echo").port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.toml");
    std::fs::write(&path, config(port, false)).unwrap();
    let out = run_plexus(
        &["serve", "--config", path.to_str().unwrap()],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(1);
    out.assert_stderr_contains("address already in use");
}
