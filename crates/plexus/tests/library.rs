//! The library API end to end: a custom service registered on the builder, served on a real
//! loopback socket, stopped through a `ServerHandle`, observed through metrics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use plexus::{Config, RefusalReason, Server, Service, Session, SessionHandler};
use plexus_testkit::sessions_per_loop;

/// Replies to every chunk with its length in decimal and a newline.
struct Count;
struct CountSession;

impl Service for Count {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(CountSession)
    }
}

impl SessionHandler for CountSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        if data.starts_with(b"bye") {
            session.close();
        } else {
            session.send(format!("{}\n", data.len()).as_bytes());
        }
    }
}

fn config(extra: &str) -> Config {
    let text = format!(
        "[server]\nevent_loops = 2\n{extra}\n[[listener]]\nname = \"count\"\ntransport = \"tcp\"\n\
         addr = \"127.0.0.1:0\"\nservice = \"count\"\n"
    );
    Config::parse(&text, "test").unwrap()
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A running server: the address of its listener, its handle, its thread.
type Running = (
    std::net::SocketAddr,
    plexus::ServerHandle,
    thread::JoinHandle<Result<(), plexus::Error>>,
);

/// A server of `config` with `service` registered as `name` (also the listener's name),
/// running on its own thread.
fn start(config: Config, name: &str, service: impl Service) -> Running {
    let server = Server::builder(config)
        .service(name, service)
        .build()
        .unwrap();
    let addr = server.local_addr(name).unwrap();
    let handle = server.handle();
    (addr, handle, thread::spawn(move || server.run()))
}

/// A server of `Count` on [`config`] without extras, running on its own thread.
fn start_counting() -> Running {
    start(config(""), "count", Count)
}

#[test]
fn custom_service_serves_and_stops_through_its_handle() {
    let (addr, handle, running) = start_counting();

    let mut stream = connect(addr);
    stream.write_all(b"12345").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "5\n");

    // close() from the service: the peer sees EOF.
    stream.write_all(b"bye").unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let metrics = handle.metrics();
    assert_eq!(metrics.accepted, 1);
    assert_eq!(metrics.bytes_in, 8);
    assert_eq!(metrics.bytes_out, 2);

    handle.shutdown();
    running.join().unwrap().unwrap();
}

#[test]
fn refusals_are_counted_by_reason() {
    let limits = config("max_connections = 1\n[acl]\ndeny = [\"127.0.0.9\"]");
    let (addr, handle, running) = start(limits, "count", Count);

    let mut first = connect(addr);
    first.write_all(b"abc").unwrap();
    let mut buf = [0u8; 8];
    let n = first.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"3\n");

    let mut second = connect(addr);
    let refused = matches!(second.read(&mut buf), Ok(0) | Err(_));
    assert!(refused, "the second connection is over max_connections");

    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.9:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let mut denied: TcpStream = socket.into();
    denied
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(matches!(denied.read(&mut buf), Ok(0) | Err(_)));

    let metrics = handle.metrics();
    assert_eq!(metrics.refused(RefusalReason::MaxConnections), 1);
    assert_eq!(metrics.refused(RefusalReason::Acl), 1);
    assert_eq!(metrics.accepted, 1);
    handle.stop();
    running.join().unwrap().unwrap();
}

/// The loop the kernel wakes for a connection keeps it unless it has clearly more sessions than
/// the least loaded one (32 more, and a quarter more): long-lived sessions opened one by one on
/// a quiet server end up on both loops, within that margin, and every one is served.
#[test]
fn long_lived_sessions_spread_over_the_loops_within_the_margin() {
    const SESSIONS: u64 = 100;
    let (addr, handle, running) = start_counting();
    let mut streams = Vec::new();
    for opened in 1..=SESSIONS {
        streams.push(connect(addr));
        sessions_per_loop(&handle, opened);
    }
    let per_loop = sessions_per_loop(&handle, SESSIONS);
    let (most, least) = (per_loop.iter().max(), per_loop.iter().min());
    let spread = most.zip(least).map(|(most, least)| most - least);
    assert!(spread.is_some_and(|spread| spread <= 33), "{per_loop:?}");
    let passed_on: u64 = handle
        .metrics()
        .event_loops
        .iter()
        .map(|l| l.sessions_passed_on)
        .sum();
    for (at, stream) in streams.iter_mut().enumerate() {
        let message = vec![b'x'; at % 7 + 1];
        stream.write_all(&message).unwrap();
        let mut line = String::new();
        BufReader::new(&*stream).read_line(&mut line).unwrap();
        assert_eq!(line, format!("{}\n", message.len()), "session {at}");
    }
    println!("sessions per loop {per_loop:?}, passed on {passed_on}");
    handle.stop();
    running.join().unwrap().unwrap();
}

