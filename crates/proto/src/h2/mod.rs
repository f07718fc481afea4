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
//!
//! ```
//! use std::time::Instant;
//! use plexus_proto::h2::{frame, hpack, Event, ServerConnection, Settings};
//!
//! let mut conn = ServerConnection::new(Settings::default());
//! // What a client sends: the preface, SETTINGS, then a GET on stream 1.
//! let mut bytes = frame::PREFACE.to_vec();
//! frame::write_settings(&mut bytes, &[]);
//! let mut block = Vec::new();
//! hpack::Encoder::new().encode(
//!     [(&b":method"[..], &b"GET"[..]), (b":scheme", b"http"), (b":path", b"/hello")],
//!     &mut block,
//! );
//! frame::write_headers(&mut bytes, 1, &block, true, 16_384);
//! conn.recv(&bytes, Instant::now()).unwrap();
//! let Some(Event::Request { stream: 1, head, end_stream: true }) = conn.poll_event() else { panic!() };
//! assert_eq!(head.path.as_deref(), Some("/hello"));
//! conn.send_headers(1, 200, &[(b"content-length", b"2")], false).unwrap();
//! assert_eq!(conn.send_data(1, b"hi", true), Ok(2));
//! let mut out = Vec::new();
//! conn.poll_transmit(&mut out); // SETTINGS, WINDOW_UPDATE, SETTINGS ACK, HEADERS, DATA
//! assert!(conn.open_streams() == 0 && !out.is_empty());
//! ```

pub mod connection;
pub mod frame;
pub mod hpack;
pub mod huffman;

pub use connection::{
    ConnectionError, Event, Flood, Limits, RequestHead, SendError, ServerConnection, Settings,
    Violation,
};
pub use frame::ErrorCode;
