//! A custom line-based service run through the library, without the CLI.
//!
//! Each line a client sends comes back upper-cased, prefixed with the line's number in the
//! session; `quit` closes the session. Run it and talk to it:
//!
//! ```text
//! cargo run -p plexus --example line_upper -- 127.0.0.1:7300
//! printf 'hello\nworld\nquit\n' | cargo run -p plexus-cli -- connect tcp://127.0.0.1:7300
//! ```

use plexus::{CloseReason, Config, Server, Service, Session, SessionHandler, SessionInfo};
use plexus_proto::LineFramer;

/// The service: shared by all sessions, creates one [`UpperSession`] per connection.
struct Upper;

impl Service for Upper {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        session.send(b"ready\n");
        Box::new(UpperSession {
            lines: LineFramer::new(1024),
            count: 0,
        })
    }
}

/// Per-session state: the line framer and how many lines were answered.
struct UpperSession {
    lines: LineFramer,
    count: u64,
}

impl SessionHandler for UpperSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let count = &mut self.count;
        let result = self.lines.push(data, |line| {
            let text = String::from_utf8_lossy(line);
            let text = text.trim_end();
            if text == "quit" {
                session.send(b"bye\n");
                session.close();
                return;
            }
            *count += 1;
            session.send(format!("{count}: {}\n", text.to_uppercase()).as_bytes());
        });
        if result.is_err() {
            session.send(b"error: line too long\n");
            session.close();
        }
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        eprintln!(
            "{} from {} closed after {} lines: {reason}",
            info.id(),
            info.peer(),
            self.count
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7300".into());
    let config = Config::parse(
        &format!(
            "[server]\nevent_loops = 1\n\n[[listener]]\nname = \"upper\"\ntransport = \"tcp\"\n\
             addr = \"{addr}\"\nservice = \"upper\"\n"
        ),
        "line_upper example",
    )?;
    let server = Server::builder(config)
        .service("upper", Upper)
        .handle_signals(true)
        .build()?;
    eprintln!(
        "line_upper listening on {}",
        server.local_addr("upper").expect("configured")
    );
    server.run()?;
    Ok(())
}
