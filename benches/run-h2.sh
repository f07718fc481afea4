#!/usr/bin/env bash
# HTTP/2 static files, side by side: plexus (1 event loop) vs nginx (1 worker) vs h2o
# (1 thread), measured with h2load (issue 16, Measure).
#
# The server is pinned to CPU 0, h2load (one thread) to CPU 1. Scenarios: a small file over h2
# (TLS 1.3, ALPN) and over h2c (prior knowledge), `h2load -c 100 -m 10`: requests/s and the
# server's CPU µs per request (utime+stime of the server process from /proc/PID/stat, over the
# measured run, ÷ the requests that succeeded); and a 1 MiB file over h2 and h2c,
# `-c BIG_CONNECTIONS -m 1`, in MB/s (10^6 bytes of body per second). Each measured run follows
# a 1 s warm-up run on fresh connections. Servers alternate over REPEATS rounds; the table
# reports each server's median round per scenario. Raw h2load output goes to benches/results/.
#
# nginx 1.22 (Debian 12) has no `http2 on;` (1.25.1+): `listen … http2` turns HTTP/2 on, with
# `ssl` for h2 and without for h2c (prior knowledge only, as plexus and h2o here).
# nginx runs with `master_process off` so that the one process measured is the one serving.
#
# Usage:   benches/run-h2.sh
# Env:     DURATION=5 REPEATS=3 SMALL_BYTES=1024 CONNECTIONS=100 STREAMS=10 BIG_CONNECTIONS=10
#          SERVERS="nginx h2o plexus" SKIP_PLEXUS_BUILD=1 PLEXUS_BIN=... NGINX_BIN=... H2O_BIN=...
# Needs:   h2load (nghttp2-client), nginx, h2o, taskset, curl, python3; 2+ CPUs.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
PLEXUS_BIN=${PLEXUS_BIN:-$MAIN_DIR/target/release/plexus}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
H2O_BIN=${H2O_BIN:-$(command -v h2o || echo /usr/bin/h2o)}
DURATION=${DURATION:-5}
REPEATS=${REPEATS:-3}
SMALL_BYTES=${SMALL_BYTES:-1024}
CONNECTIONS=${CONNECTIONS:-100}
STREAMS=${STREAMS:-10}
BIG_CONNECTIONS=${BIG_CONNECTIONS:-10}
SERVERS=${SERVERS:-"nginx h2o plexus"}

for tool in h2load taskset curl python3 "$NGINX_BIN" "$H2O_BIN"; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install nghttp2-client nginx h2o util-linux curl)" >&2; exit 2; }
done
[[ $(nproc --all) -ge 2 ]] || { echo "error: need 2 CPUs (server on 0, h2load on 1)" >&2; exit 2; }
if [[ -z ${SKIP_PLEXUS_BUILD:-} ]]; then
    (cd "$MAIN_DIR" && cargo build --release --locked -q -p plexus-cli)
