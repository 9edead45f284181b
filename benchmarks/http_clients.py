"""HTTP through the relays, measured with clients nobody here wrote: ApacheBench and wrk.

    python benchmarks/http_clients.py [--quick] [--rounds N] [--shapes plain,allow,...]
        [--relays cython,pure,haproxy,haproxy-mt,socat] [--cases ab_c32,wrk_c32,wrk_c1000] [-n N]

A private nginx (loopback, 1 worker process by default, access log off, a 100-byte file) is the
upstream. Each relay is its own process between the load generator and nginx:

    direct           no relay: the load generator talks to nginx itself
    cython           `python -m tcptotcp ... --backend cython`, the compiled core (what users run)
    cython-pyaccept  the same with TCPTOTCP_ACCEPT_IN_PYTHON=1 (the Python accept pipeline); opt-in
    pure             `python -m tcptotcp ... --backend pure`, the pure-Python twin
    haproxy          mode tcp, nbthread 1, generated config
    haproxy-mt       the same config with nbthread = the machine's cores (os.cpu_count())
    socat            TCP-LISTEN:port,fork,reuseaddr  TCP:127.0.0.1:<nginx>

Forward shapes (--shapes, default all), each configured the same way on tcptotcp and haproxy:

    plain          one upstream
    allow          --allow 127.0.0.0/8       | tcp-request connection reject if !{ src 127.0.0.0/8 }
    roundrobin     two nginx ports, --balance roundrobin | balance roundrobin, two servers
    send-proxy-v2  --send-proxy v2           | server ... send-proxy-v2; nginx listens with proxy_protocol
    accept-proxy   --accept-proxy            | bind ... accept-proxy; the load generator connects to a
                   PROXY-sending hop (haproxy, nbthread = cores, server ... send-proxy-v2), one per relay
                   under test; the hop's CPU is not counted

Before measuring, every relay of every shape is checked to do what it claims (a relay that fails
its check is dropped from that shape and the reason reported): the page comes back through it;
allow: a twin allowing only 10.0.0.0/8 refuses 127.0.0.1; roundrobin: six requests reach both
nginx ports (a response header names the port); send-proxy-v2: nginx reports the client's own
address and port from the PROXY header; accept-proxy: a client without a header is refused, and
a twin that also sends PROXY v2 to nginx passes on the client address the hop gave it.

Cases, interleaved (every round runs every shape; within a shape every relay once per case, in a
rotated order). The plain shape runs every case with every relay; the other shapes run ab_c32
(what their options cost is paid per new connection) with tcptotcp and the two haproxy:

    ab_c32      ab -n 20000 -c 32: a new TCP connection per request (-n/--ab-requests)
    wrk_c32     wrk -t 2 -c 32 -d 5s --latency --timeout 2s: keep-alive
    wrk_c1000   wrk -t 2 -c 1000 -d 5s --latency --timeout 2s: keep-alive, 1,000 clients

Recorded: requests/s, p50/p99, timeouts and errors, relay CPU (utime+stime of the relay's
process tree from /proc/<pid>/stat, reaped children included) per connection in the ab case and
per request in the wrk cases, resident memory of the relay tree sampled in the middle of each
run (so with 1,000 clients connected in wrk_c1000), and the relay's open fds mid-run and after
the case (a leak shows as fds that do not go back). Per shape: each tcptotcp relay's new
connections/s and CPU per new connection as ratios to haproxy and to haproxy-mt (ratio of the
medians, and the range of the same ratio taken within each round). A tool that is not installed
skips its row and says so. Traffic goes to 127.0.0.1 only. Every child runs in its own process
group and is stopped with its group; --budget bounds the whole run. --relay-env NAME=VALUE sets
a variable for every tcptotcp relay; --relay-env PYTHONPATH=<dir> runs the tcptotcp found there
(an unpacked wheel, or a tree built in place: <tree>/src).

Writes benchmarks/results/http-<date>[-quick][-<tag>].json and .md, and .png when matplotlib is
installed. Other work on a shared machine moves every figure: compare relays within one run.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

from run import cpu_seconds, free_port, tree_pids  # one copy of the /proc helpers

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
PAGE = 100  # bytes in the served file
PATH = "/100b.txt"
ALL_RELAYS = ("direct", "cython", "cython-pyaccept", "pure", "haproxy", "haproxy-mt", "socat")
DEFAULT_RELAYS = "cython,pure,haproxy,haproxy-mt,socat"
TCPTOTCP = ("cython", "cython-pyaccept", "pure")
BACKEND = {"cython": "cython", "cython-pyaccept": "cython", "pure": "pure"}
RELAY_ENV = {"cython-pyaccept": {"TCPTOTCP_ACCEPT_IN_PYTHON": "1"}}
HAPROXY = ("haproxy", "haproxy-mt")
NEEDS = {"haproxy": "haproxy", "haproxy-mt": "haproxy", "socat": "socat"}
CASES = ("ab_c32", "wrk_c32", "wrk_c1000")
CASE_TITLE = {
    "ab_c32": "ab -n {ab_requests} -c 32: a new connection per request",
    "wrk_c32": "wrk -c 32: keep-alive, 32 clients",
    "wrk_c1000": "wrk -c 1000: keep-alive, 1,000 clients",
}
SHAPES = ("plain", "allow", "roundrobin", "send-proxy-v2", "accept-proxy", "limits")
SHAPE_TITLE = {
    "plain": "one upstream",
    "allow": "one upstream, a source ACL (127.0.0.0/8)",
    "roundrobin": "two upstreams, round robin",
    "send-proxy-v2": "PROXY v2 header sent to nginx (listen ... proxy_protocol)",
    "accept-proxy": "PROXY v2 header accepted from a hop (haproxy, send-proxy-v2), hop CPU not counted",
    "limits": "per-client limits (1,000 open, 100,000/s) and a TCP check of the upstream every second",
}
# The limits shape's target is against the plain forward of the same relay, in the same run.
LIMITS_TARGET = 0.95
SHAPE_CASES = ("ab_c32",)  # what the shapes other than plain run
SHAPE_RELAYS = TCPTOTCP + HAPROXY  # who runs the shapes other than plain
REFUSED = ("closed", "reset")
HOP_THREADS = CORES

Run = Dict[str, Any]  # one load-generator run
Stats = Dict[str, Any]


def label(name: str, shape: str) -> str:
    return name if shape == "plain" else f"{name} [{shape}]"


# -- /proc -------------------------------------------------------------------------------------


def memory(pid: int) -> Dict[str, int]:
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


def wait_port(port: int, proc: Optional[subprocess.Popen[Any]], what: str, seconds: float = 20) -> None:
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


def spawn(cmd: List[str], log: Optional[IO[Any]] = None, **kw: Any) -> subprocess.Popen[Any]:
    """Start a child in its own process group (stop() ends the group: nginx workers, socat children)."""
    out = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, **kw)


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        pass


def stop(proc: Optional[subprocess.Popen[Any]], sig: int = signal.SIGTERM, seconds: float = 10) -> None:
    """Stop a process we started (spawn(): the leader of its own group), its group, and any
    descendants that left the group (by pid, collected before)."""
    if proc is None:
        return
    pids = tree_pids(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        killpg(proc.pid, sig)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    if pids:
        killpg(proc.pid, signal.SIGKILL)  # workers / forked children still in the group
    for p in pids[1:]:  # and any that made their own group
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def http_get(port: int, prefix: bytes = b"", timeout: float = 10.0) -> Dict[str, Any]:
    """One HTTP/1.0 GET over a new connection to 127.0.0.1:port, `prefix` sent first.

    outcome: "response" (status, headers, body set), "closed" or "reset" (the peer ended the
    connection before any byte of a response: refused), "timeout", or "connect-refused"."""
    r: Dict[str, Any] = {"outcome": "", "status": None, "headers": {}, "body": b"", "local_port": 0}
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionResetError:  # accepted and reset at once (a connection-time reject)
        r["outcome"] = "reset"
        return r
    except OSError as exc:
        r["outcome"] = f"connect-refused ({exc})"
        return r
    data = b""
    with s:
        r["local_port"] = s.getsockname()[1]
        deadline = time.monotonic() + timeout
        try:
            s.sendall(prefix + f"GET {PATH} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            while len(data) < 100000 and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            r["outcome"] = "response" if data else "closed"
        except socket.timeout:
            r["outcome"] = "response" if data else "timeout"
        except OSError:  # reset (or a write into a socket the peer already closed)
            r["outcome"] = "response" if data else "reset"
    if data:
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        r["status"] = lines[0]
        r["headers"] = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        r["body"] = body
    return r


def served(r: Dict[str, Any]) -> bool:
    return bool(r["status"] and r["status"].startswith("HTTP/1.1 200") and len(r["body"]) == PAGE)


def describe(r: Dict[str, Any]) -> str:
    if r["status"]:
        return f"{r['status']!r}, {len(r['body'])} body bytes"
    return str(r["outcome"])


# -- nginx -------------------------------------------------------------------------------------


class Nginx:
    """port: the plain server; rr_ports: two ports of a server that names the port it was reached
    on (X-Server-Port); pp_port: a `listen ... proxy_protocol` server that echoes the address the
    PROXY header gave (X-Proxy-Addr)."""

    def __init__(self, workers: int):
        self.tmp = tempfile.mkdtemp(prefix="tcptotcp-http-")
        self.proc: Optional[subprocess.Popen[Any]] = None
        os.chmod(self.tmp, 0o755)  # workers may run as nobody: they must read the page
        www = Path(self.tmp) / "www"
        www.mkdir()
        os.chmod(www, 0o755)
        page = www / PATH.lstrip("/")
        page.write_bytes((b"x" * (PAGE - 1)) + b"\n")
        os.chmod(page, 0o644)
        ports: List[int] = []
        for _ in range(100):
            if len(ports) == 4:
                break
            p = free_port()
            if p not in ports:
                ports.append(p)
        self.port, rr1, rr2, self.pp_port = ports
        self.rr_ports = [rr1, rr2]
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
    server {{
        listen 127.0.0.1:{rr1} backlog=4096;
        listen 127.0.0.1:{rr2} backlog=4096;
        root {www};
        add_header X-Server-Port $server_port always;
    }}
    server {{
        listen 127.0.0.1:{self.pp_port} proxy_protocol backlog=4096;
        root {www};
        add_header X-Proxy-Addr "$proxy_protocol_addr:$proxy_protocol_port" always;
    }}
}}
""")
        try:
            self.proc = spawn(
                ["nginx", "-p", t + "/", "-c", str(conf), "-e", f"{t}/error.log"], open(Path(t) / "stderr", "w")
            )
            wait_port(self.port, self.proc, "nginx")
            self.check()
        except (RuntimeError, OSError):
            print(self.errors(), file=sys.stderr)
            self.close()
            raise

    def check(self) -> None:
        """Every server serves the 100-byte page, and says what it is meant to say."""
        r = http_get(self.port, timeout=5)
        if not served(r):
            raise RuntimeError(f"nginx does not serve the page: {describe(r)}")
        for p in self.rr_ports:
            r = http_get(p, timeout=5)
            if not served(r) or r["headers"].get("x-server-port") != str(p):
                raise RuntimeError(f"nginx on {p}: {describe(r)}, headers {r['headers']}")
        r = http_get(self.pp_port, b"PROXY TCP4 127.0.0.9 127.0.0.1 1111 2222\r\n", timeout=5)
        if not served(r) or r["headers"].get("x-proxy-addr") != "127.0.0.9:1111":
            raise RuntimeError(f"nginx proxy_protocol server: {describe(r)}, headers {r['headers']}")

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


