//! Protocol groups: several protocols on one listener, told apart by a session's first bytes
//! (the seed's `network_protocol_group`). Owns the [`Detector`] trait, the ready detectors for
//! the protocols plexus knows, and [`ProtocolGroup`], the [`Service`] that buffers a session's
//! first bytes, asks its members in order, and hands the session to the one that claims it.
//!
//! How a group decides, on every read until it has decided:
//! - the bytes seen so far (at most the byte budget, plus the last read) go to each member's
//!   detector, in the order the members were added;
//! - the first member that answers [`Detection::Mine`], with every member before it answering
//!   [`Detection::NotMine`], is chosen: its service opens the session's handler and the
//!   buffered bytes are replayed to it as its first data;
//! - a member that answers [`Detection::NeedMore`] keeps the group waiting (members after it
//!   wait their turn) — until a budget is spent;
//! - once the byte budget is spent, or the time budget (the server's `handshake_timeout` for
//!   groups built by a [`crate::ServiceFactory`]) passes first, an undecided member counts as
//!   [`Detection::NotMine`]: the first member that answers `Mine` is chosen, else the fallback;
//! - when every member answers `NotMine`, the fallback is chosen at once.
//!
//! The fallback is the group's [`ProtocolGroupBuilder::fallback`] service; a group without
//! one closes such sessions (a debug log line says why).
//!
//! TLS as a member ([`ProtocolGroupBuilder::tls`]): a ClientHello turns the session into a
//! TLS session ([`Session::start_tls`], the buffered bytes become the first ciphertext) and,
//! once the handshake is done, the same group without its TLS member runs again on the
//! decrypted stream. A TLS member belongs on plain tcp listeners only: a tls listener's
//! sessions are decrypted before any service sees them.
//!
//! Because detectors see every byte so far each time, a group decides the same way whether
//! the client sends its first bytes at once or one at a time.
//!
//! What a group decides is counted per listener and shown on `/metrics`
//! (`plexus_protocol_group_sessions_total`, `…_fallbacks_total`, `…_budget_spent_total`,
//! labelled with the listener, the layer — `plain`, or `tls` for the group run inside TLS —
//! and the member, fallback reason or budget; see [`crate::ProtocolGroupSnapshot`]), and per
//! group by [`ProtocolGroup::counts`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::breakdown::{GroupBudget, GroupFallback, GroupTally};
use crate::service::{CloseReason, Service, Session, SessionHandler, SessionInfo};

/// A detector's answer about a session's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// These bytes start this detector's protocol.
    Mine,
    /// These bytes cannot start this detector's protocol.
    NotMine,
    /// These bytes are a beginning of this protocol's signature: more are needed to decide.
    NeedMore,
}

/// Tells whether a session's first bytes are one protocol's. Called with every byte the group
/// has buffered so far (never empty), so an answer must depend on those bytes only.
///
/// A closure `Fn(&[u8]) -> Detection` is a detector.
pub trait Detector: Send + Sync + 'static {
    /// Whether `first`, the session's first bytes, belong to this protocol.
    fn detect(&self, first: &[u8]) -> Detection;
}

impl<F> Detector for F
where
    F: Fn(&[u8]) -> Detection + Send + Sync + 'static,
{
    fn detect(&self, first: &[u8]) -> Detection {
        self(first)
    }
}

/// The answer of a signature detector: `Mine` once `first` starts with `signature`,
/// `NeedMore` while `first` is a beginning of it, `NotMine` otherwise.
fn signature(first: &[u8], signature: &[u8]) -> Detection {
    if first.starts_with(signature) {
        Detection::Mine
    } else if signature.starts_with(first) {
        Detection::NeedMore
    } else {
        Detection::NotMine
    }
}

/// A protocol whose sessions start with fixed bytes (a magic number, a greeting word).
#[derive(Debug, Clone)]
pub struct Prefix {
    bytes: Vec<u8>,
}

/// A detector for sessions that start with `bytes` (which should not be empty: an empty
/// prefix claims every session).
pub fn prefix(bytes: impl Into<Vec<u8>>) -> Prefix {
    Prefix {
        bytes: bytes.into(),
    }
}

