//! The adversarial TCP modes: idle-flood, slowloris and handshake-flood.
//!
//! All three open `--connections` sockets first (blocking connects, spread over the source
//! addresses), do their mode's opening move, then hold every socket for `--duration` and
//! watch how the server treats them:
//! - idle-flood sends nothing (or, with `--echo-first N`, one verified echo of N bytes, after
//!   a TLS handshake with `--tls`); with `--server-pid` it also reads the server's RSS before
//!   and after, which gives the memory cost of an idle session;
//! - slowloris dribbles an HTTP request head that never ends, one byte every `--interval`;
//! - handshake-flood sends a real TLS ClientHello (only its first half with `--partial`) and
//!   never answers.
//!
//! The report says how many sockets stayed open, how many the server closed (FIN, reset),
//! after how long, and for slowloris the status line of any response (e.g. a 408).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use serde_json::{json, Value};

use super::stream::EchoExchange;
use super::stream::Exchange;
use super::tls::{self as btls, Peer};
use super::{seed_of, tcp_connect, Fail, Mode, Outcome, Plan, Progress, ProgressLine};

/// Extra time allowed per socket for opening.
const OPEN_ALLOWANCE: Duration = Duration::from_millis(10);
/// Bytes of each server response kept (for the status line).
const KEEP: usize = 128;
/// The request head slowloris dribbles: a start line and a Host header, then headers forever.
const SLOW_HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n";
const SLOW_FILLER: &[u8] = b"X-Padding: slowloris\r\n";

