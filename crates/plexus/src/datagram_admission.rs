//! The caps on datagram (udp/dtls) sessions, apart from stream connections: all datagram
//! sessions together (`[server] max_datagram_sessions`), per listener (`max_sessions`) and per
//! client IP (`[server] max_datagram_sessions_per_ip`).
//!
//! A datagram session also holds an admission [`Ticket`](crate::admission::Ticket), so
//! `max_connections` still bounds every transport together; but `max_datagram_sessions` is
//! below `max_connections` (validated), so datagram sessions can never hold the places stream
//! clients need. A full cap does not refuse: the loop reclaims its longest-idle session of the
//! cap's scope ([`crate::idle_order`]) and admits the newcomer in its place.
//!
//! DTLS handshakes also hold a `max_handshakes` slot, shared with tls (and auto) listeners; at
//! most half of that pool (rounded up, fixed at start) may be DTLS handshakes, so clients
//! completing cookie exchanges cannot take every slot TLS clients need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Which datagram cap is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapFull {
    /// `[server] max_datagram_sessions`.
    Sessions,
    /// The listener's `max_sessions`.
    Listener,
    /// `[server] max_datagram_sessions_per_ip`.
    PerIp,
}

impl CapFull {
    /// The key's name (logs, metrics).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CapFull::Sessions => "max_datagram_sessions",
            CapFull::Listener => "max_sessions",
            CapFull::PerIp => "max_datagram_sessions_per_ip",
        }
    }
}

/// The server-wide datagram caps and their live counts.
#[derive(Debug)]
pub(crate) struct DatagramCaps {
    max_sessions: usize,
    /// 0 = no per-IP cap.
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_handshakes: usize,
    handshakes: Arc<AtomicUsize>,
    /// One event loop's share of `max_sessions`: reclaiming looks only at the loop a datagram
    /// arrived on, so each loop must reclaim before the global cap is full, or a loop holding
    /// only active (healthy) sessions would have to evict one of them for another loop's flood.
    per_loop: usize,
}

/// One listener's cap (`max_sessions`; 0 = only the server-wide caps) and its count.
#[derive(Debug, Default)]
pub(crate) struct ListenerCap {
    max: usize,
    open: AtomicUsize,
}

impl ListenerCap {
    pub(crate) fn new(max: usize) -> Self {
        ListenerCap {
            max,
            open: AtomicUsize::new(0),
        }
    }
}

impl DatagramCaps {
    /// `max_handshakes` is the dtls share of the server's `max_handshakes`.
    pub(crate) fn new(max_sessions: usize, max_per_ip: usize, max_handshakes: usize) -> Self {
        DatagramCaps {
            max_sessions,
            max_per_ip,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            max_handshakes,
            handshakes: Arc::new(AtomicUsize::new(0)),
            per_loop: max_sessions,
        }
    }

    /// A place among the DTLS handshakes in flight, or `None` when the dtls share is taken.
    pub(crate) fn reserve_handshake(&self) -> Option<DtlsHandshakePlace> {
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= self.max_handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(DtlsHandshakePlace {
            in_flight: Arc::clone(&self.handshakes),
        })
    }

    /// Takes a place for a session of `listener` from `ip`, or says which cap is full (the most
    /// specific first: per IP, then the listener, then all datagram sessions).
    /// Splits `max_sessions` over `loops` event loops (each gets `max_sessions / loops`, at
    /// least 1), so the shares never add up to more than the global cap.
    pub(crate) fn split_over_loops(mut self, loops: usize) -> Self {
        self.per_loop = self
            .max_sessions
            .checked_div(loops)
            .unwrap_or(self.max_sessions)
            .max(1);
        self
    }

    /// How many datagram sessions one event loop may hold before it reclaims its own.
    pub(crate) fn per_loop(&self) -> usize {
        self.per_loop
    }

