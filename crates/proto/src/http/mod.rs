//! HTTP/1.1 for the `http` service, sans-IO: owns the request decoder
//! ([`RequestDecoder`], RFC 9112 framing with explicit [`Limits`]) and the
//! pure response-side helpers (status line and header writing, chunked
//! encoding, HTTP dates, byte ranges, conditional requests, content types,
//! `Accept-Encoding` negotiation ([`AcceptEncoding`]), and the mapping of a
//! request target to safe path segments).
//!
//! The decoder is fed whatever bytes a read returned and hands out
//! [`RequestEvent`]s: a head, pieces of decoded body, the end of a message;
//! pipelined requests come out one after another. Every malformed or
//! oversized input is a precise [`RequestError`] whose
//! [`status`](RequestError::status) is the answer the runtime sends before
//! closing the connection.
//!
//! ```
//! use plexus_proto::http::{Limits, RequestDecoder, RequestEvent};
//!
//! let mut decoder = RequestDecoder::new(Limits::default());
//! decoder.push(b"GET /hello HTTP/1.1\r\nHost: example\r\n\r\nGET /a b");
//! let Ok(Some(RequestEvent::Head(head))) = decoder.poll() else { panic!() };
//! assert_eq!(head.target, "/hello");
//! assert!(head.keep_alive);
//! assert_eq!(decoder.poll(), Ok(Some(RequestEvent::End)));
//! // The pipelined second request is malformed: answer, then close.
//! decoder.push(b" HTTP/1.1\r\n");
//! assert_eq!(decoder.poll().map_err(|e| e.status()), Err(400));
//! ```

mod accept_encoding;
mod path;
mod request;
mod response;

pub use accept_encoding::{AcceptEncoding, MAX_CODINGS, Q_MAX};
pub use path::{normalize_path, origin_form, OriginForm, PathError};
pub use request::{
    BodyLength, Header, Limits, Method, RequestDecoder, RequestError, RequestEvent, RequestHead,
    Version,
};
pub use response::{
    content_type, entity_tag, format_http_date, if_none_match, if_range_matches, parse_http_date,
    parse_range, reason_phrase, write_chunk, write_head, write_last_chunk, RangeRequest,
};
