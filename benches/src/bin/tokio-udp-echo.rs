//! `tokio-udp-echo`: the idiomatic tokio UDP echo server, used as the reference for plexus'
//! udp listener.
//!
//! ```text
//! tokio-udp-echo --addr 127.0.0.1:0 [--threads 1]
//! ```
//!
//! One `tokio::net::UdpSocket`, one task: `recv_from` → `send_to`, one datagram per system
//! call each way (tokio has no batched datagram API). Prints `listening addr=IP:PORT` on
//! stderr once bound; runs until killed.

use std::io;
use std::net::SocketAddr;

use plexus_benches::{usage_exit, Args};
use tokio::net::UdpSocket;

const USAGE: &str = "usage: tokio-udp-echo --addr 127.0.0.1:PORT [--threads 1]";

fn main() {
    let mut args = match Args::from_env() {
        Ok(args) => args,
        Err(e) => usage_exit(&e.to_string(), USAGE),
    };
    if args.help() {
        usage_exit("", USAGE);
    }
    let addr = args
        .take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    let threads = args
        .take_parsed("threads", 1usize)
        .unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    if let Err(e) = args.finish() {
        usage_exit(&e.to_string(), USAGE);
    }
    if let Err(e) = run(addr, threads.max(1)) {
        eprintln!("tokio-udp-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn run(addr: SocketAddr, threads: usize) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let socket = UdpSocket::bind(addr).await?;
        eprintln!("listening addr={}", socket.local_addr()?);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, peer) = socket.recv_from(&mut buf).await?;
                // A send error concerns one datagram (UDP is lossy): keep serving.
                let _ = socket.send_to(&buf[..n], peer).await;
            }
        });
        match task.await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        }
    })
}
