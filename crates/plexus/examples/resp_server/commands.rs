//! The commands: each takes the arguments, the keyspace and `now`, and appends its reply.
//!
//! Replies and error texts are redis 7.0's, so `redis-cli` and `redis-benchmark` see what they
//! expect. Every value is a string (there is no other type, so no WRONGTYPE).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::resp::{self, parse_signed};
use crate::store::Store;

/// What the session does after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read the next command.
    Continue,
    /// Close once the reply is sent (QUIT).
    Close,
}

/// `(name, arity, flags, first key, last key, key step)`: a positive arity is exact, a
/// negative one a minimum (the name counts), as in redis' command table.
const COMMANDS: &[(&str, i64, &str, i64, i64, i64)] = &[
    ("ping", -1, "fast", 0, 0, 0),
    ("echo", 2, "fast", 0, 0, 0),
    ("get", 2, "readonly", 1, 1, 1),
    ("set", -3, "write", 1, 1, 1),
    ("del", -2, "write", 1, -1, 1),
    ("exists", -2, "readonly", 1, -1, 1),
    ("incr", 2, "write", 1, 1, 1),
    ("incrby", 3, "write", 1, 1, 1),
    ("mget", -2, "readonly", 1, -1, 1),
    ("mset", -3, "write", 1, -1, 2),
    ("expire", -3, "write", 1, 1, 1),
    ("ttl", 2, "readonly", 1, 1, 1),
    ("dbsize", 1, "readonly", 0, 0, 0),
    ("flushall", -1, "write", 0, 0, 0),
    ("command", -1, "loading", 0, 0, 0),
    ("config", -2, "admin", 0, 0, 0),
    ("hello", -1, "fast", 0, 0, 0),
    ("client", -2, "admin", 0, 0, 0),
    ("select", 2, "fast", 0, 0, 0),
    ("info", -1, "loading", 0, 0, 0),
    ("quit", -1, "fast", 0, 0, 0),
];

const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";

/// Runs one command (`args[0]` is its name), appending the reply to `out`.
pub(crate) fn execute(
    store: &mut Store,
    args: &[Bytes],
    session: u64,
    now: Instant,
    out: &mut BytesMut,
) -> Next {
    let mut lower = [0u8; 16];
    let name = &args[0];
    let known = (name.len() <= lower.len())
        .then(|| {
            lower[..name.len()].copy_from_slice(name);
            lower[..name.len()].make_ascii_lowercase();
            COMMANDS
                .iter()
                .find(|command| command.0.as_bytes() == &lower[..name.len()])
        })
        .flatten();
    let Some(&(name, arity, ..)) = known else {
        unknown_command(args, out);
        return Next::Continue;
    };
    let argc = args.len() as i64;
    if (arity > 0 && argc != arity) || argc < -arity {
        resp::error(
            out,
            &format!("ERR wrong number of arguments for '{name}' command"),
        );
        return Next::Continue;
    }
    match name {
        "ping" => match args {
            [_] => resp::simple(out, "PONG"),
            [_, message] => resp::bulk(out, message),
            _ => arity_error(out, "ping"),
        },
        "echo" => resp::bulk(out, &args[1]),
        "get" => match store.get(&args[1], now) {
            Some(entry) => resp::bulk(out, &entry.value),
            None => resp::null(out),
        },
        "set" => set(store, args, now, out),
        "del" => {
            let removed = args[1..].iter().filter(|k| store.remove(k, now)).count();
            resp::integer(out, removed as i64);
        }
        "exists" => {
            let found = args[1..].iter().filter(|k| store.contains(k, now)).count();
            resp::integer(out, found as i64);
        }
        "incr" => incr_by(store, &args[1], 1, now, out),
        "incrby" => match parse_signed(&args[2]) {
            Some(by) => incr_by(store, &args[1], by, now, out),
            None => resp::error(out, NOT_AN_INTEGER),
        },
        "mget" => {
            resp::array(out, args.len() - 1);
            for key in &args[1..] {
                match store.get(key, now) {
                    Some(entry) => resp::bulk(out, &entry.value),
                    None => resp::null(out),
                }
            }
        }
        "mset" => {
            if args.len().is_multiple_of(2) {
                arity_error(out, "mset");
            } else {
                for pair in args[1..].chunks(2) {
                    store.set(&pair[0], &pair[1], None);
                }
                resp::simple(out, "OK");
            }
        }
        "expire" => expire(store, args, now, out),
        "ttl" => {
            let ttl = match store.get(&args[1], now) {
                None => -2,
                Some(entry) => match entry.expires {
                    None => -1,
                    Some(at) => {
                        ((at.saturating_duration_since(now).as_millis() + 500) / 1000) as i64
                    }
                },
            };
            resp::integer(out, ttl);
        }
        "dbsize" => resp::integer(out, store.len() as i64),
        "flushall" => match args {
            [_] => flush(store, out),
            [_, mode]
                if mode.eq_ignore_ascii_case(b"sync") || mode.eq_ignore_ascii_case(b"async") =>
            {
                flush(store, out)
            }
            _ => resp::error(out, SYNTAX),
        },
        "command" => command(args, out),
        "config" => config(args, out),
        "hello" => hello(args, session, out),
        "client" => client(args, session, out),
        "select" => match parse_signed(&args[1]) {
            Some(0) => resp::simple(out, "OK"),
            Some(_) => resp::error(out, "ERR DB index is out of range"),
            None => resp::error(out, NOT_AN_INTEGER),
        },
        "info" => {
            let text = format!(
                "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n\
                 plexus_example:resp_server\r\n\r\n# Keyspace\r\n{}",
                if store.len() > 0 {
                    format!(
                        "db0:keys={},expires={},avg_ttl=0\r\n",
                        store.len(),
                        store.volatile()
                    )
                } else {
                    String::new()
                }
            );
            resp::bulk(out, text.as_bytes());
        }
        "quit" => {
            resp::simple(out, "OK");
            return Next::Close;
        }
        _ => unreachable!("every name in COMMANDS has an arm"),
    }
    Next::Continue
}

