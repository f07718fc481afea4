//! The client runtime: plexus event loops with no listeners, for a program that connects
//! instead of serving (`plexus connect`, `plexus bench`, your own client).
//!
//! [`ClientRuntime::builder`] starts `event_loops` loop threads (and a small worker pool, for
//! [`Session::spawn_blocking`]). [`ClientRuntime::connect`] opens a connection to an
//! [`Upstream`] on one of them (round robin), handled by a [`SessionHandler`]: the same API
//! and the same connectors as a server's sessions (see [`crate::connector`]) — tcp, or tls
//! with [`Upstream::with_tls`] and a [`crate::tls_client::client_config`] (whom to trust as a
//! [`crate::tls_client::ServerTrust`], the name sent as SNI and verified, ALPN), a connect
//! timeout per address and the fallback to the next address, the outbound watermarks and
//! `outbound_limit`, the idle and handshake timeouts, close reasons. Its handler hears:
//!
//! - [`SessionHandler::on_link`] with [`LinkEvent::Connected`] (`upstream` is the connection's
//!   own id) once the connection is usable — after the TLS handshake for a TLS upstream, so
//!   [`Session::tls_state`] then tells the version, cipher suite and certificate;
//! - [`SessionHandler::on_data`] with the peer's bytes;
//! - [`SessionHandler::on_close`] at the end, also when it never connected
//!   ([`CloseReason::UpstreamFailed`], [`CloseReason::UpstreamTimeout`], [`CloseReason::Tls`],
//!   [`CloseReason::HandshakeTimeout`]).
//!
//! [`Session::finish`] half-closes a client connection (FIN, or close_notify on TLS, once its
//! queue is flushed) and it goes on reading; it closes once the peer has finished too.
//!
//! **From other threads**, a connection is reached through its [`Connection`] (`Send`,
//! `Clone`): [`Connection::send`] hands bytes in, [`Connection::run`] a closure, both run on
//! the connection's loop in the order given. Everything is bounded:
//!
//! - each loop's command channel holds 65,536 commands: [`ClientRuntime::connect`] fails with
//!   [`ClientError::Busy`] when its loop's channel is full, while [`Connection::send`] and
//!   [`Connection::run`] wait for room;
//! - [`Connection::send`] waits while the bytes it handed in and the loop has not queued yet
//!   pass the high watermark (or half the room `outbound_limit` leaves above it, if less), and
//!   while the connection's outbound queue is past the high watermark (until it drains to the
//!   low one): a peer that stops reading stops the sender, and a connection holds at most
//!   about twice the high watermark plus one send — within `outbound_limit`, unless one send
//!   alone is larger than the room above the high watermark.
//!
//! Neither may be called on a loop thread (from a handler): they may wait for that very loop.
//! A handler uses its [`Session`] instead.
//!
//! **The end**: [`ClientRuntime::run`] returns once every connection opened with
//! [`ClientRuntime::connect`] has ended (sessions those connections opened themselves with
//! [`Session::connect`] get a short drain, [`ORPHAN_GRACE`], then are closed), or at once after
//! [`ClientHandle::shutdown`] (every session is closed, its handler told
//! [`CloseReason::ShutdownForced`]). Connections are opened before `run`, from another thread
//! while one is still open, or from handlers.
//!
//! ```no_run
//! use plexus::{ClientRuntime, LinkEvent, Session, SessionHandler, Upstream};
//!
//! struct Hello;
//! impl SessionHandler for Hello {
//!     fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
//!         if let LinkEvent::Connected { .. } = event {
//!             session.send(b"hello\n");
//!             session.finish(); // FIN after the line; the replies still come in
//!         }
//!     }
//!     fn on_data(&mut self, _: &mut Session<'_>, data: &[u8]) {
//!         print!("{}", String::from_utf8_lossy(data));
//!     }
//! }
//!
//! let runtime = ClientRuntime::builder().event_loops(1).build()?;
//! let upstream = Upstream::resolve("127.0.0.1:7000")?;
//! let connection = runtime.connect(&upstream, Box::new(Hello))?;
//! // Another thread could now call connection.send(...) or connection.finish().
//! # let _ = connection;
//! runtime.run()?; // returns once the server has closed
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::{Events, Poll, Token, Waker};

use crate::config::ServerConfig;
use crate::connector::Upstream;
use crate::error::Error;
use crate::event_loop::{Command, EventLoop, ExitSignal, LoopHandle, SessionLimits};
use crate::service::{
    CloseReason, ConnectRequest, LinkEvent, Session, SessionHandler, SessionId, SessionInfo,
};
use crate::worker::WorkerPool;

