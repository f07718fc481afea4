//! Serves h2c (prior knowledge) on 127.0.0.1 with the sans-IO HTTP/2 codec
//! driven by blocking `std::net` I/O, to try the codec against real clients:
//!
//! ```sh
//! cargo run -p plexus-proto --example h2_blocking_server -- 8080
//! nghttp -nv http://127.0.0.1:8080/hello
//! curl --http2-prior-knowledge http://127.0.0.1:8080/bytes/4194304 -o /dev/null
//! h2load -n 10000 -c 10 -m 10 http://127.0.0.1:8080/bytes/100
//! ```
#![allow(missing_docs)]

#[path = "../tests/support/h2_blocking.rs"]
mod h2_blocking;

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    println!("listening on {}", listener.local_addr()?);
    h2_blocking::run(listener);
    Ok(())
}
