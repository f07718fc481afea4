//! OpenSSL DTLS calls that the `openssl` crate does not expose: `DTLSv1_listen` (the
//! stateless cookie exchange) and the DTLS retransmission timer (`DTLSv1_get_timeout` /
//! `DTLSv1_handle_timeout`, which are `SSL_ctrl` macros in C).

use std::time::Duration;

use foreign_types::ForeignTypeRef;
use openssl::ssl::SslRef;

/// `DTLS_CTRL_GET_TIMEOUT` from `ssl.h`.
const DTLS_CTRL_GET_TIMEOUT: libc::c_int = 73;
/// `DTLS_CTRL_HANDLE_TIMEOUT` from `ssl.h`.
const DTLS_CTRL_HANDLE_TIMEOUT: libc::c_int = 74;

/// `BIO_ADDR` is opaque; OpenSSL allocates it.
#[repr(C)]
struct BioAddr {
    _private: [u8; 0],
}

extern "C" {
    fn DTLSv1_listen(ssl: *mut openssl_sys::SSL, client: *mut BioAddr) -> libc::c_int;
    fn BIO_ADDR_new() -> *mut BioAddr;
    fn BIO_ADDR_free(addr: *mut BioAddr);
    fn SSL_free_buffers(ssl: *mut openssl_sys::SSL) -> libc::c_int;
}

/// What one `DTLSv1_listen` call made of the datagram(s) its read BIO returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenOutcome {
    /// A ClientHello carried a valid cookie: the SSL object now holds it and continues the
    /// handshake as a server (`SSL_accept`).
    Verified,
    /// Nothing to continue with yet: the read BIO ran dry (a HelloVerifyRequest may have been
    /// written, or a datagram silently dropped).
    Pending,
    /// A fatal error (unparseable packet for this object); the object must be cleared.
    Failed,
}

/// Runs `DTLSv1_listen` on `ssl`, whose BIOs are non-blocking (reads return one datagram).
///
/// For a datagram it drops, OpenSSL leaves the reason in the thread's error queue even when
/// the result is [`ListenOutcome::Pending`]; `SSL_get_error` of the next call on this thread,
/// on any SSL object, would read it as its own. Callers must drain the queue after this call
/// (and should empty it before every OpenSSL call), as plexus' `dtls` module does.
pub fn listen(ssl: &SslRef) -> ListenOutcome {
    // SAFETY: BIO_ADDR_new has no preconditions; a null result is handled below.
    let client = unsafe { BIO_ADDR_new() };
    if client.is_null() {
        return ListenOutcome::Failed;
    }
    // SAFETY: `ssl` is a live SSL object (an opaque, interior-mutable foreign type) for the call; `client` is a valid
    // BIO_ADDR that DTLSv1_listen may write to.
    let result = unsafe { DTLSv1_listen(ssl.as_ptr(), client) };
    // SAFETY: `client` came from BIO_ADDR_new and nothing else holds it.
    unsafe { BIO_ADDR_free(client) };
    match result {
        1.. => ListenOutcome::Verified,
        0 => ListenOutcome::Pending,
        _ => ListenOutcome::Failed,
    }
}

/// When the DTLS retransmission timer of `ssl` fires, from now (`None`: not running).
pub fn get_timeout(ssl: &SslRef) -> Option<Duration> {
    let mut timeval = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one `struct timeval` through the pointer, which
    // points at a live local; the SSL object is live for the call.
    let running = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            (&mut timeval as *mut libc::timeval).cast(),
        )
    };
    (running == 1).then(|| {
        Duration::from_secs(timeval.tv_sec.max(0) as u64)
            + Duration::from_micros(timeval.tv_usec.max(0) as u64)
    })
}

/// Lets OpenSSL retransmit its last flight if the DTLS timer expired. Returns `false` when
/// the retransmission limit was reached (the handshake failed).
pub fn handle_timeout(ssl: &SslRef) -> bool {
    // SAFETY: DTLS_CTRL_HANDLE_TIMEOUT takes no argument; the SSL object is live.
    let result = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_HANDLE_TIMEOUT,
            0,
            std::ptr::null_mut(),
        )
    };
    result >= 0
}

/// Frees the record layer's read and write buffers of `ssl` (about 34 KiB) if nothing is
/// pending in them; OpenSSL allocates them again on the next record. Returns whether they
/// were freed.
pub fn free_buffers(ssl: &SslRef) -> bool {
    // SAFETY: the SSL object is live; SSL_free_buffers refuses (returns 0) when a buffer
    // still holds data, so nothing in flight is lost.
    unsafe { SSL_free_buffers(ssl.as_ptr()) == 1 }
}
