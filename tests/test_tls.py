"""TLS in the forwarder (issue 25): termination, origination, re-encryption, SNI certificates,
mutual TLS, verification, handshakes that fail or stall, reloads, option errors.

Every test runs over `forward_backend`'s three params: the loops' listener (handshakes and
records in C), and the pure listener (handshakes in Python) with either engine relaying. A
forward with a caller's own context is served by the pure listener everywhere.
Certificates are made here with the ``openssl`` command (no Python dependency); real clients
are Python's ``ssl`` and ``openssl s_client``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import tcptotcp
from helpers import recv_exactly
from tcptotcp._backend import tls_relay_text
from tcptotcp.forwarder import raise_fd_limit
from test_forwarder import EchoServer, ForwarderProcess, echo, forwarders  # noqa: F401  (fixtures)

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


@pytest.fixture
def backend(forward_backend):
    """Every test here runs over both listener implementations (see conftest.forward_backend)."""
    return forward_backend


# -- certificates ------------------------------------------------------------------------------

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_LEAF = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
_SERVER = "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"


class Certs:
    """A CA and what it signed (``server``: localhost and 127.0.0.1; ``other``: other.test;
    ``client``: CN=t2t-client), and a second CA (``rogue``) with a server certificate for
    localhost that the first CA does not vouch for. Each name is a .crt and a .key."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        self._ca("ca")
        self._ca("rogue")
        self._leaf("server", "ca", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n" + _SERVER)
        self._leaf("other", "ca", "other.test", "subjectAltName=DNS:other.test\n" + _SERVER)
        self._leaf("client", "ca", "t2t-client", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
        self._leaf("rogue-server", "rogue", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n" + _SERVER)

    def _run(self, *args: str) -> None:
        assert OPENSSL is not None
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60, cwd=self.dir)

    def _ca(self, name: str) -> None:
        self._run(
            "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3",
            "-subj", f"/CN={name}-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash",
        )  # fmt: skip

    def _leaf(self, name: str, ca: str, cn: str, extensions: str) -> None:
        (self.dir / f"{name}.ext").write_text(extensions + _LEAF)
        self._run("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        self._run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip

    def crt(self, name: str) -> str:
        return str(self.dir / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def client_context(self, cert: Optional[str] = None) -> ssl.SSLContext:
        """A client that trusts our CA (and presents `cert`, if given)."""
        context = ssl.create_default_context(cafile=self.crt("ca"))
        if cert is not None:
            context.load_cert_chain(self.crt(cert), self.key(cert))
        return context

    def server_context(self, name: str = "server", client_ca: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.crt(name), self.key(name))
        if client_ca:
            context.load_verify_locations(self.crt("ca"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


# -- peers ---------------------------------------------------------------------------------------


class TlsEchoServer:
    """A TLS echo upstream: each connection in a thread, handshake and all. With `proxy`, each
    connection first sends a PROXY v1 line in plaintext (kept in `.headers`)."""

    def __init__(self, context: ssl.SSLContext, proxy: bool = False) -> None:
        self.context = context
        self.proxy = proxy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.headers: List[bytes] = []
        self.handshakes = 0
        self.failures: List[str] = []
        self._conns: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def text(self) -> str:
        return f"127.0.0.1:{self.address[1]}"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.proxy:
                line = b""
                while not line.endswith(b"\r\n"):
                    byte = conn.recv(1)
                    if not byte:
                        return
                    line += byte
                self.headers.append(line)
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ValueError) as exc:
            self.failures.append(str(exc))
            return
        with self._lock:
            self.handshakes += 1
            self._conns.append(tls)
        try:
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                tls.sendall(data)
            tls.unwrap()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept(); a close alone does not)
        self.sock.close()
        self._acceptor.join(5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        for conn in conns:
            conn.close()


class LineServer:
    """A plain upstream for ``openssl s_client``: reads one line, answers with its SHA-256 and
    closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.text = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(20)
                line = b""
                try:
                    while not line.endswith(b"\n"):
                        data = conn.recv(4096)
                        if not data:
                            break
                        line += data
                    conn.sendall(b"sha256 " + hashlib.sha256(line).hexdigest().encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept(); a close alone does not)
        self.sock.close()
        self._thread.join(5)


# -- the forwarder in this process ---------------------------------------------------------------


class Records(logging.Handler):
    """The tcptotcp logger's records, from every thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def lines(self) -> List[str]:
        with self._lock2:
            return [r.getMessage() for r in self.records]

    def wait(self, words: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if words in line:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {words!r} in {self.lines()}")
            time.sleep(0.02)

    def event(self, name: str) -> List[Dict[str, Any]]:
        with self._lock2:
            return [r.fields for r in self.records if getattr(r, "event", None) == name]  # type: ignore[attr-defined]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("tcptotcp")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@contextlib.contextmanager
def serving(backend: Any, upstream: Any, **options: Any) -> Iterator[tcptotcp.Forwarder]:
    bridge_class = None if backend.name == "cython" else backend.Bridge
    fwd = tcptotcp.Forwarder("127.0.0.1:0", upstream, bridge_class=bridge_class, **options)
    thread = threading.Thread(target=fwd.serve_forever, daemon=True)
    thread.start()
    try:
        handshakes_in_python = any(options.get(name) for name in ("tls_context", "upstream_tls_context"))
        assert wait_until(lambda: fwd.listener_kind) == ("python" if handshakes_in_python else backend.listener)
        yield fwd
    finally:
        fwd.close()
        thread.join(10)
        assert not thread.is_alive()


def tls_client(fwd: tcptotcp.Forwarder, context: ssl.SSLContext, name: Optional[str] = "localhost") -> ssl.SSLSocket:
    raw = socket.create_connection(fwd.address, timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def checksummed_echo(sock: socket.socket, size: int) -> None:
    """`size` random bytes out and the same back, compared by SHA-256 both ways. One thread
    sends and receives, without blocking: a TLS socket must not be read and written by two
    threads at once."""
    payload = os.urandom(size)
    timeout = sock.gettimeout()
    sock.setblocking(False)
    sent, got = 0, bytearray()
    deadline = time.monotonic() + 60
    waiting = selectors.DefaultSelector()
    waiting.register(sock, selectors.EVENT_READ)
    try:
        while len(got) < size:
            moved = False
            if sent < size:
                try:
                    sent += sock.send(payload[sent : sent + 65536])
                    moved = True
                except _AGAIN:
                    pass
            try:
                data = sock.recv(65536)
                assert data, f"closed after {len(got)} of {size} bytes"
                got += data
                moved = True
            except _AGAIN:
                pass
            if not moved:
                assert time.monotonic() < deadline, f"{len(got)} of {size} bytes back ({sent} sent) in 60 s"
                # (a selector, not select.select: a test after many connections may hold fds past 1023)
                waiting.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if sent < size else 0))
                waiting.select(0.05)
    finally:
        waiting.close()
        sock.settimeout(timeout)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


SIZES = (1, 1000, 4 * 1024 * 1024)


def tls_failures(fwd: tcptotcp.Forwarder, metrics: Any, side: str) -> Dict[str, float]:
    """The forward's tcptotcp_tls_handshake_failures_total, by reason, for `side`."""
    found: Dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "tcptotcp_tls_handshake_failures_total" and sample.labels["side"] == side:
                if sample.labels["listen"] == fwd.address_text:
                    found[sample.labels["reason"]] = sample.value
    return found


def wait_until(probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    value = probe()
    while not value and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value


@pytest.fixture
def metrics() -> Any:
    pytest.importorskip("prometheus_client")
    from tcptotcp._metrics import Metrics

    return Metrics()


# -- termination, origination, re-encryption -------------------------------------------------------


def test_termination_relays_every_byte_both_ways(backend, certs, echo, records):  # noqa: F811
    upstream = f"127.0.0.1:{echo.address[1]}"
    with serving(backend, upstream, tls_cert=[certs.crt("server")], tls_key=[certs.key("server")]) as fwd:
        for size in SIZES:
            with tls_client(fwd, certs.client_context()) as client:
                version = client.version()
                assert version in ("TLSv1.2", "TLSv1.3")
                checksummed_echo(client, size)
                # The bridge runs: on pump threads only where the loops cannot relay its records.
                pumps = [t for t in threading.enumerate() if t.name.startswith("tcptotcp-pump")]
                in_the_loops = backend.name == "cython" and tls_relay_text() == "TLS records in the loops"
                assert (not pumps) == in_the_loops, pumps
        line = records.wait(" open ")
        assert f"-> {upstream} (TLS: {version} " in line and ", sni localhost)" in line
        opened = records.event("open")[0]
        assert opened["tls_version"] == version and opened["tls_sni"] == "localhost"
        assert opened["tls_cipher"] and "tls_client_subject" not in opened


def test_a_callers_own_contexts(backend, certs, records):
    upstream = TlsEchoServer(certs.server_context())
    try:
        server = certs.server_context()
        client = ssl.create_default_context(cafile=certs.crt("ca"))
        with serving(backend, upstream.text, tls_context=server, upstream_tls_context=client) as fwd:
            with tls_client(fwd, certs.client_context()) as sock:
                checksummed_echo(sock, 100_000)
            assert "upstream TLS: " in records.wait(" open ")
    finally:
        upstream.close()


def test_origination_verifies_the_upstream_and_relays_every_byte(backend, certs, records):
    upstream = TlsEchoServer(certs.server_context())
    try:
        # The upstream's own address is the name checked (its certificate has IP:127.0.0.1)...
        with serving(backend, upstream.text, upstream_tls=True, upstream_ca=certs.crt("ca")) as fwd:
            for size in SIZES:
                with socket.create_connection(fwd.address, timeout=10) as client:
                    checksummed_echo(client, size)
            line = records.wait(" open ")
            assert line.endswith(")") and "(upstream TLS: TLSv1." in line
            assert records.event("open")[0]["upstream_tls_version"].startswith("TLSv1.")
        # ... or the name given.
        with serving(
            backend, upstream.text, upstream_tls=True, upstream_ca=certs.crt("ca"), upstream_sni="localhost"
        ) as fwd:
            with socket.create_connection(fwd.address, timeout=10) as client:
                checksummed_echo(client, 1000)
        assert upstream.handshakes == len(SIZES) + 1
    finally:
        upstream.close()


def test_reencryption_with_the_certificate_sni_picks(backend, certs, records):
    upstream = TlsEchoServer(certs.server_context())
    try:
        with serving(
            backend,
            upstream.text,
            tls_cert=[certs.crt("server"), certs.crt("other")],
            tls_key=[certs.key("server"), certs.key("other")],
            upstream_tls=True,
            upstream_ca=certs.crt("ca"),
        ) as fwd:
            for size in SIZES:
                with tls_client(fwd, certs.client_context(), "other.test") as client:
                    assert client.getpeercert()["subject"] == ((("commonName", "other.test"),),)
                    checksummed_echo(client, size)
            line = records.wait(" open ")
            assert "sni other.test; upstream TLS: TLSv1." in line
    finally:
        upstream.close()


def test_sni_chooses_the_certificate_and_the_first_is_the_default(backend, certs, records):
    both = dict(tls_cert=[certs.crt("server"), certs.crt("other")], tls_key=[certs.key("server"), certs.key("other")])
    with serving(backend, "127.0.0.1:9", **both) as fwd:
        unchecked = certs.client_context()
        unchecked.check_hostname = False
        for name, subject in (("localhost", "localhost"), ("other.test", "other.test"), ("nobody.test", "localhost")):
            with tls_client(fwd, unchecked, name) as client:
                assert client.getpeercert()["subject"] == ((("commonName", subject),),)
        with tls_client(fwd, unchecked, None) as client:  # no SNI at all: the default
            assert client.getpeercert()["subject"] == ((("commonName", "localhost"),),)
        # And openssl's own client, verifying against the CA.
        for name in ("other.test", "localhost"):
            run = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{fwd.address[1]}", "-servername", name,
                 "-CAfile", certs.crt("ca"), "-verify_return_error", "-brief"],
                input="", capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            output = run.stdout + run.stderr
            assert f"CN = {name}" in output or f"CN={name}" in output, output
            assert "Verification: OK" in output, output


def test_openssl_s_client_through_a_terminating_forward(backend, certs, records):
    upstream = LineServer()
    try:
        with serving(backend, upstream.text, tls_cert=[certs.crt("server")], tls_key=[certs.key("server")]) as fwd:
            line = "a line from openssl s_client " * 100 + "\n"
            run = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"localhost:{fwd.address[1]}", "-servername", "localhost",
                 "-CAfile", certs.crt("ca"), "-verify_return_error", "-quiet"],
                input=line, capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            assert f"sha256 {hashlib.sha256(line.encode()).hexdigest()}" in run.stdout, (run.stdout, run.stderr)
    finally:
        upstream.close()


def strict(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context`, telling a connection's end without close_notify from one with it (Python 3.9's
    contexts set OP_IGNORE_UNEXPECTED_EOF, which makes both a clean end)."""
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


def is_a_cut(exc: ssl.SSLError) -> bool:
    """Whether a read failed on an end without close_notify (an SSLEOFError from 3.10 on)."""
    return isinstance(exc, ssl.SSLEOFError) or exc.reason == "UNEXPECTED_EOF_WHILE_READING"


def _read_to_the_end(tls: ssl.SSLSocket) -> str:
    """Read a socket wrapped with ``suppress_ragged_eofs=False`` to its end: "close_notify" if
    the peer ended the TLS stream, "cut" if it only closed the connection."""
    while True:
        try:
            if not tls.recv(65536):
                return "close_notify"
        except ssl.SSLError as exc:
            if not is_a_cut(exc):
                raise
            return "cut"


def test_the_end_of_a_terminated_bridge_is_a_close_notify_to_the_client(backend, certs, records):
    """The upstream answers and closes: the client reads the answer, then the TLS stream's end,
    not a bare FIN (which a strict client takes for a truncation)."""
    upstream = LineServer()
    try:
        with serving(backend, upstream.text, tls_cert=[certs.crt("server")], tls_key=[certs.key("server")]) as fwd:
            for size in (10, 300_000):
                raw = socket.create_connection(fwd.address, timeout=10)
                with strict(certs.client_context()).wrap_socket(
                    raw, server_hostname="localhost", suppress_ragged_eofs=False
                ) as client:
                    line = b"x" * size + b"\n"
                    client.sendall(line)
                    answer = b""
                    while not answer.endswith(b"\n"):
                        chunk = client.recv(4096)
                        assert chunk, answer
                        answer += chunk
                    assert answer == b"sha256 " + hashlib.sha256(line).hexdigest().encode() + b"\n"
                    assert _read_to_the_end(client) == "close_notify"
            assert wait_until(lambda: fwd.stats.active == 0), fwd.stats
    finally:
        upstream.close()


def test_an_upstream_reset_reaches_a_tls_client_as_a_cut(backend, certs, records):
    """No close_notify after an error: the client must not take a truncated stream for whole."""
    listener = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            with contextlib.suppress(OSError):
                conn.recv(100)
                conn.sendall(b"partial")
                time.sleep(0.1)  # (the bytes go first, then the reset)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with serving(backend, address, tls_cert=[certs.crt("server")], tls_key=[certs.key("server")]) as fwd:
            raw = socket.create_connection(fwd.address, timeout=10)
            with strict(certs.client_context()).wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            ) as client:
                client.sendall(b"request\n")
                assert recv_exactly(client, 7) == b"partial"
                assert _read_to_the_end(client) == "cut"
            assert " error after " in records.wait(" close ")
    finally:
        thread.join(20)
        listener.close()


@pytest.mark.parametrize("client", ["plain", "tls", "tls-cut"])
def test_the_end_of_an_originated_bridge_is_a_close_notify_to_the_upstream(backend, certs, records, client):
    """The client sends and closes: the TLS upstream reads every byte, then the end of the TLS
    stream. Re-encrypting, a TLS client that ends with close_notify passes it on; one that cuts
    its stream (a FIN without the alert: an end, "closed", as its socket takes it) passes on a
    cut, never an alert that would say the stream is whole."""
    listener = socket.create_server(("127.0.0.1", 0))
    ends: List[Any] = []

    def upstream() -> None:
        conn, _ = listener.accept()
        with strict(certs.server_context()).wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
            tls.settimeout(20)
            digest, total = hashlib.sha256(), 0
            while True:
                try:
                    data = tls.recv(65536)
                except ssl.SSLError as exc:
                    ends.append(("cut" if is_a_cut(exc) else str(exc), total, digest.hexdigest()))
                    return
                if not data:
                    ends.append(("close_notify", total, digest.hexdigest()))
                    return
                digest.update(data)
                total += len(data)

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    # What the kernel's buffers hold without the upstream reading: the alert goes out at once
    # (with more, it waits for room within the drain, a quarter of a second, which a loaded
    # machine's upstream thread may not make).
    payload = os.urandom(60_000)
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        terminate: Dict[str, Any] = {"tls_cert": [certs.crt("server")], "tls_key": [certs.key("server")]}
        options = terminate if client != "plain" else {}
        with serving(backend, address, upstream_tls=True, upstream_ca=certs.crt("ca"), **options) as fwd:
            if client == "plain":
                with socket.create_connection(fwd.address, timeout=10) as sock:
                    sock.sendall(payload)
            else:
                with tls_client(fwd, certs.client_context()) as tls:
                    tls.sendall(payload)
                    if client == "tls":
                        tls.unwrap()  # close_notify (and the forwarder's answer)
                    else:
                        socket.socket.shutdown(tls, socket.SHUT_WR)  # the FIN alone
                    # Open until the upstream saw the end: a close with the session tickets
                    # unread would reset the connection, which is not what this test is about.
                    thread.join(20)
            thread.join(20)
            assert not thread.is_alive()
            end = "cut" if client == "tls-cut" else "close_notify"
            assert ends == [(end, len(payload), hashlib.sha256(payload).hexdigest())], records.lines()
            assert " closed after " in records.wait(" close ")
    finally:
        listener.close()
        thread.join(5)


class SClient:
    """``openssl s_client`` in its interactive mode (a line "R" renegotiates, "k" asks for a key
    update, "Q" quits), its output read by a thread so that every wait has a deadline."""

    def __init__(self, port: int, certs: Certs, version: str) -> None:
        self.proc = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
             "-CAfile", certs.crt("ca"), "-verify_return_error", version],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def exchange(self, line: str, answer: Optional[str] = None) -> None:
        """Send a line and see `answer` (by default the line, echoed) in the output."""
        self.send(line)
        expected = line if answer is None else answer
        assert wait_until(lambda: any(expected in seen for seen in self.lines)), self.lines

    def __enter__(self) -> SClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def test_a_renegotiating_client_is_refused_and_a_key_update_passes(backend, certs, echo, records):  # noqa: F811
    """TLS 1.2: a client's renegotiation gets a no_renegotiation alert, its bridge ends and the
    next client is served. TLS 1.3: a key update in mid-stream changes nothing the peers see."""
    options = dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")])
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        with SClient(fwd.address[1], certs, "-tls1_2") as client:
            client.exchange("before renegotiation")
            client.exchange("R", "RENEGOTIATING")
            assert client.proc.wait(10) != 0
            assert any("no renegotiation" in line for line in client.lines), client.lines
        assert wait_until(lambda: fwd.stats.active == 0), fwd.stats
        ended = records.wait(" close ")
        # (the line and its newline)
        assert ended.startswith("#1 close ") and ": 21 bytes up, 21 down, error after " in ended, ended
        with SClient(fwd.address[1], certs, "-tls1_3") as client:
            client.exchange("before the key update")
            client.exchange("k", "KEYUPDATE")
            client.exchange("after the key update")
            client.send("Q")
            assert client.proc.wait(10) == 0, client.lines
        # (`active` is the listener's count: the bridge's end is recorded a moment later)
        assert wait_until(lambda: fwd.stats.bytes_up == fwd.stats.bytes_down == 21 + 22 + 21), fwd.stats
        assert (fwd.stats.accepted, fwd.stats.refused, fwd.stats.active) == (2, 0, 0), fwd.stats


def test_clients_that_reset_right_after_the_handshake_are_not_refusals(backend, certs, echo, records, metrics):  # noqa: F811
    """`openssl s_time -new` handshakes and resets at once (its session tickets unread): a client
    gone before its bridge started is a bridge that ended ("error"), not a refusal; refusals are
    only the handshakes it cut short."""
    options = dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], metrics=metrics)
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        run = subprocess.run(
            [OPENSSL, "s_time", "-new", "-connect", f"127.0.0.1:{fwd.address[1]}", "-time", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "connections" in run.stdout, (run.stdout, run.stderr)
        assert wait_until(lambda: fwd.stats.active == 0), fwd.stats
        assert fwd.stats.accepted > 10, fwd.stats
        assert not [line for line in records.lines() if "bridge not started" in line]
        assert fwd.stats.refused == sum(tls_failures(fwd, metrics, "client").values()), fwd.stats
        with tls_client(fwd, certs.client_context()) as client:
            checksummed_echo(client, 1000)


# -- who may not: mutual TLS, verification, garbage, stalls -----------------------------------------


def test_alpn_chooses_the_forwards_first_protocol_the_client_offers(backend, certs, echo, records):  # noqa: F811
    options = dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], tls_alpn=["h2,http/1.1"])
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        cases = ((["http/1.1", "h2"], "h2"), (["x", "http/1.1"], "http/1.1"), (["x"], None), ([], None))
        for n, (offered, chosen) in enumerate(cases, 1):
            context = certs.client_context()
            if offered:
                context.set_alpn_protocols(offered)
            with tls_client(fwd, context) as client:
                assert client.selected_alpn_protocol() == chosen, offered
                checksummed_echo(client, 1000)
            line = records.wait(f"#{n} open ")
            assert (f", alpn {chosen})" in line) if chosen else ("alpn" not in line), line


def test_a_thousand_tls_clients_at_once_without_a_thread_each(backend, certs, records):
    """1,000 TLS clients bridged at once: on the compiled backend no thread more than with one
    (the loops' listener handshakes and relays; the pure listener handshakes in its one thread)."""
    if backend.name != "cython":
        pytest.skip("the pure engine runs threads per bridge")
    raise_fd_limit()
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4 * 1000 + 200:
        pytest.skip("needs 4,200 fds")
    count = 1000
    upstream = socket.create_server(("127.0.0.1", 0), backlog=count + 100)
    socks: List[socket.socket] = []
    try:
        files = dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")])
        with serving(backend, f"127.0.0.1:{upstream.getsockname()[1]}", **files) as fwd:
            context = certs.client_context()
            threads = None
            for i in range(count):
                client = tls_client(fwd, context)
                socks.append(client)
                end, _ = upstream.accept()
                socks.append(end)
                message = f"client {i} ".encode() * 20
                client.sendall(message)
                assert recv_exactly(end, len(message)) == message
                end.sendall(message[::-1])
                assert recv_exactly(client, len(message)) == message[::-1]
                if threads is None:  # (the engine's loops run by now)
                    threads = set(threading.enumerate())
                if i % 100 == 99:
                    assert set(threading.enumerate()) <= threads, i
            assert fwd.stats.active == count
            for i in range(0, 2 * count, 2):  # every bridge still relays, both ways
                socks[i].sendall(b"again")
                assert recv_exactly(socks[i + 1], 5) == b"again"
            assert set(threading.enumerate()) <= threads
    finally:
        for sock in socks:
            sock.close()
        upstream.close()


def test_mutual_tls_refuses_a_client_without_a_certificate(backend, certs, echo, records, metrics):  # noqa: F811
    options = dict(
        tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], tls_client_ca=certs.crt("ca"), metrics=metrics
    )
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        with tls_client(fwd, certs.client_context("client")) as client:
            checksummed_echo(client, 200_000)
        line = records.wait(" open ")
        assert ", client CN=t2t-client)" in line
        assert records.event("open")[0]["tls_client_subject"] == "CN=t2t-client"
        served = len(echo._conns)
        # Without a certificate: refused (TLS 1.3 tells the client on its first read).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_client(fwd, certs.client_context()) as client:
                client.sendall(b"let me in")
                assert client.recv(100) == b""  # (or the alert raises)
                raise ConnectionError("closed")
        refused = records.wait("refused: TLS handshake failed: ")
        assert "certificate" in refused, refused
        assert wait_until(lambda: tls_failures(fwd, metrics, "client"))
        (reason,) = tls_failures(fwd, metrics, "client")
        assert "certificate" in reason, reason
        assert len(echo._conns) == served  # the upstream never saw it
        assert fwd.stats.refused == 1


def test_an_upstream_that_fails_verification_is_an_upstream_failure(backend, certs, records, metrics):
    rogue = TlsEchoServer(certs.server_context("rogue-server"))
    try:
        with serving(backend, rogue.text, upstream_tls=True, upstream_ca=certs.crt("ca"), metrics=metrics) as fwd:
            with socket.create_connection(fwd.address, timeout=10) as client:
                client.settimeout(10)
                assert client.recv(100) == b""  # closed: every upstream failed
            line = records.wait(f"upstream {rogue.text} failed: TLS handshake failed: certificate verify failed")
            assert "unable to get local issuer certificate" in line or "self" in line, line
            assert wait_until(lambda: tls_failures(fwd, metrics, "upstream")) == {"certificate_verify_failed": 1.0}
            assert wait_until(lambda: fwd.stats.accepted == 1) and fwd.stats.upstream_failures == 1
        # --upstream-insecure: no verification, and a loud warning at start.
        with serving(backend, rogue.text, upstream_tls=True, upstream_insecure=True) as fwd:
            records.wait("--upstream-insecure: the upstream's TLS certificate is NOT verified")
            with socket.create_connection(fwd.address, timeout=10) as client:
                checksummed_echo(client, 10_000)
    finally:
        rogue.close()


def test_each_upstream_failure_has_its_own_words(backend, certs, records, metrics):
    """An upstream that closes during the handshake, then one that refuses the connect: each
    failure is logged in its own words, and only the first counts as a TLS handshake failure."""
    closing = socket.create_server(("127.0.0.1", 0))
    refusing = socket.create_server(("127.0.0.1", 0))
    refused_port = refusing.getsockname()[1]
    refusing.close()
    upstreams = [f"127.0.0.1:{closing.getsockname()[1]}", f"127.0.0.1:{refused_port}"]
    try:
        with serving(backend, upstreams, upstream_tls=True, upstream_insecure=True, metrics=metrics) as fwd:
            with socket.create_connection(fwd.address, timeout=10) as client:
                conn, _ = closing.accept()
                conn.close()
                client.settimeout(10)
                assert client.recv(100) == b""  # every upstream failed
            first = records.wait(f"upstream {upstreams[0]} failed: ")
            assert first.endswith("TLS handshake failed: closed during the handshake"), first
            second = records.wait(f"upstream {upstreams[1]} failed: ")
            assert "TLS" not in second and "refused" in second, second
            assert wait_until(lambda: tls_failures(fwd, metrics, "upstream")) == {"closed": 1.0}
    finally:
        closing.close()


def test_a_client_that_closes_within_its_hello_is_refused_at_once(backend, certs, echo, records):  # noqa: F811
    """With several certificates (the SNI is read first): a half-sent ClientHello and a FIN are
    refused as closed, not left until the handshake's timeout."""
    both = dict(tls_cert=[certs.crt("server"), certs.crt("other")], tls_key=[certs.key("server"), certs.key("other")])
    hello = ssl_hello_bytes(certs.client_context(), "other.test")
    with serving(backend, f"127.0.0.1:{echo.address[1]}", tls_handshake_timeout=30, **both) as fwd:
        start = time.monotonic()
        with socket.create_connection(fwd.address, timeout=10) as client:
            client.sendall(hello[: len(hello) // 2])
            client.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            with contextlib.suppress(ConnectionError):
                while client.recv(100):  # (an alert, maybe) until closed
                    pass
        line = records.wait("refused: TLS handshake failed: ")
        assert line.endswith("closed during the handshake"), line
        assert time.monotonic() - start < 10  # (the timeout is 30 s)


def ssl_hello_bytes(context: ssl.SSLContext, name: str) -> bytes:
    """The ClientHello `context` sends for `name`, taken from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_client_sending_garbage_is_refused_others_served(backend, certs, echo, records, metrics):  # noqa: F811
    options = dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], metrics=metrics)
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(3000), b"\x16\x03\x01\x00\x05hello"):
            with socket.create_connection(fwd.address, timeout=10) as client:
                with contextlib.suppress(OSError):
                    client.sendall(garbage)
                client.settimeout(10)
                with contextlib.suppress(ConnectionError):
                    while client.recv(4096):  # (an alert, maybe) until closed
                        pass
        assert wait_until(lambda: fwd.stats.refused == 3), fwd.stats
        assert len(echo._conns) == 0
        reasons = tls_failures(fwd, metrics, "client")
        assert sum(reasons.values()) == 3 and set(reasons) <= tcptotcp._tls.FAILURE_REASONS | {"other"}, reasons
        with tls_client(fwd, certs.client_context()) as client:
            checksummed_echo(client, 1000)


def test_a_stalled_handshake_times_out_without_holding_others(backend, certs, echo, records, metrics):  # noqa: F811
    options = dict(
        tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], tls_handshake_timeout=0.5, metrics=metrics
    )
    with serving(backend, f"127.0.0.1:{echo.address[1]}", **options) as fwd:
        silent = socket.create_connection(fwd.address, timeout=10)
        halfway = socket.create_connection(fwd.address, timeout=10)
        try:
            # Half a ClientHello: a record header that promises more than comes.
            halfway.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            started = time.monotonic()
            with tls_client(fwd, certs.client_context()) as client:  # served meanwhile
                checksummed_echo(client, 1000)
            for sock in (silent, halfway):
                sock.settimeout(10)
                assert sock.recv(100) == b""
            assert time.monotonic() - started < 5
        finally:
            silent.close()
            halfway.close()
        assert records.wait("refused: TLS handshake failed: timed out")
        assert wait_until(lambda: tls_failures(fwd, metrics, "client").get("timeout") == 2.0)


def test_proxy_headers_stay_plaintext_around_tls(backend, certs, records):
    upstream = TlsEchoServer(certs.server_context(), proxy=True)
    try:
        with serving(
            backend,
            upstream.text,
            accept_proxy=True,
            send_proxy="v1",
            tls_cert=[certs.crt("server")],
            tls_key=[certs.key("server")],
            upstream_tls=True,
            upstream_ca=certs.crt("ca"),
        ) as fwd:
            raw = socket.create_connection(fwd.address, timeout=10)
            raw.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 4321 443\r\n")  # before our handshake
            with certs.client_context().wrap_socket(raw, server_hostname="localhost") as client:
                checksummed_echo(client, 300_000)
            assert upstream.headers == [b"PROXY TCP4 192.0.2.7 198.51.100.1 4321 443\r\n"]
            assert "#1 open 192.0.2.7:4321 -> " in records.wait(" open ")
    finally:
        upstream.close()


# -- options ---------------------------------------------------------------------------------------


def test_option_errors_name_the_option_and_the_file(certs, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    cases = [
        (dict(tls_key=[certs.key("server")]), "tls_key needs tls_cert"),
        (dict(tls_cert=[missing]), f"tls_cert: {missing}: cannot read: No such file"),
        (dict(tls_cert=[str(bad)]), f"tls_cert: {bad} (no tls_key: its key in it): not a certificate"),
        (
            dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("other")]),
            f"tls_cert: {certs.crt('server')} with the key {certs.key('other')}: not a certificate",
        ),
        (
            dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server"), certs.key("other")]),
            "tls_key: 2 keys for 1 certificates",
        ),
        (dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], tls_client_ca=str(bad)), "tls_client_ca"),
        (dict(tls_cert=[certs.crt("server")], tls_key=[certs.key("server")], tls_ciphers="NOPE"), "tls_ciphers"),
        (dict(upstream_ca=certs.crt("ca")), "upstream_ca needs upstream_tls"),
        (dict(upstream_tls=True, upstream_ca=missing), f"upstream_ca: {missing}: cannot read"),
        (dict(upstream_tls=True, upstream_key=certs.key("client")), "upstream_key needs upstream_cert"),
        (dict(upstream_tls=True, upstream_insecure=True, upstream_ca=certs.crt("ca")), "upstream_insecure"),
        (dict(tls_context=certs.server_context(), tls_cert=[certs.crt("server")]), "not both"),
    ]
    for options, words in cases:
        with pytest.raises(ValueError) as info:
            tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:9", **options)
        assert words in str(info.value), (options, str(info.value))
    with pytest.raises(ValueError, match="no host name to verify"):
        tcptotcp.Forwarder("127.0.0.1:0", "unix:/nowhere", upstream_tls=True)
    with pytest.raises(ValueError, match="tls_min_version"):
        tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:9", tls_min_version="1.1")
    # A cert file that holds its key too is one --tls-cert.
    both = tmp_path / "both.pem"
    both.write_text(Path(certs.crt("server")).read_text() + Path(certs.key("server")).read_text())
    tcptotcp.Forwarder("127.0.0.1:0", "127.0.0.1:9", tls_cert=[str(both)]).close()


def test_option_errors_at_start_from_the_command_line_and_the_file(certs, tmp_path):
    missing = str(tmp_path / "missing.pem")
    run = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", "127.0.0.1:9", "--tls-cert", missing],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert f"tcptotcp: error: 127.0.0.1:0: tls_cert: {missing}: cannot read: No such file" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "127.0.0.1:0", "127.0.0.1:9", "--tls-min-version", "1.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "argument --tls-min-version" in run.stderr
    config = tmp_path / "t2t.toml"
    config.write_text(
        f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\ntls_cert = "{certs.crt("server")}"\n'
        f'tls_key = "{certs.key("other")}"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "not a certificate and its private key" in run.stderr, run.stderr


# -- reloading certificates ------------------------------------------------------------------------


def _install(certs: Certs, name: str, cert: Path, key: Path) -> None:
    for source, target in ((certs.crt(name), cert), (certs.key(name), key)):
        temporary = target.with_suffix(".tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


def _subject(fp: ForwarderProcess, certs: Certs) -> str:
    context = certs.client_context()
    context.check_hostname = False
    host, port = fp.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            subject = client.getpeercert()["subject"]
            checksummed_echo(client, 1000)
    return str(subject[0][0][1])


@pytest.mark.signals
@pytest.mark.parametrize("how", ["command line", "config file"])
def test_sighup_reloads_certificates_keeps_open_bridges(backend, forwarders, echo, certs, tmp_path, how):  # noqa: F811
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    _install(certs, "server", cert, key)
    upstream = f"127.0.0.1:{echo.address[1]}"
    if how == "command line":
        fp = forwarders("127.0.0.1:0", upstream, "--tls-cert", str(cert), "--tls-key", str(key))
    else:
        config = tmp_path / "t2t.toml"
        # Names beside the config file: the forwarder runs elsewhere, and reads them from there.
        assert Path.cwd() != tmp_path
        files = f'tls_cert = "{cert.name}"\ntls_key = "{key.name}"\n'
        config.write_text(f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "{upstream}"\n' + files)
        fp = forwarders("--config", str(config))
    if backend.name == "cython":  # (the pure backend has no loops to say it of)
        fp.wait_log(r"listening on \S+, forwarding to \S+ \(backend cython, " + re.escape(tls_relay_text()) + r"\)$")
    assert _subject(fp, certs) == "localhost"
    host, port = fp.address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    with certs.client_context().wrap_socket(raw, server_hostname="localhost") as keeper:
        checksummed_echo(keeper, 100_000)
        _install(certs, "other", cert, key)
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log("reloaded: ")
        assert _subject(fp, certs) == "other.test"  # new clients: the new certificate
        checksummed_echo(keeper, 100_000)  # the open bridge: untouched
        # A bad file: the reload fails, says which file and why, and the last good one stays.
        cert.write_text("garbage\n")
        fp.proc.send_signal(signal.SIGHUP)
        failed = fp.wait_log("reload failed")
        assert str(cert) in failed.string and "not a certificate" in failed.string
        assert _subject(fp, certs) == "other.test"
        checksummed_echo(keeper, 4 * 1024 * 1024)
    assert fp.proc.poll() is None
    fp.terminate()


@pytest.mark.signals
def test_a_reload_switches_tls_on_where_the_loops_serve_and_keeps_plain_bridges(
    backend,
    forwarders,  # noqa: F811
    echo,  # noqa: F811
    certs,
    tmp_path,
):
    """A plaintext forward, then a reload that gives it a certificate: new clients speak TLS,
    the bridge opened before relays on in plaintext, and the same listener serves both."""
    upstream = f"127.0.0.1:{echo.address[1]}"
    config = tmp_path / "t2t.toml"
    forward = f'[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "{upstream}"\n'
    config.write_text(forward)
    fp = forwarders("--config", str(config))
    host, port = fp.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as keeper:
        checksummed_echo(keeper, 100_000)
        files = f'tls_cert = "{certs.crt("server")}"\ntls_key = "{certs.key("server")}"\n'
        config.write_text(forward + files)  # (the same listen: the same forward, changed)
        fp.proc.send_signal(signal.SIGHUP)
        fp.wait_log("reloaded: ")
        assert not any("reload failed" in line for line in fp.lines), fp.lines
        assert _subject(fp, certs) == "localhost"  # new clients: TLS
        checksummed_echo(keeper, 100_000)  # the plaintext bridge: untouched
    if backend.listener == "loops":  # (no second listener: the loops do the handshakes)
        assert not any("accepting in Python" in line for line in fp.lines), fp.lines
    assert fp.proc.poll() is None
    fp.terminate()
