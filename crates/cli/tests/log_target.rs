//! `--log-target syslog|journald` without the daemon's socket is a clear error at start (exit 1,
//! naming the socket), never silently lost logs. (The datagram formats are unit-tested in
//! `crates/cli/src/logging.rs`.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

#[test]
fn a_missing_log_socket_fails_the_start_naming_it() {
    for (target, socket) in [
        ("syslog", "/dev/log"),
        ("journald", "/run/systemd/journal/socket"),
    ] {
        if Path::new(socket).exists() {
            eprintln!("skipped {target}: {socket} exists on this machine");
            continue;
        }
        let out = run_plexus(
            &["serve", "--log-target", target],
            None,
            Duration::from_secs(20),
        );
        out.assert_code(1);
        out.assert_stderr_contains(&format!(
            "--log-target {target}: cannot connect to {socket}"
        ));
        out.assert_no_panic();
    }
}
