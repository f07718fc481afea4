//! End-to-end tests of `plexus cert` and `plexus connect tls://`: the generated files (checked
//! with `openssl`), the TLS client against a real peer (`openssl s_server -rev`, which answers
//! each line reversed) and against plexus' own tls echo listener, trust options (`--ca`,
//! `--insecure`, the system roots), SNI, ALPN and the exit codes.
//!
//! Every external process is bounded in time and killed by PID.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const OPENSSL: &str = "/usr/bin/openssl";
/// Bound on one short `plexus` or `openssl` command.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `cmd` to completion with piped output; kills it (by PID) and panics after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Runs `openssl ARGS...`, asserts success and returns its stdout.
fn openssl(args: &[&str]) -> String {
    let out = run_bounded(Command::new(OPENSSL).args(args), CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path as a `&str` (temporary paths are UTF-8).
fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs `plexus cert --out DIR [--name N]...`, asserts exit 0, returns (cert path, key path).
fn make_cert(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let mut args = vec!["cert", "--out", s(dir)];
    for name in names {
        args.extend(["--name", name]);
    }
    let out = run_plexus(&args, None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(0);
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// SHA-256 of a PEM certificate as lower-case hex without colons (from `openssl x509`).
fn openssl_fingerprint(cert: &Path) -> String {
    let out = openssl(&["x509", "-in", s(cert), "-noout", "-fingerprint", "-sha256"]);
    let hex = out
        .trim()
        .rsplit('=')
        .next()
        .expect("fingerprint line")
        .replace(':', "")
        .to_lowercase();
    assert_eq!(
        hex.len(),
        64,
        "unexpected openssl fingerprint output: {out}"
    );
    hex
}

/// The value of `key=` in the `connected tls ...` line of `stderr`.
fn connected_field(stderr: &str, key: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("connected tls "))
        .unwrap_or_else(|| panic!("no `connected tls` line on stderr:\n{stderr}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in: {line}"))
        .to_owned()
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `openssl s_server -rev` (each line comes back reversed) on 127.0.0.1; killed by PID on drop.
struct OpensslServer {
    child: Child,
    port: u16,
    output: Arc<Mutex<String>>,
}

impl OpensslServer {
    /// Starts it with `cert`/`key` and `extra` arguments and waits for its `ACCEPT` line
    /// (retrying on another port if the one picked was taken meanwhile).
    fn start(cert: &Path, key: &Path, extra: &[&str]) -> OpensslServer {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let accept = format!("127.0.0.1:{port}");
            let mut child = Command::new(OPENSSL)
                .args([
                    "s_server",
                    "-accept",
                    &accept,
                    "-cert",
                    s(cert),
                    "-key",
                    s(key),
                ])
                .arg("-rev")
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn openssl s_server");
            let output = Arc::new(Mutex::new(String::new()));
            for pipe in [
                Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
                Box::new(child.stderr.take().expect("stderr")),
            ] {
                let sink = Arc::clone(&output);
                thread::spawn(move || {
                    let mut pipe = pipe;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        sink.lock()
                            .expect("output lock")
                            .push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
            }
            let server = OpensslServer {
                child,
                port,
                output,
            };
            let ready = wait_until(Duration::from_secs(10), || {
                server.output().contains("ACCEPT")
            });
            if ready {
                return server;
            }
            last = server.output();
            // Dropped here: killed; try another port.
        }
        panic!("openssl s_server did not start; its output:\n{last}");
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL to this child's PID
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- openssl s_server output ----\n{}", self.output());
        }
    }
}

/// A config with one tls echo listener `tls-echo` on 127.0.0.1:0; `tls` is the `[tls]` table
/// (empty for the ephemeral certificate).
fn tls_echo_config(tls: &str) -> String {
    format!(
        r#"[server]
event_loops = 2

{tls}

[[listener]]
name = "tls-echo"
transport = "tls"
addr = "127.0.0.1:0"
service = "echo"
"#
    )
}

// ---------------------------------------------------------------------------------------------
// plexus cert
// ---------------------------------------------------------------------------------------------

/// `plexus cert` writes cert.pem and key.pem (0600, creating the directory) for the names
/// given, as DNS and IP SANs; the key matches the certificate; existing files are kept unless
/// `--force`.
#[test]
fn cert_writes_pair_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tls"); // does not exist yet
    let (cert, key) = make_cert(&dir, &["localhost", "127.0.0.1"]);

    let mode = std::fs::metadata(&key)
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem mode {mode:o}");
    let text = openssl(&["x509", "-in", s(&cert), "-noout", "-text"]);
    assert!(
        text.contains("DNS:localhost"),
        "no DNS:localhost SAN:\n{text}"
    );
    assert!(
        text.contains("IP Address:127.0.0.1"),
        "no IP Address:127.0.0.1 SAN:\n{text}"
    );
    // The key is the certificate's.
    let cert_pub = openssl(&["x509", "-in", s(&cert), "-noout", "-pubkey"]);
    let key_pub = openssl(&["pkey", "-in", s(&key), "-pubout"]);
    assert_eq!(cert_pub, key_pub, "key.pem does not match cert.pem");

    // Again without --force: refused, files untouched.
    let before = std::fs::read(&cert).expect("read cert.pem");
    let args = ["cert", "--out", s(&dir), "--name", "localhost"];
    let out = run_plexus(&args, None, CMD_TIMEOUT);
    out.assert_no_panic();
    assert_ne!(out.code(), 0, "overwrote without --force:\n{}", out.stderr);
    out.assert_stderr_contains("exists");
    assert_eq!(std::fs::read(&cert).expect("read cert.pem"), before);

    // With --force: replaced, key still 0600.
    let out = run_plexus(&[&args[..], &["--force"]].concat(), None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(0);
    assert_ne!(std::fs::read(&cert).expect("read cert.pem"), before);
    let mode = std::fs::metadata(&key)
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem mode after --force {mode:o}");
}

/// Without `--name` the certificate is for localhost, 127.0.0.1 and ::1.
#[test]
fn cert_default_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, _) = make_cert(tmp.path(), &[]);
    let text = openssl(&["x509", "-in", s(&cert), "-noout", "-text"]);
    for san in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
    ] {
        assert!(text.contains(san), "no {san} SAN:\n{text}");
    }
}

/// A name that is neither a DNS name nor an IP address, or a missing --out: usage error.
#[test]
fn cert_usage_errors_exit_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run_plexus(
        &["cert", "--out", s(tmp.path()), "--name", "not a name"],
        None,
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(2);
    assert!(!tmp.path().join("cert.pem").exists(), "wrote a cert anyway");
    let out = run_plexus(&["cert"], None, CMD_TIMEOUT);
    out.assert_code(2);
}

// ---------------------------------------------------------------------------------------------
// plexus connect tls:// against openssl s_server
// ---------------------------------------------------------------------------------------------

/// With `--ca` the handshake succeeds (TLS 1.3), lines go out and come back reversed, stdin EOF
/// ends the session with exit 0, and the reported fingerprint is the certificate's.
#[test]
fn connect_tls_with_ca_against_openssl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path(), &["localhost", "127.0.0.1"]);
    let server = OpensslServer::start(&cert, &key, &[]);
    let out = run_plexus(
        &["connect", &server.url(), "--ca", s(&cert)],
        Some(b"hello\nworld\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "olleh\ndlrow\n");
    assert_eq!(connected_field(&out.stderr, "version"), "TLSv1_3");
    assert_eq!(
        connected_field(&out.stderr, "peer_cert_sha256"),
        openssl_fingerprint(&cert)
    );
}

/// TLS 1.2 works too, and the offered ALPN protocol the server picks is reported.
#[test]
fn connect_tls12_and_alpn_against_openssl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path(), &["localhost"]);
    let server = OpensslServer::start(&cert, &key, &["-tls1_2", "-alpn", "foo"]);
    let url = format!("tls://localhost:{}", server.port);
    let out = run_plexus(
        &[
            "connect",
            &url,
            "--ca",
            s(&cert),
            "--alpn",
            "bar",
            "--alpn",
            "foo",
        ],
        Some(b"hello\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "olleh\n");
    assert_eq!(connected_field(&out.stderr, "version"), "TLSv1_2");
    assert_eq!(connected_field(&out.stderr, "alpn"), "foo");
}

/// A self-signed certificate is not in the system roots: exit 1, stderr names the
/// certificate problem. `--insecure` accepts it (with a warning).
#[test]
fn connect_tls_untrusted_then_insecure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path(), &["localhost", "127.0.0.1"]);
    let server = OpensslServer::start(&cert, &key, &[]);

    let out = run_plexus(&["connect", &server.url()], Some(b"hello\n"), CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(1);
    out.assert_stderr_contains("certificate");
    assert!(out.stdout.is_empty(), "data passed an untrusted handshake");

    let out = run_plexus(
        &["connect", &server.url(), "--insecure"],
        Some(b"hello\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    out.assert_stderr_contains("warning");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "olleh\n");
}

/// The name verified is HOST (an IP address here) unless `--sni` names another: a certificate
/// only for `localhost` fails for 127.0.0.1, and passes with `--sni localhost`.
#[test]
fn connect_tls_checks_the_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path(), &["localhost"]);
    let server = OpensslServer::start(&cert, &key, &[]);

    let out = run_plexus(
        &["connect", &server.url(), "--ca", s(&cert)],
        Some(b"hello\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(1);
    out.assert_stderr_contains("not valid for name");

    let out = run_plexus(
        &[
            "connect",
            &server.url(),
            "--ca",
            s(&cert),
            "--sni",
            "localhost",
        ],
        Some(b"hello\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "olleh\n");
}

// ---------------------------------------------------------------------------------------------
// Exit codes
// ---------------------------------------------------------------------------------------------

/// Nothing listening: exit 1 with a message.
#[test]
fn connect_tls_refused_exits_1() {
    let out = run_plexus(&["connect", "tls://127.0.0.1:1"], None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(1);
    out.assert_stderr_contains("refused");
}

/// Contradictory or misplaced options (tls options on udp://, ALPN on dtls://), an unreadable --ca:
/// usage errors, exit 2, nothing is connected.
#[test]
fn connect_tls_usage_errors_exit_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "no certificate here\n").expect("write file");
    let cases: &[&[&str]] = &[
        &["connect", "tls://127.0.0.1:1", "--ca", "x", "--insecure"],
        &[
            "connect",
            "tls://127.0.0.1:1",
            "--ca",
            "/nonexistent/ca.pem",
        ],
        &["connect", "tls://127.0.0.1:1", "--ca", s(&not_pem)],
        &["connect", "tls://127.0.0.1"],
        &["connect", "tcp://127.0.0.1:1", "--insecure"],
        &["connect", "udp://127.0.0.1:1", "--insecure"],
        &["connect", "dtls://127.0.0.1:1", "--alpn", "h2"],
        &["connect", "quic://127.0.0.1:1"],
    ];
    for args in cases {
        let out = run_plexus(args, None, CMD_TIMEOUT);
        out.assert_no_panic();
        out.assert_code(2);
        assert!(!out.stderr.trim().is_empty(), "{args:?}: no message");
    }
}

/// A peer that does not speak TLS (plexus' plain tcp echo sends the ClientHello back): the
/// handshake fails, exit 1.
#[test]
fn connect_tls_to_plain_tcp_exits_1() {
    let server = Server::start(&echo_config(""));
    let url = format!("tls://{}", server.addr("tcp-echo"));
    let out = run_plexus(&["connect", &url, "--insecure"], None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(1);
    out.assert_stderr_contains("TLS handshake failed");
}

// ---------------------------------------------------------------------------------------------
// plexus connect tls:// against plexus serve
// ---------------------------------------------------------------------------------------------

/// 1 MiB of binary data through plexus' tls echo listener (certificate from `plexus cert`)
/// comes back byte-exact, and the session ends with exit 0 after stdin EOF.
#[test]
fn connect_tls_roundtrips_1mib_through_plexus_tls_echo() {
    const TOTAL: usize = 1024 * 1024;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path(), &["localhost", "127.0.0.1"]);
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", s(&cert), s(&key));
    let server = Server::start(&tls_echo_config(&tls));
    let url = format!("tls://{}", server.addr("tls-echo"));

    let mut data = vec![0u8; TOTAL];
    fill_pattern(0, &mut data);
    let out = run_plexus(
        &["connect", &url, "--ca", s(&cert)],
        Some(&data),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(out.stdout.len(), TOTAL, "bytes on stdout");
    assert_eq!(
        check_pattern(0, &out.stdout),
        Ok(()),
        "first mismatching byte"
    );
    assert_eq!(
        connected_field(&out.stderr, "peer_cert_sha256"),
        openssl_fingerprint(&cert)
    );
}

/// The ephemeral certificate of a tls listener without `[tls]`: rejected by default (exit 1),
/// accepted with `--insecure`.
#[test]
fn connect_tls_to_ephemeral_certificate() {
    let server = Server::start(&tls_echo_config(""));
    let url = format!("tls://{}", server.addr("tls-echo"));

    let out = run_plexus(&["connect", &url], Some(b"one\n"), CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(1);
    out.assert_stderr_contains("certificate");

    let out = run_plexus(
        &["connect", &url, "--insecure"],
        Some(b"one\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n");
}

/// The self-signed certificate `openssl req -x509` makes carries `basicConstraints CA:TRUE`;
/// webpki alone refuses it as a server certificate (`CaUsedAsEndEntity`), while curl
/// `--cacert` and `openssl s_client -CAfile` accept it. Trusted explicitly with `--ca`, it
/// must work for `connect tls://`, `connect dtls://` and `bench --ca`; the name is still
/// checked, and a different certificate in `--ca` is still refused.
#[test]
fn ca_accepts_an_openssl_req_self_signed_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let make = |name: &str| {
        let (cert, key) = (
            tmp.path().join(format!("{name}.pem")),
            tmp.path().join(format!("{name}.key")),
        );
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
        ]);
        (cert, key)
    };
    let (cert, key) = make("server");
    let (other, _) = make("other");
    let config =
        format!(
        "{}\n[[listener]]\nname = \"dtls-echo\"\ntransport = \"dtls\"\naddr = \"127.0.0.1:0\"\n\
         service = \"echo\"\n",
        tls_echo_config(&format!("[tls]\ncert = {:?}\nkey = {:?}\n", s(&cert), s(&key)))
    );
    let server = Server::start(&config);
    let tls = server.addr("tls-echo");
    let dtls = server.addr("dtls-echo");
    let url = format!("tls://{tls}");
    for extra in [&[][..], &["--sni", "localhost"][..]] {
        let mut args = vec!["connect", &url, "--ca", s(&cert)];
        args.extend_from_slice(extra);
        let out = run_plexus(&args, Some(b"trusted\n"), CMD_TIMEOUT);
        out.assert_no_panic();
        out.assert_code(0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "trusted\n",
            "{extra:?}"
        );
    }
    // The name is still checked; another certificate is still not trusted.
    let out = run_plexus(
        &[
            "connect",
            &url,
            "--ca",
            s(&cert),
            "--sni",
            "elsewhere.example",
        ],
        Some(b"x\n"),
        CMD_TIMEOUT,
    );
    out.assert_code(1);
    out.assert_stderr_contains("certificate");
    let out = run_plexus(
        &["connect", &url, "--ca", s(&other)],
        Some(b"x\n"),
        CMD_TIMEOUT,
    );
    out.assert_code(1);
    out.assert_stderr_contains("certificate");

    let dtls_url = format!("dtls://{dtls}");
    let out = run_plexus(
        &["connect", &dtls_url, "--ca", s(&cert)],
        Some(b"over dtls\n"),
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over dtls\n");

    let tls_addr = tls.to_string();
    let out = run_plexus(
        &[
            "bench",
            "tls-echo",
            "--addr",
            &tls_addr,
            "--ca",
            s(&cert),
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--connections",
            "2",
            "--size",
            "64",
        ],
        None,
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"certificates_verified\":true"), "{json}");
    assert!(json.contains("\"errors_total\":0"), "{json}");
}
