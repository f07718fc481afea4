//! `forward`: relays a session's byte stream to an upstream TCP server and back — a TCP proxy
//! for plain listeners, TLS termination for tls listeners — on plexus' connectors
//! ([`plexus::connector`]) alone.
//!
//! Each client session opens its own upstream session on its event loop
//! ([`Session::connect`]). Bytes go across with [`Session::send_to`]; the runtime's link
//! backpressure stops reading the side whose partner's queue is past the high watermark, so
//! each direction is bounded by the watermarks (plus one read). A half-close travels through:
//! the client's FIN (or close_notify) becomes a FIN to the upstream once everything before it
//! is written ([`Session::finish_to`]), and the upstream's FIN comes back the same way (as
//! close_notify to a TLS client). The pair ends when both directions have.
//!
//! Bytes are copied through user space (read into the loop's buffer, queued, written):
//! `splice = true` is accepted and has no effect any more.
//!
//! The upstream (`upstream = "HOST:PORT"`) is resolved when the listener is built (at start or
//! when a reload adds or changes it), never on a loop; its addresses are tried in order, each
//! within the server's `handshake_timeout`. With `upstream_tls = true` the upstream session is
//! a TLS client (TLS origination): the certificate must chain to `upstream_ca` (else the
//! system's roots) and name `upstream_sni` (else the upstream's host).

use std::sync::Arc;
use std::time::Instant;

use plexus::tls_client::{self, ServerTrust};
use plexus::{
    BoxError, CloseReason, LinkEvent, ListenerContext, Service, ServiceFactory, Session,
    SessionHandler, SessionId, Upstream,
};
use tracing::info;

/// Builds the `forward` service of each listener from its `upstream` key.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwardFactory;

impl ServiceFactory for ForwardFactory {
    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        let Some(upstream) = listener.config().upstream.as_deref() else {
            return Err(format!("listener {}: forward needs an upstream", listener.name()).into());
        };
        let config = listener.config();
        let mut resolved =
            Upstream::resolve(upstream)?.with_connect_timeout(listener.handshake_timeout());
        if config.upstream_tls {
            let trust = match &config.upstream_ca {
                Some(path) => ServerTrust::CaFile(path.clone()),
                None => ServerTrust::SystemRoots,
            };
            let client = tls_client::client_config(&trust, &[])?;
            // The host of HOST:PORT unless upstream_sni names another (validated with the
            // configuration).
            let host = upstream
                .rsplit_once(':')
                .map_or(upstream, |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = config.upstream_sni.as_deref().unwrap_or(host);
            resolved = resolved.with_tls(client, tls_client::server_name(name)?);
        }
        Ok(Arc::new(Forward::new(resolved)))
    }
}

/// The forward service: a relay to one upstream.
#[derive(Debug, Clone)]
pub struct Forward {
    upstream: Upstream,
}

impl Forward {
    /// A relay to `upstream`.
    pub fn new(upstream: Upstream) -> Self {
        Forward { upstream }
    }
}

impl Service for Forward {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        let client = session.id();
        let upstream = session.connect(&self.upstream, Box::new(UpstreamSide { client }));
        Box::new(ClientSide {
            upstream,
            target: self.upstream.clone(),
            asked: session.now(),
            connected: false,
        })
    }
}

/// The client's half: its bytes go upstream.
struct ClientSide {
    upstream: SessionId,
    target: Upstream,
    /// When the upstream connection was asked for (its connect time is counted).
    asked: Instant,
    connected: bool,
}

impl SessionHandler for ClientSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.upstream, data);
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        session.finish_to(self.upstream);
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        match event {
            LinkEvent::Connected { .. } => {
                self.connected = true;
                let elapsed = session.now().saturating_duration_since(self.asked);
                self.target.record_connect_time(elapsed);
            }
            LinkEvent::Closed { reason, .. } => {
                if !self.connected
                    || !matches!(reason, CloseReason::PeerClosed | CloseReason::Requested)
                {
                    info!(
                        session = %session.id(), peer = %session.peer(), upstream = self.target.name(),
                        "forward: upstream ended ({reason}); closing client"
                    );
                }
                session.close();
            }
            _ => session.close(),
        }
    }
}

/// The upstream's half: its bytes go back to the client.
struct UpstreamSide {
    client: SessionId,
}

impl SessionHandler for UpstreamSide {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send_to(self.client, data);
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        session.finish_to(self.client);
    }
}
