//! A blocking service through the public API: every line is a "lookup" that takes 10 ms on a
//! worker thread (think: a database call). Replies come back in request order per session, and
//! throughput grows with `[server] workers`.
//!
//! ```text
//! cargo run --release -p plexus --example blocking_lookup -- 127.0.0.1:7301 4
//! printf 'a\nb\nc\n' | cargo run -p plexus-cli -- connect tcp://127.0.0.1:7301
//! ```

use std::thread;
use std::time::Duration;

use plexus::{Config, Reply, Server, Service, Session, SessionHandler};
use plexus_proto::LineFramer;

/// The simulated backend call's duration.
const BACKEND_LATENCY: Duration = Duration::from_millis(10);

struct Lookup;

impl Service for Lookup {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(LookupSession {
            lines: LineFramer::new(1024),
        })
    }
}

struct LookupSession {
    lines: LineFramer,
}

impl SessionHandler for LookupSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let mut keys = Vec::new();
        if self
            .lines
            .push(data, |line| keys.push(line.trim_ascii_end().to_vec()))
            .is_err()
        {
            session.send(b"error: line too long\n");
            session.close();
        }
        for key in keys {
            // Runs on a worker: blocking here stalls no event loop.
            session.spawn_blocking(move |reply: &mut Reply| {
                thread::sleep(BACKEND_LATENCY);
                reply.send(&key);
                reply.send(b" => found\n");
            });
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7301".into());
    let workers = std::env::args().nth(2).unwrap_or_else(|| "4".into());
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = 1\nworkers = {workers}\n\n[[listener]]\nname = \"lookup\"\n\
             transport = \"tcp\"\naddr = \"{addr}\"\nservice = \"lookup\"\n"
        ),
        "blocking_lookup example",
    )?;
    let server = Server::builder(config)
        .service("lookup", Lookup)
        .handle_signals(true)
        .build()?;
    eprintln!(
        "blocking_lookup listening on {}",
        server.local_addr("lookup").expect("configured")
    );
    server.run()?;
    Ok(())
}