def tcptotcp_shape(shape: str, nginx: Nginx, variant: str = "") -> Tuple[List[str], List[str]]:
    """(upstreams, options) of the tcptotcp command for a shape. variant "refuse": the ACL leaves
    loopback out; "forward": accept-proxy that also sends PROXY v2 on (to nginx's proxy_protocol port)."""
    up = [f"127.0.0.1:{nginx.port}"]
    if shape == "allow":
        return up, ["--allow", "10.0.0.0/8" if variant == "refuse" else "127.0.0.0/8"]
    if shape == "roundrobin":
        return [f"127.0.0.1:{p}" for p in nginx.rr_ports], ["--balance", "roundrobin"]
    if shape == "send-proxy-v2":
        return [f"127.0.0.1:{nginx.pp_port}"], ["--send-proxy", "v2"]
    if shape == "accept-proxy":
        if variant == "forward":
            return [f"127.0.0.1:{nginx.pp_port}"], ["--accept-proxy", "--send-proxy", "v2"]
        return up, ["--accept-proxy"]
    if shape == "limits":
        per_client = "1" if variant == "refuse" else "1000"
        return up, ["--max-per-client", per_client, "--rate-per-client", "100000", "--check-interval", "1"]
    return up, []


def haproxy_config(shape: str, port: int, threads: int, nginx: Nginx, variant: str = "") -> str:
    """The same shape in haproxy: one frontend, one backend, mode tcp."""
    bind = f"127.0.0.1:{port}" + (" accept-proxy" if shape == "accept-proxy" else "")
    rules = ""
    if shape == "allow":
        net = "10.0.0.0/8" if variant == "refuse" else "127.0.0.0/8"
        rules = f"  tcp-request connection reject if !{{ src {net} }}\n"
    if shape == "limits":  # a stick table per source address, as tcptotcp's client table
        rules = (
            "  stick-table type ip size 100k expire 10s store conn_cur,conn_rate(1s)\n"
            "  tcp-request connection track-sc0 src\n"
            f"  tcp-request connection reject if {{ sc0_conn_cur gt {1 if variant == 'refuse' else 1000} }} "
            "|| { sc0_conn_rate gt 100000 }\n"
        )
        servers = f"  server s 127.0.0.1:{nginx.port} maxconn 8000 check inter 1s\n"
    if shape == "roundrobin":
        servers = "  balance roundrobin\n" + "".join(
            f"  server s{i} 127.0.0.1:{p} maxconn 8000\n" for i, p in enumerate(nginx.rr_ports)
        )
    elif shape == "send-proxy-v2" or (shape == "accept-proxy" and variant == "forward"):
        servers = f"  server s 127.0.0.1:{nginx.pp_port} maxconn 8000 send-proxy-v2\n"
    elif shape != "limits":
        servers = f"  server s 127.0.0.1:{nginx.port} maxconn 8000\n"
    return (
        f"global\n  nbthread {threads}\n  maxconn 8000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        f"frontend f\n  bind {bind}\n  maxconn 8000\n{rules}  default_backend b\n"
        f"backend b\n{servers}"
    )


