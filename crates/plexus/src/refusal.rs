//! Why a connection was refused: the one list of refusal reasons, shared by admission (which
//! decides), the counters (which count per reason) and the logs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The global or the listener's ACL does not permit the client address.
    Acl = 0,
    /// `max_connections` sessions are already open.
    MaxConnections = 1,
    /// `max_connections_per_ip` sessions from this address are already open.
    MaxConnectionsPerIp = 2,
    /// The process ran out of file descriptors (EMFILE/ENFILE).
    DescriptorsExhausted = 3,
    /// `max_handshakes` TLS handshakes are already in flight.
    HandshakeCapacity = 4,
    /// A `proxy_protocol` listener got a connection from an untrusted source, or a missing,
    /// malformed or late PROXY header.
    ProxyHeader = 5,
    /// `max_handshakes_per_ip` handshakes from this address are already in flight.
    HandshakeCapacityPerIp = 6,
    /// The event loop chosen for an accepted connection had a full command queue (it is far
    /// behind) or had stopped, so the connection could not be handed to it and was closed.
    EventLoopBusy = 7,
}

impl RefusalReason {
    /// Every reason, indexed by its discriminant.
    pub const ALL: [RefusalReason; 8] = [
        RefusalReason::Acl,
        RefusalReason::MaxConnections,
        RefusalReason::MaxConnectionsPerIp,
        RefusalReason::DescriptorsExhausted,
        RefusalReason::HandshakeCapacity,
        RefusalReason::ProxyHeader,
        RefusalReason::HandshakeCapacityPerIp,
        RefusalReason::EventLoopBusy,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Acl => "acl",
            RefusalReason::MaxConnections => "max_connections",
            RefusalReason::MaxConnectionsPerIp => "max_connections_per_ip",
            RefusalReason::DescriptorsExhausted => "descriptors_exhausted",
            RefusalReason::HandshakeCapacity => "handshake_capacity",
            RefusalReason::ProxyHeader => "proxy_header",
            RefusalReason::HandshakeCapacityPerIp => "handshake_capacity_per_ip",
            RefusalReason::EventLoopBusy => "event_loop_busy",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per refusal reason.
#[derive(Debug, Default)]
pub(crate) struct RefusalCounts([AtomicU64; RefusalReason::ALL.len()]);

impl RefusalCounts {
    /// Counts one refusal for `reason`.
    pub(crate) fn add(&self, reason: RefusalReason) {
        // Always a counter: the array has one per discriminant.
        if let Some(count) = self.0.get(reason as usize) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// The refusals counted for `reason`.
    pub(crate) fn get(&self, reason: RefusalReason) -> u64 {
        self.0
            .get(reason as usize)
            .map_or(0, |count| count.load(Relaxed))
    }

    /// Every reason with its count, in [`RefusalReason::ALL`] order.
    pub(crate) fn snapshot(&self) -> Vec<(RefusalReason, u64)> {
        RefusalReason::ALL
            .iter()
            .map(|&reason| (reason, self.get(reason)))
            .collect()
    }
}
