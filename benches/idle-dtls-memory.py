#!/usr/bin/env python3
"""RSS growth per idle DTLS session of plexus (one event loop, one dtls echo listener).

Starts plexus on 127.0.0.1 (ephemeral certificate, idle_timeout 600 s), warms it with 100
DTLS sessions (dtls-load --mode idle, kept open), then opens N more, each completing a DTLS 1.2
handshake and one 64-byte echo, and reports (RSS after - RSS before) / N. All sessions stay open
(idle) until the measurement is taken.

Usage: benches/idle-dtls-memory.py [N=1000] [--plexus PATH] [--load PATH]
Paths default to <repo>/target/release/plexus and <repo>/benches/target/release/dtls-load.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_sessions(load, addr, n):
    """Starts dtls-load holding n idle sessions; returns the process once they are ready."""
    proc = subprocess.Popen([load, "--addr", addr, "--mode", "idle", "--sessions", str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"dtls-load did not get ready: {line!r}")
    return proc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=1000)
    parser.add_argument("--plexus", default=os.path.join(REPO, "target/release/plexus"))
    parser.add_argument("--load", default=os.path.join(BENCH_DIR, "target/release/dtls-load"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "plexus.toml")
        with open(cfg, "w") as f:
            f.write('[server]\nevent_loops = 1\nworkers = 1\nidle_timeout = "600s"\n'
                    'max_connections = 100000\nmax_datagram_sessions_per_ip = 0\n\n[[listener]]\nname = "dtls-echo"\n'
                    'transport = "dtls"\naddr = "127.0.0.1:0"\nservice = "echo"\n')
        server = subprocess.Popen([args.plexus, "serve", "--config", cfg],
                                  stderr=subprocess.PIPE, text=True)
        addr = None
        for line in server.stderr:
            m = re.search(r"listening name=dtls-echo transport=dtls addr=(\S+)", line)
            if m:
                addr = m.group(1)
                break
        if addr is None:
            sys.exit("plexus did not start")
        try:
            warm = open_sessions(args.load, addr, 100)
            time.sleep(0.5)
            before = rss_kib(server.pid)
            held = open_sessions(args.load, addr, args.n)
            time.sleep(0.5)
            after = rss_kib(server.pid)
            per = (after - before) * 1024 / args.n
            print(f'{{"bench":"idle-dtls-memory","server":"plexus","sessions":{args.n},'
                  f'"rss_before_kib":{before},"rss_after_kib":{after},"bytes_per_session":{per:.0f}}}')
            for proc in (held, warm):
                proc.stdin.close()
                proc.wait(timeout=30)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
