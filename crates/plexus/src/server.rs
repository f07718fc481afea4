//! The server: builds loops and the acceptor from a validated configuration, binds the
//! listeners, and runs until shut down. This is the library's entry point.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

use crate::accept::{Intake, RefusalLog};
use crate::acceptor::{Acceptor, Control, StopRequest};
use crate::admission::Admission;
use crate::breakdown::ListenerEntry;
use crate::config::{Config, ConfigError, Transport, ValidConfig, ValidListener};
use crate::datagram::DatagramListener;
use crate::datagram_admission::{DatagramCaps, ListenerCap};
use crate::dtls::DtlsContext;
use crate::error::{DescriptorProblem, Error, InheritedError};
use crate::event_loop::{EventLoop, ExitSignal, LoopHandle};
use crate::listen::{bind, listener_service, needs_tls, session_limits};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::registry::{ServiceFactory, ServiceRegistry};
use crate::reload::{ReloadSource, Reloader};
use crate::service::{ListenerInfo, Service};
use crate::tls::TlsContext;
use crate::upgrade::{Handover, UpgradeOptions};
use crate::worker::WorkerPool;
use plexus_sys::pidfile::PidFile;

/// What [`ServerBuilder::after_bind`] runs.
type AfterBindHook = Box<dyn FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>>>;

use crate::registry::ReopenHook;

/// Configures a [`Server`]: services beyond the built-in ones, signal handling.
pub struct ServerBuilder {
    config: Config,
    source: String,
    services: ServiceRegistry,
    handle_signals: bool,
    systemd: bool,
    after_bind: Option<AfterBindHook>,
    reload_source: Option<ReloadSource>,
    /// What SIGUSR2 starts (binary upgrades off without it).
    upgrade: Option<UpgradeOptions>,
    /// The sockets passed by the process this one upgrades.
    handover: Option<Handover>,
    /// The pid file, handed over by an upgrade.
    pid_file: Option<Arc<PidFile>>,
    /// Run on SIGUSR1 (reopen log files).
    reopen: Vec<ReopenHook>,
}

impl ServerBuilder {
    /// Registers a service under `name`, for listeners with `service = "<name>"`: one
    /// instance shared by every such listener. A name already taken is replaced.
    pub fn service(mut self, name: impl Into<String>, service: impl Service) -> Self {
        self.services.insert(name.into(), Arc::new(service));
        self
    }

    /// Registers a service already shared elsewhere (e.g. one a protocol group also hands
    /// sessions to) under `name`. A name already taken is replaced.
    pub fn shared_service(mut self, name: impl Into<String>, service: Arc<dyn Service>) -> Self {
        self.services.insert(name.into(), service);
        self
    }

    /// Registers a factory under `name` that builds one service per listener naming it,
    /// when the listener is bound: for protocol groups and other services that depend on the
    /// listener (see [`ServiceFactory`]). A name already taken is replaced.
    pub fn service_factory(
        mut self,
        name: impl Into<String>,
        factory: impl ServiceFactory,
    ) -> Self {
        self.services.insert_factory(name.into(), Arc::new(factory));
        self
    }

    /// The configuration this server is being built from (services read their sections,
    /// e.g. `[http]`, from it when they are registered).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether a service or factory of this name is registered.
    pub fn has_service(&self, name: &str) -> bool {
        self.services.contains(name)
    }

    /// Whether SIGTERM/SIGINT/SIGQUIT/SIGHUP are handled as events (the CLI turns this on;
    /// embedded servers usually stop through [`ServerHandle`]). Off by default.
    pub fn handle_signals(mut self, enabled: bool) -> Self {
        self.handle_signals = enabled;
        self
    }

    /// Whether to cooperate with systemd when it started the process (the CLI turns this on;
    /// off by default): listeners take the sockets passed by socket activation
    /// (`LISTEN_FDS`, matched by `LISTEN_FDNAMES` to listener names, else by position), and
    /// `NOTIFY_SOCKET` receives `READY=1`, `RELOADING=1`, `STOPPING=1` and, when
    /// `WATCHDOG_USEC` is set, `WATCHDOG=1`. Without those variables it changes nothing.
    pub fn systemd(mut self, enabled: bool) -> Self {
        self.systemd = enabled;
        self
    }

    /// Runs `hook` in [`build`](Self::build) once every listener is bound and before any
    /// thread starts — where a server started as root drops its privileges (ports below 1024
    /// are bound by then) or enters a chroot. An error fails the build with
    /// [`Error::AfterBind`].
    pub fn after_bind(
        mut self,
        hook: impl FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + 'static,
    ) -> Self {
        self.after_bind = Some(Box::new(hook));
        self
    }

