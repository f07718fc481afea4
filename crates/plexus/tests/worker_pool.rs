//! The worker pool through the public API: per-session order with several workers, bounded
//! queues under a flood, and panics that close only their own session.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use plexus::{Config, Reply, Server, ServerHandle, Service, Session, SessionHandler};
use plexus_proto::LineFramer;

/// Each line becomes a blocking job that echoes the line; lines starting with `s` first sleep
/// 0–3 ms (derived from the line, so jobs finish out of order across workers). `boom` panics in
/// the job, `inline-boom` in the handler.
struct Jobs;
struct JobsSession {
    lines: LineFramer,
}

impl Service for Jobs {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(JobsSession {
            lines: LineFramer::new(4096),
        })
    }
}

impl SessionHandler for JobsSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let mut lines = Vec::new();
        self.lines
            .push(data, |line| lines.push(line.to_vec()))
            .expect("short lines");
        for line in lines {
            assert!(
                line != b"inline-boom\n",
                "inline handler panic (on purpose)"
            );
            session.spawn_blocking(move |reply: &mut Reply| {
                assert!(line != b"boom\n", "blocking job panic (on purpose)");
                if line.starts_with(b"s") {
                    let delay = line.iter().map(|b| u64::from(*b)).sum::<u64>() % 4;
                    thread::sleep(Duration::from_millis(delay));
                }
                reply.send(&line);
            });
        }
    }
}

struct Running {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<thread::JoinHandle<Result<(), plexus::Error>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start(server_settings: &str) -> Running {
    let text = format!(
        "[server]\nevent_loops = 2\n{server_settings}\n[[listener]]\nname = \"jobs\"\n\
         transport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"jobs\"\n"
    );
    let config = Config::parse(&text, "test").unwrap();
    let server = Server::builder(config)
        .service("jobs", Jobs)
        .build()
        .unwrap();
    let addr = server.local_addr("jobs").unwrap();
    let handle = server.handle();
    let thread = Some(thread::spawn(move || server.run()));
    Running {
        addr,
        handle,
        thread,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

fn read_lines(stream: &TcpStream, count: usize) -> Vec<String> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    (0..count)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            line
        })
        .collect()
}

#[test]
fn pipelined_jobs_come_back_in_order_for_many_sessions() {
    let server = start("workers = 4");
    let sessions: Vec<TcpStream> = (0..100).map(|_| connect(server.addr)).collect();
    for (index, mut stream) in sessions.iter().enumerate() {
        let batch: String = (0..20)
            .map(|request| format!("s{index} r{request}\n"))
            .collect();
        stream.write_all(batch.as_bytes()).unwrap();
    }
    for (index, stream) in sessions.iter().enumerate() {
        let expected: Vec<String> = (0..20)
            .map(|request| format!("s{index} r{request}\n"))
            .collect();
        assert_eq!(read_lines(stream, 20), expected, "session {index}");
    }
    let metrics = server.handle.metrics();
    assert_eq!(metrics.jobs_completed, 2000);
    assert_eq!(metrics.job_panics, 0);
}

#[test]
fn a_flood_keeps_the_pool_queue_bounded_and_others_served() {
    let server = start("workers = 1\nworker_queue = 4");
    let flood = connect(server.addr);
    let lines = 100_000;
    let writer = {
        let mut flood = flood.try_clone().unwrap();
        thread::spawn(move || {
            let batch: String = (0..lines).map(|i| format!("{i}\n")).collect();
            flood.write_all(batch.as_bytes()).unwrap();
        })
    };
    let mut deepest = 0;
    let mut other = connect(server.addr);
    other.write_all(b"other\n").unwrap();
    let other_reply = read_lines(&other, 1);
    assert_eq!(
        other_reply,
        ["other\n"],
        "another session is served during the flood"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let reader = {
        let flood = flood.try_clone().unwrap();
        thread::spawn(move || read_lines(&flood, lines))
    };
    while !reader.is_finished() && Instant::now() < deadline {
        deepest = deepest.max(server.handle.metrics().jobs_queued);
        thread::sleep(Duration::from_millis(5));
    }
    let replies = reader.join().unwrap();
    writer.join().unwrap();
    assert!(
        replies
            .iter()
            .enumerate()
            .all(|(i, line)| *line == format!("{i}\n")),
        "in order"
    );
    assert!(
        deepest <= 4,
        "the pool queue stayed within worker_queue: deepest {deepest}"
    );
    assert!(
        server.handle.metrics().read_pauses > 0,
        "the flooding session stopped being read"
    );
}

#[test]
fn too_many_queued_jobs_close_only_that_session() {
    let server = start("workers = 1\nworker_session_limit = 8");
    let mut greedy = connect(server.addr);
    let batch: String = (0..50).map(|i| format!("{i}\n")).collect();
    greedy.write_all(batch.as_bytes()).unwrap();
    let mut everything = Vec::new();
    let _ = greedy.read_to_end(&mut everything);
    assert!(
        everything.len() < batch.len(),
        "the session was closed before all its jobs ran"
    );
    let mut polite = connect(server.addr);
    polite.write_all(b"fine\n").unwrap();
    assert_eq!(read_lines(&polite, 1), ["fine\n"]);
}

#[test]
fn panics_close_only_their_own_session() {
    let server = start("workers = 2");
    let mut bystander = connect(server.addr);
    let mut job_panic = connect(server.addr);
    let mut inline_panic = connect(server.addr);
    job_panic.write_all(b"before\nboom\nafter\n").unwrap();
    assert_eq!(read_lines(&job_panic, 1), ["before\n"]);
    let mut rest = Vec::new();
    let _ = job_panic.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing after the panicking job: {rest:?}");

    inline_panic.write_all(b"inline-boom\n").unwrap();
    let mut rest = Vec::new();
    let _ = inline_panic.read_to_end(&mut rest);
    assert!(rest.is_empty());

    bystander.write_all(b"still here\n").unwrap();
    assert_eq!(read_lines(&bystander, 1), ["still here\n"]);
    let metrics = server.handle.metrics();
    assert_eq!(metrics.job_panics, 1);
    assert_eq!(metrics.handler_panics, 1);
}
