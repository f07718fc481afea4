//! The event loop: one thread, one mio `Poll`, exclusive owner of its sessions.
//!
//! Sockets are registered edge-triggered once and never re-registered: the loop remembers
//! readiness in flags (`readable`, `write_blocked`) instead. Each turn it reads at most
//! `MAX_READS_PER_TURN` times per session (fairness: a fast sender cannot starve the others;
//! unfinished sessions go on a ready list served without blocking), hands the bytes to the
//! session's handler, and flushes each touched session once with `writev`. A session whose
//! outbound queue passes the high watermark is not read until it drains below the low one.
//! Other threads talk to a loop only through its [`LoopHandle`] (channel + `mio::Waker`).
//! Every loop accepts from the TCP listeners itself (`accept.rs`): a connection becomes a
//! session on the loop that accepted it.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::{Events, Interest, Poll, Token, Waker};
use plexus_proto::{deadline_after, TimerWheel};
use tracing::{debug, error, info};

use plexus_sys::uring::{self, Ring, RingConfig, RingError};

use crate::accept::{BoundListener, NewSession, TlsStart};
use crate::admission::RefusalReason;
use crate::broadcast::{self, BroadcastTarget, InFlight, NotSent, Outbox};
use crate::config::{Backend, READ_CHUNK};
use crate::connection::proxy_header::{ProxyDone, ProxyFailure, ProxyPreamble};
use crate::connection::stream::{SessionStream, UringStream};
use crate::connection::tls::{TlsEvent, TlsFailure, TlsTransport, TLS_PLAINTEXT_CHUNK};
// datagram: udp/dtls sockets and sessions of this loop.
use crate::datagram::{self, DatagramEndpoint, DatagramListener, LoopParts};
use crate::log_throttle::LogThrottle;
use crate::loop_local::LoopLocals;
pub(crate) use crate::loop_timer::{TimerEntry, TimerKind};
use crate::metrics::{LoopStats, Metrics};
use crate::service::ProxyWait;
use crate::service::{Broadcast, CloseReason, SessionId, SessionInfo};
use crate::service::{TimerRequest, TlsUpgrade};
pub(crate) use crate::session::SessionLimits;
use crate::session::{CallbackContext, SessionTable, TcpSession, TlsState};
use crate::worker::{Completion, CompletionSink, Origin, PoolWaiters, Submitter, Task};

const WAKER: Token = Token(usize::MAX);
/// The io_uring ring's watch of the loop's epoll descriptor.
const EPOLL_WATCH: u64 = 0;
/// Capacity of one `Poll::poll`: a full batch means more may be waiting.
const EVENTS: usize = 1024;
/// The operator's switch that turns io_uring off (the loops then serve on epoll).
pub(crate) const IO_URING_SWITCH: &str = "PLEXUS_IO_URING";
/// The backend's startup line is logged once per process, not once per loop.
static RING_LOG: std::sync::Once = std::sync::Once::new();
/// What io_uring covers, logged once at startup.
const IO_URING_COVERS: &str = "io_uring: accepts (multishot) and tcp/tls sessions of tcp/tls \
    listeners, udp/dtls listener sockets; upstream connections (tcp and udp) on epoll; spliced \
    pairs move to epoll";
/// io_uring: a turn that has served sessions for this long submits what it queued (their
/// sends) before serving the next ones, instead of at its end. The ring batches a turn's sends
/// into its next wait; a turn of expensive steps (16 TLS handshakes, ~200 µs each) would hold
/// the first reply back for the whole batch while the peers idle — one submit per this much
/// work keeps both sides busy (and costs at most one `io_uring_enter` per this much).
const RING_SUBMIT_AFTER: Duration = Duration::from_micros(200);
/// Reads per session per turn before the loop moves on to other sessions.
const MAX_READS_PER_TURN: usize = 16;
/// Commands taken from the channel per turn, so a broadcast storm cannot starve socket I/O.
const MAX_COMMANDS_PER_TURN: usize = 4096;
/// Capacity of each loop's command channel.
pub(crate) const COMMAND_QUEUE: usize = 65_536;
// Broadcasts in flight to a loop never take more than half of its command channel.
const _: () = assert!(broadcast::IN_FLIGHT_ENTRIES <= COMMAND_QUEUE / 2);
/// During a graceful drain, a session with nothing queued and no traffic for this long is done.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(1);
const TIMER_TICK: Duration = Duration::from_millis(10);
const TIMER_SLOTS: usize = 4096;
/// A session with more blocking jobs than this waiting is not read until they drain…
const WORK_HIGH_WATERMARK: usize = 64;
/// …to this many.
const WORK_LOW_WATERMARK: usize = 16;

/// Work handed to a loop by another thread.
pub(crate) enum Command {
    /// Take ownership of a connection another loop accepted (it had clearly more sessions;
    /// `accept.rs`).
    Adopt(Box<NewSession>),
    /// Accept on this listener from now on, or (same index) take its new settings: a reload.
    Listen(Box<BoundListener>),
    /// Stop accepting on the listener of this index (a reload removed it).
    Unlisten(usize),
    /// Deliver a broadcast from a session on another loop to this loop's members.
    Broadcast(Broadcast),
    /// Stop taking new sessions; finish the current ones, at the latest by `deadline`.
    Drain { deadline: Instant },
    /// Close everything now and exit.
    Stop,
    /// New limits from a reload: idle timeout and watermarks apply from the next check, the
    /// rest to sessions opened from now on.
    SetLimits(SessionLimits),
    /// Upgrade, old process: the new one reads the datagram sockets from now on; keep the
    /// datagram sessions, forwarded over these relays (listener index, socket ordinal, relay).
    /// `go` is dropped once done (the last drop tells the new process).
    ReleaseDatagrams {
        relays: Vec<(usize, usize, std::os::unix::net::UnixDatagram)>,
        go: Arc<crate::upgrade::GoSignal>,
    },
    /// Upgrade, new process: the old one has handed over; read the datagram sockets.
    ResumeDatagrams,
    /// Open a client connection that no session asked for (a [`crate::client`] runtime's):
    /// its handler hears `Connected` itself, and [`Command::Deliver`] reaches it by id.
    Connect(Box<crate::service::ConnectRequest>),
    /// Run a closure from another thread on such a connection (dropped if it ended).
    Deliver(SessionId, links::Delivery),
}

/// How other threads reach a loop.
#[derive(Clone)]
pub(crate) struct LoopHandle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    completions: Sender<Completion>,
    pub(crate) stats: Arc<LoopStats>,
    /// Broadcast bytes sent to this loop and not yet delivered (bounded).
    broadcasts_in_flight: Arc<InFlight>,
}

impl BroadcastTarget for LoopHandle {
    fn try_broadcast(&self, broadcast: Broadcast) -> Result<(), NotSent> {
        let cost = broadcast::cost(&broadcast);
        if !self.broadcasts_in_flight.charge(cost) {
            return Err(NotSent::Full(broadcast));
        }
        match self.commands.try_send(Command::Broadcast(broadcast)) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(err) => {
                self.broadcasts_in_flight.release(cost);
                match err {
                    TrySendError::Full(Command::Broadcast(broadcast)) => {
                        Err(NotSent::Full(broadcast))
                    }
                    _ => Err(NotSent::Gone),
                }
            }
        }
    }
}

impl LoopHandle {
    /// How worker threads return results to this loop.
    pub(crate) fn completion_sink(&self) -> CompletionSink {
        CompletionSink {
            sender: self.completions.clone(),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Queues a command and wakes the loop. Fails when the queue is full or the loop is gone.
    pub(crate) fn send(&self, command: Command) -> Result<(), Command> {
        match self.commands.try_send(command) {
            Ok(()) => {
                // A failed wake means the loop is gone, which the next send reports.
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(command) | TrySendError::Disconnected(command)) => Err(command),
        }
    }

    /// Like [`LoopHandle::send`], but waits up to `patience` while the queue is full (never
    /// call it on a loop thread): a loop takes its commands every turn, so a full queue is
    /// a burst, not a state. Fails when the queue stayed full that long or the loop is gone.
    pub(crate) fn send_within(&self, command: Command, patience: Duration) -> Result<(), Command> {
        match self.commands.send_timeout(command, patience) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(
                crossbeam_channel::SendTimeoutError::Timeout(command)
                | crossbeam_channel::SendTimeoutError::Disconnected(command),
            ) => Err(command),
        }
    }

    /// Like [`LoopHandle::send`], but waits while the queue is full (never call it on a loop
    /// thread). Fails only when the loop is gone.
    pub(crate) fn send_waiting(&self, command: Command) -> Result<(), Command> {
        match self.commands.send(command) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(crossbeam_channel::SendError(command)) => Err(command),
        }
    }
}

