//! `handshake-load`: TLS handshakes per second, full or resumed.
//!
//! ```text
//! handshake-load --addr 127.0.0.1:PORT --ca ca.pem [--workers 32]
//!                [--duration 10s] [--warmup 2s] [--resume]
//!                [--tls-version any|1.2|1.3] [--verify full|cached]
//! ```
//!
//! Single-threaded mio loop (meant to be pinned to one core with `taskset`)
//! running `--workers` concurrent workers. Each worker loops: non-blocking
//! TCP connect, a TLS handshake (rustls client on aws-lc-rs, trusting the
//! certificates in `--ca`, server name `localhost`), a 1-byte echo round
//! trip that proves the session carries data (and, with TLS 1.3, makes sure
//! the server's session tickets have arrived), then close_notify and close.
//!
//! Without `--resume` session resumption is disabled, so every handshake is
//! a full one (certificate signature, key exchange). With `--resume` all
//! workers share one client configuration and so rustls' in-memory session
//! cache: every connection after the first few resumes with a ticket
//! received on an earlier one (TLS 1.3: PSK + ECDHE, no certificate;
//! TLS 1.2: ticket-based abbreviated handshake). The `resumed` figure
//! counts the handshakes that really were resumed.
//!
//! `--verify cached` verifies the server certificate fully the first time
//! and then accepts the identical certificate without re-walking its chain
//! (the handshake signature is still checked every time). The server does
//! exactly the same work either way; the load generator saves one ECDSA
//! verification per full handshake, which matters because on two cores the
//! client is otherwise the bottleneck.
//!
//! Only cycles that complete after the warm-up count. Output: one human line
//! on stderr and one JSON line on stdout with `addr, workers, mode, verify, tls,
//! duration_s, handshakes, handshakes_per_s, resumed, p50_us, p99_us, errors,
//! p999_us, max_us, mean_us, load_cpu_pct`; latencies are per whole cycle
//! (connect → echo received). A failed connect, TLS error, reset, early EOF,
//! wrong echo or a cycle stuck for 5 s counts as an error (the worker starts
//! over after 10 ms); the exit status is 1 if any error occurred.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use plexus_benches::tls::{self, Peer, ReadError, Verify, Versions};
use plexus_benches::{cpu_time_ns, usage_exit, Args, Latency};
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

const USAGE: &str = "usage: handshake-load --addr 127.0.0.1:PORT --ca ca.pem [--workers 32] \
[--duration 10s] [--warmup 2s] [--resume] [--tls-version any|1.2|1.3] [--verify full|cached]";

/// A cycle taking longer than this is abandoned and counted as an error.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a worker pauses after an error before it connects again.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often stuck cycles and paused workers are looked at.
const SCAN_EVERY: Duration = Duration::from_millis(10);
/// How many individual error messages to print before going quiet.
const MAX_ERROR_LOGS: u64 = 10;

struct Config {
    addr: SocketAddr,
    ca: PathBuf,
    workers: usize,
    duration: Duration,
    warmup: Duration,
    resume: bool,
    versions: Versions,
    verify: Verify,
}

fn main() {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => usage_exit(&e, USAGE),
    };
    match run(&cfg) {
        Ok(report) => {
            eprintln!("{}", report.human(&cfg));
            println!("{}", report.json(&cfg));
            if report.errors > 0 {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("handshake-load: fatal: {e}");
            std::process::exit(1);
        }
    }
}

fn parse_args() -> Result<Config, String> {
    let mut a = Args::from_env_with_flags(&["resume"]).map_err(|e| e.to_string())?;
    if a.help() {
        usage_exit("", USAGE);
    }
    let e = |e: plexus_benches::ArgError| e.to_string();
    let addr = a.take("addr").ok_or("--addr is required")?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("invalid --addr `{addr}`: {e}"))?;
    let ca = a.take("ca").ok_or("--ca is required")?;
    let cfg = Config {
        addr,
        ca: ca.into(),
        workers: a.take_parsed("workers", 32).map_err(e)?,
        duration: a
            .take_duration("duration", Duration::from_secs(10))
            .map_err(e)?,
        warmup: a
            .take_duration("warmup", Duration::from_secs(2))
            .map_err(e)?,
        resume: a.take_flag("resume"),
        versions: a.take_parsed("tls-version", Versions::Any).map_err(e)?,
        verify: a.take_parsed("verify", Verify::Full).map_err(e)?,
    };
    a.finish().map_err(e)?;
    if cfg.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if cfg.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(cfg)
}

