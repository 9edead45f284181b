"""--bandwidth: each direction of a bridge held to a rate, over both engines and both listeners.

Real sockets on loopback. The bounds are one-sided where load matters: a relay can never move
more than ``rate * t + burst`` by time t (load only slows it, so that bound is tight), while the
"fast enough" side only asks for 60% of the rate.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import tcptotcp
from helpers import HAS_PROC, Background, Topology, recv_exactly, rss_kib, sha
from tcptotcp._bridge import bandwidth_bucket
from tcptotcp._options import OptionError
from tcptotcp.cli import forward_parser

CHUNK = b"\x5a" * 65536
SLACK = 4096  # rounding of the buckets' fractions of a byte, summed over a run


class Meter:
    """Counts what a socket receives, with the time of each count since `t0`."""

    def __init__(self, sock: socket.socket, t0: float) -> None:
        self.sock, self.t0 = sock, t0
        self.total = 0
        self.samples: List[Tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            self.total += len(data)
            self.samples.append((time.monotonic() - self.t0, self.total))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


class Flood:
    """Sends as fast as the kernel takes it; `accepted` counts what send() took."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.accepted += self.sock.send(CHUNK)
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def check_rate(meter: Meter, rate: int, seconds: float, what: str) -> None:
    """Never ahead of the bucket, and at least 60% of the rate over the run."""
    burst, _ = bandwidth_bucket(rate)
    for t, total in meter.samples:
        assert total <= rate * t + burst + SLACK, f"{what}: {total} bytes by {t:.3f} s, over {rate}/s"
    assert meter.total >= 0.6 * rate * seconds, f"{what}: {meter.total} bytes in {seconds:.1f} s at {rate}/s"


# -- a bridge --------------------------------------------------------------------------------


def test_each_direction_is_held_to_the_rate(engine) -> None:
    rate, seconds = 2_000_000, 3.5
    with Topology() as t:
        t0 = time.monotonic()
        # r=1, k=2, "any": idle after 3 s without traffic; a throttled stream is traffic.
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 2, activity="any", bandwidth=rate).start()
        meters = [Meter(t.peer_b, t0), Meter(t.peer_a, t0)]
        floods = [Flood(t.peer_a), Flood(t.peer_b)]
        time.sleep(seconds)
        assert bridge.running, bridge.wait(0)
        elapsed = time.monotonic() - t0
        for flood in floods:
            flood.close()
        for meter in meters:
            meter.close()
        bridge.stop()
        result = bridge.wait(10)
    assert result is not None and result.reason == "stopped"
    check_rate(meters[0], rate, elapsed - 0.5, "1 -> 2")
    check_rate(meters[1], rate, elapsed - 0.5, "2 -> 1")
    assert (result.bytes_1_to_2, result.bytes_2_to_1) >= (meters[0].total, meters[1].total)


def test_one_directions_backlog_does_not_hold_the_other(engine) -> None:
    """1 -> 2 floods a reader that never reads; 2 -> 1 messages still pass at once."""
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 5, 60, bandwidth=50_000).start()
        flood = Flood(t.peer_a)
        try:
            time.sleep(0.3)
            for i in range(20):
                message = f"message {i:04d}".encode()
                t.peer_b.sendall(message)
                assert recv_exactly(t.peer_a, len(message), timeout=5) == message
        finally:
            flood.close()
            bridge.stop()
        assert bridge.wait(10) is not None


def test_a_throttled_bridge_delivers_every_byte_and_closes(engine) -> None:
    payload = os.urandom(700_000)
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 5, 60, bandwidth=1_000_000).start()
        sender = Background(lambda: (t.peer_a.sendall(payload), t.peer_a.shutdown(socket.SHUT_WR)))
        got = recv_exactly(t.peer_b, len(payload), timeout=20)
        sender.result(20)
        result = bridge.wait(20)
    assert sha(got) == sha(payload)
    assert result is not None and result.reason == "closed" and result.bytes_1_to_2 == len(payload)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc for memory")
