"""Real sockets, peers and leak counters for the tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

DATA = Path(__file__).parent / "data"
HAS_IPV6 = socket.has_ipv6


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6_OK = HAS_IPV6 and _ipv6_works()
HAS_PROC = os.path.isdir("/proc/self/fd")  # per-process memory, CPU and fd counts (Linux)


def rss_kib(pid: object = "self") -> int:
    """A process's resident memory, KiB (Linux's /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def link(kind: str = "tcp", tmp_dir: Optional[str] = None) -> Tuple[socket.socket, socket.socket]:
    """A connected pair (peer end, bridge end) over loopback of the given kind."""
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if kind == "unix-path":
        assert tmp_dir is not None
        path = os.path.join(tmp_dir, f"s{time.monotonic_ns()}.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(1)
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(path)
            bridge_end, _ = listener.accept()
        os.unlink(path)
        return peer, bridge_end
    family, host = (socket.AF_INET6, "::1") if kind == "tcp6" else (socket.AF_INET, "127.0.0.1")
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        peer = socket.socket(family)
        peer.connect(listener.getsockname())
        bridge_end, _ = listener.accept()
    return peer, bridge_end


class Topology:
    """peer_a <-> [stream1  bridge  stream2] <-> peer_b."""

    def __init__(self, kind1: str = "tcp", kind2: str = "tcp", tmp_dir: Optional[str] = None):
        self.peer_a, self.stream1 = link(kind1, tmp_dir)
        self.peer_b, self.stream2 = link(kind2, tmp_dir)

    def close_peers(self) -> None:
        for s in (self.peer_a, self.peer_b):
            s.close()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self.peer_a, self.peer_b, self.stream1, self.stream2):
            s.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks: List[bytes] = []
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, timeout: float = 30.0) -> Tuple[int, str]:
    """Read to EOF; return (byte count, sha256 hex)."""
    sock.settimeout(timeout)
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return total, digest.hexdigest()
        digest.update(chunk)
        total += len(chunk)


class Background:
    """Run a callable in a thread; .result() re-raises what it raised."""

    def __init__(self, fn: Callable[[], object]):
        self._value: object = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, args=(fn,), daemon=True)
        self._thread.start()

    def _main(self, fn: Callable[[], object]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float = 30.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background work did not finish in time"
        if self._error is not None:
            raise self._error
        return self._value


def send_and_shut(sock: socket.socket, data: bytes) -> Background:
    def work() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    return Background(work)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if HAS_PROC else -1


ENGINE_THREADS = ("tcptotcp-results",)  # the compiled engine's, started once per process


def bridge_threads() -> int:
    """Python threads, less the engine's own (the loop threads are C threads, not counted)."""
    return sum(1 for t in threading.enumerate() if t.name not in ENGINE_THREADS)


def bridge_fds() -> int:
    """Open fds, less those the compiled engine holds for itself (pollers, pooled pipes)."""
    try:
        from tcptotcp import _core
    except ImportError:
        return open_fds()
    return open_fds() - _core.stats()["engine_fds"]


@contextlib.contextmanager
def no_leaks(settle: float = 2.0) -> Iterator[None]:
    """Assert that the threads and fds of bridges are gone: no thread that started meanwhile is
    left (the engine's own aside), and the fd count is back to what it was. Threads are told
    apart, not counted: one of an earlier test (a bridge's checker, just past its end) may end
    meanwhile, and a count would then miss a thread of this one that was left behind."""
    before, fds = set(threading.enumerate()), bridge_fds()

    def new_threads() -> List[str]:
        return [t.name for t in threading.enumerate() if t not in before and t.name not in ENGINE_THREADS]

    yield
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and (new_threads() or bridge_fds() != fds):
        time.sleep(0.02)
    assert not new_threads(), new_threads()
    assert bridge_fds() == fds


def tls_contexts() -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(DATA / "localhost.crt", DATA / "localhost.key")
    client = ssl.create_default_context(cafile=str(DATA / "localhost.crt"))
    return server, client


def tls_link() -> Tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(peer end, bridge end), TLS over loopback TCP; the bridge end is the TLS server."""
    server_ctx, client_ctx = tls_contexts()
    raw_peer, raw_bridge = link("tcp")
    handshake = Background(lambda: server_ctx.wrap_socket(raw_bridge, server_side=True))
    peer = client_ctx.wrap_socket(raw_peer, server_hostname="localhost")
    bridge_end = handshake.result()
    assert isinstance(bridge_end, ssl.SSLSocket)
    return peer, bridge_end
