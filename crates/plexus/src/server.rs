//! The server: builds loops and the acceptor from a validated configuration, binds the
//! listeners, and runs until shut down. This is the library's entry point.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

use crate::acceptor::{Acceptor, BoundListener, Control, SocketOptions, StopRequest};
use crate::admission::Admission;
use crate::builtin::{Auto, Chat, Echo, Http};
use crate::config::{Config, ConfigError, Transport, ValidConfig, ValidListener};
use crate::datagram::DatagramListener;
use crate::dtls::{DtlsContext, DtlsError};
use crate::event_loop::{EventLoop, ExitSignal, LoopHandle, SessionLimits};
use crate::forward::{Forward, ForwardTarget};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::service::{ListenerInfo, Service};
use crate::tls::{TlsContext, TlsError};
use crate::worker::WorkerPool;

/// Why a server could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("listener '{listener}': cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        listener: String,
        /// The address it was to bind.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// TLS certificates could not be loaded or generated.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The DTLS (OpenSSL) context could not be built.
    #[error("{0}")]
    Dtls(#[from] DtlsError),
    /// A runtime resource (poll instance, thread) could not be created.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being created.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
}

impl Error {
    fn runtime(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Runtime { what, source }
    }
}

/// Configures a [`Server`]: services beyond the built-in ones, signal handling.
pub struct ServerBuilder {
    config: Config,
    source: String,
    services: BTreeMap<String, Arc<dyn Service>>,
    /// The built-in http service, which `auto` listeners hand HTTP sessions to.
    http: Arc<Http>,
    handle_signals: bool,
}

/// The name of the protocol-group service, built per listener at bind time.
const AUTO: &str = "auto";

impl ServerBuilder {
    /// Registers a service under `name`, for listeners with `service = "<name>"`.
    /// A name already taken (built-in ones included) is replaced.
    pub fn service(mut self, name: impl Into<String>, service: impl Service) -> Self {
        self.services.insert(name.into(), Arc::new(service));
        self
    }

    /// Whether SIGTERM/SIGINT/SIGQUIT/SIGHUP are handled as events (the CLI turns this on;
    /// embedded servers usually stop through [`ServerHandle`]). Off by default.
    pub fn handle_signals(mut self, enabled: bool) -> Self {
        self.handle_signals = enabled;
        self
    }

    /// Names errors after `source` (a file path) instead of `<config>`.
    pub fn source_name(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Checks the configuration against the registered services without binding anything
    /// (what `plexus serve --check` does).
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        let mut names: Vec<&str> = self.services.keys().map(String::as_str).collect();
        if !self.services.contains_key(AUTO) {
            names.push(AUTO);
        }
        self.config.validate(&self.source, &names)
    }

