//! The stream engine: tcp-echo, tls-echo and http over TCP (or TLS) connections.
//!
//! The closed loop runs on plexus' client runtime ([`super::stream_rt`]); this module holds
//! the [`Exchange`]s both engines use, the summary of a run, and the mio engine the open loop
//! (`--rate`) runs on: its schedule is finer than the runtime's 10 ms timer tick.
//!
//! `--threads` std threads each run a mio `Poll` over their share of the connections. Every
//! connection is connected (and, with TLS, handshaken) before a barrier; then all threads
//! start together. An [`Exchange`] turns the stream into messages: it writes requests and
//! says how many of them a run of reply bytes completed (echo: every byte verified against
//! the pattern; http: responses framed by Content-Length or chunked encoding, 2xx required).
//!
//! Closed loop (default): each connection keeps `--pipeline` requests outstanding; a request's
//! latency runs from when it was queued. Open loop (`--rate R`): each connection sends every
//! `connections / R` seconds whether or not replies came back, and latency runs from the
//! INTENDED send time, so a server that stalls is charged for every request it delayed
//! (coordinated omission corrected). Requests are counted if their send time falls in the
//! measured window; after the window, outstanding requests get [`DRAIN`] to complete, and
//! whatever is still unanswered is recorded at its age and counted as a `timeout` error (the
//! backlog is never hidden).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::{ClientConfig, ClientConnection};
use serde_json::json;

use super::http::HttpExchange;
use super::tls::{self, Peer};
use super::{
    pattern, seed_of, tcp_connect, Errors, Fail, Latency, Mode, Outcome, Plan, Progress,
    ProgressLine, DRAIN, HARD_CAP_EXTRA,
};

/// Size of each thread's read buffer.
const READ_BUF: usize = 64 * 1024;
/// Longest single poll wait (keeps the loop responsive to its deadlines).
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A TCP connection, with its TLS session when there is one.
pub(crate) struct Transport {
    pub(crate) sock: TcpStream,
    pub(crate) tls: Option<ClientConnection>,
}

