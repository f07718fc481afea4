//! What a bench run produces: errors counted by kind ([`Fail`], [`Errors`]), the latency
//! histogram ([`Latency`]), and the [`Outcome`] rendered as the human table (stderr) and the
//! one JSON line (stdout).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use super::Plan;

/// Individual error messages printed before the rest are only counted.
const MAX_ERROR_LOGS: u64 = 10;

/// Why one connection (or message) failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// Connection refused (nothing listening, or refused by the server's admission).
    Refused,
    /// Reset or broken pipe.
    Reset,
    /// A connect, handshake or reply did not happen in time.
    Timeout,
    /// The server closed the connection while replies were outstanding.
    Eof,
    /// A reply differed from what was sent (or expected).
    Mismatch(String),
    /// The TLS layer failed (certificate, alert, protocol).
    Tls(String),
    /// An HTTP response was malformed or not 2xx.
    Http(String),
    /// Any other socket error.
    Io(io::Error),
}

/// Every error kind, in the order the JSON lists them (all present, zeros included).
const KINDS: [&str; 8] = [
    "refused", "reset", "timeout", "eof", "mismatch", "tls", "http", "other",
];

impl Fail {
    /// Classifies a socket error.
    pub(crate) fn from_io(err: io::Error) -> Fail {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Fail::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Fail::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Fail::Timeout,
            io::ErrorKind::UnexpectedEof => Fail::Eof,
            _ => Fail::Io(err),
        }
    }

    /// The JSON key this failure is counted under.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Fail::Refused => "refused",
            Fail::Reset => "reset",
            Fail::Timeout => "timeout",
            Fail::Eof => "eof",
            Fail::Mismatch(_) => "mismatch",
            Fail::Tls(_) => "tls",
            Fail::Http(_) => "http",
            Fail::Io(_) => "other",
        }
    }
}

impl From<io::Error> for Fail {
    fn from(err: io::Error) -> Fail {
        Fail::from_io(err)
    }
}

impl From<rustls::Error> for Fail {
    fn from(err: rustls::Error) -> Fail {
        Fail::Tls(err.to_string())
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Refused => f.write_str("connection refused"),
            Fail::Reset => f.write_str("connection reset by the server"),
            Fail::Timeout => f.write_str("timed out"),
            Fail::Eof => f.write_str("the server closed the connection with replies outstanding"),
            Fail::Mismatch(what) => write!(f, "reply mismatch: {what}"),
            Fail::Tls(what) => write!(f, "TLS: {what}"),
            Fail::Http(what) => write!(f, "HTTP: {what}"),
            Fail::Io(err) => write!(f, "{err}"),
        }
    }
}

/// Errors counted by kind; the first few are printed on stderr as they happen.
#[derive(Debug, Default)]
pub(crate) struct Errors {
    counts: BTreeMap<&'static str, u64>,
}

impl Errors {
    /// Counts `fail` (of connection `conn`), printing it while few errors have been seen.
    pub(crate) fn add(&mut self, conn: usize, fail: &Fail) {
        *self.counts.entry(fail.kind()).or_default() += 1;
        let total = self.total();
        if total <= MAX_ERROR_LOGS {
            eprintln!("plexus bench: connection {conn}: {fail}");
        } else if total == MAX_ERROR_LOGS + 1 {
            eprintln!("plexus bench: further errors are only counted");
        }
    }

    /// Counts `n` errors of `kind` without printing each.
    pub(crate) fn add_n(&mut self, kind: &'static str, n: u64) {
        if n > 0 {
            *self.counts.entry(kind).or_default() += n;
        }
    }

    pub(crate) fn merge(&mut self, other: &Errors) {
        for (kind, n) in &other.counts {
            *self.counts.entry(kind).or_default() += n;
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    fn json(&self) -> Value {
        let mut map = Map::new();
        for kind in KINDS {
            map.insert(
                kind.into(),
                json!(self.counts.get(kind).copied().unwrap_or(0)),
            );
        }
        Value::Object(map)
    }

    fn human(&self) -> String {
        if self.total() == 0 {
            return "0".into();
        }
        let parts: Vec<String> = self
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        format!("{} ({})", self.total(), parts.join(", "))
    }
}

/// A latency histogram in nanoseconds (1 ns to 1 hour, 3 significant digits).
pub(crate) struct Latency {
    hist: Histogram<u64>,
}

impl fmt::Debug for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Latency({} samples)", self.hist.len())
    }
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

impl Latency {
    pub(crate) fn new() -> Latency {
        // Constant bounds within hdrhistogram's limits: this cannot fail.
        let hist = Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
            .expect("valid constant histogram bounds");
        Latency { hist }
    }

