//! `plexus serve`: load and check the configuration, then start the process the way an
//! operator expects a Unix server to start — daemonise (optionally), take the pid file, raise
//! the descriptor limit, bind every listener, enter the chroot and drop privileges, tell the
//! original process (and systemd) that it is serving, and run.
//!
//! The order matters: `fork` before any thread exists (the worker pool and the loops start
//! inside the library, after the bind), binding before the privilege drop (ports below 1024),
//! the drop before the first connection is served.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use plexus::{Config, ConfigError, Server};
use plexus_sys::daemon::{self, Daemonized, StartupReport};
use plexus_sys::pidfile::PidFile;
use plexus_sys::privileges;
use tracing::{info, warn};

use crate::logging::{self, LogFormat, LogTarget};
use crate::EXIT_USAGE;

/// Writes `error: …` to stderr in one write, so the line stays whole when another process
/// (the other side of a binary upgrade) writes to the same stderr at the same time.
macro_rules! eprint_error {
    ($($arg:tt)*) => {{
        let line = format!("error: {}\n", format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

/// Descriptors kept for listeners, logs and the acceptor's spare, beyond one per session.
const DESCRIPTOR_HEADROOM: u64 = 64;
/// Exit code for runtime failures (another instance running, bind or privilege failures).
const EXIT_RUNTIME: u8 = 1;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Configuration file (TOML); without it the embedded default runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 = valid, 2 = problems, one per line).
    #[arg(long)]
    check: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Where logs go: stderr, syslog (/dev/log) or journald (the journal's native socket).
    #[arg(long, value_enum, default_value = "stderr")]
    log_target: LogTarget,
    /// Run in the background (double fork, setsid, chdir /, umask 027, stdio to /dev/null);
    /// the command returns once the server is serving (exit 0) or failed (its exit code).
    #[arg(long, requires = "pid_file")]
    daemon: bool,
    /// Write the process id to FILE and hold a lock on it while running; a second instance
    /// with the same file refuses to start (exit 1). Removed at exit.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// After binding, switch to this user (and its primary group unless --group is given).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// After binding, switch to this group (needs --user).
    #[arg(long, value_name = "NAME", requires = "user")]
    group: Option<String>,
    /// After binding and before dropping privileges, chroot into DIR (needs root).
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

pub(crate) fn run(args: ServeArgs) -> ExitCode {
    // First, before any thread exists (it changes the environment): the sockets of the process
    // this one upgrades, if SIGUSR2 started it.
    let mut handover = match plexus::Handover::from_env() {
        Ok(handover) => handover,
        Err(err) => {
            eprint_error!("upgrade: {err}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // What SIGUSR2 starts: this binary as it was at start (a file replaced since is the new
    // version) with the same arguments.
    let program = std::fs::read_link("/proc/self/exe")
        .or_else(|_| std::env::current_exe())
        .ok();
    let upgrade_args = absolute_path_args(std::env::args_os().skip(1));
    let (config, source) = match &args.config {
        Some(path) => (Config::load(path), path.display().to_string()),
        None => (
            Ok(Config::embedded_default()),
            "<embedded default>".to_owned(),
        ),
    };
    let config = match config {
        Ok(config) => config,
        Err(err) => return config_failure(&err),
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    // SIGHUP re-reads the same file (by absolute path: the daemon runs in `/`).
    let reload_path = args.config.as_deref().map(absolute);
    let builder = plexus_services::register(Server::builder(config))
        .source_name(&source)
        .handle_signals(true)
        .systemd(true)
        .reload_from(move || match &reload_path {
            Some(path) => Config::load(path),
            None => Ok(Config::embedded_default()),
        });
    if args.check {
        return match builder.validate() {
            Ok(valid) => {
                eprintln!(
                    "{source}: configuration ok ({} listeners)",
                    valid.listeners.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => config_failure(&err),
        };
    }
    let (max_connections, upgrade_timeout) = match builder.validate() {
        Ok(valid) => (
            valid.config.server.max_connections,
            valid.config.server.upgrade_timeout,
        ),
        Err(err) => return config_failure(&err),
    };
    // Names are looked up now, while /etc is still reachable and before detaching, so a typo
    // is a usage error on the terminal.
    let account = match Account::resolve(&args) {
        Ok(account) => account,
        Err(err) => {
            eprint_error!("{err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The daemon runs in `/`: a relative pid file must name the same file it would have here.
    let pid_path = args.pid_file.as_deref().map(absolute);

    if let Err(err) = logging::init(args.log_format, args.log_target) {
        eprint_error!("{err:#}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    let startup = match args.daemon {
        // Started by an upgrade: the old process is detached already, and so is this one.
        true if handover.is_some() => None,
        true => {
            if args.log_target == LogTarget::Stderr {
                warn!(
                    "--daemon with --log-target stderr: logs are discarded once detached \
                     (use --log-target syslog or journald)"
                );
            }
            // No thread exists yet: nothing before this point spawns one.
            match daemon::daemonize() {
                Ok(Daemonized::Original { status }) => return ExitCode::from(status),
                Ok(Daemonized::Daemon(report)) => Some(report),
                Err(err) => {
                    eprint_error!("cannot daemonize: {err}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
        }
        false => None,
    };
    let started = Startup(startup);

    // The old process's pid file is passed locked; it stays its own until the hand-over.
    let passed_pid_file = handover.as_mut().and_then(|h| h.take_pid_file());
    let pid_file = match (pid_path.as_deref(), passed_pid_file) {
        (Some(path), Some(fd)) => PidFile::adopt(fd, path).map(Some),
        (Some(path), None) => PidFile::acquire(path).map(Some),
        (None, _) => Ok(None),
    };
    let pid_file = match pid_file {
        Ok(pid_file) => pid_file.map(std::sync::Arc::new),
        Err(err) => return started.fail(EXIT_RUNTIME, &err.to_string()),
    };
    raise_descriptor_limit(max_connections);
    if account.is_none() && privileges::is_root() {
        warn!(
            "running as root without --user: every session is served with full privileges \
             (use --user NAME to drop them after binding)"
        );
    }
    // Resolved before a daemon's chdir("/") would change what a relative path means.
    let chroot = args.chroot.as_deref().map(absolute);
    let mut builder = builder;
    if let Some(pid_file) = &pid_file {
        builder = builder.pid_file(std::sync::Arc::clone(pid_file));
    }
    if let Some(handover) = handover {
        info!(
            parent = handover.parent(),
            "upgrade: taking over the sockets of pid {}",
            handover.parent()
        );
        builder = builder.handover(handover);
    }
    // Under --chroot neither the binary nor (usually) the configuration's paths exist for the
    // new process, and it could not chroot again: no upgrades there.
    match (&program, &args.chroot) {
        (Some(program), None) => {
            builder = builder.upgrade(plexus::UpgradeOptions {
                program: program.clone(),
                args: upgrade_args,
                timeout: upgrade_timeout,
            });
        }
        (None, _) => warn!("cannot resolve this binary's path: SIGUSR2 upgrades are disabled"),
        (Some(_), Some(_)) => info!("--chroot: SIGUSR2 upgrades are disabled"),
    }
    let builder = builder.after_bind(move || {
        if let Some(dir) = &chroot {
            privileges::chroot(dir)?;
            info!(dir = %dir.display(), "entered chroot");
        }
        if let Some(account) = account {
            privileges::drop_to(account.uid, account.gid).map_err(|err| {
                format!(
                    "cannot drop privileges to user '{}' (uid {}, gid {}): {err}; refusing to run",
                    account.user, account.uid, account.gid
                )
            })?;
            info!(
                user = %account.user,
                uid = account.uid,
                gid = account.gid,
                "privileges dropped"
            );
        }
        Ok(())
    });
    let server = match builder.build() {
        Ok(server) => server,
        Err(plexus::Error::Config(err)) => {
            let message = err.to_string();
            return started.fail(EXIT_USAGE, &message);
        }
        Err(err @ plexus::Error::Tls(_)) => {
            return started.fail(EXIT_USAGE, &format!("{source}: {err}"))
        }
        Err(err) => return started.fail(EXIT_RUNTIME, &err.to_string()),
    };
    started.serving();
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprint_error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// The user and group to switch to after binding.
struct Account {
    user: String,
    uid: u32,
    gid: u32,
}

impl Account {
    fn resolve(args: &ServeArgs) -> Result<Option<Account>, privileges::PrivilegeError> {
        let Some(user) = &args.user else {
            return Ok(None);
        };
        let entry = privileges::lookup_user(user)?;
        let gid = match &args.group {
            Some(group) => privileges::lookup_group(group)?,
            None => entry.gid,
        };
        Ok(Some(Account {
            user: entry.name,
            uid: entry.uid,
            gid,
        }))
    }
}

/// The daemon's report to the process the operator started (nothing in the foreground).
struct Startup(Option<StartupReport>);

impl Startup {
    /// Prints the error (still on the original stderr) and reports `code`.
    fn fail(self, code: u8, message: &str) -> ExitCode {
        for line in message.lines() {
            eprint_error!("{line}");
        }
        if let Some(report) = self.0 {
            let _ = report.report(code);
        }
        ExitCode::from(code)
    }

    /// Every listener is bound: release the original process and detach from its stderr.
    fn serving(self) {
        if let Some(report) = self.0 {
            info!(pid = std::process::id(), "running in the background");
            if let Err(err) = daemon::redirect_stdio_to_null() {
                warn!("cannot redirect standard streams to /dev/null: {err}");
            }
            let _ = report.report(0);
        }
    }
}

/// The arguments for the new process of an upgrade: ours, with the values of path options made
/// absolute (a daemon runs in `/`, so a relative `--config` would name another file there).
fn absolute_path_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const PATH_OPTIONS: [&str; 3] = ["--config", "--pid-file", "--chroot"];
    let mut out = Vec::new();
    let mut path_next = false;
    for arg in args {
        if std::mem::take(&mut path_next) {
            out.push(absolute(Path::new(&arg)).into_os_string());
            continue;
        }
        let text = arg.to_string_lossy();
        if PATH_OPTIONS.contains(&text.as_ref()) {
            path_next = true;
        } else if let Some((option, value)) = text.split_once('=') {
            if PATH_OPTIONS.contains(&option) {
                let value = absolute(Path::new(value));
                out.push(format!("{option}={}", value.display()).into());
                continue;
            }
        }
        out.push(arg);
    }
    out
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn config_failure(err: &ConfigError) -> ExitCode {
    for line in err.to_string().lines() {
        eprint_error!("{line}");
    }
    ExitCode::from(EXIT_USAGE)
}

/// Raises the soft descriptor limit to the hard one and says whether it covers the sessions.
fn raise_descriptor_limit(max_connections: usize) {
    match plexus_sys::rlimit::raise_nofile_to_hard() {
        Ok(limit) => {
            info!(
                soft = limit.soft,
                hard = limit.hard,
                "open file limit (RLIMIT_NOFILE)"
            );
            let wanted = max_connections as u64 + DESCRIPTOR_HEADROOM;
            if limit.soft < wanted {
                warn!(
                    "open file limit {} is below max_connections + {DESCRIPTOR_HEADROOM} ({wanted}); \
                     connections beyond it are closed on arrival (descriptors exhausted)",
                    limit.soft
                );
            }
        }
        Err(err) => warn!("cannot raise the open file limit: {err}"),
    }
}
