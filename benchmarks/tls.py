"""TLS termination against stunnel and haproxy: handshakes/s, bulk MB/s, relay CPU per GB (issue 25).

    python benchmarks/tls.py [--rounds N] [--seconds S] [--clients C] [--mb M] [--key rsa|ec]
        [--relays tcptotcp,tcptotcp-pure-listener,tcptotcp-pure-tls,stunnel,haproxy,haproxy-mt]
        [--budget SECONDS] [--tag TAG]

Certificates are made by the script with the openssl CLI in a temporary directory: a CA and a
server certificate for 127.0.0.1 and localhost (RSA 2048 by default, --key ec: ECDSA P-256).
The upstream is `peers.py upstream` (plaintext, its own process, not measured). Every relay
terminates TLS with that certificate and forwards plaintext to it, each its own process:

    tcptotcp    python -m tcptotcp 127.0.0.1:0 UPSTREAM --tls-cert ... --tls-key ... (this tree's
                tcptotcp: on the compiled backend, handshakes and records in the loops)
    tcptotcp-pure-listener  the same with TCPTOTCP_ACCEPT_IN_PYTHON=1: handshakes in the pure
                listener's one Python thread, records in the loops
    tcptotcp-pure-tls  the same with TCPTOTCP_PURE_TLS=1: the records on the pure engine's
                threads (the fallback, and what every TLS bridge ran on before the loops did)
    stunnel     stunnel4: foreground = yes, one service (accept, connect, cert, key)
    haproxy     mode tcp, bind 127.0.0.1:PORT ssl crt combined.pem, nbthread 1
    haproxy-mt  the same with nbthread = the machine's cores

Cases, interleaved: every round runs every case with every relay, the relays in an order
rotated by one each round (so a noisy neighbour and what the previous relay left behind hit
them all alike):

    handshakes  C `openssl s_time -new -time S` processes at once: full handshakes, no session
                resumption, nothing sent; handshakes/s = all their connections over the wall
                time; relay CPU per handshake; the clients' CPU (reaped children) beside it.
                Each client closes right after its handshake: haproxy then drops it without
                connecting upstream, where tcptotcp and stunnel connect (and close) first
    requests    the same with `-www /`: each connection sends "GET / HTTP/1.0" and reads the
                upstream's answer (peers.py's "G" mode), so every relay connects upstream
    download    one Python ssl client asks the upstream for M MB (peers.py duplex mode, sending
                nothing itself) and counts them: the relay encrypts
    echo        one Python ssl client sends M MB and reads them back (peers.py echo mode, 1 MiB
                in flight at most): the relay decrypts and encrypts

Relay CPU is utime+stime of the relay's process tree from /proc/<pid>/stat (10 ms ticks), per
handshake and per GB that crossed the relay (echo: both directions). Each figure is the median
over rounds with its min-max; ratios are tcptotcp over stunnel, haproxy and haproxy-mt (the
ratio of the medians and the range of the per-round ratios). The machine's load average is
recorded before, during and after. Every child runs in its own process group with a timeout,
and is stopped with it; --budget (default 1200 s) stops starting rounds.

Writes benchmarks/results/tls-<date>[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from http_clients import spawn, stop, wait_port
from run import PEERS, cpu_seconds, free_port, git_commit, machine_busy_seconds, spread

HERE = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
RELAYS = ("tcptotcp", "tcptotcp-pure-listener", "tcptotcp-pure-tls", "stunnel", "haproxy", "haproxy-mt")
CASES = ("handshakes", "requests", "download", "echo")
WINDOW = 1 << 20  # echo: bytes in flight at most
CHUNK = 256 * 1024
TARGETS = {  # issue 25: tcptotcp against each, in the same run
    ("handshakes_per_s", "haproxy"): (">=", 1.0),
    ("handshakes_per_s", "stunnel"): (">=", 1.5),
    ("requests_per_s", "haproxy"): (">=", 1.0),
    ("requests_per_s", "stunnel"): (">=", 1.5),
    ("download_MBps", "haproxy"): (">=", 1.0),
    ("download_MBps", "stunnel"): (">=", 1.5),
    ("echo_MBps", "haproxy"): (">=", 1.0),
    ("echo_MBps", "stunnel"): (">=", 1.5),
    ("download_cpu_s_per_GB", "haproxy"): ("<=", 1.0),
    ("echo_cpu_s_per_GB", "haproxy"): ("<=", 1.0),
}
METRICS = {
    "handshakes_per_s": "handshakes/s",
    "handshake_cpu_us": "relay CPU µs per handshake",
    "handshake_client_cpu_share": "clients' CPU, share of the machine",
    "handshake_machine_busy": "machine busy (all cores)",
    "requests_per_s": "handshakes with a request/s",
    "request_cpu_us": "relay CPU µs per handshake with a request",
    "download_MBps": "download MB/s",
    "download_cpu_s_per_GB": "download relay CPU s/GB",
    "download_client_cpu_s_per_GB": "download client CPU s/GB",
    "echo_MBps": "echo MB/s (each way)",
    "echo_cpu_s_per_GB": "echo relay CPU s/GB (both ways)",
    "echo_client_cpu_s_per_GB": "echo client CPU s/GB (both ways)",
}
NOT_COMPARED = {"handshake_client_cpu_share", "handshake_machine_busy", "download_client_cpu_s_per_GB"}
NOT_COMPARED |= {"echo_client_cpu_s_per_GB"}
HIGHER_IS_BETTER = {"handshakes_per_s", "requests_per_s", "download_MBps", "echo_MBps"}


# ---------------------------------------------------------------- the bulk client (a subprocess)


def _recv_exactly(tls: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = tls.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def client(mode: str, port: int, n: int, cafile: str) -> Dict[str, Any]:
    """One TLS connection through the relay; every byte counted (a short count raises)."""
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        buf = memoryview(bytearray(4 * 1024 * 1024))
        payload = memoryview(b"\xa5" * CHUNK)
        got = sent = 0
        if mode == "download":
            tls.sendall(b"D" + struct.pack("!Q", n))  # the upstream sends n, sinks what we send (nothing)
            if _recv_exactly(tls, 1) != b"+":
                raise ConnectionError("no + from the upstream")
            started = time.perf_counter()
            while got < n:
                k = tls.recv_into(buf)
                if not k:
                    raise ConnectionError(f"EOF after {got} of {n} bytes")
                got += k
        elif mode == "echo":
            tls.sendall(b"E")
            started = time.perf_counter()
            while got < n:
                if sent < n and sent - got < WINDOW:
                    k = min(CHUNK, n - sent)
                    tls.sendall(payload[:k])
                    sent += k
                    continue
                k = tls.recv_into(buf)
                if not k:
                    raise ConnectionError(f"EOF after {got} of {n} bytes back")
                got += k
        else:
            raise ValueError(mode)
        seconds = time.perf_counter() - started
        cipher, version = tls.cipher(), tls.version()
    if got != n:
        raise ConnectionError(f"{mode}: {got} bytes of {n}")
    return {"seconds": seconds, "bytes": n, "version": version, "cipher": cipher[0] if cipher else ""}


# ---------------------------------------------------------------- certificates, upstream, relays


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr.strip()[-500:]}")


def make_pki(where: Path, key: str) -> Dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost it signed; combined.pem for haproxy."""
    newkey = ["-newkey", "rsa:2048"] if key == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl(
        "req", "-x509", *newkey, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=tcptotcp benchmark CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    openssl("req", "-new", *newkey, "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
            cwd=where)  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=where,
    )  # fmt: skip
    combined = where / "combined.pem"
    combined.write_text((where / "server.pem").read_text() + (where / "server.key").read_text())
    names = ("ca.pem", "server.pem", "server.key")
    return {k: str(where / f) for k, f in zip(("ca", "cert", "key"), names)} | {"combined": str(combined)}


