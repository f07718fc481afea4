//! Echo served two ways in one process, to measure the cost of the worker-pool hand-off:
//! `inline` echoes on the event loop; `offload` sends every chunk through
//! `Session::spawn_blocking` (a worker thread) and back. Drive both with the same load:
//!
//! ```text
//! cargo run --release -p plexus --example offload_echo -- 127.0.0.1:7310 127.0.0.1:7311
//! benches/target/release/echo-load --addr 127.0.0.1:7310 ...   # inline
//! benches/target/release/echo-load --addr 127.0.0.1:7311 ...   # offload
//! ```

use plexus::{Config, Reply, Server, Service, Session, SessionHandler};

/// Echoes on the event loop.
struct Inline;
struct InlineSession;

impl Service for Inline {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(InlineSession)
    }
}

impl SessionHandler for InlineSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send(data);
    }
}

/// Echoes through the worker pool.
struct Offload;
struct OffloadSession;

impl Service for Offload {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(OffloadSession)
    }
}

impl SessionHandler for OffloadSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let data = data.to_vec();
        session.spawn_blocking(move |reply: &mut Reply| reply.send(&data));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let inline = args.next().unwrap_or_else(|| "127.0.0.1:7310".into());
    let offload = args.next().unwrap_or_else(|| "127.0.0.1:7311".into());
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = 1\nworkers = 1\n\n\
             [[listener]]\nname = \"inline\"\ntransport = \"tcp\"\naddr = \"{inline}\"\nservice = \"inline\"\n\n\
             [[listener]]\nname = \"offload\"\ntransport = \"tcp\"\naddr = \"{offload}\"\nservice = \"offload\"\n"
        ),
        "offload_echo example",
    )?;
    let server = Server::builder(config)
        .service("inline", Inline)
        .service("offload", Offload)
        .handle_signals(true)
        .build()?;
    for (name, addr) in server.local_addrs() {
        eprintln!("{name} listening on {addr}");
    }
    server.run()?;
    Ok(())
}
