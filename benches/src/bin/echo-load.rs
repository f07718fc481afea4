//! `echo-load`: closed-loop TCP (or TLS) echo load generator.
//!
//! ```text
//! echo-load --addr 127.0.0.1:PORT [--connections 100] [--size 64]
//!           [--duration 10s] [--warmup 2s] [--pipeline 1]
//!           [--tls --ca ca.pem [--tls-version any|1.2|1.3]]
//! ```
//!
//! Single-threaded mio loop (it is meant to be pinned to one core with
//! `taskset`). Each connection runs *rounds*: send `pipeline` messages of
//! `size` bytes, wait until every one of those bytes has been echoed back,
//! record the round-trip time, start the next round. Nothing is sent beyond
//! the outstanding round, so the offered load adapts to the server (closed
//! loop): the figure is the throughput the server sustains at a concurrency
//! of `connections × pipeline` messages.
//!
//! Every byte is verified. The byte at stream offset `o` of connection `c` is
//! a hash of `(c, o)` (a per-connection counter pattern), so a lost,
//! duplicated, reordered, corrupted or cross-connection byte is detected.
//!
//! Output: one human line on stderr and one JSON line on stdout with
//! `addr, connections, size, pipeline, duration_s, messages, msgs_per_s,
//! bytes_per_s, p50_us, p99_us, errors` (plus `p999_us, max_us, mean_us,
//! load_cpu_pct`). Only rounds that complete after the warm-up count.
//! Errors (failed connects, resets, early EOF, mismatched bytes) are counted,
//! the affected connection is dropped and the run goes on; the exit status
//! is 1 if any error occurred.
//!
//! With `--tls` every connection is a rustls client (aws-lc-rs provider,
//! trusting the certificates in `--ca`, server name `localhost`, no session
//! resumption). All connections are connected *and* have finished their
//! handshakes before the warm-up starts, so the figure is the steady-state
//! cost of encrypted echo, not of handshakes (see `handshake-load` for
//! those). The JSON line then also has `tls` (what was negotiated, e.g.
//! `TLSv1_3/TLS13_AES_256_GCM_SHA384/X25519`) and `setup_s` (seconds to
//! connect and handshake every connection).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::sync::Arc;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use plexus_benches::tls::{self, Peer, ReadError, Verify, Versions};
use plexus_benches::{cpu_time_ns, usage_exit, Args, Latency};
use rustls::{ClientConfig, ClientConnection};

const USAGE: &str = "usage: echo-load --addr 127.0.0.1:PORT [--connections 100] [--size 64] \
[--duration 10s] [--warmup 2s] [--pipeline 1] [--tls --ca ca.pem [--tls-version any|1.2|1.3]]";

/// How long connecting and handshaking all connections may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Size of the one read buffer shared by all connections.
const READ_BUF: usize = 64 * 1024;
/// How many individual error messages to print before going quiet.
const MAX_ERROR_LOGS: u64 = 10;

/// Run parameters from the command line.
struct Config {
    addr: SocketAddr,
    connections: usize,
    size: usize,
    pipeline: usize,
    duration: Duration,
    warmup: Duration,
    /// With `--tls`: the CA file and the versions to offer.
    tls: Option<(PathBuf, Versions)>,
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
            eprintln!("echo-load: fatal: {e}");
            std::process::exit(1);
        }
    }
}

fn parse_args() -> Result<Config, String> {
    let mut a = Args::from_env_with_flags(&["tls"]).map_err(|e| e.to_string())?;
    if a.help() {
        usage_exit("", USAGE);
    }
    let addr = a.take("addr").ok_or("--addr is required")?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("invalid --addr `{addr}`: {e}"))?;
    let e = |e: plexus_benches::ArgError| e.to_string();
    let tls = a.take_flag("tls");
    let ca = a.take("ca");
    let versions = a.take_parsed("tls-version", Versions::Any).map_err(e)?;
    let tls = match (tls, ca) {
        (true, Some(ca)) => Some((PathBuf::from(ca), versions)),
        (true, None) => return Err("--tls needs --ca FILE".into()),
        (false, Some(_)) => return Err("--ca is only meaningful with --tls".into()),
        (false, None) => None,
    };
    let cfg = Config {
        addr,
        connections: a.take_parsed("connections", 100).map_err(e)?,
        size: a.take_parsed("size", 64).map_err(e)?,
        pipeline: a.take_parsed("pipeline", 1).map_err(e)?,
        duration: a
            .take_duration("duration", Duration::from_secs(10))
            .map_err(e)?,
        warmup: a
            .take_duration("warmup", Duration::from_secs(2))
            .map_err(e)?,
        tls,
    };
    a.finish().map_err(e)?;
    if cfg.connections == 0 || cfg.size == 0 || cfg.pipeline == 0 {
        return Err("--connections, --size and --pipeline must be at least 1".into());
    }
    if cfg.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(cfg)
}

