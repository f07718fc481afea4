//! Resource limits: the open-descriptor limit (`RLIMIT_NOFILE`) a server must raise at start.

use std::io;

/// Soft and hard limit of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The value enforced now.
    pub soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: u64,
}

/// Reads the current `RLIMIT_NOFILE`.
pub fn nofile() -> io::Result<Limit> {
    let mut raw = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `raw` is a valid, writable rlimit for the duration of the call.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut raw))?;
    Ok(Limit {
        soft: raw.rlim_cur,
        hard: raw.rlim_max,
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new limit.
pub fn raise_nofile_to_hard() -> io::Result<Limit> {
    let current = nofile()?;
    if current.soft >= current.hard {
        return Ok(current);
    }
    let raw = libc::rlimit {
        rlim_cur: current.hard,
        rlim_max: current.hard,
    };
    // SAFETY: `raw` is a valid, initialised rlimit that outlives the call.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &raw))?;
    nofile()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_exceeds_hard_limit() {
        let before = nofile().unwrap();
        let after = raise_nofile_to_hard().unwrap();
        assert_eq!(after.hard, before.hard);
        assert_eq!(after.soft, before.hard);
    }
}
