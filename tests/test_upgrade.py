"""Hand-over to a new process (``--upgrade``, SIGUSR2): the listening sockets and the metrics
port move to the successor, clients keep being served, open bridges stay in the old process
until they end, and a failed upgrade changes nothing. Real processes on loopback, over both
backends and both listener implementations."""

from __future__ import annotations

import hashlib
import os
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

from helpers import recv_exactly
from test_forwarder import EchoServer, ForwarderProcess, echo  # noqa: F401
from test_forwarder_ops import LAUNCHER, LaunchedForwarder

pytestmark = [pytest.mark.signals, pytest.mark.skipif(not hasattr(socket, "send_fds"), reason="needs SCM_RIGHTS")]


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

    def upgrade(self, timeout: float = 20) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TCPTOTCP_NO_EXTENSIONS"}
        return subprocess.run(
            [sys.executable, "-m", "tcptotcp", "--upgrade", "--pid-file", str(self.pid_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def close(self) -> None:
        successor = self.pid()
        if successor is not None and all(successor != fp.proc.pid for fp in self.started):
            try:
                os.kill(successor, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_until(lambda: not alive(successor), 10, "successor's end")
        for fp in self.started:
            fp.close()


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
            self._stop.wait(0.02)  # (the echo server keeps every connection until the test ends)

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


def test_upgrade_hands_the_port_over_while_clients_keep_connecting(processes, echo, backend):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    fp = processes.start("127.0.0.1:0", upstream, "--metrics", "127.0.0.1:0")
    old = fp.proc.pid
    address = hostport(fp.address)
    metrics_url = "http://" + fp.wait_log(r"metrics on http://(\S+)/metrics").group(1) + "/metrics"
    bridges = Bridges(address, 20)
    hammer = Hammer(address)
    try:
        bridges.exchange()
        wait_until(lambda: hammer.served >= 20, 20, "clients served before the upgrade")
        # (The forward records its clients in batches: wait for the count to catch up.)
        before = wait_until(
            lambda: accepted(metrics_url, fp.address) >= 40 and accepted(metrics_url, fp.address), 10, "count"
        )
        done = processes.upgrade()
        assert done.returncode == 0, done.stderr
        new = processes.pid()
        assert new is not None and new != old and f"pid {new} serves now" in done.stdout
        fp.wait_log(rf"handed over to pid {new}: 1 listeners; 20 bridges stay here until they end")
        served_at_upgrade = hammer.served
        wait_until(lambda: hammer.served >= served_at_upgrade + 20, 20, "clients served after the upgrade")
        # The bridges stay with the old process, still relaying; it waits for them.
        bridges.exchange()
        assert fp.proc.poll() is None
        # The successor has the metrics port, and the counters went on from the old process's.
        assert accepted(metrics_url, fp.address) >= before
    finally:
        hammer.stop()
        bridges.close()
    assert hammer.failures == []
    fp.proc.wait(10)  # its last bridge ended: it exits
    assert fp.proc.returncode == 0
    checksummed_exchange(address, 100_000)  # the successor serves on
    assert alive(new)


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
        done = processes.upgrade()
        assert done.returncode == 1, (done.stdout, done.stderr)
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
    assert done.returncode == 0, done.stderr
    fp.wait_log(r"handed over to pid \d+: 2 listeners; 0 bridges stay here")
    fp.proc.wait(10)
    assert os.path.exists(unix_path)  # the successor's now: not removed by the old process
    checksummed_exchange(tcp, 50_000)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(unix_path)
        c.sendall(b"through the unix listener")
        assert recv_exactly(c, 25) == b"through the unix listener"


def test_upgrade_under_systemd_moves_the_main_pid(processes, echo, backend, socket_dir, monkeypatch):  # noqa: F811
    notify_path = os.path.join(socket_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(notify_path)
        manager.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
        fp = processes.start("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
        assert manager.recv(256) == b"READY=1"
        done = processes.upgrade()
        assert done.returncode == 0, done.stderr
        assert manager.recv(256) == f"MAINPID={processes.pid()}".encode()
        fp.proc.wait(10)
        checksummed_exchange(hostport(fp.address), 10_000)


def test_sigusr2_twice_and_sighup_after_the_hand_over_are_refused_with_a_reason(processes, echo, backend):  # noqa: F811
    fp = processes.start("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
    bridge = Bridges(hostport(fp.address), 1)  # keeps the old process after the hand-over
    try:
        done = processes.upgrade()
        assert done.returncode == 0, done.stderr
        fp.proc.send_signal(signal.SIGUSR2)
        fp.wait_log(rf"SIGUSR2: handed over to pid {processes.pid()} already")
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log(rf"SIGHUP: handed over to pid {processes.pid()}: reload that one")
        bridge.exchange()
    finally:
        bridge.close()
    fp.proc.wait(10)


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
        assert done.returncode == 0, (done.stderr, fp.lines[-20:])
        fp.wait_log(r"handed over to pid \d+: 1 listeners; 2 bridges stay here")
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