    pub(crate) fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.max(1));
    }

    pub(crate) fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds, so adding cannot fail; if it did the samples
        // would only be missing from the percentiles.
        let _ = self.hist.add(&other.hist);
    }

    pub(crate) fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Writes [`Latency::percentile_distribution`] to `path`.
    pub(crate) fn write_hdr_file(&self, path: &std::path::Path) -> io::Result<()> {
        std::fs::write(path, self.percentile_distribution())
    }

    /// The histogram in HdrHistogram's percentile-distribution text format (what Java's
    /// `outputPercentileDistribution` prints, 5 ticks per half distance, values scaled from
    /// nanoseconds to microseconds): `Value Percentile TotalCount 1/(1-Percentile)` rows, then
    /// the `#[Mean …]`, `#[Max …, Total count …]` and `#[Buckets …]` footer.
    pub(crate) fn percentile_distribution(&self) -> String {
        use std::fmt::Write;
        const SCALE: f64 = 1000.0;
        let mut out = String::new();
        let _ = write!(
            out,
            "{:>12} {:>14} {:>10} {:>14}\n\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        if !self.hist.is_empty() {
            let mut total = 0u64;
            for step in self.hist.iter_quantiles(5) {
                total += step.count_since_last_iteration();
                let value = step.value_iterated_to() as f64 / SCALE;
                let quantile = step.quantile_iterated_to();
                if quantile < 1.0 {
                    let _ = writeln!(
                        out,
                        "{value:12.3} {quantile:2.12} {total:10} {:14.2}",
                        1.0 / (1.0 - quantile)
                    );
                } else {
                    let _ = writeln!(out, "{value:12.3} {quantile:2.12} {total:10}");
                }
            }
        }
        let (mean, stdev, max) = match self.hist.is_empty() {
            true => (0.0, 0.0, 0.0),
            false => (
                self.hist.mean() / SCALE,
                self.hist.stdev() / SCALE,
                self.hist.max() as f64 / SCALE,
            ),
        };
        let sub_buckets = 2u64.pow(
            (2.0 * 10f64.powi(i32::from(self.hist.sigfig())))
                .log2()
                .ceil() as u32,
        );
        let _ = writeln!(
            out,
            "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]\n\
             #[Max     = {max:12.3}, Total count    = {:12}]\n\
             #[Buckets = {:12}, SubBuckets     = {sub_buckets:12}]",
            self.hist.len(),
            self.hist.buckets(),
        );
        out
    }

    fn us(&self, ns: u64) -> f64 {
        (ns as f64 / 1000.0 * 100.0).round() / 100.0
    }

    fn json(&self) -> Value {
        if self.hist.is_empty() {
            return json!({"p50": null, "p90": null, "p99": null, "p999": null, "max": null,
                          "mean": null});
        }
        json!({
            "p50": self.us(self.hist.value_at_quantile(0.50)),
            "p90": self.us(self.hist.value_at_quantile(0.90)),
            "p99": self.us(self.hist.value_at_quantile(0.99)),
            "p999": self.us(self.hist.value_at_quantile(0.999)),
            "max": self.us(self.hist.max()),
            "mean": (self.hist.mean() / 10.0).round() / 100.0,
        })
    }

    fn human(&self) -> String {
        if self.hist.is_empty() {
            return "no samples".into();
        }
        format!(
            "p50 {} · p90 {} · p99 {} · p99.9 {} · max {} · mean {} µs",
            self.us(self.hist.value_at_quantile(0.50)),
            self.us(self.hist.value_at_quantile(0.90)),
            self.us(self.hist.value_at_quantile(0.99)),
            self.us(self.hist.value_at_quantile(0.999)),
            self.us(self.hist.max()),
            (self.hist.mean() / 10.0).round() / 100.0,
        )
    }
}

/// The result of a run, whatever the mode.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// What was counted: "messages", "requests", "handshakes", "sockets", "datagrams".
    pub(crate) unit: &'static str,
    /// How many completed inside the measured window.
    pub(crate) count: u64,
    /// Payload bytes received inside the measured window.
    pub(crate) bytes: u64,
    /// The measured window (seconds of throughput).
    pub(crate) window: Duration,
    pub(crate) errors: Errors,
    pub(crate) latency: Latency,
    /// Every reply byte was checked (and no check failed).
    pub(crate) verified: bool,
    /// Whether errors make the run fail (load modes) or are findings (floods).
    pub(crate) errors_fail: bool,
    /// Mode-specific figures, added to the JSON and the table in this order.
    pub(crate) extra: Vec<(&'static str, Value)>,
}

