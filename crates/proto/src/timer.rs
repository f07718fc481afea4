//! Hashed timing wheel: owns every pending timer of an event loop.
//!
//! [`TimerWheel`] maps each deadline to a slot (`tick index & (slots - 1)`).
//! Each slot is an intrusive doubly-linked list threaded through a slab of
//! entries, so [`TimerWheel::insert`] and [`TimerWheel::cancel`] are O(1).
//! Every entry keeps its absolute deadline; timers more than one revolution
//! ahead simply stay in their slot and are skipped until they are due
//! (a hashed wheel "with rounds"). An occupancy bitmap lets
//! [`TimerWheel::next_wakeup`] jump straight to the next occupied slot, so a
//! sparse wheel does not force a wake-up every tick.
//!
//! The wheel never reads a clock: every instant is passed in by the caller.

use std::fmt;
use std::time::{Duration, Instant};

/// Sentinel "no entry" index for the intrusive lists and the free list.
const NIL: usize = usize::MAX;

/// Where [`deadline_after`] saturates: further than any timer can meaningfully wait.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `now + after` without the panic of `Instant + Duration` on overflow: a delay too long to
/// represent (a configured or peer-supplied duration) becomes a deadline about a century
/// away, which in practice never fires. Every deadline of the runtime is computed here.
pub fn deadline_after(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Handle to a timer inserted into a [`TimerWheel`].
///
/// It names an entry slot plus that entry's generation: once the timer fires
/// or is cancelled the generation moves on, so a stale key can never cancel a
/// newer timer that reuses the same entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: usize,
    generation: u64,
}

/// One slab entry: either a pending timer (linked into its slot's list) or a
/// free entry (linked into the free list through `next`).
struct Entry<T> {
    /// `Some` while the timer is pending, `None` while the entry is free.
    value: Option<T>,
    /// Absolute deadline of the timer.
    deadline: Instant,
    /// Tick the timer belongs to (never below the wheel's cursor).
    tick: u64,
    prev: usize,
    next: usize,
    /// Bumped every time the entry is released.
    generation: u64,
}

/// A hashed timing wheel holding values of type `T` until their deadline.
///
/// Time is divided into ticks of a fixed resolution starting at the origin
/// given to [`TimerWheel::new`]. Deadlines are exact: [`TimerWheel::poll_expired`]
/// returns a timer as soon as `now >= deadline`, never earlier.
pub struct TimerWheel<T> {
    origin: Instant,
    tick: Duration,
    tick_nanos: u128,
    /// `slots - 1`; slots is a power of two.
    mask: usize,
    /// First tick whose slot has not been fully processed. Every pending
    /// entry has `tick >= cursor`.
    cursor: u64,
    /// Head entry of each slot's list.
    heads: Vec<usize>,
    /// One bit per slot, set while the slot's list is non-empty.
    occupied: Vec<u64>,
    entries: Vec<Entry<T>>,
    /// Head of the free-entry list.
    free: usize,
    len: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick", &self.tick)
            .field("slots", &self.heads.len())
            .field("cursor", &self.cursor)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel.
    ///
    /// `tick` is the resolution (must be > 0), `slots` is rounded up to a
    /// power of two (at least 2), and `now` is the wheel's origin: tick 0
    /// starts there.
    ///
    /// # Panics
    ///
    /// Panics if `tick` is zero or `slots` cannot be rounded up to a power of
    /// two that fits in `usize`.
    pub fn new(tick: Duration, slots: usize, now: Instant) -> Self {
        assert!(!tick.is_zero(), "TimerWheel tick must be greater than zero");
        // A caller's programming error (documented above), not input.
        #[allow(clippy::expect_used)]
        let slots = slots
            .max(2)
            .checked_next_power_of_two()
            .expect("TimerWheel slot count too large to round up to a power of two");
        TimerWheel {
            origin: now,
            tick,
            tick_nanos: tick.as_nanos(),
            // `slots` is at least 2.
            mask: slots.saturating_sub(1),
            cursor: 0,
            heads: vec![NIL; slots],
            occupied: vec![0; slots.div_ceil(64)],
            entries: Vec::new(),
            free: NIL,
            len: 0,
        }
    }

