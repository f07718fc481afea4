//! connect-rate: connections (and TLS handshakes, full or resumed) per second.
//!
//! Each of `--connections` slots repeats a cycle: non-blocking connect, TLS handshake (with
//! `--tls`), one echo of `--size` pattern bytes (verified), close (close_notify first with
//! TLS). A cycle's latency runs from the connect call to the verified echo. With `--resume`
//! all slots share one client configuration and its session cache, so after the first
//! handshakes the server sees resumptions; the JSON says how many handshakes were each kind.
//! A cycle that takes longer than [`CYCLE_TIMEOUT`] is a `timeout` error; a failed slot waits
//! [`BACKOFF`] before its next attempt, so a refusing server is not hammered in a tight loop.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use rustls::{ClientConfig, HandshakeKind};
use serde_json::json;

use super::stream::{describe, EchoExchange, Exchange, Transport};
use super::tls::Peer;
use super::{
    seed_of, tcp_connect_nonblocking, Errors, Fail, Latency, Outcome, Plan, Progress, ProgressLine,
};

/// Longest a connect + handshake + echo may take.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause of a slot after a failed cycle.
const BACKOFF: Duration = Duration::from_millis(10);

enum Phase {
    Connecting,
    Handshaking,
    Echoing,
}

struct Cycle {
    transport: Transport,
    phase: Phase,
    started: Instant,
    echo: EchoExchange,
    out: Vec<u8>,
    pos: usize,
}

enum Slot {
    Busy(Box<Cycle>),
    Waiting(Instant),
}

#[derive(Default)]
struct Tally {
    latency: Latency,
    count: u64,
    resumed: u64,
    full: u64,
    errors: Errors,
    tls: Option<String>,
}

pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let tls_config = match &plan.tls {
        Some(tls) => Some(tls.config(plan.resume)?),
        None => None,
    };
    let barrier = Barrier::new(plan.threads);
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "handshakes");
    let tallies: Vec<Tally> = thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let slots: Vec<usize> = (t..plan.connections).step_by(plan.threads).collect();
                let (barrier, progress, config) = (&barrier, &progress, tls_config.as_ref());
                scope.spawn(move || worker(plan, &slots, config, barrier, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    drop(line);
    let mut outcome = Outcome::new("handshakes");
    outcome.window = plan.duration;
    let (mut resumed, mut full, mut desc) = (0, 0, None);
    for tally in &tallies {
        outcome.latency.merge(&tally.latency);
        outcome.count += tally.count;
        outcome.errors.merge(&tally.errors);
        resumed += tally.resumed;
        full += tally.full;
        desc = desc.or_else(|| tally.tls.clone());
    }
    outcome.bytes = outcome.count * plan.size as u64;
    outcome.verified = outcome.errors.total() == 0 && outcome.count > 0;
    outcome.extra(
        "transport",
        json!(if plan.tls.is_some() { "tls" } else { "tcp" }),
    );
    outcome.extra("resume", json!(plan.resume));
    if plan.tls.is_some() {
        outcome.extra("full_handshakes", json!(full));
        outcome.extra("resumed_handshakes", json!(resumed));
    }
    if let Some(tls) = &plan.tls {
        outcome.extra("certificates_verified", json!(tls.verifies_certificates()));
    }
    if let Some(desc) = desc {
        outcome.extra("tls", json!(desc));
    }
    Ok(outcome)
}

fn worker(
    plan: &Plan,
    slots: &[usize],
    tls_config: Option<&Arc<ClientConfig>>,
    barrier: &Barrier,
    progress: &Progress,
) -> Tally {
    let mut tally = Tally::default();
    let poll = Poll::new();
    barrier.wait();
    let mut poll = match poll {
        Ok(poll) => poll,
        Err(err) => {
            tally.errors.add(slots[0], &Fail::from_io(err));
            return tally;
        }
    };
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let mut table: Vec<Slot> = slots.iter().map(|_| Slot::Waiting(start)).collect();
    let mut seq = 0usize;

    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Start waiting slots whose backoff is over; time out stuck cycles.
        for (k, slot) in table.iter_mut().enumerate() {
            let restart = match slot {
                Slot::Waiting(at) => *at <= now,
                Slot::Busy(cycle) if now - cycle.started > CYCLE_TIMEOUT => {
                    tally.errors.add(slots[k], &Fail::Timeout);
                    true
                }
                Slot::Busy(_) => false,
            };
            if restart {
                close(&poll, slot, now);
                seq += 1;
                *slot = begin(plan, &poll, k, slots[k], seq, tls_config, &mut tally, now);
            }
        }
        match poll.poll(
            &mut events,
            Some((end - now).min(Duration::from_millis(50))),
        ) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tally.errors.add(slots[0], &Fail::from_io(err));
                break;
            }
        }
        let mut done = 0;
        for event in events.iter() {
            let k = event.token().0;
            let Some(Slot::Busy(cycle)) = table.get_mut(k) else {
                continue;
            };
            match step(cycle, &mut buf) {
                Ok(false) => {}
                Ok(true) => {
                    let now = Instant::now();
                    if cycle.started >= measure_from && now < end {
                        tally.latency.record(now - cycle.started);
                        tally.count += 1;
                        match cycle
                            .transport
                            .tls
                            .as_ref()
                            .and_then(|t| t.handshake_kind())
                        {
                            Some(HandshakeKind::Resumed) => tally.resumed += 1,
                            Some(_) => tally.full += 1,
                            None => {}
                        }
                    }
                    if tally.tls.is_none() {
                        tally.tls = cycle.transport.tls.as_ref().map(describe);
                    }
                    done += 1;
                    close(&poll, &mut table[k], now);
                    seq += 1;
                    table[k] = begin(plan, &poll, k, slots[k], seq, tls_config, &mut tally, now);
                }
                Err(fail) => {
                    tally.errors.add(slots[k], &fail);
                    let now = Instant::now();
                    close(&poll, &mut table[k], now);
                    table[k] = Slot::Waiting(now + BACKOFF);
                }
            }
        }
        progress.done.fetch_add(done, Ordering::Relaxed);
        progress
            .errors
            .store(tally.errors.total(), Ordering::Relaxed);
    }
    for slot in &mut table {
        close(&poll, slot, Instant::now());
    }
    tally
}

