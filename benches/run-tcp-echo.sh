#!/usr/bin/env bash
# TCP echo, side by side: plexus vs tokio-echo vs mio-echo vs monoio-echo (io_uring), in one run.
#
# Every server is pinned to CPU 0, the load generator (echo-load) to CPU 1.
# Servers are run one after the other, interleaved over REPEATS rounds, and
# the table reports the median round of each. Raw JSON lines (one per run)
# go to benches/results/tcp-echo-<date>.jsonl.
#
# Usage:   benches/run-tcp-echo.sh
# Env:     DURATION=10   measured seconds per run
#          WARMUP=2      warm-up seconds per run (not measured)
#          REPEATS=3     rounds over all servers (median is reported)
#          CONNECTIONS=100 SIZE=64 PIPELINE=1
#          SERVERS="tokio mio monoio plexus plexus-uring"   which servers, in this order
#                                       (plexus-uring: plexus with PLEXUS_BACKEND=io_uring,
#                                       i.e. `[server] backend = "io_uring"`)
#                                       (monoio is skipped, with a message, when the
#                                       kernel refuses io_uring: `monoio-echo --probe`)
#          SKIP_PLEXUS_BUILD=1          use the existing plexus binary as is
#          PLEXUS_BIN=/path/to/plexus   default: <repo>/target/release/plexus
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
BIN_DIR="$BENCH_DIR/target/release"
PLEXUS_BIN=${PLEXUS_BIN:-$MAIN_DIR/target/release/plexus}

DURATION=${DURATION:-10}
DURATION=${DURATION%s}
WARMUP=${WARMUP:-2}
WARMUP=${WARMUP%s}
REPEATS=${REPEATS:-3}
CONNECTIONS=${CONNECTIONS:-100}
SIZE=${SIZE:-64}
PIPELINE=${PIPELINE:-1}
SERVERS=${SERVERS:-tokio mio monoio plexus plexus-uring}
SERVER_CPU=0
LOAD_CPU=1

for v in DURATION WARMUP REPEATS CONNECTIONS SIZE PIPELINE; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [[ ${!v} -eq 0 && $v != WARMUP ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
command -v taskset >/dev/null || { echo "error: taskset not found (util-linux)" >&2; exit 2; }
if [[ $(nproc --all) -lt 2 ]]; then
    echo "error: need at least 2 CPUs (server on $SERVER_CPU, load on $LOAD_CPU)" >&2
    exit 2
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RESULTS="$RESULTS_DIR/tcp-echo-$STAMP.jsonl"
mkdir -p "$RESULTS_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/plexus-bench.XXXXXX")
CLK_TCK=$(getconf CLK_TCK)
SERVER_PID=""

cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[bench] $*" >&2; }

# --- build -----------------------------------------------------------------
log "building benches (release)"
locked=()
[[ -f $BENCH_DIR/Cargo.lock ]] && locked=(--locked)
(cd "$BENCH_DIR" && env -u CARGO_TARGET_DIR timeout 900 cargo build --release "${locked[@]}" --quiet)

PLEXUS_OK=0
if [[ " $SERVERS " == *" plexus "* || " $SERVERS " == *" plexus-uring "* ]]; then
    if [[ ${SKIP_PLEXUS_BUILD:-0} != 1 ]]; then
        log "building plexus (cargo build --release -p plexus-cli in $MAIN_DIR)"
        if ! (cd "$MAIN_DIR" && env -u CARGO_TARGET_DIR timeout 1200 cargo build --release -p plexus-cli --quiet); then
            log "WARNING: plexus failed to build"
        fi
    fi
    if [[ -x $PLEXUS_BIN ]]; then
        PLEXUS_OK=1
    else
        log "SKIPPING plexus: binary $PLEXUS_BIN not found (does 'cargo build --release -p plexus-cli' succeed?)"
    fi
fi

MONOIO_OK=1
MONOIO_WHY=""
if [[ " $SERVERS " == *" monoio "* ]]; then
    if ! MONOIO_WHY=$("$BIN_DIR/monoio-echo" --probe 2>&1); then
        MONOIO_OK=0
        log "SKIPPING monoio: $MONOIO_WHY"
    fi
fi

cat >"$WORK/plexus.toml" <<'EOF'
[server]
event_loops = 1

[[listener]]
name = "tcp-echo"
transport = "tcp"
addr = "127.0.0.1:0"
service = "echo"
EOF

# --- helpers -----------------------------------------------------------------

# Total user+system CPU ticks of a process (all its threads).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Busy and total ticks of the server and load cores: "busy0 total0 busy1 total1".
core_ticks() {
    awk -v c0="cpu$SERVER_CPU" -v c1="cpu$LOAD_CPU" '$1 == c0 || $1 == c1 {
        total = 0; for (i = 2; i <= NF; i++) total += $i;
        busy[$1] = (total - $5 - $6) " " total
    } END { print busy[c0], busy[c1] }' /proc/stat
}

