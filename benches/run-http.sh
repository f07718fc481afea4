#!/usr/bin/env bash
# HTTP/1.1 static files, side by side: plexus vs nginx (1 worker) vs h2o (1 thread), with wrk.
#
# The server is pinned to CPU 0, wrk to CPU 1. Scenarios: a small file with keep-alive
# (requests/s and p99), a 1 MiB file (throughput: sendfile on plexus and nginx; h2o reads the
# file), and the small file over https (TLS 1.3, the same certificate; plexus and nginx only).
# Servers alternate over REPEATS rounds; the table reports the median round of each, with the
# server's CPU per request: utime+stime of the server process and its children (nginx's
# worker) from /proc over the wrk run ÷ the requests wrk completed. Raw wrk output goes to
# benches/results/.
#
# Usage:   benches/run-http.sh
# Env:     DURATION=8 CONNECTIONS=50 REPEATS=3 SMALL_BYTES=1024 SERVERS="nginx h2o plexus"
#          SKIP_PLEXUS_BUILD=1 PLEXUS_BIN=... NGINX_BIN=/usr/sbin/nginx H2O_BIN=/usr/bin/h2o
# Needs:   wrk, nginx, taskset (apt-get install wrk nginx util-linux), 2+ CPUs; h2o
#          (apt-get install h2o; Debian's 2.2.5) or it is skipped with a message.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
PLEXUS_BIN=${PLEXUS_BIN:-$MAIN_DIR/target/release/plexus}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-50}
REPEATS=${REPEATS:-3}
SMALL_BYTES=${SMALL_BYTES:-1024}
SERVERS=${SERVERS:-nginx h2o plexus}
H2O_BIN=${H2O_BIN:-$(command -v h2o || echo /usr/bin/h2o)}
if [[ " $SERVERS " == *" h2o "* && ! -x $H2O_BIN ]]; then
    echo "note: h2o not found ($H2O_BIN; apt-get install h2o): its rows are skipped" >&2
    SERVERS=${SERVERS/h2o/}
fi

