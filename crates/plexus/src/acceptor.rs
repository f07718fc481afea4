//! The acceptor: the control plane's thread. It owns the TCP listeners' lifecycle (the event
//! loops accept from them, `event_loop/accept.rs`; a reload adds, changes and removes them
//! with commands to the loops; a binary upgrade passes their sockets on) and turns signals and
//! shutdown requests into commands for the loops.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use plexus_proto::deadline_after;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::admission::Admission;
use crate::config::{Transport, ValidConfig, ValidListener};
use crate::event_loop::{Command, LoopHandle};
use crate::listen::{self, BoundListener};
use crate::metrics::Metrics;
use crate::reload::{self, Reloader};
use crate::tls::TlsContext;

mod upgrade_flow;

const WAKER: Token = Token(usize::MAX);
/// How long a reload waits for room in a loop's command queue to tell it of a listener's change.
const LISTENER_CHANGE_PATIENCE: Duration = Duration::from_secs(2);
const SIGNALS: Token = Token(usize::MAX - 1);
/// The readiness channel of a binary upgrade (either side).
const UPGRADE: Token = Token(usize::MAX - 2);

/// A request to stop, from a signal or a [`crate::ServerHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum StopRequest {
    None = 0,
    Graceful = 1,
    Fast = 2,
}

/// Shared between the acceptor and server handles.
pub(crate) struct Control {
    request: AtomicU8,
    pub(crate) waker: Arc<Waker>,
}

impl Control {
    pub(crate) fn request(&self, stop: StopRequest) {
        self.request.fetch_max(stop as u8, Ordering::AcqRel);
        let _ = self.waker.wake();
    }

    fn take(&self) -> StopRequest {
        match self.request.swap(StopRequest::None as u8, Ordering::AcqRel) {
            1 => StopRequest::Graceful,
            2 => StopRequest::Fast,
            _ => StopRequest::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining,
    Stopping,
}

/// The acceptor thread's state.
pub(crate) struct Acceptor {
    poll: Poll,
    listeners: Vec<BoundListener>,
    signals: Option<Signals>,
    control: Arc<Control>,
    loops: Vec<LoopHandle>,
    admission: Arc<Admission>,
    tls: Option<Arc<TlsContext>>,
    live_loops: Arc<AtomicUsize>,
    started_loops: usize,
    shutdown_grace: Duration,
    phase: Phase,
    /// systemd's notification socket, when started by systemd with `Type=notify`.
    notifier: Option<plexus_sys::notify::Notifier>,
    /// `WATCHDOG=1` interval and when it is next due.
    watchdog: Option<(Duration, Instant)>,
    /// Where SIGHUP reloads the configuration from (certificates only without it).
    reloader: Option<Reloader>,
    /// The index (and mio token) the next listener added by a reload gets; never reused, so
    /// a stale event or session of a removed listener cannot reach a new one.
    next_listener_index: usize,
    /// Lameduck (`drain_delay`): how long SIGTERM keeps accepting with a failing `/healthz`,
    /// where that flag lives, and when the graceful drain starts once it began.
    drain_delay: Duration,
    metrics: Option<Arc<Metrics>>,
    lameduck_until: Option<Instant>,
    /// Binary upgrades (SIGUSR2): what to start, and what is passed besides the listeners.
    upgrade: upgrade_flow::UpgradeState,
    /// The listeners went to a new process (binary upgrade): this drain is not a shutdown of
    /// the service, so `/healthz` keeps answering 200 on the sessions still here.
    handed_over: bool,
    /// What SIGUSR1 runs: services reopening their log files.
    reopen_hooks: Vec<crate::registry::ReopenHook>,
}

impl Acceptor {
    /// `configured` is how many listeners the configuration has (datagram ones too: indexes
    /// are positions in it), so the first one a reload adds gets an index none of them has.
    pub(crate) fn new(
        listeners: Vec<BoundListener>,
        configured: usize,
        handle_signals: bool,
        admission: Arc<Admission>,
        tls: Option<Arc<TlsContext>>,
        shutdown_grace: Duration,
    ) -> io::Result<(Acceptor, Arc<Control>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let signals = if handle_signals {
            let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2])?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)?;
            Some(signals)
        } else {
            None
        };
        let control = Arc::new(Control {
            request: AtomicU8::new(0),
            waker,
        });
        let acceptor = Acceptor {
            poll,
            listeners,
            signals,
            control: Arc::clone(&control),
            loops: Vec::new(),
            admission,
            tls,
            live_loops: Arc::new(AtomicUsize::new(0)),
            started_loops: 0,
            shutdown_grace,
            phase: Phase::Running,
            notifier: None,
            watchdog: None,
            reloader: None,
            next_listener_index: configured,
            drain_delay: Duration::ZERO,
            metrics: None,
            lameduck_until: None,
            upgrade: upgrade_flow::UpgradeState::default(),
            handed_over: false,
            reopen_hooks: Vec::new(),
        };