/// How long sessions left when the last [`ClientRuntime::connect`] connection ended (those
/// the connections opened themselves) may take to finish before they are closed.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// Blocking jobs waiting for the client runtime's worker pool.
const WORKER_QUEUE: usize = 1024;

/// Why a client runtime could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The runtime has stopped (its `run` returned, or it was dropped).
    #[error("the client runtime has stopped")]
    Stopped,
    /// The chosen event loop's command channel is full (65,536 commands waiting).
    #[error("the event loop's command queue is full")]
    Busy,
    /// The connection has ended: nothing more can be sent to it.
    #[error("connection {0} has ended")]
    Ended(SessionId),
}

/// Options of a [`ClientRuntime`].
#[derive(Debug, Clone)]
pub struct ClientRuntimeBuilder {
    event_loops: usize,
    workers: usize,
    limits: SessionLimits,
}

impl ClientRuntimeBuilder {
    /// How many event-loop threads (default 1; 0: one per core).
    #[must_use]
    pub fn event_loops(mut self, n: usize) -> Self {
        self.event_loops = n;
        self
    }

    /// How many worker threads run [`Session::spawn_blocking`] jobs (default 1; 0: none, and
    /// a session that spawns a job is closed with [`CloseReason::WorkOverflow`]).
    #[must_use]
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Closes a connection when no byte moved either way for this long (default: never).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.limits.idle_timeout = timeout;
        self
    }

    /// Bound on a TLS upstream's handshake, from its TCP connect on (default 10 s).
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.limits.handshake_timeout = timeout;
        self
    }

    /// The outbound watermarks of every connection (defaults 1 MiB and 256 KiB, as a server's
    /// `outbound_high_watermark` / `outbound_low_watermark`); `low` is capped at `high`.
    #[must_use]
    pub fn outbound_watermarks(mut self, high: usize, low: usize) -> Self {
        self.limits.high_watermark = high;
        self.limits.low_watermark = low.min(high);
        self.limits.outbound_limit = self.limits.outbound_limit.max(high);
        self
    }

    /// Bytes a connection may have queued before it is closed with
    /// [`CloseReason::OutboundOverflow`] (default 4 MiB; at least the high watermark).
    #[must_use]
    pub fn outbound_limit(mut self, limit: usize) -> Self {
        self.limits.outbound_limit = limit.max(self.limits.high_watermark);
        self
    }

    /// Starts the event loops (and the worker pool).
    pub fn build(self) -> Result<ClientRuntime, Error> {
        ClientRuntime::start(self)
    }
}

