//! `forward` on udp and dtls listeners, on the library's datagram connector: datagrams relayed
//! byte-exact to a UDP echo upstream (several clients, each with its own upstream socket and
//! its own replies), DTLS termination checked with the real `openssl s_client -dtls1_2`, an
//! upstream nobody listens on (ECONNREFUSED: counted, the client session closed, the others
//! unaffected), a flood to a slow upstream that stays bounded (drops counted), and the keys a
//! udp/dtls forward refuses.
//!
//! The upstreams are std `UdpSocket` threads in this process; plexus runs as a real process
//! (`plexus serve`), its counters read from its own `/metrics`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, run_plexus, wait_until, Server};

const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// A UDP echo upstream on 127.0.0.1 (a thread), remembering the source of every datagram and
/// the payloads it saw; `delay` per datagram makes it slow. Stops when dropped.
struct EchoUpstream {
    addr: SocketAddr,
    sources: Arc<Mutex<HashSet<SocketAddr>>>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoUpstream {
    fn start(delay: Duration) -> EchoUpstream {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let sources = Arc::new(Mutex::new(HashSet::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sources, seen, received, stop) = (
                Arc::clone(&sources),
                Arc::clone(&seen),
                Arc::clone(&received),
                Arc::clone(&stop),
            );
            thread::spawn(move || {
                let mut buf = vec![0u8; 70_000];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    received.fetch_add(1, Ordering::Relaxed);
                    sources.lock().unwrap().insert(from);
                    let mut seen = seen.lock().unwrap();
                    if seen.len() < 1000 {
                        seen.push(buf[..n].to_vec());
                    }
                    drop(seen);
                    if !delay.is_zero() {
                        thread::sleep(delay);
                    }
                    let _ = socket.send_to(&buf[..n], from);
                }
            })
        };
        EchoUpstream {
            addr,
            sources,
            seen,
            received,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A config with `[server]` `server_extra`, the given forward listeners (name, transport,
/// upstream, extra keys) and a `web` listener for `/metrics`.
fn config(server_extra: &str, listeners: &[(&str, &str, SocketAddr, &str)]) -> String {
    let mut out = format!("[server]\nevent_loops = 2\nidle_timeout = \"60s\"\n{server_extra}\n");
    for (name, transport, upstream, extra) in listeners {
        out.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\ntransport = \"{transport}\"\n\
             addr = \"127.0.0.1:0\"\nservice = \"forward\"\nupstream = \"{upstream}\"\n{extra}\n"
        ));
    }
    out.push_str(
        "\n[[listener]]\nname = \"web\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n",
    );
    out
}

/// `/metrics` of `server`'s `web` listener, as sample (name with labels) → value.
fn scrape(server: &Server) -> BTreeMap<String, f64> {
    let mut stream = connect(server.addr("web"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read /metrics");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn get(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

/// Waits (bounded) until `/metrics` satisfies `check`; returns the samples that did.
fn wait_metrics(
    server: &Server,
    what: &str,
    check: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let samples = scrape(server);
        if check(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; /metrics: {samples:#?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

/// Datagrams of every size up to 60,000 bytes (and an empty one) go through a udp forward and
/// come back byte-exact; four clients at once each get exactly their own replies, through
/// their own upstream socket (four sources at the upstream).
#[test]
fn udp_forward_relays_datagrams_byte_exact_and_each_client_gets_its_own() {
    let upstream = EchoUpstream::start(Duration::ZERO);
    let server = Server::start(&config("", &[("fwd", "udp", upstream.addr, "")]));
    let to = server.addr("fwd");
    let clients: Vec<UdpSocket> = (0..4).map(|_| client()).collect();
    let mut buf = vec![0u8; 70_000];
    for round in 0..3u8 {
        for (at, socket) in clients.iter().enumerate() {
            for len in [0, 1, 100, 1200, 9000, 60_000] {
                let payload = pattern(len, round.wrapping_mul(16) ^ at as u8);
                socket.send_to(&payload, to).unwrap();
                let (n, from) = socket.recv_from(&mut buf).expect("a reply within 5 s");
                assert_eq!(from, to, "replies come from the listener's address");
                assert_eq!(n, len, "client {at}: whole datagram of {len} bytes");
                assert!(
                    buf[..n] == payload[..],
                    "client {at}: byte-exact, {len} bytes"
                );
            }
        }
    }
    // Interleaved: each client's replies are its own, in order.
    for (at, socket) in clients.iter().enumerate() {
        for seq in 0..5u8 {
            socket.send_to(&[at as u8, seq], to).unwrap();
        }
    }
    for (at, socket) in clients.iter().enumerate() {
        for seq in 0..5u8 {
            let (n, _) = socket.recv_from(&mut buf).expect("interleaved reply");
            assert_eq!(&buf[..n], &[at as u8, seq], "client {at} gets only its own");
        }
    }
    assert_eq!(
        upstream.sources.lock().unwrap().len(),
        4,
        "one upstream socket per client peer"
    );
    let name = upstream.addr.to_string();
    let samples = scrape(&server);
    assert_eq!(
        get(
            &samples,
            &format!("plexus_upstream_sessions_open{{upstream=\"{name}\"}}")
        ),
        4.0
    );
    assert!(
        get(
            &samples,
            &format!("plexus_upstream_bytes_sent_total{{upstream=\"{name}\"}}")
        ) > 0.0
    );
}

/// A dtls listener forwarding to a UDP echo: `openssl s_client -dtls1_2` handshakes with
/// plexus, its line reaches the upstream as plaintext (DTLS terminated) and comes back.
#[test]
fn dtls_forward_terminates_dtls_for_openssl_s_client() {
    let upstream = EchoUpstream::start(Duration::ZERO);
    let server = Server::start(&config("", &[("dtls-fwd", "dtls", upstream.addr, "")]));
    let addr = server.addr("dtls-fwd");
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &addr.to_string(),
            "-quiet",
        ])
        .args(["-mtu", "1200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("through dtls to udp") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    stdin.write_all(b"through dtls to udp\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    // Kill by PID (the child we spawned).
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let _ = child.wait();
    let got = reader.join().unwrap();
    assert!(
        String::from_utf8_lossy(&got).contains("through dtls to udp"),
        "s_client printed {:?}",
        String::from_utf8_lossy(&got)
    );
    let seen = upstream.seen.lock().unwrap();
    assert!(
        seen.iter().any(|d| d == b"through dtls to udp\n"),
        "the upstream gets the plaintext datagram: {seen:?}"
    );
}

/// Nothing listens on the upstream's port: the kernel's ICMP port unreachable surfaces as
/// ECONNREFUSED on the connected socket; it is counted as refused, the client session is
/// closed, the server goes on, and a client of another forward listener keeps its relay.
#[test]
fn udp_upstream_refused_is_counted_and_closes_only_that_client() {
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let live = EchoUpstream::start(Duration::ZERO);
    let mut server = Server::start(&config(
        "",
        &[("dead", "udp", dead, ""), ("live", "udp", live.addr, "")],
    ));
    let (to_dead, to_live) = (server.addr("dead"), server.addr("live"));
    let survivor = client();
    let mut buf = [0u8; 64];
    survivor.send_to(b"before", to_live).unwrap();
    let (n, _) = survivor.recv_from(&mut buf).expect("live relay");
    assert_eq!(&buf[..n], b"before");
    let victims: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    for victim in &victims {
        victim.send_to(b"anyone there?", to_dead).unwrap();
    }
    let name = dead.to_string();
    let refused =
        format!("plexus_upstream_connect_failures_total{{upstream=\"{name}\",reason=\"refused\"}}");
    let open = format!("plexus_upstream_sessions_open{{upstream=\"{name}\"}}");
    let dead_sessions = "plexus_listener_sessions_open{listener=\"dead\",transport=\"udp\"}";
    let samples = wait_metrics(&server, "three refusals, the clients closed", |s| {
        get(s, &refused) >= 3.0 && get(s, &open) == 0.0 && s.get(dead_sessions) == Some(&0.0)
    });
    let accepted = "plexus_listener_connections_accepted_total{listener=\"dead\"}";
    assert_eq!(
        get(&samples, accepted),
        3.0,
        "three client sessions were opened"
    );
    server.assert_running("after refused upstreams");
    // The other listener's client still has its session and its relay.
    survivor.send_to(b"after", to_live).unwrap();
    let (n, _) = survivor
        .recv_from(&mut buf)
        .expect("live relay after the refusals");
    assert_eq!(&buf[..n], b"after");
    assert_eq!(
        get(
            &scrape(&server),
            "plexus_listener_sessions_open{listener=\"live\",transport=\"udp\"}"
        ),
        1.0
    );
    // A dead client that tries again gets a new session, refused again (nothing panics).
    victims[0].send_to(b"again", to_dead).unwrap();
    wait_metrics(&server, "a fourth refusal", |s| get(s, &refused) >= 4.0);
    server.assert_running("after a retry");
}

/// A flood from one client to a slow upstream stays bounded: the link's queue holds at most
/// `outbound_high_watermark` bytes and drops (and counts) the rest; the server goes on
/// serving another listener's client meanwhile.
#[test]
fn a_flood_to_a_slow_udp_upstream_stays_bounded_and_counts_drops() {
    let slow = EchoUpstream::start(Duration::from_millis(2));
    let live = EchoUpstream::start(Duration::ZERO);
    let server = Server::start(&config(
        "outbound_high_watermark = 2048\noutbound_low_watermark = 1024",
        &[
            ("flood", "udp", slow.addr, "datagram_batch = 64"),
            ("live", "udp", live.addr, ""),
        ],
    ));
    let to = server.addr("flood");
    let flooder = client();
    let payload = vec![7u8; 1000];
    let name = slow.addr.to_string();
    let dropped = format!(
        "plexus_upstream_datagrams_dropped_total{{upstream=\"{name}\",reason=\"overflow\"}}"
    );
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Bursts until a drop shows (bounded): a burst lands in plexus' receive buffer and is read
    // in batches, more than two datagrams of which do not fit the link's 2 KiB.
    while get(&scrape(&server), &dropped) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "no overflow drop after {sent} datagrams"
        );
        for _ in 0..2000 {
            let _ = flooder.send_to(&payload, to);
            sent += 1;
        }
    }
    let samples = scrape(&server);
    let out = get(
        &samples,
        &format!("plexus_upstream_bytes_sent_total{{upstream=\"{name}\"}}"),
    );
    assert!(
        out <= (sent * 1000) as f64,
        "no more sent upstream than the client sent"
    );
    // The other listener is served meanwhile.
    let other = client();
    let mut buf = [0u8; 16];
    other.send_to(b"still here", server.addr("live")).unwrap();
    let (n, _) = other
        .recv_from(&mut buf)
        .expect("the live relay answers during the flood");
    assert_eq!(&buf[..n], b"still here");
    assert!(
        wait_until(Duration::from_secs(10), || slow
            .received
            .load(Ordering::Relaxed)
            > 0),
        "the slow upstream got some of the flood"
    );
}

/// What a udp/dtls forward cannot do is refused by `plexus serve --check` (exit 2, the key
/// named); plain udp and dtls forwards pass, and so does DTLS origination (`upstream_tls`).
#[test]
fn udp_and_dtls_forward_refuse_stream_only_keys() {
    let dir = tempfile::tempdir().unwrap();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "dtls",
            "upstream_proxy_protocol = \"v2\"",
            &["listener[0].upstream_proxy_protocol", "datagrams"],
        ),
        ("udp", "splice = false", &["listener[0].splice"]),
    ];
    for (transport, extra, needles) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config("", &[("f", transport, up, extra)])).unwrap();
        let out = run_plexus(
            &["serve", "--config", path.to_str().unwrap(), "--check"],
            None,
            CMD_TIMEOUT,
        );
        out.assert_no_panic();
        out.assert_code(2);
        for needle in *needles {
            out.assert_stderr_contains(needle);
        }
    }
    let path = dir.path().join("good.toml");
    std::fs::write(
        &path,
        config(
            "",
            &[
                ("f", "udp", up, ""),
                ("g", "dtls", up, ""),
                ("h", "udp", up, "upstream_tls = true"),
            ],
        ),
    )
    .unwrap();
    let out = run_plexus(
        &["serve", "--config", path.to_str().unwrap(), "--check"],
        None,
        CMD_TIMEOUT,
    );
    out.assert_code(0);
}

/// The upstream socket lives as long as its client session: once the client is idle for
/// `idle_timeout` both are gone (no upstream session left open).
#[test]
fn the_upstream_socket_expires_with_its_client_session() {
    let upstream = EchoUpstream::start(Duration::ZERO);
    let server = Server::start(
        &config("", &[("fwd", "udp", upstream.addr, "")])
            .replace("idle_timeout = \"60s\"", "idle_timeout = \"1s\""),
    );
    let socket = client();
    let mut buf = [0u8; 16];
    socket.send_to(b"ping", server.addr("fwd")).unwrap();
    let (n, _) = socket.recv_from(&mut buf).expect("relayed");
    assert_eq!(&buf[..n], b"ping");
    let open = format!(
        "plexus_upstream_sessions_open{{upstream=\"{}\"}}",
        upstream.addr
    );
    assert_eq!(get(&scrape(&server), &open), 1.0);
    wait_metrics(&server, "the client and its upstream idled out", |s| {
        s.get(&open) == Some(&0.0)
            && s.get("plexus_listener_sessions_open{listener=\"fwd\",transport=\"udp\"}")
                == Some(&0.0)
    });
}

/// With `upstreams = [dead, live]` the refused upstream is marked down (passive health
/// check) and the client's next datagrams go to the live one; later clients skip the dead
/// one from the start.
#[test]
fn udp_forward_skips_a_refusing_upstream_of_several() {
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let live = EchoUpstream::start(Duration::ZERO);
    let extra = format!(
        "upstreams = [\"{dead}\", \"{}\"]\nupstream_fail_timeout = \"60s\"",
        live.addr
    );
    let text = format!(
        "[server]\nevent_loops = 1\nidle_timeout = \"60s\"\n\n[[listener]]\nname = \"fwd\"\n\
         transport = \"udp\"\naddr = \"127.0.0.1:0\"\nservice = \"forward\"\n{extra}\n\n\
         [[listener]]\nname = \"web\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n"
    );
    let server = Server::start(&text);
    let to = server.addr("fwd");
    let first = client();
    first
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 16];
    // The first datagram may be lost with the dead upstream; resend until one comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        first.send_to(b"hello", to).unwrap();
        if let Ok((n, _)) = first.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"hello");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never relayed to the live upstream"
        );
    }
    let refused =
        format!("plexus_upstream_connect_failures_total{{upstream=\"{dead}\",reason=\"refused\"}}");
    assert_eq!(get(&scrape(&server), &refused), 1.0, "refused once");
    // Later clients go straight to the live upstream (the dead one is down for 60 s).
    for _ in 0..4 {
        let socket = client();
        socket.send_to(b"next", to).unwrap();
        let (n, _) = socket
            .recv_from(&mut buf)
            .expect("relayed by the live upstream");
        assert_eq!(&buf[..n], b"next");
    }
    assert_eq!(
        get(&scrape(&server), &refused),
        1.0,
        "the dead upstream was skipped"
    );
}