class Upstream:
    """peers.py upstream: sink/echo/duplex on plaintext; runs until its stdin closes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [*PEERS, "upstream"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self.proc.stdout is not None
        line: List[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        if not line or not line[0].strip().isdigit():
            stop(self.proc)
            raise RuntimeError("peers.py upstream did not print its port")
        self.port = int(line[0])

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop(self.proc, seconds=5)


def haproxy_config(port: int, upstream: int, combined: str, threads: int) -> str:
    return (
        f"global\n  nbthread {threads}\n  maxconn 8000\n  tune.ssl.default-dh-param 2048\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        f"frontend f\n  bind 127.0.0.1:{port} ssl crt {combined}\n  maxconn 8000\n  default_backend b\n"
        f"backend b\n  server s 127.0.0.1:{upstream} maxconn 8000\n"
    )


def stunnel_config(port: int, upstream: int, pki: Dict[str, str], tmp: Path) -> str:
    return (
        f"foreground = yes\npid =\ndebug = 3\noutput = {tmp / 'stunnel-out.log'}\n"
        f"[tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\n"
        f"cert = {pki['cert']}\nkey = {pki['key']}\n"
    )


class Relay:
    def __init__(self, name: str, upstream: int, pki: Dict[str, str], tmp: Path, env: Dict[str, str]):
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.config = ""
        self.port = 0
        log = open(self.log_path, "w")
        try:
            if name.startswith("tcptotcp"):
                cmd = [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", f"127.0.0.1:{upstream}"]
                cmd += ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--log-level", "warning"]
                cmd += ["--max-connections", "4096"]
                self.config = "tcptotcp " + " ".join(cmd[3:])
                if name == "tcptotcp-pure-tls":  # the same tree, its records on the pure engine
                    env = {**env, "TCPTOTCP_PURE_TLS": "1"}
                    self.config = "TCPTOTCP_PURE_TLS=1 " + self.config
                if name == "tcptotcp-pure-listener":  # the same tree, its handshakes in Python
                    env = {**env, "TCPTOTCP_ACCEPT_IN_PYTHON": "1"}
                    self.config = "TCPTOTCP_ACCEPT_IN_PYTHON=1 " + self.config
                self.proc = spawn(cmd, log, env=env)
                deadline = time.monotonic() + 30
                while True:
                    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text())
                    if m:
                        self.port = int(m.group(1))
                        break
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        stop(self.proc)
                        raise RuntimeError(f"tcptotcp did not start: {self.log_path.read_text()[-1500:]}")
                    time.sleep(0.05)
            elif name == "stunnel":
                self.port = free_port()
                cfg = tmp / "stunnel.conf"
                cfg.write_text(stunnel_config(self.port, upstream, pki, tmp))
                self.config = "; ".join(cfg.read_text().splitlines())
                self.proc = spawn(["stunnel", str(cfg)], log)
            else:
                self.port = free_port()
                cfg = tmp / f"{name}.cfg"
                cfg.write_text(haproxy_config(self.port, upstream, pki["combined"], 1 if name == "haproxy" else CORES))
                self.config = "; ".join(ln.strip() for ln in cfg.read_text().splitlines())
                self.proc = spawn(["haproxy", "-db", "-f", str(cfg)], log)
        finally:
            log.close()  # the child has its own copy
        wait_port(self.port, self.proc, name)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def log_lines(self) -> Dict[str, int]:
        """What the relay logged besides its start (tcptotcp: warnings and worse), numbers masked, counted."""
        lines: Dict[str, int] = {}
        paths = [self.log_path] + ([self.log_path.parent / "stunnel-out.log"] if self.name == "stunnel" else [])
        for path in paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if not line.strip() or "listening on" in line:
                    continue
                key = re.sub(r"\d+", "N", line.strip())[:300]
                lines[key] = lines.get(key, 0) + 1
        return lines

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------- the cases


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_bulk(mode: str, relay: Relay, n: int, cafile: str, timeout: float) -> Dict[str, Any]:
    cpu0, kids0 = relay.cpu(), children_cpu()
    p = subprocess.run(
        [sys.executable, __file__, "client", mode, str(relay.port), str(n), cafile],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    cpu, kids = relay.cpu() - cpu0, children_cpu() - kids0
    if p.returncode != 0:
        raise RuntimeError(f"{mode} client: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    r = json.loads(p.stdout)
    crossed = n * (2 if mode == "echo" else 1)
    return {
        "MBps": n / r["seconds"] / 1e6,
        "seconds": r["seconds"],
        "relay_cpu_s": cpu,
        "cpu_s_per_GB": cpu / (crossed / 1e9),
        "client_cpu_s": kids,
        "client_cpu_s_per_GB": kids / (crossed / 1e9),
        "tls": f"{r['version']} {r['cipher']}",
    }


def run_handshakes(relay: Relay, clients: int, seconds: float, cafile: str, request: bool = False) -> Dict[str, Any]:
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{relay.port}", "-new", "-time", f"{seconds:g}"]
    cmd += ["-CAfile", cafile] + (["-www", "/"] if request else [])
    cpu0, kids0, busy0 = relay.cpu(), children_cpu(), machine_busy_seconds()
    started = time.monotonic()
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(clients)
    ]
    done, errors = 0, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            errors.append("timed out")
        m = re.search(r"(\d+) connections in [\d.]+s;", out)
        if m:
            done += int(m.group(1))
        if p.returncode != 0 or not m:
            errors.append(f"s_time exit {p.returncode}: {out.strip()[-300:]}")
    wall = time.monotonic() - started
    cpu, kids, busy = relay.cpu() - cpu0, children_cpu() - kids0, machine_busy_seconds() - busy0
    return {
        "handshakes_per_s": done / wall,
        "handshakes": done,
        "wall_s": wall,
        "relay_cpu_s": cpu,
        "cpu_us": cpu / max(done, 1) * 1e6,
        "client_cpu_s": kids,
        "client_cpu_share": kids / (wall * CORES),
        "machine_busy": busy / (wall * CORES),
        "errors": errors,
    }


def check(relay: Relay, cafile: str) -> str:
    """A verified handshake and 5 bytes echoed through the relay; what was negotiated."""
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"Ehello")
            if _recv_exactly(tls, 5) != b"hello":
                raise RuntimeError(f"{relay.name}: the echo came back wrong")
            cipher = tls.cipher()
            return f"{tls.version()} {cipher[0] if cipher else ''}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tool_version(cmd: List[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (p.stdout + p.stderr).strip().splitlines()
    return next((ln.strip() for ln in lines if re.search(r"\d+\.\d+", ln)), lines[0] if lines else "")


# ---------------------------------------------------------------- the report


def summarize(samples: Dict[str, Dict[str, List[float]]], relays: List[str]) -> Dict[str, Any]:
    stats = {r: {k: spread(v) for k, v in samples[r].items() if v} for r in relays}
    ratios: Dict[str, Dict[str, Any]] = {}
    if "tcptotcp" in relays:
        ours = samples["tcptotcp"]
        for other in (r for r in relays if r != "tcptotcp"):
            ratios[other] = {}
            for key in (k for k in METRICS if k not in NOT_COMPARED):
                a, b = ours.get(key, []), samples[other].get(key, [])
                if not a or not b or not statistics.median(b):
                    continue
                per = [x / y for x, y in zip(a, b) if y]
                ratios[other][key] = {
                    "ratio": statistics.median(a) / statistics.median(b),
                    "per_round": spread(per) if per else None,
                }
    targets = []
    for (key, other), (op, want) in TARGETS.items():
        got = ratios.get(other, {}).get(key)
        if got:
            met = got["ratio"] >= want if op == ">=" else got["ratio"] <= want
            targets.append({"metric": key, "vs": other, "want": f"{op} {want}x", "ratio": got["ratio"], "met": met})
    return {"stats": stats, "ratios": ratios, "targets": targets}


def fmt(s: Optional[Dict[str, Any]], pct: bool = False) -> str:
    if not s:
        return "–"

    def num(v: float) -> str:
        if pct:
            return f"{v * 100:.0f}%"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    if s["n"] == 1 or s["min"] == s["max"]:
        return num(s["median"])
    return f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"


def markdown(report: Dict[str, Any]) -> str:
    relays, stats, st = report["relays"], report["stats"], report["settings"]
    lines = [
        f"# TLS termination: tcptotcp against stunnel and haproxy ({report['date']})",
        "",
        f"Measured on {report['machine']}, commit {report['commit']}; {report['rounds']} interleaved rounds "
        f"in {report['seconds']:.0f} s. Load average (1/5/15 min) before: {report['load']['before']}, "
        f"after: {report['load']['after']}; per round: {', '.join(report['load']['rounds'])}. "
        "The load includes whatever else runs on the machine: compare relays within this run, by the ratios.",
        "",
        f"Certificate: {st['key']} (a CA and a server certificate for 127.0.0.1, made by openssl). "
        f"Handshakes: {st['clients']} `openssl s_time -new -time {st['seconds']:g}` at once (full handshakes, "
        f"no resumption). Bulk: one Python ssl client, {st['mb']} MB per run; download (the upstream sends, the "
        "relay encrypts) and echo (the client sends and reads back with 1 MiB in flight: the relay decrypts and "
        "encrypts; CPU per GB counts both directions). Relay CPU from /proc/<pid>/stat (10 ms ticks); the "
        "clients' CPU from their rusage (reaped children). Median (min–max) over rounds.",
        "",
        "| | " + " | ".join(relays) + " |",
        "|---|" + "---|" * len(relays),
    ]
    for key, title in METRICS.items():
        pct = key in ("handshake_client_cpu_share", "handshake_machine_busy")
        cells = [fmt(stats[r].get(key), pct) for r in relays]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if report["ratios"]:
        others = list(report["ratios"])
        lines += ["", "tcptotcp over each (ratio of medians; per-round range):", ""]
        lines += ["| | " + " | ".join(f"vs {o}" for o in others) + " |", "|---|" + "---|" * len(others)]
        for key, title in METRICS.items():
            if key in NOT_COMPARED:
                continue
            cells = []
            for o in others:
                r = report["ratios"][o].get(key)
                if not r:
                    cells.append("–")
                    continue
                per = r["per_round"]
                cells.append(f"{r['ratio']:.2f}x" + (f" ({per['min']:.2f}–{per['max']:.2f})" if per else ""))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines += ["", "Targets (issue 25): " + "; ".join(
            f"{t['metric']} vs {t['vs']} {t['want']}: {t['ratio']:.2f}x {'met' if t['met'] else 'MISSED'}"
            for t in report["targets"]
        )]  # fmt: skip
    lines += ["", "Negotiated (check connection, and the bulk runs):", ""]
    for r in relays:
        lines.append(f"- {r}: {report['negotiated'].get(r, '?')}; `{report['configs'].get(r, '')}`")
    lines += ["", "Versions: " + "; ".join(f"{k}: {v}" for k, v in report["versions"].items() if v)]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    if report["events"]:
        lines += ["", "Events:", ""] + [f"- {e}" for e in report["events"]]
    logged = {n: v for n, v in report["relay_logs"].items() if v}
    lines += ["", "Relay logs (tcptotcp at --log-level warning; numbers masked): " + ("" if logged else "nothing.")]
    for name, counts in logged.items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
        lines += [f"- {name}: " + "; ".join(f"{c} x `{line}`" for line, c in top)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the finally blocks stop every child


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="handshake case length (default 5)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent s_time processes (default 4)")
    ap.add_argument("--mb", type=int, default=1000, help="MB per bulk run (default 1000: 10 ms CPU ticks)")
    ap.add_argument("--key", choices=("rsa", "ec"), default="rsa", help="rsa: RSA 2048 (default); ec: P-256")
    ap.add_argument("--relays", default=",".join(RELAYS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--budget", type=float, default=1200, help="no round starts after this many seconds")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    began = time.monotonic()
    load_before = loadavg()
    names = [r for r in args.relays.split(",") if r]
    cases = [c for c in args.cases.split(",") if c]
    if bad := [r for r in names if r not in RELAYS] + [c for c in cases if c not in CASES]:
        ap.error(f"unknown: {', '.join(bad)}")
    skipped: Dict[str, str] = {}
    if shutil.which("openssl") is None:
        print("openssl is not installed: nothing to measure", file=sys.stderr)
        return 1
    if shutil.which("stunnel") is None and "stunnel" in names:
        print("stunnel missing: apt-get install -y -qq stunnel4", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "stunnel4"], capture_output=True, timeout=300)
    for name, tool in (("stunnel", "stunnel"), ("haproxy", "haproxy"), ("haproxy-mt", "haproxy")):
        if name in names and shutil.which(tool) is None:
            names.remove(name)
            skipped[name] = f"{tool} is not installed"
    tmp = Path(tempfile.mkdtemp(prefix="tcptotcp-tls-"))
    upstream: Optional[Upstream] = None
    relays: Dict[str, Relay] = {}
    events: List[str] = []
    try:
        pki = make_pki(tmp, args.key)
        upstream = Upstream()
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", str(HERE.parent / "src"))
        negotiated: Dict[str, str] = {}
        for name in names:
            relay = Relay(name, upstream.port, pki, tmp, env)
            relays[name] = relay
            negotiated[name] = check(relay, pki["ca"])
            print(f"{name}: port {relay.port}, {negotiated[name]}", file=sys.stderr, flush=True)
        samples: Dict[str, Dict[str, List[float]]] = {n: {k: [] for k in METRICS} for n in names}
        runs: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
        round_loads: List[str] = []
        n_bytes = args.mb * 1_000_000
        done_rounds = 0
        for rnd in range(args.rounds):
            elapsed = time.monotonic() - began
            if rnd and elapsed + elapsed / rnd > args.budget:
                events.append(f"budget: stopped after {rnd} rounds ({elapsed:.0f} s)")
                break
            round_loads.append(loadavg())
            for case in cases:
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    relay = relays[name]
                    if not relay.alive():
                        events.append(f"round {rnd + 1}: {name} had exited ({relay.proc.returncode}): restarted")
                        relay.close()
                        relay = relays[name] = Relay(name, upstream.port, pki, tmp, env)
                    try:
                        if case == "requests":
                            r = run_handshakes(relay, args.clients, args.seconds, pki["ca"], request=True)
                            samples[name]["requests_per_s"].append(r["handshakes_per_s"])
                            samples[name]["request_cpu_us"].append(r["cpu_us"])
                            if r["errors"]:
                                events.append(f"round {rnd + 1} {name} requests: {r['errors'][0]}")
                            note = f"{r['handshakes_per_s']:8.0f}/s relay {r['cpu_us']:.0f} µs/request"
                        elif case == "handshakes":
                            r = run_handshakes(relay, args.clients, args.seconds, pki["ca"])
                            samples[name]["handshakes_per_s"].append(r["handshakes_per_s"])
                            samples[name]["handshake_cpu_us"].append(r["cpu_us"])
                            samples[name]["handshake_client_cpu_share"].append(r["client_cpu_share"])
                            samples[name]["handshake_machine_busy"].append(r["machine_busy"])
                            if r["errors"]:
                                events.append(f"round {rnd + 1} {name} handshakes: {r['errors'][0]}")
                            note = (
                                f"{r['handshakes_per_s']:8.0f}/s relay {r['cpu_us']:.0f} µs/hs "
                                f"clients {r['client_cpu_share'] * 100:.0f}% machine {r['machine_busy'] * 100:.0f}%"
                            )
                        else:
                            r = run_bulk(case, relay, n_bytes, pki["ca"], timeout=300)
                            samples[name][f"{case}_MBps"].append(r["MBps"])
                            samples[name][f"{case}_cpu_s_per_GB"].append(r["cpu_s_per_GB"])
                            samples[name][f"{case}_client_cpu_s_per_GB"].append(r["client_cpu_s_per_GB"])
                            negotiated[name] += "" if r["tls"] in negotiated[name] else f"; bulk {r['tls']}"
                            note = f"{r['MBps']:8.1f} MB/s relay {r['cpu_s_per_GB']:.2f} s/GB"
                    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
                        events.append(f"round {rnd + 1} {name} {case}: {exc}")
                        note = f"FAILED: {exc}"
                        r = {"error": str(exc)}
                    r.update({"round": rnd + 1, "case": case})
                    runs[name].append(r)
                    print(f"round {rnd + 1}/{args.rounds} {case:10s} {name:10s} {note}", file=sys.stderr, flush=True)
            done_rounds = rnd + 1
        for name, relay in relays.items():
            if not relay.alive():
                events.append(f"{name} exited ({relay.proc.returncode}): {relay.log_tail()[-500:]}")
        summary = summarize(samples, names)
        version = subprocess.run(
            [sys.executable, "-c", "import tcptotcp; print(tcptotcp.__version__, tcptotcp.BACKEND)"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        report = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
            f"{CORES} cores, Python {platform.python_version()}",
            "commit": git_commit(HERE.parent),
            "rounds": done_rounds,
            "seconds": time.monotonic() - began,
            "load": {"before": load_before, "after": loadavg(), "rounds": round_loads},
            "settings": {
                "key": "RSA 2048" if args.key == "rsa" else "ECDSA P-256",
                "clients": args.clients,
                "seconds": args.seconds,
                "mb": args.mb,
                "cases": cases,
                "haproxy_mt_threads": CORES,
            },
            "versions": {
                "tcptotcp": version,
                "stunnel": tool_version(["stunnel", "-version"]),
                "haproxy": tool_version(["haproxy", "-v"]),
                "openssl": tool_version(["openssl", "version"]),
                "python ssl": ssl.OPENSSL_VERSION,
            },
            "relays": names,
            "skipped": skipped,
            "configs": {n: r.config for n, r in relays.items()},
            "negotiated": negotiated,
            "events": events,
            "relay_logs": {n: r.log_lines() for n, r in relays.items()},
            **summary,
            "samples": samples,
            "runs": runs,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / (f"tls-{dt.date.today().isoformat()}" + (f"-{args.tag}" if args.tag else ""))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        print(f"wrote {stem}.md and .json", file=sys.stderr)
        return 0
    finally:
        for relay in relays.values():
            relay.close()
        if upstream is not None:
            upstream.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        mode, port, n, cafile = sys.argv[2:6]
        print(json.dumps(client(mode, int(port), int(n), cafile)))
        sys.exit(0)
    sys.exit(main())
