//! The acceptor's part of a binary upgrade (see `crate::upgrade` for the design): SIGUSR2
//! starts the new process; its `ready` hands over (systemd `MAINPID=`, the pid file, the
//! datagram peers) and then drains through the same graceful stop as SIGTERM; a new process
//! that dies or is late is killed and the old one goes on serving. In the new process: report
//! `ready`, wait for `go`, then read the datagram sockets and take the pid file over.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Interest;
use plexus_sys::pidfile::PidFile;
use tracing::{error, info, warn};

use super::{Acceptor, Phase, StopRequest, UPGRADE};
use crate::event_loop::Command;
use crate::upgrade::{self, ChannelState, GoSignal, InProgress, Passed, Takeover, UpgradeOptions};

/// How long a new process whose channel closed may take to exit before it is killed (its exit
/// status is then the one logged).
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// What the acceptor knows about upgrades.
#[derive(Default)]
pub(crate) struct UpgradeState {
    options: Option<UpgradeOptions>,
    pid_file: Option<Arc<PidFile>>,
    /// Copies of every datagram socket: (listener index, ordinal, name, socket).
    datagram: Vec<(usize, usize, String, std::net::UdpSocket)>,
    /// Old side: the new process started and not yet ready.
    in_progress: Option<InProgress>,
    /// New side, before `run`: the channel to the old process and its pid.
    pending: Option<(UnixStream, u32)>,
    /// New side: `ready` sent, `go` awaited.
    takeover: Option<Takeover>,
}

impl UpgradeState {
    /// A reload's `upgrade_timeout`, for the next upgrade.
    pub(super) fn set_timeout(&mut self, timeout: std::time::Duration) {
        if let Some(options) = self.options.as_mut() {
            options.timeout = timeout;
        }
    }

    /// The next upgrade deadline, if one runs.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match (&self.in_progress, &self.takeover) {
            (Some(up), _) => Some(up.deadline),
            (None, Some(takeover)) => Some(takeover.deadline),
            (None, None) => None,
        }
    }
}

impl Acceptor {
    /// Tells a waiting `plexus upgrade` how the upgrade went.
    fn report(&self, outcome: &str) {
        if let Some(pid_file) = &self.upgrade.pid_file {
            upgrade::report_result(pid_file.path(), outcome);
        }
    }

    /// Enables SIGUSR2 upgrades (`options`), with what is passed besides the listeners.
    pub(crate) fn set_upgrade(
        &mut self,
        options: Option<UpgradeOptions>,
        pid_file: Option<Arc<PidFile>>,
        datagram: Vec<(usize, usize, String, std::net::UdpSocket)>,
    ) {
        self.upgrade.options = options;
        self.upgrade.pid_file = pid_file;
        self.upgrade.datagram = datagram;
    }

    /// This process upgrades `parent`: report to it over `channel` once serving.
    pub(crate) fn set_takeover(&mut self, channel: UnixStream, parent: u32) {
        self.upgrade.pending = Some((channel, parent));
    }

    /// New process, loops running: tells the old process we serve. False if this process
    /// upgrades nobody (then it reports to systemd itself).
    pub(crate) fn report_ready_to_parent(&mut self) -> bool {
        let Some((mut channel, parent)) = self.upgrade.pending.take() else {
            return false;
        };
        if let Err(err) = channel.write_all(upgrade::READY) {
            error!("upgrade: cannot tell pid {parent} that this process is ready: {err}");
        }
        let now = Instant::now();
        let registered = channel.set_nonblocking(true).and_then(|()| {
            let mut channel = mio::net::UnixStream::from_std(channel);
            self.poll
                .registry()
                .register(&mut channel, UPGRADE, Interest::READABLE)
                .map(|()| channel)
        });
        match registered {
            Ok(channel) => {
                info!("upgrade: ready; waiting for pid {parent} to hand over");
                self.upgrade.takeover = Some(Takeover {
                    channel,
                    parent,
                    started: now,
                    deadline: plexus_proto::deadline_after(now, upgrade::GO_TIMEOUT),
                });
            }
            Err(err) => {
                error!("upgrade: channel to pid {parent} unusable: {err}");
                self.finish_takeover(None);
            }
        }
        true
    }