def test_backpressure_stays_in_the_kernel(engine) -> None:
    """A sender faster than the rate is held back: what send() accepted minus what arrived stays
    within the sockets' buffers plus a read, and the relay's memory does not grow."""
    rate, seconds = 100_000, 2.5
    small = 32 * 1024  # fixed buffers (no autotuning): the kernel's share of the backlog is known
    with Topology() as t:
        for sock, option in ((t.peer_a, socket.SO_SNDBUF), (t.stream1, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, small)
        for sock, option in ((t.stream2, socket.SO_SNDBUF), (t.peer_b, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, small)
        buffers = sum(
            sock.getsockopt(socket.SOL_SOCKET, option)
            for sock, option in (
                (t.peer_a, socket.SO_SNDBUF),
                (t.stream1, socket.SO_RCVBUF),
                (t.stream2, socket.SO_SNDBUF),
                (t.peer_b, socket.SO_RCVBUF),
            )
        )
        rss_before = rss_kib()
        t0 = time.monotonic()
        bridge = engine.Bridge(t.stream1, t.stream2, 5, 60, bandwidth=rate).start()
        meter = Meter(t.peer_b, t0)
        flood = Flood(t.peer_a)
        gaps = []
        for _ in range(int(seconds / 0.25)):
            time.sleep(0.25)
            gaps.append(flood.accepted - meter.total)
        elapsed = time.monotonic() - t0
        flood.close()
        meter.close()
        rss_after = rss_kib()
        bridge.stop()
        assert bridge.wait(10) is not None
    burst, _ = bandwidth_bucket(rate)
    # In the relay at most one read (the bucket caps it) and the kernel's buffers (which it
    # may round and count overhead in: twice over).
    held = 2 * buffers + burst + len(CHUNK)
    assert max(gaps) <= held, (gaps, held)
    assert flood.accepted <= rate * elapsed + burst + held
    check_rate(meter, rate, elapsed - 0.5, "1 -> 2")
    assert rss_after - rss_before < 20_000, (rss_before, rss_after)


def test_bridge_bandwidth_is_checked(backend) -> None:
    with Topology() as t:
        for bad, error in ((0, ValueError), (-1, ValueError), (10**12, ValueError)):
            with pytest.raises(error, match="bandwidth"):
                backend.Bridge(t.stream1, t.stream2, 1, 2, bandwidth=bad)
        for bad in ("1M", 1.5, True):
            with pytest.raises(TypeError, match="bandwidth"):
                backend.Bridge(t.stream1, t.stream2, 1, 2, bandwidth=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="bandwidth"):
            backend.Bridge.from_fds(t.stream1.fileno(), t.stream2.fileno(), 1, 2, bandwidth=0)
        # Refused before anything started: the sockets are as they were.
        assert t.stream1.fileno() >= 0 and t.stream2.fileno() >= 0
        bridge = backend.Bridge(t.stream1, t.stream2, 1, 2, bandwidth=None)
        assert bridge.bandwidth is None
        assert backend.Bridge(t.stream1, t.stream2, 1, 2, bandwidth=5).bandwidth == 5
    with Topology() as t, pytest.raises(TypeError, match="bandwidth"):
        backend.connect(t.stream1, t.stream2, 1, 2, bandwidth="x")


# -- a forward ----------------------------------------------------------------------------------


class Sink:
    """An upstream that reads and counts everything each client sends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.meters: List[Meter] = []
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.meters.append(Meter(conn, self.t0))

    def wait_meter(self) -> Meter:
        deadline = time.monotonic() + 10
        while not self.meters and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.meters
        return self.meters[0]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for meter in self.meters:
            meter.close()
            meter.sock.close()


@pytest.fixture
def sink():
    server = Sink()
    yield server
    server.close()


def _stream_through(address: Tuple[str, int], sink: Sink, seconds: float) -> Tuple[Meter, float]:
    with socket.create_connection(address, timeout=10) as client:
        sink.t0 = time.monotonic()
        flood = Flood(client)
        meter = sink.wait_meter()
        time.sleep(seconds)
        elapsed = time.monotonic() - sink.t0
        flood.close()
    return meter, elapsed


def test_a_forwarder_holds_each_bridge_to_its_bandwidth(forward_backend, sink) -> None:
    fwd = tcptotcp.Forwarder(
        "127.0.0.1:0", f"127.0.0.1:{sink.address[1]}", bridge_class=forward_backend.Bridge, bandwidth="1M"
    )
    assert fwd.options.bandwidth == 1_000_000 and fwd.options.plan.bandwidth == 1_000_000
    server = Background(fwd.serve_forever)
    try:
        meter, elapsed = _stream_through(fwd.address, sink, 2.5)
    finally:
        fwd.close()
        server.result(10)
    assert fwd.listener_kind == forward_backend.listener
    check_rate(meter, 1_000_000, elapsed - 0.5, "client -> upstream")


def test_forwarder_bandwidth_is_checked() -> None:
    for bad in ("0", "fast", "10MB", 999, 0, 1.5):
        with pytest.raises(OptionError, match=r"^bandwidth: expected an integer from 1000 to 100000000000"):
            tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:9", bandwidth=bad)  # type: ignore[arg-type]


class _Process:
    """`python -m tcptotcp ...` until it says where it listens."""

    def __init__(self, backend_name: str, *args: str) -> None:
        import subprocess

        env = dict(os.environ)
        if backend_name == "pure":
            env["TCPTOTCP_NO_EXTENSIONS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcptotcp", *args], stderr=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stderr is not None
        self.address: Optional[Tuple[str, int]] = None
        deadline = time.monotonic() + 15
        for line in self.proc.stderr:
            if "listening on " in line:
                host, port = line.split("listening on ", 1)[1].split(",")[0].rsplit(":", 1)
                self.address = (host, int(port))
                break
            if time.monotonic() > deadline:
                break
        if self.address is None:
            self.close()
            raise AssertionError("the forwarder did not start")
        # Keep draining its log so that it never blocks on a full pipe.
        self._reader = threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()], daemon=True)
        self._reader.start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def test_the_command_line_and_the_config_file_take_bandwidth(forward_backend, sink, tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        f'bandwidth = "500k"\n[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:{sink.address[1]}"\n'
    )
    for args, rate in (
        (("127.0.0.1:0", f"127.0.0.1:{sink.address[1]}", "--bandwidth", "1M"), 1_000_000),
        (("--config", str(config)), 500_000),
    ):
        sink.meters.clear()
        process = _Process(forward_backend.name, *args)
        try:
            assert process.address is not None
            meter, elapsed = _stream_through(process.address, sink, 2.0)
        finally:
            process.close()
        check_rate(meter, rate, elapsed - 0.5, " ".join(args))


def test_bad_bandwidth_on_the_command_line_and_in_a_file(tmp_path: Path) -> None:
    import subprocess

    for bad in ("10MB", "0.5k", "fast", "999"):
        proc = subprocess.run(
            [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", "127.0.0.1:9", f"--bandwidth={bad}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2
        assert "argument --bandwidth: expected an integer from 1000 to 100000000000" in proc.stderr, proc.stderr
    config = tmp_path / "bad.toml"
    config.write_text('[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\nbandwidth = "lots"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "key 'bandwidth': expected an integer from 1000" in proc.stderr and "got 'lots'" in proc.stderr


def test_help_documents_bandwidth() -> None:
    text = " ".join(forward_parser().format_help().split())
    assert "--bandwidth RATE" in text and "10M" in text
