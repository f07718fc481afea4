//! End-to-end tests of config loading: `serve --check`, `serve --print-config`, and that a bad
//! config makes both `serve --check` and `serve` exit 2 with a message naming the problem.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Bound on every command here: none of them should run a server.
const CMD_TIMEOUT: Duration = Duration::from_secs(15);

/// A valid config (ephemeral ports), used as the base of the broken ones.
fn good_config() -> String {
    r#"[server]
event_loops = 2
idle_timeout = "60s"

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "chat"
transport = "tcp"
addr = "127.0.0.1:0"
service = "chat"
"#
    .to_string()
}

/// Writes `contents` to `name` in `dir` and returns its path.
fn write_config(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write config");
    path
}

/// Asserts a broken config is rejected by both `serve --config F --check` and
/// `serve --config F`: exit 2, no panic, stderr mentions every needle (case-insensitive);
/// `--check` also names the file.
fn assert_rejected(contents: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "plexus.toml", contents);
    assert_path_rejected(&path, needles);
}

/// [`assert_rejected`] for a path that may not exist.
fn assert_path_rejected(path: &Path, needles: &[&str]) {
    let path_str = path.to_str().expect("utf-8 path");
    for args in [
        vec!["serve", "--config", path_str, "--check"],
        vec!["serve", "--config", path_str],
    ] {
        let out = run_plexus(&args, None, CMD_TIMEOUT);
        out.assert_no_panic();
        out.assert_code(2);
        for needle in needles {
            out.assert_stderr_contains(needle);
        }
        if args.contains(&"--check") {
            out.assert_stderr_contains(path_str);
        }
    }
}

/// A file that is not TOML: exit 2, the message names the file.
#[test]
fn garbage_file_is_rejected() {
    assert_rejected("this is {{ not toml at all\n[[[\n", &[]);
}

/// An unknown (misspelt) key is an error naming the key, not a silent default.
#[test]
fn unknown_key_is_rejected() {
    let config = good_config().replace("[server]\n", "[server]\nmax_conections = 5\n");
    assert_rejected(&config, &["max_conections"]);
}

/// A backend that does not exist is an error naming the key and the values it takes.
#[test]
fn bad_backend_is_rejected() {
    let config = good_config().replace("[server]\n", "[server]\nbackend = \"kqueue\"\n");
    assert_rejected(&config, &["backend", "kqueue", "io_uring"]);
}

/// An unparsable listener address is an error naming `addr`.
#[test]
fn bad_address_is_rejected() {
    let config = good_config().replacen("127.0.0.1:0", "127.0.0.1:notaport", 1);
    assert_rejected(&config, &["addr"]);
}

/// Two tcp listeners on the same fixed address are caught (statically by `--check`).
#[test]
fn duplicate_addresses_are_rejected() {
    let config = good_config().replace("127.0.0.1:0", "127.0.0.1:47011");
    assert_rejected(&config, &["duplicate"]);
}

/// Two listeners with the same name are rejected.
#[test]
fn duplicate_names_are_rejected() {
    let config = good_config().replace(r#"name = "chat""#, r#"name = "tcp-echo""#);
    assert_rejected(&config, &["duplicate", "tcp-echo"]);
}

/// The low watermark must be below the high one.
#[test]
fn inverted_watermarks_are_rejected() {
    let config = good_config().replace(
        "[server]\n",
        "[server]\noutbound_high_watermark = 65536\noutbound_low_watermark = 131072\n",
    );
    assert_rejected(&config, &["watermark"]);
}

/// A config file that does not exist: exit 2, the message names the file.
#[test]
fn missing_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("does-not-exist.toml");
    assert_path_rejected(&path, &["does-not-exist.toml"]);
}

/// A good config passes `--check` (exit 0) without starting a server.
#[test]
fn good_config_passes_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "plexus.toml", &good_config());
    let out = run_plexus(
        &["serve", "--config", path.to_str().unwrap(), "--check"],
        None,
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
}

