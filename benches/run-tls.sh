#!/usr/bin/env bash
# TLS, side by side: plexus (transport = "tls") vs tokio-rustls-echo, in one run.
#
# Three tests, each against both servers:
#   echo    closed-loop TLS echo (echo-load --tls): CONNECTIONS x SIZE bytes,
#           all connections connected and handshaken before the warm-up;
#   full    full handshakes per second (handshake-load, resumption off);
#   resume  resumed handshakes per second (handshake-load --resume: one
#           client config, its session cache and tickets shared by all workers).
# Every server is pinned to CPU 0, the load generator to CPU 1. Runs are
# interleaved over REPEATS rounds (round 1: echo tokio-rustls, echo plexus,
# full tokio-rustls, ...) and the tables report the median round of each.
# Raw JSON lines (one per run) go to benches/results/tls-<date>.jsonl.
#
# Usage:   benches/run-tls.sh
# Env:     DURATION=10   measured seconds per run
#          WARMUP=2      warm-up seconds per run (not measured)
#          REPEATS=3     rounds (median is reported)
#          CONNECTIONS=100 SIZE=64 PIPELINE=1      echo test
#          HS_WORKERS=32 concurrent handshake workers (full/resume tests)
#          HS_VERIFY=cached  how handshake-load checks the certificate:
#                        cached (full chain check once, then pinned; the
#                        handshake signature is still verified every time)
#                        or full (WebPKI on every handshake: more client CPU)
#          TLS_VERSION=any   versions the clients offer: any (=> 1.3), 1.2, 1.3
#          TESTS="echo full resume"      which tests, in this order
#          SERVERS="tokio-rustls plexus" which servers, in this order
#          SKIP_PLEXUS_BUILD=1           use the existing plexus binary as is
#          PLEXUS_BIN=/path/to/plexus    default: <repo>/target/release/plexus
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
HS_WORKERS=${HS_WORKERS:-32}
HS_VERIFY=${HS_VERIFY:-cached}
TLS_VERSION=${TLS_VERSION:-any}
TESTS=${TESTS:-echo full resume}
SERVERS=${SERVERS:-tokio-rustls plexus}
SERVER_CPU=0
LOAD_CPU=1

for v in DURATION WARMUP REPEATS CONNECTIONS SIZE PIPELINE HS_WORKERS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [[ ${!v} -eq 0 && $v != WARMUP ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
case $HS_VERIFY in full | cached) ;; *) echo "error: HS_VERIFY must be full or cached" >&2; exit 2 ;; esac
case $TLS_VERSION in any | 1.2 | 1.3) ;; *) echo "error: TLS_VERSION must be any, 1.2 or 1.3" >&2; exit 2 ;; esac
for t in $TESTS; do
    case $t in echo | full | resume) ;; *) echo "error: unknown test '$t' (echo, full, resume)" >&2; exit 2 ;; esac
done
for s in $SERVERS; do
    case $s in tokio-rustls | plexus) ;; *) echo "error: unknown server '$s' (tokio-rustls, plexus)" >&2; exit 2 ;; esac
done
command -v taskset >/dev/null || { echo "error: taskset not found (util-linux)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "error: openssl not found (needed to make the test certificate)" >&2; exit 2; }
if [[ $(nproc --all) -lt 2 ]]; then
    echo "error: need at least 2 CPUs (server on $SERVER_CPU, load on $LOAD_CPU)" >&2
    exit 2
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RESULTS="$RESULTS_DIR/tls-$STAMP.jsonl"
mkdir -p "$RESULTS_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/plexus-tls-bench.XXXXXX")
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
if [[ " $SERVERS " == *" plexus "* ]]; then
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

# --- certificate -----------------------------------------------------------
# A self-signed P-256 certificate for localhost. basicConstraints CA:FALSE
# matters: `openssl req -x509` marks the certificate as a CA by default, and
# rustls/webpki refuse a CA certificate as a server's end-entity certificate
# (CaUsedAsEndEntity). The clients trust this very certificate (--ca).
CERT="$WORK/cert.pem"
KEY="$WORK/key.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE \
    -addext keyUsage=critical,digitalSignature \
    -addext extendedKeyUsage=serverAuth \
    -days 2 -keyout "$KEY" -out "$CERT" 2>"$WORK/openssl.log" || {
    log "openssl failed:"
    sed 's/^/    /' "$WORK/openssl.log" >&2
    exit 1
}

cat >"$WORK/plexus.toml" <<EOF
[server]
event_loops = 1
max_handshakes = 100000

[tls]
cert = "$CERT"
key = "$KEY"

