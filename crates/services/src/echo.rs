//! `echo`: every byte comes back unchanged, in order. Backpressure comes from the event loop,
//! which stops reading a session whose outbound queue passed the high watermark.

use plexus::{Service, Session, SessionHandler};

/// The echo service.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Service for Echo {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        // A zero-sized handler: boxing it does not allocate.
        Box::new(EchoSession)
    }
}

struct EchoSession;

impl SessionHandler for EchoSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send(data);
    }
}
