//! `auto`: the protocol group of plexus' built-in services — a preset of
//! [`plexus::ProtocolGroup`] built per listener from its `protocols` key.
//!
//! The preset (no `protocols` key) is `["tls", "http", "echo"]`: a TLS ClientHello turns the
//! session into a TLS session (the bytes already read become the first ciphertext) and the
//! group runs again on the decrypted stream without TLS; an HTTP/1.x request line (or the
//! HTTP/2 prior-knowledge preface, which `http` serves as HTTP/2) goes to the `http` service;
//! anything else — or nothing decisive within the budgets (the group's byte budget, and the
//! server's `handshake_timeout`) — is echoed. On a tls listener the preset is
//! `["http", "echo"]`. A PROXY header, when the listener accepts one, is consumed by the
//! event loop before any of this runs (the group sees the real client address).

use std::sync::Arc;

use plexus::config::ListenerConfig;
use plexus::protocol_group::{Http1Request, Http2Preface};
use plexus::{BoxError, ListenerContext, ProtocolGroup, Service, ServiceFactory};

use crate::http::Http;
use crate::Echo;

/// The `auto` protocol group of one listener.
pub type Auto = ProtocolGroup;

/// Builds the `auto` group of each listener naming it from the listener's `protocols` (or the
/// preset): TLS is detected on plain tcp listeners (with the listener's TLS configuration),
/// HTTP goes to the shared `http` service, the fallback is the shared service named last, and
/// the time budget is the server's `handshake_timeout`.
pub struct AutoFactory {
    http: Arc<Http>,
}

impl AutoFactory {
    /// A factory whose groups hand HTTP sessions to `http` (unless the server's shared
    /// `http` service is another one).
    pub fn new(http: Arc<Http>) -> AutoFactory {
        AutoFactory { http }
    }

    /// The shared service `name` of the listener's server, or the built-in of that name.
    fn service(&self, listener: &ListenerContext<'_>, name: &str) -> Option<Arc<dyn Service>> {
        listener.service(name).or_else(|| match name {
            "http" => Some(Arc::clone(&self.http) as _),
            "echo" => Some(Arc::new(Echo)),
            _ => None,
        })
    }
}

impl ServiceFactory for AutoFactory {
    /// Whether the listener's group has a TLS member (`"tls"` in its `protocols`, as in the
    /// preset of tcp listeners): only then does the server need certificates for it.
    fn uses_tls(&self, listener: &ListenerConfig) -> bool {
        listener.protocols().contains(&"tls")
    }

    fn build(&self, listener: &ListenerContext<'_>) -> Result<Arc<dyn Service>, BoxError> {
        let protocols = listener.config().protocols();
        let Some((fallback, members)) = protocols.split_last() else {
            return Err("protocols lists no fallback service".into());
        };
        let mut group = ProtocolGroup::builder().time_budget(listener.handshake_timeout());
        for &member in members {
            match member {
                // Configuration validation allows "tls" on tcp listeners only, which get the
                // TLS configuration (`uses_tls`).
                "tls" => {
                    if let Some(tls) = listener.tls() {
                        group = group.tls(Arc::clone(tls));
                    }
                }
                "http" => {
                    let http = self
                        .service(listener, "http")
                        .ok_or("no shared service named \"http\"")?;
                    group = group
                        .member("http", Http1Request, Arc::clone(&http))
                        .member("http/2 preface", Http2Preface, http);
                }
                other => return Err(format!("'{other}' is not a protocol plexus detects").into()),
            }
        }
        let fallback = self
            .service(listener, fallback)
            .ok_or_else(|| format!("no shared service named {fallback:?} for the fallback"))?;
        Ok(Arc::new(group.fallback(fallback).build()))
    }
}

#[cfg(test)]
mod tests {
    use plexus::Config;

    use super::*;

    #[test]
    fn only_a_group_with_a_tls_member_asks_for_the_tls_configuration() {
        let text = r#"
[[listener]]
name = "preset"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"

[[listener]]
name = "explicit"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
protocols = ["http", "tls", "echo"]

[[listener]]
name = "plain"
transport = "tcp"
addr = "127.0.0.1:0"
service = "auto"
protocols = ["http", "echo"]

[[listener]]
name = "decrypted"
transport = "tls"
addr = "127.0.0.1:0"
service = "auto"
"#;
        let config = Config::parse(text, "test").unwrap();
        let factory = AutoFactory::new(Arc::new(Http::new(&config.http)));
        let answers: Vec<(&str, bool)> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), factory.uses_tls(l)))
            .collect();
        assert_eq!(
            answers,
            [
                ("preset", true),
                ("explicit", true),
                ("plain", false),
                // A tls listener's preset has no TLS member: its sessions arrive decrypted.
                ("decrypted", false),
            ]
        );
    }
}
