"""``tcptotcp demo``: push data through a real forwarder with each backend and show the speed."""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Sequence

from . import pure
from ._backend import BACKEND
from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge
from ._version import __version__
from .cli import OneLineErrors  # noqa: E402  (cli imports this module lazily)
from .forwarder import Forwarder


def _sink_upstream() -> tuple[socket.socket, threading.Thread, list[int]]:
    """A loopback upstream that counts what it receives and echoes a short reply at EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: List[int] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            total = 0
            buf = bytearray(1 << 20)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(b"%d" % total)
        received.append(total)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    return listener, thread, received


def _measure(bridge_class: type, megabytes: int) -> tuple[float, int]:
    listener, upstream_thread, received = _sink_upstream()
    with (
        listener,
        Forwarder(
            "127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}", bridge_class=bridge_class, half_close=True
        ) as fwd,
    ):
        server = threading.Thread(target=fwd.serve_forever, daemon=True)
        server.start()
        chunk = bytes(1 << 20)
        with socket.create_connection(fwd.address[:2]) as client:
            started = time.perf_counter()
            for _ in range(megabytes):
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
            reply = client.recv(64)
            elapsed = time.perf_counter() - started
        upstream_thread.join(10)
    if not received or received[0] != megabytes << 20 or int(reply) != megabytes << 20:
        raise SystemExit(f"demo: bytes went missing ({received}, reply {reply!r})")
    return elapsed, received[0]


def demo(argv: Sequence[str]) -> int:
    p = OneLineErrors(prog="tcptotcp demo", description="Push data through a real bridge with each backend.")
    p.add_argument("--megabytes", type=int, default=512, help="how much to push per backend (default 512)")
    args = p.parse_args(argv)
    if args.megabytes < 1:
        p.error("--megabytes must be at least 1")
    backends: list[tuple[str, type[Bridge]]] = [("pure", pure.Bridge)]
    if BACKEND == "cython":
        backends.insert(0, ("cython", DefaultBridge))
    else:
        print("compiled core not available here; showing the pure backend only")
    print(
        f"tcptotcp {__version__}: client -> forwarder -> upstream on 127.0.0.1, "
        f"{args.megabytes} MiB each, every byte counted"
    )
    speeds = {}
    for name, bridge_class in backends:
        seconds, total = _measure(bridge_class, args.megabytes)
        speeds[name] = total / seconds / 1e6
        print(f"  {name:7s} {total:>12,d} bytes in {seconds:6.3f} s = {speeds[name]:8.1f} MB/s")
    if len(speeds) == 2:
        print(
            f"  compiled core / pure twin: {speeds['cython'] / speeds['pure']:.2f}x "
            "(the load generator here is Python too; see benchmarks/ for the full story)"
        )
    return 0
