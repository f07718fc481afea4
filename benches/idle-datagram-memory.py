#!/usr/bin/env python3
"""RSS growth per datagram session (udp or dtls) of plexus, one event loop.

Starts plexus on 127.0.0.1 (one udp or dtls echo listener plus an http listener for /metrics,
idle_timeout 600 s), opens W warm-up sessions, reads the server's RSS, opens N more and reads
it again once /metrics shows every session open: (RSS after - RSS before) / N.

udp: N Python sockets (spread over 127.0.0.x sources), each sends one datagram and gets its
echo, then stays silent. dtls: `plexus bench dtls-echo --connections N --rate 10` holds N
DTLS 1.2 sessions (one handshake each, then 10 records/s in total over all of them), measured
while the bench runs.

Usage: benches/idle-datagram-memory.py udp|dtls [N=1000] [--plexus PATH] [--warmup W=100]
PATH defaults to <repo>/target/release/plexus.
"""
import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sessions_open(http, transport):
    body = urllib.request.urlopen(f"http://{http}/metrics", timeout=10).read().decode()
    m = re.search(r'plexus_datagram_sessions_open\{transport="%s"\} (\d+)' % transport, body)
    return int(m.group(1)) if m else 0


def wait_sessions(http, transport, n, timeout=300):
    deadline = time.time() + timeout
    while sessions_open(http, transport) < n:
        if time.time() > deadline:
            raise RuntimeError(f"only {sessions_open(http, transport)} of {n} sessions open")
        time.sleep(0.2)


def udp_peers(addr, first, n):
    host, port = addr.rsplit(":", 1)
    peers = []
    for i in range(first, first + n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        s.settimeout(5)
        s.sendto(b"x" * 64, (host, int(port)))
        s.recvfrom(2048)
        peers.append(s)
    return peers


def dtls_sessions(plexus, addr, n, hold):
    return subprocess.Popen(
        [plexus, "bench", "dtls-echo", "--addr", addr, "--insecure", "--connections", str(n),
         "--threads", "2", "--rate", "10", "--warmup", "0s", "--duration", f"{hold}s",
         "--timeout", "5s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["udp", "dtls"])
    parser.add_argument("n", nargs="?", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--plexus", default=os.path.join(REPO, "target/release/plexus"))
    args = parser.parse_args()
    transport = args.transport
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "plexus.toml")
        with open(cfg, "w") as f:
            f.write('[server]\nevent_loops = 1\nworkers = 1\nidle_timeout = "600s"\n'
                    'max_connections = 100000\nmax_datagram_sessions = 50000\n'
                    'max_datagram_sessions_per_ip = 0\nmax_handshakes = 100000\n\n'
                    f'[[listener]]\nname = "dgram"\ntransport = "{transport}"\n'
                    'addr = "127.0.0.1:0"\nservice = "echo"\n\n'
                    '[[listener]]\nname = "http"\ntransport = "tcp"\n'
                    'addr = "127.0.0.1:0"\nservice = "http"\n')
        server = subprocess.Popen([args.plexus, "serve", "--config", cfg],
                                  stderr=subprocess.PIPE, text=True)
        addrs = {}
        for line in server.stderr:
            m = re.search(r"listening name=(\S+) transport=\S+ addr=(\S+)", line)
            if m:
                addrs[m.group(1)] = m.group(2)
            if len(addrs) == 2:
                break
        try:
            held = []
            if transport == "udp":
                held += udp_peers(addrs["dgram"], 0, args.warmup)
            else:
                held.append(dtls_sessions(args.plexus, addrs["dgram"], args.warmup, 600))
            wait_sessions(addrs["http"], transport, args.warmup)
            time.sleep(1)
            before = rss_kib(server.pid)
            if transport == "udp":
                held += udp_peers(addrs["dgram"], args.warmup, args.n)
            else:
                held.append(dtls_sessions(args.plexus, addrs["dgram"], args.n, 600))
            wait_sessions(addrs["http"], transport, args.warmup + args.n)
            time.sleep(1)
            after = rss_kib(server.pid)
            per = (after - before) * 1024 / args.n
            print(f"{transport}: {args.n} sessions: RSS {before} KiB -> {after} KiB: "
                  f"{per:,.0f} B per session")
        finally:
            for h in held:
                if isinstance(h, subprocess.Popen):
                    h.kill()
                    h.wait()
                else:
                    h.close()
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
