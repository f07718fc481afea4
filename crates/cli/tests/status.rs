//! End-to-end tests of the status page: `/status` in a real browser (headless Chromium, with
//! and without JavaScript, screenshots kept under the target directory), `/status.json`
//! against `/metrics`, the page's ACL and off switch, and the Grafana dashboard's queries
//! against a live server's metric families.
//!
//! Every process is started on port 0 over loopback, killed by PID, and every wait is bounded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Bound on one Chromium run (the machine is shared and slow to start a browser).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

fn status_config(http_extra: &str) -> String {
    format!(
        r#"[server]
event_loops = 2
idle_timeout = "60s"

[http]
{http_extra}

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
[listener.acl]
deny = ["127.0.0.3/32"]

[[listener]]
name = "chat"
transport = "tcp"
addr = "127.0.0.1:0"
service = "chat"

[[listener]]
name = "udp-echo"
transport = "udp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "web"
transport = "tcp"
addr = "127.0.0.1:0"
service = "http"
"#
    )
}

/// One response read off a connection: status, headers (lower-case names), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Every byte of the response as it came off the wire.
    raw_len: usize,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `GET path` on `stream` (keep-alive) and reads one Content-Length framed response.
fn request(stream: &mut TcpStream, path: &str) -> (usize, Response) {
    let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).expect("read a response head");
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
        assert!(Instant::now() < deadline, "no response head in time");
    };
    let text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).expect("read a body");
        assert!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
        assert!(Instant::now() < deadline, "no body in time");
    }
    assert_eq!(buf.len(), head_end + length, "bytes after the response");
    let response = Response {
        status,
        headers,
        body: buf[head_end..].to_vec(),
        raw_len: buf.len(),
    };
    (head.len(), response)
}

fn get_from(local: Option<IpAddr>, addr: SocketAddr, path: &str) -> Response {
    let mut stream = match local {
        Some(ip) => connect_from(ip, addr),
        None => connect(addr),
    };
    request(&mut stream, path).1
}

/// `/metrics` as sample name (with labels, as written) → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_owned(), value.parse().expect("sample value"))
        })
        .collect()
}

fn metric(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in /metrics"))
}

/// Runs Chromium headless with `args` (plus the fixed hardening flags and a fresh profile) on
/// `url`, bounded by [`BROWSER_TIMEOUT`] (killed by PID), and returns its stdout.
fn chromium(args: &[&str], url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} not found: these tests need Debian's `chromium` package \
         (apt-get install chromium; .ci/run installs it)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill(); // by PID
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.is_some_and(|s| s.success()),
        "chromium {args:?} {url}: {status:?} (None = killed after {BROWSER_TIMEOUT:?}); stderr:\n{err}"
    );
    out
}

/// A headless Chromium driven over the DevTools protocol on `--remote-debugging-pipe`
/// (messages are JSON, each ended by a NUL byte). Killed by PID when dropped.
struct Devtools {
    child: std::process::Child,
    commands: std::process::ChildStdin,
    replies: std::sync::mpsc::Receiver<serde_json::Value>,
    events: Vec<serde_json::Value>,
    next_id: u64,
    deadline: Instant,
    _profile: tempfile::TempDir,
}

impl Devtools {
    fn start(extra: &[&str]) -> Devtools {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: these tests need Debian's `chromium` package \
             (apt-get install chromium; .ci/run installs it)"
        );
        let profile = tempfile::tempdir().unwrap();
        // The protocol pipe is fds 3 (commands in) and 4 (replies out): the shell maps them
        // onto our stdin and stdout pipes, then execs Chromium (same PID).
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (sender, replies) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut pending = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&chunk[..n]);
                while let Some(end) = pending.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = pending.drain(..=end).collect();
                    let Ok(value) = serde_json::from_slice(&message[..end]) else {
                        continue;
                    };
                    if sender.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        Devtools {
            child,
            commands,
            replies,
            events: Vec::new(),
            next_id: 0,
            deadline: Instant::now() + BROWSER_TIMEOUT,
            _profile: profile,
        }
    }

    fn receive(&mut self, waiting_for: &str) -> serde_json::Value {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.replies.recv_timeout(left).unwrap_or_else(|_| {
            panic!("chromium: nothing for {waiting_for} within {BROWSER_TIMEOUT:?}")
        })
    }

    /// Sends one command and returns its result (events that arrive meanwhile are kept).
    fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
        session: Option<&str>,
    ) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .expect("write to chromium's protocol pipe");
        loop {
            let reply = self.receive(method);
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
            self.events.push(reply);
        }
    }

    /// Waits for the event `method` (or finds it among those already seen).
    fn wait_event(&mut self, method: &str) {
        while !self.events.iter().any(|e| e["method"] == method) {
            let event = self.receive(method);
            self.events.push(event);
        }
    }
}

