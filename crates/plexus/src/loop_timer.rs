//! The entries of an event loop's timer wheel: which session a timer belongs to, which session
//! it was when armed (keys are reused), and why it was armed. Below both the stream loop
//! (`event_loop`) and its datagram part (`datagram`), which share one wheel per loop.

use crate::session_id::SessionId;

/// Timer payload: which session, which session it was when armed (keys are reused), and why.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimerEntry {
    pub(crate) key: usize,
    pub(crate) id: SessionId,
    pub(crate) kind: TimerKind,
}

/// Why a timer was armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// A udp/dtls session's timer (key is a datagram-session key).
    Datagram(DatagramTimer),
    /// Check `last_activity` against the idle limit.
    Idle,
    /// The TLS handshake must be done by now.
    Handshake,
    /// An upstream session's connect attempt must have succeeded by now.
    Connect,
    /// The deadline a service set with `Session::set_timer`.
    Handler,
    /// A `proxy_protocol` session's PROXY header must have arrived by now.
    ProxyHeader,
}

/// The timers of a udp/dtls session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DatagramTimer {
    /// Check the session's last activity against `idle_timeout`.
    Idle,
    /// The DTLS handshake must be done by now.
    Handshake,
    /// OpenSSL's DTLS retransmission timer.
    Retransmit,
    /// The handler's deadline ([`crate::Session::set_timer`]).
    Handler,
    /// A DTLS upstream's (the key is its slot among the upstream sockets) retransmission timer.
    UpstreamRetransmit,
    /// A DTLS upstream's handshake must be done by now.
    UpstreamHandshake,
}