    /// The wheel's resolution.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Number of slots (a power of two).
    pub fn slots(&self) -> usize {
        self.heads.len()
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `value` to fire at `deadline`. O(1); allocates only when the
    /// entry slab has to grow. A deadline in the past fires on the next poll.
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let tick = self.tick_of(deadline).max(self.cursor);
        let slot = self.slot_of(tick);
        let head = self.head(slot);
        let index = if self.free != NIL {
            let index = self.free;
            let entry = self.entry_mut(index);
            let next_free = entry.next;
            entry.value = Some(value);
            entry.deadline = deadline;
            entry.tick = tick;
            entry.prev = NIL;
            entry.next = head;
            self.free = next_free;
            index
        } else {
            self.entries.push(Entry {
                value: Some(value),
                deadline,
                tick,
                prev: NIL,
                next: head,
                generation: 0,
            });
            // Just pushed: at least one entry.
            self.entries.len().saturating_sub(1)
        };
        if head != NIL {
            self.entry_mut(head).prev = index;
        }
        self.set_head(slot, index);
        // At most one pending timer per entry: cannot overflow.
        self.len = self.len.saturating_add(1);
        TimerKey {
            index,
            generation: self.entry(index).generation,
        }
    }

    /// Cancels a pending timer. O(1).
    ///
    /// Returns its value if the timer was still pending, `None` for keys of
    /// timers that already fired or were cancelled (even if their entry has
    /// since been reused by another timer).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let entry = self.entries.get(key.index)?;
        if entry.generation != key.generation || entry.value.is_none() {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index))
    }

    /// Moves every timer whose deadline is `<= now` into `out` (appending;
    /// not sorted by deadline). Never returns a timer before its deadline.
    ///
    /// Cost is proportional to the ticks elapsed since the previous poll
    /// (capped at one revolution: after a longer jump each slot is visited
    /// once) plus the timers visited in those slots.
    pub fn poll_expired(&mut self, now: Instant, out: &mut Vec<T>) {
        let now_tick = self.tick_of(now);
        if self.len > 0 {
            let span = now_tick
                .saturating_sub(self.cursor)
                .saturating_add(1)
                .min(self.heads.len() as u64);
            for step in 0..span {
                let slot = self.slot_of(self.cursor.wrapping_add(step));
                self.expire_slot(slot, now, out);
                if self.len == 0 {
                    break;
                }
            }
        }
        // The slot of `now_tick` may still hold timers due later within that
        // tick, so the cursor stops on it rather than past it.
        self.cursor = self.cursor.max(now_tick);
    }

    /// The earliest instant at which [`poll_expired`](Self::poll_expired) may
    /// return something, or `None` when the wheel is empty.
    ///
    /// Never later than the earliest pending deadline. It may be earlier
    /// (the start of a slot whose timers belong to a later revolution), but
    /// polling at the returned instant always makes progress, so an event loop
    /// using it as its timeout never spins.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        let current = self.slot_of(self.cursor);
        // Timers in the current tick can be anywhere inside it: use their
        // exact deadline. Timers of later revolutions in the same slot are the
        // answer only if no other slot is occupied.
        let mut due_now: Option<Instant> = None;
        let mut later: Option<Instant> = None;
        let mut index = self.head(current);
        while index != NIL {
            let entry = self.entry(index);
            let best = if entry.tick <= self.cursor {
                &mut due_now
            } else {
                &mut later
            };
            *best = Some(best.map_or(entry.deadline, |b| b.min(entry.deadline)));
            index = entry.next;
        }
        if due_now.is_some() {
            return due_now;
        }
        match self.next_occupied(current.wrapping_add(1) & self.mask) {
            Some(slot) if slot != current => {
                let distance = (slot.wrapping_sub(current) & self.mask) as u64;
                let tick = self.cursor.saturating_add(distance);
                // The tick start is <= every deadline in that slot, hence
                // representable; fall back to an exact scan just in case.
                self.tick_start(tick).or_else(|| self.min_deadline_in(slot))
            }
            _ => later,
        }
    }

    /// Tick index containing `t` (saturating at 0 before the origin).
    fn tick_of(&self, t: Instant) -> u64 {
        let nanos = t.saturating_duration_since(self.origin).as_nanos();
        // `tick_nanos` is at least 1 (`new` refuses a zero tick).
        nanos
            .checked_div(self.tick_nanos)
            .and_then(|tick| u64::try_from(tick).ok())
            .unwrap_or(u64::MAX)
    }

    /// Instant at which tick `tick` starts, if representable.
    fn tick_start(&self, tick: u64) -> Option<Instant> {
        let nanos = u128::from(tick).checked_mul(self.tick_nanos)?;
        let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
        let subsec = u32::try_from(nanos % 1_000_000_000).ok()?;
        self.origin.checked_add(Duration::new(secs, subsec))
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick & self.mask as u64) as usize
    }

    fn min_deadline_in(&self, slot: usize) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut index = self.head(slot);
        while index != NIL {
            let entry = self.entry(index);
            best = Some(best.map_or(entry.deadline, |b| b.min(entry.deadline)));
            index = entry.next;
        }
        best
    }

    /// First occupied slot at or after `start`, wrapping around once.
    fn next_occupied(&self, start: usize) -> Option<usize> {
        let (first_word, bit) = (start / 64, start % 64);
        let slot_at = |word_index: usize, word: u64| {
            word_index
                .checked_mul(64)?
                .checked_add(usize::try_from(word.trailing_zeros()).ok()?)
        };
        let high = self.occupied.get(first_word).copied().unwrap_or(0) & (u64::MAX << bit);
        if high != 0 {
            return slot_at(first_word, high);
        }
        // On wrapping back to `first_word`, its bits at or above `start` are
        // already known to be clear, so the whole word can be tested.
        let (before, from_first) = self.occupied.split_at(first_word.min(self.occupied.len()));
        from_first
            .iter()
            .enumerate()
            .skip(1)
            .map(|(offset, word)| (first_word.saturating_add(offset), *word))
            .chain(before.iter().copied().enumerate())
            .chain(from_first.first().map(|word| (first_word, *word)))
            .find(|&(_, word)| word != 0)
            .and_then(|(word_index, word)| slot_at(word_index, word))
    }

    /// Fires every timer in `slot` whose deadline is `<= now`.
    fn expire_slot(&mut self, slot: usize, now: Instant, out: &mut Vec<T>) {
        let mut index = self.head(slot);
        while index != NIL {
            let entry = self.entry(index);
            let next = entry.next;
            if entry.deadline <= now {
                self.unlink(index);
                out.push(self.release(index));
            }
            index = next;
        }
    }

    /// Removes a pending entry from its slot's list.
    fn unlink(&mut self, index: usize) {
        let (prev, next, tick) = {
            let entry = self.entry(index);
            (entry.prev, entry.next, entry.tick)
        };
        if prev != NIL {
            self.entry_mut(prev).next = next;
        } else {
            let slot = self.slot_of(tick);
            self.set_head(slot, next);
        }
        if next != NIL {
            self.entry_mut(next).prev = prev;
        }
    }

    /// Puts an unlinked entry on the free list and returns its value.
    fn release(&mut self, index: usize) -> T {
        let free = self.free;
        let entry = self.entry_mut(index);
        // Callers release only entries they found pending (`cancel` checks, `expire_slot`
        // walks a slot's list, which holds only pending entries).
        #[allow(clippy::expect_used)]
        let value = entry
            .value
            .take()
            .expect("released timer entry must be pending");
        entry.generation = entry.generation.wrapping_add(1);
        entry.prev = NIL;
        entry.next = free;
        self.free = index;
        // This entry was pending, so `len` counted it.
        self.len = self.len.saturating_sub(1);
        value
    }

    // The only places that index the slab and the slot table. Every index kept in `heads`,
    // in an entry's `prev`/`next` or in `free` names an existing entry (entries are never
    // removed from the slab), and every slot comes from `slot_of` (masked below
    // `heads.len()`), so these cannot go out of bounds; a broken invariant would panic here
    // instead of corrupting a list. Nothing here depends on input: the wheel holds only the
    // runtime's own timers.

    /// The entry at `index` (an index the wheel handed out and keeps linked).
    #[allow(clippy::indexing_slicing)] // see above
    fn entry(&self, index: usize) -> &Entry<T> {
        &self.entries[index]
    }

    /// The entry at `index`, mutably.
    #[allow(clippy::indexing_slicing)] // see above
    fn entry_mut(&mut self, index: usize) -> &mut Entry<T> {
        &mut self.entries[index]
    }

    /// The first entry of `slot`'s list, or `NIL`.
    #[allow(clippy::indexing_slicing)] // see above
    fn head(&self, slot: usize) -> usize {
        self.heads[slot]
    }

    /// Sets the first entry of `slot`'s list and its occupancy bit.
    #[allow(clippy::indexing_slicing)] // see above; `occupied` has a bit for every slot
    fn set_head(&mut self, slot: usize, index: usize) {
        self.heads[slot] = index;
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if index == NIL {
            self.occupied[word] &= !bit;
        } else {
            self.occupied[word] |= bit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    /// Polls every `step` from t0 to `end`, returning when each value fired.
    fn fire_times(
        wheel: &mut TimerWheel<u32>,
        t0: Instant,
        step: Duration,
        end: Duration,
    ) -> BTreeMap<u32, Duration> {
        let mut fired = BTreeMap::new();
        let mut out = Vec::new();
        let mut at = Duration::ZERO;
        while at <= end {
            wheel.poll_expired(t0 + at, &mut out);
            for v in out.drain(..) {
                assert!(fired.insert(v, at).is_none(), "timer {v} fired twice");
            }
            at += step;
        }
        fired
    }

    #[test]
    fn new_rounds_slots_up_to_power_of_two() {
        let t0 = Instant::now();
        assert_eq!(TimerWheel::<()>::new(ms(1), 0, t0).slots(), 2);
        assert_eq!(TimerWheel::<()>::new(ms(1), 1, t0).slots(), 2);
        assert_eq!(TimerWheel::<()>::new(ms(1), 3, t0).slots(), 4);
        assert_eq!(TimerWheel::<()>::new(ms(1), 64, t0).slots(), 64);
        assert_eq!(TimerWheel::<()>::new(ms(1), 65, t0).slots(), 128);
    }

    #[test]
    fn deadline_after_saturates_instead_of_panicking() {
        let t0 = Instant::now();
        assert_eq!(deadline_after(t0, ms(5)), t0 + ms(5));
        let far = deadline_after(t0, Duration::MAX);
        assert!(far > t0 + Duration::from_secs(50 * 365 * 86_400));
        let mut wheel = TimerWheel::new(ms(1), 8, t0);
        wheel.insert(far, 1u32);
        let mut out = Vec::new();
        wheel.poll_expired(t0 + Duration::from_secs(3600), &mut out);
        assert!(out.is_empty());
        assert!(wheel.next_wakeup().is_some());
    }

    #[test]
    #[should_panic(expected = "tick must be greater than zero")]
    fn zero_tick_panics() {
        let _ = TimerWheel::<()>::new(Duration::ZERO, 8, Instant::now());
    }

    #[test]
    fn fires_exactly_when_polled_at_or_after_deadline() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 16, t0);
        let deadlines = [0u64, 1, 5, 10, 15, 37, 100, 159, 160, 161, 333];
        for (i, d) in deadlines.iter().enumerate() {
            wheel.insert(t0 + ms(*d), i as u32);
        }
        assert_eq!(wheel.len(), deadlines.len());
        // Poll every millisecond: each timer must fire at exactly its deadline.
        let fired = fire_times(&mut wheel, t0, ms(1), ms(400));
        for (i, d) in deadlines.iter().enumerate() {
            assert_eq!(fired[&(i as u32)], ms(*d), "timer {i} at {d}ms");
        }
        assert!(wheel.is_empty());
    }

    #[test]
    fn polled_once_per_tick_fires_within_one_tick() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 8, t0);
        let deadlines = [3u64, 10, 19, 20, 21, 79, 80, 81, 250];
        for (i, d) in deadlines.iter().enumerate() {
            wheel.insert(t0 + ms(*d), i as u32);
        }
        let fired = fire_times(&mut wheel, t0, ms(10), ms(300));
        for (i, d) in deadlines.iter().enumerate() {
            let at = fired[&(i as u32)];
            assert!(at >= ms(*d), "timer {i} fired early at {at:?}");
            assert!(at < ms(*d) + ms(10), "timer {i} fired late at {at:?}");
        }
    }

    #[test]
    fn not_fired_one_nanosecond_early() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 8, t0);
        let deadline = t0 + ms(25);
        wheel.insert(deadline, 1);
        let mut out = Vec::new();
        wheel.poll_expired(deadline - Duration::from_nanos(1), &mut out);
        assert!(out.is_empty());
        wheel.poll_expired(deadline, &mut out);
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn cancel_returns_value_once_and_stale_keys_are_harmless() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 8, t0);
        let a = wheel.insert(t0 + ms(5), "a");
        let b = wheel.insert(t0 + ms(5), "b");
        assert_eq!(wheel.cancel(a), Some("a"));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);

        // The freed entry is reused; the old key must not cancel the new timer.
        let c = wheel.insert(t0 + ms(6), "c");
        assert_eq!(c.index, a.index);
        assert_ne!(c, a);
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 2);

        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(10), &mut out);
        out.sort_unstable();
        assert_eq!(out, vec!["b", "c"]);
        // Fired timers cannot be cancelled.
        assert_eq!(wheel.cancel(b), None);
        assert_eq!(wheel.cancel(c), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn cancel_from_middle_head_and_tail_of_a_slot_list() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 4, t0);
        let keys: Vec<_> = (0..5).map(|i| wheel.insert(t0 + ms(2), i)).collect();
        assert_eq!(wheel.cancel(keys[2]), Some(2)); // middle
        assert_eq!(wheel.cancel(keys[4]), Some(4)); // head (inserted last)
        assert_eq!(wheel.cancel(keys[0]), Some(0)); // tail
        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(2), &mut out);
        assert_eq!(sorted(out), vec![1, 3]);
        assert_eq!(wheel.next_wakeup(), None);
    }

    #[test]
    fn timers_many_revolutions_ahead() {
        let t0 = Instant::now();
        // 8 slots of 1ms: one revolution is 8ms.
        let mut wheel = TimerWheel::new(ms(1), 8, t0);
        wheel.insert(t0 + ms(1000), 1);
        wheel.insert(t0 + ms(1003), 2);
        wheel.insert(t0 + ms(8 * 50), 3);
        let fired = fire_times(&mut wheel, t0, ms(1), ms(1100));
        assert_eq!(fired[&1], ms(1000));
        assert_eq!(fired[&2], ms(1003));
        assert_eq!(fired[&3], ms(400));
    }

    #[test]
    fn large_jump_in_time_fires_everything_due_and_nothing_else() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 16, t0);
        for i in 0..200u32 {
            wheel.insert(t0 + ms(u64::from(i) * 37), i);
        }
        let mut out = Vec::new();
        // Jump far past one revolution, to 3700ms: timers 0..=100 are due.
        wheel.poll_expired(t0 + ms(3700), &mut out);
        assert_eq!(sorted(out.clone()), (0..=100).collect::<Vec<_>>());
        out.clear();
        wheel.poll_expired(t0 + Duration::from_secs(3600), &mut out);
        assert_eq!(sorted(out), (101..200).collect::<Vec<_>>());
        assert!(wheel.is_empty());
    }

    #[test]
    fn many_timers_in_one_slot() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 4, t0);
        // All land in slot 1: ticks 1, 5, 9, ... with sub-tick offsets.
        let mut keys = Vec::new();
        for i in 0..1000u32 {
            let rev = u64::from(i % 10);
            let deadline = t0 + ms(10 + rev * 40) + us(u64::from(i % 7) * 1000);
            keys.push((i, deadline, wheel.insert(deadline, i)));
        }
        for (i, _, key) in &keys {
            if i % 2 == 0 {
                assert_eq!(wheel.cancel(*key), Some(*i));
            }
        }
        let mut out = Vec::new();
        let now = t0 + ms(10 + 3 * 40 + 3);
        wheel.poll_expired(now, &mut out);
        let expect: Vec<u32> = keys
            .iter()
            .filter(|(i, d, _)| i % 2 == 1 && *d <= now)
            .map(|(i, _, _)| *i)
            .collect();
        assert!(!expect.is_empty());
        assert_eq!(sorted(out), expect);
        assert_eq!(wheel.len(), 500 - expect.len());
    }

    #[test]
    fn reinsert_after_fire_reuses_entries_without_growth() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 8, t0);
        let mut out = Vec::new();
        let mut now = t0;
        for round in 0..100u32 {
            wheel.insert(now + ms(3), round);
            now += ms(3);
            wheel.poll_expired(now, &mut out);
            assert_eq!(out, vec![round]);
            out.clear();
        }
        assert_eq!(wheel.entries.len(), 1, "fired entries must be reused");
    }

    #[test]
    fn past_deadlines_fire_on_next_poll() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 8, t0 + ms(100));
        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(500), &mut out);
        // Before the origin, and before the last poll.
        wheel.insert(t0, 1);
        wheel.insert(t0 + ms(250), 2);
        assert_eq!(wheel.next_wakeup(), Some(t0));
        wheel.poll_expired(t0 + ms(500), &mut out);
        assert_eq!(sorted(out), vec![1, 2]);
    }

    #[test]
    fn next_wakeup_is_exact_within_current_tick_and_tick_start_otherwise() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(10), 64, t0);
        assert_eq!(wheel.next_wakeup(), None);
        wheel.insert(t0 + us(25_500), 1);
        // Slot of tick 2 is the next occupied one.
        assert_eq!(wheel.next_wakeup(), Some(t0 + ms(20)));
        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(20), &mut out);
        assert!(out.is_empty());
        // Now in the timer's own tick: exact deadline.
        assert_eq!(wheel.next_wakeup(), Some(t0 + us(25_500)));
        wheel.poll_expired(t0 + us(25_500), &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(wheel.next_wakeup(), None);
    }

    #[test]
    fn next_wakeup_of_sparse_far_timer_does_not_wake_every_tick() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 64, t0);
        let deadline = t0 + Duration::from_secs(10);
        wheel.insert(deadline, 7);
        let mut out = Vec::new();
        let mut wakeups = 0;
        while let Some(at) = wheel.next_wakeup() {
            assert!(at <= deadline);
            wheel.poll_expired(at, &mut out);
            wakeups += 1;
            assert!(wakeups <= 10_000 / 64 + 3, "too many wake-ups");
        }
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn next_wakeup_when_only_later_revolutions_remain_in_current_slot() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 4, t0);
        // Tick 1 and tick 101 share slot 1.
        wheel.insert(t0 + ms(1), 1);
        wheel.insert(t0 + us(101_500), 2);
        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(1), &mut out);
        assert_eq!(out, vec![1]);
        // Only the far timer is left, in the current slot, no other slot occupied.
        assert_eq!(wheel.next_wakeup(), Some(t0 + us(101_500)));
    }

    #[test]
    fn next_occupied_wraps_around_bitmap_words() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(ms(1), 256, t0);
        // Move the cursor to tick 200 (slot 200), then add a timer in slot 3.
        let mut out = Vec::new();
        wheel.poll_expired(t0 + ms(200), &mut out);
        wheel.insert(t0 + ms(256 + 3), 1);
        assert_eq!(wheel.next_occupied(201), Some(3));
        assert_eq!(wheel.next_wakeup(), Some(t0 + ms(259)));
        wheel.insert(t0 + ms(230), 2);
        assert_eq!(wheel.next_occupied(201), Some(230));
        assert_eq!(wheel.next_wakeup(), Some(t0 + ms(230)));
    }

    #[test]
    fn debug_does_not_require_debug_values() {
        struct Opaque;
        let wheel = TimerWheel::<Opaque>::new(ms(5), 8, Instant::now());
        let text = format!("{wheel:?}");
        assert!(text.contains("slots: 8"), "{text}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Deadline relative to the current `now`, in microseconds (may be negative).
        Insert(i64),
        /// Index into every key ever handed out.
        Cancel(usize),
        /// Advance `now` by this many microseconds, then poll.
        Poll(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (-20_000i64..300_000).prop_map(Op::Insert),
            1 => any::<usize>().prop_map(Op::Cancel),
            3 => prop_oneof![0u64..5_000, 0u64..100_000, 0u64..1_000_000].prop_map(Op::Poll),
        ]
    }

    fn offset(now: Instant, rel: i64, floor: Instant) -> Instant {
        if rel >= 0 {
            now + us(rel.unsigned_abs())
        } else {
            now.checked_sub(us(rel.unsigned_abs()))
                .map_or(floor, |t| t.max(floor))
        }
    }

    proptest! {
        #[test]
        fn matches_btreemap_model(
            tick_us in prop_oneof![Just(1u64), Just(1_000), Just(3_000), Just(10_000)],
            slots in prop_oneof![Just(2usize), Just(4), Just(16), Just(64), Just(100)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut wheel = TimerWheel::new(us(tick_us), slots, t0);
            let mut model: BTreeMap<u32, Instant> = BTreeMap::new();
            let mut keys: Vec<(u32, TimerKey)> = Vec::new();
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(rel) => {
                        let id = keys.len() as u32;
                        let deadline = offset(now, rel, t0);
                        keys.push((id, wheel.insert(deadline, id)));
                        model.insert(id, deadline);
                    }
                    Op::Cancel(i) => {
                        if !keys.is_empty() {
                            let (id, key) = keys[i % keys.len()];
                            let expect = model.remove(&id).map(|_| id);
                            prop_assert_eq!(wheel.cancel(key), expect);
                        }
                    }
                    Op::Poll(step) => {
                        now += us(step);
                        wheel.poll_expired(now, &mut out);
                        let due: Vec<u32> = model
                            .iter()
                            .filter(|(_, d)| **d <= now)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in &due {
                            model.remove(id);
                        }
                        prop_assert_eq!(sorted(std::mem::take(&mut out)), due);
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
                let earliest = model.values().min().copied();
                match (wheel.next_wakeup(), earliest) {
                    (None, None) => {}
                    (Some(w), Some(e)) => prop_assert!(w <= e, "wake-up {:?} after earliest {:?}", w - t0, e - t0),
                    (w, e) => prop_assert!(false, "next_wakeup {:?} but earliest {:?}", w, e),
                }
            }
        }

        #[test]
        fn event_loop_on_next_wakeup_fires_each_timer_on_time(
            tick_us in prop_oneof![Just(1_000u64), Just(7_000)],
            slots in prop_oneof![Just(2usize), Just(8), Just(64)],
            deadlines in proptest::collection::vec(0u64..2_000_000, 1..50),
        ) {
            let t0 = Instant::now();
            let mut wheel = TimerWheel::new(us(tick_us), slots, t0);
            for (i, d) in deadlines.iter().enumerate() {
                wheel.insert(t0 + us(*d), i);
            }
            // Each timer may cause one early wake-up per revolution (its slot
            // coming round) plus the exact one.
            let revolution = tick_us * slots as u64;
            let budget: u64 = deadlines.iter().map(|d| d / revolution + 2).sum();
            let mut out = Vec::new();
            let mut wakeups = 0u64;
            let mut last = t0;
            while let Some(at) = wheel.next_wakeup() {
                prop_assert!(at >= last, "wake-up went backwards");
                last = at;
                wheel.poll_expired(at, &mut out);
                for i in out.drain(..) {
                    let d = t0 + us(deadlines[i]);
                    prop_assert!(d <= at, "timer {} fired early", i);
                    prop_assert!(at - d < us(tick_us), "timer {} fired late", i);
                }
                wakeups += 1;
                prop_assert!(wakeups <= budget, "more than {} wake-ups", budget);
            }
            prop_assert!(wheel.is_empty());
        }
    }
}
