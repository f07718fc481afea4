//! Scale-out behind a real HAProxy (from the distribution's packages): two plexus instances with
//! `proxy_protocol = true` behind `send-proxy-v2` backends with `/healthz` checks. Requests spread
//! over both; plexus sees the real client address (its ACL refuses one client's address although
//! every connection comes from HAProxy); SIGTERM to one instance under load loses no request and
//! no echoed byte.
//!
//! Skipped, saying why, when `haproxy` is not installed (`.ci/run` installs it).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn plexus_config() -> String {
    r#"[server]
event_loops = 2
shutdown_grace = "20s"

[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
proxy_protocol = true
[listener.acl]
deny = ["127.0.0.66/32"]

[[listener]]
name = "echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
proxy_protocol = true
"#
    .to_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running haproxy, killed by PID on drop.
struct Haproxy {
    child: Child,
    web: SocketAddr,
    echo: SocketAddr,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_haproxy(dir: &Path, a: &Server, b: &Server) -> Haproxy {
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let echo: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"global
    maxconn 2000
defaults
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend web
    mode http
    bind {web}
    default_backend plexus_http
backend plexus_http
    mode http
    balance roundrobin
    option http-server-close
    http-reuse never
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    server a {a_http} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1
    server b {b_http} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1
frontend echo
    mode tcp
    bind {echo}
    default_backend plexus_echo
backend plexus_echo
    mode tcp
    balance roundrobin
    server a {a_echo} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1
    server b {b_echo} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1
"#,
        a_http = a.addr("http"),
        b_http = b.addr("http"),
        a_echo = a.addr("echo"),
        b_echo = b.addr("echo"),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let haproxy = Haproxy { child, web, echo };
    let up = wait_until(START_TIMEOUT, || {
        http_get(haproxy.web, None, "/healthz").is_some_and(|(status, _)| status == 200)
    });
    assert!(up, "haproxy did not serve /healthz through plexus");
    haproxy
}

/// One GET on a new connection (from `local` if given); `(status, body)` or `None` if the
/// connection failed or closed without a response.
fn http_get(addr: SocketAddr, local: Option<IpAddr>, path: &str) -> Option<(u16, String)> {
    let mut stream = match local {
        Some(ip) => connect_from(ip, addr),
        None => TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).ok()?,
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn responses_2xx(server: &Server) -> u64 {
    // Ask the instance directly (not through HAProxy); the header is ours to send.
    let mut stream = connect(server.addr("http"));
    stream
        .write_all(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\nGET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("plexus_http_responses_total{class=\"2xx\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn haproxy_available() -> bool {
    match Command::new("haproxy").arg("-v").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy; .ci/run does)");
            false
        }
    }
}

#[test]
fn requests_spread_over_two_instances_and_plexus_sees_the_real_client() {
    if !haproxy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start(&plexus_config());
    let b = Server::start(&plexus_config());
    let haproxy = start_haproxy(dir.path(), &a, &b);
    let (a0, b0) = (responses_2xx(&a), responses_2xx(&b));
    let client: IpAddr = "127.0.0.55".parse().unwrap();
    for _ in 0..40 {
        let (status, body) = http_get(haproxy.web, Some(client), "/healthz").expect("a response");
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    let (a1, b1) = (responses_2xx(&a), responses_2xx(&b));
    assert!(
        a1 - a0 >= 10 && b1 - b0 >= 10,
        "not spread: a +{} b +{}",
        a1 - a0,
        b1 - b0
    );

    // Every connection plexus gets comes from HAProxy (127.0.0.1), yet the listener ACL refuses
    // 127.0.0.66 and only it: plexus acts on the address in the PROXY header.
    let refused = http_get(haproxy.web, Some("127.0.0.66".parse().unwrap()), "/healthz");
    assert!(
        refused.as_ref().is_none_or(|(status, _)| *status >= 500),
        "the denied client was served: {refused:?}"
    );
    let refusal = |server: &Server| {
        server.wait_for_log(0, Duration::from_secs(5), |line| {
            line.contains("reason=acl") && line.contains("127.0.0.66")
        })
    };
    assert!(
        refusal(&a).or_else(|| refusal(&b)).is_some(),
        "neither instance logged refusing 127.0.0.66"
    );
    let (status, _) = http_get(haproxy.web, Some(client), "/healthz").unwrap();
    assert_eq!(status, 200);
}

#[test]
fn sigterm_to_one_instance_under_load_loses_no_request_and_no_echoed_byte() {
    if !haproxy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = Server::start(&plexus_config());
    let b = Server::start(&plexus_config());
    let haproxy = start_haproxy(dir.path(), &a, &b);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));

    // HTTP load: new connections, one request each, through HAProxy.
    let web = haproxy.web;
    let http_load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // An ordinary page: `/healthz` itself turns 503 ("draining") the moment
                    // the drain starts — that is what takes the instance out of haproxy's
                    // rotation — so a request for it racing the check is no lost request.
                    match http_get(web, None, "/") {
                        Some((200, body)) if body.contains("plexus") => {
                            served.fetch_add(1, Ordering::Relaxed)
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();

    // Echo streams through HAProxy: 2 MiB each, written in 16 KiB pieces, every byte checked.
    let echo = haproxy.echo;
    let streams: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let mut stream = connect(echo);
                let total = 2 * MIB;
                let writer_stream = stream.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    let mut s = writer_stream;
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    while sent < total {
                        fill_pattern(sent, &mut buf);
                        s.write_all(&buf).unwrap();
                        sent += buf.len() as u64;
                        thread::sleep(Duration::from_millis(2));
                    }
                });
                let mut received = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                let deadline = Instant::now() + Duration::from_secs(60);
                while received < total && Instant::now() < deadline {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            assert!(check_pattern(received, &buf[..n]).is_ok(), "echo corrupted");
                            received += n as u64;
                        }
                        Err(err) => panic!("echo stream failed after {received} bytes: {err}"),
                    }
                }
                writer.join().unwrap();
                received
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(500));
    let before = served.load(Ordering::Relaxed);
    a.signal("TERM");
    let status = a
        .wait_exit(Duration::from_secs(60))
        .expect("instance a exits");
    assert!(status.success(), "instance a: {}", describe_status(status));
    // Load keeps flowing through b after a is gone.
    let after_exit = served.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || served
        .load(Ordering::Relaxed)
        > after_exit + 50));
    stop.store(true, Ordering::Relaxed);
    for worker in http_load {
        worker.join().unwrap();
    }
    for stream in streams {
        assert_eq!(stream.join().unwrap(), 2 * MIB, "an echo stream lost bytes");
    }
    assert!(served.load(Ordering::Relaxed) > before);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the drain"
    );
    drop(b);
}
