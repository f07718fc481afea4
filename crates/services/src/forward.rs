//! `forward`: relays a session's byte stream to an upstream TCP server and back — a TCP proxy
//! for plain listeners, TLS termination for tls listeners — on plexus' connectors
//! ([`plexus::connector`]) alone.
//!
//! Each client session opens its own upstream session on its event loop
//! ([`Session::connect`]). Bytes go across with [`Session::send_to`]; the runtime's link
//! backpressure stops reading the side whose partner's queue is past the high watermark, so
//! each direction is bounded by the watermarks (plus one read). A half-close travels through:
//! the client's FIN (or close_notify) becomes a FIN to the upstream once everything before it
//! is written ([`Session::finish_to`]), and the upstream's FIN comes back the same way (as
//! close_notify to a TLS client). The pair ends when both directions have.
//!
//! On a tcp listener with a plain upstream and `splice = true` (the default), the pair is
//! switched to splice(2) ([`Session::splice_with`]) once it carries bulk: the first read of at
//! least [`SPLICE_AFTER_READ`] bytes in either direction after the upstream connected (what
//! HAProxy's `splice-auto` does with a full buffer). From then on the bytes move socket to
//! socket inside the kernel, and the handlers only see the ends. Short connections and small
//! messages never switch: for them two pipes and two splices per message cost more than a
//! read and a write.
//! Otherwise (TLS on either side, `splice = false`, no descriptor for a pipe) bytes are copied
//! through user space (read into the loop's buffer, queued, written).
//!
//! The upstream (`upstream = "HOST:PORT"`, or several: `upstreams = [...]`) is resolved when
//! the listener is built (at start or when a reload adds or changes it), never on a loop; its
//! addresses are tried in order, each within the server's `handshake_timeout`. With
//! `upstream_tls = true` the upstream session is a TLS client (TLS origination): the
//! certificate must chain to `upstream_ca` (else the system's roots) and name `upstream_sni`
//! (else the upstream's host).
//!
//! Several upstreams ([`Pool`]): each connection picks one by `balance` — `round_robin`, each
//! in turn, with a cursor per event loop (a [`LoopLocal`]: no shared write on the hot path), or
//! `least_conn`, the one with the fewest upstream sessions open on every loop (each upstream's
//! open-session counter, which the runtime keeps anyway: relaxed loads, no lock). Passive health
//! check: an upstream whose connect is refused, fails or times out (or, with `upstream_tls`,
//! whose handshake fails or times out: a wrong certificate too) is marked down for
//! `upstream_fail_timeout` (one relaxed atomic per upstream, written only on a failure or the
//! first success after one), skipped by every loop meanwhile, and the connection moves on to
//! the next upstream it has not tried, what the client sent so far replayed to it (that copy
//! is bounded by the link backpressure: the client is not read while the upstream's queue is
//! past the high watermark). When every upstream is down, or every one failed, the client is
//! closed and the log says why.
//!
//! With `upstream_proxy_protocol = "v1" | "v2"` the first bytes to the upstream are a PROXY
//! header naming the client (the session's peer: on a `proxy_protocol` listener, the client
//! the balancer's header named) and the address it connected to.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus::config::{Balance, ProxyVersion, Transport};
use plexus::tls_client::{self, ServerTrust};
use plexus::{
    BoxError, CloseReason, LinkEvent, ListenerContext, LoopLocal, Service, ServiceFactory, Session,
    SessionHandler, SessionId, Upstream,
};
use plexus_proto::{encode_proxy_v1, encode_proxy_v2};
use tracing::info;

/// Builds the `forward` service of each listener from its `upstream` (or `upstreams`) keys.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwardFactory;

