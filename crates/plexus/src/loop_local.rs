//! Per-event-loop service state: a [`LoopLocal<T>`] names a slot, and every event loop keeps
//! its own `T` in it, reached from that loop's sessions through
//! [`crate::Session::loop_local`]. No lock and no thread-local: the loop owns the values and
//! hands them to its callbacks, one at a time.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The next slot number; every [`LoopLocal`] takes one for the process's life.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// A slot of per-event-loop state of type `T`, owned by a service (a cache, a scratch buffer,
/// a per-loop counter). Each event loop holds its own `T`, created with `T::default()` the
/// first time one of its sessions asks for it, and dropped when the loop ends. Services on
/// different loops never share it, so it needs no lock; two services with their own
/// `LoopLocal` never see each other's values, even of the same type.
///
/// Each `LoopLocal::new` takes a process-wide slot, and every loop that uses it keeps one
/// pointer-sized entry for it: create them with the service (once per listener), not per
/// session.
///
/// ```
/// use plexus::{LoopLocal, Service, Session, SessionHandler};
///
/// /// Counts the bytes each event loop received.
/// struct Counting {
///     per_loop: LoopLocal<u64>,
/// }
/// struct CountingSession {
///     per_loop: LoopLocal<u64>,
/// }
/// impl Service for Counting {
///     fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
///         Box::new(CountingSession { per_loop: self.per_loop.clone() })
///     }
/// }
/// impl SessionHandler for CountingSession {
///     fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
///         let total = session.loop_local(&self.per_loop);
///         *total += data.len() as u64;
///         let line = format!("{total}\n");
///         session.send(line.as_bytes());
///     }
/// }
/// let service = Counting { per_loop: LoopLocal::new() };
/// # let _ = service;
/// ```
pub struct LoopLocal<T> {
    slot: usize,
    _value: PhantomData<fn() -> T>,
}

impl<T: Default + Send + 'static> LoopLocal<T> {
    /// A new slot, empty on every loop.
    pub fn new() -> Self {
        LoopLocal {
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            _value: PhantomData,
        }
    }
}

impl<T: Default + Send + 'static> Default for LoopLocal<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for LoopLocal<T> {
    /// The same slot (a handle to it, for the service's session handlers).
    fn clone(&self) -> Self {
        LoopLocal {
            slot: self.slot,
            _value: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for LoopLocal<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopLocal")
            .field("slot", &self.slot)
            .finish()
    }
}

/// One event loop's values, by slot.
#[derive(Default)]
pub(crate) struct LoopLocals {
    slots: Vec<Option<Box<dyn Any + Send>>>,
}

impl LoopLocals {
    /// This loop's value of `key`, created on first use.
    #[allow(clippy::indexing_slicing, clippy::expect_used)] // why: resized, then filled, here.
    pub(crate) fn get<T: Default + Send + 'static>(&mut self, key: &LoopLocal<T>) -> &mut T {
        if self.slots.len() <= key.slot {
            self.slots.resize_with(key.slot.saturating_add(1), || None);
        }
        let entry = &mut self.slots[key.slot];
        if !entry.as_ref().is_some_and(|value| value.is::<T>()) {
            *entry = Some(Box::new(T::default()));
        }
        entry
            .as_mut()
            .and_then(|value| value.downcast_mut::<T>())
            .expect("the slot was just filled with a T")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_keeps_its_own_value_even_of_the_same_type() {
        let mut locals = LoopLocals::default();
        let a: LoopLocal<u32> = LoopLocal::new();
        let b: LoopLocal<u32> = LoopLocal::new();
        *locals.get(&a) += 5;
        *locals.get(&b) += 7;
        *locals.get(&a.clone()) += 1;
        assert_eq!(*locals.get(&a), 6);
        assert_eq!(*locals.get(&b), 7);
        // Another loop starts from the default.
        let mut other = LoopLocals::default();
        assert_eq!(*other.get(&a), 0);
    }
}
