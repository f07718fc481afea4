//! `GET /status` and `GET /status.json`: the live status page of the http service.
//!
//! One [`Report`] is built per request from the same counters `/metrics` renders (the server's
//! [`plexus::MetricsSnapshot`] and this service's request counters), then written either as a
//! self-contained HTML page (inline CSS, no script, no external asset; `<meta http-equiv=
//! "refresh">` reloads it every [`REFRESH_SECONDS`]) or as JSON.
//!
//! Rates (bytes/s, accepts/s) and each event loop's busy share are deltas between two scrapes:
//! the service keeps the previous sample, and replaces it once it is at least
//! [`MIN_WINDOW`] old (two scrapes closer than that reuse the last rates). The first scrape
//! has no previous sample and reports averages over the uptime; `rates.basis` says which.
//! Busy share is the part of the window a loop did not spend waiting in `epoll_wait`.
//!
//! The page is served only when `[http] status` is on, and only to clients that
//! `[http] status_allow` permits (403 otherwise; loopback by default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use plexus_proto::{Acl, Cidr};
use serde::Serialize;

use std::borrow::Cow;

use super::{HttpStats, Response, Shared, LATENCY_BUCKETS, REJECT_STATUSES, TEXT};
use plexus::config::HttpConfig;
use plexus::{MetricsSnapshot, ServerStatus, Session};

/// How often the HTML page reloads itself.
pub(super) const REFRESH_SECONDS: u32 = 5;
/// The shortest window rates are computed over.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// The status page's settings and the sample the next scrape's rates are computed against.
pub(super) struct StatusPage {
    enabled: bool,
    allow: Acl,
    previous: Mutex<Option<Baseline>>,
}

/// Counters at the previous scrape, and the rates computed then.
struct Baseline {
    at: Instant,
    listeners: BTreeMap<String, (u64, u64, u64)>,
    totals: (u64, u64, u64),
    loop_wait: Vec<u64>,
    rates: Rates,
}

/// Rates of one scrape.
#[derive(Clone, Default)]
struct Rates {
    basis: &'static str,
    window_seconds: f64,
    /// By listener name: (bytes in/s, bytes out/s, accepted/s).
    listeners: BTreeMap<String, (f64, f64, f64)>,
    totals: (f64, f64, f64),
    /// By loop index: share of the window not spent in `epoll_wait` (0…1).
    busy: Vec<f64>,
}

impl StatusPage {
    pub(super) fn new(config: &HttpConfig) -> StatusPage {
        // Validation reported bad CIDRs already; whatever parses applies.
        let allow = config
            .status_allow
            .iter()
            .filter_map(|text| text.parse::<Cidr>().ok())
            .collect();
        StatusPage {
            enabled: config.status,
            allow: Acl::new(allow, Vec::new()),
            previous: Mutex::new(None),
        }
    }

    /// Whether `ip` may see the page (an empty list permits nobody: the page is for operators).
    fn permits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.allow.allow().is_empty() && self.allow.permits(ip)
    }

    /// Takes the rates for `snapshot` and keeps it as the next baseline when due.
    fn rates(&self, snapshot: &MetricsSnapshot, uptime: Duration, now: Instant) -> Rates {
        let listeners: BTreeMap<String, (u64, u64, u64)> = snapshot
            .listeners
            .iter()
            .map(|l| (l.name.clone(), (l.bytes_in, l.bytes_out, l.accepted)))
            .collect();
        let totals = (snapshot.bytes_in, snapshot.bytes_out, snapshot.accepted);
        let loop_wait: Vec<u64> = snapshot
            .event_loops
            .iter()
            .map(|l| l.poll_wait_nanos)
            .collect();
        let mut previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        let (basis, window, base_listeners, base_totals, base_wait) = match previous.as_ref() {
            Some(base) if now.duration_since(base.at) < MIN_WINDOW => return base.rates.clone(),
            Some(base) => (
                "since last scrape",
                now.duration_since(base.at),
                base.listeners.clone(),
                base.totals,
                base.loop_wait.clone(),
            ),
            None => (
                "since start",
                uptime,
                BTreeMap::new(),
                (0, 0, 0),
                Vec::new(),
            ),
        };
        let seconds = window.as_secs_f64().max(1e-9);
        let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        let rates = Rates {
            basis,
            window_seconds: window.as_secs_f64(),
            listeners: listeners
                .iter()
                .map(|(name, &(bytes_in, bytes_out, accepted))| {
                    let (in0, out0, acc0) = base_listeners.get(name).copied().unwrap_or_default();
                    (
                        name.clone(),
                        (
                            per_second(bytes_in, in0),
                            per_second(bytes_out, out0),
                            per_second(accepted, acc0),
                        ),
                    )
                })
                .collect(),
            totals: (
                per_second(totals.0, base_totals.0),
                per_second(totals.1, base_totals.1),
                per_second(totals.2, base_totals.2),
            ),
            busy: loop_wait
                .iter()
                .enumerate()
                .map(|(index, &wait)| {
                    let waited = wait.saturating_sub(base_wait.get(index).copied().unwrap_or(0));
                    (1.0 - waited as f64 / 1e9 / seconds).clamp(0.0, 1.0)
                })
                .collect(),
        };
        *previous = Some(Baseline {
            at: now,
            listeners,
            totals,
            loop_wait,
            rates: rates.clone(),
        });
        rates
    }
}

