//! The event loop's side of accepting. Every loop registers every TCP listener of the server
//! in its own epoll instance (one shared socket per listener, `EPOLLEXCLUSIVE`: a connection
//! wakes one waiting loop, not all of them), and the loop that hears of a connection accepts,
//! admits ([`Intake`]: ACL, caps, handshake places, descriptor reserve) and adopts it itself —
//! no hand-off to another thread, no wake-up of another loop. A busy loop takes at most
//! [`ACCEPT_BUDGET`] connections per listener per turn, and while it works the kernel wakes
//! the loops that wait for the next ones, so connections spread over the loops that have time.
//! The kernel wakes the waiting loop that registered first, though: on a quiet server one loop
//! would collect every long-lived connection. So a loop that has clearly more sessions than
//! the least loaded one ([`pass_on_to`]) passes what it accepts to that loop
//! (`Command::Adopt`, counted as `event_loop_sessions_passed_on_total`) until they are even
//! again; balanced loops keep what they accept.
//!
//! The acceptor thread still owns the listeners' lifecycle and tells the loops with commands:
//! a reload adds listeners, changes their settings or removes them (`Command::Listen`,
//! `Command::Unlisten`); a graceful drain first takes what waits in the listeners' queues
//! (connections the kernel completed would be reset when the socket closes), then lets them go.
//! A registration is removed (`EPOLL_CTL_DEL`) before the loop drops its share of the socket:
//! epoll forgets a registration only when every descriptor of the open file is closed, and a
//! binary upgrade gives the same listening sockets to the new process.
//!
//! With `backend = "io_uring"` a loop accepts through its ring instead: one multishot accept
//! per listener (`IORING_OP_ACCEPT`, kept armed until accepting pauses or the listener goes),
//! so a connection costs neither a readiness event nor an `accept(2)` of its own, only the
//! `getpeername(2)` that a multishot accept leaves to its user. The kernel hands each
//! connection to one waiting accept (accept requests wait exclusively, like `EPOLLEXCLUSIVE`),
//! and the completions go through the same [`Intake`]: admission, the descriptor reserve and
//! the pause are exactly those of epoll. A pause stops the ring's accepts (connections wait in
//! the kernel's queue); the loop arms them again when it is over.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Token;
use plexus_sys::epoll::{self, Sharing};
use plexus_sys::uring::Ring;
use tracing::{debug, error, info, warn};

use super::{Command, EventLoop};
use crate::accept::{BoundListener, Intake, NewSession};
use crate::datagram;
use crate::log_throttle::LogThrottle;
use crate::metrics::LoopStats;

/// Accepts per listener per turn: a loop woken for a burst leaves the rest for its next turn
/// and for the other loops.
const ACCEPT_BUDGET: usize = 16;
/// Listener tokens sit below every datagram token (`datagram::token_socket`)…
const LISTENER_TOKENS_TOP: usize = usize::MAX - 1 - datagram::TOKEN_SPAN;
/// …and above every session token (`2 × key + side`): listener indexes (never reused across
/// reloads) stay far below this.
const MAX_LISTENER_TOKENS: usize = 1 << 24;
/// A loop keeps what it accepts unless it has this many sessions more than the least loaded
/// loop…
const IMBALANCE_SESSIONS: u64 = 32;
/// …and a quarter more than it (`4 × mine > 5 × least`).
const IMBALANCE_RATIO: (u64, u64) = (5, 4);
/// Whether the kernel's lack of `EPOLLEXCLUSIVE` was logged (once per process).
static SHARED_WAKEUPS_LOGGED: std::sync::Once = std::sync::Once::new();

/// The token of listener `index` in every loop's epoll instance.
fn listener_token(index: usize) -> Token {
    Token(LISTENER_TOKENS_TOP.saturating_sub(index))
}

/// The listener index of `token`, if it is a listener's.
pub(super) fn token_listener(token: Token) -> Option<usize> {
    let index = LISTENER_TOKENS_TOP.checked_sub(token.0)?;
    (index < MAX_LISTENER_TOKENS).then_some(index)
}

/// The loop a connection accepted by a loop with `mine` sessions goes to instead, given every
/// loop's `(index, sessions)`: the least loaded one, when this loop has clearly more (both
/// [`IMBALANCE_SESSIONS`] more and [`IMBALANCE_RATIO`] as many); `None` keeps it here.
fn pass_on_to(mine: u64, loads: impl Iterator<Item = (usize, u64)>) -> Option<usize> {
    let (least, sessions) = loads.min_by_key(|&(_, sessions)| sessions)?;
    let (ratio_mine, ratio_least) = IMBALANCE_RATIO;
    let clearly_more = mine >= sessions.saturating_add(IMBALANCE_SESSIONS)
        && mine.saturating_mul(ratio_least) > sessions.saturating_mul(ratio_mine);
    clearly_more.then_some(least)
}

