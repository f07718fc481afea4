//! End-to-end tests of `service = "auto"` (the protocol group): one port that echoes plain
//! bytes, serves HTTP, and terminates TLS (then detects again inside: HTTP or echo), with real
//! peers (`curl`, `openssl s_client`), input one byte at a time, and the time budget.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn auto_config(extra_server: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
{extra_server}

[[listener]]
name = "auto"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
"#
    )
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["--max-time", "20", "-sS"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn one_port_echoes_plain_bytes_and_serves_http_and_https() {
    let server = Server::start(&auto_config(""));
    let addr = server.addr("auto");

    // Not a known protocol: echoed.
    let mut plain = connect(addr);
    assert_echo(&mut plain, b"hello, group\n");
    assert_echo(&mut plain, b"GET is just a word once echo was chosen\n");

    // HTTP over plain TCP.
    let (code, out) = curl(&[&format!("http://{addr}/healthz")]);
    assert_eq!((code, out.as_str()), (0, "ok"));

    // TLS, then HTTP inside it.
    let (code, out) = curl(&["-k", &format!("https://{addr}/healthz")]);
    assert_eq!((code, out.as_str()), (0, "ok"));

    // TLS, then echo inside it: openssl s_client, a peer nobody here wrote.
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo inside tls\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + IO_TIMEOUT;
        while !got.ends_with(b"echo inside tls\n") && Instant::now() < deadline {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let got = reader.join().unwrap();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, b"echo inside tls\n");
}

#[test]
fn detection_is_right_when_the_request_arrives_one_byte_at_a_time() {
    let server = Server::start(&auto_config(""));
    let mut stream = connect(server.addr("auto"));
    stream.set_nodelay(true).unwrap();
    for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" {
        stream.write_all(&[*byte]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"), "{response}");
}

#[test]
fn an_undecided_prefix_falls_back_to_echo_when_the_time_budget_runs_out() {
    let server = Server::start(&auto_config("handshake_timeout = \"1s\""));
    let mut stream = connect(server.addr("auto"));
    // "GE" could still become "GET ": detection waits, then gives up and echoes it.
    stream.write_all(b"GE").unwrap();
    let started = Instant::now();
    let mut got = [0u8; 2];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GE");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "echoed before the budget ran out"
    );
    assert_echo(&mut stream, b"T / and more\n");
}
