//! A Redis-protocol (RESP2) server on plexus' framing API: `redis-cli` and `redis-benchmark`
//! are its clients.
//!
//! ```text
//! cargo run --release -p plexus --example resp_server -- 127.0.0.1:6380 [EVENT_LOOPS]
//! redis-cli -p 6380 set greeting hello ex 60
//! redis-benchmark -p 6380 -t ping,set,get,incr,mset -P 16 -q
//! ```
//!
//! Commands: PING, ECHO, GET, SET (NX, XX, GET, EX, PX, KEEPTTL), DEL, EXISTS, INCR, INCRBY,
//! MGET, MSET, EXPIRE (NX, XX, GT, LT), TTL, DBSIZE, FLUSHALL, COMMAND (COUNT, LIST, INFO,
//! DOCS), and what clients send on connect: CONFIG GET, HELLO (protocol 2), CLIENT, SELECT 0,
//! INFO, QUIT. Every value is a string.
//!
//! Each session is a [`Framed`] over the [`resp::Resp`] framer: the handler gets whole
//! commands, answers every command of one read in order and sends the replies together (so a
//! pipelined batch costs one write). Errors a command can have (arity, syntax, not an integer,
//! unknown command) are `-ERR …` replies and the session goes on; bytes that are not RESP, and
//! a bulk string or array past the [`resp::Limits`], get `-ERR Protocol error: …` and a close,
//! while every other session goes on.
//!
//! The keyspace is shared by every session, behind one `Mutex`: uncontended with one event
//! loop (the default), a point of contention with several. Keys expire lazily (when looked at
//! after their deadline) and actively: one session at a time (the first to arrive, then the
//! next to send a command once it leaves) sweeps due keys on its loop timer every 100 ms.

mod commands;
mod resp;
mod store;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use plexus::framing::{FrameError, FrameHandler, Framed};
use plexus::{CloseReason, Config, Server, Service, Session, SessionHandler, SessionInfo};

use commands::Next;
use store::Store;

/// How often the sweeping session removes due keys, and how many at most per sweep (the
/// mutex is held that long); with more due, the next sweep comes at once.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
const SWEEP_BUDGET: usize = 1000;

/// The service: the shared keyspace and the parsing limits.
struct RespService {
    store: Arc<Mutex<Store>>,
    limits: resp::Limits,
}

impl Service for RespService {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let mut handler = RespSession {
            store: Arc::clone(&self.store),
            replies: BytesMut::new(),
        };
        handler.claim_sweep(session);
        Box::new(Framed::new(resp::Resp::new(self.limits), handler))
    }
}

/// One client: its replies waiting for the end of the read.
struct RespSession {
    store: Arc<Mutex<Store>>,
    replies: BytesMut,
}

impl RespSession {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock closes that session only; the data stays usable.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Becomes the sweeping session if none is.
    fn claim_sweep(&mut self, session: &mut Session<'_>) {
        let mut store = self.store();
        if store.sweeper.is_none() {
            store.sweeper = Some(session.id().get());
            drop(store);
            session.set_timer(SWEEP_INTERVAL);
        }
    }
}

impl FrameHandler<Vec<Bytes>> for RespSession {
    fn on_frame(&mut self, session: &mut Session<'_>, command: Vec<Bytes>) {
        let now = session.now();
        let next = {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            if store.sweeper.is_none() {
                store.sweeper = Some(session.id().get());
                session.set_timer(SWEEP_INTERVAL);
            }
            commands::execute(
                &mut store,
                &command,
                session.id().get(),
                now,
                &mut self.replies,
            )
        };
        if next == Next::Close {
            self.on_read_end(session);
            session.close();
        }
    }

    fn on_read_end(&mut self, session: &mut Session<'_>) {
        if !self.replies.is_empty() {
            session.send_bytes(std::mem::take(&mut self.replies).freeze());
        }
    }

    fn on_frame_error(&mut self, session: &mut Session<'_>, error: &FrameError) {
        let text = match error {
            FrameError::TooLong { limit, seen } => {
                format!("ERR Protocol error: too big request ({seen} bytes, the limit is {limit})")
            }
            other => format!("ERR Protocol error: {other}"),
        };
        eprintln!("{} from {}: {text}; closing", session.id(), session.peer());
        resp::error(&mut self.replies, &text);
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        let more = self.store().sweep(session.now(), SWEEP_BUDGET);
        session.set_timer(if more {
            Duration::from_millis(1)
        } else {
            SWEEP_INTERVAL
        });
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let mut store = self.store();
        if store.sweeper == Some(info.id().get()) {
            store.sweeper = None;
        }
        if !matches!(reason, CloseReason::PeerClosed | CloseReason::Requested) {
            eprintln!("{} from {} closed: {reason}", info.id(), info.peer());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:6380".into());
    let event_loops: usize = match args.next() {
        Some(n) => n
            .parse()
            .map_err(|_| format!("event loops: {n:?} is not a number"))?,
        None => 1,
    };
    // Redis clients keep idle connections open for long: no idle timeout worth the name.
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = {event_loops}\nidle_timeout = \"1day\"\n\n\
             [[listener]]\nname = \"resp\"\ntransport = \"tcp\"\naddr = \"{addr}\"\n\
             service = \"resp\"\n"
        ),
        "resp_server example",
    )?;
    let service = RespService {
        store: Arc::default(),
        limits: resp::Limits::default(),
    };
    let server = Server::builder(config)
        .service("resp", service)
        .handle_signals(true)
        .build()?;
    for (name, addr) in server.local_addrs() {
        eprintln!("listening name={name} transport=tcp addr={addr}");
    }
    server.run()?;
    Ok(())
}