/// Tells the controlling thread that a loop has exited, when dropped.
pub(crate) struct ExitSignal {
    pub(crate) live_loops: Arc<AtomicUsize>,
    pub(crate) waker: Arc<Waker>,
}

impl Drop for ExitSignal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!("event loop thread panicked; its sessions are lost");
        }
        self.live_loops.fetch_sub(1, Ordering::AcqRel);
        let _ = self.waker.wake();
    }
}

/// One event-loop thread's state.
pub(crate) struct EventLoop {
    index: usize,
    /// The TCP listeners this loop accepts on. Declared before `poll`: fields drop in order,
    /// and a listener leaves the epoll instance while it is still open.
    listening: accept::LoopListeners,
    poll: Poll,
    commands: Receiver<Command>,
    completions: Receiver<Completion>,
    /// The worker pool's queue (absent only before the server wires it).
    pool: Option<Submitter>,
    /// Sessions whose next job found the pool's queue full (retried on a timer too).
    waiting_for_pool: PoolWaiters,
    sessions: SessionTable,
    timers: TimerWheel<TimerEntry>,
    read_buf: Box<[u8]>,
    /// Where TLS sessions' decrypted bytes land (the ciphertext is in `read_buf`).
    plain_buf: Box<[u8]>,
    /// Sessions that still have unread input (read budget ran out, or reading resumed).
    ready: Vec<usize>,
    /// Sessions with new outbound bytes or a pending close, flushed at the end of the turn.
    flush_list: Vec<usize>,
    broadcasts: Vec<Broadcast>,
    /// Broadcasts waiting for room on another loop, and the senders paused for them.
    outbox: Outbox,
    /// This loop's in-flight budget for broadcasts from other loops (released on delivery).
    broadcasts_in_flight: Arc<InFlight>,
    peers: Vec<LoopHandle>,
    limits: SessionLimits,
    idle_limit: Duration,
    stats: Arc<LoopStats>,
    /// The server's counters, for services that report them (`Session::server_metrics`).
    metrics: Option<Arc<Metrics>>,
    tls_failures: LogThrottle,
    proxy_failures: LogThrottle,
    /// `splice_with` that found no descriptor for its pipes.
    pipe_failures: LogThrottle,
    /// Throttles the warning for an upstream socket that found no descriptor left.
    descriptor_shortages: LogThrottle,
    drain_deadline: Option<Instant>,
    stopping: bool,
    // datagram: this loop's udp/dtls sockets and their sessions.
    datagram: DatagramEndpoint,
    /// Services' per-loop state ([`crate::LoopLocal`]).
    locals: LoopLocals,
    /// Sessions opened by [`Command::Connect`], by id: where [`Command::Deliver`] goes.
    clients: std::collections::HashMap<SessionId, usize>,
    /// The io_uring ring, when `backend = "io_uring"` and it could be set up (on the loop's
    /// thread: the ring is single-issuer).
    ring: Option<Ring>,
    /// The last `Poll::poll` filled its batch: poll again without waiting for the ring.
    mio_backlog: bool,
    /// io_uring sessions with completions in this batch, served after it.
    ring_touched: Vec<usize>,
    /// io_uring: when what the loop queued on the ring was last submitted (see
    /// [`RING_SUBMIT_AFTER`]).
    ring_submitted: Instant,
}

