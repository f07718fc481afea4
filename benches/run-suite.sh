#!/usr/bin/env bash
# The side-by-side benchmark suite: every scenario against plexus and a well-known reference,
# in one run, server pinned to CPU 0 and load (`plexus bench`) pinned to CPU 1.
#
#   scenario                 plexus listener         reference
#   tcp-echo 64 B            tcp echo                tokio-echo (and mio-echo, monoio-echo)
#   tcp-echo at half load    tcp echo (open loop)    tokio-echo (same rate)
#   tls-echo 64 B            tls echo                tokio-rustls-echo
#   connect-rate tcp         tcp echo                tokio-echo, mio-echo
#   connect-rate tls full    tls echo                tokio-rustls-echo
#   connect-rate tls resumed tls echo                tokio-rustls-echo
#   udp-echo 64 B            udp echo                tokio-udp-echo, and plexus with udp_offload = false
#                            (GSO/GRO off), also at UDP_PIPELINE datagrams in flight per socket
#   udp sockets (udpsock)    udp-sockets-echo --threads 2: one SO_REUSEPORT socket per thread
#                            (the plexus column) vs one shared socket (the reference column)
#   dtls-echo 64 B           dtls echo               openssl-dtls-echo (benches/, openssl crate)
#   http small / 1 MiB       http (keep-alive GET)   nginx, worker_processes 1; h2o, num-threads 1
#   https small              https                   nginx, worker_processes 1
#   idle TCP / TLS sessions  RSS growth per session  tokio-echo / tokio-rustls-echo
#   forward (not default)    tcp forward listener    haproxy `mode tcp`, nbthread 1; both relay to
#                            one mio-echo upstream (on the server CPU too): connect-rate through
#                            the relay, 64 B and 16 KiB echoes through it. CPU µs/op is the
#                            relay's own (the upstream's CPU is not counted on either side).
#
# Rows whose plexus side does not exist in this build (checked with `plexus serve --check`)
# print "n/a" and the reason. nginx and h2o are installed from the distribution's packages when
# missing (as root; otherwise their rows are n/a). monoio-echo (the io_uring anchor) is
# probed first (`monoio-echo --probe`); a kernel that refuses io_uring makes its row n/a with
# the reason.
#
# Output: a Markdown table on stdout; every raw JSON line (with "server", "scenario" and the
# server's CPU per operation added) in benches/results/suite-<UTC date>.jsonl, each run's
# latency histogram in benches/results/suite-<UTC date>-hgrm/<scenario>--<server>.hgrm
# (`plexus bench --hdr-out`), and SVG charts of both (benches/plot-suite.py) in
# benches/results/suite-<UTC date>-charts/; server logs in the temporary directory (kept
# with KEEP_WORK=1).
#
# Server CPU per operation: utime+stime of the server process and its children (nginx's
# worker) read from /proc between the end of the warm-up and the end of the measured window,
# divided by the operations of that window (throughput x DURATION). Every row shows it for
# both servers and their ratio plexus / reference (below 1 = plexus spends less CPU per
# operation); every JSON line carries the 1-minute load average at its end ("loadavg1").
#
# Env:  DURATION=5 WARMUP=1      seconds per measured run / warm-up
#       CONNECTIONS=100 SIZE=64  echo scenarios
#       HS_CONNECTIONS=16        concurrent connect-rate slots
#       HTTP_CONNECTIONS=50      http scenarios
#       IDLE_N=10000             sessions for the idle footprint (0 = skip)
#       UDP_PIPELINE=16          udp: the second on/off pair's datagrams in flight per socket
#                                (runs of replies to one peer are what GSO can coalesce)
#       SCENARIOS="tcp half tls connect udp dtls http idle"   which groups, in this order
#                                (udpsock: the socket-topology pair, and forward: plexus
#                                forward vs haproxy, are not in the default list)
#       BACKENDS=epoll           the plexus side of every row runs once per backend listed
#                                (`BACKENDS="epoll io_uring"`: both in one run, each row twice,
#                                its label tagged [epoll] / [io_uring]; the reference runs once)
#       SKIP_BUILD=1             use the existing release binaries
#       PLEXUS_BIN=path          default <repo>/target/release/plexus
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_DIR=$(dirname "$BENCH_DIR")
BIN_DIR="$BENCH_DIR/target/release"
PLEXUS_BIN=${PLEXUS_BIN:-$MAIN_DIR/target/release/plexus}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-100}
SIZE=${SIZE:-64}
HS_CONNECTIONS=${HS_CONNECTIONS:-16}
HTTP_CONNECTIONS=${HTTP_CONNECTIONS:-50}
IDLE_N=${IDLE_N:-10000}
SCENARIOS=${SCENARIOS:-tcp half tls connect udp dtls http idle}
UDP_PIPELINE=${UDP_PIPELINE:-16}
BACKENDS=${BACKENDS:-epoll}
for backend in $BACKENDS; do
    case $backend in
    epoll | io_uring) ;;
    *) echo "error: unknown backend '$backend' in BACKENDS (epoll io_uring)" >&2; exit 2 ;;
    esac
