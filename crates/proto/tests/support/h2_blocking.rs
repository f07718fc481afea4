//! A minimal blocking HTTP/2 (h2c, prior knowledge) server over `std::net`,
//! driving `plexus_proto::h2::ServerConnection` the way an event loop would:
//! read → `recv(bytes, now)` → events → `send_headers` / `send_data` in
//! window-sized pieces → `poll_transmit` → write. For checking the codec
//! against real clients (curl, nghttp, h2load); not the product's server.
//!
//! `GET /bytes/N` answers N bytes (`0123456789` repeated); anything else
//! answers `METHOD PATH AUTHORITY\n`; a request with a body is answered
//! once the body is in, with its length: `METHOD PATH AUTHORITY LENGTH\n`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use plexus_proto::h2::{Event, RequestHead, ServerConnection, Settings};

/// Serves one connection until the peer closes it or the codec ends it.
pub(crate) fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_nodelay(true)?;
    let mut conn = ServerConnection::new(Settings::default());
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    // Per stream: the response body and how much of it was sent.
    let mut bodies: HashMap<u32, (Vec<u8>, usize)> = HashMap::new();
    // Requests with a body, until it is complete: the head and the bytes so far.
    let mut uploads: HashMap<u32, (RequestHead, usize)> = HashMap::new();
    loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Request {
                    stream,
                    head,
                    end_stream: false,
                } => {
                    // Answered once the body is in, as a real service does.
                    uploads.insert(stream, (head, 0));
                }
                Event::Request { stream, head, .. } => {
                    respond(&mut conn, &mut bodies, stream, &head, None)
                }
                Event::Data {
                    stream,
                    data,
                    end_stream,
                } => {
                    conn.release_capacity(stream, data.len() as u32);
                    if let Some((_, n)) = uploads.get_mut(&stream) {
                        *n += data.len();
                    }
                    if end_stream {
                        if let Some((head, n)) = uploads.remove(&stream) {
                            respond(&mut conn, &mut bodies, stream, &head, Some(n));
                        }
                    }
                }
                Event::Reset { stream, .. } => {
                    bodies.remove(&stream);
                    uploads.remove(&stream);
                }
                _ => {}
            }
        }
        // Each body goes out in what the windows allow; the rest waits for WINDOW_UPDATE.
        bodies.retain(
            |&stream, (body, sent)| match conn.send_data(stream, &body[*sent..], true) {
                Ok(n) => {
                    *sent += n;
                    *sent < body.len()
                }
                Err(_) => false,
            },
        );
        out.clear();
        conn.poll_transmit(&mut out);
        sock.set_nonblocking(false)?;
        sock.write_all(&out)?;
        if conn.is_closed() {
            return Ok(());
        }
        // With bodies still to send and room in the windows, only peek at the socket.
        let busy = bodies.keys().any(|&s| conn.send_capacity(s) > 0);
        sock.set_nonblocking(busy)?;
        let n = match sock.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if busy && e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if conn.recv(&buf[..n], Instant::now()).is_err() {
            out.clear();
            conn.poll_transmit(&mut out);
            let _ = sock.write_all(&out);
            return Ok(());
        }
    }
}

/// Sends the response head and queues its body.
fn respond(
    conn: &mut ServerConnection,
    bodies: &mut HashMap<u32, (Vec<u8>, usize)>,
    stream: u32,
    head: &RequestHead,
    uploaded: Option<usize>,
) {
    let path = head.path.clone().unwrap_or_default();
    let body = match path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) => b"0123456789".iter().copied().cycle().take(n).collect(),
        None => format!(
            "{} {} {}{}\n",
            head.method,
            path,
            head.authority.as_deref().unwrap_or("-"),
            uploaded.map(|n| format!(" {n}")).unwrap_or_default()
        )
        .into_bytes(),
    };
    let len = body.len().to_string();
    let head_only = head.method == "HEAD";
    let _ = conn.send_headers(
        stream,
        200,
        &[
            (b"content-type", b"text/plain"),
            (b"content-length", len.as_bytes()),
        ],
        head_only,
    );
    if !head_only {
        bodies.insert(stream, (body, 0));
    }
}

/// Accepts connections on `listener` forever, one thread each.
pub(crate) fn run(listener: TcpListener) {
    for sock in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(sock);
        });
    }
}