/// Plexus event loops with no listeners, running client connections (see the module docs).
pub struct ClientRuntime {
    shared: Arc<Shared>,
    poll: Poll,
    threads: Vec<JoinHandle<io::Result<()>>>,
    pool: Option<WorkerPool>,
    live_loops: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ClientRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRuntime")
            .field("event_loops", &self.shared.loops.len())
            .field("open", &self.shared.live.open.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// What the runtime, its handles and its connections share.
struct Shared {
    loops: Vec<LoopHandle>,
    /// The loop the next connection goes to (round robin).
    next: AtomicUsize,
    live: Arc<Liveness>,
    /// Bytes [`Connection::send`] may have in flight to the loop: the high watermark, less if
    /// `outbound_limit` leaves less room above it (so the flow control never overflows it).
    send_budget: usize,
}

/// Open connections, and how `run` hears that they are all gone (or that it should stop).
struct Liveness {
    open: AtomicUsize,
    stop: AtomicBool,
    stopped: AtomicBool,
    waker: Arc<Waker>,
}

const CONTROL: Token = Token(0);

impl ClientRuntime {
    /// The options, with their defaults.
    pub fn builder() -> ClientRuntimeBuilder {
        let defaults = ServerConfig::default();
        ClientRuntimeBuilder {
            event_loops: 1,
            workers: 1,
            limits: SessionLimits {
                idle_timeout: Duration::MAX,
                handshake_timeout: defaults.handshake_timeout,
                high_watermark: defaults.outbound_high_watermark,
                low_watermark: defaults.outbound_low_watermark,
                outbound_limit: defaults.outbound_limit,
                work_limit: defaults.worker_session_limit,
            },
        }
    }

    fn start(options: ClientRuntimeBuilder) -> Result<ClientRuntime, Error> {
        let count = match options.event_loops {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let poll = Poll::new().map_err(Error::runtime("cannot create a poll instance"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), CONTROL)
                .map_err(Error::runtime("cannot create a waker"))?,
        );
        let completion_capacity = WORKER_QUEUE.saturating_add(options.workers);
        let mut loops = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let (event_loop, handle) =
                EventLoop::new(index, 0, options.limits.clone(), completion_capacity)
                    .map_err(Error::runtime("cannot create an event loop"))?;
            loops.push(event_loop);
            handles.push(handle);
        }
        let pool = match options.workers {
            0 => None,
            n => {
                let sinks = handles.iter().map(LoopHandle::completion_sink).collect();
                Some(
                    WorkerPool::start(n, WORKER_QUEUE, sinks)
                        .map_err(Error::runtime("cannot start the worker pool"))?,
                )
            }
        };
        let live_loops = Arc::new(AtomicUsize::new(count));
        let mut threads = Vec::with_capacity(count);
        for (index, mut event_loop) in loops.into_iter().enumerate() {
            event_loop.set_peers(handles.clone());
            if let Some(pool) = &pool {
                event_loop.set_pool(pool.submitter());
            }
            let exit = ExitSignal {
                live_loops: Arc::clone(&live_loops),
                waker: Arc::clone(&waker),
            };
            let spawned = thread::Builder::new()
                .name(format!("plexus-client-{index}"))
                .spawn(move || event_loop.run(exit));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    for handle in &handles {
                        let _ = handle.send(Command::Stop);
                    }
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(Error::Runtime {
                        what: "cannot start an event loop thread",
                        source,
                    });
                }
            }
        }
        Ok(ClientRuntime {
            shared: Arc::new(Shared {
                loops: handles,
                next: AtomicUsize::new(0),
                live: Arc::new(Liveness {
                    open: AtomicUsize::new(0),
                    stop: AtomicBool::new(false),
                    stopped: AtomicBool::new(false),
                    waker,
                }),
                send_budget: options.limits.high_watermark.min(
                    options
                        .limits
                        .outbound_limit
                        .saturating_sub(options.limits.high_watermark)
                        / 2,
                ),
            }),
            poll,
            threads,
            pool,
            live_loops,
        })
    }

    /// Opens a connection to `upstream` on one of the loops, handled by `handler` (see the
    /// module docs for what it hears). The connect starts on the loop at once; a failure to
    /// connect is reported to the handler (`on_close`), not here.
    pub fn connect(
        &self,
        upstream: &Upstream,
        handler: Box<dyn SessionHandler>,
    ) -> Result<Connection, ClientError> {
        self.shared.connect(&self.shared, upstream, handler)
    }

    /// A handle for other threads: open connections, stop the runtime.
    pub fn handle(&self) -> ClientHandle {
        ClientHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Closes every session now (their handlers hear [`CloseReason::ShutdownForced`]); `run`
    /// returns.
    pub fn shutdown(&self) {
        self.shared.live.shutdown();
    }

    /// Connections opened with [`ClientRuntime::connect`] that have not ended yet.
    pub fn open_connections(&self) -> usize {
        self.shared.live.open.load(Ordering::Acquire)
    }

    /// Waits until every connection opened with [`ClientRuntime::connect`] has ended (at once
    /// if none is open), or until [`ClientHandle::shutdown`]; then stops the loops and the
    /// worker pool. Fails if an event loop died (a handler panic only ends its session).
    pub fn run(mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(4);
        let loops = self.threads.len();
        loop {
            let live = &self.shared.live;
            if live.stop.load(Ordering::Acquire)
                || live.open.load(Ordering::Acquire) == 0
                || self.live_loops.load(Ordering::Acquire) < loops
            {
                break;
            }
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    let _ = self.stop_loops();
                    return Err(Error::Runtime {
                        what: "client runtime poll failed",
                        source,
                    });
                }
            }
        }
        self.stop_loops()
    }

    /// Tells every loop to finish (drain what is left, or stop at once after a shutdown),
    /// waits for them and for the worker pool.
    fn stop_loops(&mut self) -> Result<(), Error> {
        let live = &self.shared.live;
        live.stopped.store(true, Ordering::Release);
        let forced = live.stop.load(Ordering::Acquire);
        let deadline = Instant::now()
            .checked_add(ORPHAN_GRACE)
            .unwrap_or_else(Instant::now);
        for handle in &self.shared.loops {
            let command = match forced {
                true => Command::Stop,
                false => Command::Drain { deadline },
            };
            // A loop that is gone is counted below.
            let _ = handle.send_waiting(command);
        }
        let mut dead = 0usize;
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => dead = dead.saturating_add(1),
            }
        }
        if let Some(pool) = self.pool.take() {
            pool.join();
        }
        match dead {
            0 => Ok(()),
            dead => Err(Error::LoopDied { dead }),
        }
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.live.stop.store(true, Ordering::Release);
            let _ = self.stop_loops();
        }
    }
}

