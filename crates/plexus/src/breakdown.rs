//! The server's counters broken down per listener and per event loop, and the facts about the
//! process (version, start time, configuration source, last reload) shown next to them by
//! `/metrics` and the status page.
//!
//! Per-listener bytes and open sessions are counted by the event loops on the hot path, so
//! each listener keeps one cache-line-sized shard per loop: loops serving the same listener
//! never write the same line, and each shard has one writer (a relaxed load and store, no
//! locked instruction, as in `LoopStats`). Loops past [`SHARDS`] share one last shard with
//! atomic adds. Admission counts (accepted, refused) are rare and written by the acceptor or a
//! loop directly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::prometheus::{family, sample};
use crate::refusal::{RefusalCounts, RefusalReason};

/// Single-writer shards per listener (one per event loop); loops beyond share one more.
const SHARDS: usize = 64;

/// One loop's share of a listener's hot counters, alone on its cache line(s).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    sessions_open: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// The listener a session arrived on.
#[derive(Debug)]
pub(crate) struct ListenerInfo {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    /// Its share of the counters (sessions, admission, bytes), for `/metrics` and `/status`.
    pub(crate) stats: ListenerStats,
}

/// The counters of one listener.
#[derive(Debug)]
pub(crate) struct ListenerStats {
    shards: Box<[Shard; SHARDS]>,
    /// Written by every loop from index [`SHARDS`] on, with atomic adds.
    shared: Shard,
    accepted: AtomicU64,
    refused: RefusalCounts,
}

impl Default for ListenerStats {
    fn default() -> Self {
        ListenerStats {
            shards: Box::new(std::array::from_fn(|_| Shard::default())),
            shared: Shard::default(),
            accepted: AtomicU64::new(0),
            refused: Default::default(),
        }
    }
}

impl ListenerStats {
    /// Adds `n` (wrapping) to `field` of loop `event_loop`'s shard.
    fn add(&self, event_loop: usize, field: fn(&Shard) -> &AtomicU64, n: u64) {
        match self.shards.get(event_loop) {
            // Only this loop's thread writes its shard.
            Some(shard) => {
                let counter = field(shard);
                counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
            }
            None => {
                field(&self.shared).fetch_add(n, Relaxed);
            }
        }
    }

    pub(crate) fn received(&self, event_loop: usize, bytes: u64) {
        self.add(event_loop, |s| &s.bytes_in, bytes);
    }

    pub(crate) fn sent(&self, event_loop: usize, bytes: u64) {
        self.add(event_loop, |s| &s.bytes_out, bytes);
    }

    pub(crate) fn opened(&self, event_loop: usize) {
        self.add(event_loop, |s| &s.sessions_open, 1);
    }

    /// A session opened by [`ListenerStats::opened`] on the same loop ended.
    pub(crate) fn closed(&self, event_loop: usize) {
        self.add(event_loop, |s| &s.sessions_open, 1u64.wrapping_neg());
    }

    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.refused.add(reason);
    }

    /// Connections of this listener admitted so far.
    #[cfg(test)]
    pub(crate) fn accepted_count(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Connections of this listener refused so far, by reason.
    #[cfg(test)]
    pub(crate) fn refusals(&self) -> &RefusalCounts {
        &self.refused
    }

    fn sum(&self, field: fn(&Shard) -> &AtomicU64) -> u64 {
        let shards = self.shards.iter().chain([&self.shared]);
        shards.fold(0u64, |sum, shard| {
            sum.wrapping_add(field(shard).load(Relaxed))
        })
    }
}

/// A listener as the status page lists it.
#[derive(Debug, Clone)]
pub(crate) struct ListenerEntry {
    pub(crate) info: Arc<ListenerInfo>,
    pub(crate) transport: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) service: String,
}

/// How the last reload (SIGHUP) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// When it ended, in seconds since the Unix epoch.
    pub at_unix_seconds: u64,
    /// Whether the new configuration was applied.
    pub ok: bool,
    /// What the log said about it.
    pub message: String,
}