[[listener]]
name = "tls-echo"
transport = "tls"
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
# JSON string field from a flat JSON line: json_str LINE KEY
json_str() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$1"; }

# start_server NAME LOGFILE READY_REGEX CMD...: starts CMD pinned to
# SERVER_CPU, waits for READY_REGEX on its output, sets SERVER_PID and PORT.
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

# run_one TEST SERVER ROUND: one measured run; appends a JSON line.
run_one() {
    local test=$1 name=$2 round=$3
    local tag="$test-$name-$round"
    local logf="$WORK/server-$tag.log"
    case $name in
    tokio-rustls) start_server tokio-rustls-echo "$logf" 'listening addr=127\.0\.0\.1:[0-9]+' \
        "$BIN_DIR/tokio-rustls-echo" --addr 127.0.0.1:0 --threads 1 --cert "$CERT" --key "$KEY" || return 1 ;;
    plexus) start_server plexus "$logf" 'listening name=tls-echo transport=tls addr=127\.0\.0\.1:[0-9]+' \
        "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" || return 1 ;;
    *) log "unknown server '$name'"; return 1 ;;
    esac

    local load=()
    case $test in
    echo) load=("$BIN_DIR/echo-load" --tls --ca "$CERT" --tls-version "$TLS_VERSION"
        --connections "$CONNECTIONS" --size "$SIZE" --pipeline "$PIPELINE") ;;
    full) load=("$BIN_DIR/handshake-load" --ca "$CERT" --tls-version "$TLS_VERSION"
        --workers "$HS_WORKERS" --verify "$HS_VERIFY") ;;
    resume) load=("$BIN_DIR/handshake-load" --ca "$CERT" --tls-version "$TLS_VERSION"
        --workers "$HS_WORKERS" --verify "$HS_VERIFY" --resume) ;;
    esac

    # Sample the server's CPU time, and both cores' busy time (which also
    # shows any other work that landed on them), over the measured window.
    # echo-load connects and handshakes before its warm-up starts; with 100
    # connections that takes well under a second, inside the sampler's
    # warm-up margin.
    local cpu_file="$WORK/cpu-$tag"
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
    out=$(timeout $((DURATION + WARMUP + 60)) taskset -c "$LOAD_CPU" "${load[@]}" \
        --addr "127.0.0.1:$PORT" --duration "${DURATION}s" --warmup "${WARMUP}s" \
        2>"$WORK/load-$tag.err") || status=$?
    wait "$sampler" 2>/dev/null || true
    local rss_kib
    rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null || true)
    stop_server
    sed 's/^/    /' "$WORK/load-$tag.err" >&2
    if [[ -z $out ]]; then
        log "$test/$name: load generator produced no result (exit $status)"
        return 1
    fi
    [[ $status -eq 0 ]] || log "$test/$name: load generator reported errors (exit $status)"
    local srv_cpu=null core0=null core1=null
    if [[ -s $cpu_file ]]; then
        read -r srv_cpu core0 core1 <"$cpu_file"
    fi
    # Prefix the load generator's JSON with the run's identity.
    echo "{\"server\":\"$name\",\"test\":\"$test\",\"round\":$round,\"date\":\"$STAMP\",\"server_cpu_pct\":$srv_cpu,\"server_rss_kib\":${rss_kib:-null},\"cpu${SERVER_CPU}_busy_pct\":$core0,\"cpu${LOAD_CPU}_busy_pct\":$core1,${out#\{}" >>"$RESULTS"
}

# --- run -------------------------------------------------------------------
read -r load1 _ </proc/loadavg
log "load average before start: $load1 (other work on these 2 cores skews results)"
log "tests: $TESTS; servers: $SERVERS; ${WARMUP}s warm-up + ${DURATION}s per run, $REPEATS round(s)"
: >"$RESULTS"

ran=()
for name in $SERVERS; do
    if [[ $name == plexus && $PLEXUS_OK != 1 ]]; then continue; fi
    ran+=("$name")
done
for ((r = 1; r <= REPEATS; r++)); do
    for test in $TESTS; do
        for name in "${ran[@]}"; do
            log "round $r/$REPEATS: $test $name"
            run_one "$test" "$name" "$r" || log "$test $name round $r FAILED"
        done
    done
done

# --- report ----------------------------------------------------------------
# runs TEST SERVER: that pair's JSON lines.
runs() { grep -F "\"server\":\"$2\",\"test\":\"$1\"," "$RESULTS" || true; }

# median TEST SERVER KEY: the run with the median KEY.
median() {
    local lines sorted n
    lines=$(runs "$1" "$2")
    [[ -n $lines ]] || return 0
    sorted=$(while read -r l; do echo "$(json_num "$l" "$3") $l"; done <<<"$lines" | sort -g)
    n=$(wc -l <<<"$sorted")
    sed -n "$(((n + 1) / 2))p" <<<"$sorted" | cut -d' ' -f2-
}