impl Shared {
    fn connect(
        &self,
        shared: &Arc<Shared>,
        upstream: &Upstream,
        handler: Box<dyn SessionHandler>,
    ) -> Result<Connection, ClientError> {
        if self.live.stopped.load(Ordering::Acquire) {
            return Err(ClientError::Stopped);
        }
        let id = SessionId::next();
        let flow = Arc::new(Flow::default());
        self.live.open.fetch_add(1, Ordering::AcqRel);
        let handler = Box::new(ClientHandler {
            inner: handler,
            flow: Arc::clone(&flow),
            live: Arc::clone(&self.live),
        });
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let index = turn.checked_rem(self.loops.len()).unwrap_or(0);
        let Some(handle) = self.loops.get(index) else {
            return Err(ClientError::Stopped);
        };
        let request = ConnectRequest {
            id,
            upstream: upstream.clone(),
            handler,
        };
        // A refused command drops the handler, which counts the connection out again.
        if handle.send(Command::Connect(Box::new(request))).is_err() {
            return Err(match self.live.stopped.load(Ordering::Acquire) {
                true => ClientError::Stopped,
                false => ClientError::Busy,
            });
        }
        Ok(Connection {
            id,
            index,
            flow,
            shared: Arc::clone(shared),
        })
    }
}

impl Liveness {
    fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

/// Opens connections on a [`ClientRuntime`] and stops it, from any thread (cheap to clone).
#[derive(Clone)]
pub struct ClientHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandle").finish_non_exhaustive()
    }
}

impl ClientHandle {
    /// [`ClientRuntime::connect`], from another thread.
    pub fn connect(
        &self,
        upstream: &Upstream,
        handler: Box<dyn SessionHandler>,
    ) -> Result<Connection, ClientError> {
        self.shared.connect(&self.shared, upstream, handler)
    }

    /// [`ClientRuntime::shutdown`], from another thread.
    pub fn shutdown(&self) {
        self.shared.live.shutdown();
    }
}

/// One connection of a [`ClientRuntime`], reached from other threads: bytes and closures
/// handed in run on its loop, in order (cheap to clone; `Send`).
#[derive(Clone)]
pub struct Connection {
    id: SessionId,
    index: usize,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("event_loop", &self.index)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The connection's session id (its handler's [`Session::id`]).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Whether the connection has ended (its handler was told `on_close`).
    pub fn is_ended(&self) -> bool {
        self.flow.lock().ended
    }

    /// Queues `data` for the peer, as its handler's [`Session::send_bytes`] would. **Waits**
    /// while the connection is backlogged (see the module docs): never call it on a loop
    /// thread. Fails once the connection has ended (bytes handed in before may be lost with
    /// it).
    pub fn send(&self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let data = data.into();
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        let budget = self.shared.send_budget;
        self.flow.reserve(len, budget).map_err(|()| self.ended())?;
        let flow = Arc::clone(&self.flow);
        self.deliver(Box::new(move |session: &mut Session<'_>| {
            flow.delivered(len);
            session.send_bytes(data);
            if session.is_backlogged() {
                flow.lock().blocked = true;
                session.notify_when_drained();
            }
        }))
    }

    /// Runs `call` on the connection's loop with its [`Session`] (after what was handed in
    /// before); dropped if the connection has ended by then. Waits only while the loop's
    /// command channel is full: never call it on a loop thread.
    pub fn run(
        &self,
        call: impl FnOnce(&mut Session<'_>) + Send + 'static,
    ) -> Result<(), ClientError> {
        if self.is_ended() {
            return Err(self.ended());
        }
        let flow = Arc::clone(&self.flow);
        self.deliver(Box::new(move |session: &mut Session<'_>| {
            flow.for_handler(session, call);
        }))
    }

    /// Half-closes the connection once what was handed in before is written
    /// ([`Session::finish`]).
    pub fn finish(&self) -> Result<(), ClientError> {
        self.run(|session| session.finish())
    }

    /// Closes the connection once what was handed in before is written ([`Session::close`]).
    pub fn close(&self) -> Result<(), ClientError> {
        self.run(|session| session.close())
    }

    fn deliver(&self, call: crate::event_loop::Delivery) -> Result<(), ClientError> {
        let Some(handle) = self.shared.loops.get(self.index) else {
            return Err(ClientError::Stopped);
        };
        handle
            .send_waiting(Command::Deliver(self.id, call))
            .map_err(|_| ClientError::Stopped)
    }

    fn ended(&self) -> ClientError {
        match self.shared.live.stopped.load(Ordering::Acquire) {
            true => ClientError::Stopped,
            false => ClientError::Ended(self.id),
        }
    }
}

