//! `plexus bench`: a load generator and adversarial client for plexus (or any server).
//!
//! This module owns the command line, the pieces every mode shares (the error taxonomy, the
//! latency histogram and its summary, the progress line, socket opening from chosen source
//! addresses, the final table and the one JSON line on stdout) and the dispatch to the mode
//! families:
//! - [`stream`]: tcp-echo, tls-echo and http (keep-alive GET) on a mio engine, closed loop or
//!   open loop (`--rate`, latency from the intended send time);
//! - [`connect_rate`]: TCP and TLS (full or resumed) handshakes per second;
//! - [`udp`]: udp-echo and dtls-echo, one datagram (record) per message, loss counted;
//! - [`flood`]: the adversarial idle-flood, slowloris and handshake-flood;
//! - [`dtls_flood`]: dtls-hello-flood from many 127.0.0.0/8 source addresses.
//!
//! Every run is bounded: `--warmup` + `--duration`, plus a fixed allowance for setup and drain
//! ([`HARD_CAP_EXTRA`]; the TCP floods add 10 ms per socket for their sequential opening)
//! after which the engines stop whatever the server does.

mod connect_rate;
mod dtls_flood;
mod flood;
mod http;
mod report;
mod stream;
mod stream_rt;
mod tls;
mod udp;

use std::io::{self, IsTerminal};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub(crate) use report::{Errors, Fail, Latency, Outcome};

use crate::dgram_client::{DtlsClient, DtlsOptions, MAX_RECORD_PAYLOAD};
use crate::EXIT_USAGE;

/// Time allowed beyond warm-up + duration for connecting, handshaking and draining; a run
/// never lasts longer than `warmup + duration + HARD_CAP_EXTRA`.
pub(crate) const HARD_CAP_EXTRA: Duration = Duration::from_secs(30);
/// Bound on one TCP connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the measured window: how long outstanding messages may still complete.
pub(crate) const DRAIN: Duration = Duration::from_secs(2);

/// What `plexus bench` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Echo over TCP: messages of --size bytes, every byte verified.
    TcpEcho,
    /// Echo over TLS (rustls): connections handshake first, then as tcp-echo.
    TlsEcho,
    /// Echo over UDP: one datagram per message, loss counted after --timeout.
    UdpEcho,
    /// Echo over DTLS 1.2 (OpenSSL): sessions handshake first, then as udp-echo.
    DtlsEcho,
    /// Connect (+ TLS handshake with --tls), one echo, close; repeated per connection slot.
    ConnectRate,
    /// HTTP/1.1 keep-alive GET of --path (https with --tls).
    Http,
    /// Connections dribbling an HTTP request head one byte every --interval.
    Slowloris,
    /// Open --connections sockets, send nothing, watch how the server closes them.
    IdleFlood,
    /// Connections that send a (partial with --partial) TLS ClientHello and go silent.
    HandshakeFlood,
    /// DTLS 1.2 ClientHellos from many 127.0.0.0/8 addresses, never answering the cookie.
    DtlsHelloFlood,
}

