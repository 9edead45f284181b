"""The forwarder as operators run it: metrics scraped over HTTP, socket activation, several
processes on one port, a peer that vanishes, SIGHUP reloads, JSON logs, SIGUSR1 listings and
keepalive options, each checked from outside on real sockets and processes, over both backends."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import pytest

from helpers import Background, recv_exactly, recv_until_eof
from test_forwarder import EchoServer, ForwarderProcess, echo, forwarders  # noqa: F401


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


LINUX = sys.platform.startswith("linux")
T = TypeVar("T")
Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]

OPEN_LINE = re.compile(r"#(\d+) open (\S+) -> (\S+)$")
CLOSE_LINE = re.compile(r"#(\d+) close (\S+) -> (\S+): (\d+) bytes up, (\d+) down, (\w+) after ([\d.]+) s")
BRIDGE_LINE = re.compile(r"tcptotcp: (\S+) #(\d+) (\S+) -> (\S+): ([\d.]+) s, (\d+) bytes up, (\d+) down$")


# -- small tools ---------------------------------------------------------------------------


def wait_for(probe: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """`probe()` until it is truthy or `timeout` seconds passed; its last value either way."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = probe()
    return value


def hostport(text: str) -> Tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def peer_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def checksummed_echo(
    address: Any, size: int, *, family: int = socket.AF_INET, source: Optional[Tuple[str, int]] = None
) -> str:
    """One client through the forwarder to an echo upstream: sends `size` random bytes while
    reading them back, compares SHA-256; returns the client's own address as logs write it."""
    payload = os.urandom(size)
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        if source is not None:
            c.bind(source)
        c.connect(address)
        me = "" if family == socket.AF_UNIX else peer_text(c)
        sender = Background(lambda: c.sendall(payload))
        got = recv_exactly(c, size, timeout=20)
        sender.result(20)
    assert len(got) == size
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    return me


