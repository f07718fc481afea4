//! systemd socket activation: the listening sockets a service manager passed from descriptor 3
//! on (`$LISTEN_FDS` of them, for the process `$LISTEN_PID`), with their names from
//! `$LISTEN_FDNAMES` (colon-separated, from `FileDescriptorName=` in the .socket unit).
//!
//! Taking them sets close-on-exec on each and removes the three variables, so the descriptors
//! are owned once and never leak into a child process. The same convention, under other
//! variable names ([`UPGRADE_VARS`]), carries the sockets of a binary upgrade. Call these
//! before spawning threads: changing the environment is not thread-safe.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// One inherited descriptor.
#[derive(Debug)]
pub struct InheritedFd {
    /// The descriptor, now owned by the caller.
    pub fd: OwnedFd,
    /// Its name from `$LISTEN_FDNAMES`, if the manager sent names.
    pub name: Option<String>,
}

/// Takes the descriptors passed to this process; empty when there are none, or when
/// `$LISTEN_PID` names another process (the variables were inherited, not meant for us).
pub fn take() -> io::Result<Vec<InheritedFd>> {
    take_named(
        ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"],
        std::process::id(),
    )
}

/// The variables naming the descriptors a running plexus passes to the new binary it starts
/// for an upgrade: the parent's pid, the count, and the names (as `LISTEN_FDNAMES`). A parent
/// cannot set `LISTEN_PID` to a child's pid without code between `fork` and `exec` that
/// allocates, so the child checks its parent instead.
pub const UPGRADE_VARS: [&str; 3] = [
    "PLEXUS_UPGRADE_PARENT",
    "PLEXUS_UPGRADE_FDS",
    "PLEXUS_UPGRADE_FDNAMES",
];

/// Takes the descriptors an upgrading parent passed (see [`UPGRADE_VARS`]); empty when there
/// are none or when `$PLEXUS_UPGRADE_PARENT` is not this process's parent.
pub fn take_upgrade() -> io::Result<Vec<InheritedFd>> {
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() };
    take_named(UPGRADE_VARS, parent as u32)
}

fn take_named(vars: [&str; 3], expected_pid: u32) -> io::Result<Vec<InheritedFd>> {
    let [pid_var, fds_var, names_var] = vars;
    let pid = std::env::var(pid_var).ok();
    let count = std::env::var(fds_var).ok();
    let names = std::env::var(names_var).ok();
    for key in vars {
        std::env::remove_var(key);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(expected_pid) {
        return Ok(Vec::new());
    }
    let count: RawFd = count.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{fds_var}={count:?} is not a descriptor count"),
        )
    })?;
    let names: Vec<Option<String>> = match names {
        Some(names) => names.split(':').map(|n| Some(n.to_owned())).collect(),
        None => Vec::new(),
    };
    let mut fds = Vec::with_capacity(count.max(0) as usize);
    for offset in 0..count.max(0) {
        let raw = LISTEN_FDS_START + offset;
        // SAFETY: fcntl on an integer descriptor; it fails with EBADF if `raw` is not open.
        syscall!(fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC)).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("{fds_var}: descriptor {raw} is not usable: {err}"),
            )
        })?;
        // SAFETY: the service manager (or the upgrading parent) passed descriptor `raw` to
        // this process (the pid variable is checked, fcntl proved it open), and removing the
        // variables above makes this the only place that takes ownership of it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = names.get(offset as usize).cloned().flatten();
        fds.push(InheritedFd { fd, name });
    }
    Ok(fds)
}
