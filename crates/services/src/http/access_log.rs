//! The access log (`[http] access_log`): one line per response, written without blocking an
//! event loop.
//!
//! A response becomes an [`AccessLogEntry`] (a plain struct any protocol path can fill: the
//! HTTP/1.1 session and the HTTP/2 streams alike), [`format_line`] turns it into bytes
//! (sans-IO: the wall-clock time is a field of the entry), and [`AccessLog::record`] hands the
//! line to one writer thread over a bounded channel (`access_log_queue` lines). When that
//! queue is full the line is dropped, counted (`plexus_access_log_dropped_total`) and logged
//! at most once a second: a disk
//! that stalls slows the log, never the loops. The writer appends whatever has arrived in one
//! write (so under load lines are batched, and when idle each goes out at once — nothing
//! waits in a buffer) and reopens the file when [`AccessLog::reopen`] asks (SIGUSR1, after
//! logrotate moved it).
//!
//! The thread and the file are started on the first line, not when the service is built: the
//! service is built before the process daemonizes (threads do not survive `fork`) and before
//! `--check` returns (which must create nothing). The file is opened by the server's user,
//! as it runs then (after `--user`).

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use plexus::config::{AccessLogFormat, AccessLogTarget, HttpConfig};
use plexus::prometheus::{family, sample};
use plexus::LogThrottle;
use serde::Serialize;
use tracing::{info, warn};

/// How often the writer looks at the reopen flag when no line arrives.
const IDLE_WAKE: Duration = Duration::from_millis(250);
/// Bytes gathered from the queue before one write.
const BATCH_BYTES: usize = 64 * 1024;
/// Writes to stderr end at a line boundary and stay within this (writes of at most
/// `PIPE_BUF` bytes to a pipe are atomic: lines never interleave with the server's own log).
const STDERR_CHUNK: usize = 4096;

/// One response, as the access log records it.
#[derive(Debug, Clone)]
pub(crate) struct AccessLogEntry<'a> {
    /// The client: the PROXY header's source when the listener takes one.
    pub(crate) peer: SocketAddr,
    /// The request method; empty when the request was refused before a head was parsed.
    pub(crate) method: &'a str,
    /// The request-target as sent.
    pub(crate) target: &'a str,
    /// `HTTP/1.1`, `HTTP/1.0`, `HTTP/2.0`.
    pub(crate) protocol: &'a str,
    pub(crate) status: u16,
    /// Body bytes of the response (0 for HEAD, 304, 204).
    pub(crate) bytes: u64,
    pub(crate) referer: Option<&'a [u8]>,
    pub(crate) user_agent: Option<&'a [u8]>,
    /// When the request head was complete.
    pub(crate) started: Instant,
    /// When the response was queued.
    pub(crate) finished: Instant,
    /// The wall-clock time of `finished`.
    pub(crate) time: SystemTime,
}

impl AccessLogEntry<'_> {
    fn duration(&self) -> Duration {
        self.finished.saturating_duration_since(self.started)
    }
}

/// Appends `entry` to `out` as one line (with its `\n`) in `format`.
///
/// combined: the NCSA combined format (`%h - - [%t] "%r" %s %b "%{Referer}i"
/// "%{User-agent}i"`, as Apache and nginx write it) followed by the duration in seconds
/// (nginx's `$request_time`, microsecond precision). Quotes, backslashes and non-printable
/// bytes inside quoted fields are written as `\xHH` (as nginx does), so a line always splits
/// on its quotes. json: one object per line (keys in the order of the struct below).
pub(crate) fn format_line(format: AccessLogFormat, entry: &AccessLogEntry<'_>, out: &mut Vec<u8>) {
    let seconds = entry.duration().as_secs_f64();
    match format {
        AccessLogFormat::Combined => {
            let _ = write!(out, "{} - - [{}] \"", entry.peer.ip(), clf_time(entry.time));
            if entry.method.is_empty() {
                out.push(b'-');
            } else {
                escape(out, entry.method.as_bytes());
                out.push(b' ');
                escape(out, entry.target.as_bytes());
                out.push(b' ');
                escape(out, entry.protocol.as_bytes());
            }
            let _ = write!(out, "\" {} {} \"", entry.status, entry.bytes);
            escape(out, entry.referer.unwrap_or(b"-"));
            out.extend_from_slice(b"\" \"");
            escape(out, entry.user_agent.unwrap_or(b"-"));
            let _ = writeln!(out, "\" {seconds:.6}");
        }
        AccessLogFormat::Json => {
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
            let known = |value: &str| (!entry.method.is_empty()).then(|| value.to_owned());
            let line = JsonLine {
                time: humantime::format_rfc3339_millis(entry.time).to_string(),
                client: entry.peer.ip().to_string(),
                client_port: entry.peer.port(),
                method: known(entry.method),
                target: known(entry.target),
                protocol: known(entry.protocol),
                status: entry.status,
                bytes: entry.bytes,
                referer: entry.referer.map(text),
                user_agent: entry.user_agent.map(text),
                duration_seconds: (seconds * 1e6).round() / 1e6,
            };
            if serde_json::to_writer(&mut *out, &line).is_ok() {
                out.push(b'\n');
            }
        }
    }
}