class DeadPort:
    """A loopback port nobody listens on: bound and never listening, so connects are refused
    and no other process is given the port meanwhile."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.text = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dead_port():
    port = DeadPort()
    yield port
    port.close()


def scrape(url: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def refused_total(samples: Samples, listen: str) -> float:
    """Refusals of every reason (the counter has one series per reason that happened)."""
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "tcptotcp_connections_refused_total" and ("listen", listen) in labels
    )


def ended_total(samples: Samples, listen: str) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "tcptotcp_bridges_ended_total" and ("listen", listen) in labels
    )


def failures(samples: Samples, listen: str) -> Dict[str, float]:
    """Upstream connect failures of one forward, by upstream."""
    found = {}
    for (name, labels), v in samples.items():
        if name == "tcptotcp_upstream_connect_failures_total" and ("listen", listen) in labels:
            found[dict(labels)["upstream"]] = v
    return found


def settled(url: str, listen: str, ended: int) -> Optional[Samples]:
    """A scrape once `ended` bridges of `listen` have ended and none is running, else None."""
    samples = scrape(url)
    done = ended_total(samples, listen) == ended and sample(samples, "tcptotcp_connections_active", listen=listen) == 0
    return samples if done else None


def listing(fp: ForwarderProcess, done: Callable[[str], bool], timeout: float = 10.0) -> Tuple[List[str], str]:
    """SIGUSR1, again until the totals line satisfies `done` (a bridge's byte counts may trail
    the bytes its peers already saw by a moment): (that listing's lines, its totals line)."""
    deadline = time.monotonic() + timeout
    lines: List[str] = []
    total = ""
    for _ in range(100):
        start = len(fp.lines)
        fp.proc.send_signal(signal.SIGUSR1)
        found = wait_for(lambda: [i for i in range(start, len(fp.lines)) if "bridges open" in fp.lines[i]], 5)
        assert found, f"no listing after SIGUSR1: {fp.lines[start:]}"
        lines, total = fp.lines[start : found[0]], fp.lines[found[0]]
        if done(total) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done(total), total
    return lines, total


LOG_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def assert_whole_lines(lines: List[str]) -> None:
    """Each stderr line is one announcement ("tcptotcp: ...") or one log record, never two run
    together by threads writing at once (nor the empty line such a mix-up leaves)."""
    for line in lines:
        starts = [m.start() for m in LOG_START.finditer(line)] + [m.start() for m in re.finditer("tcptotcp: ", line)]
        assert starts == [0], f"not one whole line: {line!r}"


def write_atomically(path: Path, text: str) -> None:
    """The forwarder may read the file at any moment: it sees the old text or the new, whole."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text)
    os.replace(scratch, path)


def forward_table(listen: str, upstream: str) -> str:
    return f'[[forward]]\nlisten = "{listen}"\nupstream = "{upstream}"\n'


# -- 1. metrics ------------------------------------------------------------------------------


@pytest.mark.signals
def test_metrics_count_checksummed_clients(forwarders, echo):  # noqa: F811
    pytest.importorskip("prometheus_client")
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", "--metrics", "127.0.0.1:0")
    metrics_line = fp.wait_log(r"tcptotcp: metrics on (http://127\.0\.0\.1:(\d+)/metrics)$")
    assert int(metrics_line.group(2)) != 0  # the bound port, not the 0 asked for
    url = metrics_line.group(1)
    listen = fp.address

    before = scrape(url)
    assert sample(before, "tcptotcp_connections_accepted_total", listen=listen) == 0
    assert sample(before, "tcptotcp_connections_active", listen=listen) == 0
    assert sample(before, "tcptotcp_bridge_duration_seconds_count", listen=listen) == 0
    assert ended_total(before, listen) == 0

    sizes = [int.from_bytes(os.urandom(3), "big") % 300_000 + 1 for _ in range(5)]
    runs = [Background(lambda n=n: checksummed_echo(hostport(listen), n)) for n in sizes]
    clients = {run.result(30) for run in runs}
    assert len(clients) == 5

    after = wait_for(lambda: settled(url, listen, ended=5), 10, interval=0.1)
    assert after is not None, "the bridges did not all end in the metrics"
    assert sample(after, "tcptotcp_connections_accepted_total", listen=listen) == 5
    assert refused_total(after, listen) == 0
    assert sample(after, "tcptotcp_connections_active", listen=listen) == 0
    assert sample(after, "tcptotcp_bytes_up_total", listen=listen) == sum(sizes)
    assert sample(after, "tcptotcp_bytes_down_total", listen=listen) == sum(sizes)
    assert sample(after, "tcptotcp_bridges_ended_total", listen=listen, reason="closed") == 5
    assert sample(after, "tcptotcp_bridge_duration_seconds_count", listen=listen) == 5
    assert sample(after, "tcptotcp_bridge_duration_seconds_bucket", listen=listen, le="+Inf") == 5
    assert sample(after, "tcptotcp_bridge_duration_seconds_sum", listen=listen) > 0
    assert all(v == 0 for v in failures(after, listen).values())

    # The per-connection lines say the same.
    assert wait_for(lambda: len([l for l in fp.lines if CLOSE_LINE.search(l)]) == 5, 5)
    closes = [m for m in map(CLOSE_LINE.search, fp.lines) if m]
    assert {m.group(2) for m in closes} == clients
    assert sorted(int(m.group(4)) for m in closes) == sorted(sizes) == sorted(int(m.group(5)) for m in closes)

    assert fp.terminate() < 5 and fp.proc.returncode == 0
    total = sum(sizes)
    assert f"tcptotcp: served 5 connections (0 upstream failures, 0 refused), {total} bytes up, {total} bytes down" in (
        fp.lines
    )
    with pytest.raises(urllib.error.URLError):  # the metrics server went with the process
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.signals
def test_metrics_upstream_failures_are_labelled_with_the_upstream(forwarders, dead_port):  # noqa: F811
    pytest.importorskip("prometheus_client")
    live = EchoServer()
    try:
        live_text = f"127.0.0.1:{live.address[1]}"
        # Failover with no back-off: every client tries the dead upstream first.
        fp = forwarders("127.0.0.1:0", dead_port.text, live_text, "--upstream-backoff", "0", "--metrics", "127.0.0.1:0")
        url = fp.wait_log(r"metrics on (http://\S+/metrics)").group(1)
        listen = fp.address
        assert failures(scrape(url), listen) == {}
        for _ in range(3):
            checksummed_echo(hostport(listen), 10_000)
        samples = wait_for(lambda: settled(url, listen, ended=3), 10, interval=0.1)
        assert samples is not None, "the bridges did not all end in the metrics"
        assert failures(samples, listen) == {dead_port.text: 3}
        assert sample(samples, "tcptotcp_connections_accepted_total", listen=listen) == 3
        assert refused_total(samples, listen) == 0

        live.close()  # now both are down: one more client fails on each
        with socket.create_connection(hostport(listen), timeout=10) as c:
            assert recv_until_eof(c, timeout=10)[0] == 0
        fp.wait_log(r"#4 127\.0\.0\.1:\d+: every upstream failed")
        samples = scrape(url)
        assert failures(samples, listen) == {dead_port.text: 4, live_text: 1}
        assert sample(samples, "tcptotcp_connections_accepted_total", listen=listen) == 4
        assert ended_total(samples, listen) == 3
        assert sample(samples, "tcptotcp_connections_active", listen=listen) == 0
        assert fp.terminate() < 5 and fp.proc.returncode == 0
        assert any("served 4 connections (5 upstream failures, 0 refused)" in l for l in fp.lines)
    finally:
        live.close()


# -- 2. socket activation --------------------------------------------------------------------

# Runs between the test and the forwarder: puts the passed socket at fd 3, says so the way
# systemd does (LISTEN_PID is this process, which exec keeps), and becomes the forwarder.
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    fd, protocol = int(sys.argv[1]), sys.argv[2]
    if fd != 3:
        os.dup2(fd, 3)  # the duplicate is inheritable: it survives the exec
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    if protocol == "systemd":
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
    os.execv(sys.executable, [sys.executable, "-m", "tcptotcp", *sys.argv[3:]])
    """
)


EARLY = b"sent before the forwarder started"


