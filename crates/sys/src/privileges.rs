//! Giving up root: user and group lookup (`getpwnam_r`, `getgrnam_r`), `chroot`, and the drop
//! itself in the only safe order — supplementary groups, then the group, then the user — with
//! a check that root cannot be regained.
//!
//! Called after the listeners are bound (ports below 1024 need root) and before serving.
//! glibc applies `setgroups`/`setgid`/`setuid` to every thread of the process, but plexus
//! calls them before its threads start anyway.

use std::ffi::{CStr, CString};
use std::io;
use std::path::Path;

/// Why privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivilegeError {
    /// No such user in the password database.
    #[error("user '{0}' not found")]
    UnknownUser(String),
    /// No such group in the group database.
    #[error("group '{0}' not found")]
    UnknownGroup(String),
    /// A name contains a NUL byte.
    #[error("invalid name '{0}'")]
    InvalidName(String),
    /// A lookup or a set*id call failed.
    #[error("{what}: {source}")]
    Os {
        /// The step that failed.
        what: String,
        /// What the operating system said.
        source: io::Error,
    },
    /// The process could become root again after the drop.
    #[error("privileges not dropped: setuid(0) still succeeds after switching to uid {0}")]
    StillPrivileged(u32),
}

/// A user from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks `name` up with `getpwnam_r`.
pub fn lookup_user(name: &str) -> Result<User, PrivilegeError> {
    let c_name = CString::new(name).map_err(|_| PrivilegeError::InvalidName(name.to_owned()))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is a plain C struct; all-zero is a valid value to be overwritten.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid and writable for the call; `buf.len()` is the size of
        // `buf`, where getpwnam_r stores the strings `entry` points to.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Err(PrivilegeError::UnknownUser(name.to_owned())),
            0 => {
                return Ok(User {
                    name: name.to_owned(),
                    uid: entry.pw_uid,
                    gid: entry.pw_gid,
                })
            }
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            err => {
                return Err(PrivilegeError::Os {
                    what: format!("looking up user '{name}'"),
                    source: io::Error::from_raw_os_error(err),
                })
            }
        }
    }
}

/// Looks `name` up with `getgrnam_r` and returns its group id.
pub fn lookup_group(name: &str) -> Result<u32, PrivilegeError> {
    let c_name = CString::new(name).map_err(|_| PrivilegeError::InvalidName(name.to_owned()))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: group is a plain C struct; all-zero is a valid value to be overwritten.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user: valid, writable pointers and the true size of `buf`.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Err(PrivilegeError::UnknownGroup(name.to_owned())),
            0 => return Ok(entry.gr_gid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            err => {
                return Err(PrivilegeError::Os {
                    what: format!("looking up group '{name}'"),
                    source: io::Error::from_raw_os_error(err),
                })
            }
        }
    }
}

/// Changes the root directory to `dir` and the working directory to the new `/`.
pub fn chroot(dir: &Path) -> Result<(), PrivilegeError> {
    let os = |what: String| move |source| PrivilegeError::Os { what, source };
    let c_dir = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| PrivilegeError::InvalidName(dir.display().to_string()))?;
    // SAFETY: `c_dir` is NUL-terminated and outlives the call.
    syscall!(chroot(c_dir.as_ptr())).map_err(os(format!("chroot {}", dir.display())))?;
    let root: &CStr = c"/";
    // SAFETY: `root` is NUL-terminated and static.
    syscall!(chdir(root.as_ptr())).map_err(os("chdir / after chroot".to_owned()))?;
    Ok(())
}

/// Drops every supplementary group, then sets the group to `gid` and the user to `uid`
/// (real, effective and saved), and verifies that `setuid(0)` now fails.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    // SAFETY: the get*id calls have no arguments and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 && euid == uid && egid == gid {
        // Already that user (e.g. `--user` naming the account plexus was started as): there is
        // nothing to give up, and setgroups would fail without privileges.
        return Ok(());
    }
    let os = |what: &str| {
        let what = what.to_owned();
        move |source| PrivilegeError::Os { what, source }
    };
    // SAFETY: a count of 0 means the list pointer is not read.
    syscall!(setgroups(0, std::ptr::null()))
        .map_err(os("setgroups (clearing supplementary groups)"))?;
    // SAFETY: setgid/setuid take plain integers.
    syscall!(setgid(gid)).map_err(os(&format!("setgid {gid}")))?;
    // SAFETY: as above.
    syscall!(setuid(uid)).map_err(os(&format!("setuid {uid}")))?;
    if uid != 0 {
        // SAFETY: as above; this call must fail now.
        if syscall!(setuid(0)).is_ok() {
            return Err(PrivilegeError::StillPrivileged(uid));
        }
    }
    // SAFETY: the get*id calls have no arguments and cannot fail.
    let (ruid, euid, rgid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if ruid != uid || euid != uid || rgid != gid || egid != gid {
        return Err(PrivilegeError::Os {
            what: format!("ids after the drop are uid {ruid}/{euid} gid {rgid}/{egid}"),
            source: io::Error::other(format!("expected uid {uid} gid {gid}")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_zero_in_the_password_database() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_group("root").unwrap(), 0);
    }

    #[test]
    fn unknown_names_are_reported_by_name() {
        let err = lookup_user("no-such-user-plexus").unwrap_err();
        assert_eq!(err.to_string(), "user 'no-such-user-plexus' not found");
        let err = lookup_group("no-such-group-plexus").unwrap_err();
        assert_eq!(err.to_string(), "group 'no-such-group-plexus' not found");
        assert!(matches!(
            lookup_user("a\0b"),
            Err(PrivilegeError::InvalidName(_))
        ));
    }
}
