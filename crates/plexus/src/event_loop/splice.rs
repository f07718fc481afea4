//! Spliced pairs ([`crate::Session::splice_with`]): two linked plain TCP sessions whose bytes
//! move socket → pipe → socket with `splice(2)`, never through user space.
//!
//! Each session of the pair owns the pipe of the direction it reads ([`SpliceOut`]). A
//! direction is read only when its pipe is empty and drained before the next read, so a pipe
//! never holds more than one read (its capacity, 64 KiB): the peer that stops reading stops
//! the reading of its partner, as the link watermarks do when copying. Serving either session
//! moves both directions (a writable edge on one is what the other's pipe waited for). The
//! switch keeps the byte order: a direction goes on copying until the bytes already queued
//! for its destination are written. A side's end of stream reaches its handler (`on_eof`) only
//! once its pipe is empty, so a FIN never overtakes bytes still in a pipe.

use std::io;
use std::time::Instant;

use plexus_sys::splice::{splice, Pipe, PIPE_CAPACITY};
use tracing::{debug, warn};

use super::links::links_of;
use super::{EventLoop, MAX_READS_PER_TURN};
use crate::metrics::LoopStats;
use crate::service::{CloseReason, SessionExtras, SpliceOut};
use crate::session::TcpSession;

/// The spliced direction a session reads, if any.
fn splice_of(extras: &mut Option<Box<SessionExtras>>) -> Option<&mut SpliceOut> {
    links_of(extras)?.splice.as_deref_mut()
}

/// Whether direction `from` → `to` may be spliced now: bytes are in its pipe, or nothing is
/// queued for `to` that was copied before the switch.
fn may_splice(from: &mut TcpSession, to: &TcpSession) -> bool {
    splice_of(&mut from.extras).is_some_and(|out| out.pending > 0 || to.outbound.is_empty())
}

/// Moves `from`'s bytes to `to` through `from`'s pipe until one of them would block, `from`
/// ends or fails, or the fairness limit is reached (then `true`: serve it again this turn).
fn move_bytes(from: &mut TcpSession, to: &mut TcpSession, now: Instant, stats: &LoopStats) -> bool {
    let TcpSession {
        stream: source,
        extras,
        info: source_info,
        readable,
        peer_eof,
        closing,
        last_activity,
        ..
    } = from;
    let Some(out) = splice_of(extras) else {
        return false;
    };
    for _ in 0..MAX_READS_PER_TURN {
        while out.pending > 0 {
            if to.write_blocked || to.closing.is_some() {
                return false;
            }
            match splice(&out.pipe.read, &to.stream, out.pending) {
                Ok(0) => {
                    to.closing = Some(CloseReason::Io(io::ErrorKind::WriteZero));
                    return false;
                }
                Ok(moved) => {
                    out.pending = out.pending.saturating_sub(moved);
                    to.last_activity = now;
                    stats.sent(&to.info.listener, moved);
                    LoopStats::add(&stats.spliced_bytes, moved as u64);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => to.write_blocked = true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    to.closing = Some(CloseReason::Io(err.kind()));
                    return false;
                }
            }
        }
        if !*readable || *peer_eof || closing.is_some() {
            return false;
        }
        // The pipe is empty here: a WouldBlock is the socket's.
        match splice(&*source, &out.pipe.write, PIPE_CAPACITY) {
            Ok(0) => {
                *peer_eof = true;
                *readable = false;
                return false;
            }
            Ok(moved) => {
                out.pending = moved;
                *last_activity = now;
                stats.received(&source_info.listener, moved);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                *readable = false;
                return false;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                *closing = Some(CloseReason::Io(err.kind()));
                return false;
            }
        }
    }
    true
}

impl EventLoop {
    /// `splice_with` asked by session `key` for its linked session `peer_key`: gives each a
    /// pipe for the direction it reads. Refused (the pair goes on copying) unless both are
    /// plain TCP and connected, or when no pipe can be made.
    pub(super) fn start_splice(&mut self, key: usize, peer_key: usize) {
        let Some((this, other)) = self.sessions.pair_mut(key, peer_key) else {
            return;
        };
        let plain = |session: &mut TcpSession| {
            session.tls.is_none()
                && !session.proxy_pending()
                && links_of(&mut session.extras)
                    .is_some_and(|links| links.connecting.is_none() && links.splice.is_none())
        };
        if !plain(this) || !plain(other) {
            debug!(
                session = %this.info.id, peer = %other.info.id,
                "splice_with: not two connected plain TCP sessions (or already spliced); copying"
            );
            return;
        }
        let pipes = Pipe::new().and_then(|first| Ok((first, Pipe::new()?)));
        let (this_pipe, other_pipe) = match pipes {
            Ok(pipes) => pipes,
            Err(err) => {
                let (session, peer) = (this.info.id, other.info.id);
                if let Some(also) = self.pipe_failures.allow(Instant::now()) {
                    warn!(
                        session = %session, peer = %peer,
                        "cannot make a pipe to splice with ({err}); copying \
                         (+{also} more in the last second)"
                    );
                }
                return;
            }
        };
        let (this_id, other_id) = (this.info.id, other.info.id);
        if let Some(links) = links_of(&mut this.extras) {
            links.splice = Some(Box::new(SpliceOut {
                peer: (peer_key, other_id),
                pipe: this_pipe,
                pending: 0,
            }));
        }
        if let Some(links) = links_of(&mut other.extras) {
            links.splice = Some(Box::new(SpliceOut {
                peer: (key, this_id),
                pipe: other_pipe,
                pending: 0,
            }));
        }
        LoopStats::add(&self.stats.spliced_pairs, 1);
        // Bytes may be waiting on either socket already: no edge will announce them again.
        self.ready.push(key);
        self.ready.push(peer_key);
    }

    /// `serve` for a session of a spliced pair: moves both directions. Returns `false` (and
    /// reads nothing of session `key`) while its own direction must go on copying, because
    /// bytes copied before the switch are still queued for its peer, or when `key` is not spliced.
    pub(super) fn serve_splice(&mut self, key: usize, now: Instant) -> bool {
        let Some(session) = self.sessions.get_mut(key) else {
            return false;
        };
        let Some((peer_key, peer_id)) = splice_of(&mut session.extras).map(|out| out.peer) else {
            return false;
        };
        let Some((this, other)) = self
            .sessions
            .pair_mut(key, peer_key)
            .filter(|(_, other)| other.info.id == peer_id)
        else {
            return false;
        };
        let mut again = false;
        // Into this session first: a writable edge here is what the peer's pipe waited for.
        if may_splice(other, this) {
            again |= move_bytes(other, this, now, &self.stats);
        }
        let spliced = may_splice(this, other);
        if spliced {
            again |= move_bytes(this, other, now, &self.stats);
        }
        let (this_eof, other_eof) = (this.peer_eof, other.peer_eof);
        if again {
            self.ready.push(key);
        }
        // A side's end goes to its handler with its pipe empty (set only on a read, which
        // happens with an empty pipe), so the FIN it answers with follows every byte.
        if other_eof {
            self.deliver_eof(peer_key, now);
        }
        self.list_for_flush(peer_key);
        if !spliced {
            return false;
        }
        if this_eof {
            self.deliver_eof(key, now);
        }
        self.after_callback(key, now);
        self.flush(key, now);
        true
    }
}
