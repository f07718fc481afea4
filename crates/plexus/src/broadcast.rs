//! Cross-loop broadcasts: how a broadcast reaches the members of a listener on the other event
//! loops, bounded and without loss.
//!
//! A broadcast goes to each other loop as a command on its bounded channel. What all loops
//! together may have in flight towards one loop is bounded twice: by entries
//! ([`IN_FLIGHT_ENTRIES`], half the channel, so that broadcasts never crowd out the commands
//! that adopt new connections) and by bytes ([`IN_FLIGHT_BYTES`], each entry charged its
//! payload plus [`ENTRY_COST`]). When either is
//! exhausted the broadcast is not dropped: it waits here, in order behind any earlier one for
//! the same loop, and the session that sent it is not read again until everything waiting has
//! been handed over (backpressure onto the sender, never onto the receivers; a receiver that
//! does not read is still closed by its own `outbound_limit`). The loop retries on its next
//! turns; see [`RETRY_INTERVAL`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::outbound::ENTRY_COST;
use crate::service::{Broadcast, SessionId};

/// Broadcast bytes a loop may have in flight towards it (sent, not yet delivered).
pub(crate) const IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;
/// Broadcasts a loop may have in flight towards it: half its command channel.
pub(crate) const IN_FLIGHT_ENTRIES: usize = 32_768;
/// How soon a loop with waiting broadcasts tries again to hand them over.
pub(crate) const RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// What a broadcast costs in a loop's in-flight budget.
pub(crate) fn cost(broadcast: &Broadcast) -> usize {
    broadcast.data.len().saturating_add(ENTRY_COST)
}

/// The receiving side's in-flight budget: charged by senders, released by the receiver once
/// the broadcast reached its members.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    bytes: AtomicUsize,
    entries: AtomicUsize,
}

impl InFlight {
    /// Charges one entry of `cost` bytes if it fits within [`IN_FLIGHT_ENTRIES`] and
    /// [`IN_FLIGHT_BYTES`].
    pub(crate) fn charge(&self, cost: usize) -> bool {
        let entry = self
            .entries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < IN_FLIGHT_ENTRIES).then_some(held.saturating_add(1))
            });
        if entry.is_err() {
            return false;
        }
        let bytes = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let after = held.checked_add(cost)?;
                // One broadcast larger than the whole budget still goes alone.
                (after <= IN_FLIGHT_BYTES || held == 0).then_some(after)
            });
        if bytes.is_err() {
            self.entries.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back what a delivered (or undeliverable) broadcast was charged.
    pub(crate) fn release(&self, cost: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(cost))
            });
        let _ = self
            .entries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(1))
            });
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// Why a broadcast could not be handed to a loop now.
#[derive(Debug)]
pub(crate) enum NotSent {
    /// The loop's channel or byte budget is full: try again later.
    Full(Broadcast),
    /// The loop is gone: nobody there to deliver to.
    Gone,
}

/// A way to hand a broadcast to one other loop (the loop's handle; a plain queue in tests).
pub(crate) trait BroadcastTarget {
    fn try_broadcast(&self, broadcast: Broadcast) -> Result<(), NotSent>;
}

/// One loop's broadcasts that wait for room on another loop, and the senders paused for them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Per target loop, oldest first.
    waiting: Vec<VecDeque<Broadcast>>,
    /// Sessions of this loop not read until every waiting broadcast is handed over.
    paused: Vec<(usize, SessionId)>,
}

impl Outbox {
    /// Whether any broadcast waits for room.
    pub(crate) fn is_stalled(&self) -> bool {
        self.waiting.iter().any(|queue| !queue.is_empty())
    }

    /// Hands `broadcast` to every target except `own`, keeping per-target order: behind
    /// broadcasts already waiting for that target, or waiting itself if the target is full.
    /// Returns whether anything waits now.
    pub(crate) fn publish<T: BroadcastTarget>(
        &mut self,
        own: usize,
        targets: &[T],
        broadcast: &Broadcast,
    ) -> bool {
        if self.waiting.len() < targets.len() {
            self.waiting.resize_with(targets.len(), VecDeque::new);
        }
        // `waiting` has an entry for every target (resized above).
        let queues = self.waiting.iter_mut();
        for (index, (target, queue)) in targets.iter().zip(queues).enumerate() {
            if index == own {
                continue;
            }
            if !queue.is_empty() {
                queue.push_back(broadcast.clone());
                continue;
            }
            if let Err(NotSent::Full(broadcast)) = target.try_broadcast(broadcast.clone()) {
                queue.push_back(broadcast);
            }
        }
        self.is_stalled()
    }

