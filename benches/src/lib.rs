//! Shared helpers for the plexus benchmark binaries.
//!
//! The crate ships these binaries (see `src/bin/`):
//!
//! * `tokio-echo` — the idiomatic tokio echo server, used as the reference;
//! * `tokio-rustls-echo` — the same over TLS (tokio-rustls, aws-lc-rs);
//! * `mio-echo` — a minimal hand-written single-threaded mio echo loop, the
//!   "how fast can the bare event loop go" baseline;
//! * `monoio-echo` — the io_uring anchor: a monoio (io_uring driver) echo server;
//! * `udp-sockets-echo` — a UDP echo loop per thread, one `SO_REUSEPORT` socket each
//!   or one shared socket;
//! * `echo-load` — the closed-loop load generator that drives any of them
//!   (`--tls` for the TLS servers);
//! * `handshake-load` — TLS handshakes per second (full or resumed).
//!
//! This library only holds the small pieces they share: a tiny
//! `--flag value` command-line parser (to keep the dependency graph and the
//! build time small on a 2-core machine), a human duration parser, and the
//! TLS helpers in [`tls`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

pub mod tls;

/// A command-line error: printed with the usage text, exit status 2.
#[derive(Debug)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

/// Parsed `--name value` / `--name=value` options and `--flag` switches.
///
/// Every option takes exactly one value, except the names declared as flags
/// (see [`Args::from_env_with_flags`]), which take none; `--help`/`-h` is
/// reported through [`Args::help`]. Unknown options are rejected by
/// [`Args::finish`], so a typo never silently falls back to a default.
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, String>,
    flags: HashSet<String>,
    help: bool,
}

impl Args {
    /// Parses the process arguments (without the program name).
    pub fn from_env() -> Result<Self, ArgError> {
        Self::parse(std::env::args().skip(1))
    }

    /// Parses the process arguments, treating `--NAME` for every NAME in
    /// `flags` as a switch without a value.
    pub fn from_env_with_flags(flags: &[&str]) -> Result<Self, ArgError> {
        Self::parse_with_flags(std::env::args().skip(1), flags)
    }

    /// Parses an explicit argument list (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ArgError> {
        Self::parse_with_flags(args, &[])
    }

    /// Parses an explicit argument list; the names in `flags` take no value.
    pub fn parse_with_flags<I: IntoIterator<Item = String>>(
        args: I,
        flags: &[&str],
    ) -> Result<Self, ArgError> {
        let mut out = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            if arg == "--help" || arg == "-h" {
                out.help = true;
                continue;
            }
            let Some(name) = arg.strip_prefix("--") else {
                return Err(ArgError(format!("unexpected argument `{arg}`")));
            };
            if flags.contains(&name) {
                if !out.flags.insert(name.to_owned()) {
                    return Err(ArgError(format!("option `--{name}` given twice")));
                }
                continue;
            }
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| ArgError(format!("option `--{name}` needs a value")))?;
                    (name.to_owned(), v)
                }
            };
            if out.values.insert(name.clone(), value).is_some() {
                return Err(ArgError(format!("option `--{name}` given twice")));
            }
        }
        Ok(out)
    }

    /// Whether `--help` or `-h` was given.
    pub fn help(&self) -> bool {
        self.help
    }

    /// Removes the switch `--name` (declared as a flag) and tells whether it was given.
    pub fn take_flag(&mut self, name: &str) -> bool {
        self.flags.remove(name)
    }

    /// Removes and returns the raw value of `--name`, if given.
    pub fn take(&mut self, name: &str) -> Option<String> {
        self.values.remove(name)
    }

    /// Removes `--name` and parses it with [`std::str::FromStr`], or returns `default`.
    pub fn take_parsed<T>(&mut self, name: &str, default: T) -> Result<T, ArgError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        match self.take(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| ArgError(format!("invalid value `{v}` for `--{name}`: {e}"))),
        }
    }

    /// Removes `--name` and parses it with [`parse_duration`], or returns `default`.
    pub fn take_duration(&mut self, name: &str, default: Duration) -> Result<Duration, ArgError> {
        match self.take(name) {
            None => Ok(default),
            Some(v) => parse_duration(&v)
                .ok_or_else(|| ArgError(format!("invalid duration `{v}` for `--{name}`"))),
        }
    }

    /// Fails if any option was given that no `take*` call consumed.
    pub fn finish(self) -> Result<(), ArgError> {
        let mut left: Vec<_> = self.values.into_keys().chain(self.flags).collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(ArgError(format!(
            "unknown option(s): --{}",
            left.join(", --")
        )))
    }
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => num,
        "ms" => num / 1e3,
        "us" | "µs" => num / 1e6,
        "m" | "min" => num * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Reads this thread's CPU time (ns) from `/proc/thread-self/schedstat`.
pub fn cpu_time_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Latency summary of a histogram of nanoseconds, in microseconds (all
/// zero for an empty histogram).
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// Summarises `h` (values in nanoseconds).
    pub fn from_hist(h: &hdrhistogram::Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// Prints `message` and `usage` on stderr and exits with status 2.
pub fn usage_exit(message: &str, usage: &str) -> ! {
    if !message.is_empty() {
        eprintln!("error: {message}");
    }
    eprintln!("{usage}");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::parse(v.iter().map(|s| s.to_string())).expect("parse")
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("3h"), None);
    }

    #[test]
    fn options() {
        let mut a = args(&["--addr", "127.0.0.1:1", "--threads=2"]);
        assert_eq!(a.take("addr").as_deref(), Some("127.0.0.1:1"));
        assert_eq!(a.take_parsed("threads", 1usize).expect("threads"), 2);
        assert_eq!(a.take_parsed("size", 64usize).expect("size"), 64);
        a.finish().expect("nothing left");
        let a = args(&["--bogus", "1"]);
        assert!(a.finish().is_err());
        assert!(Args::parse(["--addr".to_string()]).is_err());
        assert!(Args::parse(["stray".to_string()]).is_err());
    }

    #[test]
    fn flags() {
        let v = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut a = Args::parse_with_flags(v(&["--tls", "--ca", "x.pem"]), &["tls", "resume"])
            .expect("parse");
        assert!(a.take_flag("tls"));
        assert!(!a.take_flag("resume"));
        assert_eq!(a.take("ca").as_deref(), Some("x.pem"));
        a.finish().expect("nothing left");
        let a = Args::parse_with_flags(v(&["--tls"]), &["tls"]).expect("parse");
        assert!(
            a.finish().is_err(),
            "an unconsumed flag is an unknown option"
        );
        assert!(Args::parse_with_flags(v(&["--tls", "--tls"]), &["tls"]).is_err());
    }
}