impl Drop for Devtools {
    fn drop(&mut self) {
        let _ = self.child.kill(); // by PID
        let _ = self.child.wait();
    }
}

/// Loads `url` in headless Chromium with JavaScript disabled (`--blink-settings=
/// scriptEnabled=false` and `Emulation.setScriptExecutionDisabled`) and returns the rendered
/// DOM, read with the DevTools protocol's `DOM.getOuterHTML` (which runs no script in the
/// page; `--dump-dom` does, so it prints nothing with JavaScript off), and the computed
/// `border-top-left-radius` of its first `<section>` (`CSS.getComputedStyleForNode`): the
/// page's style sheet set it, so it says whether the browser applied the sheet under the
/// page's Content-Security-Policy.
fn dom_without_javascript(url: &str) -> (String, String) {
    let mut browser = Devtools::start(&["--blink-settings=scriptEnabled=false"]);
    let target = browser.call(
        "Target.createTarget",
        serde_json::json!({"url": "about:blank"}),
        None,
    );
    let attached = browser.call(
        "Target.attachToTarget",
        serde_json::json!({"targetId": target["targetId"], "flatten": true}),
        None,
    );
    let session = attached["sessionId"].as_str().unwrap().to_owned();
    let session = Some(session.as_str());
    browser.call(
        "Emulation.setScriptExecutionDisabled",
        serde_json::json!({"value": true}),
        session,
    );
    browser.call("Page.enable", serde_json::json!({}), session);
    browser.call("Page.navigate", serde_json::json!({"url": url}), session);
    browser.wait_event("Page.loadEventFired");
    let document = browser.call("DOM.getDocument", serde_json::json!({"depth": 0}), session);
    let html = browser.call(
        "DOM.getOuterHTML",
        serde_json::json!({"nodeId": document["root"]["nodeId"]}),
        session,
    );
    browser.call("DOM.enable", serde_json::json!({}), session);
    browser.call("CSS.enable", serde_json::json!({}), session);
    let section = browser.call(
        "DOM.querySelector",
        serde_json::json!({"nodeId": document["root"]["nodeId"], "selector": "section"}),
        session,
    );
    let computed = browser.call(
        "CSS.getComputedStyleForNode",
        serde_json::json!({"nodeId": section["nodeId"]}),
        session,
    );
    let radius = computed["computedStyle"]
        .as_array()
        .expect("computedStyle")
        .iter()
        .find(|p| p["name"] == "border-top-left-radius")
        .and_then(|p| p["value"].as_str())
        .unwrap_or("")
        .to_owned();
    (
        html["outerHTML"].as_str().expect("outerHTML").to_owned(),
        radius,
    )
}

/// The `data-sessions` value of the element with `id` in a dumped DOM.
fn sessions_in_dom(dom: &str, id: &str) -> u64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element id={id} in the page:\n{dom}"));
    let tag_end = at + dom[at..].find('>').unwrap();
    let tag = &dom[at..tag_end];
    let value = tag
        .split("data-sessions=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no data-sessions on {tag}"));
    value.parse().unwrap()
}

fn artifact_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("screenshot {path:?}: {e}"));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{path:?} is not a plausible PNG screenshot ({} bytes)",
        bytes.len()
    );
    eprintln!(
        "screenshot kept: {} ({} bytes)",
        path.display(),
        bytes.len()
    );
}