def hop_config(port: int, target: int) -> str:
    """The PROXY-sending hop in front of an accept-proxy relay (not measured)."""
    return (
        f"global\n  nbthread {HOP_THREADS}\n  maxconn 8000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        f"frontend hop\n  bind 127.0.0.1:{port}\n  maxconn 8000\n  default_backend b\n"
        f"backend b\n  server relay 127.0.0.1:{target} maxconn 8000 send-proxy-v2\n"
    )


class Relay:
    """A relay process listening on 127.0.0.1:listen_port and forwarding to nginx in a shape.

    port is where the load generator connects: listen_port, or the hop's port (accept-proxy)."""

    def __init__(
        self,
        name: str,
        nginx: Nginx,
        shape: str = "plain",
        variant: str = "",
        env: Optional[Dict[str, str]] = None,
    ):
        self.name = name
        self.shape = shape
        self.variant = variant
        self.nginx = nginx
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen[Any]] = None
        self.hop: Optional[subprocess.Popen[Any]] = None
        self.tmp: Optional[str] = None
        self.log_path: Optional[Path] = None
        self.log_marks: Dict[str, int] = {}  # log bytes written by start-up and checks, not scanned
        self.summary = ""
        self.final_log = ""
        self.config = ""  # what runs, for the report
        self.check = ""
        self.starts = 0
        self.base_fds = 0
        self.port = 0
        self.listen_port = 0
        try:
            self.start()
        except BaseException:
            self.close()  # a hop or a relay that did start, and the temporary directory
            raise

    def start(self) -> None:
        stop(self.hop)
        self.hop = None
        self.starts += 1
        name, shape, nginx = self.name, self.shape, self.nginx
        if name == "direct":
            self.port = self.listen_port = nginx.port
            self.config = "the load generator to nginx"
            return
        self.tmp = self.tmp or tempfile.mkdtemp(prefix=f"tcptotcp-http-{name}-{shape}-")
        self.log_path = Path(self.tmp) / f"{name}-{self.starts:03d}.log"
        log = open(self.log_path, "w")
        try:
            self._start(name, shape, nginx, log)
        finally:
            log.close()  # the child has its own copy
        self.mark_log()
        time.sleep(0.2)

    def _start(self, name: str, shape: str, nginx: Nginx, log: IO[Any]) -> None:
        assert self.log_path is not None and self.tmp is not None
        if name in TCPTOTCP:
            ups, opts = tcptotcp_shape(shape, nginx, self.variant)
            base = ["--backend", BACKEND[name], "--log-level", "warning", "--max-connections", "4096"]
            cmd = [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", *ups, *base, *opts]
            envs = {**RELAY_ENV.get(name, {}), **self.env}
            self.config = " ".join([*(f"{k}={v}" for k, v in envs.items()), "tcptotcp", *cmd[3:]])
            self.proc = spawn(cmd, log, env={**os.environ, **envs})
            deadline = time.monotonic() + 30
            while True:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text())
                if m:
                    self.listen_port = int(m.group(1))
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = self.log_path.read_text()[-1500:]
                    stop(self.proc)
                    raise RuntimeError(f"tcptotcp --backend {BACKEND[name]} did not start: {text}")
                time.sleep(0.05)
        elif name in HAPROXY:
            self.listen_port = free_port()
            cfg = Path(self.tmp) / f"haproxy-{self.starts}.cfg"
            text = haproxy_config(shape, self.listen_port, 1 if name == "haproxy" else CORES, nginx, self.variant)
            cfg.write_text(text)
            self.config = "; ".join(ln.strip() for ln in text.splitlines())
            self.proc = spawn(["haproxy", "-db", "-f", str(cfg)], log)
        elif name == "socat" and shape == "plain":
            self.listen_port = free_port()
            cmd = [
                "socat",
                f"TCP-LISTEN:{self.listen_port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                f"TCP:127.0.0.1:{nginx.port}",
            ]
            self.config = " ".join(cmd)
            self.proc = spawn(cmd, log)
        else:
            raise ValueError(f"{name} does not run the {shape} shape")
        wait_port(self.listen_port, self.proc, name)
        self.port = self.listen_port
        if shape == "accept-proxy":
            hop_port = free_port()
            cfg = Path(self.tmp) / f"hop-{self.starts}.cfg"
            cfg.write_text(hop_config(hop_port, self.listen_port))
            self.hop = spawn(["haproxy", "-db", "-f", str(cfg)], log)
            wait_port(hop_port, self.hop, f"{name}'s PROXY hop")
            self.port = hop_port

    def mark_log(self) -> None:
        """What the log holds now (start-up, checks) is not scanned for warnings at the end."""
        if self.log_path is not None:
            try:
                self.log_marks[self.log_path.name] = self.log_path.stat().st_size
            except OSError:
                pass

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return (self.proc is None or self.proc.poll() is None) and (self.hop is None or self.hop.poll() is None)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def log_text(self, marked: bool = False) -> str:
        """The logs of every start; marked: without what start-up and the checks wrote."""
        if not self.tmp:
            return ""
        out = []
        for p in sorted(Path(self.tmp).glob("*.log")):
            text = p.read_bytes()
            if marked:
                text = text[self.log_marks.get(p.name, 0) :]
            out.append(text.decode(errors="replace"))
        return "".join(out)

    def close(self) -> None:
        stop(self.hop, signal.SIGTERM)
        if self.proc is not None:
            # SIGTERM: tcptotcp stops and prints its summary, haproxy and socat exit
            stop(self.proc, signal.SIGTERM)
            self.final_log = self.log_text(marked=True)
            m = re.findall(r"^tcptotcp: (?!listening).*$", self.log_text(), re.M)
            self.summary = m[-1] if m else ""
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def verify(relay: Relay, env: Dict[str, str]) -> Tuple[bool, str]:
    """Does this relay do what its shape claims? (ok, what was seen)"""
    nginx, shape, name = relay.nginx, relay.shape, relay.name
    r = http_get(relay.port)
    if not served(r):
        return False, f"a GET through it: {describe(r)}"
    notes = ["serves the page"]
    if shape == "allow":
        twin = Relay(name, nginx, shape, "refuse", env)
        try:
            r = http_get(twin.port)
        finally:
            twin.close()
        if r["outcome"] not in REFUSED:
            return False, f"a twin allowing only 10.0.0.0/8 let 127.0.0.1 through: {describe(r)}"
        notes.append(f"a twin allowing only 10.0.0.0/8 refused 127.0.0.1 ({r['outcome']})")
    elif shape == "roundrobin":
        seen = [http_get(relay.port)["headers"].get("x-server-port") for _ in range(6)]
        if set(seen) != {str(p) for p in nginx.rr_ports}:
            return False, f"6 GETs reached nginx ports {seen}, not both of {nginx.rr_ports}"
        notes.append(f"6 GETs reached nginx ports {','.join(str(x) for x in seen)}")
    elif shape == "send-proxy-v2":
        addr, want = r["headers"].get("x-proxy-addr"), f"127.0.0.1:{r['local_port']}"
        if addr != want:
            return False, f"nginx saw PROXY address {addr!r}, the client was {want}"
        notes.append(f"nginx saw the client's own address in the PROXY header ({addr})")
    elif shape == "accept-proxy":
        r = http_get(relay.listen_port)  # no header
        if r["outcome"] not in REFUSED:
            return False, f"a client without a PROXY header was not refused: {describe(r)}"
        notes.append(f"a client without a PROXY header was refused ({r['outcome']})")
        twin = Relay(name, nginx, shape, "forward", env)
        try:
            r = http_get(twin.port)
        finally:
            twin.close()
        addr, want = r["headers"].get("x-proxy-addr"), f"127.0.0.1:{r['local_port']}"
        if not served(r) or addr != want:
            return False, f"a twin sending PROXY v2 on gave nginx {addr!r} ({describe(r)}), the client was {want}"
        notes.append(f"a twin sending PROXY v2 on gave nginx the address the hop sent ({addr})")
    elif shape == "limits":
        twin = Relay(name, nginx, shape, "refuse", env)
        try:
            with socket.create_connection(("127.0.0.1", twin.port), timeout=5):  # its one connection
                time.sleep(0.2)
                r = http_get(twin.port)
        finally:
            twin.close()
        if r["outcome"] not in REFUSED:
            return False, f"a twin allowing 1 connection per client let a second through: {describe(r)}"
        notes.append(f"a twin allowing 1 connection per client refused a second ({r['outcome']})")
    relay.mark_log()
    return True, "; ".join(notes)


