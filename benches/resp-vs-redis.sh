#!/usr/bin/env bash
# The resp_server example (plexus, one event loop) against redis-server (io-threads 1,
# persistence off), measured with redis-benchmark, in the same run.
#
# Each server is pinned to CPU 0, redis-benchmark to CPU 1. For each server and each pipeline
# depth (-P 1 and -P 16; -c 50; SET and GET) it reports requests/s and the server's CPU time
# per request: utime+stime from /proc/PID/stat before and after the run, divided by the
# requests. Servers alternate within each round (REPEATS rounds); the table shows the median
# round of each. Raw redis-benchmark output goes to benches/results/.
#
# Usage:   benches/resp-vs-redis.sh
# Env:     N_P1=100000 N_P16=1000000 CONNECTIONS=50 REPEATS=3
#          SKIP_BUILD=1 RESP_BIN=... REDIS_BIN=/usr/bin/redis-server
# Needs:   redis-server, redis-benchmark (apt-get install redis-server redis-tools), taskset,
#          2+ CPUs. Pick -n so each run lasts a few seconds on your machine.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
RESP_BIN=${RESP_BIN:-$MAIN_DIR/target/release/examples/resp_server}
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || echo /usr/bin/redis-server)}
N_P1=${N_P1:-100000}
N_P16=${N_P16:-1000000}
CONNECTIONS=${CONNECTIONS:-50}
REPEATS=${REPEATS:-3}
PORT_RESP=${PORT_RESP:-16380}
PORT_REDIS=${PORT_REDIS:-16379}

for tool in redis-benchmark taskset "$REDIS_BIN"; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install redis-server redis-tools util-linux)" >&2; exit 2; }
done
[[ $(nproc --all) -ge 2 ]] || { echo "error: need 2 CPUs (server on 0, load on 1)" >&2; exit 2; }
if [[ -z ${SKIP_BUILD:-} ]]; then
    (cd "$MAIN_DIR" && cargo build --release --locked -q -p plexus --example resp_server)
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$BENCH_DIR/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$BENCH_DIR/results/resp-vs-redis-$STAMP.txt"

taskset -c 0 "$RESP_BIN" "127.0.0.1:$PORT_RESP" 1 2>"$WORK/resp.log" &
PIDS+=($!); RESP_PID=$!
taskset -c 0 "$REDIS_BIN" --port "$PORT_REDIS" --bind 127.0.0.1 --io-threads 1 --save '' \
    --appendonly no --daemonize no --logfile "$WORK/redis.log" &
PIDS+=($!); REDIS_PID=$!
for port in "$PORT_RESP" "$PORT_REDIS"; do
    for _ in $(seq 100); do
        timeout 2 redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
    done
done

# utime + stime of PID, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# run NAME PID PORT PIPELINE N → "set_rps set_us get_rps get_us"
run() {
    local name=$1 pid=$2 port=$3 pipeline=$4 n=$5 out=""
    for test in set get; do
        local before after rps
        before=$(cpu_ticks "$pid")
        rps=$(taskset -c 1 redis-benchmark -p "$port" -c "$CONNECTIONS" -P "$pipeline" -n "$n" \
                -t "$test" -q 2>&1 | tee -a "$RAW" | tr '\r' '\n' \
              | awk '/requests per second/ {rate=$2} END {print rate}')
        after=$(cpu_ticks "$pid")
        echo "$name -P $pipeline $test: $rps req/s, $((after - before)) ticks" >>"$RAW"
        out+="$rps $(awk -v t=$((after - before)) -v hz="$HZ" -v n="$n" \
                'BEGIN {printf "%.2f", t * 1e6 / hz / n}') "
    done
    echo "$out"
}

declare -A RESULTS
for round in $(seq "$REPEATS"); do
    for pipeline in 1 16; do
        n=$N_P1; [[ $pipeline == 16 ]] && n=$N_P16
        RESULTS[resp,$pipeline,$round]=$(run resp_server "$RESP_PID" "$PORT_RESP" "$pipeline" "$n")
        RESULTS[redis,$pipeline,$round]=$(run redis "$REDIS_PID" "$PORT_REDIS" "$pipeline" "$n")
    done
done

# The median round by SET requests/s.
median() {
    local server=$1 pipeline=$2
    for round in $(seq "$REPEATS"); do echo "${RESULTS[$server,$pipeline,$round]}"; done \
        | sort -n -k1 | sed -n "$(( (REPEATS + 1) / 2 ))p"
}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at start of report; raw: $RAW"
printf '| %-5s | %-4s | %-22s | %-22s | %-18s | %-18s |\n' pipe cmd "resp_server req/s" "redis-server req/s" "resp µs CPU/req" "redis µs CPU/req"
printf '|%s|\n' "-------|------|------------------------|------------------------|--------------------|--------------------"
for pipeline in 1 16; do
    read -r rs_rps rs_us rg_rps rg_us <<<"$(median resp "$pipeline")"
    read -r ds_rps ds_us dg_rps dg_us <<<"$(median redis "$pipeline")"
    for cmd in SET GET; do
        if [[ $cmd == SET ]]; then a=$rs_rps; b=$ds_rps; c=$rs_us; d=$ds_us; else a=$rg_rps; b=$dg_rps; c=$rg_us; d=$dg_us; fi
        printf '| -P %-2s | %-4s | %-10s (%5.2f×) | %-22s | %-8s (%5.2f×) | %-18s |\n' \
            "$pipeline" "$cmd" "$a" "$(awk -v a="$a" -v b="$b" 'BEGIN {print a / b}')" "$b" \
            "$c" "$(awk -v a="$c" -v b="$d" 'BEGIN {print (b > 0) ? a / b : 0}')" "$d"
    done
done
