//! Admission: whether a new connection may become a session (ACL, global and per-IP caps),
//! and whether it may start a TLS/DTLS handshake (`max_handshakes`, and each source address's
//! share of them, `max_handshakes_per_ip`, so that one host cannot hold the whole pool).
//!
//! An admitted connection gets a [`Ticket`] that the session carries; dropping the ticket
//! (whatever ends the session) gives its place back, so the counts can never leak. The same
//! holds for a [`HandshakeSlot`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use plexus_proto::Acl;

use crate::metrics::Metrics;
pub use crate::refusal::RefusalReason;

/// The admission policy and the live counts it enforces. The policy can be replaced while
/// running ([`Admission::update`], on SIGHUP); the counts carry over.
#[derive(Debug)]
pub(crate) struct Admission {
    global_acl: RwLock<Arc<Acl>>,
    max_connections: AtomicUsize,
    max_per_ip: AtomicUsize,
    max_handshakes: AtomicUsize,
    /// Each source address's share of `max_handshakes`.
    max_handshakes_per_ip: AtomicUsize,
    handshakes: Arc<Handshakes>,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub(crate) fn new(
        global_acl: Acl,
        max_connections: usize,
        max_per_ip: usize,
        max_handshakes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Admission {
            global_acl: RwLock::new(Arc::new(global_acl)),
            max_connections: AtomicUsize::new(max_connections),
            max_per_ip: AtomicUsize::new(max_per_ip),
            max_handshakes: AtomicUsize::new(max_handshakes),
            max_handshakes_per_ip: AtomicUsize::new(max_handshakes),
            handshakes: Arc::new(Handshakes::default()),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Admits a client of a listener with ACL `listener_acl`, or says why not (and counts it).
    pub(crate) fn admit(
        self: &Arc<Self>,
        listener_acl: &Acl,
        ip: IpAddr,
    ) -> Result<Ticket, RefusalReason> {
        let ip = ip.to_canonical();
        let result = self.try_admit(listener_acl, ip);
        match result {
            Ok(per_ip) => {
                self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(Ticket {
                    admission: Arc::clone(self),
                    ip: Some(ip),
                    per_ip,
                })
            }
            Err(reason) => {
                self.metrics.refused(reason);
                Err(reason)
            }
        }
    }

    /// Replaces the policy (SIGHUP): new connections see it at once; sessions already admitted
    /// keep their places. A per-IP cap turned on live counts only sessions admitted after it.
    pub(crate) fn update(
        &self,
        global_acl: Acl,
        max_connections: usize,
        max_per_ip: usize,
        max_handshakes: usize,
    ) {
        *self
            .global_acl
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(global_acl);
        self.max_connections
            .store(max_connections, Ordering::Release);
        self.max_per_ip.store(max_per_ip, Ordering::Release);
        self.max_handshakes.store(max_handshakes, Ordering::Release);
    }

    /// Admits or refuses; `Ok(true)` when the session is counted against its IP's cap.
    fn try_admit(&self, listener_acl: &Acl, ip: IpAddr) -> Result<bool, RefusalReason> {
        if !self.global_acl().permits(ip) || !listener_acl.permits(ip) {
            return Err(RefusalReason::Acl);
        }
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RefusalReason::MaxConnections);
        }
        let max_per_ip = self.max_per_ip.load(Ordering::Acquire);
        if max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= max_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(RefusalReason::MaxConnectionsPerIp);
            }
            *count = count.saturating_add(1);
            return Ok(true);
        }
        Ok(false)
    }

    /// Admits a datagram (udp/dtls) session from `ip`: the ACLs and `max_connections` apply,
    /// `max_connections_per_ip` does not (datagram sessions have their own per-IP cap, so a
    /// host's UDP sources never take its TCP places; see [`crate::datagram_admission`]).
    pub(crate) fn admit_datagram(
        self: &Arc<Self>,
        listener_acl: &Acl,
        ip: IpAddr,
    ) -> Result<Ticket, RefusalReason> {
        let ip = ip.to_canonical();
        if !self.global_acl().permits(ip) || !listener_acl.permits(ip) {
            self.metrics.refused(RefusalReason::Acl);
            return Err(RefusalReason::Acl);
        }
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused(RefusalReason::MaxConnections);
            return Err(RefusalReason::MaxConnections);
        }
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            admission: Arc::clone(self),
            ip: Some(ip),
            per_ip: false,
        })
    }

    /// Whether the ACLs permit `ip` (no place is taken); a refusal is counted. DTLS asks this
    /// before answering a ClientHello with a cookie.
    pub(crate) fn permits(&self, listener_acl: &Acl, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let permitted = self.global_acl().permits(ip) && listener_acl.permits(ip);
        if !permitted {
            self.metrics.refused(RefusalReason::Acl);
        }
        permitted
    }

    /// Reserves a place for one TLS handshake, or refuses (and counts) past `max_handshakes`.
    /// Admits a connection from a trusted load balancer whose client is not known yet: only
    /// `max_connections` applies now; ACLs and the per-IP cap apply to the client address of
    /// the PROXY header ([`Ticket::assign_client`]).
    pub(crate) fn admit_proxied(self: &Arc<Self>) -> Result<Ticket, RefusalReason> {
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused(RefusalReason::MaxConnections);
            return Err(RefusalReason::MaxConnections);
        }
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            admission: Arc::clone(self),
            ip: None,
            per_ip: false,
        })
    }

    /// The ACL and per-IP part of admission, for a client address learnt after accept.
    /// `Ok(true)` when the client is counted against its IP's cap.
    fn admit_client(&self, listener_acl: &Acl, ip: IpAddr) -> Result<bool, RefusalReason> {
        if !self.global_acl().permits(ip) || !listener_acl.permits(ip) {
            return Err(RefusalReason::Acl);
        }
        let max_per_ip = self.max_per_ip.load(Ordering::Acquire);
        if max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= max_per_ip {
                return Err(RefusalReason::MaxConnectionsPerIp);
            }
            *count = count.saturating_add(1);
            return Ok(true);
        }
        Ok(false)
    }

    fn global_acl(&self) -> Arc<Acl> {
        Arc::clone(
            &self
                .global_acl
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Sets each source address's share of `max_handshakes` (at start and on SIGHUP; handshakes
    /// in flight keep their places).
    pub(crate) fn set_max_handshakes_per_ip(&self, max: usize) {
        self.max_handshakes_per_ip.store(max, Ordering::Release);
    }

    /// Reserves a place for one TLS/DTLS handshake from `ip`, or refuses (and counts) past
    /// `max_handshakes` or past `ip`'s share (`max_handshakes_per_ip`). `None`: a source not
    /// known yet (a PROXY balancer's connection), which only the global pool bounds.
    pub(crate) fn reserve_handshake(
        &self,
        ip: Option<IpAddr>,
    ) -> Result<HandshakeSlot, RefusalReason> {
        let handshakes = &self.handshakes;
        let previous = handshakes.total.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_handshakes.load(Ordering::Acquire) {
            handshakes.total.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused(RefusalReason::HandshakeCapacity);
            return Err(RefusalReason::HandshakeCapacity);
        }
        let ip = ip.map(|ip| ip.to_canonical());
        if let Some(ip) = ip {
            let share = self.max_handshakes_per_ip.load(Ordering::Acquire);
            let mut per_ip = handshakes
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= share {
                if *count == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                handshakes.total.fetch_sub(1, Ordering::AcqRel);
                self.metrics.refused(RefusalReason::HandshakeCapacityPerIp);
                return Err(RefusalReason::HandshakeCapacityPerIp);
            }
            *count = count.saturating_add(1);
        }
        Ok(HandshakeSlot {
            handshakes: Arc::clone(handshakes),
            ip,
        })
    }

    /// Sessions holding a place now.
    #[cfg(test)]
    pub(crate) fn open_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The counters refusals and admissions go to.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts a refusal decided outside [`Admission::admit`] (descriptor exhaustion).
    pub(crate) fn record_refusal(&self, reason: RefusalReason) {
        self.metrics.refused(reason);
    }

    fn release(&self, ip: Option<IpAddr>, counted_per_ip: bool) {
        if let Some(ip) = ip.filter(|_| counted_per_ip) {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session's place in the admission counts, given back on drop.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    /// The client (`None` until a PROXY header names it).
    ip: Option<IpAddr>,
    /// Counted in the per-IP table (the cap was on when the client was admitted).
    per_ip: bool,
}

impl Ticket {
    /// Charges the session to `client` (from a PROXY header): the global and listener ACLs
    /// and the per-IP cap apply to it. A refusal is counted; the caller closes the session.
    pub(crate) fn assign_client(
        &mut self,
        listener_acl: &Acl,
        client: IpAddr,
    ) -> Result<(), RefusalReason> {
        let client = client.to_canonical();
        if self.ip.is_some() {
            return Ok(());
        }
        match self.admission.admit_client(listener_acl, client) {
            Ok(counted) => {
                self.ip = Some(client);
                self.per_ip = counted;
                Ok(())
            }
            Err(reason) => {
                self.admission.metrics.refused(reason);
                Err(reason)
            }
        }
    }

    /// Counts a refusal decided after admission (a bad PROXY header).
    pub(crate) fn record_refusal(&self, reason: RefusalReason) {
        self.admission.metrics.refused(reason);
    }

    /// Reserves a place among the handshakes in flight (`max_handshakes`, and this client's
    /// share, `max_handshakes_per_ip`) for this session's TLS or DTLS handshake.
    pub(crate) fn reserve_handshake(&self) -> Result<HandshakeSlot, RefusalReason> {
        self.admission.reserve_handshake(self.ip)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.ip, self.per_ip);
    }
}

/// Handshakes in flight: all together, and per source address (only addresses with one).
#[derive(Debug, Default)]
struct Handshakes {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A handshake's place among the `max_handshakes` in flight (and in its source's share),
/// given back on drop (when the handshake completes, or the session ends during it).
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    ip: Option<IpAddr>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self
                .handshakes
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.handshakes.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters and log throttles are arrays indexed by the discriminant: `ALL` must list
    /// every reason at its own index, with a distinct label (event_loop_busy included).
    #[test]
    fn every_refusal_reason_sits_at_its_index_with_its_own_label() {
        let mut labels = std::collections::HashSet::new();
        for (index, reason) in RefusalReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, index, "{reason}");
            assert!(labels.insert(reason.as_str()), "{reason} twice");
        }
        assert_eq!(RefusalReason::EventLoopBusy.as_str(), "event_loop_busy");
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn admission(acl: Acl, max: usize, per_ip: usize) -> Arc<Admission> {
        Arc::new(Admission::new(
            acl,
            max,
            per_ip,
            2,
            Arc::new(Metrics::default()),
        ))
    }

    #[test]
    fn an_updated_policy_applies_to_new_connections_and_counts_carry_over() {
        let admission = admission(Acl::default(), 10, 0);
        let open = Acl::default();
        let a = admission.admit(&open, ip("127.0.0.1")).unwrap();
        let b = admission.admit(&open, ip("127.0.0.1")).unwrap();
        let deny: Acl = Acl::new(Vec::new(), vec!["127.0.0.9/32".parse().unwrap()]);
        admission.update(deny, 3, 1, 2);
        assert_eq!(
            admission.admit(&open, ip("127.0.0.9")).unwrap_err(),
            RefusalReason::Acl
        );
        // Two open before the update, the cap is now 3: one more place.
        let c = admission.admit(&open, ip("127.0.0.2")).unwrap();
        assert_eq!(
            admission.admit(&open, ip("127.0.0.3")).unwrap_err(),
            RefusalReason::MaxConnections
        );
        drop((b, c));
        // The per-IP cap counts sessions admitted after it was switched on.
        let d = admission.admit(&open, ip("127.0.0.2")).unwrap();
        assert_eq!(
            admission.admit(&open, ip("127.0.0.2")).unwrap_err(),
            RefusalReason::MaxConnectionsPerIp
        );
        // Tickets from before the per-IP cap give back only their global place.
        drop((a, d));
        assert_eq!(admission.open.load(Ordering::Relaxed), 0);
        assert!(admission.per_ip.lock().unwrap().is_empty());
    }

    #[test]
    fn caps_refuse_the_excess_and_tickets_give_places_back() {
        let admission = admission(Acl::default(), 2, 0);
        let open = Acl::default();
        let a = admission.admit(&open, ip("127.0.0.1")).unwrap();
        let _b = admission.admit(&open, ip("127.0.0.2")).unwrap();
        assert_eq!(
            admission.admit(&open, ip("127.0.0.3")).unwrap_err(),
            RefusalReason::MaxConnections
        );
        drop(a);
        assert!(admission.admit(&open, ip("127.0.0.3")).is_ok());
        assert_eq!(
            admission.metrics.refused.get(RefusalReason::MaxConnections),
            1
        );
    }

    #[test]
    fn per_ip_cap_counts_mapped_ipv6_as_ipv4() {
        let admission = admission(Acl::default(), 100, 1);
        let open = Acl::default();
        let _held = admission.admit(&open, ip("127.0.0.1")).unwrap();
        assert_eq!(
            admission.admit(&open, ip("::ffff:127.0.0.1")).unwrap_err(),
            RefusalReason::MaxConnectionsPerIp
        );
        let _other = admission.admit(&open, ip("127.0.0.2")).unwrap();
        assert_eq!(
            admission.open.load(Ordering::Relaxed),
            2,
            "refusal gave its global place back"
        );
    }

    #[test]
    fn handshake_slots_are_capped_and_given_back() {
        let admission = admission(Acl::default(), 100, 0);
        let first = admission.reserve_handshake(None).unwrap();
        let _second = admission.reserve_handshake(None).unwrap();
        assert_eq!(
            admission.reserve_handshake(None).unwrap_err(),
            RefusalReason::HandshakeCapacity
        );
        drop(first);
        assert!(admission.reserve_handshake(None).is_ok());
    }

    #[test]
    fn one_source_gets_only_its_share_of_the_handshake_pool() {
        let admission = Arc::new(Admission::new(
            Acl::default(),
            100,
            0,
            8,
            Arc::new(Metrics::default()),
        ));
        admission.set_max_handshakes_per_ip(2);
        let open = Acl::default();
        let attacker = admission.admit(&open, ip("127.0.0.2")).unwrap();
        let held: Vec<_> = (0..2)
            .map(|_| attacker.reserve_handshake().unwrap())
            .collect();
        assert_eq!(
            attacker.reserve_handshake().unwrap_err(),
            RefusalReason::HandshakeCapacityPerIp
        );
        // The same host as an IPv4-mapped IPv6 address is the same source.
        assert_eq!(
            admission
                .reserve_handshake(Some(ip("::ffff:127.0.0.2")))
                .unwrap_err(),
            RefusalReason::HandshakeCapacityPerIp
        );
        let other = admission.admit(&open, ip("127.0.0.1")).unwrap();
        let _others: Vec<_> = (0..2).map(|_| other.reserve_handshake().unwrap()).collect();
        assert_eq!(
            admission
                .metrics
                .refused
                .get(RefusalReason::HandshakeCapacityPerIp),
            2
        );
        drop(held);
        assert!(attacker.reserve_handshake().is_ok(), "places given back");
        assert_eq!(admission.handshakes.total.load(Ordering::Relaxed), 2);
        assert_eq!(admission.handshakes.per_ip.lock().unwrap().len(), 1);
        // Sources not known yet (behind a PROXY balancer) are bounded by the pool only.
        let _unknown: Vec<_> = (0..6)
            .map(|_| admission.reserve_handshake(None).unwrap())
            .collect();
        assert_eq!(
            admission.reserve_handshake(None).unwrap_err(),
            RefusalReason::HandshakeCapacity
        );
    }

    #[test]
    fn global_and_listener_acls_both_apply() {
        let global = Acl::new(vec![], vec!["127.0.0.2".parse().unwrap()]);
        let listener = Acl::new(vec!["127.0.0.0/30".parse().unwrap()], vec![]);
        let admission = admission(global, 100, 0);
        assert!(admission.admit(&listener, ip("127.0.0.1")).is_ok());
        assert_eq!(
            admission.admit(&listener, ip("127.0.0.2")).unwrap_err(),
            RefusalReason::Acl
        );
        assert_eq!(
            admission.admit(&listener, ip("127.0.0.9")).unwrap_err(),
            RefusalReason::Acl
        );
    }

    #[test]
    fn proxied_tickets_charge_the_real_client_to_acls_and_per_ip_caps() {
        let admission = admission(Acl::default(), 10, 1);
        let denied: Acl = Acl::new(Vec::new(), vec!["10.9.0.0/16".parse().unwrap()]);
        let mut first = admission.admit_proxied().unwrap();
        first.assign_client(&denied, ip("10.0.0.1")).unwrap();
        let mut second = admission.admit_proxied().unwrap();
        assert_eq!(
            second.assign_client(&denied, ip("10.0.0.1")).unwrap_err(),
            RefusalReason::MaxConnectionsPerIp,
            "the per-IP cap applies to the client, not to the balancer"
        );
        let mut third = admission.admit_proxied().unwrap();
        assert_eq!(
            third.assign_client(&denied, ip("10.9.1.1")).unwrap_err(),
            RefusalReason::Acl
        );
        drop((second, third));
        drop(first);
        let mut again = admission.admit_proxied().unwrap();
        again.assign_client(&denied, ip("10.0.0.1")).unwrap();
        assert_eq!(admission.open.load(Ordering::Relaxed), 1);
    }
}