    /// SIGUSR2: start the new binary with every socket, unless an upgrade cannot start now.
    pub(super) fn start_upgrade(&mut self) {
        let me = std::process::id();
        if self.phase != Phase::Running {
            info!("SIGUSR2 received while stopping: not upgrading");
            self.report("error the server is stopping");
            return;
        }
        let Some(mut options) = self.upgrade.options.clone() else {
            warn!("SIGUSR2 received: binary upgrade is not enabled for this server; ignored");
            self.report("error binary upgrade is not enabled for this server (e.g. --chroot)");
            return;
        };
        let requested = self
            .upgrade
            .pid_file
            .as_ref()
            .and_then(|pid_file| upgrade::requested_binary(pid_file.path()));
        if let Some(binary) = requested {
            options.program = binary;
        }
        let refusal = match (&self.upgrade.takeover, &self.upgrade.in_progress) {
            (Some(takeover), _) => Some(format!(
                "this process (pid {me}) is still taking over from pid {}; try again once it \
                 serves",
                takeover.parent
            )),
            (None, Some(up)) => Some(format!(
                "an upgrade is already in progress (new process pid {}, started {} ms ago)",
                up.child.id(),
                up.started.elapsed().as_millis()
            )),
            (None, None) => None,
        };
        if let Some(refusal) = refusal {
            warn!("SIGUSR2 received: upgrade refused: {refusal}");
            // No result: the `plexus upgrade` waiting is the one of the upgrade in progress.
            return;
        }
        let mut passed: Vec<Passed<'_>> = Vec::new();
        for listener in &self.listeners {
            passed.push(Passed {
                name: listener.info.name.to_string(),
                fd: listener.socket.as_fd(),
            });
        }
        for (_, _, name, socket) in &self.upgrade.datagram {
            passed.push(Passed {
                name: name.clone(),
                fd: socket.as_fd(),
            });
        }
        let datagram: Vec<(usize, usize, String)> = self
            .upgrade
            .datagram
            .iter()
            .map(|(listener, ordinal, name, _)| (*listener, *ordinal, name.clone()))
            .collect();
        let spawned = upgrade::spawn(&options, passed, &datagram, self.upgrade.pid_file.as_ref());
        match spawned {
            Ok(mut up) => {
                if let Err(err) =
                    self.poll
                        .registry()
                        .register(&mut up.channel, UPGRADE, Interest::READABLE)
                {
                    let status = up.abandon(Duration::ZERO);
                    let why = format!("cannot watch the new process: {err} (killed it: {status})");
                    error!("SIGUSR2 received: upgrade failed: {why}; still serving as pid {me}");
                    self.report(&format!("error {why}"));
                    return;
                }
                info!(
                    "SIGUSR2 received: upgrading: started {} as pid {}; waiting up to {} for it \
                     to be ready",
                    options.program.display(),
                    up.child.id(),
                    humantime::format_duration(options.timeout)
                );
                self.upgrade.in_progress = Some(up);
            }
            Err(err) => {
                let why = format!("cannot start {}: {err}", options.program.display());
                error!("SIGUSR2 received: upgrade failed: {why}; still serving as pid {me}");
                self.report(&format!("error {why}"));
            }
        }
    }

    /// The upgrade channel is readable (either side).
    pub(super) fn upgrade_event(&mut self) {
        if let Some(up) = self.upgrade.in_progress.as_mut() {
            match up.read() {
                ChannelState::Waiting => {}
                ChannelState::Ready => self.hand_over(),
                ChannelState::Closed => {
                    self.abandon_upgrade("exited before it was ready", EXIT_GRACE)
                }
            }
            return;
        }
        if let Some(takeover) = self.upgrade.takeover.as_mut() {
            if takeover.done() {
                let takeover = self.upgrade.takeover.take();
                self.finish_takeover(takeover);
            }
        }
    }

    /// Enforces the upgrade timeouts.
    pub(super) fn upgrade_deadline(&mut self, now: Instant) {
        if self
            .upgrade
            .in_progress
            .as_ref()
            .is_some_and(|up| now >= up.deadline)
        {
            let timeout = self.upgrade.options.as_ref().map(|o| o.timeout);
            let why = format!(
                "was not ready within {}; killed it",
                humantime::format_duration(timeout.unwrap_or_default())
            );
            self.abandon_upgrade(&why, Duration::ZERO);
        }
        if self
            .upgrade
            .takeover
            .as_ref()
            .is_some_and(|t| now >= t.deadline)
        {
            let takeover = self.upgrade.takeover.take();
            if let Some(t) = &takeover {
                warn!(
                    "upgrade: pid {} did not hand over within {}; serving every socket anyway",
                    t.parent,
                    humantime::format_duration(upgrade::GO_TIMEOUT)
                );
            }
            self.finish_takeover(takeover);
        }
    }