impl Transport {
    /// Writes `out[*pos..]` until all is written or the socket would block.
    pub(crate) fn send(&mut self, out: &[u8], pos: &mut usize) -> Result<(), Fail> {
        if let Some(tls) = &mut self.tls {
            loop {
                if *pos < out.len() {
                    // rustls takes at most its buffer limit at once.
                    *pos += tls.writer().write(&out[*pos..])?;
                }
                let all_written = tls::flush(tls, &mut self.sock)?;
                if !all_written || *pos == out.len() {
                    return Ok(());
                }
            }
        }
        while *pos < out.len() {
            let left = out.len() - *pos;
            match self.sock.write(&out[*pos..]) {
                Ok(0) => return Err(Fail::from_io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    *pos += n;
                    // A short write means the socket buffer is full: wait for the edge.
                    if n < left {
                        break;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(Fail::from_io(err)),
            }
        }
        Ok(())
    }

    /// Reads until drained, handing plaintext to `on_data`.
    pub(crate) fn recv(
        &mut self,
        buf: &mut [u8],
        mut on_data: impl FnMut(&[u8]) -> Result<(), Fail>,
    ) -> Result<Peer, Fail> {
        if let Some(tls) = &mut self.tls {
            let peer = tls::read(tls, &mut self.sock, buf, on_data);
            // Sends an alert after an error, or anything the records asked for.
            let _ = tls::flush(tls, &mut self.sock);
            return peer;
        }
        loop {
            match self.sock.read(buf) {
                Ok(0) => return Ok(Peer::Closed),
                Ok(n) => {
                    on_data(&buf[..n])?;
                    // Short read: drained (edge-triggered, the next byte makes a new edge).
                    if n < buf.len() {
                        return Ok(Peer::Open);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Peer::Open),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(Fail::from_io(err)),
            }
        }
    }

    /// Advances a TLS handshake; `true` once complete and flushed (always for plain TCP).
    pub(crate) fn handshake(&mut self, buf: &mut [u8]) -> Result<bool, Fail> {
        let Some(tls) = &mut self.tls else {
            return Ok(true);
        };
        tls::flush(tls, &mut self.sock)?;
        let peer = tls::read(tls, &mut self.sock, buf, |_| {
            Err(Fail::Mismatch(
                "data from the server before any request".into(),
            ))
        });
        let flushed = tls::flush(tls, &mut self.sock);
        if peer? == Peer::Closed {
            return Err(Fail::Eof);
        }
        Ok(flushed? && !tls.is_handshaking())
    }
}

/// How a stream of requests and replies is turned into messages.
pub(crate) trait Exchange {
    /// Appends one request to `out`.
    fn request(&mut self, out: &mut Vec<u8>);
    /// Consumes reply bytes (in order); returns how many requests they completed.
    fn receive(&mut self, data: &[u8]) -> Result<u64, Fail>;
}

/// Echo: a request is `size` bytes of the connection's pattern, complete when every one of
/// them has come back, verified.
pub(crate) struct EchoExchange {
    seed: u64,
    size: u64,
    sent: u64,
    received: u64,
}

impl EchoExchange {
    pub(crate) fn new(seed: u64, size: usize) -> EchoExchange {
        EchoExchange {
            seed,
            size: size as u64,
            sent: 0,
            received: 0,
        }
    }
}

impl Exchange for EchoExchange {
    fn request(&mut self, out: &mut Vec<u8>) {
        let base = self.sent;
        out.extend((0..self.size).map(|i| pattern(self.seed, base + i)));
        self.sent += self.size;
    }

    fn receive(&mut self, data: &[u8]) -> Result<u64, Fail> {
        if self.received + data.len() as u64 > self.sent {
            return Err(Fail::Mismatch(format!(
                "{} bytes echoed beyond the {} sent",
                self.received + data.len() as u64 - self.sent,
                self.sent
            )));
        }
        for (i, &got) in data.iter().enumerate() {
            let offset = self.received + i as u64;
            let want = pattern(self.seed, offset);
            if got != want {
                return Err(Fail::Mismatch(format!(
                    "byte at stream offset {offset}: expected {want:#04x}, got {got:#04x}"
                )));
            }
        }
        let before = self.received / self.size;
        self.received += data.len() as u64;
        Ok(self.received / self.size - before)
    }
}

/// One connection of the engine.
struct Conn<E> {
    index: usize,
    transport: Transport,
    exchange: E,
    out: Vec<u8>,
    pos: usize,
    /// Send (closed loop) or intended send (open loop) time of each outstanding request.
    inflight: VecDeque<Instant>,
    /// Open loop: when the next request is due.
    next_due: Instant,
}

impl<E: Exchange> Conn<E> {
    fn queue(&mut self, at: Instant) {
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        } else if self.pos > READ_BUF {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
        self.exchange.request(&mut self.out);
        self.inflight.push_back(at);
    }

    fn flush(&mut self) -> Result<(), Fail> {
        self.transport.send(&self.out, &mut self.pos)
    }

    /// After a readiness event: writes what is pending and reads what arrived; returns the
    /// number of requests completed and the reply bytes read.
    fn drive(&mut self, buf: &mut [u8]) -> Result<(u64, u64), Fail> {
        self.flush()?;
        let (mut completed, mut bytes) = (0, 0);
        let exchange = &mut self.exchange;
        let peer = self.transport.recv(buf, |data| {
            bytes += data.len() as u64;
            completed += exchange.receive(data)?;
            Ok(())
        })?;
        if peer == Peer::Closed {
            return Err(Fail::Eof);
        }
        Ok((completed, bytes))
    }
}

/// One thread's (or event loop's) figures.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) latency: Latency,
    pub(super) count: u64,
    pub(super) bytes: u64,
    pub(super) errors: Errors,
    pub(super) scheduled: u64,
    pub(super) unanswered: u64,
    pub(super) tls: Option<String>,
    pub(super) max_backlog: usize,
}

/// Runs tcp-echo, tls-echo or http.
pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let tls_config = match (&plan.tls, plan.mode) {
        (Some(tls), Mode::TlsEcho | Mode::Http) => Some(tls.config(false)?),
        _ => None,
    };
    if plan.mode == Mode::Http {
        let authority = format!("{}:{}", plan.host, plan.addr.port());
        let path = plan.path.clone();
        engine(plan, "requests", tls_config.as_ref(), &move |_| {
            HttpExchange::new(&path, &authority)
        })
    } else {
        let size = plan.size;
        engine(plan, "messages", tls_config.as_ref(), &move |i| {
            EchoExchange::new(seed_of(i), size)
        })
    }
}

fn engine<E: Exchange + Send + 'static>(
    plan: &Plan,
    unit: &'static str,
    tls_config: Option<&Arc<ClientConfig>>,
    make: &(dyn Fn(usize) -> E + Sync),
) -> anyhow::Result<Outcome> {
    let tallies = match plan.rate {
        // Closed loop: on plexus' client runtime.
        None => super::stream_rt::engine(plan, unit, tls_config, make)?,
        // Open loop: sends on a schedule finer than the runtime's 10 ms timer tick.
        Some(_) => threads(plan, unit, tls_config, make),
    };
    Ok(summary(plan, unit, &tallies))
}

