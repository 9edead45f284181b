"""A Bridge with TLS sides (ssl.SSLSocket objects whose handshake Python did), over both
backends: the compiled one relays the records in its loops, through the SSL objects themselves;
the pure one in its pump threads. Every byte checksummed; ends checked for close_notify."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from typing import List, Tuple

import pytest

import tcptotcp
from helpers import Background, bridge_threads, link, no_leaks, recv_exactly, recv_until_eof, sha, tls_contexts
from tcptotcp._bridge import bandwidth_bucket

try:
    from tcptotcp import _core
except ImportError:
    _core = None  # type: ignore[assignment]


def relayed_in_the_loops(bridge: tcptotcp.Bridge) -> bool:
    return _core is not None and isinstance(bridge._relay, _core.Relay)


def tls_link(strict: bool = True) -> Tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(peer, bridge end) over loopback TCP; the bridge end is the TLS server. A strict peer
    tells a cut from close_notify (Python 3.9's contexts would take a cut for a clean end)."""
    server_ctx, client_ctx = tls_contexts()
    if strict:
        for context in (server_ctx, client_ctx):
            context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    raw_peer, raw_bridge = link("tcp")
    handshake = Background(lambda: server_ctx.wrap_socket(raw_bridge, server_side=True))
    peer = client_ctx.wrap_socket(raw_peer, server_hostname="localhost", suppress_ragged_eofs=False)
    bridge_end = handshake.result()
    assert isinstance(bridge_end, ssl.SSLSocket)
    return peer, bridge_end


class Sides:
    """Side 1 TLS (or plain), side 2 TLS (or plain): the peers and the bridge's ends; all closed on exit."""

    def __init__(self, tls1: bool = True, tls2: bool = False) -> None:
        self.socks: List[socket.socket] = []
        self.peer1, self.end1 = tls_link() if tls1 else link("tcp")
        self.peer2, self.end2 = tls_link() if tls2 else link("tcp")
        self.socks += [self.peer1, self.end1, self.peer2, self.end2]

    def __enter__(self) -> Sides:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.socks:
            sock.close()


def send_close_notify(sock: ssl.SSLSocket) -> None:
    """A TLS peer's clean end: its close_notify, without waiting for the answer."""
    sock.setblocking(False)
    try:
        sock.unwrap()
    except ssl.SSLWantReadError:
        pass  # sent; the answer is not waited for


def test_tls_records_run_in_the_loops_on_the_compiled_backend(backend):
    with no_leaks(), Sides() as s:
        threads = bridge_threads()
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        assert relayed_in_the_loops(bridge) == (backend.name == "cython")
        if backend.name == "cython":
            assert bridge_threads() == threads  # no thread for it
        data = os.urandom(100_000)
        s.peer1.sendall(data)
        assert recv_exactly(s.peer2, len(data)) == data
        bridge.stop()
        assert bridge.wait(10).reason == "stopped"


@pytest.mark.parametrize("ender", [1, 2], ids=["tls-peer-ends", "other-peer-ends"])
@pytest.mark.parametrize("tls2", [False, True], ids=["tls-plain", "tls-tls"])
@pytest.mark.parametrize("size", [10, 6_000_000])
def test_every_byte_both_ways_then_close_notify(backend, size, tls2, ender):
    """Each way in turn, every byte; then one peer ends cleanly (close_notify, or a FIN from a
    plain peer) and the bridge ends "closed": the other TLS peer's read ends at our
    close_notify (a strict peer raises at a cut)."""
    up, down = os.urandom(size), os.urandom(size + 7)
    with Sides(tls1=True, tls2=tls2) as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        sending = Background(lambda: s.peer1.sendall(up))
        assert recv_exactly(s.peer2, len(up), timeout=30) == up
        sending.result()
        sending = Background(lambda: s.peer2.sendall(down))
        assert recv_exactly(s.peer1, len(down), timeout=30) == down
        sending.result()
        closer, other = (s.peer1, s.peer2) if ender == 1 else (s.peer2, s.peer1)
        if isinstance(closer, ssl.SSLSocket):
            send_close_notify(closer)
        else:
            closer.shutdown(socket.SHUT_WR)
        other.settimeout(10)
        assert other.recv(100) == b""  # a clean end: close_notify to a TLS peer, else a FIN
        result = bridge.wait(10)
    assert result is not None
    assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (len(up), len(down), "closed")


def test_bytes_the_ssl_object_already_holds_are_relayed(backend):
    """Bytes decrypted before the bridge started (the caller read a part of a record) are in
    the SSL object, not the socket: no readiness tells of them, and they still go first."""
    with Sides(tls1=True, tls2=False) as s:
        s.peer1.sendall(b"0123456789" * 10)
        s.end1.settimeout(10)
        assert s.end1.recv(1) == b"0"  # the whole record was read and decrypted
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        assert recv_exactly(s.peer2, 99, timeout=5) == (b"0123456789" * 10)[1:]
        bridge.stop()
        assert bridge.wait(10).reason == "stopped"


