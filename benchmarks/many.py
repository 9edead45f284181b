"""Many bridges open at once in one process: start rate, memory and threads per idle bridge,
traffic through every bridge (checked by SHA-256), and stop + wait rate.

    python benchmarks/many.py [-n 2000] [--baseline PATH] [--json] [BACKEND ...]

BACKEND is `cython` (the compiled core of this checkout, or whatever `import tcptotcp` finds),
`pure` (the pure twin, TCPTOTCP_NO_EXTENSIONS=1) or `baseline` (the compiled core of another
tree, imported from PATH/src: see --baseline). Default: cython and pure, and baseline when
--baseline is given. Each backend runs in a fresh process of its own (`--child BACKEND`), so
one's threads, fds and heap never count against another's.

What one child does, all over loopback TCP through a listener on 127.0.0.1 (no socketpairs):
  1. raises RLIMIT_NOFILE to its hard limit; makes N pairs of connections, each bridge's two
     accepted sockets and the two client ends the driver keeps (4 sockets a bridge);
  2. `Bridge(s1, s2, 60, 3600)` for all N (timed apart), then `.start()` for all N (timed:
     the start rate); RSS and thread count before the first Bridge and once all N are started
     and idle give memory and threads per bridge;
  3. sends a distinct random payload each way through every bridge at once (one epoll driver
     on the client ends) and checks every byte on the far side by SHA-256 and length, then
     each bridge's own counts;
  4. `stop()` on all, then `wait()` on all (timed together: the stop+wait rate); every result
     must say "stopped" with the exact byte counts, every client end must then read a clean
     EOF, and the process's fds and threads must return to where they were.
Every loop is bounded in count and time. Any mismatch is an error: the child prints its JSON
with the list of errors and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
BACKENDS = ("cython", "pure", "baseline")
# The targets for the compiled core.
TARGETS = {"start_per_s": 20_000, "stop_wait_per_s": 20_000, "rss_KiB_per_idle_bridge": 8.0, "threads_per_bridge": 0.0}
# fds a bridge holds besides the 4 sockets: the engine's private dups (all engines), and the
# thread engines' wake socketpair.
ENGINE_FDS_PER_BRIDGE = {"cython": 2, "pure": 4, "baseline": 4}


# ---- the parent: one fresh process per backend ---------------------------------------------


def run_child(
    backend: str, n: int, baseline: Optional[str] = None, timeout: float = 600, extra: Optional[List[str]] = None
) -> dict:
    """Measure one backend in a process of its own; its JSON (with "errors", maybe non-empty)."""
    cmd = [sys.executable, str(HERE / "many.py"), "--child", backend, "-n", str(n), *(extra or [])]
    if backend == "baseline":
        if not baseline:
            raise ValueError("the baseline backend needs --baseline PATH")
        cmd += ["--baseline", baseline]
    env = dict(os.environ)
    if backend == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    else:
        env.pop("TCPTOTCP_NO_EXTENSIONS", None)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "n": n, "errors": [f"no answer within {timeout:.0f} s"]}
    try:
        result = json.loads(out.stdout)
    except ValueError:
        result = {"backend": backend, "n": n, "errors": []}
    if out.returncode != 0 and not result.get("errors"):
        result["errors"] = [f"exit {out.returncode}: {out.stderr.strip()[-800:]}"]
    return result


FIELDS = [
    ("Bridge(...).start(), bridges/s (start() only)", "start_per_s", ".0f"),
    ("Bridge(...) + start(), bridges/s", "construct_start_per_s", ".0f"),
    ("stop() all + wait() all, bridges/s", "stop_wait_per_s", ".0f"),
    ("RSS per idle bridge, KiB", "rss_KiB_per_idle_bridge", ".2f"),
    ("threads per bridge", "threads_per_bridge", ".4f"),
    ("threads added (all N)", "threads_added", "d"),
    ("traffic through all N at once, MB/s", "traffic_MBps", ".0f"),
    ("RSS per bridge after traffic, KiB", "rss_KiB_per_bridge_after_traffic", ".2f"),
]


def table(results: List[dict]) -> str:
    names = [r["backend"] for r in results]
    lines = [
        "| many bridges (N = %s) | %s |" % (", ".join(sorted({str(r.get("n")) for r in results})), " | ".join(names)),
        "|---|" + "---|" * len(names),
    ]
    for label, key, fmt in FIELDS:
        cells = [format(r[key], fmt) if r.get(key) is not None else "–" for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in results:
        for e in r.get("errors", []):
            lines.append(f"\n**{r['backend']}: {e}**")
    return "\n".join(lines) + "\n"


def main_parent(args: argparse.Namespace) -> int:
    backends = args.backends or ["cython", "pure"] + (["baseline"] if args.baseline else [])
    results = []
    for backend in backends:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
        print(f"many bridges: {backend}, N = {args.n} ...", file=sys.stderr)
        extra = ["--payload", str(args.payload), "--big-every", str(args.big_every)]
        results.append(run_child(backend, args.n, args.baseline, extra=extra))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
        print(
            "targets (issue): start >= 20,000/s, stop+wait >= 20,000/s, "
            "<= 8 KiB RSS per idle bridge (aim 4), 0 threads per bridge"
        )
    return 1 if any(r.get("errors") for r in results) else 0


# ---- the child: one backend, measured ------------------------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(read, target=None, seconds: float = 5.0, quiet: float = 0.3) -> int:
    """Poll read() until it equals target (or, with no target, stops changing for `quiet`
    seconds), at most `seconds`; the last value."""
    deadline = time.monotonic() + seconds
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        if target is not None and value == target:
            return value
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif target is None and time.monotonic() - since >= quiet:
            return value
    return value


class End:
    """One client end of a bridge: what it sends, and what it must receive."""

    __slots__ = ("sock", "out", "sent", "expect_len", "expect_digest", "got", "hash", "index")

    def __init__(self, sock: socket.socket, out: bytes, expect: bytes, index: int):
        self.sock = sock
        self.out = memoryview(out)
        self.sent = 0
        self.expect_len = len(expect)
        self.expect_digest = hashlib.sha256(expect).digest()
        self.got = 0
        self.hash = hashlib.sha256()
        self.index = index


def make_pairs(n: int, listener: socket.socket, socks: List[socket.socket], deadline: float):
    """N x (client1, bridged1, bridged2, client2); every socket also lands in `socks`."""
    addr = listener.getsockname()
    pairs = []
    for i in range(n):
        if time.monotonic() > deadline:
            raise RuntimeError(f"making connections: only {i} of {n} pairs in time")
        quad = []
        for _ in range(2):
            c = socket.create_connection(addr, timeout=5)
            socks.append(c)
            s, peer = listener.accept()
            socks.append(s)
            if peer != c.getsockname():  # sequential connect/accept: must be the same one
                raise RuntimeError(f"accepted {peer}, expected {c.getsockname()}")
            s.settimeout(None)
            quad.append((c, s))
        (c1, s1), (c2, s2) = quad
        pairs.append((c1, s1, s2, c2))
    return pairs


def drive(ends: List[End], deadline: float, max_events: int, errors: List[str], rng: random.Random) -> dict:
    """Send every end's payload and receive its peer's, all at once, on one epoll; bounded.
    Writes come in random sizes (a packet's worth, up to 64 KiB, or 256 KiB), so a bridge
    sees both small reads and bulk ones."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    sel = selectors.DefaultSelector()
    open_ends = 0
    for e in ends:
        e.sock.setblocking(False)
        sel.register(e.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, e)
        open_ends += 1
    events = 0
    started = time.perf_counter()
    try:
        while open_ends and time.monotonic() < deadline and events < max_events:
            for key, mask in sel.select(timeout=0.5):
                events += 1
                e: End = key.data
                if mask & selectors.EVENT_WRITE and e.sent < len(e.out):
                    try:
                        size = rng.choice((rng.randint(1, 1500), rng.randint(1, 65536), len(buf)))
                        e.sent += e.sock.send(e.out[e.sent : e.sent + size])
                    except BlockingIOError:
                        pass
                for _ in range(64):  # bounded: come back on the next select
                    if e.got >= e.expect_len and e.sent >= len(e.out):
                        break
                    try:
                        k = e.sock.recv_into(view)
                    except BlockingIOError:
                        break
                    if k == 0:
                        errors.append(f"bridge {e.index}: EOF after {e.got} of {e.expect_len} bytes")
                        e.got = e.expect_len  # stop waiting for it; the digest check fails it
                        break
                    e.hash.update(view[:k])
                    e.got += k
                    if e.got > e.expect_len:
                        errors.append(f"bridge {e.index}: {e.got} bytes, more than the {e.expect_len} sent")
                        e.got = e.expect_len
                        break
                done_sending = e.sent >= len(e.out)
                done = done_sending and e.got >= e.expect_len
                if done:
                    sel.unregister(e.sock)
                    open_ends -= 1
                elif done_sending and key.events & selectors.EVENT_WRITE:
                    sel.modify(e.sock, selectors.EVENT_READ, e)
    finally:
        sel.close()
    seconds = time.perf_counter() - started
    if open_ends:
        why = "time" if time.monotonic() >= deadline else f"{max_events} events"
        errors.append(f"traffic: {open_ends} of {len(ends)} ends unfinished after the {why} bound")
    for e in ends:
        e.sock.setblocking(True)
    return {"seconds": seconds, "events": events}


def wait_eof(clients: List[socket.socket], deadline: float) -> Dict[str, int]:
    """After the bridges ended each client end must read EOF (the bridge's FIN), not a reset."""
    seen = {"eof": 0, "reset": 0, "data": 0, "no_eof": 0}
    sel = selectors.DefaultSelector()
    for c in clients:
        c.setblocking(False)
        sel.register(c, selectors.EVENT_READ)
    left = len(clients)
    try:
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    seen["reset"] += 1
                else:
                    if data:
                        seen["data"] += 1  # bytes nobody sent
                    else:
                        seen["eof"] += 1
                sel.unregister(key.fileobj)
                left -= 1
    finally:
        sel.close()
    seen["no_eof"] = left
    return seen


def main_child(args: argparse.Namespace) -> int:
    backend, n = args.child, args.n
    errors: List[str] = []
    out: dict = {"backend": backend, "n": n, "errors": errors}

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = n * (4 + ENGINE_FDS_PER_BRIDGE[backend]) + 200
    out["rlimit_nofile"] = limit
    if limit != resource.RLIM_INFINITY and need > limit:
        errors.append(f"{n} bridges need ~{need} fds; RLIMIT_NOFILE is {limit}")
        print(json.dumps(out))
        return 1

    if backend == "baseline":
        src = Path(args.baseline).resolve() / "src"
        sys.path.insert(0, str(src))
    elif backend == "pure":
        os.environ["TCPTOTCP_NO_EXTENSIONS"] = "1"
    import tcptotcp  # noqa: E402  (after choosing the tree and the backend)

    out["module"] = tcptotcp.__file__
    if backend == "pure":
        Bridge = tcptotcp.pure.Bridge
    else:
        if tcptotcp.BACKEND != "cython":
            errors.append(f"{backend}: compiled core not loaded (BACKEND = {tcptotcp.BACKEND})")
        if backend == "baseline" and not Path(tcptotcp.__file__).resolve().is_relative_to(src):
            errors.append(f"baseline: imported {tcptotcp.__file__}, not from {src}")
        if errors:
            print(json.dumps(out))
            return 1
        Bridge = tcptotcp.Bridge
    core = None
    if backend != "pure":
        try:  # engine stats, where the core has them: an event-loop core (0.1.0's has none)
            from tcptotcp import _core as core

            assert callable(core.stats) and callable(core.loop_threads)
        except (ImportError, AttributeError, AssertionError):
            core = None

    rng = random.Random(args.seed)
    time_limit = time.monotonic() + args.time_limit
    fds_at_start = fd_count()
    listener = socket.create_server(("127.0.0.1", 0), backlog=min(4096, 2 * n))
    listener.settimeout(5)
    socks: List[socket.socket] = [listener]
    bridges: list = []
    try:
        pairs = make_pairs(n, listener, socks, time.monotonic() + 120)
        # Payloads first (so they are not in the RSS delta): distinct random bytes each way,
        # sizes around --payload, and every --big-every'th bridge 1 MiB each way (bulk: splice).
        payloads = []

        def size(i: int) -> int:
            if args.big_every and i % args.big_every == 0:
                return 1 << 20
            return rng.randint(max(1, args.payload // 2), args.payload * 3 // 2)

        for i in range(n):
            payloads.append((rng.randbytes(size(i)), rng.randbytes(size(i))))

        gc.collect()
        threads0, rss0 = thread_count(), rss_bytes()
        t0 = time.perf_counter()
        made = [Bridge(s1, s2, 60, 3600) for _, s1, s2, _ in pairs]
        t1 = time.perf_counter()
        for b in made:
            b.start()
            bridges.append(b)
        t2 = time.perf_counter()
        out["construct_s"], out["start_s"] = t1 - t0, t2 - t1
        out["start_per_s"] = n / (t2 - t1)
        out["construct_start_per_s"] = n / (t2 - t0)

        # Idle: every bridge started, none has seen a byte. Let thread engines finish starting.
        threads1 = settle(thread_count, seconds=10)
        time.sleep(0.5)
        gc.collect()
        rss1 = rss_bytes()
        out["threads_before"], out["threads_after_start"] = threads0, threads1
        out["threads_added"] = threads1 - threads0
        out["threads_per_bridge"] = (threads1 - threads0) / n
        out["rss_KiB_per_idle_bridge"] = (rss1 - rss0) / n / 1024
        if core is not None:
            out["engine_stats_idle"] = core.stats()
            if core.stats()["bridges"] != n:
                errors.append(f"engine counts {core.stats()['bridges']} open bridges, expected {n}")
        running = sum(1 for b in bridges if b.running)
        if running != n:
            errors.append(f"only {running} of {n} bridges running once started (before any traffic)")

        # Traffic through every bridge while all are open.
        ends = []
        for i, ((c1, _, _, c2), (p12, p21)) in enumerate(zip(pairs, payloads)):
            ends.append(End(c1, p12, p21, i))
            ends.append(End(c2, p21, p12, i))
        total = sum(len(p) + len(q) for p, q in payloads)
        traffic = drive(
            ends,
            min(time_limit, time.monotonic() + args.traffic_seconds),
            max_events=50 * len(ends) + total // 256,
            errors=errors,
            rng=rng,
        )
        bad = [e.index for e in ends if e.got != e.expect_len or e.hash.digest() != e.expect_digest]
        if bad:
            errors.append(f"traffic: {len(bad)} of {2 * n} directions wrong (length or SHA-256), e.g. bridge {bad[0]}")
        out["traffic_bytes"], out["traffic_seconds"] = total, traffic["seconds"]
        out["traffic_MBps"] = total / traffic["seconds"] / 1e6
        out["traffic_verified_directions"] = 2 * n - len(bad)
        # Each bridge's own counts: bytes delivered in full (they may trail the peer's read
        # by a moment: the count follows the send).
        want = [(len(p), len(q)) for p, q in payloads]
        deadline = time.monotonic() + 5
        has_counts = hasattr(Bridge, "counts")  # the old core's Bridge has none
        wrong = [i for i in range(n) if has_counts and bridges[i].counts != want[i]]
        while wrong and time.monotonic() < deadline:
            time.sleep(0.05)
            wrong = [i for i in wrong if bridges[i].counts != want[i]]
        out["live_counts_checked"] = has_counts
        if wrong:
            i = wrong[0]
            errors.append(
                f"counts: {len(wrong)} bridges report wrong counts, e.g. bridge {i}: {bridges[i].counts} for {want[i]}"
            )
        running = sum(1 for b in bridges if b.running)
        if running != n:
            errors.append(f"only {running} of {n} bridges still running after the traffic")
        del ends
        gc.collect()
        out["rss_KiB_per_bridge_after_traffic"] = (rss_bytes() - rss0) / n / 1024
        if core is not None:
            out["engine_stats_after_traffic"] = core.stats()

        # stop() on all, then wait() on all.
        t3 = time.perf_counter()
        for b in bridges:
            b.stop()
        t4 = time.perf_counter()
        wait_deadline = time.monotonic() + 60
        results = [b.wait(max(0.0, wait_deadline - time.monotonic())) for b in bridges]
        t5 = time.perf_counter()
        unfinished = sum(r is None for r in results)
        if unfinished:
            errors.append(f"wait: {unfinished} of {n} bridges not ended 60 s after stop()")
        out["stop_s"], out["wait_s"] = t4 - t3, t5 - t4
        out["stop_wait_per_s"] = n / (t5 - t3)
        reasons: Dict[str, int] = {}
        miscounted = []
        for i, r in enumerate(results):
            if r is None:
                continue
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
            if (r.bytes_1_to_2, r.bytes_2_to_1) != want[i]:
                miscounted.append(i)
        out["reasons"] = reasons
        if set(reasons) - {"stopped"}:
            errors.append(f"results: reasons {reasons}, expected only 'stopped'")
        if miscounted:
            i = miscounted[0]
            errors.append(
                f"results: {len(miscounted)} wrong byte counts, e.g. bridge {i}: "
                f"{(results[i].bytes_1_to_2, results[i].bytes_2_to_1)} for {want[i]}"
            )
        not_closed = sum(1 for _, s1, s2, _ in pairs for s in (s1, s2) if s.fileno() != -1)
        if not_closed:
            errors.append(f"{not_closed} bridged sockets still open after wait()")
        out["client_ends"] = wait_eof([c for c1, _, _, c2 in pairs for c in (c1, c2)], time.monotonic() + 10)
        if out["client_ends"]["eof"] != 2 * n:
            errors.append(f"client ends after stop: {out['client_ends']} (expected {2 * n} clean EOFs)")
        if core is not None:
            out["engine_stats_after_wait"] = st = core.stats()
            if st["bridges"] != 0:
                errors.append(f"engine still counts {st['bridges']} open bridges after every wait()")
    except Exception as exc:  # report what happened, with what was measured so far
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        for b in bridges:
            if b.running:
                b.stop()
        for b in bridges:
            b.wait(max(0.0, min(10.0, time_limit - time.monotonic())))
        for s in socks:
            s.close()

    # What stays after all bridges ended and every socket is closed.
    engine_fds = core.stats()["engine_fds"] if core is not None else 0
    fds_left = settle(fd_count, target=fds_at_start + engine_fds, seconds=5)
    out["fds_leaked"] = fds_left - fds_at_start - engine_fds
    if out["fds_leaked"]:
        errors.append(f"{out['fds_leaked']} fds left open after every bridge ended and every socket closed")
    if "threads_after_start" in out:
        fixed = core.loop_threads() + 1 if core is not None else 0
        threads_left = settle(thread_count, target=out["threads_before"] + fixed, seconds=10)
        out["threads_left_after_wait"] = threads_left - out["threads_before"]
        if threads_left - out["threads_before"] > fixed:
            errors.append(f"{threads_left - out['threads_before']} threads left after every bridge ended")
    print(json.dumps(out, indent=2))
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backends", nargs="*", help="cython, pure, baseline (default: cython pure [baseline])")
    ap.add_argument("-n", type=int, default=2000, help="bridges open at once (default 2000)")
    ap.add_argument("--baseline", metavar="PATH", help="a built tree of another version: its PATH/src is imported")
    ap.add_argument("--payload", type=int, default=16384, help="mean payload bytes each way a bridge (default 16 KiB)")
    ap.add_argument(
        "--big-every",
        type=int,
        default=100,
        help="every K'th bridge carries 1 MiB each way instead (bulk/splice path; 0: none)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON, not a table")
    ap.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=12345, help=argparse.SUPPRESS)
    ap.add_argument("--traffic-seconds", type=float, default=120, help=argparse.SUPPRESS)
    ap.add_argument("--time-limit", type=float, default=400, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n < 1:
        ap.error("-n must be at least 1")
    if args.child:
        if args.child == "baseline" and not args.baseline:
            ap.error("--child baseline needs --baseline PATH")
        return main_child(args)
    if "baseline" in args.backends and not args.baseline:
        ap.error("the baseline backend needs --baseline PATH")
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
