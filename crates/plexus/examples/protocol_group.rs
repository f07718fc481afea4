//! One port, four protocols, through a [`plexus::ProtocolGroup`]:
//!
//! - a binary protocol whose frames are `0xB7`, a big-endian u16 length, then the payload,
//!   answered with the payload reversed in the same framing (framed by
//!   [`plexus::framing::LengthPrefixed`], the marker as its one-byte offset);
//! - TLS (a self-signed certificate, generated because no certificate files are configured),
//!   with detection again inside;
//! - HTTP/1.1, served by the built-in `http` service (so `curl` works);
//! - anything else: a line protocol, each line answered in upper case.
//!
//! Every protocol works fed one byte at a time; a client that sends nothing decisive within
//! the time budget (`handshake_timeout`: 10 s, or the optional second argument such as `2s`)
//! gets the line protocol.
//!
//! ```text
//! cargo run --release -p plexus --example protocol_group -- 127.0.0.1:7600
//! curl http://127.0.0.1:7600/healthz ; curl -k https://127.0.0.1:7600/healthz
//! printf 'hello\n' | nc 127.0.0.1 7600
//! printf 'hello\n' | openssl s_client -quiet -connect 127.0.0.1:7600
//! printf '\xb7\x00\x03abc' | nc 127.0.0.1 7600 | xxd
//! ```

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use plexus::framing::{FrameError, FrameHandler, Framed, Framer, LengthPrefixed, LengthWidth};
use plexus::protocol_group::{prefix, Http1Request, ProtocolGroup};
use plexus::{BoxError, Config, ListenerContext, Server, Service, Session, SessionHandler};
use plexus_proto::LineFramer;

/// The binary protocol's frame marker.
const MAGIC: u8 = 0xB7;

/// The binary protocol's framer: a [`LengthPrefixed`] frame (a big-endian u16 length after a
/// one-byte offset, the marker) whose first byte must be [`MAGIC`].
struct BinaryFrames(LengthPrefixed);

impl BinaryFrames {
    fn new() -> Self {
        let frames = LengthPrefixed::new(LengthWidth::U16, usize::from(u16::MAX))
            .length_offset(1)
            .keep_header();
        BinaryFrames(frames)
    }
}

impl Framer for BinaryFrames {
    type Frame = Bytes;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match buf.first() {
            Some(&found) if found != MAGIC => Err(FrameError::Unexpected {
                expected: "0xB7",
                found,
            }),
            _ => self.0.decode(buf),
        }
    }

    fn max_buffered(&self) -> usize {
        self.0.max_buffered()
    }
}

/// Binary frames: each payload comes back reversed.
struct Reverse;

impl Service for Reverse {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(Framed::new(BinaryFrames::new(), Reversing))
    }
}

/// Answers each whole frame (header kept) with its payload reversed, in the same framing.
struct Reversing;

impl FrameHandler<Bytes> for Reversing {
    fn on_frame(&mut self, session: &mut Session<'_>, frame: Bytes) {
        let (header, payload) = frame.split_at(frame.len().min(3));
        let mut reply = BytesMut::with_capacity(frame.len());
        reply.extend_from_slice(header);
        reply.extend(payload.iter().rev());
        session.send(&reply);
    }

    fn on_frame_error(&mut self, session: &mut Session<'_>, _: &FrameError) {
        // Framed closes the session after this.
        session.send(b"\xB7\x00\x0dbad frame tag");
    }
}

/// Lines, answered in upper case.
struct Upper;

impl Service for Upper {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(UpperSession {
            lines: LineFramer::new(4096),
        })
    }
}

struct UpperSession {
    lines: LineFramer,
}

impl SessionHandler for UpperSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let result = self.lines.push(data, |line| {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let mut reply = line.to_ascii_uppercase();
            reply.push(b'\n');
            session.send(&reply);
        });
        if result.is_err() {
            session.send(b"ERROR: LINE TOO LONG\n");
            session.close();
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7600".into());
    // The time budget (the server's handshake_timeout), e.g. "2s"; 10 s by default.
    let budget = std::env::args().nth(2).unwrap_or_else(|| "10s".into());
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = 1\nhandshake_timeout = \"{budget}\"\n\n[[listener]]\nname = \"group\"\ntransport = \"tcp\"\n\
             addr = \"{addr}\"\nservice = \"group\"\n"
        ),
        "protocol_group example",
    )?;
    let builder = plexus_services::register(Server::builder(config));
    let http = builder.config().http.clone();
    let http: Arc<dyn Service> = Arc::new(plexus_services::Http::new(&http));
    // A factory, because the group needs the listener's TLS configuration (a generated
    // self-signed certificate here) and the server's handshake_timeout.
    let factory = move |listener: &ListenerContext<'_>| -> Result<Arc<dyn Service>, BoxError> {
        let mut group = ProtocolGroup::builder()
            .member("binary", prefix([MAGIC]), Arc::new(Reverse))
            .member("http", Http1Request, Arc::clone(&http))
            .fallback(Arc::new(Upper))
            .time_budget(listener.handshake_timeout());
        if let Some(tls) = listener.tls() {
            group = group.tls(Arc::clone(tls));
        }
        Ok(Arc::new(group.build()))
    };
    let server = builder
        .service_factory("group", TlsFactory(factory))
        .handle_signals(true)
        .build()?;
    let bound = server.local_addr("group").expect("configured");
    eprintln!("listening name=group transport=tcp addr={bound}");
    server.run()?;
    Ok(())
}

/// A closure factory that also asks for the listener's TLS configuration.
struct TlsFactory<F>(F);

impl<F> plexus::ServiceFactory for TlsFactory<F>
where
    F: Fn(&ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> + Send + Sync + 'static,
{
    fn uses_tls(&self, _: &plexus::config::ListenerConfig) -> bool {
        true
    }

    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        (self.0)(listener)
    }
}
