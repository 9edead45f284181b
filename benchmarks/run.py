"""How fast is tcptotcp, and why: every relay measured side by side, in one run, on loopback.

    python benchmarks/run.py [--quick] [--relays cython,pure,socat,haproxy] [--baseline PATH]

Each relay is its own process between a load generator and an upstream (benchmarks/peers.py,
separate processes with 4 MiB buffers). Cases run interleaved (every relay once per round),
repeated; figures are medians with their spread, and ratios to "direct" (no relay at all).
--baseline PATH adds the relay "baseline": the compiled core of another built tree (PATH/src),
measured in the same rounds, and a table of this core's ratios to it.
The many-bridges case (benchmarks/many.py) runs in-process for cython, pure and baseline.
Writes benchmarks/results/<date>.json and .md, and a PNG chart when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import many  # benchmarks/many.py, beside this file

HERE = Path(__file__).resolve().parent
PEERS = [sys.executable, str(HERE / "peers.py")]
# The relays that are benchmarks/relay.py (this package); "baseline" is relay.py's "cython"
# importing the package of another tree (PYTHONPATH=<--baseline>/src).
OURS = ("cython", "cython-copy", "pure", "baseline")
# The many-bridges case (benchmarks/many.py) measures these backends, in-process.
MANY_BACKENDS = ("cython", "pure", "baseline")
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(pid: int) -> List[int]:
    """pid and all its descendants (socat forks a child per connection)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo and len(out) < 100_000:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the relay and its (live or reaped) children."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime
    return total


def machine_busy_seconds() -> float:
    """CPU time of the whole machine (all cores, user + system + interrupts), in /proc ticks.

    The relay's own CPU per GB moves with where the kernel bills loopback TCP work: a peer's
    queued segments go out, and the receiver's TCP work runs, in whichever thread's syscall
    or interrupt gets to them, so the same transfer bills the relay more or less from one
    round to the next. The machine's total (relay and peers) does not shift with that."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, irq, softirq = (int(fields[i]) for i in (0, 1, 2, 5, 6))
    return (user + nice + system + irq + softirq) / TICK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Relay:
    """A relay process listening on 127.0.0.1:port, forwarding to the upstream."""

    def __init__(self, name: str, upstream_port: int, spin: bool = False, baseline: Optional[str] = None):
        self.name = name
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.port = 0
        if name == "direct":
            self.proc = None
            self.port = upstream_port
        elif name in OURS:
            backend, env = name, None
            if name == "baseline":  # the old core: relay.py's "cython", from the other tree
                backend, env = "cython", baseline_env(baseline)
            cmd = [sys.executable, str(HERE / "relay.py"), backend, str(upstream_port)] + (["--spin"] if spin else [])
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            line = self.proc.stdout.readline()
            if not line.strip():
                self.proc.wait(10)
                raise RuntimeError(f"relay {name} exited with {self.proc.returncode} at start")
            self.port = int(line)
        elif name == "socat":
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    "socat",
                    "-b",
                    "262144",
                    f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                    f"TCP:127.0.0.1:{upstream_port}",
                ],
                stdin=subprocess.DEVNULL,
            )
        elif name in ("haproxy", "haproxy-mt"):  # haproxy-mt: nbthread = the machine's cores
            self.port = free_port()
            self._tmp = tempfile.TemporaryDirectory()
            cfg = Path(self._tmp.name) / "haproxy.cfg"
            cfg.write_text(
                "global\n  maxconn 4500\n  tune.pipesize 1048576\n"
                f"  nbthread {1 if name == 'haproxy' else os.cpu_count() or 1}\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
                "  option splice-auto\n"
                f"frontend f\n  bind 127.0.0.1:{self.port}\n  maxconn 4500\n  default_backend b\n"
                f"backend b\n  server s 127.0.0.1:{upstream_port}\n"
            )
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        else:
            raise ValueError(name)
        if name in ("socat", "haproxy", "haproxy-mt"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {self.proc.returncode} at start") from None
                    time.sleep(0.05)

    def spin_rate(self) -> float:
        assert self.proc is not None
        self.proc.stdin.write("spin\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def cpu(self) -> float:
        if self.proc and self.name in OURS:  # our relays count their own, to the nanosecond
            self.proc.stdin.write("cpu\n")
            self.proc.stdin.flush()
            return float(self.proc.stdout.readline())
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc else 0

    def close(self) -> None:
        if self.proc is not None:
            if self.name in OURS:
                try:
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.close()
                    self.proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._tmp:
            self._tmp.cleanup()


def baseline_env(path: Optional[str]) -> dict:
    """The environment that makes `import tcptotcp` load the tree at `path` (built in place)."""
    if not path:
        raise ValueError("the baseline relay needs --baseline PATH")
    src = str(Path(path).resolve() / "src")
    env = dict(os.environ)
    env.pop("TCPTOTCP_NO_EXTENSIONS", None)
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def check_baseline(path: str) -> dict:
    """Fail early unless PATH/src holds a tcptotcp whose compiled core loads; its description."""
    src = Path(path).resolve() / "src"
    probe = "import tcptotcp, json; print(json.dumps([tcptotcp.__file__, tcptotcp.BACKEND]))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=baseline_env(path),
        cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise SystemExit(f"--baseline {path}: import tcptotcp failed: {out.stderr.strip()[-500:]}")
    module, backend = json.loads(out.stdout)
    if not Path(module).resolve().is_relative_to(src):
        raise SystemExit(f"--baseline {path}: imported {module}, not from {src}")
    if backend != "cython":
        raise SystemExit(
            f"--baseline {path}: its compiled core did not load (BACKEND = {backend}); "
            f"build it: cd {path} && python setup.py build_ext --inplace"
        )
    return {"path": str(Path(path).resolve()), "commit": git_commit(Path(path)), "module": module}


def git_commit(tree: Path) -> Optional[str]:
    """The tree's short commit, "+dirty" when it has uncommitted changes; None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


