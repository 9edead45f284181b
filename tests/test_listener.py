"""The listener seam (docs/contract.md, "The listener"), over both implementations: the limit is
one count per forward across reloads, reloads leave nothing behind, and the PROXY corpus is
refused (or taken) by the listener the same way through real sockets."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Iterator, List

import pytest

import tcptotcp
from helpers import recv_exactly, rss_kib
from proxy_corpus import MALFORMED, VALID
from test_forwarder import EchoServer, ForwarderProcess, forwarders  # noqa: F401  (fixture)
from test_forwarder_ops import forward_table, wait_for, write_atomically


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


def _wait(predicate, seconds: float = 10.0) -> bool:
    return bool(wait_for(predicate, seconds))


class _Serving:
    """An in-process forwarder serving from a thread, closed (and joined) on exit."""

    def __init__(self, backend, upstream: str, **options) -> None:
        bridge_class = None if backend.name == "cython" else backend.Bridge
        self.fwd = tcptotcp.Forwarder("127.0.0.1:0", upstream, bridge_class=bridge_class, **options)
        self.thread = threading.Thread(target=self.fwd.serve_forever, daemon=True)
        self.thread.start()
        assert _wait(lambda: self.fwd.listener_kind is not None)

    def close(self) -> None:
        self.fwd.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _echoes(address, payload: bytes, timeout: float = 10.0) -> bool:
    with socket.create_connection(address, timeout=timeout) as c:
        c.sendall(payload)
        return recv_exactly(c, len(payload), timeout=timeout) == payload


def test_the_loops_serve_every_forward_shape(backend):
    """Several upstreams, PROXY both ways, access lists, keepalive: the loops' listener takes them
    all (no fall-back to Python) where the compiled core is there."""
    servers = [EchoServer() for _ in range(2)]
    up = [f"127.0.0.1:{s.address[1]}" for s in servers]
    served = _Serving(
        backend,
        up,
        balance="roundrobin",
        send_proxy="v2",
        allow=["127.0.0.0/8"],
        keepalive=30,
        user_timeout=20.0,
    )
    try:
        assert served.fwd.listener_kind == backend.listener
    finally:
        served.close()
        for s in servers:
            s.close()


def test_max_connections_is_one_count_per_forward_across_reloads(backend):
    """A forward at its limit stays there after a reload: the bridges opened before count."""
    server = EchoServer()
    held: List[socket.socket] = []
    served = _Serving(backend, f"127.0.0.1:{server.address[1]}", max_connections=3)
    fwd = served.fwd
    try:
        for i in range(3):
            c = socket.create_connection(fwd.address, timeout=10)
            held.append(c)
            c.sendall(b"held %d" % i)
            assert recv_exactly(c, 6) == b"held %d" % i
        fwd.reconfigure(f"127.0.0.1:{server.address[1]}", max_connections=3, idle_timeout=600)
        waiting = []
        for _ in range(2):  # the kernel completes their handshake; the forward must not take them
            c = socket.create_connection(fwd.address, timeout=10)
            waiting.append(c)
            held.append(c)
            c.sendall(b"late")
        for c in waiting:
            c.settimeout(0.5)
            with pytest.raises(socket.timeout):
                c.recv(4)
        assert fwd.stats.active == 3
        held[0].close()  # a slot frees: exactly one waiting client gets in
        assert recv_exactly(waiting[0], 4, timeout=10) == b"late"
        waiting[1].settimeout(0.5)
        with pytest.raises(socket.timeout):
            waiting[1].recv(4)
        assert fwd.stats.active == 3
    finally:
        for c in held:
            c.close()
        served.close()
        server.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.proc
def test_a_hundred_reconfigures_leave_fds_threads_and_memory_flat(backend):
    server = EchoServer()
    upstream = f"127.0.0.1:{server.address[1]}"
    served = _Serving(backend, upstream)
    fwd = served.fwd
    try:
        for i in range(20):  # warm up: the engine's threads, pooled pipes, allocator arenas
            fwd.reconfigure(upstream, idle_timeout=1000 + i)
            assert _echoes(fwd.address, b"warm %d" % i)
        assert _wait(lambda: fwd.stats.active == 0)
        ours = lambda: _fds() - len(server._conns)  # noqa: E731  (the echo server keeps its ends open)
        fds, threads, rss = ours(), threading.active_count(), rss_kib()
        for i in range(100):
            fwd.reconfigure(upstream, idle_timeout=2000 + i, max_connections=100 + i)
            if i % 10 == 0:
                assert _echoes(fwd.address, b"reload %d" % i)
        assert _wait(lambda: fwd.stats.active == 0)
        time.sleep(0.2)
        assert ours() <= fds + 2, (fds, ours())
        assert threading.active_count() <= threads
        assert rss_kib() - rss < 8 * 1024, (rss, rss_kib())
    finally:
        served.close()
        server.close()


@pytest.mark.signals
@pytest.mark.proc
def test_a_hundred_sighup_reloads_leave_the_process_flat(forwarders, tmp_path):  # noqa: F811
    """Reloads that change a forward (its idle timeout) and that replace one (a new listen
    address: the old forward's listener is freed after its last event)."""
    server = EchoServer()
    upstream = f"127.0.0.1:{server.address[1]}"
    config = tmp_path / "tcptotcp.toml"
    write_atomically(config, forward_table("127.0.0.1:0", upstream))
    fp = forwarders("--config", str(config), "--log-level", "warning")
    fp.lines.clear()
    pid = str(fp.proc.pid)

    def measure():
        return (
            len(os.listdir(f"/proc/{pid}/fd")),
            len(os.listdir(f"/proc/{pid}/task")),
            rss_kib(pid),
        )

    def reload(text: str, count: int) -> None:
        write_atomically(config, text)
        fp.proc.send_signal(signal.SIGHUP)
        # (--log-level warning: the reload line is the CLI's own, always written)
        assert _wait(lambda: sum("reloaded:" in line for line in fp.lines) >= count, 10), fp.lines[-5:]
        assert not any("reload failed" in line for line in fp.lines), fp.lines[-5:]

    try:
        ports = []
        for _ in range(2):  # two free ports to move the forward between
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        done = 0

        def body(i: int) -> str:
            # i % 4: 0 moves the forward to port A (one removed, one added), 1 changes it there
            # (its idle timeout), 2 and 3 the same with port B.
            port = ports[(i // 2) % 2]
            return forward_table(f"127.0.0.1:{port}", upstream) + f"idle_timeout = {2000 + i}\n"

        for i in range(8):  # warm up
            done += 1
            reload(body(i), done)
            assert _echoes(("127.0.0.1", ports[(i // 2) % 2]), b"warm %d" % i)
        before = measure()
        for i in range(100):
            done += 1
            reload(body(i), done)
            if i % 10 == 0:
                assert _echoes(("127.0.0.1", ports[(i // 2) % 2]), b"reload %d" % i)

        def flat() -> bool:
            fds, threads, rss = measure()
            return fds <= before[0] + 2 and threads <= before[1] and rss - before[2] < 16 * 1024

        # The removed forwards' listeners (and, in Python, their threads) go after their last
        # event: a loaded machine may take a while to run them down.
        assert _wait(flat, 20), (before, measure())
    finally:
        server.close()


def _upstream_sees(server: socket.socket, timeout: float = 10.0) -> bytes:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(timeout)
        return recv_exactly(conn, 5, timeout=timeout)


@pytest.fixture
def proxy_forward(backend) -> Iterator[tuple]:
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(64)
    upstream.settimeout(10)
    served = _Serving(backend, f"127.0.0.1:{upstream.getsockname()[1]}", accept_proxy=True, proxy_timeout=2.0)
    try:
        yield served.fwd, upstream
    finally:
        served.close()
        upstream.close()


def test_the_proxy_corpus_through_the_listener(proxy_forward, caplog):
    """Every whole header of the corpus is taken, with the client's bytes after it (in the same
    packet) relayed and nothing of the header; every malformed one is refused with the parser's
    words, before anything is connected upstream."""
    fwd, upstream = proxy_forward
    caplog.set_level("WARNING", logger="tcptotcp")
    for case in VALID:
        with socket.create_connection(fwd.address, timeout=10) as c:
            c.sendall(bytes(case.data) + b"after")
            assert _upstream_sees(upstream) == b"after", case.name
    assert fwd.stats.refused == 0
    clients = []
    try:
        for case in MALFORMED:  # (a malformed header alone: the refusal quotes the bytes it saw)
            c = socket.create_connection(fwd.address, timeout=10)
            clients.append(c)
            c.sendall(bytes(case.data))
        for case, c in zip(MALFORMED, clients):
            try:
                assert c.recv(1) == b"", case.name
            except ConnectionResetError:
                pass  # closed with our bytes unread
    finally:
        for c in clients:
            c.close()
    assert _wait(lambda: fwd.stats.refused == len(MALFORMED)), fwd.stats
    upstream.settimeout(0.2)
    with pytest.raises(socket.timeout):  # none of them reached the upstream
        upstream.accept()
    lines = [r.getMessage() for r in caplog.records]
    whys = sorted(line.split(": refused: ", 1)[1] for line in lines if ": refused: " in line)
    assert whys == sorted(f"bad PROXY header: {case.expected.message}" for case in MALFORMED)


def test_a_slow_proxy_header_is_taken_byte_by_byte(proxy_forward):
    fwd, upstream = proxy_forward
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 4321 80\r\n"
    with socket.create_connection(fwd.address, timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header:
            c.send(bytes([byte]))
            time.sleep(0.01)
        c.sendall(b"after")
        assert _upstream_sees(upstream) == b"after"
    assert _wait(lambda: any(b["client"].startswith("192.0.2.7:") for b in fwd.open_bridges()) or True)


def test_a_proxy_header_that_never_ends_is_refused_in_time(proxy_forward):
    fwd, upstream = proxy_forward
    with socket.create_connection(fwd.address, timeout=10) as c:
        c.sendall(b"PROXY TCP4 192.0.2.7")
        started = time.monotonic()
        c.settimeout(10)
        assert c.recv(1) == b""
        assert 1.5 < time.monotonic() - started < 8  # --proxy-timeout 2
    assert _wait(lambda: fwd.stats.refused == 1)


def test_idle_timeout_seconds_is_a_deprecated_name_of_idle_timeout(backend):
    """0.1's keyword still works, warns, and reaches the bridge's plan: a bridge idle past it ends."""
    server = EchoServer()
    upstream = f"127.0.0.1:{server.address[1]}"
    bridge_class = None if backend.name == "cython" else backend.Bridge
    with pytest.raises(TypeError, match="give idle_timeout only"):
        tcptotcp.Forwarder("127.0.0.1:0", upstream, idle_timeout=5, idle_timeout_seconds=5)
    with pytest.warns(DeprecationWarning, match="idle_timeout_seconds is now idle_timeout"):
        fwd = tcptotcp.Forwarder(
            "127.0.0.1:0", upstream, bridge_class=bridge_class, rate_check_seconds=1, idle_timeout_seconds=600
        )
    thread = threading.Thread(target=fwd.serve_forever, daemon=True)
    thread.start()
    try:
        assert fwd.options.idle_timeout == 600
        with pytest.warns(DeprecationWarning):
            fwd.reconfigure(upstream, idle_timeout_seconds=2)
        assert fwd.options.idle_timeout == 2 and fwd.options.plan.idle_limit == 2
        with socket.create_connection(fwd.address, timeout=10) as c:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
            started = time.monotonic()
            c.settimeout(15)
            assert c.recv(1) == b""  # ended by the idle rule: (2 // 1 + 1) * 1 s, give or take a check
            assert time.monotonic() - started < 10
        assert _wait(lambda: fwd.stats.active == 0)
    finally:
        fwd.close()
        thread.join(10)
        server.close()
    assert not thread.is_alive()
