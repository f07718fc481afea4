//! The test harness itself (`plexus::testing`, feature `testing`): each test drives a tiny
//! service through one feature of the in-memory session and checks what the runtime would do.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexus::testing::Harness;
use plexus::{CloseReason, Service, Session, SessionHandler, SessionInfo};

/// A service built from closures, so each test states only the behaviour it checks.
struct Tiny<F: Fn() -> Box<dyn SessionHandler> + Send + Sync + 'static>(F);

impl<F: Fn() -> Box<dyn SessionHandler> + Send + Sync + 'static> Service for Tiny<F> {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        (self.0)()
    }
}

/// Sets a timer on each `on_data` (the bytes are its length in ms), counts its firings.
struct Alarm {
    fired: Arc<AtomicUsize>,
}

impl SessionHandler for Alarm {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        match data {
            b"cancel" => session.cancel_timer(),
            _ => {
                let ms: u64 = std::str::from_utf8(data).unwrap().parse().unwrap();
                session.set_timer(Duration::from_millis(ms));
            }
        }
    }
    fn on_timer(&mut self, session: &mut Session<'_>) {
        self.fired.fetch_add(1, Ordering::SeqCst);
        session.send(b"tick");
    }
}

fn alarm() -> (Harness, Arc<AtomicUsize>) {
    let fired = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fired);
    let h = Harness::new(Tiny(move || {
        Box::new(Alarm {
            fired: Arc::clone(&counter),
        })
    }));
    (h, fired)
}

#[test]
fn a_timer_fires_at_its_deadline_on_the_fake_clock_and_not_before() {
    let (mut h, fired) = alarm();
    let start = h.now();
    h.receive(b"250");
    assert_eq!(h.timer_deadline(), Some(start + Duration::from_millis(250)));
    h.advance(Duration::from_millis(249));
    assert_eq!(fired.load(Ordering::SeqCst), 0, "fired early");
    assert!(h.take_sent().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    assert_eq!(h.take_sent(), b"tick");
    assert_eq!(h.timer_deadline(), None);
    h.advance(Duration::from_secs(5));
    assert_eq!(fired.load(Ordering::SeqCst), 1, "a timer fires once");
    assert_eq!(h.now(), start + Duration::from_millis(5250));
}

#[test]
fn a_new_deadline_replaces_the_old_one_and_cancel_disarms_it() {
    let (mut h, fired) = alarm();
    h.receive(b"100");
    h.advance(Duration::from_millis(50));
    h.receive(b"100"); // now due at 150 ms
    h.advance(Duration::from_millis(99));
    assert_eq!(fired.load(Ordering::SeqCst), 0);
    h.advance(Duration::from_millis(1));
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    h.receive(b"10");
    h.receive(b"cancel");
    assert_eq!(h.timer_deadline(), None);
    h.advance(Duration::from_secs(1));
    assert_eq!(fired.load(Ordering::SeqCst), 1, "cancelled");
}

#[test]
fn an_idle_session_closes_after_idle_timeout_of_fake_time() {
    let mut h = Harness::builder(Tiny(|| Box::new(Sink)))
        .idle_timeout(Duration::from_secs(30))
        .open();
    h.advance(Duration::from_secs(20));
    h.receive(b"x"); // a byte moved: the 30 s start again
    h.advance(Duration::from_secs(29));
    assert_eq!(h.closed(), None);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.closed(), Some(&CloseReason::IdleTimeout));
}

/// Ignores what it gets.
struct Sink;

impl SessionHandler for Sink {
    fn on_data(&mut self, _: &mut Session<'_>, _: &[u8]) {}
}

/// Sends `n` bytes for every byte received, and records how it ended.
struct Amplifier {
    factor: usize,
    ended: Arc<Mutex<Option<CloseReason>>>,
}

impl SessionHandler for Amplifier {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.send(&vec![b'a'; data.len() * self.factor]);
    }
    fn on_close(&mut self, _: &SessionInfo, reason: &CloseReason) {
        *self.ended.lock().unwrap() = Some(reason.clone());
    }
}

#[test]
fn passing_outbound_limit_closes_with_outbound_overflow_and_calls_on_close() {
    let ended = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&ended);
    let mut h = Harness::builder(Tiny(move || {
        Box::new(Amplifier {
            factor: 100,
            ended: Arc::clone(&seen),
        })
    }))
    .watermarks(1 << 20, 1 << 19)
    .outbound_limit(10_000)
    .open();
    h.receive(&[0; 50]); // 5,000 bytes queued: fits
    assert_eq!(h.queued(), 5_000);
    assert!(h.closed().is_none());
    h.receive(&[0; 50]); // 10,000 more would pass the limit: the peer is not reading
    assert_eq!(h.closed(), Some(&CloseReason::OutboundOverflow));
    assert_eq!(*ended.lock().unwrap(), Some(CloseReason::OutboundOverflow));
    assert!(
        h.take_sent().is_empty(),
        "the queue is dropped with the session"
    );
}

