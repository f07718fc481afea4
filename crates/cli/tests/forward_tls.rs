//! `forward` with `upstream_tls = true`: plexus originates TLS to the upstream, a real
//! `openssl s_server` whose certificate is signed by a test CA. With that CA in `upstream_ca`
//! the bytes go through (s_server's `-rev` answers each line reversed); with another CA the
//! certificate is refused, the client is closed, and a log line says why.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{connect, Server};

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A CA (`NAME.pem`, `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
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
        &format!("/CN={name}"),
        "-days",
        "2",
        "-keyout",
        s(&key),
        "-out",
        s(&cert),
    ]);
}

/// A server certificate for localhost / 127.0.0.1 signed by CA `ca`: (`srv.pem`, `srv.key`).
fn make_server_cert(dir: &Path, ca: &str) {
    let csr = dir.join("srv.csr");
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        s(&dir.join("srv.key")),
        "-out",
        s(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&csr),
        "-CA",
        s(&dir.join(format!("{ca}.pem"))),
        "-CAkey",
        s(&dir.join(format!("{ca}.key"))),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        s(&ext),
        "-out",
        s(&dir.join("srv.pem")),
    ]);
}

/// `openssl s_server -rev` on a free port; killed by PID on drop.
struct SServer {
    child: Child,
    port: u16,
}

impl SServer {
    fn start(dir: &Path) -> SServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                s(&dir.join("srv.pem")),
                "-key",
                s(&dir.join("srv.key")),
                "-rev",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        // It prints ACCEPT once it listens.
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("ACCEPT") => break,
                Some(Ok(_)) => {}
                _ => panic!("s_server did not start"),
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        SServer { child, port }
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `line` through the relay at `addr` on a new connection: the line that comes back.
fn line_through(addr: std::net::SocketAddr, line: &[u8]) -> String {
    let mut client = connect(addr);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    client.write_all(line).unwrap();
    let mut back = String::new();
    BufReader::new(client).read_line(&mut back).unwrap();
    back
}

fn config(port: u16, ca: &Path, sni: &str) -> String {
    format!(
        "[[listener]]\nname = \"fwd\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"forward\"\nupstream = \"127.0.0.1:{port}\"\nupstream_tls = true\n\
         upstream_ca = {:?}\n{sni}\n",
        s(ca)
    )
}

#[test]
fn tls_origination_verifies_the_upstream_against_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path(), "good");
    make_ca(dir.path(), "other");
    make_server_cert(dir.path(), "good");
    let upstream = SServer::start(dir.path());

    // The right CA, the name from upstream_sni.
    let relay = Server::start(&config(
        upstream.port,
        &dir.path().join("good.pem"),
        "upstream_sni = \"localhost\"",
    ));
    assert_eq!(
        line_through(relay.addr("fwd"), b"through tls\n"),
        "slt hguorht\n",
        "s_server -rev answered through the relay"
    );

    // Another CA: the certificate is refused, the client closed without a byte.
    let refusing = Server::start(&config(upstream.port, &dir.path().join("other.pem"), ""));
    let mark = refusing.log_mark();
    let mut client = connect(refusing.addr("fwd"));
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = client.write_all(b"must not arrive\n");
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got);
    assert!(got.is_empty(), "nothing relayed: {got:?}");
    refusing.assert_log(
        mark,
        Duration::from_secs(10),
        "naming the refused certificate",
        |line| line.contains("upstream") && line.contains("tls error"),
    );
}

#[test]
fn tls_keys_are_refused_outside_forward_and_without_upstream_tls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plexus.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"e\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"forward\"\nupstream = \"127.0.0.1:9\"\nupstream_sni = \"x\"\n",
    )
    .unwrap();
    let out = common::run_plexus(
        &["serve", "--config", s(&path), "--check"],
        None,
        Duration::from_secs(30),
    );
    out.assert_code(2);
    out.assert_stderr_contains("listener[0].upstream_sni");
}

#[test]
fn an_upstream_whose_tls_handshake_fails_is_skipped_for_the_next_one() {
    // Two s_servers: one with a certificate from a CA the relay does not trust, one it does.
    let (bad_dir, good_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_ca(bad_dir.path(), "other");
    make_server_cert(bad_dir.path(), "other");
    make_ca(good_dir.path(), "good");
    make_server_cert(good_dir.path(), "good");
    let (bad, good) = (
        SServer::start(bad_dir.path()),
        SServer::start(good_dir.path()),
    );
    let relay = Server::start(&format!(
        "[[listener]]\nname = \"fwd\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:0\"\n\
         service = \"forward\"\nupstreams = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         upstream_tls = true\nupstream_sni = \"localhost\"\nupstream_ca = {:?}\n\
         upstream_fail_timeout = \"1h\"\n",
        bad.port,
        good.port,
        s(&good_dir.path().join("good.pem"))
    ));
    let mark = relay.log_mark();
    // Round robin would give the untrusted upstream every other client: each is served by the
    // trusted one instead, the first after a failover, the rest because it is skipped.
    for n in 0..4 {
        assert_eq!(
            line_through(relay.addr("fwd"), b"failover\n"),
            "revoliaf\n",
            "client {n} reached the trusted upstream"
        );
    }
    relay.assert_log(
        mark,
        Duration::from_secs(10),
        "marking the untrusted upstream down",
        |line| {
            line.contains("failed to connect")
                && line.contains("tls error")
                && line.contains(&bad.port.to_string())
                && line.contains("skipped")
        },
    );
}
