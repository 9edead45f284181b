"""The forwarder's listener: the engine's loops (compiled core) or the pure listener's thread
(the pure twin, or TCPTOTCP_ACCEPT_IN_PYTHON=1). Options changed while it runs apply to new
clients without losing a client or an open bridge; the loops serve every forward shape."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Tuple

import pytest

import tcptotcp
from helpers import Background, recv_exactly
from test_forwarder import EchoServer, ForwarderProcess, forwarders  # noqa: F401  (fixture)


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


HERE = os.path.dirname(os.path.abspath(__file__))


def _echo_once(address, payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as c:
        c.sendall(payload)
        return recv_exactly(c, len(payload), timeout=10)


def _served(server: EchoServer) -> int:
    return len(server._conns)


def _wait(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_reconfigure_changes_every_forward_shape_and_keeps_open_bridges(backend):
    servers = [EchoServer() for _ in range(3)]
    a, b, c = (f"127.0.0.1:{s.address[1]}" for s in servers)
    bridge_class = None if backend.name == "cython" else backend.Bridge
    fwd = tcptotcp.Forwarder("127.0.0.1:0", a, bridge_class=bridge_class)
    serving = threading.Thread(target=fwd.serve_forever, daemon=True)
    serving.start()
    held: List[socket.socket] = []
    try:
        address = fwd.address
        assert _echo_once(address, b"to a") == b"to a"
        assert _served(servers[0]) == 1
        assert fwd.listener_kind == backend.listener

        # A bridge that stays open across every change below.
        keeper = socket.create_connection(address, timeout=10)
        held.append(keeper)
        keeper.sendall(b"first")
        assert recv_exactly(keeper, 5) == b"first"

        fwd.reconfigure(b)  # still one upstream: the loops again, now to b
        assert _wait(lambda: _echo_once(address, b"to b") == b"to b" and _served(servers[1]) >= 1)

        fwd.reconfigure([b, c], balance="roundrobin")  # several: the same listener decides
        before = (_served(servers[1]), _served(servers[2]))
        for i in range(4):
            assert _echo_once(address, b"rr %d" % i) == b"rr %d" % i
        assert (_served(servers[1]) - before[0], _served(servers[2]) - before[1]) == (2, 2)

        fwd.reconfigure(a)
        assert fwd.listener_kind == backend.listener
        assert _echo_once(address, b"back to a") == b"back to a"

        keeper.sendall(b"still here")  # relayed all along, by whichever path opened it
        assert recv_exactly(keeper, 10) == b"still here"
        keeper.close()
        held.clear()
        assert _wait(lambda: fwd.stats.active == 0)
    finally:
        for s in held:
            s.close()
        fwd.close()
        serving.join(10)
        for s in servers:
            s.close()
    assert not serving.is_alive()
    # Every client counted once, whichever path took it: 1 + keeper + >=1 + 4 + 1.
    assert fwd.stats.accepted >= 8
    assert fwd.stats.upstream_failures == 0 and fwd.stats.refused == 0


@pytest.mark.signals
def test_accept_in_python_on_request(forwarders, monkeypatch):  # noqa: F811
    """TCPTOTCP_ACCEPT_IN_PYTHON=1 puts the compiled core's forwarder on the pure
    listener: checksummed clients and a refused upstream, as on the loops' listener."""
    monkeypatch.setenv("TCPTOTCP_ACCEPT_IN_PYTHON", "1")
    echo = EchoServer()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    try:
        fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--log-level", "warning")
        host, port = fp.address.rsplit(":", 1)
        for i in range(50):
            payload = os.urandom(1000 + i * 97)
            assert hashlib.sha256(_echo_once((host, int(port)), payload)).digest() == hashlib.sha256(payload).digest()
        fp.terminate()
        assert any("served 50 connections (0 upstream failures, 0 refused)" in line for line in fp.lines), fp.lines
        fp2 = forwarders("127.0.0.1:0", f"127.0.0.1:{dead.getsockname()[1]}")
        with fp2.connect() as c:
            c.settimeout(10)
            assert c.recv(1) == b""
        fp2.wait_log(r"upstream 127\.0\.0\.1:%d failed" % dead.getsockname()[1])
    finally:
        dead.close()
        echo.close()


