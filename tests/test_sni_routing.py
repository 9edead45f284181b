"""Routing TLS clients by the server name in their ClientHello (--route-sni), without terminating
TLS, over both listener implementations: real TLS clients (Python ``ssl``), real TLS upstreams
that terminate and echo, the hello split byte by byte, and clients refused with a reason."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

import tcptotcp
from test_forwarder_ops import wait_for

NAMES = ("db.example.com", "*.example.com", "*.b.example.com", "other.test", "localhost")


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Tuple[str, str]:
    """A self-signed certificate for every name the tests use (made with the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    san = ",".join(f"DNS:{name}" for name in NAMES)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "2", "-subj", "/CN=tcptotcp-test", "-addext", f"subjectAltName={san}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


class TlsEchoServer:
    """An upstream that terminates TLS and echoes, its own tag first, so a test knows which
    upstream a client reached and that its bytes arrived intact."""

    def __init__(self, tag: bytes, certificate: Tuple[str, str]) -> None:
        self.tag = tag
        self.accepted = 0
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*certificate)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.text = f"127.0.0.1:{self.address[1]}"
        self._closing = threading.Event()
        self._threads: List[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                first = True
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return
                    tls.sendall(self.tag + b":" + data if first else data)
                    first = False
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def upstreams(certificate) -> Iterator[List[TlsEchoServer]]:
    servers = [TlsEchoServer(tag, certificate) for tag in (b"A", b"B", b"C")]
    yield servers
    for server in servers:
        server.close()


class _Serving:
    def __init__(self, backend, upstream, **options) -> None:
        bridge_class = None if backend.name == "cython" else backend.Bridge
        self.fwd = tcptotcp.Forwarder("127.0.0.1:0", upstream, bridge_class=bridge_class, **options)
        self.thread = threading.Thread(target=self.fwd.serve_forever, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.fwd.listener_kind is not None, 10)

    def close(self) -> None:
        self.fwd.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _client_context(certificate: Tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certificate[0])
    return context


def _ask(address, certificate, server_name: Optional[str], payload: bytes = b"hello") -> bytes:
    """A TLS round trip through the forwarder: what came back (the upstream's tag and the payload)."""
    context = _client_context(certificate)
    if server_name is None:
        context.check_hostname = False  # (no SNI is sent for an address)
    with socket.create_connection(address, timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name or "127.0.0.1") as tls:
            tls.sendall(payload)
            want = 2 + len(payload)
            got = b""
            while len(got) < want:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got


def _refused(address, data: bytes, wait: float = 10.0) -> bool:
    """True if the forwarder closed a client that sent `data` without a byte back."""
    with socket.create_connection(address, timeout=wait) as c:
        c.sendall(data)
        try:
            return c.recv(100) == b""
        except ConnectionResetError:
            return True


def _fds() -> Optional[int]:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_routes_by_exact_wildcard_and_default(backend, upstreams, certificate):
    a, b, c = upstreams
    served = _Serving(backend, a.text, route_sni=[f"db.example.com={b.text}", f"*.example.com={c.text}"])
    try:
        address = served.fwd.address
        assert _ask(address, certificate, "db.example.com") == b"B:hello"  # exact beats the wildcard
        assert _ask(address, certificate, "www.example.com") == b"C:hello"
        assert _ask(address, certificate, "a.b.example.com") == b"C:hello"
        assert _ask(address, certificate, "DB.Example.COM") == b"B:hello"  # names have no case
        assert _ask(address, certificate, "other.test") == b"A:hello"  # no route names it
        assert _ask(address, certificate, None) == b"A:hello"  # no SNI at all
        # Bulk after the hello is relayed untouched (and still spliced by the loops).
        payload = os.urandom(1 << 20)
        with socket.create_connection(address, timeout=10) as raw:
            with _client_context(certificate).wrap_socket(raw, server_hostname="db.example.com") as tls:
                tls.sendall(payload)
                got = b""
                while len(got) < len(payload) + 2:
                    chunk = tls.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
        assert len(got) == len(payload) + 2 and zlib.crc32(got) == zlib.crc32(b"B:" + payload)
        assert served.fwd.stats.refused == 0
    finally:
        served.close()


def test_strict_refuses_what_no_route_names(backend, upstreams, certificate, caplog):
    a, b, _ = upstreams
    caplog.set_level(logging.WARNING, logger="tcptotcp")
    served = _Serving(backend, a.text, route_sni=[f"db.example.com={b.text}"], route_sni_strict=True)
    try:
        address = served.fwd.address
        assert _ask(address, certificate, "db.example.com") == b"B:hello"
        for name in ("other.test", None):
            with pytest.raises((ssl.SSLError, OSError)):
                _ask(address, certificate, name)
        assert wait_for(lambda: served.fwd.stats.refused == 2, 10)
        # (The log line is written just after the count: wait for it too.)
        assert wait_for(lambda: "refused: no route for server name (none)" in caplog.text, 10)
        assert "refused: no route for server name 'other.test'" in caplog.text
        assert a.accepted == 0  # never reached an upstream
    finally:
        served.close()


def test_a_hello_split_byte_by_byte(backend, upstreams, certificate):
    a, b, _ = upstreams
    served = _Serving(backend, a.text, route_sni=[f"db.example.com={b.text}"])
    try:
        incoming = ssl.MemoryBIO()
        outgoing = ssl.MemoryBIO()
        tls = _client_context(certificate).wrap_bio(incoming, outgoing, server_hostname="db.example.com")
        with socket.create_connection(served.fwd.address, timeout=10) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            hello = outgoing.read()
            assert len(hello) > 100
            for i in range(len(hello)):  # one segment per byte
                raw.sendall(hello[i : i + 1])
                time.sleep(0.001)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pending = outgoing.read()
                    if pending:
                        raw.sendall(pending)
                    data = raw.recv(65536)
                    assert data, "closed during the handshake"
                    incoming.write(data)
            raw.sendall(outgoing.read())
            tls.write(b"split")
            raw.sendall(outgoing.read())
            got = b""
            while b"B:split" not in got and time.monotonic() < deadline:
                data = raw.recv(65536)
                assert data
                incoming.write(data)
                try:
                    got += tls.read(65536)
                except ssl.SSLWantReadError:
                    continue
            assert got == b"B:split"
    finally:
        served.close()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"GET / HTTP/1.1\r\nHost: db.example.com\r\n\r\n", "bad ClientHello: not TLS (first byte 0x47)"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad ClientHello: not a ClientHello (handshake type 2)"),
        (b"\x16\x03\x01\x50\x00", "bad ClientHello: TLS record too long (20480 bytes, at most 16384)"),
    ],
    ids=["http", "server-hello", "oversized"],
)
def test_not_a_client_hello_is_refused(backend, upstreams, certificate, caplog, data, why):
    a, b, _ = upstreams
    caplog.set_level(logging.WARNING, logger="tcptotcp")
    served = _Serving(backend, a.text, route_sni=[f"db.example.com={b.text}"])
    try:
        before = _fds()
        assert _refused(served.fwd.address, data)
        assert wait_for(lambda: served.fwd.stats.refused == 1 and served.fwd.stats.active == 0, 10)
        assert wait_for(lambda: f"refused: {why}" in caplog.text, 10)  # (written just after the count)
        assert a.accepted == b.accepted == 0
        if before is not None:
            assert wait_for(lambda: _fds() == before, 10), "a refused client left an fd behind"
    finally:
        served.close()


def test_a_hello_that_never_ends_times_out(backend, upstreams, certificate, caplog):
    a, b, _ = upstreams
    caplog.set_level(logging.WARNING, logger="tcptotcp")
    served = _Serving(backend, a.text, route_sni=[f"db.example.com={b.text}"], proxy_timeout=0.5)
    try:
        started = time.monotonic()
        assert _refused(served.fwd.address, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert time.monotonic() - started < 8
        assert wait_for(lambda: "refused: no complete ClientHello in time" in caplog.text, 10)
        assert a.accepted == b.accepted == 0
    finally:
        served.close()


def test_route_options_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="expected NAME=UPSTREAM"):
        tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:1", route_sni=["db.example.com"])
    with pytest.raises(ValueError, match="bad route pattern"):
        tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:1", route_sni=["db..example.com=127.0.0.1:2"])
    with pytest.raises(ValueError, match="TCP listener"):
        tcptotcp.Forwarder(f"unix:{tmp_path / 's'}", "127.0.0.1:1", route_sni=["a.test=127.0.0.1:2"])
