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
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
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
    /// What each protocol group running on this listener decided (one entry per group: the
    /// listener's own, and the one it runs inside TLS). Written once per session, when its
    /// group decides; an entry is added by a group's first session here.
    groups: RwLock<Vec<Arc<GroupTally>>>,
}

impl Default for ListenerStats {
    fn default() -> Self {
        ListenerStats {
            shards: Box::new(std::array::from_fn(|_| Shard::default())),
            shared: Shard::default(),
            accepted: AtomicU64::new(0),
            refused: Default::default(),
            groups: RwLock::new(Vec::new()),
        }
    }
}

/// Why a protocol group gave a session to its fallback (or closed it, having none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupFallback {
    /// Every member said "not mine".
    NoMatch = 0,
    /// The byte budget was spent with no member claiming the bytes.
    ByteBudget = 1,
    /// The time budget passed with no member claiming the bytes.
    TimeBudget = 2,
}

impl GroupFallback {
    const ALL: [GroupFallback; 3] = [
        GroupFallback::NoMatch,
        GroupFallback::ByteBudget,
        GroupFallback::TimeBudget,
    ];

    fn as_str(self) -> &'static str {
        match self {
            GroupFallback::NoMatch => "no_match",
            GroupFallback::ByteBudget => "byte_budget",
            GroupFallback::TimeBudget => "time_budget",
        }
    }
}

/// A protocol group's detection budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupBudget {
    /// The most first bytes it buffers.
    Bytes = 0,
    /// How long it waits for the bytes that decide.
    Time = 1,
}

impl GroupBudget {
    const ALL: [GroupBudget; 2] = [GroupBudget::Bytes, GroupBudget::Time];

    fn as_str(self) -> &'static str {
        match self {
            GroupBudget::Bytes => "bytes",
            GroupBudget::Time => "time",
        }
    }
}

/// What one protocol group decided for the sessions of one listener.
#[derive(Debug)]
pub(crate) struct GroupTally {
    /// The group's identity (unique per group built).
    group: u64,
    /// The group runs inside TLS (after its parent's TLS member).
    inside_tls: bool,
    /// Sessions given to each member, in the group's order.
    members: Box<[(String, AtomicU64)]>,
    fallbacks: [AtomicU64; GroupFallback::ALL.len()],
    budgets_spent: [AtomicU64; GroupBudget::ALL.len()],
}

impl GroupTally {
    /// A zero tally of group `group` whose members are `members`, in order.
    pub(crate) fn new(group: u64, inside_tls: bool, members: Vec<String>) -> GroupTally {
        GroupTally {
            group,
            inside_tls,
            members: members
                .into_iter()
                .map(|name| (name, AtomicU64::new(0)))
                .collect(),
            fallbacks: Default::default(),
            budgets_spent: Default::default(),
        }
    }

    /// The member at `index` was given a session.
    pub(crate) fn member(&self, index: usize) {
        if let Some((_, count)) = self.members.get(index) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// The fallback was given a session, for `why`.
    pub(crate) fn fallback(&self, why: GroupFallback) {
        if let Some(count) = self.fallbacks.get(why as usize) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// A session's detection ended because `budget` was spent.
    pub(crate) fn budget_spent(&self, budget: GroupBudget) {
        if let Some(count) = self.budgets_spent.get(budget as usize) {
            count.fetch_add(1, Relaxed);
        }
    }

    fn layer(&self) -> &'static str {
        match self.inside_tls {
            true => "tls",
            false => "plain",
        }
    }

    /// Adds this tally to `into` (a snapshot of the same layer).
    fn add_to(&self, into: &mut ProtocolGroupSnapshot) {
        for (name, count) in self.members.iter() {
            let count = count.load(Relaxed);
            match into.members.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum = sum.saturating_add(count),
                None => into.members.push((name.clone(), count)),
            }
        }
        for ((_, sum), count) in into.fallbacks.iter_mut().zip(&self.fallbacks) {
            *sum = sum.saturating_add(count.load(Relaxed));
        }
        for ((_, sum), count) in into.budgets_spent.iter_mut().zip(&self.budgets_spent) {
            *sum = sum.saturating_add(count.load(Relaxed));
        }
    }
}

