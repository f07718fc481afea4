//! `service = "forward"`: plexus relays to an upstream (here a second plexus running echo).
//! Byte-exact in both directions (splice and copy), half-close carried through, a dead
//! upstream closes the client promptly, and a tls listener terminates TLS for a plain upstream.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, echo_config, metric, Server, MIB};

fn forward_config(upstream: SocketAddr, transport: &str, extra: &str) -> String {
    format!(
        "[server]\nevent_loops = 2\n\n[[listener]]\nname = \"fwd\"\ntransport = \"{transport}\"\n\
         addr = \"127.0.0.1:0\"\nservice = \"forward\"\nupstream = \"{upstream}\"\n{extra}\n"
    )
}

/// Byte `i` of the test stream (not periodic in any power of two).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 7)) as u8
}

/// Sends `total` bytes through `stream` while reading the echo back, verifying every byte;
/// then half-closes and expects EOF. Returns the bytes received.
fn transfer_both_ways(stream: TcpStream, total: u64) -> u64 {
    transfer_both_ways_reading_late(stream, total, Duration::ZERO)
}

/// [`transfer_both_ways`], the reader starting only `late` after the writer: meanwhile every
/// queue and socket buffer on the way fills up, and the relay's pauses all engage.
fn transfer_both_ways_reading_late(stream: TcpStream, total: u64, late: Duration) -> u64 {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let len = chunk.len().min((total - sent) as usize);
            for (offset, byte) in chunk[..len].iter_mut().enumerate() {
                *byte = pattern(sent + offset as u64);
            }
            writer.write_all(&chunk[..len]).unwrap();
            sent += len as u64;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    thread::sleep(late);
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        for (offset, byte) in buf[..n].iter().enumerate() {
            let at = received + offset as u64;
            assert_eq!(*byte, pattern(at), "byte {at} differs");
        }
        received += n as u64;
    }
    sender.join().unwrap();
    received
}

/// A forward listener plus an http listener for its `/metrics`.
fn forward_config_with_metrics(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n",
        forward_config(upstream, "tcp", extra)
    )
}

#[test]
fn hundred_mib_both_ways_through_splice() {
    let upstream = Server::start(&echo_config(""));
    let relay = Server::start(&forward_config_with_metrics(upstream.addr("tcp-echo"), ""));
    let total = 100 * MIB;
    let received = transfer_both_ways(connect(relay.addr("fwd")), total);
    assert_eq!(
        received, total,
        "every byte back, then EOF (half-close travelled both ways)"
    );
    // Both directions went socket to socket (a few bytes may have been copied before the
    // switch, while the upstream connected).
    let http = relay.addr("http");
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 1);
    let spliced = metric(http, "plexus_spliced_bytes_total");
    assert!(
        spliced > 2 * total - MIB,
        "spliced {spliced} of {}",
        2 * total
    );
}

/// Splicing keeps the relay's backpressure and half-close: the client reads only half a second
/// after it started sending, so every pipe and socket buffer on the way fills and each
/// direction stops and resumes (a lost wake-up stalls the transfer until the read timeout);
/// then the client's FIN travels through and the upstream's comes back after the last byte.
#[test]
fn a_spliced_relay_survives_a_client_that_reads_late() {
    let small = "outbound_high_watermark = 16384\noutbound_low_watermark = 4096";
    let upstream = Server::start(&echo_config(small));
    let relay = Server::start(&forward_config_with_metrics(upstream.addr("tcp-echo"), ""));
    let total = 16 * MIB;
    for round in 0..2 {
        let stream = connect(relay.addr("fwd"));
        let received = transfer_both_ways_reading_late(stream, total, Duration::from_millis(500));
        assert_eq!(received, total, "round {round}");
    }
    let http = relay.addr("http");
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 2);
    // Nothing of the relayed bytes was queued in user space to be copied.
    assert!(metric(http, "plexus_spliced_bytes_total") > 4 * total - MIB);
}

