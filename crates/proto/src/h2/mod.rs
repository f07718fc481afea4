//! HTTP/2 (RFC 9113) for the `http` service, sans-IO: owns the frame codec
//! ([`frame`]), HPACK header compression ([`hpack`], with its Huffman code in
//! [`huffman`]) and the server side of a connection ([`connection`]): the
//! client preface, SETTINGS, stream states, flow control both ways, and the
//! bounds that keep an abusive peer cheap.
//!
//! Why hand-written rather than the `h2` crate: `h2` drives its connection
//! through tokio's `AsyncRead`/`AsyncWrite` and task wakers — a second
//! runtime's types — while plexus drives every protocol from its own mio
//! event loops with time passed in. Like the HTTP/1.1 decoder ([`crate::http`]),
//! this module takes bytes and an `Instant` and hands back events and bytes
//! to send; it never touches a socket or reads a clock, so every state
//! transition and every attack bound is a deterministic unit test and a
//! fuzz target (`fuzz/fuzz_targets/h2_frames.rs`, `hpack_decode.rs`).

pub mod connection;
pub mod frame;
pub mod hpack;
pub mod huffman;

pub use connection::{
    ConnectionError, Event, Flood, Limits, RequestHead, SendError, ServerConnection, Settings,
    Violation,
};
pub use frame::ErrorCode;