/// Why a cycle failed.
#[derive(Debug)]
enum CycleError {
    Connect(io::Error),
    Io(io::Error),
    Tls(rustls::Error),
    Eof(&'static str),
    Unexpected,
    WrongEcho { want: u8, got: u8 },
    Timeout(&'static str),
}

impl std::fmt::Display for CycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CycleError::Connect(e) => write!(f, "connect: {e}"),
            CycleError::Io(e) => write!(f, "i/o error: {e}"),
            CycleError::Tls(e) => write!(f, "TLS error: {e}"),
            CycleError::Eof(phase) => write!(f, "server closed the connection during {phase}"),
            CycleError::Unexpected => f.write_str("server sent data before the echo request"),
            CycleError::WrongEcho { want, got } => {
                write!(f, "echo mismatch: expected {want:#04x}, got {got:#04x}")
            }
            CycleError::Timeout(phase) => {
                write!(f, "stuck in {phase} for {}s", CYCLE_TIMEOUT.as_secs())
            }
        }
    }
}

impl From<ReadError<CycleError>> for CycleError {
    fn from(e: ReadError<CycleError>) -> Self {
        match e {
            ReadError::Io(e) => CycleError::Io(e),
            ReadError::Tls(e) => CycleError::Tls(e),
            ReadError::Data(e) => e,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshaking,
    Echo,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connect",
            Phase::Handshaking => "handshake",
            Phase::Echo => "echo",
        }
    }
}

/// One connection's cycle.
struct Cycle {
    stream: TcpStream,
    tls: ClientConnection,
    phase: Phase,
    started: Instant,
    /// The byte sent for the echo.
    byte: u8,
}

/// What a readiness event led to.
enum Step {
    /// Waiting for the next event.
    Pending,
    /// The echo came back: the cycle is complete.
    Done,
}

impl Cycle {
    /// Makes all the progress possible after a readiness event.
    fn step(&mut self, buf: &mut [u8]) -> Result<Step, CycleError> {
        if self.phase == Phase::Connecting {
            if let Some(e) = self.stream.take_error().map_err(CycleError::Connect)? {
                return Err(CycleError::Connect(e));
            }
            match self.stream.peer_addr() {
                Ok(_) => {}
                // Not connected yet (spurious wake-up): wait.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Step::Pending),
                Err(e) => return Err(CycleError::Connect(e)),
            }
            self.stream.set_nodelay(true).map_err(CycleError::Io)?;
            self.phase = Phase::Handshaking;
        }
        tls::flush(&mut self.tls, &mut self.stream).map_err(CycleError::Io)?;
        let phase = self.phase;
        let byte = self.byte;
        let mut echoed = false;
        let peer = tls::read(&mut self.tls, &mut self.stream, buf, |data| {
            match (phase, data) {
                (Phase::Echo, [got]) if !echoed && *got == byte => {
                    echoed = true;
                    Ok(())
                }
                (Phase::Echo, [got, ..]) if !echoed && *got != byte => Err(CycleError::WrongEcho {
                    want: byte,
                    got: *got,
                }),
                _ => Err(CycleError::Unexpected),
            }
        });
        // A TLS error queued an alert, the handshake may have more to send.
        let flushed = tls::flush(&mut self.tls, &mut self.stream);
        if peer? == Peer::Closed && !echoed {
            return Err(CycleError::Eof(self.phase.name()));
        }
        flushed.map_err(CycleError::Io)?;
        if echoed {
            return Ok(Step::Done);
        }
        if self.phase == Phase::Handshaking && !self.tls.is_handshaking() {
            self.phase = Phase::Echo;
            self.tls
                .writer()
                .write_all(&[self.byte])
                .map_err(CycleError::Io)?;
            tls::flush(&mut self.tls, &mut self.stream).map_err(CycleError::Io)?;
        }
        Ok(Step::Pending)
    }
}

/// A worker: in a cycle, or pausing after an error.
enum Slot {
    Busy(Box<Cycle>),
    Paused(Instant),
}

struct Stats {
    measure_from: Instant,
    /// Cycle times in nanoseconds.
    hist: Histogram<u64>,
    handshakes: u64,
    resumed: u64,
    errors: u64,
    /// What the first measured handshake negotiated.
    tls: Option<String>,
}