/// The expected byte at stream offset `off` of the connection with `seed`.
///
/// A multiplicative hash, so neighbouring offsets and neighbouring
/// connections give unrelated bytes.
#[inline]
fn pattern(seed: u64, off: u64) -> u8 {
    (off.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Why a connection was dropped.
#[derive(Debug)]
enum ConnError {
    Io(io::Error),
    Tls(rustls::Error),
    Eof,
    Unexpected,
    SetupTimeout,
    Mismatch { offset: u64, want: u8, got: u8 },
    TooMuch,
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "i/o error: {e}"),
            ConnError::Tls(e) => write!(f, "TLS error: {e}"),
            ConnError::Eof => f.write_str("server closed the connection mid-round"),
            ConnError::Unexpected => f.write_str("server sent data before the first round"),
            ConnError::SetupTimeout => write!(
                f,
                "not connected and handshaken within {}s",
                SETUP_TIMEOUT.as_secs()
            ),
            ConnError::Mismatch { offset, want, got } => write!(
                f,
                "byte mismatch at stream offset {offset}: expected {want:#04x}, got {got:#04x}"
            ),
            ConnError::TooMuch => f.write_str("server echoed more bytes than were sent"),
        }
    }
}

/// Measurement state shared by all connections.
struct Stats {
    /// Rounds completing before this instant are warm-up and not counted.
    measure_from: Instant,
    /// Round-trip times in nanoseconds.
    hist: Histogram<u64>,
    /// Messages (not rounds) completed inside the measurement window.
    messages: u64,
    errors: u64,
}

impl Stats {
    fn error(&mut self, conn: usize, e: &ConnError) {
        self.errors += 1;
        if self.errors <= MAX_ERROR_LOGS {
            eprintln!("echo-load: connection {conn}: {e}");
        } else if self.errors == MAX_ERROR_LOGS + 1 {
            eprintln!("echo-load: further errors are only counted");
        }
    }
}

impl From<ReadError<ConnError>> for ConnError {
    fn from(e: ReadError<ConnError>) -> Self {
        match e {
            ReadError::Io(e) => ConnError::Io(e),
            ReadError::Tls(e) => ConnError::Tls(e),
            ReadError::Data(e) => e,
        }
    }
}

/// Checks echoed bytes against the pattern and advances `received`.
fn verify(seed: u64, received: &mut u64, sent: u64, data: &[u8]) -> Result<(), ConnError> {
    if *received + data.len() as u64 > sent {
        return Err(ConnError::TooMuch);
    }
    for (i, &got) in data.iter().enumerate() {
        let offset = *received + i as u64;
        let want = pattern(seed, offset);
        if got != want {
            return Err(ConnError::Mismatch { offset, want, got });
        }
    }
    *received += data.len() as u64;
    Ok(())
}

/// One client connection and its position in the byte stream.
struct Conn {
    stream: TcpStream,
    /// The TLS session, with `--tls`.
    tls: Option<ClientConnection>,
    seed: u64,
    /// Bytes generated (sent or queued) so far.
    sent: u64,
    /// Bytes received and verified so far.
    received: u64,
    /// The current round's bytes, and how many of them are written (with
    /// TLS: handed to rustls, which encrypts them into records at once).
    out: Vec<u8>,
    out_pos: usize,
    round_start: Instant,
}

impl Conn {
    /// Queues the next round and tries to write it at once.
    fn start_round(&mut self, round_len: usize, now: Instant) -> Result<(), ConnError> {
        self.out.clear();
        let base = self.sent;
        self.out
            .extend((0..round_len as u64).map(|i| pattern(self.seed, base + i)));
        self.sent += round_len as u64;
        self.out_pos = 0;
        self.round_start = now;
        self.flush()
    }

