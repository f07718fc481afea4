//! Counters every part of the runtime updates, read as one [`MetricsSnapshot`].
//!
//! Hot-path counters (bytes, reads) live in one [`LoopStats`] per event loop, written only by
//! that loop's thread, so loops never contend on a cache line; the snapshot sums them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::breakdown::{
    self, ListenerInfo, ListenerSnapshot, LoopSnapshot, ReloadOutcome, ServerFacts,
};
use crate::connector::{UpstreamRegistry, UpstreamSnapshot, CONNECT_BUCKETS};
use crate::prometheus::{family, label_pairs, sample};
use crate::refusal::{RefusalCounts, RefusalReason};
use crate::worker::PoolStats;

/// Counters written by one event loop.
#[derive(Debug, Default)]
pub(crate) struct LoopStats {
    /// Which loop writes these (its index): also picks its shard of per-listener counters.
    pub(crate) index: usize,
    /// Time spent in `epoll_wait`, and since when the current wait runs (`clock_nanos() + 1`,
    /// 0 = not waiting): the status page's busy share.
    pub(crate) poll_wait_nanos: AtomicU64,
    pub(crate) waiting_since: AtomicU64,
    pub(crate) sessions_open: AtomicU64,
    /// Connections accepted here and passed to a less loaded loop (`event_loop/accept.rs`).
    pub(crate) sessions_passed_on: AtomicU64,
    pub(crate) tls_sessions_open: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) closed_idle_timeout: AtomicU64,
    pub(crate) closed_outbound_overflow: AtomicU64,
    pub(crate) closed_io_error: AtomicU64,
    pub(crate) closed_forced: AtomicU64,
    pub(crate) closed_upstream_timeout: AtomicU64,
    pub(crate) closed_worker_pool_full: AtomicU64,
    pub(crate) read_pauses: AtomicU64,
    /// Bytes relayed socket to socket by spliced pairs, and the pairs made.
    pub(crate) spliced_bytes: AtomicU64,
    pub(crate) spliced_pairs: AtomicU64,
    /// Times a session stopped being read because its broadcasts waited for another loop.
    pub(crate) broadcast_stalls: AtomicU64,
    pub(crate) handshakes_ok: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) handler_panics: AtomicU64,
    // datagram: counters of the udp/dtls path.
    pub(crate) datagrams_in: AtomicU64,
    pub(crate) datagrams_out: AtomicU64,
    pub(crate) datagrams_dropped_truncated: AtomicU64,
    pub(crate) datagrams_dropped_refused: AtomicU64,
    pub(crate) datagrams_dropped_overflow: AtomicU64,
    pub(crate) datagrams_dropped_send_error: AtomicU64,
    pub(crate) dtls_cookies_sent: AtomicU64,
    pub(crate) dtls_cookies_verified: AtomicU64,
    pub(crate) dtls_garbage_dropped: AtomicU64,
    pub(crate) dtls_malformed_dropped: AtomicU64,
    pub(crate) dtls_not_hello_dropped: AtomicU64,
    pub(crate) dtls_bad_record_dropped: AtomicU64,
    pub(crate) datagrams_dropped_session_cap: AtomicU64,
    pub(crate) reclaimed_for_max_datagram_sessions: AtomicU64,
    pub(crate) reclaimed_for_max_sessions: AtomicU64,
    pub(crate) reclaimed_for_per_ip: AtomicU64,
    pub(crate) reclaimed_for_max_connections: AtomicU64,
    pub(crate) udp_sessions_open: AtomicU64,
    pub(crate) dtls_sessions_open: AtomicU64,
}