def peer(*args: object, timeout: float = 600) -> dict:
    out = subprocess.run([*PEERS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"peers.py {args}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def spread(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rounds_of(args: argparse.Namespace) -> int:
    return int(args.rounds or (3 if args.quick else 5))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller transfers, fewer rounds")
    ap.add_argument(
        "--relays",
        default="cython,pure,socat,haproxy",
        help="comma-separated, of cython, cython-copy, pure, socat, haproxy, haproxy-mt "
        "(nbthread = cores) (direct always runs)",
    )
    ap.add_argument(
        "--baseline",
        metavar="PATH",
        help="add the relay 'baseline': the compiled core of the tree at PATH, built in place "
        "(git worktree add /tmp/base <commit> && cd /tmp/base && "
        "python setup.py build_ext --inplace)",
    )
    ap.add_argument(
        "--many",
        type=int,
        default=2000,
        metavar="N",
        help="bridges open at once in the many-bridges case (default 2000; 0 skips it)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="interleaved rounds (default 5, 3 with --quick): more for a ratio near 1.0 on a noisy machine",
    )
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the chart of a saved run")
    args = ap.parse_args()
    if args.replot:
        chart(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0

    wanted = [r for r in args.relays.split(",") if r]
    baseline_info = None
    if args.baseline:
        baseline_info = check_baseline(args.baseline)
        if "baseline" not in wanted:
            wanted.append("baseline")
    elif "baseline" in wanted:
        ap.error("the relay 'baseline' needs --baseline PATH")
    relays = ["direct"] + [r for r in wanted if r in OURS or shutil.which("haproxy" if r == "haproxy-mt" else r)]
    skipped = [r for r in wanted if r not in relays]
    errors: List[str] = []
    rounds = rounds_of(args)
    if rounds < 1:
        ap.error("--rounds must be at least 1")
    bulk_n = (256 if args.quick else 1024) << 20
    pings = 2000 if args.quick else 10000
    fan = {1: bulk_n, 8: bulk_n // 8, 64: bulk_n // 64, 1000: max(bulk_n // 1000, 65536)}
    # Busy interpreter: the compiled relay moves the full bulk size; the pure one, which
    # crawls at well under 1% of its speed then, a smaller amount to bound the run's time.
    spin_n = {"pure": 32 << 20}

    up = subprocess.Popen(PEERS + ["upstream"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    upstream_port = int(up.stdout.readline())
    samples: Dict[str, Dict[str, List[float]]] = {r: {} for r in relays}
    cpu_pooled: Dict[str, List[float]] = {r: [0.0, 0.0] for r in relays}  # CPU seconds, GB of bulk

    def add(relay: str, case: str, value: float) -> None:
        samples[relay].setdefault(case, []).append(value)

    running: Dict[str, Relay] = {}
    try:
        for r in relays:
            running[r] = Relay(r, upstream_port, baseline=args.baseline)
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}", file=sys.stderr)
            # Each round starts at the next relay: none always follows the same one (the one
            # before leaves 1,000 closing connections and a warm or cold CPU behind it).
            order = list(running.items())
            order = order[rnd % len(order) :] + order[: rnd % len(order)]
            for name, relay in order:
                cpu0, machine0 = relay.cpu(), machine_busy_seconds()
                b = peer("bulk", "127.0.0.1", relay.port, bulk_n)
                machine = machine_busy_seconds() - machine0
                time.sleep(0.2)  # let socat reap its child so its CPU is counted
                add(name, "bulk_GBps", b["bytes"] / b["seconds"] / 1e9)
                add(name, "machine_cpu_s_per_GB", machine / (b["bytes"] / 1e9))
                if relay.proc:
                    used = relay.cpu() - cpu0
                    add(name, "cpu_s_per_GB", used / (b["bytes"] / 1e9))
                    cpu_pooled[name][0] += used
                    cpu_pooled[name][1] += b["bytes"] / 1e9
                d = peer("duplex", "127.0.0.1", relay.port, bulk_n)
                add(name, "duplex_GBps", d["bytes"] / d["seconds"] / 1e9)
                p = peer("pingpong", "127.0.0.1", relay.port, pings)
                add(name, "p50_us", p["p50_us"])
                add(name, "p99_us", p["p99_us"])
                for conns, n in fan.items():
                    f = peer("fanout", "127.0.0.1", relay.port, conns, n)
                    add(name, f"conc{conns}_GBps", f["bytes"] / f["seconds"] / 1e9)
        # Memory of 1,000 idle bridges, and the busy interpreter: once per relay.
        for name, relay in running.items():
            if relay.proc is None:
                continue
            before = relay.rss()
            holder = subprocess.Popen(
                PEERS + ["hold", "127.0.0.1", str(relay.port), "1000"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holder.stdout.readline()
            time.sleep(1.0)
            add(name, "rss_KiB_per_idle_bridge", (relay.rss() - before) / 1000 / 1024)
            holder.stdin.close()
            holder.wait(60)
        for name in [r for r in relays if r in OURS]:
            for _ in range(rounds):
                try:
                    spinning = Relay(name, upstream_port, spin=True, baseline=args.baseline)
                    try:
                        spinning.spin_rate()
                        time.sleep(1.0)
                        solo = spinning.spin_rate()
                        b = peer("bulk", "127.0.0.1", spinning.port, spin_n.get(name, bulk_n))
                        loaded = spinning.spin_rate()
                    finally:
                        spinning.close()
                except (RuntimeError, ValueError, OSError) as exc:  # keep what was measured
                    print(f"busy interpreter, {name}: {exc}", file=sys.stderr)
                    continue
                add(name, "busy_bulk_GBps", b["bytes"] / b["seconds"] / 1e9)
                add(name, "busy_spinner_keeps", loaded / solo)
        # Many bridges in one process (benchmarks/many.py, a fresh process per backend),
        # interleaved like the relays; a wrong byte or count is an error, not a number.
        many_backends = [r for r in relays if r in MANY_BACKENDS] if args.many > 0 else []
        for rnd in range(rounds if many_backends else 0):
            print(f"many bridges, round {rnd + 1}/{rounds}", file=sys.stderr)
            for name in many_backends:
                m = many.run_child(name, args.many, args.baseline)
                if m.get("errors"):
                    errors += [f"many bridges, {name}: {e}" for e in m["errors"]]
                    continue
                for key in MANY_KEYS:
                    add(name, f"many_{key}", m[key])
    finally:
        for relay in running.values():
            relay.close()
        up.stdin.close()
        up.wait(10)

    report = build_report(samples, relays, skipped, args, bulk_n, cpu_pooled)
    report["baseline"] = baseline_info
    report["errors"] = errors
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = dt.date.today().isoformat() + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    chart(report, out / f"{stem}.png")
    if errors:
        print("ERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


def build_report(samples, relays, skipped, args, bulk_n, cpu_pooled=None) -> dict:
    stats = {r: {case: spread(v) for case, v in cases.items()} for r, cases in samples.items()}
    # socat's and haproxy's CPU counts in /proc ticks (10 ms, ~4% of one bulk round): pooled
    # over the rounds, the tick error shrinks with the total where a median keeps it.
    for r, (seconds, gigabytes) in (cpu_pooled or {}).items():
        if gigabytes:
            pooled = seconds / gigabytes
            stats[r]["cpu_s_per_GB_pooled"] = {"median": pooled, "min": pooled, "max": pooled, "n": 1}
    direct = {case: s["median"] for case, s in stats["direct"].items()}
    for r in relays:
        for case, s in stats[r].items():
            if case.endswith("GBps") and case in direct:
                s["x_direct"] = s["median"] / direct[case]
        if "p50_us" in stats[r]:
            stats[r]["p50_us"]["added_us"] = stats[r]["p50_us"]["median"] - direct["p50_us"]
        if "busy_bulk_GBps" in stats[r]:
            stats[r]["busy_bulk_GBps"]["x_unloaded"] = (
                stats[r]["busy_bulk_GBps"]["median"] / stats[r]["bulk_GBps"]["median"]
            )
    machine = (
        f"{platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "commit": git_commit(HERE.parent),
        "quick": args.quick,
        "rounds": rounds_of(args),
        "bulk_bytes": bulk_n,
        "many_bridges": args.many,
        "relays": relays,
        "skipped": skipped,
        "stats": stats,
        "samples": samples,  # every round's figure, in round order: for re-reading a run
    }
    if "cython" in stats and "baseline" in stats:
        report["new_vs_baseline"] = {
            case: stats["cython"][case]["median"] / stats["baseline"][case]["median"]
            for _, case, _ in ROWS
            if case in stats["cython"] and case in stats["baseline"] and stats["baseline"][case]["median"]
        }
        # The same ratio taken round by round (the two ran minutes apart at most), then its
        # median: a slow round for both cancels out instead of moving one median.
        report["new_vs_baseline_paired"] = {}
        for case in report["new_vs_baseline"]:
            pairs = list(zip(samples["cython"].get(case, []), samples["baseline"].get(case, [])))
            ratios = [c / b for c, b in pairs if b]
            if len(ratios) > 1:
                report["new_vs_baseline_paired"][case] = statistics.median(ratios)
    return report


ROWS = [
    ("bulk one way, GB/s", "bulk_GBps", "x_direct"),
    ("both ways at once, GB/s", "duplex_GBps", "x_direct"),
    ("CPU s per GB", "cpu_s_per_GB", None),
    ("CPU s per GB, all rounds pooled", "cpu_s_per_GB_pooled", None),
    ("machine CPU s per GB (relay and peers)", "machine_cpu_s_per_GB", None),
    ("64 B ping-pong p50, µs", "p50_us", "added_us"),
    ("64 B ping-pong p99, µs", "p99_us", None),
    ("1 bridge, GB/s", "conc1_GBps", "x_direct"),
    ("8 bridges, GB/s", "conc8_GBps", "x_direct"),
    ("64 bridges, GB/s", "conc64_GBps", "x_direct"),
    ("1000 bridges, GB/s", "conc1000_GBps", "x_direct"),
    ("RSS per idle bridge, KiB", "rss_KiB_per_idle_bridge", None),
    ("bulk with a Python thread spinning, GB/s", "busy_bulk_GBps", "x_unloaded"),
    ("spinning thread keeps (of its solo speed)", "busy_spinner_keeps", None),
    ("{many} bridges in one process: start(), bridges/s", "many_start_per_s", None),
    ("{many} bridges in one process: stop() + wait(), bridges/s", "many_stop_wait_per_s", None),
    ("{many} bridges in one process: RSS per idle bridge, KiB", "many_rss_KiB_per_idle_bridge", None),
    ("{many} bridges in one process: threads per bridge", "many_threads_per_bridge", None),
]
# many.py's figures that become the cases many_<key>.
MANY_KEYS = ("start_per_s", "stop_wait_per_s", "rss_KiB_per_idle_bridge", "threads_per_bridge")
# Which way is better, for the new-core-vs-baseline table: the cases where lower wins.
LOWER_IS_BETTER = {
    "cpu_s_per_GB",
    "cpu_s_per_GB_pooled",
    "machine_cpu_s_per_GB",
    "p50_us",
    "p99_us",
    "rss_KiB_per_idle_bridge",
    "many_rss_KiB_per_idle_bridge",
    "many_threads_per_bridge",
}


def num(x: float) -> str:
    """3 significant digits; whole numbers with thousands separators from 1,000 up."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def markdown(report: dict) -> str:
    relays, stats = report["relays"], report["stats"]
    lines = [
        f"Measured {report['date']} on {report['machine']}"
        + (" (--quick)" if report["quick"] else "")
        + (f", {report['rounds']} rounds" if report.get("rounds") else "")
        + (f", commit {report['commit']}" if report.get("commit") else ""),
        "",
        "| case | " + " | ".join(relays) + " |",
        "|---|" + "---|" * len(relays),
    ]
    for label, case, extra in ROWS:
        cells = []
        for r in relays:
            s = stats[r].get(case)
            if not s:
                cells.append("–")
                continue
            cell = num(s["median"]) if s["min"] == s["max"] else f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"
            if extra and extra in s:
                cell += {
                    "x_direct": f", {s[extra]:.2f}x direct",
                    "added_us": f", {s[extra]:+.1f}",
                    "x_unloaded": f", {s[extra]:.3f} of unloaded",
                }[extra]
            cells.append(cell)
        if any(c != "–" for c in cells):
            lines.append(f"| {label.format(many=report.get('many_bridges'))} | " + " | ".join(cells) + " |")
    if "cython" in relays and "pure" in relays:
        c, p = stats["cython"], stats["pure"]
        lines += [
            "",
            "compiled core vs pure twin: "
            f"bulk {c['bulk_GBps']['median'] / p['bulk_GBps']['median']:.2f}x, "
            f"both ways {c['duplex_GBps']['median'] / p['duplex_GBps']['median']:.2f}x, "
            f"CPU per GB {c['cpu_s_per_GB']['median'] / p['cpu_s_per_GB']['median']:.2f}x",
        ]
    if report.get("new_vs_baseline"):
        base = report.get("baseline") or {}
        lines += [
            "",
            "New core vs baseline ("
            + (f"commit {base['commit']}, " if base.get("commit") else "")
            + f"{base.get('path', '?')}), medians of the same run: ratio cython / baseline",
            "",
            "| case | cython | baseline | cython / baseline | median of per-round ratios | better when |",
            "|---|---|---|---|---|---|",
        ]
        paired = report.get("new_vs_baseline_paired", {})
        for label, case, _ in ROWS:
            if case in report["new_vs_baseline"]:
                c, b = stats["cython"][case]["median"], stats["baseline"][case]["median"]
                lines.append(
                    f"| {label.format(many=report.get('many_bridges'))} | {num(c)} | {num(b)} | "
                    f"{report['new_vs_baseline'][case]:.3g}x | "
                    + (f"{paired[case]:.3g}x" if case in paired else "–")
                    + f" | {'lower' if case in LOWER_IS_BETTER else 'higher'} |"
                )
    if report["skipped"]:
        lines += ["", "not installed, skipped: " + ", ".join(report["skipped"])]
    if report.get("errors"):
        lines += ["", "**Errors** (those measurements are left out):"] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'tcptotcp[bench]')", file=sys.stderr)
        return
    stats, relays = report["stats"], [r for r in report["relays"] if r != "direct"]
    cases = [("bulk", "bulk_GBps"), ("both ways", "duplex_GBps"), ("64 bridges", "conc64_GBps")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(relays)
    for i, r in enumerate(relays):
        vals = [stats[r].get(c, {}).get("x_direct", 0) for _, c in cases]
        ax1.bar([j + i * width for j in range(len(cases))], vals, width, label=r)
    ax1.set_xticks([j + width * (len(relays) - 1) / 2 for j in range(len(cases))], [c for c, _ in cases])
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("throughput, x direct loopback")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_ylim(0, 1.15)
    busy = [r for r in relays if "busy_bulk_GBps" in stats[r]]
    bars = ax2.bar(busy, [stats[r]["busy_bulk_GBps"]["x_unloaded"] for r in busy], color="tab:red")
    ax2.bar_label(bars, fmt="%.3f", fontsize=8)
    ax2.set_ylim(0, 1.1)
    ax2.set_title("a Python thread spins in the relay", fontsize=9)
    ax2.set_ylabel("throughput kept")
    fig.suptitle(f"tcptotcp relays, {report['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