class LaunchedForwarder(ForwarderProcess):
    """A forwarder started by `argv` (not ``python -m tcptotcp`` itself), keeping `pass_fds`."""

    def __init__(self, backend_name: str, argv: List[str], pass_fds: Tuple[int, ...]):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        if backend_name == "pure":
            env["TCPTOTCP_NO_EXTENSIONS"] = "1"
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, pass_fds=pass_fds
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.address = self._wait_for(self.LISTENING, 15).group(1)
        except BaseException:
            self.close()
            raise


@pytest.mark.signals
@pytest.mark.parametrize("listen", ["systemd:web", "fd:3"])
def test_inherited_listening_socket_serves_clients(backend, echo, listen):  # noqa: F811
    server = socket.socket()
    early: List[socket.socket] = []
    fp: Optional[LaunchedForwarder] = None
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        # Clients that arrive before the forwarder exists wait in the socket's backlog.
        early = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        for c in early:
            c.sendall(EARLY)
        protocol = "systemd" if listen.startswith("systemd:") else "plain"
        argv = [sys.executable, "-c", LAUNCHER, str(server.fileno()), protocol, listen, f"127.0.0.1:{echo.address[1]}"]
        fp = LaunchedForwarder(backend.name, argv, (server.fileno(),))
        expected = "pure" if backend.name == "pure" else "cython"
        assert fp.address == f"127.0.0.1:{port}"
        announced = f"tcptotcp: listening on 127.0.0.1:{port}, forwarding to 127.0.0.1:{echo.address[1]} "
        assert announced + f"(backend {expected})" in fp.lines
        for c in early:
            assert recv_exactly(c, len(EARLY)) == EARLY
            c.close()
        for size in (1, 70_000, 500_000):
            checksummed_echo(("127.0.0.1", port), size)
        assert fp.terminate() < 5 and fp.proc.returncode == 0
        assert any("served 11 connections (0 upstream failures, 0 refused)" in l for l in fp.lines), fp.lines
        # (The queued clients are bridged while the listening line is written: a race for stderr.)
        assert_whole_lines(fp.lines)
    finally:
        for c in early:
            c.close()
        if fp is not None:
            fp.close()
        server.close()


# -- 3. two processes on one port ------------------------------------------------------------


@pytest.mark.signals
@pytest.mark.skipif(not LINUX, reason="only Linux spreads one port's clients over SO_REUSEPORT listeners")
def test_reuse_port_two_processes_share_the_clients(forwarders, echo, backend):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    a = forwarders("127.0.0.1:0", upstream, "--reuse-port")
    b = forwarders(a.address, upstream, "--reuse-port")
    assert b.address == a.address

    # Without --reuse-port the port is taken.
    env = dict(os.environ, TCPTOTCP_NO_EXTENSIONS="1" if backend.name == "pure" else "")
    taken = subprocess.run(
        [sys.executable, "-m", "tcptotcp", a.address, upstream], capture_output=True, text=True, timeout=30, env=env
    )
    assert taken.returncode == 1 and "cannot listen on" in taken.stderr, taken

    def served(fp: ForwarderProcess) -> List[str]:
        return [m.group(2) for m in map(OPEN_LINE.search, list(fp.lines)) if m]

    clients: List[socket.socket] = []
    try:
        # The kernel picks a listener by a hash of each client's address and port: keep
        # clients open (distinct ports) until both processes have served some.
        for _ in range(10):
            for _ in range(40 if not clients else 20):
                c = socket.create_connection(hostport(a.address), timeout=10)
                clients.append(c)
                c.sendall(b"which one?")
                assert recv_exactly(c, 10) == b"which one?"
            assert wait_for(lambda: len(served(a)) + len(served(b)) == len(clients), 10)
            if served(a) and served(b):
                break
        by_a, by_b = set(served(a)), set(served(b))
        assert by_a and by_b, (len(by_a), len(by_b))
        assert not by_a & by_b
        assert by_a | by_b == {peer_text(c) for c in clients}
    finally:
        for c in clients:
            c.close()
    assert a.terminate() < 5 and b.terminate() < 5
    assert a.proc.returncode == b.proc.returncode == 0
    summaries = [re.search(r"served (\d+) connections", l) for l in a.lines + b.lines]
    assert sum(int(m.group(1)) for m in summaries if m) == len(clients)


# -- 4. a peer that vanishes -----------------------------------------------------------------