/// The json format's fields.
#[derive(Serialize)]
struct JsonLine {
    time: String,
    client: String,
    client_port: u16,
    method: Option<String>,
    target: Option<String>,
    protocol: Option<String>,
    status: u16,
    bytes: u64,
    referer: Option<String>,
    user_agent: Option<String>,
    duration_seconds: f64,
}

/// `10/Oct/2000:13:55:36 +0000` (the common log format's time, in UTC).
fn clf_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `YYYY-MM-DDTHH:MM:SSZ`; years past 9999 do not occur in a log.
    let rfc3339 = humantime::format_rfc3339_seconds(time).to_string();
    let part = |range: std::ops::Range<usize>| rfc3339.get(range).unwrap_or("?");
    let month = part(5..7)
        .parse::<usize>()
        .ok()
        .and_then(|m| m.checked_sub(1))
        .and_then(|m| MONTHS.get(m))
        .copied()
        .unwrap_or("???");
    format!(
        "{}/{month}/{}:{} +0000",
        part(8..10),
        part(0..4),
        part(11..19)
    )
}

/// Copies `bytes`, writing `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(b' '..=b'~').contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

/// The access log of an http service: the format, the queue to the writer thread (started
/// on first use), and its counters.
pub(crate) struct AccessLog {
    format: AccessLogFormat,
    target: AccessLogTarget,
    queue: usize,
    writer: OnceLock<Writer>,
    /// Set by SIGUSR1; the writer reopens the file when it sees it.
    reopen: Arc<AtomicBool>,
    stats: Arc<LogStats>,
}

/// The running writer: the sending end of its queue, and the thread (joined on drop, so
/// every queued line is written before the process exits).
struct Writer {
    /// `None` when the thread could not be started (every line is then dropped). A
    /// `SyncSender` is shared by the loops without a lock.
    sender: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct LogStats {
    /// Lines handed to the writer.
    queued: AtomicU64,
    /// Lines dropped: queue full, or no writer.
    dropped: AtomicU64,
    /// Writes (or opens) that failed; the lines of a failed write are lost.
    write_errors: AtomicU64,
    /// Dropped lines are logged at most once a second (with how many since).
    drops: Mutex<LogThrottle>,
}

impl AccessLog {
    /// The access log `[http]` asks for, if any.
    pub(crate) fn new(config: &HttpConfig) -> Option<AccessLog> {
        let target = config.access_log_target()?;
        Some(AccessLog {
            format: config.access_log_format,
            target,
            queue: config.access_log_queue.max(1),
            writer: OnceLock::new(),
            reopen: Arc::new(AtomicBool::new(false)),
            stats: Arc::default(),
        })
    }

    /// Formats `entry` and queues it for the writer; never blocks (a full queue drops the
    /// line and counts it).
    pub(crate) fn record(&self, entry: &AccessLogEntry<'_>) {
        let mut line = Vec::with_capacity(256);
        format_line(self.format, entry, &mut line);
        let writer = self.writer.get_or_init(|| self.start());
        let sent = match writer.sender.as_ref() {
            Some(sender) => match sender.try_send(line) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if sent {
            self.stats.queued.fetch_add(1, Relaxed);
            return;
        }
        let dropped = self.stats.dropped.fetch_add(1, Relaxed).saturating_add(1);
        let allowed = self
            .stats
            .drops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(entry.finished);
        if allowed.is_some() {
            warn!(
                "http access log: queue full (access_log_queue = {}): line dropped, \
                 {dropped} dropped in all (access_log_dropped_total)",
                self.queue
            );
        }
    }

    /// Asks the writer to reopen the file (SIGUSR1): lines queued so far go to the old file,
    /// later ones to the file now at the configured path.
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        if let Some(writer) = self.writer.get() {
            if let Some(sender) = writer.sender.as_ref() {
                // An empty message wakes the writer; a full queue wakes it anyway.
                let _ = sender.try_send(Vec::new());
            }
        }
    }

