"""How each engine carries many bridges: threads per bridge, a slow peer beside busy bridges,
stop and idle ends across every loop, and what a forked child gets."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from helpers import HAS_PROC, Background, Topology, bridge_fds, link, recv_exactly

HERE = os.path.dirname(os.path.abspath(__file__))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _warm_up(backend) -> None:
    """One bridge to its end: the compiled engine's loop and results threads now exist."""
    a, b = link("unix")
    c, d = link("unix")
    bridge = backend.Bridge(b, c, 1, 30).start()
    bridge.stop()
    assert bridge.wait(5) is not None
    for s in (a, d):
        s.close()
    time.sleep(0.1)  # the pure engine's threads end just after the result


@pytest.mark.unix
@pytest.mark.proc
@pytest.mark.skipif(not HAS_PROC, reason="counts threads in /proc")
def test_many_bridges_start_no_thread_of_their_own(backend):
    """Compiled: 2,000 bridges leave the process's thread count as it was once the engine
    started. Pure: three threads a bridge (fewer bridges, same arithmetic)."""
    count = 2000 if backend.name == "cython" else 100
    if _raise_fd_limit() < count * 8 + 200:
        pytest.skip("not enough file descriptors")
    _warm_up(backend)
    before = _tasks()
    topologies = [Topology("unix", "unix") for _ in range(count)]
    bridges = []
    try:
        bridges = [backend.Bridge(t.stream1, t.stream2, 60, 600).start() for t in topologies]
        for t in topologies[:: max(1, count // 100)]:  # they relay
            t.peer_a.sendall(b"ping")
            assert recv_exactly(t.peer_b, 4) == b"ping"
        during = _tasks()
        assert during - before == (0 if backend.name == "cython" else 3 * count), (before, during)
    finally:
        for bridge in bridges:
            bridge.stop()
        for bridge in bridges:
            assert bridge.wait(10) is not None
        for t in topologies:
            t.__exit__()
    deadline = time.monotonic() + 5
    while _tasks() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tasks() == before


SLOW_PEERS_CHILD = textwrap.dedent(
    """
    import hashlib, os, socket, sys, threading, time
    from helpers import Topology, recv_exactly
    import tcptotcp
    backend = tcptotcp if sys.argv[1] == "cython" else tcptotcp.pure
    assert backend.BACKEND == sys.argv[1]

    # One peer that never reads: its bridge holds what it could not deliver and stops reading.
    stuck = Topology()
    stuck_bridge = backend.Bridge(stuck.stream1, stuck.stream2, 60, 600).start()
    stuck.peer_a.setblocking(False)
    pushed = 0
    chunk = bytes(1 << 16)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            pushed += stuck.peer_a.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                pushed += stuck.peer_a.send(chunk)
            except BlockingIOError:
                break
    # One peer that never sends: its bridge waits on it forever.
    silent = Topology()
    silent_bridge = backend.Bridge(silent.stream1, silent.stream2, 60, 600).start()

    # 100 bridges relaying normally beside them: checksummed round trips, promptly.
    tops = [Topology() for _ in range(100)]
    bridges = [backend.Bridge(t.stream1, t.stream2, 60, 600).start() for t in tops]
    started = time.monotonic()
    for rnd in range(5):
        payloads = [os.urandom(1000 + i) for i in range(100)]
        for t, p in zip(tops, payloads):
            t.peer_a.sendall(p)
        for t, p in zip(tops, payloads):
            assert hashlib.sha256(recv_exactly(t.peer_b, len(p))).digest() == hashlib.sha256(p).digest()
            t.peer_b.sendall(p[:10])
            assert recv_exactly(t.peer_a, 10) == p[:10]
    elapsed = time.monotonic() - started
    assert stuck_bridge.running and silent_bridge.running
    # The stuck bridge delivers everything once its reader wakes up: nothing was lost.
    stuck.peer_b.settimeout(10)
    got = len(recv_exactly(stuck.peer_b, pushed, timeout=20))
    for b in bridges + [stuck_bridge, silent_bridge]:
        b.stop()
    for b in bridges + [stuck_bridge, silent_bridge]:
        assert b.wait(10) is not None
    print("ok", pushed > 1 << 20, got == pushed, round(elapsed, 2), flush=True)
    """
)


def test_a_slow_peer_never_holds_up_the_others_on_its_loop(backend):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env["TCPTOTCP_LOOP_THREADS"] = "1"  # every bridge on the same loop
    if backend.name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SLOW_PEERS_CHILD, backend.name], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    word, filled, complete, elapsed = proc.stdout.split()
    assert (word, filled, complete) == ("ok", "True", "True"), proc.stdout
    assert float(elapsed) < 30, elapsed  # 1,000 round trips; blocked bridges would take forever


@pytest.mark.unix
def test_stop_from_other_threads_and_idle_ends_across_all_loops(backend):
    """Bridges spread over every loop: half end idle on the contract's schedule, half are
    stopped from other threads; every one ends once, with its reason and exact counts."""
    count = 160
    topologies = [Topology("unix", "unix") for _ in range(count)]
    try:
        idle = [backend.Bridge(t.stream1, t.stream2, 1, 2).start() for t in topologies[: count // 2]]
        stoppable = [backend.Bridge(t.stream1, t.stream2, 60, 600).start() for t in topologies[count // 2 :]]
        started = time.monotonic()
        if backend.name == "cython":
            from tcptotcp import _core

            per_loop = _core.stats()["bridges_per_loop"]
            assert len(per_loop) == _core.loop_threads() >= 1
            if len(per_loop) > 1:
                assert all(n > 0 for n in per_loop), per_loop  # spread, not piled on one loop
        for i, t in enumerate(topologies):
            t.peer_a.sendall(b"x" * (i + 1))
            assert recv_exactly(t.peer_b, i + 1) == b"x" * (i + 1)
        stoppers = [threading.Thread(target=b.stop) for b in stoppable]
        for s in stoppers:
            s.start()
        for s in stoppers:
            s.join(5)
        for i, b in enumerate(stoppable):
            result = b.wait(5)
            assert result is not None and result.reason == "stopped"
            assert result.bytes_1_to_2 == count // 2 + i + 1
        for i, b in enumerate(idle):
            result = b.wait(10)
            assert result is not None and result.reason == "idle", result
            assert result.bytes_1_to_2 == i + 1
            # r=1, k=2: (2 // 1 + 1) * 1 = 3 s from its own start (a bridge's clock: the time
            # spent starting the other 159 on a loaded machine is not in it), one-way traffic
            # never qualifies under "both".
            assert 2.9 < result.seconds < 5, result
        assert time.monotonic() - started < 5
    finally:
        for t in topologies:
            t.__exit__()


@pytest.mark.fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_fresh_engine_and_leaves_the_parents_bridges_alone(backend):
    """The child: each inherited bridge reports "stopped" at once and its fds are closed in
    the child only; a new bridge in the child works. The parent's bridges keep relaying, and
    end with a FIN to their peers, not held open by the child."""
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 60, 600).start()
        t.peer_a.sendall(b"before")
        assert recv_exactly(t.peer_b, 6) == b"before"
        deadline = time.monotonic() + 5  # the count follows the send() that delivered the bytes
        while bridge.counts != (6, 0) and time.monotonic() < deadline:
            time.sleep(0.001)
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
            pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                said = []
                inherited = bridge.wait(5)
                if inherited is None or (inherited.reason, inherited.bytes_1_to_2) != ("stopped", 6):
                    said.append(f"inherited: {inherited}")
                with Topology() as u:
                    fresh = backend.Bridge(u.stream1, u.stream2, 60, 600).start()
                    u.peer_a.sendall(b"child")
                    echoed = recv_exactly(u.peer_b, 5)
                    if echoed != b"child":
                        said.append(f"fresh bridge relayed {echoed!r}, ended {fresh.wait(0)}")
                    fresh.stop()
                    if fresh.wait(5) is None:
                        said.append("fresh bridge did not stop")
                os.write(write_end, "; ".join(said).encode() or b"ok")
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as report:
            said = report.read()
            assert said == b"ok", said.decode()
        assert os.waitpid(pid, 0)[1] == 0
        assert bridge.running
        t.peer_a.sendall(b"after")
        assert recv_exactly(t.peer_b, 5) == b"after"
        t.peer_a.close()
        result = bridge.wait(5)
        assert result is not None and (result.reason, result.bytes_1_to_2) == ("closed", 11)
        t.peer_b.settimeout(5)
        assert t.peer_b.recv(1) == b""  # FIN: no copy of the bridge's fds lives on in the child


def test_adopted_fds_relay_and_are_closed(backend):
    """Bridge.from_fds: no dups; the bridge closes the fds it adopted."""
    with Topology() as t:
        fd1, fd2 = t.stream1.detach(), t.stream2.detach()
        fds_before = bridge_fds()
        bridge = backend.Bridge.from_fds(fd1, fd2, 60, 600).start()
        payload = os.urandom(300_000)
        sender = Background(lambda: t.peer_a.sendall(payload))
        assert hashlib.sha256(recv_exactly(t.peer_b, len(payload))).digest() == hashlib.sha256(payload).digest()
        sender.result()
        t.peer_b.close()
        result = bridge.wait(5)
        assert result is not None and (result.reason, result.bytes_1_to_2) == ("closed", len(payload))
        deadline = time.monotonic() + 2
        while bridge_fds() > fds_before - 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bridge_fds() == fds_before - 3  # both adopted fds and peer_b


@pytest.mark.parametrize("bad", [(-1, 5), (7, 7)])
def test_from_fds_rejects_bad_fds(backend, bad):
    with pytest.raises(ValueError):
        backend.Bridge.from_fds(bad[0], bad[1], 1, 2)
    with pytest.raises(TypeError):
        backend.Bridge.from_fds("3", 4, 1, 2)
