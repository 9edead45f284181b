"""Upstreams written as host names follow DNS (``_resolve``, ``--resolve-interval``).

The pieces (which upstreams are names, the candidates of a name and their texts, the order of
addresses) against the real getaddrinfo, on ``localhost`` and IP literals. The forwarder
in-process over both listener implementations: a name with two addresses balanced as two
upstreams, a name with no address refused with its reason. And the whole feature as an operator
meets it: ``python -m tcptotcp LISTEN svc.t2t.test:PORT --resolve-interval 0.2`` in a mount
namespace of its own, whose ``/etc/hosts`` the test rewrites (skipped where ``unshare -m`` and
``mount --bind`` are not allowed), once per listener implementation.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

import tcptotcp
from tcptotcp import _resolve
from tcptotcp._address import Address, ordered
from tcptotcp._config import ConfigError, load_config
from tcptotcp.cli import _specs_from_args, forward_parser

NAME = "svc.t2t.test"  # only ever in the test's own hosts file
UNKNOWN = "nosuch.invalid"  # RFC 6761: never resolves
INTERVAL = "0.2"

# -- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:80", ("localhost", 80)),
        ("db.internal:5432", ("db.internal", 5432)),
        ("127.0.0.1:80", None),
        ("127.1:80", None),  # inet_aton's short form is an address too, not a name
        ("[::1]:80", None),
        ("unix:/run/x.sock", None),
        ("unix:host:80", None),
    ],
)
def test_host_of_tells_names_from_addresses(text: str, expected: Optional[Tuple[str, int]]) -> None:
    address = Address(socket.AF_INET, ("127.0.0.1", 80), text)
    assert _resolve.host_of(address) == expected


def test_lookup_of_localhost_is_deduplicated_and_in_a_stable_order() -> None:
    found = _resolve.lookup("localhost", 8080)
    assert (socket.AF_INET, ("127.0.0.1", 8080)) in found
    assert len(set(found)) == len(found)
    # The order does not depend on the order of the answer (DNS servers rotate it).
    assert ordered(list(reversed(found)) + list(found)) == found


def test_ordered_keeps_the_preferred_family_first_then_sorts_by_address() -> None:
    v4 = [(socket.AF_INET, (f"10.0.0.{n}", 80)) for n in (9, 10, 2)]
    v6 = [(socket.AF_INET6, ("fd00::5", 80, 0, 0))]
    assert ordered(v6 + v4 + v4) == (v6[0], v4[2], v4[0], v4[1])
    assert ordered(v4 + v6) == (v4[2], v4[0], v4[1], v6[0])


def test_parse_keeps_every_address_of_a_name() -> None:
    parsed = Address.parse_upstream("localhost:80@3")
    assert parsed.weight == 3 and parsed.text == "localhost:80"
    assert parsed.resolved == _resolve.lookup("localhost", 80)
    assert Address.parse("127.0.0.1:80").resolved == ((socket.AF_INET, ("127.0.0.1", 80)),)


def test_an_unknown_name_is_an_error_only_when_strict() -> None:
    with pytest.raises(ValueError, match=rf"^'{UNKNOWN}:80': cannot resolve '{UNKNOWN}'"):
        Address.parse_upstream(f"{UNKNOWN}:80")
    lenient = Address.parse_upstream(f"{UNKNOWN}:80@2", strict=False)
    assert lenient.unresolved and lenient.text == f"{UNKNOWN}:80" and lenient.weight == 2
    assert lenient.sockaddr == (UNKNOWN, 80) and lenient.resolved == ()
    with pytest.raises(ValueError, match="port 'x' is not a number"):  # a typo stays an error
        Address.parse_upstream(f"{UNKNOWN}:x", strict=False)


def test_candidates_and_their_texts() -> None:
    name = Address(socket.AF_INET, ("10.0.0.5", 5432), "db.internal:5432", weight=4)
    one = [(socket.AF_INET, ("10.0.0.5", 5432))]
    (only,) = _resolve.candidates(name, one)
    assert (only.text, only.sockaddr, only.weight) == ("db.internal:5432", ("10.0.0.5", 5432), 4)  # unchanged
    two = one + [(socket.AF_INET6, ("fd00::5", 5432, 0, 0))]
    assert [(c.text, c.family, c.weight) for c in _resolve.candidates(name, two)] == [
        ("db.internal:5432 (10.0.0.5)", socket.AF_INET, 4),
        ("db.internal:5432 ([fd00::5])", socket.AF_INET6, 4),
    ]
    (none,) = _resolve.candidates(name, [])
    assert none.text == "db.internal:5432" and _resolve.is_no_address(none) and not _resolve.is_no_address(only)


def test_a_no_address_candidate_fails_at_once() -> None:
    family, sockaddr = _resolve.NO_ADDRESS
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        assert sock.connect_ex(sockaddr) not in (0, errno.EINPROGRESS)  # failed, and at once


def test_expand_puts_each_names_candidates_in_its_place() -> None:
    literal = Address.parse("127.0.0.1:1")
    name = Address(socket.AF_UNSPEC, ("a.test", 2), "a.test:2")
    other = Address(socket.AF_UNSPEC, ("b.test", 3), "b.test:3")
    found = {"a.test:2": ((socket.AF_INET, ("10.0.0.1", 2)), (socket.AF_INET, ("10.0.0.2", 2))), "b.test:3": ()}
    texts = [c.text for c in _resolve.expand([name, literal, other], found)]
    assert texts == ["a.test:2 (10.0.0.1)", "a.test:2 (10.0.0.2)", "127.0.0.1:1", "b.test:3"]


# -- the front doors ----------------------------------------------------------------------------


def cli_spec(*args: str):  # type: ignore[no-untyped-def]
    parser = forward_parser()
    (spec,) = _specs_from_args(parser, parser.parse_args(list(args)))
    return spec


def test_cli_options(capsys: pytest.CaptureFixture[str]) -> None:
    spec = cli_spec("127.0.0.1:0", f"{UNKNOWN}:80", "--resolve-interval", "2.5")
    assert (spec.resolve_interval, spec.resolve_strict) == (2.5, False)
    assert spec.upstream_addresses[0].unresolved
    assert spec.forwarder_kwargs()["resolve_interval"] == 2.5
    for args in (["--resolve-strict"], ["--resolve-interval", "0"]):
        with pytest.raises(SystemExit) as info:
            cli_spec("127.0.0.1:0", f"{UNKNOWN}:80", *args)
        assert info.value.code == 2
        assert f"cannot resolve '{UNKNOWN}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_spec("127.0.0.1:0", "127.0.0.1:80", "--resolve-interval", "-1")
    assert "--resolve-interval: expected a number from 0 to 86400, got -1" in capsys.readouterr().err


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    forward = f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "{UNKNOWN}:80"\n'
    path.write_text("resolve_interval = 5\n" + forward, encoding="utf-8")
    (spec,) = load_config(str(path)).forwards
    assert spec.resolve_interval == 5.0 and spec.upstream_addresses[0].unresolved
    path.write_text(forward + "resolve_strict = true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"forward 1 .*key 'upstream': '{UNKNOWN}:80': cannot resolve"):
        load_config(str(path))
    path.write_text(forward + "resolve_interval = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot resolve"):
        load_config(str(path))


# -- in-process, both listeners ---------------------------------------------------------------


class Upstream:
    """A TCP server that says who it is (`tag`, one byte) to each client, then echoes."""

    def __init__(self, host: str, tag: bytes, port: int = 0) -> None:
        self.tag = tag
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._conns: List[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            conn.sendall(self.tag)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
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
        self._thread.join(5)
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def two_upstreams() -> Tuple[Upstream, Upstream]:
    """Two servers on one port, at 127.0.0.2 and 127.0.0.3 (a name maps to addresses, not ports)."""
    for _ in range(20):
        a = Upstream("127.0.0.2", b"A")
        try:
            return a, Upstream("127.0.0.3", b"B", a.port)
        except OSError:  # that port is taken on 127.0.0.3: another one
            a.close()
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


@pytest.fixture
def upstreams() -> Iterator[Tuple[Upstream, Upstream]]:
    a, b = two_upstreams()
    yield a, b
    a.close()
    b.close()


def tag_of(address: Tuple[str, int]) -> bytes:
    """Which upstream a new client of the forward at `address` reaches: its tag, or b"" if closed."""
    with socket.create_connection(address, timeout=5) as client:
        return client.recv(1)


class Serving:
    def __init__(self, forwarder: tcptotcp.Forwarder) -> None:
        self.forwarder = forwarder
        self.thread = threading.Thread(target=forwarder.serve_forever, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while forwarder.listener_kind is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.forwarder.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_a_name_with_two_addresses_is_balanced_as_two_upstreams(forward_backend, upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = upstreams
    # As Address.parse makes it for a name with two addresses (resolve_interval 0: the name,
    # known only here, is not looked up again).
    name = Address(
        socket.AF_INET,
        ("127.0.0.2", a.port),
        f"{NAME}:{a.port}",
        resolved=((socket.AF_INET, ("127.0.0.2", a.port)), (socket.AF_INET, ("127.0.0.3", a.port))),
    )
    forwarder = tcptotcp.Forwarder(
        "127.0.0.1:0", name, balance="roundrobin", resolve_interval=0, bridge_class=forward_backend.Bridge
    )
    serving = Serving(forwarder)
    try:
        assert forwarder.listener_kind == forward_backend.listener
        assert [u.text for u in forwarder.options.upstreams] == [
            f"{NAME}:{a.port} (127.0.0.2)",
            f"{NAME}:{a.port} (127.0.0.3)",
        ]
        tags = [tag_of(forwarder.address) for _ in range(4)]
        assert sorted(tags) == [b"A", b"A", b"B", b"B"], tags
        assert not [t for t in threading.enumerate() if t.name.startswith("tcptotcp-resolve")]
    finally:
        serving.close()


def test_a_name_without_an_address_is_down_from_the_listeners_first_client(forward_backend, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Down in the options the listener starts with (and is reconfigured to), not marked down
    after it: a client accepted at once is never balanced to it."""
    from tcptotcp._listener import open_listener

    a, _ = upstreams
    forwarder = tcptotcp.Forwarder(
        "127.0.0.1:0",
        [f"{UNKNOWN}:{a.port}", f"127.0.0.2:{a.port}"],
        resolve_interval=30,
        bridge_class=forward_backend.Bridge,
    )
    sock = socket.create_server(("127.0.0.1", 0))
    listener = open_listener(sock, forwarder.options, forwarder.bridge_class)
    try:
        assert (listener.upstream_down(0), listener.upstream_down(1)) == (True, False)
        # A reload that adds it back (a fresh state in the listener) is down at once too.
        forwarder.reconfigure(f"127.0.0.2:{a.port}")
        listener.configure(forwarder.options)
        assert listener.upstream_down(0) is False
        forwarder.reconfigure([f"127.0.0.3:{a.port}", f"{UNKNOWN}:{a.port}"], resolve_interval=30)
        listener.configure(forwarder.options)
        assert (listener.upstream_down(0), listener.upstream_down(1)) == (False, True)
    finally:
        listener.stop()
        listener.take()
        listener.close()
        sock.close()
        forwarder.close()


