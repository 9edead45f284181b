"""The forwarder under many clients: a connection rate's worth in a row, a thousand at once,
no thread per client, upstream failures reported per client, prompt exit with bridges open."""

from __future__ import annotations

import hashlib
import os
import resource
import selectors
import signal
import socket
import threading
import time
from typing import Dict, List, Tuple

import pytest

from helpers import HAS_PROC
from test_forwarder import ForwarderProcess, forwarders  # noqa: F401  (fixture)


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class SelectorEcho:
    """An echo upstream on one thread: echoes every byte, answers EOF with EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pending: Dict[socket.socket, bytearray] = {}
        self.served = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, events in sel.select(1.0):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        for conn in list(self._pending):
                            sel.unregister(conn)
                            conn.close()
                        self._pending.clear()
                        if b"x" in self._wake_r.recv(64):
                            return
                        continue
                    if sock is self.listener:
                        for _ in range(256):
                            try:
                                conn, _ = self.listener.accept()
                            except BlockingIOError:
                                break
                            conn.setblocking(False)
                            self._pending[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ)
                        continue
                    assert isinstance(sock, socket.socket)
                    self._serve(sel, sock, events)

    def _serve(self, sel: selectors.BaseSelector, conn: socket.socket, events: int) -> None:
        out = self._pending[conn]
        try:
            if events & selectors.EVENT_READ:
                data = conn.recv(65536)
                if not data:
                    if out:
                        conn.setblocking(True)
                        conn.sendall(out)
                    sel.unregister(conn)
                    del self._pending[conn]
                    conn.close()
                    self.served += 1
                    return
                out += data
            if out:
                sent = conn.send(out)
                del out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            sel.unregister(conn)
            del self._pending[conn]
            conn.close()
            return
        sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))

    def close_all(self) -> None:
        """Close every upstream connection (with FIN), keep listening."""
        self._wake_w.send(b"c")

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(10)
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()


@pytest.fixture
def upstream():
    _raise_fd_limit()
    server = SelectorEcho()
    yield server
    server.close()


def _roundtrip(address: Tuple[str, int], payload: bytes) -> str:
    """Send, read the echo back, close first (the client ends its bridge, as HTTP clients do)."""
    with socket.create_connection(address, timeout=10) as c:
        c.sendall(payload)
        digest = hashlib.sha256()
        got = 0
        while got < len(payload):
            chunk = c.recv(65536)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        return digest.hexdigest()


def _host_port(fp: ForwarderProcess) -> Tuple[str, int]:
    host, port = fp.address.rsplit(":", 1)
    return host, int(port)


def _threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.unix
@pytest.mark.signals
def test_two_thousand_short_connections_in_a_row(forwarders, upstream):  # noqa: F811
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}", "--log-level", "warning")
    address = _host_port(fp)
    deadline = time.monotonic() + 120
    for i in range(2000):
        payload = os.urandom(100 + i % 3000)
        assert _roundtrip(address, payload) == hashlib.sha256(payload).hexdigest(), f"connection {i}"
        assert time.monotonic() < deadline, f"only {i} connections in 120 s"
    fp.terminate()
    assert any("served 2000 connections (0 upstream failures, 0 refused)" in line for line in fp.lines), fp.lines[-3:]


def _open_clients(address: Tuple[str, int], count: int) -> List[socket.socket]:
    clients = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(address, timeout=10))
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


@pytest.mark.unix
@pytest.mark.signals
@pytest.mark.proc
def test_a_thousand_clients_at_once_all_served(forwarders, upstream, backend):  # noqa: F811
    fp = forwarders(
        "127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}", "--max-connections", "2000", "--log-level", "warning"
    )
    address = _host_port(fp)
    clients = _open_clients(address, 1000)
    try:
        # Every client is bridged at once (none waits in the backlog): a round trip each.
        payloads = {c: os.urandom(64 + i % 500) for i, c in enumerate(clients)}
        for c, p in payloads.items():
            c.sendall(p)
        for c, p in payloads.items():
            got = bytearray()
            while len(got) < len(p):
                chunk = c.recv(len(p) - len(got))
                assert chunk, "closed early"
                got += chunk
            assert bytes(got) == p
        if backend.name == "cython" and HAS_PROC:
            # 1,000 bridges open: still only the forwarder's own and the engine's threads.
            assert _threads_of(fp.proc.pid) <= 10, _threads_of(fp.proc.pid)
        # The upstream ends each conversation: the client sees every byte, then EOF.
        for c in clients:
            c.sendall(b"end")
        for c in clients:
            assert c.recv(3) == b"end"
        upstream.close_all()
        for c in clients:
            c.settimeout(10)
            assert c.recv(1) == b""
    finally:
        for c in clients:
            c.close()
    assert fp.terminate() < 5
    assert any("served 1000 connections (0 upstream failures, 0 refused)" in line for line in fp.lines), fp.lines[-3:]


@pytest.mark.unix
@pytest.mark.proc
@pytest.mark.skipif(not HAS_PROC, reason="counts threads in /proc")
def test_forwarder_threads_do_not_grow_with_clients(forwarders, upstream, backend):  # noqa: F811
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}", "--log-level", "warning")
    address = _host_port(fp)
    assert _roundtrip(address, b"warm") == hashlib.sha256(b"warm").hexdigest()  # the engine is up
    time.sleep(0.2)
    before = _threads_of(fp.proc.pid)
    clients = _open_clients(address, 200)
    try:
        for c in clients:
            c.sendall(b"x")
        for c in clients:
            assert c.recv(1) == b"x"
        during = _threads_of(fp.proc.pid)
    finally:
        for c in clients:
            c.close()
    if backend.name == "cython":
        assert during == before, (before, during)
    else:  # the pure twin: threads per bridge (three, the last of them possibly still starting)
        assert during >= before + 200 * 2


def _unanswered_upstream() -> Tuple[socket.socket, List[socket.socket], int]:
    """A listener whose accept queue is full: a new SYN is dropped and connect() hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: List[socket.socket] = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    return listener, fillers, port


@pytest.mark.unix
@pytest.mark.signals
def test_upstream_connect_timeout_is_reported_per_client(forwarders):  # noqa: F811
    listener, fillers, port = _unanswered_upstream()
    try:
        fp = forwarders("127.0.0.1:0", f"127.0.0.1:{port}", "--connect-timeout", "0.5")
        address = _host_port(fp)
        started = time.monotonic()
        clients = [socket.create_connection(address, timeout=5) for _ in range(3)]
        try:
            for c in clients:
                assert c.recv(1) == b""  # closed once its upstream connect timed out
            assert time.monotonic() - started < 3
            for n in (1, 2, 3):
                fp.wait_log(r"#%d 127\.0\.0\.1:\d+: upstream 127\.0\.0\.1:%d failed: timed out" % (n, port))
        finally:
            for c in clients:
                c.close()
        fp.terminate()
        assert any("served 3 connections (3 upstream failures, 0 refused)" in line for line in fp.lines), fp.lines[-3:]
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.unix
@pytest.mark.signals
def test_sigterm_with_many_open_bridges_exits_promptly(forwarders, upstream):  # noqa: F811
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}", "--log-level", "warning")
    clients = _open_clients(_host_port(fp), 300)
    try:
        for c in clients:
            c.sendall(b"y")
        for c in clients:
            assert c.recv(1) == b"y"
        assert fp.terminate(signal.SIGTERM) < 5
        assert fp.proc.returncode == 0
        for c in clients[:20]:
            c.settimeout(5)
            assert c.recv(1) == b""  # each bridge ended with a FIN to its client
    finally:
        for c in clients:
            c.close()