impl Detector for Prefix {
    fn detect(&self, first: &[u8]) -> Detection {
        signature(first, &self.bytes)
    }
}

/// A TLS handshake record (a ClientHello): content type 22, then version 3.0 to 3.4.
/// Decides within 3 bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsClientHello;

impl Detector for TlsClientHello {
    fn detect(&self, first: &[u8]) -> Detection {
        match first {
            [0x16, 0x03, 0x00..=0x04, ..] => Detection::Mine,
            [] | [0x16] | [0x16, 0x03] => Detection::NeedMore,
            _ => Detection::NotMine,
        }
    }
}

/// The methods an HTTP/1.x request line may start with, each with its space.
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// An HTTP/1.x request line: one of the standard methods (case-sensitive, as HTTP is) and a
/// space. Decides within 8 bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Http1Request;

impl Detector for Http1Request {
    fn detect(&self, first: &[u8]) -> Detection {
        let mut answer = Detection::NotMine;
        for method in HTTP1_METHODS {
            match signature(first, method) {
                Detection::Mine => return Detection::Mine,
                Detection::NeedMore => answer = Detection::NeedMore,
                Detection::NotMine => {}
            }
        }
        answer
    }
}

/// The HTTP/2 prior-knowledge connection preface, as far as `PRI * HTTP/2.0`. The built-in
/// `http` service (`plexus_services::Http`) serves such a session as HTTP/2.
#[derive(Debug, Clone, Copy, Default)]
pub struct Http2Preface;

impl Detector for Http2Preface {
    fn detect(&self, first: &[u8]) -> Detection {
        signature(first, b"PRI * HTTP/2.0")
    }
}

/// The member names a configuration's `protocols` key may list before its last entry (the
/// fallback): the protocols plexus has a ready detector and a built-in service for. (Defined
/// with the configuration, which validates the key.)
pub use crate::config::PROTOCOL_MEMBERS as CONFIG_MEMBERS;

/// The byte budget of a group built without [`ProtocolGroupBuilder::byte_budget`]: enough for
/// every ready detector (the longest needs 14 bytes) and for short application signatures.
pub const DEFAULT_BYTE_BUDGET: usize = 64;

/// The time budget of a group built without [`ProtocolGroupBuilder::time_budget`] (the
/// default `handshake_timeout`; a [`crate::ServiceFactory`] should pass
/// [`crate::ListenerContext::handshake_timeout`]).
pub const DEFAULT_TIME_BUDGET: Duration = Duration::from_secs(10);

/// What a member does with a session it claims.
enum Action {
    /// Open this service's handler and replay the buffered bytes to it.
    Open(Arc<dyn Service>),
    /// Start TLS with this configuration; then run this group (the same without TLS) inside.
    Tls(Arc<rustls::ServerConfig>, Arc<ProtocolGroup>),
}

struct Member {
    name: String,
    detector: Arc<dyn Detector>,
    action: Action,
    chosen: AtomicU64,
}

/// How one session's detection ended, for [`ProtocolGroup::counts`].
struct Counters {
    /// Fallbacks because every member said `NotMine`.
    no_match: AtomicU64,
    /// Fallbacks because the byte budget was spent.
    byte_budget: AtomicU64,
    /// Fallbacks because the time budget passed.
    timed_out: AtomicU64,
}

/// Gives each group built its identity (the key of its per-listener counts).
static NEXT_GROUP: AtomicU64 = AtomicU64::new(0);

/// The members of a group, in order, and what it does when none claims a session.
struct Group {
    /// Unique per group built.
    id: u64,
    /// Runs on the decrypted stream after another group's TLS member.
    inside_tls: bool,
    members: Vec<Member>,
    fallback: Option<Arc<dyn Service>>,
    byte_budget: usize,
    time_budget: Duration,
    counters: Counters,
}

/// What a group decided for the bytes seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Some member needs more bytes before the group can decide.
    Wait,
    /// The member at this index claims the session.
    Member(usize),
    /// No member claims it.
    Fallback,
}

impl Group {
    /// A zero tally of this group's decisions, for the first session on a listener.
    fn tally(&self) -> GroupTally {
        let names = self.members.iter().map(|m| m.name.clone()).collect();
        GroupTally::new(self.id, self.inside_tls, names)
    }

