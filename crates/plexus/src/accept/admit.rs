//! The decision about one accepted connection, sans IO: given the listener's
//! policy, the peer's address and `now`, whether the connection becomes a session — with its
//! admission [`Ticket`] and, on a tls listener, its [`HandshakeSlot`] — or why not. The
//! decision also counts what it decided (the process-wide counters through [`Admission`], the
//! listener's own) and logs refusals, throttled per reason ([`RefusalLog`]). No socket and no
//! clock is touched, so every path is unit-tested without a listener.
//!
//! The order of the checks:
//! - a `proxy_protocol` listener: a trusted balancer only takes a global place
//!   ([`Admission::admit_proxied`]; the ACLs and the per-IP cap wait for the client its PROXY
//!   header names); any other source is refused as `proxy_header`;
//! - otherwise the global and the listener's ACL, `max_connections`, `max_connections_per_ip`
//!   ([`Admission::admit`]);
//! - then, on a tls listener, a place among the handshakes in flight (`max_handshakes`, and
//!   this source's share, `max_handshakes_per_ip`). A connection refused here was admitted
//!   first: the listener counts it as accepted and as refused.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use plexus_proto::Acl;
use tracing::warn;

use crate::admission::{Admission, HandshakeSlot, RefusalReason, Ticket};
use crate::log_throttle::LogThrottle;
use crate::service::ListenerInfo;

/// Logs refusals of each reason at most once per interval, with a count of the rest; shared
/// by every loop that accepts (the lock is only taken for a refusal).
#[derive(Debug)]
pub(crate) struct RefusalLog {
    throttles: Mutex<[LogThrottle; RefusalReason::ALL.len()]>,
}

impl RefusalLog {
    pub(crate) fn new() -> Self {
        RefusalLog {
            throttles: Mutex::new([LogThrottle::new(); RefusalReason::ALL.len()]),
        }
    }

    /// Logs one refusal unless this reason was logged within the interval. `Some(n)` when it
    /// logged, `n` being the refusals of this reason it had kept quiet about since.
    pub(super) fn record(
        &self,
        reason: RefusalReason,
        peer: Option<SocketAddr>,
        listener: &str,
        now: Instant,
    ) -> Option<u64> {
        let also = {
            let mut throttles = self
                .throttles
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let throttle = throttles.get_mut(reason as usize);
            throttle.and_then(|throttle| throttle.allow(now))?
        };
        let peer = peer.map_or_else(|| "-".to_owned(), |peer| peer.to_string());
        warn!(
            "refused connection reason={reason} peer={peer} listener={listener} \
             (+{also} more refused for this reason in the last second)"
        );
        Some(also)
    }
}

/// What admission needs to know about the listener a connection arrived on.
pub(super) struct Gate<'a> {
    pub(super) admission: &'a Arc<Admission>,
    /// The listener's ACL.
    pub(super) acl: &'a Acl,
    /// For `proxy_protocol` listeners: the sources trusted to send a PROXY header.
    pub(super) proxy_trusted: Option<&'a Acl>,
    /// A tls listener: the session's handshake needs a slot.
    pub(super) tls: bool,
    /// The listener's identity and counters.
    pub(super) listener: &'a ListenerInfo,
}

/// An admitted connection's places: in the admission counts, and among the handshakes.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) ticket: Ticket,
    /// Present on tls listeners.
    pub(super) handshake: Option<HandshakeSlot>,
}

