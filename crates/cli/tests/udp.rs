//! End-to-end tests of `transport = "udp"` listeners: whole datagrams up to the UDP maximum,
//! one session per peer, datagram-session caps that never lock out tcp/tls and reclaim the
//! longest-idle session, sessions gone after `idle_timeout`,
//! `plexus connect udp://`, and the counters behind them (through the library's metrics).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::{run_plexus, Server};

const CMD_TIMEOUT: Duration = Duration::from_secs(20);

fn udp_config(server_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
{server_extra}

[[listener]]
name = "udp-echo"
transport = "udp"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

/// A UDP socket on `ip` with a receive timeout, so no test can hang on a lost datagram.
fn client(ip: &str) -> UdpSocket {
    let socket = UdpSocket::bind((ip, 0)).expect("bind udp client");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    socket
}

fn echo_once(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(payload, to).expect("send");
    let mut buf = vec![0u8; 70_000];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to, "the reply comes from the listener's address");
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

/// Waits (bounded) until the server's metrics satisfy `check`: counters are updated right
/// after the system call, so a client may see a reply a moment before it is counted.
fn wait_metrics(handle: &plexus::ServerHandle, check: impl Fn(&plexus::MetricsSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&handle.metrics()) {
        assert!(
            Instant::now() < deadline,
            "metrics never matched: {:?}",
            handle.metrics()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Datagrams of 60,000 and 65,507 bytes (the IPv4 maximum) come back whole and byte-exact,
/// as do an empty one and a 1-byte one.
#[test]
fn udp_echo_returns_datagrams_whole_up_to_65507_bytes() {
    let server = Server::start(&udp_config("idle_timeout = \"60s\""));
    let to = server.addr("udp-echo");
    let socket = client("127.0.0.1");
    for len in [60_000, 65_507, 0, 1, 1500, 9000] {
        let payload = pattern(len, len as u8);
        let reply =
            echo_once(&socket, to, &payload).unwrap_or_else(|| panic!("no echo of {len} B"));
        assert_eq!(
            reply.len(),
            len,
            "datagram of {len} B came back with {} B",
            reply.len()
        );
        assert!(reply == payload, "datagram of {len} B changed on the way");
    }
}

/// 1,000 peers (distinct source addresses on 127/8, all at once) each get exactly their own
/// datagrams back, in a second round too (their sessions persist).
#[test]
fn udp_echo_keeps_1000_peers_apart() {
    let server = Server::start(&udp_config("idle_timeout = \"60s\""));
    let to = server.addr("udp-echo");
    let peers: Vec<UdpSocket> = (0..1000)
        .map(|i| client(&format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250)))
        .collect();
    for round in 0..2u8 {
        for (i, socket) in peers.iter().enumerate() {
            socket
                .send_to(format!("peer {i} round {round}").as_bytes(), to)
                .expect("send");
        }
        let mut missing = 0;
        for (i, socket) in peers.iter().enumerate() {
            let mut buf = [0u8; 64];
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => assert_eq!(
                    &buf[..n],
                    format!("peer {i} round {round}").as_bytes(),
                    "peer {i} got someone else's datagram"
                ),
                Err(_) => missing += 1,
            }
        }
        assert_eq!(missing, 0, "round {round}: {missing} peers got no echo");
    }
}

/// Fetches `/metrics` from an http listener.
fn fetch_metrics(http: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// The value of the sample line `name` in a Prometheus text body (0 when absent).
fn sample(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Defect: datagram sessions took the places of `max_connections`, so 50 UDP source ports
/// refused every TCP and TLS client for `idle_timeout`. Now datagram sessions have their own
/// cap (here: half of max_connections = 50): 200 source ports each get their echo (the
/// longest-idle session is reclaimed, and counted), TCP and TLS clients are served while the
/// UDP sessions are held, and the first UDP peers get echoes again.
#[test]
fn udp_sources_never_lock_out_tcp_and_tls_and_idle_sessions_are_reclaimed() {
    let config = format!(
        r#"{}
[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
"#,
        udp_config("max_connections = 50\nidle_timeout = \"60s\"")
    );
    let server = Server::start(&config);
    let to = server.addr("udp-echo");
    let peers: Vec<UdpSocket> = (0..200).map(|_| client("127.0.0.1")).collect();
    for (i, peer) in peers.iter().enumerate() {
        let payload = format!("udp peer {i}");
        assert_eq!(
            echo_once(peer, to, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes()),
            "udp peer {i} got no echo"
        );
    }
    // The datagram sessions are at their cap now; streams still have their places.
    let mut streams: Vec<std::net::TcpStream> = (0..20)
        .map(|_| common::connect(server.addr("tcp-echo")))
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        common::assert_echo(stream, format!("tcp client {i}").as_bytes());
    }
    let url = format!("tls://127.0.0.1:{}", server.addr("tls-echo").port());
    let out = run_plexus(
        &["connect", &url, "--insecure"],
        Some(b"tls still served\n"),
        CMD_TIMEOUT,
    );
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tls still served\n");
    // The first peers' sessions were reclaimed long ago: they are admitted again.
    for (i, peer) in peers.iter().enumerate().take(10) {
        let payload = format!("udp peer {i} again");
        assert_eq!(
            echo_once(peer, to, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes()),
            "udp peer {i} got no echo the second time"
        );
    }
    let body = fetch_metrics(server.addr("http"));
    let reclaimed = sample(
        &body,
        "plexus_datagram_sessions_reclaimed_total{cap=\"max_datagram_sessions\"}",
    );
    assert!(
        reclaimed >= 200 - 25,
        "reclaims counted: {reclaimed}\n{body}"
    );
    assert!(
        sample(&body, "plexus_datagram_sessions_open{transport=\"udp\"}") <= 25,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "plexus_connections_refused_total{reason=\"max_connections\"}"
        ),
        0,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "plexus_datagrams_dropped_total{reason=\"session_cap\"}"
        ),
        0,
        "{body}"
    );
}

/// The per-IP datagram cap: one host's source ports take at most
/// `max_datagram_sessions_per_ip` sessions; its newest peers reclaim its own longest-idle
/// sessions, never another host's.
#[test]
fn one_hosts_source_ports_reclaim_only_that_hosts_sessions() {
    let config = plexus::Config::parse(
        &udp_config("event_loops = 1\nmax_datagram_sessions_per_ip = 4\nidle_timeout = \"60s\"")
            .replace("event_loops = 2\n", ""),
        "udp-per-ip",
    )
    .unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let to = server.local_addr("udp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let other = client("127.0.0.9");
    assert_eq!(
        echo_once(&other, to, b"other host").as_deref(),
        Some(&b"other host"[..])
    );
    let flood: Vec<UdpSocket> = (0..20).map(|_| client("127.0.0.8")).collect();
    for (i, peer) in flood.iter().enumerate() {
        assert!(echo_once(peer, to, &[i as u8]).is_some(), "flood peer {i}");
    }
    wait_metrics(&handle, |m| m.reclaimed_for_per_ip >= 16);
    let metrics = handle.metrics();
    assert_eq!(metrics.reclaimed_for_per_ip, 16, "{metrics:?}");
    assert_eq!(
        metrics.udp_sessions_open, 5,
        "4 of the flooding host + the other"
    );
    // The other host's session survived the whole flood (it is the longest idle of all).
    assert_eq!(
        echo_once(&other, to, b"still me").as_deref(),
        Some(&b"still me"[..])
    );
    assert_eq!(handle.metrics().udp_sessions_open, 5);
    handle.stop();
    runner.join().unwrap().unwrap();
}

/// `max_connections` full of streams: a new datagram peer takes the place of the loop's
/// longest-idle datagram session (counted), so the total never passes `max_connections` and
/// no stream is touched.
#[test]
fn a_new_datagram_peer_replaces_the_longest_idle_one_when_streams_fill_max_connections() {
    let text = format!(
        "{}\n[[listener]]\nname = \"tcp-echo\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n",
        udp_config("max_connections = 4\nmax_datagram_sessions = 2\nidle_timeout = \"60s\"")
            .replace("event_loops = 2", "event_loops = 1")
    );
    let config = plexus::Config::parse(&text, "udp-total").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let udp = server.local_addr("udp-echo").unwrap();
    let tcp = server.local_addr("tcp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let first = client("127.0.0.1");
    assert_eq!(
        echo_once(&first, udp, b"first").as_deref(),
        Some(&b"first"[..])
    );
    let mut streams: Vec<std::net::TcpStream> = (0..3).map(|_| common::connect(tcp)).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        common::assert_echo(stream, format!("stream {i}").as_bytes());
    }
    let second = client("127.0.0.2");
    assert_eq!(
        echo_once(&second, udp, b"second").as_deref(),
        Some(&b"second"[..])
    );
    wait_metrics(&handle, |m| m.reclaimed_for_max_connections == 1);
    let metrics = handle.metrics();
    assert_eq!(metrics.sessions_open, 4, "{metrics:?}");
    assert_eq!(metrics.udp_sessions_open, 1);
    for (i, stream) in streams.iter_mut().enumerate() {
        common::assert_echo(stream, format!("stream {i} again").as_bytes());
    }
    handle.stop();
    runner.join().unwrap().unwrap();
}

/// `plexus connect udp://` sends one datagram per line and prints each reply on its own line;
/// it exits 0 once every reply arrived.
#[test]
fn connect_udp_sends_one_datagram_per_line() {
    let server = Server::start(&udp_config("idle_timeout = \"60s\""));
    let url = format!("udp://{}", server.addr("udp-echo"));
    let out = run_plexus(
        &["connect", &url],
        Some(b"alpha\nbeta\n\ngamma\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "alpha\nbeta\n\ngamma\n"
    );
}

/// Forward and chat are stream services: a udp listener naming them is a configuration error.
#[test]
fn udp_listener_with_a_stream_service_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let config =
        udp_config("idle_timeout = \"60s\"").replace("service = \"echo\"", "service = \"chat\"");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let out = run_plexus(&["serve", "--config", path, "--check"], None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(2);
    out.assert_stderr_contains("listener[0].service");
}

/// The library's metrics see the udp path: datagrams in and out, sessions open, and a
/// session's end after `idle_timeout`.
#[test]
fn udp_metrics_count_datagrams_and_sessions() {
    let config =
        plexus::Config::parse(&udp_config("idle_timeout = \"1s\""), "udp-metrics").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let to = server.local_addr("udp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let socket = client("127.0.0.1");
    for i in 0..10u8 {
        assert_eq!(echo_once(&socket, to, &[i]).as_deref(), Some(&[i][..]));
    }
    wait_metrics(&handle, |m| m.datagrams_out >= 10);
    let metrics = handle.metrics();
    assert_eq!(metrics.udp_sessions_open, 1);
    assert_eq!(metrics.datagrams_in, 10);
    assert_eq!(metrics.datagrams_out, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.metrics().udp_sessions_open != 0 {
        assert!(Instant::now() < deadline, "idle udp session never expired");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(handle.metrics().closed_idle_timeout, 1);
    handle.stop();
    runner.join().unwrap().unwrap();
}

/// SIGTERM stops a server with udp listeners gracefully: exit 0.
#[test]
fn sigterm_stops_a_udp_server_cleanly() {
    let mut server = Server::start(&udp_config("idle_timeout = \"60s\""));
    let socket = client("127.0.0.1");
    assert!(echo_once(&socket, server.addr("udp-echo"), b"x").is_some());
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// A listener ACL applies per datagram source: a denied source gets nothing back and its
/// datagrams are dropped and counted; an allowed one is served.
#[test]
fn udp_acl_drops_datagrams_of_denied_sources() {
    let text = format!(
        "{}[listener.acl]\ndeny = [\"127.0.0.5/32\"]\n",
        udp_config("idle_timeout = \"60s\"")
    );
    let config = plexus::Config::parse(&text, "udp-acl").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let to = server.local_addr("udp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let denied = client("127.0.0.5");
    denied
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(echo_once(&denied, to, b"let me in"), None);
    }
    let allowed = client("127.0.0.6");
    assert_eq!(echo_once(&allowed, to, b"hi").as_deref(), Some(&b"hi"[..]));
    wait_metrics(&handle, |m| m.datagrams_dropped_refused >= 3);
    let metrics = handle.metrics();
    assert_eq!(metrics.datagrams_dropped_refused, 3);
    assert_eq!(metrics.refused(plexus::RefusalReason::Acl), 3);
    assert_eq!(metrics.udp_sessions_open, 1);
    handle.stop();
    runner.join().unwrap().unwrap();
}

/// `/metrics` of an http listener shows the datagram counters of the udp listener.
#[test]
fn metrics_endpoint_shows_datagram_counters() {
    use std::io::{Read, Write};
    let config = format!(
        "{}\n[[listener]]\nname = \"http\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        udp_config("idle_timeout = \"60s\"")
    );
    let server = Server::start(&config);
    let socket = client("127.0.0.1");
    for i in 0..3u8 {
        assert!(echo_once(&socket, server.addr("udp-echo"), &[i]).is_some());
    }
    let expected = [
        "plexus_datagrams_total{direction=\"in\"} 3",
        "plexus_datagrams_total{direction=\"out\"} 3",
        "plexus_datagram_sessions_open{transport=\"udp\"} 1",
        "plexus_dtls_cookies_total{result=\"sent\"} 0",
    ];
    // A reply can arrive a moment before it is counted: ask again (bounded) until it is.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut http = std::net::TcpStream::connect(server.addr("http")).unwrap();
        http.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        http.read_to_string(&mut body).unwrap();
        let missing: Vec<_> = expected.iter().filter(|l| !body.contains(*l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in:\n{body}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Bursts of equal-size datagrams sent with GSO (`UDP_SEGMENT`) reach the server's socket,
/// which has `UDP_GRO` on, as coalesced buffers on this kernel: the server must split each
/// buffer back into its datagrams (one `on_data` each, counted one by one), and its replies —
/// runs to one peer, which it sends with GSO in turn — must reach a plain client socket as
/// exactly the datagrams that were sent, in order, and a GRO client split the same way.
#[test]
fn gso_bursts_to_a_gro_socket_come_back_as_the_datagrams_sent() {
    gso_bursts_round_trip("");
}

/// `udp_offload = false`: the server's socket has no `UDP_GRO` (the kernel cuts each GSO
/// message before it is queued) and it replies datagram by datagram; clients see the same.
#[test]
fn with_udp_offload_off_gso_bursts_still_come_back_as_the_datagrams_sent() {
    gso_bursts_round_trip("udp_offload = false\n");
}

fn gso_bursts_round_trip(listener_extra: &str) {
    use plexus_sys::dgram::{enable_gro, offload, send_batch_segmented, RecvBatch};
    let text = format!("{}{listener_extra}", udp_config("idle_timeout = \"60s\""));
    let config = plexus::Config::parse(&text, "udp-gro").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let to = server.local_addr("udp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    eprintln!("kernel offloads: {:?}", offload());

    // Bursts: runs of one size (with and without a shorter last datagram), lone datagrams,
    // a run as long as GSO allows, and sizes up to a jumbo-ish 8000 bytes.
    let mut bursts: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut seed = 0u8;
    for (count, size, short_tail) in [
        (16, 64, false),
        (16, 64, true),
        (1, 300, false),
        (64, 100, false),
        (8, 1200, true),
        (4, 8000, false),
        (3, 1, false),
    ] {
        let burst = (0..count)
            .map(|i| {
                seed = seed.wrapping_add(1);
                let len = if short_tail && i + 1 == count {
                    size / 3
                } else {
                    size
                };
                pattern(len, seed)
            })
            .collect();
        bursts.push(burst);
    }
    let total: usize = bursts.iter().map(Vec::len).sum();

    for gro_client in [false, true] {
        let socket = client("127.0.0.1");
        if gro_client && offload().gro {
            enable_gro(&socket).unwrap();
        }
        let before = handle.metrics().datagrams_in;
        let mut received: Vec<Vec<u8>> = Vec::new();
        let mut batch = RecvBatch::new(8, 64 * 1024);
        for burst in &bursts {
            let list: Vec<(SocketAddr, &[u8])> = burst.iter().map(|d| (to, d.as_slice())).collect();
            let mut done = 0;
            while done < list.len() {
                done += send_batch_segmented(&socket, &list[done..], usize::MAX)
                    .unwrap()
                    .datagrams;
            }
            // Read this burst's replies before the next (bounded by the socket's timeout).
            let want = received.len() + burst.len();
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.len() < want {
                assert!(
                    Instant::now() < deadline,
                    "replies missing: {} of {want}",
                    received.len()
                );
                match batch.recv(&socket) {
                    Ok(n) => {
                        for i in 0..n {
                            let reply = batch.get(i);
                            assert_eq!(reply.source, Some(to));
                            assert!(!reply.truncated);
                            received.push(reply.data.to_vec());
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1))
                    }
                    Err(err) => panic!("receiving the echoes: {err}"),
                }
            }
        }
        let sent: Vec<Vec<u8>> = bursts.iter().flatten().cloned().collect();
        assert_eq!(received.len(), sent.len());
        for (index, (got, want)) in received.iter().zip(&sent).enumerate() {
            assert_eq!(got, want, "datagram {index} (gro client: {gro_client})");
        }
        // The server counted every datagram, not every coalesced buffer.
        wait_metrics(&handle, |m| m.datagrams_in >= before + total as u64);
        assert_eq!(handle.metrics().datagrams_in, before + total as u64);
    }
    handle.stop();
    runner.join().unwrap().unwrap();
}

/// Datagrams coalesced by GRO are still admitted one by one: bursts sent with GSO from a
/// denied source are each refused and counted (none reaches the service), bursts from many
/// sources (127.0.0.10–29, as a spoofer would rotate them) never hold more than the
/// listener's `max_sessions`, every datagram in is counted once, and a reply is only ever
/// an exact datagram its own source sent, in order.
#[test]
fn gro_coalesced_bursts_are_admitted_and_bounded_datagram_by_datagram() {
    use plexus_sys::dgram::send_batch_segmented;
    let text = format!(
        "{}max_sessions = 4\n[listener.acl]\ndeny = [\"127.0.0.5/32\"]\n",
        udp_config("idle_timeout = \"60s\"")
    );
    let config = plexus::Config::parse(&text, "udp-gro-bounded").unwrap();
    let server = plexus_services::register(plexus::Server::builder(config))
        .build()
        .unwrap();
    let to = server.local_addr("udp-echo").unwrap();
    let handle = server.handle();
    let runner = thread::spawn(move || server.run());
    let burst = |socket: &UdpSocket, seed: u8| -> Vec<Vec<u8>> {
        let sent: Vec<Vec<u8>> = (0..16u8).map(|i| pattern(100, seed ^ i)).collect();
        let list: Vec<(SocketAddr, &[u8])> = sent.iter().map(|d| (to, d.as_slice())).collect();
        let mut done = 0;
        while done < list.len() {
            done += send_batch_segmented(socket, &list[done..], usize::MAX)
                .unwrap()
                .datagrams;
        }
        sent
    };

    let denied = client("127.0.0.5");
    denied
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for seed in 0..3 {
        burst(&denied, seed);
    }
    let mut buf = vec![0u8; 70_000];
    assert!(
        denied.recv_from(&mut buf).is_err(),
        "a denied source gets nothing back"
    );
    wait_metrics(&handle, |m| m.datagrams_dropped_refused >= 48);
    let metrics = handle.metrics();
    assert_eq!(
        metrics.datagrams_dropped_refused, 48,
        "each datagram refused"
    );
    assert_eq!(metrics.refused(plexus::RefusalReason::Acl), 48);
    assert_eq!(metrics.udp_sessions_open, 0);

    let sources: Vec<UdpSocket> = (10..30).map(|n| client(&format!("127.0.0.{n}"))).collect();
    let mut total = 48u64;
    for round in 0..2u8 {
        for (n, socket) in sources.iter().enumerate() {
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let sent = burst(socket, round.wrapping_mul(64) ^ n as u8);
            total += sent.len() as u64;
            // Whatever comes back is this source's datagrams, whole and in order.
            let mut next = 0;
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                assert_eq!(from, to);
                let at = sent[next..]
                    .iter()
                    .position(|d| d.as_slice() == &buf[..len])
                    .expect("a reply that this source sent");
                next += at + 1;
                if next == sent.len() {
                    break;
                }
            }
            assert!(handle.metrics().udp_sessions_open <= 4);
        }
    }
    wait_metrics(&handle, |m| m.datagrams_in >= total);
    let metrics = handle.metrics();
    assert_eq!(metrics.datagrams_in, total, "every datagram counted once");
    assert!(metrics.udp_sessions_open <= 4, "{metrics:?}");
    assert!(metrics.datagrams_out > 0, "the allowed sources were served");
    handle.stop();
    runner.join().unwrap().unwrap();
}
