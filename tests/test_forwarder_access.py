"""Who the forwarder serves and where it sends them, end to end over each backend.

``--allow``/``--deny``, failover, round robin and back-off between upstreams, PROXY headers sent
(``--send-proxy``) and read (``--accept-proxy``), and ``--config`` with several forwards: each
test runs ``python -m tcptotcp`` (the `forwarders` fixture) against upstreams it owns on
loopback, and checks what the client got, what the upstream saw and what the log says.

The PROXY headers are built and read here from the haproxy spec (proxy-protocol.txt), not with
``tcptotcp._proxy``: the forwarder's bytes are checked against an independent reading.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

from helpers import IPV6_OK, recv_exactly
from test_forwarder import EchoServer, ForwarderProcess, echo, forwarders  # noqa: F401  (fixtures)


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


pytestmark = [pytest.mark.unix, pytest.mark.signals]

needs_ipv6 = pytest.mark.skipif(not IPV6_OK, reason="no ::1 on this machine")

CLOSE = r"#%d close %s -> %s: (\d+) bytes up, (\d+) down, \w+ after"


# -- PROXY protocol, from the spec ------------------------------------------------------------

V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # section 2.2, byte by byte
V1_MAX = 107  # section 2.1: the longest v1 line, CRLF included
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"  # version 2, LOCAL; UNSPEC; no address block


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def proxy_v1(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` for a TCP connection."""
    proto = "TCP6" if _family(source[0]) == socket.AF_INET6 else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def proxy_v2(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """The binary header, PROXY command: 0x21, then 0x11 (TCP over IPv4) or 0x21 (over IPv6),
    the address block's length, source and destination addresses, source and destination ports."""
    family = _family(source[0])
    block = (
        socket.inet_pton(family, source[0])
        + socket.inet_pton(family, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    fam = 0x11 if family == socket.AF_INET else 0x21
    return V2_SIGNATURE + bytes((0x21, fam)) + struct.pack("!H", len(block)) + block


def _recv_n(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError(f"EOF after {data!r}")
        data += chunk
    return data


def _check_v1(line: bytes) -> None:
    fields = line[:-2].split(b" ")
    if fields[0] != b"PROXY" or len(line) > V1_MAX:
        raise ValueError(f"not a v1 line: {line!r}")
    if fields[1:] == [b"UNKNOWN"]:
        return
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ValueError(f"bad v1 line: {line!r}")
    version = 4 if fields[1] == b"TCP4" else 6
    for host in fields[2:4]:
        address = ipaddress.ip_address(host.decode("ascii"))
        if address.version != version or address.compressed.encode() != host:
            raise ValueError(f"bad v1 address {host!r}")
    for port in fields[4:6]:
        if not port.isdigit() or (port.startswith(b"0") and port != b"0") or int(port) > 65535:
            raise ValueError(f"bad v1 port {port!r}")


def read_proxy_header(conn: socket.socket) -> bytes:
    """Read exactly one PROXY header (v1 or v2, told by its first byte) and not a byte more."""
    first = _recv_n(conn, 1)
    if first == b"P":
        line = first
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ValueError(f"no CRLF in {line!r}")
            line += _recv_n(conn, 1)
        _check_v1(line)
        return line
    fixed = first + _recv_n(conn, 15)
    if fixed[:12] != V2_SIGNATURE or fixed[12] >> 4 != 2:
        raise ValueError(f"not a v2 header: {fixed!r}")
    (length,) = struct.unpack_from("!H", fixed, 14)
    return fixed + _recv_n(conn, length)


# -- upstreams, clients, log ----------------------------------------------------------------


class Upstream(EchoServer):
    """An echo upstream that counts the connections it accepted; with ``proxy=True`` it first
    reads one PROXY header per connection into ``headers`` and echoes only what follows."""

    def __init__(self, proxy: bool = False) -> None:
        self.proxy = proxy
        self.headers: List[bytes] = []
        self.errors: List[str] = []
        super().__init__()

    @property
    def accepted(self) -> int:
        return len(self._conns)

    @property
    def text(self) -> str:
        return f"127.0.0.1:{self.address[1]}"

    def _echo(self, conn: socket.socket) -> None:  # type: ignore[override]
        if self.proxy:
            conn.settimeout(10)
            try:
                self.headers.append(read_proxy_header(conn))
            except (OSError, ValueError) as exc:
                self.errors.append(repr(exc))
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            conn.settimeout(None)
        EchoServer._echo(conn)


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    made: List[Upstream] = []

    def make(proxy: bool = False) -> Upstream:
        made.append(Upstream(proxy))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def dead_port() -> Iterator[Callable[[], int]]:
    """Loopback ports that refuse connections: bound, never listening (and so no one else's)."""
    held: List[socket.socket] = []

    def make() -> int:
        sock = socket.socket()
        held.append(sock)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

    yield make
    for sock in held:
        sock.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., socket.socket]]:
    """Connect to a forwarder (optionally from a given loopback source address); all closed at the end."""
    opened: List[socket.socket] = []

    def connect(to: Union[ForwarderProcess, str], source: Optional[str] = None) -> socket.socket:
        address = to if isinstance(to, str) else to.address  # a forwarder, or one of its listen addresses
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            opened.append(sock)
            sock.settimeout(10)
            sock.connect(address[len("unix:") :])
            return sock
        host, port = address.rsplit(":", 1)
        host = host.strip("[]")
        sock = socket.socket(_family(host))
        opened.append(sock)
        sock.settimeout(10)
        if source is not None:
            sock.bind((source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, int(port)))
        return sock

    yield connect
    for sock in opened:
        sock.close()


def peer_text(sock: socket.socket) -> str:
    """The client's address as the forwarder logs it."""
    if sock.family == socket.AF_INET6:
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}"
    host, port = sock.getsockname()
    return f"{host}:{port}"


def roundtrip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload), timeout=10) == payload


