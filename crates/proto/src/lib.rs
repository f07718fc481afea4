//! Sans-IO building blocks of plexus: the hashed timer wheel that drives
//! every timeout ([`TimerWheel`]), address access control ([`Acl`],
//! [`Cidr`]) and line framing for line-based services ([`LineFramer`]).
//! Nothing in this crate touches a socket, spawns a thread or reads a clock:
//! bytes and the current [`Instant`](std::time::Instant) are always passed in
//! by the caller, which keeps every piece deterministic and unit-testable.
#![forbid(unsafe_code)]

pub mod acl;
pub mod line;
pub mod timer;

pub use acl::{Acl, AclError, Cidr};
pub use line::{LineFramer, LineTooLong};
pub use timer::{TimerKey, TimerWheel};