impl EventLoop {
    /// Creates a loop and the handle other threads use to reach it.
    pub(crate) fn new(
        index: usize,
        listeners: usize,
        limits: SessionLimits,
        completion_capacity: usize,
    ) -> io::Result<(EventLoop, LoopHandle)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (sender, receiver) = crossbeam_channel::bounded(COMMAND_QUEUE);
        let stats = Arc::new(LoopStats::for_loop(index));
        let (completion_sender, completion_receiver) =
            crossbeam_channel::bounded(completion_capacity.max(1));
        let broadcasts_in_flight = Arc::new(InFlight::default());
        let handle = LoopHandle {
            commands: sender,
            waker,
            completions: completion_sender,
            stats: Arc::clone(&stats),
            broadcasts_in_flight: Arc::clone(&broadcasts_in_flight),
        };
        let now = Instant::now();
        let event_loop = EventLoop {
            index,
            listening: accept::LoopListeners::default(),
            poll,
            commands: receiver,
            completions: completion_receiver,
            pool: None,
            waiting_for_pool: PoolWaiters::default(),
            sessions: SessionTable::new(listeners),
            timers: TimerWheel::new(TIMER_TICK, TIMER_SLOTS, now),
            read_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            plain_buf: vec![0; TLS_PLAINTEXT_CHUNK].into_boxed_slice(),
            ready: Vec::new(),
            flush_list: Vec::new(),
            broadcasts: Vec::new(),
            outbox: Outbox::default(),
            broadcasts_in_flight,
            peers: Vec::new(),
            idle_limit: limits.idle_timeout,
            // datagram:
            datagram: DatagramEndpoint::new(limits.clone(), Arc::clone(&stats)),
            locals: LoopLocals::default(),
            clients: std::collections::HashMap::new(),
            limits,
            stats,
            metrics: None,
            tls_failures: LogThrottle::new(),
            proxy_failures: LogThrottle::new(),
            pipe_failures: LogThrottle::new(),
            descriptor_shortages: LogThrottle::new(),
            drain_deadline: None,
            stopping: false,
            ring: None,
            mio_backlog: false,
            ring_touched: Vec::new(),
            ring_submitted: Instant::now(),
        };
        Ok((event_loop, handle))
    }

    // datagram: registration of a udp/dtls socket, before the loop's thread starts.
    /// Gives the loop its socket of a udp/dtls listener.
    pub(crate) fn add_datagram_socket(
        &mut self,
        socket: std::net::UdpSocket,
        listener: DatagramListener,
        ordinal: usize,
        relay: Option<std::os::unix::net::UnixDatagram>,
    ) -> io::Result<()> {
        self.datagram
            .add_socket(self.poll.registry(), socket, listener, ordinal, relay)
    }

    /// Gives the loop the server's counters (read by services through their session).
    pub(crate) fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Sets the backend its stream sessions use. For io_uring the ring (and its receive
    /// buffers) is set up now, before the server says it listens; when it cannot be, the
    /// reason is logged once per process and the loop serves on epoll.
    pub(crate) fn set_backend(&mut self, backend: Backend) {
        self.ring = None;
        if backend != Backend::IoUring {
            return;
        }
        let ring = match std::env::var(IO_URING_SWITCH).as_deref() {
            Ok("off") => Err(RingError::Disabled("PLEXUS_IO_URING=off")),
            _ => Ring::new(RingConfig::default()),
        };
        match ring {
            Ok(ring) => {
                self.ring = Some(ring);
                self.listening.set_on_ring(true);
                RING_LOG.call_once(|| info!("{IO_URING_COVERS}"));
            }
            Err(err) => ring_unavailable(&err),
        }
    }

    /// Gives the loop the worker pool's queue.
    pub(crate) fn set_pool(&mut self, pool: Submitter) {
        self.pool = Some(pool);
    }

    /// Gives the loop the handles of every loop (itself included) for broadcasts.
    pub(crate) fn set_peers(&mut self, peers: Vec<LoopHandle>) {
        self.peers = peers;
    }

    /// Runs until drained or stopped, then signals `exit` (also when unwinding from a panic,
    /// so the acceptor never waits for a loop that is gone). An error (or a panic) means the
    /// loop died: [`Server::run`](crate::Server::run) fails, so the process exits 1.
    pub(crate) fn run(mut self, exit: ExitSignal) -> io::Result<()> {
        let _exit = exit;
        self.start_ring();
        let result = self.turns();
        if let Err(err) = &result {
            error!(event_loop = self.index, "event loop failed: {err}");
        }
        self.stop_listening(Instant::now(), false);
        self.close_all(CloseReason::ShutdownForced);
        result
    }

    /// Enables the io_uring ring on the loop's own thread (its single issuer) and watches the
    /// epoll descriptor with it; if that fails, says why once and serves on epoll.
    fn start_ring(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        match ring.enable() {
            Ok(()) => {
                ring.watch(&self.poll, EPOLL_WATCH);
                // Whatever is ready before the watch was armed.
                self.mio_backlog = true;
            }
            Err(err) => {
                self.ring = None;
                ring_unavailable(&RingError::Setup(err));
                self.listeners_to_epoll();
            }
        }
    }

    fn turns(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.poll_timeout();
            let (now, woken) = match self.ring.as_mut() {
                Some(ring) => {
                    // datagram: udp/dtls sends and receive arming, submitted by this wait.
                    self.datagram.sync_ring(ring);
                    self.listening.arm_ring_accepts(ring);
                    match self.stats.waiting(|| ring.submit_and_wait(timeout)) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => return Err(err),
                    }
                    let now = Instant::now();
                    // The wait submitted everything queued.
                    self.ring_submitted = now;
                    let epoll_ready = self.ring_completions(now);
                    let mut woken = false;
                    if epoll_ready || self.mio_backlog {
                        match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                            Ok(()) => {}
                            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                            Err(err) => return Err(err),
                        }
                        self.mio_backlog = events.iter().count() >= EVENTS;
                        woken = self.mio_events(&events, now);
                    }
                    self.serve_ring_touched(now);
                    (now, woken)
                }
                None => {
                    match self.stats.waiting(|| self.poll.poll(&mut events, timeout)) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => return Err(err),
                    }
                    let now = Instant::now();
                    (now, self.mio_events(&events, now))
                }
            };
            if woken {
                self.run_commands(now);
                self.take_completions(now);
            }
            self.accept_turn(now);
            self.retry_pool(now, false);
            for key in std::mem::take(&mut self.ready) {
                self.serve(key, now);
                self.submit_if_due();
            }
            // datagram: sockets with datagrams left unread, then every queued reply.
            let mut parts = LoopParts {
                now,
                locals: &mut self.locals,
                timers: &mut self.timers,
                broadcasts: &mut self.broadcasts,
                metrics: self.metrics.as_deref(),
            };
            self.datagram.serve_ready(now, &mut parts);
            // Broadcasts of datagram sessions, and those waiting for another loop's room.
            self.publish_broadcasts(None);
            self.retry_broadcasts();
            self.datagram.flush_all();
            self.flush_listed();
            self.expire_timers(now);
            if self.stopping {
                return Ok(());
            }
            if let Some(deadline) = self.drain_deadline {
                // datagram: sessions kept by an upgrade's drain count too.
                if self.sessions.is_empty() && self.datagram.session_count() == 0 {
                    return Ok(());
                }
                if now >= deadline {
                    info!(
                        event_loop = self.index,
                        sessions = self.sessions.len(),
                        "shutdown_grace ran out; closing the remaining sessions"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Handles a batch of mio readiness events; `true` if the waker was among them.
    fn mio_events(&mut self, events: &Events, now: Instant) -> bool {
        let mut woken = false;
        for event in events.iter() {
            if event.token() == WAKER {
                woken = true;
                continue;
            }
            if let Some(index) = accept::token_listener(event.token()) {
                self.listener_ready(index);
                continue;
            }
            // datagram: a udp/dtls socket's readiness.
            if let Some(index) = datagram::token_socket(event.token()) {
                let mut parts = LoopParts {
                    now,
                    locals: &mut self.locals,
                    timers: &mut self.timers,
                    broadcasts: &mut self.broadcasts,
                    metrics: self.metrics.as_deref(),
                };
                let readable = event.is_readable() || event.is_error();
                let writable = event.is_writable() || event.is_error();
                self.datagram
                    .event(index, readable, writable, now, &mut parts);
                continue;
            }
            let (key, upstream_side) = token_session(event.token());
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if upstream_side {
                // An upstream session's socket while its connect runs.
                self.connect_event(key, event, now);
                continue;
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                session.readable = true;
            }
            if event.is_read_closed() || event.is_error() {
                // Final states: read until the socket says so, never infer "drained".
                session.read_closed = true;
            }
            if event.is_writable() || event.is_error() {
                session.write_blocked = false;
            }
            self.serve(key, now);
        }
        woken
    }

    /// Takes the ring's completions: received bytes into their sessions' inboxes, ends of
    /// receiving and sends as the flags epoll edges set. Returns whether the epoll descriptor
    /// became readable (mio's sources have events).
    fn ring_completions(&mut self, now: Instant) -> bool {
        let Some(ring) = self.ring.as_mut() else {
            return false;
        };
        // datagram: udp/dtls sockets on the ring.
        let datagram = &mut self.datagram;
        let mut parts = LoopParts {
            now,
            locals: &mut self.locals,
            timers: &mut self.timers,
            broadcasts: &mut self.broadcasts,
            metrics: self.metrics.as_deref(),
        };
        let sessions = &mut self.sessions;
        let touched = &mut self.ring_touched;
        let listening = &mut self.listening;
        let mut epoll_ready = false;
        ring.complete(|completion| {
            let key = match completion {
                uring::Completion::Watched { .. } => {
                    epoll_ready = true;
                    return;
                }
                uring::Completion::Datagram { .. } | uring::Completion::DatagramsSent { .. } => {
                    datagram.ring_completion(completion, &mut parts);
                    return;
                }
                // The listeners' completions, taken after the batch (`accept_turn`).
                uring::Completion::Accepted { token, fd } => {
                    let index = usize::try_from(token).unwrap_or(usize::MAX);
                    listening.ring_reported(accept::FromRing::Accepted(index, fd));
                    return;
                }
                uring::Completion::AcceptEnded { token, error } => {
                    let index = usize::try_from(token).unwrap_or(usize::MAX);
                    listening.ring_reported(accept::FromRing::Ended(index, error));
                    return;
                }
                uring::Completion::Received { tag, .. }
                | uring::Completion::ReadClosed { tag }
                | uring::Completion::ReadFailed { tag, .. }
                | uring::Completion::Sent { tag, .. }
                | uring::Completion::Writable { tag }
                | uring::Completion::Detached { tag, .. } => tag,
            };
            let Some(session) = sessions.get_mut(key) else {
                return;
            };
            let Some(stream) = session.stream.uring() else {
                return;
            };
            match completion {
                uring::Completion::Received { data, .. } => {
                    stream.received(data);
                    session.readable = true;
                }
                uring::Completion::ReadClosed { .. } => {
                    stream.read_ended(Ok(()));
                    session.readable = true;
                    session.read_closed = true;
                }
                uring::Completion::ReadFailed { error, .. } => {
                    stream.read_ended(Err(error.kind()));
                    session.readable = true;
                    session.read_closed = true;
                }
                uring::Completion::Sent { result, .. } => {
                    stream.sent(result);
                    session.write_blocked = false;
                }
                uring::Completion::Writable { .. } => session.write_blocked = false,
                uring::Completion::Detached { .. } => {
                    // Serving it reads the rest of the inbox, then moves it to epoll.
                    stream.detached();
                    session.readable = true;
                    session.write_blocked = false;
                }
                uring::Completion::Watched { .. }
                | uring::Completion::Datagram { .. }
                | uring::Completion::DatagramsSent { .. }
                | uring::Completion::Accepted { .. }
                | uring::Completion::AcceptEnded { .. } => {}
            }
            if !stream.notified {
                stream.notified = true;
                touched.push(key);
            }
        });
        epoll_ready
    }

    /// Serves the io_uring sessions that had completions, as epoll edges would have.
    fn serve_ring_touched(&mut self, now: Instant) {
        let mut touched = std::mem::take(&mut self.ring_touched);
        for key in touched.drain(..) {
            let Some(stream) = self
                .sessions
                .get_mut(key)
                .and_then(|session| session.stream.uring())
            else {
                continue;
            };
            stream.notified = false;
            self.serve(key, now);
            self.submit_if_due();
        }
        self.ring_touched = touched;
    }

    /// Submits what the loop queued on its ring when it has been serving for
    /// [`RING_SUBMIT_AFTER`] since the last submit (the turn's wait submits the rest).
    fn submit_if_due(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let now = Instant::now();
        if now.saturating_duration_since(self.ring_submitted) < RING_SUBMIT_AFTER {
            return;
        }
        self.ring_submitted = now;
        if let Err(err) = ring.submit() {
            debug!(
                event_loop = self.index,
                "io_uring submit failed (the wait submits): {err}"
            );
        }
    }

    /// Hands an io_uring session's next send and receive state to the ring; a session leaving
    /// the ring (to splice) moves to epoll once the ring let go of it and its inbox was read.
    fn sync_ring(&mut self, key: usize) {
        let (Some(ring), Some(session)) = (self.ring.as_mut(), self.sessions.get_mut(key)) else {
            return;
        };
        let Some(stream) = session.stream.uring() else {
            return;
        };
        stream.sync(ring);
        let splice_peer = stream.splice_peer;
        let Some(mut mio) = stream.take_for_epoll() else {
            return;
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(err) = self
            .poll
            .registry()
            .register(&mut mio, client_token(key), interest)
        {
            error!(session = %session.info.id, "cannot move a session to epoll to splice it: {err}");
            session.stream = SessionStream::Epoll(mio);
            session.closing.get_or_insert(CloseReason::Io(err.kind()));
            self.ready.push(key);
            return;
        }
        session.stream = SessionStream::Epoll(mio);
        // What the socket holds was announced to the ring, not to epoll: read it.
        session.readable = true;
        session.write_blocked = false;
        debug!(session = %session.info.id, "moved from io_uring to epoll to splice");
        self.ready.push(key);
        if let Some((peer_key, peer_id)) = splice_peer {
            self.splice_when_on_epoll(key, peer_key, peer_id);
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        // datagram: a socket with unread datagrams counts as ready. Sessions listed for a
        // flush by the timers that just fired (a linked session told its upstream timed out)
        // are flushed at the start of the next turn, without waiting for another event.
        if !self.ready.is_empty()
            || !self.flush_list.is_empty()
            || self.datagram.has_ready()
            || self.mio_backlog
        {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut timer = self.timers.next_wakeup();
        if let Some(accept) = self.listening.wakeup(now) {
            timer = Some(timer.map_or(accept, |at| at.min(accept)));
        }
        if self.outbox.is_stalled() {
            let retry = now.checked_add(broadcast::RETRY_INTERVAL).unwrap_or(now);
            timer = Some(timer.map_or(retry, |at| at.min(retry)));
        }
        if let Some(retry) = self.waiting_for_pool.next_wakeup() {
            timer = Some(timer.map_or(retry, |at| at.min(retry)));
        }
        let next = match (timer, self.drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|at| at.saturating_duration_since(now))
    }

    fn run_commands(&mut self, now: Instant) {
        for _ in 0..MAX_COMMANDS_PER_TURN {
            let Ok(command) = self.commands.try_recv() else {
                return;
            };
            match command {
                Command::Adopt(new) => self.adopt_passed_on(*new, now),
                Command::Listen(listener) => {
                    let name = std::sync::Arc::clone(&listener.info.name);
                    if let Err(err) = self.listen(*listener) {
                        error!(event_loop = self.index, listener = %name, "cannot accept on the listener: {err}");
                    }
                }
                Command::Unlisten(index) => self.unlisten(index),
                Command::Broadcast(broadcast) => {
                    self.deliver_local(&broadcast);
                    self.broadcasts_in_flight
                        .release(broadcast::cost(&broadcast));
                }
                Command::Drain { deadline } => self.start_drain(deadline, now),
                Command::Stop => self.stopping = true,
                Command::ReleaseDatagrams { relays, go } => {
                    self.datagram.release(self.poll.registry(), relays);
                    drop(go);
                }
                Command::ResumeDatagrams => {
                    let mut parts = LoopParts {
                        now,
                        locals: &mut self.locals,
                        timers: &mut self.timers,
                        broadcasts: &mut self.broadcasts,
                        metrics: self.metrics.as_deref(),
                    };
                    self.datagram.resume(now, &mut parts);
                }
                Command::Connect(request) => self.start_connect(None, *request, now),
                Command::Deliver(id, call) => self.deliver(id, call, now),
                Command::SetLimits(limits) => {
                    if self.drain_deadline.is_none() {
                        self.idle_limit = limits.idle_timeout;
                    }
                    self.limits = limits;
                }
            }
        }
        // More commands are waiting: come back without blocking.
        let _ = self.peers.get(self.index).map(|me| me.waker.wake());
    }

    /// Makes `new` a session of this loop; fails (and drops the connection) only when the
    /// socket cannot be registered with the loop — the caller logs it.
    fn adopt(&mut self, new: NewSession, now: Instant) -> io::Result<()> {
        let NewSession {
            stream,
            info,
            service,
            ticket,
            tls,
            proxy,
        } = new;
        let key = self.sessions.vacant_key();
        let stream = match self.ring.as_mut() {
            // The ring receives from the start (what arrived before is in the socket).
            Some(ring) => Ok(SessionStream::Uring(UringStream::register(
                stream, ring, key,
            ))),
            None => {
                let mut stream = stream;
                let interest = Interest::READABLE | Interest::WRITABLE;
                self.poll
                    .registry()
                    .register(&mut stream, client_token(key), interest)
                    .map(|()| SessionStream::Epoll(stream))
            }
        };
        let stream = stream?;
        let id = info.id;
        let idle_check = TimerEntry {
            key,
            id,
            kind: TimerKind::Idle,
        };
        let idle_timer = self
            .timers
            .insert(deadline_after(now, self.idle_limit), idle_check);
        let mut session = TcpSession::new(stream, info, Some(ticket), idle_timer, now);
        // Read whatever arrived before registration (the first edge may predate it).
        session.readable = true;
        let tls_service = match tls {
            Some(TlsStart { config, slot }) => match TlsTransport::new(config) {
                Ok(transport) => {
                    let check = TimerEntry {
                        key,
                        id,
                        kind: TimerKind::Handshake,
                    };
                    let timer = self
                        .timers
                        .insert(deadline_after(now, self.limits.handshake_timeout), check);
                    session.tls = Some(Box::new(TlsState::new(transport, slot, timer, service)));
                    None
                }
                Err(err) => {
                    error!(session = %id, "cannot start a TLS session: {err}");
                    self.timers.cancel(idle_timer);
                    if let (Some(ring), SessionStream::Uring(stream)) =
                        (self.ring.as_mut(), &mut session.stream)
                    {
                        stream.retire(ring);
                    }
                    return Ok(());
                }
            },
            None => Some(service),
        };
        let session_is_tls = session.tls.is_some();
        let tls_service = match proxy {
            Some(acl) => {
                let check = TimerEntry {
                    key,
                    id,
                    kind: TimerKind::ProxyHeader,
                };
                let deadline = deadline_after(now, self.limits.handshake_timeout);
                let timer = self.timers.insert(deadline, check);
                session.extras.get_or_insert_with(Box::default).proxy = Some(Box::new(ProxyWait {
                    preamble: ProxyPreamble::new(deadline),
                    acl,
                    service: tls_service,
                    timer,
                }));
                None
            }
            None => tls_service,
        };
        self.stats.opened(&session.info.listener);
        let inserted = self.sessions.insert(session);
        debug_assert_eq!(inserted, key);
        if session_is_tls {
            LoopStats::add(&self.stats.tls_sessions_open, 1);
        }
        let Some(session) = self.sessions.get_mut(key) else {
            return Ok(()); // just inserted: always there
        };
        debug!(session = %id, peer = %session.info.peer, listener = session.info.listener(), "session opened");
        if let Some(service) = tls_service {
            let mut context = CallbackContext {
                now,
                locals: &mut self.locals,
                broadcasts: &mut self.broadcasts,
                limits: &self.limits,
                stats: &self.stats,
                metrics: self.metrics.as_deref(),
            };
            session.callback(&mut context, |handler, handle| {
                *handler = service.open(handle)
            });
            self.after_callback(key, now);
        }
        self.ready.push(key);
        Ok(())
    }

    /// Reads what the session has (within its budget), hands it to the handler, then flushes.
    fn serve(&mut self, key: usize, now: Instant) {
        self.deliver_drain(key, now);
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.proxy_pending() {
            self.serve_proxy_header(key, now);
            return;
        }
        if session.tls.is_some() {
            self.serve_tls(key, now);
            return;
        }
        if session.extras.is_some() && self.serve_splice(key, now) {
            return;
        }
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let mut reads = 0;
        while may_read(
            session,
            key,
            reads,
            self.limits.high_watermark,
            &self.stats,
            &mut self.ready,
        ) {
            match session.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    session.peer_eof = true;
                    session.readable = false;
                }
                Ok(n) => {
                    reads = reads.saturating_add(1);
                    // A short read drained the socket: the next byte brings a new edge, so
                    // skip the read that would only return WouldBlock (as tokio does).
                    if n < self.read_buf.len() && !session.read_closed {
                        session.readable = false;
                    }
                    session.last_activity = now;
                    self.stats.received(&session.info.listener, n);
                    let mut context = CallbackContext {
                        now,
                        locals: &mut self.locals,
                        broadcasts: &mut self.broadcasts,
                        limits: &self.limits,
                        stats: &self.stats,
                        metrics: self.metrics.as_deref(),
                    };
                    let data = self.read_buf.get(..n).unwrap_or_default();
                    session.callback(&mut context, |handler, handle| {
                        handler.on_data(handle, data)
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => session.readable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    session.closing = Some(CloseReason::Io(err.kind()));
                }
            }
        }
        if session.peer_eof && session.extras.is_some() {
            self.deliver_eof(key, now);
        }
        self.after_callback(key, now);
        self.flush(key, now);
    }

    /// `serve` while a PROXY header is expected: reads raw bytes into the preamble stage until
    /// the header is complete (never more than it has room for, so what follows stays in the
    /// socket), then charges the session to the client it names (ACL, per-IP cap), opens the
    /// service or starts TLS, and replays what followed it.
    fn serve_proxy_header(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let mut outcome = None;
        while outcome.is_none()
            && may_read(
                session,
                key,
                0,
                self.limits.high_watermark,
                &self.stats,
                &mut self.ready,
            )
        {
            let Some(wait) = session
                .extras
                .as_mut()
                .and_then(|extras| extras.proxy.as_mut())
            else {
                return;
            };
            let room = wait.preamble.room().min(self.read_buf.len());
            let buf = self.read_buf.get_mut(..room).unwrap_or_default();
            match session.stream.read(buf) {
                Ok(0) => {
                    session.peer_eof = true;
                    outcome = Some(Err(wait.preamble.peer_closed()));
                }
                Ok(n) => {
                    session.last_activity = now;
                    self.stats.received(&session.info.listener, n);
                    outcome = wait
                        .preamble
                        .receive(buf.get(..n).unwrap_or_default(), now)
                        .transpose();
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => session.readable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => session.closing = Some(CloseReason::Io(err.kind())),
            }
        }
        match outcome {
            None => self.flush(key, now),
            Some(Err(failure)) => self.refuse_proxied(key, &failure),
            Some(Ok(done)) => self.proxy_header_done(key, done, now),
        }
    }

    /// Applies a parsed PROXY header, then carries on as a session that just started.
    fn proxy_header_done(&mut self, key: usize, done: ProxyDone, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(wait) = session
            .extras
            .as_mut()
            .and_then(|extras| extras.proxy.take())
        else {
            return;
        };
        let ProxyWait {
            acl,
            service,
            timer,
            ..
        } = *wait;
        self.timers.cancel(timer);
        let balancer = session.info.peer;
        // LOCAL / UNKNOWN (health checks): the connection's own address is the client.
        session.info.peer = done.client(balancer);
        let client = session.info.peer.ip();
        let assigned = match session.ticket_mut() {
            Some(ticket) => ticket.assign_client(&acl, client),
            None => Ok(()),
        };
        if let Err(reason) = assigned {
            session.info.listener.stats.refused(reason);
            info!(
                session = %session.info.id, peer = %session.info.peer, via = %balancer,
                listener = session.info.listener(),
                "refused connection reason={reason} (client named by the PROXY header)"
            );
            self.close(key, CloseReason::Requested);
            return;
        }
        debug!(session = %session.info.id, client = %session.info.peer, via = %balancer, "PROXY header accepted");
        let rest = &done.leftover[..];
        let mut context = CallbackContext {
            now,
            locals: &mut self.locals,
            broadcasts: &mut self.broadcasts,
            limits: &self.limits,
            stats: &self.stats,
            metrics: self.metrics.as_deref(),
        };
        if session.tls.is_some() {
            feed_ciphertext(
                session,
                rest,
                &mut self.plain_buf,
                &mut context,
                &mut self.timers,
            );
        } else if let Some(service) = service {
            session.callback(&mut context, |handler, handle| {
                *handler = service.open(handle)
            });
            if !rest.is_empty() {
                session.callback(&mut context, |handler, handle| {
                    handler.on_data(handle, rest)
                });
            }
        }
        self.after_callback(key, now);
        // The socket may hold more than the header: read it as a normal session now.
        self.ready.push(key);
    }

    /// Closes a `proxy_protocol` session whose header was missing, malformed or late.
    fn refuse_proxied(&mut self, key: usize, why: &ProxyFailure) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(ticket) = session.ticket() {
            ticket.record_refusal(RefusalReason::ProxyHeader);
        }
        session
            .info
            .listener
            .stats
            .refused(RefusalReason::ProxyHeader);
        if let Some(also) = self.proxy_failures.allow(Instant::now()) {
            info!(
                "refused connection reason=proxy_header peer={} listener={}: {why} \
                 (+{also} more in the last second)",
                session.info.peer,
                session.info.listener()
            );
        }
        self.close(key, CloseReason::ProxyHeader);
    }

    /// `serve` for TLS sessions: ciphertext from the socket (one read into the loop's buffer)
    /// into rustls, which answers the handshake; plaintext from rustls to the handler. The
    /// service is opened when the handshake completes.
    fn serve_tls(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let mut reads = 0;
        while may_read(
            session,
            key,
            reads,
            self.limits.high_watermark,
            &self.stats,
            &mut self.ready,
        ) {
            let n = match session.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    session.peer_eof = true;
                    session.readable = false;
                    continue;
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    session.readable = false;
                    continue;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    session.closing = Some(CloseReason::Io(err.kind()));
                    continue;
                }
            };
            reads = reads.saturating_add(1);
            if n < self.read_buf.len() && !session.read_closed {
                session.readable = false;
            }
            session.last_activity = now;
            self.stats.received(&session.info.listener, n);
            let mut context = CallbackContext {
                now,
                locals: &mut self.locals,
                broadcasts: &mut self.broadcasts,
                limits: &self.limits,
                stats: &self.stats,
                metrics: self.metrics.as_deref(),
            };
            feed_ciphertext(
                session,
                self.read_buf.get(..n).unwrap_or_default(),
                &mut self.plain_buf,
                &mut context,
                &mut self.timers,
            );
        }
        if session.extras.is_some() {
            self.announce_connected(key, now);
            if self
                .sessions
                .get_mut(key)
                .is_some_and(|session| session.peer_eof)
            {
                self.deliver_eof(key, now);
            }
        }
        self.after_callback(key, now);
        self.flush(key, now);
    }

    /// Delivers the broadcasts a callback queued, applies its timer request, and lists the
    /// session for flushing.
    fn after_callback(&mut self, key: usize, now: Instant) {
        // Timer and TLS-upgrade requests live in the session's extras: most sessions have none.
        if self
            .sessions
            .get_mut(key)
            .is_some_and(|session| session.extras.is_some())
        {
            self.apply_timer_request(key, now);
            self.apply_tls_upgrade(key, now);
            self.apply_link_ops(key, now);
        }
        self.publish_broadcasts(Some(key));
        self.submit_work(key);
        self.list_for_flush(key);
    }

    /// Arms or cancels the handler's deadline as its last callback asked.
    fn apply_timer_request(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(extras) = session.extras.as_deref_mut() else {
            return;
        };
        let request = std::mem::take(&mut extras.timer_request);
        if request == TimerRequest::Keep {
            return;
        }
        if let Some(timer) = extras.handler_timer.take() {
            self.timers.cancel(timer);
        }
        if let TimerRequest::Set(after) = request {
            let entry = TimerEntry {
                key,
                id: session.info.id,
                kind: TimerKind::Handler,
            };
            extras.handler_timer = Some(self.timers.insert(deadline_after(now, after), entry));
        }
    }

    /// Turns a plain session into a TLS session when its handler asked (`auto` found a
    /// ClientHello): the handshake is bounded like any other (`handshake_timeout`,
    /// `max_handshakes`), and the bytes the handler already read are the first ciphertext.
    fn apply_tls_upgrade(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(upgrade) = session
            .extras
            .as_mut()
            .and_then(|extras| extras.tls_upgrade.take())
        else {
            return;
        };
        let TlsUpgrade {
            config,
            received,
            service,
        } = *upgrade;
        if session.tls.is_some() || session.closing.is_some() {
            return;
        }
        let Some(ticket) = session.ticket() else {
            // Upstream sessions are TLS clients, not servers.
            return;
        };
        let slot = match ticket.reserve_handshake() {
            Ok(slot) => slot,
            Err(reason) => {
                session.info.listener.stats.refused(reason);
                info!(session = %session.info.id, peer = %session.info.peer, "refusing a TLS handshake: {reason}");
                session.closing = Some(CloseReason::Requested);
                return;
            }
        };
        let transport = match TlsTransport::new(config) {
            Ok(transport) => transport,
            Err(err) => {
                error!(session = %session.info.id, "cannot start a TLS session: {err}");
                session.closing = Some(CloseReason::Tls(Arc::new(err)));
                return;
            }
        };
        let check = TimerEntry {
            key,
            id: session.info.id,
            kind: TimerKind::Handshake,
        };
        let timer = self
            .timers
            .insert(deadline_after(now, self.limits.handshake_timeout), check);
        session.tls = Some(Box::new(TlsState::new(transport, slot, timer, service)));
        LoopStats::add(&self.stats.tls_sessions_open, 1);
        let mut context = CallbackContext {
            now,
            locals: &mut self.locals,
            broadcasts: &mut self.broadcasts,
            limits: &self.limits,
            stats: &self.stats,
            metrics: self.metrics.as_deref(),
        };
        feed_ciphertext(
            session,
            &received,
            &mut self.plain_buf,
            &mut context,
            &mut self.timers,
        );
    }

    /// Calls the handler's `on_drain`, when the queue drained as it asked.
    fn deliver_drain(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if !session.drain_due {
            return;
        }
        session.drain_due = false;
        let mut context = CallbackContext {
            now,
            locals: &mut self.locals,
            broadcasts: &mut self.broadcasts,
            limits: &self.limits,
            stats: &self.stats,
            metrics: self.metrics.as_deref(),
        };
        session.callback(&mut context, |handler, handle| handler.on_drain(handle));
    }

    /// Calls the handler's `on_timer` (its deadline passed), then flushes what it queued.
    fn deliver_timer(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(extras) = session.extras.as_deref_mut() {
            extras.handler_timer = None;
        }
        let mut context = CallbackContext {
            now,
            locals: &mut self.locals,
            broadcasts: &mut self.broadcasts,
            limits: &self.limits,
            stats: &self.stats,
            metrics: self.metrics.as_deref(),
        };
        session.callback(&mut context, |handler, handle| handler.on_timer(handle));
        self.after_callback(key, now);
        self.flush(key, now);
    }

    /// Hands the session's next blocking job to the pool, unless one is running already. If the
    /// pool's queue is full the job stays first in the session's queue, retried after a
    /// completion or on the retry timer (`retry_pool`).
    fn submit_work(&mut self, key: usize) {
        if !self.try_submit_work(key) {
            if let Some(session) = self.sessions.get_mut(key) {
                let id = session.info.id;
                self.waiting_for_pool.add(key, id, Instant::now());
            }
        }
    }

    /// Tries the sessions waiting for room in the pool's queue, oldest first, when the retry
    /// timer is due or (`force`) a completion made room. A session that could not queue its job
    /// within `idle_timeout` is closed: it would otherwise hold its admission place for ever.
    fn retry_pool(&mut self, now: Instant, force: bool) {
        let mut full = false;
        for waiter in self.waiting_for_pool.take_due(now, force) {
            if self.sessions.get_if(waiter.key, waiter.id).is_none() {
                continue;
            }
            if !full && self.try_submit_work(waiter.key) {
                self.list_for_flush(waiter.key);
                continue;
            }
            full = true;
            if now.saturating_duration_since(waiter.since) >= self.idle_limit {
                if let Some(session) = self.sessions.get_mut(waiter.key) {
                    info!(
                        session = %waiter.id, peer = %session.info.peer,
                        "closing session: its blocking job found the worker pool's queue \
                         (worker_queue) full for idle_timeout"
                    );
                }
                self.close(waiter.key, CloseReason::WorkerPoolFull);
            } else {
                self.waiting_for_pool.keep(waiter, now);
            }
        }
        self.waiting_for_pool.settle();
    }

    /// [`EventLoop::submit_work`] without the waiting list: `false` when the job stays queued
    /// because the pool's queue is full.
    fn try_submit_work(&mut self, key: usize) -> bool {
        let Some(session) = self.sessions.get_mut(key) else {
            return true;
        };
        let Some(job) = session.work.next() else {
            return true;
        };
        let Some(pool) = &self.pool else {
            session.work.unsend(job);
            session.closing = Some(CloseReason::WorkOverflow);
            return true;
        };
        let origin = Origin {
            event_loop: self.index,
            key,
            id: session.info.id,
        };
        match pool.try_submit(Task { origin, job }) {
            Ok(()) => true,
            Err(TrySendError::Full(task)) => {
                session.work.unsend(task.job);
                false
            }
            Err(TrySendError::Disconnected(task)) => {
                session.work.unsend(task.job);
                session.closing = Some(CloseReason::ShutdownForced);
                true
            }
        }
    }

    /// Delivers the results of finished jobs to their sessions, in order, and starts each
    /// session's next job.
    fn take_completions(&mut self, now: Instant) {
        let mut finished_any = false;
        while let Ok(Completion { origin, reply }) = self.completions.try_recv() {
            finished_any = true;
            let Some(session) = self.sessions.get_if(origin.key, origin.id) else {
                continue;
            };
            session.work.finished();
            match reply {
                None => {
                    error!(
                        session = %origin.id, peer = %session.info.peer,
                        "blocking job panicked; closing this session only"
                    );
                    session.closing = Some(CloseReason::Panic);
                }
                Some(reply) => {
                    let (mut data, close) = reply.into_parts();
                    // The queue counts the reply's length: the slack of a grown Vec must not
                    // ride along uncounted.
                    if data.capacity().saturating_sub(data.len()) > 4096 {
                        data.shrink_to_fit();
                    }
                    if session.closing.is_none() {
                        if !session
                            .outbound
                            .fits(data.len(), self.limits.outbound_limit)
                        {
                            session.closing = Some(CloseReason::OutboundOverflow);
                        } else {
                            session.outbound.push_shared(Bytes::from(data));
                            if close {
                                session.closing = Some(CloseReason::Requested);
                            }
                        }
                    }
                }
            }
            self.submit_work(origin.key);
            self.list_for_flush(origin.key);
        }
        if finished_any {
            self.retry_pool(now, true);
        }
    }

    /// Delivers the queued broadcasts to this loop's members and hands them to the other
    /// loops. If another loop has no room, they wait in the outbox (none is dropped) and the
    /// sending session (`sender`) is not read until they are handed over.
    fn publish_broadcasts(&mut self, sender: Option<usize>) {
        if self.broadcasts.is_empty() {
            return;
        }
        let broadcasts = std::mem::take(&mut self.broadcasts);
        let mut stalled = false;
        for broadcast in &broadcasts {
            stalled |= self.outbox.publish(self.index, &self.peers, broadcast);
            self.deliver_local(broadcast);
        }
        self.broadcasts = broadcasts;
        self.broadcasts.clear();
        if !stalled {
            return;
        }
        if let Some(session) = sender.and_then(|key| self.sessions.get_mut(key)) {
            if !session.broadcast_wait {
                session.broadcast_wait = true;
                LoopStats::add(&self.stats.broadcast_stalls, 1);
                self.outbox
                    .pause(sender.unwrap_or_default(), session.info.id);
            }
        }
    }

    /// Hands waiting broadcasts to the loops that have room again; once none waits, the
    /// senders paused for them are read again.
    fn retry_broadcasts(&mut self) {
        if !self.outbox.is_stalled() {
            return;
        }
        for (key, id) in self.outbox.retry(&self.peers) {
            if let Some(session) = self.sessions.get_if(key, id) {
                session.broadcast_wait = false;
                self.ready.push(key);
            }
        }
    }

    fn deliver_local(&mut self, broadcast: &Broadcast) {
        let limit = self.limits.outbound_limit;
        let mut touched = Vec::new();
        self.sessions
            .for_each_member(broadcast.listener, |key, member| {
                if member.info.id == broadcast.except || member.closing.is_some() {
                    return;
                }
                if !member.outbound.fits(broadcast.data.len(), limit) {
                    member.closing = Some(CloseReason::OutboundOverflow);
                } else {
                    member.outbound.push_shared(broadcast.data.clone());
                }
                if !member.flush_listed {
                    member.flush_listed = true;
                    touched.push(key);
                }
            });
        self.flush_list.extend(touched);
    }

    fn list_for_flush(&mut self, key: usize) {
        if let Some(session) = self.sessions.get_mut(key) {
            if !session.flush_listed {
                session.flush_listed = true;
                self.flush_list.push(key);
            }
        }
    }

    fn flush_listed(&mut self) {
        let now = Instant::now();
        let mut list = std::mem::take(&mut self.flush_list);
        for key in list.drain(..) {
            // A session flushed directly since it was listed is not flushed again.
            if self
                .sessions
                .get_mut(key)
                .is_some_and(|session| session.flush_listed)
            {
                self.flush(key, now);
            }
        }
        self.flush_list = list;
    }

    /// Writes queued bytes, applies the watermarks, and closes the session when it is done
    /// (for TLS, after its close_notify went out).
    fn flush(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        // This flush covers any pending entry on the flush list (listing again re-arms it).
        session.flush_listed = false;
        if let Some(reason) = session.closing.as_ref().filter(|reason| !reason.flushes()) {
            let reason = reason.clone();
            self.close(key, reason);
            return;
        }
        let tls_pending = session
            .tls
            .as_ref()
            .is_some_and(|tls| tls.transport.has_pending_ciphertext());
        if (!session.outbound.is_empty() || tls_pending) && !session.write_blocked {
            let result = match session.tls.as_mut() {
                Some(tls) => tls
                    .transport
                    .flush(&mut session.outbound, &mut session.stream),
                None => session.outbound.write_to(&mut session.stream),
            };
            match result {
                Ok(flushed) => {
                    if flushed.written > 0 {
                        session.last_activity = now;
                        self.stats.sent(&session.info.listener, flushed.written);
                    }
                    session.write_blocked = flushed.blocked;
                }
                Err(err) => {
                    self.close(key, CloseReason::Io(err.kind()));
                    return;
                }
            }
        }
        self.sync_ring(key);
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let links_done = match session.extras.is_some() {
            true => self.flush_links(key),
            false => true,
        };
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.read_paused
            && session.queued() <= self.limits.low_watermark
            && session.work.len() <= WORK_LOW_WATERMARK
        {
            session.read_paused = false;
            // The edge that announced the unread bytes is gone: come back to read them.
            self.ready.push(key);
        }
        if session.drain_wanted
            && session.closing.is_none()
            && session.queued() <= self.limits.low_watermark
        {
            // The producer that paused may go on: `serve` calls its on_drain next turn.
            session.drain_wanted = false;
            session.drain_due = true;
            self.ready.push(key);
        }
        if session.queued() != 0 || (!session.work.is_idle() && session.closing.is_none()) {
            // Replies of blocking jobs still to come are part of what the peer is owed, and a
            // wanted drain is due only once the bytes of an io_uring send are written too.
            return;
        }
        // The peer's end (FIN or close_notify) waits for what the handler still holds back for
        // a drained queue (pipelined requests): its `on_drain` is due and may answer more. A
        // linked session also waits for its own write side to be finished (a relay).
        let finished = session.closing.clone().or_else(|| {
            (session.peer_eof && links_done && !session.drain_due)
                .then_some(CloseReason::PeerClosed)
        });
        let Some(reason) = finished else { return };
        if let Some(tls) = session.tls.as_mut() {
            if !tls.handshaking() && !tls.transport.close_notify_sent() {
                tls.transport.send_close_notify();
                if !session.write_blocked {
                    match tls
                        .transport
                        .flush(&mut session.outbound, &mut session.stream)
                    {
                        Ok(flushed) => session.write_blocked = flushed.blocked,
                        Err(err) => {
                            self.close(key, CloseReason::Io(err.kind()));
                            return;
                        }
                    }
                }
            }
            if tls.transport.has_pending_ciphertext() {
                // close_notify still queued: the writable edge brings us back.
                return;
            }
        }
        // io_uring: what was accepted must be written before the socket closes; the send's
        // completion brings us back.
        self.sync_ring(key);
        if self
            .sessions
            .get_mut(key)
            .is_some_and(|session| session.stream.sending())
        {
            return;
        }
        self.close(key, reason);
    }

    fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(mut session) = self.sessions.remove(key) else {
            return;
        };
        self.timers.cancel(session.idle_timer);
        let extras = session
            .extras
            .take()
            .map(|extras| *extras)
            .unwrap_or_default();
        if let Some(timer) = extras.handler_timer {
            self.timers.cancel(timer);
        }
        let proxy_pending = extras.proxy.map(|wait| self.timers.cancel(wait.timer));
        // Upstream sessions (no ticket) are TLS clients: their failures are not the server's.
        let admitted = session.ticket().is_some();
        if let Some(tls) = session.tls.as_mut() {
            if let Some(timer) = tls.handshake_timer.take() {
                self.timers.cancel(timer);
            }
            if tls.handshaking() && proxy_pending.is_none() && admitted {
                self.handshake_failed(&session.info, &reason);
            } else if !tls.transport.close_notify_sent()
                && !matches!(reason, CloseReason::Io(_) | CloseReason::Tls(_))
            {
                // Closes decided by the server (idle timeout, drain, stop) still end the TLS
                // session properly: one best-effort, non-blocking close_notify.
                tls.transport.send_close_notify();
                let _ = tls.transport.write_pending_ciphertext(&mut session.stream);
            }
        }
        self.stats.closed(&session.info.listener);
        if session.ticket().is_none() {
            self.upstream_closed(&session.info, extras.links.as_deref(), &reason);
        }
        if session.tls.is_some() {
            LoopStats::sub(&self.stats.tls_sessions_open, 1);
        }
        let counter = match reason {
            CloseReason::IdleTimeout => Some(&self.stats.closed_idle_timeout),
            CloseReason::OutboundOverflow => Some(&self.stats.closed_outbound_overflow),
            CloseReason::Io(_) => Some(&self.stats.closed_io_error),
            CloseReason::ShutdownForced => Some(&self.stats.closed_forced),
            CloseReason::UpstreamTimeout => Some(&self.stats.closed_upstream_timeout),
            CloseReason::WorkerPoolFull => Some(&self.stats.closed_worker_pool_full),
            _ => None,
        };
        if let Some(counter) = counter {
            LoopStats::add(counter, 1);
        }
        let info = &session.info;
        match reason {
            CloseReason::OutboundOverflow => info!(
                session = %info.id, peer = %info.peer, listener = info.listener(),
                queued = session.outbound.len(),
                "closing session: outbound queue passed outbound_limit (peer not reading)"
            ),
            _ => debug!(session = %info.id, peer = %info.peer, "session closed: {reason}"),
        }
        session.outbound.clear();
        session.handler_closed(&reason, &self.stats);
        if let Some(links) = extras.links {
            self.tell_links_closed(session.info.id, *links, &reason, Instant::now());
        }
        // Dropping the stream closes the socket (and deregisters it); the ticket gives back
        // the session's admission place. An io_uring socket goes to the ring, which closes
        // it once its operations completed.
        if let (Some(ring), SessionStream::Uring(stream)) =
            (self.ring.as_mut(), &mut session.stream)
        {
            stream.retire(ring);
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.timers.poll_expired(now, &mut expired);
        for TimerEntry { key, id, kind } in expired {
            // datagram: udp/dtls session timers.
            if let TimerKind::Datagram(kind) = kind {
                let mut parts = LoopParts {
                    now,
                    locals: &mut self.locals,
                    timers: &mut self.timers,
                    broadcasts: &mut self.broadcasts,
                    metrics: self.metrics.as_deref(),
                };
                self.datagram.timer(key, id, kind, now, &mut parts);
                continue;
            }
            let idle_limit = self.idle_limit;
            let draining = self.drain_deadline.is_some();
            let Some(session) = self.sessions.get_if(key, id) else {
                continue;
            };
            if kind == TimerKind::Connect {
                self.connect_timed_out(key, now);
                continue;
            }
            if kind == TimerKind::ProxyHeader {
                if session.proxy_pending() {
                    self.refuse_proxied(key, &ProxyFailure::Late);
                }
                continue;
            }
            if kind == TimerKind::Handler {
                if session.closing.is_none() {
                    self.deliver_timer(key, now);
                }
                continue;
            }
            if kind == TimerKind::Handshake {
                if let Some(tls) = session.tls.as_mut() {
                    tls.handshake_timer = None;
                    if tls.handshaking() {
                        self.close(key, CloseReason::HandshakeTimeout);
                    }
                }
                continue;
            }
            if !session.work.is_idle() {
                // A job is running for this session: it is busy, not idle.
                session.last_activity = now;
            }
            let due = deadline_after(session.last_activity, idle_limit);
            if now < due {
                session.idle_timer = self.timers.insert(due, TimerEntry { key, id, kind });
                continue;
            }
            let reason = if draining && session.outbound.is_empty() {
                CloseReason::Shutdown
            } else {
                CloseReason::IdleTimeout
            };
            self.close(key, reason);
        }
    }

    /// Counts a TLS session that ended before its handshake completed, and logs why
    /// (at most once per second per loop).
    fn handshake_failed(&mut self, info: &SessionInfo, reason: &CloseReason) {
        let counter = match reason {
            CloseReason::HandshakeTimeout => &self.stats.handshake_timeouts,
            _ => &self.stats.handshakes_failed,
        };
        LoopStats::add(counter, 1);
        let quiet = matches!(reason, CloseReason::Shutdown | CloseReason::ShutdownForced);
        if quiet {
            return;
        }
        if let Some(also) = self.tls_failures.allow(Instant::now()) {
            info!(
                "tls handshake failed peer={} listener={}: {reason} \
                 (+{also} more failed handshakes in the last second)",
                info.peer,
                info.listener()
            );
        }
    }

    fn start_drain(&mut self, deadline: Instant, now: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(deadline);
        self.idle_limit = self.idle_limit.min(DRAIN_IDLE);
        // What waits in the listeners' queues becomes sessions drained like the others.
        self.stop_listening(now, true);
        // datagram: no new peers; datagram sessions end now (DTLS with close_notify).
        let mut parts = LoopParts {
            now,
            locals: &mut self.locals,
            timers: &mut self.timers,
            broadcasts: &mut self.broadcasts,
            metrics: self.metrics.as_deref(),
        };
        self.datagram.drain(&mut parts);
        for key in self.sessions.keys() {
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            self.timers.cancel(session.idle_timer);
            let id = session.info.id;
            let due = deadline_after(session.last_activity, self.idle_limit).max(now);
            session.idle_timer = self.timers.insert(
                due,
                TimerEntry {
                    key,
                    id,
                    kind: TimerKind::Idle,
                },
            );
            // The protocol's goodbye (HTTP/2 GOAWAY), also for sessions that are idle now.
            if session.closing.is_none() {
                let mut context = CallbackContext {
                    now,
                    locals: &mut self.locals,
                    broadcasts: &mut self.broadcasts,
                    limits: &self.limits,
                    stats: &self.stats,
                    metrics: self.metrics.as_deref(),
                };
                session.callback(&mut context, |handler, handle| {
                    handler.on_server_drain(handle)
                });
                self.after_callback(key, now);
                self.flush(key, now);
            }
        }
        debug!(
            event_loop = self.index,
            sessions = self.sessions.len(),
            "draining"
        );
    }

    fn close_all(&mut self, reason: CloseReason) {
        let now = Instant::now();
        for key in self.sessions.keys() {
            self.close(key, reason.clone());
        }
        // datagram:
        let mut parts = LoopParts {
            now,
            locals: &mut self.locals,
            timers: &mut self.timers,
            broadcasts: &mut self.broadcasts,
            metrics: self.metrics.as_deref(),
        };
        self.datagram.close_all(reason, &mut parts);
    }
}

/// Logs (once per process) that io_uring cannot be had, and why.
fn ring_unavailable(err: &RingError) {
    RING_LOG.call_once(|| info!("io_uring unavailable ({err}): serving on epoll"));
}

/// A session's client socket is token `2k`, its upstream (forward) socket `2k + 1`.
fn client_token(key: usize) -> Token {
    Token(key << 1)
}

fn upstream_token(key: usize) -> Token {
    Token((key << 1) | 1)
}

/// The session key of a token, and whether it is the upstream side.
fn token_session(token: Token) -> (usize, bool) {
    (token.0 >> 1, token.0 & 1 == 1)
}

/// Whether the loop reads `session` once more this turn. Not when reading is over for now;
/// not past the outbound high watermark (reading pauses until the queue drains); not past the
/// per-turn budget (the session goes on the ready list for the next turn).
fn may_read(
    session: &mut TcpSession,
    key: usize,
    reads: usize,
    high_watermark: usize,
    stats: &LoopStats,
    ready: &mut Vec<usize>,
) -> bool {
    if !session.readable
        || session.read_paused
        || session.broadcast_wait
        || session.link_wait
        || session.peer_eof
        || session.closing.is_some()
    {
        return false;
    }
    let links = session
        .extras
        .as_deref()
        .and_then(|extras| extras.links.as_deref());
    // A session's own full queue stops reading it (what it reads, it answers), except on a
    // relay: a session with live links sends what it reads to its peer, whose queue is what
    // `link_wait` watches. Pausing it for its own queue too — which the *peer* fills — makes
    // a cycle with any upstream that stops reading while its replies are not read (an echo
    // server): both directions stall for good. Its own sends stay bounded by outbound_limit.
    let relaying = links.is_some_and(|links| !links.peers.is_empty());
    if (session.queued() > high_watermark && !relaying) || session.work.len() > WORK_HIGH_WATERMARK
    {
        session.read_paused = true;
        LoopStats::add(&stats.read_pauses, 1);
        return false;
    }
    // Bytes for a linked session wait in the handler's requests until the callback returns:
    // past the high watermark, stop and let the loop hand them over (and pause if need be).
    let sending = links.is_some_and(|links| links.pending > high_watermark);
    if reads == MAX_READS_PER_TURN || sending {
        ready.push(key);
        return false;
    }
    true
}

/// Hands `ciphertext` to the session's TLS stage step by step, delivering what each step
/// produced (the handshake's end, then plaintext to the handler), until it is consumed or the
/// session is closing.
fn feed_ciphertext(
    session: &mut TcpSession,
    mut ciphertext: &[u8],
    plain_buf: &mut [u8],
    context: &mut CallbackContext<'_>,
    timers: &mut TimerWheel<TimerEntry>,
) {
    while !ciphertext.is_empty() && session.closing.is_none() && !session.peer_eof {
        let Some(tls) = session.tls.as_mut() else {
            return;
        };
        match tls.transport.receive_ciphertext(ciphertext) {
            Ok(taken) => ciphertext = ciphertext.get(taken..).unwrap_or_default(),
            Err(failure) => {
                tls_failed(session, failure);
                return;
            }
        }
        deliver_tls_events(session, plain_buf, context, timers);
    }
}

/// Delivers what the TLS stage has: opens the service when the handshake completes, hands
/// every decrypted byte to the handler, and takes the peer's close_notify as its FIN.
fn deliver_tls_events(
    session: &mut TcpSession,
    plain_buf: &mut [u8],
    context: &mut CallbackContext<'_>,
    timers: &mut TimerWheel<TimerEntry>,
) {
    while session.closing.is_none() {
        let Some(tls) = session.tls.as_mut() else {
            return;
        };
        match tls.transport.poll_event(plain_buf) {
            Ok(None) => return,
            Ok(Some(TlsEvent::HandshakeComplete)) => {
                tls.handshake = None;
                if let Some(timer) = tls.handshake_timer.take() {
                    timers.cancel(timer);
                }
                LoopStats::add(&context.stats.handshakes_ok, 1);
                let conn = tls.transport.connection();
                debug!(
                    session = %session.info.id,
                    version = ?conn.protocol_version(),
                    alpn = ?conn.alpn_protocol().map(String::from_utf8_lossy),
                    sni = ?tls.transport.server_name(),
                    "tls handshake complete"
                );
                if let Some(service) = tls.pending_service.take() {
                    session.callback(context, |handler, handle| *handler = service.open(handle));
                }
            }
            Ok(Some(TlsEvent::Plaintext(n))) => {
                let data = plain_buf.get(..n).unwrap_or_default();
                session.callback(context, |handler, handle| handler.on_data(handle, data));
            }
            // The peer's close_notify: an orderly end of its data.
            Ok(Some(TlsEvent::PeerClosed)) => {
                session.peer_eof = true;
                return;
            }
            Err(failure) => {
                tls_failed(session, failure);
                return;
            }
        }
    }
}

/// Ends a session whose TLS stage failed. For a protocol error rustls queued an alert telling
/// the peer why; a TLS error closes without a flush, so this best-effort write is what sends it.
fn tls_failed(session: &mut TcpSession, failure: TlsFailure) {
    let reason = match failure {
        TlsFailure::Protocol(err) => {
            if let Some(tls) = session.tls.as_mut() {
                let _ = tls.transport.write_pending_ciphertext(&mut session.stream);
            }
            CloseReason::Tls(Arc::new(err))
        }
        TlsFailure::Stalled => CloseReason::Io(io::ErrorKind::InvalidData),
        TlsFailure::Io(kind) => CloseReason::Io(kind),
    };
    session.closing = Some(reason);
}

mod accept;
mod links;
pub(crate) use links::Delivery;
mod splice;
#[cfg(test)]
mod tests;
