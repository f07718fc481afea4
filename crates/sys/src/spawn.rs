//! Starting a child process with chosen descriptors at 3, 4, 5, … (what systemd does for
//! socket activation, and what a binary upgrade does with the listening sockets).
//!
//! The descriptors are first duplicated (close-on-exec) above the target range in the parent,
//! so that placing them in the child with `dup2` — the only work done between `fork` and
//! `exec`, and async-signal-safe — can never overwrite one that is still to be placed.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// The first descriptor the child receives.
const FIRST: i32 = 3;

/// Spawns `command` with `fds[i]` open (and inheritable) as descriptor `3 + i` in the child.
/// Every other descriptor of this process is close-on-exec (Rust's default) and stays out.
pub fn spawn_with_fds(command: &mut Command, fds: &[BorrowedFd<'_>]) -> io::Result<Child> {
    let end = FIRST + i32::try_from(fds.len()).map_err(|_| io::Error::other("too many fds"))?;
    let mut above = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open descriptor (borrowed for the call)
        // returns a new descriptor >= `end`, which we own.
        let raw = syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, end))?;
        // SAFETY: `raw` was just returned by fcntl and is owned by nobody else.
        above.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let sources: Vec<i32> = above.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2, which is
    // async-signal-safe; it touches no lock and allocates nothing (`sources` was built here).
    unsafe {
        command.pre_exec(move || {
            for (offset, &source) in sources.iter().enumerate() {
                // dup2 leaves the target without FD_CLOEXEC: it survives the exec.
                syscall!(dup2(source, FIRST + offset as i32))?;
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(above);
    child
}
