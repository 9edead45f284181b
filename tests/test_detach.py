"""Bridge.detach() and Bridge(..., resume=...): a bridge handed over without a lost, duplicated
or reset byte, its counts, age and idle state carried on."""

from __future__ import annotations

import fcntl
import random
import socket
import sys
import termios
import threading
import time
from typing import Optional

import pytest

from helpers import Background, Topology
from tcptotcp._bridge import BridgeState, Detached


def known_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Flow:
    """One direction of test traffic: `src` sends `data` (in chunks, `gap` seconds apart) and
    keeps its write side open; a reader at `dst` checks every byte arrives once, in order.
    An early EOF or a reset fails the reader."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        data: bytes,
        chunk: int = 32768,
        gap: float = 0.0,
        paused: bool = False,
    ):
        self.data = data
        self.sent = 0
        self.received = 0
        # Set: the reader pauses. A paused reader starts paused: one that read even a little first
        # would let the kernel grow its receive buffer to megabytes, and the bytes meant to stay in
        # the bridge would fit in the kernel instead.
        self.stop_reading = threading.Event()
        if paused:
            self.stop_reading.set()
        self.sender = Background(lambda: self._send(src, chunk, gap))
        self.reader = Background(lambda: self._read(dst))

    def _send(self, src: socket.socket, chunk: int, gap: float) -> None:
        src.settimeout(60)
        view = memoryview(self.data)
        for start in range(0, len(view), chunk):
            src.sendall(view[start : start + chunk])
            self.sent = min(len(view), start + chunk)
            if gap:
                time.sleep(gap)

    def _read(self, dst: socket.socket) -> int:
        dst.settimeout(60)
        while self.received < len(self.data):
            while self.stop_reading.is_set():
                time.sleep(0.01)
            chunk = dst.recv(65536)
            assert chunk, f"EOF after {self.received} of {len(self.data)} bytes"
            end = self.received + len(chunk)
            assert chunk == self.data[self.received : end], f"wrong bytes at {self.received}"
            self.received = end
        return self.received

    def finish(self, timeout: float = 60.0) -> None:
        self.sender.result(timeout)
        assert self.reader.result(timeout) == len(self.data)


def queued(sock: socket.socket, request: int) -> int:
    """Bytes in a socket's receive queue (FIONREAD) or unacknowledged in its send queue (TIOCOUTQ)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), request, bytes(4)), sys.byteorder, signed=True)


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def end_both(t: Topology) -> None:
    """Both peers half-close once their bytes arrived; each must then read a plain EOF."""
    t.peer_a.shutdown(socket.SHUT_WR)
    t.peer_b.shutdown(socket.SHUT_WR)
    for peer in (t.peer_a, t.peer_b):
        peer.settimeout(10)
        assert peer.recv(1) == b""


def close_record(record: Optional[Detached]) -> None:
    if record is not None:
        record.stream1.close()
        record.stream2.close()


def handed_over(engine, t: Topology, size: int, gap: float, detach_at: int, timeout: float = 5.0):
    """Traffic both ways, a detach once `detach_at` bytes went each way, a resumed bridge on the
    handed-over sockets, the transfer to its end: (first result, record, final result, pause)."""
    up, down = known_bytes(1, size), known_bytes(2, size + 7)
    first = engine.Bridge(t.stream1, t.stream2, 1, 60, half_close=True).start()
    flows = [Flow(t.peer_a, t.peer_b, up, gap=gap), Flow(t.peer_b, t.peer_a, down, gap=gap)]
    wait_for(lambda: min(first.counts) >= detach_at, what="traffic through the first bridge")
    began = time.monotonic()
    record = first.detach(timeout)
    assert record is not None
    second = engine.Bridge(record.stream1, record.stream2, 1, 60, half_close=True, resume=record).start()
    pause = time.monotonic() - began
    try:
        for flow in flows:
            flow.finish()
        end_both(t)
        final = second.wait(10)
    finally:
        second.stop()
        close_record(record)
    first_result = first.wait(10)
    return first_result, record, final, pause, len(up), len(down)


