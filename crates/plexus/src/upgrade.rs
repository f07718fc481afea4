//! Binary upgrade (`SIGUSR2`): the running process starts a new binary with the same arguments
//! and hands it every listening socket; the new process reports ready; only then does the old
//! one stop accepting and drain exactly as on `SIGTERM`.
//!
//! **How the sockets travel: inherited descriptors**, not `SCM_RIGHTS`. The old process is the
//! new one's parent, so placing the descriptors at 3, 4, … before `exec` needs no protocol and
//! cannot lose one half-way; it reuses the socket-activation convention (a count and
//! colon-separated names, here `PLEXUS_UPGRADE_FDS` / `PLEXUS_UPGRADE_FDNAMES`, checked
//! against the parent's pid), so the new process takes them by listener name as it takes
//! systemd's. `SCM_RIGHTS` would only be needed between unrelated processes.
//!
//! Names: a tcp/tls listener's socket is its name; the datagram socket of event loop `k` of a
//! udp/dtls listener is `name#k` (each loop owns one `SO_REUSEPORT` socket per listener, and
//! every one is passed: the new process binds none of its own, so the kernel's reuseport group
//! — and with it which socket a peer hashes to — does not change); `name#k@relay` is the
//! datagram relay of that socket (below); `@upgrade` is the readiness channel and `@pidfile`
//! the locked pid file.
//!
//! **Readiness: a unix socket pair** (`@upgrade`). The new process writes `ready\n` once its
//! configuration is valid, every socket is taken and its loops run; the old process answers
//! `go\n` once it has handed over (pid file, systemd `MAINPID=`, datagram peers). A pipe would
//! carry only the first half. A channel closed without `ready` means the new process died;
//! [`UpgradeOptions::timeout`] bounds the wait (the new process is then killed).
//!
//! **Datagram sessions** stay with the old process until they idle out or the grace ends:
//! both processes hold the same sockets, so after the hand-over only the new one reads them,
//! and forwards each datagram from a peer the old process still serves over that socket's relay
//! (a unix datagram socket pair, one per socket) — the old process had sent it the list of those
//! peers before `go`. The old process answers through its copy of the same socket, so the peer
//! sees the same address; when an old session ends, the old process releases the peer and its
//! next datagram opens a session in the new process (a DTLS peer then needs a new handshake,
//! after the old process's close_notify).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_sys::pidfile::PidFile;
use socket2::Socket;

/// Name of the readiness channel among the passed descriptors.
const CHANNEL: &str = "@upgrade";
/// Name of the pid file among the passed descriptors.
const PID_FILE: &str = "@pidfile";

/// The name of event loop `k`'s socket of datagram listener `listener`.
pub(crate) fn datagram_name(listener: &str, k: usize) -> String {
    format!("{listener}#{k}")
}

/// The name of the relay of that socket.
pub(crate) fn relay_name(listener: &str, k: usize) -> String {
    format!("{listener}#{k}@relay")
}

/// What a `SIGUSR2` starts.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// The binary to start (the CLI resolves `/proc/self/exe` at start, so a binary replaced
    /// on disk since is the one started).
    pub program: PathBuf,
    /// Its arguments (the CLI passes its own).
    pub args: Vec<OsString>,
    /// How long the new process has to report ready before it is killed and the upgrade
    /// abandoned.
    pub timeout: Duration,
}

/// The sockets and channel a new process received from the process it upgrades.
#[derive(Debug)]
pub struct Handover {
    fds: BTreeMap<String, OwnedFd>,
    channel: Option<UnixStream>,
    parent: u32,
}

impl Handover {
    /// Takes what an upgrading parent passed (see the module docs); `None` when this process
    /// was not started by an upgrade. Call it before any thread starts.
    pub fn from_env() -> io::Result<Option<Handover>> {
        let inherited = plexus_sys::listen_fds::take_upgrade()?;
        if inherited.is_empty() {
            return Ok(None);
        }
        let mut fds = BTreeMap::new();
        for fd in inherited {
            let name = fd.name.unwrap_or_default();
            fds.insert(name, fd.fd);
        }
        let channel = fds.remove(CHANNEL).map(UnixStream::from);
        Ok(Some(Handover {
            fds,
            channel,
            parent: std::os::unix::process::parent_id(),
        }))
    }

    /// The pid of the process being upgraded.
    pub fn parent(&self) -> u32 {
        self.parent
    }