/// Facts about the process and its listeners, alongside the counters.
#[derive(Debug)]
pub(crate) struct ServerFacts {
    pub(crate) started: Instant,
    pub(crate) started_at: SystemTime,
    /// The configuration file, or `<embedded default>`.
    pub(crate) config_source: OnceLock<String>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    listeners: Mutex<Vec<ListenerEntry>>,
}

impl Default for ServerFacts {
    fn default() -> Self {
        ServerFacts {
            started: Instant::now(),
            started_at: SystemTime::now(),
            config_source: OnceLock::new(),
            last_reload: Mutex::new(None),
            listeners: Mutex::new(Vec::new()),
        }
    }
}

impl ServerFacts {
    pub(crate) fn add_listener(&self, entry: ListenerEntry) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
    }

    /// A listener removed by a reload leaves the breakdown (its sessions stay in the totals).
    pub(crate) fn remove_listener(&self, name: &str) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|entry| &*entry.info.name != name);
    }

    pub(crate) fn record_reload(&self, ok: bool, message: String) {
        let at_unix_seconds = unix_seconds(SystemTime::now());
        *self
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ReloadOutcome {
            at_unix_seconds,
            ok,
            message,
        });
    }

    pub(crate) fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn listeners(&self) -> Vec<ListenerSnapshot> {
        let entries = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut entries = entries;
        // Configuration order (indexes), whichever transport was registered first.
        entries.sort_by_key(|entry| entry.info.index);
        entries
            .iter()
            .map(|entry| {
                let stats = &entry.info.stats;
                ListenerSnapshot {
                    name: entry.info.name.to_string(),
                    transport: entry.transport,
                    addr: entry.addr,
                    service: entry.service.clone(),
                    sessions_open: stats.sum(|s| &s.sessions_open),
                    accepted: stats.accepted.load(Relaxed),
                    refused: stats.refused.snapshot(),
                    bytes_in: stats.sum(|s| &s.bytes_in),
                    bytes_out: stats.sum(|s| &s.bytes_out),
                }
            })
            .collect()
    }
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One listener's counters at a point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// The listener's name.
    pub name: String,
    /// `tcp`, `tls`, `udp` or `dtls`.
    pub transport: &'static str,
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
    /// The service name from the configuration.
    pub service: String,
    /// Sessions of this listener open now.
    pub sessions_open: u64,
    /// Connections (or datagram peers) of this listener admitted since start.
    pub accepted: u64,
    /// Connections of this listener refused since start, by reason.
    pub refused: Vec<(RefusalReason, u64)>,
    /// Bytes read from this listener's peers.
    pub bytes_in: u64,
    /// Bytes written to this listener's peers.
    pub bytes_out: u64,
}

/// One event loop's counters at a point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopSnapshot {
    /// The loop's index (0-based).
    pub index: usize,
    /// Sessions the loop owns now (every transport).
    pub sessions_open: u64,
    /// Nanoseconds the loop spent waiting in `epoll_wait` since start (a wait in progress
    /// included): the rest of its life it was busy.
    pub poll_wait_nanos: u64,
}