    fn abandon_upgrade(&mut self, why: &str, grace: Duration) {
        let Some(mut up) = self.upgrade.in_progress.take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut up.channel);
        let pid = up.child.id();
        let status = up.abandon(grace);
        let why = format!("the new process (pid {pid}) {why} ({status})");
        error!(
            "upgrade failed: {why}; still serving as pid {}",
            std::process::id()
        );
        self.report(&format!("error {why}"));
    }

    /// Old process: the new one is ready. Tell systemd and the pid file who the main process
    /// is now, give the datagram peers' list to the new process, then drain as on SIGTERM.
    fn hand_over(&mut self) {
        let Some(mut up) = self.upgrade.in_progress.take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut up.channel);
        let (pid, me) = (up.child.id(), std::process::id());
        info!(
            "upgrade: new process pid {pid} is ready {} ms after SIGUSR2; handing over, pid {me} \
             stops accepting and drains",
            up.started.elapsed().as_millis()
        );
        // From the main process (NotifyAccess=main suffices); from now on the new process
        // reports, so this one stops notifying (no STOPPING=1, no watchdog).
        self.notify(&format!(
            "MAINPID={pid}\nSTATUS=upgraded: pid {pid} serves, pid {me} drains"
        ));
        self.notifier = None;
        self.watchdog = None;
        if let Some(pid_file) = &self.upgrade.pid_file {
            if let Err(err) = pid_file.hand_over(pid) {
                warn!(
                    "upgrade: cannot write pid {pid} into {}: {err}",
                    pid_file.path().display()
                );
            }
        }
        self.report(&format!("ok {pid}"));
        let go = Arc::new(GoSignal { channel: up.go });
        let loops = self.loops.len().max(1);
        let mut relays: Vec<Vec<_>> = (0..loops).map(|_| Vec::new()).collect();
        for (listener, ordinal, relay) in up.relays.drain(..) {
            // Always a slot: `relays` has `loops` (at least 1) entries.
            if let Some(slot) = relays.get_mut(ordinal.checked_rem(loops).unwrap_or(0)) {
                slot.push((listener, ordinal, relay));
            }
        }
        for (index, relays) in relays.into_iter().enumerate() {
            let command = Command::ReleaseDatagrams {
                relays,
                go: Arc::clone(&go),
            };
            if self
                .loops
                .get(index)
                .is_some_and(|l| l.send(command).is_err())
            {
                warn!(
                    event_loop = index,
                    "upgrade: event loop did not take the hand-over (queue full); it keeps \
                     reading its datagram sockets while it drains"
                );
            }
        }
        // The last loop to be done with it writes `go`.
        drop(go);
        self.upgrade.datagram.clear();
        self.handed_over = true;
        self.stop_loops(StopRequest::Graceful);
    }

    /// New process: the old one handed over (or is gone, or late).
    fn finish_takeover(&mut self, takeover: Option<Takeover>) {
        let (parent, waited) = match takeover {
            Some(mut t) => {
                let _ = self.poll.registry().deregister(&mut t.channel);
                (t.parent.to_string(), t.started.elapsed().as_millis())
            }
            None => ("?".to_owned(), 0),
        };
        if let Some(pid_file) = &self.upgrade.pid_file {
            if let Err(err) = pid_file.take_over() {
                warn!(
                    "upgrade: cannot write this pid into {}: {err}",
                    pid_file.path().display()
                );
            }
        }
        self.broadcast_command(|| Command::ResumeDatagrams);
        let me = std::process::id();
        self.notify(&format!(
            "MAINPID={me}\nREADY=1\nSTATUS=serving on {} listener(s), upgraded from pid {parent}",
            self.listeners.len()
        ));
        info!(
            "upgrade: took over from pid {parent} ({waited} ms after ready); serving as pid {me}"
        );
    }
}