    /// Asks the members in order; `spent` = a budget is spent, so `NeedMore` counts as
    /// `NotMine`.
    fn decide(&self, first: &[u8], spent: bool) -> Decision {
        if first.is_empty() {
            // Detectors only ever see bytes; nothing at all within a budget is no match.
            return if spent {
                Decision::Fallback
            } else {
                Decision::Wait
            };
        }
        let mut waiting = false;
        for (index, member) in self.members.iter().enumerate() {
            match member.detector.detect(first) {
                Detection::Mine if !waiting => return Decision::Member(index),
                // A later member's claim waits for the earlier undecided one.
                Detection::Mine => return Decision::Wait,
                Detection::NeedMore if !spent => waiting = true,
                Detection::NeedMore | Detection::NotMine => {}
            }
        }
        if waiting {
            Decision::Wait
        } else {
            Decision::Fallback
        }
    }
}

/// An ordered group of protocols on one listener, a [`Service`]. Built with
/// [`ProtocolGroup::builder`]; see the [module documentation](self) for how it decides.
///
/// ```
/// use std::sync::Arc;
/// use plexus::protocol_group::{prefix, ProtocolGroup};
/// use plexus::{Service, Session, SessionHandler};
///
/// struct Reply(&'static [u8]);
/// struct ReplySession(&'static [u8]);
/// impl Service for Reply {
///     fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
///         Box::new(ReplySession(self.0))
///     }
/// }
/// impl SessionHandler for ReplySession {
///     fn on_data(&mut self, session: &mut Session<'_>, _: &[u8]) {
///         session.send(self.0);
///     }
/// }
///
/// let group = ProtocolGroup::builder()
///     .member("hello", prefix(*b"HELLO"), Arc::new(Reply(b"hi\n")))
///     .member("binary", |first: &[u8]| match first.first() {
///         Some(0xB7) => plexus::protocol_group::Detection::Mine,
///         _ => plexus::protocol_group::Detection::NotMine,
///     }, Arc::new(Reply(b"\xB7\0\0")))
///     .fallback(Arc::new(Reply(b"?\n")))
///     .build();
/// assert_eq!(group.member_names(), ["hello", "binary"]);
/// ```
pub struct ProtocolGroup {
    group: Arc<Group>,
}

impl ProtocolGroup {
    /// A builder with no members, no fallback and the default budgets.
    pub fn builder() -> ProtocolGroupBuilder {
        ProtocolGroupBuilder {
            members: Vec::new(),
            tls: None,
            fallback: None,
            byte_budget: DEFAULT_BYTE_BUDGET,
            time_budget: DEFAULT_TIME_BUDGET,
        }
    }

    /// The members' names, in the order they are asked (a TLS member is `"tls"`).
    pub fn member_names(&self) -> Vec<&str> {
        self.group.members.iter().map(|m| m.name.as_str()).collect()
    }

    /// How many sessions each member was given, then `"fallback"` (every member said "not
    /// mine"), `"fallback (byte budget)"` and `"fallback (time budget)"`, since the group was
    /// built, over every listener it serves. The counts of the group run inside TLS are not
    /// included (see [`ProtocolGroup::inner`]). `/metrics` shows the same per listener.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let group = &self.group;
        let mut counts: Vec<(String, u64)> = group
            .members
            .iter()
            .map(|m| (m.name.clone(), m.chosen.load(Ordering::Relaxed)))
            .collect();
        counts.push((
            "fallback".into(),
            group.counters.no_match.load(Ordering::Relaxed),
        ));
        counts.push((
            "fallback (byte budget)".into(),
            group.counters.byte_budget.load(Ordering::Relaxed),
        ));
        counts.push((
            "fallback (time budget)".into(),
            group.counters.timed_out.load(Ordering::Relaxed),
        ));
        counts
    }

    /// The group that runs inside TLS, when this one has a TLS member.
    pub fn inner(&self) -> Option<&Arc<ProtocolGroup>> {
        self.group.members.iter().find_map(|m| match &m.action {
            Action::Tls(_, inner) => Some(inner),
            Action::Open(_) => None,
        })
    }
}