/// Nanoseconds since a process-wide origin, for timestamps shared between threads.
pub(crate) fn clock_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The breakdown families of `/metrics`, after the totals.
pub(crate) fn write_prometheus(
    out: &mut String,
    listeners: &[ListenerSnapshot],
    loops: &[LoopSnapshot],
    started_unix_seconds: u64,
) {
    family(
        out,
        "build_info",
        "gauge",
        "Always 1; the version is a label.",
    );
    sample(
        out,
        "build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    family(
        out,
        "start_time_seconds",
        "gauge",
        "When the server started, in seconds since the Unix epoch.",
    );
    sample(out, "start_time_seconds", &[], started_unix_seconds);
    family(
        out,
        "listener_sessions_open",
        "gauge",
        "Sessions open now, by listener.",
    );
    for l in listeners {
        let labels = [("listener", l.name.as_str()), ("transport", l.transport)];
        sample(out, "listener_sessions_open", &labels, l.sessions_open);
    }
    family(
        out,
        "listener_connections_accepted_total",
        "counter",
        "Connections (datagram peers) admitted, by listener.",
    );
    for l in listeners {
        let labels = [("listener", l.name.as_str())];
        sample(
            out,
            "listener_connections_accepted_total",
            &labels,
            l.accepted,
        );
    }
    family(
        out,
        "listener_connections_refused_total",
        "counter",
        "Connections refused, by listener and reason.",
    );
    for l in listeners {
        for (reason, count) in &l.refused {
            let labels = [("listener", l.name.as_str()), ("reason", reason.as_str())];
            sample(out, "listener_connections_refused_total", &labels, *count);
        }
    }
    let received: fn(&ListenerSnapshot) -> u64 = |l| l.bytes_in;
    let sent: fn(&ListenerSnapshot) -> u64 = |l| l.bytes_out;
    for (name, help, pick) in [
        (
            "listener_bytes_received_total",
            "Bytes read from peers, by listener.",
            received,
        ),
        (
            "listener_bytes_sent_total",
            "Bytes written to peers, by listener.",
            sent,
        ),
    ] {
        family(out, name, "counter", help);
        for l in listeners {
            sample(out, name, &[("listener", l.name.as_str())], pick(l));
        }
    }
    family(
        out,
        "event_loop_sessions_open",
        "gauge",
        "Sessions each event loop owns now.",
    );
    for l in loops {
        let index = l.index.to_string();
        sample(
            out,
            "event_loop_sessions_open",
            &[("loop", &index)],
            l.sessions_open,
        );
    }
    use std::fmt::Write;
    let name = "plexus_event_loop_poll_wait_seconds_total";
    let _ = writeln!(
        out,
        "# HELP {name} Time each event loop spent waiting in epoll_wait; busy share = 1 - rate(this).\n\
         # TYPE {name} counter"
    );
    for l in loops {
        let _ = writeln!(
            out,
            "{name}{{loop=\"{}\"}} {:.6}",
            l.index,
            l.poll_wait_nanos as f64 / 1e9
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_counters_sum_over_every_loop_and_closing_on_the_opening_loop_balances() {
        let stats = ListenerStats::default();
        // More loops than shards: the last ones share the atomic shard.
        for event_loop in 0..70 {
            stats.opened(event_loop);
            stats.received(event_loop, 10);
            stats.sent(event_loop, 3);
        }
        for event_loop in 0..69 {
            stats.closed(event_loop);
        }
        assert_eq!(stats.sum(|s| &s.sessions_open), 1);
        assert_eq!(stats.sum(|s| &s.bytes_in), 700);
        assert_eq!(stats.sum(|s| &s.bytes_out), 210);
        assert!(std::mem::align_of::<Shard>() >= 64);
    }

    #[test]
    fn breakdown_families_are_typed_and_labelled() {
        let listener = ListenerSnapshot {
            name: "we\"b".into(),
            transport: "tcp",
            addr: "127.0.0.1:80".parse().unwrap(),
            service: "http".into(),
            sessions_open: 2,
            accepted: 5,
            refused: vec![(RefusalReason::Acl, 1)],
            bytes_in: 7,
            bytes_out: 9,
        };
        let event_loop = LoopSnapshot {
            index: 0,
            sessions_open: 2,
            poll_wait_nanos: 1_500_000_000,
        };
        let mut out = String::new();
        write_prometheus(&mut out, &[listener], &[event_loop], 42);
        assert!(
            out.contains(
                "plexus_listener_sessions_open{listener=\"we\\\"b\",transport=\"tcp\"} 2\n"
            ),
            "{out}"
        );
        assert!(out.contains(
            "plexus_listener_connections_refused_total{listener=\"we\\\"b\",reason=\"acl\"} 1\n"
        ));
        assert!(out.contains("plexus_event_loop_poll_wait_seconds_total{loop=\"0\"} 1.500000\n"));
        assert!(out.contains("plexus_start_time_seconds 42\n"));
    }
}