impl ServiceFactory for ForwardFactory {
    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        let config = listener.config();
        let names: Vec<&str> = match &config.upstream {
            Some(upstream) => vec![upstream.as_str()],
            None => config.upstreams.iter().map(String::as_str).collect(),
        };
        if names.is_empty() {
            return Err(format!("listener {}: forward needs an upstream", listener.name()).into());
        }
        let client = match config.upstream_tls {
            true => {
                let trust = match &config.upstream_ca {
                    Some(path) => ServerTrust::CaFile(path.clone()),
                    None => ServerTrust::SystemRoots,
                };
                Some(tls_client::client_config(&trust, &[])?)
            }
            false => None,
        };
        let mut upstreams = Vec::with_capacity(names.len());
        for upstream in names {
            let mut resolved =
                Upstream::resolve(upstream)?.with_connect_timeout(listener.handshake_timeout());
            if let Some(client) = &client {
                // The host of HOST:PORT unless upstream_sni names another (validated with the
                // configuration).
                let host = upstream
                    .rsplit_once(':')
                    .map_or(upstream, |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = config.upstream_sni.as_deref().unwrap_or(host);
                resolved = resolved.with_tls(Arc::clone(client), tls_client::server_name(name)?);
            }
            upstreams.push(resolved);
        }
        let forward = match config.upstream {
            Some(_) => {
                Forward::from_pool(Pool::new(upstreams, Balance::RoundRobin, Duration::ZERO))
            }
            None => Forward::from_pool(Pool::new(
                upstreams,
                config.balance,
                config.upstream_fail_timeout,
            )),
        };
        // Plain on both sides: a tcp listener and a plain upstream.
        let splice = config.splice && config.transport == Transport::Tcp && !config.upstream_tls;
        Ok(Arc::new(
            forward
                .with_proxy_protocol(config.upstream_proxy_protocol)
                .with_splice(splice),
        ))
    }
}

/// Upstreams to balance over, with their health: see the module docs.
#[derive(Debug)]
pub struct Pool {
    members: Vec<Member>,
    balance: Balance,
    fail_timeout: Duration,
    /// The origin of the `down_until` clocks.
    origin: Instant,
}

#[derive(Debug)]
struct Member {
    upstream: Upstream,
    /// Nanoseconds after `origin` until which it is skipped; 0 = up.
    down_until: AtomicU64,
}

impl Pool {
    /// `upstreams` balanced by `balance`; one whose connect fails is skipped for
    /// `fail_timeout` (zero: never skipped).
    pub fn new(upstreams: Vec<Upstream>, balance: Balance, fail_timeout: Duration) -> Pool {
        Pool {
            members: upstreams
                .into_iter()
                .map(|upstream| Member {
                    upstream,
                    down_until: AtomicU64::new(0),
                })
                .collect(),
            balance,
            fail_timeout,
            origin: Instant::now(),
        }
    }

    /// The upstream at `index`.
    pub fn upstream(&self, index: usize) -> Option<&Upstream> {
        self.members.get(index).map(|member| &member.upstream)
    }

    /// `now` on the `down_until` clock (at least 1, so that 0 means "up").
    fn clock(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }

    /// Whether the upstream at `index` is skipped at `now`.
    pub fn is_down(&self, index: usize, now: Instant) -> bool {
        self.members
            .get(index)
            .is_some_and(|member| member.down_until.load(Relaxed) > self.clock(now))
    }

    /// The upstream a new connection goes to at `now`: not down, not in `tried`, picked by
    /// the pool's balance starting at `cursor` (this loop's turn, advanced past the pick).
    /// `None`: none is left.
    pub fn choose(&self, now: Instant, cursor: &mut usize, tried: &[usize]) -> Option<usize> {
        self.choose_by(now, cursor, tried, Upstream::open_sessions)
    }

    /// [`Pool::choose`] with the load of each upstream (for least connections) from `load`.
    fn choose_by(
        &self,
        now: Instant,
        cursor: &mut usize,
        tried: &[usize],
        load: impl Fn(&Upstream) -> u64,
    ) -> Option<usize> {
        let count = self.members.len();
        let start = cursor.checked_rem(count)?;
        let mut eligible = (0..count)
            .map(|step| start.wrapping_add(step).checked_rem(count).unwrap_or(0))
            .filter(|index| !tried.contains(index) && !self.is_down(*index, now));
        let chosen = match self.balance {
            Balance::RoundRobin => eligible.next(),
            // The first of the least loaded, in turn from the cursor (ties rotate).
            Balance::LeastConn => eligible
                .map(|index| (self.upstream(index).map_or(u64::MAX, &load), index))
                .fold(
                    None,
                    |best: Option<(u64, usize)>, (load, index)| match best {
                        Some((least, _)) if least <= load => best,
                        _ => Some((load, index)),
                    },
                )
                .map(|(_, index)| index),
        }?;
        *cursor = chosen.wrapping_add(1);
        Some(chosen)
    }