impl Stats {
    fn error(&mut self, worker: usize, e: &CycleError) {
        self.errors += 1;
        if self.errors <= MAX_ERROR_LOGS {
            eprintln!("handshake-load: worker {worker}: {e}");
        } else if self.errors == MAX_ERROR_LOGS + 1 {
            eprintln!("handshake-load: further errors are only counted");
        }
    }
}

struct Report {
    duration_s: f64,
    handshakes: u64,
    resumed: u64,
    errors: u64,
    lat: Latency,
    cpu_pct: Option<f64>,
    tls: Option<String>,
}

impl Report {
    fn per_s(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.handshakes as f64 / self.duration_s
        } else {
            0.0
        }
    }

    fn mode(cfg: &Config) -> &'static str {
        if cfg.resume {
            "resume"
        } else {
            "full"
        }
    }

    fn human(&self, cfg: &Config) -> String {
        let cpu = self
            .cpu_pct
            .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.0}%"));
        format!(
            "handshake-load addr={} workers={} mode={}: {:.0} handshakes/s over {:.1}s \
             ({} of {} resumed), cycle p50 {:.1}us p99 {:.1}us max {:.1}us, errors {}, \
             load cpu {cpu}, tls {}",
            cfg.addr,
            cfg.workers,
            Self::mode(cfg),
            self.per_s(),
            self.duration_s,
            self.resumed,
            self.handshakes,
            self.lat.p50_us,
            self.lat.p99_us,
            self.lat.max_us,
            self.errors,
            self.tls.as_deref().unwrap_or("n/a"),
        )
    }

    fn json(&self, cfg: &Config) -> String {
        let mut s = String::with_capacity(400);
        // The address is an IP:port and `describe` output has no quotes or
        // backslashes: nothing needs JSON escaping.
        let _ = write!(
            s,
            "{{\"addr\":\"{}\",\"workers\":{},\"mode\":\"{}\",\"verify\":\"{}\",\"tls\":\"{}\",\
             \"duration_s\":{:.3},\"handshakes\":{},\"handshakes_per_s\":{:.1},\
             \"resumed\":{},\"p50_us\":{:.2},\"p99_us\":{:.2},\"errors\":{},\
             \"p999_us\":{:.2},\"max_us\":{:.2},\"mean_us\":{:.2},\"load_cpu_pct\":",
            cfg.addr,
            cfg.workers,
            Self::mode(cfg),
            match cfg.verify {
                Verify::Full => "full",
                Verify::Cached => "cached",
            },
            self.tls.as_deref().unwrap_or(""),
            self.duration_s,
            self.handshakes,
            self.per_s(),
            self.resumed,
            self.lat.p50_us,
            self.lat.p99_us,
            self.errors,
            self.lat.p999_us,
            self.lat.max_us,
            self.lat.mean_us,
        );
        match self.cpu_pct {
            Some(c) => {
                let _ = write!(s, "{c:.1}}}");
            }
            None => s.push_str("null}"),
        }
        s
    }
}

/// Starts a cycle: non-blocking connect plus a fresh client session.
fn start_cycle(
    cfg: &Config,
    tls_cfg: &Arc<ClientConfig>,
    poll: &Poll,
    token: usize,
    byte: u8,
) -> Result<Cycle, CycleError> {
    let mut stream = TcpStream::connect(cfg.addr).map_err(CycleError::Connect)?;
    poll.registry()
        .register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(CycleError::Io)?;
    let tls = tls::connect(tls_cfg).map_err(CycleError::Tls)?;
    Ok(Cycle {
        stream,
        tls,
        phase: Phase::Connecting,
        started: Instant::now(),
        byte,
    })
}

/// Closes a cycle: close_notify (best effort) and close.
///
/// No `deregister`: closing the socket (its only descriptor) removes it from
/// the epoll set, and the slot's next cycle gets a new socket, so one system
/// call per cycle is saved on the load generator's core.
fn end_cycle(mut c: Box<Cycle>) {
    c.tls.send_close_notify();
    let _ = tls::flush(&mut c.tls, &mut c.stream);
}

