//! systemd's readiness protocol (`sd_notify`): `KEY=VALUE` lines in one datagram to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`),
//! and the watchdog interval from `$WATCHDOG_USEC`.
//!
//! Plain `std` sockets suffice; it lives here with the other systemd integration.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    target: String,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`, or `None` when the variable is unset or empty
    /// (not started by systemd with `Type=notify`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(target) if !target.is_empty() => Notifier::new(&target).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `target`: a socket path, or `@name` for an abstract socket.
    pub fn new(target: &str) -> io::Result<Notifier> {
        let addr = match target.strip_prefix('@') {
            Some(name) => abstract_addr(name.as_bytes())?,
            None => SocketAddr::from_pathname(target)?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
            target: target.to_owned(),
        })
    }

    /// Sends `state`, e.g. `"READY=1\nSTATUS=serving"`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", self.target)))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// `CLOCK_MONOTONIC` in microseconds, for the `MONOTONIC_USEC=` field systemd wants next to
/// `RELOADING=1` (required by `Type=notify-reload`).
pub fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    if syscall!(clock_gettime(libc::CLOCK_MONOTONIC, &mut now)).is_err() {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` (as systemd advises), when that
/// is set and `$WATCHDOG_PID`, if set, names this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_arrives_as_one_datagram_on_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("plexus-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
        notifier.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 128];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_names_start_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("plexus-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("STOPPING=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn sending_to_a_missing_socket_names_it() {
        let err = Notifier::new("/nonexistent/plexus/notify.sock")
            .unwrap()
            .notify("READY=1")
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/plexus/notify.sock"));
    }
}