/// Splice is for bulk: a connection exchanging small messages stays copied (two pipes and two
/// splices per message would cost more), and switches once a read of 16 KiB or more shows
/// bulk; the bytes before and after the switch arrive in order.
#[test]
fn small_messages_are_copied_until_bulk_switches_the_pair_to_splice() {
    let upstream = Server::start(&echo_config(""));
    let relay = Server::start(&forward_config_with_metrics(upstream.addr("tcp-echo"), ""));
    let http = relay.addr("http");
    let mut stream = connect(relay.addr("fwd"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for round in 0..200u32 {
        let message = format!("message {round:>53}\n");
        stream.write_all(message.as_bytes()).unwrap();
        let mut echo = vec![0u8; message.len()];
        stream.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message.as_bytes(), "round {round}");
    }
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 0);
    assert_eq!(metric(http, "plexus_spliced_bytes_total"), 0);
    let total = 8 * MIB;
    assert_eq!(transfer_both_ways(stream, total), total);
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 1);
    assert!(metric(http, "plexus_spliced_bytes_total") > 2 * total - MIB);
}

/// Out of descriptors (`prlimit --nofile=64`, every descriptor held by relayed connections):
/// a new client whose upstream socket cannot be made is closed and logged, without marking the
/// upstream down (with `upstream_fail_timeout = "1h"` it would stay skipped); a pair that
/// asks for splice then keeps copying, byte-exact, and the relay logs why; once descriptors
/// are free again new clients are relayed and the next bulk pair is spliced.
#[test]
fn out_of_descriptors_a_pair_keeps_copying_and_the_upstream_is_not_blamed() {
    let upstream = Server::start(&echo_config(""));
    let config = forward_config_with_metrics(upstream.addr("tcp-echo"), "").replace(
        &format!("upstream = \"{}\"", upstream.addr("tcp-echo")),
        &format!(
            "upstreams = [\"{}\"]\nupstream_fail_timeout = \"1h\"",
            upstream.addr("tcp-echo")
        ),
    );
    let relay = Server::start_with_prefix(&["prlimit", "--nofile=64:64"], &config);
    let fwd = relay.addr("fwd");
    let echoes = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        stream.write_all(b"x").is_ok() && matches!(stream.read(&mut byte), Ok(1))
    };
    let mut first = connect(fwd);
    assert!(echoes(&mut first));
    let mark = relay.log_mark();
    // One relayed connection at a time, each checked, until one is not relayed: then every
    // descriptor is taken (at most one is free again: the refused client's).
    let mut held = Vec::new();
    loop {
        let mut next = connect(fwd);
        if !echoes(&mut next) {
            break;
        }
        held.push(next);
        assert!(
            held.len() < 64,
            "64 relayed connections under a limit of 64 descriptors"
        );
    }
    relay.assert_log(
        mark,
        Duration::from_secs(5),
        "saying no descriptor was left for an upstream socket",
        |line| {
            line.contains("cannot open an upstream socket")
                || line.contains("descriptors_exhausted")
        },
    );
    let total = 4 * MIB;
    assert_eq!(transfer_both_ways(first, total), total);
    relay.assert_log(
        mark,
        Duration::from_secs(5),
        "saying the pair copies for want of a pipe (or, on io_uring, of the descriptor that moves \
         a session to epoll first)",
        |line| line.contains("to splice with (") && line.contains("copying"),
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        let mut fresh = connect(fwd);
        if echoes(&mut fresh) {
            break fresh;
        }
        assert!(
            Instant::now() < deadline,
            "no client relayed after the descriptors were freed: the upstream was marked down?"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let http = relay.addr("http");
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 0);
    assert_eq!(transfer_both_ways(fresh, total), total);
    assert_eq!(metric(http, "plexus_spliced_pairs_total"), 1);
}

#[test]
fn splice_false_copies() {
    let upstream = Server::start(&echo_config(""));
    let relay = Server::start(&forward_config_with_metrics(
        upstream.addr("tcp-echo"),
        "splice = false",
    ));
    assert_eq!(transfer_both_ways(connect(relay.addr("fwd")), MIB), MIB);
    assert_eq!(metric(relay.addr("http"), "plexus_spliced_pairs_total"), 0);
    assert_eq!(metric(relay.addr("http"), "plexus_spliced_bytes_total"), 0);
}

