//! `forward` with its upstreams: the `plexus_upstream_*` families on `/metrics` after real
//! traffic, several upstreams per listener (round-robin, least connections, a dead one skipped
//! by the passive health check, all of them down), and the PROXY header sent to the upstream.
//!
//! The upstreams are real listeners: a second plexus (echo, or a `proxy_protocol` listener),
//! and tagged echo listeners in this process that say which upstream a connection reached.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use common::{connect, echo_config, wait_until, Server, IO_TIMEOUT};

/// A relay listener `fwd` (forward, `extra` keys appended) and a `web` listener for
/// `/metrics`.
fn relay_config(event_loops: usize, extra: &str) -> String {
    format!(
        "[server]\nevent_loops = {event_loops}\nidle_timeout = \"60s\"\n\n\
         [[listener]]\nname = \"fwd\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"forward\"\n{extra}\n\n\
         [[listener]]\nname = \"web\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\n"
    )
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

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in /metrics: {samples:#?}"))
}

/// Writes `line` and reads one line back.
fn round_trip(stream: &mut BufReader<TcpStream>, line: &str) -> String {
    stream.get_mut().write_all(line.as_bytes()).unwrap();
    let mut got = String::new();
    stream.read_line(&mut got).expect("read a line back");
    got
}

#[test]
fn upstream_metrics_count_connects_bytes_and_failures() {
    let upstream = Server::start(&echo_config(""));
    let echo = upstream.addr("tcp-echo");
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = Server::start(&relay_config(
        2,
        &format!("upstreams = [\"{dead}\", \"{echo}\"]"),
    ));
    let payload = "x".repeat(999) + "\n";
    for _ in 0..3 {
        let mut client = BufReader::new(connect(relay.addr("fwd")));
        assert_eq!(round_trip(&mut client, &payload), payload);
    }
    let live = format!("{{upstream=\"{echo}\"}}");
    let down = format!("{{upstream=\"{dead}\"}}");
    // The upstream sessions end after their clients: wait for the gauge to reach 0.
    let gauge = format!("plexus_upstream_sessions_open{live}");
    let drained = wait_until(IO_TIMEOUT, || scrape(&relay).get(&gauge) == Some(&0.0));
    let samples = scrape(&relay);
    assert!(drained, "upstream sessions still open: {samples:#?}");
    assert_eq!(
        sample(&samples, &format!("plexus_upstream_connected_total{live}")),
        3.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!("plexus_upstream_connect_seconds_count{live}")
        ),
        3.0
    );
    assert_eq!(
        sample(&samples, &format!("plexus_upstream_bytes_sent_total{live}")),
        3000.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!("plexus_upstream_bytes_received_total{live}")
        ),
        3000.0
    );
    // The dead upstream refused once, then the health check skipped it for the other two.
    let refused =
        format!("plexus_upstream_connect_failures_total{{upstream=\"{dead}\",reason=\"refused\"}}");
    assert_eq!(sample(&samples, &refused), 1.0, "{samples:#?}");
    assert_eq!(
        sample(&samples, &format!("plexus_upstream_connected_total{down}")),
        0.0
    );
}