@pytest.mark.parametrize("level", ["warning", "info"])
def test_counts_stay_exact_when_clients_come_and_go_between_takes(forwarders, level):  # noqa: F811
    """Without open/close lines (warning) the loops' path only sums up the bridges that opened
    and ended between two takes of its events; with them (info) each gets its two lines. Either
    way the summary counts every client and every byte."""
    echo = EchoServer()
    try:
        fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--log-level", level)
        host, port = fp.address.rsplit(":", 1)
        sizes = [1 + (i * 7919) % 20000 for i in range(240)]

        def clients(part: List[int]) -> None:
            for size in part:
                payload = os.urandom(size)
                assert _echo_once((host, int(port)), payload) == payload

        workers = [Background(lambda part=sizes[k::8]: clients(part)) for k in range(8)]
        for w in workers:
            w.result()
        fp.terminate()
        total = sum(sizes)
        summary = f"served {len(sizes)} connections (0 upstream failures, 0 refused), "
        summary += f"{total} bytes up, {total} bytes down"
        assert any(summary in line for line in fp.lines), fp.lines[-3:]
        opens = [line for line in fp.lines if " open 127.0.0.1:" in line]
        closes = [line for line in fp.lines if " close 127.0.0.1:" in line]
        assert (len(opens), len(closes)) == ((len(sizes), len(sizes)) if level == "info" else (0, 0))
    finally:
        echo.close()


def test_close_stops_bridges_opened_just_before_it(backend):
    """close() ends every bridge, including those the loops opened since the serve thread last
    took their events (it takes them in batches): each client sees EOF, each is counted."""
    server = EchoServer()
    bridge_class = None if backend.name == "cython" else backend.Bridge
    fwd = tcptotcp.Forwarder("127.0.0.1:0", f"127.0.0.1:{server.address[1]}", bridge_class=bridge_class)
    serving = threading.Thread(target=fwd.serve_forever, daemon=True)
    serving.start()
    clients: List[socket.socket] = []
    try:
        assert _echo_once(fwd.address, b"warm") == b"warm"  # the path is chosen and serving
        for i in range(20):
            c = socket.create_connection(fwd.address, timeout=10)
            clients.append(c)
            c.sendall(b"%02d" % i)
        for i, c in enumerate(clients):
            assert recv_exactly(c, 2) == b"%02d" % i  # relaying, whether or not taken yet
        fwd.close()
        for c in clients:
            c.settimeout(5)
            assert c.recv(1) == b""  # stopped: FIN, not left relaying
        assert fwd.stats.accepted == 21 and fwd.stats.active == 0
        assert fwd.open_bridges() == []
    finally:
        for c in clients:
            c.close()
        fwd.close()
        serving.join(10)
        server.close()
    assert not serving.is_alive()


def test_access_lists_keep_the_loops_path(backend):
    """--allow/--deny are checked where the client is accepted: on the compiled core the loops
    refuse (close) a client the lists keep out, and report it; the others are relayed."""
    server = EchoServer()
    bridge_class = None if backend.name == "cython" else backend.Bridge
    fwd = tcptotcp.Forwarder(
        "127.0.0.1:0",
        f"127.0.0.1:{server.address[1]}",
        allow=["127.0.0.0/8"],
        deny=["127.0.0.3"],
        bridge_class=bridge_class,
    )
    serving = threading.Thread(target=fwd.serve_forever, daemon=True)
    serving.start()
    try:
        for source in ("127.0.0.1", "127.0.0.2"):
            with socket.create_connection(fwd.address, timeout=10, source_address=(source, 0)) as c:
                c.sendall(b"from " + source.encode())
                assert recv_exactly(c, 14) == b"from " + source.encode()
        assert fwd.listener_kind == backend.listener  # the loops accept with lists too
        with socket.create_connection(fwd.address, timeout=10, source_address=("127.0.0.3", 0)) as c:
            c.settimeout(10)
            assert c.recv(1) == b""  # refused: closed at once
        assert _wait(lambda: fwd.stats.refused == 1 and fwd.stats.accepted == 3)
        assert _served(server) == 2
    finally:
        fwd.close()
        serving.join(10)
        server.close()
    assert not serving.is_alive()