# -- load generators ---------------------------------------------------------------------------


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNIT[m.group(2)]


def parse_wrk(out: str) -> Run:
    r: Run = {}
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


def parse_ab(out: str, csv_path: Path) -> Run:
    r: Run = {}
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
    detail: Dict[str, int] = (
        dict(zip(("connect", "receive", "length", "exceptions"), map(int, m.groups()))) if m else {}
    )
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


@contextlib.contextmanager
def generator(proc: subprocess.Popen[Any]) -> Iterator[None]:
    """A load generator does not outlive an exception (SIGTERM, Ctrl-C) in the run."""
    try:
        yield
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise


def run_case(case: str, relay: Relay, args: argparse.Namespace, tmp: str) -> Run:
    url = f"http://127.0.0.1:{relay.port}{PATH}"
    cpu0 = relay.cpu()
    net0 = netstat()
    mid: Dict[str, int] = {}
    t0 = time.monotonic()
    if case == "ab_c32":
        n = args.ab_requests
        csv_path = Path(tmp) / "ab.csv"
        csv_path.unlink(missing_ok=True)
        cmd = ["ab", "-q", "-r", "-s", "10", "-n", str(n), "-c", "32", "-e", str(csv_path), url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        with generator(proc):
            time.sleep(0.3)  # ab's run is short: sample early
            if relay.proc and proc.poll() is None:
                mid = memory(relay.proc.pid)
                mid["fds"] = open_fds(relay.proc.pid)
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
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        with generator(proc):
            time.sleep(args.duration / 2)  # every client connected by now: sample the relay
            if relay.proc and proc.poll() is None:
                mid = memory(relay.proc.pid)
                mid["fds"] = open_fds(relay.proc.pid)
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
            fds = open_fds(relay.proc.pid) if relay.alive() else 0
            if fds <= relay.base_fds + 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        r["fds_after"] = fds
    r["alive_after"] = relay.alive()
    return r


# -- report ------------------------------------------------------------------------------------


def spread(values: List[float]) -> Stats:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_conn", "cpu_us_per_req", "rss_mib", "pss_mib", "fds_mid", "fds_after")


def case_stats(runs: Dict[str, Dict[str, List[Run]]], relays: List[str]) -> Dict[str, Dict[str, Stats]]:
    stats: Dict[str, Dict[str, Stats]] = {}
    for r in relays:
        stats[r] = {}
        for case in CASES:
            rs = runs.get(r, {}).get(case, [])
            if not rs:
                continue
            s: Stats = {}
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
    return stats


def ratio_of(
    runs: Dict[str, Dict[str, List[Run]]], stats: Dict[str, Dict[str, Stats]], a: str, b: str, case: str, k: str
) -> Tuple[Optional[float], Optional[Stats]]:
    """a's median over b's, and the same ratio within each round (less hit by noise)."""
    try:
        ratio: Optional[float] = stats[a][case][k]["median"] / stats[b][case][k]["median"]
    except (KeyError, ZeroDivisionError):
        ratio = None
    theirs = {x.get("round"): x for x in runs.get(b, {}).get(case, [])}
    per = []
    for x in runs.get(a, {}).get(case, []):
        y = theirs.get(x.get("round"))
        if y and x.get(k) and y.get(k):
            per.append(x[k] / y[k])
    return ratio, (spread(per) if per else None)


def compare(
    runs: Dict[str, Dict[str, List[Run]]], stats: Dict[str, Dict[str, Stats]], a: str, b: str
) -> Dict[str, Any]:
    """New connections/s and relay CPU per new connection (ab_c32) of relay a against relay b."""
    conn, conn_per = ratio_of(runs, stats, a, b, "ab_c32", "rps")
    cpu, cpu_per = ratio_of(runs, stats, a, b, "ab_c32", "cpu_us_per_conn")
    return {
        "conn_ratio": conn,
        "conn_per_round": conn_per,
        "cpu_ratio": cpu,
        "cpu_per_round": cpu_per,
        "met": conn is not None and cpu is not None and conn >= 1.0 and cpu <= 1.0,
    }


def plain_targets(runs: Dict[str, Dict[str, List[Run]]], stats: Dict[str, Dict[str, Stats]]) -> List[Dict[str, Any]]:
    """The compiled core against haproxy (one thread) in the plain shape, every case."""
    if "cython" not in stats or "haproxy" not in stats:
        return []
    targets = []
    for case, k, target, le in (
        ("ab_c32", "rps", "new connections/s (ab -c 32) >= 1.0x haproxy", False),
        ("wrk_c32", "rps", "keep-alive req/s, 32 clients >= 1.0x haproxy", False),
        ("wrk_c1000", "rps", "1,000 clients: zero timeouts and req/s >= 1.0x haproxy", False),
        ("ab_c32", "cpu_us_per_conn", "relay CPU per connection <= haproxy's", True),
    ):
        rr, per = ratio_of(runs, stats, "cython", "haproxy", case, k)
        if rr is None and case not in stats["cython"]:
            continue  # the case did not run
        t: Dict[str, Any] = {"target": target, "ratio": rr, "per_round": per}
        met = rr is not None and (rr <= 1.0 if le else rr >= 1.0)
        if case == "wrk_c1000":
            t["timeouts"] = stats["cython"].get(case, {}).get("timeouts")
            met = met and t["timeouts"] == 0
        t["met"] = met
        targets.append(t)
    return targets


def versions(tcptotcp_version: str) -> Dict[str, str]:
    out = {"tcptotcp": tcptotcp_version}
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
                out[tool] = next((ln for ln in lines if key in ln.lower()), lines[0] if lines else "")
            except (OSError, subprocess.TimeoutExpired):
                pass
    return out


def tcptotcp_info(env: Dict[str, str]) -> Tuple[str, str]:
    """(backend, version) of the tcptotcp the relays run: this interpreter with their environment
    (--relay-env PYTHONPATH=<a built tree> measures another tree)."""
    full = dict(os.environ)
    full.update(env)
    code = "import tcptotcp; print(tcptotcp.BACKEND, tcptotcp.__version__, tcptotcp.__file__)"
    try:
        p = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"not importable: {exc}"
    words = p.stdout.split(maxsplit=2)
    if p.returncode != 0 or len(words) != 3:
        return "", "not importable: " + ((p.stderr.strip().splitlines() or ["?"])[-1])
    backend, version, path = words
    return backend, f"{version} ({backend}, {Path(path.strip()).parent})"


def build_report(
    runs: Dict[str, Dict[str, Dict[str, List[Run]]]],
    plan: List[Tuple[str, List[str], List[str]]],
    info: Dict[str, Dict[str, Dict[str, str]]],
    skipped: Dict[str, str],
    events: List[str],
    summaries: Dict[str, str],
    args: argparse.Namespace,
    seconds: float,
    tcptotcp_version: str,
) -> Dict[str, Any]:
    shapes: Dict[str, Any] = {}
    for shape, names, _ in plan:
        rs = runs.get(shape, {})
        names = [n for n in names if n in rs]
        stats = case_stats(rs, names)
        vs = {
            t: {h: compare(rs, stats, t, h) for h in HAPROXY if h in stats}
            for t in names
            if t in TCPTOTCP and "ab_c32" in stats.get(t, {})
        }
        shapes[shape] = {
            "title": SHAPE_TITLE[shape],
            "relays": names,
            "configs": {n: info.get(shape, {}).get(n, {}).get("config", "") for n in names},
            "checks": {n: info.get(shape, {}).get(n, {}).get("check", "") for n in names},
            "stats": stats,
            "vs": vs,
            "runs": rs if shape != "plain" else "see runs",
        }
    plain = shapes.get("plain", {})
    plain_runs = runs.get("plain", {})
    machine = (
        f"{platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{CORES} cores, Python {platform.python_version()}"
    )
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "quick": args.quick,
        "rounds": args.rounds,
        "seconds": round(seconds, 1),
        "nginx_workers": args.nginx_workers,
        "settings": {
            "ab_requests": args.ab_requests,
            "wrk_duration_s": args.duration,
            "wrk_timeout_s": args.wrk_timeout,
            "wrk_threads": 2,
            "page_bytes": PAGE,
            "cases": args.cases,
            "shapes": [s for s, _, _ in plan],
            "haproxy_mt_threads": CORES,
            "hop_threads": HOP_THREADS,
            "relay_env": args.relay_env,
        },
        "versions": versions(tcptotcp_version),
        "relays": plain.get("relays", []),
        "skipped": skipped,
        "stats": plain.get("stats", {}),
        "targets": plain_targets(plain_runs, plain.get("stats", {})),
        "shapes": shapes,
        "events": events,
        "relay_summaries": summaries,
        "runs": plain_runs,
    }