/// A real upstream in this process: every connection it accepts first gets `TAG\n`, then an
/// echo of what it sends. Returns its address; its threads end with the test process.
fn tagged_echo(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                if stream.write_all(format!("{tag}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Connects through the relay and reads the tag of the upstream it reached.
fn reached(relay: &Server) -> (String, BufReader<TcpStream>) {
    let mut client = BufReader::new(connect(relay.addr("fwd")));
    let mut tag = String::new();
    client.read_line(&mut tag).expect("the upstream's tag");
    (tag.trim_end().to_owned(), client)
}

/// An address nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn round_robin_spreads_connections_evenly_over_two_upstreams() {
    let (a, b) = (tagged_echo("A"), tagged_echo("B"));
    // One event loop: its turn alternates exactly (each loop keeps its own turn).
    let relay = Server::start(&relay_config(1, &format!("upstreams = [\"{a}\", \"{b}\"]")));
    let mut counts = BTreeMap::new();
    for _ in 0..20 {
        let (tag, mut client) = reached(&relay);
        assert_eq!(round_trip(&mut client, "ping\n"), "ping\n");
        *counts.entry(tag).or_insert(0) += 1;
    }
    assert_eq!(counts, BTreeMap::from([("A".into(), 10), ("B".into(), 10)]));
}

#[test]
fn round_robin_on_several_loops_still_uses_both() {
    let (a, b) = (tagged_echo("A"), tagged_echo("B"));
    let relay = Server::start(&relay_config(2, &format!("upstreams = [\"{a}\", \"{b}\"]")));
    let mut counts = BTreeMap::new();
    for _ in 0..20 {
        let (tag, _client) = reached(&relay);
        *counts.entry(tag).or_insert(0i32) += 1;
    }
    let (ca, cb) = (
        counts.get("A").copied().unwrap_or(0),
        counts.get("B").copied().unwrap_or(0),
    );
    // Each loop alternates on its own: the totals differ by at most one per loop.
    assert!((ca - cb).abs() <= 2 && ca + cb == 20, "{counts:?}");
}

#[test]
fn least_conn_sends_new_connections_to_the_idle_upstream() {
    let (a, b) = (tagged_echo("A"), tagged_echo("B"));
    let relay = Server::start(&relay_config(
        2,
        &format!("upstreams = [\"{a}\", \"{b}\"]\nbalance = \"least_conn\""),
    ));
    // Whichever the first one reached is busy from now on: the next ones go to the other.
    let (busy, _held) = reached(&relay);
    let other = if busy == "A" { "B" } else { "A" };
    for _ in 0..5 {
        let (tag, mut client) = reached(&relay);
        assert_eq!(tag, other, "a new connection went to the busy upstream");
        assert_eq!(round_trip(&mut client, "x\n"), "x\n");
        drop(client);
        // Its upstream session ends after it: wait until the idle one is idle again.
        let gauge = format!(
            "plexus_upstream_sessions_open{{upstream=\"{}\"}}",
            if other == "A" { a } else { b }
        );
        assert!(
            wait_until(IO_TIMEOUT, || scrape(&relay).get(&gauge) == Some(&0.0)),
            "{gauge} stayed above 0"
        );
    }
    // One held on the other one as well, and the first one's ended: now the first is idle.
    let (tag, _held_other) = reached(&relay);
    assert_eq!(tag, other);
    drop(_held);
    let gauge = format!(
        "plexus_upstream_sessions_open{{upstream=\"{}\"}}",
        if busy == "A" { a } else { b }
    );
    assert!(wait_until(IO_TIMEOUT, || scrape(&relay).get(&gauge) == Some(&0.0)));
    let (tag, _client) = reached(&relay);
    assert_eq!(tag, busy, "0 open vs 1 open: the idle one");
}

#[test]
fn a_dead_upstream_is_skipped_and_every_client_is_served() {
    let dead = closed_port();
    let live = tagged_echo("L");
    let relay = Server::start(&relay_config(
        2,
        &format!("upstreams = [\"{dead}\", \"{live}\"]\nupstream_fail_timeout = \"1h\""),
    ));
    let mark = relay.log_mark();
    for n in 0..10 {
        let (tag, mut client) = reached(&relay);
        assert_eq!(tag, "L", "client {n}");
        assert_eq!(round_trip(&mut client, "hello\n"), "hello\n");
    }
    relay.assert_log(
        mark,
        Duration::from_secs(5),
        "marking the dead upstream down",
        |line| {
            line.contains("failed to connect")
                && line.contains(&dead.to_string())
                && line.contains("skipped")
        },
    );
    // Tried once, then skipped by both loops for the fail timeout.
    let samples = scrape(&relay);
    let attempts = format!("plexus_upstream_connect_attempts_total{{upstream=\"{dead}\"}}");
    assert_eq!(sample(&samples, &attempts), 1.0);
}

#[test]
fn bytes_sent_before_a_failover_reach_the_next_upstream() {
    let dead = closed_port();
    let live = tagged_echo("L");
    let relay = Server::start(&relay_config(
        1,
        &format!("upstreams = [\"{dead}\", \"{live}\"]"),
    ));
    // Sent at once, before the relay learns the first upstream refused.
    let mut client = BufReader::new(connect(relay.addr("fwd")));
    client.get_mut().write_all(b"early bytes\n").unwrap();
    let mut tag = String::new();
    client.read_line(&mut tag).unwrap();
    assert_eq!(tag, "L\n");
    let mut echoed = String::new();
    client.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "early bytes\n");
}

#[test]
fn every_upstream_down_closes_the_client_with_a_log_line() {
    let (one, two) = (closed_port(), closed_port());
    let relay = Server::start(&relay_config(
        2,
        &format!("upstreams = [\"{one}\", \"{two}\"]"),
    ));
    for what in ["both fail", "both are down"] {
        let mark = relay.log_mark();
        let mut client = connect(relay.addr("fwd"));
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        let result = client.read(&mut buf);
        assert!(
            matches!(result, Ok(0)) || matches!(&result, Err(e) if !common::is_timeout(e)),
            "{what}: closed, not answered or left open: {result:?}"
        );
        let needle = match what {
            "both fail" => "no other upstream is left to try",
            _ => "every upstream is down",
        };
        relay.assert_log(mark, Duration::from_secs(5), what, |line| {
            line.contains(needle) && line.contains("closing client")
        });
    }
}

/// A plexus whose `web` listener serves HTTP behind `proxy_protocol = true`, its status page
/// only for `allowed` (the client a PROXY header names): what the upstream believes the client
/// is shows in whether `/status` answers 200 or 403.
fn proxied_upstream(allowed: &str) -> Server {
    Server::start(&format!(
        "[server]\nevent_loops = 1\n\n[http]\nstatus_allow = [\"{allowed}/32\"]\n\n\
         [[listener]]\nname = \"web\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"http\"\nproxy_protocol = true\n"
    ))
}

/// The status of `GET path` on `stream` (HTTP/1.1, the connection closed after it).
fn get_status(mut stream: TcpStream, path: &str) -> u16 {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[test]
fn upstream_proxy_protocol_names_the_client_to_a_plexus_proxy_protocol_listener() {
    for version in ["v1", "v2"] {
        let upstream = proxied_upstream("127.0.0.9");
        let relay = Server::start(&relay_config(
            2,
            &format!(
                "upstream = \"{}\"\nupstream_proxy_protocol = \"{version}\"",
                upstream.addr("web")
            ),
        ));
        let from = |ip: [u8; 4]| common::connect_from(ip.into(), relay.addr("fwd"));
        // The relay's own address is 127.0.0.1: only the header can make the upstream see .9.
        assert_eq!(
            get_status(from([127, 0, 0, 9]), "/status"),
            200,
            "{version}"
        );
        assert_eq!(
            get_status(from([127, 0, 0, 8]), "/status"),
            403,
            "{version}"
        );
        assert_eq!(
            get_status(from([127, 0, 0, 8]), "/healthz"),
            200,
            "{version}"
        );
    }
}

#[test]
fn a_proxy_protocol_relay_passes_on_the_client_its_balancer_named() {
    let upstream = proxied_upstream("127.0.0.77");
    let relay = Server::start(&relay_config(
        1,
        &format!(
            "upstream = \"{}\"\nupstream_proxy_protocol = \"v2\"\nproxy_protocol = true",
            upstream.addr("web")
        ),
    ));
    let fwd = relay.addr("fwd");
    for (client, status) in [("127.0.0.77", 200), ("127.0.0.78", 403)] {
        let mut stream = connect(fwd);
        // This test is the balancer in front of the relay.
        let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 {}\r\n", fwd.port());
        stream.write_all(header.as_bytes()).unwrap();
        assert_eq!(get_status(stream, "/status"), status, "client {client}");
    }
}

/// A port free now (bound, then released) for haproxy's frontend.
fn free_port() -> u16 {
    closed_port().port()
}

#[test]
fn haproxy_accept_proxy_reads_the_client_from_the_relays_header() {
    if std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy; .ci/run does)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // haproxy answers every request with the source and destination the PROXY header gave it.
    let config = format!(
        "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 2s\n    \
         timeout client 10s\n    timeout server 10s\nfrontend f\n    bind {front} accept-proxy\n    \
         http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port] %[dst]:%[dst_port]\"\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    /// Killed (by PID) and reaped on drop.
    struct Haproxy(std::process::Child);
    impl Drop for Haproxy {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let haproxy = Haproxy(
        std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let pid = haproxy.0.id();
    assert!(
        wait_until(common::START_TIMEOUT, || TcpStream::connect(front).is_ok()),
        "haproxy (pid {pid}) did not listen on {front}"
    );
    for version in ["v1", "v2"] {
        let relay = Server::start(&relay_config(
            2,
            &format!("upstream = \"{front}\"\nupstream_proxy_protocol = \"{version}\""),
        ));
        let fwd = relay.addr("fwd");
        let mut stream = common::connect_from([127, 0, 0, 5].into(), fwd);
        let client = stream.local_addr().unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        assert_eq!(body, format!("{client} {fwd}"), "{version}: {text}");
    }
}

#[test]
fn bad_upstream_keys_are_configuration_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let forward = "[[listener]]\nname = \"f\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
                   service = \"forward\"\n";
    let echo = "[[listener]]\nname = \"e\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
                service = \"echo\"\n";
    let cases: &[(String, &[&str])] = &[
        (
            format!("{forward}upstream = \"127.0.0.1:9\"\nupstreams = [\"127.0.0.1:10\"]\n"),
            &["listener[0].upstreams", "not both"],
        ),
        (
            format!("{forward}upstreams = [\"127.0.0.1:9\", \"127.0.0.1:9\"]\n"),
            &["listener[0].upstreams[1]", "listed twice"],
        ),
        (
            format!("{forward}upstreams = [\"127.0.0.1:9\", \"no port\"]\n"),
            &["listener[0].upstreams[1]", "no port"],
        ),
        (
            format!("{forward}upstreams = [\"127.0.0.1:9\"]\nbalance = \"random\"\n"),
            &["balance", "random"],
        ),
        (
            format!("{forward}upstream = \"127.0.0.1:9\"\nbalance = \"least_conn\"\n"),
            &["listener[0].balance", "only read with upstreams"],
        ),
        (
            format!("{forward}upstream = \"127.0.0.1:9\"\nupstream_fail_timeout = \"3s\"\n"),
            &[
                "listener[0].upstream_fail_timeout",
                "only read with upstreams",
            ],
        ),
        (
            format!("{forward}upstreams = [\"127.0.0.1:9\"]\nupstream_fail_timeout = \"soon\"\n"),
            &["upstream_fail_timeout", "not a duration"],
        ),
        (
            format!("{forward}upstream = \"127.0.0.1:9\"\nupstream_proxy_protocol = \"v3\"\n"),
            &["upstream_proxy_protocol", "v3"],
        ),
        (
            format!("{echo}upstream_proxy_protocol = \"v2\"\n"),
            &["listener[0].upstream_proxy_protocol", "only forward"],
        ),
        (
            format!("{echo}upstreams = [\"127.0.0.1:9\"]\n"),
            &["listener[0].upstreams", "only forward"],
        ),
        (forward.to_owned(), &["listener[0].upstream", "required"]),
    ];
    for (at, (config, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{at}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = common::run_plexus(
            &["serve", "--config", path.to_str().unwrap(), "--check"],
            None,
            Duration::from_secs(30),
        );
        out.assert_no_panic();
        out.assert_code(2);
        for needle in *needles {
            out.assert_stderr_contains(needle);
        }
    }
    // And the good ones pass.
    for good in [
        format!("{forward}upstreams = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\nbalance = \"least_conn\"\nupstream_fail_timeout = \"0s\"\nupstream_proxy_protocol = \"v1\"\nproxy_protocol = true\n"),
        format!("{forward}upstream = \"127.0.0.1:9\"\nupstream_proxy_protocol = \"v2\"\n"),
    ] {
        let path = dir.path().join("good.toml");
        std::fs::write(&path, good).unwrap();
        let out = common::run_plexus(
            &["serve", "--config", path.to_str().unwrap(), "--check"],
            None,
            Duration::from_secs(30),
        );
        out.assert_code(0);
    }
}