def test_a_name_without_an_address_refuses_with_its_reason(forward_backend, upstreams, caplog) -> None:  # type: ignore[no-untyped-def]
    a, _ = upstreams
    caplog.set_level("INFO", logger="tcptotcp")
    forwarder = tcptotcp.Forwarder(
        "127.0.0.1:0",
        [f"{UNKNOWN}:{a.port}", f"127.0.0.2:{a.port}"],
        resolve_interval=30,
        bridge_class=forward_backend.Bridge,
    )
    serving = Serving(forwarder)
    try:
        assert forwarder.upstream_states() == {f"{UNKNOWN}:{a.port}": False, f"127.0.0.2:{a.port}": True}
        # Skipped while another upstream is up: no client is sent to it.
        assert [tag_of(forwarder.address) for _ in range(3)] == [b"A"] * 3
        assert forwarder.stats.upstream_failures == 0
        assert f"upstream {UNKNOWN}:{a.port} has no address yet" in caplog.text
        assert [t for t in threading.enumerate() if t.name == f"tcptotcp-resolve {forwarder.address_text}"]
        # Alone, it is tried and fails at once, with the reason.
        forwarder.reconfigure(f"{UNKNOWN}:{a.port}", resolve_interval=30)
        assert tag_of(forwarder.address) == b""
        refused = re.compile(rf"#\d+ \S+: upstream {re.escape(UNKNOWN)}:{a.port} has no address yet$", re.M)
        deadline = time.monotonic() + 5
        while not refused.search(caplog.text) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert refused.search(caplog.text), caplog.text
        assert forwarder.stats.upstream_failures == 1
    finally:
        serving.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("tcptotcp-resolve")]


