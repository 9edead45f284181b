"""The original's parameter clamping and idle-timeout arithmetic: (k // r + 1) * r seconds."""

import threading
import time

import pytest

from helpers import Background, Topology, recv_exactly

SLACK = 0.6  # seconds of scheduling noise allowed on a loaded 2-core machine


def idle_seconds(backend, r, k, **kw) -> float:
    with Topology() as t:
        started = time.monotonic()
        result = backend.connect(t.stream1, t.stream2, r, k, **kw)
        elapsed = time.monotonic() - started
    assert result.reason == "idle"
    assert abs(result.seconds - elapsed) < 0.3
    return elapsed


@pytest.mark.parametrize(
    "r,k,expected",
    [
        (1, 2, 3),  # k//r*r = 2, k = 2: only (k//r+1)*r gives 3
        (2, 3, 4),  # k//r*r = 2, k = 3: (k//r+1)*r gives 4
        (0, 0, 3),  # clamps to r=1, k=2
        (-7, 1, 3),  # r clamps to 1, k to 2
        (3, 2, 3),  # k//r = 0: ends at the second check
    ],
)
def test_idle_timeout_arithmetic(backend, r, k, expected):
    elapsed = idle_seconds(backend, r, k)
    assert expected - 0.05 <= elapsed < expected + SLACK, elapsed


def test_clamped_parameters_are_visible(backend):
    with Topology() as t:
        b = backend.Bridge(t.stream1, t.stream2, 0, -5)
        assert (b.rate_check_seconds, b.keep_alive_delay_time_seconds) == (1, 2)
        b2 = backend.Bridge(t.stream1, t.stream2, True, 10**40)  # any size, index()-able
        assert (b2.rate_check_seconds, b2.keep_alive_delay_time_seconds) == (1, 10**40)


def test_huge_parameters_run_and_stop(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 10**30, 10**60).start()
        t.peer_a.sendall(b"ok")
        assert recv_exactly(t.peer_b, 2) == b"ok"
        bridge.stop()
        result = bridge.wait(5)
    assert result is not None and result.reason == "stopped"


def _trickle(sock, stop: threading.Event, period: float, payload: bytes = b".") -> None:
    while not stop.wait(period):
        try:
            sock.sendall(payload)
        except OSError:
            return


def test_traffic_resets_the_idle_counter(backend):
    with Topology() as t:
        stop = threading.Event()
        feeders = [
            Background(lambda: _trickle(t.peer_a, stop, 0.25)),
            Background(lambda: _trickle(t.peer_b, stop, 0.25)),
        ]
        started = time.monotonic()
        bridge = backend.Bridge(t.stream1, t.stream2, 1, 2).start()
        time.sleep(4.0)  # beyond the 3 s an idle bridge would last
        assert bridge.wait(0) is None
        stop.set()
        quiet_since = time.monotonic()
        for f in feeders:
            f.result()
        result = bridge.wait(10)
        ended = time.monotonic()
    assert result is not None and result.reason == "idle"
    assert ended - started > 5.0
    # r=1, k=2: the first check after the last traffic (at most r away) may still see it and
    # reset the count; from that reset the bridge ends at the 4th check (counts 1, 2, 3, then
    # 3 > k // r). Without the reset it ends at the 3rd. So between 2 and 5 seconds of quiet.
    assert 2.0 <= ended - quiet_since < 5.0 + SLACK


@pytest.mark.parametrize("activity,ends_idle", [("both", True), ("any", False)])
def test_one_way_traffic_and_activity_rule(backend, activity, ends_idle):
    with Topology() as t:
        stop = threading.Event()
        feeder = Background(lambda: _trickle(t.peer_a, stop, 0.2))
        drain = Background(lambda: recv_exactly(t.peer_b, 10**9, timeout=8))
        bridge = backend.Bridge(t.stream1, t.stream2, 1, 2, activity=activity).start()
        result = bridge.wait(4.5)
        if ends_idle:
            assert result is not None and result.reason == "idle"
            assert result.bytes_1_to_2 > 0 and result.bytes_2_to_1 == 0
        else:
            assert result is None  # one-way traffic keeps an "any" bridge alive
            bridge.stop()
            result = bridge.wait(5)
            assert result is not None and result.reason == "stopped"
        stop.set()
        feeder.result()
        drain.result()