fn arity_error(out: &mut BytesMut, name: &str) {
    resp::error(
        out,
        &format!("ERR wrong number of arguments for '{name}' command"),
    );
}

/// redis 7.0's text: the name and the start of the arguments, each quoted.
fn unknown_command(args: &[Bytes], out: &mut BytesMut) {
    let name = String::from_utf8_lossy(&args[0][..args[0].len().min(128)]);
    let mut quoted = String::new();
    for arg in &args[1..] {
        if quoted.len() >= 128 {
            break;
        }
        let room = 128 - quoted.len();
        quoted.push('\'');
        quoted.push_str(&String::from_utf8_lossy(&arg[..arg.len().min(room)]));
        quoted.push_str("' ");
    }
    resp::error(
        out,
        &format!("ERR unknown command '{name}', with args beginning with: {quoted}"),
    );
}

fn flush(store: &mut Store, out: &mut BytesMut) {
    store.clear();
    resp::simple(out, "OK");
}

/// SET key value [NX | XX] [GET] [EX seconds | PX milliseconds | KEEPTTL]
fn set(store: &mut Store, args: &[Bytes], now: Instant, out: &mut BytesMut) {
    let (mut nx, mut xx, mut get, mut keep_ttl) = (false, false, false, false);
    let mut ttl: Option<(Duration, &str)> = None;
    let mut rest = args[3..].iter();
    while let Some(option) = rest.next() {
        let is = |name: &[u8]| option.eq_ignore_ascii_case(name);
        if is(b"nx") && !xx {
            nx = true;
        } else if is(b"xx") && !nx {
            xx = true;
        } else if is(b"get") {
            get = true;
        } else if is(b"keepttl") && ttl.is_none() {
            keep_ttl = true;
        } else if (is(b"ex") || is(b"px")) && ttl.is_none() && !keep_ttl {
            let Some(value) = rest.next() else {
                return resp::error(out, SYNTAX);
            };
            let Some(n) = parse_signed(value) else {
                return resp::error(out, NOT_AN_INTEGER);
            };
            let millis = if is(b"ex") {
                n.checked_mul(1000)
            } else {
                Some(n)
            };
            match millis {
                Some(millis) if millis > 0 => {
                    ttl = Some((Duration::from_millis(millis as u64), "set"));
                }
                _ => return resp::error(out, "ERR invalid expire time in 'set' command"),
            }
        } else {
            return resp::error(out, SYNTAX);
        }
    }
    let (key, value) = (&args[1], &args[2]);
    let old = store.get(key, now).cloned();
    if get {
        match &old {
            Some(entry) => resp::bulk(out, &entry.value),
            None => resp::null(out),
        }
    }
    if (nx && old.is_some()) || (xx && old.is_none()) {
        if !get {
            resp::null(out);
        }
        return;
    }
    let expires = match ttl {
        Some((ttl, command)) => match now.checked_add(ttl) {
            Some(at) => Some(at),
            None => {
                return resp::error(
                    out,
                    &format!("ERR invalid expire time in '{command}' command"),
                )
            }
        },
        None if keep_ttl => old.and_then(|entry| entry.expires),
        None => None,
    };
    store.set(key, value, expires);
    if !get {
        resp::simple(out, "OK");
    }
}

