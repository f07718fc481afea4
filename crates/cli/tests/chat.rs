//! End-to-end tests of the chat service: lines go to every other member, and a member that
//! never reads is dropped without slowing the others.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A chat server; `server_extra` goes into `[server]`, `listener_extra` into the listener.
fn chat_config(server_extra: &str, listener_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "60s"
{server_extra}

[[listener]]
name = "chat"
transport = "tcp"
addr = "127.0.0.1:0"
service = "chat"
{listener_extra}
"#
    )
}

/// Reads exactly `expected.len()` bytes and asserts they are `expected`.
fn expect_line(stream: &mut TcpStream, expected: &str, who: &str) {
    let mut buf = vec![0u8; expected.len()];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{who} waiting for {expected:?}: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&buf),
        expected,
        "what {who} received"
    );
}

/// A line from one member reaches each other member exactly as sent, and not its sender.
#[test]
fn lines_reach_every_other_member() {
    let server = Server::start(&chat_config("", ""));
    let addr = server.addr("chat");
    let mut a = connect(addr);
    let mut b = connect(addr);
    let mut c = connect(addr);
    thread::sleep(Duration::from_millis(300)); // let all three joins be processed

    a.write_all(b"hello from a\n").unwrap();
    expect_line(&mut b, "hello from a\n", "B");
    expect_line(&mut c, "hello from a\n", "C");

    // B speaks only after receiving A's line, so if A had been sent its own line it would
    // arrive before B's: reading exactly B's line here proves A did not get its own.
    b.write_all(b"b says hi\n").unwrap();
    expect_line(&mut a, "b says hi\n", "A");
    expect_line(&mut c, "b says hi\n", "C");

    c.write_all(b"and c\n").unwrap();
    expect_line(&mut a, "and c\n", "A");
    expect_line(&mut b, "and c\n", "B");
}

/// Line `i` of the flood: 100 bytes including the newline.
fn flood_line(i: usize) -> Vec<u8> {
    let mut line = format!("line {i:06} ").into_bytes();
    line.resize(99, b'x');
    line.push(b'\n');
    line
}

/// A member (D) that never reads does not stall the others: A sends 20,000 lines and B and C
/// each receive all of them in order within 60 s; D is dropped for `outbound` overflow.
#[test]
fn non_reader_is_dropped_without_stalling_others() {
    const LINES: usize = 20_000;
    const LINE_LEN: usize = 100;
    let deadline = Instant::now() + Duration::from_secs(60);

    // A small server-side send buffer, so that D's 2 MB cannot all hide in the kernel.
    let server = Server::start(&chat_config(
        "outbound_limit = 262144\noutbound_high_watermark = 65536\noutbound_low_watermark = 16384",
        "send_buffer = 65536",
    ));
    let addr = server.addr("chat");
    let mark = server.log_mark();

    let mut a = connect(addr);
    let readers: Vec<_> = ["B", "C"]
        .into_iter()
        .map(|who| {
            let stream = connect(addr);
            thread::spawn(move || -> Result<(), String> {
                let mut reader = BufReader::with_capacity(64 * 1024, stream);
                let mut line = [0u8; LINE_LEN];
                for i in 0..LINES {
                    if i % 1000 == 0 && Instant::now() > deadline {
                        return Err(format!("{who}: deadline passed at line {i} of {LINES}"));
                    }
                    reader
                        .read_exact(&mut line)
                        .map_err(|e| format!("{who}: reading line {i} of {LINES}: {e}"))?;
                    if line[..] != flood_line(i)[..] {
                        return Err(format!(
                            "{who}: line {i} is {:?}",
                            String::from_utf8_lossy(&line)
                        ));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut d = connect_small_rcvbuf(addr, 4096);
    thread::sleep(Duration::from_millis(300)); // let all four joins be processed

    // Paced at about 10 KB per 5 ms so B and C (which do read) never come near the limit.
    for batch in 0..LINES / 100 {
        let bytes: Vec<u8> = (batch * 100..(batch + 1) * 100)
            .flat_map(flood_line)
            .collect();
        a.write_all(&bytes)
            .unwrap_or_else(|e| panic!("A writing batch {batch}: {e}"));
        thread::sleep(Duration::from_millis(5));
    }
    for (who, reader) in ["B", "C"].iter().zip(readers) {
        match reader.join() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => panic!("{msg}"),
            Err(_) => panic!("reader {who} panicked"),
        }
    }

    // D got at most what fits in the buffers, then the server closed it.
    let discarded = drain_until_closed(&mut d, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("D (never reads) was not closed by the server: {e}"));
    eprintln!("D read {discarded} bytes before the server closed it");
    assert!(
        discarded < (LINES * LINE_LEN) as u64,
        "D received all {discarded} bytes: it was never cut off"
    );
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "mentioning `outbound` (D's overflow)",
        |l| l.contains("outbound"),
    );
}
