//! `tokio-echo`: the idiomatic tokio TCP echo server, used as the reference.
//!
//! ```text
//! tokio-echo --addr 127.0.0.1:0 [--threads 1]
//! ```
//!
//! A multi-thread tokio runtime with `--threads` worker threads (default 1)
//! runs an accept loop; every connection gets its own task that splits the
//! stream and copies read → `write_all` through a 64 KiB buffer. TCP_NODELAY
//! is set on every accepted socket. Once bound it prints
//! `listening addr=IP:PORT` on stderr (so `--addr 127.0.0.1:0` picks a free
//! port and reports it). It runs until killed (SIGTERM/SIGINT).

use std::io;
use std::net::SocketAddr;

use plexus_benches::{usage_exit, Args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: tokio-echo --addr 127.0.0.1:PORT [--threads 1]";

/// Size of each connection's copy buffer.
const BUF_SIZE: usize = 64 * 1024;

fn main() {
    let (addr, threads) = match parse_args() {
        Ok(v) => v,
        Err(e) => usage_exit(&e, USAGE),
    };
    if let Err(e) = run(addr, threads) {
        eprintln!("tokio-echo: fatal: {e}");
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
        let listener = TcpListener::bind(addr).await?;
        eprintln!("listening addr={}", listener.local_addr()?);
        // Run the accept loop on a worker too, so that with `--threads 1`
        // every bit of server work happens on that one worker thread.
        match tokio::spawn(accept_loop(listener)).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        }
    })
}

async fn accept_loop(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(v) => v,
            // Per-connection accept failures (e.g. the peer already reset,
            // or a transient EMFILE) must not take the server down.
            Err(e) => {
                eprintln!("tokio-echo: accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = echo(stream).await {
                // Resets from the load generator closing are expected noise.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("tokio-echo: connection: {e}");
                }
            }
        });
    }
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.split();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        wr.write_all(&buf[..n]).await?;
    }
}