#[test]
fn headless_chromium_shows_every_listener_and_the_sessions_opened_with_and_without_javascript() {
    let server = Server::start(&status_config(""));
    let url = format!("http://{}/status", server.addr("web"));

    let dom = chromium(&["--dump-dom"], &url);
    for name in ["tcp-echo", "chat", "udp-echo", "web"] {
        assert!(
            dom.contains(&format!("id=\"listener-{name}\"")),
            "listener {name} missing from the rendered page:\n{dom}"
        );
    }
    assert!(dom.contains("<title>plexus status</title>"), "{dom}");
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    assert_eq!(sessions_in_dom(&dom, "listener-tcp-echo"), 0);

    // N echo sessions, each proven live by an echo before the page is loaded again.
    const N: usize = 5;
    let mut sessions: Vec<TcpStream> = (0..N).map(|_| connect(server.addr("tcp-echo"))).collect();
    for (i, stream) in sessions.iter_mut().enumerate() {
        assert_echo(stream, format!("ping {i}\n").as_bytes());
    }
    let dom = chromium(&["--dump-dom"], &url);
    assert_eq!(
        sessions_in_dom(&dom, "listener-tcp-echo"),
        N as u64,
        "{dom}"
    );
    assert_eq!(sessions_in_dom(&dom, "listener-chat"), 0);
    let per_loop: u64 = (0..2)
        .map(|i| sessions_in_dom(&dom, &format!("loop-{i}")))
        .sum();
    // The browser's own connection to `web` may or may not still be counted.
    assert!(
        (N as u64..=N as u64 + 2).contains(&per_loop),
        "event loops hold {per_loop} sessions, expected {N} (+ the browser's)"
    );

    // Without JavaScript the numbers are there all the same (server-rendered). `--dump-dom`
    // itself needs script, so this DOM is read over the DevTools protocol instead.
    let (dom, radius) = dom_without_javascript(&url);
    // The Content-Security-Policy admits the page's one style sheet by its hash (no
    // inline allowance): had the hash been wrong, the sections would have square corners.
    assert_eq!(
        radius, "10px",
        "the style sheet applies under the page's CSP"
    );
    assert_eq!(
        sessions_in_dom(&dom, "listener-tcp-echo"),
        N as u64,
        "{dom}"
    );
    assert!(dom.contains("id=\"listener-udp-echo\""));
    assert!(dom.contains("id=\"total-sessions\""), "{dom}");

    // Screenshots, wide and phone-sized, kept as artifacts.
    let dir = artifact_dir();
    for (name, size) in [("wide", "1400,900"), ("phone", "390,844")] {
        let path = dir.join(format!("status-{name}.png"));
        let _ = std::fs::remove_file(&path);
        chromium(
            &[
                &format!("--screenshot={}", path.display()),
                &format!("--window-size={size}"),
                "--hide-scrollbars",
            ],
            &url,
        );
        assert_png(&path);
    }

    // The sessions closed: the page says so.
    drop(sessions);
    let zero = wait_until(Duration::from_secs(10), || {
        let json: serde_json::Value =
            serde_json::from_slice(&get_from(None, server.addr("web"), "/status.json").body)
                .unwrap();
        json["listeners"][0]["sessions_open"] == 0
    });
    assert!(zero, "tcp-echo sessions still counted after they closed");
}