/// What `/status.json` returns, and what the HTML page shows.
#[derive(Serialize)]
struct Report {
    version: &'static str,
    uptime_seconds: u64,
    started_unix_seconds: u64,
    /// The configuration file, or `<embedded default>`.
    config_source: String,
    last_reload: Option<ReloadReport>,
    rates: RatesReport,
    totals: Totals,
    listeners: Vec<ListenerReport>,
    event_loops: Vec<LoopReport>,
    tls_handshakes: Handshakes,
    timeouts: Timeouts,
    sessions_closed: SessionsClosed,
    http: HttpReport,
}

#[derive(Serialize)]
struct ReloadReport {
    at_unix_seconds: u64,
    ok: bool,
    message: String,
}

#[derive(Serialize)]
struct RatesReport {
    /// `since last scrape` or `since start`.
    basis: &'static str,
    window_seconds: f64,
}

#[derive(Serialize)]
struct Totals {
    sessions_open: u64,
    accepted: u64,
    refused: BTreeMap<&'static str, u64>,
    bytes_in: u64,
    bytes_out: u64,
    accepted_per_second: f64,
    bytes_in_per_second: f64,
    bytes_out_per_second: f64,
}

#[derive(Serialize)]
struct ListenerReport {
    name: String,
    transport: &'static str,
    addr: String,
    service: String,
    sessions_open: u64,
    accepted: u64,
    refused: BTreeMap<&'static str, u64>,
    bytes_in: u64,
    bytes_out: u64,
    accepted_per_second: f64,
    bytes_in_per_second: f64,
    bytes_out_per_second: f64,
}

#[derive(Serialize)]
struct LoopReport {
    index: usize,
    sessions_open: u64,
    poll_wait_seconds: f64,
    /// Share of the rate window not spent waiting in `epoll_wait` (0…1).
    busy_share: f64,
}

#[derive(Serialize)]
struct Handshakes {
    ok: u64,
    failed: u64,
    timeouts: u64,
}

#[derive(Serialize)]
struct Timeouts {
    idle: u64,
    handshake: u64,
    upstream_connect: u64,
}

#[derive(Serialize)]
struct SessionsClosed {
    outbound_overflow: u64,
    io_error: u64,
    shutdown_forced: u64,
    handler_panic: u64,
}

#[derive(Serialize)]
struct HttpReport {
    /// By status class (`2xx`, …).
    responses: BTreeMap<String, u64>,
    /// Requests refused by the parser, by status.
    rejected: BTreeMap<String, u64>,
    /// Requests timed (the latency histogram's count).
    requests: u64,
    latency: Latency,
}