# JSON number field from a flat JSON line: json_num LINE KEY
json_num() { sed -n "s/.*\"$2\":\\([-0-9.eE+]*\\).*/\\1/p" <<<"$1"; }

# start_server NAME LOGFILE READY_REGEX CMD...: starts CMD pinned to
# SERVER_CPU, waits for READY_REGEX on its stderr, sets SERVER_PID and PORT.
start_server() {
    local name=$1 logf=$2 ready=$3
    shift 3
    NO_COLOR=1 taskset -c "$SERVER_CPU" "$@" >"$logf" 2>&1 &
    SERVER_PID=$!
    local line="" i
    for ((i = 0; i < 150; i++)); do
        # Strip ANSI colour codes in case the server's logger adds them.
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -E -m1 "$ready" || true)
        [[ -n $line ]] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$name exited before listening; its output:"
            sed 's/^/    /' "$logf" >&2
            SERVER_PID=""
            return 1
        fi
        sleep 0.1
    done
    if [[ -z $line ]]; then
        log "$name did not print a listening line within 15 s; its output:"
        sed 's/^/    /' "$logf" >&2
        stop_server
        return 1
    fi
    PORT=$(grep -oE 'addr=127\.0\.0\.1:[0-9]+' <<<"$line" | head -n1 | cut -d: -f2)
    [[ -n $PORT ]]
}