impl Mode {
    /// The mode's name on the command line and in the JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::TcpEcho => "tcp-echo",
            Mode::TlsEcho => "tls-echo",
            Mode::UdpEcho => "udp-echo",
            Mode::DtlsEcho => "dtls-echo",
            Mode::ConnectRate => "connect-rate",
            Mode::Http => "http",
            Mode::Slowloris => "slowloris",
            Mode::IdleFlood => "idle-flood",
            Mode::HandshakeFlood => "handshake-flood",
            Mode::DtlsHelloFlood => "dtls-hello-flood",
        }
    }

    /// The embedded default configuration's listener for this mode.
    fn default_addr(self, tls: bool) -> &'static str {
        match (self, tls) {
            (Mode::TlsEcho | Mode::HandshakeFlood, _) => "127.0.0.1:7443",
            (Mode::ConnectRate | Mode::IdleFlood, true) => "127.0.0.1:7443",
            (Mode::Http, true) => "127.0.0.1:8443",
            (Mode::Http | Mode::Slowloris, _) => "127.0.0.1:8080",
            (Mode::DtlsEcho | Mode::DtlsHelloFlood, _) => "127.0.0.1:7444",
            _ => "127.0.0.1:7000",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// What to run.
    #[arg(value_enum)]
    mode: Mode,
    /// Target HOST:PORT (default: the embedded configuration's listener for MODE, on
    /// 127.0.0.1). Only this address is ever contacted.
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// Concurrent connections (UDP: sockets; floods: sockets opened).
    #[arg(long, default_value_t = 100, value_name = "N")]
    connections: usize,
    /// Message size in bytes (echo modes; udp, dtls: at least 16; dtls: at most 1100).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    size: usize,
    /// Messages (requests) kept outstanding per connection in closed loop.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pipeline: usize,
    /// Measured time (floods: how long sockets are held).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time before the measurement starts (not counted).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: total messages (requests, datagrams) per second, sent on schedule whatever
    /// the server does; latency is measured from the intended send time.
    #[arg(long, value_name = "PER_S")]
    rate: Option<f64>,
    /// Load threads, each with its own share of the connections.
    #[arg(long, default_value_t = 1, value_name = "N")]
    threads: usize,
    /// connect-rate, http, idle-flood: use TLS.
    #[arg(long)]
    tls: bool,
    /// TLS, DTLS: accept any server certificate (handshake signatures are still verified).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// TLS, DTLS: trust only the certificates in this PEM file.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// TLS, DTLS: server name to send and verify (default: HOST).
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// connect-rate --tls: resume sessions (tickets / session ids) after the first handshake.
    #[arg(long)]
    resume: bool,
    /// TLS: offer only this version (default: 1.3 and 1.2).
    #[arg(long, value_name = "1.2|1.3")]
    tls_version: Option<String>,
    /// http: the path to GET.
    #[arg(long, default_value = "/", value_name = "/x")]
    path: String,
    /// slowloris: time between two bytes on one connection.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// udp-echo, dtls-echo: a datagram not echoed within this time is lost (an error).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// handshake-flood: send only the first half of the ClientHello.
    #[arg(long)]
    partial: bool,
    /// idle-flood: echo this many bytes once on each connection (after the TLS handshake
    /// with --tls) before going idle.
    #[arg(long, value_name = "BYTES")]
    echo_first: Option<usize>,
    /// idle-flood: read this process's RSS (/proc/PID/status) before and after opening, and
    /// report the growth per session.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Source addresses to spread connections over (127.0.0.1, 127.0.0.2, ...; loopback
    /// targets only). Default: 1, or enough for 20,000 connections each.
    #[arg(long, value_name = "N")]
    sources: Option<usize>,
    /// Also write the latency histogram to FILE in HdrHistogram's percentile-distribution
    /// text format (values in microseconds; plottable with HdrHistogram's plotter).
    #[arg(long, value_name = "FILE")]
    hdr_out: Option<PathBuf>,
}

/// The options a mode runs with, validated.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) mode: Mode,
    pub(crate) addr: SocketAddr,
    pub(crate) connections: usize,
    pub(crate) size: usize,
    pub(crate) pipeline: usize,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) rate: Option<f64>,
    pub(crate) threads: usize,
    pub(crate) tls: Option<tls::TlsPlan>,
    /// dtls-echo: the DTLS client every session starts from.
    pub(crate) dtls: Option<DtlsClient>,
    pub(crate) resume: bool,
    pub(crate) path: String,
    pub(crate) host: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) partial: bool,
    pub(crate) echo_first: Option<usize>,
    pub(crate) server_pid: Option<u32>,
    /// Local addresses to bind before connecting (`None` = let the kernel choose).
    pub(crate) sources: Vec<Option<IpAddr>>,
}