/// Estimated from the histogram's buckets as Prometheus' `histogram_quantile` does (linear
/// within a bucket); `None` before the first request.
#[derive(Serialize)]
struct Latency {
    mean_ms: Option<f64>,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl HttpStats {
    fn report(&self) -> HttpReport {
        let responses = self
            .responses
            .iter()
            .enumerate()
            .map(|(index, count)| (format!("{}xx", index + 1), count.load(Relaxed)))
            .collect();
        let rejected = REJECT_STATUSES
            .iter()
            .zip(&self.rejected)
            .map(|(status, count)| (status.to_string(), count.load(Relaxed)))
            .collect();
        let buckets: Vec<u64> = self
            .latency_buckets
            .iter()
            .map(|c| c.load(Relaxed))
            .collect();
        let total = self.latency_count.load(Relaxed);
        let sum = self.latency_sum_nanos.load(Relaxed) as f64 / 1e6;
        let quantile = |q: f64| quantile_ms(&buckets, total, q);
        HttpReport {
            responses,
            rejected,
            requests: total,
            latency: Latency {
                mean_ms: (total > 0).then(|| sum / total as f64),
                p50_ms: quantile(0.5),
                p90_ms: quantile(0.9),
                p99_ms: quantile(0.99),
            },
        }
    }
}

/// The `q` quantile in milliseconds from per-bucket counts (not cumulative) over
/// [`LATENCY_BUCKETS`]; observations above the last bound count as the last bound.
fn quantile_ms(buckets: &[u64], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut cumulative = 0u64;
    let mut lower = 0.0;
    for (&upper, &count) in LATENCY_BUCKETS.iter().zip(buckets) {
        let before = cumulative;
        cumulative += count;
        if count > 0 && cumulative as f64 >= rank {
            let within = (rank - before as f64) / count as f64;
            return Some((lower + (upper - lower) * within.clamp(0.0, 1.0)) * 1e3);
        }
        lower = upper;
    }
    LATENCY_BUCKETS.last().map(|le| le * 1e3)
}

fn refusals(list: &[(plexus::RefusalReason, u64)]) -> BTreeMap<&'static str, u64> {
    list.iter().map(|(r, n)| (r.as_str(), *n)).collect()
}

fn build(status: &ServerStatus, http: &HttpStats, page: &StatusPage) -> Report {
    let now = Instant::now();
    let snapshot = &status.metrics;
    let uptime = status.uptime;
    let rates = page.rates(snapshot, uptime, now);
    let listeners = snapshot
        .listeners
        .iter()
        .map(|l| {
            let (bytes_in_rate, bytes_out_rate, accepted_rate) =
                rates.listeners.get(&l.name).copied().unwrap_or_default();
            ListenerReport {
                name: l.name.clone(),
                transport: l.transport,
                addr: l.addr.to_string(),
                service: l.service.clone(),
                sessions_open: l.sessions_open,
                accepted: l.accepted,
                refused: refusals(&l.refused),
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
                accepted_per_second: accepted_rate,
                bytes_in_per_second: bytes_in_rate,
                bytes_out_per_second: bytes_out_rate,
            }
        })
        .collect();
    let event_loops = snapshot
        .event_loops
        .iter()
        .map(|l| LoopReport {
            index: l.index,
            sessions_open: l.sessions_open,
            poll_wait_seconds: l.poll_wait_nanos as f64 / 1e9,
            busy_share: rates.busy.get(l.index).copied().unwrap_or(0.0),
        })
        .collect();
    Report {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: uptime.as_secs(),
        started_unix_seconds: snapshot.started_unix_seconds,
        config_source: status.config_source.clone(),
        last_reload: status.last_reload.clone().map(|r| ReloadReport {
            at_unix_seconds: r.at_unix_seconds,
            ok: r.ok,
            message: r.message,
        }),
        rates: RatesReport {
            basis: rates.basis,
            window_seconds: rates.window_seconds,
        },
        totals: Totals {
            sessions_open: snapshot.sessions_open,
            accepted: snapshot.accepted,
            refused: refusals(&snapshot.refused),
            bytes_in: snapshot.bytes_in,
            bytes_out: snapshot.bytes_out,
            accepted_per_second: rates.totals.2,
            bytes_in_per_second: rates.totals.0,
            bytes_out_per_second: rates.totals.1,
        },
        listeners,
        event_loops,
        tls_handshakes: Handshakes {
            ok: snapshot.handshakes_ok,
            failed: snapshot.handshakes_failed,
            timeouts: snapshot.handshake_timeouts,
        },
        timeouts: Timeouts {
            idle: snapshot.closed_idle_timeout,
            handshake: snapshot.handshake_timeouts,
            upstream_connect: snapshot.closed_upstream_timeout,
        },
        sessions_closed: SessionsClosed {
            outbound_overflow: snapshot.closed_outbound_overflow,
            io_error: snapshot.closed_io_error,
            shutdown_forced: snapshot.closed_forced,
            handler_panic: snapshot.handler_panics,
        },
        http: http.report(),
    }
}