impl LoopStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        // Single writer per counter: a relaxed load+store is enough and avoids a locked RMW.
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    /// The counters of loop `index`.
    pub(crate) fn for_loop(index: usize) -> LoopStats {
        LoopStats {
            index,
            ..LoopStats::default()
        }
    }

    /// Runs `wait` (the loop's `epoll_wait`) and counts the time it took as idle time.
    pub(crate) fn waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        let start = breakdown::clock_nanos();
        self.waiting_since.store(start.saturating_add(1), Relaxed);
        let result = wait();
        let waited = breakdown::clock_nanos().saturating_sub(start);
        Self::add(&self.poll_wait_nanos, waited);
        self.waiting_since.store(0, Relaxed);
        result
    }

    /// Bytes read from a peer of `listener`, counted in this loop's and the listener's totals.
    pub(crate) fn received(&self, listener: &ListenerInfo, bytes: usize) {
        Self::add(&self.bytes_in, bytes as u64);
        listener.stats.received(self.index, bytes as u64);
    }

    /// Bytes written to a peer of `listener`.
    pub(crate) fn sent(&self, listener: &ListenerInfo, bytes: usize) {
        Self::add(&self.bytes_out, bytes as u64);
        listener.stats.sent(self.index, bytes as u64);
    }

    /// A session of `listener` opened on this loop.
    pub(crate) fn opened(&self, listener: &ListenerInfo) {
        Self::add(&self.sessions_open, 1);
        listener.stats.opened(self.index);
    }

    /// A session of `listener` opened on this loop closed.
    pub(crate) fn closed(&self, listener: &ListenerInfo) {
        Self::sub(&self.sessions_open, 1);
        listener.stats.closed(self.index);
    }

    fn snapshot(&self) -> LoopSnapshot {
        let since = self.waiting_since.load(Relaxed);
        let current = match since {
            0 => 0,
            since => breakdown::clock_nanos().saturating_sub(since.saturating_sub(1)),
        };
        LoopSnapshot {
            index: self.index,
            sessions_open: self.sessions_open.load(Relaxed),
            sessions_passed_on: self.sessions_passed_on.load(Relaxed),
            poll_wait_nanos: self.poll_wait_nanos.load(Relaxed).saturating_add(current),
        }
    }
}

/// The server as a status page shows it: the counters, with the facts around them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerStatus {
    /// The counters, per listener and per event loop included.
    pub metrics: MetricsSnapshot,
    /// How long the server has run.
    pub uptime: Duration,
    /// Where the configuration came from: a file path, or `<embedded default>`.
    pub config_source: String,
    /// How the last reload (SIGHUP) ended, if there was one.
    pub last_reload: Option<ReloadOutcome>,
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: RefusalCounts,
    pub(crate) loops: Vec<Arc<LoopStats>>,
    pub(crate) pool_stats: Arc<PoolStats>,
    /// Set on SIGTERM (lameduck or drain): health checks answer 503 from then on.
    pub(crate) draining: AtomicBool,
    /// Sessions closed because a frame passed its framer's limit (rare: one shared counter,
    /// counted where `Framed` decides the close).
    pub(crate) closed_frame_too_large: AtomicU64,
    /// Version, start, configuration source, last reload, and the listeners to break down.
    pub(crate) facts: ServerFacts,
    /// The upstreams sessions connected to (`plexus_upstream_*`).
    pub(crate) upstreams: UpstreamRegistry,
}