/// What the protocol groups of one layer of a listener decided, since it was bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolGroupSnapshot {
    /// `"plain"`: the listener's group, on the bytes as they arrive; `"tls"`: the group run on
    /// the decrypted stream after a TLS member started TLS.
    pub layer: &'static str,
    /// Sessions given to each member, by member name, in the group's order (a TLS member is
    /// `"tls"`).
    pub members: Vec<(String, u64)>,
    /// Sessions given to the fallback (or closed, for a group without one), by why:
    /// `no_match` (every member said "not mine"), `byte_budget`, `time_budget`.
    pub fallbacks: Vec<(&'static str, u64)>,
    /// Sessions whose detection a budget ended (`bytes` or `time`): undecided members then
    /// counted as not matching, whether a member or the fallback got the session.
    pub budgets_spent: Vec<(&'static str, u64)>,
}

impl ProtocolGroupSnapshot {
    fn empty(layer: &'static str) -> ProtocolGroupSnapshot {
        ProtocolGroupSnapshot {
            layer,
            members: Vec::new(),
            fallbacks: GroupFallback::ALL.iter().map(|f| (f.as_str(), 0)).collect(),
            budgets_spent: GroupBudget::ALL.iter().map(|b| (b.as_str(), 0)).collect(),
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

    /// Bytes read from this listener's peers, on every loop.
    pub(crate) fn bytes_received(&self) -> u64 {
        self.sum(|s| &s.bytes_in)
    }

    /// Bytes written to this listener's peers, on every loop.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.sum(|s| &s.bytes_out)
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

    /// Counts into group `group`'s tally for this listener, created by `make` for the group's
    /// first session here.
    pub(crate) fn with_group_tally(
        &self,
        group: u64,
        make: impl FnOnce() -> GroupTally,
        count: impl FnOnce(&GroupTally),
    ) {
        {
            let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(tally) = groups.iter().find(|t| t.group == group) {
                count(tally);
                return;
            }
        }
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let tally = match groups.iter().find(|t| t.group == group) {
            Some(tally) => Arc::clone(tally),
            None => {
                let tally = Arc::new(make());
                groups.push(Arc::clone(&tally));
                tally
            }
        };
        drop(groups);
        count(&tally);
    }

    /// The protocol groups' tallies, one snapshot per layer (groups of the same layer, such as
    /// a group nested in another, summed by member name), plain first.
    pub(crate) fn group_snapshots(&self) -> Vec<ProtocolGroupSnapshot> {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        let mut snapshots: Vec<ProtocolGroupSnapshot> = Vec::new();
        for inside_tls in [false, true] {
            let mut layer = None;
            for tally in groups.iter().filter(|t| t.inside_tls == inside_tls) {
                let snapshot =
                    layer.get_or_insert_with(|| ProtocolGroupSnapshot::empty(tally.layer()));
                tally.add_to(snapshot);
            }
            snapshots.extend(layer);
        }
        snapshots
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
                    protocol_groups: stats.group_snapshots(),
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
    /// What the listener's protocol groups decided, per layer (empty when its service is
    /// not a [`crate::ProtocolGroup`] or no session was decided yet).
    pub protocol_groups: Vec<ProtocolGroupSnapshot>,
}

/// One event loop's counters at a point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopSnapshot {
    /// The loop's index (0-based).
    pub index: usize,
    /// Sessions the loop owns now (every transport).
    pub sessions_open: u64,
    /// Connections this loop accepted and passed to a less loaded loop (it had clearly more
    /// sessions than that one).
    pub sessions_passed_on: u64,
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
    write_protocol_groups(out, listeners);
    let open: fn(&LoopSnapshot) -> u64 = |l| l.sessions_open;
    let passed_on: fn(&LoopSnapshot) -> u64 = |l| l.sessions_passed_on;
    for (name, kind, help, pick) in [
        (
            "event_loop_sessions_open",
            "gauge",
            "Sessions each event loop owns now.",
            open,
        ),
        (
            "event_loop_sessions_passed_on_total",
            "counter",
            "Connections each event loop accepted and passed to a less loaded loop.",
            passed_on,
        ),
    ] {
        family(out, name, kind, help);
        for l in loops {
            sample(out, name, &[("loop", &l.index.to_string())], pick(l));
        }
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

/// The `protocol_group_*` families: what each listener's protocol groups decided.
fn write_protocol_groups(out: &mut String, listeners: &[ListenerSnapshot]) {
    let groups = || {
        listeners.iter().flat_map(|l| {
            l.protocol_groups
                .iter()
                .map(move |group| (l.name.as_str(), group))
        })
    };
    family(
        out,
        "protocol_group_sessions_total",
        "counter",
        "Sessions a protocol group gave to a member, by listener, layer (plain, or tls: the group run inside TLS) and member.",
    );
    for (listener, group) in groups() {
        for (member, count) in &group.members {
            let labels = [
                ("listener", listener),
                ("layer", group.layer),
                ("member", member.as_str()),
            ];
            sample(out, "protocol_group_sessions_total", &labels, *count);
        }
    }
    family(
        out,
        "protocol_group_fallbacks_total",
        "counter",
        "Sessions a protocol group gave to its fallback, by listener, layer and reason (no_match, byte_budget, time_budget).",
    );
    for (listener, group) in groups() {
        for (reason, count) in &group.fallbacks {
            let labels = [
                ("listener", listener),
                ("layer", group.layer),
                ("reason", reason),
            ];
            sample(out, "protocol_group_fallbacks_total", &labels, *count);
        }
    }
    family(
        out,
        "protocol_group_budget_spent_total",
        "counter",
        "Sessions whose protocol detection a budget ended (bytes or time), by listener, layer and budget.",
    );
    for (listener, group) in groups() {
        for (budget, count) in &group.budgets_spent {
            let labels = [
                ("listener", listener),
                ("layer", group.layer),
                ("budget", budget),
            ];
            sample(out, "protocol_group_budget_spent_total", &labels, *count);
        }
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
    fn protocol_group_tallies_are_summed_per_layer_and_rendered_per_member_reason_and_budget() {
        let stats = ListenerStats::default();
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let count = |group: u64, inside_tls: bool, list: &[&str], what: &dyn Fn(&GroupTally)| {
            stats.with_group_tally(
                group,
                || GroupTally::new(group, inside_tls, names(list)),
                what,
            )
        };
        count(1, false, &["tls", "http"], &|t| t.member(0));
        count(1, false, &["tls", "http"], &|t| t.member(1));
        count(1, false, &["tls", "http"], &|t| {
            t.fallback(GroupFallback::TimeBudget);
            t.budget_spent(GroupBudget::Time);
        });
        count(2, true, &["http"], &|t| t.member(0));
        // A second group on the same layer (nested): summed by member name.
        count(3, false, &["http", "raw"], &|t| t.member(1));
        count(3, false, &["http", "raw"], &|t| t.member(0));
        let snapshots = stats.group_snapshots();
        assert_eq!(
            snapshots,
            [
                ProtocolGroupSnapshot {
                    layer: "plain",
                    members: vec![("tls".into(), 1), ("http".into(), 2), ("raw".into(), 1)],
                    fallbacks: vec![("no_match", 0), ("byte_budget", 0), ("time_budget", 1)],
                    budgets_spent: vec![("bytes", 0), ("time", 1)],
                },
                ProtocolGroupSnapshot {
                    layer: "tls",
                    members: vec![("http".into(), 1)],
                    fallbacks: vec![("no_match", 0), ("byte_budget", 0), ("time_budget", 0)],
                    budgets_spent: vec![("bytes", 0), ("time", 0)],
                },
            ]
        );
        let listener = ListenerSnapshot {
            name: "group".into(),
            transport: "tcp",
            addr: "127.0.0.1:80".parse().unwrap(),
            service: "auto".into(),
            sessions_open: 0,
            accepted: 5,
            refused: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
            protocol_groups: snapshots,
        };
        let mut out = String::new();
        write_prometheus(&mut out, &[listener], &[], 0);
        for line in [
            "# TYPE plexus_protocol_group_sessions_total counter\n",
            "plexus_protocol_group_sessions_total{listener=\"group\",layer=\"plain\",member=\"http\"} 2\n",
            "plexus_protocol_group_sessions_total{listener=\"group\",layer=\"tls\",member=\"http\"} 1\n",
            "plexus_protocol_group_fallbacks_total{listener=\"group\",layer=\"plain\",reason=\"time_budget\"} 1\n",
            "plexus_protocol_group_fallbacks_total{listener=\"group\",layer=\"tls\",reason=\"no_match\"} 0\n",
            "plexus_protocol_group_budget_spent_total{listener=\"group\",layer=\"plain\",budget=\"time\"} 1\n",
        ] {
            assert!(out.contains(line), "{line} in:\n{out}");
        }
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
            protocol_groups: Vec::new(),
        };
        let event_loop = LoopSnapshot {
            index: 0,
            sessions_open: 2,
            sessions_passed_on: 3,
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
        assert!(out.contains("plexus_event_loop_sessions_passed_on_total{loop=\"0\"} 3\n"));
        assert!(out.contains("plexus_start_time_seconds 42\n"));
    }
}
