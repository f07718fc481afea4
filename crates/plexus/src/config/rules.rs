//! Which keys apply where: a key set on a listener (or a section set) that its transport or
//! service never reads is a configuration error, not a silently ignored setting.
//!
//! A listener key counts as set when it differs from its default (TOML cannot tell an
//! explicit default from an absent key, and an explicit default changes nothing). The table
//! is mirrored in docs/CONFIG.md ("Where each key applies"). Rules checked elsewhere in
//! `validate`, next to the key's other checks: `upstream` (forward only), `alpn` (tls, or auto
//! on tcp), `upstreams` (forward only, not with `upstream`), chat on udp/dtls.

use super::{default_backlog, default_datagram_batch, default_mtu, default_proxy_trusted};
use super::{default_upstream_fail_timeout, Balance};
use super::{ChatConfig, Config, HttpConfig, ListenerConfig, Transport};

/// Reports every key that cannot apply.
pub(super) fn check(config: &Config, problem: &mut impl FnMut(String, String)) {
    for (index, listener) in config.listeners.iter().enumerate() {
        for (field, why) in listener_rules(listener) {
            problem(format!("listener[{index}].{field}"), why.to_owned());
        }
    }
    let uses = |wanted: &dyn Fn(&ListenerConfig) -> bool| config.listeners.iter().any(wanted);
    if let Some(tls) = &config.tls {
        if !uses(&|l| rustls(l) || l.transport == Transport::Dtls) {
            problem(
                "tls".into(),
                "no tls, dtls or auto (tcp) listener uses the [tls] table".into(),
            );
        } else {
            if !tls.psk.is_empty() && !uses(&|l| l.transport == Transport::Dtls) {
                problem(
                    "tls.psk".into(),
                    "pre-shared keys are for dtls listeners, and there is none".into(),
                );
            }
            if !tls.sni.is_empty() && !uses(&rustls) {
                problem(
                    "tls.sni".into(),
                    "SNI certificates are chosen by tls listeners (and auto on tcp), and there \
                     is none (dtls listeners use the default certificate)"
                        .into(),
                );
            }
            if (tls.ocsp.is_some() || tls.sni.iter().any(|sni| sni.ocsp.is_some()))
                && !uses(&rustls)
            {
                problem(
                    "tls.ocsp".into(),
                    "OCSP responses are stapled by tls listeners (and auto on tcp), and there is \
                     none (dtls listeners do not staple)"
                        .into(),
                );
            }
            if !tls.session_tickets && !uses(&rustls) {
                problem(
                    "tls.session_tickets".into(),
                    "session tickets are a tls-listener feature (not dtls), and there is no tls \
                     or auto (tcp) listener"
                        .into(),
                );
            }
        }
    }
    if config.http != HttpConfig::default()
        && !uses(&|l| matches!(l.service.as_str(), "http" | "auto"))
    {
        problem(
            "http".into(),
            "[http] is set but no listener has service = \"http\" or \"auto\"".into(),
        );
    }
    if config.chat != ChatConfig::default() && !uses(&|l| l.service == "chat") {
        problem(
            "chat".into(),
            "[chat] is set but no listener has service = \"chat\"".into(),
        );
    }
}

/// Whether a listener terminates TLS with rustls (and so reads SNI and ticket settings).
fn rustls(l: &ListenerConfig) -> bool {
    l.transport == Transport::Tls || (l.service == "auto" && l.transport == Transport::Tcp)
}

/// The keys of one listener that its transport and service never read, with why.
fn listener_rules(listener: &ListenerConfig) -> Vec<(&'static str, &'static str)> {
    let datagram = listener.transport.is_datagram();
    let mut found = Vec::new();
    let mut rule = |applies: bool, field, why| {
        if applies {
            found.push((field, why));
        }
    };
    rule(
        datagram && listener.proxy_protocol,
        "proxy_protocol",
        "PROXY headers precede byte streams: tcp and tls listeners only",
    );
    rule(
        !listener.proxy_protocol && listener.proxy_trusted != default_proxy_trusted(),
        "proxy_trusted",
        "only read with proxy_protocol = true",
    );
    rule(
        datagram && matches!(listener.service.as_str(), "http" | "auto"),
        "service",
        "http and auto serve byte streams: tcp and tls listeners only",
    );
    rule(
        listener.protocols.is_some() && listener.service != "auto",
        "protocols",
        "only read with service = \"auto\" (the protocol group)",
    );
    rule(
        listener.upstream_tls && listener.service != "forward",
        "upstream_tls",
        "only forward listeners originate TLS to an upstream",
    );
    rule(
        listener.upstream_proxy_protocol.is_some() && listener.service != "forward",
        "upstream_proxy_protocol",
        "only forward listeners send a PROXY header to an upstream",
    );
    rule(
        datagram && listener.upstream_proxy_protocol.is_some(),
        "upstream_proxy_protocol",
        "a PROXY header precedes a byte stream: a udp/dtls forward sends datagrams",
    );
    rule(
        listener.balance != Balance::default() && listener.upstreams.is_empty(),
        "balance",
        "only read with upstreams = [...] (several upstreams to balance)",
    );
    rule(
        listener.upstream_fail_timeout != default_upstream_fail_timeout()
            && listener.upstreams.is_empty(),
        "upstream_fail_timeout",
        "only read with upstreams = [...] (the health check skips one of several)",
    );
    rule(
        listener.upstream_ca.is_some() && !listener.upstream_tls,
        "upstream_ca",
        "only read with upstream_tls = true",
    );
    rule(
        listener.upstream_sni.is_some() && !listener.upstream_tls,
        "upstream_sni",
        "only read with upstream_tls = true",
    );
    rule(
        !(listener.splice
            || (listener.service == "forward" && listener.transport == Transport::Tcp)),
        "splice",
        "only forward listeners on tcp relay with splice(2)",
    );
    rule(
        datagram && listener.backlog != default_backlog(),
        "backlog",
        "udp and dtls sockets do not listen (no backlog)",
    );
    let tcp_only = "a TCP socket option: udp and dtls listeners have no TCP connection";
    rule(datagram && !listener.tcp_nodelay, "tcp_nodelay", tcp_only);
    rule(
        datagram && listener.keepalive.is_some(),
        "keepalive",
        tcp_only,
    );
    rule(datagram && listener.linger.is_some(), "linger", tcp_only);
    rule(
        listener.transport != Transport::Dtls && listener.mtu != default_mtu(),
        "mtu",
        "only dtls listeners size their records (mtu)",
    );
    rule(
        !datagram && listener.datagram_batch != default_datagram_batch(),
        "datagram_batch",
        "only udp and dtls listeners batch datagrams",
    );
    rule(
        !datagram && !listener.udp_offload,
        "udp_offload",
        "only udp and dtls listeners use the UDP offloads (GSO/GRO)",
    );
    found
}