impl Shared {
    /// Answers `/status` (`json == false`) or `/status.json`: 404 when turned off, 403 to a
    /// client outside `status_allow`.
    pub(super) fn serve_status(
        &self,
        session: &mut Session<'_>,
        json: bool,
        head_only: bool,
    ) -> Response {
        let page = &self.status;
        if !page.enabled {
            return Response::not_found(head_only);
        }
        if !page.permits(session.peer().ip()) {
            let body = &b"403 Forbidden: this client is not in [http] status_allow\n"[..];
            return Response::simple(403, TEXT, body, head_only);
        }
        let Some(status) = session.server_status() else {
            return Response::not_found(head_only);
        };
        let report = build(&status, &self.stats, &self.status);
        let (mime, body) = if json {
            let mut body = serde_json::to_vec(&report).unwrap_or_default();
            body.push(b'\n');
            ("application/json", body)
        } else {
            (
                "text/html; charset=utf-8",
                render_html(&report).into_bytes(),
            )
        };
        // No script, no external asset, ever: the page is one inline style sheet (allowed by
        // its hash, nothing else inline is) and server-rendered text.
        let headers = vec![
            ("Content-Type", Cow::Borrowed(mime)),
            ("Cache-Control", Cow::Borrowed("no-store")),
            (
                "Content-Security-Policy",
                Cow::Borrowed(CONTENT_SECURITY_POLICY),
            ),
        ];
        Response::with(200, headers, body, head_only)
    }
}

/// Escapes text for HTML element content and quoted attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` → `1.23 MB` (decimal units, as network rates usually are).
fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{value:.0} B"),
        _ => format!("{value:.2} {}", UNITS[unit]),
    }
}

/// `12345` → `12,345`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    // The first group holds 1 to 3 digits, every later one exactly 3.
    let head = match digits.len() % 3 {
        0 => 3,
        rest => rest,
    }
    .min(digits.len());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    out.push_str(&digits[..head]);
    for group in digits.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).unwrap_or_default());
    }
    out
}

fn rate(n: f64) -> String {
    match n {
        n if n >= 100.0 => format!("{n:.0}/s"),
        n if n >= 1.0 => format!("{n:.1}/s"),
        n => format!("{n:.2}/s"),
    }
}