    /// The access log's families for `/metrics`.
    pub(crate) fn write_prometheus(&self, out: &mut String) {
        let counters = [
            (
                "access_log_lines_total",
                "Access log lines handed to the writer thread.",
                &self.stats.queued,
            ),
            (
                "access_log_dropped_total",
                "Access log lines dropped because the writer's queue (access_log_queue) was \
                 full.",
                &self.stats.dropped,
            ),
            (
                "access_log_write_errors_total",
                "Failed writes or opens of the access log (their lines are lost).",
                &self.stats.write_errors,
            ),
        ];
        for (name, help, counter) in counters {
            family(out, name, "counter", help);
            sample(out, name, &[], counter.load(Relaxed));
        }
    }

    fn start(&self) -> Writer {
        let (sender, receiver) = mpsc::sync_channel(self.queue);
        let output = match &self.target {
            AccessLogTarget::Stderr => Output::Stderr,
            AccessLogTarget::File(path) => Output::File {
                path: path.clone(),
                file: None,
            },
        };
        let reopen = Arc::clone(&self.reopen);
        let stats = Arc::clone(&self.stats);
        let spawned = std::thread::Builder::new()
            .name("plexus-access-log".into())
            .spawn(move || write_loop(receiver, output, &reopen, &stats));
        match spawned {
            Ok(thread) => Writer {
                sender: Some(sender),
                thread: Some(thread),
            },
            Err(err) => {
                warn!("http access log: cannot start its writer thread: {err}; lines are dropped");
                Writer {
                    sender: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.get_mut() {
            // Closing the queue ends the writer once it has written what is queued.
            writer.sender.take();
            if let Some(thread) = writer.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Where the writer puts lines.
enum Output {
    Stderr,
    /// The file at `path`, opened on first use and on reopen.
    File {
        path: PathBuf,
        file: Option<File>,
    },
}

impl Output {
    fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        match self {
            Output::Stderr => {
                let mut stderr = io::stderr().lock();
                for chunk in line_chunks(batch, STDERR_CHUNK) {
                    stderr.write_all(chunk)?;
                }
                Ok(())
            }
            Output::File { path, file } => {
                if file.is_none() {
                    *file = Some(open_log(path)?);
                }
                match file {
                    Some(file) => file.write_all(batch),
                    None => Ok(()),
                }
            }
        }
    }

    /// Opens the file at the configured path again; on failure the old one stays in use.
    fn reopen(&mut self) -> io::Result<()> {
        if let Output::File { path, file } = self {
            let new = open_log(path)?;
            *file = Some(new);
            info!("http access log reopened: {}", path.display());
        }
        Ok(())
    }
}

fn open_log(path: &PathBuf) -> io::Result<File> {
    File::options().create(true).append(true).open(path)
}

/// Splits `batch` into pieces that end at a line boundary and are at most `max` bytes (a
/// longer line is a piece of its own).
fn line_chunks(batch: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = rest.get(..max).unwrap_or(rest);
        let end = match window.iter().rposition(|&b| b == b'\n') {
            Some(last_newline) => last_newline.saturating_add(1),
            // One line longer than `max`: up to its own end.
            None => rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |at| at.saturating_add(1)),
        };
        let (chunk, after) = rest.split_at_checked(end).unwrap_or((rest, &[]));
        rest = after;
        Some(chunk)
    })
}

/// The writer thread: gathers what is queued, writes it in one go, reopens when asked, and
/// ends (after writing everything) when the queue closes.
fn write_loop(
    receiver: Receiver<Vec<u8>>,
    mut output: Output,
    reopen: &AtomicBool,
    stats: &LogStats,
) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    let mut failing = false;
    loop {
        let closed = match receiver.recv_timeout(IDLE_WAKE) {
            Ok(line) => {
                batch.extend_from_slice(&line);
                while batch.len() < BATCH_BYTES {
                    match receiver.try_recv() {
                        Ok(line) => batch.extend_from_slice(&line),
                        Err(_) => break,
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !batch.is_empty() {
            match output.write(&batch) {
                Ok(()) => failing = false,
                Err(err) => {
                    stats.write_errors.fetch_add(1, Relaxed);
                    if !failing {
                        warn!("http access log: write failed: {err} (lines lost until it works)");
                    }
                    failing = true;
                }
            }
            batch.clear();
        }
        if reopen.swap(false, Relaxed) {
            if let Err(err) = output.reopen() {
                stats.write_errors.fetch_add(1, Relaxed);
                warn!("http access log: cannot reopen: {err}; still writing to the old file");
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn entry(started: Instant) -> AccessLogEntry<'static> {
        AccessLogEntry {
            peer: "203.0.113.7:5555".parse().unwrap(),
            method: "GET",
            target: "/a \"b\"?q=1",
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 1234,
            referer: Some(b"http://example.test/"),
            user_agent: Some(b"curl/8.0\x01"),
            started,
            finished: started + Duration::from_micros(1500),
            // 2000-10-10T13:55:36Z
            time: UNIX_EPOCH + Duration::from_secs(971_186_136),
        }
    }

    #[test]
    fn combined_lines_have_every_field_escaped() {
        let mut out = Vec::new();
        format_line(AccessLogFormat::Combined, &entry(Instant::now()), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "203.0.113.7 - - [10/Oct/2000:13:55:36 +0000] \"GET /a \\x22b\\x22?q=1 HTTP/1.1\" \
             200 1234 \"http://example.test/\" \"curl/8.0\\x01\" 0.001500\n"
        );
    }

    #[test]
    fn refused_requests_log_a_dash_and_missing_headers_too() {
        let mut refused = entry(Instant::now());
        refused.method = "";
        refused.status = 408;
        refused.bytes = 20;
        refused.referer = None;
        refused.user_agent = None;
        let mut out = Vec::new();
        format_line(AccessLogFormat::Combined, &refused, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains("] \"-\" 408 20 \"-\" \"-\" "), "{line}");

        let mut out = Vec::new();
        format_line(AccessLogFormat::Json, &refused, &mut out);
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["method"], serde_json::Value::Null);
        assert_eq!(json["status"], 408);
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        format_line(AccessLogFormat::Json, &entry(Instant::now()), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["time"], "2000-10-10T13:55:36.000Z");
        assert_eq!(json["client"], "203.0.113.7");
        assert_eq!(json["client_port"], 5555);
        assert_eq!(json["method"], "GET");
        assert_eq!(json["target"], "/a \"b\"?q=1");
        assert_eq!(json["protocol"], "HTTP/1.1");
        assert_eq!(json["status"], 200);
        assert_eq!(json["bytes"], 1234);
        assert_eq!(json["referer"], "http://example.test/");
        assert_eq!(json["user_agent"], "curl/8.0\u{1}");
        assert_eq!(json["duration_seconds"], 0.0015);
    }

    #[test]
    fn stderr_chunks_end_at_line_boundaries() {
        let batch = b"aaaa\nbb\ncccccccccc\nd\n";
        let chunks: Vec<&[u8]> = line_chunks(batch, 8).collect();
        assert_eq!(chunks, [&b"aaaa\nbb\n"[..], b"cccccccccc\n", b"d\n"]);
        assert_eq!(
            line_chunks(b"no newline", 4).collect::<Vec<_>>(),
            [b"no newline"]
        );
        assert_eq!(line_chunks(b"", 4).count(), 0);
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let config = HttpConfig {
            access_log: Some(path.clone()),
            ..HttpConfig::default()
        };
        let log = AccessLog::new(&config).unwrap();
        let wait_for = |path: &std::path::Path, lines: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if text.lines().count() >= lines || Instant::now() > deadline {
                    return text;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let now = Instant::now();
        log.record(&entry(now));
        log.record(&entry(now));
        assert_eq!(wait_for(&path, 2).lines().count(), 2);
        let moved = dir.path().join("access.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.reopen();
        // The reopen is seen within IDLE_WAKE; until then lines may still go to the old file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        log.record(&entry(now));
        drop(log);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(std::fs::read_to_string(&moved).unwrap().lines().count(), 2);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO nobody reads yet: the writer blocks in open(2), as on a stalled disk.
        let fifo = dir.path().join("stalled");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        let config = HttpConfig {
            access_log: Some(fifo.clone()),
            access_log_queue: 1,
            ..HttpConfig::default()
        };
        let log = AccessLog::new(&config).unwrap();
        let now = Instant::now();
        let line_len = {
            let mut line = Vec::new();
            format_line(config.access_log_format, &entry(now), &mut line);
            line.len()
        };
        for _ in 0..1000 {
            log.record(&entry(now));
        }
        let counter = |name: &str| -> u64 {
            let mut metrics = String::new();
            log.write_prometheus(&mut metrics);
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap()
                .parse()
                .unwrap()
        };
        let queued = counter("plexus_access_log_lines_total");
        let dropped = counter("plexus_access_log_dropped_total");
        // The reader is started before any assertion: a failed one unwinds through `drop(log)`,
        // which joins the writer, and the writer stays in open(2) until the FIFO has a reader.
        let reader = std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap());
        drop(log);
        let text = reader.join().unwrap();
        // The writer gathers at most one batch before it blocks; the queue holds one more line.
        let at_most = (BATCH_BYTES / line_len + 2) as u64;
        assert!(
            (1..=at_most).contains(&queued),
            "{queued} queued, at most {at_most}"
        );
        assert_eq!(
            queued + dropped,
            1000,
            "every line is either queued or counted"
        );
        assert_eq!(
            text.lines().count() as u64,
            queued,
            "every queued line arrives"
        );
    }
}
