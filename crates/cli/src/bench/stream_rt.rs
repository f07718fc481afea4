//! The closed-loop stream engine on plexus' client runtime: tcp-echo, tls-echo and http
//! keeping `--pipeline` requests outstanding per connection.
//!
//! `--threads` event loops ([`plexus::ClientRuntime`]); each connection is a [`Load`] handler
//! around the mode's [`Exchange`], opened with the library's connector (`--sources` bound
//! first, TLS through [`plexus::tls_client`]). As in the mio engine (`stream.rs`), every
//! connection connects and handshakes before anything is measured: once all have (or failed,
//! or [`HARD_CAP_EXTRA`]`/2` passed), the calling thread starts them all together (a zero timer
//! armed on each, whose `on_timer` queues the first requests). A request's latency runs from
//! when it was queued; requests count when queued inside the window; after it, outstanding
//! ones get [`DRAIN`] to complete, then the runtime is shut down and each connection records
//! what is still unanswered at its age (counted as `timeout`). Each connection adds to the
//! tally of its loop (`index % threads`, as connections are spread round robin).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use plexus::{
    ClientRuntime, CloseReason, Connection, LinkEvent, Session, SessionHandler, SessionInfo,
    Upstream,
};
use rustls::ClientConfig;

use super::stream::{describe, Exchange, Tally};
use super::{Fail, Plan, Progress, ProgressLine, DRAIN, HARD_CAP_EXTRA};

/// How often the calling thread looks at the run's progress.
const TICK: Duration = Duration::from_millis(10);

/// Runs the closed loop; one tally per event loop.
pub(super) fn engine<E: Exchange + Send + 'static>(
    plan: &Plan,
    unit: &'static str,
    tls_config: Option<&Arc<ClientConfig>>,
    make: &(dyn Fn(usize) -> E + Sync),
) -> anyhow::Result<Vec<Tally>> {
    let loops = plan.threads.max(1);
    let runtime = ClientRuntime::builder()
        .event_loops(loops)
        .worker_threads(0)
        .build()
        .context("starting the client runtime")?;
    let mut upstreams = Vec::with_capacity(plan.sources.len());
    for source in &plan.sources {
        let mut upstream = Upstream::new("bench", vec![plan.addr])
            .context("target address")?
            .with_connect_timeout(HARD_CAP_EXTRA / 2);
        if let Some(ip) = source {
            upstream = upstream.with_source(*ip);
        }
        if let (Some(config), Some(tls)) = (tls_config, &plan.tls) {
            upstream = upstream.with_tls(Arc::clone(config), tls.name());
        }
        upstreams.push(upstream);
    }
    let progress = Arc::new(Progress::default());
    let run = Arc::new(Run {
        tallies: (0..loops).map(|_| Mutex::new(Tally::default())).collect(),
        window: OnceLock::new(),
        pipeline: plan.pipeline,
        settled: Mutex::new(0),
        settling: Condvar::new(),
        outstanding: AtomicU64::new(0),
        progress: Arc::clone(&progress),
        live: AtomicUsize::new(0),
    });
    let setup_deadline = Instant::now() + HARD_CAP_EXTRA / 2;
    let mut connections: Vec<Connection> = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let Some(upstream) = upstreams.get(index % upstreams.len().max(1)) else {
            break;
        };
        let load = Load {
            run: Arc::clone(&run),
            index,
            exchange: make(index),
            inflight: VecDeque::new(),
            out: Vec::new(),
            connected: false,
            failed: None,
        };
        match runtime.connect(upstream, Box::new(load)) {
            Ok(connection) => connections.push(connection),
            Err(err) => run
                .tally(index)
                .errors
                .add(index, &Fail::Io(std::io::Error::other(err.to_string()))),
        }
    }
    // Every connection connected (and handshaken) or failed, or the setup deadline.
    {
        let mut settled = lock(&run.settled);
        while *settled < connections.len() && Instant::now() < setup_deadline {
            let wait = setup_deadline.saturating_duration_since(Instant::now());
            settled = run
                .settling
                .wait_timeout(settled, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
    let line = ProgressLine::start(Arc::clone(&progress), unit);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let _ = run.window.set(Window {
        start,
        measure_from,
        end,
    });
    for connection in &connections {
        // A connection that ended meanwhile is counted already.
        let _ = connection.run(|session| session.set_timer(Duration::ZERO));
    }
    drop(connections);
    let drain_until = end + DRAIN;
    loop {
        let now = Instant::now();
        let idle = now >= end && run.outstanding.load(Ordering::Acquire) == 0;
        if now >= drain_until || idle || run.live.load(Ordering::Acquire) == 0 {
            break;
        }
        thread::sleep(TICK);
    }
    // What is still outstanding is recorded by each connection's `on_close`.
    runtime.shutdown();
    runtime.run().context("client runtime")?;
    drop(line);
    let run = Arc::try_unwrap(run).map_err(|_| anyhow::anyhow!("connections outlived the run"))?;
    Ok(run
        .tallies
        .into_iter()
        .map(|tally| tally.into_inner().unwrap_or_else(PoisonError::into_inner))
        .collect())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The measured run's instants, fixed when every connection is set up.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, at: Instant) -> bool {
        at >= self.measure_from && at < self.end
    }
}

/// What every connection of a run shares.
struct Run {
    tallies: Vec<Mutex<Tally>>,
    window: OnceLock<Window>,
    pipeline: usize,
    /// Connections that connected or failed (setup).
    settled: Mutex<usize>,
    settling: Condvar,
    /// Requests queued and not yet answered, over all connections.
    outstanding: AtomicU64,
    progress: Arc<Progress>,
    /// Connections still open.
    live: AtomicUsize,
}

impl Run {
    fn tally(&self, index: usize) -> MutexGuard<'_, Tally> {
        let at = index % self.tallies.len().max(1);
        // One tally per loop, at least one loop.
        #[allow(clippy::indexing_slicing)]
        lock(&self.tallies[at])
    }

    fn settle(&self) {
        *lock(&self.settled) += 1;
        self.settling.notify_all();
    }
}

