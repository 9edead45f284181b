"""HTTP through the relays, measured with clients nobody here wrote: ApacheBench and wrk.

    python benchmarks/http_clients.py [--quick] [--rounds N] [--relays cython,pure,haproxy,socat]

A private nginx (loopback, 1 worker process by default, access log off, a 100-byte file) is the
upstream. Each relay is its own process between the load generator and nginx:

    direct   no relay: the load generator talks to nginx itself
    cython   `python -m tcptotcp ... --backend cython`, the compiled core (what users run)
    pure     `python -m tcptotcp ... --backend pure`, the pure-Python twin
    haproxy  mode tcp, nbthread 1, generated config
    socat    TCP-LISTEN:port,fork,reuseaddr  TCP:127.0.0.1:<nginx>

Cases, interleaved (every round runs every relay once per case, in a rotated order):

    ab_c32      ab -n 20000 -c 32: a new TCP connection per request
    wrk_c32     wrk -t 2 -c 32 -d 5s --latency --timeout 2s: keep-alive
    wrk_c1000   wrk -t 2 -c 1000 -d 5s --latency --timeout 2s: keep-alive, 1,000 clients

Recorded: requests/s, p50/p99, timeouts and errors, relay CPU (utime+stime of the relay's
process tree from /proc/<pid>/stat, reaped children included) per connection in the ab case and
per request in the wrk cases, resident memory of the relay tree sampled in the middle of each
run (so with 1,000 clients connected in wrk_c1000), and the relay's open fds mid-run and after
the case (a leak shows as fds that do not go back). A tool that is not installed skips its row
and says so. Traffic goes to 127.0.0.1 only.

Writes benchmarks/results/http-<date>[-quick].json and .md, and .png when matplotlib is
installed. Other work on a shared machine moves every figure: compare relays within one run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from run import cpu_seconds, free_port, tree_pids  # one copy of the /proc helpers

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE = 100  # bytes in the served file
PATH = "/100b.txt"
ALL_RELAYS = ("direct", "cython", "pure", "haproxy", "socat")
TCPTOTCP = ("cython", "pure")
NEEDS = {"haproxy": "haproxy", "socat": "socat"}
CASES = ("ab_c32", "wrk_c32", "wrk_c1000")
CASE_TITLE = {
    "ab_c32": "ab -n {ab_requests} -c 32: a new connection per request",
    "wrk_c32": "wrk -c 32: keep-alive, 32 clients",
    "wrk_c1000": "wrk -c 1000: keep-alive, 1,000 clients",
}


# -- /proc -------------------------------------------------------------------------------------


def memory(pid: int) -> dict:
    """VmRSS summed over the tree, and PSS (shared pages split among sharers: fair for socat)."""
    rss = pss = 0
    pids = tree_pids(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return {"rss": rss, "pss": pss, "procs": len(pids)}


def open_fds(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


NETSTAT = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "SyncookiesSent", "TCPTimeouts")


def netstat() -> Dict[str, int]:
    """Machine-wide TCP counters: an accept queue that overflows shows in ListenOverflows."""
    out: Dict[str, int] = {}
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return out
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            out.update({k: int(v) for k, v in zip(names.split()[1:], values.split()[1:]) if k in NETSTAT})
    return out


def wait_port(port: int, proc: Optional[subprocess.Popen], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} at start") from None
            time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listens on 127.0.0.1:{port} after {seconds:g} s")


def stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, seconds: float = 10) -> None:
    """Stop a process we started and any descendants it left (by pid, collected before)."""
    if proc is None:
        return
    pids = tree_pids(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except OSError:
            pass
    for p in pids[1:]:  # workers / forked children still around: end them by pid
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# -- nginx -------------------------------------------------------------------------------------


class Nginx:
    def __init__(self, workers: int):
        self.tmp = tempfile.mkdtemp(prefix="tcptotcp-http-")
        os.chmod(self.tmp, 0o755)  # workers may run as nobody: they must read the page
        www = Path(self.tmp) / "www"
        www.mkdir()
        os.chmod(www, 0o755)
        page = www / PATH.lstrip("/")
        page.write_bytes((b"x" * (PAGE - 1)) + b"\n")
        os.chmod(page, 0o644)
        self.port = free_port()
        self.workers = workers
        t = self.tmp
        conf = Path(t) / "nginx.conf"
        conf.write_text(f"""\