def test_access_lists_match_mapped_clients_as_ipv4(backend):
    """On a dual-stack listener an IPv4 client arrives as ::ffff:a.b.c.d and is matched as the
    IPv4 host it is, against IPv4 entries and entries written in mapped form alike."""
    listening = socket.socket(socket.AF_INET6)  # as inherited from systemd or a parent (fd:N)
    try:
        listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listening.bind(("::", 0))
        listening.listen(16)
    except OSError:
        listening.close()
        pytest.skip("no dual-stack IPv6 here")
    server = EchoServer()
    bridge_class = None if backend.name == "cython" else backend.Bridge
    fwd = tcptotcp.Forwarder(
        "[::]:0",
        f"127.0.0.1:{server.address[1]}",
        listen_socket=listening,
        allow=["127.0.0.1", "::ffff:127.0.0.2/128"],
        deny=["::ffff:127.0.0.2/128"],
        bridge_class=bridge_class,
    )
    serving = threading.Thread(target=fwd.serve_forever, daemon=True)
    serving.start()
    try:
        port = listening.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.1", 0)) as c:
            c.sendall(b"v4 host")
            assert recv_exactly(c, 7) == b"v4 host"
        for source in ("127.0.0.2", "127.0.0.4"):  # denied in mapped form; in no allow entry
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as c:
                c.settimeout(10)
                assert c.recv(1) == b""
        assert _wait(lambda: fwd.stats.refused == 2 and fwd.stats.accepted == 3)
        assert fwd.listener_kind == backend.listener
    finally:
        fwd.close()
        serving.join(10)
        server.close()
        listening.close()
    assert not serving.is_alive()


SPREAD_CHILD = """
import json, socket, sys, threading, time
import tcptotcp
from helpers import recv_exactly
from test_forwarder import EchoServer

backend, clients_at_once, listener = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert tcptotcp.BACKEND == backend
server = EchoServer()
fwd = tcptotcp.Forwarder(
    "127.0.0.1:0", f"127.0.0.1:{server.address[1]}", bridge_class=None if backend == "cython" else tcptotcp.pure.Bridge
)
serving = threading.Thread(target=fwd.serve_forever, daemon=True)
serving.start()
per_loop = []
if backend == "cython":
    from tcptotcp import _core
try:
    for trial in range(3):
        barrier = threading.Barrier(clients_at_once)
        clients = {}

        def connect(i):
            barrier.wait(10)
            clients[i] = socket.create_connection(fwd.address, timeout=10)

        threads = [threading.Thread(target=connect, args=(i,)) for i in range(clients_at_once)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for i, c in clients.items():  # every one relayed: it is open on its loop now
            c.sendall(b"%d:%d" % (trial, i))
            assert recv_exactly(c, len(b"%d:%d" % (trial, i))) == b"%d:%d" % (trial, i)
        if backend == "cython":
            assert fwd.listener_kind == listener
            if listener == "loops":  # (the pure listener's bridges start on the least loaded loop)
                per_loop.append(_core.stats()["bridges_per_loop"])
        for c in clients.values():
            c.close()
        deadline = time.monotonic() + 10
        while (fwd.stats.active or fwd.stats.accepted < (trial + 1) * clients_at_once) and time.monotonic() < deadline:
            time.sleep(0.01)
        if backend == "cython":
            while sum(_core.stats()["bridges_per_loop"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sum(_core.stats()["bridges_per_loop"]) == 0, _core.stats()
        assert fwd.stats.active == 0 and fwd.stats.accepted == (trial + 1) * clients_at_once, fwd.stats
    print(json.dumps({"per_loop": per_loop, "accepted": fwd.stats.accepted, "active": fwd.stats.active}))
finally:
    fwd.close()
    serving.join(10)
    server.close()
"""


