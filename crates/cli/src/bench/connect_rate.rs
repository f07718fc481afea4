//! connect-rate: connections (and TLS handshakes, full or resumed) per second.
//!
//! Each of `--connections` slots repeats a cycle: connect, TLS handshake (with `--tls`), one
//! echo of `--size` pattern bytes (verified), close (close_notify first with TLS). A cycle's
//! latency runs from the connect request to the verified echo. With `--resume` all slots
//! share one client configuration and its session cache, so after the first handshakes the
//! server sees resumptions; the JSON says how many handshakes were each kind. A cycle that
//! takes longer than [`CYCLE_TIMEOUT`] is a `timeout` error; a failed slot waits [`BACKOFF`]
//! before its next attempt, so a refusing server is not hammered in a tight loop.
//!
//! The cycles run on plexus' client runtime ([`plexus::ClientRuntime`], `--threads` event
//! loops): each is a connection with a [`Cycle`] handler, made with the library's connector
//! (non-blocking connect bounded by [`CYCLE_TIMEOUT`], the `--sources` address bound first,
//! the TLS client of [`plexus::tls_client`]); a cycle that ends starts the slot's next one
//! from its `on_close`, and the calling thread restarts the slots whose backoff is over.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use plexus::{
    ClientError, ClientHandle, ClientRuntime, CloseReason, LinkEvent, Session, SessionHandler,
    SessionInfo, Upstream,
};
use rustls::HandshakeKind;
use serde_json::json;

use super::stream::{describe, EchoExchange, Exchange};
use super::{seed_of, Errors, Fail, Latency, Outcome, Plan, Progress, ProgressLine};

/// Longest a connect + handshake + echo may take.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause of a slot after a failed cycle.
const BACKOFF: Duration = Duration::from_millis(10);
/// How often the calling thread looks for slots to restart.
const SCHEDULER_TICK: Duration = Duration::from_millis(5);

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
    let runtime = ClientRuntime::builder()
        .event_loops(plan.threads)
        .worker_threads(0)
        .idle_timeout(CYCLE_TIMEOUT)
        .handshake_timeout(CYCLE_TIMEOUT)
        .build()
        .context("starting the client runtime")?;
    let mut upstreams = Vec::with_capacity(plan.sources.len());
    for source in &plan.sources {
        let mut upstream = Upstream::new("bench", vec![plan.addr])
            .context("target address")?
            .with_connect_timeout(CYCLE_TIMEOUT);
        if let Some(ip) = source {
            upstream = upstream.with_source(*ip);
        }
        if let (Some(config), Some(tls)) = (&tls_config, &plan.tls) {
            upstream = upstream.with_tls(Arc::clone(config), tls.name());
        }
        upstreams.push(upstream);
    }
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "handshakes");
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let bench = Arc::new(Bench {
        handle: runtime.handle(),
        upstreams,
        size: plan.size,
        measure_from,
        end: measure_from + plan.duration,
        tallies: (0..plan.threads.max(1))
            .map(|_| Mutex::new(Tally::default()))
            .collect(),
        progress: Arc::clone(&progress),
        waiting: Mutex::new(Vec::new()),
        seq: AtomicUsize::new(0),
    });
    for slot in 0..plan.connections {
        Bench::begin(&bench, slot, start);
    }
    loop {
        let now = Instant::now();
        if now >= bench.end {
            break;
        }
        thread::sleep(SCHEDULER_TICK.min(bench.end - now));
        let due: Vec<usize> = {
            let mut waiting = lock(&bench.waiting);
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= now);
            *waiting = later;
            due.into_iter().map(|(_, slot)| slot).collect()
        };
        for slot in due {
            Bench::begin(&bench, slot, Instant::now());
        }
    }
    // Cycles still running at the end are not counted (as before: the window is over).
    runtime.shutdown();
    runtime.run().context("client runtime")?;
    drop(line);
    let mut outcome = Outcome::new("handshakes");
    outcome.window = plan.duration;
    let (mut resumed, mut full, mut desc) = (0, 0, None);
    for tally in &bench.tallies {
        let tally = lock(tally);
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What every cycle shares.
struct Bench {
    handle: ClientHandle,
    /// One per source address (`--sources`), used round robin.
    upstreams: Vec<Upstream>,
    size: usize,
    measure_from: Instant,
    end: Instant,
    /// One per loop's share of the slots (slot % tallies), so errors print as before.
    tallies: Vec<Mutex<Tally>>,
    progress: Arc<Progress>,
    /// Slots waiting for their backoff to end.
    waiting: Mutex<Vec<(Instant, usize)>>,
    /// Cycles started (picks the source address and the pattern).
    seq: AtomicUsize,
}

impl Bench {
    /// Starts slot `slot`'s next cycle, unless the window is over.
    fn begin(bench: &Arc<Bench>, slot: usize, now: Instant) {
        if now >= bench.end {
            return;
        }
        let seq = bench.seq.fetch_add(1, Ordering::Relaxed);
        let Some(upstream) = bench.upstreams.get(seq % bench.upstreams.len().max(1)) else {
            return;
        };
        let cycle = Cycle {
            bench: Arc::clone(bench),
            slot,
            started: now,
            echo: EchoExchange::new(seed_of(slot) ^ ((seq as u64) << 8), bench.size),
            done: false,
            failed: None,
        };
        match bench.handle.connect(upstream, Box::new(cycle)) {
            Ok(_) => {}
            Err(ClientError::Stopped) => {}
            Err(_) => bench.later(slot, now),
        }
    }

    fn later(&self, slot: usize, now: Instant) {
        lock(&self.waiting).push((now + BACKOFF, slot));
    }

    fn tally(&self, slot: usize) -> MutexGuard<'_, Tally> {
        let index = slot % self.tallies.len().max(1);
        // `tallies` is never empty (one per loop, at least one loop).
        #[allow(clippy::indexing_slicing)]
        lock(&self.tallies[index])
    }
}

