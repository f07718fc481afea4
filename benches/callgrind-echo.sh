#!/usr/bin/env bash
# User-space instructions per echoed message of a plexus build, counted by callgrind: a figure
# that does not move with the machine's load (CPU time does), for before/after comparisons of
# the runtime's hot path. The server runs under valgrind with instrumentation off until it
# listens; it is switched on for echo-load's run only, and the instruction count (Ir) of that
# window is divided by the messages echo-load counted. Kernel time is not counted: compare
# syscalls per message separately (`strace -c -f`).
#
# Usage:   benches/callgrind-echo.sh PLEXUS_BIN [LABEL]
# Env:     SIZE=64 CONNECTIONS=100 DURATION=10 (seconds of load; valgrind slows the server ~50x)
#          TLS=1   a tls listener (certificate made here) and echo-load --tls
# Output:  one line "LABEL size=… conns=… tls=… msgs=… Ir=… Ir/msg=…"; the callgrind profile is
#          kept in $WORK (printed), for callgrind_annotate.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${1:?usage: benches/callgrind-echo.sh PLEXUS_BIN [LABEL]}
LABEL=${2:-$(basename "$BIN")}
SIZE=${SIZE:-64}
CONNECTIONS=${CONNECTIONS:-100}
DURATION=${DURATION:-10}
TLS=${TLS:-0}
LOAD=${ECHO_LOAD:-$BENCH_DIR/target/release/echo-load}
for tool in valgrind callgrind_control callgrind_annotate; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt install valgrind)" >&2; exit 2; }
done
if [[ ! -x $LOAD ]]; then
    (cd "$BENCH_DIR" && env -u CARGO_TARGET_DIR cargo build --release --quiet --bin echo-load)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/plexus-callgrind.XXXXXX")
PID=""
cleanup() {
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        kill -KILL "$PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

transport=tcp
load_tls=()
tls_section=""
if [[ $TLS == 1 ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE -addext keyUsage=critical,digitalSignature \
        -addext extendedKeyUsage=serverAuth -days 2 \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    transport=tls
    load_tls=(--tls --ca "$WORK/cert.pem")
    tls_section=$(printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$WORK/cert.pem" "$WORK/key.pem")
fi
cat >"$WORK/plexus.toml" <<TOML
[server]
event_loops = 1
max_handshakes = 100000
$tls_section
[[listener]]
name = "echo"
transport = "$transport"
addr = "127.0.0.1:0"
service = "echo"
TOML

NO_COLOR=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
    "$BIN" serve --config "$WORK/plexus.toml" >"$WORK/server.log" 2>&1 &
PID=$!
addr=""
for _ in $(seq 1 300); do
    addr=$(grep -oE 'listening name=echo .*addr=127\.0\.0\.1:[0-9]+' "$WORK/server.log" | grep -oE '127\.0\.0\.1:[0-9]+' || true)
    [[ -n $addr ]] && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.2
done
[[ -n $addr ]] || { echo "error: the server did not listen within 60 s" >&2; exit 1; }

callgrind_control -i on "$PID" >/dev/null 2>&1
out=$(timeout $((DURATION + 60)) "$LOAD" --addr "$addr" --connections "$CONNECTIONS" --size "$SIZE" \
    --duration "${DURATION}s" --warmup 0s "${load_tls[@]}" 2>/dev/null)
callgrind_control -i off "$PID" >/dev/null 2>&1
callgrind_control -d "$PID" >/dev/null 2>&1
kill -TERM "$PID"
for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
PID=""

msgs=$(sed -n 's/.*"messages":\([0-9]*\).*/\1/p' <<<"$out")
errors=$(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$out")
profile=$(ls "$WORK"/callgrind.out.* | sort | head -1)
# awk reads to the end: an early `exit` would SIGPIPE callgrind_annotate and fail the pipeline.
ir=$(callgrind_annotate --auto=no "$profile" | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
[[ ${errors:-1} == 0 && -n $msgs && $msgs -gt 0 ]] || { echo "error: echo-load: $out" >&2; exit 1; }
awk -v l="$LABEL" -v s="$SIZE" -v c="$CONNECTIONS" -v t="$TLS" -v m="$msgs" -v i="$ir" \
    'BEGIN { printf "%s size=%s conns=%s tls=%s msgs=%d Ir=%d Ir/msg=%.0f\n", l, s, c, t, m, i, i / m }'
echo "profile: $profile" >&2
trap - EXIT
