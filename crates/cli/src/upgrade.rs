//! `plexus upgrade --pid-file FILE [--binary PATH]`: asks the server named by the pid file to
//! upgrade its binary (SIGUSR2) and waits for the outcome. The server appends it to
//! `FILE.upgrade-result`, which this command creates (owned by the server's user) and removes:
//! `ok <new pid>` (exit 0) or `error <why>` (exit 1, the reason printed). Where the server cannot
//! write that file, the outcome is inferred from the pid file naming a new running process and
//! from the server's children. `--binary PATH` starts PATH instead of the server's own binary:
//! the command writes it to `FILE.upgrade`, which the server reads on SIGUSR2 (only a fresh file
//! owned by root or the server's user and writable by no one else).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;

const EXIT_FAILED: u8 = 1;
/// How long a server has to start the new process after the signal before the upgrade counts
/// as refused.
const START_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Args)]
pub(crate) struct UpgradeArgs {
    /// The running server's pid file (`plexus serve --pid-file FILE`).
    #[arg(long, value_name = "FILE")]
    pid_file: PathBuf,
    /// Start this binary instead of the server's own (written to FILE.upgrade for the server,
    /// removed when the command ends).
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// How long to wait for the new process to take over (longer than the server's
    /// `[server] upgrade_timeout`, 30 s by default).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) fn run(args: UpgradeArgs) -> ExitCode {
    match upgrade(&args) {
        Ok((old, new)) => {
            eprintln!("upgraded: pid {new} serves; pid {old} stopped accepting and drains");
            println!("{new}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: upgrade failed: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn upgrade(args: &UpgradeArgs) -> Result<(u32, u32), String> {
    let path = &args.pid_file;
    let old = read_pid(path).ok_or_else(|| {
        format!(
            "{} names no process (is the server running?)",
            path.display()
        )
    })?;
    if !is_alive(old) {
        return Err(format!(
            "pid {old} (from {}) is not running",
            path.display()
        ));
    }
    let _request = match &args.binary {
        Some(binary) => Some(Request::write(path, binary)?),
        None => None,
    };
    let result = ResultFile::create(path, old);
    let before = children(old);
    plexus_sys::signal::send_sigusr2(old)
        .map_err(|err| format!("cannot signal pid {old}: {err}"))?;
    let start = Instant::now();
    let mut started: Option<u32> = None;
    loop {
        // The server's own words, when it could write them.
        match result.as_ref().and_then(ResultFile::outcome) {
            Some(Ok(new)) => return Ok((old, new)),
            Some(Err(why)) => return Err(format!("{why}; pid {old} keeps serving")),
            None => {}
        }
        if let Some(new) = read_pid(path).filter(|&pid| pid != old) {
            if is_alive(new) {
                return Ok((old, new));
            }
        }
        if !is_alive(old) {
            return Err(format!(
                "pid {old} exited during the upgrade and no new process took over"
            ));
        }
        let now: BTreeSet<u32> = children(old).difference(&before).copied().collect();
        match (started, now.iter().next()) {
            (None, Some(&child)) => started = Some(child),
            (Some(child), _) if result.is_none() && !children(old).contains(&child) => {
                if let Some(new) = read_pid(path).filter(|&pid| pid == child) {
                    return Ok((old, new));
                }
                return Err(format!(
                    "the new process (pid {child}) exited before it was ready; pid {old} keeps \
                     serving — its log says why"
                ));
            }
            (None, None) if result.is_none() && start.elapsed() > START_WAIT => {
                return Err(format!(
                    "pid {old} started no new process: the upgrade was refused (one is already \
                     in progress, or the server is stopping) — its log says why"
                ));
            }
            _ => {}
        }
        if start.elapsed() > args.timeout {
            return Err(format!(
                "no new process took over within {}; pid {old} keeps serving",
                humantime::format_duration(args.timeout)
            ));
        }
        thread::sleep(POLL);
    }
}

/// The file the server appends the outcome to (`ok PID` / `error WHY`); removed on drop.
struct ResultFile(PathBuf);

impl ResultFile {
    /// Creates it empty, owned by the server's user so that it can write it (when this command
    /// runs as root). `None` if that is not possible: the outcome is then inferred.
    fn create(pid_file: &Path, server: u32) -> Option<ResultFile> {
        let path = plexus::upgrade::result_path(pid_file);
        let _ = std::fs::remove_file(&path);
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .ok()?;
        let file = ResultFile(path);
        if let Some(uid) = server_uid(server) {
            if std::os::unix::fs::chown(&file.0, Some(uid), None).is_err() {
                use std::os::unix::fs::MetadataExt;
                let owner = std::fs::metadata(&file.0).ok()?.uid();
                if owner != uid {
                    return None;
                }
            }
        }
        Some(file)
    }

    fn outcome(&self) -> Option<Result<u32, String>> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        let line = text.lines().next()?;
        if let Some(pid) = line.strip_prefix("ok ") {
            return pid.trim().parse().ok().map(Ok);
        }
        Some(Err(line.strip_prefix("error ").unwrap_or(line).to_owned()))
    }
}

impl Drop for ResultFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The effective uid of process `pid`.
fn server_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The request file naming `--binary` for the server; removed on drop.
struct Request(PathBuf);

impl Request {
    fn write(pid_file: &Path, binary: &Path) -> Result<Request, String> {
        let binary = std::path::absolute(binary)
            .map_err(|err| format!("--binary {}: {err}", binary.display()))?;
        if !binary.is_file() {
            return Err(format!("--binary {}: not a file", binary.display()));
        }
        let path = plexus::upgrade::request_path(pid_file);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&path);
            let mut file = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)?;
            writeln!(file, "{}", binary.display())
        };
        write().map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        Ok(Request(path))
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Running (a zombie is not).
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The children of `pid`'s main thread (the server starts the new process from it).
fn children(pid: u32) -> BTreeSet<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}