def test_clients_that_connect_at_once_are_spread_over_the_loops(backend):
    """Clients that connect together wake one loop, which must not keep them all: two bulk
    clients would then share one loop thread while another sits idle. Eight clients at once,
    three times, in a child with two loops: each loop gets its share (the pure twin: a thread
    per bridge, nothing to spread; every client is relayed either way)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env["TCPTOTCP_LOOP_THREADS"] = "2"
    if backend.name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    clients = 8
    proc = subprocess.run(
        [sys.executable, "-c", SPREAD_CHILD, backend.name, str(clients), backend.listener],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["accepted"] == 3 * clients and report["active"] == 0, report
    if backend.listener == "loops":
        assert len(report["per_loop"]) == 3, report
        for counts in report["per_loop"]:
            # Before: one loop kept most of them ([1, 7], [0, 8], [2, 6] in 14 of 20 trials).
            assert len(counts) == 2 and sum(counts) == clients and max(counts) - min(counts) <= 2, report


CLOSE_IN_BURST_CHILD = """
import json, socket, sys, threading, time
import tcptotcp
from test_forwarder import EchoServer

backend = sys.argv[1]
server = EchoServer()
outcomes = []
for trial in range(int(sys.argv[2])):
    bridge_class = None if backend == "cython" else tcptotcp.pure.Bridge
    fwd = tcptotcp.Forwarder("127.0.0.1:0", f"127.0.0.1:{server.address[1]}", bridge_class=bridge_class)
    serving = threading.Thread(target=fwd.serve_forever, daemon=True)
    serving.start()
    with socket.create_connection(fwd.address, timeout=10) as warm:  # the path is chosen and serving
        warm.sendall(b"w")
        assert warm.recv(1) == b"w"
    barrier = threading.Barrier(17)
    ends = []

    def client():
        try:
            barrier.wait(10)
            c = socket.create_connection(fwd.address, timeout=10)
        except OSError:
            ends.append("refused")
            return
        with c:
            try:
                c.sendall(b"x")
                c.settimeout(10)
                while c.recv(1 << 16):
                    pass
                ends.append("eof")
            except socket.timeout:
                ends.append("hang")  # still relayed after close(): nobody stopped its bridge
            except OSError:
                ends.append("reset")

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    barrier.wait(10)
    time.sleep(0.001 * (trial % 4))  # close() lands at a different moment of the burst each time
    fwd.close()
    still_open = fwd._still_open()  # close() gave up waiting (2 s) for bridges it could not see
    serving.join(10)
    for t in threads:
        t.join(20)
    outcomes.append({"still_open": still_open, "ends": ends, "active": fwd.stats.active})
server.close()
print(json.dumps(outcomes))
"""


def test_close_during_a_burst_of_clients_stops_every_one(backend):
    """close() while a burst of clients is being accepted (and, on the loops, handed from one
    loop to another): it returns promptly, and every client that got in is stopped (it sees
    EOF or a reset), none left relaying behind the closed forwarder."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env["TCPTOTCP_LOOP_THREADS"] = "2"
    if backend.name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CLOSE_IN_BURST_CHILD, backend.name, "40"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for outcome in json.loads(proc.stdout):
        assert "hang" not in outcome["ends"] and len(outcome["ends"]) == 16, outcome
        assert outcome["active"] == 0, outcome
        assert not outcome["still_open"], outcome


