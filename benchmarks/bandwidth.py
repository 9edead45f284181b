"""--bandwidth: how close a throttled bridge keeps to its rate, and what throttling costs the relay.

    python benchmarks/bandwidth.py [--rounds N] [--backend cython|pure] [--out DIR]

The relay is its own process, `python -m tcptotcp 127.0.0.1:P 127.0.0.1:U [--bandwidth R]`;
this process is the clients and the upstream, on loopback.

    rate     one forward with --bandwidth 10M, one client, a stream each way at once for 11 s
             (client -> upstream and upstream -> client, each sender as fast as the kernel takes
             it). Reported per direction: MB/s over the whole run (the first burst included),
             and over the 10 s after the first second (the steady rate), with the error vs 10 MB/s.
    many     1,000 clients at once, each sending 400 kB to the upstream: with --bandwidth 100k
             (every bridge throttled: ~3.4 s) and without (as fast as they go). Relay CPU
             (utime+stime from /proc/<pid>/stat) from the moment all 1,000 bridges are open to
             the last byte's arrival, each case in a fresh relay, the two interleaved per round.

Writes benchmarks/results/bandwidth-<date>.md. Other work on a shared machine moves the CPU
figures: compare the two cases within one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from run import cpu_seconds, free_port

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
RATE = 10_000_000
MANY = 1000
MANY_RATE = 100_000
MANY_BYTES = 400_000
CHUNK = b"\xa5" * 65536


class Relay:
    """`python -m tcptotcp` in its own process, until it says it listens."""

    def __init__(self, backend: str, upstream: socket.socket, *extra: str) -> None:
        upstream_port = upstream.getsockname()[1]
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.args = [
            "127.0.0.1:%d" % self.port,
            "127.0.0.1:%d" % upstream_port,
            "--backend",
            backend,
            "--log-level",
            "warning",
            "--max-connections",
            "4096",
            *extra,
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcptotcp", *self.args], env=env, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            # The probe was bridged: take its upstream end, so that no measured client gets it.
            timeout = upstream.gettimeout()
            upstream.settimeout(10)
            try:
                upstream.accept()[0].close()
            finally:
                upstream.settimeout(timeout)
            return
        self.close()
        raise RuntimeError("the relay did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# -- rate: one bridge, both ways -------------------------------------------------------------


class Counter:
    def __init__(self, sock: socket.socket) -> None:
        self.total = 0
        self.sock = sock
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.total += len(data)


def _flood(sock: socket.socket, until: float) -> None:
    try:
        while time.monotonic() < until:
            sock.sendall(CHUNK)
    except OSError:
        pass


def measure_rate(backend: str, seconds: float = 11.0) -> Dict[str, Dict[str, float]]:
    upstream = socket.create_server(("127.0.0.1", 0))
    relay = Relay(backend, upstream, "--bandwidth", "10M")
    try:
        client = socket.create_connection(("127.0.0.1", relay.port))
        server, _ = upstream.accept()
        counters = {"client -> upstream": Counter(server), "upstream -> client": Counter(client)}
        t0 = time.monotonic()
        until = t0 + seconds
        senders = [threading.Thread(target=_flood, args=(s, until), daemon=True) for s in (client, server)]
        for thread in senders:
            thread.start()
        time.sleep(1.0)
        at_one = {name: c.total for name, c in counters.items()}
        time.sleep(max(0.0, until - time.monotonic()))
        elapsed = time.monotonic() - t0
        at_end = {name: c.total for name, c in counters.items()}
        client.close()
        server.close()
    finally:
        relay.close()
        upstream.close()
    out: Dict[str, Dict[str, float]] = {}
    for name in counters:
        whole = at_end[name] / elapsed
        steady = (at_end[name] - at_one[name]) / (elapsed - 1.0)
        out[name] = {"whole": whole, "steady": steady, "bytes": at_end[name], "seconds": elapsed}
    return out


# -- many: 1,000 bridges, throttled or not ---------------------------------------------------


#: The cases of the many-bridges run: the relay throttles clients that send as fast as they can;
#: the clients pace themselves at the same rate through an unthrottled relay (the same bytes over
#: the same time: what throttling is judged against); or send as fast as they can, unthrottled.
MANY_CASES = ("throttled", "paced", "unthrottled")
PACE_TICK = 0.05  # paced clients send MANY_RATE * PACE_TICK bytes each, every tick


def measure_many(backend: str, case: str) -> Dict[str, float]:
    upstream = socket.create_server(("127.0.0.1", 0), backlog=MANY)
    upstream.setblocking(False)
    extra = ("--bandwidth", str(MANY_RATE)) if case == "throttled" else ()
    relay = Relay(backend, upstream, *extra)
    sel = selectors.DefaultSelector()
    clients: List[socket.socket] = []
    servers: List[socket.socket] = []
    try:
        for _ in range(MANY):
            c = socket.create_connection(("127.0.0.1", relay.port))
            c.setblocking(False)
            clients.append(c)
        deadline = time.monotonic() + 30
        while len(servers) < MANY and time.monotonic() < deadline:
            try:
                s, _ = upstream.accept()
            except BlockingIOError:
                time.sleep(0.002)
                continue
            s.setblocking(False)
            servers.append(s)
        if len(servers) < MANY:
            raise RuntimeError(f"only {len(servers)} of {MANY} bridges opened")
        left: Dict[socket.socket, int] = {c: MANY_BYTES for c in clients}
        received = 0
        paced = case == "paced"
        allowed: Dict[socket.socket, int] = {c: 0 for c in clients}  # paced: bytes it may send by now
        next_tick = time.monotonic()
        for c in clients:
            sel.register(c, selectors.EVENT_WRITE, "send")
        for s in servers:
            sel.register(s, selectors.EVENT_READ, "recv")
        cpu0, t0 = relay.cpu(), time.monotonic()
        view = memoryview(CHUNK)
        limit = t0 + 60
        while received < MANY * MANY_BYTES and time.monotonic() < limit:
            if paced and time.monotonic() >= next_tick:
                next_tick += PACE_TICK
                for c in clients:
                    if left[c]:
                        allowed[c] = min(left[c], allowed[c] + int(MANY_RATE * PACE_TICK))
            for key, _ in sel.select(min(1.0, max(0.0, next_tick - time.monotonic())) if paced else 1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "send":
                    want = min(len(CHUNK), left[sock])
                    if paced:
                        want = min(want, allowed[sock])
                        if not want:
                            continue
                    try:
                        n = sock.send(view[:want])
                    except BlockingIOError:
                        continue
                    left[sock] -= n
                    if paced:
                        allowed[sock] -= n
                    if not left[sock]:
                        sel.unregister(sock)
                else:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    received += len(data)
        elapsed = time.monotonic() - t0
        cpu = relay.cpu() - cpu0
        if received < MANY * MANY_BYTES:
            raise RuntimeError(f"only {received} of {MANY * MANY_BYTES} bytes arrived")
    finally:
        sel.close()
        for sock in clients + servers:
            sock.close()
        relay.close()
        upstream.close()
    return {"cpu": cpu, "seconds": elapsed, "bytes": received}


# -- report ----------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def _spread(values: List[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def markdown(
    backend: str,
    rate: List[Dict[str, Dict[str, float]]],
    many: Dict[str, List[Dict[str, float]]],
    took: float,
) -> str:
    lines = [
        f"# --bandwidth, {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"Measured on {platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; relay backend {backend}. "
        f"{len(rate)} round(s) of rate, {len(many['throttled'])} of many (the two cases interleaved). "
        f"Run took {took:.0f} s. Command: `python benchmarks/bandwidth.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "### One bridge, --bandwidth 10M, a stream each way at once",
        "",
        "Whole: bytes over the whole run (the first burst of 2 MB included); steady: after the first second.",
        "Target: within 5% of 10 MB/s each way.",
        "",
        "| round | direction | seconds | MB/s whole | error | MB/s steady | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, result in enumerate(rate, 1):
        for name, r in result.items():
            lines.append(
                f"| {i} | {name} | {r['seconds']:.1f} | {_mb(r['whole'])} | {(r['whole'] / RATE - 1) * 100:+.2f}% "
                f"| {_mb(r['steady'])} | {(r['steady'] / RATE - 1) * 100:+.2f}% |"
            )
    t, p, u = many["throttled"], many["paced"], many["unthrottled"]
    ratio = [a["cpu"] / b["cpu"] for a, b in zip(t, p) if b["cpu"] > 0]
    blast = [a["cpu"] / b["cpu"] for a, b in zip(t, u) if b["cpu"] > 0]
    lines += [
        "",
        f"### {MANY:,} bridges at once, {MANY_BYTES // 1000} kB each (client -> upstream)",
        "",
        f"throttled: --bandwidth {MANY_RATE // 1000}k on every bridge, the clients sending as fast as they can; "
        f"paced: no limit in the relay, each client sending {MANY_RATE // 1000} kB/s itself (the same bytes over "
        "the same time); unthrottled: no limit, as fast as they can. "
        "Relay CPU is utime+stime of the relay process from /proc/<pid>/stat (10 ms ticks) from all bridges "
        "open to the last byte; medians (min–max) over rounds.",
        "",
        "| case | seconds | aggregate MB/s | relay CPU s | relay CPU s per GB |",
        "|---|---|---|---|---|",
    ]
    for name, runs in (("throttled", t), ("paced", p), ("unthrottled", u)):
        lines.append(
            f"| {name} | {_spread([r['seconds'] for r in runs])} "
            f"| {_spread([r['bytes'] / r['seconds'] / 1e6 for r in runs], '{:.1f}')} "
            f"| {_spread([r['cpu'] for r in runs])} "
            f"| {_spread([r['cpu'] / (r['bytes'] / 1e9) for r in runs])} |"
        )
    if ratio:
        met = "met" if statistics.median(ratio) < 1 else "not met"
        lines += [
            "",
            f"Relay CPU throttled / paced (the same bytes at the same rate), per round: "
            f"{', '.join(f'{x:.2f}' for x in ratio)} (median {statistics.median(ratio):.2f}; target < 1: {met}).",
        ]
    if blast:
        lines += [
            "",
            f"Relay CPU throttled / unthrottled (the same bytes, as fast as the relay goes), per round: "
            f"{', '.join(f'{x:.2f}' for x in blast)} (median {statistics.median(blast):.2f}): a throttled "
            "bridge wakes for its timer once per quantum, and its reads batch fewer bridges per wake-up.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the many case (default 3)")
    ap.add_argument("--rate-rounds", type=int, default=1, help="rounds of the 11 s rate case (default 1)")
    ap.add_argument("--backend", default="cython", choices=("cython", "pure"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="appended to the file name")
    args = ap.parse_args()
    # 1,000 clients and their upstream ends need fds: raise the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    started = time.monotonic()
    rate = []
    for i in range(args.rate_rounds):
        rate.append(measure_rate(args.backend))
        for name, r in rate[-1].items():
            print(f"rate {i + 1}: {name}: {_mb(r['whole'])} MB/s whole, {_mb(r['steady'])} MB/s steady", flush=True)
    many: Dict[str, List[Dict[str, float]]] = {name: [] for name in MANY_CASES}
    for i in range(args.rounds):
        order = MANY_CASES[i % 3 :] + MANY_CASES[: i % 3]
        for name in order:
            result = measure_many(args.backend, name)
            many[name].append(result)
            print(f"many {i + 1}: {name}: {result['seconds']:.2f} s, relay CPU {result['cpu']:.2f} s", flush=True)
    md = markdown(args.backend, rate, many, time.monotonic() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path: Optional[Path] = out / f"bandwidth-{dt.date.today().isoformat()}{'-' + args.tag if args.tag else ''}.md"
    assert path is not None
    path.write_text(md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