    /// Where SIGHUP (with [`handle_signals`](Self::handle_signals)) gets the configuration
    /// to reload: the CLI re-reads its file. Without it, SIGHUP reloads certificate files only.
    /// Settings that can change live are applied, the others are logged as
    /// `not applied: <key>: needs a restart`; an invalid configuration is logged and ignored.
    pub fn reload_from(
        mut self,
        source: impl FnMut() -> Result<Config, ConfigError> + Send + 'static,
    ) -> Self {
        self.reload_source = Some(Box::new(source));
        self
    }

    /// Runs `hook` on SIGUSR1 (with [`handle_signals`](Self::handle_signals)): where a
    /// service reopens its log files after logrotate moved them. It runs on the acceptor
    /// thread, so it must not block (hand the work to the thread owning the file); a panic in
    /// it is caught and logged.
    pub fn on_reopen(mut self, hook: ReopenHook) -> Self {
        self.reopen.push(hook);
        self
    }

    /// Makes SIGUSR2 (with [`handle_signals`](Self::handle_signals)) upgrade the binary:
    /// start `options.program` with every listening socket, wait for it to report ready, then
    /// drain as on SIGTERM (see `docs/ARCHITECTURE.md`, "Binary upgrade").
    pub fn upgrade(mut self, options: UpgradeOptions) -> Self {
        self.upgrade = Some(options);
        self
    }

    /// Takes the listening sockets from the process this one upgrades (instead of binding
    /// them) and reports ready to it once serving.
    pub fn handover(mut self, handover: Handover) -> Self {
        self.handover = Some(handover);
        self
    }

    /// The process's pid file: an upgrade passes it to the new process and rewrites it with
    /// the new pid once that one is ready.
    pub fn pid_file(mut self, pid_file: Arc<PidFile>) -> Self {
        self.pid_file = Some(pid_file);
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
        self.config.validate(&self.source, &self.services.names())
    }