for tool in wrk taskset "$NGINX_BIN"; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install wrk nginx util-linux)" >&2; exit 2; }
done
[[ $(nproc --all) -ge 2 ]] || { echo "error: need 2 CPUs (server on 0, wrk on 1)" >&2; exit 2; }
if [[ -z ${SKIP_PLEXUS_BUILD:-} ]]; then
    (cd "$MAIN_DIR" && cargo build --release --locked -q)
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/root" "$BENCH_DIR/results"
head -c "$SMALL_BYTES" /dev/urandom > "$WORK/root/small.bin"
head -c $((1024 * 1024)) /dev/urandom > "$WORK/root/1m.bin"
# nginx's workers run as an unprivileged user: the files must be world-readable.
chmod 755 "$WORK" "$WORK/root"; chmod 644 "$WORK/root"/*
"$PLEXUS_BIN" cert --out "$WORK/cert" --name localhost >/dev/null 2>&1
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$BENCH_DIR/results/http-$STAMP.txt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port); HTTPS_PORT=$(free_port)

cat > "$WORK/plexus.toml" <<EOF
[server]
event_loops = 1
max_connections = 10000
[tls]
cert = "$WORK/cert/cert.pem"
key = "$WORK/cert/key.pem"
[http]
root = "$WORK/root"
[[listener]]
name = "http"
transport = "tcp"
addr = "127.0.0.1:$HTTP_PORT"
service = "http"
[[listener]]
name = "https"
transport = "tls"
addr = "127.0.0.1:$HTTPS_PORT"
service = "http"
EOF

mkdir -p "$WORK/h2o"
cat > "$WORK/h2o/h2o.conf" <<EOF
num-threads: 1
max-connections: 10240
user: root
error-log: $WORK/h2o/error.log
listen:
  host: 127.0.0.1
  port: $HTTP_PORT
hosts:
  default:
    paths:
      /:
        file.dir: $WORK/root
EOF

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 10240; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    # Production tuning comparable to plexus' file cache (nginx caches descriptors and
    # metadata; plexus caches small files' bytes for file_cache_valid = 1s).
    open_file_cache max=1000 inactive=20s;
    open_file_cache_valid 1s;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    types { application/octet-stream bin; }
    server {
        listen 127.0.0.1:$HTTP_PORT;
        listen 127.0.0.1:$HTTPS_PORT ssl;
        ssl_certificate $WORK/cert/cert.pem;
        ssl_certificate_key $WORK/cert/key.pem;
        ssl_protocols TLSv1.3;
        root $WORK/root;
    }
}
EOF

wait_port() {
    for _ in $(seq 100); do
        if curl -sk -o /dev/null "http://127.0.0.1:$1/small.bin"; then return 0; fi
        sleep 0.1
    done
    echo "error: nothing answers on port $1" >&2; exit 1
}

start_server() {
    case $1 in
        plexus) taskset -c 0 "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" 2>"$WORK/plexus.log" & ;;
        nginx)  taskset -c 0 "$NGINX_BIN" -c "$WORK/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.stderr" & ;;
        h2o)    taskset -c 0 "$H2O_BIN" -c "$WORK/h2o/h2o.conf" >"$WORK/h2o.log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$HTTP_PORT"
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}

# cpu_ticks PID: utime+stime (clock ticks) of PID and its direct children (nginx's worker).
cpu_ticks() {
    python3 - "$1" <<'PY'
import os, sys
root, total = int(sys.argv[1]), 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    fields = stat[stat.rindex(")") + 2:].split()
    if int(pid) == root or int(fields[1]) == root:
        total += int(fields[11]) + int(fields[12])
print(total)
PY
}
CLK_TCK=$(getconf CLK_TCK)

# Prints "<requests/s> <transfer MB/s> <p99 ms> <server CPU µs/request> <load average>" for
# one wrk run against SERVER_PID.
run_wrk() {
    local url=$1 out c0 c1
    c0=$(cpu_ticks "$SERVER_PID")
    out=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url")
    c1=$(cpu_ticks "$SERVER_PID")
    echo "== $url" >> "$RAW"; echo "$out" >> "$RAW"
    local rps mbs p99
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    mbs=$(awk '/^Transfer\/sec:/ {v=$2; if (v ~ /GB/) {sub("GB","",v); v*=1024} else if (v ~ /KB/) {sub("KB","",v); v/=1024} else {sub("MB","",v)}; print v}' <<<"$out")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}' <<<"$out")
    local errors
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
    if [[ -n $errors ]]; then
        echo "error: $url: $errors (see $RAW)" >&2
        exit 1
    fi
    local requests per load1
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    per=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.2f", (n > 0) ? (b - a) * 1e6 / t / n : -1 }')
    read -r load1 _ </proc/loadavg
    echo "== cpu: server ticks $c0 -> $c1 ($CLK_TCK/s), $requests requests, $per µs/request, load $load1" >> "$RAW"
    echo "$rps $mbs $p99 $per $load1"
}

read -r LOAD_START _ </proc/loadavg
declare -A RESULT
for round in $(seq "$REPEATS"); do
    for server in $SERVERS; do
        start_server "$server"
        RESULT[$server,small,$round]=$(run_wrk "http://127.0.0.1:$HTTP_PORT/small.bin")
        RESULT[$server,1m,$round]=$(run_wrk "http://127.0.0.1:$HTTP_PORT/1m.bin")
        if [[ $server != h2o ]]; then
            RESULT[$server,tls,$round]=$(run_wrk "https://127.0.0.1:$HTTPS_PORT/small.bin")
        fi
        stop_server
        echo "round $round $server: small ${RESULT[$server,small,$round]} | 1m ${RESULT[$server,1m,$round]} | https ${RESULT[$server,tls,$round]:-–}" >&2
    done
done

# The median round by the scenario's main figure (field 1 = req/s, 2 = MB/s).
median() {
    local server=$1 scenario=$2 field=$3
    for round in $(seq "$REPEATS"); do echo "${RESULT[$server,$scenario,$round]}"; done |
        sort -n -k"$field" | sed -n "$(( (REPEATS + 1) / 2 ))p"
}

echo
echo "Median round of $REPEATS per server; CPU µs/req: the server's utime+stime over the wrk run ÷ requests; ratios plexus / that server (throughput: above 1 = plexus faster; CPU: below 1 = plexus cheaper)."
echo
echo "| scenario | server | throughput | p99 | server CPU µs/req | plexus / this (throughput) | plexus / this (CPU µs/req) | load avg |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for spec in "small:1:req/s:small file ${SMALL_BYTES} B, keep-alive, $CONNECTIONS conns" "1m:2:MB/s:1 MiB file, $CONNECTIONS conns" "tls:1:req/s:https small file (TLS 1.3), $CONNECTIONS conns"; do
    IFS=: read -r scenario field unit label <<<"$spec"
    p=""
    [[ " $SERVERS " == *" plexus "* ]] && p=$(median plexus "$scenario" "$field")
    for server in $SERVERS; do
        [[ -n ${RESULT[$server,$scenario,1]:-} ]] || continue
        r=$(median "$server" "$scenario" "$field")
        read -r rps mbs p99 per load1 <<<"$r"
        value=$rps; [[ $field == 2 ]] && value=$mbs
        ratios=$(awk -v p="$p" -v f="$field" -v v="$value" -v c="$per" 'BEGIN {
            if (p == "") { print "n/a n/a"; exit }
            split(p, x, " "); pv = x[f]; pc = x[4];
            printf "%.2f× %.2f\n", (v > 0) ? pv / v : 0, (c > 0) ? pc / c : 0 }')
        printf '| %s | %s | %s %s | %s ms | %s | %s | %s | %s |\n' "$label" "$server" "$value" "$unit" "$p99" "$per" \
            "${ratios% *}" "${ratios#* }" "$load1"
    done
done
echo
echo "load average (1 min): $LOAD_START at the start, $(cut -d' ' -f1 /proc/loadavg) at the end"
echo "raw wrk output: $RAW"
