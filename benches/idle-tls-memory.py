#!/usr/bin/env python3
"""RSS growth per idle TLS session: plexus (DESIGN target <= 10 KiB) vs tokio-rustls-echo.

For each server: makes a self-signed P-256 certificate for localhost (openssl), starts the
server on 127.0.0.1 (plexus: one event loop, one `tls` listener with the echo service;
tokio-rustls-echo: one worker thread), warms it with 100 TLS sessions, then opens N more, each
completing a verified TLS handshake (Python's ssl module, server_hostname="localhost") and
echoing 64 bytes once, and reports (RSS after - RSS before) / N. All sessions stay open (idle)
until the measurement is taken.

Usage: benches/idle-tls-memory.py [N=2000] [--servers plexus,tokio-rustls]
                                  [--plexus PATH] [--tokio-rustls PATH]
Paths default to <repo>/target/release/plexus and
<repo>/benches/target/release/tokio-rustls-echo (build with `cargo build --release` in benches/).
"""
import argparse
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def make_cert(dirname):
    """Self-signed localhost certificate; CA:FALSE so rustls-based clients accept it too."""
    cert, key = os.path.join(dirname, "cert.pem"), os.path.join(dirname, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE",
         "-addext", "keyUsage=critical,digitalSignature",
         "-addext", "extendedKeyUsage=serverAuth",
         "-days", "2", "-keyout", key, "-out", cert],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def server_command(name, args, cert, key, workdir):
    """(argv, regex for the listening line) of server `name`."""
    if name == "plexus":
        cfg = os.path.join(workdir, "plexus.toml")
        with open(cfg, "w") as f:
            f.write('[server]\nevent_loops = 1\nmax_handshakes = 100000\n'
                    f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
                    '[[listener]]\nname = "tls-echo"\ntransport = "tls"\n'
                    'addr = "127.0.0.1:0"\nservice = "echo"\n')
        return ([args.plexus, "serve", "--config", cfg],
                r"listening name=tls-echo transport=tls addr=127\.0\.0\.1:(\d+)")
    return ([args.tokio_rustls, "--addr", "127.0.0.1:0", "--threads", "1",
             "--cert", cert, "--key", key],
            r"listening addr=127\.0\.0\.1:(\d+)")


def measure(name, argv, ready, cert, n):
    """Starts the server, returns (rss_before_kib, rss_after_kib, protocol)."""
    env = dict(os.environ, NO_COLOR="1")
    server = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True, env=env)
    sessions = []
    try:
        deadline = time.time() + 20
        port, seen = None, []
        while port is None and time.time() < deadline:
            line = re.sub(r"\x1b\[[0-9;]*m", "", server.stderr.readline())
            if not line and server.poll() is not None:
                break
            seen.append(line.strip())
            match = re.search(ready, line)
            port = int(match.group(1)) if match else None
        if port is None:
            raise RuntimeError(f"{name} did not report its port; its output: "
                               + " | ".join(seen[-3:]))
        # Keep draining the server's log so that it never blocks on a full pipe.
        threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()

        def rss_kib():
            with open(f"/proc/{server.pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

        ctx = ssl.create_default_context(cafile=cert)  # CERT_REQUIRED, check_hostname

        def echo_once(payload):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(len(payload) - len(got))
                if not chunk:
                    raise RuntimeError(f"{name} closed a session mid-echo")
                got += chunk
            if got != payload:
                raise RuntimeError(f"{name} echoed wrong bytes")
            return s

        sessions += [echo_once(b"w" * 64) for _ in range(100)]
        time.sleep(0.5)
        before = rss_kib()
        sessions += [echo_once(b"i" * 64) for _ in range(n)]
        time.sleep(1)
        after = rss_kib()
        protocol = f"{sessions[-1].version()} {sessions[-1].cipher()[0]}"
        if server.poll() is not None:
            raise RuntimeError(f"{name} exited during the measurement")
        return before, after, protocol
    finally:
        for s in sessions:
            s.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", nargs="?", type=int, default=2000, help="idle sessions (default 2000)")
    p.add_argument("--servers", default="plexus,tokio-rustls")
    p.add_argument("--plexus", default=os.path.join(REPO, "target/release/plexus"))
    p.add_argument("--tokio-rustls", dest="tokio_rustls",
                   default=os.path.join(BENCH_DIR, "target/release/tokio-rustls-echo"))
    args = p.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in ("plexus", "tokio-rustls"):
            p.error(f"unknown server {s!r}")

    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="plexus-idle-tls.") as workdir:
        cert, key = make_cert(workdir)
        for name in servers:
            argv, ready = server_command(name, args, cert, key, workdir)
            try:
                before, after, protocol = measure(name, argv, ready, cert, args.n)
            except (OSError, RuntimeError, ssl.SSLError, subprocess.SubprocessError) as e:
                print(f"{name}: FAILED: {e}", file=sys.stderr)
                failed = True
                continue
            per = (after - before) * 1024 / args.n
            print(f"{name}: {args.n} idle TLS sessions ({protocol}): "
                  f"RSS {before} KiB -> {after} KiB, {per:.0f} B per session", flush=True)
            rows.append((name, before, after, per, protocol))

    print()
    print("| server | idle TLS sessions | RSS before KiB | RSS after KiB | per session |")
    print("|---|---:|---:|---:|---:|")
    for name, before, after, per, _ in rows:
        print(f"| {name} | {args.n} | {before} | {after} | {per:.0f} B ({per / 1024:.1f} KiB) |")
    sys.exit(1 if failed or not rows else 0)


if __name__ == "__main__":
    main()