# Runs inside its own network namespace (unshare -n): loopback up, a slow but live upstream per
# forwarder, a client per forwarder sending without pause; then the loopback goes down, so
# segments vanish without FIN or RST. Prints one JSON object.
NETNS_DRIVER = textwrap.dedent(
    r"""
    import ctypes, json, os, re, signal, socket, subprocess, sys, threading, time

    backend, timeout_arg = sys.argv[1], sys.argv[2]
    stop = threading.Event()
    give_up = time.monotonic() + 60  # every loop here ends by then at the latest
    out = {}
    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_parent():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no forwarder outlives this driver

    def ip_link(state):
        subprocess.run(["ip", "link", "set", "lo", state], check=True, timeout=10)

    class SlowSink:
        # Reads a little at a time, for ever: the forwarder always has bytes queued for it,
        # while its window keeps opening (a slow peer, not a dead one).
        def __init__(self):
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.listener.settimeout(1.0)
            self.port = self.listener.getsockname()[1]
            self.received = 0
            self.conns = []

        def start(self):
            threading.Thread(target=self.accept, daemon=True).start()

        def accept(self):
            while not stop.is_set() and time.monotonic() < give_up:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                self.conns.append(conn)
                threading.Thread(target=self.read, args=(conn,), daemon=True).start()

        def read(self, conn):
            conn.settimeout(1.0)
            while not stop.is_set() and time.monotonic() < give_up:
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.received += len(data)
                time.sleep(0.005)

    class Forwarder:
        def __init__(self, upstream_port, *options):
            env = dict(os.environ)
            if backend == "pure":
                env["TCPTOTCP_NO_EXTENSIONS"] = "1"
            argv = [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", "127.0.0.1:%d" % upstream_port, *options]
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                preexec_fn=die_with_parent,  # (no thread is running yet: see below)
            )
            self.lines = []  # (monotonic time read, line)

        def start(self):
            threading.Thread(target=self.read, daemon=True).start()

        def read(self):
            for line in self.proc.stderr:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

        def find(self, pattern, timeout):
            deadline = time.monotonic() + timeout
            while True:
                for seen, line in list(self.lines):
                    match = re.search(pattern, line)
                    if match:
                        return seen, match
                if time.monotonic() >= deadline:
                    return None, None
                time.sleep(0.02)

    def pump(sock):
        # Send without pause; never block for long (the peer may vanish).
        sock.setblocking(False)
        chunk = b"v" * 65536
        while not stop.is_set() and time.monotonic() < give_up:
            try:
                sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                return

    ip_link("up")
    forwarders, clients = {}, []
    try:
        sinks = {"timeout": SlowSink(), "control": SlowSink()}
        forwarders["timeout"] = Forwarder(sinks["timeout"].port, "--user-timeout", timeout_arg)
        forwarders["control"] = Forwarder(sinks["control"].port)  # no user timeout
        for part in [*sinks.values(), *forwarders.values()]:
            part.start()  # the first threads: after the forks
        for name, fwd in forwarders.items():
            _, listening = fwd.find(r"listening on 127\.0\.0\.1:(\d+), forwarding .*\(backend (\w+)\)", 15)
            if listening is None:
                raise SystemExit("%s forwarder did not start: %s" % (name, fwd.lines))
            out["backend_" + name] = listening.group(2)
            client = socket.create_connection(("127.0.0.1", int(listening.group(1))), timeout=10)
            clients.append(client)
            threading.Thread(target=pump, args=(client,), daemon=True).start()
            if fwd.find(r"#1 open", 10)[1] is None:
                raise SystemExit("%s: no bridge: %s" % (name, fwd.lines))
        deadline = time.monotonic() + 10
        while min(s.received for s in sinks.values()) < (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.02)
        out["received_before"] = {name: s.received for name, s in sinks.items()}
        time.sleep(1.5)  # longer than the user timeout: a slow peer that answers is not dropped
        out["closed_while_up"] = [l for _, l in forwarders["timeout"].lines if " close " in l]
        down_at = time.monotonic()
        ip_link("down")
        seen, close = forwarders["timeout"].find(r"#1 close .*", 15)
        out["seconds_to_close"] = None if seen is None else seen - down_at
        out["close"] = None if close is None else close.group(0)
        time.sleep(0.5)
        out["control_closes"] = [l for _, l in forwarders["control"].lines if " close " in l]
    finally:
        stop.set()
        for fwd in forwarders.values():
            fwd.proc.kill()
            fwd.proc.wait(10)
        for client in clients:
            client.close()
    out["lines"] = [l for _, l in forwarders["timeout"].lines]
    print(json.dumps(out))
    """
)


