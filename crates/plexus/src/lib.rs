//! plexus: an event-driven network server framework.
//!
//! A [`Server`] binds the listeners of a [`Config`], admits connections on an acceptor thread
//! (ACL, connection caps, descriptor exhaustion), and hands each to one of N event loops
//! (mio, one thread each) that owns it until it closes. Each listener names a [`Service`]
//! registered on the builder: your own, or the built-in ones of the `plexus-services` crate
//! (`echo`, `chat`, `http`, the `auto` protocol group), which use nothing but this API.
//!
//! With the `testing` cargo feature, `plexus::testing` drives a service's session in memory
//! with a fake clock, for the service's own unit tests.
//!
//! ```no_run
//! use plexus::{Config, Server, Service, Session, SessionHandler};
//!
//! struct Upper;
//! struct UpperSession;
//! impl Service for Upper {
//!     fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
//!         Box::new(UpperSession)
//!     }
//! }
//! impl SessionHandler for UpperSession {
//!     fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
//!         session.send(&data.to_ascii_uppercase());
//!     }
//! }
//!
//! let config = Config::parse(r#"
//!     [[listener]]
//!     name = "upper"
//!     transport = "tcp"
//!     addr = "127.0.0.1:0"
//!     service = "upper"
//! "#, "inline").unwrap();
//! let server = Server::builder(config).service("upper", Upper).build().unwrap();
//! println!("upper on {}", server.local_addr("upper").unwrap());
//! server.run().unwrap();
//! ```
//!
//! No panics from input: the runtime handles what peers and config files send, so indexing,
//! unchecked arithmetic and unwrap/expect are denied in every module outside tests, as in
//! `plexus-proto`; where an invariant makes one safe, a narrowly scoped `allow` says why.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

mod accept;
mod acceptor;
mod admission;
mod breakdown;
mod broadcast;
pub mod client;
pub mod config;
mod connection;
pub mod connector;
mod datagram;
mod datagram_admission;
mod dtls;
mod error;
mod event_loop;
pub mod framing;
mod idle_order;
mod listen;
mod log_throttle;
mod loop_local;
mod loop_timer;
mod metrics;
mod outbound;
pub mod prometheus;
pub mod protocol_group;
mod refusal;
mod registry;
mod reload;
mod server;
mod service;
mod session;
mod session_id;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
pub mod tls_client;
pub mod upgrade;
mod worker;

pub use admission::RefusalReason;
pub use breakdown::{ListenerSnapshot, LoopSnapshot, ProtocolGroupSnapshot, ReloadOutcome};
pub use client::{ClientError, ClientHandle, ClientRuntime, ClientRuntimeBuilder, Connection};
pub use config::{Config, ConfigError};
pub use connector::{Retry, Upstream, UpstreamError, UpstreamSnapshot};
pub use dtls::{DtlsClientConfig, DtlsError};
pub use error::Error;
pub use log_throttle::LogThrottle;
pub use loop_local::LoopLocal;
pub use metrics::{MetricsSnapshot, ServerStatus};
pub use protocol_group::{Detection, Detector, ProtocolGroup, ProtocolGroupBuilder};
pub use registry::{BoxError, ListenerContext, ReopenHook, ServiceFactory};
pub use server::{Server, ServerBuilder, ServerHandle};
pub use service::{
    CloseReason, LinkEvent, Service, Session, SessionHandler, SessionId, SessionInfo,
    WRITE_THROUGH_MIN,
};
pub use tls::TlsError;
pub use upgrade::{Handover, UpgradeOptions};
pub use worker::Reply;

#[cfg(test)]
mod layering;
