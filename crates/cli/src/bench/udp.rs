//! udp-echo and dtls-echo: one datagram (DTLS: one record) is one message.
//!
//! Each of `--connections` sockets is connected to the target (bound to a source address when
//! several are asked for). The engine drives a [`Link`] per socket, the only thing that
//! differs between the two modes: the socket itself ([`PlainUdp`]), or a DTLS 1.2 session
//! over it (OpenSSL, set up by [`crate::dgram_client`]; every handshake completes before the
//! measured window opens, a failed one is a `tls` error, and each session ends with
//! close_notify). A datagram carries its sequence number (8 bytes, little endian)
//! followed by the socket's pattern for that sequence number, so every echoed byte is
//! verified and a reply is matched to its request whatever the order. A datagram not echoed
//! within `--timeout` is lost (a `timeout` error); a reply arriving after that is counted as
//! `late`. Closed loop keeps `--pipeline` datagrams outstanding per socket; `--rate` sends on
//! schedule and measures from the intended send time, like the stream modes.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use openssl::ssl::{ErrorCode, SslStream};
use serde_json::json;

use super::{
    pattern, seed_of, Errors, Fail, Latency, Outcome, Plan, Progress, ProgressLine,
    CONNECT_TIMEOUT, DRAIN, HARD_CAP_EXTRA,
};
use crate::dgram_client::{self, DtlsClient, PlainUdp};

/// How long one blocking read waits during a DTLS handshake before OpenSSL's retransmission
/// timer is checked.
const HANDSHAKE_POLL: Duration = Duration::from_millis(20);

/// One connected datagram socket as the engine sees it (non-blocking once opened).
trait Link {
    /// Sends one message; `Ok(false)`: the socket would block, send the same message later.
    fn send(&mut self, data: &[u8]) -> Result<bool, Fail>;
    /// Receives one message; `Ok(None)`: nothing is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Fail>;
    /// The socket to poll.
    fn socket(&self) -> &UdpSocket;
    /// Ends the session at the end of the run.
    fn close(&mut self) {}
}

impl Link for PlainUdp {
    fn send(&mut self, data: &[u8]) -> Result<bool, Fail> {
        loop {
            return match self.0.send(data) {
                Ok(_) => Ok(true),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => Err(Fail::from_io(err)),
            };
        }
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Fail> {
        loop {
            return match self.0.recv(buf) {
                Ok(n) => Ok(Some(n)),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP port unreachable surfaces here as ECONNREFUSED.
                Err(err) => Err(Fail::from_io(err)),
            };
        }
    }
    fn socket(&self) -> &UdpSocket {
        &self.0
    }
}

/// Classifies an OpenSSL failure: the socket's own error when there is one, else `tls`.
fn ssl_fail(err: openssl::ssl::Error) -> Fail {
    if err.code() == ErrorCode::ZERO_RETURN {
        return Fail::Eof;
    }
    match err.into_io_error() {
        Ok(io) => Fail::from_io(io),
        Err(err) => Fail::Tls(err.to_string()),
    }
}

impl Link for SslStream<PlainUdp> {
    fn send(&mut self, data: &[u8]) -> Result<bool, Fail> {
        match self.ssl_write(data) {
            Ok(_) => Ok(true),
            // A full socket buffer (or, in principle, a renegotiation read): retried with
            // the same bytes, which OpenSSL requires.
            Err(err) if matches!(err.code(), ErrorCode::WANT_WRITE | ErrorCode::WANT_READ) => {
                Ok(false)
            }
            Err(err) => Err(ssl_fail(err)),
        }
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Fail> {
        match self.ssl_read(buf) {
            Ok(n) => Ok(Some(n)),
            // No datagram waiting, or one that carried no application data (a retransmitted
            // handshake record, a record OpenSSL discarded).
            Err(err) if err.code() == ErrorCode::WANT_READ => Ok(None),
            Err(err) => Err(ssl_fail(err)),
        }
    }
    fn socket(&self) -> &UdpSocket {
        &self.get_ref().0
    }
    fn close(&mut self) {
        // close_notify; the socket is non-blocking, so this never waits for the peer's.
        let _ = self.shutdown();
    }
}

struct Sock<L> {
    index: usize,
    link: L,
    seed: u64,
    next_seq: u64,
    /// Sent, awaiting the echo: (sequence number, send or intended time).
    inflight: VecDeque<(u64, Instant)>,
    /// Due but not sent yet (the socket buffer was full).
    unsent: VecDeque<(u64, Instant)>,
    next_due: Instant,
}

#[derive(Default)]
struct Tally {
    latency: Latency,
    count: u64,
    bytes: u64,
    errors: Errors,
    lost: u64,
    late: u64,
    scheduled: u64,
}

fn datagram(seed: u64, seq: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seq.to_le_bytes());
    let base = seq * size as u64;
    out.extend((8..size as u64).map(|i| pattern(seed, base + i)));
}

/// udp-echo, or dtls-echo when the plan carries a DTLS client.
pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    match &plan.dtls {
        None => run_over(plan, |index| {
            let sock = connected(plan, index)?;
            sock.set_nonblocking(true)?;
            Ok(PlainUdp(sock))
        }),
        Some(client) => {
            // Handshakes run one after the other per thread: a silent server must not hold
            // the run past its hard cap, so they all share this deadline too.
            let setup_end = Instant::now() + HARD_CAP_EXTRA / 2;
            run_over(plan, |index| open_dtls(plan, client, index, setup_end))
        }
    }
}