impl Plan {
    /// The source address for connection `i` (round robin).
    pub(crate) fn source(&self, i: usize) -> Option<IpAddr> {
        self.sources[i % self.sources.len()]
    }

    /// The instant after which every engine stops, whatever happens.
    pub(crate) fn hard_deadline(&self, start: Instant) -> Instant {
        start + self.warmup + self.duration + HARD_CAP_EXTRA
    }
}

pub(crate) fn run(args: BenchArgs) -> ExitCode {
    let hdr_out = args.hdr_out.clone();
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Descriptors: floods open thousands of sockets.
    let _ = plexus_sys::rlimit::raise_nofile_to_hard();
    let _ = plexus_sys::signal::ignore_sigpipe();
    let result = match plan.mode {
        Mode::TcpEcho | Mode::TlsEcho | Mode::Http => stream::run(&plan),
        Mode::ConnectRate => connect_rate::run(&plan),
        Mode::UdpEcho | Mode::DtlsEcho => udp::run(&plan),
        Mode::Slowloris | Mode::IdleFlood | Mode::HandshakeFlood => flood::run(&plan),
        Mode::DtlsHelloFlood => dtls_flood::run(&plan),
    };
    match result {
        Ok(outcome) => {
            eprint!("{}", outcome.table(&plan));
            println!("{}", outcome.json(&plan));
            if let Some(path) = &hdr_out {
                if let Err(err) = outcome.latency.write_hdr_file(path) {
                    eprintln!("error: --hdr-out {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if outcome.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("error: plexus bench {}: {err:#}", plan.mode.name());
            ExitCode::FAILURE
        }
    }
}

/// Validates the arguments into a [`Plan`] (usage errors only).
fn plan(args: BenchArgs) -> anyhow::Result<Plan> {
    let mode = args.mode;
    let uses_tls = matches!(mode, Mode::TlsEcho) || args.tls;
    if args.tls && !matches!(mode, Mode::ConnectRate | Mode::Http | Mode::IdleFlood) {
        bail!("--tls applies to connect-rate, http and idle-flood (tls-echo is always TLS)");
    }
    let target = args
        .addr
        .clone()
        .unwrap_or_else(|| mode.default_addr(uses_tls).to_owned());
    let addr = target
        .to_socket_addrs()
        .with_context(|| format!("--addr {target:?}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--addr {target:?}: the name resolved to no address"))?;
    let host = match target.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        None => target.clone(),
    };
    if args.connections == 0 || args.pipeline == 0 || args.threads == 0 {
        bail!("--connections, --pipeline and --threads must be at least 1");
    }
    if args.size == 0 || args.size > 16 * 1024 * 1024 {
        bail!("--size {}: expected 1 to 16777216 bytes", args.size);
    }
    if mode == Mode::UdpEcho && !(16..=65_000).contains(&args.size) {
        bail!(
            "--size {}: a udp-echo datagram is 16 to 65000 bytes (it carries a sequence number)",
            args.size
        );
    }
    if mode == Mode::DtlsEcho && !(16..=MAX_RECORD_PAYLOAD).contains(&args.size) {
        bail!(
            "--size {}: a dtls-echo message is 16 to {MAX_RECORD_PAYLOAD} bytes (one DTLS record \
             within the 1200-byte MTU, with a sequence number)",
            args.size
        );
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate {rate}: expected a positive number of messages per second");
        }
        if !matches!(
            mode,
            Mode::TcpEcho
                | Mode::TlsEcho
                | Mode::UdpEcho
                | Mode::DtlsEcho
                | Mode::Http
                | Mode::DtlsHelloFlood
        ) {
            bail!(
                "--rate applies to tcp-echo, tls-echo, udp-echo, dtls-echo, http and \
                 dtls-hello-flood"
            );
        }
    }
    if args.resume && !(mode == Mode::ConnectRate && args.tls) {
        bail!("--resume applies to connect-rate --tls");
    }
    if args.partial && mode != Mode::HandshakeFlood {
        bail!("--partial applies to handshake-flood");
    }
    if (args.echo_first.is_some() || args.server_pid.is_some()) && mode != Mode::IdleFlood {
        bail!("--echo-first and --server-pid apply to idle-flood");
    }
    if args.echo_first == Some(0) {
        bail!("--echo-first must be at least 1 byte");
    }
    if !args.path.starts_with('/') || args.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!(
            "--path {:?}: expected an absolute path without spaces or control characters",
            args.path
        );
    }
    if args.interval.is_zero() {
        bail!("--interval must be positive");
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let mut dtls = None;
    let tls = if uses_tls || mode == Mode::HandshakeFlood {
        Some(tls::TlsPlan::new(
            &host,
            args.insecure,
            args.ca.as_deref(),
            args.sni.as_deref(),
            args.tls_version.as_deref(),
        )?)
    } else if mode == Mode::DtlsEcho {
        if args.tls_version.is_some() {
            bail!("--tls-version applies to TLS modes (dtls-echo is always DTLS 1.2)");
        }
        let options = DtlsOptions {
            insecure: args.insecure,
            ca: args.ca.clone(),
            sni: args.sni.clone(),
            psk: None,
        };
        dtls = Some(DtlsClient::new(&target, &options)?);
        None
    } else {
        if args.insecure || args.ca.is_some() || args.sni.is_some() || args.tls_version.is_some() {
            bail!("--insecure, --ca, --sni and --tls-version apply to TLS and DTLS modes only");
        }
        None
    };
    let sources = sources(mode, addr, args.connections, args.sources)?;
    Ok(Plan {
        mode,
        addr,
        connections: args.connections,
        size: args.size,
        pipeline: args.pipeline,
        duration: args.duration,
        warmup: args.warmup,
        rate: args.rate,
        threads: args.threads.min(args.connections),
        tls,
        dtls,
        resume: args.resume,
        path: args.path,
        host,
        interval: args.interval,
        timeout: args.timeout,
        partial: args.partial,
        echo_first: args.echo_first,
        server_pid: args.server_pid,
        sources,
    })
}

/// Connections per source address before another one is added by default (the ephemeral port
/// range is about 28,000 ports).
const PER_SOURCE: usize = 20_000;

/// The local addresses to bind: several 127.x addresses when asked (or needed for many
/// connections), for loopback IPv4 targets only.
fn sources(
    mode: Mode,
    addr: SocketAddr,
    connections: usize,
    asked: Option<usize>,
) -> anyhow::Result<Vec<Option<IpAddr>>> {
    let loopback_v4 = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
    if mode == Mode::DtlsHelloFlood {
        if !loopback_v4 {
            bail!(
                "dtls-hello-flood sends from 127.0.0.0/8 source addresses: --addr must be an \
                 IPv4 loopback address (got {addr})"
            );
        }
        let n = asked.unwrap_or(256);
        if n == 0 || n > 1 << 20 {
            bail!("--sources {n}: expected 1 to 1048576 addresses");
        }
        return Ok((0..n).map(|i| Some(loopback_source(i))).collect());
    }
    let needed = connections.div_ceil(PER_SOURCE);
    match asked {
        Some(0) => bail!("--sources must be at least 1"),
        Some(n) if n > 1 && !loopback_v4 => bail!(
            "--sources {n}: several source addresses (127.0.0.x) need an IPv4 loopback target, \
             not {addr}"
        ),
        Some(n) => Ok(if n == 1 {
            vec![None]
        } else {
            (0..n).map(|i| Some(loopback_source(i))).collect()
        }),
        None if needed > 1 && loopback_v4 => {
            Ok((0..needed).map(|i| Some(loopback_source(i))).collect())
        }
        None => Ok(vec![None]),
    }
}

/// The `i`-th source address of 127.0.0.0/8 (127.0.0.1, 127.0.0.2, ..., skipping the network
/// and broadcast-looking .0 and .255 hosts).
fn loopback_source(i: usize) -> IpAddr {
    let host = i as u32 % (254 * 256 * 256);
    let (a, rest) = (host / 254 / 256, host % (254 * 256));
    let (b, c) = (rest / 254, rest % 254 + 1);
    IpAddr::V4(Ipv4Addr::new(127, a as u8, b as u8, c as u8))
}

/// A TCP socket to `addr`, bound to `source` first when given, connected with
/// [`CONNECT_TIMEOUT`] (blocking), TCP_NODELAY set.
pub(crate) fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = source {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), CONNECT_TIMEOUT)?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}