#[test]
fn reading_pauses_past_the_high_watermark_and_resumes_when_the_peer_reads() {
    let ended = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&ended);
    let mut h = Harness::builder(Tiny(move || {
        Box::new(Amplifier {
            factor: 1,
            ended: Arc::clone(&seen),
        })
    }))
    .watermarks(100_000, 10_000)
    .open();
    let input = vec![b'a'; 300_000];
    h.receive(&input);
    // Two 64 KiB reads pass 100,000 queued bytes; the rest waits in the "socket".
    assert_eq!(h.queued(), 2 * 65_536);
    assert_eq!(h.unread(), 300_000 - 2 * 65_536);
    let mut echoed = h.take_sent();
    while h.unread() > 0 || h.queued() > 0 {
        echoed.extend(h.take_sent());
    }
    assert!(echoed == input, "{} bytes back", echoed.len());
    h.close_by_peer();
    assert_eq!(h.closed(), Some(&CloseReason::PeerClosed));
    assert_eq!(*ended.lock().unwrap(), Some(CloseReason::PeerClosed));
}

/// Panics on "boom", or in a blocking job on "job".
struct Fragile;

impl SessionHandler for Fragile {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        match data {
            b"boom" => panic!("handler bug"),
            b"job" => session.spawn_blocking(|_| panic!("job bug")),
            other => session.send(other),
        }
    }
}

#[test]
fn a_panicking_handler_closes_its_session_with_panic() {
    let mut h = Harness::new(Tiny(|| Box::new(Fragile)));
    h.receive(b"ok");
    assert_eq!(h.take_sent(), b"ok");
    h.receive(b"boom");
    assert_eq!(h.closed(), Some(&CloseReason::Panic));
    h.receive(b"after");
    assert!(h.take_sent().is_empty(), "a closed session reads nothing");
}

#[test]
fn a_panicking_job_closes_its_session_with_panic() {
    let mut h = Harness::new(Tiny(|| Box::new(Fragile)));
    h.receive(b"job");
    assert_eq!(h.pending_jobs(), 1);
    assert!(h.closed().is_none());
    assert_eq!(h.run_jobs(), 1);
    assert_eq!(h.closed(), Some(&CloseReason::Panic));
}

/// Answers each byte with a job that replies with it; "q" asks the job to close.
struct Jobs;

impl SessionHandler for Jobs {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        for &byte in data {
            session.spawn_blocking(move |reply| {
                reply.send(&[byte.to_ascii_uppercase()]);
                if byte == b'q' {
                    reply.close();
                }
            });
        }
    }
}

#[test]
fn jobs_run_on_demand_and_their_replies_arrive_in_order() {
    let mut h = Harness::new(Tiny(|| Box::new(Jobs)));
    h.receive(b"abc");
    assert_eq!(h.pending_jobs(), 3);
    assert!(h.take_sent().is_empty(), "nothing until the jobs ran");
    assert_eq!(h.run_jobs(), 3);
    assert_eq!(h.take_sent(), b"ABC");
    h.receive(b"xq");
    h.run_jobs();
    assert_eq!(
        h.closed(),
        None,
        "the close waits for the reply to be written"
    );
    assert!(h.is_closing());
    assert_eq!(h.take_sent(), b"XQ");
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}

#[test]
fn more_jobs_than_worker_session_limit_close_with_work_overflow() {
    let mut h = Harness::builder(Tiny(|| Box::new(Jobs)))
        .worker_session_limit(2)
        .open();
    h.receive(b"abc");
    assert_eq!(h.closed(), Some(&CloseReason::WorkOverflow));
}

/// Produces 10 KiB per call until backlogged, then waits for `on_drain`; 5 rounds in all.
struct Producer {
    rounds: usize,
}

impl Producer {
    fn produce(&mut self, session: &mut Session<'_>) {
        if self.rounds == 0 {
            session.close();
            return;
        }
        self.rounds -= 1;
        while !session.is_backlogged() {
            session.send(&[b'p'; 10_240]);
        }
        session.notify_when_drained();
    }
}

impl SessionHandler for Producer {
    fn on_data(&mut self, session: &mut Session<'_>, _: &[u8]) {
        self.produce(session);
    }
    fn on_drain(&mut self, session: &mut Session<'_>) {
        self.produce(session);
    }
}

#[test]
fn notify_when_drained_calls_on_drain_once_the_peer_has_read() {
    let mut h = Harness::builder(Tiny(|| Box::new(Producer { rounds: 5 })))
        .watermarks(50_000, 5_000)
        .open();
    h.receive(b"go");
    assert_eq!(h.queued(), 51_200, "produced until past the high watermark");
    let mut total = 0;
    let mut reads = 0;
    while h.closed().is_none() {
        let got = h.take_sent();
        assert!(got.iter().all(|&b| b == b'p'));
        total += got.len();
        reads += 1;
        assert!(reads <= 10, "runaway");
    }
    assert_eq!(total, 5 * 51_200);
    assert_eq!(reads, 5, "one on_drain per read of the queue");
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}

