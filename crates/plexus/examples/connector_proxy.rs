//! A line-protocol proxy on plexus' connectors: each client session opens its own upstream
//! connection on its event loop; every line the client sends goes to the upstream, and the
//! upstream's reply lines come back, in order.
//!
//! ```text
//! cargo run --release -p plexus --example connector_proxy -- 127.0.0.1:7601 127.0.0.1:6379 \
//!     [--connect-timeout 2s] [--reply-timeout 10s]
//! ```
//!
//! - An upstream that cannot be reached (refused, or no answer within the connect timeout)
//!   gets the client `-ERR upstream unavailable` and a close.
//! - An upstream that stops answering (requests outstanding, no reply line for the reply
//!   timeout) gets the client `-ERR upstream timeout` and a close.
//! - An upstream that stops *reading* makes the proxy stop reading its client: the runtime's
//!   link backpressure (the upstream's queue past the high watermark pauses the client), so
//!   memory stays bounded whatever the client sends.
//! - A client line longer than 64 KiB gets `-ERR line too long` and a close.
//! - A client that half-closes gets the replies to what it sent, then the close.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use plexus::{
    CloseReason, Config, LinkEvent, Server, Service, Session, SessionHandler, SessionId, Upstream,
};

/// Longest client line (without its newline) the proxy accepts.
const MAX_LINE: usize = 64 * 1024;

struct Proxy {
    upstream: Upstream,
    reply_timeout: Duration,
}

/// What the two halves of one proxied session share (both run on the same loop thread).
#[derive(Default)]
struct Shared {
    /// Lines sent upstream and not yet answered.
    outstanding: AtomicU64,
    /// Reply lines received so far (progress, for the reply timeout).
    replies: AtomicU64,
    /// The client finished sending: close once every reply is back.
    client_done: AtomicBool,
}

impl Service for Proxy {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let shared = Arc::new(Shared::default());
        let upstream_side = UpstreamSide {
            client: session.id(),
            shared: Arc::clone(&shared),
        };
        let upstream = session.connect(&self.upstream, Box::new(upstream_side));
        Box::new(ClientSide {
            upstream,
            shared,
            partial: Vec::new(),
            reply_timeout: self.reply_timeout,
            replies_at_timer: 0,
        })
    }
}

/// The client's half: whole lines go upstream.
struct ClientSide {
    upstream: SessionId,
    shared: Arc<Shared>,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    reply_timeout: Duration,
    /// `shared.replies` when the reply timer was armed.
    replies_at_timer: u64,
}

impl ClientSide {
    fn fail(&mut self, session: &mut Session<'_>, why: &str) {
        session.send(format!("-ERR {why}\n").as_bytes());
        session.close();
    }
}

impl SessionHandler for ClientSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let Some(last_newline) = data.iter().rposition(|&b| b == b'\n') else {
            if self.partial.len() + data.len() > MAX_LINE {
                self.fail(session, "line too long");
            } else {
                self.partial.extend_from_slice(data);
            }
            return;
        };
        let (lines, rest) = data.split_at(last_newline + 1);
        let first_line = lines.iter().position(|&b| b == b'\n').unwrap_or(0);
        if self.partial.len() + first_line > MAX_LINE || rest.len() > MAX_LINE {
            self.fail(session, "line too long");
            return;
        }
        let count = lines.iter().filter(|&&b| b == b'\n').count() as u64;
        if !self.partial.is_empty() {
            session.send_to(self.upstream, &std::mem::take(&mut self.partial));
        }
        session.send_to(self.upstream, lines);
        self.partial.extend_from_slice(rest);
        if self.shared.outstanding.fetch_add(count, Relaxed) == 0 {
            self.replies_at_timer = self.shared.replies.load(Relaxed);
            session.set_timer(self.reply_timeout);
        }
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        if self.shared.outstanding.load(Relaxed) == 0 {
            return;
        }
        let replies = self.shared.replies.load(Relaxed);
        if replies == self.replies_at_timer {
            eprintln!(
                "session {}: no reply from the upstream in {:?}",
                session.id(),
                self.reply_timeout
            );
            self.fail(session, "upstream timeout");
            return;
        }
        // Replies are coming, just not all of them yet.
        self.replies_at_timer = replies;
        session.set_timer(self.reply_timeout);
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        // Answer what was asked, then close (the upstream side closes us after the last reply).
        self.shared.client_done.store(true, Relaxed);
        if self.shared.outstanding.load(Relaxed) == 0 {
            session.close();
        }
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        match event {
            LinkEvent::Closed {
                reason: CloseReason::UpstreamFailed(_) | CloseReason::UpstreamTimeout,
                ..
            } => self.fail(session, "upstream unavailable"),
            LinkEvent::Closed { .. } if self.shared.outstanding.load(Relaxed) > 0 => {
                self.fail(session, "upstream closed")
            }
            LinkEvent::Closed { .. } => session.close(),
            _ => {}
        }
    }
}

/// The upstream's half: its bytes go back to the client; whole reply lines are counted.
struct UpstreamSide {
    client: SessionId,
    shared: Arc<Shared>,
}

impl SessionHandler for UpstreamSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.client, data);
        let count = data.iter().filter(|&&b| b == b'\n').count() as u64;
        if count == 0 {
            return;
        }
        self.shared.replies.fetch_add(count, Relaxed);
        let before = self.shared.outstanding.load(Relaxed);
        let left = before.saturating_sub(count);
        self.shared.outstanding.store(left, Relaxed);
        if left == 0 && self.shared.client_done.load(Relaxed) {
            session.close_to(self.client);
        }
    }
}

fn duration_arg(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<Duration, String> {
    let value = args.next().ok_or(format!("{flag} needs a value"))?;
    humantime::parse_duration(&value).map_err(|err| format!("{flag} {value:?}: {err}"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:7601".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:6379".into());
    let mut connect_timeout = Duration::from_secs(2);
    let mut reply_timeout = Duration::from_secs(10);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--connect-timeout" => connect_timeout = duration_arg(&mut args, &flag)?,
            "--reply-timeout" => reply_timeout = duration_arg(&mut args, &flag)?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    // Resolved here, once, before any loop runs: name resolution never blocks a loop.
    let upstream = Upstream::resolve(&upstream)?.with_connect_timeout(connect_timeout);
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = 1\n\n\
             [[listener]]\nname = \"proxy\"\ntransport = \"tcp\"\naddr = \"{listen}\"\n\
             service = \"proxy\"\n"
        ),
        "connector_proxy example",
    )?;
    let server = Server::builder(config)
        .service(
            "proxy",
            Proxy {
                upstream,
                reply_timeout,
            },
        )
        .handle_signals(true)
        .build()?;
    for (name, addr) in server.local_addrs() {
        eprintln!("listening name={name} transport=tcp addr={addr}");
    }
    server.run()?;
    Ok(())
}
