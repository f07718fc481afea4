//! The pid file: created if absent, locked exclusively (`flock`) for the life of the process,
//! holding the process id, removed on exit.
//!
//! The lock, not the file's existence, says whether an instance runs: a file left behind by a
//! crash is not locked, so the next start takes it over. A second instance started with the
//! same file fails with [`PidFileError::AlreadyRunning`], naming the running pid.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the pid file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Another process holds the lock.
    #[error("plexus already running with pid {pid} (pid file {})", path.display())]
    AlreadyRunning {
        /// What the file says (`?` if unreadable).
        pid: String,
        /// The pid file.
        path: PathBuf,
    },
    /// The file could not be opened, locked or written.
    #[error("pid file {}: {source}", path.display())]
    Io {
        /// The pid file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
}

/// A locked pid file; unlocked and removed on drop.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// Opens (or creates, mode 0644) `path`, locks it without waiting, and writes this
    /// process's id into it.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let io_error = |source| PidFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io_error)?;
        // SAFETY: `file` is an open descriptor for the duration of the call.
        if let Err(err) = syscall!(flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)) {
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = match text.trim() {
                    "" => "?".to_owned(),
                    pid => pid.to_owned(),
                };
                return Err(PidFileError::AlreadyRunning {
                    pid,
                    path: path.to_owned(),
                });
            }
            return Err(io_error(err));
        }
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        writeln!(file, "{}", std::process::id()).map_err(io_error)?;
        file.sync_data().map_err(io_error)?;
        Ok(PidFile {
            file,
            path: path.to_owned(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so no other instance can take a file that is about to
        // vanish. If removal is not allowed (privileges dropped, chroot), empty it instead:
        // an unlocked, empty pid file names no process.
        if std::fs::remove_file(&self.path).is_err() {
            let _ = self.file.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_pid_and_drop_removes_the_file() {
        let dir = std::env::temp_dir().join(format!("plexus-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plexus.pid");
        let first = PidFile::acquire(&path).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open conflicts even
        // within one process.
        match PidFile::acquire(&path) {
            Err(err @ PidFileError::AlreadyRunning { .. }) => {
                let message = err.to_string();
                assert!(
                    message.contains(&format!("pid {}", std::process::id())),
                    "{message}"
                );
            }
            other => panic!("second acquire should be refused, got {other:?}"),
        }
        drop(first);
        assert!(!path.exists(), "pid file removed on drop");
        let again = PidFile::acquire(&path).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