/// Builds a [`ProtocolGroup`]: members in the order they are asked, an optional TLS member,
/// a fallback and the budgets.
pub struct ProtocolGroupBuilder {
    members: Vec<Pending>,
    /// The TLS member's configuration (its place in the order is a [`Pending::Tls`]).
    tls: Option<Arc<rustls::ServerConfig>>,
    fallback: Option<Arc<dyn Service>>,
    byte_budget: usize,
    time_budget: Duration,
}

/// A member not yet built.
#[derive(Clone)]
enum Pending {
    Service(String, Arc<dyn Detector>, Arc<dyn Service>),
    Tls,
}

impl ProtocolGroupBuilder {
    /// Adds a member: sessions whose first bytes `detector` claims go to `service`, which
    /// sees those bytes as its first data.
    pub fn member(
        mut self,
        name: impl Into<String>,
        detector: impl Detector,
        service: Arc<dyn Service>,
    ) -> Self {
        self.members
            .push(Pending::Service(name.into(), Arc::new(detector), service));
        self
    }

    /// Adds a TLS member here in the order: a [`TlsClientHello`] starts TLS with `config`
    /// ([`Session::start_tls`]; its handshake is bounded by `handshake_timeout`), then the
    /// group's other members and fallback run again on the decrypted stream, with a fresh
    /// time budget. For plain tcp listeners only (a [`crate::ServiceFactory`] gets `config`
    /// from [`crate::ListenerContext::tls`]). A second call replaces the configuration and
    /// keeps the first position.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        if self.tls.is_none() {
            self.members.push(Pending::Tls);
        }
        self.tls = Some(config);
        self
    }

    /// The service of sessions no member claims (see the module documentation). Without one,
    /// such sessions are closed.
    pub fn fallback(mut self, service: Arc<dyn Service>) -> Self {
        self.fallback = Some(service);
        self
    }

    /// How many first bytes the group buffers at most before it stops waiting for members
    /// that need more (at least 1; the default is [`DEFAULT_BYTE_BUDGET`]). The buffer holds
    /// at most this much plus one read.
    pub fn byte_budget(mut self, bytes: usize) -> Self {
        self.byte_budget = bytes.max(1);
        self
    }

    /// How long the group waits for the bytes that decide (the default is
    /// [`DEFAULT_TIME_BUDGET`]); then undecided members count as not matching.
    pub fn time_budget(mut self, budget: Duration) -> Self {
        self.time_budget = budget;
        self
    }

    /// The group.
    pub fn build(self) -> ProtocolGroup {
        self.build_group(false)
    }

    /// The group; `inside_tls` for the one a TLS member runs on the decrypted stream.
    fn build_group(self, inside_tls: bool) -> ProtocolGroup {
        // The group run inside TLS: the same members but TLS, the same fallback and budgets.
        let inside = self.tls.as_ref().map(|_| {
            Arc::new(
                ProtocolGroupBuilder {
                    members: self
                        .members
                        .iter()
                        .filter(|m| matches!(m, Pending::Service(..)))
                        .cloned()
                        .collect(),
                    tls: None,
                    fallback: self.fallback.clone(),
                    byte_budget: self.byte_budget,
                    time_budget: self.time_budget,
                }
                .build_group(true),
            )
        });
        let members = self
            .members
            .into_iter()
            .filter_map(|pending| {
                let (name, detector, action) = match pending {
                    Pending::Service(name, detector, service) => {
                        (name, detector, Action::Open(service))
                    }
                    Pending::Tls => {
                        let config = Arc::clone(self.tls.as_ref()?);
                        let inside = Arc::clone(inside.as_ref()?);
                        let detector: Arc<dyn Detector> = Arc::new(TlsClientHello);
                        ("tls".to_owned(), detector, Action::Tls(config, inside))
                    }
                };
                Some(Member {
                    name,
                    detector,
                    action,
                    chosen: AtomicU64::new(0),
                })
            })
            .collect();
        ProtocolGroup {
            group: Arc::new(Group {
                id: NEXT_GROUP.fetch_add(1, Ordering::Relaxed),
                inside_tls,
                members,
                fallback: self.fallback,
                byte_budget: self.byte_budget,
                time_budget: self.time_budget,
                counters: Counters {
                    no_match: AtomicU64::new(0),
                    byte_budget: AtomicU64::new(0),
                    timed_out: AtomicU64::new(0),
                },
            }),
        }
    }
}