@pytest.mark.parametrize("how", ["fin", "fin-strict", "reset"])
def test_a_cut_is_passed_on_as_a_cut(backend, how):
    """A TLS peer that ends without close_notify cut its stream. A FIN alone is an end where the
    bridge's socket takes it for one (``suppress_ragged_eofs``, the default): "closed", else
    "error"; a reset is "error". Either way the TLS peer on the other side gets the FIN alone
    (a cut), never the alert that would say the stream is whole."""
    with Sides(tls1=True, tls2=True) as s:
        s.end1.suppress_ragged_eofs = how != "fin-strict"
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        s.peer1.sendall(b"half a message")
        assert recv_exactly(s.peer2, 14) == b"half a message"
        if how.startswith("fin"):
            socket.socket.shutdown(s.peer1, socket.SHUT_WR)  # the TCP socket's FIN, no alert
        else:
            s.peer1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.peer1.close()
        s.peer2.settimeout(10)
        with pytest.raises(ssl.SSLError) as cut:
            s.peer2.recv(100)
        assert isinstance(cut.value, ssl.SSLEOFError) or "EOF" in str(cut.value)
        result = bridge.wait(10)
    assert result is not None and result.reason == ("closed" if how == "fin" else "error")


def test_a_receiver_that_stops_reading_holds_the_tls_sender_back(backend):
    """Backpressure through records: while the TLS receiver reads nothing, the bridge stops
    reading too (its memory stays a buffer); then every byte arrives, in order."""
    size = 24 * 1024 * 1024
    data = os.urandom(size)
    with Sides(tls1=False, tls2=True) as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        sending = Background(lambda: s.peer1.sendall(data))
        deadline = time.monotonic() + 10
        before = -1
        while time.monotonic() < deadline:  # until the counts stand still
            now = bridge.counts[0]
            if now == before and now > 0:
                break
            before = now
            time.sleep(0.2)
        held = bridge.counts[0]
        assert 0 < held < size  # the sender is held back
        assert recv_exactly(s.peer2, size, timeout=30) == data
        sending.result()
        s.peer1.close()
        result = bridge.wait(10)
    assert result is not None and (result.bytes_1_to_2, result.reason) == (size, "closed")


def test_a_half_close_through_tls_sides(backend):
    """half_close=True: the TLS client's close_notify goes on as a FIN; the upstream's reply
    still reaches the client, every byte; the upstream's FIN then ends the bridge cleanly and the
    client gets close_notify."""
    request, reply = os.urandom(200_000), os.urandom(3_000_000)
    with Sides(tls1=True, tls2=False) as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30, half_close=True).start()
        s.peer1.sendall(request)
        send_close_notify(s.peer1)
        assert recv_until_eof(s.peer2) == (len(request), sha(request))  # then the FIN
        s.peer1.setblocking(True)
        sending = Background(lambda: s.peer2.sendall(reply))
        got = recv_exactly(s.peer1, len(reply), timeout=30)
        assert got == reply
        sending.result()
        s.peer2.shutdown(socket.SHUT_WR)
        s.peer1.settimeout(10)
        try:  # the alert: b"", or (as the client sent its own first) SSLZeroReturnError; a cut raises another
            assert s.peer1.recv(1) == b""
        except ssl.SSLZeroReturnError:
            pass
        result = bridge.wait(10)
    assert result is not None
    assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (len(request), len(reply), "closed")


def test_the_idle_rule_ends_a_quiet_tls_bridge_without_close_notify(backend):
    """r=1, k=1: quiet TLS sides end "idle" after the contract's checks; the TLS peer gets the FIN
    alone (an idle end must not say the stream is whole), which a strict peer reads as a cut."""
    with Sides(tls1=True, tls2=True) as s:
        began = time.monotonic()
        bridge = backend.Bridge(s.end1, s.end2, 1, 1).start()
        s.peer1.sendall(b"hello")
        assert recv_exactly(s.peer2, 5) == b"hello"
        result = bridge.wait(10)
        assert result is not None and result.reason == "idle"
        assert 1.5 < time.monotonic() - began < 6
        s.peer1.settimeout(10)
        with pytest.raises(ssl.SSLError):
            s.peer1.recv(100)


def test_bandwidth_holds_a_tls_bridge_to_its_rate(backend):
    """bandwidth= counts plaintext: 600 kB at 200 kB/s (past a burst) take about 2 s or more."""
    rate = 200_000
    data = os.urandom(600_000)
    with Sides(tls1=True, tls2=False) as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30, bandwidth=rate).start()
        began = time.monotonic()
        sending = Background(lambda: s.peer1.sendall(data))
        assert recv_exactly(s.peer2, len(data), timeout=30) == data
        took = time.monotonic() - began
        sending.result()
        s.peer1.close()
        bridge.wait(10)
    burst, _ = bandwidth_bucket(rate)
    assert took >= (len(data) - burst) / rate * 0.9


