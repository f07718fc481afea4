//! Daemonising: the classic double fork (fork, `setsid`, fork), `chdir("/")`, `umask(027)`, and
//! standard streams to `/dev/null` — with a startup pipe so the command the operator ran exits
//! only once the daemon is serving, and with the daemon's exit code if it is not.
//!
//! The original process blocks on the pipe's read end. The daemon writes one byte — its exit
//! status, 0 when serving — through [`StartupReport::report`]; if it dies before that, the pipe
//! closes empty and the original process exits 1. Until it reports, the daemon keeps the
//! original standard error, so startup errors reach the terminal (or the test harness);
//! [`redirect_stdio_to_null`] detaches it afterwards.
//!
//! Must run before any thread is spawned: `fork` copies only the calling thread, so a lock held
//! by another thread at that instant would stay locked forever in the child.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Which side of [`daemonize`] the caller is on.
#[derive(Debug)]
pub enum Daemonized {
    /// The process the operator started: the daemon has reported (or died); exit with `status`.
    Original {
        /// The daemon's startup status: 0 serving, otherwise the exit code to use.
        status: u8,
    },
    /// The daemon (session leader's child, cwd `/`, umask 027, stdin `/dev/null`).
    Daemon(StartupReport),
}

/// The daemon's end of the startup pipe.
#[derive(Debug)]
pub struct StartupReport {
    pipe: File,
}

impl StartupReport {
    /// Tells the waiting original process how startup went (0 = serving) and closes the pipe.
    pub fn report(self, status: u8) -> io::Result<()> {
        let mut pipe = self.pipe;
        pipe.write_all(&[status])
    }
}

/// Detaches from the terminal and returns on both sides; see the module documentation.
pub fn daemonize() -> io::Result<Daemonized> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    };

    // SAFETY: fork has no pointer arguments; the caller guarantees no other thread exists.
    let first = syscall!(fork())?;
    if first > 0 {
        drop(write_end);
        let status = wait_for_report(read_end);
        // Reap the intermediate child, which exits right after the second fork.
        let mut raw_status = 0;
        // SAFETY: `raw_status` is a writable int; `first` is our child.
        let _ = syscall!(waitpid(first, &mut raw_status, 0));
        return Ok(Daemonized::Original { status });
    }

    // Intermediate child: become a session leader without a controlling terminal, then fork
    // again so the daemon is not a session leader and can never reacquire one.
    drop(read_end);
    let outcome = (|| {
        // SAFETY: setsid has no arguments.
        syscall!(setsid())?;
        // SAFETY: as above, still a single thread.
        syscall!(fork())
    })();
    match outcome {
        Ok(0) => {}
        Ok(_) => exit_now(0),
        Err(err) => {
            let _ = (&write_end).write_all(&[1]);
            eprintln!("error: cannot daemonize: {err}");
            exit_now(1)
        }
    }

    let path = c"/";
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    syscall!(chdir(path.as_ptr()))?;
    // SAFETY: umask only changes the process's file mode mask (and cannot fail).
    unsafe { libc::umask(0o027) };
    let null = File::options().read(true).open("/dev/null")?;
    // SAFETY: both descriptors are open; dup2 replaces standard input atomically.
    syscall!(dup2(null.as_raw_fd(), libc::STDIN_FILENO))?;
    Ok(Daemonized::Daemon(StartupReport { pipe: write_end }))
}

/// Points standard output and standard error at `/dev/null` (standard input already is), so a
/// daemon never writes to, or holds open, the terminal or pipe it was started from.
pub fn redirect_stdio_to_null() -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    for target in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are open; dup2 swaps the target atomically.
        syscall!(dup2(null.as_raw_fd(), target))?;
    }
    Ok(())
}

fn wait_for_report(mut pipe: File) -> u8 {
    let mut byte = [0u8; 1];
    loop {
        match pipe.read(&mut byte) {
            Ok(1) => return byte[0],
            // Closed without a report: the daemon died during startup.
            Ok(_) => return 1,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return 1,
        }
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or destructors, which
    // belong to the original process, not to this short-lived copy of it.
    unsafe { libc::_exit(code) }
}
