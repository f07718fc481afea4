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
//! With `backend = "io_uring"` the listeners stay on the loop's epoll instance, which the ring
//! watches: no loop waits in `epoll_wait` there, so the kernel reports a new connection to
//! every loop and the ones that come second find the queue empty (`WouldBlock`).

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use mio::Token;
use plexus_sys::epoll::{self, Sharing};
use tracing::{error, info, warn};

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
}

impl LoopListeners {
    /// When the loop should look at its listeners again: now when one has connections waiting
    /// (unless accepting is paused: then when the pause ends), never when none has.
    pub(super) fn wakeup(&self, now: Instant) -> Option<Instant> {
        let intake = self.intake.as_ref()?;
        self.listeners
            .iter()
            .any(|listener| listener.ready)
            .then(|| intake.paused_until().unwrap_or(now))
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
            let ready = kept.ready;
            *kept = listener;
            kept.ready = ready;
            return Ok(());
        }
        let token = listener_token(index).0 as u64;
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
            self.deregister_listener(&listener);
        }
    }

    /// An edge on listener `index`: connections wait.
    pub(super) fn listener_ready(&mut self, index: usize) {
        let listeners = self.listening.listeners.iter_mut();
        if let Some(listener) = listeners.into_iter().find(|l| l.info.index == index) {
            listener.ready = true;
        }
    }

    /// Accepts, admits and adopts what waits on the ready listeners (a budget per listener).
    pub(super) fn accept_turn(&mut self, now: Instant) {
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

    /// Lets every listener go; with `sweep` (a graceful drain) after taking what waits in
    /// their queues, so those connections are drained like the others instead of reset.
    pub(super) fn stop_listening(&mut self, now: Instant, sweep: bool) {
        let mut listening = std::mem::take(&mut self.listening);
        if let (true, Some(intake)) = (sweep, listening.intake.as_mut()) {
            let mut adopt = |new: NewSession| self.adopt(new, now);
            intake.accept_backlog(&mut listening.listeners, ACCEPT_BUDGET, now, &mut adopt);
        }
        for listener in listening.listeners.drain(..) {
            self.deregister_listener(&listener);
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

    fn deregister_listener(&self, listener: &BoundListener) {
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