def test_a_tls_bridge_is_not_detached_and_relays_on(backend):
    with Sides() as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        s.peer1.sendall(b"before")
        assert recv_exactly(s.peer2, 6) == b"before"
        assert bridge.detach(0.5) is None
        s.peer1.sendall(b"after")
        assert recv_exactly(s.peer2, 5) == b"after"
        s.peer2.sendall(b"back")
        assert recv_exactly(s.peer1, 4) == b"back"
        bridge.stop()
        assert bridge.wait(10).reason == "stopped"


def test_the_pure_engine_relays_tls_when_told_to(backend, monkeypatch):
    """TCPTOTCP_PURE_TLS=1: the fallback the compiled backend takes where it cannot use the ssl
    module's OpenSSL, forced. The same bytes, on pump threads."""
    monkeypatch.setenv("TCPTOTCP_PURE_TLS", "1")
    if _core is not None:
        assert _core.tls_unavailable() == "TCPTOTCP_PURE_TLS is set"
    with Sides(tls1=True, tls2=True) as s:
        bridge = backend.Bridge(s.end1, s.end2, 1, 30).start()
        assert not relayed_in_the_loops(bridge)
        data = os.urandom(500_000)
        s.peer1.sendall(data)
        assert recv_exactly(s.peer2, len(data)) == data
        bridge.stop()
        assert bridge.wait(10).reason == "stopped"


def test_a_subclass_of_sslsocket_is_left_to_the_pure_engine(backend):
    class Counting(ssl.SSLSocket):
        pass

    server_ctx, client_ctx = tls_contexts()
    server_ctx.sslsocket_class = Counting
    raw_peer, raw_end = link("tcp")
    handshake = Background(lambda: server_ctx.wrap_socket(raw_end, server_side=True))
    peer = client_ctx.wrap_socket(raw_peer, server_hostname="localhost")
    end = handshake.result()
    plain_peer, plain_end = link("tcp")
    try:
        bridge = backend.Bridge(end, plain_end, 1, 30).start()
        assert not relayed_in_the_loops(bridge)
        peer.sendall(b"ping")
        assert recv_exactly(plain_peer, 4) == b"ping"
        bridge.stop()
        bridge.wait(10)
    finally:
        for sock in (peer, end, plain_peer, plain_end):
            sock.close()


def test_a_socket_before_its_handshake_is_left_to_the_pure_engine(backend):
    """The loops take an SSL object only after its handshake (one still to do would run Python's
    callbacks in a loop thread): the pure engine's reads do the handshake, then relay."""
    server_ctx, client_ctx = tls_contexts()
    raw_peer, raw_end = link("tcp")
    end = server_ctx.wrap_socket(raw_end, server_side=True, do_handshake_on_connect=False)
    plain_peer, plain_end = link("tcp")
    socks: List[socket.socket] = [raw_peer, end, plain_peer, plain_end]
    try:
        bridge = backend.Bridge(end, plain_end, 1, 30).start()
        assert not relayed_in_the_loops(bridge)
        peer = client_ctx.wrap_socket(raw_peer, server_hostname="localhost")  # the bridge answers
        socks.append(peer)
        peer.sendall(b"after the handshake")
        assert recv_exactly(plain_peer, 19) == b"after the handshake"
        bridge.stop()
        assert bridge.wait(10).reason == "stopped"
    finally:
        for sock in socks:
            sock.close()


def test_a_thousand_tls_bridges_without_a_thread_each():
    """The compiled backend: 1,000 TLS bridges at once, each echoing through its records, and
    not one thread more than before."""
    if _core is None or tcptotcp.BACKEND != "cython" or _core.tls_unavailable() is not None:
        pytest.skip("the loops do not relay TLS here")
    count = 1000
    server_ctx, client_ctx = tls_contexts()
    peers: List[socket.socket] = []
    bridges: List[tcptotcp.Bridge] = []
    threads = bridge_threads()
    try:
        for _ in range(count):
            raw_peer, raw_end = link("tcp")
            peers.append(raw_peer)
            handshake = Background(lambda raw=raw_end: server_ctx.wrap_socket(raw, server_side=True))
            tls_peer = client_ctx.wrap_socket(raw_peer, server_hostname="localhost")
            peers[-1] = tls_peer
            end = handshake.result()
            echo_peer, echo_end = link("tcp")
            peers.append(echo_peer)
            bridges.append(tcptotcp.Bridge(end, echo_end, 1, 60).start())
        assert bridge_threads() == threads
        assert all(relayed_in_the_loops(b) for b in bridges)
        for i in range(count):
            tls_peer, echo_peer = peers[2 * i], peers[2 * i + 1]
            message = f"bridge {i} ".encode() * 10
            tls_peer.sendall(message)
            assert recv_exactly(echo_peer, len(message)) == message
            echo_peer.sendall(message[::-1])
            assert recv_exactly(tls_peer, len(message)) == message[::-1]
        assert all(b.running for b in bridges)
    finally:
        for b in bridges:
            b.stop()
        for b in bridges:
            b.wait(30)
        for sock in peers:
            sock.close()
    assert all(b.wait(0) is not None and b.wait(0).reason == "stopped" for b in bridges)
