//! Reload on SIGHUP: what a new configuration changes compared with the running one, which of
//! those changes apply live, and which need a restart (reported, never silently ignored).
//!
//! Live: certificates and the `[tls]` files, the global and per-listener ACLs, connection and
//! handshake caps, timeouts and outbound limits (for new sessions; idle timeout and watermarks
//! from the next check), `shutdown_grace`, a listener's socket options, ALPN and upstream, and
//! listeners added or removed. Needs a restart: the number of event loops and workers, the
//! worker queue, TLS session tickets, `[chat]` and `[http]` (read when the services are built),
//! and a listener's transport, address, service, backlog, `reuse_port` and `proxy_protocol`
//! under the same name (to move a listener live, rename it: the old one is removed, the new one
//! bound).
//!
//! [`plan`] is pure (two configurations in, a plan out); the acceptor applies it.

use crate::config::{Config, ConfigError, ListenerConfig, ValidConfig, ValidListener};
use crate::registry::ServiceRegistry;

/// Produces the configuration to reload (the CLI re-reads its `--config` file).
pub(crate) type ReloadSource = Box<dyn FnMut() -> Result<Config, ConfigError> + Send>;

/// What the acceptor needs to reload: where the configuration comes from, the services to
/// validate it against, and the configuration in effect.
pub(crate) struct Reloader {
    pub(crate) source: ReloadSource,
    pub(crate) source_name: String,
    pub(crate) services: ServiceRegistry,
    /// What is in effect: the last configuration applied, with the restart-only settings it
    /// could not change kept at their running values.
    pub(crate) running: ValidConfig,
}

impl Reloader {
    /// Reads and validates the new configuration.
    pub(crate) fn load(&mut self) -> Result<ValidConfig, ConfigError> {
        let config = (self.source)()?;
        config.validate(&self.source_name, &self.services.names())
    }
}

/// The changes between two configurations.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReloadPlan {
    /// Keys whose new value cannot take effect without a restart.
    pub(crate) restart: Vec<String>,
    /// Names of listeners to close.
    pub(crate) removed: Vec<String>,
    /// Indexes (into the new configuration's listeners) of listeners to bind.
    pub(crate) added: Vec<usize>,
    /// Indexes (into the new configuration's listeners) of listeners that stay; their live
    /// settings are updated.
    pub(crate) kept: Vec<usize>,
}

/// Compares the running configuration with a new one.
pub(crate) fn plan(running: &ValidConfig, new: &ValidConfig) -> ReloadPlan {
    let (old, next) = (&running.config, &new.config);
    let mut plan = ReloadPlan::default();
    let mut restart = |changed: bool, key: String| {
        if changed {
            plan.restart.push(key);
        }
    };
    restart(
        old.server.event_loops != next.server.event_loops,
        "server.event_loops".into(),
    );
    restart(
        old.server.backend != next.server.backend,
        "server.backend".into(),
    );
    restart(
        old.server.workers != next.server.workers,
        "server.workers".into(),
    );
    restart(
        old.server.worker_queue != next.server.worker_queue,
        "server.worker_queue".into(),
    );
    // datagram: the datagram-session caps are built once, with the loops' sockets.
    restart(
        old.server.max_datagram_sessions != next.server.max_datagram_sessions,
        "server.max_datagram_sessions".into(),
    );
    restart(
        old.server.max_datagram_sessions_per_ip != next.server.max_datagram_sessions_per_ip,
        "server.max_datagram_sessions_per_ip".into(),
    );
    let tickets = |config: &Config| config.tls.as_ref().is_none_or(|tls| tls.session_tickets);
    restart(tickets(old) != tickets(next), "tls.session_tickets".into());
    restart(old.chat != next.chat, "chat".into());
    restart(old.http != next.http, "http".into());

    for (index, listener) in new.listeners.iter().enumerate() {
        match running
            .listeners
            .iter()
            .find(|l| l.config.name == listener.config.name)
        {
            // datagram: udp/dtls sockets belong to the loops; any change to them needs a restart.
            Some(current)
                if current.config.transport.is_datagram() && current.config != listener.config =>
            {
                plan.restart
                    .push(format!("listener[{index}] ({})", listener.config.name));
                plan.kept.push(index);
            }
            None if listener.config.transport.is_datagram() => plan.restart.push(format!(
                "listener[{index}] ({}): a new udp/dtls listener",
                listener.config.name
            )),
            Some(current) => {
                for field in fixed_fields_changed(&current.config, &listener.config) {
                    plan.restart.push(format!(
                        "listener[{index}].{field} ({})",
                        listener.config.name
                    ));
                }
                plan.kept.push(index);
            }
            None => plan.added.push(index),
        }
    }
    for gone in running
        .listeners
        .iter()
        .filter(|l| !new.listeners.iter().any(|n| n.config.name == l.config.name))
    {
        match gone.config.transport.is_datagram() {
            true => plan
                .restart
                .push(format!("removing udp/dtls listener '{}'", gone.config.name)),
            false => plan.removed.push(gone.config.name.clone()),
        }
    }
    plan
}

