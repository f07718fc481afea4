//! `udp-sockets-echo`: the same UDP echo loop on `--threads` threads, either each thread with
//! its own socket bound to the port with `SO_REUSEPORT` (what plexus does: one socket per
//! event loop) or all threads sharing one socket: which of the two costs less CPU per
//! datagram.
//!
//! ```text
//! udp-sockets-echo --addr 127.0.0.1:0 [--threads 2] [--mode reuseport|shared]
//! ```
//!
//! Every thread runs one mio `Poll` (epoll, edge-triggered) over its socket — in `shared`
//! mode a duplicate (`try_clone`) of the one socket, so every thread's epoll watches the same
//! receive queue — and answers each datagram with `recv_from` → `send_to` until
//! `WouldBlock` (a reply the socket cannot take is dropped, as UDP would). Prints
//! `listening addr=IP:PORT` on stderr once bound; runs until killed. Pin the process to one
//! core (`taskset -c 0`) to measure the topology's overhead rather than parallelism.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use plexus_benches::{usage_exit, Args};
use socket2::{Domain, Protocol, Socket, Type};

const USAGE: &str =
    "usage: udp-sockets-echo --addr 127.0.0.1:PORT [--threads 2] [--mode reuseport|shared]";

/// Whether the threads share one socket or each binds its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReusePort,
    Shared,
}

fn main() {
    let mut args = Args::from_env().unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    if args.help() {
        usage_exit("", USAGE);
    }
    let parsed = (|| -> Result<_, String> {
        let addr = args
            .take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| e.to_string())?;
        let threads = args
            .take_parsed("threads", 2usize)
            .map_err(|e| e.to_string())?;
        let mode = match args.take("mode").as_deref() {
            None | Some("reuseport") => Mode::ReusePort,
            Some("shared") => Mode::Shared,
            Some(other) => return Err(format!("--mode: `{other}` is not reuseport or shared")),
        };
        args.finish().map_err(|e| e.to_string())?;
        if !(1..=64).contains(&threads) {
            return Err("--threads must be in 1..=64".into());
        }
        Ok((addr, threads, mode))
    })();
    let (addr, threads, mode) = parsed.unwrap_or_else(|e| usage_exit(&e, USAGE));
    if let Err(e) = run(addr, threads, mode) {
        eprintln!("udp-sockets-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn run(addr: SocketAddr, threads: usize, mode: Mode) -> io::Result<()> {
    let first = bind(addr, mode == Mode::ReusePort)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(match mode {
            Mode::ReusePort => bind(local, true)?,
            Mode::Shared => sockets[0].try_clone()?,
        });
    }
    eprintln!(
        "listening addr={local} threads={threads} mode={}",
        if mode == Mode::Shared {
            "shared"
        } else {
            "reuseport"
        }
    );
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|socket| std::thread::spawn(move || serve(UdpSocket::from_std(socket))))
        .collect();
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => return Err(io::Error::other("a serving thread panicked")),
        }
    }
    Ok(())
}

fn serve(mut socket: UdpSocket) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(8);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None)?;
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, peer)) => match socket.send_to(&buf[..n], peer) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => eprintln!("udp-sockets-echo: send: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // An ICMP error for an earlier send: not the socket's end.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
    }
}