    /// The connect to the upstream at `index` failed at `now`: it is skipped for the fail
    /// timeout. Whether it was up until now (so the caller logs the change once).
    pub fn failed(&self, index: usize, now: Instant) -> bool {
        let Some(member) = self.members.get(index) else {
            return false;
        };
        if self.fail_timeout.is_zero() {
            return false;
        }
        let now_clock = self.clock(now);
        let timeout = u64::try_from(self.fail_timeout.as_nanos()).unwrap_or(u64::MAX);
        let before = member
            .down_until
            .swap(now_clock.saturating_add(timeout), Relaxed);
        before <= now_clock
    }

    /// The upstream at `index` connected: it is up (whatever an earlier failure said).
    pub fn connected(&self, index: usize) {
        if let Some(member) = self.members.get(index) {
            if member.down_until.load(Relaxed) != 0 {
                member.down_until.store(0, Relaxed);
            }
        }
    }

    /// How many upstreams it holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// The smallest read (bytes) that makes a connected pair switch to splice: a read this large
/// says the stream carries bulk, where splice(2) costs less CPU than copying (BENCHMARKS.md
/// "Forward vs HAProxy": a 64 B echo costs 1.2x more spliced, 1 GiB 0.35x). A quarter of the
/// loop's 64 KiB read buffer, so a sender writing 16 KiB messages is spliced too.
pub const SPLICE_AFTER_READ: usize = 16 * 1024;

/// The forward service: a relay to one upstream of a [`Pool`].
#[derive(Debug, Clone)]
pub struct Forward {
    pool: Arc<Pool>,
    /// Each event loop's round-robin turn.
    cursor: LoopLocal<usize>,
    proxy: Option<ProxyVersion>,
    /// Ask the runtime to splice a connected pair once it carries bulk
    /// ([`Session::splice_with`], [`SPLICE_AFTER_READ`]).
    splice: bool,
}

impl Forward {
    /// A relay to `upstream` (no health check: a failed connect closes the client).
    pub fn new(upstream: Upstream) -> Self {
        Forward::from_pool(Pool::new(
            vec![upstream],
            Balance::RoundRobin,
            Duration::ZERO,
        ))
    }

    /// A relay to the upstreams of `pool`.
    pub fn from_pool(pool: Pool) -> Self {
        Forward {
            pool: Arc::new(pool),
            cursor: LoopLocal::new(),
            proxy: None,
            splice: false,
        }
    }

    /// The same relay sending a PROXY header of `version` (none: `None`) to the upstream
    /// first.
    #[must_use]
    pub fn with_proxy_protocol(mut self, version: Option<ProxyVersion>) -> Self {
        self.proxy = version;
        self
    }

    /// The same relay moving the bytes of a connected pair with splice(2), socket to socket
    /// inside the kernel, once it carries bulk (a read of [`SPLICE_AFTER_READ`] bytes or more;
    /// only plain TCP on both sides; see [`Session::splice_with`]).
    #[must_use]
    pub fn with_splice(mut self, splice: bool) -> Self {
        self.splice = splice;
        self
    }
}

/// The PROXY header of `version` for a client at `client` that connected to `local`.
fn proxy_header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    match version {
        ProxyVersion::V1 => encode_proxy_v1(client, local, &mut out),
        ProxyVersion::V2 => encode_proxy_v2(client, local, &mut out),
    }
    out
}

