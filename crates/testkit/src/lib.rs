//! Helpers shared by the end-to-end tests of `plexus` and `plexus-cli` (a dev-dependency only):
//! a TLS client configuration that accepts the server's ephemeral certificate, bounded reads,
//! the real peers the tests drive (`curl`, `openssl s_client`), each bounded in time and
//! killed by PID, and sessions placed on chosen event loops ([`sessions_on_loops`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use plexus::tls_client::ServerTrust;
use plexus::ServerHandle;
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

/// Every event loop's open sessions, once they add up to `total` (within 20 s, or a panic).
pub fn sessions_per_loop(handle: &ServerHandle, total: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let loops = handle.metrics().event_loops;
        let per_loop: Vec<u64> = loops.iter().map(|l| l.sessions_open).collect();
        if per_loop.iter().sum::<u64>() == total {
            return per_loop;
        }
        assert!(
            Instant::now() < deadline,
            "never {total} sessions: {per_loop:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// TCP sessions to `addr` on chosen event loops of a server that has no other sessions:
/// `wanted[i]` on loop `i`, returned in that shape. Where a new connection goes is the
/// loops' business (the one the kernel wakes keeps it unless it has clearly more sessions
/// than another), so sessions open one by one — each placed by the loop whose count grew —
/// until every loop has its share; the ones beyond it close again. Every stream has
/// `read_timeout`.
pub fn sessions_on_loops(
    handle: &ServerHandle,
    addr: SocketAddr,
    wanted: &[usize],
    read_timeout: Duration,
) -> Vec<Vec<TcpStream>> {
    const MOST: u64 = 500;
    let mut placed: Vec<Vec<TcpStream>> = wanted.iter().map(|_| Vec::new()).collect();
    let mut others = Vec::new();
    let mut opened = 0;
    let short = |placed: &[Vec<TcpStream>]| placed.iter().zip(wanted).any(|(p, &w)| p.len() < w);
    while short(&placed) {
        assert!(
            opened < MOST,
            "{MOST} sessions and not {wanted:?} on the loops"
        );
        let before = sessions_per_loop(handle, opened);
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(read_timeout))
            .expect("set a read timeout");
        opened += 1;
        let after = sessions_per_loop(handle, opened);
        let grown = (0..after.len()).find(|&i| after[i] > before.get(i).copied().unwrap_or(0));
        let on_loop = grown.expect("one loop has the new session");
        match (placed.get_mut(on_loop), wanted.get(on_loop)) {
            (Some(on_loop), Some(&want)) if on_loop.len() < want => on_loop.push(stream),
            _ => others.push(stream),
        }
    }
    drop(others);
    sessions_per_loop(handle, wanted.iter().sum::<usize>() as u64);
    placed
}
