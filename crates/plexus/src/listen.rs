//! Listener setup, shared by the server (at start) and the acceptor (listeners added by a
//! reload): binding or adopting a TCP listener's socket, the options each accepted
//! connection gets, and what a listener's sessions need (service, TLS, relay target, limits).

use std::sync::Arc;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

pub(crate) use crate::accept::{BoundListener, SocketOptions};
use crate::config::{ConfigError, ServerConfig, Transport, ValidListener};
use crate::error::Error;
use crate::event_loop::SessionLimits;
use crate::registry::{ServiceLookupError, ServiceRegistry};
use crate::service::{ListenerInfo, Service};
use crate::tls::TlsContext;

/// Whether a listener needs the TLS context: a tls or dtls listener, or a plain one whose
/// service factory detects and terminates TLS itself.
pub(crate) fn needs_tls(listener: &ValidListener, services: &ServiceRegistry) -> bool {
    matches!(listener.config.transport, Transport::Tls | Transport::Dtls)
        || services.uses_tls(listener)
}

/// The service of one listener: the registered one, or the one its factory builds (given the
/// listener's TLS configuration when the factory detects TLS on a plain listener).
pub(crate) fn listener_service(
    listener: &ValidListener,
    services: &ServiceRegistry,
    tls: Option<&Arc<TlsContext>>,
    handshake_timeout: std::time::Duration,
) -> Result<Arc<dyn Service>, Error> {
    let detect_tls = match tls {
        Some(tls) if services.uses_tls(listener) => {
            Some(tls.server_config(&listener.config.alpn_offered())?)
        }
        _ => None,
    };
    services
        .for_listener(listener, detect_tls, handshake_timeout)
        .map_err(|err| match err {
            ServiceLookupError::Unknown(name) => Error::Config(ConfigError {
                source: String::new(),
                problems: vec![crate::config::Problem {
                    key: "service".into(),
                    message: format!("unknown service '{name}'"),
                }],
            }),
            ServiceLookupError::Factory(source) => Error::Service {
                listener: listener.config.name.clone(),
                source,
            },
        })
}

/// The limits event loops apply to sessions, from `[server]`.
pub(crate) fn session_limits(server: &ServerConfig) -> SessionLimits {
    SessionLimits {
        idle_timeout: server.idle_timeout,
        handshake_timeout: server.handshake_timeout,
        high_watermark: server.outbound_high_watermark,
        low_watermark: server.outbound_low_watermark,
        outbound_limit: server.outbound_limit,
        work_limit: server.worker_session_limit,
    }
}

/// Binds (or adopts, when `inherited`) one listener's socket; `index` is its stable identity.
pub(crate) fn bind(
    index: usize,
    listener: &ValidListener,
    service: Arc<dyn Service>,
    tls: Option<Arc<rustls::ServerConfig>>,
    inherited: Option<Socket>,
) -> Result<BoundListener, Error> {
    let config = &listener.config;
    let addr = listener.addr;
    let bind_error = |source| Error::Bind {
        listener: config.name.clone(),
        addr,
        source,
    };
    let socket = match inherited {
        Some(socket) => {
            socket.set_nonblocking(true).map_err(bind_error)?;
            let local = socket.local_addr().ok().and_then(|a| a.as_socket());
            if local.is_some_and(|local| addr.port() != 0 && local != addr) {
                tracing::warn!(
                    "listener '{}': the inherited socket is bound to {}, not to the configured {addr}",
                    config.name,
                    local.map_or_else(String::new, |l| l.to_string()),
                );
            }
            info!(listener = %config.name, "using the socket passed by the service manager (or the upgrading process)");
            socket
        }
        None => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(bind_error)?;
            socket.set_reuse_address(true).map_err(bind_error)?;
            if config.reuse_port {
                socket.set_reuse_port(true).map_err(bind_error)?;
            }
            if addr.is_ipv6() {
                socket.set_only_v6(true).map_err(bind_error)?;
            }
            socket.set_nonblocking(true).map_err(bind_error)?;
            socket.bind(&addr.into()).map_err(bind_error)?;
            socket
                .listen(config.backlog.min(i32::MAX as u32) as i32)
                .map_err(bind_error)?;
            socket
        }
    };
    let std_listener: std::net::TcpListener = socket.into();
    let local = std_listener.local_addr().map_err(bind_error)?;
    let info = Arc::new(ListenerInfo {
        index,
        name: config.name.as_str().into(),
        stats: Default::default(),
    });
    Ok(BoundListener {
        socket: Arc::new(TcpListener::from_std(std_listener)),
        local,
        info,
        service,
        acl: Arc::new(listener.acl.clone()),
        proxy_trusted: listener.proxy_trusted.clone(),
        options: socket_options(config),
        tls,
        ready: true,
        ring_accept: None,
    })
}

/// The options applied to each connection a listener accepts.
pub(crate) fn socket_options(config: &crate::config::ListenerConfig) -> SocketOptions {
    SocketOptions {
        nodelay: config.tcp_nodelay,
        recv_buffer: config.recv_buffer,
        send_buffer: config.send_buffer,
        keepalive: config.keepalive,
        linger: config.linger,
    }
}