impl Metrics {
    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.refused.add(reason);
    }

    /// The counters with the facts around them, for a status page.
    pub(crate) fn status(&self) -> ServerStatus {
        ServerStatus {
            metrics: self.snapshot(),
            uptime: self.facts.started.elapsed(),
            config_source: self
                .facts
                .config_source
                .get()
                .cloned()
                .unwrap_or_else(|| "<config>".into()),
            last_reload: self.facts.last_reload(),
        }
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let sum = |field: fn(&LoopStats) -> &AtomicU64| -> u64 {
            self.loops
                .iter()
                .map(|stats| field(stats).load(Relaxed))
                .sum()
        };
        MetricsSnapshot {
            sessions_open: sum(|s| &s.sessions_open),
            tls_sessions_open: sum(|s| &s.tls_sessions_open),
            accepted: self.accepted.load(Relaxed),
            refused: self.refused.snapshot(),
            bytes_in: sum(|s| &s.bytes_in),
            bytes_out: sum(|s| &s.bytes_out),
            closed_idle_timeout: sum(|s| &s.closed_idle_timeout),
            closed_outbound_overflow: sum(|s| &s.closed_outbound_overflow),
            closed_io_error: sum(|s| &s.closed_io_error),
            closed_forced: sum(|s| &s.closed_forced),
            closed_upstream_timeout: sum(|s| &s.closed_upstream_timeout),
            read_pauses: sum(|s| &s.read_pauses),
            spliced_bytes: sum(|s| &s.spliced_bytes),
            spliced_pairs: sum(|s| &s.spliced_pairs),
            broadcast_stalls: sum(|s| &s.broadcast_stalls),
            closed_worker_pool_full: sum(|s| &s.closed_worker_pool_full),
            closed_frame_too_large: self.closed_frame_too_large.load(Relaxed),
            handshakes_ok: sum(|s| &s.handshakes_ok),
            handshakes_failed: sum(|s| &s.handshakes_failed),
            handshake_timeouts: sum(|s| &s.handshake_timeouts),
            handler_panics: sum(|s| &s.handler_panics),
            datagrams_in: sum(|s| &s.datagrams_in),
            datagrams_out: sum(|s| &s.datagrams_out),
            datagrams_dropped_truncated: sum(|s| &s.datagrams_dropped_truncated),
            datagrams_dropped_refused: sum(|s| &s.datagrams_dropped_refused),
            datagrams_dropped_overflow: sum(|s| &s.datagrams_dropped_overflow),
            datagrams_dropped_send_error: sum(|s| &s.datagrams_dropped_send_error),
            dtls_cookies_sent: sum(|s| &s.dtls_cookies_sent),
            dtls_cookies_verified: sum(|s| &s.dtls_cookies_verified),
            dtls_garbage_dropped: sum(|s| &s.dtls_garbage_dropped),
            dtls_malformed_dropped: sum(|s| &s.dtls_malformed_dropped),
            dtls_not_hello_dropped: sum(|s| &s.dtls_not_hello_dropped),
            dtls_bad_record_dropped: sum(|s| &s.dtls_bad_record_dropped),
            datagrams_dropped_session_cap: sum(|s| &s.datagrams_dropped_session_cap),
            reclaimed_for_max_datagram_sessions: sum(|s| &s.reclaimed_for_max_datagram_sessions),
            reclaimed_for_max_sessions: sum(|s| &s.reclaimed_for_max_sessions),
            reclaimed_for_per_ip: sum(|s| &s.reclaimed_for_per_ip),
            reclaimed_for_max_connections: sum(|s| &s.reclaimed_for_max_connections),
            udp_sessions_open: sum(|s| &s.udp_sessions_open),
            dtls_sessions_open: sum(|s| &s.dtls_sessions_open),
            jobs_queued: self.pool_stats.queued.load(Relaxed),
            jobs_completed: self.pool_stats.completed.load(Relaxed),
            job_panics: self.pool_stats.panics.load(Relaxed),
            listeners: self.facts.listeners(),
            upstreams: self.upstreams.snapshots(),
            event_loops: self.loops.iter().map(|stats| stats.snapshot()).collect(),
            started_unix_seconds: breakdown::unix_seconds(self.facts.started_at),
        }
    }
}

