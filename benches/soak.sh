#!/usr/bin/env bash
# Soak test (not run in CI): DURATION seconds of mixed load against a release build of plexus,
# with the server's RSS and open descriptors sampled every 10 s, and a verdict at the end.
#
# One `plexus serve` with a listener on every transport and service (tcp/tls/auto echo,
# udp/dtls echo, http, https, chat), all on 127.0.0.1 ports chosen by the kernel. Load, each a
# loop of bounded rounds (ROUND seconds each, new connections every round) until DURATION:
#   tcp-echo 2000/s, tls-echo 1000/s, udp-echo 1000/s, dtls-echo 500/s   (plexus bench, open loop)
#   http GET 1000/s, https GET 500/s, auto (plain echo) 500/s
#   chat: 1 sender, 4 readers, 100 lines/s, every line counted by every reader (python3)
#   connect-rate tcp and tls (2 slots each: handshake + echo + close, over and over)
#   adversarial rounds: slowloris, idle-flood, handshake-flood (50 sockets each) and a
#   dtls-hello-flood at 200/s (many source addresses) — so the code paths that end hostile
#   sessions are soaked too.
# Every 10 s: elapsed seconds, VmRSS (KiB), open descriptors (ls /proc/PID/fd | wc -l) and
# threads into benches/results/soak-<UTC date>.csv.
#
# Verdict (exit code): after the warm-up (WARMUP_S, first 2 minutes), the peak RSS of the
# last third of the samples may exceed the peak of the first third by at most RSS_TOL_MIB,
# and the peak descriptor count by at most FD_TOL; the server must still be running; and
# the stream loads (tcp, tls, http, https, auto, chat) must have had no errors; and the server
# must not have logged a panic (ERROR and WARN lines are counted). Exit 0 when
# all hold, 1 otherwise, 2 on a usage error.
#
# Usage:  benches/soak.sh
# Env:    DURATION=1800    total seconds of load (at least WARMUP_S + 60)
#         WARMUP_S=120     seconds not judged
#         ROUND=60         seconds per load round
#         RSS_TOL_MIB=16   allowed RSS growth after warm-up
#         FD_TOL=64        allowed descriptor growth after warm-up
#         SKIP_BUILD=1     use the existing release binary
#         PLEXUS_BIN=path  default <repo>/target/release/plexus
#         KEEP_WORK=1      keep the temporary directory (server log, bench output)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
PLEXUS_BIN=${PLEXUS_BIN:-$MAIN_DIR/target/release/plexus}
DURATION=${DURATION:-1800}
DURATION=${DURATION%s}
WARMUP_S=${WARMUP_S:-120}
ROUND=${ROUND:-60}
RSS_TOL_MIB=${RSS_TOL_MIB:-16}
FD_TOL=${FD_TOL:-64}
SAMPLE_EVERY=10

for v in DURATION WARMUP_S ROUND RSS_TOL_MIB FD_TOL; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
        echo "error: $v must be a non-negative integer (got '${!v}')" >&2
        exit 2
    fi
done
if ((DURATION < WARMUP_S + 60)); then
    echo "error: DURATION ($DURATION s) must be at least WARMUP_S + 60 ($((WARMUP_S + 60)) s)" >&2
    exit 2
fi
if ((ROUND < 5)); then
    echo "error: ROUND must be at least 5 seconds" >&2
    exit 2
fi
command -v python3 >/dev/null || { echo "error: python3 not found (chat load, CSV verdict)" >&2; exit 2; }

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
CSV="$RESULTS_DIR/soak-$STAMP.csv"
mkdir -p "$RESULTS_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/plexus-soak.XXXXXX")
SERVER_PID=""
LOAD_PIDS=()

log() { echo "[soak] $*" >&2; }