done
SERVER_CPU=0
LOAD_CPU=1

for v in DURATION WARMUP CONNECTIONS SIZE HS_CONNECTIONS HTTP_CONNECTIONS IDLE_N UDP_PIPELINE; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
        echo "error: $v must be a non-negative integer (got '${!v}')" >&2
        exit 2
    fi
done
command -v taskset >/dev/null || { echo "error: taskset not found (util-linux)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "error: python3 not found (reads the JSON lines)" >&2; exit 2; }
if [[ $(nproc --all) -lt 2 ]]; then
    echo "error: need at least 2 CPUs (server on $SERVER_CPU, load on $LOAD_CPU)" >&2
    exit 2
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RESULTS="$RESULTS_DIR/suite-$STAMP.jsonl"
HGRM_DIR="$RESULTS_DIR/suite-$STAMP-hgrm"
mkdir -p "$RESULTS_DIR" "$HGRM_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/plexus-suite.XXXXXX")
SERVER_PID=""
ROWS=()
T0=$(date +%s)
read -r LOAD_START _ </proc/loadavg

log() { echo "[suite $(($(date +%s) - T0))s] $*" >&2; }

stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

UPSTREAM_PID=""
stop_upstream() {
    if [[ -n $UPSTREAM_PID ]]; then
        kill -TERM "$UPSTREAM_PID" 2>/dev/null || true
        wait "$UPSTREAM_PID" 2>/dev/null || true
    fi
    UPSTREAM_PID=""
}

