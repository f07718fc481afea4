//! Counters every part of the runtime updates, read as one [`MetricsSnapshot`].
//!
//! Hot-path counters (bytes, reads) live in one [`LoopStats`] per event loop, written only by
//! that loop's thread, so loops never contend on a cache line; the snapshot sums them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::admission::RefusalReason;
use crate::worker::PoolStats;

/// Counters written by one event loop.
#[derive(Debug, Default)]
pub(crate) struct LoopStats {
    pub(crate) sessions_open: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) closed_idle_timeout: AtomicU64,
    pub(crate) closed_outbound_overflow: AtomicU64,
    pub(crate) closed_io_error: AtomicU64,
    pub(crate) closed_forced: AtomicU64,
    pub(crate) read_pauses: AtomicU64,
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
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: [AtomicU64; RefusalReason::ALL.len()],
    pub(crate) loops: Vec<Arc<LoopStats>>,
    pub(crate) pool_stats: Arc<PoolStats>,
}

impl Metrics {
    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.refused[reason as usize].fetch_add(1, Relaxed);
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
            accepted: self.accepted.load(Relaxed),
            refused: RefusalReason::ALL
                .iter()
                .map(|reason| (*reason, self.refused[*reason as usize].load(Relaxed)))
                .collect(),
            bytes_in: sum(|s| &s.bytes_in),
            bytes_out: sum(|s| &s.bytes_out),
            closed_idle_timeout: sum(|s| &s.closed_idle_timeout),
            closed_outbound_overflow: sum(|s| &s.closed_outbound_overflow),
            closed_io_error: sum(|s| &s.closed_io_error),
            closed_forced: sum(|s| &s.closed_forced),
            read_pauses: sum(|s| &s.read_pauses),
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
            udp_sessions_open: sum(|s| &s.udp_sessions_open),
            dtls_sessions_open: sum(|s| &s.dtls_sessions_open),
            jobs_queued: self.pool_stats.queued.load(Relaxed),
            jobs_completed: self.pool_stats.completed.load(Relaxed),
            job_panics: self.pool_stats.panics.load(Relaxed),
        }
    }
}

/// A point-in-time copy of the server's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Sessions open now.
    pub sessions_open: u64,
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
    /// Times a session stopped being read because its outbound queue passed the high watermark.
    pub read_pauses: u64,
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
    /// Datagrams on a dtls port that were not a DTLS record OpenSSL could use.
    pub dtls_garbage_dropped: u64,
    /// UDP peer sessions open now.
    pub udp_sessions_open: u64,
    /// DTLS peer sessions open now (handshaking or established).
    pub dtls_sessions_open: u64,
}

impl MetricsSnapshot {
    /// Refusals for one reason.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}