#[test]
fn status_json_parses_and_agrees_with_metrics() {
    let server = Server::start(&status_config(""));
    // Some traffic first: an echo, and a refusal by the tcp-echo listener's ACL.
    let mut echo = connect(server.addr("tcp-echo"));
    assert_echo(&mut echo, b"hello\n");
    let mut refused = connect_from("127.0.0.3".parse().unwrap(), server.addr("tcp-echo"));
    assert!(probe_stream(&mut refused, b"x", Duration::from_secs(5)).refused());

    // Both on one keep-alive connection, nothing else running: the differences between the
    // two are exactly this connection's own bytes and responses.
    let mut stream = connect(server.addr("web"));
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    // A loop adds a session's byte counts just after its write: under a loaded machine the
    // echo loop may not have done so when status.json is rendered. So the pair is asked again
    // (at most 5 times) until no other session's count moves between them; a real disagreement
    // between the two renderings fails every time.
    let mut attempt = 0;
    let (status, metrics_request_len, json, m) = loop {
        attempt += 1;
        let (_, status) = request(&mut stream, "/status.json");
        assert_eq!(status.status, 200);
        assert_eq!(status.header("content-type"), Some("application/json"));
        assert_eq!(status.header("cache-control"), Some("no-store"));
        let (metrics_request_len, metrics) = request(&mut stream, "/metrics");
        assert_eq!(metrics.status, 200);
        let json: serde_json::Value = serde_json::from_slice(&status.body).expect("valid JSON");
        let m = parse_metrics(&metrics.text());
        let settled = metric(&m, "plexus_bytes_received_total")
            == n(&json["totals"]["bytes_in"]) + metrics_request_len as f64
            && metric(&m, "plexus_bytes_sent_total")
                == n(&json["totals"]["bytes_out"]) + status.raw_len as f64;
        if settled || attempt == 5 {
            break (status, metrics_request_len, json, m);
        }
        thread::sleep(Duration::from_millis(200));
    };

    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        json["config_source"].as_str().unwrap(),
        server.config_path().display().to_string()
    );
    assert!(json["last_reload"].is_null());
    assert!(n(&json["uptime_seconds"]) >= 0.0);
    assert_eq!(
        n(&json["started_unix_seconds"]),
        metric(&m, "plexus_start_time_seconds")
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "plexus_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    let totals = &json["totals"];
    assert_eq!(
        n(&totals["accepted"]),
        metric(&m, "plexus_connections_accepted_total")
    );
    for (reason, count) in totals["refused"].as_object().unwrap() {
        let name = format!("plexus_connections_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(n(count), metric(&m, &name), "{reason}");
    }
    assert_eq!(n(&totals["refused"]["acl"]), 1.0);
    let open: f64 = ["tcp", "tls"]
        .iter()
        .map(|t| metric(&m, &format!("plexus_sessions_open{{transport=\"{t}\"}}")))
        .sum::<f64>()
        + ["udp", "dtls"]
            .iter()
            .map(|t| {
                metric(
                    &m,
                    &format!("plexus_datagram_sessions_open{{transport=\"{t}\"}}"),
                )
            })
            .sum::<f64>();
    assert_eq!(n(&totals["sessions_open"]), open);
    assert_eq!(
        n(&totals["sessions_open"]),
        2.0,
        "the echo and this connection"
    );
    // /metrics was rendered after this connection's /metrics request was read and the
    // /status.json response written: exactly those bytes apart.
    assert_eq!(
        metric(&m, "plexus_bytes_received_total"),
        n(&totals["bytes_in"]) + metrics_request_len as f64
    );
    assert_eq!(
        metric(&m, "plexus_bytes_sent_total"),
        n(&totals["bytes_out"]) + status.raw_len as f64
    );

    let listeners = json["listeners"].as_array().unwrap();
    let names: Vec<&str> = listeners
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tcp-echo", "chat", "udp-echo", "web"]);
    for l in listeners {
        let name = l["name"].as_str().unwrap();
        let label = format!("{{listener=\"{name}\"}}");
        assert_eq!(
            n(&l["sessions_open"]),
            metric(
                &m,
                &format!(
                    "plexus_listener_sessions_open{{listener=\"{name}\",transport=\"{}\"}}",
                    l["transport"].as_str().unwrap()
                )
            ),
            "{name}"
        );
        assert_eq!(
            n(&l["accepted"]),
            metric(
                &m,
                &format!("plexus_listener_connections_accepted_total{label}")
            ),
            "{name}"
        );
        for (reason, count) in l["refused"].as_object().unwrap() {
            let sample = format!(
                "plexus_listener_connections_refused_total{{listener=\"{name}\",reason=\"{reason}\"}}"
            );
            assert_eq!(n(count), metric(&m, &sample), "{name} {reason}");
        }
        let addr = server.addr(name).to_string();
        assert_eq!(l["addr"].as_str().unwrap(), addr);
        let (bytes_in, bytes_out) = (
            metric(&m, &format!("plexus_listener_bytes_received_total{label}")),
            metric(&m, &format!("plexus_listener_bytes_sent_total{label}")),
        );
        if name == "web" {
            assert_eq!(bytes_in, n(&l["bytes_in"]) + metrics_request_len as f64);
            assert_eq!(bytes_out, n(&l["bytes_out"]) + status.raw_len as f64);
        } else {
            assert_eq!(
                (bytes_in, bytes_out),
                (n(&l["bytes_in"]), n(&l["bytes_out"]))
            );
        }
    }
    let echo_row = &listeners[0];
    assert_eq!(
        (
            n(&echo_row["accepted"]),
            n(&echo_row["refused"]["acl"]),
            n(&echo_row["bytes_in"]),
            n(&echo_row["sessions_open"])
        ),
        (1.0, 1.0, 6.0, 1.0)
    );
    assert_eq!(listeners[0]["transport"], "tcp");
    assert_eq!(listeners[0]["service"], "echo");
    assert_eq!(listeners[2]["transport"], "udp");

    let loops = json["event_loops"].as_array().unwrap();
    assert_eq!(loops.len(), 2);
    let mut loop_sessions = 0.0;
    for l in loops {
        let index = n(&l["index"]);
        let label = format!("{{loop=\"{index}\"}}");
        assert_eq!(
            n(&l["sessions_open"]),
            metric(&m, &format!("plexus_event_loop_sessions_open{label}"))
        );
        loop_sessions += n(&l["sessions_open"]);
        // Idle time only grows; the loops were idle most of their life.
        let waited = metric(
            &m,
            &format!("plexus_event_loop_poll_wait_seconds_total{label}"),
        );
        assert!(n(&l["poll_wait_seconds"]) <= waited + 1e-6);
        let busy = n(&l["busy_share"]);
        assert!((0.0..=1.0).contains(&busy), "{busy}");
    }
    assert_eq!(loop_sessions, n(&totals["sessions_open"]));

    for (result, key) in [("ok", "ok"), ("failed", "failed")] {
        let name = format!("plexus_tls_handshakes_total{{result=\"{result}\"}}");
        assert_eq!(n(&json["tls_handshakes"][key]), metric(&m, &name));
    }
    for kind in ["idle", "handshake", "upstream_connect"] {
        let name = format!("plexus_timeouts_total{{kind=\"{kind}\"}}");
        assert_eq!(n(&json["timeouts"][kind]), metric(&m, &name), "{kind}");
    }
    // The status response itself was counted after its body was rendered.
    let http = &json["http"];
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let name = format!("plexus_http_responses_total{{class=\"{class}\"}}");
        let extra = if class == "2xx" { 1.0 } else { 0.0 };
        assert_eq!(
            n(&http["responses"][class]) + extra,
            metric(&m, &name),
            "{class}"
        );
    }
    for (status, count) in http["rejected"].as_object().unwrap() {
        let name = format!("plexus_http_requests_rejected_total{{status=\"{status}\"}}");
        assert_eq!(n(count), metric(&m, &name), "{status}");
    }
    assert_eq!(
        n(&http["requests"]) + 1.0,
        metric(&m, "plexus_http_request_duration_seconds_count")
    );
    assert_eq!(json["rates"]["basis"], "since start");
    // No latency before the first completed request; a retried pair above counts the earlier
    // attempts' requests, and then there is one.
    assert_eq!(
        json["http"]["latency"]["p99_ms"].is_null(),
        n(&json["http"]["requests"]) == 0.0
    );

    // A second scrape a little later computes rates over the window since the first.
    thread::sleep(Duration::from_millis(1100));
    let (_, again) = request(&mut stream, "/status.json");
    let again: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(again["rates"]["basis"], "since last scrape");
    assert!(n(&again["rates"]["window_seconds"]) >= 1.0);
    assert!(n(&again["listeners"][3]["bytes_in_per_second"]) > 0.0);
    assert!(n(&again["http"]["latency"]["p99_ms"]) > 0.0);
    drop(echo);
}

