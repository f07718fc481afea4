//! Fuzzes the HTTP/2 server connection: the input follows a valid client
//! preface and SETTINGS, and is fed in varying pieces (the first byte seeds
//! their sizes) and at once. Both cuttings must produce the same events and
//! the same error (the connection is deterministic for one `now`); the input
//! held never exceeds one frame; once failed, the connection stays failed
//! and queues nothing more. A third run answers every request (headers, a
//! body cut by the windows, body bytes released) so the send side, flow
//! control and stream closing are exercised, with output bounded by the
//! pending-output cap.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use plexus_proto::h2::frame::{self, PREFACE};
use plexus_proto::h2::{Event, ServerConnection, Settings};

fn start() -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    frame::write_settings(&mut b, &[]);
    b
}

/// Feeds `input` in pieces from `sizes`, returning every event and the error.
fn run(input: &[u8], sizes: &mut dyn FnMut() -> usize, serve: bool) -> (Vec<Event>, Option<String>) {
    let settings = Settings::default();
    let max_hold = frame::HEADER_LEN + settings.max_frame_size as usize;
    let cap = settings.limits.max_pending_output;
    let t0 = Instant::now();
    let mut conn = ServerConnection::new(settings);
    let mut events = Vec::new();
    let mut error = None;
    let mut rest = input;
    let mut out = Vec::new();
    let mut step = 0u64;
    while !rest.is_empty() {
        let n = sizes().clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        step += 1;
        // Time stands still for the compared runs; it moves 1 ms per read when serving.
        let now = t0 + Duration::from_millis(if serve { step } else { 0 });
        match conn.recv(piece, now) {
            Ok(()) => assert!(conn.buffered_input() <= max_hold.max(PREFACE.len())),
            Err(e) => {
                error = Some(e.to_string());
                out.clear();
                conn.poll_transmit(&mut out);
                let before = conn.pending_output();
                assert!(conn.recv(b"more", now).is_err());
                assert_eq!(conn.pending_output(), before);
                assert!(conn.is_closed());
                // Events from before the error in the same read still come out.
                events.extend(std::iter::from_fn(|| conn.poll_event()));
                break;
            }
        }
        while let Some(ev) = conn.poll_event() {
            if serve {
                match &ev {
                    Event::Request { stream, .. } => {
                        let _ = conn.send_headers(*stream, 200, &[(b"content-type", b"text/plain")], false);
                        let body = [b'x'; 100_000];
                        let _ = conn.send_data(*stream, &body, true);
                    }
                    Event::Data { stream, data, .. } => {
                        conn.release_capacity(*stream, data.len() as u32);
                    }
                    Event::SendReady { stream } => {
                        let _ = conn.send_data(*stream, b"more", true);
                    }
                    _ => {}
                }
            }
            events.push(ev);
        }
        // Headers are small here, so the cap plus one response head bounds the output.
        assert!(conn.pending_output() <= cap + 64 * 1024, "output {}", conn.pending_output());
        if serve && step % 3 == 0 {
            out.clear();
            conn.poll_transmit(&mut out);
        }
    }
    (events, error)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let mut input = start();
    input.extend_from_slice(body);
    let mut state = u32::from(seed) | 1;
    let mut pieces = move || {
        // xorshift: piece sizes 1..=64 from the seed.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 64 + 1) as usize
    };
    let cut = run(&input, &mut pieces, false);
    let whole = run(&input, &mut || usize::MAX, false);
    assert_eq!(cut, whole);
    let mut pieces = move || (seed as usize % 17) + 1;
    run(&input, &mut pieces, true);
});
