//! End-to-end tests of `plexus connect`: piping stdin to a server and the replies to stdout,
//! and its exit codes.

mod common;

use std::time::Duration;

use common::*;

/// stdin goes to the server, the echo comes out on stdout; at stdin EOF it half-closes,
/// prints the rest, and exits 0 when the server closes.
#[test]
fn connect_pipes_stdin_through_echo() {
    let server = Server::start(&echo_config(""));
    let url = format!("tcp://{}", server.addr("tcp-echo"));
    let out = run_plexus(
        &["connect", &url],
        Some(b"one\ntwo\n"),
        Duration::from_secs(10),
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "one\ntwo\n",
        "stdout of plexus connect"
    );
}

/// 1 MiB of binary data survives the round trip through `plexus connect` byte-exact.
#[test]
fn connect_is_binary_safe() {
    const TOTAL: usize = 1024 * 1024;
    let server = Server::start(&echo_config(""));
    let url = format!("tcp://{}", server.addr("tcp-echo"));
    let mut data = vec![0u8; TOTAL];
    fill_pattern(0, &mut data);
    let out = run_plexus(&["connect", &url], Some(&data), Duration::from_secs(20));
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(out.stdout.len(), TOTAL, "bytes on stdout");
    assert_eq!(
        check_pattern(0, &out.stdout),
        Ok(()),
        "first mismatching byte"
    );
}

/// Nothing listening: exit 1 with a message on stderr.
#[test]
fn connect_refused_exits_1() {
    let out = run_plexus(
        &["connect", "tcp://127.0.0.1:1"],
        None,
        Duration::from_secs(10),
    );
    out.assert_no_panic();
    out.assert_code(1);
    assert!(!out.stderr.trim().is_empty(), "no error message on stderr");
}

/// A target that is not a URL: usage error, exit 2.
#[test]
fn connect_bogus_target_exits_2() {
    let out = run_plexus(&["connect", "bogus"], None, Duration::from_secs(10));
    out.assert_no_panic();
    out.assert_code(2);
    assert!(!out.stderr.trim().is_empty(), "no error message on stderr");
}
