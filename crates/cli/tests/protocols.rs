//! The `protocols` listener key: a protocol group built from configuration (`service =
//! "auto"` with its members and fallback listed), serving several protocols on one port, and
//! the configuration errors it reports.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const CMD_TIMEOUT: Duration = Duration::from_secs(30);

use common::*;

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

/// Reads until `expected` arrived (bounded by the stream's timeout and [`IO_TIMEOUT`]).
fn read_until(stream: &mut TcpStream, expected: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(expected) && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn a_configured_group_serves_http_and_chat_on_one_port_and_tls_echo_on_another() {
    let server = Server::start(
        r#"[server]
event_loops = 2

[[listener]]
name = "web-chat"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
protocols = ["http", "chat"]

[[listener]]
name = "tls-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
protocols = ["tls", "echo"]
"#,
    );
    let web_chat = server.addr("web-chat");

    // HTTP on the group's port.
    let (code, out) = curl(&[&format!("http://{web_chat}/healthz")]);
    assert_eq!((code, out.as_str()), (0, "ok"));

    // Anything else is a chat member (the fallback): a line reaches the other member.
    let mut alice = connect(web_chat);
    let mut bob = connect(web_chat);
    // Each member's first line decides its protocol; "hi" is not HTTP.
    bob.write_all(b"hi from bob\n").unwrap();
    thread::sleep(Duration::from_millis(200));
    alice.write_all(b"hello from alice\n").unwrap();
    let got = read_until(&mut bob, b"hello from alice\n");
    assert!(
        got.ends_with(b"hello from alice\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // No TLS member on this group: a ClientHello is just bytes for the chat, so curl fails.
    // (curl gives up after 3 s: the chat member never answers a ClientHello.)
    let (code, _) = curl(&[
        "--max-time",
        "3",
        "-k",
        &format!("https://{web_chat}/healthz"),
    ]);
    assert_ne!(code, 0, "https must not be served without a tls member");

    // The other group: TLS, then echo inside; plain bytes are echoed, HTTP included (there
    // is no http member).
    let tls_echo = server.addr("tls-echo");
    let mut plain = connect(tls_echo);
    assert_echo(&mut plain, b"GET / HTTP/1.1\r\n\r\n");
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &tls_echo.to_string()])
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

/// Whether the server said it generated a self-signed certificate (it does so only when a
/// listener needs TLS and `[tls]` names no certificate).
fn generated_a_certificate(server: &Server) -> bool {
    server
        .stderr_lines()
        .iter()
        .any(|line| line.contains("ephemeral self-signed certificate"))
}

#[test]
fn only_a_group_with_a_tls_member_gets_a_certificate() {
    let plain = Server::start(
        r#"[[listener]]
name = "web-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
protocols = ["http", "echo"]
"#,
    );
    let (code, out) = curl(&[&format!("http://{}/healthz", plain.addr("web-echo"))]);
    assert_eq!((code, out.as_str()), (0, "ok"));
    assert!(
        !generated_a_certificate(&plain),
        "no tls member, no certificate:\n{}",
        plain.stderr_lines().join("\n")
    );
    let preset = Server::start(
        r#"[[listener]]
name = "auto"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
"#,
    );
    let (code, out) = curl(&["-k", &format!("https://{}/healthz", preset.addr("auto"))]);
    assert_eq!((code, out.as_str()), (0, "ok"));
    assert!(
        generated_a_certificate(&preset),
        "the preset has a tls member"
    );
}

/// `serve --check` on `listener`'s table: exit 2, stderr names every needle.
fn assert_rejected(listener: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plexus.toml");
    std::fs::write(
        &path,
        format!("[[listener]]\nname = \"g\"\naddr = \"127.0.0.1:0\"\n{listener}"),
    )
    .expect("write config");
    let out = run_plexus(
        &["serve", "--config", path.to_str().unwrap(), "--check"],
        None,
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(2);
    for needle in needles {
        out.assert_stderr_contains(needle);
    }
}

#[test]
fn bad_protocols_are_configuration_errors_naming_the_key() {
    let tcp = "transport = \"tcp\"\nservice = \"auto\"\n";
    assert_rejected(
        &format!("{tcp}protocols = [\"tls\", \"gopher\", \"echo\"]\n"),
        &[
            "listener[0].protocols[1]",
            "gopher",
            "not a protocol plexus detects",
        ],
    );
    assert_rejected(
        &format!("{tcp}protocols = [\"http\", \"nope\"]\n"),
        &["listener[0].protocols[1]", "nope", "not a known service"],
    );
    assert_rejected(
        &format!("{tcp}protocols = []\n"),
        &["listener[0].protocols", "fallback"],
    );
    assert_rejected(
        &format!("{tcp}protocols = [\"http\", \"tls\"]\n"),
        &["listener[0].protocols[1]", "fallback"],
    );
    assert_rejected(
        &format!("{tcp}protocols = [\"http\", \"http\", \"echo\"]\n"),
        &["listener[0].protocols[1]", "twice"],
    );
    assert_rejected(
        "transport = \"tls\"\nservice = \"auto\"\nprotocols = [\"tls\", \"http\", \"echo\"]\n",
        &["listener[0].protocols[0]", "tcp listeners only"],
    );
    assert_rejected(
        "transport = \"tcp\"\nservice = \"echo\"\nprotocols = [\"http\", \"echo\"]\n",
        &["listener[0].protocols", "only read with service = \"auto\""],
    );
}
