"""TLS handshakes per second through a forward that routes by SNI, beside a plain forward.

    python benchmarks/sni_handshakes.py [--rounds N] [--seconds S] [--clients C] [--out DIR]

An ``openssl s_server`` on loopback is the TLS upstream (its own process, not measured). Each
round runs, in a rotated order, for S seconds each:

    direct   the clients talk to s_server
    plain    ``tcptotcp LISTEN SERVER`` (the compiled core)
    routed   ``tcptotcp LISTEN DEAD --route-sni bench.test=SERVER``: the loop reads each
             ClientHello, routes on its name, then relays it untouched

C client threads each make full handshakes (no session reuse) with SNI ``bench.test``, send a
byte and close. Relay CPU is utime+stime of the relay process over the case, per handshake.
Target (issue 23): routed handshakes/s >= 0.95x plain, in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

NAME = "bench.test"
TARGET = 0.95
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from http_clients import wait_port  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_certificate(where: Path) -> Dict[str, str]:
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={NAME}"]
        + ["-addext", f"subjectAltName=DNS:{NAME}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"cert": str(cert), "key": str(key)}


def handshakes(port: int, cafile: str, clients: int, seconds: float) -> Dict[str, float]:
    """Full handshakes completed by `clients` threads in `seconds`, and the failures."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile)
    done = [0] * clients
    failed = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname=NAME) as tls:
                        tls.sendall(b"x")
                done[i] += 1
            except (OSError, ssl.SSLError):
                failed[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    took = time.monotonic() - started
    return {"rate": sum(done) / took, "done": float(sum(done)), "failed": float(sum(failed))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        print("openssl is not installed: nothing to measure", file=sys.stderr)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="tcptotcp-sni-"))
    procs: List[subprocess.Popen[bytes]] = []
    try:
        cert = make_certificate(tmp)
        server_port = free_port()
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{server_port}", "-cert", cert["cert"]]
            + ["-key", cert["key"], "-quiet", "-naccept", "1000000000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(server)
        wait_port(server_port, server, "openssl s_server")
        relays: Dict[str, Optional[subprocess.Popen[bytes]]] = {"direct": None}
        ports = {"direct": server_port}
        dead = free_port()  # the routed forward's own upstream: nothing listens there
        commands = {
            "plain": [f"127.0.0.1:{server_port}"],
            "routed": [f"127.0.0.1:{dead}", "--route-sni", f"{NAME}=127.0.0.1:{server_port}"],
        }
        for name, tail in commands.items():
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "tcptotcp", f"127.0.0.1:{port}", *tail, "--backend", "cython"]
                + ["--log-level", "warning"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            wait_port(port, proc, name)
            relays[name], ports[name] = proc, port
        # Each must hand the handshake to s_server (the routed one only by its SNI route).
        for name, port in ports.items():
            check = handshakes(port, cert["cert"], 1, 0.3)
            if not check["done"]:
                print(f"{name}: no handshake completed through it", file=sys.stderr)
                return 1
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in ports}
        order = list(ports)
        for round_no in range(args.rounds):
            for name in order[round_no % len(order) :] + order[: round_no % len(order)]:
                proc = relays[name]
                before = cpu_seconds(proc.pid) if proc else 0.0
                got = handshakes(ports[name], cert["cert"], args.clients, args.seconds)
                got["cpu_us"] = (cpu_seconds(proc.pid) - before) / max(got["done"], 1) * 1e6 if proc else 0.0
                results[name].append(got)
                print(
                    f"round {round_no + 1}/{args.rounds} {name:7s} {got['rate']:8.0f} handshakes/s"
                    f"  failed {got['failed']:.0f}  relay cpu {got['cpu_us']:.1f} µs",
                    flush=True,
                )
        report = summarize(results, args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"sni-{dt.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        stem.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(results: Dict[str, List[Dict[str, float]]], args: argparse.Namespace) -> Dict[str, Any]:
    med = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in results.items()}
    per_round = [r["rate"] / p["rate"] for r, p in zip(results["routed"], results["plain"]) if p["rate"]]
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "rounds": args.rounds,
        "seconds": args.seconds,
        "clients": args.clients,
        "median_rate": med,
        "median_cpu_us": cpu,
        "failed": {name: sum(r["failed"] for r in runs) for name, runs in results.items()},
        "routed_vs_plain": med["routed"] / med["plain"] if med["plain"] else None,
        "routed_vs_plain_per_round": per_round,
    }


def markdown(report: Dict[str, Any]) -> str:
    ratio = report["routed_vs_plain"]
    per = report["routed_vs_plain_per_round"]
    lines = [
        f"Measured {report['date']} on {report['machine']}: {report['rounds']} interleaved rounds of "
        f"{report['seconds']:g} s, {report['clients']} client threads making full TLS handshakes (SNI "
        f"{NAME}) through each relay to an openssl s_server on loopback.",
        "",
        "| relay | handshakes/s (median) | relay CPU µs per handshake | failed |",
        "|---|---|---|---|",
    ]
    for name in report["median_rate"]:
        lines.append(
            f"| {name} | {report['median_rate'][name]:.0f} | {report['median_cpu_us'][name]:.1f} "
            f"| {report['failed'][name]:.0f} |"
        )
    met = "met" if ratio is not None and ratio >= TARGET else "MISSED"
    lines += [
        "",
        f"routed / plain: {ratio:.3f}x (per round {min(per):.3f}–{max(per):.3f}); target >= {TARGET}x: {met}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