fn duration(seconds: u64) -> String {
    let (days, hours, minutes, secs) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) => format!("{minutes}m {secs}s"),
        (0, _, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

fn ms(value: Option<f64>) -> String {
    match value {
        None => "–".into(),
        Some(v) if v < 1.0 => format!("{:.0} µs", v * 1e3),
        Some(v) => format!("{v:.2} ms"),
    }
}

/// The non-zero refusals as `acl 3 · max_connections 1`, or `none`.
fn refusal_list(refused: &BTreeMap<&'static str, u64>) -> (u64, String) {
    let total = refused.values().sum();
    let parts: Vec<String> = refused
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{} {}", esc(reason), count(*n)))
        .collect();
    let text = match parts.is_empty() {
        true => "none".to_owned(),
        false => parts.join(" · "),
    };
    (total, text)
}

const STYLE: &str = "\
:root{--bg:#f5f7fa;--card:#fff;--ink:#1c2430;--muted:#667085;--line:#e4e8ee;--accent:#2f6fde;\
--ok:#1f9d55;--bad:#d64545;--warn:#c27c0e}\
@media (prefers-color-scheme:dark){:root{--bg:#11151b;--card:#1a2029;--ink:#e6e9ee;\
--muted:#9aa4b2;--line:#2a323d;--accent:#6aa0ff;--ok:#3ccf7c;--bad:#ff6b6b;--warn:#f0b43c}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--ink);\
font:14px/1.45 system-ui,-apple-system,\"Segoe UI\",Roboto,\"Helvetica Neue\",Arial,sans-serif}\
header{background:var(--card);border-bottom:1px solid var(--line);padding:14px 20px}\
header .wrap{max-width:1240px;margin:0 auto;display:flex;flex-wrap:wrap;align-items:baseline;\
gap:6px 18px}\
header h1{margin:0;font-size:20px;letter-spacing:.2px}\
header .meta{color:var(--muted);font-size:13px}\
header .meta b{color:var(--ink);font-weight:600}\
main{max-width:1280px;margin:0 auto;padding:16px 20px 28px}\
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;\
margin-bottom:18px}\
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}\
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.5px}\
.card .value{font-size:24px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums}\
.card .sub{color:var(--muted);font-size:12px;margin-top:2px}\
section{background:var(--card);border:1px solid var(--line);border-radius:10px;\
margin-bottom:18px;overflow:hidden}\
section h2{margin:0;padding:11px 14px;font-size:15px;border-bottom:1px solid var(--line)}\
section h2 small{color:var(--muted);font-weight:400;font-size:12px;margin-left:6px}\
.scroll{overflow-x:auto}\
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}\
th,td{padding:8px 14px;text-align:right;white-space:nowrap;border-bottom:1px solid var(--line)}\
th{color:var(--muted);font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.4px}\
tr:last-child td{border-bottom:0}\
th:first-child,td:first-child,.left{text-align:left}\
td .note{display:block;color:var(--muted);font-size:12px}\
.tag{display:inline-block;padding:1px 7px;border-radius:999px;font-size:12px;\
background:var(--bg);border:1px solid var(--line);color:var(--muted)}\
.ok{color:var(--ok)}.bad{color:var(--bad)}\
.bar{display:inline-block;vertical-align:middle;width:120px;height:8px;border-radius:4px;\
background:var(--line);overflow:hidden;margin-right:8px}\
.bar i{display:block;height:100%;background:var(--accent)}\
.w0{width:0%}.w5{width:5%}.w10{width:10%}.w15{width:15%}.w20{width:20%}.w25{width:25%}.w30{width:30%}.w35{width:35%}.w40{width:40%}.w45{width:45%}.w50{width:50%}.w55{width:55%}.w60{width:60%}.w65{width:65%}.w70{width:70%}.w75{width:75%}.w80{width:80%}.w85{width:85%}.w90{width:90%}.w95{width:95%}.w100{width:100%}\
#reload-message{margin:0 0 12px;color:var(--muted)}\
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:18px}\
.grid2 section{margin-bottom:0}\
footer{color:var(--muted);font-size:12px;margin-top:18px}a{color:var(--accent)}\
@media (max-width:600px){header{padding:12px 14px}main{padding:12px 10px 20px}\
.cards{grid-template-columns:repeat(2,1fr);gap:8px}.card .value{font-size:20px}\
th,td{padding:7px 10px}.bar{width:64px}\
table.stack thead{display:none}\
table.stack tr{display:grid;grid-template-columns:1fr 1fr 1fr;gap:6px 12px;padding:10px 12px;\
border-bottom:1px solid var(--line)}table.stack tr:last-child{border-bottom:0}\
table.stack td{display:block;border:0;padding:0;text-align:left;white-space:normal}\
table.stack td:first-child{grid-column:1/-1;font-size:15px}\
table.stack td.wide{grid-column:span 2}\
table.stack td[data-label]::before{content:attr(data-label);display:block;color:var(--muted);\
font-size:11px;text-transform:uppercase;letter-spacing:.4px}}";

/// The page's policy: nothing may load or run but the one `<style>` element, named by the
/// SHA-256 of [`STYLE`] (a unit test recomputes it: edit `STYLE`, and that test gives the new
/// hash). No inline allowance at all: the page has no `style=` attribute either (bar widths are
/// the `w0`…`w100` classes).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
     style-src 'sha256-RtuwL6tR9S3TqQQ/X+cEH+3c1A4YrajPQsxCW7RdX60='; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The class of a busy bar `percent` wide: `w0`, `w5` … `w100` (rounded to 5 %).
fn bar_step(percent: f64) -> u32 {
    let clamped = if percent.is_finite() {
        percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    // 0..=20 steps: the cast cannot truncate.
    (clamped / 5.0).round() as u32 * 5
}

fn render_html(report: &Report) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>plexus status</title><style>{STYLE}</style></head><body>"
    );
    let reload = match &report.last_reload {
        None => "<b>none</b>".to_owned(),
        Some(r) => format!(
            "<b class=\"{}\" title=\"{}\">{}</b>",
            if r.ok { "ok" } else { "bad" },
            esc(&r.message),
            if r.ok { "applied" } else { "failed" }
        ),
    };
    let _ = write!(
        out,
        "<header><div class=\"wrap\"><h1>plexus</h1>\
         <span class=\"meta\">version <b>{}</b></span>\
         <span class=\"meta\">up <b id=\"uptime\">{}</b></span>\
         <span class=\"meta\">config <b id=\"config-source\">{}</b></span>\
         <span class=\"meta\">last reload {reload}</span></div></header><main>",
        esc(report.version),
        duration(report.uptime_seconds),
        esc(&report.config_source),
    );
    if let Some(r) = &report.last_reload {
        let _ = write!(
            out,
            "<p class=\"meta\" id=\"reload-message\">\
             Last reload: {}</p>",
            esc(&r.message)
        );
    }

    let t = &report.totals;
    let (refused_total, refused_text) = refusal_list(&t.refused);
    let http = &report.http;
    let requests: u64 = http.responses.values().sum();
    let errors = http.responses.get("5xx").copied().unwrap_or(0);
    let hs = &report.tls_handshakes;
    out.push_str("<div class=\"cards\">");
    for (id, label, value, sub) in [
        (
            "total-sessions",
            "Sessions open",
            count(t.sessions_open),
            format!("{} event loops", report.event_loops.len()),
        ),
        (
            "total-accepted",
            "Accepted",
            count(t.accepted),
            rate(t.accepted_per_second),
        ),
        (
            "total-refused",
            "Refused",
            count(refused_total),
            refused_text,
        ),
        (
            "total-in",
            "Bytes in",
            bytes(t.bytes_in as f64),
            format!("{}/s", bytes(t.bytes_in_per_second)),
        ),
        (
            "total-out",
            "Bytes out",
            bytes(t.bytes_out as f64),
            format!("{}/s", bytes(t.bytes_out_per_second)),
        ),
        (
            "total-handshakes",
            "TLS handshakes",
            count(hs.ok),
            format!(
                "{} failed · {} timed out",
                count(hs.failed),
                count(hs.timeouts)
            ),
        ),
        (
            "total-requests",
            "HTTP responses",
            count(requests),
            format!("{} 5xx · p99 {}", count(errors), ms(http.latency.p99_ms)),
        ),
    ] {
        let _ = write!(
            out,
            "<div class=\"card\" id=\"{id}\"><div class=\"label\">{label}</div>\
             <div class=\"value\">{value}</div><div class=\"sub\">{sub}</div></div>"
        );
    }
    out.push_str("</div>");

    let _ = write!(
        out,
        "<section><h2>Listeners<small>rates {} ({:.1} s)</small></h2><div class=\"scroll\">\
         <table class=\"stack\"><thead><tr><th>Listener</th><th class=\"left\">Transport</th>\
         <th class=\"left\">Address</th>\
         <th class=\"left\">Service</th><th>Sessions</th><th>Accepted</th><th>Refused</th>\
         <th>In</th><th>Out</th></tr></thead><tbody>",
        esc(report.rates.basis),
        report.rates.window_seconds,
    );
    for l in &report.listeners {
        let (refused, reasons) = refusal_list(&l.refused);
        let name = esc(&l.name);
        let _ = write!(
            out,
            "<tr id=\"listener-{name}\" data-listener=\"{name}\" data-sessions=\"{}\">\
             <td><b class=\"name\">{name}</b></td>\
             <td class=\"left\" data-label=\"Transport\"><span class=\"tag\">{}</span></td>\
             <td class=\"left wide\" data-label=\"Address\"><code>{}</code></td>\
             <td class=\"left\" data-label=\"Service\">{}</td>\
             <td class=\"sessions\" data-label=\"Sessions\">{}</td>\
             <td data-label=\"Accepted\">{}<span class=\"note\">{}</span></td>\
             <td data-label=\"Refused\">{}<span class=\"note\">{reasons}</span></td>\
             <td data-label=\"In\">{}<span class=\"note\">{}/s</span></td>\
             <td data-label=\"Out\">{}<span class=\"note\">{}/s</span></td></tr>",
            l.sessions_open,
            esc(l.transport),
            esc(&l.addr),
            esc(&l.service),
            count(l.sessions_open),
            count(l.accepted),
            rate(l.accepted_per_second),
            count(refused),
            bytes(l.bytes_in as f64),
            bytes(l.bytes_in_per_second),
            bytes(l.bytes_out as f64),
            bytes(l.bytes_out_per_second),
        );
    }
    out.push_str("</tbody></table></div></section><div class=\"grid2\">");

    out.push_str(
        "<section><h2>Event loops<small>busy = not waiting in epoll_wait</small></h2>\
         <div class=\"scroll\"><table><thead><tr><th>Loop</th><th>Sessions</th>\
         <th class=\"left\">Busy</th></tr></thead><tbody>",
    );
    for l in &report.event_loops {
        let percent = l.busy_share * 100.0;
        let _ = write!(
            out,
            "<tr id=\"loop-{}\" data-sessions=\"{}\"><td>#{}</td><td>{}</td>\
             <td class=\"left\"><span class=\"bar\"><i class=\"w{}\"></i></span>\
             {percent:.1}%</td></tr>",
            l.index,
            l.sessions_open,
            l.index,
            count(l.sessions_open),
            bar_step(percent),
        );
    }
    out.push_str("</tbody></table></div></section>");

    out.push_str(
        "<section><h2>HTTP<small>this service</small></h2><div class=\"scroll\"><table>\
         <thead><tr><th>Status</th><th>Responses</th><th>Latency</th><th>Value</th></tr></thead>\
         <tbody>",
    );
    let latency = [
        ("mean", http.latency.mean_ms),
        ("p50", http.latency.p50_ms),
        ("p90", http.latency.p90_ms),
        ("p99", http.latency.p99_ms),
    ];
    let classes: Vec<(&String, &u64)> = http.responses.iter().collect();
    for row in 0..classes.len().max(latency.len()) {
        let (class, n) = classes
            .get(row)
            .map_or((String::new(), String::new()), |(c, n)| {
                (esc(c), count(**n))
            });
        let (label, value) = latency
            .get(row)
            .map_or((String::new(), String::new()), |(l, v)| {
                (l.to_string(), ms(*v))
            });
        let _ = write!(
            out,
            "<tr><td>{class}</td><td id=\"http-{class}\">{n}</td><td>{label}</td><td>{value}</td></tr>"
        );
    }
    let rejected: Vec<String> = http
        .rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(status, n)| format!("{} × {}", esc(status), count(*n)))
        .collect();
    let _ = write!(
        out,
        "<tr><td>rejected</td><td colspan=\"3\" class=\"left\">{}</td></tr>",
        if rejected.is_empty() {
            "none".to_owned()
        } else {
            rejected.join(" · ")
        }
    );
    out.push_str("</tbody></table></div></section>");

    let to = &report.timeouts;
    let closed = &report.sessions_closed;
    out.push_str("<section><h2>Timeouts and closes</h2><div class=\"scroll\"><table><tbody>");
    for (label, value) in [
        ("idle timeout", to.idle),
        ("handshake timeout", to.handshake),
        ("upstream connect timeout", to.upstream_connect),
        ("outbound overflow", closed.outbound_overflow),
        ("socket error", closed.io_error),
        ("cut off at shutdown", closed.shutdown_forced),
        ("handler panic", closed.handler_panic),
    ] {
        let _ = write!(out, "<tr><td>{label}</td><td>{}</td></tr>", count(value));
    }
    out.push_str("</tbody></table></div></section></div>");
    let _ = writeln!(
        out,
        "<footer>Refreshes every {REFRESH_SECONDS} s · the same counters as \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/status.json\">/status.json</a></footer>\
         </main></body></html>"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_histogram_quantile() {
        let mut buckets = vec![0u64; LATENCY_BUCKETS.len()];
        assert_eq!(quantile_ms(&buckets, 0, 0.5), None);
        // 10 observations in (0.05 ms, 0.1 ms]: the median is halfway.
        buckets[1] = 10;
        let p50 = quantile_ms(&buckets, 10, 0.5).unwrap();
        assert!((p50 - 0.075).abs() < 1e-9, "{p50}");
        // One slow observation above every bound counts as the last bound.
        let p99 = quantile_ms(&buckets, 11, 0.99).unwrap();
        assert!((p99 - 2500.0).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(count(123_456), "123,456");
        assert_eq!(count(0), "0");
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(1_500_000.0), "1.50 MB");
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(duration(59), "59s");
    }

    #[test]
    fn the_page_escapes_listener_names_and_has_no_external_asset_or_script() {
        let mut status = ServerStatus::default();
        status.metrics.listeners.push(plexus::ListenerSnapshot {
            name: "<script>x</script>".into(),
            transport: "tcp",
            addr: "127.0.0.1:1".parse().unwrap(),
            service: "echo".into(),
            sessions_open: 0,
            accepted: 0,
            refused: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
            protocol_groups: Vec::new(),
        });
        let page = StatusPage::new(&HttpConfig::default());
        let html = render_html(&build(&status, &HttpStats::default(), &page));
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("src=") && !html.contains("@import"));
        // The policy admits one style sheet by its hash: no style attribute, one <style>.
        assert!(!html.contains(" style="), "{html}");
        assert_eq!(html.matches("<style>").count(), 1);
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
    }

    #[test]
    fn the_default_allow_list_is_loopback_and_an_empty_one_permits_nobody() {
        let page = StatusPage::new(&HttpConfig::default());
        assert!(page.permits("127.0.0.1".parse().unwrap()));
        assert!(page.permits("::1".parse().unwrap()));
        assert!(page.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!page.permits("10.0.0.1".parse().unwrap()));
        let closed = StatusPage::new(&HttpConfig {
            status_allow: Vec::new(),
            ..HttpConfig::default()
        });
        assert!(!closed.permits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_policy_allows_exactly_the_page_style_sheet_by_its_hash() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        // base64(SHA-256(STYLE)), computed by openssl, not by code of ours.
        let mut digest = Command::new("openssl")
            .args(["dgst", "-sha256", "-binary"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl");
        digest
            .stdin
            .take()
            .unwrap()
            .write_all(STYLE.as_bytes())
            .unwrap();
        let binary = digest.wait_with_output().unwrap().stdout;
        let mut encode = Command::new("openssl")
            .args(["base64", "-A"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl");
        encode.stdin.take().unwrap().write_all(&binary).unwrap();
        let hash = String::from_utf8(encode.wait_with_output().unwrap().stdout).unwrap();
        assert_eq!(hash.len(), 44, "{hash:?}");
        assert!(
            CONTENT_SECURITY_POLICY.contains(&format!("style-src 'sha256-{hash}';")),
            "STYLE changed: its hash is now sha256-{hash}"
        );
        assert!(
            !CONTENT_SECURITY_POLICY.contains("-inline"),
            "no inline allowance"
        );
    }

    #[test]
    fn the_page_has_no_inline_style_attribute_and_bars_step_by_five_percent() {
        assert_eq!(bar_step(0.0), 0);
        assert_eq!(bar_step(2.4), 0);
        assert_eq!(bar_step(2.6), 5);
        assert_eq!(bar_step(99.0), 100);
        assert_eq!(bar_step(250.0), 100);
        assert_eq!(bar_step(-1.0), 0);
        assert_eq!(bar_step(f64::NAN), 0);
        for step in (0..=100).step_by(5) {
            assert!(
                STYLE.contains(&format!(".w{step}{{width:{step}%}}")),
                "{step}"
            );
        }
    }
}
