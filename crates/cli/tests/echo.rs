//! End-to-end tests of the echo service: round trip, half-close, backpressure against a slow
//! reader, and a thousand concurrent connections.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// "hello\n" comes back exactly, and nothing else: after a half-close the next read is EOF.
#[test]
fn small_round_trip() {
    let server = Server::start(&echo_config(""));
    let mut stream = connect(server.addr("tcp-echo"));
    assert_echo(&mut stream, b"hello\n");
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    assert_eof(&mut stream, "after half-close of a finished round trip");
}

/// The client writes 1 MiB then half-closes: every byte comes back in order, then EOF (the
/// server flushes before closing).
#[test]
fn half_close_flushes_then_closes() {
    const TOTAL: u64 = MIB;
    let server = Server::start(&echo_config(""));
    let mut stream = connect(server.addr("tcp-echo"));
    let mut writer_stream = stream.try_clone().expect("clone stream");
    let writer = thread::spawn(move || {
        write_pattern(&mut writer_stream, 0, TOTAL, 64 * 1024, Duration::ZERO)?;
        writer_stream.shutdown(Shutdown::Write)
    });

    let got = read_pattern_to_eof(
        &mut stream,
        TOTAL,
        Instant::now() + Duration::from_secs(60),
        None,
    );
    writer
        .join()
        .expect("writer thread")
        .expect("write 1 MiB and half-close");
    assert_eq!(got, Ok(TOTAL), "bytes echoed before EOF");
}

/// 10 MiB through a client that reads slowly with a small receive buffer: the transfer
/// completes byte-exact, and the server's peak memory grows far less than the data size,
/// because it stops reading while its outbound queue is above the high watermark.
#[test]
fn slow_reader_backpressure_bounds_memory() {
    const TOTAL: u64 = 10 * MIB;
    /// Allowed growth of the server's peak RSS over its RSS before the transfer.
    const MAX_GROWTH_KIB: u64 = 4 * 1024;
    let deadline = Instant::now() + Duration::from_secs(120);

    let server = Server::start(&echo_config(
        "outbound_high_watermark = 262144\noutbound_low_watermark = 65536",
    ));
    let rss_before = rss_kib(server.pid());

    let mut stream = connect_small_rcvbuf(server.addr("tcp-echo"), 64 * 1024);
    let mut writer_stream = stream.try_clone().expect("clone stream");
    writer_stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("write timeout");
    let writer = thread::spawn(move || {
        write_pattern(&mut writer_stream, 0, TOTAL, 64 * 1024, Duration::ZERO)?;
        writer_stream.shutdown(Shutdown::Write)
    });

    // Let the writer push as much as it can before reading at all: a server without
    // backpressure would now be holding most of the 10 MiB.
    thread::sleep(Duration::from_millis(500));

    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    while total < TOTAL {
        assert!(
            Instant::now() < deadline,
            "slow transfer incomplete: {total} of {TOTAL} bytes"
        );
        let n = match stream.read(&mut buf) {
            Ok(0) => panic!("EOF after {total} of {TOTAL} bytes"),
            Ok(n) => n,
            Err(e) => panic!("read error after {total} of {TOTAL} bytes: {e}"),
        };
        if let Err(at) = check_pattern(total, &buf[..n]) {
            panic!("pattern mismatch at byte {at}");
        }
        total += n as u64;
        thread::sleep(Duration::from_millis(1));
    }
    writer
        .join()
        .expect("writer thread")
        .expect("write 10 MiB and half-close");
    assert_eof(&mut stream, "after the whole 10 MiB");

    let hwm_after = hwm_kib(server.pid());
    let growth = hwm_after.saturating_sub(rss_before);
    eprintln!(
        "server RSS before {rss_before} KiB, peak after {hwm_after} KiB, growth {growth} KiB"
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "server peak RSS grew by {growth} KiB (RSS before {rss_before} KiB, peak after \
         {hwm_after} KiB) while relaying {} KiB to a slow reader: outbound queue not bounded",
        TOTAL / 1024
    );
}

/// 1,000 connections open at once, each sending 10 pipelined messages in one write: every
/// connection gets exactly its own bytes back, in order.
#[test]
fn thousand_concurrent_connections() {
    const CONNS: usize = 1000;
    let server = Server::start(&echo_config(""));
    let addr = server.addr("tcp-echo");

    let messages =
        |i: usize| -> String { (0..10).map(|j| format!("conn {i} msg {j}\n")).collect() };

    let mut conns: Vec<_> = (0..CONNS)
        .map(|i| try_connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    for (i, stream) in conns.iter_mut().enumerate() {
        stream
            .write_all(messages(i).as_bytes())
            .unwrap_or_else(|e| panic!("write on connection {i}: {e}"));
    }
    for (i, stream) in conns.iter_mut().enumerate() {
        let expected = messages(i);
        let mut back = vec![0u8; expected.len()];
        stream
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("read on connection {i}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&back),
            expected,
            "echo on connection {i}"
        );
    }
    // Every connection is still open and served after all of them were used.
    for (i, stream) in conns.iter_mut().enumerate().step_by(97) {
        assert_echo(stream, format!("conn {i} again\n").as_bytes());
    }
}