    /// Validates the configuration, binds every listener, and prepares the threads.
    pub fn build(self) -> Result<Server, Error> {
        let valid = self.validate()?;
        let server = &valid.config.server;
        if let Err(err) = plexus_sys::signal::ignore_sigpipe() {
            tracing::warn!("cannot ignore SIGPIPE: {err}");
        }

        let loop_count = match server.event_loops {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let limits = SessionLimits {
            idle_timeout: server.idle_timeout,
            handshake_timeout: server.handshake_timeout,
            high_watermark: server.outbound_high_watermark,
            low_watermark: server.outbound_low_watermark,
            outbound_limit: server.outbound_limit,
            work_limit: server.worker_session_limit,
        };
        let workers = match server.workers {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // Results of jobs in flight (queued + running) always fit in a loop's channel.
        let completion_capacity = server.worker_queue + workers;
        let mut loops = Vec::with_capacity(loop_count);
        let mut handles = Vec::with_capacity(loop_count);
        for index in 0..loop_count {
            let (event_loop, handle) = EventLoop::new(
                index,
                valid.listeners.len(),
                limits.clone(),
                completion_capacity,
            )
            .map_err(Error::runtime("cannot create an event loop"))?;
            loops.push(event_loop);
            handles.push(handle);
        }
        let sinks = handles.iter().map(LoopHandle::completion_sink).collect();
        let pool = WorkerPool::start(workers, server.worker_queue, sinks)
            .map_err(Error::runtime("cannot start the worker pool"))?;
        for event_loop in &mut loops {
            event_loop.set_peers(handles.clone());
            event_loop.set_pool(pool.submitter());
        }
        let metrics = Arc::new(Metrics {
            loops: handles
                .iter()
                .map(|handle| Arc::clone(&handle.stats))
                .collect(),
            pool_stats: Arc::clone(&pool.stats),
            ..Metrics::default()
        });
        for event_loop in &mut loops {
            event_loop.set_metrics(Arc::clone(&metrics));
        }
        let admission = Arc::new(Admission::new(
            valid.global_acl.clone(),
            server.max_connections,
            server.max_connections_per_ip,
            server.max_handshakes,
            Arc::clone(&metrics),
        ));

        let is_auto =
            |l: &ValidListener| l.config.service == AUTO && !self.services.contains_key(AUTO);
        let uses_tls = valid
            .listeners
            .iter()
            .any(|l| matches!(l.config.transport, Transport::Tls | Transport::Dtls) || is_auto(l));
        let tls = match uses_tls {
            true => Some(Arc::new(TlsContext::new(valid.config.tls.as_ref())?)),
            false => None,
        };
        let mut bound = Vec::with_capacity(valid.listeners.len());
        let mut local_addrs = Vec::with_capacity(valid.listeners.len());
        for (index, listener) in valid.listeners.iter().enumerate() {
            let transport = listener.config.transport;
            if matches!(transport, Transport::Udp | Transport::Dtls) {
                // datagram: one socket per event loop, owned by the loop (not the acceptor).
                let service = Arc::clone(&self.services[&listener.config.service]);
                let dtls = match (&tls, transport) {
                    (Some(tls), Transport::Dtls) => {
                        let psk = valid.config.tls.as_ref().map_or(&[][..], |t| &t.psk[..]);
                        Some(DtlsContext::new(tls, psk, listener.config.mtu)?)
                    }
                    _ => None,
                };
                let shared = DatagramListener {
                    info: Arc::new(ListenerInfo {
                        index,
                        name: listener.config.name.as_str().into(),
                    }),
                    service,
                    acl: listener.acl.clone(),
                    admission: Arc::clone(&admission),
                    dtls,
                    batch: listener.config.datagram_batch,
                };
                let local = bind_datagram(listener, &shared, &mut loops)?;
                local_addrs.push((listener.config.name.clone(), local));
                continue;
            }
            let tls_config = match (&tls, listener.config.transport) {
                (Some(tls), Transport::Tls) => Some(tls.server_config(&listener.config.alpn)?),
                _ => None,
            };
            let service: Arc<dyn Service> = if is_auto(listener) {
                // TLS is detected (and terminated) by the group on plain listeners only.
                let detect_tls = match (&tls, listener.config.transport) {
                    (Some(tls), Transport::Tcp) => Some(tls.server_config(&listener.config.alpn)?),
                    _ => None,
                };
                Arc::new(Auto::new(
                    Arc::clone(&self.http),
                    detect_tls,
                    server.handshake_timeout,
                ))
            } else {
                Arc::clone(&self.services[&listener.config.service])
            };
            let listener = bind(index, listener, service, tls_config)?;
            local_addrs.push((valid.listeners[index].config.name.clone(), listener.local));
            bound.push(listener);
        }
        for (listener, (name, addr)) in valid.listeners.iter().zip(&local_addrs) {
            info!(
                "listening name={name} transport={} addr={addr}",
                listener.config.transport
            );
        }

        let (acceptor, control) = Acceptor::new(
            bound,
            self.handle_signals,
            admission,
            tls,
            server.shutdown_grace,
        )
        .map_err(Error::runtime("cannot create the acceptor"))?;
        Ok(Server {
            acceptor,
            loops,
            handles,
            pool,
            local_addrs,
            control,
            metrics,
        })
    }
}

/// Kernel buffer asked for each datagram socket (the kernel caps it at `net.core.*mem_max`):
/// room for bursts of large datagrams between two turns of the loop.
const DATAGRAM_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds one UDP socket per event loop on the listener's address with `SO_REUSEPORT` (the
/// first resolves port 0; the others join it) and gives each loop its socket.
fn bind_datagram(
    listener: &ValidListener,
    shared: &DatagramListener,
    loops: &mut [EventLoop],
) -> Result<SocketAddr, Error> {
    let config = &listener.config;
    let mut addr = listener.addr;
    let bind_error = |addr, source| Error::Bind {
        listener: config.name.clone(),
        addr,
        source,
    };
    for event_loop in loops.iter_mut() {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(|err| bind_error(addr, err))?;
        socket
            .set_reuse_port(true)
            .map_err(|err| bind_error(addr, err))?;
        if addr.is_ipv6() {
            socket
                .set_only_v6(true)
                .map_err(|err| bind_error(addr, err))?;
        }
        // Best effort: the kernel caps (or refuses) sizes above its limits.
        let _ = socket.set_recv_buffer_size(config.recv_buffer.max(DATAGRAM_SOCKET_BUFFER));
        let _ = socket.set_send_buffer_size(config.send_buffer.max(DATAGRAM_SOCKET_BUFFER));
        socket
            .bind(&addr.into())
            .map_err(|err| bind_error(addr, err))?;
        let socket: std::net::UdpSocket = socket.into();
        addr = socket.local_addr().map_err(|err| bind_error(addr, err))?;
        event_loop
            .add_datagram_socket(socket, shared.clone())
            .map_err(|err| bind_error(addr, err))?;
    }
    Ok(addr)
}

fn bind(
    index: usize,
    listener: &ValidListener,
    service: Arc<dyn Service>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<BoundListener, Error> {
    let config = &listener.config;
    let addr = listener.addr;
    let bind_error = |source| Error::Bind {
        listener: config.name.clone(),
        addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(bind_error)?;
    }
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket
        .listen(config.backlog.min(i32::MAX as u32) as i32)
        .map_err(bind_error)?;
    let std_listener: std::net::TcpListener = socket.into();
    let local = std_listener.local_addr().map_err(bind_error)?;
    let options = SocketOptions {
        nodelay: config.tcp_nodelay,
        recv_buffer: config.recv_buffer,
        send_buffer: config.send_buffer,
        keepalive: config.keepalive,
        linger: config.linger,
    };
    let info = Arc::new(ListenerInfo {
        index,
        name: config.name.as_str().into(),
    });
    Ok(BoundListener {
        socket: TcpListener::from_std(std_listener),
        local,
        info,
        service,
        acl: Arc::new(listener.acl.clone()),
        proxy_trusted: listener.proxy_trusted.clone(),
        options,
        tls,
        forward: listener.upstream.map(|upstream| ForwardTarget {
            upstream,
            splice: config.splice,
        }),
        ready: true,
    })
}

/// A server with its listeners bound, ready to [`run`](Server::run).
pub struct Server {
    acceptor: Acceptor,
    loops: Vec<EventLoop>,
    handles: Vec<LoopHandle>,
    pool: WorkerPool,
    local_addrs: Vec<(String, SocketAddr)>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Starts configuring a server; `echo` and `chat` are registered already.
    pub fn builder(config: Config) -> ServerBuilder {
        let chat = Chat::new(config.chat.max_line_bytes);
        let mut services: BTreeMap<String, Arc<dyn Service>> = BTreeMap::new();
        services.insert("echo".into(), Arc::new(Echo));
        services.insert("chat".into(), Arc::new(chat));
        services.insert("forward".into(), Arc::new(Forward));
        let http = Arc::new(Http::new(&config.http));
        services.insert("http".into(), Arc::clone(&http) as Arc<dyn Service>);
        ServerBuilder {
            config,
            source: "<config>".into(),
            services,
            http,
            handle_signals: false,
        }
    }

    /// The bound address of a listener (port 0 resolved), by name.
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
    }

    /// Every listener's name and bound address, in configuration order.
    pub fn local_addrs(&self) -> &[(String, SocketAddr)] {
        &self.local_addrs
    }

    /// A handle to stop the server or read its metrics from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            control: Arc::clone(&self.control),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// Runs the event loops and the acceptor until the server is shut down (by a signal or a
    /// [`ServerHandle`]) and every loop has finished.
    pub fn run(self) -> Result<(), Error> {
        let Server {
            mut acceptor,
            pool,
            metrics,
            loops,
            handles,
            ..
        } = self;
        let (live_loops, waker) = acceptor.exit_signal(loops.len());
        acceptor.set_loops(handles);
        let mut threads = Vec::with_capacity(loops.len());
        for (index, event_loop) in loops.into_iter().enumerate() {
            let exit = ExitSignal {
                live_loops: Arc::clone(&live_loops),
                waker: Arc::clone(&waker),
            };
            let spawned = thread::Builder::new()
                .name(format!("plexus-loop-{index}"))
                .spawn(move || event_loop.run(exit));
            match spawned {
                Ok(thread) => threads.push(thread),
                // The closure (and its ExitSignal) is dropped: the loop counts itself out,
                // and the acceptor stops the others.
                Err(source) => tracing::error!("cannot start event loop {index}: {source}"),
            }
        }
        let result = acceptor.run().map_err(Error::runtime("acceptor failed"));
        for thread in threads {
            let _ = thread.join();
        }
        drop(metrics);
        // Every submitter lived in a loop, and the loops are gone: the workers finish.
        pool.join();
        info!("stopped");
        result
    }
}

/// Stops a running server or reads its metrics; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ServerHandle {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl ServerHandle {
    /// Graceful stop: stop accepting, let sessions finish within `shutdown_grace`.
    pub fn shutdown(&self) {
        self.control.request(StopRequest::Graceful);
    }

    /// Fast stop: close every session now.
    pub fn stop(&self) {
        self.control.request(StopRequest::Fast);
    }

    /// The server's counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
}