#[test]
fn copy_mode_is_byte_exact_too() {
    let upstream = Server::start(&echo_config(""));
    // Small watermarks: the relay's queues cross them constantly, so every pause/resume path
    // between the two sockets is exercised (a lost wake-up here stalls the transfer).
    let config = forward_config(upstream.addr("tcp-echo"), "tcp", "splice = false").replace(
        "event_loops = 2",
        "event_loops = 2\noutbound_high_watermark = 16384\noutbound_low_watermark = 4096\n\
         outbound_limit = 131072",
    );
    let relay = Server::start(&config);
    let total = 20 * MIB;
    assert_eq!(transfer_both_ways(connect(relay.addr("fwd")), total), total);
}

/// An upstream that stops reading while its replies wait (an echo server past its own high
/// watermark) must not stop the relay from reading those replies: the relay's upstream session
/// is kept from reading only by where its bytes go (the client's queue), never by its own queue,
/// which the client side fills. Small watermarks on both servers and a client that reads late
/// make the cycle certain: before the fix every transfer stalled (both sockets' send queues
/// full, neither read, until the idle timeout; here the read timeout).
#[test]
fn a_relay_keeps_reading_an_upstream_that_stopped_reading_it() {
    let small = "outbound_high_watermark = 16384\noutbound_low_watermark = 4096";
    let upstream = Server::start(&echo_config(small));
    let config = forward_config(upstream.addr("tcp-echo"), "tcp", "splice = false")
        .replace("event_loops = 2", &format!("event_loops = 1\n{small}"));
    let relay = Server::start(&config);
    let total = 32 * MIB;
    for round in 0..2 {
        // The client reads late: the relay's client queue passes its high watermark, the
        // upstream session waits for it, the echo's replies back up until the echo stops
        // reading, and the relay's queue to it fills too. Then the client reads.
        let stream = connect(relay.addr("fwd"));
        let received = transfer_both_ways_reading_late(stream, total, Duration::from_millis(500));
        assert_eq!(received, total, "round {round}");
    }
}

#[test]
fn dead_upstream_closes_the_client_promptly() {
    // Bind and drop a listener: its port is (almost certainly) closed now.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = Server::start(&forward_config(dead, "tcp", ""));
    let mark = relay.log_mark();
    let mut client = connect(relay.addr("fwd"));
    // The refused connect closes the client (no wall-clock check: the read timeout only bounds
    // the test, and the log line below names the upstream failure as the reason).
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let result = client.read(&mut buf);
    assert!(
        matches!(result, Ok(0))
            || matches!(&result, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut),
        "closed, not answered or left open: {result:?}"
    );
    relay.assert_log(
        mark,
        Duration::from_secs(5),
        "naming the upstream failure",
        |line| line.contains("upstream") && line.contains("closing client"),
    );
    // The relay itself keeps accepting.
    let _again = connect(relay.addr("fwd"));
}

#[test]
fn tls_listener_terminates_tls_for_a_plain_upstream() {
    let upstream = Server::start(&echo_config(""));
    let relay = Server::start(&forward_config(upstream.addr("tcp-echo"), "tls", ""));
    let addr = relay.addr("fwd");
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-quiet",
            "-tls1_3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"through the terminator\n").unwrap();
    let mut stdout = client.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = client.kill();
    let _ = client.wait();
    drop(stdin);
    let got = reader.join().unwrap();
    assert_eq!(got, b"through the terminator\n");
}

/// Request/response bursts through copy mode: each 256 KiB burst ends with the upstream quiet,
/// so bytes the relay left unread (its client queue was over the high watermark) produce no new
/// edge; the relay itself must come back for them, or the round stalls.
#[test]
fn copy_mode_bursts_do_not_stall() {
    let upstream = Server::start(&echo_config(""));
    let config = forward_config(upstream.addr("tcp-echo"), "tcp", "splice = false").replace(
        "event_loops = 2",
        "event_loops = 2\noutbound_high_watermark = 16384\noutbound_low_watermark = 4096\n\
         outbound_limit = 131072",
    );
    let relay = Server::start(&config);
    let mut stream = connect(relay.addr("fwd"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let burst: Vec<u8> = (0..256 * 1024u64).map(pattern).collect();
    let mut back = vec![0u8; burst.len()];
    for round in 0..20 {
        stream.write_all(&burst).unwrap();
        stream
            .read_exact(&mut back)
            .unwrap_or_else(|err| panic!("round {round} stalled: {err}"));
        assert!(back == burst, "round {round} differs");
    }
}
