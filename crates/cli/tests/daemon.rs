//! `plexus serve --daemon --pid-file`: the command returns once the detached server is serving,
//! the pid file names it and is locked, a second start with the same file is refused, a start
//! that fails reports its exit code through the original process, and SIGTERM to the pid in the
//! file stops the daemon and removes the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// Kills (SIGKILL, by PID) a daemon the test started, whatever happens to the test.
struct DaemonGuard(u32);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

fn read_pid(path: &Path) -> u32 {
    let text = std::fs::read_to_string(path).expect("read pid file");
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("pid file holds {text:?}"))
}

fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.contains(") Z "))
            .unwrap_or(true)
}

fn daemon_args<'a>(config: &'a str, pid_file: &'a str) -> Vec<&'a str> {
    vec![
        "serve",
        "--config",
        config,
        "--daemon",
        "--pid-file",
        pid_file,
    ]
}

#[test]
fn daemon_serves_after_the_command_returns_refuses_a_second_start_and_stops_by_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plexus.toml");
    std::fs::write(&config, echo_config("")).unwrap();
    let pid_file = dir.path().join("plexus.pid");
    let (config_arg, pid_arg) = (config.to_str().unwrap(), pid_file.to_str().unwrap());

    let first = run_plexus(&daemon_args(config_arg, pid_arg), None, RUN_TIMEOUT);
    first.assert_code(0);
    first.assert_no_panic();
    let pid = read_pid(&pid_file);
    let _guard = DaemonGuard(pid);
    assert!(
        is_alive(pid),
        "daemon {pid} is running after the command returned"
    );
    let addr = first
        .stderr
        .lines()
        .find_map(parse_listening)
        .map(|(_, addr)| addr)
        .unwrap_or_else(|| panic!("no listening line before detaching:\n{}", first.stderr));

    // Detached: a session leader's child (not a session leader itself), in /.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let (ppid, session) = (fields[1], fields[3]);
    assert_ne!(
        session,
        pid.to_string(),
        "the daemon is not a session leader"
    );
    assert_ne!(
        ppid,
        std::process::id().to_string(),
        "the daemon is not our child"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, Path::new("/"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "Umask:\t0027"),
        "umask 027:\n{status}"
    );
    for fd in 0..=2 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }

    let mut stream = connect(addr);
    assert_echo(&mut stream, b"served by the daemon\n");

    let second = run_plexus(&daemon_args(config_arg, pid_arg), None, RUN_TIMEOUT);
    second.assert_code(1);
    second.assert_stderr_contains(&format!(
        "plexus already running with pid {pid} (pid file {pid_arg})"
    ));
    assert_eq!(
        read_pid(&pid_file),
        pid,
        "the refused start left the file alone"
    );
    assert!(is_alive(pid));

    drop(stream);
    let killed = Command::new("kill")
        .args(["-TERM", &read_pid(&pid_file).to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        wait_until(Duration::from_secs(20), || !is_alive(pid)),
        "daemon {pid} did not stop after SIGTERM"
    );
    assert!(
        wait_until(Duration::from_secs(5), || !pid_file.exists()),
        "pid file removed at exit"
    );
}

#[test]
fn a_daemon_that_cannot_bind_fails_the_command_with_exit_1_and_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plexus.toml");
    std::fs::write(
        &config,
        echo_config("").replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let pid_file = dir.path().join("plexus.pid");
    let out = run_plexus(
        &daemon_args(config.to_str().unwrap(), pid_file.to_str().unwrap()),
        None,
        RUN_TIMEOUT,
    );
    out.assert_code(1);
    out.assert_stderr_contains(&format!("cannot listen on 127.0.0.1:{port}"));
    out.assert_no_panic();
    assert!(
        wait_until(Duration::from_secs(5), || !pid_file.exists()),
        "a failed daemon leaves no pid file"
    );
}

#[test]
fn a_foreground_server_holds_the_pid_file_and_a_second_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("fg.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let mut server = Server::start_with(&[], &["--pid-file", pid_arg], &[], &echo_config(""));
    assert_eq!(read_pid(&pid_file), server.pid());

    let second = run_plexus(
        &[
            "serve",
            "--config",
            server.config_path().to_str().unwrap(),
            "--pid-file",
            pid_arg,
        ],
        None,
        RUN_TIMEOUT,
    );
    second.assert_code(1);
    second.assert_stderr_contains(&format!("plexus already running with pid {}", server.pid()));

    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(!pid_file.exists(), "pid file removed at exit");
}

#[test]
fn daemon_without_a_pid_file_is_a_usage_error() {
    let out = run_plexus(&["serve", "--daemon"], None, RUN_TIMEOUT);
    out.assert_code(2);
    out.assert_stderr_contains("--pid-file");
}

#[test]
fn the_descriptor_limit_is_raised_to_the_hard_limit_and_a_low_one_is_warned_about() {
    let server = Server::start_with_prefix(
        &["prlimit", "--nofile=100:200"],
        &echo_config("max_connections = 1000"),
    );
    server.assert_log(0, Duration::from_secs(5), "with the raised limit", |l| {
        l.contains("open file limit") && l.contains("soft=200") && l.contains("hard=200")
    });
    server.assert_log(0, Duration::from_secs(5), "warning it is too low", |l| {
        l.contains("WARN") && l.contains("below max_connections + 64 (1064)")
    });
}

/// A symlink planted at the pid-file path is refused (exit 1, a clear message) and the file it
/// points at is left as it was: the pid file is opened with O_NOFOLLOW and must be a regular
/// file (a root daemon used to follow the link and truncate its target).
#[test]
fn a_symlink_at_the_pid_file_path_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plexus.toml");
    std::fs::write(&config, echo_config("")).unwrap();
    let precious = dir.path().join("precious.conf");
    std::fs::write(&precious, b"do not truncate me\n").unwrap();
    let pid_file = dir.path().join("plexus.pid");
    std::os::unix::fs::symlink(&precious, &pid_file).unwrap();
    let (config_arg, pid_arg) = (config.to_str().unwrap(), pid_file.to_str().unwrap());

    for args in [
        vec!["serve", "--config", config_arg, "--pid-file", pid_arg],
        daemon_args(config_arg, pid_arg),
    ] {
        let out = run_plexus(&args, None, RUN_TIMEOUT);
        out.assert_no_panic();
        out.assert_code(1);
        out.assert_stderr_contains("symbolic link");
        out.assert_stderr_contains(pid_arg);
        assert_eq!(
            std::fs::read(&precious).unwrap(),
            b"do not truncate me\n",
            "{args:?}: the symlink's target was written"
        );
        assert!(
            pid_file
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink(),
            "{args:?}: the symlink is left in place"
        );
    }
}
