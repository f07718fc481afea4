//! `chat`: each line a member sends reaches every other member of the listener.
//!
//! Slow members never slow the others: a broadcast only queues bytes, and a member whose
//! outbound queue would pass `outbound_limit` (it is not reading) is closed and logged. The
//! sender is never paused on behalf of a receiver. A line longer than `[chat] max_line_bytes`
//! closes its sender with an error line.
//!
//! The complete lines of one read travel as one broadcast: one shared buffer that every other
//! member's queue references, not one entry per line (a read of 65,536 one-byte lines would
//! otherwise cost every member 65,536 queue entries).

use bytes::Bytes;
use plexus_proto::LineFramer;
use tracing::info;

use plexus::{Service, Session, SessionHandler};

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
        // Sized for everything this read can complete: the buffer is shared as it is.
        let mut batch = Vec::with_capacity(self.lines.pending() + data.len());
        let result = self.lines.push(data, |line| batch.extend_from_slice(line));
        // Lines completed before an over-long one are still delivered.
        session.broadcast_bytes(Bytes::from(batch));
        if let Err(too_long) = result {
            info!(session = %session.id(), peer = %session.peer(), "chat member sent {too_long}; closing");
            session.send(format!("error: {too_long}\n").as_bytes());
            session.close();
        }
    }
}