/// The listeners one loop accepts on, and its accepting state.
#[derive(Default)]
pub(super) struct LoopListeners {
    listeners: Vec<BoundListener>,
    /// Absent until the server gives it (a loop without it only serves what it is handed:
    /// the client runtime's loops, and the unit tests').
    intake: Option<Intake>,
    /// Sessions passed on by another loop that this one could not register.
    failed_adoptions: LogThrottle,
    /// The loop accepts through its io_uring ring (multishot accepts), not epoll.
    on_ring: bool,
    /// A listener has no ring accept armed (new, ended, or stopped by a pause).
    unarmed: bool,
    /// What the ring reported for the listeners in the last batch of completions, taken
    /// after it (adopting needs the whole loop).
    from_ring: Vec<FromRing>,
}

/// A listener's completion on the ring, queued for [`EventLoop::accept_turn`].
pub(super) enum FromRing {
    /// A connection accepted on listener `index`.
    Accepted(usize, OwnedFd),
    /// Listener `index`'s accept ended (with the accept's error, if one failed).
    Ended(usize, Option<io::Error>),
}

impl FromRing {
    /// The index of the listener it concerns.
    fn listener(&self) -> usize {
        match self {
            FromRing::Accepted(index, _) | FromRing::Ended(index, _) => *index,
        }
    }
}

impl LoopListeners {
    /// When the loop should look at its listeners again: now when one has connections waiting
    /// (unless accepting is paused: then when the pause ends), never when none has.
    pub(super) fn wakeup(&self, now: Instant) -> Option<Instant> {
        let intake = self.intake.as_ref()?;
        if self.on_ring {
            // Unpaused, the ring's accepts are armed before the loop waits: only the end of a
            // pause needs a wake-up.
            return intake.paused_until().filter(|_| self.unarmed);
        }
        self.listeners
            .iter()
            .any(|listener| listener.ready)
            .then(|| intake.paused_until().unwrap_or(now))
    }

    /// Whether the loop accepts through its io_uring ring.
    pub(super) fn set_on_ring(&mut self, on_ring: bool) {
        self.on_ring = on_ring;
    }

    /// Queues a listener's completion (from the ring's completion callback).
    pub(super) fn ring_reported(&mut self, event: FromRing) {
        self.from_ring.push(event);
    }

    /// Arms a multishot accept on every listener that has none, unless accepting is paused;
    /// called before the loop waits on its ring.
    pub(super) fn arm_ring_accepts(&mut self, ring: &mut Ring) {
        if !self.unarmed {
            return;
        }
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        if !intake.may_accept(Instant::now()) {
            return;
        }
        for listener in &mut self.listeners {
            if listener.ring_accept.is_none() {
                let token = u64::try_from(listener.info.index).unwrap_or(u64::MAX);
                let socket: plexus_sys::uring::Listening = Arc::clone(&listener.socket) as _;
                listener.ring_accept = Some(ring.accept(socket, token));
            }
        }
        self.unarmed = false;
    }

    /// Stops the ring's accepts (a pause): each one's end is reported, and it is armed again
    /// once the pause is over.
    fn stop_ring_accepts(&self, ring: Option<&mut Ring>) {
        let Some(ring) = ring else { return };
        for accept in self.listeners.iter().filter_map(|l| l.ring_accept) {
            ring.stop_accept(accept);
        }
    }
}

impl EventLoop {
    /// Gives the loop its accepting state (the admission it answers to, the shared refusal
    /// log); without it, listeners are registered but never accepted from.
    pub(crate) fn set_intake(&mut self, intake: Intake) {
        self.listening.intake = Some(intake);
    }

    /// Starts accepting on `listener`, or — for a listener the loop has (same index) — takes
    /// its new settings (a reload) and keeps its registration.
    pub(crate) fn listen(&mut self, listener: BoundListener) -> io::Result<()> {
        let index = listener.info.index;
        let known = self.listening.listeners.iter_mut();
        if let Some(kept) = known.into_iter().find(|kept| kept.info.index == index) {
            let (ready, ring_accept) = (kept.ready, kept.ring_accept);
            *kept = listener;
            kept.ready = ready;
            kept.ring_accept = ring_accept;
            return Ok(());
        }
        if self.listening.on_ring {
            // Armed on the ring before the loop waits next; the multishot accept takes what
            // waits already (no `accept(2)` round for it).
            let mut listener = listener;
            listener.ready = false;
            self.listening.listeners.push(listener);
            self.listening.unarmed = true;
            return Ok(());
        }
        self.register_listener(listener)
    }

