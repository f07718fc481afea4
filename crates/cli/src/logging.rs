//! Logging setup: tracing as text or JSON, filtered by `RUST_LOG` (default `info`), written to
//! stderr, to syslog (`/dev/log`, RFC 3164 framing, facility `daemon`) or to the systemd
//! journal (its native protocol on `/run/systemd/journal/socket`).
//!
//! Syslog and journald are one datagram per event over a unix socket, simple enough to write
//! here rather than pull in two crates; the socket is connected at start so a missing daemon is
//! a clear error instead of silently lost logs.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::ValueEnum;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The syslog socket.
const SYSLOG_SOCKET: &str = "/dev/log";
/// journald's native-protocol socket.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";
/// Syslog facility `daemon` (3), shifted as in the `<PRI>` field.
const FACILITY_DAEMON: u8 = 3 << 3;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogTarget {
    /// Standard error (lost once `--daemon` detaches).
    Stderr,
    /// The local syslog daemon through /dev/log.
    Syslog,
    /// The systemd journal, with PRIORITY and SYSLOG_IDENTIFIER fields.
    Journald,
}

/// Installs the global subscriber; fails when the syslog or journald socket is unusable.
pub(crate) fn init(format: LogFormat, target: LogTarget) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = match target {
        LogTarget::Stderr => Writer::Stderr,
        LogTarget::Syslog => {
            Writer::Datagram(Arc::new(Sink::connect(SYSLOG_SOCKET, Protocol::Syslog)?))
        }
        LogTarget::Journald => Writer::Datagram(Arc::new(Sink::connect(
            JOURNALD_SOCKET,
            Protocol::Journald,
        )?)),
    };
    let ansi = target == LogTarget::Stderr && io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // syslog and the journal stamp each record themselves.
    match (format, target) {
        (LogFormat::Text, LogTarget::Stderr) => builder.with_target(false).init(),
        (LogFormat::Text, _) => builder.with_target(false).without_time().init(),
        (LogFormat::Json, LogTarget::Stderr) => builder.json().init(),
        (LogFormat::Json, _) => builder.json().without_time().init(),
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Syslog,
    Journald,
}

/// A connected datagram socket to syslog or journald.
#[derive(Debug)]
struct Sink {
    socket: UnixDatagram,
    protocol: Protocol,
    pid: u32,
}

impl Sink {
    fn connect(path: &str, protocol: Protocol) -> anyhow::Result<Sink> {
        let (option, daemon) = match protocol {
            Protocol::Syslog => ("syslog", "a syslog daemon (rsyslog, syslog-ng, journald)"),
            Protocol::Journald => ("journald", "systemd-journald"),
        };
        let socket = UnixDatagram::unbound()
            .and_then(|socket| socket.connect(Path::new(path)).map(|()| socket))
            .with_context(|| {
                format!("--log-target {option}: cannot connect to {path} (is {daemon} running?)")
            })?;
        Ok(Sink {
            socket,
            protocol,
            pid: std::process::id(),
        })
    }

    fn send(&self, level: Level, message: &[u8]) {
        let message = message.strip_suffix(b"\n").unwrap_or(message);
        let datagram = match self.protocol {
            Protocol::Syslog => {
                let mut datagram = format!(
                    "<{}>plexus[{}]: ",
                    FACILITY_DAEMON + severity(level),
                    self.pid
                )
                .into_bytes();
                datagram.extend_from_slice(message);
                datagram
            }
            Protocol::Journald => {
                let mut datagram = format!(
                    "PRIORITY={}\nSYSLOG_IDENTIFIER=plexus\nSYSLOG_PID={}\nMESSAGE\n",
                    severity(level),
                    self.pid
                )
                .into_bytes();
                // The binary form (length, then bytes) allows newlines inside the message.
                datagram.extend_from_slice(&(message.len() as u64).to_le_bytes());
                datagram.extend_from_slice(message);
                datagram.push(b'\n');
                datagram
            }
        };
        // Nowhere to report a lost log line; the daemon may be restarting.
        let _ = self.socket.send(&datagram);
    }
}

/// syslog severity of a tracing level.
fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The subscriber's writer factory: stderr, or one datagram per event.
#[derive(Clone)]
enum Writer {
    Stderr,
    Datagram(Arc<Sink>),
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        self.event_writer(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        self.event_writer(*meta.level())
    }
}

impl Writer {
    fn event_writer(&self, level: Level) -> EventWriter {
        match self {
            Writer::Stderr => EventWriter::Stderr(io::stderr()),
            Writer::Datagram(sink) => EventWriter::Datagram {
                sink: Arc::clone(sink),
                level,
                buf: Vec::new(),
            },
        }
    }
}

/// Writes one event: straight to stderr, or buffered and sent as one datagram when dropped
/// (the formatter writes a whole event, then drops its writer).
enum EventWriter {
    Stderr(io::Stderr),
    Datagram {
        sink: Arc<Sink>,
        level: Level,
        buf: Vec<u8>,
    },
}

impl Write for EventWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            EventWriter::Stderr(stderr) => stderr.write(data),
            EventWriter::Datagram { buf, .. } => {
                buf.extend_from_slice(data);
                Ok(data.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            EventWriter::Stderr(stderr) => stderr.flush(),
            EventWriter::Datagram { .. } => Ok(()),
        }
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let EventWriter::Datagram { sink, level, buf } = self {
            if !buf.is_empty() {
                sink.send(*level, buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(protocol: Protocol, level: Level, message: &[u8]) -> Vec<u8> {
        let dir =
            std::env::temp_dir().join(format!("plexus-log-{}-{:?}", std::process::id(), protocol));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let sink = Sink::connect(path.to_str().unwrap(), protocol).unwrap();
        sink.send(level, message);
        let mut buf = vec![0u8; 4096];
        let n = receiver.recv(&mut buf).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn syslog_datagrams_carry_facility_daemon_severity_tag_and_pid() {
        let got = receive(Protocol::Syslog, Level::WARN, b"listening name=x\n");
        let expected = format!("<28>plexus[{}]: listening name=x", std::process::id());
        assert_eq!(String::from_utf8(got).unwrap(), expected);
    }

    #[test]
    fn journald_datagrams_use_the_binary_message_field_so_newlines_survive() {
        let got = receive(Protocol::Journald, Level::ERROR, b"two\nlines\n");
        let mut expected = format!(
            "PRIORITY=3\nSYSLOG_IDENTIFIER=plexus\nSYSLOG_PID={}\nMESSAGE\n",
            std::process::id()
        )
        .into_bytes();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\n");
        assert_eq!(got, expected);
    }

    #[test]
    fn a_missing_socket_is_named_in_the_error() {
        let err = Sink::connect("/nonexistent/plexus/log.sock", Protocol::Journald).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message
                .contains("--log-target journald: cannot connect to /nonexistent/plexus/log.sock"),
            "{message}"
        );
    }
}
