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

/// The `/metrics` text of the server's `http` listener.
fn metrics_text(addr: std::net::SocketAddr) -> String {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Byte `i` of the amplification flood: one-byte lines `a\n`, `b\n`, … (26 letters cycling).
fn one_byte_line_stream(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % 2 == 1 {
                b'\n'
            } else {
                b'a' + ((i / 2) % 26) as u8
            }
        })
        .collect()
}

/// Amplification: a sender of 8 MB of one-byte lines and `non_readers` members that never
/// read. Each non-reader's queue is bounded by what its entries really cost, so the server's
/// peak RSS stays bounded; the non-readers are closed for `outbound_overflow` (logged and
/// counted); the reading member gets every line in order. Returns the peak RSS growth in KiB.
fn one_byte_lines_against_non_readers(non_readers: usize) -> u64 {
    const TOTAL: usize = 8 * 1024 * 1024;
    let config = format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n",
        chat_config("", "").replace("event_loops = 2", "event_loops = 1")
    );
    let server = Server::start(&config);
    let addr = server.addr("chat");
    let http = server.addr("http");
    let mark = server.log_mark();
    let expected = one_byte_line_stream(TOTAL);

    let mut sender = connect(addr);
    let reader = {
        let mut stream = connect(addr);
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let expected = expected.clone();
        thread::spawn(move || -> Result<(), String> {
            let mut got = vec![0u8; TOTAL];
            stream
                .read_exact(&mut got)
                .map_err(|e| format!("reader: {e}"))?;
            match got.iter().zip(&expected).position(|(a, b)| a != b) {
                None => Ok(()),
                Some(at) => Err(format!("reader: byte {at} differs")),
            }
        })
    };
    let mut silent: Vec<TcpStream> = (0..non_readers)
        .map(|_| connect_small_rcvbuf(addr, 4096))
        .collect();
    thread::sleep(Duration::from_millis(300)); // let every join be processed
    let before = rss_kib(server.pid());

    // 16 KiB per write, paced, so the reading member keeps up (the sender is never paused on
    // its behalf) while the non-readers' queues fill.
    for chunk in expected.chunks(16 * 1024) {
        sender.write_all(chunk).unwrap();
        thread::sleep(Duration::from_micros(500));
    }
    match reader.join() {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => panic!("{msg}"),
        Err(_) => panic!("reader panicked"),
    }
    for (i, stream) in silent.iter_mut().enumerate() {
        drain_until_closed(stream, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("non-reader {i} was not closed by the server: {e}"));
    }
    let peak = hwm_kib(server.pid());
    let growth = peak.saturating_sub(before);
    eprintln!(
        "chat amplification: {non_readers} non-reader(s), RSS {before} KiB before, peak {peak} \
         KiB: +{growth} KiB, {} KiB per non-reader",
        growth / non_readers as u64
    );
    let text = metrics_text(http);
    assert_eq!(
        metric(
            &text,
            "plexus_sessions_closed_total{reason=\"outbound_overflow\"}"
        ),
        non_readers as u64,
        "every non-reader counted as outbound_overflow"
    );
    server.assert_log(
        mark,
        Duration::from_secs(5),
        "the outbound_limit closure",
        |l| l.contains("outbound_limit"),
    );
    growth
}

/// The defect: ≈ 4 MB of one-byte lines cost a non-reader about 128 MB of server memory (one
/// queue entry per line, counted as one byte). Now: one shared buffer per read, entries
/// charged what they cost; the whole attack stays within +32 MiB.
#[test]
fn one_byte_lines_to_a_non_reader_keep_memory_bounded() {
    let growth = one_byte_lines_against_non_readers(1);
    assert!(
        growth < 32 * 1024,
        "server RSS grew by {growth} KiB for one non-reading member"
    );
}

/// The same with four non-readers: they share the broadcast buffers, so the bound does not
/// multiply with them.
#[test]
fn one_byte_lines_to_four_non_readers_keep_memory_bounded() {
    let growth = one_byte_lines_against_non_readers(4);
    assert!(
        growth < 32 * 1024,
        "server RSS grew by {growth} KiB for four non-reading members"
    );
}

/// Two event loops, eight members all sending fast at once and all reading: every member gets
/// every other member's every line, in order per sender. (Broadcasts to a loop whose command
/// queue was full used to be dropped with a debug log.)
#[test]
fn every_line_reaches_every_member_across_event_loops() {
    const MEMBERS: usize = 8;
    const LINES: usize = 50_000;
    let server = Server::start(&chat_config("", ""));
    let addr = server.addr("chat");
    let streams: Vec<TcpStream> = (0..MEMBERS).map(|_| connect(addr)).collect();
    thread::sleep(Duration::from_millis(300)); // let every join be processed
    let line = |member: usize, seq: usize| format!("{member:02}{seq:06}\n");
    let line_len = line(0, 0).len();
    let readers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(me, stream)| {
            let stream = stream.try_clone().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            thread::spawn(move || -> Result<(), String> {
                let mut reader = BufReader::with_capacity(64 * 1024, stream);
                let mut next = [0usize; MEMBERS];
                let mut buf = vec![0u8; line_len];
                for n in 0..(MEMBERS - 1) * LINES {
                    reader
                        .read_exact(&mut buf)
                        .map_err(|e| format!("member {me}: line {n}: {e}; next {next:?}"))?;
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let from: usize = text[..2].parse().map_err(|_| format!("{text:?}"))?;
                    let seq: usize = text[2..8].parse().map_err(|_| format!("{text:?}"))?;
                    if from == me || from >= MEMBERS || seq != next[from] {
                        return Err(format!(
                            "member {me}: got {text:?}, expected line {} of {from}",
                            next.get(from).copied().unwrap_or(0)
                        ));
                    }
                    next[from] += 1;
                }
                Ok(())
            })
        })
        .collect();
    let writers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(me, stream)| {
            let mut stream = stream.try_clone().unwrap();
            let batch: String = (0..LINES).map(|seq| line(me, seq)).collect();
            thread::spawn(move || stream.write_all(batch.as_bytes()))
        })
        .collect();
    for writer in writers {
        writer.join().unwrap().unwrap();
    }
    for reader in readers {
        match reader.join() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => panic!("{msg}"),
            Err(_) => panic!("reader panicked"),
        }
    }
}
