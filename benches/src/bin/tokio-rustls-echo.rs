//! `tokio-rustls-echo`: the idiomatic tokio + rustls TLS echo server, used as
//! the reference for plexus' `transport = "tls"` listeners.
//!
//! ```text
//! tokio-rustls-echo --addr 127.0.0.1:0 --cert cert.pem --key key.pem [--threads 1]
//! ```
//!
//! A multi-thread tokio runtime with `--threads` worker threads (default 1)
//! runs an accept loop; every connection gets its own task that sets
//! TCP_NODELAY, completes the TLS handshake through `tokio_rustls::TlsAcceptor`
//! and copies read → `write_all` through a 64 KiB buffer; at end of stream it
//! answers with close_notify (`shutdown`). rustls 0.23 on aws-lc-rs (the
//! provider plexus uses), TLS 1.2 and 1.3, stateless session tickets
//! (`ServerConfig.ticketer = aws_lc_rs::Ticketer::new()`), otherwise rustls'
//! defaults (in-memory session-id cache, two TLS 1.3 tickets per handshake).
//! Once bound it prints `listening addr=IP:PORT` on stderr. It runs until
//! killed (SIGTERM/SIGINT).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use plexus_benches::{tls, usage_exit, Args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const USAGE: &str = "usage: tokio-rustls-echo --addr 127.0.0.1:PORT --cert cert.pem --key key.pem \
[--threads 1]";

/// Size of each connection's copy buffer.
const BUF_SIZE: usize = 64 * 1024;
/// How many per-connection errors to print before going quiet.
const MAX_ERROR_LOGS: u64 = 10;

/// Per-connection errors seen so far (only the first few are printed).
static ERRORS: AtomicU64 = AtomicU64::new(0);

struct Config {
    addr: SocketAddr,
    threads: usize,
    cert: PathBuf,
    key: PathBuf,
}

fn main() {
    let cfg = match parse_args() {
        Ok(v) => v,
        Err(e) => usage_exit(&e, USAGE),
    };
    if let Err(e) = run(cfg) {
        eprintln!("tokio-rustls-echo: fatal: {e}");
        std::process::exit(1);
    }
}

fn parse_args() -> Result<Config, String> {
    let mut args = Args::from_env().map_err(|e| e.to_string())?;
    if args.help() {
        usage_exit("", USAGE);
    }
    let e = |e: plexus_benches::ArgError| e.to_string();
    let addr = args
        .take_parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(e)?;
    let threads = args.take_parsed("threads", 1usize).map_err(e)?;
    let cert = args.take("cert").ok_or("--cert is required")?;
    let key = args.take("key").ok_or("--key is required")?;
    args.finish().map_err(e)?;
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok(Config {
        addr,
        threads,
        cert: cert.into(),
        key: key.into(),
    })
}

fn run(cfg: Config) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls::server_config(&cfg.cert, &cfg.key)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.addr).await?;
        eprintln!("listening addr={}", listener.local_addr()?);
        // Run the accept loop on a worker too, so that with `--threads 1`
        // every bit of server work happens on that one worker thread.
        match tokio::spawn(accept_loop(listener, acceptor)).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        }
    })
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<()> {
    let acceptor = Arc::new(acceptor);
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(v) => v,
            // Per-connection accept failures (e.g. the peer already reset,
            // or a transient EMFILE) must not take the server down.
            Err(e) => {
                log_error("accept", &e);
                continue;
            }
        };
        let acceptor = Arc::clone(&acceptor);
        tokio::spawn(async move {
            if let Err(e) = echo(stream, &acceptor).await {
                if !is_peer_going_away(&e) {
                    log_error("connection", &e);
                }
            }
        });
    }
}

/// Resets, EOFs and a close_notify in mid-handshake (a load generator
/// stopping with cycles in flight) are expected noise, not server errors.
fn is_peer_going_away(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    ) {
        return true;
    }
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CloseNotify
        ))
    )
}

fn log_error(what: &str, e: &io::Error) {
    let n = ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= MAX_ERROR_LOGS {
        eprintln!("tokio-rustls-echo: {what}: {e}");
    } else if n == MAX_ERROR_LOGS + 1 {
        eprintln!("tokio-rustls-echo: further errors are not printed");
    }
}

async fn echo(stream: TcpStream, acceptor: &TlsAcceptor) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = acceptor.accept(stream).await?;
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            // Answer the peer's close_notify with ours; it may already be gone.
            let _ = tls.shutdown().await;
            return Ok(());
        }
        // tokio-rustls' write encrypts and writes the records to the socket.
        tls.write_all(&buf[..n]).await?;
    }
}
