//! `mio-echo`: a minimal hand-written, single-threaded mio 1.x echo server.
//!
//! ```text
//! mio-echo --addr 127.0.0.1:0
//! ```
//!
//! This is the "bare event loop" baseline: one thread, one `Poll`, a slab of
//! connections, edge-triggered readiness (mio is always edge-triggered), one
//! shared 64 KiB read buffer. Whatever is read is written straight back; if
//! the write is partial, the remainder goes into a small per-connection
//! pending buffer and the connection stops reading until that is flushed
//! (back-pressure), so memory per connection stays bounded. TCP_NODELAY is
//! set on every accepted socket. Once bound it prints `listening addr=IP:PORT`
//! on stderr. It runs until killed.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use plexus_benches::{usage_exit, Args};
use slab::Slab;

const USAGE: &str = "usage: mio-echo --addr 127.0.0.1:PORT";

/// Size of the one read buffer shared by all connections.
const BUF_SIZE: usize = 64 * 1024;
/// Token of the listening socket; connections use their slab index.
const LISTENER: Token = Token(usize::MAX);

/// One accepted connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet written back (only non-empty after a partial
    /// write; while it is, the connection is not read from).
    pending: Vec<u8>,
}

/// What to do with a connection after driving it.
enum Outcome {
    /// Keep it; wait for the next readiness edge.
    Keep,
    /// Peer closed or failed: deregister and drop it.
    Close,
}

fn main() {
    let addr = match parse_args() {
        Ok(v) => v,
        Err(e) => usage_exit(&e, USAGE),
    };
    if let Err(e) = run(addr) {
        eprintln!("mio-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn parse_args() -> Result<SocketAddr, String> {
    let mut args = Args::from_env().map_err(|e| e.to_string())?;
    if args.help() {
        usage_exit("", USAGE);
    }
    let addr = args
        .take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|e| e.to_string())?;
    args.finish().map_err(|e| e.to_string())?;
    Ok(addr)
}

fn run(addr: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("listening addr={}", listener.local_addr()?);

    let mut conns: Slab<Conn> = Slab::with_capacity(1024);
    let mut buf = vec![0u8; BUF_SIZE];

    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&poll, &listener, &mut conns)?;
                continue;
            }
            let key = event.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue; // closed earlier in this batch
            };
            if let Outcome::Close = drive(conn, &mut buf) {
                let mut conn = conns.remove(key);
                // Deregistering a socket we are about to drop cannot
                // meaningfully fail; dropping it closes it either way.
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
}

/// Accepts until `WouldBlock` (edge-triggered: one event may cover many).
fn accept_all(poll: &Poll, listener: &TcpListener, conns: &mut Slab<Conn>) -> io::Result<()> {
    loop {
        let (mut stream, _peer) = match listener.accept() {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ECONNABORTED, EMFILE, ...: log and keep serving.
                eprintln!("mio-echo: accept: {e}");
                return Ok(());
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("mio-echo: set_nodelay: {e}");
            continue;
        }
        let entry = conns.vacant_entry();
        poll.registry().register(
            &mut stream,
            Token(entry.key()),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        entry.insert(Conn {
            stream,
            pending: Vec::new(),
        });
    }
}

/// Flushes pending bytes, then echoes until the socket would block.
///
/// Called for every readiness event regardless of its kind: with edge
/// triggering the cheapest correct thing is to make progress in both
/// directions until one of them reports `WouldBlock`.
fn drive(conn: &mut Conn, buf: &mut [u8]) -> Outcome {
    loop {
        if !conn.pending.is_empty() {
            match write_some(&mut conn.stream, &conn.pending) {
                Ok(n) => {
                    conn.pending.drain(..n);
                    if !conn.pending.is_empty() {
                        return Outcome::Keep; // wait for WRITABLE
                    }
                }
                Err(_) => return Outcome::Close,
            }
        }
        let n = match conn.stream.read(buf) {
            Ok(0) => return Outcome::Close,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Close,
        };
        match write_some(&mut conn.stream, &buf[..n]) {
            Ok(w) if w < n => conn.pending.extend_from_slice(&buf[w..n]),
            Ok(_) => {}
            Err(_) => return Outcome::Close,
        }
    }
}

/// Writes as much of `data` as the socket takes now; `Ok(0..len)` means it
/// would block. Errors are real failures (reset, broken pipe).
fn write_some(stream: &mut TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
