//! The services plexus ships — `echo`, `chat`, `http`, `forward` and the `auto` protocol group — written
//! against plexus' public API only, as any application's services are (this crate cannot
//! reach anything else: it is a separate crate).
//!
//! [`register`] adds all of them to a [`ServerBuilder`], configured from the builder's
//! configuration (`[chat]`, `[http]`, each listener's `upstream`); that is what `plexus serve`
//! runs.
//!
//! ```no_run
//! let config = plexus::Config::parse(r#"
//!     [[listener]]
//!     name = "web"
//!     transport = "tcp"
//!     addr = "127.0.0.1:0"
//!     service = "auto"
//! "#, "inline").unwrap();
//! let server = plexus_services::register(plexus::Server::builder(config)).build().unwrap();
//! server.run().unwrap();
//! ```

use std::sync::Arc;

use plexus::ServerBuilder;

mod auto;
mod chat;
mod echo;
mod forward;
mod http;

pub use auto::{Auto, AutoFactory};
pub use chat::Chat;
pub use echo::Echo;
pub use forward::{Forward, ForwardFactory, Pool, SPLICE_AFTER_READ};
pub use http::Http;

/// Registers `echo`, `chat`, `http`, `forward` and `auto` on `builder`, configured from its
/// configuration. A name the builder already has is kept (an application's own service of
/// that name wins).
pub fn register(builder: ServerBuilder) -> ServerBuilder {
    let config = builder.config();
    let chat = Chat::new(config.chat.max_line_bytes);
    let http = Arc::new(Http::new(&config.http));
    let mut builder = builder;
    if http.has_access_log() {
        // SIGUSR1 (logrotate): the access log's writer reopens its file.
        let reopen = Arc::clone(&http);
        builder = builder.on_reopen(Arc::new(move || reopen.reopen_logs()));
    }
    if !builder.has_service("echo") {
        builder = builder.service("echo", Echo);
    }
    if !builder.has_service("chat") {
        builder = builder.service("chat", chat);
    }
    if !builder.has_service("http") {
        builder = builder.shared_service("http", Arc::clone(&http) as _);
    }
    if !builder.has_service("forward") {
        builder = builder.service_factory("forward", ForwardFactory);
    }
    if !builder.has_service("auto") {
        builder = builder.service_factory("auto", AutoFactory::new(http));
    }
    builder
}
