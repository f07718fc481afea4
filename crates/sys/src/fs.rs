//! Opening files inside a directory without ever leaving it: `openat2(2)` with
//! `RESOLVE_BENEATH`, so `..`, absolute paths and symlinks that point outside are refused by
//! the kernel itself, at open time (no check-then-open race).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Flags of every open under a served directory: `O_NONBLOCK` so that opening a FIFO (or a
/// device) returns at once instead of blocking the thread until a writer appears, `O_NOCTTY`
/// so a terminal never becomes the controlling one. Regular files ignore `O_NONBLOCK`.
pub const OPEN_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;

/// [`OPEN_FLAGS`] for a directory: anything else (a FIFO where a directory should be) fails.
pub const OPEN_DIRECTORY_FLAGS: libc::c_int = OPEN_FLAGS | libc::O_DIRECTORY;

/// Opens `relative` (read-only, never blocking: [`OPEN_FLAGS`]) below the directory `dir`.
/// Resolution that would leave `dir` fails with `EXDEV` (see [`is_escape`]); a kernel without
/// openat2 (before 5.6) gives `ENOSYS`. The caller checks the file type (`fstat`) before
/// reading: anything may sit under a directory, a FIFO included.
pub fn open_beneath(dir: impl AsFd, relative: &Path) -> io::Result<File> {
    let path = CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: open_how is a plain C struct of integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = OPEN_FLAGS as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    let dir_fd = dir.as_fd().as_raw_fd();
    // SAFETY: `path` is a NUL-terminated string and `how` a valid open_how that both outlive
    // the call; the size passed is the struct's own size.
    let fd = syscall!(syscall(
        libc::SYS_openat2,
        dir_fd,
        path.as_ptr(),
        &how as *const libc::open_how,
        std::mem::size_of::<libc::open_how>()
    ))?;
    // SAFETY: openat2 succeeded, so `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

/// Whether an [`open_beneath`] error means "the path leads outside the directory".
pub fn is_escape(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EXDEV)
}

/// The error [`open_beneath`] reports for an escape, for fallbacks that detect it themselves.
pub fn escape_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EXDEV)
}

/// Whether an [`open_beneath`] error means the kernel has no `openat2` (before Linux 5.6).
pub fn is_unsupported(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOSYS)
}

/// Whether an open failed because a path component is not a directory (`ENOTDIR`).
pub fn is_not_a_directory(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn files_below_open_and_escapes_are_refused() {
        let base = std::env::temp_dir().join(format!("plexus-beneath-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), b"inside").unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root.join("inner")).unwrap();
        let dir = File::open(&root).unwrap();

        let mut text = String::new();
        open_beneath(&dir, Path::new("sub/a.txt"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "inside");
        assert!(
            open_beneath(&dir, Path::new("inner")).is_ok(),
            "symlink within the root"
        );
        for escape in ["../secret", "escape", "sub/../../secret"] {
            let err = open_beneath(&dir, Path::new(escape)).unwrap_err();
            assert!(is_escape(&err), "{escape}: {err}");
        }
        let err = open_beneath(&dir, Path::new("/etc/passwd")).unwrap_err();
        assert!(is_escape(&err), "absolute: {err}");
        // A FIFO opens at once (no writer needed) and shows as what it is.
        let fifo = CString::new(root.join("pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let opened = open_beneath(&dir, Path::new("pipe")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(opened.metadata().unwrap().file_type().is_fifo());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
