//! Process-wide signal dispositions that cannot be expressed as events.
//!
//! Signals plexus reacts to (TERM, INT, HUP, QUIT) arrive as events through signal-hook's
//! self-pipe in the runtime crate; this module only handles `SIGPIPE`, which must be ignored so
//! that writing to a peer that reset the connection returns `EPIPE` instead of killing the process.

use std::io;

/// Sets `SIGPIPE` to `SIG_IGN` for the whole process.
pub fn ignore_sigpipe() -> io::Result<()> {
    // SAFETY: installing SIG_IGN has no handler code to be async-signal-safe, and `signal`
    // only touches the process's disposition table.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `SIGUSR2` to process `pid` (what `plexus upgrade` does to the running server).
pub fn send_sigusr2(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"))?;
    // SAFETY: kill takes plain integers; a positive pid names exactly one process.
    syscall!(kill(pid, libc::SIGUSR2)).map(drop)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ignoring_sigpipe_succeeds_and_is_idempotent() {
        super::ignore_sigpipe().unwrap();
        super::ignore_sigpipe().unwrap();
    }
}