#[test]
fn unknown_service_is_a_config_error_naming_the_key() {
    let err = Server::builder(config(""))
        .build()
        .err()
        .expect("count is not registered");
    let text = err.to_string();
    assert!(text.contains("listener[0].service"), "{text}");
    assert!(text.contains("'count'"), "{text}");
}

/// Answers every chunk with its event loop's tag and how many bytes that loop has received in
/// all (`"<tag> <total>\n"`), both kept in `LoopLocal`s (one per loop, no lock): the tag is
/// drawn from a shared counter by the loop's first session.
struct PerLoop {
    total: plexus::LoopLocal<u64>,
    tag: plexus::LoopLocal<u64>,
    tags: Arc<AtomicU64>,
}
struct PerLoopSession {
    total: plexus::LoopLocal<u64>,
    tag: plexus::LoopLocal<u64>,
    tags: Arc<AtomicU64>,
}

impl Service for PerLoop {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(PerLoopSession {
            total: self.total.clone(),
            tag: self.tag.clone(),
            tags: Arc::clone(&self.tags),
        })
    }
}

impl SessionHandler for PerLoopSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let tag = session.loop_local(&self.tag);
        if *tag == 0 {
            *tag = self.tags.fetch_add(1, Ordering::Relaxed) + 1;
        }
        let tag = *tag;
        let total = session.loop_local(&self.total);
        *total += data.len() as u64;
        let line = format!("{tag} {total}\n");
        session.send(line.as_bytes());
    }
}

#[test]
fn loop_local_state_is_shared_by_the_sessions_of_one_loop_only() {
    let text = "[server]\nevent_loops = 2\n[[listener]]\nname = \"count\"\ntransport = \"tcp\"\n\
                addr = \"127.0.0.1:0\"\nservice = \"count\"\n";
    let per_loop = PerLoop {
        total: plexus::LoopLocal::new(),
        tag: plexus::LoopLocal::new(),
        tags: Arc::new(AtomicU64::new(0)),
    };
    let (addr, handle, running) = start(Config::parse(text, "test").unwrap(), "count", per_loop);
    struct Member {
        stream: TcpStream,
        reader: BufReader<TcpStream>,
        tag: u64,
    }
    let ask = |member: &mut Member, data: &[u8]| -> (u64, u64) {
        member.stream.write_all(data).unwrap();
        let mut line = String::new();
        member.reader.read_line(&mut line).unwrap();
        let (tag, total) = line.trim().split_once(' ').expect("<tag> <total>");
        (tag.parse().unwrap(), total.parse().unwrap())
    };
    // Sessions open one by one (one byte each) until both loops have some: where a new one
    // goes is the loops' business (docs/ARCHITECTURE.md, "Accepting on the loops").
    let mut members: Vec<Member> = Vec::new();
    let mut bytes_per_tag = std::collections::BTreeMap::<u64, u64>::new();
    while bytes_per_tag.len() < 2 {
        assert!(members.len() < 200, "200 sessions and all on one loop");
        let stream = connect(addr);
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut member = Member {
            stream,
            reader,
            tag: 0,
        };
        let (tag, total) = ask(&mut member, b"1");
        let bytes = bytes_per_tag.entry(tag).or_default();
        *bytes += 1;
        assert_eq!(
            total, *bytes,
            "loop {tag} counts the bytes of its own sessions"
        );
        member.tag = tag;
        members.push(member);
    }
    // Every session sees its own loop's counter grow, never the other loop's.
    for member in &mut members {
        let (tag, total) = ask(member, b"12");
        assert_eq!(tag, member.tag, "a session stays on its loop");
        let bytes = bytes_per_tag.get_mut(&tag).unwrap();
        *bytes += 2;
        assert_eq!(
            total, *bytes,
            "loop {tag}'s counter after a session of it added 2"
        );
    }
    assert_eq!(
        bytes_per_tag.values().sum::<u64>(),
        3 * members.len() as u64,
        "{bytes_per_tag:?}"
    );
    handle.stop();
    running.join().unwrap().unwrap();
}

/// Sends [`UNSENT_PROBE`] bytes when a session opens, then answers every chunk with what
/// `Session::queued` says.
struct Bulk;
struct BulkSession;

/// Taken whole by one io_uring send (at most 1 MiB), and more than a small socket buffer and a
/// client that does not read can hold.
const UNSENT_PROBE: usize = 256 * 1024;

impl Service for Bulk {
    fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
        session.send(&vec![b'x'; UNSENT_PROBE]);
        Box::new(BulkSession)
    }
}

impl SessionHandler for BulkSession {
    fn on_data(&mut self, session: &mut Session<'_>, _: &[u8]) {
        session.send(format!("\n{}\n", session.queued()).as_bytes());
    }
}