/// The mio engine: `--threads` threads, each a `Poll` over its share of the connections.
fn threads<E: Exchange>(
    plan: &Plan,
    unit: &'static str,
    tls_config: Option<&Arc<ClientConfig>>,
    make: &(dyn Fn(usize) -> E + Sync),
) -> Vec<Tally> {
    let barrier = Barrier::new(plan.threads);
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), unit);
    let tallies: Vec<Tally> = thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let indices: Vec<usize> = (t..plan.connections).step_by(plan.threads).collect();
                let (barrier, progress) = (&barrier, &progress);
                scope.spawn(move || worker(plan, &indices, make, tls_config, barrier, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    drop(line);
    tallies
}

/// The outcome of a run from the tallies of its threads (or loops).
fn summary(plan: &Plan, unit: &'static str, tallies: &[Tally]) -> Outcome {
    let mut outcome = Outcome::new(unit);
    outcome.window = plan.duration;
    let (mut scheduled, mut unanswered, mut max_backlog, mut tls_desc) = (0, 0, 0, None);
    for tally in tallies {
        outcome.latency.merge(&tally.latency);
        outcome.count += tally.count;
        outcome.bytes += tally.bytes;
        outcome.errors.merge(&tally.errors);
        scheduled += tally.scheduled;
        unanswered += tally.unanswered;
        max_backlog = max_backlog.max(tally.max_backlog);
        tls_desc = tls_desc.or_else(|| tally.tls.clone());
    }
    outcome.verified = outcome.errors.total() == 0 && outcome.count > 0;
    outcome.extra("sent", json!(scheduled));
    outcome.extra("unanswered", json!(unanswered));
    if plan.rate.is_some() {
        outcome.extra("max_backlog_per_connection", json!(max_backlog));
    }
    outcome.extra("threads", json!(plan.threads));
    if let Some(tls) = &plan.tls {
        outcome.extra("certificates_verified", json!(tls.verifies_certificates()));
    }
    if let Some(desc) = tls_desc {
        outcome.extra("tls", json!(desc));
    }
    if plan.mode == Mode::Http {
        outcome.extra("path", json!(plan.path));
    }
    outcome
}

/// One load thread: connects its share, waits for every thread at the barrier, runs.
fn worker<E: Exchange>(
    plan: &Plan,
    indices: &[usize],
    make: &(dyn Fn(usize) -> E + Sync),
    tls_config: Option<&Arc<ClientConfig>>,
    barrier: &Barrier,
    progress: &Progress,
) -> Tally {
    let mut tally = Tally::default();
    let setup_deadline = Instant::now() + HARD_CAP_EXTRA / 2;
    let mut buf = vec![0u8; READ_BUF];
    let mut events = Events::with_capacity(1024);
    let mut poll = match Poll::new() {
        Ok(poll) => Some(poll),
        Err(err) => {
            tally.errors.add(indices[0], &Fail::from_io(err));
            None
        }
    };
    let mut conns: Vec<Option<Conn<E>>> = Vec::new();
    if let Some(poll) = &mut poll {
        conns = connect_all(plan, indices, make, tls_config, poll, &mut tally);
        if tls_config.is_some() {
            handshake_all(
                poll,
                &mut events,
                &mut conns,
                &mut buf,
                setup_deadline,
                &mut tally,
            );
            tally.tls = conns
                .iter()
                .flatten()
                .find_map(|c| c.transport.tls.as_ref().map(|tls| describe(tls)));
        }
    }
    // Every thread starts measuring at the same moment, setup done.
    barrier.wait();
    let (Some(mut poll), false) = (poll, conns.is_empty()) else {
        return tally;
    };
    run_loop(
        plan,
        &mut poll,
        &mut events,
        &mut conns,
        &mut buf,
        &mut tally,
        progress,
    );
    tally
}

fn connect_all<E: Exchange>(
    plan: &Plan,
    indices: &[usize],
    make: &(dyn Fn(usize) -> E + Sync),
    tls_config: Option<&Arc<ClientConfig>>,
    poll: &Poll,
    tally: &mut Tally,
) -> Vec<Option<Conn<E>>> {
    let mut conns = Vec::with_capacity(indices.len());
    for (slot, &i) in indices.iter().enumerate() {
        let conn = (|| -> Result<Conn<E>, Fail> {
            let std_sock = tcp_connect(plan.addr, plan.source(i))?;
            std_sock.set_nonblocking(true)?;
            let mut sock = TcpStream::from_std(std_sock);
            poll.registry().register(
                &mut sock,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let tls = match (tls_config, &plan.tls) {
                (Some(config), Some(tls)) => Some(tls.connect(config)?),
                _ => None,
            };
            Ok(Conn {
                index: i,
                transport: Transport { sock, tls },
                exchange: make(i),
                out: Vec::new(),
                pos: 0,
                inflight: VecDeque::new(),
                next_due: Instant::now(),
            })
        })();
        match conn {
            Ok(conn) => conns.push(Some(conn)),
            Err(fail) => {
                tally.errors.add(i, &fail);
                conns.push(None);
            }
        }
    }
    conns
}

/// Drives every TLS handshake to completion, failure or `deadline`.
fn handshake_all<E: Exchange>(
    poll: &mut Poll,
    events: &mut Events,
    conns: &mut [Option<Conn<E>>],
    buf: &mut [u8],
    deadline: Instant,
    tally: &mut Tally,
) {
    let mut done = vec![false; conns.len()];
    let mut pending = 0;
    for slot in 0..conns.len() {
        pending += usize::from(conns[slot].is_some());
        step_handshake(poll, conns, slot, buf, &mut done, &mut pending, tally);
    }
    while pending > 0 {
        let now = Instant::now();
        if now >= deadline {
            for (slot, conn) in conns.iter_mut().enumerate() {
                if !done[slot] {
                    if let Some(conn) = conn.take() {
                        tally.errors.add(conn.index, &Fail::Timeout);
                    }
                }
            }
            return;
        }
        match poll.poll(events, Some(deadline - now)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tally.errors.add(0, &Fail::from_io(err));
                return;
            }
        }
        for event in events.iter() {
            let slot = event.token().0;
            if slot < conns.len() && !done[slot] {
                step_handshake(poll, conns, slot, buf, &mut done, &mut pending, tally);
            }
        }
    }
}

fn step_handshake<E: Exchange>(
    poll: &Poll,
    conns: &mut [Option<Conn<E>>],
    slot: usize,
    buf: &mut [u8],
    done: &mut [bool],
    pending: &mut usize,
    tally: &mut Tally,
) {
    let Some(conn) = &mut conns[slot] else {
        return;
    };
    match conn.transport.handshake(buf) {
        Ok(true) => {
            done[slot] = true;
            *pending -= 1;
        }
        Ok(false) => {}
        Err(fail) => {
            tally.errors.add(conn.index, &fail);
            drop_conn(poll, &mut conns[slot]);
            *pending -= 1;
        }
    }
}

fn drop_conn<E>(poll: &Poll, slot: &mut Option<Conn<E>>) {
    if let Some(mut conn) = slot.take() {
        // Closed on drop whether or not deregistering succeeds.
        let _ = poll.registry().deregister(&mut conn.transport.sock);
    }
}

/// Negotiated version, suite and group, e.g. `TLSv1_3/TLS13_AES_256_GCM_SHA384/X25519`.
pub(crate) fn describe(conn: &rustls::CommonState) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".to_owned(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".to_owned(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "?".to_owned(), |g| format!("{:?}", g.name()));
    format!("{version}/{suite}/{group}")
}

