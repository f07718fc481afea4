//! `tokio-udp-echo`: the idiomatic tokio UDP echo server, the reference for udp-echo.
//!
//! ```text
//! tokio-udp-echo --addr 127.0.0.1:0 [--threads 1]
//! ```
//!
//! One `tokio::net::UdpSocket`, one task: `recv_from` then `send_to` the same bytes back,
//! one datagram at a time (no batching, which is what tokio offers out of the box). Once bound
//! it prints `listening addr=IP:PORT` on stderr. It runs until killed.

use std::io;
use std::net::SocketAddr;

use plexus_benches::{usage_exit, Args};
use tokio::net::UdpSocket;

const USAGE: &str = "usage: tokio-udp-echo --addr 127.0.0.1:PORT [--threads 1]";

fn main() {
    let (addr, threads) = match parse_args() {
        Ok(v) => v,
        Err(e) => usage_exit(&e, USAGE),
    };
    if let Err(e) = run(addr, threads) {
        eprintln!("tokio-udp-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn parse_args() -> Result<(SocketAddr, usize), String> {
    let mut args = Args::from_env().map_err(|e| e.to_string())?;
    if args.help() {
        usage_exit("", USAGE);
    }
    let addr = args.take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)));
    let threads = args.take_parsed("threads", 1usize);
    let (addr, threads) = (
        addr.map_err(|e| e.to_string())?,
        threads.map_err(|e| e.to_string())?,
    );
    args.finish().map_err(|e| e.to_string())?;
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok((addr, threads))
}

fn run(addr: SocketAddr, threads: usize) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let socket = UdpSocket::bind(addr).await?;
        eprintln!("listening addr={}", socket.local_addr()?);
        // On a worker, like tokio-echo, so all server work is on the worker thread(s).
        match tokio::spawn(echo(socket)).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        }
    })
}

async fn echo(socket: UdpSocket) -> io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            // ICMP errors from a vanished peer surface here; they are not fatal.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = socket.send_to(&buf[..n], peer).await {
            if e.kind() != io::ErrorKind::ConnectionRefused {
                eprintln!("tokio-udp-echo: send_to {peer}: {e}");
            }
        }
    }
}
