//! Sans-IO building blocks of plexus: the hashed timer wheel that drives
//! every timeout ([`TimerWheel`]), address access control ([`Acl`],
//! [`Cidr`]), line framing for line-based services ([`LineFramer`]), the
//! HTTP/1.1 request decoder and response helpers ([`http`]), the HTTP/2
//! frame, HPACK and server-connection codec ([`h2`]), first-bytes
//! protocol detection for the `auto` group ([`detect`]), the PROXY
//! protocol v1/v2 header ([`proxy`]) and the envelope check of a stapled
//! OCSP response ([`ocsp`]).
//! Nothing in this crate touches a socket, spawns a thread or reads a clock:
//! bytes and the current [`Instant`](std::time::Instant) are always passed in
//! by the caller, which keeps every piece deterministic and unit-testable.
#![forbid(unsafe_code)]
// No panics from input: this crate parses what the network sends, so indexing, unchecked
// arithmetic and unwrap/expect are refused outside tests; the few places where an invariant
// makes one safe carry a narrowly scoped `allow` with the reason.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod acl;
pub mod detect;
pub mod dtls;
pub mod h2;
pub mod http;
pub mod line;
pub mod ocsp;
pub mod proxy;
pub mod timer;

pub use acl::{Acl, AclError, Cidr};
pub use detect::{sniff, Sniff, MAX_SNIFF_BYTES};
pub use line::{LineFramer, LineTooLong};
pub use proxy::{
    encode_proxy_v1, encode_proxy_v2, parse_proxy_header, ProxyError, ProxyHeader, MAX_PROXY_HEADER,
};
pub use timer::{deadline_after, TimerKey, TimerWheel};