# Stops SERVER_PID: SIGTERM, up to 5 s grace, then SIGKILL.
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "server $SERVER_PID ignored SIGTERM; killing"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# run_one NAME ROUND: one measured run of server NAME; appends a JSON line.
run_one() {
    local name=$1 round=$2 logf="$WORK/$1-$2.log" ready
    case $name in
    tokio) start_server tokio-echo "$logf" 'listening addr=127\.0\.0\.1:[0-9]+' \
        "$BIN_DIR/tokio-echo" --addr 127.0.0.1:0 --threads 1 || return 1 ;;
    mio) start_server mio-echo "$logf" 'listening addr=127\.0\.0\.1:[0-9]+' \
        "$BIN_DIR/mio-echo" --addr 127.0.0.1:0 || return 1 ;;
    monoio) start_server monoio-echo "$logf" 'listening addr=127\.0\.0\.1:[0-9]+' \
        "$BIN_DIR/monoio-echo" --addr 127.0.0.1:0 || return 1 ;;
    plexus)
        ready='listening name=tcp-echo transport=tcp addr=127\.0\.0\.1:[0-9]+'
        start_server plexus "$logf" "$ready" \
            "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" || return 1 ;;
    plexus-uring)
        ready='listening name=tcp-echo transport=tcp addr=127\.0\.0\.1:[0-9]+'
        start_server plexus-uring "$logf" "$ready" \
            env PLEXUS_BACKEND=io_uring "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" || return 1
        grep -q 'io_uring: tcp' "$logf" || log "plexus-uring: io_uring did not start (see $logf)" ;;
    *) log "unknown server '$name'"; return 1 ;;
    esac

    # Sample the server's CPU time, and both cores' busy time (which also
    # shows any other work that landed on them), over the measured window.
    local cpu_file="$WORK/cpu-$name-$round"
    (
        sleep "$WARMUP"
        a=$(cpu_ticks "$SERVER_PID")
        ca=$(core_ticks)
        sleep "$DURATION"
        b=$(cpu_ticks "$SERVER_PID")
        cb=$(core_ticks)
        awk -v a="$a" -v b="$b" -v t="$CLK_TCK" -v d="$DURATION" -v ca="$ca" -v cb="$cb" 'BEGIN {
            split(ca, x, " "); split(cb, y, " ");
            # x/y: busy0 total0 busy1 total1
            b0 = (y[2] > x[2]) ? (y[1] - x[1]) * 100 / (y[2] - x[2]) : -1;
            b1 = (y[4] > x[4]) ? (y[3] - x[3]) * 100 / (y[4] - x[4]) : -1;
            printf "%.1f %.1f %.1f\n", (b - a) * 100 / t / d, b0, b1
        }' >"$cpu_file"
    ) &
    local sampler=$!

    local out status=0
    out=$(timeout $((DURATION + WARMUP + 30)) taskset -c "$LOAD_CPU" "$BIN_DIR/echo-load" \
        --addr "127.0.0.1:$PORT" --connections "$CONNECTIONS" --size "$SIZE" \
        --pipeline "$PIPELINE" --duration "${DURATION}s" --warmup "${WARMUP}s" \
        2>"$WORK/load-$name-$round.err") || status=$?
    wait "$sampler" 2>/dev/null || true
    stop_server
    sed 's/^/    /' "$WORK/load-$name-$round.err" >&2
    if [[ -z $out ]]; then
        log "$name: echo-load produced no result (exit $status)"
        return 1
    fi
    [[ $status -eq 0 ]] || log "$name: echo-load reported errors (exit $status)"
    local srv_cpu=null core0=null core1=null
    if [[ -s $cpu_file ]]; then
        read -r srv_cpu core0 core1 <"$cpu_file"
    fi
    local loadavg
    read -r loadavg _ </proc/loadavg
    # Prefix the load generator's JSON with the run's identity.
    echo "{\"server\":\"$name\",\"round\":$round,\"date\":\"$STAMP\",\"loadavg1\":$loadavg,\"server_cpu_pct\":$srv_cpu,\"cpu${SERVER_CPU}_busy_pct\":$core0,\"cpu${LOAD_CPU}_busy_pct\":$core1,${out#\{}" >>"$RESULTS"
}

# --- run -------------------------------------------------------------------
read -r load1 _ </proc/loadavg
log "load average before start: $load1 (other work on these 2 cores skews results)"
log "servers: $SERVERS; ${CONNECTIONS} conns x ${SIZE} B, pipeline $PIPELINE, ${WARMUP}s warm-up + ${DURATION}s, $REPEATS round(s)"
: >"$RESULTS"

ran=()
for name in $SERVERS; do
    if [[ $name == plexus* && $PLEXUS_OK != 1 ]]; then continue; fi
    if [[ $name == monoio && $MONOIO_OK != 1 ]]; then continue; fi
    ran+=("$name")
done
for ((r = 1; r <= REPEATS; r++)); do
    for name in "${ran[@]}"; do
        log "round $r/$REPEATS: $name"
        run_one "$name" "$r" || log "$name round $r FAILED"
    done
done