def hang_up(sock: socket.socket) -> str:
    """Close a served client (its bridge ends and logs its close line); its address, as logged."""
    who = re.escape(peer_text(sock)) if sock.family != socket.AF_UNIX else r"unix:\S*"
    sock.close()
    return who


def assert_cut_off(sock: socket.socket, within: float = 2.0) -> float:
    """The forwarder closed this client (EOF or reset) within `within` seconds; how long it took."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    except socket.timeout:
        raise AssertionError(f"still open after {within} s") from None
    assert data == b"", data
    return time.monotonic() - started


def stop(fp: ForwarderProcess) -> List[str]:
    """SIGTERM; the summary lines it wrote on the way out."""
    fp.terminate()
    assert fp.proc.returncode == 0, fp.lines
    return [line for line in fp.lines if re.search(r"served \d+ connections", line)]


def matching(fp: ForwarderProcess, pattern: str) -> List[str]:
    return [line for line in list(fp.lines) if re.search(pattern, line)]


def run_cli(backend_name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if backend_name == "pure":
        env["TCPTOTCP_NO_EXTENSIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "tcptotcp", *args], capture_output=True, text=True, timeout=30, env=env
    )


# -- 1, 2: --allow / --deny -------------------------------------------------------------------


def test_allow_one_address_serves_it_and_refuses_the_rest(forwarders, upstreams, clients):  # noqa: F811
    up = upstreams()
    fp = forwarders("127.0.0.1:0", up.text, "--allow", "127.0.0.2", "--log-level", "info")
    other = clients(fp, "127.0.0.3")
    other.sendall(b"let me in")
    assert_cut_off(other)
    fp.wait_log(r"#1 %s: refused: " % re.escape(peer_text(other)))
    plain = clients(fp)  # 127.0.0.1 is not 127.0.0.2 either
    assert_cut_off(plain)
    fp.wait_log(r"#2 %s: refused: " % re.escape(peer_text(plain)))
    assert up.accepted == 0
    allowed = clients(fp, "127.0.0.2")
    roundtrip(allowed, b"allowed" * 1000)
    fp.wait_log(CLOSE % (3, hang_up(allowed), re.escape(up.text)))
    assert up.accepted == 1  # the refused clients never reached it (they came first)
    assert stop(fp) == [
        "tcptotcp: served 3 connections (0 upstream failures, 2 refused), 7000 bytes up, 7000 bytes down"
    ]


def test_deny_wins_over_allow(forwarders, upstreams, clients):  # noqa: F811
    up = upstreams()
    fp = forwarders("127.0.0.1:0", up.text, "--allow", "127.0.0.0/8", "--deny", "127.0.0.3", "--log-level", "info")
    denied = clients(fp, "127.0.0.3")
    assert_cut_off(denied)
    fp.wait_log(r"#1 %s: refused: " % re.escape(peer_text(denied)))
    for n, source in enumerate(("127.0.0.2", "127.0.0.1"), start=2):
        c = clients(fp, source)
        roundtrip(c, b"in the /8")
        fp.wait_log(CLOSE % (n, hang_up(c), re.escape(up.text)))
    assert up.accepted == 2
    assert len(matching(fp, r"refused")) == 1
    assert stop(fp) == ["tcptotcp: served 3 connections (0 upstream failures, 1 refused), 18 bytes up, 18 bytes down"]


@needs_ipv6
@pytest.mark.parametrize(
    "option, network, served",
    [("--deny", "::1", False), ("--allow", "::1", True), ("--allow", "127.0.0.0/8", False)],
    ids=["deny-::1", "allow-::1", "allow-ipv4-only"],
)
def test_ipv6_clients(forwarders, upstreams, clients, option, network, served):  # noqa: F811
    up = upstreams()
    fp = forwarders("[::1]:0", up.text, option, network, "--log-level", "info")
    assert fp.address.startswith("[::1]:")
    c = clients(fp)
    assert peer_text(c).startswith("[::1]:")
    if served:
        roundtrip(c, b"six")
        fp.wait_log(CLOSE % (1, hang_up(c), re.escape(up.text)))
    else:
        assert_cut_off(c)
        fp.wait_log(r"#1 %s: refused: " % re.escape(peer_text(c)))
    assert up.accepted == (1 if served else 0)
    assert stop(fp) == [
        f"tcptotcp: served 1 connections (0 upstream failures, {0 if served else 1} refused), "
        f"{3 if served else 0} bytes up, {3 if served else 0} bytes down"
    ]


@pytest.mark.parametrize("option", ["--allow", "--deny"])
@pytest.mark.parametrize("value", ["nonsense", "10.0.0.1/8", "127.0.0.0/33", "::1/129"])
def test_bad_network_exits_2_naming_it(backend, option, value):
    proc = run_cli(backend.name, "127.0.0.1:0", "127.0.0.1:9", option, value)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], proc.stderr
    assert value in lines[0], lines[0]
    assert "listening" not in proc.stderr


@pytest.mark.parametrize("option", ["--allow", "--deny"])
def test_access_list_needs_an_ip_listener(backend, socket_dir, option):
    path = os.path.join(socket_dir, "in.sock")
    proc = run_cli(backend.name, f"unix:{path}", "127.0.0.1:9", option, "127.0.0.1")
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "unix" in lines[0], proc.stderr
    assert not os.path.exists(path)


# -- 3-6: several upstreams -------------------------------------------------------------------


def test_failover_to_the_second_upstream(forwarders, upstreams, dead_port, clients):  # noqa: F811
    dead = f"127.0.0.1:{dead_port()}"
    up = upstreams()
    fp = forwarders("127.0.0.1:0", dead, up.text, "--log-level", "info")
    assert f"forwarding to {dead}, {up.text}, balance first" in fp.lines[0]
    c = clients(fp)
    roundtrip(c, b"failed over")
    client = hang_up(c)
    fp.wait_log(r"#1 %s: upstream %s failed: .*refused" % (client, re.escape(dead)))
    fp.wait_log(CLOSE % (1, client, re.escape(up.text)))
    assert not matching(fp, "every upstream failed")
    assert up.accepted == 1
    assert stop(fp) == ["tcptotcp: served 1 connections (1 upstream failures, 0 refused), 11 bytes up, 11 bytes down"]


def test_roundrobin_spreads_clients_evenly(forwarders, upstreams, clients):  # noqa: F811
    ups = [upstreams() for _ in range(3)]
    fp = forwarders("127.0.0.1:0", *(u.text for u in ups), "--balance", "roundrobin", "--log-level", "info")
    for n in range(1, 10):
        c = clients(fp)
        roundtrip(c, b"turn %d" % n)
        # Each client starts at the next upstream, in the order given.
        fp.wait_log(CLOSE % (n, hang_up(c), re.escape(ups[(n - 1) % 3].text)))
    assert [u.accepted for u in ups] == [3, 3, 3]
    assert stop(fp)[0].startswith("tcptotcp: served 9 connections (0 upstream failures, 0 refused)")


@pytest.mark.parametrize("backoff", [None, "0"], ids=["default-backoff", "no-backoff"])
def test_backoff_skips_a_dead_upstream(forwarders, upstreams, dead_port, clients, backoff):  # noqa: F811
    dead = f"127.0.0.1:{dead_port()}"
    up = upstreams()
    extra = [] if backoff is None else ["--upstream-backoff", backoff]
    fp = forwarders("127.0.0.1:0", dead, up.text, "--log-level", "info", *extra)
    for n in range(1, 4):
        c = clients(fp)
        roundtrip(c, b"client %d" % n)
        fp.wait_log(CLOSE % (n, hang_up(c), re.escape(up.text)))
    failed = [re.search(r"#(\d+) ", line).group(1) for line in matching(fp, r"upstream %s failed" % re.escape(dead))]
    # Skipped for 10 s after the first client's failure, or tried again for every client.
    assert failed == (["1"] if backoff is None else ["1", "2", "3"]), fp.lines
    assert up.accepted == 3
    assert stop(fp)[0].startswith(f"tcptotcp: served 3 connections ({len(failed)} upstream failures, 0 refused)")


def test_every_upstream_dead(forwarders, dead_port, clients):  # noqa: F811
    dead = [f"127.0.0.1:{dead_port()}" for _ in range(2)]
    fp = forwarders("127.0.0.1:0", *dead, "--log-level", "info")
    c = clients(fp)
    assert_cut_off(c)
    client = re.escape(peer_text(c))
    fp.wait_log(r"#1 %s: every upstream failed" % client)
    for d in dead:
        assert len(matching(fp, r"#1 %s: upstream %s failed" % (client, re.escape(d)))) == 1
    assert not matching(fp, r" open ")
    assert stop(fp) == ["tcptotcp: served 1 connections (2 upstream failures, 0 refused), 0 bytes up, 0 bytes down"]


@pytest.fixture
def unanswering_port() -> Iterator[Tuple[int, Callable[[], None]]]:
    """A loopback port whose listener's accept queue is full, so a new SYN is dropped and a
    connect() to it stays in progress; and a function that closes it, so the next SYN
    retransmission is answered with a reset: an upstream that refuses *after a delay*."""
    listener = socket.socket()
    held = [listener]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):  # fill the accept queue (never accepted)
            filler = socket.socket()
            held.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.1)

        def close() -> None:
            for sock in held:
                sock.close()

        yield port, close
    finally:
        for sock in held:
            sock.close()


def test_an_upstream_refusing_after_a_delay_leaves_no_timer_behind(forwarders, clients, unanswering_port):  # noqa: F811
    port, refuse_from_now = unanswering_port
    up = f"127.0.0.1:{port}"
    fp = forwarders("127.0.0.1:0", up, "--connect-timeout", "2", "--log-level", "info")
    first = clients(fp)
    client = re.escape(peer_text(first))
    time.sleep(0.2)  # the forwarder's SYN is in flight, unanswered
    refuse_from_now()  # its retransmission (about 1 s after the first) gets a reset
    took = assert_cut_off(first, within=5.0)
    if matching(fp, r"#1 .* failed: timed out"):
        pytest.skip("no SYN retransmission before --connect-timeout here")
    fp.wait_log(r"#1 %s: upstream %s failed: .*refused" % (client, re.escape(up)))
    time.sleep(max(0.0, 2.0 - took) + 0.5)  # past the connect timeout of the first attempt
    assert fp.proc.poll() is None, fp.lines[-12:]
    second = clients(fp)  # still serving: refused at once by the (now closed) port
    assert_cut_off(second)
    fp.wait_log(r"#2 %s: upstream %s failed: .*refused" % (re.escape(peer_text(second)), re.escape(up)))
    assert stop(fp) == ["tcptotcp: served 2 connections (2 upstream failures, 0 refused), 0 bytes up, 0 bytes down"]


# -- 7: --send-proxy --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "unix"])
def test_send_proxy_header_then_payload(forwarders, upstreams, clients, socket_dir, version, kind):  # noqa: F811
    if kind == "tcp6" and not IPV6_OK:
        pytest.skip("no ::1 on this machine")
    listen = {"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0", "unix": f"unix:{socket_dir}/in.sock"}[kind]
    up = upstreams(proxy=True)
    fp = forwarders(listen, up.text, "--send-proxy", version, "--log-level", "info")
    c = clients(fp, "127.0.0.2" if kind == "tcp4" else None)
    payload = os.urandom(100_000)
    roundtrip(c, payload)
    if kind == "unix":
        expected = V1_UNKNOWN if version == "v1" else V2_LOCAL
    else:
        source, listener = c.getsockname()[:2], c.getpeername()[:2]
        assert source[0] == ("127.0.0.2" if kind == "tcp4" else "::1")
        expected = (proxy_v1 if version == "v1" else proxy_v2)(source, listener)
        if kind == "tcp4":  # the builders, against the layout spelled out by hand
            ports = struct.pack("!HH", source[1], listener[1])
            assert expected == (
                b"PROXY TCP4 127.0.0.2 127.0.0.1 %d %d\r\n" % (source[1], listener[1])
                if version == "v1"
                else b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + b"\x7f\x00\x00\x02\x7f\x00\x00\x01" + ports
            )
    assert up.headers == [expected]
    assert up.errors == []
    m = fp.wait_log(CLOSE % (1, hang_up(c), re.escape(up.text)))
    assert (int(m.group(1)), int(m.group(2))) == (len(payload), len(payload))  # the header is not counted


# -- 8: --accept-proxy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "received, sent, source, destination",
    [
        ("v1", "v1", ("192.0.2.7", 1234), ("198.51.100.20", 443)),
        ("v2", "v2", ("2001:db8::7", 1234), ("2001:db8::20", 443)),
        ("v2", "v1", ("192.0.2.7", 1234), ("198.51.100.20", 443)),
        ("v1", "v2", ("2001:db8::7", 1234), ("2001:db8::20", 443)),
    ],
    ids=["v1-in-v1-out", "v2-in-v2-out-ipv6", "v2-in-v1-out", "v1-in-v2-out-ipv6"],
)
def test_accept_proxy_header_names_the_client(forwarders, upstreams, clients, received, sent, source, destination):  # noqa: F811
    up = upstreams(proxy=True)
    fp = forwarders("127.0.0.1:0", up.text, "--accept-proxy", "--send-proxy", sent, "--log-level", "info")
    build = {"v1": proxy_v1, "v2": proxy_v2}
    c = clients(fp)
    payload = b"after the header " * 100
    c.sendall(build[received](source, destination))
    roundtrip(c, payload)
    assert up.headers == [build[sent](source, destination)]  # the header's client, not 127.0.0.1
    c.close()
    shown = f"[{source[0]}]:{source[1]}" if ":" in source[0] else f"{source[0]}:{source[1]}"
    fp.wait_log(r"#1 open %s -> %s$" % (re.escape(shown), re.escape(up.text)))
    m = fp.wait_log(CLOSE % (1, re.escape(shown), re.escape(up.text)))
    assert int(m.group(1)) == len(payload)


def _pieces(header: bytes) -> List[bytes]:
    """A header cut inside its first word (or signature), in the middle and just before its end."""
    return [header[:3], header[3:13], header[13:-1], header[-1:]]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("how", ["split", "with-payload"])
def test_accept_proxy_header_split_or_followed_by_payload(forwarders, upstreams, clients, version, how):  # noqa: F811
    up = upstreams()  # a plain echo: whatever reaches it comes back
    fp = forwarders("127.0.0.1:0", up.text, "--accept-proxy", "--log-level", "info")
    header = (proxy_v1 if version == "v1" else proxy_v2)(("192.0.2.7", 40000), ("192.0.2.1", 80))
    payload = b"GET / HTTP/1.0\r\n\r\n" + os.urandom(5000)
    c = clients(fp)
    if how == "split":
        for piece in _pieces(header):
            c.sendall(piece)
            time.sleep(0.05)
        c.sendall(payload)
    else:
        c.sendall(header + payload)  # one packet: the forwarder must take the header and no more
    assert recv_exactly(c, len(payload), timeout=10) == payload
    c.close()
    m = fp.wait_log(CLOSE % (1, re.escape("192.0.2.7:40000"), re.escape(up.text)))
    assert (int(m.group(1)), int(m.group(2))) == (len(payload), len(payload))
    assert up.accepted == 1


BAD_CLIENTS = {
    # what the client sends, and whether it is refused only when --proxy-timeout ends
    "garbage": (b"GET / HTTP/1.0\r\n\r\n", False),
    "oversized-v1": (b"PROXY UNKNOWN " + b"a" * 200, False),  # a valid start, but no CRLF in 107 bytes
    "oversized-v2": (V2_SIGNATURE + b"\x21\x11\xff\xff", False),  # declares a 64 KiB header
    "silent": (b"", True),
    "stalled-mid-header": (b"PROXY TCP4 192.0.2.7 19", True),
    "eof-mid-header": (b"PROXY TCP4 192.0.2.7 19", False),  # then shutdown(SHUT_WR)
}


@pytest.mark.parametrize("name", list(BAD_CLIENTS))
def test_accept_proxy_refuses_bad_clients_without_connecting(forwarders, upstreams, clients, name):  # noqa: F811
    data, timed = BAD_CLIENTS[name]
    up = upstreams()
    # A short --proxy-timeout where it is what refuses; a long one where the refusal must come at once.
    timeout = "0.5" if timed else "5"
    fp = forwarders("127.0.0.1:0", up.text, "--accept-proxy", "--proxy-timeout", timeout, "--log-level", "info")
    bad = clients(fp)
    if data:
        bad.sendall(data)
    if name == "eof-mid-header":
        bad.shutdown(socket.SHUT_WR)
    took = assert_cut_off(bad, within=3.0)
    if timed:
        assert took >= 0.3, took
    fp.wait_log(r"#1 %s: refused: .*PROXY header" % re.escape(peer_text(bad)))
    assert up.accepted == 0
    good = clients(fp)
    good.sendall(proxy_v1(("192.0.2.9", 9), ("192.0.2.1", 80)))
    roundtrip(good, b"fine")
    good.close()
    fp.wait_log(CLOSE % (2, re.escape("192.0.2.9:9"), re.escape(up.text)))
    assert up.accepted == 1  # only the good client reached the upstream
    assert stop(fp) == ["tcptotcp: served 2 connections (0 upstream failures, 1 refused), 4 bytes up, 4 bytes down"]


def test_accept_proxy_with_allow_checks_the_header_source(forwarders, upstreams, clients):  # noqa: F811
    up = upstreams()
    fp = forwarders("127.0.0.1:0", up.text, "--accept-proxy", "--allow", "192.0.2.0/24", "--log-level", "info")
    outsider = clients(fp)
    outsider.sendall(proxy_v1(("198.51.100.1", 5555), ("192.0.2.1", 80)))
    assert_cut_off(outsider)
    fp.wait_log(r"#1 198\.51\.100\.1:5555: refused: ")
    assert up.accepted == 0
    insider = clients(fp)  # from 127.0.0.1 too, which the list does not allow: the header decides
    insider.sendall(proxy_v2(("192.0.2.9", 6666), ("192.0.2.1", 80)))
    roundtrip(insider, b"inside")
    insider.close()
    fp.wait_log(CLOSE % (2, re.escape("192.0.2.9:6666"), re.escape(up.text)))
    assert up.accepted == 1
    assert stop(fp) == ["tcptotcp: served 2 connections (0 upstream failures, 1 refused), 6 bytes up, 6 bytes down"]


# -- 9: --config ------------------------------------------------------------------------------


def _listening(fp: ForwarderProcess, count: int, timeout: float = 10.0) -> List[Tuple[str, str]]:
    """(listen address, upstreams) of the first `count` "listening on" lines."""
    pattern = re.compile(r"listening on (\S+), forwarding to (.+?)(?:, balance \w+)? \(backend")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m.groups() for m in map(pattern.search, list(fp.lines)) if m]
        if len(found) >= count:
            return found[:count]
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} listening lines in {fp.lines}")


def _config_forward(listen: str, upstreams: Sequence[str], **options: str) -> str:
    ups = ", ".join(f'"{u}"' for u in upstreams)
    lines = [
        "[[forward]]",
        f'listen = "{listen}"',
        f"upstream = [{ups}]" if len(upstreams) > 1 else f"upstream = {ups}",
    ]
    lines += [f"{key} = {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n\n"


def test_config_with_two_forwards(forwarders, upstreams, clients, tmp_path):  # noqa: F811
    a, b, c = upstreams(), upstreams(), upstreams()
    path = tmp_path / "forwards.toml"
    path.write_text(
        'log_level = "info"\n\n'
        + _config_forward("127.0.0.1:0", [a.text], allow='"127.0.0.2"')
        + _config_forward("127.0.0.2:0", [b.text, c.text], balance='"roundrobin"'),
        encoding="utf-8",
    )
    fp = forwarders("--config", str(path))
    found = {ups: listen for listen, ups in _listening(fp, 2)}
    first, second = found[a.text], found[f"{b.text}, {c.text}"]
    assert first.startswith("127.0.0.1:") and second.startswith("127.0.0.2:")
    served = clients(first, "127.0.0.2")
    roundtrip(served, b"one")
    fp.wait_log(CLOSE % (1, hang_up(served), re.escape(a.text)))
    refused = clients(first, "127.0.0.3")
    assert_cut_off(refused)  # the first forward's allow list, not the second's
    fp.wait_log(r"#2 %s: refused: " % re.escape(peer_text(refused)))
    for n, up in enumerate((b, c), start=1):  # round robin over b and c
        served = clients(second, "127.0.0.3")
        roundtrip(served, b"two %d" % n)
        fp.wait_log(CLOSE % (n, hang_up(served), re.escape(up.text)))
    assert (a.accepted, b.accepted, c.accepted) == (1, 1, 1)
    assert sorted(stop(fp)) == [
        f"tcptotcp: {first}: served 2 connections (0 upstream failures, 1 refused), 3 bytes up, 3 bytes down",
        f"tcptotcp: {second}: served 2 connections (0 upstream failures, 0 refused), 10 bytes up, 10 bytes down",
    ]


def test_config_two_port_zero_forwards_written_alike(forwarders, upstreams, clients, tmp_path):  # noqa: F811
    a, b = upstreams(), upstreams()
    path = tmp_path / "forwards.toml"
    path.write_text(
        _config_forward("127.0.0.1:0", [a.text]) + _config_forward("127.0.0.1:0", [b.text]), encoding="utf-8"
    )
    fp = forwarders("--config", str(path), "--log-level", "info")
    found = {ups: listen for listen, ups in _listening(fp, 2)}
    first, second = found[a.text], found[b.text]
    fp.proc.send_signal(signal.SIGHUP)  # the same file again: nothing to change
    assert fp.wait_log(r"reloaded: .*").group(0) == "reloaded: 0 added, 0 removed, 0 changed"
    for n in (1, 2):
        for listen, up in ((first, a), (second, b)):  # each forward still goes to its own upstream
            served = clients(listen)
            roundtrip(served, b"to %d" % n)
            fp.wait_log(CLOSE % (n, hang_up(served), re.escape(up.text)))
    assert (a.accepted, b.accepted) == (2, 2)
    assert sorted(stop(fp)) == [
        f"tcptotcp: {listen}: served 2 connections (0 upstream failures, 0 refused), 8 bytes up, 8 bytes down"
        for listen in sorted((first, second))
    ]


def test_config_unknown_key_exits_2_before_listening(backend, tmp_path, socket_dir):
    never = os.path.join(socket_dir, "never.sock")
    path = tmp_path / "bad.toml"
    path.write_text(
        _config_forward(f"unix:{never}", ["127.0.0.1:9"])
        + _config_forward("127.0.0.1:0", ["127.0.0.1:9"], balanse='"roundrobin"'),
        encoding="utf-8",
    )
    proc = run_cli(backend.name, "--config", str(path))
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "'balanse'" in lines[0] and "forward 2" in lines[0], lines[0]
    assert "listening" not in proc.stderr
    assert not os.path.exists(never)  # forward 1 was valid, but nothing listens before all are checked