impl Service for Forward {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let header = self
            .proxy
            .map(|version| proxy_header(version, session.peer(), session.info().local()));
        let mut client = ClientSide {
            pool: Arc::clone(&self.pool),
            cursor: self.cursor.clone(),
            current: None,
            tried: Vec::new(),
            connected: false,
            replay: (self.pool.len() > 1).then(Vec::new),
            header,
            finished: false,
            splice: self.splice,
        };
        if !client.start(session) {
            info!(
                session = %session.id(), peer = %session.peer(),
                "forward: every upstream is down (skipped after a failed connect); closing client"
            );
            session.close();
        }
        Box::new(client)
    }
}

/// The upstream connection a client session is waiting for (or using).
struct Attempt {
    index: usize,
    id: SessionId,
    /// When it was asked for (its connect time is counted).
    asked: Instant,
}

/// The client's half: its bytes go upstream.
struct ClientSide {
    pool: Arc<Pool>,
    cursor: LoopLocal<usize>,
    current: Option<Attempt>,
    /// The upstreams tried for this client, in order.
    tried: Vec<usize>,
    connected: bool,
    /// What the client sent before the upstream connected, for the next upstream should this
    /// one fail (only with several upstreams; dropped once connected).
    replay: Option<Vec<u8>>,
    /// The PROXY header for the upstream, until one connected.
    header: Option<Vec<u8>>,
    /// The client finished sending (its FIN travels to the upstream).
    finished: bool,
    /// Splice the pair once a bulk read is seen (cleared once asked).
    splice: bool,
}

impl ClientSide {
    /// Opens a connection to the next upstream the pool gives; false if there is none.
    fn start(&mut self, session: &mut Session<'_>) -> bool {
        let now = session.now();
        let cursor = session.loop_local(&self.cursor);
        let Some(index) = self.pool.choose(now, cursor, &self.tried) else {
            return false;
        };
        let Some(upstream) = self.pool.upstream(index) else {
            return false;
        };
        let client = session.id();
        let splice = self.splice;
        let id = session.connect(upstream, Box::new(UpstreamSide { client, splice }));
        if let Some(header) = &self.header {
            session.send_to(id, header);
        }
        if let Some(replay) = &self.replay {
            session.send_to(id, replay);
        }
        if self.finished {
            session.finish_to(id);
        }
        self.tried.push(index);
        self.current = Some(Attempt {
            index,
            id,
            asked: now,
        });
        true
    }

    /// The upstream being connected failed to connect: marks it down and moves on to the
    /// next, or closes the client when there is none left.
    fn failover(&mut self, session: &mut Session<'_>, index: usize, reason: &CloseReason) {
        let pool = Arc::clone(&self.pool);
        let name = pool.upstream(index).map_or("", Upstream::name).to_owned();
        if pool.failed(index, session.now()) {
            info!(
                upstream = %name, "forward: upstream failed to connect ({reason}); skipped for {:?}",
                pool.fail_timeout
            );
        }
        if self.start(session) {
            return;
        }
        info!(
            session = %session.id(), peer = %session.peer(), upstream = %name,
            "forward: upstream ended ({reason}) and no other upstream is left to try; closing client"
        );
        session.close();
    }
}

impl SessionHandler for ClientSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if let Some(attempt) = &self.current {
            session.send_to(attempt.id, data);
            if self.splice && self.connected && data.len() >= SPLICE_AFTER_READ {
                self.splice = false;
                session.splice_with(attempt.id);
            }
        }
        if let Some(replay) = &mut self.replay {
            replay.extend_from_slice(data);
        }
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        self.finished = true;
        if let Some(attempt) = &self.current {
            session.finish_to(attempt.id);
        }
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        match event {
            LinkEvent::Connected { upstream, .. } => {
                let Some(attempt) = self.current.as_ref().filter(|a| a.id == upstream) else {
                    return;
                };
                self.connected = true;
                self.replay = None;
                self.header = None;
                self.pool.connected(attempt.index);
                if let Some(target) = self.pool.upstream(attempt.index) {
                    let elapsed = session.now().saturating_duration_since(attempt.asked);
                    target.record_connect_time(elapsed);
                }
            }
            LinkEvent::Closed { peer, reason } => {
                let Some(index) = self
                    .current
                    .as_ref()
                    .filter(|a| a.id == peer)
                    .map(|a| a.index)
                else {
                    return;
                };
                if reason == CloseReason::DescriptorsExhausted {
                    // Not the upstream's fault (no health mark), and every other upstream
                    // would need a descriptor too. The runtime logged it, throttled.
                    session.close();
                    return;
                }
                if !self.connected {
                    // It ended before `Connected`: refused, timed out, or (upstream_tls) its
                    // handshake failed or timed out. Either way this upstream cannot serve:
                    // the next one is tried.
                    self.failover(session, index, &reason);
                    return;
                }
                if !matches!(reason, CloseReason::PeerClosed | CloseReason::Requested) {
                    let name = self.pool.upstream(index).map_or("", Upstream::name);
                    info!(
                        session = %session.id(), peer = %session.peer(), upstream = name,
                        "forward: upstream ended ({reason}); closing client"
                    );
                }
                session.close();
            }
            _ => session.close(),
        }
    }
}

