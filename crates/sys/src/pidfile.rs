//! The pid file: created if absent, locked exclusively (`flock`) for the life of the process,
//! holding the process id, removed on exit.
//!
//! The lock, not the file's existence, says whether an instance runs: a file left behind by a
//! crash is not locked, so the next start takes it over. A second instance started with the
//! same file fails with [`PidFileError::AlreadyRunning`], naming the running pid.
//!
//! The path is often in a directory others can write to (or was, once): it is opened with
//! `O_NOFOLLOW` (a symlink planted there cannot make a root process truncate another file),
//! must be a regular file, and is emptied only once the lock is held (a second instance
//! never wipes the running one's pid).

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the pid file could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidFileError {
    /// Another process holds the lock.
    #[error("plexus already running with pid {pid} (pid file {})", path.display())]
    AlreadyRunning {
        /// What the file says (`?` if unreadable).
        pid: String,
        /// The pid file.
        path: PathBuf,
    },
    /// The path is a symbolic link, a FIFO, a directory…: refused, never followed or written.
    #[error("pid file {}: {what}; refusing to use it (remove it or choose another path)", path.display())]
    NotRegular {
        /// The pid file.
        path: PathBuf,
        /// What is there instead.
        what: &'static str,
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

/// A locked pid file; unlocked and removed on drop (unless it was handed over).
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
    /// Set once another process owns the file (an upgrade handed it over), or while an
    /// upgraded process has not yet taken it over: then drop leaves the file alone.
    keep: AtomicBool,
}

impl PidFile {
    /// Opens (or creates, mode 0644) `path` without following a symlink, checks it is a
    /// regular file, locks it without waiting, and only then replaces its content with this
    /// process's id.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let io_error = |source| PidFileError::Io {
            path: path.to_owned(),
            source,
        };
        let not_regular = |what| PidFileError::NotRegular {
            path: path.to_owned(),
            what,
        };
        let opened = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            // O_NONBLOCK: a FIFO there must not block the start; it is refused just below.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path);
        let mut file = match opened {
            Ok(file) => file,
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                return Err(not_regular("is a symbolic link"))
            }
            Err(err) => return Err(io_error(err)),
        };
        let kind = file.metadata().map_err(io_error)?.file_type();
        if !kind.is_file() {
            return Err(not_regular(if kind.is_dir() {
                "is a directory"
            } else {
                "is not a regular file"
            }));
        }
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
        // Emptied only now that the lock is ours.
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        writeln!(file, "{}", std::process::id()).map_err(io_error)?;
        file.sync_data().map_err(io_error)?;
        Ok(PidFile {
            file,
            path: path.to_owned(),
            keep: AtomicBool::new(false),
        })
    }

    /// Adopts the pid file an upgrading process passed down: `fd` is its open (and locked:
    /// `flock` locks belong to the open file, which both processes now share) descriptor,
    /// checked to be the file at `path`. The file is left alone on drop until
    /// [`take_over`](Self::take_over), so a new process that fails to start never removes the
    /// file of the one still serving.
    pub fn adopt(fd: OwnedFd, path: &Path) -> Result<PidFile, PidFileError> {
        let io_error = |source| PidFileError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::from(fd);
        let held = file.metadata().map_err(io_error)?;
        let named = std::fs::metadata(path).map_err(io_error)?;
        if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
            return Err(io_error(io::Error::other(
                "the pid file passed by the upgrading process is not this file",
            )));
        }
        Ok(PidFile {
            file,
            path: path.to_owned(),
            keep: AtomicBool::new(true),
        })
    }

    /// The old process of an upgrade, once the new one is ready: the file now names
    /// `new_pid`, and this process leaves it alone at its exit.
    pub fn hand_over(&self, new_pid: u32) -> io::Result<()> {
        self.write_pid(new_pid)?;
        self.keep.store(true, Ordering::Release);
        Ok(())
    }

    /// The new process of an upgrade, once the old one has handed over: the file names this
    /// process, and is removed at its exit.
    pub fn take_over(&self) -> io::Result<()> {
        self.write_pid(std::process::id())?;
        self.keep.store(false, Ordering::Release);
        Ok(())
    }

    /// Rewrites the file in place without an empty moment (one write over the old text, then
    /// the length cut), so a reader such as `plexus upgrade` sees one pid or the other.
    fn write_pid(&self, pid: u32) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let text = format!("{pid}\n");
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)?;
        self.file.sync_data()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for PidFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if self.keep.load(Ordering::Acquire) {
            return;
        }
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

    #[test]
    fn a_symlink_or_fifo_at_the_path_is_refused_and_its_target_untouched() {
        let dir = std::env::temp_dir().join(format!("plexus-pidlink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep me\n").unwrap();
        let link = dir.join("plexus.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = PidFile::acquire(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());

        let fifo = dir.join("fifo.pid");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let err = PidFile::acquire(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
