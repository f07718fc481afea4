//! The allowed range of every duration and size key, in one table.
//!
//! A value outside its range is a configuration error (exit 2) naming the key and the range,
//! never a panic later: durations are added to `Instant`s and sizes size buffers, channels
//! and socket options (`c_int` in the kernel). The ranges are wide enough for any real
//! deployment and small enough that no arithmetic on them can overflow.

use std::time::Duration;

use super::Config;

const MS: Duration = Duration::from_millis(1);
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const HOUR: Duration = secs(3600);
const DAY: Duration = secs(86_400);
const MONTH: Duration = secs(30 * 86_400);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A key's value and its inclusive range.
enum Bound {
    Duration(Duration, Duration, Duration),
    Size(u64, u64, u64),
}

/// Every bounded key of `config` (with its value and range): `[server]`, `[http]`, `[chat]`
/// and each `[[listener]]`.
fn bounds(config: &Config) -> Vec<(String, Bound)> {
    let server = &config.server;
    let http = &config.http;
    let size = |value: usize, min: u64, max: u64| {
        Bound::Size(u64::try_from(value).unwrap_or(u64::MAX), min, max)
    };
    let mut all = vec![
        ("server.event_loops", size(server.event_loops, 0, 1024)),
        ("server.workers", size(server.workers, 0, 4096)),
        ("server.worker_queue", size(server.worker_queue, 1, MIB)),
        (
            "server.worker_session_limit",
            size(server.worker_session_limit, 1, 16 * MIB),
        ),
        (
            "server.max_connections",
            size(server.max_connections, 1, 10_000_000),
        ),
        (
            "server.max_connections_per_ip",
            size(server.max_connections_per_ip, 0, 10_000_000),
        ),
        (
            "server.max_handshakes",
            size(server.max_handshakes, 1, 10_000_000),
        ),
        (
            "server.handshake_timeout",
            Bound::Duration(server.handshake_timeout, MS, HOUR),
        ),
        (
            "server.idle_timeout",
            Bound::Duration(server.idle_timeout, MS, MONTH),
        ),
        (
            "server.shutdown_grace",
            Bound::Duration(server.shutdown_grace, Duration::ZERO, DAY),
        ),
        (
            "server.upgrade_timeout",
            Bound::Duration(server.upgrade_timeout, MS, HOUR),
        ),
        (
            "server.drain_delay",
            Bound::Duration(server.drain_delay, Duration::ZERO, HOUR),
        ),
        (
            "server.outbound_high_watermark",
            size(server.outbound_high_watermark, 1, GIB),
        ),
        (
            "server.outbound_low_watermark",
            size(server.outbound_low_watermark, 0, GIB),
        ),
        (
            "server.outbound_limit",
            size(server.outbound_limit, 1, 4 * GIB),
        ),
        (
            "http.max_header_bytes",
            size(http.max_header_bytes, 64, 16 * MIB),
        ),
        ("http.max_uri_bytes", size(http.max_uri_bytes, 64, 16 * MIB)),
        (
            "http.max_body_bytes",
            size(http.max_body_bytes, 0, 1024 * GIB),
        ),
        (
            "http.header_timeout",
            Bound::Duration(http.header_timeout, MS, HOUR),
        ),
        ("http.file_cache_bytes", size(http.file_cache_bytes, 0, GIB)),
        ("http.access_log_queue", size(http.access_log_queue, 1, MIB)),
        (
            "http.file_cache_valid",
            Bound::Duration(http.file_cache_valid, Duration::ZERO, DAY),
        ),
        // RFC 9113 §6.5.2: windows up to 2^31 - 1, frames 2^14 to 2^24 - 1.
        (
            "http.h2_max_concurrent_streams",
            size(http.h2_max_concurrent_streams, 1, 65_536),
        ),
        (
            "http.h2_initial_window_size",
            size(http.h2_initial_window_size, 1024, (1 << 31) - 1),
        ),
        (
            "http.h2_max_frame_size",
            size(http.h2_max_frame_size, 16 * KIB, 16 * MIB - 1),
        ),
        (
            "http.h2_stall_timeout",
            Bound::Duration(http.h2_stall_timeout, MS, DAY),
        ),
        (
            "chat.max_line_bytes",
            size(config.chat.max_line_bytes, 1, 16 * MIB),
        ),
    ]
    .into_iter()
    .map(|(key, bound)| (key.to_owned(), bound))
    .collect::<Vec<_>>();
    for (index, listener) in config.listeners.iter().enumerate() {
        let key = |field: &str| format!("listener[{index}].{field}");
        all.push((
            key("backlog"),
            Bound::Size(u64::from(listener.backlog), 1, 65_535),
        ));
        // SO_RCVBUF/SO_SNDBUF are C ints.
        all.push((key("recv_buffer"), size(listener.recv_buffer, 0, GIB)));
        all.push((key("send_buffer"), size(listener.send_buffer, 0, GIB)));
        // TCP_KEEPIDLE takes whole seconds, at most 32767 on Linux.
        if let Some(keepalive) = listener.keepalive {
            all.push((
                key("keepalive"),
                Bound::Duration(keepalive, secs(1), secs(32_767)),
            ));
        }
        if let Some(linger) = listener.linger {
            all.push((key("linger"), Bound::Duration(linger, Duration::ZERO, HOUR)));
        }
        all.push((
            key("mtu"),
            Bound::Size(u64::from(listener.mtu), 256, 16_384),
        ));
        all.push((
            key("datagram_batch"),
            size(listener.datagram_batch, 1, 1024),
        ));
    }
    all
}

/// Reports every key outside its range; returns whether all were inside (relations between
/// keys are only checked on values that are in range, so their arithmetic cannot overflow).
pub(super) fn check(config: &Config, problem: &mut impl FnMut(String, String)) -> bool {
    let mut all_inside = true;
    for (key, bound) in bounds(config) {
        let message = match bound {
            Bound::Duration(value, min, max) if value < min || value > max => format!(
                "{} is out of range: allowed {} to {}",
                show(value),
                show(min),
                show(max)
            ),
            Bound::Size(value, min, max) if value < min || value > max => {
                format!("{value} is out of range: allowed {min} to {max}")
            }
            _ => continue,
        };
        all_inside = false;
        problem(key, message);
    }
    all_inside
}

fn show(duration: Duration) -> String {
    if duration.is_zero() {
        "0s".to_owned()
    } else {
        humantime::format_duration(duration).to_string()
    }
}
