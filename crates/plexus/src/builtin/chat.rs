//! `chat`: each line a member sends reaches every other member of the listener.
//!
//! Slow members never slow the others: a broadcast only queues bytes, and a member whose
//! outbound queue would pass `outbound_limit` (it is not reading) is closed and logged. The
//! sender is never paused on behalf of a receiver. A line longer than `[chat] max_line_bytes`
//! closes its sender with an error line.

use plexus_proto::LineFramer;
use tracing::info;

use crate::service::{Service, Session, SessionHandler};

/// The chat service.
#[derive(Debug, Clone, Copy)]
pub struct Chat {
    max_line_bytes: usize,
}

impl Chat {
    /// A chat whose members may send lines of at most `max_line_bytes` (without the newline).
    pub fn new(max_line_bytes: usize) -> Self {
        Chat { max_line_bytes }
    }
}

impl Service for Chat {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(ChatMember {
            lines: LineFramer::new(self.max_line_bytes),
        })
    }
}

struct ChatMember {
    lines: LineFramer,
}

impl SessionHandler for ChatMember {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let result = self.lines.push(data, |line| session.broadcast(line));
        if let Err(too_long) = result {
            info!(session = %session.id(), peer = %session.peer(), "chat member sent {too_long}; closing");
            session.send(format!("error: {too_long}\n").as_bytes());
            session.close();
        }
    }
}