/// A point-in-time copy of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Sessions open now (every transport).
    pub sessions_open: u64,
    /// Of those, sessions on tls listeners (handshaking or established).
    pub tls_sessions_open: u64,
    /// Connections admitted since start.
    pub accepted: u64,
    /// Connections refused since start, by reason.
    pub refused: Vec<(RefusalReason, u64)>,
    /// Bytes read from peers.
    pub bytes_in: u64,
    /// Bytes written to peers.
    pub bytes_out: u64,
    /// Sessions closed by `idle_timeout`.
    pub closed_idle_timeout: u64,
    /// Sessions closed because their outbound queue passed `outbound_limit`.
    pub closed_outbound_overflow: u64,
    /// Sessions closed by a socket error.
    pub closed_io_error: u64,
    /// Sessions cut off by the end of `shutdown_grace` or a fast stop.
    pub closed_forced: u64,
    /// Forward sessions closed because the upstream did not accept within `handshake_timeout`.
    pub closed_upstream_timeout: u64,
    /// Times a session stopped being read because its outbound queue passed the high watermark.
    pub read_pauses: u64,
    /// Bytes linked sessions relayed socket to socket with splice(2) ([`crate::Session::splice_with`]).
    pub spliced_bytes: u64,
    /// Linked pairs switched to splice(2).
    pub spliced_pairs: u64,
    /// Times a session stopped being read because its broadcasts waited for room on another
    /// event loop (nothing is dropped; the sender waits).
    pub broadcast_stalls: u64,
    /// Sessions closed because the worker pool's queue stayed full for `idle_timeout`.
    pub closed_worker_pool_full: u64,
    /// Sessions closed because a frame passed its framer's limit (`CloseReason::FrameTooLarge`).
    pub closed_frame_too_large: u64,
    /// TLS handshakes completed.
    pub handshakes_ok: u64,
    /// TLS handshakes that failed (bad bytes, protocol errors, no common version or ALPN).
    pub handshakes_failed: u64,
    /// TLS handshakes cut off by `handshake_timeout`.
    pub handshake_timeouts: u64,
    /// Sessions closed because an inline service handler panicked.
    pub handler_panics: u64,
    /// Blocking jobs in the worker pool's queue now (bounded by `worker_queue`).
    pub jobs_queued: u64,
    /// Blocking jobs finished.
    pub jobs_completed: u64,
    /// Blocking jobs that panicked (each closed its session).
    pub job_panics: u64,
    /// Datagrams received on udp/dtls sockets.
    pub datagrams_in: u64,
    /// Datagrams sent on udp/dtls sockets.
    pub datagrams_out: u64,
    /// Datagrams dropped because they were longer than the receive slot.
    pub datagrams_dropped_truncated: u64,
    /// Datagrams dropped because their source was refused (ACL, caps, draining).
    pub datagrams_dropped_refused: u64,
    /// Datagrams dropped because a socket's send queue was full.
    pub datagrams_dropped_overflow: u64,
    /// Datagrams the kernel refused to send (e.g. too large).
    pub datagrams_dropped_send_error: u64,
    /// DTLS HelloVerifyRequests sent (stateless cookies).
    pub dtls_cookies_sent: u64,
    /// DTLS ClientHellos that came back with a valid cookie.
    pub dtls_cookies_verified: u64,
    /// Datagrams on a dtls port that passed the pre-parser but OpenSSL could not use (no
    /// cookie exchange, no session record).
    pub dtls_garbage_dropped: u64,
    /// Datagrams on a dtls port that were not a well-formed sequence of DTLS records (dropped
    /// before OpenSSL saw them; for a session or a new peer).
    pub dtls_malformed_dropped: u64,
    /// Well-formed records from a new peer that were not a plausible ClientHello (dropped
    /// before OpenSSL saw them).
    pub dtls_not_hello_dropped: u64,
    /// Well-formed application-data records for an established DTLS session that OpenSSL
    /// discarded: they failed decryption or the MAC (forged, corrupted, or from another
    /// session), or were replays.
    pub dtls_bad_record_dropped: u64,
    /// Datagrams from new peers dropped because a datagram-session cap was full and the loop
    /// had no session in the cap's scope to reclaim.
    pub datagrams_dropped_session_cap: u64,
    /// Datagram sessions closed to make room under `max_datagram_sessions`.
    pub reclaimed_for_max_datagram_sessions: u64,
    /// Datagram sessions closed to make room under a listener's `max_sessions`.
    pub reclaimed_for_max_sessions: u64,
    /// Datagram sessions closed to make room under `max_datagram_sessions_per_ip`.
    pub reclaimed_for_per_ip: u64,
    /// Datagram sessions closed to make room under `max_connections` (full of streams).
    pub reclaimed_for_max_connections: u64,
    /// UDP peer sessions open now.
    pub udp_sessions_open: u64,
    /// DTLS peer sessions open now (handshaking or established).
    pub dtls_sessions_open: u64,
    /// The same counters per listener (those bound now).
    pub listeners: Vec<ListenerSnapshot>,
    /// The counters of each upstream sessions connected to, by name (those of one name
    /// summed), sorted by name.
    pub upstreams: Vec<(String, UpstreamSnapshot)>,
    /// Sessions and idle time per event loop.
    pub event_loops: Vec<LoopSnapshot>,
    /// When the server started, in seconds since the Unix epoch.
    pub started_unix_seconds: u64,
}

