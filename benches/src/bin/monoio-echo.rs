//! `monoio-echo`: the io_uring anchor, an idiomatic monoio TCP echo server.
//!
//! ```text
//! monoio-echo --addr 127.0.0.1:0 [--entries 1024]
//! monoio-echo --probe
//! ```
//!
//! One thread, one monoio runtime on its io_uring driver only (no epoll
//! fallback: the crate's `legacy` feature is off), an accept loop, one task
//! per connection doing owned-buffer `read` → `write_all` through a 64 KiB
//! buffer (monoio's completion-based "rent" I/O: the buffer is handed to the
//! kernel and given back with the result). TCP_NODELAY on every accepted
//! socket. `--entries` is the submission queue size (default 1024). Once
//! bound it prints `listening addr=IP:PORT` on stderr. It runs until killed.
//!
//! If the kernel refuses io_uring (`io_uring_setup` fails: an old kernel,
//! `kernel.io_uring_disabled`, a seccomp filter), it prints
//! `monoio-echo: io_uring unavailable: …` and exits with status 3, which
//! the bench scripts report as a skipped row instead of a figure. `--probe` only sets up the
//! ring: it prints `monoio-echo: io_uring available` and exits 0, or fails as above.

use std::io;
use std::net::SocketAddr;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use plexus_benches::{usage_exit, Args};

const USAGE: &str = "usage: monoio-echo --addr 127.0.0.1:PORT [--entries 1024] | --probe";

/// Size of each connection's copy buffer.
const BUF_SIZE: usize = 64 * 1024;

/// Exit status when io_uring cannot be set up on this kernel.
const EXIT_NO_IO_URING: i32 = 3;

fn main() {
    let (addr, entries, probe) = match parse_args() {
        Ok(v) => v,
        Err(e) => usage_exit(&e, USAGE),
    };
    let mut rt = match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("monoio-echo: io_uring unavailable: {e} (io_uring_setup refused); skipping");
            std::process::exit(EXIT_NO_IO_URING);
        }
    };
    if probe {
        eprintln!("monoio-echo: io_uring available");
        return;
    }
    if let Err(e) = rt.block_on(run(addr)) {
        eprintln!("monoio-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn parse_args() -> Result<(SocketAddr, u32, bool), String> {
    let mut args = Args::from_env_with_flags(&["probe"]).map_err(|e| e.to_string())?;
    if args.help() {
        usage_exit("", USAGE);
    }
    let addr = args.take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)));
    let entries = args.take_parsed("entries", 1024u32);
    let probe = args.take_flag("probe");
    let (addr, entries) = (
        addr.map_err(|e| e.to_string())?,
        entries.map_err(|e| e.to_string())?,
    );
    args.finish().map_err(|e| e.to_string())?;
    if !(2..=32768).contains(&entries) {
        return Err("--entries must be in 2..=32768".into());
    }
    Ok((addr, entries, probe))
}

async fn run(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    eprintln!("listening addr={}", listener.local_addr()?);
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(v) => v,
            // Per-connection accept failures (the peer already reset, a
            // transient EMFILE) must not take the server down.
            Err(e) => {
                eprintln!("monoio-echo: accept: {e}");
                continue;
            }
        };
        monoio::spawn(async move {
            if let Err(e) = echo(stream).await {
                // Resets from the load generator closing are expected noise.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("monoio-echo: connection: {e}");
                }
            }
        });
    }
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(BUF_SIZE);
    loop {
        // `read` fills the buffer's spare capacity and sets its length.
        let (res, b) = stream.read(buf).await;
        buf = b;
        if res? == 0 {
            return Ok(());
        }
        let (res, b) = stream.write_all(buf).await;
        buf = b;
        res?;
        buf.clear();
    }
}