def test_detach_and_resume_checksummed_both_ways(engine):
    with Topology() as t:
        first, record, final, pause, up, down = handed_over(engine, t, 6 * 1024 * 1024, 0.0005, 1024 * 1024)
    print(f"\n{engine.name}: detach + resume paused the bridge {pause * 1000:.1f} ms")
    assert first is not None and first.reason == "detached"
    state = record.state
    assert (first.bytes_1_to_2, first.bytes_2_to_1) == (state.bytes_1_to_2, state.bytes_2_to_1)
    assert 0 < state.bytes_1_to_2 < up and 0 < state.bytes_2_to_1 < down
    assert final is not None and final.reason == "closed"
    assert (final.bytes_1_to_2, final.bytes_2_to_1) == (up, down)
    assert final.seconds >= first.seconds
    assert pause < 1.0


def test_detach_bulk_with_bytes_held(engine):
    """Unpaced bulk (the compiled engine splices, its pipes full) and a slow reader at one end
    (a short write's tail held): everything is delivered before the hand-over."""
    size = 12 * 1024 * 1024
    up, down = known_bytes(3, size), known_bytes(4, size)
    with Topology() as t:
        t.stream2.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        first = engine.Bridge(t.stream1, t.stream2, 1, 60, half_close=True).start()
        # peer_b reads nothing for now: direction 1 -> 2 holds bytes
        flows = [Flow(t.peer_a, t.peer_b, up, paused=True), Flow(t.peer_b, t.peer_a, down)]
        wait_for(lambda: first.counts[1] >= 4 * 1024 * 1024, what="bulk 2 -> 1")
        time.sleep(0.1)
        slow_start = threading.Timer(0.2, flows[0].stop_reading.clear)
        slow_start.start()
        record = first.detach(10.0)
        slow_start.join()
        assert record is not None
        if engine.name == "cython":
            relay = first._relay
            print(f"\nspliced {relay.used_splice}, lent {relay.lent}")
            assert any(relay.used_splice)
        second = engine.Bridge(record.stream1, record.stream2, 1, 60, half_close=True, resume=record).start()
        try:
            for flow in flows:
                flow.finish()
            end_both(t)
            final = second.wait(10)
        finally:
            second.stop()
            close_record(record)
        first_result = first.wait(10)
    assert first_result is not None and first_result.reason == "detached"
    assert final is not None and (final.bytes_1_to_2, final.bytes_2_to_1, final.reason) == (size, size, "closed")


def test_detach_gives_up_when_a_receiver_does_not_read(engine):
    size = 8 * 1024 * 1024
    up = known_bytes(5, size)
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 60).start()
        flow = Flow(t.peer_a, t.peer_b, up, paused=True)

        def held_back() -> bool:
            # Counts standing still alone can be a sender the machine has not scheduled for a
            # moment; then the bridge holds nothing and would detach at once. Held back means:
            # the receiver's window is full (bytes stay in stream2's send queue) and the bridge
            # leaves bytes unread on stream1, with nothing moving for 0.1 s.
            before = bridge.counts[0]
            time.sleep(0.1)
            return (
                bridge.counts[0] == before > 0
                and queued(t.stream2, termios.TIOCOUTQ) > 0
                and queued(t.stream1, termios.FIONREAD) > 0
            )

        wait_for(held_back, what="the bridge held back by the receiver")
        began = time.monotonic()
        assert bridge.detach(0.3) is None
        assert 0.25 < time.monotonic() - began < 3
        assert bridge.running
        flow.stop_reading.clear()
        flow.finish()
        t.peer_a.shutdown(socket.SHUT_WR)
        result = bridge.wait(10)
    assert result is not None and (result.bytes_1_to_2, result.reason) == (size, "closed")