/// Starts a cycle in slot `k` (token `k`), or a backoff if the socket cannot even be made.
#[allow(clippy::too_many_arguments)]
fn begin(
    plan: &Plan,
    poll: &Poll,
    k: usize,
    index: usize,
    seq: usize,
    tls_config: Option<&Arc<ClientConfig>>,
    tally: &mut Tally,
    now: Instant,
) -> Slot {
    let cycle = (|| -> Result<Cycle, Fail> {
        let mut sock = tcp_connect_nonblocking(plan.addr, plan.source(seq))?;
        poll.registry()
            .register(&mut sock, Token(k), Interest::READABLE | Interest::WRITABLE)?;
        let tls = match (tls_config, &plan.tls) {
            (Some(config), Some(tls)) => Some(tls.connect(config)?),
            _ => None,
        };
        Ok(Cycle {
            transport: Transport { sock, tls },
            phase: Phase::Connecting,
            started: now,
            echo: EchoExchange::new(seed_of(index) ^ ((seq as u64) << 8), plan.size),
            out: Vec::new(),
            pos: 0,
        })
    })();
    match cycle {
        Ok(cycle) => Slot::Busy(Box::new(cycle)),
        Err(fail) => {
            tally.errors.add(index, &fail);
            Slot::Waiting(now + BACKOFF)
        }
    }
}

/// Ends a slot's cycle (close_notify with TLS, then the socket is closed).
fn close(poll: &Poll, slot: &mut Slot, now: Instant) {
    if let Slot::Busy(cycle) = std::mem::replace(slot, Slot::Waiting(now)) {
        let mut cycle = *cycle;
        if let Some(tls) = &mut cycle.transport.tls {
            if !tls.is_handshaking() {
                tls.send_close_notify();
                let _ = super::tls::flush(tls, &mut cycle.transport.sock);
            }
        }
        let _ = poll.registry().deregister(&mut cycle.transport.sock);
    }
}

/// Advances a cycle after a readiness event; `true` once its echo came back verified.
fn step(cycle: &mut Cycle, buf: &mut [u8]) -> Result<bool, Fail> {
    if let Phase::Connecting = cycle.phase {
        if let Some(err) = cycle.transport.sock.take_error()? {
            return Err(Fail::from_io(err));
        }
        match cycle.transport.sock.peer_addr() {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(err) => return Err(Fail::from_io(err)),
        }
        cycle.phase = Phase::Handshaking;
    }
    if let Phase::Handshaking = cycle.phase {
        if !cycle.transport.handshake(buf)? {
            return Ok(false);
        }
        cycle.phase = Phase::Echoing;
        cycle.echo.request(&mut cycle.out);
    }
    cycle.transport.send(&cycle.out, &mut cycle.pos)?;
    let mut completed = 0;
    let echo = &mut cycle.echo;
    let peer = cycle.transport.recv(buf, |data| {
        completed += echo.receive(data)?;
        Ok(())
    })?;
    if completed > 0 {
        return Ok(true);
    }
    if peer == Peer::Closed {
        return Err(Fail::Eof);
    }
    Ok(false)
}
