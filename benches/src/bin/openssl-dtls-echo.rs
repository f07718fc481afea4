//! `openssl-dtls-echo`: a small DTLS 1.2 echo server on the `openssl` crate, the reference for
//! plexus' dtls listener (there is no well-known tokio DTLS echo server).
//!
//! ```text
//! openssl-dtls-echo --addr 127.0.0.1:0 --cert cert.pem --key key.pem
//! ```
//!
//! One thread, one mio loop. The listening socket only sees a peer's first datagrams: for each
//! new peer a socket bound to the same address (SO_REUSEPORT) and connected to the peer takes
//! over (Linux delivers to the connected socket, the more specific match), so OpenSSL gets a
//! plain connected-socket BIO per session, the way `DTLSv1_listen`-free servers commonly work.
//! No cookie exchange (one round trip less than plexus per handshake; the echo rows do not
//! count handshakes) and no retransmission timer (loopback does not lose handshake flights).
//! Each record is echoed as one record; a record the socket cannot take right now is dropped
//! (UDP is lossy; the client counts it). Prints `listening addr=IP:PORT` on stderr once
//! bound; runs until killed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use openssl::ssl::{
    ErrorCode, SslContext, SslFiletype, SslMethod, SslOptions, SslStream, SslVersion,
};
use plexus_benches::{usage_exit, Args};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

const USAGE: &str = "usage: openssl-dtls-echo --addr 127.0.0.1:PORT --cert cert.pem --key key.pem";
/// The listening socket's token; sessions use their slab index.
const LISTENER: Token = Token(usize::MAX);
/// The same record size limit as plexus' default.
const MTU: u32 = 1200;

/// One peer's connected socket, plus the datagrams that reached the listening socket first.
struct PeerIo {
    sock: UdpSocket,
    early: VecDeque<Vec<u8>>,
}

impl Read for PeerIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(datagram) = self.early.pop_front() {
            let n = datagram.len().min(buf.len());
            buf[..n].copy_from_slice(&datagram[..n]);
            return Ok(n);
        }
        self.sock.recv(buf)
    }
}

impl Write for PeerIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.sock.send(buf) {
            // A full socket buffer drops the record, as a lossy network would.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(buf.len()),
            other => other,
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Session {
    peer: SocketAddr,
    stream: SslStream<PeerIo>,
    established: bool,
}

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
    let cert = args
        .take("cert")
        .unwrap_or_else(|| usage_exit("--cert is required", USAGE));
    let key = args
        .take("key")
        .unwrap_or_else(|| usage_exit("--key is required", USAGE));
    if let Err(e) = args.finish() {
        usage_exit(&e.to_string(), USAGE);
    }
    if let Err(e) = run(addr, &cert, &key) {
        eprintln!("openssl-dtls-echo: fatal: {e}");
        std::process::exit(1);
    }
}

/// A non-blocking UDP socket on `addr` that shares the port with the others (SO_REUSEPORT).
fn shared_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

fn context(cert: &str, key: &str) -> io::Result<SslContext> {
    let err = |e: openssl::error::ErrorStack| io::Error::other(e.to_string());
    let mut builder = SslContext::builder(SslMethod::dtls()).map_err(err)?;
    builder
        .set_min_proto_version(Some(SslVersion::DTLS1_2))
        .map_err(err)?;
    builder.set_options(SslOptions::NO_QUERY_MTU);
    builder.set_certificate_chain_file(cert).map_err(err)?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .map_err(err)?;
    builder.check_private_key().map_err(err)?;
    Ok(builder.build())
}

fn run(addr: SocketAddr, cert: &str, key: &str) -> io::Result<()> {
    let context = context(cert, key)?;
    let mut listener = shared_socket(addr)?;
    let local = listener.local_addr()?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("listening addr={local}");
    let mut sessions: Slab<Session> = Slab::new();
    let mut by_peer: HashMap<SocketAddr, usize> = HashMap::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 65_536];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let mut ready = Vec::new();
            if event.token() == LISTENER {
                loop {
                    let (n, peer) = match listener.recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    let datagram = buf[..n].to_vec();
                    if let Some(&id) = by_peer.get(&peer) {
                        sessions[id].stream.get_mut().early.push_back(datagram);
                        ready.push(id);
                        continue;
                    }
                    match accept(&context, local, peer, datagram, &mut sessions, &poll) {
                        Ok(id) => {
                            by_peer.insert(peer, id);
                            ready.push(id);
                        }
                        Err(e) => eprintln!("openssl-dtls-echo: {peer}: {e}"),
                    }
                }
            } else {
                ready.push(event.token().0);
            }
            for id in ready {
                if !serve(&mut sessions, id, &mut buf) {
                    let mut session = sessions.remove(id);
                    by_peer.remove(&session.peer);
                    let _ = poll
                        .registry()
                        .deregister(&mut session.stream.get_mut().sock);
                }
            }
        }
    }
}

/// A session for a new `peer` whose first datagram came to the listening socket.
fn accept(
    context: &SslContext,
    local: SocketAddr,
    peer: SocketAddr,
    first: Vec<u8>,
    sessions: &mut Slab<Session>,
    poll: &Poll,
) -> io::Result<usize> {
    let err = |e: openssl::error::ErrorStack| io::Error::other(e.to_string());
    let sock = shared_socket(local)?;
    sock.connect(peer)?;
    let mut ssl = openssl::ssl::Ssl::new(context).map_err(err)?;
    ssl.set_mtu(MTU).map_err(err)?;
    ssl.set_accept_state();
    let io = PeerIo {
        sock,
        early: VecDeque::from([first]),
    };
    let stream = SslStream::new(ssl, io).map_err(err)?;
    let entry = sessions.vacant_entry();
    let id = entry.key();
    let session = entry.insert(Session {
        peer,
        stream,
        established: false,
    });
    poll.registry().register(
        &mut session.stream.get_mut().sock,
        Token(id),
        Interest::READABLE,
    )?;
    Ok(id)
}

/// Advances session `id` until its socket has nothing more: handshake, then echo record by
/// record. `false` when the session is over (close_notify, fatal alert, socket error).
fn serve(sessions: &mut Slab<Session>, id: usize, buf: &mut [u8]) -> bool {
    let Some(session) = sessions.get_mut(id) else {
        return true;
    };
    if !session.established {
        match session.stream.do_handshake() {
            Ok(()) => session.established = true,
            Err(e) if e.code() == ErrorCode::WANT_READ => return true,
            Err(_) => return false,
        }
    }
    loop {
        match session.stream.ssl_read(buf) {
            Ok(n) => {
                if session.stream.ssl_write(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => return true,
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                let _ = session.stream.shutdown();
                return false;
            }
            Err(_) => return false,
        }
    }
}
