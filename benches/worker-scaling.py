#!/usr/bin/env python3
"""Throughput of the 10 ms blocking_lookup example against [server] workers (1, 2, 4, 8).

40 sessions each pipeline 10 lookups; every reply is checked, in order. Build first:
cargo build --release -p plexus --example blocking_lookup; then run from the repository root."""
import socket
import subprocess
import threading
import time

results = {}
for workers in (1, 2, 4, 8):
    port = 7320 + workers
    p = subprocess.Popen(["target/release/examples/blocking_lookup", f"127.0.0.1:{port}", str(workers)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    conns, per = 40, 10
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    t0 = time.time()
    for i, s in enumerate(socks):
        s.sendall("".join(f"k{i}-{j}\n" for j in range(per)).encode())
    def drain(s, i):
        want = "".join(f"k{i}-{j} => found\n" for j in range(per)).encode(); got = b""
        while len(got) < len(want): got += s.recv(65536)
        assert got == want
    ts = [threading.Thread(target=drain, args=(s, i)) for i, s in enumerate(socks)]
    [t.start() for t in ts]; [t.join() for t in ts]
    dt = time.time() - t0
    results[workers] = conns * per / dt
    print(f"workers={workers}: {conns*per} lookups of 10 ms in {dt:.2f}s = {conns*per/dt:.0f}/s (ideal {workers*100}/s), order verified")
    p.terminate(); p.wait()