/// A DTLS session on a fresh connected socket, its handshake complete (bounded by
/// [`CONNECT_TIMEOUT`] and `setup_end`), the socket then switched to non-blocking.
fn open_dtls(
    plan: &Plan,
    client: &DtlsClient,
    index: usize,
    setup_end: Instant,
) -> Result<SslStream<PlainUdp>, Fail> {
    let left = setup_end
        .saturating_duration_since(Instant::now())
        .min(CONNECT_TIMEOUT);
    if left.is_zero() {
        return Err(Fail::Tls(
            "no handshake started: the setup time is over".into(),
        ));
    }
    let sock = connected(plan, index)?;
    sock.set_read_timeout(Some(HANDSHAKE_POLL))?;
    let tls = |err: anyhow::Error| Fail::Tls(format!("{err:#}"));
    let mut stream = client.session(sock).map_err(tls)?;
    dgram_client::handshake(&mut stream, left).map_err(tls)?;
    stream.get_ref().0.set_nonblocking(true)?;
    Ok(stream)
}

fn run_over<L: Link>(
    plan: &Plan,
    open: impl Fn(usize) -> Result<L, Fail> + Sync,
) -> anyhow::Result<Outcome> {
    let barrier = Barrier::new(plan.threads);
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "datagrams");
    let tallies: Vec<Tally> = thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let indices: Vec<usize> = (t..plan.connections).step_by(plan.threads).collect();
                let (barrier, progress, open) = (&barrier, &progress, &open);
                scope.spawn(move || worker(plan, &indices, barrier, progress, open))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    drop(line);
    let mut outcome = Outcome::new("messages");
    outcome.window = plan.duration;
    let (mut lost, mut late, mut scheduled) = (0, 0, 0);
    for tally in &tallies {
        outcome.latency.merge(&tally.latency);
        outcome.count += tally.count;
        outcome.bytes += tally.bytes;
        outcome.errors.merge(&tally.errors);
        lost += tally.lost;
        late += tally.late;
        scheduled += tally.scheduled;
    }
    outcome.verified = outcome.errors.total() == 0 && outcome.count > 0;
    outcome.extra("sent", json!(scheduled));
    outcome.extra("lost", json!(lost));
    outcome.extra("late", json!(late));
    outcome.extra("timeout_ms", json!(plan.timeout.as_millis() as u64));
    Ok(outcome)
}