/// Bytes the socket has taken but not written count as queued: on io_uring a session's send
/// holds them in user space (up to 1 MiB per session) as the outbound queue would, so the
/// watermarks and `Session::queued` must see them — on epoll they are the queue's.
#[test]
fn bytes_the_socket_has_not_written_yet_count_as_queued_on_both_backends() {
    let text = "[server]\nevent_loops = 1\n[[listener]]\nname = \"bulk\"\ntransport = \"tcp\"\n\
                addr = \"127.0.0.1:0\"\nservice = \"bulk\"\nsend_buffer = 16384\n";
    let (addr, handle, running) = start(Config::parse(text, "test").unwrap(), "bulk", Bulk);
    let mut client = connect(addr);
    // Not read yet: the server's small send buffer and the client's receive buffer hold far
    // less than the probe, so most of it waits in the server.
    thread::sleep(Duration::from_millis(200));
    client.write_all(b"?").unwrap();
    let mut everything = Vec::new();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    reader
        .read_until(b'\n', &mut everything)
        .expect("the probe and the first answer");
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    assert_eq!(
        everything.len(),
        UNSENT_PROBE + 1,
        "the probe, then the answer"
    );
    let queued: usize = answer.trim().parse().unwrap();
    assert!(
        queued >= 64 * 1024,
        "most of the probe was still in the server when the client spoke, yet queued() = {queued}"
    );
    // Everything read: nothing is on its way any more.
    client.write_all(b"?").unwrap();
    let mut blank = String::new();
    reader.read_line(&mut blank).unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    assert_eq!((blank.as_str(), answer.trim()), ("\n", "0"));
    handle.stop();
    running.join().unwrap().unwrap();
}

/// `hold` keeps the loop busy for a while (so that the next messages arrive together), `fast`
/// is answered at once, `slow` after a while of work; each answer is `ok`. Counts the `slow`
/// callbacks that finished.
struct Stall {
    slow_done: Arc<AtomicU64>,
}
struct StallSession {
    slow_done: Arc<AtomicU64>,
}

impl Service for Stall {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(StallSession {
            slow_done: Arc::clone(&self.slow_done),
        })
    }
}

impl SessionHandler for StallSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        match data {
            b"hold" => thread::sleep(Duration::from_millis(300)),
            b"slow" => {
                thread::sleep(Duration::from_millis(100));
                self.slow_done.fetch_add(1, Ordering::SeqCst);
                session.send(b"ok");
            }
            _ => session.send(b"ok"),
        }
    }
}

/// A turn of expensive callbacks does not hold back the replies of the sessions it served
/// first: on io_uring, where a turn's sends go to the kernel with the loop's next wait, the
/// loop submits them once it has been busy for a while (TLS handshakes: 16 at ~200 µs each
/// would delay the first reply by the whole batch, and the clients idle meanwhile). The first
/// client's reply arrives while later sessions of the same batch are still being served.
#[test]
fn replies_go_out_while_the_loop_is_still_busy_with_the_rest_of_its_batch() {
    let slow_done = Arc::new(AtomicU64::new(0));
    let text = "[server]\nevent_loops = 1\n[[listener]]\nname = \"stall\"\ntransport = \"tcp\"\n\
                addr = \"127.0.0.1:0\"\nservice = \"stall\"\n";
    let stall = Stall {
        slow_done: Arc::clone(&slow_done),
    };
    let (addr, handle, running) = start(Config::parse(text, "test").unwrap(), "stall", stall);
    let mut holder = connect(addr);
    let mut fast = connect(addr);
    let mut slow: Vec<TcpStream> = (0..4).map(|_| connect(addr)).collect();
    // Every session open (answered once) before the batch is made.
    for client in std::iter::once(&mut fast).chain(slow.iter_mut()) {
        client.write_all(b"ping").unwrap();
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).unwrap();
    }
    // While the loop holds, the fast message and then the slow ones arrive: one batch.
    holder.write_all(b"hold").unwrap();
    thread::sleep(Duration::from_millis(50));
    fast.write_all(b"fast").unwrap();
    for client in &mut slow {
        thread::sleep(Duration::from_millis(5));
        client.write_all(b"slow").unwrap();
    }
    let mut ok = [0u8; 2];
    fast.read_exact(&mut ok).unwrap();
    let finished = slow_done.load(Ordering::SeqCst);
    assert!(
        finished < 4,
        "the fast reply came only after the loop had served the whole batch ({finished} of 4 \
         slow callbacks done)"
    );
    for client in &mut slow {
        client.read_exact(&mut ok).unwrap();
    }
    handle.stop();
    running.join().unwrap().unwrap();
}
