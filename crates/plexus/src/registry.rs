//! The services a server knows by name: instances shared by every listener that names them,
//! and factories that build one service per listener (protocol groups, which need the
//! listener's TLS configuration and time budget). Used at build time and by reloads that add
//! listeners.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ListenerConfig, Transport, ValidListener};
use crate::service::Service;

/// The error a [`ServiceFactory`] returns: any error, reported with the listener's name.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A hook SIGUSR1 runs (with [`ServerBuilder::handle_signals`](crate::ServerBuilder::handle_signals)),
/// registered with [`ServerBuilder::on_reopen`](crate::ServerBuilder::on_reopen): where a service
/// reopens its log files after logrotate moved them (the http service's access log does). It runs
/// on the acceptor thread, so it must not block: hand the reopen to the thread that owns the
/// file. A panic in it is caught and logged; the other hooks still run.
pub type ReopenHook = Arc<dyn Fn() + Send + Sync>;

/// Builds the service of each listener that names it, when the listener is bound (at start,
/// or when a reload adds it). For services that depend on the listener itself: a protocol
/// group that detects TLS on a plain port needs that listener's TLS configuration, and its
/// detection budget is the server's `handshake_timeout`.
///
/// A closure `Fn(&ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError>` is a factory
/// that needs no TLS configuration.
pub trait ServiceFactory: Send + Sync + 'static {
    /// Whether `listener`, a plain tcp listener of this service, needs the server's TLS
    /// configuration ([`ListenerContext::tls`]): true when the service it builds for that
    /// listener detects and terminates TLS itself (a protocol group with a TLS member). When
    /// some listener's answer is true, the server loads (or generates) certificates as it
    /// does for tls listeners; when none is, no certificate is loaded or generated. The
    /// default is false.
    fn uses_tls(&self, listener: &ListenerConfig) -> bool {
        let _ = listener;
        false
    }

    /// The service for one listener. An error fails [`crate::ServerBuilder::build`] (or the
    /// reload that added the listener) with [`crate::Error::Service`].
    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError>;
}

impl<F> ServiceFactory for F
where
    F: Fn(&ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> + Send + Sync + 'static,
{
    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        self(listener)
    }
}

/// What a [`ServiceFactory`] knows about the listener it builds a service for.
pub struct ListenerContext<'a> {
    pub(crate) config: &'a ListenerConfig,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) handshake_timeout: Duration,
    /// The server's shared services, for factories that compose them (protocol groups).
    pub(crate) services: &'a BTreeMap<String, Arc<dyn Service>>,
}

impl std::fmt::Debug for ListenerContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerContext")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ListenerContext<'_> {
    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The listener's configuration (transport, address, service, ALPN, …).
    pub fn config(&self) -> &ListenerConfig {
        self.config
    }

    /// For a plain tcp listener whose factory [uses TLS](ServiceFactory::uses_tls): the TLS
    /// server configuration (certificates, the listener's ALPN) to hand to
    /// [`crate::Session::start_tls`] when a ClientHello arrives. `None` on other listeners
    /// (a tls listener's sessions are decrypted before any service sees them).
    pub fn tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.as_ref()
    }

    /// The server's `handshake_timeout`: the time budget a detecting protocol group has.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// The shared service registered as `name` (with [`crate::ServerBuilder::service`] or
    /// [`crate::ServerBuilder::shared_service`]), for a factory whose service hands sessions
    /// to others — a protocol group's members and fallback. `None` for unknown names and for
    /// names registered as factories.
    pub fn service(&self, name: &str) -> Option<Arc<dyn Service>> {
        self.services.get(name).cloned()
    }
}

/// Every service a server can name, by name.
#[derive(Clone, Default)]
pub(crate) struct ServiceRegistry {
    services: BTreeMap<String, Arc<dyn Service>>,
    factories: BTreeMap<String, Arc<dyn ServiceFactory>>,
}

impl ServiceRegistry {
    /// Registers a shared service; replaces any service or factory of that name.
    pub(crate) fn insert(&mut self, name: String, service: Arc<dyn Service>) {
        self.factories.remove(&name);
        self.services.insert(name, service);
    }

    /// Registers a per-listener factory; replaces any service or factory of that name.
    pub(crate) fn insert_factory(&mut self, name: String, factory: Arc<dyn ServiceFactory>) {
        self.services.remove(&name);
        self.factories.insert(name, factory);
    }

    /// Whether `name` is registered.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.services.contains_key(name) || self.factories.contains_key(name)
    }

    /// Every registered name, for validating a configuration.
    pub(crate) fn names(&self) -> Vec<&str> {
        self.services
            .keys()
            .chain(self.factories.keys())
            .map(String::as_str)
            .collect()
    }

    /// Whether a plain tcp listener of this service needs the TLS configuration.
    pub(crate) fn uses_tls(&self, listener: &ValidListener) -> bool {
        listener.config.transport == Transport::Tcp
            && self
                .factories
                .get(&listener.config.service)
                .is_some_and(|factory| factory.uses_tls(&listener.config))
    }

    /// The service of one listener: the shared one of its name, or one its factory builds.
    /// `tls` is the listener's TLS configuration when [`Self::uses_tls`] said it needs one.
    pub(crate) fn for_listener(
        &self,
        listener: &ValidListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        handshake_timeout: Duration,
    ) -> Result<Arc<dyn Service>, ServiceLookupError> {
        let name = &listener.config.service;
        if let Some(service) = self.services.get(name) {
            return Ok(Arc::clone(service));
        }
        let Some(factory) = self.factories.get(name) else {
            return Err(ServiceLookupError::Unknown(name.clone()));
        };
        let context = ListenerContext {
            config: &listener.config,
            tls,
            handshake_timeout,
            services: &self.services,
        };
        factory.build(&context).map_err(ServiceLookupError::Factory)
    }
}

/// Why a listener has no service.
#[derive(Debug)]
pub(crate) enum ServiceLookupError {
    /// No service of that name is registered (validation normally catches this first).
    Unknown(String),
    /// The factory failed.
    Factory(BoxError),
}