/// One connection's load: its exchange, and when each outstanding request was queued.
struct Load<E> {
    run: Arc<Run>,
    index: usize,
    exchange: E,
    inflight: VecDeque<Instant>,
    out: Vec<u8>,
    connected: bool,
    failed: Option<Fail>,
}

impl<E: Exchange> Load<E> {
    /// Queues `n` requests at `now` and sends them.
    fn queue(&mut self, session: &mut Session<'_>, n: u64, now: Instant, window: &Window) {
        self.out.clear();
        for _ in 0..n {
            self.exchange.request(&mut self.out);
            self.inflight.push_back(now);
        }
        self.run.outstanding.fetch_add(n, Ordering::Relaxed);
        if window.contains(now) {
            self.run.tally(self.index).scheduled += n;
        }
        session.send(&self.out);
    }
}

impl<E: Exchange + Send> SessionHandler for Load<E> {
    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        if let LinkEvent::Connected { .. } = event {
            self.connected = true;
            self.run.live.fetch_add(1, Ordering::AcqRel);
            if let Some(tls) = session.tls_state() {
                let mut tally = self.run.tally(self.index);
                if tally.tls.is_none() {
                    tally.tls = Some(describe(tls));
                }
            }
            self.run.settle();
        }
    }

    /// The start (armed by the calling thread once every connection is set up).
    fn on_timer(&mut self, session: &mut Session<'_>) {
        let Some(&window) = self.run.window.get() else {
            return;
        };
        let pipeline = self.run.pipeline as u64;
        self.queue(session, pipeline, window.start, &window);
    }

    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let Some(&window) = self.run.window.get() else {
            return;
        };
        let completed = match self.exchange.receive(data) {
            Ok(completed) => completed,
            Err(fail) => {
                self.failed = Some(fail);
                session.close();
                return;
            }
        };
        let now = Instant::now();
        {
            let mut tally = self.run.tally(self.index);
            if window.contains(now) {
                tally.bytes += data.len() as u64;
            }
            for _ in 0..completed {
                let Some(sent) = self.inflight.pop_front() else {
                    break;
                };
                if window.contains(sent) {
                    tally.latency.record(now - sent);
                    tally.count += 1;
                }
            }
        }
        if completed == 0 {
            return;
        }
        self.run.outstanding.fetch_sub(completed, Ordering::Relaxed);
        self.run
            .progress
            .done
            .fetch_add(completed, Ordering::Relaxed);
        // Closed loop: replace every completed request (until the window ends).
        if now < window.end {
            self.queue(session, completed, now, &window);
        }
    }

    fn on_close(&mut self, _: &SessionInfo, reason: &CloseReason) {
        let now = Instant::now();
        if !self.connected {
            self.run.settle();
        } else {
            self.run.live.fetch_sub(1, Ordering::AcqRel);
        }
        let unanswered = self.inflight.len() as u64;
        self.run
            .outstanding
            .fetch_sub(unanswered, Ordering::Relaxed);
        let mut tally = self.run.tally(self.index);
        if *reason == CloseReason::ShutdownForced {
            // The end of the run: what the server never answered is recorded at its age so
            // the percentiles show it, and counted as a timeout.
            if let Some(window) = self.run.window.get() {
                let mut counted = 0;
                for &sent in &self.inflight {
                    if window.contains(sent) {
                        tally.latency.record(now - sent);
                        counted += 1;
                    }
                }
                tally.unanswered += counted;
                tally.errors.add_n("timeout", counted);
            }
            return;
        }
        let fail = self.failed.take().unwrap_or_else(|| match reason {
            CloseReason::UpstreamFailed(kind) | CloseReason::Io(kind) => {
                Fail::from_io(std::io::Error::from(*kind))
            }
            CloseReason::UpstreamTimeout | CloseReason::HandshakeTimeout => Fail::Timeout,
            CloseReason::Tls(err) => Fail::Tls(err.to_string()),
            CloseReason::PeerClosed => Fail::Eof,
            other => Fail::Io(std::io::Error::other(other.to_string())),
        });
        tally.errors.add(self.index, &fail);
        self.run.progress.errors.fetch_add(1, Ordering::Relaxed);
    }
}