    /// The ring could not be started: the listeners go to epoll instead.
    pub(super) fn listeners_to_epoll(&mut self) {
        self.listening.on_ring = false;
        for listener in std::mem::take(&mut self.listening.listeners) {
            let name = Arc::clone(&listener.info.name);
            if let Err(err) = self.register_listener(listener) {
                error!(event_loop = self.index, listener = %name, "cannot accept on the listener: {err}");
            }
        }
    }

    /// Registers `listener` with the loop's epoll instance and starts accepting on it.
    fn register_listener(&mut self, listener: BoundListener) -> io::Result<()> {
        let token = listener_token(listener.info.index).0 as u64;
        let sharing = epoll::add_shared(&self.poll, &*listener.socket, token)?;
        if sharing == Sharing::Shared {
            SHARED_WAKEUPS_LOGGED.call_once(|| {
                info!(
                    "the kernel has no EPOLLEXCLUSIVE: every event loop hears of every connection"
                )
            });
        }
        let mut listener = listener;
        // Connections may be waiting already (the edge predates the registration).
        listener.ready = true;
        self.listening.listeners.push(listener);
        Ok(())
    }

    /// Stops accepting on listener `index` (removed by a reload); what waits in its queue is
    /// left to the other loops until the last one lets the socket go.
    pub(super) fn unlisten(&mut self, index: usize) {
        let listeners = &mut self.listening.listeners;
        if let Some(position) = listeners.iter().position(|l| l.info.index == index) {
            let listener = listeners.remove(position);
            if let (Some(ring), Some(accept)) = (self.ring.as_mut(), listener.ring_accept) {
                // The operation keeps the socket open until its cancel completes.
                ring.stop_accept(accept);
            }
            self.deregister_listener(&listener, self.listening.on_ring);
        }
    }

    /// An edge on listener `index`: connections wait.
    pub(super) fn listener_ready(&mut self, index: usize) {
        let listeners = self.listening.listeners.iter_mut();
        if let Some(listener) = listeners.into_iter().find(|l| l.info.index == index) {
            listener.ready = true;
        }
    }

    /// Accepts, admits and adopts what waits on the ready listeners (a budget per listener),
    /// and what the ring accepted.
    pub(super) fn accept_turn(&mut self, now: Instant) {
        if !self.listening.from_ring.is_empty() {
            self.take_from_ring(now, true);
        }
        if !self.listening.listeners.iter().any(|l| l.ready) {
            return;
        }
        let mut listening = std::mem::take(&mut self.listening);
        if let Some(intake) = listening.intake.as_mut() {
            if intake.may_accept(now) {
                let mut adopt = |new: NewSession| self.adopt_or_pass_on(new, now);
                intake.accept_ready(&mut listening.listeners, ACCEPT_BUDGET, now, &mut adopt);
            }
        }
        self.listening = listening;
    }

    /// Admits and adopts the connections the ring accepted (passed on to a less loaded loop
    /// by the usual rule with `pass_on`; not during a drain, where that loop may be gone
    /// before it takes them), and re-arms or pauses for the accepts that ended. Connections of
    /// a listener this loop let go of are closed.
    fn take_from_ring(&mut self, now: Instant, pass_on: bool) {
        let mut listening = std::mem::take(&mut self.listening);
        let mut events = std::mem::take(&mut listening.from_ring);
        let mut paused = false;
        for event in events.drain(..) {
            let index = event.listener();
            let listeners = listening.listeners.iter_mut();
            let (Some(listener), Some(intake)) = (
                listeners.into_iter().find(|l| l.info.index == index),
                listening.intake.as_mut(),
            ) else {
                if let FromRing::Accepted(..) = event {
                    debug!(
                        event_loop = self.index,
                        "closed a connection accepted for a listener that is gone"
                    );
                }
                continue;
            };
            let going_on = match event {
                FromRing::Accepted(_, fd) => {
                    let stream = TcpStream::from_std(std::net::TcpStream::from(fd));
                    let mut adopt = |new: NewSession| match pass_on {
                        true => self.adopt_or_pass_on(new, now),
                        false => self.adopt(new, now),
                    };
                    intake.take_accepted(listener, stream, now, &mut adopt)
                }
                FromRing::Ended(_, error) => {
                    listener.ring_accept = None;
                    listening.unarmed = true;
                    error.is_none_or(|err| intake.accept_failed(listener, &err, now))
                }
            };
            paused |= !going_on;
        }
        if paused {
            listening.stop_ring_accepts(self.ring.as_mut());
        }
        listening.from_ring = events;
        self.listening = listening;
    }

