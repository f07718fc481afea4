#!/usr/bin/env python3
"""RSS growth per idle TCP session of a plexus echo server (DESIGN.md target: <= 512 B).

Starts target/release/plexus with one event loop on 127.0.0.1, warms it with 100 sessions,
then opens N more, each echoing 64 bytes once, and reports (RSS after - RSS before) / N.
Usage: benches/idle-tcp-memory.py [N=5000] [PLEXUS=target/release/plexus]
"""
import re
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
PLEXUS = sys.argv[2] if len(sys.argv) > 2 else "target/release/plexus"

with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
    cfg.write('[server]\nevent_loops = 1\n[[listener]]\nname = "e"\ntransport = "tcp"\n'
              'addr = "127.0.0.1:0"\nservice = "echo"\n')
server = subprocess.Popen([PLEXUS, "serve", "--config", cfg.name], stderr=subprocess.PIPE, text=True)
try:
    deadline = time.time() + 20
    port = None
    while port is None and time.time() < deadline:
        match = re.search(r"listening name=e transport=tcp addr=127\.0\.0\.1:(\d+)", server.stderr.readline())
        port = int(match.group(1)) if match else None
    assert port, "server did not report its port"

    def rss_kib():
        return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{server.pid}/status").read()).group(1))

    def echo_once(payload):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(len(payload) - len(got))
        assert got == payload
        return s

    warm = [echo_once(b"w" * 64) for _ in range(100)]
    time.sleep(0.5)
    before = rss_kib()
    idle = [echo_once(b"i" * 64) for _ in range(N)]
    time.sleep(1)
    after = rss_kib()
    print(f"{N} idle sessions: RSS {before} KiB -> {after} KiB, "
          f"{(after - before) * 1024 / N:.0f} B per session")
finally:
    server.terminate()
    server.wait(timeout=30)
