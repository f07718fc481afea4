//! The keyspace: string keys to string values, each with an optional deadline.
//!
//! Expiry is lazy (a key past its deadline is removed when it is next looked at) and active
//! ([`Store::sweep`] removes keys whose deadline passed, oldest first, a bounded number per
//! call). Deadlines are indexed in a `BTreeSet` ordered by time, so a sweep touches only keys
//! that are due. Time is an argument (`now`) everywhere.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use bytes::Bytes;

/// One key's value and deadline.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) value: Bytes,
    pub(crate) expires: Option<Instant>,
}

/// The keyspace, shared by every session (behind one mutex in this example).
#[derive(Debug, Default)]
pub(crate) struct Store {
    map: HashMap<Bytes, Entry>,
    deadlines: BTreeSet<(Instant, Bytes)>,
    /// The session whose timer drives [`Store::sweep`], if one does.
    pub(crate) sweeper: Option<u64>,
}

impl Store {
    /// The live entry of `key` (removing it if it expired).
    pub(crate) fn get(&mut self, key: &[u8], now: Instant) -> Option<&Entry> {
        self.expire_if_due(key, now);
        self.map.get(key)
    }

    /// Whether `key` exists now.
    pub(crate) fn contains(&mut self, key: &[u8], now: Instant) -> bool {
        self.get(key, now).is_some()
    }

    /// Sets `key` to `value` with `expires` (keys and values are copied: a slice of a read
    /// buffer would keep the whole buffer alive).
    pub(crate) fn set(&mut self, key: &[u8], value: &[u8], expires: Option<Instant>) {
        let key = Bytes::copy_from_slice(key);
        let value = Bytes::copy_from_slice(value);
        if let Some(old) = self.map.insert(key.clone(), Entry { value, expires }) {
            if let Some(at) = old.expires {
                self.deadlines.remove(&(at, key.clone()));
            }
        }
        if let Some(at) = expires {
            self.deadlines.insert((at, key));
        }
    }

    /// Replaces the value of an existing, live `key`, keeping its deadline.
    pub(crate) fn replace_value(&mut self, key: &[u8], value: Bytes) {
        if let Some(entry) = self.map.get_mut(key) {
            entry.value = value;
        }
    }

    /// Sets or clears the deadline of an existing key.
    pub(crate) fn set_expiry(&mut self, key: &[u8], expires: Option<Instant>) {
        let Some((key, entry)) = self.map.get_key_value(key) else {
            return;
        };
        let key = key.clone();
        if let Some(at) = entry.expires {
            self.deadlines.remove(&(at, key.clone()));
        }
        if let Some(at) = expires {
            self.deadlines.insert((at, key.clone()));
        }
        if let Some(entry) = self.map.get_mut(&key) {
            entry.expires = expires;
        }
    }

    /// Removes `key`; whether it existed (and was live).
    pub(crate) fn remove(&mut self, key: &[u8], now: Instant) -> bool {
        self.expire_if_due(key, now);
        self.remove_entry(key)
    }

    /// Keys stored, including expired ones not yet removed (as redis' DBSIZE counts).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Keys that have a deadline.
    pub(crate) fn volatile(&self) -> usize {
        self.deadlines.len()
    }

    /// Removes every key.
    pub(crate) fn clear(&mut self) {
        self.map = HashMap::new();
        self.deadlines = BTreeSet::new();
    }

    /// Removes up to `budget` keys whose deadline is `now` or earlier; returns whether more
    /// are due.
    pub(crate) fn sweep(&mut self, now: Instant, budget: usize) -> bool {
        for _ in 0..budget {
            let Some((at, _)) = self.deadlines.first() else {
                return false;
            };
            if *at > now {
                return false;
            }
            if let Some((_, key)) = self.deadlines.pop_first() {
                self.map.remove(&key);
            }
        }
        self.deadlines.first().is_some_and(|(at, _)| *at <= now)
    }

    fn expire_if_due(&mut self, key: &[u8], now: Instant) {
        let due = self
            .map
            .get(key)
            .and_then(|entry| entry.expires)
            .is_some_and(|at| at <= now);
        if due {
            self.remove_entry(key);
        }
    }

    fn remove_entry(&mut self, key: &[u8]) -> bool {
        let Some((key, entry)) = self.map.remove_entry(key) else {
            return false;
        };
        if let Some(at) = entry.expires {
            self.deadlines.remove(&(at, key));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lazy_and_active_expiry() {
        let t0 = Instant::now();
        let mut store = Store::default();
        store.set(b"a", b"1", Some(t0 + Duration::from_secs(1)));
        store.set(b"b", b"2", Some(t0 + Duration::from_secs(2)));
        store.set(b"c", b"3", None);
        assert!(store.contains(b"a", t0));
        // Lazy: looked at after its deadline, gone.
        assert!(!store.contains(b"a", t0 + Duration::from_secs(1)));
        assert_eq!((store.len(), store.volatile()), (2, 1));
        // Active: the sweep removes what is due, and nothing else.
        assert!(!store.sweep(t0 + Duration::from_secs(5), 10));
        assert_eq!((store.len(), store.volatile()), (1, 0));
        assert!(store.contains(b"c", t0 + Duration::from_secs(5)));
    }

    #[test]
    fn the_sweep_is_bounded_and_overwrites_drop_old_deadlines() {
        let t0 = Instant::now();
        let mut store = Store::default();
        for i in 0..10u8 {
            store.set(&[i], b"v", Some(t0));
        }
        store.set(&[0], b"v", None); // no deadline any more
        store.set_expiry(&[1], Some(t0 + Duration::from_secs(9)));
        assert!(store.sweep(t0, 4));
        assert!(!store.sweep(t0, 4));
        assert_eq!((store.len(), store.volatile()), (2, 1));
        assert!(store.remove(&[1], t0));
        assert_eq!(store.volatile(), 0);
    }
}