# summary TEST SERVER KEY: "min max errors" over that pair's runs.
summary() {
    runs "$1" "$2" | while read -r l; do echo "$(json_num "$l" "$3") $(json_num "$l" errors)"; done |
        awk 'NR == 1 || $1 < lo { lo = $1 } NR == 1 || $1 > hi { hi = $1 } { e += $2 }
             END { if (NR) print lo, hi, e + 0 }'
}

negotiated=()
for test in $TESTS; do
    key=handshakes_per_s
    [[ $test == echo ]] && key=msgs_per_s
    ref=""
    ref_line=$(median "$test" tokio-rustls "$key")
    [[ -n $ref_line ]] && ref=$(json_num "$ref_line" "$key")
    echo
    case $test in
    echo)
        echo "TLS echo, ${CONNECTIONS} connections x ${SIZE} B, pipeline ${PIPELINE}, TLS_VERSION=${TLS_VERSION}, ${DURATION}s per run, median of ${REPEATS}; server on CPU ${SERVER_CPU}, load on CPU ${LOAD_CPU}"
        echo
        echo "| server | msgs/s | p50 µs | p99 µs | ratio vs tokio-rustls | runs msgs/s (min–max) | server CPU % | server CPU µs/msg | load CPU % | server RSS KiB | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        ;;
    full | resume)
        what="full handshakes (resumption off)"
        [[ $test == resume ]] && what="resumed handshakes (shared session cache + tickets)"
        echo "TLS $what, ${HS_WORKERS} workers, connect + handshake + 1-byte echo + close, HS_VERIFY=${HS_VERIFY}, TLS_VERSION=${TLS_VERSION}, ${DURATION}s per run, median of ${REPEATS}"
        echo
        echo "| server | handshakes/s | p50 µs | p99 µs | ratio vs tokio-rustls | runs (min–max) | resumed % | server CPU % | server CPU µs/handshake | load CPU % | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        ;;
    esac
    for name in "${ran[@]}"; do
        line=$(median "$test" "$name" "$key")
        if [[ -z $line ]]; then
            echo "| $name | failed | | | | | | | | | |"
            continue
        fi
        read -r lo hi errs <<<"$(summary "$test" "$name" "$key")"
        negotiated+=("$test/$name: $(json_str "$line" tls)")
        extra=$(json_num "$line" server_rss_kib)
        if [[ $test != echo ]]; then
            extra=$(awk -v r="$(json_num "$line" resumed)" -v h="$(json_num "$line" handshakes)" \
                'BEGIN { if (h > 0) printf "%.1f", r * 100 / h; else print "n/a" }')
        fi
        awk -v name="$name" -v rate="$(json_num "$line" "$key")" -v p50="$(json_num "$line" p50_us)" \
            -v p99="$(json_num "$line" p99_us)" -v ref="$ref" -v lo="$lo" -v hi="$hi" \
            -v scpu="$(json_num "$line" server_cpu_pct)" -v lcpu="$(json_num "$line" load_cpu_pct)" \
            -v extra="$extra" -v errs="$errs" -v test="$test" 'BEGIN {
                ratio = (ref != "" && ref > 0) ? sprintf("%.2fx", rate / ref) : "n/a";
                per = (scpu != "" && rate > 0) ? sprintf("%.2f", scpu / 100 / rate * 1e6) : "n/a";
                if (test == "echo")
                    printf "| %s | %.0f | %.0f | %.0f | %s | %.0f–%.0f | %s | %s | %s | %s | %d |\n",
                        name, rate, p50, p99, ratio, lo, hi, scpu, per, lcpu, extra, errs;
                else
                    printf "| %s | %.0f | %.0f | %.0f | %s | %.0f–%.0f | %s | %s | %s | %s | %d |\n",
                        name, rate, p50, p99, ratio, lo, hi, extra, scpu, per, lcpu, errs;
            }'
    done
done

echo
echo "negotiated (median runs):"
for n in "${negotiated[@]}"; do echo "  - $n"; done
# A core busier than its one process says means something else ran there.
noisy=$(while read -r l; do
    awk -v n="$(json_str "$l" server)/$(json_str "$l" test)" -v r="$(json_num "$l" round)" \
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
echo "raw results: $RESULTS"
if [[ " $SERVERS " == *" plexus "* && $PLEXUS_OK != 1 ]]; then
    echo "note: plexus was skipped (binary missing or failed to build)"
fi