cleanup() {
    stop_server
    stop_upstream
    if [[ ${KEEP_WORK:-0} == 1 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build -----------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building plexus (release)"
    (cd "$MAIN_DIR" && env -u CARGO_TARGET_DIR timeout 1200 cargo build --release --locked -p plexus-cli --quiet)
    log "building the reference servers (benches/, release)"
    (cd "$BENCH_DIR" && env -u CARGO_TARGET_DIR timeout 1200 cargo build --release --locked --quiet)
fi
[[ -x $PLEXUS_BIN ]] || { echo "error: $PLEXUS_BIN not found" >&2; exit 1; }
# The reference servers the chosen scenario groups run (http's reference is nginx).
declare -A REFERENCES=([tcp]="tokio-echo mio-echo monoio-echo" [half]=tokio-echo [tls]=tokio-rustls-echo
    [connect]="tokio-echo mio-echo tokio-rustls-echo" [udp]=tokio-udp-echo [dtls]=openssl-dtls-echo
    [udpsock]=udp-sockets-echo [forward]=mio-echo
    [http]="" [idle]="tokio-echo tokio-rustls-echo")
for group in $SCENARIOS; do
    for b in ${REFERENCES[$group]:-}; do
        [[ -x $BIN_DIR/$b ]] || { echo "error: $BIN_DIR/$b not found (build benches/)" >&2; exit 1; }
    done
done

# --- nginx -----------------------------------------------------------------------------------
NGINX=""
NGINX_WHY=""
if [[ " $SCENARIOS " == *" http "* ]]; then
    if ! command -v nginx >/dev/null && [[ -x /usr/sbin/nginx ]]; then PATH=$PATH:/usr/sbin; fi
    if ! command -v nginx >/dev/null; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "installing nginx (apt-get install nginx-light / nginx)"
            # Keep the package's service from starting on port 80 during installation.
            policy_made=0
            if [[ ! -e /usr/sbin/policy-rc.d ]]; then
                printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
                chmod +x /usr/sbin/policy-rc.d
                policy_made=1
            fi
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light; } \
                >"$WORK/apt.log" 2>&1 ||
                apt-get install -y -qq --no-install-recommends nginx >>"$WORK/apt.log" 2>&1 || true
            [[ $policy_made == 1 ]] && rm -f /usr/sbin/policy-rc.d
        fi
        command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] && PATH=$PATH:/usr/sbin
    fi
    if command -v nginx >/dev/null; then
        NGINX=$(command -v nginx)
    else
        NGINX_WHY="nginx not installed (needs root and apt-get; see $WORK/apt.log)"
    fi
fi

H2O=""
H2O_WHY=""
if [[ " $SCENARIOS " == *" http "* ]]; then
    if ! command -v h2o >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing h2o (apt-get install h2o)"
        policy_made=0
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            policy_made=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends h2o \
            >>"$WORK/apt.log" 2>&1 || true
        [[ $policy_made == 1 ]] && rm -f /usr/sbin/policy-rc.d
    fi
    if command -v h2o >/dev/null; then
        H2O=$(command -v h2o)
    else
        H2O_WHY="h2o not installed (needs root and apt-get; see $WORK/apt.log)"
    fi
fi

HAPROXY=""
HAPROXY_WHY=""
if [[ " $SCENARIOS " == *" forward "* ]]; then
    if ! command -v haproxy >/dev/null && [[ -x /usr/sbin/haproxy ]]; then PATH=$PATH:/usr/sbin; fi
    if ! command -v haproxy >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing haproxy (apt-get install haproxy)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy \
            >>"$WORK/apt.log" 2>&1 || true
    fi
    if command -v haproxy >/dev/null; then
        HAPROXY=$(command -v haproxy)
    else
        HAPROXY_WHY="haproxy not installed (needs root and apt-get; see $WORK/apt.log)"
    fi
fi

# The io_uring anchor: does this kernel let monoio set up a ring?
MONOIO_WHY=""
if [[ " $SCENARIOS " == *" tcp "* ]] && ! MONOIO_WHY=$("$BIN_DIR/monoio-echo" --probe 2>&1); then
    log "monoio-echo: $MONOIO_WHY (its row is n/a)"
else
    MONOIO_WHY=""
fi

# --- certificate, static files, capabilities --------------------------------------------------
"$PLEXUS_BIN" cert --out "$WORK" >/dev/null 2>&1
CERT="$WORK/cert.pem"
KEY="$WORK/key.pem"
WWW="$WORK/www"
mkdir -p "$WWW"
head -c 1024 /dev/urandom | base64 -w 76 | head -c 1024 >"$WWW/small.html"
head -c 1048576 /dev/urandom >"$WWW/1mib.bin"
# nginx workers run as an unprivileged user: the static root must be readable.
chmod 755 "$WORK" "$WWW"
chmod 644 "$WWW"/*

# supports TRANSPORT SERVICE [EXTRA]: does this plexus accept such a listener?
supports() {
    printf '%s\n[[listener]]\nname = "probe"\ntransport = "%s"\naddr = "127.0.0.1:0"\nservice = "%s"\n' \
        "${3:-}" "$1" "$2" >"$WORK/probe.toml"
    "$PLEXUS_BIN" serve --check --config "$WORK/probe.toml" >/dev/null 2>&1
}
HAS_UDP=0; supports udp echo && HAS_UDP=1
HAS_DTLS=0; supports dtls echo && HAS_DTLS=1
# udp_offload (GSO/GRO switch) is a listener key: probed with a listener of its own.
HAS_OFFLOAD=0
printf '[[listener]]\nname = "probe"\ntransport = "udp"\naddr = "127.0.0.1:0"\nservice = "echo"\nudp_offload = false\n' \
    >"$WORK/probe-offload.toml"
"$PLEXUS_BIN" serve --check --config "$WORK/probe-offload.toml" >/dev/null 2>&1 && HAS_OFFLOAD=1
HAS_HTTP=0; supports tcp http "[http]
root = \"$WWW\"" && HAS_HTTP=1
log "plexus: udp=$HAS_UDP (udp_offload key: $HAS_OFFLOAD) dtls=$HAS_DTLS http=$HAS_HTTP; nginx: ${NGINX:-none}; h2o: ${H2O:-none}"

{
    echo "[server]"
    echo "event_loops = 1"
    echo "max_connections = 30000"
    echo "max_handshakes = 100000"
    # One source address for every load socket: no per-IP datagram cap (default 256).
    echo "max_datagram_sessions_per_ip = 0"
    echo "idle_timeout = \"600s\""
    echo
    echo "[tls]"
    echo "cert = \"$CERT\""
    echo "key = \"$KEY\""
    if [[ $HAS_HTTP == 1 ]]; then
        echo
        echo "[http]"
        echo "root = \"$WWW\""
    fi
    listener() { printf '\n[[listener]]\nname = "%s"\ntransport = "%s"\naddr = "127.0.0.1:0"\nservice = "%s"\n' "$@"; }
    listener tcp-echo tcp echo
    listener tls-echo tls echo
    [[ $HAS_UDP == 1 ]] && listener udp-echo udp echo
    if [[ $HAS_OFFLOAD == 1 ]]; then
        listener udp-plain udp echo
        echo "udp_offload = false"
    fi
    [[ $HAS_DTLS == 1 ]] && listener dtls-echo dtls echo
    if [[ $HAS_HTTP == 1 ]]; then
        listener http tcp http
        listener https tls http
    fi
} >"$WORK/plexus.toml"

# --- servers ---------------------------------------------------------------------------------
declare -A ADDR

# start_server NAME CMD...: pinned to SERVER_CPU; waits for its "listening ... addr=" lines and
# fills ADDR[listener name] (references have one unnamed listener: ADDR[main]).
start_server() {
    local name=$1
    shift
    local logf="$WORK/$name.log"
    NO_COLOR=1 taskset -c "$SERVER_CPU" "$@" >"$logf" 2>&1 &
    SERVER_PID=$!
    ADDR=()
    local want=1
    [[ $name == plexus ]] && want=$(grep -c '^\[\[listener\]\]' "$WORK/plexus.toml")
    for _ in $(seq 150); do
        local n
        n=$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -c 'listening.*addr=' || true)
        [[ $n -ge $want ]] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$name exited before listening:"; sed 's/^/    /' "$logf" >&2
            SERVER_PID=""; return 0
        fi
        sleep 0.1
    done
    while read -r line; do
        local lname addr
        addr=$(sed -n 's/.*addr=\([^ ]*\).*/\1/p' <<<"$line")
        lname=$(sed -n 's/.*name=\([^ ]*\).*/\1/p' <<<"$line")
        ADDR[${lname:-main}]=$addr
    done < <(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep 'listening.*addr=')
    [[ ${#ADDR[@]} -gt 0 ]] || log "$name: no listening line (its rows will be empty)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_nginx() {
    local port tport
    port=$(free_port); tport=$(free_port)
    mkdir -p "$WORK/nginx/logs"
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 16000; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 65;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    server {
        listen 127.0.0.1:$port;
        listen 127.0.0.1:$tport ssl;
        root $WWW;
    }
}
EOF
    NO_COLOR=1 taskset -c "$SERVER_CPU" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
        >"$WORK/nginx.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            ADDR=([http]="127.0.0.1:$port" [https]="127.0.0.1:$tport")
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "nginx did not start:"; sed 's/^/    /' "$WORK/nginx.log" "$WORK/nginx/logs/error.log" >&2 || true
    SERVER_PID=""
    return 1
}

# h2o (Debian's 2.2.5): one worker thread, plain http only, the same static root; runs as root
# (`user: root`) so its logs can live in the work directory.
start_h2o() {
    local port
    port=$(free_port)
    mkdir -p "$WORK/h2o"
    cat >"$WORK/h2o/h2o.conf" <<EOF
num-threads: 1
max-connections: 16000
user: root
error-log: $WORK/h2o/error.log
listen:
  host: 127.0.0.1
  port: $port
hosts:
  default:
    paths:
      /:
        file.dir: $WWW
EOF
    NO_COLOR=1 taskset -c "$SERVER_CPU" "$H2O" -c "$WORK/h2o/h2o.conf" >"$WORK/h2o.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            ADDR=([http]="127.0.0.1:$port")
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "h2o did not start:"; sed 's/^/    /' "$WORK/h2o.log" "$WORK/h2o/error.log" >&2 || true
    SERVER_PID=""
    return 1
}

# start_haproxy UPSTREAM: haproxy (Debian's 2.6) as a plain TCP relay, one thread, to UPSTREAM.
# maxconn 9000: haproxy raises its fd limit to 2 x maxconn + a margin, and the hard limit here is 20000.
start_haproxy() {
    local port
    port=$(free_port)
    mkdir -p "$WORK/haproxy"
    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend relay
    bind 127.0.0.1:$port
    default_backend upstream
backend upstream
    server echo $1
EOF
    NO_COLOR=1 taskset -c "$SERVER_CPU" "$HAPROXY" -db -f "$WORK/haproxy/haproxy.cfg" \
        >"$WORK/haproxy.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            ADDR=([relay]="127.0.0.1:$port")
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "haproxy did not start:"; sed 's/^/    /' "$WORK/haproxy.log" >&2 || true
    SERVER_PID=""
    return 1
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

# bench SERVER SCENARIO ARGS...: runs `plexus bench` pinned to LOAD_CPU (its latency histogram
# to HGRM_DIR) while sampling the server's CPU time over the measured window; prints its JSON
# line (also appended to RESULTS with server, scenario and server CPU), or nothing on failure.
bench() {
    local server=$1 scenario=$2
    shift 2
    local out errf="$WORK/bench-$scenario-$server.log" outf="$WORK/bench-$scenario-$server.out"
    taskset -c "$LOAD_CPU" "$PLEXUS_BIN" bench "$@" --hdr-out "$HGRM_DIR/$scenario--$server.hgrm" \
        >"$outf" 2>"$errf" &
    local bench_pid=$! cpu0="" cpu1=""
    if [[ -n $SERVER_PID && $scenario != idle-* ]]; then
        sleep "$WARMUP"
        cpu0=$(cpu_ticks "$SERVER_PID")
        sleep "$DURATION"
        cpu1=$(cpu_ticks "$SERVER_PID")
    fi
    wait "$bench_pid" || true
    cat "$errf" >>"$WORK/bench.log"
    out=$(tail -n1 "$outf")
    if [[ $out != \{* ]]; then
        log "  $scenario / $server: no result; the end of its stderr:"
        grep -v '^\[ *[0-9]*s\]' "$errf" | tail -n 5 | sed 's/^/    /' >&2
        return 0
    fi
    local load1 line
    read -r load1 _ </proc/loadavg
    line=$(python3 -c 'import json,sys
d=json.loads(sys.argv[1]); d["server"]=sys.argv[2]; d["scenario"]=sys.argv[3]
c0, c1, tck, secs = sys.argv[4], sys.argv[5], float(sys.argv[6]), float(sys.argv[7])
d["loadavg1"] = float(sys.argv[8])
ops = float(d.get("throughput_per_s") or 0) * secs
if c0 and c1 and ops > 0:
    d["server_cpu_us_per_op"] = round((int(c1) - int(c0)) * 1e6 / tck / ops, 3)
print(json.dumps(d))' "$out" "$server" "$scenario" "$cpu0" "$cpu1" "$CLK_TCK" "$DURATION" "$load1")
    echo "$line" >>"$RESULTS"
    echo "$line"
}

# field JSON PATH: a value from a JSON line ("a.b" paths); empty when absent or null.
field() {
    python3 -c 'import json,sys
d=json.loads(sys.argv[1]) if sys.argv[1] else {}
for k in sys.argv[2].split("."):
    d = d.get(k) if isinstance(d, dict) else None
print("" if d is None else d)' "${1:-}" "$2"
}

# row SCENARIO BETTER PLEXUS_JSON REF_NAME REF_JSON VALUE_PATH [NOTE]
row() {
    local scenario=$1 better=$2 pj=$3 rname=$4 rj=$5 path=$6 note=${7:-}
    local pv rv ratio pp rp pc rc cratio pl rl
    pv=$(field "$pj" "$path"); rv=$(field "$rj" "$path")
    pp=$(field "$pj" latency_us.p99); rp=$(field "$rj" latency_us.p99)
    pc=$(field "$pj" server_cpu_us_per_op); rc=$(field "$rj" server_cpu_us_per_op)
    pl=$(field "$pj" loadavg1); rl=$(field "$rj" loadavg1)
    cratio=$(python3 -c 'import sys
try: print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))
except Exception: print("n/a")' "$pc" "$rc")
    ratio=$(python3 -c 'import sys
p,r,b=sys.argv[1],sys.argv[2],sys.argv[3]
try:
    p,r=float(p),float(r)
    print("%.2fx" % ((p/r) if b=="higher" else (r/p)))
except Exception:
    print("n/a")' "$pv" "$rv" "$better")
    fmt() { python3 -c 'import sys
v=sys.argv[1]
try: print("{:,.0f}".format(float(v)))
except Exception: print(v if v else "n/a")' "$1"; }
    local pshow rshow
    pshow=$(fmt "$pv"); rshow=$(fmt "$rv")
    [[ -n $note && -z $pv ]] && pshow="n/a ($note)"
    ROWS+=("| $scenario | $pshow | $rshow ($rname) | $ratio | ${pp:-–} | ${rp:-–} | ${pc:-n/a} | ${rc:-n/a} | $cratio | ${pl:-–} / ${rl:-–} |")
    log "  => $scenario: plexus ${pv:-n/a} vs $rname ${rv:-n/a} ($ratio); CPU µs/op ${pc:-n/a} vs ${rc:-n/a}"
}

# The plexus results of the current scenario, by "KEY/BACKEND".
declare -A PJ

# plexus_run KEY NAME CONFIG LISTENER SCENARIO MODE ARGS...: the plexus side of SCENARIO, once
# per backend in BACKENDS (the server reads PLEXUS_BACKEND as the default of `[server] backend`):
# starts the server on CONFIG, runs `plexus bench MODE --addr <LISTENER's address> ARGS...`
# (an argument `@SERVER_PID@` becomes the server's PID) and keeps its JSON line in
# PJ[KEY/backend]. NAME is the server's name in the JSON lines ("-io_uring" added on io_uring).
plexus_run() {
    local key=$1 name=$2 config=$3 listener=$4 scenario=$5 mode=$6
    shift 6
    local backend arg args
    for backend in $BACKENDS; do
        PJ["$key/$backend"]=""
        export PLEXUS_BACKEND=$backend
        start_server "$name" "$PLEXUS_BIN" serve --config "$config"
        args=()
        for arg in "$@"; do
            [[ $arg == @SERVER_PID@ ]] && arg=$SERVER_PID
            args+=("$arg")
        done
        local server=$name
        [[ $backend == epoll ]] || server="$name-$backend"
        [[ $server == plexus-forward ]] && server=plexus
        [[ $server == plexus-forward-* ]] && server=plexus-${server#plexus-forward-}
        PJ["$key/$backend"]=$(bench "$server" "$scenario" "$mode" --addr "${ADDR[$listener]:-}" "${args[@]}")
        stop_server
        unset PLEXUS_BACKEND
    done
}

# prow LABEL BETTER KEY REF_NAME REF_JSON VALUE_PATH [NOTE]: `row` for each backend's result
# (PJ[KEY/backend]); the label is tagged with the backend unless BACKENDS is just epoll.
prow() {
    local label=$1 better=$2 key=$3
    shift 3
    local backend tag
    for backend in $BACKENDS; do
        tag=""; [[ $BACKENDS == epoll ]] || tag=" [$backend]"
        row "$label$tag" "$better" "${PJ[$key/$backend]:-}" "$@"
    done
}

# first_plexus KEY: the first backend's result (for the rates later scenarios derive).
first_plexus() { local b; for b in $BACKENDS; do echo "${PJ[$1/$b]:-}"; return; done; }

ECHO_ARGS=(--duration "${DURATION}s" --warmup "${WARMUP}s")

# --- scenarios -------------------------------------------------------------------------------
TCP_RATE=""
for group in $SCENARIOS; do
    case $group in
    tcp)
        log "tcp-echo ${SIZE} B x $CONNECTIONS connections"
        plexus_run p plexus "$WORK/plexus.toml" tcp-echo tcp-echo tcp-echo --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}"
        start_server tokio "$BIN_DIR/tokio-echo" --addr 127.0.0.1:0
        t=$(bench tokio tcp-echo tcp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
        stop_server
        start_server mio "$BIN_DIR/mio-echo" --addr 127.0.0.1:0
        m=$(bench mio tcp-echo tcp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
        stop_server
        u=""
        if [[ -z $MONOIO_WHY ]]; then
            start_server monoio "$BIN_DIR/monoio-echo" --addr 127.0.0.1:0
            u=$(bench monoio tcp-echo tcp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
            stop_server
        fi
        prow "tcp-echo $SIZE B, $CONNECTIONS conns (msgs/s)" higher p tokio-echo "$t" throughput_per_s
        prow "tcp-echo $SIZE B, $CONNECTIONS conns (msgs/s)" higher p mio-echo "$m" throughput_per_s
        prow "tcp-echo $SIZE B, $CONNECTIONS conns (msgs/s)" higher p "monoio-echo, io_uring${MONOIO_WHY:+: $MONOIO_WHY}" "$u" throughput_per_s
        TCP_RATE=$(field "$t" throughput_per_s)
        ;;
    half)
        # Half of tokio's closed-loop throughput (or a fixed 20k/s if tcp did not run), open
        # loop, the same rate for both: the latency comparison DESIGN.md asks for.
        rate=$(python3 -c 'import sys; v=sys.argv[1]; print(int(float(v)/2) if v else 20000)' "$TCP_RATE")
        log "tcp-echo open loop at $rate msgs/s"
        plexus_run p plexus "$WORK/plexus.toml" tcp-echo tcp-half tcp-echo --connections "$CONNECTIONS" --size "$SIZE" --rate "$rate" "${ECHO_ARGS[@]}"
        start_server tokio "$BIN_DIR/tokio-echo" --addr 127.0.0.1:0
        t=$(bench tokio tcp-half tcp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" --rate "$rate" "${ECHO_ARGS[@]}")
        stop_server
        prow "tcp-echo open loop $rate/s (p99 µs)" lower p tokio-echo "$t" latency_us.p99
        ;;
    tls)
        log "tls-echo ${SIZE} B x $CONNECTIONS connections"
        plexus_run p plexus "$WORK/plexus.toml" tls-echo tls-echo tls-echo --ca "$CERT" --sni localhost --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}"
        start_server tokio-rustls "$BIN_DIR/tokio-rustls-echo" --addr 127.0.0.1:0 --cert "$CERT" --key "$KEY"
        t=$(bench tokio-rustls tls-echo tls-echo --addr "${ADDR[main]:-}" --ca "$CERT" --sni localhost --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
        stop_server
        prow "tls-echo $SIZE B, $CONNECTIONS conns (msgs/s)" higher p tokio-rustls "$t" throughput_per_s
        ;;
    connect)
        for kind in tcp full resumed; do
            log "connect-rate $kind"
            case $kind in
            tcp) extra=() ;;
            full) extra=(--tls --ca "$CERT" --sni localhost) ;;
            resumed) extra=(--tls --resume --ca "$CERT" --sni localhost) ;;
            esac
            listener=tcp-echo; [[ $kind != tcp ]] && listener=tls-echo
            plexus_run p plexus "$WORK/plexus.toml" "$listener" "connect-$kind" connect-rate --connections "$HS_CONNECTIONS" "${extra[@]}" "${ECHO_ARGS[@]}"
            if [[ $kind == tcp ]]; then
                rname=tokio-echo
                start_server tokio "$BIN_DIR/tokio-echo" --addr 127.0.0.1:0
            else
                rname=tokio-rustls
                start_server tokio-rustls "$BIN_DIR/tokio-rustls-echo" --addr 127.0.0.1:0 --cert "$CERT" --key "$KEY"
            fi
            t=$(bench "$rname" "connect-$kind" connect-rate --addr "${ADDR[main]:-}" --connections "$HS_CONNECTIONS" "${extra[@]}" "${ECHO_ARGS[@]}")
            stop_server
            prow "connect-rate $kind (per s)" higher p "$rname" "$t" throughput_per_s
            if [[ $kind == tcp ]]; then
                # The hand-written mio loop: the floor issue 17 measures new connections against.
                start_server mio "$BIN_DIR/mio-echo" --addr 127.0.0.1:0
                m=$(bench mio connect-tcp connect-rate --addr "${ADDR[main]:-}" --connections "$HS_CONNECTIONS" "${ECHO_ARGS[@]}")
                stop_server
                prow "connect-rate tcp (per s)" higher p mio-echo "$m" throughput_per_s
            fi
        done
        ;;
    udp)
        for depth in 1 "$UDP_PIPELINE"; do
            log "udp-echo ${SIZE} B x $CONNECTIONS sockets, pipeline $depth"
            pipe=(--pipeline "$depth")
            PJ=()
            if [[ $HAS_UDP == 1 ]]; then
                plexus_run p plexus "$WORK/plexus.toml" udp-echo "udp-echo-p$depth" udp-echo --connections "$CONNECTIONS" --size "$SIZE" "${pipe[@]}" "${ECHO_ARGS[@]}"
            fi
            q=""
            if [[ $HAS_OFFLOAD == 1 ]]; then
                # The offload pair compares like with like: the first backend only.
                start_server plexus "$PLEXUS_BIN" serve --config "$WORK/plexus.toml"
                q=$(bench plexus-no-offload "udp-echo-p$depth" udp-echo --addr "${ADDR[udp-plain]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${pipe[@]}" "${ECHO_ARGS[@]}")
                stop_server
            fi
            start_server tokio-udp "$BIN_DIR/tokio-udp-echo" --addr 127.0.0.1:0
            t=$(bench tokio-udp "udp-echo-p$depth" udp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${pipe[@]}" "${ECHO_ARGS[@]}")
            stop_server
            label="udp-echo $SIZE B, $CONNECTIONS sockets, pipeline $depth (msgs/s)"
            prow "$label" higher p tokio-udp-echo "$t" throughput_per_s "no udp transport in this build"
            row "$label" higher "$(first_plexus p)" "plexus udp_offload = false" "$q" throughput_per_s "no udp transport in this build"
            [[ $UDP_PIPELINE == 1 ]] && break
        done
        ;;
    udpsock)
        # Socket topology for two loops on one core: what each costs per datagram.
        for mode in reuseport shared; do
            log "udp-sockets-echo --threads 2 --mode $mode"
            start_server "udp-$mode" "$BIN_DIR/udp-sockets-echo" --addr 127.0.0.1:0 --threads 2 --mode "$mode"
            r=$(bench "udp-sockets-$mode" udp-sockets udp-echo --addr "${ADDR[main]:-}" --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
            stop_server
            [[ $mode == reuseport ]] && rp=$r || rs=$r
        done
        row "udp-sockets-echo, 2 threads: SO_REUSEPORT socket each (plexus column) vs shared (msgs/s)" higher "$rp" "one shared socket" "$rs" throughput_per_s
        ;;
    dtls)
        log "dtls-echo ${SIZE} B x $CONNECTIONS sessions"
        PJ=()
        if [[ $HAS_DTLS == 1 ]]; then
            plexus_run p plexus "$WORK/plexus.toml" dtls-echo dtls-echo dtls-echo --ca "$CERT" --sni localhost --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}"
        fi
        start_server openssl-dtls "$BIN_DIR/openssl-dtls-echo" --addr 127.0.0.1:0 --cert "$CERT" --key "$KEY"
        t=$(bench openssl-dtls dtls-echo dtls-echo --addr "${ADDR[main]:-}" --ca "$CERT" --sni localhost --connections "$CONNECTIONS" --size "$SIZE" "${ECHO_ARGS[@]}")
        stop_server
        prow "dtls-echo $SIZE B, $CONNECTIONS sessions (msgs/s)" higher p openssl-dtls-echo "$t" throughput_per_s "no dtls transport in this build"
        ;;
    http)
        for kind in small 1mib https; do
            path=/small.html; [[ $kind == 1mib ]] && path=/1mib.bin
            listener=http; tls=(); [[ $kind == https ]] && { listener=https; tls=(--tls --ca "$CERT" --sni localhost); }
            label="http $kind keep-alive (req/s)"
            [[ $kind == small ]] && label="http 1 KiB file keep-alive (req/s)"
            [[ $kind == 1mib ]] && label="http 1 MiB file keep-alive (req/s)"
            [[ $kind == https ]] && label="https 1 KiB file keep-alive (req/s)"
            log "$label"
            PJ=()
            if [[ $HAS_HTTP == 1 ]]; then
                plexus_run p plexus "$WORK/plexus.toml" "$listener" "http-$kind" http --path "$path" --connections "$HTTP_CONNECTIONS" "${tls[@]}" "${ECHO_ARGS[@]}"
            fi
            t=""
            if [[ -n $NGINX ]] && start_nginx; then
                t=$(bench nginx "http-$kind" http --addr "${ADDR[$listener]:-}" --path "$path" --connections "$HTTP_CONNECTIONS" "${tls[@]}" "${ECHO_ARGS[@]}")
                stop_server
            fi
            prow "$label" higher p "nginx${NGINX_WHY:+: $NGINX_WHY}" "$t" throughput_per_s "no http service in this build"
            if [[ $kind != https ]]; then
                h=""
                if [[ -n $H2O ]] && start_h2o; then
                    h=$(bench h2o "http-$kind" http --addr "${ADDR[http]:-}" --path "$path" --connections "$HTTP_CONNECTIONS" "${ECHO_ARGS[@]}")
                    stop_server
                fi
                prow "$label" higher p "h2o${H2O_WHY:+: $H2O_WHY}" "$h" throughput_per_s "no http service in this build"
            fi
        done
        ;;
    idle)
        [[ $IDLE_N -gt 0 ]] || continue
        for kind in tcp tls; do
            log "idle footprint: $IDLE_N $kind sessions"
            listener=tcp-echo; extra=()
            [[ $kind == tls ]] && { listener=tls-echo; extra=(--tls --ca "$CERT" --sni localhost); }
            # Four source addresses: the ports left in TIME_WAIT by connect-rate never matter.
            idle=(idle-flood --connections "$IDLE_N" --echo-first 64 --duration 1s --sources 4 "${extra[@]}")
            plexus_run p plexus "$WORK/plexus.toml" "$listener" "idle-$kind" "${idle[@]}" --server-pid @SERVER_PID@
            if [[ $kind == tcp ]]; then
                rname=tokio-echo
                start_server tokio "$BIN_DIR/tokio-echo" --addr 127.0.0.1:0
            else
                rname=tokio-rustls
                start_server tokio-rustls "$BIN_DIR/tokio-rustls-echo" --addr 127.0.0.1:0 --cert "$CERT" --key "$KEY"
            fi
            t=$(bench "$rname" "idle-$kind" "${idle[@]}" --addr "${ADDR[main]:-}" --server-pid "$SERVER_PID")
            stop_server
            prow "idle $kind session, $IDLE_N open (RSS B/session)" lower p "$rname" "$t" rss_per_session_bytes
        done
        ;;
    forward)
        # One upstream for both relays: mio-echo, started once, on the server CPU.
        start_server upstream "$BIN_DIR/mio-echo" --addr 127.0.0.1:0
        UPSTREAM_PID=$SERVER_PID; SERVER_PID=""
        upstream=${ADDR[main]:-}
        printf '[server]\nevent_loops = 1\nmax_connections = 30000\nidle_timeout = "600s"\n\n[[listener]]\nname = "relay"\ntransport = "tcp"\naddr = "127.0.0.1:0"\nservice = "forward"\nupstream = "%s"\n' \
            "$upstream" >"$WORK/forward.toml"
        for kind in connect echo64 echo16k; do
            case $kind in
            connect) label="forward: connect-rate through the relay (per s)"
                load=(connect-rate --connections "$HS_CONNECTIONS") ;;
            echo64) label="forward: tcp-echo 64 B, $CONNECTIONS conns through the relay (msgs/s)"
                load=(tcp-echo --connections "$CONNECTIONS" --size 64) ;;
            echo16k) label="forward: tcp-echo 16 KiB, 10 conns through the relay (msgs/s)"
                load=(tcp-echo --connections 10 --size 16384) ;;
            esac
            log "$label"
            plexus_run p plexus-forward "$WORK/forward.toml" relay "forward-$kind" "${load[@]}" "${ECHO_ARGS[@]}"
            h=""
            if [[ -n $HAPROXY ]] && start_haproxy "$upstream"; then
                h=$(bench haproxy "forward-$kind" "${load[@]}" --addr "${ADDR[relay]:-}" "${ECHO_ARGS[@]}")
                stop_server
            fi
            prow "$label" higher p "haproxy mode tcp${HAPROXY_WHY:+: $HAPROXY_WHY}" "$h" throughput_per_s
        done
        stop_upstream
        ;;
    *)
        echo "error: unknown scenario group '$group' (tcp half tls connect udp udpsock dtls http idle forward)" >&2
        exit 2
        ;;
    esac