/// `plexus cert` into `dir`: (cert.pem, key.pem), for localhost, 127.0.0.1 and ::1.
fn make_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = run_plexus(&["cert", "--out", dir.to_str().unwrap()], None, CMD_TIMEOUT);
    out.assert_code(0);
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// DTLS origination: a udp forward with `upstream_tls = true` speaks DTLS 1.2 to a dtls echo
/// listener (a second plexus), its certificate verified against `upstream_ca`; datagrams
/// come back byte-exact (and several clients each get their own). With a CA that did not
/// sign the upstream's certificate the handshake is refused and the client is closed.
#[test]
fn udp_forward_originates_dtls_verified_against_upstream_ca() {
    let good = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(good.path());
    let (wrong_ca, _) = make_cert(other.path());
    let upstream = Server::start(&format!(
        "[server]\nevent_loops = 1\nidle_timeout = \"60s\"\n\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\n\
         [[listener]]\nname = \"dtls-echo\"\ntransport = \"dtls\"\naddr = \"127.0.0.1:0\"\n\
         service = \"echo\"\n"
    ));
    let target = upstream.addr("dtls-echo");
    let ca = |path: &std::path::Path| format!("upstream_tls = true\nupstream_ca = {path:?}");
    let (good_ca, bad_ca) = (ca(&cert), ca(&wrong_ca));
    let server = Server::start(&config(
        "",
        &[
            ("fwd", "udp", target, &good_ca),
            ("wrong", "udp", target, &bad_ca),
        ],
    ));
    let clients: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    let mut buf = vec![0u8; 2000];
    for (at, socket) in clients.iter().enumerate() {
        for len in [1usize, 100, 1000] {
            let payload = pattern(len, at as u8);
            socket.send_to(&payload, server.addr("fwd")).unwrap();
            let (n, _) = socket.recv_from(&mut buf).expect("a reply through DTLS");
            assert!(
                buf[..n] == payload[..],
                "client {at}: byte-exact through DTLS, {len} bytes"
            );
        }
    }
    let samples = scrape(&server);
    assert_eq!(
        get(
            &samples,
            &format!("plexus_upstream_sessions_open{{upstream=\"{target}\"}}")
        ),
        3.0,
        "one DTLS session per client"
    );
    // The wrong CA: the handshake fails, the client session is closed, nothing comes back.
    let mark = server.log_mark();
    let refused = client();
    refused
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    refused.send_to(b"hello?", server.addr("wrong")).unwrap();
    server.assert_log(
        mark,
        Duration::from_secs(10),
        "dtls handshake refused",
        |l| l.contains("dtls upstream handshake failed"),
    );
    assert!(
        refused.recv_from(&mut buf).is_err(),
        "nothing relayed without a verified upstream"
    );
    wait_metrics(&server, "the refused client closed", |s| {
        s.get("plexus_listener_sessions_open{listener=\"wrong\",transport=\"udp\"}") == Some(&0.0)
    });
    // The verified clients are unaffected.
    clients[0].send_to(b"still", server.addr("fwd")).unwrap();
    let (n, _) = clients[0].recv_from(&mut buf).expect("still relayed");
    assert_eq!(&buf[..n], b"still");
}