    /// Writes the unsent part of the round until done or `WouldBlock`.
    fn flush(&mut self) -> Result<(), ConnError> {
        if let Some(tls) = &mut self.tls {
            loop {
                if self.out_pos < self.out.len() {
                    // rustls may take less than offered (its buffer limit).
                    let n = tls
                        .writer()
                        .write(&self.out[self.out_pos..])
                        .map_err(ConnError::Io)?;
                    self.out_pos += n;
                }
                let all_written = tls::flush(tls, &mut self.stream).map_err(ConnError::Io)?;
                if !all_written || self.out_pos == self.out.len() {
                    return Ok(());
                }
            }
        }
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }

    /// Makes all the progress possible after a readiness event.
    ///
    /// Reads until the round is complete (then records it and starts the
    /// next one) or the socket would block. Once every sent byte is back
    /// nothing more can arrive until the next round is sent, so no extra
    /// `read` just to see `WouldBlock` is needed: the next echo produces a
    /// new readiness edge. This keeps the client's per-message syscall count
    /// (one write, one read) below an echo server's.
    fn drive(
        &mut self,
        buf: &mut [u8],
        round_len: usize,
        pipeline: u64,
        stats: &mut Stats,
    ) -> Result<(), ConnError> {
        self.flush()?;
        if self.tls.is_some() {
            return self.drive_tls(buf, round_len, pipeline, stats);
        }
        loop {
            let n = match self.stream.read(buf) {
                Ok(0) => return Err(ConnError::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Io(e)),
            };
            verify(self.seed, &mut self.received, self.sent, &buf[..n])?;
            if self.round_done() {
                return self.finish_round(round_len, pipeline, stats);
            }
        }
    }

    /// [`Conn::drive`] for a TLS connection: reads until the socket is
    /// drained (one `read` per echoed flight), then starts the next round if
    /// this one is complete.
    fn drive_tls(
        &mut self,
        buf: &mut [u8],
        round_len: usize,
        pipeline: u64,
        stats: &mut Stats,
    ) -> Result<(), ConnError> {
        let Conn {
            stream,
            tls,
            seed,
            sent,
            received,
            ..
        } = self;
        let Some(tls) = tls else {
            return Ok(());
        };
        let (seed, sent) = (*seed, *sent);
        let peer = tls::read(tls, stream, buf, |data| verify(seed, received, sent, data));
        // A TLS error queued an alert; a close_notify may want an answer.
        let _ = tls::flush(tls, stream);
        if peer? == Peer::Closed {
            return Err(ConnError::Eof);
        }
        if self.round_done() {
            return self.finish_round(round_len, pipeline, stats);
        }
        Ok(())
    }

    fn round_done(&self) -> bool {
        self.received == self.sent && self.out_pos == self.out.len()
    }

    /// Records the completed round and starts the next one.
    fn finish_round(
        &mut self,
        round_len: usize,
        pipeline: u64,
        stats: &mut Stats,
    ) -> Result<(), ConnError> {
        let now = Instant::now();
        if now >= stats.measure_from {
            let rtt = now.duration_since(self.round_start).as_nanos();
            stats
                .hist
                .saturating_record(u64::try_from(rtt).unwrap_or(u64::MAX));
            stats.messages += pipeline;
        }
        self.start_round(round_len, now)
    }

    /// Advances the TLS handshake after a readiness event; `Ok(true)` once
    /// it is complete (the client has sent its Finished).
    fn handshake(&mut self, buf: &mut [u8]) -> Result<bool, ConnError> {
        let Some(tls) = &mut self.tls else {
            return Ok(true);
        };
        tls::flush(tls, &mut self.stream).map_err(ConnError::Io)?;
        let peer = tls::read(tls, &mut self.stream, buf, |_| Err(ConnError::Unexpected));
        let _ = tls::flush(tls, &mut self.stream);
        if peer? == Peer::Closed {
            return Err(ConnError::Eof);
        }
        tls::flush(tls, &mut self.stream).map_err(ConnError::Io)?;
        Ok(!tls.is_handshaking())
    }
}

/// Final figures of a run.
struct Report {
    duration_s: f64,
    messages: u64,
    errors: u64,
    lat: Latency,
    cpu_pct: Option<f64>,
    /// With `--tls`: what the first connection negotiated.
    tls: Option<String>,
    /// Seconds to connect (and handshake) every connection.
    setup_s: f64,
}