/// One cycle of a slot: connect (+ handshake), one echo, close.
struct Cycle {
    bench: Arc<Bench>,
    slot: usize,
    started: Instant,
    echo: EchoExchange,
    done: bool,
    failed: Option<Fail>,
}

impl SessionHandler for Cycle {
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Connected { .. } = event {
            let spent = session.now().saturating_duration_since(self.started);
            session.set_timer(CYCLE_TIMEOUT.saturating_sub(spent));
            let mut out = Vec::with_capacity(self.bench.size);
            self.echo.request(&mut out);
            session.send(&out);
        }
    }

    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if self.done || self.failed.is_some() {
            return;
        }
        match self.echo.receive(data) {
            Ok(0) => {}
            Ok(_) => {
                self.done = true;
                let now = Instant::now();
                let bench = &self.bench;
                if self.started >= bench.measure_from && now < bench.end {
                    let mut tally = bench.tally(self.slot);
                    tally.latency.record(now - self.started);
                    tally.count += 1;
                    let tls = session.tls_state();
                    match tls.and_then(|t| t.handshake_kind()) {
                        Some(HandshakeKind::Resumed) => tally.resumed += 1,
                        Some(_) => tally.full += 1,
                        None => {}
                    }
                    if tally.tls.is_none() {
                        tally.tls = tls.map(describe);
                    }
                }
                bench.progress.done.fetch_add(1, Ordering::Relaxed);
                session.close();
            }
            Err(fail) => {
                self.failed = Some(fail);
                session.close();
            }
        }
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        if !self.done {
            self.failed.get_or_insert(Fail::Timeout);
            session.close();
        }
    }

    fn on_close(&mut self, _: &SessionInfo, reason: &CloseReason) {
        let now = Instant::now();
        if *reason == CloseReason::ShutdownForced {
            return; // the window is over
        }
        if self.done {
            Bench::begin(&self.bench, self.slot, now);
            return;
        }
        let fail = self.failed.take().unwrap_or_else(|| fail_of(reason));
        self.bench.tally(self.slot).errors.add(self.slot, &fail);
        count_error(&self.bench.progress.errors);
        self.bench.later(self.slot, now);
    }
}

fn count_error(errors: &AtomicU64) {
    errors.fetch_add(1, Ordering::Relaxed);
}

/// The bench's name for why a connection ended before its echo came back.
fn fail_of(reason: &CloseReason) -> Fail {
    match reason {
        CloseReason::UpstreamFailed(kind) | CloseReason::Io(kind) => {
            Fail::from_io(std::io::Error::from(*kind))
        }
        CloseReason::UpstreamTimeout | CloseReason::IdleTimeout | CloseReason::HandshakeTimeout => {
            Fail::Timeout
        }
        CloseReason::Tls(err) => Fail::Tls(err.to_string()),
        CloseReason::PeerClosed => Fail::Eof,
        other => Fail::Io(std::io::Error::other(other.to_string())),
    }
}