# --- report ----------------------------------------------------------------
# For each server, pick the run with the median msgs/s and report it.
declare -A MED_LINE
for name in "${ran[@]}"; do
    mapfile -t lines < <(grep -F "\"server\":\"$name\"" "$RESULTS" || true)
    [[ ${#lines[@]} -gt 0 ]] || continue
    sorted=$(for l in "${lines[@]}"; do echo "$(json_num "$l" msgs_per_s) $l"; done | sort -g)
    mid=$(((${#lines[@]} + 1) / 2))
    MED_LINE[$name]=$(sed -n "${mid}p" <<<"$sorted" | cut -d' ' -f2-)
done

tokio_mps=""
tokio_per=""
if [[ -n ${MED_LINE[tokio]:-} ]]; then
    tokio_mps=$(json_num "${MED_LINE[tokio]}" msgs_per_s)
    tokio_per=$(awk -v c="$(json_num "${MED_LINE[tokio]}" server_cpu_pct)" -v m="$tokio_mps" \
        'BEGIN { if (c != "" && m > 0) printf "%.4f", c / 100 / m * 1e6 }')
fi

echo
echo "TCP echo, ${CONNECTIONS} connections x ${SIZE} B, pipeline ${PIPELINE}, ${DURATION}s per run, median of ${REPEATS}; server on CPU ${SERVER_CPU}, load on CPU ${LOAD_CPU}"
echo
echo "| server | msgs/s | p50 µs | p99 µs | ratio vs tokio | runs msgs/s (min–max) | server CPU % | server CPU µs/msg | CPU/msg ÷ tokio's | load CPU % | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for name in "${ran[@]}"; do
    line=${MED_LINE[$name]:-}
    if [[ -z $line ]]; then
        echo "| $name | failed | | | | | | | | | |"
        continue
    fi
    all=$(grep -F "\"server\":\"$name\"" "$RESULTS" | while read -r l; do json_num "$l" msgs_per_s; done | sort -g)
    errs=$(grep -F "\"server\":\"$name\"" "$RESULTS" | while read -r l; do json_num "$l" errors; done | awk '{ s += $1 } END { print s + 0 }')
    awk -v name="$name" -v mps="$(json_num "$line" msgs_per_s)" -v p50="$(json_num "$line" p50_us)" \
        -v p99="$(json_num "$line" p99_us)" -v tok="$tokio_mps" \
        -v lo="$(head -n1 <<<"$all")" -v hi="$(tail -n1 <<<"$all")" \
        -v scpu="$(json_num "$line" server_cpu_pct)" -v lcpu="$(json_num "$line" load_cpu_pct)" \
        -v errs="$errs" -v tper="$tokio_per" 'BEGIN {
            ratio = (tok != "" && tok > 0) ? sprintf("%.2fx", mps / tok) : "n/a";
            per = (scpu != "" && mps > 0) ? sprintf("%.2f", scpu / 100 / mps * 1e6) : "n/a";
            cratio = (per != "n/a" && tper != "" && tper > 0) ? sprintf("%.2f", (scpu / 100 / mps * 1e6) / tper) : "n/a";
            printf "| %s | %.0f | %.0f | %.0f | %s | %.0f–%.0f | %s | %s | %s | %s | %d |\n",
                name, mps, p50, p99, ratio, lo, hi, scpu, per, cratio, lcpu, errs
        }'
done
# A core busier than its one process says means something else ran there.
noisy=$(while read -r l; do
    awk -v n="$(sed -n 's/.*"server":"\([^"]*\)".*/\1/p' <<<"$l")" -v r="$(json_num "$l" round)" \
        -v s="$(json_num "$l" server_cpu_pct)" -v c0="$(json_num "$l" "cpu${SERVER_CPU}_busy_pct")" \
        -v lo="$(json_num "$l" load_cpu_pct)" -v c1="$(json_num "$l" "cpu${LOAD_CPU}_busy_pct")" \
        'BEGIN { if ((c0 != "" && s != "" && c0 - s > 5) || (c1 != "" && lo != "" && c1 - lo > 5))
                     printf "%s round %s (CPU%s busy %s%% vs server %s%%, CPU%s busy %s%% vs load %s%%)\n",
                         n, r, '"$SERVER_CPU"', c0, s, '"$LOAD_CPU"', c1, lo }'
done <"$RESULTS")
if [[ -n $noisy ]]; then
    echo
    echo "warning: other work shared the benchmark cores during:"
    while read -r w; do echo "  - $w"; done <<<"$noisy"
fi
echo
read -r load1_end _ </proc/loadavg
echo "load average (1 min): $load1 before, $load1_end after; per run in the raw results (loadavg1)"
echo "raw results: $RESULTS"
if [[ " $SERVERS " == *" plexus "* && $PLEXUS_OK != 1 ]]; then
    echo "note: plexus was skipped (binary missing or failed to build)"
fi
if [[ " $SERVERS " == *" monoio "* && $MONOIO_OK != 1 ]]; then
    echo "note: monoio (the io_uring anchor) was skipped: $MONOIO_WHY"
fi