    /// The descriptor of the (locked) pid file, if the old process had one.
    pub fn take_pid_file(&mut self) -> Option<OwnedFd> {
        self.fds.remove(PID_FILE)
    }

    pub(crate) fn take_stream(&mut self, listener: &str) -> Option<Socket> {
        self.fds.remove(listener).map(Socket::from)
    }

    /// Loop `k`'s socket of a datagram listener and its relay.
    pub(crate) fn take_datagram(
        &mut self,
        listener: &str,
        k: usize,
    ) -> Option<(std::net::UdpSocket, Option<UnixDatagram>)> {
        let socket = self.fds.remove(&datagram_name(listener, k))?;
        let relay = self.fds.remove(&relay_name(listener, k));
        Some((socket.into(), relay.map(UnixDatagram::from)))
    }

    pub(crate) fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    /// Closes what no listener took (a listener removed from the configuration), with a
    /// warning each.
    pub(crate) fn warn_unused(&mut self) {
        for name in std::mem::take(&mut self.fds).into_keys() {
            tracing::warn!(
                "upgrade: the old process passed a socket named '{name}' that no listener \
                 takes; closed"
            );
        }
    }
}

/// How recent a binary request (`plexus upgrade --binary`) must be to count: a file left
/// behind by a command that was killed must not redirect a later plain SIGUSR2.
const REQUEST_MAX_AGE: Duration = Duration::from_secs(60);

/// The file `plexus upgrade --binary PATH` writes next to the pid file: the binary to start
/// instead of the server's own.
pub fn request_path(pid_file: &std::path::Path) -> PathBuf {
    let mut path = pid_file.as_os_str().to_owned();
    path.push(".upgrade");
    PathBuf::from(path)
}

/// The file `plexus upgrade` creates next to the pid file and waits on: the server appends
/// the outcome of the upgrade to it (`ok <new pid>` or `error <why>`), if it exists.
pub fn result_path(pid_file: &std::path::Path) -> PathBuf {
    let mut path = pid_file.as_os_str().to_owned();
    path.push(".upgrade-result");
    PathBuf::from(path)
}

/// Appends `outcome` to the result file of `pid_file`, when `plexus upgrade` is waiting on it
/// (an existing regular file; never created here).
pub(crate) fn report_result(pid_file: &std::path::Path, outcome: &str) {
    let path = result_path(pid_file);
    let is_file = std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_file());
    if !is_file {
        return;
    }
    if let Ok(mut file) = std::fs::File::options().append(true).open(&path) {
        let _ = writeln!(file, "{outcome}");
    }
}

