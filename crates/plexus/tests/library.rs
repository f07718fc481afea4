//! The library API end to end: a custom service registered on the builder, served on a real
//! loopback socket, stopped through a `ServerHandle`, observed through metrics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use plexus::{Config, RefusalReason, Server, Service, Session, SessionHandler};

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

#[test]
fn custom_service_serves_and_stops_through_its_handle() {
    let server = Server::builder(config(""))
        .service("count", Count)
        .build()
        .unwrap();
    let addr = server.local_addr("count").unwrap();
    let handle = server.handle();
    let running = thread::spawn(move || server.run());

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
    let server = Server::builder(config("max_connections = 1\n[acl]\ndeny = [\"127.0.0.9\"]"))
        .service("count", Count)
        .build()
        .unwrap();
    let addr = server.local_addr("count").unwrap();
    let handle = server.handle();
    let running = thread::spawn(move || server.run());

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

/// Answers every chunk with how many bytes its event loop has received in all, kept in a
/// `LoopLocal` (one counter per loop, no lock).
struct PerLoop {
    total: plexus::LoopLocal<u64>,
}
struct PerLoopSession {
    total: plexus::LoopLocal<u64>,
}

impl Service for PerLoop {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(PerLoopSession {
            total: self.total.clone(),
        })
    }
}

impl SessionHandler for PerLoopSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let total = session.loop_local(&self.total);
        *total += data.len() as u64;
        let line = format!("{total}\n");
        session.send(line.as_bytes());
    }
}

#[test]
fn loop_local_state_is_shared_by_the_sessions_of_one_loop_only() {
    let text = "[server]\nevent_loops = 2\n[[listener]]\nname = \"count\"\ntransport = \"tcp\"\n\
                addr = \"127.0.0.1:0\"\nservice = \"count\"\n";
    let server = Server::builder(Config::parse(text, "test").unwrap())
        .service(
            "count",
            PerLoop {
                total: plexus::LoopLocal::new(),
            },
        )
        .build()
        .unwrap();
    let addr = server.local_addr("count").unwrap();
    let handle = server.handle();
    let running = thread::spawn(move || server.run());
    let ask = |stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, data: &[u8]| {
        stream.write_all(data).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim().parse::<u64>().unwrap()
    };
    // New sessions go to the loop with the fewest: a and b land on different loops, c on
    // a's loop once b's loop has more sessions than a's.
    let mut a = connect(addr);
    let mut a_reader = BufReader::new(a.try_clone().unwrap());
    assert_eq!(ask(&mut a, &mut a_reader, b"1234"), 4);
    let mut b = connect(addr);
    let mut b_reader = BufReader::new(b.try_clone().unwrap());
    assert_eq!(
        ask(&mut b, &mut b_reader, b"12"),
        2,
        "b's loop starts from zero"
    );
    let mut b2 = connect(addr);
    let mut b2_reader = BufReader::new(b2.try_clone().unwrap());
    let third = ask(&mut b2, &mut b2_reader, b"1");
    // The third session shares a counter with a (5) or with b (3), never a fresh one.
    assert!(third == 5 || third == 3, "{third}");
    // Each loop's counter has every byte of its sessions: 4 + 1 + 2 + 1 + 1 in all.
    let (a_total, b_total) = (
        ask(&mut a, &mut a_reader, b"1"),
        ask(&mut b, &mut b_reader, b"1"),
    );
    assert_eq!(a_total + b_total, 9, "{a_total} + {b_total}");
    assert_eq!(
        a_total == 6,
        third == 5,
        "the third session's loop counted its byte"
    );
    handle.stop();
    running.join().unwrap().unwrap();
}