/// Settings of a listener that are fixed once its socket is bound and its sessions run.
fn fixed_fields_changed(old: &ListenerConfig, new: &ListenerConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.transport != new.transport {
        changed.push("transport");
    }
    if old.addr != new.addr {
        changed.push("addr");
    }
    if old.service != new.service {
        changed.push("service");
    }
    if old.backlog != new.backlog {
        changed.push("backlog");
    }
    if old.reuse_port != new.reuse_port {
        changed.push("reuse_port");
    }
    if old.proxy_protocol != new.proxy_protocol {
        changed.push("proxy_protocol");
    }
    // An `auto` group holds its TLS configuration (with the ALPN list) from when it was built.
    if new.service == "auto" && old.alpn != new.alpn {
        changed.push("alpn");
    }
    changed
}

/// The configuration in effect after applying `new` with `plan`: `new`, except that settings
/// needing a restart keep their running values and listeners that could not be bound
/// (`not_bound`, by name) are left out — so the next reload reports or retries them again.
pub(crate) fn in_effect(
    running: &ValidConfig,
    new: &ValidConfig,
    not_bound: &[String],
) -> ValidConfig {
    let mut effect = new.clone();
    let (old, config) = (&running.config, &mut effect.config);
    config.server.event_loops = old.server.event_loops;
    config.server.workers = old.server.workers;
    config.server.backend = old.server.backend;
    config.server.worker_queue = old.server.worker_queue;
    let old_tickets = old.tls.as_ref().is_none_or(|tls| tls.session_tickets);
    if let Some(tls) = config.tls.as_mut() {
        tls.session_tickets = old_tickets;
    }
    config.chat = old.chat.clone();
    config.http = old.http.clone();
    effect
        .listeners
        .retain(|l| !not_bound.contains(&l.config.name));
    for listener in &mut effect.listeners {
        if let Some(current) = running
            .listeners
            .iter()
            .find(|l| l.config.name == listener.config.name)
        {
            keep_fixed_fields(current, listener);
        }
    }
    config.listeners = effect.listeners.iter().map(|l| l.config.clone()).collect();
    effect
}