    /// Lets every listener go; with `sweep` (a graceful drain) after taking what waits in
    /// their queues, so those connections are drained like the others instead of reset.
    pub(super) fn stop_listening(&mut self, now: Instant, sweep: bool) {
        if sweep && !self.listening.from_ring.is_empty() {
            self.take_from_ring(now, false);
        }
        let mut listening = std::mem::take(&mut self.listening);
        if let (true, Some(intake)) = (sweep, listening.intake.as_mut()) {
            let mut adopt = |new: NewSession| self.adopt(new, now);
            intake.accept_backlog(&mut listening.listeners, ACCEPT_BUDGET, now, &mut adopt);
        }
        listening.stop_ring_accepts(self.ring.as_mut());
        for listener in listening.listeners.drain(..) {
            self.deregister_listener(&listener, listening.on_ring);
        }
        // The intake stays: nothing is accepted without listeners.
        self.listening = listening;
    }

    /// Adopts a connection this loop accepted, or passes it to the least loaded loop when this
    /// one has clearly more sessions (adopted here after all if that loop's queue is full).
    /// Fails when this loop cannot register it (the intake decides what that means).
    fn adopt_or_pass_on(&mut self, new: NewSession, now: Instant) -> io::Result<()> {
        let mine = self.stats.sessions_open.load(Relaxed);
        let loads = self.peers.iter().enumerate();
        let loads = loads.map(|(index, peer)| (index, peer.stats.sessions_open.load(Relaxed)));
        let target = pass_on_to(mine, loads).filter(|&target| target != self.index);
        let Some(peer) = target.and_then(|target| self.peers.get(target)) else {
            return self.adopt(new, now);
        };
        match peer.send(Command::Adopt(Box::new(new))) {
            Ok(()) => {
                LoopStats::add(&self.stats.sessions_passed_on, 1);
                Ok(())
            }
            Err(Command::Adopt(new)) => self.adopt(*new, now),
            Err(_) => Ok(()),
        }
    }

    /// Adopts a connection another loop accepted and passed on; one this loop cannot register
    /// is closed, with a log line (throttled: under descriptor exhaustion every one fails).
    pub(super) fn adopt_passed_on(&mut self, new: NewSession, now: Instant) {
        let session = new.info.id;
        if let Err(err) = self.adopt(new, now) {
            if let Some(suppressed) = self.listening.failed_adoptions.allow(now) {
                error!(
                    event_loop = self.index,
                    %session,
                    "cannot register a session passed on by another loop, closed it: {err} \
                     ({suppressed} more since the last such line)"
                );
            }
        }
    }

    fn deregister_listener(&self, listener: &BoundListener, on_ring: bool) {
        if on_ring {
            return;
        }
        if let Err(err) = epoll::remove(&self.poll, &*listener.socket) {
            warn!(
                event_loop = self.index,
                listener = %listener.info.name,
                "cannot deregister the listener: {err}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(sessions: &[u64]) -> impl Iterator<Item = (usize, u64)> + '_ {
        sessions.iter().copied().enumerate()
    }

    #[test]
    fn a_loop_keeps_what_it_accepts_unless_it_has_clearly_more_sessions_than_the_least_loaded() {
        // Even, or a little ahead: kept.
        assert_eq!(pass_on_to(0, loads(&[0, 0])), None);
        assert_eq!(pass_on_to(31, loads(&[31, 0])), None);
        // 32 more, and more than a quarter more: to the least loaded loop.
        assert_eq!(pass_on_to(32, loads(&[32, 0, 5])), Some(1));
        assert_eq!(pass_on_to(200, loads(&[200, 150, 100])), Some(2));
        // 32 more but within a quarter (large loops): kept.
        assert_eq!(pass_on_to(1032, loads(&[1032, 1000])), None);
        assert_eq!(pass_on_to(1300, loads(&[1300, 1000])), Some(1));
        // One loop: nowhere else to go (the caller ignores itself as the target).
        assert_eq!(pass_on_to(500, loads(&[500])), None);
        assert_eq!(pass_on_to(5, std::iter::empty()), None);
    }

    #[test]
    fn listener_tokens_are_neither_datagram_nor_waker_tokens_and_map_back() {
        for index in [0, 1, 77, MAX_LISTENER_TOKENS - 1] {
            let token = listener_token(index);
            assert_eq!(token_listener(token), Some(index));
            assert_eq!(datagram::token_socket(token), None);
            assert_ne!(token, Token(usize::MAX));
        }
        assert_eq!(token_listener(Token(usize::MAX)), None, "the waker");
        assert_eq!(token_listener(datagram::socket_token(0)), None);
        assert_eq!(token_listener(Token(2 * 1_000_000 + 1)), None, "a session");
    }
}