impl Service for ProtocolGroup {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        session.set_timer(self.group.time_budget);
        Box::new(GroupSession {
            group: Arc::clone(&self.group),
            seen: Vec::new(),
            chosen: None,
        })
    }
}

/// A session of a group: detecting, then delegating to the handler it chose.
struct GroupSession {
    group: Arc<Group>,
    /// The first bytes, kept until a member is chosen (at most the byte budget plus a read).
    seen: Vec<u8>,
    chosen: Option<Box<dyn SessionHandler>>,
}

impl GroupSession {
    /// Counts a decision (not `Wait`) in the group's totals and in its tally for the
    /// session's listener; `spent` is the budget that ended the wait, if one did.
    fn count(&self, session: &Session<'_>, decision: Decision, spent: Option<GroupBudget>) {
        let group = &self.group;
        let fallback = match spent {
            None => GroupFallback::NoMatch,
            Some(GroupBudget::Bytes) => GroupFallback::ByteBudget,
            Some(GroupBudget::Time) => GroupFallback::TimeBudget,
        };
        match decision {
            Decision::Wait => return,
            Decision::Member(index) => {
                if let Some(member) = group.members.get(index) {
                    member.chosen.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::Fallback => {
                let counter = match fallback {
                    GroupFallback::NoMatch => &group.counters.no_match,
                    GroupFallback::ByteBudget => &group.counters.byte_budget,
                    GroupFallback::TimeBudget => &group.counters.timed_out,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        let stats = &session.info.listener.stats;
        stats.with_group_tally(
            group.id,
            || group.tally(),
            |tally| {
                match decision {
                    Decision::Member(index) => tally.member(index),
                    Decision::Fallback => tally.fallback(fallback),
                    Decision::Wait => {}
                }
                if let Some(budget) = spent {
                    tally.budget_spent(budget);
                }
            },
        );
    }

    fn act(&mut self, session: &mut Session<'_>, decision: Decision, spent: Option<GroupBudget>) {
        self.count(session, decision, spent);
        let group = Arc::clone(&self.group);
        let service = match decision {
            Decision::Wait => return,
            Decision::Member(index) => {
                let Some(member) = group.members.get(index) else {
                    return;
                };
                match &member.action {
                    Action::Open(service) => Arc::clone(service),
                    Action::Tls(config, inner) => {
                        session.cancel_timer();
                        let ciphertext = std::mem::take(&mut self.seen);
                        // The loop replaces this handler with `inner`'s once the handshake is
                        // done.
                        session.start_tls(Arc::clone(config), ciphertext, Arc::clone(inner) as _);
                        self.chosen = Some(Box::new(Upgrading));
                        return;
                    }
                }
            }
            Decision::Fallback => match &group.fallback {
                Some(service) => Arc::clone(service),
                None => {
                    tracing::debug!(
                        session = %session.id(),
                        "protocol group: no member claims the session and there is no \
                         fallback; closing"
                    );
                    session.close();
                    self.chosen = Some(Box::new(Upgrading));
                    return;
                }
            },
        };
        session.cancel_timer();
        let mut handler = service.open(session);
        let seen = std::mem::take(&mut self.seen);
        if !seen.is_empty() {
            handler.on_data(session, &seen);
        }
        self.chosen = Some(handler);
    }
}

impl SessionHandler for GroupSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_data(session, data);
            return;
        }
        self.seen.extend_from_slice(data);
        let mut decision = self.group.decide(&self.seen, false);
        let mut spent = None;
        if decision == Decision::Wait && self.seen.len() >= self.group.byte_budget {
            // The byte budget ends the wait (deciding with it spent from the start gives the
            // same answer whenever some member is decided anyway).
            decision = self.group.decide(&self.seen, true);
            spent = Some(GroupBudget::Bytes);
        }
        self.act(session, decision, spent);
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_timer(session);
            return;
        }
        // The time budget is spent: undecided members are not chosen.
        let decision = self.group.decide(&self.seen, true);
        self.act(session, decision, Some(GroupBudget::Time));
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_drain(session);
        }
    }

    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_server_drain(session);
        }
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_close(info, reason);
        }
    }
}