    pub(crate) fn take(
        self: &Arc<Self>,
        listener: &Arc<ListenerCap>,
        ip: IpAddr,
    ) -> Result<DatagramPlace, CapFull> {
        let ip = ip.to_canonical();
        let counted_ip = match self.max_per_ip {
            0 => None,
            max => {
                let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
                let count = per_ip.entry(ip).or_insert(0);
                if *count >= max {
                    return Err(CapFull::PerIp);
                }
                *count = count.saturating_add(1);
                Some(ip)
            }
        };
        // From here on the place drops itself on refusal: the counts stay exact.
        let mut place = DatagramPlace {
            caps: Arc::clone(self),
            listener: None,
            global: false,
            ip: counted_ip,
        };
        if listener.max > 0 {
            if listener.open.fetch_add(1, Ordering::AcqRel) >= listener.max {
                listener.open.fetch_sub(1, Ordering::AcqRel);
                return Err(CapFull::Listener);
            }
            place.listener = Some(Arc::clone(listener));
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_sessions {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(CapFull::Sessions);
        }
        place.global = true;
        Ok(place)
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A DTLS handshake's place in the dtls share of `max_handshakes`, given back on drop.
#[derive(Debug)]
pub(crate) struct DtlsHandshakePlace {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for DtlsHandshakePlace {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A datagram session's places under the datagram caps, given back on drop.
#[derive(Debug)]
pub(crate) struct DatagramPlace {
    caps: Arc<DatagramCaps>,
    listener: Option<Arc<ListenerCap>>,
    global: bool,
    ip: Option<IpAddr>,
}

impl Drop for DatagramPlace {
    fn drop(&mut self) {
        if self.global {
            self.caps.open.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(listener) = &self.listener {
            listener.open.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(ip) = self.ip {
            let mut per_ip = self
                .caps
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_cap_refuses_with_its_name_and_places_come_back() {
        let caps = Arc::new(DatagramCaps::new(3, 2, 1));
        let listener = Arc::new(ListenerCap::new(0));
        let a = caps.take(&listener, ip("127.0.0.1")).unwrap();
        let _b = caps.take(&listener, ip("::ffff:127.0.0.1")).unwrap();
        assert_eq!(
            caps.take(&listener, ip("127.0.0.1")).unwrap_err(),
            CapFull::PerIp,
            "mapped IPv6 counts as the IPv4 address"
        );
        let _c = caps.take(&listener, ip("127.0.0.2")).unwrap();
        assert_eq!(
            caps.take(&listener, ip("127.0.0.3")).unwrap_err(),
            CapFull::Sessions
        );
        assert_eq!(caps.open(), 3, "refusals gave their places back");
        drop(a);
        let small = Arc::new(ListenerCap::new(1));
        let _d = caps.take(&small, ip("127.0.0.3")).unwrap();
        assert_eq!(
            caps.take(&small, ip("127.0.0.4")).unwrap_err(),
            CapFull::Listener
        );
        assert_eq!(
            caps.take(&listener, ip("127.0.0.4")).unwrap_err(),
            CapFull::Sessions
        );
        assert_eq!(small.open.load(Ordering::Acquire), 1);
        let caps = Arc::new(DatagramCaps::new(10, 0, 1));
        let _e = caps.take(&small, ip("127.0.0.5")).unwrap_err();
        assert_eq!(
            caps.take(&small, ip("127.0.0.5")).unwrap_err(),
            CapFull::Listener
        );
        assert!(caps.per_ip.lock().unwrap().is_empty());
        assert_eq!(caps.open(), 0);
    }

    #[test]
    fn dtls_handshakes_are_held_to_their_share() {
        let caps = DatagramCaps::new(10, 0, 2);
        let first = caps.reserve_handshake().unwrap();
        let _second = caps.reserve_handshake().unwrap();
        assert!(caps.reserve_handshake().is_none());
        drop(first);
        assert!(caps.reserve_handshake().is_some());
    }
}