/// Sends a file region of what it is given: "offset len".
struct Files {
    file: Arc<File>,
}

impl SessionHandler for Files {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let text = std::str::from_utf8(data).unwrap();
        let (offset, len) = text.split_once(' ').unwrap();
        session.send(b"[");
        session.send_file(
            Arc::clone(&self.file),
            offset.parse().unwrap(),
            len.parse().unwrap(),
        );
        session.send(b"]");
    }
}

#[test]
fn send_file_regions_are_read_back_as_the_peer_sees_them() {
    let mut file = tempfile::tempfile().unwrap();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    file.write_all(&body).unwrap();
    let file = Arc::new(file);
    let mut h = Harness::new(Tiny(move || {
        Box::new(Files {
            file: Arc::clone(&file),
        })
    }));
    h.receive(b"1000 150000");
    assert_eq!(h.queued(), 150_002);
    let sent = h.take_sent();
    assert_eq!(sent[0], b'[');
    assert_eq!(&sent[1..150_001], &body[1000..151_000]);
    assert_eq!(sent[150_001], b']');
}

/// Broadcasts every line it gets.
struct Shout;

impl SessionHandler for Shout {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        session.broadcast(data);
    }
}

#[test]
fn broadcasts_are_captured_and_can_be_delivered_to_another_session() {
    let mut a = Harness::new(Tiny(|| Box::new(Shout)));
    let mut b = Harness::builder(Tiny(|| Box::new(Shout)))
        .outbound_limit(300)
        .open();
    a.receive(b"hello");
    let sent = a.take_broadcasts();
    assert_eq!(sent, vec![bytes::Bytes::from_static(b"hello")]);
    assert!(a.take_sent().is_empty(), "a broadcast skips its sender");
    for broadcast in sent {
        b.deliver_broadcast(broadcast);
    }
    assert_eq!(b.take_sent(), b"hello");
    // A member that does not read is closed once the next one would not fit.
    for _ in 0..5 {
        b.deliver_broadcast(bytes::Bytes::from(vec![b'x'; 100]));
    }
    assert_eq!(b.closed(), Some(&CloseReason::OutboundOverflow));
}

#[test]
fn a_requested_close_flushes_first_and_a_reset_drops_the_queue() {
    struct Bye;
    impl SessionHandler for Bye {
        fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
            session.send(data);
            if data == b"bye" {
                session.close();
            }
        }
    }
    let mut h = Harness::new(Tiny(|| Box::new(Bye)));
    h.receive(b"bye");
    assert!(h.is_closing());
    assert_eq!(h.closed(), None);
    h.receive(b"ignored");
    assert_eq!(h.take_sent(), b"bye");
    assert_eq!(h.closed(), Some(&CloseReason::Requested));

    let mut h = Harness::new(Tiny(|| Box::new(Bye)));
    h.receive(b"lost");
    h.reset_by_peer();
    assert_eq!(
        h.closed(),
        Some(&CloseReason::Io(std::io::ErrorKind::ConnectionReset))
    );
    assert!(h.take_sent().is_empty());
}

#[test]
fn the_session_sees_the_configured_addresses_and_listener() {
    struct Hello;
    impl Service for Hello {
        fn open(&self, session: &mut Session<'_>) -> Box<dyn SessionHandler> {
            let greeting = format!(
                "{} from {} on {}\n",
                session.info().listener(),
                session.peer(),
                session.info().local()
            );
            session.send(greeting.as_bytes());
            Box::new(Sink)
        }
    }
    let mut h = Harness::builder(Hello)
        .listener("front")
        .peer("192.0.2.7:5555".parse().unwrap())
        .local("198.51.100.1:443".parse().unwrap())
        .open();
    assert_eq!(
        h.take_sent(),
        b"front from 192.0.2.7:5555 on 198.51.100.1:443\n"
    );
    assert_eq!(h.info().listener(), "front");
}

#[test]
fn a_datagram_session_sends_each_call_as_one_datagram() {
    struct Twice;
    impl SessionHandler for Twice {
        fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
            session.send(data);
            session.send(b"");
            if data == b"end" {
                session.close();
            }
        }
    }
    let mut h = Harness::builder(Tiny(|| Box::new(Twice))).datagram().open();
    h.receive(b"one");
    h.receive(b"two");
    let got: Vec<Vec<u8>> = h.take_datagrams().iter().map(|d| d.to_vec()).collect();
    assert_eq!(got, vec![b"one".to_vec(), vec![], b"two".to_vec(), vec![]]);
    h.receive(b"end");
    assert_eq!(h.take_datagrams().len(), 2);
    assert_eq!(h.closed(), Some(&CloseReason::Requested));
}