#[test]
fn status_is_refused_outside_its_acl_and_absent_when_turned_off() {
    let server = Server::start(&status_config("status_allow = [\"127.0.0.1/32\"]"));
    let web = server.addr("web");
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    for path in ["/status", "/status.json"] {
        let refused = get_from(Some(outsider), web, path);
        assert_eq!(refused.status, 403, "{path}: {}", refused.text());
        assert!(
            refused.text().contains("status_allow"),
            "{}",
            refused.text()
        );
        let allowed = get_from(Some("127.0.0.1".parse().unwrap()), web, path);
        assert_eq!(allowed.status, 200, "{path}");
        let policy = allowed.header("content-security-policy").unwrap_or("");
        assert!(
            policy.starts_with("default-src 'none'"),
            "{path}: {policy:?}"
        );
    }
    // The rest of the service is not affected by the page's ACL.
    assert_eq!(get_from(Some(outsider), web, "/healthz").status, 200);
    assert_eq!(get_from(Some(outsider), web, "/metrics").status, 200);
    drop(server);

    let server = Server::start(&status_config("status = false"));
    let web = server.addr("web");
    for path in ["/status", "/status.json"] {
        assert_eq!(get_from(None, web, path).status, 404, "{path}");
    }
    assert_eq!(get_from(None, web, "/metrics").status, 200);
}

#[test]
fn a_bad_status_allow_entry_is_a_configuration_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, status_config("status_allow = [\"127.0.0.1/33\"]")).unwrap();
    let out = run_plexus(
        &["serve", "--check", "--config", path.to_str().unwrap()],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(2);
    out.assert_stderr_contains("http.status_allow[0]");
}