/// A (blocking) UDP socket connected to the target, bound to connection `index`'s source.
fn connected(plan: &Plan, index: usize) -> io::Result<UdpSocket> {
    let local = match (plan.source(index), plan.addr) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        (None, SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(plan.addr)?;
    Ok(sock)
}

fn open_registered<L: Link>(
    open: &impl Fn(usize) -> Result<L, Fail>,
    index: usize,
    poll: &Poll,
    slot: usize,
) -> Result<L, Fail> {
    let link = open(index)?;
    poll.registry().register(
        &mut SourceFd(&link.socket().as_raw_fd()),
        Token(slot),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(link)
}

fn worker<L: Link>(
    plan: &Plan,
    indices: &[usize],
    barrier: &Barrier,
    progress: &Progress,
    open: &impl Fn(usize) -> Result<L, Fail>,
) -> Tally {
    let mut tally = Tally::default();
    let poll = Poll::new();
    let mut socks: Vec<Option<Sock<L>>> = Vec::new();
    if let Ok(poll) = &poll {
        for (slot, &index) in indices.iter().enumerate() {
            match open_registered(open, index, poll, slot) {
                Ok(link) => socks.push(Some(Sock {
                    index,
                    link,
                    seed: seed_of(index),
                    next_seq: 0,
                    inflight: VecDeque::new(),
                    unsent: VecDeque::new(),
                    next_due: Instant::now(),
                })),
                Err(fail) => {
                    tally.errors.add(index, &fail);
                    socks.push(None);
                }
            }
        }
    }
    barrier.wait();
    let mut poll = match poll {
        Ok(poll) => poll,
        Err(err) => {
            tally.errors.add(indices[0], &Fail::from_io(err));
            return tally;
        }
    };
    let mut events = Events::with_capacity(1024);
    let mut out = Vec::with_capacity(plan.size);
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let drain_until = end + DRAIN.max(plan.timeout);
    let in_window = |t: Instant| t >= measure_from && t < end;
    let interval = plan
        .rate
        .map(|rate| Duration::from_secs_f64(plan.connections as f64 / rate));
    for s in socks.iter_mut().flatten() {
        s.next_due = match interval {
            Some(i) => start + i.mul_f64(s.index as f64 / plan.connections as f64),
            None => start,
        };
    }

    loop {
        let now = Instant::now();
        let outstanding = socks
            .iter()
            .flatten()
            .any(|s| !s.inflight.is_empty() || !s.unsent.is_empty());
        if now >= drain_until || (now >= end && !outstanding) {
            break;
        }
        let mut wait = Duration::from_millis(20);
        for s in socks.iter_mut().flatten() {
            // Losses: the oldest outstanding datagrams past the timeout.
            while let Some(&(_, sent)) = s.inflight.front() {
                if now - sent < plan.timeout {
                    break;
                }
                s.inflight.pop_front();
                tally.lost += 1;
                tally.errors.add(s.index, &Fail::Timeout);
            }
            if now < end {
                match interval {
                    Some(interval) => {
                        while s.next_due <= now && s.next_due < end {
                            s.unsent.push_back((s.next_seq, s.next_due));
                            s.next_seq += 1;
                            tally.scheduled += u64::from(in_window(s.next_due));
                            s.next_due += interval;
                        }
                        if s.next_due > now {
                            wait = wait.min(s.next_due - now);
                        }
                    }
                    None => {
                        while s.inflight.len() + s.unsent.len() < plan.pipeline {
                            s.unsent.push_back((s.next_seq, now));
                            s.next_seq += 1;
                            tally.scheduled += u64::from(in_window(now));
                        }
                    }
                }
            }
            if let Err(fail) = send_due(s, plan.size, &mut out) {
                tally.errors.add(s.index, &fail);
            }
        }
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tally.errors.add(0, &Fail::from_io(err));
                break;
            }
        }
        let mut done = 0;
        for event in events.iter() {
            let Some(Some(s)) = socks.get_mut(event.token().0) else {
                continue;
            };
            loop {
                let n = match s.link.recv(&mut buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(fail) => {
                        tally.errors.add(s.index, &fail);
                        break;
                    }
                };
                let now = Instant::now();
                match check(s, &buf[..n], plan.size, &mut out) {
                    Ok(Some(sent)) => {
                        done += 1;
                        if in_window(sent) {
                            tally.latency.record(now - sent);
                            tally.count += 1;
                            tally.bytes += n as u64;
                        }
                    }
                    Ok(None) => tally.late += 1,
                    Err(fail) => tally.errors.add(s.index, &fail),
                }
            }
            if let Err(fail) = send_due(s, plan.size, &mut out) {
                tally.errors.add(s.index, &fail);
            }
        }
        progress.done.fetch_add(done, Ordering::Relaxed);
        progress
            .errors
            .store(tally.errors.total(), Ordering::Relaxed);
    }
    for s in socks.iter_mut().flatten() {
        s.link.close();
        let left = (s.inflight.len() + s.unsent.len()) as u64;
        tally.lost += left;
        tally.errors.add_n("timeout", left);
    }
    tally
}

/// Sends the due datagrams until the socket would block.
fn send_due<L: Link>(s: &mut Sock<L>, size: usize, out: &mut Vec<u8>) -> Result<(), Fail> {
    while let Some(&(seq, at)) = s.unsent.front() {
        datagram(s.seed, seq, size, out);
        match s.link.send(out) {
            Ok(true) => {
                s.unsent.pop_front();
                s.inflight.push_back((seq, at));
            }
            Ok(false) => return Ok(()),
            Err(fail) => {
                s.unsent.pop_front();
                return Err(fail);
            }
        }
    }
    Ok(())
}

/// Verifies an echoed datagram; its send time, or `None` when it was already given up.
fn check<L>(
    s: &mut Sock<L>,
    data: &[u8],
    size: usize,
    out: &mut Vec<u8>,
) -> Result<Option<Instant>, Fail> {
    if data.len() != size {
        return Err(Fail::Mismatch(format!(
            "echoed datagram of {} bytes, sent {size}",
            data.len()
        )));
    }
    let seq = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    datagram(s.seed, seq, size, out);
    if data != &out[..] {
        return Err(Fail::Mismatch(format!("datagram {seq} came back altered")));
    }
    match s.inflight.iter().position(|&(q, _)| q == seq) {
        Some(pos) => Ok(s.inflight.remove(pos).map(|(_, at)| at)),
        None if seq < s.next_seq => Ok(None),
        None => Err(Fail::Mismatch(format!("datagram {seq} was never sent"))),
    }
}
