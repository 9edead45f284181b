"""The forwarder end to end: `python -m tcptotcp` in a subprocess, over each backend."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List

import pytest

import tcptotcp
from helpers import HAS_PROC, IPV6_OK, Background, recv_exactly, recv_until_eof, rss_kib


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


class EchoServer:
    """A loopback echo upstream (TCP or Unix) serving each connection in a thread."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0)):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        """Echo until EOF, then FIN; closed once done, so that a burst of short connections
        (`openssl s_time` through a forward) does not pile up fds (it stays in `_conns`, counted)."""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(5)
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for c in self._conns:
            c.close()


class ForwarderProcess:
    LISTENING = re.compile(r"listening on (\S+), forwarding")

    def __init__(self, backend_name: str, *args: str):
        env = dict(os.environ)
        if backend_name == "pure":
            env["TCPTOTCP_NO_EXTENSIONS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcptotcp", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.address = self._wait_for(self.LISTENING, 15).group(1)
        except BaseException:
            self.close()  # never leave a forwarder running behind a failed start
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = pattern.search(line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {pattern.pattern!r} in {self.lines}")

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match:
        return self._wait_for(re.compile(pattern), timeout)

    def connect(self) -> socket.socket:
        if self.address.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.address[5:])
            return s
        host, port = self.address.rsplit(":", 1)
        return socket.create_connection((host.strip("[]"), int(port)), timeout=10)

    def terminate(self, sig=signal.SIGTERM, timeout: float = 10) -> float:
        sent = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self._reader.join(5)
        return time.monotonic() - sent

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self._reader.is_alive():
            # Closing the pipe under its blocked reader would wait for it forever.
            raise AssertionError("another process still holds the forwarder's stderr open (one it started?)")
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def forwarders(backend):
    started: List[ForwarderProcess] = []

    def start(*args: str) -> ForwarderProcess:
        fp = ForwarderProcess(backend.name, *args)
        started.append(fp)
        return fp

    yield start
    for fp in started:
        fp.close()


def _echo_roundtrip(fp: ForwarderProcess, payload: bytes) -> None:
    with fp.connect() as c:
        sender = Background(lambda: c.sendall(payload))
        assert recv_exactly(c, len(payload), timeout=20) == payload
        sender.result()


@pytest.mark.unix
@pytest.mark.signals
def test_echo_through_forwarder_and_logs(forwarders, echo, backend):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--rate-check", "1")
    expected_backend = "pure" if backend.name == "pure" else "cython"
    assert f"backend {expected_backend}" in fp.lines[0]
    payload = os.urandom(2 * 1024 * 1024)
    _echo_roundtrip(fp, payload)
    m = fp.wait_log(r"#1 close 127\.0\.0\.1:\d+ -> \S+: (\d+) bytes up, (\d+) down, (\w+) after")
    assert m.group(1) == m.group(2) == str(len(payload))
    assert fp.terminate() < 3
    assert fp.proc.returncode == 0
    assert any(f"served 1 connections (0 upstream failures, 0 refused), {len(payload)} bytes up" in l for l in fp.lines)


@pytest.mark.unix
@pytest.mark.signals
def test_several_clients_at_once(forwarders, echo):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
    payloads = [os.urandom(300_000 + i) for i in range(8)]
    runs = [Background(lambda p=p: _echo_roundtrip(fp, p)) for p in payloads]
    for r in runs:
        r.result(30)
    fp.terminate()
    assert any("served 8 connections" in l for l in fp.lines)


@pytest.mark.unix
def test_ipv6_listen_form(forwarders, echo):
    if not IPV6_OK:
        pytest.skip("no ::1 on this machine")
    fp = forwarders("[::1]:0", f"127.0.0.1:{echo.address[1]}")
    assert fp.address.startswith("[::1]:")
    _echo_roundtrip(fp, b"over six" * 1000)


@pytest.mark.unix
@pytest.mark.signals
def test_unix_socket_upstream_and_listener(forwarders, socket_dir):
    upstream_path = os.path.join(socket_dir, "up.sock")
    server = EchoServer(socket.AF_UNIX, upstream_path)
    try:
        listen_path = os.path.join(socket_dir, "in.sock")
        fp = forwarders(f"unix:{listen_path}", f"unix:{upstream_path}")
        assert fp.address == f"unix:{listen_path}"
        _echo_roundtrip(fp, os.urandom(500_000))
        fp.terminate()
        assert not os.path.exists(listen_path)  # the forwarder removes its own socket file
    finally:
        server.close()


@pytest.mark.unix
@pytest.mark.signals
def test_refused_upstream_then_recovery(forwarders):
    with socket.socket() as probe:  # a port with nothing listening (for now)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{port}", "--connect-timeout", "2")
    with fp.connect() as c:
        c.settimeout(5)
        assert c.recv(1) == b""  # closed, not hung
    fp.wait_log(r"#1 127\.0\.0\.1:\d+: upstream 127\.0\.0\.1:%d failed" % port)
    server = EchoServer(address=("127.0.0.1", port))
    try:
        _echo_roundtrip(fp, b"recovered")
        fp.terminate()
        assert fp.proc.returncode == 0
        assert any("(1 upstream failures, 0 refused)" in l for l in fp.lines)
    finally:
        server.close()


@pytest.mark.unix
def test_idle_timeout_through_cli_flags(forwarders, echo):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--rate-check", "1", "--idle-timeout", "2")
    with fp.connect() as c:
        started = time.monotonic()
        received, _ = recv_until_eof(c, timeout=10)
        assert received == 0
        elapsed = time.monotonic() - started
    assert 2.9 <= elapsed < 4.0, elapsed
    fp.wait_log(r"#1 close .* idle after")


@pytest.mark.unix
@pytest.mark.signals
def test_sigterm_with_open_bridges_exits_zero_quickly(forwarders, echo):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
    clients = [fp.connect() for _ in range(5)]
    try:
        for c in clients:
            c.sendall(b"hi")
            assert recv_exactly(c, 2) == b"hi"
        assert fp.terminate(signal.SIGTERM) < 2.5
        assert fp.proc.returncode == 0
        for c in clients:
            c.settimeout(5)
            assert c.recv(1) == b""  # every bridge was stopped
        assert any("served 5 connections" in l for l in fp.lines)
    finally:
        for c in clients:
            c.close()


@pytest.mark.unix
@pytest.mark.signals
def test_sigint_with_drain_lets_a_transfer_finish(forwarders, echo):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--drain", "5", "--half-close")
    with fp.connect() as c:
        c.sendall(b"a" * 1000)
        assert recv_exactly(c, 1000) == b"a" * 1000
        fp.proc.send_signal(signal.SIGINT)
        fp.wait_log("draining up to 5 s")
        c.sendall(b"b" * 1000)  # still bridged while draining
        assert recv_exactly(c, 1000) == b"b" * 1000
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c, timeout=5)[0] == 0
    fp.proc.wait(5)
    assert fp.proc.returncode == 0


@pytest.mark.unix
def test_max_connections_holds_extra_clients_in_backlog(forwarders, echo):
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--max-connections", "1")
    first = fp.connect()
    try:
        first.sendall(b"1")
        assert recv_exactly(first, 1) == b"1"
        second = fp.connect()  # lands in the backlog
        try:
            second.sendall(b"2")
            second.settimeout(0.5)
            with pytest.raises(socket.timeout):
                second.recv(1)  # not served while the only slot is taken
            first.close()
            assert recv_exactly(second, 1, timeout=5) == b"2"
        finally:
            second.close()
    finally:
        first.close()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["127.0.0.1:0"],
        ["nonsense", "127.0.0.1:1"],
        ["127.0.0.1:99999", "127.0.0.1:1"],
        ["127.0.0.1:0", "::1:80"],
        ["127.0.0.1:0", "127.0.0.1:1", "--activity", "some"],
        ["127.0.0.1:0", "127.0.0.1:1", "--rate-check", "-1"],
        ["127.0.0.1:0", "127.0.0.1:1", "--max-connections", "0"],
        ["demo", "--megabytes", "0"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, backend):
    env = dict(os.environ, TCPTOTCP_NO_EXTENSIONS="1" if backend.name == "pure" else "")
    proc = subprocess.run(
        [sys.executable, "-m", "tcptotcp", *args], capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], proc.stderr


def test_version_and_help(backend):
    env = dict(os.environ, TCPTOTCP_NO_EXTENSIONS="1" if backend.name == "pure" else "")
    out = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--version"], capture_output=True, text=True, timeout=30, env=env, check=True
    ).stdout
    assert out.strip() == f"tcptotcp {tcptotcp.__version__} ({'pure' if backend.name == 'pure' else 'cython'})"
    helptext = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--help"], capture_output=True, text=True, timeout=30, env=env, check=True
    ).stdout
    assert "examples:" in helptext and "tcptotcp demo" in helptext


def test_demo_runs_and_checks_bytes(backend):
    env = dict(os.environ, TCPTOTCP_NO_EXTENSIONS="1" if backend.name == "pure" else "")
    proc = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "demo", "--megabytes", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"pure\s+8,388,608 bytes", proc.stdout)
    assert bool(re.search(r"cython\s+8,388,608 bytes", proc.stdout)) == (backend.name != "pure")


def test_forwarder_library_port_zero(backend, echo):
    fwd = tcptotcp.Forwarder("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", bridge_class=backend.Bridge)
    server = Background(fwd.serve_forever)
    try:
        assert fwd.address[1] != 0
        with socket.create_connection(fwd.address) as c:
            c.sendall(b"library")
            assert recv_exactly(c, 7) == b"library"
    finally:
        fwd.close()
        server.result(5)
    assert fwd.stats.accepted == 1 and fwd.stats.bytes_up == 7


class BlackholeUpstream(EchoServer):
    """Accepts every connection and never reads from it."""

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        pass  # hold the connection open, read nothing


@pytest.mark.unix
@pytest.mark.signals
@pytest.mark.proc
@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads the forwarder's memory from /proc")
def test_flood_over_max_connections_into_an_upstream_that_never_reads(forwarders, backend):
    hole = BlackholeUpstream()
    hole_port = hole.address[1]
    clients: List[socket.socket] = []
    try:
        fp = forwarders("127.0.0.1:0", f"127.0.0.1:{hole_port}", "--max-connections", "40", "--log-level", "warning")
        rss_start = rss_kib(fp.proc.pid)
        chunk = bytes(256 * 1024)
        for _ in range(150):  # far over the limit: the rest wait in the backlog
            c = fp.connect()
            c.setblocking(False)
            clients.append(c)
        pushed = 0
        deadline = time.monotonic() + 20
        for c in clients:  # push until every path is full
            while time.monotonic() < deadline:
                try:
                    pushed += c.send(chunk)
                except (BlockingIOError, socket.timeout):
                    break
        time.sleep(1.0)
        grown = rss_kib(fp.proc.pid) - rss_start
        # Bytes wait in kernel buffers, not in the relay: bounded by one buffer per pump.
        assert grown < 40 * 2 * 512 + 32 * 1024, (grown, pushed)
        for c in clients:
            c.close()
        clients.clear()
        # Still responsive: its clients all ended, and a signal stops it at once.
        assert fp.terminate() < 3 and fp.proc.returncode == 0
        assert any("served" in l for l in fp.lines)
    finally:
        for c in clients:
            c.close()
        hole.close()


@pytest.mark.unix
@pytest.mark.slow
def test_silent_clients_are_reaped_and_real_clients_served(forwarders, echo):
    fp = forwarders(
        "127.0.0.1:0",
        f"127.0.0.1:{echo.address[1]}",
        "--max-connections",
        "20",
        "--rate-check",
        "1",
        "--idle-timeout",
        "2",
        "--log-level",
        "warning",
    )
    silent = [fp.connect() for _ in range(60)]  # connect, send nothing
    try:
        started = time.monotonic()
        _echo_roundtrip(fp, b"real work")  # waits its turn in the backlog
        # 60 silent clients / 20 slots * 3 s idle each: served within about 12 s.
        assert time.monotonic() - started < 20
        for s in silent:
            s.settimeout(15)
            assert s.recv(1) == b""  # each silent client was closed by the idle rule
    finally:
        for s in silent:
            s.close()


@pytest.mark.signals
@pytest.mark.proc
@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads the forwarder's CPU time from /proc")
def test_out_of_file_descriptors_backs_off_and_recovers(backend, echo):
    """EMFILE on accept or on a bridge's dup: logged, no spin, no crash; serving resumes."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)); "
        "from tcptotcp.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, TCPTOTCP_NO_EXTENSIONS="1" if backend.name == "pure" else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    fp = ForwarderProcess.__new__(ForwarderProcess)  # attach the helper to this process
    fp.proc, fp.lines = proc, []
    fp._reader = threading.Thread(target=fp._read, daemon=True)
    fp._reader.start()
    clients: List[socket.socket] = []
    try:
        fp.address = fp._wait_for(ForwarderProcess.LISTENING, 15).group(1)
        for _ in range(40):  # far more than 48 fds can bridge
            clients.append(fp.connect())
        fp.wait_log(
            r"(accept failed|upstream .* failed|bridge not started|not bridged)"
            r".*(Too many open files|EMFILE|\[Errno 24\])",
            15,
        )
        time.sleep(1.0)
        cpu = sum(int(x) for x in open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        time.sleep(1.0)
        cpu_after = sum(int(x) for x in open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        assert cpu_after - cpu < os.sysconf("SC_CLK_TCK") // 2, "spinning while out of fds"
        for c in clients:
            c.close()
        clients.clear()
        time.sleep(0.5)
        _echo_roundtrip(fp, b"served again")  # recovered
        assert fp.terminate() < 3 and proc.returncode == 0
    finally:
        for c in clients:
            c.close()
        fp.close()