impl Report {
    fn msgs_per_s(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.messages as f64 / self.duration_s
        } else {
            0.0
        }
    }

    fn human(&self, cfg: &Config) -> String {
        let cpu = self
            .cpu_pct
            .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.0}%"));
        format!(
            "echo-load addr={} conns={} size={} pipeline={}: {:.0} msgs/s over {:.1}s, \
             rtt p50 {:.1}us p99 {:.1}us max {:.1}us, errors {}, load cpu {cpu}{}",
            cfg.addr,
            cfg.connections,
            cfg.size,
            cfg.pipeline,
            self.msgs_per_s(),
            self.duration_s,
            self.lat.p50_us,
            self.lat.p99_us,
            self.lat.max_us,
            self.errors,
            self.tls
                .as_ref()
                .map_or_else(String::new, |t| format!(", tls {t}")),
        )
    }

    fn json(&self, cfg: &Config) -> String {
        let mps = self.msgs_per_s();
        let mut s = String::with_capacity(320);
        // The address is an IP:port, which never needs JSON escaping.
        let _ = write!(
            s,
            "{{\"addr\":\"{}\",\"connections\":{},\"size\":{},\"pipeline\":{},\
             \"duration_s\":{:.3},\"messages\":{},\"msgs_per_s\":{:.1},\"bytes_per_s\":{:.1},\
             \"p50_us\":{:.2},\"p99_us\":{:.2},\"errors\":{},\"p999_us\":{:.2},\
             \"max_us\":{:.2},\"mean_us\":{:.2},",
            cfg.addr,
            cfg.connections,
            cfg.size,
            cfg.pipeline,
            self.duration_s,
            self.messages,
            mps,
            mps * cfg.size as f64,
            self.lat.p50_us,
            self.lat.p99_us,
            self.errors,
            self.lat.p999_us,
            self.lat.max_us,
            self.lat.mean_us,
        );
        if let Some(t) = &self.tls {
            // `describe` output holds no quotes or backslashes.
            let _ = write!(s, "\"tls\":\"{t}\",\"setup_s\":{:.3},", self.setup_s);
        }
        s.push_str("\"load_cpu_pct\":");
        match self.cpu_pct {
            Some(c) => {
                let _ = write!(s, "{c:.1}}}");
            }
            None => s.push_str("null}"),
        }
        s
    }
}

fn run(cfg: &Config) -> io::Result<Report> {
    let round_len = cfg.size * cfg.pipeline;
    let pipeline = cfg.pipeline as u64;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(io::Error::other)?;
    let mut stats = Stats {
        measure_from: Instant::now(), // replaced once all connections are up
        hist,
        messages: 0,
        errors: 0,
    };

    let tls_cfg = match &cfg.tls {
        Some((ca, versions)) => Some(tls::client_config(ca, *versions, false, Verify::Full)?),
        None => None,
    };
    let mut buf = vec![0u8; READ_BUF];

    // Connect everything first (blocking connect, loopback: fast), then
    // switch to non-blocking and start all the first rounds at once.
    let setup_start = Instant::now();
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        match connect(cfg.addr, i, &poll, tls_cfg.as_ref()) {
            Ok(c) => conns.push(Some(c)),
            Err(e) => {
                stats.error(i, &e);
                conns.push(None);
            }
        }
    }
    let mut tls_desc = None;
    if tls_cfg.is_some() {
        handshake_all(&mut poll, &mut events, &mut conns, &mut buf, &mut stats)?;
        tls_desc = conns
            .iter()
            .flatten()
            .find_map(|c| c.tls.as_ref().map(|t| tls::describe(t)));
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    let start = Instant::now();
    stats.measure_from = start + cfg.warmup;
    let end = stats.measure_from + cfg.duration;
    for (i, slot) in conns.iter_mut().enumerate() {
        if let Some(c) = slot {
            if let Err(e) = c.start_round(round_len, start) {
                stats.error(i, &e);
                drop_conn(&poll, slot);
            }
        }
    }

    let mut alive = conns.iter().filter(|c| c.is_some()).count();
    let mut cpu_at_measure: Option<Option<u64>> = None;
    let mut now = Instant::now();
    while now < end && alive > 0 {
        if cpu_at_measure.is_none() && now >= stats.measure_from {
            cpu_at_measure = Some(cpu_time_ns());
        }
        let timeout = if now < stats.measure_from {
            stats.measure_from - now
        } else {
            end - now
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(Some(conn)) = conns.get_mut(i) else {
                continue;
            };
            if let Err(e) = conn.drive(&mut buf, round_len, pipeline, &mut stats) {
                stats.error(i, &e);
                drop_conn(&poll, &mut conns[i]);
                alive -= 1;
            }
        }
        now = Instant::now();
    }
    let cpu_end = cpu_time_ns();

    // Rounds completing after `end` (within the last batch) are counted, so
    // the window is measured up to the last clock read, not the nominal end.
    let window = now.saturating_duration_since(stats.measure_from);
    let cpu_pct = match (cpu_at_measure.flatten(), cpu_end) {
        // Too short a window (every connection failed) gives no figure.
        (Some(a), Some(b)) if window >= Duration::from_millis(100) => {
            Some(b.saturating_sub(a) as f64 / window.as_nanos() as f64 * 100.0)
        }
        _ => None,
    };
    if alive == 0 && now < end {
        eprintln!("echo-load: every connection failed; stopping early");
    }
    Ok(Report {
        duration_s: window.as_secs_f64(),
        messages: stats.messages,
        errors: stats.errors,
        lat: Latency::from_hist(&stats.hist),
        cpu_pct,
        tls: tls_desc,
        setup_s,
    })
}

