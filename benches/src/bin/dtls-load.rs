//! `dtls-load`: DTLS 1.2 load against a dtls echo listener (OpenSSL client, no certificate
//! check, records of at most 1200 bytes).
//!
//! ```text
//! dtls-load --addr IP:PORT [--mode handshakes] [--threads 4] [--duration 10s]
//! dtls-load --addr IP:PORT --mode idle [--sessions 1000]
//! ```
//!
//! `handshakes`: each thread loops handshake → one 64-byte echo → close_notify on a fresh
//! socket; prints one JSON line with handshakes/s. `idle`: opens `--sessions` sessions, echoes
//! 64 bytes once on each, prints `ready sessions=N` on stdout and keeps them open (idle) until
//! standard input closes — for measuring the server's memory per DTLS session.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, SslConnector, SslMethod, SslOptions, SslStream, SslVerifyMode};
use plexus_benches::{usage_exit, Args};

const USAGE: &str =
    "usage: dtls-load --addr IP:PORT ([--mode handshakes] [--threads 4] [--duration 10s] \
                     | --mode idle [--sessions 1000])";

struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() {
    let mut args =
        Args::from_env_with_flags(&[]).unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    if args.help() {
        usage_exit("", USAGE);
    }
    let addr: SocketAddr = args
        .take("addr")
        .ok_or_else(|| "--addr is required".to_owned())
        .and_then(|a| a.parse().map_err(|e| format!("--addr: {e}")))
        .unwrap_or_else(|e| usage_exit(&e, USAGE));
    let threads = args
        .take_parsed("threads", 4usize)
        .unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    let sessions = args
        .take_parsed("sessions", 1000usize)
        .unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    let duration = args
        .take_duration("duration", Duration::from_secs(10))
        .unwrap_or_else(|e| usage_exit(&e.to_string(), USAGE));
    let mode = args.take("mode").unwrap_or_else(|| "handshakes".into());
    if let Err(e) = args.finish() {
        usage_exit(&e.to_string(), USAGE);
    }
    let result = match mode.as_str() {
        "handshakes" => handshakes(addr, threads.max(1), duration),
        "idle" => idle(addr, sessions),
        other => usage_exit(&format!("unknown --mode {other}"), USAGE),
    };
    if let Err(e) = result {
        eprintln!("dtls-load: {e}");
        std::process::exit(1);
    }
}

fn connect(connector: &SslConnector, addr: SocketAddr) -> io::Result<SslStream<Udp>> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut config = connector.configure().map_err(io::Error::other)?;
    config.set_verify_hostname(false);
    let mut ssl = config.into_ssl("localhost").map_err(io::Error::other)?;
    ssl.set_mtu(1200).map_err(io::Error::other)?;
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Udp(socket)).map_err(io::Error::other)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(stream),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

fn echo(stream: &mut SslStream<Udp>) -> io::Result<()> {
    let payload = [0x5au8; 64];
    stream
        .ssl_write(&payload)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(64) => return Ok(()),
            Ok(n) => return Err(io::Error::other(format!("echo of {n} bytes"))),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

fn connector() -> io::Result<SslConnector> {
    let mut builder = SslConnector::builder(SslMethod::dtls()).map_err(io::Error::other)?;
    builder.set_verify(SslVerifyMode::NONE);
    builder.set_options(SslOptions::NO_QUERY_MTU);
    Ok(builder.build())
}

fn handshakes(addr: SocketAddr, threads: usize, duration: Duration) -> io::Result<()> {
    let connector = Arc::new(connector()?);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (connector, done, failed, stop) = (
                Arc::clone(&connector),
                Arc::clone(&done),
                Arc::clone(&failed),
                Arc::clone(&stop),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match connect(&connector, addr).and_then(|mut s| {
                        echo(&mut s)?;
                        let _ = s.shutdown();
                        Ok(())
                    }) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = done.load(Ordering::Relaxed);
    println!(
        "{{\"bench\":\"dtls-handshakes\",\"addr\":\"{addr}\",\"threads\":{threads},\"seconds\":{secs:.2},\
         \"handshakes\":{ok},\"failed\":{},\"handshakes_per_sec\":{:.0}}}",
        failed.load(Ordering::Relaxed),
        ok as f64 / secs
    );
    Ok(())
}

fn idle(addr: SocketAddr, sessions: usize) -> io::Result<()> {
    let connector = connector()?;
    let mut open = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let mut stream = connect(&connector, addr)?;
        echo(&mut stream)?;
        open.push(stream);
    }
    println!("ready sessions={}", open.len());
    io::stdout().flush()?;
    // Hold the sessions until standard input closes.
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    Ok(())
}