def _netns_unavailable() -> Optional[str]:
    if not LINUX:
        return "network namespaces are Linux's"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    try:
        probe = subprocess.run(
            ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if probe.returncode != 0:
        return f"unshare -n not permitted here: {probe.stderr.strip()}"
    return None


def test_vanished_peer_ends_the_bridge_as_error_within_the_user_timeout(backend, tmp_path):
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    driver = tmp_path / "netns_driver.py"
    driver.write_text(NETNS_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TCPTOTCP_NO_EXTENSIONS"}
    if backend.name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    run = subprocess.run(
        ["unshare", "-n", sys.executable, str(driver), backend.name, "1"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    expected = "pure" if backend.name == "pure" else "cython"
    assert out["backend_timeout"] == out["backend_control"] == expected
    assert out["closed_while_up"] == [], out
    assert out["close"] is not None, out
    close = CLOSE_LINE.search(out["close"])
    assert close is not None and close.group(6) == "error", out["close"]
    assert int(close.group(4)) > 0 and int(close.group(5)) == 0
    assert out["seconds_to_close"] < 1 + 4, out  # the user timeout, plus a retransmission's slack
    assert out["control_closes"] == [], out  # without --user-timeout it waits on


# -- 5. SIGHUP reload ------------------------------------------------------------------------


class Relay:
    """Keeps a client's bridge busy from a thread: a chunk out, its echo back, compared, again."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.echoed = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            for _ in range(100_000):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                chunk = os.urandom(8192)
                self.sock.sendall(chunk)
                if recv_exactly(self.sock, len(chunk), timeout=10) != chunk:
                    raise AssertionError(f"the echo differs after {self.echoed} bytes")
                self.echoed += len(chunk)
                time.sleep(0.001)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def running_past(self, count: int, timeout: float = 10.0) -> bool:
        return bool(wait_for(lambda: self.echoed >= count or self.error is not None, timeout)) and self.error is None

    def finish(self) -> int:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the relay thread did not stop"
        if self.error is not None:
            raise self.error
        return self.echoed


@pytest.mark.signals
@pytest.mark.unix
def test_sighup_reload_moves_new_clients_and_keeps_open_bridges(forwarders, echo, tmp_path, socket_dir):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    config = tmp_path / "tcptotcp.toml"
    write_atomically(config, forward_table("127.0.0.1:0", upstream))
    fp = forwarders("--config", str(config))
    a_address = hostport(fp.address)

    client = socket.create_connection(a_address, timeout=10)
    try:
        relay = Relay(client)
        assert relay.running_past(64 * 1024), relay.error

        b_path = os.path.join(socket_dir, "b.sock")
        write_atomically(config, forward_table(f"unix:{b_path}", upstream))
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log(r"^tcptotcp: reloaded: 1 added, 1 removed, 0 changed$")
        assert f"tcptotcp: stopped listening on {fp.address}" in fp.lines  # the port it had, not ":0"
        assert any(l.startswith(f"tcptotcp: listening on unix:{b_path}, forwarding to {upstream}") for l in fp.lines)

        # The bridge opened on A relays on through the reload.
        assert relay.running_past(relay.echoed + 256 * 1024), relay.error
        # New clients: B serves them, A is gone.
        checksummed_echo(b_path, 200_000, family=socket.AF_UNIX)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(a_address, timeout=5).close()
        # SIGUSR1 still lists the bridge of the forward the reload removed.
        lines, _ = listing(fp, lambda total: total.startswith("tcptotcp: 1 bridges open"))
        listed = [m for m in map(BRIDGE_LINE.search, lines) if m]
        assert [(m.group(1), m.group(2), m.group(3)) for m in listed] == [(fp.address, "1", peer_text(client))]

        relayed = relay.finish()
        me = peer_text(client)
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client, timeout=10)[0] == 0  # every byte was read back already
    finally:
        client.close()

    # A file that does not parse changes nothing.
    write_atomically(config, "[[forward]\nlisten = \n")
    fp.proc.send_signal(signal.SIGHUP)
    fp.wait_log(r"reload failed, nothing changed: .*tcptotcp\.toml")
    checksummed_echo(b_path, 100_000, family=socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(a_address, timeout=5).close()
    assert sum("reloaded:" in l for l in fp.lines) == 1

    assert fp.terminate() < 5 and fp.proc.returncode == 0
    assert any(
        l.startswith(f"tcptotcp: unix:{b_path}: served 2 connections (0 upstream failures, 0 refused)")
        for l in fp.lines
    ), fp.lines
    # (By the exit at the latest: when, see the next test.)
    close = fp.wait_log(r"#1 close %s -> %s: (\d+) bytes up, (\d+) down, (\w+) after" % (re.escape(me), upstream))
    assert int(close.group(1)) == int(close.group(2)) == relayed
    assert close.group(3) == "closed"


@pytest.mark.signals
@pytest.mark.unix
def test_a_bridge_of_a_removed_forward_reports_its_end(forwarders, echo, tmp_path, socket_dir, backend, request):  # noqa: F811
    pytest.importorskip("prometheus_client")
    upstream = f"127.0.0.1:{echo.address[1]}"
    config = tmp_path / "tcptotcp.toml"
    write_atomically(config, forward_table("127.0.0.1:0", upstream))
    fp = forwarders("--config", str(config), "--metrics", "127.0.0.1:0")
    url = fp.wait_log(r"metrics on (http://\S+/metrics)").group(1)
    a_listen = fp.address
    with socket.create_connection(hostport(a_listen), timeout=10) as client:
        me = peer_text(client)
        client.sendall(b"a" * 5000)
        assert recv_exactly(client, 5000) == b"a" * 5000
        b_path = os.path.join(socket_dir, "b.sock")
        write_atomically(config, forward_table(f"unix:{b_path}", upstream))
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log(r"reloaded: 1 added, 1 removed, 0 changed")
        client.sendall(b"b" * 3000)  # after the reload
        assert recv_exactly(client, 3000) == b"b" * 3000
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client, timeout=10)[0] == 0

    # Its end is reported as it happens, not when the process stops.
    close = fp.wait_log(r"#1 close %s -> %s: (\d+) bytes up, (\d+) down, (\w+) after" % (re.escape(me), upstream), 5)
    assert (close.group(1), close.group(2), close.group(3)) == ("8000", "8000", "closed")
    samples = wait_for(lambda: settled(url, a_listen, ended=1), 5, interval=0.1)
    assert samples is not None, "the removed forward's bridge is still active in the metrics"
    assert sample(samples, "tcptotcp_bytes_up_total", listen=a_listen) == 8000
    listing(fp, lambda total: total == "tcptotcp: 0 bridges open, 0 bytes up and 0 down so far")
    assert fp.terminate() < 5 and fp.proc.returncode == 0


@pytest.mark.signals
def test_two_port_zero_forwards_are_both_listed_stopped_and_summarized(forwarders, echo, tmp_path):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    config = tmp_path / "tcptotcp.toml"
    write_atomically(config, forward_table("127.0.0.1:0", upstream) * 2)
    fp = forwarders("--config", str(config))
    assert wait_for(lambda: sum("listening on" in l for l in fp.lines) == 2, 10)
    addresses = [re.search(r"listening on (\S+),", l).group(1) for l in fp.lines if "listening on" in l]
    assert len(set(addresses)) == 2
    clients = [socket.create_connection(hostport(address), timeout=10) for address in addresses]
    try:
        for c in clients:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
        lines, _ = listing(fp, lambda total: total.startswith("tcptotcp: 2 bridges open"))
        assert sorted(m.group(1) for m in map(BRIDGE_LINE.search, lines) if m) == sorted(addresses)
        assert fp.terminate() < 5 and fp.proc.returncode == 0
        for c in clients:  # SIGTERM stopped both bridges
            c.settimeout(5)
            assert c.recv(1) == b""
    finally:
        for c in clients:
            c.close()
    for address in addresses:
        assert any(l.startswith(f"tcptotcp: {address}: served 1 connections") for l in fp.lines), fp.lines


# -- 6. JSON logs ----------------------------------------------------------------------------


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.signals
def test_json_log_lines_for_every_event(forwarders, echo, dead_port):  # noqa: F811
    if not _can_bind("127.0.0.3"):
        pytest.skip("127.0.0.3 is not a loopback address here")
    upstream = f"127.0.0.1:{echo.address[1]}"
    fp = forwarders("127.0.0.1:0", dead_port.text, upstream, "--log-format", "json", "--deny", "127.0.0.3")

    def events(name: str) -> List[Dict[str, Any]]:
        return [e for e in map(json.loads, list(fp.lines)) if e["event"] == name]

    # 1: its first upstream is dead, the second serves it.
    first = checksummed_echo(hostport(fp.address), 50_000)
    # 2: denied.
    with socket.create_connection(hostport(fp.address), timeout=10, source_address=("127.0.0.3", 0)) as c:
        assert recv_until_eof(c, timeout=10)[0] == 0
    # 3: held open across SIGUSR1 and SIGTERM.
    held = socket.create_connection(hostport(fp.address), timeout=10)
    try:
        held.sendall(b"h" * 1000)
        assert recv_exactly(held, 1000) == b"h" * 1000
        assert wait_for(lambda: events("close") and events("refused"), 10)
        lines, _ = listing(fp, lambda total: json.loads(total)["bytes_up"] == 1000 == json.loads(total)["bytes_down"])
        bridges = [e for e in map(json.loads, lines) if e["event"] == "bridge"]
        assert fp.terminate() < 5 and fp.proc.returncode == 0
        held.settimeout(5)
        assert held.recv(1) == b""
    finally:
        held.close()

    parsed = [json.loads(line) for line in fp.lines]  # every line, not only those looked at
    for entry in parsed:
        assert isinstance(entry, dict) and {"time", "level", "event", "message"} <= set(entry), entry
    seen = {e["event"] for e in parsed}
    assert {"listening", "upstream_failed", "open", "close", "refused", "bridge", "open_bridges", "summary"} <= seen

    (listening,) = events("listening")
    assert listening["listen"] == fp.address and listening["upstreams"] == [dead_port.text, upstream]
    (failed,) = events("upstream_failed")
    assert failed["id"] == 1 and failed["client"] == first and failed["upstream"] == dead_port.text
    (refused,) = events("refused")
    assert refused["id"] == 2 and refused["client"].startswith("127.0.0.3:") and refused["level"] == "warning"
    # (Order between clients: a bridge that opened and ended between two takes is told at its end.)
    assert sorted((e["id"], e["upstream"]) for e in events("open")) == [(1, upstream), (3, upstream)]
    closes = {e["id"]: e for e in events("close")}
    assert set(closes) == {1, 3}
    assert (closes[1]["client"], closes[1]["bytes_up"], closes[1]["bytes_down"]) == (first, 50_000, 50_000)
    assert closes[1]["reason"] == "closed" and closes[1]["seconds"] >= 0
    assert (closes[3]["bytes_up"], closes[3]["bytes_down"], closes[3]["reason"]) == (1000, 1000, "stopped")
    assert [(b["id"], b["listen"], b["upstream"], b["bytes_up"], b["bytes_down"]) for b in bridges] == [
        (3, fp.address, upstream, 1000, 1000)
    ]
    assert bridges[0]["client"] == closes[3]["client"] and bridges[0]["seconds"] >= 0
    assert events("open_bridges")[-1]["bridges"] == 1
    (summary,) = events("summary")
    assert (summary["accepted"], summary["refused"], summary["upstream_failures"]) == (3, 1, 1)
    assert (summary["bytes_up"], summary["bytes_down"]) == (51_000, 51_000)


# -- 7. SIGUSR1 ------------------------------------------------------------------------------


@pytest.mark.signals
def test_sigusr1_lists_each_open_bridge(forwarders, echo):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    fp = forwarders("127.0.0.1:0", upstream)
    one = socket.create_connection(hostport(fp.address), timeout=10)
    two = socket.create_connection(hostport(fp.address), timeout=10)
    try:
        for c, size in ((one, 1000), (two, 2500)):
            c.sendall(b"u" * size)
            assert recv_exactly(c, size) == b"u" * size
        # Each bridge's id, as its open line gave it.
        assert wait_for(lambda: len([l for l in fp.lines if OPEN_LINE.search(l)]) == 2, 5)
        ids = {m.group(2): m.group(1) for m in map(OPEN_LINE.search, list(fp.lines)) if m}
        assert set(ids) == {peer_text(one), peer_text(two)} and set(ids.values()) == {"1", "2"}

        lines, total = listing(fp, lambda t: t.endswith("2 bridges open, 3500 bytes up and 3500 down so far"))
        assert total == "tcptotcp: 2 bridges open, 3500 bytes up and 3500 down so far"
        listed = [m.groups() for m in map(BRIDGE_LINE.search, lines) if m]
        expected = [
            (fp.address, ids[peer_text(one)], peer_text(one), upstream, "1000", "1000"),
            (fp.address, ids[peer_text(two)], peer_text(two), upstream, "2500", "2500"),
        ]
        assert [(g[0], g[1], g[2], g[3], g[5], g[6]) for g in listed] == sorted(expected, key=lambda e: e[1])
        assert all(float(g[4]) >= 0 for g in listed)

        first_id = ids[peer_text(one)]
        one.close()
        fp.wait_log(r"#%s close .* closed after" % first_id)
        lines, total = listing(fp, lambda t: t.startswith("tcptotcp: 1 bridges open"))
        assert total == "tcptotcp: 1 bridges open, 2500 bytes up and 2500 down so far"
        assert [m.group(2) for m in map(BRIDGE_LINE.search, lines) if m] == [ids[peer_text(two)]]
        assert fp.terminate() < 5 and fp.proc.returncode == 0
        assert_whole_lines(fp.lines)
    finally:
        one.close()
        two.close()


# -- 8. keepalive ----------------------------------------------------------------------------

KEEPALIVE_ARGS = ("--keepalive", "30", "--keepalive-interval", "5", "--keepalive-count", "3")


def _ss_seconds(text: str) -> float:
    """ss's timer text: 29sec, 1min29sec, 2.404ms (2.404 s), 120min, 200ms."""
    m = re.fullmatch(r"(?:(\d+)min)?(?:(\d+)(sec|\.))?(?:(\d+)ms)?", text)
    assert m, text
    minutes, secs, sep, msecs = m.groups()
    return int(minutes or 0) * 60 + int(secs or 0) + int(msecs or 0) / 1000


def _ss_timers(filter_expr: str) -> List[Tuple[int, int, Optional[str], Optional[float]]]:
    """(local port, peer port, timer name, its seconds) of established TCP sockets matching."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", filter_expr], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    rows = []
    for line in out.splitlines():
        ports = re.search(r"\S+:(\d+)\s+\S+:(\d+)", line)
        if not ports:
            continue
        timer = re.search(r"timer:\((\w+),([^,]+),\d+\)", line)
        rows.append(
            (
                int(ports.group(1)),
                int(ports.group(2)),
                timer.group(1) if timer else None,
                _ss_seconds(timer.group(2)) if timer else None,
            )
        )
    return rows


@pytest.mark.skipif(not LINUX or shutil.which("ss") is None, reason="reads TCP timers with ss (iproute2)")
def test_keepalive_timer_on_both_sockets_of_a_bridge(forwarders, echo):  # noqa: F811
    echo_port = echo.address[1]
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo_port}", *KEEPALIVE_ARGS)
    listen_port = hostport(fp.address)[1]
    with socket.create_connection(hostport(fp.address), timeout=10) as c:
        c.sendall(b"k" * 100)
        assert recv_exactly(c, 100) == b"k" * 100
        client_port = c.getsockname()[1]
        # The forwarder's two sockets: the one it accepted, the one it connected upstream.
        ours = f"( sport = :{listen_port} or dport = :{echo_port} )"

        def keepalive_on_both() -> List[Tuple[int, int, Optional[str], Optional[float]]]:
            rows = _ss_timers(ours)
            return rows if len(rows) == 2 and all(r[2] == "keepalive" for r in rows) else []

        rows = wait_for(keepalive_on_both, 5, interval=0.1)
        assert rows, _ss_timers(ours)
        assert {(r[0], r[1]) for r in rows if r[0] == listen_port} == {(listen_port, client_port)}
        for row in rows:
            assert 20 <= row[3] <= 30, row  # --keepalive 30, not the system's 2 hours
        # The test's own sockets, which set nothing, have no keepalive timer.
        others = _ss_timers(f"( sport = :{client_port} or sport = :{echo_port} )")
        assert len(others) == 2 and all(r[2] != "keepalive" for r in others), others


def _borrow_fd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2): a duplicate of another process's descriptor (Linux 5.6+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    new = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd: 438 on every architecture
    if new < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(new)


Options = Tuple[int, int, int, int, int]  # SO_KEEPALIVE, TCP_KEEPIDLE, _KEEPINTVL, _KEEPCNT, TCP_USER_TIMEOUT (ms)
SocketKey = Tuple[Tuple[str, int], Optional[Tuple[str, int]]]  # (its address, its peer's or None)


def socket_options(pid: int) -> Dict[SocketKey, Options]:
    """The dead-peer options of every IPv4 TCP socket process `pid` holds, read on duplicates
    of its descriptors; skips the test where this process may not take them."""
    found: Dict[SocketKey, Options] = {}
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                fd = _borrow_fd(pidfd, int(name))
            except FileNotFoundError:
                continue  # closed meanwhile
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    continue
                pytest.skip(f"cannot borrow the forwarder's sockets (pidfd_getfd): {exc}")
            with socket.socket(fileno=fd) as s:
                if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer: Optional[Tuple[str, int]] = s.getpeername()
                except OSError:
                    peer = None
                found[(s.getsockname(), peer)] = (
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
    finally:
        os.close(pidfd)
    return found


def bridge_options(fp: ForwarderProcess, echo_server: EchoServer) -> Dict[str, Options]:
    """A new client's bridge through `fp`, and the options of the three sockets that carry it
    in the forwarder: its listener, the one it accepted, the one it connected upstream."""
    listen = hostport(fp.address)
    with socket.create_connection(listen, timeout=10) as c:
        c.sendall(b"k" * 100)
        assert recv_exactly(c, 100) == b"k" * 100
        upstream_end = echo_server._conns[-1]  # the echo server's end of this bridge's upstream socket
        found = socket_options(fp.proc.pid)
        roles = {
            "listener": (listen, None),
            "client side": (listen, c.getsockname()),
            "upstream side": (upstream_end.getpeername(), upstream_end.getsockname()),
        }
        assert all(key in found for key in roles.values()), (roles, sorted(found))
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0  # the test's own socket set nothing
    return {role: found[key] for role, key in roles.items()}


def system_defaults() -> Options:
    """What a fresh TCP socket has (the keepalive numbers are the sysctl defaults)."""
    with socket.socket() as s:
        return (
            s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


needs_pidfd = pytest.mark.skipif(not LINUX or not hasattr(os, "pidfd_open"), reason="pidfd_getfd(2) is Linux's")


@pytest.mark.proc
@needs_pidfd
def test_keepalive_and_user_timeout_options_on_the_forwarders_sockets(forwarders, echo):  # noqa: F811
    fp = forwarders("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}", *KEEPALIVE_ARGS, "--user-timeout", "2.5")
    assert bridge_options(fp, echo) == dict.fromkeys(("listener", "client side", "upstream side"), (1, 30, 5, 3, 2500))


DEAD_PEER_TOML = "keepalive = 30\nkeepalive_interval = 5\nkeepalive_count = 3\nuser_timeout = 2.5\n"


@pytest.mark.proc
@pytest.mark.signals
@needs_pidfd
def test_sighup_gives_new_clients_added_keepalive_options(forwarders, echo, tmp_path):  # noqa: F811
    config = tmp_path / "tcptotcp.toml"
    table = forward_table("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
    write_atomically(config, table)
    fp = forwarders("--config", str(config))
    before = bridge_options(fp, echo)
    assert before["client side"] == before["upstream side"] == system_defaults()
    write_atomically(config, table + DEAD_PEER_TOML)
    fp.proc.send_signal(signal.SIGHUP)
    fp.wait_log(r"reloaded: 0 added, 0 removed, 1 changed")
    after = bridge_options(fp, echo)
    assert after["client side"] == after["upstream side"] == (1, 30, 5, 3, 2500)


@pytest.mark.proc
@pytest.mark.signals
@needs_pidfd
def test_sighup_takes_removed_keepalive_options_off_new_clients(forwarders, echo, tmp_path):  # noqa: F811
    config = tmp_path / "tcptotcp.toml"
    table = forward_table("127.0.0.1:0", f"127.0.0.1:{echo.address[1]}")
    write_atomically(config, table + DEAD_PEER_TOML)
    fp = forwarders("--config", str(config))
    before = bridge_options(fp, echo)
    assert before["client side"] == before["upstream side"] == (1, 30, 5, 3, 2500)
    default = system_defaults()

    # Keepalive stays; its interval and count and the user timeout go back to the defaults.
    write_atomically(config, table + "keepalive = 30\n")
    fp.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: sum("reloaded: 0 added, 0 removed, 1 changed" in l for l in fp.lines) == 1, 10)
    after = bridge_options(fp, echo)
    assert after["upstream side"] == (1, 30, default[2], default[3], 0)
    assert after["client side"] == after["upstream side"]

    # No keepalive at all (the idle numbers do not matter then).
    write_atomically(config, table)
    fp.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: sum("reloaded: 0 added, 0 removed, 1 changed" in l for l in fp.lines) == 2, 10)
    after = bridge_options(fp, echo)
    assert after["upstream side"] == default
    assert (after["client side"][0], after["client side"][4]) == (0, 0)