/// Drives every connection's TLS handshake to completion (or failure, or
/// [`SETUP_TIMEOUT`]); failed connections are counted and dropped.
fn handshake_all(
    poll: &mut Poll,
    events: &mut Events,
    conns: &mut [Option<Conn>],
    buf: &mut [u8],
    stats: &mut Stats,
) -> io::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut done = vec![false; conns.len()];
    let mut pending = 0;
    // Send every ClientHello first.
    for (i, slot) in conns.iter_mut().enumerate() {
        let Some(c) = slot else { continue };
        match c.handshake(buf) {
            Ok(true) => done[i] = true,
            Ok(false) => pending += 1,
            Err(e) => {
                stats.error(i, &e);
                drop_conn(poll, slot);
            }
        }
    }
    while pending > 0 {
        let now = Instant::now();
        if now >= deadline {
            for (i, slot) in conns.iter_mut().enumerate() {
                if slot.is_some() && !done[i] {
                    stats.error(i, &ConnError::SetupTimeout);
                    drop_conn(poll, slot);
                }
            }
            break;
        }
        match poll.poll(events, Some(deadline - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(slot) = conns.get_mut(i) else {
                continue;
            };
            let Some(c) = slot else { continue };
            if done[i] {
                // Already complete: a TLS 1.3 ticket may arrive now. Its
                // edge is not lost: the first round's read consumes it.
                continue;
            }
            match c.handshake(buf) {
                Ok(true) => {
                    done[i] = true;
                    pending -= 1;
                }
                Ok(false) => {}
                Err(e) => {
                    stats.error(i, &e);
                    drop_conn(poll, slot);
                    pending -= 1;
                }
            }
        }
    }
    Ok(())
}

/// Opens connection `index`, sets TCP_NODELAY, registers it with `poll`
/// and, with TLS, starts a client session (the ClientHello is sent by the
/// first [`Conn::handshake`]).
fn connect(
    addr: SocketAddr,
    index: usize,
    poll: &Poll,
    tls_cfg: Option<&Arc<ClientConfig>>,
) -> Result<Conn, ConnError> {
    let std_stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(ConnError::Io)?;
    std_stream.set_nodelay(true).map_err(ConnError::Io)?;
    std_stream.set_nonblocking(true).map_err(ConnError::Io)?;
    let mut stream = TcpStream::from_std(std_stream);
    poll.registry()
        .register(
            &mut stream,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(ConnError::Io)?;
    let tls = match tls_cfg {
        Some(cfg) => Some(tls::connect(cfg).map_err(ConnError::Tls)?),
        None => None,
    };
    Ok(Conn {
        stream,
        tls,
        seed: (index as u64 + 1) << 40,
        sent: 0,
        received: 0,
        out: Vec::new(),
        out_pos: 0,
        round_start: Instant::now(),
    })
}

/// Deregisters and closes a failed connection.
fn drop_conn(poll: &Poll, slot: &mut Option<Conn>) {
    if let Some(mut c) = slot.take() {
        // The socket is closed on drop whether or not this succeeds.
        let _ = poll.registry().deregister(&mut c.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_depends_on_offset_and_connection() {
        let a: Vec<u8> = (0..64).map(|o| pattern(1 << 40, o)).collect();
        let b: Vec<u8> = (64..128).map(|o| pattern(1 << 40, o)).collect();
        let c: Vec<u8> = (0..64).map(|o| pattern(2 << 40, o)).collect();
        assert_ne!(a, b, "consecutive messages must differ");
        assert_ne!(a, c, "connections must differ");
    }
}