impl MetricsSnapshot {
    /// Renders the counters in the Prometheus text exposition format (version 0.0.4), every
    /// name prefixed `plexus_`. Appends to `out` so a service can add its own families.
    pub fn write_prometheus(&self, out: &mut String) {
        let plain = self.sessions_open.saturating_sub(self.tls_sessions_open);
        family(
            out,
            "sessions_open",
            "gauge",
            "Sessions open now, by transport.",
        );
        sample(out, "sessions_open", &[("transport", "tcp")], plain);
        sample(
            out,
            "sessions_open",
            &[("transport", "tls")],
            self.tls_sessions_open,
        );
        family(
            out,
            "connections_accepted_total",
            "counter",
            "Connections admitted.",
        );
        sample(out, "connections_accepted_total", &[], self.accepted);
        family(
            out,
            "connections_refused_total",
            "counter",
            "Connections refused by admission, by reason.",
        );
        for (reason, count) in &self.refused {
            sample(
                out,
                "connections_refused_total",
                &[("reason", reason.as_str())],
                *count,
            );
        }
        family(
            out,
            "bytes_received_total",
            "counter",
            "Bytes read from peers.",
        );
        sample(out, "bytes_received_total", &[], self.bytes_in);
        family(
            out,
            "bytes_sent_total",
            "counter",
            "Bytes written to peers.",
        );
        sample(out, "bytes_sent_total", &[], self.bytes_out);
        family(
            out,
            "tls_handshakes_total",
            "counter",
            "TLS handshakes, by result.",
        );
        sample(
            out,
            "tls_handshakes_total",
            &[("result", "ok")],
            self.handshakes_ok,
        );
        sample(
            out,
            "tls_handshakes_total",
            &[("result", "failed")],
            self.handshakes_failed,
        );
        family(
            out,
            "timeouts_total",
            "counter",
            "Sessions ended by a timeout, by kind.",
        );
        for (kind, count) in [
            ("idle", self.closed_idle_timeout),
            ("handshake", self.handshake_timeouts),
            ("upstream_connect", self.closed_upstream_timeout),
        ] {
            sample(out, "timeouts_total", &[("kind", kind)], count);
        }
        family(
            out,
            "sessions_closed_total",
            "counter",
            "Sessions closed for a reason other than an orderly end, by reason.",
        );
        for (reason, count) in [
            ("outbound_overflow", self.closed_outbound_overflow),
            ("io_error", self.closed_io_error),
            ("shutdown_forced", self.closed_forced),
            ("handler_panic", self.handler_panics),
            ("worker_pool_full", self.closed_worker_pool_full),
            ("frame_too_large", self.closed_frame_too_large),
        ] {
            sample(out, "sessions_closed_total", &[("reason", reason)], count);
        }
        family(
            out,
            "read_pauses_total",
            "counter",
            "Times a session stopped being read because its peer was not reading.",
        );
        sample(out, "read_pauses_total", &[], self.read_pauses);
        family(
            out,
            "spliced_bytes_total",
            "counter",
            "Bytes linked sessions relayed socket to socket with splice(2), without a copy to user space.",
        );
        sample(out, "spliced_bytes_total", &[], self.spliced_bytes);
        family(
            out,
            "spliced_pairs_total",
            "counter",
            "Linked session pairs switched to splice(2).",
        );
        sample(out, "spliced_pairs_total", &[], self.spliced_pairs);
        family(
            out,
            "broadcast_stalls_total",
            "counter",
            "Times a session stopped being read until its broadcasts found room on another loop.",
        );
        sample(out, "broadcast_stalls_total", &[], self.broadcast_stalls);
        family(
            out,
            "jobs_queued",
            "gauge",
            "Blocking jobs waiting in the worker pool's queue.",
        );
        sample(out, "jobs_queued", &[], self.jobs_queued);
        family(
            out,
            "jobs_total",
            "counter",
            "Blocking jobs finished, by result.",
        );
        sample(out, "jobs_total", &[("result", "ok")], self.jobs_completed);
        sample(out, "jobs_total", &[("result", "panic")], self.job_panics);
        // datagram: the udp/dtls path.
        family(
            out,
            "datagrams_total",
            "counter",
            "Datagrams on udp/dtls sockets, by direction.",
        );
        sample(
            out,
            "datagrams_total",
            &[("direction", "in")],
            self.datagrams_in,
        );
        sample(
            out,
            "datagrams_total",
            &[("direction", "out")],
            self.datagrams_out,
        );
        family(
            out,
            "datagrams_dropped_total",
            "counter",
            "Datagrams dropped, by reason.",
        );
        for (reason, count) in [
            ("truncated", self.datagrams_dropped_truncated),
            ("refused", self.datagrams_dropped_refused),
            ("send_queue_full", self.datagrams_dropped_overflow),
            ("send_error", self.datagrams_dropped_send_error),
            ("dtls_garbage", self.dtls_garbage_dropped),
            ("dtls_malformed", self.dtls_malformed_dropped),
            ("dtls_not_client_hello", self.dtls_not_hello_dropped),
            ("dtls_bad_record", self.dtls_bad_record_dropped),
            ("session_cap", self.datagrams_dropped_session_cap),
        ] {
            sample(out, "datagrams_dropped_total", &[("reason", reason)], count);
        }
        family(
            out,
            "datagram_sessions_reclaimed_total",
            "counter",
            "Longest-idle datagram sessions closed to admit a new peer, by the cap that was full.",
        );
        for (cap, count) in [
            (
                "max_datagram_sessions",
                self.reclaimed_for_max_datagram_sessions,
            ),
            ("max_sessions", self.reclaimed_for_max_sessions),
            ("max_datagram_sessions_per_ip", self.reclaimed_for_per_ip),
            ("max_connections", self.reclaimed_for_max_connections),
        ] {
            sample(
                out,
                "datagram_sessions_reclaimed_total",
                &[("cap", cap)],
                count,
            );
        }
        family(
            out,
            "dtls_cookies_total",
            "counter",
            "DTLS HelloVerifyRequest cookies, sent and verified.",
        );
        sample(
            out,
            "dtls_cookies_total",
            &[("result", "sent")],
            self.dtls_cookies_sent,
        );
        sample(
            out,
            "dtls_cookies_total",
            &[("result", "verified")],
            self.dtls_cookies_verified,
        );
        family(
            out,
            "datagram_sessions_open",
            "gauge",
            "Datagram peer sessions open now, by transport.",
        );
        sample(
            out,
            "datagram_sessions_open",
            &[("transport", "udp")],
            self.udp_sessions_open,
        );
        sample(
            out,
            "datagram_sessions_open",
            &[("transport", "dtls")],
            self.dtls_sessions_open,
        );
        breakdown::write_prometheus(
            out,
            &self.listeners,
            &self.event_loops,
            self.started_unix_seconds,
        );
        write_upstreams(out, &self.upstreams);
    }