fi
CLK_TCK=$(getconf CLK_TCK)

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
# nginx's and h2o's workers may run as an unprivileged user: the files must be world-readable.
chmod 755 "$WORK" "$WORK/root"; chmod 644 "$WORK/root"/*
"$PLEXUS_BIN" cert --out "$WORK/cert" --name localhost >/dev/null 2>&1
chmod 644 "$WORK/cert"/*
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$BENCH_DIR/results/h2-$STAMP.txt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
H2C_PORT=$(free_port); H2_PORT=$(free_port)

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
name = "h2c"
transport = "tcp"
addr = "127.0.0.1:$H2C_PORT"
service = "http"
[[listener]]
name = "h2"
transport = "tls"
addr = "127.0.0.1:$H2_PORT"
service = "http"
EOF

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 10240; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    open_file_cache max=1000 inactive=20s;
    open_file_cache_valid 1s;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    types { application/octet-stream bin; }
    server {
        listen 127.0.0.1:$H2C_PORT http2;
        listen 127.0.0.1:$H2_PORT ssl http2;
        ssl_certificate $WORK/cert/cert.pem;
        ssl_certificate_key $WORK/cert/key.pem;
        ssl_protocols TLSv1.3;
        root $WORK/root;
    }
}
EOF

cat > "$WORK/h2o.conf" <<EOF
num-threads: 1
listen:
  host: 127.0.0.1
  port: $H2C_PORT
listen:
  host: 127.0.0.1
  port: $H2_PORT
  ssl:
    certificate-file: $WORK/cert/cert.pem
    key-file: $WORK/cert/key.pem
    minimum-version: TLSv1.2
    ocsp-update-interval: 0
hosts:
  default:
    paths:
      /:
        file.dir: $WORK/root
EOF

wait_port() {
    for _ in $(seq 100); do
        if curl -s --max-time 2 --http2-prior-knowledge -o /dev/null "http://127.0.0.1:$1/small.bin"; then return 0; fi
        sleep 0.1
    done
    echo "error: nothing answers h2c on port $1; the server said:" >&2
    cat "$WORK"/*.stderr "$WORK"/*.log "$WORK"/nginx/error.log 2>/dev/null | tail -20 >&2
    exit 1
}

start_server() {
    case $1 in
        plexus) taskset -c 0 "$PLEXUS_BIN" serve --config "$WORK/plexus.toml" 2>"$WORK/plexus.log" & ;;
        nginx)  taskset -c 0 "$NGINX_BIN" -c "$WORK/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.stderr" & ;;
        h2o)    taskset -c 0 "$H2O_BIN" -c "$WORK/h2o.conf" >"$WORK/h2o.stdout" 2>"$WORK/h2o.stderr" & ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$H2C_PORT"
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}

# utime + stime of the server process (every thread), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat"; }

# Prints "<requests/s> <MB/s of body> <server CPU µs/request>" for one h2load run. h2load's
# timing mode waits for every connection to finish: a run that outlives DURATION + 20 s (a
# connection stuck under a loaded machine) is killed and retried, at most 3 attempts.
run_h2load() {
    local attempt
    for attempt in 1 2 3; do
        if run_h2load_once "$@"; then return 0; fi
        echo "warning: $1: attempt $attempt failed or timed out (see $RAW)" >&2
    done
    echo "error: $1: 3 attempts failed" >&2
    exit 1
}

run_h2load_once() {
    local url=$1 conns=$2 streams=$3 bytes=$4 out before after limit=$((DURATION + 20))
    timeout 30 taskset -c 1 h2load -t 1 -c "$conns" -m "$streams" -D 1 "$url" >/dev/null 2>&1 || true
    before=$(cpu_ticks)
    out=$(timeout "$limit" taskset -c 1 h2load -t 1 -c "$conns" -m "$streams" -D "$DURATION" "$url" 2>&1) || {
        { echo "== $url (-c $conns -m $streams): h2load failed or was killed after ${limit}s"; echo "$out"; } >> "$RAW"
        return 1
    }
    after=$(cpu_ticks)
    { echo "== $url (-c $conns -m $streams)"; echo "$out"; } >> "$RAW"
    local line ok failed errored rps
    line=$(grep -E '^requests:' <<<"$out")
    ok=$(awk '{ for (i = 1; i <= NF; i++) if ($(i+1) ~ /^succeeded/) print $i }' <<<"$line")
    failed=$(awk '{ for (i = 1; i <= NF; i++) if ($(i+1) ~ /^failed/) print $i }' <<<"$line")
    errored=$(awk '{ for (i = 1; i <= NF; i++) if ($(i+1) ~ /^errored/) print $i }' <<<"$line")
    rps=$(awk '/^finished in/ { gsub(",", "", $4); print $4 }' <<<"$out")
    if [[ -z $ok || $ok -eq 0 || $failed -ne 0 || $errored -ne 0 ]] || ! grep -qE '^status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out"; then
        echo "$url: $line" >&2
        return 1
    fi
    awk -v rps="$rps" -v bytes="$bytes" -v ticks=$((after - before)) -v tck="$CLK_TCK" -v n="$ok" \
        'BEGIN { printf "%.0f %.1f %.1f\n", rps, rps * bytes / 1e6, ticks * 1e6 / tck / n }'
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A RESULT
for round in $(seq "$REPEATS"); do
    for server in $SERVERS; do
        start_server "$server"
        RESULT[$server,h2,$round]=$(run_h2load "https://127.0.0.1:$H2_PORT/small.bin" "$CONNECTIONS" "$STREAMS" "$SMALL_BYTES")
        RESULT[$server,h2c,$round]=$(run_h2load "http://127.0.0.1:$H2C_PORT/small.bin" "$CONNECTIONS" "$STREAMS" "$SMALL_BYTES")
        RESULT[$server,big,$round]=$(run_h2load "https://127.0.0.1:$H2_PORT/1m.bin" "$BIG_CONNECTIONS" 1 1048576)
        RESULT[$server,bigc,$round]=$(run_h2load "http://127.0.0.1:$H2C_PORT/1m.bin" "$BIG_CONNECTIONS" 1 1048576)
        stop_server
        echo "round $round $server: h2 ${RESULT[$server,h2,$round]} | h2c ${RESULT[$server,h2c,$round]} | 1m h2 ${RESULT[$server,big,$round]} | 1m h2c ${RESULT[$server,bigc,$round]}" >&2
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# The median round by the scenario's main figure (field 1 = req/s, 2 = MB/s).
median() {
    local server=$1 scenario=$2 field=$3
    for round in $(seq "$REPEATS"); do echo "${RESULT[$server,$scenario,$round]}"; done |
        sort -n -k"$field" | sed -n "$(( (REPEATS + 1) / 2 ))p"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "–" }'; }

echo
echo "load average before: $LOAD_BEFORE, after: $LOAD_AFTER ($(nproc --all) CPUs)"
echo
echo "| scenario | nginx (1 worker) | h2o (1 thread) | plexus (1 loop) | plexus / nginx | plexus / h2o |"
echo "|---|---|---|---|---|---|"
for spec in "h2:1:req/s:h2 (TLS 1.3) small file ${SMALL_BYTES} B, -c $CONNECTIONS -m $STREAMS" \
            "h2c:1:req/s:h2c small file ${SMALL_BYTES} B, -c $CONNECTIONS -m $STREAMS" \
            "big:2:MB/s:h2 (TLS 1.3) 1 MiB file, -c $BIG_CONNECTIONS -m 1" \
            "bigc:2:MB/s:h2c 1 MiB file, -c $BIG_CONNECTIONS -m 1"; do
    IFS=: read -r scenario field unit label <<<"$spec"
    declare -A V=() C=()
    for server in nginx h2o plexus; do
        if [[ " $SERVERS " == *" $server "* ]]; then
            m=$(median "$server" "$scenario" "$field")
            V[$server]=$(cut -d' ' -f"$field" <<<"$m"); C[$server]=$(cut -d' ' -f3 <<<"$m")
        else
            V[$server]=0; C[$server]=0
        fi
    done
    printf '| %s | %s %s | %s %s | %s %s | %s | %s |\n' "$label" \
        "${V[nginx]}" "$unit" "${V[h2o]}" "$unit" "${V[plexus]}" "$unit" \
        "$(ratio "${V[plexus]}" "${V[nginx]}")" "$(ratio "${V[plexus]}" "${V[h2o]}")"
    printf '| … server CPU µs/request | %s | %s | %s | %s | %s |\n' \
        "${C[nginx]}" "${C[h2o]}" "${C[plexus]}" \
        "$(ratio "${C[plexus]}" "${C[nginx]}")" "$(ratio "${C[plexus]}" "${C[h2o]}")"
done
echo
echo "raw h2load output: $RAW"