/// The handler between "this is TLS" and the end of the handshake (the loop feeds rustls,
/// then opens the inner group), or of a session closed for want of a fallback.
struct Upgrading;

impl SessionHandler for Upgrading {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    struct NothingSession;
    impl Service for Nothing {
        fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
            Box::new(NothingSession)
        }
    }
    impl SessionHandler for NothingSession {
        fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
    }

    fn service() -> Arc<dyn Service> {
        Arc::new(Nothing)
    }

    /// tls (index 0 when present), http1, h2 preface, then a `0xB7` binary member.
    fn group(byte_budget: usize) -> Group {
        let built = ProtocolGroup::builder()
            .member("http", Http1Request, service())
            .member("h2", Http2Preface, service())
            .member("binary", prefix([0xB7]), service())
            .member("hello", prefix(*b"HELLO "), service())
            .fallback(service())
            .byte_budget(byte_budget)
            .build();
        Arc::try_unwrap(built.group).ok().expect("only owner")
    }

    /// The first decision for `input` fed one byte at a time, and the bytes it took.
    fn byte_at_a_time(group: &Group, input: &[u8]) -> (Decision, usize) {
        for n in 1..=input.len() {
            let seen = &input[..n];
            let decision = group.decide(seen, seen.len() >= group.byte_budget);
            if decision != Decision::Wait {
                return (decision, n);
            }
        }
        (Decision::Wait, input.len())
    }

    #[test]
    fn ready_detectors_decide_at_once_and_byte_by_byte() {
        let cases: &[(&dyn Detector, &[u8], Detection, usize)] = &[
            (&TlsClientHello, b"\x16\x03\x01\x02\x00", Detection::Mine, 3),
            (&TlsClientHello, b"\x16\x03\x05", Detection::NotMine, 3),
            (&TlsClientHello, b"\x17\x03\x03", Detection::NotMine, 1),
            (&Http1Request, b"GET / HTTP/1.1\r\n", Detection::Mine, 4),
            (&Http1Request, b"OPTIONS * HTTP/1.1\r\n", Detection::Mine, 8),
            (
                &Http1Request,
                b"CONNECT a:1 HTTP/1.1\r\n",
                Detection::Mine,
                8,
            ),
            (&Http1Request, b"GETX / HTTP/1.1", Detection::NotMine, 4),
            (&Http1Request, b"get / HTTP/1.1", Detection::NotMine, 1),
            (&Http1Request, b"PRI * HTTP/2.0", Detection::NotMine, 2),
            (
                &Http2Preface,
                b"PRI * HTTP/2.0\r\n\r\nSM",
                Detection::Mine,
                14,
            ),
            (&Http2Preface, b"PRIX", Detection::NotMine, 4),
        ];
        for &(detector, input, expected, at) in cases {
            assert_eq!(detector.detect(input), expected, "{input:?} at once");
            let first = (1..=input.len())
                .map(|n| (detector.detect(&input[..n]), n))
                .find(|(d, _)| *d != Detection::NeedMore);
            assert_eq!(first, Some((expected, at)), "{input:?} byte by byte");
        }
        assert_eq!(TlsClientHello.detect(b""), Detection::NeedMore);
        let hello = prefix(*b"HELLO");
        assert_eq!(hello.detect(b"HEL"), Detection::NeedMore);
        assert_eq!(hello.detect(b"HELLO world"), Detection::Mine);
        assert_eq!(hello.detect(b"HELP"), Detection::NotMine);
        let closure = |first: &[u8]| match first.first() {
            Some(b'#') => Detection::Mine,
            _ => Detection::NotMine,
        };
        assert_eq!(closure.detect(b"#x"), Detection::Mine);
    }

    #[test]
    fn members_are_asked_in_order_one_byte_at_a_time() {
        let group = group(DEFAULT_BYTE_BUDGET);
        let cases: &[(&[u8], Decision, usize)] = &[
            (b"GET / HTTP/1.1\r\n", Decision::Member(0), 4),
            (b"PRI * HTTP/2.0\r\n", Decision::Member(1), 14),
            // "P" could be POST, PUT, PATCH or PRI: the group waits for the byte that decides.
            (b"POST / HTTP/1.1\r\n", Decision::Member(0), 5),
            (b"\xB7\x00\x03abc", Decision::Member(2), 1),
            (b"HELLO you\n", Decision::Member(3), 6),
            // "HE" is a beginning of both HEAD and HELLO; "HEL" only of HELLO.
            (b"HELP me\n", Decision::Fallback, 4),
            (b"hello\n", Decision::Fallback, 1),
            (b"GETX\n", Decision::Fallback, 4),
        ];
        for &(input, expected, at) in cases {
            assert_eq!(byte_at_a_time(&group, input), (expected, at), "{input:?}");
            assert_eq!(group.decide(input, false), expected, "{input:?} at once");
        }
        assert_eq!(group.decide(b"", false), Decision::Wait);
    }

    #[test]
    fn an_earlier_undecided_member_holds_back_a_later_claim() {
        let group = Group {
            id: u64::MAX,
            inside_tls: false,
            members: ["needs", "claims"]
                .iter()
                .zip([
                    Arc::new(prefix(*b"ab")) as Arc<dyn Detector>,
                    Arc::new(prefix(*b"a")),
                ])
                .map(|(name, detector)| Member {
                    name: (*name).into(),
                    detector,
                    action: Action::Open(service()),
                    chosen: AtomicU64::new(0),
                })
                .collect(),
            fallback: None,
            byte_budget: 8,
            time_budget: DEFAULT_TIME_BUDGET,
            counters: Counters {
                no_match: AtomicU64::new(0),
                byte_budget: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
            },
        };
        assert_eq!(group.decide(b"a", false), Decision::Wait);
        assert_eq!(group.decide(b"ab", false), Decision::Member(0));
        assert_eq!(group.decide(b"ax", false), Decision::Member(1));
        // A spent budget (bytes or time) stops the wait: the later claim wins.
        assert_eq!(group.decide(b"a", true), Decision::Member(1));
    }

    #[test]
    fn budgets_end_the_wait_with_the_fallback() {
        // A member that always needs more would wait forever without the budgets.
        let greedy = ProtocolGroup::builder()
            .member("greedy", |_: &[u8]| Detection::NeedMore, service())
            .fallback(service())
            .byte_budget(5)
            .build();
        let group = &greedy.group;
        assert_eq!(
            byte_at_a_time(group, b"0123456789"),
            (Decision::Fallback, 5)
        );
        // The time budget: what was seen so far is not decisive, so the fallback.
        assert_eq!(group.decide(b"01", true), Decision::Fallback);
        assert_eq!(group.decide(b"", true), Decision::Fallback);
        // One byte of the preset's prefixes (G: GET; 0x16: TLS) waits; the timer falls back.
        let preset = group_with_tls_prefix();
        assert_eq!(preset.decide(b"G", false), Decision::Wait);
        assert_eq!(preset.decide(b"G", true), Decision::Fallback);
        assert_eq!(preset.decide(b"\x16", false), Decision::Wait);
        assert_eq!(preset.decide(b"\x16", true), Decision::Fallback);
        assert_eq!(preset.decide(b"\x16\x03\x03", false), Decision::Member(0));
    }

    fn group_with_tls_prefix() -> Group {
        let built = ProtocolGroup::builder()
            .member("tls-like", TlsClientHello, service())
            .member("http", Http1Request, service())
            .fallback(service())
            .build();
        Arc::try_unwrap(built.group).ok().expect("only owner")
    }

    #[test]
    fn counts_name_every_member_and_both_fallbacks() {
        let built = ProtocolGroup::builder()
            .member("a", prefix(*b"a"), service())
            .build();
        assert_eq!(built.member_names(), ["a"]);
        let names: Vec<String> = built.counts().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "a",
                "fallback",
                "fallback (byte budget)",
                "fallback (time budget)"
            ]
        );
        assert!(built.inner().is_none());
    }
}
