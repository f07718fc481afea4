//! dtls-hello-flood: DTLS 1.2 ClientHellos from many source addresses, never answered.
//!
//! One UDP socket per source address (127.0.0.1, 127.0.0.2, ... — all of 127.0.0.0/8 is
//! loopback on Linux), each connected to the target. Datagrams go out round robin at
//! `--rate` per second (default 10,000) for `--duration`; each is a fresh, well-formed
//! ClientHello (new random, increasing record sequence) without a cookie. Replies are read
//! and classified — a HelloVerifyRequest is what a server doing stateless cookies sends —
//! but never answered, so a server that allocates per ClientHello shows it in its memory,
//! and one that amplifies shows it in `reply_bytes` / `bytes_sent`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use super::{Fail, Outcome, Plan, Progress, ProgressLine};

/// Datagrams per second without `--rate`.
const DEFAULT_RATE: f64 = 10_000.0;

/// A DTLS 1.2 ClientHello record (no cookie), with `random` and record sequence `seq`.
pub(crate) fn client_hello(random: [u8; 32], seq: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    body.extend_from_slice(&[0xfe, 0xfd]); // client_version DTLS 1.2
    body.extend_from_slice(&random);
    body.push(0); // session_id
    body.push(0); // cookie: none, so a cookie-checking server must answer HelloVerifyRequest
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc02c, 0xc030];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let mut ext = Vec::new();
    // supported_groups: x25519, secp256r1
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    // extended_master_secret, renegotiation_info (empty)
    ext.extend_from_slice(&[0x00, 0x17, 0x00, 0x00, 0xff, 0x01, 0x00, 0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);

    let len = body.len() as u32;
    let mut hs = Vec::with_capacity(body.len() + 12);
    hs.push(1); // client_hello
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&[0, 0]); // message_seq
    hs.extend_from_slice(&[0, 0, 0]); // fragment_offset
    hs.extend_from_slice(&len.to_be_bytes()[1..]); // fragment_length
    hs.extend_from_slice(&body);

    let mut record = Vec::with_capacity(hs.len() + 13);
    record.push(22); // handshake
    record.extend_from_slice(&[0xfe, 0xfd]);
    record.extend_from_slice(&[0, 0]); // epoch
    record.extend_from_slice(&seq.to_be_bytes()[2..]); // 48-bit sequence number
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// A HelloVerifyRequest: handshake record, message type 3.
fn is_hello_verify_request(data: &[u8]) -> bool {
    data.len() > 13 && data[0] == 22 && data[13] == 3
}

pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new("datagrams");
    outcome.errors_fail = false;
    let mut poll = Poll::new()?;
    let mut socks = Vec::with_capacity(plan.sources.len());
    for (k, source) in plan.sources.iter().enumerate() {
        let Some(ip) = source else { continue };
        let opened = (|| -> io::Result<UdpSocket> {
            let mut sock = UdpSocket::bind(SocketAddr::new(*ip, 0))?;
            sock.connect(plan.addr)?;
            poll.registry()
                .register(&mut sock, Token(socks.len()), Interest::READABLE)?;
            Ok(sock)
        })();
        match opened {
            Ok(sock) => socks.push(sock),
            Err(err) => outcome.errors.add(k, &Fail::from_io(err)),
        }
    }
    if socks.is_empty() {
        anyhow::bail!("no source socket could be opened");
    }
    let rate = plan.rate.unwrap_or(DEFAULT_RATE);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "ClientHellos");
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    let end = start + plan.duration;
    // Replies still in flight when sending stops are waited for a little.
    let listen_until = end + Duration::from_millis(500);
    let (mut sent, mut bytes_sent, mut next) = (0u64, 0u64, start);
    let (mut replies, mut hvr, mut reply_bytes) = (0u64, 0u64, 0u64);
    let mut repliers = vec![false; socks.len()];
    loop {
        let now = Instant::now();
        if now >= listen_until {
            break;
        }
        while next <= now && next < end {
            let k = (sent % socks.len() as u64) as usize;
            let mut random = [0u8; 32];
            random[..8].copy_from_slice(&sent.to_be_bytes());
            random[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
            let hello = client_hello(random, sent / socks.len() as u64);
            match socks[k].send(&hello) {
                Ok(n) => {
                    sent += 1;
                    bytes_sent += n as u64;
                }
                // A full socket buffer: the datagram is skipped, not queued (rate is a cap).
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => sent += 1,
                Err(err) => {
                    sent += 1;
                    outcome.errors.add(k, &Fail::from_io(err));
                }
            }
            next += interval;
        }
        progress.done.store(sent, Ordering::Relaxed);
        let wait = if now < end {
            next.saturating_duration_since(now)
        } else {
            listen_until - now
        };
        match poll.poll(&mut events, Some(wait.min(Duration::from_millis(50)))) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        }
        for event in events.iter() {
            let k = event.token().0;
            let Some(sock) = socks.get(k) else { continue };
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        replies += 1;
                        reply_bytes += n as u64;
                        hvr += u64::from(is_hello_verify_request(&buf[..n]));
                        repliers[k] = true;
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        // ECONNREFUSED from an ICMP port unreachable: nothing listens.
                        outcome.errors.add(k, &Fail::from_io(err));
                        break;
                    }
                }
            }
        }
    }
    drop(line);
    outcome.count = sent;
    outcome.bytes = reply_bytes;
    outcome.window = plan.duration;
    outcome.extra("sources", json!(socks.len()));
    outcome.extra("bytes_sent", json!(bytes_sent));
    outcome.extra("replies", json!(replies));
    outcome.extra("hello_verify_requests", json!(hvr));
    outcome.extra("other_replies", json!(replies - hvr));
    outcome.extra("reply_bytes", json!(reply_bytes));
    outcome.extra(
        "sources_answered",
        json!(repliers.iter().filter(|r| **r).count()),
    );
    outcome.extra(
        "amplification",
        json!(if bytes_sent == 0 {
            0.0
        } else {
            (reply_bytes as f64 / bytes_sent as f64 * 1000.0).round() / 1000.0
        }),
    );
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_is_a_well_formed_dtls12_record() {
        let rec = client_hello([7; 32], 5);
        assert_eq!(&rec[..3], &[22, 0xfe, 0xfd]);
        assert_eq!(&rec[5..11], &[0, 0, 0, 0, 0, 5]);
        let len = u16::from_be_bytes([rec[11], rec[12]]) as usize;
        assert_eq!(rec.len(), 13 + len);
        let hs = &rec[13..];
        assert_eq!(hs[0], 1);
        let body_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
        assert_eq!(hs.len(), 12 + body_len);
        assert_eq!(&hs[9..12], &hs[1..4], "one unfragmented fragment");
        assert_eq!(hs[12 + 2 + 32 + 1], 0, "empty cookie");
    }
}
