"""The hand-over to a new process (``tcptotcp --upgrade``) with N open bridges: how long the
old process takes to hand them all over, and the longest pause a bridge's client sees.

Each bridge relays a ping-pong through an echo upstream (one 64-byte message out, its echo
back, again), from one selector thread; the pause of a bridge is the longest gap between two
echoes around the upgrade, and as the new process measures it (from the bridge's quiescing in
the old process to its relaying in the new; one monotonic clock). Beside them, the clients'
longest gap of the 2 s before the upgrade: what their own thread and the machine's load give.
Every echo is checked, and a FIN or a reset counts as a failure.

    python benchmarks/upgrade.py --bridges 1000 --rounds 3 [--backend cython|pure]

There is no other forwarder to compare with: haproxy, nginx and Envoy do not move open
connections to a new process. The targets are the issue's: at most 100 ms per bridge, and
1,000 bridges within 2 s.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Set, Tuple


def echo_server() -> Tuple[socket.socket, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)

    def run() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(srv, selectors.EVENT_READ, None)
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        try:
                            conn, _ = srv.accept()
                        except OSError:
                            return
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ, conn)
                        continue
                    conn = key.data
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(conn)
                        conn.close()
                        continue
                    conn.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return srv, thread


def one_round(n: int, backend: str) -> Tuple[float, float, float, float, int, int]:
    """(hand-over seconds as the old process reports it, the longest pause of a bridge as the
    new process measured it, the clients' longest gap around the upgrade, their longest gap
    before it, bridges moved, failures)."""
    srv, _ = echo_server()
    pid_file = os.path.join(tempfile.mkdtemp(prefix="t2t-up"), "pid")
    env = dict(os.environ)
    if backend == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    argv = [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", f"127.0.0.1:{srv.getsockname()[1]}"]
    argv += ["--pid-file", pid_file, "--log-level", "warning", "--max-connections", str(n + 100)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    lines: List[str] = []
    assert proc.stderr is not None
    first = proc.stderr.readline()
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", first).group(1))  # type: ignore[union-attr]
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    message = b"m" * 64
    last = [time.monotonic()] * n
    gaps: List[Tuple[float, float]] = []
    failures = [0]
    answered: Set[int] = set()  # bridges that echoed once
    stop = threading.Event()

    def ping_pong() -> None:
        with selectors.DefaultSelector() as sel:
            for i, s in enumerate(socks):
                s.setblocking(False)
                s.send(message)
                sel.register(s, selectors.EVENT_READ, i)
            got = [b""] * n
            while not stop.is_set():
                for key, _ in sel.select(0.05):
                    i = key.data
                    try:
                        data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:
                        failures[0] += 1
                        sel.unregister(key.fileobj)
                        continue
                    got[i] += data
                    if len(got[i]) >= len(message):
                        if got[i] != message:
                            failures[0] += 1
                        got[i] = b""
                        answered.add(i)
                        now = time.monotonic()
                        gaps.append((last[i], now))
                        last[i] = now
                        key.fileobj.send(message)  # type: ignore[union-attr]

    thread = threading.Thread(target=ping_pong, daemon=True)
    thread.start()
    # Every bridge open and relaying (the accept queue empty), then 2 s of gaps without an upgrade.
    deadline = time.monotonic() + 60
    while len(answered) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(answered) < n:
        raise SystemExit(f"only {len(answered)} of {n} bridges answered within 60 s")
    time.sleep(2.5)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--upgrade", "--pid-file", pid_file], capture_output=True, text=True
    )
    if done.returncode != 0:
        proc.kill()
        proc.wait(10)
        time.sleep(0.2)
        raise SystemExit(f"{done.stderr.strip()}\nthe old process's log:\n" + "".join(lines[-30:]))
    deadline = time.monotonic() + 30
    while not any("handed over to pid" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    end = time.monotonic()
    stop.set()
    thread.join(10)
    handed = next(line for line in lines if "handed over to pid" in line)
    for line in lines:
        if "handed over to pid" in line or "adopted" in line:
            print("  " + line.strip(), file=sys.stderr, flush=True)
    m = re.search(r"(\d+) bridges in ([\d.]+) s", handed)
    assert m is not None, handed
    adopted = next((line for line in lines if "adopted" in line), "")
    measured = re.search(r"the longest paused ([\d.]+) ms", adopted)
    paused = float(measured.group(1)) / 1000 if measured else float("nan")
    pause = max((b - a for a, b in gaps if a <= end and b >= start), default=0.0)
    before = max((b - a for a, b in gaps if a >= start - 2.0 and b < start), default=0.0)
    for s in socks:
        s.close()
    proc.wait(30)  # (bridges that stayed there have ended with their clients)
    new = int(open(pid_file).read())
    os.kill(new, 15)
    srv.close()
    return float(m.group(2)), paused, pause, before, int(m.group(1)), failures[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bridges", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="cython", choices=("cython", "pure"))
    args = p.parse_args()
    faulthandler.dump_traceback_later(60.0 * args.rounds + 60.0, exit=True)  # a round that hangs: where
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    for i in range(args.rounds):
        rows.append(one_round(args.bridges, args.backend))
        print(f"round {i + 1}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{args.bridges} bridges, backend {args.backend}, {args.rounds} rounds")
    print("round  hand-over s  longest pause ms  clients' longest gap ms  gap before ms  moved  failures")
    for i, (seconds, paused, pause, before, moved, failed) in enumerate(rows, 1):
        print(
            f"{i:5}  {seconds:11.3f}  {paused * 1000:16.1f}  {pause * 1000:23.1f}  {before * 1000:13.1f}"
            f"  {moved:5}  {failed:8}"
        )
    print(
        f"median: hand-over {statistics.median(r[0] for r in rows):.3f} s, "
        f"longest pause {statistics.median(r[1] for r in rows) * 1000:.1f} ms, "
        f"clients' longest gap {statistics.median(r[2] for r in rows) * 1000:.1f} ms, "
        f"before {statistics.median(r[3] for r in rows) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
