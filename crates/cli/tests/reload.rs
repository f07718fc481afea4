//! SIGHUP reloads the whole configuration file: listeners are added and removed live (sessions
//! of a removed listener continue), caps, ACLs and timeouts apply to new connections, settings
//! that cannot change live are reported as `not applied: <key>: needs a restart`, and a broken
//! file is reported while the running configuration stays.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

const LOG_WAIT: Duration = Duration::from_secs(10);
const PROBE_WAIT: Duration = Duration::from_secs(3);

fn listener(name: &str, addr: &str) -> String {
    format!(
        r#"
[[listener]]
name = "{name}"
transport = "tcp"
addr = "{addr}"
service = "echo"
"#
    )
}

fn server_table(extra: &str) -> String {
    format!("[server]\nevent_loops = 2\n{extra}\n")
}

/// Rewrites the config, sends SIGHUP and waits for the reload to be logged as done or failed.
fn reload(server: &Server, config: &str) -> usize {
    let mark = server.log_mark();
    std::fs::write(server.config_path(), config).expect("rewrite config");
    server.signal("HUP");
    server.assert_log(mark, LOG_WAIT, "ending the reload", |l| {
        l.contains("reload done") || l.contains("reload failed")
    });
    mark
}

#[test]
fn listeners_are_added_and_removed_live_and_sessions_of_a_removed_one_continue() {
    let start = server_table("") + &listener("first", "127.0.0.1:0");
    let server = Server::start(&start);
    let first = server.addr("first");
    let mut old_session = connect(first);
    assert_echo(&mut old_session, b"before reload\n");

    let mark = reload(
        &server,
        &(server_table("") + &listener("second", "127.0.0.1:0")),
    );
    let added = server.assert_log(mark, LOG_WAIT, "listening on the added listener", |l| {
        l.contains("listening name=second") && l.contains("added by reload")
    });
    let (_, second) = parse_listening(&added).expect("listening line");
    server.assert_log(mark, LOG_WAIT, "removing the old listener", |l| {
        l.contains("listener 'first' removed")
    });

    let mut new_session = connect(second);
    assert_echo(&mut new_session, b"on the added listener\n");
    assert!(
        probe(first, None, b"x", PROBE_WAIT).refused(),
        "the removed listener no longer accepts"
    );
    assert_echo(
        &mut old_session,
        b"old session after its listener was removed\n",
    );
}

/// Listener indexes are positions in the configuration, datagram listeners included: a tcp
/// listener added next to a udp one that comes first must not take the index (and the loops'
/// registration) of the tcp listener after it.
#[test]
fn a_listener_added_after_a_datagram_one_serves_next_to_the_listeners_it_joins() {
    let udp = "\n[[listener]]\nname = \"dgram\"\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n";
    let start = server_table("") + udp + &listener("first", "127.0.0.1:0");
    let server = Server::start(&start);
    let first = server.addr("first");
    let mark = reload(
        &server,
        &(start.clone() + &listener("second", "127.0.0.1:0")),
    );
    let added = server.assert_log(mark, LOG_WAIT, "listening on the added listener", |l| {
        l.contains("listening name=second") && l.contains("added by reload")
    });
    let (_, second) = parse_listening(&added).expect("listening line");
    for round in 0..4 {
        let mut on_first = connect(first);
        assert_echo(&mut on_first, format!("first {round}\n").as_bytes());
        let mut on_second = connect(second);
        assert_echo(&mut on_second, format!("second {round}\n").as_bytes());
    }
}

#[test]
fn max_connections_lowered_by_reload_refuses_new_connections_and_keeps_open_ones() {
    let config = |max: usize| {
        server_table(&format!("max_connections = {max}")) + &listener("tcp-echo", "127.0.0.1:0")
    };
    let server = Server::start(&config(100));
    let addr = server.addr("tcp-echo");
    let mut a = connect(addr);
    let mut b = connect(addr);
    assert_echo(&mut a, b"a\n");
    assert_echo(&mut b, b"b\n");

    let mark = reload(&server, &config(2));
    assert!(server
        .stderr_lines()
        .iter()
        .skip(mark)
        .all(|l| !l.contains("needs a restart")));
    assert!(
        probe(addr, None, b"third\n", PROBE_WAIT).refused(),
        "a third connection is refused at max_connections = 2"
    );
    assert_echo(&mut a, b"a still served\n");
    drop(b);
    // b's place is given back once its loop sees the close.
    let c = wait_until_served(addr, Duration::from_secs(10), "after a place was freed");
    drop(c);

    reload(&server, &config(100));
    let _d = connect(addr);
    let mut e = wait_until_served(addr, Duration::from_secs(10), "after raising the cap");
    assert_echo(&mut e, b"cap raised\n");
}

#[test]
fn global_and_listener_acls_change_live() {
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let base = server_table("") + &listener("tcp-echo", "0.0.0.0:0");
    let server = Server::start(&base);
    let port = server.addr("tcp-echo").port();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(probe(target, Some(other), b"x", PROBE_WAIT), Probe::Echoed);

    let deny_global = format!("[acl]\ndeny = [\"127.0.0.2/32\"]\n\n{base}");
    reload(&server, &deny_global);
    assert!(probe(target, Some(other), b"x", PROBE_WAIT).refused());
    assert_eq!(probe(target, Some(local), b"x", PROBE_WAIT), Probe::Echoed);

    let deny_listener = format!("{base}\n[listener.acl]\ndeny = [\"127.0.0.1/32\"]\n");
    reload(&server, &deny_listener);
    assert_eq!(probe(target, Some(other), b"x", PROBE_WAIT), Probe::Echoed);
    assert!(probe(target, Some(local), b"x", PROBE_WAIT).refused());
}

