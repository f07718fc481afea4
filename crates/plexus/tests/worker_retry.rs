//! A job that finds the worker pool's queue full is retried by its own loop, without waiting
//! for a completion on that loop, and a session whose job cannot be queued within
//! `idle_timeout` is closed with a clear reason instead of hanging on to its place for ever.
//!
//! Setup (one worker, a pool queue of one, two loops; sessions 1 and 3 placed on loop 0, 2 and 4
//! on loop 1, see `plexus_testkit::sessions_on_loops`): session 1 (loop 0) holds the only
//! worker, session 3 (loop 0) fills the queue, session 4 (loop 1) finds it full.
//! Every completion then goes to loop 0: loop 1 never hears of one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use plexus::{Config, Reply, Server, ServerHandle, Service, Session, SessionHandler};
use plexus_proto::LineFramer;
use plexus_testkit::sessions_on_loops;

const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Released by the test: `hold` jobs wait for it.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl Gate {
    fn hold(&self) {
        let mut state = self.state.lock().unwrap();
        state.1 += 1;
        self.changed.notify_all();
        while !state.0 {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn wait_held(&self, count: usize) {
        let mut state = self.state.lock().unwrap();
        while state.1 < count {
            let (next, timeout) = self
                .changed
                .wait_timeout(state, Duration::from_secs(20))
                .unwrap();
            assert!(!timeout.timed_out(), "the hold job never started");
            state = next;
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().0 = true;
        self.changed.notify_all();
    }
}

/// Every line becomes a blocking job answering the line; `hold` first waits for the gate.
struct Jobs(Arc<Gate>);
struct JobsSession {
    gate: Arc<Gate>,
    lines: LineFramer,
}

impl Service for Jobs {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(JobsSession {
            gate: Arc::clone(&self.0),
            lines: LineFramer::new(4096),
        })
    }
}

impl SessionHandler for JobsSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let mut lines = Vec::new();
        let _ = self.lines.push(data, |line| lines.push(line.to_vec()));
        for line in lines {
            let gate = Arc::clone(&self.gate);
            session.spawn_blocking(move |reply: &mut Reply| {
                if line == b"hold\n" {
                    gate.hold();
                }
                reply.send(&line);
            });
        }
    }
}

struct Running {
    addr: SocketAddr,
    handle: ServerHandle,
    gate: Arc<Gate>,
    thread: Option<thread::JoinHandle<Result<(), plexus::Error>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gate.release();
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start(idle_timeout: &str) -> Running {
    let text = format!(
        "[server]\nevent_loops = 2\nworkers = 1\nworker_queue = 1\nidle_timeout = \"{idle_timeout}\"\n\
         [[listener]]\nname = \"jobs\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"jobs\"\n"
    );
    let config = Config::parse(&text, "test").unwrap();
    let gate = Arc::new(Gate::default());
    let server = Server::builder(config)
        .service("jobs", Jobs(Arc::clone(&gate)))
        .build()
        .unwrap();
    let addr = server.local_addr("jobs").unwrap();
    let handle = server.handle();
    let thread = Some(thread::spawn(move || server.run()));
    Running {
        addr,
        handle,
        gate,
        thread,
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn read_line(stream: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

/// Fills the pool (worker held, queue full) so that session 4 (loop 1) finds it full.
fn fill_the_pool(server: &Running) -> [TcpStream; 4] {
    let placed = sessions_on_loops(&server.handle, server.addr, &[2, 2], READ_TIMEOUT);
    let [on_0, on_1]: [Vec<TcpStream>; 2] = placed.try_into().expect("two loops");
    let [mut first, mut third]: [TcpStream; 2] = on_0.try_into().expect("two on loop 0");
    let [second, mut fourth]: [TcpStream; 2] = on_1.try_into().expect("two on loop 1");
    first.write_all(b"hold\n").unwrap();
    server.gate.wait_held(1);
    third.write_all(b"fill\n").unwrap();
    wait_until("the queue to fill", || {
        server.handle.metrics().jobs_queued == 1
    });
    fourth.write_all(b"waits\n").unwrap();
    [first, second, third, fourth]
}

#[test]
fn a_job_refused_for_a_full_queue_is_retried_without_a_completion_on_its_loop() {
    let server = start("60s");
    let [first, _second, third, fourth] = fill_the_pool(&server);
    // Give session 4's job time to be refused (the queue is full until the gate opens).
    thread::sleep(Duration::from_millis(200));
    server.gate.release();
    assert_eq!(read_line(&first), "hold\n");
    assert_eq!(read_line(&third), "fill\n");
    assert_eq!(
        read_line(&fourth),
        "waits\n",
        "the job that found the queue full ran once there was room"
    );
    assert_eq!(server.handle.metrics().closed_worker_pool_full, 0);
}

#[test]
fn a_session_whose_job_cannot_be_queued_within_idle_timeout_is_closed() {
    let server = start("1s");
    let [first, _second, _third, mut fourth] = fill_the_pool(&server);
    let mut rest = Vec::new();
    let closed = fourth.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "session 4 was closed, with nothing sent: {closed:?} {rest:?}"
    );
    assert_eq!(server.handle.metrics().closed_worker_pool_full, 1);
    server.gate.release();
    assert_eq!(read_line(&first), "hold\n", "the others go on");
}
