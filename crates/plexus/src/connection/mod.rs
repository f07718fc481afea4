//! Connection layers: the stages a TCP session's bytes pass through between the socket and the
//! service's handler.
//!
//! A session is a stack, bottom to top: a transport (plain TCP, or [`tls::TlsTransport`]), then
//! optional preamble stages ([`proxy_header::ProxyPreamble`]; protocol detection is a
//! service-level concern, see `builtin::auto`), then the handler. Each stage is sans-IO: bytes
//! and `now` go in, events and bytes come out, and it never touches a socket or the clock, so
//! it is unit-tested in memory. The event loop owns the sockets and timers and moves bytes
//! between them and the stack.

pub(crate) mod proxy_header;
pub(crate) mod stream;
pub(crate) mod tls;