        Ok((acceptor, control))
    }

    /// The counter loops decrement when they exit, and the waker they use to say so.
    pub(crate) fn exit_signal(&mut self, loops: usize) -> (Arc<AtomicUsize>, Arc<Waker>) {
        self.live_loops.store(loops, Ordering::Release);
        self.started_loops = loops;
        (
            Arc::clone(&self.live_loops),
            Arc::clone(&self.control.waker),
        )
    }

    pub(crate) fn set_loops(&mut self, loops: Vec<LoopHandle>) {
        self.loops = loops;
    }

    /// `[server] drain_delay`, and the counters whose `draining` flag `/healthz` reads.
    pub(crate) fn set_lameduck(&mut self, drain_delay: Duration, metrics: Arc<Metrics>) {
        self.drain_delay = drain_delay;
        self.metrics = Some(metrics);
    }

    /// From now on health checks fail (`Session::server_draining`).
    fn mark_draining(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.draining.store(true, Ordering::Release);
        }
    }

    /// SIGTERM with a `drain_delay`: fail health checks, keep accepting until it is over.
    fn start_lameduck(&mut self, now: Instant) {
        self.mark_draining();
        self.lameduck_until = Some(deadline_after(now, self.drain_delay));
        self.notify("STATUS=lameduck: failing health checks before draining");
        info!(
            delay = %humantime::format_duration(self.drain_delay),
            "SIGTERM received: lameduck: /healthz answers 503 and listeners keep accepting \
             for drain_delay, then graceful shutdown (again for a fast stop)"
        );
    }

    /// Reports lifecycle changes to systemd through `notifier`, and sends `WATCHDOG=1` every
    /// `watchdog` (driven by this thread's poll timeout, so a stuck acceptor stops pinging).
    pub(crate) fn set_systemd(
        &mut self,
        notifier: Option<plexus_sys::notify::Notifier>,
        watchdog: Option<Duration>,
    ) {
        if notifier.is_some() {
            self.watchdog = watchdog.map(|every| (every, deadline_after(Instant::now(), every)));
        }
        self.notifier = notifier;
    }

    /// Sends `state` to systemd, if it is listening; a failure is logged once per call.
    pub(crate) fn notify(&self, state: &str) {
        if let Some(notifier) = &self.notifier {
            if let Err(err) = notifier.notify(state) {
                warn!(
                    "cannot notify systemd ({}): {err}",
                    state.replace('\n', " ")
                );
            }
        }
    }

    /// What SIGUSR1 runs (reopen log files).
    pub(crate) fn set_reopen_hooks(&mut self, hooks: Vec<crate::registry::ReopenHook>) {
        self.reopen_hooks = hooks;
    }

    /// SIGUSR1: every registered hook reopens its files (each hands the work to its own
    /// thread; a panicking hook is logged and the others still run).
    fn reopen_logs(&self) {
        info!(
            "SIGUSR1 received: reopening log files ({} hook(s))",
            self.reopen_hooks.len()
        );
        for hook in &self.reopen_hooks {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook())).is_err() {
                error!("SIGUSR1: a reopen hook panicked");
            }
        }
    }

    /// Makes SIGHUP reload the whole configuration from `reloader`.
    pub(crate) fn set_reloader(&mut self, reloader: Reloader) {
        self.reloader = Some(reloader);
    }

    /// How many listeners are open.
    pub(crate) fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    fn ping_watchdog(&mut self, now: Instant) {
        if let Some((every, due)) = self.watchdog {
            if now >= due {
                self.notify("WATCHDOG=1");
                self.watchdog = Some((every, deadline_after(now, every)));
            }
        }
    }

    /// Runs until every event loop has exited. Fails if a loop died while serving.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut lost_loop = false;
        while self.live_loops.load(Ordering::Acquire) > 0 {
            if self.phase == Phase::Running
                && self.live_loops.load(Ordering::Acquire) < self.started_loops
            {
                error!("an event loop stopped unexpectedly; stopping the server");
                lost_loop = true;
                self.stop_loops(StopRequest::Fast);
            }
            let timeout = self.poll_timeout(Instant::now());
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    error!("acceptor poll failed: {err}; stopping");
                    self.stop_loops(StopRequest::Fast);
                    return Err(err);
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    SIGNALS => self.read_signals(),
                    UPGRADE => self.upgrade_event(),
                    _ => {}
                }
            }
            let request = self.control.take();
            if request != StopRequest::None {
                self.stop_loops(request);
            }
            let now = Instant::now();
            self.upgrade_deadline(now);
            self.ping_watchdog(now);
            if self.phase == Phase::Running && self.lameduck_until.is_some_and(|at| now >= at) {
                info!("drain_delay over");
                self.stop_loops(StopRequest::Graceful);
            }
        }
        // The last loop dying ends the `while` above before the check at its top runs.
        if self.phase == Phase::Running && !lost_loop {
            error!("every event loop stopped unexpectedly; stopping the server");
        }
        if lost_loop || self.phase == Phase::Running {
            return Err(io::Error::other("an event loop stopped unexpectedly"));
        }
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let watchdog = self
            .watchdog
            .map(|(_, due)| due.saturating_duration_since(now));
        let lameduck = self
            .lameduck_until
            .filter(|_| self.phase == Phase::Running)
            .map(|at| at.saturating_duration_since(now));
        let upgrade = self
            .upgrade
            .deadline()
            .map(|at| at.saturating_duration_since(now));
        [watchdog, lameduck, upgrade].into_iter().flatten().min()
    }

    fn read_signals(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let received: Vec<i32> = signals.pending().collect();
        for signal in received {
            match signal {
                SIGTERM | SIGINT => {
                    let name = if signal == SIGTERM {
                        "SIGTERM"
                    } else {
                        "SIGINT"
                    };
                    let lameduck = self.lameduck_until.is_some();
                    if self.phase == Phase::Running
                        && !lameduck
                        && signal == SIGTERM
                        && !self.drain_delay.is_zero()
                    {
                        self.start_lameduck(Instant::now());
                        continue;
                    }
                    let request = if self.phase == Phase::Running && !lameduck {
                        info!("{name} received: graceful shutdown (again for a fast stop)");
                        StopRequest::Graceful
                    } else {
                        info!("{name} received again: fast stop");
                        StopRequest::Fast
                    };
                    self.stop_loops(request);
                }
                SIGQUIT => {
                    info!("SIGQUIT received: fast stop");
                    self.stop_loops(StopRequest::Fast);
                }
                SIGHUP => self.reload(),
                SIGUSR1 => self.reopen_logs(),
                SIGUSR2 => self.start_upgrade(),
                other => debug!(signal = other, "ignoring signal"),
            }
        }
    }

    /// SIGHUP: reload the configuration (or only the certificates, without a reload source).
    fn reload(&mut self) {
        if self.phase != Phase::Running {
            info!("SIGHUP received while stopping: not reloading");
            return;
        }
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            plexus_sys::notify::monotonic_usec()
        ));
        match self.reloader.take() {
            Some(mut reloader) => {
                self.reload_config(&mut reloader);
                self.reloader = Some(reloader);
            }
            None => self.reload_certificates(),
        }
        self.notify("READY=1\nSTATUS=reloaded");
    }

    /// Applies a new configuration: everything that can change live, in an order that can
    /// still back out while nothing has changed (validation, then certificates).
    fn reload_config(&mut self, reloader: &mut Reloader) {
        let new = match reloader.load() {
            Ok(new) => new,
            Err(err) => {
                for line in err.to_string().lines() {
                    error!(
                        "SIGHUP received: reload failed, keeping the running configuration: {line}"
                    );
                }
                let facts = &self.admission.metrics().facts;
                facts.record_reload(
                    false,
                    format!("reload failed, kept the running configuration: {err}"),
                );
                return;
            }
        };
        let plan = reload::plan(&reloader.running, &new);
        if !self.reload_tls(&reloader.running, &new, &reloader.services) {
            let facts = &self.admission.metrics().facts;
            facts.record_reload(
                false,
                "reload failed: certificates could not be loaded; kept the running configuration"
                    .into(),
            );
            return;
        }
        for key in &plan.restart {
            warn!("reload: not applied: {key}: needs a restart");
        }
        for name in &plan.removed {
            if let Some(position) = self.listeners.iter().position(|l| &*l.info.name == name) {
                let listener = self.listeners.remove(position);
                let index = listener.info.index;
                send_to_loops(&self.loops, name, || Command::Unlisten(index));
                self.admission.metrics().facts.remove_listener(name);
                info!(
                    "reload: listener '{name}' removed (addr {}); its sessions stay until they end",
                    listener.local
                );
            }
        }
        for listener in plan
            .kept
            .iter()
            .filter_map(|&index| new.listeners.get(index))
        {
            self.update_listener(listener);
            let old_upstream = reloader
                .running
                .listeners
                .iter()
                .find(|old| old.config.name == listener.config.name)
                .map(|old| upstream_keys(&old.config));
            if old_upstream.is_some_and(|old| old != upstream_keys(&listener.config)) {
                self.rebuild_service(listener, reloader, new.config.server.handshake_timeout);
            }
        }
        let mut not_bound = Vec::new();
        for listener in plan
            .added
            .iter()
            .filter_map(|&index| new.listeners.get(index))
        {
            let handshake_timeout = new.config.server.handshake_timeout;
            if let Err(err) = self.add_listener(listener, reloader, handshake_timeout) {
                error!(
                    "reload: listener '{}' not added: {err}",
                    listener.config.name
                );
                not_bound.push(listener.config.name.clone());
            }
        }
        let server = &new.config.server;
        self.admission.update(
            new.global_acl.clone(),
            server.max_connections,
            server.max_connections_per_ip,
            server.max_handshakes,
        );
        self.admission
            .set_max_handshakes_per_ip(server.handshakes_per_ip());
        let limits = listen::session_limits(server);
        for (index, handle) in self.loops.iter().enumerate() {
            if handle.send(Command::SetLimits(limits.clone())).is_err() {
                warn!(
                    event_loop = index,
                    "reload: event loop did not take the new limits (queue full)"
                );
            }
        }
        self.shutdown_grace = server.shutdown_grace;
        self.drain_delay = server.drain_delay;
        self.upgrade.set_timeout(server.upgrade_timeout);
        reloader.running = reload::in_effect(&reloader.running, &new, &not_bound);
        let summary = format!(
            "reload done ({} listener(s): {} added, {} removed; {} setting(s) need a restart)",
            self.listeners.len(),
            plan.added.len().saturating_sub(not_bound.len()),
            plan.removed.len(),
            plan.restart.len()
        );
        info!("SIGHUP received: {summary}");
        let ok = not_bound.is_empty();
        self.admission.metrics().facts.record_reload(ok, summary);
    }

    /// Reloads certificates from the new `[tls]` table (creating the TLS context if the first
    /// tls listener arrives). False, with the reason logged, if the reload must stop here.
    fn reload_tls(
        &mut self,
        running: &ValidConfig,
        new: &ValidConfig,
        services: &crate::registry::ServiceRegistry,
    ) -> bool {
        let needs_tls = new.listeners.iter().any(|l| listen::needs_tls(l, services));
        match &self.tls {
            Some(tls) if tls.has_files() || running.config.tls != new.config.tls => {
                match tls.reload_from(new.config.tls.as_ref()) {
                    Ok(count) => info!("reload: {count} certificate(s) loaded"),
                    Err(err) => {
                        error!(
                            "SIGHUP received: reload failed, keeping the previous certificates and the running configuration: {err}"
                        );
                        return false;
                    }
                }
            }
            Some(_) => {}
            None if needs_tls => match TlsContext::new(new.config.tls.as_ref()) {
                Ok(tls) => self.tls = Some(Arc::new(tls)),
                Err(err) => {
                    error!(
                        "SIGHUP received: reload failed, keeping the running configuration: tls: {err}"
                    );
                    return false;
                }
            },
            None => {}
        }
        true
    }

    /// A kept listener takes its new ACL, socket options, ALPN and upstream.
    fn update_listener(&mut self, new: &ValidListener) {
        let tls = match self.tls_config_for(new) {
            Ok(tls) => tls,
            Err(err) => {
                error!(
                    "reload: listener '{}': tls: {err}; keeping its previous settings",
                    new.config.name
                );
                return;
            }
        };
        let Some(listener) = self
            .listeners
            .iter_mut()
            .find(|l| *l.info.name == new.config.name)
        else {
            return;
        };
        listener.acl = Arc::new(new.acl.clone());
        listener.proxy_trusted = new.proxy_trusted.clone();
        listener.options = listen::socket_options(&new.config);
        if listener.tls.is_some() {
            listener.tls = tls;
        }
        send_listener(&self.loops, listener);
    }

    /// A kept listener whose `upstream` (or its TLS keys) changed gets its service built again (forward
    /// resolves its upstream when built): new connections go to the new upstream.
    fn rebuild_service(&mut self, new: &ValidListener, reloader: &Reloader, timeout: Duration) {
        let service = listen::listener_service(new, &reloader.services, self.tls.as_ref(), timeout);
        let Some(listener) = self
            .listeners
            .iter_mut()
            .find(|l| *l.info.name == new.config.name)
        else {
            return;
        };
        match service {
            Ok(service) => {
                listener.service = service;
                send_listener(&self.loops, listener);
            }
            Err(err) => error!(
                "reload: listener '{}': {err}; keeping its previous service",
                new.config.name
            ),
        }
    }

    /// Binds a listener added by a reload and starts accepting on it.
    fn add_listener(
        &mut self,
        new: &ValidListener,
        reloader: &Reloader,
        handshake_timeout: Duration,
    ) -> Result<(), crate::Error> {
        let service = listen::listener_service(
            new,
            &reloader.services,
            self.tls.as_ref(),
            handshake_timeout,
        )?;
        let tls = self.tls_config_for(new)?;
        let index = self.next_listener_index;
        let listener = listen::bind(index, new, service, tls, None)?;
        send_listener(&self.loops, &listener);
        self.next_listener_index = self.next_listener_index.saturating_add(1);
        self.admission
            .metrics()
            .facts
            .add_listener(crate::breakdown::ListenerEntry {
                info: Arc::clone(&listener.info),
                transport: new.config.transport.as_str(),
                addr: listener.local,
                service: new.config.service.clone(),
            });
        info!(
            "listening name={} transport={} addr={} (added by reload)",
            new.config.name, new.config.transport, listener.local
        );
        self.listeners.push(listener);
        Ok(())
    }

    /// The rustls configuration of a tls listener, `None` for others.
    fn tls_config_for(
        &self,
        listener: &ValidListener,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
        match (&self.tls, listener.config.transport) {
            (Some(tls), Transport::Tls) => {
                tls.server_config(&listener.config.alpn_offered()).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn reload_certificates(&self) {
        match &self.tls {
            Some(tls) if tls.has_files() => match tls.reload() {
                Ok(count) => info!("SIGHUP received: reload done, {count} certificate(s) loaded"),
                Err(err) => error!(
                    "SIGHUP received: reload failed, keeping the previous certificates: {err}"
                ),
            },
            _ => info!(
                "SIGHUP received: reload requested; nothing to reload (no certificate files; \
                 other settings reload in later versions)"
            ),
        }
    }

    fn stop_loops(&mut self, request: StopRequest) {
        match request {
            StopRequest::None => {}
            StopRequest::Graceful if self.phase == Phase::Running => {
                if !self.handed_over {
                    self.mark_draining();
                }
                // After an upgrade the notifier is gone: the new process is the main one.
                self.notify("STOPPING=1\nSTATUS=draining sessions");
                self.phase = Phase::Draining;
                // Each loop takes what waits in the listeners' queues (connections the
                // kernel completed would be reset when the socket closes, after their client
                // sent its request) and drains them like every other session.
                self.close_listeners();
                let deadline = deadline_after(Instant::now(), self.shutdown_grace);
                info!(
                    grace = %humantime::format_duration(self.shutdown_grace),
                    "stopped accepting; draining sessions"
                );
                self.broadcast_command(|| Command::Drain { deadline });
            }
            StopRequest::Graceful => {}
            StopRequest::Fast => {
                if self.phase != Phase::Stopping {
                    self.mark_draining();
                    if self.phase == Phase::Running {
                        self.notify("STOPPING=1\nSTATUS=stopping");
                    }
                    self.phase = Phase::Stopping;
                    self.close_listeners();
                    self.broadcast_command(|| Command::Stop);
                }
            }
        }
    }

    fn broadcast_command(&self, command: impl Fn() -> Command) {
        for (index, handle) in self.loops.iter().enumerate() {
            if handle.send(command()).is_err() {
                warn!(
                    event_loop = index,
                    "event loop did not take the shutdown command (queue full or gone)"
                );
            }
        }
    }

    /// The listeners go: each loop lets its share go when it drains or stops (a drain first
    /// takes what waits in their queues).
    fn close_listeners(&mut self) {
        self.listeners.clear();
    }
}

/// Tells every loop to accept on `listener` (a new one, or new settings of a kept one).
/// Free of the acceptor, so that a listener of its table can be sent as it is.
fn send_listener(loops: &[LoopHandle], listener: &BoundListener) {
    send_to_loops(loops, &listener.info.name, || {
        Command::Listen(Box::new(listener.clone()))
    });
}

/// Sends a listener's change to every loop, waiting up to [`LISTENER_CHANGE_PATIENCE`] for
/// room in a loop's command queue: a loop that missed it would keep the old settings, or go on
/// accepting on a removed listener, until the next reload.
fn send_to_loops(loops: &[LoopHandle], listener: &str, command: impl Fn() -> Command) {
    for (index, handle) in loops.iter().enumerate() {
        if handle
            .send_within(command(), LISTENER_CHANGE_PATIENCE)
            .is_err()
        {
            warn!(
                event_loop = index,
                listener,
                "reload: event loop did not take the listener's change (queue full for {}, or \
                 the loop is gone); it keeps the old one until the next reload",
                humantime::format_duration(LISTENER_CHANGE_PATIENCE)
            );
        }
    }
}

/// The keys a forward listener's service is built from.
fn upstream_keys(config: &crate::config::ListenerConfig) -> crate::config::UpstreamKeys<'_> {
    config.upstream_keys()
}