# -- the forwarder as a process, in a mount namespace with its own /etc/hosts ------------------


def _namespace_works(tmp: Path) -> Optional[str]:
    """None where `unshare -m` with a bind mount over /etc/hosts works here, else why not."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "needs Linux's unshare(1)"
    probe = tmp / "probe-hosts"
    probe.write_text(f"127.0.0.2 {NAME}\n")
    try:
        run = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind {probe} /etc/hosts && getent hosts {NAME}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -m failed: {exc}"
    if run.returncode != 0 or "127.0.0.2" not in run.stdout:
        return f"unshare -m with mount --bind is not allowed here: {run.stderr.strip() or run.returncode}"
    return None


@pytest.fixture(scope="module")
def namespace(tmp_path_factory: pytest.TempPathFactory) -> None:
    why = _namespace_works(tmp_path_factory.mktemp("ns"))
    if why is not None:
        pytest.skip(why)


class Hosts:
    """The forwarder's /etc/hosts: rewritten in place (it is bind-mounted: a rename would leave
    the mount on the old file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("127.0.0.1 localhost\n")

    def set(self, *addresses: str) -> None:
        lines = "127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in addresses)
        with open(self.path, "r+") as file:
            file.truncate(0)
            file.write(lines)


class NamespacedForwarder:
    """``python -m tcptotcp`` in its own mount namespace, /etc/hosts and /etc/nsswitch.conf
    (files only: a name the file lacks fails at once, without asking a DNS server)."""

    LISTENING = re.compile(r"listening on (\S+), forwarding to (.*) \(backend")

    def __init__(self, hosts: Hosts, listener: str, *args: str, wait: bool = True) -> None:
        nsswitch = hosts.path.with_name("nsswitch.conf")
        nsswitch.write_text("hosts: files\n")
        mounts = f"mount --bind {hosts.path} /etc/hosts"
        if os.path.exists("/etc/nsswitch.conf"):
            mounts += f" && mount --bind {nsswitch} /etc/nsswitch.conf"
        env = dict(os.environ)
        env.pop("TCPTOTCP_ACCEPT_IN_PYTHON", None)
        if listener == "python":
            env["TCPTOTCP_ACCEPT_IN_PYTHON"] = "1"
        argv = [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", *args, "--log-level", "info"]
        self.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address: Tuple[str, int] = ("", 0)
        self.upstreams = ""
        if wait:
            try:
                found = self.wait_for(self.LISTENING, 20)
            except BaseException:
                self.close()
                raise
            host, port = found.group(1).rsplit(":", 1)
            self.address, self.upstreams = (host, int(port)), found.group(2)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 10) -> re.Match:
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = compiled.search(line)
                if found:
                    return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {compiled.pattern!r} in {self.lines}")

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture(params=["loops", "python"])
def listener(request: pytest.FixtureRequest) -> str:
    """Which listener serves the forward in the process (TCPTOTCP_ACCEPT_IN_PYTHON)."""
    if request.param == "loops" and tcptotcp.BACKEND != "cython":
        pytest.skip("compiled core not built")
    return str(request.param)