    /// Hands over what waits, in order, as far as the targets take it. When nothing waits any
    /// more, returns the paused senders (to be read again).
    pub(crate) fn retry<T: BroadcastTarget>(&mut self, targets: &[T]) -> Vec<(usize, SessionId)> {
        for (index, queue) in self.waiting.iter_mut().enumerate() {
            let Some(target) = targets.get(index) else {
                queue.clear();
                continue;
            };
            while let Some(broadcast) = queue.pop_front() {
                match target.try_broadcast(broadcast) {
                    Ok(()) | Err(NotSent::Gone) => {}
                    Err(NotSent::Full(broadcast)) => {
                        queue.push_front(broadcast);
                        break;
                    }
                }
            }
            if queue.is_empty() && queue.capacity() > 64 {
                *queue = VecDeque::new();
            }
        }
        if self.is_stalled() {
            Vec::new()
        } else {
            std::mem::take(&mut self.paused)
        }
    }

    /// Pauses reading `key` until nothing waits (once per session).
    pub(crate) fn pause(&mut self, key: usize, id: SessionId) {
        if !self.paused.contains(&(key, id)) {
            self.paused.push((key, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use bytes::Bytes;

    use super::*;

    /// A loop's channel: at most `room` entries until the test drains it.
    struct Channel {
        room: RefCell<usize>,
        got: RefCell<Vec<Bytes>>,
    }

    impl BroadcastTarget for Channel {
        fn try_broadcast(&self, broadcast: Broadcast) -> Result<(), NotSent> {
            let mut room = self.room.borrow_mut();
            if *room == 0 {
                return Err(NotSent::Full(broadcast));
            }
            *room -= 1;
            self.got.borrow_mut().push(broadcast.data);
            Ok(())
        }
    }

    fn line(i: usize) -> Broadcast {
        Broadcast {
            listener: 0,
            except: SessionId(1),
            data: Bytes::from(format!("{i}\n")),
        }
    }

    #[test]
    fn a_full_loop_gets_every_broadcast_in_order_once_it_has_room() {
        let targets = [
            Channel {
                room: RefCell::new(usize::MAX),
                got: RefCell::default(),
            },
            Channel {
                room: RefCell::new(3),
                got: RefCell::default(),
            },
        ];
        let mut outbox = Outbox::default();
        let mut stalled = false;
        for i in 0..10 {
            stalled = outbox.publish(0, &targets, &line(i));
        }
        assert!(stalled, "the fourth line found loop 1 full");
        outbox.pause(7, SessionId(1));
        outbox.pause(7, SessionId(1));
        assert!(targets[0].got.borrow().is_empty(), "never to itself");
        assert!(
            outbox.retry(&targets).is_empty(),
            "still full: senders stay paused"
        );
        *targets[1].room.borrow_mut() = 4;
        assert!(outbox.retry(&targets).is_empty());
        *targets[1].room.borrow_mut() = 100;
        assert_eq!(outbox.retry(&targets), vec![(7, SessionId(1))]);
        assert!(!outbox.is_stalled());
        let got: Vec<Bytes> = targets[1].got.borrow().clone();
        let expected: Vec<Bytes> = (0..10).map(|i| line(i).data).collect();
        assert_eq!(got, expected, "none lost, none reordered");
    }

    #[test]
    fn the_byte_budget_bounds_what_is_in_flight() {
        let budget = InFlight::default();
        assert!(budget.charge(IN_FLIGHT_BYTES - 10));
        assert!(budget.charge(10), "exactly the budget");
        assert!(!budget.charge(1), "over the budget");
        budget.release(IN_FLIGHT_BYTES - 10);
        budget.release(10);
        assert_eq!(budget.held(), 0);
        assert!(
            budget.charge(IN_FLIGHT_BYTES * 2),
            "a broadcast larger than the budget goes alone"
        );
        assert!(!budget.charge(1));
        budget.release(IN_FLIGHT_BYTES * 2);
        for _ in 0..IN_FLIGHT_ENTRIES {
            assert!(budget.charge(1));
        }
        assert!(!budget.charge(1), "entries are bounded too");
        assert_eq!(
            budget.held(),
            IN_FLIGHT_ENTRIES,
            "a refused charge takes nothing"
        );
    }
}
