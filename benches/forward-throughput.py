#!/usr/bin/env python3
"""Forward relay throughput: splice vs read/write copy, in the same run.

client --> plexus forward listener --> plexus echo listener --> back the same way.
Both listeners live in one plexus process (event_loops = 1, pinned to CPU 0 with taskset when
available); the client (this script, CPU 1) streams SIZE MiB and reads the echo concurrently,
verifying the byte count. Run from the repository root after
`cargo build --release -p plexus-cli`. Usage: benches/forward-throughput.py [SIZE_MIB=1024]
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

SIZE = int(sys.argv[1]) * 1024 * 1024 if len(sys.argv) > 1 else 1024 * 1024 * 1024
PLEXUS = "target/release/plexus"
TASKSET = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() >= 2 else []


def run(splice):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write('[server]\nevent_loops = 1\n[[listener]]\nname = "echo"\ntransport = "tcp"\n'
                  'addr = "127.0.0.1:0"\nservice = "echo"\n')
    first = subprocess.Popen(TASKSET + [PLEXUS, "serve", "--config", cfg.name],
                             stderr=subprocess.PIPE, text=True)
    echo_port = None
    while echo_port is None:
        match = re.search(r"listening name=echo transport=tcp addr=127\.0\.0\.1:(\d+)", first.stderr.readline())
        echo_port = match and int(match.group(1))
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg2:
        cfg2.write('[server]\nevent_loops = 1\n[[listener]]\nname = "fwd"\ntransport = "tcp"\n'
                   f'addr = "127.0.0.1:0"\nservice = "forward"\nupstream = "127.0.0.1:{echo_port}"\n'
                   f'splice = {"true" if splice else "false"}\n')
    relay = subprocess.Popen(TASKSET + [PLEXUS, "serve", "--config", cfg2.name],
                             stderr=subprocess.PIPE, text=True)
    port = None
    while port is None:
        match = re.search(r"listening name=fwd transport=tcp addr=127\.0\.0\.1:(\d+)", relay.stderr.readline())
        port = match and int(match.group(1))
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        chunk = b"x" * (1 << 20)
        received = 0

        def reader():
            nonlocal received
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                received += len(data)

        thread = threading.Thread(target=reader)
        start = time.time()
        thread.start()
        for _ in range(SIZE // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        thread.join()
        elapsed = time.time() - start
        assert received == SIZE, (received, SIZE)
        relay_cpu = sum(int(x) for x in open(f"/proc/{relay.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        return SIZE / elapsed / 1e6, relay_cpu / os.sysconf("SC_CLK_TCK") / elapsed * 100
    finally:
        for proc in (relay, first):
            proc.terminate()
            proc.wait(timeout=30)


for mode, splice in (("splice", True), ("copy", False), ("splice", True), ("copy", False)):
    mbps, cpu = run(splice)
    print(f"{mode:6}: {SIZE >> 20} MiB each way in both directions at {mbps:7.1f} MB/s; relay process CPU {cpu:5.1f}%")