/// `serve --print-config` prints the embedded default, which has the echo and chat
/// listeners, and which itself passes `--check`.
#[test]
fn print_default_config() {
    let out = run_plexus(&["serve", "--print-config"], None, CMD_TIMEOUT);
    out.assert_no_panic();
    out.assert_code(0);
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    for needle in ["[[listener]]", "tcp-echo", "chat"] {
        assert!(
            stdout.contains(needle),
            "--print-config output lacks {needle:?}:\n{stdout}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "default.toml", &stdout);
    let check = run_plexus(
        &["serve", "--config", path.to_str().unwrap(), "--check"],
        None,
        CMD_TIMEOUT,
    );
    check.assert_no_panic();
    check.assert_code(0);
}

/// `serve --config F --print-config` prints F's listeners.
#[test]
fn print_given_config() {
    let config = good_config()
        .replace(r#"name = "tcp-echo""#, r#"name = "custom-echo-one""#)
        .replace(r#"name = "chat""#, r#"name = "custom-chat-two""#);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "plexus.toml", &config);
    let out = run_plexus(
        &[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--print-config",
        ],
        None,
        CMD_TIMEOUT,
    );
    out.assert_no_panic();
    out.assert_code(0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in ["[[listener]]", "custom-echo-one", "custom-chat-two"] {
        assert!(
            stdout.contains(needle),
            "--print-config output lacks {needle:?}:\n{stdout}"
        );
    }
}

/// Durations and sizes beyond their range are refused at `--check` with the key and the range
/// (a huge `idle_timeout` used to pass, then panic the event loop at the first connection).
#[test]
fn out_of_range_durations_and_sizes_are_rejected_naming_key_and_range() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[server]\n",
            "idle_timeout = \"500000000000years\"\n",
            &[
                "server.idle_timeout",
                "out of range",
                "allowed 1ms to 30days",
            ],
        ),
        (
            "[server]\n",
            "handshake_timeout = \"100years\"\n",
            &["server.handshake_timeout", "allowed 1ms to 1h"],
        ),
        (
            "[server]\n",
            "shutdown_grace = \"3000years\"\n",
            &["server.shutdown_grace", "allowed 0s to 1day"],
        ),
        (
            "[server]\n",
            "worker_queue = 9223372036854775807\n",
            &["server.worker_queue", "allowed 1 to 1048576"],
        ),
        (
            "[server]\n",
            "max_connections = 0\n",
            &["server.max_connections", "allowed 1 to"],
        ),
        (
            "[server]\n",
            "outbound_high_watermark = 9223372036854775807\n",
            &["server.outbound_high_watermark", "out of range"],
        ),
        (
            "[server]\n",
            "drain_delay = \"2days\"\n",
            &["server.drain_delay", "allowed 0s to 1h"],
        ),
        (
            "service = \"echo\"\n",
            "keepalive = \"100000s\"\n",
            &["listener[0].keepalive", "allowed 1s to"],
        ),
        (
            "service = \"echo\"\n",
            "recv_buffer = 4294967296\n",
            &["listener[0].recv_buffer", "out of range"],
        ),
        (
            "service = \"chat\"\n",
            "linger = \"1000years\"\n",
            &["listener[1].linger", "allowed 0s to 1h"],
        ),
        (
            "service = \"echo\"\n",
            "udp_offload = \"yes\"\n",
            &["udp_offload", "boolean"],
        ),
        (
            "[server]\n",
            "[chat]\nmax_line_bytes = 1000000000000\n",
            &["chat.max_line_bytes", "out of range"],
        ),
    ];
    // The base without its own idle_timeout, so each case can set any [server] key.
    let base = good_config().replace("idle_timeout = \"60s\"\n", "");
    for (after, line, needles) in cases {
        let config = if after.starts_with('[') && line.starts_with('[') {
            format!("{base}{line}")
        } else {
            base.replacen(after, &format!("{after}{line}"), 1)
        };
        assert_rejected(&config, needles);
    }
}

/// Keys that their transport or service never reads are errors, not silently ignored
/// (proxy_protocol on udp used to pass --check and do nothing).
#[test]
fn keys_that_cannot_apply_are_rejected() {
    let udp = "[[listener]]\nname = \"u\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n\
               service = \"echo\"\n";
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!("{}{udp}proxy_protocol = true\n", good_config()),
            &["listener[2].proxy_protocol", "tcp and tls listeners only"],
        ),
        (
            format!("{}{udp}keepalive = \"30s\"\n", good_config()),
            &["listener[2].keepalive", "TCP socket option"],
        ),
        (
            format!("{}{udp}backlog = 10\n", good_config()),
            &["listener[2].backlog"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nmtu = 1400\n",
                1,
            ),
            &["listener[0].mtu", "only dtls"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\ndatagram_batch = 8\n",
                1,
            ),
            &["listener[0].datagram_batch"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nudp_offload = false\n",
                1,
            ),
            &["listener[0].udp_offload", "only udp and dtls"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nalpn = [\"http/1.1\"]\n",
                1,
            ),
            &["listener[0].alpn"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nupstream = \"127.0.0.1:9\"\n",
                1,
            ),
            &["listener[0].upstream", "only forward"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nproxy_trusted = [\"10.0.0.0/8\"]\n",
                1,
            ),
            &["listener[0].proxy_trusted", "proxy_protocol = true"],
        ),
        (
            good_config().replacen(
                "service = \"echo\"\n",
                "service = \"echo\"\nsplice = false\n",
                1,
            ),
            &["listener[0].splice", "forward"],
        ),
        (
            format!("{}[tls]\nsession_tickets = false\n", good_config()),
            &["tls", "no tls, dtls or auto"],
        ),
        (
            format!("{}[http]\nmax_body_bytes = 10\n", good_config()),
            &["http", "no listener has service = \"http\""],
        ),
        (
            format!("{}{udp}", good_config()).replace(
                "name = \"u\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"",
                "name = \"u\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"",
            ),
            &["listener[2].service", "byte streams"],
        ),
    ];
    for (config, needles) in &cases {
        assert_rejected(config, needles);
    }
}