struct Held {
    index: usize,
    sock: TcpStream,
    tls: Option<ClientConnection>,
    opened: Instant,
    dribbled: usize,
    next_byte: Instant,
    received: Vec<u8>,
    received_bytes: u64,
    closed: Option<(Duration, &'static str)>,
}

fn slow_byte(i: usize) -> u8 {
    if i < SLOW_HEAD.len() {
        SLOW_HEAD[i]
    } else {
        SLOW_FILLER[(i - SLOW_HEAD.len()) % SLOW_FILLER.len()]
    }
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|err| anyhow::anyhow!("--server-pid {pid}: reading /proc/{pid}/status: {err}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("--server-pid {pid}: no VmRSS in /proc/{pid}/status"))
}

pub(crate) fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let tls_config = match (&plan.tls, plan.mode) {
        (Some(tls), Mode::IdleFlood) => Some(tls.config(false)?),
        _ => None,
    };
    let hello = match (&plan.tls, plan.mode) {
        (Some(tls), Mode::HandshakeFlood) => {
            let hello = tls.client_hello()?;
            if plan.partial {
                hello[..hello.len() / 2].to_vec()
            } else {
                hello
            }
        }
        _ => Vec::new(),
    };
    let rss_before = plan.server_pid.map(rss_kib).transpose()?;
    let mut outcome = Outcome::new("sockets");
    outcome.errors_fail = false;
    let mut poll = Poll::new()?;
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(Arc::clone(&progress), "sockets opened");
    let open_start = Instant::now();
    // Opening is sequential (a TLS handshake each with --tls): allow 10 ms per socket on top
    // of the usual cap, so 10,000 TLS sessions on a loaded machine still all open, while the
    // run stays bounded.
    let deadline = plan.hard_deadline(open_start) + OPEN_ALLOWANCE * plan.connections as u32;
    let mut held: Vec<Held> = Vec::with_capacity(plan.connections);
    for i in 0..plan.connections {
        if Instant::now() >= deadline {
            outcome
                .errors
                .add_n("timeout", (plan.connections - i) as u64);
            break;
        }
        let started = Instant::now();
        let opened = (|| -> Result<Held, Fail> {
            let std_sock = tcp_connect(plan.addr, plan.source(i))?;
            let tls = match (&tls_config, &plan.tls) {
                (Some(config), Some(tls)) => Some(tls.connect(config)?),
                _ => None,
            };
            let mut h = Held {
                index: i,
                sock: TcpStream::from_std(std_sock.try_clone()?),
                tls,
                opened: started,
                dribbled: 0,
                next_byte: started,
                received: Vec::new(),
                received_bytes: 0,
                closed: None,
            };
            opening_move(plan, &mut h, std_sock, &hello)?;
            poll.registry()
                .register(&mut h.sock, Token(held.len()), Interest::READABLE)?;
            Ok(h)
        })();
        match opened {
            Ok(h) => {
                if plan.echo_first.is_some() {
                    outcome.latency.record(started.elapsed());
                }
                held.push(h);
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(fail) => {
                outcome.errors.add(i, &fail);
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let open_secs = open_start.elapsed().as_secs_f64();
    drop(line);
    eprintln!(
        "plexus bench {}: {} of {} sockets open in {open_secs:.1} s; holding for {:?}",
        plan.mode.name(),
        held.len(),
        plan.connections,
        plan.duration
    );
    if let (Some(pid), Some(before)) = (plan.server_pid, rss_before) {
        // Let the server finish its share of the work on the last sessions.
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(pid)?;
        let per = (after.saturating_sub(before) * 1024) as f64 / held.len().max(1) as f64;
        outcome.extra("rss_before_kib", json!(before));
        outcome.extra("rss_after_kib", json!(after));
        outcome.extra("rss_per_session_bytes", json!(per.round()));
    }

    let hold_from = Instant::now();
    let hold_until = (hold_from + plan.duration).min(deadline);
    let n = held.len().max(1) as u32;
    for (k, h) in held.iter_mut().enumerate() {
        h.next_byte = hold_from + plan.interval / n * k as u32;
    }
    hold(plan, &mut poll, &mut held, hold_until, &mut outcome)?;

    outcome.count = held.len() as u64;
    outcome.window = hold_from.elapsed();
    outcome.verified = plan.echo_first.is_some() && outcome.errors.total() == 0;
    report(plan, &held, open_secs, &mut outcome);
    Ok(outcome)
}

/// What each mode does right after connecting (blocking socket, with timeouts).
fn opening_move(
    plan: &Plan,
    h: &mut Held,
    mut sock: StdTcpStream,
    hello: &[u8],
) -> Result<(), Fail> {
    sock.set_read_timeout(Some(super::CONNECT_TIMEOUT))?;
    sock.set_write_timeout(Some(super::CONNECT_TIMEOUT))?;
    match plan.mode {
        Mode::HandshakeFlood => sock.write_all(hello)?,
        Mode::IdleFlood => {
            if let Some(tls) = &mut h.tls {
                while tls.is_handshaking() {
                    tls.complete_io(&mut sock).map_err(|err| match err.kind() {
                        io::ErrorKind::InvalidData => Fail::Tls(err.to_string()),
                        _ => Fail::from_io(err),
                    })?;
                }
            }
            if let Some(size) = plan.echo_first {
                echo_once(h, &mut sock, size)?;
            }
        }
        _ => {}
    }
    sock.set_nonblocking(true)?;
    Ok(())
}

/// One verified echo of `size` pattern bytes over the blocking socket.
fn echo_once(h: &mut Held, sock: &mut StdTcpStream, size: usize) -> Result<(), Fail> {
    let mut echo = EchoExchange::new(seed_of(h.index), size);
    let mut out = Vec::with_capacity(size);
    echo.request(&mut out);
    let mut buf = vec![0u8; 16 * 1024];
    let mut done = 0;
    match &mut h.tls {
        Some(tls) => {
            tls.writer().write_all(&out)?;
            while tls.wants_write() {
                tls.write_tls(sock)?;
            }
            while done == 0 {
                if tls.read_tls(sock)? == 0 {
                    return Err(Fail::Eof);
                }
                tls.process_new_packets()?;
                loop {
                    match tls.reader().read(&mut buf) {
                        Ok(0) => return Err(Fail::Eof),
                        Ok(n) => done += echo.receive(&buf[..n])?,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                        Err(err) => return Err(Fail::from_io(err)),
                    }
                }
            }
        }
        None => {
            sock.write_all(&out)?;
            while done == 0 {
                let n = sock.read(&mut buf)?;
                if n == 0 {
                    return Err(Fail::Eof);
                }
                done += echo.receive(&buf[..n])?;
            }
        }
    }
    Ok(())
}

/// Holds the sockets until `until`, dribbling for slowloris, noting every close.
fn hold(
    plan: &Plan,
    poll: &mut Poll,
    held: &mut [Held],
    until: Instant,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        if now >= until || held.iter().all(|h| h.closed.is_some()) {
            return Ok(());
        }
        let mut wait = until - now;
        if plan.mode == Mode::Slowloris {
            for h in held.iter_mut().filter(|h| h.closed.is_none()) {
                if h.next_byte <= now {
                    match h.sock.write(&[slow_byte(h.dribbled)]) {
                        Ok(_) => h.dribbled += 1,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => h.closed = Some((now - h.opened, "reset")),
                    }
                    h.next_byte += plan.interval;
                }
                wait = wait.min(h.next_byte.saturating_duration_since(now));
            }
        }
        match poll.poll(&mut events, Some(wait.min(Duration::from_millis(200)))) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        }
        for event in events.iter() {
            let Some(h) = held.get_mut(event.token().0) else {
                continue;
            };
            if h.closed.is_some() {
                continue;
            }
            if let Some(kind) = watch(h, &mut buf) {
                h.closed = Some((h.opened.elapsed(), kind));
                let _ = poll.registry().deregister(&mut h.sock);
                if kind == "other" {
                    outcome.errors.add_n("other", 1);
                }
            }
        }
    }
}

/// Reads what the server sent; how it closed the connection, if it did.
fn watch(h: &mut Held, buf: &mut [u8]) -> Option<&'static str> {
    let Held {
        sock,
        tls,
        received,
        received_bytes,
        ..
    } = h;
    let mut keep = |data: &[u8]| {
        *received_bytes += data.len() as u64;
        let room = KEEP.saturating_sub(received.len());
        received.extend_from_slice(&data[..room.min(data.len())]);
    };
    if let Some(tls) = tls {
        return match btls::read(tls, sock, buf, |d| {
            keep(d);
            Ok(())
        }) {
            Ok(Peer::Open) => None,
            Ok(Peer::Closed) => Some("eof"),
            Err(Fail::Reset) => Some("reset"),
            Err(Fail::Tls(_)) => Some("tls_alert"),
            Err(_) => Some("other"),
        };
    }
    loop {
        match sock.read(buf) {
            Ok(0) => return Some("eof"),
            Ok(n) => keep(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return None,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                return Some(match Fail::from_io(err) {
                    Fail::Reset => "reset",
                    _ => "other",
                })
            }
        }
    }
}

fn report(plan: &Plan, held: &[Held], open_secs: f64, outcome: &mut Outcome) {
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let mut times: Vec<Duration> = Vec::new();
    let mut responses: BTreeMap<String, u64> = BTreeMap::new();
    let mut received = 0;
    for h in held {
        received += h.received_bytes;
        if let Some((after, kind)) = h.closed {
            *by_kind.entry(kind).or_default() += 1;
            times.push(after);
        }
        if h.received.starts_with(b"HTTP/") {
            let text = String::from_utf8_lossy(&h.received);
            let status = text.lines().next().unwrap_or_default().to_owned();
            *responses.entry(status).or_default() += 1;
        }
    }
    times.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    let closed = times.len();
    outcome.extra("opened", json!(held.len()));
    outcome.extra("open_s", json!((open_secs * 1000.0).round() / 1000.0));
    outcome.extra("still_open", json!(held.len() - closed));
    outcome.extra("closed_by_server", json!(closed));
    outcome.extra("closed_how", json!(by_kind));
    outcome.extra(
        "close_after_ms",
        if times.is_empty() {
            json!({"min": null, "p50": null, "max": null})
        } else {
            json!({
                "min": ms(times[0]),
                "p50": ms(times[closed / 2]),
                "max": ms(times[closed - 1]),
            })
        },
    );
    outcome.extra("bytes_received", json!(received));
    if plan.mode == Mode::Slowloris {
        outcome.extra(
            "bytes_dribbled",
            json!(held.iter().map(|h| h.dribbled as u64).sum::<u64>()),
        );
        outcome.extra(
            "responses",
            Value::Object(responses.into_iter().map(|(k, v)| (k, json!(v))).collect()),
        );
    }
    if plan.mode == Mode::HandshakeFlood {
        outcome.extra("partial", json!(plan.partial));
    }
    if plan.mode == Mode::IdleFlood {
        outcome.extra("tls", json!(plan.tls.is_some()));
        outcome.extra("echo_first", json!(plan.echo_first));
    }
    outcome.extra("sources", json!(plan.sources.len()));
}