cleanup() {
    local pid
    for pid in "${LOAD_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build -------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building plexus (cargo build --release -p plexus-cli)"
    (cd "$MAIN_DIR" && timeout 1800 cargo build --release --locked -p plexus-cli --quiet)
fi
[[ -x $PLEXUS_BIN ]] || { echo "error: $PLEXUS_BIN not found" >&2; exit 2; }
COMMIT=$(git -C "$MAIN_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)

# --- server ------------------------------------------------------------------------------
mkdir -p "$WORK/root"
printf '<html><body>plexus soak</body></html>\n' >"$WORK/root/index.html"
head -c 1048576 /dev/urandom >"$WORK/root/1m.bin"
{
    cat <<EOF
[server]
event_loops = 2
workers = 2
max_connections = 20000
handshake_timeout = "5s"
idle_timeout = "10s"

[http]
root = "$WORK/root"
header_timeout = "5s"

EOF
    for l in tcp-echo:tcp:echo tls-echo:tls:echo udp-echo:udp:echo dtls-echo:dtls:echo \
        http:tcp:http https:tls:http chat:tcp:chat auto:tcp:auto; do
        IFS=: read -r name transport service <<<"$l"
        printf '[[listener]]\nname = "%s"\ntransport = "%s"\naddr = "127.0.0.1:0"\nservice = "%s"\n\n' \
            "$name" "$transport" "$service"
    done
} >"$WORK/plexus.toml"

NO_COLOR=1 "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" 2>"$WORK/server.log" &
SERVER_PID=$!
declare -A PORT
for ((i = 0; i < 200; i++)); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "plexus exited before listening:"
        sed 's/^/    /' "$WORK/server.log" >&2
        exit 1
    fi
    if [[ $(grep -c 'listening name=' "$WORK/server.log" || true) -ge 8 ]]; then
        break
    fi
    sleep 0.1
done
while read -r name port; do
    PORT[$name]=$port
done < <(sed 's/\x1b\[[0-9;]*m//g' "$WORK/server.log" |
    sed -n 's/.*listening name=\([a-z-]*\) .*addr=127\.0\.0\.1:\([0-9]*\).*/\1 \2/p')
for name in tcp-echo tls-echo udp-echo dtls-echo http https chat auto; do
    [[ -n ${PORT[$name]:-} ]] || { log "no listening line for $name:"; cat "$WORK/server.log" >&2; exit 1; }
done
log "plexus $COMMIT pid $SERVER_PID; ${DURATION}s of load, warm-up ${WARMUP_S}s, rounds of ${ROUND}s"

START=$(date +%s)
END=$((START + DURATION))

# loop NAME CMD...: runs `CMD --duration <left of this round>s` in rounds until END; each
# round's JSON line (or a failure line) is appended to $WORK/NAME.jsonl.
loop() {
    local name=$1
    shift
    local now left d out
    while :; do
        now=$(date +%s)
        left=$((END - now))
        ((left >= 3)) || break
        d=$((left < ROUND ? left : ROUND))
        if out=$(timeout $((d + 60)) "$@" --duration "${d}s" 2>>"$WORK/$name.err"); then
            echo "${out##*$'\n'}" >>"$WORK/$name.jsonl"
        else
            local code=$?
            local last=${out##*$'\n'}
            if [[ $last == "{"* ]]; then
                # `plexus bench` exits 1 when a round had errors, after printing its report:
                # keep that report, whose errors_total and counts are the real ones (a
                # synthetic line would count the round as 1 error and 0 operations).
                echo "$last" >>"$WORK/$name.jsonl"
                continue
            fi
            # No report: one JSON line whatever the output held (quotes, backslashes, newlines).
            local raw
            raw=$(printf '%s' "${out:-}" | tr -d '"\\' | tr '\n\t' '  ' | head -c 300 || true)
            echo "{\"mode\":\"$name\",\"failed\":true,\"exit\":$code,\"errors_total\":1,\"raw\":\"$raw\"}" \
                >>"$WORK/$name.jsonl"
            sleep 1 # a load that cannot start must not spin
        fi
    done
}

B=("$PLEXUS_BIN" bench --warmup 0s)
a() { echo "127.0.0.1:${PORT[$1]}"; }
loop tcp-echo "${B[@]}" tcp-echo --addr "$(a tcp-echo)" --connections 20 --rate 2000 &
LOAD_PIDS+=($!)
loop tls-echo "${B[@]}" tls-echo --addr "$(a tls-echo)" --insecure --connections 10 --rate 1000 &
LOAD_PIDS+=($!)
loop auto "${B[@]}" tcp-echo --addr "$(a auto)" --connections 5 --rate 500 &
LOAD_PIDS+=($!)
loop udp-echo "${B[@]}" udp-echo --addr "$(a udp-echo)" --connections 10 --rate 1000 &
LOAD_PIDS+=($!)
loop dtls-echo "${B[@]}" dtls-echo --addr "$(a dtls-echo)" --insecure --connections 5 --rate 500 &
LOAD_PIDS+=($!)
loop http "${B[@]}" http --addr "$(a http)" --path /index.html --connections 10 --rate 1000 &
LOAD_PIDS+=($!)
loop https "${B[@]}" http --addr "$(a https)" --tls --insecure --path /1m.bin --connections 4 --rate 50 &
LOAD_PIDS+=($!)
loop connect-tcp "${B[@]}" connect-rate --addr "$(a tcp-echo)" --connections 2 &
LOAD_PIDS+=($!)
loop connect-tls "${B[@]}" connect-rate --addr "$(a tls-echo)" --tls --insecure --connections 2 &
LOAD_PIDS+=($!)
loop slowloris "${B[@]}" slowloris --addr "$(a http)" --connections 50 --interval 500ms --sources 3 &
LOAD_PIDS+=($!)
loop idle-flood "${B[@]}" idle-flood --addr "$(a tcp-echo)" --connections 50 --sources 3 &
LOAD_PIDS+=($!)
loop handshake-flood "${B[@]}" handshake-flood --addr "$(a tls-echo)" --connections 50 --partial --insecure --sources 3 &
LOAD_PIDS+=($!)
loop dtls-hello-flood "${B[@]}" dtls-hello-flood --addr "$(a dtls-echo)" --sources 500 --rate 200 &
LOAD_PIDS+=($!)

# The chat load: its own rounds; prints one JSON line per round.
cat >"$WORK/chat.py" <<'EOF'
import json, select, socket, sys, time
# Called as: chat.py PORT --duration SECONDSs (the loop adds --duration to every load).
port, duration = int(sys.argv[1]), float(sys.argv[3].rstrip("s"))
addr = ("127.0.0.1", port)
readers = [socket.create_connection(addr, timeout=5) for _ in range(4)]
sender = socket.create_connection(addr, timeout=5)
time.sleep(0.3)  # let the joins be registered before the first line
counts, errors, sent = [0] * len(readers), 0, 0
end = time.time() + duration
next_send = time.time()
def pump(wait):
    global errors
    r, _, _ = select.select(readers + [sender], [], [], wait)
    for s in r:
        data = s.recv(65536)
        if not data:
            errors += 1
            raise SystemExit(report())
        if s is not sender:
            counts[readers.index(s)] += data.count(b"\n")
def report():
    lines_ok = all(c == sent for c in counts)
    return json.dumps({"mode": "chat", "lines_sent": sent, "lines_received": counts,
                       "errors_total": errors + (0 if lines_ok else 1)})
while time.time() < end:
    now = time.time()
    if now >= next_send:
        sender.sendall(b"soak line %010d ........................................\n" % sent)
        sent += 1
        next_send += 0.01
    pump(max(0.0, min(0.01, next_send - time.time())))
drain_until = time.time() + 5
while time.time() < drain_until and any(c < sent for c in counts):
    pump(0.1)
print(report())
EOF
loop chat python3 "$WORK/chat.py" "${PORT[chat]}" &
LOAD_PIDS+=($!)

# --- sampling ----------------------------------------------------------------------------
echo "elapsed_s,rss_kib,fds,threads" >"$CSV"
sample() {
    local t rss fds thr
    t=$(($(date +%s) - START))
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null || echo "")
    thr=$(awk '/^Threads:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null || echo "")
    fds=$(ls "/proc/$SERVER_PID/fd" 2>/dev/null | wc -l)
    echo "$t,$rss,$fds,$thr" >>"$CSV"
    echo "$t $rss $fds"
}
ALIVE=1
while (($(date +%s) < END)); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        ALIVE=0
        log "the server died at $(($(date +%s) - START)) s"
        break
    fi
    read -r t rss fds < <(sample)
    if ((t % 60 < SAMPLE_EVERY)); then
        log "t=${t}s rss=${rss} KiB fds=${fds}"
    fi
    sleep "$SAMPLE_EVERY"
done
[[ $ALIVE == 1 ]] && sample >/dev/null
for pid in "${LOAD_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
done
LOAD_PIDS=()
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    ALIVE=0
fi

# --- verdict -----------------------------------------------------------------------------
python3 - "$CSV" "$WORK" "$WARMUP_S" "$RSS_TOL_MIB" "$FD_TOL" "$ALIVE" "$COMMIT" "$DURATION" <<'EOF'
import csv, glob, json, os, sys
path, work, warmup, rss_tol, fd_tol, alive, commit, duration = sys.argv[1:]
warmup, rss_tol, fd_tol = int(warmup), int(rss_tol) * 1024, int(fd_tol)
rows = [r for r in csv.DictReader(open(path)) if r["rss_kib"]]
judged = [r for r in rows if int(r["elapsed_s"]) >= warmup]
ok = alive == "1"
print(f"soak: plexus {commit}, {duration} s, {len(rows)} samples every 10 s -> {path}")
if len(judged) < 3:
    print("soak: FAIL: fewer than 3 samples after the warm-up")
    sys.exit(1)
third = max(1, len(judged) // 3)
first, last = judged[:third], judged[-third:]
def peak(rs, k): return max(int(r[k]) for r in rs)
rss0, rss1 = peak(first, "rss_kib"), peak(last, "rss_kib")
fd0, fd1 = peak(first, "fds"), peak(last, "fds")
all_rss = [int(r["rss_kib"]) for r in rows]
print(f"soak: RSS KiB: start {all_rss[0]}, max {max(all_rss)}; after warm-up: first-third peak "
      f"{rss0}, last-third peak {rss1}, growth {rss1 - rss0} (tolerance {rss_tol})")
print(f"soak: descriptors: first-third peak {fd0}, last-third peak {fd1}, growth {fd1 - fd0} "
      f"(tolerance {fd_tol})")
if rss1 - rss0 > rss_tol:
    print("soak: FAIL: RSS grew after the warm-up"); ok = False
if fd1 - fd0 > fd_tol:
    print("soak: FAIL: descriptors grew after the warm-up"); ok = False
if alive != "1":
    print("soak: FAIL: the server is not running"); ok = False
strict = {"tcp-echo", "tls-echo", "auto", "http", "https", "chat", "connect-tcp", "connect-tls"}
for f in sorted(glob.glob(os.path.join(work, "*.jsonl"))):
    name = os.path.basename(f)[:-6]
    runs = [json.loads(l) for l in open(f) if l.strip().startswith("{")]
    errors = sum(int(r.get("errors_total", 0)) for r in runs)
    done = sum(int(r.get(k, 0) or 0) for r in runs
               for k in ("messages", "requests", "handshakes", "datagrams", "sockets", "lines_sent"))
    verdict = ""
    if name in strict and errors:
        verdict = "  <- FAIL"; ok = False
    print(f"soak: load {name:17} rounds {len(runs):3}  completed {done:10}  errors {errors}{verdict}")
# The server's own account: a panic anywhere (a handler's is caught, but it is a bug) fails
# the soak; ERROR and WARN lines are reported (floods make refusal WARN lines by design).
log_lines = open(os.path.join(work, "server.log"), errors="replace").read().splitlines()
panics = [l for l in log_lines if "panicked" in l]
levels = {lvl: sum(1 for l in log_lines if f" {lvl} " in l) for lvl in ("ERROR", "WARN")}
print(f"soak: server log: {len(log_lines)} lines, {levels['ERROR']} ERROR, {levels['WARN']} WARN, "
      f"{len(panics)} panics")
for l in panics[:5]:
    print(f"soak:   {l}")
if panics:
    print("soak: FAIL: the server logged a panic"); ok = False
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
EOF
