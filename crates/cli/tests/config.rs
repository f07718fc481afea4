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
