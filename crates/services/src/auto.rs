//! `auto`: the protocol group — several protocols on one port, told apart by their first bytes.
//!
//! The detectors are the sans-IO `plexus_proto::detect::sniff`; this module applies them with a
//! byte budget (`MAX_SNIFF_BYTES`) and a time budget (`handshake_timeout`): a TLS ClientHello
//! turns the session into a TLS session (the bytes already read become the first ciphertext)
//! and detection runs again on the decrypted stream; an HTTP request line hands the session to
//! the `http` service; anything else — or nothing decisive within the budgets — is echoed.
//! A PROXY header, when the listener accepts one, is consumed by the event loop before any of
//! this runs (the group sees the real client address).

use std::sync::Arc;
use std::time::Duration;

use plexus_proto::detect::{sniff, Sniff, MAX_SNIFF_BYTES};
use rustls::ServerConfig;

use plexus::{
    BoxError, CloseReason, ListenerContext, Service, ServiceFactory, Session, SessionHandler,
    SessionInfo,
};

use crate::http::{self, Http};
use crate::Echo;

/// The protocol group of one listener.
pub struct Auto {
    http: Arc<Http>,
    /// Present when TLS may be detected (the listener is plain TCP and TLS is configured).
    tls: Option<Arc<ServerConfig>>,
    budget: Duration,
    /// The group run again inside TLS: HTTP or echo, no second TLS layer.
    inner: Option<Arc<Auto>>,
}

impl Auto {
    /// A group for a plain TCP listener (`tls` = the listener's TLS configuration) or, with
    /// `tls = None`, for a tls listener (the transport already decrypted).
    pub fn new(http: Arc<Http>, tls: Option<Arc<ServerConfig>>, budget: Duration) -> Auto {
        let inner = tls.as_ref().map(|_| {
            Arc::new(Auto {
                http: Arc::clone(&http),
                tls: None,
                budget,
                inner: None,
            })
        });
        Auto {
            http,
            tls,
            budget,
            inner,
        }
    }
}

/// Builds the `auto` group of each listener naming it: TLS is detected on plain tcp listeners
/// (with the listener's TLS configuration), HTTP goes to the shared `http` service, and the
/// detection budget is the server's `handshake_timeout`.
pub struct AutoFactory {
    http: Arc<Http>,
}

impl AutoFactory {
    /// A factory whose groups hand HTTP sessions to `http`.
    pub fn new(http: Arc<Http>) -> AutoFactory {
        AutoFactory { http }
    }
}

impl ServiceFactory for AutoFactory {
    fn uses_tls(&self) -> bool {
        true
    }

    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        Ok(Arc::new(Auto::new(
            Arc::clone(&self.http),
            listener.tls().cloned(),
            listener.handshake_timeout(),
        )))
    }
}

impl Service for Auto {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        session.set_timer(self.budget);
        Box::new(Detecting {
            group: Detector {
                http: Arc::clone(&self.http),
                tls: self.tls.clone(),
                inner: self.inner.clone(),
            },
            seen: Vec::new(),
            chosen: None,
        })
    }
}

/// What a session needs to act on a detection.
struct Detector {
    http: Arc<Http>,
    tls: Option<Arc<ServerConfig>>,
    inner: Option<Arc<Auto>>,
}

/// A session of the group: detecting, then delegating to the protocol it chose.
struct Detecting {
    group: Detector,
    /// The first bytes, kept until a protocol is chosen (at most `MAX_SNIFF_BYTES`).
    seen: Vec<u8>,
    chosen: Option<Box<dyn SessionHandler>>,
}

impl Detecting {
    /// Hands the session to `handler`, replaying the bytes detection read.
    fn choose(&mut self, session: &mut Session<'_>, mut handler: Box<dyn SessionHandler>) {
        session.cancel_timer();
        let seen = std::mem::take(&mut self.seen);
        if !seen.is_empty() {
            handler.on_data(session, &seen);
        }
        self.chosen = Some(handler);
    }

    fn decide(&mut self, session: &mut Session<'_>, verdict: Sniff) {
        match verdict {
            Sniff::NeedMore => {}
            Sniff::Http => {
                let handler = http::open_session(&self.group.http);
                self.choose(session, handler);
            }
            Sniff::Tls => match (&self.group.tls, &self.group.inner) {
                (Some(config), Some(inner)) => {
                    session.cancel_timer();
                    let ciphertext = std::mem::take(&mut self.seen);
                    // The loop replaces this handler with `inner`'s once the handshake is done.
                    session.start_tls(Arc::clone(config), ciphertext, Arc::clone(inner) as _);
                    self.chosen = Some(Box::new(Upgrading));
                }
                // Inside TLS already (or no TLS configured): not ours to decrypt; echo it.
                _ => self.echo(session),
            },
            // A PROXY header here was not consumed by the listener (proxy_protocol is off):
            // it is just bytes.
            Sniff::Proxy | Sniff::Other => self.echo(session),
        }
    }

    fn echo(&mut self, session: &mut Session<'_>) {
        let handler = Echo.open(session);
        self.choose(session, handler);
    }
}

impl SessionHandler for Detecting {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_data(session, data);
            return;
        }
        // Bounded: detection decides by MAX_SNIFF_BYTES, so this holds at most that plus one read.
        self.seen.extend_from_slice(data);
        let verdict = match sniff(&self.seen, false) {
            // The byte budget is spent without a verdict: not one of ours.
            Sniff::NeedMore if self.seen.len() >= MAX_SNIFF_BYTES => Sniff::Other,
            verdict => verdict,
        };
        self.decide(session, verdict);
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        match self.chosen.as_mut() {
            Some(chosen) => chosen.on_timer(session),
            // The time budget is spent: whatever this is, it is echoed.
            None => self.echo(session),
        }
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_drain(session);
        }
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        if let Some(chosen) = self.chosen.as_mut() {
            chosen.on_close(info, reason);
        }
    }
}

/// The handler between "this is TLS" and the end of the handshake (it receives nothing: the
/// loop feeds rustls, then opens the inner group).
struct Upgrading;

impl SessionHandler for Upgrading {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}