/// Counters the progress line reads while the engines run.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Completed messages / requests / handshakes (or opened sockets, datagrams sent).
    pub(crate) done: AtomicU64,
    pub(crate) errors: AtomicU64,
    stop: AtomicBool,
}

/// Prints a progress line on stderr once a second until dropped: overwritten in place with
/// `\r` on a terminal, one plain line per second otherwise.
pub(crate) struct ProgressLine {
    progress: Arc<Progress>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ProgressLine {
    pub(crate) fn start(progress: Arc<Progress>, what: &'static str) -> ProgressLine {
        let shared = Arc::clone(&progress);
        let thread = thread::spawn(move || {
            let tty = io::stderr().is_terminal();
            let start = Instant::now();
            let mut last = 0u64;
            let mut tick = 1u64;
            let mut printed = false;
            loop {
                let next = start + Duration::from_secs(tick);
                // Sleep in slices so that the end of a run is not delayed by a second.
                while Instant::now() < next {
                    if shared.stop.load(Ordering::Relaxed) {
                        if tty && printed {
                            eprintln!();
                        }
                        return;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                let done = shared.done.load(Ordering::Relaxed);
                let errors = shared.errors.load(Ordering::Relaxed);
                let line = format!(
                    "[{tick:>3}s] {} {what}/s, {done} total, {errors} errors",
                    done - last
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
                printed = true;
                last = done;
                tick += 1;
            }
        });
        ProgressLine {
            progress,
            thread: Some(thread),
        }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The expected byte at stream offset `off` of the stream with `seed`: a multiplicative hash,
/// so neighbouring offsets, messages and connections carry unrelated bytes.
#[inline]
pub(crate) fn pattern(seed: u64, off: u64) -> u8 {
    (off.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// The seed of connection `i` (distinct per connection, far apart in offset space).
pub(crate) fn seed_of(i: usize) -> u64 {
    (i as u64 + 1) << 40
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_per_message_and_connection() {
        let a: Vec<u8> = (0..64).map(|o| pattern(seed_of(0), o)).collect();
        let b: Vec<u8> = (64..128).map(|o| pattern(seed_of(0), o)).collect();
        let c: Vec<u8> = (0..64).map(|o| pattern(seed_of(1), o)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().any(|&x| x != a[0]), "not a constant fill");
    }

    #[test]
    fn loopback_sources_are_distinct_hosts() {
        assert_eq!(loopback_source(0), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            loopback_source(253),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254))
        );
        assert_eq!(
            loopback_source(254),
            IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1))
        );
        let all: std::collections::HashSet<_> = (0..100_000).map(loopback_source).collect();
        assert_eq!(all.len(), 100_000);
    }

    #[test]
    fn many_connections_get_several_sources_on_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let other: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        assert_eq!(sources(Mode::IdleFlood, lo, 100, None).unwrap(), vec![None]);
        assert_eq!(sources(Mode::IdleFlood, lo, 50_000, None).unwrap().len(), 3);
        assert_eq!(
            sources(Mode::IdleFlood, other, 50_000, None).unwrap(),
            vec![None]
        );
        assert!(sources(Mode::IdleFlood, other, 10, Some(4)).is_err());
        assert!(sources(Mode::DtlsHelloFlood, other, 10, None).is_err());
    }
}
