//! `--user/--group`: a server started as root binds first (a port below 1024), then drops every
//! supplementary group, its group and its user, and serves as that user; unknown names are
//! usage errors; root without `--user` is warned about. Tests that need root skip (with a
//! printed reason) when not run as root.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::*;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(2) == Some("0"))
}

/// `id -u NAME` / `id -g NAME`.
fn id(flag: &str, name: &str) -> String {
    let out = Command::new("id").args([flag, name]).output().unwrap();
    assert!(out.status.success(), "id {flag} {name}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A port below 1024 free on 127.0.0.1 right now.
fn free_privileged_port() -> Option<u16> {
    (900..1000).find(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
}

/// The `Uid:`, `Gid:` and `Groups:` values of /proc/PID/status.
fn ids(pid: u32) -> (Vec<String>, Vec<String>, Vec<String>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

#[test]
fn started_as_root_with_user_nobody_binds_a_low_port_then_serves_as_nobody() {
    if !is_root() {
        eprintln!("skipped: needs root to bind below 1024 and to switch users");
        return;
    }
    let Some(port) = free_privileged_port() else {
        eprintln!("skipped: no free port in 900..1000 on 127.0.0.1");
        return;
    };
    let config = echo_config("").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let server = Server::start_with(&[], &["--user", "nobody"], &[], &config);
    assert_eq!(server.addr("tcp-echo").port(), port);
    server.assert_log(
        0,
        Duration::from_secs(5),
        "saying privileges were dropped",
        |l| l.contains("privileges dropped") && l.contains("user=nobody"),
    );

    let (uid, gid) = (id("-u", "nobody"), id("-g", "nobody"));
    let (uids, gids, groups) = ids(server.pid());
    assert_eq!(uids, vec![uid.clone(); 4], "real, effective, saved, fs uid");
    assert_eq!(gids, vec![gid.clone(); 4], "real, effective, saved, fs gid");
    assert!(
        groups.is_empty(),
        "supplementary groups dropped: {groups:?}"
    );
    // The loop and worker threads run as nobody too.
    for task in std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(line.split_whitespace().skip(1).all(|v| v == uid), "{line}");
    }

    let mut stream = connect(server.addr("tcp-echo"));
    assert_echo(&mut stream, b"served by nobody on a privileged port\n");
    assert!(
        !server
            .stderr_lines()
            .iter()
            .any(|l| l.contains("running as root")),
        "no root warning with --user"
    );
}

#[test]
fn group_overrides_the_users_primary_group() {
    if !is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let server = Server::start_with(
        &[],
        &["--user", "nobody", "--group", "daemon"],
        &[],
        &echo_config(""),
    );
    let (uids, gids, _) = ids(server.pid());
    assert_eq!(uids[1], id("-u", "nobody"));
    let daemon_gid = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("daemon:x:"))
        .and_then(|rest| rest.split(':').next())
        .unwrap()
        .to_owned();
    assert_eq!(gids, vec![daemon_gid; 4]);
}

#[test]
fn root_without_user_is_warned_about() {
    if !is_root() {
        eprintln!("skipped: the warning concerns root only");
        return;
    }
    let server = Server::start(&echo_config(""));
    server.assert_log(0, Duration::from_secs(5), "warning about root", |l| {
        l.contains("WARN") && l.contains("running as root without --user")
    });
}

#[test]
fn unknown_user_or_group_is_a_usage_error_naming_it() {
    let out = run_plexus(
        &["serve", "--user", "no-such-user-plexus"],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(2);
    out.assert_stderr_contains("user 'no-such-user-plexus' not found");

    let out = run_plexus(
        &["serve", "--user", "root", "--group", "no-such-group-plexus"],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(2);
    out.assert_stderr_contains("group 'no-such-group-plexus' not found");
}

#[test]
fn group_without_user_is_a_usage_error() {
    let out = run_plexus(
        &["serve", "--group", "daemon"],
        None,
        Duration::from_secs(20),
    );
    out.assert_code(2);
    out.assert_stderr_contains("--user");
}

#[test]
fn chroot_happens_after_binding_and_before_serving() {
    if !is_root() {
        eprintln!("skipped: chroot needs root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &[],
        &[
            "--chroot",
            root.path().to_str().unwrap(),
            "--user",
            "nobody",
        ],
        &[],
        &echo_config(""),
    );
    let seen_root = std::fs::read_link(format!("/proc/{}/root", server.pid())).unwrap();
    assert_eq!(seen_root, root.path().canonicalize().unwrap());
    let mut stream = connect(server.addr("tcp-echo"));
    assert_echo(&mut stream, b"served from a chroot\n");
}
