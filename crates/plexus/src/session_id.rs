//! Session ids: process-unique numbers, never reused while the process runs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A process-unique session number, never reused while the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u64);

impl SessionId {
    /// The number itself.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The next id; ids start at 1 and are never reused within a process.
    pub(crate) fn next() -> SessionId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        SessionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}