#[test]
fn idle_timeout_from_a_reload_closes_new_idle_sessions() {
    let config = |idle: &str| {
        format!("[server]\nevent_loops = 1\nidle_timeout = \"{idle}\"\n")
            + &listener("tcp-echo", "127.0.0.1:0")
    };
    let server = Server::start(&config("60s"));
    let addr = server.addr("tcp-echo");
    reload(&server, &config("1s"));
    let mut session = connect(addr);
    assert_echo(&mut session, b"then idle\n");
    // Sending nothing more: the server closes after the reloaded 1 s (not 60 s).
    let closed = drain_until_closed(&mut session, Duration::from_secs(8));
    assert_eq!(closed, Ok(0), "closed idle session, nothing more sent");
}

#[test]
fn settings_that_need_a_restart_are_reported_by_key_and_the_rest_applies() {
    let server = Server::start(&(server_table("") + &listener("tcp-echo", "127.0.0.1:0")));
    let addr = server.addr("tcp-echo");
    let changed = "[server]\nevent_loops = 3\nworkers = 5\n".to_owned()
        + &listener("tcp-echo", "127.0.0.1:1")
        + &listener("extra", "127.0.0.1:0");
    let mark = reload(&server, &changed);
    for key in [
        "server.event_loops",
        "server.workers",
        "listener[0].addr (tcp-echo)",
    ] {
        server.assert_log(mark, LOG_WAIT, &format!("reporting {key}"), |l| {
            l.contains(&format!("not applied: {key}: needs a restart"))
        });
    }
    server.assert_log(mark, LOG_WAIT, "adding the new listener", |l| {
        l.contains("listening name=extra")
    });
    let mut stream = connect(addr);
    assert_echo(&mut stream, b"still on the old address\n");

    // Still pending: reported again on the next reload.
    let mark = reload(&server, &changed);
    server.assert_log(mark, LOG_WAIT, "reporting event_loops again", |l| {
        l.contains("not applied: server.event_loops: needs a restart")
    });
}

#[test]
fn a_broken_file_is_reported_and_the_running_configuration_stays() {
    let base = server_table("") + &listener("tcp-echo", "127.0.0.1:0");
    let mut server = Server::start(&base);
    let addr = server.addr("tcp-echo");
    let mark = reload(&server, "[server]\nmax_connections = \"many\"\n");
    server.assert_log(mark, LOG_WAIT, "naming the file and key", |l| {
        l.contains("reload failed")
            && l.contains("keeping the running configuration")
            && l.contains("max_connections")
    });
    let mark = reload(
        &server,
        &(base.clone() + &listener("clash", "127.0.0.1:0").replace("\"clash\"", "\"tcp-echo\"")),
    );
    server.assert_log(mark, LOG_WAIT, "reporting the duplicate", |l| {
        l.contains("reload failed") && l.contains("duplicate listener name")
    });
    server.assert_running("after broken reloads");
    let mut stream = connect(addr);
    assert_echo(&mut stream, b"still serving\n");
}

#[test]
fn a_listener_that_cannot_be_bound_is_reported_and_the_rest_applies() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let base = server_table("") + &listener("tcp-echo", "127.0.0.1:0");
    let server = Server::start(&base);
    let mark = reload(
        &server,
        &(base.clone() + &listener("busy", &taken_addr) + &listener("free", "127.0.0.1:0")),
    );
    server.assert_log(mark, LOG_WAIT, "reporting the busy listener", |l| {
        l.contains("listener 'busy' not added") && l.contains(&taken_addr)
    });
    let added = server.assert_log(mark, LOG_WAIT, "adding the free listener", |l| {
        l.contains("listening name=free")
    });
    let (_, free) = parse_listening(&added).unwrap();
    let mut stream = connect(free);
    assert_echo(&mut stream, b"the free one was added\n");

    // Once the port is free, the next reload binds it.
    drop(taken);
    let mark = reload(
        &server,
        &(base + &listener("busy", &taken_addr) + &listener("free", "127.0.0.1:0")),
    );
    server.assert_log(mark, LOG_WAIT, "adding the busy listener now", |l| {
        l.contains("listening name=busy")
    });
}

#[test]
fn a_tls_listener_added_by_reload_serves_with_a_fresh_tls_context() {
    let base = server_table("") + &listener("tcp-echo", "127.0.0.1:0");
    let server = Server::start(&base);
    let tls_listener = listener("tls-echo", "127.0.0.1:0").replace("\"tcp\"", "\"tls\"");
    let mark = reload(&server, &(base + &tls_listener));
    let added = server.assert_log(mark, LOG_WAIT, "adding the tls listener", |l| {
        l.contains("listening name=tls-echo") && l.contains("transport=tls")
    });
    let (_, addr) = parse_listening(&added).unwrap();
    let out = run_plexus(
        &["connect", &format!("tls://{addr}"), "--insecure"],
        Some(b"over tls, added live\n"),
        Duration::from_secs(20),
    );
    out.assert_code(0);
    assert_eq!(out.stdout, b"over tls, added live\n");
}