def _unanswering_upstream(held: List[socket.socket]) -> socket.socket:
    """A listener whose accept queue is full: a new SYN is dropped, and a connect() to it stays
    in progress until a retransmission finds room (once something is accepted)."""
    upstream = socket.socket()
    held.append(upstream)
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(1)  # (0 would leave every SYN to syncookies, or drop it where they are off)
    for _ in range(6):  # fill the accept queue
        filler = socket.socket()
        held.append(filler)
        filler.setblocking(False)
        filler.connect_ex(upstream.getsockname())
    time.sleep(0.1)
    return upstream


@contextlib.contextmanager
def _client_connecting_upstream(backend) -> Iterator[Tuple[socket.socket, tcptotcp.Forwarder, socket.socket]]:
    """(upstream, forwarder, client): the client sent b"hello" through the forwarder, whose
    connect to the upstream is in flight (its SYN waits for a retransmission)."""
    held: List[socket.socket] = []
    fwd = None
    serving = None
    try:
        upstream = _unanswering_upstream(held)
        bridge_class = None if backend.name == "cython" else backend.Bridge
        fwd = tcptotcp.Forwarder(
            "127.0.0.1:0", f"127.0.0.1:{upstream.getsockname()[1]}", bridge_class=bridge_class, connect_timeout=20
        )
        serving = threading.Thread(target=fwd.serve_forever, daemon=True)
        serving.start()
        client = socket.create_connection(fwd.address, timeout=10)
        held.append(client)
        client.sendall(b"hello")
        time.sleep(0.3)  # the forwarder's SYN is in flight, unanswered
        yield upstream, fwd, client
    finally:
        if fwd is not None:
            fwd.close()
        if serving is not None:
            serving.join(10)
        for sock in held:
            sock.close()


def test_a_client_still_connecting_upstream_is_kept_across_reconfigure(backend):
    """reconfigure() while a client's upstream connect is in flight (the upstream's accept
    queue is full, so the SYN waits for its retransmission): the client is relayed once the
    upstream answers, as reconfigure() promises ("clients already connecting keep theirs");
    it is not given up on with the listener it came through."""
    with _client_connecting_upstream(backend) as (upstream, fwd, client):
        fwd.reconfigure(f"127.0.0.1:{upstream.getsockname()[1]}", connect_timeout=20)
        # Let the upstream answer: accept the fillers, then the forwarder's connection once a
        # retransmitted SYN gets in; it is the one that carries the client's bytes.
        upstream.settimeout(0.2)
        relayed = None
        deadline = time.monotonic() + 15
        conns: List[socket.socket] = []
        try:
            while relayed is None and time.monotonic() < deadline:
                try:
                    conn, _ = upstream.accept()
                    conn.setblocking(False)
                    conns.append(conn)
                except socket.timeout:
                    pass
                for conn in conns:
                    try:
                        if conn.recv(5, socket.MSG_PEEK) == b"hello":
                            relayed = conn
                    except BlockingIOError:
                        pass
            assert relayed is not None, "the client was given up on: its bytes never reached the upstream"
            relayed.setblocking(True)
            assert recv_exactly(relayed, 5) == b"hello"
            relayed.sendall(b"world")
            assert recv_exactly(client, 5) == b"world"
            assert fwd.stats.upstream_failures == 0
        finally:
            for conn in conns:
                conn.close()


def test_close_gives_up_on_a_client_still_connecting_upstream(backend):
    """close() while a client's upstream connect is in flight: the client is closed at once
    (not left waiting behind a closed forwarder), and nothing stays active."""
    with _client_connecting_upstream(backend) as (_, fwd, client):
        fwd.close()
        assert not fwd._still_open()  # ended within close(), not left to its connect's report
        client.settimeout(5)
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass  # closed with the client's bytes unread: a reset is as good as a FIN here
        assert fwd.stats.active == 0