done

echo
echo "Suite run of $(date -u +%Y-%m-%d) on $(nproc --all) CPUs; server on CPU $SERVER_CPU, \`plexus bench\` on CPU $LOAD_CPU; ${DURATION} s measured + ${WARMUP} s warm-up per run."
echo "Ratio: plexus / reference for rates, reference / plexus for latency and memory (above 1 = plexus better)."
echo "CPU µs/op: the server's utime+stime over the measured window ÷ its operations; CPU ratio = plexus / reference (below 1 = plexus cheaper)."
echo "Load: the 1-minute load average at the end of each run (plexus / reference); it was $LOAD_START when the suite started, $(cut -d' ' -f1 /proc/loadavg) at its end."
echo
echo "| scenario | plexus | reference | ratio | plexus p99 µs | reference p99 µs | plexus CPU µs/op | reference CPU µs/op | CPU ratio | load |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Raw JSON: $RESULTS ($(($(date +%s) - T0)) s in total)"
CHARTS="$RESULTS_DIR/suite-$STAMP-charts"
if python3 "$BENCH_DIR/plot-suite.py" "$RESULTS" --hgrm-dir "$HGRM_DIR" --out "$CHARTS" \
    --note "run-suite.sh $(date -u +%Y-%m-%d), $(nproc --all) CPUs, ${DURATION} s per run; server CPU $SERVER_CPU, load CPU $LOAD_CPU" >/dev/null; then
    echo "Charts: $CHARTS/cpu.svg, $CHARTS/latency.svg"
fi