fn incr_by(store: &mut Store, key: &[u8], by: i64, now: Instant, out: &mut BytesMut) {
    let current = match store.get(key, now) {
        None => 0,
        Some(entry) => match parse_signed(&entry.value) {
            Some(n) => n,
            None => return resp::error(out, NOT_AN_INTEGER),
        },
    };
    let Some(next) = current.checked_add(by) else {
        return resp::error(out, "ERR increment or decrement would overflow");
    };
    let text = Bytes::from(next.to_string());
    if store.contains(key, now) {
        store.replace_value(key, text); // INCR keeps the key's deadline
    } else {
        store.set(key, &text, None);
    }
    resp::integer(out, next);
}

/// EXPIRE key seconds [NX | XX | GT | LT]
fn expire(store: &mut Store, args: &[Bytes], now: Instant, out: &mut BytesMut) {
    let Some(seconds) = parse_signed(&args[2]) else {
        return resp::error(out, NOT_AN_INTEGER);
    };
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in &args[3..] {
        let is = |name: &[u8]| option.eq_ignore_ascii_case(name);
        if is(b"nx") {
            nx = true;
        } else if is(b"xx") {
            xx = true;
        } else if is(b"gt") {
            gt = true;
        } else if is(b"lt") {
            lt = true;
        } else {
            return resp::error(
                out,
                &format!("ERR Unsupported option {}", String::from_utf8_lossy(option)),
            );
        }
    }
    if nx && (xx || gt || lt) {
        return resp::error(
            out,
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        );
    }
    if gt && lt {
        return resp::error(
            out,
            "ERR GT and LT options at the same time are not compatible",
        );
    }
    let Some(millis) = seconds.checked_mul(1000) else {
        return resp::error(out, "ERR invalid expire time in 'expire' command");
    };
    let Some(current) = store.get(&args[1], now).map(|entry| entry.expires) else {
        return resp::integer(out, 0);
    };
    // A deadline now or in the past deletes the key; None here means "already due".
    let new = if millis > 0 {
        match now.checked_add(Duration::from_millis(millis as u64)) {
            Some(at) => Some(at),
            None => return resp::error(out, "ERR invalid expire time in 'expire' command"),
        }
    } else {
        None
    };
    let allowed = match (current, new) {
        _ if nx => current.is_none(),
        _ if xx && current.is_none() => false,
        // No deadline counts as infinite: nothing is greater, anything is less.
        (None, _) if gt => false,
        (None, _) if lt => true,
        (Some(current), Some(new)) if gt => new > current,
        (Some(current), Some(new)) if lt => new < current,
        (Some(_), None) if gt => false,
        _ => true,
    };
    if !allowed {
        return resp::integer(out, 0);
    }
    match new {
        Some(at) => store.set_expiry(&args[1], Some(at)),
        None => {
            store.remove(&args[1], now);
        }
    }
    resp::integer(out, 1);
}