fn keep_fixed_fields(current: &ValidListener, listener: &mut ValidListener) {
    let (old, new) = (&current.config, &mut listener.config);
    new.transport = old.transport;
    new.addr = old.addr.clone();
    new.service = old.service.clone();
    new.backlog = old.backlog;
    new.reuse_port = old.reuse_port;
    new.proxy_protocol = old.proxy_protocol;
    if new.service == "auto" {
        new.alpn = old.alpn.clone();
    }
    listener.addr = current.addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(text: &str) -> ValidConfig {
        Config::parse(text, "test")
            .unwrap()
            .validate("test", &["echo", "chat"])
            .unwrap()
    }

    const BASE: &str = r#"
[server]
event_loops = 2
max_connections = 100

[[listener]]
name = "a"
transport = "tcp"
addr = "127.0.0.1:7001"
service = "echo"

[[listener]]
name = "b"
transport = "tcp"
addr = "127.0.0.1:7002"
service = "echo"
"#;

    #[test]
    fn udp_and_dtls_listener_changes_need_a_restart_and_are_never_added_or_removed_live() {
        let running = BASE.replace(
            "transport = \"tcp\"\naddr = \"127.0.0.1:7002\"",
            "transport = \"udp\"\naddr = \"127.0.0.1:7002\"",
        );
        let changed = format!(
            "{}[listener.acl]\ndeny = [\"127.0.0.9\"]\n\n[[listener]]\nname = \"d\"\ntransport = \"dtls\"\naddr = \"127.0.0.1:7444\"\nservice = \"echo\"\n",
            running
        );
        let edited = plan(&valid(&running), &valid(&changed));
        assert!(edited.added.is_empty(), "{edited:?}");
        assert_eq!(edited.restart.len(), 2, "{:?}", edited.restart);
        assert!(edited.restart[0].contains("(b)"), "{:?}", edited.restart);
        assert!(
            edited.restart[1].contains("new udp/dtls listener"),
            "{:?}",
            edited.restart
        );
        let without_udp = running.replace("name = \"b\"", "name = \"c\"");
        let removed = plan(&valid(&running), &valid(&without_udp));
        assert!(
            removed.removed.is_empty(),
            "the udp socket is not the acceptor's to close"
        );
        assert!(removed
            .restart
            .iter()
            .any(|key| key.contains("removing udp/dtls listener 'b'")));
    }

    #[test]
    fn identical_configurations_change_nothing_but_keep_every_listener() {
        let plan = plan(&valid(BASE), &valid(BASE));
        assert_eq!(
            plan,
            ReloadPlan {
                kept: vec![0, 1],
                ..ReloadPlan::default()
            }
        );
    }

    #[test]
    fn listeners_are_added_and_removed_by_name_and_live_settings_need_no_restart() {
        let new = BASE
            .replace(
                "max_connections = 100",
                "max_connections = 5\nidle_timeout = \"3s\"",
            )
            .replace("name = \"b\"", "name = \"c\"");
        let plan = plan(&valid(BASE), &valid(&new));
        assert_eq!(plan.removed, vec!["b".to_owned()]);
        assert_eq!(plan.added, vec![1]);
        assert_eq!(plan.kept, vec![0]);
        assert!(plan.restart.is_empty(), "{:?}", plan.restart);
    }

    #[test]
    fn fixed_settings_are_reported_by_key_and_kept_in_effect() {
        let new = BASE
            .replace("event_loops = 2", "event_loops = 3\nworkers = 7")
            .replace("127.0.0.1:7001", "127.0.0.1:7011")
            .replace(
                "addr = \"127.0.0.1:7002\"\nservice = \"echo\"",
                "addr = \"127.0.0.1:7002\"\nservice = \"chat\"",
            );
        let (running, new) = (valid(BASE), valid(&new));
        let plan = plan(&running, &new);
        assert_eq!(
            plan.restart,
            vec![
                "server.event_loops".to_owned(),
                "server.workers".to_owned(),
                "listener[0].addr (a)".to_owned(),
                "listener[1].service (b)".to_owned(),
            ]
        );
        let effect = in_effect(&running, &new, &[]);
        assert_eq!(effect.config.server.event_loops, 2);
        assert_eq!(effect.listeners[0].addr.port(), 7001);
        assert_eq!(effect.listeners[1].config.service, "echo");
        // Still different next time: reported again.
        assert_eq!(super::plan(&effect, &new).restart.len(), 4);
    }

    #[test]
    fn a_listener_that_could_not_be_bound_is_added_again_next_time() {
        let new = BASE.replace("name = \"b\"", "name = \"c\"");
        let (running, new) = (valid(BASE), valid(&new));
        let effect = in_effect(&running, &new, &["c".to_owned()]);
        assert_eq!(effect.listeners.len(), 1);
        assert_eq!(super::plan(&effect, &new).added, vec![1]);
    }
}
