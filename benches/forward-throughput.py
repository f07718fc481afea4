#!/usr/bin/env python3
"""Forward relay throughput: plexus `forward` against HAProxy (`mode tcp`, one thread), same run.

client --> relay --> plexus echo listener --> back the same way. The relay is plexus
(event_loops = 1; `splice = true`, then `splice = false`) or haproxy (nbthread 1; once
plain, once with `option splice-auto`); relay and
echo are pinned to CPU 0 (taskset, when available), the client (this script) to CPU 1. It
streams SIZE MiB and reads the echo concurrently, verifying the byte count; the figure is the
relay process's own CPU per MiB relayed each way. Run from the repository root after
`cargo build --release -p plexus-cli`. Usage: benches/forward-throughput.py [SIZE_MIB=1024]
(haproxy rows are skipped when it is not installed).
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


def start_plexus(name, listener_keys):
    """A one-loop plexus with one tcp listener NAME (its other keys given): process and port."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write(f'[server]\nevent_loops = 1\n[[listener]]\nname = "{name}"\ntransport = "tcp"\n'
                  f'addr = "127.0.0.1:0"\n{listener_keys}')
    proc = subprocess.Popen(TASKSET + [PLEXUS, "serve", "--config", cfg.name],
                            stderr=subprocess.PIPE, text=True)
    port = None
    while port is None:
        match = re.search(rf"listening name={name} transport=tcp addr=127\.0\.0\.1:(\d+)", proc.stderr.readline())
        port = match and int(match.group(1))
    return proc, port


def start_relay(kind, echo_port):
    """The relay process and its port."""
    if kind.startswith("plexus"):
        splice = "false" if kind == "plexus-copy" else "true"
        return start_plexus("fwd", f'service = "forward"\nupstream = "127.0.0.1:{echo_port}"\n'
                                   f'splice = {splice}\n')
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    splice = "    option splice-auto\n" if kind == "haproxy-splice" else ""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg2:
        cfg2.write("global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 5s\n"
                   f"    timeout client 600s\n    timeout server 600s\n{splice}"
                   f"frontend relay\n    bind 127.0.0.1:{port}\n    default_backend up\n"
                   f"backend up\n    server echo 127.0.0.1:{echo_port}\n")
    relay = subprocess.Popen(TASKSET + [HAPROXY, "-db", "-f", cfg2.name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return relay, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("haproxy did not start")


def run(kind):
    first, echo_port = start_plexus("echo", 'service = "echo"\n')
    relay, port = start_relay(kind, echo_port)
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
        relay_secs = relay_cpu / os.sysconf("SC_CLK_TCK")
        return SIZE / elapsed / 1e6, relay_secs / elapsed * 100, relay_secs * 1e6 / (SIZE >> 20)
    finally:
        for proc in (relay, first):
            proc.terminate()
            proc.wait(timeout=30)


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
KINDS = ["plexus-splice", "plexus-copy"] + (["haproxy", "haproxy-splice"] if HAPROXY else [])
if not HAPROXY:
    print("haproxy not found: its rows are skipped")
for kind in KINDS + KINDS:
    mbps, cpu, us_per_mib = run(kind)
    print(f"{kind:14}: {SIZE >> 20} MiB each way at {mbps:7.1f} MB/s; relay CPU {cpu:5.1f}%, "
          f"{us_per_mib:7.1f} µs per MiB each way")