impl Gate<'_> {
    /// Admits a connection from `peer` or says why not; either way counted, and a refusal
    /// logged (throttled) at `now`.
    pub(super) fn admit(
        &self,
        peer: SocketAddr,
        now: Instant,
        log: &RefusalLog,
    ) -> Result<Admitted, RefusalReason> {
        let result = self.decide(peer);
        if let Err(reason) = result {
            self.listener.stats.refused(reason);
            log.record(reason, Some(peer), &self.listener.name, now);
        }
        result
    }

    fn decide(&self, peer: SocketAddr) -> Result<Admitted, RefusalReason> {
        let ticket = match self.proxy_trusted {
            // The balancer's address says nothing about the client: ACLs and per-IP caps wait
            // for the PROXY header (read on the event loop).
            Some(trusted) if trusted.permits(peer.ip()) => self.admission.admit_proxied()?,
            Some(_) => {
                self.admission.record_refusal(RefusalReason::ProxyHeader);
                return Err(RefusalReason::ProxyHeader);
            }
            None => self.admission.admit(self.acl, peer.ip())?,
        };
        self.listener.stats.accepted();
        let handshake = match self.tls {
            true => Some(ticket.reserve_handshake()?),
            false => None,
        };
        Ok(Admitted { ticket, handshake })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;
    use crate::breakdown::ListenerStats;
    use crate::metrics::Metrics;
    use crate::refusal::RefusalCounts;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    fn listener() -> ListenerInfo {
        ListenerInfo {
            index: 0,
            name: "gate".into(),
            stats: ListenerStats::default(),
        }
    }

    /// Admission with room for `max` sessions, `per_ip` per address (0: no cap), and
    /// `handshakes` handshakes in flight of which one source may hold `share`.
    fn admission(
        global: Acl,
        max: usize,
        per_ip: usize,
        handshakes: usize,
        share: usize,
    ) -> Arc<Admission> {
        let admission = Admission::new(global, max, per_ip, handshakes, Arc::default());
        admission.set_max_handshakes_per_ip(share);
        Arc::new(admission)
    }

    fn net(text: &str) -> plexus_proto::Cidr {
        text.parse().expect("cidr")
    }

    /// The non-zero counts, in `RefusalReason::ALL` order.
    fn refusals(counts: &RefusalCounts) -> Vec<(RefusalReason, u64)> {
        counts
            .snapshot()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn metrics(admission: &Admission) -> &Metrics {
        admission.metrics()
    }

    /// The gate of a plain listener (no TLS, no PROXY trust) with `acl`.
    fn gate<'a>(admission: &'a Arc<Admission>, acl: &'a Acl, info: &'a ListenerInfo) -> Gate<'a> {
        Gate {
            admission,
            acl,
            proxy_trusted: None,
            tls: false,
            listener: info,
        }
    }

    #[test]
    fn the_acls_admit_and_refuse_and_both_counters_see_it() {
        let global = Acl::new(Vec::new(), vec![net("10.0.0.9/32")]);
        let admission = admission(global, 100, 0, 8, 8);
        let acl = Acl::new(vec![net("10.0.0.0/24")], Vec::new());
        let info = listener();
        let gate = gate(&admission, &acl, &info);
        let log = RefusalLog::new();
        let now = Instant::now();
        let admitted = gate.admit(addr("10.0.0.1:5000"), now, &log).unwrap();
        assert!(admitted.handshake.is_none(), "no handshake off tls");
        // Denied by the global ACL, then outside the listener's allow list.
        for peer in ["10.0.0.9:5000", "10.0.1.1:5000", "[::ffff:10.0.0.9]:1"] {
            assert_eq!(
                gate.admit(addr(peer), now, &log).unwrap_err(),
                RefusalReason::Acl,
                "{peer}"
            );
        }
        assert_eq!(metrics(&admission).accepted.load(Relaxed), 1);
        assert_eq!(
            refusals(&metrics(&admission).refused),
            [(RefusalReason::Acl, 3)]
        );
        assert_eq!(info.stats.accepted_count(), 1);
        assert_eq!(refusals(info.stats.refusals()), [(RefusalReason::Acl, 3)]);
    }

    #[test]
    fn global_and_per_ip_caps_refuse_the_excess_until_a_ticket_is_dropped() {
        let admission = admission(Acl::default(), 3, 2, 8, 8);
        let acl = Acl::default();
        let info = listener();
        let gate = gate(&admission, &acl, &info);
        let log = RefusalLog::new();
        let now = Instant::now();
        let a1 = gate.admit(addr("127.0.0.1:1"), now, &log).unwrap();
        let _a2 = gate.admit(addr("127.0.0.1:2"), now, &log).unwrap();
        assert_eq!(
            gate.admit(addr("127.0.0.1:3"), now, &log).unwrap_err(),
            RefusalReason::MaxConnectionsPerIp
        );
        let _b1 = gate.admit(addr("127.0.0.2:1"), now, &log).unwrap();
        assert_eq!(
            gate.admit(addr("127.0.0.3:1"), now, &log).unwrap_err(),
            RefusalReason::MaxConnections
        );
        // A session's end gives both its places back.
        drop(a1);
        let _a3 = gate.admit(addr("127.0.0.1:4"), now, &log).unwrap();
        assert_eq!(
            refusals(&metrics(&admission).refused),
            [
                (RefusalReason::MaxConnections, 1),
                (RefusalReason::MaxConnectionsPerIp, 1)
            ]
        );
        assert_eq!(info.stats.accepted_count(), 4);
    }

    #[test]
    fn a_tls_listener_reserves_a_handshake_slot_within_each_sources_share() {
        // Four handshakes in flight, two per source.
        let admission = admission(Acl::default(), 100, 0, 4, 2);
        let acl = Acl::default();
        let info = listener();
        let gate = Gate {
            tls: true,
            ..gate(&admission, &acl, &info)
        };
        let log = RefusalLog::new();
        let now = Instant::now();
        let mut held: Vec<Admitted> = (1..=2)
            .map(|port| {
                let peer = SocketAddr::from(([127, 0, 0, 2], port));
                gate.admit(peer, now, &log).unwrap()
            })
            .collect();
        assert!(held.iter().all(|a| a.handshake.is_some()));
        assert_eq!(
            gate.admit(addr("127.0.0.2:3"), now, &log).unwrap_err(),
            RefusalReason::HandshakeCapacityPerIp
        );
        // Another host still gets its share; then the pool is full for everyone.
        held.push(gate.admit(addr("127.0.0.3:1"), now, &log).unwrap());
        held.push(gate.admit(addr("127.0.0.4:1"), now, &log).unwrap());
        assert_eq!(
            gate.admit(addr("127.0.0.5:1"), now, &log).unwrap_err(),
            RefusalReason::HandshakeCapacity
        );
        // A refused handshake was admitted first: accepted and refused, and its global place
        // went back with its ticket.
        assert_eq!(info.stats.accepted_count(), 6);
        assert_eq!(
            refusals(info.stats.refusals()),
            [
                (RefusalReason::HandshakeCapacity, 1),
                (RefusalReason::HandshakeCapacityPerIp, 1)
            ]
        );
        assert_eq!(admission.open_count(), 4);
        // A handshake that ends (the slot dropped, the session goes on) frees its place.
        let first = held.first_mut().unwrap();
        first.handshake = None;
        assert!(gate.admit(addr("127.0.0.2:4"), now, &log).is_ok());
    }

    #[test]
    fn a_proxy_listener_admits_trusted_balancers_without_the_client_acls() {
        let admission = admission(Acl::default(), 2, 1, 8, 8);
        // The listener's ACL would refuse the balancer's own address.
        let acl = Acl::new(Vec::new(), vec![net("192.0.2.0/24")]);
        let trusted = Acl::new(vec![net("192.0.2.1/32")], Vec::new());
        let info = listener();
        let gate = Gate {
            proxy_trusted: Some(&trusted),
            ..gate(&admission, &acl, &info)
        };
        let log = RefusalLog::new();
        let now = Instant::now();
        // Two from the same balancer: the per-IP cap waits for the client addresses.
        let _a = gate.admit(addr("192.0.2.1:1"), now, &log).unwrap();
        let _b = gate.admit(addr("192.0.2.1:2"), now, &log).unwrap();
        assert_eq!(
            gate.admit(addr("192.0.2.1:3"), now, &log).unwrap_err(),
            RefusalReason::MaxConnections,
            "max_connections applies at once"
        );
        assert_eq!(
            gate.admit(addr("198.51.100.7:1"), now, &log).unwrap_err(),
            RefusalReason::ProxyHeader,
            "an untrusted source"
        );
        assert_eq!(
            refusals(&metrics(&admission).refused),
            [
                (RefusalReason::MaxConnections, 1),
                (RefusalReason::ProxyHeader, 1)
            ]
        );
        assert_eq!(
            refusals(info.stats.refusals()),
            [
                (RefusalReason::MaxConnections, 1),
                (RefusalReason::ProxyHeader, 1)
            ]
        );
    }

    #[test]
    fn refusals_are_logged_once_per_interval_per_reason_with_the_rest_counted() {
        let log = RefusalLog::new();
        let start = Instant::now();
        let peer = Some(addr("127.0.0.1:1"));
        assert_eq!(log.record(RefusalReason::Acl, peer, "l", start), Some(0));
        assert_eq!(log.record(RefusalReason::Acl, peer, "l", start), None);
        assert_eq!(log.record(RefusalReason::Acl, None, "l", start), None);
        // Another reason has its own throttle.
        assert_eq!(
            log.record(RefusalReason::MaxConnections, peer, "l", start),
            Some(0)
        );
        let later = start + Duration::from_secs(2);
        assert_eq!(log.record(RefusalReason::Acl, peer, "l", later), Some(2));
        assert_eq!(log.record(RefusalReason::Acl, peer, "l", later), None);
    }
}