impl Outcome {
    pub(crate) fn new(unit: &'static str) -> Outcome {
        Outcome {
            unit,
            count: 0,
            bytes: 0,
            window: Duration::ZERO,
            errors: Errors::default(),
            latency: Latency::new(),
            verified: false,
            errors_fail: true,
            extra: Vec::new(),
        }
    }

    pub(crate) fn extra(&mut self, key: &'static str, value: Value) {
        self.extra.push((key, value));
    }

    fn throughput(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.count as f64 / secs
        } else {
            0.0
        }
    }

    /// Exit status 1: load modes with any error.
    pub(crate) fn failed(&self) -> bool {
        self.errors_fail && self.errors.total() > 0
    }

    /// The one JSON line.
    pub(crate) fn json(&self, plan: &Plan) -> String {
        let mut map = Map::new();
        map.insert("mode".into(), json!(plan.mode.name()));
        map.insert("addr".into(), json!(plan.addr.to_string()));
        map.insert("connections".into(), json!(plan.connections));
        map.insert("size".into(), json!(plan.size));
        map.insert("pipeline".into(), json!(plan.pipeline));
        map.insert("rate".into(), json!(plan.rate));
        map.insert(
            "duration_s".into(),
            json!((self.window.as_secs_f64() * 1000.0).round() / 1000.0),
        );
        map.insert(self.unit.into(), json!(self.count));
        map.insert("bytes".into(), json!(self.bytes));
        map.insert(
            "throughput_per_s".into(),
            json!((self.throughput() * 10.0).round() / 10.0),
        );
        map.insert(
            "bytes_per_s".into(),
            json!(if self.window.is_zero() {
                0.0
            } else {
                (self.bytes as f64 / self.window.as_secs_f64()).round()
            }),
        );
        map.insert("errors".into(), self.errors.json());
        map.insert("errors_total".into(), json!(self.errors.total()));
        map.insert("latency_us".into(), self.latency.json());
        map.insert("verified".into(), json!(self.verified));
        for (key, value) in &self.extra {
            map.insert((*key).into(), value.clone());
        }
        Value::Object(map).to_string()
    }

    /// The human table (stderr).
    pub(crate) fn table(&self, plan: &Plan) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("mode".into(), plan.mode.name().into()),
            ("target".into(), plan.addr.to_string()),
            (
                "load".into(),
                format!(
                    "{} connections × {} B, pipeline {}, {}",
                    plan.connections,
                    plan.size,
                    plan.pipeline,
                    match plan.rate {
                        Some(rate) => format!("open loop at {rate} /s"),
                        None => "closed loop".into(),
                    }
                ),
            ),
            (
                "window".into(),
                format!("{:.2} s", self.window.as_secs_f64()),
            ),
            (self.unit.into(), self.count.to_string()),
            (
                "throughput".into(),
                format!(
                    "{:.0} {}/s, {:.1} MB/s",
                    self.throughput(),
                    self.unit,
                    if self.window.is_zero() {
                        0.0
                    } else {
                        self.bytes as f64 / self.window.as_secs_f64() / 1e6
                    }
                ),
            ),
        ];
        if self.latency.count() > 0 {
            rows.push(("latency".into(), self.latency.human()));
        }
        rows.push(("errors".into(), self.errors.human()));
        rows.push(("verified".into(), self.verified.to_string()));
        for (key, value) in &self.extra {
            let shown = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            rows.push(((*key).into(), shown));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in rows {
            out.push_str(&format!("  {key:<width$}  {value}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_distribution_is_hdrhistograms_text_format() {
        let mut latency = Latency::new();
        for us in 1..=1000 {
            latency.record(Duration::from_micros(us));
        }
        let text = latency.percentile_distribution();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let rows: Vec<Vec<&str>> = lines
            .clone()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() > 20, "{text}");
        // Percentiles and counts never go down; the last row is 100% of the samples and has
        // no 1/(1-Percentile) column.
        for pair in rows.windows(2) {
            let p = |r: &Vec<&str>| r[1].parse::<f64>().unwrap();
            let c = |r: &Vec<&str>| r[2].parse::<u64>().unwrap();
            assert!(p(&pair[1]) >= p(&pair[0]) && c(&pair[1]) >= c(&pair[0]));
        }
        let last = rows.last().unwrap();
        assert_eq!(
            (last.len(), last[1], last[2]),
            (3, "1.000000000000", "1000")
        );
        let max: f64 = last[0].parse().unwrap();
        assert!((999.0..=1001.0).contains(&max), "{max}");
        assert!(text.contains("#[Max     = "), "{text}");
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.contains("#[Mean    =      500."), "{text}");
    }
}
