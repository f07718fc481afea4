//! Helpers shared by the end-to-end tests of `plexus` and `plexus-cli` (a dev-dependency only):
//! a TLS client configuration that accepts the server's ephemeral certificate, bounded reads,
//! and the real peers the tests drive (`curl`, `openssl s_client`), each bounded in time and
//! killed by PID.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use plexus::tls_client::ServerTrust;
use rustls::ClientConfig;

/// A rustls client configuration (TLS 1.2 and 1.3, aws-lc-rs) that accepts any server
/// certificate (the test servers' are ephemeral, their issuer unknown in advance): plexus'
/// own [`ServerTrust::AnyCertificate`], so the handshake signatures are still checked.
pub fn accept_any_cert_config() -> Arc<ClientConfig> {
    plexus::tls_client::client_config(&ServerTrust::AnyCertificate, &[])
        .expect("a client configuration without files or ALPN")
}

/// Reads until `expected` has arrived anywhere in what was read, the reader ends or fails,
/// or `within` passes (reads themselves are bounded by the reader's own timeout). Returns
/// what arrived.
pub fn read_until(reader: &mut impl Read, expected: &[u8], within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !contains(&got, expected) && Instant::now() < deadline {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// Whether `needle` occurs in `haystack` (an empty needle always does).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// Runs `curl -sS --max-time 30 ARGS`; returns its exit code (-1 if killed) and its stdout
/// followed by its stderr.
pub fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["--max-time", "30", "-sS"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Sends `input` through `openssl s_client -quiet` to `addr` (one byte per write, 5 ms apart,
/// when `dribble`) and returns what came back once `expected` arrived, within `within`; the
/// client is killed by PID afterwards.
pub fn through_openssl(
    addr: SocketAddr,
    input: &[u8],
    expected: &[u8],
    dribble: bool,
    within: Duration,
) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let expected_owned = expected.to_vec();
    let reader = thread::spawn(move || read_until(&mut stdout, &expected_owned, within));
    if dribble {
        for byte in input {
            stdin.write_all(&[*byte]).expect("write to openssl");
            stdin.flush().expect("flush");
            thread::sleep(Duration::from_millis(5));
        }
    } else {
        stdin.write_all(input).expect("write to openssl");
        stdin.flush().expect("flush");
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(reader.join());
    });
    let got = rx.recv_timeout(within + Duration::from_secs(5));
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    got.expect("openssl answered in time").expect("reader")
}
