//! `plexus connect` does not buffer without bound: a huge standard input to a peer that does
//! not read stops being taken in (the stdin thread waits on the connection's flow control),
//! and the process' memory stays small; once the peer reads, every byte arrives, in order,
//! and stdin EOF half-closes as usual (exit 0).
//!
//! No wall-clock assertions: the waits are bounded only so a broken build cannot hang.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::BIN;

const MIB: usize = 1024 * 1024;
/// What standard input carries: far more than any buffer on the way.
const TOTAL: usize = 256 * MIB;

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn huge_stdin_to_a_peer_that_does_not_read_stays_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut child = Command::new(BIN)
        .args(["connect", &format!("tcp://{addr}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn plexus connect");
    let pid = child.id();
    let (peer, _) = listener.accept().expect("accept");

    let written = Arc::new(AtomicUsize::new(0));
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = {
        let written = Arc::clone(&written);
        thread::spawn(move || {
            let mut chunk = vec![0u8; MIB];
            for n in 0..TOTAL / MIB {
                chunk.fill(n as u8);
                stdin.write_all(&chunk).expect("write stdin");
                written.fetch_add(MIB, Ordering::Relaxed);
            }
            // Dropped: stdin EOF.
        })
    };

    // The peer reads nothing: wait (bounded) until the writer makes no more progress.
    let start = Instant::now();
    let mut last = usize::MAX;
    while start.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(500));
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let stuck_at = written.load(Ordering::Relaxed);
    let rss_stuck = status_kib(pid, "VmRSS:");
    eprintln!("stuck after {stuck_at} bytes; plexus connect RSS {rss_stuck} KiB");
    // The pipe, the connection's bound (about twice its 1 MiB high watermark plus a chunk),
    // the worker's stdout queue and the kernel's socket buffers: a few MiB, not 256.
    assert!(
        stuck_at < 48 * MIB,
        "{stuck_at} bytes taken in while the peer read nothing"
    );
    assert!(rss_stuck < 48 * 1024, "RSS {rss_stuck} KiB while stuck");

    // Now read everything: each MiB carries its number.
    let mut peer = peer;
    let mut buf = vec![0u8; MIB];
    let mut received = 0usize;
    loop {
        let n = peer.read(&mut buf).expect("read from plexus connect");
        if n == 0 {
            break;
        }
        for (at, byte) in buf[..n].iter().enumerate() {
            let expected = ((received + at) / MIB) as u8;
            assert_eq!(*byte, expected, "byte {} out of order", received + at);
        }
        received += n;
    }
    assert_eq!(received, TOTAL, "bytes through plexus connect");
    writer.join().expect("writer");
    let peak = status_kib(pid, "VmHWM:");
    eprintln!("plexus connect peak RSS {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    drop(peer); // the peer closes: plexus connect exits

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("plexus connect did not exit after the peer closed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit status");
}