/// The upstream's half: its bytes go back to the client.
struct UpstreamSide {
    client: SessionId,
    /// Splice the pair once a bulk read is seen (cleared once asked).
    splice: bool,
}

impl SessionHandler for UpstreamSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.client, data);
        // Data from the upstream means it connected.
        if self.splice && data.len() >= SPLICE_AFTER_READ {
            self.splice = false;
            session.splice_with(self.client);
        }
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        session.finish_to(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(count: usize, balance: Balance) -> Pool {
        let upstreams = (0..count)
            .map(|at| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + at as u16));
                Upstream::new(&addr.to_string(), vec![addr]).unwrap()
            })
            .collect();
        Pool::new(upstreams, balance, Duration::from_secs(10))
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_skips_the_down_and_the_tried() {
        let pool = pool(3, Balance::RoundRobin);
        let now = Instant::now();
        let mut cursor = 0;
        let picks: Vec<_> = (0..6)
            .map(|_| pool.choose(now, &mut cursor, &[]).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert!(pool.failed(1, now));
        assert!(!pool.failed(1, now), "already down: logged once");
        let picks: Vec<_> = (0..4)
            .map(|_| pool.choose(now, &mut cursor, &[]).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(pool.choose(now, &mut cursor, &[0, 2]), None);
        // Up again after the fail timeout, or as soon as it connects.
        let later = now + Duration::from_secs(11);
        assert!(!pool.is_down(1, later));
        assert!(pool.is_down(1, now + Duration::from_secs(9)));
        pool.connected(1);
        assert!(!pool.is_down(1, now));
    }

    #[test]
    fn least_conn_picks_the_least_loaded_and_rotates_ties() {
        let pool = pool(3, Balance::LeastConn);
        let now = Instant::now();
        let mut cursor = 0;
        let loads = [5u64, 1, 1];
        let load = |upstream: &Upstream| {
            let at = pool
                .members
                .iter()
                .position(|m| m.upstream.name() == upstream.name());
            loads[at.unwrap()]
        };
        assert_eq!(pool.choose_by(now, &mut cursor, &[], load), Some(1));
        assert_eq!(pool.choose_by(now, &mut cursor, &[], load), Some(2));
        assert_eq!(pool.choose_by(now, &mut cursor, &[], load), Some(1));
        assert_eq!(pool.choose_by(now, &mut cursor, &[1, 2], load), Some(0));
        pool.failed(0, now);
        assert_eq!(pool.choose_by(now, &mut cursor, &[1, 2], load), None);
    }

    #[test]
    fn no_fail_timeout_means_no_health_check() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 7000));
        let one = Upstream::new("one", vec![addr]).unwrap();
        let pool = Pool::new(vec![one], Balance::RoundRobin, Duration::ZERO);
        let now = Instant::now();
        assert!(!pool.failed(0, now));
        let mut cursor = 7;
        assert_eq!(pool.choose(now, &mut cursor, &[]), Some(0));
        assert_eq!(pool.choose(now, &mut cursor, &[0]), None);
    }
}