worker_processes {workers};
worker_rlimit_nofile 16384;
daemon off;
pid {t}/nginx.pid;
error_log {t}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    default_type text/plain;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {www};
    }}
}}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-p", t + "/", "-c", str(conf), "-e", f"{t}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(t) / "stderr", "w"),
        )
        try:
            wait_port(self.port, self.proc, "nginx")
        except RuntimeError:
            print(self.errors(), file=sys.stderr)
            self.close()
            raise
        # the page is served, and is 100 bytes
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET {PATH} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while len(data) < 100000:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or len(body) != PAGE:
            raise RuntimeError(f"nginx does not serve the page: {head[:200]!r}, {len(body)} bytes")

    def errors(self) -> str:
        out = []
        for name in ("stderr", "error.log"):
            try:
                out.append((Path(self.tmp) / name).read_text()[-2000:])
            except OSError:
                pass
        return "\n".join(out).strip()

    def close(self) -> None:
        stop(self.proc, signal.SIGTERM)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- relays ------------------------------------------------------------------------------------


class Relay:
    """A relay process listening on 127.0.0.1:port and forwarding to nginx."""

    def __init__(self, name: str, upstream_port: int):
        self.name = name
        self.upstream_port = upstream_port
        self.proc: Optional[subprocess.Popen] = None
        self.tmp: Optional[str] = None
        self.log_path: Optional[Path] = None
        self.summary = ""
        self.final_log = ""
        self.starts = 0
        self.base_fds = 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        name, up = self.name, self.upstream_port
        if name == "direct":
            self.port = up
            return
        self.tmp = self.tmp or tempfile.mkdtemp(prefix=f"tcptotcp-http-{name}-")
        self.log_path = Path(self.tmp) / f"{name}-{self.starts}.log"
        log = open(self.log_path, "w")
        if name in TCPTOTCP:
            cmd = [
                sys.executable,
                "-m",
                "tcptotcp",
                "127.0.0.1:0",
                f"127.0.0.1:{up}",
                "--backend",
                name,
                "--log-level",
                "warning",
                "--max-connections",
                "4096",
            ]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            deadline = time.monotonic() + 30
            while True:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text())
                if m:
                    self.port = int(m.group(1))
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = self.log_path.read_text()[-1500:]
                    stop(self.proc)
                    raise RuntimeError(f"tcptotcp --backend {name} did not start: {text}")
                time.sleep(0.05)
        elif name == "haproxy":
            self.port = free_port()
            cfg = Path(self.tmp) / "haproxy.cfg"
            cfg.write_text(
                "global\n  nbthread 1\n  maxconn 8000\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
                f"frontend f\n  bind 127.0.0.1:{self.port}\n  maxconn 8000\n  default_backend b\n"
                f"backend b\n  server s 127.0.0.1:{up} maxconn 8000\n"
            )
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        elif name == "socat":
            self.port = free_port()
            self.proc = subprocess.Popen(
                ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr,backlog=4096", f"TCP:127.0.0.1:{up}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        else:
            raise ValueError(name)
        wait_port(self.port, self.proc, name)
        time.sleep(0.2)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def log_text(self) -> str:
        if not self.tmp:
            return ""
        out = []
        for p in sorted(Path(self.tmp).glob("*.log")):
            out.append(p.read_text(errors="replace"))
        return "".join(out)

    def close(self) -> None:
        if self.proc is not None:
            # SIGTERM: tcptotcp stops and prints its summary, haproxy and socat exit
            stop(self.proc, signal.SIGTERM)
            self.final_log = self.log_text()
            m = re.findall(r"^tcptotcp: (?!listening).*$", self.final_log, re.M)
            self.summary = m[-1] if m else ""
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- load generators ---------------------------------------------------------------------------

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNIT[m.group(2)]


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    r["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}_ms"] = wrk_ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    conn_err, read_err, write_err, timeouts = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    r["timeouts"] = timeouts
    r["errors"] = conn_err + read_err + write_err + non2xx
    r["error_detail"] = {"connect": conn_err, "read": read_err, "write": write_err, "non2xx": non2xx}
    return r


def parse_ab(out: str, csv_path: Path) -> dict:
    r: dict = {}
    m = re.search(r"Requests per second:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Complete requests:\s+(\d+)", out)
    complete = int(m.group(1)) if m else 0
    r["requests"] = complete
    m = re.search(r"Failed requests:\s+(\d+)", out)
    failed = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx responses:\s+(\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    m = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", out)
    detail = dict(zip(("connect", "receive", "length", "exceptions"), map(int, m.groups()))) if m else {}
    detail["non2xx"] = non2xx
    r["errors"] = failed + non2xx
    r["error_detail"] = detail
    r["timeouts"] = 0
    # percentiles: ab's table is whole milliseconds; its -e CSV has the same table with decimals
    table = {}
    try:
        with open(csv_path) as f:
            for row in csv.reader(f):
                if row and row[0].isdigit():
                    table[int(row[0])] = float(row[1])
    except (OSError, ValueError, IndexError):
        table = {}
    for pct in (50, 99):
        if pct in table:
            r[f"p{pct}_ms"] = table[pct]
        else:
            m = re.search(rf"^\s+{pct}%\s+(\d+)", out, re.M)
            r[f"p{pct}_ms"] = float(m.group(1)) if m else None
    return r


def run_case(case: str, relay: Relay, args, tmp: str) -> dict:
    url = f"http://127.0.0.1:{relay.port}{PATH}"
    cpu0 = relay.cpu()
    net0 = netstat()
    mid: dict = {}
    t0 = time.monotonic()
    if case == "ab_c32":
        n = args.ab_requests
        csv_path = Path(tmp) / "ab.csv"
        csv_path.unlink(missing_ok=True)
        cmd = ["ab", "-q", "-r", "-s", "10", "-n", str(n), "-c", "32", "-e", str(csv_path), url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # ab's run is short: sample early
        if relay.proc and proc.poll() is None:
            mid = memory(relay.pid)
            mid["fds"] = open_fds(relay.pid)
        try:
            out, err = proc.communicate(timeout=args.case_timeout)
        except subprocess.TimeoutExpired:
            stop(proc, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\nab killed after {args.case_timeout} s"
        r = parse_ab(out, csv_path)
        if proc.returncode != 0 or r["requests"] < n:
            # ab quits on a timeout (apr_pollset_poll ... 70007) or a connect error
            msg = (err.strip().splitlines() or ["?"])[-1]
            r["aborted"] = f"ab exit {proc.returncode}: {msg}"
            m = re.search(r"Total of (\d+) requests completed", err + out)
            done = int(m.group(1)) if m else r["requests"]
            r["errors"] += max(0, n - done)
            if "70007" in err or "timeout" in err.lower():
                r["timeouts"] += 1
        r["connections"] = r["requests"]
    else:
        conns = 32 if case == "wrk_c32" else 1000
        cmd = [
            "wrk",
            "-t",
            "2",
            "-c",
            str(conns),
            "-d",
            f"{args.duration}s",
            "--latency",
            "--timeout",
            f"{args.wrk_timeout:g}s",
            url,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(args.duration / 2)  # every client connected by now: sample the relay
        if relay.proc and proc.poll() is None:
            mid = memory(relay.pid)
            mid["fds"] = open_fds(relay.pid)
        try:
            out, err = proc.communicate(timeout=args.duration + args.case_timeout)
        except subprocess.TimeoutExpired:
            stop(proc, signal.SIGKILL)
            out, err = proc.communicate()
            err += "\nwrk killed"
        r = parse_wrk(out)
        if proc.returncode != 0 or not r["requests"]:
            r["aborted"] = f"wrk exit {proc.returncode}: {(err.strip().splitlines() or ['?'])[-1]}"
        r["connections"] = conns
    r["seconds"] = time.monotonic() - t0
    net1 = netstat()
    r["tcp"] = {k: net1[k] - net0.get(k, 0) for k in net1}  # machine-wide, over this case
    r["listen_overflows"] = r["tcp"].get("ListenOverflows", 0)
    if relay.proc:
        time.sleep(0.3)  # socat reaps its children: their CPU lands in cutime
        cpu = relay.cpu() - cpu0
        r["cpu_s"] = cpu
        if case == "ab_c32" and r["requests"]:
            r["cpu_us_per_conn"] = cpu / r["requests"] * 1e6
        elif r["requests"]:
            r["cpu_us_per_req"] = cpu / r["requests"] * 1e6
        if mid:
            r["rss_mib"] = mid["rss"] / 2**20
            r["pss_mib"] = mid["pss"] / 2**20
            r["procs_mid"] = mid["procs"]
            r["fds_mid"] = mid["fds"]
        # the relay lets go of every connection once the clients are gone (bounded wait)
        deadline = time.monotonic() + 5
        while True:
            fds = open_fds(relay.pid) if relay.alive() else 0
            if fds <= relay.base_fds + 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        r["fds_after"] = fds
    r["alive_after"] = relay.alive()
    return r


# -- report ------------------------------------------------------------------------------------


def spread(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_conn", "cpu_us_per_req", "rss_mib", "pss_mib", "fds_mid", "fds_after")


def build_report(
    runs: dict,
    relays: List[str],
    skipped: Dict[str, str],
    events: List[str],
    summaries: Dict[str, str],
    args,
    nginx_workers: int,
    seconds: float,
) -> dict:
    stats: dict = {}
    for r in relays:
        stats[r] = {}
        for case in CASES:
            rs = runs[r].get(case, [])
            if not rs:
                continue
            s: dict = {}
            for k in METRICS:
                vals = [x[k] for x in rs if x.get(k) is not None]
                if vals:
                    s[k] = spread(vals)
            s["timeouts"] = sum(x.get("timeouts", 0) for x in rs)
            s["errors"] = sum(x.get("errors", 0) for x in rs)
            s["listen_overflows"] = sum(x.get("listen_overflows", 0) for x in rs)
            s["syn_retrans"] = sum(x.get("tcp", {}).get("TCPSynRetrans", 0) for x in rs)
            s["aborted"] = [x["aborted"] for x in rs if x.get("aborted")]
            s["runs"] = len(rs)
            stats[r][case] = s
    targets = []
    if "cython" in stats and "haproxy" in stats:
        c, h = stats["cython"], stats["haproxy"]

        def ratio(case, k="rps"):
            try:
                return c[case][k]["median"] / h[case][k]["median"]
            except (KeyError, ZeroDivisionError):
                return None

        def paired(case, k="rps"):  # the same ratio within each round: less hit by noise
            out = []
            for a, b in zip(runs["cython"].get(case, []), runs["haproxy"].get(case, [])):
                if a.get(k) and b.get(k):
                    out.append(a[k] / b[k])
            return spread(out) if out else None

        rr = ratio("ab_c32")
        targets.append(
            {
                "target": "new connections/s (ab -c 32) >= 1.0x haproxy",
                "ratio": rr,
                "per_round": paired("ab_c32"),
                "met": rr is not None and rr >= 1.0,
            }
        )
        rr = ratio("wrk_c32")
        targets.append(
            {
                "target": "keep-alive req/s, 32 clients >= 1.0x haproxy",
                "ratio": rr,
                "per_round": paired("wrk_c32"),
                "met": rr is not None and rr >= 1.0,
            }
        )
        rr = ratio("wrk_c1000")
        t = c.get("wrk_c1000", {}).get("timeouts")
        targets.append(
            {
                "target": "1,000 clients: zero timeouts and req/s >= 1.0x haproxy",
                "ratio": rr,
                "per_round": paired("wrk_c1000"),
                "timeouts": t,
                "met": rr is not None and rr >= 1.0 and t == 0,
            }
        )
        rr = ratio("ab_c32", "cpu_us_per_conn")
        targets.append(
            {
                "target": "relay CPU per connection <= haproxy's",
                "ratio": rr,
                "per_round": paired("ab_c32", "cpu_us_per_conn"),
                "met": rr is not None and rr <= 1.0,
            }
        )
    machine = (
        f"{platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    versions = {}
    for tool, cmd in (
        ("nginx", ["nginx", "-v"]),
        ("haproxy", ["haproxy", "-v"]),
        ("socat", ["socat", "-V"]),
        ("wrk", ["wrk", "-v"]),
        ("ab", ["ab", "-V"]),
    ):
        if shutil.which(tool):
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                lines = (p.stdout + p.stderr).strip().splitlines()
                key = "copyright" if tool == "wrk" else "version"
                versions[tool] = next((ln for ln in lines if key in ln.lower()), lines[0] if lines else "")
            except (OSError, subprocess.TimeoutExpired):
                pass
    try:
        import tcptotcp

        versions["tcptotcp"] = f"{tcptotcp.__version__} ({tcptotcp.BACKEND})"
    except ImportError:
        pass
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "quick": args.quick,
        "rounds": args.rounds,
        "seconds": round(seconds, 1),
        "nginx_workers": nginx_workers,
        "settings": {
            "ab_requests": args.ab_requests,
            "wrk_duration_s": args.duration,
            "wrk_timeout_s": args.wrk_timeout,
            "wrk_threads": 2,
            "page_bytes": PAGE,
        },
        "versions": versions,
        "relays": relays,
        "skipped": skipped,
        "stats": stats,
        "targets": targets,
        "events": events,
        "relay_summaries": summaries,
        "runs": runs,
    }


def num(v: float, digits: str = "") -> str:
    if digits:
        return f"{v:{digits}}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt(s: Optional[dict], digits: str = "") -> str:
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return num(s["median"], digits)
    return f"{num(s['median'], digits)} ({num(s['min'], digits)}–{num(s['max'], digits)})"


def markdown(report: dict) -> str:
    relays, stats = report["relays"], report["stats"]
    st = report["settings"]
    lines = [
        f"Measured {report['date']} on {report['machine']}" + (" (--quick)" if report["quick"] else ""),
        f"{report['rounds']} round(s), relays interleaved; nginx with {report['nginx_workers']} worker "
        f"process(es), {st['page_bytes']}-byte page; wrk -t 2 -d {st['wrk_duration_s']}s --timeout "
        f"{st['wrk_timeout_s']:g}s; figures are medians (min–max over rounds). Run took {report['seconds']:.0f} s.",
        "",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    for case in CASES:
        per = "connection" if case == "ab_c32" else "request"
        rss = "relay RSS at 1,000 clients, MiB" if case == "wrk_c1000" else "relay RSS mid-run, MiB"
        lines += [
            f"### {CASE_TITLE[case].format(**st)}",
            "",
            f"| relay | req/s | p50 ms | p99 ms | timeouts / errors | relay CPU µs per {per} | {rss} "
            "| relay fds mid-run / after | accept-queue overflows / SYN retransmits |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in relays:
            s = stats[r].get(case)
            if not s:
                lines.append(f"| {r} | – | – | – | – | – | – | – | – |")
                continue
            cpu = s.get("cpu_us_per_conn" if case == "ab_c32" else "cpu_us_per_req")
            mem = fmt(s.get("rss_mib"))
            if s.get("pss_mib"):
                mem += f", PSS {num(s['pss_mib']['median'])}"
            fds = "–"
            if s.get("fds_mid"):
                fds = f"{s['fds_mid']['median']:.0f} / {s['fds_after']['max']:.0f}" if s.get("fds_after") else "–"
            err = f"{s['timeouts']} / {s['errors']}"
            if s["aborted"]:
                err += " (" + "; ".join(sorted(set(s["aborted"])))[:120] + ")"
            lines.append(
                f"| {r} | {fmt(s.get('rps'), '.0f')} | {fmt(s.get('p50_ms'))} | {fmt(s.get('p99_ms'))} "
                f"| {err} | {fmt(cpu)} | {mem if s.get('rss_mib') else '–'} | {fds} "
                f"| {s['listen_overflows']} / {s['syn_retrans']} |"
            )
        lines.append("")
    if report["targets"]:
        lines += [
            "### Targets: compiled core (cython) against haproxy, this run",
            "",
            "| target | cython / haproxy (ratio of medians) | per round | met |",
            "|---|---|---|---|",
        ]
        for t in report["targets"]:
            ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}x"
            if "timeouts" in t:
                ratio += f", {t['timeouts']} timeouts"
            per = fmt(t["per_round"], ".2f") if t["per_round"] else "–"
            lines.append(f"| {t['target']} | {ratio} | {per} | {'met' if t['met'] else 'MISSED'} |")
        lines.append("")
    if report["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()), ""]
    if report["events"]:
        lines += ["Events:", ""] + [f"- {e}" for e in report["events"]] + [""]
    if report["relay_summaries"]:
        lines += (
            ["Relay summaries at exit:", ""]
            + [f"- {k}: `{v}`" for k, v in report["relay_summaries"].items() if v]
            + [""]
        )
    lines += [
        "Relay CPU is utime+stime of the relay's process tree (reaped children included) over the "
        "case, divided by the connections ab opened or the requests wrk completed. RSS sums VmRSS "
        "over the tree (socat: one process per connection, shared pages counted each time; PSS splits "
        "them). fds after: the most the relay still held after a case, once its clients were gone. "
        "Accept-queue overflows and SYN retransmits are the machine's TcpExt counters over the case "
        "(summed over rounds): clients whose connect was dropped because a listen backlog was full "
        "and who retried after 1 s or more.",
        "",
    ]
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'tcptotcp[bench]')", file=sys.stderr)
        return
    stats, relays = report["stats"], report["relays"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(1, len(relays))
    for i, r in enumerate(relays):
        xs, vals, lo, hi = [], [], [], []
        for j, case in enumerate(CASES):
            s = stats[r].get(case, {}).get("rps")
            if not s:
                continue
            xs.append(j + i * width)
            vals.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=r)
    ax.set_xticks(
        [j + width * (len(relays) - 1) / 2 for j in range(len(CASES))],
        ["ab -c 32\n(new connection per request)", "wrk -c 32\n(keep-alive)", "wrk -c 1000\n(keep-alive)"],
    )
    ax.set_ylabel("requests/s (median, min–max)")
    ax.legend(fontsize=8)
    fig.suptitle(f"HTTP through each relay to nginx, {report['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"chart: {path}", file=sys.stderr)


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    ap.add_argument("--relays", default="cython,pure,haproxy,socat", help="besides direct, always run")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--ab-requests", type=int, default=20000, help="ab -n (enough for a steady CPU figure)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--wrk-timeout", type=int, default=2, help="wrk counts a request slower than this as a timeout")
    ap.add_argument("--case-timeout", type=int, default=120, help="kill a load generator after this long")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the chart and table of a saved run")
    args = ap.parse_args()
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        Path(args.replot).with_suffix(".md").write_text(markdown(report))
        chart(report, Path(args.replot).with_suffix(".png"))
        return 0
    args.rounds = max(1, min(args.rounds or (1 if args.quick else 3), 50))
    started = time.monotonic()

    # 1,000 clients need fds: raise the soft limit to the hard one; every child inherits it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))

    skipped: Dict[str, str] = {}
    missing_load = [t for t in ("nginx", "ab", "wrk") if not shutil.which(t)]
    if "nginx" in missing_load:
        print("nginx is not installed (apt-get install nginx-light): nothing to measure", file=sys.stderr)
        return 1
    cases = [c for c in CASES if shutil.which(c.split("_")[0])]
    for tool in missing_load:
        msg = f"{tool} not installed (apt-get install {'apache2-utils' if tool == 'ab' else tool}): its cases skipped"
        skipped[tool] = msg
        print(msg, file=sys.stderr)
    relays = ["direct"]
    for r in [x for x in args.relays.split(",") if x and x != "direct"]:
        if r not in ALL_RELAYS:
            ap.error(f"unknown relay {r}")
        if r in NEEDS and not shutil.which(NEEDS[r]):
            skipped[r] = f"{NEEDS[r]} not installed (apt-get install {NEEDS[r]})"
            print(f"{r}: skipped, {skipped[r]}", file=sys.stderr)
            continue
        if r == "cython":
            try:
                import tcptotcp

                if tcptotcp.BACKEND != "cython":
                    skipped[r] = "the compiled core is not built here"
                    print(f"cython: skipped, {skipped[r]}", file=sys.stderr)
                    continue
            except ImportError as exc:
                skipped[r] = f"tcptotcp not importable: {exc}"
                continue
        relays.append(r)

    events: List[str] = []
    runs: Dict[str, Dict[str, List[dict]]] = {r: {} for r in relays}
    summaries: Dict[str, str] = {}
    nginx: Optional[Nginx] = None
    running: Dict[str, Relay] = {}
    work = tempfile.mkdtemp(prefix="tcptotcp-http-work-")
    try:
        nginx = Nginx(args.nginx_workers)
        print(f"nginx on 127.0.0.1:{nginx.port}, {args.nginx_workers} worker(s)", file=sys.stderr)
        for r in relays:
            try:
                running[r] = Relay(r, nginx.port)
            except (RuntimeError, OSError) as exc:
                skipped[r] = f"did not start: {exc}"
                events.append(f"{r} did not start: {exc}")
                print(f"{r}: skipped, {exc}", file=sys.stderr)
        relays = [r for r in relays if r in running]
        for relay in running.values():
            relay.base_fds = open_fds(relay.pid) if relay.proc else 0
        for rnd in range(args.rounds):
            order = relays[rnd % len(relays) :] + relays[: rnd % len(relays)]
            for case in cases:
                for name in order:
                    relay = running[name]
                    if not relay.alive():
                        rc = relay.proc.returncode if relay.proc else None
                        tail = relay.log_text()[-800:].strip()
                        events.append(f"{name} was dead before round {rnd + 1} {case} (exit {rc}); log: {tail!r}")
                        print(f"!! {name} died (exit {rc}): {tail}", file=sys.stderr)
                        if relay.starts >= 3:
                            continue
                        try:
                            relay.start()
                            relay.base_fds = open_fds(relay.pid)
                        except (RuntimeError, OSError) as exc:
                            events.append(f"{name} restart failed: {exc}")
                            continue
                    r = run_case(case, relay, args, work)
                    r["round"] = rnd + 1
                    runs[name].setdefault(case, []).append(r)
                    note = ""
                    if r.get("listen_overflows"):
                        note += f"  listen overflows {r['listen_overflows']}"
                    if r.get("timeouts") or r.get("errors") or r.get("aborted"):
                        note += (
                            f"  timeouts {r['timeouts']} errors {r['errors']} {r.get('error_detail')} "
                            f"{r.get('aborted', '')}"
                        )
                        events.append(
                            f"round {rnd + 1} {case} {name}: timeouts {r['timeouts']}, errors "
                            f"{r['errors']} {r.get('error_detail')} {r.get('aborted', '')}".rstrip()
                        )
                    if not r["alive_after"]:
                        events.append(f"round {rnd + 1} {case} {name}: relay process died during the case")
                        note += "  RELAY DIED"
                    if relay.proc and r.get("fds_after", 0) > relay.base_fds + 4:
                        events.append(
                            f"round {rnd + 1} {case} {name}: still {r['fds_after']} fds 5 s after "
                            f"the clients left (baseline {relay.base_fds})"
                        )
                    p50, p99 = r.get("p50_ms"), r.get("p99_ms")
                    print(
                        f"round {rnd + 1}/{args.rounds} {case:9} {name:8} {r['rps']:9.0f} req/s  "
                        f"p50 {p50 if p50 is None else round(p50, 3)} ms  "
                        f"p99 {p99 if p99 is None else round(p99, 3)} ms"
                        + (f"  cpu {r.get('cpu_us_per_conn', r.get('cpu_us_per_req', 0)):.1f} µs" if relay.proc else "")
                        + (f"  rss {r['rss_mib']:.1f} MiB fds {r.get('fds_mid')}" if r.get("rss_mib") else "")
                        + note,
                        file=sys.stderr,
                    )
                    time.sleep(0.5)
    finally:
        for name, relay in running.items():
            relay.close()
            if relay.proc is not None:
                text = relay.final_log
                if name in TCPTOTCP:
                    summaries[name] = relay.summary
                bad = [
                    ln
                    for ln in text.splitlines()
                    if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception|\] [EW] ", ln)
                    and "listening on" not in ln
                ]
                if bad:
                    events.append(f"{name} logged {len(bad)} warning/error line(s); last: {bad[-3:]}")
        if nginx is not None:
            errs = [ln for ln in nginx.errors().splitlines() if "[error]" in ln or "[crit]" in ln or "[alert]" in ln]
            if errs:
                events.append(f"nginx logged {len(errs)} error line(s); last: {errs[-3:]}")
            nginx.close()
        shutil.rmtree(work, ignore_errors=True)

    report = build_report(
        runs, relays, skipped, events, summaries, args, args.nginx_workers, time.monotonic() - started
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "http-" + dt.date.today().isoformat() + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    chart(report, out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
