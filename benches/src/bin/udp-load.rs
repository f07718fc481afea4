//! `udp-load`: UDP echo load: `--peers` client sockets, each keeping `--window` datagrams of
//! `--size` bytes in flight, for `--duration`; prints one JSON line with datagrams/s.
//!
//! ```text
//! udp-load --addr 127.0.0.1:PORT [--peers 32] [--window 16] [--size 64]
//!          [--duration 10s] [--warmup 2s]
//! ```
//!
//! A single thread polls every socket (mio, non-blocking): it sends until each peer has
//! `window` datagrams outstanding and reads every reply. A datagram lost on the way (UDP) is
//! written off after 200 ms so the window cannot shrink to nothing.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use plexus_benches::{usage_exit, Args};

const USAGE: &str = "usage: udp-load --addr IP:PORT [--peers 32] [--window 16] [--size 64] \
                     [--duration 10s] [--warmup 2s]";

struct Peer {
    socket: UdpSocket,
    outstanding: usize,
    last_reply: Instant,
}

fn main() {
    let mut args = Args::from_env().unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    if args.help() {
        usage_exit("", USAGE);
    }
    let parsed = (|| -> Result<_, String> {
        let addr: SocketAddr = args
            .take("addr")
            .ok_or("--addr is required")?
            .parse()
            .map_err(|e| format!("--addr: {e}"))?;
        let peers = args
            .take_parsed("peers", 32usize)
            .map_err(|e| e.to_string())?;
        let window = args
            .take_parsed("window", 16usize)
            .map_err(|e| e.to_string())?;
        let size = args
            .take_parsed("size", 64usize)
            .map_err(|e| e.to_string())?;
        let duration = args
            .take_duration("duration", Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let warmup = args
            .take_duration("warmup", Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        args.finish().map_err(|e| e.to_string())?;
        Ok((addr, peers.max(1), window.max(1), size, duration, warmup))
    })();
    let (addr, peers, window, size, duration, warmup) =
        parsed.unwrap_or_else(|e| usage_exit(&e, USAGE));
    if let Err(e) = run(addr, peers, window, size, duration, warmup) {
        eprintln!("udp-load: {e}");
        std::process::exit(1);
    }
}

fn run(
    addr: SocketAddr,
    peers: usize,
    window: usize,
    size: usize,
    duration: Duration,
    warmup: Duration,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut clients = Vec::with_capacity(peers);
    for index in 0..peers {
        let mut socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
        socket.connect(addr)?;
        poll.registry()
            .register(&mut socket, Token(index), Interest::READABLE)?;
        clients.push(Peer {
            socket,
            outstanding: 0,
            last_reply: Instant::now(),
        });
    }
    let payload = vec![0x5au8; size];
    let mut buf = vec![0u8; 65_536];
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let (mut received, mut measured_start) = (0u64, None::<(Instant, u64)>);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if measured_start.is_none() && now >= measure_from {
            measured_start = Some((now, received));
        }
        for peer in clients.iter_mut() {
            if peer.outstanding > 0
                && now.duration_since(peer.last_reply) > Duration::from_millis(200)
            {
                peer.outstanding = 0; // written off as lost
            }
            while peer.outstanding < window {
                match peer.socket.send(&payload) {
                    Ok(_) => peer.outstanding += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))?;
        for event in events.iter() {
            let peer = &mut clients[event.token().0];
            loop {
                match peer.socket.recv(&mut buf) {
                    Ok(_) => {
                        received += 1;
                        peer.outstanding = peer.outstanding.saturating_sub(1);
                        peer.last_reply = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let (t0, r0) = measured_start.unwrap_or((start, 0));
    let secs = Instant::now().duration_since(t0).as_secs_f64();
    let rate = (received - r0) as f64 / secs;
    println!(
        "{{\"bench\":\"udp-echo\",\"addr\":\"{addr}\",\"peers\":{peers},\"window\":{window},\
         \"size\":{size},\"seconds\":{secs:.2},\"datagrams\":{},\"datagrams_per_sec\":{rate:.0}}}",
        received - r0
    );
    Ok(())
}