/// The binary requested for this upgrade, if a fresh, trustworthy request file exists: a
/// regular file (not a link) owned by root or by this process's user, writable by nobody
/// else, naming an absolute path.
pub(crate) fn requested_binary(pid_file: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let path = request_path(pid_file);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    let own_uid = std::fs::metadata("/proc/self").ok()?.uid();
    let fresh = meta
        .modified()
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age <= REQUEST_MAX_AGE);
    let trusted =
        meta.is_file() && (meta.uid() == 0 || meta.uid() == own_uid) && meta.mode() & 0o022 == 0;
    if !fresh || !trusted {
        tracing::warn!(
            "upgrade: ignoring {} (stale, not a regular file, or writable by others)",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let binary = PathBuf::from(text.trim());
    binary.is_absolute().then_some(binary)
}

/// Written by the new process once it serves.
pub(crate) const READY: &[u8] = b"ready\n";
/// Written by the old process once it has handed over.
pub(crate) const GO: &[u8] = b"go\n";

/// An upgrade the old process started and waits for.
pub(crate) struct InProgress {
    pub(crate) child: Child,
    pub(crate) channel: mio::net::UnixStream,
    /// A blocking copy of the channel, for `go`.
    pub(crate) go: UnixStream,
    pub(crate) started: Instant,
    pub(crate) deadline: Instant,
    received: Vec<u8>,
    /// The old process's ends of the datagram relays, by (listener index, loop).
    pub(crate) relays: Vec<(usize, usize, UnixDatagram)>,
}

/// What the readiness channel said.
pub(crate) enum ChannelState {
    /// Nothing conclusive yet.
    Waiting,
    /// `ready`.
    Ready,
    /// Closed (or broken) without `ready`.
    Closed,
}

impl InProgress {
    /// Reads what the new process wrote so far.
    pub(crate) fn read(&mut self) -> ChannelState {
        let mut buf = [0u8; 64];
        loop {
            match self.channel.read(&mut buf) {
                Ok(0) => return ChannelState::Closed,
                Ok(n) => {
                    self.received
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if self.received.starts_with(READY) {
                        return ChannelState::Ready;
                    }
                    if self.received.len() > 64 {
                        return ChannelState::Closed;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return ChannelState::Waiting
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ChannelState::Closed,
            }
        }
    }

    /// Kills the new process (if it still runs) and describes how it ended. A process whose
    /// channel just closed is given a moment to exit on its own, so its status is its own.
    pub(crate) fn abandon(&mut self, grace: Duration) -> String {
        let until = plexus_proto::deadline_after(Instant::now(), grace);
        while Instant::now() < until {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => status.to_string(),
            Err(err) => format!("unknown status ({err})"),
        }
    }
}

/// One descriptor to pass, by name.
pub(crate) struct Passed<'a> {
    pub(crate) name: String,
    pub(crate) fd: BorrowedFd<'a>,
}

/// Starts the new process with `passed` (plus the readiness channel and the relays of the
/// datagram sockets named in `datagram`, as `(listener index, loop, name)`).
pub(crate) fn spawn(
    options: &UpgradeOptions,
    passed: Vec<Passed<'_>>,
    datagram: &[(usize, usize, String)],
    pid_file: Option<&Arc<PidFile>>,
) -> io::Result<InProgress> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut relays = Vec::with_capacity(datagram.len());
    let mut their_relays = Vec::with_capacity(datagram.len());
    for (listener, k, name) in datagram {
        let (old_end, new_end) = UnixDatagram::pair()?;
        relays.push((*listener, *k, old_end));
        their_relays.push((format!("{name}@relay"), new_end));
    }
    let mut names: Vec<String> = passed.iter().map(|p| p.name.clone()).collect();
    let mut fds: Vec<BorrowedFd<'_>> = passed.iter().map(|p| p.fd).collect();
    for (name, relay) in &their_relays {
        names.push(name.clone());
        fds.push(relay.as_fd());
    }
    names.push(CHANNEL.into());
    fds.push(theirs.as_fd());
    if let Some(pid_file) = pid_file {
        names.push(PID_FILE.into());
        fds.push(pid_file.as_fd());
    }
    let [parent_var, count_var, names_var] = plexus_sys::listen_fds::UPGRADE_VARS;
    let mut command = Command::new(&options.program);
    command
        .args(&options.args)
        .env(parent_var, std::process::id().to_string())
        .env(count_var, fds.len().to_string())
        .env(names_var, names.join(":"))
        // The watchdog belongs to whichever process is the main one: the new process must
        // not discard `WATCHDOG_USEC` because this pid is named.
        .env_remove("WATCHDOG_PID");
    let child = plexus_sys::spawn::spawn_with_fds(&mut command, &fds)?;
    drop(fds);
    drop(their_relays);
    drop(theirs);
    let go = ours.try_clone()?;
    ours.set_nonblocking(true)?;
    let now = Instant::now();
    Ok(InProgress {
        child,
        channel: mio::net::UnixStream::from_std(ours),
        go,
        started: now,
        deadline: plexus_proto::deadline_after(now, options.timeout),
        received: Vec::new(),
        relays,
    })
}

/// Written to the channel by the last event loop to have handed its datagram peers over
/// (when the last clone is dropped), so the new process reads its datagram sockets only once
/// it knows which peers to forward.
pub(crate) struct GoSignal {
    pub(crate) channel: UnixStream,
}

impl Drop for GoSignal {
    fn drop(&mut self) {
        let _ = self.channel.set_nonblocking(false);
        let _ = self.channel.write_all(GO);
    }
}

/// The new process's side once it serves: the channel on which `go` arrives.
pub(crate) struct Takeover {
    pub(crate) channel: mio::net::UnixStream,
    pub(crate) parent: u32,
    pub(crate) started: Instant,
    /// `go` is not waited for longer than this: an old process that hangs after `ready` must
    /// not keep the new one from reading its datagram sockets.
    pub(crate) deadline: Instant,
}

/// How long a new process waits for `go` after `ready`.
pub(crate) const GO_TIMEOUT: Duration = Duration::from_secs(10);

impl Takeover {
    /// True once `go` arrived or the channel closed.
    pub(crate) fn done(&mut self) -> bool {
        let mut buf = [0u8; 16];
        loop {
            match self.channel.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) if buf.get(..n).is_some_and(|read| read.contains(&b'\n')) => return true,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
}
