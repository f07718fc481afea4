//! The only crate of plexus allowed to use `unsafe`.
//!
//! Every raw system call goes through the `syscall!` macro, which turns the C convention
//! (`-1` and `errno`) into an [`std::io::Result`]. Each `unsafe` block carries a `// SAFETY:`
//! line; the rest of plexus calls the safe functions exported here.

/// Calls a `libc` function and maps a `-1` return to `Err(io::Error::last_os_error())`.
macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)* ) ) => {{
        // SAFETY: the caller passes arguments that satisfy the libc function's contract;
        // each use site documents why its pointers are valid.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

pub mod daemon;
pub mod dgram;
pub mod dtls;
pub mod epoll;
pub mod fs;
pub mod listen_fds;
pub mod notify;
pub mod pidfile;
pub mod privileges;
pub mod rlimit;
pub mod sendfile;
pub mod signal;
pub mod spawn;
pub mod splice;
pub mod uring;

/// Whether an `accept` error means the process or the system ran out of file descriptors
/// (`EMFILE` / `ENFILE`), the case a server must handle without spinning.
pub fn is_descriptor_exhaustion(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Whether a non-blocking `connect` error only says the connect is under way (`EINPROGRESS`):
/// its result comes with the socket's writable edge.
pub fn is_connect_in_progress(err: &std::io::Error) -> bool {
    err.raw_os_error() == Some(libc::EINPROGRESS)
}