    /// Validates the configuration, binds every listener, and prepares the threads (none is
    /// started before [`Server::run`], except the worker pool's, which starts after the
    /// listeners are bound and the [`after_bind`](Self::after_bind) hook has run).
    pub fn build(mut self) -> Result<Server, Error> {
        let valid = self.validate()?;
        let server = &valid.config.server;
        if let Err(err) = plexus_sys::signal::ignore_sigpipe() {
            tracing::warn!("cannot ignore SIGPIPE: {err}");
        }

        let uses_tls = valid.listeners.iter().any(|l| needs_tls(l, &self.services));
        let tls = match uses_tls {
            true => Some(Arc::new(TlsContext::new(valid.config.tls.as_ref())?)),
            false => None,
        };
        let mut inherited = match self.systemd {
            true => InheritedSockets::take(&valid.listeners)?,
            false => InheritedSockets::default(),
        };
        let loop_count = match server.event_loops {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut bound = Vec::with_capacity(valid.listeners.len());
        let mut addrs = BTreeMap::new();
        // datagram: udp/dtls sockets (one per loop) are bound here with the others (before
        // `after_bind` drops privileges) and handed to the loops once those exist.
        let mut datagram_sockets = Vec::new();
        let mut entries = Vec::new();
        let mut handover = self.handover.take();
        for (index, listener) in valid.listeners.iter().enumerate() {
            if listener.config.transport.is_datagram() {
                let (sockets, local) = bind_datagram(listener, loop_count, handover.as_mut())?;
                addrs.insert(index, local);
                datagram_sockets.push((index, sockets));
                continue;
            }
            let service = listener_service(
                listener,
                &self.services,
                tls.as_ref(),
                server.handshake_timeout,
            )?;
            let tls_config = match (&tls, listener.config.transport) {
                (Some(tls), Transport::Tls) => {
                    Some(tls.server_config(&listener.config.alpn_offered())?)
                }
                _ => None,
            };
            let passed = handover
                .as_mut()
                .and_then(|h| h.take_stream(&listener.config.name));
            let socket = match passed {
                Some(socket) => {
                    check_inherited(&socket, raw_position(&socket), &listener.config.name)?;
                    Some(socket)
                }
                None => inherited.remove(index),
            };
            let config = &listener.config;
            let listener = bind(index, listener, service, tls_config, socket)?;
            entries.push(ListenerEntry {
                info: Arc::clone(&listener.info),
                transport: config.transport.as_str(),
                addr: listener.local,
                service: config.service.clone(),
            });
            addrs.insert(index, listener.local);
            bound.push(listener);
        }
        inherited.warn_unused();
        let takeover = handover.as_mut().and_then(|h| {
            h.warn_unused();
            Some((h.take_channel()?, h.parent()))
        });
        if let Some(hook) = self.after_bind {
            hook().map_err(Error::AfterBind)?;
        }
        let local_addrs = valid
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(index, l)| Some((l.config.name.clone(), *addrs.get(&index)?)))
            .collect::<Vec<_>>();

        let limits = session_limits(server);
        let workers = match server.workers {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // Results of jobs in flight (queued + running) always fit in a loop's channel.
        let completion_capacity = server.worker_queue.saturating_add(workers);
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
            event_loop.set_backend(server.backend);
        }
        let metrics = Arc::new(Metrics {
            loops: handles
                .iter()
                .map(|handle| Arc::clone(&handle.stats))
                .collect(),
            pool_stats: Arc::clone(&pool.stats),
            ..Metrics::default()
        });
        let _ = metrics.facts.config_source.set(self.source.clone());
        for entry in entries {
            metrics.facts.add_listener(entry);
        }
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
        // datagram: the datagram-session caps, shared by every udp/dtls listener and loop.
        let datagram_caps = Arc::new(
            DatagramCaps::new(
                server.datagram_session_cap(
                    valid
                        .listeners
                        .iter()
                        .any(|listener| !listener.config.transport.is_datagram()),
                ),
                server.max_datagram_sessions_per_ip,
                server.max_handshakes.div_ceil(2),
            )
            .split_over_loops(loop_count),
        );
        admission.set_max_handshakes_per_ip(server.handshakes_per_ip());
        let mut datagram_copies = Vec::new();
        for (index, sockets) in datagram_sockets {
            let Some(listener) = valid.listeners.get(index) else {
                continue;
            };
            let dtls = match (&tls, listener.config.transport) {
                (Some(tls), Transport::Dtls) => {
                    let psk = valid.config.tls.as_ref().map_or(&[][..], |t| &t.psk[..]);
                    Some(DtlsContext::new(tls, psk, listener.config.mtu)?)
                }
                _ => None,
            };
            let info = Arc::new(ListenerInfo {
                index,
                name: listener.config.name.as_str().into(),
                stats: Default::default(),
            });
            metrics.facts.add_listener(ListenerEntry {
                info: Arc::clone(&info),
                transport: listener.config.transport.as_str(),
                addr: addrs.get(&index).copied().unwrap_or(listener.addr),
                service: listener.config.service.clone(),
            });
            let shared = DatagramListener {
                info,
                service: listener_service(
                    listener,
                    &self.services,
                    tls.as_ref(),
                    server.handshake_timeout,
                )?,
                acl: listener.acl.clone(),
                admission: Arc::clone(&admission),
                caps: Arc::clone(&datagram_caps),
                listener_cap: Arc::new(ListenerCap::new(listener.config.max_sessions)),
                dtls,
                batch: listener.config.datagram_batch,
                offload: listener.config.udp_offload,
            };
            // Each loop has one socket per listener; sockets passed by an upgrade from a
            // process with more loops are spread over ours (a peer still meets one socket).
            for (ordinal, (socket, relay)) in sockets.into_iter().enumerate() {
                let local = socket.local_addr().ok();
                if self.upgrade.is_some() {
                    let copy = socket
                        .try_clone()
                        .map_err(Error::runtime("cannot keep a datagram socket for upgrades"))?;
                    let name = crate::upgrade::datagram_name(&listener.config.name, ordinal);
                    datagram_copies.push((index, ordinal, name, copy));
                }
                // `loops` has `loop_count` (at least 1) entries.
                let event_loop = ordinal
                    .checked_rem(loop_count)
                    .and_then(|at| loops.get_mut(at));
                event_loop
                    .map_or_else(
                        || Err(io::Error::other("no event loop")),
                        |event_loop| {
                            event_loop.add_datagram_socket(socket, shared.clone(), ordinal, relay)
                        },
                    )
                    .map_err(|source| Error::Bind {
                        listener: listener.config.name.clone(),
                        addr: local.unwrap_or(listener.addr),
                        source,
                    })?;
            }
        }

        // Every loop accepts from every tcp/tls listener (shared sockets, `EPOLLEXCLUSIVE`),
        // admitting as strictly as one acceptor would: one admission, one refusal log.
        let refusals = Arc::new(RefusalLog::new());
        for event_loop in &mut loops {
            event_loop.set_intake(Intake::new(Arc::clone(&admission), Arc::clone(&refusals)));
            for listener in &bound {
                event_loop.listen(listener.clone()).map_err(Error::runtime(
                    "cannot register a listener with an event loop",
                ))?;
            }
        }
        let (acceptor, control) = Acceptor::new(
            bound,
            valid.listeners.len(),
            self.handle_signals,
            admission,
            tls,
            server.shutdown_grace,
        )
        .map_err(Error::runtime("cannot create the acceptor"))?;
        let mut acceptor = acceptor;
        acceptor.set_lameduck(server.drain_delay, Arc::clone(&metrics));
        acceptor.set_reopen_hooks(std::mem::take(&mut self.reopen));
        if let Some(source) = self.reload_source {
            acceptor.set_reloader(Reloader {
                source,
                source_name: self.source.clone(),
                services: self.services.clone(),
                running: valid.clone(),
            });
        }
        // Logged once signals are handled, so whoever waits for these lines may signal us.
        for (listener, (name, addr)) in valid.listeners.iter().zip(&local_addrs) {
            info!(
                "listening name={name} transport={} addr={addr}",
                listener.config.transport
            );
        }

        if self.systemd {
            acceptor.set_systemd(systemd_notifier(), plexus_sys::notify::watchdog_interval());
        }
        acceptor.set_upgrade(self.upgrade, self.pid_file, datagram_copies);
        if let Some((channel, parent)) = takeover {
            acceptor.set_takeover(channel, parent);
        }
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

/// A datagram socket, with its upgrade relay when an upgrading process passed it.
type DatagramSocket = (
    std::net::UdpSocket,
    Option<std::os::unix::net::UnixDatagram>,
);

/// Binds one UDP socket per event loop on the listener's address with `SO_REUSEPORT` (the
/// first resolves port 0; the others join it) — or takes every socket of the listener that
/// an upgrading process passed, binding none: a new member of the reuseport group would change
/// which socket the old process's peers hash to.
fn bind_datagram(
    listener: &ValidListener,
    loops: usize,
    handover: Option<&mut Handover>,
) -> Result<(Vec<DatagramSocket>, SocketAddr), Error> {
    let config = &listener.config;
    let mut addr = listener.addr;
    let bind_error = |addr, source| Error::Bind {
        listener: config.name.clone(),
        addr,
        source,
    };
    if let Some(handover) = handover {
        let mut sockets = Vec::new();
        while let Some(passed) = handover.take_datagram(&config.name, sockets.len()) {
            sockets.push(passed);
        }
        if let Some((first, _)) = sockets.first() {
            let local = first.local_addr().map_err(|err| bind_error(addr, err))?;
            if addr.port() != 0 && local != addr {
                tracing::warn!(
                    "listener '{}': the socket passed by the upgrade is bound to {local}, not                      to the configured {addr}",
                    config.name
                );
            }
            info!(listener = %config.name, sockets = sockets.len(), "using the sockets passed by the upgrading process");
            return Ok((sockets, local));
        }
    }
    let mut sockets = Vec::with_capacity(loops);
    for _ in 0..loops.max(1) {
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
        sockets.push((socket, None));
    }
    Ok((sockets, addr))
}

/// The notifier for `$NOTIFY_SOCKET`; a broken variable is logged, not fatal (the service
/// manager will report the missing readiness itself).
fn systemd_notifier() -> Option<plexus_sys::notify::Notifier> {
    match plexus_sys::notify::Notifier::from_env() {
        Ok(notifier) => notifier,
        Err(err) => {
            tracing::warn!("NOTIFY_SOCKET is set but unusable: {err}; not notifying systemd");
            None
        }
    }
}

/// Listening sockets passed by systemd socket activation, assigned to listeners: by name when
/// `LISTEN_FDNAMES` names a listener, otherwise by position among the listeners.
#[derive(Default)]
struct InheritedSockets {
    /// Per listener index, the socket it adopts.
    assigned: BTreeMap<usize, (Socket, Option<String>)>,
    /// Sockets no listener matched (closed with a warning).
    unused: Vec<(usize, Option<String>)>,
}

impl InheritedSockets {
    fn take(listeners: &[ValidListener]) -> Result<InheritedSockets, Error> {
        let fds = plexus_sys::listen_fds::take().map_err(InheritedError::Environment)?;
        let mut sockets = InheritedSockets::default();
        if fds.is_empty() {
            return Ok(sockets);
        }
        let by_name = fds.iter().any(|fd| {
            fd.name
                .as_deref()
                .is_some_and(|name| listeners.iter().any(|l| l.config.name == name))
        });
        for (position, fd) in fds.into_iter().enumerate() {
            let target = match by_name {
                true => listeners
                    .iter()
                    .position(|l| Some(l.config.name.as_str()) == fd.name.as_deref()),
                false => (position < listeners.len()).then_some(position),
            };
            match target.and_then(|index| Some((index, listeners.get(index)?))) {
                Some((index, listener)) if !sockets.assigned.contains_key(&index) => {
                    let socket = Socket::from(fd.fd);
                    check_inherited(&socket, position, &listener.config.name)?;
                    sockets.assigned.insert(index, (socket, fd.name));
                }
                _ => sockets.unused.push((position, fd.name)),
            }
        }
        Ok(sockets)
    }

    fn remove(&mut self, index: usize) -> Option<Socket> {
        self.assigned.remove(&index).map(|(socket, _)| socket)
    }

    fn warn_unused(&self) {
        for (position, name) in &self.unused {
            tracing::warn!(
                "socket activation: descriptor {} (name {}) matches no listener; closed",
                position.saturating_add(3),
                name.as_deref().unwrap_or("-")
            );
        }
    }
}

/// The position (from descriptor 3) an inherited socket was passed at, for messages.
fn raw_position(socket: &Socket) -> usize {
    use std::os::fd::AsRawFd;
    (socket.as_raw_fd() as usize).saturating_sub(3)
}

/// An inherited descriptor must be a listening TCP socket.
fn check_inherited(socket: &Socket, position: usize, listener: &str) -> Result<(), Error> {
    let problem = |problem: DescriptorProblem| {
        Error::Inherited(InheritedError::Descriptor {
            fd: position.saturating_add(3),
            listener: listener.to_owned(),
            problem,
        })
    };
    match socket.r#type() {
        Ok(Type::STREAM) => {}
        Ok(_) => return Err(problem(DescriptorProblem::NotStream)),
        Err(err) => return Err(problem(DescriptorProblem::NotASocket(err))),
    }
    match socket.local_addr().map(|addr| addr.as_socket()) {
        Ok(Some(_)) => {}
        _ => return Err(problem(DescriptorProblem::NotInet)),
    }
    match socket.is_listener() {
        Ok(true) => Ok(()),
        Ok(false) => Err(problem(DescriptorProblem::NotListening)),
        Err(err) => Err(problem(DescriptorProblem::Uninspectable(err))),
    }
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
    /// Starts configuring a server. No service is registered: register yours with
    /// [`ServerBuilder::service`], or the built-in ones (`echo`, `chat`, `http`, `forward`,
    /// `auto`) with the `plexus-services` crate.
    pub fn builder(config: Config) -> ServerBuilder {
        let services = ServiceRegistry::default();
        ServerBuilder {
            config,
            source: "<config>".into(),
            services,
            handle_signals: false,
            systemd: false,
            after_bind: None,
            reload_source: None,
            upgrade: None,
            handover: None,
            pid_file: None,
            reopen: Vec::new(),
        }
    }

    /// The bound address of a listener (port 0 resolved), by name.
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
    }

    /// Every listener's name and bound address, in configuration order (as built: listeners
    /// added or removed by a later reload are logged, not reflected here).
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
        let loop_count = loops.len();
        let (live_loops, waker) = acceptor.exit_signal(loop_count);
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
        // Every listener is bound and every loop started: tell the service manager — or,
        // when upgrading another process, that process (which then tells the manager).
        if !acceptor.report_ready_to_parent() {
            let listeners = acceptor.listener_count();
            acceptor.notify(&format!(
                "READY=1\nSTATUS=serving on {listeners} listener(s)\nMAINPID={}",
                std::process::id()
            ));
        }
        let mut result = acceptor.run().map_err(Error::runtime("acceptor failed"));
        // A loop that panicked or failed lost its sessions: the process must not exit 0 (a
        // supervisor restarts a process that fails, not one that says it stopped cleanly).
        let started = threads.len();
        let mut dead = loop_count.saturating_sub(started);
        for thread in threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => dead = dead.saturating_add(1),
            }
        }
        if dead > 0 && result.is_ok() {
            tracing::error!("{dead} event loop(s) died; exiting with an error");
            result = Err(Error::LoopDied { dead });
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
