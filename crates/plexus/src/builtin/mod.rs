//! The services plexus ships: `echo` and `chat`.

mod chat;
mod echo;

pub use chat::Chat;
pub use echo::Echo;