def num(v: float, digits: str = "") -> str:
    if digits:
        return f"{v:{digits}}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt(s: Optional[Stats], digits: str = "") -> str:
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return num(s["median"], digits)
    return f"{num(s['median'], digits)} ({num(s['min'], digits)}–{num(s['max'], digits)})"


def fmt_ratio(ratio: Optional[float], per: Optional[Stats]) -> str:
    if ratio is None:
        return "–"
    out = f"{ratio:.2f}x"
    if per and per["n"] > 1:
        out += f" ({per['min']:.2f}–{per['max']:.2f})"
    return out


def shapes_markdown(report: Dict[str, Any]) -> List[str]:
    shapes: Dict[str, Any] = report.get("shapes") or {}
    if not any(s.get("vs") or s["relays"] for s in shapes.values()):
        return []
    st = report["settings"]
    mt = st.get("haproxy_mt_threads", "cores")
    lines = [
        f"### New connections per forward shape: ab -n {st['ab_requests']} -c 32",
        "",
        f"haproxy: nbthread 1; haproxy-mt: nbthread {mt}. Ratios are of the medians over rounds, "
        "with the range of the same ratio taken within each round. Target: new connections/s >= 1.0x "
        "and CPU per new connection <= 1.0x, against both.",
        "",
        "| shape | relay | new conn/s | p99 ms | timeouts / errors | relay CPU µs per conn "
        "| conn/s vs haproxy | conn/s vs haproxy-mt | CPU vs haproxy | CPU vs haproxy-mt | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, sh in shapes.items():
        for r in sh["relays"]:
            s = sh["stats"].get(r, {}).get("ab_c32")
            if not s:
                continue
            vs = sh["vs"].get(r, {})
            cells = []
            for key in ("conn", "cpu"):
                for h in HAPROXY:
                    c = vs.get(h)
                    cells.append(fmt_ratio(c[f"{key}_ratio"], c[f"{key}_per_round"]) if c else "–")
            if vs and all(h in vs for h in HAPROXY):
                target = "met" if all(vs[h]["met"] for h in HAPROXY) else "MISSED"
            else:
                target = "–"
            err = f"{s['timeouts']} / {s['errors']}"
            if s["aborted"]:
                err += " (" + "; ".join(sorted(set(s["aborted"])))[:120] + ")"
            lines.append(
                f"| {shape} | {r} | {fmt(s.get('rps'), '.0f')} | {fmt(s.get('p99_ms'))} | {err} "
                f"| {fmt(s.get('cpu_us_per_conn'))} | " + " | ".join(cells) + f" | {target} |"
            )
    lines += limits_lines(shapes)
    lines += ["", "What each shape runs, and what the check before the rounds saw:", ""]
    for shape, sh in shapes.items():
        lines.append(f"- **{shape}** ({sh['title']}):")
        for r in sh["relays"]:
            cfg = sh["configs"].get(r, "")
            chk = sh["checks"].get(r, "")
            lines.append(f"  - {r}: `{cfg}`" + (f" — {chk}" if chk else ""))
    lines.append("")
    return lines


def limits_lines(shapes: Dict[str, Any]) -> List[str]:
    """Each relay's limits shape against its own plain forward (same run): the cost of the limits."""
    limits, plain = shapes.get("limits"), shapes.get("plain")
    if not limits or not plain:
        return []
    lines = [
        "",
        f"Per-client limits and checks against the same relay's plain forward (target: new connections/s "
        f">= {LIMITS_TARGET}x):",
        "",
        "| relay | conn/s limits / plain | CPU per conn limits / plain | target |",
        "|---|---|---|---|",
    ]
    for r in limits["relays"]:
        a, b = limits["stats"].get(r, {}).get("ab_c32"), plain["stats"].get(r, {}).get("ab_c32")
        if not a or not b or not a.get("rps") or not b.get("rps") or not b["rps"]["median"]:
            continue
        conn = a["rps"]["median"] / b["rps"]["median"]  # (medians over the same rounds)
        cpu_a, cpu_b = a.get("cpu_us_per_conn"), b.get("cpu_us_per_conn")
        cpu = cpu_a["median"] / cpu_b["median"] if cpu_a and cpu_b and cpu_b["median"] else float("nan")
        met = "met" if conn >= LIMITS_TARGET else "MISSED"
        lines.append(f"| {r} | {conn:.2f}x | {cpu:.2f}x | {met} |")
    return lines


def markdown(report: Dict[str, Any]) -> str:
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
        if not any(stats.get(r, {}).get(case) for r in relays):
            continue
        per = "connection" if case == "ab_c32" else "request"
        rss = "relay RSS at 1,000 clients, MiB" if case == "wrk_c1000" else "relay RSS mid-run, MiB"
        lines += [
            f"### {CASE_TITLE[case].format(**st)}" + (" (plain: one upstream)" if report.get("shapes") else ""),
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
    lines += shapes_markdown(report)
    hop = "accept-proxy" in (report.get("shapes") or {})
    if report["targets"]:
        lines += [
            "### Targets: compiled core (cython) against haproxy"
            + (" (nbthread 1), plain shape" if report.get("shapes") else "")
            + ", this run",
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
        "case, divided by the connections ab opened or the requests wrk completed"
        + (" (accept-proxy: the PROXY-sending hop in front is a separate process, not counted)" if hop else "")
        + ". RSS sums VmRSS "
        "over the tree (socat: one process per connection, shared pages counted each time; PSS splits "
        "them). fds after: the most the relay still held after a case, once its clients were gone. "
        "Accept-queue overflows and SYN retransmits are the machine's TcpExt counters over the case "
        "(summed over rounds): clients whose connect was dropped because a listen backlog was full "
        "and who retried after 1 s or more.",
        "",
    ]
    return "\n".join(lines)


def chart(report: Dict[str, Any], path: Path) -> None:
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


def pick(text: str, allowed: Tuple[str, ...], what: str, ap: argparse.ArgumentParser) -> List[str]:
    out = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        if x not in allowed:
            ap.error(f"unknown {what} {x!r}: one of {', '.join(allowed)}")
        if x not in out:
            out.append(x)
    return out


def measure(
    rnd: int, shape: str, case: str, relay: Relay, args: argparse.Namespace, work: str, events: List[str]
) -> Optional[Run]:
    """One load-generator run against one relay (restarted first if it died: at most 3 starts)."""
    name = label(relay.name, shape)
    if not relay.alive():
        rc = relay.proc.returncode if relay.proc else None
        tail = relay.log_text()[-800:].strip()
        events.append(f"{name} was dead before round {rnd + 1} {case} (exit {rc}); log: {tail!r}")
        print(f"!! {name} died (exit {rc}): {tail}", file=sys.stderr)
        if relay.starts >= 3:
            return None
        try:
            stop(relay.proc)
            relay.start()
            relay.base_fds = open_fds(relay.proc.pid) if relay.proc else 0
        except (RuntimeError, OSError) as exc:
            events.append(f"{name} restart failed: {exc}")
            return None
    r = run_case(case, relay, args, work)
    r["round"] = rnd + 1
    note = ""
    if r.get("listen_overflows"):
        note += f"  listen overflows {r['listen_overflows']}"
    if r.get("timeouts") or r.get("errors") or r.get("aborted"):
        note += f"  timeouts {r['timeouts']} errors {r['errors']} {r.get('error_detail')} {r.get('aborted', '')}"
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
        f"round {rnd + 1}/{args.rounds} {shape:13} {case:9} {relay.name:15} {r['rps']:9.0f} req/s  "
        f"p50 {p50 if p50 is None else round(p50, 3)} ms  "
        f"p99 {p99 if p99 is None else round(p99, 3)} ms"
        + (f"  cpu {r.get('cpu_us_per_conn', r.get('cpu_us_per_req', 0)):.1f} µs" if relay.proc else "")
        + (f"  rss {r['rss_mib']:.1f} MiB fds {r.get('fds_mid')}" if r.get("rss_mib") else "")
        + note,
        file=sys.stderr,
    )
    return r


def on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the finally blocks stop every child


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick; at most 50)")
    ap.add_argument(
        "--relays",
        default=DEFAULT_RELAYS,
        help=f"besides direct, always run (default {DEFAULT_RELAYS}; also: cython-pyaccept, "
        "the compiled core with TCPTOTCP_ACCEPT_IN_PYTHON=1)",
    )
    ap.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"forward shapes (default all: {','.join(SHAPES)}); the shapes besides plain run the "
        "tcptotcp relays and both haproxy in the ab case",
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"default all: {','.join(CASES)}")
    ap.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the environment of every tcptotcp relay (repeatable)",
    )
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("-n", "--ab-requests", type=int, default=20000, help="ab -n (20,000 gives a steady CPU figure)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--wrk-timeout", type=int, default=2, help="wrk counts a request slower than this as a timeout")
    ap.add_argument("--case-timeout", type=int, default=120, help="kill a load generator after this long")
    ap.add_argument("--budget", type=float, default=3600, help="seconds: no run starts after this long (default 3600)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="appended to the result files' name")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the chart and table of a saved run")
    args = ap.parse_args()
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        Path(args.replot).with_suffix(".md").write_text(markdown(report))
        chart(report, Path(args.replot).with_suffix(".png"))
        return 0
    args.rounds = max(1, min(args.rounds or (1 if args.quick else 3), 50))
    args.ab_requests = max(1, args.ab_requests)
    shapes = pick(args.shapes, SHAPES, "shape", ap)
    wanted_cases = pick(args.cases, CASES, "case", ap)
    args.cases = wanted_cases
    relay_env: Dict[str, str] = {}
    for item in args.relay_env:
        k, eq, v = item.partition("=")
        if not eq or not k:
            ap.error(f"--relay-env {item!r}: NAME=VALUE")
        relay_env[k] = v
    started = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)

    # 1,000 clients need fds: raise the soft limit to the hard one; every child inherits it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))

    skipped: Dict[str, str] = {}
    missing_load = [t for t in ("nginx", "ab", "wrk") if not shutil.which(t)]
    if "nginx" in missing_load:
        print("nginx is not installed (apt-get install nginx-light): nothing to measure", file=sys.stderr)
        return 1
    cases = [c for c in wanted_cases if shutil.which(c.split("_")[0])]
    for tool in missing_load:
        msg = f"{tool} not installed (apt-get install {'apache2-utils' if tool == 'ab' else tool}): its cases skipped"
        skipped[tool] = msg
        print(msg, file=sys.stderr)
    backend, tcptotcp_version = tcptotcp_info(relay_env)
    relays = ["direct"]
    for r in pick(args.relays, ALL_RELAYS, "relay", ap):
        if r == "direct":
            continue
        if r in NEEDS and not shutil.which(NEEDS[r]):
            skipped[r] = f"{NEEDS[r]} not installed (apt-get install {NEEDS[r]})"
            print(f"{r}: skipped, {skipped[r]}", file=sys.stderr)
            continue
        if r in TCPTOTCP and (not backend or (BACKEND[r] == "cython" and backend != "cython")):
            skipped[r] = f"tcptotcp {tcptotcp_version}" if not backend else "the compiled core is not built here"
            print(f"{r}: skipped, {skipped[r]}", file=sys.stderr)
            continue
        relays.append(r)
    if "accept-proxy" in shapes and not shutil.which("haproxy"):
        skipped["shape accept-proxy"] = "its PROXY-sending hop is haproxy, not installed"
        shapes.remove("accept-proxy")

    # what runs: (shape, relays, cases); the shapes besides plain: ab, tcptotcp and haproxy
    plan: List[Tuple[str, List[str], List[str]]] = []
    for shape in shapes:
        if shape == "plain":
            plan.append((shape, relays, cases))
            continue
        names = [r for r in relays if r in SHAPE_RELAYS]
        shape_cases = [c for c in cases if c in SHAPE_CASES]
        if not shape_cases or not names:
            skipped[f"shape {shape}"] = "needs ab (the ab_c32 case) and a tcptotcp or haproxy relay"
            continue
        plan.append((shape, names, shape_cases))

    events: List[str] = []
    runs: Dict[str, Dict[str, Dict[str, List[Run]]]] = {s: {} for s, _, _ in plan}
    info: Dict[str, Dict[str, Dict[str, str]]] = {s: {} for s, _, _ in plan}
    summaries: Dict[str, str] = {}
    nginx: Optional[Nginx] = None
    running: Dict[Tuple[str, str], Relay] = {}
    work = tempfile.mkdtemp(prefix="tcptotcp-http-work-")
    try:
        nginx = Nginx(args.nginx_workers)
        print(
            f"nginx on 127.0.0.1:{nginx.port} (round robin {nginx.rr_ports}, proxy_protocol {nginx.pp_port}), "
            f"{args.nginx_workers} worker(s)",
            file=sys.stderr,
        )
        for shape, names, _ in plan:
            for name in names:
                lab = label(name, shape)
                try:
                    relay = Relay(name, nginx, shape, env=relay_env)
                except (RuntimeError, OSError) as exc:
                    skipped[lab] = f"did not start: {exc}"
                    events.append(f"{lab} did not start: {exc}")
                    print(f"{lab}: skipped, {exc}", file=sys.stderr)
                    continue
                running[(shape, name)] = relay
                ok, seen = verify(relay, relay_env)
                info[shape][name] = {"config": relay.config, "check": seen if ok else f"FAILED: {seen}"}
                print(f"{lab}: {relay.config}\n    check: {'ok, ' if ok else 'FAILED, '}{seen}", file=sys.stderr)
                if not ok:
                    skipped[lab] = f"failed its check: {seen}"
                    events.append(f"{lab} failed its check, not measured: {seen}")
                    relay.close()
                    del running[(shape, name)]
                    continue
                relay.base_fds = open_fds(relay.proc.pid) if relay.proc else 0
        # every run, in order: a bounded list; the budget stops it early
        todo: List[Tuple[int, str, str, str]] = []
        for rnd in range(args.rounds):
            for shape, names, shape_cases in plan:
                here = [n for n in names if (shape, n) in running]
                if not here:
                    continue
                order = here[rnd % len(here) :] + here[: rnd % len(here)]
                todo += [(rnd, shape, case, name) for case in shape_cases for name in order]
        for i, (rnd, shape, case, name) in enumerate(todo):
            if time.monotonic() - started > args.budget:
                events.append(f"--budget {args.budget:g} s reached: {len(todo) - i} of {len(todo)} runs not done")
                print(f"!! {events[-1]}", file=sys.stderr)
                break
            got = measure(rnd, shape, case, running[(shape, name)], args, work, events)
            if got is not None:
                runs[shape].setdefault(name, {}).setdefault(case, []).append(got)
            time.sleep(0.5)
    finally:
        for (shape, name), relay in running.items():
            lab = label(name, shape)
            relay.close()
            if relay.proc is not None:
                text = relay.final_log
                if name in TCPTOTCP:
                    summaries[lab] = relay.summary
                bad = [
                    ln
                    for ln in text.splitlines()
                    if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception|\] [EW] |\[(WARNING|ALERT)\]", ln)
                    and "listening on" not in ln
                ]
                if bad:
                    events.append(f"{lab} logged {len(bad)} warning/error line(s); last: {bad[-3:]}")
        if nginx is not None:
            errs = [ln for ln in nginx.errors().splitlines() if "[error]" in ln or "[crit]" in ln or "[alert]" in ln]
            if errs:
                events.append(f"nginx logged {len(errs)} error line(s); last: {errs[-3:]}")
            nginx.close()
        shutil.rmtree(work, ignore_errors=True)

    report = build_report(
        runs, plan, info, skipped, events, summaries, args, time.monotonic() - started, tcptotcp_version
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "http-" + dt.date.today().isoformat() + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    )
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    if report["stats"]:
        chart(report, out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