/// Every `plexus_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("plexus_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn walk_panels(panels: &serde_json::Value, exprs: &mut Vec<(String, String)>) {
    for panel in panels.as_array().expect("panels is an array") {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        if let Some(targets) = panel.get("targets") {
            for target in targets.as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {target}"));
                exprs.push((title.clone(), expr.to_owned()));
            }
        }
        if let Some(nested) = panel.get("panels") {
            walk_panels(nested, exprs);
        }
    }
}

#[test]
fn grafana_dashboard_queries_only_metric_families_a_live_server_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/grafana/plexus.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["title"], "plexus");
    let mut exprs = Vec::new();
    walk_panels(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 15, "only {} queries", exprs.len());

    let server = Server::start(&status_config(""));
    // One request so every family has samples (histogram included).
    assert_eq!(get_from(None, server.addr("web"), "/healthz").status, 200);
    let metrics = get_from(None, server.addr("web"), "/metrics").text();
    let exported: BTreeSet<String> = parse_metrics(&metrics)
        .keys()
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "panel {title:?}: {expr} names no plexus metric"
        );
        for name in names {
            assert!(
                exported.contains(&name),
                "panel {title:?} queries {name}, which /metrics does not export:\n{expr}"
            );
            used.insert(name);
        }
    }
    // What the dashboard is for: every one of these families is on it.
    for family in [
        "plexus_sessions_open",
        "plexus_listener_sessions_open",
        "plexus_connections_accepted_total",
        "plexus_connections_refused_total",
        "plexus_bytes_received_total",
        "plexus_bytes_sent_total",
        "plexus_tls_handshakes_total",
        "plexus_timeouts_total",
        "plexus_http_responses_total",
        "plexus_http_request_duration_seconds_bucket",
        "plexus_event_loop_poll_wait_seconds_total",
    ] {
        assert!(
            used.contains(family),
            "the dashboard has no panel on {family}"
        );
    }
    // Panel ids are unique (Grafana keys panels by id).
    let mut ids = BTreeSet::new();
    fn collect_ids(panels: &serde_json::Value, ids: &mut BTreeSet<i64>) {
        for panel in panels.as_array().unwrap() {
            assert!(
                ids.insert(panel["id"].as_i64().unwrap()),
                "duplicate id {}",
                panel["id"]
            );
            if let Some(nested) = panel.get("panels") {
                collect_ids(nested, ids);
            }
        }
    }
    collect_ids(&dashboard["panels"], &mut ids);
}

#[test]
fn the_page_reports_the_last_reload_and_lists_a_listener_added_by_it() {
    let config = status_config("");
    let server = Server::start(&config);
    let web = server.addr("web");
    let status = || -> serde_json::Value {
        serde_json::from_slice(&get_from(None, web, "/status.json").body).unwrap()
    };
    assert!(status()["last_reload"].is_null());

    std::fs::write(server.config_path(), "[server]\nevent_loops = \"two\"\n").unwrap();
    server.signal("HUP");
    let failed = wait_until(Duration::from_secs(20), || {
        status()["last_reload"]["ok"] == false
    });
    assert!(failed, "a failed reload is not reported: {}", status());
    let message = status()["last_reload"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("reload failed"), "{message}");
    let page = get_from(None, web, "/status").text();
    assert!(page.contains(">failed</b>"), "{page}");

    let added = format!(
        "{config}\n[[listener]]\nname = \"late<b>\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    );
    std::fs::write(server.config_path(), added).unwrap();
    server.signal("HUP");
    let applied = wait_until(Duration::from_secs(20), || {
        status()["last_reload"]["ok"] == true
    });
    assert!(
        applied,
        "a reload that worked is not reported: {}",
        status()
    );
    let json = status();
    assert!(
        json["last_reload"]["message"]
            .as_str()
            .unwrap()
            .contains("1 added"),
        "{json}"
    );
    let names: Vec<&str> = json["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tcp-echo", "chat", "udp-echo", "web", "late<b>"]);
    // Its name is escaped in the HTML, never markup.
    let page = get_from(None, web, "/status").text();
    assert!(page.contains("late&lt;b&gt;"), "{page}");
    assert!(!page.contains("late<b>"));
    assert!(page.contains(">applied</b>"), "{page}");
}