/// A connection's flow control between [`Connection::send`] and its loop.
#[derive(Default)]
struct Flow {
    state: Mutex<FlowState>,
    room: Condvar,
    /// The handler (or a [`Connection::run`] closure) asked for `on_drain` itself: the next
    /// one is passed on to it (the flow control's own requests are not).
    handler_drain: AtomicBool,
}

#[derive(Default)]
struct FlowState {
    /// Bytes handed in by `send` that the loop has not queued yet.
    in_flight: usize,
    /// The session's outbound queue passed the high watermark; cleared by its `on_drain`.
    blocked: bool,
    ended: bool,
}

impl Flow {
    fn lock(&self) -> MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for room, then counts `len` more bytes in flight; `Err` once the connection ended.
    fn reserve(&self, len: usize, budget: usize) -> Result<(), ()> {
        let mut state = self.lock();
        while !state.ended && (state.blocked || state.in_flight > budget) {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.ended {
            return Err(());
        }
        state.in_flight = state.in_flight.saturating_add(len);
        Ok(())
    }

    fn delivered(&self, len: usize) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(len);
        self.room.notify_all();
    }

    fn unblock(&self) {
        let mut state = self.lock();
        if state.blocked {
            state.blocked = false;
            self.room.notify_all();
        }
    }

    fn end(&self) {
        self.lock().ended = true;
        self.room.notify_all();
    }

    /// Runs `call` (the handler, or a closure standing in for it) and notes whether it asked
    /// for `on_drain`, keeping a request made before.
    fn for_handler<R>(
        &self,
        session: &mut Session<'_>,
        call: impl FnOnce(&mut Session<'_>) -> R,
    ) -> R {
        let asked_before = std::mem::replace(session.drain_wanted, false);
        let result = call(session);
        if *session.drain_wanted {
            self.handler_drain.store(true, Ordering::Relaxed);
        }
        *session.drain_wanted |= asked_before;
        result
    }
}

/// The handler a client connection has on its loop: the user's, plus the flow control of its
/// [`Connection`] and the runtime's count of open connections.
struct ClientHandler {
    inner: Box<dyn SessionHandler>,
    flow: Arc<Flow>,
    live: Arc<Liveness>,
}

impl SessionHandler for ClientHandler {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let inner = &mut self.inner;
        self.flow
            .for_handler(session, |session| inner.on_data(session, data));
    }

    fn on_timer(&mut self, session: &mut Session<'_>) {
        let inner = &mut self.inner;
        self.flow
            .for_handler(session, |session| inner.on_timer(session));
    }

    fn on_drain(&mut self, session: &mut Session<'_>) {
        self.flow.unblock();
        if self.flow.handler_drain.swap(false, Ordering::Relaxed) {
            let inner = &mut self.inner;
            self.flow
                .for_handler(session, |session| inner.on_drain(session));
        }
    }

    fn on_server_drain(&mut self, session: &mut Session<'_>) {
        let inner = &mut self.inner;
        self.flow
            .for_handler(session, |session| inner.on_server_drain(session));
    }

    fn on_close(&mut self, info: &SessionInfo, reason: &CloseReason) {
        self.flow.end();
        self.inner.on_close(info, reason);
    }

    fn on_link(&mut self, session: &mut Session<'_>, event: LinkEvent) {
        let inner = &mut self.inner;
        self.flow
            .for_handler(session, |session| inner.on_link(session, event));
    }

    fn on_eof(&mut self, session: &mut Session<'_>) {
        let inner = &mut self.inner;
        self.flow
            .for_handler(session, |session| inner.on_eof(session));
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        self.flow.end();
        if self.live.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.live.waker.wake();
        }
    }
}