/// The measured run: warm-up, window, drain.
fn run_loop<E: Exchange>(
    plan: &Plan,
    poll: &mut Poll,
    events: &mut Events,
    conns: &mut [Option<Conn<E>>],
    buf: &mut [u8],
    tally: &mut Tally,
    progress: &Progress,
) {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let drain_until = end + DRAIN;
    let interval = plan
        .rate
        .map(|rate| Duration::from_secs_f64(plan.connections as f64 / rate));
    let in_window = |t: Instant| t >= measure_from && t < end;

    for entry in conns.iter_mut() {
        let Some(conn) = entry else {
            continue;
        };
        match interval {
            // Spread the connections' phases over one interval.
            Some(interval) => {
                conn.next_due =
                    start + interval.mul_f64(conn.index as f64 / plan.connections as f64);
            }
            None => {
                for _ in 0..plan.pipeline {
                    conn.queue(start);
                }
                if in_window(start) {
                    tally.scheduled += plan.pipeline as u64;
                }
                if let Err(fail) = conn.flush() {
                    tally.errors.add(conn.index, &fail);
                    drop_conn(poll, entry);
                }
            }
        }
    }

    loop {
        let now = Instant::now();
        let outstanding = conns.iter().flatten().any(|c| !c.inflight.is_empty());
        if now >= drain_until || (now >= end && !outstanding) || conns.iter().all(Option::is_none) {
            break;
        }
        let mut wait = if now < end {
            end - now
        } else {
            drain_until - now
        };
        if let Some(interval) = interval {
            if now < end {
                for entry in conns.iter_mut() {
                    let Some(conn) = entry else {
                        continue;
                    };
                    let mut queued = false;
                    while conn.next_due <= now && conn.next_due < end {
                        let due = conn.next_due;
                        conn.queue(due);
                        queued = true;
                        if in_window(due) {
                            tally.scheduled += 1;
                        }
                        conn.next_due += interval;
                    }
                    tally.max_backlog = tally.max_backlog.max(conn.inflight.len());
                    if queued {
                        if let Err(fail) = conn.flush() {
                            tally.errors.add(conn.index, &fail);
                            drop_conn(poll, entry);
                            continue;
                        }
                    }
                    if conn.next_due > now {
                        wait = wait.min(conn.next_due - now);
                    }
                }
            }
        }
        match poll.poll(events, Some(wait.min(MAX_WAIT))) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tally.errors.add(0, &Fail::from_io(err));
                break;
            }
        }
        let mut done_now = 0;
        for event in events.iter() {
            let slot = event.token().0;
            let Some(Some(conn)) = conns.get_mut(slot) else {
                continue;
            };
            match conn.drive(buf) {
                Ok((completed, bytes)) => {
                    let now = Instant::now();
                    if now >= measure_from && now < end {
                        tally.bytes += bytes;
                    }
                    for _ in 0..completed {
                        let Some(sent) = conn.inflight.pop_front() else {
                            break;
                        };
                        if in_window(sent) {
                            tally.latency.record(now - sent);
                            tally.count += 1;
                        }
                    }
                    done_now += completed;
                    // Closed loop: replace every completed request (until the window ends).
                    if interval.is_none() && now < end && completed > 0 {
                        for _ in 0..completed {
                            conn.queue(now);
                        }
                        if in_window(now) {
                            tally.scheduled += completed;
                        }
                        if let Err(fail) = conn.flush() {
                            tally.errors.add(conn.index, &fail);
                            drop_conn(poll, &mut conns[slot]);
                        }
                    }
                }
                Err(fail) => {
                    tally.errors.add(conn.index, &fail);
                    drop_conn(poll, &mut conns[slot]);
                }
            }
        }
        if done_now > 0 {
            progress.done.fetch_add(done_now, Ordering::Relaxed);
        }
        progress
            .errors
            .store(tally.errors.total(), Ordering::Relaxed);
    }

    // What the server never answered: recorded at its age so the percentiles show it, and
    // counted as timeouts.
    let now = Instant::now();
    for conn in conns.iter().flatten() {
        for &sent in &conn.inflight {
            if in_window(sent) {
                tally.latency.record(now - sent);
                tally.unanswered += 1;
            }
        }
    }
    tally.errors.add_n("timeout", tally.unanswered);
}