@pytest.fixture
def hosts(namespace: None, tmp_path: Path) -> Hosts:
    return Hosts(tmp_path / "hosts")


@pytest.fixture
def forwarders() -> Iterator[List[NamespacedForwarder]]:
    started: List[NamespacedForwarder] = []
    yield started
    for forwarder in started:
        forwarder.close()


def until(tags: bytes, address: Tuple[str, int], timeout: float = 10) -> List[bytes]:
    """New clients until one reaches an upstream in `tags`; every tag seen (the last one of them)."""
    seen: List[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(tag_of(address))
        if seen[-1] and seen[-1] in tags:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no client reached {tags!r} within {timeout} s: {seen}")


def test_new_clients_follow_a_changed_address_open_bridges_stay(hosts, upstreams, listener, forwarders) -> None:  # type: ignore[no-untyped-def]
    a, b = upstreams
    hosts.set("127.0.0.2")
    fwd = NamespacedForwarder(hosts, listener, f"{NAME}:{a.port}", "--resolve-interval", INTERVAL)
    forwarders.append(fwd)
    assert fwd.upstreams == f"{NAME}:{a.port}"  # one address: the text as written
    early = socket.create_connection(fwd.address, timeout=5)
    try:
        assert early.recv(1) == b"A"
        hosts.set("127.0.0.3")
        fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port} now 127\.0\.0\.3 \(was 127\.0\.0\.2\)")
        assert until(b"B", fwd.address)[-1] == b"B"
        assert all(tag_of(fwd.address) == b"B" for _ in range(3))
        # The bridge opened before the change still reaches A, both ways.
        early.sendall(b"still here")
        received = b""
        while len(received) < len(b"still here"):
            chunk = early.recv(64)
            assert chunk, "the early bridge was closed"
            received += chunk
        assert received == b"still here"
    finally:
        early.close()
    assert fwd.count("now 127.0.0.3") == 1  # logged once, not every interval


