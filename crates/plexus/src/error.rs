//! Why a server could not be built or run: the library's [`Error`] and its causes.

use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::dtls::DtlsError;
use crate::tls::TlsError;

/// Why a server could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A [`ServiceFactory`](crate::ServiceFactory) could not build a listener's service.
    #[error("listener '{listener}': cannot build its service: {source}")]
    Service {
        /// The listener's name.
        listener: String,
        /// What the factory said.
        source: crate::registry::BoxError,
    },
    /// A listener could not be bound.
    #[error("listener '{listener}': cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        listener: String,
        /// The address it was to bind.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// TLS certificates could not be loaded or generated.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The DTLS (OpenSSL) context could not be built.
    #[error("{0}")]
    Dtls(#[from] DtlsError),
    /// An inherited descriptor (systemd socket activation, or a binary upgrade) could not be
    /// used.
    #[error("socket activation: {0}")]
    Inherited(#[from] InheritedError),
    /// The [`ServerBuilder::after_bind`](crate::ServerBuilder::after_bind) hook failed (e.g. privileges could not be dropped).
    #[error("{0}")]
    AfterBind(Box<dyn std::error::Error + Send + Sync>),
    /// Event loops died while the server ran (a panic, or an error from the poll instance):
    /// their sessions were lost and the server stopped.
    #[error("{dead} event loop(s) died (see the log); the server stopped")]
    LoopDied {
        /// How many loops died.
        dead: usize,
    },
    /// A runtime resource (poll instance, thread) could not be created.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being created.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
}

/// Why the descriptors passed by a service manager (or an upgrading process) cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InheritedError {
    /// `LISTEN_FDS` / `LISTEN_PID` / `LISTEN_FDNAMES` could not be read.
    #[error("{0}")]
    Environment(io::Error),
    /// A passed descriptor is not what a listener can adopt.
    #[error("descriptor {fd} for listener '{listener}' {problem}")]
    Descriptor {
        /// The descriptor number.
        fd: usize,
        /// The listener it was meant for.
        listener: String,
        /// What is wrong with it.
        problem: DescriptorProblem,
    },
}

/// What is wrong with a passed descriptor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorProblem {
    /// It is a socket, but not a stream socket.
    #[error("is not a stream socket")]
    NotStream,
    /// It is not a socket at all.
    #[error("is not a socket: {0}")]
    NotASocket(io::Error),
    /// It is not bound to an IPv4/IPv6 address.
    #[error("is not an IPv4/IPv6 socket")]
    NotInet,
    /// It is not listening.
    #[error("is not listening")]
    NotListening,
    /// Whether it listens cannot be told.
    #[error("cannot be inspected: {0}")]
    Uninspectable(io::Error),
}

impl Error {
    pub(crate) fn runtime(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Runtime { what, source }
    }
}
