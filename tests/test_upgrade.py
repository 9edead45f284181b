"""Hand-over to a new process (``--upgrade``, SIGUSR2): the listening sockets and the metrics
port move to the successor, clients keep being served, open bridges stay in the old process
until they end, and a failed upgrade changes nothing. Real processes on loopback, over both
backends and both listener implementations."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

import tcptotcp
from helpers import recv_exactly
from test_forwarder import EchoServer, ForwarderProcess, echo  # noqa: F401
from test_forwarder_ops import LAUNCHER, LaunchedForwarder
from test_limits import serving

pytestmark = [pytest.mark.signals, pytest.mark.skipif(not hasattr(socket, "send_fds"), reason="needs SCM_RIGHTS")]


HAS_METRICS = importlib.util.find_spec("prometheus_client") is not None


@pytest.fixture
def backend(forward_backend):
    return forward_backend


def wait_until(probe: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our child, exited) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Processes:
    """The forwarder started by a test, and every successor it hands over to (killed at the end)."""

    def __init__(self, backend_name: str, pid_file: Path) -> None:
        self.backend_name = backend_name
        self.pid_file = pid_file
        self.started: List[ForwarderProcess] = []

    def start(self, *args: str) -> ForwarderProcess:
        fp = ForwarderProcess(self.backend_name, *args, "--pid-file", str(self.pid_file))
        self.started.append(fp)
        wait_until(lambda: self.pid() == fp.proc.pid, 10, "pid file")
        return fp

    def pid(self) -> Optional[int]:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def upgrade(self, timeout: float = 20, expect: int = 0) -> subprocess.CompletedProcess:
        """``tcptotcp --upgrade``; where it does not end with `expect`, fails with what the
        processes logged."""
        env = {k: v for k, v in os.environ.items() if k != "TCPTOTCP_NO_EXTENSIONS"}
        done = subprocess.run(
            [sys.executable, "-m", "tcptotcp", "--upgrade", "--pid-file", str(self.pid_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if done.returncode != expect:
            logs = "\n".join(line for fp in self.started for line in fp.lines[-60:])
            raise AssertionError(f"--upgrade ended {done.returncode}: {done.stderr.strip()}\nthe log:\n{logs}")
        return done

    def close(self) -> None:
        # Every process of this test's pid file: the successors, started by a forwarder and
        # orphaned when it exits, also when an upgrade failed half-way. One left running would
        # hold the forwarder's stderr open and its reader blocked.
        mine = str(self.pid_file)
        ours = [pid for pid in processes_with_argument(mine) if all(pid != fp.proc.pid for fp in self.started)]
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in ours:
            wait_until(lambda: not alive(pid), 10, f"the end of successor {pid}")
        for fp in self.started:
            fp.close()


def processes_with_argument(argument: str) -> List[int]:
    """The pids of the processes that have `argument` on their command line (Linux's /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if os.fsencode(argument) in argv:
                found.append(int(entry))
    return found


@pytest.fixture
def processes(backend, tmp_path):
    procs = Processes(backend.name, tmp_path / "t2t.pid")
    yield procs
    procs.close()


def checksummed_exchange(address: Tuple[str, int], size: int) -> None:
    payload = os.urandom(size)
    with socket.create_connection(address, timeout=10) as c:
        sender = threading.Thread(target=c.sendall, args=(payload,))
        sender.start()
        got = recv_exactly(c, size)
        sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


class Bridges:
    """`n` clients with a bridge each, exchanging checksummed chunks through it on demand."""

    def __init__(self, address: Tuple[str, int], n: int) -> None:
        self.socks = [socket.create_connection(address, timeout=10) for _ in range(n)]
        self.sent = [hashlib.sha256() for _ in range(n)]
        self.got = [hashlib.sha256() for _ in range(n)]

    def exchange(self, size: int = 4096) -> None:
        for i, sock in enumerate(self.socks):
            chunk = os.urandom(size)
            sock.sendall(chunk)
            self.sent[i].update(chunk)
            self.got[i].update(recv_exactly(sock, size))
        assert [h.digest() for h in self.got] == [h.digest() for h in self.sent]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class Traffic:
    """`n` bridges through an echo upstream, each sending a seeded pseudo-random stream in
    small chunks and checking every echoed byte, from one thread. A FIN or a reset on any of
    them is a failure. `pause(start, end)`: the longest wait of a bridge between two echoes
    around that time."""

    CHUNK = 1024

    def __init__(self, address: Tuple[str, int], n: int, per_bridge: int = 2_000_000) -> None:
        self.socks = [socket.create_connection(address, timeout=10) for _ in range(n)]
        for sock in self.socks:
            sock.setblocking(False)
        self.per_bridge = per_bridge
        self.sent = [0] * n
        self.echoed = [0] * n
        self.expected = [b""] * n  # sent, not yet echoed
        self.unsent = [b""] * n  # generated, not yet taken by send()
        self.last_echo = [0.0] * n
        self.gaps: List[Tuple[float, float]] = []  # (from, to) between two echoes of a bridge
        self.failures: List[str] = []
        self._seed = [hashlib.sha256(str(i).encode()) for i in range(n)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _chunk(self, i: int) -> bytes:
        if not self.unsent[i]:
            out = b""
            while len(out) < self.CHUNK:
                self._seed[i].update(b"more")
                out += self._seed[i].digest()
            self.unsent[i] = out[: self.CHUNK]
        return self.unsent[i]

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        with selectors.DefaultSelector() as selector:
            for i, sock in enumerate(self.socks):
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
            live = set(range(len(self.socks)))
            now = time.monotonic()
            self.last_echo = [now] * len(self.socks)
            while live and time.monotonic() < deadline:
                sending = not self._stop.is_set()
                for key, events in selector.select(0.05):
                    i, sock = key.data, key.fileobj
                    try:
                        if events & selectors.EVENT_WRITE and sending and len(self.expected[i]) < 8 * self.CHUNK:
                            if self.sent[i] < self.per_bridge:
                                chunk = self._chunk(i)
                                n = sock.send(chunk)
                                self.sent[i] += n
                                self.expected[i] += chunk[:n]
                                self.unsent[i] = chunk[n:]
                        if events & selectors.EVENT_READ:
                            data = sock.recv(65536)
                            if not data:
                                self.failures.append(f"bridge {i}: EOF after {self.echoed[i]} bytes")
                                selector.unregister(sock)
                                live.discard(i)
                                continue
                            if not self.expected[i].startswith(data):
                                self.failures.append(f"bridge {i}: wrong bytes at {self.echoed[i]}")
                            self.expected[i] = self.expected[i][len(data) :]
                            self.echoed[i] += len(data)
                            now = time.monotonic()
                            if now - self.last_echo[i] > 0.01:
                                self.gaps.append((self.last_echo[i], now))
                            self.last_echo[i] = now
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        self.failures.append(f"bridge {i}: {exc!r}")
                        selector.unregister(sock)
                        live.discard(i)
                if not sending and all(not self.expected[i] for i in live):
                    return

    def pause(self, start: float, end: float) -> float:
        """The longest wait between two echoes of one bridge that overlaps [start, end]."""
        return max([to - since for since, to in self.gaps if since <= end and to >= start], default=0.0)

    def stop(self) -> None:
        """Stop sending; return once every byte sent came back (or the thread gave up)."""
        self._stop.set()
        self._thread.join(30)

    def close(self) -> None:
        self.stop()
        for sock in self.socks:
            sock.close()


class Hammer:
    """Clients connecting one after another, each checking a checksummed echo, until stopped."""

    def __init__(self, address: Tuple[str, int]) -> None:
        self.address = address
        self.served = 0
        self.failures: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                checksummed_exchange(self.address, 2048)
                self.served += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def hostport(text: str) -> Tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def accepted(url: str, listen: str) -> float:
    for line in scrape(url).splitlines():
        if line.startswith(f'tcptotcp_connections_accepted_total{{listen="{listen}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_upgrade_hands_over_the_port_and_every_bridge_while_clients_keep_connecting(processes, echo, backend):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    fp = processes.start("127.0.0.1:0", upstream, "--metrics", "127.0.0.1:0", "--log-level", "warning")
    old = fp.proc.pid
    address = hostport(fp.address)
    # Without prometheus_client the port serves only /healthz and /ready: it moves all the same.
    status_url = "http://" + fp.wait_log(r"(?:metrics|health) on http://([^/\s]+)").group(1)
    metrics_url = status_url + "/metrics"
    traffic = Traffic(address, 200)
    hammer = Hammer(address)
    try:
        wait_until(lambda: min(traffic.echoed) > 0 and hammer.served >= 20, 20, "traffic before the upgrade")
        # (The forward records its clients in batches: wait for the count to catch up.)
        before = HAS_METRICS and wait_until(
            lambda: accepted(metrics_url, fp.address) >= 220 and accepted(metrics_url, fp.address), 10, "count"
        )
        echoed_at_upgrade = sum(traffic.echoed)
        upgrading = time.monotonic()
        done = processes.upgrade()
        assert done.returncode == 0
        new = processes.pid()
        assert new is not None and new != old and f"pid {new} serves now" in done.stdout
        line = fp.wait_log(rf"handed over to pid {new}: 1 listeners, (\d+) bridges in ([\d.]+) s; (\d+) bridges stay")
        # Every bridge moves, or stays here if it was not quiet in time (a pure bridge whose
        # threads were not scheduled): each is logged, and its bytes are checked all the same. A
        # client of the hammer may be on its way too.
        moved, staying = int(line.group(1)), int(line.group(3))
        assert moved > 0 and 200 <= moved + staying <= 201, line.group(0)
        assert len([x for x in fp.lines if "stays here until it ends" in x]) <= staying
        adopted = fp.wait_log(rf"adopted {moved} bridges from pid {old} in [\d.]+ s, the longest paused ([\d.]+) ms")
        upgraded = time.monotonic()
        if staying == 0:
            fp.proc.wait(10)  # it holds nothing: it exits
            assert fp.proc.returncode == 0
        assert processes.pid() == new  # (the old process leaves the file to its successor)
        served_at_upgrade = hammer.served
        wait_until(lambda: hammer.served >= served_at_upgrade + 20, 20, "clients served after the upgrade")
        # The bridges go on, in the new process (the old one is gone).
        wait_until(lambda: sum(traffic.echoed) > echoed_at_upgrade + 200 * Traffic.CHUNK, 20, "traffic after")
        # The successor has the metrics port, and the counters went on from the old process's.
        if HAS_METRICS:
            assert accepted(metrics_url, fp.address) >= before
        assert scrape(status_url + "/healthz") == "ok\n"
    finally:
        hammer.stop()
        traffic.close()
    assert hammer.failures == []
    assert traffic.failures == []
    assert all(not left for left in traffic.expected)  # every byte sent came back
    fp.proc.wait(10)  # the bridges that stayed ended with the traffic: the old process exits
    assert fp.proc.returncode == 0
    pause = traffic.pause(upgrading, upgraded)
    paused = float(adopted.group(1)) / 1000
    print(
        f"hand-over of {moved} bridges ({staying} stayed): {line.group(2)} s; longest pause of a bridge "
        f"{paused:.3f} s as the successor measured it, {pause:.3f} s between two echoes"
    )
    checksummed_exchange(address, 100_000)  # the successor serves on
    assert alive(new)


def test_an_idle_bridge_keeps_its_idle_time_across_an_upgrade(processes, echo, backend):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    settings = ("--rate-check", "1", "--idle-timeout", "4")
    fp = processes.start("127.0.0.1:0", upstream, *settings)
    control = ForwarderProcess(backend.name, "127.0.0.1:0", upstream, *settings)  # not upgraded
    processes.started.append(control)
    upgraded = socket.create_connection(hostport(fp.address), timeout=10)
    alone = socket.create_connection(hostport(control.address), timeout=10)
    try:
        # Past each bridge's first idle check (at its start): the next one sees this traffic in
        # both, whichever of them started first.
        time.sleep(0.5)
        for c in (upgraded, alone):
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
        time.sleep(2.2)
        done = processes.upgrade()
        assert done.returncode == 0
        fp.wait_log(r"1 bridges in [\d.]+ s; 0 bridges stay")
        ends = []
        for c in (upgraded, alone):
            c.settimeout(15)
            assert c.recv(1) == b""  # each ends idle
            ends.append(time.monotonic())
    finally:
        upgraded.close()
        alone.close()
    # The handed-over bridge ends when the one that stayed put does (its idle checks went on
    # counting), not 2.2 s later as a fresh bridge would.
    print("idle end difference", ends[0] - ends[1])
    assert abs(ends[0] - ends[1]) < 1.0, ends[0] - ends[1]
    assert fp.wait_log(r"#1 close .*: 1 bytes up, 1 down, idle after")
    fp.proc.wait(10)


@pytest.mark.parametrize("program", ["false", "sh -c 'exec sleep 60' never-serving"])
def test_a_failed_upgrade_changes_nothing(processes, echo, backend, program):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    fp = processes.start("127.0.0.1:0", upstream, "--upgrade-program", program)
    old = fp.proc.pid
    address = hostport(fp.address)
    bridges = Bridges(address, 5)
    hammer = Hammer(address)
    try:
        bridges.exchange()
        started = time.monotonic()
        done = processes.upgrade(expect=1)
        assert "upgrade failed" in done.stderr
        why = "exited with status 1" if program == "false" else "did not report serving within 10 s"
        fp.wait_log(rf"upgrade failed, nothing changed: the new process {why}")
        assert time.monotonic() - started < 19
        assert processes.pid() == old
        bridges.exchange()
        served = hammer.served
        wait_until(lambda: hammer.served >= served + 10, 20, "clients served after the failed upgrade")
    finally:
        hammer.stop()
        bridges.close()
    assert hammer.failures == []
    assert fp.terminate() < 5 and fp.proc.returncode == 0
    assert any("served" in line and "upstream failures" in line for line in fp.lines)


@pytest.mark.unix
def test_upgrade_with_a_config_file_hands_over_every_forward(processes, echo, backend, tmp_path, socket_dir):  # noqa: F811
    unix_path = os.path.join(socket_dir, "in.sock")
    config = tmp_path / "t2t.toml"
    config.write_text(
        f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:{echo.address[1]}"\n'
        f'[[forward]]\nlisten = "unix:{unix_path}"\nupstream = "127.0.0.1:{echo.address[1]}"\n'
    )
    fp = processes.start("--config", str(config))
    tcp = hostport(fp.address)
    fp.wait_log(rf"listening on unix:{unix_path}")
    done = processes.upgrade()
    assert done.returncode == 0
    fp.wait_log(r"handed over to pid \d+: 2 listeners, 0 bridges in [\d.]+ s; 0 bridges stay here")
    fp.proc.wait(10)
    assert os.path.exists(unix_path)  # the successor's now: not removed by the old process
    checksummed_exchange(tcp, 50_000)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(unix_path)
        c.sendall(b"through the unix listener")
        assert recv_exactly(c, 25) == b"through the unix listener"


def test_moved_bridges_count_against_the_new_processs_connection_limit(processes, echo, backend, tmp_path):  # noqa: F811
    """The new process reads a lower --max-connections (3) from the config, and adopts 5
    bridges: a new client waits in the backlog until fewer than 3 are left."""
    config = tmp_path / "t2t.toml"
    forward = f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:{echo.address[1]}"\n'
    config.write_text(forward + "max_connections = 10\n")
    fp = processes.start("--config", str(config))
    address = hostport(fp.address)
    bridges = Bridges(address, 5)
    waiting = None
    try:
        bridges.exchange()
        config.write_text(forward + "max_connections = 3\n")
        processes.upgrade()
        fp.wait_log(r"adopted 5 bridges from pid")
        fp.proc.wait(10)
        bridges.exchange()
        waiting = socket.create_connection(address, timeout=10)  # (the kernel's backlog takes it)
        waiting.sendall(b"waiting")
        waiting.settimeout(1.0)
        with pytest.raises(socket.timeout):
            waiting.recv(16)  # not accepted: 5 bridges open, at a limit of 3
        for sock in bridges.socks[:3]:
            sock.close()
        waiting.settimeout(10)
        assert recv_exactly(waiting, 7) == b"waiting"  # 2 left: it is served
        for sock in bridges.socks[3:]:
            sock.sendall(b"on")
            assert recv_exactly(sock, 2) == b"on"
    finally:
        if waiting is not None:
            waiting.close()
        bridges.close()


def test_upgrade_under_systemd_moves_the_main_pid(processes, echo, backend, socket_dir, monkeypatch):  # noqa: F811
    notify_path = os.path.join(socket_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(notify_path)
        manager.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
        fp = processes.start("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
        assert manager.recv(256) == b"READY=1"
        done = processes.upgrade()
        assert done.returncode == 0
        assert manager.recv(256) == f"MAINPID={processes.pid()}".encode()
        fp.proc.wait(10)
        checksummed_exchange(hostport(fp.address), 10_000)


def test_a_bridge_that_cannot_be_quiesced_stays_and_the_old_process_refuses_more(processes, backend):
    # An upstream that does not read yet: the bridge holds bytes it cannot deliver, so it
    # cannot be detached within the hand-over's time, and runs on in the old process.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)
    fp = processes.start("127.0.0.1:0", f"127.0.0.1:{sink.getsockname()[1]}")
    client = socket.create_connection(hostport(fp.address), timeout=10)
    upstream, _ = sink.accept()
    sent = hashlib.sha256()
    total = 0
    try:
        client.setblocking(False)
        chunk = os.urandom(65536)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:  # until the kernel and the bridge are full
            try:
                n = client.send(chunk)
                sent.update(chunk[:n])
                total += n
                quiet_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.02)
        done = processes.upgrade()
        assert done.returncode == 0
        new = processes.pid()
        fp.wait_log(rf"handed over to pid {new}: 1 listeners, 0 bridges in [\d.]+ s; 1 bridges stay here")
        fp.proc.send_signal(signal.SIGUSR2)
        fp.wait_log(rf"SIGUSR2: handed over to pid {new} already")
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log(rf"SIGHUP: handed over to pid {new}: reload that one")
        # The upstream reads at last: every byte arrives, through the old process.
        got = hashlib.sha256()
        received = 0
        upstream.settimeout(10)
        while received < total:
            data = upstream.recv(1 << 20)
            assert data, f"EOF after {received} of {total} bytes"
            got.update(data)
            received += len(data)
        assert got.digest() == sent.digest()
        assert fp.proc.poll() is None  # its bridge is open: it waits
    finally:
        client.close()
        upstream.close()
        sink.close()
    fp.proc.wait(10)  # the bridge ended: the old process exits
    assert fp.proc.returncode == 0


@pytest.mark.parametrize("listen", ["systemd:web", "fd:3"])
def test_a_socket_activated_listener_is_handed_over(processes, echo, backend, listen):  # noqa: F811
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    protocol = "systemd" if listen.startswith("systemd:") else "plain"
    argv = [sys.executable, "-c", LAUNCHER, str(server.fileno()), protocol, listen, f"127.0.0.1:{echo.address[1]}"]
    fp = LaunchedForwarder(backend.name, [*argv, "--pid-file", str(processes.pid_file)], (server.fileno(),))
    processes.started.append(fp)
    try:
        wait_until(lambda: processes.pid() == fp.proc.pid, 10, "pid file")
        bridges = Bridges(("127.0.0.1", port), 2)
        done = processes.upgrade()
        assert done.returncode == 0
        fp.wait_log(r"handed over to pid \d+: 1 listeners, 2 bridges in [\d.]+ s; 0 bridges stay here")
        server.close()  # (ours: from here only the new process holds the socket)
        checksummed_exchange(("127.0.0.1", port), 50_000)
        bridges.exchange()
        bridges.close()
        fp.proc.wait(10)
        checksummed_exchange(("127.0.0.1", port), 50_000)
    finally:
        server.close()


def test_upgrade_needs_a_pid_file_and_a_running_process(tmp_path):
    run = [sys.executable, "-m", "tcptotcp", "--upgrade"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "--upgrade needs --pid-file" in done.stderr
    missing = tmp_path / "none.pid"
    done = subprocess.run([*run, "--pid-file", str(missing)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and "cannot read the pid file" in done.stderr
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    missing.write_text(f"{gone.pid}\n")
    done = subprocess.run([*run, "--pid-file", str(missing)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and f"cannot signal process {gone.pid}" in done.stderr


def test_bridges_stay_and_relay_on_when_the_successor_is_lost_mid_hand_over(backend, echo):  # noqa: F811
    """`send` fails at the fifth bridge (the successor gone): that bridge, and those already
    detached behind it, go on in this process; nothing is lost."""
    with serving(backend, f"127.0.0.1:{echo.address[1]}") as fwd:
        bridges = Bridges(("127.0.0.1", fwd.address[1]), 20)
        try:
            bridges.exchange()
            assert wait_until(lambda: fwd.stats.active == 20, 10, "20 bridges")
            sent: List[int] = []

            def send(bridge: tcptotcp.forwarder.HandedBridge) -> None:
                if len(sent) == 4:
                    raise BrokenPipeError("the successor is gone")
                sent.append(bridge.conn_id)
                # (a successor's own copies; the forwarder closes its fds after this)
                os.close(os.dup(bridge.fd1))

            fwd.stop_accepting(handed_over=True)
            moved, staying = fwd.hand_over_bridges(send, timeout=1.0, deadline=time.monotonic() + 10)
            assert (moved, staying) == (4, 16)
            # The four handed over are closed here (as if a successor had taken them, which
            # their clients see as an end); the other sixteen relay on, every byte.
            relaying = 0
            for sock in bridges.socks:
                chunk = os.urandom(4096)
                try:
                    sock.sendall(chunk)
                    got = recv_exactly(sock, 4096)
                except OSError:  # (reset: one of the four)
                    continue
                if got:  # (b"": one of the four)
                    assert got == chunk
                    relaying += 1
            assert relaying == 16
            assert wait_until(lambda: fwd.stats.active == 16, 10, "16 bridges left")
        finally:
            bridges.close()


@pytest.mark.skipif(not hasattr(select, "EPOLLEXCLUSIVE"), reason="needs epoll's EPOLLEXCLUSIVE (Linux)")
def test_a_wake_up_another_watcher_took_is_found_again(echo, backend):  # noqa: F811
    """On --upgrade both processes watch the port, and EPOLLEXCLUSIVE wakes one watcher: a
    predecessor's loop that took a client's wake-up as it stopped left the client queued until
    the next one came. Here another watcher (ours, first in the socket's queue) takes it and
    accepts nothing; the forward's re-check (what the successor does once the predecessor
    stopped) serves the client."""
    with serving(backend, f"127.0.0.1:{echo.address[1]}") as fwd:
        thief = select.epoll()
        thief.register(fwd.listening_socket.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        try:
            fwd.recheck_accepting()  # (the forward's loops now watch after the thief)
            woken: List[object] = []
            waiter = threading.Thread(target=lambda: woken.append(thief.poll(5)), daemon=True)
            waiter.start()
            time.sleep(0.2)  # (the thief waits in its poll)
            with socket.create_connection(fwd.address, timeout=10) as client:
                client.sendall(b"queued?")
                waiter.join(10)
                thief.unregister(fwd.listening_socket.fileno())
                fwd.recheck_accepting()
                assert recv_exactly(client, 7) == b"queued?"  # (within the 10 s timeout)
        finally:
            thief.close()