def test_a_name_with_two_addresses_is_balanced_over_both(hosts, upstreams, listener, forwarders) -> None:  # type: ignore[no-untyped-def]
    a, b = upstreams
    hosts.set("127.0.0.2", "127.0.0.3")
    fwd = NamespacedForwarder(
        hosts, listener, f"{NAME}:{a.port}", "--resolve-interval", INTERVAL, "--balance", "roundrobin"
    )
    forwarders.append(fwd)
    assert fwd.upstreams.startswith(f"{NAME}:{a.port} (127.0.0.2), {NAME}:{a.port} (127.0.0.3)")
    tags = [tag_of(fwd.address) for _ in range(6)]
    assert sorted(tags) == [b"A"] * 3 + [b"B"] * 3, tags
    # Down to one address: that one, under the plain text.
    hosts.set("127.0.0.3")
    fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port} now 127\.0\.0\.3 \(was 127\.0\.0\.2, 127\.0\.0\.3\)")
    until(b"B", fwd.address)
    assert [tag_of(fwd.address) for _ in range(4)] == [b"B"] * 4
    close_line = fwd.wait_for(rf"close \S+ -> ({re.escape(NAME)}:{a.port}.*?): ").group(1)
    assert close_line.startswith(f"{NAME}:{a.port}")


def test_a_failed_lookup_keeps_the_last_good_addresses(hosts, upstreams, listener, forwarders) -> None:  # type: ignore[no-untyped-def]
    a, _ = upstreams
    hosts.set("127.0.0.2")
    fwd = NamespacedForwarder(hosts, listener, f"{NAME}:{a.port}", "--resolve-interval", INTERVAL)
    forwarders.append(fwd)
    hosts.set()  # the name is gone
    fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port}: cannot resolve it \(.*\); keeping 127\.0\.0\.2")
    time.sleep(1.0)  # five more failed rounds
    assert fwd.count("cannot resolve it") == 1  # once per streak
    assert [tag_of(fwd.address) for _ in range(3)] == [b"A"] * 3
    hosts.set("127.0.0.2")
    fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port} resolves again: 127\.0\.0\.2")
    hosts.set()
    deadline = time.monotonic() + 10
    while fwd.count("cannot resolve it") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fwd.count("cannot resolve it") == 2  # a new streak is logged again


def test_a_name_unknown_at_start_is_served_once_it_appears(hosts, upstreams, listener, forwarders) -> None:  # type: ignore[no-untyped-def]
    a, _ = upstreams
    fwd = NamespacedForwarder(hosts, listener, f"{NAME}:{a.port}", "--resolve-interval", INTERVAL)
    forwarders.append(fwd)
    fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port} has no address yet")
    assert tag_of(fwd.address) == b""  # closed: nowhere to go
    fwd.wait_for(rf"#\d+ \S+: upstream {re.escape(NAME)}:{a.port} has no address yet$")
    hosts.set("127.0.0.2")
    fwd.wait_for(rf"upstream {re.escape(NAME)}:{a.port} now 127\.0\.0\.2 \(was no address\)")
    assert until(b"A", fwd.address)[-1] == b"A"


def test_resolve_strict_refuses_to_start_with_an_unknown_name(hosts, listener, forwarders) -> None:  # type: ignore[no-untyped-def]
    fwd = NamespacedForwarder(hosts, listener, f"{NAME}:80", "--resolve-strict", wait=False)
    forwarders.append(fwd)
    assert fwd.proc.wait(20) == 2
    fwd._reader.join(5)
    assert any(f"tcptotcp: error: '{NAME}:80': cannot resolve '{NAME}'" in line for line in fwd.lines), fwd.lines
    assert not any("listening on" in line for line in fwd.lines)
