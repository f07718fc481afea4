//! The services plexus ships: `echo`, `chat`, `http`, and the `auto` protocol group.

mod auto;
mod chat;
mod echo;
mod http;

pub(crate) use auto::Auto;
pub use chat::Chat;
pub use echo::Echo;
pub use http::Http;