/// COMMAND, COMMAND COUNT | LIST | INFO name… | DOCS: enough for redis-cli and client
/// libraries (the 7.0 entry shape with empty ACL categories, tips, key specs and subcommands).
fn command(args: &[Bytes], out: &mut BytesMut) {
    let entry =
        |out: &mut BytesMut,
         &(name, arity, flag, first, last, step): &(&str, i64, &str, i64, i64, i64)| {
            resp::array(out, 10);
            resp::bulk(out, name.as_bytes());
            resp::integer(out, arity);
            resp::array(out, 1);
            resp::simple(out, flag);
            resp::integer(out, first);
            resp::integer(out, last);
            resp::integer(out, step);
            for _ in 0..4 {
                resp::array(out, 0);
            }
        };
    let Some(sub) = args.get(1) else {
        resp::array(out, COMMANDS.len());
        COMMANDS.iter().for_each(|command| entry(out, command));
        return;
    };
    let is = |name: &[u8]| sub.eq_ignore_ascii_case(name);
    if is(b"count") && args.len() == 2 {
        resp::integer(out, COMMANDS.len() as i64);
    } else if is(b"list") && args.len() == 2 {
        resp::array(out, COMMANDS.len());
        COMMANDS
            .iter()
            .for_each(|command| resp::bulk(out, command.0.as_bytes()));
    } else if is(b"info") {
        resp::array(out, args.len() - 2);
        for name in &args[2..] {
            match COMMANDS
                .iter()
                .find(|command| name.eq_ignore_ascii_case(command.0.as_bytes()))
            {
                Some(command) => entry(out, command),
                None => resp::array_null(out),
            }
        }
    } else if is(b"docs") {
        resp::array(out, 0);
    } else {
        resp::error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(sub)
            ),
        );
    }
}

/// CONFIG GET parameter…: the few parameters clients ask about (redis-benchmark asks for
/// `save` and `appendonly` on start); others match nothing.
fn config(args: &[Bytes], out: &mut BytesMut) {
    const PARAMETERS: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];
    if !args[1].eq_ignore_ascii_case(b"get") {
        return resp::error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try CONFIG HELP.",
                String::from_utf8_lossy(&args[1])
            ),
        );
    }
    if args.len() < 3 {
        return arity_error(out, "config|get");
    }
    let matches: Vec<&(&str, &str)> = PARAMETERS
        .iter()
        .filter(|(name, _)| {
            args[2..].iter().any(|pattern| {
                &pattern[..] == b"*" || pattern.eq_ignore_ascii_case(name.as_bytes())
            })
        })
        .collect();
    resp::array(out, matches.len() * 2);
    for (name, value) in matches {
        resp::bulk(out, name.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
}

/// HELLO [2 [AUTH user password] [SETNAME name]]: RESP2 only.
fn hello(args: &[Bytes], session: u64, out: &mut BytesMut) {
    if let Some(version) = args.get(1) {
        match parse_signed(version) {
            Some(2) => {}
            Some(_) => {
                return resp::error(
                    out,
                    "NOPROTO sorry, this protocol version is not supported.",
                )
            }
            None => {
                return resp::error(
                    out,
                    "ERR Protocol version is not an integer or out of range",
                )
            }
        }
    }
    resp::array(out, 14);
    for (name, value) in [("server", "redis"), ("version", "7.0.0")] {
        resp::bulk(out, name.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
    resp::bulk(out, b"proto");
    resp::integer(out, 2);
    resp::bulk(out, b"id");
    resp::integer(out, session as i64);
    for (name, value) in [("mode", "standalone"), ("role", "master")] {
        resp::bulk(out, name.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
    resp::bulk(out, b"modules");
    resp::array(out, 0);
}

/// CLIENT ID | GETNAME | SETNAME name | SETINFO attr value.
fn client(args: &[Bytes], session: u64, out: &mut BytesMut) {
    let sub = &args[1];
    let is = |name: &[u8]| sub.eq_ignore_ascii_case(name);
    if is(b"id") {
        resp::integer(out, session as i64);
    } else if is(b"getname") {
        resp::null(out);
    } else if is(b"setname") || is(b"setinfo") {
        resp::simple(out, "OK");
    } else {
        resp::error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(sub)
            ),
        );
    }
}