fn run(cfg: &Config) -> io::Result<Report> {
    let tls_cfg = tls::client_config(&cfg.ca, cfg.versions, cfg.resume, cfg.verify)?;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut stats = Stats {
        measure_from: start + cfg.warmup,
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(io::Error::other)?,
        handshakes: 0,
        resumed: 0,
        errors: 0,
        tls: None,
    };
    let end = stats.measure_from + cfg.duration;
    let mut next_byte: u8 = 0;
    let mut slots: Vec<Slot> = (0..cfg.workers).map(|_| Slot::Paused(start)).collect();

    let mut cpu_at_measure: Option<Option<u64>> = None;
    let mut next_scan = start;
    let mut now = Instant::now();
    while now < end {
        if cpu_at_measure.is_none() && now >= stats.measure_from {
            cpu_at_measure = Some(cpu_time_ns());
        }
        // Start paused workers whose pause is over; abandon stuck cycles.
        if now >= next_scan {
            next_scan = now + SCAN_EVERY;
            for (i, slot) in slots.iter_mut().enumerate() {
                match slot {
                    Slot::Paused(until) if *until <= now => {
                        next_byte = next_byte.wrapping_add(1);
                        *slot = match start_cycle(cfg, &tls_cfg, &poll, i, next_byte) {
                            Ok(c) => Slot::Busy(Box::new(c)),
                            Err(e) => {
                                stats.error(i, &e);
                                Slot::Paused(now + ERROR_PAUSE)
                            }
                        };
                    }
                    Slot::Busy(c) if now.duration_since(c.started) >= CYCLE_TIMEOUT => {
                        stats.error(i, &CycleError::Timeout(c.phase.name()));
                        if let Slot::Busy(c) =
                            std::mem::replace(slot, Slot::Paused(now + ERROR_PAUSE))
                        {
                            end_cycle(c);
                        }
                    }
                    _ => {}
                }
            }
        }
        let limit = if now < stats.measure_from {
            stats.measure_from
        } else {
            end
        };
        let timeout = SCAN_EVERY.min(limit.saturating_duration_since(now));
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(slot) = slots.get_mut(i) else {
                continue;
            };
            let Slot::Busy(c) = slot else { continue };
            let outcome = c.step(&mut buf);
            let done_at = Instant::now();
            let next = match outcome {
                Ok(Step::Pending) => continue,
                Ok(Step::Done) => {
                    if done_at >= stats.measure_from && done_at < end {
                        let ns = done_at.duration_since(c.started).as_nanos();
                        stats
                            .hist
                            .saturating_record(u64::try_from(ns).unwrap_or(u64::MAX));
                        stats.handshakes += 1;
                        if c.tls.handshake_kind() == Some(HandshakeKind::Resumed) {
                            stats.resumed += 1;
                        }
                        if stats.tls.is_none() {
                            stats.tls = Some(tls::describe(&c.tls));
                        }
                    }
                    None
                }
                Err(e) => {
                    stats.error(i, &e);
                    Some(done_at + ERROR_PAUSE)
                }
            };
            let old = std::mem::replace(slot, Slot::Paused(next.unwrap_or(done_at)));
            if let Slot::Busy(c) = old {
                end_cycle(c);
            }
            if next.is_none() {
                // Completed: start the next cycle at once.
                next_byte = next_byte.wrapping_add(1);
                *slot = match start_cycle(cfg, &tls_cfg, &poll, i, next_byte) {
                    Ok(c) => Slot::Busy(Box::new(c)),
                    Err(e) => {
                        stats.error(i, &e);
                        Slot::Paused(done_at + ERROR_PAUSE)
                    }
                };
            }
        }
        now = Instant::now();
    }
    let cpu_end = cpu_time_ns();
    for slot in slots {
        if let Slot::Busy(c) = slot {
            end_cycle(c);
        }
    }

    let window = end.saturating_duration_since(stats.measure_from);
    let cpu_window = now.saturating_duration_since(stats.measure_from);
    let cpu_pct = match (cpu_at_measure.flatten(), cpu_end) {
        (Some(a), Some(b)) if cpu_window >= Duration::from_millis(100) => {
            Some(b.saturating_sub(a) as f64 / cpu_window.as_nanos() as f64 * 100.0)
        }
        _ => None,
    };
    Ok(Report {
        duration_s: window.as_secs_f64(),
        handshakes: stats.handshakes,
        resumed: stats.resumed,
        errors: stats.errors,
        lat: Latency::from_hist(&stats.hist),
        cpu_pct,
        tls: stats.tls,
    })
}