    /// Refusals for one reason.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// The `upstream_*` families: each upstream's connects, bytes and open sessions.
fn write_upstreams(out: &mut String, upstreams: &[(String, UpstreamSnapshot)]) {
    family(
        out,
        "upstream_connect_attempts_total",
        "counter",
        "Connect attempts to an upstream (one per address tried).",
    );
    for (name, u) in upstreams {
        sample(
            out,
            "upstream_connect_attempts_total",
            &[("upstream", name)],
            u.attempts,
        );
    }
    family(
        out,
        "upstream_connected_total",
        "counter",
        "Connect attempts to an upstream that connected.",
    );
    for (name, u) in upstreams {
        sample(
            out,
            "upstream_connected_total",
            &[("upstream", name)],
            u.connected,
        );
    }
    family(
        out,
        "upstream_connect_failures_total",
        "counter",
        "Failed connect attempts to an upstream, by reason (refused: refused, reset or another socket error; timeout: no answer within the connect timeout; unreachable: every address failed, the connection was given up).",
    );
    for (name, u) in upstreams {
        for (reason, count) in [
            ("refused", u.refused),
            ("timeout", u.timed_out),
            ("unreachable", u.unreachable),
        ] {
            let labels = [("upstream", name.as_str()), ("reason", reason)];
            sample(out, "upstream_connect_failures_total", &labels, count);
        }
    }
    family(
        out,
        "upstream_connect_retries_total",
        "counter",
        "Rounds over an upstream's addresses started again after every one failed (Upstream::with_retry).",
    );
    for (name, u) in upstreams {
        sample(
            out,
            "upstream_connect_retries_total",
            &[("upstream", name)],
            u.retries,
        );
    }
    family(
        out,
        "upstream_sessions_open",
        "gauge",
        "Upstream sessions open now (connecting or connected).",
    );
    for (name, u) in upstreams {
        sample(out, "upstream_sessions_open", &[("upstream", name)], u.open);
    }
    for (metric, help, direction) in [
        (
            "upstream_bytes_received_total",
            "Bytes read from an upstream.",
            false,
        ),
        (
            "upstream_bytes_sent_total",
            "Bytes written to an upstream.",
            true,
        ),
    ] {
        family(out, metric, "counter", help);
        for (name, u) in upstreams {
            let value = match direction {
                true => u.bytes_sent,
                false => u.bytes_received,
            };
            sample(out, metric, &[("upstream", name)], value);
        }
    }
    family(
        out,
        "upstream_datagrams_dropped_total",
        "counter",
        "Datagrams of a UDP upstream link dropped, by reason (overflow: the link's queue was past outbound_high_watermark, UDP drops rather than blocks; error: refused by the kernel or truncated).",
    );
    for (name, u) in upstreams {
        for (reason, count) in [
            ("overflow", u.datagrams_dropped_overflow),
            ("error", u.datagrams_dropped_error),
        ] {
            let labels = [("upstream", name.as_str()), ("reason", reason)];
            sample(out, "upstream_datagrams_dropped_total", &labels, count);
        }
    }
    use std::fmt::Write;
    let metric = "plexus_upstream_connect_seconds";
    let _ = writeln!(
        out,
        "# HELP {metric} Time until an upstream connection was usable (TCP connect, plus the TLS handshake for a TLS upstream).\n\
         # TYPE {metric} histogram"
    );
    for (name, u) in upstreams {
        let mut label = String::new();
        label_pairs(&mut label, &[("upstream", name)]);
        let mut cumulative = 0u64;
        for (bound, count) in CONNECT_BUCKETS.iter().zip(u.connect_buckets) {
            cumulative = cumulative.wrapping_add(count);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{metric}_bucket{{{label},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{metric}_bucket{{{label},le=\"+Inf\"}} {}",
            u.connects_timed
        );
        let _ = writeln!(
            out,
            "{metric}_sum{{{label}}} {:.6}",
            u.connect_micros as f64 / 1e6
        );
        let _ = writeln!(out, "{metric}_count{{{label}}} {}", u.connects_timed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_family_typed_and_every_refusal_reason() {
        let metrics = Metrics::default();
        metrics.refused(RefusalReason::MaxConnectionsPerIp);
        metrics.accepted.fetch_add(3, Relaxed);
        let mut out = String::new();
        metrics.snapshot().write_prometheus(&mut out);
        assert!(
            out.contains("plexus_connections_accepted_total 3\n"),
            "{out}"
        );
        assert!(
            out.contains("plexus_connections_refused_total{reason=\"max_connections_per_ip\"} 1\n")
        );
        for reason in RefusalReason::ALL {
            assert!(out.contains(&format!("{{reason=\"{}\"}}", reason.as_str())));
        }
        // Every sample belongs to a family announced with HELP and TYPE before it.
        let mut typed = std::collections::HashSet::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn upstreams_are_listed_by_name_summed_and_rendered_with_a_histogram() {
        use crate::connector::{Upstream, UpstreamEvent};
        let metrics = Metrics::default();
        let addr = "127.0.0.1:9".parse().unwrap();
        let a = Upstream::new("db:5432", vec![addr]).unwrap();
        let b = Upstream::new("db:5432", vec![addr]).unwrap();
        let gone = Upstream::new("gone:1", vec![addr]).unwrap();
        for upstream in [&a, &b, &gone] {
            upstream.register(&metrics.upstreams);
            upstream.register(&metrics.upstreams);
            upstream.count(UpstreamEvent::Attempt);
            upstream.count(UpstreamEvent::Connected);
            upstream.count(UpstreamEvent::Opened);
        }
        a.count(UpstreamEvent::Refused);
        a.record_connect_time(Duration::from_micros(300));
        b.record_connect_time(Duration::from_secs(9));
        drop(gone);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.upstreams.len(), 1, "{:?}", snapshot.upstreams);
        let (name, u) = &snapshot.upstreams[0];
        assert_eq!(
            (name.as_str(), u.attempts, u.connected, u.open),
            ("db:5432", 2, 2, 2)
        );
        let mut out = String::new();
        snapshot.write_prometheus(&mut out);
        for line in [
            "plexus_upstream_connect_attempts_total{upstream=\"db:5432\"} 2\n",
            "plexus_upstream_connect_failures_total{upstream=\"db:5432\",reason=\"refused\"} 1\n",
            "plexus_upstream_sessions_open{upstream=\"db:5432\"} 2\n",
            "plexus_upstream_bytes_sent_total{upstream=\"db:5432\"} 0\n",
            "plexus_upstream_connect_seconds_bucket{upstream=\"db:5432\",le=\"0.00025\"} 0\n",
            "plexus_upstream_connect_seconds_bucket{upstream=\"db:5432\",le=\"0.0005\"} 1\n",
            "plexus_upstream_connect_seconds_bucket{upstream=\"db:5432\",le=\"5\"} 1\n",
            "plexus_upstream_connect_seconds_bucket{upstream=\"db:5432\",le=\"+Inf\"} 2\n",
            "plexus_upstream_connect_seconds_sum{upstream=\"db:5432\"} 9.000300\n",
            "plexus_upstream_connect_seconds_count{upstream=\"db:5432\"} 2\n",
            "# TYPE plexus_upstream_connect_seconds histogram\n",
        ] {
            assert!(out.contains(line), "{line} in:\n{out}");
        }
        assert!(!out.contains("gone:1"));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "x", &[("path", "a\"b\\c\nd")], 1);
        assert_eq!(out, "plexus_x{path=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