def test_detach_of_an_ended_or_unstarted_bridge(engine):
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 60)
        assert bridge.detach() is None  # not started
        bridge.start()
        bridge.stop()
        result = bridge.wait(10)
        assert bridge.detach() is None
        assert bridge.wait(1) == result and result is not None and result.reason == "stopped"


def test_detach_racing_stop(engine):
    outcomes = set()
    for round_ in range(15):
        with Topology() as t:
            bridge = engine.Bridge(t.stream1, t.stream2, 1, 60).start()
            t.peer_a.sendall(b"x" * 1000)
            t.peer_b.settimeout(10)
            assert len(t.peer_b.recv(1000)) > 0
            go = threading.Barrier(2)

            def stop() -> None:
                go.wait(5)
                if round_ % 2:
                    time.sleep(0.0005 * (round_ % 4))
                bridge.stop()

            stopper = Background(stop)
            go.wait(5)
            record = bridge.detach(2.0)
            stopper.result(10)
            result = bridge.wait(10)
            assert result is not None, "the bridge did not end"
            outcomes.add(result.reason)
            if record is None:
                assert result.reason == "stopped"
                t.peer_a.settimeout(10)
                assert t.peer_a.recv(10) == b""  # its FIN
            else:
                assert result.reason == "detached"
                for sock in (record.stream1, record.stream2):
                    assert sock.fileno() >= 0 and sock.getpeername()
                record.stream1.sendall(b"still here")  # the connection is whole
                t.peer_a.settimeout(10)
                assert t.peer_a.recv(100) == b"still here"
                close_record(record)
                with pytest.raises(OSError):
                    record.stream1.getpeername()
    assert outcomes <= {"stopped", "detached"}


def test_idle_state_carried(engine):
    """r=1, k=3: idle after 4 s. Idle 2 s, detach, resume: idle ~2 s later, not 4."""
    with Topology() as t:
        first = engine.Bridge(t.stream1, t.stream2, 1, 3).start()
        time.sleep(2.05)
        record = first.detach()
        assert record is not None
        assert record.state.idle_checks >= 2
        resumed_at = time.monotonic()
        second = engine.Bridge(record.stream1, record.stream2, 1, 3, resume=record).start()
        try:
            result = second.wait(6)
        finally:
            second.stop()
            close_record(record)
        elapsed = time.monotonic() - resumed_at
    assert result is not None and result.reason == "idle"
    assert 1.0 < elapsed < 2.8, elapsed
    assert 3.5 < result.seconds < 5.5, result.seconds


def test_resume_from_fds_and_a_state(engine):
    """A state alone (as another process would rebuild it) resumes a bridge on adopted fds."""
    with Topology() as t:
        state = BridgeState(
            bytes_1_to_2=100, bytes_2_to_1=7, seconds=30.0, idle_checks=0, next_check_in=0.5,
            moved_1_to_2=False, moved_2_to_1=False,
        )  # fmt: skip
        bridge = engine.Bridge.from_fds(t.stream1.detach(), t.stream2.detach(), 1, 60, resume=state).start()
        t.peer_a.sendall(b"abc")
        t.peer_b.settimeout(10)
        assert t.peer_b.recv(10) == b"abc"
        wait_for(lambda: bridge.counts == (103, 7), timeout=5, what="the carried counts plus 3")
        record = bridge.detach()
        assert record is not None
        assert (record.state.bytes_1_to_2, record.state.bytes_2_to_1) == (103, 7)
        assert record.state.seconds >= 30.0
        record.stream2.sendall(b"back")
        t.peer_b.settimeout(10)
        assert t.peer_b.recv(10) == b"back"
        close_record(record)
        assert bridge.wait(10).reason == "detached"


def test_resume_rejects_what_is_not_a_state(engine):
    with Topology() as t:
        with pytest.raises(TypeError):
            engine.Bridge(t.stream1, t.stream2, 1, 60, resume=(1, 2))
        bad = BridgeState(-1, 0, 0.0, 0, 0.0, False, False)
        with pytest.raises(ValueError):
            engine.Bridge(t.stream1, t.stream2, 1, 60, resume=bad)
