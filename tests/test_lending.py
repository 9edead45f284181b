"""A bridge streaming both ways at once, and every way it can end, on both engines.

On the compiled engine such a bridge lends one direction to another, idle loop (two cores, as
0.1.0's two pump threads had); the loop it came from keeps the ending. Each case runs in a child
with two loop threads, so that another loop is idle whatever ran before in this process: all
bytes arrive (checksummed), counts are exact, the reason is right, no fd of the bridge is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent(
    """
    import hashlib, json, os, socket, struct, sys, threading, time
    from helpers import Topology, bridge_fds
    import tcptotcp
    backend = tcptotcp if sys.argv[1] == "cython" else tcptotcp.pure
    assert backend.BACKEND == sys.argv[1]
    case = sys.argv[2]
    SIZE = 24 << 20

    class Peer:
        '''Sends `data` (or, without it, streams until told or refused) and reads to the end.'''

        def __init__(self, sock, data=None, shut=True):
            self.sock, self.data, self.shut = sock, data, shut
            self.sent = self.got = 0
            self.digest = hashlib.sha256()
            self.quiet = threading.Event()
            # Before the threads: set by _recv while _send's sendall() ran, it left that sendall
            # blocking on a non-blocking fd, spinning on EAGAIN (a core lost to the relay).
            self.sock.settimeout(20)
            self.read_error = None
            self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]
            for t in self.threads:
                t.start()

        def _send(self):
            chunk = memoryview(self.data) if self.data is not None else bytes(1 << 20)
            deadline = time.monotonic() + 20
            try:
                while time.monotonic() < deadline:
                    if self.data is not None:
                        self.sock.sendall(self.data)
                        self.sent = len(self.data)
                        break
                    if self.quiet.is_set():
                        break
                    self.sent += self.sock.send(chunk)
                if self.shut:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the bridge ended and closed: what it took is counted

        def _recv(self):
            try:
                while True:
                    piece = self.sock.recv(1 << 20)
                    if not piece:
                        break
                    self.got += len(piece)
                    self.digest.update(piece)
            except OSError as exc:  # a reset, after every byte relayed to us
                self.read_error = type(exc).__name__

        def join(self):
            for t in self.threads:
                t.join(30)
            return not any(t.is_alive() for t in self.threads)

    def wait_until(test, seconds=10):
        deadline = time.monotonic() + seconds
        while not test() and time.monotonic() < deadline:
            time.sleep(0.005)
        return test()

    def reset(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    fds = bridge_fds()
    report = {}
    with Topology() as t:
        half_close = case in ("both_shut", "reset_a", "reset_b")
        rate, idle = (1, 1) if case == "idle" else (60, 600)
        bridge = backend.Bridge(t.stream1, t.stream2, rate, idle, half_close=half_close).start()
        lent = lambda: getattr(bridge._relay, "lent", None)
        if case == "both_shut":  # each peer sends, then shuts down writing: both directions end
            a_data, b_data = os.urandom(SIZE), os.urandom(SIZE)
            a, b = Peer(t.peer_a, a_data), Peer(t.peer_b, b_data)
        elif case == "b_closes":  # the lent direction's peer is done: the bridge ends "closed"
            b_data = os.urandom(SIZE)
            a = Peer(t.peer_a, shut=False)  # (a's EOF would end it too)
            # b's 24 MiB and its FIN must not all pass before a's bytes flowed (the end would come
            # before "flowing"): b starts once a's bytes flow, and its FIN waits for "flowing".
            wait_until(lambda: bridge.counts[0] >= 1 << 20)
            b = Peer(t.peer_b, b_data, shut=False)
        else:  # both stream until the bridge ends
            a, b = Peer(t.peer_a, shut=case != "idle"), Peer(t.peer_b, shut=case != "idle")
        flowing = wait_until(lambda: min(bridge.counts) >= 8 << 20)
        report["lent_while_flowing"] = lent()
        if case == "stop":
            threading.Thread(target=bridge.stop).start()
        elif case == "reset_a":
            reset(t.peer_a)
        elif case == "reset_b":
            reset(t.peer_b)
        if case != "b_closes":  # the senders stop: the drain after the end finds them quiet
            a.quiet.set()
            b.quiet.set()
        if case == "b_closes":
            wait_until(lambda: b.sent == SIZE, 20)
            t.peer_b.shutdown(socket.SHUT_WR)  # b is done: its EOF ends the bridge
            a.quiet.set()  # EOF reached: a stops streaming once the bridge ended
        started = time.monotonic()
        result = bridge.wait(20)
        report["ended_after"] = round(time.monotonic() - started, 2)
        a.quiet.set()
        report["peers_done"] = a.join() and b.join()
        report["flowing"] = flowing
        report["reason"] = result and result.reason
        report["counts"] = result and [result.bytes_1_to_2, result.bytes_2_to_1]
        report["received"] = [b.got, a.got]
        report["sent"] = [a.sent, b.sent]
        if case == "both_shut":
            report["checksums"] = [b.digest.digest() == hashlib.sha256(a_data).digest(),
                                   a.digest.digest() == hashlib.sha256(b_data).digest()]
        if case == "b_closes":
            report["checksum_2_to_1"] = a.digest.digest() == hashlib.sha256(b_data).digest()
        report["lent"] = lent()
    report["fds_left"] = wait_until(lambda: bridge_fds() == fds, 3) or (bridge_fds() - fds)
    print(json.dumps(report), flush=True)
    """
)

CASES = ["both_shut", "b_closes", "stop", "idle", "reset_a", "reset_b"]


def _run(backend, case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env["TCPTOTCP_LOOP_THREADS"] = "2"
    if backend.name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, backend.name, case], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _lends(backend) -> bool:
    """Whether this engine lends a direction here: compiled, with splice (Linux)."""
    return backend.name == "cython" and bool(backend.module._core.SPLICE_AVAILABLE)


@pytest.mark.parametrize("case", CASES)
def test_a_bridge_streaming_both_ways_ends_right(backend, case):
    r = _run(backend, case)
    assert r["flowing"], r
    assert r["counts"] is not None, r  # it ended
    assert r["peers_done"], r
    assert r["fds_left"] is True, r
    # Every byte relayed is a byte received, and the other way round: nothing lost, none extra
    # (a peer that reset its connection reads nothing more: only the other way is checked).
    checked = {"reset_a": [0], "reset_b": [1]}.get(case, [0, 1])
    assert [r["counts"][i] for i in checked] == [r["received"][i] for i in checked], r
    if _lends(backend):
        assert r["lent_while_flowing"] is True and r["lent"] is True, r
    if case == "both_shut":
        assert r["reason"] == "closed" and r["checksums"] == [True, True], r
        assert r["counts"] == r["sent"], r
    elif case == "b_closes":
        assert r["reason"] == "closed" and r["checksum_2_to_1"], r
        assert r["counts"][1] == r["sent"][1], r  # all of it, before the end
    elif case == "stop":
        assert r["reason"] == "stopped" and r["ended_after"] < 5, r
    elif case == "idle":
        # r=1, k=1: two quiet checks after the traffic stopped, (1 // 1 + 1) * 1 = 2 s.
        assert r["reason"] == "idle" and 1 <= r["ended_after"] < 6, r
    else:
        assert r["reason"] == "error" and r["ended_after"] < 5, r
