//! udp-echo: one datagram is one message.
//!
//! Each of `--connections` sockets is connected to the target (bound to a source address when
//! several are asked for). A datagram carries its sequence number (8 bytes, little endian)
//! followed by the socket's pattern for that sequence number, so every echoed byte is
//! verified and a reply is matched to its request whatever the order. A datagram not echoed
//! within `--timeout` is lost (a `timeout` error); a reply arriving after that is counted as
//! `late`. Closed loop keeps `--pipeline` datagrams outstanding per socket; `--rate` sends on
//! schedule and measures from the intended send time, like the stream modes.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use super::{
    pattern, seed_of, Errors, Fail, Latency, Outcome, Plan, Progress, ProgressLine, DRAIN,
};

struct Sock {
    index: usize,
    sock: UdpSocket,
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

pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let barrier = Barrier::new(plan.threads);
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "datagrams");
    let tallies: Vec<Tally> = thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let indices: Vec<usize> = (t..plan.connections).step_by(plan.threads).collect();
                let (barrier, progress) = (&barrier, &progress);
                scope.spawn(move || worker(plan, &indices, barrier, progress))
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

fn open(plan: &Plan, index: usize, poll: &Poll, slot: usize) -> Result<UdpSocket, Fail> {
    let local = match (plan.source(index), plan.addr) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        (None, SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let mut sock = UdpSocket::bind(local)?;
    sock.connect(plan.addr)?;
    poll.registry().register(
        &mut sock,
        Token(slot),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(sock)
}

fn worker(plan: &Plan, indices: &[usize], barrier: &Barrier, progress: &Progress) -> Tally {
    let mut tally = Tally::default();
    let poll = Poll::new();
    let mut socks: Vec<Option<Sock>> = Vec::new();
    if let Ok(poll) = &poll {
        for (slot, &index) in indices.iter().enumerate() {
            match open(plan, index, poll, slot) {
                Ok(sock) => socks.push(Some(Sock {
                    index,
                    sock,
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
                let n = match s.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP port unreachable surfaces here as ECONNREFUSED.
                    Err(err) => {
                        tally.errors.add(s.index, &Fail::from_io(err));
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
    for s in socks.iter().flatten() {
        let left = (s.inflight.len() + s.unsent.len()) as u64;
        tally.lost += left;
        tally.errors.add_n("timeout", left);
    }
    tally
}

/// Sends the due datagrams until the socket would block.
fn send_due(s: &mut Sock, size: usize, out: &mut Vec<u8>) -> Result<(), Fail> {
    while let Some(&(seq, at)) = s.unsent.front() {
        datagram(s.seed, seq, size, out);
        match s.sock.send(out) {
            Ok(_) => {
                s.unsent.pop_front();
                s.inflight.push_back((seq, at));
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                s.unsent.pop_front();
                return Err(Fail::from_io(err));
            }
        }
    }
    Ok(())
}

/// Verifies an echoed datagram; its send time, or `None` when it was already given up.
fn check(
    s: &mut Sock,
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
