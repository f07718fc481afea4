#!/usr/bin/env python3
"""Connections refused or reset while a loaded plexus gets a new binary: `SIGUSR2` (binary
upgrade) vs a plain restart (SIGTERM, wait for the exit, start again, as `systemctl restart`).

Each run: a server (tcp echo on a fixed loopback port) started from a copy of PLEXUS in a
temporary directory, `plexus bench connect-rate` (connect, one 64-byte echo, close, on 32
connections in parallel) for DURATION seconds, and after 2 s the upgrade or the restart. Reports
the bench's error counts by kind and the time from the signal to the new process serving (the
new process's log line `upgrade: took over` for the upgrade, its last `listening` line for the
restart; stderr lines are time-stamped as they arrive).
Usage: benches/upgrade-vs-restart.py [PLEXUS=target/release/plexus] [DURATION=6] [RUNS=3]
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PLEXUS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/plexus")
DURATION = int(sys.argv[2]) if len(sys.argv) > 2 else 6
RUNS = int(sys.argv[3]) if len(sys.argv) > 3 else 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `plexus serve` whose stderr lines are collected with their arrival time."""

    def __init__(self, binary, config, pid_file):
        self.lines = []
        self.proc = subprocess.Popen([binary, "serve", "--config", config, "--pid-file", pid_file],
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait_line(self, needle, after=0.0, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if at >= after and needle in line:
                    return at
            time.sleep(0.005)
        raise RuntimeError(f"no line with {needle!r}: {self.lines[-20:]}")


def run(mode):
    tmp = tempfile.mkdtemp(prefix="plexus-upgrade-bench-")
    binary = os.path.join(tmp, "plexus")
    shutil.copy(PLEXUS, binary)
    port = free_port()
    config = os.path.join(tmp, "plexus.toml")
    with open(config, "w") as f:
        f.write(f'[server]\nevent_loops = 2\n[[listener]]\nname = "tcp-echo"\ntransport = "tcp"\n'
                f'addr = "127.0.0.1:{port}"\nservice = "echo"\n')
    pid_file = os.path.join(tmp, "plexus.pid")
    servers = [Server(binary, config, pid_file)]
    try:
        servers[0].wait_line("listening name=tcp-echo")
        load = subprocess.Popen([PLEXUS, "bench", "connect-rate", "--addr", f"127.0.0.1:{port}",
                                 "--connections", "32", "--duration", f"{DURATION}s"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2)
        shutil.copy(PLEXUS, binary + ".new")
        os.rename(binary + ".new", binary)
        old = servers[0].proc
        start = time.monotonic()
        if mode == "upgrade":
            old.send_signal(signal.SIGUSR2)
            serving = servers[0].wait_line("upgrade: took over", after=start)
        else:
            old.send_signal(signal.SIGTERM)
            old.wait(timeout=60)
            servers.append(Server(binary, config, pid_file))
            serving = servers[1].wait_line("listening name=tcp-echo")
        out, _ = load.communicate(timeout=DURATION + 60)
        result = json.loads(out.strip().splitlines()[-1])
        old.wait(timeout=60)
        return result, (serving - start) * 1000, old.returncode
    finally:
        pid = None
        try:
            pid = int(open(pid_file).read().strip())
        except (OSError, ValueError):
            pass
        for server in servers:
            server.proc.kill()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


print("| mode | run | connections ok | refused | reset | other errors | signal → new process serving | old exit |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("upgrade", "restart"):
    for n in range(1, RUNS + 1):
        result, ms, code = run(mode)
        errors = result.get("errors", {})
        other = sum(v for k, v in errors.items() if k not in ("refused", "reset"))
        print(f"| {mode} | {n} | {result.get('handshakes', '?')} | "
              f"{errors.get('refused', 0)} | {errors.get('reset', 0)} | {other} | {ms:.1f} ms | {code} |",
              flush=True)
